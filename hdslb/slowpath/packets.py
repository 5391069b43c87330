"""Byte-exact builders and parsers for the slow path's small IP stack: Ethernet, ARP, IPv4/ICMP, IPv6/ICMPv6/ND.

The parsing contract, stated once: every parse_* takes bytes (or a parsed outer layer), checks every length
before it reads, and returns a frozen dataclass or None. None means truncated, malformed or not the kind asked
for; a parser never raises on any input. Builders take trusted values (our MACs and addresses) and return
whole frames or headers; addresses are ipaddress objects or anything ipaddress accepts.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
import sys
from dataclasses import dataclass

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
VLAN_TPIDS = (ETH_P_8021Q, ETH_P_8021AD)
MAX_VLAN_TAGS = 2  # QinQ: an outer S-tag and an inner C-tag

ETH_HLEN = 14
ARP_LEN = 28  # Ethernet/IPv4 ARP body
IPV4_HLEN = 20
IPV6_HLEN = 40

ARPOP_REQUEST = 1
ARPOP_REPLY = 2

IPPROTO_ICMP = 1
IPPROTO_IPIP = 4
IPPROTO_IPV6 = 41
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

ICMP_ECHOREPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO = 8
ICMP_TIME_EXCEEDED = 11
ICMP_FRAG_NEEDED = 4  # a code of ICMP_DEST_UNREACH

ICMPV6_DEST_UNREACH = 1
ICMPV6_PKT_TOOBIG = 2
ICMPV6_TIME_EXCEED = 3
ICMPV6_PARAMPROB = 4
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
ND_OPT_SOURCE_LINKADDR = 1
ND_OPT_TARGET_LINKADDR = 2
ND_HOP_LIMIT = 255  # RFC 4861: ND is only valid when no router has forwarded it
NA_F_ROUTER, NA_F_SOLICITED, NA_F_OVERRIDE = 0x80, 0x40, 0x20  # first byte after the ICMPv6 checksum

IP_MF = 0x2000
IP_DF = 0x4000
IP_OFFMASK = 0x1FFF

BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
V4_ANY = ipaddress.IPv4Address(0)
V4_BCAST = ipaddress.IPv4Address("255.255.255.255")
V6_ANY = ipaddress.IPv6Address(0)
ALL_NODES = ipaddress.IPv6Address("ff02::1")

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")


def _never_raises(fn):
    """The parser contract's safety net: explicit length checks come first; this only turns a missed corner
    (a slice too short for struct, a bad enum value) into None instead of an exception in the daemon."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (struct.error, ValueError, IndexError, TypeError):
            return None

    return wrapper


def _v4(a) -> ipaddress.IPv4Address:
    return a if isinstance(a, ipaddress.IPv4Address) else ipaddress.IPv4Address(a)


def _v6(a) -> ipaddress.IPv6Address:
    return a if isinstance(a, ipaddress.IPv6Address) else ipaddress.IPv6Address(a)


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def is_unicast_mac(mac: bytes) -> bool:
    """A MAC a neighbour may really have: not group (broadcast/multicast, low bit of byte 0), not all-zero."""
    return len(mac) == 6 and not (mac[0] & 1) and mac != ZERO_MAC


# --- checksums ------------------------------------------------------------------------------------
def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum; a buffer whose checksum field is right sums to 0."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    # Summing native-order words is fine: the one's-complement sum is byte-order independent (RFC 1071 2(B)),
    # so only the final 16 bits need swapping back to network order on a little-endian host.
    s = sum(memoryview(bytes(data)).cast("H"))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return int.from_bytes((~s & 0xFFFF).to_bytes(2, sys.byteorder), "big")


def icmp6_checksum(src, dst, icmp: bytes) -> int:
    """ICMPv6 checksum over the IPv6 pseudo-header (RFC 8200 8.1) and the message."""
    pseudo = _v6(src).packed + _v6(dst).packed + struct.pack("!I3xB", len(icmp), IPPROTO_ICMPV6)
    return checksum(pseudo + icmp)


def _with_csum(msg: bytes, csum: int, at: int = 2) -> bytes:
    return msg[:at] + struct.pack("!H", csum) + msg[at + 2:]


# --- Ethernet -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Eth:
    dst: bytes
    src: bytes
    ethertype: int  # after any VLAN tags
    vlans: tuple  # VLAN TCIs, outermost first
    l2len: int  # bytes before the L3 header (14 + 4 per tag)
    tags: bytes  # the raw tag block (TPID+TCI per tag), kept so replies leave on the VLAN they came in on


