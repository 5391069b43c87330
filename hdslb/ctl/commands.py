"""The control operations, named noun.verb, registered in one table. The socket server and (later) REST call these.

Each command takes the daemon context and an args map, validates through the balancer model (which refuses
bad input before changing anything) and returns plain data (msgpack-able).
"""

from __future__ import annotations

import asyncio
import errno
from typing import Callable

from hdslb import __version__
from hdslb.config.model import LVS_TIMEOUTS, MAX_TIMEOUT_S
from hdslb.errors import HdslbError, invalid
from hdslb.net.link import link_facts

COMMANDS: dict[str, Callable] = {}

IPVS_VERSION = "1.2.1"  # what ipvsadm prints in its header; we speak its protocol


def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn
    return deco


READ_ONLY_SUFFIXES = (".list", ".get", ".status")


def is_read_only(op: str) -> bool:
    return op.endswith(READ_ONLY_SUFFIXES)


def dispatch(ctx, op: str, args: dict):
    fn = COMMANDS.get(op)
    if fn is None:
        raise HdslbError(errno.EOPNOTSUPP, f"unknown operation {op!r}")
    check_keys(op, args)
    return fn(ctx, args)


_SVC = ("proto", "addr", "port", "match")
_SVC_OPTS = _SVC + ("sched", "flags", "sched_params", "persistent", "netmask", "own_vip")
_DEST = ("svc", "addr", "port", "fwd", "weight", "u_threshold", "l_threshold")
_ROUTE = ("af", "prefix", "prefixlen", "via", "src", "ifname", "mtu", "metric", "scope")
# The arguments each op reads. Any other is refused naming it: a misspelt key (check.add's "type" for "kind",
# dest.add's "weigth") would otherwise be dropped in silence and the op run with the default in its place.
_SVC_KEYS = frozenset(_SVC)
ARG_KEYS: dict[str, frozenset] = {op: frozenset(keys) for op, keys in {
    "service.add": _SVC_OPTS, "service.edit": _SVC_OPTS, "service.set": _SVC_OPTS, "service.del": _SVC,
    "service.flush": (), "service.list": ("svc", "brief", "laddr_conns"), "stats.zero": ("svc",),
    "dest.add": _DEST, "dest.edit": _DEST, "dest.set": _DEST, "dest.del": ("svc", "addr", "port"),
    "laddr.add": ("svc", "addr", "ifname"), "laddr.del": ("svc", "addr", "ifname"), "laddr.list": ("svc",),
    "addr.add": ("addr", "prefixlen", "ifname", "scope", "sapool"), "addr.del": ("addr", "prefixlen", "ifname"),
    "addr.flush": ("ifname",), "addr.list": ("ifname", "af"),
    "route.add": _ROUTE, "route.set": _ROUTE, "route.del": _ROUTE, "route.flush": ("af",),
    "route.list": ("af", "ifname"),
    "neigh.add": ("addr", "lladdr", "ifname"), "neigh.del": ("addr", "ifname"), "neigh.list": ("ifname", "af"),
    "link.list": ("ifname",), "batch": ("ops", "dry_run"),
    "timeouts.get": (), "stats.get": (),  # (timeouts.set names its unknown timeout itself)
    "conn.list": ("limit", "offset", "cursor", "inbound", "shared", "templates_only"),
    "daemon.status": (), "daemon.reload_datapath": (), "daemon.shutdown": ("detach",),
    "config.reload": ("text",), "config.get": (),
    "check.add": ("svc", "addr", "port", "kind", "params", "delay_loop", "inhibit_on_failure"),
    "check.del": ("svc", "addr", "port"), "health.list": (),
}.items()}


def check_keys(op: str, args) -> None:
    keys = ARG_KEYS.get(op)
    if keys is None or not isinstance(args, dict):
        return
    if not keys.issuperset(args):  # (one C loop: every op of a bulk load passes here)
        extra = sorted(str(k) for k in args if k not in keys)
        raise invalid(f"{op}: unknown argument {extra[0]!r} (it takes: {', '.join(sorted(keys)) or 'none'})")
    svc = args.get("svc")
    if isinstance(svc, dict) and not _SVC_KEYS.issuperset(svc):  # the service a server, address or listing names
        extra = sorted(str(k) for k in svc if k not in _SVC_KEYS)
        raise invalid(f"{op}: unknown argument 'svc.{extra[0]}' (a service is proto, addr, port, or match)")


def _opt_svc(ctx, args: dict):
    s = args.get("svc")
    return None if s is None else ctx.bal.get_service(s)


ZERO_RATES = {"cps": 0, "inpps": 0, "outpps": 0, "inbps": 0, "outbps": 0}


STAT_FIELDS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")  # hdslb.fastpath.maps.STAT_FIELDS
# A listing of at least this many services and real servers reads the stats arrays whole (two batched map reads,
# summed in numpy) instead of one lookup per service and per real server (~15 us each: 1.6 s for 10k x 10).
BATCH_STATS_MIN = 2048
# A listing of more services than this is built in chunks of this many, the event loop served between chunks
# (ARP/ND answers, health checks, other control clients), its map reads done in a worker thread.
LIST_CHUNK = 200


