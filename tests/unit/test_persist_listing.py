"""Persistence templates in the listings (ipvsadm -Ln's PersistConn, -Lnc, REST GET /v2/vs, /metrics) with a full
template table: the templates are read in a worker thread, and each is matched to its real server by one lookup.

A full persist_map is 65,536 templates at the default --max-persist (an LRU table: every busy persistent site fills
it). Measured against the compiled program with one -p service of 100 real servers: the map read took 0.5 s and
matching each template to its server by walking the service's list another second, all of it on the event loop,
for every ipvsadm -L, every -Lnc and every /metrics scrape, while ARP/ND answers, health checks and other control
calls waited."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
import types

from hdslb.ctl import commands
from hdslb.daemon import Daemon
from tests.unit.test_api import FakeCtx

SVC = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}
N_RS, N_TEMPLATES = 50, 2000


def persistent_ctx() -> tuple[FakeCtx, list]:
    """A daemon-like context (lists off the loop) with one -p service of N_RS real servers and N_TEMPLATES live
    templates, its persist_list the daemon's over them; returns it and the list of threads that read templates."""
    ctx = FakeCtx()
    ctx.lists_off_loop = True
    ctx.bal.service_add(dict(SVC, sched="rr", persistent=300))
    for i in range(N_RS):
        ctx.bal.dest_add({"svc": SVC, "addr": f"192.168.100.{i + 2}", "port": 80, "fwd": "fnat"})
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    temps = [{"svc_id": 0, "af": 4, "addr": ipaddress.ip_address(0x0A010000 + i), "dest_slot": i % N_RS,
              "expires_ns": now + 300 * 10**9} for i in range(N_TEMPLATES)]
    readers: list = []

    def persists():
        readers.append(threading.current_thread())
        return [dict(t) for t in temps]

    daemon = types.SimpleNamespace(maps=types.SimpleNamespace(persists=persists), bal=ctx.bal)
    ctx.persist_list = lambda: Daemon.persist_list(daemon)
    return ctx, readers


class CountingDests(dict):
    """A service's real servers that count how often their list is walked."""

    walks = 0

    def values(self):
        CountingDests.walks += 1
        return super().values()


def test_each_template_finds_its_real_server_by_one_lookup():
    ctx, _ = persistent_ctx()
    svc = ctx.bal.get_service(SVC)
    svc.dests = CountingDests(svc.dests)
    CountingDests.walks = 0
    out = ctx.persist_list()
    assert len(out) == N_TEMPLATES
    by_slot = {d.slot: d for d in svc.dests.values()}
    assert all(t["daddr"] == str(by_slot[t["dest_slot"]].addr) and t["dport"] == 80 for t in out)
    assert CountingDests.walks <= 2, f"the real servers' list was walked {CountingDests.walks} times for " \
                                     f"{N_TEMPLATES} templates"


def _run(ctx, op, args):
    async def main():
        rep = commands.dispatch(ctx, op, args)
        return await rep if asyncio.iscoroutine(rep) else rep

    return asyncio.run(main())


def test_service_list_counts_templates_off_the_loop():
    ctx, readers = persistent_ctx()
    data = _run(ctx, "service.list", {"svc": None})
    assert [d["persist_conns"] for d in data["services"][0]["dests"]] == [N_TEMPLATES // N_RS] * N_RS
    assert readers and all(t is not threading.main_thread() for t in readers), \
        "the templates were read on the event loop's thread"


class Listing:
    """What Daemon.conn_listing gives (aging.Listing), for a table of two entries."""

    def __init__(self, conns):
        self.conns = conns

    def __len__(self):
        return len(self.conns)

    def max_bytes(self, start=0, stop=None):
        return 200 * len(self.conns)

    def entries(self, start=0, stop=None):
        return self.conns[start:stop]


def test_conn_list_reads_templates_off_the_loop():
    ctx, readers = persistent_ctx()
    conns = [{"proto": 6, "saddr": "10.1.0.1", "sport": 1000 + i, "out": False} for i in range(2)]
    ctx.conn_listing = lambda inbound: Listing(conns)
    for args in ({}, {"templates_only": True}, {"limit": 10}, {"inbound": True}):
        readers.clear()
        data = _run(ctx, "conn.list", args)
        assert len(data["templates"]) == N_TEMPLATES, args
        assert data["conns"] == ([] if args.get("templates_only") else conns), args
        assert readers and all(t is not threading.main_thread() for t in readers), \
            f"conn.list {args}: the templates were read on the event loop's thread"
