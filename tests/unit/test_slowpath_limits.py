"""The slow path's limits: a bounded neighbour table (gc_thresh2/3), per-frame work independent of its size, map
writes that fail without being lost, and the bound on all unresolved queues together."""

import ipaddress
from types import SimpleNamespace

import pytest
from scapy.layers.l2 import ARP, Ether

from hdslb.slowpath.dispatch import Actions, SlowPath
from hdslb.slowpath.neigh import (DEFAULT_GC_THRESH2, DEFAULT_GC_THRESH3, DEFAULT_UNRES_QBYTES, GC_THRESH3_INTERVAL,
                                  MAX_NEIGH, Entry, NeighEvents, NeighTable, State, gc_thresholds)
from hdslb.slowpath.runner import SlowPathRunner

from .test_slowpath_dispatch import CLIENT, M0, M1, RS2, Clock, arp_rep, fnat_frame
from .test_slowpath_dispatch import bal as bal  # noqa: F401  (fixture)

A = ipaddress.ip_address
MAC = bytes.fromhex("525400000042")
VIP = "10.0.0.100"


@pytest.fixture
def clock():
    return Clock()


def spoofed_request(i: int, tpa: str = VIP) -> bytes:
    """An ARP request for our address from the i-th of many made-up senders."""
    spa = str(A("172.16.0.0") + i)
    return bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=CLIENT) / ARP(op=1, hwsrc=CLIENT, psrc=spa, pdst=tpa))


def fill(tbl: NeighTable, n: int, state=State.STALE, start: int = 0, at: float | None = None) -> list:
    """n learned entries straight into the table (what n senders would leave), oldest first."""
    ips = []
    for i in range(start, start + n):
        ip = A("172.16.0.0") + i
        t = tbl.now() if at is None else at
        tbl.entries[ip] = Entry(ip=ip, ifname="eth0", state=state, mac=None if state is State.FAILED else MAC,
                                updated=t)
        ips.append(ip)
    return ips


# --- defaults ---------------------------------------------------------------------------------------
def test_default_thresholds_leave_half_the_map_to_static_entries():
    assert (DEFAULT_GC_THRESH2, DEFAULT_GC_THRESH3) == (4096, 8192) == gc_thresholds(MAX_NEIGH)
    assert gc_thresholds(64) == (16, 32)


# --- per-frame cost ---------------------------------------------------------------------------------
class WalkCounting(dict):
    """The neighbour table's dict, counting every walk over it (a frame must cost no walk)."""

    walks = 0

    def _walk(self):
        type(self).walks += 1

    def items(self):
        self._walk()
        return super().items()

    def values(self):
        self._walk()
        return super().values()

    def keys(self):
        self._walk()
        return super().keys()

    def __iter__(self):
        self._walk()
        return super().__iter__()


def test_a_frame_costs_no_walk_of_the_table_nor_of_the_static_entries(bal, clock):
    tbl = NeighTable(now=clock, gc_thresh2=20000, gc_thresh3=20000)
    sp = SlowPath(bal, tbl, now=clock, proactive=False)
    fill(tbl, 10000)
    tbl.entries = WalkCounting(tbl.entries)
    WalkCounting.walks = 0
    bal.neigh_add({"addr": "192.168.100.3", "lladdr": "52:54:00:00:00:03", "ifname": "eth1"})
    sp.handle("eth0", spoofed_request(20000))
    syncs = sp.static_syncs
    for i in range(200):  # requests from new senders, unresolved frames, replies: none walks anything
        sp.handle("eth0", spoofed_request(20001 + i))
        sp.handle("eth0", fnat_frame(dst="192.168.100.3"))
        sp.handle("eth1", arp_rep("192.168.100.3", RS2, "192.168.100.200", M1))
    assert WalkCounting.walks == 0, "a frame walked the neighbour table"
    assert sp.static_syncs == syncs, "a frame re-synced the static neighbours with none changed"
    assert len(tbl) == 10202

    # a static neighbour added or deleted counts from the next frame (one sync), still without a walk
    bal.neigh_add({"addr": "192.168.100.2", "lladdr": RS2, "ifname": "eth1"})
    sp.handle("eth0", spoofed_request(30000))
    assert sp.static_syncs == syncs + 1 and tbl.get("192.168.100.2").state is State.PERMANENT
    bal.neigh_del({"addr": "192.168.100.2"})
    sp.handle("eth0", spoofed_request(30001))
    assert sp.static_syncs == syncs + 2 and "192.168.100.2" not in tbl
    assert WalkCounting.walks == 0