def eth_header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return _ETH.pack(dst, src, ethertype)


@_never_raises
def parse_eth(frame: bytes) -> Eth | None:
    """The Ethernet header, skipping up to two 802.1Q/802.1ad tags."""
    if len(frame) < ETH_HLEN:
        return None
    dst, src, etype = _ETH.unpack_from(frame, 0)
    off, vlans = 12, []
    while etype in VLAN_TPIDS:
        if len(vlans) == MAX_VLAN_TAGS or len(frame) < off + 6:
            return None
        tci, etype = struct.unpack_from("!HH", frame, off + 2)
        vlans.append(tci)
        off += 4
    return Eth(dst=dst, src=src, ethertype=etype, vlans=tuple(vlans), l2len=off + 2, tags=bytes(frame[12:off]))


def retag(frame: bytes, tags: bytes) -> bytes:
    """Insert a VLAN tag block (Eth.tags) into an untagged frame."""
    return frame[:12] + tags + frame[12:] if tags else frame


def set_macs(frame: bytes, dst: bytes, src: bytes) -> bytes:
    """The frame with its Ethernet addresses replaced (a resolved next hop for a punted frame)."""
    return dst + src + frame[12:]


# --- ARP ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arp:
    op: int
    sha: bytes
    spa: ipaddress.IPv4Address
    tha: bytes
    tpa: ipaddress.IPv4Address

    @property
    def gratuitous(self) -> bool:
        return self.spa == self.tpa


def arp_body(op: int, sha: bytes, spa, tha: bytes, tpa) -> bytes:
    return _ARP.pack(1, ETH_P_IP, 6, 4, op, sha, _v4(spa).packed, tha, _v4(tpa).packed)


def arp_request(smac: bytes, sip, tip, dmac: bytes = BROADCAST) -> bytes:
    """Who-has tip: broadcast to resolve, or unicast to a known MAC to re-confirm it (tha = that MAC, as Linux
    fills it for a unicast probe)."""
    tha = ZERO_MAC if dmac == BROADCAST else dmac
    return eth_header(dmac, smac, ETH_P_ARP) + arp_body(ARPOP_REQUEST, smac, sip, tha, tip)


def arp_reply(smac: bytes, sip, dmac: bytes, dip) -> bytes:
    """sip is-at smac, sent to the asker (dmac/dip)."""
    return eth_header(dmac, smac, ETH_P_ARP) + arp_body(ARPOP_REPLY, smac, sip, dmac, dip)


def gratuitous_arp(mac: bytes, ip) -> bytes:
    """A broadcast request for our own address (spa = tpa): neighbours update their caches to our MAC."""
    return eth_header(BROADCAST, mac, ETH_P_ARP) + arp_body(ARPOP_REQUEST, mac, ip, ZERO_MAC, ip)


@_never_raises
def parse_arp(body: bytes) -> Arp | None:
    """An Ethernet/IPv4 ARP body (what follows the Ethernet header); other hardware/protocol types are None."""
    if len(body) < ARP_LEN:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(body, 0)
    if htype != 1 or ptype != ETH_P_IP or hlen != 6 or plen != 4:
        return None
    return Arp(op=op, sha=sha, spa=ipaddress.IPv4Address(spa), tha=tha, tpa=ipaddress.IPv4Address(tpa))


# --- IPv4 / ICMP ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class IPv4:
    src: ipaddress.IPv4Address
    dst: ipaddress.IPv4Address
    proto: int
    ttl: int
    tos: int
    ident: int
    frag: int  # flags and fragment offset, as on the wire
    header: bytes  # including options
    payload: bytes  # trimmed to the total length (Ethernet padding removed)

    @property
    def is_fragment(self) -> bool:
        return bool(self.frag & (IP_MF | IP_OFFMASK))


def ipv4_header(src, dst, proto: int, payload_len: int, ttl: int = 64, tos: int = 0, ident: int = 0,
                df: bool = False) -> bytes:
    """A 20-byte IPv4 header with its checksum."""
    h = _IPV4.pack(0x45, tos, IPV4_HLEN + payload_len, ident, IP_DF if df else 0, ttl, proto, 0,
                   _v4(src).packed, _v4(dst).packed)
    return _with_csum(h, checksum(h), at=10)


