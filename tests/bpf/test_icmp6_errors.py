"""ICMPv6 errors to our addresses reach the slow path, which translates those about a FullNAT v6 flow (as IPv4's
are). Found in a netns lab: a real server's Packet Too Big to the v6 local address about a balanced flow was
passed to the kernel (pass_ipv6) and lost, so a smaller MTU on the servers' side was a path-MTU black hole for
every IPv6 flow."""

import pytest
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6PacketTooBig, ICMPv6TimeExceeded, IPerror6, IPv6,
                                UDPerror)
from scapy.layers.l2 import Ether

from hdslb.fastpath.testrun import VERDICTS, run_xdp

from .test_fastpath import A, LB_MAC_S, RS_MAC, delta

LIP6, RS6, OTHER6 = "fd00:100::fe", "fd00:100::2", "fd00:100::77"


def _err(kind, dst):
    quoted = IPerror6(src=LIP6, dst=RS6) / UDPerror(sport=2000, dport=53)
    return Ether(src=RS_MAC, dst=LB_MAC_S) / IPv6(src=RS6, dst=dst) / kind / quoted


KINDS = {"packet too big": ICMPv6PacketTooBig(mtu=1280), "unreachable": ICMPv6DestUnreach(code=4),
         "time exceeded": ICMPv6TimeExceeded()}


@pytest.mark.parametrize("kind", KINDS)
def test_an_icmpv6_error_to_a_local_address_is_punted(fastpath, maps, slowpath_up, kind):
    maps.set_local(A(LIP6), 0x2, 1)
    before = maps.counters()
    v, _, _ = run_xdp(fastpath.prog_fd, bytes(_err(KINDS[kind], LIP6)))
    d = delta(before, maps.counters())
    assert VERDICTS[v] == "XDP_REDIRECT" and d.get("punt_icmp") == 1 and "pass_ipv6" not in d, d


def test_icmpv6_errors_not_to_us_or_without_a_slow_path_stay_the_kernels(fastpath, maps, slowpath_up):
    maps.set_local(A(LIP6), 0x2, 1)
    v, _, _ = run_xdp(fastpath.prog_fd, bytes(_err(KINDS["packet too big"], OTHER6)))
    assert VERDICTS[v] == "XDP_PASS"
    slowpath_up.close()
    v, _, _ = run_xdp(fastpath.prog_fd, bytes(_err(KINDS["packet too big"], LIP6)))
    assert VERDICTS[v] == "XDP_PASS"
