"""Value types of the keyword table: each turns a statement's argument tokens into a typed value or says why not.

Contract, shared by every kind: `parse(keyword, args)` returns the value or raises `Bad(reason, token)`;
`token` is the argument at fault (None: the keyword itself), so errors point at the right column.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .model import Endpoint, IPAddress, IPNetwork, NotifyScript
from .syntax import Token

MAX_RANGE = 65536  # a range that expands past this is a typo, not a config


class Bad(Exception):
    def __init__(self, reason: str, token: Optional[Token] = None):
        super().__init__(reason)
        self.reason = reason
        self.token = token


class Kind:
    """Base: exactly `nargs` arguments (None: any number, at least `min_args`)."""

    nargs: Optional[int] = 1
    min_args = 1
    what = "a value"

    def parse(self, keyword: Token, args: Sequence[Token]) -> Any:
        self.arity(keyword, args)
        return self.one(args[0]) if self.nargs == 1 else self.many(args)

    def arity(self, keyword: Token, args: Sequence[Token]) -> None:
        if self.nargs is not None and len(args) != self.nargs:
            if len(args) < self.nargs:
                raise Bad(f"expects {self.what}")
            raise Bad(f"expects {self.what}, got extra {args[self.nargs].text!r}", args[self.nargs])
        if self.nargs is None and len(args) < self.min_args:
            raise Bad(f"expects {self.what}")

    def one(self, tok: Token) -> Any:
        raise NotImplementedError

    def many(self, args: Sequence[Token]) -> Any:
        raise NotImplementedError


class Int(Kind):
    def __init__(self, lo: int = 0, hi: int = 2**32 - 1, unit: str = "", what: str = ""):
        self.lo, self.hi, self.unit = lo, hi, unit
        self.what = what or f"an integer {lo}..{hi}" + (f" ({unit})" if unit else "")

    def one(self, tok: Token) -> int:
        v = int_of(tok, self.what)
        if not self.lo <= v <= self.hi:
            raise Bad(f"{v} is out of range, expects {self.what}", tok)
        return v


class OptionalInt(Int):
    """An integer that may be left out, e.g. `persistence_timeout` alone means keepalived's 360 s."""

    def __init__(self, when_bare: int, lo: int = 0, hi: int = 2**32 - 1, unit: str = ""):
        super().__init__(lo, hi, unit)
        self.when_bare = when_bare
        self.nargs, self.min_args = None, 0

    def many(self, args: Sequence[Token]) -> int:
        if len(args) > 1:
            raise Bad(f"expects at most one value, got extra {args[1].text!r}", args[1])
        return self.one(args[0]) if args else self.when_bare


class Seconds(Kind):
    """Seconds, fractions allowed (keepalived accepts `connect_timeout 1.5`)."""

    def __init__(self, lo: float = 0.0, hi: float = 86400.0 * 365):
        self.lo, self.hi = lo, hi
        self.what = f"seconds {lo:g}..{hi:g}"

    def one(self, tok: Token) -> float:
        # ASCII digits, as int_of: float() also reads "٣", "３.5" and "1_0" (keepalived's strtod does not). A sign
        # is read so that -1 is told it is out of range: "'-1' is not a number" misled.
        if not re.fullmatch(r"-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?", tok.text):
            raise Bad(f"{tok.text!r} is not a number, expects {self.what}", tok)
        v = float(tok.text)
        if not self.lo <= v <= self.hi:
            raise Bad(f"{tok.text} is out of range, expects {self.what}", tok)
        return v


class LvsTimeouts(Kind):
    """keepalived's `lvs_timeouts tcp N tcpfin N udp N`: NAME SECONDS pairs in any order, at least one, each name
    once; 0 leaves that timeout unset (keepalived: not set). The value: ((name, seconds), ...) of those set."""

    nargs = None
    min_args = 2

    def __init__(self, names: Sequence[str], hi: int):
        self.names, self.hi = tuple(names), hi
        self.what = f"{'|'.join(self.names)} SECONDS pairs (seconds 0..{hi}, 0: not set)"

    def many(self, args: Sequence[Token]) -> Tuple[Tuple[str, int], ...]:
        out: List[Tuple[str, int]] = []
        seen = set()
        for i in range(0, len(args), 2):
            name = args[i]
            if name.text not in self.names:
                raise Bad(f"unknown option {name.text!r}, expects {self.what}", name)
            if name.text in seen:
                raise Bad(f"{name.text} is given twice", name)
            seen.add(name.text)
            if i + 1 >= len(args):
                raise Bad(f"{name.text} needs a value, expects {self.what}", name)
            v = int_of(args[i + 1], f"seconds 0..{self.hi}")
            if not 0 <= v <= self.hi:
                raise Bad(f"{v} is out of range, expects seconds 0..{self.hi} (0: not set)", args[i + 1])
            if v:
                out.append((name.text, v))
        return tuple(out)


