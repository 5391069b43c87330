"""The conn table as the aging sweep and the connection counts see it, computed from the raw batch buffers.

Two implementations of the same thing. `rows()` / `expired_rows()` / `counts_rows()` are plain Python over one
tuple per entry (the reference, and what tests read). `Columns` does it with numpy over the whole table at once
(the daemon's path: a sweep of a million-connection table is several times cheaper, and at 30k new connections/s
the sweep is the daemon's main work). Tests hold the two to the same answers.

An entry is (key bytes, the key its rewrite points at (the other direction's), newest last_seen in jiffies over
the filled-in CPU copies, state (the furthest any copy has seen), is-reply, proto, dest slot), taken from the
newest copy; entries with no filled-in copy are left out. Two entries are one flow when each one's partner key is
the other's key; a flow is idle for the time since the newest packet of either direction. A flow's state is its
inbound entry's, which the client's packets move, or its reply entry's once that one is further and past
ESTABLISHED: the reply entry follows the real server's packets (SYN_RECV, then FIN_WAIT or CLOSE on its FIN or
reset), so a reset or FIN from the server closes the flow as one from the client does (LVS's one state per
connection moves on both directions' packets). It times out by that state (UDP: the udp timeout) and is active
(ActiveConn) only while ESTABLISHED.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from hdslb.fastpath import abi

KEY_SIZE, VAL_SIZE = abi.CONN_KEY_SIZE, abi.CONN_VAL_SIZE
KEY4_SIZE, VAL4_SIZE = abi.CONN4_KEY_SIZE, abi.CONN4_VAL_SIZE
# struct conn_key / conn_val (bpf/include/hdslb_abi.h), the wide layout of conn6_map, checked against the loaded
# map's ctypes types in Maps. conn4_map's compact entries share the head and are widened to it (widen()): every
# function here sees one layout.
KEY_FMT = "=HHBBH16s16s"
VAL_FMT = "=HHI6s6sHBBIB3xQ16s16s"
K_PROTO, K_AF, K_SADDR, K_DADDR = 4, 5, 8, 24
K4_SADDR, K4_DADDR = 8, 12
V_SPORT, V_DPORT, V_FLAGS, V_STATE, V_SLOT, V_LAST = 0, 2, 22, 23, 24, 32
V_SADDR, V_DADDR, V4_DADDR = 40, 56, 44


def widen(kbuf, vbuf, ncpu: int):
    """conn4_map's compact keys (16 B) and values (48 B per CPU copy) in conn6_map's wide layout (40 / 72 B):
    the shared heads as they are, each IPv4 address at the start of its 16-byte field, zeros after."""
    import numpy as np

    n = len(kbuf) // KEY4_SIZE
    K = np.frombuffer(kbuf, np.uint8, n * KEY4_SIZE).reshape(n, KEY4_SIZE)
    V = np.frombuffer(vbuf, np.uint8, n * ncpu * VAL4_SIZE).reshape(n * ncpu, VAL4_SIZE)
    wk = np.zeros((n, KEY_SIZE), np.uint8)
    wk[:, :K4_SADDR] = K[:, :K4_SADDR]
    wk[:, K_SADDR:K_SADDR + 4] = K[:, K4_SADDR:K4_SADDR + 4]
    wk[:, K_DADDR:K_DADDR + 4] = K[:, K4_DADDR:K4_DADDR + 4]
    wv = np.zeros((n * ncpu, VAL_SIZE), np.uint8)
    wv[:, :V_SADDR + 4] = V[:, :V_SADDR + 4]
    wv[:, V_DADDR:V_DADDR + 4] = V[:, V4_DADDR:V4_DADDR + 4]
    return wk.tobytes(), wv.tobytes()


def narrow_key(raw: bytes) -> bytes:
    """A wide raw key of an IPv4 tuple as conn4_map's compact key."""
    return bytes(raw[:K4_SADDR]) + bytes(raw[K_SADDR:K_SADDR + 4]) + bytes(raw[K_DADDR:K_DADDR + 4])


@dataclass(frozen=True)
class Limits:
    """Idle timeouts in jiffies: by TCP state (index = state), for UDP, and for a state beyond the list."""

    by_state: tuple
    udp: int
    close: int

    def of(self, proto: int, state: int) -> int:
        if proto == socket.IPPROTO_UDP:
            return self.udp
        return self.by_state[state] if state < len(self.by_state) else self.close


