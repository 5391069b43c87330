"""Bad input changes nothing, checked over the whole surface: every control op (hdslb.ctl.commands.COMMANDS) and
every REST route (hdslb.api.app.ROUTES) gets malformed arguments and bodies (wrong types, missing and empty
values, huge, negative, NaN/inf numbers, huge strings, deep nesting, bytes that are not UTF-8) and valid but
conflicting requests (add twice, delete what is missing, conflicting scheduler/flag/forwarding combinations).
Each must be refused with an errno and a message (control) or a 4xx naming the reason (REST), never an internal
error, and the daemon's whole observable state (services with their real servers, timeouts, local addresses,
routes, addresses, neighbours, the running config, what was written to the fast path) is byte-identical after.

The daemon is the real Daemon over a recording datapath (tests.unit.test_api_security.HarnessDaemon); the cases
are generated from per-op field tables with a fixed seed, so a failure names a case that replays."""

from __future__ import annotations

import copy
import errno
import json
import logging
import math
import random

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hdslb.api import dispatch_async
from hdslb.api.app import ROUTES, make_app
from hdslb.balancer import snapshot
from hdslb.ctl import commands
from hdslb.errors import HdslbError
from tests.unit.test_api_security import HarnessDaemon

SEED = 20261206
SVC = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}
SVC2 = {"proto": "udp", "addr": "10.0.0.101", "port": 53}
CONF_TEXT = """global_defs {
    log_level INFO
}
local_address_group lg {
    192.168.100.200 eth1
}
virtual_server 10.0.0.100 80 {
    lb_algo wrr
    lb_kind FNAT
    protocol TCP
    laddr_group_name lg
    real_server 192.168.100.2 80 {
        weight 3
    }
    real_server 192.168.100.3 8080 {
        weight 1
    }
}
"""


class FuzzDaemon(HarnessDaemon):
    """The harness daemon with the few fast-path reads the listing ops make answered from memory."""

    conn_listing = None  # conn.list pages from conn_list() (no conn table columns here)

    def conn_list(self):
        return [{"proto": 6, "af": 4, "saddr": "1.1.1.1", "sport": 1000 + i, "daddr": "10.0.0.100", "dport": 80,
                 "state": "established", "out": False} for i in range(3)]

    def persist_list(self):
        return []

    def link_stats(self, ifname):
        return {"rx_packets": 0, "rx_bytes": 0, "tx_packets": 0, "tx_bytes": 0, "drops": 0}

    def conn_table(self):
        return {"size": 4096, "entries": 3, "expired": 0, "evicted": 0}


async def make_daemon(tmp_path):
    conf = tmp_path / "hdslb.conf"
    conf.write_text(CONF_TEXT)
    d = FuzzDaemon(conf, tmp_path)
    await d.reload_config()
    d.maps.set_idle_timeouts = lambda t: None
    d.maps.counters = lambda: {}
    for op, a in [
        ("addr.add", {"addr": "10.0.0.7", "prefixlen": 24, "ifname": "eth0"}),
        ("addr.add", {"addr": "10.0.0.8", "prefixlen": 24, "ifname": "eth0", "sapool": True}),
        ("route.add", {"af": 4, "prefix": "10.8.0.0", "prefixlen": 16, "via": "10.0.0.1", "ifname": "eth0"}),
        ("route.add", {"af": 6, "prefix": "2001:db8::", "prefixlen": 64, "ifname": "eth1"}),
        ("neigh.add", {"addr": "10.0.0.9", "lladdr": "02:00:00:00:00:09", "ifname": "eth0"}),
        ("service.add", dict(SVC2, sched="sh", flags=["sh-port"])),
        ("dest.add", {"svc": SVC2, "addr": "192.168.100.5", "port": 53, "fwd": "dr"}),
        ("service.add", {"match": {"proto": "tcp", "src_range": "10.1.0.0-10.1.0.255"}}),
        ("dest.add", {"svc": {"match": {"proto": "tcp", "src_range": "10.1.0.0-10.1.0.255"}}, "addr": "10.0.0.8",
                      "port": 0, "fwd": "snat"}),
        ("timeouts.set", {"udp": 120}),
    ]:
        await dispatch_async(d, op, a)
    return d


READS = [("service.list", {}), ("timeouts.get", {}), ("laddr.list", {}), ("route.list", {"af": 4}),
         ("route.list", {"af": 6}), ("addr.list", {}), ("neigh.list", {}), ("config.get", {}), ("health.list", {})]


async def observable(d) -> bytes:
    """Everything a client can read back, and everything written to the fast path, as bytes."""
    state = {f"{op} {a}": await dispatch_async(d, op, dict(a)) for op, a in READS}
    state["model"] = snapshot(d.bal)
    state["config"] = (d.config.source if d.config else None, sorted(map(str, d.bal.config_owned)), d.timeout_overrides, d.file_timeouts,
                       d.settings.timeouts, sorted(d.ctl_checks))
    state["datapath writes"] = len(d.bal.dp.calls)
    return json.dumps(state, sort_keys=True, default=str).encode()


# --- malformed values by what a field holds ------------------------------------------------------------------
def _deep(n):
    v = 1
    for _ in range(n):
        v = [v]
    return v


NAN, INF = float("nan"), float("inf")
JUNK = [1.5, NAN, INF, -INF, [], {}, [1, 2], {"a": {"b": {}}}, _deep(200), b"\xff\xfe"]
BAD = {
    "ip": [True, False, 1, 2**64, -1, "", "x" * 70000, "10.0.0.1\n", "٣.٣.٣.٣", "256.0.0.1", "10.0.0.1%eth0",
           "\x00", "10.0.0"] + JUNK,
    "port": [True, False, -1, 65536, 2**64, -2**63, "80", "", "٨٠"] + JUNK,
    "weight": [True, False, -1, 65536, 2**64, "2", ""] + JUNK,
    "uint": [True, False, -1, 2**64, -2**63, "1", "", "1e9"] + JUNK,
    "enum": [True, False, 0, 1, "nosuch", "x" * 70000, "\x00", "RR\n"] + JUNK,
    "proto": [None, True, 6, "", "sctp", "TCP\n", "x" * 70000] + JUNK,
    "svc": [None, True, 1, "10.0.0.100:80", [], {}, {"proto": "tcp"}, {"proto": "tcp", "addr": "10.0.0.100"},
            {"match": "x"}, {"match": {}}, _deep(200), b"\xff"],
    "bool": ["yes", "", 1, 0, 2, NAN, [], {}, "true"],
    "ifname": [True, 1, "", "nosuch0", "eth0\n", "x" * 70000, [], {}, b"eth0"],
    "mac": [True, 1, "", "02:00:00:00:00", "zz:00:00:00:00:01", "02:00:00:00:00:01\n", "+2:0:0:0:0:1",
            "1_0:0:0:0:0:1", "02:00:00:00:00:01:02", [], {}],
    "flags": [True, "sh-port", ["nosuch"], ["mh-port"], [1], [[]], {"sh-port": 1}, _deep(200)],
    "text": [1, True, [], {}, b"\xff"],
    "netmask": [True, -1, 33, 2**64, "x", "255.0.255.0", "٢٤", 1.5, NAN, [], {}],  # 1..32 are prefix lengths
    "ops": [None, 1, "x", {}, [1], [["dest.add"]], [["nosuch.op", {}]], [["batch", {"ops": []}]],
            [["dest.add", {"svc": SVC, "addr": "192.168.100.9", "weigth": 5}]],
            [["dest.add", []]], [[1, {}]], [["config.reload", {"text": "x"}]], _deep(200)],
}

