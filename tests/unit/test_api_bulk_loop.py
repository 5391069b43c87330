"""A large body is validated away from the event loop: checked against the OpenAPI schema by jsonschema, a 10k x 10
PATCH /v2/vs with one wrong field, or whose services all carry a Timeout, took 6-8 s, and the daemon (health
checks, the control socket, the slow path's ARP answers) stood still meanwhile."""

import threading

import pytest

from hdslb.api import openapi
from tests.unit.test_api import FakeCtx, expect, quick_start, serving


def bulk(n: int, **opt) -> dict:
    return {"Items": [{"Addr": f"10.1.{i // 250}.{i % 250 + 1}", "Port": 80, "Proto": "tcp", **opt,
                       "RSs": {"Items": [{"ip": f"192.168.100.{j + 2}", "weight": 1} for j in range(3)]}}
                      for i in range(n)]}


@pytest.mark.parametrize("body,status", [(bulk(600, Timeout=300), 200), (bulk(600, Timeout=-1), 400)])
async def test_a_large_body_is_validated_off_the_event_loop(monkeypatch, body, status):
    loop_thread = threading.get_ident()
    seen = []
    validate = openapi.validate

    def recording(name, b):
        seen.append(threading.get_ident())
        return validate(name, b)

    monkeypatch.setattr(openapi, "validate", recording)
    async with serving(quick_start(FakeCtx())) as c:
        await expect(await c.patch("/v2/vs", json=body), status)
        assert seen and loop_thread not in seen, "validated on the event loop"
        seen.clear()
        await expect(await c.put("/v2/vs/10.0.0.100-80-tcp", json={"SchedName": "wrr"}), 200)
        assert seen == [loop_thread], "a small body needs no thread"


@pytest.mark.parametrize("name,body", [
    ("VirtualServerBulk", bulk(3, Timeout=300)),  # persistence, as most LVS services have it
    ("VirtualServerBulk", {"Items": [dict(it, RSs={"Items": [dict(r, inhibited=False, overloaded=False, port=0)
                                                              for r in it["RSs"]["Items"]]})
                                     for it in bulk(3)["Items"]]}),  # dpvs-agent's Go client's zero values
    ("VirtualServerSpecTiny", {"SchedName": "wrr", "Timeout": 0, "RSs": {"Items": [{"ip": "192.168.1.1",
                                                                                   "inhibited": False}]}}),
    ("RealServerTinyList", {"Items": [{"ip": "192.168.1.1", "weight": 0, "inhibited": False, "overloaded": False}]}),
])
def test_what_dpvs_agent_clients_send_needs_no_jsonschema(monkeypatch, name, body):
    """The plain check takes the common options and flags (jsonschema: ~30 us a real server, 5.7 s for 10k x 10
    with a Timeout on each service)."""
    def no_jsonschema(name):
        raise AssertionError(f"{name}: went to jsonschema")

    monkeypatch.setattr(openapi, "_validator", no_jsonschema)
    openapi.validate(name, body)


@pytest.mark.parametrize("name,body,field", [
    ("VirtualServerBulk", bulk(1, Timeout=86400 * 31 + 1), "Items[0].Timeout"),
    ("VirtualServerBulk", bulk(1, Timeout=True), "Items[0].Timeout"),
    ("VirtualServerSpecTiny", {"Timeout": -1}, "Timeout"),
    ("RealServerTinyList", {"Items": [{"ip": "192.168.1.1", "inhibited": 0}]}, "Items[0].inhibited"),
    ("RealServerTinyList", {"Items": [{"ip": "192.168.1.1", "overloaded": "no"}]}, "Items[0].overloaded"),
])
def test_the_plain_check_still_leaves_every_fault_to_the_schema(name, body, field):
    with pytest.raises(openapi.BodyError) as e:
        openapi.validate(name, body)
    assert e.value.field == field


def threads_calling(monkeypatch, module, name: str) -> list:
    """The threads module.name is called on from now on, one entry a call."""
    seen, fn = [], getattr(module, name)

    def recording(*a, **kw):
        seen.append(threading.get_ident())
        return fn(*a, **kw)

    monkeypatch.setattr(module, name, recording)
    return seen


async def test_get_v2_vs_is_shaped_and_encoded_off_the_event_loop(monkeypatch):
    """GET /v2/vs turned the listing into dpvs-agent's shapes and JSON on the event loop: 1.4 s and 1.0 s at 10k
    services x 10 real servers (38 MB, measured here), the daemon standing still meanwhile."""
    from hdslb.api import app as api_app

    loop_thread = threading.get_ident()
    seen = threads_calling(monkeypatch, api_app, "_vs_expand")
    async with serving(quick_start(FakeCtx())) as c:
        r = await c.get("/v2/vs")
        body = await expect(r, 200)
        assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    openapi._validator("VirtualServerList").validate(body)
    assert [v["Id"] for v in body["Items"]] == ["10.0.0.100-80-tcp"]
    assert seen and loop_thread not in seen, "shaped on the event loop"


async def test_a_devices_routes_are_shaped_and_encoded_off_the_event_loop(monkeypatch):
    """GET /v2/device/{name}/route made each route's dict and the JSON on the event loop: 0.8 s at 50k routes
    (measured here; the README speaks of 100k), on top of route.list's 0.2 s."""
    from hdslb.api import app as api_app

    loop_thread = threading.get_ident()
    seen = threads_calling(monkeypatch, api_app, "_route_expand")
    async with serving(quick_start(FakeCtx())) as c:
        c.ctx.bal.route_add({"af": 4, "prefix": "10.9.0.0", "prefixlen": 16, "ifname": "eth0"})
        r = await c.get("/v2/device/eth0/route")
        body = await expect(r, 200)
        assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    openapi._validator("RouteList").validate(body)
    assert "10.9.0.0/16" in {x["dst"] for x in body["Items"]}
    assert seen and loop_thread not in seen, "shaped on the event loop"
