"""The balancer's desired state and its invariants: services, real servers, local addresses, addresses, routes,
neighbours. No kernel calls: every change is validated first, then applied to the model and pushed through a
DataPath (the map writer in the daemon, a recorder in unit tests). A refused change leaves everything as it was.

Every ipvsadm forwarding mode is modelled (FNAT, DR, NAT, TUNNEL, SNAT) and every scheduler of hdslb.sched. Ring
tables (rr, wrr, lc, wlc, fo) travel inside the service's sched_map value; hash tables (sh, dh, mh, conhash) are
too big for it and live in the hash_cells array, managed here by a first-fit CellAllocator: a rebuilt table is
written into free cells, the sched_map value is swapped to point at it (one map update: packets see the old or
the new table), and only then are the old cells freed.

SNAT services (ipvsadm -H) have no VIP: they are identified by their Match and reach the fast path as an ordered
rule array (snat_map + cfg_map.snat_rules), first match wins, kept in creation order.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import errno
import functools
import ipaddress
import operator
import re
import time
from collections import Counter
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Protocol

from hdslb import sched
from hdslb.errors import HdslbError, exists, invalid, nospace, notfound
from hdslb.net.addr import ip_address, ip_str

PROTOS = {"tcp": 6, "udp": 17}
MATCH_PROTOS = {"tcp": 6, "udp": 17, "icmp": 1}  # SNAT matches also carry ICMP echo (the echo id is the port)
FWD_MODES = ("fnat", "dr", "nat", "tunnel", "snat")
# Forwarding modes the fast path implements; anything else is refused with a reason, never half-done.
FWD_SUPPORTED = FWD_MODES
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "sh", "dh", "mh", "conhash", "fo")
# Ring schedulers are walked with a per-CPU cursor; hash schedulers index hash_cells by flow_hash. lc/wlc rings are
# rebuilt from live connection counts by the daemon (refresh_dynamic), so they lag by at most one refresh interval.
SCHED_SUPPORTED = SCHEDULERS
HASH_SCHEDS = ("sh", "dh", "mh", "conhash")
DYNAMIC_SCHEDS = ("lc", "wlc")
DEFAULT_SCHED = "wlc"
# LVS scheduler flags (ipvsadm --sched-flags) and the scheduler each belongs to. The *-port flags add the client
# port to the hash; the *-fallback flags are what hdslb always does (an unavailable server's buckets are handed to
# the others at the next rebuild), accepted so LVS configurations load unchanged.
SCHED_FLAGS = {"sh-port": "sh", "sh-fallback": "sh", "mh-port": "mh", "mh-fallback": "mh"}
ROUTE_SCOPES = ("host", "link", "global", "kni_host")
MAX_WEIGHT = 65535
MAX_PERSIST_TIMEOUT = 86400 * 31  # ipvsadm's MAX_TIMEOUT
SNAT_RULES_MAX = 16  # bpf/include/hdslb_abi.h
DEFAULT_HASH_CELLS = 1 << 21  # hdslb_abi.h / the XDP program's MAX_HASH_CELLS default
LADDR_MAX = 16
ANY4 = ipaddress.IPv4Address("0.0.0.0")


def ip(s, what: str = "address"):
    # An address is given as text (or as an address object, from inside the daemon): ipaddress would also read
    # an integer (True is 0.0.0.1, 2**64 an IPv6 address), which no client means.
    if not isinstance(s, (str, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        raise invalid(f"invalid {what} {s!r}: an address is given as text")
    try:
        return ip_address(s)
    except (ValueError, TypeError):
        raise invalid(f"invalid {what} {s!r}") from None


BCAST4 = ipaddress.IPv4Address("255.255.255.255")
_MAC = re.compile(r"[0-9A-Fa-f]{1,2}(?::[0-9A-Fa-f]{1,2}){5}")


def link_local(mac: bytes) -> ipaddress.IPv6Address:
    """fe80::/64 with the modified EUI-64 interface identifier of mac (RFC 4291 2.5.1 and appendix A): the
    link-local address Linux gives an Ethernet interface by default (addr_gen_mode eui64)."""
    eui = bytes([mac[0] ^ 0x02]) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return ipaddress.IPv6Address(b"\xfe\x80" + b"\0" * 6 + eui)


def _or_default(v, default):
    """An option's value, or its default when not given (None, or the empty text): not when it is False, 0, [] or
    {}, which are no scheduler, method or scope and are refused as the values they are."""
    return default if v is None or (isinstance(v, str) and not v) else v


def unicast(addr, what: str):
    """addr, when it can be one host's address on a link: not unspecified, multicast, loopback (the fast path never
    sees those on a NIC), the IPv4 broadcast, nor IPv4-mapped IPv6 (::ffff:a.b.c.d: the IPv4 address is meant)."""
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or addr == BCAST4 or \
            (addr.version == 6 and addr.ipv4_mapped is not None):
        raise invalid(f"{what} {addr} is not a unicast address")
    return addr


def port_of(v, what: str = "port") -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 65535:
        raise invalid(f"invalid {what} {v!r}")
    return v


def _uint(v, what: str, hi: int = 2**31 - 1) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
        raise invalid(f"illegal {what} specified: {v!r}")
    return v


def netmask_plen(netmask, version: int) -> int:
    """ipvsadm -M as a prefix length: a dotted mask (or /N, or N) for IPv4, a prefix length for IPv6."""
    full = 32 if version == 4 else 128
    if netmask in (None, ""):
        return full
    text = str(netmask).lstrip("/")
    if text.isascii() and text.isdigit():
        n = int(text)
        if not (0 if version == 4 else 1) <= n <= full:
            raise invalid(f"illegal {'ipv6 ' if version == 6 else ''}netmask {netmask!r} (prefix length "
                          f"{'0..32' if version == 4 else '1..128'})")
        return n
    if version == 6:
        raise invalid(f"illegal ipv6 netmask {netmask!r} (a prefix length 1..128)")
    try:
        mask = int(ipaddress.IPv4Address(text))
        if mask and (~mask & 0xFFFFFFFF) & ((~mask & 0xFFFFFFFF) + 1):  # the ones must come first: no host mask
            raise ValueError(text)
        return ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen
    except ValueError:
        raise invalid(f"illegal virtual server persistent mask {netmask!r} (a contiguous dotted mask)") from None


@functools.lru_cache(maxsize=None)  # (plen, version): at most 162 answers; each service add asks (70 us each)
def netmask_text(plen: int, version: int) -> str:
    """The canonical -M spelling ipvsadm prints: dotted for IPv4, the prefix length for IPv6."""
    if version == 4:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{plen}").netmask)
    return str(plen)


# --- SNAT match (ipvsadm -H proto=..,src-range=..,dst-range=..,iif=..,oif=..) ------------------------------
@dataclass(frozen=True)
class Match:
    """What selects a SNAT service: protocol, inclusive IPv4 source/destination ranges (None: any), and the
    ingress/egress interfaces (None: any; oif is the interface the route to the destination leaves by)."""

    proto: str
    src: tuple | None = None
    dst: tuple | None = None
    iif: str | None = None
    oif: str | None = None

    @staticmethod
    def range_text(r) -> str | None:
        if r is None:
            return None
        return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"

    def as_dict(self) -> dict:
        return {"proto": self.proto, "src_range": self.range_text(self.src), "dst_range": self.range_text(self.dst),
                "iif": self.iif, "oif": self.oif}

    def __str__(self) -> str:
        parts = [f"proto={self.proto}"]
        for k, v in (("src-range", self.range_text(self.src)), ("dst-range", self.range_text(self.dst)),
                     ("iif", self.iif), ("oif", self.oif)):
            if v:
                parts.append(f"{k}={v}")
        return ",".join(parts)


def _match_range(text, what: str):
    """DPVS's RANGE := IP1[-IP2][:PORT1[-PORT2]] -> (lo, hi) IPv4 addresses, None for any. Ports other than
    the 0-0 DPVS prints for 'any' are refused: the fast path's SNAT rules match addresses only."""
    if text in (None, ""):
        return None
    if not isinstance(text, str):
        raise invalid(f"{what} must be a string like 192.168.0.1-192.168.0.254")
    t = text.strip()
    if t.count(":") > 1 or t.startswith("["):  # an IPv6 address (one colon at most is IPv4's :PORT)
        raise HdslbError(errno.EOPNOTSUPP, f"{what} {text!r}: SNAT is IPv4 only (the fast path's SNAT rules "
                                           f"hold IPv4 ranges)")
    if ":" in t:
        t, _, ports = t.partition(":")
        if ports not in ("", "0", "0-0"):
            raise HdslbError(errno.EOPNOTSUPP, f"{what} {text!r}: port ranges are not supported by the fast "
                                               f"path's SNAT rules (they match addresses only)")
    lo_t, sep, hi_t = t.partition("-")
    try:
        lo = ipaddress.ip_address(lo_t)
        hi = ipaddress.ip_address(hi_t) if sep else lo
    except ValueError:
        raise invalid(f"illegal {what} {text!r} (IP or IP1-IP2)") from None
    if lo.version != 4 or hi.version != 4:
        raise HdslbError(errno.EOPNOTSUPP, f"{what} {text!r}: SNAT is IPv4 only (the fast path's SNAT rules "
                                           f"hold IPv4 ranges)")
    if hi < lo:
        raise invalid(f"illegal {what} {text!r}: the range ends before it starts")
    if lo == hi == ANY4:
        return None
    return (lo, hi)


@dataclass
class Iface:
    name: str
    ifindex: int
    mac: bytes
    mtu: int


@dataclass
class Dest:
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    fwd: str
    weight: int
    slot: int
    u_threshold: int = 0
    l_threshold: int = 0
    health: str = "up"               # "down" once a health check fails (keepalived semantics)
    health_weight: int | None = None  # weight a checker asked for (misc_dynamic, inhibit_on_failure: 0)
    reason: str = ""                  # last failure reason, for ipvsadm/REST/metrics
    sorry: bool = False               # a sorry_server added while the service's quorum is lost
    held: bool = False                # out of the pool while its service's sorry server stands in (see hold_for_sorry)
    # down by its check under inhibit_on_failure: keepalived keeps such a server in LVS at weight 0, where its flows go
    # on as a drained server's do; without it keepalived removes the server, and LVS's expire_nodest_conn moves its
    # UDP flows (Daemon.real_servers leaves it out for the sweep)
    inhibited: bool = False
    overloaded: bool = False          # LVS IP_VS_DEST_F_OVERLOAD: above u_threshold, from the estimator's counts

    @property
    def pool_weight(self) -> int:
        """The weight configuration and health checking give it: configured, unless health checking overrides it."""
        if self.health == "down":
            return 0
        return self.weight if self.health_weight is None else self.health_weight

    @property
    def eff_weight(self) -> int:
        """The weight scheduling uses: pool_weight, or 0 while held out for a sorry server."""
        return 0 if self.held else self.pool_weight


def keeps_persistent(d: Dest, expire_quiescent_template: bool) -> bool:
    """Whether a persistence template naming d is honoured (its client's next connection goes to d), as LVS's
    ip_vs_check_template decides: yes for a server an operator drained (weight 0), which is how a sticky server
    is drained gracefully (its clients come back until their templates expire, nobody new comes), unless
    expire_quiescent_template is set; yes when overloaded (LVS does not look at the overload there); no when it
    is down by its health check or a checker set its weight to 0 (keepalived's inhibit_on_failure, a
    misc_dynamic 0), the LVS pitfall expire_quiescent_template exists for: our checker knows the server failed.
    The fast path reads the answer as DEST_F_NO_PERSIST."""
    if d.health == "down" or d.health_weight == 0 or d.held:
        return False
    return not (expire_quiescent_template and d.eff_weight == 0)


def overload_next(d: Dest, total: int) -> bool:
    """LVS's overload rule for one dest given its connection count (active + inactive, ip_vs_dest_totalconns):
    set once total >= u_threshold; cleared once total < l_threshold, or below 3/4 of u_threshold when no
    l_threshold is set; never set without a u_threshold."""
    if d.u_threshold <= 0:
        return False
    if not d.overloaded:
        return total >= d.u_threshold
    if d.l_threshold > 0:
        return total >= d.l_threshold
    return total * 4 >= d.u_threshold * 3


@dataclass
class Laddr:
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    ifname: str


@dataclass
class Service:
    proto: str
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    sched: str
    svc_id: int
    persistent: int | None = None   # -p: seconds a client's template lives (None: not persistent)
    netmask: str | None = None      # -M as ipvsadm prints it (dotted IPv4 mask, IPv6 prefix length)
    flags: list[str] = field(default_factory=list)  # LVS scheduler flags (SCHED_FLAGS)
    dests: dict[tuple, Dest] = field(default_factory=dict)
    laddrs: list[Laddr] = field(default_factory=list)
    sched_gen: int = 0
    own_vip: bool = False  # declared in a config file: the balancer answers ARP for the VIP itself
    sched_params: dict = field(default_factory=dict)  # extra table parameters (size, seed, replicas, horizon)
    match: Match | None = None  # SNAT services: what selects them (they have no VIP)
    hcells: tuple | None = None  # (first cell, cells) of its hash table in hash_cells

    @property
    def key(self) -> tuple:
        return ("match", self.match) if self.match is not None else (self.proto, self.addr, self.port)

    @property
    def persist_plen(self) -> int:
        return netmask_plen(self.netmask, self.addr.version)

    @property
    def ident(self) -> dict:
        """The service as control ops name it."""
        if self.match is not None:
            return {"match": self.match.as_dict()}
        return {"proto": self.proto, "addr": str(self.addr), "port": self.port}

    def rs_family(self) -> int | None:
        """The address family of its real servers and local addresses (IPv4 under an IPv6 NAT64 service)."""
        for d in self.dests.values():
            return d.addr.version
        for la in self.laddrs:
            return la.addr.version
        return None


@dataclass
class Addr:
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    prefixlen: int
    ifname: str
    scope: str = "global"
    sapool: bool = False


@dataclass(frozen=True)  # never changed in place (a change is a new Route): pack_snapshot keeps its bytes on it
class Route:
    net: ipaddress.IPv4Network | ipaddress.IPv6Network
    ifname: str
    via: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    src: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    mtu: int = 0
    metric: int = 0
    scope: str = "link"
    proto: str = "auto"
    local: bool = False  # DPVS "local route": created by addr add, shown with scope host

    @property
    def ident(self) -> tuple:
        return (self.net, self.ifname, self.via, self.metric, self.local)


@dataclass
class Neigh:
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    lladdr: bytes
    ifname: str


GONE_SLOTS_MAX = 16384  # removed real servers whose slot a re-add of the same one gets back


