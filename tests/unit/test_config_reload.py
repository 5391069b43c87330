"""A reload acts on every changed option it can (timeouts, logging) and names the rest: applied, needs_restart or
not_acted_on. Nothing changed in the file is silently dropped."""

import asyncio
import logging
import os
from ipaddress import ip_address

import pytest

from cli import ipvsadm
from hdslb.balancer import LOCAL_VIP
from tests.unit.test_api_security import BASE, HarnessDaemon

TIMEOUTS = """ipvs_defs {
    tcp {
        timeout {
            established 90
        }
    }
}
"""


@pytest.fixture
def root_logging():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


async def make(tmp_path, text, *args):
    conf = tmp_path / "hdslb.conf"
    conf.write_text(text)
    d = HarnessDaemon(conf, tmp_path)
    if args:
        from hdslb.daemon import settings_from_args
        d.settings = settings_from_args(["-f", str(conf), "eth0", "--state-dir", str(tmp_path), *args])
    await d.reload_config()
    return d, conf


async def test_timeouts_are_applied_live(tmp_path):
    d, conf = await make(tmp_path, BASE + TIMEOUTS)
    seen = []
    d.maps.set_idle_timeouts = seen.append
    conf.write_text(BASE + TIMEOUTS.replace("established 90", "established 300\n            fin_wait 11"))
    r = await d.reload_config()
    assert d.settings.timeouts["established"] == 300 and d.settings.timeouts["fin_wait"] == 11
    assert seen == [d.settings.timeouts]  # the fast path's cfg map (port reclaiming) too
    from hdslb.fastpath.abi import conn_states

    assert d.idle_limits().of(6, conn_states().index("established")) == 300  # what the aging sweep uses
    assert [line.split(": ", 1)[1] for line in r["applied"]] == ["ipvs_defs.tcp.timeout.established: 90 -> 300",
                                                                 "ipvs_defs.tcp.timeout.fin_wait: (unset) -> 11"]
    assert r["needs_restart"] == [] and r["not_acted_on"] == []
    # back to the default when the line goes
    conf.write_text(BASE)
    r = await d.reload_config()
    assert d.settings.timeouts["established"] == 90 and d.settings.timeouts["fin_wait"] == 7


async def test_log_level_is_applied_live_unless_the_command_line_set_it(tmp_path, root_logging):
    d, conf = await make(tmp_path, BASE)
    conf.write_text(BASE.replace("log_level INFO", "log_level DEBUG"))
    r = await d.reload_config()
    assert root_logging.level == logging.DEBUG and any("global_defs.log_level: INFO -> DEBUG" in x
                                                       for x in r["applied"])
    d, conf = await make(tmp_path, BASE, "--log-level", "warning")
    root_logging.setLevel(logging.WARNING)
    conf.write_text(BASE.replace("log_level INFO", "log_level DEBUG"))
    r = await d.reload_config()
    assert root_logging.level == logging.WARNING
    assert any("log_level" in x and "command line wins" in x for x in r["not_acted_on"])


async def test_log_file_is_reopened_on_reload(tmp_path, root_logging):
    d, conf = await make(tmp_path, BASE)
    log_path = tmp_path / "hdslb.log"
    conf.write_text(BASE.replace("log_level INFO", f"log_level INFO\n    log_file {log_path}"))
    r = await d.reload_config()
    assert any("global_defs.log_file" in x for x in r["applied"])
    logging.getLogger("hdslb.test").warning("after the reload")
    for h in root_logging.handlers:
        h.flush()
    assert "after the reload" in log_path.read_text()


