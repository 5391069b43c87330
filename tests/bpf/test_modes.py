"""Every forwarding mode and scheduler of the compiled XDP program, on crafted packets (BPF_PROG_TEST_RUN).

Each case states the packet in, the verdict, the packet out (compared field by field, checksums recomputed by
scapy) and the counters. Maps are written here through bcc's own ctypes (not through Balancer), so these tests
pin the ABI the control plane must honour.
"""

import ctypes as ct
import ipaddress
import os
import socket

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.utils import checksum

from hdslb import sched
from hdslb.fastpath import abi
from hdslb.fastpath.maps import _put_addr
from hdslb.fastpath.testrun import VERDICTS, XDP_DROP, XDP_PASS, XDP_TX, run_xdp

from .conftest import CONN_TABLES, LB_MAC, LO_IFINDEX, on_cpu


@pytest.fixture(params=CONN_TABLES)
def fastpath(fastpath_of, request):
    """Every test here runs on both conn table kinds: a value per CPU (the default) and one shared value."""
    return fastpath_of(request.param)


A = ipaddress.ip_address
LB = ":".join(f"{b:02x}" for b in LB_MAC)
CL_MAC, RS_MAC, GW_MAC = "02:cc:00:00:00:01", "02:55:00:00:00:02", "02:99:00:00:00:09"
CLIENT, VIP, LIP, TUNSRC = "10.0.0.1", "10.0.0.100", "192.168.100.200", "192.168.100.254"
RS1, RS2, RS3 = "192.168.100.2", "192.168.100.3", "192.168.100.4"
CLIENT6, VIP6, LIP6 = "fd00:10::1", "fd00:10::100", "fd00:100::200"
RS61, RS62 = "fd00:100::2", "fd00:100::3"
TCP_, UDP_, ICMP_ = socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_ICMP

SVC_F_VALID, SVC_F_PERSIST = 0x1, 0x2
SCHED_RING, SCHED_HASH = 1, 2
HKEY = {sched.KEY_SRC: 1, sched.KEY_DST: 2, sched.KEY_SRC_PORT: 3}


@pytest.fixture
def m(fastpath, maps):
    """The shared `maps` fixture, plus this module's routes and neighbours."""
    maps.set_route(ipaddress.ip_network("192.168.100.0/24"), LO_IFINDEX, None, None, 1500, False)
    maps.set_route(ipaddress.ip_network("fd00:100::/64"), LO_IFINDEX, None, None, 1500, False)
    for a in (RS1, RS2, RS3, RS61, RS62):
        maps.set_neigh(A(a), bytes.fromhex(RS_MAC.replace(":", "")), LO_IFINDEX, permanent=True)
    maps.set_laddrs(0, [(A(LIP), LO_IFINDEX)])
    return maps


def set_snat_count(fp, n):
    t = fp.table("cfg_map")
    v = t[ct.c_uint32(0)]
    v.snat_rules = n
    t[ct.c_uint32(0)] = v


def service(fp, proto, vip, port, svc_id=0, persist=0, plen=32):
    t = fp.table("svc_map")
    k = t.Key()
    _put_addr(k.addr, A(vip))
    k.port = socket.htons(port)
    k.proto = proto
    k.af = A(vip).version
    v = t.Leaf()
    v.svc_id = svc_id
    v.flags = SVC_F_VALID | (SVC_F_PERSIST if persist else 0)
    v.persist_timeout = persist
    v.persist_plen = plen
    if A(vip).version == 6:  # as Maps.set_service: NAT64 replies are looked for in conn6_map
        c = fp.table("cfg_map")
        cv = c[ct.c_uint32(0)]
        cv.flags |= abi.defines()["CFG_F_NAT64"]
        c[ct.c_uint32(0)] = cv
    t[k] = v


def ring(fp, svc_id, slots):
    t = fp.table("sched_map")
    v = t.Leaf()
    v.len, v.gen, v.kind = len(slots), 1, SCHED_RING
    for i, s in enumerate(slots):
        v.slot[i] = s
    t[ct.c_uint32(svc_id)] = v


def hash_table(fp, svc_id, table, hoff):
    cells = fp.table("hash_cells")
    for i, s in enumerate(table.entries):
        cells[ct.c_uint32(hoff + i)] = cells.Leaf(s)  # u32 slots (a 2-byte value: the kernel reads past it)
    t = fp.table("sched_map")
    v = t.Leaf()
    v.len, v.gen, v.kind, v.key, v.seed, v.hoff = len(table.entries), 1, SCHED_HASH, HKEY[table.key], table.seed, hoff
    t[ct.c_uint32(svc_id)] = v


def dest(m, slot, addr, port, fwd, svc_id=0, drain=False, no_persist=False):
    m.set_dest(slot, A(addr), port, fwd, svc_id, drain=drain, no_persist=no_persist)


def run(fp, pkt):
    v, out, _ = run_xdp(fp.prog_fd, bytes(pkt))
    return v, Ether(out)


def checksums_ok(p):
    """Recompute every checksum of p with scapy (outer and inner) and compare with what the program wrote."""
    q = Ether(bytes(p))
    for layer in (IP, TCP, UDP, ICMP):
        lay = q
        while lay is not None and lay.__class__ is not type(None):
            if isinstance(lay, layer) and hasattr(lay, "chksum"):
                del lay.chksum
            lay = lay.payload if lay.payload else None
    r = Ether(bytes(q))
    assert bytes(r) == bytes(p), f"checksums differ:\n{p.show(dump=True)}\n{r.show(dump=True)}"


def c4(src=CLIENT, dst=VIP, sport=40000, dport=80, flags="S", proto="tcp", payload=b""):
    l4 = TCP(sport=sport, dport=dport, flags=flags, seq=1000) if proto == "tcp" else UDP(sport=sport, dport=dport)
    return Ether(src=CL_MAC, dst=LB) / IP(src=src, dst=dst) / l4 / payload


def c6(src=CLIENT6, dst=VIP6, sport=40000, dport=80, flags="S", proto="tcp", payload=b""):
    l4 = TCP(sport=sport, dport=dport, flags=flags, seq=1000) if proto == "tcp" else UDP(sport=sport, dport=dport)
    return Ether(src=CL_MAC, dst=LB) / IPv6(src=src, dst=dst) / l4 / payload


# --- DR -----------------------------------------------------------------------------------------------------

def test_dr_rewrites_only_the_mac_and_keeps_no_reply_entry(fastpath, m):
    service(fastpath, TCP_, VIP, 80)
    dest(m, 0, RS1, 80, "dr")
    ring(fastpath, 0, [0])
    pkt = c4(payload=b"x" * 10)
    v, out = run(fastpath, pkt)
    assert VERDICTS[v] == "XDP_TX"
    assert (out[Ether].src, out[Ether].dst) == (LB, RS_MAC)
    assert bytes(out[IP]) == bytes(pkt[IP]), "DR must not touch L3/L4"
    assert m.conn_entries() == 1, "DR keeps the inbound direction only"
    # the rest of the flow follows the entry
    v, out = run(fastpath, c4(flags="A"))
    assert v == XDP_TX and out[Ether].dst == RS_MAC and out[IP].dst == VIP
    assert m.counters()["conn_new"] == 1


