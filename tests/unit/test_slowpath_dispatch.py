"""The slow path end to end on crafted frames against a real Balancer: ARP, ICMP, ND, unresolved next hops."""

import ipaddress
import random

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr,
                                ICMPv6NDOptSrcLLAddr, ICMPv6PacketTooBig, IPv6)
from scapy.layers.l2 import ARP, Dot1Q, Ether

from hdslb.balancer import Balancer, Iface
from hdslb.slowpath import packets as P
from hdslb.slowpath.dispatch import Actions, SlowPath, local_entry, owned_on
from hdslb.slowpath.neigh import NeighTable, State

from .test_balancer import Recorder
from .test_slowpath_packets import assert_same

MAC0 = bytes.fromhex("020000000a00")  # eth0, client side
MAC1 = bytes.fromhex("020000000a01")  # eth1, real-server side
M0, M1 = P.mac_str(MAC0), P.mac_str(MAC1)
CLIENT = "52:54:00:00:00:c1"
RS2, RS3 = "52:54:00:00:00:02", "52:54:00:00:00:03"
GW = "52:54:00:00:00:01"
SVC = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}
A = ipaddress.ip_address


class Clock:
    def __init__(self):
        self.t = 5000.0

    def __call__(self):
        return self.t

    def advance(self, s):
        self.t += s


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def bal():
    ifaces = {"eth0": Iface("eth0", 2, MAC0, 1500), "eth1": Iface("eth1", 3, MAC1, 1500)}
    b = Balancer(Recorder(), ifaces)
    b.addr_add({"addr": "10.0.0.100", "prefixlen": 24, "ifname": "eth0"})
    b.addr_add({"addr": "2001:db8::100", "prefixlen": 64, "ifname": "eth0"})
    b.service_add(dict(SVC, sched="rr"))
    b.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80})
    b.dest_add({"svc": SVC, "addr": "192.168.100.3", "port": 80})
    b.laddr_add({"svc": SVC, "addr": "192.168.100.200", "ifname": "eth1"})
    b.route_add({"prefix": "192.168.100.0", "prefixlen": 24, "ifname": "eth1"})
    # a VIP the balancer answers ARP for itself, on every interface (own_vip, from a config file)
    b.service_add({"proto": "udp", "addr": "10.0.0.200", "port": 53, "sched": "rr", "own_vip": True})
    return b


@pytest.fixture
def sp(bal, clock):
    return SlowPath(bal, NeighTable(now=clock, unres_queue_length=128), now=clock, proactive=False)


def arp_req(tpa, spa="10.0.0.9", sha=CLIENT, dst="ff:ff:ff:ff:ff:ff"):
    return bytes(Ether(dst=dst, src=sha) / ARP(op=1, hwsrc=sha, psrc=spa, pdst=tpa))


def arp_rep(spa, sha, tpa, dst):
    return bytes(Ether(dst=dst, src=sha) / ARP(op=2, hwsrc=sha, psrc=spa, hwdst=dst, pdst=tpa))


def fnat_frame(dst="192.168.100.2", src="192.168.100.200", dport=80, payload=b"", v6=False):
    """What the fast path punts when the next hop has no MAC: rewritten, destination MAC zero."""
    l3 = (IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst, ttl=63)) / TCP(sport=40000, dport=dport) / payload
    return bytes(Ether(dst="00:00:00:00:00:00", src="00:00:00:00:00:00") / l3)


def only(act, counter=None):
    assert len(act.tx) == 1, act.tx
    if counter:
        assert act.counters[counter] == 1
    return act.tx[0]


# --- what is ours ---------------------------------------------------------------------------------
def test_local_entry_agrees_with_what_the_model_wrote(bal):
    last = {}
    for name, args in bal.dp.calls:
        if name == "local_set":
            last[args[0]] = (args[1], args[2])
        elif name == "local_del":
            last[args[0]] = (0, 0)
    assert last, "the fixture writes local entries"
    for addr, want in last.items():
        assert local_entry(bal, addr) == want, addr
    assert owned_on(bal, A("10.0.0.200"), "eth1") and owned_on(bal, A("10.0.0.200"), "eth0")
    assert owned_on(bal, A("192.168.100.200"), "eth1") and not owned_on(bal, A("192.168.100.200"), "eth0")
    assert not owned_on(bal, A("10.0.0.55"), "eth0")


# --- ARP ------------------------------------------------------------------------------------------
def test_arp_request_for_an_interface_address(sp):
    act = sp.handle("eth0", arp_req("10.0.0.100"))
    ifname, frame = only(act, "arp_reply")
    assert ifname == "eth0"
    assert_same(frame, Ether(dst=CLIENT, src=M0) / ARP(op=2, hwsrc=M0, psrc="10.0.0.100", hwdst=CLIENT,
                                                        pdst="10.0.0.9"))
    # the asker is learned, unconfirmed (STALE), and written to the fast path
    assert act.neigh_updates == [(A("10.0.0.9"), bytes.fromhex("5254000000c1"), "eth0", False)]
    assert sp.neigh.get("10.0.0.9").state is State.STALE
    assert act.counters["rx_arp_request"] == 1 and sp.counters["tx"] == 1