async def test_a_log_file_moved_away_by_logrotate_is_written_anew(tmp_path, root_logging):
    """logrotate renames global_defs' log_file (its default create mode) and hdslbd went on writing into the renamed
    file for ever: the log at the configured path stayed empty, and a SIGHUP (the usual postrotate) did not reopen
    an unchanged log_file. Its handler now follows the path (as a WatchedFileHandler does), at start as after a
    reload."""
    d, conf = await make(tmp_path, BASE)
    log_path = tmp_path / "hdslb.log"
    conf.write_text(BASE.replace("log_level INFO", f"log_level INFO\n    log_file {log_path}"))
    await d.reload_config()
    logging.getLogger("hdslb.test").warning("before the rotation")
    os.rename(log_path, tmp_path / "hdslb.log.1")
    logging.getLogger("hdslb.test").warning("after the rotation")
    for h in root_logging.handlers:
        h.flush()
    assert "before the rotation" in (tmp_path / "hdslb.log.1").read_text()
    assert "after the rotation" in log_path.read_text()
    # main()'s handler for a log_file read at start follows it the same way
    from hdslb.daemon import log_file_handler

    h = log_file_handler(str(tmp_path / "start.log"))
    try:
        os.rename(tmp_path / "start.log", tmp_path / "start.log.1")
        h.emit(logging.makeLogRecord({"msg": "after"}))
        assert (tmp_path / "start.log").read_text() == "after\n"
    finally:
        h.close()


async def test_a_log_file_that_cannot_be_opened_refuses_the_reload(tmp_path, root_logging):
    d, conf = await make(tmp_path, BASE)
    handlers = list(root_logging.handlers)
    conf.write_text(BASE.replace("log_level INFO", f"log_level INFO\n    log_file {tmp_path}/no/such/dir/x.log")
                    .replace("weight 3", "weight 5"))
    from hdslb.errors import HdslbError

    with pytest.raises(HdslbError) as e:
        await d.reload_config()
    assert "hdslb.conf:3:" in e.value.message and "nothing was applied" in e.value.message
    assert [x.weight for s in d.bal.services.values() for x in s.dests.values()] == [3]
    assert root_logging.handlers == handlers


async def test_options_without_effect_are_named_in_the_reply(tmp_path):
    d, conf = await make(tmp_path, BASE + TIMEOUTS)
    conf.write_text(BASE + TIMEOUTS.replace("established 90", "established 90\n            time_wait 9")
                    + "timer_defs {\n    schedule_interval 100\n}\n")
    r = await d.reload_config()
    idle = "\n".join(r["not_acted_on"])
    assert "ipvs_defs.tcp.timeout.time_wait: (unset) -> 9: accepted, not acted on" in idle
    assert "timer_defs.schedule_interval" in idle and r["applied"] == []


async def test_a_reload_from_the_file_ends_the_posted_config(tmp_path):
    """GET /v2/config shows what runs: the posted text until the file is read again (SIGHUP), then the file."""
    from aiohttp.test_utils import TestClient, TestServer

    from hdslb.api.app import make_app
    from tests.unit.test_api import CONF, expect

    d, conf = await make(tmp_path, BASE)
    async with TestClient(TestServer(make_app(d))) as c:
        b = await expect(await c.post("/v2/config", data=BASE.replace("weight 3", "weight 7"), headers=CONF), 200)
        assert "not written to disk" in b["changes"]["note"] and str(conf) in b["changes"]["note"]
        r = await c.get("/v2/config")
        assert "weight 7" in await r.text() and r.headers["X-Hdslb-Config-Source"] == "posted"
        await d.reload_config()  # what SIGHUP does
        assert [x.weight for s in d.bal.services.values() for x in s.dests.values()] == [3]
        r = await c.get("/v2/config")
        assert await r.text() == BASE and r.headers["X-Hdslb-Config-Source"] == "file"
    assert "note" not in await d.reload_config()


def test_the_openapi_document_says_a_posted_config_is_not_saved():
    from hdslb.api.openapi import DOC

    post = DOC["paths"]["/v2/config"]["post"]
    assert "not written to disk" in post["summary"] and "text/x-hdslb-conf" in post["requestBody"]["content"]
    assert {"403", "415"} <= set(post["responses"])


