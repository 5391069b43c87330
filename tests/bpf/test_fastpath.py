"""The compiled XDP program on crafted packets (BPF_PROG_TEST_RUN): verdicts, rewritten bytes, map side effects."""

import ctypes as ct
import ipaddress
import os
import shutil
import socket

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.inet6 import IPv6

from hdslb.fastpath.testrun import VERDICTS, XDP_DROP, XDP_PASS, XDP_TX, run_xdp

from .conftest import CONN_TABLES, LB_MAC, LO_IFINDEX, on_cpu


@pytest.fixture(params=CONN_TABLES)
def fastpath(fastpath_of, request):
    """Every test here runs on both conn table kinds: a value per CPU (the default) and one shared value."""
    return fastpath_of(request.param)

CLIENT_MAC = "02:cc:00:00:00:01"
RS_MAC = "02:55:00:00:00:02"
CLIENT = "10.0.0.1"
VIP = "10.0.0.100"
LIP = "192.168.100.200"
RS1, RS2 = "192.168.100.2", "192.168.100.3"
LB_MAC_S = ":".join(f"{b:02x}" for b in LB_MAC)
A = ipaddress.ip_address


needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")



def setup_service(maps, proto=socket.IPPROTO_TCP, dests=((RS1, 80),), ring=None, drain=()):
    """VIP:80 -> dests via LIP, everything reachable through the loopback 'interface' of the test run."""
    maps.set_service(proto, A(VIP), 80, 0)
    for slot, (addr, port) in enumerate(dests):
        maps.set_dest(slot, A(addr), port, "fnat", 0, drain=slot in drain)
    maps.set_sched(0, ring if ring is not None else list(range(len(dests))), 1)
    maps.set_laddrs(0, [(A(LIP), LO_IFINDEX)])
    maps.set_local(A(VIP), 0x1, LO_IFINDEX)
    maps.set_local(A(LIP), 0x2, LO_IFINDEX)
    maps.set_route(ipaddress.ip_network("192.168.100.0/24"), LO_IFINDEX, None, None, 1500, False)
    for addr, _ in dests:
        maps.set_neigh(A(addr), bytes.fromhex(RS_MAC.replace(":", "")), LO_IFINDEX, permanent=True)


def syn(sport=40000, flags="S", src=CLIENT, payload=b""):
    return Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=src, dst=VIP) / TCP(sport=sport, dport=80, flags=flags, seq=1000) / payload


def run(fp, pkt):
    verdict, out, _ = run_xdp(fp.prog_fd, bytes(pkt))
    return verdict, Ether(out)


def assert_checksums(p):
    """Recompute with scapy and compare: the fast path's incremental updates must equal a full recompute."""
    q = p.copy()
    del q[IP].chksum
    l4 = TCP if TCP in q else UDP
    del q[l4].chksum
    q = Ether(bytes(q))
    assert p[IP].chksum == q[IP].chksum, "IP checksum"
    assert p[l4].chksum == q[l4].chksum, f"{l4.__name__} checksum"


def delta(before, after):
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_syn_is_rewritten_as_fnat(fastpath, maps):
    setup_service(maps)
    v, p = run(fastpath, syn())
    assert VERDICTS[v] == "XDP_TX", p.show(dump=True)
    assert (p[IP].src, p[IP].dst, p[TCP].dport) == (LIP, RS1, 80)
    assert 1025 <= p[TCP].sport <= 65535
    assert (p[Ether].src, p[Ether].dst) == (LB_MAC_S, RS_MAC)
    assert p[TCP].seq == 1000
    assert_checksums(p)
    c = maps.counters()
    assert c["conn_new"] == 1 and c["verdict_tx"] == 1 and c["rx"] == 1


def test_reply_is_rewritten_back_to_the_client(fastpath, maps):
    setup_service(maps)
    _, fwd = run(fastpath, syn(sport=41000))
    lport = fwd[TCP].sport
    reply = Ether(src=RS_MAC, dst=LB_MAC_S) / IP(src=RS1, dst=LIP) / TCP(sport=80, dport=lport, flags="SA", seq=5, ack=1001)
    v, p = run(fastpath, reply)
    assert v == XDP_TX
    assert (p[IP].src, p[IP].dst, p[TCP].sport, p[TCP].dport) == (VIP, CLIENT, 80, 41000)
    assert (p[Ether].src, p[Ether].dst) == (LB_MAC_S, CLIENT_MAC)
    assert_checksums(p)
    st = maps.svc_stats(0)
    assert st["conns"] == 1 and st["inpkts"] == 1 and st["outpkts"] == 1
    assert st["inbytes"] == 40 and st["outbytes"] == 40


def test_udp_flow_both_ways_with_valid_checksums(fastpath, maps):
    setup_service(maps, proto=socket.IPPROTO_UDP)
    q = Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP) / UDP(sport=5353, dport=80) / b"hello"
    v, p = run(fastpath, q)
    assert v == XDP_TX and (p[IP].dst, p[UDP].dport, p[IP].src) == (RS1, 80, LIP)
    assert_checksums(p)
    r = Ether(src=RS_MAC, dst=LB_MAC_S) / IP(src=RS1, dst=LIP) / UDP(sport=80, dport=p[UDP].sport) / b"world"
    v, p2 = run(fastpath, r)
    assert v == XDP_TX and (p2[IP].src, p2[UDP].sport, p2[IP].dst, p2[UDP].dport) == (VIP, 80, CLIENT, 5353)
    assert_checksums(p2)


def test_udp_without_a_checksum_is_forwarded_without_one(fastpath, maps):
    """IPv4 UDP may carry no checksum (zero): both directions keep zero while addresses and ports are rewritten
    (an incremental update of a zero would send a wrong checksum the receiver then checks); the IP header's
    checksum is still updated."""
    def ip_checksum_ok(p):
        q = p.copy()
        del q[IP].chksum
        return p[IP].chksum == Ether(bytes(q))[IP].chksum

    setup_service(maps, proto=socket.IPPROTO_UDP)
    q = Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP) / UDP(sport=5354, dport=80, chksum=0) / b"hi"
    v, p = run(fastpath, q)
    assert v == XDP_TX and (p[IP].src, p[IP].dst, p[UDP].dport) == (LIP, RS1, 80)
    assert p[UDP].chksum == 0 and ip_checksum_ok(p)
    r = Ether(src=RS_MAC, dst=LB_MAC_S) / IP(src=RS1, dst=LIP) / UDP(sport=80, dport=p[UDP].sport, chksum=0) / b"yo"
    v, p = run(fastpath, r)
    assert v == XDP_TX and (p[IP].src, p[UDP].sport, p[IP].dst, p[UDP].dport) == (VIP, 80, CLIENT, 5354)
    assert p[UDP].chksum == 0 and ip_checksum_ok(p)


def test_rr_ring_alternates_and_drained_dest_gets_no_new_flows(fastpath, maps):
    setup_service(maps, dests=((RS1, 80), (RS2, 80)))
    # the ring cursor is per CPU: stay on one CPU to see one CPU's sequence
    got = on_cpu(0, lambda: [run(fastpath, syn(sport=42000 + i))[1][IP].dst for i in range(4)])
    assert got == [RS1, RS2, RS1, RS2]
    # weight 0: the daemon drops it from the ring and flags it; an existing flow to it keeps going
    setup_service(maps, dests=((RS1, 80), (RS2, 80)), ring=[0], drain=(1,))
    v, p = run(fastpath, syn(sport=42001, flags="A"))
    assert v == XDP_TX and p[IP].dst == RS2
    assert {run(fastpath, syn(sport=43000 + i))[1][IP].dst for i in range(4)} == {RS1}


NOT_OURS = Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst="10.9.9.9") / TCP(sport=1, dport=22, flags="S")

# (description, packet, expected verdict, counter that must move)
FIXTURES = [
    ("not ours goes to the kernel", NOT_OURS, XDP_PASS, "pass_not_ours"),
    ("ipv6 goes to the kernel", Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IPv6(src="fd00::1", dst="fd00::2") / TCP(), XDP_PASS, "pass_ipv6"),
    # (frames shorter than an Ethernet header never reach XDP: the kernel refuses them even in a test run)
    ("truncated vlan tag", bytes(Ether(src=CLIENT_MAC, dst=LB_MAC_S, type=0x8100))[:15], XDP_DROP, "drop_malformed_eth"),
    ("ip header length 3", bytes(Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP, ihl=3) / TCP(dport=80)), XDP_DROP, "drop_malformed_ip"),
    ("ip total length beyond frame", Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP, len=1400) / TCP(dport=80), XDP_DROP, "drop_malformed_ip"),
    ("truncated ip header", bytes(Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP))[:24], XDP_DROP, "drop_malformed_ip"),
    ("tcp data offset 2", Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP) / TCP(dport=80, dataofs=2, flags="S"), XDP_DROP, "drop_malformed_l4"),
    ("truncated tcp header", Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP, proto=6) / (b"\x00" * 10), XDP_DROP, "drop_malformed_l4"),
    ("udp length below header", Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP) / UDP(dport=80, len=4), XDP_DROP, "drop_malformed_l4"),
    ("ack without a connection", syn(sport=44000, flags="A"), XDP_DROP, "drop_no_conn"),
    ("fragment to a vip", Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP, flags="MF") / TCP(dport=80), XDP_DROP, "drop_fragment"),
    ("icmp other than echo to a vip goes to the kernel", Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP, proto=1) / (b"\x0d\x00" + b"\x00" * 6), XDP_PASS, "pass_local"),
    ("service port we do not balance", Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP) / TCP(dport=81, flags="S"), XDP_PASS, "pass_local"),
]