class IntList(Kind):
    """One or more integers, space or comma separated (`rx_queue_ids 0 1`, `isol_rx_cpu_ids 9,10`)."""

    nargs = None

    def __init__(self, lo: int = 0, hi: int = 4095):
        self.item = Int(lo, hi)
        self.what = f"integers {lo}..{hi}"

    def many(self, args: Sequence[Token]) -> Tuple[int, ...]:
        out: List[int] = []
        for t in args:
            for part in t.text.split(","):
                if part:
                    out.append(self.item.one(Token(t.kind, part, t.where)))
        return tuple(out)


_ON = {"on": True, "off": False, "yes": True, "no": False, "true": True, "false": False, "enable": True,
       "disable": False}


class OnOff(Kind):
    what = "on or off"

    def one(self, tok: Token) -> bool:
        try:
            return _ON[tok.text.lower()]
        except KeyError:
            raise Bad(f"{tok.text!r} is not {self.what}", tok) from None


class Flag(Kind):
    """Presence means on (`sack`, `alpha`); an explicit on/off is also taken, as newer keepalived does."""

    nargs, min_args = None, 0
    what = "no value (or on/off)"

    def many(self, args: Sequence[Token]) -> bool:
        if not args:
            return True
        if len(args) > 1:
            raise Bad(f"expects {self.what}, got extra {args[1].text!r}", args[1])
        return OnOff().one(args[0])


class Choice(Kind):
    """One of a fixed set; `aliases` map other spellings to a canonical value."""

    def __init__(self, *values: str, aliases: Optional[Dict[str, str]] = None, fold=str.lower,
                 refuse: Optional[Dict[str, str]] = None):
        self.values = values
        self.fold = fold
        self.table = {fold(v): v for v in values}
        self.table.update({fold(k): v for k, v in (aliases or {}).items()})
        self.refuse = {fold(k): why for k, why in (refuse or {}).items()}
        self.what = "one of " + "|".join(values)

    def one(self, tok: Token) -> str:
        key = self.fold(tok.text)
        if key in self.refuse:
            raise Bad(f"{tok.text!r} {self.refuse[key]}", tok)
        try:
            return self.table[key]
        except KeyError:
            raise Bad(f"{tok.text!r} is not {self.what}", tok) from None


class LbKind(Choice):
    """`lb_kind`/`lvs_method`: a forwarding method, which keepalived 2.1+ lets a TUN service follow with its
    encapsulation, `TUN [type ipip|gue|gre] [port N] [nocsum|csum|remcsum]` (check_parser.c svr_forwarding_handler).
    TUNNEL here is IP in IP (IPIP, IPv6 in IPv6 for an IPv6 service), keepalived's `type ipip`, which with its one
    checksum option, `nocsum` (the default; ipip takes no other), loads as written. GUE and GRE put another header
    in front that a real server set up for IPIP does not take off, so they are refused, not dropped."""

    nargs, min_args = None, 1

    def many(self, args: Sequence[Token]) -> str:
        value, rest = self.one(args[0]), list(args[1:])
        if rest and value != "TUNNEL":
            raise Bad(f"expects {self.what}, got extra {rest[0].text!r} (tunnel options follow TUN only)", rest[0])
        i = 0
        while i < len(rest):
            t = rest[i]
            if t.text == "type":
                if i + 1 >= len(rest):
                    raise Bad("`type` needs a tunnel type: ipip", t)
                kind = rest[i + 1]
                if kind.text in ("gue", "gre"):
                    raise Bad(f"tunnel type {kind.text} is not implemented: TUNNEL encapsulates IP in IP (type "
                              f"ipip), which a real server expecting {kind.text.upper()} would not take off", kind)
                if kind.text != "ipip":
                    raise Bad(f"{kind.text!r} is not a tunnel type (ipip; gue and gre are not implemented)", kind)
                i += 2
            elif t.text == "nocsum":
                i += 1
            elif t.text in ("csum", "remcsum"):
                raise Bad(f"{t.text}: an ipip tunnel takes no checksum option (keepalived refuses it too); it is for "
                          f"gue and gre, which are not implemented", t)
            elif t.text == "port":
                raise Bad("`port` is a GUE tunnel's, and TUNNEL encapsulates IP in IP (type ipip)", t)
            else:
                raise Bad(f"{t.text!r} is not a tunnel option (type ipip, nocsum)", t)
        return value


class Str(Kind):
    what = "a value"

    def __init__(self, pattern: Optional[str] = None, what: str = "a value"):
        self.pattern = re.compile(pattern) if pattern else None
        self.what = what

    def one(self, tok: Token) -> str:
        if self.pattern and not self.pattern.fullmatch(tok.text):
            raise Bad(f"{tok.text!r} is not {self.what}", tok)
        return tok.text


