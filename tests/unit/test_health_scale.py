"""Health checking at scale, shown with fake probes (no sockets, no clock): probe slots sized to the checkers and
the file-descriptor limit, so a blackholed server's probe does not hold up the others; the daemon's side of a burst
of verdicts. What it costs in time is measured by bench/health_scale.py, not here."""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import time
from ipaddress import ip_address

import hdslb.health.manager as manager
from hdslb.health import CheckResult, HealthManager, pairs_of
from hdslb.health.manager import FD_RESERVE, Slots
from hdslb.health.state import ServerState
from tests.unit.test_api_security import BASE, HarnessDaemon
from tests.unit.test_health import Recorder, Scripted, misc_check, real, tcp_check, until, virtual


class Blackhole:
    """A probe that answers at once for some ports and never for the others (until cancelled), as a SYN
    dropped on the way does until connect_timeout."""

    def __init__(self, dead_ports):
        self.dead = set(dead_ports)
        self.answered = set()
        self.hanging = 0

    async def __call__(self, checker, rs):
        if rs.port in self.dead:
            self.hanging += 1
            await asyncio.Event().wait()
        self.answered.add(rs.port)
        return CheckResult(True, "fine")


async def test_blackholed_servers_do_not_hold_up_the_others_checks():
    """300 servers listed first are blackholed, 100 answer, all due at once: every answering one is probed while
    the blackholed probes still hang. With the old fixed 256 probe slots the 100 never got one."""
    dead = range(20000, 20300)
    alive = range(30000, 30100)
    probe = Blackhole(dead)
    servers = [real(p, tcp_check(warmup=0.0)) for p in (*dead, *alive)]
    mgr = HealthManager(Recorder().on_change, probe=probe)
    await mgr.start(pairs_of([virtual(*servers)]))
    try:
        await until(lambda: probe.answered == set(alive))
        assert probe.hanging == 300
        assert mgr.slots == 400
    finally:
        await mgr.stop()


async def test_slots_follow_checkers_added_by_a_reload():
    probe = Blackhole([])
    first = [real(p, tcp_check(warmup=3600.0)) for p in range(40000, 40002)]
    mgr = HealthManager(Recorder().on_change, probe=probe)
    await mgr.start(pairs_of([virtual(*first)]))
    try:
        assert mgr.slots == 2
        more = [real(p, tcp_check(warmup=3600.0)) for p in range(40000, 40300)]
        mgr.update(pairs_of([virtual(*more)]))
        assert mgr.slots == 300
    finally:
        await mgr.stop()


def _limits(monkeypatch, soft, hard):
    now = {"soft": soft, "hard": hard}
    calls = []

    def getrlimit(which):
        assert which == resource.RLIMIT_NOFILE
        return now["soft"], now["hard"]

    def setrlimit(which, lim):
        calls.append(lim)
        now["soft"], now["hard"] = lim

    monkeypatch.setattr(manager.resource, "getrlimit", getrlimit)
    monkeypatch.setattr(manager.resource, "setrlimit", setrlimit)
    return calls


async def test_the_fd_limit_is_raised_to_fit_the_checkers(monkeypatch):
    calls = _limits(monkeypatch, 1024, 65536)
    servers = [real(p, tcp_check(warmup=3600.0)) for p in range(1000, 3000)]
    mgr = HealthManager(Recorder().on_change, probe=Blackhole([]))
    await mgr.start(pairs_of([virtual(*servers)]))
    try:
        assert calls == [(2000 + FD_RESERVE, 65536)]
        assert mgr.slots == 2000
    finally:
        await mgr.stop()


async def test_a_hard_fd_limit_too_low_bounds_the_slots_and_says_so(monkeypatch, caplog):
    calls = _limits(monkeypatch, 1024, 1024)
    servers = [real(p, tcp_check(warmup=3600.0)) for p in range(1000, 3000)]
    mgr = HealthManager(Recorder().on_change, probe=Blackhole([]))
    with caplog.at_level(logging.WARNING, logger="hdslb.health"):
        await mgr.start(pairs_of([virtual(*servers)]))
    try:
        assert calls == []  # already at the hard limit: nothing to raise
        assert mgr.slots == 1024 - FD_RESERVE
        assert any("2000 checkers but room for 768 probes at once" in r.getMessage() and
                   f"to {2000 + FD_RESERVE} or more" in r.getMessage() for r in caplog.records)
    finally:
        await mgr.stop()


