"""ICMP handed to the slow path is bounded: a ping flood to a VIP must not crowd ARP, ND and the answers to the
slow path's probes out of its AF_XDP ring (found in a netns lab: one host pinging the VIP at ~100 kpps made 18 of
30 new connections fail, the socket's ring overflowing with echoes while ARP and probe replies were lost)."""

import time

from scapy.layers.inet import ICMP, IP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Ether

from hdslb.fastpath.testrun import VERDICTS, run_xdp

from .test_fastpath import CLIENT, CLIENT_MAC, LB_MAC_S, VIP, delta, own_v6, setup_service, VIP6, CLIENT6

BURST = 200  # ICMP_PUNT_BURST in bpf/hdslb_xdp.c


def _flood(fastpath, maps, pkt, n):
    """n runs of pkt inside one BPF_PROG_TEST_RUN (microseconds: a loop of syscalls from Python can be slower
    than the bucket refills on a loaded machine); the counters tell what became of them."""
    before = maps.counters()
    run_xdp(fastpath.prog_fd, bytes(pkt), repeat=n)
    d = delta(before, maps.counters())
    return ["XDP_REDIRECT"] * d.get("punt_icmp", 0) + ["XDP_DROP"] * d.get("drop_icmp_ratelimit", 0) + \
        ["XDP_PASS"] * d.get("pass_local", 0), d


def test_a_ping_flood_is_cut_to_the_slow_paths_share_and_arp_still_gets_through(fastpath, maps, slowpath_up):
    setup_service(maps)
    echo = Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP) / ICMP(type=8, id=1, seq=1) / (b"x" * 32)
    t0 = time.monotonic()
    verdicts, d = _flood(fastpath, maps, echo, 3 * BURST)
    elapsed = time.monotonic() - t0
    # a burst goes through at once, then about ICMP_PUNT_RATE (2000) a second of the time the loop took
    allowed = BURST + int(elapsed * 2000) + 2
    assert BURST <= verdicts.count("XDP_REDIRECT") <= allowed, (verdicts.count("XDP_REDIRECT"), elapsed)
    assert len(verdicts) == 3 * BURST and verdicts.count("XDP_DROP") > 0, d
    # ARP for the VIP is not limited: it still reaches the slow path
    arp = Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=CLIENT_MAC, psrc=CLIENT, pdst=VIP)
    assert VERDICTS[run_xdp(fastpath.prog_fd, bytes(arp))[0]] == "XDP_REDIRECT"
    # the bucket refills: after a while pings are answered again
    time.sleep(0.05)
    assert VERDICTS[run_xdp(fastpath.prog_fd, bytes(echo))[0]] == "XDP_REDIRECT"


def test_an_icmpv6_echo_flood_is_limited_and_neighbour_solicitations_are_not(fastpath, maps, slowpath_up):
    own_v6(maps)
    echo = Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IPv6(src=CLIENT6, dst=VIP6) / ICMPv6EchoRequest(id=1, seq=1)
    verdicts, d = _flood(fastpath, maps, echo, 3 * BURST)
    assert d.get("drop_icmp_ratelimit", 0) > 0 and verdicts.count("XDP_REDIRECT") >= BURST, d
    from .test_fastpath import ns
    assert VERDICTS[run_xdp(fastpath.prog_fd, bytes(ns()))[0]] == "XDP_REDIRECT"


def test_without_the_slow_path_icmp_is_not_limited(fastpath, maps):
    """No socket: ICMP to our addresses goes to the kernel as before, never counted as a slow-path drop."""
    setup_service(maps)
    echo = Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP) / ICMP(type=8, id=1, seq=1)
    verdicts, d = _flood(fastpath, maps, echo, BURST + 50)
    assert set(verdicts) == {"XDP_PASS"} and "drop_icmp_ratelimit" not in d, d