class IdPool(set):
    """The ids (service ids, real-server slots) in use, and the order to hand free ones out in: never-used ids
    first (from `hwm`, one above the highest ever used), then freed ones, longest free first. A freed id rests as
    long as the pool allows because flows outlive what they were made for: a deleted service's connections keep
    its id and its servers' slots in the conn table until they end, and a new service given them at once showed
    those flows' connection counts and traffic as its own (and lc/wlc scheduled by them). Both steps are O(1)
    amortised, so a bulk load of 100k real servers stays linear."""

    def __init__(self, *a):
        super().__init__(*a)
        self.hwm = max(self) + 1 if self else 0
        self.freed: list[int] = []  # in the order freed; [self.head:] are candidates (some may be in use again)
        self.head = 0

    def add(self, i) -> None:
        super().add(i)
        if i >= self.hwm:
            self.hwm = i + 1

    def update(self, *its) -> None:
        for it in its:
            for i in it:
                self.add(i)

    def discard(self, i) -> None:
        if i in self:
            super().discard(i)
            self.freed.append(i)

    def remove(self, i) -> None:
        super().remove(i)
        self.freed.append(i)

    def clear(self) -> None:
        self.freed.extend(sorted(self))
        super().clear()

    def copy(self) -> "IdPool":
        c = IdPool(self)
        c.hwm, c.freed, c.head = self.hwm, self.freed[self.head:], 0
        return c

    def _holes(self, limit: int) -> None:
        """Ids below hwm that are free but were never freed here (a model restored from its saved state): they
        join the queue, lowest first, once nothing else is left."""
        queued = set(self.freed[self.head:])
        self.freed.extend(i for i in range(min(self.hwm, limit)) if i not in self and i not in queued)

    def next_free(self, limit: int):
        """The id to hand out next (the caller adds it), or None when all below limit are in use."""
        if self.hwm < limit:
            return self.hwm
        for _ in range(2):
            while self.head < len(self.freed):
                i = self.freed[self.head]
                if i not in self and i < limit:
                    return i
                self.head += 1
            if self.head > 4096:  # compact the consumed part
                del self.freed[:self.head]
                self.head = 0
            self._holes(limit)
        return None


class _OverlayPool:
    """An IdPool seen through a dry run: ids taken and given back are recorded here, the base is never written,
    so a scratch model costs what the batch changes, not what the model holds. It hands out the ids the base
    would, in the same order."""

    def __init__(self, base: IdPool):
        self.base, self.added, self.removed = base, set(), set()
        self.hwm = base.hwm
        self.pos = base.head  # next candidate in base.freed
        self.freed: list[int] = []  # freed in the dry run, in order
        self.fpos = 0
        self.holes: list[int] | None = None
        self.hpos = 0

    def __contains__(self, i) -> bool:
        return i in self.added or (i in self.base and i not in self.removed)

    def __len__(self) -> int:
        return len(self.base) - len(self.removed) + len(self.added)

    def __iter__(self):
        yield from (i for i in self.base if i not in self.removed)
        yield from self.added

    def add(self, i) -> None:
        if i in self.base:
            self.removed.discard(i)
        else:
            self.added.add(i)
        if i >= self.hwm:
            self.hwm = i + 1

    def discard(self, i) -> None:
        if i not in self:
            return
        if i in self.added:
            self.added.discard(i)
        else:
            self.removed.add(i)
        self.freed.append(i)

    def next_free(self, limit: int):
        if self.hwm < limit:
            return self.hwm
        bf = self.base.freed
        while self.pos < len(bf):
            i = bf[self.pos]
            if i not in self and i < limit:
                return i
            self.pos += 1
        while self.fpos < len(self.freed):
            i = self.freed[self.fpos]
            if i not in self and i < limit:
                return i
            self.fpos += 1
        if self.holes is None:
            queued = set(bf[self.base.head:]) | set(self.freed)
            self.holes = [i for i in range(min(self.hwm, limit)) if i not in self and i not in queued]
        while self.hpos < len(self.holes):
            i = self.holes[self.hpos]
            if i not in self:
                return i
            self.hpos += 1
        return None


_MISSING = object()


class _Overlay(MutableMapping):
    """A dict seen through a dry run: an entry is copied (copy_fn) the first time it is read, writes and deletes
    stay here; the base is never written. Iterating copies every entry (rare ops: flush, local address scans)."""

    def __init__(self, base: dict, copy_fn):
        self.base, self.copy_fn, self.local, self.gone = base, copy_fn, {}, set()

    def __getitem__(self, k):
        try:
            return self.local[k]
        except KeyError:
            pass
        if k in self.gone:
            raise KeyError(k)
        v = self.local[k] = self.copy_fn(self.base[k])
        return v

    def get(self, k, default=None):
        # Mapping.get goes through __getitem__ and a KeyError for every miss: a dry run of 100k new routes spent
        # 15 % of its time there (each route's prefix is looked up before it is added)
        v = self.local.get(k, _MISSING)
        if v is not _MISSING:
            return v
        if k in self.gone:
            return default
        v = self.base.get(k, _MISSING)
        if v is _MISSING:
            return default
        v = self.local[k] = self.copy_fn(v)
        return v

    def setdefault(self, k, default=None):
        v = self.get(k, _MISSING)
        if v is _MISSING:
            self[k] = v = default
        return v

    def __contains__(self, k) -> bool:
        return k in self.local or (k not in self.gone and k in self.base)

    def __setitem__(self, k, v) -> None:
        self.local[k] = v
        self.gone.discard(k)

    def __delitem__(self, k) -> None:
        self[k]
        del self.local[k]
        self.gone.add(k)

    def __iter__(self):
        # The keys as they are now: reading a value while iterating copies it into self.local, which must not
        # make it come round a second time (a flush would then remove a service twice).
        keys = [k for k in self.base if k not in self.gone and k not in self.local]
        return iter(keys + list(self.local))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _copy_service(s: "Service") -> "Service":
    n = copy.copy(s)
    n.dests = {k: copy.copy(d) for k, d in s.dests.items()}
    n.laddrs = [copy.copy(la) for la in s.laddrs]
    n.flags, n.sched_params = list(s.flags), dict(s.sched_params)
    return n


class NullDataPath:
    """Accepts every write: a dry run's scratch model has no maps behind it."""

    def __getattr__(self, name):
        return _ignore


def _ignore(*a, **kw):
    return None


class CellAllocator:
    """First-fit allocation of contiguous ranges of the hash_cells array (one range per hash table).

    Free space is a sorted list of (start, length) runs, merged on free. alloc() takes the first run long enough;
    ENOSPC when none is. Ranges handed out are never overlapping, which the fast path relies on: a table being
    read is never written until its service has been swapped to another range and the range freed.
    """

    def __init__(self, size: int):
        self.size = size
        self.runs: list[list[int]] = [[0, size]] if size > 0 else []

    def copy(self) -> "CellAllocator":
        c = CellAllocator(0)
        c.size, c.runs = self.size, [list(r) for r in self.runs]
        return c

    def free_cells(self) -> int:
        return sum(n for _, n in self.runs)

    def largest(self) -> int:
        return max((n for _, n in self.runs), default=0)

    def alloc(self, n: int) -> int:
        for r in self.runs:
            if r[1] >= n:
                start = r[0]
                r[0] += n
                r[1] -= n
                if r[1] == 0:
                    self.runs.remove(r)
                return start
        raise nospace(f"no {n} contiguous free hash cells (hash_cells holds {self.size}; {self.free_cells()} free, "
                      f"largest free run {self.largest()}): use smaller hash tables (--sched-flags size=N) or "
                      f"start hdslbd with more (--max-hash-cells)")

    def reserve(self, start: int, n: int) -> None:
        """Mark [start, start+n) used (adopting a table a previous daemon wrote)."""
        for r in self.runs:
            if r[0] <= start and start + n <= r[0] + r[1]:
                before, after = start - r[0], r[0] + r[1] - (start + n)
                i = self.runs.index(r)
                self.runs[i:i + 1] = [x for x in ([r[0], before], [start + n, after]) if x[1] > 0]
                return
        raise invalid(f"hash cells {start}..{start + n - 1} are not free (outside hash_cells of {self.size}, or "
                      f"claimed twice): the saved state does not fit this fast path; start with --fresh")

    def free(self, start: int, n: int) -> None:
        if n <= 0:
            return
        runs = self.runs
        i = 0
        while i < len(runs) and runs[i][0] < start:
            i += 1
        if (i > 0 and runs[i - 1][0] + runs[i - 1][1] > start) or (i < len(runs) and start + n > runs[i][0]):
            raise RuntimeError(f"hash cells {start}+{n} freed twice")
        runs.insert(i, [start, n])
        if i + 1 < len(runs) and start + n == runs[i + 1][0]:  # merge with the run after
            runs[i][1] += runs[i + 1][1]
            del runs[i + 1]
        if i > 0 and runs[i - 1][0] + runs[i - 1][1] == start:  # and the one before
            runs[i - 1][1] += runs[i][1]
            del runs[i]


@dataclass
class Deferred:
    """What a batch postponed to its end (Balancer.deferred): the services whose table must be rebuilt (each once,
    from its final real servers), the services added in the batch (published once their table exists), and what
    must wait until no table can lead a packet to a removed real server (clearing its slot, its templates, and
    only then handing the slot out again)."""

    dirty: dict = field(default_factory=dict)  # id(svc) -> (svc, tag of the last op that touched it)
    new: set = field(default_factory=set)      # id(svc) of services added in the batch, not yet in svc_map
    routes: dict = field(default_factory=dict)  # net -> tag: LPM entries to sync once
    post: list = field(default_factory=list)   # (fn, args) run after every table is rebuilt
    tag: object = None                         # the op being applied (a batch index), for error reports
    undo_new: bool = False                     # on failure remove the new services instead of publishing them
    published: set = field(default_factory=set)  # id(svc) of new services whose maps the flush has written
    new_routes: list = field(default_factory=list)  # undo_new: routes the batch added (removed again on failure)
    routes_written: bool = False  # undo_new: the flush has begun writing LPM entries
    # (svc, error) -> None: a table that cannot be built at the end is handed here instead of raising (the service
    # keeps its old table; the callable puts its model back). For dest_health_many, whose verdicts are not
    # validated on a scratch copy first.
    refused: object = None


@dataclass
class TablePlan:
    """A built scheduling table and where it will live, decided before anything is written."""

    table: sched.Table
    hoff: int = 0
    hlen: int = 0
    overloaded: dict = field(default_factory=dict)  # slot -> overload state this table was built with


class DataPath(Protocol):
    """What the model needs from the fast path; the daemon implements it over the BPF maps."""

    def service_set(self, svc: Service) -> None: ...
    def service_del(self, svc: Service) -> None: ...
    def dest_set(self, svc: Service, d: Dest, no_persist: bool) -> None: ...
    def dest_clear(self, d: Dest) -> None: ...
    def hash_cells_set(self, first: int, entries: list[int]) -> None: ...
    def sched_set(self, svc: Service, table: sched.Table, hoff: int) -> None: ...
    def laddrs_set(self, svc: Service, laddrs: list[tuple]) -> None: ...
    def snat_rule_set(self, index: int, svc: Service) -> None: ...
    def snat_rule_clear(self, index: int) -> None: ...
    def snat_count_set(self, n: int) -> None: ...
    def persist_flush(self, svc_id: int, slot: int | None) -> None: ...
    def local_set(self, addr, flags: int, ifindex: int) -> None: ...
    def local_del(self, addr) -> None: ...
    def route_set(self, r: Route, ifindex: int) -> None: ...
    def route_del(self, net) -> None: ...
    def neigh_set(self, n: Neigh, ifindex: int) -> None: ...
    def neigh_del(self, addr) -> None: ...


# Why an address is ours (flags in local_map); an address stays local while any reason remains.
LOCAL_IFADDR, LOCAL_LADDR, LOCAL_SAPOOL, LOCAL_VIP = 0x1, 0x2, 0x4, 0x8
_NOT_LOCAL = (0, None)


