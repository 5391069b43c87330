"""The real-server decap program (bpf/hdslb_decap.c) on crafted packets: exact inner bytes out, verdicts, counters."""

import ctypes
import os
import random
import shutil
import socket
import struct

import pytest
from scapy.layers.inet import (IP, TCP, UDP, IPOption_EOL, IPOption_LSRR, IPOption_NOP, IPOption_Router_Alert,
                                IPOption_SSRR, IPOption_Timestamp)
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether

from hdslb.fastpath import decap
from hdslb.fastpath.loader import ensure_bpffs
from hdslb.fastpath.testrun import VERDICTS, XDP_DROP, XDP_PASS, run_xdp

pytestmark = pytest.mark.root

LB_MAC, RS_MAC = "02:aa:00:00:00:01", "02:55:00:00:00:02"
LB4, RIP4, OTHER4 = "192.168.100.1", "192.168.100.2", "192.168.100.9"  # balancer, this real server, not us
LB6, RIP6, OTHER6 = "fd00:100::1", "fd00:100::2", "fd00:100::9"
CLIENT4, VIP4 = "10.0.0.1", "10.0.0.100"
CLIENT6, VIP6 = "fd00:1::1", "fd00:1::100"
ETH_IP, ETH_IPV6 = 0x0800, 0x86DD


@pytest.fixture(scope="session")
def prog():
    """One compile for the whole session (bcc: ~2 s and ~220 MB each)."""
    ensure_bpffs(decap.DEFAULT_PIN_ROOT)
    pin_dir = os.path.join(decap.DEFAULT_PIN_ROOT, f"pytest-decap-{os.getpid()}")
    p = decap.DecapProgram(pin_dir, max_addrs=64)
    try:
        p.load()
        yield p
    finally:
        p.close()
        shutil.rmtree(pin_dir, ignore_errors=True)


@pytest.fixture
def maps(prog):
    """The pinned maps, read the way `hdslb-ctl decap show` reads them: our two addresses, counters at zero."""
    with decap.PinnedMaps(prog.pin_dir) as m:
        m.set_addrs({decap.parse_addr(RIP4), decap.parse_addr(RIP6)})
        m.zero()
        yield m


def eth(*tags):
    """Balancer -> real server Ethernet header, with VLAN tags (outermost first) when given."""
    e = Ether(src=LB_MAC, dst=RS_MAC)
    for t in tags:
        e = e / t
    return e


def tcp4(payload=b""):
    return IP(src=CLIENT4, dst=VIP4, id=7) / TCP(sport=40000, dport=80, flags="S", seq=1000) / payload


def udp6(payload=b"q"):
    return IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=5353, dport=53) / payload


def out4(dst=RIP4, **kw):
    return IP(src=LB4, dst=dst, **kw)


def out6(dst=RIP6, **kw):
    return IPv6(src=LB6, dst=dst, **kw)


def run(prog, pkt):
    return run_xdp(prog.prog_fd, bytes(pkt))[:2]


def delta(before, after):
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def show(raw: bytes) -> str:
    return Ether(raw).show(dump=True)


# ---------------------------------------------------------------------------------------------------- decapsulated

