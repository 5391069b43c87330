"""The keyword table: every keyword hdslb.conf accepts, its type, default, whether it applies under XDP, and
whether it only takes effect at start. One table, read by the loader, the reload diff and the docs.

A keyword either fills a dataclass field (model.py, same name unless `field=` says otherwise) or carries
`na=` — the reason it means nothing to an XDP design. Not-applicable keywords still load (so DPVS and
keepalived configs keep working) and are still type-checked, but each use yields a Notice the daemon logs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from hdslb.ctl.protocol import DEFAULT_CTL_SOCKET
from hdslb.fastpath.loader import CONN_TABLE_CHOICES

from . import model as m
from .kinds import (IFNAME, IP, MAX_RANGE, NAME, PATH, Bad, Choice, DottedMask, Flag, Granularity, Hex, Int,
                    IntList, IPPort, Kind, LbKind, LvsTimeouts, OnOff, OptionalInt, Port, Script, Seconds, StatusCodes,
                    Str, Text, ip_of, ip_range, networks_of)
from .syntax import Node

MISSING: Any = object()


@dataclass(frozen=True)
class Key:
    """A leaf option: `keyword value…`."""

    kind: Kind
    default: Any = None
    field: Optional[str] = None  # dataclass attribute; None: the keyword itself
    na: Optional[str] = None  # why it has no effect under XDP (accepted, noticed)
    init: bool = False  # takes effect only at start: changing it needs a restart
    multi: bool = False  # may repeat; the field is a tuple
    required: bool = False
    aliases: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Block:
    """A `keyword [header] { … }` block building `build(**fields)`; build None: no value (nothing applies)."""

    build: Optional[Callable[..., Any]]
    children: Mapping[str, Union[Key, "Block"]] = dataclasses.field(default_factory=dict)
    header: Optional[Callable[[Node], Dict[str, Any]]] = None  # the words before `{` → fields
    entries: Optional[Callable[[Node], List[Any]]] = None  # a list block: each line is one entry
    entries_field: Optional[str] = None  # the field the entries fill; None: build(entries) itself
    default: Any = MISSING  # value when the block is absent (else: built from its children's defaults)
    field: Optional[str] = None  # as for Key
    na: Optional[str] = None  # as for Key; the block's options are still type-checked
    init: bool = False  # as for Key, for every option inside
    multi: bool = False
    collect: str = "tuple"  # for multi: "tuple" in file order, or "dict" by `key`
    key: Optional[Callable[[Any], Any]] = None  # identity among repeats: a duplicate is an error
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # constant constructor arguments
    opaque: bool = False  # another daemon's block: accepted whole, never read
    check: Optional[Callable[[Node, Any, Any], Any]] = None  # cross-field rules; may return a normalised value
    aliases: Tuple[str, ...] = ()
    required: bool = False
    refuse: Optional[str] = None  # a keyword known and refused: the file does not load, and this says why
    # keywords not in `children` looked up by this (e.g. keepalived's vrrp_* globals); None: none
    others: Optional[Callable[[str], Optional["Block"]]] = None


Spec = Union[Key, Block]


# ---------------------------------------------------------------- headers and list entries


def granularity_v6_error(g) -> str:
    """Why an IPv6 virtual server cannot take this persistence_granularity, or "": keepalived reads a prefix length
    1..128 there (pgr_handler); a dotted IPv4 netmask would have meant /24 of IPv6, one template for nearly every
    client."""
    if isinstance(g, DottedMask):
        return "an IPv6 virtual server takes a prefix length 1..128, not an IPv4 netmask"
    if not 1 <= g <= 128:
        return f"{g} is not an IPv6 prefix length 1..128"
    return ""


def named(node: Node, kind: Kind = NAME) -> Dict[str, Any]:
    if len(node.args) != 1:
        raise Bad(f"expects one name before '{{', e.g. `{node.name} NAME {{`",
                  node.args[1] if len(node.args) > 1 else None)
    return {"name": kind.one(node.args[0])}


def _ifname(node: Node) -> Dict[str, Any]:
    return named(node, IFNAME)


def _vs_header(node: Node) -> Dict[str, Any]:
    a = node.args
    first = a[0].text if a else ""
    if first == "group":
        if len(a) != 2:
            raise Bad("expects `virtual_server group NAME {`", a[2] if len(a) > 2 else None)
        return {"ip": None, "port": None, "group": NAME.one(a[1]), "match": None}
    if first == "fwmark":
        raise Bad("fwmark services match netfilter marks, and XDP runs before netfilter; "
                  "declare `virtual_server IP PORT` or a virtual_server_group", a[0])
    if first == "match":
        if len(a) != 2:
            raise Bad("expects `virtual_server match NAME {` (a SNAT service, selected by src-range, dst-range, "
                      "iif and oif)", a[2] if len(a) > 2 else None)
        return {"ip": None, "port": None, "group": None, "match": NAME.one(a[1])}
    if len(a) != 2:
        raise Bad("expects `virtual_server IP PORT {`, `virtual_server group NAME {` or `virtual_server match NAME {`",
                  a[2] if len(a) > 2 else None)
    return {"ip": ip_of(a[0]), "port": Port(0).one(a[1]), "group": None, "match": None}


def _rs_header(node: Node) -> Dict[str, Any]:
    if len(node.args) not in (1, 2):
        raise Bad("expects `real_server IP [PORT] {`", node.args[2] if len(node.args) > 2 else None)
    # keepalived: no port is the virtual server's port (filled in by _vs_check)
    return {"ip": ip_of(node.args[0]), "port": Port(0).one(node.args[1]) if len(node.args) == 2 else None}


def _vsg_entry(node: Node) -> List[m.Endpoint]:
    if node.name == "fwmark":
        raise Bad("fwmark members match netfilter marks, and XDP runs before netfilter", node.keyword)
    if len(node.args) != 1:
        raise Bad("expects `IP PORT` or `IP-RANGE PORT` (10.0.0.1-9 80)", node.args[1] if node.args else None)
    port = Port().one(node.args[0])
    if "/" in node.name:
        return [m.Endpoint(ip, port) for ip in _vsg_network(node.keyword)]
    return [m.Endpoint(ip, port) for ip in ip_range(node.keyword)]


def _vsg_network(tok) -> List[Any]:
    """keepalived 2.2's `IP/LEN PORT` group member (check_data.c alloc_vsg_entry): every address of the network,
    which must be written as the network (no host bits) and be longer than /0."""
    try:
        net = ipaddress.ip_network(tok.text, strict=True)
    except ValueError as e:
        raise Bad(f"{tok.text!r} is not a network ({e})", tok) from None
    if net.prefixlen == 0:
        raise Bad(f"{tok.text!r}: a /0 group member is every address", tok)
    if net.num_addresses > MAX_RANGE:
        raise Bad(f"{tok.text!r} covers {net.num_addresses} addresses, more than {MAX_RANGE}", tok)
    return list(net)


def _laddr_entry(node: Node) -> List[m.LocalAddress]:
    if len(node.args) > 1:
        raise Bad("expects `IP [INTERFACE]` or `IP-RANGE [INTERFACE]`", node.args[1])
    ifname = IFNAME.one(node.args[0]) if node.args else None
    return [m.LocalAddress(ip, ifname) for ip in ip_range(node.keyword)]


def _net_entry(node: Node) -> List[m.IPNetwork]:
    if node.args:
        raise Bad("expects one address, range or CIDR per line", node.args[0])
    return networks_of(node.keyword)


def _word_entry(node: Node) -> List[str]:
    return [node.name] + [t.text for t in node.args]


_REUSE_STATES = ("close", "time_wait", "fin_wait", "close_wait", "last_ack")


def _state_entry(node: Node) -> List[str]:
    if node.args:
        raise Bad("a TCP state name takes no value", node.args[0])
    if node.name not in _REUSE_STATES:
        raise Bad(f"{node.name!r} is not one of " + "|".join(_REUSE_STATES), node.keyword)
    return [node.name]


# ---------------------------------------------------------------- cross-field rules (run after a block is read)


def _worker_defs_check(node: Node, wd: m.WorkerDefs, ctx) -> m.WorkerDefs:
    by_cpu: Dict[int, m.Worker] = {}
    for w in wd.worker:
        if w.cpu_id in by_cpu:
            ctx.error(w.where, "cpu_id", f"cpu {w.cpu_id} is already used by worker {by_cpu[w.cpu_id].name}")
        by_cpu[w.cpu_id] = w
        if w.type == "master":
            ctx.notice(w.where, "worker", "the master lcore is the asyncio controller; the OS schedules it "
                       "(pin it with systemd CPUAffinity= if wanted)")
    return wd


def _rs_check(node: Node, rs: m.RealServer, ctx) -> m.RealServer:
    if rs.uthreshold is not None and rs.lthreshold is not None and rs.lthreshold > rs.uthreshold:
        ctx.error(ctx.where_of(node, "lthreshold"), "lthreshold",
                  f"{rs.lthreshold} is above uthreshold {rs.uthreshold}")
    return rs


def _url_check(node: Node, url: m.HttpUrl, ctx) -> m.HttpUrl:
    if url.password is not None and url.username is None:
        ctx.error(ctx.where_of(node, "password"), "password", "needs a username (HTTP basic authentication)")
    return url


def _ssl_check(node: Node, tls: m.SslDefs, ctx) -> m.SslDefs:
    """keepalived's SSL block (check_ssl.c build_ssl_ctx): a certificate, key or CA that does not load stops
    keepalived at start; here the file is refused at the line naming it. The key is the certificate's: a key
    alone presents nothing."""
    from hdslb.health.http import tls_client_context, tls_problem

    if tls.key is not None and tls.certificate is None:
        ctx.error(ctx.where_of(node, "key"), "key", "needs `certificate`: it is the client certificate's key")
        return tls
    bad = tls_problem(tls)
    if bad is not None:
        keyword, reason = bad
        ctx.error(ctx.where_of(node, keyword), keyword, reason)
        return tls
    tls_client_context(tls)  # loads: the first probe does not pay for it
    if tls.ca is not None:
        ctx.notice(ctx.where_of(node, "ca"), "ca", "accepted, not acted on: loaded, but, as keepalived, SSL_GET "
                                                   "verifies no server certificate: it judges the answer, not trust")
    if tls.password is not None and tls.certificate is None:
        ctx.notice(ctx.where_of(node, "password"), "password", "accepted, not acted on: it unlocks a `key`, and there "
                                                               "is none")
    return tls


def _fill_ports(node: Node, vs: m.VirtualServer, ctx) -> m.VirtualServer:
    """keepalived (check_data.c, validate_check_config): a real server or sorry server written without a port
    takes the virtual server's. In a `virtual_server group` one written without a port (or with port 0, as
    keepalived reads it) takes each member's (ipvswrapper.c: port 0 is the virtual port), kept here as port 0;
    its network checks then need a connect_port. A SNAT service has no one port to give: there a port must be
    written."""
    label = " ".join(a.text for a in node.args)
    rss, seen = [], {}
    for rs in vs.real_servers:
        filled = rs.port is None
        if vs.group is not None and rs.port in (None, 0):
            rs = _replace(rs, port=0)
            for c in rs.checkers:
                if hasattr(c, "connect_port") and c.connect_port is None:
                    ctx.error(c.where if getattr(c, "where", None) else rs.where, "connect_port",
                              f"real_server {rs.ip} has no port of its own (it takes each member's of group "
                              f"{vs.group}): its {c.kind} needs a connect_port")
        elif filled:
            if vs.port is None:
                ctx.error(rs.where, "real_server", f"{rs.ip}: needs a port: virtual_server {label} has no single "
                                                   f"port to give it (`real_server IP PORT`)")
                continue
            rs = _replace(rs, port=vs.port)
        first = seen.get(rs.key)
        if first is not None:
            if filled or first[1]:  # two written alike are refused when the servers are collected
                ctx.error(rs.where, "real_server", f"duplicate real_server {m.Endpoint(rs.ip, rs.port)} in "
                                                   f"virtual_server {label} (first at {first[0]})")
            continue
        seen[rs.key] = (rs.where, filled)
        rss.append(rs)
    sorry = vs.sorry_server
    if sorry is not None and vs.group is not None and sorry.port in (None, 0):
        sorry = m.Endpoint(sorry.ip, 0)  # each member's port
    elif sorry is not None and sorry.port is None:
        if vs.port is None:
            ctx.error(ctx.where_of(node, "sorry_server"), "sorry_server",
                      f"needs a port: virtual_server {label} has no single port to give it")
            sorry = None
        else:
            sorry = m.Endpoint(sorry.ip, vs.port)
    return _replace(vs, real_servers=tuple(rss), sorry_server=sorry)


def _vs_check(node: Node, vs: m.VirtualServer, ctx) -> m.VirtualServer:
    vs = _fill_ports(node, vs, ctx)
    kind = vs.lb_kind
    if vs.match is not None:
        return _match_check(node, vs, ctx)
    if kind == "SNAT":
        ctx.error(ctx.where_of(node, "lb_kind"), "lb_kind",
                  "a SNAT service is `virtual_server match NAME { lb_kind SNAT; src-range …; oif … }` "
                  "(DPVS keepalived): it has no VIP")
    for kw in ("src-range", "dst-range", "iif", "oif"):
        if getattr(vs, kw.replace("-", "_")) is not None:
            ctx.error(ctx.where_of(node, kw), kw, "belongs to SNAT `virtual_server match NAME` services")
    if vs.protocol == "ICMP":
        ctx.error(ctx.where_of(node, "protocol"), "protocol", "ICMP is for SNAT match services only")
    if vs.port == 0:
        ctx.error(node.args[1].where, "virtual_server", "port 0 is only for SNAT services, which are "
                  "`virtual_server match NAME`")
    if vs.ops and vs.protocol != "UDP":
        ctx.error(ctx.where_of(node, "ops"), "ops", "one-packet scheduling is for protocol UDP")
    if vs.syn_proxy and vs.protocol != "TCP":
        ctx.error(ctx.where_of(node, "syn_proxy"), "syn_proxy", "needs protocol TCP")
    if vs.persistence_granularity is not None and vs.ip is not None and vs.ip.version == 4 \
            and vs.persistence_granularity > 32:
        ctx.error(ctx.where_of(node, "persistence_granularity"), "persistence_granularity",
                  f"/{vs.persistence_granularity} is longer than an IPv4 address")
    if vs.persistence_granularity is not None and vs.ip is not None and vs.ip.version == 6:
        why = granularity_v6_error(vs.persistence_granularity)
        if why:
            ctx.error(ctx.where_of(node, "persistence_granularity"), "persistence_granularity", why)
    if vs.sorry_server is not None and vs.sorry_server.port == 0 and kind != "SNAT" and vs.group is None:
        ctx.error(ctx.where_of(node, "sorry_server"), "sorry_server", "port 0 is only for SNAT services")
    rss = []
    for rs in vs.real_servers:
        if rs.port == 0 and kind != "SNAT" and vs.port != 0 and vs.group is None:
            ctx.error(rs.where, "real_server", f"{rs.ip} port 0 is only for SNAT services (lb_kind SNAT)")
        if kind in ("NAT", "DR", "TUNNEL") and vs.ip is not None and rs.ip.version != vs.ip.version:
            ctx.error(rs.where, "real_server", f"IPv{rs.ip.version} real server behind an IPv{vs.ip.version} "
                      f"service needs lb_kind FNAT (NAT64/46)")
        if kind in ("DR", "TUNNEL") and vs.port is not None and rs.port not in (vs.port, 0):
            ctx.error(rs.where, "real_server", f"{kind} cannot rewrite ports: the real server port must be "
                      f"the virtual port {vs.port}")
        rss.append(_inherit(rs, vs))
    for kw, name in (("laddr_group_name", vs.laddr_group_name), ("daddr_group_name", vs.daddr_group_name),
                     ("waddr_group_name", vs.waddr_group_name)):
        if name is not None:
            ctx.ref(kw, name, ctx.where_of(node, kw))
    if vs.group is not None:
        ctx.ref("virtual_server group", vs.group, node.args[1].where)
    # keepalived (check_parser.c pgr_handler): persistence_granularity alone turns persistence on, for 360 s
    pto = vs.persistence_timeout or (360 if vs.persistence_granularity is not None else 0)
    return _replace(vs, real_servers=tuple(rss), persistence_timeout=pto)


def _match_check(node: Node, vs: m.VirtualServer, ctx) -> m.VirtualServer:
    """A SNAT match service: its real servers are IPv4 source addresses (port 0) without health checks."""
    if vs.lb_kind != "SNAT":
        ctx.error(ctx.where_of(node, "lb_kind") or node.keyword.where, "lb_kind",
                  "a `virtual_server match` service needs lb_kind SNAT")
    for kw in ("src-range", "dst-range"):
        text = getattr(vs, kw.replace("-", "_"))
        if text is not None:
            try:
                _snat_range(text)
            except ValueError as e:
                ctx.error(ctx.where_of(node, kw), kw, str(e))
    if vs.persistence_timeout or vs.persistence_granularity is not None:
        ctx.error(ctx.where_of(node, "persistence_timeout") or ctx.where_of(node, "persistence_granularity"),
                  "persistence_timeout", "SNAT services have no persistence (use lb_algo sh to keep a host on "
                  "one source address)")
    if vs.laddr_group_name is not None:
        ctx.error(ctx.where_of(node, "laddr_group_name"), "laddr_group_name",
                  "a SNAT service's source addresses are its real servers (IP 0), not a local_address_group")
    for rs in vs.real_servers:
        if rs.ip.version != 4:
            ctx.error(rs.where, "real_server", f"{rs.ip}: SNAT is IPv4 only")
        if rs.port != 0:
            ctx.error(rs.where, "real_server", f"{rs.ip} {rs.port}: a SNAT real server is a source address, "
                      f"written `real_server IP 0`")
        if rs.checkers:
            ctx.error(rs.where, "real_server", f"{rs.ip}: a SNAT source address takes no health check")
    return vs


def _snat_range(text: str):
    """DPVS RANGE (IP or IP1-IP2, an optional :0-0); the model re-checks it, this reports it at its line."""
    if text.count(":") > 1 or text.startswith("["):  # IPv6 (IPv4's :PORT has one colon at most), as the model says
        raise ValueError(f"{text!r}: SNAT is IPv4 only")
    addrs, _, ports = text.partition(":")
    if ports not in ("", "0", "0-0"):
        raise ValueError(f"{text!r}: port ranges are not supported by the fast path's SNAT rules")
    lo, _, hi = addrs.partition("-")
    try:
        a, b = ipaddress.ip_address(lo), ipaddress.ip_address(hi or lo)
    except ValueError:
        raise ValueError(f"{text!r} is not an address range (IP or IP1-IP2)") from None
    if a.version != 4 or b.version != 4:
        raise ValueError(f"{text!r}: SNAT is IPv4 only")
    if b < a:
        raise ValueError(f"{text!r} ends before it starts")
    return a, b


def _first(*values):
    return next((v for v in values if v is not None), None)


def _inherit(rs: m.RealServer, vs: m.VirtualServer) -> m.RealServer:
    """keepalived's defaults flow down (check_api.c): a checker's retry, delay_before_retry, warmup,
    connect_timeout, delay_loop and virtualhost are its own, else its real server's, else its virtual server's,
    else the checker kind's (retry 1, MISC_CHECK 0; delay_before_retry 1 s, HTTP_GET/SSL_GET 3 s; connect_timeout
    5 s); inhibit_on_failure set on the service holds for every server."""
    checkers = []
    for c in rs.checkers:
        http = c.kind in ("HTTP_GET", "SSL_GET")
        c = _replace(c, delay_loop=_first(c.delay_loop, rs.delay_loop, vs.delay_loop),
                     retry=_first(c.retry, rs.retry, vs.retry, 0 if c.kind == "MISC_CHECK" else 1),
                     delay_before_retry=_first(c.delay_before_retry, rs.delay_before_retry, vs.delay_before_retry,
                                               3.0 if http else 1.0),
                     warmup=_first(c.warmup, rs.warmup, vs.warmup))
        if isinstance(c, m.NetChecker):
            c = _replace(c, connect_timeout=_first(c.connect_timeout, rs.connect_timeout, vs.connect_timeout, 5.0))
        if isinstance(c, m.HttpCheck):
            c = _replace(c, virtualhost=_first(c.virtualhost, rs.virtualhost, vs.virtualhost))
        if isinstance(c, m.MiscCheck) and c.misc_timeout is None:
            c = _replace(c, misc_timeout=c.delay_loop)
        checkers.append(c)
    return _replace(rs, inhibit_on_failure=rs.inhibit_on_failure or vs.inhibit_on_failure,
                    checkers=tuple(checkers))


def _replace(obj, **changes):
    return dataclasses.replace(obj, **changes)


# ---------------------------------------------------------------- reasons shared by several keywords

NO_MBUF_POOL = "XDP works in the driver's own RX buffers; there is no mbuf pool to size"
RINGS = "ring sizes belong to the driver: set them with `ethtool -G DEV rx N tx N`"
RSS = "RSS is the NIC's (`ethtool -X`); the XDP program runs on whichever CPU RSS picks"
SHARED_CONNS = "the conn map is shared by every CPU, so no packet has to reach the CPU that saw the first one"
KNI = "XDP_PASS to the kernel is the KNI: traffic that is not for a service goes up the kernel's own " \
      "interface, and no extra device is created"
QUEUES_TO_CPUS = "XDP runs on the CPU servicing each RX queue's interrupt; place queues with IRQ affinity, " \
                 "not per-port queue lists"
LINK_LOCAL = "hdslb makes no IPv6 link-local address: the kernel's interface has its own (the addr_gen_mode and " \
             "stable_secret sysctls of net.ipv6.conf.DEV)"
NO_FDIR = "no flow director rules are needed: " + SHARED_CONNS
FDIR_MODES = ("perfect", "signature", "none", "perfect_mac_vlan", "perfect_tunnel")  # DPVS's (dpvs.conf.items)
KERNEL_FORWARDS = "packets not for a service are passed to the kernel (XDP_PASS); its forwarding sysctl decides"
NO_LCORES = "there are no lcores to message: the controller writes BPF maps directly"
NO_MAIL = "hdslb sends no mail and runs no VRRP; state changes are logged and exported as metrics"
VRRP = "VRRP is not part of hdslb; run keepalived's vrrp process (or a routing daemon) alongside to move VIPs"
KERNEL_ADDRS = "addresses and routes are set with dpip (or ip), not at load time"

SCHEDULERS = ("rr", "wrr", "lc", "wlc", "sh", "dh", "mh", "conhash", "fo")
_LVS_ONLY = "is an LVS scheduler hdslb does not implement; use one of " + "|".join(SCHEDULERS)

_SECONDS = Int(1, m.MAX_TIMEOUT_S, "seconds")


def _opaque(reason: str) -> Block:
    return Block(None, opaque=True, na=reason, multi=True)


def _refused(reason: str) -> Block:
    """A keepalived keyword (a block or an option) that hdslb cannot honour and must not ignore: ignoring it would
    change which servers get traffic, so the file is refused at its line with this reason."""
    return Block(None, refuse=reason, multi=True)


_NOT_A_CHECKER = "is a keepalived health checker hdslb does not implement (it has TCP_CHECK, HTTP_GET, SSL_GET, " \
                 "UDP_CHECK, SMTP_CHECK and MISC_CHECK); ignoring it would keep the server in the pool whatever its " \
                 "health"


def _netcheck(kind: str, build: type, extra: Mapping[str, Spec], check=None) -> Block:
    """TCP_CHECK, HTTP_GET, SSL_GET and UDP_CHECK share keepalived's connect options."""
    return Block(build, {**_CHECK_COMMON, **_CONNECT, **extra}, multi=True, field="checkers",
                 fixed={"kind": kind}, check=check)


