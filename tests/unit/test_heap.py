"""The daemon keeps its long-lived model out of CPython's full collections (hdslb.heap): after a bulk change has
settled (the coalesced save), what is alive is frozen, so later full collections walk only what is new; small
changes do not pay a collection each; cycles that died meanwhile are collected at the next settle."""

import gc

import pytest

from hdslb.balancer import Balancer
from hdslb.ctl import commands
from hdslb.daemon import Daemon, settings_from_args
from hdslb.heap import HeapSettler, model_size

from .test_balancer import Recorder
from .test_batch import IFACES


@pytest.fixture
def unfrozen():
    """Whatever a test froze is given back to the collector afterwards (the runner's heap is not ours)."""
    yield
    gc.unfreeze()


def _daemon(tmp_path) -> Daemon:
    d = Daemon(settings_from_args(["eth0", "--state-dir", str(tmp_path / "state"), "--pin-root", str(tmp_path / "b")]))
    d.bal = Balancer(Recorder(), dict(IFACES), max_services=4096, max_dests=65535)
    d.ctl_checks = {}
    return d


def _load(d: Daemon, n_svc: int, rs_per: int, base: int = 0) -> list:
    dests = []
    for i in range(base, base + n_svc):
        svc = {"proto": "tcp", "addr": f"10.1.{i // 256}.{i % 256}", "port": 80}
        d.bal.service_add(dict(svc, sched="rr"))
        for j in range(rs_per):
            n = i * rs_per + j
            dests.append(d.bal.dest_add({"svc": svc, "addr": f"172.16.{n // 256}.{n % 256}", "port": 80}))
    return dests


def _frozen(objs) -> bool:
    """Whether these objects are in the permanent generation: gc.get_objects() lists only the collected ones."""
    ids = {id(o) for o in objs}
    return not any(id(o) in ids for o in gc.get_objects())


def test_a_bulk_load_is_frozen_once_it_settles_and_small_changes_are_not(tmp_path, unfrozen):
    d = _daemon(tmp_path)
    d.heap.enabled = True  # as main() does for hdslbd
    dests = _load(d, 300, 10)
    assert not _frozen(dests)  # not yet: the burst has not settled
    d._save_state()
    assert _frozen(dests) and d.heap.settles == 1 and d.heap.size == model_size(d.bal) == 300 * 11
    status = commands.dispatch(d, "daemon.status", {})["heap"]
    assert status["settles"] == 1 and status["frozen_objects"] >= len(dests)

    more = _load(d, 2, 10, base=300)  # a few changes: no collection for them
    d._save_state()
    assert d.heap.settles == 1 and not _frozen(more)

    more += _load(d, 300, 10, base=302)  # another bulk load: frozen again, the new objects too
    d._save_state()
    assert d.heap.settles == 2 and _frozen(more) and _frozen(dests)


def test_off_unless_the_daemon_turns_it_on(tmp_path, unfrozen):
    d = _daemon(tmp_path)
    dests = _load(d, 300, 10)
    d._save_state()
    assert d.heap.settles == 0 and not _frozen(dests) and d.heap.status()["enabled"] is False


def test_a_settle_collects_cycles_that_died_while_frozen(unfrozen):
    class Node:
        pass

    a, b = Node(), Node()
    a.peer, b.peer = b, a  # a cycle: only the cyclic collector frees it
    h = HeapSettler(enabled=True, min_change=1)
    h.settle(10)
    import weakref
    ref = weakref.ref(a)
    del a, b
    gc.collect()
    assert ref() is not None  # frozen: a full collection does not walk it
    h.settle(20)
    assert ref() is None


def test_due_needs_a_big_move():
    h = HeapSettler(enabled=True, min_change=100)
    assert h.due(5)  # never settled
    h.size = 1000
    assert not h.due(1099) and not h.due(901)
    assert not h.due(1249)  # a quarter of 1000 is more than 100
    assert h.due(1250) and h.due(750)


def test_status_does_not_walk_the_frozen_heap(tmp_path, unfrozen, monkeypatch):
    """gc.get_freeze_count() walks every frozen object (7 ms a call at 10k x 10): daemon.status, which monitoring
    and `hdslb-ctl up` poll, reports the count taken at the last settle instead."""
    d = _daemon(tmp_path)
    d.heap.enabled = True
    _load(d, 10, 2)
    d._save_state()
    frozen = d.heap.status()["frozen_objects"]

    def walk():
        raise AssertionError("daemon.status walked the frozen heap")

    monkeypatch.setattr(gc, "get_freeze_count", walk)
    assert commands.dispatch(d, "daemon.status", {})["heap"]["frozen_objects"] == frozen > 0


async def test_inside_a_burst_the_heap_is_settled_only_once_changes_stop(tmp_path, unfrozen, monkeypatch):
    """On the event loop a settle waits until no change has come for HEAP_QUIET_S: settling inside a burst (a full
    collection each time the model grew by a quarter) cost a 10k-request REST load 1.7 s."""
    import asyncio

    from hdslb import daemon as dm

    monkeypatch.setattr(dm, "HEAP_QUIET_S", 0.2)
    d = _daemon(tmp_path)
    d.heap.enabled = True
    for i in range(6):  # a burst: each step a bulk of changes, each saved (as a coalesced save would)
        _load(d, 150, 10, base=150 * i)
        d._state_changed()
        d._save_state()
        await asyncio.sleep(0.05)
        assert d.heap.settles == 0, f"settled inside the burst (step {i})"
    await asyncio.sleep(0.5)  # quiet: now it settles, once, with the whole burst frozen
    assert d.heap.settles == 1 and d.heap.size == model_size(d.bal) == 900 * 11


