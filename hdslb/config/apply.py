"""Turn a loaded Config into control operations that bring the running model to what the file declares.

The same plan serves start-up and reload: it is the difference between the services the config owns now
and what the file wants, as a list of (op, args) for the command registry. The daemon runs it on a scratch
copy of the model first, so a plan that fails anywhere changes nothing.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from hdslb.balancer import Match, _match_range, netmask_text
from hdslb.errors import HdslbError, invalid

from .schema import granularity_v6_error

LB_KIND = {"FNAT": "fnat", "DR": "dr", "NAT": "nat", "TUNNEL": "tunnel", "SNAT": "snat"}


@dataclass
class WantDest:
    addr: str
    port: int
    weight: int
    u_threshold: int = 0
    l_threshold: int = 0


@dataclass
class WantService:
    proto: str
    addr: str
    port: int
    sched: str
    fwd: str
    persistent: int | None
    dests: dict[tuple, WantDest] = field(default_factory=dict)
    laddrs: dict[str, str] = field(default_factory=dict)  # address -> interface
    vs_key: tuple = ()  # the config's identity of the virtual_server it came from (groups fan out)
    where: str = ""
    netmask: str | None = None  # persistence_granularity as ipvsadm -M spells it
    flags: list = field(default_factory=list)  # sh-port, mh-port, ... (ipvsadm --sched-flags)
    sched_params: dict = field(default_factory=dict)  # hash_table_size -> {"size": N}
    match: dict | None = None  # SNAT: {proto, src_range, dst_range, iif, oif}
    sorry: tuple | None = None  # the sorry_server as a dest key (addr, port): in the pool only while quorum is lost

    @property
    def ident(self) -> dict:
        if self.match is not None:
            return {"match": self.match}
        return {"proto": self.proto, "addr": self.addr, "port": self.port}

    @property
    def key(self) -> tuple:
        if self.match is not None:
            return match_key(self.match)
        return (self.proto, ipaddress.ip_address(self.addr), self.port)

    def svc_args(self) -> dict:
        """service.add / service.edit arguments; 0 and empty values say "none" (an edit keeps what is None)."""
        return dict(self.ident, sched=self.sched, persistent=self.persistent or 0, netmask=self.netmask or "",
                    flags=list(self.flags), sched_params=dict(self.sched_params))


def match_key(m: dict) -> tuple:
    """A SNAT service's key as the file spells its match (interfaces by the names written, none looked up)."""
    return ("match", Match(proto=m["proto"], src=_match_range(m["src_range"], "src-range"),
                           dst=_match_range(m["dst_range"], "dst-range"), iif=m["iif"], oif=m["oif"]))