# (description, L2 header, outer header, inner packet, ethertype the inner packet must get, counter)
DECAP = [
    ("ipip: tcp syn in ipv4", eth(), out4(), tcp4(), ETH_IP, "decap_4in4"),
    ("ipv6 in ipv6", eth(), out6(), udp6(), ETH_IPV6, "decap_6in6"),
    ("ipv4 in ipv6", eth(), out6(), tcp4(b"data"), ETH_IP, "decap_4in6"),
    ("ipv6 in ipv4", eth(), out4(), udp6(), ETH_IPV6, "decap_6in4"),
    ("one vlan tag", eth(Dot1Q(vlan=10)), out4(), tcp4(), ETH_IP, "decap_4in4"),
    ("qinq, ipv6 in ipv4", eth(Dot1AD(vlan=20), Dot1Q(vlan=10)), out4(), udp6(), ETH_IPV6, "decap_6in4"),
    ("qinq, ipv4 in ipv6", eth(Dot1AD(vlan=20), Dot1Q(vlan=10)), out6(), tcp4(), ETH_IP, "decap_4in6"),
    ("outer ipv4 options (ihl 6)", eth(), out4(options=[IPOption_Router_Alert()]), tcp4(), ETH_IP, "decap_4in4"),
    ("outer ipv4 options (ihl 15)", eth(), out4(options=[b"\x01" * 40]), udp6(), ETH_IPV6, "decap_6in4"),
    ("outer ipv4 options: timestamp, nop, end", eth(), out4(options=[IPOption_Timestamp(flg=0, timestamp=1),
     IPOption_NOP(), IPOption_EOL()]), tcp4(), ETH_IP, "decap_4in4"),
    ("outer ipv4 options: end, then bytes the kernel does not read", eth(), out4(options=[b"\x00\x00\x05\x00"]),
     tcp4(), ETH_IP, "decap_4in4"),
    ("outer ipv6 destination options (rfc 2473 encap limit)", eth(),
     out6() / IPv6ExtHdrDestOpt(options=[]), tcp4(), ETH_IP, "decap_4in6"),
    ("outer ipv6 hop-by-hop then destination options", eth(),
     out6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(), udp6(), ETH_IPV6, "decap_6in6"),
    ("large inner packet", eth(), out4(), tcp4(b"x" * 1400), ETH_IP, "decap_4in4"),
    ("outer ect(0) over a not-ect inner packet", eth(), out4(tos=0x02), tcp4(), ETH_IP, "decap_4in4"),
    ("outer ce over an inner packet already ce", eth(), out6(tc=0x03),
     IPv6(src=CLIENT6, dst=VIP6, tc=0x03) / UDP(sport=1, dport=2), ETH_IPV6, "decap_6in6"),
]


@pytest.mark.parametrize("desc,l2,outer,inner,ethertype,counter", DECAP, ids=[d[0] for d in DECAP])
def test_decapsulated_to_exactly_the_inner_packet(prog, maps, desc, l2, outer, inner, ethertype, counter):
    before = maps.counters()
    v, out = run(prog, l2 / outer / inner)
    assert v == XDP_PASS, f"{desc}: {VERDICTS[v]}"
    # The L2 header keeps its addresses and tags; only the innermost ethertype changes to the inner family.
    want_l2 = bytes(l2)
    want_l2 = want_l2[:-2] + ethertype.to_bytes(2, "big")
    want = want_l2 + bytes(inner)
    assert out == want, f"{desc}:\ngot\n{show(out)}\nwant\n{show(want)}"
    assert delta(before, maps.counters()) == {counter: 1}


# RFC 6040: (description, outer, inner as sent, inner as the kernel must get it)
ECN = [
    ("outer ce, inner ipv4 ect(0) becomes ce", out4(tos=0x03),
     IP(src=CLIENT4, dst=VIP4, tos=0xB8 | 0x02) / TCP(dport=80), IP(src=CLIENT4, dst=VIP4, tos=0xB8 | 0x03) / TCP(dport=80)),
    ("outer ce in ipv6, inner ipv4 ect(1) becomes ce", out6(tc=0x03),
     IP(src=CLIENT4, dst=VIP4, tos=0x01) / UDP(), IP(src=CLIENT4, dst=VIP4, tos=0x03) / UDP()),
    ("outer ce, inner ipv6 ect(1) becomes ce", out6(tc=0x03),
     IPv6(src=CLIENT6, dst=VIP6, tc=0x29, fl=0x12345) / UDP(), IPv6(src=CLIENT6, dst=VIP6, tc=0x2B, fl=0x12345) / UDP()),
    ("outer ce in ipv4, inner ipv6 ect(0) becomes ce", out4(tos=0x03),
     IPv6(src=CLIENT6, dst=VIP6, tc=0x02) / UDP(), IPv6(src=CLIENT6, dst=VIP6, tc=0x03) / UDP()),
    # RFC 6040 figure 4 (Linux's INET_ECN_decapsulate since L4S): an outer ECT(1) over an ECT(0) inner one is
    # ECT(1) (an L4S AQM on the tunnel path marks that way); it reached the kernel as ECT(0)
    ("outer ect(1), inner ipv4 ect(0) becomes ect(1)", out4(tos=0x01),
     IP(src=CLIENT4, dst=VIP4, tos=0xB8 | 0x02) / TCP(dport=80), IP(src=CLIENT4, dst=VIP4, tos=0xB8 | 0x01) / TCP(dport=80)),
    ("outer ect(1) in ipv4, inner ipv6 ect(0) becomes ect(1)", out4(tos=0x01),
     IPv6(src=CLIENT6, dst=VIP6, tc=0x2A, fl=0x12345) / UDP(), IPv6(src=CLIENT6, dst=VIP6, tc=0x29, fl=0x12345) / UDP()),
    ("outer ect(1) in ipv6, inner ipv4 not-ect stays not-ect", out6(tc=0x01),
     IP(src=CLIENT4, dst=VIP4, tos=0x00) / UDP(), IP(src=CLIENT4, dst=VIP4, tos=0x00) / UDP()),
    ("outer ect(0), inner ipv6 ect(1) stays ect(1)", out6(tc=0x02),
     IPv6(src=CLIENT6, dst=VIP6, tc=0x01) / UDP(), IPv6(src=CLIENT6, dst=VIP6, tc=0x01) / UDP()),
]


