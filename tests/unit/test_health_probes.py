"""Probes against awkward peers: a fixed bind_port probed again at once, malformed HTTP responses."""

from __future__ import annotations

import asyncio
import logging

import pytest

from hdslb.health import check_http, check_tcp, run_check
from tests.unit.test_health import LO, closed_port, http_check, port_of, real, tcp_check, url


async def wait_for_eof(reader, writer, answer=b""):
    """A server that (after `answer`) keeps the connection until the client ends it: the client closes first."""
    try:
        if answer:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        await reader.read()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    writer.close()


@pytest.fixture
async def eof_server():
    servers = []

    async def make(answer=b""):
        s = await asyncio.start_server(lambda r, w: wait_for_eof(r, w, answer), "127.0.0.1", 0)
        servers.append(s)
        return port_of(s)

    yield make
    for s in servers:
        s.close()
        await s.wait_closed()


# ---------------------------------------------------------------- bind_port


async def test_tcp_check_with_a_bind_port_passes_again_and_again(eof_server):
    port = await eof_server()
    check = tcp_check(port, bindto=LO, bind_port=closed_port())
    for i in range(3):
        r = await check_tcp(check, real())
        assert r.ok, f"probe {i}: {r.reason}"  # no TIME_WAIT of ours on the port: it binds again at once


async def test_http_check_with_a_bind_port_passes_again_and_again(eof_server):
    port = await eof_server(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    check = http_check(url("/", 200), port=port, bindto=LO, bind_port=closed_port())
    for i in range(3):
        r = await check_http(check, real())
        assert r.ok, f"probe {i}: {r.reason}"


# ---------------------------------------------------------------- malformed HTTP


async def answering(answer: bytes):
    async def handle(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("answer, why", [
    (b"HTTP/1.0 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", "header line longer than 65536 bytes"),
    (b"HTTP/1.0 200 " + b"O" * 70000 + b"\r\n\r\n", "status line longer than 65536 bytes"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length -1"),
    (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nabc\r\n0\r\n\r\n", "chunk size b'-5\\r\\n'"),
    (b"HTTP/1.0 200 OK\r\nContent-Le", "connection closed before the end of the headers"),
])
async def test_a_malformed_response_is_a_failed_check_without_a_traceback(answer, why, caplog):
    server = await answering(answer)
    try:
        check = http_check(url("/", 200, digest="0" * 32), port=port_of(server))
        with caplog.at_level(logging.DEBUG, logger="hdslb.health"):
            r = await run_check(check, real())
        assert not r.ok
        assert r.reason == f"malformed HTTP response to GET / from 127.0.0.1:{port_of(server)}: {why}"
        assert not [rec for rec in caplog.records if rec.exc_info]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("answer", [b"HTTP/1.0 200 OK\r\n", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nServ"])
async def test_a_response_cut_before_the_end_of_its_headers_fails_without_a_digest_too(answer):
    """Without a digest only the status is judged, but a server that closes after its status line (it crashed, a
    proxy gave up) did not answer: this passed as HTTP 200. keepalived finds no end of headers in it (extract_html):
    "no data received", a failed check."""
    server = await answering(answer)
    try:
        r = await run_check(http_check(url("/", 200), port=port_of(server)), real())
        assert not r.ok and r.reason == f"malformed HTTP response to GET / from 127.0.0.1:{port_of(server)}: " \
            "connection closed before the end of the headers", r.reason
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------- a socket that cannot be bound


async def test_an_unusable_bindto_fails_each_kind_of_probe_with_its_reason():
    """bindto an address this host does not have: each network checker fails at once, naming the target and the
    local address it could not bind (TCP_CHECK and SMTP_CHECK as "connect to", UDP_CHECK as "UDP to")."""
    from ipaddress import ip_address

    from hdslb.health import check_udp
    from hdslb.health.smtp import check_smtp
    from tests.unit.test_health import udp_check
    from tests.unit.test_health_smtp import smtp_rs

    port = closed_port()
    bad = "192.0.2.1"  # TEST-NET-1: never one of ours
    r = await check_tcp(tcp_check(port, bindto=ip_address(bad)), real(port))
    assert not r.ok and r.reason.startswith(f"connect to 127.0.0.1:{port}: cannot bind to {bad}:0"), r.reason
    r = await check_udp(udp_check(port, bindto=ip_address(bad)), real(port))
    assert not r.ok and r.reason.startswith(f"UDP to 127.0.0.1:{port}: cannot bind to {bad}:0"), r.reason
    check, rs = smtp_rs(port, f"   bindto {bad}")
    r = await check_smtp(check, rs)
    assert not r.ok and r.reason.startswith(f"connect to 127.0.0.1:{port}: cannot bind to {bad}:0"), r.reason