@pytest.mark.parametrize("desc,pkt,verdict,counter", FIXTURES, ids=[f[0] for f in FIXTURES])
def test_fixture(fastpath, maps, desc, pkt, verdict, counter):
    setup_service(maps)
    before = maps.counters()
    raw = bytes(pkt)
    v, out, _ = run_xdp(fastpath.prog_fd, raw)
    assert v == verdict, f"{desc}: got {VERDICTS[v]}"
    d = delta(before, maps.counters())
    assert d.get(counter) == 1, f"{desc}: counters moved {d}"
    if v == XDP_PASS:
        assert out == raw, f"{desc}: a passed packet must reach the kernel unchanged"
    assert maps.svc_stats(0)["conns"] == 0, f"{desc}: must not create a connection"


def test_arp_request_for_an_owned_address_is_answered(fastpath, maps):
    setup_service(maps)
    req = Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=CLIENT_MAC, psrc=CLIENT, pdst=VIP)
    v, p = run(fastpath, req)
    assert v == XDP_TX
    assert p[ARP].op == 2 and p[ARP].psrc == VIP and p[ARP].hwsrc == LB_MAC_S
    assert p[ARP].pdst == CLIENT and p[ARP].hwdst == CLIENT_MAC and p[Ether].dst == CLIENT_MAC
    learned = {str(n["addr"]): n["lladdr"] for n in maps.neighs()}
    assert learned[CLIENT] == CLIENT_MAC
    other = Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=CLIENT_MAC, psrc=CLIENT, pdst="10.0.0.77")
    assert run(fastpath, other)[0] == XDP_PASS


def test_arp_about_an_address_routed_out_of_another_interface_is_not_learned(fastpath, maps):
    """Without the slow path XDP learns ARP senders. A host on one interface asking for the VIP "from" a real
    server's address routed out of another would move that server's next hop to its own MAC (the map is keyed by
    address alone; Linux keeps a table per interface): not learned, as the slow path refuses it."""
    other = LO_IFINDEX + 41
    maps.set_local(A(VIP), 0x1, 0)  # answered on every interface
    maps.set_route(ipaddress.ip_network("192.168.100.0/24"), other, None, None, 1500, False)
    maps.set_neigh(A(RS1), bytes.fromhex(RS_MAC.replace(":", "")), other, permanent=False)
    req = Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=CLIENT_MAC, psrc=RS1, pdst=VIP)
    assert run(fastpath, req)[0] == XDP_TX, "still answered"
    learned = {str(n["addr"]): n["lladdr"] for n in maps.neighs()}
    assert learned[RS1] == RS_MAC, "the server's entry kept"
    # nor made for an address routed elsewhere, nor moved without a route away from the interface it is on
    req2 = Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=CLIENT_MAC, psrc=RS2, pdst=VIP)
    run(fastpath, req2)
    maps.set_neigh(A("172.16.0.9"), bytes.fromhex(RS_MAC.replace(":", "")), other, permanent=False)
    run(fastpath, Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=CLIENT_MAC, psrc="172.16.0.9",
                                                                      pdst=VIP))
    learned = {str(n["addr"]): n["lladdr"] for n in maps.neighs()}
    assert RS2 not in learned and learned["172.16.0.9"] == RS_MAC, learned
    # routed out of this interface: learned, as before
    maps.set_route(ipaddress.ip_network("192.168.100.0/24"), LO_IFINDEX, None, None, 1500, False)
    run(fastpath, req)
    assert {str(n["addr"]): n["lladdr"] for n in maps.neighs()}[RS1] == CLIENT_MAC


# --- IPv6 neighbour discovery without the slow path (XDP's fallback, as for ARP) --------------------------------
CLIENT6, VIP6, OTHER6 = "fd00::1", "fd00::100", "fd00::77"
SNODE = "ff02::1:ff00:100"  # VIP6's solicited-node group


def ns(tgt=VIP6, src=CLIENT6, dst=SNODE, hlim=255, opts=None, eth_src=CLIENT_MAC, vlan=None, **icmp):
    """A neighbour solicitation; opts defaults to a source link-layer option with the Ethernet source (none from ::)."""
    from scapy.layers.inet6 import ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr

    if opts is None:
        opts = b"" if src == "::" else ICMPv6NDOptSrcLLAddr(lladdr=eth_src)
    l2 = Ether(src=eth_src, dst="33:33:ff:00:01:00" if dst.startswith("ff") else LB_MAC_S)
    if vlan is not None:
        l2 = l2 / Dot1Q(vlan=vlan)
    return l2 / IPv6(src=src, dst=dst, hlim=hlim) / ICMPv6ND_NS(tgt=tgt, **icmp) / opts


def own_v6(maps, ifindex=LO_IFINDEX):
    maps.set_local(A(VIP6), 0x1, ifindex)


def assert_na(p, dst, dmac, solicited, l2len=14):
    """An advertisement for VIP6 from our MAC, as the slow path would send it, its checksum as scapy computes it."""
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr

    assert (p[Ether].src, p[Ether].dst) == (LB_MAC_S, dmac)
    assert (p[IPv6].src, p[IPv6].dst, p[IPv6].hlim, p[IPv6].plen, p[IPv6].nh) == (VIP6, dst, 255, 32, 58)
    assert (p[IPv6].tc, p[IPv6].fl) == (0, 0)
    na = p[ICMPv6ND_NA]
    assert (na.type, na.code, na.R, na.S, na.O, na.tgt) == (136, 0, 0, int(solicited), 1, VIP6)
    assert na[ICMPv6NDOptDstLLAddr].lladdr == LB_MAC_S and na[ICMPv6NDOptDstLLAddr].len == 1
    assert len(bytes(p)) == l2len + 40 + 32, "the frame is exactly the advertisement"
    q = p.copy()
    del q[ICMPv6ND_NA].cksum
    assert Ether(bytes(q))[ICMPv6ND_NA].cksum == na.cksum, "ICMPv6 checksum"


def test_ns_for_an_owned_v6_address_is_answered_without_the_slow_path(fastpath, maps):
    """The daemon down (no slow-path socket): nothing else answers for a VIP (the kernel does not hold it), so
    XDP does, as it answers ARP: an IPv6 VIP stayed unreachable once a client's neighbour entry expired."""
    own_v6(maps)
    before = maps.counters()
    v, p = run(fastpath, ns())
    assert VERDICTS[v] == "XDP_TX", p.show(dump=True)
    assert_na(p, CLIENT6, CLIENT_MAC, solicited=True)
    d = delta(before, maps.counters())
    assert d.get("nd_reply") == 1 and d.get("verdict_tx") == 1 and "pass_ipv6" not in d, d


@pytest.mark.parametrize("case", ["unicast without lladdr", "lladdr and another option", "link padding", "vlan",
                                  "lladdr other than the ethernet source"])
def test_ns_shapes_the_advertisement_answers(fastpath, maps, case):
    """Grown (24-byte NS), cut (a longer NS, trailing link padding), tagged: always the 32-byte advertisement."""
    from scapy.layers.inet6 import ICMPv6NDOptSrcLLAddr

    own_v6(maps)
    l2len, dmac = 14, CLIENT_MAC
    if case == "unicast without lladdr":  # a reachability probe may omit it: answered to the Ethernet source
        pkt = ns(dst=VIP6, opts=b"")
    elif case == "lladdr and another option":  # an unknown option (a nonce) first: skipped, the lladdr found
        pkt = ns(opts=bytes([14, 1]) + b"\xab" * 6 + bytes(ICMPv6NDOptSrcLLAddr(lladdr=CLIENT_MAC)))
    elif case == "link padding":
        pkt = bytes(ns()) + b"\0" * 10
    elif case == "vlan":
        pkt, l2len = ns(vlan=7), 18
    else:
        pkt, dmac = ns(opts=ICMPv6NDOptSrcLLAddr(lladdr="02:cc:00:00:00:99")), "02:cc:00:00:00:99"
    v, p = run(fastpath, pkt)
    assert v == XDP_TX, p.show(dump=True)
    assert_na(p, CLIENT6, dmac, solicited=True, l2len=l2len)
    if case == "vlan":
        assert p[Dot1Q].vlan == 7


def test_a_dad_probe_for_an_owned_v6_address_is_defended(fastpath, maps):
    """From :: (duplicate address detection): to all nodes, not solicited, as the slow path (and hdslbd with
    --no-slowpath) answers it and as an ARP probe for a VIP is answered: a host probing our address is told."""
    own_v6(maps)
    v, p = run(fastpath, ns(src="::"))
    assert v == XDP_TX, p.show(dump=True)
    assert_na(p, "ff02::1", "33:33:00:00:00:01", solicited=False)