def _stats_readers(ctx, svcs) -> tuple:
    """(svc_stats(svc_id), dest_stats(slot)) for a listing of svcs: the context's per-key reads, or for a big
    listing lookups in one batched read of each array (hdslb.fastpath.maps.Maps.all_stats: same sums). Safe in
    a worker thread (it reads only the maps and the services' slots)."""
    whole = getattr(getattr(ctx, "maps", None), "all_stats", None)
    if whole is None or len(svcs) + sum(len(s.dests) for s in svcs) < BATCH_STATS_MIN:
        return ctx.svc_stats, ctx.dest_stats
    svc_all, dest_all = whole("svc_stats"), whole("dest_stats")

    def svc_stats(svc_id):
        v = svc_all.get(svc_id)
        return dict(v) if v is not None else dict.fromkeys(STAT_FIELDS, 0)

    def dest_stats(slot):
        v = dest_all.get(slot)
        return dict(v) if v is not None else dict.fromkeys(STAT_FIELDS, 0)

    return svc_stats, dest_stats


def _dest_brief(d) -> dict:
    return {"addr": str(d.addr), "port": d.port, "fwd": d.fwd, "weight": d.eff_weight, "conf_weight": d.weight,
            "health": {"state": d.health, "reason": d.reason, "sorry": d.sorry, "held": d.held},
            "u_threshold": d.u_threshold, "l_threshold": d.l_threshold, "overloaded": d.overloaded}


def _svc_brief(svc, dests: list | None = None, laddrs: list | None = None) -> dict:
    """A service as the model holds it; without dests/laddrs given, without what the maps count (traffic stats,
    rates, connection counts, persistence templates, local addresses' connections): what a writer plans from."""
    return {
        "proto": svc.proto, "addr": str(svc.addr), "port": svc.port, "svc_id": svc.svc_id, "sched": svc.sched,
        "persistent": svc.persistent, "netmask": svc.netmask, "flags": list(svc.flags),
        "sched_params": dict(svc.sched_params), "match": svc.match.as_dict() if svc.match else None,
        "dests": [_dest_brief(d) for d in svc.dests.values()] if dests is None else dests,
        "laddrs": [{"addr": str(la.addr), "ifname": la.ifname} for la in svc.laddrs] if laddrs is None else laddrs,
    }


def _svc_data(ctx, svc, conn_counts, persist_counts, stats=None, laddr_counts=None) -> dict:
    svc_stats, dest_stats = stats or (ctx.svc_stats, ctx.dest_stats)
    rates = ctx.rates
    dests = []
    for d in svc.dests.values():
        active, inactive = conn_counts.get(d.slot, (0, 0))
        row = _dest_brief(d)
        row.update(active=active, inactive=inactive, persist_conns=persist_counts.get(d.slot, 0),
                   stats=dest_stats(d.slot), rates=rates.get(("dest", d.slot), ZERO_RATES))
        if d.fwd == "tunnel":
            src = ctx.bal.tunnel_source(svc, d)
            row["tunnel_src"] = str(src) if src is not None else None
        dests.append(row)
    out = _svc_brief(svc, dests, _laddr_data(ctx, svc, laddr_counts))
    out.update(hash_cells=list(svc.hcells) if svc.hcells else None, sched_error=ctx.bal.refresh_errors.get(svc.svc_id),
               stats=svc_stats(svc.svc_id), rates=rates.get(("svc", svc.svc_id), ZERO_RATES))
    return out


def _sort_key(s):
    """A listing's order of VIP services (ipvsadm -L's): protocol, family, address, port. Made once per service
    (what it is made of names the service and never changes) and kept on it, with the address as its int (ordered
    as the address, within a version): sorting 10k services compared IPv4Address objects in Python ~140k times
    (44 ms of the event loop per listing), and making the keys took ~20 ms more; ints compare in C."""
    k = s.__dict__.get("_sort_key")
    if k is None:
        k = s.__dict__["_sort_key"] = (s.proto, s.addr.version, int(s.addr), s.port)
    return k


def _listed(bal) -> list:
    """Every service in a listing's order: the SNAT match services first, in the order the fast path tries them
    (snat_order: creation order, first match wins), then the VIP services by _sort_key. Matches are never sorted by
    what they match: ipvsadm -S writes them in this order and -R creates them in it, so a save and restore keeps
    which rule wins, and -Ln shows it."""
    return list(bal.snat_order) + sorted((s for s in bal.services.values() if s.match is None), key=_sort_key)


def _persist_counts(ctx) -> dict:
    """dest slot -> live persistence templates leading to it (ipvsadm --persistent-conn's PersistConn)."""
    out: dict = {}
    fn = getattr(ctx, "persist_list", None)
    for t in (fn() if fn is not None else []):
        out[t["dest_slot"]] = out.get(t["dest_slot"], 0) + 1
    return out


def _laddr_data(ctx, svc, per=None) -> list[dict]:
    if not svc.laddrs:  # (the counts walk the whole conn table: 40 s at 1M connections)
        return []
    if per is None:
        per = ctx.laddr_conns()
    return [{"addr": str(la.addr), "ifname": la.ifname, "conns": per.get((svc.svc_id, la.addr), 0),
             "conflicts": 0} for la in svc.laddrs]


def _svc_ident(args: dict) -> dict:
    if args.get("match") is not None:
        return {"match": args["match"]}
    return {k: args.get(k) for k in ("proto", "addr", "port")}


# --- services ---------------------------------------------------------------------------------------
@command("service.add")
def service_add(ctx, a):
    ctx.bal.service_add(a)


@command("service.edit")
def service_edit(ctx, a):
    ctx.bal.service_edit(a)