async def test_a_growing_burst_is_frozen_as_it_goes_without_a_collection(tmp_path, unfrozen, monkeypatch):
    """CPython runs a full collection each time its tracked objects grew by a quarter; inside a burst each walked
    everything the burst had made (0.8 s of a 10k-request REST load). A change that finds the model grown by
    MIN_CHANGE since the last freeze freezes what is alive (no collection: that waits for the burst's end)."""
    import asyncio

    from hdslb import daemon as dm

    monkeypatch.setattr(dm, "HEAP_QUIET_S", 0.3)
    monkeypatch.setattr(dm, "HEAP_GROWTH_CHECK_S", 0.0)  # looked at on every change (hdslbd: every 0.5 s)
    d = _daemon(tmp_path)
    d.heap.enabled = True
    d.heap.settle(model_size(d.bal))  # as at start
    collects = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collects.append(a) or real_collect(*a))
    made = []
    for i in range(6):
        made += _load(d, 150, 10, base=150 * i)
        d._state_changed()
        d._save_state()
        await asyncio.sleep(0.02)
    assert d.heap.settles == 1 and collects == [], "no collection inside the burst"
    assert d.heap.burst_freezes >= 3 and _frozen(made[:1500]), "the model made early in the burst is frozen"
    assert commands.dispatch(d, "daemon.status", {})["heap"]["burst_freezes"] == d.heap.burst_freezes
    small = d.heap.burst_freezes
    _load(d, 1, 1, base=900)  # a small change: no freeze for it
    d._state_changed()
    d._save_state()
    assert d.heap.burst_freezes == small
    await asyncio.sleep(0.6)  # quiet: the settle collects once and freezes everything
    assert d.heap.settles == 2 and len(collects) == 1 and _frozen(made)


async def test_a_bulk_batch_runs_with_the_collector_paused_and_is_frozen_after(tmp_path, unfrozen, monkeypatch):
    """ipvsadm -R of 10k x 10 is one batch: inside it CPython ran ten full collections (1.1 s), each walking what
    the batch had made so far. A batch of BIG_BATCH_OPS ops or more runs with the collector off and what it made
    is frozen right after (a small batch, a REST PUT of one service, changes nothing of the collector)."""
    from hdslb import daemon as dm

    d = _daemon(tmp_path)
    d.heap.enabled = True
    d.heap.settle(model_size(d.bal))
    seen = []
    real = commands.COMMANDS["dest.add"]
    monkeypatch.setitem(commands.COMMANDS, "dest.add", lambda ctx, a: seen.append(gc.isenabled()) or real(ctx, a))

    def batch(n_svc, base):
        ops = []
        for i in range(base, base + n_svc):
            svc = {"proto": "tcp", "addr": f"10.2.{i // 256}.{i % 256}", "port": 80}
            ops.append(["service.add", dict(svc, sched="rr")])
            ops += [["dest.add", {"svc": svc, "addr": f"172.17.{(i * 10 + j) // 256}.{(i * 10 + j) % 256}",
                                  "port": 80}] for j in range(10)]
        return {"ops": ops}

    big = batch(200, 0)
    assert len(big["ops"]) >= dm.BIG_BATCH_OPS
    d.dispatch("batch", big)
    assert seen and not any(seen) and gc.isenabled(), "off inside the bulk batch, on again after it"
    made = [x for s in d.bal.services.values() for x in s.dests.values()]
    assert _frozen(made) and d.heap.burst_freezes == 1
    seen.clear()
    d.dispatch("batch", batch(2, 500))
    assert seen and all(seen) and d.heap.burst_freezes == 1, "a small batch: the collector as it is"


def test_collections_paused_nests_and_leaves_a_collector_that_was_off_off():
    from hdslb.heap import collections_paused

    assert gc.isenabled()
    with collections_paused():
        with collections_paused():
            assert not gc.isenabled()
        assert not gc.isenabled(), "the outer pause still holds"
    assert gc.isenabled()
    gc.disable()
    try:
        with collections_paused():
            pass
        assert not gc.isenabled(), "it was off before: it stays off"
    finally:
        gc.enable()


def test_overlapping_pauses_do_not_keep_cycles_forever(monkeypatch):
    """Two clients listing back to back keep collections_paused() held without a break; once a pause has lasted
    PAUSE_MAX_S, each use that ends collects the young generations, so cycles made meanwhile are freed."""
    import weakref

    from hdslb import heap

    class Node:
        pass

    monkeypatch.setattr(heap, "PAUSE_MAX_S", 0.0)
    outer = heap.collections_paused()
    outer.__enter__()
    try:
        a, b = Node(), Node()
        a.peer, b.peer = b, a
        ref = weakref.ref(a)
        del a, b
        with heap.collections_paused():
            pass  # another use ends while the first still holds the pause
        assert ref() is None and not gc.isenabled()
    finally:
        outer.__exit__(None, None, None)
    assert gc.isenabled()


def test_growth_after_a_shrink_counts_from_the_smaller_model(unfrozen):
    """A flush (ipvsadm -C) and, before the heap settled, a new load: growth was counted from the size before the
    flush, so nothing was frozen until the model was that big again, and CPython's full collections walked all of
    the new load meanwhile (0.7 s of 10k REST PUTs right after a PATCH and a flush)."""
    h = HeapSettler(enabled=True, min_change=100)
    h.settle(10_000)
    assert not h.grew(50)  # the flush: nothing to freeze, growth now counts from 50
    assert not h.grew(120)
    assert h.grew(200) and h.burst_freezes == 1 and h.frozen_size == 200
    assert not h.grew(250) and h.grew(300)
