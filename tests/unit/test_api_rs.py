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
