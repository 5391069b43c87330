"""What the REST API lets a caller do beyond changing the balancer: nothing. A posted config may not read files
or run programs, a changing request must declare a non-simple Content-Type (no cross-origin "simple request"
from a web page), a tokenless API answers loopback Host names only, and global_defs script_user /
enable_script_security govern every MISC_CHECK."""

import asyncio
import errno
import os
import stat

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hdslb.api.app import ROUTES, make_app
from hdslb.balancer import Balancer, Iface
from hdslb.config import ConfigError, loads
from hdslb.daemon import Daemon, settings_from_args
from tests.unit.test_api import CONF, SVC, VS, FakeCtx, FakeMaps, Recorder, expect, quick_start, serving

BASE = """global_defs {
    log_level INFO
}
local_address_group lg {
    192.168.100.200 eth1
}
virtual_server 10.0.0.100 80 {
    lb_algo wrr
    lb_kind FNAT
    laddr_group_name lg
    real_server 192.168.100.2 80 {
        weight 3
    }
}
"""


class HarnessDaemon(Daemon):
    """The real Daemon's config, reload and health code over a recording datapath (no BPF, no sockets)."""

    def __init__(self, conf_path, state_dir):
        os.environ.pop("HDSLB_CTRL", None)
        super().__init__(settings_from_args(["-f", str(conf_path), "eth0", "--state-dir", str(state_dir)]))
        ifaces = {"eth0": Iface("eth0", 2, b"\x02" * 6, 1500), "eth1": Iface("eth1", 3, b"\x04" * 6, 1500)}
        self.bal = Balancer(Recorder(), ifaces)
        self.maps = FakeMaps(self)
        self.svc_traffic, self.dest_traffic, self.counts = {}, {}, {}

    def _save_state(self):
        pass

    def resolve_soon(self):
        pass

    def announce(self, *a):
        pass

    def svc_stats(self, i):
        return {}

    def dest_stats(self, s):
        return {}

    def conn_counts(self):
        return {}

    def laddr_conns(self):
        return {}


@pytest.fixture
async def daemon(tmp_path):
    conf = tmp_path / "hdslb.conf"
    conf.write_text(BASE)
    d = HarnessDaemon(conf, tmp_path)
    await d.reload_config()
    yield d
    if d.health is not None:
        await d.health.stop()


def weights(d):
    return {str(x.addr): x.weight for s in d.bal.services.values() for x in s.dests.values()}


# --- a posted config reads no file and runs no program -------------------------------------------------------
@pytest.mark.parametrize("body,line,kw", [
    ("real_server 192.168.100.2 80 {\n        weight 3\n        MISC_CHECK {\n"
     "            misc_path \"/bin/sh -c 'id > {marker}'\"\n            delay_loop 1\n        }", 13, "MISC_CHECK"),
    ("real_server 192.168.100.2 80 {\n        weight 3\n        notify_up /bin/true", 13, "notify_up"),
])
async def test_posted_config_may_not_run_programs(daemon, tmp_path, body, line, kw):
    marker = tmp_path / "pwned"
    text = BASE.replace("real_server 192.168.100.2 80 {\n        weight 3", body.replace("{marker}", str(marker)))
    before = weights(daemon)
    async with TestClient(TestServer(make_app(daemon))) as c:
        b = await expect(await c.post("/v2/config", data=text, headers=CONF), 403, field=kw)
        assert b["errno"] == errno.EPERM and f"<posted config>:{line}:" in b["error"]
        assert "config file on disk" in b["error"] and "nothing was applied" in b["error"]
        await asyncio.sleep(1.5)
    assert not marker.exists() and daemon.health is None and weights(daemon) == before


