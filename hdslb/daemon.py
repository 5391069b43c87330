"""hdslbd: the one asyncio process. Composes fast path, balancer model, control socket and background tasks;
starts them in order and stops them in reverse.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import logging
import os
import re
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from hdslb import __version__
from hdslb.balancer import Balancer, Iface, pack_snapshot, restore
from hdslb.net.mcast import Memberships, wanted_groups
from hdslb.config.model import LVS_TIMEOUTS
from hdslb.ctl import commands, protocol
from hdslb.ctl.server import CtlServer
from hdslb.errors import HdslbError
from hdslb.heap import HeapSettler, collections_paused, model_size
from hdslb.fastpath.loader import CONN_TABLE_CHOICES, PERCPU_MAX_CPUS, XdpAttachError
from hdslb.fastpath.maps import STAT_FIELDS
from hdslb.net.link import link_mtu

log = logging.getLogger("hdslb")

DEFAULT_PIN_ROOT = "/run/hdslb/bpffs"
DEFAULT_LPORT_RANGE = (1025, 65535)
XDP_MODES = ("auto", "native", "generic")
DEFAULT_MAX_CONNS = 262144
DEFAULT_MAX_SERVICES = 4096
DEFAULT_MAX_DESTS = 65536
MAX_SERVICES_LIMIT = 65536  # conn_val.svc_id is a u16 (hdslb_abi.h)
MAX_DESTS_LIMIT = 1 << 22   # dest slots are u32 (0xffffffff: empty); bounded for memory (dest_map, per-CPU stats)
DEFAULT_STATE_DIR = "/run/hdslb/state"
# One hdslbd per set of pinned maps and per state file: flock()ed files here (tmpfs, root's; released when the
# process dies, kill -9 included).
LOCK_DIR = "/run/hdslb/lock"
LOG_LEVELS = ("debug", "info", "warning", "error")
# DPVS/HDSLB global_defs log_level names -> Python logging levels
DPVS_LOG_LEVELS = {"EMERG": "error", "ALERT": "error", "CRIT": "error", "ERR": "error", "WARNING": "warning",
                   "NOTICE": "info", "INFO": "info", "DEBUG": "debug"}
# Idle timeouts (seconds) per connection state, DPVS's defaults (the seed's ipvs_defs); ipvs_defs overrides.
DEFAULT_TIMEOUTS = {"syn_recv": 30, "established": 90, "fin_wait": 7, "close": 3, "udp": 300}
NEIGH_REFRESH_S = 30.0
IFACE_WATCH_S = 1.0  # how often the interfaces served are looked for (deleted, or re-created with a new ifindex)
# Connection counts (ActiveConn/InActConn, lc/wlc rings, -x/-y thresholds) come from a scan of the conn table,
# reused for CONN_SCAN_CACHE_S; the estimator re-evaluates thresholds and lc/wlc every ESTIMATOR_INTERVAL_S.
ESTIMATOR_INTERVAL_S = 2.0
CONN_SCAN_CACHE_S = 1.0
# A change is saved at once, unless the last save was less than SAVE_SPACING x its cost ago (at least
# SAVE_COALESCE_S): then it is saved with the changes that follow, when that time is up. Saving takes at most ~1/21 of
# a burst; at 10k services x 10 real servers one save costs ~75 ms, so a daemon killed mid-burst loses ~1.5 s of it.
SAVE_COALESCE_S = 0.05
SAVE_SPACING = 20
SAVE_RETRY_S = 5.0  # a save that failed (a full or read-only file system) is tried again this often
# The heap is frozen again only once changes have stopped for this long: settling inside a burst (a full collection
# each time the model grew by a quarter) cost 10k REST PUTs of a service each 1.7 s (bench 3d: 9.6 -> 11.3 s).
HEAP_QUIET_S = 2.0
# Inside a burst the model's growth is looked at this often (model_size: 1 ms at 10k services), to freeze it as it
# grows (hdslb.heap: CPython's own full collections would walk all of the burst's objects again and again).
HEAP_GROWTH_CHECK_S = 0.5
BIG_BATCH_OPS = 1000  # a batch this long runs with the cyclic collector paused and its model frozen after it
# Health verdicts (see _on_health): after an application that took VERDICT_SLOW_S or more (mh/conhash tables), the
# next waits until VERDICT_SPACING x its cost has passed (at most VERDICT_WAIT_MAX_S): during a burst the rebuilds
# take at most a third of the loop and each touched table is built once per application, not once per verdict.
VERDICT_SLOW_S = 0.005
VERDICT_SPACING = 2.0
VERDICT_WAIT_MAX_S = 0.5
RESOLVE_COALESCE_S = 0.2
POSTED_CONFIG_NAME = "<posted config>"  # how errors name text sent by POST /v2/config or config.reload
SWEEP_CPU_SHARE = 0.1  # the aging sweep may use at most this share of one CPU
EVICTION_LOG_S = 60.0  # the full conn table's evictions are logged at most this often ...
EVICTION_LOG_MIN = 16  # ... and only when at least this many more were proved since (see Daemon.evicted)
BATCH_STATS_ABOVE = 2048  # services + real servers beyond which the estimator reads the stats arrays whole  # re-probe learned next hops this often (the slow-path issue brings real aging)


@dataclass
class Settings:
    """Everything the daemon needs to start, resolved from argv and the environment."""

    interfaces: list[str]
    ctl_socket: str
    instance: str
    pin_root: str = DEFAULT_PIN_ROOT
    xdp_mode: str = "auto"
    max_conns: int = 262144
    max_conns6: int = 0  # 0: max_conns / 4 (Sizes.conn6_entries)
    conn_table: str = "percpu"  # the conn map's values: one per CPU, or one shared ("shared"); resolved from auto
    conn_table_auto_cpus: int | None = None  # the possible CPUs --conn-table auto picked conn_table by; None: asked
    lport_min: int = DEFAULT_LPORT_RANGE[0]
    lport_max: int = DEFAULT_LPORT_RANGE[1]
    log_level: str = "info"
    config_file: str | None = None
    config_id: str | None = None  # keepalived -i: which `@ID` lines of the config apply; None: the node name
    fresh: bool = False
    state_dir: str = DEFAULT_STATE_DIR
    timeouts: dict = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))
    aging_interval: float = 2.0
    api_listen: str | None = "127.0.0.1:53225"  # dpvs-agent's port; None: no REST server
    api_token: str | None = None
    log_file: str | None = None
    neigh_timeout: float = 60.0
    unres_queue_length: int = 128
    default_ttl: int = 64
    slowpath: bool = True
    max_hash_cells: int = 1 << 21
    max_persist: int = 65536
    max_services: int = DEFAULT_MAX_SERVICES
    max_dests: int = DEFAULT_MAX_DESTS
    extra: dict = field(default_factory=dict)

    @property
    def pin_dir(self) -> str:
        return os.path.join(self.pin_root, self.instance)

    @property
    def state_file(self) -> str:
        return os.path.join(self.state_dir, self.instance + ".state")


def instance_name(ctl_socket: str) -> str:
    """Per-instance name derived from the control socket, so HDSLB_CTRL alone separates instances."""
    base = os.path.basename(ctl_socket.rstrip("/")) or "hdslb"
    base = re.sub(r"\.(sock|ctrl|ctl)$", "", base)
    # (no leading dot: "..sock" would name the instance "." and its pin directory the pin root itself)
    return re.sub(r"^\.", "_", re.sub(r"[^A-Za-z0-9_.-]", "_", base)) or "hdslb"


INSTANCE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def instance_error(name: str) -> str | None:
    """Why `name` cannot be an --instance, or None. It names the instance's pin directory, state file and locks
    (PIN_ROOT/NAME, STATE_DIR/NAME.state): "..", "a/b" or "../x" would reach outside them, and a down of such an
    instance removes what is there."""
    if INSTANCE_RE.fullmatch(name):
        return None
    return (f"invalid instance name {name!r}: 1..64 of A-Z a-z 0-9 _ . -, not starting with '.' or '-' (it names "
            f"the instance's pin directory and state file)")


# The model's limits, as hdslbd and `hdslb-ctl check` (which judges a file at them) take them: option -> (least,
# most, why the most)
MODEL_LIMITS = {"--max-services": (1, MAX_SERVICES_LIMIT, " (service ids are 16 bits in the fast path's connection "
                                                          "entries)"),
                "--max-dests": (1, MAX_DESTS_LIMIT, ""),
                "--max-hash-cells": (256, 1 << 26, "")}


def limit_error(opt: str, value: int) -> str | None:
    """Why `value` cannot be the model limit `opt` (MODEL_LIMITS), or None."""
    lo, hi, why = MODEL_LIMITS[opt]
    return None if lo <= value <= hi else f"must be within {lo}..{hi}{why}"


def parse_lport_range(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"([0-9]+)-([0-9]+)", s or "")  # (\d would take "١-٢")
    if not m:
        raise ValueError(f"invalid local port range {s!r} (expected MIN-MAX)")
    lo, hi = int(m.group(1)), int(m.group(2))
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"invalid local port range {s!r} (1 <= MIN <= MAX <= 65535)")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hdslbd", description="hdslb daemon (runs in the foreground)")
    p.add_argument("--ctl-socket", help=f"control socket (default ${protocol.ENV_CTL_SOCKET} or {protocol.DEFAULT_CTL_SOCKET})")
    p.add_argument("--version", action="version", version=f"hdslbd {__version__}")
    add_daemon_options(p)
    return p


def _log_level_arg(text: str) -> str:
    """--log-level: Python's names in any case, or the DPVS names global_defs log_level takes (ERR, NOTICE, ...)."""
    low = text.lower()
    return low if low in LOG_LEVELS else DPVS_LOG_LEVELS.get(text.upper(), text)


def add_daemon_options(p: argparse.ArgumentParser, defaults: bool = True) -> dict[str, tuple[str, bool]]:
    """hdslbd's options (all but --ctl-socket), on hdslbd's parser and on `hdslb-ctl up`'s, which forwards them:
    one list, so neither command lacks an option of the other. defaults=False leaves an option not given out of
    the namespace (the daemon applies its own default). Returns {dest: (option, takes a value)} of the options,
    for a forwarder to pass on."""
    forward = {}

    def add(*names, **kw):
        if not defaults and names[0].startswith("-"):
            kw["default"] = argparse.SUPPRESS  # an option not given is left to the daemon's default
        a = p.add_argument(*names, **kw)
        if a.option_strings:
            forward[a.dest] = (a.option_strings[-1], a.nargs != 0)
    add("interfaces", nargs="*", metavar="IFACE", help="interfaces to attach the XDP program to")
    add("-f", "--config", dest="config_file", metavar="CONFIG", help="hdslb.conf to load")
    add("-i", "--config-id", metavar="ID", help="as keepalived -i: the config's `@ID` lines apply, `@^ID` ones do "
                                                "not (default: the node name, up to its first dot)")
    add("--xdp-mode", choices=XDP_MODES, default="auto",
        help="native needs driver support (veth: an XDP program on the peer); auto picks generic for veth")
    add("--instance", help="instance name (default: derived from the control socket name)")
    add("--pin-root", default=os.environ.get("HDSLB_PIN_ROOT", DEFAULT_PIN_ROOT),
        help=f"bpffs directory holding one sub-directory of pinned maps per instance (default "
             f"${{HDSLB_PIN_ROOT}} or {DEFAULT_PIN_ROOT})")
    add("--max-conns", type=int,
        help=f"IPv4 connection table entries, one per direction (default {DEFAULT_MAX_CONNS}; conn_pool_size in "
             "the config)")
    add("--max-conns6", type=int,
        help="IPv6 and NAT64 connection table entries (default: a quarter of --max-conns; "
             "conn6_pool_size in the config)")
    add("--conn-table", choices=CONN_TABLE_CHOICES,
        help=f"connection values per CPU (no cache line shared on the hot path; memory grows with the CPU "
             f"count; at most {PERCPU_MAX_CPUS} possible CPUs), one shared value an entry, or auto (the default): "
             f"percpu up to {PERCPU_MAX_CPUS} possible CPUs, shared above (conn_table in the config)")
    add("--max-hash-cells", type=int, default=1 << 21,
        help="cells for every sh/dh/mh/conhash table together (4 bytes each; a rebuild needs room for "
             "the new table beside the old; default 2097152)")
    add("--max-services", type=int, default=DEFAULT_MAX_SERVICES,
        help=f"virtual services (SNAT ones included), 1..{MAX_SERVICES_LIMIT} (default {DEFAULT_MAX_SERVICES})")
    add("--max-dests", type=int, default=DEFAULT_MAX_DESTS,
        help=f"real servers of every service together (dest slots), 1..{MAX_DESTS_LIMIT} (default "
             f"{DEFAULT_MAX_DESTS})")
    add("--max-persist", type=int, default=65536, help="persistence templates (ipvsadm -p), LRU (default 65536)")
    add("--lport-range", default=f"{DEFAULT_LPORT_RANGE[0]}-{DEFAULT_LPORT_RANGE[1]}",
        help=f"FNAT local port range MIN-MAX (default {DEFAULT_LPORT_RANGE[0]}-{DEFAULT_LPORT_RANGE[1]})")
    add("--log-level", type=_log_level_arg, choices=LOG_LEVELS,
        help="debug, info, warning or error, any case, or a DPVS name (ERR, NOTICE, ...); default: global_defs "
             "log_level from -f, else info")
    add("--fresh", action="store_true",
        help="discard pinned state left by a previous daemon instead of adopting it")
    add("--state-dir", default=DEFAULT_STATE_DIR, help=f"where the model is saved for restarts (default {DEFAULT_STATE_DIR})")
    add("--aging-interval", type=float, default=2.0, help="seconds between connection aging sweeps (default 2)")
    add("--api-listen", default="127.0.0.1:53225",
        help="REST/metrics address HOST:PORT (default 127.0.0.1:53225; 'off' disables); non-loopback "
             "needs a token")
    add("--api-token-file", help="file holding the REST bearer token (or set $HDSLB_API_TOKEN)")
    add("--slowpath", action="store_true",
        help="serve ARP/ND, ICMP and unresolved next hops from the AF_XDP slow path (the default)")
    add("--no-slowpath", action="store_true",
        help="no AF_XDP slow path: ARP and IPv6 ND answered in XDP, next hops probed over a packet socket, "
             "packets to unresolved next hops dropped until resolved")
    return forward


def timeouts_of(cfg) -> dict:
    """The idle timeouts (seconds, by the names Settings.timeouts uses) a config sets: ipvs_defs's timeout blocks,
    and keepalived's `global_defs { lvs_timeouts tcp N tcpfin N udp N }` for the three it names (the loader refuses
    a file where both set one timeout to different values, so neither silently wins)."""
    from hdslb.config.model import LVS_TIMEOUTS

    tcp = cfg.ipvs_defs.tcp.timeout
    out = dict(DEFAULT_TIMEOUTS, syn_recv=tcp.syn_recv, established=tcp.established, fin_wait=tcp.fin_wait,
               close=tcp.close, udp=cfg.ipvs_defs.udp.timeout.normal)
    for lvs, secs in cfg.global_defs.lvs_timeouts:
        out[LVS_TIMEOUTS[lvs]] = secs
    return out


def settings_from_args(argv: list[str] | None = None) -> Settings:
    p = build_parser()
    ns = p.parse_args(argv)
    if not ns.interfaces and not ns.config_file:
        p.error("no interface given (name one or more, or use -f with a netif_defs section)")
    if ns.config_id is not None and not ns.config_file:
        p.error("-i/--config-id picks the `@ID` lines of -f's file: it takes -f CONFIG (the instance is --instance)")
    try:
        lo, hi = parse_lport_range(ns.lport_range)
    except ValueError as e:
        p.error(str(e))
    # (at most a BPF map's u32 max_entries, as conn_pool_size in the config is: a larger one cannot be a map)
    for opt, v in (("--max-conns", ns.max_conns), ("--max-conns6", ns.max_conns6)):
        if v is not None and v < 256:
            p.error(f"{opt} must be at least 256")
        if v is not None and v > 2**32 - 1:
            p.error(f"{opt} must be at most 4294967295")
    if not 0 < ns.aging_interval <= 86400:  # (nan and inf too: a sweep never, or at an undefined time)
        p.error("--aging-interval must be a number of seconds, more than 0 and at most 86400")
    if ns.instance is not None and instance_error(ns.instance):
        p.error(f"--instance: {instance_error(ns.instance)}")
    if not 64 <= ns.max_persist <= 1 << 24:
        p.error("--max-persist must be within 64..16777216")
    for opt, v in (("--max-hash-cells", ns.max_hash_cells), ("--max-services", ns.max_services),
                   ("--max-dests", ns.max_dests)):
        if limit_error(opt, v):
            p.error(f"{opt} {limit_error(opt, v)}")
    interfaces, explicit_ctl, max_conns, notices = list(ns.interfaces), ns.ctl_socket, ns.max_conns, []
    iface_where = {}  # the netif_defs line of each interface the file gives (none given on the command line)
    conn_table, max_conns6 = ns.conn_table, ns.max_conns6
    log_level, log_file = ns.log_level, None
    neigh = (60.0, 128, 64)
    timeouts = dict(DEFAULT_TIMEOUTS)
    if ns.config_file:
        # The file supplies what the command line left out; the command line wins where both speak.
        from hdslb.config import ConfigError, load

        try:
            cfg = load(ns.config_file, ns.config_id)
        except ConfigError as e:
            p.exit(2, "".join(f"hdslbd: {x}\n" for x in e.errors))  # every error, as check prints them
        except OSError as e:
            p.exit(2, f"hdslbd: {e}\n")
        if not interfaces:
            interfaces = list(cfg.netif_defs.interfaces)
            iface_where = {d.name: str(d.where) for d in cfg.netif_defs.device if d.where is not None}
        # the file's unix_domain only where it writes one: the keyword's default stood over $HDSLB_CTRL
        explicit_ctl = explicit_ctl or cfg.ctl_socket
        if ns.max_conns is None and cfg.ipvs_defs.conn.conn_pool_size:  # the command line wins, also at 262144
            max_conns = cfg.ipvs_defs.conn.conn_pool_size
        conn_table = conn_table or cfg.ipvs_defs.conn.conn_table
        max_conns6 = max_conns6 or cfg.ipvs_defs.conn.conn6_pool_size
        from hdslb.config.apply import inactive_notices

        notices = inactive_notices(cfg)
        if ns.no_slowpath:
            notices += [f"{st.where}: {st.keyword}: accepted, not acted on: used by the AF_XDP slow path, which "
                        f"--no-slowpath turns off (learned neighbours then stay until replaced)"
                        for path, st in cfg.settings.items() if path.startswith("neigh_defs") and st.applies]
        log_level = log_level or DPVS_LOG_LEVELS.get(cfg.global_defs.log_level.upper(), "info")
        log_file = cfg.global_defs.log_file
        if log_file is not None:
            # opened here, as a reload opens a changed one before applying it: logging.basicConfig failed with a
            # traceback naming no line (and check cannot know the file system hdslbd will run on)
            try:
                open(log_file, "a").close()
            except OSError as e:
                p.exit(2, f"hdslbd: {cfg.settings['global_defs.log_file'].where}: log_file: cannot open {log_file}: "
                          f"{e.strerror}\n")
        neigh = (cfg.neigh_defs.timeout, cfg.neigh_defs.unres_queue_length, cfg.ipv4_defs.default_ttl)
        timeouts = timeouts_of(cfg)
        if not interfaces:
            p.error(f"{ns.config_file}: no interface in netif_defs and none given")
    conn_table, auto_cpus = _resolve_conn_table(p, ns, conn_table or "auto", cfg if ns.config_file else None)
    api_listen = None if ns.api_listen in ("off", "none", "") else ns.api_listen
    if api_listen is not None and (not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\s]+):[0-9]{1,5}", api_listen)
                                   or int(api_listen.rpartition(":")[2]) > 65535):
        p.error(f"invalid --api-listen {ns.api_listen!r} (HOST:PORT, [V6]:PORT or off)")
    token = (os.environ.get("HDSLB_API_TOKEN") or "").strip()  # as the file's: no client can send a newline
    if ns.api_token_file:
        try:
            with open(ns.api_token_file) as f:
                token = f.read().strip()
        except OSError as e:
            p.error(f"cannot read --api-token-file {ns.api_token_file}: {e.strerror}")
    if api_listen is not None and not token:
        from hdslb.api.app import is_loopback

        host = api_listen.rpartition(":")[0]
        if not is_loopback(host.strip("[]")):  # (start_api refuses it too, but only once compiled and attached)
            p.error(f"--api-listen {api_listen}: away from loopback the REST API needs a bearer token "
                    f"(--api-token-file FILE or $HDSLB_API_TOKEN), or bind 127.0.0.1")
    ctl = protocol.resolve_socket(explicit_ctl)
    # Absolute from where hdslbd was started: bcc cannot open a pinned map by a relative PIN_DIR (a fresh start died
    # compiling, a restart was refused as a changed map layout), and status names them to other working directories.
    return Settings(interfaces=interfaces, ctl_socket=ctl, instance=ns.instance or instance_name(ctl),
                    pin_root=os.path.abspath(ns.pin_root), xdp_mode=ns.xdp_mode, max_conns=max_conns or DEFAULT_MAX_CONNS,
                    max_conns6=max_conns6 or 0,
                    conn_table=conn_table, conn_table_auto_cpus=auto_cpus, lport_min=lo,
                    lport_max=hi, log_level=log_level or "info", config_file=ns.config_file,
                    config_id=ns.config_id, fresh=ns.fresh,
                    state_dir=os.path.abspath(ns.state_dir), timeouts=timeouts, aging_interval=ns.aging_interval,
                    api_listen=api_listen, api_token=token or None, log_file=log_file,
                    neigh_timeout=neigh[0], unres_queue_length=neigh[1], default_ttl=neigh[2],
                    slowpath=not ns.no_slowpath, max_hash_cells=ns.max_hash_cells,
                    max_persist=ns.max_persist, max_services=ns.max_services, max_dests=ns.max_dests,
                    extra={"notices": notices, "log_level_from_cli": ns.log_level is not None,
                           "iface_where": iface_where})


