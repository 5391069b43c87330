"""Slow-path packet builders and parsers: byte-exact against scapy, checksums recomputed, parsers total on garbage."""

import ipaddress
import random
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS,
                                ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr, ICMPv6PacketTooBig, IPv6)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.utils import checksum as scapy_checksum

from hdslb.slowpath import packets as P

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("5254001122aa")
A, B = "02:00:00:00:00:01", "52:54:00:11:22:aa"


def ip4(s):
    return ipaddress.IPv4Address(s)


def ip6(s):
    return ipaddress.IPv6Address(s)


def assert_same(ours: bytes, ref):
    """Byte-exact, and on failure both frames decoded (the house rule for packet tests)."""
    ref = bytes(ref)
    if ours != ref:
        pytest.fail("frames differ\n--- ours ---\n" + Ether(ours).show2(dump=True) +
                    "\n--- scapy ---\n" + Ether(ref).show2(dump=True))


def assert_checksums(frame: bytes):
    """Every checksum in the frame is what scapy computes when asked to recompute it."""
    pkt = Ether(frame)
    layer = pkt
    while layer:
        for f in ("chksum", "cksum"):
            if f in layer.fields:
                layer.fields.pop(f)
        layer = layer.payload if layer.payload else None
    assert bytes(pkt) == frame, "a checksum differs from scapy's recomputation"


# --- checksum -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 2, 3, 19, 20, 21, 64, 1499])
def test_checksum_matches_scapy(n):
    data = random.Random(n).randbytes(n)
    assert P.checksum(data) == scapy_checksum(data)


def test_checksum_of_a_correct_buffer_is_zero():
    h = P.ipv4_header("10.0.0.1", "10.0.0.2", 6, 40)
    assert P.checksum(h) == 0


# --- Ethernet -------------------------------------------------------------------------------------
def test_parse_eth_untagged_single_and_double_tag():
    plain = bytes(Ether(dst=B, src=A) / IP())
    e = P.parse_eth(plain)
    assert (e.dst, e.src, e.ethertype, e.vlans, e.l2len, e.tags) == (MAC_B, MAC_A, P.ETH_P_IP, (), 14, b"")
    one = bytes(Ether(dst=B, src=A) / Dot1Q(vlan=100, prio=3) / ARP())
    e = P.parse_eth(one)
    assert e.ethertype == P.ETH_P_ARP and e.vlans == ((3 << 13) | 100,) and e.l2len == 18
    qinq = bytes(Ether(dst=B, src=A) / Dot1AD(vlan=10) / Dot1Q(vlan=20) / IPv6())
    e = P.parse_eth(qinq)
    assert e.ethertype == P.ETH_P_IPV6 and [v & 0xFFF for v in e.vlans] == [10, 20] and e.l2len == 22
    assert e.tags == qinq[12:20]


