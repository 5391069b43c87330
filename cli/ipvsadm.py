"""ipvsadm for hdslb: the LVS/DPVS command set and output layouts, spoken over the hdslbd control socket.

Options, the table of legal command/option combinations, error messages and list layouts follow ipvsadm 1.31
and DPVS's fork of it (iqiyi/dpvs tools/ipvsadm/ipvsadm.c), including DPVS's local-address commands
-P/-Q/-G. Two places differ on purpose: the command may come anywhere on the line (ipvsadm insists on it
first), and an edit (-E or -e) keeps whatever the line does not mention (see _build).

    parse(argv) -> Invocation (requests to send + how to show the reply)    pure
    render(inv, reply data) -> text                                           pure
    main() = parse, call the daemon, render, exit code
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import sys
from dataclasses import dataclass, field

from cli.common import (EXIT_OK, EXIT_USAGE, UsageError, closed_stdout_quiet, guarded, ip_or_none, run_lines,
                        shell_words, take_ctl_socket)
from hdslb import __version__
from hdslb.config.model import MAX_TIMEOUT_S
from hdslb.ctl.client import Client
from hdslb.ctl.commands import BATCH_OPS
from hdslb.errors import HdslbError

PROG = "ipvsadm"
TRY_HELP = f"Try `{PROG} -h' or '{PROG} --help' for more information."
IPVS_VERSION = "1.2.1"  # what the header says when the daemon does not
DEFAULT_SIZE = 4096
DEFAULT_SCHED = "wlc"
DEFAULT_FWD = "dr"  # DPVS's process_options: "Set direct routing as default forwarding method"
DEFAULT_PERSISTENT = 300  # IPVS_SVC_PERSISTENT_TIMEOUT, used when -p comes without a value
MAX_TIMEOUT = MAX_TIMEOUT_S  # ipvsadm's MAX_TIMEOUT (31 days): -p, and --set within the fast path's u32 jiffies
INT_MAX = 2**31 - 1

FWD_NAMES = {"fnat": "FullNat", "dr": "Route", "nat": "Masq", "tunnel": "Tunnel", "snat": "SNAT"}
FWD_SWITCHES = {"fnat": "-b", "dr": "-g", "nat": "-m", "tunnel": "-i", "snat": "-J"}
PROTO_NUMBERS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "icmp": socket.IPPROTO_ICMP}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}

# How an option takes its argument (popt's POPT_ARG_NONE, POPT_ARG_STRING, POPT_ARGFLAG_OPTIONAL).
NONE, REQUIRED, OPTIONAL = "none", "required", "optional"


@dataclass(frozen=True)
class _Opt:
    short: str | None
    long: str
    arg: str = NONE
    command: str | None = None  # a command: ipvsadm's name for it (cmdnames[]), used in messages
    option: str | None = None  # an option: its column in _LEGAL (optnames[]); None for no-op options
    value: str | None = None  # what the option sets: protocol for -t/-u, method for -g/-b/-m/-i/-J


_OPTIONS = (
    _Opt("A", "add-service", command="add-service"),
    _Opt("E", "edit-service", command="edit-service"),
    _Opt("D", "delete-service", command="delete-service"),
    _Opt("C", "clear", command="flush"),
    _Opt("L", "list", command="list"),
    _Opt("l", "list", command="list"),
    _Opt("Z", "zero", command="zero"),
    _Opt("a", "add-server", command="add-server"),
    _Opt("e", "edit-server", command="edit-server"),
    _Opt("d", "delete-server", command="delete-server"),
    _Opt("R", "restore", command="restore"),
    _Opt("S", "save", command="save"),
    _Opt("P", "add-laddr", command="add-laddr"),
    _Opt("Q", "del-laddr", command="del-laddr"),
    _Opt("G", "get-laddr", command="get-laddr"),
    _Opt(None, "set", command="set"),
    _Opt("h", "help", command="help"),
    _Opt("v", "version", command="version"),
    _Opt("t", "tcp-service", REQUIRED, option="service-address", value="tcp"),
    _Opt("u", "udp-service", REQUIRED, option="service-address", value="udp"),
    _Opt("H", "match", REQUIRED, option="service-address", value="match"),
    _Opt("s", "scheduler", REQUIRED, option="scheduler"),
    _Opt(None, "sched-flags", REQUIRED, option="sched-flags"),
    _Opt("p", "persistent", OPTIONAL, option="persistent"),
    _Opt("M", "netmask", REQUIRED, option="netmask"),
    _Opt("r", "real-server", REQUIRED, option="real-server"),
    _Opt("g", "gatewaying", option="forwarding-method", value="dr"),
    _Opt("i", "ipip", option="forwarding-method", value="tunnel"),
    _Opt("m", "masquerading", option="forwarding-method", value="nat"),
    _Opt("b", "fullnat", option="forwarding-method", value="fnat"),
    _Opt("J", "snat", option="forwarding-method", value="snat"),
    _Opt(None, "tun-type", REQUIRED, option="tun-type"),
    _Opt("w", "weight", REQUIRED, option="weight"),
    _Opt("x", "u-threshold", REQUIRED, option="u-threshold"),
    _Opt("y", "l-threshold", REQUIRED, option="l-threshold"),
    _Opt("n", "numeric", option="numeric"),
    _Opt("c", "connection", option="connection"),
    _Opt(None, "stats", option="stats"),
    _Opt(None, "rate", option="rate"),
    _Opt(None, "thresholds", option="thresholds"),
    _Opt(None, "persistent-conn", option="persistent-conn"),
    _Opt(None, "nosort", option="nosort"),
    _Opt(None, "sort"),  # sorting is the default; ipvsadm keeps the option for backwards compatibility
    _Opt("X", "exact", option="exact"),
    _Opt("z", "laddr", REQUIRED, option="local-address"),
    _Opt("F", "ifname", REQUIRED, option="ifname"),
    _Opt(None, "timeout", option="timeout"),
    _Opt(None, "tun-info", option="tun-info"),
)
_BY_SHORT = {o.short: o for o in _OPTIONS if o.short}
_BY_LONG = {o.long: o for o in _OPTIONS}

# Options of LVS's and DPVS's ipvsadm that hdslb does not have: refused by name with the reason (not as a typo).
_SYNC = "connection sync daemons are not needed: flows live in pinned BPF maps and survive a restart of hdslbd"
_GUE = "it is for GUE and GRE tunnels; hdslb's tunnels (-i) are IPIP, 6in6 for IPv6 (--tun-type ipip)"
_ALLOW = "allow lists are not supported (filter before the balancer, e.g. nftables on the uplink)"
_UNSUPPORTED = {
    ("f", "fwmark-service"): "firewall-mark services need netfilter marks, which the XDP fast path never sees",
    ("6", "ipv6"): "it only applies to firewall-mark services (-f), which hdslb does not have",
    ("q", "icmp-service"): "ICMP virtual services are not balanced (ICMP to a VIP is answered by the slow path)",
    ("o", "ops"): "one-packet scheduling is not supported",
    (None, "pe"): "persistence engines (sip) are not supported; -p and -M give persistence per client address",
    ("j", "synproxy"): "SYN proxy is not supported",
    ("Y", "hash-target"): "conhash hashes the client address (sip); the QUIC id target is not supported",
    (None, "sockpair"): "connections are listed whole with -c; filter its output instead",
    ("U", "add-blklst"): "deny lists are not supported (filter before the balancer, e.g. nftables on the uplink)",
    ("V", "del-blklst"): "deny lists are not supported",
    ("B", "get-blklst"): "deny lists are not supported",
    ("k", "blklst"): "deny lists are not supported",
    (None, "start-daemon"): _SYNC, (None, "stop-daemon"): _SYNC, (None, "daemon"): _SYNC,
    (None, "mcast-interface"): _SYNC, (None, "syncid"): _SYNC,
    (None, "tun-port"): _GUE, (None, "tun-nocsum"): _GUE, (None, "tun-csum"): _GUE, (None, "tun-remcsum"): _GUE,
    (None, "mcast-group"): _SYNC, (None, "mcast-port"): _SYNC, (None, "mcast-ttl"): _SYNC, (None, "sync-maxlen"): _SYNC,
    # DPVS 1.9's (its -1 and -2, --icmpv6-service's and --whtlst's, stay numbers here, as --set takes them)
    (None, "sctp-service"): "SCTP services are not balanced (TCP and UDP)",
    (None, "icmpv6-service"): "ICMPv6 virtual services are not balanced (ICMPv6 to a VIP is answered by the slow path)",
    ("O", "add-whtlst"): _ALLOW, ("W", "get-whtlst"): _ALLOW, (None, "del-whtlst"): _ALLOW, (None, "whtlst"): _ALLOW,
    (None, "cpu"): "listings are not per CPU: -Lnc shows each connection's CPU, [N], in its first column",
    (None, "expire-quiescent"): "it is one setting for every service: `expire_quiescent_template` in hdslb.conf's "
                                "ipvs_defs conn block (keepalived's)",
    (None, "dest-check"): "passive real server checks are not supported; health checks are hdslb.conf's checkers",
    (None, "conn-timeout"): "per-service connection timeouts are not supported; --set tcp tcpfin udp sets them for "
                            "every service",
    (None, "proxy-protocol"): "the PROXY protocol header is not inserted; NAT (-m) and DR (-g) servers see the "
                              "client's address",
    (None, "quic"): "QUIC connection-id scheduling is not supported",
}
_UNSUPPORTED_SHORT = {short: (long, why) for (short, long), why in _UNSUPPORTED.items() if short}
_UNSUPPORTED_LONG = {long: why for (_, long), why in _UNSUPPORTED.items()}

# Legal combinations of commands and options, ipvsadm's commands_v_options reduced to the options hdslb has.
#   +  compulsory    x  illegal    1  exclusive (only one '1' option may be given)    .  optional
_COLUMNS = ("numeric", "connection", "service-address", "scheduler", "persistent", "netmask", "real-server",
            "forwarding-method", "weight", "u-threshold", "l-threshold", "stats", "rate", "thresholds",
            "nosort", "exact", "local-address", "ifname", "sched-flags", "persistent-conn", "timeout", "tun-type",
            "tun-info")
_LEGAL = {cmd: row.split() for cmd, row in {
    #                 -n -c svc -s -p -M -r fwd -w -x -y st rt thr srt ex -z -F sf pc tot tt ti
    "add-service":    "x  x  +   .  .  .  x  x   x  x  x  x  x  x   x   x  x  x  .  x  x   x  x",
    "edit-service":   "x  x  +   .  .  .  x  x   x  x  x  x  x  x   x   x  x  x  .  x  x   x  x",
    "delete-service": "x  x  +   x  x  x  x  x   x  x  x  x  x  x   x   x  x  x  x  x  x   x  x",
    "flush":          "x  x  x   x  x  x  x  x   x  x  x  x  x  x   x   x  x  x  x  x  x   x  x",
    "list":           ".  1  1   x  x  x  x  x   x  x  x  .  .  .   .   .  x  x  x  .  1   x  .",
    "add-server":     "x  x  +   x  x  x  +  .   .  .  .  x  x  x   x   x  x  x  x  x  x   .  x",
    "delete-server":  "x  x  +   x  x  x  +  x   x  x  x  x  x  x   x   x  x  x  x  x  x   x  x",
    "edit-server":    "x  x  +   x  x  x  +  .   .  .  .  x  x  x   x   x  x  x  x  x  x   .  x",
    "set":            "x  x  x   x  x  x  x  x   x  x  x  x  x  x   x   x  x  x  x  x  x   x  x",
    "restore":        "x  x  x   x  x  x  x  x   x  x  x  x  x  x   x   x  x  x  x  x  x   x  x",
    "save":           ".  x  x   x  x  x  x  x   x  x  x  x  x  x   x   x  x  x  x  x  x   x  x",
    "zero":           "x  x  .   x  x  x  x  x   x  x  x  x  x  x   x   x  x  x  x  x  x   x  x",
    "add-laddr":      "x  x  +   x  x  x  x  x   x  x  x  x  x  x   x   x  +  +  x  x  x   x  x",
    "del-laddr":      "x  x  +   x  x  x  x  x   x  x  x  x  x  x   x   x  +  +  x  x  x   x  x",
    "get-laddr":      "x  x  .   x  x  x  x  x   x  x  x  x  x  x   x   x  x  x  x  x  x   x  x",
}.items()}

# LVS scheduler flags (ipvsadm --sched-flags, upstream's -b, which DPVS gave to FullNAT) and hdslb's table
# parameters, written NAME=N in the same list: size (hash table buckets; mh: a prime), seed, replicas (conhash),
# horizon (lc/wlc ring length).
SCHED_FLAG_NAMES = ("sh-fallback", "sh-port", "mh-fallback", "mh-port")
SCHED_PARAM_NAMES = ("size", "seed", "replicas", "horizon")
MATCH_KEYS = ("proto", "src-range", "dst-range", "iif", "oif")


@dataclass(frozen=True)
class Format:
    """ipvsadm's FMT_* flags that shape list output."""
    numeric: bool = False
    stats: bool = False
    rate: bool = False
    thresholds: bool = False
    exact: bool = False
    nosort: bool = False
    persistent_conn: bool = False
    tun_info: bool = False