def _udp_check(node: Node, c: m.UdpCheck, ctx) -> m.UdpCheck:
    """keepalived (check_udp.c): min_reply_length above max_reply_length fails every probe, and the two are read only
    when a reply is compared with require_reply DATA."""
    if c.min_reply_length > c.max_reply_length:
        ctx.error(ctx.where_of(node, "min_reply_length"), "min_reply_length",
                  f"{c.min_reply_length} is above max_reply_length {c.max_reply_length}: every reply would fail the "
                  f"check")
    elif not c.require_reply:
        for child in node.body or ():
            if child.name in ("min_reply_length", "max_reply_length"):
                ctx.notice(child.where, child.name, "accepted, not acted on: a reply's length is judged only with "
                                                    "`require_reply DATA` (as keepalived judges it)")
    return c


# None: from the real server, the virtual server, or the checker kind's default (_inherit)
_CHECK_COMMON: Mapping[str, Spec] = {
    "retry": Key(Int(0, 100), None, aliases=("nb_get_retry", "nb_sock_retry")),
    "delay_before_retry": Key(Seconds(0, 3600), None),
    "delay_loop": Key(Seconds(0.001, 86400), None),
    "warmup": Key(Seconds(0, 86400), None),
    "alpha": _refused("alpha is read per virtual_server here (every server of it starts down): set it there"),
    "log_all_failures": _opaque("hdslb logs a checker's state changes; every failure is counted in health.list "
                                "(failures, last_failure)"),
}
# keepalived 2: the same options on a real_server or virtual_server are its checkers' defaults
_CHECK_DEFAULTS: Mapping[str, Spec] = {
    "retry": Key(Int(0, 100), None),
    "delay_before_retry": Key(Seconds(0, 3600), None),
    "warmup": Key(Seconds(0, 86400), None),
    "connect_timeout": Key(Seconds(0.001, 3600), None),
}
_CONNECT: Mapping[str, Spec] = {
    "connect_ip": Key(IP(), None),
    "connect_port": Key(Port(), None),
    "bindto": Key(IP(), None),
    "bind_port": Key(Port(), None),
    "connect_timeout": Key(Seconds(0.001, 3600), None),
    "bind_if": _refused("probes leave by the route to the server: binding them to an interface is not implemented "
                        "(bindto an address of it instead)"),
    "fwmark": _refused("marking a check's packets (SO_MARK, for policy routing) is not implemented: the probes "
                       "would take the main table's route"),
}
_HTTP: Mapping[str, Spec] = {
    "url": Block(m.HttpUrl, {
        "path": Key(Str(r"/\S*", "a URL path starting with /"), required=True),
        "status_code": Key(StatusCodes(), ()),
        "digest": Key(Str(r"[0-9a-fA-F]{32}", "an md5 digest (32 hex digits)"), None),
        # HTTP basic authentication; RFC 7617: the user name cannot hold a ':'
        "username": Key(Str(r"[^:\x00-\x1f\x7f]+", "a user name (no ':' or control characters)"), None),
        "password": Key(Str(r"[^\x00-\x1f\x7f]*", "a password (no control characters)"), None),
        "tls_compliant": Key(Flag(), False, na="hdslb's SSL_GET ends every probe the same way (a reset, no TLS "
                                               "close_notify) and judges only the status and digest"),
        "virtualhost": Key(Str(), None),
        **dict.fromkeys(("regex", "regex_no_match", "regex_options", "regex_stack", "regex_min_offset",
                         "regex_max_offset", "regex_use_jit"), _refused(
            "matching the body with a regex is not implemented: the check would pass on any body; use digest or "
            "status_code, or a MISC_CHECK")),
    }, multi=True, check=_url_check),
    "virtualhost": Key(Str(), None),
    # keepalived's request forms: 1.0, 1.0C (with Connection: close) and 1.1; hdslb sends Connection: close always
    "http_protocol": Key(Choice("1.0", "1.0C", "1.1", fold=str.upper), "1.0C"),
    "enable_sni": Key(Flag(), False),
    "fast_recovery": _refused("fast_recovery (checking a down server every delay_before_retry) is not implemented: a "
                              "recovered server would come back later than keepalived brings it"),
}

