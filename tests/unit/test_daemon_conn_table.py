"""The daemon's conn table entry count: counted afresh for small tables, reused for a while for big ones."""

import time
import types

import pytest

from hdslb.daemon import Daemon


@pytest.fixture
def clock(monkeypatch):
    """The daemon module's clock, advanced only by the counts themselves: a loaded machine (a sleep of 60 ms taking
    300) must not change what the cache decides."""
    now = [1000.0]
    monkeypatch.setattr("hdslb.daemon.time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def _daemon(clock, count_s: float):
    state = {"n": 0}

    def conn_entries():
        clock[0] += count_s
        state["n"] += 1
        return state["n"]

    d = types.SimpleNamespace(maps=types.SimpleNamespace(conn_entries_by_family=lambda: {4: conn_entries(), 6: 0}),
                              _entries_cache=(0.0, None, 0.0))
    return d, state


def test_a_cheap_count_is_always_fresh(clock):
    d, _ = _daemon(clock, 0.0)
    assert [Daemon.conn_table_entries(d) for _ in range(3)] == [1, 2, 3]


def test_an_expensive_count_is_reused_for_twenty_times_its_cost(clock):
    d, state = _daemon(clock, 0.06)          # reused for 1.2 s
    assert Daemon.conn_table_entries(d) == 1
    assert Daemon.conn_table_entries(d) == 1 and state["n"] == 1
    clock[0] += 1.1
    assert Daemon.conn_table_entries(d) == 1  # 1.1 s later: still the count
    clock[0] += 0.2                           # 1.3 s later
    assert Daemon.conn_table_entries(d) == 2


async def test_conn_list_runs_off_the_event_loop():
    """A slow listing (a big table) leaves the loop free: another task runs while it is read."""
    import asyncio

    from hdslb.ctl import commands

    def slow_list():
        time.sleep(0.3)
        return [{"proto": 6}]

    d = types.SimpleNamespace(conn_list=slow_list, persist_list=lambda: [])
    d.conn_list_async = lambda: Daemon.conn_list_async(d)
    ticks = []

    async def ticker():
        for _ in range(5):
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    t = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # the first tick before the listing: a blocked loop stretches the ticks past 0.3 s
    res = commands.dispatch(d, "conn.list", {})
    assert asyncio.iscoroutine(res)
    out = await res
    await t
    assert out == {"conns": [{"proto": 6}], "templates": []}
    assert len(ticks) == 5 and ticks[-1] - ticks[0] < 0.25, "the ticker ran while the list was read"


def test_one_timeout_rule_per_conn_state():
    """The rule the sweep, the fast path's port reclaiming and ipvsadm -Lnc share."""
    from hdslb.fastpath.abi import conn_states, state_timeouts

    t = {"syn_recv": 30, "established": 90, "fin_wait": 7, "close": 3, "udp": 300}
    by = dict(zip(conn_states(), state_timeouts(t)))
    assert by == {"none": 30, "syn_recv": 30, "established": 90, "fin_wait": 7, "close": 3, "udp": 300}
    assert state_timeouts({"close": 5, "udp": 1})[conn_states().index("established")] == 5, "no own timeout: close"


def test_rates_between_two_counter_snapshots():
    """ipvsadm --rate's numbers: per second over the interval, 0 for a counter that went back (zeroed) and for
    an idle key, nothing for a key seen once."""
    from hdslb.daemon import rates_between

    z = dict.fromkeys(("conns", "inpkts", "outpkts", "inbytes", "outbytes"), 0)
    prev = {("svc", 1): dict(z, conns=10, inpkts=100, outpkts=50, inbytes=6000, outbytes=3000),
            ("dest", 2): dict(z, inpkts=40), ("dest", 3): dict(z, conns=5)}
    cur = {("svc", 1): dict(z, conns=30, inpkts=300, outpkts=150, inbytes=18000, outbytes=9000),
           ("dest", 2): dict(z, inpkts=40), ("dest", 3): dict(z), ("dest", 4): dict(z, conns=1)}
    r = rates_between(prev, cur, 2.0)
    assert r[("svc", 1)] == {"cps": 10, "inpps": 100, "outpps": 50, "inbps": 6000, "outbps": 3000}
    assert r[("dest", 2)] == {"cps": 0, "inpps": 0, "outpps": 0, "inbps": 0, "outbps": 0}
    assert r[("dest", 3)]["cps"] == 0, "zeroed counters give 0, not a negative rate"
    assert ("dest", 4) not in r


def test_local_address_counts_are_one_walk_per_table_scan():
    """ipvsadm -G / service.list count connections per (service, local address): once per conn-table scan,
    however many services ask, and a new scan is counted afresh."""
    import ipaddress

    from hdslb.ctl import commands

    A = ipaddress.ip_address

    class Scan(list):
        walks = 0

        def __iter__(self):
            Scan.walks += 1
            return super().__iter__()

    scan = Scan([{"svc_id": 1, "to_saddr": A("192.168.100.200"), "out": False},
                 {"svc_id": 1, "to_saddr": A("192.168.100.200"), "out": False},
                 {"svc_id": 1, "to_saddr": A("10.0.0.1"), "out": True},  # a reply entry: not counted
                 {"svc_id": 2, "to_saddr": A("192.168.100.201"), "out": False}])
    d = types.SimpleNamespace(_conns=lambda: scan, _laddr_cache=None)
    d.laddr_conns = lambda: Daemon.laddr_conns(d)
    svcs = [types.SimpleNamespace(svc_id=i, laddrs=[types.SimpleNamespace(addr=A(a), ifname="eth1")
                                                    for a in ("192.168.100.200", "192.168.100.201")])
            for i in (1, 2)]
    got = [[la["conns"] for la in commands._laddr_data(d, s)] for s in svcs]
    assert got == [[2, 0], [0, 1]]
    assert Scan.walks == 1, "one walk served both services"
    scan = Scan(scan[:1])  # the next scan
    assert Daemon.laddr_conns(d) == {(1, A("192.168.100.200")): 1} and Scan.walks == 2


def test_sweep_and_counts_fall_back_to_the_reference_when_the_columns_cannot_be_built():
    """Two keys sharing a 64-bit hash (conn_aging_columns() is None): the sweep and ActiveConn/InActConn come
    from the plain-Python view, with the same rules."""
    import socket
    import struct

    from hdslb.fastpath import abi
    from hdslb.fastpath.aging import KEY_FMT

    key = struct.Struct(KEY_FMT).pack
    est = abi.conn_states().index("established")
    dead_in, dead_out = key(1, 2, 6, 4, 0, b"\1" * 16, b"\2" * 16), key(3, 4, 6, 4, 0, b"\3" * 16, b"\4" * 16)
    live = key(5, 6, 6, 4, 0, b"\5" * 16, b"\6" * 16)
    now = 1_000_000
    view = [(dead_in, dead_out, now - 200_000, est, False, socket.IPPROTO_TCP, 7),
            (dead_out, dead_in, now - 300_000, est, True, socket.IPPROTO_TCP, 7),
            (live, b"\0" * 40, now - 10, est, False, socket.IPPROTO_TCP, 8)]
    gone, counted = [], []
    maps = types.SimpleNamespace(
        clock=types.SimpleNamespace(mono_to_jiffies=lambda ns: now, seconds_to_jiffies=lambda s: s * 1000),
        conn_aging_columns=lambda: None, conn_aging_view=lambda: view,
        remove_dead_flows=lambda dead: gone.extend(k for ks, _ in dead for k in ks) or sum(len(ks) for ks, _ in dead),
        add_counter=lambda name, n: counted.append((name, n)))
    d = types.SimpleNamespace(maps=maps, settings=types.SimpleNamespace(
        timeouts={"syn_recv": 30, "established": 90, "fin_wait": 7, "close": 3, "udp": 300}),
        _conn_cache=None, _counts_cache=(0.0, None))
    # hdslb_sweep counts what it deletes in conn_expired itself, in the kernel: the daemon adds nothing
    assert Daemon.sweep(d) == 2 and gone == [dead_in, dead_out] and counted == []
    assert Daemon.conn_counts(d) == {7: (1, 0), 8: (1, 0)}


async def test_the_daemons_columns_listing_is_built_off_the_event_loop():
    """The daemon's path (conn_listing: a snapshot of the table's columns, built in seconds at 1M connections)
    leaves the loop free, paged or not: another task runs while the snapshot is built."""
    import asyncio

    from hdslb.ctl import commands

    class SlowListing:
        def __init__(self, inbound):
            time.sleep(0.3)  # the batched read and the numpy work

        def __len__(self):
            return 1

        def max_bytes(self):
            return 100

        def entries(self, start=0, stop=None):
            return [{"proto": 6}][start:stop]

    for args in ({}, {"limit": 10}):
        d = types.SimpleNamespace(conn_listing=SlowListing, persist_list=lambda: [])
        ticks = []

        async def ticker():
            for _ in range(5):
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0)  # the first tick before the listing: a blocked loop stretches the ticks past 0.3 s
        res = commands.dispatch(d, "conn.list", args)
        assert asyncio.iscoroutine(res)
        out = await res
        await t
        assert out["conns"] == [{"proto": 6}], out
        assert len(ticks) == 5 and ticks[-1] - ticks[0] < 0.25, f"{args}: the ticker ran while the listing was built"


