"""dpip for hdslb: DPVS's `dpip` (addr, route, neigh, link) spoken over the hdslbd control socket.

Grammar and show layouts follow DPVS's tools/dpip (dpip.c, addr.c, route.c, neigh.c, link.c). Usage errors
exit 2 and daemon refusals exit 1 (DPVS's dpip exits 1 for both). Addresses and prefixes are checked here,
before anything is sent. What DPVS's dpip takes and hdslb cannot do (its DPDK, bonding, vlan/tunnel devices, traffic
control, lifetimes, tos routing) is refused with the reason, never taken and ignored.

    parse(argv) -> Invocation (requests to send + how to show the reply)    pure
    render(inv, reply data) -> text                                           pure
    main() = parse, call the daemon, render, exit code
"""

from __future__ import annotations

import errno
import ipaddress
import re
import sys
import time
from dataclasses import dataclass, field

from cli.common import (EXIT_FAIL, EXIT_OK, EXIT_USAGE, UsageError, closed_stdout_quiet, guarded, ip_or_none, run_lines,
                        shell_words, take_ctl_socket)
from hdslb import __version__
from hdslb.ctl.client import Client
from hdslb.errors import HdslbError

PROG = "dpip"
EXIT_INTERRUPTED = 130  # 128 + SIGINT
AF_NAMES = {4: "inet", 6: "inet6"}  # DPVS's af_itoa

USAGE = f"""\
Usage:
    {PROG} [OPTIONS] OBJECT {{ COMMAND | help }}
Parameters:
    OBJECT  := {{ link | addr | route | neigh }}
    COMMAND := {{ add | del | show (list) | set (change) | flush }}
Options:
    -h, --help
    -V, --version
    -4, --family=inet
    -6, --family=inet6
    -s, --stats, statistics
    -v, --verbose        taken, as DPVS's; nothing more is shown (no DPDK device details here)
    -C, --color          taken, as DPVS's; output stays plain
    -i, --interval=SECS  with -s link show: per-second rates sampled over SECS, repeated
    -c, --count=N        how many samples of -i (default: until interrupted)
    -b, --batch FILE     read commands from FILE ('-': stdin), one per line, as iproute2's ip -batch; every
                         line is checked first, then the changes go as one request: all applied, or none
    --ctl-socket PATH    hdslbd control socket (default $HDSLB_CTRL or /var/run/hdslb_ctrl)
"""

OBJECT_HELP = {
    "addr": f"""\
Usage:
    {PROG} addr show [ dev STRING ]
    {PROG} -6 addr show [ dev STRING ]
    {PROG} addr add IFADDR dev STRING [ LIFETIME ] [ SCOPE ] [ FLAGS ]
    {PROG} addr del IFADDR dev STRING
    {PROG} addr flush dev STRING
    {PROG} addr help
Parameters:
    IFADDR    := {{ PREFIX | ADDR }}
    PREFIX    := {{ ADDR/PLEN }}
    SCOPE     := [ scope {{ host | link | global }} ]
    LIFETIME  := [ valid_lft forever ] [ preferred_lft forever ]
    FLAGS     := sapool
""",
    "route": f"""\
Usage:
    {PROG} route {{ show [ dev IFNAME ] | flush | help }}
    {PROG} route {{ add | del | set }} ROUTE
Parameters:
    ROUTE      := PREFIX [ via ADDR ] [ dev IFNAME ] [ OPTIONS ]
    PREFIX     := {{ ADDR/PLEN | ADDR | default }}
    OPTIONS    := [ SCOPE | mtu MTU | src ADDR | metric NUM | local | onlink | tos 0 | PROTOCOL ]
    SCOPE      := [ scope {{ host | link | global | kni_host }} ]
    PROTOCOL   := [ proto {{ auto | boot | static | ra | NUM }} ] (taken, not kept: shown as auto, as DPVS does)
Examples:
    {PROG} route show
    {PROG} route add 172.0.0.0/16 via 172.0.0.3 dev dpdk0
    {PROG} route add 192.168.0.0/24 dev dpdk0
    {PROG} -6 route add 2001:db8:1::/64 via 2001:db8:1::1 dev dpdk0
    {PROG} route del 172.0.0.0/16
    {PROG} route set 172.0.0.0/16 via 172.0.0.1 dev dpdk0
    {PROG} route flush
""",
    "neigh": f"""\
Usage:
    {PROG} neigh show [ dev DEVICE ]
    {PROG} neigh add ADDR lladdr LLADDR dev DEVICE
    {PROG} neigh del ADDR [ dev DEVICE ]
    {PROG} neigh help
""",
    "link": f"""\
Usage:
    {PROG} link show [ NIC-NAME ]
    {PROG} -s link show [ -i INTERVAL ] [ -c COUNT ] [ NIC-NAME ]
    {PROG} link show cpu
    {PROG} -s link show [ -i INTERVAL ] [ -c COUNT ] CPU-NAME
Parameters:
    CPU-NAME := {{ cpu | cpuN }}
""",
}