_PER_SERVER_METHOD = _refused("every real server of a service is forwarded one way, the service's lb_kind: a "
                              "server forwarded differently needs a service of its own")
_SNMP_NAME = Key(Str(), None, na="hdslb exports its state as Prometheus metrics and over REST, not over SNMP")

_REAL_SERVER = Block(m.RealServer, {
    "weight": Key(Int(0, 65535), 1),
    **_CHECK_DEFAULTS,
    "delay_loop": Key(Seconds(0.001, 86400), None),
    "virtualhost": Key(Str(), None),
    "smtp_alert": Key(Flag(), False, na=NO_MAIL),
    "snmp_name": _SNMP_NAME,
    "lvs_method": _PER_SERVER_METHOD,
    "alpha": _refused("alpha is read per virtual_server here (every server of it starts down): set it there"),
    "inhibit_on_failure": Key(Flag(), False),
    "uthreshold": Key(Int(0, 2**31 - 1), None),
    "lthreshold": Key(Int(0, 2**31 - 1), None),
    "notify_up": Key(Script(), None),
    "notify_down": Key(Script(), None),
    "TCP_CHECK": _netcheck("TCP_CHECK", m.TcpCheck, {}),
    "HTTP_GET": _netcheck("HTTP_GET", m.HttpCheck, _HTTP),
    "SSL_GET": _netcheck("SSL_GET", m.HttpCheck, _HTTP),
    "UDP_CHECK": _netcheck("UDP_CHECK", m.UdpCheck, {
        "payload": Key(Hex(), None),
        "require_reply": Key(Hex(optional=True), None),
        "min_reply_length": Key(Int(0, 65535, "bytes"), 0),
        "max_reply_length": Key(Int(0, 65535, "bytes"), m.UDP_MAX_REPLY_LENGTH),
    }, check=_udp_check),
    "SMTP_CHECK": _netcheck("SMTP_CHECK", m.SmtpCheck, {
        "helo_name": Key(Str(r"[^\x00-\x1f\x7f]+", "a name to send in HELO"), "smtpchecker.keepalived.org"),
        # keepalived's older form: one dialogue per host, each host's connect options over the check's own
        "host": Block(m.SmtpHost, {kw: dataclasses.replace(spec, default=None) for kw, spec in _CONNECT.items()},
                      multi=True, field="hosts"),
    }),
    **{kind: _refused(f"{kind} {_NOT_A_CHECKER}") for kind in ("PING_CHECK", "DNS_CHECK", "BFD_CHECK",
                                                                  "FILE_CHECK")},
    "MISC_CHECK": Block(m.MiscCheck, {
        **_CHECK_COMMON,
        "misc_path": Key(Text(), required=True),
        "misc_timeout": Key(Seconds(0.001, 86400), None),
        "misc_dynamic": Key(Flag(), False),
        "user": Key(Text(), None),
    }, multi=True, field="checkers", fixed={"kind": "MISC_CHECK"}),
}, header=_rs_header, multi=True, field="real_servers", key=lambda rs: str(m.Endpoint(rs.ip, rs.port)),
    check=_rs_check)