@dataclass
class Invocation:
    """One parsed command line: the requests to send in order, and how to show the last reply."""
    command: str
    requests: list[tuple[str, dict]] = field(default_factory=list)
    view: str | None = None  # "services", "service", "save", "laddrs", "conns", "help", "version" or None
    fmt: Format = Format()


# --------------------------------------------------------------------------------------------- parsing


_NEGATIVE = re.compile(r"-\d+")


def _tokens(argv: list[str]):
    """Yield (_Opt, argument) per option and (None, word) per operand, reading argv the way popt does."""
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok == "--":
            for word in argv[i:]:
                yield None, word
            return
        if _NEGATIVE.fullmatch(tok) and tok[1] not in _BY_SHORT and tok[1] not in _UNSUPPORTED_SHORT:
            # a number (--set's values), refused as a value; -6 is ipvsadm's --ipv6, refused as that option
            yield None, tok
        elif tok.startswith("--"):
            name, eq, val = tok[2:].partition("=")
            opt = _BY_LONG.get(name)
            if opt is None and name in _UNSUPPORTED_LONG:
                raise UsageError(f"--{name}: not supported by hdslb: {_UNSUPPORTED_LONG[name]}")
            if opt is None:
                raise UsageError(f"--{name}: unknown option")
            if opt.arg == NONE:
                if eq:
                    raise UsageError(f"--{name}: option does not take an argument")
                yield opt, None
            elif eq:
                yield opt, val
            elif opt.arg == REQUIRED:
                if i >= len(argv):
                    raise UsageError(f"--{name}: missing argument")
                yield opt, argv[i]
                i += 1
            elif i < len(argv) and not argv[i].startswith("-"):
                yield opt, argv[i]
                i += 1
            else:
                yield opt, None
        elif tok.startswith("-") and len(tok) > 1:
            # A cluster like -Ln or -At10.0.0.1:80: flags until one takes an argument, which gets the rest.
            for j, ch in enumerate(tok[1:], start=2):
                opt = _BY_SHORT.get(ch)
                if opt is None and ch in _UNSUPPORTED_SHORT:
                    long, why = _UNSUPPORTED_SHORT[ch]
                    raise UsageError(f"-{ch} (--{long}): not supported by hdslb: {why}")
                if opt is None:
                    raise UsageError(f"-{ch}: unknown option")
                if opt.arg == NONE:
                    yield opt, None
                    continue
                rest = tok[j:]
                if rest:
                    yield opt, rest
                elif opt.arg == REQUIRED:
                    if i >= len(argv):
                        raise UsageError(f"-{ch}: missing argument")
                    yield opt, argv[i]
                    i += 1
                elif i < len(argv) and not argv[i].startswith("-"):
                    yield opt, argv[i]
                    i += 1
                else:
                    yield opt, None
                break
        else:
            yield None, tok