@pytest.mark.parametrize("ifname,tpa,answered", [
    ("eth1", "10.0.0.100", False),  # an eth0 address asked for on eth1: that side answers
    ("eth1", "192.168.100.200", True),  # FNAT local address on its interface
    ("eth0", "192.168.100.200", False),
    ("eth0", "10.0.0.200", True),  # own_vip: every interface
    ("eth1", "10.0.0.200", True),
    ("eth0", "10.0.0.55", False),  # nobody's
    ("eth0", "10.0.0.254", False),
])
def test_arp_answers_only_for_owned_addresses(sp, ifname, tpa, answered):
    act = sp.handle(ifname, arp_req(tpa))
    assert bool(act.tx) == answered
    if answered:
        assert Ether(act.tx[0][1])[ARP].psrc == tpa
    else:
        assert act.counters["unexpected"] == 1 and not act.neigh_updates


def test_arp_request_on_a_vlan_is_answered_on_the_vlan(sp):
    req = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=CLIENT) / Dot1Q(vlan=30) /
                ARP(op=1, hwsrc=CLIENT, psrc="10.0.0.9", pdst="10.0.0.100"))
    _, frame = only(sp.handle("eth0", req), "arp_reply")
    r = Ether(frame)
    assert r[Dot1Q].vlan == 30 and r[ARP].op == 2 and r[ARP].hwsrc == M0


def test_arp_probe_for_our_address_is_answered_but_not_learned(sp):
    act = sp.handle("eth0", arp_req("10.0.0.100", spa="0.0.0.0"))
    only(act, "arp_reply")
    assert not act.neigh_updates and len(sp.neigh) == 0


def test_someone_claiming_our_address_is_never_learned(sp):
    act = sp.handle("eth0", arp_rep("10.0.0.100", CLIENT, "10.0.0.9", M0))
    assert act.counters["addr_conflict"] == 1 and not act.neigh_updates and "10.0.0.100" not in sp.neigh


def test_our_own_frames_are_ignored(sp):
    act = sp.handle("eth0", arp_req("10.0.0.100", sha=M0))
    assert not act and act.counters["unexpected"] == 1


def test_unknown_interface_is_unexpected(sp):
    act = sp.handle("eth9", arp_req("10.0.0.100"))
    assert not act and act.counters["unexpected"] == 1


# --- unresolved next hops -------------------------------------------------------------------------
def test_unresolved_frame_is_queued_then_sent_when_the_reply_comes(sp):
    frame = fnat_frame(payload=b"GET / HTTP/1.0\r\n\r\n")
    act = sp.handle("eth0", frame)  # punted on the client side; egress is eth1
    assert act.counters["unres_queued"] == 1 and act.counters["rx_unresolved"] == 1
    ifname, probe = only(act, "arp_request")
    assert ifname == "eth1"
    # source: our address on that interface (the FNAT local address), asked of everyone
    assert_same(probe, Ether(dst="ff:ff:ff:ff:ff:ff", src=M1) /
                ARP(op=1, hwsrc=M1, psrc="192.168.100.200", hwdst="00:00:00:00:00:00", pdst="192.168.100.2"))

    act = sp.handle("eth1", arp_rep("192.168.100.2", RS2, "192.168.100.200", M1))
    assert act.neigh_updates == [(A("192.168.100.2"), bytes.fromhex("525400000002"), "eth1", False)]
    ifname, out = only(act, "unres_sent")
    assert ifname == "eth1" and out == bytes.fromhex("525400000002") + MAC1 + frame[12:]
    assert sp.neigh.get("192.168.100.2").state is State.REACHABLE

    # the next one goes at once (the fast path would normally have it by now)
    ifname, out = only(sp.handle("eth0", fnat_frame()), "nexthop_known")
    assert ifname == "eth1" and Ether(out).dst == RS2 and Ether(out).src == M1


def test_an_unresolved_frame_keeps_its_vlan_tags_as_the_fast_path_does(sp):
    """The fast path rewrites a flow's MACs and keeps its tags: a flow's first packet, punted while its next hop had no
    MAC, left the slow path untagged and the rest of the flow tagged, so on a tagged one-arm balancer the first SYN
    (or datagram) to a new real server was lost."""
    untagged = fnat_frame(payload=b"x")
    frame = untagged[:12] + bytes.fromhex("81000007") + untagged[12:]
    assert only(sp.handle("eth0", frame), "arp_request")[0] == "eth1"
    act = sp.handle("eth1", arp_rep("192.168.100.2", RS2, "192.168.100.200", M1))
    ifname, out = only(act, "unres_sent")
    assert ifname == "eth1" and out == bytes.fromhex("525400000002") + MAC1 + frame[12:]
    ifname, out = only(sp.handle("eth0", frame), "nexthop_known")
    assert out == bytes.fromhex("525400000002") + MAC1 + frame[12:] and Ether(out)[Dot1Q].vlan == 7


def test_unresolved_via_a_gateway_asks_for_the_gateway(sp, bal):
    bal.route_add({"prefix": "0.0.0.0", "prefixlen": 0, "ifname": "eth0", "via": "10.0.0.1"})
    _, probe = only(sp.handle("eth0", fnat_frame(dst="203.0.113.5", src="10.0.0.100")), "arp_request")
    a = Ether(probe)[ARP]
    assert (a.pdst, a.psrc) == ("10.0.0.1", "10.0.0.100")
    act = sp.handle("eth0", arp_rep("10.0.0.1", GW, "10.0.0.100", M0))
    _, out = only(act, "unres_sent")
    assert Ether(out).dst == GW and Ether(out)[IP].dst == "203.0.113.5"