def test_parse_eth_refuses_three_tags_and_truncated_tags():
    three = bytes(Ether() / Dot1AD(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / IP())
    assert P.parse_eth(three) is None
    tagged = bytes(Ether() / Dot1Q(vlan=5) / IP())
    assert P.parse_eth(tagged[:17]) is None and P.parse_eth(tagged[:18]) is not None


def test_retag_and_set_macs():
    f = P.arp_reply(MAC_A, "10.0.0.1", MAC_B, "10.0.0.2")
    t = P.retag(f, b"\x81\x00\x00\x07")
    assert Ether(t)[Dot1Q].vlan == 7 and Ether(t)[ARP].psrc == "10.0.0.1"
    assert P.retag(f, b"") == f
    g = P.set_macs(f, MAC_B, MAC_A)
    assert g[:12] == MAC_B + MAC_A and g[12:] == f[12:]


# --- ARP ------------------------------------------------------------------------------------------
def test_arp_request_is_byte_exact():
    ours = P.arp_request(MAC_A, "10.0.0.1", "10.0.0.2")
    ref = Ether(dst="ff:ff:ff:ff:ff:ff", src=A) / ARP(op=1, hwsrc=A, psrc="10.0.0.1", hwdst="00:00:00:00:00:00",
                                                       pdst="10.0.0.2")
    assert_same(ours, ref)


def test_unicast_arp_probe_targets_the_known_mac():
    ours = P.arp_request(MAC_A, "10.0.0.1", "10.0.0.2", dmac=MAC_B)
    ref = Ether(dst=B, src=A) / ARP(op=1, hwsrc=A, psrc="10.0.0.1", hwdst=B, pdst="10.0.0.2")
    assert_same(ours, ref)


def test_arp_reply_and_gratuitous_are_byte_exact():
    assert_same(P.arp_reply(MAC_A, "10.0.0.1", MAC_B, "10.0.0.2"),
                Ether(dst=B, src=A) / ARP(op=2, hwsrc=A, psrc="10.0.0.1", hwdst=B, pdst="10.0.0.2"))
    assert_same(P.gratuitous_arp(MAC_A, "10.0.0.1"),
                Ether(dst="ff:ff:ff:ff:ff:ff", src=A) / ARP(op=1, hwsrc=A, psrc="10.0.0.1",
                                                            hwdst="00:00:00:00:00:00", pdst="10.0.0.1"))


def test_parse_arp_round_trip_and_refusals():
    body = bytes(ARP(op=2, hwsrc=B, psrc="192.168.1.2", hwdst=A, pdst="192.168.1.1"))
    a = P.parse_arp(body + b"\0" * 18)  # Ethernet padding after the body is ignored
    assert (a.op, a.sha, a.spa, a.tha, a.tpa) == (2, MAC_B, ip4("192.168.1.2"), MAC_A, ip4("192.168.1.1"))
    assert not a.gratuitous
    assert P.parse_arp(bytes(ARP(hwtype=6))) is None  # not Ethernet
    assert P.parse_arp(bytes(ARP(ptype=0x86DD))) is None
    assert P.parse_arp(body[:27]) is None


# --- IPv4 / ICMP ----------------------------------------------------------------------------------
def test_ipv4_header_is_byte_exact():
    ours = P.ipv4_header("192.0.2.1", "198.51.100.7", 17, 100, ttl=33, tos=0x10, ident=0x1234, df=True)
    ref = IP(src="192.0.2.1", dst="198.51.100.7", proto=17, ttl=33, tos=0x10, id=0x1234, flags="DF", len=120)
    assert ours == bytes(ref)[:20]


def test_parse_ipv4_trims_padding_checks_checksum_and_keeps_options():
    pkt = bytes(IP(src="10.1.1.1", dst="10.2.2.2", options=b"\x01\x01\x01\x00") / UDP() / b"x")
    ip = P.parse_ipv4(pkt + b"\0" * 10)
    assert len(ip.header) == 24 and ip.payload == pkt[24:] and ip.proto == 17
    bad = bytearray(pkt)
    bad[8] ^= 1  # TTL changed, checksum not
    assert P.parse_ipv4(bytes(bad)) is None
    assert P.parse_ipv4(bytes(bad), verify=False) is not None
    assert P.parse_ipv4(pkt[:-1]) is None  # total length says more than there is


def request4(payload=b"hello world", **ip_kw):
    return Ether(dst=A, src=B) / IP(src="198.51.100.9", dst="10.0.0.100", ttl=57, id=777, **ip_kw) / \
        ICMP(type=8, id=0x4242, seq=9) / payload


def test_icmp_echo_reply_from_request():
    req = bytes(request4())
    rep = P.icmp_echo_reply(req, ttl=64)
    r = Ether(rep)
    assert (r.dst, r.src) == (B, A)
    assert (r[IP].src, r[IP].dst, r[IP].ttl, r[IP].id, r[IP].proto) == ("10.0.0.100", "198.51.100.9", 64, 777, 1)
    assert (r[ICMP].type, r[ICMP].code, r[ICMP].id, r[ICMP].seq) == (0, 0, 0x4242, 9)
    assert bytes(r[ICMP].payload) == b"hello world"
    assert_checksums(rep)
    assert len(rep) == len(req)


def test_icmp_echo_reply_ttl_smac_options_padding_vlan():
    req = bytes(Ether(dst=A, src=B) / Dot1Q(vlan=42) / IP(src="198.51.100.9", dst="10.0.0.100",
                                                           options=b"\x01\x01\x01\x00") /
                ICMP(type=8, id=1, seq=2) / b"abc") + b"\0" * 20
    rep = P.icmp_echo_reply(req, smac=MAC_A, ttl=5)
    r = Ether(rep)
    assert r[Dot1Q].vlan == 42 and r[IP].ttl == 5 and r[IP].ihl == 5 and bytes(r[ICMP].payload) == b"abc"
    assert len(rep) == 18 + 20 + 8 + 3  # options and Ethernet padding are not echoed
    assert_checksums(rep)


@pytest.mark.parametrize("pkt", [
    request4(flags="MF"),  # a fragment: the payload is not all here
    Ether(dst=A, src=B) / IP(src="1.1.1.1", dst="2.2.2.2") / ICMP(type=0),  # a reply, not a request
    Ether(dst=A, src=B) / IP(src="1.1.1.1", dst="2.2.2.2") / UDP(),
    Ether(dst=A, src=B) / IPv6() / ICMPv6EchoRequest(),
])
def test_icmp_echo_reply_refuses(pkt):
    assert P.icmp_echo_reply(bytes(pkt)) is None


def test_icmp_echo_reply_refuses_bad_icmp_checksum():
    req = bytearray(bytes(request4()))
    req[-1] ^= 0xFF
    assert P.icmp_echo_reply(bytes(req)) is None


def test_parse_icmp_frag_needed_extracts_the_quoted_flow():
    inner = IP(src="192.168.100.200", dst="192.168.100.2", ttl=1) / TCP(sport=40001, dport=80, flags="S")
    pkt = IP(src="192.168.100.1", dst="192.168.100.200") / ICMP(type=3, code=4, nexthopmtu=1400) / bytes(inner)[:28]
    icmp = bytes(pkt)[20:]
    e = P.parse_icmp_error(icmp)
    assert (e.af, e.type, e.code, e.mtu, e.frag_needed) == (4, 3, 4, 1400, True)
    assert (e.inner_src, e.inner_dst, e.inner_proto, e.inner_sport, e.inner_dport) == (
        ip4("192.168.100.200"), ip4("192.168.100.2"), 6, 40001, 80)
    assert e.quoted == bytes(inner)[:28]
    assert P.icmp_frag_needed(1400, bytes(inner)[:28]) == icmp


def test_parse_icmp_errors_other_kinds():
    inner = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=53, dport=5353))
    e = P.parse_icmp_error(bytes(ICMP(type=11, code=0) / inner))
    assert (e.type, e.mtu, e.inner_proto, e.inner_sport, e.inner_dport, e.frag_needed) == (
        11, None, 17, 53, 5353, False)
    e = P.parse_icmp_error(bytes(ICMP(type=3, code=1) / bytes(IP(proto=47, src="1.1.1.1", dst="2.2.2.2"))) + b"x" * 8)
    assert e.inner_proto == 47 and e.inner_sport is None
    assert P.parse_icmp_error(bytes(ICMP(type=8) / inner)) is None  # not an error
    assert P.parse_icmp_error(bytes(ICMP(type=3, code=4) / inner[:27])) is None  # fewer than 8 L4 bytes