# --- the reference: one tuple per entry ---------------------------------------------------------------
def rows(kbuf, vbuf, ncpu: int) -> list[tuple]:
    key, val = struct.Struct(KEY_FMT), struct.Struct(VAL_FMT)
    valid, out_f, xlat = abi.CONN_F_VALID, abi.CONN_F_OUT, abi.CONN_F_XLAT
    pack = struct.Struct("=HHBBH").pack
    per_entry = struct.Struct("=" + VAL_FMT.lstrip("=") * ncpu)  # every CPU's copy in one unpack
    nf = len(val.unpack(bytes(VAL_SIZE)))
    out = []
    for i, (k, v) in enumerate(zip(key.iter_unpack(kbuf), per_entry.iter_unpack(vbuf))):
        best, state = -1, 0
        for c in range(0, nf * ncpu, nf):  # newest filled-in copy: flags at +6, state +7, last_seen +10
            if v[c + 6] & valid:
                state = max(state, v[c + 7])
                if best < 0 or v[c + 10] > v[best + 10]:
                    best = c
        if best < 0:
            continue
        af = (10 - k[3]) if v[best + 6] & xlat else k[3]
        # the partner key: the rewritten tuple reversed (ports, proto, family, then daddr, saddr)
        out.append((bytes(kbuf[i * KEY_SIZE:(i + 1) * KEY_SIZE]),
                    pack(v[best + 1], v[best], k[2], af, 0) + v[best + 12] + v[best + 11],
                    v[best + 10], state, bool(v[best + 6] & out_f), k[2], v[best + 8]))
    return out


def flow_state(pair: tuple) -> int:
    """The state of a flow, from its one or two entries (rows() tuples): the inbound entry's (the first non-reply
    entry, else the first), or the other entry's once that is further and past ESTABLISHED (module doc)."""
    est = abi.conn_states().index("established")
    owner = next((x for x in pair if not x[4]), pair[0])
    return max([owner[3]] + [x[3] for x in pair if x is not owner and x[3] > est])


def unique(recs: list[tuple]) -> list[tuple]:
    """Each key once, at its first place with its last copy's values (a batch walk of a live table can meet an
    entry twice; the later copy is the fresher)."""
    return list({r[0]: r for r in recs}.values())


def expired_rows(recs: list[tuple], now: int, lim: Limits) -> list[tuple[tuple[bytes, ...], int]]:
    """The flows idle past their timeout: (their entries' keys, the newest last_seen of the flow)."""
    recs = unique(recs)
    by_key = {r[0]: r for r in recs}
    seen, out = set(), []
    for r in recs:
        k = r[0]
        if k in seen:
            continue
        partner = by_key.get(r[1])
        # The entry at the partner key is this flow's only if it points back here: the fast path may have
        # given an expired flow's local port to a new flow, whose reply entry then sits at that key.
        if partner is not None and (partner[1] != k or partner[0] == k):
            partner = None
        seen.add(k)
        pair = (r,) if partner is None else (r, partner)
        if partner is not None:
            seen.add(partner[0])
        last = max(x[2] for x in pair)
        if now - last > lim.of(r[5], flow_state(pair)):
            out.append((tuple(x[0] for x in pair), last))
    return out


def counts_rows(recs: list[tuple]) -> dict[int, tuple[int, int]]:
    """dest slot -> (ActiveConn, InActConn) as LVS defines them: established TCP is active, the rest not (the
    flow's state: its reply entry's too, see the module's doc)."""
    est = abi.conn_states().index("established")
    recs = unique(recs)
    by_key = {r[0]: r for r in recs}
    out: dict[int, list[int]] = {}
    for k, partner_key, _last, state, is_out, proto, slot in recs:
        if is_out:
            continue
        partner = by_key.get(partner_key)
        if partner is not None and partner[1] == k and partner[0] != k and partner[3] > est:
            state = max(state, partner[3])
        ent = out.setdefault(slot, [0, 0])
        ent[0 if (proto == socket.IPPROTO_TCP and state == est) else 1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


# --- the daemon's path: numpy over the whole table ----------------------------------------------------
_MIX = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5, 0x94D049BB133111EB)