def test_dr_v6(fastpath, m):
    service(fastpath, TCP_, VIP6, 80)
    dest(m, 0, RS61, 80, "dr")
    ring(fastpath, 0, [0])
    pkt = c6()
    v, out = run(fastpath, pkt)
    assert v == XDP_TX and out[Ether].dst == RS_MAC and bytes(out[IPv6]) == bytes(pkt[IPv6])


# --- NAT (masquerade) -----------------------------------------------------------------------------------------

def test_nat_rewrites_destination_in_and_source_on_replies(fastpath, m):
    service(fastpath, TCP_, VIP, 80)
    dest(m, 0, RS1, 8080, "nat")
    ring(fastpath, 0, [0])
    v, out = run(fastpath, c4(sport=41000))
    assert v == XDP_TX
    assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (CLIENT, 41000, RS1, 8080)
    checksums_ok(out)
    reply = Ether(src=RS_MAC, dst=LB) / IP(src=RS1, dst=CLIENT) / TCP(sport=8080, dport=41000, flags="SA", seq=5, ack=1001)
    v, back = run(fastpath, reply)
    assert v == XDP_TX
    assert (back[IP].src, back[TCP].sport, back[IP].dst, back[TCP].dport) == (VIP, 80, CLIENT, 41000)
    assert (back[Ether].src, back[Ether].dst) == (LB, CL_MAC)
    checksums_ok(back)
    assert m.conn_entries() == 2


def _icmp_error(src, dst, quoted, kind=3, code=4):
    icmp = ICMP(type=kind, code=code, nexthopmtu=1400) if kind == 3 else ICMP(type=kind, code=code)
    return Ether(src=RS_MAC, dst=LB) / IP(src=src, dst=dst) / icmp / bytes(quoted)[:28]


def _delta(m, fn):
    before = m.counters()
    r = fn()
    after = m.counters()
    return r, {k: after[k] - before[k] for k in after if after[k] != before[k]}


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("kind", [3, 11])
def test_nat_error_from_the_real_server_to_the_client_goes_to_the_slow_path(fastpath, m, slowpath_up, proto, kind):
    """NAT: the real server's (or a router's past us) error about a packet we forwarded to it is addressed to the
    client, not to us, and routed back through the balancer. It quotes client:cport -> RS:port, whose reverse is
    the flow's reply entry: punted (punt_icmp), for the slow path to send on translated, as LVS does
    (ip_vs_out_icmp); passing it would hand the client an error from the server's address quoting it."""
    service(fastpath, TCP_ if proto == "tcp" else UDP_, VIP, 80)
    dest(m, 0, RS1, 8080, "nat")
    ring(fastpath, 0, [0])
    v, out = run(fastpath, c4(sport=41000, proto=proto))
    assert v == XDP_TX and (out[IP].src, out[IP].dst) == (CLIENT, RS1)
    (v, _), d = _delta(m, lambda: run(fastpath, _icmp_error(RS1, CLIENT, out[IP], kind=kind, code=4 if kind == 3 else 0)))
    assert VERDICTS[v] == "XDP_REDIRECT" and d.get("punt_icmp") == 1 and "pass_not_ours" not in d, d


def test_icmp_errors_to_other_hosts_quoting_no_nat_flow_are_left_to_the_kernel(fastpath, m, slowpath_up):
    """Only an error quoting a NAT flow is taken: one quoting no flow, a FullNAT flow (its errors come to the
    local address), a later fragment or a truncated quote is routed by the kernel as before (pass_not_ours)."""
    service(fastpath, TCP_, VIP, 80)
    dest(m, 0, RS1, 8080, "nat")
    ring(fastpath, 0, [0])
    service(fastpath, TCP_, VIP, 81, svc_id=1)
    dest(m, 1, RS2, 8081, "fnat", svc_id=1)
    ring(fastpath, 1, [1])
    m.set_laddrs(1, [(A(LIP), LO_IFINDEX)])
    v, nat = run(fastpath, c4(sport=41000))
    assert v == XDP_TX
    v, fnat = run(fastpath, c4(sport=41001, dport=81))
    assert v == XDP_TX and fnat[IP].src == LIP
    nat_ip = bytes(nat[IP])
    later_frag = IP(nat_ip[:20])
    later_frag.frag = 10
    del later_frag.chksum
    cases = {
        "no flow": IP(src=CLIENT, dst=RS1) / TCP(sport=41999, dport=8080),
        "no flow (the flow's own direction)": IP(src=RS1, dst=CLIENT) / TCP(sport=8080, dport=41000),
        "fnat flow": fnat[IP],
        "later fragment": bytes(later_frag)[:20] + nat_ip[20:],
        "no ports": nat_ip[:20],
    }
    for name, quoted in cases.items():
        (v, _), d = _delta(m, lambda: run(fastpath, _icmp_error(RS1, "10.0.0.9", quoted)))
        assert v == XDP_PASS and d.get("pass_not_ours") == 1 and "punt_icmp" not in d, (name, d)
    # the NAT flow's error itself with the slow path down: the kernel's, as before
    slowpath_up.close()
    (v, _), d = _delta(m, lambda: run(fastpath, _icmp_error(RS1, CLIENT, nat[IP])))
    assert v == XDP_PASS and d.get("pass_not_ours") == 1, d


def test_nat_v6_udp(fastpath, m):
    service(fastpath, UDP_, VIP6, 53)
    dest(m, 0, RS61, 5353, "nat")
    ring(fastpath, 0, [0])
    v, out = run(fastpath, c6(sport=4444, dport=53, proto="udp", payload=b"q"))
    assert v == XDP_TX and (out[IPv6].src, out[IPv6].dst, out[UDP].dport) == (CLIENT6, RS61, 5353)
    checksums_ok(out)
    r = Ether(src=RS_MAC, dst=LB) / IPv6(src=RS61, dst=CLIENT6) / UDP(sport=5353, dport=4444) / b"a"
    v, back = run(fastpath, r)
    assert v == XDP_TX and (back[IPv6].src, back[UDP].sport) == (VIP6, 53)
    checksums_ok(back)


def test_nat_v6_error_from_the_real_server_to_the_client_goes_to_the_slow_path(fastpath, m, slowpath_up):
    """NAT over IPv6, as IPv4's test above: a Packet Too Big about client -> RS (from the server or a router on its
    side) is addressed to the client and routed through us; it quotes a NAT flow, so it is punted for the slow
    path to translate (it was passed, and the client never learnt the smaller MTU: IPv6 routers do not
    fragment). One quoting no flow stays the kernel's."""
    from scapy.layers.inet6 import ICMPv6PacketTooBig

    service(fastpath, UDP_, VIP6, 53)
    dest(m, 0, RS61, 5353, "nat")
    ring(fastpath, 0, [0])
    v, out = run(fastpath, c6(sport=4444, dport=53, proto="udp", payload=b"q"))
    assert v == XDP_TX and (out[IPv6].src, out[IPv6].dst) == (CLIENT6, RS61)

    def ptb(quoted):
        return Ether(src=RS_MAC, dst=LB) / IPv6(src=RS61, dst=CLIENT6) / ICMPv6PacketTooBig(mtu=1280) / \
            bytes(quoted)[:48]

    (v, _), d = _delta(m, lambda: run(fastpath, ptb(out[IPv6])))
    assert VERDICTS[v] == "XDP_REDIRECT" and d.get("punt_icmp") == 1, d
    other = IPv6(src=CLIENT6, dst=RS61) / UDP(sport=4445, dport=5353)
    (v, _), d = _delta(m, lambda: run(fastpath, ptb(other)))
    assert v == XDP_PASS and "punt_icmp" not in d, d