_NUMBER = re.compile(r"\s*[+-]?\d+")


def _number(text: str, lo: int, hi: int) -> int | None:
    """strtol-style decimal within [lo, hi], or None (ipvsadm's string_to_number)."""
    if not _NUMBER.fullmatch(text):
        return None
    n = int(text)
    return n if lo <= n <= hi else None


def _port(text: str, proto: str) -> int | None:
    n = _number(text, 0, 65535)
    if n is not None:
        return n
    try:
        return socket.getservbyname(text, proto)
    except OSError:
        return None


def _ip4(text: str):
    """A dotted-quad IPv4 address or None: inet_pton is as strict as ipaddress (no leading zeros, four parts)."""
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        return None


def parse_addr_port(text: str, proto: str):
    """(address, port or None) from `addr[:port]` or `[v6addr]:port`, or None when it is neither.

    Ports may be service names (`http`) as in ipvsadm; host names are not looked up, so nothing here waits on
    DNS. A bare IPv6 address is taken whole, so `2001:db8::1:80` is an address, not address and port.
    """
    if not text or text.isdigit():
        return None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            return None
        addr = ip_or_none(host, 6)
        port = _port(rest[1:], proto)
        return None if addr is None or port is None else (addr, port)
    if text.count(":") == 1:  # the common a.b.c.d:port, without trying it as IPv6 first (bulk restores)
        host, _, port_text = text.partition(":")
        addr, port = _ip4(host), _port(port_text, proto)
        return None if addr is None or port is None else (addr, port)
    addr = ip_or_none(text, 6)
    if addr is not None:
        return addr, None
    host, sep, port_text = text.rpartition(":")
    if not sep:
        addr = ip_or_none(text, 4)
        return None if addr is None else (addr, None)
    addr, port = ip_or_none(host, 4), _port(port_text, proto)
    return None if addr is None or port is None else (addr, port)


@dataclass
class _Line:
    """What the options of one command line said, before it becomes requests."""
    command: str | None = None
    given: list[str] = field(default_factory=list)  # option columns, in the order seen
    operands: list[str] = field(default_factory=list)
    proto: str = "tcp"
    svc: tuple | None = None  # (address, port)
    match: dict | None = None  # -H: a SNAT service's match
    sched_flags: list | None = None
    sched_params: dict | None = None
    sched: str | None = None
    persistent: int | None = None
    netmask: str | None = None
    server: str | None = None
    fwd: str | None = None
    weight: int | None = None
    u_threshold: int | None = None
    l_threshold: int | None = None
    laddr: str | None = None
    ifname: str | None = None
    timeouts: list | None = None  # --set's tcp, tcpfin, udp


def _take(line: _Line, opt: _Opt, val: str | None) -> None:
    """Check and store one option's value; bad values fail here, as they do in ipvsadm's parse_options."""
    name = opt.option
    if name == "service-address" and opt.value == "match":
        line.match = parse_match(val)
        line.proto = line.match["proto"]
    elif name == "service-address":
        line.proto = opt.value
        parsed = parse_addr_port(val, opt.value)
        if parsed is None:
            raise UsageError("illegal virtual server address[:port] specified")
        line.svc = (parsed[0], parsed[1] or 0)
    elif name == "scheduler":
        line.sched = val
    elif name == "sched-flags":
        line.sched_flags, line.sched_params = parse_sched_flags(val)
    elif name == "persistent":
        if val is None:
            line.persistent = DEFAULT_PERSISTENT
        else:
            line.persistent = _number(val, 1, MAX_TIMEOUT)
            if line.persistent is None:
                raise UsageError(f"invalid timeout value `{val}' specified")
    elif name == "netmask":
        line.netmask = val
    elif name == "real-server":
        line.server = val
    elif name == "forwarding-method":
        line.fwd = opt.value
    elif name == "tun-type":  # ipvsadm 1.31's; its -S writes `--tun-type ipip` on every tunnel line
        if val in ("gue", "gre"):
            raise UsageError(f"--tun-type {val}: not supported by hdslb: {_GUE}")
        if val != "ipip":
            raise UsageError("illegal tunnel type specified")
    elif name == "weight":
        line.weight = _number(val, 0, 65535)
        if line.weight is None:
            raise UsageError("illegal weight specified")
    elif name == "u-threshold":
        line.u_threshold = _number(val, 0, INT_MAX)
        if line.u_threshold is None:
            raise UsageError("illegal u_threshold specified")
    elif name == "l-threshold":
        line.l_threshold = _number(val, 0, INT_MAX)
        if line.l_threshold is None:
            raise UsageError("illegal l_threshold specified")
    elif name == "local-address":
        parsed = parse_addr_port(val, "tcp")
        if parsed is None:
            raise UsageError("illegal local address")
        line.laddr = str(parsed[0])
    elif name == "ifname":
        line.ifname = val


def parse_match(text: str) -> dict:
    """-H proto=tcp,src-range=IP1[-IP2],dst-range=..,iif=IF,oif=IF (DPVS's parse_match; empty values allowed).

    Ranges are passed on as written (the daemon checks them: IPv4 only, and the :PORT1-PORT2 part DPVS allows
    is refused unless it is 0-0, since the fast path's SNAT rules match addresses only).
    """
    out = {"proto": None, "src_range": None, "dst_range": None, "iif": None, "oif": None}
    for item in (text or "").split(","):
        if not item:
            continue
        key, eq, val = item.partition("=")
        if not eq or key not in MATCH_KEYS:
            raise UsageError("illegal match specified")
        if key == "proto":
            if val not in ("tcp", "udp", "icmp"):
                raise UsageError("illegal match specified")
            out["proto"] = val
        else:
            out[key.replace("-", "_")] = val or None
    if out["proto"] is None:
        raise UsageError("illegal match specified: proto= is required (tcp, udp or icmp)")
    return out