# op -> (valid args, {field: kind}, required fields). The args are valid against make_daemon's state: each case
# changes one field to a malformed value (or drops a required one), so the refusal is that field's.
OPS = {
    "service.add": ({"proto": "tcp", "addr": "10.0.0.60", "port": 80, "sched": "wrr", "persistent": 0},
                    {"proto": "proto", "addr": "ip", "port": "port", "sched": "enum", "persistent": "uint",
                     "flags": "flags"}, ("proto", "addr", "port")),
    "service.edit": (dict(SVC, sched="rr"), {"proto": "proto", "addr": "ip", "port": "port", "sched": "enum",
                                             "persistent": "uint", "flags": "flags"}, ("proto", "addr", "port")),
    "service.set": (dict(SVC, sched="rr"), {"proto": "proto", "addr": "ip", "port": "port", "sched": "enum",
                                            "persistent": "uint", "flags": "flags"}, ("proto", "addr", "port")),
    "service.del": (dict(SVC), {"proto": "proto", "addr": "ip", "port": "port"}, ("proto", "addr", "port")),
    "service.list": ({"svc": SVC}, {"svc": "svc"}, ()),
    "stats.zero": ({"svc": SVC}, {"svc": "svc"}, ()),
    "dest.add": ({"svc": SVC, "addr": "192.168.100.9", "port": 80, "weight": 2, "fwd": "fnat"},
                 {"svc": "svc", "addr": "ip", "port": "port", "weight": "weight", "fwd": "enum",
                  "u_threshold": "uint", "l_threshold": "uint"}, ("svc", "addr")),
    "dest.edit": ({"svc": SVC, "addr": "192.168.100.2", "port": 80, "weight": 5},
                  {"svc": "svc", "addr": "ip", "port": "port", "weight": "weight", "fwd": "enum",
                   "u_threshold": "uint", "l_threshold": "uint"}, ("svc", "addr")),
    "dest.set": ({"svc": SVC, "addr": "192.168.100.2", "port": 80, "weight": 5},
                 {"svc": "svc", "addr": "ip", "port": "port", "weight": "weight", "fwd": "enum"}, ("svc", "addr")),
    "dest.del": ({"svc": SVC, "addr": "192.168.100.2", "port": 80}, {"svc": "svc", "addr": "ip", "port": "port"},
                 ("svc", "addr")),
    "laddr.add": ({"svc": SVC, "addr": "192.168.100.201", "ifname": "eth1"},
                  {"svc": "svc", "addr": "ip", "ifname": "ifname"}, ("svc", "addr", "ifname")),
    "laddr.del": ({"svc": SVC, "addr": "192.168.100.200"}, {"svc": "svc", "addr": "ip"}, ("svc", "addr")),
    "laddr.list": ({"svc": SVC}, {"svc": "svc"}, ()),
    "addr.add": ({"addr": "10.0.5.1", "prefixlen": 24, "ifname": "eth0", "scope": "global"},
                 {"addr": "ip", "prefixlen": "uint", "ifname": "ifname", "scope": "enum", "sapool": "bool"},
                 ("addr", "ifname")),
    "addr.del": ({"addr": "10.0.0.7", "ifname": "eth0"}, {"addr": "ip", "ifname": "ifname", "prefixlen": "uint"},
                 ("addr",)),
    "addr.flush": ({"ifname": "eth1"}, {"ifname": "ifname"}, ()),
    "addr.list": ({"ifname": "eth0", "af": 4}, {"ifname": "ifname", "af": "enum"}, ()),
    "route.add": ({"af": 4, "prefix": "10.9.0.0", "prefixlen": 16, "via": "10.0.0.1", "ifname": "eth0"},
                  {"af": "enum", "prefix": "ip", "prefixlen": "uint", "via": "ip", "src": "ip", "ifname": "ifname",
                   "mtu": "uint", "metric": "uint", "scope": "enum"}, ("prefix", "ifname")),
    "route.set": ({"af": 4, "prefix": "10.8.0.0", "prefixlen": 16, "via": "10.0.0.2", "ifname": "eth0"},
                  {"af": "enum", "prefix": "ip", "prefixlen": "uint", "via": "ip", "ifname": "ifname",
                   "mtu": "uint", "metric": "uint", "scope": "enum"}, ("prefix", "ifname")),
    "route.del": ({"af": 4, "prefix": "10.8.0.0", "prefixlen": 16, "ifname": "eth0"},
                  {"af": "enum", "prefix": "ip", "prefixlen": "uint", "ifname": "ifname", "via": "ip"},
                  ("prefix",)),
    "route.flush": ({"af": 6}, {"af": "enum"}, ()),
    "route.list": ({"af": 4, "ifname": "eth0"}, {"af": "enum", "ifname": "ifname"}, ()),
    "neigh.add": ({"addr": "10.0.0.19", "lladdr": "02:00:00:00:00:19", "ifname": "eth0"},
                  {"addr": "ip", "lladdr": "mac", "ifname": "ifname"}, ("addr", "lladdr", "ifname")),
    "neigh.del": ({"addr": "10.0.0.9"}, {"addr": "ip"}, ("addr",)),
    "neigh.list": ({"ifname": "eth0", "af": 4}, {"ifname": "ifname", "af": "enum"}, ()),
    "link.list": ({"ifname": "eth0"}, {"ifname": "ifname"}, ()),
    "batch": ({"ops": [["dest.add", {"svc": SVC, "addr": "192.168.100.9", "port": 80}]], "dry_run": False},
              {"ops": "ops", "dry_run": "bool"}, ("ops",)),
    "timeouts.set": ({"tcp": 900, "tcpfin": 10, "udp": 30}, {"tcp": "uint", "tcpfin": "uint", "udp": "uint"}, ()),
    "conn.list": ({"limit": 10, "offset": 0, "inbound": True},
                  {"limit": "uint", "offset": "uint", "inbound": "bool", "shared": "bool", "cursor": "text"}, ()),
    "config.reload": ({"text": CONF_TEXT.replace("weight 1", "weight 2")}, {"text": "text"}, ()),
    "check.add": ({"svc": SVC, "addr": "192.168.100.2", "port": 80, "kind": "TCP_CHECK"},
                  {"svc": "svc", "addr": "ip", "port": "port", "kind": "enum", "params": "flags",
                   "delay_loop": "uint"}, ("svc", "addr")),
    "check.del": ({"svc": SVC, "addr": "192.168.100.2", "port": 80}, {"svc": "svc", "addr": "ip", "port": "port"},
                  ("svc", "addr")),
}
# Ops with no arguments to get wrong (or only harmless ones), and those a unit daemon cannot run.
NO_ARGS = {"service.flush", "timeouts.get", "stats.get", "daemon.status", "config.get", "health.list"}
NOT_HERE = {"daemon.shutdown": "stops the daemon: its one argument (detach) is a flag",
            "daemon.reload_datapath": "compiles the XDP program: bpf tier"}

# Values a field may legitimately take beyond its template's: (op, field, value) accepted as valid.
LEGAL = {
    ("service.add", "persistent", 0), ("service.edit", "persistent", 0), ("service.set", "persistent", 0),
    ("dest.add", "weight", 0), ("dest.edit", "weight", 0), ("dest.set", "weight", 0),
    ("timeouts.set", "tcp", 0), ("timeouts.set", "tcpfin", 0), ("timeouts.set", "udp", 0),
    ("conn.list", "offset", 0), ("conn.list", "inbound", False), ("conn.list", "shared", False),
    ("conn.list", "inbound", True), ("conn.list", "shared", True), ("batch", "dry_run", True),
    ("batch", "dry_run", False), ("addr.add", "sapool", True), ("addr.add", "sapool", False),
    ("addr.add", "prefixlen", 0), ("route.add", "prefixlen", 0),
    ("service.list", "svc", None), ("stats.zero", "svc", None),  # None: every service
    ("laddr.list", "svc", None), ("check.add", "delay_loop", 1.5),
    ("route.add", "via", ""), ("route.set", "via", ""), ("route.del", "via", ""), ("route.add", "src", ""),  # none
    ("conn.list", "offset", 2**64),  # past the end: an empty last page
}


def _legal(op, field, value) -> bool:
    return any(o == op and f == field and type(v) is type(value) and v == value for o, f, v in LEGAL)