def fold(V):
    """Conn values (n, copies, size: one copy for a shared table, one per CPU otherwise; the head is the same in
    either table's values) as one value each: (kept (n,) bool: some copy is filled in, values (n, size)): the newest
    filled-in copy (the first CPU's of equals) with the furthest state any filled-in copy has seen and
    CONN_F_WAS_EST if any has it, as the fast path's conn_newest() folds them."""
    import numpy as np

    n, copies, size = V.shape
    valid, best = newest_copy(V)
    out = V[np.arange(n), best].copy()
    if copies > 1:
        out[:, V_STATE] = np.where(valid, V[:, :, V_STATE], 0).max(axis=1)
        was = np.bitwise_or.reduce(np.where(valid, V[:, :, V_FLAGS], 0), axis=1) & abi.CONN_F_WAS_EST
        out[:, V_FLAGS] |= was.astype(np.uint8)
    return valid.any(axis=1), out


def newest_copy(V):
    """Of conn values (n, copies, size): which copies are filled in (n, copies) and, per entry, the copy with the
    largest last_seen among them (the first of equals; 0 where none is)."""
    import numpy as np

    valid = (V[:, :, V_FLAGS] & abi.CONN_F_VALID) != 0
    last = np.ascontiguousarray(V[:, :, V_LAST:V_LAST + 8]).view("<u8")[..., 0]
    return valid, np.where(valid, last.astype(np.int64), -1).argmax(axis=1)


def last_seen(M):
    """The last_seen field of folded values (n, size)."""
    import numpy as np

    return np.ascontiguousarray(M[:, V_LAST:V_LAST + 8]).view("<u8")[:, 0]


def hash_rows(a):
    """A 64-bit hash of each row of 8 to 40 bytes (its 8-byte words mixed), for sorting and matching keys."""
    import numpy as np

    w = np.ascontiguousarray(a).view("<u8")
    h = w[:, 0] * np.uint64(_MIX[0])
    for i in range(1, w.shape[1]):
        h = ((h ^ (h >> np.uint64(29))) * np.uint64(_MIX[i])) ^ w[:, i]
    return h ^ (h >> np.uint64(32))


