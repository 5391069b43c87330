"""Packets the fast path must refuse: each is counted and dropped (or left to the kernel), never creates or changes
a connection and is never forwarded as garbage. One case per way a packet can lie: lengths that disagree with the
frame, headers that are not what they claim, flags no opening segment carries, sources no flow can come from.
"""

import ipaddress
import socket

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
from scapy.layers.l2 import ARP, Ether

from hdslb.fastpath.testrun import VERDICTS, XDP_DROP, XDP_PASS, XDP_TX, run_xdp

from .conftest import CONN_TABLES, LB_MAC, LO_IFINDEX


@pytest.fixture(params=CONN_TABLES)
def fastpath(fastpath_of, request):
    """Every test here runs on both conn table kinds: a value per CPU (the default) and one shared value."""
    return fastpath_of(request.param)


A = ipaddress.ip_address
LB = ":".join(f"{b:02x}" for b in LB_MAC)
CL_MAC, RS_MAC, GW_MAC = "02:cc:00:00:00:01", "02:55:00:00:00:02", "02:99:00:00:00:09"
CLIENT, VIP, VIP_TUN, LIP, TUNSRC = "10.0.0.50", "10.0.0.100", "10.0.0.101", "192.168.100.200", "192.168.100.254"
RS1 = "192.168.100.2"
CLIENT6, VIP6, VIP6_TUN, LIP6, RS61 = "fd00:10::1", "fd00:10::100", "fd00:10::101", "fd00:100::200", "fd00:100::2"
TCP_, UDP_ = socket.IPPROTO_TCP, socket.IPPROTO_UDP
E = Ether(src=CL_MAC, dst=LB)

# svc_id: (proto, vip, port, real server, its port, mode, local address)
SERVICES = {
    0: (TCP_, VIP, 80, RS1, 80, "fnat", LIP),
    1: (UDP_, VIP, 53, RS1, 53, "fnat", LIP),
    2: (TCP_, VIP6, 80, RS61, 80, "fnat", LIP6),
    3: (UDP_, VIP6, 53, RS61, 53, "fnat", LIP6),
    4: (TCP_, VIP6, 8080, RS1, 8080, "fnat", LIP),  # NAT64
    5: (UDP_, VIP6, 5353, RS1, 5353, "fnat", LIP),  # NAT64
    6: (TCP_, VIP_TUN, 80, RS1, 80, "tunnel", LIP),
    7: (TCP_, VIP6_TUN, 80, RS61, 80, "tunnel", LIP6),
}


@pytest.fixture
def m(fastpath, maps):
    """Every service above, reachable over the test run's loopback 'interface' (MTU 1500)."""
    maps.set_route(ipaddress.ip_network("192.168.100.0/24"), LO_IFINDEX, None, A(TUNSRC), 1500, False)
    maps.set_route(ipaddress.ip_network("fd00:100::/64"), LO_IFINDEX, None, A("fd00:100::fe"), 1500, False)
    for a in (RS1, RS61):
        maps.set_neigh(A(a), bytes.fromhex(RS_MAC.replace(":", "")), LO_IFINDEX, permanent=True)
    for sid, (proto, vip, port, rs, rport, fwd, lip) in SERVICES.items():
        maps.set_service(proto, A(vip), port, sid)
        maps.set_dest(sid, A(rs), rport, fwd, sid, drain=False)
        maps.set_sched(sid, [sid], 1)
        maps.set_laddrs(sid, [(A(lip), LO_IFINDEX)])
    for a in (VIP, VIP_TUN, VIP6, VIP6_TUN):
        maps.set_local(A(a), 0x8, LO_IFINDEX)
    for a in (LIP, LIP6):
        maps.set_local(A(a), 0x2, LO_IFINDEX)
    return maps


def run(fp, pkt):
    v, out, _ = run_xdp(fp.prog_fd, bytes(pkt))
    return v, Ether(out)