_VIRTUAL_SERVER = Block(m.VirtualServer, {
    "delay_loop": Key(Seconds(0.001, 86400), 60.0),  # keepalived 2: fractional, as a checker's (read_timer)
    **_CHECK_DEFAULTS,
    "smtp_alert": Key(Flag(), False, na=NO_MAIL),
    "snmp_name": _SNMP_NAME,
    "ip_family": Key(Choice("inet", "inet6"), None, na="a service's address family is its addresses' (keepalived "
                                                        "needs it only for fwmark services)"),
    "hashed": Key(Flag(), False, na="IPVS's internal 'hashed' flag: hdslb looks every service up by hash"),
    "weight": Key(Int(1, 65535), None, na="a virtual server's weight is for tracking by keepalived's VRRP "
                                          "(track_process/track_file), which hdslb does not run"),
    **dict.fromkeys(("flag-1", "flag-2", "flag-3"), _refused(
        "write the scheduler flag by its name: sh-fallback / mh-fallback (flag-1), sh-port / mh-port (flag-2)")),
    "persistence_engine": _refused("persistence engines (sip) are not implemented: persistence is by client address "
                                   "(persistence_timeout, persistence_granularity)"),
    "sorry_server_lvs_method": _PER_SERVER_METHOD,
    "lb_algo": Key(Choice(*SCHEDULERS, refuse={s: _LVS_ONLY for s in ("lblc", "lblcr", "sed", "nq", "ovf", "twos")}),
                   "wlc", aliases=("lvs_sched",)),
    "lb_kind": Key(LbKind("NAT", "DR", "TUNNEL", "FNAT", "SNAT", aliases={"TUN": "TUNNEL"}),
                   "NAT", aliases=("lvs_method",)),
    "protocol": Key(Choice("TCP", "UDP", "ICMP",
                           refuse={"SCTP": "is not handled by the XDP fast path (TCP and UDP are)"}), "TCP"),
    "persistence_timeout": Key(OptionalInt(360, 0, 2**31 - 1, "seconds"), 0),
    "persistence_granularity": Key(Granularity(), None),
    "sh-port": Key(Flag(), False, field="sh_port"),
    "sh-fallback": Key(Flag(), False, field="sh_fallback"),
    "mh-port": Key(Flag(), False, field="mh_port"),
    "mh-fallback": Key(Flag(), False, field="mh_fallback"),
    "hash_table_size": Key(Int(1, 1 << 26, "buckets"), None),
    "src-range": Key(Text(), None, field="src_range"),
    "dst-range": Key(Text(), None, field="dst_range"),
    "iif": Key(IFNAME, None),
    "oif": Key(IFNAME, None),
    "virtualhost": Key(Str(), None),
    "alpha": Key(Flag(), False),
    "omega": Key(Flag(), False),
    "quorum": Key(Int(1, 2**31 - 1), 1),
    "hysteresis": Key(Int(0, 2**31 - 1), 0),
    "quorum_up": Key(Script(), None),
    "quorum_down": Key(Script(), None),
    "sorry_server": Key(IPPort(port_lo=0, port_optional=True), None),
    "sorry_server_inhibit": Key(Flag(), False),
    "inhibit_on_failure": Key(Flag(), False),
    "ha_suspend": Key(Flag(), False),
    "ops": Key(Flag(), False),
    "syn_proxy": Key(Flag(), False),
    "establish_timeout": Key(Int(1, 3600, "seconds"), None),
    "laddr_group_name": Key(NAME, None),
    # DPVS keepalived's (tools/keepalived check_parser.c): its VIP's device, a bandwidth limit, conhash's key
    "vip_bind_dev": Key(IFNAME, None, na="a virtual server's VIP is the balancer's on every interface hdslbd attaches "
                                         "(ARP/ND answered there): there is no device to add it to, as DPVS's keepalived "
                                         "does"),
    **dict.fromkeys(("bps", "limit_proportion"), Key(Text(), None, na="per-service bandwidth limits are not "
                                                                      "implemented: the service's traffic is not "
                                                                      "limited")),
    "hash_target": Key(Choice("sip", refuse={"qid": "(QUIC connection id) is not implemented: conhash hashes the "
                                                    "client's source address (hash_target sip)"}), None),
    "daddr_group_name": Key(NAME, None),
    "waddr_group_name": Key(NAME, None),
    "real_server": _REAL_SERVER,
    # keepalived's failover pool: backup servers that take over when failover_threshold % of the others fail
    **dict.fromkeys(("backup_real_server", "failover_threshold", "failover_up", "failover_down"), _refused(
        "keepalived's failover pool is not implemented: its backup servers would never get traffic; make them "
        "real_server entries (weight 0 to hold them back) or use sorry_server")),
    "nat_mask": Key(Text(), None, na="keepalived never used it (LVS NAT needs no mask) and dropped it in 2.0"),
}, header=_vs_header, multi=True, field="virtual_servers", key=lambda vs: "/".join(reversed(vs.key)),
    check=_vs_check)