def match_text(m: dict, rule: bool) -> str:
    """A match as -S writes it (`-H proto=..`, only the keys set) or as -L shows it (`MATCH tcp,from=..`)."""
    if rule:
        parts = [f"proto={m['proto']}"] + [f"{k}={m[k.replace('-', '_')]}" for k in MATCH_KEYS[1:]
                                           if m.get(k.replace("-", "_"))]
        return ",".join(parts)
    text = f"MATCH {m['proto']}"
    for key, label in (("src_range", "from"), ("dst_range", "to"), ("iif", "iif"), ("oif", "oif")):
        if m.get(key):
            text += f",{label}={m[key]}"
    return text


def parse_sched_flags(text: str) -> tuple[list, dict]:
    """--sched-flags sh-port,mh-fallback,size=4093 -> (LVS flags, table parameters)."""
    flags, params = [], {}
    for item in (text or "").split(","):
        if not item:
            continue
        name, eq, val = item.partition("=")
        if eq:
            n = _number(val, 0, 2**32 - 1)
            if name not in SCHED_PARAM_NAMES or n is None:
                raise UsageError(f"invalid scheduler flag `{item}' ({', '.join(SCHED_FLAG_NAMES)}, or "
                                 f"{'|'.join(SCHED_PARAM_NAMES)}=N)")
            params[name] = n
        elif name in SCHED_FLAG_NAMES:
            flags.append(name)  # (bits in LVS: a flag given twice is set once, see _flag_bits)
        else:
            raise UsageError(f"invalid scheduler flag `{item}' ({', '.join(SCHED_FLAG_NAMES)}, or "
                             f"{'|'.join(SCHED_PARAM_NAMES)}=N)")
    return _flag_bits(flags), params


def _flag_bits(flags) -> list:
    """LVS's scheduler flags are bits: each once, in the order ipvsadm's print_sched_flags prints them."""
    return [f for f in SCHED_FLAG_NAMES if f in flags] + sorted({f for f in flags if f not in SCHED_FLAG_NAMES})


def sched_flags_text(flags: list, params: dict) -> str:
    return ",".join(_flag_bits(flags) + [f"{k}={v}" for k, v in sorted((params or {}).items())])


def _check_table(command: str, given: list[str]) -> None:
    """ipvsadm's generic_opt_check: walk the columns in order, the first violation wins."""
    first_exclusive = None
    for name, rule in zip(_COLUMNS, _LEGAL[command]):
        if name not in given:
            if rule == "+":
                raise UsageError(f"You need to supply the '{name}' option for the '{command}' command")
        elif rule == "x":
            raise UsageError(f"Illegal '{name}' option with the '{command}' command")
        elif rule == "1":
            if first_exclusive:
                raise UsageError(f"The option '{name}' conflicts with the '{first_exclusive}' option "
                                 f"in the '{command}' command")
            first_exclusive = name


def _netmask(text: str, version: int) -> str:
    """The persistence granularity as the daemon takes it: a dotted mask (IPv4) or a prefix length (IPv6)."""
    if version == 6:
        n = _number(text, 1, 128)
        if n is None:
            raise UsageError("illegal ipv6 netmask specified")
        return str(n)
    try:
        # The address parse keeps "-M 24" out, as inet_aton would; the ones must come first, as the fast path masks
        # by a prefix length: a host mask (0.0.0.255, which ipaddress reads as /24) is refused, not turned around.
        mask = int(ipaddress.IPv4Address(text))
        host = ~mask & 0xFFFFFFFF
        if host & (host + 1):
            raise ValueError(text)
        return str(ipaddress.IPv4Address(mask))
    except ValueError:
        raise UsageError("illegal virtual server persistent mask specified") from None


def _timeout_value(text: str) -> int:
    """One --set value: ipvsadm's parse_timeout(buf, 0, MAX_TIMEOUT), the bound the fast path's u32 jiffies keep."""
    n = _number(text, 0, MAX_TIMEOUT)
    if n is None:
        raise UsageError(f"invalid timeout value `{text}' specified")
    return n


def parse(argv: list[str]) -> Invocation:
    """One ipvsadm command line (without the program name) -> an Invocation. Raises UsageError."""
    for word in argv:
        if not word.isascii():
            try:
                word.encode()
            except UnicodeEncodeError:  # a byte that is not UTF-8, which argv and stdin keep as a surrogate escape
                shown = word.encode(errors="surrogateescape").decode("ascii", errors="backslashreplace")
                raise UsageError(f"illegal argument `{shown}' (not UTF-8)") from None
    line = _Line(command="list" if not argv else None)
    for opt, val in _tokens(argv):
        if opt is None:
            line.operands.append(val)
        elif opt.command in ("help", "version"):
            return Invocation(opt.command, view=opt.command)
        elif opt.command:
            if line.command:
                raise UsageError("multiple commands specified")
            line.command = opt.command
        elif opt.option:
            if opt.option in line.given:
                raise UsageError(f"multiple '{opt.option}' options specified")
            line.given.append(opt.option)
            _take(line, opt, val)
    if line.command is None:
        raise UsageError(TRY_HELP)
    if line.command == "set":  # ipvsadm --set tcp tcpfin udp: three values, 0 keeps the current one
        if len(line.operands) < 3:
            raise UsageError("--set option requires 3 timeout values")
        line.timeouts = [_timeout_value(v) for v in line.operands[:3]]
        line.operands = line.operands[3:]
    if line.operands:
        raise UsageError(f"unexpected argument {line.operands[0]}")
    _check_table(line.command, line.given)
    return _build(line)


