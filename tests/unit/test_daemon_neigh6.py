"""The daemon's own neighbour resolution (no slow path): IPv6 next hops of real servers are solicited over the
packet socket and learned from advertisements into neigh_map (af 6), as IPv4 next hops are ARP-probed."""

import ipaddress

import pytest

from hdslb.balancer import Balancer, Iface, link_local
from hdslb.daemon import Daemon, settings_from_args
from hdslb.slowpath import packets as P

from .test_balancer import Recorder

A = ipaddress.ip_address
RS_MAC = bytes.fromhex("025500000002")
LB1_MAC = b"\x04" * 6


class FakeSock:
    def __init__(self):
        self.sent = []

    def send(self, frame):
        self.sent.append(bytes(frame))


class FakeMaps:
    def __init__(self):
        self.table = {}  # addr -> (mac, ifindex, permanent)

    def neighs(self):
        return [{"addr": a, "lladdr": m.hex(":"), "ifindex": i, "permanent": p, "updated_ns": 0}
                for a, (m, i, p) in self.table.items()]

    def set_neigh(self, ip, mac, ifindex, permanent):
        self.table[ip] = (bytes(mac), ifindex, permanent)


@pytest.fixture
def d():
    dm = Daemon.__new__(Daemon)
    ifaces = {"eth0": Iface("eth0", 2, b"\x02" * 6, 1500), "eth1": Iface("eth1", 3, LB1_MAC, 1500)}
    dm.bal = Balancer(Recorder(), ifaces)
    dm.maps, dm.slow = FakeMaps(), None
    dm._pkt_socks = {"eth0": FakeSock(), "eth1": FakeSock()}
    dm.bal.route_add({"prefix": "fd00:100::", "prefixlen": 64, "ifname": "eth1"})
    dm.bal.route_add({"prefix": "fd00:200::", "prefixlen": 64, "ifname": "eth1", "via": "fd00:100::1"})
    svc = {"proto": "tcp", "addr": "2001:db8::100", "port": 80}
    dm.bal.service_add(dict(svc, sched="rr"))
    dm.bal.dest_add({"svc": svc, "addr": "fd00:100::2", "port": 80, "fwd": "dr"})
    dm.bal.dest_add({"svc": svc, "addr": "fd00:200::7", "port": 80, "fwd": "fnat"})
    return dm


def na(target, dst, solicited=True, hlim=255, mac=RS_MAC):
    frame = P.nd_na(mac, A(target), A(dst), LB1_MAC, solicited=solicited)
    if hlim != 255:
        frame = bytearray(frame)
        frame[14 + 7] = hlim
        frame = bytes(frame)
    return frame


def test_ipv6_next_hops_are_wanted_directly_or_via_their_gateway(d):
    assert d._wanted_nexthops() == {A("fd00:100::2"): "eth1", A("fd00:100::1"): "eth1"}


def test_probe_sends_a_neighbour_solicitation_from_our_address(d):
    d.bal.addr_add({"addr": "fd00:100::254", "prefixlen": 64, "ifname": "eth1"})
    d._probe("eth1", A("fd00:100::2"))
    frame = d._pkt_socks["eth1"].sent[-1]
    eth = P.parse_eth(frame)
    ip6 = P.parse_ipv6(frame[eth.l2len:])
    nd = P.parse_nd(ip6.payload)
    assert eth.dst == P.mcast_mac(P.solicited_node(A("fd00:100::2"))) and eth.src == LB1_MAC
    assert (ip6.src, ip6.dst, ip6.hlim) == (A("fd00:100::254"), P.solicited_node(A("fd00:100::2")), 255)
    assert P.icmp6_ok(ip6) and nd.type == P.ND_NEIGHBOR_SOLICIT and nd.target == A("fd00:100::2")
    assert nd.lladdr == LB1_MAC


def test_without_an_address_of_ours_the_solicitation_comes_from_the_link_local_address(d):
    # as Linux's ndisc_solicit: from :: it would be a duplicate-address probe, answered to all nodes unsolicited
    lla = link_local(LB1_MAC)
    assert lla.is_link_local and d._source_for("eth1", A("fd00:100::2")) == lla
    d._probe("eth1", A("fd00:100::2"))
    ip6 = P.parse_ipv6(d._pkt_socks["eth1"].sent[-1][14:])
    assert ip6.src == lla and P.parse_nd(ip6.payload).lladdr == LB1_MAC