async def test_probes_waiting_for_a_slot_are_reported(caplog):
    probe = Blackhole(range(50000, 50003))
    servers = [real(p, tcp_check(warmup=0.0)) for p in range(50000, 50003)]
    mgr = HealthManager(Recorder().on_change, probe=probe, max_concurrent=1)
    with caplog.at_level(logging.WARNING, logger="hdslb.health"):
        await mgr.start(pairs_of([virtual(*servers)]))
        try:
            await until(lambda: probe.hanging == 1 and mgr._slots.waiting == 2)
            msgs = [r.getMessage() for r in caplog.records if "probe slots busy" in r.getMessage()]
            assert len(msgs) == 1 and "all 1 probe slots busy" in msgs[0]  # once, not per waiting probe
        finally:
            await mgr.stop()


async def test_slots_hand_over_in_order_and_grow_at_once():
    slots = Slots(1)
    order = []
    release = asyncio.Event()

    async def holder(name):
        async with slots:
            order.append(name)
            await release.wait()

    tasks = [asyncio.create_task(holder(n)) for n in "abc"]
    await asyncio.sleep(0)
    assert order == ["a"] and slots.waiting == 2
    slots.resize(2)  # a reload added checkers: the first waiter gets in at once
    await asyncio.sleep(0)
    assert order == ["a", "b"] and slots.used == 2
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"] and slots.used == 0 and slots.waiting == 0


async def test_a_waiter_handed_a_slot_and_cancelled_before_it_ran_gives_it_back():
    slots = Slots(1)
    await slots.__aenter__()
    t = asyncio.create_task(slots.__aenter__())
    await asyncio.sleep(0)
    await slots.__aexit__(None, None, None)  # handed to t, which has not run since
    assert slots.used == 1 and slots.waiting == 0
    t.cancel()
    await asyncio.gather(t, return_exceptions=True)
    assert t.cancelled() and slots.used == 0


async def test_a_waiter_cancelled_while_waiting_leaves_no_trace():
    slots = Slots(1)
    async with slots:
        t = asyncio.create_task(slots.__aenter__())
        await asyncio.sleep(0)
        assert slots.waiting == 1
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        assert slots.waiting == 0
    assert slots.used == 0


# ---------------------------------------------------------------- the daemon's side


class SavingDaemon(HarnessDaemon):
    """The harness daemon, counting the model saves it would write (the real save coalescing runs) and how many
    real servers each one would have held down."""

    def _save_state(self):
        self.saved_down = getattr(self, "saved_down", []) + [
            sum(x.health == "down" for s in self.bal.services.values() for x in s.dests.values())]
        self._last_save = time.monotonic()


def _farm(n: int) -> str:
    rs = "".join(f"    real_server 192.168.{1 + i // 250}.{1 + i % 250} 80 {{\n        weight 1\n"
                 f"        TCP_CHECK {{\n            warmup 3600\n        }}\n    }}\n" for i in range(n))
    return BASE.replace("    real_server 192.168.100.2 80 {\n        weight 3\n    }\n", f"    omega\n{rs}")