async def test_the_file_is_parsed_in_a_worker_thread(tmp_path, monkeypatch):
    """A big config (4,000 virtual servers x 10 real servers) takes ~5 s to parse: on the event loop that held
    health checks, the slow path and every control call. The parse runs in a worker thread; what it read is
    applied on the loop as before, and a file that does not parse still changes nothing."""
    import threading

    import hdslb.config as config

    d, conf = await make(tmp_path, BASE)
    threads = []
    real = config.load
    monkeypatch.setattr(config, "load", lambda *a, **k: threads.append(threading.current_thread()) or real(*a, **k))
    conf.write_text(BASE.replace("weight 3", "weight 5"))
    await d.reload_config()
    assert threads and threads[0] is not threading.main_thread()
    assert [x.weight for s in d.bal.services.values() for x in s.dests.values()] == [5]
    conf.write_text(BASE.replace("weight 3", "weight 5 {"))
    with pytest.raises(Exception, match="nothing was applied"):
        await d.reload_config()
    assert [x.weight for s in d.bal.services.values() for x in s.dests.values()] == [5]


async def test_a_reload_runs_with_the_collector_paused_and_is_frozen_after(tmp_path, monkeypatch):
    """4,000 virtual servers x 10 real servers are over a million objects: CPython walked them again each time
    they grew by a quarter (bench.config_load: 8.7 -> 5.4 s for the load, 10.4 -> 4.9 s for a reload of the same
    file). The parse and the apply run with the collector off; what the reload made is frozen after it."""
    import gc

    import hdslb.config as config

    d, conf = await make(tmp_path, BASE)
    d.heap.enabled = True
    seen = []
    real = config.load
    monkeypatch.setattr(config, "load", lambda *a, **k: seen.append(gc.isenabled()) or real(*a, **k))
    real_apply = d.apply_config
    monkeypatch.setattr(d, "apply_config", lambda cfg: seen.append(gc.isenabled()) or real_apply(cfg))
    before = d.heap.burst_freezes
    monkeypatch.setattr(d.heap, "min_change", 1)
    conf.write_text(BASE + BASE[BASE.index("virtual_server"):].replace("10.0.0.100", "10.0.0.101"))
    try:
        await d.reload_config()
        assert seen == [False, False] and gc.isenabled()
        assert d.heap.burst_freezes == before + 1, "the reload's model frozen after it"
    finally:
        gc.unfreeze()


async def test_overlapping_reloads_apply_in_the_order_asked(tmp_path, monkeypatch):
    """The parse runs in a worker thread: a posted text that parsed faster than the one posted before it was
    applied first, then overwritten by the older one. Reloads take turns, in the order asked."""
    import asyncio
    import time

    import hdslb.config as config

    d, conf = await make(tmp_path, BASE)
    real = config.loads

    def slow_for_7(text, **kw):
        if "weight 7" in text:
            time.sleep(0.3)
        return real(text, **kw)

    monkeypatch.setattr(config, "loads", slow_for_7)
    first = asyncio.ensure_future(d.reload_config(BASE.replace("weight 3", "weight 7")))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(d.reload_config(BASE.replace("weight 3", "weight 8")))
    await asyncio.gather(first, second)
    assert [x.weight for s in d.bal.services.values() for x in s.dests.values()] == [8]
    assert "weight 8" in d.config_text()


async def test_the_diff_and_the_notices_are_worked_out_in_the_worker_thread(tmp_path, monkeypatch):
    """Comparing the configs and listing what has no effect walk every virtual and real server (~0.45 s of the
    event loop at 4,000 x 10): done in the parse's worker thread, with the same answers."""
    import threading

    import hdslb.config as config
    import hdslb.config.apply as apply

    d, conf = await make(tmp_path, BASE + TIMEOUTS)
    where = []
    real_diff, real_notices = config.diff, apply.inactive_notices
    monkeypatch.setattr(config, "diff", lambda *a: where.append("diff" if threading.current_thread()
                                                                is not threading.main_thread() else "diff on loop")
                        or real_diff(*a))
    monkeypatch.setattr(apply, "inactive_notices", lambda cfg: where.append(
        "notices" if threading.current_thread() is not threading.main_thread() else "notices on loop")
        or real_notices(cfg))
    conf.write_text(BASE + TIMEOUTS.replace("established 90", "established 91\n            time_wait 9"))
    r = await d.reload_config()
    assert where == ["diff", "notices"]
    assert [line.split(": ", 1)[1] for line in r["applied"]] == ["ipvs_defs.tcp.timeout.established: 90 -> 91"]
    assert "ipvs_defs.tcp.timeout.time_wait: (unset) -> 9: accepted, not acted on" in "\n".join(r["not_acted_on"])