@command("service.set")
def service_set(ctx, a):
    """Create the service, or edit it by option when it exists (what a REST bulk PUT/PATCH means)."""
    try:
        ctx.bal.get_service(a)
    except HdslbError as e:
        if e.errno != errno.ESRCH:
            raise
        ctx.bal.service_add(a)
        return {"result": "created"}
    ctx.bal.service_edit(a)
    return {"result": "updated"}


@command("service.del")
def service_del(ctx, a):
    ctx.bal.service_del(_svc_ident(a))


@command("service.flush")
def service_flush(ctx, a):
    ctx.bal.service_flush()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _list_reply(ctx, services: list) -> dict:
    return {"version": IPVS_VERSION, "size": ctx.sizes.max_conns,
            # connection counts (ActiveConn/InActConn, thresholds, lc/wlc) come from the estimator's conn table
            # scan: at most this many seconds old
            "counts_age_max_s": getattr(ctx, "counts_staleness", lambda: None)(),
            "services": services}


@command("service.list")
def service_list(ctx, a):
    brief, laddr_conns = a.get("brief", False), a.get("laddr_conns", True)
    if type(brief) is not bool:
        raise invalid(f"service.list: brief must be true or false, not {brief!r}")
    if type(laddr_conns) is not bool:
        raise invalid(f"service.list: laddr_conns must be true or false, not {laddr_conns!r}")
    one = _opt_svc(ctx, a)
    svcs = [one] if one else _listed(ctx.bal)
    if brief:
        # No map is read: answered on the loop at once, even for a service on a table of a million connections
        # (the REST writes' snapshot of a service before their plan: 0.5 ms a request with the counts and stats).
        return _list_reply(ctx, [_svc_brief(s) for s in svcs]) if len(svcs) <= LIST_CHUNK or not _loop_running() \
            else _brief_chunked(ctx, svcs)
    # On the event loop, a listing of many services is built in chunks; the daemon's (lists_off_loop) also reads
    # the conn table's counts in a worker thread for one service: at 1M connections they take seconds.
    # laddr_conns false (ipvsadm -L, whose layouts do not show them): the local addresses' connection counts are
    # not read (0), which walks the whole conn table entry by entry (15-22 s at a million connections)
    if _loop_running() and (len(svcs) > LIST_CHUNK or getattr(ctx, "lists_off_loop", False)):
        return _service_list_chunked(ctx, svcs, laddr_conns)
    counts = ctx.conn_counts()
    persist = _persist_counts(ctx) if any(s.persistent for s in svcs) else {}
    stats = _stats_readers(ctx, svcs)
    per = None if laddr_conns else {}
    return _list_reply(ctx, [_svc_data(ctx, s, counts, persist, stats, per) for s in svcs])


async def _in_chunks(svcs: list, build) -> list:
    """[build(s) for s in svcs], LIST_CHUNK services at a time with the event loop served in between."""
    out = []
    for i in range(0, len(svcs), LIST_CHUNK):
        if i:
            await asyncio.sleep(0)
        out += [build(s) for s in svcs[i:i + LIST_CHUNK]]
    return out


async def _brief_chunked(ctx, svcs: list) -> dict:
    return _list_reply(ctx, await _in_chunks(svcs, _svc_brief))


async def _service_list_chunked(ctx, svcs: list, laddr_conns: bool = True) -> dict:
    """service.list of many services without holding the event loop: the stats arrays are read in a worker
    thread (the batched map reads are ctypes calls, which release the GIL), then LIST_CHUNK services are built
    at a time with the loop served in between. The services are those of the call's start; a real server
    removed meanwhile is not listed, one changed meanwhile is listed as it is when its chunk is built."""
    def reads():  # what scans the maps (the conn table's counts, the stats arrays, the persistence templates: a
        # full persist_map is 65,536 entries and more, ~0.5 s a read): in a worker thread
        return (ctx.conn_counts(), ctx.laddr_conns() if laddr_conns and any(s.laddrs for s in svcs) else {},
                _stats_readers(ctx, svcs), _persist_counts(ctx) if any(s.persistent for s in svcs) else {})

    counts, laddrs, stats, persist = await asyncio.get_running_loop().run_in_executor(None, reads)
    return _list_reply(ctx, await _in_chunks(svcs, lambda s: _svc_data(ctx, s, counts, persist, stats, laddrs)))


@command("stats.zero")
def stats_zero(ctx, a):
    one = _opt_svc(ctx, a)
    for s in [one] if one else ctx.bal.services.values():
        ctx.maps.zero_svc_stats(s.svc_id)
        for d in s.dests.values():
            ctx.maps.zero_dest_stats(d.slot)


# --- real servers -----------------------------------------------------------------------------------
@command("dest.add")
def dest_add(ctx, a):
    d = ctx.bal.dest_add(a)
    ctx.resolve_soon()
    warnings = ctx.bal.dest_warnings(ctx.bal.get_service(a.get("svc")), d)
    return {"warnings": warnings} if warnings else None