async def test_the_estimator_handles_only_what_counted_something():
    """Past BATCH_STATS_ABOVE the estimator reads the stats arrays whole (all_stats: the slots with traffic) and
    keeps rates for those only: an idle service or real server costs it nothing (it built a snapshot and a rate
    for every one each interval: 70 ms at 10k x 10 idle). A real server that starts counting between two
    readings gets its rate at the first (counted from zero); the rest read ZERO_RATES."""
    import asyncio
    import ipaddress

    from hdslb.balancer import Balancer, Iface, NullDataPath
    from hdslb.ctl.commands import ZERO_RATES
    from hdslb.daemon import BATCH_STATS_ABOVE, Daemon

    bal = Balancer(NullDataPath(), {"eth1": Iface("eth1", 3, b"\x04" * 6, 1500)})
    n = BATCH_STATS_ABOVE // 10 + 1
    for i in range(n):
        svc = {"proto": "tcp", "addr": str(ipaddress.IPv4Address("10.200.0.0") + i), "port": 80}
        bal.service_add(dict(svc, sched="rr"))
        for j in range(10):
            bal.dest_add({"svc": svc, "addr": str(ipaddress.IPv4Address("172.20.0.0") + i * 10 + j), "port": 80})
    busy = next(iter(bal.services.values()))
    slot = next(iter(busy.dests.values())).slot
    z = dict.fromkeys(("conns", "inpkts", "outpkts", "inbytes", "outbytes"), 0)
    reads = []

    import threading

    on_loop = []

    class Maps:
        def all_stats(self, name):
            on_loop.append(threading.current_thread() is threading.main_thread())
            reads.append(name)
            k = len(reads) // 2  # readings so far: 0 before the first tick's pair
            if name == "svc_stats":
                return {busy.svc_id: dict(z, conns=4 * k)} if k else {}
            return {slot: dict(z, conns=4 * k, inpkts=40 * k)} if k else {}

    class Fake:
        pass

    d = Fake()
    d.bal, d.maps, d.rates = bal, Maps(), {}
    task = asyncio.ensure_future(Daemon._estimator(d, interval=0.05))
    try:
        while len(reads) < 4:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert on_loop and not any(on_loop), "the arrays are read whole in a worker thread, not on the event loop"
    assert set(d.rates) == {("svc", busy.svc_id), ("dest", slot)}, len(d.rates)
    assert d.rates[("dest", slot)]["cps"] == 80 and d.rates[("dest", slot)]["inpps"] == 800
    other = list(busy.dests.values())[1].slot
    assert d.rates.get(("dest", other), ZERO_RATES) == ZERO_RATES