CTRL = """ctrl_defs {
    ipc_msg {
        <init> unix_domain /run/hdslb/a.ctrl
    }
}
"""


async def test_what_needs_a_restart_is_judged_against_what_this_start_runs(tmp_path):
    """An <init> change is accepted and named as needing a restart; a later reload that puts the running value back
    needs none. It was diffed against the last file accepted, so putting it back was reported as a change (b -> a),
    and a second unrelated reload forgot the pending one."""
    d, conf = await make(tmp_path, BASE + CTRL)
    conf.write_text(BASE + CTRL.replace("a.ctrl", "b.ctrl"))
    r = await d.reload_config()
    assert [x.split(": ", 1)[1] for x in r["needs_restart"]] == [
        "ctrl_defs.ipc_msg.unix_domain: /run/hdslb/a.ctrl -> /run/hdslb/b.ctrl"]
    conf.write_text(BASE.replace("weight 3", "weight 4") + CTRL.replace("a.ctrl", "b.ctrl"))
    r = await d.reload_config()  # an unrelated change: the restart is still pending
    assert [x.split(": ", 1)[1] for x in r["needs_restart"]] == [
        "ctrl_defs.ipc_msg.unix_domain: /run/hdslb/a.ctrl -> /run/hdslb/b.ctrl"]
    assert any("weight" in x for x in r["applied"])
    conf.write_text(BASE + CTRL)
    r = await d.reload_config()
    assert r["needs_restart"] == []


class _Pins:
    """What a start made: an attached program and pinned maps (records their removal)."""

    def __init__(self):
        self.detached = self.unpinned = False

    def detach_all(self):
        self.detached = True

    def unpin(self):
        self.unpinned = True


class _Ctl:
    server = object()  # started

    def __init__(self):
        self.stopped = False

    async def stop(self):
        self.stopped = True


@pytest.mark.parametrize("adopt", [False, True])
async def test_a_start_whose_config_is_refused_leaves_nothing_it_made(tmp_path, adopt, caplog):
    """A fresh start whose file parses but is refused when applied (here: more services than --max-services, which
    `check` cannot know) used to exit with its XDP program attached, its maps pinned and its control socket file
    left, for the next start to adopt an instance nobody meant to run. It now detaches and unpins what it made, as
    any other start failing after the attach does, and stops its control socket; a start that adopted the previous
    daemon's pins leaves them forwarding and says so."""
    from hdslb.errors import HdslbError

    conf = tmp_path / "hdslb.conf"
    conf.write_text(BASE + BASE.split("}\n", 1)[1].replace("10.0.0.100", "10.0.0.101").replace("lg {", "lg2 {")
                    .replace("name lg", "name lg2").replace("192.168.100.200", "192.168.100.201"))
    d = HarnessDaemon(conf, tmp_path)
    from hdslb.balancer import Balancer
    from tests.unit.test_api import Recorder

    d.bal = Balancer(Recorder(), d.bal.ifaces, max_services=1)
    d.fp, d.ctl = _Pins(), _Ctl()
    d._made_model = not adopt  # a fresh start saved an empty model for its new pins
    with open(d.settings.state_file, "w") as f:
        f.write("the model this start saved")
    with pytest.raises(HdslbError, match="no free service id"):
        await d._start_config(adopt)
    assert d.ctl.stopped
    assert (d.fp.detached, d.fp.unpinned) == (not adopt, not adopt)
    assert os.path.exists(d.settings.state_file) == adopt
    assert ("the fast path stays attached with its pinned state" in caplog.text) == adopt
    assert not d.bal.services  # the refused file left nothing in the model either


