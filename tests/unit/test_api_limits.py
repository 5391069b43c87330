"""What REST clients together may hold of hdslbd: a bounded number of connections (the longest-idle one closed to
make room, a request in progress never), a request head within the keep-alive time, a body within its deadline,
and a bounded number of bytes of large bodies at once. Each REST connection is a file descriptor the health
probes need too: before these bounds a loopback process could hold thousands for an hour each."""

import asyncio
import json

import pytest

from hdslb.api import app as api_app
from hdslb.api.app import start_api, stop_api
from tests.unit.test_api import FakeCtx, quick_start

HEAD = "PUT /v2/vs/10.0.0.100-80-TCP HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


@pytest.fixture
async def api():
    runner = await start_api(quick_start(FakeCtx()), "127.0.0.1", 0, access_log=False)
    try:
        yield runner
    finally:
        await stop_api(runner)


async def connect(api):
    return await asyncio.open_connection("127.0.0.1", api.addresses[0][1])


async def closed(reader, within=5.0) -> bool:
    """The server closed the connection (EOF, or a reset) without answering."""
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except ConnectionResetError:
        return True


async def answer(reader, within=5.0) -> tuple[int, dict, dict]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), within)
    return status, headers, json.loads(body)


async def get_health(api) -> int:
    r, w = await connect(api)
    w.write(b"GET /v2/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    status, _, _ = await answer(r)
    w.close()
    return status


async def settle():
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_idle_connections_are_bounded_and_the_longest_idle_makes_room(api, monkeypatch):
    monkeypatch.setattr(api_app, "MAX_CONNS", 4)
    conns = []
    for _ in range(10):
        conns.append(await connect(api))
        await settle()
    assert len(api.server.connections) <= 4
    # the oldest six were closed for the newer ones; the newest are still open
    assert all([await closed(r) for r, _ in conns[:6]])
    assert not any(r.at_eof() for r, _ in conns[-3:])
    assert await get_health(api) == 200  # a new client still gets in
    for _, w in conns:
        w.close()


async def test_a_request_in_progress_is_never_closed_to_make_room(api, monkeypatch):
    monkeypatch.setattr(api_app, "MAX_CONNS", 2)
    busy = []
    body = json.dumps({"SchedName": "wrr"}).encode()
    for _ in range(2):  # two requests whose bodies are still arriving: both in a handler
        r, w = await connect(api)
        w.write(f"{HEAD}Content-Length: {len(body)}\r\n\r\n".encode() + body[:3])
        busy.append((r, w))
    await settle()
    r3, w3 = await connect(api)
    assert await closed(r3), "no room: the new connection is the one closed"
    for r, w in busy:
        w.write(body[3:])
    for r, w in busy:
        status, _, reply = await answer(r)
        assert status == 200, reply
        w.close()
    w3.close()


async def test_a_request_head_must_arrive_within_the_keepalive_time(monkeypatch):
    monkeypatch.setattr(api_app, "KEEPALIVE_S", 0.3)
    runner = await start_api(quick_start(FakeCtx()), "127.0.0.1", 0, access_log=False)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        w.write(b"GET /v2/health HTTP/1.1\r\nHost: 127")  # and nothing more
        assert await closed(r)
        w.close()
    finally:
        await stop_api(runner)


async def test_a_body_must_arrive_within_its_deadline(api, monkeypatch):
    monkeypatch.setattr(api_app, "BODY_TIMEOUT_S", 0.3)
    r, w = await connect(api)
    w.write(f"{HEAD}Content-Length: 100\r\n\r\n{{\"Sched".encode())
    status, headers, reply = await answer(r)
    assert status == 408 and "not received whole within 0.3 s" in reply["error"]
    assert headers.get("connection", "").lower() == "close" and await closed(r)
    w.close()
    assert await get_health(api) == 200


async def test_large_bodies_share_one_budget(api, monkeypatch):
    monkeypatch.setattr(api_app, "SMALL_BODY", 1000)
    monkeypatch.setattr(api_app, "INFLIGHT_MAX", 3000)
    big = json.dumps({"SchedName": "wrr", "pad": " " * 2400}).encode()
    ra, wa = await connect(api)
    wa.write(f"{HEAD}Content-Length: {len(big)}\r\n\r\n".encode() + big[:10])  # holds ~2.4 kB of the 3
    await settle()
    rb, wb = await connect(api)
    wb.write(f"{HEAD}Content-Length: {len(big)}\r\n\r\n".encode() + big)
    status, headers, reply = await answer(rb)
    assert status == 503 and headers["retry-after"] == "1" and "being taken" in reply["error"]
    small = json.dumps({"SchedName": "wrr"}).encode()  # small bodies are always taken
    rc, wc = await connect(api)
    wc.write(f"{HEAD}Content-Length: {len(small)}\r\n\r\n".encode() + small)
    assert (await answer(rc))[0] == 200
    wa.write(big[10:])
    assert (await answer(ra))[0] != 503  # the first one goes on (its pad field is judged by the handler)
    rb, wb2 = await connect(api)
    wb2.write(f"{HEAD}Content-Length: {len(big)}\r\n\r\n".encode() + big)
    assert (await answer(rb))[0] != 503  # and once it is done, the next one is taken
    for w in (wa, wb, wb2, wc):
        w.close()