def _build(line: _Line) -> Invocation:
    given = set(line.given)
    fmt = Format(numeric="numeric" in given, stats="stats" in given, rate="rate" in given,
                 thresholds="thresholds" in given, exact="exact" in given, nosort="nosort" in given,
                 persistent_conn="persistent-conn" in given, tun_info="tun-info" in given)
    cmd = line.command
    svc = None
    if line.match is not None:
        svc = {"match": line.match}
    elif line.svc:
        svc = {"proto": line.proto, "addr": str(line.svc[0]), "port": line.svc[1]}

    if cmd == "set":
        return Invocation(cmd, [("timeouts.set", dict(zip(("tcp", "tcpfin", "udp"), line.timeouts)))])
    if cmd == "list":
        if given & {"connection", "timeout"} and given & {"stats", "rate", "thresholds"} or \
                "timeout" in given and "persistent-conn" in given:
            raise UsageError("options conflicts in the list command")
        if "timeout" in given:
            return Invocation(cmd, [("timeouts.get", {})], "timeout", fmt)
        if "connection" in given:
            # -c lists connections and persistence templates; with --persistent-conn, templates only (DPVS)
            return Invocation(cmd, [("conn.list", {"templates_only": True} if fmt.persistent_conn else {})],
                              "conns", fmt)
        # (no layout shows the local addresses' connections, -G's CONNS: counting them reads the whole conn table)
        return Invocation(cmd, [("service.list", {"svc": svc, "laddr_conns": False})], "service" if svc else "services",
                          fmt)
    if cmd == "save":  # rules only: the model, none of the maps' counts and stats (a scan of the conn table)
        return Invocation(cmd, [("service.list", {"svc": None, "brief": True})], "save", fmt)
    if cmd == "restore":
        return Invocation(cmd)
    if cmd == "flush":
        return Invocation(cmd, [("service.flush", {})])
    if cmd == "zero":
        return Invocation(cmd, [("stats.zero", {"svc": svc})])
    if cmd == "get-laddr":
        return Invocation(cmd, [("laddr.list", {"svc": svc})], "laddrs", fmt)
    if cmd in ("add-laddr", "del-laddr"):
        op = "laddr.add" if cmd == "add-laddr" else "laddr.del"
        return Invocation(cmd, [(op, {"svc": svc, "addr": line.laddr, "ifname": line.ifname})])
    if cmd == "delete-service":
        return Invocation(cmd, [("service.del", svc)])

    if cmd in ("add-service", "edit-service"):
        if line.match is None and svc["port"] == 0 and line.persistent is None:
            raise UsageError("Zero port specified for no-match and non-persistent service")
        # ipvsadm's parse_sched_flags: sh-* flags need sh, mh-* flags mh (a usage error, exit 2). The scheduler is
        # known when the line names it, or on -A (the default wlc); an -E without -s keeps the service's, which
        # the daemon checks the flags against.
        sched_now = line.sched or (DEFAULT_SCHED if cmd == "add-service" else None)
        for f in line.sched_flags or []:
            if sched_now is not None and f.split("-", 1)[0] != sched_now:
                raise UsageError(f"incompatible scheduler flag `{f}'")
        version = 4 if line.match is not None else line.svc[0].version
        netmask = None if line.netmask is None else _netmask(line.netmask, version)
        if cmd == "add-service":
            args = {**svc, "sched": line.sched or DEFAULT_SCHED, "persistent": line.persistent,
                    "netmask": netmask, "flags": list(line.sched_flags or [])}
            if line.sched_params:
                args["sched_params"] = dict(line.sched_params)
            return Invocation(cmd, [("service.add", args)])
        # DPVS edits a service "by options": what the line does not mention stays as it is.
        args = dict(svc)
        for key, name, value in (("sched", "scheduler", line.sched), ("persistent", "persistent", line.persistent),
                                 ("netmask", "netmask", netmask), ("flags", "sched-flags", line.sched_flags),
                                 ("sched_params", "sched-flags", line.sched_params)):
            if name in given:
                args[key] = value
        return Invocation(cmd, [("service.edit", args)])

    # add-server, edit-server, delete-server
    if "tun-type" in given and line.fwd != "tunnel":  # (an -e without -i too, as ipvsadm's default there is -g)
        raise UsageError("Tunnel options conflict with forward method")
    parsed = parse_addr_port(line.server, line.proto)
    if parsed is None:
        raise UsageError("illegal real server address[:port] specified")
    addr, port = parsed
    # A match (SNAT) service's real servers are source addresses, port 0, and -J is their only method.
    default_fwd = "snat" if line.match is not None else DEFAULT_FWD
    if line.match is not None:
        port = port or 0
    # No port: the service's. Direct routing and tunnelling cannot change the port, so theirs is forced (for -a
    # and -e, as ipvsadm; not for -d, as ipvsadm). An -e with no method keeps the server's own: the daemon's
    # dest.edit then takes the port of a DR or TUNNEL server as the service's itself.
    elif port is None or (line.fwd or (DEFAULT_FWD if cmd == "add-server" else None)) in ("dr", "tunnel"):
        port = svc["port"]
    dest = {"svc": svc, "addr": str(addr), "port": port}
    if cmd == "delete-server":
        return Invocation(cmd, [("dest.del", dest)])
    if cmd == "add-server":
        return Invocation(cmd, [("dest.add", {
            **dest, "fwd": line.fwd or default_fwd, "weight": 1 if line.weight is None else line.weight,
            "u_threshold": line.u_threshold or 0, "l_threshold": line.l_threshold or 0})])
    # edit-server: like edit-service, only what is given changes (ipvsadm would reset the rest to -g -w 1).
    for key, name, value in (("fwd", "forwarding-method", line.fwd), ("weight", "weight", line.weight),
                             ("u_threshold", "u-threshold", line.u_threshold),
                             ("l_threshold", "l-threshold", line.l_threshold)):
        if name in given:
            dest[key] = value
    return Invocation(cmd, [("dest.edit", dest)])


def parse_restore(text: str) -> list[tuple[int, Invocation]]:
    """ipvsadm -R input (one command line per line, as -S writes them) -> (line number, Invocation) pairs.

    Every line is parsed before anything is sent, so a typo on line 40 does not leave 39 lines applied.
    """
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            inv = parse(shell_words(raw))
        except (UsageError, ValueError) as e:  # ValueError: shlex on an unbalanced quote
            raise UsageError(f"line {n}: {e}") from None
        if inv.command == "restore":
            raise UsageError(f"line {n}: {TRY_HELP}")
        out.append((n, inv))
    return out


# ------------------------------------------------------------------------------------------ formatting


def largenum(n: int, exact: bool) -> str:
    """ipvsadm's print_largenum: 9 columns, scaled to K/M/G/T unless --exact."""
    n = int(n)
    if exact:
        s = str(n)
        return s.rjust(9 if len(s) <= 8 else len(s) + 1)
    if n < 10**8:
        return f"{n:9d}"
    for limit, div, unit in ((10**9, 10**3, "K"), (10**11, 10**6, "M"), (10**14, 10**9, "G")):
        if n < limit:
            return f"{n // div:8d}{unit}"
    return f"{n // 10**12:8d}T"


def _port_name(port: int, proto: str, rule: bool = False) -> str:
    """The service name of a port, as getservbyport gives it. For a rule (-S) only a name that -R reads back as
    this port: /etc/services lists some names twice (dicom is 104 and 11112/tcp), and getservbyname gives the
    first, so `:dicom` written for 11112 was restored as 104."""
    try:
        name = socket.getservbyport(port, proto)
        if rule and socket.getservbyname(name, proto) != port:
            return str(port)
        return name
    except (OSError, OverflowError):
        return str(port)


def addrport(addr: str, port: int, proto: str, numeric: bool, rule: bool = False) -> str:
    """ipvsadm's addrport_to_anyname, minus reverse DNS: addresses always stay numeric."""
    host = f"[{addr}]" if ":" in addr else addr
    return f"{host}:{port if numeric else _port_name(port, proto, rule)}"


def _version(addr: str) -> int:
    return ipaddress.ip_address(addr).version