# --- TUNNEL ---------------------------------------------------------------------------------------------------

def _tunnel_setup(fastpath, m, src=TUNSRC, mtu=1500):
    m.set_route(ipaddress.ip_network("192.168.100.0/24"), LO_IFINDEX, None, A(src) if src else None, 1500, False)
    m.set_iface(LO_IFINDEX, LB_MAC, mtu)
    service(fastpath, TCP_, VIP, 80)
    dest(m, 0, RS1, 80, "tunnel")
    ring(fastpath, 0, [0])


@pytest.mark.parametrize("vlans", [0, 1, 2])
def test_tunnel_wraps_the_untouched_packet_in_ipip(fastpath, m, vlans):
    _tunnel_setup(fastpath, m)
    pkt = c4(payload=b"hello")
    if vlans:
        tagged = Ether(src=CL_MAC, dst=LB)
        for i in range(vlans):
            tagged = tagged / Dot1Q(vlan=10 + i)
        pkt = tagged / pkt[IP]
    v, out = run(fastpath, pkt)
    assert v == XDP_TX, VERDICTS[v]
    assert (out[Ether].src, out[Ether].dst, out[Ether].type) == (LB, RS_MAC, 0x0800)
    outer = out[IP]
    assert (outer.src, outer.dst, outer.proto, outer.ttl) == (TUNSRC, RS1, 4, 64)
    assert bytes(outer.payload) == bytes(pkt[IP]), "the inner packet is the client's, byte for byte"
    assert outer.len == 20 + len(pkt[IP])
    checksums_ok(out)


def test_tunnel_without_source_or_beyond_mtu_is_dropped_and_counted(fastpath, m):
    _tunnel_setup(fastpath, m, src=None)
    m.set_laddrs(0, [])
    assert run(fastpath, c4())[0] == XDP_DROP
    assert m.counters()["drop_no_src"] == 1
    _tunnel_setup(fastpath, m, mtu=100)
    assert run(fastpath, c4(sport=40001, payload=b"x" * 70))[0] == XDP_DROP  # 20+20+70 + 20 > 100
    assert m.counters()["drop_too_big"] == 1


def _tunnel6_setup(fastpath, m, mtu=1500):
    m.set_route(ipaddress.ip_network("fd00:100::/64"), LO_IFINDEX, None, A("fd00:100::fe"), 1500, False)
    m.set_iface(LO_IFINDEX, LB_MAC, mtu)
    service(fastpath, TCP_, VIP6, 80)
    dest(m, 0, RS61, 80, "tunnel")
    ring(fastpath, 0, [0])


def test_tunnel_v6_is_ip6ip6(fastpath, m):
    _tunnel6_setup(fastpath, m)
    pkt = c6(payload=b"abc")
    v, out = run(fastpath, pkt)
    assert v == XDP_TX and out[Ether].type == 0x86DD
    outer = out[IPv6]
    assert (outer.src, outer.dst, outer.nh, outer.plen) == ("fd00:100::fe", RS61, 41, len(pkt[IPv6]))
    assert bytes(outer.payload) == bytes(pkt[IPv6])


def test_tunnel_v6_answers_a_too_big_packet_with_packet_too_big(fastpath, m):
    """IPv6 is never fragmented on the way: a packet that does not fit the 6in6 tunnel gets ICMPv6 Packet Too Big
    from the VIP, quoting the first 1232 bytes (the most a 1280-byte error can carry), checksum checked by scapy."""
    from scapy.layers.inet6 import ICMPv6PacketTooBig

    _tunnel6_setup(fastpath, m)
    assert run(fastpath, c6(sport=40200))[0] == XDP_TX  # the flow exists
    big = c6(sport=40200, flags="A", payload=b"z" * 1440)  # 40 + 20 + 1440 = 1500 > 1500 - 40
    v, out = run(fastpath, big)
    assert VERDICTS[v] == "XDP_TX"
    assert (out[Ether].src, out[Ether].dst, out[Ether].type) == (LB, CL_MAC, 0x86DD)
    ip6 = out[IPv6]
    assert (ip6.src, ip6.dst, ip6.nh, ip6.plen, ip6.hlim) == (VIP6, CLIENT6, 58, 1240, 64)
    ptb = out[ICMPv6PacketTooBig]
    assert (ptb.type, ptb.code, ptb.mtu) == (2, 0, 1460)
    assert bytes(ptb.payload) == bytes(big[IPv6])[:1232]
    assert len(out) == 14 + 40 + 8 + 1232
    q = Ether(bytes(out))
    del q[ICMPv6PacketTooBig].cksum
    assert Ether(bytes(q))[ICMPv6PacketTooBig].cksum == ptb.cksum, "ICMPv6 checksum"
    c = m.counters()
    assert c["icmp_too_big"] == 1 and c["drop_too_big"] == 0
    # a packet that fits still goes through the tunnel
    v, out = run(fastpath, c6(sport=40200, flags="A", payload=b"z" * 1400))
    assert v == XDP_TX and out[IPv6].nh == 41


def test_tunnel_v6_too_big_but_too_short_to_quote_is_dropped_and_counted(fastpath, m):
    """On a link below IPv6's 1280 minimum a too-big packet may be shorter than the quote: counted, dropped."""
    _tunnel6_setup(fastpath, m, mtu=200)
    v, _ = run(fastpath, c6(sport=40300, payload=b"z" * 200))
    assert v == XDP_DROP
    c = m.counters()
    assert c["drop_too_big"] == 1 and c["icmp_too_big"] == 0


# --- FNAT v6 and NAT64 ----------------------------------------------------------------------------------------

def test_fnat_v6_both_directions(fastpath, m):
    service(fastpath, TCP_, VIP6, 80)
    dest(m, 0, RS61, 8080, "fnat")
    ring(fastpath, 0, [0])
    m.set_laddrs(0, [(A(LIP6), LO_IFINDEX)])
    v, out = run(fastpath, c6(sport=42000, payload=b"GET /"))
    assert v == XDP_TX
    assert (out[IPv6].src, out[IPv6].dst, out[TCP].dport) == (LIP6, RS61, 8080)
    checksums_ok(out)
    r = Ether(src=RS_MAC, dst=LB) / IPv6(src=RS61, dst=LIP6) / TCP(sport=8080, dport=out[TCP].sport, flags="SA")
    v, back = run(fastpath, r)
    assert v == XDP_TX
    assert (back[IPv6].src, back[IPv6].dst, back[TCP].sport, back[TCP].dport) == (VIP6, CLIENT6, 80, 42000)
    checksums_ok(back)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_nat64_translates_headers_both_ways(fastpath, m, proto):
    p = TCP_ if proto == "tcp" else UDP_
    service(fastpath, p, VIP6, 80)
    dest(m, 0, RS1, 8080, "fnat")
    ring(fastpath, 0, [0])
    m.set_laddrs(0, [(A(LIP), LO_IFINDEX)])
    pkt = c6(sport=43000, proto=proto, payload=b"payload-64")
    v, out = run(fastpath, pkt)
    assert v == XDP_TX, VERDICTS[v]
    assert out[Ether].type == 0x0800 and IPv6 not in out
    ip4 = out[IP]
    assert (ip4.src, ip4.dst, ip4.proto, ip4.len) == (LIP, RS1, p, 20 + len(pkt[IPv6].payload))
    l4 = ip4[TCP] if proto == "tcp" else ip4[UDP]
    assert l4.dport == 8080 and bytes(l4.payload) == b"payload-64"
    checksums_ok(out)
    r4 = IP(src=RS1, dst=LIP) / (TCP(sport=8080, dport=l4.sport, flags="SA") if proto == "tcp"
                                 else UDP(sport=8080, dport=l4.sport)) / b"answer"
    v, back = run(fastpath, Ether(src=RS_MAC, dst=LB) / r4)
    assert v == XDP_TX and back[Ether].type == 0x86DD
    ip6 = back[IPv6]
    assert (ip6.src, ip6.dst, ip6.nh) == (VIP6, CLIENT6, p)
    l4b = ip6[TCP] if proto == "tcp" else ip6[UDP]
    assert (l4b.sport, l4b.dport, bytes(l4b.payload)) == (80, 43000, b"answer")
    # scapy recomputes the v6 pseudo-header checksum
    q = IPv6(bytes(ip6))
    del q[TCP if proto == "tcp" else UDP].chksum
    assert bytes(IPv6(bytes(q))) == bytes(ip6)
    checksums_ok(out)