def _bad_checksum():
    raw = bytearray(bytes(ns()))
    raw[14 + 40 + 2] ^= 0xff
    return bytes(raw)


NOT_ANSWERED = [
    ("target not ours", lambda: ns(tgt=OTHER6, dst="ff02::1:ff00:77")),
    ("hop limit 64", lambda: ns(hlim=64)),  # RFC 4861 7.1.1: maybe from off-link
    ("bad checksum", _bad_checksum),
    ("code 1", lambda: ns(code=1)),
    ("zero-length option", lambda: ns(opts=bytes([1, 0]) + b"\0" * 6)),
    ("option past the message", lambda: ns(opts=bytes([1, 2]) + bytes.fromhex(CLIENT_MAC.replace(":", "")))),
    ("length not a multiple of 8", lambda: ns(opts=bytes([1, 1, 2, 3]))),
    ("truncated message", lambda: Ether(src=CLIENT_MAC, dst="33:33:ff:00:01:00") / IPv6(src=CLIENT6, dst=SNODE, hlim=255)
     / bytes(ns()[IPv6].payload)[:20]),
    ("multicast source", lambda: ns(src="ff02::5")),
    ("dad with a lladdr", lambda: ns(src="::", opts=bytes([1, 1]) + b"\x02\xcc\0\0\0\x01")),
    ("dad to a unicast address", lambda: ns(src="::", dst=VIP6)),
    ("group ethernet source, no lladdr", lambda: ns(dst=VIP6, opts=b"", eth_src="03:00:00:00:00:01")),
]


@pytest.mark.parametrize("desc,make", NOT_ANSWERED, ids=[c[0] for c in NOT_ANSWERED])
def test_an_invalid_or_foreign_ns_is_not_answered(fastpath, maps, desc, make):
    """Left to the kernel unchanged (which discards what RFC 4861 calls invalid), as the slow path drops them."""
    own_v6(maps)  # only VIP6 is ours
    raw = bytes(make())
    v, out, _ = run_xdp(fastpath.prog_fd, raw)
    assert (VERDICTS[v], out) == ("XDP_PASS", raw), desc
    assert maps.counters()["nd_reply"] == 0


def test_an_ns_for_an_address_owned_on_another_interface_is_not_answered(fastpath, maps):
    """handle_arp's rule: an address bound to another interface is answered there, not here."""
    own_v6(maps, ifindex=LO_IFINDEX + 41)
    raw = bytes(ns())
    assert run_xdp(fastpath.prog_fd, raw)[:2] == (XDP_PASS, raw)
    own_v6(maps, ifindex=0)  # 0: every interface (a config VIP)
    assert run_xdp(fastpath.prog_fd, raw)[0] == XDP_TX


# --- ICMP echo without the slow path (XDP's fallback, as for ARP and ND) ------------------------------------------
def echo4(**ip):
    from scapy.layers.inet import ICMP

    return Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(**dict(dict(src=CLIENT, dst=VIP, ttl=9, id=77), **ip)) / \
        ICMP(id=5, seq=6) / (b"x" * 37)


def echo6(src=CLIENT6, dst=VIP6):
    from scapy.layers.inet6 import ICMPv6EchoRequest

    return Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IPv6(src=src, dst=dst, hlim=9, tc=0x28) / \
        ICMPv6EchoRequest(id=5, seq=6, data=b"y" * 37)


def test_echo_to_an_owned_address_is_answered_without_the_slow_path(fastpath, maps):
    """The daemon down (restarting, killed) or --no-slowpath: the kernel does not hold our addresses, so nobody
    answered a ping to a VIP; XDP does now, as it answers ARP and solicitations for it."""
    from scapy.layers.inet import ICMP
    from scapy.layers.inet6 import ICMPv6EchoReply

    setup_service(maps)
    own_v6(maps)
    before = maps.counters()
    v, p = run(fastpath, echo4())
    assert VERDICTS[v] == "XDP_TX", p.show(dump=True)
    assert (p.src, p.dst, p[IP].src, p[IP].dst, p[IP].ttl, p[IP].id) == (LB_MAC_S, CLIENT_MAC, VIP, CLIENT, 64, 77)
    assert (p[ICMP].type, p[ICMP].code, p[ICMP].id, p[ICMP].seq, p[ICMP].load) == (0, 0, 5, 6, b"x" * 37)
    q = p.copy()
    del q[IP].chksum, q[ICMP].chksum
    q = Ether(bytes(q))
    assert (p[IP].chksum, p[ICMP].chksum) == (q[IP].chksum, q[ICMP].chksum), "checksums as a full recompute"
    v, p = run(fastpath, echo6())
    assert VERDICTS[v] == "XDP_TX", p.show(dump=True)
    r = p[ICMPv6EchoReply]
    assert (p.src, p.dst, p[IPv6].src, p[IPv6].dst, p[IPv6].hlim) == (LB_MAC_S, CLIENT_MAC, VIP6, CLIENT6, 64)
    assert (r.type, r.code, r.id, r.seq, r.data) == (129, 0, 5, 6, b"y" * 37)
    q = p.copy()
    del q[ICMPv6EchoReply].cksum
    assert Ether(bytes(q))[ICMPv6EchoReply].cksum == r.cksum, "ICMPv6 checksum"
    d = delta(before, maps.counters())
    assert d.get("echo_reply") == 2 and d.get("verdict_tx") == 2, d


ECHO_NOT_ANSWERED = [
    ("to an address not ours", lambda: echo4(dst="10.0.0.77")),
    ("v6 to an address not ours", lambda: echo6(dst=OTHER6)),
    ("from a martian source", lambda: echo4(src="127.0.0.1")),
    ("from one of our own addresses", lambda: echo4(src=LIP)),
    ("v6 from a multicast source", lambda: echo6(src="ff02::1")),
    ("with IP options", lambda: echo4(options=[b"\x94\x04\x00\x00"])),
    ("a fragment", lambda: echo4(flags="MF")),
]


@pytest.mark.parametrize("desc,make", ECHO_NOT_ANSWERED, ids=[c[0] for c in ECHO_NOT_ANSWERED])
def test_an_echo_the_fallback_does_not_answer_is_left_to_the_kernel(fastpath, maps, desc, make):
    setup_service(maps)
    own_v6(maps)
    raw = bytes(make())
    v, out, _ = run_xdp(fastpath.prog_fd, raw)
    assert (VERDICTS[v], out) == ("XDP_PASS", raw), desc
    assert maps.counters()["echo_reply"] == 0


@pytest.mark.parametrize("what", ["ns", "echo"])
def test_with_the_slow_path_up_it_is_still_punted(fastpath, maps, slowpath_up, what):
    """An NS for an owned address and an echo to a VIP go to the slow path while it runs, answered in XDP only
    without it."""
    if what == "ns":
        own_v6(maps)
        raw, punt, answered = bytes(ns()), "punt_arp", "nd_reply"
    else:
        setup_service(maps)
        raw, punt, answered = bytes(echo4()), "punt_icmp", "echo_reply"
    before = maps.counters()
    v, _, _ = run_xdp(fastpath.prog_fd, raw)
    d = delta(before, maps.counters())
    assert VERDICTS[v] == "XDP_REDIRECT" and d.get(punt) == 1 and answered not in d, d
    slowpath_up.close()  # the daemon dies: answered in XDP from the next one
    assert run_xdp(fastpath.prog_fd, raw)[0] == XDP_TX


def test_vlan_tagged_syn_is_balanced(fastpath, maps):
    setup_service(maps)
    pkt = Ether(src=CLIENT_MAC, dst=LB_MAC_S) / Dot1Q(vlan=7) / IP(src=CLIENT, dst=VIP) / TCP(sport=45000, dport=80, flags="S")
    v, p = run(fastpath, pkt)
    assert v == XDP_TX and p[Dot1Q].vlan == 7 and p[IP].dst == RS1
    assert_checksums(p)


@needs_two_cpus
def test_flow_created_on_one_cpu_is_found_on_the_other(fastpath, maps):
    setup_service(maps)
    _, fwd = on_cpu(0, lambda: run(fastpath, syn(sport=46000)))
    reply = Ether(src=RS_MAC, dst=LB_MAC_S) / IP(src=RS1, dst=LIP) / TCP(sport=80, dport=fwd[TCP].sport, flags="SA")
    v, p = on_cpu(1, lambda: run(fastpath, reply))
    assert v == XDP_TX and (p[IP].dst, p[TCP].dport) == (CLIENT, 46000)
    v, p = on_cpu(1, lambda: run(fastpath, syn(sport=46000, flags="A")))
    assert v == XDP_TX and p[TCP].sport == fwd[TCP].sport, "same local port on the other CPU"
    # per-CPU table: CPU 1 copies each direction's entry once; shared: there is nothing to copy
    assert maps.counters()["conn_adopt"] == (0 if maps.conn_shared else 2)