def ctl_cases(op: str, rng: random.Random, per_field: int | None = None) -> list:
    """(name, args) that must each be refused: every malformed value of each field (a seeded sample of
    per_field of them when given), each required field dropped, and no arguments at all."""
    args, kinds, required = OPS[op]
    out = [("no arguments", {})] if required else []
    # a key the op does not take (a misspelt one, or one of another op's) is refused, not dropped in silence
    typo = {"check.add": "type", "dest.add": "weigth", "service.add": "scheduler", "conn.list": "limt"}.get(op, "bogus")
    out.append((f"unknown key {typo}", dict(args, **{typo: 1})))
    out.append(("a key that is not text", {**args, 1: 2}))  # msgpack maps may have any keys
    if isinstance(args.get("svc"), dict):
        out.append(("unknown key svc.prot", dict(args, svc={"prot": "udp", "addr": "10.0.0.100", "port": 80})))
        out.append(("unknown key svc.sched", dict(args, svc=dict(SVC, sched="rr"))))
    for f in required:
        out.append((f"without {f}", {k: v for k, v in args.items() if k != f}))
    for f, kind in kinds.items():
        vals = [v for v in BAD[kind] if not _legal(op, f, v)]
        if per_field is not None:
            vals = rng.sample(vals, min(per_field, len(vals)))
        for v in vals:
            a = copy.deepcopy(args)
            a[f] = v
            out.append((f"{f}={_short(v)}", a))
        if kind == "svc" or f == "svc":
            continue
    for sub in ("addr", "port", "proto"):  # the service ident inside svc
        if "svc" in kinds:
            for v in rng.sample(BAD["ip" if sub == "addr" else sub], 4):
                a = copy.deepcopy(args)
                a["svc"] = dict(a["svc"], **{sub: v})
                out.append((f"svc.{sub}={_short(v)}", a))
    return out


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 24 else s[:21] + "..."


# Valid requests that conflict with the state: each refused with this errno.
CONFLICTS = [
    ("service.add", dict(SVC), errno.EEXIST),
    ("service.add", {"proto": "tcp", "addr": "10.0.0.61", "port": 80, "sched": "rr", "flags": ["sh-port"]},
     errno.EINVAL),
    ("service.add", {"proto": "tcp", "addr": "10.0.0.61", "port": 80, "sched": "nosuch"}, errno.ENOENT),
    ("service.add", {"proto": "tcp", "addr": "10.0.0.61", "port": 0}, errno.EINVAL),
    ("service.add", {"proto": "tcp", "addr": "224.0.0.1", "port": 80}, errno.EINVAL),
    ("service.add", {"match": {"proto": "tcp", "src_range": "10.2.0.0-10.2.0.9"}, "persistent": 60},
     errno.EOPNOTSUPP),
    ("service.edit", dict(SVC, sched="rr", flags=["sh-port"]), errno.EINVAL),
    ("service.edit", dict(SVC2, flags=["mh-port"]), errno.EINVAL),
    ("service.edit", dict(SVC, sched="mh", sched_params={"size": -1}), errno.EINVAL),
    ("service.edit", {"proto": "tcp", "addr": "10.0.0.61", "port": 80}, errno.ESRCH),
    ("service.del", {"proto": "tcp", "addr": "10.0.0.61", "port": 80}, errno.ESRCH),
    ("dest.add", {"svc": SVC, "addr": "192.168.100.2", "port": 80}, errno.EEXIST),
    ("dest.add", {"svc": SVC2, "addr": "192.168.100.6", "port": 54, "fwd": "dr"}, errno.EINVAL),
    ("dest.add", {"svc": SVC, "addr": "192.168.100.6", "port": 80, "fwd": "snat"}, errno.EINVAL),
    ("dest.add", {"svc": SVC, "addr": "2001:db8::6", "port": 80}, errno.EOPNOTSUPP),
    ("dest.add", {"svc": SVC, "addr": "192.168.100.6", "u_threshold": 5, "l_threshold": 9}, errno.ERANGE),
    ("dest.add", {"svc": {"match": {"proto": "tcp", "src_range": "10.1.0.0-10.1.0.255"}}, "addr": "10.0.0.7",
                  "port": 0, "fwd": "snat"}, errno.EADDRNOTAVAIL),
    ("dest.edit", {"svc": SVC, "addr": "192.168.100.99", "port": 80, "weight": 1}, errno.ENOENT),
    ("dest.edit", {"svc": SVC, "addr": "192.168.100.3", "port": 8080, "fwd": "dr"}, errno.EINVAL),
    ("dest.del", {"svc": SVC, "addr": "192.168.100.99", "port": 80}, errno.ENOENT),
    ("laddr.add", {"svc": SVC, "addr": "192.168.100.200", "ifname": "eth1"}, errno.EEXIST),
    ("laddr.add", {"svc": {"match": {"proto": "tcp", "src_range": "10.1.0.0-10.1.0.255"}}, "addr": "10.0.0.7",
                   "ifname": "eth0"}, errno.EINVAL),
    ("laddr.del", {"svc": SVC, "addr": "192.168.100.250"}, errno.ENOENT),
    ("addr.add", {"addr": "10.0.0.7", "prefixlen": 24, "ifname": "eth0"}, errno.EEXIST),
    ("addr.del", {"addr": "10.0.0.77", "ifname": "eth0"}, errno.EADDRNOTAVAIL),
    ("addr.del", {"addr": "10.0.0.7", "ifname": "eth0", "prefixlen": 8}, errno.EADDRNOTAVAIL),
    ("addr.del", {"addr": "10.0.0.8", "ifname": "eth0"}, errno.EBUSY),  # a SNAT service's source address
    ("addr.flush", {"ifname": "eth0"}, errno.EBUSY),
    ("route.add", {"af": 4, "prefix": "10.8.0.0", "prefixlen": 16, "via": "10.0.0.1", "ifname": "eth0"},
     errno.EEXIST),
    ("route.add", {"af": 4, "prefix": "10.8.0.1", "prefixlen": 16, "ifname": "eth0"}, errno.EINVAL),
    ("route.add", {"af": 6, "prefix": "10.9.0.0", "prefixlen": 16, "ifname": "eth0"}, errno.EINVAL),
    ("route.add", {"af": 4, "prefix": "10.9.0.0", "prefixlen": 16, "via": "2001:db8::1", "ifname": "eth0"},
     errno.EINVAL),
    ("route.add", {"af": 4, "prefix": "10.9.0.0", "prefixlen": 16, "ifname": "eth0", "mtu": 20}, errno.EINVAL),
    ("route.set", {"af": 4, "prefix": "10.99.0.0", "prefixlen": 16, "ifname": "eth0"}, errno.ENOENT),
    ("route.del", {"af": 4, "prefix": "10.99.0.0", "prefixlen": 16}, errno.ESRCH),
    ("neigh.del", {"addr": "10.0.0.99"}, errno.ENOENT),
    ("timeouts.set", {"established": 5}, errno.EINVAL),
    ("service.flush", {"svc": SVC}, errno.EINVAL),  # not "flush this one": it would flush every service
    ("timeouts.get", {"tcp": 5}, errno.EINVAL), ("daemon.status", {"verbose": True}, errno.EINVAL),
    ("daemon.shutdown", {"detahc": False}, errno.EINVAL),
    ("conn.list", {"cursor": "feedfeedfeedfeed", "shared": True}, errno.EINVAL),
    ("check.del", {"svc": SVC, "addr": "192.168.100.2", "port": 80}, errno.ENOENT),
    ("check.add", {"svc": SVC, "addr": "192.168.100.99", "port": 80}, errno.ENOENT),
    ("check.add", {"svc": SVC, "addr": "192.168.100.2", "port": 80, "kind": "HTTP_GET", "params": {"url": "/"}},
     errno.EINVAL),
    ("config.reload", {"text": CONF_TEXT.replace("lb_algo wrr", "lb_algo nosuch")}, errno.EINVAL),
    ("config.reload", {"text": CONF_TEXT.replace("}\n}\n", "}\n")}, errno.EINVAL),
    ("config.reload", {"text": CONF_TEXT + "include /etc/passwd\n"}, errno.EPERM),
    # what only the model catches (DR cannot rewrite the port): named by file:line, nothing applied
    ("config.reload", {"text": CONF_TEXT + "virtual_server 10.0.0.102 80 {\n lb_kind DR\n"
                                           " real_server 192.168.100.5 8080 {\n }\n}\n"}, errno.EINVAL),
    # a batch refused at its last op leaves the ops before it undone; so does one of new services only
    ("batch", {"ops": [["dest.add", {"svc": SVC, "addr": "192.168.100.9", "port": 80}],
                       ["route.add", {"af": 4, "prefix": "10.9.0.0", "prefixlen": 16, "ifname": "eth0"}],
                       ["dest.add", {"svc": SVC, "addr": "192.168.100.2", "port": 80}]]}, errno.EEXIST),
    ("batch", {"ops": [["service.add", {"proto": "tcp", "addr": "10.0.0.70", "port": 80}],
                       ["dest.add", {"svc": {"proto": "tcp", "addr": "10.0.0.70", "port": 80},
                                     "addr": "192.168.100.9", "port": 80}],
                       ["service.add", {"proto": "tcp", "addr": "10.0.0.71", "port": 80, "sched": "nosuch"}]]},
     errno.ENOENT),
]