def _group(build: type, entry: Callable[[Node], List[Any]], entries_field: str, field_name: str) -> Block:
    return Block(build, header=named, entries=entry, entries_field=entries_field,
                 multi=True, collect="dict", key=lambda g: g.name, field=field_name)



def _timeouts(build: type, defaults: Mapping[str, int]) -> Block:
    return Block(build, {state: Key(_SECONDS, secs) for state, secs in defaults.items()})


_PROCESS = "keepalived's own process tuning; hdslbd's is systemd's (Nice=, CPUSchedulingPolicy=, LimitMEMLOCK=, …)"
_SNMP = "hdslb exports its state as Prometheus metrics and over REST, not over SNMP or D-Bus"
_KEEPALIVED_GLOBALS = {
    # keepalived 2.x global_defs keywords with no bearing on hdslb's services, by reason
    **dict.fromkeys(("smtp_helo_name", "smtp_alert", "smtp_alert_vrrp", "smtp_alert_checker", "no_email_faults",
                     "no_checker_emails",
                     "notify_fifo", "notify_fifo_script", "lvs_notify_fifo", "lvs_notify_fifo_script",
                     "checker_log_all_failures"), NO_MAIL),
    **dict.fromkeys(("dynamic_interfaces", "default_interface", "max_auto_priority", "min_auto_priority_delay",
                     "log_unknown_vrids", "disable_local_igmp", "fifo_write_vrrp_states_on_reload", "vmac_prefix",
                     "vmac_addr_prefix", "nftables", "nftables_priority", "nftables_ifindex"), VRRP),
    # keepalived's nftables rules that mark a virtual_server_group's packets for an fwmark service
    **dict.fromkeys(("nftables_ipvs", "nftables_ipvs_priority", "nftables_ipvs_start_fwmark", "nftables_counters"),
                    "hdslb adds no netfilter rules: XDP runs before netfilter, and fwmark services are refused"),
    **dict.fromkeys(("process_names", "process_name", "lvs_process_name", "use_pid_dir", "instance", "umask",
                     "linkbeat_use_polling",
                     "random_seed", "reload_check_config", "reload_time_file", "reload_repeat", "reload_file",
                     "config_save_dir", "include_check", "tmp_config_directory", "data_use_instance",
                     "process_monitor_rcv_bufs", "process_monitor_rcv_bufs_force"), _PROCESS),
    **dict.fromkeys(("enable_traps", "enable_dbus", "dbus_service_name", "snmp_socket"), _SNMP),
    "lvs_sync_daemon": "hdslb has no connection sync daemon: a standby balancer that takes over starts without the "
                       "active one's flows (established connections through it are reset)",
    # lvs_flush_on_stop is keepalived 2.1.5+'s spelling of lvs_flush_onstop
    **dict.fromkeys(("lvs_flush", "lvs_flush_onstop", "lvs_flush_on_stop"),
                    "there is no kernel IPVS table to flush: hdslb starts from its own model and leaves services made "
                    "with ipvsadm alone on reload"),
}