def desired(cfg, default_ifname) -> dict[tuple, WantService]:
    """Services the config declares, keyed like the model's services.

    default_ifname(ip) names the interface for a local address whose group gives none (the route to the
    real servers decides, as DPVS's keepalived does).
    """
    out: dict[tuple, WantService] = {}
    for vs in cfg.virtual_servers:
        where = f"{vs.where}" if vs.where else str(vs)
        fwd = LB_KIND.get(vs.lb_kind.upper())
        if fwd is None:
            raise invalid(f"{where}: lb_kind {vs.lb_kind} is unknown")
        laddrs: dict[str, str] = {}
        if vs.laddr_group_name:
            group = cfg.local_address_groups.get(vs.laddr_group_name)
            if group is None:
                raise invalid(f"{where}: laddr_group_name {vs.laddr_group_name} is not defined")
            first_rs = vs.real_servers[0].ip if vs.real_servers else None
            for la in group.addresses:
                ifname = la.interface or default_ifname(first_rs)
                if ifname is None:
                    raise invalid(f"{where}: no interface for local address {la.ip} (name one in the group)")
                laddrs[str(la.ip)] = ifname
        flags = [f for f, on in (("sh-port", vs.sh_port), ("sh-fallback", vs.sh_fallback),
                                 ("mh-port", vs.mh_port), ("mh-fallback", vs.mh_fallback)) if on]
        # hash_table_size sizes a hash scheduler's table; under any other it is noticed (inactive_notices), not sent
        params = {"size": vs.hash_table_size} if vs.hash_table_size is not None and hashed(vs.lb_algo) else {}
        if vs.match is not None:
            ident = [(None, {"proto": vs.protocol.lower(), "src_range": vs.src_range, "dst_range": vs.dst_range,
                             "iif": vs.iif, "oif": vs.oif})]
        else:
            ident = [(ep, None) for ep in cfg.endpoints(vs)]
        for ep, match in ident:
            addr = str(ep.ip) if ep else "0.0.0.0"
            port = ep.port if ep else 0
            netmask = None
            if vs.persistence_granularity is not None and ep is not None and ep.ip.version == 6:
                why = granularity_v6_error(vs.persistence_granularity)  # (a group's IPv6 member: the schema
                if why:                                                # checked a plain virtual_server)
                    raise invalid(f"{where}: persistence_granularity: {why} (member {ep.ip})")
            if vs.persistence_granularity is not None and ep is not None and \
                    vs.persistence_granularity < ep.ip.max_prefixlen:
                netmask = netmask_text(vs.persistence_granularity, ep.ip.version)
            svc = WantService(proto=vs.protocol.lower(), addr=addr, port=port, sched=vs.lb_algo, fwd=fwd,
                              persistent=vs.persistence_timeout or None, laddrs=dict(laddrs), vs_key=vs.key,
                              where=where, netmask=netmask, flags=flags, sched_params=dict(params), match=match)
            if vs.sorry_server is not None:
                ss = vs.sorry_server
                svc.sorry = (str(ss.ip), 0 if match is not None else (ss.port or port))
            for rs in vs.real_servers:
                # keepalived (ipvswrapper.c ipvs_group_cmd): in a group, DR and TUN real servers are on each
                # member's port (neither rewrites ports); NAT and FNAT ones where written (no port: the member's)
                rport = 0 if match is not None else port if vs.group is not None and fwd in ("dr", "tunnel") \
                    else (rs.port or port)
                svc.dests[(str(rs.ip), rport)] = WantDest(
                    addr=str(rs.ip), port=rport, weight=rs.weight,
                    u_threshold=rs.uthreshold or 0, l_threshold=rs.lthreshold or 0)
            try:
                key = svc.key
            except HdslbError as e:  # a range the schema let through but the model refuses
                raise HdslbError(e.errno, f"{where}: {e.message}") from None
            if key in out:  # (a VIP served twice is refused by the loader; two SNAT services can match alike)
                raise invalid(f"{where}: virtual_server match {vs.match} matches what virtual_server at "
                              f"{out[key].where} matches (protocol, src-range, dst-range, iif, oif): one of them "
                              f"would never be used")
            out[key] = svc
    return out


def laddr_warnings(want: dict[tuple, WantService]) -> list[str]:
    """The file's FNAT virtual servers with real servers but no local address of their family (no
    `laddr_group_name`, or a group of the other family): the fast path drops each of their new flows (drop_no_laddr),
    silently, while their health checks, leaving through the kernel, pass. One line per virtual server and family."""
    import ipaddress

    out: dict = {}
    for w in want.values():
        if w.fwd != "fnat" or w.match is not None:
            continue
        have = {ipaddress.ip_address(a).version for a in w.laddrs}
        for fam in sorted({ipaddress.ip_address(d.addr).version for d in w.dests.values()} - have):
            out.setdefault((w.where, fam), (
                f"{w.where}: virtual_server is lb_kind FNAT with IPv{fam} real servers and no IPv{fam} local address "
                f"(laddr_group_name): each new flow is dropped (drop_no_laddr) until a local_address_group gives it "
                f"one"))
    return list(out.values())