@needs_two_cpus
def test_a_flow_s_state_is_the_furthest_any_cpu_saw(fastpath, maps):
    """A FIN that crossed one CPU while the flow's last packet crossed another: the flow is closing, not active
    (ActiveConn/InActConn, the sweep's timeout and ipvsadm -Lnc all read the merged state)."""
    import time

    setup_service(maps)
    on_cpu(0, lambda: run(fastpath, syn(sport=46100)))
    on_cpu(0, lambda: run(fastpath, syn(sport=46100, flags="A")))
    on_cpu(1, lambda: run(fastpath, syn(sport=46100, flags="A")))  # CPU 1 adopts the ESTABLISHED copy
    on_cpu(0, lambda: run(fastpath, syn(sport=46100, flags="FA")))
    time.sleep(0.05)  # later jiffies: CPU 1's copy is the newest
    assert on_cpu(1, lambda: run(fastpath, syn(sport=46100, flags="A")))[0] == XDP_TX
    states = {c["state"] for c in maps.conns() if not c["out"] and c["sport"] == 46100}
    assert states == {3}, "FIN_WAIT"
    assert {r[3] for r in maps.conn_aging_view() if not r[4]} == {3}


@needs_two_cpus
def test_a_syn_on_a_flow_finished_on_another_cpu_is_scheduled_afresh(fastpath, maps):
    """The client's FIN crossed CPU 1; its new SYN on the same port arrives on CPU 0, whose copy still says
    ESTABLISHED: the flow is finished all the same (LVS conn_reuse_mode), so the SYN is scheduled afresh."""
    setup_service(maps, dests=((RS1, 80), (RS2, 80)), ring=[0])
    on_cpu(0, lambda: run(fastpath, syn(sport=46200)))
    on_cpu(0, lambda: run(fastpath, syn(sport=46200, flags="A")))
    on_cpu(1, lambda: run(fastpath, syn(sport=46200, flags="FA")))  # CPU 1 adopts, then sees the FIN
    maps.set_sched(0, [1], 2)
    v, p = on_cpu(0, lambda: run(fastpath, syn(sport=46200)))
    assert v == XDP_TX and p[IP].dst == RS2 and maps.counters()["conn_reused"] == 1


@needs_two_cpus
def test_counters_sum_across_cpus(fastpath, maps):
    setup_service(maps)
    for _ in range(3):
        on_cpu(0, lambda: run_xdp(fastpath.prog_fd, bytes(NOT_OURS)))
    for _ in range(5):
        on_cpu(1, lambda: run_xdp(fastpath.prog_fd, bytes(NOT_OURS)))
    per = maps.per_cpu_counters()["pass_not_ours"]
    assert per[0] == 3 and per[1] == 5
    assert maps.counters()["pass_not_ours"] == 8


def test_exhausted_port_pool_drops_the_syn_and_never_reuses_a_port(fastpath, maps):
    setup_service(maps)
    maps.set_cfg(2000, 2001)
    ports = []
    for i in range(2):
        v, p = run(fastpath, syn(sport=47000 + i))
        assert v == XDP_TX
        ports.append(p[TCP].sport)
    assert sorted(ports) == [2000, 2001]
    v, _ = run(fastpath, syn(sport=47002))
    assert v == XDP_DROP
    assert maps.counters()["drop_lport_exhausted"] == 1
    # the live flows still map to their own ports
    v, p = run(fastpath, syn(sport=47000, flags="A"))
    assert v == XDP_TX and p[TCP].sport == ports[0]


def test_missing_route_neighbour_or_laddr_is_counted(fastpath, maps):
    setup_service(maps)
    maps.set_laddrs(0, [])
    assert run(fastpath, syn(sport=48002))[0] == XDP_DROP
    assert maps.counters()["drop_no_laddr"] == 1
    maps.set_laddrs(0, [(A(LIP), LO_IFINDEX)])
    maps.del_neigh(A(RS1))
    assert run(fastpath, syn(sport=48000))[0] == XDP_DROP
    assert maps.counters()["drop_no_neigh"] == 1
    maps.del_route(ipaddress.ip_network("192.168.100.0/24"))
    assert run(fastpath, syn(sport=48001))[0] == XDP_DROP
    assert maps.counters()["drop_no_route"] == 1
    assert maps.counters()["conn_new"] == 0


def test_new_flows_take_the_longest_prefix_and_established_ones_keep_their_next_hop(fastpath, maps):
    """dpip routes in the LPM trie as new flows see them: a /32 host route beats the /24, a /0 default catches what
    no other covers; deleting the more specific hands the next new flow to the less specific at once, while an
    established flow keeps the next hop it was made with (README: a DPVS connection holds its route)."""
    gw, gw_mac = "192.168.100.254", "02:66:00:00:00:fe"
    setup_service(maps)
    maps.set_neigh(A(gw), bytes.fromhex(gw_mac.replace(":", "")), LO_IFINDEX, permanent=True)
    host = ipaddress.ip_network(f"{RS1}/32")
    maps.set_route(host, LO_IFINDEX, A(gw), None, 1500, False)
    v, p = run(fastpath, syn(sport=49000))
    assert v == XDP_TX and (p[IP].dst, p[Ether].dst) == (RS1, gw_mac), "the /32 via the gateway, not the /24"
    maps.del_route(host)
    v, p = run(fastpath, syn(sport=49001))
    assert v == XDP_TX and p[Ether].dst == RS_MAC, "the /24 on-link at once"
    v, p = run(fastpath, syn(sport=49000, flags="A"))
    assert v == XDP_TX and p[Ether].dst == gw_mac, "the established flow keeps its next hop"
    maps.del_route(ipaddress.ip_network("192.168.100.0/24"))
    maps.set_route(ipaddress.ip_network("0.0.0.0/0"), LO_IFINDEX, A(gw), None, 1500, False)
    v, p = run(fastpath, syn(sport=49002))
    assert v == XDP_TX and p[Ether].dst == gw_mac, "the default route"
    assert maps.counters()["drop_no_route"] == 0


def test_abi_sizes_match_the_compiled_program(fastpath):
    import ctypes

    from hdslb.fastpath import abi

    t = fastpath.table("conn6_map")
    assert ctypes.sizeof(t.Key) == abi.CONN_KEY_SIZE
    assert ctypes.sizeof(getattr(t, "sLeaf", t.Leaf)) == abi.CONN_VAL_SIZE
    t = fastpath.table("conn4_map")
    assert ctypes.sizeof(t.Key) == abi.CONN4_KEY_SIZE
    assert ctypes.sizeof(getattr(t, "sLeaf", t.Leaf)) == abi.CONN4_VAL_SIZE
    assert len(abi.counter_names()) == len(fastpath.table("counters"))


def test_tcp_state_follows_the_handshake_and_close(fastpath, maps):
    setup_service(maps)
    _, p = run(fastpath, syn(sport=50000))

    def state():
        return [c["state"] for c in maps.conns() if not c["out"]]

    assert state() == [1]  # syn_recv
    reply = Ether(src=RS_MAC, dst=LB_MAC_S) / IP(src=RS1, dst=LIP) / TCP(sport=80, dport=p[TCP].sport, flags="SA")
    run(fastpath, reply)
    run(fastpath, syn(sport=50000, flags="A"))
    assert state() == [2]  # established
    run(fastpath, syn(sport=50000, flags="PA", payload=b"GET /"))
    assert state() == [2]
    run(fastpath, syn(sport=50000, flags="FA"))
    assert state() == [3]  # fin_wait
    run(fastpath, syn(sport=50000, flags="R"))
    assert state() == [4]  # close


def test_batched_stats_read_matches_per_entry_reads(fastpath, maps):
    setup_service(maps, dests=((RS1, 80), (RS2, 80)))
    for i in range(3):
        run(fastpath, syn(sport=51000 + i))
    assert maps.all_stats("svc_stats") == {0: maps.svc_stats(0)}
    assert maps.all_stats("dest_stats") == {s: maps.dest_stats(s) for s in (0, 1) if maps.dest_stats(s)["conns"]}


def test_per_interface_counters(fastpath, maps):
    setup_service(maps)
    before = maps.if_stats(LO_IFINDEX)
    run(fastpath, syn(sport=52000))  # forwarded (XDP_TX)
    run_xdp(fastpath.prog_fd, bytes(NOT_OURS))  # to the kernel
    run_xdp(fastpath.prog_fd, bytes(syn(sport=52001, flags="A")))  # dropped: no connection
    after = maps.if_stats(LO_IFINDEX)
    d = {k: after[k] - before[k] for k in maps.IF_FIELDS}
    assert d["rx_packets"] == 3 and d["tx_packets"] == 1 and d["pass"] == 1 and d["drops"] == 1
    assert d["rx_bytes"] == len(bytes(syn())) * 2 + len(bytes(NOT_OURS)) and d["tx_bytes"] == len(bytes(syn()))


