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