def test_probe_source_falls_back_to_route_src_then_unspecified(bal, sp):
    bal.route_add({"prefix": "172.16.0.0", "prefixlen": 16, "ifname": "eth1", "src": "192.168.100.200"})
    assert sp.probe_source(A("172.16.1.1"), "eth1") == A("192.168.100.200")
    bal.laddr_del({"svc": SVC, "addr": "192.168.100.200"})
    assert sp.probe_source(A("172.16.1.1"), "eth1") == A("192.168.100.200")  # the route's src
    assert sp.probe_source(A("192.168.100.9"), "eth1") == A("0.0.0.0")
    assert sp.probe_source(A("10.0.0.9"), "eth0") == A("10.0.0.100")


def test_no_route_is_counted_and_dropped(sp):
    act = sp.handle("eth0", fnat_frame(dst="203.0.113.5"))
    assert not act and act.counters["no_route"] == 1


def test_unresolved_frame_to_ourselves_is_not_looped(sp):
    act = sp.handle("eth0", fnat_frame(dst="10.0.0.100"))
    assert not act and act.counters["unexpected"] == 1


def test_unresolved_queue_bound_and_flush_order(bal, clock):
    sp = SlowPath(bal, NeighTable(now=clock, unres_queue_length=3), now=clock, proactive=False)
    frames = [fnat_frame(dport=1000 + i) for i in range(5)]
    probes = 0
    for f in frames:
        probes += sp.handle("eth0", f).counters["arp_request"]
    assert probes == 1, "one probe per next hop, not per frame"
    assert sp.counters["unres_queued"] == 3 and sp.counters["unres_dropped"] == 2
    act = sp.handle("eth1", arp_rep("192.168.100.2", RS2, "192.168.100.200", M1))
    assert [Ether(f)[TCP].dport for _, f in act.tx] == [1000, 1001, 1002]
    assert sp.counters["unres_sent"] == 3


def test_resolution_failure_drops_the_queue(sp, clock):
    for i in range(4):
        sp.handle("eth0", fnat_frame(dport=2000 + i))
    arps = []
    for _ in range(3):
        clock.advance(1)
        act = sp.tick()
        arps += act.tx
    assert len(arps) == 2 and act.counters["unres_dropped"] == 4
    assert sp.counters["arp_request"] == 3
    # a frame during the hold-down is dropped without a new burst of ARP
    act = sp.handle("eth0", fnat_frame())
    assert not act.tx and act.counters["unres_dropped"] == 1


def test_ipv6_unresolved_uses_multicast_ns_then_na(sp):
    frame = fnat_frame(dst="2001:db8::5", src="2001:db8::100", v6=True)
    ifname, ns = only(sp.handle("eth0", frame), "nd_ns")
    n = Ether(ns)
    assert (ifname, n.dst, n[IPv6].dst, n[IPv6].src, n[IPv6].hlim) == (
        "eth0", "33:33:ff:00:00:05", "ff02::1:ff00:5", "2001:db8::100", 255)
    assert n[ICMPv6ND_NS].tgt == "2001:db8::5" and n[ICMPv6NDOptSrcLLAddr].lladdr == M0
    na = bytes(Ether(dst=M0, src=RS2) / IPv6(src="2001:db8::5", dst="2001:db8::100", hlim=255) /
               ICMPv6ND_NA(S=1, O=1, tgt="2001:db8::5") / ICMPv6NDOptDstLLAddr(lladdr=RS2))
    act = sp.handle("eth0", na)
    assert act.neigh_updates == [(A("2001:db8::5"), bytes.fromhex("525400000002"), "eth0", False)]
    _, out = only(act, "unres_sent")
    assert out == bytes.fromhex("525400000002") + MAC0 + frame[12:]
    assert sp.neigh.get("2001:db8::5").state is State.REACHABLE