class Text(Kind):
    """The rest of the line as one string: a command or a quoted string."""

    nargs = None
    what = "a command or a quoted string"

    def many(self, args: Sequence[Token]) -> str:
        return " ".join(t.text for t in args)


class Script(Kind):
    """keepalived 2's `KEYWORD SCRIPT [USER [GROUP]]` (notify_up, quorum_up, …; lib/notify.c notify_script_init):
    the line is split into words as keepalived does (single or double quotes group, backslash escapes), the first
    is the command line and the next two the user and group to run it as. So `notify_up /x.sh up` names user
    "up": arguments need the command quoted, `notify_up "/x.sh up"`. The user and group must exist, as keepalived
    checks when it reads the line (it drops the script; hdslb refuses the line)."""

    nargs = None
    what = "SCRIPT [USER [GROUP]] (quote a command that has arguments)"

    def many(self, args: Sequence[Token]) -> NotifyScript:
        import grp
        import pwd
        import shlex

        # a double-quoted token arrives unquoted: quote it again so the words keep their bounds
        line = " ".join(shlex.quote(t.text) if t.kind == "string" else t.text for t in args)
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise Bad(f"cannot split {line!r}: {e}", args[0])
        if not words or not words[0].strip():
            raise Bad(f"expects {self.what}")
        if len(words) > 3:
            raise Bad(f"expects {self.what}, got extra {words[3]!r}: to pass arguments, quote the whole command "
                      f"(notify_up \"/path/script arg\")", args[-1])
        try:
            cmd = shlex.split(words[0])
        except ValueError as e:
            raise Bad(f"cannot split the command {words[0]!r}: {e}", args[0])
        if not cmd:
            raise Bad(f"expects {self.what}", args[0])
        if len(words) > 1:
            try:
                pwd.getpwnam(words[1])
            except KeyError:
                raise Bad(f"user {words[1]!r} does not exist (the words after an unquoted script are USER [GROUP], "
                          f"as keepalived 2 reads them; to pass arguments, quote the whole command)", args[-1])
        if len(words) > 2:
            try:
                grp.getgrnam(words[2])
            except KeyError:
                raise Bad(f"group {words[2]!r} does not exist", args[-1])
        return NotifyScript(words[0], " ".join(words[1:]) or None)


IFNAME = Str(r"[^\s/:]{1,15}", "an interface name (1-15 characters, no '/' or ':')")
# `:` too: DPVS names groups after their address and port (`2001::1-80-TCP_QLB`, `2001::1_deny`)
NAME = Str(r"[A-Za-z0-9_.:\-]+", "a name (letters, digits, _ . : -)")
PATH = Str(r"/\S*", "an absolute path")


class Hex(Kind):
    """Bytes written as hex, as keepalived's UDP_CHECK payload is."""

    nargs, min_args = None, 0
    what = "hex bytes"

    def __init__(self, optional: bool = False):
        self.min_args = 0 if optional else 1

    def many(self, args: Sequence[Token]) -> bytes:
        if len(args) < self.min_args:
            raise Bad(f"expects {self.what}")
        text = "".join(t.text for t in args)
        if text.lower().startswith("0x"):
            text = text[2:]
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise Bad(f"{text!r} is not {self.what}", args[0]) from None


class IP(Kind):
    what = "an IPv4 or IPv6 address"

    def one(self, tok: Token) -> IPAddress:
        return ip_of(tok)


class Port(Kind):
    """0..65535 here; whether 0 is allowed depends on lb_kind, checked once the service is read."""

    def __init__(self, lo: int = 1):
        self.what = "a port 1..65535" + (" (0: SNAT only)" if lo == 0 else "")
        self.item = Int(lo, 65535, what=self.what)

    def one(self, tok: Token) -> int:
        return self.item.one(tok)


class IPPort(Kind):
    nargs = 2
    what = "an address and a port"

    def __init__(self, port_lo: int = 1, port_optional: bool = False):
        self.port = Port(port_lo)
        if port_optional:  # keepalived's sorry_server: without a port it takes the virtual server's (port None here)
            self.nargs, self.what = None, "an address and, optionally, a port"

    def many(self, args: Sequence[Token]) -> Endpoint:
        if len(args) > 2:
            raise Bad(f"expects {self.what}, got extra {args[2].text!r}", args[2])
        return Endpoint(ip_of(args[0]), self.port.one(args[1]) if len(args) > 1 else None)