def _sorted_services(services: list[dict], nosort: bool) -> list[dict]:
    """ipvs_cmp_services: family, protocol, address, port; the SNAT match services first, as the daemon lists
    them: in the order they are tried (first match wins), which -S must keep for -R to restore it."""
    if nosort:
        return list(services)
    return sorted(services, key=lambda s: (0,) if s.get("match") else (
        1, _version(s["addr"]), PROTO_NUMBERS.get(s["proto"], 0), int(ipaddress.ip_address(s["addr"])), s["port"]))


def _sorted_dests(dests: list[dict], nosort: bool) -> list[dict]:
    """ipvs_cmp_dests: address, port."""
    if nosort:
        return list(dests)
    return sorted(dests, key=lambda d: (_version(d["addr"]), int(ipaddress.ip_address(d["addr"])), d["port"]))


def _title(fmt: Format) -> list[str]:
    head = "Prot LocalAddress:Port"
    if fmt.stats:
        cols = ("Conns", "InPkts", "OutPkts", "InBytes", "OutBytes")
    elif fmt.rate:
        cols = ("CPS", "InPPS", "OutPPS", "InBPS", "OutBPS")
    elif fmt.thresholds:
        return [f"{head:<33} {'Uthreshold':<10} {'Lthreshold':<10} {'ActiveConn':<10} {'InActConn':<10}",
                "  -> RemoteAddress:Port"]
    elif fmt.persistent_conn:
        return [f"{head:<33} {'Weight':<9} {'PersistConn':<11} {'ActiveConn':<10} {'InActConn':<10}",
                "  -> RemoteAddress:Port"]
    elif fmt.tun_info:
        return [f"{head} Scheduler Flags",
                "  -> RemoteAddress:Port           Forward TunnelInfo    Weight ActiveConn InActConn"]
    else:
        return [f"{head} Scheduler Flags",
                "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn"]
    return [f"{head:<33}" + "".join(f" {c:>8}" for c in cols), "  -> RemoteAddress:Port"]


STATS_KEYS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")
RATE_KEYS = ("cps", "inpps", "outpps", "inbps", "outbps")


def _full_mask(netmask, version: int) -> bool:
    return netmask in (None, "255.255.255.255" if version == 4 else "128")


def _service_line(s: dict, fmt: Format) -> str:
    v4 = _version(s["addr"]) == 4
    if s.get("match"):
        name = match_text(s["match"], rule=False)  # DPVS: MATCH tcp,from=..,to=..,iif=..,oif=..
    else:
        name = f"{s['proto'].upper()}  {addrport(s['addr'], s['port'], s['proto'], fmt.numeric)}"
        if v4:
            name = name[:33]  # ipvsadm cuts IPv4 names to the column
    if fmt.stats:
        return f"{name:<33}" + "".join(largenum(s["stats"][k], fmt.exact) for k in STATS_KEYS)
    if fmt.rate:
        return f"{name:<33}" + "".join(largenum(s["rates"][k], fmt.exact) for k in RATE_KEYS)
    text = f"{name} {s['sched']}"
    flags = sched_flags_text(s.get("flags") or [], s.get("sched_params") or {})
    if flags:
        text += f" ({flags})"  # LVS prints scheduler flags in parentheses after the scheduler
    if s.get("persistent"):
        text += f" persistent {s['persistent']}"
        if not _full_mask(s.get("netmask"), 4 if v4 else 6):
            text += f" mask {s['netmask']}"
    return text


def _dest_line(s: dict, d: dict, fmt: Format) -> str:
    name = addrport(d["addr"], d["port"], s["proto"], fmt.numeric)
    if _version(s["addr"]) == 4:
        name = name[:28]
    if fmt.stats:
        return f"  -> {name:<28}" + "".join(largenum(d["stats"][k], fmt.exact) for k in STATS_KEYS)
    if fmt.rate:
        r = d["rates"]
        return (f"  -> {name:<28} {int(r['cps']):8d} {int(r['inpps']):8d} {int(r['outpps']):8d}"
                + largenum(r["inbps"], fmt.exact) + largenum(r["outbps"], fmt.exact))
    if fmt.thresholds:
        return (f"  -> {name:<28} {d['u_threshold']:<10} {d['l_threshold']:<10} "
                f"{d['active']:<10} {d['inactive']:<10}")  # DPVS's columns only: scripts parse them
    if fmt.persistent_conn:
        return (f"  -> {name:<28} {d['weight']:<9} {d.get('persist_conns', 0):<11} "
                f"{d['active']:<10} {d['inactive']:<10}")
    if fmt.tun_info:  # ipvsadm 1.31's fwd_tun_info: the tunnel type, n/a for the other methods
        tun = "ipip" if d["fwd"] == "tunnel" else "n/a"
        return (f"  -> {name:<28} {FWD_NAMES.get(d['fwd'], d['fwd']):<7} {tun:<13} {d['weight']:<6} "
                f"{d['active']:<10} {d['inactive']:<10}")
    return (f"  -> {name:<28} {FWD_NAMES.get(d['fwd'], d['fwd']):<7} {d['weight']:<6} "
            f"{d['active']:<10} {d['inactive']:<10}")


def format_list(data: dict, fmt: Format, header: bool = True) -> str:
    """-L / -Ln / --stats / --rate / --thresholds / --persistent-conn / --tun-info (given together, the first is the
    layout, as in ipvsadm's print_title). `header` is off for -L -t (ipvsadm's list_service). Nothing but
    DPVS's lines: scripts parse them (whether a server is overloaded is in REST and /metrics)."""
    out = []
    if header:
        out.append(f"IP Virtual Server version {data.get('version', IPVS_VERSION)} "
                   f"(size={data.get('size', DEFAULT_SIZE)})")
    out += _title(fmt)
    for s in _sorted_services(data["services"], fmt.nosort):
        out.append(_service_line(s, fmt))
        out += [_dest_line(s, d, fmt) for d in _sorted_dests(s["dests"], fmt.nosort)]
    return "".join(line + "\n" for line in out)


def format_save(data: dict, fmt: Format) -> str:
    """-S: one command line per service, real server and local address, readable by -R.

    ipvsadm writes services and real servers only; the local addresses are added because a FullNAT service
    restored without them cannot forward. A sorry server that a lost quorum put in is left out, as a check's weight
    0 is (the configured weight is written): both are the health checks' doing. Real servers come in the daemon's
    order, not sorted as ipvsadm writes them: it is the order the schedulers walk (fo's tie, sh/dh's bucket layout,
    as LVS's), so -R, adding them in that order, builds the same tables.
    """
    out = []
    for s in _sorted_services(data["services"], fmt.nosort):
        if s.get("match"):
            svc = f"-H {match_text(s['match'], rule=True)}"
        else:
            svc = (f"{'-t' if s['proto'] == 'tcp' else '-u'} "
                   f"{addrport(s['addr'], s['port'], s['proto'], fmt.numeric, rule=True)}")
        line = f"-A {svc} -s {s['sched']}"
        flags = sched_flags_text(s.get("flags") or [], s.get("sched_params") or {})
        if flags:
            line += f" --sched-flags {flags}"
        if s.get("persistent"):
            line += f" -p {s['persistent']}"
            if not _full_mask(s.get("netmask"), _version(s["addr"])):
                line += f" -M {s['netmask']}"
        out.append(line)
        for d in s["dests"]:
            if (d.get("health") or {}).get("sorry"):
                continue  # put in by a lost quorum and taken out with it, not configuration
            line = (f"-a {svc} -r {addrport(d['addr'], d['port'], s['proto'], fmt.numeric, rule=True)} "
                    f"{FWD_SWITCHES.get(d['fwd'], '-g')} -w {d.get('conf_weight', d['weight'])}")
            if d.get("u_threshold"):
                line += f" -x {d['u_threshold']}"
            if d.get("l_threshold"):
                line += f" -y {d['l_threshold']}"
            out.append(line)
        out += [f"-P {svc} -z {la['addr']} -F {la['ifname']}" for la in s.get("laddrs") or []]
    return "".join(line + "\n" for line in out)


