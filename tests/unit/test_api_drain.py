"""A drain (weight 0) over REST is compared with the configured weight, never lost to a health check's effective
weight: PUT/POST .../rs and PUT /v2/vs/{VipPort} with RSs."""

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hdslb.api.app import make_app
from tests.unit.test_api import SVC, VS, FakeCtx, expect, quick_start


# --- a drain is compared with the configured weight, not the effective one --------------------------------------
@pytest.fixture
def down_ctx():
    """192.168.100.3 has weight 2 configured and is down by a health check: effective weight 0."""
    ctx = quick_start(FakeCtx())
    ctx.bal.dest_health({"svc": SVC, "addr": "192.168.100.3", "port": 80}, False, None, "checker down")
    d = [d for d in ctx.svc().dests.values() if str(d.addr) == "192.168.100.3"][0]
    assert (d.weight, d.eff_weight) == (2, 0)
    return ctx


def conf_weight(ctx, ip="192.168.100.3"):
    return [d.weight for d in ctx.svc().dests.values() if str(d.addr) == ip][0]


@pytest.mark.parametrize("method,path,body", [
    ("PUT", VS + "/rs", {"Items": [{"ip": "192.168.100.3", "weight": 0}]}),
    ("POST", VS + "/rs", {"Items": [{"ip": "192.168.100.3", "weight": 0}, {"ip": "192.168.100.2"}]}),
    ("PUT", VS, {"RSs": {"Items": [{"ip": "192.168.100.3", "weight": 0}]}}),
    ("PATCH", "/v2/vs", {"Items": [{"Addr": "10.0.0.100", "Port": 80, "Proto": "tcp",
                                    "RSs": {"Items": [{"ip": "192.168.100.3", "weight": 0, "inhibited": True}]}}]}),
])
async def test_draining_a_server_that_is_down_is_kept(down_ctx, method, path, body):
    async with TestClient(TestServer(make_app(down_ctx))) as c:
        b = await expect(await c.request(method, path, json=body), 200)
        if method != "PATCH":  # (PATCH's reply counts, it does not list)
            assert b["updated"] == ["192.168.100.3:80"] and "192.168.100.3:80" not in b["unchanged"]
        spec = {x["Spec"]["ip"]: x for x in (await expect(await c.get(VS + "/rs"), 200))["Items"]}
    assert conf_weight(down_ctx) == 0
    assert spec["192.168.100.3"]["Spec"]["weight"] == 0  # the drain shows, while the server is still down


async def test_the_configured_weight_is_what_unchanged_means(down_ctx):
    async with TestClient(TestServer(make_app(down_ctx))) as c:
        b = await expect(await c.put(VS + "/rs", json={"Items": [{"ip": "192.168.100.3", "weight": 2}]}), 200)
        assert b["unchanged"] == ["192.168.100.3:80"] and b["updated"] == []
    assert conf_weight(down_ctx) == 2


def test_upserts_reads_conf_weight_when_service_list_sends_it():
    """service.list sends "weight" (effective) and, newer, "conf_weight": compare with the configured one."""
    import ipaddress

    from hdslb.api.app import _upserts

    key = (ipaddress.ip_address("10.1.0.1"), 80)
    item = [("Items[0]", key, {"ip": "10.1.0.1", "weight": 0})]
    drained = {key: {"addr": "10.1.0.1", "port": 80, "weight": 0, "conf_weight": 2, "fwd": "fnat"}}
    assert [s.what for s in _upserts(SVC, drained, item).steps] == ["updated"]
    older = {key: {"addr": "10.1.0.1", "port": 80, "weight": 0, "fwd": "fnat"}}  # no conf_weight: weight is it
    assert _upserts(SVC, older, item).unchanged == [key]


async def test_a_server_its_health_check_holds_down_is_shown_inhibited(down_ctx):
    """dpvs-agent's RS spec has `inhibited`: a server its health check took out of rotation, kept in the list. It
    was always false; the REST listing now says which server is down by its check (and only that one)."""
    async with TestClient(TestServer(make_app(down_ctx))) as c:
        b = await expect(await c.get(VS + "/rs"), 200)
    spec = {x["Spec"]["ip"]: x["Spec"] for x in b["Items"]}
    assert spec["192.168.100.3"]["inhibited"] is True and spec["192.168.100.2"]["inhibited"] is False
    down_ctx.bal.dest_health({"svc": SVC, "addr": "192.168.100.3", "port": 80}, True, None, "checker up")
    async with TestClient(TestServer(make_app(down_ctx))) as c:
        b = await expect(await c.get(VS + "/rs"), 200)
    assert not any(x["Spec"]["inhibited"] for x in b["Items"])


async def test_what_get_shows_can_be_sent_back_but_a_client_cannot_inhibit_a_server(down_ctx):
    """A controller's read-modify-write sends the Spec back as GET showed it: inhibited true for the server that is
    down is its state, accepted; asking it of a server that is up is still 501 (the health check sets it)."""
    async with TestClient(TestServer(make_app(down_ctx))) as c:
        items = [x["Spec"] for x in (await expect(await c.get(VS + "/rs"), 200))["Items"]]
        for r in (await c.put(VS + "/rs", json={"Items": items}), await c.post(VS + "/rs", json={"Items": items}),
                  await c.put(VS, json={"RSs": {"Items": items}})):
            b = await expect(r, 200)
            assert (b["added"], b["updated"], b["removed"]) == ([], [], []) and len(b["unchanged"]) == 2
        assert conf_weight(down_ctx) == 2
        r = await c.put(VS + "/rs", json={"Items": [{"ip": "192.168.100.2", "inhibited": True}]})
        await expect(r, 501, field="Items[0].inhibited")
        r = await c.request("DELETE", VS + "/rs", json={"Items": [{"ip": "192.168.100.2", "port": 80,
                                                                     "inhibited": True}]})
        await expect(r, 501, field="Items[0].inhibited")
        r = await c.request("DELETE", VS + "/rs", json={"Items": [{"ip": "192.168.100.3", "port": 80,
                                                                     "inhibited": True}]})
        assert (await expect(r, 200))["removed"] == ["192.168.100.3:80"]  # named as GET shows it