def test_nat64_icmp_errors_are_punted_and_translated_across_families(fastpath, m, slowpath_up):
    """NAT64 and path MTU, over the real tables: a router on the servers' side answers "fragmentation needed" to
    LIP about what we translated from the client, and one on the client's side Packet Too Big to the VIP about a
    reply. Both are punted (to our addresses) and the slow path finds the flow by the quote (the IPv4 reply key
    lives in conn6_map) and sends each to the other side in its family: ICMPv6 to the client from the VIP,
    ICMPv4 to the server from LIP. The slow path dropped both (a black hole on either side)."""
    import types

    from scapy.layers.inet import IPerror, TCPerror
    from scapy.layers.inet6 import ICMPv6PacketTooBig, IPerror6

    from hdslb.slowpath import packets as P
    from hdslb.slowpath.runner import SlowPathRunner

    service(fastpath, TCP_, VIP6, 80)
    dest(m, 0, RS1, 8080, "fnat")
    ring(fastpath, 0, [0])
    m.set_local(A(VIP6), 0x1, 0)
    m.set_local(A(LIP), 0x2, 0)
    v, out = run(fastpath, c6(sport=43100, payload=b"GET /"))
    assert v == XDP_TX and (out[IP].src, out[IP].dst) == (LIP, RS1)
    lport = out[TCP].sport
    v, back = run(fastpath, Ether(src=RS_MAC, dst=LB) / IP(src=RS1, dst=LIP) / TCP(sport=8080, dport=lport, flags="SA"))
    assert v == XDP_TX and back[IPv6].dst == CLIENT6
    frag_needed = _icmp_error(RS1, LIP, out[IP])
    ptb = Ether(src=CL_MAC, dst=LB) / IPv6(src="fd00:10::fe", dst=VIP6) / ICMPv6PacketTooBig(mtu=1400) / \
        bytes(back[IPv6])[:48]
    for pkt in (frag_needed, ptb):
        (v, _), d = _delta(m, lambda: run(fastpath, pkt))
        assert VERDICTS[v] == "XDP_REDIRECT" and d.get("punt_icmp") == 1, d
    r = types.SimpleNamespace(d=types.SimpleNamespace(
        maps=m, bal=types.SimpleNamespace(ifaces={"lo": types.SimpleNamespace(name="lo", ifindex=LO_IFINDEX)})),
        sp=types.SimpleNamespace(ttl=64))
    r._translate_icmp_xlat = types.MethodType(SlowPathRunner._translate_icmp_xlat, r)
    ifname, frame = SlowPathRunner.translate_icmp_error(r, P.parse_icmp_error(bytes(frag_needed[ICMP])))
    e = Ether(frame)
    assert (e[IPv6].src, e[IPv6].dst, e[ICMPv6PacketTooBig].mtu) == (VIP6, CLIENT6, 1420)
    assert (e[IPerror6].src, e[IPerror6].dst, e[IPerror6][TCPerror].sport, e[IPerror6][TCPerror].dport) == \
        (CLIENT6, VIP6, 43100, 80)
    ifname, frame = SlowPathRunner.translate_icmp_error(r, P.parse_icmp6_error(bytes(ptb[ICMPv6PacketTooBig])))
    e = Ether(frame)
    assert (e[IP].src, e[IP].dst, e[ICMP].type, e[ICMP].code, e[ICMP].nexthopmtu) == (LIP, RS1, 3, 4, 1380)
    assert (e[IPerror].src, e[IPerror].dst, e[IPerror][TCPerror].sport, e[IPerror][TCPerror].dport) == \
        (RS1, LIP, 8080, lport)


def _entries(fp):
    return {name: len(list(fp.table(name).keys())) for name in ("conn4_map", "conn6_map")}


def test_each_family_lands_in_its_table(fastpath, m):
    """IPv4 flows in conn4_map (compact entries), IPv6 and NAT64 flows (both directions) in conn6_map."""
    service(fastpath, TCP_, VIP, 80, svc_id=0)
    service(fastpath, TCP_, VIP6, 80, svc_id=1)
    service(fastpath, TCP_, VIP6, 81, svc_id=2)
    dest(m, 0, RS1, 8080, "fnat", svc_id=0)
    dest(m, 1, RS61, 8080, "fnat", svc_id=1)
    dest(m, 2, RS2, 8080, "fnat", svc_id=2)
    for sid, slot in ((0, 0), (1, 1), (2, 2)):
        ring(fastpath, sid, [slot])
    m.set_laddrs(1, [(A(LIP6), LO_IFINDEX)])
    m.set_laddrs(2, [(A(LIP), LO_IFINDEX)])
    assert run(fastpath, c4(sport=41000))[0] == XDP_TX
    assert _entries(fastpath) == {"conn4_map": 2, "conn6_map": 0}
    assert run(fastpath, c6(sport=41001))[0] == XDP_TX
    assert _entries(fastpath) == {"conn4_map": 2, "conn6_map": 2}
    assert run(fastpath, c6(sport=41002, dport=81))[0] == XDP_TX  # NAT64: the v4 reply key too
    assert _entries(fastpath) == {"conn4_map": 2, "conn6_map": 4}
    by = sorted((c["af"], c["sport"], c["out"]) for c in m.conns())
    assert by == [(4, 8080, True), (4, 8080, True), (4, 41000, False), (6, 8080, True), (6, 41001, False),
                  (6, 41002, False)]


def test_the_kernel_sweep_finds_each_entry_in_its_table(fastpath, m):
    """hdslb_sweep takes wide keys: an IPv4 flow's in conn4_map, an IPv6 and a NAT64 flow's (its IPv4 reply
    included) in conn6_map; a flow whose scan-time last_seen is older than its entries' keeps them."""
    test_each_family_lands_in_its_table(fastpath, m)
    view = m.conn_aging_view()
    by_key = {r[0]: r for r in view}
    flows, seen = [], set()
    for r in view:
        if r[0] in seen:
            continue
        seen |= {r[0], r[1]}
        flows.append(((r[0], r[1]), max(r[2], by_key[r[1]][2])))
    assert len(flows) == 3
    stale = [(ks, last - 1) for ks, last in flows]       # each entry has seen a packet since "the scan"
    assert m.remove_dead_flows(stale) == 0 and _entries(fastpath) == {"conn4_map": 2, "conn6_map": 4}
    assert m.remove_dead_flows(flows) == 6
    assert _entries(fastpath) == {"conn4_map": 0, "conn6_map": 0}


