"""REST GET/PUT /v2/timeouts: ipvsadm -L --timeout and --set over HTTP, validated by the OpenAPI schema (a bad
body is a 400 naming the field and changes nothing)."""

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hdslb.api.app import make_app

from .test_api import expect
from .test_timeouts import harness


@pytest.fixture
async def api(tmp_path):
    d, _ = await harness(tmp_path)
    async with TestClient(TestServer(make_app(d))) as c:
        yield d, c


async def test_get_shows_the_running_timeouts(api):
    d, c = api
    body = await expect(await c.get("/v2/timeouts"), 200)
    assert (body["tcp"], body["tcpfin"], body["udp"]) == (90, 7, 300) and body["set"] == {}
    assert body["states"] == d.settings.timeouts


async def test_put_sets_them_live_zero_keeping(api):
    d, c = api
    body = await expect(await c.put("/v2/timeouts", json={"tcp": 900, "tcpfin": 0, "udp": 2}), 200)
    assert body["result"] == "updated" and (body["tcp"], body["tcpfin"], body["udp"]) == (900, 7, 2)
    assert d.settings.timeouts["udp"] == 2 and d.seen[-1] == d.settings.timeouts
    assert (await expect(await c.get("/v2/timeouts"), 200))["set"] == {"established": 900, "udp": 2}


@pytest.mark.parametrize("body,field", [({"udp": -1}, "udp"), ({"udp": "2"}, "udp"), ({"udp": 2.5}, "udp"),
                                        ({"tcp": 31 * 86400 + 1}, "tcp"), ({"tcp": 9, "tcpfn": 1}, "tcpfn"),
                                        ({}, None), ([1], None)])
async def test_a_bad_body_is_400_naming_the_field_and_changes_nothing(api, body, field):
    d, c = api
    before = dict(d.settings.timeouts)
    await expect(await c.put("/v2/timeouts", json=body), 400, field=field)
    assert d.settings.timeouts == before and d.seen == []


async def test_put_needs_json(api):
    d, c = api
    r = await c.put("/v2/timeouts", data='{"udp": 2}', headers={"Content-Type": "text/plain"})
    assert r.status == 415 and d.settings.timeouts["udp"] == 300