def delta(before, after):
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def refused(fp, m, pkt, counter, verdict=XDP_DROP):
    """pkt is dropped (or passed) with counter moving once, and leaves no connection and no service stats."""
    entries, before = m.conn_entries(), m.counters()
    stats = {sid: m.svc_stats(sid) for sid in SERVICES}
    v, out, _ = run_xdp(fp.prog_fd, bytes(pkt))
    d = delta(before, m.counters())
    assert v == verdict, f"{VERDICTS[v]} {d}\n{Ether(bytes(pkt)).show(dump=True)}"
    assert d.get(counter) == 1, d
    assert "conn_new" not in d and m.conn_entries() == entries, "no connection state"
    assert {sid: m.svc_stats(sid) for sid in SERVICES} == stats, "no service stats"
    if v == XDP_PASS:
        assert out == bytes(pkt), "a passed packet reaches the kernel unchanged"
    return d


def states(m, sport):
    return sorted(c["state"] for c in m.conns() if not c["out"] and c["sport"] == sport)


# --- 1. L4 headers end where the IP datagram ends, not where the frame does -----------------------------------

def test_tcp_header_beyond_the_ip_total_length_opens_nothing(fastpath, m):
    """tot_len 20 says "no payload": the SYN after it is link padding, not a segment."""
    refused(fastpath, m, E / IP(src=CLIENT, dst=VIP, len=20, proto=6) / TCP(sport=5000, dport=80, flags="S"),
            "drop_malformed_l4")
    # 8 bytes of the TCP header inside tot_len, the rest outside
    refused(fastpath, m, E / IP(src=CLIENT, dst=VIP, len=28, proto=6) / TCP(sport=5001, dport=80, flags="S"),
            "drop_malformed_l4")
    # options announced by the data offset but cut by tot_len
    refused(fastpath, m, E / IP(src=CLIENT, dst=VIP, len=40, proto=6) /
            TCP(sport=5002, dport=80, flags="S", options=[("MSS", 1460)]), "drop_malformed_l4")


def test_a_reset_beyond_the_ip_total_length_leaves_the_flow_alone(fastpath, m):
    assert run(fastpath, E / IP(src=CLIENT, dst=VIP) / TCP(sport=5010, dport=80, flags="S"))[0] == XDP_TX
    assert run(fastpath, E / IP(src=CLIENT, dst=VIP) / TCP(sport=5010, dport=80, flags="A"))[0] == XDP_TX
    assert states(m, 5010) == [2]
    refused(fastpath, m, E / IP(src=CLIENT, dst=VIP, len=20, proto=6) / TCP(sport=5010, dport=80, flags="R"),
            "drop_malformed_l4")
    assert states(m, 5010) == [2], "still established"


def test_udp_header_beyond_the_ip_total_length_opens_nothing(fastpath, m):
    refused(fastpath, m, E / IP(src=CLIENT, dst=VIP, len=20, proto=17) / UDP(sport=5020, dport=53) / b"abc",
            "drop_malformed_l4")
    refused(fastpath, m, E / IP(src=CLIENT, dst=VIP, len=24, proto=17) / UDP(sport=5021, dport=53) / b"abc",
            "drop_malformed_l4")


def test_an_icmp_header_beyond_the_ip_total_length_is_not_rewritten(fastpath, m):
    """A SNAT echo reply whose identifier lies past tot_len would get it rewritten in the padding."""
    OUTSIDE, INSIDE, SAPOOL = "10.0.0.1", "192.168.100.2", "10.0.0.254"
    m.set_route(ipaddress.ip_network("10.0.0.0/24"), LO_IFINDEX, None, None, 1500, False)
    m.set_neigh(A(OUTSIDE), bytes.fromhex(GW_MAC.replace(":", "")), LO_IFINDEX, permanent=True)
    m.set_local(A(SAPOOL), 0x4, LO_IFINDEX)
    m.set_dest(20, A(SAPOOL), 0, "snat", 20, drain=False)
    m.set_sched(20, [20], 1)
    m.set_snat_rule(0, 20, 0, (A(INSIDE), A(INSIDE)), None, 0, LO_IFINDEX)
    m.set_cfg(snat_rules=1)
    req = Ether(src=RS_MAC, dst=LB) / IP(src=INSIDE, dst=OUTSIDE) / ICMP(type=8, id=777, seq=1) / b"ping"
    v, out = run(fastpath, req)
    assert v == XDP_TX and out[IP].src == SAPOOL
    lport = out[ICMP].id
    bad = Ether(src=GW_MAC, dst=LB) / IP(src=OUTSIDE, dst=SAPOOL, len=24, proto=1) / ICMP(type=0, id=lport, seq=1)
    refused(fastpath, m, bad, "drop_malformed_l4")
    good = Ether(src=GW_MAC, dst=LB) / IP(src=OUTSIDE, dst=SAPOOL) / ICMP(type=0, id=lport, seq=1) / b"ping"
    v, back = run(fastpath, good)
    assert v == XDP_TX and (back[IP].dst, back[ICMP].id) == (INSIDE, 777)