def _refusal_ok(e: HdslbError) -> bool:
    return isinstance(e.errno, int) and e.errno in errno.errorcode and e.errno != errno.EIO and bool(e.message)


@pytest.fixture(autouse=True)
def quiet():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.fixture
async def daemon(tmp_path):
    d = await make_daemon(tmp_path)
    yield d
    if d.health is not None:
        await d.health.stop()


def test_every_control_op_is_covered():
    assert set(commands.COMMANDS) == set(OPS) | NO_ARGS | set(NOT_HERE)


@pytest.mark.parametrize("op", sorted(OPS))
async def test_malformed_control_args_are_refused_and_change_nothing(tmp_path, op):
    daemon = await make_daemon(tmp_path)
    before = await observable(daemon)
    bad = []
    for i, (name, args) in enumerate(ctl_cases(op, random.Random(f"{SEED}{op}"))):
        try:
            await dispatch_async(daemon, op, args)
        except HdslbError as e:
            if not _refusal_ok(e):
                bad.append(f"{op} {name}: errno {e.errno} {e.message!r}")
        except Exception as e:  # a traceback: the control server would answer EIO "internal error"
            bad.append(f"{op} {name}: {type(e).__name__}: {e}")
        else:
            bad.append(f"{op} {name}: accepted")
        if await observable(daemon) != before:
            bad.append(f"{op} {name}: the state changed")
            (tmp_path / str(i)).mkdir()
            daemon = await make_daemon(tmp_path / str(i))  # the next case starts from the same state
            before = await observable(daemon)
    assert not bad, "\n".join(bad)
    assert (await dispatch_async(daemon, "daemon.status", {}))["services"] == 3  # it still answers


@pytest.mark.parametrize("op,args,err", CONFLICTS, ids=[f"{i}-{c[0]}" for i, c in enumerate(CONFLICTS)])
async def test_conflicting_requests_are_refused_and_change_nothing(daemon, op, args, err):
    before = await observable(daemon)
    with pytest.raises(HdslbError) as e:
        await dispatch_async(daemon, op, copy.deepcopy(args))
    assert e.value.errno == err, e.value.message
    assert _refusal_ok(e.value)
    assert await observable(daemon) == before


# --- REST ---------------------------------------------------------------------------------------------------
VS_PATH = "/v2/vs/10.0.0.100-80-tcp"
JSON_H = {"Content-Type": "application/json"}
# (method, route) -> (path, valid body or None, {field: kind}). Bodies are valid against make_daemon's state.
REST = {
    ("POST", "/v2/vs"): ("/v2/vs", {"Addr": "10.0.0.60", "Port": 80, "Proto": "tcp", "SchedName": "rr"},
                         {"Addr": "ip", "Port": "port", "Proto": "proto", "SchedName": "enum", "Timeout": "uint",
                          "Match": "svc", "Netmask": "netmask"}),
    ("PATCH", "/v2/vs"): ("/v2/vs", {"Items": [{"Addr": "10.0.0.60", "Port": 80, "Proto": "tcp",
                                                "RSs": {"Items": [{"ip": "192.168.100.9"}]}}]},
                          {"Items": "ops", "Items.0.Addr": "ip", "Items.0.Port": "port", "Items.0.Proto": "proto",
                           "Items.0.SchedName": "enum", "Items.0.RSs.Items.0.ip": "ip",
                           "Items.0.RSs.Items.0.weight": "weight", "Items.0.RSs.Items.0.mode": "enum"}),
    ("GET", "/v2/vs"): ("/v2/vs", None, {}),
    ("GET", "/v2/vs/{VipPort}"): (VS_PATH, None, {}),
    ("PUT", "/v2/vs/{VipPort}"): (VS_PATH, {"SchedName": "rr", "RSs": {"Items": [{"ip": "192.168.100.2", "port": 80}]}},
                                  {"SchedName": "enum", "Timeout": "uint", "Netmask": "netmask", "Match": "svc",
                                   "RSs": "svc", "RSs.Items.0.ip": "ip"}),
    ("DELETE", "/v2/vs/{VipPort}"): (VS_PATH, None, {}),
    ("GET", "/v2/vs/{VipPort}/rs"): (VS_PATH + "/rs", None, {}),
    ("PUT", "/v2/vs/{VipPort}/rs"): (VS_PATH + "/rs", {"Items": [{"ip": "192.168.100.9", "port": 80, "weight": 2,
                                                                  "mode": "FNAT"}]},
                                     {"Items": "ops", "Items.0.ip": "ip", "Items.0.port": "port",
                                      "Items.0.weight": "weight", "Items.0.mode": "enum", "Items.0.inhibited": "bool",
                                      "Items.0.overloaded": "bool"}),
    ("POST", "/v2/vs/{VipPort}/rs"): (VS_PATH + "/rs", {"Items": [{"ip": "192.168.100.2", "port": 80}]},
                                      {"Items": "ops", "Items.0.ip": "ip", "Items.0.port": "port",
                                       "Items.0.weight": "weight", "Items.0.mode": "enum"}),
    ("DELETE", "/v2/vs/{VipPort}/rs"): (VS_PATH + "/rs", {"Items": [{"ip": "192.168.100.2", "port": 80}]},
                                        {"Items": "ops", "Items.0.ip": "ip", "Items.0.port": "port",
                                         "Items.0.weight": "weight", "Items.0.mode": "enum"}),
    ("GET", "/v2/vs/{VipPort}/laddr"): (VS_PATH + "/laddr", None, {}),
    ("PUT", "/v2/vs/{VipPort}/laddr"): (VS_PATH + "/laddr", {"addr": "192.168.100.201", "device": "eth1"},
                                        {"addr": "ip", "device": "ifname"}),
    ("DELETE", "/v2/vs/{VipPort}/laddr"): (VS_PATH + "/laddr", {"addr": "192.168.100.200"},
                                           {"addr": "ip", "device": "text"}),
    ("GET", "/v2/device"): ("/v2/device", None, {}),
    ("GET", "/v2/device/{name}/addr"): ("/v2/device/eth0/addr", None, {}),
    ("PUT", "/v2/device/{name}/addr"): ("/v2/device/eth0/addr", {"addr": "10.0.5.1/24", "scope": "global"},
                                        {"addr": "ip", "scope": "enum", "broadcast": "text"}),
    ("DELETE", "/v2/device/{name}/addr"): ("/v2/device/eth0/addr", {"addr": "10.0.0.7/24"},
                                           {"addr": "ip", "scope": "text"}),
    ("GET", "/v2/device/{name}/route"): ("/v2/device/eth0/route", None, {}),
    ("PUT", "/v2/device/{name}/route"): ("/v2/device/eth0/route", {"dst": "10.9.0.0/16", "gateway": "10.0.0.1",
                                                                   "mtu": 1500, "metric": 1},
                                         {"dst": "ip", "gateway": "ip", "prefixSrc": "ip", "device": "ifname",
                                          "scope": "enum", "mtu": "uint", "metric": "uint"}),
    ("DELETE", "/v2/device/{name}/route"): ("/v2/device/eth0/route", {"dst": "10.8.0.0/16"},
                                            {"dst": "ip", "gateway": "ip", "device": "ifname"}),
    ("GET", "/v2/neigh"): ("/v2/neigh", None, {}),
    ("PUT", "/v2/neigh"): ("/v2/neigh", {"addr": "10.0.0.19", "lladdr": "02:00:00:00:00:19", "device": "eth0"},
                           {"addr": "ip", "lladdr": "mac", "device": "ifname"}),
    ("DELETE", "/v2/neigh"): ("/v2/neigh", {"addr": "10.0.0.9"}, {"addr": "ip", "device": "text"}),
    ("GET", "/v2/stats"): ("/v2/stats", None, {}),
    ("GET", "/v2/conns"): ("/v2/conns", None, {}),
    ("GET", "/v2/timeouts"): ("/v2/timeouts", None, {}),
    ("PUT", "/v2/timeouts"): ("/v2/timeouts", {"tcp": 900}, {"tcp": "uint", "tcpfin": "uint", "udp": "uint"}),
    ("GET", "/v2/config"): ("/v2/config", None, {}),
    ("POST", "/v2/config"): ("/v2/config", None, {}),
    ("GET", "/v2/health"): ("/v2/health", None, {}),
    ("GET", "/v2/openapi.json"): ("/v2/openapi.json", None, {}),
    ("GET", "/metrics"): ("/metrics", None, {}),
}
# Values the schema takes for a field beyond its template's (they are no malformed input).
REST_LEGAL = {("POST", "/v2/vs", "Proto", 6), ("PATCH", "/v2/vs", "Items.0.Proto", 6), ("PUT", "/v2/vs/{VipPort}", "Netmask", 0),
              ("POST", "/v2/vs", "Timeout", 0), ("PUT", "/v2/vs/{VipPort}", "Timeout", 0),
              ("PUT", "/v2/timeouts", "tcpfin", 0), ("PUT", "/v2/timeouts", "udp", 0),
              ("PUT", "/v2/vs/{VipPort}/rs", "Items.0.weight", 0), ("POST", "/v2/vs/{VipPort}/rs", "Items.0.weight", 0),
              ("PATCH", "/v2/vs", "Items.0.RSs.Items.0.weight", 0),
              ("PUT", "/v2/vs/{VipPort}/rs", "Items.0.inhibited", False),
              ("PUT", "/v2/vs/{VipPort}/rs", "Items.0.overloaded", False),
              ("DELETE", "/v2/vs/{VipPort}/laddr", "device", ""), ("DELETE", "/v2/neigh", "device", ""),
              ("PUT", "/v2/device/{name}/addr", "broadcast", ""), ("DELETE", "/v2/device/{name}/addr", "scope", ""),
              ("DELETE", "/v2/vs/{VipPort}/rs", "Items.0.weight", 0), ("PUT", "/v2/device/{name}/route", "device", ""),
              ("DELETE", "/v2/device/{name}/route", "device", ""),
              # fields accepted for dpvs-agent clients and ignored: any text
              ("DELETE", "/v2/vs/{VipPort}/laddr", "device", "\udcff"), ("DELETE", "/v2/neigh", "device", "\udcff"),
              ("PUT", "/v2/device/{name}/addr", "broadcast", "\udcff"),
              ("DELETE", "/v2/device/{name}/addr", "scope", "\udcff")}