@pytest.mark.parametrize("first", ["ipv4", "nat64"])
def test_a_local_port_is_never_given_to_both_an_ipv4_and_a_nat64_flow(fastpath, m, first):
    """An IPv4 service and a NAT64 service share a local address and a real server: their reply tuples
    (real server -> local address:port) look alike but live in different tables. With one port in the range,
    the second flow must find it taken and be dropped, not be given the same port (its replies would reach
    the other flow)."""
    service(fastpath, TCP_, VIP, 80, svc_id=0)
    service(fastpath, TCP_, VIP6, 80, svc_id=1)
    dest(m, 0, RS1, 8080, "fnat", svc_id=0)
    dest(m, 1, RS1, 8080, "fnat", svc_id=1)
    ring(fastpath, 0, [0])
    ring(fastpath, 1, [1])
    m.set_laddrs(1, [(A(LIP), LO_IFINDEX)])
    m.set_cfg(2000, 2000)
    pkts = {"ipv4": c4(sport=42000), "nat64": c6(sport=42000)}
    second = "nat64" if first == "ipv4" else "ipv4"
    v, out = run(fastpath, pkts[first])
    assert v == XDP_TX and out[TCP].sport == 2000
    assert run(fastpath, pkts[second])[0] == XDP_DROP
    assert m.counters()["drop_lport_exhausted"] == 1
    # the reply still reaches the first flow's client
    r = Ether(src=RS_MAC, dst=LB) / IP(src=RS1, dst=LIP) / TCP(sport=8080, dport=2000, flags="SA")
    v, back = run(fastpath, r)
    assert v == XDP_TX and (IPv6 in back) == (first == "nat64")


def test_nat64_udp_reply_without_checksum_is_dropped(fastpath, m):
    service(fastpath, UDP_, VIP6, 53)
    dest(m, 0, RS1, 53, "fnat")
    ring(fastpath, 0, [0])
    v, out = run(fastpath, c6(sport=43001, dport=53, proto="udp"))
    assert v == XDP_TX
    r = Ether(src=RS_MAC, dst=LB) / IP(src=RS1, dst=LIP) / UDP(sport=53, dport=out[UDP].sport, chksum=0) / b"x"
    assert run(fastpath, r)[0] == XDP_DROP
    assert m.counters()["drop_malformed_l4"] == 1


@pytest.mark.parametrize("df", [True, False])
def test_a_nat64_reply_too_big_for_ipv6_is_answered_or_dropped(fastpath, m, df):
    """An IPv4 reply grows by 20 bytes into IPv6: one that would no longer fit the client side's MTU left
    bigger than the link (dropped past the balancer, with no trace). With DF the server is told, as a router
    would tell it (fragmentation needed, MTU less 20, from the local address it sent to); without, it is dropped
    and counted. One that fits still goes."""
    service(fastpath, UDP_, VIP6, 53)
    dest(m, 0, RS1, 53, "fnat")
    ring(fastpath, 0, [0])
    m.set_laddrs(0, [(A(LIP), LO_IFINDEX)])
    m.set_iface(LO_IFINDEX, LB_MAC, 1500)
    v, out = run(fastpath, c6(sport=43002, dport=53, proto="udp"))
    assert v == XDP_TX
    lport = out[UDP].sport
    flags = "DF" if df else 0
    fits = Ether(src=RS_MAC, dst=LB) / IP(src=RS1, dst=LIP, flags=flags) / UDP(sport=53, dport=lport) / (b"a" * 1452)
    v, back = run(fastpath, fits)
    assert v == XDP_TX and back[IPv6].plen == 1460 and len(back[IPv6]) == 1500
    big = Ether(src=RS_MAC, dst=LB) / IP(src=RS1, dst=LIP, flags=flags) / UDP(sport=53, dport=lport) / (b"b" * 1472)
    before = m.counters()
    v, err = run(fastpath, big)
    after = m.counters()
    if df:
        assert v == XDP_TX and IPv6 not in err
        assert (err[IP].src, err[IP].dst, err[ICMP].type, err[ICMP].code, err[ICMP].nexthopmtu) == \
            (LIP, RS1, 3, 4, 1480)
        assert err[Ether].dst == RS_MAC
        assert bytes(err[ICMP].payload)[:28] == bytes(big[IP])[:28], "quotes the server's header and 8 bytes"
        assert checksum(bytes(err[IP])[:20]) == 0 and checksum(bytes(err[ICMP])) == 0
        assert after["icmp_too_big"] == before["icmp_too_big"] + 1
    else:
        assert v == XDP_DROP
        assert after["drop_too_big"] == before["drop_too_big"] + 1


# --- SNAT -----------------------------------------------------------------------------------------------------

SAPOOL, OUTSIDE, INSIDE = "10.0.0.254", "10.0.0.1", "192.168.100.2"


def _snat_setup(fastpath, m, proto=0, src=("192.168.100.2", "192.168.100.9"), sapool=SAPOOL):
    m.set_route(ipaddress.ip_network("10.0.0.0/24"), LO_IFINDEX, None, None, 1500, False)
    m.set_neigh(A(OUTSIDE), bytes.fromhex(GW_MAC.replace(":", "")), LO_IFINDEX, permanent=True)
    m.set_local(A(SAPOOL), 0x4, LO_IFINDEX)
    dest(m, 0, sapool, 0, "snat", svc_id=3)
    ring(fastpath, 3, [0])
    t = fastpath.table("snat_map")
    r = t.Leaf()
    r.svc_id, r.proto, r.flags = 3, proto, 1
    r.src_min, r.src_max = int(A(src[0])), int(A(src[1]))
    r.oif = LO_IFINDEX
    t[ct.c_uint32(0)] = r
    set_snat_count(fastpath, 1)


def inside(proto="tcp", src=INSIDE, sport=50000, **kw):
    l4 = {"tcp": TCP(sport=sport, dport=80, flags="S"), "udp": UDP(sport=sport, dport=53),
          "icmp": ICMP(type=8, id=sport, seq=1)}[proto]
    return Ether(src=RS_MAC, dst=LB) / IP(src=src, dst=OUTSIDE) / l4 / b"ping"


@pytest.mark.parametrize("proto", ["tcp", "udp", "icmp"])
def test_snat_sources_inside_hosts_from_the_sapool_and_translates_replies(fastpath, m, proto):
    _snat_setup(fastpath, m)
    v, out = run(fastpath, inside(proto))
    assert v == XDP_TX, VERDICTS[v]
    assert (out[IP].src, out[IP].dst, out[Ether].dst) == (SAPOOL, OUTSIDE, GW_MAC)
    checksums_ok(out)
    if proto == "icmp":
        new_id = out[ICMP].id
        r = IP(src=OUTSIDE, dst=SAPOOL) / ICMP(type=0, id=new_id, seq=1) / b"ping"
    elif proto == "tcp":
        new_id = out[TCP].sport
        assert out[TCP].dport == 80
        r = IP(src=OUTSIDE, dst=SAPOOL) / TCP(sport=80, dport=new_id, flags="SA")
    else:
        new_id = out[UDP].sport
        r = IP(src=OUTSIDE, dst=SAPOOL) / UDP(sport=53, dport=new_id) / b"answer"
    v, back = run(fastpath, Ether(src=GW_MAC, dst=LB) / r)
    assert v == XDP_TX
    assert (back[IP].src, back[IP].dst, back[Ether].dst) == (OUTSIDE, INSIDE, RS_MAC)
    if proto == "icmp":
        assert back[ICMP].id == 50000
    elif proto == "tcp":
        assert back[TCP].dport == 50000
    else:
        assert back[UDP].dport == 50000
    checksums_ok(back)