async def test_real_servers_without_a_route_are_named_when_the_file_is_applied(tmp_path, caplog):
    """The file declares services but no routes (those are dpip's, kept in the saved model): a real server with no
    route gets no new flow (the fast path routes by dpip routes only; drop_no_route), though its health checks,
    which leave through the kernel, pass. conf/single-nic.conf started alone (as its header said) forwarded
    nothing and nothing said why. Applying a file now names the real servers without a route."""
    caplog.set_level(logging.WARNING)
    d, conf = await make(tmp_path, BASE)
    assert "1 real server has no route" in caplog.text and "192.168.100.2" in caplog.text
    assert f"{conf}:7:1" in caplog.text and "dpip route add" in caplog.text
    caplog.clear()
    r = await d.reload_config()  # hdslb-ctl reload prints it too
    assert len(r["warnings"]) == 1 and "192.168.100.2" in r["warnings"][0]
    caplog.clear()
    d.bal.route_add({"prefix": "192.168.100.0/24", "ifname": "eth1"})
    conf.write_text(BASE.replace("weight 3", "weight 4"))
    r = await d.reload_config()
    assert "no route" not in caplog.text and r["warnings"] == []


async def test_a_sighup_reload_that_fails_unexpectedly_says_so_in_the_log(tmp_path, caplog):
    """A SIGHUP reload runs as a task nobody awaits: an exception other than a refusal (a loader bug, as the
    4300-digit number was) vanished ('Task exception was never retrieved', at best, whenever the task was
    collected). It is logged as a failed reload, and systemd is told the reload ended."""
    d, conf = await make(tmp_path, BASE)

    async def broken(text=None):
        raise ValueError("a bug")

    d.reload_config = broken
    await d._reload_logged()
    assert "reload failed" in caplog.text and "a bug" in caplog.text


@pytest.mark.parametrize("what", ["a regular file", "another daemon's socket"])
async def test_a_start_whose_control_socket_failed_leaves_that_path_alone(tmp_path, what):
    """The control socket path refused at start (a regular file there, or another hdslbd answering on it): the
    failed start must not remove it on its way out (it never made it)."""
    import socket

    from hdslb.ctl.server import CtlServer
    from hdslb.errors import HdslbError

    conf = tmp_path / "hdslb.conf"
    conf.write_text(BASE)
    d = HarnessDaemon(conf, tmp_path)
    path = tmp_path / "ctl"
    other = None
    if what == "a regular file":
        path.write_text("keep me")
    else:
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(path))
        other.listen(1)
    d.fp, d.ctl = _Pins(), CtlServer(str(path), d.dispatch)
    try:
        with pytest.raises(HdslbError) as e:
            await d.ctl.start()
        await d._start_failed(False, e.value)
        assert path.exists() and d.fp.detached
    finally:
        if other is not None:
            other.close()


async def _call(d, op, args):
    r = d.dispatch(op, args)  # as the control socket runs an op
    return await r if asyncio.iscoroutine(r) else r


async def test_a_config_service_restored_by_ipvsadm_owns_its_vip_again_once_the_config_adopts_it(tmp_path):
    """A file's virtual server owns its VIP (ARP/ND answered without `dpip addr add`). `ipvsadm -S`, `-C`, `-R`
    (or -D then -A) makes it again by hand, without that; the reload that adopts it back as the file's kept it
    unowned: ipvsadm -Ln showed the service as before while its VIP went unanswered once the router's ARP entry
    aged out, reload after reload (the state file kept it so across restarts too). Adoption now owns the VIP."""
    d, conf = await make(tmp_path, BASE)
    vip = ip_address("10.0.0.100")
    assert d.bal.local_reasons(vip)[0] & LOCAL_VIP
    saved = ipvsadm.format_save(await _call(d, "service.list", {}), ipvsadm.Format(numeric=True))
    await _call(d, "batch", {"ops": [["service.flush", {}]] + [[op, a] for _, inv in ipvsadm.parse_restore(saved)
                                                              for op, a in inv.requests]})
    assert not d.bal.local_reasons(vip)[0] & LOCAL_VIP, "made by hand: a VIP of ipvsadm's needs dpip addr add"
    await d.reload_config()
    assert d.bal.config_owned == {("tcp", vip, 80)}
    assert d.bal.local_reasons(vip)[0] & LOCAL_VIP
    assert ("local_set", (vip, LOCAL_VIP, 0)) in d.bal.dp.calls[-3:]


