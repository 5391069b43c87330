"""Odd input gets a 4xx naming what is wrong, never a 500: non-ASCII digits, floats for integers, deep nesting,
header bytes that are not UTF-8, a MAC with a trailing newline."""

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hdslb.api.app import make_app
from tests.unit.test_api import VS, FakeCtx, expect, quick_start, serving


@pytest.fixture
async def client():
    ctx = quick_start(FakeCtx(n_conns=3))
    async with serving(ctx) as c:
        yield c


@pytest.mark.parametrize("method,path,field", [
    ("PUT", "/v2/vs/10.0.0.100-²-tcp", "VipPort"),        # "²".isdigit() is True, int("²") raises
    ("PUT", "/v2/vs/10.0.0.100-８０-tcp", "VipPort"),      # int("８０") == 80: still not how a port is written
    ("GET", "/v2/vs/10.0.0.100-٨٠-tcp", "VipPort"),
    ("GET", "/v2/vs/match-²", "VipPort"),
    ("GET", "/v2/conns?limit=²", "limit"),
    ("GET", "/v2/conns?offset=٣", "offset"),
])
async def test_non_ascii_digits_are_400(client, method, path, field):
    before = list(client.ctx.bal.dp.calls)
    await expect(await client.request(method, path, json={} if method == "PUT" else None), 400, field=field)
    assert client.ctx.bal.dp.calls == before


@pytest.mark.parametrize("path,body,field", [
    ("/v2/vs", {"Addr": "10.0.0.1", "Port": 80.0, "Proto": "tcp"}, "Port"),
    (VS + "/rs", {"Items": [{"ip": "192.168.100.9", "weight": 2.0}]}, "Items[0].weight"),
    (VS, {"Timeout": 10.0}, "Timeout"),
    (VS + "/rs", {"Items": [{"ip": "192.168.100.9", "port": 8080.0}]}, "Items[0].port"),
])
async def test_a_float_is_not_an_integer(client, path, body, field):
    method = "POST" if path == "/v2/vs" else "PUT"
    before = list(client.ctx.bal.dp.calls)
    b = await expect(await client.request(method, path, json=body), 400, field=field)
    assert "integer" in b["error"]
    assert client.ctx.bal.dp.calls == before


async def test_deeply_nested_json_is_400(client):
    r = await client.put(VS, data=b"[" * 100000 + b"]" * 100000, headers={"Content-Type": "application/json"})
    assert "nested too deeply" in (await expect(r, 400))["error"]


@pytest.mark.parametrize("method,path,raw", [
    ("PATCH", "/v2/vs", b'{"Items": [{"Addr": "10.0.0.9", "Port": 80, "Proto": "tcp"}], "Items": []}'),
    ("PUT", VS + "/rs", b'{"Items": [{"ip": "192.168.100.9", "weight": 2, "weight": 0}]}'),
    ("POST", "/v2/vs", b'{"Addr": "10.0.0.9", "Port": 80, "Port": 81, "Proto": "tcp"}'),
])
async def test_a_key_given_twice_in_one_object_is_400(client, method, path, raw):
    """JSON parsers keep the last of a repeated key: the PATCH above read as no items at all and answered "applied",
    a weight given twice would be whichever came last. Refused, naming the key; nothing changed."""
    before = list(client.ctx.bal.dp.calls)
    r = await client.request(method, path, data=raw, headers={"Content-Type": "application/json"})
    b = await expect(r, 400)
    assert "is given twice in one object" in b["error"] and ("'Items'" in b["error"] or "'weight'" in b["error"]
                                                            or "'Port'" in b["error"]), b
    assert b["field"] in ("Items", "weight", "Port"), b  # (it was null: the README audit)
    assert client.ctx.bal.dp.calls == before


async def test_a_mac_with_a_trailing_newline_is_refused(client):
    body = {"addr": "10.0.0.1", "lladdr": "02:00:00:00:00:01\n", "device": "eth0"}
    b = await expect(await client.put("/v2/neigh", json=body), 400, field="lladdr")
    assert "MAC" in b["error"] and not client.ctx.bal.neighs
    await expect(await client.put("/v2/neigh", json=dict(body, lladdr="02:00:00:00:00:01")), 201)


async def test_an_authorization_header_that_is_not_utf8_is_401_not_500():
    ctx = quick_start(FakeCtx())
    async with TestServer(make_app(ctx, "s3cret")) as srv:
        rd, wr = await asyncio.open_connection(srv.host, srv.port)
        wr.write(b"GET /v2/vs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\r\n"
                 b"Connection: close\r\n\r\n")
        await wr.drain()
        data = await asyncio.wait_for(rd.read(4000), 5)
        wr.close()
    assert data.startswith(b"HTTP/1.1 401"), data[:200]


ZONED = "fe80::1%eth1"


@pytest.mark.parametrize("method,path,body,field", [
    ("PUT", VS + "/rs", {"Items": [{"ip": ZONED}]}, "Items[0].ip"),
    ("POST", VS + "/rs", {"Items": [{"ip": "192.168.100.2"}, {"ip": ZONED, "port": 80}]}, "Items[1].ip"),
    ("DELETE", VS + "/rs", {"Items": [{"ip": ZONED}]}, "Items[0].ip"),
    ("PUT", VS, {"RSs": {"Items": [{"ip": ZONED}]}}, "RSs.Items[0].ip"),
    ("PATCH", "/v2/vs", {"Items": [{"Addr": "2001:db8::1", "Port": 80, "Proto": "tcp",
                                    "RSs": {"Items": [{"ip": ZONED}]}}]}, "Items[0].RSs.Items[0].ip"),
    ("PATCH", "/v2/vs", {"Items": [{"Addr": ZONED, "Port": 80, "Proto": "tcp"}]}, "Items[0].Addr"),
    ("POST", "/v2/vs", {"Addr": ZONED, "Port": 80, "Proto": "tcp"}, "Addr"),
    ("PUT", VS + "/laddr", {"addr": ZONED, "device": "eth1"}, "addr"),
    ("PUT", "/v2/neigh", {"addr": ZONED, "lladdr": "02:00:00:00:00:09", "device": "eth1"}, "addr"),
    ("PUT", "/v2/device/eth1/route", {"dst": "2001:db8::/64", "gateway": ZONED}, "gateway"),
    ("PUT", "/v2/device/eth1/route", {"dst": "fe80::%eth1/64"}, "dst"),
    ("PUT", "/v2/device/eth1/addr", {"addr": ZONED + "/64"}, "addr"),  # was taken, the zone silently dropped
    ("GET", "/v2/vs/fe80::1%25eth1-80-tcp", None, "VipPort"),
])
async def test_a_scoped_ipv6_address_is_400_naming_the_field(client, method, path, body, field):
    """ipaddress takes fe80::1%eth1 (so did the schema's ip format); the model keys on the address bytes and refuses
    it. A real server's address reached the handlers' own parse first and was a 500; now every address field
    refuses a %zone in the schema, naming the field, and nothing changes."""
    before, dests = list(client.ctx.bal.dp.calls), client.ctx.dests()
    b = await expect(await client.request(method, path, json=body), 400, field=field)
    assert "scoped IPv6" in b["error"]
    assert client.ctx.bal.dp.calls == before and client.ctx.dests() == dests