# DPVS's command words and their aliases, then which of them each object here implements.
COMMAND_WORDS = {"add": "add", "del": "del", "set": "set", "change": "set", "show": "show", "list": "show",
                 "flush": "flush", "create": "create", "destroy": "destroy",
                 "replace": "replace", "test": "test", "enable": "enable", "disable": "disable"}
OBJECT_COMMANDS = {
    "addr": ("add", "del", "show", "flush"),
    "route": ("add", "del", "set", "show", "flush"),
    "neigh": ("add", "del", "show"),
    "link": ("show",),
}
ADDR_SCOPES = ("host", "link", "global")
ADDR_LIFETIMES = ("valid_lft", "preferred_lft", "prefered_lft")  # DPVS's parser spells it prefered_lft
ROUTE_SCOPES = ("host", "link", "global", "kni_host")
ROUTE_PROTOS = ("auto", "boot", "static", "ra")
# What DPVS's dpip has that hdslb cannot do, and why: refused (exit 2) rather than taken and ignored.
DPVS_ONLY_OBJECTS = {
    "vlan": "hdslb creates no devices; a VLAN interface is the kernel's (ip link add ... type vlan), attached by "
            "naming it in hdslb.conf",
    "tunnel": "hdslb creates no devices; a tunnel interface is the kernel's (ip link / ip tunnel), and TUNNEL "
              "forwarding (ipvsadm -i) encapsulates without one",
    "qsch": "hdslb has no traffic control of its own; tc on the interface sees only what the fast path passes",
    "cls": "hdslb has no traffic control of its own; tc on the interface sees only what the fast path passes",
    "ipv6": "hdslb keeps no IPv6 stack settings or counters of its own (dpip -s link show, hdslb-ctl top)",
    "iftraf": "no per-flow interface traffic table is kept (hdslb-ctl top shows the fast path's rates)",
    "eal-mem": "there is no DPDK (EAL) memory: the fast path is XDP",
    "ipset": "hdslb has no ipsets (deny/allow lists are the config's deny/allow groups)",
    "flow": "there are no DPDK rte_flow rules: the fast path is XDP (steer with the NIC's ethtool -N rules)",
    "maddr": "multicast addresses are the kernel's (ip maddr)",
    "lldp": "LLDP is the kernel's (lldpd on the interface)",
}
DPVS_ONLY_COMMANDS = {
    ("link", "set"): "the interface is the kernel's (ip link set DEV promisc|up|down|address ...); hdslb has no "
                     "forward2kni, bonding or tc of its own",
    ("link", "add"): "hdslb has no bonding devices of its own (a kernel bond is attached as any interface)",
    ("link", "del"): "hdslb has no bonding devices of its own (a kernel bond is attached as any interface)",
    ("addr", "set"): "delete the address and add it again with the new scope or flags",
}
MAC_RE = re.compile(r"[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}")


@dataclass
class Invocation:
    """One parsed command line: the requests to send in order, and how to show the last reply."""
    obj: str | None
    cmd: str
    requests: list[tuple[str, dict]] = field(default_factory=list)
    stats: bool = False  # -s
    text: str = ""  # what help and version print
    interval: float | None = None  # -i: seconds between repeated shows
    count: int | None = None  # -c: how many shows
    batch: str | None = None  # -b FILE: commands read from FILE ('-': stdin)
    cpu: int | None = None  # link show cpuN: that CPU's row only


def _fail(msg: str) -> UsageError:
    return UsageError(f"{PROG}: {msg}")


# --------------------------------------------------------------------------------------------- parsing


