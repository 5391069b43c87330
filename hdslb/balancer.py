"""The balancer's desired state and its invariants: services, real servers, local addresses, addresses, routes,
neighbours. No kernel calls: every change is validated first, then applied to the model and pushed through a
DataPath (the map writer in the daemon, a recorder in unit tests). A refused change leaves everything as it was.
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass, field
from typing import Protocol

from hdslb import sched
from hdslb.errors import HdslbError, exists, invalid, nospace, notfound

PROTOS = {"tcp": 6, "udp": 17}
FWD_MODES = ("fnat", "dr", "nat", "tunnel", "snat")
# Forwarding modes the fast path implements today; the rest are refused with a reason, never half-done.
FWD_SUPPORTED = ("fnat",)
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "sh", "dh", "mh", "conhash", "fo")
# Schedulers whose table is a ring the fast path walks with a per-CPU cursor; lc/wlc rings are rebuilt from
# live connection counts by the daemon (refresh_dynamic), so they lag by at most one refresh interval.
SCHED_SUPPORTED = ("rr", "wrr", "lc", "wlc", "fo")
DYNAMIC_SCHEDS = ("lc", "wlc")
DEFAULT_SCHED = "wlc"
ROUTE_SCOPES = ("host", "link", "global", "kni_host")
MAX_WEIGHT = 65535


def ip(s, what: str = "address"):
    try:
        return ipaddress.ip_address(s)
    except (ValueError, TypeError):
        raise invalid(f"invalid {what} {s!r}") from None


def port_of(v, what: str = "port") -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 65535:
        raise invalid(f"invalid {what} {v!r}")
    return v


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

    @property
    def eff_weight(self) -> int:
        """The weight scheduling uses: configured, unless health checking overrides it."""
        if self.health == "down":
            return 0
        return self.weight if self.health_weight is None else self.health_weight


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
    persistent: int | None = None
    netmask: str | None = None
    flags: list[str] = field(default_factory=list)
    dests: dict[tuple, Dest] = field(default_factory=dict)
    laddrs: list[Laddr] = field(default_factory=list)
    sched_gen: int = 0
    own_vip: bool = False  # declared in a config file: the balancer answers ARP for the VIP itself

    @property
    def key(self) -> tuple:
        return (self.proto, self.addr, self.port)


@dataclass
class Addr:
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    prefixlen: int
    ifname: str
    scope: str = "global"
    sapool: bool = False


@dataclass
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


class DataPath(Protocol):
    """What the model needs from the fast path; the daemon implements it over the BPF maps."""

    def service_set(self, svc: Service) -> None: ...
    def service_del(self, svc: Service) -> None: ...
    def dest_set(self, svc: Service, d: Dest) -> None: ...
    def dest_clear(self, d: Dest) -> None: ...
    def sched_set(self, svc: Service, slots: list[int]) -> None: ...
    def laddrs_set(self, svc: Service, laddrs: list[tuple]) -> None: ...
    def local_set(self, addr, flags: int, ifindex: int) -> None: ...
    def local_del(self, addr) -> None: ...
    def route_set(self, r: Route, ifindex: int) -> None: ...
    def route_del(self, net) -> None: ...
    def neigh_set(self, n: Neigh, ifindex: int) -> None: ...
    def neigh_del(self, addr) -> None: ...


# Why an address is ours (flags in local_map); an address stays local while any reason remains.
LOCAL_IFADDR, LOCAL_LADDR, LOCAL_SAPOOL, LOCAL_VIP = 0x1, 0x2, 0x4, 0x8


class Balancer:
    def __init__(self, dp: DataPath, ifaces: dict[str, Iface], max_services: int = 4096, max_dests: int = 65535,
                 ring_max: int = 1024):
        self.dp = dp
        self.ifaces = ifaces
        self.max_services = max_services
        self.max_dests = min(max_dests, 0xFFFF)  # 0xffff marks an empty ring slot
        self.ring_max = ring_max
        self.services: dict[tuple, Service] = {}
        self.addrs: list[Addr] = []
        self.routes: list[Route] = []
        self._rindex: dict[object, list[Route]] = {}  # net -> its routes: adds and syncs stay O(1) in bulk loads
        self.neighs: dict[object, Neigh] = {}
        self._slots_used: set[int] = set()
        self._ids_used: set[int] = set()
        # dest slot -> (active, inactive) connections, for lc/wlc; the daemon plugs in the fast path's view.
        self.conn_counts = lambda: {}
        self.config_owned: set[tuple] = set()  # service keys the config file declares (reload manages them)
        self._dyn_seen: dict[int, tuple] = {}  # svc id -> the conn counts its lc/wlc ring was built from

    # --- helpers --------------------------------------------------------------------------------
    def iface(self, name) -> Iface:
        if not isinstance(name, str) or name not in self.ifaces:
            known = ", ".join(sorted(self.ifaces)) or "none"
            raise HdslbError(errno.ENODEV, f"device {name!r} is not managed by this balancer (attached: {known})")
        return self.ifaces[name]

    def _alloc(self, used: set[int], limit: int, what: str) -> int:
        for i in range(limit):
            if i not in used:
                used.add(i)
                return i
        raise nospace(f"no free {what} (limit {limit})")

    def svc_key(self, a: dict) -> tuple:
        if not isinstance(a, dict):
            raise invalid("service must be given as {proto, addr, port}")
        proto = a.get("proto")
        if proto not in PROTOS:
            raise invalid(f"invalid protocol {proto!r} (tcp or udp)")
        return (proto, ip(a.get("addr"), "service address"), port_of(a.get("port"), "service port"))

    def get_service(self, a: dict) -> Service:
        key = self.svc_key(a)
        svc = self.services.get(key)
        if svc is None:
            raise HdslbError(errno.ESRCH, "No such service")
        return svc

    # --- services -------------------------------------------------------------------------------
    def _svc_opts(self, a: dict, current: Service | None = None) -> dict:
        """Options of an add, or of an edit (which changes only what it mentions, as DPVS edits by option)."""
        if current is not None:
            a = {"sched": current.sched, "persistent": current.persistent, "netmask": current.netmask,
                 "flags": current.flags} | {k: v for k, v in a.items() if v is not None}
        sch = a.get("sched") or DEFAULT_SCHED
        if sch not in SCHEDULERS:
            raise HdslbError(errno.ENOENT, f"Scheduler not found: {sch}")
        if sch not in SCHED_SUPPORTED:
            raise HdslbError(errno.EOPNOTSUPP, f"scheduler {sch} is not implemented by this fast path yet "
                                               f"(available: {', '.join(SCHED_SUPPORTED)})")
        pers = a.get("persistent")
        if pers is not None:
            raise HdslbError(errno.EOPNOTSUPP, "persistence (-p) is not implemented by this fast path yet")
        flags = a.get("flags") or []
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise invalid("flags must be a list of strings")
        return {"sched": sch, "persistent": pers, "netmask": a.get("netmask"), "flags": list(flags)}

    def service_add(self, a: dict) -> Service:
        key = self.svc_key(a)
        opts = self._svc_opts(a)
        if key in self.services:
            raise exists("Service already exists")
        if key[2] == 0:
            raise invalid("service port 0 is only meaningful for SNAT, which is not implemented yet")
        svc_id = self._alloc(self._ids_used, self.max_services, "service id")
        svc = Service(proto=key[0], addr=key[1], port=key[2], svc_id=svc_id, own_vip=bool(a.get("own_vip")), **opts)
        self.services[key] = svc
        self.dp.service_set(svc)
        self._resched(svc)
        if svc.own_vip:
            self._sync_local(svc.addr)
        return svc

    def service_edit(self, a: dict) -> Service:
        svc = self.get_service(a)
        opts = self._svc_opts(a, current=svc)
        svc.sched, svc.persistent, svc.netmask, svc.flags = opts["sched"], opts["persistent"], opts["netmask"], opts["flags"]
        self._resched(svc)
        return svc

    def service_del(self, a: dict) -> None:
        svc = self.get_service(a)
        self._remove_service(svc)

    def _remove_service(self, svc: Service) -> None:
        self.dp.service_del(svc)
        for d in svc.dests.values():
            self.dp.dest_clear(d)
            self._slots_used.discard(d.slot)
        laddrs = list(svc.laddrs)
        svc.laddrs.clear()
        del self.services[svc.key]
        self.config_owned.discard(svc.key)
        self._ids_used.discard(svc.svc_id)
        for la in laddrs:
            self._sync_local(la.addr)
        if svc.own_vip:
            self._sync_local(svc.addr)

    def service_flush(self) -> None:
        for svc in list(self.services.values()):
            self._remove_service(svc)

    # --- real servers ---------------------------------------------------------------------------
    def _dest_opts(self, a: dict, svc: Service, current: Dest | None) -> dict:
        fwd = a.get("fwd") or (current.fwd if current else "fnat")
        if fwd not in FWD_MODES:
            raise invalid(f"invalid forwarding method {fwd!r}")
        if fwd not in FWD_SUPPORTED:
            raise HdslbError(errno.EOPNOTSUPP, f"forwarding method {fwd} is not implemented by this fast path yet "
                                               f"(available: {', '.join(FWD_SUPPORTED)})")
        weight = a.get("weight", current.weight if current else 1)
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
            raise invalid(f"illegal weight specified: {weight!r}")
        out = {"fwd": fwd, "weight": weight}
        for k in ("u_threshold", "l_threshold"):
            v = a.get(k, getattr(current, k) if current else 0)
            if not isinstance(v, int) or v < 0:
                raise invalid(f"illegal {k} specified: {v!r}")
            out[k] = v
        return out

    def _dest_key(self, svc: Service, a: dict) -> tuple:
        addr = ip(a.get("addr"), "real server address")
        if addr.version != svc.addr.version:
            raise HdslbError(errno.EOPNOTSUPP, "real server and service address families differ (NAT64 is not implemented yet)")
        port = a.get("port")
        port = svc.port if port in (None, 0) else port_of(port, "real server port")
        return (addr, port)

    def dest_add(self, a: dict) -> Dest:
        svc = self.get_service(a.get("svc"))
        key = self._dest_key(svc, a)
        if key in svc.dests:
            raise exists("Destination already exists")
        opts = self._dest_opts(a, svc, None)
        slot = self._alloc(self._slots_used, self.max_dests, "real server slot")
        d = Dest(addr=key[0], port=key[1], slot=slot, **opts)
        svc.dests[key] = d
        self.dp.dest_set(svc, d)
        self._resched(svc)
        return d

    def dest_edit(self, a: dict) -> Dest:
        svc = self.get_service(a.get("svc"))
        key = self._dest_key(svc, a)
        d = svc.dests.get(key)
        if d is None:
            raise notfound("No such destination")
        opts = self._dest_opts(a, svc, d)
        for k, v in opts.items():
            setattr(d, k, v)
        self.dp.dest_set(svc, d)
        self._resched(svc)
        return d

    def dest_del(self, a: dict) -> None:
        svc = self.get_service(a.get("svc"))
        key = self._dest_key(svc, a)
        d = svc.dests.pop(key, None)
        if d is None:
            raise notfound("No such destination")
        # Table first, then the slot: no new flow can pick a slot that is about to be cleared.
        self._resched(svc)
        self.dp.dest_clear(d)
        self._slots_used.discard(d.slot)

    def _resched(self, svc: Service) -> None:
        counts = self.conn_counts() if svc.sched in DYNAMIC_SCHEDS else {}
        dests = [sched.Dest(slot_id=d.slot, weight=d.eff_weight, addr=d.addr, port=d.port,
                            active=counts.get(d.slot, (0, 0))[0], inactive=counts.get(d.slot, (0, 0))[1])
                 for d in svc.dests.values()]
        table = sched.build_table(svc.sched, dests, max_len=self.ring_max)
        svc.sched_gen += 1
        self.dp.sched_set(svc, table.entries)

    def dest_health(self, a: dict, up: bool, weight: int | None, reason: str) -> Dest:
        """A health checker's verdict: down servers get no new flows (existing ones continue, as in LVS)."""
        svc = self.get_service(a.get("svc"))
        d = svc.dests.get(self._dest_key(svc, a))
        if d is None:
            raise notfound("No such destination")
        d.health = "up" if up else "down"
        d.health_weight = weight if up else None
        d.reason = "" if up else reason
        self.dp.dest_set(svc, d)
        self._resched(svc)
        return d

    def refresh_dynamic(self) -> None:
        """Rebuild the rings of schedulers that depend on live connection counts, where the counts moved."""
        counts = None
        for svc in self.services.values():
            if svc.sched in DYNAMIC_SCHEDS and svc.dests:
                counts = self.conn_counts() if counts is None else counts
                seen = tuple(counts.get(d.slot, (0, 0)) for d in svc.dests.values())
                if seen != self._dyn_seen.get(svc.svc_id):
                    self._dyn_seen[svc.svc_id] = seen
                    self._resched(svc)

    # --- local addresses (FNAT sources) ---------------------------------------------------------
    def laddr_add(self, a: dict) -> Laddr:
        svc = self.get_service(a.get("svc"))
        addr = ip(a.get("addr"), "local address")
        ifc = self.iface(a.get("ifname"))
        if addr.version != svc.addr.version:
            raise HdslbError(errno.EOPNOTSUPP, "local address family differs from the service's")
        if any(la.addr == addr for la in svc.laddrs):
            raise exists("Local address already exists")
        if len(svc.laddrs) >= 16:
            raise nospace("too many local addresses for one service (16)")
        la = Laddr(addr=addr, ifname=ifc.name)
        svc.laddrs.append(la)
        self._push_laddrs(svc)
        self._sync_local(addr)
        return la

    def laddr_del(self, a: dict) -> None:
        svc = self.get_service(a.get("svc"))
        addr = ip(a.get("addr"), "local address")
        for la in svc.laddrs:
            if la.addr == addr:
                svc.laddrs.remove(la)
                self._push_laddrs(svc)
                self._sync_local(addr)
                return
        raise notfound("No such local address")

    def _push_laddrs(self, svc: Service) -> None:
        self.dp.laddrs_set(svc, [(la.addr, self.ifaces[la.ifname].ifindex) for la in svc.laddrs])

    def local_reasons(self, addr) -> tuple[int, int]:
        """(LOCAL_* flags, ifindex) saying why `addr` is ours; (0, 0) when it is not. ifindex 0 with flags set
        means every attached interface (a config-declared VIP). The fast path's local_map and the slow path's
        ARP/ND answers both follow this one rule."""
        flags, ifindex = 0, 0
        for ad in self.addrs:
            if ad.addr == addr:
                flags |= LOCAL_IFADDR | (LOCAL_SAPOOL if ad.sapool else 0)
                ifindex = self.ifaces[ad.ifname].ifindex
        for svc in self.services.values():
            for la in svc.laddrs:
                if la.addr == addr:
                    flags |= LOCAL_LADDR
                    ifindex = ifindex or self.ifaces[la.ifname].ifindex
            if svc.own_vip and svc.addr == addr:
                flags |= LOCAL_VIP
        return flags, ifindex

    def _sync_local(self, addr) -> None:
        """Write (or remove) addr's local_map entry from local_reasons."""
        flags, ifindex = self.local_reasons(addr)
        if flags:
            self.dp.local_set(addr, flags, ifindex)
        else:
            self.dp.local_del(addr)

    def is_local(self, addr) -> bool:
        return any(ad.addr == addr for ad in self.addrs) or any(
            la.addr == addr for s in self.services.values() for la in s.laddrs)

    # --- interface addresses (dpip addr) --------------------------------------------------------
    def addr_add(self, a: dict) -> Addr:
        addr = ip(a.get("addr"))
        plen = a.get("prefixlen", addr.max_prefixlen)
        if not isinstance(plen, int) or not 0 <= plen <= addr.max_prefixlen:
            raise invalid(f"invalid prefix length {plen!r}")
        ifc = self.iface(a.get("ifname"))
        scope = a.get("scope") or "global"
        if scope not in ("global", "link", "host"):
            raise invalid(f"invalid scope {scope!r}")
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
        for ad in self.addrs:
            if ad.addr == addr and (a.get("ifname") in (None, ad.ifname)):
                self._remove_addr(ad)
                return
        raise HdslbError(errno.EADDRNOTAVAIL, f"address {addr} not found")

    def _remove_addr(self, ad: Addr) -> None:
        self.addrs.remove(ad)
        self._sync_local(ad.addr)
        gone = [r for r in self.routes if r.ifname == ad.ifname and (
            (r.local and r.net.network_address == ad.addr) or (not r.local and r.src == ad.addr))]
        for r in gone:
            self._route_remove(r)

    def addr_flush(self, a: dict) -> None:
        ifname = a.get("ifname")
        if ifname is not None:
            self.iface(ifname)
        for ad in [ad for ad in self.addrs if ifname in (None, ad.ifname)]:
            self._remove_addr(ad)

    # --- routes ---------------------------------------------------------------------------------
    def _route_from(self, a: dict, any_dev: bool = False) -> Route:
        prefix = a.get("prefix")
        plen = a.get("prefixlen")
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
        via = ip(via, "gateway") if via not in (None, "", "0.0.0.0", "::") else None
        src = a.get("src")
        src = ip(src, "source") if src not in (None, "", "0.0.0.0", "::") else None
        for x in (via, src):
            if x is not None and x.version != net.version:
                raise invalid(f"{x} does not match the family of {net}")
        scope = a.get("scope") or ("global" if via else "link")
        if scope not in ROUTE_SCOPES:
            raise invalid(f"invalid scope {scope!r} ({', '.join(ROUTE_SCOPES)})")
        mtu = a.get("mtu") or 0
        metric = a.get("metric") or 0
        for name, v in (("mtu", mtu), ("metric", metric)):
            if not isinstance(v, int) or v < 0:
                raise invalid(f"invalid {name} {v!r}")
        return Route(net=net, ifname=ifname, via=via, src=src, mtu=mtu, metric=metric, scope=scope, proto="auto")

    def _route_insert(self, r: Route) -> None:
        self.routes.append(r)
        self._rindex.setdefault(r.net, []).append(r)
        self._sync_route(r.net)

    def _route_remove(self, r: Route) -> None:
        self.routes.remove(r)
        same = self._rindex.get(r.net, [])
        same.remove(r)
        if not same:
            self._rindex.pop(r.net, None)
        self._sync_route(r.net)

    def route_add(self, a: dict) -> Route:
        r = self._route_from(a)
        if any(x.metric == r.metric and not x.local for x in self._rindex.get(r.net, ())):
            raise exists(f"route {r.net} metric {r.metric} already exists")
        self._route_insert(r)
        return r

    def route_set(self, a: dict) -> Route:
        r = self._route_from(a)
        for x in self._rindex.get(r.net, ()):
            if not x.local and x.metric == r.metric:
                self._route_remove(x)
                self._route_insert(r)
                return r
        raise notfound(f"route {r.net} not found")

    def route_del(self, a: dict) -> None:
        r = self._route_from(a, any_dev=True)  # DPVS deletes by prefix; dev narrows it when given
        for x in list(self._rindex.get(r.net, ())):
            if not x.local and r.ifname in (None, x.ifname) and (r.via is None or x.via == r.via) and (
                    not a.get("metric") or x.metric == r.metric):
                self._route_remove(x)
                return
        raise HdslbError(errno.ESRCH, f"route {r.net}{' dev ' + r.ifname if r.ifname else ''} not found")

    def route_flush(self, a: dict) -> None:
        af = a.get("af")
        for x in [x for x in self.routes if not x.local and (af in (None, x.net.version))]:
            self._route_remove(x)

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
        best = None
        for r in self.routes:
            if addr in r.net and (best is None or (r.net.prefixlen, -r.metric) > (best.net.prefixlen, -best.metric)):
                best = r
        return best

    def nexthop(self, addr):
        """(next hop address, interface name) for reaching `addr`, or None when no route covers it."""
        r = self.route_lookup(addr)
        if r is None:
            return None
        return (r.via or addr, r.ifname)

    # --- neighbours -----------------------------------------------------------------------------
    def neigh_add(self, a: dict) -> Neigh:
        addr = ip(a.get("addr"))
        ll = a.get("lladdr")
        try:
            mac = bytes(int(x, 16) for x in str(ll).split(":"))
            if len(mac) != 6:
                raise ValueError
        except ValueError:
            raise invalid(f"invalid lladdr {ll!r}") from None
        ifc = self.iface(a.get("ifname"))
        n = Neigh(addr=addr, lladdr=mac, ifname=ifc.name)
        self.neighs[addr] = n
        self.dp.neigh_set(n, ifc.ifindex)
        return n

    def neigh_del(self, a: dict) -> None:
        addr = ip(a.get("addr"))
        if addr not in self.neighs:
            raise notfound(f"neighbour {addr} not found")
        del self.neighs[addr]
        self.dp.neigh_del(addr)