def test_ipv6_next_hop_with_no_address_of_ours_there_is_solicited_from_the_link_local(sp, bal, clock):
    """No IPv6 address of ours on eth1 (a DR/TUNNEL server, or a v6 VIP from a config file): the solicitation
    comes from eth1's link-local address with our link-layer address, as Linux's ndisc_solicit sends it. From ::
    it was a duplicate-address probe: the server answered to all nodes without the Solicited flag (never
    REACHABLE), and the unicast re-probe from :: is invalid (RFC 4861 7.1.1), so the entry went FAILED again and
    again while new flows were dropped."""
    bal.route_add({"prefix": "2001:db8:1::", "prefixlen": 64, "ifname": "eth1"})
    lla = "fe80::ff:fe00:a01"  # MAC1 02:00:00:00:0a:01 as modified EUI-64
    assert sp.probe_source(A("2001:db8:1::5"), "eth1") == A(lla)
    frame = fnat_frame(dst="2001:db8:1::5", src="2001:db8::9", v6=True)
    ifname, ns = only(sp.handle("eth0", frame), "nd_ns")
    n = Ether(ns)
    assert (ifname, n[IPv6].src, n[IPv6].dst) == ("eth1", lla, "ff02::1:ff00:5")
    assert n[ICMPv6ND_NS].tgt == "2001:db8:1::5" and n[ICMPv6NDOptSrcLLAddr].lladdr == M1
    # the server answers the link-local address at our MAC (the kernel's; the NA listener hands it over)
    na = bytes(Ether(dst=M1, src=RS2) / IPv6(src="2001:db8:1::5", dst=lla, hlim=255) /
               ICMPv6ND_NA(S=1, O=1, tgt="2001:db8:1::5") / ICMPv6NDOptDstLLAddr(lladdr=RS2))
    act = sp.handle("eth1", na)
    _, out = only(act, "unres_sent")
    assert out == bytes.fromhex("525400000002") + MAC1 + frame[12:]
    assert sp.neigh.get("2001:db8:1::5").state is State.REACHABLE
    # re-confirmed later by a unicast solicitation, still from the link-local address (never from ::)
    clock.advance(3600)
    probes = [Ether(f) for _, f in sp.tick().tx + sp.handle("eth0", frame).tx if Ether(f).haslayer(ICMPv6ND_NS)]
    assert probes and all(p[IPv6].src == lla and p.haslayer(ICMPv6NDOptSrcLLAddr) for p in probes)


# --- learning and static neighbours ---------------------------------------------------------------
def test_arp_heard_on_the_client_side_never_moves_a_real_server(sp):
    """A host on the client side (eth0) asking for the VIP "from" a real server's address, or answering for it:
    the server's entry on eth1 is not touched (Linux's tables are per interface). It was moved to eth0 at that
    host's MAC: in the lab, 10 such requests a second failed 7 of 20 requests to the VIP."""
    sp.handle("eth0", fnat_frame())
    sp.handle("eth1", arp_rep("192.168.100.2", RS2, "192.168.100.200", M1))
    act = sp.handle("eth0", arp_req("10.0.0.100", spa="192.168.100.2", sha=CLIENT))
    _, reply = only(act, "arp_reply")  # the request is still answered, to its sender
    assert Ether(reply).dst == CLIENT and not act.neigh_updates and act.counters["neigh_other_iface"] == 1
    act = sp.handle("eth0", arp_rep("192.168.100.2", CLIENT, "10.0.0.100", M0))
    assert not act.tx and not act.neigh_updates and act.counters["neigh_other_iface"] == 1
    e = sp.neigh.get("192.168.100.2")
    assert (e.ifname, P.mac_str(e.mac), e.state) == ("eth1", RS2, State.REACHABLE)
    # what eth1 itself hears still moves it (a server replaced)
    act = sp.handle("eth1", arp_req("192.168.100.200", spa="192.168.100.2", sha=RS3))
    assert act.neigh_updates == [(A("192.168.100.2"), bytes.fromhex("525400000003"), "eth1", False)]


def test_gratuitous_arp_moves_a_known_server_to_its_new_mac(sp):
    sp.handle("eth0", fnat_frame())  # we ask for the server ...
    sp.handle("eth1", arp_rep("192.168.100.2", RS2, "192.168.100.200", M1))  # ... and it answers
    new = "52:54:00:00:99:02"
    garp = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=new) /
                 ARP(op=1, hwsrc=new, psrc="192.168.100.2", pdst="192.168.100.2"))
    act = sp.handle("eth1", garp)
    assert act.neigh_updates == [(A("192.168.100.2"), bytes.fromhex("525400009902"), "eth1", False)]
    assert not act.tx
    act = sp.handle("eth0", fnat_frame())
    assert act.counters["nexthop_known"] == 1
    assert {Ether(f).dst for _, f in act.tx} == {new}, "data and the unicast re-probe both go to the new MAC"
    assert act.counters["arp_request"] == 1  # a MAC only heard of in a broadcast is confirmed on use


def test_gratuitous_arp_from_a_stranger_creates_nothing(sp):
    garp = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=CLIENT) /
                 ARP(op=1, hwsrc=CLIENT, psrc="10.0.0.77", pdst="10.0.0.77"))
    act = sp.handle("eth0", garp)
    assert not act and "10.0.0.77" not in sp.neigh


def test_an_arp_reply_we_never_asked_for_creates_nothing(sp):
    stranger = "66:66:66:66:66:66"
    for dst, tpa in ((M0, "10.0.0.100"), ("ff:ff:ff:ff:ff:ff", "10.0.0.77")):  # unicast to us, broadcast
        act = sp.handle("eth0", arp_rep("10.0.0.77", stranger, tpa, dst))
        assert not act.neigh_updates and "10.0.0.77" not in sp.neigh
    assert sp.counters["neigh_unsolicited"] == 2
    sp.handle("eth0", arp_req("10.0.0.100", spa="10.0.0.77", sha=stranger))  # it talks to us first: learned
    act = sp.handle("eth0", arp_rep("10.0.0.77", stranger, "10.0.0.100", M0))
    assert sp.neigh.get("10.0.0.77").state is State.REACHABLE and sp.counters["neigh_unsolicited"] == 2


