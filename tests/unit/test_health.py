"""Health checkers and the health manager, against servers started on 127.0.0.1 (no root, no other traffic)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import time
from ipaddress import ip_address

import pytest
from aiohttp import web

from hdslb.config import loads
from hdslb.config.model import HttpCheck, HttpUrl, MiscCheck, TcpCheck, UdpCheck
from hdslb.health import CheckResult, HealthManager, check_http, check_misc, check_tcp, check_udp, pairs_of, run_check

LO = ip_address("127.0.0.1")

# ---------------------------------------------------------------- builders

# One parsed service gives every field a real value; tests replace the few they care about.
_BASE_VS = loads("virtual_server 10.0.0.1 80 {\n lb_kind FNAT\n real_server 127.0.0.1 80 {\n }\n}\n").virtual_servers[0]
_BASE_RS = _BASE_VS.real_servers[0]
# Fast, single-shot defaults: checks start at once, retry nothing, and wait long before a second probe.
_FAST = dict(retry=0, delay_before_retry=0.05, delay_loop=60.0, warmup=0.0)
_CONN = dict(connect_ip=None, connect_port=None, bindto=None, bind_port=None, connect_timeout=1.0)


def tcp_check(port=None, **kw) -> TcpCheck:
    return TcpCheck(kind="TCP_CHECK", **{**_FAST, **_CONN, "connect_port": port, **kw})


def http_check(*urls, port=None, kind="HTTP_GET", virtualhost=None, **kw) -> HttpCheck:
    return HttpCheck(kind=kind, url=tuple(urls), virtualhost=virtualhost,
                     **{**_FAST, **_CONN, "connect_port": port, **kw})


def url(path, *codes, digest=None) -> HttpUrl:
    return HttpUrl(path=path, status_code=tuple(c if isinstance(c, tuple) else (c, c) for c in codes), digest=digest)


def udp_check(port, payload=None, require_reply=None, **kw) -> UdpCheck:
    return UdpCheck(kind="UDP_CHECK", payload=payload, require_reply=require_reply,
                    **{**_FAST, **_CONN, "connect_port": port, "connect_timeout": 0.3, **kw})


def misc_check(cmd, dynamic=False, timeout=5.0, **kw) -> MiscCheck:
    return MiscCheck(kind="MISC_CHECK", misc_path=cmd, misc_timeout=timeout, misc_dynamic=dynamic, user=None,
                     **{**_FAST, **kw})


def real(port=80, *checkers, ip="127.0.0.1", weight=1, inhibit=False):
    return dataclasses.replace(_BASE_RS, ip=ip_address(ip), port=port, weight=weight, inhibit_on_failure=inhibit,
                               checkers=tuple(checkers))


def virtual(*servers, port=80, **kw):
    return dataclasses.replace(_BASE_VS, port=port, real_servers=tuple(servers), **kw)


class Recorder:
    """The daemon's side: every notice, in order."""

    def __init__(self):
        self.changes = []  # (rs_key, up, weight, reason)
        self.quorum = []  # (vs_key, lost)

    async def on_change(self, vs_key, rs_key, up, weight, reason):
        self.changes.append((rs_key, up, weight, reason))

    async def on_quorum(self, vs_key, lost):
        self.quorum.append((vs_key, lost))

    def states(self, rs_key=None):
        return [(up, w) for k, up, w, _ in self.changes if rs_key is None or k == rs_key]


class Scripted:
    """A probe whose answer per real server port the test sets; counts and times every call."""

    def __init__(self):
        self.ok = {}  # port -> bool (default True)
        self.weight = {}  # port -> weight a misc_dynamic would ask for
        self.calls = []  # (port, loop time)

    async def __call__(self, checker, rs):
        self.calls.append((rs.port, asyncio.get_running_loop().time()))
        ok = self.ok.get(rs.port, True)
        return CheckResult(ok, "fine" if ok else f"port {rs.port} says no", self.weight.get(rs.port))

    def count(self, port):
        return sum(1 for p, _ in self.calls if p == port)


async def until(pred, timeout=3.0, step=0.005):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step)