def _global_options(argv: list[str]) -> tuple[dict, list[str]]:
    """Take dpip's own options out of argv wherever they are (getopt_long permutes), keep the words in order.
    DPVS's -v (verbose) and -C (color) only change what a show prints: taken, and the output stays as it is."""
    opts = {"af": None, "stats": False, "help": False, "version": False, "interval": None, "count": None,
            "batch": None}
    words = []
    it = iter(argv)
    for tok in it:
        if tok == "--":
            words.extend(it)
        elif tok.startswith("--"):
            name, eq, val = tok[2:].partition("=")
            if name in ("stats", "statistics"):
                opts["stats"] = True
            elif name == "help":
                opts["help"] = True
            elif name == "version":
                opts["version"] = True
            elif name in ("verbose", "color"):
                pass
            elif name == "force":
                raise _fail(_NO_FORCE)
            elif name == "family":
                opts["af"] = _family(val if eq else next(it, ""))
            elif name in ("interval", "count"):
                opts[name] = _sample_option(name[0], val if eq else next(it, ""))
            elif name == "batch":
                opts["batch"] = val if eq else next(it, "")
                if not opts["batch"]:
                    raise _fail("--batch needs a file name ('-' for stdin)")
            else:
                raise _fail(f"invalid option: {tok}")
        elif tok.startswith("-") and len(tok) > 1:
            chars = tok[1:]
            for i, ch in enumerate(chars):
                if ch in "46":
                    opts["af"] = int(ch)
                elif ch == "s":
                    opts["stats"] = True
                elif ch == "h":
                    opts["help"] = True
                elif ch == "V":
                    opts["version"] = True
                elif ch in "vC":
                    pass
                elif ch == "F":
                    raise _fail(_NO_FORCE)
                elif ch == "f":
                    opts["af"] = _family(chars[i + 1:] or next(it, ""))
                    break
                elif ch == "b":  # -b FILE, -batch FILE (iproute2's spelling)
                    val = chars[i + 1:] or next(it, "")
                    if val == "atch":
                        val = next(it, "")
                    if not val:
                        raise _fail("-b needs a file name ('-' for stdin)")
                    opts["batch"] = val
                    break
                elif ch in "ic":  # -i INTERVAL -c COUNT: sample the counters of -s link show
                    opts["interval" if ch == "i" else "count"] = _sample_option(ch, chars[i + 1:] or next(it, ""))
                    break
                else:
                    raise _fail(f"invalid option: -{ch}")
        else:
            words.append(tok)
    return opts, words


_NO_FORCE = "-F (force) is not taken: no command here has a forced form"


_INTERVAL_RE = re.compile(r"[0-9]{1,9}(\.[0-9]+)?")  # seconds; float() also reads nan, inf, 1e400 and 1_0


def _sample_option(ch: str, val: str) -> float | int:
    ok = _INTERVAL_RE.fullmatch(val) if ch == "i" else _digits(val)
    num = (float(val) if ch == "i" else int(val)) if ok else 0
    if num <= 0:
        raise _fail(f"invalid {'interval' if ch == 'i' else 'count'}: {val!r}")
    return num


def _digits(text: str) -> bool:
    """ASCII digits only: int() and str.isdigit() also take "٨٠" (80), " 80" and "8_0"."""
    return text.isascii() and text.isdigit()


def _family(name: str) -> int:
    if name == "inet":
        return 4
    if name == "inet6":
        return 6
    raise _fail("invalid family")


def _keywords(args: list[str], valued: tuple[str, ...], flags: tuple[str, ...] = (),
              operand: bool = True) -> tuple[str | None, dict]:
    """Split `[OPERAND] key value ... flag` into the operand and a {key: value or True} map.

    `operand=False` is for commands that take keywords only: there a stray word is an error, not an address.
    """
    found, kw = None, {}
    it = iter(args)
    for tok in it:
        if tok in valued:
            val = next(it, None)
            if val is None:
                raise _fail(f"missing argument for '{tok}'")
            kw[tok] = val
        elif tok in flags:
            kw[tok] = True
        elif operand and found is None:
            found = tok
        else:
            raise _fail(f"unexpected argument '{tok}'")
    return found, kw


def _ip(text: str, af: int | None, what: str):
    a = ip_or_none(text)
    if a is None:
        raise _fail(f"invalid {what} '{text}'")
    if af not in (None, a.version):
        raise _fail(f"{what} {text} is not an IPv{af} address")
    return a


def _uint(text: str, what: str) -> int:
    if not _digits(text):
        raise _fail(f"invalid {what} '{text}'")
    return int(text)


def _require_dev(kw: dict) -> str:
    if "dev" not in kw:
        raise _fail("no device specified.")
    return kw["dev"]