def test_snat_rules_match_only_what_they_say(fastpath, m):
    _snat_setup(fastpath, m, proto=UDP_)
    before = m.counters()
    v, out = run(fastpath, inside("tcp"))  # proto mismatch
    assert v == XDP_PASS and m.counters()["conn_new"] == before["conn_new"]
    v, out = run(fastpath, inside("udp", src="192.168.100.50"))  # outside src-range
    assert v == XDP_PASS
    v, out = run(fastpath, inside("udp"))
    assert v == XDP_TX and out[IP].src == SAPOOL
    set_snat_count(fastpath, 0)  # no rules in use: nothing is SNATed
    assert run(fastpath, inside("udp", sport=50001))[0] == XDP_PASS


def test_snat_source_from_route_when_the_real_server_is_any(fastpath, m):
    _snat_setup(fastpath, m, sapool="0.0.0.0")
    m.set_route(ipaddress.ip_network("10.0.0.0/24"), LO_IFINDEX, None, A(SAPOOL), 1500, False)
    v, out = run(fastpath, inside("udp"))
    assert v == XDP_TX and out[IP].src == SAPOOL


# --- hash schedulers and persistence --------------------------------------------------------------------------

DESTS = [sched.Dest(slot_id=i, weight=1, addr=a, port=80) for i, a in enumerate((RS1, RS2, RS3))]


@pytest.mark.parametrize("name,params", [("mh", {"size": 251}), ("sh", {}), ("sh", {"port": True}), ("dh", {}),
                                         ("conhash", {"size": 1024})])
def test_hash_schedulers_choose_what_the_python_table_predicts(fastpath, m, name, params):
    table = sched.build_table(name, DESTS, **params)
    service(fastpath, TCP_, VIP, 80)
    for d in DESTS:
        dest(m, d.slot_id, d.addr, 80, "fnat")
    hash_table(fastpath, 0, table, hoff=4000)
    slots = {i: d.addr for i, d in enumerate(DESTS)}
    seen = set()
    for i in range(24):
        client, sport = f"10.0.{i % 5}.{i + 1}", 40000 + 7 * i
        v, out = run(fastpath, c4(src=client, sport=sport))
        assert v == XDP_TX
        want = table.hash_pick(VIP if table.key == sched.KEY_DST else client, sport)
        assert out[IP].dst == slots[want], (name, client, sport)
        seen.add(out[IP].dst)
    if table.key != sched.KEY_DST:
        assert len(seen) > 1


def test_persistence_keeps_a_client_network_on_one_server(fastpath, m):
    service(fastpath, TCP_, VIP, 80, persist=60, plen=24)
    for i, a in enumerate((RS1, RS2)):
        dest(m, i, a, 80, "fnat")
    ring(fastpath, 0, [0, 1])
    first = run(fastpath, c4(src="10.0.0.1", sport=45000))[1][IP].dst
    got = {run(fastpath, c4(src=f"10.0.0.{1 + i % 3}", sport=45001 + i))[1][IP].dst for i in range(20)}
    assert got == {first}, "same /24, same server"
    assert m.counters()["persist_hit"] == 20
    # another /24 takes the next ring entry and then sticks to it
    other = {run(fastpath, c4(src="10.0.1.1", sport=46000 + i))[1][IP].dst for i in range(5)}
    assert len(other) == 1


def _persistent_pair(fastpath, m):
    """A -p 60 service on RS1 and RS2 and one client whose template names RS1; returns the template's key."""
    service(fastpath, TCP_, VIP, 80, persist=60, plen=32)
    dest(m, 0, RS1, 80, "fnat")
    dest(m, 1, RS2, 80, "fnat")
    ring(fastpath, 0, [0, 1])
    assert run(fastpath, c4(sport=45000))[1][IP].dst == RS1
    ((k, v),) = list(fastpath.table("persist_map").items())
    assert v.dest_slot == 0
    return k


def test_a_drained_server_keeps_its_persistent_clients_and_gets_no_new_ones(fastpath, m):
    """LVS's graceful drain of a sticky server (ipvsadm -e -w 0): its template still holds (ip_vs_check_template
    refuses only a server that is gone, or one of weight 0 under expire_quiescent_template), so the client's new
    connections go back to it and renew the template, while a client without a template is scheduled from the
    ring, which no longer holds it. (It used to be rescheduled off the drained server at its next connection.)"""
    k = _persistent_pair(fastpath, m)
    t = fastpath.table("persist_map")
    dest(m, 0, RS1, 80, "fnat", drain=True)  # weight 0: the daemon flags it and rebuilds the ring without it
    ring(fastpath, 0, [1])
    t_before = t[k].expires
    hits = m.counters()["persist_hit"]
    assert {run(fastpath, c4(sport=45001 + i))[1][IP].dst for i in range(3)} == {RS1}
    assert m.counters()["persist_hit"] == hits + 3
    assert t[k].dest_slot == 0 and t[k].expires >= t_before, "the template still names it, renewed"
    assert {run(fastpath, c4(src=f"10.0.2.{i}", sport=45100))[1][IP].dst for i in range(1, 4)} == {RS2}, \
        "new clients never go to the drained server"


@pytest.mark.parametrize("drain", [True, False])
def test_a_server_flagged_no_persist_loses_its_persistent_clients(fastpath, m, drain):
    """DEST_F_NO_PERSIST (down by its health check, a checker's weight 0, a drain under
    expire_quiescent_template): the client's next connection is scheduled afresh and its template follows the
    new server. The flag alone decides (the daemon sets it with DEST_F_DRAIN, but a template is judged by it)."""
    k = _persistent_pair(fastpath, m)
    dest(m, 0, RS1, 80, "fnat", drain=drain, no_persist=True)
    ring(fastpath, 0, [1])
    hits = m.counters()["persist_hit"]
    assert {run(fastpath, c4(sport=45001 + i))[1][IP].dst for i in range(3)} == {RS2}
    assert fastpath.table("persist_map")[k].dest_slot == 1, "the template follows the new server"
    assert m.counters()["persist_hit"] == hits + 2, "the first was scheduled, the next two followed the template"


@pytest.mark.parametrize("no_persist", [False, True])
def test_a_reused_port_syn_of_a_persistent_client_of_a_drained_server_follows_its_template(fastpath, m,
                                                                                           no_persist):
    """A SYN on a flow whose server was drained is scheduled afresh (conn_reusable), and for a persistent
    client afresh means through its template: back to the drained server, as LVS's expire_nodest_conn reschedule
    goes through ip_vs_sched_persist; to another server once the template is not honoured."""
    _persistent_pair(fastpath, m)
    run(fastpath, c4(sport=45000, flags="A"))  # established to RS1
    dest(m, 0, RS1, 80, "fnat", drain=True, no_persist=no_persist)
    ring(fastpath, 0, [1])
    conns = m.counters()["conn_new"]
    v, out = run(fastpath, c4(sport=45000))  # the client reuses its port
    assert v == XDP_TX and out[IP].dst == (RS2 if no_persist else RS1)
    c = m.counters()
    assert c["conn_reused"] == 1 and c["conn_new"] == conns + 1, "a new connection, not the old entry"
    assert m.conn_entries() == 2, "the old flow's entries are gone"