def closed_port(kind=socket.SOCK_STREAM) -> int:
    """A port nobody listens on: bound, read back, released."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def listener():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, backlog=1024)
    yield server
    server.close()
    await server.wait_closed()


def port_of(server) -> int:
    return server.sockets[0].getsockname()[1]


# ---------------------------------------------------------------- TCP_CHECK


async def test_tcp_up_then_refused_when_listener_stops(listener):
    port = port_of(listener)
    assert (await check_tcp(tcp_check(port), real())).ok
    listener.close()
    await listener.wait_closed()
    r = await check_tcp(tcp_check(port), real())
    assert not r.ok and r.reason == f"connect to 127.0.0.1:{port} refused"


async def test_tcp_timeout_reason_names_address_and_time():
    # A listener with a full accept queue drops further SYNs: the connect hangs until our timeout.
    with socket.socket() as ls, socket.socket() as filler:
        ls.bind(("127.0.0.1", 0))
        ls.listen(0)
        port = ls.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        t0 = time.monotonic()
        r = await check_tcp(tcp_check(port, connect_timeout=0.2), real())
        assert time.monotonic() - t0 < 1.0
    assert not r.ok and r.reason == f"connect to 127.0.0.1:{port} timed out after 0.2s"


async def test_tcp_uses_real_server_port_unless_connect_port(listener):
    assert (await check_tcp(tcp_check(), real(port_of(listener)))).ok
    assert not (await check_tcp(tcp_check(closed_port()), real(port_of(listener)))).ok


# ---------------------------------------------------------------- HTTP_GET / SSL_GET


def _app():
    async def ok(request):
        return web.Response(text="hello")

    async def unavailable(request):
        return web.Response(status=503, text="busy")

    async def moved(request):
        return web.Response(status=302, headers={"Location": "/ok"})

    async def vhost(request):
        port = request.transport.get_extra_info("sockname")[1]
        want = request.query.get("want", "www.example.com").replace("PORT", str(port))
        return web.Response(status=200 if request.host == want else 421, text=request.host)

    async def agent(request):
        return web.Response(status=200 if request.headers.get("User-Agent") == "KeepAliveClient" else 400)

    app = web.Application()
    app.add_routes([web.get("/ok", ok), web.get("/health", unavailable), web.get("/moved", moved),
                    web.get("/vhost", vhost), web.get("/agent", agent)])
    return app


async def _serve(app, ssl_context=None):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


@pytest.fixture
async def http_port():
    runner, port = await _serve(_app())
    yield port
    await runner.cleanup()


async def test_http_status_codes(http_port):
    rs = real(http_port)
    assert (await check_http(http_check(url("/ok")), rs)).ok  # default: any 2xx
    r = await check_http(http_check(url("/health", 200)), rs)
    assert not r.ok and r.reason == "HTTP 503 from /health (want 200)"
    assert (await check_http(http_check(url("/health", (200, 299), 503)), rs)).ok  # ranges as keepalived
    r = await check_http(http_check(url("/moved", (200, 299), 503)), rs)
    assert not r.ok and r.reason == "HTTP 302 from /moved (want 200-299 503)"
    assert (await check_http(http_check(url("/agent")), rs)).ok


async def test_http_every_url_must_pass(http_port):
    r = await check_http(http_check(url("/ok"), url("/health")), real(http_port))
    assert not r.ok and "/health" in r.reason


async def test_http_digest(http_port):
    good = hashlib.md5(b"hello").hexdigest()
    assert (await check_http(http_check(url("/ok", digest=good)), real(http_port))).ok
    r = await check_http(http_check(url("/ok", digest="0" * 32)), real(http_port))
    assert not r.ok and r.reason == f"MD5 of /ok is {good} (want {'0' * 32})"


async def test_http_host_header_from_virtualhost(http_port):
    assert (await check_http(http_check(url("/vhost"), virtualhost="www.example.com"), real(http_port))).ok
    # keepalived: no virtualhost → the address and port; a virtualhost goes without the port
    assert (await check_http(http_check(url("/vhost?want=127.0.0.1:PORT")), real(http_port))).ok
    r = await check_http(http_check(url("/vhost")), real(http_port))
    assert not r.ok and r.reason == "HTTP 421 from /vhost (want 200-299)"


async def test_http_without_url_passes_without_connecting():
    assert (await check_http(http_check(), real(closed_port()))).ok


async def test_http_refused():
    port = closed_port()
    r = await check_http(http_check(url("/")), real(port))
    assert not r.ok and r.reason == f"connect to 127.0.0.1:{port} refused"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
async def test_ssl_get_accepts_a_self_signed_certificate(tmp_path):
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=rs1"],
                   check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    runner, port = await _serve(_app(), ctx)
    try:
        good = hashlib.md5(b"hello").hexdigest()
        assert (await check_http(http_check(url("/ok", digest=good), kind="SSL_GET"), real(port))).ok
        r = await check_http(http_check(url("/health", 200), kind="SSL_GET"), real(port))
        assert r.reason == "HTTP 503 from /health (want 200)"
    finally:
        await runner.cleanup()


def _cert(tmp_path, name, *extra):
    key, cert = tmp_path / f"{name}-key.pem", tmp_path / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}", *extra],
                   check=True, capture_output=True)
    return str(cert), str(key)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
async def test_ssl_get_presents_the_ssl_blocks_client_certificate(tmp_path):
    """keepalived's SSL { certificate; key; password }: every SSL_GET presents that certificate, so a server that
    asks for one (mutual TLS) answers the check; without it the handshake fails and so does the check."""
    from hdslb.config.model import SslDefs

    server_cert, server_key = _cert(tmp_path, "rs1", "-nodes")
    client_cert, client_key = _cert(tmp_path, "lb", "-passout", "pass:s3cret")  # an encrypted key
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(server_cert, server_key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(client_cert)
    runner, port = await _serve(_app(), ctx)
    try:
        tls = SslDefs(password="s3cret", ca=None, certificate=client_cert, key=client_key)
        r = await check_http(http_check(url("/ok"), kind="SSL_GET", tls=tls), real(port))
        assert r.ok, r.reason
        assert not (await check_http(http_check(url("/ok"), kind="SSL_GET"), real(port))).ok
        # the CA is loaded but, as in keepalived, verifies nothing: the server's certificate is not from it
        tls = SslDefs(password="s3cret", ca=client_cert, certificate=client_cert, key=client_key)
        assert (await check_http(http_check(url("/ok"), kind="SSL_GET", tls=tls), real(port))).ok
        # the files are loaded again when they change on disk (a renewed certificate): one gone fails the probe
        os.remove(client_key)
        r = await check_http(http_check(url("/ok"), kind="SSL_GET", tls=tls), real(port))
        assert not r.ok and r.reason.startswith("the SSL block's certificate no longer loads:"), r.reason
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- UDP_CHECK


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, reply):
        self.reply = reply  # callable(data) -> bytes | None (None: stay silent)

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        out = self.reply(data)
        if out is not None:
            self.transport.sendto(out, addr)


@pytest.fixture
async def udp_server():
    transports = []

    async def start(reply):
        t, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: _Udp(reply),
                                                                         local_addr=("127.0.0.1", 0))
        transports.append(t)
        return t.get_extra_info("sockname")[1]

    yield start
    for t in transports:
        t.close()


async def test_udp_require_reply(udp_server):
    echo = await udp_server(lambda d: d)
    assert (await check_udp(udp_check(echo, b"\x01\x02\x03", require_reply=b""), real())).ok
    # keepalived compares the shorter of the reply and require_reply
    assert (await check_udp(udp_check(echo, b"\x01\x02\x03", require_reply=b"\x01\x02"), real())).ok
    assert (await check_udp(udp_check(echo, b"\x01", require_reply=b"\x01\x02"), real())).ok
    r = await check_udp(udp_check(echo, b"\x01\x02", require_reply=b"\xff"), real())
    assert not r.ok and r.reason == f"reply from 127.0.0.1:{echo} starts 01 (want ff)"


async def test_udp_reply_length_bounds(udp_server):
    """keepalived's check_udp_reply: with require_reply DATA, a reply shorter than min_reply_length or longer than
    max_reply_length (default 255) fails; enough is read to see that a reply is longer."""
    echo = await udp_server(lambda d: d)
    want = b"\x01"
    ok = [(b"\x01" * 4, 4, 4), (b"\x01" * 255, 0, 255), (b"\x01" * 1000, 0, 1000), (b"\x01" * 3, 0, 65535)]
    for payload, lo, hi in ok:
        r = await check_udp(udp_check(echo, payload, require_reply=want, min_reply_length=lo, max_reply_length=hi),
                            real())
        assert r.ok, (len(payload), lo, hi, r.reason)
    r = await check_udp(udp_check(echo, b"\x01" * 3, require_reply=want, min_reply_length=4), real())
    assert not r.ok and r.reason == f"3-byte reply from 127.0.0.1:{echo} is shorter than 4 bytes (min_reply_length)"
    r = await check_udp(udp_check(echo, b"\x01" * 256, require_reply=want), real())
    assert not r.ok and r.reason == f"reply from 127.0.0.1:{echo} is longer than 255 bytes (max_reply_length)"
    r = await check_udp(udp_check(echo, b"\x01" * 1001, require_reply=want, max_reply_length=1000), real())
    assert not r.ok and r.reason == f"reply from 127.0.0.1:{echo} is longer than 1000 bytes (max_reply_length)"
    # without DATA keepalived judges no length: any reply passes
    r = await check_udp(udp_check(echo, b"\x01" * 3, require_reply=b"", min_reply_length=4, max_reply_length=2),
                        real())
    assert r.ok


async def test_udp_silence_passes_only_without_require_reply(udp_server):
    silent = await udp_server(lambda d: None)
    r = await check_udp(udp_check(silent, b"\x00", connect_timeout=0.1), real())
    assert r.ok and "no ICMP error" in r.reason
    r = await check_udp(udp_check(silent, b"\x00", require_reply=b"", connect_timeout=0.1), real())
    assert not r.ok and r.reason == f"no reply from 127.0.0.1:{silent} within 0.1s"


async def test_udp_port_unreachable_fails_fast():
    port = closed_port(socket.SOCK_DGRAM)
    t0 = time.monotonic()
    r = await check_udp(udp_check(port, b"\x00", connect_timeout=2.0), real())
    assert not r.ok and "port unreachable" in r.reason
    assert time.monotonic() - t0 < 1.0


# ---------------------------------------------------------------- MISC_CHECK


async def test_misc_exit_codes():
    rs = real(weight=7)
    assert (await check_misc(misc_check("sh -c 'exit 0'"), rs)) == CheckResult(True, "MISC_CHECK sh exited 0")
    r = await check_misc(misc_check("sh -c 'exit 1'"), rs)
    assert not r.ok and r.reason == "MISC_CHECK sh exited 1"
    assert not (await check_misc(misc_check("sh -c 'exit 5'"), rs)).ok  # 2..255 fail without misc_dynamic


async def test_misc_dynamic_weights():
    rs = real(weight=7)
    r = await check_misc(misc_check("sh -c 'exit 12'", dynamic=True), rs)
    assert r.ok and r.weight == 10
    assert (await check_misc(misc_check("sh -c 'exit 2'", dynamic=True), rs)).weight == 0
    assert (await check_misc(misc_check("sh -c 'exit 255'", dynamic=True), rs)).weight == 253
    # keepalived's check_misc.c and keepalived.conf(5): "exit status 0: svc check success, weight unchanged" (it
    # was set back to the configured weight, so a script answering 0 for "no change" undid its own weights)
    assert (await check_misc(misc_check("sh -c 'exit 0'", dynamic=True), rs)).weight is None
    assert not (await check_misc(misc_check("sh -c 'exit 1'", dynamic=True), rs)).ok


async def test_misc_timeout_kills_the_command():
    t0 = time.monotonic()
    r = await check_misc(misc_check("sh -c 'sleep 30'", timeout=0.2), real())
    assert not r.ok and r.reason == "MISC_CHECK sh timed out after 0.2s"
    assert time.monotonic() - t0 < 2.0


async def test_misc_missing_program():
    r = await check_misc(misc_check("/nonexistent/check --flag"), real())
    assert not r.ok and r.reason.startswith("MISC_CHECK cannot run /nonexistent/check")


def _nobody():
    import pwd

    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


@pytest.mark.skipif(os.geteuid() != 0 or _nobody() is None, reason="runs a command as nobody: needs root and nobody")
async def test_misc_check_as_a_user_runs_in_that_users_group_alone():
    """keepalived's set_privileges: `user NAME` without GROUP runs in NAME's own group, and in no other (setgroups(1,
    &gid)). With the uid set alone the check ran in group root, reading and writing what group root may."""
    gid = _nobody().pw_gid

    def alone_in(g):
        return f"sh -c '[ \"$(id -g)\" = {g} ] && [ \"$(id -G)\" = {g} ]'"

    r = await check_misc(dataclasses.replace(misc_check(alone_in(gid)), user="nobody"), real())
    assert r.ok, f"{r.reason}: not in group {gid} alone"
    r = await check_misc(dataclasses.replace(misc_check(alone_in(0)), user="nobody root"), real())
    assert r.ok, f"{r.reason}: not in group 0, the GROUP given, alone"


async def test_run_check_dispatches_on_kind(listener):
    assert (await run_check(tcp_check(port_of(listener)), real())).ok
    assert (await run_check(misc_check("true"), real())).ok


# ---------------------------------------------------------------- the manager


async def test_retry_and_delay_before_retry_before_declaring_down():
    calls = []

    async def probe(checker, rs):
        calls.append(asyncio.get_running_loop().time())
        return await run_check(checker, rs)

    port = closed_port()
    rec = Recorder()
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe)
    rs = real(port, tcp_check(retry=2, delay_before_retry=0.05, delay_loop=30))
    await mgr.start(pairs_of([virtual(rs)]))
    try:
        await until(lambda: rec.changes)
        assert len(calls) == 3  # the first probe and two retries
        assert calls[2] - calls[0] >= 0.1 - 0.01  # two delay_before_retry gaps
        key, up, weight, reason = rec.changes[0]
        assert (key, up, weight) == (rs.key, False, None)
        assert reason == f"TCP_CHECK: connect to 127.0.0.1:{port} refused (after 2 retries)"
        await asyncio.sleep(0.15)
        assert len(calls) == 3  # a down checker waits delay_loop, no retries
    finally:
        await mgr.stop()


async def test_down_and_back_sequence():
    probe, rec = Scripted(), Recorder()
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe)
    rs = real(81, tcp_check(retry=1, delay_before_retry=0.01, delay_loop=0.03), weight=5)
    await mgr.start([(virtual(rs), rs)])
    try:
        await until(lambda: probe.count(81) >= 2)
        assert rec.changes == []  # up from the start (no alpha): nothing to say
        probe.ok[81] = False
        await until(lambda: rec.changes)
        probe.ok[81] = True
        await until(lambda: len(rec.changes) == 2)
        assert rec.states() == [(False, None), (True, None)]  # up at the weight the pool gives it
        assert rec.changes[0][3] == "TCP_CHECK: port 81 says no (after 1 retry)"
        st = mgr.server(virtual(rs).key, rs.key)
        assert st.alive and st.last_failure == "TCP_CHECK: port 81 says no" and st.failures == 0
    finally:
        await mgr.stop()


async def test_alpha_starts_down_and_does_not_retry():
    probe, rec = Scripted(), Recorder()
    probe.ok[82] = False
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe)
    rs = real(82, tcp_check(retry=5, delay_before_retry=0.001, delay_loop=0.05))
    vs = virtual(rs, alpha=True)
    await mgr.start(pairs_of([vs]))
    try:
        await mgr.settle()
        assert rec.states() == [(False, None)] and "alpha" in rec.changes[0][3]
        assert rec.quorum == [(vs.key, True)]  # weight 0 < quorum 1 from the start
        assert not mgr.is_up(vs.key, rs.key)
        await asyncio.sleep(0.12)
        assert probe.count(82) <= 4  # every delay_loop, not every delay_before_retry
        probe.ok[82] = True
        await until(lambda: len(rec.changes) == 2)
        assert rec.states() == [(False, None), (True, None)]  # up at the weight the pool gives it
        await until(lambda: len(rec.quorum) == 2)
        assert rec.quorum[-1] == (vs.key, False)
    finally:
        await mgr.stop()


class _Latest(random.Random):
    """The latest first probe the manager may choose: uniform() gives its upper bound."""

    def uniform(self, a, b):
        return b


async def test_alpha_without_warmup_probes_its_down_servers_at_once():
    """keepalived launches every checker 1 s after start (BOOTSTRAP_DELAY + a random warmup, none unset). Spread over
    delay_loop instead, an alpha server waited up to delay_loop (60 s by default) out of the pool, or with the
    sorry server in, before its first probe could bring it in. A server that starts up is still spread."""
    probe, rec = Scripted(), Recorder()
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, rng=_Latest())
    down = real(84, tcp_check(warmup=None, delay_loop=60.0))
    up = real(85, tcp_check(warmup=None, delay_loop=60.0))
    alpha, plain = virtual(down, alpha=True), virtual(up, port=81)
    await mgr.start(pairs_of([alpha, plain]))
    try:
        await until(lambda: mgr.is_up(alpha.key, down.key))
        await mgr.settle()
        assert rec.states(down.key) == [(False, None), (True, None)]
        assert probe.count(85) == 0 and mgr.is_up(plain.key, up.key)  # up meanwhile: its probe within delay_loop
    finally:
        await mgr.stop()


async def test_inhibit_on_failure_asks_for_weight_zero():
    probe, rec = Scripted(), Recorder()
    probe.ok[83] = False
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe)
    rs = real(83, tcp_check(delay_loop=0.02), weight=3, inhibit=True)
    await mgr.start(pairs_of([virtual(rs)]))
    try:
        await until(lambda: rec.changes)
        assert rec.states() == [(False, 0)]
        probe.ok[83] = True
        await until(lambda: len(rec.changes) == 2)
        assert rec.states()[-1] == (True, None)  # back at the weight the pool gives it (3)
    finally:
        await mgr.stop()


async def test_several_checkers_all_must_pass(listener):
    rec = Recorder()
    mgr = HealthManager(rec.on_change, rec.on_quorum)
    rs = real(port_of(listener), tcp_check(), tcp_check(closed_port()))
    await mgr.start(pairs_of([virtual(rs)]))
    try:
        await until(lambda: rec.changes)
        assert rec.states() == [(False, None)]
        st = mgr.status()["10.0.0.1:80/TCP"]["real_servers"][f"127.0.0.1:{port_of(listener)}"]
        assert [c["state"] for c in st["checkers"]] == ["up", "down"]
    finally:
        await mgr.stop()


async def test_misc_dynamic_sets_weight_through_the_manager():
    rec = Recorder()
    mgr = HealthManager(rec.on_change, rec.on_quorum)
    rs = real(84, misc_check("sh -c 'exit 12'", dynamic=True), weight=1)
    vs = virtual(rs)
    await mgr.start(pairs_of([vs]))
    try:
        await until(lambda: rec.changes)
        assert rec.states() == [(True, 10)]
        assert mgr.status()[str(vs)]["weight"] == 10
        assert mgr.server(vs.key, rs.key).reason == "MISC_CHECK: MISC_CHECK sh exited 12: weight 10"
    finally:
        await mgr.stop()


async def test_misc_dynamic_a_new_weight_is_the_reason_shown():
    """health show said why the server was at its weight: the exit that set the first one, for good ("exited 12:
    weight 10" at weight 5)."""
    rec, weight = Recorder(), {"w": 10}

    async def script(checker, rs):
        return CheckResult(True, f"exited {weight['w'] + 2}: weight {weight['w']}", weight["w"])

    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=script)
    rs = real(85, misc_check("x", dynamic=True, delay_loop=0.01), weight=1)
    vs = virtual(rs)
    await mgr.start(pairs_of([vs]))
    try:
        await until(lambda: rec.changes)
        weight["w"] = 5
        await until(lambda: len(rec.changes) == 2)
        assert rec.states() == [(True, 10), (True, 5)]
        assert mgr.server(vs.key, rs.key).reason == "MISC_CHECK: exited 7: weight 5"
    finally:
        await mgr.stop()


