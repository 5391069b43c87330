"""conn.list from the conn table's columns (Daemon.conn_listing, what ipvsadm -Lnc and /v2/conns page through)
against the dict-based Daemon.conn_list, on the real fast path's maps after ~1500 flows made by BPF_PROG_TEST_RUN
in every state (handshake begun, established, reset and closed by the server, reset and closed by the client,
UDP), some aged, on both conn table kinds."""

import ipaddress
import socket
import time
import types

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from hdslb.daemon import Daemon
from hdslb.fastpath.testrun import XDP_TX

from .conftest import CONN_TABLES
from .test_fastpath import CLIENT_MAC, LB_MAC_S, LIP, RS1, RS_MAC, TIMEOUTS, VIP, _age_conns, run, setup_service, syn


@pytest.fixture(params=CONN_TABLES)
def fastpath(fastpath_of, request):
    return fastpath_of(request.param)


def _server(lport, flags, proto=TCP):
    return Ether(src=RS_MAC, dst=LB_MAC_S) / IP(src=RS1, dst=LIP) / proto(sport=80, dport=lport, flags=flags)


def _daemon(maps):
    d = types.SimpleNamespace(maps=maps, settings=types.SimpleNamespace(timeouts=dict(TIMEOUTS)),
                              _conns=lambda: list(maps.conns()))
    d.idle_limits = lambda unit=lambda x: x: Daemon.idle_limits(d, unit)
    return d


def test_the_columns_listing_is_the_dict_listing(fastpath, maps, monkeypatch):
    import hdslb.daemon as dmod

    setup_service(maps)
    n = 0
    kinds = ("syn", "est", "srv_rst", "srv_fin", "cli_rst", "cli_fin")
    for i in range(1200):
        kind = kinds[i % len(kinds)]
        v, p = run(fastpath, syn(sport=20000 + i))
        assert v == XDP_TX
        lport = p[TCP].sport
        if kind != "syn":
            run(fastpath, _server(lport, "SA"))
            run(fastpath, syn(sport=20000 + i, flags="A"))
        if kind == "srv_rst":
            run(fastpath, _server(lport, "RA"))
        elif kind == "srv_fin":
            run(fastpath, _server(lport, "FA"))
        elif kind == "cli_rst":
            run(fastpath, syn(sport=20000 + i, flags="R"))
        elif kind == "cli_fin":
            run(fastpath, syn(sport=20000 + i, flags="FA"))
        n += 1
        if i == 600:
            _age_conns(maps, 5)  # the first half 5 s older: idle and expire times that differ
    maps.set_service(socket.IPPROTO_UDP, ipaddress.ip_address(VIP), 80, 0)
    for i in range(300):
        q = Ether(src=CLIENT_MAC, dst=LB_MAC_S) / IP(src="10.0.1.7", dst=VIP) / UDP(sport=30000 + i, dport=80)
        if run(fastpath, q)[0] == XDP_TX:
            n += 1
    assert n >= 1400 and maps.conn_entries() >= 2 * 1400
    # one clock for both listings: their idle and expire seconds and last_seen_ns must agree to the unit
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    monkeypatch.setattr(dmod.time, "clock_gettime_ns", lambda clk: now)
    off = maps.clock._calibrate()
    monkeypatch.setattr(maps.clock, "_calibrate", lambda: off)
    d = _daemon(maps)
    old = Daemon.conn_list(d)
    maps.CONN_BATCH = 97  # many batches, a partial last one
    listing = Daemon.conn_listing(d)
    new = listing.entries()
    assert len(new) == len(old) == maps.conn_entries()
    assert {c["state"] for c in new} == {"syn_recv", "established", "fin_wait", "close", "udp"}
    assert len({c["idle_s"] for c in new}) > 1
    assert new == old
    assert [list(c) for c in new] == [list(c) for c in old]
    inbound = Daemon.conn_listing(d, True)
    assert inbound.entries(0, 500) + inbound.entries(500) == [c for c in old if not c["out"]]
    # expire_s (ipvsadm -Lnc's time column): the state's running timeout less the flow's idle time, never below
    # 0 (the first half's closed flows are 5 s idle, past close's 3 s, and not swept yet)
    assert all(c["expire_s"] == max(0, TIMEOUTS[c["state"]] - c["idle_s"]) for c in new)
    assert any(c["expire_s"] == 0 for c in new) and any(0 < c["expire_s"] < TIMEOUTS[c["state"]] for c in new)
    # after ipvsadm --set 900 120 2 the next listing counts down from the new timeouts, both ways alike
    d.settings.timeouts = dict(TIMEOUTS, established=900, fin_wait=120, udp=2)
    new2, old2 = Daemon.conn_listing(d).entries(), Daemon.conn_list(d)
    assert new2 == old2
    assert all(c["expire_s"] == max(0, d.settings.timeouts[c["state"]] - c["idle_s"]) for c in new2)
    assert [c["idle_s"] for c in new2] == [c["idle_s"] for c in new]