def test_kni_host_route_hands_a_vip_to_the_kernel(fastpath, maps):
    setup_service(maps)
    maps.set_route(ipaddress.ip_network(f"{VIP}/32"), LO_IFINDEX, None, None, 1500, kni=True)
    maps.set_cfg(kni_routes=True)
    try:
        raw = bytes(syn(sport=53000))
        v, out, _ = run_xdp(fastpath.prog_fd, raw)
        assert v == XDP_PASS and out == raw and maps.counters()["pass_kni"] == 1
        maps.set_cfg(kni_routes=False)  # without the flag the trie is not consulted
        assert run_xdp(fastpath.prog_fd, raw)[0] == XDP_TX
    finally:
        maps.set_cfg(kni_routes=False)
        maps.del_route(ipaddress.ip_network(f"{VIP}/32"))


def test_ipv6_passes_to_the_kernel_while_no_slow_path_serves_it(fastpath, maps):
    """ICMPv6 for an owned v6 address that XDP does not answer itself (an NS and an echo request are: see
    test_ns_for_an_owned_v6_address_is_answered_without_the_slow_path and
    test_echo_to_an_owned_address_is_answered_without_the_slow_path) goes to the kernel while no slow path runs."""
    maps.set_local(A("fd00::100"), 0x1, LO_IFINDEX)
    from scapy.layers.inet6 import ICMPv6EchoReply

    for pkt in (Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IPv6(src="fd00::1", dst="fd00::100") / ICMPv6EchoReply(),
                bytes(Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IPv6(src="fd00::1", dst="fd00::100"))[:30]):
        raw = bytes(pkt)
        v, out, _ = run_xdp(fastpath.prog_fd, raw)
        assert (v, out) == ((XDP_PASS, raw) if len(raw) > 54 else (XDP_DROP, out)), pkt


TIMEOUTS = {"syn_recv": 30, "established": 90, "fin_wait": 7, "close": 3, "udp": 300}


def _age_conns(maps, seconds):
    """Make every copy of every conn entry `seconds` older, as if that much idle time had passed."""
    back = maps.clock.seconds_to_jiffies(seconds)
    for name in maps.CONN_MAPS:
        t = maps.t[name]
        for k in list(t.keys()):
            vals = t[k]
            for v in maps._copies(vals):
                if v.flags & 0x1:
                    v.last_seen -= back
            t[k] = vals


def _repoint_inbound(maps, cport, lport):
    """Make the inbound entry of client port cport point at local port lport, as a newer flow of the same client
    tuple would (its old reply entry then no longer has a partner pointing back)."""
    t = maps.t["conn4_map"]
    for k in list(t.keys()):
        vals = t[k]
        if socket.ntohs(k.sport) == cport:
            for v in maps._copies(vals):
                if v.flags & 0x1 and not v.flags & 0x2:
                    v.sport = socket.htons(lport)
            t[k] = vals


def _conn_ports(maps):
    return sorted((c["sport"], c["dport"], c["out"]) for c in maps.conns())


def test_expired_flows_local_port_is_reclaimed_before_the_sweep(fastpath, maps):
    """A one-port range: the port of a flow idle past its state's timeout goes to the next SYN at once (and both of
    the old flow's entries go), but never the port of a flow still within its timeout."""
    setup_service(maps)
    maps.set_cfg(2000, 2000)
    maps.set_idle_timeouts(TIMEOUTS)
    v, p = run(fastpath, syn(sport=47000))
    assert v == XDP_TX and p[TCP].sport == 2000
    assert run(fastpath, syn(sport=47000, flags="A"))[0] == XDP_TX      # established: 90 s
    _age_conns(maps, 10)
    assert run(fastpath, syn(sport=47001))[0] == XDP_DROP               # idle 10 s < 90 s: the port is live
    c = maps.counters()
    assert c["drop_lport_exhausted"] == 1 and c["lport_reclaimed"] == 0 and c["conn_expired"] == 0

    assert run(fastpath, syn(sport=47000, flags="FA"))[0] == XDP_TX     # fin_wait: 7 s
    _age_conns(maps, 8)
    v, p = run(fastpath, syn(sport=47001))
    assert v == XDP_TX and p[TCP].sport == 2000 and p[IP].src == LIP
    c = maps.counters()
    assert c["lport_reclaimed"] == 1 and c["conn_expired"] == 2 and c["drop_lport_exhausted"] == 1
    # the old flow is gone in both directions; the new one owns the port
    assert _conn_ports(maps) == [(80, 2000, True), (47001, 80, False)]
    assert run(fastpath, syn(sport=47000, flags="A"))[0] == XDP_DROP
    assert maps.counters()["drop_no_conn"] == 1


def test_udp_port_is_reclaimed_after_the_udp_timeout_and_not_when_reclaiming_is_off(fastpath, maps):
    setup_service(maps, proto=socket.IPPROTO_UDP)
    maps.set_cfg(2000, 2000)
    udp = lambda sport: (Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP) /  # noqa: E731
                         UDP(sport=sport, dport=80) / b"x")
    assert run(fastpath, udp(5000))[0] == XDP_TX
    _age_conns(maps, 301)
    assert run(fastpath, udp(5001))[0] == XDP_DROP       # off (no timeouts given): only the sweep frees ports
    maps.set_idle_timeouts(dict(TIMEOUTS, udp=400))
    assert run(fastpath, udp(5001))[0] == XDP_DROP       # 301 s idle < 400 s
    maps.set_idle_timeouts(TIMEOUTS)
    v, p = run(fastpath, udp(5001))
    assert v == XDP_TX and p[UDP].sport == 2000
    assert maps.counters()["lport_reclaimed"] == 1
    assert _conn_ports(maps) == [(80, 2000, True), (5001, 80, False)]


def test_reclaim_leaves_a_flow_stamped_after_the_syn_read_the_clock(fastpath, maps):
    """Another CPU may stamp a packet of the port's flow a jiffy after the SYN read the clock: that flow is as live
    as can be. Its idle time must not wrap around to 2^64 jiffies and hand its port to the SYN."""
    setup_service(maps)
    maps.set_cfg(2000, 2000)
    maps.set_idle_timeouts(TIMEOUTS)
    assert run(fastpath, syn(sport=47000))[0] == XDP_TX
    _age_conns(maps, -1)                                   # last seen "after now"
    assert run(fastpath, syn(sport=47001))[0] == XDP_DROP
    c = maps.counters()
    assert c["lport_reclaimed"] == 0 and c["drop_lport_exhausted"] == 1
    assert run(fastpath, syn(sport=47000, flags="A"))[0] == XDP_TX


@needs_two_cpus
def test_reclaim_times_a_flow_by_the_furthest_state_any_cpu_saw(fastpath, maps):
    """The FIN crossed CPU 0, the flow's last packet CPU 1: past the fin_wait timeout (7 s) but within the
    established one (90 s), the port is taken back, as the sweep would."""
    import time

    setup_service(maps)
    maps.set_cfg(2000, 2000)
    maps.set_idle_timeouts(TIMEOUTS)
    on_cpu(0, lambda: run(fastpath, syn(sport=47000)))
    on_cpu(0, lambda: run(fastpath, syn(sport=47000, flags="A")))
    on_cpu(1, lambda: run(fastpath, syn(sport=47000, flags="A")))  # CPU 1 adopts the ESTABLISHED copy
    on_cpu(0, lambda: run(fastpath, syn(sport=47000, flags="FA")))
    time.sleep(0.05)
    on_cpu(1, lambda: run(fastpath, syn(sport=47000, flags="A")))  # the newest copy says ESTABLISHED
    _age_conns(maps, 10)
    v, p = on_cpu(0, lambda: run(fastpath, syn(sport=47001)))
    assert v == XDP_TX and p[TCP].sport == 2000
    assert maps.counters()["lport_reclaimed"] == 1


def test_reclaim_leaves_a_newer_flow_on_the_old_clients_tuple_alone(fastpath, maps):
    """The reply entry's partner key may hold another flow of the same client tuple (one that no longer uses
    this port): reclaiming the port deletes only the stale reply entry, never that flow."""
    setup_service(maps)
    maps.set_cfg(2000, 2000)
    maps.set_idle_timeouts(TIMEOUTS)
    assert run(fastpath, syn(sport=47000))[0] == XDP_TX
    _repoint_inbound(maps, 47000, 2999)
    _age_conns(maps, 31)                                   # syn_recv: 30 s
    v, p = run(fastpath, syn(sport=47001))
    assert v == XDP_TX and p[TCP].sport == 2000
    c = maps.counters()
    assert c["lport_reclaimed"] == 1 and c["conn_expired"] == 1
    assert _conn_ports(maps) == [(80, 2000, True), (47000, 80, False), (47001, 80, False)]


def _lim(maps):
    from hdslb.fastpath import abi, aging

    j = maps.clock.seconds_to_jiffies
    return aging.Limits(by_state=tuple(j(x) for x in abi.state_timeouts(TIMEOUTS)), udp=j(TIMEOUTS["udp"]),
                        close=j(TIMEOUTS["close"]))


def _now(maps):
    import time

    return maps.clock.mono_to_jiffies(time.clock_gettime_ns(time.CLOCK_MONOTONIC))


def _server(lport, flags, sport=80):
    return Ether(src=RS_MAC, dst=LB_MAC_S) / IP(src=RS1, dst=LIP) / TCP(sport=sport, dport=lport, flags=flags)