async def test_a_burst_of_health_verdicts_saves_the_model_once_and_stop_writes_the_last(tmp_path):
    """50 of 100 servers go down at once: the pool takes them in the next loop iteration, the model is saved once for
    the burst (it was once per verdict: 2500 at 5000 real servers took 91 s), and stop() writes what is pending (the
    51st down; omega reports nothing at a stop that leaves the fast path forwarding), as it did when every notice
    saved."""
    conf = tmp_path / "hdslb.conf"
    conf.write_text(_farm(100))
    d = SavingDaemon(conf, tmp_path)
    await d.reload_config()
    try:
        vs_key = next(iter(d.want.values())).vs_key
        d._save_cost = 3600.0  # a save "costs" an hour: every save after the first in the burst waits
        d._last_save = float("-inf")  # no save yet (0.0 would be "an hour ago" only on a machine up for an hour)
        d.saved_down = []
        for i in range(50):
            await d._on_health(vs_key, (ip_address(f"192.168.1.{1 + i}"), 80), False, None, "TCP_CHECK: refused")
        # applied together (Daemon._on_health), in the next loop iteration, or, when the application before took
        # VERDICT_SLOW_S or more (a loaded machine), a little later: a single sleep(0) made this test flaky
        await until(lambda: d._verdict_handle is None)
        svc = next(iter(d.bal.services.values()))
        assert sum(x.health == "down" for x in svc.dests.values()) == 50
        assert d.saved_down == [50]
        await d._on_health(vs_key, (ip_address("192.168.1.51"), 80), False, None, "TCP_CHECK: refused")
        await until(lambda: d._verdict_handle is None)
        assert d.saved_down == [50] and d._save_handle is not None  # the save after it waits
    finally:
        await d.stop()
    assert d.saved_down == [50, 51] and d._save_handle is None


# ---------------------------------------------------------------- quorum weighing


async def test_a_big_pool_failing_server_by_server_is_weighed_per_change_not_per_server(monkeypatch):
    """1000 servers of one virtual server fail one after another over many loop iterations: the quorum sum
    follows each change without summing the whole pool again (that was 9 ms an iteration at 5,000 servers),
    and quorum is lost exactly once, when the live weight falls below it."""
    evaluations = [0]
    weight = ServerState.weight.fget

    def counting(self):
        evaluations[0] += 1
        return weight(self)

    monkeypatch.setattr(ServerState, "weight", property(counting))
    probe, rec = Scripted(), Recorder()
    ports = range(60000, 61000)
    for p in ports:
        probe.ok[p] = False
    servers = [real(p, tcp_check(warmup=0.5, retry=0)) for p in ports]
    vs = virtual(*servers, quorum=500, hysteresis=0)
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, rng=random.Random(7))
    await mgr.start(pairs_of([vs]))
    try:
        await until(lambda: len(rec.changes) == 1000, timeout=10)
        await until(lambda: rec.quorum, timeout=10)
        assert rec.quorum == [(vs.key, True)]
        svc = mgr._services[vs.key]
        assert svc.live == svc.weight_sum() == 0
        assert evaluations[0] < 5 * 1000, evaluations[0]  # ~1 per change; summing every time: > 100,000
    finally:
        await mgr.stop()


async def test_the_live_weight_follows_dynamic_weights_failures_and_reloads():
    probe, rec = Scripted(), Recorder()
    a = real(61001, misc_check("true", dynamic=True, delay_loop=0.02), weight=2)
    b = real(61002, tcp_check(delay_loop=0.02), weight=3)
    c = real(61003, tcp_check(delay_loop=0.02), weight=4)
    vs = virtual(a, b, c, quorum=5, hysteresis=0)
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe)
    await mgr.start(pairs_of([vs]))
    svc = mgr._services[vs.key]
    try:
        await until(lambda: probe.count(61001) >= 1)
        assert svc.live == svc.weight_sum() == 9
        probe.weight[61001] = 10
        await until(lambda: svc.live == 17)
        probe.ok[61002] = False
        await until(lambda: svc.live == 14)
        probe.weight[61001] = 0
        probe.ok[61003] = False
        await until(lambda: rec.quorum)
        assert rec.quorum == [(vs.key, True)] and svc.live == svc.weight_sum() == 0
        b2 = real(61002, tcp_check(delay_loop=0.02), weight=7)  # weight changed, still failing
        mgr.update(pairs_of([virtual(a, b2, quorum=5, hysteresis=0)]))  # c removed
        probe.ok[61002] = True
        await until(lambda: len(rec.quorum) == 2)
        assert rec.quorum[-1] == (vs.key, False) and svc.live == svc.weight_sum() == 7
    finally:
        await mgr.stop()