def test_actions_take_a_write_for_a_new_address_without_rewriting_their_lists():
    act = Actions()
    updates, deletes = act.neigh_updates, act.neigh_deletes
    for i in range(5000):  # what one forced GC hands over: thousands of deletes, then an update
        act.neigh_del(A("172.16.0.0") + i, "eth0")
    act.neigh_set(A("10.9.0.1"), MAC, "eth0")
    assert act.neigh_updates is updates and act.neigh_deletes is deletes, "a list was rebuilt"
    assert len(deletes) == 5000 and updates == [(A("10.9.0.1"), MAC, "eth0", False)]
    act.neigh_set(A("172.16.0.7"), MAC, "eth0")  # one address again: still one op for it, the last
    act.neigh_del(A("10.9.0.1"), "eth0")
    assert act.neigh_updates == [(A("172.16.0.7"), MAC, "eth0", False)] and len(act.neigh_deletes) == 5000
    assert act.neigh_deletes[-1] == (A("10.9.0.1"), "eth0") and (A("172.16.0.7"), "eth0") not in act.neigh_deletes


def test_the_frame_that_runs_a_forced_gc_hands_over_every_delete(bal, clock):
    sp = SlowPath(bal, NeighTable(now=clock), now=clock, proactive=False)
    fill(sp.neigh, 10000, at=clock() - 10)
    act = sp.handle("eth0", spoofed_request(20000))
    assert len(act.neigh_deletes) == 10000 - DEFAULT_GC_THRESH2 and len(act.neigh_updates) == 1
    assert sp.neigh.learned == DEFAULT_GC_THRESH2 + 1 and act.counters["neigh_gc_forced"] == 10000 - 4096


def test_a_static_neighbour_whose_mac_changed_in_place_is_taken_on_the_next_tick(bal, clock):
    sp = SlowPath(bal, NeighTable(now=clock), now=clock, proactive=False)
    bal.neigh_add({"addr": "192.168.100.3", "lladdr": "52:54:00:00:00:03", "ifname": "eth1"})
    sp.handle("eth0", spoofed_request(1))
    bal.neigh_add({"addr": "192.168.100.3", "lladdr": "52:54:00:00:00:33", "ifname": "eth1"})  # same count
    sp.tick()
    assert sp.neigh.get("192.168.100.3").mac == bytes.fromhex("525400000033")


# --- the bound --------------------------------------------------------------------------------------
def test_spoofed_arp_requests_cannot_grow_the_table_past_thresh3(bal, clock):
    tbl = NeighTable(now=clock, gc_thresh2=50, gc_thresh3=100)
    sp = SlowPath(bal, tbl, now=clock, proactive=False)
    writes = 0
    for i in range(2000):
        act = sp.handle("eth0", spoofed_request(i))
        assert act.counters["arp_reply"] == 1, "the request is answered whether or not its sender is kept"
        writes += len(act.neigh_updates)
        clock.advance(0.001)
        assert tbl.learned <= 100
    c = sp.counters
    # a forced GC at 100 (down to 50) at most once a second: 2 s of flood -> at most 3 GCs
    assert 1 <= c["neigh_gc_forced"] // 50 <= 3 and c["neigh_gc_forced"] % 50 == 0
    assert c["neigh_table_full"] == 2000 - writes
    assert writes == 100 + c["neigh_gc_forced"], "a map write for every entry made, none for one refused"


def test_a_full_table_costs_one_forced_gc_a_second_not_one_a_frame(clock):
    tbl = NeighTable(now=clock, gc_thresh2=5, gc_thresh3=10)
    calls = []
    real = tbl.forced_gc
    tbl.forced_gc = lambda now, ev: calls.append(now) or real(now, ev)
    for ip in fill(tbl, 10, state=State.INCOMPLETE):  # all in use: frames wait on every one
        tbl.entries[ip].queue.append(("eth1", b"x" * 60))
    for i in range(100):
        ev = tbl.learn(A("10.9.0.0") + i, MAC, "eth0", confirmed=False)
        assert not ev.updates and ev.counters["neigh_table_full"] == 1
        clock.advance(0.005)
    assert len(calls) == 1 and tbl.learned == 10
    clock.advance(GC_THRESH3_INTERVAL)
    tbl.learn(A("10.9.1.0"), MAC, "eth0", confirmed=False)
    assert len(calls) == 2


