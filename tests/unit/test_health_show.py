"""What `hdslb-ctl health show` (health.list) says about a real server: why it is in its state, and its weight.

A server up since start said "(not checked yet)" for as long as it kept passing: its reason was set only when its
state changed. And its weight was the checker's copy of the configured one, stale after an `ipvsadm -e -w`.
"""

from __future__ import annotations

import asyncio
import dataclasses

from cli import hdslb_ctl
from hdslb.api import dispatch_async
from hdslb.config.model import NotifyScript
from hdslb.ctl import commands
from hdslb.health import CheckResult, HealthManager, pairs_of
from hdslb.health.state import PoolState
from tests.unit.test_health import Recorder, misc_check, real, tcp_check, until, virtual
from tests.unit.test_health_notify import Runs
from tests.unit.test_health_restore import (CONF, RS3, SORRY, SVC, daemon, dests, probe,  # noqa: F401 — a fixture
                                           stop)

# ---------------------------------------------------------------- the reason


async def test_a_server_up_since_start_shows_its_passing_check_once_every_checker_has_run_and_nothing_is_told():
    misc_may_run = asyncio.Event()

    async def checks(checker, rs):
        if checker.kind == "MISC_CHECK":
            await misc_may_run.wait()
            return CheckResult(True, "exited 0")
        return CheckResult(True, f"connected to {rs.ip}:{rs.port}")

    rec, runs = Recorder(), Runs()
    rs = dataclasses.replace(real(150, tcp_check(delay_loop=0.02), misc_check("true", delay_loop=0.02)),
                             notify_up=NotifyScript("up"), notify_down=NotifyScript("down"))
    vs = virtual(rs)
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=checks, notifier=runs)
    await mgr.start(pairs_of([vs]))
    try:
        srv = mgr.server(vs.key, rs.key)
        await until(lambda: srv.checkers[0].has_run)
        assert srv.reason == "not checked yet"  # one of its two checkers has not run yet
        misc_may_run.set()
        await until(lambda: all(c.has_run for c in srv.checkers))
        await until(lambda: srv.reason != "not checked yet")
        assert srv.reason in ("MISC_CHECK: exited 0", "TCP_CHECK: connected to 127.0.0.1:150")
        shown = mgr.status()[str(vs)]["real_servers"]["127.0.0.1:150"]
        assert (shown["state"], shown["reason"]) == ("up", srv.reason)
        await mgr.settle()
        assert (rec.changes, runs.runs) == ([], [])  # it was up and still is: no verdict, no notify_up
    finally:
        await mgr.stop()


async def test_a_server_restored_up_keeps_the_reason_of_the_pool_until_checked_and_a_failure_still_counts():
    """A restart that restores a server up starts it "not checked yet" too; a failed probe within its retries is
    not a passing reason to show."""
    results = {"ok": False}

    async def checks(checker, rs):
        return CheckResult(results["ok"], "fine" if results["ok"] else "refused")

    rec = Recorder()
    rs = real(151, tcp_check(retry=100, delay_before_retry=0.01, delay_loop=0.02), weight=4)
    vs = virtual(rs)
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=checks, pool_state=lambda v, r: PoolState(True, 4))
    await mgr.start(pairs_of([vs]))
    try:
        srv = mgr.server(vs.key, rs.key)
        await until(lambda: srv.checkers[0].failures >= 2)
        assert srv.alive and srv.reason == "not checked yet"
        results["ok"] = True
        await until(lambda: srv.reason == "TCP_CHECK: fine")
        await mgr.settle()
        assert rec.changes == []
    finally:
        await mgr.stop()


# ---------------------------------------------------------------- the weight


class DaemonClient:
    """hdslb-ctl's Client, answered by a HarnessDaemon's commands in this process."""

    daemon = None

    def __init__(self, path=None, timeout=None):
        pass

    def call(self, op, args=None):
        return commands.dispatch(self.daemon, op, args or {})


async def test_health_show_prints_the_weight_the_pool_has_the_server_at(tmp_path, probe, monkeypatch, capsys):  # noqa: F811
    d = await daemon(tmp_path, CONF)
    try:
        vs = "10.0.0.100:80/TCP"
        await until(lambda: all(s["last_check"] for s in d.health.status()[vs]["real_servers"].values()))
        await d.health.settle()
        await dispatch_async(d, "dest.edit", {"svc": SVC, "addr": "192.168.100.2", "port": 80, "weight": 5})
        shown = (await dispatch_async(d, "health.list", {}))["health"][vs]["real_servers"]["192.168.100.2:80"]
        assert (shown["pool_weight"], shown["weight"]) == (5, 1)  # the pool's, and the checks' configured one
        assert shown["reason"] == "TCP_CHECK: fine"

        DaemonClient.daemon = d
        monkeypatch.setattr(hdslb_ctl, "Client", DaemonClient)
        assert hdslb_ctl.main(["health", "show"]) == 0
        out = capsys.readouterr().out
        assert "192.168.100.2:80             up    weight 5  (TCP_CHECK: fine)" in out
        assert "192.168.100.3:80             up    weight 1  (TCP_CHECK: fine)" in out
        assert "not checked yet" not in out
    finally:
        await stop(d)