def test_a_solicited_na_we_never_solicited_creates_nothing(sp):
    def na(tgt):
        return bytes(Ether(dst=M0, src="66:66:66:66:66:66") / IPv6(src=tgt, dst="2001:db8::100", hlim=255) /
                     ICMPv6ND_NA(tgt=tgt, S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr="66:66:66:66:66:66"))

    act = sp.handle("eth0", na("2001:db8::77"))
    assert not act.neigh_updates and "2001:db8::77" not in sp.neigh and act.counters["neigh_unsolicited"] == 1
    sp.neigh.resolve(A("2001:db8::78"), "eth0")  # one we did solicit
    act = sp.handle("eth0", na("2001:db8::78"))
    assert act.neigh_updates == [(A("2001:db8::78"), bytes.fromhex("666666666666"), "eth0", False)]
    assert sp.neigh.get("2001:db8::78").state is State.REACHABLE


def test_broadcast_reply_is_learned_unconfirmed(sp):
    sp.handle("eth0", fnat_frame())
    sp.handle("eth1", arp_rep("192.168.100.2", RS2, "192.168.100.200", "ff:ff:ff:ff:ff:ff"))
    assert sp.neigh.get("192.168.100.2").state is State.STALE


def test_static_neighbour_wins_and_follows_the_model(sp, bal):
    bal.neigh_add({"addr": "192.168.100.3", "lladdr": RS3, "ifname": "eth1"})
    _, out = only(sp.handle("eth0", fnat_frame(dst="192.168.100.3")), "nexthop_known")
    assert Ether(out).dst == RS3
    act = sp.handle("eth1", arp_rep("192.168.100.3", "52:54:00:de:ad:00", "192.168.100.200", M1))
    assert not act.neigh_updates and sp.neigh.get("192.168.100.3").mac == bytes.fromhex("525400000003")
    assert sp.show(ifname="eth1")[0]["flags"] == ["static"]
    bal.neigh_del({"addr": "192.168.100.3"})
    act = sp.handle("eth0", fnat_frame(dst="192.168.100.3"))
    assert not act.neigh_deletes, "the model deleted its own map entry"
    assert act.counters["arp_request"] == 1 and act.counters["unres_queued"] == 1


def test_neigh_show_lists_a_static_neighbour_as_soon_as_it_is_added_or_changed(sp, bal):
    """`dpip neigh add ...; dpip neigh show` listed nothing (the slow path's table mirrors the model's static
    entries on its next frame or tick, up to 0.25 s later), and after `neigh del` + `neigh add` with a new MAC it
    listed the old MAC: a script checking its change read the wrong answer. neigh.list mirrors them first."""
    from types import SimpleNamespace

    from hdslb.ctl import commands

    carried = []
    ctx = SimpleNamespace(bal=bal, slow=SimpleNamespace(sp=sp, carry_out=carried.append))

    def listed():
        return [(n["addr"], n["lladdr"], n["flags"]) for n in commands.COMMANDS["neigh.list"](ctx, {})["neighs"]]

    bal.neigh_add({"addr": "192.168.100.3", "lladdr": RS3, "ifname": "eth1"})
    assert listed() == [("192.168.100.3", RS3, ["static"])]
    bal.neigh_del({"addr": "192.168.100.3"})
    bal.neigh_add({"addr": "192.168.100.3", "lladdr": RS2, "ifname": "eth1"})
    assert listed() == [("192.168.100.3", RS2, ["static"])]
    bal.neigh_del({"addr": "192.168.100.3"})
    assert listed() == [] and carried


def test_proactive_tick_resolves_every_real_server(bal, clock):
    sp = SlowPath(bal, NeighTable(now=clock), now=clock)
    act = sp.tick()
    targets = sorted(Ether(f)[ARP].pdst for _, f in act.tx)
    assert targets == ["192.168.100.2", "192.168.100.3"] and all(i == "eth1" for i, _ in act.tx)
    assert not sp.tick().tx, "one probe a second, not one a tick"
    for ip, mac in (("192.168.100.2", RS2), ("192.168.100.3", RS3)):
        sp.handle("eth1", arp_rep(ip, mac, "192.168.100.200", M1))
    clock.advance(60)
    act = sp.tick()  # aged to STALE and wanted: re-probed unicast
    assert sorted((Ether(f).dst, Ether(f)[ARP].pdst) for _, f in act.tx) == [
        (RS2, "192.168.100.2"), (RS3, "192.168.100.3")]


def test_proactive_failure_deletes_the_map_entry(bal, clock):
    sp = SlowPath(bal, NeighTable(now=clock), now=clock)
    sp.tick()  # probes every real server's next hop
    sp.handle("eth1", arp_rep("192.168.100.2", RS2, "192.168.100.200", M1))
    clock.advance(60)
    deletes = []
    for _ in range(4):
        deletes += sp.tick().neigh_deletes
        clock.advance(1)
    assert deletes == [(A("192.168.100.2"), "eth1")]


# --- ICMP / ICMPv6 / ND ---------------------------------------------------------------------------
def ping(dst, src="198.51.100.9", **kw):
    return bytes(Ether(dst=M0, src=CLIENT) / IP(src=src, dst=dst, ttl=50) / ICMP(type=8, id=3, seq=4, **kw) / b"abc")


