"""The slow path's neighbour table (ARP/ND cache): a DPVS/Linux-style state machine with bounded unresolved queues.

Pure logic: no packets, no sockets, no clock of its own. Every call returns NeighEvents saying what the caller
must do (send these probes, write or delete these fast-path entries, transmit these queued frames now that
their next hop is known); the dispatcher turns them into frames and map writes.

States (Linux names; show() prints DPVS's):

    INCOMPLETE  probing with broadcast ARP / multicast NS; frames wait in the entry's queue    DPVS SEND
    REACHABLE   confirmed less than `timeout` seconds ago                                      DPVS REACHABLE
    STALE       has a MAC, unconfirmed for `timeout`: still used, re-probed once in use        DPVS PROBE
    PROBE       in use while stale: re-probing (unicast first, then broadcast); still used     DPVS DELAY
    FAILED      no answer to max_probes probes: frames dropped for fail_hold seconds           DPVS NONE
    PERMANENT   static (dpip neigh add); never learned over, never aged                        REACHABLE static

Linux's DELAY (wait before probing) is folded into PROBE: the slow path sees no upper-layer confirmations
that DELAY would wait for, so it probes at once.

Size, as Linux bounds its own (gc_thresh2/3): anyone on the segment can make us create entries (an ARP request
or NS to our address is worth an entry), so learned entries are counted against gc_thresh2 and gc_thresh3.
Creating one at gc_thresh3 (or above gc_thresh2 when the last forced GC is 5 s old) first runs a forced GC,
which forgets FAILED, then STALE, then other unreferenced entries, least recently active first, down to
gc_thresh2; an entry that still does not fit is refused and counted. Static entries, wanted next hops (real
servers, gateways) and entries with queued frames are never evicted. Unresolved queues are bounded per next
hop (unres_queue_length frames) and together (unres_qbytes bytes).
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

DEFAULT_TIMEOUT = 60.0  # neigh_defs timeout: seconds a confirmation keeps an entry REACHABLE
DEFAULT_UNRES_QLEN = 128  # neigh_defs unres_queue_length: frames held per unresolved next hop
DEFAULT_MAX_PROBES = 3  # probes per resolution attempt (Linux mcast_solicit / ucast_solicit)
DEFAULT_RETRANS = 1.0  # seconds between probes (Linux retrans_time)
MAX_NEIGH = 16384  # the fast path's neigh_map size (fastpath.loader.Sizes.max_neigh, -DMAX_NEIGH)
GC_THRESH2_INTERVAL = 5.0  # seconds between forced GCs between gc_thresh2 and gc_thresh3 (Linux: 5 s)
GC_THRESH3_INTERVAL = 1.0  # ... and at gc_thresh3: a table full of entries in use costs one walk a second
# Bytes held by all unresolved queues together: ~5500 full-size frames, 100k SYNs; without it an attacker
# who makes next hops unresolved pins unres_queue_length x MTU per entry, i.e. gigabytes at gc_thresh3.
DEFAULT_UNRES_QBYTES = 8 << 20


def gc_thresholds(max_neigh: int) -> tuple[int, int]:
    """(gc_thresh2, gc_thresh3) for a fast path whose neigh_map holds max_neigh entries.

    gc_thresh3, the most learned entries: half the map, so static entries (the model writes them into the same
    map) and whatever a previous daemon left have the other half, and a walk of the table (tick, forced GC)
    stays short. gc_thresh2, what a forced GC shrinks the table to: half of that, Linux's ratio."""
    thresh3 = max(2, max_neigh // 2)
    return thresh3 // 2, thresh3


DEFAULT_GC_THRESH2, DEFAULT_GC_THRESH3 = gc_thresholds(MAX_NEIGH)  # 4096, 8192


class State(Enum):
    INCOMPLETE = "incomplete"
    REACHABLE = "reachable"
    STALE = "stale"
    PROBE = "probe"
    FAILED = "failed"
    PERMANENT = "permanent"


# DPVS's nud_state_names for each state, so `dpip neigh show` reads as it does on DPVS (whose PROBE is an
# expired-but-usable entry, i.e. Linux's STALE, and whose DELAY is "probe sent, waiting", i.e. Linux's PROBE).
DPVS_STATE = {State.INCOMPLETE: "SEND", State.REACHABLE: "REACHABLE", State.STALE: "PROBE", State.PROBE: "DELAY",
              State.FAILED: "NONE", State.PERMANENT: "REACHABLE"}
HAS_MAC = (State.REACHABLE, State.STALE, State.PROBE, State.PERMANENT)


@dataclass
class Entry:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ifname: str
    state: State
    mac: bytes | None = None
    updated: float = 0.0  # when the state last changed or was confirmed (seconds, the table's clock)
    used: float = 0.0  # last time a frame or a wanted next hop needed this entry
    probes: int = 0  # probes sent in the current resolution attempt
    next_probe: float = 0.0
    queue: deque = field(default_factory=deque)  # (egress ifname, frame) waiting for the MAC, oldest first

    @property
    def permanent(self) -> bool:
        return self.state is State.PERMANENT


@dataclass(frozen=True)
class Probe:
    """Send an ARP request / NS for ip on ifname: to mac (unicast re-confirmation) or, when None, to all."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ifname: str
    mac: bytes | None = None


@dataclass
class NeighEvents:
    probes: list = field(default_factory=list)  # Probe
    updates: list = field(default_factory=list)  # (ip, mac, ifname, permanent): write into the fast path's map
    deletes: list = field(default_factory=list)  # (ip, ifname): remove from the fast path's map
    send: list = field(default_factory=list)  # (ifname, frame, mac): queued frames whose next hop is now known
    queued: int = 0  # frames put on an unresolved queue
    dropped: int = 0  # frames dropped: queue full, resolution failed, or next hop in FAILED hold-down
    # limits hit, by the slow path's counter name: neigh_table_full (an entry refused at gc_thresh3),
    # neigh_gc_forced (entries a forced GC evicted), unres_bytes_full (a frame dropped at unres_qbytes)
    counters: Counter = field(default_factory=Counter)

    def extend(self, other: NeighEvents) -> NeighEvents:
        self.probes += other.probes
        self.updates += other.updates
        self.deletes += other.deletes
        self.send += other.send
        self.queued += other.queued
        self.dropped += other.dropped
        self.counters.update(other.counters)
        return self


class NeighTable:
    def __init__(self, now: Callable[[], float] = time.monotonic, timeout: float = DEFAULT_TIMEOUT,
                 unres_queue_length: int = DEFAULT_UNRES_QLEN, max_probes: int = DEFAULT_MAX_PROBES,
                 retrans: float = DEFAULT_RETRANS, gc_stale: float | None = None, fail_hold: float | None = None,
                 gc_thresh2: int = DEFAULT_GC_THRESH2, gc_thresh3: int = DEFAULT_GC_THRESH3,
                 unres_qbytes: int = DEFAULT_UNRES_QBYTES):
        self.now = now
        self.timeout = timeout
        self.unres_queue_length = unres_queue_length
        self.max_probes = max(1, max_probes)
        self.retrans = retrans
        # An unused STALE entry is forgotten after this long (Linux gc_stale_time), so ARP from every host on
        # the segment does not fill the fast path's map.
        self.gc_stale = timeout if gc_stale is None else gc_stale
        # A failed next hop is not re-probed for this long: frames to it are dropped rather than starting a
        # new probe burst each time (bounds ARP to a dead server at max_probes per 2 * max_probes * retrans).
        self.fail_hold = self.max_probes * retrans if fail_hold is None else fail_hold
        self.gc_thresh3 = max(1, gc_thresh3)
        self.gc_thresh2 = min(max(0, gc_thresh2), self.gc_thresh3)
        self.unres_qbytes = unres_qbytes
        self.entries: dict = {}
        self.static_ips: set = set()  # addresses of the PERMANENT entries: not counted against the thresholds
        self.wanted: dict = {}  # the last keep_wanted() set: next hops that are never evicted
        self.unres_bytes = 0  # bytes of frames on all unresolved queues
        self.last_forced_gc = float("-inf")
        self.stats: Counter = Counter()

    # --- reads ----------------------------------------------------------------------------------
    def get(self, ip) -> Entry | None:
        return self.entries.get(ipaddress.ip_address(ip))

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, ip) -> bool:
        return self.get(ip) is not None

    @property
    def learned(self) -> int:
        """Entries counted against gc_thresh2/3: all but the static ones."""
        return len(self.entries) - len(self.static_ips)

    def show(self, ifname: str | None = None, af: int | None = None) -> list[dict]:
        """Rows for `dpip neigh show` (the neigh.list reply shape), sorted by address."""
        now = self.now()
        rows = []
        for e in sorted(self.entries.values(), key=lambda e: (e.ip.version, e.ip)):
            if ifname not in (None, e.ifname) or af not in (None, e.ip.version):
                continue
            rows.append({"addr": str(e.ip), "lladdr": ":".join(f"{b:02x}" for b in e.mac) if e.mac else "",
                         "ifname": e.ifname, "state": DPVS_STATE[e.state], "nud": e.state.value,
                         "flags": ["static"] if e.permanent else ["learned"], "cpu": 0, "queued": len(e.queue),
                         "probes": e.probes, "age": round(max(0.0, now - e.updated), 3)})
        return rows

    # --- static entries (dpip neigh add/del) ----------------------------------------------------
    def set_permanent(self, ip, mac: bytes, ifname: str) -> NeighEvents:
        """Pin ip to mac. The model writes static entries into the map itself, so no update is emitted; a queue
        that was waiting for this next hop is sent."""
        ip = ipaddress.ip_address(ip)
        ev = NeighEvents()
        e = self.entries.get(ip)
        self.static_ips.add(ip)
        if e is None:
            self.entries[ip] = Entry(ip=ip, ifname=ifname, state=State.PERMANENT, mac=mac, updated=self.now())
            return ev
        e.state, e.mac, e.ifname, e.updated, e.probes = State.PERMANENT, mac, ifname, self.now(), 0
        self._flush(e, ev)
        return ev

    def remove(self, ip) -> NeighEvents:
        """Forget ip (a static entry deleted by the operator, or any entry on request); its queue is dropped.
        A learned entry's map entry is deleted; a static one's is the model's to delete."""
        ev = NeighEvents()
        ip = ipaddress.ip_address(ip)
        e = self.entries.pop(ip, None)
        self.static_ips.discard(ip)
        if e is not None:
            self._drop_queue(e, ev)
            if e.mac is not None and not e.permanent:
                ev.deletes.append((e.ip, e.ifname))
        return ev

    def adopt(self, ip, mac: bytes, ifname: str) -> NeighEvents:
        """Take over an entry the fast path already holds (left by a previous daemon or imported from the
        kernel) as STALE: usable now, confirmed again once in use. No update: the map has it. An entry this
        table already has a MAC for is kept (it is at least as fresh). One that does not fit (gc_thresh3) is
        deleted from the map: nothing would ever age it there."""
        ip = ipaddress.ip_address(ip)
        ev = NeighEvents()
        e = self.entries.get(ip)
        if e is None:
            if not self._room(self.now(), ev):
                ev.deletes.append((ip, ifname))
                return ev
            self.entries[ip] = Entry(ip=ip, ifname=ifname, state=State.STALE, mac=mac, updated=self.now())
        elif e.mac is None:
            e.state, e.mac, e.ifname, e.updated, e.probes = State.STALE, mac, ifname, self.now(), 0
            self._flush(e, ev)
        return ev

    # --- learning -------------------------------------------------------------------------------
    def learn(self, ip, mac: bytes | None, ifname: str, *, confirmed: bool, override: bool = True,
              create: bool = True) -> NeighEvents:
        """What a neighbour told us about itself.

        confirmed: proof of two-way reachability (an ARP reply or solicited NA sent to our MAC) -> REACHABLE;
        otherwise (a request, gratuitous ARP, unsolicited NA) a new or changed MAC is only STALE, as in Linux.
        override: the MAC may replace a different one (ARP always; NA only with its O flag).
        create: make an entry if there is none (things addressed to us); otherwise only update existing ones.
        mac None (an NA without a target link-layer option) can only confirm an entry that has a MAC.
        PERMANENT entries are never changed.
        ifname: where it was heard. Linux keeps a neighbour table per interface, so what one interface hears never
        touches another's entry; this table (as the fast path's map) is keyed by address alone, so an entry stays
        on the interface it was made for (resolve() moves it when its route moves), and a next hop wanted on
        another interface is not made here. Else a host on the client side asking for the VIP "from" a real
        server's address (or advertising it) moved that server's entry to its own MAC until the next tick
        re-resolved it: repeated, a share of the server's new connections failed and its established ones
        were moved to that MAC (counted neigh_other_iface, ignored).
        """
        ip = ipaddress.ip_address(ip)
        ev = NeighEvents()
        now = self.now()
        e = self.entries.get(ip)
        if e is not None and e.permanent:
            self.stats["ignored_permanent"] += 1
            return ev
        if (e.ifname if e is not None else self.wanted.get(ip, ifname)) != ifname:
            ev.counters["neigh_other_iface"] += 1
            self.stats["other_iface"] += 1
            return ev
        if e is None:
            if not create or mac is None or not self._room(now, ev):
                return ev
            e = self.entries[ip] = Entry(ip=ip, ifname=ifname, state=State.STALE, mac=None, updated=now)
        new_state = State.REACHABLE if confirmed else State.STALE
        if e.mac is None:  # INCOMPLETE, FAILED or just made: the first MAC for it
            if mac is None:
                return ev
            e.mac, e.ifname, e.state, e.updated, e.probes = mac, ifname, new_state, now, 0
            self.stats["learned"] += 1
            ev.updates.append((e.ip, e.mac, e.ifname, False))
            self._flush(e, ev)
            return ev
        if mac is not None and mac != e.mac:
            if not override:
                # RFC 4861 7.2.5: a different MAC without the override flag is not taken, but casts doubt
                if e.state is State.REACHABLE:
                    e.state, e.updated = State.STALE, now
                return ev
            # The MAC moved (a server replaced, a VRRP failover): traffic follows the new one at once.
            self.stats["mac_changed"] += 1
            e.mac, e.ifname, e.state, e.updated, e.probes = mac, ifname, new_state, now, 0
            ev.updates.append((e.ip, e.mac, e.ifname, False))
            return ev
        if confirmed:
            was = e.state
            e.state, e.updated, e.probes = State.REACHABLE, now, 0
            if was is not State.REACHABLE:
                ev.updates.append((e.ip, e.mac, e.ifname, False))  # refresh the map's "updated" stamp
        return ev

    # --- use ------------------------------------------------------------------------------------
    def resolve(self, ip, ifname: str, frame: bytes | None = None) -> tuple[bytes | None, NeighEvents]:
        """A frame (or, with frame None, a wanted next hop) needs ip on ifname. Returns the MAC to use now, or
        None with the frame queued (or dropped); starts or continues resolution as needed."""
        ip = ipaddress.ip_address(ip)
        ev = NeighEvents()
        now = self.now()
        e = self.entries.get(ip)
        if e is not None and not e.permanent and e.ifname != ifname:
            # the route to this next hop moved to another interface: resolve it afresh there
            ev.extend(self.remove(ip))
            e = None
        if e is None:
            if not self._room(now, ev):
                if frame is not None:
                    ev.dropped += 1
                    self.stats["dropped_full"] += 1
                return None, ev
            e = self.entries[ip] = Entry(ip=ip, ifname=ifname, state=State.INCOMPLETE, updated=now)
            self._probe(e, now, ev)
        e.used = now
        if e.state in HAS_MAC:
            if e.state is State.STALE:
                e.state, e.probes, e.updated = State.PROBE, 0, now
                self._probe(e, now, ev)
            return e.mac, ev
        if e.state is State.FAILED:
            if now - e.updated < self.fail_hold:
                if frame is not None:
                    ev.dropped += 1
                    self.stats["dropped_failed"] += 1
                return None, ev
            e.state, e.probes, e.updated = State.INCOMPLETE, 0, now
            self._probe(e, now, ev)
        if frame is not None:
            if len(e.queue) >= self.unres_queue_length:
                ev.dropped += 1  # DPVS drops the newcomer: the queued frames are older and already waited
                self.stats["dropped_full"] += 1
            elif self.unres_bytes + len(frame) > self.unres_qbytes:
                ev.dropped += 1  # all queues together hold what they may: the newcomer again
                ev.counters["unres_bytes_full"] += 1
                self.stats["dropped_bytes"] += 1
            else:
                e.queue.append((ifname, frame))
                self.unres_bytes += len(frame)
                ev.queued += 1
                self.stats["queued"] += 1
        return None, ev

    def keep_wanted(self, wanted: dict) -> NeighEvents:
        """Resolve ahead every next hop new flows will need ({ip: ifname}, ip as ipaddress objects): a known,
        reachable one on the same interface only has its use noted (the common case, a dict lookup: the
        slow path asks this four times a second for every real server's next hop); the rest go through
        resolve() (probe, re-confirm, move to another interface)."""
        ev = NeighEvents()
        now = self.now()
        entries = self.entries
        self.wanted = wanted
        for ip, ifname in wanted.items():
            e = entries.get(ip)
            if e is not None and e.state is State.REACHABLE and e.ifname == ifname:
                e.used = now
            else:
                ev.extend(self.resolve(ip, ifname)[1])
        return ev

    # --- time -----------------------------------------------------------------------------------
    def tick(self) -> NeighEvents:
        """Periodic work: age REACHABLE to STALE, forget unused STALE, retry or fail probing entries."""
        ev = NeighEvents()
        now = self.now()
        for e in list(self.entries.values()):
            if e.state is State.REACHABLE:
                if now - e.updated >= self.timeout:
                    e.state, e.updated = State.STALE, now
            elif e.state is State.STALE:
                if now - max(e.updated, e.used) >= self.gc_stale:
                    del self.entries[e.ip]
                    ev.deletes.append((e.ip, e.ifname))
                    self.stats["gc"] += 1
            elif e.state in (State.INCOMPLETE, State.PROBE):
                if now >= e.next_probe:
                    if e.probes >= self.max_probes:
                        self._fail(e, now, ev)
                    else:
                        self._probe(e, now, ev)
            elif e.state is State.FAILED:
                if now - e.updated >= self.fail_hold:
                    del self.entries[e.ip]
        return ev

    # --- size -----------------------------------------------------------------------------------
    def _room(self, now: float, ev: NeighEvents) -> bool:
        """May a learned entry be created now? Runs a forced GC when the table is at gc_thresh3, or above
        gc_thresh2 with the last forced GC GC_THRESH2_INTERVAL old (Linux neigh_alloc); False (counted) when
        the entry still does not fit."""
        n = self.learned
        if n < self.gc_thresh2:
            return True
        since = now - self.last_forced_gc
        if since >= GC_THRESH2_INTERVAL or (n >= self.gc_thresh3 and since >= GC_THRESH3_INTERVAL):
            self.forced_gc(now, ev)
        if self.learned < self.gc_thresh3:
            return True
        ev.counters["neigh_table_full"] += 1
        self.stats["table_full"] += 1
        return False

    def evictable(self, e: Entry) -> bool:
        """Not static, no frames waiting on it, not a next hop the balancer wants (Linux: unreferenced)."""
        return not e.permanent and not e.queue and e.ip not in self.wanted

    def forced_gc(self, now: float, ev: NeighEvents) -> int:
        """Evict unreferenced entries down to gc_thresh2: FAILED first, then STALE, then the rest, the least
        recently active first. One walk of the table: callers space the calls (see _room)."""
        self.last_forced_gc = now
        excess = self.learned - self.gc_thresh2
        if excess <= 0:
            return 0
        rank = {State.FAILED: 0, State.STALE: 1}
        victims = sorted((e for e in self.entries.values() if self.evictable(e)),
                         key=lambda e: (rank.get(e.state, 2), max(e.updated, e.used)))[:excess]
        for e in victims:
            del self.entries[e.ip]
            if e.mac is not None:
                ev.deletes.append((e.ip, e.ifname))
        if victims:
            ev.counters["neigh_gc_forced"] += len(victims)
            self.stats["gc_forced"] += len(victims)
        return len(victims)

    # --- internals ------------------------------------------------------------------------------
    def _probe(self, e: Entry, now: float, ev: NeighEvents) -> None:
        # Re-confirmation tries the known MAC first (cheap, disturbs nobody), then asks everyone, which also
        # finds a server that came back with a new MAC and sent no gratuitous ARP.
        unicast = e.state is State.PROBE and e.probes == 0 and e.mac is not None
        ev.probes.append(Probe(e.ip, e.ifname, e.mac if unicast else None))
        e.probes += 1
        e.next_probe = now + self.retrans
        self.stats["probes"] += 1

    def _fail(self, e: Entry, now: float, ev: NeighEvents) -> None:
        self.stats["failed"] += 1
        if e.mac is not None:
            ev.deletes.append((e.ip, e.ifname))
        self._drop_queue(e, ev)
        e.state, e.mac, e.updated, e.probes = State.FAILED, None, now, 0

    def _drop_queue(self, e: Entry, ev: NeighEvents) -> None:
        n = len(e.queue)
        if n:
            ev.dropped += n
            self.stats["dropped_failed"] += n
            self.unres_bytes -= sum(len(f) for _, f in e.queue)
            e.queue.clear()

    def _flush(self, e: Entry, ev: NeighEvents) -> None:
        while e.queue:
            ifname, frame = e.queue.popleft()
            self.unres_bytes -= len(frame)
            ev.send.append((ifname, frame, e.mac))
            self.stats["sent"] += 1