class DottedMask(int):
    """A persistence_granularity written as a dotted IPv4 netmask, as its prefix length: an IPv6 virtual server
    refuses it (keepalived's pgr_handler reads a prefix length 1..128 there), where as a prefix length 255.255.255.0
    would have grouped IPv6 clients by /24, nearly all of them into one template."""


class Granularity(Kind):
    """keepalived writes a netmask for IPv4 and a prefix length for IPv6; both become a prefix length (a netmask's
    as a DottedMask, so the virtual server's family can refuse it)."""

    what = "a netmask (255.255.255.0) or a prefix length"

    def one(self, tok: Token) -> int:
        if _digits(tok.text):
            v = int_of(tok, "a prefix length 0..128")
            if not 0 <= v <= 128:
                raise Bad(f"{v} is not a prefix length 0..128", tok)
            return v
        try:
            # ones, then zeros: ipaddress alone reads a host mask (0.0.0.255) as the /24 it is the inverse of
            mask = int(ipaddress.IPv4Address(tok.text))
            host = ~mask & 0xFFFFFFFF
            if host & (host + 1):
                raise ValueError(tok.text)
            return DottedMask(32 - host.bit_length())
        except ValueError:
            raise Bad(f"{tok.text!r} is not {self.what}", tok) from None


class StatusCodes(Kind):
    """`status_code 200`, `status_code 200-299 302`: inclusive ranges."""

    nargs = None
    what = "HTTP status codes or ranges (200, 200-299)"

    def many(self, args: Sequence[Token]) -> Tuple[Tuple[int, int], ...]:
        out = []
        for t in args:
            m = re.fullmatch(r"([0-9]{3})(?:-([0-9]{3}))?", t.text)
            if not m:
                raise Bad(f"{t.text!r} is not {self.what}", t)
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if not 100 <= lo <= hi <= 599:
                raise Bad(f"{t.text!r} is not {self.what}", t)
            out.append((lo, hi))
        return tuple(out)


# ---------------------------------------------------------------- helpers shared with the entry parsers


def _digits(text: str) -> bool:
    """ASCII 0-9 only: str.isdigit() and re's \\d also take "٣" and "²"."""
    return text.isascii() and text.isdigit()


MAX_DIGITS = 40  # longer than any value the table takes; Python will not read one of 4300+ digits at all


def int_of(tok: Token, what: str = "an integer") -> int:
    if not re.fullmatch(r"-?[0-9]+", tok.text):
        raise Bad(f"{tok.text!r} is not an integer, expects {what}", tok)
    if len(tok.text.lstrip("-0")) > MAX_DIGITS:  # int() raised ValueError past 4300 digits: a traceback, no line
        raise Bad(f"{tok.text[:12]}… ({len(tok.text)} digits) is out of range, expects {what}", tok)
    return int(tok.text)


def ip_of(tok: Token) -> IPAddress:
    try:
        return ipaddress.ip_address(tok.text)
    except ValueError:
        raise Bad(f"{tok.text!r} is not an IPv4 or IPv6 address", tok) from None


def ip_range(tok: Token) -> List[IPAddress]:
    """`10.0.0.1`, `10.0.0.1-20` (keepalived: last octet, or last hextet in hex) or `10.0.0.1-10.0.0.20`."""
    if "-" not in tok.text:
        return [ip_of(tok)]
    first_text, last_text = tok.text.split("-", 1)
    first = ip_of(Token(tok.kind, first_text, tok.where))
    try:
        if first.version == 4 and _digits(last_text):
            last = ipaddress.ip_address(".".join(first_text.split(".")[:3] + [last_text]))
        elif first.version == 6 and re.fullmatch(r"[0-9a-fA-F]{1,4}", last_text):
            last = ipaddress.ip_address((int(first) & ~0xFFFF) | int(last_text, 16))
        else:
            last = ipaddress.ip_address(last_text)
    except ValueError:
        raise Bad(f"{tok.text!r} is not an address range", tok) from None
    if last.version != first.version or last < first:
        raise Bad(f"{tok.text!r} is not an address range (end before start or mixed families)", tok)
    count = int(last) - int(first) + 1
    if count > MAX_RANGE:
        raise Bad(f"{tok.text!r} covers {count} addresses, more than {MAX_RANGE}", tok)
    return [ipaddress.ip_address(int(first) + i) if first.version == 4
            else ipaddress.IPv6Address(int(first) + i) for i in range(count)]


def networks_of(tok: Token) -> List[IPNetwork]:
    """A CIDR, an address, or a range, as the fewest networks covering exactly it."""
    if "/" in tok.text:
        try:
            return [ipaddress.ip_network(tok.text, strict=False)]
        except ValueError:
            raise Bad(f"{tok.text!r} is not a network", tok) from None
    addrs = ip_range(tok)
    return list(ipaddress.summarize_address_range(addrs[0], addrs[-1]))