@_never_raises
def parse_ipv4(data: bytes, verify: bool = True) -> IPv4 | None:
    """An IPv4 packet (what follows the Ethernet header); verify: the header checksum must hold."""
    if len(data) < IPV4_HLEN:
        return None
    vihl, tos, total, ident, frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(data, 0)
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < IPV4_HLEN or total < ihl or total > len(data):
        return None
    if verify and checksum(data[:ihl]) != 0:
        return None
    return IPv4(src=ipaddress.IPv4Address(src), dst=ipaddress.IPv4Address(dst), proto=proto, ttl=ttl, tos=tos,
                ident=ident, frag=frag, header=bytes(data[:ihl]), payload=bytes(data[ihl:total]))


@dataclass(frozen=True)
class Echo:
    type: int
    code: int
    ident: int
    seq: int
    data: bytes


@_never_raises
def parse_echo(icmp: bytes) -> Echo | None:
    """An ICMP or ICMPv6 echo message (the header layout is the same); the checksum is the caller's check."""
    if len(icmp) < 8:
        return None
    t, code, _csum, ident, seq = struct.unpack_from("!BBHHH", icmp, 0)
    return Echo(type=t, code=code, ident=ident, seq=seq, data=bytes(icmp[8:]))


def icmp_echo(ident: int, seq: int, data: bytes = b"", reply: bool = False) -> bytes:
    """An ICMP echo request (or reply) message with its checksum."""
    m = struct.pack("!BBHHH", ICMP_ECHOREPLY if reply else ICMP_ECHO, 0, 0, ident, seq) + data
    return _with_csum(m, checksum(m))


def _l2_back(eth: Eth, smac: bytes | None, ethertype: int) -> bytes:
    """The L2 header of an answer: to whoever sent the frame, from smac, on the same VLAN tags."""
    return eth.src + (smac or eth.dst) + eth.tags + struct.pack("!H", ethertype)


@_never_raises
def icmp_echo_reply(frame: bytes, smac: bytes | None = None, ttl: int = 64) -> bytes | None:
    """The echo reply frame for an IPv4 echo request frame, or None if it is not a valid, unfragmented one.

    Addresses are swapped, id/seq/payload kept, the IP header rebuilt without options (ident and TOS kept),
    TTL set from ttl; the reply goes back to the sender's MAC from smac (default: the request's dst MAC).
    """
    eth = parse_eth(frame)
    if eth is None or eth.ethertype != ETH_P_IP:
        return None
    ip = parse_ipv4(frame[eth.l2len:])
    if ip is None or ip.proto != IPPROTO_ICMP or ip.is_fragment:
        return None
    echo = parse_echo(ip.payload)
    if echo is None or echo.type != ICMP_ECHO or echo.code != 0 or checksum(ip.payload) != 0:
        return None
    msg = icmp_echo(echo.ident, echo.seq, echo.data, reply=True)
    return (_l2_back(eth, smac, ETH_P_IP) + ipv4_header(ip.dst, ip.src, IPPROTO_ICMP, len(msg), ttl=ttl,
                                                        tos=ip.tos, ident=ip.ident) + msg)


@dataclass(frozen=True)
class IcmpError:
    """An ICMP/ICMPv6 error and the packet it quotes, enough to find the connection it is about."""

    af: int  # 4 or 6
    type: int
    code: int
    mtu: int | None  # next-hop MTU of "fragmentation needed" / "packet too big"
    inner_src: ipaddress.IPv4Address | ipaddress.IPv6Address
    inner_dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    inner_proto: int
    inner_sport: int | None  # first two L4 bytes as a port (TCP/UDP), else None
    inner_dport: int | None
    quoted: bytes  # the inner IP header and the first 8 bytes of its L4 header
    # addressed to an address of ours; False: an error routed through us to a NAT flow's client (the fast
    # path punts those only when they quote a NAT flow), translated only as such (SlowPathRunner)
    to_local: bool = True
    # who sent the error (a router, a host): a SNAT inside host gets an outside router's error from that router
    src: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    # TUNNEL: the real server the quoted IPIP / 6in6 packet was sent to; inner_* and quoted are then the client's
    # packet inside it (what the router quoted of it)
    tunnel: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    # the VLAN tag block (Eth.tags) of the frame it came in: the translated error keeps it, as the fast path keeps
    # the tags of every packet of the flow it forwards (TUNNEL's encapsulated packets excepted: they leave untagged)
    tags: bytes = b""

    @property
    def frag_needed(self) -> bool:
        if self.af == 4:
            return self.type == ICMP_DEST_UNREACH and self.code == ICMP_FRAG_NEEDED
        return self.type == ICMPV6_PKT_TOOBIG