def _keepalived_global(kw: str) -> Optional[Block]:
    """keepalived's global_defs keywords that are not in the table: VRRP's (vrrp_*), BFD's, SNMP's, process tuning;
    accepted, with the reason they mean nothing here, so one keepalived.conf serves keepalived's VRRP and hdslb."""
    if kw.startswith("vrrp_"):
        return _opaque(VRRP)
    if kw.startswith("bfd_"):
        return _opaque("BFD is not part of hdslb; run keepalived's bfd process (or a routing daemon) alongside")
    if kw.startswith(("enable_snmp_", "snmp_")):
        return _opaque(_SNMP)
    if kw.startswith(("checker_", "lvs_netlink_")) and kw.endswith(("_priority", "_no_swap", "_rlimit_rttime",
                                                                     "_rlimit_rtime",  # (its pre-2020 spelling)
                                                                     "_process_name", "_rcv_bufs", "_rcv_bufs_force",
                                                                     "_cpu_affinity")):
        return _opaque(_PROCESS)
    if kw in ("startup_script", "startup_script_timeout", "shutdown_script", "shutdown_script_timeout"):
        return _refused("hdslb runs no script at start or stop: run it from the service unit (ExecStartPre=, "
                        "ExecStopPost=), so it is not silently skipped")
    if kw == "rs_init_notifies":
        return _refused("hdslb runs no notify_up/notify_down script for the state a real server starts in (only for "
                        "its changes), so the start-time notifies would not be sent")
    reason = _KEEPALIVED_GLOBALS.get(kw)
    return _opaque(reason) if reason is not None else None