NESTED = b'{"a":' * 5000 + b"1" + b"}" * 5000
RAW_BODIES = [b"", b"  \n", b"null", b"[]", b"1", b'"x"', b"{", b"\xff\xfe{}", b"[" * 100000, NESTED, b"1e999",
              b'{"Items": NaN}', b'{"x": "' + b"a" * (1 << 20) + b'"}', b'{"\\ud800": 1}', b'{"\\u0000": 1}',
              '{"addr": "１０.0.0.1"}'.encode(), b'{"a": 1, "a": 2}']
BAD_VIPPORTS = ["10.0.0.100-80-tcp-x", "10.0.0.100-99999-tcp", "10.0.0.100--1-tcp", "10.0.0.100-80-sctp",
                "x-80-tcp", "match-x", "10.0.0.100-%D9%A8%D9%A0-tcp", "%FF", "10.0.0.100-80-tcp%0A", "a" * 3000,
                "10.0.0.100-80", "match-", "[10.0.0.100]-80-tcp%00"]
BAD_DEVICES = ["nosuch0", "eth0%0A", "x" * 3000, "%00", "%C3%ABth0", "eth0%2F..", "%FF"]
BAD_QUERIES = ["bogus=1", "limit=0", "limit=10001", "limit=-1", "limit=1e3", "offset=-1", "offset=abc",
               "limit=%C2%B2", "af=7", "af=four", "device=nosuch0", "stats=maybe", "sapool=2", "verbose=%FF",
               "healthcheck=yes"]
CONFIG_BODIES = [b"", b"\xff\xfe", CONF_TEXT.replace("}\n}\n", "}\n").encode(),
                 CONF_TEXT.replace("lb_algo wrr", "lb_algo nosuch").encode(),
                 CONF_TEXT.replace("weight 3", "weight -3").encode(), CONF_TEXT.replace("weight 3", "weight 3x").encode(),
                 (CONF_TEXT + "include /etc/passwd\n").encode(), (CONF_TEXT + "no_such_keyword 1\n").encode(),
                 b"{" * 100000, CONF_TEXT.replace("protocol TCP", "protocol SCTP").encode(),
                 CONF_TEXT.encode() + CONF_TEXT[CONF_TEXT.index("virtual_server"):].encode(),
                 CONF_TEXT.replace("192.168.100.200 eth1", "192.168.100.200 nosuch0").encode(),
                 CONF_TEXT.replace("global_defs {", "global_defs {\n    log_file /tmp/x.log").encode()]


def _rest_value(v):
    """A BAD value as JSON can carry it: bytes become a lone surrogate (what \\udcff in JSON text decodes to)."""
    return "\udcff" if isinstance(v, (bytes, bytearray)) else v


def _set_path(body, dotted: str, v):
    *head, last = dotted.split(".")
    cur = body
    for p in head:
        cur = cur[int(p)] if isinstance(cur, list) else cur.setdefault(p, {} if not p.isdigit() else [])
    cur[int(last) if isinstance(cur, list) else last] = v


def rest_cases(method: str, route: str, rng: random.Random) -> list:
    """(name, method, path, data, headers) that must each be answered 4xx, changing nothing."""
    path, body, kinds = REST[(method, route)]
    out = [("bogus query", method, path + ("&" if "?" in path else "?") + "bogus=1", None, {})]
    for q in BAD_QUERIES:
        if route in ("/v2/conns", "/v2/neigh", "/v2/device/{name}/addr", "/v2/vs") or rng.random() < 0.3:
            out.append((f"?{q}", method, f"{path}?{q}", json.dumps(body).encode() if body is not None else None,
                        JSON_H if body is not None else {}))
    if "{VipPort}" in route:
        for vp in BAD_VIPPORTS:
            p = path.replace("10.0.0.100-80-tcp", vp)
            out.append((f"VipPort {vp[:20]}", method, p, json.dumps(body).encode() if body is not None else None,
                        JSON_H if body is not None else {}))
    if "{name}" in route:
        for dev in BAD_DEVICES:
            out.append((f"device {dev[:20]}", method, path.replace("eth0", dev),
                        json.dumps(body).encode() if body is not None else None, JSON_H if body is not None else {}))
    if route == "/v2/config" and method == "POST":
        for i, raw in enumerate(CONFIG_BODIES):
            out.append((f"config {i}", method, path, raw, {"Content-Type": "text/x-hdslb-conf"}))
        out.append(("config as JSON", method, path, CONF_TEXT.encode(), JSON_H))
    if body is None:
        return out
    out.append(("no Content-Type", method, path, json.dumps(body).encode(), {}))
    out.append(("text/plain", method, path, json.dumps(body).encode(), {"Content-Type": "text/plain"}))
    for raw in RAW_BODIES:
        if not raw.strip() and (method, route) == ("PUT", "/v2/vs/{VipPort}"):
            continue  # no body: create or keep the service as it is (dpvs-agent's PUT)
        out.append((f"raw {raw[:16]!r}", method, path, raw, JSON_H))
    out.append(("extra key", method, path, json.dumps(dict(body, bogus=1)).encode(), JSON_H))
    for f, kind in kinds.items():
        for v in BAD[kind]:
            v = _rest_value(v)
            if any(m == method and r == route and ff == f and type(x) is type(v) and x == v
                   for m, r, ff, x in REST_LEGAL):
                continue
            b = copy.deepcopy(body)
            _set_path(b, f, v)
            out.append((f"{f}={_short(v)}", method, path, json.dumps(b).encode(), JSON_H))
    return out


@pytest.mark.parametrize("method,route", [(m, p) for m, p, _ in ROUTES], ids=[f"{m} {p}" for m, p, _ in ROUTES])
async def test_malformed_rest_requests_are_4xx_and_change_nothing(tmp_path, method, route):
    assert (method, route) in REST, "a new route: give it a template in REST"
    d = await make_daemon(tmp_path)
    before = await observable(d)
    bad = []
    cases = rest_cases(method, route, random.Random(f"{SEED}{method}{route}"))
    async with TestClient(TestServer(make_app(d))) as c:
        for name, m, path, data, headers in cases:
            r = await c.request(m, path, data=data, headers=headers)
            text = await r.text()
            try:
                b = json.loads(text)
            except ValueError:
                b = None
            if not 400 <= r.status < 500:
                bad.append(f"{m} {path[:60]} {name}: {r.status} {text[:200]}")
            elif not (isinstance(b, dict) and isinstance(b.get("error"), str) and b["error"]
                      and isinstance(b.get("errno"), int) and "field" in b):
                bad.append(f"{m} {path[:60]} {name}: {r.status} without error/errno/field: {text[:200]}")
            if await observable(d) != before:
                bad.append(f"{m} {path[:60]} {name}: the state changed")
                break
        assert not bad, "\n".join(bad)
        r = await c.get("/v2/vs")  # still answers
        assert r.status == 200 and len((await r.json())["Items"]) == 3