def _parse_addr(cmd: str, args: list[str], af: int | None) -> tuple[str, dict]:
    if cmd == "show":
        _, kw = _keywords(args, ("dev",), operand=False)
        return "addr.list", {"ifname": kw.get("dev"), "af": af}
    if cmd == "flush":
        _, kw = _keywords(args, ("dev",), operand=False)
        return "addr.flush", {"ifname": _require_dev(kw)}
    valued, flags = ((("dev", "scope", "broadcast") + ADDR_LIFETIMES, ("sapool",)) if cmd == "add"
                     else (("dev",), ()))
    prefix, kw = _keywords(args, valued, flags)
    if "broadcast" in kw:
        raise _fail("broadcast is not supported: hdslb keeps no broadcast address")
    for name in ADDR_LIFETIMES:
        if kw.get(name, "forever") != "forever":
            raise _fail(f"{name} {kw[name]} is not supported: addresses stay until deleted (forever)")
    if prefix is None:
        raise _fail("missing IFADDR")
    try:
        iface = ipaddress.ip_interface(prefix)
    except ValueError:
        raise _fail(f"invalid IFADDR '{prefix}'") from None
    if af not in (None, iface.version):
        raise _fail(f"IFADDR {prefix} is not an IPv{af} address")
    dev = _require_dev(kw)
    args = {"addr": str(iface.ip), "prefixlen": iface.network.prefixlen, "ifname": dev}
    if cmd == "del":
        if "/" not in prefix:  # any prefix length; given, it must be the address's (as ip addr del)
            del args["prefixlen"]
        return "addr.del", args
    scope = kw.get("scope")
    if scope is not None and scope not in ADDR_SCOPES:
        raise _fail(f"invalid scope '{scope}' ({' | '.join(ADDR_SCOPES)})")
    return "addr.add", {**args, "scope": scope, "sapool": bool(kw.get("sapool"))}


def _parse_route(cmd: str, args: list[str], af: int | None) -> tuple[str, dict]:
    if cmd == "show":  # DPVS's route show takes dev: the routes leaving by that device
        _, kw = _keywords(args, ("dev",), operand=False)
        return "route.list", {"af": af or 4, **({"ifname": kw["dev"]} if "dev" in kw else {})}
    if cmd == "flush":
        _keywords(args, (), operand=False)
        return "route.flush", {"af": af or 4}
    prefix, kw = _keywords(args, ("via", "dev", "src", "mtu", "metric", "scope", "tos", "proto"),
                           ("local", "onlink"))
    if prefix is None:
        raise _fail("missing prefix")
    # DPVS's parser: onlink is output only (a route without via is on-link), proto is not kept (shown as auto)
    if "proto" in kw and kw["proto"] not in ROUTE_PROTOS and not _digits(kw["proto"]):
        raise _fail(f"invalid proto '{kw['proto']}' ({' | '.join(ROUTE_PROTOS)} | NUM)")
    if kw.get("tos", "0") != "0":
        raise _fail(f"tos {kw['tos']} is not supported: routes here match on the destination alone")
    if kw.get("local"):  # DPVS: local = scope host
        if kw.get("scope", "host") != "host":
            raise _fail(f"local is scope host, not scope {kw['scope']}")
        kw["scope"] = "host"
    if prefix == "default":
        if af is None:  # as DPVS's parser: the gateway's (else the source's) family, IPv4 without either
            af = next((a.version for a in map(ip_or_none, (kw.get("via"), kw.get("src"))) if a is not None), None)
        net = ipaddress.ip_network("::/0" if af == 6 else "0.0.0.0/0")
    else:
        try:
            net = ipaddress.ip_network(prefix)  # strict: host bits set in a prefix are a typo, not a route
        except ValueError:
            raise _fail(f"invalid prefix '{prefix}'") from None
        if af not in (None, net.version):
            raise _fail(f"prefix {prefix} is not an IPv{af} prefix")
    af = net.version
    scope = kw.get("scope")
    if scope is not None and scope not in ROUTE_SCOPES:
        raise _fail(f"invalid scope '{scope}' ({' | '.join(ROUTE_SCOPES)})")
    # DPVS deletes a route by prefix alone; add and set need the device the route leaves by.
    dev = kw.get("dev") if cmd == "del" else _require_dev(kw)
    op = {"add": "route.add", "del": "route.del", "set": "route.set"}[cmd]
    return op, {
        "af": af, "prefix": str(net.network_address), "prefixlen": net.prefixlen,
        "via": str(_ip(kw["via"], af, "gateway")) if "via" in kw else None,
        "src": str(_ip(kw["src"], af, "source address")) if "src" in kw else None,
        "ifname": dev,
        "mtu": _uint(kw["mtu"], "mtu") if "mtu" in kw else None,
        "metric": _uint(kw["metric"], "metric") if "metric" in kw else None,
        "scope": scope,
    }