async def test_misc_dynamic_exit_0_leaves_the_weight_the_script_set():
    """keepalived: exit 0 is "success, weight unchanged"; only 2..255 set a weight."""
    probe, rec = Scripted(), Recorder()
    rs = real(85, misc_check("x", dynamic=True, delay_loop=0.02), weight=1)
    vs = virtual(rs)
    probe.weight[85] = 10
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe)
    await mgr.start(pairs_of([vs]))
    try:
        await until(lambda: rec.changes)
        probe.weight[85] = None  # exit 0
        n = probe.count(85)
        await until(lambda: probe.count(85) >= n + 3)
        await mgr.settle()
        assert rec.states() == [(True, 10)] and mgr.status()[str(vs)]["weight"] == 10
    finally:
        await mgr.stop()


async def test_quorum_loss_and_restore_with_hysteresis():
    probe, rec = Scripted(), Recorder()
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe)
    ports = [91, 92, 93, 94]
    vs = virtual(*(real(p, tcp_check(delay_loop=0.01)) for p in ports), quorum=3, hysteresis=1)
    await mgr.start(pairs_of([vs]))

    async def flip(port, ok):
        n = len(rec.changes)
        probe.ok[port] = ok
        await until(lambda: len(rec.changes) > n)
        await mgr.settle()

    try:
        assert mgr.quorum_up(vs.key) is True  # 4 >= 3+1
        await flip(91, False)
        await flip(92, False)
        assert rec.quorum == []  # 2 is not < 3-1
        await flip(93, False)
        assert rec.quorum == [(vs.key, True)]  # 1 < 2: lost
        await flip(91, True)
        await flip(92, True)
        assert rec.quorum == [(vs.key, True)]  # 3 is not >= 4: still lost
        await flip(93, True)
        assert rec.quorum == [(vs.key, True), (vs.key, False)]  # 4 >= 4: gained
    finally:
        await mgr.stop()