# --- the config file: mutated samples, each refused naming file:line, a reload with it changing nothing ---------
import pathlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ["conf/hdslb.conf", "conf/keepalived-lb.conf", "conf/single-nic.conf", "conf/two-arm.conf",
           "tests/unit/configs/include/main.conf", "tests/unit/configs/include/services/10-web.conf"]
JUNK_VALUES = ["-1", "99999999999999999999", "nan", "inf", "1.5e3", "٣", "0x10", "x" * 5000, "\"", "{", "}",
               "10.0.0.1/33", "256.1.1.1", "", "1_0", "３.5"]
NOT_A_NUMBER = {"nan", "inf", "٣", "x" * 5000, "1_0", "３.5"}  # where a number was, each of these is refused
VRRP_BLOCKS = {"vrrp_instance", "vrrp_sync_group", "vrrp_script", "virtual_ipaddress", "virtual_ipaddress_excluded",
               "virtual_routes", "authentication", "track_interface", "track_script", "notification_email", "group"}
_KEYWORD_LINE = re.compile(r"^(\s*)(<init>\s+)?([A-Za-z_][A-Za-z0-9_]*)(\s+)(.*?)\s*$")


def config_mutations(text: str, rng: random.Random, own: str) -> list:
    """(name, mutated text, line it must name or None for any line, must it be refused). Lines count from 1."""
    lines = text.split("\n")
    out = []
    braces = [i for i, line in enumerate(lines) if ("{" in line or "}" in line) and not line.lstrip().startswith(("!", "#"))]
    for i in rng.sample(braces, min(4, len(braces))):
        ch = "{" if "{" in lines[i] else "}"
        out.append((f"line {i + 1} without its {ch}", "\n".join(lines[:i] + [lines[i].replace(ch, "", 1)]
                                                                  + lines[i + 1:]), None, True))
    vrrp, depth, top = set(), 0, None
    for i, line in enumerate(lines):
        if depth == 0 and line.strip():
            top = line.split()[0]
        if top in VRRP_BLOCKS:
            vrrp.add(i)
        depth += line.count("{") - line.count("}")
    valued = [i for i, line in enumerate(lines) if _KEYWORD_LINE.match(line) and "{" not in line and "}" not in line
              and not line.lstrip().startswith(("!", "#", "include")) and i not in vrrp]
    for i in valued:  # every keyword's value position, with a sample of junk
        m = _KEYWORD_LINE.match(lines[i])
        number = re.fullmatch(r"[0-9]+(\.[0-9]+)?", m.group(5)) is not None and m.group(3) != "payload"
        for junk in rng.sample(JUNK_VALUES, 3) + (["٣", "1_0", "３.5"] if number else []):
            bad = f"{m.group(1)}{m.group(2) or ''}{m.group(3)} {junk}"
            out.append((f"line {i + 1}: {m.group(3)} {junk[:12]}", "\n".join(lines[:i] + [bad] + lines[i + 1:]),
                        None if junk in ("{", "}") else i + 1,  # a brace is found unmatched elsewhere
                        number and junk in NOT_A_NUMBER))
    # (VRRP's blocks and the lists in them are keepalived's vrrp process's: accepted whole, reported as not ours)
    opens = [i for i, line in enumerate(lines) if line.rstrip().endswith("{") and not line.lstrip().startswith("!")
             and line.split()[0] not in VRRP_BLOCKS]
    for i in rng.sample(opens, min(4, len(opens))):
        out.append((f"unknown keyword after line {i + 1}",
                    "\n".join(lines[:i + 1] + ["    no_such_keyword 1"] + lines[i + 1:]), i + 2, True))
    vs = [i for i, line in enumerate(lines) if re.match(r"virtual_server\s", line)]
    if vs:  # the first virtual_server block twice
        i, depth, j = vs[0], 0, vs[0]
        for j in range(vs[0], len(lines)):
            depth += lines[j].count("{") - lines[j].count("}")
            if depth == 0:
                break
        block = lines[i:j + 1]
        out.append(("a virtual_server twice", "\n".join(lines + block), len(lines) + 1, True))
    out.append(("include of a missing file", text + "\ninclude /nonexistent/rv.conf\n", len(lines) + 1, True))
    out.append(("include of itself", text + f"\ninclude {own}\n", len(lines) + 1, True))
    out.append(("a stray }", text + "\n}\n", len(lines) + 1, True))
    out.append(("an unterminated string", text + '\nglobal_defs {\n    router_id "abc\n}\n', len(lines) + 2, True))
    return out


class ConfigFuzzDaemon(FuzzDaemon):
    async def _start_health(self):  # no checkers: nothing changes on its own while the cases run
        pass


@pytest.mark.parametrize("conf", CONFIGS)
async def test_a_mutated_config_is_refused_naming_file_and_line_and_a_reload_changes_nothing(tmp_path, conf):
    src = REPO / conf
    root = src.parent if "include" not in conf else REPO / "tests/unit/configs/include"
    work = tmp_path / "etc"
    shutil.copytree(root, work)
    path = work / src.relative_to(root)
    main = work / "main.conf" if "include" in conf else path
    text = path.read_text()
    d = ConfigFuzzDaemon(main, tmp_path)
    await d.reload_config()
    before = await observable(d)
    bad, refused, accepted = [], 0, 0
    for name, mutated, line, must_refuse in config_mutations(text, random.Random(f"{SEED}{conf}"), path.name):
        path.write_text(mutated)
        try:
            await d.reload_config()
        except HdslbError as e:
            refused += 1
            at = re.search(r"(\S+?):(\d+):(\d+): ", e.message)
            if at is None or not at.group(1).endswith(path.name) and "include" not in name:
                bad.append(f"{name}: the refusal names no {path.name}:LINE: {e.message[:200]}")
            elif line is not None and at.group(1).endswith(path.name) and int(at.group(2)) != line:
                bad.append(f"{name}: names line {at.group(2)}, not {line}: {e.message[:200]}")
            if "nothing was applied" not in e.message:
                bad.append(f"{name}: does not say nothing was applied: {e.message[:200]}")
        except Exception as e:
            bad.append(f"{name}: {type(e).__name__}: {e}")
        else:
            accepted += 1
            if must_refuse:
                bad.append(f"{name}: accepted")
            path.write_text(text)
            await d.reload_config()
            before = await observable(d)  # (the fast path was written to and back)
            continue
        path.write_text(text)  # config.get reads the file
        if await observable(d) != before:
            bad.append(f"{name}: the state changed")
            path.write_text(text)
            await d.reload_config()
            before = await observable(d)
    assert not bad, "\n".join(bad)
    assert refused >= 8


# --- the CLIs: random command lines, each a usage error (exit 2, a message) or a daemon refusal (exit 1) -------
import io  # noqa: E402

from cli import dpip as dpip_cli  # noqa: E402
from cli import hdslb_ctl as ctl_cli  # noqa: E402
from cli import ipvsadm as ipvsadm_cli  # noqa: E402

REFUSAL = "refused by the test daemon"
CLI_VALUES = ["10.0.0.1:80", "10.0.0.1:99999", "10.0.0.1", "[2001:db8::1]:80", "x", "", "-1", "٣", "10.0.0.1:٨٠",
              "a" * 3000, "nan", "1.5", "65536", "0", "rr", "sh-port", "proto=tcp", "eth0", "255.255.255.0", "1e9",
              "10.0.0.0/33", "02:00:00:00:00:01", "\x00", "--", "-"]