def test_forced_gc_never_evicts_static_wanted_or_queued_entries(clock):
    tbl = NeighTable(now=clock, gc_thresh2=2, gc_thresh3=6)
    tbl.set_permanent(A("192.168.100.9"), MAC, "eth1")
    tbl.keep_wanted({A("192.168.100.2"): "eth1"})  # INCOMPLETE, wanted
    tbl.resolve(A("192.168.100.3"), "eth1", b"frame")  # INCOMPLETE, a frame waits on it
    tbl.learn(A("192.168.100.2"), MAC, "eth1", confirmed=True)
    fill(tbl, 20, start=100)
    ev = NeighEvents()
    tbl.forced_gc(clock(), ev)
    assert {str(ip) for ip in tbl.entries} == {"192.168.100.9", "192.168.100.2", "192.168.100.3"}
    assert ev.counters["neigh_gc_forced"] == 20 and len(ev.deletes) == 20
    assert tbl.get("192.168.100.3").queue


def test_forced_gc_evicts_failed_then_stale_then_the_rest_least_recent_first(clock):
    tbl = NeighTable(now=clock, gc_thresh2=3, gc_thresh3=100)
    reach_old = fill(tbl, 2, state=State.REACHABLE, start=0, at=clock() - 30)
    stale_new = fill(tbl, 2, state=State.STALE, start=10, at=clock() - 1)
    stale_old = fill(tbl, 2, state=State.STALE, start=20, at=clock() - 50)
    failed = fill(tbl, 1, state=State.FAILED, start=30)
    ev = NeighEvents()
    assert tbl.forced_gc(clock(), ev) == 4
    assert set(tbl.entries) == set(reach_old) | {stale_new[1]} or set(tbl.entries) == set(reach_old) | {stale_new[0]}
    assert not set(failed + stale_old) & set(tbl.entries)
    assert (failed[0], "eth0") not in ev.deletes, "a FAILED entry has nothing in the map"


def test_static_entries_do_not_count_against_the_thresholds(clock):
    tbl = NeighTable(now=clock, gc_thresh2=2, gc_thresh3=3)
    for i in range(10):
        tbl.set_permanent(A("192.168.1.0") + i, MAC, "eth1")
    for i in range(3):
        assert tbl.learn(A("10.9.0.0") + i, MAC, "eth0", confirmed=False).updates
    assert tbl.learned == 3 and len(tbl) == 13
    tbl.remove(A("192.168.1.0"))
    assert tbl.learned == 3 and len(tbl.static_ips) == 9


def test_unresolved_next_hop_refused_at_thresh3_drops_its_frame(clock):
    tbl = NeighTable(now=clock, gc_thresh2=1, gc_thresh3=2)
    for i in range(2):
        tbl.resolve(A("192.168.100.10") + i, "eth1", b"f" * 100)
    mac, ev = tbl.resolve(A("192.168.100.20"), "eth1", b"f" * 100)
    assert mac is None and ev.dropped == 1 and not ev.probes and ev.counters["neigh_table_full"] == 1
    assert A("192.168.100.20") not in tbl.entries


def test_adopting_more_than_thresh3_deletes_the_rest_from_the_map(clock):
    tbl = NeighTable(now=clock, gc_thresh2=2, gc_thresh3=4)
    deletes = []
    for i in range(10):
        deletes += tbl.adopt(A("10.9.0.0") + i, MAC, "eth0").deletes
    assert tbl.learned == 4 and len(deletes) == 6 and not set(ip for ip, _ in deletes) & set(tbl.entries)


# --- map writes -------------------------------------------------------------------------------------
class FlakyMaps:
    """A neighbour map that refuses writes for the addresses in `full` (as a full BPF hash map does)."""

    def __init__(self):
        self.neigh: dict = {}
        self.full: set = set()

    def set_neigh(self, ip, mac, ifindex, permanent):
        if ip in self.full:
            raise Exception("Could not update table: [Errno 7] Argument list too long")
        self.neigh[ip] = (mac, ifindex, permanent)

    def del_neigh(self, ip):
        if ip in self.full:
            raise OSError(1, "Operation not permitted")
        self.neigh.pop(ip, None)