async def test_the_estimator_logs_a_real_server_once_when_it_becomes_overloaded(caplog):
    """The estimator logs what refresh_dynamic found newly overloaded (it no longer walks every real server
    before and after: 25 ms an interval at 10k x 10), once, not again while it stays overloaded."""
    import asyncio
    import logging

    from hdslb.balancer import Balancer, Iface, NullDataPath
    from hdslb.daemon import Daemon

    bal = Balancer(NullDataPath(), {"eth1": Iface("eth1", 3, b"\x04" * 6, 1500)})
    svc = {"proto": "tcp", "addr": "10.200.0.1", "port": 80}
    bal.service_add(dict(svc, sched="rr"))
    bal.dest_add({"svc": svc, "addr": "172.20.0.1", "port": 80, "u_threshold": 3})
    bal.dest_add({"svc": svc, "addr": "172.20.0.2", "port": 80})
    counts = {}
    bal.conn_counts = lambda: counts
    ticks = []
    z = dict.fromkeys(("conns", "inpkts", "outpkts", "inbytes", "outbytes"), 0)

    class Maps:
        def svc_stats(self, svc_id):
            ticks.append(svc_id)
            return dict(z)

        def dest_stats(self, slot):
            return dict(z)

    class Fake:
        pass

    d = Fake()
    d.bal, d.maps, d.rates = bal, Maps(), {}
    caplog.set_level(logging.INFO, logger="hdslb")
    task = asyncio.ensure_future(Daemon._estimator(d, interval=0.02))
    try:
        while len(ticks) < 2:
            await asyncio.sleep(0.01)
        counts[0] = (2, 2)  # 4 >= u_threshold 3
        while len(ticks) < 6:
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    said = [r.getMessage() for r in caplog.records if "overloaded" in r.getMessage()]
    assert said == ["real server 172.20.0.1:80 overloaded (u_threshold 3): no new flows"]


def _evictions(bound=None, entries4=900):
    maps = types.SimpleNamespace(evicted_bound=bound, last_count={4: entries4, 6: 0})
    return types.SimpleNamespace(maps=maps, sizes=types.SimpleNamespace(max_conns=1000, conn6_entries=lambda: 256),
                                 _evicted=0, _evicted_logged=None, _evicted_logged_at=float("-inf"))