def test_ipv4_next_hops_are_still_arp_probed(d):
    d.bal.route_add({"prefix": "192.168.100.0", "prefixlen": 24, "ifname": "eth1", "src": "192.168.100.254"})
    d._probe("eth1", A("192.168.100.2"))
    frame = d._pkt_socks["eth1"].sent[-1]
    assert frame[12:14] == b"\x08\x06" and frame[28:32] == A("192.168.100.254").packed


def test_an_advertisement_for_a_wanted_next_hop_is_learned_with_af6(d):
    assert d.learn_na("eth1", na("fd00:100::2", "fd00:100::254")) is True
    assert d.maps.table[A("fd00:100::2")] == (RS_MAC, 3, False)
    # a multicast answer (to an NS from ::) teaches the same
    assert d.learn_na("eth1", na("fd00:100::1", "ff02::1", solicited=False)) is True
    assert d.maps.table[A("fd00:100::1")][0] == RS_MAC


@pytest.mark.parametrize("frame_args, iface", [
    (("fd00:100::99", "fd00:100::254"), "eth1"),     # nobody asked for it: no planting of entries
    (("fd00:100::2", "fd00:100::254"), "eth0"),      # heard on the wrong interface
])
def test_unwanted_advertisements_are_ignored(d, frame_args, iface):
    assert d.learn_na(iface, na(*frame_args)) is False and not d.maps.table


def test_forwarded_or_broken_advertisements_are_ignored(d):
    assert d.learn_na("eth1", na("fd00:100::2", "fd00:100::254", hlim=64)) is False  # RFC 4861: hop limit 255
    bad = bytearray(na("fd00:100::2", "fd00:100::254"))
    bad[-1] ^= 0xFF  # checksum no longer matches
    assert d.learn_na("eth1", bytes(bad)) is False
    assert d.learn_na("eth1", b"\x00" * 20) is False
    assert not d.maps.table


def test_static_neighbours_are_never_overwritten(d):
    d.maps.set_neigh(A("fd00:100::2"), b"\x02" * 6, 3, permanent=True)
    assert d.learn_na("eth1", na("fd00:100::2", "fd00:100::254")) is False
    assert d.maps.table[A("fd00:100::2")][0] == b"\x02" * 6


def test_size_flags(monkeypatch):
    monkeypatch.delenv("HDSLB_CTRL", raising=False)
    s = settings_from_args(["eth0", "--max-hash-cells", "65536", "--max-persist", "1024"])
    assert (s.max_hash_cells, s.max_persist) == (65536, 1024)
    d = Daemon(s)
    assert (d.sizes.max_hash_cells, d.sizes.max_persist) == (65536, 1024)


def ns(target, src, dmac=None):
    return P.nd_ns(RS_MAC, A(src), A(target), dmac=dmac)


def test_solicitations_for_our_addresses_are_answered_without_the_slow_path(d):
    d.bal.addr_add({"addr": "fd00:100::254", "prefixlen": 64, "ifname": "eth1"})
    assert d.answer_ns("eth1", ns("fd00:100::254", "fd00:100::2")) is True
    frame = d._pkt_socks["eth1"].sent[-1]
    eth = P.parse_eth(frame)
    ip6 = P.parse_ipv6(frame[eth.l2len:])
    nd = P.parse_nd(ip6.payload)
    assert (eth.dst, eth.src) == (RS_MAC, LB1_MAC)
    assert (ip6.src, ip6.dst, ip6.hlim) == (A("fd00:100::254"), A("fd00:100::2"), 255) and P.icmp6_ok(ip6)
    assert (nd.type, nd.target, nd.lladdr, nd.solicited, nd.override) == \
        (P.ND_NEIGHBOR_ADVERT, A("fd00:100::254"), LB1_MAC, True, True)
    # a duplicate-address probe is defended to all nodes
    assert d.answer_ns("eth1", ns("fd00:100::254", "::")) is True
    ip6 = P.parse_ipv6(d._pkt_socks["eth1"].sent[-1][14:])
    assert ip6.dst == A("ff02::1") and not P.parse_nd(ip6.payload).solicited


def test_solicitations_we_must_not_answer(d):
    d.bal.addr_add({"addr": "fd00:100::254", "prefixlen": 64, "ifname": "eth1"})
    assert d.answer_ns("eth1", ns("fd00:100::99", "fd00:100::2")) is False  # not ours
    assert d.answer_ns("eth0", ns("fd00:100::254", "fd00:100::2")) is False  # ours, on another interface
    d.slow = object()  # the slow path answers them itself
    assert d.answer_ns("eth1", ns("fd00:100::254", "fd00:100::2")) is False
    assert d._pkt_socks["eth1"].sent == [] and d._pkt_socks["eth0"].sent == []