def _resolve_conn_table(p, ns, asked: str, cfg) -> tuple[str, int | None]:
    """The conn table kind this start runs with, and the possible CPU count when auto picked it. A per-CPU table
    asked for on more possible CPUs than it is built for is refused here, before anything is compiled or touched
    (exit 2, naming the CPU count, the limit and the shared table; the config's line when the file asked)."""
    from hdslb.fastpath import loader

    ncpus = loader.possible_cpus()
    why = loader.conn_table_refusal(asked, ncpus)
    if why:
        st = cfg.settings.get("ipvs_defs.conn.conn_table") if cfg is not None and ns.conn_table is None else None
        p.exit(2, f"hdslbd: {f'{st.where}: conn_table' if st is not None else '--conn-table'} {asked}: {why}\n")
    return loader.resolve_conn_table(asked, ncpus), (ncpus if asked == "auto" else None)


def _check_saved_timeouts(saved) -> None:
    """The state file's --set timeouts: {state name: {"value": s, "base": s}}; raises ValueError naming the fault."""
    from hdslb.config.model import MAX_TIMEOUT_S

    if not isinstance(saved, dict):
        raise ValueError("its timeouts are not a map")
    for name, o in saved.items():
        if name not in DEFAULT_TIMEOUTS or not isinstance(o, dict) or set(o) != {"value", "base"} or not all(
                type(o[k]) is int and 1 <= o[k] <= MAX_TIMEOUT_S for k in ("value", "base")):
            raise ValueError(f"its timeout {name!r} is not {{value, base}} in 1..{MAX_TIMEOUT_S} seconds")


class _NullDataPath:
    """Accepts every write: the scratch model of a dry run has no maps behind it."""

    def __getattr__(self, name):
        return lambda *a, **kw: None


class MapDataPath:
    """The balancer model's DataPath over the BPF maps."""

    def __init__(self, maps, ifindex=lambda name: 0):
        self.m = maps
        self.ifindex = ifindex  # interface name (or None: any) -> ifindex, for SNAT rules
        self.kni: set = set()  # prefixes routed scope kni_host (the fast path checks the trie only when any)
        self._flushes: set = set()  # (svc_id, slot or None) whose persistence templates go at the next pass
        self._flushing = False      # a pass is scheduled or running

    def service_set(self, svc):
        if svc.match is not None:
            return  # a SNAT service is found through its snat_map rule, not by VIP
        self.m.set_service(_proto(svc.proto), svc.addr, svc.port, svc.svc_id,
                           persist_timeout=svc.persistent or 0, persist_plen=svc.persist_plen)

    def service_del(self, svc):
        if svc.match is not None:
            self.m.del_service(None, None, None, svc.svc_id)
        else:
            self.m.del_service(_proto(svc.proto), svc.addr, svc.port, svc.svc_id)

    def dest_set(self, svc, d, no_persist=False):
        self.m.set_dest(d.slot, d.addr, d.port, d.fwd, svc.svc_id, drain=d.eff_weight == 0, no_persist=no_persist)

    def dest_clear(self, d):
        self.m.clear_dest(d.slot)

    def hash_cells_set(self, first, entries):
        self.m.set_hash_cells(first, entries)

    def sched_set(self, svc, table, hoff):
        from hdslb.fastpath import abi

        if table.kind == "hash":
            self.m.set_sched(svc.svc_id, [], svc.sched_gen, kind=abi.SCHED_HASH, key=abi.HKEY[table.key],
                             seed=table.seed, hoff=hoff, hlen=len(table.entries))
        else:
            self.m.set_sched(svc.svc_id, table.entries, svc.sched_gen, spread=table.spread)

    def snat_rule_set(self, index, svc):
        m, ifx = svc.match, self.ifindex
        self.m.set_snat_rule(index, svc.svc_id, _proto(m.proto), m.src, m.dst, ifx(m.iif), ifx(m.oif))

    def snat_rule_clear(self, index):
        self.m.clear_snat_rule(index)

    def snat_count_set(self, n):
        self.m.set_cfg(snat_rules=n)

    def persist_flush(self, svc_id, slot):
        """Remove the templates of a service (of one of its real servers when slot is given). Each removal reads the
        whole persist_map (65,536 templates at the default size: ~0.15 s): one per real server of a burst of health
        verdicts or of a reload held the event loop that long each (a rack of 200 going down: ~30 s). On the event
        loop the requests of one iteration are gathered and removed in one pass, in a worker thread. Nothing waits
        for it: the fast path already ignores every template a flush is for (its server's slot cleared or flagged
        DEST_F_NO_PERSIST, its service gone or persistent by another mask), the pass only frees them and takes them
        out of the listings. Without a running loop (tests, tools) they go at once."""
        self._flushes.add((svc_id, slot))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._flush(self._take_flushes())
            return
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush_off_loop, loop)

    def _take_flushes(self) -> set:
        pairs, self._flushes = self._flushes, set()
        return pairs

    def _flush(self, pairs) -> None:
        try:
            self.m.del_persists_many(pairs)
        except RuntimeError as e:  # a program without persist_map has no templates to flush
            log.debug("persist flush: %s", e)

    def _flush_off_loop(self, loop) -> None:
        """One pass over what was asked since the last one (taken on the loop's thread), then the next if more came."""
        pairs = self._take_flushes()
        try:
            fut = loop.run_in_executor(None, self._flush, pairs)
        except RuntimeError:  # the daemon is stopping (its executor shut down): here, then
            self._flushing = False
            self._flush(pairs)
            return

        def done(f):
            if not f.cancelled() and f.exception() is not None:
                log.error("persistence template flush failed: %s", f.exception())
            if self._flushes and not loop.is_closed():
                loop.call_soon(self._flush_off_loop, loop)
            else:
                self._flushing = False

        fut.add_done_callback(done)

    def laddrs_set(self, svc, laddrs):
        self.m.set_laddrs(svc.svc_id, laddrs)

    def local_set(self, addr, flags, ifindex):
        self.m.set_local(addr, flags, ifindex)

    def local_del(self, addr):
        self.m.del_local(addr)

    def route_set(self, r, ifindex):
        self.m.set_route(r.net, ifindex, r.via, r.src, r.mtu, r.scope == "kni_host")
        if r.scope == "kni_host":
            self.kni.add(r.net)
            self.m.set_cfg(kni_routes=True)
        elif r.net in self.kni:
            self._kni_gone(r.net)

    def route_del(self, net):
        self.m.del_route(net)
        if net in self.kni:
            self._kni_gone(net)

    def _kni_gone(self, net):
        self.kni.discard(net)
        if not self.kni:
            self.m.set_cfg(kni_routes=False)

    def neigh_set(self, n, ifindex):
        self.m.set_neigh(n.addr, n.lladdr, ifindex, permanent=True)

    def neigh_del(self, addr):
        self.m.del_neigh(addr)


def _proto(name: str) -> int:
    return {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "icmp": socket.IPPROTO_ICMP}[name]


def _member_port(ident: dict, fwd: str | None, rs_port) -> int:
    """The port of the model's real server a health-check identity (real server port rs_port) stands for in the
    service `ident`: the service's own for DR and TUNNEL (a group's member, see config.apply.desired) and for a
    server written without a port (0), else rs_port."""
    if fwd in ("dr", "tunnel") and "port" in ident:
        return ident["port"]
    return rs_port or ident.get("port", 0)


def _endpoint(addr, port) -> str:
    a = ipaddress.ip_address(str(addr))
    return f"[{a}]:{port}" if a.version == 6 else f"{a}:{port}"


CHECK_KINDS = {
    "TCP_CHECK": ("connect_timeout", "connect_port", "connect_ip", "retry", "delay_before_retry", "warmup"),
    "HTTP_GET": ("connect_timeout", "connect_port", "connect_ip", "retry", "delay_before_retry", "warmup"),
    "SSL_GET": ("connect_timeout", "connect_port", "connect_ip", "retry", "delay_before_retry", "warmup"),
    "UDP_CHECK": ("connect_timeout", "connect_port", "connect_ip", "retry", "delay_before_retry", "warmup",
                  "payload", "require_reply", "min_reply_length", "max_reply_length"),
    "SMTP_CHECK": ("connect_timeout", "connect_port", "connect_ip", "retry", "delay_before_retry", "warmup",
                   "helo_name"),
    "MISC_CHECK": ("misc_path", "misc_timeout", "misc_dynamic", "retry", "delay_before_retry", "warmup"),
}
_TOKEN = re.compile(r"[A-Za-z0-9_.:/%+=@-]+")


def check_block(svc: dict, addr: str, port: int, a: dict, weight: int = 1) -> str:
    """A one-server keepalived block for check.add, so run-time checks are parsed and validated exactly like
    the file's. Values are restricted to plain tokens: nothing can inject configuration text. `weight` is the
    server's weight when the check is added: what it counts for in its virtual server's quorum and what a
    misc_dynamic exit 0 puts back (without it keepalived's default, 1, made one healthy server of weight 5 count
    1, which could take a whole service's quorum away and send every new flow to its sorry server)."""
    from hdslb.errors import invalid

    # no kind: the service's own protocol's check (a TCP_CHECK of a UDP service is refused by every healthy server)
    kind = str(a["kind"] if "kind" in a else "UDP_CHECK" if svc.get("proto") == "udp" else "TCP_CHECK").upper()
    if kind not in CHECK_KINDS:
        raise invalid(f"unknown check kind {kind!r} ({', '.join(CHECK_KINDS)})")
    params = a.get("params") or {}
    if not isinstance(params, dict):
        raise invalid("params must be a map")

    def tok(k, v):
        v = str(v).lower() if isinstance(v, bool) else str(v)
        if k == "misc_path":
            if not v or any(ch in v for ch in '"{}\n!#'):
                raise invalid(f"invalid misc_path {v!r}")
            return f'"{v}"'
        if not _TOKEN.fullmatch(v):
            raise invalid(f"invalid value for {k}: {v!r}")
        return v

    body = []
    for k, v in params.items():
        if k == "url":
            urls = v if isinstance(v, list) else [v]
            for u in urls:
                if kind not in ("HTTP_GET", "SSL_GET") or not isinstance(u, dict) or "path" not in u:
                    raise invalid("url needs HTTP_GET/SSL_GET and a path")
                body.append("            url {")
                body += [f"                {uk} {tok(uk, uv)}" for uk, uv in u.items() if uk in ("path", "status_code", "digest")]
                body.append("            }")
        elif k in CHECK_KINDS[kind]:
            if k == "misc_dynamic":
                if v:
                    body.append("            misc_dynamic")
            else:
                body.append(f"            {k} {tok(k, v)}")
        else:
            raise invalid(f"{kind} takes no parameter {k!r} (it takes: {', '.join(CHECK_KINDS[kind])}, url)")
    delay = a.get("delay_loop", 6)
    if isinstance(delay, bool) or not isinstance(delay, (int, float)):
        raise invalid(f"invalid delay_loop {delay!r}: seconds, a number")
    extra = ["        inhibit_on_failure"] if a.get("inhibit_on_failure") else []
    return "\n".join([
        f"virtual_server {svc['addr']} {svc['port']} {{",
        f"    protocol {svc['proto'].upper()}",
        f"    delay_loop {tok('delay_loop', delay)}",
        "    lb_kind FNAT",
        f"    real_server {addr} {port} {{", f"        weight {int(weight)}", *extra,
        f"        {kind} {{", *body, "        }", "    }", "}", ""])


def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify) about READY/RELOADING/STOPPING; a no-op outside systemd. False when it could not
    (no NOTIFY_SOCKET, or one that is gone): as sd_notify(3), never an error the daemon dies of."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd at NOTIFY_SOCKET=%s: %s", os.environ.get("NOTIFY_SOCKET"), e.strerror or e)
        return False
    return True


def read_ifaces(names: list[str], where: dict[str, str] | None = None) -> dict[str, Iface]:
    """The interfaces by name; `where`: the config line that named each (netif_defs), for the refusal of one
    missing."""
    from pyroute2 import IPRoute

    out = {}
    with IPRoute() as ipr:
        for name in names:
            links = ipr.link_lookup(ifname=name)
            if not links:
                if where and name in where:
                    raise HdslbError(errno.ENODEV, f"{where[name]}: device {name}: no such interface")
                raise HdslbError(errno.ENODEV, f"no such interface: {name}")
            link = ipr.link("get", index=links[0])[0]
            mac = bytes(int(x, 16) for x in link.get_attr("IFLA_ADDRESS").split(":"))
            out[name] = Iface(name=name, ifindex=links[0], mac=mac, mtu=link.get_attr("IFLA_MTU"))
    return out


def kernel_neighbours(ifindexes: set[int]) -> list[tuple]:
    """(ip, mac bytes, ifindex) of the kernel's reachable/stale/permanent neighbours on our interfaces."""
    from pyroute2 import IPRoute

    usable = 0x02 | 0x04 | 0x08 | 0x80  # NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PERMANENT
    out = []
    with IPRoute() as ipr:
        for n in ipr.get_neighbours():
            ll, dst = n.get_attr("NDA_LLADDR"), n.get_attr("NDA_DST")
            if n["ifindex"] in ifindexes and ll and dst and n["state"] & usable:
                out.append((ipaddress.ip_address(dst), bytes(int(x, 16) for x in ll.split(":")), n["ifindex"]))
    return out


def arp_frame(op: int, smac: bytes, sip, dmac: bytes, tip, tha: bytes = b"\0" * 6) -> bytes:
    """An Ethernet ARP frame (op 1 request, 2 reply)."""
    return (dmac + smac + struct.pack("!H", 0x0806) + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op)
            + smac + ipaddress.IPv4Address(sip).packed + tha + ipaddress.IPv4Address(tip).packed)


def _option_line(c) -> str:
    """A changed option as the reload reply and log show it: FILE:LINE: PATH: OLD -> NEW."""
    def val(v):
        return "(unset)" if v is None else " ".join(map(str, v)) if isinstance(v, tuple) else str(v)

    return f"{c.where.file}:{c.where.line}: {c.path}: {val(c.old)} -> {val(c.new)}"


def log_file_handler(path: str) -> logging.Handler:
    """The handler of global_defs' log_file: it follows the path, so a log renamed by logrotate (its default
    `create` mode) is written anew at the path instead of into the renamed file for ever."""
    import logging.handlers

    return logging.handlers.WatchedFileHandler(path)


def swap_log_handler(root: logging.Logger, new: logging.Handler) -> None:
    """Send the log to `new` in place of the handler main() set up (a plain StreamHandler or FileHandler, with
    its format); handlers others added (a test's capture, journald) stay."""
    import logging.handlers

    mine = [h for h in root.handlers
            if type(h) in (logging.StreamHandler, logging.FileHandler, logging.handlers.WatchedFileHandler)]
    if mine:
        new.setFormatter(mine[0].formatter)
    root.addHandler(new)
    for h in mine:
        root.removeHandler(h)
        if isinstance(h, logging.FileHandler):
            h.close()