def test_evicted_never_decreases():
    """/metrics exports it as a counter: a lower figure from a later count (a count reads a live table) would be
    read by Prometheus as a reset, and rate() would count the whole figure again."""
    d = _evictions()
    assert Daemon.evicted(d) == 0, "no count yet"
    for bound, want in ((40, 40), (35, 40), (0, 40), (52, 52)):
        d.maps.evicted_bound = bound
        assert Daemon.evicted(d) == want


def test_evictions_are_logged_when_they_grow_at_most_once_a_minute(caplog, monkeypatch):
    import logging

    from hdslb import daemon

    clock = [1000.0]
    monkeypatch.setattr(daemon.time, "monotonic", lambda: clock[0])
    d = _evictions()
    caplog.set_level(logging.INFO, logger=daemon.log.name)
    Daemon._note_evictions(d)
    assert caplog.records == [], "no count of the tables yet: nothing known"
    d.maps.evicted_bound = 300                        # evicted before this daemon started: the base, said once
    Daemon._note_evictions(d)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "connection tables: their LRU evicted 300 entries before this start")]
    caplog.clear()
    d.maps.evicted_bound = 300 + daemon.EVICTION_LOG_MIN - 1   # within a count's error: not a warning
    Daemon._note_evictions(d)
    assert caplog.records == []
    d.maps.evicted_bound = 1300
    Daemon._note_evictions(d)
    (r,) = caplog.records
    assert r.levelname == "WARNING"
    msg = r.getMessage()
    assert msg.startswith("connection table full: its LRU evicted 1000 entries since hdslbd started (1300 in all)")
    assert "in use: 900 of 1000 IPv4 entries, 0 of 256 IPv6" in msg and "--max-conns" in msg, msg
    caplog.clear()
    clock[0] += daemon.EVICTION_LOG_S - 1             # more, within the minute: held back
    d.maps.evicted_bound = 2000
    Daemon._note_evictions(d)
    assert caplog.records == []
    clock[0] += 1
    Daemon._note_evictions(d)
    (r,) = caplog.records
    assert r.getMessage().startswith(f"connection table full: its LRU evicted 700 entries in the last "
                                     f"{daemon.EVICTION_LOG_S:.0f} s (2000 in all)")


async def test_the_estimator_reads_adopted_counters_as_a_base_not_as_one_interval_of_traffic():
    """After a restart the counters are the pinned maps' totals (everything the previous daemon counted). The
    first reading is only the base rates are taken from: ipvsadm --rate right after a restart showed the whole
    total as one interval's traffic (25 CPS and 153 pps after 51 connections, 2 s after `hdslb-ctl up`, with no
    traffic at all). Found by restarting hdslbd in a netns lab and running ipvsadm -Ln --rate."""
    import asyncio

    from hdslb.balancer import Balancer, Iface, NullDataPath
    from hdslb.ctl.commands import ZERO_RATES
    from hdslb.daemon import Daemon

    bal = Balancer(NullDataPath(), {"eth1": Iface("eth1", 3, b"\x04" * 6, 1500)})
    svc = {"proto": "tcp", "addr": "10.200.0.1", "port": 80}
    bal.service_add(dict(svc, sched="rr"))
    bal.dest_add({"svc": svc, "addr": "172.20.0.1", "port": 80})
    slot = next(iter(bal.get_service(svc).dests.values())).slot
    total = {"conns": 1_000_000, "inpkts": 6_000_000, "outpkts": 4_000_000, "inbytes": 9 * 10**8,
             "outbytes": 8 * 10**8}
    moved = {"n": 0}  # 10 new connections from the third reading on
    ticks = []

    class Maps:
        def svc_stats(self, svc_id):
            ticks.append(svc_id)
            return dict(total, conns=total["conns"] + 10 * moved["n"])

        def dest_stats(self, s):
            return dict(total, conns=total["conns"] + 10 * moved["n"])

    class Fake:
        pass

    d = Fake()
    d.bal, d.maps, d.rates = bal, Maps(), {}
    task = asyncio.ensure_future(Daemon._estimator(d, interval=0.05))
    seen = []
    try:
        for n in (1, 2):  # the first reading (the base), then a second with nothing moved
            while len(ticks) < n:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.005)
            seen.append(dict(d.rates.get(("svc", bal.get_service(svc).svc_id), ZERO_RATES)))
        moved["n"] = 1
        while len(ticks) < 3:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.005)
    finally:
        task.cancel()
    assert seen == [ZERO_RATES, ZERO_RATES], "nothing moved since the start: no rate"
    assert d.rates[("svc", bal.get_service(svc).svc_id)]["cps"] == 200  # 10 connections in 0.05 s
    assert d.rates[("dest", slot)]["cps"] == 200