@pytest.mark.parametrize("desc,outer,inner,want_inner", ECN, ids=[e[0] for e in ECN])
def test_congestion_mark_on_the_outer_header_reaches_the_inner_one(prog, maps, desc, outer, inner, want_inner):
    v, out = run(prog, eth() / outer / inner)
    assert v == XDP_PASS
    ethertype = ETH_IPV6 if isinstance(want_inner, IPv6) else ETH_IP
    want = bytes(Ether(src=LB_MAC, dst=RS_MAC, type=ethertype) / want_inner)  # checksums computed afresh by scapy
    assert out == want, f"{desc}:\ngot\n{show(out)}\nwant\n{show(want)}"


def test_ethernet_padding_after_the_tunnel_packet_stays_for_the_kernel_to_trim(prog, maps):
    # A short tunnel packet padded by the sender: outer tot_len is what counts; the kernel trims to inner tot_len.
    inner = IP(src=CLIENT4, dst=VIP4) / UDP(sport=1, dport=2)
    v, out = run(prog, bytes(eth() / out4() / inner) + b"\0" * 12)
    assert v == XDP_PASS
    assert out[:14 + len(inner)] == bytes(Ether(src=LB_MAC, dst=RS_MAC, type=ETH_IP) / inner)
    assert maps.counters()["decap_4in4"] == 1


def test_both_families_of_our_addresses_and_only_those(prog, maps):
    maps.set_addrs({decap.parse_addr(RIP6)})
    v, out = run(prog, eth() / out4() / tcp4())
    assert v == XDP_PASS and out == bytes(eth() / out4() / tcp4())
    assert maps.counters()["pass_not_local"] == 1
    maps.set_addrs({decap.parse_addr(RIP4), decap.parse_addr(RIP6)})
    assert run(prog, eth() / out4() / tcp4())[1] == bytes(Ether(src=LB_MAC, dst=RS_MAC, type=ETH_IP) / tcp4())


def test_counters_are_per_cpu_and_sum(prog, maps):
    old = os.sched_getaffinity(0)
    cpus = sorted(old)
    try:
        for cpu in cpus:
            os.sched_setaffinity(0, {cpu})
            run(prog, eth() / out6() / udp6())
    finally:
        os.sched_setaffinity(0, old)
    per_cpu = maps.per_cpu_counters()["decap_6in6"]
    assert sum(per_cpu) == len(cpus)
    assert all(per_cpu[c] == 1 for c in cpus)


# ---------------------------------------------------------------------------------------------------- untouched or dropped

PLAIN4 = eth() / IP(src=CLIENT4, dst=RIP4) / TCP(sport=1234, dport=22, flags="S")
TRUNC_INNER4 = bytes(eth() / IP(src=LB4, dst=RIP4, proto=4, len=20 + 12) / bytes(tcp4())[:12])