# --- GET's Spec is the configured weight: sent back as it is, it changes nothing ----------------------------
DOWN = {"svc": SVC, "addr": "192.168.100.3", "port": 80}


def _rs_of(listing: dict) -> dict:
    return {x["Spec"]["ip"]: x for x in listing["Items"]}


async def _every_listing(c) -> list:
    """192.168.100.3's entry as each REST listing shows it: .../rs, /v2/vs/{id} and /v2/vs."""
    rs = _rs_of(await expect(await c.get(VS + "/rs"), 200))
    one = (await expect(await c.get(VS), 200))["Items"][0]["RSs"]
    every = [v for v in (await expect(await c.get("/v2/vs"), 200))["Items"] if v["Id"] == "10.0.0.100-80-tcp"]
    return [rs["192.168.100.3"], _rs_of(one)["192.168.100.3"], _rs_of(every[0]["RSs"])["192.168.100.3"]]


async def _echo(c, method: str):
    """Send back what GET showed, in the method's shape; the reply."""
    if method == "PATCH":
        v = (await expect(await c.get(VS), 200))["Items"][0]
        body = {"Items": [{"Addr": v["Addr"], "Port": v["Port"], "Proto": "tcp", "SchedName": v["SchedName"],
                           "RSs": {"Items": [x["Spec"] for x in v["RSs"]["Items"]]}}]}
        return await expect(await c.patch("/v2/vs", json=body), 200)
    items = [x["Spec"] for x in (await expect(await c.get(VS + "/rs"), 200))["Items"]]
    if method == "PUT /v2/vs/{id}":
        return await expect(await c.put(VS, json={"RSs": {"Items": items}}), 200)
    return await expect(await c.request(method, VS + "/rs", json={"Items": items}), 200)


@pytest.mark.parametrize("method", ["PUT", "POST", "PUT /v2/vs/{id}", "PATCH"])
@pytest.mark.parametrize("verdict", [(False, None), (False, 0)], ids=["down", "inhibit_on_failure"])
async def test_echoing_get_for_a_server_held_out_by_its_check_keeps_its_weight(verdict, method):
    """GET showed the effective weight (0) of a server its check holds out, and POST/PUT/PATCH compare a weight
    with the configured one: sending GET back drained the server for good (configured 0, still 0 once its check
    passed). Spec now shows the configured weight with inhibited true, the effective one in EffectiveWeight."""
    ctx = quick_start(FakeCtx())
    ctx.bal.dest_health(DOWN, *verdict, "checker down")  # (False, 0): keepalived's inhibit_on_failure verdict
    async with TestClient(TestServer(make_app(ctx))) as c:
        for x in await _every_listing(c):
            assert (x["Spec"]["weight"], x["Spec"]["inhibited"], x["EffectiveWeight"]) == (2, True, 0)
        b = await _echo(c, method)
        if method != "PATCH":
            assert (b["added"], b["updated"], b["removed"]) == ([], [], []) and len(b["unchanged"]) == 2
        assert conf_weight(ctx) == 2
        assert [m for m in ctx.mutations() if m.startswith("dest.") and m != "dest.set"] == []
        ctx.bal.dest_health(DOWN, True, None, "checker up")  # it recovers: back at its configured weight
        d = [d for d in ctx.svc().dests.values() if str(d.addr) == "192.168.100.3"][0]
        assert (d.weight, d.eff_weight) == (2, 2)
        for x in await _every_listing(c):
            assert (x["Spec"]["weight"], x["Spec"]["inhibited"], x["EffectiveWeight"]) == (2, False, 2)


async def test_effective_weight_shows_a_checkers_dynamic_weight_spec_the_configured_one():
    """misc_dynamic: a checker that is up sets its own weight; the server is not inhibited, and Spec still shows
    the configured weight, so an echo does not pin the checker's weight as the configured one."""
    ctx = quick_start(FakeCtx())
    ctx.bal.dest_health(DOWN, True, 7, "misc_dynamic")
    async with TestClient(TestServer(make_app(ctx))) as c:
        for x in await _every_listing(c):
            assert (x["Spec"]["weight"], x["Spec"]["inhibited"], x["EffectiveWeight"]) == (2, False, 7)
        assert (await _echo(c, "PUT"))["updated"] == []
    assert conf_weight(ctx) == 2


async def test_a_patch_cannot_inhibit_a_server_that_is_up(down_ctx):
    body = {"Items": [{"Addr": "10.0.0.100", "Port": 80, "Proto": "tcp",
                       "RSs": {"Items": [{"ip": "192.168.100.2", "inhibited": True}]}}]}
    async with TestClient(TestServer(make_app(down_ctx))) as c:
        await expect(await c.patch("/v2/vs", json=body), 501, field="Items[0].RSs.Items[0].inhibited")