VALID_LINES = {
    "ipvsadm": ["-A -t 10.0.0.1:80 -s rr", "-A -u 10.0.0.1:53 -s sh -b sh-port -p 60 -M 255.255.255.0",
                "-E -t 10.0.0.1:80 -s wrr", "-D -t 10.0.0.1:80", "-a -t 10.0.0.1:80 -r 192.168.1.2:8080 -m -w 3 -x 100 -y 50",
                "-e -t 10.0.0.1:80 -r 192.168.1.2 -g -w 0", "-d -t 10.0.0.1:80 -r 192.168.1.2:80",
                "-P -t 10.0.0.1:80 -z 192.168.1.200 -F eth1", "-Q -t 10.0.0.1:80 -z 192.168.1.200",
                "-G -t 10.0.0.1:80", "-L -n -t 10.0.0.1:80 --stats", "-Z -t 10.0.0.1:80", "--set 900 10 300",
                "-A -H proto=tcp,src-range=10.1.0.0-10.1.0.9 -s rr", "-C", "-L -n -c"],
    "dpip": ["addr add 10.0.0.1/24 dev eth0 sapool", "addr del 10.0.0.1/24 dev eth0",
             "route add 10.8.0.0/16 via 10.0.0.254 dev eth0 mtu 1400 metric 5", "route del 10.8.0.0/16 dev eth0",
             "-6 route add 2001:db8::/64 dev eth1", "neigh add 10.0.0.9 lladdr 02:00:00:00:00:09 dev eth0",
             "neigh del 10.0.0.9 dev eth0", "addr show dev eth0", "route show", "link show eth0", "-s link show"],
    "hdslb-ctl": ["health add -t 10.0.0.1:80 -r 192.168.1.2:80 --kind TCP_CHECK --delay-loop 3",
                  "health add -u 10.0.0.1:53 -r 192.168.1.2 --kind HTTP_GET path=/ status_code=200",
                  "health del -t 10.0.0.1:80 -r 192.168.1.2:80", "health show", "reload", "reload --datapath"],
}
EXTRA_TOKENS = {"ipvsadm": ["-A", "-a", "-t", "-u", "-r", "-s", "-p", "-w", "-g", "-m", "-i", "-J", "-b", "-n", "-c",
                            "--bogus", "-o", "-j", "-f"],
                "dpip": ["addr", "route", "neigh", "link", "add", "del", "show", "dev", "via", "lladdr", "scope",
                         "sapool", "mtu", "metric", "-6", "-4", "bogus"],
                "hdslb-ctl": ["-t", "-u", "-r", "--kind", "--delay-loop", "--inhibit", "--bogus", "add", "bogus=1"]}


def cli_cases(tool: str, rng: random.Random, n: int) -> list:
    """n command lines one mutation away from a valid one: a value replaced by junk, a word dropped, a word
    added, two words swapped."""
    out = []
    for _ in range(n):
        argv = rng.choice(VALID_LINES[tool]).split()
        how = rng.randrange(4)
        i = rng.randrange(len(argv))
        if how == 0:
            argv[i] = rng.choice(CLI_VALUES)
        elif how == 1 and len(argv) > 1:
            del argv[i]
        elif how == 2:
            argv.insert(i, rng.choice(EXTRA_TOKENS[tool] + CLI_VALUES))
        elif len(argv) > 1:
            j = rng.randrange(len(argv))
            argv[i], argv[j] = argv[j], argv[i]
        out.append(argv)
    return out


class RefusingClient:
    """Any request gets the daemon's refusal: what the CLI prints for it, and its exit code, are checked."""

    calls: list = []

    def __init__(self, *a, **kw):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass

    def call(self, op, args=None, **kw):
        RefusingClient.calls.append(op)
        raise HdslbError(errno.EINVAL, REFUSAL)


def _argv(rng, tokens, n_max=5, start=()):
    out = list(start)
    for _ in range(rng.randint(0 if start else 1, n_max)):
        out.append(rng.choice(tokens))
        if rng.random() < 0.6:
            out.append(rng.choice(CLI_VALUES))
    return out