def test_ethernet_padding_after_the_datagram_is_still_fine(fastpath, m):
    """Short frames arrive padded to 60 bytes: the bytes after tot_len (payload_len) are no one's concern."""
    for pkt in (E / IP(src=CLIENT, dst=VIP) / TCP(sport=5030, dport=80, flags="S"),
                E / IP(src=CLIENT, dst=VIP) / UDP(sport=5031, dport=53) / b"q",
                E / IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=5032, dport=53) / b"q",
                E / IPv6(src=CLIENT6, dst=VIP6, plen=20) / TCP(sport=5033, dport=80, flags="S") / b"pad"):
        raw = bytes(pkt)
        raw += b"\0" * max(60 - len(raw), 0) + b"\xee" * 4
        v, out = run(fastpath, raw)
        assert v == XDP_TX, (VERDICTS[v], pkt.summary(), m.counters())
    assert m.counters()["conn_new"] == 4


# --- 2. UDP's length field against the IP payload -------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_udp_length_beyond_the_ip_payload_is_dropped(fastpath, m, family):
    ip = IP(src=CLIENT, dst=VIP) if family == 4 else IPv6(src=CLIENT6, dst=VIP6)
    refused(fastpath, m, E / ip / UDP(sport=5040, dport=53, len=1000) / b"abc", "drop_malformed_l4")
    refused(fastpath, m, E / ip / UDP(sport=5041, dport=53, len=12) / b"abc", "drop_malformed_l4")  # 11 carried


def test_udp_length_short_of_the_ip_payload_is_ip_padding(fastpath, m):
    """UDP says 9 bytes, IP carries 12: the kernel accepts it (the rest is padding), so do we."""
    v, out = run(fastpath, E / IP(src=CLIENT, dst=VIP) / UDP(sport=5042, dport=53, len=9) / b"abcd")
    assert v == XDP_TX and out[IP].dst == RS1


# --- 3. the IPv6 header -------------------------------------------------------------------------------------

def test_ipv6_header_of_another_version_is_dropped(fastpath, m):
    refused(fastpath, m, E / IPv6(src=CLIENT6, dst=VIP6, version=4) / TCP(sport=5050, dport=80, flags="S"),
            "drop_malformed_ip")
    # and an IPv4 header claiming to be version 6 in an IPv4 frame
    refused(fastpath, m, E / IP(src=CLIENT, dst=VIP, version=6) / TCP(sport=5051, dport=80, flags="S"),
            "drop_malformed_ip")


@pytest.mark.parametrize("vip,port", [(VIP6, 80), (VIP6, 8080), (VIP6_TUN, 80)], ids=["fnat", "nat64", "6in6"])
def test_ipv6_payload_length_beyond_the_frame_is_dropped(fastpath, m, vip, port):
    """payload_len 65535 (60000) in a 74-byte frame: neither counted as 65,575 bytes nor turned into an IPv4
    tot_len or an outer payload_len."""
    for plen in (65535, 60000, 21):
        refused(fastpath, m, E / IPv6(src=CLIENT6, dst=vip, plen=plen) / TCP(sport=5060, dport=port, flags="S"),
                "drop_malformed_ip")