async def test_update_keeps_state_starts_new_stops_removed():
    probe, rec = Scripted(), Recorder()
    probe.ok[101] = False
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe)
    a = real(101, tcp_check(delay_loop=0.02))
    b = real(102, tcp_check(delay_loop=0.02))
    await mgr.start(pairs_of([virtual(a, b)]))
    try:
        await until(lambda: rec.changes)
        assert rec.states() == [(False, None)]
        c = real(103, tcp_check(delay_loop=0.02))
        a2 = real(101, tcp_check(delay_loop=0.02, connect_timeout=2.0))  # changed checker: fresh, still down
        vs2 = virtual(a2, c)
        mgr.update(pairs_of([vs2]))
        await mgr.settle()
        assert not mgr.is_up(vs2.key, a.key)
        b_calls = probe.count(102)
        await until(lambda: probe.count(103) >= 2 and probe.count(101) >= 3)
        assert probe.count(102) == b_calls  # removed: no more probes
        assert rec.states() == [(False, None)]  # nothing flapped
        assert set(mgr.status()[str(vs2)]["real_servers"]) == {"127.0.0.1:101", "127.0.0.1:103"}
        probe.ok[101] = True
        await until(lambda: len(rec.changes) == 2)
        assert rec.states() == [(False, None), (True, None)]
    finally:
        await mgr.stop()