def test_parse_icmp6_errors():
    inner = bytes(IPv6(src="2001:db8::200", dst="2001:db8::2") / TCP(sport=1234, dport=443))
    e = P.parse_icmp6_error(bytes(ICMPv6PacketTooBig(mtu=1280) / inner))
    assert (e.af, e.type, e.mtu, e.frag_needed, e.inner_sport, e.inner_dport) == (6, 2, 1280, True, 1234, 443)
    assert e.inner_src == ip6("2001:db8::200") and e.quoted == inner[:48]
    e = P.parse_icmp6_error(bytes(ICMPv6DestUnreach(code=4) / inner))
    assert (e.type, e.code, e.mtu) == (1, 4, None)
    assert P.parse_icmp6_error(bytes(ICMPv6EchoRequest() / inner)) is None


# --- IPv6 / ICMPv6 / ND ---------------------------------------------------------------------------
def test_ipv6_header_and_parse():
    h = P.ipv6_header("2001:db8::1", "2001:db8::2", 58, 8, hlim=9, tc=0xB8, flow=0x12345)
    assert h == bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=58, plen=8, hlim=9, tc=0xB8, fl=0x12345))[:40]
    p = P.parse_ipv6(h + b"12345678" + b"pad")
    assert (p.nh, p.hlim, p.tc, p.flow, p.payload) == (58, 9, 0xB8, 0x12345, b"12345678")
    assert P.parse_ipv6(h + b"1234567") is None