# (description, packet, verdict, counter). Passed packets must come out byte for byte as they went in.
UNTOUCHED = [
    ("plain tcp to our address", PLAIN4, XDP_PASS, "pass"),
    ("plain ipv6 udp to our address", eth() / IPv6(src=CLIENT6, dst=RIP6) / UDP(dport=53), XDP_PASS, "pass"),
    ("arp", Ether(src=LB_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=LB4, pdst=RIP4), XDP_PASS, "pass"),
    ("gre (protocol 47) to our address", eth() / IP(src=LB4, dst=RIP4, proto=47) / (b"\0" * 24), XDP_PASS, "pass"),
    ("a bare ethernet header", bytes(Ether(src=LB_MAC, dst=RS_MAC, type=ETH_IP)), XDP_PASS, "pass"),
    ("three vlan tags (deeper than parsed)", eth(Dot1AD(vlan=1), Dot1Q(vlan=2), Dot1Q(vlan=3)) / out4() / tcp4(),
     XDP_PASS, "pass"),
    ("ipip for another host", eth() / out4(dst=OTHER4) / tcp4(), XDP_PASS, "pass_not_local"),
    ("ipv6 in ipv6 for another host", eth() / out6(dst=OTHER6) / udp6(), XDP_PASS, "pass_not_local"),
    ("broken ipip for another host is the kernel's business", bytes(eth() / out4(dst=OTHER4) / tcp4())[:40],
     XDP_PASS, "pass_not_local"),
    ("outer ipv4 first fragment", eth() / out4(flags="MF") / tcp4(), XDP_PASS, "pass_fragment"),
    ("outer ipv4 later fragment", eth() / out4(frag=100, proto=4) / (b"\0" * 32), XDP_PASS, "pass_fragment"),
    ("outer ipv6 fragment", eth() / out6() / IPv6ExtHdrFragment(nh=4, m=1) / tcp4(), XDP_PASS, "pass_fragment"),
    ("ipv6 fragment of plain udp", eth() / out6() / IPv6ExtHdrFragment(nh=17, m=1) / UDP(), XDP_PASS, "pass"),
    ("outer ipv4, header cut short", bytes(eth() / out4() / tcp4())[:14 + 19], XDP_PASS, "pass"),
    ("outer ipv4 total length beyond the frame", eth() / out4(len=200) / tcp4(), XDP_DROP, "drop_malformed"),
    ("outer ipv4 total length below its header", eth() / out4(len=19) / tcp4(), XDP_DROP, "drop_malformed"),
    ("outer ipv4 ihl 4", eth() / out4(ihl=4) / tcp4(), XDP_DROP, "drop_malformed"),
    ("outer ipv4 ihl 15, frame shorter", eth() / out4(ihl=15, len=60, proto=4) / (b"\x01" * 20), XDP_DROP,
     "drop_malformed"),
    ("outer ipv4 header checksum wrong", eth() / out4(chksum=0x1234) / tcp4(), XDP_DROP, "drop_malformed"),
    ("outer ipv4 header checksum wrong over its options", eth() / out4(options=[IPOption_Router_Alert()], chksum=1)
     / udp6(), XDP_DROP, "drop_malformed"),
    ("outer ipv4 option length 1", eth() / out4(options=[b"\x44\x01\x00\x00"]) / tcp4(), XDP_DROP, "drop_malformed"),
    ("outer ipv4 option running past the header", eth() / out4(options=[b"\x01\x07\x08\x00"]) / tcp4(), XDP_DROP,
     "drop_malformed"),
    ("outer ipv4 loose source route (hosts refuse it)", eth() / out4(options=[IPOption_LSRR(routers=[OTHER4])])
     / tcp4(), XDP_DROP, "drop_malformed"),
    ("outer ipv4 strict source route", eth() / out4(options=[IPOption_SSRR(routers=[OTHER4])]) / udp6(), XDP_DROP,
     "drop_malformed"),
    ("outer ipv4 version 6", bytes(eth() / out4() / tcp4())[:14] + b"\x65" + bytes(out4() / tcp4())[1:], XDP_DROP,
     "drop_malformed"),
    ("inner ipv4 header truncated", TRUNC_INNER4, XDP_DROP, "drop_malformed"),
    ("inner ipv4 longer than the outer payload", eth() / out4(len=20 + 40) / tcp4(b"x" * 40), XDP_DROP,
     "drop_malformed"),
    ("inner ipv4 ihl 3", eth() / out4() / IP(src=CLIENT4, dst=VIP4, ihl=3) / TCP(), XDP_DROP, "drop_malformed"),
    ("protocol 4 carrying ipv6", eth() / out4(proto=4) / udp6(), XDP_DROP, "drop_malformed"),
    ("protocol 41 carrying ipv4", eth() / out4(proto=41) / tcp4(), XDP_DROP, "drop_malformed"),
    ("outer ipv6 payload length beyond the frame", eth() / out6(plen=500) / udp6(), XDP_DROP, "drop_malformed"),
    ("outer ipv6 payload length zero (jumbogram)", eth() / out6(plen=0) / udp6(), XDP_DROP, "drop_malformed"),
    ("outer ipv6 frame cut inside the inner header", bytes(eth() / out6() / udp6())[:14 + 40 + 20], XDP_DROP,
     "drop_malformed"),
    ("inner ipv6 payload longer than the outer payload", eth() / out6(plen=40 + 8) / IPv6(plen=100) / (b"\0" * 8),
     XDP_DROP, "drop_malformed"),
    ("outer ipv6 hop-by-hop after destination options (rfc 8200: first only)", eth() / out6()
     / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / tcp4(), XDP_DROP, "drop_malformed"),
    ("outer ce over a not-ect inner ipv4 packet", eth() / out4(tos=0x03) / tcp4(), XDP_DROP, "drop_ecn"),
    ("outer ce over a not-ect inner ipv6 packet", eth() / out6(tc=0x03) / udp6(), XDP_DROP, "drop_ecn"),
    ("inner ipv6 truncated to 30 bytes", eth() / out6(plen=30, nh=41) / (bytes(udp6())[:30]), XDP_DROP,
     "drop_malformed"),
]