def _flock_unless_live(fd: int, dying_wait_s: float = 10.0) -> None:
    """flock(LOCK_EX) the lock file fd; BlockingIOError while a live process holds it. A holder that is dying (its
    leader already a zombie after kill -9, its threads still ending; the lock goes with the last one) is waited
    for: `kill -9` then `hdslb-ctl up` at once must not be refused as a second daemon."""
    import fcntl

    deadline = time.monotonic() + dying_wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = os.pread(fd, 16, 0).decode(errors="replace").strip()
            try:
                with open(f"/proc/{holder}/stat") as f:
                    dying = f.read().rpartition(")")[2].split()[0] in ("Z", "X")
            except (OSError, IndexError, ValueError):
                dying = False  # unknown holder (no pid written yet): a daemon starting
            if not dying or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Daemon:
    # Its conn table can hold millions of entries: service.list counts connections in a worker thread even for
    # one service, and builds big listings in chunks (hdslb.ctl.commands.service_list).
    lists_off_loop = True

    def __init__(self, settings: Settings):
        from hdslb.fastpath.loader import Sizes

        self.settings = settings
        self.sizes = Sizes(max_conns=settings.max_conns, max_conns6=settings.max_conns6, conn_table=settings.conn_table,
                           max_hash_cells=settings.max_hash_cells, max_persist=settings.max_persist,
                           max_services=settings.max_services, max_dests=settings.max_dests)
        self.ctl_path = settings.ctl_socket
        self.pin_dir = settings.pin_dir
        # Timeouts: the config's (file_timeouts, or the defaults without -f), and the ipvsadm --set / timeouts.set
        # values standing over them: state name -> {"value": seconds, "base": the config's value when it was set}.
        # settings.timeouts is what runs: file_timeouts with the set values over it (see _rebase_timeouts).
        self.file_timeouts = dict(settings.timeouts)
        self.timeout_overrides: dict[str, dict] = {}
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.fp = None
        self.maps = None
        self.bal: Balancer | None = None
        self.ctl: CtlServer | None = None
        self.xdp_modes: dict[str, str] = {}
        self.ready = False  # start() finished: what hdslb-ctl up waits for (the control socket answers before)
        self.heap = HeapSettler()  # main() turns it on: the model's objects kept out of full collections
        self.reexec = False  # stop, then exec hdslbd again (an interface it serves was recreated): see main()
        self.ifaces_gone: set[str] = set()
        # interface -> the XDP program id it runs instead of ours (0: none): detached or replaced behind our back
        self.ifaces_lost: dict[str, int] = {}
        self._swapping = False  # a datapath reload is attaching its program (the id changes under _watch_ifaces)
        self.rates: dict = {}
        self._stop = asyncio.Event()
        self._detach_on_stop = False
        self._resolve_now = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.config = None  # the Config last applied
        self.start_config = None  # the Config this start applied first: what its options read only at start are
        self._reload_lock = asyncio.Lock()  # reloads take turns (reload_config)
        self.want: dict = {}  # its services, as hdslb.config.apply.desired returned them
        # dests the saved model had up (and their ids), until the first health start (_pool_state)
        self._restored_up: tuple = ([], set())
        self.config_warnings: list[str] = []  # what applying the file found wrong but not refused (real servers unrouted)
        self.health = None
        self.api = None
        self.slow = None  # SlowPathRunner when AF_XDP works
        self.ctl_checks: dict[str, dict] = {}  # checks added with check.add: key -> {svc, addr, port, text}
        self._save_handle = None
        self.save_error: str | None = None  # why the last save failed (and since when); None: the file is current
        self._save_retry = None
        self._heap_handle = None  # a pending heap settle, once changes go quiet (see _heap_soon)
        self._heap_grown_at = float("-inf")  # when a burst last asked whether the model grew (see _state_changed)
        self._last_change = float("-inf")
        self._verdicts: list = []  # health verdicts not applied yet (see _on_health)
        self._verdict_handle = None
        self._verdicts_done = float("-inf")  # loop time the last application of verdicts ended
        self._verdict_cost = 0.0  # seconds it took
        self._resolve_handle = None
        # -inf, not 0.0: monotonic time starts near 0 at boot, and a machine up for less than a coalescing delay
        # would otherwise wait that delay before its first resolve or save
        self._last_resolve = float("-inf")
        self._last_save = float("-inf")
        self._save_cost = 0.0
        self._conn_cache = (0.0, None)
        self._counts_cache = (0.0, None)
        # (monotonic time, counts, seconds the scan took) the estimator last read for lc/wlc and thresholds
        self._sched_counts = (0.0, None, 0.0)
        self._laddr_cache: tuple | None = None  # (the _conns() list it was counted from, counts)
        self._entries_cache = (0.0, None, 0.0)
        self._laddrs_in_use: set | None = None  # retired local addresses' use, as the last sweep found it
        self._evicted = 0  # the most the counts so far prove the conn tables' LRU evicted (Maps._evicted_bound)
        self._evicted_logged: int | None = None  # that figure when last logged (None: not looked at yet)
        self._evicted_logged_at = float("-inf")
        self._pkt_socks: dict[str, socket.socket] = {}
        self._na_socks: dict[str, socket.socket] = {}
        # solicited-node groups of our IPv6 addresses, joined through the kernel so it reports them over MLD
        self._mld = Memberships()
        self._mld_index = None  # the model's local index the memberships were last synced to

    def _datapath(self, maps) -> MapDataPath:
        def ifindex(name):
            return self.bal.ifaces[name].ifindex if name else 0

        return MapDataPath(maps, ifindex)

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        from hdslb.fastpath.loader import FastPath
        from hdslb.fastpath.maps import Maps

        from hdslb.fastpath import loader

        s = self.settings
        for n in s.extra.get("notices", []):
            log.info("config: %s", n)
        if s.conn_table_auto_cpus is not None:
            log.info("connection table: %s (--conn-table auto: %d possible CPUs; per-CPU up to %d)", s.conn_table,
                     s.conn_table_auto_cpus, loader.PERCPU_MAX_CPUS)
        # Before anything is read or touched: a second daemon on these pins or this state file must not adopt,
        # re-attach, discard (--fresh) or, failing later, tear down what the first one runs.
        self._take_locks()
        self._remove_stale_saves()
        loop = asyncio.get_running_loop()
        # pyroute2's synchronous API refuses to run inside an event loop; netlink work goes to a thread.
        ifaces = await loop.run_in_executor(None, read_ifaces, s.interfaces, s.extra.get("iface_where"))
        self.fp = FastPath(self.pin_dir, self.sizes)
        snap = None if s.fresh else self._read_state()
        if snap is not None:
            self._check_snapshot_ifaces(snap, ifaces)
            self._check_snapshot_sizes(snap)
        adopt = snap is not None and self.fp.has_pins()
        if self.fp.has_pins() and not adopt:
            log.warning("discarding pinned state in %s (--fresh)", self.pin_dir)
        # Attaching replaces whatever XDP program an interface runs: only this instance's own (one using its pinned
        # maps, left by the daemon before) may be replaced, never another instance's or another tool's.
        ours = await loop.run_in_executor(None, loader.pinned_map_ids, self.pin_dir)
        for name in ifaces:
            other = await loop.run_in_executor(None, loader.foreign_xdp, name, ours)
            if other is not None:
                raise HdslbError(errno.EBUSY, loader.foreign_xdp_message(name, other[0], other[1], self.pin_dir))
        self._made_model = snap is None and not adopt  # the saved model below is this start's: a failed one removes it
        if snap is None and not adopt:
            # New pins get a model from the start (empty until the first change): a daemon killed before its first
            # save must not leave pins without one, which the next start would have to refuse.
            self.bal = Balancer(_NullDataPath(), ifaces, max_services=self.sizes.max_services,
                                max_dests=self.sizes.max_dests, max_hash_cells=self.sizes.max_hash_cells)
            self._save_state()
        if snap is not None and not adopt:
            log.warning("no pinned maps in %s: restoring the saved model of %s (%d services) into new maps; "
                        "connections and counters start empty", self.pin_dir, s.state_file, len(snap["services"]))
        try:
            await loop.run_in_executor(None, self.fp.load, adopt)
        except Exception as e:
            # RuntimeError: the pinned maps do not fit this build (sizes, table kind, layout); OSError: a map the
            # kernel cannot make (a connection table too large, its estimate named); bcc's bare Exception: the
            # program does not compile (clang's errors above it: kernel headers missing, ...). In one line, not a
            # traceback; a fresh start removes what it made (the empty model saved above, its pin directory), an
            # adopting one had its pins put back by load().
            if not isinstance(e, (RuntimeError, OSError)) and type(e) is not Exception:
                raise  # a bug, not a refusal: its traceback is wanted
            why = getattr(e, "strerror", None) or str(e)
            if type(e) is Exception:
                why = f"cannot load the XDP program: {why}"
            err = HdslbError(getattr(e, "errno", None) or errno.EINVAL, why)
            await self._start_failed(adopt, err)
            raise err from None
        self.maps = Maps(self.fp)
        self.maps.set_cfg(s.lport_min, s.lport_max)
        if snap is not None:
            self._adopt_saved_timeouts(snap)
        self.maps.set_idle_timeouts(s.timeouts)
        if not adopt:  # an adopted table keeps its cursor: the ports just used are in it
            self.maps.seed_lport_cursor()
        for slot, ifc in enumerate(ifaces.values()):
            self.maps.set_iface(ifc.ifindex, ifc.mac, ifc.mtu, xsk_slot=slot)
        self.bal = Balancer(self._datapath(self.maps), ifaces, max_services=self.sizes.max_services,
                            max_dests=self.sizes.max_dests, max_hash_cells=self.sizes.max_hash_cells)
        self.bal.conn_counts = self.sched_counts
        if snap is not None:
            self._restore_model(snap)
        if adopt:
            self._prune_to_model()
            log.info("adopted pinned state: %d services, %d connection entries%s", len(self.bal.services),
                     self.maps.conn_entries(), " (those of the set-aside tables are copied in next)"
                     if self.fp.conn_moves else "")
        self._save_state()
        try:
            if self.fp.conn_moves:  # another --conn-table or size: the pinned flows go into the new tables
                await self._move_conns(loop, final=False)
            for name in ifaces:
                try:
                    self.xdp_modes[name] = await loop.run_in_executor(None, self.fp.attach, name, s.xdp_mode)
                except XdpAttachError as e:  # one line naming the interface and the way out, not a traceback
                    raise HdslbError(e.code, str(e)) from None
                log.info("attached to %s (%s mode)", name, self.xdp_modes[name])
            if self.fp.conn_moves:  # what the old program added or moved on while the first copy ran
                await self._move_conns(loop, final=True)
            if self.fp.resized:  # maps made anew at another size, written by the model: the old ones go
                log.info("resized maps in use, the old ones unpinned: %s", ", ".join(self.fp.finish_resize()))
            if self.fp.legacy_conn_pin:  # an upgrade from the single-table layout: its flows move over now
                try:
                    await loop.run_in_executor(None, self.fp.migrate_legacy_conns)
                except OSError as e:
                    log.error("could not move the connections of the old single-table layout: %s", e)
            self.ctl = CtlServer(self.ctl_path, self.dispatch)
            await self.ctl.start()
            if s.api_listen:
                from hdslb.api.app import start_api

                host, _, port = s.api_listen.rpartition(":")
                self.api = await start_api(self, host=host.strip("[]"), port=int(port), token=s.api_token)
                log.info("REST API and /metrics on http://%s/v2 (token %s)", s.api_listen,
                         "required" if s.api_token else "not set")
        except Exception as e:
            await self._start_failed(adopt, e)
            raise
        self._tasks = [asyncio.create_task(self._estimator()), asyncio.create_task(self._aging()),
                       asyncio.create_task(self._watch_ifaces()), asyncio.create_task(self._watch_mld())]
        if s.slowpath:
            from hdslb.slowpath.runner import SlowPathRunner

            runner = SlowPathRunner(self, s.neigh_timeout, s.unres_queue_length, s.default_ttl)
            try:
                runner.open()
                self.slow = runner
            except Exception as e:  # no AF_XDP here: the fast path answers ARP and a packet socket probes
                await runner.close()
                log.warning("AF_XDP slow path unavailable (%s); falling back to ARP in XDP", e)
        if self.slow is None:
            self._tasks.append(asyncio.create_task(self._resolver()))
        self._open_na_listeners()
        if snap is not None and not adopt:
            # A saved model restored into new maps (after a reboot, onto another NIC or box): its addresses are
            # taken afresh, and announced as their adds announce them (DPVS's dpip addr add at its start, keepalived
            # taking its VIPs), so routers still holding them at a MAC this box no longer has (a NIC or box
            # replaced) move at once, not after their entries' timeout (hours on some routers). An adopted
            # start kept the fast path answering at the same MAC: nothing to say.
            self._announce_new({}, self.bal.owned_addresses())
        await self._start_config(adopt)
        self.heap.maybe_settle(model_size(self.bal))
        self.ready = True
        log.info("hdslbd %s ready: control socket %s, pins %s", __version__, self.ctl_path, self.pin_dir)

    def _restore_model(self, snap: dict) -> None:
        """The saved model into the empty pool, with the run-time checks and, until the first health start, the
        real servers the previous daemon had in rotation: their verdict stands for alpha (_pool_state). By id, the
        dests kept alive with them: a set lookup per server at 100k of them."""
        restore(self.bal, snap)
        self.ctl_checks = {c["key"]: c for c in snap.get("checks", [])}
        up = [d for svc in self.bal.services.values() for d in svc.dests.values() if d.health == "up" and not d.sorry]
        self._restored_up = (up, {id(d) for d in up})

    async def _start_config(self, adopt: bool) -> None:
        """The last step of a start: the config file's services, then the health checks. A file refused here (what
        check cannot know: --max-services, the interfaces given, a file changed since the settings were read)
        fails the start as any failure after attaching does."""
        s = self.settings
        try:
            if s.config_file:
                from hdslb.config import load

                self.apply_config(load(s.config_file, s.config_id))
            await self._start_health()
            self._restored_up = ([], set())  # (also when nothing is checked yet: a later reload's servers are new)
        except Exception as e:
            await self._start_failed(adopt, e)
            raise

    async def _start_failed(self, adopt: bool, e: BaseException) -> None:
        """A start that fails once attached stops what it started (the control socket goes with it) and, unless it
        adopted them, detaches and unpins what it made: a fresh start refused by its config file used to exit with
        the program attached, the maps pinned and a dead control socket left behind, for the next start to adopt
        an instance nobody meant to run."""
        if self.health is not None:
            await self.health.stop(ending=False)  # (omega: neither the adopted pool nor one never served ends here)
            self.health = None
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.slow is not None:
            await self.slow.close()
            self.slow = None
        self._close_na_listeners()
        self._mld.close()
        self._mld_index = None
        if self.api is not None:
            from hdslb.api.app import stop_api

            await stop_api(self.api)
            self.api = None
        # only a socket this start made: one that failed to start (the path a regular file, or another hdslbd's
        # live socket) is not ours to remove
        if self.ctl and self.ctl.server is not None:
            await self.ctl.stop()
        if adopt:
            # The pinned state is the previous daemon's, forwarding until now: never torn down by a start that
            # failed (a port in use, an interface that refused, a config refused). What was attached runs the
            # same maps.
            log.error("start failed (%s): the fast path stays attached with its pinned state; fix the cause "
                      "and start again", e.message if isinstance(e, HdslbError) else e)
        else:
            self.fp.detach_all()
            self.fp.unpin()
            if getattr(self, "_made_model", False):  # (the empty model it saved: a saved one it restored stays)
                try:
                    os.unlink(self.settings.state_file)
                except FileNotFoundError:
                    pass

    def _final_save(self) -> None:
        """At a stop: a coalesced save still pending is made; one that failed is tried once more; a model that
        still cannot be saved is said loudly (the next start would drop what the file lacks)."""
        if self._save_handle is not None:  # a coalesced save, the omega notices' included
            self._save_handle.cancel()
            self._deferred_save()
        elif self.save_error is not None:  # the last save failed: one more try before the model goes
            self._save_state()
        if self._save_retry is not None:  # no retry is coming now
            self._save_retry.cancel()
            self._save_retry = None
        if self.save_error is not None:
            log.error("stopping with the saved model %s behind the running one (%s): a start now adopts the pinned "
                      "maps with the older model and removes what it lacks (established flows go on); save it "
                      "first (free space on that file system, start with another --state-dir) or re-apply after "
                      "the start", self.settings.state_file, self.save_error)

    async def stop(self) -> None:
        if self._heap_handle is not None:
            self._heap_handle.cancel()
            self._heap_handle = None
        if self._resolve_handle is not None:
            self._resolve_handle.cancel()
            self._resolve_handle = None
        if self.health is not None:
            # omega: only when the service ends (`down`). A plain stop (a restart, an upgrade) leaves the fast path
            # forwarding with this pool, and the next start adopts it: reporting its servers down took them out of
            # rotation (and brought the sorry server in) for every new flow until the new daemon's checks passed.
            await self.health.stop(ending=self._detach_on_stop)
        self._apply_verdicts()  # the omega notices, if their application was still waiting
        if self.api is not None:
            from hdslb.api.app import stop_api

            await stop_api(self.api)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.slow is not None:
            await self.slow.close()
        if self.ctl:
            await self.ctl.stop()
        # Saved once nothing takes requests any more: the control socket and the REST API answered while the stop
        # waited above (a scrape in flight, the slow path closing), and a change acknowledged then must be saved.
        self._final_save()
        for sk in self._pkt_socks.values():
            sk.close()
        self._close_na_listeners()
        self._mld.close()
        self._mld_index = None
        if self.fp:
            if self._detach_on_stop:
                self.fp.detach_all()
                self.fp.unpin()
                try:
                    os.unlink(self.settings.state_file)
                except FileNotFoundError:
                    pass
                log.info("detached and removed pinned state")
            else:
                log.info("control plane stopped; the fast path stays attached with its state (hdslb-ctl down detaches)")
            self.fp.close()
        self._release_locks()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # A SIGHUP while starting (systemctl reload, kill -HUP: the start compiles, attaches and loads the file, some
        # seconds) took its default action and ended hdslbd half started. It is held, and the file read again once
        # the start has applied it.
        held_hup: list = []
        loop.add_signal_handler(signal.SIGHUP, held_hup.append, True)
        try:
            await self.start()
        except BaseException:
            self._release_locks()
            raise
        sd_notify(f"READY=1\nSTATUS=serving {len(self.bal.services)} services on {', '.join(self.xdp_modes)}\n"
                  f"MAINPID={os.getpid()}")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload_logged()))
        if held_hup:
            log.info("a SIGHUP came while starting: reloading the config file now")
            asyncio.ensure_future(self._reload_logged())
        # keepalived dumps its data / stats on these: by default they would end hdslbd at once, without its stop
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            loop.add_signal_handler(sig, lambda name=sig.name: log.warning(
                "%s ignored: hdslbd writes no dump file (keepalived's habit); its state is shown by hdslb-ctl "
                "status, ipvsadm -Ln [--stats] and hdslb-ctl health show", name))
        await self._stop.wait()
        if self.reexec:
            # to systemd a re-exec (same pid) is a reload: READY=1 follows from the new start. STOPPING=1 had it take
            # the service for one shutting down, ignore that READY=1 and SIGKILL it once TimeoutStopSec ran out.
            sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}\n"
                      f"STATUS=re-executing to attach to an interface that came back")
        else:
            sd_notify("STOPPING=1")
        await self.stop()

    async def _watch_ifaces(self, interval: float = IFACE_WATCH_S) -> None:
        """An interface deleted takes the XDP program with it; one created again under the same name (a veth pair
        re-made, a driver reloaded) has a new ifindex and no program. The fast path's entries name the old index,
        and the slow path's sockets are bound to it: hdslbd restarts itself (the model saved, the pins kept, exec
        of the same command line), which reads the interfaces afresh and attaches as any restart does."""
        while True:
            await asyncio.sleep(interval)
            if self._check_ifaces():
                return
            for name in list(self.bal.ifaces):
                if name not in self.ifaces_gone:
                    await self._watch_program(name)

    async def _watch_mld(self, interval: float = IFACE_WATCH_S) -> None:
        """Keep the solicited-node groups of our IPv6 addresses joined (hdslb.net.mcast): synced within a second of
        an address taken or given up (a VIP, a local address, a dpip address)."""
        while True:
            try:
                self.sync_mld()
            except Exception:
                log.exception("solicited-node group memberships")
            await asyncio.sleep(interval)

    def sync_mld(self) -> None:
        owned = self.bal.owned_addresses()
        if owned is self._mld_index:  # unchanged since the last sync (the model rebuilds it on any change)
            return
        self._mld_index = owned
        self._mld.sync(wanted_groups(owned, self.bal.ifaces), {n: i.ifindex for n, i in self.bal.ifaces.items()})

    def _check_ifaces(self, index_of=None, mtu_of=None) -> bool:
        """One look at the interfaces served (see _watch_ifaces); True when hdslbd restarts to attach again. An MTU
        changed (ip link set IF mtu N) is followed: the model (dpip link show, route show) and the fast path's
        interface entry, whose MTU the TUNNEL too-big check reads, held the start's."""
        index_of = index_of or socket.if_nametoindex
        mtu_of = mtu_of or link_mtu
        for slot, (name, ifc) in enumerate(list(self.bal.ifaces.items())):  # slots as start() wrote them
            try:
                index = index_of(name)
            except OSError:
                if name not in self.ifaces_gone:
                    self.ifaces_gone.add(name)
                    log.error("interface %s is gone, and the XDP program with it; hdslbd attaches again when it "
                              "comes back", name)
                continue
            if index != ifc.ifindex:
                log.warning("interface %s is back (ifindex %d, was %d): restarting hdslbd to attach to it; "
                            "services and connections are kept", name, index, ifc.ifindex)
                self.reexec = True
                self._stop.set()
                return True
            self.ifaces_gone.discard(name)
            try:
                mtu = mtu_of(name)
            except OSError:
                continue
            if mtu != ifc.mtu:
                try:
                    self.maps.set_iface(ifc.ifindex, ifc.mac, mtu, xsk_slot=slot)
                except Exception as e:  # the watch must go on (a map swapped by a datapath reload): next look retries
                    log.warning("interface %s: MTU %d not written to the fast path yet: %s", name, mtu, e)
                    continue
                log.info("interface %s: MTU %d (was %d), followed by the fast path", name, mtu, ifc.mtu)
                ifc.mtu = mtu
        return False

    async def _watch_program(self, name: str) -> None:
        """An interface whose program was detached (`ip link set dev IF xdp off`) or replaced by another tool's
        forwards nothing of ours, and status went on saying attached: logged once and shown NOT ATTACHED until it
        runs ours again (`hdslb-ctl reload --datapath` attaches it, refusing another tool's program)."""
        from hdslb.fastpath import xdp_pass

        fp = self.fp
        if name not in self.xdp_modes or self._swapping:
            return
        try:
            _mode, prog = await asyncio.get_running_loop().run_in_executor(None, xdp_pass.query, name)
        except Exception:  # (gone meanwhile: the next look says so; netlink refused: the next look asks again)
            return
        if self._swapping or self.fp is not fp:  # a datapath reload swapped programs meanwhile: look again
            return
        if prog == fp.prog_id():
            if self.ifaces_lost.pop(name, None) is not None:
                log.info("%s runs hdslbd's XDP program again", name)
            return
        if name not in self.ifaces_lost:
            log.error("%s no longer runs hdslbd's XDP program (%s): nothing is balanced there; `hdslb-ctl reload "
                      "--datapath` attaches it again", name,
                      f"program id {prog} runs there now" if prog else "it was detached")
        self.ifaces_lost[name] = prog or 0

    def request_shutdown(self, detach: bool) -> None:
        self._detach_on_stop = detach
        # Reply first, then stop: the caller gets its answer before the socket disappears.
        asyncio.get_running_loop().call_later(0.05, self._stop.set)

    def dispatch(self, op: str, args: dict):
        """Run a control op; after any op that may change the model, save it for a restarted daemon."""
        if not commands.is_read_only(op):
            self._apply_verdicts()  # verdicts received before the change apply before it, as they came
        if op == "batch" and isinstance(args, dict) and isinstance(args.get("ops"), list) and \
                len(args["ops"]) >= BIG_BATCH_OPS:
            # A bulk load (ipvsadm -R, dpip -b, PATCH /v2/vs): CPython ran a full collection each time the objects
            # it made grew by a quarter (1.1 s of an ipvsadm -R of 10k x 10); what it made is frozen right after.
            with collections_paused():
                result = commands.dispatch(self, op, args)
            self.heap.grew(model_size(self.bal))
        else:
            result = commands.dispatch(self, op, args)
        if not commands.is_read_only(op):
            added, self.bal.added_addrs = self.bal.added_addrs, []
            if added and self.health is not None:
                self._hold_down(addrs=set(added))  # ipvsadm -a of a server its check holds down: down
            self._state_changed()
        return result

    def _state_changed(self) -> None:
        """Save the model: at once for a lone change, coalesced inside a burst.

        A bulk load (ipvsadm -R, 100k routes) would otherwise serialise the whole model once per line. A daemon
        killed mid-burst can miss the changes of the last max(SAVE_COALESCE_S, SAVE_SPACING × one save) seconds.
        """
        self._last_change = now = time.monotonic()
        if self._heap_handle is not None and now - self._heap_grown_at >= HEAP_GROWTH_CHECK_S:  # inside a burst
            self._heap_grown_at = now
            self.heap.grew(model_size(self.bal))
        if self._save_handle is not None:
            return
        # A big model costs more to save: wait long enough that saving stays a small share of a burst.
        delay = max(SAVE_COALESCE_S, SAVE_SPACING * self._save_cost)
        if time.monotonic() - self._last_save > delay:
            self._save_state()
        else:
            self._save_handle = asyncio.get_running_loop().call_later(delay, self._deferred_save)

    def _deferred_save(self) -> None:
        self._save_handle = None
        self._save_state()

    def _prune_to_model(self) -> None:
        """After adopting pinned maps with a saved model: drop the services, real servers, owned addresses and
        routes the model does not have. A crash inside the save coalescing window (a burst of changes) leaves maps
        newer than the saved model; the restarted daemon says, and now does, what the model says (established
        flows keep going)."""
        svcs = list(self.bal.services.values())
        keep_keys = {self.maps.svc_key_bytes(_proto(v.proto), v.addr, v.port) for v in svcs if v.match is None}
        pruned = self.maps.prune_services(keep_keys, {v.svc_id for v in svcs},
                                          {d.slot for v in svcs for d in v.dests.values()})
        b = self.bal
        local = ({ad.addr for ad in b.addrs} | {la.addr for v in svcs for la in v.laddrs}
                 | {v.addr for v in svcs if v.own_vip} | set(b.retired_laddrs))
        pruned.update(self.maps.prune_addresses(local, {r.net for r in b.routes}))
        if any(pruned.values()):
            log.warning("pinned maps held changes the saved model missed (a crash before they were saved, or a save "
                        "that failed): "
                        "removed %d services, %d tables, %d real servers, %d local addresses and %d routes",
                        pruned["services"], pruned["tables"], pruned["dests"], pruned["addresses"],
                        pruned["routes"])

    def _lock_files(self) -> list[tuple[str, str, str]]:
        """(lock file, what it guards, the guarded path) for this instance's pins and state file."""
        def name(kind, path):
            return os.path.join(LOCK_DIR, f"{kind}{os.path.realpath(path).replace('/', '%')}.lock")

        return [(name("pins", self.pin_dir), "the pinned maps in", self.pin_dir),
                (name("state", self.settings.state_file), "the state file", self.settings.state_file)]

    def _take_locks(self) -> None:
        """Hold this instance's locks until the process ends; refuse (EBUSY, naming the holder) when another
        hdslbd holds one."""
        import fcntl

        self._locks = getattr(self, "_locks", [])
        os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
        for path, what, guarded in self._lock_files():
            if any(p == path for _, p in self._locks):
                continue
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                _flock_unless_live(fd)
                if os.fstat(fd).st_ino != os.stat(path).st_ino:  # unlinked by a daemon stopping meanwhile: again
                    os.close(fd)
                    return self._take_locks()
            except FileNotFoundError:
                os.close(fd)
                return self._take_locks()
            except BlockingIOError:
                holder = os.pread(fd, 16, 0).decode(errors="replace").strip()
                os.close(fd)
                self._release_locks()  # the ones this daemon took (never the one another holds)
                who = f"hdslbd pid {holder}" if holder.isdigit() else "another hdslbd"
                raise HdslbError(errno.EBUSY, (
                    f"{who} already runs with {what} {guarded} (lock {path}); nothing was changed. Two daemons on "
                    f"one instance would fight over its maps: stop that one first (hdslb-ctl down detaches, "
                    f"SIGTERM leaves the fast path forwarding), or give this one its own --ctl-socket/--instance"))
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._locks.append((fd, path))

    def _release_locks(self, unlink: bool = True) -> None:
        for fd, path in getattr(self, "_locks", []):
            if unlink:
                try:
                    os.unlink(path)  # while still held: no other daemon can hold this inode's lock meanwhile
                except OSError:
                    pass
            os.close(fd)
        self._locks = []

    def _remove_stale_saves(self) -> None:
        """Temp files of saves cut short (a daemon killed between writing and renaming, <state>.<pid>.tmp): with
        the state file's lock held no other daemon writes one, so every one left is stale."""
        path = self.settings.state_file
        d, base = os.path.split(path)
        pat = re.compile(re.escape(base) + r"\.\d+\.tmp")
        try:
            names = os.listdir(d or ".")
        except OSError:
            return
        for n in names:
            if pat.fullmatch(n):
                try:
                    os.unlink(os.path.join(d, n))
                    log.info("removed %s, left by a save that was cut short", os.path.join(d, n))
                except OSError as e:
                    log.warning("cannot remove %s: %s", os.path.join(d, n), e.strerror or e)

    def _read_state(self) -> dict | None:
        """The model saved by the previous daemon, checked whole; None when there is none to adopt.

        A state file that cannot be used while pinned maps exist is refused, naming the file: starting empty would
        throw away every service and flow the pinned program is forwarding (it keeps forwarding until the operator
        chooses), and adopting the maps without their model would leave entries nothing knows. Without pins the
        file describes nothing that runs, and a start from scratch is what is left anyway."""
        import msgpack

        path = self.settings.state_file
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            if self.fp is None or not self.fp.has_pins():
                return None
            return self._unusable_state("does not exist", "start with the --state-dir that was used before (or "
                                                          "put back a copy of the file)")
        except OSError as e:
            return self._unusable_state(f"cannot be read: {e.strerror or e}")
        if not raw:
            return self._unusable_state("is empty")
        try:
            snap = msgpack.unpackb(raw, raw=False)
        except Exception as e:  # msgpack raises several unrelated types; a torn or foreign file
            return self._unusable_state(f"is not a saved model ({len(raw)} bytes, undecodable: {e or type(e).__name__})")
        if not isinstance(snap, dict):
            return self._unusable_state(f"is not a saved model (a {type(snap).__name__}, not a map)")
        version, reads = snap.get("version"), 1  # what balancer.snapshot writes and restore reads
        if version != reads:
            if isinstance(version, int) and version > reads:
                return self._unusable_state(f"was written by a newer hdslbd (state version {version}; this one "
                                            f"reads {reads})", "start that newer hdslbd again")
            return self._unusable_state(f"has an unknown state version {version!r} (this hdslbd reads {reads})")

        class AnyIfaces(dict):  # the model's shape is checked here; the real restore names a missing interface
            def __contains__(self, name) -> bool:
                return isinstance(name, str)

            def __missing__(self, name):
                return Iface(name=name, ifindex=0, mac=b"\0" * 6, mtu=1500)

        try:  # the whole model, into a scratch balancer: a half-applied restore is what this must never cause
            scratch = Balancer(_NullDataPath(), AnyIfaces(), max_services=self.sizes.max_services,
                               max_dests=self.sizes.max_dests, max_hash_cells=self.sizes.max_hash_cells)
            restore(scratch, snap, tables=False)
            checks = snap.get("checks", [])
            if not isinstance(checks, list) or not all(isinstance(c, dict) and "key" in c for c in checks):
                raise ValueError("its checks are not a list of checks")
            _check_saved_timeouts(snap.get("timeouts", {}))  # absent in files written before ipvsadm --set
        except Exception as e:
            why = e.message if isinstance(e, HdslbError) else f"{type(e).__name__}: {e}"
            return self._unusable_state(f"does not hold a valid model ({why})")
        return snap

    def _check_snapshot_sizes(self, snap: dict) -> None:
        """The saved model's service ids, real-server slots and hash-table cells index maps this start sizes
        (--max-services, --max-dests, --max-hash-cells): a start whose sizes leave some of them out is refused
        before anything is loaded, naming the option and the least it can be."""
        need = {"--max-services": 0, "--max-dests": 0, "--max-hash-cells": 0}
        for v in snap["services"]:
            need["--max-services"] = max(need["--max-services"], v["svc_id"] + 1)
            for d in v["dests"]:
                need["--max-dests"] = max(need["--max-dests"], d["slot"] + 1)
            if v.get("hcells"):
                need["--max-hash-cells"] = max(need["--max-hash-cells"], v["hcells"][0] + v["hcells"][1])
        have = {"--max-services": self.sizes.max_services, "--max-dests": self.sizes.max_dests,
                "--max-hash-cells": self.sizes.max_hash_cells}
        short = [f"{opt} {have[opt]} (it uses up to {need[opt]}: {opt} {need[opt]} at least)"
                 for opt in need if need[opt] > have[opt]]
        if short:
            raise HdslbError(errno.EINVAL, (
                f"the saved model {self.settings.state_file} does not fit {'; '.join(short)}; nothing was changed. "
                f"Start with sizes that hold it, remove services or real servers first, or start with --fresh to "
                f"discard the saved state"))

    def _check_snapshot_ifaces(self, snap: dict, ifaces: dict) -> None:
        """The saved model's entries on an interface this start does not name (a restart with fewer interfaces)
        cannot be restored: refused before anything is loaded, naming the interfaces and what uses them."""
        uses: dict[str, set] = {}
        for v in snap["services"]:
            for la in v["laddrs"]:
                uses.setdefault(la["ifname"], set()).add("local addresses")
            for k in ("iif", "oif"):
                if v.get("match") and v["match"].get(k):
                    uses.setdefault(v["match"][k], set()).add("SNAT rules")
        for kind, what in (("addrs", "addresses"), ("routes", "routes"), ("neighs", "neighbours")):
            for e in snap[kind]:
                uses.setdefault(e["ifname"], set()).add(what)
        missing = {n: w for n, w in uses.items() if n not in ifaces}
        if missing:
            names = ", ".join(f"{n} ({', '.join(sorted(w))})" for n, w in sorted(missing.items()))
            raise HdslbError(errno.ENODEV, (
                f"the saved model {self.settings.state_file} has entries on interfaces this start does not name: "
                f"{names}; nothing was changed. Start with them too ({' '.join([*ifaces, *sorted(missing)])}), or "
                f"remove those entries first with the interfaces named, or start with --fresh to discard the "
                f"saved state"))

    def _unusable_state(self, why: str, first_choice: str = "put back a good copy of it") -> None:
        path = self.settings.state_file
        if self.fp is None or not self.fp.has_pins():
            log.warning("ignoring state file %s, which %s; no pinned maps to adopt, starting empty", path, why)
            return None
        raise HdslbError(errno.EINVAL, (
            f"state file {path} {why}, while the pinned maps in {self.pin_dir} still forward with the model it held; "
            f"adopting them without it would lose track of their services and flows, so nothing was changed (the "
            f"attached program keeps forwarding). Either {first_choice}, or start with --fresh to discard the "
            f"pinned state (services, connections, counters) and start empty."))

    def _save_retry_soon(self) -> None:
        """A failed save is tried again every SAVE_RETRY_S, not only at the next change: space freed meanwhile
        must reach the file before a restart reads it."""
        if getattr(self, "_save_retry", None) is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test calling it directly)
            return

        def retry():
            self._save_retry = None
            if self.save_error is not None:
                self._save_state()

        self._save_retry = loop.call_later(SAVE_RETRY_S, retry)

    def _save_state(self) -> None:
        """Write the model for a restarted daemon: whole or not at all (temp file, then rename over the old one).

        No fsync: the file only matters while the pins exist, and neither survives a reboot (bpffs, /run); a
        crashed daemon loses nothing that reached the page cache. A failed write (full or read-only file system)
        leaves the previous file in place, is logged, and does not fail the change that triggered it: forwarding
        does not depend on the file, only a restart does."""
        path = self.settings.state_file
        t0 = time.monotonic()
        tmp = f"{path}.{os.getpid()}.tmp"
        extra = {"checks": list(self.ctl_checks.values())}
        if self.timeout_overrides:  # ipvsadm --set values; without them the file is as before --set existed
            extra["timeouts"] = self.timeout_overrides
        data = pack_snapshot(self.bal, extra)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # readers see the old or the new model, never half
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if self.save_error is None:
                log.error("cannot save the model to %s: %s; a restart now would adopt the pinned maps with the last "
                          "model saved and drop what it lacks (said once; retried every %g s; a line follows when "
                          "saving works again; `hdslb-ctl status` shows it meanwhile)", path, e.strerror or e,
                          SAVE_RETRY_S)
            self.save_error = f"{e.strerror or e} (since {time.strftime('%H:%M:%S')})" \
                if self.save_error is None else self.save_error
            self._save_retry_soon()
            return
        if self.save_error is not None:
            log.warning("model saved to %s again", path)
            self.save_error = None
        self._last_save = time.monotonic()
        self._save_cost = self._last_save - t0
        self._heap_soon()

    def _heap_soon(self) -> None:
        """Freeze the model again (hdslb.heap) if it moved a lot, once no change has come for HEAP_QUIET_S (a burst
        that keeps growing it is frozen as it goes, without a collection: see _state_changed)."""
        if not self.heap.enabled or self._heap_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a tool or a test saving the model): no burst to wait out
            self.heap.maybe_settle(model_size(self.bal))
            return
        self._heap_handle = loop.call_later(HEAP_QUIET_S, self._heap_check)

    def _heap_check(self) -> None:
        self._heap_handle = None
        quiet = time.monotonic() - self._last_change
        if quiet < HEAP_QUIET_S:  # the burst goes on
            self._heap_handle = asyncio.get_running_loop().call_later(HEAP_QUIET_S - quiet, self._heap_check)
            return
        self.heap.maybe_settle(model_size(self.bal))

    async def reload_datapath(self) -> dict:
        """Compile the program again and swap it in atomically; maps (connections included) are kept."""
        from hdslb.fastpath.loader import FastPath
        from hdslb.fastpath.maps import Maps

        loop = asyncio.get_running_loop()
        new = FastPath(self.pin_dir, self.sizes)
        new.allow_resize = False  # the sizes are the running ones; maps made anew would need the model written
        await loop.run_in_executor(None, new.load, True)
        self._swapping = True
        try:
            for name, mode in self.xdp_modes.items():
                await loop.run_in_executor(None, new.attach, name, mode)
        except Exception as e:  # (another program on an interface: named) the running program goes on everywhere
            for name in list(new.attached):
                await loop.run_in_executor(None, self.fp.attach, name, self.xdp_modes[name])
            new.attached.clear()
            new.close()
            if isinstance(e, XdpAttachError):
                raise HdslbError(e.code, str(e)) from None
            raise
        finally:
            self._swapping = False
        old, self.fp = self.fp, new
        self.maps = Maps(new)
        kni = self.bal.dp.kni
        self.bal.dp = self._datapath(self.maps)
        self.bal.dp.kni = kni
        old.attached.clear()  # the interfaces now run the new program; closing the old must not detach it
        if self.slow is not None:
            self.slow.register()  # the new program has its own XSKMAP
        old.close()
        if new.conn_moves:  # set-aside tables whose copy failed at the start: copied now
            await self._move_conns(loop, final=True)
        log.info("datapath reloaded: new program attached to %s", ", ".join(self.xdp_modes))
        return {"interfaces": dict(self.xdp_modes), "conn_entries": self.maps.conn_entries()}

    def slowpath_stats(self) -> dict:
        """The slow path's event counters (/metrics: hdslb_slowpath_frames_total), empty without one."""
        return dict(self.slow.stats()["counters"]) if self.slow is not None else {}

    def slowpath_neigh(self) -> dict:
        """The slow path's neighbour table and unresolved queues against their bounds (/metrics gauges)."""
        return dict(self.slow.stats()["neigh"]) if self.slow is not None else {}

    async def _move_conns(self, loop, final: bool) -> None:
        """Copy the connections of conn tables pinned with another kind or size into this start's (see
        FastPath.move_conns): before attaching, and once more after it. A failed copy is logged and the old
        tables stay pinned, so the next start copies them again."""
        t0 = time.monotonic()
        try:
            r = await loop.run_in_executor(None, self.fp.move_conns, final)
        except OSError as e:
            log.error("could not copy the connections of the set-aside connection tables (%s): they stay pinned "
                      "and the next start copies them again", e)
            return
        log.info("connection tables: %d entries copied into the new %s tables %s (%d already there as new or "
                 "newer%s) in %.1f s%s", r.copied, self.sizes.conn_table,
                 "after attaching" if final else "before attaching", r.kept,
                 f", {r.dropped} oldest left out: the new tables are smaller" if r.dropped else "",
                 time.monotonic() - t0, "; the old tables are unpinned" if final else "")
        if r.dropped:
            log.warning("%d connection entries did not fit the smaller connection tables and were left out (the "
                        "oldest); their flows are scheduled anew or dropped as flows without an entry", r.dropped)

    def conn_table_entries(self) -> int:
        """Entries in the conn table. Counting reads the whole table (1.3 s at 1M connections, on the event
        loop): a count that took 50 ms or more is reused for 20 times its cost (5 s at most), so frequent
        callers (stats.get, /metrics) cannot stall the daemon; small tables are always counted afresh."""
        return sum(Daemon.conn_table_entries_by_family(self).values())

    def conn_table_entries_by_family(self) -> dict[int, int]:
        """conn_table_entries() per table (4: IPv4 flows, 6: IPv6 and NAT64 flows), cached the same way."""
        at, n, cost = self._entries_cache
        if n is not None and cost >= 0.05 and time.monotonic() - at < min(20 * cost, 5.0):
            return n
        t0 = time.monotonic()
        n = self.maps.conn_entries_by_family()
        t1 = time.monotonic()
        self._entries_cache = (t1, n, t1 - t0)
        return n

    def conn_table(self) -> dict:
        fam = self.conn_table_entries_by_family()
        c = self.maps.counters()
        # size: both tables (IPv4, IPv6 + NAT64) together
        return {"size": self.sizes.max_conns + self.sizes.conn6_entries(), "size4": self.sizes.max_conns,
                "size6": self.sizes.conn6_entries(), "kind": self.sizes.conn_table, "entries": sum(fam.values()),
                "entries4": fam.get(4, 0), "entries6": fam.get(6, 0),
                "expired": c["conn_expired"], "evicted": Daemon.evicted(self)}

    def evicted(self) -> int:
        """Entries the full conn tables' LRU evicted (idle flows it cut), since the tables were made: what flows
        inserted (two entries a flow, DR and TUNNEL one) less what is alive and what was removed (swept,
        reclaimed, replaced by a reused tuple), as proved by the latest count of the tables (Maps._evicted_bound:
        a lower bound). Never decreases while hdslbd runs, as /metrics' counter must not."""
        bound = self.maps.evicted_bound
        if bound is not None and bound > self._evicted:
            self._evicted = bound
        return self._evicted

    def _note_evictions(self) -> None:
        """After a sweep (which counted the tables): log when the LRU evicted entries since the last look, at most
        every EVICTION_LOG_S. The first look takes what earlier daemons' tables evicted as the base."""
        n = Daemon.evicted(self)
        if self.maps.evicted_bound is None:
            return
        if self._evicted_logged is None:
            self._evicted_logged = n
            if n:
                log.info("connection tables: their LRU evicted %d entries before this start", n)
            return
        now = time.monotonic()
        if n - self._evicted_logged < EVICTION_LOG_MIN or now - self._evicted_logged_at < EVICTION_LOG_S:
            return
        fam = self.maps.last_count or {}
        since = "since hdslbd started" if self._evicted_logged_at == float("-inf") else \
            f"in the last {now - self._evicted_logged_at:.0f} s"
        log.warning("connection table full: its LRU evicted %d entries %s (%d in all): the least recently used "
                    "flows, whose next packet finds no entry (TCP: dropped); in use: %d of %d IPv4 entries, %d of "
                    "%d IPv6. Size the tables for the "
                    "connections you carry: --max-conns / --max-conns6 (conn_pool_size / conn6_pool_size), "
                    "or --conn-table shared for more entries in the same memory; either takes a restart, which "
                    "copies the connections into the new tables", n - self._evicted_logged, since, n, fam.get(4, 0),
                    self.sizes.max_conns,
                    fam.get(6, 0), self.sizes.conn6_entries())
        self._evicted_logged, self._evicted_logged_at = n, now

    def idle_limits(self, unit=lambda seconds: seconds):
        """The idle timeouts as hdslb.fastpath.aging.Limits, converted by `unit` (seconds by default)."""
        from hdslb.fastpath import aging
        from hdslb.fastpath.abi import state_timeouts

        t = self.settings.timeouts
        return aging.Limits(by_state=tuple(unit(x) for x in state_timeouts(t)), udp=unit(t["udp"]),
                            close=unit(t["close"]))

    def timeout_for(self, c: dict) -> int:
        """Seconds a connection may stay idle (ipvsadm -Lnc's expire), by the rule the sweep applies."""
        return self.idle_limits().of(c["proto"], c["state"])

    def sweep(self) -> int:
        """Remove connections idle past their state's timeout, both directions together; returns entries removed.

        A flow's idle time is measured from the newest packet of either direction, so a half-closed transfer
        that still moves data in one direction is not cut. The table is read in batches into numpy columns
        (hdslb.fastpath.aging: which flows are dead is worked out for the whole table at once); the dead go to
        the kernel's hdslb_sweep, which re-checks every copy of each right before deleting it.
        """
        from hdslb.fastpath import aging

        clock = self.maps.clock
        now = clock.mono_to_jiffies(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        lim = Daemon.idle_limits(self, clock.seconds_to_jiffies)  # (tests pass stand-ins for self)
        cols = self.maps.conn_aging_columns()
        # A packet may have arrived since the scan: each flow goes only if none did (checked in the kernel,
        # entry by entry, right before the delete: Maps.remove_dead_requests / remove_dead_flows).
        if cols is not None:
            # UDP flows of a removed real server go whatever their idle time (LVS expire_nodest_conn): a client
            # that keeps sending on one tuple would otherwise be sent to it for good
            gone = cols.nodest_udp(lambda: Daemon.real_servers(self))
            removed = self.maps.remove_dead_requests(cols.sweep_requests(now, lim, gone))
        else:  # the columns' key hashing could not tell two keys apart: the per-entry reading
            dead = aging.expired_rows(self.maps.conn_aging_view(), now, lim)
            removed = self.maps.remove_dead_flows(dead) if dead else 0
        if removed:  # (hdslb_sweep counts them in conn_expired itself)
            self._conn_cache = (0.0, None)
            self._counts_cache = (0.0, None)
        if cols is not None:
            Daemon.keep_templates(self, cols, time.clock_gettime_ns(time.CLOCK_MONOTONIC))
            if getattr(getattr(self, "bal", None), "retired_laddrs", None):  # released on the loop (_aging)
                self._laddrs_in_use = cols.reply_daddrs()
        return removed

    def real_servers(self) -> list[tuple[int, bytes, bool]]:
        """(slot, address as 16 bytes, is a SNAT source) of every real server there is for the UDP sweep (LVS's
        expire_nodest_conn): drained ones and ones inhibit_on_failure keeps in at weight 0 included, but not one
        down by its health check without it, which keepalived would have removed (the model keeps it only to bring
        it back when its check passes). A server alpha holds down until its first checks pass has failed nothing:
        its flows go on (after a restart every server of an alpha service is such a one for a while, and a restart
        loses no flow). Read from the sweep's thread: the dicts are copied whole first (one C call each, atomic
        under the GIL)."""
        from hdslb.health.manager import ALPHA_PENDING

        out = []
        for s in list(self.bal.services.values()):
            for d in list(s.dests.values()):
                if d.health == "down" and not d.inhibited and d.reason != ALPHA_PENDING:
                    continue
                out.append((d.slot, d.addr.packed.ljust(16, b"\0"), s.match is not None))
        return out

    def keep_templates(self, cols, now_ns: int) -> int:
        """Renew the persistence templates whose client still has a live flow to the template's server; returns
        how many. LVS does not expire a template while it controls connections, so a client whose one long
        connection outlives -p keeps its server for the next one; the fast path renews a template only when a
        new connection uses it. A template is renewed (to -p from now) once less than half its timeout is left,
        or when it ran out but is still in the map, so each is written at most every -p/2 seconds; the templates
        are read at most every quarter of the shortest -p (a template never runs out between two looks)."""
        import numpy as np

        from hdslb.fastpath import aging

        svcs = {s.svc_id: s for s in list(self.bal.services.values()) if s.persistent}
        if not svcs or not len(cols):
            return 0
        # When the next look is due is worked out from the -p values there are now, not stored from those of the
        # last look: after -p 60 became -p 8 (or a service with a shorter -p came) the next look was still 15 s
        # away, and a template of the new 8 s ran out under its client's live connection (its next connection
        # scheduled afresh, maybe elsewhere) before the sweep renewed it.
        if now_ns - getattr(self, "_templates_looked_ns", -1 << 63) < min(s.persistent for s in svcs.values()) \
                * 10**9 // 4:
            return 0
        self._templates_looked_ns = now_ns
        temps = [t for t in self.maps.persists() if t["svc_id"] in svcs
                 and t["expires_ns"] - now_ns < svcs[t["svc_id"]].persistent * 10**9 // 2]
        if not temps:
            return 0
        # each service's real servers once (walked per template, a full table of 65,536 over 100 real servers was
        # 6.5M steps of this thread at every look, holding the GIL from the event loop)
        plen_of = {d.slot: svcs[sid].persist_plen for sid in {t["svc_id"] for t in temps}
                   for d in list(svcs[sid].dests.values())}

        def record(addr16, slot, af):  # (client network, server slot, family) as 24 bytes, one row each
            rec = np.zeros((len(slot), 24), np.uint8)
            rec[:, :16] = addr16
            rec[:, 16:20] = np.asarray(slot, "<u4").view(np.uint8).reshape(-1, 4)
            rec[:, 20] = af
            return rec.view(np.dtype((np.void, 24)))[:, 0]

        rows = np.flatnonzero(~cols.out & np.isin(cols.slot, list(plen_of)))
        if not len(rows):
            return 0
        addr = cols.keys[rows, aging.K_SADDR:aging.K_SADDR + 16].copy()
        ks = np.array(sorted(plen_of), np.uint32)
        plens = np.array([plen_of[int(k)] for k in ks])[np.searchsorted(ks, cols.slot[rows])]
        for plen in np.unique(plens).tolist():  # the template's -M mask: the first plen bits
            addr[plens == plen] &= np.packbits(np.arange(128) < plen)
        live = record(addr, cols.slot[rows], cols.keys[rows, aging.K_AF])
        taddr = np.frombuffer(b"".join(t["addr"].packed.ljust(16, b"\0") for t in temps), np.uint8)
        want = record(taddr.reshape(-1, 16), [t["dest_slot"] for t in temps], [t["af"] for t in temps])
        keep = [t for t, hit in zip(temps, np.isin(want, live)) if hit]
        for t in keep:
            t["expires_ns"] = now_ns + svcs[t["svc_id"]].persistent * 10**9
        return self.maps.renew_persists(keep) if keep else 0

    async def _aging(self) -> None:
        """Sweep every aging_interval, but never more than SWEEP_CPU_SHARE of a CPU: a big table is swept
        less often (entries then live up to one sweep longer than their timeout)."""
        loop = asyncio.get_running_loop()
        pause = self.settings.aging_interval
        while True:
            await asyncio.sleep(pause)
            t0 = time.monotonic()
            try:
                await loop.run_in_executor(None, self.sweep)
                self._note_evictions()
                self._release_laddrs()
            except Exception:
                log.exception("connection aging sweep failed")
            pause = max(self.settings.aging_interval, (time.monotonic() - t0) / SWEEP_CPU_SHARE)

    def _release_laddrs(self) -> None:
        """Local addresses no service has any more stop being ours once the last sweep found no flow using them."""
        in_use, self._laddrs_in_use = self._laddrs_in_use, None
        if in_use is None or not self.bal.retired_laddrs:
            return
        gone = self.bal.release_laddrs({a for a in self.bal.retired_laddrs if a.packed.ljust(16, b"\0") in in_use})
        if gone:
            log.info("local addresses no service has and no connection uses any more are no longer ours: %s",
                     ", ".join(map(str, gone)))
            self._state_changed()

    # --- the configuration file ---------------------------------------------------------------------
    def _default_ifname(self, addr):
        if addr is not None:
            r = self.bal.route_lookup(addr)
            if r is not None:
                return r.ifname
        return next(iter(self.bal.ifaces), None)

    def apply_config(self, cfg) -> list[str]:
        """Bring the config-owned services to what `cfg` declares; all or nothing. Returns the ops applied."""
        from hdslb.config.apply import desired, laddr_warnings, op_line, plan, refusal, run_tagged

        self._apply_verdicts()  # the verdicts received so far belong to the model this config is planned against
        vips_before = self.bal.owned_vips()
        want = desired(cfg, self._default_ifname)
        # against what the file applied last wanted (none at a start): what was set by hand since stands where the
        # file did not change it (apply.plan)
        ops = plan(self.bal, want, self.bal.config_owned, self.want if self.config is not None else None)
        for op, args in ops:
            if op == "service.add":
                args["own_vip"] = True
        where = {w.key: w.where for w in want.values()}

        def refused(e: HdslbError, i, bal) -> HdslbError:
            return HdslbError(e.errno, f"{refusal(e, i, ops, where, cfg.source, bal)}; nothing was applied")

        quiescent = cfg.ipvs_defs.conn.expire_quiescent_template
        if commands.only_creates(self.bal, ops):
            # Only new services (a first load, or a reload that only adds): applied at once and, if anything is
            # refused, in an op or in building a table at the end, undone by removing what was added (no dry run:
            # half of a first load's hold of the event loop). Nothing of them was published or announced by then.
            try:
                commands.run_batch(self, ops, undo_new=True)
            except HdslbError as e:
                raise refused(e, commands.refused_index(e), self.bal) from None
            # after the batch: the flag rewrites the servers it concerns, the new ones included; before it, a
            # refused batch would have left it (and templates it drops) changed
            self.bal.set_expire_quiescent_template(quiescent)
        else:
            # The dry run's model is an overlay (Balancer.scratch: a service is copied when an op first touches
            # it), as a batch's: a full copy (snapshot + restore) cost 0.13 s of the event loop at 4,000 x 10.
            scratch = self.bal.scratch(routes=False, neighs=False)
            scratch.expire_quiescent_template = quiescent
            sctx = commands.ScratchCtx(scratch)
            # Both runs are batches (Balancer.deferred): each touched service's table is built once, at the end,
            # from its final real servers, not once per op (an mh or conhash table is 64k entries: 400 real
            # servers cost 800 builds, 25 s). A table that cannot be built at the end refuses the dry run there,
            # its error tagged with the last op that touched that service, which names the service's line.
            try:
                run_tagged(scratch, sctx, ops)
            except HdslbError as e:
                raise refused(e, getattr(e, "tag", None), scratch) from None
            self.bal.set_expire_quiescent_template(quiescent)
            dynamic = self._checker_weights(ops)
            with self.bal.deferred():  # validated above: the tables built at its end can be built
                for op, args in ops:
                    commands.dispatch(self, op, args)
                for a, weight in dynamic:
                    self.bal.dest_health(a, True, weight, "")
        self.bal.config_owned = set(want)
        self.bal.own_config_vips(want)  # (a service made again by ipvsadm and adopted here owned no VIP)
        self._announce_new(vips_before, self.bal.owned_vips())
        self.config, self.want = cfg, want
        self.config_warnings = self._warn_unrouted(want)
        for line in laddr_warnings(want):
            log.warning("%s", line)
            self.config_warnings.append(line)
        if self.start_config is None:
            self.start_config = cfg
        self._save_state()
        if ops:
            log.info("config %s applied: %d changes", cfg.source, len(ops))
        return [op_line(op, args) for op, args in ops]

    def _checker_weights(self, ops: list) -> list[tuple[dict, int]]:
        """The real servers a config's dest.edit ops change that are up at a weight their misc_dynamic check set,
        with that weight. dest.edit takes the weight it is given as the weight (as ipvsadm -e does), so a reload
        that changed such a server's configured weight, thresholds or lb_kind put it back at the configured weight,
        a script's 0 included (back in rotation), and for good: the checker, having told that weight once, tells
        it again only when it changes. keepalived's reload carries the server's effective weight over
        (ipwrapper.c clear_diff_rs), so the checker's weight is put back in the same batch."""
        out = []
        for op, args in ops:
            if op != "dest.edit":
                continue
            try:
                svc = self.bal.get_service(args["svc"])
                d = svc.dests.get(self.bal._dest_key(svc, args))
            except HdslbError:
                continue
            if d is not None and d.health == "up" and d.health_weight is not None:
                out.append(({"svc": args["svc"], "addr": args["addr"], "port": args["port"]}, d.health_weight))
        return out

    def _announce_new(self, before, owned: dict) -> None:
        """A gratuitous ARP or an unsolicited NA for each address of owned ({address: interface, None for every
        one}) not in before, on each interface it is answered on, as DPVS does when it takes an address and
        keepalived when it takes a VIP: a router or client whose cache still holds it at the host that had it
        before (another balancer, the old box) moves to us at once, not after its entry's timeout and probes.
        The VIPs a config makes ours (apply_config) and a restored model's addresses (start) come here; local
        addresses and dpip addresses added at run time are announced by their own adds."""
        for addr, ifname in owned.items():
            if addr in before:
                continue
            for name in ([ifname] if ifname is not None else list(self.bal.ifaces)):
                self.announce(str(addr), name)

    def _warn_unrouted(self, want: dict) -> list[str]:
        """Name the file's real servers that have no route: the file declares no routes (they are dpip's, kept in the
        saved model), and the fast path sends a new flow only where a dpip route leads (drop_no_route), while the
        health checks, leaving through the kernel, pass. A file started alone used to forward nothing, silently."""
        import ipaddress

        missing: dict = {}
        seen: set = set()
        self.bal.index_routes()  # (a probe per prefix length in use, not an ip_network each: 40k servers, 0.15 s)
        for w in want.values():
            if w.match is not None:  # SNAT: its real servers are source addresses
                continue
            for addr, _ in w.dests:
                if addr in seen:
                    continue
                seen.add(addr)
                if self.bal.route_lookup(ipaddress.ip_address(addr)) is None:
                    missing[addr] = w.where
        if not missing:
            return []
        (first, where), n = next(iter(missing.items())), len(missing)
        line = (f"{n} real server{' has' if n == 1 else 's have'} no route ({first} of virtual_server at {where}"
                f"{f', and {n - 1} more' if n > 1 else ''}): new flows to {'it' if n == 1 else 'them'} are dropped "
                f"(drop_no_route) until one leads there, e.g. `dpip route add NET/LEN dev IF` (or `dpip addr add "
                f"ADDR/LEN dev IF`, whose net route covers the subnet); routes are kept across restarts")
        log.warning("%s", line)
        return [line]

    async def reload_config(self, text: str | None = None) -> dict:
        """Reload: parse the file (or `text`), apply the difference, report <init> changes needing a restart.

        With the cyclic collector paused (hdslb.heap.collections_paused): a config of 4,000 virtual servers x 10
        real servers is over a million objects, and CPython walked them again each time they grew by a quarter
        (most of a reload's time in bench.config_load); what the reload made is frozen right after it."""
        # One reload at a time, applied in the order asked: the file is parsed in a worker thread, and a posted text
        # that parsed faster must not be applied before (and then under) the one posted before it.
        async with self._reload_lock:
            with collections_paused():
                out = await self._reload_config(text)
            self.heap.grew(model_size(self.bal))
        return out

    async def _reload_config(self, text: str | None) -> dict:
        from hdslb.config import ConfigError, diff, load, loads
        from hdslb.config.diff import since_start

        path = self.settings.config_file
        if text is None and not path:
            raise HdslbError(errno.ENOENT, "hdslbd was started without -f: there is no config file to reload")
        from hdslb.config.apply import inactive_notices, not_acted_on

        running = self.config  # (changed only by a reload, and reloads take turns)
        start = self.start_config  # (set by the first config applied, before any reload)

        def parse():
            # Text sent over the API (or the control socket) is not a file root wrote: it may not include files or
            # name programs to run (loads posted=True refuses them with EPERM, naming each line).
            cfg = loads(text, name=POSTED_CONFIG_NAME, posted=True, config_id=self.settings.config_id) \
                if text is not None else load(path, self.settings.config_id)
            # What only compares configs is worked out here too: ~0.45 s of the loop at 4,000 x 10.
            # What acts only from the next start is told against what this start runs, not against the last file
            # accepted: a reload that puts back the running <init> values then needs no restart.
            return (cfg, (diff(running, cfg) if running is not None else None),
                    (since_start(start, cfg) if start is not None else None), inactive_notices(cfg))

        try:
            # In a worker thread: 4,000 virtual servers of 10 real servers parse in ~5 s, the event loop (health
            # checks, the slow path, control calls) served meanwhile. What is read is applied on the loop below.
            cfg, changes, at_start, notices = await asyncio.get_running_loop().run_in_executor(None, parse)
        except ConfigError as e:
            # every error the file has, as check prints them (keepalived logs each): the first as ever, then a line
            # each (a reload showed only the first, so a file with three typos took three reloads to mend)
            more = "".join(f"\n{x}" for x in e.errors[1:])
            err = HdslbError(e.errno, f"{e}; nothing was applied{more}")
            err.keyword, err.errors = e.keyword, e.errors  # the REST reply names the keyword and every error
            raise err from None
        except OSError as e:
            raise HdslbError(e.errno or errno.EIO, f"cannot read {path}: {e.strerror}") from None
        if text is not None:
            self._refuse_posted_security_changes(cfg)
        init = at_start.init_changed if at_start else ()
        restart = [_option_line(c) for c in init if not not_acted_on(c.path)]
        idle_init = [f"{_option_line(c)}: accepted, not acted on: {not_acted_on(c.path)}"
                     for c in init if not_acted_on(c.path)]
        live, idle, _ = self._sort_live_options(changes.options_changed if changes else (), cfg)
        _, _, later = self._sort_live_options(at_start.options_changed if at_start else (), cfg)
        restart += later
        idle = idle_init + idle
        new_log = self._open_log_file(cfg) if any(c.path == "global_defs.log_file" for c in live) else None
        try:
            applied = self.apply_config(cfg)
        except BaseException:
            if new_log is not None:
                new_log.close()
            raise
        applied += self._apply_live_options(cfg, live, new_log)
        for n in notices:
            log.info("config: %s", n)
        await self._start_health()
        out = {"applied": applied, "needs_restart": restart, "not_acted_on": idle,
               "warnings": list(self.config_warnings)}
        # GET /v2/config and config.get show what runs: the posted text until the file is read again.
        self.config_text_override = text
        if text is not None:
            back = f"the file {path}" if path else "no configuration (hdslbd was started without -f)"
            out["note"] = (f"the posted configuration runs but was not written to disk: a reload from the file "
                           f"(SIGHUP, systemctl reload, hdslb-ctl reload) or a restart goes back to {back}")
        return out

    # Options a reload applies at once (the rest of the *_defs options that act are read at start only, and a
    # change of one is reported in needs_restart). keepalived and DPVS also reload non-<init> options live.
    LIVE_OPTIONS = ("global_defs.log_level", "global_defs.log_file", "global_defs.script_user",
                    "global_defs.enable_script_security", "ipvs_defs.conn.expire_quiescent_template",
                    "ipvs_defs.tcp.timeout.syn_recv", "ipvs_defs.tcp.timeout.established",
                    "ipvs_defs.tcp.timeout.fin_wait", "ipvs_defs.tcp.timeout.close", "ipvs_defs.udp.timeout.normal",
                    "global_defs.lvs_timeouts")

    def _sort_live_options(self, changes, cfg) -> tuple[list, list[str], list[str]]:
        """Changed options that are not <init>: (applied now, lines for those accepted but not acted on, lines
        for those that act only from the next start)."""
        from hdslb.config.apply import not_acted_on

        live, idle, later = [], [], []
        for c in changes:
            st = cfg.settings.get(c.path) or self.config.settings.get(c.path)
            why = not_acted_on(c.path)
            if st is not None and not st.applies:
                why = "it means nothing under XDP (the notice logged for it says why)"
            if c.path == "global_defs.log_level" and self.settings.extra.get("log_level_from_cli"):
                why = "hdslbd --log-level on the command line wins over the file"
            if why is not None:
                idle.append(f"{_option_line(c)}: accepted, not acted on: {why}")
            elif c.path in self.LIVE_OPTIONS:
                live.append(c)
            else:
                later.append(_option_line(c))
        return live, idle, later

    def _open_log_file(self, cfg):
        """The handler for a changed log_file, opened before anything is applied: a path that cannot be written
        refuses the reload whole."""
        path = cfg.global_defs.log_file
        if path is None:
            return logging.StreamHandler(sys.stderr)
        try:
            return log_file_handler(path)
        except OSError as e:
            raise HdslbError(e.errno or errno.EIO, f"{cfg.settings['global_defs.log_file'].where}: log_file: cannot "
                                                   f"open {path}: {e.strerror}; nothing was applied") from None

    def _apply_live_options(self, cfg, live, new_log) -> list[str]:
        """Act on the changed live options (after the services were applied); one line per option for the reply."""
        paths = {c.path for c in live}
        if any(p.startswith("ipvs_defs.") and ".timeout." in p or p == "global_defs.lvs_timeouts" for p in paths):
            # The file changed timeouts: for those it changed, the file wins over an ipvsadm --set.
            if self._rebase_timeouts(timeouts_of(cfg), "in this reload"):
                self._save_state()
            self.apply_timeouts(self._running_timeouts())
        if "global_defs.log_level" in paths:
            self.settings.log_level = DPVS_LOG_LEVELS.get(cfg.global_defs.log_level.upper(), "info")
            logging.getLogger().setLevel(self.settings.log_level.upper())
        if new_log is not None:
            swap_log_handler(logging.getLogger(), new_log)
            self.settings.log_file = cfg.global_defs.log_file
        lines = [_option_line(c) for c in live]
        for line in lines:
            log.info("reload: %s", line)
        return lines

    # --- timeouts (ipvsadm --set / -L --timeout, timeouts.set/get, a reload's timeout options) ------------------
    def apply_timeouts(self, timeouts: dict) -> None:
        """Make `timeouts` (seconds by state name) the running ones: what the aging sweep and ipvsadm -Lnc read
        (settings.timeouts) and the fast path's cfg map, whose port reclaiming judges a flow dead by them. The one
        way a reload and ipvsadm --set change them."""
        self.settings.timeouts = dict(timeouts)
        set_idle = getattr(self.maps, "set_idle_timeouts", None)
        if set_idle is not None:
            set_idle(self.settings.timeouts)

    def _running_timeouts(self) -> dict:
        """The config's timeouts with the --set values over them."""
        return dict(self.file_timeouts, **{k: o["value"] for k, o in self.timeout_overrides.items()})

    def _rebase_timeouts(self, file_timeouts: dict, when: str) -> bool:
        """Take the config's timeouts; a --set value stands only while the config still says what it said when the
        value was set (a reload or restart whose file changes a timeout wins for that timeout, as keepalived's
        lvs_timeouts are set again on a reload). Returns whether a --set value was dropped."""
        self.file_timeouts = dict(file_timeouts)
        dropped = False
        for name, o in list(self.timeout_overrides.items()):
            if file_timeouts.get(name) != o["base"]:
                log.info("timeouts: the config changed %s from %s to %s %s: it replaces the %s s set at run time",
                         name, o["base"], file_timeouts.get(name), when, o["value"])
                del self.timeout_overrides[name]
                dropped = True
        return dropped

    def _adopt_saved_timeouts(self, snap: dict) -> None:
        """At start: the previous daemon's ipvsadm --set values run on, except where the config file changed that
        timeout since (then the file's value runs, as a reload would have made it). A state file written before
        --set existed has none."""
        self.timeout_overrides = {k: dict(v) for k, v in (snap.get("timeouts") or {}).items()}
        self._rebase_timeouts(self.file_timeouts, "since the value was set")
        self.settings.timeouts = self._running_timeouts()

    def timeouts(self) -> dict:
        """timeouts.get: LVS's three (ipvsadm -L --timeout), every state's, the config's, and what --set holds."""
        t = self.settings.timeouts
        return {**{lvs: t[state] for lvs, state in LVS_TIMEOUTS.items()}, "states": dict(t),
                "config": dict(self.file_timeouts),
                "set": {state: o["value"] for state, o in self.timeout_overrides.items()}}

    def set_timeouts(self, by_state: dict) -> dict:
        """timeouts.set, checked by the command: seconds by state name, each non-zero. Applied as a reload applies
        timeouts, and kept in the state file (a restart runs them on; see _rebase_timeouts)."""
        for name, secs in by_state.items():
            base = self.file_timeouts[name]
            if secs == base:
                self.timeout_overrides.pop(name, None)  # the config's own value: nothing stands over it
            else:
                self.timeout_overrides[name] = {"value": secs, "base": base}
        self.apply_timeouts(self._running_timeouts())
        log.info("timeouts set: %s", ", ".join(f"{k} {v}" for k, v in by_state.items()))
        return self.timeouts()

    def _refuse_posted_security_changes(self, cfg) -> None:
        """A posted config may not change where the daemon writes its log or how it runs scripts: those are
        root's to decide, in the file on disk (a log file path is a file root appends to; script_user and
        enable_script_security guard the scripts that check.add and the file run)."""
        from hdslb.config.loader import POSTED_HINT

        gd = cfg.global_defs
        cur = self.config.global_defs if self.config is not None else None
        for kw in ("log_file", "script_user", "enable_script_security"):
            want, have = getattr(gd, kw), getattr(cur, kw) if cur is not None else None
            if bool(want) == bool(have) and (not want or want == have):
                continue
            st = cfg.settings.get(f"global_defs.{kw}")
            where = f"{st.where}: " if st is not None else f"{POSTED_CONFIG_NAME}: "
            was = f"{have!r}" if have not in (None, False) else "unset"
            raise HdslbError(errno.EPERM, f"{where}{kw}: differs from the running configuration's ({was}): "
                                          f"{POSTED_HINT}; nothing was applied")

    async def _reload_logged(self) -> None:
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            r = await self.reload_config()
            log.info("reload: %d changes%s", len(r["applied"]),
                     f"; needs restart: {', '.join(r['needs_restart'])}" if r["needs_restart"] else "")
        except HdslbError as e:
            for line in e.message.splitlines():  # (a refused file: one line per error)
                log.error("reload refused: %s", line)
        except Exception:  # a bug, not a refusal: said where the operator looks (the task's exception was never read)
            log.exception("reload failed (a bug, not a refusal: please report it); check what runs with ipvsadm -Ln")
        finally:
            sd_notify("READY=1")

    def config_text(self) -> str:
        override = getattr(self, "config_text_override", None)
        if override is not None:
            return override
        if not self.settings.config_file:
            return ""
        # The text the running config was read from, not the file as it is now: a reload the file's new text failed
        # (or an edit not reloaded yet) leaves the old config running, and GET /v2/config showed the new text as it.
        # As the loader read it (bytes, UTF-8), with a comment's stray non-UTF-8 bytes shown as U+FFFD.
        cfg = self.config
        if cfg is not None and cfg.text is not None and cfg.source == self.settings.config_file:
            return cfg.text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        with open(self.settings.config_file, encoding="utf-8", errors="replace") as f:
            return f.read()

    # --- health checks --------------------------------------------------------------------------
    def _health_pairs(self) -> list:
        from hdslb.config import loads
        from hdslb.health import pairs_of

        pairs = pairs_of(self.config.virtual_servers) if self.config else []
        for c in self.ctl_checks.values():
            pairs += pairs_of(loads(c["text"], name=f"check.add {c['key']}").virtual_servers)
        return pairs

    async def _start_health(self) -> None:
        """Start the checkers, or hand the current set to the running manager (state of kept servers stays)."""
        from hdslb.config.model import GlobalDefs
        from hdslb.health import HealthManager

        self.bal.added_addrs.clear()  # what a start or reload added: all of it is looked at below (_hold_down)
        pairs = self._health_pairs()
        gd = self.config.global_defs if self.config is not None else GlobalDefs("INFO", None, None, False)
        self._release_unchecked(pairs)
        if self.health is not None:
            # keepalived's global_defs script_user / enable_script_security, for every MISC_CHECK (a change
            # restarts the checkers it touches; their servers keep their state)
            self.health.set_script_policy(gd.script_user, gd.enable_script_security)
            self.health.update(pairs)
            self._hold_down()
            self._sync_sorry()
            return
        if not any(rs.checkers for _, rs in pairs) and not any(w.sorry for w in self.want.values()):
            self._sync_sorry()  # nothing to weigh: no sorry server belongs in
            return
        # The manager starts from what the pool holds (after a restart: the verdicts of the daemon before, which
        # restore() brought back), so a server taken out comes back when its checks pass and a sorry server in
        # goes when quorum is there: the first result that differs from the pool is a notice.
        self.health = HealthManager(self._on_health, self._on_quorum, script_user=gd.script_user,
                                    script_security=gd.enable_script_security, pool_state=self._pool_state,
                                    quorum_lost=self._quorum_lost)
        try:
            await self.health.start(pairs)
        finally:
            self._restored_up = ([], set())  # (servers added later, by a reload or ipvsadm, are alpha's again)
        # alpha's servers (the manager tells of them too), and a model saved before Dest.inhibited: the servers
        # inhibit_on_failure holds get it
        self._hold_down(start=True)
        self._sync_sorry()

    def _hold_down(self, start: bool = False, addrs=None) -> None:
        """Servers their checks hold down are down in the pool: a reload or a control op (`ipvsadm -a`, REST, a
        batch; `addrs`: the addresses it added) may have added one back after it was removed by hand (`ipvsadm -d`),
        up at its weight, and a checker that is down already has no transition to report, so it stayed in rotation
        for good. keepalived's reload adds only the servers its checkers hold alive."""
        ops, what = [], []
        for vs_key, rs_key, weight, reason in self.health.down(addrs):
            for ident, fwd, where in self._services_of(vs_key):
                a = {"svc": ident, "addr": str(rs_key[0]), "port": _member_port(ident, fwd, rs_key[1])}
                try:
                    svc = self.bal.get_service(ident)
                    d = svc.dests.get(self.bal._dest_key(svc, a))
                except HdslbError:
                    continue
                if d is not None and not d.sorry and (d.health == "up" or d.inhibited != (weight == 0)):
                    ops.append((a, False, weight, reason))
                    what.append((where, d.health == "up"))
        if not ops:
            return
        for (a, _, weight, reason), (where, was_up), r in zip(ops, what, self.bal.dest_health_many(ops)):
            if isinstance(r, HdslbError):
                log.warning("health %s %s:%s: %s", where, a["addr"], a["port"], r.message)
            elif was_up and not start:
                log.warning("real server %s:%s of %s is back in the pool but its health check holds it down: %s "
                            "until the check passes (%s)", a["addr"], a["port"], where,
                            "at weight 0 (inhibit_on_failure)" if weight == 0 else "out of rotation", reason)
        self._state_changed()

    def _dests_of(self, vs_key, rs_key) -> list:
        """The model's dests a health-check identity (virtual server, real server) stands for."""
        out = []
        for ident, fwd, _ in self._services_of(vs_key):
            try:
                svc = self.bal.get_service(ident)
                d = svc.dests.get(self.bal._dest_key(svc, {"addr": str(rs_key[0]),
                                                           "port": _member_port(ident, fwd, rs_key[1])}))
            except HdslbError:
                continue
            if d is not None and not d.sorry:
                out.append(d)
        return out

    def _pool_state(self, vs_key, rs_key):
        """What the pool holds for a real server the health manager starts checking (see HealthManager)."""
        from hdslb.health.state import PoolState

        dests = self._dests_of(vs_key, rs_key)
        if not dests:
            return None
        down = [d for d in dests if d.health == "down"]
        if down:
            return PoolState(False, None, down[0].reason)
        weights = {d.pool_weight for d in dests}  # a server held out for a sorry server is still up at its weight
        # At the first health start after a restart, a server the restored model has up was in rotation under the
        # previous daemon (its checks passed, or it was in before they were added): alpha does not take it out.
        ids = self._restored_up[1]
        restored = bool(ids) and all(id(d) in ids for d in dests)
        return PoolState(True, weights.pop() if len(weights) == 1 else None, restored=restored)

    def pool_weight(self, vs_key, rs_key) -> int | None:
        """The weight the pool has a checked real server at (as ipvsadm -Ln shows it: 0 while down or held out for
        a sorry server), for health.list; None when the model does not have it or its services disagree."""
        weights = {d.eff_weight for d in self._dests_of(vs_key, rs_key)}
        return weights.pop() if len(weights) == 1 else None

    def pool_held(self, vs_key, rs_key) -> bool:
        """The pool holds a checked real server out while its service's sorry server stands in, for health.list."""
        return any(d.held for d in self._dests_of(vs_key, rs_key))

    def _quorum_lost(self, vs_key) -> bool | None:
        """What the pool shows of a virtual server's quorum, for the health manager starting to weigh it: True, lost
        (its sorry server is in); False, held (a restart adopted the service, which has a sorry server and none in:
        the previous daemon had quorum, and a weight between quorum - hysteresis and quorum + hysteresis keeps it);
        None, the pool cannot say (the manager weighs the servers, as keepalived does at start)."""
        ids = self._restored_up[1]
        restored = False
        for ident, _, _ in self._services_of(vs_key):
            try:
                svc = self.bal.get_service(ident)
            except HdslbError:
                continue
            if any(d.sorry for d in svc.dests.values()):
                return True
            restored = restored or any(id(d) in ids for d in svc.dests.values())
        if restored and any(w.sorry for w in self.want.values() if tuple(w.vs_key) == tuple(vs_key)):
            return False
        return None

    def _release_unchecked(self, pairs) -> None:
        """A dest no checker watches any more (its check removed from the config or with check.del, possibly
        while hdslbd was down) is up at its configured weight: a verdict nobody will revise must not keep it
        out of rotation, or at a weight a checker once asked for."""
        checked = {id(d) for vs, rs in pairs if rs.checkers for d in self._dests_of(vs.key, rs.key)}
        for svc in self.bal.services.values():
            for d in list(svc.dests.values()):
                if id(d) in checked or (d.health == "up" and d.health_weight in (None, d.weight)):
                    continue
                try:
                    self.bal.dest_health({"svc": svc.ident, "addr": str(d.addr), "port": d.port}, True, None, "")
                except HdslbError as e:
                    log.warning("real server %s:%s: %s", d.addr, d.port, e.message)
                    continue
                log.info("real server %s:%s of %s has no health check any more: up, weight %d", d.addr, d.port,
                         _endpoint(svc.addr, svc.port), d.weight)

    def health_services(self, vs_key) -> list[dict]:
        """The idents of the services a health-check identity stands for (a virtual_server_group's: each member's):
        /metrics gives every one of them an hdslb_backend_up series."""
        return [ident for ident, _, _ in self._services_of(vs_key)]

    def _services_of(self, vs_key):
        """(service ident, fwd, where) of every service a health-check identity stands for."""
        # Indexed once per config and set of checks: start and reload ask for every real server, and a scan of
        # every service each time is quadratic with a thousand virtual servers.
        stamp = tuple(self.ctl_checks)  # self.want is replaced whole by a reload: its identity is the other key
        cache = getattr(self, "_services_index", None)
        if cache is None or cache[0] != stamp or cache[1] is not self.want:
            index: dict = {}
            for w in self.want.values():
                index.setdefault(tuple(w.vs_key), []).append((w.ident, w.fwd, w.where))
            for c in self.ctl_checks.values():
                svc = c["svc"]
                index.setdefault((svc["proto"].upper(), _endpoint(svc["addr"], svc["port"])), []).append(
                    (svc, None, f"check.add {c['key']}"))
            cache = self._services_index = (stamp, self.want, index)
        return cache[2].get(tuple(vs_key), [])

    async def add_check(self, a: dict) -> dict:
        svc = self.bal.get_service(a.get("svc"))
        d = svc.dests.get(self.bal._dest_key(svc, a))
        if d is None:
            raise HdslbError(errno.ENOENT, "No such destination")
        ident = {"proto": svc.proto, "addr": str(svc.addr), "port": svc.port}
        key = f"{svc.proto}:{_endpoint(svc.addr, svc.port)}/{_endpoint(d.addr, d.port)}"
        filed = self._file_checked(d)
        if filed is not None:
            # The added check would stand in for the file's (one set of checks per server and virtual server),
            # silently dropping them and the server's notify scripts, inhibit_on_failure and misc_dynamic weight.
            raise HdslbError(errno.EEXIST, f"{_endpoint(d.addr, d.port)} of {svc.proto} "
                                           f"{_endpoint(svc.addr, svc.port)} is checked by the config file ({filed}): "
                                           f"change its checks there and reload")
        text = check_block(ident, str(d.addr), d.port, a, d.weight)
        from hdslb.config import ConfigError, loads

        try:
            loads(text, name="check.add")
        except ConfigError as e:
            # the option refused and why (the block's file position means nothing to the caller)
            what = f"{e.keyword}: {e.reason}" if hasattr(e, "reason") else str(e)
            raise HdslbError(errno.EINVAL, f"invalid check: {what}") from None
        self.ctl_checks[key] = {"key": key, "svc": ident, "addr": str(d.addr), "port": d.port, "text": text}
        await self._start_health()
        return {"key": key}

    def _file_checked(self, dest) -> str | None:
        """Where the config file declares the checks of `dest` (FILE:LINE:COL of its real_server), or None."""
        if self.config is None:
            return None
        from hdslb.health import pairs_of

        for vs, rs in pairs_of(self.config.virtual_servers):
            if rs.checkers and any(x is dest for x in self._dests_of(vs.key, rs.key)):
                return str(rs.where) if rs.where is not None else f"real_server {rs.ip} {rs.port}"
        return None

    async def del_check(self, a: dict) -> None:
        svc = self.bal.get_service(a.get("svc"))
        addr, port = self.bal._dest_key(svc, a)
        key = f"{svc.proto}:{_endpoint(svc.addr, svc.port)}/{_endpoint(addr, port)}"
        if self.ctl_checks.pop(key, None) is None:
            raise HdslbError(errno.ENOENT, f"no check on {key} was added with check.add")
        await self._start_health()  # no checker any more: _release_unchecked puts it back in rotation

    async def _on_health(self, vs_key, rs_key, up, weight, reason) -> None:
        """A checker's verdict. Verdicts are applied together: those delivered in one go (the health manager
        delivers what is queued without yielding) in the next loop iteration, in one batch that builds each touched
        table once. A rack going down is hundreds of verdicts, and an mh or conhash table costs 45-390 ms a build:
        one by one, 200 of them held the loop ~9 s (ARP answers, control clients and the other checks waiting, new
        flows still sent to the servers whose verdicts queued behind). After an application that was slow, the
        next waits VERDICT_SPACING x its cost, so a longer burst is applied in a few batches; the first verdict
        after a quiet spell is applied at once."""
        self._verdicts.append((vs_key, rs_key, up, weight, reason))
        if self._verdict_handle is not None:
            return
        loop = asyncio.get_running_loop()
        at = self._verdicts_done + (min(VERDICT_WAIT_MAX_S, VERDICT_SPACING * self._verdict_cost)
                                    if self._verdict_cost >= VERDICT_SLOW_S else 0.0)
        if at <= loop.time():
            self._verdict_handle = loop.call_soon(self._apply_verdicts)
        else:
            self._verdict_handle = loop.call_at(at, self._apply_verdicts)

    def _apply_verdicts(self) -> None:
        """Apply the verdicts received so far (see _on_health), in order, each touched service's table built once."""
        if self._verdict_handle is not None:
            self._verdict_handle.cancel()
            self._verdict_handle = None
        verdicts, self._verdicts = self._verdicts, []
        if not verdicts:
            return
        ops, what = [], []
        for vs_key, rs_key, up, weight, reason in verdicts:
            for ident, fwd, where in self._services_of(vs_key):  # today's services: one removed meanwhile has none
                port = _member_port(ident, fwd, rs_key[1])
                ops.append(({"svc": ident, "addr": str(rs_key[0]), "port": port}, up, weight, reason))
                what.append((where, rs_key[0], port, up, reason))
        t0 = time.perf_counter()
        try:
            results = self.bal.dest_health_many(ops)
        finally:
            self._verdict_cost = time.perf_counter() - t0
            try:
                self._verdicts_done = asyncio.get_running_loop().time()
            except RuntimeError:  # no loop (a test calling it directly): the next verdict goes at once
                self._verdicts_done = float("-inf")
        for (where, addr, port, up, reason), r in zip(what, results):
            if isinstance(r, HdslbError):
                log.warning("health %s %s:%s: %s", where, addr, port, r.message)
                continue
            log.info("real server %s:%s of %s %s%s", addr, port, where, "up" if up else "down",
                     f" ({reason})" if reason and not up else "")
        if len(verdicts) > 1 or self._verdict_cost >= VERDICT_SLOW_S:
            log.debug("health: %d verdicts applied in %.1f ms", len(verdicts), self._verdict_cost * 1e3)
        # Coalesced as control ops are: a rack going down is thousands of notices, and a save per notice (the
        # whole model each time, 36 ms with 500 services x 10 real servers) took 91 s to apply 2500 of them.
        self._state_changed()

    async def _on_quorum(self, vs_key, lost: bool) -> None:
        self._apply_verdicts()  # the verdicts that moved the quorum are in the pool before the sorry server moves
        # The sorry server the config names now (a reload may have changed it since the quorum was lost); on
        # regaining quorum, whichever sorry server is in goes, named or not.
        if lost:
            targets = [(w.ident, w.fwd, w.where, w.sorry) for w in self.want.values()
                       if tuple(w.vs_key) == tuple(vs_key)]
        else:
            targets = [(ident, fwd, where, None) for ident, fwd, where in self._services_of(vs_key)]
        for ident, fwd, where, sorry in targets:
            self._set_sorry(ident, fwd, where, sorry, "lost quorum" if lost else "regained quorum")
        self._state_changed()

    def _set_sorry(self, ident, fwd, where, want, why: str) -> bool:
        """Make the service's sorry server `want` ((addr, port), as WantService.sorry) or none: other sorry servers
        go, the wanted one comes in if it is not there (on the service's forwarding method: a reload may have
        changed it), and, as keepalived does, the other real servers are out of the pool while a sorry server is
        in and come back with quorum (Balancer.hold_for_sorry); all of it one table build. Returns whether the
        model changed."""
        changed = False
        try:
            svc = self.bal.get_service(ident)
            key = self.bal._dest_key(svc, {"addr": want[0], "port": want[1]}) if want is not None else None
        except HdslbError as e:
            log.error("sorry server for %s: %s", where, e.message)
            return changed
        try:
            with self.bal.deferred():
                changed = self._sorry_ops(svc, ident, fwd or "fnat", where, key, why)
        except HdslbError as e:  # a table the batch could not build (the model keeps what was applied)
            log.error("sorry server for %s: %s", where, e.message)
            changed = True
        return changed

    def _sorry_ops(self, svc, ident, fwd: str, where: str, key, why: str) -> bool:
        changed = False
        was_held = {id(d): d.held for d in svc.dests.values()}
        for d in [d for d in svc.dests.values() if d.sorry and (d.addr, d.port) != key]:
            try:
                self.bal.dest_del({"svc": ident, "addr": str(d.addr), "port": d.port})
            except HdslbError as e:
                log.error("sorry server for %s: %s", where, e.message)
                continue
            changed = True
            log.info("%s %s: sorry server %s removed", where, why, _endpoint(d.addr, d.port))
        cur = svc.dests.get(key) if key is not None else None
        if key is not None and cur is None:
            try:
                d = self.bal.dest_add({"svc": ident, "addr": str(key[0]), "port": key[1], "fwd": fwd, "weight": 1})
            except HdslbError as e:
                log.error("sorry server for %s: %s", where, e.message)
            else:
                d.sorry = True
                changed = True
                self.resolve_soon()
                log.warning("%s %s: sorry server %s takes new flows", where, why, _endpoint(key[0], key[1]))
        elif cur is not None and cur.sorry and cur.fwd != fwd:
            try:
                self.bal.dest_edit({"svc": ident, "addr": str(key[0]), "port": key[1], "fwd": fwd})
            except HdslbError as e:
                log.error("sorry server for %s: %s", where, e.message)
            else:
                changed = True
                self.resolve_soon()
                log.info("%s: sorry server %s now forwards by %s", where, _endpoint(key[0], key[1]), fwd)
        held = any(d.sorry for d in svc.dests.values())
        self.bal.hold_for_sorry(ident, held)  # (the last sorry server's removal released them already)
        moved = [d for d in svc.dests.values() if not d.sorry and was_held.get(id(d), False) != d.held]
        changed |= bool(moved)
        alive = [d for d in moved if d.health == "up"]  # a server down by its check was out already
        if alive:
            names = ", ".join(_endpoint(d.addr, d.port) for d in alive[:8]) + (" ..." if len(alive) > 8 else "")
            log.warning("%s %s: %d real server(s) %s: %s", where, why, len(alive),
                        "out of the pool while the sorry server stands in" if held else "back in the pool", names)
        return changed

    def _sync_sorry(self) -> None:
        """Each config service has in the sorry server its config names now if its quorum is lost, and none
        otherwise: after a start (a sorry server restored in a service nobody weighs goes) and after a reload
        (one whose sorry_server changed while quorum was lost gets the new one)."""
        changed = False
        for w in self.want.values():
            try:
                lost = self.health is not None and self.health.quorum_up(w.vs_key) is False
            except KeyError:  # not weighed
                lost = False
            changed |= self._set_sorry(w.ident, w.fwd, w.where, w.sorry if lost else None,
                                       "is without quorum" if lost else "has quorum")
        if changed:
            self._save_state()

    def uptime(self) -> float:
        return round(time.monotonic() - self.started, 1)

    # --- views used by commands -----------------------------------------------------------------
    def svc_stats(self, svc_id: int) -> dict:
        return self.maps.svc_stats(svc_id)

    def dest_stats(self, slot: int) -> dict:
        return self.maps.dest_stats(slot)

    def _conns(self) -> list[dict]:
        """One scan of the conn table, shared by the callers of the same second."""
        at, conns = self._conn_cache
        if conns is None or time.monotonic() - at > CONN_SCAN_CACHE_S:
            conns = list(self.maps.conns())
            self._conn_cache = (time.monotonic(), conns)
        return conns

    def conn_counts(self) -> dict[int, tuple[int, int]]:
        """dest slot -> (ActiveConn, InActConn) as LVS defines them: established TCP is active, the rest not."""
        from hdslb.fastpath import aging

        at, counts = self._counts_cache
        if counts is not None and time.monotonic() - at <= CONN_SCAN_CACHE_S:  # one scan serves the same second
            return counts
        cols = self.maps.conn_aging_columns()
        counts = cols.counts() if cols is not None else aging.counts_rows(self.maps.conn_aging_view())
        self._counts_cache = (time.monotonic(), counts)
        return counts

    def sched_counts(self) -> dict[int, tuple[int, int]]:
        """conn_counts() as the scheduling model reads them (lc/wlc rings, u_threshold): the estimator's last reading,
        made in a worker thread, while it is no older than counts_staleness() says counts may be, plus what that scan
        took (the next reading is that much later: 2.8 s at 1M connections); else read now. A dest change of an
        lc/wlc service on a big table then costs no scan on the event loop."""
        at, counts, took = self._sched_counts
        if counts is not None and time.monotonic() - at <= self.counts_staleness() + took:
            return counts
        return self.conn_counts()

    def laddr_conns(self) -> dict:
        """(svc id, local address) -> connections through it (ipvsadm -G, laddr.list), counted once per conn
        table scan: service.list asks for every service, and formatting each entry's address per service made
        every listing cost a whole table walk per service (3.4 ms for 3 services and 2k flows)."""
        conns = self._conns()
        cached = self._laddr_cache
        if cached is not None and cached[0] is conns:
            return cached[1]
        out: dict = {}
        for c in conns:
            if not c["out"]:
                key = (c["svc_id"], c["to_saddr"])
                out[key] = out.get(key, 0) + 1
        self._laddr_cache = (conns, out)
        return out

    async def conn_list_async(self) -> list[dict]:
        """conn_list() in a worker thread: a million connections take seconds to read and format, and the
        event loop goes on serving meanwhile (the thread gives it the GIL every switch interval)."""
        return await asyncio.get_running_loop().run_in_executor(None, self.conn_list)

    def conn_listing(self, inbound: bool = False):
        """The conn table as conn.list lists it (hdslb.fastpath.aging.Listing, the same entries conn_list() gives,
        turned into dicts page by page), read in batches into numpy columns: in a worker thread (commands.conn_list
        keeps it as a snapshot its pages are served from). inbound: the client's direction only (ipvsadm -Lnc)."""
        from hdslb.fastpath import aging
        from hdslb.fastpath.abi import conn_states

        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        cols = aging.ListColumns.from_batches([aging.ListColumns.extract(k, v, n)
                                               for k, v, n in self.maps._aging_buffers()])
        if cols is None:  # two different keys with one 64-bit hash (see Columns.from_batches)
            raise HdslbError(errno.EAGAIN, "conn.list: two of the conn table's keys share a 64-bit hash "
                                           "(astronomically rare); try again once the table has changed")
        clock = self.maps.clock
        tick, base = clock.tick_ns, clock.to_mono_ns(0)
        return aging.Listing(cols, now, lambda j: j.astype("int64") * tick + base, self.idle_limits(),
                             conn_states(), bool(self.maps.conn_shared), inbound)

    def conn_list(self) -> list[dict]:
        """Every entry (ipvsadm -Lnc shows the inbound ones). An entry's state is its flow's (a reset or FIN from
        the real server closes the flow: hdslb.fastpath.aging.flow_state), and its idle time the flow's, as the
        sweep times them."""
        from hdslb.fastpath import aging
        from hdslb.fastpath.abi import conn_states

        names = conn_states()
        est = names.index("established")
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        conns = self._conns()
        # timeout_for()'s rule, its limits read once: per entry they re-read the ABI header (half the time of a
        # listing of 131k entries)
        lim = self.idle_limits()

        def key(c, pre=""):
            return (c["proto"], c[pre + "saddr"], c[pre + "sport"], c[pre + "daddr"], c[pre + "dport"])

        by_key = {key(c): c for c in conns}
        out = []
        for c in conns:
            state, last = c["state"], c["last_seen_ns"]
            p = by_key.get((c["proto"], c["to_daddr"], c["to_dport"], c["to_saddr"], c["to_sport"]))
            if p is not None and p is not c and key(p, "to_") == (c["proto"], c["daddr"], c["dport"], c["saddr"],
                                                                   c["sport"]):
                inb, rep = (p, c) if c["out"] and not p["out"] else (c, p)
                state = max(inb["state"], rep["state"]) if rep["state"] > est else inb["state"]
                last = max(last, p["last_seen_ns"])
            idle = max(0, (now - last) // 10**9)  # a stamp converted from jiffies may lie a tick ahead of now
            out.append({k: (str(v) if isinstance(v, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else v)
                        for k, v in c.items()} | {"state": aging.state_name(names, c["proto"], state),
                                                  "idle_s": idle,
                                                  "expire_s": max(0, lim.of(c["proto"], state) - idle)})
        return out

    def persist_list(self) -> list[dict]:
        """Live persistence templates (ipvsadm -Lnc shows them as LVS does: client port 0, state NONE)."""
        try:
            temps = self.maps.persists()
        except RuntimeError:
            return []
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        # The real servers by (service, slot), made once: looked up per template by walking the service's list, a
        # full table (65,536 templates) over 100 real servers took a second of the listing (ipvsadm -L, a /metrics
        # scrape). Copies (list()), as this runs in the listings' worker thread while the loop may change them.
        by_id = {s.svc_id: s for s in list(self.bal.services.values())}
        slots: dict = {}
        out = []
        for t in temps:
            svc = by_id.get(t["svc_id"])
            if svc is None or t["expires_ns"] <= now:
                continue
            of = slots.get(svc.svc_id)
            if of is None:
                of = slots[svc.svc_id] = {x.slot: x for x in list(svc.dests.values())}
            d = of.get(t["dest_slot"])
            out.append({"proto": svc.proto, "client": str(t["addr"]), "plen": svc.persist_plen,
                        "vaddr": str(svc.addr), "vport": svc.port, "svc_id": svc.svc_id,
                        "daddr": str(d.addr) if d else None, "dport": d.port if d else 0,
                        "dest_slot": t["dest_slot"], "expire_s": (t["expires_ns"] - now) // 10**9})
        return out

    def link_stats(self, ifname: str) -> dict:
        """The fast path's own counters for frames received on ifname (the kernel's do not see XDP_TX)."""
        return self.maps.if_stats(self.bal.ifaces[ifname].ifindex)

    # --- neighbour resolution (until the AF_XDP slow path takes it over) -------------------------
    def resolve_soon(self) -> None:
        """Have the resolvers look at the model's next hops soon: at once for a lone change, inside a burst at most
        every RESOLVE_COALESCE_S or 10 x what the last look took (each look walks every real server: one per REST
        request of a bulk load would starve the loop)."""
        if self._resolve_handle is not None:
            return
        wait = self._last_resolve + max(RESOLVE_COALESCE_S, 10 * self.bal.wanted_cost) - time.monotonic()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a caller outside the daemon's): nothing to coalesce with
            wait, loop = 0, None
        if wait <= 0:
            self._kick_resolvers()
        else:
            self._resolve_handle = loop.call_later(wait, self._kick_resolvers)

    def _kick_resolvers(self) -> None:
        self._resolve_handle = None
        self._last_resolve = time.monotonic()
        if self.slow is not None:
            self.slow.kick()
        self._resolve_now.set()

    def _pkt_sock(self, ifname: str) -> socket.socket:
        sk = self._pkt_socks.get(ifname)
        if sk is None:
            sk = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: send only, never receive
            sk.bind((ifname, 0))
            self._pkt_socks[ifname] = sk
        return sk

    def _source_for(self, ifname: str, target):
        """Sender address of an ARP request / NS for target on ifname: Balancer.probe_source (one rule, shared
        with the slow path)."""
        return self.bal.probe_source(target, ifname)

    def _send_arp(self, ifname: str, sip, tip) -> None:
        ifc = self.bal.ifaces[ifname]
        try:
            self._pkt_sock(ifname).send(arp_frame(1, ifc.mac, sip, b"\xff" * 6, tip))
        except OSError as e:
            log.warning("ARP request for %s on %s failed: %s", tip, ifname, e)

    def _send_ns(self, ifname: str, src, target) -> None:
        """Neighbour solicitation for target to its solicited-node group (IPv6's ARP request)."""
        from hdslb.slowpath import packets as P

        try:
            self._pkt_sock(ifname).send(P.nd_ns(self.bal.ifaces[ifname].mac, src, target))
        except OSError as e:
            log.warning("neighbour solicitation for %s on %s failed: %s", target, ifname, e)

    def _probe(self, ifname: str, target) -> None:
        src = self._source_for(ifname, target)
        if target.version == 4:
            self._send_arp(ifname, src, target)
        else:
            self._send_ns(ifname, src, target)

    def announce(self, addr, ifname) -> None:
        """Gratuitous ARP / unsolicited NA for an address we just took, so neighbours learn (or relearn) our MAC."""
        try:
            a = ipaddress.ip_address(addr)
        except ValueError:
            return
        if self.slow is not None and ifname in self.bal.ifaces:
            self.slow.announce(a, ifname)
        elif a.version == 4 and ifname in self.bal.ifaces:
            self._send_arp(ifname, a, a)
        elif ifname in self.bal.ifaces:
            from hdslb.slowpath import packets as P

            try:
                self._pkt_sock(ifname).send(P.unsolicited_na(self.bal.ifaces[ifname].mac, a))
            except OSError as e:
                log.warning("unsolicited NA for %s on %s failed: %s", a, ifname, e)

    def _wanted_nexthops(self) -> dict:
        """Next hop -> egress interface for every real server (IPv4 and IPv6) and SNAT gateway."""
        return self.bal.wanted_nexthops()

    # --- IPv6 neighbour discovery over a packet socket ---------------------------------------------
    # cBPF: IPv6 (no extension header) carrying ICMPv6 type 135 or 136 (neighbour solicitation or advertisement);
    # everything else stays out of the socket, so the kernel's IPv6 traffic costs this process nothing.
    _NA_FILTER = ((0x28, 0, 0, 12), (0x15, 0, 6, 0x86DD), (0x30, 0, 0, 20), (0x15, 0, 4, 58),
                  (0x30, 0, 0, 54), (0x15, 1, 0, 135), (0x15, 0, 1, 136), (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0))

    def _open_na_listeners(self) -> None:
        """Without the slow path XDP passes IPv6 neighbour advertisements to the kernel, where a packet socket
        per interface hears them: they teach real servers' next hops (solicited ones to our address, and those a
        server multicasts in answer to an NS from ::). Solicitations for our own addresses (VIPs, local
        addresses: the kernel does not hold them) are answered in XDP itself (nd_answer, as ARP), so that a
        dead daemon leaves none unanswered; answer_ns only sees the ones XDP left to the kernel. With the slow
        path, both go to it directly when addressed to us; the multicast advertisements still arrive here and
        are handed to it."""
        import ctypes

        loop = asyncio.get_running_loop()
        prog = (ctypes.c_uint64 * len(self._NA_FILTER))(*[
            c | (jt << 16) | (jf << 24) | (k << 32) for c, jt, jf, k in self._NA_FILTER])
        self._na_filter = prog  # kept alive: the kernel copies it at attach, but tidy all the same
        fprog = struct.pack("HL", len(self._NA_FILTER), ctypes.addressof(prog))
        for ifc in self.bal.ifaces.values():
            try:
                sk = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
                sk.setsockopt(socket.SOL_SOCKET, 26, fprog)  # SO_ATTACH_FILTER
                sk.bind((ifc.name, 0x86DD))
                sk.setblocking(False)
                # Solicitations go to solicited-node groups the kernel never joined for our addresses (it does
                # not hold them): all-multicast, so a NIC's multicast filter lets them through to XDP and here.
                mreq = struct.pack("iHH8s", ifc.ifindex, 2, 0, b"")  # PACKET_MR_ALLMULTI
                try:
                    sk.setsockopt(263, 1, mreq)  # SOL_PACKET, PACKET_ADD_MEMBERSHIP; dropped with the socket
                except OSError as e:
                    log.debug("all-multicast on %s: %s", ifc.name, e)
            except OSError as e:
                log.warning("cannot listen for IPv6 neighbour advertisements on %s: %s", ifc.name, e)
                continue
            self._na_socks[ifc.name] = sk
            loop.add_reader(sk.fileno(), self._na_readable, ifc.name, sk)

    def _close_na_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for sk in self._na_socks.values():
            loop.remove_reader(sk.fileno())
            sk.close()
        self._na_socks.clear()

    def _na_readable(self, ifname: str, sk: socket.socket) -> None:
        for _ in range(64):
            try:
                frame = sk.recv(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("NA socket on %s: %s", ifname, e)
                return
            try:
                if len(frame) > 54 and frame[54] == 135:
                    self.answer_ns(ifname, frame)
                else:
                    self.learn_na(ifname, frame)
            except Exception:  # a bad frame costs one frame, never the daemon
                log.exception("IPv6 neighbour discovery on %s", ifname)

    def answer_ns(self, ifname: str, frame: bytes) -> bool:
        """Answer a neighbour solicitation for an address we own on ifname (without the slow path); True when
        an advertisement was sent. A DAD probe (from ::) is answered to all nodes, defending the address."""
        from hdslb.slowpath import packets as P

        if self.slow is not None:
            return False  # XDP hands solicitations for our addresses to the slow path, which answers them
        eth = P.parse_eth(frame)
        if eth is None or eth.ethertype != P.ETH_P_IPV6:
            return False
        ip6 = P.parse_ipv6(frame[eth.l2len:])
        if ip6 is None or not P.icmp6_ok(ip6) or ip6.hlim != P.ND_HOP_LIMIT:
            return False
        nd = P.parse_nd(ip6.payload)
        ifc = self.bal.ifaces.get(ifname)
        if nd is None or nd.type != P.ND_NEIGHBOR_SOLICIT or ifc is None:
            return False
        flags, ifindex = self.bal.local_reasons(nd.target)
        if not flags or ifindex not in (0, ifc.ifindex):
            return False
        if ip6.src.is_unspecified:
            na = P.nd_na(ifc.mac, nd.target, P.ALL_NODES, P.mcast_mac(P.ALL_NODES), solicited=False)
        else:
            na = P.nd_na(ifc.mac, nd.target, ip6.src, nd.lladdr or eth.src, solicited=True)
        try:
            self._pkt_sock(ifname).send(na)
        except OSError as e:
            log.warning("neighbour advertisement for %s on %s failed: %s", nd.target, ifname, e)
            return False
        return True

    def learn_na(self, ifname: str, frame: bytes) -> bool:
        """Learn a real server's next hop from a neighbour advertisement frame; True when written."""
        from hdslb.slowpath import packets as P

        if self.slow is not None:  # the slow path's state machine owns neighbours then
            self.slow.carry_out(self.slow.sp.handle(ifname, frame))
            return False
        eth = P.parse_eth(frame)
        if eth is None or eth.ethertype != P.ETH_P_IPV6:
            return False
        ip6 = P.parse_ipv6(frame[eth.l2len:])
        if ip6 is None or not P.icmp6_ok(ip6) or ip6.hlim != P.ND_HOP_LIMIT:
            return False
        nd = P.parse_nd(ip6.payload)
        if nd is None or nd.type != P.ND_NEIGHBOR_ADVERT:
            return False
        mac = nd.lladdr or eth.src
        if not P.is_unicast_mac(mac) or self.bal.is_local(nd.target):
            return False
        if self._wanted_nexthops().get(nd.target) != ifname:
            return False  # only next hops we resolve: an advertisement cannot plant arbitrary entries
        known = {n["addr"]: n for n in self.maps.neighs()}.get(nd.target)
        if known is not None and known["permanent"]:
            return False
        self.maps.set_neigh(nd.target, mac, self.bal.ifaces[ifname].ifindex, permanent=False)
        return True

    async def _import_kernel_neighbours(self) -> None:
        """Neighbours the host kernel already resolved on our interfaces fill gaps in the fast path's table."""
        loop = asyncio.get_running_loop()
        idx = {i.ifindex for i in self.bal.ifaces.values()}
        known = {n["addr"] for n in self.maps.neighs()}
        for addr, mac, ifindex in await loop.run_in_executor(None, kernel_neighbours, idx):
            if addr not in known:
                self.maps.set_neigh(addr, mac, ifindex, permanent=False)

    async def _resolver(self) -> None:
        last_import = 0.0
        while True:
            try:
                if time.monotonic() - last_import > 5.0:
                    last_import = time.monotonic()
                    await self._import_kernel_neighbours()
                known = {n["addr"]: n for n in self.maps.neighs()}
                now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                pending = False
                for nh, ifname in self._wanted_nexthops().items():
                    n = known.get(nh)
                    if n is None:
                        pending = True
                    elif n["permanent"] or now - n["updated_ns"] < NEIGH_REFRESH_S * 1e9:
                        continue
                    self._probe(ifname, nh)
            except Exception:
                log.exception("neighbour resolution pass failed")
                pending = True
            # A pass walks every real server: at most five a second, however many changes wake it.
            await asyncio.sleep(0.2)
            self._resolve_now.clear()
            try:
                await asyncio.wait_for(self._resolve_now.wait(), timeout=0.0 if pending else 0.8)
            except asyncio.TimeoutError:
                pass

    # --- rate estimation (ipvsadm --rate) -------------------------------------------------------
    def counts_staleness(self) -> float:
        """How old (seconds) the counts behind an overload decision or an lc/wlc ring can be: one estimator
        period plus the scan cache. Between decisions a real server can take more than its u_threshold."""
        return ESTIMATOR_INTERVAL_S + CONN_SCAN_CACHE_S

    async def _estimator(self, interval: float = ESTIMATOR_INTERVAL_S) -> None:
        # None until the first reading: the counters a start finds (adopted from the pinned maps after a restart)
        # are what the previous daemon counted, not what came in during one interval. Rates are the difference of
        # two readings, so the first one only sets the base (ZERO_RATES meanwhile); a rate taken against nothing
        # read every adopted total as one interval's traffic (ipvsadm --rate for 2 s after a restart, no traffic:
        # 25 CPS and 153 InPPS after 51 connections; a busy service's totals showed as millions a second).
        prev: dict | None = None
        while True:
            await asyncio.sleep(interval)
            try:
                # (the slots in use are the real servers: counting them per service walked 10k services, 3 ms)
                n = len(self.bal.services) + len(self.bal._slots_used)
                if n < BATCH_STATS_ABOVE:  # a few lookups beat reading every slot of both arrays
                    svc_all = {s.svc_id: self.maps.svc_stats(s.svc_id) for s in self.bal.services.values()}
                    dest_all = {d.slot: self.maps.dest_stats(d.slot) for s in self.bal.services.values()
                                for d in s.dests.values()}
                else:  # the slots with traffic only: an idle service or real server costs nothing here
                    # Both arrays read whole (~0.1 s at 10k x 10): in a worker thread, as service.list does.
                    svc_all, dest_all = await asyncio.get_running_loop().run_in_executor(
                        None, lambda: (self.maps.all_stats("svc_stats"), self.maps.all_stats("dest_stats")))
                # Keyed by what has counted something (a missing key is all zeros): walking every service and real
                # server instead cost 70 ms each interval at 10k x 10, with or without traffic.
                cur = {("svc", k): v for k, v in svc_all.items()}
                cur.update((("dest", k), v) for k, v in dest_all.items())
                if prev is not None:
                    self.rates = rates_between(prev, cur, interval, missing_is_zero=True)
                prev = cur
                errors = dict(self.bal.refresh_errors)
                counts = None
                if self.bal.wants_counts():
                    # The connection counts scan the whole conn table (2.8 s at 1M connections): in a worker
                    # thread, as listings read them. On the loop, every interval with any lc/wlc service (wlc is
                    # the default scheduler) or u_threshold held ARP/ND, health checks and control calls that long.
                    fresh = getattr(self, "conn_counts", None) or self.bal.conn_counts
                    began = time.monotonic()
                    counts = await asyncio.get_running_loop().run_in_executor(None, fresh)
                    self._sched_counts = (time.monotonic(), counts, time.monotonic() - began)
                became = self.bal.refresh_dynamic(counts)
                for sid, why in self.bal.refresh_errors.items():
                    if errors.get(sid) != why:
                        log.warning("service %d: table rebuild refused, the old table stays: %s", sid, why)
                for s, d in became:
                    if d.overloaded:
                        log.info("real server %s:%s overloaded (u_threshold %d): no new flows", d.addr, d.port,
                                 d.u_threshold)
            except Exception:
                log.exception("rate estimation failed")


def rates_between(prev: dict, cur: dict, dt: float, missing_is_zero: bool = False) -> dict:
    """Per-second rates (ipvsadm --rate: cps, in/out pps and bps) of every key in both counter snapshots. A
    counter that went back (zeroed) gives 0. Keys whose counters did not move share one all-zero dict, read
    only: most of a big model is idle at any moment. missing_is_zero: snapshots that leave out all-zero
    counters (the estimator's), so a key only in `cur` started counting from zero in the interval."""
    idle = dict.fromkeys(("cps", "inpps", "outpps", "inbps", "outbps"), 0)
    zero = dict.fromkeys(STAT_FIELDS, 0) if missing_is_zero else None
    rates = {}
    for k, v in cur.items():
        p = prev.get(k, zero)
        if p is None:
            continue
        if v == p:
            rates[k] = idle
            continue
        rates[k] = {"cps": int(max(0, v["conns"] - p["conns"]) / dt),
                    "inpps": int(max(0, v["inpkts"] - p["inpkts"]) / dt),
                    "outpps": int(max(0, v["outpkts"] - p["outpkts"]) / dt),
                    "inbps": int(max(0, v["inbytes"] - p["inbytes"]) / dt),
                    "outbps": int(max(0, v["outbytes"] - p["outbytes"]) / dt)}
    return rates


def down_offline(settings: Settings) -> list[str]:
    """`hdslb-ctl down` with no daemon to ask (killed, crashed): detach the program an instance's daemon left on this
    namespace's interfaces (only one using the instance's pinned maps), remove its pins and its saved model.
    Returns what was done, one line each (empty: there was nothing of the instance). Refused while a daemon of the
    instance holds its lock (one starting, or not answering)."""
    from hdslb.fastpath import loader, xdp_pass
    from hdslb.fastpath.decap import is_bpffs

    d = Daemon(settings)
    d._take_locks()
    done = []
    try:
        if os.path.isdir(d.pin_dir) and not is_bpffs(d.pin_dir):
            # pins live on a bpffs only: a --pin-root given wrong (/var/lib, --instance mysql) must not have down
            # remove a tree that was never hdslb's
            raise HdslbError(errno.EINVAL, (
                f"{d.pin_dir} is not on a bpffs, so it holds no pinned maps: it is not removed and nothing was "
                f"changed (is --pin-root {settings.pin_root} the one hdslbd was started with?)"))
        ours = loader.pinned_map_ids(d.pin_dir)
        here = loader.our_xdp_links(ours) if ours else []
        elsewhere = loader.progs_using(ours) - {prog_id for _, _, prog_id in here} if ours else set()
        if elsewhere:  # removing the pins would leave it forwarding with nothing able to reach its maps
            raise HdslbError(errno.EBUSY, (
                f"XDP program id {', '.join(map(str, sorted(elsewhere)))} uses the pinned maps in {d.pin_dir} and is "
                f"not attached to an interface of this network namespace: hdslbd ran in another one. Nothing was "
                f"changed; run the down there (ip netns exec NS hdslb-ctl down)"))
        for name, mode, prog_id in here:
            xdp_pass.detach(name, generic=mode == "generic")
            done.append(f"detached XDP program id {prog_id} from {name} ({mode})")
        if os.path.isdir(d.pin_dir):
            import shutil

            shutil.rmtree(d.pin_dir)
            done.append(f"removed the pinned maps in {d.pin_dir}")
        try:
            os.unlink(settings.state_file)
            done.append(f"removed the saved model {settings.state_file}")
        except FileNotFoundError:
            pass
        d._remove_stale_saves()
        if _dead_socket(settings.ctl_socket):  # (its lock held here: no daemon of the instance is starting on it)
            os.unlink(settings.ctl_socket)
            done.append(f"removed the dead control socket {settings.ctl_socket}")
    finally:
        d._release_locks()
    return done


def _dead_socket(path: str) -> bool:
    """True for a unix socket file nobody listens on (a killed daemon's); never for another kind of file."""
    import stat

    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def reexec_argv(argv: list[str]) -> list[str]:
    """The command line a re-exec runs: this one without --fresh (or an abbreviation argparse takes for it), since
    what this daemon made and changed is what the re-executed one must adopt, not discard."""
    return [a for a in argv if not (a.startswith("--f") and "--fresh".startswith(a))]


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_args(argv)
    # The pid is written into the format once, and records skip the thread/process lookups the format does not
    # show: the REST access log writes a record per request (10k in a bulk load).
    logging.logThreads = logging.logMultiprocessing = logging.logProcesses = False
    logging.basicConfig(level=settings.log_level.upper(),
                        handlers=[log_file_handler(settings.log_file) if settings.log_file
                                  else logging.StreamHandler(sys.stderr)],
                        format=f"%(asctime)s hdslbd[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        print("hdslbd: must run as root (loads XDP programs)", file=sys.stderr)
        return 1
    d = Daemon(settings)
    d.heap.enabled = os.environ.get("HDSLB_GC_FREEZE", "1") != "0"  # 0: the collector as CPython runs it (bench's A/B)
    try:
        asyncio.run(d.run())
    except HdslbError as e:
        log.error("%s", e.message)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the start finished (after it, SIGINT stops the daemon as SIGTERM)
        log.error("interrupted during the start: what it made so far stays, as after kill -9 (the next start "
                  "adopts it; hdslb-ctl down removes it)")
        return 130
    if d.reexec:  # the same command line, the same pid (systemd's MAINPID): it adopts what this one left
        logging.shutdown()
        os.execv(sys.executable, [sys.executable, *reexec_argv(sys.orig_argv[1:])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