def test_echo_to_an_owned_address_is_answered(sp):
    ifname, rep = only(sp.handle("eth0", ping("10.0.0.100")), "icmp_echo_reply")
    r = Ether(rep)
    assert ifname == "eth0" and (r.dst, r.src) == (CLIENT, M0)
    assert (r[IP].src, r[IP].dst, r[IP].ttl, r[ICMP].type, r[ICMP].id, r[ICMP].seq) == (
        "10.0.0.100", "198.51.100.9", 64, 0, 3, 4)
    assert bytes(r[ICMP].payload) == b"abc"


def test_echo_ttl_comes_from_the_slow_path(bal, clock):
    sp = SlowPath(bal, NeighTable(now=clock), now=clock, ttl=128, proactive=False)
    _, rep = only(sp.handle("eth0", ping("10.0.0.200")))
    assert Ether(rep)[IP].ttl == 128


@pytest.mark.parametrize("frame,counter", [
    (ping("10.0.0.55"), "unexpected"),  # not ours
    (ping("10.0.0.100", src="224.0.0.1"), "unexpected"),
    (bytes(Ether(dst=M0, src=CLIENT) / IP(src="1.2.3.4", dst="10.0.0.100") / UDP(dport=9)), "unexpected"),
    (bytes(Ether(dst=M0, src=CLIENT) / IP(src="1.2.3.4", dst="10.0.0.100") / ICMP(type=0)), "unexpected"),
    (bytes(Ether(dst=M0, src=CLIENT) / IP(src="1.2.3.4", dst="10.0.0.100") / ICMP(type=8, chksum=1)), "malformed"),
    (bytes(Ether(dst=M0, src=CLIENT) / IP(src="1.2.3.4", dst="10.0.0.100", chksum=1) / ICMP()), "malformed"),
    (bytes(Ether(dst=M0, src=CLIENT, type=0x88CC) / (b"lldp" * 10)), "unexpected"),
])
def test_icmp_not_ours(sp, frame, counter):
    act = sp.handle("eth0", frame)
    assert not act and act.counters[counter] == 1


def test_icmp6_echo_is_answered(sp):
    req = bytes(Ether(dst=M0, src=CLIENT) / IPv6(src="2001:db8::9", dst="2001:db8::100") /
                ICMPv6EchoRequest(id=1, seq=2, data=b"q"))
    _, rep = only(sp.handle("eth0", req), "icmp_echo_reply")
    r = Ether(rep)
    assert r[IPv6].src == "2001:db8::100" and r[IPv6].dst == "2001:db8::9" and ICMPv6EchoReply in r
    other = bytes(Ether(dst=M0, src=CLIENT) / IPv6(src="2001:db8::9", dst="2001:db8::55") / ICMPv6EchoRequest())
    assert sp.handle("eth0", other).counters["unexpected"] == 1


def ns(target, src="2001:db8::9", dst=None, lladdr=CLIENT, hlim=255):
    dst = dst or str(P.solicited_node(target))
    pkt = (Ether(dst=P.mac_str(P.mcast_mac(dst)), src=CLIENT) / IPv6(src=src, dst=dst, hlim=hlim) /
           ICMPv6ND_NS(tgt=target))
    if lladdr:
        pkt = pkt / ICMPv6NDOptSrcLLAddr(lladdr=lladdr)
    return bytes(pkt)


def test_ns_for_an_owned_address_gets_an_na_and_teaches_us_the_asker(sp):
    act = sp.handle("eth0", ns("2001:db8::100"))
    ifname, na = only(act, "nd_na")
    assert na == P.nd_na(MAC0, "2001:db8::100", "2001:db8::9", bytes.fromhex("5254000000c1"))
    r = Ether(na)
    assert (r[ICMPv6ND_NA].S, r[ICMPv6ND_NA].O, r[ICMPv6ND_NA].R) == (1, 1, 0)
    assert act.neigh_updates == [(A("2001:db8::9"), bytes.fromhex("5254000000c1"), "eth0", False)]


def test_dad_ns_for_our_address_is_defended_to_all_nodes(sp):
    act = sp.handle("eth0", ns("2001:db8::100", src="::", lladdr=None))
    _, na = only(act, "nd_na")
    r = Ether(na)
    assert r[IPv6].dst == "ff02::1" and r.dst == "33:33:00:00:00:01" and r[ICMPv6ND_NA].S == 0
    assert not act.neigh_updates


@pytest.mark.parametrize("frame,counter", [
    (ns("2001:db8::55"), "unexpected"),  # not ours
    (ns("2001:db8::100", hlim=64), "malformed"),  # forwarded by a router: invalid ND
    (ns("2001:db8::100", src="::"), "malformed"),  # DAD with a source link-layer option
])
def test_ns_refused(sp, frame, counter):
    act = sp.handle("eth0", frame)
    assert not act.tx and act.counters[counter] == 1


def test_unsolicited_na_only_updates_known_neighbours(sp):
    def na(mac, s=0):
        return bytes(Ether(dst="33:33:00:00:00:01", src=mac) / IPv6(src="2001:db8::5", dst="ff02::1", hlim=255) /
                     ICMPv6ND_NA(S=s, O=1, tgt="2001:db8::5") / ICMPv6NDOptDstLLAddr(lladdr=mac))

    assert not sp.handle("eth0", na(RS2)).neigh_updates and "2001:db8::5" not in sp.neigh
    sp.neigh.learn(A("2001:db8::5"), bytes.fromhex("525400000002"), "eth0", confirmed=True)
    act = sp.handle("eth0", na(RS3))
    assert act.neigh_updates == [(A("2001:db8::5"), bytes.fromhex("525400000003"), "eth0", False)]
    assert sp.handle("eth0", na(RS3, s=1)).counters["malformed"] == 1  # solicited to a multicast group