@pytest.mark.parametrize("desc,pkt,verdict,counter", UNTOUCHED, ids=[u[0] for u in UNTOUCHED])
def test_untouched_or_dropped(prog, maps, desc, pkt, verdict, counter):
    raw = bytes(pkt)
    before = maps.counters()
    v, out = run(prog, raw)
    assert v == verdict, f"{desc}: got {VERDICTS[v]}\n{show(raw)}"
    assert delta(before, maps.counters()) == {counter: 1}, f"{desc}: counters"
    if v == XDP_PASS:
        assert out == raw, f"{desc}: a passed packet must reach the kernel unchanged"


# ---------------------------------------------------------------------------------------------------- ABI and pins


def test_key_layout_and_counter_names_match_the_compiled_program(prog):
    t = prog.table("decap_addrs")
    assert ctypes.sizeof(t.Key) == decap.KEY.size
    assert (t.Key.af.offset, t.Key.addr.offset) == (0, 4)
    assert ctypes.sizeof(t.Leaf) == decap.VALUE_SIZE
    s = prog.table("decap_stats")
    assert len(s) == len(decap.counter_names())
    assert decap.counter_names()[:4] == ["decap_4in4", "decap_6in4", "decap_4in6", "decap_6in6"]


def test_addresses_written_from_pins_are_what_bcc_sees(prog, maps):
    seen = {str(decap.unpack_key(bytes(k))) for k in prog.table("decap_addrs").keys()}
    assert seen == {RIP4, RIP6} == {str(a) for a in maps.addrs()}


def test_a_second_load_adopts_the_pinned_maps(prog, maps):
    run(prog, eth() / out4() / tcp4())
    again = decap.DecapProgram(prog.pin_dir, max_addrs=64)
    again.load()
    try:
        v, out = run_xdp(again.prog_fd, bytes(eth() / out6() / udp6()))[:2]
        assert v == XDP_PASS and out == bytes(Ether(src=LB_MAC, dst=RS_MAC, type=ETH_IPV6) / udp6())
        c = maps.counters()
        assert (c["decap_4in4"], c["decap_6in6"]) == (1, 1)  # one counter array shared by both programs
    finally:
        again.close()