def format_timeout(data: dict) -> str:
    """-L --timeout, ipvsadm's list_timeout: ESTABLISHED, FIN_WAIT and UDP idle timeouts in seconds."""
    return f"Timeout (tcp tcpfin udp): {data['tcp']} {data['tcpfin']} {data['udp']}\n"


def format_laddrs(data: dict) -> str:
    """-G, DPVS's list_laddrs layout: the title comes with the first service only."""
    out = []
    for i, s in enumerate(data["services"]):
        if i == 0:
            out.append(f"{'VIP:VPORT':<20} {'TOTAL':<8} {'SNAT_IP':<20} {'CONFLICTS':<10} {'CONNS':<10}")
        out.append(f"{addrport(s['addr'], s['port'], s['proto'], True):<20} {len(s['laddrs']):<8} ")
        out += [f"{'':<20} {'':<8} {la['addr']:<20} {la['conflicts']:<10} {la['conns']:<10}" for la in s["laddrs"]]
    return "".join(line + "\n" for line in out)


def format_conns(data: dict, fmt: Format) -> str:
    """-c, DPVS's print_conn_entry layout: [cpu]proto time state client virtual local real-server ([-] for a
    shared conn table: every CPU uses the one copy).

    The daemon keeps one entry per direction; only the inbound one is shown, as DPVS shows each connection
    once. The time column is the seconds left before the entry expires (expire_s: its state's running timeout
    less its idle time; 0 once past it, until the sweep removes it), counting down as LVS's expire column does
    (DPVS's ipvsadm prints the state's whole timeout there, which never counts down), written in DPVS's form
    ("87s"), as the template lines are. No header line: DPVS prints none for -c.
    """
    return format_conn_lines(data["conns"], fmt) + format_templates(data.get("templates"), fmt)


def format_conn_lines(conns: list, fmt: Format) -> str:
    """format_conns()'s connection lines (a page of them)."""
    out = []
    for c in conns:
        if c.get("out"):
            continue
        proto = PROTO_NAMES.get(c["proto"], "--")

        def ap(addr_key, port_key):
            return addrport(str(c[addr_key]), c[port_key], proto, fmt.numeric or proto == "--")

        cpu = "-" if c.get("cpu") is None else c["cpu"]  # None: --conn-table shared, one copy for every CPU
        out.append(f"[{cpu}]{proto:<3} {str(c['expire_s']) + 's':<6} {str(c['state']).upper():<11} "
                   f"{ap('saddr', 'sport'):<18} {ap('daddr', 'dport'):<18} {ap('to_saddr', 'to_sport'):<18} "
                   f"{ap('to_daddr', 'to_dport')}")
    return "".join(line + "\n" for line in out)


def format_templates(templates, fmt: Format) -> str:
    """format_conns()'s template lines, after the connections."""
    out = []
    # Persistence templates, as LVS lists them among connections: client port 0, state NONE; the client is
    # its network (the address masked by -M), the time is what is left of the template's -p timeout, and the
    # cpu is "-" (templates are shared by every CPU). There is no local address: "-".
    for t in templates or []:
        proto = t["proto"]
        real = addrport(t["daddr"], t["dport"], proto, fmt.numeric) if t.get("daddr") else "?"
        out.append(f"[-]{proto:<3} {str(t['expire_s']) + 's':<6} {'NONE':<11} "
                   f"{addrport(t['client'], 0, proto, True):<18} "
                   f"{addrport(t['vaddr'], t['vport'], proto, fmt.numeric):<18} {'-':<18} {real}")
    return "".join(line + "\n" for line in out)


USAGE = f"""\
{PROG} hdslb-{__version__} (IPVS v{IPVS_VERSION} command set over the hdslbd control socket)
Usage:
  {PROG} -A|E -t|u service-address [-s scheduler] [--sched-flags flags] [-p [timeout]] [-M netmask]
  {PROG} -A|E -H match [-s scheduler] [--sched-flags flags]
  {PROG} -D -t|u service-address
  {PROG} -C
  {PROG} -R
  {PROG} -S [-n]
  {PROG} -P|Q -t|u service-address -z local-address -F ifname
  {PROG} -G [-t|u service-address]
  {PROG} -a|e -t|u service-address -r server-address [options]
  {PROG} -a|e -H match -r source-address:0 [-J] [-w weight]
  {PROG} -d -t|u service-address -r server-address
  {PROG} -L|l [options]
  {PROG} -Z [-t|u service-address]
  {PROG} --set tcp tcpfin udp
  {PROG} -h

Commands:
Either long or short options are allowed.
  --add-service     -A        add virtual service with options
  --edit-service    -E        edit virtual service with options
  --delete-service  -D        delete virtual service
  --clear           -C        clear the whole table
  --restore         -R        restore rules from stdin
  --save            -S        save rules to stdout
  --add-laddr       -P        add local address
  --del-laddr       -Q        del local address
  --get-laddr       -G        get local address
  --add-server      -a        add real server with options
  --edit-server     -e        edit real server with options
  --delete-server   -d        delete real server
  --list            -L|-l     list the table
  --zero            -Z        zero counters in a service or all services
  --set tcp tcpfin udp        set connection timeout values (seconds; 0 keeps the current value)
  --help            -h        display this help message
  --version         -v        display the version

Options:
  --tcp-service  -t service-address   service-address is host[:port]
  --udp-service  -u service-address   service-address is host[:port]
  --match        -H match             a SNAT service selected by MATCH (instead of -t|-u):
                                      proto=tcp|udp|icmp[,src-range=IP1[-IP2]][,dst-range=IP1[-IP2]]
                                      [,iif=IFNAME][,oif=IFNAME]  (IPv4; its real servers are sapool
                                      addresses ADDR:0, or 0.0.0.0:0 for the src of the route taken)
  --scheduler    -s scheduler         one of rr|wrr|lc|wlc|sh|dh|mh|conhash|fo,
                                      the default scheduler is {DEFAULT_SCHED}.
  --sched-flags  flags                sh-port,sh-fallback,mh-port,mh-fallback (LVS), and the table's
                                      size=N (sh/dh/mh/conhash; mh: a prime, default 65537), seed=N,
                                      replicas=N (conhash), horizon=N (lc/wlc)
  --persistent   -p [timeout]         persistent service (default timeout {DEFAULT_PERSISTENT})
  --netmask      -M netmask           persistent granularity mask
  --real-server  -r server-address    server-address is host (and port)
  --gatewaying   -g                   gatewaying (direct routing) (default)
  --ipip         -i                   ipip encapsulation (tunneling)
  --fullnat      -b                   fullnat mode
  --snat         -J                   SNAT mode
  --masquerading -m                   masquerading (NAT)
  --tun-type     type                 with -i: ipip (the only type: IPIP, 6in6 for IPv6)
  --weight       -w weight            capacity of real server
  --u-threshold  -x uthreshold        upper threshold of connections
  --l-threshold  -y lthreshold        lower threshold of connections
  --connection   -c                   output of current connections
  --timeout                           output of timeout (tcp tcpfin udp)
  --stats                             output of statistics information
  --rate                              output of rate information
  --exact        -X                   expand numbers (display exact values)
  --thresholds                        output of thresholds information
  --persistent-conn                   output of persistent connection info (with -c: templates only)
  --tun-info                          output of tunnel information
  --nosort                            disable sorting output of service/server entries
  --sort                              does nothing, for backwards compatibility
  --numeric      -n                   numeric output of addresses and ports
  --laddr        -z local-ip          local IP
  --ifname       -F ifname            nic interface for laddrs
  --ctl-socket   PATH                 hdslbd control socket (default $HDSLB_CTRL or /var/run/hdslb_ctrl)
"""