class Columns:
    """rows() as columns: keys and partners (n x 40 uint8), last (uint64), state, out, proto, slot, each key once
    as unique() keeps it. Built batch by batch (from_batches), so the table's raw values are never all held at
    once. from_batches() returns None in the astronomically rare case of two different keys with the same
    64-bit hash: the caller then uses the reference path."""

    FIELDS = ("keys", "partner", "last", "state", "out", "proto", "slot")

    def __init__(self, cols: dict, khash):
        for f in self.FIELDS:
            setattr(self, f, cols[f])
        self._khash = khash

    def __len__(self) -> int:
        return len(self.last)

    @staticmethod
    def extract(kbuf, vbuf, ncpu: int) -> dict:
        """One batch's entries with a filled-in copy, as columns (copies: the buffers may be reused)."""
        import numpy as np

        n = len(kbuf) // KEY_SIZE
        K = np.frombuffer(kbuf, np.uint8, n * KEY_SIZE).reshape(n, KEY_SIZE)
        V = np.frombuffer(vbuf, np.uint8, n * ncpu * VAL_SIZE).reshape(n, ncpu, VAL_SIZE)
        ok, bv = fold(V)  # the newest filled-in copy's bytes, with the furthest state any copy has seen
        bv, K = bv[ok], K[ok]
        flags = bv[:, V_FLAGS]
        proto = K[:, K_PROTO].copy()
        af = K[:, K_AF].astype(np.int16)
        af = np.where((flags & abi.CONN_F_XLAT) != 0, 10 - af, af).astype(np.uint8)
        partner = np.zeros_like(K)
        partner[:, K_SADDR:K_SADDR + 16] = bv[:, V_DADDR:V_DADDR + 16]
        partner[:, K_DADDR:K_DADDR + 16] = bv[:, V_SADDR:V_SADDR + 16]
        partner[:, 0:2] = bv[:, V_DPORT:V_DPORT + 2]
        partner[:, 2:4] = bv[:, V_SPORT:V_SPORT + 2]
        partner[:, K_PROTO] = proto
        partner[:, K_AF] = af
        return {"keys": np.ascontiguousarray(K), "partner": partner, "last": last_seen(bv),
                "state": bv[:, V_STATE].copy(),
                "out": (flags & abi.CONN_F_OUT) != 0, "proto": proto,
                "slot": np.ascontiguousarray(bv[:, V_SLOT:V_SLOT + 4]).view("<u4")[:, 0]}

    @classmethod
    def from_batches(cls, parts: list) -> "Columns | None":
        import numpy as np

        if not parts:
            parts = [Columns.extract(b"", b"", 1)]
        cols = {f: np.concatenate([p[f] for p in parts]) for f in cls.FIELDS}
        kh = hash_rows(cols["keys"])
        n = len(kh)
        order = np.argsort(kh, kind="stable")
        sh = kh[order]
        start = np.ones(n, bool)
        start[1:] = sh[1:] != sh[:-1]
        if n and not start.all():
            run = np.cumsum(start) - 1                  # each sorted row's run of equal hashes
            firsts = order[np.flatnonzero(start)]
            if not np.array_equal(cols["keys"][order], cols["keys"][firsts[run]]):
                return None  # a hash collision between different keys
            lasts = order[np.r_[np.flatnonzero(start)[1:] - 1, n - 1]]
            perm = np.argsort(firsts, kind="stable")    # table order of each key's first place
            src = lasts[perm]                           # with its last copy's values
            cols = {f: v[src] for f, v in cols.items()}
            kh = kh[src]
        cols["partner"] = np.ascontiguousarray(cols["partner"])
        return cls(cols, kh)

    def key(self, i: int) -> bytes:
        return self.keys[i].tobytes()

    def partner_index(self):
        """For each row, the row holding its partner key, or -1."""
        import numpy as np

        n = len(self)
        if n == 0:
            return np.zeros(0, np.int64)
        order = np.argsort(self._khash, kind="stable")
        sh = self._khash[order]
        ph = hash_rows(self.partner)
        pos = np.minimum(np.searchsorted(sh, ph), n - 1)
        cand = order[pos]
        hit = (sh[pos] == ph) & np.all(self.keys[cand] == self.partner, axis=1)
        return np.where(hit, cand, -1)

    def expired(self, now: int, lim: Limits) -> list[tuple[tuple[bytes, ...], int]]:
        """expired_rows() over the columns: the same flows, in the same order."""
        r, j, last = self._dead(now, lim)
        out = []
        for x in range(len(r)):
            i, k = int(r[x]), int(j[x])
            out.append(((self.key(i),) if k < 0 else (self.key(i), self.key(k)), int(last[x])))
        return out

    # struct sweep_req (bpf/hdslb_xdp.c): two wide keys, the newest last_seen, how many keys, removed (out)
    SWEEP_REQ = 2 * KEY_SIZE + 16

    # hdslb_sweep removes a flow only if no copy has seen a packet after `last`: never true with this one
    LAST_FORCED = (1 << 64) - 1

    def sweep_requests(self, now: int, lim: Limits, force=None) -> bytes:
        """expired()'s flows as hdslb_sweep's requests, built with numpy (no Python object per flow); plus the
        flows of the rows in `force` (indexes), removed whatever their idle time and even if a packet comes."""
        import numpy as np

        r, j, last = self._dead(now, lim, force)
        req = np.zeros((len(r), self.SWEEP_REQ), np.uint8)
        req[:, :KEY_SIZE] = self.keys[r]
        two = j >= 0
        req[two, KEY_SIZE:2 * KEY_SIZE] = self.keys[j[two]]
        tail = req[:, 2 * KEY_SIZE:].view("<u4")  # (n, 4): last (two words), nkeys, removed
        tail[:, 0:2] = last.astype("<u8").view("<u4").reshape(-1, 2)
        tail[:, 2] = 1 + two
        return req.tobytes()

    def _dead(self, now: int, lim: Limits, force=None):
        """The flows idle past their timeout: (their first row, the partner's row or -1, newest last_seen); those
        of the rows in `force` too, with last_seen LAST_FORCED."""
        import numpy as np

        n = len(self)
        if n == 0:
            e = np.zeros(0, np.int64)
            return e, e, e.astype(np.uint64)
        rows_ = np.arange(n)
        p = self.partner_index()
        pc = np.where(p >= 0, p, 0)
        mutual = (p >= 0) & (p != rows_) & (p[pc] == rows_)
        # each flow once, from its first row in table order (as expired_rows walks it)
        first = ~mutual | (rows_ < p)
        r = rows_[first]
        j = np.where(mutual[first], p[first], -1)
        jc = np.where(j >= 0, j, r)
        last = np.maximum(self.last[r], np.where(j >= 0, self.last[jc], 0))
        # the flow's state (module doc): the owner's, the other entry's once further and past ESTABLISHED
        owner = np.where(~self.out[r] | (j < 0) | self.out[jc], r, jc)
        other = np.where(owner == r, jc, r)
        est = abi.conn_states().index("established")
        so, sx = self.state[owner], self.state[other]
        state = np.where((j >= 0) & (sx > est), np.maximum(so, sx), so)
        by_state = np.array(list(lim.by_state) + [lim.close] * (256 - len(lim.by_state)), np.int64)
        limit = np.where(self.proto[r] == socket.IPPROTO_UDP, lim.udp, by_state[state])
        idle = np.int64(now) - last.astype(np.int64)
        if force is not None and len(force):
            forced = np.zeros(n, bool)
            forced[force] = True
            forced = forced[r] | ((j >= 0) & forced[jc])
            last = np.where(forced, np.uint64(self.LAST_FORCED), last)
            dead = np.flatnonzero((idle > limit) | forced)
        else:
            dead = np.flatnonzero(idle > limit)
        return r[dead], j[dead], last[dead]

    # What a client keeps sending on one tuple without a handshake that could move it: UDP, and ICMP echo (a SNAT'd
    # ping keeps its identifier for as long as it runs)
    NODEST_PROTOS = (socket.IPPROTO_UDP, socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6)

    def reply_daddrs(self) -> set:
        """The addresses reply entries are keyed to (a FullNAT flow's local address, a SNAT flow's source address;
        a NAT flow's client), as 16 bytes each (IPv4 zero-padded)."""
        import numpy as np

        return {bytes(r) for r in np.unique(self.keys[self.out, K_DADDR:K_DADDR + 16], axis=0)}

    def nodest_udp(self, dests) -> "np.ndarray":
        """The inbound UDP (and ICMP echo) rows whose real server is gone: dests() gives every real server there is,
        (slot, address as 16 bytes, is a SNAT source), and is called only when the table has such rows (a walk
        of 100k real servers costs 45 ms, each sweep); a row is gone when its slot is none of theirs, or the
        slot's server now has another address than the one the flow is rewritten to (the slot went to a new
        server). A SNAT flow's rewrite is the outside host, so its slot alone is checked."""
        import numpy as np

        rows = np.flatnonzero(~self.out & np.isin(self.proto, self.NODEST_PROTOS))
        if not len(rows):
            return rows
        dests = sorted(dests())
        ks = np.array([x[0] for x in dests], np.int64)
        slot = self.slot[rows].astype(np.int64)
        if not len(ks):
            return rows
        pos = np.minimum(np.searchsorted(ks, slot), len(ks) - 1)
        known = ks[pos] == slot
        addr = np.frombuffer(b"".join(x[1] for x in dests), np.uint8).reshape(-1, 16)[pos]
        snat = np.array([x[2] for x in dests], bool)[pos]
        same = np.all(addr == self.partner[rows, K_SADDR:K_SADDR + 16], axis=1)  # the rewrite's destination
        return rows[~(known & (snat | same))]

    def counts(self) -> dict[int, tuple[int, int]]:
        import numpy as np

        est = abi.conn_states().index("established")
        inb = ~self.out
        tcp = self.proto == socket.IPPROTO_TCP
        active = inb & tcp & (self.state == est)
        # The flow's state is the furthest either entry saw: an ESTABLISHED inbound entry whose reply entry saw
        # the server's FIN or reset is not active. Only entries past ESTABLISHED (few) are looked up, by key: the
        # estimator asks for counts every few seconds, and pairing the whole table costs as much as reading it.
        closing = np.flatnonzero(tcp & (self.state > est))
        cand = np.flatnonzero(active)
        if len(closing) and len(cand):
            order = np.argsort(self._khash[closing])
            skh = self._khash[closing][order]
            ph = hash_rows(self.partner[cand])
            pos = np.minimum(np.searchsorted(skh, ph), len(skh) - 1)
            hit = skh[pos] == ph
            ci, oi = cand[hit], closing[order[pos[hit]]]
            mutual = np.all(self.keys[oi] == self.partner[ci], axis=1) & np.all(self.partner[oi] == self.keys[ci],
                                                                                 axis=1)
            active[ci[mutual & (ci != oi)]] = False
        slots = self.slot[inb]
        active = active[inb]
        out = {}
        for want, col in ((True, 0), (False, 1)):
            u, c = np.unique(slots[active == want], return_counts=True)
            for s, m in zip(u.tolist(), c.tolist()):
                ent = out.setdefault(s, [0, 0])
                ent[col] = m
        return {k: (v[0], v[1]) for k, v in out.items()}