def test_ipv6_payload_length_short_of_the_tcp_header_is_dropped(fastpath, m):
    refused(fastpath, m, E / IPv6(src=CLIENT6, dst=VIP6, plen=8) / TCP(sport=5070, dport=80, flags="S"),
            "drop_malformed_l4")
    refused(fastpath, m, E / IPv6(src=CLIENT6, dst=VIP6, plen=0) / TCP(sport=5071, dport=80, flags="S"),
            "drop_malformed_l4")


# --- 4. only a bare SYN opens a flow ------------------------------------------------------------------------

def _snat_lab(m, inside="192.168.100.2", outside="10.0.0.1", sapool="10.0.0.254", svc_id=20):
    """An SNAT service for inside -> 10.0.0.0/24 (sapool address), as ipvsadm -H src-range=inside."""
    m.set_route(ipaddress.ip_network("10.0.0.0/24"), LO_IFINDEX, None, None, 1500, False)
    m.set_neigh(A(outside), bytes.fromhex(GW_MAC.replace(":", "")), LO_IFINDEX, permanent=True)
    m.set_local(A(sapool), 0x4, LO_IFINDEX)
    m.set_dest(svc_id, A(sapool), 0, "snat", svc_id, drain=False)
    m.set_sched(svc_id, [svc_id], 1)
    m.set_snat_rule(0, svc_id, 0, None, None, 0, LO_IFINDEX)
    m.set_cfg(snat_rules=1)


@pytest.mark.parametrize("flags", ["SF", "SFR", "SR", "SFPU"])
@pytest.mark.parametrize("where", ["ipv4", "ipv6", "nat64", "snat"])
def test_a_syn_with_fin_or_rst_opens_nothing(fastpath, m, where, flags):
    if where == "snat":
        _snat_lab(m)
        pkt = Ether(src=RS_MAC, dst=LB) / IP(src="192.168.100.2", dst="10.0.0.1") / TCP(sport=5100, dport=80, flags=flags)
    elif where == "ipv4":
        pkt = E / IP(src=CLIENT, dst=VIP) / TCP(sport=5100, dport=80, flags=flags)
    else:
        pkt = E / IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=5100, dport=80 if where == "ipv6" else 8080, flags=flags)
    refused(fastpath, m, pkt, "drop_no_conn")


def test_a_syn_with_fin_on_a_finished_flow_leaves_it_alone(fastpath, m):
    """A SYN on a finished flow's tuple reschedules it (conn_reuse_mode); a SYN+FIN there must not remove it."""
    for f in ("S", "A", "FA"):
        assert run(fastpath, E / IP(src=CLIENT, dst=VIP) / TCP(sport=5110, dport=80, flags=f))[0] == XDP_TX
    entries = m.conn_entries()
    run(fastpath, E / IP(src=CLIENT, dst=VIP) / TCP(sport=5110, dport=80, flags="SF"))
    c = m.counters()
    assert c["conn_reused"] == 0 and c["conn_expired"] == 0 and m.conn_entries() == entries
    assert c["conn_new"] == 1
    # a plain SYN still reuses the tuple
    assert run(fastpath, E / IP(src=CLIENT, dst=VIP) / TCP(sport=5110, dport=80, flags="S"))[0] == XDP_TX
    assert m.counters()["conn_reused"] == 1


def test_syn_with_ecn_flags_still_opens_a_flow(fastpath, m):
    """RFC 3168: an ECN-setup SYN carries ECE and CWR; it is a bare SYN for our purposes."""
    v, out = run(fastpath, E / IP(src=CLIENT, dst=VIP) / TCP(sport=5120, dport=80, flags="SEC"))
    assert v == XDP_TX and out[IP].dst == RS1


# --- 5. IPv6 UDP without a checksum --------------------------------------------------------------------------

@pytest.mark.parametrize("port", [53, 5353], ids=["fnat", "nat64"])
def test_ipv6_udp_without_a_checksum_is_dropped_new_or_established(fastpath, m, port):
    """RFC 8200 8.1: zero is no checksum, which IPv6 UDP must have; rewriting it incrementally sent garbage."""
    refused(fastpath, m, E / IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=5200, dport=port, chksum=0) / b"q",
            "drop_malformed_l4")
    v, out = run(fastpath, E / IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=5201, dport=port) / b"q")
    assert v == XDP_TX
    stats = m.svc_stats(3 if port == 53 else 5)
    refused(fastpath, m, E / IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=5201, dport=port, chksum=0) / b"q",
            "drop_malformed_l4")
    assert m.svc_stats(3 if port == 53 else 5) == stats