class Balancer:
    def __init__(self, dp: DataPath, ifaces: dict[str, Iface], max_services: int = 4096, max_dests: int = 65535,
                 ring_max: int = 1024, max_hash_cells: int = DEFAULT_HASH_CELLS):
        self.dp = dp
        self.ifaces = ifaces
        self.max_services = max_services
        self.max_dests = min(max_dests, 0xFFFFFFFF)  # 0xffffffff marks an empty ring slot
        self.ring_max = ring_max
        self.cells = CellAllocator(max_hash_cells)
        self.services: dict[tuple, Service] = {}
        self.snat_order: list[Service] = []  # SNAT services in rule order (creation order)
        self.addrs: list[Addr] = []
        self.routes: list[Route] = []
        self._rindex: dict[object, list[Route]] = {}  # net -> its routes: adds and syncs stay O(1) in bulk loads
        self._plens: Counter = Counter()  # (IP version, prefix length) -> routes: lookups walk lengths, not routes
        self._route_gen = 0  # bumped by every route change: what is cached from route lookups is valid for one gen
        self._rint = None  # index_routes(): (route gen, the _rindex it indexes, int index, prefix lengths by version)
        self._routes_packed: tuple | None = None  # pack_snapshot(): (route gen, the routes list, their msgpack bytes)
        self._nh_cache: dict = {}  # real server address -> (next hop, ifname) or None, for wanted_nexthops
        self._nh_gen: tuple | None = None  # the (route gen, interfaces) _nh_cache holds for
        self.wanted_cost = 0.0  # seconds the last wanted_nexthops() took: the daemon spaces its resolver kicks by it
        self._wgen = 0  # bumped by changes of real server addresses, local addresses and SNAT services
        # addresses of the real servers dest_add made, drained by the daemon after each control op: a server its
        # health check holds down must not come back up because someone added it again (Daemon._hold_down)
        self.added_addrs: list = []
        self._wanted: tuple | None = None  # ((wgen, route gen), result) of the last wanted_nexthops()
        self._wanted_at = 0.0
        # wanted_nexthops()'s union of the services' real servers' next hops, kept up to date by the services whose
        # real servers changed (_wdirty, id -> service) instead of a walk of every service: next hop -> {ifname:
        # services}, the answer's view of it (next hop -> ifname), each counted service's part (id -> (service,
        # {next hop: ifname})), and the (route gen, interfaces) they were made under (None: made again whole)
        self._wunion: dict | None = None
        self._wbase: dict = {}
        self._wcounted: dict = {}
        self._wdirty: dict = {}
        self._wunion_gen: tuple | None = None
        self._gateways: Counter = Counter()  # (via, ifname) -> routes using it, for SNAT's next hops
        self.neighs: dict[object, Neigh] = {}
        self._slots_used: IdPool = IdPool()
        # (service key, address, port) -> the slot a removed real server had, newest last: added again, it gets that
        # slot back while no one took it, so the flows it still has count for it again (LVS's dest trash)
        self._gone_slots: collections.OrderedDict = collections.OrderedDict()
        self._ids_used: IdPool = IdPool()
        # dest slot -> (active, inactive) connections, for lc/wlc and thresholds; the daemon plugs in the fast
        # path's view (a conn table scan, refreshed once per estimator period).
        self.conn_counts = lambda: {}
        self.config_owned: set[tuple] = set()  # service keys the config file declares (reload manages them)
        self._dyn_seen: dict[int, tuple] = {}  # svc id -> the conn counts its lc/wlc ring was built from
        # Keys of the services refresh_dynamic looks at (an ordered set): every service given lc/wlc or a real
        # server with an upper threshold is put here when that option is taken, whether or not the op then
        # succeeds; refresh_dynamic drops those that no longer qualify. It walked every real server instead:
        # 20 ms of the event loop every 2 s at 10k x 10 (most of an idle hdslbd's CPU).
        self._dyn_keys: dict[tuple, None] = {}
        self.expire_quiescent_template = False  # ipvs_defs: drop a dest's templates when its weight drops to 0
        self.refresh_errors: dict[int, str] = {}  # svc id -> why its last periodic rebuild was refused
        self._defer: Deferred | None = None  # inside deferred(): rebuilds and LPM writes wait for the end
        # addr -> (LOCAL_* flags, ifname or None): local_reasons() for every address that is ours, built in one
        # pass when asked and dropped by every change that can move it (each such change calls _sync_local)
        self._lidx: dict | None = None
        self._owned = None  # (the local index, owned_addresses() of it)
        # address -> interface of local addresses no service has any more (a reload changed the group, ipvsadm -Q,
        # a service removed): still ours, ARP/ND answered, while connections use them (the daemon releases them
        # once none does), or the real servers' replies to those flows found nobody once their ARP entry aged
        self.retired_laddrs: dict = {}
        self._lbatch: dict | None = None  # inside _locals_once(): addresses whose local_map entry is written at its end
        self._last_svc_key: tuple = (None, None)  # (raw proto/addr/port, svc_key) of the last service named

    # --- batches --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def deferred(self, undo_new: bool = False):
        """Apply many changes, rebuilding each touched service's table once at the end (from its final real
        servers) and writing each touched prefix's LPM entry once, instead of after every change.

        Tables are built at the end, so a table that cannot be built (a full hash_cells, ...) is refused there:
        the HdslbError then carries `.tag`, the tag of the last op that touched that service (set `.tag` on the
        yielded Deferred before each op). Validate a batch on a scratch() copy first: the real model then
        cannot fail half way. Nested use joins the outer batch.

        undo_new=True is for a batch that only adds services and real servers of those services (see
        commands.only_creates): it needs no scratch copy, because a refusal anywhere, in an op or in building a table at
        the end, removes the services it added. They were never published (svc_map is written only once every
        table of the batch is built), so no packet could have reached them; the slots they had written are
        cleared and their ids and slots handed back, and the model and maps are as they were."""
        if self._defer is not None:
            yield self._defer
            return
        with self._locals_once():
            yield from self._deferred(undo_new)

    def _deferred(self, undo_new: bool):
        d = self._defer = Deferred(undo_new=undo_new)
        try:
            yield d
        except BaseException:
            self._defer = None
            if d.undo_new:
                self._undo_new(d)
                raise
            try:  # what was applied reaches the maps whole (a validated batch does not get here)
                self._flush_deferred(d)
            except HdslbError:
                pass
            raise
        self._defer = None
        if not d.undo_new:
            self._flush_deferred(d)
            return
        try:
            self._flush_deferred(d)
        except BaseException:
            self._undo_new(d)
            raise

    def _undo_new(self, d: Deferred) -> None:
        """Remove the services and routes an undo_new batch added. A service not published yet left nothing in the
        maps (its slots and local addresses are written when it is published): it leaves the model only; so do the
        routes while the flush had not begun writing LPM entries, else each of their prefixes is written again from
        what is left. Local addresses (local_map) are written at the end of the batch (_locals_once), after this,
        from the model as it is then."""
        if d.new_routes:
            ids = {id(r) for r in d.new_routes}
            self.routes = [x for x in self.routes if id(x) not in ids]
            for r in d.new_routes:
                self._route_unindex(r, sync=False)
            if d.routes_written:  # the model whole first: a write failing again here must not leave it half undone
                for net in dict.fromkeys(r.net for r in d.new_routes):
                    try:
                        self._sync_route(net)
                    except Exception:  # what failed the batch (a full map) failing again: the entry stays as is
                        pass
        for svc, _tag in list(d.dirty.values()):
            if id(svc) not in d.new:  # only_creates() let no other change into the batch
                raise AssertionError(f"an undo_new batch changed the existing service {svc.key}")
        for svc, _tag in list(d.dirty.values()):
            if self.services.get(svc.key) is not svc:
                continue
            if id(svc) in d.published:
                self._remove_service(svc)
                continue
            del self.services[svc.key]
            self.config_owned.discard(svc.key)
            self._ids_used.discard(svc.svc_id)
            self._wtouch(svc)
            for x in svc.dests.values():
                self._slots_used.discard(x.slot)
        # an index built inside the batch counted the removed services' local addresses, and a wanted-next-hops
        # answer made inside it (the resolvers' kick) their real servers
        self._lidx = None
        self._wgen += 1

    def after_batch(self, fn, *args) -> None:
        """Run fn(*args) once the running batch stands (with the rest of its end's work), at once outside a batch.
        A batch refused and undone never runs it: what fn says about the batch (a gratuitous ARP claiming one of its
        new local addresses) must not be said for a change that did not happen."""
        if self._defer is not None:
            self._defer.post.append((fn, args))
        else:
            fn(*args)

    def _write_slots(self, svc: Service) -> None:
        """A service added in the batch, about to be published: its real servers' slots and its local addresses,
        before its table."""
        for x in svc.dests.values():
            self._dest_write(svc, x)
        if svc.laddrs:
            self._push_laddrs(svc)

    def _slot_gone(self, svc: Service, d: Dest) -> None:
        k = (svc.key, d.addr, d.port)
        self._gone_slots[k] = d.slot
        self._gone_slots.move_to_end(k)
        while len(self._gone_slots) > GONE_SLOTS_MAX:
            self._gone_slots.popitem(last=False)

    def _slot_back(self, svc: Service, addr, port):
        """The slot of the same real server of the same service removed before, if no one has taken it since."""
        slot = self._gone_slots.pop((svc.key, addr, port), None)
        if slot is None or slot in self._slots_used or slot >= self.max_dests:
            return None
        return slot

    def _dest_write(self, svc: Service, d: Dest) -> None:
        """A real server's slot, with what the fast path needs to know about its templates."""
        self.dp.dest_set(svc, d, not keeps_persistent(d, self.expire_quiescent_template))

    def _dest_write_ordered(self, svc: Service, d: Dest) -> bool:
        """Write d's slot around the table change that follows (a _commit): a slot that says "drained" (weight 0 by
        hand, down, held for a sorry server) must not reach the fast path while the service's live table still names
        it, or pick_dest refuses the slot the table picks and drops the new flow (drop_no_dest) until the new table
        lands: 25-160 ms for an mh or conhash table, a reload's whole batch. A usable slot is written now (before a
        table that names it again); a drained one after the table: returns True when the caller writes it after its
        _commit, and inside a batch it is written once the batch's tables stand (if d is still the service's)."""
        if self._hidden(svc):
            return False
        if d.eff_weight != 0:
            self._dest_write(svc, d)
            return False
        if self._defer is None:
            return True
        self._defer.post.append((self._dest_write_if_current, (svc, d)))
        return False

    def _dest_write_if_current(self, svc: Service, d: Dest) -> None:
        """A deferred slot write, skipped when the batch removed the real server or its service meanwhile (its slot
        is cleared, maybe handed to another real server)."""
        if self.services.get(svc.key) is svc and svc.dests.get((d.addr, d.port)) is d:
            self._dest_write(svc, d)

    def set_expire_quiescent_template(self, on: bool) -> None:
        """ipvs_defs conn expire_quiescent_template, from the config at start and on every reload. The flag of the
        servers it concerns (drained by their weight) is written again; turning it on also drops their templates,
        as draining them under it would have."""
        was, on = self.expire_quiescent_template, bool(on)
        if on == was:
            return
        self.expire_quiescent_template = on
        for svc in self.services.values():
            for d in svc.dests.values():
                kept = keeps_persistent(d, was)
                if kept == keeps_persistent(d, on):
                    continue
                if not self._hidden(svc):
                    self._dest_write(svc, d)
                if kept and svc.match is None:
                    self.dp.persist_flush(svc.svc_id, d.slot)

    def _flush_deferred(self, d: Deferred) -> None:
        if d.undo_new:  # every table is planned before any is written or any service published
            plans = []
            try:
                for svc, tag in d.dirty.values():
                    if self.services.get(svc.key) is svc:
                        try:
                            plans.append((svc, self._plan(svc)))
                        except HdslbError as e:
                            e.tag = tag
                            raise
            except BaseException:
                for _svc, plan in plans:
                    self._drop(plan)
                raise
            done = 0
            try:
                for svc, plan in plans:
                    d.published.add(id(svc))
                    self._write_slots(svc)
                    self._commit(svc, plan)
                    done += 1  # its cells are the service's now: removing it frees them
                    self.dp.service_set(svc)
                    if svc.own_vip:
                        self._sync_local(svc.addr)
            except BaseException:  # a map write failed: the tables not committed give their cells back
                for _svc, plan in plans[done:]:
                    self._drop(plan)
                raise
            d.routes_written = bool(d.routes)
            for net, tag in d.routes.items():  # a write refused (a full LPM map) names the op that added the prefix
                try:
                    self._sync_route(net)
                except HdslbError as e:
                    e.tag = tag
                    raise
            for fn, args in d.post:
                fn(*args)
            return
        for svc, tag in d.dirty.values():
            if self.services.get(svc.key) is not svc:
                continue  # removed later in the batch
            try:
                plan = self._plan(svc)
            except HdslbError as e:
                e.tag = tag
                if d.refused is None:
                    raise
                d.refused(svc, e)
                continue
            if id(svc) in d.new:
                self._write_slots(svc)
            self._commit(svc, plan)
            if id(svc) in d.new:  # the table exists before anything can lead a packet to it
                self.dp.service_set(svc)
                if svc.own_vip:
                    self._sync_local(svc.addr)
        for net in d.routes:
            self._sync_route(net)
        for fn, args in d.post:
            fn(*args)

    def _touch(self, svc: Service, new: bool = False) -> None:
        d = self._defer
        d.dirty[id(svc)] = (svc, d.tag)
        if new:
            d.new.add(id(svc))

    def _hidden(self, svc: Service) -> bool:
        """Added in the running batch and not yet published (its svc_map entry waits for its table)."""
        return self._defer is not None and id(svc) in self._defer.new

    def scratch(self, routes: bool = True, neighs: bool = True) -> "Balancer":
        """A model over a NullDataPath to dry-run a batch on: what the batch does to it is what it would do here,
        and nothing here changes. Services and id pools are overlays (a service is copied when first used), so
        the copy costs what the batch touches. routes=False / neighs=False share the addresses and routes /
        the neighbours instead of copying them: only for batches that change none of them."""
        b = Balancer(NullDataPath(), self.ifaces, max_services=self.max_services, max_dests=self.max_dests,
                     ring_max=self.ring_max, max_hash_cells=self.cells.size)
        b.cells = self.cells.copy()
        b.services = _Overlay(self.services, _copy_service)
        b.snat_order = [b.services[s.key] for s in self.snat_order]
        if routes:
            b.addrs = [copy.copy(a) for a in self.addrs]
            b.routes = list(self.routes)
            b._rindex = _Overlay(self._rindex, list)
            b._plens = Counter(self._plens)
            b._gateways = Counter(self._gateways)
        else:
            b.addrs, b.routes, b._rindex, b._plens, b._gateways = (
                self.addrs, self.routes, self._rindex, self._plens, self._gateways)
        b.neighs = dict(self.neighs) if neighs else self.neighs
        b._slots_used, b._ids_used = _OverlayPool(self._slots_used), _OverlayPool(self._ids_used)
        b._gone_slots = collections.OrderedDict(self._gone_slots)
        b.config_owned = set(self.config_owned)
        b.retired_laddrs = dict(self.retired_laddrs)
        b.expire_quiescent_template = self.expire_quiescent_template
        return b

    # --- helpers --------------------------------------------------------------------------------
    def iface(self, name) -> Iface:
        if not isinstance(name, str) or name not in self.ifaces:
            known = ", ".join(sorted(self.ifaces)) or "none"
            raise HdslbError(errno.ENODEV, f"device {name!r} is not managed by this balancer (attached: {known})")
        return self.ifaces[name]

    def _alloc(self, used: set[int], limit: int, what: str) -> int:
        i = self._peek(used, limit, what)
        used.add(i)
        return i

    @staticmethod
    def _peek(used: set[int], limit: int, what: str) -> int:
        if isinstance(used, (IdPool, _OverlayPool)):
            i = used.next_free(limit)
            if i is not None:
                return i
        else:
            for i in range(limit):
                if i not in used:
                    return i
        raise nospace(f"no free {what} (limit {limit}: start hdslbd with a larger "
                      f"{'--max-dests' if 'slot' in what else '--max-services'})")

    def parse_match(self, m) -> Match:
        """A SNAT match from {proto, src_range, dst_range, iif, oif} (DPVS's -H keys, '-' or '_' spelt)."""
        if not isinstance(m, dict) or not all(isinstance(k, str) for k in m):
            raise invalid("match must be given as {proto, src_range, dst_range, iif, oif}")
        m = {k.replace("-", "_"): v for k, v in m.items()}
        unknown = set(m) - {"proto", "src_range", "dst_range", "iif", "oif"}
        if unknown:
            raise invalid(f"illegal match: unknown key {sorted(unknown)[0]!r} (proto, src-range, dst-range, iif, oif)")
        proto = m.get("proto")
        if not isinstance(proto, str) or proto not in MATCH_PROTOS:
            raise invalid(f"illegal match: proto must be tcp, udp or icmp, got {proto!r}")
        src = _match_range(m.get("src_range"), "src-range")
        dst = _match_range(m.get("dst_range"), "dst-range")
        iif = self.iface(m["iif"]).name if m.get("iif") else None
        oif = self.iface(m["oif"]).name if m.get("oif") else None
        return Match(proto=proto, src=src, dst=dst, iif=iif, oif=oif)

    def svc_key(self, a: dict) -> tuple:
        if not isinstance(a, dict):
            raise invalid("service must be given as {proto, addr, port} or {match}")
        if a.get("match") is not None:
            return ("match", self.parse_match(a["match"]))
        proto, addr, port = a.get("proto"), a.get("addr"), a.get("port")
        # The same service named by op after op (a bulk load's real servers: 3 parses of its address each) is
        # parsed once; only exact str/str/int spellings are remembered (True == 1 must still be refused).
        raw = (proto, addr, port) if type(proto) is str and type(addr) is str and type(port) is int else None
        last = self._last_svc_key
        if raw is not None and last[0] == raw:
            return last[1]
        if not isinstance(proto, str) or proto not in PROTOS:
            raise invalid(f"invalid protocol {proto!r} (tcp or udp)")
        key = (proto, ip(addr, "service address"), port_of(port, "service port"))
        if raw is not None:
            self._last_svc_key = (raw, key)
        return key

    def get_service(self, a: dict) -> Service:
        key = self.svc_key(a)
        svc = self.services.get(key)
        if svc is None:
            raise HdslbError(errno.ESRCH, "No such service")
        return svc

    # --- scheduling tables ----------------------------------------------------------------------
    def _sched_dests(self, dests, counts: dict, overloaded: dict) -> list[sched.Dest]:
        """The schedulers' view: a server down by its health check is flagged DOWN at its weight (not weight 0),
        so sh/dh keep its place in their layout and only its clients move while it is down."""
        out = []
        for d in dests:
            active, inactive = counts.get(d.slot, (0, 0))
            flags = sched.DestFlag.OVERLOADED if overloaded.get(d.slot, d.overloaded) else sched.DestFlag.NONE
            if d.health == "down" or d.held:
                flags |= sched.DestFlag.DOWN
            weight = d.weight if d.health_weight is None else d.health_weight
            out.append(sched.Dest(slot_id=d.slot, weight=weight, flags=flags, addr=d.addr, port=d.port,
                                  active=active, inactive=inactive))
        return out

    @staticmethod
    def _table_params(sch: str, flags: list[str], params: dict) -> dict:
        out = dict(params)
        if sch in ("sh", "mh"):
            out["port"] = f"{sch}-port" in flags
        return out

    def _plan(self, svc: Service, dests=None, sched_name: str | None = None, flags: list[str] | None = None,
              params: dict | None = None, counts: dict | None = None, overloaded: dict | None = None) -> TablePlan:
        """Build the table `svc` would have with these changes and reserve cells for it; nothing is written.

        Raises (EINVAL for a table that cannot be built, ENOSPC when hash_cells has no room) before any change,
        so callers can plan first and apply after. A plan must be committed (_commit) or dropped (_drop).
        """
        sch = sched_name or svc.sched
        dests = list(svc.dests.values()) if dests is None else list(dests)
        flags = svc.flags if flags is None else flags
        params = svc.sched_params if params is None else params
        if counts is None:
            counts = self.conn_counts() if sch in DYNAMIC_SCHEDS else {}
        overloaded = overloaded or {}
        hashed = sch in HASH_SCHEDS
        table = sched.build_table(sch, self._sched_dests(dests, counts, overloaded),
                                  max_len=self.cells.size if hashed else self.ring_max,
                                  **self._table_params(sch, flags, params))
        plan = TablePlan(table=table, overloaded=dict(overloaded))
        if hashed and table.entries:
            n = len(table.entries)
            old = svc.hcells[1] if svc.hcells else 0
            if n > old:
                # A new (or bigger) table must leave room to rebuild the largest table beside itself later,
                # else the next real-server change of any hash service would be refused.
                sim = self.cells.copy()
                sim.alloc(n)
                if svc.hcells:
                    sim.free(*svc.hcells)
                sizes = [s.hcells[1] for s in self.services.values() if s.hcells and s is not svc] + [n]
                if sim.largest() < max(sizes):
                    raise nospace(f"a {sch} table of {n} cells would leave no room to rebuild hash tables of "
                                  f"{max(sizes)} cells (hash_cells holds {self.cells.size}, "
                                  f"{self.cells.free_cells()} free): use smaller tables (--sched-flags size=N) "
                                  f"or start hdslbd with more (--max-hash-cells)")
            plan.hoff, plan.hlen = self.cells.alloc(n), n
        return plan

    def _drop(self, plan: TablePlan) -> None:
        if plan.hlen:
            self.cells.free(plan.hoff, plan.hlen)

    def _commit(self, svc: Service, plan: TablePlan, bump: bool = True) -> None:
        """Write the new table, swap the service to it in one map update, then free the old cells."""
        if self._defer is not None:  # a batch: the plan validated the change; the table is built at its end
            self._drop(plan)
            for slot, state in plan.overloaded.items():
                for d in svc.dests.values():
                    if d.slot == slot:
                        d.overloaded = state
            self._touch(svc)
            return
        if plan.hlen:
            self.dp.hash_cells_set(plan.hoff, plan.table.entries)
        svc.sched_gen += bump
        self.dp.sched_set(svc, plan.table, plan.hoff)
        old, svc.hcells = svc.hcells, ((plan.hoff, plan.hlen) if plan.hlen else None)
        if old:
            self.cells.free(*old)
        for slot, state in plan.overloaded.items():
            for d in svc.dests.values():
                if d.slot == slot:
                    d.overloaded = state
        self.refresh_errors.pop(svc.svc_id, None)

    def _resched(self, svc: Service) -> None:
        self._commit(svc, self._plan(svc))

    # --- services -------------------------------------------------------------------------------
    def _svc_opts(self, a: dict, key: tuple, current: Service | None = None) -> dict:
        """Options of an add, or of an edit (which changes only what it mentions, as DPVS edits by option).
        `persistent: 0` turns persistence off (None means: not mentioned). An edit to another scheduler does not
        carry over the flags and table parameters of the one it replaces (sh-port, size=...): they are that
        scheduler's; the ones the edit names are checked against the new one."""
        if current is not None:
            kept = {"flags": current.flags, "sched_params": current.sched_params}
            if a.get("sched") not in (None, current.sched):
                kept = {"flags": [], "sched_params": {}}
            a = {"sched": current.sched, "persistent": current.persistent, "netmask": current.netmask} | kept | \
                {k: v for k, v in a.items() if v is not None}
        sch = _or_default(a.get("sched"), DEFAULT_SCHED)
        if not isinstance(sch, str) or sch not in SCHEDULERS:
            raise HdslbError(errno.ENOENT, f"Scheduler not found: {sch}")
        flags = a.get("flags") or []
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise invalid("flags must be a list of strings")
        for f in flags:
            if f not in SCHED_FLAGS:
                raise invalid(f"unknown scheduler flag {f!r} ({', '.join(SCHED_FLAGS)})")
            if SCHED_FLAGS[f] != sch:
                raise invalid(f"scheduler flag {f} is for scheduler {SCHED_FLAGS[f]}, not {sch}")
        params = a.get("sched_params") or {}
        if not isinstance(params, dict):
            raise invalid("sched_params must be a map")
        allowed = {k for k in sched.params_of(sch) if k != "port"}
        for k, v in params.items():
            if k not in allowed:
                raise invalid(f"scheduler {sch} takes no parameter {k!r} (it takes: {', '.join(sorted(allowed)) or 'none'})")
            # 32 bits, as ipvsadm's --sched-flags reads them: what the daemon holds, -S writes and -R restores
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFFFFFFFF:
                raise invalid(f"scheduler parameter {k} must be an integer 0..4294967295, got {v!r}")
        pers = a.get("persistent")
        if pers == 0 and not isinstance(pers, bool):
            pers = None
        if pers is not None and (not isinstance(pers, int) or isinstance(pers, bool) or not 1 <= pers <= MAX_PERSIST_TIMEOUT):
            raise invalid(f"invalid persistence timeout {pers!r} (1..{MAX_PERSIST_TIMEOUT} seconds)")
        version = 4 if key[0] == "match" else key[1].version
        netmask = a.get("netmask")
        netmask = None if netmask in (None, "") else netmask_text(netmask_plen(netmask, version), version)
        if netmask == netmask_text(32 if version == 4 else 128, version):
            netmask = None
        if key[0] == "match" and (pers is not None or netmask is not None):
            raise HdslbError(errno.EOPNOTSUPP, "SNAT services have no persistence (-p/-M): the source a client "
                                               "gets is already stable per connection; use -s sh to keep each "
                                               "inside host on one source address")
        if sch in DYNAMIC_SCHEDS:
            self._dyn_keys[key] = None
        return {"sched": sch, "persistent": pers, "netmask": netmask, "flags": list(flags),
                "sched_params": dict(params)}

    def service_add(self, a: dict) -> Service:
        key = self.svc_key(a)
        opts = self._svc_opts(a, key)
        if key in self.services:
            raise exists("Service already exists")
        match = key[1] if key[0] == "match" else None
        if match is None:
            unicast(key[1], "service address")
        if match is None and key[2] == 0:
            if opts["persistent"] is not None:
                raise HdslbError(errno.EOPNOTSUPP, "port 0 (all-port persistent) services are not implemented "
                                                   "by this fast path: give the service's port")
            raise invalid("Zero port specified for non-persistent service (port 0 is for SNAT match services)")
        if match is not None and len(self.snat_order) >= SNAT_RULES_MAX:
            raise nospace(f"too many SNAT services (the fast path holds {SNAT_RULES_MAX} match rules)")
        svc_id = self._peek(self._ids_used, self.max_services, "service id")
        if match is not None:
            svc = Service(proto=match.proto, addr=ANY4, port=0, svc_id=svc_id, match=match, **opts)
        else:
            svc = Service(proto=key[0], addr=key[1], port=key[2], svc_id=svc_id, own_vip=bool(a.get("own_vip")),
                          **opts)
        plan = self._plan(svc)  # validates scheduler parameters even with no real server yet
        self._ids_used.add(svc_id)
        self.services[key] = svc
        if self._defer is not None and match is None:
            self._drop(plan)
            self._touch(svc, new=True)  # published by the batch's end, once its table is built
            return svc
        self._commit(svc, plan)  # the table exists before anything can lead a packet to it
        self.dp.service_set(svc)
        if match is not None:
            self._snat_append(svc)
        if svc.own_vip:
            self._sync_local(svc.addr)
        return svc

    def service_edit(self, a: dict) -> Service:
        svc = self.get_service(a)
        opts = self._svc_opts(a, svc.key, current=svc)
        table_changed = (opts["sched"], opts["flags"], opts["sched_params"]) != \
            (svc.sched, svc.flags, svc.sched_params)
        persist_changed = (opts["persistent"], opts["netmask"]) != (svc.persistent, svc.netmask)
        was_plen = svc.persist_plen if svc.persistent else None
        plan = None
        if table_changed:  # in a batch the table (and what it refuses) is built at the end, from the final servers
            plan = TablePlan(table=None) if self._defer is not None else \
                self._plan(svc, sched_name=opts["sched"], flags=opts["flags"], params=opts["sched_params"])
        svc.sched, svc.persistent, svc.netmask = opts["sched"], opts["persistent"], opts["netmask"]
        svc.flags, svc.sched_params = opts["flags"], opts["sched_params"]
        if plan is not None:
            self._commit(svc, plan)
        if persist_changed and not self._hidden(svc):
            self.dp.service_set(svc)
            # Templates keyed by the old mask, or no longer wanted, go. A new -p alone keeps them, as LVS's
            # ip_vs_edit_service does: each runs out at the time it was given and is renewed with the new
            # timeout; flushing them moved every persistent client to a server scheduled afresh on a timeout tweak.
            if svc.match is None and was_plen != (svc.persist_plen if svc.persistent else None):
                self.dp.persist_flush(svc.svc_id, None)
        return svc

    def service_del(self, a: dict) -> None:
        svc = self.get_service(a)
        self._remove_service(svc)

    def _remove_service(self, svc: Service) -> None:
        self._wgen += 1  # what wanted_nexthops() returns may change
        self._wtouch(svc)
        if self._defer is not None:
            self._defer.dirty.pop(id(svc), None)
            self._defer.new.discard(id(svc))
        if svc.match is not None:
            self._snat_remove(svc)  # no packet finds the service any more before its tables go
        self.dp.service_del(svc)
        for d in svc.dests.values():
            self.dp.dest_clear(d)
            self._slots_used.discard(d.slot)
            self._slot_gone(svc, d)
        if svc.match is None:
            self.dp.persist_flush(svc.svc_id, None)
        if svc.hcells:
            self.cells.free(*svc.hcells)
            svc.hcells = None
        laddrs = list(svc.laddrs)
        svc.laddrs.clear()
        del self.services[svc.key]
        self.config_owned.discard(svc.key)
        self._ids_used.discard(svc.svc_id)
        self._dyn_seen.pop(svc.svc_id, None)
        self.refresh_errors.pop(svc.svc_id, None)
        for la in laddrs:
            self._retire_laddr(la)
        if svc.own_vip:
            self._sync_local(svc.addr)

    def service_flush(self) -> None:
        for svc in list(self.services.values()):
            self._remove_service(svc)

    # --- SNAT rules -----------------------------------------------------------------------------
    def _snat_append(self, svc: Service) -> None:
        """Growing: the new entry first, then the count that makes it visible."""
        self._wgen += 1  # what wanted_nexthops() returns may change
        i = len(self.snat_order)
        self.snat_order.append(svc)
        self.dp.snat_rule_set(i, svc)
        self.dp.snat_count_set(i + 1)

    def _snat_remove(self, svc: Service) -> None:
        """Shrinking: the rules after it move down one (each briefly appears twice, in order: harmless, first
        match wins and both copies are the same service, and no live rule is ever missing), then the count drops,
        then the last entry, no longer counted, is cleared."""
        self._wgen += 1  # what wanted_nexthops() returns may change
        order = self.snat_order
        i, n = order.index(svc), len(order)
        rest = order[:i] + order[i + 1:]
        for j in range(i, n - 1):
            self.dp.snat_rule_set(j, rest[j])
        self.dp.snat_count_set(n - 1)
        self.dp.snat_rule_clear(n - 1)
        self.snat_order = rest

    # --- real servers ---------------------------------------------------------------------------
    def _dest_opts(self, a: dict, svc: Service, addr, port: int, current: Dest | None) -> dict:
        fwd = _or_default(a.get("fwd"), current.fwd if current else ("snat" if svc.match is not None else "fnat"))
        if not isinstance(fwd, str) or fwd not in FWD_MODES:
            raise invalid(f"invalid forwarding method {fwd!r}")
        if fwd not in FWD_SUPPORTED:
            raise HdslbError(errno.EOPNOTSUPP, f"forwarding method {fwd} is not implemented by this fast path")
        weight = a.get("weight", current.weight if current else 1)
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
            raise invalid(f"illegal weight specified: {weight!r}")
        out = {"fwd": fwd, "weight": weight}
        for k in ("u_threshold", "l_threshold"):
            v = a.get(k)
            out[k] = _uint((getattr(current, k) if current else 0) if v is None else v, k)
        if out["l_threshold"] > out["u_threshold"]:
            raise HdslbError(errno.ERANGE, f"lower threshold {out['l_threshold']} is above the upper threshold "
                                           f"{out['u_threshold']} (-y must not exceed -x)")
        self._check_fwd(svc, addr, port, fwd, current)
        if out["u_threshold"]:
            self._dyn_keys[svc.key] = None
        return out

    def _check_fwd(self, svc: Service, addr, port: int, fwd: str, current: Dest | None) -> None:
        """What each forwarding method allows, as LVS/DPVS do, so the fast path never meets a combination it
        cannot forward."""
        if svc.match is not None:
            if fwd != "snat":
                raise invalid(f"a SNAT (match) service takes SNAT real servers only (-J), not {fwd}")
            if addr.version != 4:
                raise HdslbError(errno.EOPNOTSUPP, "SNAT is IPv4 only: its real servers are IPv4 source addresses")
            if port != 0:
                raise invalid("a SNAT real server is a source address: give it as ADDR:0")
            if addr != ANY4 and not any(ad.addr == addr and ad.sapool for ad in self.addrs):
                raise HdslbError(errno.EADDRNOTAVAIL, f"{addr} is not a sapool address: add it with "
                                                      f"`dpip addr add {addr}/PLEN dev IF sapool` first (or use "
                                                      f"0.0.0.0:0 for the source of the route to each destination)")
            return
        if fwd == "snat":
            raise invalid("SNAT real servers (-J) belong to SNAT match services (-H), not to a VIP service")
        if addr.version != svc.addr.version:
            if svc.addr.version == 4:  # before the method: -b would not help (it said "needs FullNAT (-b)")
                raise HdslbError(errno.EOPNOTSUPP, "NAT46 (IPv4 service, IPv6 real servers) is not implemented; "
                                                   "NAT64 is: an IPv6 service with IPv4 real servers and IPv4 "
                                                   "local addresses")
            if fwd != "fnat":
                raise HdslbError(errno.EOPNOTSUPP, f"an IPv{addr.version} real server behind an IPv{svc.addr.version} "
                                                   f"service needs FullNAT (-b): only FNAT translates families")
        fam = self._rs_family_without(svc, current)
        if fam is not None and fam != addr.version:
            raise invalid(f"this service's real servers and local addresses are IPv{fam}; an IPv{addr.version} "
                          f"real server cannot join them (NAT64 services use IPv4 throughout behind the VIP)")
        if fwd in ("dr", "tunnel") and port != svc.port:
            raise invalid(f"{'DR' if fwd == 'dr' else 'TUNNEL'} cannot rewrite ports: the real server port must be "
                          f"the service port {svc.port} (or 0)")

    @staticmethod
    def _rs_family_without(svc: Service, skip: Dest | None) -> int | None:
        for d in svc.dests.values():
            if d is not skip:
                return d.addr.version
        for la in svc.laddrs:
            return la.addr.version
        return None

    def _dest_key(self, svc: Service, a: dict) -> tuple:
        addr = ip(a.get("addr"), "real server address")
        port = a.get("port")
        if svc.match is not None:
            return (addr, 0 if port is None else port_of(port, "real server port"))
        port = svc.port if port is None or (port == 0 and type(port) is int) else port_of(port, "real server port")
        return (addr, port)

    def dest_add(self, a: dict) -> Dest:
        self._wgen += 1  # what wanted_nexthops() returns may change
        svc = self.get_service(a.get("svc"))
        key = self._dest_key(svc, a)
        if key in svc.dests:
            raise exists("Destination already exists")
        if not (svc.match is not None and key[0] == ANY4):  # SNAT's 0.0.0.0:0: the src of the route taken
            unicast(key[0], "real server address")
        opts = self._dest_opts(a, svc, key[0], key[1], None)
        if any(la.addr == key[0] for la in svc.laddrs):
            raise invalid(f"{key[0]} is a local address of this service (the balancer's own source toward the "
                          f"real servers), so it cannot be a real server too")
        slot = self._slot_back(svc, key[0], key[1])
        if slot is None:
            slot = self._peek(self._slots_used, self.max_dests, "real server slot")
        d = Dest(addr=key[0], port=key[1], slot=slot, **opts)
        self._wtouch(svc)
        self.added_addrs.append(key[0])  # (a refused add leaves nothing to look at: Daemon._hold_down finds no dest)
        if self._defer is not None:  # a batch: one table from the final real servers, built at its end
            self._slots_used.add(slot)
            svc.dests[key] = d
            if not self._hidden(svc):  # a service new in the batch has its slots written when it is published
                self._dest_write(svc, d)
            self._touch(svc)
            return d
        plan = self._plan(svc, dests=list(svc.dests.values()) + [d])
        self._slots_used.add(slot)
        svc.dests[key] = d
        self._dest_write(svc, d)
        self._commit(svc, plan)
        return d

    def dest_edit(self, a: dict) -> Dest:
        svc = self.get_service(a.get("svc"))
        key = self._dest_key(svc, a)
        d = svc.dests.get(key)
        if d is None:
            raise notfound("No such destination")
        opts = self._dest_opts(a, svc, key[0], key[1], d)
        if a.get("weight") is not None and d.health_weight is not None:
            # A weight given now is the weight, until a misc_dynamic script sets another (as ipvsadm -e on a
            # server keepalived weighs); a stale checker weight must not pin it.
            opts["health_weight"] = None
        new = dataclasses.replace(d, **opts)
        # LVS (__ip_vs_update_dest): a raised or removed upper threshold lifts the overload at once.
        if new.u_threshold == 0 or new.u_threshold > d.u_threshold:
            new.overloaded = False
        # A batch: one table from the final real servers, built at its end (a reload changing the weights of
        # 400 mh servers would otherwise build 400 tables of 64k entries).
        plan = TablePlan(table=None, overloaded={d.slot: new.overloaded}) if self._defer is not None else \
            self._plan(svc, dests=[new if x is d else x for x in svc.dests.values()],
                       overloaded={d.slot: new.overloaded})
        # With expire_quiescent_template a drain stops its templates from being honoured: they go at once.
        quiesced = keeps_persistent(d, self.expire_quiescent_template) and not keeps_persistent(
            new, self.expire_quiescent_template)
        for k, v in opts.items():
            setattr(d, k, v)
        late = self._dest_write_ordered(svc, d)
        self._commit(svc, plan)
        if late:
            self._dest_write(svc, d)
        if quiesced and svc.match is None:
            if self._defer is not None:
                self._defer.post.append((self.dp.persist_flush, (svc.svc_id, d.slot)))
            else:
                self.dp.persist_flush(svc.svc_id, d.slot)
        return d

    def dest_del(self, a: dict) -> None:
        self._wgen += 1  # what wanted_nexthops() returns may change
        svc = self.get_service(a.get("svc"))
        key = self._dest_key(svc, a)
        d = svc.dests.get(key)
        if d is None:
            raise notfound("No such destination")
        self._wtouch(svc)
        last_sorry = d.sorry and not any(x.sorry for x in svc.dests.values() if x is not d)
        if last_sorry and self._defer is None:  # with the servers it held back: one table
            with self.deferred():
                return self.dest_del(a)
        if self._defer is not None:
            # The slot is cleared, its templates dropped and the slot handed out again only after the batch's
            # tables no longer hold it.
            del svc.dests[key]
            self._touch(svc)
            self._defer.post.append((self.dp.dest_clear, (d,)))
            if svc.match is None:
                self._defer.post.append((self.dp.persist_flush, (svc.svc_id, d.slot)))
            self._defer.post.append((self._slots_used.discard, (d.slot,)))
            self._defer.post.append((self._slot_gone, (svc, d)))
            if last_sorry:  # however it goes (quorum back, a reload, by hand), the servers it stood in for return
                self._hold(svc, False)
            return
        plan = self._plan(svc, dests=[x for x in svc.dests.values() if x is not d])
        del svc.dests[key]
        # Table first, then the slot, then its templates: no new flow can pick a slot that is about to be cleared,
        # and a template can no longer lead to it once the slot is cleared.
        self._commit(svc, plan)
        self.dp.dest_clear(d)
        if svc.match is None:
            self.dp.persist_flush(svc.svc_id, d.slot)
        self._slots_used.discard(d.slot)
        self._slot_gone(svc, d)

    def dest_health(self, a: dict, up: bool, weight: int | None, reason: str) -> Dest:
        """A health checker's verdict: down servers get no new flows (existing ones continue, as in LVS), and
        their persistence templates go, as keepalived removing the server from LVS would make them void; so do
        those of a server a checker set to weight 0 (inhibit_on_failure, misc_dynamic), which keeps_persistent
        refuses (a drain by hand keeps its templates)."""
        svc = self.get_service(a.get("svc"))
        d = svc.dests.get(self._dest_key(svc, a))
        if d is None:
            raise notfound("No such destination")
        new = dataclasses.replace(d, health="up" if up else "down", health_weight=weight if up else None,
                                  reason="" if up else reason, inhibited=not up and weight == 0)
        went_down = d.health == "up" and not up
        lost = keeps_persistent(d, self.expire_quiescent_template) and not keeps_persistent(
            new, self.expire_quiescent_template)
        flush = (went_down or lost) and svc.match is None
        if self._defer is not None:  # a batch: one table from the final states, built at its end
            d.health, d.health_weight, d.reason, d.inhibited = new.health, new.health_weight, new.reason, new.inhibited
            self._dest_write_ordered(svc, d)
            self._touch(svc)
            if flush:  # once no table of the batch can lead a new flow to it (dest_del's order)
                self._defer.post.append((self.dp.persist_flush, (svc.svc_id, d.slot)))
            return d
        plan = self._plan(svc, dests=[new if x is d else x for x in svc.dests.values()])
        d.health, d.health_weight, d.reason, d.inhibited = new.health, new.health_weight, new.reason, new.inhibited
        late = self._dest_write_ordered(svc, d)
        self._commit(svc, plan)
        if late:
            self._dest_write(svc, d)
        if flush:
            self.dp.persist_flush(svc.svc_id, d.slot)
        return d

    def dest_health_many(self, verdicts: list) -> list:
        """Health verdicts ((real server args, up, weight, reason), as dest_health takes them) applied in order, each
        touched service's table built once at the end from its final real servers instead of once per verdict: a
        rack going down is hundreds of verdicts, and an mh or conhash table (64k entries) costs 45-390 ms a build.
        Returns, per verdict, its Dest or the HdslbError that refused it (a real server removed meanwhile).

        Templates of servers that went down go after the tables no longer hold them. A service whose table cannot
        be built from all its verdicts (more servers up than its ring holds) is put back as it was and gets them
        one at a time, as dest_health alone would: only the verdicts that cannot be built are refused."""
        out: list = [None] * len(verdicts)
        if self._defer is not None:  # inside a caller's batch: its end builds the tables
            for i, v in enumerate(verdicts):
                try:
                    out[i] = self.dest_health(*v)
                except HdslbError as e:
                    out[i] = e
            return out
        before: dict = {}  # id(svc) -> {id(dest): (dest, health, health_weight, reason, inhibited)} before the burst
        mine: dict = {}    # id(svc) -> indexes of its verdicts
        flushes: dict = {}  # id(svc) -> ids of the template flushes its verdicts queued in batch.post

        def refused(svc, _err) -> None:
            for x, health, health_weight, reason, inhibited in before[id(svc)].values():
                x.health, x.health_weight, x.reason, x.inhibited = health, health_weight, reason, inhibited
                self._dest_write(svc, x)
            gone = flushes.get(id(svc), set())
            batch.post[:] = [p for p in batch.post if id(p) not in gone]
            for i in mine[id(svc)]:  # the batch is over (self._defer is None): each verdict is planned alone
                try:
                    out[i] = self.dest_health(*verdicts[i])
                except HdslbError as e:
                    out[i] = e

        with self.deferred() as batch:
            batch.refused = refused
            for i, v in enumerate(verdicts):
                batch.tag = i
                a = v[0]
                try:
                    svc = self.get_service(a.get("svc") if isinstance(a, dict) else None)
                    x = svc.dests.get(self._dest_key(svc, a))
                    if x is not None:
                        before.setdefault(id(svc), {}).setdefault(id(x), (x, x.health, x.health_weight, x.reason,
                                                                              x.inhibited))
                        mine.setdefault(id(svc), []).append(i)
                    n = len(batch.post)
                    out[i] = self.dest_health(*v)
                    flushes.setdefault(id(svc), set()).update(id(p) for p in batch.post[n:])
                except HdslbError as e:
                    out[i] = e
        return out

    def hold_for_sorry(self, ident, held: bool) -> list[Dest]:
        """keepalived's perform_quorum_state: while a service's sorry server stands in for its lost quorum, its other
        real servers are out of the pool (no new flows, their persistence templates void, existing flows go on),
        and one whose check passes meanwhile stays out; once quorum is back they return together. Holds (held=True)
        or releases every real server of the service but its sorry servers, its table built once. Returns the
        real servers that changed."""
        return self._hold(self.get_service(ident), held)

    def _hold(self, svc: Service, held: bool) -> list[Dest]:
        moved = [d for d in svc.dests.values() if not d.sorry and d.held != held]
        if not moved:
            return moved
        with self.deferred():
            for d in moved:
                lost = keeps_persistent(d, self.expire_quiescent_template)
                d.held = held
                self._dest_write_ordered(svc, d)
                self._touch(svc)
                if held and lost and svc.match is None:  # once no table can lead a new flow to it
                    self._defer.post.append((self.dp.persist_flush, (svc.svc_id, d.slot)))
        return moved

    def dest_warnings(self, svc: Service, d: Dest) -> list[str]:
        """Things that will stop this real server from working that the operator can fix now (not refused: the
        route or address may simply come later)."""
        out = []
        if d.fwd == "tunnel" and self.tunnel_source(svc, d) is None:
            out.append(f"no outer source address for the tunnel to {d.addr}: add one with `dpip route add "
                       f"{d.addr}/{d.addr.max_prefixlen} dev IF src ADDR` (or a route with `src`), or a local "
                       f"address to the service (-P); until then its packets are dropped (drop_no_src)")
        if d.fwd == "dr":
            r = self.route_lookup(d.addr)
            if r is None:
                out.append(f"no route to {d.addr}: DR needs the real server on a directly connected network")
            elif r.via is not None:
                out.append(f"the route to {d.addr} goes via {r.via}: DR rewrites the MAC only, so the real server "
                           f"must be on a directly connected network")
        return out

    def tunnel_source(self, svc: Service, d: Dest):
        """The outer source of IPIP/6in6 packets to d: the src of the route to it, else the service's first local
        address of its family (the fast path applies the same rule), else None."""
        r = self.route_lookup(d.addr)
        if r is not None and r.src is not None and r.src.version == d.addr.version:
            return r.src
        return next((la.addr for la in svc.laddrs if la.addr.version == d.addr.version), None)

    def wants_counts(self) -> bool:
        """Whether refresh_dynamic may read the connection counts (some service is lc/wlc or has a u_threshold), so
        the daemon reads them, off its event loop, only then."""
        return bool(self._dyn_keys)

    def refresh_dynamic(self, counts: dict | None = None) -> list[tuple[Service, Dest]]:
        """Periodic (the daemon's estimator): re-evaluate thresholds and rebuild the tables of services whose
        dests' overload state changed, and the lc/wlc rings whose connection counts moved. counts: the connection
        counts to use (read now through conn_counts when not given). Returns the real servers it found overloaded
        that were not (the daemon logs them: walking every real server before and after to find them cost 25 ms
        an interval at 10k x 10)."""
        became: list[tuple[Service, Dest]] = []
        for key in list(self._dyn_keys):
            svc = self.services.get(key)
            dynamic = svc is not None and svc.sched in DYNAMIC_SCHEDS
            if svc is None or not (dynamic or any(d.u_threshold or d.overloaded for d in svc.dests.values())):
                del self._dyn_keys[key]
                continue
            if not svc.dests:
                continue
            counts = self.conn_counts() if counts is None else counts
            changed = {}
            for d in svc.dests.values():
                active, inactive = counts.get(d.slot, (0, 0))
                state = overload_next(d, active + inactive)
                if state != d.overloaded:
                    changed[d.slot] = state
            seen = None
            if dynamic:
                seen = tuple(counts.get(d.slot, (0, 0)) for d in svc.dests.values())
                if seen == self._dyn_seen.get(svc.svc_id) and not changed:
                    continue
            elif not changed:
                continue
            try:
                plan = self._plan(svc, counts=counts, overloaded=changed)
            except HdslbError as e:  # keep the old table; say why where ipvsadm and the log can show it
                self.refresh_errors[svc.svc_id] = e.message
                continue
            self._commit(svc, plan)
            if seen is not None:
                self._dyn_seen[svc.svc_id] = seen
            became += [(svc, d) for d in svc.dests.values() if changed.get(d.slot)]
        return became

    # --- local addresses (FNAT sources) ---------------------------------------------------------
    def laddr_add(self, a: dict) -> Laddr:
        self._wgen += 1  # what wanted_nexthops() returns may change
        svc = self.get_service(a.get("svc"))
        addr = unicast(ip(a.get("addr"), "local address"), "local address")
        ifc = self.iface(a.get("ifname"))
        if svc.match is not None:
            raise invalid("SNAT services take their source addresses as real servers (-a -H ... -r ADDR:0 -J), "
                          "not as local addresses")
        fam = svc.rs_family()
        if addr.version != svc.addr.version and not (svc.addr.version == 6 and addr.version == 4):
            raise HdslbError(errno.EOPNOTSUPP, "an IPv6 local address for an IPv4 service (NAT46) is not implemented")
        if fam is not None and fam != addr.version:
            raise HdslbError(errno.EOPNOTSUPP, f"local address family differs from the service's real servers "
                                               f"(IPv{fam}): local addresses are the source toward them")
        if addr.version != svc.addr.version and any(d.fwd != "fnat" for d in svc.dests.values()):
            raise invalid("IPv4 local addresses for an IPv6 service serve NAT64, which is FullNAT only")
        if any(la.addr == addr for la in svc.laddrs):
            raise exists("Local address already exists")
        if addr == svc.addr:
            raise invalid(f"{addr} is the service's VIP: a local address is the source FullNAT gives the real "
                          f"servers, and their replies to the VIP would be taken for new client connections; give "
                          f"an address of the balancer's own on the real servers' side")
        if any(d.addr == addr for d in svc.dests.values()):
            raise invalid(f"{addr} is a real server of this service: a local address is the balancer's own source "
                          f"toward the real servers")
        if len(svc.laddrs) >= LADDR_MAX:
            raise nospace(f"too many local addresses for one service ({LADDR_MAX})")
        la = Laddr(addr=addr, ifname=ifc.name)
        svc.laddrs.append(la)
        if not self._hidden(svc):  # a service added in the batch gets them with its slots, when it is published
            self._push_laddrs(svc)
        self._sync_local(addr)
        return la

    def laddr_del(self, a: dict) -> None:
        self._wgen += 1  # what wanted_nexthops() returns may change
        svc = self.get_service(a.get("svc"))
        addr = ip(a.get("addr"), "local address")
        for la in svc.laddrs:
            if la.addr == addr:
                svc.laddrs.remove(la)
                if not self._hidden(svc):
                    self._push_laddrs(svc)
                self._retire_laddr(la)
                return
        raise notfound("No such local address")

    def _retire_laddr(self, la: Laddr) -> None:
        """A local address left a service: its flows go on (their entries name it), so it stays ours until the daemon
        finds none uses it (release_laddrs). One another service still has (a local_address_group every service
        shares) is noted the same way, as finding that out here would walk every service for each address a batch
        takes out; kept_laddrs and release_laddrs leave those out."""
        self.retired_laddrs.setdefault(la.addr, la.ifname)
        self._sync_local(la.addr)

    def _held_laddrs(self) -> set:
        return {la.addr for svc in self.services.values() for la in svc.laddrs}

    def kept_laddrs(self) -> list:
        """The local addresses no service has any more, kept (ARP/ND answered) while connections use them."""
        held = self._held_laddrs() if self.retired_laddrs else ()
        return [a for a in self.retired_laddrs if a not in held]

    def release_laddrs(self, in_use) -> list:
        """Retired local addresses no connection uses any more (in_use: the addresses connections use) stop being
        ours (unless something else makes them so); returns them. Those a service has (again, or still) are its
        own: they leave the retired ones without being named (they stay ours)."""
        held = self._held_laddrs()
        back = [a for a in self.retired_laddrs if a in held]
        gone = [a for a in self.retired_laddrs if a not in held and a not in in_use]
        if gone:
            self._wgen += 1  # what wanted_nexthops() returns may change
        for a in back + gone:
            del self.retired_laddrs[a]
            self._sync_local(a)
        return gone

    def _push_laddrs(self, svc: Service) -> None:
        self.dp.laddrs_set(svc, [(la.addr, self.ifaces[la.ifname].ifindex) for la in svc.laddrs])

    def local_reasons(self, addr) -> tuple[int, int]:
        """(LOCAL_* flags, ifindex) saying why `addr` is ours; (0, 0) when it is not. ifindex 0 with flags set
        means every attached interface (a config-declared VIP). The fast path's local_map and the slow path's
        ARP/ND answers both follow this one rule."""
        flags, ifname = self._local_index().get(addr, _NOT_LOCAL)
        return flags, (self.ifaces[ifname].ifindex if ifname is not None else 0)

    def owned_addresses(self) -> dict:
        """Address -> the interface it is answered on (None: every attached interface), for every address that is
        ours. The same dict until the model's addresses change (then a new one): read it, do not modify it."""
        idx = self._local_index()
        if self._owned is None or self._owned[0] is not idx:
            self._owned = (idx, {a: ifname for a, (_flags, ifname) in idx.items()})
        return self._owned[1]

    def owned_vips(self) -> dict:
        """VIP -> the interface it is answered on (None: every attached interface), for every VIP the balancer
        answers ARP/ND for as a config-declared VIP (own_vip) and holds by no other title."""
        return {a: ifname for a, (flags, ifname) in self._local_index().items() if flags == LOCAL_VIP}

    def _local_index(self) -> dict:
        """local_reasons() of every address that is ours, in one walk of the addresses and services: the interface
        is the address's own, else the first service's (in service order) that has it as a local address."""
        idx = self._lidx
        if idx is None:
            idx = {}
            for ad in self.addrs:
                idx[ad.addr] = (idx.get(ad.addr, _NOT_LOCAL)[0] | LOCAL_IFADDR | (LOCAL_SAPOOL if ad.sapool else 0),
                                ad.ifname)
            for svc in self.services.values():
                for la in svc.laddrs:
                    flags, ifname = idx.get(la.addr, _NOT_LOCAL)
                    idx[la.addr] = (flags | LOCAL_LADDR, ifname if ifname is not None else la.ifname)
                if svc.own_vip:
                    flags, ifname = idx.get(svc.addr, _NOT_LOCAL)
                    idx[svc.addr] = (flags | LOCAL_VIP, ifname)
            for addr, lifname in self.retired_laddrs.items():
                flags, ifname = idx.get(addr, _NOT_LOCAL)
                idx[addr] = (flags | LOCAL_LADDR, ifname if ifname is not None else lifname)
            self._lidx = idx
        return idx

    @contextlib.contextmanager
    def _locals_once(self):
        """Changes inside write each touched address's local_map entry once, at the end, from one local index:
        a batch adding 4,000 config services (each its own VIP) asked local_reasons() 8,000 times, each a walk of
        every service (35 s). Nested use joins the outer one."""
        if self._lbatch is not None:
            yield
            return
        self._lbatch = {}
        try:
            yield
        finally:
            todo, self._lbatch = self._lbatch, None
            for addr in todo:
                self._write_local(addr)

    def _sync_local(self, addr) -> None:
        """addr's reasons to be ours may have changed: write (or remove) its local_map entry from local_reasons,
        now or at the end of the running _locals_once()."""
        self._lidx = None
        if self._lbatch is not None:
            self._lbatch[addr] = None
            return
        self._write_local(addr)

    def _write_local(self, addr) -> None:
        flags, ifindex = self.local_reasons(addr)
        if flags:
            self.dp.local_set(addr, flags, ifindex)
        else:
            self.dp.local_del(addr)

    def own_config_vips(self, keys) -> None:
        """The config file's virtual servers own their VIPs (service_add's own_vip): also one the file adopts after
        it was made again by hand (ipvsadm -C then -R, -D then -A), which its own add would have given that."""
        for key in keys:
            svc = self.services.get(key)
            if svc is not None and svc.match is None and not svc.own_vip:
                svc.own_vip = True
                self._sync_local(svc.addr)

    def is_local(self, addr) -> bool:
        """An interface address or a local address of some service (a config VIP alone is not)."""
        return bool(self._local_index().get(addr, _NOT_LOCAL)[0] & (LOCAL_IFADDR | LOCAL_LADDR))

    # --- interface addresses (dpip addr) --------------------------------------------------------
    def addr_add(self, a: dict) -> Addr:
        self._wgen += 1  # what wanted_nexthops() returns may change
        addr = unicast(ip(a.get("addr")), "address")
        plen = a.get("prefixlen", addr.max_prefixlen)
        if not isinstance(plen, int) or isinstance(plen, bool) or not 0 <= plen <= addr.max_prefixlen:
            raise invalid(f"invalid prefix length {plen!r}")
        ifc = self.iface(a.get("ifname"))
        scope = _or_default(a.get("scope"), "global")
        if not isinstance(scope, str) or scope not in ("global", "link", "host"):
            raise invalid(f"invalid scope {scope!r}")
        if a.get("sapool") is not None and type(a.get("sapool")) is not bool:
            raise invalid(f"invalid sapool {a.get('sapool')!r}: true or false")
        if any(ad.addr == addr for ad in self.addrs):
            raise exists(f"address {addr} already exists")
        ad = Addr(addr=addr, prefixlen=plen, ifname=ifc.name, scope=scope, sapool=bool(a.get("sapool")))
        host = ipaddress.ip_network(f"{addr}/{addr.max_prefixlen}")
        new_routes = [Route(net=host, ifname=ifc.name, scope="host", local=True)]
        if plen != addr.max_prefixlen:
            net = ipaddress.ip_network(f"{addr}/{plen}", strict=False)
            if not any(r.ifname == ifc.name and not r.local for r in self._rindex.get(net, ())):
                new_routes.append(Route(net=net, ifname=ifc.name, scope="link", src=addr))
        self.addrs.append(ad)
        self._sync_local(addr)
        for r in new_routes:
            self._route_insert(r)
        return ad

    def addr_del(self, a: dict) -> None:
        addr = ip(a.get("addr"))
        plen = a.get("prefixlen")  # given, it must be the address's (as the kernel has it for ip addr del)
        for ad in self.addrs:
            if ad.addr == addr and a.get("ifname") in (None, ad.ifname) and plen in (None, ad.prefixlen):
                self._check_unused(ad)
                self._remove_addr(ad)
                return
        other = [ad for ad in self.addrs if ad.addr == addr and a.get("ifname") in (None, ad.ifname)]
        has = f" ({other[0].ifname} has {addr}/{other[0].prefixlen})" if other else ""
        raise HdslbError(errno.EADDRNOTAVAIL, f"address {addr}{'' if plen is None else f'/{plen}'} not found{has}")

    def _check_unused(self, ad: Addr) -> None:
        """A sapool address a SNAT service hands out as source cannot go while that service uses it."""
        if not ad.sapool:
            return
        for svc in self.snat_order:
            if (ad.addr, 0) in svc.dests:
                raise HdslbError(errno.EBUSY, f"{ad.addr} is a source address of SNAT service {svc.match}: delete "
                                              f"that real server first (ipvsadm -d -H {svc.match} -r {ad.addr}:0)")

    def _remove_addr(self, ad: Addr) -> None:
        self._wgen += 1  # what wanted_nexthops() returns may change
        self.addrs.remove(ad)
        self._sync_local(ad.addr)
        gone = [r for r in self.routes if r.ifname == ad.ifname and (
            (r.local and r.net.network_address == ad.addr) or (not r.local and r.src == ad.addr))]
        for r in gone:
            heir = self._net_route_heir(r)
            if heir is not None:  # added first, so the prefix's fast-path entry is rewritten, never missing
                self._route_insert(dataclasses.replace(r, src=heir.addr))
            self._route_remove(r)

    def _net_route_heir(self, r: Route) -> Addr | None:
        """The address a connected net route passes to when the address it names as src goes: another address on
        that interface and net (whose add found the route there and made none), as Linux promotes a secondary.
        Without one every server on the net would lose its route while an address on it stays."""
        if r.local or r.via is not None or r.scope != "link" or any(
                x is not r and x.ifname == r.ifname and not x.local for x in self._rindex.get(r.net, ())):
            return None
        for other in self.addrs:
            if (other.ifname == r.ifname and other.addr.version == r.net.version and other.addr != r.src
                    and other.prefixlen == r.net.prefixlen and other.addr in r.net):
                return other
        return None

    def addr_flush(self, a: dict) -> None:
        ifname = a.get("ifname")
        if ifname is not None:
            self.iface(ifname)
        gone = [ad for ad in self.addrs if ifname in (None, ad.ifname)]
        for ad in gone:
            self._check_unused(ad)
        for ad in gone:
            self._remove_addr(ad)

    # --- routes ---------------------------------------------------------------------------------
    def _route_from(self, a: dict, any_dev: bool = False) -> Route:
        prefix = a.get("prefix")
        plen = a.get("prefixlen")
        net = None
        if type(prefix) is str and type(plen) is int and "%" not in prefix:  # the bulk path: parsed once
            try:
                base = ip(prefix)
                net = (ipaddress.IPv4Network if base.version == 4 else ipaddress.IPv6Network)((int(base), plen))
            except (HdslbError, ValueError):
                net = None  # the general path below words the refusal
        if net is None:
            try:
                net = ipaddress.ip_network(f"{prefix}/{plen}" if plen is not None else str(prefix), strict=True)
            except ValueError as e:
                raise invalid(f"invalid prefix {prefix}/{plen}: {e}") from None
        af = a.get("af")
        if af not in (None, net.version):
            raise invalid(f"prefix {net} is not IPv{af}")
        ifname = a.get("ifname")
        ifname = self.iface(ifname).name if (ifname is not None or not any_dev) else None
        via = a.get("via")
        via = unicast(ip(via, "gateway"), "gateway") if via not in (None, "", "0.0.0.0", "::") else None
        src = a.get("src")
        src = unicast(ip(src, "source"), "source") if src not in (None, "", "0.0.0.0", "::") else None
        for x in (via, src):
            if x is not None and x.version != net.version:
                raise invalid(f"{x} does not match the family of {net}")
        scope = _or_default(a.get("scope"), "global" if via else "link")
        if not isinstance(scope, str) or scope not in ROUTE_SCOPES:
            raise invalid(f"invalid scope {scope!r} ({', '.join(ROUTE_SCOPES)})")
        mtu = a.get("mtu")
        metric = a.get("metric")
        mtu, metric = (0 if mtu is None else mtu), (0 if metric is None else metric)
        for name, v in (("mtu", mtu), ("metric", metric)):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFFFFFFFF:
                raise invalid(f"invalid {name} {v!r}")
        lo = 1280 if net.version == 6 else 68  # the least MTU of each family (RFC 8200, RFC 791)
        if mtu and not lo <= mtu <= 65535:
            raise invalid(f"invalid mtu {mtu} ({lo}..65535, or 0 for the interface's)")
        return Route(net=net, ifname=ifname, via=via, src=src, mtu=mtu, metric=metric, scope=scope, proto="auto")

    def _route_insert(self, r: Route) -> None:
        if self._defer is not None and self._defer.undo_new:
            self._defer.new_routes.append(r)
        self.routes.append(r)
        if r.via is not None and r.scope != "kni_host":
            self._gateways[(r.via, r.ifname)] += 1
        self._rindex.setdefault(r.net, []).append(r)
        self._plens[(r.net.version, r.net.prefixlen)] += 1
        self._route_gen += 1
        self._route_changed(r.net)

    def _route_unindex(self, r: Route, sync: bool = True) -> None:
        """Everything _route_remove does but taking r out of self.routes (O(n): bulk removals filter once).
        sync=False leaves the LPM entry alone (a refused batch's route that never reached it)."""
        if r.via is not None and r.scope != "kni_host":
            self._gateways[(r.via, r.ifname)] -= 1
            if self._gateways[(r.via, r.ifname)] <= 0:
                del self._gateways[(r.via, r.ifname)]
        same = self._rindex.get(r.net, [])
        same.remove(r)
        if not same:
            self._rindex.pop(r.net, None)
        pl = (r.net.version, r.net.prefixlen)
        self._plens[pl] -= 1
        if self._plens[pl] <= 0:
            del self._plens[pl]
        self._route_gen += 1
        if sync:
            self._route_changed(r.net)

    def _route_remove(self, r: Route) -> None:
        self.routes.remove(r)
        self._route_unindex(r)

    def _route_changed(self, net) -> None:
        if self._defer is not None:
            self._defer.routes[net] = self._defer.tag  # one LPM write per prefix, at the batch's end
        else:
            self._sync_route(net)

    def _check_gateway(self, r: Route) -> None:
        """A gateway that is an address of ours would never resolve (nothing answers our own ARP/ND): every new flow
        the route takes would wait for its MAC and be dropped. Refused, as Linux refuses a local gateway."""
        if r.via is not None and self._local_index().get(r.via, _NOT_LOCAL)[0]:
            raise invalid(f"gateway {r.via} is an address of this balancer: a route goes via a neighbour")

    def route_add(self, a: dict) -> Route:
        r = self._route_from(a)
        self._check_gateway(r)
        if any(x.metric == r.metric and not x.local for x in self._rindex.get(r.net, ())):
            raise exists(f"route {r.net} metric {r.metric} already exists")
        self._route_insert(r)
        return r

    def route_set(self, a: dict) -> Route:
        r = self._route_from(a)
        self._check_gateway(r)
        others = []
        for x in self._rindex.get(r.net, ()):
            if not x.local and x.metric == r.metric:
                self._route_insert(r)  # first: the prefix's LPM entry is overwritten, never missing in between
                self._route_remove(x)
                return r
            if not x.local:
                others.append(x.metric)
        if others:  # set replaces the route of that metric (0 unless given), as `ip route replace` matches it
            raise notfound(f"route {r.net} metric {r.metric} not found (it has metric "
                           f"{', '.join(map(str, sorted(others)))}: name it with `metric`)")
        raise notfound(f"route {r.net} not found")

    def route_del(self, a: dict) -> None:
        r = self._route_from(a, any_dev=True)  # DPVS deletes by prefix; dev narrows it when given
        # a metric given (0 too) names the route; without one the lowest metric goes (the one in use), as
        # `ip route del` takes the first of its list sorted by metric
        metric = a.get("metric")
        cands = [x for x in self._rindex.get(r.net, ()) if not x.local and r.ifname in (None, x.ifname) and (
            r.via is None or x.via == r.via) and (metric is None or x.metric == r.metric)]
        if cands:
            self._route_remove(min(cands, key=lambda x: x.metric))
            return
        raise HdslbError(errno.ESRCH, f"route {r.net}{' dev ' + r.ifname if r.ifname else ''}"
                                      f"{'' if metric is None else f' metric {r.metric}'} not found")

    def route_flush(self, a: dict) -> None:
        af = a.get("af")
        gone = [x for x in self.routes if not x.local and (af in (None, x.net.version))]
        if not gone:
            return
        ids = {id(x) for x in gone}
        self.routes = [x for x in self.routes if id(x) not in ids]
        for x in gone:
            self._route_unindex(x)

    def _sync_route(self, net) -> None:
        """The LPM map holds one route per prefix: a kni_host route, else the local route, else the lowest metric."""
        cands = self._rindex.get(net, [])
        if not cands:
            self.dp.route_del(net)
            return
        # kni_host first (it hands the prefix to the kernel, even an owned address), then local, then metric
        best = min(cands, key=lambda r: (r.scope != "kni_host", not r.local, r.metric))
        self.dp.route_set(best, self.ifaces[best.ifname].ifindex)

    def route_lookup(self, addr) -> Route | None:
        """Longest prefix, then lowest metric, then the route added first; one probe of the route index per
        prefix length in use (not a walk of every route: 100k routes times every real server's next hop)."""
        fast = self._rint
        if fast is not None and fast[0] == self._route_gen and fast[1] is self._rindex:
            return self._route_lookup_int(fast, addr)
        v = addr.version
        for plen in sorted((pl for ver, pl in self._plens if ver == v), reverse=True):
            best = None
            for r in self._rindex.get(ipaddress.ip_network((addr, plen), strict=False), ()):
                if best is None or r.metric < best.metric:
                    best = r
            if best is not None:
                return best
        return None

    def index_routes(self) -> None:
        """Index the routes by (IP version, prefix length, network as an int) for route_lookup until the next route
        change: a probe is then a shift and a dict get instead of building an ip_network per prefix length (5 us;
        10 % of a bulk load of 100k real servers went to the wanted-next-hop walk's lookups). Built by the bulk
        walkers only: a lookup between two route changes of a bulk route load must not pay a rebuild."""
        if self._rint is not None and self._rint[0] == self._route_gen and self._rint[1] is self._rindex:
            return
        if type(self._rindex) is not dict:  # a dry run's overlay: the slow probe is right there
            return
        idx = {(net.version, net.prefixlen, int(net.network_address) >> (net.max_prefixlen - net.prefixlen)
                if net.prefixlen else 0): rs for net, rs in self._rindex.items()}
        plens = {v: [(pl, (32 if v == 4 else 128) - pl) for pl in sorted((p for ver, p in self._plens if ver == v),
                                                                      reverse=True)] for v in (4, 6)}
        self._rint = (self._route_gen, self._rindex, idx, plens)

    @staticmethod
    def _route_lookup_int(fast, addr) -> Route | None:
        idx, v = fast[2], addr.version
        a = int(addr)
        for plen, shift in fast[3][v]:
            rs = idx.get((v, plen, a >> shift if plen else 0))
            if rs:
                best = None
                for r in rs:
                    if best is None or r.metric < best.metric:
                        best = r
                return best
        return None

    def nexthop(self, addr):
        """(next hop address, interface name) for reaching `addr`, or None when no route covers it."""
        r = self.route_lookup(addr)
        if r is None:
            return None
        return (r.via or addr, r.ifname)

    def probe_source(self, target, ifname: str):
        """Sender address of an ARP request / neighbour solicitation for `target` on `ifname` (one rule for the
        daemon's prober and the slow path): the route's src (the operator's, or the one `dpip addr add` gave
        its net route); else an address of ours on
        that interface, one whose prefix covers target first; else a local address there; else, for ARP, the
        unspecified address (an RFC 5227 probe, answered to our MAC) and, for IPv6, the interface's link-local
        address (fe80:: with the modified EUI-64 of its MAC, the kernel's default one), as Linux's ndisc_solicit
        sends it: an NS from :: is a duplicate-address probe, answered to all nodes without the Solicited flag
        (never proof of reachability: the entry went STALE, DELAY, FAILED over and over) and, sent unicast to
        re-confirm the entry, invalid (RFC 4861 7.1.1: discarded). VIPs of DR and TUNNEL services are never
        used: their real servers hold those addresses on lo and drop a request from them as a martian, so the
        next hop would never resolve."""
        v = target.version
        held = {s.addr for s in self.services.values()
                if any(d.fwd in ("dr", "tunnel") for d in s.dests.values())}
        r = self.route_lookup(target)
        if r is not None and r.src is not None and r.src.version == v and r.src not in held:
            return r.src
        other = None
        for ad in self.addrs:
            if ad.ifname == ifname and ad.addr.version == v and ad.addr not in held:
                if target in ipaddress.ip_network(f"{ad.addr}/{ad.prefixlen}", strict=False):
                    return ad.addr
                other = other or ad.addr
        if other is not None:
            return other
        for svc in self.services.values():
            for la in svc.laddrs:
                if la.ifname == ifname and la.addr.version == v and la.addr not in held:
                    return la.addr
        if v == 6 and ifname in self.ifaces:
            return link_local(self.ifaces[ifname].mac)
        return ipaddress.ip_address("0.0.0.0" if v == 4 else "::")

    SNAT_PROBE_RANGE = 256  # a SNAT dst-range this small has each of its next hops resolved ahead
    WANTED_STALE_ABOVE_S = 0.005  # wanted_nexthops() walks cheaper than this are never served stale

    def wanted_nexthops(self) -> dict:
        """Next hop -> egress interface of what new flows will need a MAC for, to resolve ahead of them (the
        daemon's ARP/NS probes, or the slow path's): every real server's next hop; for SNAT services, the
        gateways of the routes on their oif (any interface without one), where traffic to the outside goes,
        and the next hops of a small dst-range. Other directly connected outside hosts are learned when they
        speak (ARP seen by XDP, the kernel's table, the slow path's queue). The result is shared between calls
        until the model changes: read it, do not modify it."""
        key = (self._wgen, self._route_gen)
        if self._wanted is not None and self._wanted[0] == key:  # the slow path asks 4 times a second
            return self._wanted[1]
        t0 = time.perf_counter()
        # A big model costs more to walk (50 ms at 100k real servers) and a bulk load changes it with every
        # request: then the previous answer serves for up to 20 walks' time (at most 2 s), so the walks stay a
        # small share of the load; new servers' next hops are resolved that much later (a flow that needs one
        # first waits in the slow path's queue). Small models are always answered fresh.
        if (self._wanted is not None and self.wanted_cost >= self.WANTED_STALE_ABOVE_S
                and t0 - self._wanted_at < min(20 * self.wanted_cost, 2.0)):
            return self._wanted[1]
        # Asked after every change (the resolvers' kick): with 100k real servers, one is_local() scan of every
        # service per next hop took 35 s, and a walk of every service with its next hops cached 33 ms at 10k x 10
        # (60k next hops), 5 % of a daemon taking 10k REST PUTs. The union of the services' next hops is kept up to
        # date instead: only services whose real servers were added or removed since the last answer (_wdirty)
        # are counted again, and all of them only when a route or an interface changed. A real server's next hop
        # is remembered per address until a route changes (one lookup for one shared by many services). Local
        # addresses are taken out of the union at the end.
        gen = (self._route_gen, tuple(self.ifaces))
        if self._nh_gen != gen:
            self._nh_cache, self._nh_gen = {}, gen
        if self._wunion is None or self._wunion_gen != gen:
            self._wunion, self._wbase, self._wcounted, self._wunion_gen = {}, {}, {}, gen
            todo = list(self.services.values())
        else:
            todo = list(self._wdirty.values())
        self._wdirty = {}
        for s in todo:
            old = self._wcounted.pop(id(s), None)
            if old is not None:
                self._wanted_count(old[1], -1)
            if s.match is None and self.services.get(s.key) is s:
                part = self._service_nexthops(s.dests.values())
                self._wcounted[id(s)] = (s, part)
                self._wanted_count(part, 1)
        want = dict(self._wbase)
        local = [a for a, (flags, _) in self._local_index().items() if flags & (LOCAL_IFADDR | LOCAL_LADDR)]

        def add(nh, ifname):
            if ifname in self.ifaces and not nh.is_unspecified:
                want[nh] = ifname

        for svc in self.snat_order:
            m = svc.match
            for via, ifname in self._gateways:
                if via.version == 4 and m.oif in (None, ifname):
                    add(via, ifname)
            if m.dst is not None and int(m.dst[1]) - int(m.dst[0]) < self.SNAT_PROBE_RANGE:
                for i in range(int(m.dst[0]), int(m.dst[1]) + 1):
                    nh = self.nexthop(ipaddress.IPv4Address(i))
                    if nh and m.oif in (None, nh[1]):
                        add(*nh)
        for nh in [nh for nh in local if nh in want]:
            del want[nh]
        self._wanted_at = time.perf_counter()
        self.wanted_cost = self._wanted_at - t0
        self._wanted = (key, want)
        return want

    def _wtouch(self, svc: Service) -> None:
        """svc's real servers are added or removed (or svc itself): wanted_nexthops() counts its next hops again."""
        if self._wunion is not None:
            self._wdirty[id(svc)] = svc

    def _wanted_count(self, part: dict, sign: int) -> None:
        """Count a service's next hops into wanted_nexthops()'s union (sign 1), or out of it (-1). A next hop
        stays in the answer while any counted service has it, on the interface it was first counted with while
        that one still counts."""
        union, base = self._wunion, self._wbase
        for nh, ifname in part.items():
            per = union.get(nh)
            if sign > 0:
                if per is None:
                    union[nh] = {ifname: 1}
                    base[nh] = ifname
                else:
                    per[ifname] = per.get(ifname, 0) + 1
                continue
            n = per[ifname] - 1
            if n:
                per[ifname] = n
                continue
            del per[ifname]
            if not per:
                del union[nh], base[nh]
            elif base[nh] == ifname:
                base[nh] = next(iter(per))

    def _service_nexthops(self, dests) -> dict:
        """Next hop -> interface of these real servers (wanted_nexthops, before local addresses are taken out)."""
        cache, out = self._nh_cache, {}
        self.index_routes()
        for d in dests:
            addr = d.addr
            nh = cache.get(addr, cache)
            if nh is cache:  # the verdict is remembered with the next hop (same routes and interfaces)
                nh = self.nexthop(addr)
                if not (nh and nh[0].version == addr.version and nh[1] in self.ifaces and not nh[0].is_unspecified):
                    nh = None
                cache[addr] = nh
            if nh is not None:
                out[nh[0]] = nh[1]
        return out

    # --- neighbours -----------------------------------------------------------------------------
    def neigh_add(self, a: dict) -> Neigh:
        addr = unicast(ip(a.get("addr")), "neighbour address")
        ll = a.get("lladdr")
        # six hex pairs (one digit each also taken, as ip neigh does): int(x, 16) alone also reads "+2", "1_0",
        # " 1" and "01\n"
        if not isinstance(ll, str) or not _MAC.fullmatch(ll):
            raise invalid(f"invalid lladdr {ll!r}")
        mac = bytes(int(x, 16) for x in ll.split(":"))
        ifc = self.iface(a.get("ifname"))
        n = Neigh(addr=addr, lladdr=mac, ifname=ifc.name)
        self.neighs[addr] = n
        self.dp.neigh_set(n, ifc.ifindex)
        return n

    def neigh_del(self, a: dict) -> None:
        addr = ip(a.get("addr"))
        # A device given names the entry's interface (`dpip neigh del ADDR dev IF`): it was ignored, so a wrong or
        # unknown one removed the entry of another interface and said nothing. Checked as neigh_add checks it.
        ifc = self.iface(a["ifname"]) if a.get("ifname") is not None else None
        if addr not in self.neighs:
            raise notfound(f"neighbour {addr} not found")
        if ifc is not None and self.neighs[addr].ifname != ifc.name:
            raise notfound(f"neighbour {addr} not found on {ifc.name} (it is on {self.neighs[addr].ifname})")
        del self.neighs[addr]
        self.dp.neigh_del(addr)



