"""What is handed to the slow path is bounded: a ping flood or an ARP/NS flood to a VIP must not crowd the answers to
the slow path's probes out of its AF_XDP ring (found in a netns lab: one host pinging the VIP at ~100 kpps made 18
of 30 new connections fail, ~40 kpps of ARP requests for it from made-up senders 12 of 25; the socket's ring
overflowed while probe replies were lost). ICMP beyond its budget is dropped; ARP requests and solicitations
beyond theirs are answered in XDP, as when no slow path runs."""

import secrets
import socket
import time

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Ether

from hdslb.fastpath.testrun import VERDICTS, run_xdp
from hdslb.lab import netns as nx
from hdslb.slowpath.xsk import call_in_netns

from .conftest import LB_MAC
from .test_fastpath import CLIENT, CLIENT_MAC, LB_MAC_S, VIP, delta, own_v6, setup_service, VIP6, CLIENT6

BURST = 200  # PUNT_BURST in bpf/hdslb_xdp.c


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
    # a burst goes through at once, then about PUNT_RATE (2000) a second of the time the loop took
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
    """No socket: an echo to our address is answered in XDP (echo_reply, as Linux answers every echo), never
    counted as a slow-path drop; other ICMP to it goes to the kernel as before. (One run each: a repeat= run
    would see the reply it made.)"""
    setup_service(maps)
    echo = bytes(Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP) / ICMP(type=8, id=1, seq=1))
    before = maps.counters()
    verdicts = {VERDICTS[run_xdp(fastpath.prog_fd, echo)[0]] for _ in range(BURST + 50)}
    d = delta(before, maps.counters())
    assert verdicts == {"XDP_TX"} and d.get("echo_reply") == BURST + 50 and "drop_icmp_ratelimit" not in d, d
    stamp = Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP) / ICMP(type=13, id=1, seq=1)
    verdicts, d = _flood(fastpath, maps, stamp, BURST + 50)
    assert set(verdicts) == {"XDP_PASS"} and "drop_icmp_ratelimit" not in d, d


def _exhaust(fastpath, budget):
    """The budget's bucket empty for the next 10 s (PUNT_NEIGH = 1): what a flood leaves behind. Its clock is
    bpf_ktime_get_ns(), CLOCK_MONOTONIC. (A repeat= run cannot show it: an answered ARP is rewritten in place,
    and the next run of the same buffer sees the reply.)"""
    import ctypes as ct

    fastpath.table("punt_tat")[ct.c_uint32(budget)] = ct.c_uint64(time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                                                                   + 10 * 10**9)


def test_an_arp_flood_is_answered_in_xdp_beyond_the_slow_paths_share_without_learning(fastpath, maps, slowpath_up):
    import ipaddress

    setup_service(maps)
    req = Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=CLIENT_MAC, psrc="10.9.9.9", pdst=VIP)
    before = maps.counters()
    run_xdp(fastpath.prog_fd, bytes(req), repeat=BURST)  # (punted frames are not rewritten: the repeat is fine)
    assert delta(before, maps.counters()).get("punt_arp") == BURST
    _exhaust(fastpath, 1)
    before = maps.counters()
    v, out, _ = run_xdp(fastpath.prog_fd, bytes(req))
    d = delta(before, maps.counters())
    assert VERDICTS[v] == "XDP_TX" and Ether(out)[ARP].op == 2 and Ether(out)[ARP].psrc == VIP
    assert d.get("arp_reply") == 1 and "arp_learn" not in d and "punt_arp" not in d, d
    assert ipaddress.ip_address("10.9.9.9") not in {n["addr"] for n in maps.neighs()}, "not learned behind the slow path"
    # the answers to the slow path's own probes are never held back
    reply = Ether(src=CLIENT_MAC, dst=LB_MAC_S) / ARP(op=2, hwsrc=CLIENT_MAC, psrc=CLIENT, hwdst=LB_MAC_S, pdst=VIP)
    assert VERDICTS[run_xdp(fastpath.prog_fd, bytes(reply))[0]] == "XDP_REDIRECT"