def test_health_show_labels_the_checks_weight_when_the_daemon_does_not_give_the_pools(monkeypatch, capsys):
    class Older(DaemonClient):  # an hdslbd without pool_weight, or a server its pool does not have
        def call(self, op, args=None):
            return {"health": {"10.0.0.1:80/TCP": {"quorum": "up", "quorum_needed": 1, "real_servers": {
                "10.0.0.2:80": {"state": "up", "weight": 3, "reason": "TCP_CHECK: fine"},
                "10.0.0.3:80": {"state": "up", "weight": 2, "pool_weight": None, "reason": ""}}}}}

    monkeypatch.setattr(hdslb_ctl, "Client", Older)
    assert hdslb_ctl.main(["health", "show"]) == 0
    out = capsys.readouterr().out
    assert "10.0.0.1:80/TCP  quorum up/1\n" in out  # (no live weight given: none shown)
    assert "10.0.0.2:80                  up    weight 3 (configured)  (TCP_CHECK: fine)" in out
    assert "10.0.0.3:80                  up    weight 2 (configured)\n" in out


async def test_a_server_down_since_start_shows_and_logs_its_first_failed_check(caplog):
    """An alpha server (and one the pool had down at a restart) is down until its checks pass. While they kept
    failing, health show said "alpha: down until every check has passed" (or the previous daemon's reason) and
    nothing was logged: nothing said what failed. Its first failed check is its reason now; nothing is told."""
    import logging

    from tests.unit.test_health import Scripted

    probe, rec = Scripted(), Recorder()
    probe.ok[160] = probe.ok[161] = False
    alpha_rs, kept_rs = real(160, tcp_check(delay_loop=0.02)), real(161, tcp_check(delay_loop=0.02))
    alpha, kept = virtual(alpha_rs, alpha=True), virtual(kept_rs, port=81)
    pool = {160: None, 161: PoolState(False, None, "TCP_CHECK: refused yesterday")}
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, pool_state=lambda v, r: pool[r[1]])
    with caplog.at_level(logging.WARNING, "hdslb.health"):
        await mgr.start(pairs_of([alpha, kept]))
        try:
            await until(lambda: probe.count(160) >= 2 and probe.count(161) >= 2)
            for vs, rs in ((alpha, alpha_rs), (kept, kept_rs)):
                shown = mgr.status()[str(vs)]["real_servers"][f"127.0.0.1:{rs.port}"]
                assert (shown["state"], shown["reason"]) == ("down", f"TCP_CHECK: port {rs.port} says no")
            await mgr.settle()
            assert rec.states(kept_rs.key) == []  # down as the pool has it: nothing to tell
        finally:
            await mgr.stop()
    said = [r.getMessage() for r in caplog.records if "stays down" in r.getMessage()]
    assert sorted(said) == [f"real server 127.0.0.1:{p} of 10.0.0.1:{v}/TCP stays down: TCP_CHECK: port {p} says no"
                            for p, v in ((160, 80), (161, 81))]


async def test_health_show_says_a_server_is_held_out_for_the_sorry_server(tmp_path, probe, monkeypatch, capsys):  # noqa: F811
    """Quorum lost: the servers still up leave the pool with the sorry server in. health show printed such a one as
    "up weight 0 (TCP_CHECK: fine)", nothing saying why a passing server had no weight; and the service as
    "quorum down/2", not the live weight that lost it."""
    probe["192.168.100.2"] = False  # quorum 2 of weights 1 + 1: lost, the sorry server in, .3 held out
    d = await daemon(tmp_path, CONF)
    try:
        await until(lambda: SORRY in dests(d) and dests(d)[RS3].held)
        await until(lambda: d.health.server(("TCP", "10.0.0.100:80"), RS3).reason == "TCP_CHECK: fine")
        shown = (await dispatch_async(d, "health.list", {}))["health"]["10.0.0.100:80/TCP"]["real_servers"]
        assert (shown["192.168.100.3:80"]["held"], shown["192.168.100.2:80"]["held"]) == (True, False)
        DaemonClient.daemon = d
        monkeypatch.setattr(hdslb_ctl, "Client", DaemonClient)
        assert hdslb_ctl.main(["health", "show"]) == 0
        out = capsys.readouterr().out
        assert "192.168.100.3:80             up    weight 0  (held out while the sorry server stands in; " \
               "TCP_CHECK: fine)" in out, out
        assert "10.0.0.100:80/TCP  quorum down/2 (weight 1)\n" in out, out  # the live weight that lost it
    finally:
        await stop(d)
