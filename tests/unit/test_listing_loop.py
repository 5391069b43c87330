"""Big listings and the event loop: service.list of many services reads the stats arrays whole (one batched read
each, not a lookup per service and real server), does that read in a worker thread, and builds its reply a chunk
of services at a time, so other control calls (and the slow path's ARP/ND, health checks) are served meanwhile.
The reply is the same as the one built in one go. /metrics collects through the same listing."""

from __future__ import annotations

import asyncio
import ipaddress
import threading

from hdslb.api.metrics import HdslbCollector
from hdslb.ctl import commands
from hdslb.ctl.server import CtlServer
from tests.unit.test_api import FakeCtx, FakeMaps, quick_start, traffic

N_SVC = getattr(commands, "LIST_CHUNK", 200) * 2 + 7  # more than one chunk, and a chunk left over
RS_PER = 10  # N_SVC x (1 + RS_PER) is past BATCH_STATS_MIN


def big_ctx(maps_cls=FakeMaps) -> FakeCtx:
    ctx = quick_start(FakeCtx())
    ctx.maps = maps_cls(ctx)
    for i in range(N_SVC):
        svc = {"proto": "udp", "addr": str(ipaddress.IPv4Address("10.100.0.0") + i), "port": 53}
        ctx.bal.service_add(dict(svc, sched="rr"))
        for j in range(RS_PER):
            d = ctx.bal.dest_add({"svc": svc, "addr": str(ipaddress.IPv4Address("172.16.0.0") + i * RS_PER + j),
                                  "port": 53, "fwd": "fnat"})
            if j % 3:  # some real servers with traffic, some without (absent from the batched read)
                ctx.dest_traffic[d.slot] = traffic(d.slot, 2 * d.slot, 3, 4 * d.slot, 5)
        if i % 2:
            ctx.svc_traffic[ctx.bal.services[("udp", ipaddress.ip_address(svc["addr"]), 53)].svc_id] = \
                traffic(i, i, i, i, i)
    ctx.counts = {s: (s % 4, s % 3) for s in ctx.dest_traffic}
    return ctx


async def ticking(ticks: list, coro):
    """Await coro with a task beside it that appends to ticks each time the event loop runs it."""
    async def ticker():
        while True:
            ticks.append(1)
            await asyncio.sleep(0)

    t = asyncio.ensure_future(ticker())
    try:
        return await coro
    finally:
        t.cancel()