def _ports(proto: int, l4: bytes):
    if proto in (IPPROTO_TCP, IPPROTO_UDP, 132):  # 132: SCTP has ports in the same place
        return struct.unpack_from("!HH", l4, 0)
    if proto == IPPROTO_ICMP and l4[0] in (ICMP_ECHO, ICMP_ECHOREPLY):
        # as the fast path keys a SNAT'd ping: the echo id is a request's source port, a reply's destination port
        ident = struct.unpack_from("!H", l4, 4)[0]
        return (ident, 0) if l4[0] == ICMP_ECHO else (0, ident)
    return None, None


@_never_raises
def parse_icmp_error(icmp: bytes) -> IcmpError | None:
    """An IPv4 destination-unreachable or time-exceeded message (the ICMP bytes, after the IP header)."""
    if len(icmp) < 8 + IPV4_HLEN + 8:
        return None
    t, code, _csum, _unused, mtu = struct.unpack_from("!BBHHH", icmp, 0)
    if t not in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED):
        return None
    inner = icmp[8:]
    vihl, proto = inner[0], inner[9]
    ihl = (vihl & 0x0F) * 4
    # the quoted header's checksum and total length are not checked: routers may have changed it in flight
    if vihl >> 4 != 4 or ihl < IPV4_HLEN or len(inner) < ihl + 8:
        return None
    frag_needed = t == ICMP_DEST_UNREACH and code == ICMP_FRAG_NEEDED
    enc = inner[ihl:]
    eihl = (enc[0] & 0x0F) * 4
    if proto == IPPROTO_IPIP and enc[0] >> 4 == 4 and eihl >= IPV4_HLEN and len(enc) >= eihl + 8:
        # an IPIP packet (TUNNEL) quoted with the client's packet inside (RFC 1812 routers quote up to 576 bytes;
        # an 8-byte quote stops inside its header and says nothing about the flow)
        sport, dport = _ports(enc[9], enc[eihl:eihl + 8])
        return IcmpError(af=4, type=t, code=code, mtu=mtu if frag_needed else None,
                         inner_src=ipaddress.IPv4Address(enc[12:16]), inner_dst=ipaddress.IPv4Address(enc[16:20]),
                         inner_proto=enc[9], inner_sport=sport, inner_dport=dport, quoted=bytes(enc[:eihl + 8]),
                         tunnel=ipaddress.IPv4Address(inner[16:20]))
    sport, dport = _ports(proto, inner[ihl:ihl + 8])
    return IcmpError(af=4, type=t, code=code, mtu=mtu if frag_needed else None,
                     inner_src=ipaddress.IPv4Address(inner[12:16]), inner_dst=ipaddress.IPv4Address(inner[16:20]),
                     inner_proto=proto, inner_sport=sport, inner_dport=dport, quoted=bytes(inner[:ihl + 8]))


def icmp_frag_needed(mtu: int, quoted: bytes) -> bytes:
    """An ICMP "fragmentation needed" message quoting `quoted` (used by tests and, later, error translation)."""
    m = struct.pack("!BBHHH", ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, mtu) + quoted
    return _with_csum(m, checksum(m))


# --- NAT64: ICMP errors across families (RFC 7915 4.2 and 5.2) ------------------------------------------
IPV6_MIN_MTU = 1280
IPV4_MIN_MTU = 68
# RFC 1191's plateaus: the next-hop MTU of a router that sends "fragmentation needed" with the field zero
_MTU_PLATEAUS = (32000, 17914, 8166, 4352, 2002, 1492, 1006, 508, 296, IPV4_MIN_MTU)