def plan(bal, want: dict[tuple, WantService], owned: set[tuple],
         prev: dict[tuple, WantService] | None = None) -> list[tuple[str, dict]]:
    """Ops that turn the config-owned part of `bal` into `want`.

    Services the config does not own (made with ipvsadm) are left alone unless the file now declares them,
    in which case the file takes them over.

    prev: what the file applied last wanted (a reload's), None at a start. As keepalived's reload compares the old
    config with the new one (ipwrapper.c clear_diff_services / clear_diff_rs), a service's scheduler and persistence
    and a real server's weight, thresholds and forwarding method are set where the file changed them since (or the
    file did not have that service or server): a value set by hand since (`ipvsadm -e -w 0`, a drain; `ipvsadm -E
    -s rr`) stands through a reload that leaves it alone, as a `--set` timeout does. A real server or service
    missing from the model (removed by hand) is added again.
    """
    ops: list[tuple[str, dict]] = []
    for key in sorted(owned - set(want), key=str):
        if key in bal.services:
            ops.append(("service.del", bal.services[key].ident))
    for key, w in want.items():
        svc_args = w.svc_args()
        cur = bal.services.get(key)
        if cur is None:
            ops.append(("service.add", svc_args))
            old, cur_dests, cur_laddrs = None, {}, {}
        else:
            old = prev.get(key) if prev is not None else None
            # the scheduler (with its flags and table size) and persistence (with its mask), each where it differs
            # from the model and the file changed it (or the file did not have the service)
            edit = {}
            for fields, have in ((("sched", "flags", "sched_params"), (cur.sched, cur.flags, cur.sched_params)),
                                 (("persistent", "netmask"), (cur.persistent, cur.netmask))):
                wanted = tuple(getattr(w, f) for f in fields)
                if have != wanted and (old is None or tuple(getattr(old, f) for f in fields) != wanted):
                    edit.update((f, svc_args[f]) for f in fields)
            if edit:
                ops.append(("service.edit", dict(w.ident, **edit)))
            # A sorry_server in the pool belongs to health checking (it is there while quorum is lost), not to the
            # file; but one the file no longer names goes now, or it would take new flows for good (the daemon
            # puts the new one in if quorum is still lost).
            cur_dests = {(str(d.addr), d.port): d for d in cur.dests.values() if not d.sorry}
            for d in cur.dests.values():
                if d.sorry and (str(d.addr), d.port) != w.sorry:
                    ops.append(("dest.del", {"svc": w.ident, "addr": str(d.addr), "port": d.port}))
            cur_laddrs = {str(la.addr): la.ifname for la in cur.laddrs}
        for dk in sorted(set(cur_dests) - set(w.dests)):
            ops.append(("dest.del", {"svc": w.ident, "addr": dk[0], "port": dk[1]}))
        for dk, wd in w.dests.items():
            args = {"svc": w.ident, "addr": wd.addr, "port": wd.port, "fwd": w.fwd, "weight": wd.weight,
                    "u_threshold": wd.u_threshold, "l_threshold": wd.l_threshold}
            d = cur_dests.get(dk)
            if d is None:
                ops.append(("dest.add", args))
                continue
            od = old.dests.get(dk) if old is not None else None
            # (fwd, weight, thresholds) as the model has them, as the file has them, as the file had them
            edit = {}
            for fields, have, wanted, had in (
                    (("fwd",), (d.fwd,), (w.fwd,), None if od is None else (old.fwd,)),
                    (("weight",), (d.weight,), (wd.weight,), None if od is None else (od.weight,)),
                    (("u_threshold", "l_threshold"), (d.u_threshold, d.l_threshold),  # together: l <= u
                     (wd.u_threshold, wd.l_threshold), None if od is None else (od.u_threshold, od.l_threshold))):
                if have != wanted and had != wanted:
                    edit.update(zip(fields, wanted))
            if edit:
                ops.append(("dest.edit", {"svc": w.ident, "addr": wd.addr, "port": wd.port, **edit}))
        for addr in sorted(set(cur_laddrs) - set(w.laddrs)):
            ops.append(("laddr.del", {"svc": w.ident, "addr": addr}))
        for addr, ifname in w.laddrs.items():
            if cur_laddrs.get(addr) != ifname:
                if addr in cur_laddrs:
                    ops.append(("laddr.del", {"svc": w.ident, "addr": addr}))
                ops.append(("laddr.add", {"svc": w.ident, "addr": addr, "ifname": ifname}))
    return ops


