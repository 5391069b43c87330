"""A next hop's MAC that moved reaches established connections (Maps.conn_remac, called by the slow path when it
writes a moved MAC). Found in a netns lab: after a real server's MAC changed, the neighbour table followed within
its timeout and new flows worked, but a UDP flow the client kept busy went on to the old MAC for good (every
request timed out for 30 s and counting) because each connection entry keeps the MAC of its first packet."""

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from hdslb.fastpath.testrun import XDP_TX, run_xdp

from .conftest import CONN_TABLES, LO_IFINDEX
from .test_fastpath import RS_MAC, setup_service, syn

NEW_MAC = "02:55:00:00:00:99"


@pytest.fixture(params=CONN_TABLES)
def fastpath(fastpath_of, request):
    return fastpath_of(request.param)


def _mac(s):
    return bytes.fromhex(s.replace(":", ""))


def test_established_flows_follow_a_moved_next_hop_mac(fastpath, maps):
    setup_service(maps)
    v, out, _ = run_xdp(fastpath.prog_fd, bytes(syn(sport=40000)))
    assert v == XDP_TX and Ether(out).dst == RS_MAC
    v, out, _ = run_xdp(fastpath.prog_fd, bytes(syn(sport=40001)))
    assert v == XDP_TX
    # the reply entries send to the client's MAC: not touched; another interface's entries: not touched
    assert maps.conn_remac(_mac(RS_MAC), _mac(NEW_MAC), LO_IFINDEX + 1) == 0
    assert maps.conn_remac(_mac(RS_MAC), _mac(NEW_MAC), LO_IFINDEX) == 2
    for sport in (40000, 40001):
        v, out, _ = run_xdp(fastpath.prog_fd, bytes(syn(sport=sport, flags="A")))
        assert v == XDP_TX and Ether(out).dst == NEW_MAC, sport
    assert maps.conn_remac(_mac(RS_MAC), _mac(NEW_MAC), LO_IFINDEX) == 0, "nothing left on the old MAC"