def icmp4_to_icmp6(t: int, code: int, mtu: int | None, quoted_len: int) -> tuple[int, int, int] | None:
    """An ICMPv4 error as (type, code, 32-bit field) of the ICMPv6 error its IPv6 side must get (RFC 7915 4.2);
    None for what is not translated (host precedence violation, unknown codes). quoted_len: the quoted
    datagram's total length, for a "fragmentation needed" whose router left the MTU zero (RFC 1191 plateaus)."""
    if t == ICMP_TIME_EXCEEDED:
        return ICMPV6_TIME_EXCEED, code, 0
    if t != ICMP_DEST_UNREACH:
        return None
    if code == ICMP_FRAG_NEEDED:
        if not mtu:
            mtu = next((m for m in _MTU_PLATEAUS if m < quoted_len), IPV4_MIN_MTU)
        return ICMPV6_PKT_TOOBIG, 0, max(mtu + IPV6_HLEN - IPV4_HLEN, IPV6_MIN_MTU)
    if code == 2:  # protocol unreachable: a parameter problem pointing at the Next Header field
        return ICMPV6_PARAMPROB, 1, 6
    if code == 3:
        return ICMPV6_DEST_UNREACH, 4, 0  # port unreachable
    if code in (9, 10, 13, 15):
        return ICMPV6_DEST_UNREACH, 1, 0  # administratively prohibited
    if code in (0, 1, 5, 6, 7, 8, 11, 12):
        return ICMPV6_DEST_UNREACH, 0, 0  # no route to destination
    return None


def icmp6_to_icmp4(t: int, code: int, mtu: int | None) -> tuple[int, int, int] | None:
    """An ICMPv6 error as (type, code, 32-bit field) of the ICMPv4 error its IPv4 side must get (RFC 7915 5.2);
    None for what is not translated."""
    if t == ICMPV6_TIME_EXCEED:
        return ICMP_TIME_EXCEEDED, code, 0
    if t == ICMPV6_PKT_TOOBIG:
        return ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, min(max((mtu or 0) - (IPV6_HLEN - IPV4_HLEN), IPV4_MIN_MTU),
                                                         0xFFFF)
    if t == ICMPV6_DEST_UNREACH and code in (0, 1, 2, 3, 4):
        return ICMP_DEST_UNREACH, {0: 1, 1: 10, 2: 1, 3: 1, 4: 3}[code], 0  # no route/beyond scope/address: host
    return None


def quote_4to6(quoted: bytes, src, dst, sport: int, dport: int) -> bytes:
    """A quoted IPv4 header and its first 8 L4 bytes as the IPv6 packet src:sport -> dst:dport they were
    translated from (RFC 7915 4.3): payload length, hop limit, traffic class and protocol carried over."""
    ihl = (quoted[0] & 0x0F) * 4
    total = struct.unpack_from("!H", quoted, 2)[0]
    l4 = struct.pack("!HH", sport, dport) + quoted[ihl + 4:ihl + 8]
    return ipv6_header(src, dst, quoted[9], max(total - ihl, 0), hlim=quoted[8], tc=quoted[1]) + l4


def quote_6to4(quoted: bytes, src, dst, sport: int, dport: int) -> bytes:
    """A quoted IPv6 header and its first 8 L4 bytes as the IPv4 packet src:sport -> dst:dport they were
    translated from (RFC 7915 5.3; DF set, as the fast path sets it). A quoted UDP checksum is zeroed ("none"):
    it was the other family's."""
    plen, nh, hlim = struct.unpack_from("!HBB", quoted, 4)
    tc = (struct.unpack_from("!I", quoted, 0)[0] >> 20) & 0xFF
    l4 = struct.pack("!HH", sport, dport) + quoted[IPV6_HLEN + 4:IPV6_HLEN + 8]
    if nh == IPPROTO_UDP:
        l4 = l4[:6] + b"\0\0"
    return ipv4_header(src, dst, nh, min(plen, 0xFFFF - IPV4_HLEN), ttl=hlim, tos=tc, df=True) + l4


# --- IPv6 / ICMPv6 / ND ---------------------------------------------------------------------------
@dataclass(frozen=True)
class IPv6:
    src: ipaddress.IPv6Address
    dst: ipaddress.IPv6Address
    nh: int
    hlim: int
    tc: int
    flow: int
    payload: bytes  # trimmed to the payload length


def ipv6_header(src, dst, nh: int, payload_len: int, hlim: int = 64, tc: int = 0, flow: int = 0) -> bytes:
    return _IPV6.pack((6 << 28) | (tc << 20) | flow, payload_len, nh, hlim, _v6(src).packed, _v6(dst).packed)