# --- persistence: what a restarted daemon needs to adopt the running fast path --------------------------
def snapshot(b: Balancer) -> dict:
    """The whole model as plain data, with the ids, slots and hash cells the fast path's maps are indexed by."""
    return {"version": 1, "services": [_service_row(b, v) for v in b.services.values()], "addrs": _addr_rows(b),
            "routes": [_route_row(r) for r in b.routes], "neighs": _neigh_rows(b),
            "retired_laddrs": _retired_rows(b)}


def _retired_rows(b: Balancer) -> list:
    return [{"addr": ip_str(a), "ifname": ifname} for a, ifname in b.retired_laddrs.items()]


def _addr_rows(b: Balancer) -> list:
    return [{"addr": ip_str(a.addr), "prefixlen": a.prefixlen, "ifname": a.ifname, "scope": a.scope,
             "sapool": a.sapool} for a in b.addrs]


def _neigh_rows(b: Balancer) -> list:
    return [{"addr": ip_str(n.addr), "lladdr": n.lladdr.hex(), "ifname": n.ifname} for n in b.neighs.values()]


def _service_row(b: Balancer, v: Service) -> dict:
    s = ip_str
    return {
        "proto": v.proto, "addr": s(v.addr), "port": v.port, "sched": v.sched, "svc_id": v.svc_id,
        "persistent": v.persistent, "netmask": v.netmask, "flags": list(v.flags), "sched_gen": v.sched_gen,
        "sched_params": dict(v.sched_params), "match": v.match.as_dict() if v.match else None,
        "hcells": list(v.hcells) if v.hcells else None,
        "own_vip": v.own_vip, "config_owned": v.key in b.config_owned,
        "dests": [{"addr": s(d.addr), "port": d.port, "fwd": d.fwd, "weight": d.weight, "slot": d.slot,
                   "u_threshold": d.u_threshold, "l_threshold": d.l_threshold, "health": d.health,
                   "health_weight": d.health_weight, "reason": d.reason, "sorry": d.sorry, "held": d.held,
                   "inhibited": d.inhibited}
                  for d in v.dests.values()],
        "laddrs": [{"addr": s(la.addr), "ifname": la.ifname} for la in v.laddrs],
    }