def _mac(text: str) -> str:
    if not MAC_RE.fullmatch(text):
        raise _fail("invalid link layer addr")
    return ":".join(f"{int(x, 16):02x}" for x in text.split(":"))


def _parse_neigh(cmd: str, args: list[str], af: int | None) -> tuple[str, dict]:
    if cmd == "show":
        _, kw = _keywords(args, ("dev",), operand=False)
        return "neigh.list", {"ifname": kw.get("dev"), "af": af}
    addr, kw = _keywords(args, ("lladdr", "dev"))
    if addr is None:
        raise _fail("missing ip address")
    ip = str(_ip(addr, af, "IP address"))
    # DPVS's usage writes `neigh del ADDR lladdr LLADDR dev DEVICE`; the lladdr is checked, then not needed.
    lladdr = _mac(kw["lladdr"]) if "lladdr" in kw else None
    if cmd == "del":
        return "neigh.del", {"addr": ip, "ifname": kw.get("dev")}
    if lladdr is None or lladdr == "00:00:00:00:00:00":
        raise _fail("invalid MAC address")
    return "neigh.add", {"addr": ip, "lladdr": lladdr, "ifname": _require_dev(kw)}


def _parse_link(cmd: str, args: list[str], af: int | None) -> tuple[str, dict]:
    ifname, kw = _keywords(args, (), ("status",))
    if kw:
        raise _fail("link show status is not supported: hdslb has no bonding devices of its own (a kernel bond "
                    "is shown as any interface)")
    if _cpu_of(ifname) is not False:  # dpip link show cpu[N]: the fast path's counters per CPU
        return "stats.get", {}
    return "link.list", {"ifname": ifname}


def _cpu_of(name: str | None) -> int | None | bool:
    """DPVS's CPU-NAME: `cpu` -> None (every CPU), `cpuN` -> N; False for a NIC name (one not starting with cpu)."""
    if name is None or not name.startswith("cpu"):
        return False
    if name == "cpu":
        return None
    if not _digits(name[3:]):
        raise _fail(f"invalid CPU-NAME '{name}' (cpu or cpuN)")
    return int(name[3:])


PARSERS = {"addr": _parse_addr, "route": _parse_route, "neigh": _parse_neigh, "link": _parse_link}


def parse(argv: list[str]) -> Invocation:
    """One dpip command line (without the program name) -> an Invocation. Raises UsageError."""
    opts, words = _global_options(argv)
    if opts["batch"] is not None and not opts["version"] and not opts["help"]:
        if words:
            raise _fail(f"unexpected argument {words[0]} with -b (the commands come from the file)")
        return Invocation(None, "batch", batch=opts["batch"])
    if opts["version"]:
        return Invocation(None, "version", text=f"{PROG}-hdslb-{__version__}\n")
    if not words:
        if opts["help"]:
            return Invocation(None, "help", text=USAGE)
        raise UsageError(USAGE.rstrip("\n"))
    obj = words[0]
    if obj in DPVS_ONLY_OBJECTS:
        raise _fail(f"{obj} is not supported: {DPVS_ONLY_OBJECTS[obj]}")
    if obj not in PARSERS:
        raise _fail("invalid object, use `-h' for help.")
    if opts["help"] or words[1:2] == ["help"]:
        return Invocation(obj, "help", text=OBJECT_HELP[obj])
    if len(words) < 2:
        raise UsageError(OBJECT_HELP[obj].rstrip("\n"))
    cmd = COMMAND_WORDS.get(words[1])
    if cmd is None:
        raise _fail(f"invalid command {words[1]}")
    if cmd not in OBJECT_COMMANDS[obj]:
        why = DPVS_ONLY_COMMANDS.get((obj, cmd), f"use: {', '.join(OBJECT_COMMANDS[obj])}")
        raise _fail(f"{obj} {words[1]} is not supported: {why}")
    request = PARSERS[obj](cmd, words[2:], opts["af"])
    if opts["interval"] or opts["count"]:
        if obj != "link" or not opts["stats"]:
            raise _fail("-i and -c sample the counters of -s link show only")
        if not opts["interval"]:
            raise _fail("missing option '-i'")
    cpu = _cpu_of(words[2]) if obj == "link" and len(words) > 2 else False
    return Invocation(obj, cmd, [request], stats=opts["stats"], interval=opts["interval"], count=opts["count"],
                      cpu=None if cpu is False else cpu)