class BatchMaps(FakeMaps):
    """A datapath whose stats arrays can be read whole, as hdslb.fastpath.maps.Maps.all_stats (non-zero slots)."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.whole_reads = []

    def all_stats(self, name):
        self.whole_reads.append((name, threading.current_thread() is threading.main_thread()))
        src = self.ctx.svc_traffic if name == "svc_stats" else self.ctx.dest_traffic
        return {k: dict(v) for k, v in src.items() if any(v.values())}


def counting(ctx):
    """Count the per-key stats reads."""
    calls = []
    svc_stats, dest_stats = ctx.svc_stats, ctx.dest_stats
    ctx.svc_stats = lambda i: calls.append(("svc", i)) or svc_stats(i)
    ctx.dest_stats = lambda s: calls.append(("dest", s)) or dest_stats(s)
    return calls


def test_a_big_listing_reads_the_stats_whole_and_replies_the_same():
    want = commands.dispatch(big_ctx(), "service.list", {"svc": None})  # per-key reads (a datapath without batch)
    ctx = big_ctx(BatchMaps)
    calls = counting(ctx)
    got = commands.dispatch(ctx, "service.list", {"svc": None})
    assert got == want
    assert [list(s) for s in got["services"]] == [list(s) for s in want["services"]]  # fields in the same order
    assert calls == [] and [n for n, _ in ctx.maps.whole_reads] == ["svc_stats", "dest_stats"]
    # a small listing (one service) keeps the per-key reads: reading both arrays whole would cost more
    one = commands.dispatch(ctx, "service.list", {"svc": {"proto": "tcp", "addr": "10.0.0.100", "port": 80}})
    assert one["services"] == [s for s in want["services"] if s["addr"] == "10.0.0.100"]
    assert len(calls) == 3 and len(ctx.maps.whole_reads) == 2


def _race(ctx, first: str, first_args: dict):
    """Send a big service.list and, once it has started, daemon.status-like small call (one service's listing)
    through the control socket's handler; returns (order of the replies, the big reply)."""
    server = CtlServer("/nonexistent", lambda op, a: commands.dispatch(ctx, op, a))
    done = []

    async def main():
        async def big():
            rep = await server.handle(1, first, first_args)
            done.append("big")
            return rep

        async def small():
            await asyncio.sleep(0)  # the big call has begun
            rep = await server.handle(2, "service.list", {"svc": {"proto": "tcp", "addr": "10.0.0.100", "port": 80}})
            assert rep["ok"], rep
            done.append("small")
            small.answered.set()

        small.answered = threading.Event()
        ctx.answered = small.answered
        results = await asyncio.gather(big(), small())
        return results[0]

    rep = asyncio.run(main())
    return done, rep


def test_a_concurrent_control_call_is_answered_before_a_big_listing_ends():
    ctx = big_ctx()  # per-key stats reads on the loop, chunk by chunk
    reads = counting(ctx)
    order, rep = _race(ctx, "service.list", {"svc": None})
    assert order == ["small", "big"]
    assert rep["ok"] and rep["data"] == commands.dispatch(big_ctx(), "service.list", {"svc": None})
    assert reads  # the listing read per key, and the small call got in between its chunks


def test_the_batched_read_runs_off_the_loop_while_it_serves_others():
    class SlowMaps(BatchMaps):
        """A whole-array read that lasts until the loop has answered another control call (or 30 s)."""

        def all_stats(self, name):
            if name == "dest_stats":
                self.loop_answered = self.ctx.answered.wait(30)
            return super().all_stats(name)

    ctx = big_ctx(SlowMaps)
    order, rep = _race(ctx, "service.list", {"svc": None})
    assert ctx.maps.loop_answered, "the loop answered nothing while the stats arrays were read"
    assert [on_main for _, on_main in ctx.maps.whole_reads] == [False, False]  # in a worker thread
    assert order == ["small", "big"] and rep["data"] == commands.dispatch(big_ctx(), "service.list", {"svc": None})


def test_metrics_collected_on_the_loop_are_those_collected_in_one_go():
    ctx = big_ctx(BatchMaps)
    want = HdslbCollector(ctx).collect_families()  # no loop running: built in one go

    async def scrape():
        return await HdslbCollector(ctx).collect_families_async()

    got = asyncio.run(scrape())
    assert [(f.name, f.rows) for f in got] == [(f.name, f.rows) for f in want]
    assert sum(len(f.rows) for f in got) > N_SVC * RS_PER * 9


def test_the_daemon_counts_connections_off_the_loop_also_for_one_service():
    """ActiveConn/InActConn and the local addresses' counts scan the whole conn table (seconds at 1M connections):
    in the daemon (Daemon.lists_off_loop) even a one-service listing does that in a worker thread."""
    from hdslb.daemon import Daemon

    assert Daemon.lists_off_loop is True
    ctx = quick_start(FakeCtx())
    ctx.lists_off_loop = True  # as the daemon: its conn table can be big
    seen = []
    counts, laddrs = ctx.conn_counts, ctx.laddr_conns
    ctx.conn_counts = lambda: seen.append(threading.current_thread() is threading.main_thread()) or counts()
    ctx.laddr_conns = lambda: seen.append(threading.current_thread() is threading.main_thread()) or laddrs()
    want = commands.dispatch(quick_start(FakeCtx()), "service.list", {"svc": None})

    async def main():
        rep = commands.dispatch(ctx, "service.list", {"svc": None})
        return await rep if asyncio.iscoroutine(rep) else rep

    assert asyncio.run(main()) == want
    assert seen == [False, False]


def test_services_without_local_addresses_do_not_count_them():
    """The local addresses' counts walk every conn entry as a dict (40 s at 1M connections): a listing of services
    that have none (DR, NAT, TUNNEL) does not ask for them, in one go or in chunks."""
    for n_extra in (0, N_SVC):
        ctx = FakeCtx()
        for i in range(1 + n_extra):
            ctx.bal.service_add({"proto": "tcp", "addr": str(ipaddress.IPv4Address("10.1.0.0") + i), "port": 80,
                                 "sched": "rr"})
        ctx.laddr_conns = lambda: (_ for _ in ()).throw(AssertionError("laddr_conns called"))

        async def main():
            rep = commands.dispatch(ctx, "service.list", {"svc": None})
            return await rep if asyncio.iscoroutine(rep) else rep

        assert all(s["laddrs"] == [] for s in asyncio.run(main())["services"])
    ctx = quick_start(FakeCtx())  # one with a local address still gets its count
    ctx.laddr_conns = lambda: {(ctx.svc().svc_id, ipaddress.ip_address("192.168.100.200")): 4}
    assert commands.dispatch(ctx, "service.list", {"svc": None})["services"][0]["laddrs"][0]["conns"] == 4


def test_a_big_listing_is_built_and_encoded_with_the_collector_paused(monkeypatch):
    """A big service.list is ~1M short-lived objects: CPython ran four full collections per listing at 10k x 10,
    each walking the reply so far with the loop held, and could free none of it. The control socket builds it with
    the collector off and encodes it inside that pause (the frame the client gets is the same); a small call is
    answered as before."""
    import gc

    from hdslb.ctl import protocol

    ctx = big_ctx()
    server = CtlServer("/nonexistent", lambda op, a: commands.dispatch(ctx, op, a))
    seen = []
    real = commands._svc_data
    monkeypatch.setattr(commands, "_svc_data", lambda *a: seen.append(gc.isenabled()) or real(*a))

    async def main():
        frame = await server.handle(7, "service.list", {"svc": None}, encode=True)
        building = list(seen)
        seen.clear()
        small = await server.handle(8, "service.list", {"svc": {"proto": "tcp", "addr": "10.0.0.100", "port": 80}},
                                    encode=True)
        return frame, building, small, list(seen)

    frame, building, small, small_seen = asyncio.run(main())
    assert type(frame) is list and b"".join(frame) == protocol.encode(
        protocol.reply_ok(7, commands.dispatch(big_ctx(), "service.list", {"svc": None})))
    assert len(building) == len(ctx.bal.services) and not any(building) and gc.isenabled()
    assert type(small) is dict and small["ok"] and small_seen == [True], "a small listing: a reply, the collector on"


def test_a_big_reply_is_written_a_piece_at_a_time_with_the_loop_served_between():
    """A listing's frame (27 MB at 10k x 10) goes to the socket in the pieces it was packed in, each taken before the
    next, other work running in between: joined and written in one call it held the loop up to 54 ms copying it.
    The peer gets the same bytes."""
    from hdslb.ctl import protocol

    ctx = big_ctx()
    server = CtlServer("/nonexistent", lambda op, a: commands.dispatch(ctx, op, a))
    writes, ticks = [], []

    class Writer:
        def write(self, data):
            writes.append((len(ticks), bytes(data)))

        async def drain(self):
            await asyncio.sleep(0)  # a transport above its high-water mark: the peer reads meanwhile

    async def main():
        rep = await server.handle(7, "service.list", {"svc": None}, encode=True)
        assert await server._send(Writer(), 7, "service.list", rep)

    asyncio.run(ticking(ticks, main()))
    want = protocol.encode(protocol.reply_ok(7, commands.dispatch(big_ctx(), "service.list", {"svc": None})))
    assert b"".join(w for _, w in writes) == want
    assert len(writes) > 3 and max(len(w) for _, w in writes) < len(want) // 2, [len(w) for _, w in writes]
    at = [n for n, _ in writes]
    assert at == sorted(at) and len(set(at)) == len(at), "the loop ran between any two writes"


def test_metrics_are_made_with_the_collector_paused(monkeypatch):
    import gc

    from aiohttp.test_utils import TestClient, TestServer

    from hdslb.api.app import make_app

    ctx = big_ctx()
    seen = []
    real = HdslbCollector._services
    monkeypatch.setattr(HdslbCollector, "_services", lambda *a: seen.append(gc.isenabled()) or real(*a))

    async def main():
        async with TestClient(TestServer(make_app(ctx))) as c:
            r = await c.get("/metrics")
            assert r.status == 200 and b"hdslb_" in await r.read()

    asyncio.run(main())
    assert seen == [False] and gc.isenabled()


def test_a_long_reply_is_encoded_in_chunks_byte_for_byte():
    """protocol.encode_parts: the same frame as protocol.encode, with the loop served between chunks of a long
    list (a 10k x 10 listing packed in one piece held the loop 0.24 s), whatever the values are."""
    import random

    from hdslb.ctl import protocol

    rnd = random.Random(5)

    def value(depth):
        kind = rnd.choice(["int", "str", "bytes", "none", "float", "list", "dict", "bool"] if depth < 4 else ["int"])
        if kind == "list":
            return [value(depth + 1) for _ in range(rnd.choice([0, 1, 3, 700, 1201]) if depth < 2 else 3)]
        if kind == "dict":
            return {f"k{i}": value(depth + 1) for i in range(rnd.randrange(4))}
        return {"int": rnd.randrange(-2**40, 2**40), "str": "é" * rnd.randrange(40), "bytes": b"\0" * 5,
                "none": None, "float": rnd.random(), "bool": True}[kind]

    ticks = []

    def main(msg):
        async def joined():
            return b"".join(await protocol.encode_parts(msg))

        return ticking(ticks, joined())

    for _ in range(40):
        msg = {"v": 1, "id": 3, "ok": True, "data": {"services": [value(2) for _ in range(rnd.choice([0, 5, 2300]))],
                                                      "more": value(0)}}
        assert asyncio.run(main(msg)) == protocol.encode(msg)
    ticks.clear()
    asyncio.run(main({"data": {"services": list(range(5000))}}))
    assert len(ticks) >= 9, "the loop ran between the chunks"


def test_a_big_listing_is_freed_as_it_is_packed_and_one_too_large_is_refused_whole(monkeypatch):
    """encode_parts(consume=True) drops each packed chunk from the reply's list (freeing 110k dicts at once took
    0.2 s of the loop); the frame is the same. A listing over the frame limit is refused with EMSGSIZE, never sent
    as the consumed list."""
    import errno

    from hdslb.ctl import protocol

    msg = {"v": 1, "ok": True, "data": {"services": [{"n": i, "dests": [i] * 3} for i in range(1234)]}}
    want = protocol.encode(msg)
    assert b"".join(asyncio.run(protocol.encode_parts(msg, consume=True))) == want
    assert msg["data"]["services"] == [None] * 1234

    ctx = big_ctx()
    server = CtlServer("/nonexistent", lambda op, a: commands.dispatch(ctx, op, a))
    monkeypatch.setattr(protocol, "MAX_FRAME", 100_000)
    rep = asyncio.run(server.handle(9, "service.list", {"svc": None}, encode=True))
    assert type(rep) is dict and not rep["ok"] and rep["errno"] == errno.EMSGSIZE, rep
    assert "too large" in rep["error"]


def test_a_scrape_frees_the_listing_and_the_series_in_a_worker_thread(monkeypatch):
    """At 10k x 10 the listing a scrape reads (~500k objects) and the series made from it (~1M) took 0.1 s each
    to free, on the event loop, when the scrape's frames let go of them: their last references now go in the
    worker threads that turn the listing into series and the series into text."""
    from aiohttp.test_utils import TestClient, TestServer

    import hdslb.api.metrics as metrics
    from hdslb.api.app import make_app

    freed = {}

    class Tracked:
        def __init__(self, what):
            self.what = what

        def __del__(self):
            freed[self.what] = threading.current_thread() is threading.main_thread()

    ctx = big_ctx()
    real_dispatch = metrics.dispatch_async

    async def listing(c, op, args):
        data = await real_dispatch(c, op, args)
        data["services"][0]["tracked"] = Tracked("listing")
        return data

    real_services = HdslbCollector._services

    def services(self, data, health):
        for f in real_services(self, data, health):
            f.rows.append(("", Tracked("series")))
            yield f
            break

    monkeypatch.setattr(metrics, "dispatch_async", listing)
    monkeypatch.setattr(HdslbCollector, "_services", services)
    monkeypatch.setattr(metrics, "_value", lambda v: "1")

    async def main():
        async with TestClient(TestServer(make_app(ctx))) as c:
            for enc in ("gzip", "identity"):
                freed.clear()
                r = await c.get("/metrics", headers={"Accept-Encoding": enc})
                assert r.status == 200 and b"hdslb_" in await r.read()
                assert freed == {"listing": False, "series": False}, enc

    asyncio.run(main())