def test_persistence_template_expires(fastpath, m):
    service(fastpath, TCP_, VIP, 80, persist=1, plen=32)
    for i, a in enumerate((RS1, RS2)):
        dest(m, i, a, 80, "fnat")
    ring(fastpath, 0, [0, 1])
    run(fastpath, c4(sport=45000))
    t = fastpath.table("persist_map")
    ((k, v),) = list(t.items())
    v.expires = 1  # long past
    t[k] = v
    before = m.counters()["persist_hit"]
    run(fastpath, c4(sport=45001))
    assert m.counters()["persist_hit"] == before
    assert list(t.values())[0].expires > 1, "the expired template was replaced"


def _ring_gen(fp, svc_id, slots, gen):
    t = fp.table("sched_map")
    v = t.Leaf()
    v.len, v.gen, v.kind = len(slots), gen, SCHED_RING
    for i, s in enumerate(slots):
        v.slot[i] = s
    t[ct.c_uint32(svc_id)] = v


def test_a_rebuilt_ring_is_walked_from_its_start_on_every_cpu(fastpath, m):
    """lc/wlc rings are plans: their first entries go to the least loaded server until loads level. Every CPU
    must start a rebuilt table (a new gen) at its first entry, whatever its cursor had reached in the old one
    (it used to go on at cursor % len: an lc service whose idle server holds the plan's first entry sent the next
    connection to the busy one). A table rewritten with the same gen goes on where it was."""
    service(fastpath, TCP_, VIP, 80)
    dest(m, 0, RS1, 80, "fnat")
    dest(m, 1, RS2, 80, "fnat")
    cpus = sorted(os.sched_getaffinity(0))[:2]
    _ring_gen(fastpath, 0, [0, 1], gen=7)
    sport = iter(range(49000, 49100))
    pick = lambda: run(fastpath, c4(sport=next(sport)))[1][IP].dst  # noqa: E731
    for cpu in cpus:
        assert on_cpu(cpu, lambda: [pick() for _ in range(3)]) == [RS1, RS2, RS1]
    _ring_gen(fastpath, 0, [1, 1, 0, 1, 0], gen=8)  # RS2 idle: the plan's catch-up comes first
    for cpu in cpus:
        assert on_cpu(cpu, lambda: [pick() for _ in range(3)]) == [RS2, RS2, RS1], f"cpu {cpu}"
    _ring_gen(fastpath, 0, [1, 1, 0, 1, 0], gen=8)  # the same table written again (a restart adopting it)
    for cpu in cpus:
        assert on_cpu(cpu, lambda: [pick() for _ in range(3)]) == [RS2, RS1, RS2], f"cpu {cpu}"


def test_rr_and_wrr_rings_start_each_cpu_at_its_own_offset_lc_and_wlc_at_their_first_entry(fastpath, m):
    """After a rebuild every CPU used to start at entry 0, so N CPUs' first new flows all went to one server. rr
    and wrr tables (Table.spread, written by Maps.set_sched as SCHED_F_SPREAD) start CPU i at i * len // ncpus;
    lc/wlc plans (their first entries are the least loaded servers') and fo still start at entry 0 everywhere."""
    from hdslb.fastpath.loader import possible_cpus

    ncpus = possible_cpus()
    cpus = sorted(os.sched_getaffinity(0))[:2]
    assert len(cpus) == 2 and ncpus >= 2, "needs two CPUs"
    service(fastpath, TCP_, VIP, 80)
    for d in DESTS:
        dest(m, d.slot_id, d.addr, 80, "fnat")
    addr = {d.slot_id: d.addr for d in DESTS}
    sport = iter(range(49200, 49400))
    pick = lambda: run(fastpath, c4(sport=next(sport)))[1][IP].dst  # noqa: E731
    gen = 20
    loaded = [sched.Dest(slot_id=d.slot_id, weight=1 + d.slot_id, addr=d.addr, port=80, active=3 - d.slot_id)
              for d in DESTS]
    for name in ("rr", "wrr", "lc", "wlc", "fo"):
        table = sched.build_table(name, loaded)
        assert table.spread == (name in ("rr", "wrr")), name
        gen += 1
        m.set_sched(0, table.entries, gen, spread=table.spread)
        n = len(table.entries)
        first = {cpu: on_cpu(cpu, pick) for cpu in cpus}
        for cpu in cpus:
            start = cpu * n // ncpus if table.spread else 0
            assert first[cpu] == addr[table.entries[start]], (name, cpu, table.entries)
        if name == "rr":
            assert first[cpus[0]] != first[cpus[1]], "two CPUs, two different first servers"
        # then each CPU walks on from there, and a table written again with the same gen goes on too
        for cpu in cpus:
            start = cpu * n // ncpus if table.spread else 0
            assert on_cpu(cpu, pick) == addr[table.entries[(start + 1) % n]], (name, cpu)
    assert len(sched.build_table("fo", loaded).entries) == 1  # (one entry: nothing to spread)


# --- connection reuse (LVS conn_reuse_mode / expire_nodest_conn) --------------------------------------------------

def _two_dest_service(fastpath, m, fwd="fnat"):
    service(fastpath, TCP_, VIP, 80)
    dest(m, 0, RS1, 80, fwd)
    dest(m, 1, RS2, 80, fwd)
    ring(fastpath, 0, [0])


def test_retransmitted_syn_keeps_its_server(fastpath, m):
    _two_dest_service(fastpath, m)
    assert run(fastpath, c4(sport=48000))[1][IP].dst == RS1
    ring(fastpath, 0, [1])
    v, out = run(fastpath, c4(sport=48000))
    assert v == XDP_TX and out[IP].dst == RS1
    assert m.counters()["conn_reused"] == 0 and m.conn_entries() == 2


@pytest.mark.parametrize("fwd", ["fnat", "nat", "dr"])
def test_syn_on_a_finished_flow_is_scheduled_afresh(fastpath, m, fwd):
    _two_dest_service(fastpath, m, fwd)
    run(fastpath, c4(sport=48100))
    run(fastpath, c4(sport=48100, flags="A"))
    run(fastpath, c4(sport=48100, flags="FA"))  # client closes: FIN_WAIT
    ring(fastpath, 0, [1])
    v, out = run(fastpath, c4(sport=48100))  # the client reuses its port
    assert v == XDP_TX and m.counters()["conn_reused"] == 1
    if fwd != "dr":  # (DR leaves L3 alone; the entry count below shows the reschedule)
        assert out[IP].dst == RS2
    assert m.conn_entries() == (1 if fwd == "dr" else 2), "the old flow's entries are gone"


def test_syn_on_a_flow_to_a_drained_server_is_scheduled_afresh(fastpath, m):
    _two_dest_service(fastpath, m)
    run(fastpath, c4(sport=48200))
    run(fastpath, c4(sport=48200, flags="A"))  # established to RS1
    dest(m, 0, RS1, 80, "fnat", drain=True)
    ring(fastpath, 0, [1])
    v, out = run(fastpath, c4(sport=48200, flags="A"))
    assert v == XDP_TX and out[IP].dst == RS1, "established packets keep going to a drained server"
    v, out = run(fastpath, c4(sport=48200))
    assert v == XDP_TX and out[IP].dst == RS2 and m.counters()["conn_reused"] == 1


