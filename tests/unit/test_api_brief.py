"""service.list with brief: the model's view of a service, read from no map (no traffic stats, connection counts,
persistence templates or local addresses' connections, no worker thread). The REST writes plan from it: a PUT of a
service with its real servers, PUT/POST/DELETE .../rs and a SNAT create used to read every counter of the service
first (~0.5 ms a request in hdslbd at 10k services: a re-PUT of them all cost as much as their first load)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hdslb.api.app import make_app
from hdslb.ctl import commands
from hdslb.errors import HdslbError
from tests.unit.test_api import SVC, VS, FakeCtx, expect, quick_start


class CountingCtx(FakeCtx):
    """Counts every read of what the maps hold; with strict set, such a read fails the test."""

    READERS = ("svc_stats", "dest_stats", "conn_counts", "laddr_conns", "persist_list")

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.strict = False
        for name in self.READERS:
            inner = getattr(self, name, None)
            if inner is not None:
                setattr(self, name, self._counted(name, inner))

    def _counted(self, name, inner):
        def read(*a):
            self.reads.append(name)
            if self.strict:
                raise AssertionError(f"{name} read by a brief listing")
            return inner(*a)
        return read


@pytest.fixture
def ctx():
    return quick_start(CountingCtx())


def _shared(full: dict, brief: dict) -> None:
    """Every field a brief listing gives is the full listing's (local addresses: their address and interface)."""
    for k, v in brief.items():
        if k == "dests":
            assert len(v) == len(full["dests"])
            for b, f in zip(v, full["dests"]):
                assert b == {k2: f[k2] for k2 in b}
        elif k == "laddrs":
            assert v == [{"addr": la["addr"], "ifname": la["ifname"]} for la in full["laddrs"]]
        else:
            assert v == full[k], k


def test_brief_listing_reads_no_map_and_matches_the_full_one(ctx):
    ctx.bal.service_add({"proto": "udp", "addr": "10.0.0.101", "port": 53, "sched": "wrr", "persistent": 300})
    ctx.bal.dest_add({"svc": {"proto": "udp", "addr": "10.0.0.101", "port": 53}, "addr": "192.168.100.9",
                      "fwd": "dr", "u_threshold": 9})
    full = commands.dispatch(ctx, "service.list", {})
    assert ctx.reads  # (the full listing does read the counters)
    ctx.strict = True
    brief = commands.dispatch(ctx, "service.list", {"brief": True})
    one = commands.dispatch(ctx, "service.list", {"svc": SVC, "brief": True})
    assert {k: brief[k] for k in ("version", "size")} == {k: full[k] for k in ("version", "size")}
    assert len(brief["services"]) == len(full["services"]) == 2
    for b, f in zip(brief["services"], full["services"]):
        _shared(f, b)
        assert "stats" not in b and all("stats" not in d and "active" not in d for d in b["dests"])
    assert one["services"] == [brief["services"][0]]
    assert one["services"][0]["dests"][1]["conf_weight"] == 2


def test_brief_listing_of_many_services_on_the_loop_is_the_same(ctx):
    for i in range(commands.LIST_CHUNK + 3):
        ctx.bal.service_add({"proto": "udp", "addr": str(ipaddress.IPv4Address("10.1.0.0") + i), "port": 53,
                             "sched": "rr"})
    ctx.strict = True
    at_once = commands.dispatch(ctx, "service.list", {"brief": True})

    async def on_loop():
        r = commands.dispatch(ctx, "service.list", {"brief": True})
        return await r if asyncio.iscoroutine(r) else r

    assert asyncio.run(on_loop()) == at_once
    assert len(at_once["services"]) == commands.LIST_CHUNK + 4


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_brief_must_be_a_boolean(ctx, bad):
    with pytest.raises(HdslbError) as e:
        commands.dispatch(ctx, "service.list", {"brief": bad})
    assert e.value.errno == errno.EINVAL and "brief must be true or false" in e.value.message


@pytest.mark.parametrize("method,path,body,status", [
    ("PUT", VS, {"RSs": {"Items": [{"ip": "192.168.100.3", "weight": 5}, {"ip": "192.168.100.4"}]}}, 200),
    ("PUT", VS + "/rs", {"Items": [{"ip": "192.168.100.3", "weight": 5}]}, 200),
    ("POST", VS + "/rs", {"Items": [{"ip": "192.168.100.3"}, {"ip": "192.168.100.2"}]}, 200),
    ("DELETE", VS + "/rs", {"Items": [{"ip": "192.168.100.3"}]}, 200),
    ("POST", "/v2/vs", {"Proto": "icmp", "SchedName": "sh",
                        "Match": {"Src": {"Start": "192.168.100.1", "End": "192.168.100.254"}}}, 201),
])
async def test_rest_writes_plan_without_reading_counters(ctx, method, path, body, status):
    ctx.strict = True
    async with TestClient(TestServer(make_app(ctx))) as c:
        await expect(await c.request(method, path, json=body), status)
    assert ctx.reads == []


async def test_rest_reads_still_show_the_counters(ctx):
    async with TestClient(TestServer(make_app(ctx))) as c:
        b = await expect(await c.get(VS), 200)
    assert "dest_stats" in ctx.reads and "conn_counts" in ctx.reads
    assert b["Items"][0]["Stats"]["Conns"] == 30


SNAT = {"Proto": "tcp", "Match": {"Src": {"Start": "10.1.0.0", "End": "10.1.0.255"}}}


@pytest.mark.parametrize("method,path,body,status", [
    ("PUT", "/v2/vs/match-1/rs", {"Items": [{"ip": "192.168.100.250"}]}, 200),
    ("POST", "/v2/vs/match-1/rs", {"Items": [{"ip": "192.168.100.250"}]}, 200),
    ("PUT", "/v2/vs/match-1", {"SchedName": "sh"}, 200),
    ("DELETE", "/v2/vs/match-1", None, 200),
    ("DELETE", "/v2/vs/match-7", None, 404),
])
async def test_a_snat_service_is_found_by_its_id_without_reading_counters(ctx, method, path, body, status):
    """match-ID is resolved from the model (a brief listing): it was a full listing of every service, the conn
    table's counts and every service's stats read on each request to find one id."""
    ctx.bal.addr_add({"addr": "192.168.100.250", "prefixlen": 24, "ifname": "eth1", "sapool": True})
    async with TestClient(TestServer(make_app(ctx))) as c:
        assert (await expect(await c.post("/v2/vs", json=SNAT), 201))["Id"] == "match-1"
        ctx.strict = True
        await expect(await c.request(method, path, json=body), status)
    assert ctx.reads == []


async def test_a_snat_services_listing_reads_the_counters_once(ctx):
    async with TestClient(TestServer(make_app(ctx))) as c:
        await expect(await c.post("/v2/vs", json=SNAT), 201)
        ctx.reads.clear()
        b = await expect(await c.get("/v2/vs/match-1/rs"), 200)
    assert b == {"Items": []} and ctx.reads.count("conn_counts") == 1