async def test_omega_reports_down_and_quorum_lost_on_stop():
    probe, rec = Scripted(), Recorder()
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe)
    rs = real(111, tcp_check(), inhibit=True)
    vs = virtual(rs, omega=True)
    await mgr.start(pairs_of([vs]))
    await until(lambda: probe.count(111) >= 1)
    await mgr.stop()
    assert rec.states() == [(False, None)]  # removed, even though inhibit_on_failure
    assert rec.quorum == [(vs.key, True)]


async def test_status_is_json():
    probe, rec = Scripted(), Recorder()
    probe.ok[121] = False
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe)
    rs = real(121, tcp_check())
    vs = virtual(rs)
    await mgr.start(pairs_of([vs]))
    try:
        await until(lambda: rec.changes)
        st = json.loads(json.dumps(mgr.status()))
        srv = st["10.0.0.1:80/TCP"]["real_servers"]["127.0.0.1:121"]
        assert srv["state"] == "down" and srv["reason"] == "TCP_CHECK: port 121 says no"
        assert srv["failures"] == 1 and srv["last_check"] > 0
        assert st["10.0.0.1:80/TCP"]["quorum"] == "down"
    finally:
        await mgr.stop()


async def test_a_failing_callback_does_not_stop_later_notices():
    probe, seen = Scripted(), []
    probe.ok[131] = probe.ok[132] = False

    async def on_change(vs_key, rs_key, up, weight, reason):
        seen.append(rs_key[1])
        raise RuntimeError("daemon bug")

    mgr = HealthManager(on_change, probe=probe)
    await mgr.start(pairs_of([virtual(real(131, tcp_check()), real(132, tcp_check()))]))
    try:
        await until(lambda: len(seen) == 2)
    finally:
        await mgr.stop()