def test_an_ns_flood_is_answered_in_xdp_beyond_the_slow_paths_share(fastpath, maps, slowpath_up):
    from .test_fastpath import ns

    own_v6(maps)
    assert VERDICTS[run_xdp(fastpath.prog_fd, bytes(ns()))[0]] == "XDP_REDIRECT"
    _exhaust(fastpath, 1)
    before = maps.counters()
    v, _, _ = run_xdp(fastpath.prog_fd, bytes(ns()))
    d = delta(before, maps.counters())
    assert VERDICTS[v] == "XDP_TX" and d.get("nd_reply") == 1 and "punt_arp" not in d, d


@pytest.fixture
def many_queues(maps):
    """A NIC with more receive queues than the slow path serves (XSK_MAX_QUEUES, 16): a veth with 20 in a namespace
    of its own, entered in iface_map with the test run's XSKMAP slot (whose queue 0 the slowpath_up socket holds).
    Yields (namespace, ifindex); BPF_PROG_TEST_RUN takes the interface only from inside its namespace."""
    ns = f"hq{secrets.token_hex(3)}"
    nx.netns_add(ns)
    try:
        nx.sh(["ip", "-n", ns, "link", "add", "mq0", "numrxqueues", "20", "type", "veth", "peer", "name", "mq1"])
        ifindex = call_in_netns(ns, lambda: socket.if_nametoindex("mq0"))
        maps.set_iface(ifindex, LB_MAC, 1500)
        yield ns, ifindex
    finally:
        nx.netns_del(ns)


def test_a_queue_the_slow_path_does_not_serve_is_answered_as_without_it(fastpath, maps, slowpath_up, many_queues):
    """An AF_XDP socket takes frames of its own queue only: what arrived on queue 17 went to queue 0's socket and
    the kernel dropped it there, so on a NIC with more than 16 queues the pings, ICMP errors and solicitations for
    our addresses that RSS spread past queue 15 were lost without a trace (counted as punted). There XDP now does
    what it does with no slow path: ARP, ND and echo answered (the asker not learned behind the slow path's back)."""
    import ipaddress

    ns, ifindex = many_queues
    setup_service(maps)
    maps.set_local(ipaddress.ip_address(VIP), 0x1, ifindex)
    own_v6(maps, ifindex)

    def on_queue(pkt, q):
        before = maps.counters()
        v, out, _ = call_in_netns(ns, lambda: run_xdp(fastpath.prog_fd, bytes(pkt), ingress_ifindex=ifindex,
                                                      rx_queue=q))
        return VERDICTS[v], Ether(out), delta(before, maps.counters())

    arp = Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=CLIENT_MAC, psrc="10.9.9.8", pdst=VIP)
    echo = Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src=CLIENT, dst=VIP) / ICMP(type=8, id=1, seq=1)
    from .test_fastpath import ns as solicit
    for q in (0, 15):  # served (queue 15: no socket in this test, so answered as without a slow path)
        v, _, d = on_queue(arp, q)
        assert (v, d.get("punt_arp")) == (("XDP_REDIRECT", 1) if q == 0 else ("XDP_TX", None)), (q, v, d)
    v, out, d = on_queue(arp, 17)
    assert v == "XDP_TX" and out[ARP].op == 2 and out[ARP].psrc == VIP and d.get("arp_reply") == 1, (v, d)
    assert "punt_arp" not in d and "arp_learn" not in d, d
    assert ipaddress.ip_address("10.9.9.8") not in {n["addr"] for n in maps.neighs()}, "not learned behind the slow path"
    v, out, d = on_queue(echo, 17)
    assert v == "XDP_TX" and out[ICMP].type == 0 and d.get("echo_reply") == 1 and "punt_icmp" not in d, (v, d)
    v, _, d = on_queue(solicit(), 17)
    assert v == "XDP_TX" and d.get("nd_reply") == 1 and "punt_arp" not in d, (v, d)
    assert on_queue(echo, 0)[0] == "XDP_REDIRECT"