# ------------------------------------------------------------------------------------------ formatting


def format_addrs(data: dict) -> str:
    """DPVS addr.c addr_dump; no broadcast address, lifetimes are always forever. Where DPVS ends a sapool
    address's second line with its pool's figures (` sa_used N sa_free N sa_miss N`), hdslb, which keeps no per-
    address pool (the fast path picks a free source port per flow), ends it with ` sapool`."""
    return "".join(
        f"{AF_NAMES[a['af']]} {a['addr']}/{a['prefixlen']} scope {a['scope']} {a['ifname']}\n"
        f"     valid_lft forever preferred_lft forever{' sapool' if a.get('sapool') else ''}\n"
        for a in data["addrs"])


def _route4(r: dict) -> str:
    """DPVS route.c route4_dump: every field, always, and the space its empty flags field leaves at the end."""
    return (f"inet {r['prefix']}/{r['prefixlen']} via {r['via']} src {r['src']} dev {r['ifname']} "
            f"mtu {r['mtu']} tos {r['tos']} scope {r['scope']} metric {r['metric']} proto {r['proto']} ")


def _route6(r: dict) -> str:
    """DPVS route.c route6_dump: `default` for ::/0, via/src/mtu only when set."""
    text = "inet6 default" if r["prefixlen"] == 0 else f"inet6 {r['prefix']}/{r['prefixlen']}"
    if r["via"] not in (None, "::"):
        text += f" via {r['via']}"
    if r["src"] not in (None, "::"):
        text += f" src {r['src']}"
    text += f" dev {r['ifname']}"
    if r["mtu"]:
        text += f" mtu {r['mtu']}"
    return text + f" scope {r['scope']}"


def format_routes(data: dict) -> str:
    return "".join((_route6(r) if r["af"] == 6 else _route4(r)) + "\n" for r in data["routes"])


def format_neighs(data: dict) -> str:
    """DPVS neigh.c neigh_dump, typo and spacing included, so scripts written against DPVS keep working."""
    out = []
    for n in data["neighs"]:
        static = "static" if "static" in (n.get("flags") or []) else ""
        if n.get("lladdr"):
            out.append(f"ip: {n['addr']:<48} mac: {n['lladdr']}   state: {n['state']:<12}  "
                       f"dev: {n['ifname']}  core: {n['cpu']}  {static}\n")
        else:
            out.append(f"ip: {n['addr']:<48} mac:incomplate                       state: {n['state']:<12}   "
                       f"dev: {n['ifname']}  core: {n['cpu']}  {static}\n")
    return "".join(out)


def format_link_basic(link: dict) -> str:
    """DPVS link.c dump_nic_basic: `N: NAME: socket S mtu M rx-queue R tx-queue T`, then the state line (UP or
    DOWN, speed, duplex, then flags, each word followed by a space), then `addr MAC` in DPDK's capitals.
    hdslb's flag is the XDP mode; N is the kernel's ifindex (DPVS: port id + 1)."""
    words = [link.get("state", "UNKNOWN"), f"{link.get('speed', 0)} Mbps", link.get("duplex", ""),
             f"xdp-{link['xdp_mode']}"]
    return (f"{link['ifindex']}: {link['ifname']}: socket {link.get('numa', 0)} mtu {link['mtu']} "
            f"rx-queue {link.get('rxq', 0)} tx-queue {link.get('txq', 0)}\n"
            f"    {''.join(w + ' ' for w in words if w)}\n"
            f"    addr {link['mac'].upper()} \n")


def format_links(data: dict, stats: bool) -> str:
    """DPVS link.c dump_nic_basic / dump_nic_stats, with what an XDP interface has instead of DPDK port facts.
    Counters are the fast path's, for frames received on the interface (tx: sent on by XDP_TX/redirect)."""
    out = []
    for link in data["links"]:
        out.append(format_link_basic(link))
        if stats:
            s = link["stats"]
            out.append(f"    {'ipackets':<20}{'opackets':<20}{'ibytes':<20}{'obytes':<20}\n")
            out.append(f"    {s['rx_packets']:<20}{s['tx_packets']:<20}{s['rx_bytes']:<20}{s['tx_bytes']:<20}\n")
            out.append(f"    {'drops':<20}{'kernel':<20}\n")
            out.append(f"    {s['drops']:<20}{s.get('pass', 0):<20}\n")
    return "".join(out)