def test_icmp6_echo_reply_from_request():
    req = bytes(Ether(dst=A, src=B) / IPv6(src="2001:db8::9", dst="2001:db8::100", hlim=50) /
                ICMPv6EchoRequest(id=7, seq=8, data=b"ping6"))
    rep = P.icmp6_echo_reply(req, hlim=64)
    r = Ether(rep)
    assert (r.dst, r.src, r[IPv6].src, r[IPv6].dst, r[IPv6].hlim) == (B, A, "2001:db8::100", "2001:db8::9", 64)
    assert ICMPv6EchoReply in r and (r[ICMPv6EchoReply].id, r[ICMPv6EchoReply].seq) == (7, 8)
    assert r[ICMPv6EchoReply].data == b"ping6"
    assert_checksums(rep)
    bad = bytearray(req)
    bad[-1] ^= 1
    assert P.icmp6_echo_reply(bytes(bad)) is None


def test_solicited_node_and_multicast_mac():
    assert P.solicited_node("2001:db8::1:2345:6789") == ip6("ff02::1:ff45:6789")
    assert P.mcast_mac("ff02::1:ff45:6789") == bytes.fromhex("3333ff456789")


def test_ns_multicast_is_byte_exact():
    ours = P.nd_ns(MAC_A, "2001:db8::100", "2001:db8::2")
    ref = (Ether(dst="33:33:ff:00:00:02", src=A) / IPv6(src="2001:db8::100", dst="ff02::1:ff00:2", hlim=255) /
           ICMPv6ND_NS(tgt="2001:db8::2") / ICMPv6NDOptSrcLLAddr(lladdr=A))
    assert_same(ours, ref)
    assert_checksums(ours)


def test_ns_unicast_and_dad():
    uni = P.nd_ns(MAC_A, "2001:db8::100", "2001:db8::2", dmac=MAC_B)
    assert_same(uni, Ether(dst=B, src=A) / IPv6(src="2001:db8::100", dst="2001:db8::2", hlim=255) /
                ICMPv6ND_NS(tgt="2001:db8::2") / ICMPv6NDOptSrcLLAddr(lladdr=A))
    dad = P.nd_ns(MAC_A, "::", "2001:db8::100")
    assert_same(dad, Ether(dst="33:33:ff:00:01:00", src=A) / IPv6(src="::", dst="ff02::1:ff00:100", hlim=255) /
                ICMPv6ND_NS(tgt="2001:db8::100"))


def test_na_solicited_and_unsolicited_are_byte_exact():
    ours = P.nd_na(MAC_A, "2001:db8::100", "2001:db8::9", MAC_B)
    ref = (Ether(dst=B, src=A) / IPv6(src="2001:db8::100", dst="2001:db8::9", hlim=255) /
           ICMPv6ND_NA(R=0, S=1, O=1, tgt="2001:db8::100") / ICMPv6NDOptDstLLAddr(lladdr=A))
    assert_same(ours, ref)
    assert_checksums(ours)
    un = P.unsolicited_na(MAC_A, "2001:db8::100")
    assert_same(un, Ether(dst="33:33:00:00:00:01", src=A) / IPv6(src="2001:db8::100", dst="ff02::1", hlim=255) /
                ICMPv6ND_NA(R=0, S=0, O=1, tgt="2001:db8::100") / ICMPv6NDOptDstLLAddr(lladdr=A))