def _edit_target(bal, a: dict) -> dict:
    """A DR or TUNNEL server has the service's port whatever port it was added with (ipvsadm forces it for -a and
    -e alike, and ipvsadm -a here does): an edit naming another port, with no server there, means the server at the
    service's port when the method it ends with (the one given, else its own) is one of those two. dest.set (REST
    upserts) keeps exact ports: a server it does not find there is added."""
    try:
        svc = bal.get_service(a.get("svc"))
        addr, port = bal._dest_key(svc, a)
    except HdslbError:
        return a  # refused by dest_edit with its own message
    if svc.match is not None or port == svc.port or (addr, port) in svc.dests:
        return a
    d = svc.dests.get((addr, svc.port))
    if d is not None and (a.get("fwd") or d.fwd) in ("dr", "tunnel"):
        return {**a, "port": svc.port}
    return a


@command("dest.edit")
def dest_edit(ctx, a):
    d = ctx.bal.dest_edit(_edit_target(ctx.bal, a))
    warnings = ctx.bal.dest_warnings(ctx.bal.get_service(a.get("svc")), d)
    return {"warnings": warnings} if warnings else None


@command("dest.set")
def dest_set(ctx, a):
    """Add the real server, or change what `a` gives when it is there (REST bulk upserts)."""
    try:
        ctx.bal.dest_edit(a)
        return {"result": "updated"}
    except HdslbError as e:
        if e.errno != errno.ENOENT:
            raise
    return dict(dest_add(ctx, a) or {}, result="added")


@command("dest.del")
def dest_del(ctx, a):
    ctx.bal.dest_del(a)


# --- local addresses --------------------------------------------------------------------------------
@command("laddr.add")
def laddr_add(ctx, a):
    ctx.bal.laddr_add(a)
    ctx.bal.after_batch(ctx.announce, a.get("addr"), a.get("ifname"))


@command("laddr.del")
def laddr_del(ctx, a):
    ctx.bal.laddr_del(a)


@command("laddr.list")
def laddr_list(ctx, a):
    one = _opt_svc(ctx, a)
    svcs = [one] if one else sorted((s for s in ctx.bal.services.values() if s.match is None), key=_sort_key)
    return {"services": [{"proto": s.proto, "addr": str(s.addr), "port": s.port, "laddrs": _laddr_data(ctx, s)}
                         for s in svcs]}


# --- addresses, routes, neighbours (dpip) -----------------------------------------------------------
@command("addr.add")
def addr_add(ctx, a):
    ad = ctx.bal.addr_add(a)
    ctx.bal.after_batch(ctx.announce, str(ad.addr), ad.ifname)
    ctx.resolve_soon()


@command("addr.del")
def addr_del(ctx, a):
    ctx.bal.addr_del(a)


@command("addr.flush")
def addr_flush(ctx, a):
    ctx.bal.addr_flush(a)


def _list_filter(ctx, a) -> tuple:
    """(ifname, af) of a listing by device and family, each None for all; an unknown device or family is refused
    (a typo must not list nothing as if there were nothing)."""
    ifname, af = a.get("ifname"), a.get("af")
    if ifname is not None:
        ctx.bal.iface(ifname)
    if af is not None and (type(af) is not int or af not in (4, 6)):
        raise invalid(f"invalid address family {af!r} (4 or 6)")
    return ifname, af


@command("addr.list")
def addr_list(ctx, a):
    ifname, af = _list_filter(ctx, a)
    return {"addrs": [
        {"addr": str(x.addr), "prefixlen": x.prefixlen, "ifname": x.ifname, "scope": x.scope,
         "sapool": x.sapool, "af": x.addr.version}
        for x in ctx.bal.addrs if ifname in (None, x.ifname) and af in (None, x.addr.version)]}


def _route_args(a):
    if a.get("af") is not None and (type(a.get("af")) is not int or a.get("af") not in (4, 6)):
        raise invalid(f"invalid address family {a.get('af')!r}")
    return a


@command("route.add")
def route_add(ctx, a):
    ctx.bal.route_add(_route_args(a))
    ctx.resolve_soon()


@command("route.set")
def route_set(ctx, a):
    ctx.bal.route_set(_route_args(a))
    ctx.resolve_soon()


@command("route.del")
def route_del(ctx, a):
    ctx.bal.route_del(_route_args(a))


@command("route.flush")
def route_flush(ctx, a):
    ctx.bal.route_flush(_route_args(a))


@command("route.list")
def route_list(ctx, a):
    af = _route_args(a).get("af") or 4
    ifname = a.get("ifname")  # dpip route show dev IF: the routes leaving by IF (an unknown one is refused)
    if ifname is not None:
        ctx.bal.iface(ifname)
    zero = "0.0.0.0" if af == 4 else "::"
    out = []
    for r in ctx.bal.routes:
        if r.net.version != af or ifname not in (None, r.ifname):
            continue
        out.append({"af": af, "prefix": str(r.net.network_address), "prefixlen": r.net.prefixlen,
                    "via": str(r.via) if r.via else zero, "src": str(r.src) if r.src else zero,
                    "ifname": r.ifname, "mtu": r.mtu or ctx.bal.ifaces[r.ifname].mtu, "tos": 0,
                    "scope": r.scope, "metric": r.metric, "proto": r.proto,
                    "flags": ["local"] if r.local else []})
    return {"routes": out}


@command("neigh.add")
def neigh_add(ctx, a):
    ctx.bal.neigh_add(a)


@command("neigh.del")
def neigh_del(ctx, a):
    ctx.bal.neigh_del(a)