def _daemon_conn_list(maps):
    """The daemon's conn.list (ipvsadm -Lnc) over these maps."""
    import types

    from hdslb.daemon import Daemon

    d = types.SimpleNamespace(settings=types.SimpleNamespace(timeouts=dict(TIMEOUTS)), _conns=lambda: list(maps.conns()))
    d.idle_limits = lambda unit=lambda x: x: Daemon.idle_limits(d, unit)
    d.timeout_for = lambda c: Daemon.timeout_for(d, c)
    return Daemon.conn_list(d)


def test_a_handshake_retried_after_a_reset_is_established_and_timed_as_such(fastpath, maps):
    """The client reset a handshake (its SYN met the server's old TIME_WAIT, say) and retransmitted the SYN on
    the same port, which keeps its local port (see conn_reusable). That handshake completes: the flow is
    ESTABLISHED again, as LVS moves CLOSE back to SYN_RECV on a SYN, so it counts as active and lives by the
    established timeout, not by close's few seconds (it was swept after 3 s idle and its next packets dropped)."""
    from hdslb.fastpath import aging

    setup_service(maps)
    maps.set_cfg(2000, 2000)
    maps.set_idle_timeouts(TIMEOUTS)
    _, p = run(fastpath, syn(sport=50100))
    assert run(fastpath, syn(sport=50100, flags="R"))[0] == XDP_TX
    assert [c["state"] for c in maps.conns() if not c["out"]] == [4]       # close
    v, p2 = run(fastpath, syn(sport=50100))
    assert v == XDP_TX and p2[TCP].sport == p[TCP].sport == 2000
    assert run(fastpath, _server(2000, "SA"))[0] == XDP_TX
    assert run(fastpath, syn(sport=50100, flags="A"))[0] == XDP_TX
    assert [c["state"] for c in maps.conns() if not c["out"]] == [2]       # established
    assert maps.conn_aging_columns().counts() == aging.counts_rows(maps.conn_aging_view()) == {0: (1, 0)}
    _age_conns(maps, 10)                                   # idle 10 s: past close (3 s), within established (90 s)
    now, lim = _now(maps), _lim(maps)
    assert maps.conn_aging_columns().expired(now, lim) == aging.expired_rows(maps.conn_aging_view(), now, lim) == []
    assert run(fastpath, syn(sport=50101))[0] == XDP_DROP  # its port is not taken back either
    assert maps.counters()["lport_reclaimed"] == 0
    assert run(fastpath, syn(sport=50100, flags="PA", payload=b"x"))[0] == XDP_TX


@needs_two_cpus
def test_a_handshake_retried_after_a_reset_on_another_cpu_is_established(fastpath, maps):
    """The reset crossed CPU 1, the retransmitted SYN and the rest of the handshake CPU 0: the flow's state (the
    furthest any copy saw) is ESTABLISHED, not the CLOSE CPU 1's copy saw."""
    setup_service(maps)
    _, p = on_cpu(0, lambda: run(fastpath, syn(sport=50150)))
    on_cpu(1, lambda: run(fastpath, syn(sport=50150, flags="R")))
    assert on_cpu(0, lambda: run(fastpath, syn(sport=50150)))[1][TCP].sport == p[TCP].sport
    on_cpu(0, lambda: run(fastpath, _server(p[TCP].sport, "SA")))
    on_cpu(0, lambda: run(fastpath, syn(sport=50150, flags="A")))
    assert [c["state"] for c in maps.conns() if not c["out"]] == [2]
    assert maps.conn_aging_columns().counts() == {0: (1, 0)}
    assert on_cpu(1, lambda: run(fastpath, syn(sport=50150, flags="A")))[0] == XDP_TX  # CPU 1 adopts it again
    assert [c["state"] for c in maps.conns() if not c["out"]] == [2]


def test_a_server_answering_a_new_handshake_on_a_tuple_it_reset_starts_it_over(fastpath, maps):
    """The server reset a SYN (nothing listening yet); the client (behind a NAT that keeps its port) sends a SYN
    on the same tuple again, which the server now accepts: its SYN-ACK starts the reply entry over, and the flow
    is established, not closing."""
    from hdslb.fastpath import aging

    setup_service(maps)
    _, p = run(fastpath, syn(sport=50200))
    lport = p[TCP].sport
    assert run(fastpath, _server(lport, "RA"))[0] == XDP_TX
    assert run(fastpath, syn(sport=50200))[1][TCP].sport == lport
    assert run(fastpath, _server(lport, "SA"))[0] == XDP_TX
    assert run(fastpath, syn(sport=50200, flags="A"))[0] == XDP_TX
    assert maps.conn_aging_columns().counts() == {0: (1, 0)}
    _age_conns(maps, 10)
    assert maps.conn_aging_columns().expired(_now(maps), _lim(maps)) == []


def test_a_reused_tuple_leaves_the_reply_entry_another_flow_holds_on_its_old_port_alone(fastpath, maps):
    """A full table's LRU evicted a finished flow's reply entry (its inbound entry left), and another client's flow
    took that local port to the same server since. The first client reusing its port (scheduled afresh) removes
    its own entry only: the other flow's reply entry stays, so that port is not handed out twice (the server's
    answers on it went to the first client's new flow, and the other client's went nowhere)."""
    setup_service(maps)
    maps.set_cfg(2000, 2000)
    assert run(fastpath, syn(sport=52000))[1][TCP].sport == 2000
    run(fastpath, _server(2000, "SA"))
    run(fastpath, syn(sport=52000, flags="A"))
    run(fastpath, syn(sport=52000, flags="FA"))            # finished: a SYN on this tuple is scheduled afresh
    t = maps.t["conn4_map"]
    reply = [k for k in t.keys() if socket.ntohs(k.sport) == 80 and socket.ntohs(k.dport) == 2000]
    assert len(reply) == 1
    del t[reply[0]]                                        # what the LRU evicts of a full table
    assert run(fastpath, syn(sport=52001))[1][TCP].sport == 2000   # the port is free: another flow takes it
    expired = maps.counters()["conn_expired"]
    v, _ = run(fastpath, syn(sport=52000))                 # the first client reuses its port
    assert v == XDP_DROP and maps.counters()["drop_lport_exhausted"] == 1  # the one port is the other flow's
    assert maps.counters()["conn_reused"] == 1 and maps.counters()["conn_expired"] == expired + 1
    v, p = run(fastpath, _server(2000, "SA"))
    assert v == XDP_TX and p[TCP].dport == 52001, "the server's answer goes to the flow that holds the port"


@needs_two_cpus
def test_a_server_s_refusal_on_another_cpu_does_not_close_the_handshake_it_accepts_next(fastpath, maps):
    """The server's reset of a SYN crossed CPU 1 (the server's packets are spread over the CPUs by whoever sent
    them: veth, RPS); the client's SYN on the same tuple, the server's SYN-ACK and the client's ACK cross CPU 0.
    The connection is ESTABLISHED, active and timed as such: CPU 1's CLOSE no longer stays the flow's state (it
    was swept after the close timeout's few idle seconds, its later packets dropped)."""
    from hdslb.fastpath import aging

    setup_service(maps)
    maps.set_idle_timeouts(TIMEOUTS)
    _, p = on_cpu(0, lambda: run(fastpath, syn(sport=50250)))
    lport = p[TCP].sport
    assert on_cpu(1, lambda: run(fastpath, _server(lport, "RA")))[0] == XDP_TX
    assert on_cpu(0, lambda: run(fastpath, syn(sport=50250)))[1][TCP].sport == lport
    assert on_cpu(0, lambda: run(fastpath, _server(lport, "SA")))[0] == XDP_TX
    assert on_cpu(0, lambda: run(fastpath, syn(sport=50250, flags="A")))[0] == XDP_TX
    assert sorted((c["out"], c["state"]) for c in maps.conns()) == [(False, 2), (True, 1)]
    assert maps.conn_aging_columns().counts() == aging.counts_rows(maps.conn_aging_view()) == {0: (1, 0)}
    assert [(c["state"], c["expire_s"]) for c in _daemon_conn_list(maps) if not c["out"]] == [("established", 90)]
    _age_conns(maps, 10)                                   # past close (3 s), within established (90 s)
    now, lim = _now(maps), _lim(maps)
    assert maps.conn_aging_columns().expired(now, lim) == aging.expired_rows(maps.conn_aging_view(), now, lim) == []
    assert on_cpu(1, lambda: run(fastpath, syn(sport=50250, flags="PA", payload=b"x")))[0] == XDP_TX


