"""SMTP_CHECK against SMTP servers played on 127.0.0.1: the dialogue keepalived's check_smtp.c holds."""

from __future__ import annotations

import asyncio
import socket

import pytest

from hdslb.config import loads
from hdslb.health import check_smtp, run_check


class Smtp:
    """A scripted SMTP server: what it says on connect, to HELO and to QUIT; what it heard."""

    def __init__(self, greeting=b"220-mx.example ESMTP\r\n220 ready\r\n", helo=b"250 pleased to meet you\r\n",
                 quit=b"221 bye\r\n"):
        self.greeting, self.helo, self.quit = greeting, helo, quit
        self.heard = []

    async def serve(self, reader, writer):
        try:
            if self.greeting is None:
                await reader.read()  # silent until the client leaves
                return
            writer.write(self.greeting)
            while True:
                line = await reader.readline()
                if not line:
                    return
                self.heard.append(line)
                writer.write(self.helo if line.startswith(b"HELO") else self.quit)
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def smtp():
    servers = []

    async def start(**kw):
        s = Smtp(**kw)
        server = await asyncio.start_server(s.serve, "127.0.0.1", 0)
        servers.append(server)
        return s, server.sockets[0].getsockname()[1]

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smtp_rs(port, body="", timeout=1):
    text = (f"virtual_server 10.0.0.1 25 {{\n real_server 127.0.0.1 {port} {{\n  SMTP_CHECK {{\n"
            f"   connect_timeout {timeout}\n{body}\n  }}\n }}\n}}\n")
    rs = loads(text, name="k.conf").virtual_servers[0].real_servers[0]
    return rs.checkers[0], rs


async def test_a_full_dialogue_passes(smtp):
    server, port = await smtp()
    check, rs = smtp_rs(port, '   helo_name "lb1.example"')
    r = await run_check(check, rs)  # wired into the probe table
    assert r.ok and r.reason == f"SMTP dialogue with 127.0.0.1:{port}"
    assert server.heard == [b"HELO lb1.example\r\n", b"QUIT\r\n"]


async def test_default_helo_name_is_keepalived_s(smtp):
    server, port = await smtp()
    assert (await check_smtp(*smtp_rs(port))).ok
    assert server.heard[0] == b"HELO smtpchecker.keepalived.org\r\n"


@pytest.mark.parametrize("kw,reason", [
    (dict(greeting=b"554 no service\r\n"), "SMTP greeting from 127.0.0.1:{port} is '554 no service' (want 220)"),
    (dict(greeting=b"hello\r\n"), "SMTP greeting from 127.0.0.1:{port} is 'hello' (want 220)"),
    (dict(helo=b"501 who are you\r\n"), "SMTP HELO answered '501 who are you' by 127.0.0.1:{port} (want 250)"),
    (dict(greeting=None), "SMTP greeting from 127.0.0.1:{port} timed out after 0.3s"),
    (dict(quit=b""), "SMTP QUIT to 127.0.0.1:{port} timed out after 0.3s"),
])
async def test_what_fails(smtp, kw, reason):
    _, port = await smtp(**kw)
    r = await check_smtp(*smtp_rs(port, timeout=0.3))
    assert not r.ok and r.reason == reason.format(port=port)


async def test_a_quit_answered_by_any_code_passes(smtp):
    # keepalived reads the reply to QUIT without judging it
    _, port = await smtp(quit=b"500 what\r\n")
    assert (await check_smtp(*smtp_rs(port))).ok


async def test_refused():
    port = closed_port()
    r = await check_smtp(*smtp_rs(port))
    assert not r.ok and r.reason == f"connect to 127.0.0.1:{port} refused"


async def test_every_host_block_must_pass(smtp):
    good, good_port = await smtp()
    _, bad_port = await smtp(helo=b"421 closing\r\n")
    hosts = f"   host {{\n    connect_port {good_port}\n   }}\n   host {{\n    connect_port {bad_port}\n   }}"
    check, rs = smtp_rs(closed_port(), hosts)
    assert [h.connect_port for h in check.hosts] == [good_port, bad_port]
    r = await check_smtp(check, rs)
    assert not r.ok and r.reason == f"SMTP HELO answered '421 closing' by 127.0.0.1:{bad_port} (want 250)"
    assert good.heard == [b"HELO smtpchecker.keepalived.org\r\n", b"QUIT\r\n"]  # the first host was checked
    check, rs = smtp_rs(closed_port(), hosts.replace(str(bad_port), str(good_port)))
    r = await check_smtp(check, rs)
    assert r.ok and r.reason == "2 SMTP hosts answered"


async def test_a_host_takes_the_checks_connect_options(smtp):
    _, port = await smtp(greeting=None)
    check, rs = smtp_rs(closed_port(), f"   connect_port {port}\n   host {{\n    connect_ip 127.0.0.1\n   }}",
                        timeout=0.2)
    assert check.hosts[0].connect_port is None and check.hosts[0].connect_timeout is None
    r = await check_smtp(check, rs)  # the check's port and 0.2 s timeout, the host's address
    assert not r.ok and r.reason == f"SMTP greeting from 127.0.0.1:{port} timed out after 0.2s"


def test_an_smtp_check_can_be_added_at_run_time():
    from hdslb.daemon import check_block

    svc = {"proto": "tcp", "addr": "10.0.0.100", "port": 25}
    text = check_block(svc, "192.168.100.2", 25, {"kind": "smtp_check", "params": {"helo_name": "lb1.example",
                                                                                  "connect_port": 2525}})
    (check,) = loads(text, name="t").virtual_servers[0].real_servers[0].checkers
    assert (check.kind, check.helo_name, check.connect_port) == ("SMTP_CHECK", "lb1.example", 2525)
