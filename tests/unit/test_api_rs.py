"""Real-server writes over REST: a client that sends its body slowly holds up no one else's writes."""

import asyncio

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from hdslb.api.app import make_app
from tests.unit.test_api import VS, FakeCtx, expect, quick_start


@pytest.mark.parametrize("method,path", [("PUT", VS + "/rs"), ("POST", VS + "/rs"), ("DELETE", VS + "/rs")])
async def test_a_stalled_body_blocks_no_other_write(method, path):
    ctx = quick_start(FakeCtx())
    async with TestServer(make_app(ctx)) as srv:
        rd, wr = await asyncio.open_connection(srv.host, srv.port)
        wr.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 100\r\n\r\n{{\"Items\":".encode())
        await wr.drain()
        await asyncio.sleep(0.2)  # the stalled request's handler is waiting for the rest of its body
        try:
            async with aiohttp.ClientSession() as s:
                for p, body in [(VS + "/rs", {"Items": [{"ip": "192.168.100.9"}]}), (VS, {"SchedName": "wrr"}),
                                (VS + "/laddr", {"addr": "192.168.100.201", "device": "eth1"})]:
                    r = await asyncio.wait_for(s.put(f"http://{srv.host}:{srv.port}{p}", json=body), 3)
                    assert r.status in (200, 201), await r.text()
        finally:
            wr.close()
    assert ctx.svc().sched == "wrr" and "192.168.100.9" in {str(d.addr) for d in ctx.svc().dests.values()}


async def test_a_stalled_client_does_not_hold_up_a_stop(monkeypatch):
    """aiohttp waits for requests in flight when its site stops, 60 s by default: one client that sent half a body
    (and keeps its connection) held hdslbd's stop (and the restart after an interface came back) for 60 s, beyond
    hdslb-ctl down's 30 s. The API gives requests in flight API_SHUTDOWN_S, then closes them."""
    from hdslb.api import app as api_app

    monkeypatch.setattr(api_app, "API_SHUTDOWN_S", 0.2)
    ctx = quick_start(FakeCtx())
    runner = await api_app.start_api(ctx, "127.0.0.1", 0, access_log=False)
    host, port = runner.addresses[0][:2]
    rd, wr = await asyncio.open_connection(host, port)
    try:
        wr.write(f"PUT {VS}/rs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 100\r\n\r\n{{\"Items\":".encode())
        await wr.drain()
        await asyncio.sleep(0.2)  # its handler is waiting for the rest of the body
        await asyncio.wait_for(api_app.stop_api(runner), 20)  # (60 s without the bound)
    finally:
        wr.close()
    assert len(ctx.svc().dests) == 2, "the half-sent request changed nothing"