# --- the connection listing (ipvsadm -Lnc, REST /v2/conns) from columns ---------------------------------
class ListColumns(Columns):
    """Columns plus what a listing prints and the sweep does not need: the service (svc_id) and the CPU whose
    copy is the newest (cpu). The sweep's Columns are untouched; this is read for conn.list only."""

    FIELDS = Columns.FIELDS + ("svc_id", "cpu")
    V_SVC = 20  # conn_val.svc_id (CONN_VAL_HEAD)

    @staticmethod
    def extract(kbuf, vbuf, ncpu: int) -> dict:
        import numpy as np

        cols = Columns.extract(kbuf, vbuf, ncpu)
        n = len(kbuf) // KEY_SIZE
        V = np.frombuffer(vbuf, np.uint8, n * ncpu * VAL_SIZE).reshape(n, ncpu, VAL_SIZE)
        valid, best = newest_copy(V)  # as Columns.extract picks it
        idx = np.flatnonzero(valid.any(axis=1))
        best = best[idx]
        bv = V[idx, best]
        cols["svc_id"] = np.ascontiguousarray(bv[:, ListColumns.V_SVC:ListColumns.V_SVC + 2]).view("<u2")[:, 0]
        cols["cpu"] = best.astype(np.int32)
        return cols


ICMP_PROTOS = (socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6)