async def test_posted_config_may_not_include_files(daemon, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-abc123 rest\n")
    async with TestClient(TestServer(make_app(daemon))) as c:
        for text in (f"include {secret}\n", f"virtual_server 10.0.0.1 80 {{\n include {secret}\n}}\n"):
            b = await expect(await c.post("/v2/config", data=text, headers=CONF), 403, field="include")
            assert "TOPSECRET" not in str(b) and "<posted config>:" in b["error"] and "on disk" in b["error"]
    # the same include in the file on disk is root's to write, and works
    (tmp_path / "more.conf").write_text("virtual_server 10.0.0.9 80 {\n lb_kind FNAT\n}\n")
    (tmp_path / "hdslb.conf").write_text(BASE + "include more.conf\n")
    await daemon.reload_config()
    assert any(str(s.addr) == "10.0.0.9" for s in daemon.bal.services.values())


def test_posted_text_names_every_refused_line():
    text = "include /etc/passwd\n"
    with pytest.raises(ConfigError) as e:
        loads(text, name="<p>", posted=True)
    assert e.value.errno == errno.EPERM and str(e.value).startswith("<p>:1:1: include:")
    text = ("virtual_server 10.0.0.1 80 {\n quorum_up /bin/x\n real_server 10.0.0.2 80 {\n"
            "  MISC_CHECK {\n   misc_path /bin/true\n  }\n }\n}\n")
    with pytest.raises(ConfigError) as e:
        loads(text, name="<p>", posted=True)
    assert [(x.line, x.keyword) for x in e.value.errors] == [(2, "quorum_up"), (4, "MISC_CHECK")]
    assert loads(text, name="<p>").virtual_servers  # the same text from a file is fine


@pytest.mark.parametrize("kw,value", [("log_file", "/etc/cron.d/x"), ("script_user", "root"),
                                      ("enable_script_security", "")])
async def test_posted_config_may_not_change_logging_or_script_security(daemon, kw, value):
    text = BASE.replace("log_level INFO", f"log_level INFO\n    {kw} {value}")
    async with TestClient(TestServer(make_app(daemon))) as c:
        b = await expect(await c.post("/v2/config", data=text, headers=CONF), 403)
        assert f"<posted config>:3:" in b["error"] and kw in b["error"]
        # the running values are fine to repeat: GET /v2/config and POST it back works
        await expect(await c.post("/v2/config", data=BASE.replace("weight 3", "weight 4"), headers=CONF), 200)
    assert weights(daemon)["192.168.100.2"] == 4


def test_no_rest_route_adds_a_check_or_runs_a_script():
    """Only POST /v2/config takes config text (checked above); no route reaches check.add or a script."""
    import inspect

    from hdslb.api import app

    for method, path, handler in ROUTES:
        src = inspect.getsource(handler)
        assert "check.add" not in src and "subprocess" not in src and "create_subprocess" not in src, (method, path)
    assert [(m, p) for m, p, h in ROUTES if h is app.reload_config] == [("POST", "/v2/config")]


# --- Content-Type and Host: nothing a web page can send -------------------------------------------------------
@pytest.fixture
async def client():
    ctx = quick_start(FakeCtx())
    async with serving(ctx) as c:
        yield c


@pytest.mark.parametrize("method,path,ctype", [
    ("PUT", VS, "text/plain"), ("PUT", VS, None), ("POST", "/v2/vs", "application/x-www-form-urlencoded"),
    ("POST", VS + "/rs", "multipart/form-data; boundary=x"), ("PATCH", "/v2/vs", "text/plain"),
    ("DELETE", VS + "/rs", "text/plain"), ("POST", "/v2/config", "text/plain"),
    ("POST", "/v2/config", "application/json"), ("POST", "/v2/vs", None),
])
async def test_changing_requests_need_a_non_simple_content_type(client, method, path, ctype):
    body = b"virtual_server 10.0.0.1 80 {\n}\n" if path == "/v2/config" else b'{"SchedName": "wrr"}'
    headers = {"Content-Type": ctype} if ctype else {}
    before = list(client.ctx.bal.dp.calls)
    r = await client.request(method, path, data=body if ctype or method != "POST" else b"", headers=headers,
                             skip_auto_headers=["Content-Type"])
    b = await expect(r, 415, field="Content-Type")
    assert b["errno"] == errno.EMEDIUMTYPE
    assert ("text/x-hdslb-conf" if path == "/v2/config" else "application/json") in b["error"]
    assert client.ctx.bal.dp.calls == before


async def test_json_with_charset_and_bodyless_deletes_pass(client):
    r = await client.put(VS, data=b'{"SchedName": "wrr"}', headers={"Content-Type": "application/json; charset=utf-8"})
    await expect(r, 200)
    await expect(await client.delete(VS, skip_auto_headers=["Content-Type"]), 200)  # dpvs-agent's DELETE
    await expect(await client.put("/v2/vs/10.0.0.7-80-tcp", skip_auto_headers=["Content-Type"]), 201)


@pytest.mark.parametrize("host,status", [("evil.example:53225", 403), ("10.0.0.1", 403), ("127.0.0.1:53225", 200),
                                         ("localhost", 200), ("[::1]:53225", 200)])
async def test_tokenless_api_answers_loopback_hosts_only(client, host, status):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 is same-origin to the browser."""
    await expect(await client.get("/v2/vs", headers={"Host": host}), status)


async def test_a_token_lifts_the_host_rule():
    ctx = quick_start(FakeCtx())
    async with TestClient(TestServer(make_app(ctx, "s3cret"))) as c:
        r = await c.get("/v2/vs", headers={"Host": "lb1.example:53225", "Authorization": "Bearer s3cret"})
        await expect(r, 200)


# --- script_user and enable_script_security --------------------------------------------------------------------
def test_insecure_reason_is_keepalived_script_security(tmp_path):
    from hdslb.health.misc import insecure_reason

    assert insecure_reason("/bin/sh") is None and insecure_reason("sh") is None
    d = tmp_path / "bin"
    d.mkdir()
    os.chmod(tmp_path, 0o755)
    script = d / "check.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(script, 0o755)
    os.chmod(d, 0o755)
    owned_by_root = os.geteuid() == 0
    if owned_by_root:
        assert insecure_reason(str(script)) is None
    os.chmod(d, 0o777)
    assert "writable by everyone" in insecure_reason(str(script)) or not owned_by_root
    os.chmod(d, 0o1777)  # sticky, like /tmp: others cannot replace root's file in it
    assert (insecure_reason(str(script)) is None) == owned_by_root
    os.chmod(script, 0o757)
    assert "check.sh" in insecure_reason(str(script))
    os.chmod(d, 0o755)
    os.chmod(script, 0o755)
    if owned_by_root:
        os.chown(script, 65534, 65534)
        assert "owned by uid 65534" in insecure_reason(str(script))


async def test_script_security_refuses_to_run_an_insecure_script(tmp_path, monkeypatch):
    import hdslb.health.misc as misc
    from tests.unit.test_health import misc_check, real

    marker = tmp_path / "ran"
    script = tmp_path / "check.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    os.chmod(script, 0o777)
    monkeypatch.setattr(misc, "_runs_as_root", lambda user: True)
    import dataclasses

    r = await misc.check_misc(dataclasses.replace(misc_check(str(script)), script_security=True), real())
    assert not r.ok and "not run (enable_script_security)" in r.reason and "writable by everyone" in r.reason
    assert not marker.exists()
    r = await misc.check_misc(misc_check(str(script)), real())  # without it keepalived runs it (and so do we)
    assert r.ok and marker.exists()


async def test_daemon_hands_script_user_and_security_to_the_checkers(tmp_path):
    conf = tmp_path / "hdslb.conf"
    check = ("real_server 192.168.100.2 80 {\n        weight 3\n        MISC_CHECK {\n"
             "            misc_path /bin/true\n            delay_loop 60\n        }\n"
             "        MISC_CHECK {\n            misc_path /bin/false\n            user daemon\n"
             "            delay_loop 60\n        }")
    conf.write_text(BASE.replace("log_level INFO", "log_level INFO\n    script_user nobody\n    enable_script_security")
                    .replace("real_server 192.168.100.2 80 {\n        weight 3", check))
    d = HarnessDaemon(conf, tmp_path)
    try:
        await d.reload_config()
        [srv] = [s for svc in d.health._services.values() for s in svc.servers.values()]
        assert [(c.checker.user, c.checker.script_security) for c in srv.checkers] == [("nobody", True),
                                                                                        ("daemon", True)]
        conf.write_text(conf.read_text().replace("    script_user nobody\n    enable_script_security\n", ""))
        await d.reload_config()  # a reload takes the new policy to the running checkers
        [srv] = [s for svc in d.health._services.values() for s in svc.servers.values()]
        assert [(c.checker.user, c.checker.script_security) for c in srv.checkers] == [(None, False),
                                                                                        ("daemon", False)]
    finally:
        if d.health is not None:
            await d.health.stop()