@command("neigh.list")
def neigh_list(ctx, a):
    ifname, af = _list_filter(ctx, a)
    slow = getattr(ctx, "slow", None)
    if slow is not None:  # the slow path's table knows states (incomplete, probing, stale ...)
        slow.carry_out(slow.sp.sync_static())  # the static entries as the model has them now, not at the next tick
        return {"neighs": slow.sp.show(ifname, af)}
    by_index = {i.ifindex: i.name for i in ctx.bal.ifaces.values()}
    out = []
    for n in ctx.maps.neighs():
        name = by_index.get(n["ifindex"], str(n["ifindex"]))
        if ifname not in (None, name) or af not in (None, n["addr"].version):
            continue
        out.append({"addr": str(n["addr"]), "lladdr": n["lladdr"], "ifname": name,
                    "state": "REACHABLE",  # DPVS names a static entry REACHABLE too (neigh_dump: `static`)
                    "flags": ["static"] if n["permanent"] else ["learned"], "cpu": 0})
    return {"neighs": sorted(out, key=lambda n: n["addr"])}


@command("link.list")
def link_list(ctx, a):
    ifname = a.get("ifname")
    if ifname is not None:
        ctx.bal.iface(ifname)
    return {"links": [
        {"ifname": i.name, "ifindex": i.ifindex, "mac": ":".join(f"{b:02x}" for b in i.mac), "mtu": i.mtu,
         "xdp_mode": ctx.xdp_modes.get(i.name, "none"), "stats": ctx.link_stats(i.name),
         **link_facts(i.name, i.ifindex)}  # state, speed, duplex, numa, rxq, txq: DPVS's dump_nic_basic
        for i in ctx.bal.ifaces.values() if ifname in (None, i.name)]}


# --- batches ------------------------------------------------------------------------------------------
# Ops a batch may carry: changes of the model only (no reload, shutdown or health-check ops, no nested batch).
BATCH_OPS = frozenset({
    "service.add", "service.edit", "service.set", "service.del", "service.flush", "dest.add", "dest.edit",
    "dest.set", "dest.del",
    "laddr.add", "laddr.del", "addr.add", "addr.del", "addr.flush", "route.add", "route.set", "route.del",
    "route.flush", "neigh.add", "neigh.del", "timeouts.set"})


class ScratchCtx:
    """Just enough of the daemon for commands to run against a scratch model: a batch's dry run, a config's
    (hdslb.daemon.apply_config)."""

    def __init__(self, bal):
        self.bal = bal

    def resolve_soon(self):
        pass

    def announce(self, *a):
        pass


def _batch_ops(a) -> list:
    ops = a.get("ops")
    if not isinstance(ops, list):
        raise invalid("batch: ops must be a list of [op, args] pairs")
    out = []
    for i, item in enumerate(ops):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], dict)):
            e = invalid(f"batch op {i}: not an [op, args] pair")
            e.index = i
            raise e
        if item[0] not in BATCH_OPS:
            e = HdslbError(errno.EOPNOTSUPP, f"{item[0]!r} cannot be batched (batchable: {', '.join(sorted(BATCH_OPS))})")
            e.index = i
            raise e
        try:
            check_keys(item[0], item[1])
        except HdslbError as e:
            e.index = i
            e.message = f"batch op {i}: {e.message}"
            raise
        out.append((item[0], item[1]))
    return out


_CREATES = frozenset({"service.add", "service.set"})
_ON_CREATED = frozenset({"service.edit", "dest.add", "dest.set", "dest.edit", "laddr.add"})


def only_creates(bal, ops: list) -> bool:
    """True when every op adds a service that does not exist yet (not a SNAT match service), or changes one of
    those (its options, real servers, local addresses), or adds a route: a bulk load of new services (ipvsadm -R
    into an empty table, a REST PUT of a new service with its real servers, a config's first load) or of routes
    (dpip -b). Such a batch is undone by removing what it added, so it needs no dry run first."""
    made = set()
    routes = False
    try:
        for op, a in ops:
            if op == "route.add":
                routes = True
            elif op in _CREATES:
                if a.get("match") is not None:
                    return False
                key = bal.svc_key(a)
                if key in made or key in bal.services:
                    return False
                made.add(key)
            elif op in _ON_CREATED:
                if bal.svc_key(a if op == "service.edit" else a.get("svc")) not in made:
                    return False
            else:
                return False
    except (HdslbError, TypeError, ValueError, AttributeError):
        return False  # the dry run names what is wrong with it
    return bool(made) or routes


def run_batch(ctx, ops: list, undo_new: bool = False) -> list:
    """Apply ops in order with the balancer's rebuilds deferred to the end; a refusal carries .index, the position
    of the op it belongs to (for a table built at the end: the last op that touched that service)."""
    results = []
    with ctx.bal.deferred(undo_new=undo_new) as d:
        for i, (op, args) in enumerate(ops):
            d.tag = i
            try:
                results.append(COMMANDS[op](ctx, args))
            except HdslbError as e:
                e.index = i
                raise
    return results


def refused_index(e: HdslbError):
    """The position of the op a run_batch refusal belongs to: set by the op, or (a table that cannot be built at
    the end, a map write refused while publishing) the tag of the last op that touched that service."""
    i = getattr(e, "index", None)
    return getattr(e, "tag", None) if i is None else i


def _flush_index(e: HdslbError, n: int) -> HdslbError:
    e.index = refused_index(e)
    return e