@pytest.mark.parametrize("flags,timeout", [("R", "close"), ("RA", "close"), ("FA", "fin_wait")])
def test_the_server_closing_a_flow_ends_it_as_the_client_closing_it_would(fastpath, maps, flags, timeout):
    """LVS's state follows the real server's packets too (a reset from it: CLOSE; its FIN: FIN_WAIT). A flow the
    server reset or closed is inactive (InActConn, lc/wlc) and leaves after that state's timeout, in the sweep
    and in the fast path's port reclaiming; it no longer counts as active and lives the established timeout."""
    from hdslb.fastpath import aging

    setup_service(maps)
    maps.set_cfg(2000, 2000)
    maps.set_idle_timeouts(TIMEOUTS)
    run(fastpath, syn(sport=50300))
    run(fastpath, _server(2000, "SA"))
    run(fastpath, syn(sport=50300, flags="A"))
    assert maps.conn_aging_columns().counts() == {0: (1, 0)}
    assert run(fastpath, _server(2000, flags))[0] == XDP_TX
    view = maps.conn_aging_view()
    assert maps.conn_aging_columns().counts() == aging.counts_rows(view) == {0: (0, 1)}
    listed = [c for c in _daemon_conn_list(maps) if not c["out"]]  # ipvsadm -Lnc
    assert [(c["state"], c["expire_s"] <= TIMEOUTS[timeout]) for c in listed] == [(timeout, True)]
    _age_conns(maps, TIMEOUTS[timeout] + 1)                # past its timeout, well within established (90 s)
    cols, now = maps.conn_aging_columns(), _now(maps)
    dead = cols.expired(now, _lim(maps))
    assert dead == aging.expired_rows(maps.conn_aging_view(), now, _lim(maps))
    assert len(dead) == 1 and len(dead[0][0]) == 2
    v, p = run(fastpath, syn(sport=50301))                 # the fast path takes its port back, as the sweep would
    assert v == XDP_TX and p[TCP].sport == 2000 and maps.counters()["lport_reclaimed"] == 1


def test_batched_conn_walk_sees_every_entry_across_batches(fastpath, maps):
    setup_service(maps)
    for i in range(40):
        assert run(fastpath, syn(sport=41000 + i))[0] == XDP_TX
    maps.CONN_BATCH = 7  # an instance override: many batches and a partial last one
    from hdslb.fastpath import abi, aging

    keys4 = {bytes(k) for k in maps.t["conn4_map"].keys()}
    keys = {aging.widen(k, bytes(abi.CONN4_VAL_SIZE), 1)[0] for k in keys4}
    assert not list(maps.t["conn6_map"].keys()), "IPv4 flows are in conn4_map only"
    view = maps.conn_aging_view()
    assert len(keys) == 80 and maps.conn_entries() == 80
    assert {r[0] for r in view} == keys
    by_key = {r[0]: r for r in view}
    # every entry's partner key is the other direction's, which points back
    assert all(by_key[r[1]][1] == r[0] for r in view)
    assert sorted(c["sport"] for c in maps.conns() if not c["out"]) == list(range(41000, 41040))
    # the daemon's columns (numpy, batch by batch) read the real layout as the reference does
    from hdslb.fastpath import abi, aging

    cols = maps.conn_aging_columns()
    assert {cols.key(i) for i in range(len(cols))} == keys
    p = cols.partner_index()
    assert all(p[i] >= 0 and cols.key(int(p[i])) == by_key[cols.key(i)][1] for i in range(len(cols)))
    assert cols.counts() == aging.counts_rows(view) == {0: (0, 40)}  # 40 SYN_RECV flows on slot 0
    now = max(r[2] for r in view) + 31 * maps.clock.seconds_to_jiffies(1)
    lim = aging.Limits(by_state=tuple(maps.clock.seconds_to_jiffies(x) for x in abi.state_timeouts(TIMEOUTS)),
                       udp=1, close=1)
    assert cols.expired(now, lim) == aging.expired_rows(view, now, lim) and len(cols.expired(now, lim)) == 40
    # the sweep's removal, by raw key: not while the entry has seen a packet since `last`, then once
    k = view[0][0]
    assert maps.remove_dead_flows([((k,), view[0][2] - 1)]) == 0
    assert maps.remove_dead_flows([((k,), view[0][2])]) == 1 and maps.remove_dead_flows([((k,), view[0][2])]) == 0
    assert maps.conn_entries() == 79


def test_sweep_removes_dead_pairs_only_and_leaves_a_foreign_partner(fastpath, maps):
    """The daemon's sweep over the batched view: a flow idle past its state's timeout goes in both directions,
    a live one stays, and a reply entry whose partner key now holds another flow goes alone."""
    import types

    from hdslb.daemon import Daemon

    setup_service(maps)
    for sport in (42000, 42001, 42002):
        assert run(fastpath, syn(sport=sport))[0] == XDP_TX
    _repoint_inbound(maps, 42002, 2999)                    # 42002's inbound entry: a flow on another port
    _age_conns(maps, 31)                                   # past syn_recv (30 s)
    assert run(fastpath, syn(sport=42001, flags="A"))[0] == XDP_TX   # 42001 is alive again (established)
    assert run(fastpath, syn(sport=42002, flags="A"))[0] == XDP_TX   # and so is the foreign flow on 42002
    d = types.SimpleNamespace(maps=maps, settings=types.SimpleNamespace(timeouts=dict(TIMEOUTS)),
                              _conn_cache=None, _counts_cache=None, bal=types.SimpleNamespace(services={}))
    before = maps.counters()["conn_expired"]
    # 42000: both entries (2); 42001: kept; 42002's old reply entry goes alone (1): its partner key holds the
    # live foreign flow, which must not keep it alive nor be removed with it.
    assert Daemon.sweep(d) == 3
    assert maps.counters()["conn_expired"] == before + 3
    left = sorted((c["sport"], c["out"]) for c in maps.conns())
    assert left == [(80, True), (42001, False), (42002, False)], left


@pytest.mark.parametrize("as_requests", [True, False])
def test_a_flow_that_sees_a_packet_after_the_scan_is_not_swept(fastpath, maps, as_requests):
    """The sweep scans, then removes: a flow found dead by the scan that carries a packet before its removal
    stays (hdslb_sweep re-checks every CPU's copy in the kernel right before the delete); the other dead flow
    goes in both directions. Requests built by numpy (the daemon's path) or from the reference's tuples."""
    from hdslb.fastpath import abi, aging

    setup_service(maps)
    for sport in (44000, 44001):
        assert run(fastpath, syn(sport=sport))[0] == XDP_TX
    _age_conns(maps, 31)                                   # past syn_recv (30 s)
    now = maps.clock.mono_to_jiffies(__import__("time").clock_gettime_ns(__import__("time").CLOCK_MONOTONIC))
    lim = aging.Limits(by_state=tuple(maps.clock.seconds_to_jiffies(x) for x in abi.state_timeouts(TIMEOUTS)),
                       udp=maps.clock.seconds_to_jiffies(300), close=maps.clock.seconds_to_jiffies(3))
    cols = maps.conn_aging_columns()
    dead = cols.expired(now, lim)
    assert len(dead) == 2 and all(len(ks) == 2 for ks, _ in dead)
    assert run(fastpath, syn(sport=44001, flags="A"))[0] == XDP_TX   # after the scan, before the removal
    if as_requests:
        removed = maps.remove_dead_requests(cols.sweep_requests(now, lim))
    else:
        removed = maps.remove_dead_flows(dead)
    assert removed == 2
    assert sorted(c["sport"] for c in maps.conns() if not c["out"]) == [44001]
    assert maps.conn_entries() == 2


