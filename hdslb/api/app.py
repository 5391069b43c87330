"""The REST API: an aiohttp app whose handlers turn dpvs-agent shaped requests into control commands.

Every handler validates its body against the OpenAPI schema first, then runs one or more noun.verb commands
through the same registry as the unix socket (hdslb.api.dispatch); no model logic lives here. Set changes (the
real servers of a service, a service with its real servers) are planned from one snapshot and sent as one batch
command: the daemon checks every step on a copy of its model first, so a refused step changes nothing, and each
touched service's table is rebuilt once.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import inspect
import ipaddress
import json
import logging
import struct
from dataclasses import dataclass, field as dc_field

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from hdslb.api import DEFAULT_HOST, DEFAULT_PORT, dispatch_async, openapi
from hdslb.ctl.protocol import MAX_FRAME
from hdslb.errors import HdslbError
from hdslb.heap import collections_paused
from hdslb.balancer import netmask_plen
from hdslb.net.addr import ip_address

log = logging.getLogger("hdslb.api")

# errno -> HTTP status. ENODEV is 404 when the URL names the device (the resource's parent is missing) and
# 400 when the body does (a bad field value); see _call.
STATUS = {
    errno.EINVAL: 400,
    errno.ERANGE: 400,  # values out of order (a lower threshold above the upper one)
    errno.EPERM: 403,  # e.g. a posted config that includes a file or runs a program
    errno.ESRCH: 404,
    errno.ENOENT: 404,
    errno.EADDRNOTAVAIL: 404,
    errno.ENODEV: 404,
    errno.EEXIST: 409,
    errno.EBUSY: 409,
    errno.EOPNOTSUPP: 501,
    errno.ENOSPC: 507,
    errno.ESTALE: 410,  # a /v2/conns snapshot gone (kept 60 s after its last page)
}
# The errno carried by refusals that come from HTTP itself rather than from a command.
HTTP_ERRNO = {401: errno.EACCES, 404: errno.ENOENT, 405: errno.EOPNOTSUPP, 413: errno.E2BIG}

# What a request that changes something must say its body is. None of these is a CORS "simple" type
# (text/plain, application/x-www-form-urlencoded, multipart/form-data), so a web page cannot make a browser send
# such a request to the API cross-origin without a preflight, which this API never answers.
JSON_TYPE = "application/json"
CONFIG_TYPE = "text/x-hdslb-conf"  # POST /v2/config: the keepalived-style text
CONFIG_PATH = "/v2/config"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# What a stop gives requests in flight before closing them: a scrape or listing at 10k services takes ~3 s;
# aiohttp's own default (60 s) let one client with a half-sent body hold hdslbd's stop for a minute.
API_SHUTDOWN_S = 5.0
# What one client may hold. Every REST connection is a file descriptor of hdslbd, which its health probes need too
# (the soft RLIMIT_NOFILE under systemd is 1024 unless raised): aiohttp alone keeps an idle connection, or one
# whose request head never completes, for an hour, and reads any number of bodies at once.
MAX_CONNS = 128  # connections at once; one more closes the longest-idle, or is itself closed when all are busy
KEEPALIVE_S = 75.0  # an idle connection, or a request head not complete, is closed after this (nginx's keepalive)
BODY_TIMEOUT_S = 30.0  # a request body must arrive whole within this of its head: 408 otherwise
SMALL_BODY = 1 << 20  # bodies this small are always read; larger ones share INFLIGHT_MAX (as the control socket's)
INFLIGHT_MAX = MAX_FRAME  # bytes of large bodies being read or handled at once, all connections together
VALIDATE_INLINE_MAX = 64 << 10  # bytes of a body validated on the event loop (jsonschema: ~30-60 ms at most)
CONNS_DEFAULT_LIMIT = 100
CONNS_MAX_LIMIT = 10000

_AppKey = getattr(web, "AppKey", None)  # aiohttp >= 3.9 types app keys; older versions take strings
CTX = _AppKey("hdslb_ctx", object) if _AppKey else "hdslb_ctx"
TOKEN = _AppKey("hdslb_token", object) if _AppKey else "hdslb_token"
LOCK = _AppKey("hdslb_lock", asyncio.Lock) if _AppKey else "hdslb_lock"
REGISTRY = _AppKey("hdslb_registry", object) if _AppKey else "hdslb_registry"
LIMITS = _AppKey("hdslb_limits", object) if _AppKey else "hdslb_limits"


class ApiError(Exception):
    """A refusal on its way to the client as {"error", "errno", "field", ...extra}."""

    def __init__(self, status: int, err: int, message: str, field: str | None = None, **extra):
        super().__init__(message)
        self.status, self.errno, self.message, self.field, self.extra = status, err, message, field, extra


def _json_default(o):
    if isinstance(o, (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(o)
    if isinstance(o, (bytes, bytearray)):
        return o.hex()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)


_dumps = functools.partial(json.dumps, default=_json_default)


def _reply(data, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps, headers=headers)


def _error(status: int, err: int, message: str, field: str | None = None, headers: dict | None = None,
           **extra) -> web.Response:
    return _reply({"error": message, "errno": err, "field": field, **extra}, status, headers)


# --- plumbing ---------------------------------------------------------------------------------------
async def _call(request: web.Request, op: str, args: dict, field: str | None = None, device_in_body: bool = False):
    """Run a command; a refusal becomes an ApiError with the status its errno maps to."""
    try:
        return await dispatch_async(request.app[CTX], op, args)
    except HdslbError as e:
        status = STATUS.get(e.errno, 500)
        if e.errno == errno.ENODEV and device_in_body:
            status, field = 400, field or "device"
        extra = {}
        if getattr(e, "errors", None) and len(e.errors) > 1:  # a ConfigError carries every problem found
            extra["errors"] = [str(x) for x in e.errors]
        raise ApiError(status, e.errno, e.message, field or getattr(e, "keyword", None), **extra) from None


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(f"key {key!r} is given twice in one object")
        self.key = key  # the reply's field


def _unique_keys(pairs: list) -> dict:
    """json.loads keeps the last of a key given twice in one object ({"Items": [...], "Items": []} would apply
    nothing and say applied): such a body is refused. (~0.05 s more on PATCH /v2/vs's 10k x 10 body.)"""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(dup)
    return d


async def _body(request: web.Request, schema: str, required: bool = True):
    raw = await request.read()
    if not raw.strip():
        if required:
            raise ApiError(400, errno.EINVAL, "request body required (JSON)")
        body = {}
    else:
        try:
            body = json.loads(raw, object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            raise ApiError(400, errno.EINVAL, f"request body: {e}", e.key) from None
        except ValueError as e:
            raise ApiError(400, errno.EINVAL, f"request body is not JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, errno.EINVAL, "request body is not JSON this API takes: nested too deeply") from None
    try:
        if len(raw) > VALIDATE_INLINE_MAX:
            # jsonschema is pure Python: a 10k x 10 bulk it must judge (a wrong field, or options beyond the plain
            # check's) takes it seconds, which must not stop the daemon's loop (health checks, the control socket)
            await asyncio.get_running_loop().run_in_executor(None, openapi.validate, schema, body)
        else:
            openapi.validate(schema, body)
    except openapi.BodyError as e:
        raise ApiError(400, errno.EINVAL, e.message, e.field) from None
    except RecursionError:
        raise ApiError(400, errno.EINVAL, "request body: nested too deeply") from None
    return body


def _ascii_digits(s: str) -> bool:
    """0-9 only: str.isdigit() is also true for "²" and "٣", which int() then refuses (or reads)."""
    return s.isascii() and s.isdigit()


def _vs_ident(request: web.Request) -> dict:
    """dpvs-agent's {VipPort}: VIP-PORT-PROTO (neither IPv4 nor IPv6 spelling contains '-')."""
    vp = request.match_info["VipPort"]
    parts = vp.split("-")
    bad = f"VipPort {vp!r}: expected VIP-PORT-PROTO, e.g. 10.0.0.100-80-tcp"
    if len(parts) != 3:
        raise ApiError(400, errno.EINVAL, bad, "VipPort")
    addr, port, proto = parts
    if "%" in addr:  # ipaddress takes a %zone; the model refuses it (400 without naming VipPort)
        raise ApiError(400, errno.EINVAL, f"{bad} ({addr!r} is a scoped IPv6 address: a %zone is not taken)",
                       "VipPort")
    try:
        ip = ipaddress.ip_address(addr.strip("[]"))
    except ValueError:
        raise ApiError(400, errno.EINVAL, f"{bad} ({addr!r} is not an IP address)", "VipPort") from None
    if not _ascii_digits(port) or int(port) > 65535:
        raise ApiError(400, errno.EINVAL, f"{bad} ({port!r} is not a port)", "VipPort")
    if proto.lower() not in ("tcp", "udp"):
        raise ApiError(400, errno.EINVAL, f"{bad} ({proto!r} is not tcp or udp)", "VipPort")
    return {"proto": proto.lower(), "addr": str(ip), "port": int(port)}


def _vs_id(proto: str, addr: str, port: int) -> str:
    return f"{addr}-{port}-{proto.lower()}"


MATCH_ID = "match-"  # SNAT services have no VIP: their {VipPort} is match-<service id>


async def _ident(request: web.Request) -> dict:
    """{VipPort} as a service ident: VIP-PORT-PROTO, or match-ID for a SNAT (match) service."""
    vp = request.match_info["VipPort"]
    if not vp.startswith(MATCH_ID):
        return _vs_ident(request)
    sid = vp[len(MATCH_ID):]
    if not _ascii_digits(sid):
        raise ApiError(400, errno.EINVAL, f"VipPort {vp!r}: a SNAT service is match-ID (its Id in GET /v2/vs)",
                       "VipPort")
    # Brief: the model's fields are all an id needs; a full listing scanned the conn table (connection counts,
    # local addresses' connections) and read every service's stats just to find one id, on every request.
    data = await _call(request, "service.list", {"svc": None, "brief": True})
    for s in data["services"]:
        if s.get("match") and s.get("svc_id") == int(sid):
            return {"match": s["match"]}
    raise ApiError(404, errno.ESRCH, f"no SNAT service {vp}", "VipPort")


def _match_from(spec: dict, proto: str) -> dict:
    """dpvs-agent MatchSpec {Src: {Start, End}, Dest: {Start, End}, InIfName, OutIfName} -> the model's match."""
    def rng(r, name):
        if r and r.get("End") and not r.get("Start"):
            raise ApiError(400, errno.EINVAL, f"Match.{name}: End without Start (a range is Start, or Start and End)",
                           f"Match.{name}.Start")
        if not r or not r.get("Start"):
            return None
        return f"{r['Start']}-{r.get('End') or r['Start']}"

    return {"proto": proto, "src_range": rng(spec.get("Src"), "Src"), "dst_range": rng(spec.get("Dest"), "Dest"),
            "iif": spec.get("InIfName") or None, "oif": spec.get("OutIfName") or None}


def _match_expand(m: dict) -> dict:
    def rng(text):
        if not text:
            return None
        lo, _, hi = text.partition("-")
        return {"Start": lo, "End": hi or lo}

    out = {"Src": rng(m.get("src_range")), "Dest": rng(m.get("dst_range")), "InIfName": m.get("iif") or "",
           "OutIfName": m.get("oif") or ""}
    return {k: v for k, v in out.items() if v is not None}


def _qint(request: web.Request, name: str, default: int, lo: int, hi: int | None = None) -> int:
    v = request.query.get(name)
    if v is None or v == "":
        return default
    if not _ascii_digits(v) or int(v) < lo or (hi is not None and int(v) > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ApiError(400, errno.EINVAL, f"{name}: {v!r} is not an integer in {rng}", name)
    return int(v)


def _qbool(request: web.Request, name: str) -> bool:
    v = request.query.get(name, "false").lower()
    if v not in ("true", "false", "1", "0", ""):
        raise ApiError(400, errno.EINVAL, f"{name}: {v!r} is not true or false", name)
    return v in ("true", "1")


def _changed(result: str, status: int, **more) -> web.Response:
    return _reply({"result": result, **more}, status)


# --- dpvs-agent shapes ------------------------------------------------------------------------------
AF_NUM = {4: 2, 6: 10}  # AF_INET, AF_INET6 as dpvs-agent reports them
PROTO_NUM = {"tcp": 6, "udp": 17, "icmp": 1}


def _stats(stats: dict, rates: dict) -> dict:
    return {"Conns": stats.get("conns", 0), "InPkts": stats.get("inpkts", 0), "InBytes": stats.get("inbytes", 0),
            "OutPkts": stats.get("outpkts", 0), "OutBytes": stats.get("outbytes", 0),
            "Cps": rates.get("cps", 0), "InPps": rates.get("inpps", 0), "InBps": rates.get("inbps", 0),
            "OutPps": rates.get("outpps", 0), "OutBps": rates.get("outbps", 0)}


def _rs_expand(d: dict) -> dict:
    """A real server as dpvs-agent shows one. Spec is what a client writes, so it can be sent back as it is: its
    weight is the configured one (service.list's conf_weight) and `inhibited` says a health check holds the
    server out, as dpvs-agent keeps them (its flag never touches the weight). Showing the effective weight there
    (0 while down) made a GET -> PUT echo a drain to 0 that outlived the server's recovery. The weight scheduling
    uses now (0 while down, held out for a sorry server, or a checker's dynamic weight) is EffectiveWeight,
    outside Spec with the other read-only state. (An older service.list sends no conf_weight: weight is it.)"""
    return {"Spec": {"ip": d["addr"], "port": d["port"], "weight": d.get("conf_weight", d["weight"]),
                     "mode": d["fwd"].upper(),
                     "inhibited": _flag_now(d, "inhibited"), "overloaded": _flag_now(d, "overloaded")},
            "Stats": _stats(d.get("stats") or {}, d.get("rates") or {}),
            "ActiveConns": d.get("active", 0), "InactConns": d.get("inactive", 0),
            "UThreshold": d.get("u_threshold", 0), "LThreshold": d.get("l_threshold", 0),
            "EffectiveWeight": d["weight"]}


def _laddr_expand(la: dict) -> dict:
    return {"af": AF_NUM[ipaddress.ip_address(la["addr"]).version], "addr": la["addr"], "device": la["ifname"],
            "conns": la.get("conns", 0), "portConflict": la.get("conflicts", 0)}


def _vs_expand(s: dict) -> dict:
    out = {"Id": f"{MATCH_ID}{s['svc_id']}" if s.get("match") else _vs_id(s["proto"], s["addr"], s["port"]),
           "Af": AF_NUM[ipaddress.ip_address(s["addr"]).version], "Proto": PROTO_NUM[s["proto"]],
           "Addr": s["addr"], "Port": s["port"], "SchedName": s["sched"], "Flags": "|".join(s.get("flags") or []),
           "Timeout": s.get("persistent") or 0,
           "Netmask": _netmask_out(s.get("netmask"), ipaddress.ip_address(s["addr"]).version),
            "Stats": _stats(s.get("stats") or {}, s.get("rates") or {}),
            "RSs": {"Items": [_rs_expand(d) for d in s.get("dests", [])]},
            "Laddrs": {"Items": [_laddr_expand(la) for la in s.get("laddrs", [])]}}
    if s.get("match"):
        out["Match"] = _match_expand(s["match"])
    return out


async def _one_service(request: web.Request, ident: dict, brief: bool = False) -> dict:
    """The service as service.list gives it; brief: the model's fields only (no stats, counts or rates read from
    the maps), what a write plans from."""
    args = {"svc": ident, "brief": True} if brief else {"svc": ident}
    return (await _call(request, "service.list", args))["services"][0]


# --- virtual servers ----------------------------------------------------------------------------------
# dpvs-agent VirtualServerSpecTiny fields this fast path has no use for: a non-default value is refused (501),
# never silently dropped.
_VS_UNSUPPORTED = (("ConnTimeout", 0), ("Bps", 0), ("LimitProportion", 0), ("Fwmark", 0), ("SynProxy", False),
                   ("ExpireQuiescent", False), ("Quic", False), ("ProxyProtocol", "disable"))


def _netmask_out(netmask: str | None, version: int) -> int:
    """dpvs-agent's Netmask (VirtualServerSpecExpand, a uint32): DPVS's dp_vs_service netmask as dpvs-agent reads
    it on x86. IPv4: the mask's network-order bytes read as a little-endian uint32 (255.255.255.0 -> 16777215;
    0xFFFFFFFF, all ones, is no granularity); IPv6: the prefix length (128: none)."""
    plen = netmask_plen(netmask, version)
    if version == 6:
        return plen
    return struct.unpack("<I", ipaddress.IPv4Network(f"0.0.0.0/{plen}").netmask.packed)[0]


def _netmask_in(v, version: int) -> str:
    """PUT/POST Netmask -> the model's -M text ("" is none). Taken: what GET shows (the dpvs-agent uint32 above),
    a prefix length (IPv4 1..32, IPv6 1..128), ipvsadm's dotted mask as a string, and 0/null/"" for none."""
    if v in (None, "", 0):
        return ""
    if isinstance(v, str):
        # Checked here as the model checks it (its refusal would name no field): ipvsadm -M's dotted mask (ones, then
        # zeros) or /N or N for IPv4, a prefix length 1..128 for IPv6.
        if not v.isascii() or _plen_of(v, version) is None:
            raise ApiError(400, errno.EINVAL, f"Netmask: {v!r} is not a mask (ones, then zeros) or a prefix length "
                                              f"({'0..32' if version == 4 else '1..128'})", "Netmask")
        return v
    full = 32 if version == 4 else 128
    if 1 <= v <= full:
        return "" if v == full else str(v)
    if version == 6:
        raise ApiError(400, errno.EINVAL, f"Netmask: {v} is not an IPv6 prefix length (1..128)", "Netmask")
    mask = ipaddress.IPv4Address(struct.pack("<I", v))
    plen = _contiguous_plen(str(mask))
    if plen is None:
        raise ApiError(400, errno.EINVAL, f"Netmask: {v} is {mask} as dpvs-agent encodes an IPv4 mask (its bytes in "
                                          f"network order, read little-endian): not a mask (ones, then zeros)",
                       "Netmask")
    return "" if plen == 32 else str(mask)


def _contiguous_plen(text: str) -> int | None:
    """The prefix length of a dotted IPv4 netmask (ones, then zeros: the model's rule), or None."""
    return _plen_of(text, 4)


def _plen_of(text: str, version: int) -> int | None:
    """The prefix length the model reads in a -M text of that family, or None where it refuses it."""
    try:
        return netmask_plen(text, version)
    except HdslbError:
        return None


def _vs_opts(body: dict, version: int = 4) -> dict:
    for name, default in _VS_UNSUPPORTED:
        if name in body and body[name] not in (default, None):
            raise ApiError(501, errno.EOPNOTSUPP, f"{name}: not implemented by this fast path", name)
    opts = {}
    if "SchedName" in body:
        opts["sched"] = body["SchedName"]
    if "Timeout" in body:
        opts["persistent"] = body["Timeout"]  # 0 is dpvs-agent's "no persistence" (and turns it off on PUT)
    if "Netmask" in body:
        opts["netmask"] = _netmask_in(body["Netmask"], version)
    return opts


async def list_vs(request):
    # The listing yields to the loop as it is built; turning it into dpvs-agent's shapes and JSON (1.4 s and 1.0 s
    # at 10k services x 10 real servers, 38 MB) is done, and the listing freed, in a worker thread, with the cyclic
    # collector paused (~1M short-lived objects), as a /metrics scrape does.
    with collections_paused():
        box = [await _call(request, "service.list", {"svc": None})]

        def encode() -> bytes:
            services = box.pop()["services"]  # the listing's last reference: freed in this thread
            return _dumps({"Items": [_vs_expand(s) for s in services]}).encode()

        body = await asyncio.get_running_loop().run_in_executor(None, encode)
    return web.Response(body=body, content_type="application/json", charset="utf-8")


async def create_vs(request):
    """A VIP service from Addr/Port/Proto, or a SNAT service from Match (and Proto)."""
    body = await _body(request, "VirtualServerCreate")
    proto = {1: "icmp", 6: "tcp", 17: "udp"}.get(body["Proto"], str(body["Proto"]).lower())
    if body.get("Match") is not None:
        for f in ("Addr", "Port"):
            if body.get(f) not in (None, 0, "", "0.0.0.0"):
                raise ApiError(400, errno.EINVAL, f"{f}: a SNAT (Match) service has no VIP", f)
        ident = {"match": _match_from(body["Match"], proto)}
        opts = _vs_opts({k: v for k, v in body.items() if k != "Match"}, 4)
        try:  # an unknown InIfName/OutIfName is a bad field value (400), as a laddr's or neighbour's device
            await _call(request, "service.add", {**ident, **opts}, field="Match", device_in_body=True)
        except ApiError as e:
            if e.errno == errno.ENODEV:
                e.field = next((f"Match.{k}" for k, v in (("InIfName", ident["match"]["iif"]),
                                                           ("OutIfName", ident["match"]["oif"]))
                                if v and repr(v) in e.message), e.field)
            raise
        svc = await _one_service(request, ident, brief=True)
        vid = f"{MATCH_ID}{svc['svc_id']}"
        return _reply({"result": "created", "Id": vid}, 201, headers={"Location": f"/v2/vs/{vid}"})
    for f in ("Addr", "Port"):
        if body.get(f) is None:
            raise ApiError(400, errno.EINVAL, f"{f}: required (or Match, for a SNAT service)", f)
    if proto == "icmp":
        raise ApiError(400, errno.EINVAL, "Proto: ICMP is for SNAT (Match) services only", "Proto")
    ident = {"proto": proto, "addr": str(ipaddress.ip_address(body["Addr"])), "port": body["Port"]}
    await _call(request, "service.add", {**ident, **_vs_opts(body, ipaddress.ip_address(body["Addr"]).version)})
    vid = _vs_id(**ident)
    return _reply({"result": "created", "Id": vid}, 201, headers={"Location": f"/v2/vs/{vid}"})


async def get_vs(request):
    return _reply({"Items": [_vs_expand(await _one_service(request, await _ident(request)))]})


def _put_opts(body: dict, ident: dict) -> dict:
    if body.get("Match") is not None:
        raise ApiError(400, errno.EINVAL, "Match identifies a SNAT service and cannot be changed: create one with "
                                          "POST /v2/vs, address it as match-ID", "Match")
    return _vs_opts(body, ipaddress.ip_address(ident["addr"]).version if "addr" in ident else 4)


async def put_vs(request):
    ident = await _ident(request)
    body = await _body(request, "VirtualServerSpecTiny", required=False)
    rss = body.pop("RSs", None)
    opts = _put_opts(body, ident)
    vid = request.match_info["VipPort"] if "match" in ident else _vs_id(**ident)
    if rss is not None:
        return await _put_vs_with_rs(request, ident, opts, rss["Items"], vid)
    async with request.app[LOCK]:
        if "match" not in ident:
            try:
                await _call(request, "service.add", {**ident, **opts})
                return _changed("created", 201, Id=vid)
            except ApiError as e:
                if e.errno != errno.EEXIST:
                    raise
        # Update by option, as DPVS edits: what the body does not mention stays as it is.
        await _call(request, "service.edit", {**ident, **opts})
    return _changed("updated", 200, Id=vid)


async def _put_vs_with_rs(request, ident: dict, opts: dict, items: list, vid: str) -> web.Response:
    """PUT /v2/vs/{VipPort} with RSs: the service (created, or updated by option) and its real servers (upserted
    as PUT .../rs does) in one batch: all of it, or nothing."""
    async with request.app[LOCK]:
        try:
            svc = await _one_service(request, ident, brief=True)
        except ApiError as e:
            if e.status != 404 or "match" in ident:
                raise
            svc = None
        port = svc["port"] if svc is not None else ident["port"]
        current = {_rs_key(d["addr"], d["port"], port): d for d in svc["dests"]} if svc is not None else {}
        plan = _upserts(ident, current, _rs_items(items, port, "RSs.Items", current))
        made = svc is None
        plan.steps.insert(0, _Step("created" if made else "updated", None, "service.add" if made else "service.edit",
                                   {**ident, **opts}))
        return await _apply(request, plan, status=201 if made else 200, result="created" if made else "updated",
                            Id=vid)


async def patch_vs(request):
    """hdslb bulk extension: many services, each with its real servers, in one request and one batch command.

    Each item is upserted (service.set: created, or updated by option; dest.set per real server: added, or
    updated with the fields given); services and servers not listed stay as they are. All or nothing: a refused
    item is named by `field` and nothing is changed."""
    body = await _body(request, "VirtualServerBulk")
    ops, where, seen, n_rs = [], [], {}, 0
    for i, it in enumerate(body["Items"]):
        f = f"Items[{i}]"
        proto = {6: "tcp", 17: "udp"}.get(it["Proto"], str(it["Proto"]).lower())
        ident = {"proto": proto, "addr": str(ipaddress.ip_address(it["Addr"])), "port": it["Port"]}
        key = (proto, ipaddress.ip_address(it["Addr"]), it["Port"])
        if key in seen:
            raise ApiError(400, errno.EINVAL, f"{f}: {_vs_id(**ident)} is listed twice (also Items[{seen[key]}])", f)
        seen[key] = i
        try:
            opts = _vs_opts({k: v for k, v in it.items() if k not in ("Addr", "Port", "Proto", "RSs")},
                            ipaddress.ip_address(it["Addr"]).version)
        except ApiError as e:  # "Netmask: ..." names the option; which of the items has it is the field
            e.field, e.message = f"{f}.{e.field}", f"{f}.{e.message}"
            raise
        ops.append(["service.set", {**ident, **opts}])
        where.append(f)
        rs_items = it.get("RSs", {"Items": []})["Items"]
        for rf, rkey, rit in _rs_items(rs_items, it["Port"], f"{f}.RSs.Items",
                                       await _flag_state(request, ident, rs_items)):
            dargs = {"svc": ident, "addr": str(rkey[0]), "port": rkey[1]}
            if "weight" in rit:
                dargs["weight"] = rit["weight"]
            if rit.get("mode"):
                dargs["fwd"] = rit["mode"].lower()
            ops.append(["dest.set", dargs])
            where.append(rf)
            n_rs += 1
    async with request.app[LOCK]:
        try:
            data = await dispatch_async(request.app[CTX], "batch", {"ops": ops})
        except HdslbError as e:
            i = getattr(e, "index", None)
            f = where[i] if isinstance(i, int) and 0 <= i < len(where) else None
            raise ApiError(STATUS.get(e.errno, 500), e.errno, f"{f + ': ' if f else ''}{e.message}; nothing was changed",
                           f) from None
    warnings = [f"{where[w['index']]}: {w['warning']}" for w in (data or {}).get("warnings", ())]
    return _reply({"result": "applied", "services": len(seen), "real_servers": n_rs, "warnings": warnings})


async def _flag_state(request, ident: dict, rs_items: list) -> dict | None:
    """The servers of a PATCH item's service, read only when an item says inhibited or overloaded true (what GET
    showed of a server so now, sent back): _rs_items accepts the flag if the server is in that state. A bulk load
    with no flags set reads nothing."""
    if not any(r.get("inhibited") or r.get("overloaded") for r in rs_items):
        return None
    try:
        svc = await _one_service(request, ident, brief=True)
    except ApiError as e:
        if e.status != 404:
            raise
        return None
    return {_rs_key(d["addr"], d["port"], svc["port"]): d for d in svc["dests"]}


async def delete_vs(request):
    ident = await _ident(request)
    await _call(request, "service.del", ident)
    return _changed("deleted", 200, Id=request.match_info["VipPort"] if "match" in ident else _vs_id(**ident))


# --- real servers -----------------------------------------------------------------------------------
@dataclass
class _Step:
    what: str  # added / updated / removed (created: the service itself)
    key: tuple | None  # (ip, port); None: the service
    op: str
    args: dict
    field: str | None = None


@dataclass
class _Plan:
    steps: list = dc_field(default_factory=list)
    unchanged: list = dc_field(default_factory=list)


def _hostport(key: tuple) -> str:
    ip, port = key
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _rs_key(ip: str, port, svc_port: int) -> tuple:
    return (ip_address(ip), port or svc_port)  # port 0/absent: the service's, as ipvsadm and the model


async def _rs_body(request):
    """The service named by the URL and the validated body. Called before the app lock is taken: a client that
    sends its body slowly (or never) must hold up nobody else's writes."""
    ident = await _ident(request)
    return ident, await _body(request, "RealServerTinyList")


async def _rs_snapshot(request, ident: dict, body: dict):
    """Under the app lock: one snapshot of the service, and the items checked against it (duplicates, flags)."""
    svc = await _one_service(request, ident, brief=True)
    current = {_rs_key(d["addr"], d["port"], svc["port"]): d for d in svc["dests"]}
    return current, _rs_items(body["Items"], svc["port"], "Items", current)


def _flag_now(cur: dict | None, flag: str) -> bool:
    """What GET shows for a server's flag: inhibited while its health check holds it out of rotation, overloaded
    while its -x/-y thresholds do."""
    if cur is None:
        return False
    return (cur.get("health") or {}).get("state") == "down" if flag == "inhibited" else bool(cur.get("overloaded"))


def _rs_items(body_items: list, svc_port: int, where: str, current: dict | None = None) -> list:
    """(field, key, item) per listed real server; duplicates and unsupported flags refused before anything. A flag
    is the server's state, set by its health check or its thresholds: true is refused (501) unless the server is
    in that state now (a client sending back what GET showed)."""
    items, seen = [], {}
    for i, it in enumerate(body_items):
        f = f"{where}[{i}]"
        key = _rs_key(it["ip"], it.get("port"), svc_port)
        for flag in ("inhibited", "overloaded"):
            if it.get(flag) and not _flag_now((current or {}).get(key), flag):
                raise ApiError(501, errno.EOPNOTSUPP, f"{f}.{flag}: not implemented by this fast path (it is the "
                                                      f"server's state, set by its health check or thresholds)",
                               f"{f}.{flag}")
        if key in seen:
            raise ApiError(400, errno.EINVAL, f"{f}: {_hostport(key)} is listed twice (also {where}[{seen[key]}])",
                           f)
        seen[key] = i
        items.append((f, key, it))
    return items


def _upserts(ident: dict, current: dict, items: list) -> _Plan:
    plan = _Plan()
    for f, key, it in items:
        dargs = {"svc": ident, "addr": str(key[0]), "port": key[1]}
        given = {}
        if "weight" in it:
            given["weight"] = it["weight"]
        if it.get("mode"):
            given["fwd"] = it["mode"].lower()
        cur = current.get(key)
        if cur is not None:
            # service.list's "weight" is the effective one (0 while a health check has the server down); a
            # request's weight is the configured one (what GET's Spec shows), so that is what it is compared
            # with: a drain to 0 of a server that is down must still be kept, and an echo of GET changes nothing.
            # (An older service.list sends no conf_weight.)
            cur = {**cur, "weight": cur.get("conf_weight", cur["weight"])}
        if cur is None:
            plan.steps.append(_Step("added", key, "dest.add", {**dargs, **given}, f))
        elif any(cur.get(k) != v for k, v in given.items()):
            plan.steps.append(_Step("updated", key, "dest.edit", {**dargs, **given}, f))
        else:
            plan.unchanged.append(key)
    return plan


def _removal(ident: dict, key: tuple, cur: dict, f: str | None) -> _Step:
    dargs = {"svc": ident, "addr": str(key[0]), "port": key[1]}
    return _Step("removed", key, "dest.del", dargs, f)


async def _apply(request, plan: _Plan, status: int = 200, **head) -> web.Response:
    """Send the steps as one batch command: the daemon checks them all on a copy of its model, then applies them
    (each touched service's table rebuilt once). A refused step is reported by its field; nothing was changed."""
    data = None
    if plan.steps:
        try:
            data = await dispatch_async(request.app[CTX], "batch", {"ops": [[st.op, st.args] for st in plan.steps]})
        except HdslbError as e:
            i = getattr(e, "index", None)
            st = plan.steps[i] if isinstance(i, int) and 0 <= i < len(plan.steps) else None
            verb = {"added": "adding", "updated": "updating", "removed": "removing", "created": "creating"}.get(
                st.what, "") if st is not None else ""
            what = (_hostport(st.key) if st.key is not None else "the service") if st is not None else ""
            prefix = f"{verb} {what}: " if st is not None else ""
            raise ApiError(STATUS.get(e.errno, 500), e.errno, f"{prefix}{e.message}; nothing was changed",
                           st.field if st is not None else None) from None
    out = dict(head)
    for k in ("added", "updated", "removed"):
        out[k] = []
    for st in plan.steps:
        if st.key is not None:
            out[st.what].append(_hostport(st.key))
    out["unchanged"] = [_hostport(k) for k in plan.unchanged]
    # what was accepted but cannot work yet (a DR server with no route to it), by server, as ipvsadm and PATCH say
    out["warnings"] = [f"{_hostport(plan.steps[w['index']].key) if plan.steps[w['index']].key else 'the service'}: "
                       f"{w['warning']}" for w in (data or {}).get("warnings", ())]
    return _reply(out, status)


async def list_rs(request):
    svc = await _one_service(request, await _ident(request))
    return _reply({"Items": [_rs_expand(d) for d in svc["dests"]]})


async def put_rs(request):
    ident, body = await _rs_body(request)
    async with request.app[LOCK]:
        current, items = await _rs_snapshot(request, ident, body)
        return await _apply(request, _upserts(ident, current, items))


async def replace_rs(request):
    ident, body = await _rs_body(request)
    async with request.app[LOCK]:
        current, items = await _rs_snapshot(request, ident, body)
        plan = _upserts(ident, current, items)
        wanted = {key for _, key, _ in items}
        # New and changed servers go in before old ones leave: the service never runs short during the swap.
        for key, cur in current.items():
            if key not in wanted:
                plan.steps.append(_removal(ident, key, cur, None))
        return await _apply(request, plan)


async def delete_rs(request):
    ident, body = await _rs_body(request)
    async with request.app[LOCK]:
        current, items = await _rs_snapshot(request, ident, body)
        plan = _Plan()
        for f, key, it in items:
            if key not in current:  # refuse the whole request before anything is removed
                raise ApiError(404, errno.ENOENT, f"{f}: no real server {_hostport(key)} in this service", f)
            _delete_item_matches(f, it, current[key])
            plan.steps.append(_removal(ident, key, current[key], f))
        return await _apply(request, plan)


def _delete_item_matches(f: str, it: dict, cur: dict) -> None:
    """DELETE .../rs names servers by ip and port. dpvs-agent's Go client always sends weight (and may send the
    flags) as their zero values, and a client may send back what GET showed: those are fine. Any other value
    says the caller means some other server state, and is refused rather than silently ignored."""
    have = {"weight": {0, cur.get("conf_weight", cur["weight"]), cur["weight"]},
            "mode": {"", cur["fwd"].upper()}, "inhibited": {False, _flag_now(cur, "inhibited")},
            "overloaded": {False, _flag_now(cur, "overloaded")}}
    for k, ok in have.items():
        if k in it and (it[k].upper() if k == "mode" and isinstance(it[k], str) else it[k]) not in ok:
            raise ApiError(400, errno.EINVAL, f"{f}.{k}: {it[k]!r} is not this server's ({_hostport_of(cur)}); "
                                              f"DELETE names servers by ip and port only, nothing removed",
                           f"{f}.{k}")


def _hostport_of(d: dict) -> str:
    return _hostport((ip_address(d["addr"]), d["port"]))


# --- local addresses --------------------------------------------------------------------------------
async def list_laddr(request):
    data = await _call(request, "laddr.list", {"svc": await _ident(request)})
    return _reply({"Items": [_laddr_expand(la) for la in data["services"][0]["laddrs"]]})


async def put_laddr(request):
    ident = await _ident(request)
    body = await _body(request, "LocalAddressSpecTiny")
    addr = ipaddress.ip_address(body["addr"])
    async with request.app[LOCK]:
        try:
            await _call(request, "laddr.add", {"svc": ident, "addr": str(addr), "ifname": body["device"]},
                        device_in_body=True)
            return _changed("created", 201)
        except ApiError as e:
            if e.errno != errno.EEXIST:
                raise
            data = await _call(request, "laddr.list", {"svc": ident})
            for la in data["services"][0]["laddrs"]:
                if ipaddress.ip_address(la["addr"]) == addr and la["ifname"] != body["device"]:
                    raise ApiError(409, errno.EEXIST, f"local address {addr} exists on {la['ifname']}, not "
                                                      f"{body['device']}", "device") from None
    return _changed("unchanged", 200)


async def delete_laddr(request):
    ident = await _ident(request)
    body = await _body(request, "LocalAddressRef")
    await _call(request, "laddr.del", {"svc": ident, "addr": str(ipaddress.ip_address(body["addr"]))})
    return _changed("deleted", 200)


# --- devices: addresses and routes ------------------------------------------------------------------
async def list_device(request):
    data = await _call(request, "link.list", {})
    return _reply({"Items": data["links"]})


async def list_device_addr(request):
    name = request.match_info["name"]
    data = await _call(request, "addr.list", {"ifname": name})
    return _reply({"Items": [{"addr": f"{a['addr']}/{a['prefixlen']}", "device": a["ifname"], "scope": a["scope"],
                              "sapool": a["sapool"]} for a in data["addrs"]]})


async def put_device_addr(request):
    name = request.match_info["name"]
    body = await _body(request, "InetAddrSpec")
    sapool = _qbool(request, "sapool")
    itf = ipaddress.ip_interface(body["addr"])
    scope = body.get("scope")
    args = {"addr": str(itf.ip), "prefixlen": itf.network.prefixlen, "ifname": name, "scope": scope, "sapool": sapool}
    async with request.app[LOCK]:
        try:
            await _call(request, "addr.add", args)
            return _changed("created", 201)
        except ApiError as e:
            if e.errno != errno.EEXIST:
                raise
            have = [a for a in (await _call(request, "addr.list", {}))["addrs"]
                    if ipaddress.ip_address(a["addr"]) == itf.ip]
            same = have and (have[0]["ifname"], have[0]["prefixlen"], have[0]["scope"], have[0]["sapool"]) == (
                name, itf.network.prefixlen, scope or "global", sapool)
            if not same:
                where = f" on {have[0]['ifname']} as {have[0]['addr']}/{have[0]['prefixlen']}" if have else ""
                raise ApiError(409, errno.EEXIST, f"address {itf.ip} exists already{where}, with other settings",
                               "addr") from None
    return _changed("unchanged", 200)


async def delete_device_addr(request):
    name = request.match_info["name"]
    body = await _body(request, "InetAddrRef")
    itf = ipaddress.ip_interface(body["addr"])
    # as `ip addr del`: a prefix given must be the address's (the model refuses another, naming the one it has)
    plen = {"prefixlen": itf.network.prefixlen} if "/" in body["addr"] else {}
    await _call(request, "addr.del", {"addr": str(itf.ip), "ifname": name, **plen}, field="addr")
    return _changed("deleted", 200)


def _route_args(name: str, body: dict) -> dict:
    if body.get("device") not in (None, "", name):
        raise ApiError(400, errno.EINVAL, f"device: {body['device']!r} differs from the URL's {name!r}", "device")
    if body.get("src") not in (None, "", "0.0.0.0/0", "::/0", "0.0.0.0", "::"):
        raise ApiError(501, errno.EOPNOTSUPP, "src: source-prefix routing is not implemented "
                                              "(prefixSrc sets the source address)", "src")
    net = ipaddress.ip_network(body["dst"])
    return {"af": net.version, "prefix": str(net.network_address), "prefixlen": net.prefixlen,
            "via": body.get("gateway"), "src": body.get("prefixSrc"), "ifname": name, "mtu": body.get("mtu"),
            "metric": body.get("metric"), "scope": body.get("scope")}


def _route_expand(r: dict) -> dict:
    return {"dst": f"{r['prefix']}/{r['prefixlen']}", "gateway": r["via"], "prefixSrc": r["src"],
            "device": r["ifname"], "scope": r["scope"], "mtu": r["mtu"], "metric": r["metric"], "proto": r["proto"],
            "flags": r["flags"]}


async def list_device_route(request):
    name = request.match_info["name"]
    await _call(request, "addr.list", {"ifname": name})  # refuses an unknown device (ENODEV -> 404)
    box = [[(await _call(request, "route.list", {"af": af}))["routes"] for af in (4, 6)]]

    def encode() -> bytes:  # in a worker thread: 0.8 s at 50k routes on the loop, as GET /v2/vs's
        return _dumps({"Items": [_route_expand(r) for routes in box.pop() for r in routes
                                 if r["ifname"] == name]}).encode()

    body = await asyncio.get_running_loop().run_in_executor(None, encode)
    return web.Response(body=body, content_type="application/json", charset="utf-8")


async def put_device_route(request):
    name = request.match_info["name"]
    args = _route_args(name, await _body(request, "RouteSpec"))
    async with request.app[LOCK]:
        try:
            await _call(request, "route.add", args)
            return _changed("created", 201)
        except ApiError as e:
            if e.errno != errno.EEXIST:
                raise
        await _call(request, "route.set", args)
    return _changed("updated", 200)


async def delete_device_route(request):
    name = request.match_info["name"]
    args = _route_args(name, await _body(request, "RouteSpec"))
    await _call(request, "route.del", {k: args[k] for k in ("af", "prefix", "prefixlen", "via", "ifname", "metric")})
    return _changed("deleted", 200)


# --- neighbours -------------------------------------------------------------------------------------
async def list_neigh(request):
    device = request.query.get("device") or None
    af = request.query.get("af")
    if af not in (None, "", "4", "6"):
        raise ApiError(400, errno.EINVAL, f"af: {af!r} is not 4 or 6", "af")
    if device is not None:
        await _call(request, "addr.list", {"ifname": device}, field="device")  # unknown device -> 404
    data = await _call(request, "neigh.list", {"ifname": device, "af": int(af) if af else None})
    return _reply({"Items": [{"addr": n["addr"], "lladdr": n["lladdr"], "device": n["ifname"], "state": n["state"],
                              "flags": n["flags"]} for n in data["neighs"]]})


async def put_neigh(request):
    body = await _body(request, "NeighSpec")
    addr = ipaddress.ip_address(body["addr"])
    async with request.app[LOCK]:
        known = any(ipaddress.ip_address(n["addr"]) == addr
                    for n in (await _call(request, "neigh.list", {}))["neighs"])
        await _call(request, "neigh.add", {"addr": str(addr), "lladdr": body["lladdr"], "ifname": body["device"]},
                    device_in_body=True)
    return _changed("updated", 200) if known else _changed("created", 201)


async def delete_neigh(request):
    body = await _body(request, "NeighRef")
    await _call(request, "neigh.del", {"addr": str(ipaddress.ip_address(body["addr"])), "ifname": body.get("device")},
                device_in_body=True)
    return _changed("deleted", 200)


# --- the daemon ---------------------------------------------------------------------------------------
async def get_stats(request):
    return _reply(await _call(request, "stats.get", {}))


async def get_timeouts(request):
    return _reply(await _call(request, "timeouts.get", {}))


async def put_timeouts(request):
    body = await _body(request, "TimeoutsSpec")
    return _reply(dict(await _call(request, "timeouts.set", body), result="updated"))


async def list_conns(request):
    offset = _qint(request, "offset", 0, 0)
    limit = _qint(request, "limit", CONNS_DEFAULT_LIMIT, 1, CONNS_MAX_LIMIT)
    # A page of the daemon's shared REST snapshot (conn.list's paging): offset 0 reads the table anew, a later
    # offset reads the snapshot the last offset-0 page made while it lives (60 s after its last page), so a client
    # walking the offsets sees one consistent table, read once, not once per page. Another client's offset 0
    # replaces the shared one: each reply names its snapshot, and ?snapshot= pages that one (conn.list's cursor).
    snapshot = request.query.get("snapshot")
    args = {"cursor": snapshot} if snapshot else {"shared": True}
    try:
        page = await _call(request, "conn.list", {"offset": offset, "limit": limit, **args},
                           field="snapshot" if snapshot else None)
    except ApiError as e:
        if e.errno == errno.ESTALE:  # (conn.list words it for its own cursor)
            e.message = (f"snapshot {snapshot!r} is unknown or no longer kept (60 s after its last page, a few at "
                         f"most): start the walk again at offset 0 without ?snapshot=")
        raise
    return _reply({"Items": page["conns"], "total": page["total"], "offset": offset, "limit": limit,
                   "snapshot": page.get("cursor")})


async def _ctx_hook(request, name: str, *args):
    fn = getattr(request.app[CTX], name, None)
    if not callable(fn):
        raise ApiError(501, errno.EOPNOTSUPP, f"this daemon does not provide {name}()")
    try:
        res = fn(*args)
        if inspect.isawaitable(res):
            res = await res
    except HdslbError as e:
        raise ApiError(STATUS.get(e.errno, 500), e.errno, e.message, getattr(e, "keyword", None),
                       **({"errors": [str(x) for x in e.errors]} if len(getattr(e, "errors", ())) > 1 else {})
                       ) from None
    return res


async def get_config(request):
    """The running configuration: the file's text, or the text last posted (X-Hdslb-Config-Source says which)."""
    text = await _ctx_hook(request, "config_text")
    if text is None:
        raise ApiError(404, errno.ENOENT, "the daemon runs without a configuration file")
    posted = getattr(request.app[CTX], "config_text_override", None) is not None
    return web.Response(text=text, content_type="text/plain",
                        headers={"X-Hdslb-Config-Source": "posted" if posted else "file"})


async def reload_config(request):
    """Replace the running configuration with the posted text (Content-Type: text/x-hdslb-conf). The text is
    not written to disk: a reload from the file (SIGHUP) or a restart goes back to the file, and the reply's
    `changes.note` says so. It may not include files, run programs (MISC_CHECK, notify_*, quorum_*) or change
    log_file / script_user / enable_script_security: those belong in the file on disk (403 naming the line)."""
    try:
        text = (await request.read()).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, errno.EINVAL, f"request body: the configuration text is not UTF-8 ({e.reason} at byte "
                                          f"{e.start})") from None
    if not text.strip():
        raise ApiError(400, errno.EINVAL, "request body: the configuration text is empty")
    try:
        changes = await _ctx_hook(request, "reload_config", text)
    except ApiError as e:
        # Something the posted text names and the model does not have (an interface hdslbd does not run on): the
        # body is at fault, FILE:LINE in the message, not a missing /v2/config (404).
        if e.status == 404:
            e.status = 400
        raise
    return _reply({"result": "reloaded", **({"changes": changes} if changes is not None else {})})


async def get_health(request):
    try:
        st = await dispatch_async(request.app[CTX], "daemon.status", {})
    except Exception as e:  # health must answer whatever is broken; the reason is the answer
        log.warning("health: daemon.status failed: %s", e)
        return _reply({"state": "Failure", "msg": f"daemon.status failed: {e}"}, 503)
    if st.get("ready") is False:
        # REST answers from before the config file is applied and the checks started (seconds at thousands of
        # virtual servers): not Ok yet, and a 503 for a probe that reads the status alone
        return _reply({"state": "Warning", "msg": "starting: the configuration and health checks are not applied "
                                                  "yet", **st}, 503)
    gone = st.get("gone") or []
    on = ", ".join(f"{k} ({v})" for k, v in st.get("interfaces", {}).items() if k not in gone)
    if st.get("attached") and gone:  # deleted, its XDP program with it: nothing arriving there is balanced
        state, msg = "Warning", (f"interface{'s' if len(gone) > 1 else ''} {', '.join(gone)} gone, and the XDP "
                                 f"program with {'them' if len(gone) > 1 else 'it'} (attached again when back); "
                                 f"attached to {on or 'no other'}")
    elif st.get("attached"):
        state, msg = "Ok", f"attached to {on}"
    else:
        state, msg = "Warning", "the XDP program is attached to no interface"
    return _reply({"state": state, "msg": msg, **st})


async def get_openapi(request):
    return _reply(openapi.DOC)


def _accepts_gzip(header: str) -> bool:
    """Accept-Encoding takes gzip: gzip named with a non-zero q, or, gzip not named, * with one. A coding named
    outright wins over * wherever either stands (RFC 9110 12.5.3): "*;q=0, gzip" takes gzip, "gzip;q=0, *"
    does not. (It read the first of them only.) A q that is not a number counts as 0."""
    q = {}
    for item in header.split(","):
        coding, *params = (p.strip().lower() for p in item.split(";"))
        if coding in ("gzip", "*"):
            weight = 1.0
            for p in params:
                if p.startswith("q="):
                    try:
                        weight = float(p[2:])
                    except ValueError:
                        weight = 0.0
            q.setdefault(coding, weight)
    weight = q.get("gzip", q.get("*", 0.0))
    return weight > 0


async def get_metrics(request):
    from hdslb.api.metrics import CONTENT_TYPE, gzip_body, render

    # The daemon is read on the loop (a big service listing yielding to it; its series are made in a worker thread);
    # the text (~130 MB for 10k services x 10 real servers) is written and,
    # when the scraper accepts it (Prometheus does), gzipped in a worker thread (then ~3 MB).
    # The series are ~1M short-lived objects: made with the cyclic collector paused (hdslb.heap.collections_paused).
    gz = _accepts_gzip(request.headers.get("Accept-Encoding", ""))
    with collections_paused():
        box = [await request.app[REGISTRY].collect_families_async()]

        def write() -> bytes:
            fams = box.pop()  # the series' last reference: ~1M objects freed in this thread, not on the loop
            return gzip_body(fams) if gz else render(fams)

        body = await asyncio.get_running_loop().run_in_executor(None, write)
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE
    if gz:
        resp.headers["Content-Encoding"] = "gzip"
    return resp


# --- the app --------------------------------------------------------------------------------------------
ROUTES = [
    ("GET", "/v2/vs", list_vs),
    ("POST", "/v2/vs", create_vs),
    ("PATCH", "/v2/vs", patch_vs),
    ("GET", "/v2/vs/{VipPort}", get_vs),
    ("PUT", "/v2/vs/{VipPort}", put_vs),
    ("DELETE", "/v2/vs/{VipPort}", delete_vs),
    ("GET", "/v2/vs/{VipPort}/rs", list_rs),
    ("PUT", "/v2/vs/{VipPort}/rs", put_rs),
    ("POST", "/v2/vs/{VipPort}/rs", replace_rs),
    ("DELETE", "/v2/vs/{VipPort}/rs", delete_rs),
    ("GET", "/v2/vs/{VipPort}/laddr", list_laddr),
    ("PUT", "/v2/vs/{VipPort}/laddr", put_laddr),
    ("DELETE", "/v2/vs/{VipPort}/laddr", delete_laddr),
    ("GET", "/v2/device", list_device),
    ("GET", "/v2/device/{name}/addr", list_device_addr),
    ("PUT", "/v2/device/{name}/addr", put_device_addr),
    ("DELETE", "/v2/device/{name}/addr", delete_device_addr),
    ("GET", "/v2/device/{name}/route", list_device_route),
    ("PUT", "/v2/device/{name}/route", put_device_route),
    ("DELETE", "/v2/device/{name}/route", delete_device_route),
    ("GET", "/v2/neigh", list_neigh),
    ("PUT", "/v2/neigh", put_neigh),
    ("DELETE", "/v2/neigh", delete_neigh),
    ("GET", "/v2/stats", get_stats),
    ("GET", "/v2/conns", list_conns),
    ("GET", "/v2/timeouts", get_timeouts),
    ("PUT", "/v2/timeouts", put_timeouts),
    ("GET", "/v2/config", get_config),
    ("POST", "/v2/config", reload_config),
    ("GET", "/v2/health", get_health),
    ("GET", "/v2/openapi.json", get_openapi),
    ("GET", "/metrics", get_metrics),
]


def _authorized(request: web.Request, token: str) -> bool:
    scheme, _, cred = request.headers.get("Authorization", "").partition(" ")
    # Constant-time compare: the time to refuse says nothing about how much of a guess was right. aiohttp decodes
    # header bytes that are not UTF-8 as surrogate escapes: encode them back the same way (never a 500).
    return scheme.lower() == "bearer" and hmac.compare_digest(cred.strip().encode("utf-8", "surrogateescape"),
                                                              token.encode())


def _host_is_loopback(request: web.Request) -> bool:
    """The Host header names a loopback address (or localhost), or is absent. Without a token the API serves
    loopback only; a browser led to it by DNS rebinding sends the attacker's host name and is refused."""
    host = request.headers.get("Host")
    if host is None:
        return True  # every browser sends Host; a local HTTP/1.0 client may not
    host = host.strip()
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else host
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    return is_loopback(name)


def _media_refusal(request: web.Request) -> ApiError | None:
    """A changing request (any POST, or a PUT/PATCH/DELETE with a body) must declare its body's type: JSON, or
    CONFIG_TYPE for POST /v2/config. A PUT or DELETE without a body cannot be sent cross-origin without a
    preflight, so dpvs-agent's body-less calls (DELETE /v2/vs/{VipPort}) need no header."""
    if request.method not in MUTATING or getattr(request.match_info, "http_exception", None) is not None:
        return None  # unknown path or method: the handler's 404/405 says so
    if request.method != "POST" and not request.body_exists:
        return None
    want = CONFIG_TYPE if request.path == CONFIG_PATH else JSON_TYPE
    got = request.headers.get("Content-Type")
    if got is not None and request.content_type == want:
        return None
    return ApiError(415, errno.EMEDIUMTYPE, f"Content-Type must be {want} for {request.method} {request.path} "
                                            f"(got {request.content_type if got is not None else 'none'})",
                    "Content-Type")


def _query_refusal(request: web.Request) -> ApiError | None:
    """A query parameter the operation does not take (the OpenAPI document lists each one's) is a 400 naming it:
    a misspelt ?limt= must not quietly mean the default."""
    if not request.query or getattr(request.match_info, "http_exception", None) is not None:
        return None
    route = request.match_info.route.resource
    schemas = openapi.query_schemas(route.canonical if route is not None else request.path,
                                    "GET" if request.method == "HEAD" else request.method)
    known = frozenset(schemas)
    names = [k for k, _ in request.query.items()]
    if len(names) != len(set(names)):  # MultiDict.get reads the first: ?limit=1&limit=5000 paged by 1
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        return ApiError(400, errno.EINVAL, f"query parameter {twice} is given twice", twice)
    extra = sorted(set(names) - known)
    if not extra:
        # A flag taken for dpvs-agent clients and otherwise ignored (?stats=, ?verbose=) is still a flag:
        # ?stats=maybe is refused as the flags that act (?sapool=) are.
        for name, v in request.query.items():
            if schemas[name].get("type") == "boolean" and v.lower() not in ("true", "false", "1", "0", ""):
                return ApiError(400, errno.EINVAL, f"{name}: {v!r} is not true or false", name)
        return None
    takes = f"it takes: {', '.join(sorted(known))}" if known else "it takes none"
    return ApiError(400, errno.EINVAL, f"unknown query parameter{'s' if len(extra) > 1 else ''} "
                                       f"{', '.join(extra)} for {request.method} {request.path} ({takes})", extra[0])


@web.middleware
async def _guard(request: web.Request, handler):
    token = request.app[TOKEN]
    if token is None and not _host_is_loopback(request):
        return _error(403, errno.EPERM, "without an API token this API answers only requests addressed to a "
                                        "loopback host (Host: 127.0.0.1, [::1] or localhost)", "Host")
    if token is not None and not _authorized(request, token):
        # Never echo what the client sent: a near-miss token must not land in a proxy's or client's log.
        return _error(401, errno.EACCES, "missing or wrong bearer token (Authorization: Bearer ...)",
                      headers={"WWW-Authenticate": 'Bearer realm="hdslb"'})
    refused = _media_refusal(request) or _query_refusal(request)
    if refused is not None:
        return _error(refused.status, refused.errno, refused.message, refused.field)
    limits: _Limits = request.app[LIMITS]
    limits.busy(request.protocol)
    held = 0
    try:
        if request.body_exists and getattr(request.match_info, "http_exception", None) is None:
            held = limits.admit_body(request.content_length)
            if held < 0:
                resp = _error(503, errno.EBUSY, f"busy: {limits.inflight} bytes of other large request bodies are "
                                                f"being taken (at most {INFLIGHT_MAX} at once); retry",
                              headers={"Retry-After": "1"})
                return await _closing(request, resp)  # its body is not read
        return await _handled(request, handler)
    finally:
        limits.release_body(held)
        limits.idle(request.protocol)


async def _closing(request: web.Request, resp: web.Response) -> web.Response:
    """Send resp, then close the connection without reading what is left of the request's body (aiohttp would
    otherwise read and discard it for up to 10 s)."""
    resp.force_close()
    await resp.prepare(request)
    await resp.write_eof()
    request.protocol.force_close()
    return resp


async def _handled(request: web.Request, handler):
    try:
        if request.body_exists and getattr(request.match_info, "http_exception", None) is None:
            try:
                async with asyncio.timeout(BODY_TIMEOUT_S):
                    await request.read()  # kept by the request: the handler's read() returns it
            except TimeoutError:
                resp = _error(408, errno.ETIMEDOUT, f"request body not received whole within {BODY_TIMEOUT_S:g} s")
                return await _closing(request, resp)  # the rest of the body is not waited for
        return await handler(request)
    except ApiError as e:
        return _error(e.status, e.errno, e.message, e.field, **e.extra)
    except HdslbError as e:  # a command called outside _call; same mapping
        return _error(STATUS.get(e.errno, 500), e.errno, e.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, HTTP_ERRNO.get(e.status, errno.EIO), f"{e.reason}: {request.method} {request.path}",
                      headers={k: v for k, v in e.headers.items() if k.lower() == "allow"})
    except Exception:
        log.exception("REST %s %s failed", request.method, request.path)
        return _error(500, errno.EIO, "internal error (the daemon log has the details)")


def make_app(ctx, token: str | None = None) -> web.Application:
    """The REST app over a daemon context; with a token every request must carry `Authorization: Bearer TOKEN`."""
    from hdslb.api.metrics import HdslbCollector

    # A bulk PATCH /v2/vs of 10k services x 10 servers is ~6 MB of JSON: the control socket's frame limit applies.
    app = web.Application(middlewares=[_guard], client_max_size=MAX_FRAME)
    app[CTX] = ctx
    app[TOKEN] = token or None
    app[LOCK] = asyncio.Lock()
    app[REGISTRY] = HdslbCollector(ctx)  # per app: no process-global counters, read at scrape time
    app[LIMITS] = _Limits()
    for method, path, handler in ROUTES:
        if method == "GET":  # and HEAD, as every HTTP server must (RFC 9110 9.1): haproxy's httpchk HEAD probes
            app.router.add_get(path, handler, allow_head=True)
        else:
            app.router.add_route(method, path, handler)
    return app


def is_loopback(host: str | None) -> bool:
    if not host:
        return False  # "" / None bind every address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere


class _Limits:
    """What all REST clients together may hold: MAX_CONNS connections (past it the longest-idle one is closed to
    make room, or the new one when every other is in a request), and INFLIGHT_MAX bytes of large bodies.
    "Idle" is a connection between requests or still sending its request head; a request being handled (its
    body being read included, which BODY_TIMEOUT_S bounds) is busy and never closed from here."""

    def __init__(self):
        self.idle_since: dict = {}  # RequestHandler -> loop time it went idle; absent while busy
        self.inflight = 0
        self._server = None
        self._warned = 0.0

    def watch(self, server) -> None:
        """Count the connections of an aiohttp web Server (AppRunner.server): each one it accepts passes admit()."""
        self._server = server
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler, transport):
            made(handler, transport)
            self._admit(handler, transport)

        def connection_lost(handler, exc=None):
            self.idle_since.pop(handler, None)
            lost(handler, exc)

        server.connection_made, server.connection_lost = connection_made, connection_lost  # the handler calls these

    def _admit(self, handler, transport) -> None:
        now = asyncio.get_running_loop().time()
        self.idle_since[handler] = now
        conns = self._server.connections
        if len(conns) <= MAX_CONNS:
            return
        idle = [(t, i, h) for i, (h, t) in enumerate(self.idle_since.items()) if h is not handler]
        if idle:
            since, _, victim = min(idle)
            self._warn(now, "REST: %d connections (at most %d); closing one idle for %.0f s", len(conns), MAX_CONNS,
                       now - since)
            self.idle_since.pop(victim, None)
            victim.force_close()
            if victim.transport is not None:
                victim.transport.close()
        else:
            self._warn(now, "REST: %d connections, every other one in a request; closing the new one from %s",
                       len(conns), transport.get_extra_info("peername"))
            self.idle_since.pop(handler, None)
            handler.force_close()
            transport.close()

    def _warn(self, now: float, msg: str, *args) -> None:
        if now - self._warned >= 60.0:  # a flood logs once a minute, not per connection
            self._warned = now
            log.warning(msg, *args)

    def busy(self, handler) -> None:
        self.idle_since.pop(handler, None)

    def idle(self, handler) -> None:
        if self._server is not None and handler in self._server.connections:
            self.idle_since[handler] = asyncio.get_running_loop().time()

    def admit_body(self, length: int | None) -> int:
        """Bytes reserved for a body of `length` (None: chunked, bounded by client_max_size), 0 for a small one,
        or -1 when large bodies already hold INFLIGHT_MAX."""
        size = MAX_FRAME if length is None else length
        if size <= SMALL_BODY:
            return 0
        if self.inflight and self.inflight + size > INFLIGHT_MAX:
            return -1
        self.inflight += size
        return size

    def release_body(self, held: int) -> None:
        self.inflight -= held


class AccessLog(AbstractAccessLogger):
    """One line per request: peer, request line, status, body bytes, seconds taken. aiohttp's default logger
    renders its format (a timestamp among it) for every request: 5 % of the daemon in a bulk load of 10k PUTs.
    Here the arguments go to the logging call as they are, and the log handler adds the time once."""

    def log(self, request, response, time):
        self.logger.info('%s "%s %s HTTP/%d.%d" %d %d %.6f', request.remote, request.method, request.path_qs,
                         request.version.major, request.version.minor, response.status, response.body_length, time)


async def start_api(ctx, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
                    access_log: bool = True) -> web.AppRunner:
    """Serve the REST API; returns the runner to pass to stop_api. Off loopback a bearer token is required."""
    token = token or None
    if token is None and not is_loopback(host):
        raise HdslbError(errno.EACCES, f"refusing to serve the REST API on {host or 'every address'}: away from "
                                       f"loopback it needs a bearer token (set an API token, or bind 127.0.0.1)")
    # The access log records the request line only (aiohttp's default format): never the Authorization header.
    access = logging.getLogger("hdslb.api.access") if access_log else None
    app = make_app(ctx, token)
    runner = web.AppRunner(app, access_log=access, access_log_class=AccessLog, shutdown_timeout=API_SHUTDOWN_S,
                           keepalive_timeout=KEEPALIVE_S)
    await runner.setup()
    app[LIMITS].watch(runner.server)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        raise HdslbError(e.errno or errno.EIO,
                         f"cannot serve the REST API on {host}:{port}: {e.strerror or e}") from None
    bound = ", ".join(f"[{a[0]}]:{a[1]}" if ":" in str(a[0]) else f"{a[0]}:{a[1]}" for a in runner.addresses)
    log.info("REST API on http://%s/v2 (%s)", bound, "bearer token required" if token else "no token: loopback only")
    return runner


async def stop_api(runner: web.AppRunner | None) -> None:
    if runner is not None:
        await runner.cleanup()
