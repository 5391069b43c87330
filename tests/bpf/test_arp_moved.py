"""A neighbour we send to announcing another MAC reaches the slow path. Found in a netns lab: a real server's
gratuitous ARP for its new MAC went to the kernel (pass_arp) because XDP punted only ARP for our own addresses,
so the slow path's code for it (an existing entry refreshed by anyone's ARP, as Linux) never ran and traffic
kept going to the old MAC until the entry's timeout and re-probes."""

import ipaddress

from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from hdslb.fastpath.testrun import VERDICTS, run_xdp

from .conftest import LO_IFINDEX
from .test_fastpath import RS1, RS_MAC, delta, setup_service

RS61 = "fd00:100::2"

NEW_MAC = "02:55:00:00:00:99"


def _garp(mac, ip=RS1, op=1):
    return Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=op, hwsrc=mac, psrc=ip, hwdst="00:00:00:00:00:00", pdst=ip)


def _verdict(fastpath, maps, pkt):
    before = maps.counters()
    v, _, _ = run_xdp(fastpath.prog_fd, bytes(pkt))
    return VERDICTS[v], delta(before, maps.counters())


def test_a_known_neighbours_arp_with_a_new_mac_goes_to_the_slow_path(fastpath, maps, slowpath_up):
    setup_service(maps)
    maps.set_neigh(ipaddress.ip_address(RS1), bytes.fromhex(RS_MAC.replace(":", "")), LO_IFINDEX, permanent=False)
    for op in (1, 2):
        v, d = _verdict(fastpath, maps, _garp(NEW_MAC, op=op))
        assert v == "XDP_REDIRECT" and d.get("punt_arp") == 1, (op, d)
    # the same MAC, a stranger, or a neighbour pinned by the operator: the kernel's, as before
    assert _verdict(fastpath, maps, _garp(RS_MAC))[0] == "XDP_PASS"
    assert _verdict(fastpath, maps, _garp(NEW_MAC, ip="192.168.100.77"))[0] == "XDP_PASS"
    maps.set_neigh(ipaddress.ip_address(RS1), bytes.fromhex(RS_MAC.replace(":", "")), LO_IFINDEX, permanent=True)
    assert _verdict(fastpath, maps, _garp(NEW_MAC))[0] == "XDP_PASS"
    # no slow path: the kernel's
    maps.set_neigh(ipaddress.ip_address(RS1), bytes.fromhex(RS_MAC.replace(":", "")), LO_IFINDEX, permanent=False)
    slowpath_up.close()
    assert _verdict(fastpath, maps, _garp(NEW_MAC))[0] == "XDP_PASS"


def _una(mac, ip=RS61, override=True, dst="ff02::1"):
    """The unsolicited Neighbor Advertisement a host sends to all nodes when its MAC changes (RFC 4861 7.2.6)."""
    return (Ether(src=mac, dst="33:33:00:00:00:01") / IPv6(src=ip, dst=dst, hlim=255) /
            ICMPv6ND_NA(tgt=ip, R=0, S=0, O=int(override)) / ICMPv6NDOptDstLLAddr(lladdr=mac))


def test_a_known_ipv6_neighbours_unsolicited_na_with_a_new_mac_goes_to_the_slow_path(fastpath, maps, slowpath_up):
    """IPv6's gratuitous ARP: a real server's advertisement of its new MAC to all nodes went to the kernel
    (pass_ipv6), since XDP handed the slow path only advertisements addressed to us, and flows kept going to the
    old MAC until the entry's timeout and re-probes."""
    rs = ipaddress.ip_address(RS61)
    maps.set_neigh(rs, bytes.fromhex(RS_MAC.replace(":", "")), LO_IFINDEX, permanent=False)
    v, d = _verdict(fastpath, maps, _una(NEW_MAC))
    assert v == "XDP_REDIRECT" and d.get("punt_arp") == 1, d
    # the same MAC, a stranger, or a neighbour pinned by the operator: the kernel's, as before
    assert _verdict(fastpath, maps, _una(RS_MAC))[0] == "XDP_PASS"
    assert _verdict(fastpath, maps, _una(NEW_MAC, ip="fd00:100::77"))[0] == "XDP_PASS"
    maps.set_neigh(rs, bytes.fromhex(RS_MAC.replace(":", "")), LO_IFINDEX, permanent=True)
    assert _verdict(fastpath, maps, _una(NEW_MAC))[0] == "XDP_PASS"
    # no slow path: the kernel's
    maps.set_neigh(rs, bytes.fromhex(RS_MAC.replace(":", "")), LO_IFINDEX, permanent=False)
    slowpath_up.close()
    assert _verdict(fastpath, maps, _una(NEW_MAC))[0] == "XDP_PASS"