@pytest.fixture
def runner(bal):
    d = SimpleNamespace(bal=bal, maps=FlakyMaps(), sizes=SimpleNamespace(max_neigh=64))
    return SlowPathRunner(d)


def test_runner_thresholds_follow_the_fast_paths_map_size(runner):
    assert (runner.neigh.gc_thresh2, runner.neigh.gc_thresh3) == (16, 32)
    st = runner.stats()["neigh"]
    assert st["gc_thresh3"] == 32 and st["write_pending"] == 0 and st["entries"] == 0
    assert st["unres_bytes"] == 0 and st["unres_qbytes"] == DEFAULT_UNRES_QBYTES == 8 << 20


def test_a_failed_map_write_is_counted_kept_and_retried_never_raised(runner):
    maps = runner.d.maps
    a, b, c = A("192.168.100.2"), A("192.168.100.3"), A("192.168.100.4")
    maps.full = {b}
    act = Actions(neigh_updates=[(a, MAC, "eth1", False), (b, MAC, "eth1", False), (c, MAC, "eth1", False)])
    runner.carry_out(act)  # must not raise
    assert set(maps.neigh) == {a, c}, "the writes after the failed one still land"
    assert runner.sp.counters["neigh_write_failed"] == 1 and set(runner.dirty) == {b}
    assert runner.stats()["neigh"]["write_pending"] == 1
    assert runner.retry_dirty() == 0 and runner.sp.counters["neigh_write_failed"] == 2
    maps.full = set()
    assert runner.retry_dirty() == 1 and maps.neigh[b] == (MAC, 3, False) and not runner.dirty


def test_a_newer_write_replaces_a_pending_one(runner):
    maps = runner.d.maps
    b = A("192.168.100.3")
    maps.full = {b}
    runner.carry_out(Actions(neigh_updates=[(b, MAC, "eth1", False)]))
    runner.carry_out(Actions(neigh_deletes=[(b, "eth1")]))
    assert runner.dirty == {b: (b, "eth1")}, "the pending write is the delete now, not the stale set"
    maps.full = set()
    maps.neigh[b] = "left over"
    runner.retry_dirty()
    assert b not in maps.neigh and not runner.dirty


def test_retries_are_bounded_per_tick(runner):
    maps = runner.d.maps
    ips = [A("192.168.0.0") + i for i in range(10)]
    maps.full = set(ips)
    runner.carry_out(Actions(neigh_updates=[(ip, MAC, "eth1", False) for ip in ips]))
    failed = runner.sp.counters["neigh_write_failed"]
    maps.full = set()
    assert runner.retry_dirty(limit=4) == 4 and len(runner.dirty) == 6
    assert runner.sp.counters["neigh_write_failed"] == failed


def test_adopted_neighbours_beyond_thresh3_are_deleted_from_the_map(runner):
    runner.neigh.gc_thresh2, runner.neigh.gc_thresh3 = 2, 4
    act = runner.sp.adopt((A("10.9.0.0") + i, MAC, "eth0") for i in range(10))
    assert len(runner.neigh) == 4 and len(act.neigh_deletes) == 6 and not act.neigh_updates


def test_map_writes_land_even_when_a_send_raises(runner):
    class Broken:
        def send_batch(self, frames):
            raise OSError(105, "No buffer space available")

    runner.socks[("eth1", 0)] = Broken()
    a = A("192.168.100.2")
    with pytest.raises(OSError):
        runner.carry_out(Actions(tx=[("eth1", b"frame")], neigh_updates=[(a, MAC, "eth1", False)]))
    assert a in runner.d.maps.neigh