def _run_cli(main, argv, capsys, monkeypatch, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    RefusingClient.calls = []
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors (hdslb-ctl)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("tool", ["ipvsadm", "dpip", "hdslb-ctl"])
def test_random_command_lines_exit_2_with_a_message_or_1_with_the_daemons(tool, capsys, monkeypatch, tmp_path):
    for mod in (ipvsadm_cli, dpip_cli, ctl_cli):
        monkeypatch.setattr(mod, "Client", RefusingClient)
    rng = random.Random(f"{SEED}{tool}")
    bad, seen = [], {}
    main = {"ipvsadm": ipvsadm_cli.main, "dpip": dpip_cli.main, "hdslb-ctl": ctl_cli.main}[tool]
    for argv in cli_cases(tool, rng, 400):
        try:
            rc, out, err = _run_cli(main, argv, capsys, monkeypatch, stdin="-A -t 10.0.0.1:80 -s nosuch\n")
        except Exception as e:
            bad.append(f"{tool} {argv!r}: {type(e).__name__}: {e}")
            continue
        seen[rc if rc in (0, 2) else ("refused" if RefusingClient.calls else rc)] = \
            seen.get(rc if rc in (0, 2) else ("refused" if RefusingClient.calls else rc), 0) + 1
        if "Traceback" in err:
            bad.append(f"{tool} {argv!r}: a traceback")
        elif rc not in (0, 1, 2):
            bad.append(f"{tool} {argv!r}: exit {rc!r}: {err[:200]}")
        elif rc == 0 and RefusingClient.calls:
            bad.append(f"{tool} {argv!r}: exit 0 though the daemon refused {RefusingClient.calls}")
        elif rc in (1, 2) and not err.strip():
            bad.append(f"{tool} {argv!r}: exit {rc} without a message")
        elif rc == 1 and not RefusingClient.calls:
            bad.append(f"{tool} {argv!r}: exit 1 (a failure, not a usage error) without asking the daemon: {err[:200]}")
        elif rc == 1 and RefusingClient.calls and REFUSAL not in err:
            bad.append(f"{tool} {argv!r}: the daemon's refusal is not in the message: {err[:200]}")
    assert not bad, "\n".join(bad[:40])
    assert seen.get(2, 0) > 100 and seen.get("refused", 0) > 30, seen  # both kinds of failure were exercised


async def test_malformed_args_over_the_control_socket_get_errno_replies_and_the_daemon_answers_on(tmp_path):
    """The same cases through the real control server and client: each an error reply with its errno and message
    (never the server's EIO "internal error" for an exception a command let out), one connection for all of them,
    and the state unchanged at the end."""
    import asyncio

    from hdslb.ctl.client import Client
    from hdslb.ctl.server import CtlServer

    d = await make_daemon(tmp_path)
    before = await observable(d)
    srv = CtlServer(str(tmp_path / "ctl.sock"), d.dispatch)
    await srv.start()
    rng = random.Random(SEED)
    cases = [(op, name, args) for op in sorted(OPS) if op != "config.reload"
             for name, args in rng.sample(ctl_cases(op, rng), min(25, len(ctl_cases(op, rng))))]

    def ask() -> list:
        bad = []
        with Client(srv.path, timeout=10) as c:
            for op, name, args in cases:
                try:
                    c.call(op, args)
                except HdslbError as e:
                    if not _refusal_ok(e):
                        bad.append(f"{op} {name}: errno {e.errno} {e.message!r}")
                except (OverflowError, TypeError, ValueError):
                    pass  # msgpack cannot carry it (an integer past 64 bits): no client can send it
                else:
                    bad.append(f"{op} {name}: accepted")
            assert c.call("daemon.status", {})["services"] == 3
        return bad

    try:
        bad = await asyncio.get_running_loop().run_in_executor(None, ask)
    finally:
        await srv.stop()
    assert not bad, "\n".join(bad)
    assert len(cases) > 500
    assert await observable(d) == before


# --- hdslbd's own command line --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["--aging-interval", "nan"], ["--aging-interval", "inf"], ["--aging-interval", "1e400"],  # no sweep, ever
    ["--instance", ".."], ["--instance", "../x"], ["--instance", "a/b"], ["--instance", "."], ["--instance", ""],
    ["--instance", "a\nb"], ["--instance", "x" * 65], ["--lport-range", "١-٢"], ["--api-listen", "127.0.0.1:99999"],
    ["--api-listen", "127.0.0.1:٨٠"], ["--max-conns", str(2**32)], ["--max-conns6", "99999999999999999999"],
])
def test_hdslbd_refuses_a_bad_command_line_with_exit_2(argv, capsys):
    from hdslb.daemon import settings_from_args

    with pytest.raises(SystemExit) as e:
        settings_from_args(["eth0", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "hdslbd: error: " in err and (argv[0] in err or repr(argv[1]) in err), err


def test_a_derived_instance_name_stays_inside_the_pin_root():
    from hdslb.daemon import instance_error, instance_name

    for ctl in ("/run/..sock", "/run/.sock", "/run/.hidden.ctrl", "/run/hdslb/lb1.ctrl", "/"):
        name = instance_name(ctl)
        assert instance_error(name) is None, (ctl, name)


@pytest.mark.parametrize("instance", ["..", "../..", "a/../..", "."])
def test_down_without_a_daemon_refuses_an_instance_outside_the_pin_root(instance, monkeypatch, capsys, tmp_path):
    """With no daemon to ask, down removes PIN_ROOT/INSTANCE whole: --instance .. was the pin root's parent."""
    from hdslb import daemon as daemon_mod
    from hdslb.ctl.client import DaemonUnreachable

    class Gone(RefusingClient):
        def call(self, op, args=None, **kw):
            raise DaemonUnreachable("no hdslbd")

    removed = []
    monkeypatch.setattr(ctl_cli, "Client", Gone)
    monkeypatch.setattr(daemon_mod, "down_offline", lambda s: removed.append(s.pin_dir) or ["removed"])
    rc = ctl_cli.main(["down", "--instance", instance, "--pin-root", str(tmp_path / "bpffs"),
                       "--ctl-socket", str(tmp_path / "x.ctrl")])
    assert rc == 2 and removed == []
    assert "invalid instance name" in capsys.readouterr().err
    assert ctl_cli.main(["down", "--instance", "lb1", "--pin-root", str(tmp_path / "bpffs"),
                         "--ctl-socket", str(tmp_path / "x.ctrl")]) == 0
    assert removed == [str(tmp_path / "bpffs" / "lb1")]


class RunningDaemon(RefusingClient):
    """A live hdslbd of instance lb0 (pins in /run/hdslb/bpffs/lb0): records what down asks of it."""

    asked: list = []

    def call(self, op, args=None, **kw):
        RunningDaemon.asked.append(op)
        if op == "daemon.status":
            return {"pid": 4242, "interfaces": {"eth0": "native"}, "pin_dir": "/run/hdslb/bpffs/lb0",
                    "instance": "lb0", "state_file": "/run/hdslb/state/lb0.state"}
        return None


@pytest.mark.parametrize("given, why", [
    (["--instance", "lb1"], "--instance lb1, but it serves instance lb0"),
    (["--pin-root", "/srv/bpffs"], "--pin-root /srv/bpffs, but its pins are in /run/hdslb/bpffs/lb0"),
    (["--state-dir", "/var/lib/hdslb"], "--state-dir /var/lib/hdslb, but its saved model is /run/hdslb/state/lb0"),
    (["--instance", "../x"], "invalid instance name"),
])
def test_down_stops_a_running_daemon_only_when_it_is_the_instance_named(given, why, monkeypatch, capsys):
    """down --instance b without b's control socket reached the default socket's hdslbd and stopped it (pins and
    saved model removed): the options that name an instance must agree with the daemon that answers."""
    RunningDaemon.asked = []
    monkeypatch.setattr(ctl_cli, "Client", RunningDaemon)
    monkeypatch.setattr(ctl_cli.os, "kill", lambda pid, sig: (_ for _ in ()).throw(ProcessLookupError()))
    assert ctl_cli.main(["down", *given, "--ctl-socket", "/run/hdslb/lb0.ctrl"]) == 2
    err = capsys.readouterr().err
    assert why in err and "daemon.shutdown" not in RunningDaemon.asked, err
    if "invalid" not in why:
        assert "nothing was stopped" in err
    for agree in ([], ["--instance", "lb0"], ["--pin-root", "/run/hdslb/bpffs/", "--state-dir", "/run/hdslb/state"]):
        RunningDaemon.asked = []
        assert ctl_cli.main(["down", *agree, "--ctl-socket", "/run/hdslb/lb0.ctrl"]) == 0
        assert RunningDaemon.asked == ["daemon.status", "daemon.shutdown"]


# Valid REST requests that conflict with the state: the status, and nothing changed.
REST_CONFLICTS = [
    ("POST", "/v2/vs", {"Addr": "10.0.0.100", "Port": 80, "Proto": "tcp"}, 409),
    ("DELETE", "/v2/vs/10.0.0.61-80-tcp", None, 404),
    ("GET", "/v2/vs/10.0.0.61-80-tcp", None, 404),
    ("PUT", "/v2/vs/10.0.0.61-80-tcp/rs", {"Items": [{"ip": "192.168.100.9"}]}, 404),
    ("DELETE", VS_PATH + "/rs", {"Items": [{"ip": "192.168.100.99", "port": 80}]}, 404),
    ("DELETE", VS_PATH + "/rs", {"Items": [{"ip": "192.168.100.2", "port": 80}, {"ip": "192.168.100.98"}]}, 404),
    ("PUT", VS_PATH + "/rs", {"Items": [{"ip": "192.168.100.3", "port": 8080, "mode": "DR"}]}, 400),
    ("PUT", VS_PATH + "/rs", {"Items": [{"ip": "192.168.100.9"}, {"ip": "192.168.100.9", "port": 80}]}, 400),
    ("POST", VS_PATH + "/rs", {"Items": [{"ip": "192.168.100.9", "mode": "SNAT"}]}, 400),
    ("PUT", VS_PATH + "/rs", {"Items": [{"ip": "2001:db8::9"}]}, 501),  # NAT46: not implemented, refused
    ("PATCH", "/v2/vs", {"Items": [{"Addr": "10.0.0.60", "Port": 80, "Proto": "tcp"},
                                   {"Addr": "10.0.0.60", "Port": 80, "Proto": "TCP"}]}, 400),
    ("PATCH", "/v2/vs", {"Items": [{"Addr": "10.0.0.60", "Port": 80, "Proto": "tcp"},
                                   {"Addr": "10.0.0.100", "Port": 80, "Proto": "tcp", "SchedName": "mh",
                                    "RSs": {"Items": [{"ip": "192.168.100.2", "mode": "SNAT"}]}}]}, 400),
    ("PUT", VS_PATH + "/laddr", {"addr": "192.168.100.200", "device": "eth0"}, 409),
    ("DELETE", VS_PATH + "/laddr", {"addr": "192.168.100.250"}, 404),
    ("PUT", "/v2/device/eth0/addr", {"addr": "10.0.0.7/16"}, 409),
    ("DELETE", "/v2/device/eth0/addr", {"addr": "10.0.0.77/24"}, 404),
    ("DELETE", "/v2/device/eth0/addr", {"addr": "10.0.0.8/24"}, 409),  # a SNAT service's source address
    ("PUT", "/v2/device/eth0/route", {"dst": "10.9.0.0/16", "gateway": "2001:db8::1"}, 400),
    ("PUT", "/v2/device/eth0/route", {"dst": "10.9.0.0/16", "device": "eth1"}, 400),
    ("DELETE", "/v2/device/eth0/route", {"dst": "10.99.0.0/16"}, 404),
    ("DELETE", "/v2/neigh", {"addr": "10.0.0.99"}, 404),
    ("PUT", "/v2/neigh", {"addr": "10.0.0.19", "lladdr": "02:00:00:00:00:19", "device": "nosuch0"}, 400),
    ("GET", "/v2/conns?offset=0&limit=10001", None, 400),
    ("POST", "/v2/config", CONF_TEXT + "virtual_server 10.0.0.102 80 {\n lb_kind DR\n real_server 192.168.100.5 8080"
                                       " {\n }\n}\n", 400),
]


@pytest.mark.parametrize("method,path,body,status", REST_CONFLICTS,
                         ids=[f"{i}-{c[0]} {c[1][:30]}" for i, c in enumerate(REST_CONFLICTS)])
async def test_conflicting_rest_requests_are_refused_and_change_nothing(tmp_path, method, path, body, status):
    d = await make_daemon(tmp_path)
    before = await observable(d)
    async with TestClient(TestServer(make_app(d))) as c:
        if isinstance(body, str):
            r = await c.request(method, path, data=body, headers={"Content-Type": "text/x-hdslb-conf"})
        else:
            r = await c.request(method, path, json=body)
        b = await r.json()
        assert r.status == status, b
        assert b["error"] and isinstance(b["errno"], int) and "field" in b
    assert await observable(d) == before