# Every value a service's row (_service_row) is made from; rows are reused while these compare equal.
_SVC_STATE = operator.attrgetter("proto", "addr", "port", "sched", "svc_id", "persistent", "netmask", "sched_gen",
                                 "own_vip", "match", "hcells")
_DEST_STATE = operator.attrgetter("addr", "port", "fwd", "weight", "slot", "u_threshold", "l_threshold", "health",
                                  "health_weight", "reason", "sorry", "held", "inhibited")
_LADDR_STATE = operator.attrgetter("addr", "ifname")


def _packed_service(b: Balancer, v: Service, pk) -> bytes:
    """msgpack.packb(_service_row(b, v)), kept on the service with every value the row was made from and reused
    while they compare equal: the state file is written after every change, and at 10k services x 10 real servers
    making and packing every row took 240 ms each time; comparing them takes ~40 ms (the real servers' values are
    gathered and compared by C loops). Whatever path changed a field, the row is made anew."""
    owned = b.config_owned  # (a service's key is hashed only when some are owned: ipvsadm- and REST-made)
    state = (_SVC_STATE(v), tuple(v.flags), tuple(v.sched_params.items()), bool(owned) and v.key in owned,
             list(map(_LADDR_STATE, v.laddrs)), list(map(_DEST_STATE, v.dests.values())))
    c = v.__dict__.get("_packed")
    if c is None or c[0] != state:
        c = v.__dict__["_packed"] = (state, pk.pack(_service_row(b, v)))
    return c[1]