@_never_raises
def parse_ipv6(data: bytes) -> IPv6 | None:
    """An IPv6 packet (what follows the Ethernet header); extension headers are left in the payload."""
    if len(data) < IPV6_HLEN:
        return None
    vtf, plen, nh, hlim, src, dst = _IPV6.unpack_from(data, 0)
    if vtf >> 28 != 6 or IPV6_HLEN + plen > len(data):
        return None
    return IPv6(src=ipaddress.IPv6Address(src), dst=ipaddress.IPv6Address(dst), nh=nh, hlim=hlim,
                tc=(vtf >> 20) & 0xFF, flow=vtf & 0xFFFFF, payload=bytes(data[IPV6_HLEN:IPV6_HLEN + plen]))


def icmp6_ok(ip6: IPv6) -> bool:
    """The ICMPv6 message in ip6 has a correct checksum."""
    return ip6.nh == IPPROTO_ICMPV6 and len(ip6.payload) >= 4 and icmp6_checksum(ip6.src, ip6.dst, ip6.payload) == 0


def _icmp6_frame(dmac: bytes, smac: bytes, src, dst, msg: bytes, hlim: int) -> bytes:
    msg = _with_csum(msg, icmp6_checksum(src, dst, msg))
    return eth_header(dmac, smac, ETH_P_IPV6) + ipv6_header(src, dst, IPPROTO_ICMPV6, len(msg), hlim=hlim) + msg


def icmp6_echo(src, dst, ident: int, seq: int, data: bytes = b"", reply: bool = False) -> bytes:
    """An ICMPv6 echo request (or reply) message with its pseudo-header checksum."""
    m = struct.pack("!BBHHH", ICMPV6_ECHO_REPLY if reply else ICMPV6_ECHO_REQUEST, 0, 0, ident, seq) + data
    return _with_csum(m, icmp6_checksum(src, dst, m))


@_never_raises
def icmp6_echo_reply(frame: bytes, smac: bytes | None = None, hlim: int = 64) -> bytes | None:
    """The echo reply frame for an ICMPv6 echo request frame, or None if it is not a valid one."""
    eth = parse_eth(frame)
    if eth is None or eth.ethertype != ETH_P_IPV6:
        return None
    ip6 = parse_ipv6(frame[eth.l2len:])
    if ip6 is None or not icmp6_ok(ip6):
        return None
    echo = parse_echo(ip6.payload)
    if echo is None or echo.type != ICMPV6_ECHO_REQUEST or echo.code != 0:
        return None
    msg = icmp6_echo(ip6.dst, ip6.src, echo.ident, echo.seq, echo.data, reply=True)
    return (_l2_back(eth, smac, ETH_P_IPV6) + ipv6_header(ip6.dst, ip6.src, IPPROTO_ICMPV6, len(msg), hlim=hlim,
                                                         tc=ip6.tc, flow=ip6.flow) + msg)


@_never_raises
def parse_icmp6_error(icmp: bytes) -> IcmpError | None:
    """An ICMPv6 destination-unreachable, packet-too-big or time-exceeded message (the ICMPv6 bytes)."""
    if len(icmp) < 8 + IPV6_HLEN + 8:
        return None
    t, code, _csum, word = struct.unpack_from("!BBHI", icmp, 0)
    if t not in (ICMPV6_DEST_UNREACH, ICMPV6_PKT_TOOBIG, ICMPV6_TIME_EXCEED):
        return None
    inner = icmp[8:]
    if inner[0] >> 4 != 6:
        return None
    nh = inner[6]
    enc = inner[IPV6_HLEN:]
    if nh == IPPROTO_IPV6 and len(enc) >= IPV6_HLEN + 8 and enc[0] >> 4 == 6:
        # a 6in6 packet (TUNNEL) quoted with the client's packet inside, as parse_icmp_error's IPIP case
        sport, dport = _ports(enc[6], enc[IPV6_HLEN:IPV6_HLEN + 8])
        return IcmpError(af=6, type=t, code=code, mtu=word if t == ICMPV6_PKT_TOOBIG else None,
                         inner_src=ipaddress.IPv6Address(enc[8:24]), inner_dst=ipaddress.IPv6Address(enc[24:40]),
                         inner_proto=enc[6], inner_sport=sport, inner_dport=dport, quoted=bytes(enc[:IPV6_HLEN + 8]),
                         tunnel=ipaddress.IPv6Address(inner[24:40]))
    sport, dport = _ports(nh, inner[IPV6_HLEN:IPV6_HLEN + 8])
    return IcmpError(af=6, type=t, code=code, mtu=word if t == ICMPV6_PKT_TOOBIG else None,
                     inner_src=ipaddress.IPv6Address(inner[8:24]), inner_dst=ipaddress.IPv6Address(inner[24:40]),
                     inner_proto=nh, inner_sport=sport, inner_dport=dport, quoted=bytes(inner[:IPV6_HLEN + 8]))