def render(inv: Invocation, data) -> str:
    """The text for an invocation's last reply (empty for commands that print nothing)."""
    if inv.view == "services":
        return format_list(data, inv.fmt)
    if inv.view == "service":
        return format_list(data, inv.fmt, header=False)
    if inv.view == "save":
        return format_save(data, inv.fmt)
    if inv.view == "laddrs":
        return format_laddrs(data)
    if inv.view == "timeout":
        return format_timeout(data)
    if inv.view == "conns":
        return format_conns(data, inv.fmt)
    if inv.view == "help":
        return USAGE
    if inv.view == "version":
        return USAGE.splitlines()[0] + "\n"
    return ""


# ------------------------------------------------------------------------------------------------ main


# -Lnc reads the connections in pages of this many entries (each direction one), printing each page as it comes:
# the daemon lists a snapshot of the table page by page (conn.list's limit/cursor), so a million connections
# never make one reply past the control frame, nor hold the daemon's event loop.
CONN_PAGE = 20_000


def _page_conns(client, args: dict, fmt: Format, write=None) -> str:
    """conn.list page by page, each page's lines written as they come, the templates last. A daemon that does not
    page (no "next" in its reply) gives everything in its first reply. Returns what was not written (write None:
    everything, for a caller that wants the text)."""
    text = []
    emit = write or text.append
    data = client.call("conn.list", dict(args, limit=CONN_PAGE, inbound=True)) or {}
    templates = data.get("templates")
    while True:
        emit(format_conn_lines(data.get("conns") or [], fmt))
        if data.get("next") is None or data.get("cursor") is None:
            break
        data = client.call("conn.list", dict(args, limit=CONN_PAGE, inbound=True, cursor=data["cursor"],
                                             offset=data["next"])) or {}
    emit(format_templates(templates, fmt))
    return "".join(text)


def execute(client, inv: Invocation, write=None) -> str:
    """Run an invocation's requests and return the text of its last reply; a connection listing (-c) is read in
    pages, written with write() as it comes when given."""
    if inv.view == "conns" and len(inv.requests) == 1 and not inv.requests[0][1].get("templates_only"):
        return _page_conns(client, inv.requests[0][1], inv.fmt, write)
    data = None
    for op, args in inv.requests:
        data = client.call(op, args)
        # An accepted change that cannot work yet (a tunnel without an outer source, a DR server behind a
        # gateway) comes back with warnings: said on stderr, the exit code stays 0.
        for w in (data or {}).get("warnings", ()) if isinstance(data, dict) else ():
            print(f"{PROG}: warning: {w}", file=sys.stderr)
    return render(inv, data)


# libipvs's ipvs_strerror words some refusals by the call that got them, where the daemon has one message: a real
# server or local address command naming a missing service says "Service not defined" (the service commands say
# "No such service"), and DPVS's -Q names a missing local address with a capital L. Only the daemon's plain
# message is reworded; a more precise one stands.
_STRERROR = {
    **{(op, errno.ESRCH, "No such service"): "Service not defined"
       for op in ("dest.add", "dest.edit", "dest.del", "laddr.add", "laddr.del")},
    ("laddr.del", errno.ENOENT, "No such local address"): "No such Local address",
}


def _worded(e: HdslbError, op: str) -> HdslbError:
    e.message = _STRERROR.get((op, e.errno, e.message), e.message)
    return e


class _Libipvs:
    """The daemon client as ipvsadm's libipvs: refusals worded by ipvs_strerror (a batch's by the op refused)."""

    def __init__(self, client):
        self._client = client

    def call(self, op: str, args: dict | None = None):
        try:
            return self._client.call(op, args)
        except HdslbError as e:
            raise _worded(e, op) from None

    def batch(self, ops: list, dry_run: bool = False):
        try:
            return self._client.batch(ops, dry_run=True) if dry_run else self._client.batch(ops)
        except HdslbError as e:
            i = getattr(e, "index", None)
            raise (_worded(e, ops[i][0]) if isinstance(i, int) and 0 <= i < len(ops) else e) from None


def _read_expects(inv: Invocation) -> list:
    """A read line that names a service (-L/-Z/--get-laddr -t ...) fails when the service is not there at that
    point of the restore; an edit that names only the service fails the same way and changes nothing, so the dry
    run refuses the restore before any line of it is applied."""
    return [("service.edit", dict(a["svc"])) for _, a in inv.requests if isinstance(a.get("svc"), dict)]


def _restore(client, batch: list[tuple[int, Invocation]]) -> int:
    """Send the rule lines as one batch (each a request inside it): the daemon checks them all on a copy of its
    rules, then applies them, each touched service's table rebuilt once. A refused line is reported as
    `line N: reason` with exit 2 and nothing of the restore is applied (ipvsadm -R stops at a bad line too; here
    the lines before it are not left half applied either). Lines that read (-L, -Z, -S, -G) run in their place;
    the changes around them are checked together first (run_lines)."""
    ok = run_lines(client, batch, lambda inv: sys.stdout.write(execute(client, inv)),
                   lambda msg: print(msg, file=sys.stderr), lambda msg: print(f"{PROG}: warning: {msg}", file=sys.stderr),
                   "restore", _read_expects)
    return EXIT_OK if ok else EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    return closed_stdout_quiet(lambda: _main(argv))  # `| head`: no "Broken pipe", no traceback


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        path, argv = take_ctl_socket(argv)
        inv = parse(argv)
        batch = parse_restore(sys.stdin.read()) if inv.command == "restore" else None
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    if batch is None and not inv.requests:
        sys.stdout.write(render(inv, None))
        return EXIT_OK

    def run() -> int:
        with Client(path) as daemon:
            client = _Libipvs(daemon)
            if batch is not None:
                return _restore(client, batch)
            sys.stdout.write(execute(client, inv, sys.stdout.write))
            return EXIT_OK

    return guarded(run, "", PROG)


if __name__ == "__main__":
    sys.exit(main())