# Options the parser maps to the XDP design but this daemon does not act on yet, with the reason an operator
# sees. Anything applicable and not listed here is acted on. Checked by prefix of the setting's path.
NOT_ACTED_ON = {
    "worker_defs": "XDP runs on whichever CPU receives the packet; steer with IRQ affinity / RSS (hdslb does not manage it yet)",
    "ipv4_defs.fragment": "IPv4 fragments addressed to the balancer are dropped and counted (drop_fragment), not reassembled",
    "ipv6_defs.disable": "IPv6 services are balanced whenever one is declared; `disable` does not turn IPv6 off",
    "ipvs_defs.conn.conn_init_timeout": "a new flow ages by its state's timeout (syn_recv)",
    "ipvs_defs.udp.uoa_": "UDP option of address (UOA) is not implemented",
    "ipvs_defs.udp.timeout.last": "UDP flows age by the normal timeout only",
    "ipvs_defs.tcp.timeout.none": "the fast path tracks syn_recv, established, fin_wait and close only",
    "ipvs_defs.tcp.timeout.syn_sent": "the fast path tracks syn_recv, established, fin_wait and close only",
    "ipvs_defs.tcp.timeout.time_wait": "folded into fin_wait: the fast path tracks syn_recv, established, fin_wait and close",
    "ipvs_defs.tcp.timeout.close_wait": "folded into fin_wait: the fast path tracks syn_recv, established, fin_wait and close",
    "ipvs_defs.tcp.timeout.last_ack": "folded into fin_wait: the fast path tracks syn_recv, established, fin_wait and close",
    "ipvs_defs.tcp.timeout.listen": "the fast path tracks syn_recv, established, fin_wait and close only",
    "ipvs_defs.tcp.timeout.synack": "the fast path tracks syn_recv, established, fin_wait and close only",
    "ipvs_defs.tcp.timeout.last": "the fast path tracks syn_recv, established, fin_wait and close only",
    "ipvs_defs.tcp.synproxy": "SYN proxy is not implemented yet",
    "ipvs_defs.tcp.defence_tcp_drop": "not implemented",
    "ipvs_defs.udp.defence_udp_drop": "not implemented",
    "sa_pool.pool_hash_size": "local ports come from per-CPU ranges of each local address, not a hashed pool",
}

# netif_defs device options (by keyword: their paths carry the device's name) the daemon does not act on. The
# device's name is: it names an interface to attach to.
NOT_ACTED_ON_DEVICE = {
    "queue_number": "the driver's queue count is ethtool's (`ethtool -L DEV combined N`); XDP runs on every queue",
    "promisc_mode": "hdslb does not change the interface's flags (`ip link set DEV promisc on`)",
    "mtu": "the interface's MTU is the kernel's (`ip link set DEV mtu N`); hdslb reads it",
}


# virtual_server / real_server options (matched by keyword, since their paths carry the server's name) that are
# accepted but not acted on. lb_kind (every mode), lb_algo (every scheduler), persistence_timeout,
# persistence_granularity, sh-port/mh-port, hash_table_size, uthreshold/lthreshold and the SNAT match keywords are
# acted on; sh-fallback/mh-fallback describe what hdslb always does.
NOT_ACTED_ON_LB = {
    "ops": "one-packet scheduling is not implemented: every UDP flow gets a connection entry",
    "syn_proxy": "SYN proxy is not implemented yet",
    "establish_timeout": "established flows age by ipvs_defs tcp timeout established",
    "daddr_group_name": "deny/allow address groups are not enforced by the fast path",
    "waddr_group_name": "deny/allow address groups are not enforced by the fast path",
    "ha_suspend": "there is no VRRP here to suspend checkers with",
    "sorry_server_inhibit": "the sorry server is added with weight 1 and removed when quorum returns",
}