# --- unresolved queues ------------------------------------------------------------------------------
def test_all_unresolved_queues_together_are_bounded_in_bytes(bal, clock):
    tbl = NeighTable(now=clock, unres_queue_length=128, unres_qbytes=10_000)
    sp = SlowPath(bal, tbl, now=clock, proactive=False)
    assert len(fnat_frame(payload=b"x" * 946)) == 1000
    for i in range(30):  # three next hops in turn, ten frames each: room for ten 1000-byte frames in all
        act = sp.handle("eth0", fnat_frame(dst=f"192.168.100.{10 + i % 3}", payload=b"x" * 946))
    assert tbl.unres_bytes == 10_000 and sum(len(e.queue) for e in tbl.entries.values()) == 10
    assert sp.counters["unres_bytes_full"] == 20 and sp.counters["unres_dropped"] == 20
    assert act.counters["unres_bytes_full"] == 1
    # what leaves a queue gives its bytes back: sent once resolved, dropped once failed
    sp.handle("eth1", arp_rep("192.168.100.10", RS2, "192.168.100.200", M1))
    assert tbl.unres_bytes == 10_000 - 4000  # .10 had frames 0, 3, 6 and 9
    for _ in range(4):
        sp.tick()
        clock.advance(1)
    assert tbl.unres_bytes == 0
    assert sp.handle("eth0", fnat_frame(dst="192.168.100.20")).counters["unres_queued"] == 1


# --- established connections follow a moved MAC ----------------------------------------------------------------
class RemacMaps(FlakyMaps):
    def __init__(self):
        super().__init__()
        self.remacs: list = []

    def conn_remac(self, old, new, ifindex):
        self.remacs.append((old, new, ifindex))
        return 7


def test_a_wanted_next_hop_whose_mac_moved_takes_its_connections_along(bal, caplog):
    """Found in a lab: a real server's MAC changed; the neighbour table followed, new flows worked, but a busy UDP
    flow's entry kept the old MAC and every request timed out. The runner now moves the connections when it
    writes a wanted next hop's new MAC; a client's MAC moving (not wanted) costs no walk of the tables."""
    import logging

    caplog.set_level(logging.WARNING, logger="hdslb.slowpath")
    d = SimpleNamespace(bal=bal, maps=RemacMaps(), sizes=SimpleNamespace(max_neigh=64))
    r = SlowPathRunner(d)
    rs, client = A("192.168.100.2"), A("192.168.100.9")
    r.neigh.wanted = {rs: "eth1"}
    old, new = bytes.fromhex("525400000002"), bytes.fromhex("0242deadbe01")
    r.carry_out(Actions(neigh_updates=[(rs, old, "eth1", False), (client, old, "eth1", False)]))
    assert d.maps.remacs == [], "a first MAC moves nothing"
    r.carry_out(Actions(neigh_updates=[(rs, old, "eth1", False)]))
    assert d.maps.remacs == [], "the same MAC again moves nothing"
    r.carry_out(Actions(neigh_updates=[(rs, new, "eth1", False), (client, new, "eth1", False)]))
    assert d.maps.remacs == [(old, new, 3)]
    assert r.stats()["counters"]["conn_remac"] == 7
    assert any("192.168.100.2 moved" in m and "7 connection entries" in m for m in caplog.messages), caplog.messages


async def test_moves_of_a_flapping_mac_run_one_walk_at_a_time(bal):
    """A next hop flapping between two MACs (a server answering ARP from two NICs) started a walk of the whole
    table per flap, each in its own worker thread, piling up. One walk runs at a time; what is asked meanwhile
    waits, one request per old MAC (a later one replaces its target), and runs after, in order."""
    import asyncio
    import threading

    gate = threading.Event()

    class Slow(RemacMaps):
        def conn_remac(self, old, new, ifindex):
            gate.wait(5)
            return super().conn_remac(old, new, ifindex)

    d = SimpleNamespace(bal=bal, maps=Slow(), sizes=SimpleNamespace(max_neigh=64))
    r = SlowPathRunner(d)
    rs = A("192.168.100.2")
    r.neigh.wanted = {rs: "eth1"}
    a, b = bytes.fromhex("525400000002"), bytes.fromhex("0242deadbe01")
    for mac in (a, b, a, b, a, b):  # five moves while the first walk is held
        r.carry_out(Actions(neigh_updates=[(rs, mac, "eth1", False)]))
    assert r._remac_busy and len(r._remac_waiting) == 2  # a->b running; b->a and a->b waiting, one each
    gate.set()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if not r._remac_busy and not r._remac_waiting:
            break
    assert d.maps.remacs == [(a, b, 3), (b, a, 3), (a, b, 3)], d.maps.remacs  # ends on b, the MAC written last
