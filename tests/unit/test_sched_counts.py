"""The connection counts lc/wlc rings and u_threshold are built from, read without holding the event loop.

The counts scan the whole conn table (bench section 3: 2.8 s at 1M connections). The estimator rebuilt the rings
every 2 s through Balancer.refresh_dynamic, which read them on the event loop whenever any service was lc or wlc
(wlc is ipvsadm's default scheduler) or had a u_threshold: on a busy table the loop was held most of the time, and
the slow path's ARP/ND answers, health checks and control calls waited. Now the estimator reads them in a worker
thread and the model's own reads (a real server added to a wlc service) take that reading while it is no older
than counts_staleness()."""

from __future__ import annotations

import asyncio
import threading
import time
import types

from hdslb.balancer import Balancer, Iface, NullDataPath
from hdslb.daemon import Daemon

SVC = {"proto": "tcp", "addr": "10.200.0.1", "port": 80}


def daemon_like(scans: list):
    """A Daemon's estimator state over a wlc service: conn_counts() records the thread each scan ran on."""
    bal = Balancer(NullDataPath(), {"eth1": Iface("eth1", 3, b"\x04" * 6, 1500)})
    d = types.SimpleNamespace(bal=bal, rates={}, _sched_counts=(0.0, None, 0.0))
    z = dict.fromkeys(("conns", "inpkts", "outpkts", "inbytes", "outbytes"), 0)
    d.maps = types.SimpleNamespace(svc_stats=lambda i: dict(z), dest_stats=lambda s: dict(z))
    d.counts = {}

    def conn_counts():
        scans.append(threading.current_thread() is threading.main_thread())
        return dict(d.counts)

    d.conn_counts = conn_counts
    d.counts_staleness = lambda: 3.0
    # as the daemon wires it (its own conn_counts() where there is no sched_counts)
    bal.conn_counts = lambda: getattr(Daemon, "sched_counts", lambda _d: _d.conn_counts())(d)
    bal.service_add(dict(SVC, sched="wlc"))
    for rs in ("172.20.0.1", "172.20.0.2"):
        bal.dest_add({"svc": SVC, "addr": rs, "port": 80})
    return d


async def _ticks(d, n: int, scans: list):
    task = asyncio.ensure_future(Daemon._estimator(d, interval=0.02))
    try:
        while len(scans) < n:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.005)
    finally:
        task.cancel()


def test_the_estimator_reads_the_counts_off_the_loop_and_builds_the_rings_from_them():
    scans: list = []
    d = daemon_like(scans)
    svc = d.bal.get_service(SVC)
    first, second = (x.slot for x in svc.dests.values())
    d.counts = {first: (40, 0), second: (0, 0)}  # the first server busy: the plan starts with the second
    scans.clear()
    asyncio.run(_ticks(d, 2, scans))
    assert scans and not any(scans), "the conn table was scanned on the event loop's thread"
    assert d._sched_counts[1] == d.counts and d._sched_counts[2] >= 0
    assert d.bal._dyn_seen[svc.svc_id] == ((40, 0), (0, 0)), "the wlc ring was rebuilt from that reading"


def test_a_real_server_change_uses_the_estimators_reading_while_fresh():
    scans: list = []
    d = daemon_like(scans)
    svc = d.bal.get_service(SVC)
    first = next(iter(svc.dests.values())).slot
    d._sched_counts = (time.monotonic(), {first: (40, 0)}, 0.0)
    scans.clear()
    d.bal.dest_add({"svc": SVC, "addr": "172.20.0.3", "port": 80})  # on the loop: no scan
    assert scans == []
    # a big table: the last scan took 5 s, so the next reading comes 2 s + 5 s after it; 6 s old is still the latest
    d._sched_counts = (time.monotonic() - 6, {first: (40, 0)}, 5.0)
    d.bal.dest_edit({"svc": SVC, "addr": "172.20.0.3", "port": 80, "weight": 3})
    assert scans == []
    d._sched_counts = (time.monotonic() - 10, {first: (40, 0)}, 0.0)  # stale: read now
    d.bal.dest_edit({"svc": SVC, "addr": "172.20.0.3", "port": 80, "weight": 2})
    assert scans == [True]


def test_no_lc_wlc_and_no_threshold_no_scan():
    scans: list = []
    d = daemon_like(scans)
    d.bal.service_edit(dict(SVC, sched="rr"))
    d.bal.refresh_dynamic()           # forgets the service (no longer lc/wlc, no threshold)
    assert not d.bal.wants_counts()
    scans.clear()

    async def run():
        task = asyncio.ensure_future(Daemon._estimator(d, interval=0.01))
        await asyncio.sleep(0.06)
        task.cancel()

    asyncio.run(run())
    assert scans == []