async def test_config_text_to_running_checks(listener):
    cfg = loads(f"""
virtual_server 10.0.0.1 80 {{
    lb_kind FNAT
    delay_loop 30
    real_server 127.0.0.1 {port_of(listener)} {{
        weight 2
        TCP_CHECK {{
            connect_timeout 1
            warmup 0
        }}
    }}
    real_server 127.0.0.1 {closed_port()} {{
        TCP_CHECK {{
            connect_timeout 1
            retry 0
            warmup 0
        }}
    }}
}}
""")
    rec = Recorder()
    mgr = HealthManager(rec.on_change, rec.on_quorum)
    await mgr.start(pairs_of(cfg.virtual_servers))
    try:
        await until(lambda: rec.changes)
        servers = mgr.status()["10.0.0.1:80/TCP"]["real_servers"]
        await until(lambda: all(s["last_check"] for s in mgr.status()["10.0.0.1:80/TCP"]["real_servers"].values()))
        assert [s["state"] for s in mgr.status()["10.0.0.1:80/TCP"]["real_servers"].values()] == ["up", "down"]
        assert len(servers) == 2
    finally:
        await mgr.stop()


async def test_a_thousand_checks_leave_the_loop_responsive(listener):
    """1000 real TCP checks start together (warmup 0): half connect, half are refused; a ticker that wants to
    run every 10 ms must never be late by more than 0.2 s."""
    up_port, down_port = port_of(listener), closed_port()
    # connect_timeout 5 s: on a loaded machine (other test workers, labs) a connect to the listener can complete
    # after 1 s of loop time, which counted as a failure that had nothing to do with what is tested here
    servers = [real(10000 + i, tcp_check(up_port if i % 2 else down_port, connect_timeout=5.0)) for i in range(1000)]
    vs = virtual(*servers, quorum=1)
    rec = Recorder()
    mgr = HealthManager(rec.on_change, rec.on_quorum)
    loop = asyncio.get_running_loop()
    lags = []
    stop = asyncio.Event()

    async def ticker():
        while not stop.is_set():
            t = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - t - 0.01)

    tick = asyncio.create_task(ticker())
    await mgr.start(pairs_of([vs]))
    try:
        def all_checked():
            return all(s.last_check for s in (mgr.server(vs.key, r.key) for r in servers))
        await until(all_checked, timeout=10)  # together: one after another, 1000 probes would not finish in 10 s
        await mgr.settle()
        stop.set()
        await tick
        assert sum(1 for _, up, _, _ in rec.changes if not up) == 500
        # a blocking checker stalls for whole connect timeouts (1 s here); 0.5 s leaves room for a loaded CI box
        assert max(lags) < 0.5, f"loop stalled {max(lags):.3f}s"
    finally:
        stop.set()
        await mgr.stop()