def test_ipv6_udp_without_a_checksum_not_for_us_is_the_kernels(fastpath, m):
    """A zero-checksum tunnel (RFC 6935) the kernel terminates is its business."""
    refused(fastpath, m, E / IPv6(src=CLIENT6, dst="fd00:99::1") / UDP(sport=5202, dport=4789, chksum=0) / b"q",
            "pass_ipv6", verdict=XDP_PASS)


# --- 6. sources no flow can come from ------------------------------------------------------------------------

MARTIANS4 = ["255.255.255.255", "0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250", "127.0.0.1", "127.9.9.9"]
MARTIANS6 = ["::", "::1", "ff02::1", "ff0e::1234", "::ffff:10.0.0.1"]


@pytest.mark.parametrize("src", MARTIANS4 + [VIP, VIP_TUN, LIP])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_martian_ipv4_source_opens_nothing(fastpath, m, src, proto):
    """... its own destination (land) or another of our addresses included: only a spoofer sends those."""
    l4 = TCP(sport=5300, dport=80, flags="S") if proto == "tcp" else UDP(sport=5300, dport=53)
    refused(fastpath, m, E / IP(src=src, dst=VIP) / l4, "drop_martian")


@pytest.mark.parametrize("src,dst", [(s, VIP6) for s in MARTIANS6] + [(VIP6, VIP6), (CLIENT6, VIP6), (LIP6, VIP6)],
                         ids=MARTIANS6 + ["land", "nat64-land", "our-laddr"])
def test_a_martian_ipv6_source_opens_nothing(fastpath, m, src, dst):
    port = 8080 if src == CLIENT6 else 80
    if src == CLIENT6:  # NAT64 service, client address equal to the VIP: land on the v6 side
        src = dst
    refused(fastpath, m, E / IPv6(src=src, dst=dst) / TCP(sport=5310, dport=port, flags="S"), "drop_martian")