def test_seeded_lport_cursor_starts_the_port_walk_there(fastpath, maps):
    """A fresh daemon seeds each CPU's cursor at random, so it does not hand out the previous daemon's ports
    (still in the servers' TIME_WAIT) first; the walk starts at the seed."""
    setup_service(maps)
    maps.set_cfg(2000, 2999)
    ncpu = len(maps.t["lport_cursor"][ct.c_uint32(0)])
    maps.seed_lport_cursor([123] * ncpu)
    v, p = on_cpu(0, lambda: run(fastpath, syn(sport=43000)))
    assert v == XDP_TX and p[TCP].sport == 2123
    if ncpu > 1:  # the other CPU walks from its own seed (plus its share of the range)
        maps.seed_lport_cursor([123] + [700] * (ncpu - 1))
        v, p = on_cpu(1, lambda: run(fastpath, syn(sport=43001)))
        assert v == XDP_TX and p[TCP].sport == 2000 + (700 + 1000 // ncpu) % 1000


def test_conn_table_memory_is_measured_and_the_estimate_holds(fastpath):
    """The loader reports the conn table's kernel memory (fdinfo memlock, logged at start) and the estimate it
    gives when creating the table fails agrees with it: operators size --max-conns from that estimate, which
    grows with the possible-CPU count."""
    from hdslb.fastpath.loader import conn_table_estimate, possible_cpus

    table, sizes = fastpath.sizes.conn_table, fastpath.sizes
    for name, entries, family in (("conn4_map", sizes.max_conns, 4), ("conn6_map", sizes.conn6_entries(), 6)):
        got = fastpath.conn_memlock_by_map[name]
        assert got, f"fdinfo memlock of {name}"
        est = conn_table_estimate(entries, possible_cpus(), table, family)
        assert abs(est - got) / got < 0.05, (name, est, got)
    assert fastpath.conn_memlock == sum(fastpath.conn_memlock_by_map.values())
    if table == "percpu":
        assert conn_table_estimate(1 << 20, 64) // (1 << 20) >= 64 * 48, "a value per possible CPU in every entry"
    else:
        assert conn_table_estimate(1 << 20, 64, table) == conn_table_estimate(1 << 20, 2, table)
        # the compact IPv4 entry: 48-byte element header + 16-byte key + 48-byte value + a 16-byte bucket
        assert conn_table_estimate(1 << 20, 2, table) == 128 << 20


def test_a_pinned_map_of_another_size_is_not_adopted_where_no_model_rewrites_it(fastpath, fastpath_of):
    """A load that may not make maps anew (allow_resize off: `reload --datapath`, which has no saved model to
    write them from) refuses pinned maps of another --max-services or --max-dests, naming the option and
    --fresh, and leaves the pins as they were: bcc would otherwise silently run on the old map while the daemon
    hands out ids up to the new limit. (A restart makes them anew: test_map_resize; another --conn-table,
    --max-conns or --max-conns6 moves the connections: test_conn_move.)"""
    from hdslb.fastpath.loader import FastPath, Sizes

    before = len(list(fastpath.table("conn4_map").keys()))
    pins = sorted(os.listdir(fastpath.pin_dir))
    for change, opt in (("max_services", "--max-services"), ("max_dests", "--max-dests")):
        fp = FastPath(fastpath.pin_dir, Sizes(**{**fastpath.sizes.__dict__, change: 512}))
        fp.allow_resize = False
        with pytest.raises(RuntimeError, match=rf"has \d+ entries, not 512: keep {opt}\b.*as it was.*--fresh"):
            fp.load(adopt=True)
        assert fp.bpf is None
    assert len(list(fastpath.table("conn4_map").keys())) == before
    assert sorted(os.listdir(fastpath.pin_dir)) == pins


def _legacy_entry(saddr, daddr, sport, dport, to, flags, ncpu, af=4):
    """A key and per-CPU value of the single-table conn_map of earlier versions (addresses first), CPU 0's copy
    filled in."""
    import struct

    from hdslb.fastpath.clock import JiffiesClock

    def a(x):
        return A(x).packed.ljust(16, b"\0")

    key = struct.pack("=16s16s2s2sBBH", a(saddr), a(daddr), sport.to_bytes(2, "big"), dport.to_bytes(2, "big"),
                      socket.IPPROTO_TCP, af, 0)
    ts, td, tsp, tdp = to
    val = struct.pack("=16s16s2s2sI6s6sHBBIB3xQ", a(ts), a(td), tsp.to_bytes(2, "big"), tdp.to_bytes(2, "big"),
                      LO_IFINDEX, bytes.fromhex(RS_MAC.replace(":", "")), LB_MAC, 0, flags, 2, 0, 1,
                      JiffiesClock().mono_to_jiffies(__import__("time").monotonic_ns()))
    return key, val + bytes(72) * (ncpu - 1)


def test_connections_of_the_single_table_layout_move_over_on_restart():
    """Before conn4_map/conn6_map one conn_map held both families with another layout. A daemon restarted on
    such pins (an upgrade) compiles the new program beside it and, once attached, moves every entry into the
    table of its family: IPv4 pairs to conn4_map, IPv6 and NAT64 to conn6_map; the old pin goes. The moved
    IPv4 flow forwards as before. A pinned table of the other kind is refused (naming --fresh)."""
    from hdslb.fastpath import loader
    from hdslb.fastpath.maps import Maps

    loader.ensure_bpffs(loader.DEFAULT_PIN_ROOT)
    pin = os.path.join(loader.DEFAULT_PIN_ROOT, f"pytest-legacy-{os.getpid()}")
    os.makedirs(pin, exist_ok=True)
    lib = loader._libbcc()
    ncpu = loader.possible_cpus()
    fp = None
    try:
        fd = lib.bcc_create_map(loader.BPF_MAP_TYPE_LRU_PERCPU_HASH, b"conn_map", 40, 72, 64, 0)
        assert fd >= 0 and lib.bpf_obj_pin(fd, os.path.join(pin, "conn_map").encode()) == 0
        V, O, X = 0x1, 0x2, 0x8
        entries = [
            _legacy_entry(CLIENT, VIP, 40000, 80, (LIP, RS1, 2001, 8080), V, ncpu),            # IPv4 in
            _legacy_entry(RS1, LIP, 8080, 2001, (VIP, CLIENT, 80, 40000), V | O, ncpu),        # IPv4 reply
            _legacy_entry("fd00::1", "fd00::100", 40001, 80, ("fd00::200", "fd00::2", 2002, 8080), V, ncpu, 6),
            _legacy_entry("fd00::1", "fd00::100", 40002, 80, (LIP, RS2, 2003, 8080), V | X, ncpu, 6),  # NAT64 in
            _legacy_entry(RS2, LIP, 8080, 2003, ("fd00::100", "fd00::1", 80, 40002), V | O | X, ncpu),  # NAT64 out
        ]
        for k, v in entries:
            kb, vb = ct.create_string_buffer(k, len(k)), ct.create_string_buffer(v, len(v))
            assert loader._libbcc().bpf_update_elem(fd, kb, vb, 0) == 0
        os.close(fd)

        other = loader.FastPath(pin, loader.Sizes(max_conns=4096, conn_table="shared"))
        with pytest.raises(RuntimeError, match="is --conn-table percpu, not shared.*--fresh"):
            other.load(adopt=True)

        fp = loader.FastPath(pin, loader.Sizes(max_conns=4096, max_services=64, max_dests=256, max_local=64,
                                               max_routes=256, max_neigh=64))
        assert fp.has_pins()
        fp.load(adopt=True)
        assert fp.legacy_conn_pin and os.path.exists(os.path.join(pin, "conn_map"))
        assert fp.migrate_legacy_conns() == 5
        assert not os.path.exists(os.path.join(pin, "conn_map")) and fp.migrate_legacy_conns() == 0
        assert len(list(fp.table("conn4_map").keys())) == 2 and len(list(fp.table("conn6_map").keys())) == 3
        m = Maps(fp)
        got = {(c["af"], str(c["saddr"]), c["sport"], str(c["to_daddr"]), c["to_dport"], c["out"]) for c in m.conns()}
        assert got == {(4, CLIENT, 40000, RS1, 8080, False), (4, RS1, 8080, CLIENT, 40000, True),
                       (6, "fd00::1", 40001, "fd00::2", 8080, False), (6, "fd00::1", 40002, RS2, 8080, False),
                       (4, RS2, 8080, "fd00::1", 40002, True)}
        # the moved IPv4 flow forwards both ways as before
        ack = Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="A")
        v, out, _ = run_xdp(fp.prog_fd, bytes(ack))
        p = Ether(out)
        assert v == XDP_TX and (p[IP].src, p[IP].dst, p[TCP].sport, p[TCP].dport) == (LIP, RS1, 2001, 8080)
        back = Ether(src=RS_MAC, dst=LB_MAC_S) / IP(src=RS1, dst=LIP) / TCP(sport=8080, dport=2001, flags="A")
        v, out, _ = run_xdp(fp.prog_fd, bytes(back))
        p = Ether(out)
        assert v == XDP_TX and (p[IP].src, p[IP].dst, p[TCP].sport, p[TCP].dport) == (VIP, CLIENT, 80, 40000)
    finally:
        if fp is not None:
            fp.close()
        shutil.rmtree(pin, ignore_errors=True)


def test_creating_a_per_cpu_table_that_takes_much_memory_is_warned_about(monkeypatch, caplog):
    """The loader logs the advice (what --conn-table shared would take) when it creates a per-CPU table that
    takes a tenth of the memory or more, and says nothing for a shared one or a small table."""
    import logging

    from hdslb.fastpath import loader

    monkeypatch.setattr(loader, "_mem_total", lambda: 4 << 20)  # a machine of 4 MiB: 4096 entries are a lot
    lib = loader._libbcc()
    loader.ensure_bpffs(loader.DEFAULT_PIN_ROOT)
    for table in ("percpu", "shared"):
        pin = os.path.join(loader.DEFAULT_PIN_ROOT, f"pytest-warn-{os.getpid()}-{table}").encode()
        fp = loader.FastPath(pin.decode(), loader.Sizes(max_conns=4096, conn_table=table))
        caplog.clear()
        os.makedirs(pin, exist_ok=True)
        fds = {}
        try:
            with caplog.at_level(logging.WARNING, logger="hdslb.fastpath"):
                fp._create_conn_maps(lib, loader.BPF_MAP_TYPE_LRU_HASH if table == "shared"
                                     else loader.BPF_MAP_TYPE_LRU_PERCPU_HASH, fds)
        finally:
            for fd in fds.values():
                os.close(fd)
            shutil.rmtree(pin, ignore_errors=True)
        assert sorted(fds) == ["conn4_map", "conn6_map"]
        warned = [r.getMessage() for r in caplog.records if "--conn-table shared would take" in r.getMessage()]
        assert len(warned) == (1 if table == "percpu" else 0), (table, caplog.text)