# --- persistence: what a restarted daemon needs to adopt the running fast path --------------------------
def snapshot(b: Balancer) -> dict:
    """The whole model as plain data, with the ids and slots the fast path's maps are indexed by."""
    s = str
    return {
        "version": 1,
        "services": [{
            "proto": v.proto, "addr": s(v.addr), "port": v.port, "sched": v.sched, "svc_id": v.svc_id,
            "persistent": v.persistent, "netmask": v.netmask, "flags": list(v.flags), "sched_gen": v.sched_gen,
            "own_vip": v.own_vip, "config_owned": v.key in b.config_owned,
            "dests": [{"addr": s(d.addr), "port": d.port, "fwd": d.fwd, "weight": d.weight, "slot": d.slot,
                       "u_threshold": d.u_threshold, "l_threshold": d.l_threshold, "health": d.health,
                       "health_weight": d.health_weight, "reason": d.reason, "sorry": d.sorry}
                      for d in v.dests.values()],
            "laddrs": [{"addr": s(la.addr), "ifname": la.ifname} for la in v.laddrs],
        } for v in b.services.values()],
        "addrs": [{"addr": s(a.addr), "prefixlen": a.prefixlen, "ifname": a.ifname, "scope": a.scope,
                   "sapool": a.sapool} for a in b.addrs],
        "routes": [{"net": s(r.net), "ifname": r.ifname, "via": s(r.via) if r.via else None,
                    "src": s(r.src) if r.src else None, "mtu": r.mtu, "metric": r.metric, "scope": r.scope,
                    "proto": r.proto, "local": r.local} for r in b.routes],
        "neighs": [{"addr": s(n.addr), "lladdr": n.lladdr.hex(), "ifname": n.ifname} for n in b.neighs.values()],
    }