@command("batch")
def batch(ctx, a):
    """Many changes as one: validated on a scratch copy of the model first (a refusal leaves everything as it was
    and names the op by its position, .index; a batch that only adds new services is applied at once and undone
    whole if refused, see only_creates), then applied with each touched service's table rebuilt once and
    each touched prefix written once. Replies the warnings of the ops, each with its index. With dry_run the
    ops are only checked on the scratch copy ({"applied": 0, "checked": n}): a tool whose input interleaves
    changes with reads (ipvsadm -R, dpip -b) checks all its changes at once before it applies any."""
    ops = _batch_ops(a)
    dry_run = a.get("dry_run")
    if dry_run is not None and type(dry_run) is not bool:  # a "false" taken as true would apply nothing, and say so quietly
        raise invalid(f"batch: dry_run must be true or false, not {dry_run!r}")
    dry_run = bool(dry_run)
    if not ops:
        return {"applied": 0, "warnings": []}
    if not dry_run and only_creates(ctx.bal, ops):  # undone by removing what it added: no dry run (half of a batch's cost)
        try:
            results = run_batch(ctx, ops, undo_new=True)
        except HdslbError as e:
            raise _flush_index(e, len(ops)) from None
        return _batch_reply(ops, results)
    # The dry run copies what the batch can change: services it names (on first use), and addresses, routes or
    # neighbours only when it has ops on them.
    scratch = ctx.bal.scratch(routes=any(op.startswith(("route.", "addr.")) for op, _ in ops),
                              neighs=any(op.startswith("neigh.") for op, _ in ops))
    try:
        checked = run_batch(ScratchCtx(scratch), ops)
    except HdslbError as e:
        raise _flush_index(e, len(ops)) from None
    if dry_run:
        return dict(_batch_reply(ops, checked), applied=0, checked=len(ops))
    results = run_batch(ctx, ops)
    return _batch_reply(ops, results)


def _batch_reply(ops: list, results: list) -> dict:
    warnings = [{"index": i, "warning": w} for i, r in enumerate(results)
                if isinstance(r, dict) for w in r.get("warnings", ())]
    return {"applied": len(ops), "warnings": warnings}


# --- connection timeouts (ipvsadm --set / -L --timeout) -------------------------------------------------
@command("timeouts.get")
def timeouts_get(ctx, a):
    return ctx.timeouts()


def timeouts_args(a) -> dict:
    """timeouts.set's args, LVS's names {tcp, tcpfin, udp} in seconds (absent or 0 keeps the value, as ipvsadm
    --set does) -> {state name: seconds} for those that change. Refuses the whole request on any bad value."""
    if not isinstance(a, dict):
        raise invalid("timeouts.set: args must be a map of tcp, tcpfin, udp")
    unknown = sorted(str(k) for k in a if k not in LVS_TIMEOUTS)
    if unknown:
        raise invalid(f"timeouts.set: unknown timeout {unknown[0]!r} (tcp, tcpfin, udp)")
    out = {}
    for lvs, state in LVS_TIMEOUTS.items():
        v = a.get(lvs, 0)
        if type(v) is not int or not 0 <= v <= MAX_TIMEOUT_S:
            raise invalid(f"invalid {lvs} timeout {v!r}: expects seconds 0..{MAX_TIMEOUT_S} (31 days; 0 keeps the "
                          f"current value)")
        if v:
            out[state] = v
    return out


@command("timeouts.set")
def timeouts_set(ctx, a):
    """Set ESTABLISHED (tcp), FIN_WAIT (tcpfin) and UDP idle timeouts live; replies what timeouts.get does."""
    new = timeouts_args(a)
    setter = getattr(ctx, "set_timeouts", None)
    if setter is None:  # a batch's dry run on a scratch model: checked only
        return None
    return setter(new) if new else ctx.timeouts()


# --- the daemon itself ------------------------------------------------------------------------------
@command("stats.get")
def stats_get(ctx, a):
    return {"counters": ctx.maps.counters(), "per_cpu": ctx.maps.per_cpu_counters(), "conn_table": ctx.conn_table(),
            "slowpath": ctx.slow.stats() if getattr(ctx, "slow", None) is not None else None}


# conn.list pages: a listing is read from the conn table once (a snapshot: hdslb.fastpath.aging.Listing, built in
# a worker thread from the table's numpy columns) and served page by page from it, so its pages are consistent and
# a million-connection table is neither read once per page nor sent as one reply (454 MB at 1M connections, past
# the 64 MiB control frame). A snapshot lives CONN_SNAPSHOT_TTL_S after its last page was asked for (until its
# last page for a cursor listing), at most CONN_SNAPSHOTS_MAX at once (the oldest goes first): ~250 MB each at 1M
# connections (~120 B an entry).
CONN_PAGE_DEFAULT = 10_000
CONN_PAGE_MAX = 100_000
CONN_SNAPSHOT_TTL_S = 60.0
CONN_SNAPSHOTS_MAX = 4


