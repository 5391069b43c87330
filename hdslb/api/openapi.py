"""The REST API's OpenAPI 3.1 document, as Python data, and request-body validation against the same schemas.

Resources and field names follow iqiyi/dpvs tools/dpvs-agent (dpvs-agent-api.yaml: /v2/vs/{VipPort}, RSs.Items,
RealServerSpecTiny{ip, port, weight, mode}, LocalAddressSpecTiny{addr, device}, InetAddrSpec, RouteSpec), so
automation written for dpvs-agent finds the same shapes. Bodies are validated here before any command runs, so
a malformed request changes nothing and its 400 names the offending field.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from functools import lru_cache

from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import best_match

from hdslb import __version__
from hdslb.balancer import FWD_MODES, MAX_WEIGHT, ROUTE_SCOPES, SCHEDULERS
from hdslb.config.model import LVS_TIMEOUTS, MAX_TIMEOUT_S
from hdslb.net.addr import ip_address

# --- formats ------------------------------------------------------------------------------------------
# Custom formats (OpenAPI leaves `format` open): checked by the same code the model would run, so a body that
# passes here is not refused later for its spelling.
FORMATS = FormatChecker(formats=())


class ScopedAddress(ValueError):
    """An IPv6 address with a %zone: ipaddress takes it, the model keys on the 16 address bytes alone (and the REST
    handlers' own parse, hdslb.net.addr.ip_address, raised on it: a 500). Refused here for every address field,
    so the 400 names the field."""


def _unscoped(v: str) -> str:
    if "%" in v:
        raise ScopedAddress(f"{v!r} is a scoped IPv6 address (with a %zone), not taken: the interface is given on "
                            f"its own")
    return v


@FORMATS.checks("ip", raises=ValueError)
def _is_ip(v) -> bool:
    return not isinstance(v, str) or bool(ipaddress.ip_address(_unscoped(v)))


@FORMATS.checks("ip-interface", raises=ValueError)
def _is_ip_interface(v) -> bool:
    return not isinstance(v, str) or bool(ipaddress.ip_interface(_unscoped(v)))


@FORMATS.checks("ip-network", raises=ValueError)
def _is_ip_network(v) -> bool:
    return not isinstance(v, str) or bool(ipaddress.ip_network(_unscoped(v), strict=True))


@FORMATS.checks("mac")
def _is_mac(v) -> bool:
    # fullmatch: a pattern's `$` (re.search, as jsonschema applies it) also takes "...:01\n"
    return not isinstance(v, str) or re.fullmatch(r"[0-9A-Fa-f]{1,2}(:[0-9A-Fa-f]{1,2}){5}", v) is not None


FORMAT_WORDS = {"ip": "an IP address", "ip-interface": "an ADDR or ADDR/PREFIXLEN",
                "ip-network": "a PREFIX/LEN with no host bits set", "mac": "a MAC address (02:00:00:00:00:01)"}


# --- schemas ------------------------------------------------------------------------------------------
def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


UINT16 = {"type": "integer", "minimum": 0, "maximum": 65535}
UINT32 = {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
UINT64 = {"type": "integer", "minimum": 0}
IP = {"type": "string", "format": "ip", "description": "IPv4 or IPv6 address (no %zone)"}
MAC = {"type": "string", "format": "mac", "pattern": "^[0-9A-Fa-f]{1,2}(:[0-9A-Fa-f]{1,2}){5}$"}
MODES = [m.upper() for m in FWD_MODES] + list(FWD_MODES)  # dpvs-agent writes FNAT; ipvsadm's habit is fnat

# dpvs-agent's VirtualServerSpecTiny. SchedName, Timeout, Netmask and (on create) Match mean something to this fast
# path; the rest are accepted so dpvs-agent clients can send their defaults, and a non-default value is a 501
# naming the field.
VS_OPTIONS = {
    "SchedName": {"type": "string", "enum": list(SCHEDULERS), "description": "lb_algo (ipvsadm -s)"},
    "Timeout": dict(UINT32, maximum=86400 * 31,
                    description="persistence timeout in seconds (ipvsadm -p); 0: none (turns it off on PUT)"),
    "Netmask": {"type": ["string", "integer", "null"], "minimum": 0, "maximum": 2**32 - 1,
                "description": "persistence granularity (ipvsadm -M): what GET shows (dpvs-agent's uint32: IPv4, the "
                               "mask's network-order bytes read little-endian, 255.255.255.0 = 16777215, 4294967295 "
                               "= none; IPv6, the prefix length, 128 = none), a prefix length, or ipvsadm's dotted "
                               "mask as a string; 0 or null: none"},
    "ConnTimeout": UINT32,
    "Bps": UINT32,
    "LimitProportion": UINT32,
    "Fwmark": UINT32,
    "SynProxy": {"type": "boolean"},
    "ExpireQuiescent": {"type": "boolean"},
    "Quic": {"type": "boolean"},
    "ProxyProtocol": {"type": "string", "enum": ["v2", "v2-insecure", "v1", "v1-insecure", "disable"]},
    "Match": _ref("MatchSpec"),
}

ADDR_RANGE = {"type": "object", "additionalProperties": False,
              "description": "inclusive IPv4 range; absent or empty Start: any",
              "properties": {"Start": {"type": "string"}, "End": {"type": "string"}}}

STATS = {
    "type": "object",
    "description": "dpvs-agent ServerStats: totals since the last zero, and rates over the estimator's interval",
    "properties": {k: UINT64 for k in ("Conns", "InPkts", "InBytes", "OutPkts", "OutBytes",
                                       "Cps", "InPps", "InBps", "OutPps", "OutBps")},
}

SCHEMAS = {
    "Error": {
        "type": "object", "required": ["error", "errno", "field"],
        "properties": {
            "error": {"type": "string", "description": "what was refused and why"},
            "errno": {"type": "integer", "description": "the control plane's errno (EEXIST, ESRCH, EINVAL, ...)"},
            "field": {"type": ["string", "null"], "description": "the body field or parameter at fault, if known"},
        },
    },
    "VirtualServerSpecTiny": {
        "type": "object", "additionalProperties": False,
        "properties": {**VS_OPTIONS, "RSs": dict(_ref("RealServerTinyList"), description=(
            "hdslb bulk extension (dpvs-agent's VirtualServerSpecExpand carries RSs too): the service and these "
            "real servers in one request, applied as one batch (upserted as PUT .../rs does; all or nothing). "
            "The reply is a SetChange with result and Id"))},
    },
    "VirtualServerCreate": {
        "type": "object", "additionalProperties": False, "required": ["Proto"],
        "description": "a VIP service (Addr, Port, Proto), or a SNAT service (Match, Proto; icmp allowed)",
        "properties": {
            "Addr": IP, "Port": UINT16,
            "Proto": {"enum": ["tcp", "udp", "icmp", "TCP", "UDP", "ICMP", 1, 6, 17]},
            **VS_OPTIONS,
        },
    },
    "VirtualServerBulk": {
        "type": "object", "additionalProperties": False, "required": ["Items"],
        "description": "hdslb bulk extension (PATCH /v2/vs): services with their real servers, upserted in one batch",
        "properties": {"Items": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["Addr", "Port", "Proto"],
            "properties": {
                "Addr": IP, "Port": UINT16, "Proto": {"enum": ["tcp", "udp", "TCP", "UDP", 6, 17]},
                **{k: v for k, v in VS_OPTIONS.items() if k != "Match"},
                "RSs": _ref("RealServerTinyList"),
            }}}},
    },
    "BulkChange": {
        "type": "object", "required": ["result", "services", "real_servers"],
        "properties": {"result": {"enum": ["applied"]}, "services": {"type": "integer"},
                       "real_servers": {"type": "integer"},
                       "warnings": {"type": "array", "items": {"type": "string"},
                                    "description": "accepted changes that cannot work yet, by field"}},
    },
    "MatchSpec": {
        "type": "object", "additionalProperties": False,
        "description": "dpvs-agent MatchSpec / ipvsadm -H: what selects a SNAT service (IPv4 only)",
        "properties": {"Src": ADDR_RANGE, "Dest": ADDR_RANGE,
                       "InIfName": {"type": "string", "description": "ingress interface; empty: any"},
                       "OutIfName": {"type": "string", "description": "egress interface; empty: any"}},
    },
    "RealServerSpecTiny": {
        "type": "object", "additionalProperties": False, "required": ["ip"],
        "properties": {
            "ip": IP,
            "port": dict(UINT16, description="0 or absent: the service's port"),
            "weight": {"type": "integer", "minimum": 0, "maximum": MAX_WEIGHT,
                       "description": "the configured weight (0 drains the server); absent: 1 when added, "
                                      "unchanged when updated (PUT). A health check's verdict never changes it"},
            "mode": {"type": "string", "enum": MODES,
                     "description": "forwarding method FNAT DR NAT TUNNEL SNAT (ipvsadm -b -g -m -i -J); absent: "
                                    "FNAT when added (SNAT under a Match service), unchanged when updated"},
            "inhibited": {"type": "boolean", "description": "held out of rotation by its health check, not set by "
                                                           "clients: true is 501 unless the server is so now"},
            "overloaded": {"type": "boolean", "description": "set by -x/-y thresholds, not by clients: true is 501 "
                                                            "unless the server is so now"},
        },
    },
    "RealServerTinyList": {
        "type": "object", "additionalProperties": False, "required": ["Items"],
        "properties": {"Items": {"type": "array", "items": _ref("RealServerSpecTiny")}},
    },
    "LocalAddressSpecTiny": {
        "type": "object", "additionalProperties": False, "required": ["addr", "device"],
        "properties": {"addr": IP, "device": {"type": "string", "minLength": 1}},
    },
    "LocalAddressRef": {
        "type": "object", "additionalProperties": False, "required": ["addr"],
        "properties": {"addr": IP, "device": {"type": "string", "description": "ignored: addr identifies it"}},
    },
    "InetAddrSpec": {
        "type": "object", "additionalProperties": False, "required": ["addr"],
        "properties": {
            "addr": {"type": "string", "format": "ip-interface",
                     "description": "ADDR or ADDR/PREFIXLEN (/32, /128 if absent)"},
            "scope": {"type": "string", "enum": ["global", "link", "host"]},
            "broadcast": {"type": "string", "description": "accepted for dpvs-agent clients; not used"},
        },
    },
    "InetAddrRef": {
        "type": "object", "additionalProperties": False, "required": ["addr"],
        "properties": {"addr": {"type": "string", "format": "ip-interface"},
                       "broadcast": {"type": "string"}, "scope": {"type": "string"}},
    },
    "RouteSpec": {
        "type": "object", "additionalProperties": False, "required": ["dst"],
        "properties": {
            "dst": {"type": "string", "format": "ip-network",
                    "description": "PREFIX/LEN (host bits clear); 0.0.0.0/0 is the default route"},
            "gateway": IP,
            "prefixSrc": IP,
            "src": {"type": "string",
                    "description": "source-prefix (policy) routing; not implemented: non-empty is 501"},
            "device": {"type": "string", "description": "must match the path's device if given"},
            "scope": {"type": "string", "enum": list(ROUTE_SCOPES)},
            "mtu": UINT32,
            "metric": UINT32,
        },
    },
    "NeighSpec": {
        "type": "object", "additionalProperties": False, "required": ["addr", "lladdr", "device"],
        "properties": {"addr": IP, "lladdr": MAC, "device": {"type": "string", "minLength": 1}},
    },
    "NeighRef": {
        "type": "object", "additionalProperties": False, "required": ["addr"],
        "properties": {"addr": IP, "device": {"type": "string"}},
    },
    "TimeoutsSpec": {
        "type": "object", "additionalProperties": False, "minProperties": 1,
        "description": "ipvsadm --set: idle timeouts in seconds, tcp = ESTABLISHED, tcpfin = FIN_WAIT, udp = UDP; "
                       "0 or absent keeps the current value",
        "properties": {k: dict(UINT32, maximum=MAX_TIMEOUT_S) for k in LVS_TIMEOUTS},
    },
    # --- responses ---
    "Timeouts": {
        "type": "object", "required": [*LVS_TIMEOUTS, "states", "config", "set"],
        "description": "the running idle timeouts (seconds): LVS's three (ipvsadm -L --timeout), every state's, the "
                       "config's, and the states an ipvsadm --set holds (a config change of that timeout replaces "
                       "it)",
        "properties": {**{k: UINT32 for k in LVS_TIMEOUTS},
                       **{k: {"type": "object", "additionalProperties": UINT32} for k in ("states", "config", "set")},
                       "result": {"enum": ["updated"]}},
    },
    "ServerStats": STATS,
    "RealServerSpecExpand": {
        "type": "object", "required": ["Spec", "Stats"],
        "properties": {
            "Spec": {"type": "object", "required": ["ip", "port", "weight", "mode"],
                     "description": "what a client writes (RealServerSpecTiny): sent back as it is, it changes "
                                    "nothing",
                     "properties": {"ip": IP, "port": UINT16,
                                    "weight": dict(UINT16, description="the configured weight, kept while a health "
                                                                       "check holds the server out (inhibited); "
                                                                       "EffectiveWeight is what scheduling uses"),
                                    "mode": {"type": "string"},
                                    "inhibited": {"type": "boolean", "description": "held out of rotation by "
                                                                                    "its health check"},
                                    "overloaded": {"type": "boolean"}}},
            "Stats": _ref("ServerStats"),
            "ActiveConns": UINT64, "InactConns": UINT64,
            "UThreshold": UINT32, "LThreshold": UINT32,
            "EffectiveWeight": dict(UINT16, readOnly=True, description=(
                "hdslb extension, read-only: the weight scheduling uses now: 0 while inhibited or held out for a "
                "sorry server, a checker's dynamic weight (misc_dynamic), else Spec.weight")),
        },
    },
    "RealServerExpandList": {
        "type": "object", "required": ["Items"],
        "properties": {"Items": {"type": "array", "items": _ref("RealServerSpecExpand")}},
    },
    "LocalAddressSpecExpand": {
        "type": "object", "required": ["af", "addr", "device", "conns"],
        "properties": {"af": {"enum": [2, 10]}, "addr": IP, "device": {"type": "string"}, "conns": UINT64,
                       "portConflict": UINT64},
    },
    "LocalAddressExpandList": {
        "type": "object", "required": ["Items"],
        "properties": {"Items": {"type": "array", "items": _ref("LocalAddressSpecExpand")}},
    },
    "VirtualServerSpecExpand": {
        "type": "object", "required": ["Id", "Af", "Proto", "Addr", "Port", "SchedName", "Stats", "RSs"],
        "properties": {
            "Id": {"type": "string", "description": "the {VipPort} of this service's URL: VIP-PORT-PROTO, or "
                                                    "match-ID for a SNAT service"},
            "Af": {"enum": [2, 10], "description": "AF_INET or AF_INET6"},
            "Proto": {"enum": [1, 6, 17]},
            "Match": _ref("MatchSpec"),
            "Addr": IP, "Port": UINT16,
            "SchedName": {"type": "string"},
            "Flags": {"type": "string"},
            "Timeout": UINT32,
            "Netmask": {**UINT32, "description": "dpvs-agent's uint32: IPv4, the mask's network-order bytes read "
                                                 "little-endian (255.255.255.0 = 16777215, 4294967295 = none); "
                                                 "IPv6, the prefix length (128 = none)"},
            "Stats": _ref("ServerStats"),
            "RSs": _ref("RealServerExpandList"),
            "Laddrs": _ref("LocalAddressExpandList"),
        },
    },
    "VirtualServerList": {
        "type": "object", "required": ["Items"],
        "properties": {"Items": {"type": "array", "items": _ref("VirtualServerSpecExpand")}},
    },
    "InetAddrList": {
        "type": "object", "required": ["Items"],
        "properties": {"Items": {"type": "array", "items": {
            "type": "object", "required": ["addr", "device"],
            "properties": {"addr": {"type": "string", "format": "ip-interface"}, "device": {"type": "string"},
                           "scope": {"type": "string"}, "sapool": {"type": "boolean"}}}}},
    },
    "RouteList": {
        "type": "object", "required": ["Items"],
        "properties": {"Items": {"type": "array", "items": {
            "type": "object", "required": ["dst", "device"],
            "properties": {"dst": {"type": "string", "format": "ip-network"}, "gateway": {"type": "string"},
                           "prefixSrc": {"type": "string"}, "device": {"type": "string"},
                           "scope": {"type": "string"}, "mtu": UINT32, "metric": UINT32,
                           "proto": {"type": "string"}, "flags": {"type": "array", "items": {"type": "string"}}}}}},
    },
    "NeighList": {
        "type": "object", "required": ["Items"],
        "properties": {"Items": {"type": "array", "items": {
            "type": "object", "required": ["addr", "lladdr", "device"],
            "properties": {"addr": IP, "lladdr": {"type": "string"}, "device": {"type": "string"},
                           "state": {"type": "string"}, "flags": {"type": "array", "items": {"type": "string"}}}}}},
    },
    "DeviceList": {
        "type": "object", "required": ["Items"],
        "properties": {"Items": {"type": "array", "items": {"type": "object"}}},
    },
    "Stats": {
        "type": "object", "required": ["counters", "per_cpu"],
        "properties": {
            "counters": {"type": "object", "additionalProperties": UINT64,
                         "description": "fast-path counters summed over CPUs: rx, verdict_*, pass_*, drop_*, ..."},
            "per_cpu": {"type": "object", "additionalProperties": {"type": "array", "items": UINT64}},
            "conn_table": {"type": "object"},
        },
    },
    "Conn": {
        "type": "object", "description": "a connection table entry (conn.list's; ipvsadm -Lnc prints the inbound ones)",
        "required": ["proto", "af", "saddr", "sport", "daddr", "dport", "to_saddr", "to_sport", "to_daddr",
                     "to_dport", "out", "state", "svc_id", "dest_slot", "last_seen_ns", "cpu", "idle_s", "expire_s"],
        "properties": {
            "proto": dict(UINT16, description="IP protocol number (6 TCP, 17 UDP)"),
            "af": {"enum": [4, 6]}, "saddr": IP, "sport": UINT16, "daddr": IP, "dport": UINT16,
            "to_saddr": dict(IP, description="the rewrite's source (FullNAT: the local address)"),
            "to_sport": UINT16, "to_daddr": dict(IP, description="the rewrite's destination"), "to_dport": UINT16,
            "out": {"type": "boolean", "description": "the reply-side entry (the real server's packets)"},
            "state": {"type": "string", "description": "the flow's state (both entries show it)"},
            "svc_id": UINT16, "dest_slot": UINT32,
            "last_seen_ns": dict(UINT64, description="this entry's newest packet, CLOCK_MONOTONIC ns"),
            "cpu": {"type": ["integer", "null"], "minimum": 0,
                    "description": "the CPU whose copy is newest; null for a shared conn table"},
            "idle_s": dict(UINT64, description="seconds since the flow's newest packet, either direction"),
            "expire_s": dict(UINT64, description="seconds left before the entry expires (ipvsadm -Lnc's time "
                                                 "column): the flow state's running timeout less idle_s, 0 past it "
                                                 "until the sweep removes it"),
        },
    },
    "ConnPage": {
        "type": "object", "required": ["Items", "total", "offset", "limit"],
        "properties": {"Items": {"type": "array", "items": _ref("Conn")},
                       "total": UINT64, "offset": UINT64, "limit": UINT64,
                       "snapshot": {"type": ["string", "null"],
                                    "description": "the snapshot this page was read from: give it as ?snapshot= "
                                                   "for the next pages of the same walk"}},
    },
    "Health": {
        "type": "object", "required": ["state", "msg"],
        "description": "dpvs-agent's Status, plus what daemon.status reports",
        "properties": {"state": {"enum": ["Ok", "Warning", "Failure", "Disabled"]}, "msg": {"type": "string"}},
    },
    "Change": {
        "type": "object", "required": ["result"],
        "properties": {"result": {"enum": ["created", "updated", "unchanged", "deleted", "reloaded"]},
                       "Id": {"type": "string"}},
    },
    "SetChange": {
        "type": "object", "required": ["added", "updated", "removed", "unchanged"],
        "description": "real servers by ADDR:PORT ([ADDR]:PORT for IPv6); result and Id when a PUT /v2/vs/{VipPort} "
                       "with RSs also created or updated the service",
        "properties": {**{k: {"type": "array", "items": {"type": "string"}}
                          for k in ("added", "updated", "removed", "unchanged")},
                       "warnings": {"type": "array", "items": {"type": "string"},
                                    "description": "accepted changes that cannot work yet, by server"},
                       "result": {"enum": ["created", "updated"]}, "Id": {"type": "string"}},
    },
}

# --- paths --------------------------------------------------------------------------------------------
ERROR_RESPONSES = {
    "400": "BadRequest: malformed body or parameter (EINVAL); `field` names it; also a body device unknown (ENODEV)",
    "401": "Unauthorized: a bearer token is configured and the request lacks it or has another",
    "404": "NotFound: no such service, real server, address, route, neighbour, or the URL's device "
           "(ESRCH, ENOENT, ENODEV)",
    "403": "Forbidden: a posted config that includes a file or runs a program (EPERM), or, without a token, a Host "
           "that is not loopback",
    "409": "Conflict: it exists already, differently (EEXIST)",
    "410": "Gone: the /v2/conns snapshot named is no longer kept (ESTALE): start again at offset 0",
    "415": "UnsupportedMediaType: a POST, or a PUT/PATCH/DELETE with a body, must say Content-Type: "
           "application/json (text/x-hdslb-conf for POST /v2/config)",
    "501": "NotImplemented: valid, but this fast path does not do it yet (EOPNOTSUPP)",
    "507": "InsufficientStorage: a table is full (ENOSPC)",
}


def _json(schema_name: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema_name)}}}


def _op(op_id: str, summary: str, ops: list[str], ok: dict, errors: tuple = (), body: str | None = None,
        params: tuple = (), body_required: bool = True) -> dict:
    out = {"operationId": op_id, "summary": summary, "x-hdslb-ops": ops, "responses": {}}
    for code, v in ok.items():
        out["responses"][code] = v
    for code in ("401", *errors):
        out["responses"][code] = {"$ref": f"#/components/responses/{ERROR_RESPONSES[code].split(':')[0]}"}
    if body:
        out["requestBody"] = {"required": body_required,
                              "content": {"application/json": {"schema": _ref(body)}}}
    if params:
        out["parameters"] = [{"$ref": f"#/components/parameters/{p}"} for p in params]
    return out


_VS = ["VipPort"]
_DEV = ["name"]
PATHS = {
    "/v2/vs": {
        "get": _op("listVs", "all virtual servers with their real servers and stats", ["service.list"],
                   {"200": _json("VirtualServerList", "services")}, params=("stats",)),
        "post": _op("createVs", "create a virtual server (409 if it exists; PUT /v2/vs/{VipPort} upserts)",
                    ["service.add"], {"201": _json("Change", "created")}, ("400", "409", "501", "507"),
                    body="VirtualServerCreate"),
        "patch": _op("bulkVs", "hdslb bulk extension: upsert many services, each with its real servers (RSs), in "
                               "one request and one batch (all or nothing; a refused item is named by `field`, e.g. "
                               "Items[3].RSs.Items[7]); services and servers not listed are left as they are",
                     ["batch", "service.set", "dest.set"], {"200": _json("BulkChange", "applied")},
                     ("400", "404", "501", "507"), body="VirtualServerBulk"),
    },
    "/v2/vs/{VipPort}": {
        "parameters": [{"$ref": "#/components/parameters/VipPort"}],
        "get": _op("getVs", "one virtual server", ["service.list"], {"200": _json("VirtualServerList", "the service")},
                   ("400", "404"), params=("stats",)),
        "put": _op("putVs", "create or update a virtual server (201 created, 200 updated); with RSs, its real "
                            "servers too, in one batch (all or nothing: a refused item changes nothing and is named "
                            "by `field`, RSs.Items[i])",
                   ["service.add", "service.edit", "service.list", "batch"],
                   {"200": _json("Change", "updated (SetChange with RSs)"),
                    "201": _json("Change", "created (SetChange with RSs)")},
                   ("400", "501", "507"), body="VirtualServerSpecTiny", body_required=False),
        "delete": _op("deleteVs", "delete a virtual server", ["service.del"], {"200": _json("Change", "deleted")},
                      ("400", "404")),
    },
    "/v2/vs/{VipPort}/rs": {
        "parameters": [{"$ref": "#/components/parameters/VipPort"}],
        "get": _op("listRs", "the service's real servers", ["service.list"],
                   {"200": _json("RealServerExpandList", "real servers")}, ("400", "404"), params=("stats",)),
        "put": _op("putRs", "add real servers; ones that exist are updated with the fields given (one batch: all "
                            "or nothing)",
                   ["service.list", "batch", "dest.add", "dest.edit"], {"200": _json("SetChange", "applied")},
                   ("400", "404", "501", "507"), body="RealServerTinyList", params=("healthcheck",)),
        "post": _op("replaceRs", "make the real servers exactly the body's (add, update, remove the rest; one "
                             "batch: all or nothing)",
                    ["service.list", "batch", "dest.add", "dest.edit", "dest.del"], {"200": _json("SetChange", "applied")},
                    ("400", "404", "501", "507"), body="RealServerTinyList"),
        "delete": _op("deleteRs", "remove the listed real servers (404, nothing removed, if one is absent). Items "
                                  "name servers by ip and port; weight, mode, inhibited and overloaded may be "
                                  "given only as their zero value or the server's own (400 otherwise)",
                      ["service.list", "batch", "dest.del"], {"200": _json("SetChange", "applied")}, ("400", "404"),
                      body="RealServerTinyList"),
    },
    "/v2/vs/{VipPort}/laddr": {
        "parameters": [{"$ref": "#/components/parameters/VipPort"}],
        "get": _op("listLaddr", "the service's FNAT local addresses", ["laddr.list"],
                   {"200": _json("LocalAddressExpandList", "local addresses")}, ("400", "404"), params=("stats",)),
        "put": _op("putLaddr", "add a local address (200 if it is there on that device already)",
                   ["laddr.add", "laddr.list"],
                   {"200": _json("Change", "unchanged"), "201": _json("Change", "created")},
                   ("400", "404", "409", "501", "507"), body="LocalAddressSpecTiny"),
        "delete": _op("deleteLaddr", "remove a local address", ["laddr.del"], {"200": _json("Change", "deleted")},
                      ("400", "404"), body="LocalAddressRef"),
    },
    "/v2/device": {
        "get": _op("listDevice", "the interfaces the fast path is attached to (dpip link show)", ["link.list"],
                   {"200": _json("DeviceList", "devices")}, params=("stats",)),
    },
    "/v2/device/{name}/addr": {
        "parameters": [{"$ref": "#/components/parameters/name"}],
        "get": _op("listDeviceAddr", "the device's addresses (dpip addr show dev NAME)", ["addr.list"],
                   {"200": _json("InetAddrList", "addresses")}, ("404",), params=("stats", "verbose")),
        "put": _op("putDeviceAddr", "add an address (200 if it is there already, the same)", ["addr.add", "addr.list"],
                   {"200": _json("Change", "unchanged"), "201": _json("Change", "created")},
                   ("400", "404", "409"), body="InetAddrSpec", params=("sapool",)),
        "delete": _op("deleteDeviceAddr", "remove an address (with a /PREFIXLEN, only if it has that prefix: 404 "
                                          "otherwise, as ip addr del)", ["addr.list", "addr.del"],
                      {"200": _json("Change", "deleted")}, ("400", "404"), body="InetAddrRef", params=("sapool_del",)),
    },
    "/v2/device/{name}/route": {
        "parameters": [{"$ref": "#/components/parameters/name"}],
        "get": _op("listDeviceRoute", "routes leaving by the device (both families)", ["addr.list", "route.list"],
                   {"200": _json("RouteList", "routes")}, ("404",), params=("stats",)),
        "put": _op("putDeviceRoute", "add a route, or replace the one with the same prefix and metric",
                   ["route.add", "route.set"],
                   {"200": _json("Change", "updated"), "201": _json("Change", "created")},
                   ("400", "404", "501", "507"), body="RouteSpec"),
        "delete": _op("deleteDeviceRoute", "remove a route", ["route.del"], {"200": _json("Change", "deleted")},
                      ("400", "404"), body="RouteSpec"),
    },
    "/v2/neigh": {
        "get": _op("listNeigh", "the fast path's neighbour table (static and learned)", ["neigh.list", "addr.list"],
                   {"200": _json("NeighList", "neighbours")}, ("400", "404"), params=("device", "af")),
        "put": _op("putNeigh", "add or replace a static neighbour", ["neigh.list", "neigh.add"],
                   {"200": _json("Change", "updated"), "201": _json("Change", "created")}, ("400",),
                   body="NeighSpec"),
        "delete": _op("deleteNeigh", "remove a static neighbour", ["neigh.del"], {"200": _json("Change", "deleted")},
                      ("400", "404"), body="NeighRef"),
    },
    "/v2/stats": {
        "get": _op("getStats", "fast-path counters (total and per CPU) and the connection table's fill",
                   ["stats.get"], {"200": _json("Stats", "counters")}),
    },
    "/v2/timeouts": {
        "get": _op("getTimeouts", "the running connection idle timeouts (ipvsadm -L --timeout)", ["timeouts.get"],
                   {"200": _json("Timeouts", "timeouts")}),
        "put": _op("putTimeouts", "set the ESTABLISHED (tcp), FIN_WAIT (tcpfin) and UDP idle timeouts live, as "
                   "ipvsadm --set (0 keeps a value); kept across restarts until the config changes that timeout",
                   ["timeouts.set"], {"200": _json("Timeouts", "updated")}, ("400", "415"), body="TimeoutsSpec"),
    },
    "/v2/conns": {
        "get": _op("listConns", "connection table entries, one per direction, paged", ["conn.list"],
                   {"200": _json("ConnPage", "a page of connections")}, ("400", "410"),
                   params=("offset", "limit", "snapshot")),
    },
    "/v2/config": {
        "get": _op("getConfig", "the running configuration (keepalived-style text)", ["ctx.config_text"],
                   {"200": {"description": "config text", "content": {"text/plain": {"schema": {"type": "string"}}}}},
                   ("501",)),
        "post": _op("reloadConfig", "replace the running configuration (reload) with the body (Content-Type: "
                    "text/x-hdslb-conf); errors carry FILE:LINE. The text is not written to disk: a reload from the "
                    "file (SIGHUP) or a restart goes back to the file. It may not include files, run programs "
                    "(MISC_CHECK, notify_*, quorum_*) or change log_file, script_user or enable_script_security (403 "
                    "naming the line): put those in the config file on disk",
                    ["ctx.reload_config"], {"200": _json("Change", "reloaded")}, ("400", "403", "415", "501")),
    },
    "/v2/health": {
        "get": _op("getHealth", "is the daemon up and attached", ["daemon.status"],
                   {"200": _json("Health", "state Ok or Warning (not attached)"),
                    "503": _json("Health", "state Failure, or Warning while hdslbd is starting (its config and "
                                           "health checks not applied yet)")}),
    },
    "/v2/openapi.json": {
        "get": _op("getOpenapi", "this document", [],
                   {"200": {"description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}}}}),
    },
    "/metrics": {
        "get": _op("getMetrics", "Prometheus metrics (text exposition format 0.0.4)", ["service.list", "stats.get"],
                   {"200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}),
    },
}
PATHS["/v2/config"]["post"]["requestBody"] = {
    "required": True, "content": {"text/x-hdslb-conf": {"schema": {"type": "string", "minLength": 1}}}}


def query_names(path: str, method: str) -> frozenset:
    """The query parameters the document lists for an operation: the REST app refuses any other (400)."""
    return frozenset(query_schemas(path, method))


def query_schemas(path: str, method: str) -> dict:
    """{name: schema} of the query parameters the document lists for an operation."""
    op = PATHS.get(path, {}).get(method.lower())
    if op is None:
        return {}
    out = {}
    for ref in op.get("parameters", ()):
        p = PARAMETERS[ref["$ref"].rsplit("/", 1)[1]]
        if p["in"] == "query":
            out[p["name"]] = p["schema"]
    return out


def _qparam(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


PARAMETERS = {
    "VipPort": {"name": "VipPort", "in": "path", "required": True, "schema": {"type": "string"},
                "description": "VIP-PORT-PROTO, as dpvs-agent: 10.0.0.100-80-tcp, 2001:db8::1-443-tcp; a SNAT "
                               "service: match-ID (its Id in the list)"},
    "name": {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "an interface the fast path is attached to"},
    "stats": _qparam("stats", {"type": "boolean"}, "accepted for dpvs-agent clients; stats are always included"),
    "sapool": _qparam("sapool", {"type": "boolean"}, "reserve FNAT source ports on this address (dpip ... sapool)"),
    "sapool_del": _qparam("sapool", {"type": "boolean"}, "accepted for dpvs-agent clients; the address goes with its "
                                                         "port pool whatever it says"),
    "verbose": _qparam("verbose", {"type": "boolean"}, "accepted for dpvs-agent clients; the list is always whole"),
    "healthcheck": _qparam("healthcheck", {"type": "boolean"},
                           "accepted for dpvs-agent clients (its health checker's writes), not acted on: hdslb's "
                           "own health checks set inhibited servers' weights, and the request is applied as any other"),
    "offset": _qparam("offset", {"type": "integer", "minimum": 0}, "first entry (default 0)"),
    "limit": _qparam("limit", {"type": "integer", "minimum": 1, "maximum": 10000}, "entries per page (default 100)"),
    "snapshot": _qparam("snapshot", {"type": "string"}, "a previous page's snapshot: this page is read from it "
                                                        "(410 once it is gone: start again at offset 0); without "
                                                        "it, offset 0 makes a new shared snapshot and other offsets "
                                                        "read the newest"),
    "device": _qparam("device", {"type": "string"}, "only this interface"),
    "af": _qparam("af", {"type": "integer", "enum": [4, 6]}, "only this address family"),
}

RESPONSES = {
    code_desc.split(":")[0]: {"description": code_desc, "content": {"application/json": {"schema": _ref("Error")}}}
    for code_desc in ERROR_RESPONSES.values()
}

DOC = {
    "openapi": "3.1.0",
    "info": {
        "title": "hdslb",
        "version": __version__,
        "description": "hdslb control API, shaped like DPVS's dpvs-agent. Every operation runs the same control "
                       "commands as the unix socket (x-hdslb-ops names them). Errors are "
                       "{error, errno, field}; statuses: EINVAL 400, ENODEV 404 for the URL's device and 400 for "
                       "a device named in the body, ESRCH/ENOENT 404, EEXIST 409, EOPNOTSUPP 501, ENOSPC 507, EPERM "
                       "403. Every POST, and every PUT/PATCH/DELETE with a body, says Content-Type: application/json "
                       "(text/x-hdslb-conf for POST /v2/config), else 415: no web page can send one cross-origin.",
    },
    "servers": [{"url": "/"}],
    "security": [{}, {"bearerAuth": []}],  # no token on loopback by default; required once one is configured
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "parameters": PARAMETERS,
        "responses": RESPONSES,
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                           "description": "required when the daemon was given an API token"}},
    },
}


def document() -> dict:
    """A copy of the document, safe for a caller to change."""
    return copy.deepcopy(DOC)


# --- request validation -------------------------------------------------------------------------------
class BodyError(Exception):
    """A request body the schema refuses; `field` is a dotted path like Items[1].weight (None: the body)."""

    def __init__(self, message: str, field: str | None):
        super().__init__(message)
        self.message = message
        self.field = field


def _path(parts) -> str | None:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


# JSON Schema counts 80.0 as an integer; the model then gets a float (and refuses it without naming the field).
# Here an integer field takes a JSON integer only, so the refusal names the field.
_Validator = validators.extend(Draft202012Validator, type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda checker, v: isinstance(v, int) and not isinstance(v, bool)))


@lru_cache(maxsize=None)
def _validator(name: str) -> Draft202012Validator:
    if name not in SCHEMAS:
        raise KeyError(f"no schema {name!r}")
    # The root carries the components so every "#/components/schemas/..." reference resolves as in the document.
    return _Validator({"$ref": f"#/components/schemas/{name}", "components": {"schemas": SCHEMAS}},
                      format_checker=FORMATS)


def _u(v, hi: int) -> bool:
    return type(v) is int and 0 <= v <= hi


def _ip_ok(v) -> bool:
    """A plain address (hdslb.net.addr's parser: 10x faster than ipaddress's, and the address is then remembered for
    the request's own parse); anything it refuses goes to the schema, which words the refusal."""
    try:
        return type(v) is str and bool(ip_address(v))
    except ValueError:
        return False


# The keys the plain check knows (the common ones, and what dpvs-agent's Go client always sends: its flags' zero
# values); any other goes to the schema.
_RS_KEYS = frozenset(("ip", "port", "weight", "mode", "inhibited", "overloaded"))
_BULK_KEYS = frozenset(("Addr", "Port", "Proto", "SchedName", "Timeout", "RSs"))
_BULK_PROTOS = ("tcp", "udp", "TCP", "UDP", 6, 17)
_TINY_KEYS = frozenset(("SchedName", "Timeout", "RSs"))
_TIMEOUT_MAX = VS_OPTIONS["Timeout"]["maximum"]


def _rs_list_ok(rss) -> bool:
    if type(rss) is not dict or rss.keys() != {"Items"} or type(rss["Items"]) is not list:
        return False
    for it in rss["Items"]:
        if type(it) is not dict or not it.keys() <= _RS_KEYS or not _ip_ok(it.get("ip")):
            return False
        if ("port" in it and not _u(it["port"], 65535)) or ("weight" in it and not _u(it["weight"], MAX_WEIGHT)) \
                or ("mode" in it and it["mode"] not in MODES) \
                or ("inhibited" in it and type(it["inhibited"]) is not bool) \
                or ("overloaded" in it and type(it["overloaded"]) is not bool):
            return False
    return True


def _timeout_ok(d: dict) -> bool:
    return "Timeout" not in d or _u(d["Timeout"], _TIMEOUT_MAX)


def _plainly_valid(name: str, body) -> bool:
    """True when a large body (a bulk of 10k services, a long real server list) surely matches its schema, checked
    in plain Python: jsonschema takes ~30 us per real server. Anything else, and anything unusual (an option
    beyond the common ones), goes to the schema, which stays the one judge and words the refusal."""
    if name == "RealServerTinyList":
        return _rs_list_ok(body)
    if name == "VirtualServerSpecTiny":  # PUT /v2/vs/{VipPort}, commonly a scheduler and the real servers
        return (type(body) is dict and body.keys() <= _TINY_KEYS and body.get("SchedName", "rr") in SCHEDULERS
                and _timeout_ok(body) and ("RSs" not in body or _rs_list_ok(body["RSs"])))
    if name != "VirtualServerBulk" or type(body) is not dict or body.keys() != {"Items"} \
            or type(body["Items"]) is not list:
        return False
    for it in body["Items"]:
        if type(it) is not dict or not it.keys() <= _BULK_KEYS or not _ip_ok(it.get("Addr")) \
                or not _u(it.get("Port"), 65535) or it.get("Proto") not in _BULK_PROTOS \
                or it.get("SchedName", "rr") not in SCHEDULERS or not _timeout_ok(it) \
                or ("RSs" in it and not _rs_list_ok(it["RSs"])):
            return False
    return True


def validate(name: str, body) -> None:
    """Raise BodyError naming the first offending field when `body` does not match schema `name`."""
    if _plainly_valid(name, body):
        return
    err = best_match(_validator(name).iter_errors(body))
    if err is None:
        return
    parts = list(err.absolute_path)
    msg = err.message
    if err.validator == "required" and isinstance(err.instance, dict):
        missing = next((r for r in err.validator_value if r not in err.instance), None)
        parts.append(missing)
        msg = "is required"
    elif err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = set(err.schema.get("properties", {}))
        extra = sorted(k for k in err.instance if k not in known)
        if extra:
            parts.append(extra[0])
            msg = f"unknown field (known: {', '.join(sorted(known))})"
    elif err.validator == "format" and isinstance(err.cause, ScopedAddress):
        msg = str(err.cause)
    elif err.validator == "format":
        msg = f"{err.instance!r} is not {FORMAT_WORDS.get(err.validator_value, err.validator_value)}"
    field = _path(parts)
    raise BodyError(f"{field}: {msg}" if field else f"request body: {msg}", field)