def pack_snapshot(b: Balancer, extra: dict | None = None) -> bytes:
    """msgpack.packb(dict(snapshot(b), **extra)), byte for byte, with what has not changed since the last call
    reused: each service's row (_packed_service), and each route's (_packed_routes)."""
    import msgpack

    pk = msgpack.Packer(use_bin_type=True)
    parts = {"version": pk.pack(1),
             "services": b"".join([pk.pack_array_header(len(b.services)),
                                   *(_packed_service(b, v, pk) for v in b.services.values())]),
             "addrs": pk.pack(_addr_rows(b)), "routes": _packed_routes(b, pk), "neighs": pk.pack(_neigh_rows(b)),
             "retired_laddrs": pk.pack(_retired_rows(b))}
    parts.update((k, pk.pack(v)) for k, v in (extra or {}).items())
    return b"".join([pk.pack_map_header(len(parts)), *(pk.pack(k) + v for k, v in parts.items())])


def _route_row(r: Route) -> dict:
    s = ip_str
    return {"net": str(r.net), "ifname": r.ifname, "via": s(r.via) if r.via else None,
            "src": s(r.src) if r.src else None, "mtu": r.mtu, "metric": r.metric, "scope": r.scope,
            "proto": r.proto, "local": r.local}


def _packed_routes(b: Balancer, pk) -> bytes:
    """The routes part of snapshot(), packed, byte for byte: reused while no route changed (every change bumps
    _route_gen), and otherwise made of each route's own packed row, kept on the (frozen) Route. A change among
    100k routes made and packed every row again for the next save: 175-300 ms of the event loop, now the changed
    rows and one join (~10 MB kept)."""
    c = b._routes_packed
    if c is not None and c[0] == b._route_gen and c[1] is b.routes:
        return c[2]
    parts = [pk.pack_array_header(len(b.routes))]
    for r in b.routes:
        row = r.__dict__.get("_packed")
        if row is None:
            row = r.__dict__["_packed"] = pk.pack(_route_row(r))
        parts.append(row)
    out = b"".join(parts)
    b._routes_packed = (b._route_gen, b.routes, out)
    return out