@pytest.mark.parametrize("fwd", ["fnat", "nat"])
def test_syn_after_the_real_server_reset_an_established_flow_is_scheduled_afresh(fastpath, m, fwd):
    """LVS reschedules a SYN on a flow in CLOSE whichever side reset it (conn_reuse_mode). The server's reset is
    seen by the reply entry only; the SYN used to read the inbound entry's state (ESTABLISHED), take it for a
    retransmission and send the client's new connection back to the server that had just reset it, on the old
    entry (no new connection counted, the old local port)."""
    _two_dest_service(fastpath, m, fwd)
    first = run(fastpath, c4(sport=48400))[1]
    run(fastpath, c4(sport=48400, flags="A"))  # established to RS1
    back = (RS1, LIP, 80, first[TCP].sport) if fwd == "fnat" else (RS1, CLIENT, 80, 48400)
    rst = Ether(src=RS_MAC, dst=LB) / IP(src=back[0], dst=back[1]) / TCP(sport=back[2], dport=back[3], flags="R")
    assert run(fastpath, rst)[0] == XDP_TX  # the server resets it (the client's side never says so)
    ring(fastpath, 0, [1])
    conns = m.counters()["conn_new"]
    v, out = run(fastpath, c4(sport=48400))  # the client reuses its port
    assert v == XDP_TX and out[IP].dst == RS2
    c = m.counters()
    assert c["conn_reused"] == 1 and c["conn_new"] == conns + 1
    assert m.conn_entries() == 2, "the old flow's entries are gone"


def test_syn_after_a_reset_of_an_established_flow_by_a_drained_server_is_scheduled_afresh(fastpath, m):
    _two_dest_service(fastpath, m)
    first = run(fastpath, c4(sport=48500))[1]
    run(fastpath, c4(sport=48500, flags="A"))
    rst = Ether(src=RS_MAC, dst=LB) / IP(src=RS1, dst=LIP) / TCP(sport=80, dport=first[TCP].sport, flags="R")
    run(fastpath, rst)
    dest(m, 0, RS1, 80, "fnat", drain=True)
    ring(fastpath, 0, [1])
    v, out = run(fastpath, c4(sport=48500))
    assert v == XDP_TX and out[IP].dst == RS2 and m.counters()["conn_reused"] == 1


def test_tunnel_answers_a_too_big_df_packet_with_fragmentation_needed(fastpath, m):
    _tunnel_setup(fastpath, m, mtu=1500)
    run(fastpath, c4(sport=40100))  # the flow exists (a SYN fits)
    big = Ether(src=CL_MAC, dst=LB) / IP(src=CLIENT, dst=VIP, flags="DF", id=77) / \
        TCP(sport=40100, dport=80, flags="A", seq=1001) / (b"z" * 1460)
    v, out = run(fastpath, big)
    assert VERDICTS[v] == "XDP_TX"
    assert (out[Ether].src, out[Ether].dst) == (LB, CL_MAC)
    ip = out[IP]
    assert (ip.src, ip.dst, ip.proto, ip.len) == (VIP, CLIENT, 1, 56)
    ic = out[ICMP]
    assert (ic.type, ic.code, ic.nexthopmtu) == (3, 4, 1480)
    assert bytes(ic.payload)[:28] == bytes(big[IP])[:28], "quotes the client's header and 8 bytes"
    checksums_ok(out)
    c = m.counters()
    assert c["icmp_too_big"] == 1 and c["drop_too_big"] == 0


def _tagged(pkt, vlans):
    """pkt's IP part in a frame with `vlans` 802.1Q tags (two: QinQ, 802.1ad outside)."""
    l3 = pkt[IP] if IP in pkt else pkt[IPv6]
    l2 = Ether(src=pkt[Ether].src, dst=pkt[Ether].dst, type=0x88A8 if vlans == 2 else 0x8100)
    for i in range(vlans):
        l2 = l2 / Dot1Q(vlan=10 + i, type=0x8100 if i + 1 < vlans else (0x0800 if IP in pkt else 0x86DD))
    return l2 / l3


@pytest.mark.parametrize("vlans", [1, 2])
@pytest.mark.parametrize("family", [4, 6])
def test_a_too_big_answer_goes_back_on_the_clients_vlan(fastpath, m, family, vlans):
    """The fragmentation needed (Packet Too Big) a tagged client gets for a packet too big for the tunnel goes back
    with its VLAN tags, as ARP and ND answers do: it left untagged, onto the native VLAN, and never reached the
    client (a path-MTU black hole for every client behind a tag)."""
    if family == 4:
        _tunnel_setup(fastpath, m, mtu=1500)
        run(fastpath, c4(sport=40110))
        big = Ether(src=CL_MAC, dst=LB) / IP(src=CLIENT, dst=VIP, flags="DF") / \
            TCP(sport=40110, dport=80, flags="A", seq=1001) / (b"z" * 1460)
    else:
        _tunnel6_setup(fastpath, m)
        run(fastpath, c6(sport=40110))
        big = c6(sport=40110, flags="A", payload=b"z" * 1440)
    pkt = _tagged(big, vlans)
    v, out = run(fastpath, pkt)
    assert VERDICTS[v] == "XDP_TX" and m.counters()["icmp_too_big"] == 1
    assert (out[Ether].src, out[Ether].dst, out[Ether].type) == (LB, CL_MAC, pkt[Ether].type)
    assert bytes(out)[12:14 + 4 * vlans] == bytes(pkt)[12:14 + 4 * vlans], "the client's tags, in its order"
    _, ref = run(fastpath, big)
    assert bytes(out)[14 + 4 * vlans:] == bytes(ref)[14:], "the error an untagged client gets"
    if family == 4:
        checksums_ok(out)


def test_last_seen_converts_to_the_daemons_clock(fastpath, m):
    """conn_val.last_seen is bpf_jiffies64(); Maps hands it out as CLOCK_MONOTONIC ns, as aging expects."""
    import time
    service(fastpath, TCP_, VIP, 80)
    dest(m, 0, RS1, 80, "fnat")
    ring(fastpath, 0, [0])
    t0 = time.monotonic_ns()
    run(fastpath, c4(sport=49000))
    seen = [c["last_seen_ns"] for c in m.conns()]
    assert len(seen) == 2
    for s in seen:  # within a tick or two of when the packet ran (a second of slack for a loaded machine)
        assert t0 - 1_000_000_000 < s < time.monotonic_ns() + 1_000_000_000, (t0, s)


def test_syn_after_a_reset_handshake_keeps_its_server_and_local_port(fastpath, m):
    """A reset during the handshake (e.g. the client answering a server's stale TIME_WAIT ACK) is followed by
    the client's retransmitted SYN: same connection attempt, so same server and same local port."""
    _two_dest_service(fastpath, m)
    first = run(fastpath, c4(sport=48300))[1]
    run(fastpath, c4(sport=48300, flags="R"))
    ring(fastpath, 0, [1])
    v, again = run(fastpath, c4(sport=48300))
    assert v == XDP_TX and (again[IP].dst, again[TCP].sport) == (first[IP].dst, first[TCP].sport)
    assert m.counters()["conn_reused"] == 0