class ConnSnapshots:
    """The live conn.list snapshots, by cursor (an opaque token). `shared` is REST's: /v2/conns takes offset and
    limit only, so offset 0 makes a new shared snapshot and later offsets read it while it lives."""

    def __init__(self, ttl: float = CONN_SNAPSHOT_TTL_S, cap: int = CONN_SNAPSHOTS_MAX, clock=None):
        import collections
        import time

        self.ttl, self.cap, self.clock = ttl, cap, clock or time.monotonic
        self._snaps = collections.OrderedDict()  # cursor -> [listing, last used]
        self.shared: str | None = None
        self._walked: set = set()  # cursors read past their first page: a shared one a walk is on is kept

    def _expire(self) -> None:
        now = self.clock()
        for c in [c for c, (_, used) in self._snaps.items() if now - used > self.ttl]:
            self.drop(c)

    def __len__(self) -> int:
        self._expire()
        return len(self._snaps)

    def add(self, listing, shared: bool = False) -> str:
        import secrets

        self._expire()
        cursor = secrets.token_hex(8)
        self._snaps[cursor] = [listing, self.clock()]
        if shared:
            # The one it replaces goes, unless a client is walking it (REST's ?snapshot=): then the TTL and the
            # cap see to it, and the walk goes on in it rather than in this one.
            if self.shared is not None and self.shared not in self._walked:
                self.drop(self.shared)
            self.shared = cursor
        while len(self._snaps) > self.cap:
            self.drop(next(iter(self._snaps)))
        return cursor

    def get(self, cursor: str):
        self._expire()
        ent = self._snaps.get(cursor)
        if ent is None:
            raise HdslbError(errno.ESTALE, f"conn.list: cursor {cursor!r} is unknown or expired (a listing is kept "
                                           f"{self.ttl:g} s after its last page, {self.cap} at most): start the "
                                           f"listing again without a cursor")
        ent[1] = self.clock()
        self._snaps.move_to_end(cursor)
        self._walked.add(cursor)
        return ent[0]

    def get_shared(self):
        self._expire()
        return (self.shared, self.get(self.shared)) if self.shared in self._snaps else (None, None)

    def drop(self, cursor: str) -> None:
        self._snaps.pop(cursor, None)
        self._walked.discard(cursor)
        if cursor == self.shared:
            self.shared = None


def _conn_snapshots(ctx) -> ConnSnapshots:
    snaps = getattr(ctx, "conn_snapshots", None)
    if snaps is None:
        snaps = ctx.conn_snapshots = ConnSnapshots()
    return snaps