def solicited_node(ip) -> ipaddress.IPv6Address:
    """ff02::1:ffXX:XXXX, the multicast group a neighbour solicitation for ip goes to (RFC 4291 2.7.1)."""
    return ipaddress.IPv6Address(b"\xff\x02" + b"\0" * 9 + b"\x01\xff" + _v6(ip).packed[13:])


def mcast_mac(group) -> bytes:
    """33:33 + the group's low 32 bits (RFC 2464 7)."""
    return b"\x33\x33" + _v6(group).packed[12:]


def _lla_opt(kind: int, mac: bytes) -> bytes:
    return struct.pack("!BB", kind, 1) + mac


def nd_ns(smac: bytes, src, target, dmac: bytes | None = None) -> bytes:
    """A neighbour solicitation for target: multicast to its solicited-node group, or unicast to a known MAC
    (dmac) to re-confirm it. From the unspecified address (DAD) it carries no source link-layer option."""
    src, target = _v6(src), _v6(target)
    if dmac is None:
        dst = solicited_node(target)
        dmac = mcast_mac(dst)
    else:
        dst = target
    msg = struct.pack("!BBHI", ND_NEIGHBOR_SOLICIT, 0, 0, 0) + target.packed
    if src != V6_ANY:
        msg += _lla_opt(ND_OPT_SOURCE_LINKADDR, smac)
    return _icmp6_frame(dmac, smac, src, dst, msg, ND_HOP_LIMIT)


def nd_na(smac: bytes, target, dst, dmac: bytes, solicited: bool = True, override: bool = True,
          router: bool = False) -> bytes:
    """A neighbour advertisement: target is-at smac (target link-layer option), from target to dst."""
    flags = (NA_F_ROUTER if router else 0) | (NA_F_SOLICITED if solicited else 0) | (NA_F_OVERRIDE if override else 0)
    msg = struct.pack("!BBHB3x", ND_NEIGHBOR_ADVERT, 0, 0, flags) + _v6(target).packed
    msg += _lla_opt(ND_OPT_TARGET_LINKADDR, smac)
    return _icmp6_frame(dmac, smac, target, dst, msg, ND_HOP_LIMIT)


def unsolicited_na(mac: bytes, ip) -> bytes:
    """An unsolicited advertisement to all nodes (override set): IPv6's gratuitous ARP."""
    return nd_na(mac, ip, ALL_NODES, mcast_mac(ALL_NODES), solicited=False, override=True)


@dataclass(frozen=True)
class ND:
    type: int  # ND_NEIGHBOR_SOLICIT or ND_NEIGHBOR_ADVERT
    target: ipaddress.IPv6Address
    lladdr: bytes | None  # source (NS) or target (NA) link-layer address option
    router: bool = False
    solicited: bool = False
    override: bool = False


@_never_raises
def parse_nd(icmp: bytes) -> ND | None:
    """An NS or NA message (the ICMPv6 bytes, checksum already checked), with RFC 4861's option checks."""
    if len(icmp) < 24:
        return None
    t, code = icmp[0], icmp[1]
    if t not in (ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT) or code != 0:
        return None
    flags = icmp[4]
    target = ipaddress.IPv6Address(icmp[8:24])
    if target.is_multicast:
        return None
    want = ND_OPT_SOURCE_LINKADDR if t == ND_NEIGHBOR_SOLICIT else ND_OPT_TARGET_LINKADDR
    lladdr, off = None, 24
    while off < len(icmp):
        if off + 2 > len(icmp):
            return None
        kind, units = icmp[off], icmp[off + 1]
        end = off + units * 8
        if units == 0 or end > len(icmp):
            return None  # a zero-length option makes the whole message invalid
        if kind == want and units == 1:
            lladdr = bytes(icmp[off + 2:off + 8])
        off = end
    if t == ND_NEIGHBOR_SOLICIT:
        return ND(type=t, target=target, lladdr=lladdr)
    return ND(type=t, target=target, lladdr=lladdr, router=bool(flags & NA_F_ROUTER),
              solicited=bool(flags & NA_F_SOLICITED), override=bool(flags & NA_F_OVERRIDE))