# ---------------------------------------------------------------------------------------------------- fuzz

def _csum16(b: bytes) -> int:
    b = b + b"\0" * (len(b) % 2)
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def kernel_outer(raw: bytes):
    """What Linux does with the outer header of a frame for RIP4/RIP6 before any tunnel handler (ip_rcv with its
    options, ip6_rcv with its extension headers): ("decap", (l3 offset, outer length, bytes left, inner proto)),
    ("drop", why), ("fragment", None) or ("other", None) for what is no tunnel packet for us."""
    off, et = 14, int.from_bytes(raw[12:14], "big") if len(raw) >= 14 else 0
    if et == 0x8100 and len(raw) >= 18:
        off, et = 18, int.from_bytes(raw[16:18], "big")
    if et == ETH_IP and len(raw) >= off + 20:
        ihl = (raw[off] & 15) * 4
        if raw[off + 9] not in (4, 41) or raw[off + 16:off + 20] != socket.inet_aton(RIP4):
            return "other", None
        if raw[off] >> 4 != 4 or ihl < 20 or len(raw) < off + ihl or _csum16(raw[off:off + ihl]) != 0xFFFF:
            return "drop", "header"
        o = 20
        while o < ihl and raw[off + o] != 0:  # options until End
            if raw[off + o] == 1:
                o += 1
                continue
            if o + 1 >= ihl or raw[off + o + 1] < 2 or o + raw[off + o + 1] > ihl or raw[off + o] in (131, 137):
                return "drop", "options"
            o += raw[off + o + 1]
        tot = int.from_bytes(raw[off + 2:off + 4], "big")
        if tot < ihl or off + tot > len(raw):
            return "drop", "length"
        if int.from_bytes(raw[off + 6:off + 8], "big") & 0x3FFF:
            return "fragment", None
        return "decap", (off, ihl, tot - ihl, raw[off + 9])
    if et == ETH_IPV6 and len(raw) >= off + 40:
        nh, o, hbh_late = raw[off + 6], 40, False
        for i in range(4):
            if nh not in (0, 60):
                break
            hbh_late |= nh == 0 and i > 0
            if len(raw) < off + o + 2:
                return "other", None
            nh, o = raw[off + o], o + (raw[off + o + 1] + 1) * 8
        if nh not in (4, 41) or raw[off + 24:off + 40] != socket.inet_pton(socket.AF_INET6, RIP6):
            return "other", None
        plen = int.from_bytes(raw[off + 4:off + 6], "big")
        if raw[off] >> 4 != 6 or hbh_late or plen == 0 or off + 40 + plen > len(raw) or o > 40 + plen:
            return "drop", "header"
        return "decap", (off, o, 40 + plen - o, nh)
    return "other", None


def inner_fits(raw: bytes, at: int, avail: int, proto: int) -> bool:
    i = raw[at:]
    if proto == 4:
        return (len(i) >= 20 and i[0] >> 4 == 4 and (i[0] & 15) >= 5
                and (i[0] & 15) * 4 <= int.from_bytes(i[2:4], "big") <= avail)
    return len(i) >= 40 and i[0] >> 4 == 6 and 40 + int.from_bytes(i[4:6], "big") <= avail


FUZZ_BASES = [
    eth() / out4() / tcp4(), eth() / out4(options=[IPOption_Router_Alert()]) / tcp4(), eth() / out4() / udp6(),
    eth() / out4(options=[b"\x01\x44\x0c\x05" + bytes(8)]) / udp6(), eth() / out6() / tcp4(), eth() / out6() / udp6(),
    eth() / out6() / IPv6ExtHdrDestOpt() / udp6(), eth() / out6() / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / tcp4(),
    eth(Dot1Q(vlan=5)) / out4() / tcp4(), eth() / out4() / out4() / tcp4(),  # the last one nested
]