def _conn_page_args(a) -> dict | None:
    """The paging arguments of conn.list, checked (None: an unpaged listing): limit (1..CONN_PAGE_MAX), offset
    (>= 0), cursor (a previous page's), inbound (only the client's direction: what ipvsadm -Lnc prints), shared
    (REST's listing, see ConnSnapshots)."""
    if not any(k in a for k in ("limit", "offset", "cursor", "shared")):
        return None

    def num(name, default, lo, hi=None):
        v = a.get(name, default)
        if v is None:
            v = default
        if type(v) is not int or v < lo or (hi is not None and v > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise invalid(f"conn.list: {name} must be an integer in {rng}, not {v!r}")
        return v

    cursor = a.get("cursor")
    if cursor is not None and (not isinstance(cursor, str) or not cursor or len(cursor) > 64):
        raise invalid(f"conn.list: cursor must be the cursor a previous page gave, not {cursor!r}")
    for flag in ("inbound", "shared"):
        if type(a.get(flag, False)) is not bool:
            raise invalid(f"conn.list: {flag} must be true or false, not {a.get(flag)!r}")
    if cursor is not None and a.get("shared"):
        raise invalid("conn.list: cursor and shared do not go together")
    return {"limit": num("limit", CONN_PAGE_DEFAULT, 1, CONN_PAGE_MAX), "offset": num("offset", 0, 0),
            "cursor": cursor, "inbound": bool(a.get("inbound", False)), "shared": bool(a.get("shared", False))}


def conn_list_too_big(n: int, nbytes: int) -> HdslbError:
    from hdslb.ctl import protocol

    return HdslbError(errno.EMSGSIZE, f"conn.list: {n} entries take up to {nbytes / 2**20:.0f} MiB, more than a "
                                      f"control reply carries ({protocol.MAX_FRAME // 2**20} MiB): list them in pages "
                                      f"(limit, then cursor and offset from each reply; ipvsadm -Lnc does)")


async def _conn_pages(ctx, p: dict, templates: list) -> dict:
    """One page of a snapshot listing (a new snapshot unless a cursor, or REST's shared one, is given)."""
    loop = asyncio.get_running_loop()
    snaps = _conn_snapshots(ctx)
    cursor, listing = p["cursor"], None
    if cursor is not None:
        listing = snaps.get(cursor)
    elif p["shared"] and p["offset"] > 0:
        cursor, listing = snaps.get_shared()
    if listing is None:
        listing = await loop.run_in_executor(None, ctx.conn_listing, p["inbound"] and not p["shared"])
        cursor = snaps.add(listing, shared=p["shared"])
    off, n = p["offset"], len(listing)
    page = await loop.run_in_executor(None, listing.entries, off, off + p["limit"]) if off < n else []
    nxt = off + len(page) if off + len(page) < n else None
    if nxt is None and not p["shared"] and cursor != snaps.shared:  # a cursor listing read to its end: its memory
        snaps.drop(cursor)                                            # goes at once (REST's shared one stays)
    return {"conns": page, "templates": templates if p["cursor"] is None else [], "total": n, "offset": off,
            "cursor": cursor, "next": nxt}


@command("conn.list")
def conn_list(ctx, a):
    """Connections (every entry, both directions) and persistence templates. Unpaged, the whole table in one reply,
    refused (EMSGSIZE, naming paging) when that could not fit in a control frame; paged (limit, offset, cursor:
    see _conn_page_args), a page of a snapshot read once per listing, with total, cursor and next (the offset of
    the next page, None after the last)."""
    # Flags are checked whether or not the listing is paged (_conn_page_args checks only a paged one's): unpaged,
    # {"inbound": 1} and {"templates_only": "no"} were taken, and inbound was not honoured at all (both
    # directions came back).
    for flag in ("inbound", "templates_only"):
        if type(a.get(flag, False)) is not bool:
            raise invalid(f"conn.list: {flag} must be true or false, not {a.get(flag)!r}")
    inbound = a.get("inbound", False)
    p = _conn_page_args(a)
    fn = getattr(ctx, "persist_list", None)
    listing = getattr(ctx, "conn_listing", None)
    if listing is not None:
        # the daemon: the templates (a full persist_map: 65,536 entries and more) are read in a worker thread, as
        # the connections' snapshots are; on the loop they held it ~1.5 s a listing
        async def templates_off_loop() -> list:
            return await asyncio.get_running_loop().run_in_executor(None, fn) if fn is not None else []

        if a.get("templates_only"):
            async def only():
                return {"conns": [], "templates": await templates_off_loop()}

            return only()
        if p is not None:
            async def paged():
                # (the later pages of a cursor carry no templates: only the first page reads them)
                return await _conn_pages(ctx, p, await templates_off_loop() if p["cursor"] is None else [])

            return paged()

        async def whole():
            loop = asyncio.get_running_loop()
            templates = await templates_off_loop()
            lst = await loop.run_in_executor(None, listing, inbound)
            nbytes = lst.max_bytes()
            from hdslb.ctl import protocol
            if nbytes > protocol.MAX_FRAME - 4096:
                raise conn_list_too_big(len(lst), nbytes)
            return {"conns": await loop.run_in_executor(None, lst.entries), "templates": templates}

        return whole()
    templates = fn() if fn is not None else []
    if a.get("templates_only"):
        return {"conns": [], "templates": templates}
    if p is not None:  # a context without snapshots (tests, a dry run): pages of its list
        conns = [c for c in ctx.conn_list() if not (p["inbound"] and c["out"])]
        off = p["offset"]
        page = conns[off:off + p["limit"]]
        nxt = off + len(page) if off + len(page) < len(conns) else None
        return {"conns": page, "templates": templates if p["cursor"] is None else [], "total": len(conns),
                "offset": off, "cursor": None, "next": nxt}
    off_loop = getattr(ctx, "conn_list_async", None)
    if off_loop is not None:  # a big table is read in a worker thread, the loop keeps serving

        async def listed():
            return {"conns": [c for c in await off_loop() if not (inbound and c["out"])], "templates": templates}

        return listed()
    return {"conns": [c for c in ctx.conn_list() if not (inbound and c["out"])], "templates": templates}


@command("daemon.status")
def daemon_status(ctx, a):
    settings = getattr(ctx, "settings", None)
    return {"version": __version__, "pid": ctx.pid, "ctl_socket": ctx.ctl_path, "pin_dir": ctx.pin_dir,
            "instance": getattr(settings, "instance", None), "state_file": getattr(settings, "state_file", None),
            "interfaces": dict(ctx.xdp_modes), "attached": bool(ctx.xdp_modes),
            "ready": getattr(ctx, "ready", True), "gone": sorted(getattr(ctx, "ifaces_gone", ())),
            "lost": dict(getattr(ctx, "ifaces_lost", {})),
            "services": len(ctx.bal.services), "uptime_s": ctx.uptime(),
            # local addresses no service has any more, kept (ARP/ND answered) while connections use them
            "retired_laddrs": sorted(map(str, ctx.bal.kept_laddrs())),
            # auto_cpus: the possible CPUs --conn-table auto picked the kind by (None: the kind was asked for)
            "conn_table": {"kind": ctx.sizes.conn_table, "auto_cpus": getattr(settings, "conn_table_auto_cpus", None),
                           "size": ctx.sizes.max_conns,
                           "size6": ctx.sizes.conn6_entries(),
                           "memlock_bytes": getattr(getattr(ctx, "fp", None), "conn_memlock", None)},
            "heap": ctx.heap.status() if getattr(ctx, "heap", None) is not None else None,
            "save_error": getattr(ctx, "save_error", None)}


@command("daemon.reload_datapath")
def daemon_reload_datapath(ctx, a):
    return ctx.reload_datapath()


@command("config.reload")
def config_reload(ctx, a):
    text = a.get("text")
    if text is not None and not isinstance(text, str):
        raise invalid("text must be the config file's content as a string")
    return ctx.reload_config(text)


@command("config.get")
def config_get(ctx, a):
    return {"text": ctx.config_text(), "file": ctx.settings.config_file}


@command("check.add")
def check_add(ctx, a):
    return ctx.add_check(a)


@command("check.del")
def check_del(ctx, a):
    return ctx.del_check(a)


@command("health.list")
def health_list(ctx, a):
    if ctx.health is None:
        return {"health": {}}
    # each server's pool_weight: the model's, which an ipvsadm -e -w since start changed and the checker's copy of
    # the configured weight does not follow
    # and whether it is held out of the pool while its sorry server stands in (its weight 0 there, though up)
    return {"health": ctx.health.status(pool_weight=getattr(ctx, "pool_weight", None),
                                        held=getattr(ctx, "pool_held", None))}


@command("daemon.shutdown")
def daemon_shutdown(ctx, a):
    ctx.request_shutdown(detach=bool(a.get("detach", True)))