def hashed(lb_algo: str) -> bool:
    """lb_algo builds a hash table that hash_table_size sizes (sh, dh, mh, conhash)."""
    from hdslb.sched import params_of

    try:
        return "size" in params_of(lb_algo)
    except (KeyError, ValueError):
        return False


def not_acted_on(path: str) -> str | None:
    """Why the `*_defs` option at `path` (a Setting's path) has no effect, or None if it acts."""
    for prefix, reason in NOT_ACTED_ON.items():
        if path.startswith(prefix):
            return reason
    if path.startswith("netif_defs.device[") and "]." in path:
        return NOT_ACTED_ON_DEVICE.get(path.rsplit(".", 1)[-1].split("[", 1)[0])
    return None


def inactive_notices(cfg) -> list[str]:
    """One line per option the file sets that has no effect: the parser's not-applicable notices plus the
    options this daemon does not act on yet. Nothing set is silently ignored."""
    out = [str(n) for n in cfg.notices]
    vs_at = {(vs.where.file, vs.where.line, vs.where.col): vs for vs in cfg.virtual_servers if vs.where is not None}
    for path, st in cfg.settings.items():
        if not st.applies:
            continue
        why = not_acted_on(path)
        if why is None and path.startswith("virtual_server["):
            why = NOT_ACTED_ON_LB.get(st.keyword) or _vs_option_inactive(path, st, cfg, vs_at)
        if why is INIT_ON_VS:  # the option acts; only its marker does not
            out.append(f"{st.where}: {st.keyword}: applies; its `<init>` is not acted on: {why}")
        elif why is not None:
            out.append(f"{st.where}: {st.keyword}: accepted, not acted on: {why}")
    return out


INIT_ON_VS = ("`<init>` marks *_defs options that need a restart; virtual_server options are applied on every reload, "
              "with or without it")


def _vs_option_inactive(path: str, st, cfg, vs_at: dict) -> str | None:
    """Why a virtual_server option that acts in general does nothing where it is written, or None."""
    if st.marked_init and "]." in path:
        return INIT_ON_VS
    owner = cfg.settings.get(path.split("].", 1)[0] + "]")
    vs = vs_at.get((owner.where.file, owner.where.line, owner.where.col)) if owner is not None else None
    if vs is None or path.count("[") > 1:  # a real_server's or a check's option
        return None
    if st.keyword == "hash_table_size" and not hashed(vs.lb_algo):
        return f"lb_algo {vs.lb_algo} builds no hash table (sh, dh, mh and conhash do)"
    if st.keyword == "hash_target" and vs.lb_algo != "conhash":
        return f"it is conhash's hash key, and lb_algo is {vs.lb_algo}"
    return None


class _AnyIfaces(dict):
    """Interfaces for a dry run of a file that names none (netif_defs): any name is one, as the daemon's own
    command line may give it."""

    def __contains__(self, name) -> bool:
        return isinstance(name, str)

    def __missing__(self, name):
        from hdslb.balancer import Iface

        self[name] = Iface(name, 2 + len(self), b"\x02\x00\x00\x00\x00\x01", 1500)
        return self[name]