def test_icmp_frag_needed_is_handed_over_for_translation(sp):
    inner = bytes(IP(src="192.168.100.200", dst="192.168.100.2") / TCP(sport=40000, dport=80))[:28]
    frame = bytes(Ether(dst=M1, src=RS2) / IP(src="192.168.100.1", dst="192.168.100.200") /
                  ICMP(type=3, code=4, nexthopmtu=1400) / inner)
    act = sp.handle("eth1", frame)
    assert act.counters["icmp_error"] == 1 and not act.tx
    (ifname, err), = act.icmp_errors
    assert ifname == "eth1" and err.mtu == 1400 and (err.inner_sport, err.inner_dport) == (40000, 80)
    v6 = bytes(Ether(dst=M0, src=CLIENT) / IPv6(src="2001:db8::1", dst="2001:db8::100") /
               ICMPv6PacketTooBig(mtu=1280) / bytes(IPv6(src="2001:db8::100", dst="2001:db8::9") / UDP())[:48])
    (_, err6), = sp.handle("eth0", v6).icmp_errors
    assert err6.af == 6 and err6.mtu == 1280


def test_an_icmp_error_on_a_vlan_is_handed_over_with_its_tags(sp):
    """The translated error leaves with them (SlowPathRunner), as the flow's own packets keep theirs."""
    inner = bytes(IP(src="192.168.100.200", dst="192.168.100.2") / TCP(sport=40000, dport=80))[:28]
    frame = bytes(Ether(dst=M1, src=RS2) / Dot1Q(vlan=7) / IP(src="192.168.100.1", dst="192.168.100.200") /
                  ICMP(type=3, code=4, nexthopmtu=1400) / inner)
    (_, err), = sp.handle("eth1", frame).icmp_errors
    assert err.tags == bytes.fromhex("81000007") and err.mtu == 1400
    v6 = bytes(Ether(dst=M0, src=CLIENT) / Dot1Q(vlan=9) / IPv6(src="2001:db8::1", dst="2001:db8::100") /
               ICMPv6PacketTooBig(mtu=1280) / bytes(IPv6(src="2001:db8::100", dst="2001:db8::9") / UDP())[:48])
    (_, err6), = sp.handle("eth0", v6).icmp_errors
    assert err6.tags == bytes.fromhex("81000009") and err6.to_local


# --- announce -------------------------------------------------------------------------------------
def test_announce(sp):
    ifname, f = only(sp.announce("10.0.0.200", "eth1"), "announce")
    assert ifname == "eth1" and f == P.gratuitous_arp(MAC1, "10.0.0.200")
    _, f = only(sp.announce(A("2001:db8::100"), "eth0"))
    assert f == P.unsolicited_na(MAC0, "2001:db8::100")
    assert not sp.announce("10.0.0.200", "eth9") and not sp.announce("nonsense", "eth0")


# --- Actions --------------------------------------------------------------------------------------
def test_actions_keep_one_op_per_address():
    a, ip = Actions(), A("10.0.0.1")
    a.neigh_set(ip, b"\1" * 6, "eth0")
    a.neigh_del(ip, "eth0")
    assert a.neigh_updates == [] and a.neigh_deletes == [(ip, "eth0")]
    b = Actions()
    b.neigh_set(ip, b"\2" * 6, "eth1")
    a.extend(b)
    assert a.neigh_deletes == [] and a.neigh_updates == [(ip, b"\2" * 6, "eth1", False)]
    a.tx += [("eth0", b"x"), ("eth1", b"y"), ("eth0", b"z")]
    assert a.by_iface() == {"eth0": [b"x", b"z"], "eth1": [b"y"]}


def test_handle_batch_merges(sp):
    act = sp.handle_batch("eth0", [arp_req("10.0.0.100"), ping("10.0.0.100"), b"junk"])
    assert len(act.tx) == 2 and act.counters["malformed"] == 1 and sp.counters["rx"] == 3


# --- robustness: no frame makes it raise ----------------------------------------------------------
SAMPLES = [
    ("eth0", arp_req("10.0.0.100")),
    ("eth1", arp_rep("192.168.100.2", RS2, "192.168.100.200", M1)),
    ("eth0", bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=CLIENT) / Dot1Q(vlan=3) /
                   ARP(op=1, hwsrc=CLIENT, psrc="10.0.0.9", pdst="10.0.0.100"))),
    ("eth0", ping("10.0.0.100")),
    ("eth0", fnat_frame(payload=b"x" * 20)),
    ("eth0", fnat_frame(dst="2001:db8::5", src="2001:db8::100", v6=True)),
    ("eth0", ns("2001:db8::100")),
    ("eth0", bytes(Ether(dst=M0, src=RS2) / IPv6(src="2001:db8::5", dst="2001:db8::100", hlim=255) /
                   ICMPv6ND_NA(S=1, O=1, tgt="2001:db8::5") / ICMPv6NDOptDstLLAddr(lladdr=RS2))),
    ("eth0", bytes(Ether(dst=M0, src=CLIENT) / IPv6(src="2001:db8::9", dst="2001:db8::100") /
                   ICMPv6EchoRequest(data=b"abcdef"))),
    ("eth1", bytes(Ether(dst=M1, src=RS2) / IP(src="192.168.100.1", dst="192.168.100.200") /
                   ICMP(type=3, code=4, nexthopmtu=1400) /
                   bytes(IP(src="192.168.100.200", dst="192.168.100.2") / TCP())[:28])),
]