async def test_reload_lists_the_changes_it_applied_as_readable_lines(tmp_path):
    """`hdslb-ctl reload` printed each change as the op's Python dict (`dest.edit {'svc': {'proto': 'tcp', ...`):
    one line each now, the service and the server by address, then what changes."""
    from hdslb.config.apply import op_line

    d, conf = await make(tmp_path, BASE)
    conf.write_text(BASE.replace("weight 3", "weight 4"))
    r = await d.reload_config()
    assert r["applied"] and all("{" not in x and "'" not in x for x in r["applied"]), r["applied"]
    assert any(x.startswith("dest.") and "weight=4" in x for x in r["applied"]), r["applied"]
    assert op_line("dest.edit", {"svc": {"proto": "tcp", "addr": "2001:db8::1", "port": 80}, "addr": "2001:db8::2",
                                 "port": 8080, "weight": 4, "fwd": "fnat"}) == \
        "dest.edit tcp [2001:db8::1]:80 [2001:db8::2]:8080 weight=4 fwd=fnat"
    assert op_line("service.add", {"match": {"proto": "tcp", "src_range": "10.1.0.0-10.1.0.255"}, "sched": "rr",
                                   "flags": ["sh-port"], "persistent": None}) == \
        "service.add match proto=tcp,src_range=10.1.0.0-10.1.0.255 sched=rr flags=sh-port"
    assert op_line("laddr.del", {"svc": {"proto": "udp", "addr": "10.0.0.1", "port": 53}, "addr": "192.168.0.9",
                                 "ifname": "eth1"}) == "laddr.del udp 10.0.0.1:53 192.168.0.9 ifname=eth1"


async def test_values_set_by_hand_stand_through_a_reload_that_leaves_them_alone(tmp_path):
    """A real server drained by hand (`ipvsadm -e -w 0`) was put back at the file's weight by the next reload, one that
    only added another virtual server: in rotation again mid-maintenance; `ipvsadm -E -s rr` went back the same way.
    keepalived's reload compares the old config with the new one, so what was set by hand stands until the file
    changes that value (as a `--set` timeout does here); what the file changes it sets."""
    svc = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}
    rs = {"svc": svc, "addr": "192.168.100.2", "port": 80}

    def state(d):
        s = d.bal.get_service(svc)
        x = s.dests[(ip_address("192.168.100.2"), 80)]
        return s.sched, x.weight, x.u_threshold, x.l_threshold

    d, conf = await make(tmp_path, BASE)
    await _call(d, "dest.edit", dict(rs, weight=0, u_threshold=100))  # ipvsadm -e -w 0 -x 100
    await _call(d, "service.edit", dict(svc, sched="rr"))  # ipvsadm -E -s rr
    other = BASE + BASE.split("}\n", 2)[2].replace("10.0.0.100", "10.0.0.101").replace("192.168.100.2", "192.168.100.5")
    conf.write_text(other)
    r = await d.reload_config()
    assert all("10.0.0.100:80" not in x for x in r["applied"]), r["applied"]
    assert state(d) == ("rr", 0, 100, 0)
    conf.write_text(other.replace("weight 3", "weight 4", 1))  # the file changes the weight: it wins for that
    await d.reload_config()
    assert state(d) == ("rr", 4, 100, 0)
    other = other.replace("weight 3", "weight 4", 1).replace("lb_algo wrr", "lb_algo wrr\n    persistence_timeout 60", 1)
    conf.write_text(other)  # persistence, not the scheduler: the one set by hand stands
    await d.reload_config()
    assert state(d) == ("rr", 4, 100, 0) and d.bal.get_service(svc).persistent == 60
    conf.write_text(other.replace("weight 4", "weight 4\n        uthreshold 50\n        lthreshold 5", 1)
                    .replace("lb_algo wrr", "lb_algo wlc", 1))
    await d.reload_config()
    assert state(d) == ("wlc", 4, 50, 5)
    await _call(d, "dest.del", rs)  # ipvsadm -d: the file puts it back, at the file's values
    await d.reload_config()
    assert state(d) == ("wlc", 4, 50, 5)