# The table. Order is documentation order; defaults are DPVS's unless a comment says otherwise.
ROOT = Block(None, {
    "global_defs": Block(m.GlobalDefs, {
        "log_level": Key(Choice("EMERG", "ALERT", "CRIT", "ERR", "WARNING", "NOTICE", "INFO", "DEBUG",
                                aliases={"ERROR": "ERR", "WARN": "WARNING"}, fold=str.upper), "INFO"),
        "log_file": Key(PATH, None),
        "log_async_mode": Key(OnOff(), False, na="logging is the controller's; there is no async DPDK log ring"),
        "script_user": Key(Text(), None),
        "enable_script_security": Key(Flag(), False),
        # DPVS's own (dpvs.conf.items), so a dpvs.conf loads: DPVS's parser skips what it does not know, hdslb
        # refuses unknown keywords (a typo must not pass), so every keyword DPVS documents is known here
        "daemon": Key(Flag(), False, na="hdslbd runs in the foreground for systemd (Type=notify); `hdslb-ctl up` "
                                        "starts it in the background"),
        "pdump": Key(OnOff(), False, init=True, na="DPDK's packet capture of its ports: the interfaces are the "
                                                   "kernel's, capture with tcpdump (what XDP sends back or "
                                                   "redirects itself does not reach it: use xdpdump)"),
        "kni": Key(OnOff(), True, init=True, na=KNI),
        # keepalived's LVS timeouts (ipvsadm --set's three); a timeout also set in ipvs_defs must agree (loader)
        "lvs_timeouts": Key(LvsTimeouts(tuple(m.LVS_TIMEOUTS), m.MAX_TIMEOUT_S), ()),
        # keepalived's own globals, so a keepalived.conf loads as it is
        "router_id": Key(Str(), None, na=NO_MAIL, aliases=("lvs_id",)),  # lvs_id: keepalived 1.x's name
        "notification_email": Block(None, entries=_word_entry, na=NO_MAIL),
        "notification_email_from": Key(Str(), None, na=NO_MAIL),
        "smtp_server": Key(Text(), None, na=NO_MAIL),
        "smtp_connect_timeout": Key(_SECONDS, 30, na=NO_MAIL),
    }, others=_keepalived_global),
    "netif_defs": Block(m.NetifDefs, {
        "pktpool_size": Key(Int(1023, 2**31 - 1), 1048575, na=NO_MBUF_POOL, init=True),
        "pktpool_cache": Key(Int(32, 8192), 256, na=NO_MBUF_POOL, init=True),
        # DPVS's newer spelling of every device's `fdir { mode }`
        "fdir_mode": Key(Choice(*FDIR_MODES), "perfect", init=True, na=NO_FDIR),
        "device": Block(m.Device, {
            "rx": Block(m.QueueConf, {
                "queue_number": Key(Int(1, 4096), None),
                "descriptor_number": Key(Int(16, 65536), 128, na=RINGS),
                "max_burst_size": Key(Int(1, 4096), 32, na="DPDK's receive burst: the driver hands XDP one "
                                                           "packet at a time"),
                "rss": Key(Choice("all", "ip", "tcp", "udp", "sctp", "ether", "port", "tunnel"), "all", na=RSS),
            }),
            "tx": Block(m.QueueConf, {
                "queue_number": Key(Int(1, 4096), None),
                "descriptor_number": Key(Int(16, 65536), 128, na=RINGS),
                "mbuf_fast_free": Key(OnOff(), True, init=True, na=NO_MBUF_POOL),
            }),
            "fdir": Block(None, {
                "filter": Key(OnOff(), True, init=True),
                "mode": Key(Choice(*FDIR_MODES), "perfect"),
                "pballoc": Key(Choice("64k", "128k", "256k"), "64k"),
                "status": Key(Choice("close", "matched", "always"), "matched"),
            }, na=NO_FDIR),
            "promisc_mode": Key(Flag(), False),
            "allmulticast": Key(Flag(), False, na="hdslb does not change the interface's flags (`ip link set DEV "
                                                  "allmulticast on`)"),
            "mtu": Key(Int(68, 65535), None),
            "kni_name": Key(IFNAME, None, na=KNI),
        }, header=_ifname, multi=True, key=lambda d: d.name, init=True),
        "bonding": Block(None, {
            "mode": Key(Int(0, 6), 0),
            "slave": Key(IFNAME, multi=True),
            "primary": Key(IFNAME, None),
            "numa_node": Key(Int(0, 63), 0),
            "kni_name": Key(IFNAME, None),
            "options": Key(Text(), None),  # DPDK bonding PMD options (dedicated_queues=off)
        }, header=_ifname, multi=True, init=True,
            na="hdslb builds no bonds: create it in the kernel (`ip link add NAME type bond`) and "
               "name it in a device block"),
    }),
    "worker_defs": Block(m.WorkerDefs, {
        "worker": Block(m.Worker, {
            # kni: DPVS's optional worker for KNI packets (tx queues only); accepted, not acted on, as every worker
            "type": Key(Choice("master", "slave", "kni"), required=True),
            "cpu_id": Key(Int(0, 4095), required=True),
            "icmp_redirect_core": Key(Flag(), False, na="DPVS steers ICMP to one lcore because its conns are per "
                                                        "lcore; " + SHARED_CONNS),
            "port": Block(None, {
                "rx_queue_ids": Key(IntList(0, 4095), ()),
                "tx_queue_ids": Key(IntList(0, 4095), ()),
                "isol_rx_cpu_ids": Key(IntList(0, 4095), ()),
                "isol_rxq_ring_sz": Key(Int(1, 2**31 - 1), 1048576),
            }, header=_ifname, multi=True, na=QUEUES_TO_CPUS),
        }, header=named, multi=True, key=lambda w: w.name, init=True),
    }, check=_worker_defs_check),
    "timer_defs": Block(None, {
        "schedule_interval": Key(Int(1, 10**7), 500,
                                 na="DPDK timer polling; the controller runs on asyncio timers"),
    }),
    "neigh_defs": Block(m.NeighDefs, {
        "unres_queue_length": Key(Int(1, 65535), 128, init=True),
        "timeout": Key(_SECONDS, 60, init=True),
    }),
    "ipv4_defs": Block(m.Ipv4Defs, {
        "forwarding": Key(OnOff(), False, na=KERNEL_FORWARDS),
        "default_ttl": Key(Int(1, 255), 64, init=True),
        "fragment": Block(m.FragmentPolicy, {
            "bucket_number": Key(Int(1, 2**24), 4096, init=True),
            "bucket_entries": Key(Int(1, 4096), 16, init=True),
            "max_entries": Key(Int(1, 2**24), 4096, init=True),
            "ttl": Key(Int(1, 3600, "seconds"), 1, init=True),
        }),
    }),
    "ipv6_defs": Block(m.Ipv6Defs, {
        "disable": Key(OnOff(), False),
        "forwarding": Key(OnOff(), False, na=KERNEL_FORWARDS),
        # DPVS's link-local address generation for its ports: the interfaces here are the kernel's, with its own
        "addr_gen_mode": Key(Choice("eui64", "none", "stable-privacy", "random"), "eui64", na=LINK_LOCAL),
        "stable_secret": Key(Str(r"[0-9a-fA-F:]+", "an IPv6-address-shaped secret"), None, na=LINK_LOCAL),
        "route6": Block(None, {
            "method": Key(Choice("hlist", "lpm"), "hlist", init=True),
            "recycle_time": Key(Int(1, 36000), 10),
            "lpm": Block(None, {
                "lpm6_max_rules": Key(Int(16, 2**31 - 1), 1024, init=True),
                "lpm6_num_tbl8s": Key(Int(16, 2**31 - 1), 65536, init=True),
                "rt6_array_size": Key(Int(16, 2**31 - 1), 65536, init=True),
                "rt6_hash_bucket": Key(Int(2, 2**31 - 1), 256, init=True),
            }),
        }, na="IPv6 routes live in one LPM trie map; there is no method to choose or table to recycle"),
    }),
    "ctrl_defs": Block(m.CtrlDefs, {
        "lcore_msg": Block(None, {
            "bucket_number": Key(Int(1, 2**24), 256, init=True),
            "ring_size": Key(Int(1, 2**24), 4096, init=True),
            "sync_msg_timeout_us": Key(Int(1, 2**32 - 1), 2000),
            "priority_level": Key(Choice("low", "norm", "high", "ign"), "low"),
        }, na=NO_LCORES),
        "ipc_msg": Block(m.IpcMsg, {
            "unix_domain": Key(PATH, DEFAULT_CTL_SOCKET, init=True),
        }),
    }),
    "ipvs_defs": Block(m.IpvsDefs, {
        "conn": Block(m.ConnDefs, {
            "conn_pool_size": Key(Int(1024, 2**28), 2097152, init=True),
            # hdslb's own: IPv6 and NAT64 flows have a table of their own (hdslbd --max-conns6)
            "conn6_pool_size": Key(Int(256, 2**28), None, init=True),
            # hdslb's own: the conn map's values per CPU or one shared, or auto: by the possible CPU count
            # (hdslbd --conn-table)
            "conn_table": Key(Choice(*CONN_TABLE_CHOICES), "auto", init=True),
            "conn_pool_cache": Key(Int(1, 8192), 256, init=True,
                                   na="conns are entries of one BPF map; there is no per-core mempool cache"),
            "conn_init_timeout": Key(_SECONDS, 3),
            "expire_quiescent_template": Key(Flag(), False),
            "fast_xmit_close": Key(Flag(), False, na="there is no per-conn cached L2 header to turn off: "
                                                     "every packet takes its MAC from the neighbour map"),
            "redirect": Key(OnOff(), False, init=True, na=SHARED_CONNS),
        }),
        "udp": Block(m.UdpDefs, {
            "defence_udp_drop": Key(Flag(), False),
            "uoa_mode": Key(Choice("opp", "ipo"), "opp"),
            "uoa_max_trail": Key(Int(0, 255), 3),
            "timeout": _timeouts(m.UdpTimeouts, {"normal": 300, "last": 3}),
        }),
        "tcp": Block(m.TcpDefs, {
            "defence_tcp_drop": Key(Flag(), False),
            "timeout": _timeouts(m.TcpTimeouts, {
                "none": 2, "established": 90, "syn_sent": 3, "syn_recv": 30, "fin_wait": 7, "time_wait": 7,
                "close": 3, "close_wait": 7, "last_ack": 7, "listen": 120, "synack": 30, "last": 2}),
            "synproxy": Block(m.SynproxyDefs, {
                "synack_options": Block(m.SynackOptions, {
                    "mss": Key(Int(536, 65535), 1452),
                    "ttl": Key(Int(1, 255), 63),
                    "sack": Key(Flag(), False),
                    "wscale": Key(Flag(), False),
                    "timestamp": Key(Flag(), False),
                }),
                "defer_rs_syn": Key(Flag(), False),
                "close_client_window": Key(Flag(), False, na="SYN proxy is not implemented yet"),
                "rs_syn_max_retry": Key(Int(1, 255), 3),
                "ack_storm_thresh": Key(Int(1, 65535), 10),
                "max_ack_saved": Key(Int(1, 255), 3),
                "conn_reuse_state": Block(frozenset, entries=_state_entry,
                                          default=frozenset({"close", "time_wait"})),
            }),
        }),
    }),
    "sa_pool": Block(m.SaPoolDefs, {
        "pool_hash_size": Key(Int(1, 65536), 16),
        "flow_enable": Key(OnOff(), True, na="DPVS steers a local address's replies to their lcore with flow rules; "
                                             + SHARED_CONNS),
    }),
    "ipset_defs": Block(None, {
        "ipset_hash_pool_size": Key(Int(1, 2**31 - 1), 131072, init=True),
    }, na="hdslb has no ipset module (DPVS's ipset-based ACLs and traffic control); its hash pool sizes nothing"),
    # keepalived-style load-balancer declarations
    "virtual_server_group": _group(m.VirtualServerGroup, _vsg_entry, "members", "virtual_server_groups"),
    "local_address_group": _group(m.LocalAddressGroup, _laddr_entry, "addresses", "local_address_groups"),
    "deny_address_group": _group(m.AddressGroup, _net_entry, "networks", "deny_address_groups"),
    "allow_address_group": _group(m.AddressGroup, _net_entry, "networks", "allow_address_groups"),
    "virtual_server": _VIRTUAL_SERVER,
    # keepalived's TLS context for SSL_GET: the client certificate every SSL_GET presents (loader: _ssl_to_checkers)
    "SSL": Block(m.SslDefs, {
        "password": Key(Str(), None),
        "ca": Key(PATH, None),
        "certificate": Key(PATH, None),
        "key": Key(PATH, None),
    }, default=None, field="ssl", check=_ssl_check),
    # other daemons' blocks, so one keepalived.conf can serve both
    "vrrp_instance": _opaque(VRRP),
    "vrrp_sync_group": _opaque(VRRP),
    "vrrp_script": _opaque(VRRP),
    "static_ipaddress": _opaque(KERNEL_ADDRS),
    "static_routes": _opaque(KERNEL_ADDRS),
    "static_rules": _opaque(KERNEL_ADDRS),
    "vrrp_track_process": _opaque(VRRP),
    "track_file": _opaque(VRRP),
    "garp_group": _opaque(VRRP),
    "bfd_instance": _opaque("BFD is not part of hdslb; run keepalived's bfd process (or a routing daemon) alongside"),
    "linkbeat_use_polling": _opaque(VRRP),
    # DPVS keepalived's tunnel devices (dpip tunnel add)
    "tunnel_group": _opaque("hdslb makes no tunnel devices: create them in the kernel (ip link add NAME type ipip|gre "
                            "…) and attach hdslbd to them"),
    "net_namespace": _refused("hdslb serves the network namespace it is started in: start it there "
                              "(ip netns exec NAME hdslbd …) rather than have it ignore this"),
    "net_namespace_ipvs": _refused("hdslb balances in the network namespace it is started in: start it in that "
                                   "namespace (ip netns exec NAME hdslbd …) rather than have it ignore this"),
    # keepalived's other top-level (root) keywords, about its own processes
    **{kw: _opaque(_PROCESS) for kw in ("instance", "use_pid_dir", "child_wait_time", "namespace_with_ipsets")},
}, others=lambda kw: _opaque(VRRP) if kw.startswith("vrrp_") else None)

# Top-level keywords whose content the reload diff compares as objects rather than as settings.
LB_ROOTS = frozenset({"virtual_server", "virtual_server_group", "local_address_group", "deny_address_group",
                      "allow_address_group",
                      # in every SSL_GET checker: a change restarts them, and no password is listed as an option
                      "SSL"})


def lookup(block: Block) -> Dict[str, Tuple[str, Spec]]:
    """Every spelling a block accepts → (canonical keyword, spec)."""
    out: Dict[str, Tuple[str, Spec]] = {}
    for kw, spec in block.children.items():
        for spelling in (kw,) + spec.aliases:
            out[spelling] = (kw, spec)
    return out


def walk(block: Block = ROOT, path: str = "") -> Iterator[Tuple[str, Spec]]:
    """(dotted path, spec) for every keyword in the table, depth first: for docs and tests."""
    for kw, spec in block.children.items():
        p = f"{path}.{kw}" if path else kw
        yield p, spec
        if isinstance(spec, Block):
            yield from walk(spec, p)