def dry_run(cfg, max_services: int = 1 << 20, max_dests: int = 1 << 24, max_hash_cells: int | None = None) -> list[str]:
    """What the daemon's model refuses of the file, found by loading it into an empty model over no datapath
    (hdslb-ctl check: `keepalived -t` for what parsing alone cannot see, such as an mh table size that is not
    prime or a local address on an interface the file does not attach). The errors name the virtual server's
    line, as a start or reload refusing them would. Interfaces: the file's netif_defs devices, else any."""
    from hdslb.balancer import Balancer, Iface, NullDataPath
    from hdslb.ctl import commands

    names = cfg.netif_defs.interfaces
    ifaces = {n: Iface(n, 2 + i, bytes([2, 0, 0, 0, 0, i + 1]), 1500) for i, n in enumerate(names)} if names \
        else _AnyIfaces()
    bal = Balancer(NullDataPath(), ifaces, max_services=max_services, max_dests=max_dests,
                   **({"max_hash_cells": max_hash_cells} if max_hash_cells is not None else {}))
    first = names[0] if names else "eth0"
    want = desired(cfg, lambda addr: first)
    # a SNAT service's source addresses are sapool addresses dpip adds at run time (dpip.conf, a script): taken as
    # there, since the file cannot say whether they will be
    for w in want.values():
        if w.match is not None:
            for addr, _ in w.dests:
                if addr != "0.0.0.0" and not any(str(ad.addr) == addr for ad in bal.addrs):
                    bal.addr_add({"addr": addr, "prefixlen": 32, "ifname": first, "sapool": True})
    ops = plan(bal, want, set())
    where = {w.key: w.where for w in want.values()}
    try:
        run_tagged(bal, commands.ScratchCtx(bal), ops)
    except HdslbError as e:
        return [refusal(e, getattr(e, "tag", None), ops, where, cfg.source, bal)]
    return []


def run_tagged(bal, ctx, ops: list) -> None:
    """The ops as one batch on bal through ctx (Balancer.deferred: each touched service's table built once, at the
    end, from its final real servers). A refusal raises its HdslbError with .tag, the index of the op it belongs
    to: a table that cannot be built at the end is tagged with the last op that touched that service."""
    from hdslb.ctl import commands

    with bal.deferred() as batch:
        for i, (op, args) in enumerate(ops):
            batch.tag = i
            try:
                commands.dispatch(ctx, op, args)
            except HdslbError as e:
                e.tag = i
                batch.dirty.clear()  # refused: the model's tables need not be built
                raise


def _endpoint_text(addr, port) -> str:
    host = f"[{addr}]" if ":" in str(addr) else str(addr)
    return host if port is None else f"{host}:{port}"


def _value_text(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, dict):
        return ",".join(f"{k}={_value_text(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ",".join(_value_text(x) for x in v)
    return str(v)


def op_line(op: str, args: dict) -> str:
    """A control op as `hdslb-ctl reload` lists the changes it applied, one readable line (it printed the op's
    Python dict): `dest.edit tcp 10.0.0.100:80 192.168.100.2:80 weight=4`, `service.add match
    proto=tcp,src_range=... sched=rr`."""
    a = dict(args)
    svc = a.pop("svc", None)
    if svc is None and op.startswith("service.") and ("match" in a or "addr" in a):
        svc = {k: a.pop(k) for k in ("match", "proto", "addr", "port") if k in a}
    parts = [op]
    if isinstance(svc, dict):
        if isinstance(svc.get("match"), dict):
            parts.append(f"match {_value_text(svc['match'])}")
        else:
            parts.append(f"{svc.get('proto', '?')} {_endpoint_text(svc.get('addr'), svc.get('port'))}")
    if "addr" in a:
        parts.append(_endpoint_text(a.pop("addr"), a.pop("port", None)))
    parts += [f"{k}={_value_text(v)}" for k, v in a.items() if v is not None]
    return " ".join(parts)


def refusal(e: HdslbError, i, ops: list, where: dict, source, bal) -> str:
    """A refused config op as the daemon and `check` report it: the line of the virtual_server it belongs to."""
    op, args = ops[i] if isinstance(i, int) and 0 <= i < len(ops) else ("", {})
    svc = args.get("svc", args)
    try:
        key = bal.svc_key(svc)
    except HdslbError:
        # the op's service cannot be named by the model (a SNAT match on an interface it does not manage): by
        # the match as the file wrote it, the key `where` has
        try:
            key = match_key(svc["match"]) if isinstance(svc, dict) and isinstance(svc.get("match"), dict) else None
        except (HdslbError, KeyError):
            key = None
    what = f"{op} {args['addr']}" if args.get("addr") else op
    return f"{where.get(key, source)}: {what}: {e.message}"
