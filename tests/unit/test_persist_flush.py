"""Persistence template flushes over the maps (MapDataPath.persist_flush): gathered into one pass per event-loop
iteration, in a worker thread.

Every flush reads the whole persist_map. Measured against the compiled program with a full table (65,536
templates) and one -p service: 5 real servers going down in one burst of health verdicts took 0.71 s of the event
loop, ~0.14 s a server; a rack of 200 would have held it ~30 s (health checks, the slow path's ARP/ND answers and
control calls waiting), and a reload removing servers paid the same per server."""

from __future__ import annotations

import asyncio
import threading

from hdslb.balancer import Balancer, Iface
from hdslb.daemon import MapDataPath

SVC = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}
RS = [f"192.168.100.{i}" for i in range(2, 9)]


class FakeMaps:
    """Records the template removals (and the thread they ran on); every other map write is accepted."""

    def __init__(self):
        self.passes: list = []  # (pairs, on the main thread)

    def del_persists(self, svc_id, slot=None):
        self.passes.append(({(svc_id, slot)}, threading.current_thread() is threading.main_thread()))

    def del_persists_many(self, pairs):
        self.passes.append((set(pairs), threading.current_thread() is threading.main_thread()))

    def __getattr__(self, name):
        return lambda *a, **k: None


def model():
    maps = FakeMaps()
    b = Balancer(MapDataPath(maps), {"eth0": Iface("eth0", 2, b"\x02" * 6, 1500)})
    b.service_add(dict(SVC, sched="rr", persistent=300))
    for rs in RS:
        b.dest_add({"svc": SVC, "addr": rs, "port": 80, "fwd": "fnat"})
    return b, maps


def test_a_burst_of_down_verdicts_flushes_in_one_pass_off_the_loop():
    b, maps = model()
    svc = b.get_service(SVC)
    slots = {d.slot for d in svc.dests.values()}

    async def main():
        b.dest_health_many([({"svc": SVC, "addr": rs, "port": 80}, False, None, "timeout") for rs in RS[:5]])
        b.dest_del({"svc": SVC, "addr": RS[5], "port": 80})  # and a removal in the same iteration
        for _ in range(200):
            await asyncio.sleep(0.01)
            if maps.passes and not getattr(b.dp, "_flushing", False):
                break

    asyncio.run(main())
    down = {d.slot for d in svc.dests.values() if d.health == "down"}
    gone = (slots - {d.slot for d in svc.dests.values()}).pop()
    assert len(maps.passes) == 1, f"{len(maps.passes)} reads of the template table for one burst"
    pairs, on_main = maps.passes[0]
    assert pairs == {(svc.svc_id, s) for s in down | {gone}}
    assert not on_main, "the template table was read on the event loop's thread"


def test_requests_made_while_a_pass_runs_get_the_next_pass():
    b, maps = model()
    svc = b.get_service(SVC)

    async def main():
        b.dest_health({"svc": SVC, "addr": RS[0], "port": 80}, False, None, "timeout")
        await asyncio.sleep(0)  # the first pass has started
        b.dest_health({"svc": SVC, "addr": RS[1], "port": 80}, False, None, "timeout")
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(maps.passes) == 2 and not getattr(b.dp, "_flushing", False):
                break

    asyncio.run(main())
    by = {str(d.addr): d.slot for d in svc.dests.values()}
    assert [p for p, _ in maps.passes] == [{(svc.svc_id, by[RS[0]])}, {(svc.svc_id, by[RS[1]])}]
    assert not any(on_main for _, on_main in maps.passes)


def test_without_a_running_loop_templates_go_at_once():
    b, maps = model()
    svc = b.get_service(SVC)
    d = next(iter(svc.dests.values()))
    b.dest_del({"svc": SVC, "addr": str(d.addr), "port": 80})
    assert maps.passes == [({(svc.svc_id, d.slot)}, True)]


def test_a_flush_asked_while_stopping_still_runs():
    """hdslbd stopping: the loop's executor is shut down; the pass runs on the loop's thread, as flushes did."""
    b, maps = model()
    svc = b.get_service(SVC)
    d = next(iter(svc.dests.values()))

    async def main():
        await asyncio.get_running_loop().shutdown_default_executor()
        b.dest_del({"svc": SVC, "addr": str(d.addr), "port": 80})
        for _ in range(20):
            await asyncio.sleep(0.005)

    asyncio.run(main())
    assert maps.passes == [({(svc.svc_id, d.slot)}, True)]
    assert not b.dp._flushing