def restore(b: Balancer, snap: dict) -> None:
    """Rebuild the model from a snapshot and rewrite every map entry it owns (idempotent for pinned maps).

    Ids and slots are kept, so connections in the pinned conn table keep pointing at the right real server
    and counters. Interfaces are matched by name; one that no longer exists makes the restore fail whole.
    """
    if snap.get("version") != 1:
        raise invalid(f"unsupported state version {snap.get('version')!r}")
    A = ipaddress.ip_address
    for name in {la["ifname"] for v in snap["services"] for la in v["laddrs"]} | \
            {a["ifname"] for a in snap["addrs"]} | {r["ifname"] for r in snap["routes"]} | \
            {n["ifname"] for n in snap["neighs"]}:
        b.iface(name)
    for v in snap["services"]:
        svc = Service(proto=v["proto"], addr=A(v["addr"]), port=v["port"], sched=v["sched"], svc_id=v["svc_id"],
                      persistent=v["persistent"], netmask=v["netmask"], flags=list(v["flags"]),
                      sched_gen=v["sched_gen"], own_vip=v.get("own_vip", False))
        if v.get("config_owned"):
            b.config_owned.add(svc.key)
        for d in v["dests"]:
            dest = Dest(addr=A(d["addr"]), port=d["port"], fwd=d["fwd"], weight=d["weight"], slot=d["slot"],
                        u_threshold=d["u_threshold"], l_threshold=d["l_threshold"], health=d.get("health", "up"),
                        health_weight=d.get("health_weight"), reason=d.get("reason", ""), sorry=d.get("sorry", False))
            svc.dests[(dest.addr, dest.port)] = dest
            b._slots_used.add(dest.slot)
        svc.laddrs = [Laddr(addr=A(la["addr"]), ifname=la["ifname"]) for la in v["laddrs"]]
        b._ids_used.add(svc.svc_id)
        b.services[svc.key] = svc
    b.addrs = [Addr(addr=A(a["addr"]), prefixlen=a["prefixlen"], ifname=a["ifname"], scope=a["scope"],
                    sapool=a["sapool"]) for a in snap["addrs"]]
    b.routes, b._rindex = [], {}
    for r in snap["routes"]:
        route = Route(net=ipaddress.ip_network(r["net"]), ifname=r["ifname"], via=A(r["via"]) if r["via"] else None,
                      src=A(r["src"]) if r["src"] else None, mtu=r["mtu"], metric=r["metric"], scope=r["scope"],
                      proto=r["proto"], local=r["local"])
        b.routes.append(route)
        b._rindex.setdefault(route.net, []).append(route)
    b.neighs = {A(n["addr"]): Neigh(addr=A(n["addr"]), lladdr=bytes.fromhex(n["lladdr"]), ifname=n["ifname"])
                for n in snap["neighs"]}
    # Rewrite what the maps hold for this model (tables, dests, locals, routes, static neighbours).
    for svc in b.services.values():
        b.dp.service_set(svc)
        for d in svc.dests.values():
            b.dp.dest_set(svc, d)
        b._push_laddrs(svc)
        b.dp.sched_set(svc, sched.build_table(svc.sched, [
            sched.Dest(slot_id=d.slot, weight=d.eff_weight, addr=d.addr, port=d.port) for d in svc.dests.values()],
            max_len=b.ring_max).entries)
    for addr in {a.addr for a in b.addrs} | {la.addr for v in b.services.values() for la in v.laddrs} | \
            {v.addr for v in b.services.values() if v.own_vip}:
        b._sync_local(addr)
    for net in {r.net for r in b.routes}:
        b._sync_route(net)
    for n in b.neighs.values():
        b.dp.neigh_set(n, b.ifaces[n.ifname].ifindex)