@pytest.mark.parametrize("smac", ["ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "33:33:00:00:00:01"])
@pytest.mark.parametrize("family", [4, 6])
def test_a_group_ethernet_source_opens_nothing(fastpath, m, smac, family):
    """The reply entry would send every answer to the broadcast (or a multicast) MAC."""
    ip = IP(src=CLIENT, dst=VIP) if family == 4 else IPv6(src=CLIENT6, dst=VIP6)
    refused(fastpath, m, Ether(src=smac, dst=LB) / ip / TCP(sport=5320, dport=80, flags="S"), "drop_martian")


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_source_port_zero_opens_nothing(fastpath, m, family, proto):
    ip = IP(src=CLIENT, dst=VIP) if family == 4 else IPv6(src=CLIENT6, dst=VIP6)
    l4 = TCP(sport=0, dport=80, flags="S") if proto == "tcp" else UDP(sport=0, dport=53)
    refused(fastpath, m, E / ip / l4, "drop_martian")


@pytest.mark.parametrize("src", ["255.255.255.255", "224.0.0.5", "127.0.0.1"])
def test_snat_does_not_translate_martian_sources(fastpath, m, src):
    _snat_lab(m)
    pkt = Ether(src=RS_MAC, dst=LB) / IP(src=src, dst="10.0.0.1") / UDP(sport=5330, dport=53)
    refused(fastpath, m, pkt, "drop_martian")
    refused(fastpath, m, Ether(src=RS_MAC, dst=LB) / IP(src=src, dst="10.0.0.1") / ICMP(type=8, id=9), "drop_martian")


@pytest.mark.parametrize("dst", ["255.255.255.255", "224.0.0.251", "239.255.255.250"])
def test_snat_leaves_broadcast_and_multicast_to_the_kernel(fastpath, m, dst):
    """mDNS, SSDP and the like from an inside host are not flows to the outside, whatever the rule's dst range."""
    _snat_lab(m)
    m.set_route(ipaddress.ip_network("0.0.0.0/0"), LO_IFINDEX, A("10.0.0.1"), None, 1500, False)
    refused(fastpath, m, Ether(src=RS_MAC, dst=LB) / IP(src="192.168.100.2", dst=dst) / UDP(sport=5353, dport=5353),
            "pass_not_ours", verdict=XDP_PASS)


def test_tunnel_fragmentation_needed_is_never_sent_to_broadcast(fastpath, m):
    """A too-big DF SYN 'from' 255.255.255.255 was answered with ICMP fragmentation needed to it."""
    big = E / IP(src="255.255.255.255", dst=VIP_TUN, flags="DF") / TCP(sport=5340, dport=80, flags="S") / (b"y" * 1461)
    refused(fastpath, m, big, "drop_martian")
    big6 = E / IPv6(src="ff02::1", dst=VIP6_TUN) / TCP(sport=5340, dport=80, flags="S") / (b"y" * 1441)
    refused(fastpath, m, big6, "drop_martian")


@pytest.mark.parametrize("dmac", ["02:bb:00:00:00:09", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:64", "33:33:00:00:01:00"],
                         ids=["another-host", "broadcast", "multicast4", "multicast6"])
@pytest.mark.parametrize("where", ["tcp", "udp", "ipv6", "nat64", "snat"])
def test_a_frame_for_another_mac_opens_nothing(fastpath, m, dmac, where):
    """Linux drops a frame for another host, LVS leaves broadcast and multicast ones to the stack: a frame flooded
    by a switch, seen in promiscuous mode or sent to the broadcast MAC opened a flow (another balancer's twin) whose
    replies left from the frame's destination MAC, ff:ff:ff:ff:ff:ff or another host's (the switch then sends that
    host's traffic here). It goes to the kernel, which drops it."""
    l2 = Ether(src=CL_MAC, dst=dmac)
    counter = "pass_not_ours"
    if where == "snat":
        _snat_lab(m)
        pkt = Ether(src=RS_MAC, dst=dmac) / IP(src="192.168.100.2", dst="10.0.0.1") / TCP(sport=5345, dport=80, flags="S")
    elif where in ("tcp", "udp"):
        pkt = l2 / IP(src=CLIENT, dst=VIP) / (TCP(sport=5345, dport=80, flags="S") if where == "tcp" else
                                              UDP(sport=5345, dport=53) / b"q")
    else:
        pkt = l2 / IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=5345, dport=80 if where == "ipv6" else 8080, flags="S")
        counter = "pass_ipv6"
    refused(fastpath, m, pkt, counter, verdict=XDP_PASS)
    # the same frame to our MAC opens the flow, and its replies leave from our MAC
    to_us = pkt.copy()
    to_us[Ether].dst = LB
    v, out = run(fastpath, to_us)
    assert v == XDP_TX and out.src == LB, (VERDICTS[v], out.summary())


def test_a_good_source_still_opens_a_flow(fastpath, m):
    """The checks above leave ordinary clients alone, 240.0.0.0/4 included (Linux routes it)."""
    for src in (CLIENT, "1.2.3.4", "240.0.0.1", "223.255.255.255"):
        assert run(fastpath, E / IP(src=src, dst=VIP) / TCP(sport=5350, dport=80, flags="S"))[0] == XDP_TX, src
    for src in (CLIENT6, "2001:db8::1", "fe80::1", "::2"):
        assert run(fastpath, E / IPv6(src=src, dst=VIP6) / TCP(sport=5350, dport=80, flags="S"))[0] == XDP_TX, src


# --- 7. ARP learns real unicast neighbours only --------------------------------------------------------------

def _learned(m):
    return {str(n["addr"]): n["lladdr"] for n in m.neighs()}


@pytest.mark.parametrize("spa,sha", [("255.255.255.255", CL_MAC), ("224.0.0.1", CL_MAC), ("127.0.0.1", CL_MAC),
                                     (VIP_TUN, CL_MAC), (LIP, CL_MAC), (CLIENT, "ff:ff:ff:ff:ff:ff"),
                                     (CLIENT, "01:00:5e:00:00:01"), (CLIENT, "00:00:00:00:00:00")],
                         ids=["bcast", "mcast", "loopback", "our-vip", "our-laddr", "bcast-mac", "mcast-mac", "zero-mac"])
@pytest.mark.parametrize("op", [1, 2])
def test_arp_does_not_learn_what_is_no_neighbour(fastpath, m, spa, sha, op):
    before = _learned(m)
    arp = Ether(src=CL_MAC, dst=LB if op == 2 else "ff:ff:ff:ff:ff:ff") / ARP(op=op, hwsrc=sha, psrc=spa, pdst=VIP,
                                                                              hwdst=LB if op == 2 else "00:00:00:00:00:00")
    v, _ = run(fastpath, arp)
    assert v in (XDP_TX, XDP_PASS)
    assert _learned(m) == before, _learned(m)
    assert m.counters()["arp_learn"] == 0


def test_an_arp_probe_is_answered_and_not_learned(fastpath, m):
    """RFC 5227: a probe's sender address is 0.0.0.0; the owner answers (to its MAC), nothing is learned."""
    before = _learned(m)
    probe = Ether(src=CL_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=CL_MAC, psrc="0.0.0.0", pdst=VIP)
    v, out = run(fastpath, probe)
    assert v == XDP_TX and out[ARP].op == 2 and out[ARP].psrc == VIP and out[Ether].dst == CL_MAC
    assert _learned(m) == before


def test_arp_still_learns_a_real_neighbour(fastpath, m):
    req = Ether(src=CL_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=CL_MAC, psrc=CLIENT, pdst=VIP)
    assert run(fastpath, req)[0] == XDP_TX
    assert _learned(m)[CLIENT] == CL_MAC


# --- 8. IPv6 extension headers towards our addresses --------------------------------------------------------

EXT = {"hbh": IPv6ExtHdrHopByHop, "dstopt": IPv6ExtHdrDestOpt, "routing": lambda: IPv6ExtHdrRouting(segleft=0)}


@pytest.mark.parametrize("ext", list(EXT))
@pytest.mark.parametrize("dst", [VIP6, LIP6], ids=["vip", "laddr"])
def test_ipv6_extension_headers_to_our_addresses_are_dropped_not_passed(fastpath, m, ext, dst):
    """Not walked, so not balanced; passed, the kernel would answer for the VIP (or a listener on it would)."""
    pkt = E / IPv6(src=CLIENT6, dst=dst) / EXT[ext]() / TCP(sport=5400, dport=80, flags="S")
    refused(fastpath, m, pkt, "drop_ipv6_exthdr")


def test_ipv6_fragments_to_our_addresses_still_count_as_fragments(fastpath, m):
    pkt = E / IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrFragment(m=1) / TCP(sport=5401, dport=80, flags="S")
    refused(fastpath, m, pkt, "drop_fragment")


@pytest.mark.parametrize("ext", list(EXT))
def test_ipv6_extension_headers_to_anyone_else_are_the_kernels(fastpath, m, ext):
    pkt = E / IPv6(src=CLIENT6, dst="fd00:99::1") / EXT[ext]() / TCP(sport=5402, dport=80, flags="S")
    refused(fastpath, m, pkt, "pass_ipv6", verdict=XDP_PASS)
    mld = E / IPv6(src="fe80::1", dst="ff02::16") / IPv6ExtHdrHopByHop() / (b"\x8f\x00" + b"\x00" * 6)
    refused(fastpath, m, mld, "pass_ipv6", verdict=XDP_PASS)


# --- 9. TUNNEL: what is checked is what is sent, and only what is sent counts ----------------------------------

def test_tunnel_too_big_with_ip_options_is_answered_with_fragmentation_needed(fastpath, m):
    """ihl 6 used to be dropped as drop_too_big: the client never learned the path MTU."""
    big = E / IP(src=CLIENT, dst=VIP_TUN, flags="DF", options=[IPOption_NOP()] * 4) / \
        TCP(sport=5500, dport=80, flags="S") / (b"y" * 1460)
    d = refused(fastpath, m, big, "icmp_too_big", verdict=XDP_TX)
    assert "drop_too_big" not in d
    v, out = run(fastpath, big)
    assert v == XDP_TX
    assert (out[Ether].dst, out[IP].src, out[IP].dst, out[IP].proto) == (CL_MAC, VIP_TUN, CLIENT, 1)
    assert (out[ICMP].type, out[ICMP].code, out[ICMP].nexthopmtu) == (3, 4, 1480)
    quoted = bytes(out[ICMP].payload)
    assert quoted == bytes(big[IP])[:68] and out[IP].len == 20 + 8 + 68, "the whole header with options + 8 bytes"
    q = Ether(bytes(out))
    del q[IP].chksum, q[ICMP].chksum
    q = Ether(bytes(q))
    assert (q[IP].chksum, q[ICMP].chksum) == (out[IP].chksum, out[ICMP].chksum)


@pytest.mark.parametrize("family", [4, 6])
def test_tunnel_sends_the_datagram_not_the_bytes_after_it(fastpath, m, family):
    """The MTU check uses tot_len (payload_len); junk after it must not travel inside the tunnel."""
    if family == 4:
        pkt = E / IP(src=CLIENT, dst=VIP_TUN, flags="DF") / TCP(sport=5510, dport=80, flags="S")
        inner = bytes(pkt[IP])
    else:
        pkt = E / IPv6(src=CLIENT6, dst=VIP6_TUN) / TCP(sport=5510, dport=80, flags="S")
        inner = bytes(pkt[IPv6])
    v, out = run(fastpath, bytes(pkt) + b"z" * 1470)  # frame 1524+: far beyond the MTU, the datagram is not
    assert v == XDP_TX, (VERDICTS[v], m.counters())
    outer = 20 if family == 4 else 40
    assert len(bytes(out)) == 14 + outer + len(inner)
    assert bytes(out)[14 + outer:] == inner
    if family == 4:
        assert out[IP].len == 20 + len(inner) and out[IP].proto == 4
    else:
        assert out[IPv6].plen == len(inner) and out[IPv6].nh == 41


def test_tunnel_padding_is_cut_too(fastpath, m):
    raw = bytes(E / IP(src=CLIENT, dst=VIP_TUN) / TCP(sport=5511, dport=80, flags="S"))
    v, out = run(fastpath, raw + b"\0" * 6)  # padded to 60
    assert v == XDP_TX and len(bytes(out)) == len(raw) + 20


def test_tunnel_too_big_counts_no_connection_and_no_traffic(fastpath, m):
    """Without DF the packet is dropped (drop_too_big), with DF answered: neither is the flow's traffic, and a
    first packet that does not fit opens no flow."""
    nodf = E / IP(src=CLIENT, dst=VIP_TUN) / TCP(sport=5520, dport=80, flags="S") / (b"y" * 1461)
    refused(fastpath, m, nodf, "drop_too_big")
    df = E / IP(src=CLIENT, dst=VIP_TUN, flags="DF") / TCP(sport=5521, dport=80, flags="S") / (b"y" * 1461)
    refused(fastpath, m, df, "icmp_too_big", verdict=XDP_TX)
    big6 = E / IPv6(src=CLIENT6, dst=VIP6_TUN) / TCP(sport=5522, dport=80, flags="S") / (b"y" * 1441)
    refused(fastpath, m, big6, "icmp_too_big", verdict=XDP_TX)
    # a known flow: its stats count only what went through the tunnel
    assert run(fastpath, E / IP(src=CLIENT, dst=VIP_TUN) / TCP(sport=5523, dport=80, flags="S"))[0] == XDP_TX
    st = m.svc_stats(6)
    assert (st["conns"], st["inpkts"]) == (1, 1)
    refused(fastpath, m, E / IP(src=CLIENT, dst=VIP_TUN) / TCP(sport=5523, dport=80, flags="A") / (b"y" * 1461),
            "drop_too_big")
    assert m.svc_stats(6) == st