def format_link_rates(before: dict, after: dict, seconds: float) -> str:
    """DPVS link.c dump_nic_stats_velocity: what the counters gained over the interval, per second."""
    def rate(key):
        return int((after.get(key, 0) - before.get(key, 0)) / seconds)

    return (f"    {'ipackets/pps':<16}{'opackets/pps':<16}{'ibytes/Bps':<16}{'obytes/Bps':<16}\n"
            f"    {rate('rx_packets'):<16}{rate('tx_packets'):<16}{rate('rx_bytes'):<16}{rate('tx_bytes'):<16}\n"
            f"    {'drops/pps':<16}{'kernel/pps':<16}\n"
            f"    {rate('drops'):<16}{rate('pass'):<16}\n")


CPU_COLUMNS = ("rx", "verdict_tx", "verdict_redirect", "verdict_pass", "verdict_drop")


def _cpus(pc: dict, cpu: int | None) -> range:
    n = len(pc["rx"])
    if cpu is None:
        return range(n)
    if cpu >= n:
        raise HdslbError(errno.ENODEV, f"cpu{cpu} is not a CPU of the fast path (cpu0..cpu{n - 1})")
    return range(cpu, cpu + 1)


def format_cpu_stats(data: dict, cpu: int | None = None) -> str:
    """dpip -s link show cpu[N]: per-CPU fast-path verdicts (the slave lcores' view in DPVS)."""
    pc = data["per_cpu"]
    out = [f"{'cpu':<6}" + "".join(f"{c.replace('verdict_', ''):<14}" for c in CPU_COLUMNS) + "\n"]
    for n in _cpus(pc, cpu):
        out.append(f"{n:<6}" + "".join(f"{pc[c][n]:<14}" for c in CPU_COLUMNS) + "\n")
    return "".join(out)


def format_cpu_rates(before: dict, after: dict, seconds: float, cpu: int | None = None) -> str:
    """dpip -s link show cpu[N] -i SECS: the per-CPU verdicts gained over the interval, per second."""
    a, b = before["per_cpu"], after["per_cpu"]
    out = [f"{'cpu':<6}" + "".join(f"{c.replace('verdict_', '') + '/pps':<14}" for c in CPU_COLUMNS) + "\n"]
    for n in _cpus(b, cpu):
        out.append(f"{n:<6}" + "".join(f"{int((b[c][n] - a[c][n]) / seconds):<14}" for c in CPU_COLUMNS) + "\n")
    return "".join(out)


def render(inv: Invocation, data) -> str:
    """The text for an invocation's last reply (empty for commands that print nothing)."""
    if inv.cmd in ("help", "version"):
        return inv.text
    if inv.cmd != "show":
        return ""
    if inv.obj == "addr":
        return format_addrs(data)
    if inv.obj == "route":
        return format_routes(data)
    if inv.obj == "neigh":
        return format_neighs(data)
    if inv.requests and inv.requests[-1][0] == "stats.get":
        return format_cpu_stats(data, inv.cpu)
    return format_links(data, inv.stats)


# ------------------------------------------------------------------------------------------------ main


def parse_batch(text: str, af: int | None = None) -> list[tuple[int, Invocation]]:
    """dpip -b input: one command per line (no program name), '#' comments (whole lines, or from a word that starts
    with '#' to the end of the line, as a shell reads them) and blank lines skipped, words split as a shell would
    -> (line number, Invocation). A line ending in a backslash goes on on the next one, as ip -batch reads it (the
    command is named by its first line). Every line is parsed before anything is sent."""
    out = []
    for n, raw in _joined_lines(text):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            words = shell_words(raw, comments=True)
            if not words:
                continue
            if words and words[0] == PROG:
                words = words[1:]
            inv = parse((["-4"] if af == 4 else ["-6"] if af == 6 else []) + words)
        except ValueError as e:  # shlex: an unbalanced quote
            raise _fail(f"line {n}: {e}") from None
        except UsageError as e:
            msg = str(e)
            msg = msg[len(PROG) + 2:] if msg.startswith(PROG + ": ") else msg
            raise _fail(f"line {n}: {msg}") from None
        if inv.batch is not None or inv.interval or inv.count:
            raise _fail(f"line {n}: -b, -i and -c are not taken inside a batch")
        out.append((n, inv))
    return out


def _joined_lines(text: str):
    """(number of its first line, line) of text, a line ending in a backslash joined to the next (iproute2's
    getcmdline drops the backslash and the newline)."""
    start, parts = None, []
    for n, raw in enumerate(text.splitlines(), start=1):
        if start is None:
            start = n
        if raw.endswith("\\"):
            parts.append(raw[:-1])
            continue
        yield start, "".join(parts) + raw
        start, parts = None, []
    if parts:
        yield start, "".join(parts)