async def test_removing_one_service_of_a_shared_local_address_group_does_not_list_its_addresses_as_kept(tmp_path, caplog):
    """DPVS configs give every virtual server one local_address_group. A reload removing one of them listed the
    group's addresses in `hdslb-ctl status` as "kept for their connections (no service has them)", and the next sweep
    logged them "no longer ours", while every other service still had them (and they stayed ours)."""
    two = BASE + BASE.split("}\n", 2)[2].replace("10.0.0.100", "10.0.0.101")
    d, conf = await make(tmp_path, two)
    laddr = ip_address("192.168.100.200")
    conf.write_text(BASE)
    await d.reload_config()
    assert (await _call(d, "daemon.status", {}))["retired_laddrs"] == []
    d._laddrs_in_use = set()  # the sweep found no connection using it
    with caplog.at_level(logging.INFO):
        d._release_laddrs()
    assert "no longer ours" not in caplog.text
    assert d.bal.local_reasons(laddr)[0] and not d.bal.retired_laddrs
    conf.write_text(BASE.split("virtual_server")[0])  # the last service that has it goes: kept for its flows
    await d.reload_config()
    assert (await _call(d, "daemon.status", {}))["retired_laddrs"] == ["192.168.100.200"]
    d._laddrs_in_use = set()
    with caplog.at_level(logging.INFO):
        d._release_laddrs()
    assert "no longer ours: 192.168.100.200" in caplog.text and not d.bal.local_reasons(laddr)[0]


HUP_WHILE_STARTING = """
import asyncio, os, signal, sys
from pathlib import Path
from tests.unit.test_api_security import BASE, HarnessDaemon

tmp = Path(sys.argv[1])
conf = tmp / "hdslb.conf"
conf.write_text(BASE)


class Starting(HarnessDaemon):
    async def start(self):  # as Daemon.start ends: the file applied; meanwhile a SIGHUP, and the file edited
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.05)
        from hdslb.config import load
        self.apply_config(load(str(conf)))
        conf.write_text(BASE.replace("weight 3", "weight 5"))

    async def _reload_logged(self):
        await super()._reload_logged()
        self._stop.set()

    async def stop(self):
        pass


d = Starting(conf, tmp)
asyncio.run(d.run())
print([x.weight for s in d.bal.services.values() for x in s.dests.values()])
"""


def test_a_sighup_while_starting_is_a_reload_once_started_not_the_end_of_hdslbd(tmp_path):
    """SIGHUP's handler was installed once the start had finished; before (the start compiles, attaches and loads the
    file: seconds), a `systemctl reload` or `kill -HUP` took the signal's default action and ended hdslbd half
    started. It is held, and the file is read again once the start has applied it."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", HUP_WHILE_STARTING, str(tmp_path)], cwd=root, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=root))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip() == "[5]", "the file as it is after the start: reloaded"


async def test_a_refused_reload_and_start_name_every_error_of_the_file(tmp_path, caplog, capsys):
    """`hdslb-ctl check` lists every error (as `keepalived -t`), but a reload (hdslb-ctl reload, SIGHUP's log) and
    hdslbd -f named only the first: a file with two typos took two refused reloads to find them."""
    from hdslb.daemon import settings_from_args

    d, conf = await make(tmp_path, BASE)
    conf.write_text(BASE.replace("weight 3", "weight 3x").replace("lb_algo wrr", "lb_algo wrrr"))
    bad = [f"{conf}:8:13: lb_algo: 'wrrr' is not one of", f"{conf}:12:16: weight: '3x' is not an integer"]
    from hdslb.errors import HdslbError

    with pytest.raises(HdslbError) as ei:
        await d.reload_config()
    lines = ei.value.message.splitlines()
    assert len(lines) == 2 and lines[0].startswith(bad[0]) and lines[0].endswith("; nothing was applied")
    assert lines[1].startswith(bad[1])
    with caplog.at_level(logging.ERROR):
        await d._reload_logged()  # SIGHUP's
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reload refused")]
    assert [m.split(": ", 1)[1][:len(b)] for m, b in zip(logged, bad)] == bad and len(logged) == 2
    with pytest.raises(SystemExit):
        settings_from_args(["-f", str(conf), "eth0"])
    err = capsys.readouterr().err.splitlines()
    assert [e[len("hdslbd: "):][:len(b)] for e, b in zip(err, bad)] == bad and len(err) == 2