def _saved_dest_ok(d: dict) -> None:
    """A saved real server's fields the model checks when it builds tables (_dest_opts' checks): checked on the
    check-only restore too, so a bad one refuses the start before anything is opened, not half way through the
    real restore."""
    where = f"real server {d.get('addr')}"
    _uint(d.get("weight"), f"{where}: weight", MAX_WEIGHT)
    _uint(d.get("port"), f"{where}: port", 65535)
    _uint(d.get("slot"), f"{where}: slot", 0xFFFFFFFE)
    _uint(d.get("u_threshold"), f"{where}: u_threshold")
    _uint(d.get("l_threshold"), f"{where}: l_threshold")
    if d.get("health_weight") is not None:
        _uint(d.get("health_weight"), f"{where}: health_weight", MAX_WEIGHT)
    if d.get("fwd") not in FWD_MODES:
        raise invalid(f"{where}: forwarding method {d.get('fwd')!r} is not one of {', '.join(FWD_MODES)}")


def restore(b: Balancer, snap: dict, tables: bool = True) -> None:
    """Rebuild the model from a snapshot and rewrite every map entry it owns (idempotent for pinned maps).

    Ids, slots and SNAT rule order are kept, so connections in the pinned conn table keep pointing at the right
    real server and counters. Hash tables the previous daemon wrote stay reserved where they are and are then
    rebuilt beside themselves and swapped, as any rebuild is. tables=False (a dry run's scratch model) only
    reserves them. Interfaces are matched by name; one that no longer exists makes the restore fail whole.
    """
    if snap.get("version") != 1:
        raise invalid(f"unsupported state version {snap.get('version')!r}")
    A = ipaddress.ip_address
    for name in {la["ifname"] for v in snap["services"] for la in v["laddrs"]} | \
            {a["ifname"] for a in snap["addrs"]} | {r["ifname"] for r in snap["routes"]} | \
            {n["ifname"] for n in snap["neighs"]} | \
            {v["match"][k] for v in snap["services"] if v.get("match") for k in ("iif", "oif") if v["match"].get(k)}:
        b.iface(name)
    for v in snap["services"]:
        match = b.parse_match(v["match"]) if v.get("match") else None
        svc = Service(proto=v["proto"], addr=A(v["addr"]), port=v["port"], sched=v["sched"], svc_id=v["svc_id"],
                      persistent=v["persistent"], netmask=v["netmask"], flags=list(v["flags"]),
                      sched_gen=v["sched_gen"], own_vip=v.get("own_vip", False),
                      sched_params=dict(v.get("sched_params") or {}), match=match)
        if v.get("hcells"):
            b.cells.reserve(*v["hcells"])
            svc.hcells = tuple(v["hcells"])
        if v.get("config_owned"):
            b.config_owned.add(svc.key)
        for d in v["dests"]:
            _saved_dest_ok(d)
            dest = Dest(addr=A(d["addr"]), port=d["port"], fwd=d["fwd"], weight=d["weight"], slot=d["slot"],
                        u_threshold=d["u_threshold"], l_threshold=d["l_threshold"], health=d.get("health", "up"),
                        health_weight=d.get("health_weight"), reason=d.get("reason", ""), sorry=d.get("sorry", False),
                        held=d.get("held", False), inhibited=d.get("inhibited", False))
            svc.dests[(dest.addr, dest.port)] = dest
            b._slots_used.add(dest.slot)
        svc.laddrs = [Laddr(addr=A(la["addr"]), ifname=la["ifname"]) for la in v["laddrs"]]
        b._ids_used.add(svc.svc_id)
        b.services[svc.key] = svc
        if svc.sched in DYNAMIC_SCHEDS or any(d.u_threshold for d in svc.dests.values()):
            b._dyn_keys[svc.key] = None
        if match is not None:
            b.snat_order.append(svc)
    b.addrs = [Addr(addr=A(a["addr"]), prefixlen=a["prefixlen"], ifname=a["ifname"], scope=a["scope"],
                    sapool=a["sapool"]) for a in snap["addrs"]]
    b.routes, b._rindex, b._plens, b._gateways = [], {}, Counter(), Counter()
    for r in snap["routes"]:
        route = Route(net=ipaddress.ip_network(r["net"]), ifname=r["ifname"], via=A(r["via"]) if r["via"] else None,
                      src=A(r["src"]) if r["src"] else None, mtu=r["mtu"], metric=r["metric"], scope=r["scope"],
                      proto=r["proto"], local=r["local"])
        b.routes.append(route)
        b._rindex.setdefault(route.net, []).append(route)
        b._plens[(route.net.version, route.net.prefixlen)] += 1
        if route.via is not None and route.scope != "kni_host":
            b._gateways[(route.via, route.ifname)] += 1
    b._route_gen += 1
    b._lidx = None  # the addresses and services were replaced under it
    b._wunion = None
    b.neighs = {A(n["addr"]): Neigh(addr=A(n["addr"]), lladdr=bytes.fromhex(n["lladdr"]), ifname=n["ifname"])
                for n in snap["neighs"]}
    # (a model saved before there were any has none; one of an interface no longer attached is not kept)
    b.retired_laddrs = {A(r["addr"]): r["ifname"] for r in snap.get("retired_laddrs", ()) if r["ifname"] in b.ifaces}
    if not tables:
        return
    # Rewrite what the maps hold for this model: tables before the entries that lead packets to them.
    for svc in b.services.values():
        for d in svc.dests.values():
            b._dest_write(svc, d)
        b._push_laddrs(svc)
        b._commit(svc, b._plan(svc, counts={}), bump=False)
        b.dp.service_set(svc)
    for i, svc in enumerate(b.snat_order):
        b.dp.snat_rule_set(i, svc)
    b.dp.snat_count_set(len(b.snat_order))
    for i in range(len(b.snat_order), SNAT_RULES_MAX):
        b.dp.snat_rule_clear(i)
    for addr in b._local_index():
        b._write_local(addr)
    for net in {r.net for r in b.routes}:
        b._sync_route(net)
    for n in b.neighs.values():
        b.dp.neigh_set(n, b.ifaces[n.ifname].ifindex)