def test_fuzzed_headers_match_what_the_kernel_would_do(prog, maps):
    """Seeded mutations of good tunnel packets (bytes overwritten or flipped in the headers, frames cut short; the
    outer IPv4 checksum often made right again so the later checks are reached): every packet lands in exactly
    one counter, is passed untouched unless decapsulated, decapsulated only when the kernel would accept its
    outer header and the inner one fits, and then to exactly the inner packet (ECN aside)."""
    rng = random.Random(20261206)
    bases = [bytes(b) for b in FUZZ_BASES]
    problems = []
    for _ in range(3000):
        raw = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(12, min(len(raw), 110))
            if rng.random() < 0.8:
                raw[i] = rng.randrange(256) if rng.random() < 0.6 else raw[i] ^ (1 << rng.randrange(8))
            else:
                del raw[max(i, 15):]
        if rng.random() < 0.6 and len(raw) >= 34 and raw[12:14] == b"\x08\x00" and len(raw) >= 14 + (raw[14] & 15) * 4:
            raw[24:26] = b"\0\0"
            raw[24:26] = (0xFFFF - _csum16(bytes(raw[14:14 + (raw[14] & 15) * 4]))).to_bytes(2, "big")
        raw = bytes(raw)
        before = maps.counters()
        v, out = run(prog, raw)
        d = delta(before, maps.counters())
        want, info = kernel_outer(raw)
        if v not in (XDP_PASS, XDP_DROP) or len(d) != 1:
            problems.append((raw, f"{VERDICTS[v]} {d}"))
            continue
        (c,) = d
        if c.startswith("decap_"):
            if want != "decap" or not inner_fits(raw, info[0] + info[1], info[2], info[3]):
                problems.append((raw, f"{c}, the kernel: {want} {info}"))
                continue
            l3, olen, _, proto = info
            exp = raw[:l3 - 2] + (b"\x08\x00" if proto == 4 else b"\x86\xdd") + raw[l3 + olen:]
            diff = [j for j in range(min(len(out), len(exp))) if out[j] != exp[j]]
            if len(out) != len(exp) or any(j not in (l3 + 1, l3 + 10, l3 + 11) for j in diff):  # tos/tc, IPv4 csum
                problems.append((raw, f"{c}: not exactly the inner packet"))
        elif v == XDP_PASS and out != raw:
            problems.append((raw, f"{c}: passed modified"))
        elif want == "decap" and c != "drop_ecn" and inner_fits(raw, info[0] + info[1], info[2], info[3]):
            problems.append((raw, f"{c}, though the kernel would decapsulate it"))
    assert not problems, f"{len(problems)} of 3000, e.g. {problems[0][1]}:\n{show(problems[0][0])}"


def test_a_pin_root_inside_a_bpffs_works_for_up_down_and_show(monkeypatch):
    """`--pin-root` may name a directory on a bpffs, as hdslbd's does (`/run/hdslb/bpffs/site`), or a bpffs
    mount whose parent takes no files (`/sys/fs/bpf`). The lock file went beside the pin root, so there every
    decap command failed with EPERM/EACCES on `<parent>/.decap.lock` (a bpffs holds no regular files, sysfs takes
    none); and under `ip netns exec` a pin root not made yet inside a bpffs was refused as 'not a bpffs mount'."""
    ensure_bpffs(decap.DEFAULT_PIN_ROOT)
    root = os.path.join(decap.DEFAULT_PIN_ROOT, f"pytest-decap-root-{os.getpid()}", "site")
    try:
        with pytest.raises(decap.DecapError, match="no decap instance on lo"):
            decap.down("lo", root)  # nothing there: said so, not an OSError on a lock file
        assert decap.show(None, root) == []
        monkeypatch.setattr(decap, "_in_private_mount_ns", lambda: True)  # as under ip netns exec
        decap.ensure_pin_root(root)
        assert decap.is_bpffs(root)
        with decap._locked(root):
            assert os.listdir(root) == []  # the lock leaves no file among the pins
    finally:
        shutil.rmtree(os.path.dirname(root), ignore_errors=True)