def test_parse_nd():
    ns = bytes(ICMPv6ND_NS(tgt="2001:db8::100") / ICMPv6NDOptSrcLLAddr(lladdr=B))
    n = P.parse_nd(ns)
    assert (n.type, n.target, n.lladdr) == (135, ip6("2001:db8::100"), MAC_B)
    na = bytes(ICMPv6ND_NA(R=1, S=0, O=1, tgt="2001:db8::2") / ICMPv6NDOptDstLLAddr(lladdr=B))
    n = P.parse_nd(na)
    assert (n.type, n.lladdr, n.router, n.solicited, n.override) == (136, MAC_B, True, False, True)
    assert P.parse_nd(bytes(ICMPv6ND_NA(tgt="2001:db8::2"))).lladdr is None
    assert P.parse_nd(ns + b"\x01\x00" + b"\0" * 6) is None  # zero-length option
    assert P.parse_nd(ns + b"\x01\x02" + b"\0" * 6) is None  # option runs past the end
    assert P.parse_nd(bytes(ICMPv6ND_NS(tgt="ff02::1"))) is None  # multicast target
    assert P.parse_nd(bytes(ICMPv6ND_NS(tgt="2001:db8::1", code=1))) is None


# --- totality: no parser raises, whatever it is given ---------------------------------------------
SAMPLES = [
    bytes(Ether(dst=A, src=B) / ARP(op=1, hwsrc=B, psrc="10.0.0.9", pdst="10.0.0.100")),
    bytes(Ether(dst=A, src=B) / Dot1Q(vlan=3) / ARP(op=2, hwsrc=B, psrc="10.0.0.9", pdst="10.0.0.100")),
    bytes(request4()),
    bytes(Ether() / IP(dst="10.0.0.100") / ICMP(type=3, code=4, nexthopmtu=1400) /
          bytes(IP(src="10.0.0.100", dst="1.1.1.1") / TCP())[:28]),
    bytes(Ether() / IPv6(dst="2001:db8::100") / ICMPv6EchoRequest(data=b"x" * 9)),
    bytes(Ether() / IPv6(dst="2001:db8::100", hlim=255) / ICMPv6ND_NS(tgt="2001:db8::100") /
          ICMPv6NDOptSrcLLAddr(lladdr=B)),
    bytes(Ether() / IPv6(dst="2001:db8::100") / ICMPv6PacketTooBig() / bytes(IPv6() / UDP())),
    bytes(Ether() / Dot1AD() / Dot1Q() / IP() / TCP()),
]
PARSERS = [P.parse_eth, P.icmp_echo_reply, P.icmp6_echo_reply]
L3_PARSERS = [P.parse_arp, P.parse_ipv4, P.parse_ipv6, P.parse_nd, P.parse_echo, P.parse_icmp_error,
              P.parse_icmp6_error]


def _all_parsers(data: bytes):
    # the undecorated functions: their own length checks must hold without the never-raise safety net
    for f in PARSERS + L3_PARSERS:
        f.__wrapped__(data)
    for off in (14, 18, 22, 34, 54):  # where an L3 or L4 header would start
        for f in L3_PARSERS:
            f.__wrapped__(data[off:])


@pytest.mark.parametrize("sample", range(len(SAMPLES)))
def test_every_truncation_of_every_sample(sample):
    frame = SAMPLES[sample]
    for n in range(len(frame) + 1):
        _all_parsers(frame[:n])


def test_truncated_frames_parse_to_none():
    arp = SAMPLES[0]
    for n in range(14 + 28):
        assert P.parse_arp(arp[14:n]) is None
    echo = SAMPLES[2]
    for n in range(len(echo)):
        assert P.icmp_echo_reply(echo[:n]) is None
    ns = SAMPLES[5]
    for n in range(len(ns)):
        assert P.parse_ipv6(ns[14:n]) is None


def test_random_garbage_and_bit_flips():
    rnd = random.Random(1)
    for n in range(300):
        _all_parsers(rnd.randbytes(rnd.randrange(0, 120)))
    for frame in SAMPLES:
        for _ in range(200):
            b = bytearray(frame)
            for _ in range(rnd.randrange(1, 4)):
                b[rnd.randrange(len(b))] = rnd.randrange(256)
            _all_parsers(bytes(b))


def test_parsers_accept_memoryview_and_bytearray():
    f = SAMPLES[2]
    assert P.parse_eth(bytearray(f)) == P.parse_eth(f)
    assert P.parse_ipv4(memoryview(f)[14:]) == P.parse_ipv4(f[14:])
    assert struct.unpack("!H", P.icmp_echo_reply(bytearray(f))[12:14])[0] == P.ETH_P_IP