@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_every_truncation_never_raises(sp, i):
    ifname, frame = SAMPLES[i]
    for n in range(len(frame)):
        act = sp.handle(ifname, frame[:n])
        assert not act.tx or act.counters["arp_request"] + act.counters["nd_ns"] == len(act.tx), \
            f"a truncated frame ({n} bytes) was answered"
    assert sp.counters["error"] == 0
    assert sp.counters["malformed"] > 0


def test_random_garbage_and_bit_flips_never_raise(sp):
    rnd = random.Random(7)
    for _ in range(500):
        sp.handle(rnd.choice(["eth0", "eth1"]), rnd.randbytes(rnd.randrange(0, 100)))
    for ifname, frame in SAMPLES:
        for _ in range(300):
            b = bytearray(frame)
            for _ in range(rnd.randrange(1, 4)):
                b[rnd.randrange(len(b))] = rnd.randrange(256)
            sp.handle(ifname, bytes(b))
    sp.tick()
    assert sp.counters["error"] == 0


def test_unresolved_frame_carrying_our_source_mac_is_not_mistaken_for_a_loop(sp):
    """The fast path punts with the egress interface's MAC as source; one-arm, that is the ingress interface's."""
    frame = bytes(Ether(dst="00:00:00:00:00:00", src=M1, type=0x0800)) + fnat_frame()[14:]
    act = sp.handle("eth1", frame)
    assert act.counters["rx_unresolved"] == 1 and act.counters["unres_queued"] == 1
    assert act.counters.get("unexpected", 0) == 0


# Found in a netns lab: echo requests from 127.0.0.1, from the VIP itself and from 0.0.0.8 were answered (a reply
# to loopback or to ourselves sent onto the wire), and an ARP request from 255.255.255.255 got a reply addressed
# to it. Linux drops these martian sources before answering anything.
@pytest.mark.parametrize("src", ["127.0.0.1", "10.0.0.100", "192.168.100.200", "0.1.2.3", "255.255.255.255",
                                 "224.0.0.1"])
def test_echo_from_a_martian_source_is_not_answered(sp, src):
    act = sp.handle("eth0", ping("10.0.0.100", src=src))
    assert not act.tx and act.counters["unexpected"] == 1 and act.counters["icmp_echo_reply"] == 0


@pytest.mark.parametrize("src", ["::1", "2001:db8::100", "::ffff:1.2.3.4", "ff02::1"])
def test_icmp6_echo_from_a_martian_source_is_not_answered(sp, src):
    req = bytes(Ether(dst=M0, src=CLIENT) / IPv6(src=src, dst="2001:db8::100") / ICMPv6EchoRequest(id=1, seq=2))
    act = sp.handle("eth0", req)
    assert not act.tx and act.counters["unexpected"] == 1


@pytest.mark.parametrize("spa", ["127.0.0.1", "255.255.255.255", "224.0.0.5", "0.1.2.3"])
def test_arp_request_from_a_martian_sender_is_not_answered(sp, spa):
    act = sp.handle("eth0", arp_req("10.0.0.100", spa=spa))
    assert not act.tx and not act.neigh_updates


def test_arp_probe_and_a_conflicting_claim_are_still_answered(sp):
    assert sp.handle("eth0", arp_req("10.0.0.100", spa="0.0.0.0")).tx
    act = sp.handle("eth0", arp_req("10.0.0.100", spa="10.0.0.100"))
    assert act.tx and act.counters["addr_conflict"] == 1


def test_an_address_conflict_is_logged_naming_the_mac_once_a_minute(sp, clock, caplog):
    """Found in a lab: a host sending gratuitous ARP for the VIP only moved the addr_conflict counter; nothing told
    the operator which box took the VIP."""
    import logging

    caplog.set_level(logging.WARNING, logger="hdslb.slowpath")
    for _ in range(3):
        sp.handle("eth0", arp_req("10.0.0.100", spa="10.0.0.100"))
    lines = [r.getMessage() for r in caplog.records if "conflict" in r.getMessage()]
    assert len(lines) == 1 and "10.0.0.100" in lines[0] and CLIENT in lines[0] and "eth0" in lines[0], lines
    assert sp.counters["addr_conflict"] == 3
    clock.advance(61)
    sp.handle("eth0", arp_req("10.0.0.100", spa="10.0.0.100"))
    na = bytes(Ether(dst=M0, src=RS2) / IPv6(src="2001:db8::100", dst="ff02::1", hlim=255) /
               ICMPv6ND_NA(tgt="2001:db8::100", R=0, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr=RS2))
    sp.handle("eth0", na)
    lines = [r.getMessage() for r in caplog.records if "conflict" in r.getMessage()]
    assert len(lines) == 3 and "2001:db8::100" in lines[2] and RS2 in lines[2], lines