def state_name(names, proto: int, state: int) -> str:
    """A listed entry's state by name. An ICMP flow (SNAT of echo) has the state a UDP flow has (CS_UDP: one state,
    timed by the udp timeout) but is named for its protocol, as LVS names it ("ICMP"): ipvsadm -Lnc printed it as
    a UDP flow."""
    if state >= len(names):
        return "?"
    name = names[state]
    return "icmp" if name == "udp" and proto in ICMP_PROTOS else name


# Every field of a conn.list entry, in the order the dict-based listing (Daemon.conn_list) gives them.
LIST_FIELDS = ("proto", "af", "saddr", "sport", "daddr", "dport", "to_saddr", "to_sport", "to_daddr", "to_dport",
               "out", "state", "svc_id", "dest_slot", "last_seen_ns", "cpu", "idle_s", "expire_s")


class Listing:
    """A snapshot of the conn table as conn.list lists it, computed once over the columns (flow state, idle and
    expire times as Daemon.conn_list computes them: the entry paired with its partner only when each points at
    the other), its entries turned into dicts only page by page (entries(): a million-connection table is never
    a million dicts at once).

    cols: ListColumns; now_ns: CLOCK_MONOTONIC of the listing; to_ns(jiffies array) -> monotonic ns; lim: Limits
    in seconds; names: the state names; shared: one copy for every CPU (cpu is None); inbound: only the entries
    of the client's direction (what ipvsadm -Lnc prints)."""

    def __init__(self, cols: "ListColumns", now_ns: int, to_ns, lim: Limits, names, shared: bool,
                 inbound: bool = False):
        import numpy as np

        self.cols, self.names, self.shared = cols, list(names), shared
        n = len(cols)
        rows_ = np.arange(n)
        p = cols.partner_index()
        pc = np.where(p >= 0, p, 0)
        pair = (p >= 0) & (p != rows_) & (p[pc] == rows_) if n else np.zeros(0, bool)
        est = self.names.index("established")
        # conn_list's rule: the inbound entry is the other one only when this one is a reply and it is not
        inb = np.where(pair & cols.out & ~cols.out[pc], pc, rows_)
        rep = np.where(inb == rows_, pc, rows_)
        st = cols.state.astype(np.int64)
        self.state = np.where(pair, np.where(st[rep] > est, np.maximum(st[inb], st[rep]), st[inb]), st)
        # last_seen_ns is the entry's own; its idle time is the flow's (the newest packet of either direction)
        self.last_ns = np.asarray(to_ns(cols.last), np.int64)
        flow_last = np.where(pair, np.maximum(self.last_ns, self.last_ns[pc]), self.last_ns)
        self.idle = np.maximum(0, (np.int64(now_ns) - flow_last) // 10**9)
        by_state = np.array(list(lim.by_state) + [lim.close] * (256 - len(lim.by_state)), np.int64)
        limit = np.where(cols.proto == socket.IPPROTO_UDP, lim.udp, by_state[np.minimum(self.state, 255)])
        self.expire = np.maximum(0, limit - self.idle)
        self.rows = np.flatnonzero(~cols.out) if inbound else rows_
        self.inbound = inbound
        # kept for the snapshot's lifetime: held in the narrowest types that carry the values (idle and expire
        # are seconds), and the key hashes the pairing needed let go
        self.state = self.state.astype(np.uint8)
        self.idle, self.expire = self.idle.astype(np.int32), self.expire.astype(np.int32)
        self.rows = self.rows.astype(np.int32)
        cols._khash = None

    def __len__(self) -> int:
        return len(self.rows)

    def max_bytes(self, start: int = 0, stop: int | None = None) -> int:
        """An upper bound on the msgpack size of entries(start, stop) (the field names, and each value at its
        largest encoding: an IPv4 address 16 bytes, an IPv6 one 41), checked before any entry is built."""
        import numpy as np

        r = self.rows[start:stop]
        keys = sum(len(k) + 1 for k in LIST_FIELDS) + 3  # fixstr names, a map16 header
        state = 1 + max([len(x) for x in self.names] + [1])
        # proto 2, af 1, ports 4 x 3, out 1, svc_id 3, dest_slot 5, last_seen_ns 9, cpu 5, idle_s 9, expire_s 9
        fixed = keys + 2 + 1 + 12 + 1 + state + 3 + 5 + 9 + 5 + 9 + 9
        v6 = int(np.count_nonzero(self.cols.keys[r, K_AF] != 4)) + \
            int(np.count_nonzero(self.cols.partner[r, K_AF] != 4))
        return 5 + len(r) * (fixed + 4 * 16) + v6 * 2 * (41 - 16)

    def entries(self, start: int = 0, stop: int | None = None) -> list[dict]:
        """The listing's entries [start, stop) as conn.list dicts (addresses as strings)."""
        import ipaddress

        c, r = self.cols, self.rows[start:stop]
        keys, part = c.keys[r], c.partner[r]
        af, to_af = keys[:, K_AF].tolist(), part[:, K_AF].tolist()
        be16 = lambda a: a.view(">u2")[:, 0].tolist()  # noqa: E731  (network-order ports)
        sport, dport = be16(keys[:, 0:2].copy()), be16(keys[:, 2:4].copy())
        to_dport, to_sport = be16(part[:, 0:2].copy()), be16(part[:, 2:4].copy())
        sa, da = keys[:, K_SADDR:K_SADDR + 16].tobytes(), keys[:, K_DADDR:K_DADDR + 16].tobytes()
        # the rewrite's source is the partner key's destination, and its destination the partner's source
        tsa, tda = part[:, K_DADDR:K_DADDR + 16].tobytes(), part[:, K_SADDR:K_SADDR + 16].tobytes()
        memo: dict = {}
        ntop = socket.inet_ntop

        def addr(buf, i, fam):
            raw = buf[16 * i:16 * i + (4 if fam == 4 else 16)]
            s = memo.get(raw)
            if s is None:  # IPv6 as ipaddress prints it (inet_ntop differs on a few forms)
                s = memo[raw] = ntop(socket.AF_INET, raw) if fam == 4 else str(ipaddress.IPv6Address(raw))
            return s

        names = self.names
        proto, out, state = c.proto[r].tolist(), c.out[r].tolist(), self.state[r].tolist()
        svc, slot, last = c.svc_id[r].tolist(), c.slot[r].tolist(), self.last_ns[r].tolist()
        cpu = [None] * len(r) if self.shared else c.cpu[r].tolist()
        idle, expire = self.idle[r].tolist(), self.expire[r].tolist()
        out_list = []
        for i in range(len(r)):
            f, t = af[i], to_af[i]
            out_list.append({"proto": proto[i], "af": f, "saddr": addr(sa, i, f), "sport": sport[i],
                             "daddr": addr(da, i, f), "dport": dport[i], "to_saddr": addr(tsa, i, t),
                             "to_sport": to_sport[i], "to_daddr": addr(tda, i, t), "to_dport": to_dport[i],
                             "out": out[i], "state": state_name(names, proto[i], state[i]),
                             "svc_id": svc[i], "dest_slot": slot[i], "last_seen_ns": last[i], "cpu": cpu[i],
                             "idle_s": idle[i], "expire_s": expire[i]})
        return out_list