def _read_batch(name: str) -> str:
    """The text of dpip -b's file ('-': stdin), as UTF-8; one that is not is a usage error naming the line (it was
    a UnicodeDecodeError traceback)."""
    try:
        if name == "-":
            raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        else:
            with open(name, "rb") as f:
                raw = f.read()
    except OSError as e:
        raise _fail(f"cannot read {name}: {e.strerror}") from None
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise _fail(f"line {line}: not UTF-8 text (byte {e.start})") from None


def run_batch(client, lines: list[tuple[int, Invocation]]) -> int:
    """Changes (add/del/set/flush) go as one batch request; a show runs alone, in its place (the changes around
    it checked together first). A refused line is reported as `dpip: line N: reason`, exit 1, and nothing of
    the batch is applied."""
    from hdslb.ctl.commands import BATCH_OPS  # the control ops (heavy): imported for batches only

    def alone(inv):
        sys.stdout.write(execute(client, inv) if inv.requests else render(inv, None))

    # A show naming a device the daemon does not serve would fail after the changes before it were applied: the
    # devices the shows name are checked first (addr.list refuses an unknown one, changing nothing).
    if any(op not in BATCH_OPS for _, inv in lines for op, _ in inv.requests):
        checked = set()
        for n, inv in lines:
            for op, args in inv.requests:
                dev = args.get("ifname")
                if op in BATCH_OPS or dev is None or dev in checked:
                    continue
                try:
                    client.call("addr.list", {"ifname": dev})
                except HdslbError as e:
                    print(f"{PROG}: line {n}: {e.message}; nothing of the batch was applied", file=sys.stderr)
                    return EXIT_FAIL
                checked.add(dev)

    ok = run_lines(client, lines, alone, lambda msg: print(f"{PROG}: {msg}", file=sys.stderr),
                   lambda msg: print(f"{PROG}: warning: {msg}", file=sys.stderr), "batch")
    return EXIT_OK if ok else EXIT_FAIL


def sample(client, inv: Invocation, sleep=None) -> None:
    """dpip -s link show [NIC | cpu[N]] -i SECS [-c N], as DPVS's: a NIC's basic lines once, then N times (without
    -c: until interrupted) two readings SECS apart and the rates between them; every NIC in turn."""
    op, args = inv.requests[-1]
    sleep = sleep or time.sleep

    def rounds(read, show):
        n = 0
        while inv.count is None or n < inv.count:
            before = read()
            sleep(inv.interval)
            sys.stdout.write(show(before, read()))
            sys.stdout.flush()
            n += 1

    if op == "stats.get":
        rounds(lambda: client.call(op, args), lambda a, b: format_cpu_rates(a, b, inv.interval, inv.cpu))
        return
    for link in client.call(op, args)["links"]:
        sys.stdout.write(format_link_basic(link))
        one = {"ifname": link["ifname"]}
        rounds(lambda: client.call(op, one)["links"][0]["stats"],
               lambda a, b: format_link_rates(a, b, inv.interval))


def execute(client, inv: Invocation) -> str:
    data = None
    for op, args in inv.requests:
        data = client.call(op, args)
    return render(inv, data)


def main(argv: list[str] | None = None) -> int:
    return closed_stdout_quiet(lambda: _main(argv))  # `| head`: no "Broken pipe", no traceback


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        path, argv = take_ctl_socket(argv)
        inv = parse(argv)
        lines = None
        if inv.batch is not None:
            af = _global_options(argv)[0]["af"]
            lines = parse_batch(_read_batch(inv.batch), af)
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    if lines is not None:
        def run_lines() -> int:
            with Client(path) as client:
                return run_batch(client, lines)

        return guarded(run_lines, f"{PROG}: ", PROG)
    if not inv.requests:
        sys.stdout.write(render(inv, None))
        return EXIT_OK

    def run() -> int:
        with Client(path) as client:
            if inv.interval:
                try:
                    sample(client, inv)
                except KeyboardInterrupt:  # how -i without -c ends: quietly, with a shell's status for SIGINT
                    return EXIT_INTERRUPTED
            else:
                sys.stdout.write(execute(client, inv))
        return EXIT_OK

    return guarded(run, f"{PROG}: ", PROG)


if __name__ == "__main__":
    sys.exit(main())
