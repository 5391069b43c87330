"""notify_up / notify_down / quorum_up / quorum_down: which transitions run which script (a recording notifier, the
fake probe of test_health), and how a script runs (real scripts in tmp_path: arguments, timeout, output, order)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import stat

import pytest

from hdslb.config import ConfigError, loads
from hdslb.config.model import Endpoint, NotifyScript
from hdslb.health import HealthManager, pairs_of
from hdslb.health.notify import OUTPUT_LIMIT, Notifier
from hdslb.health.state import PoolState
from tests.unit.test_health import LO, Recorder, Scripted, real, tcp_check, until, virtual
from tests.unit.test_health_restore import probe  # noqa: F401 — a fixture


class Runs:
    """The notifier's side, recorded: (keyword, command) per script due, in order; runs nothing."""

    def __init__(self):
        self.runs = []

    def run(self, key, keyword, script, what, **kw):
        if script is not None:
            self.runs.append((keyword, script.command))

    async def close(self, grace=0):
        pass


def S(cmd):
    return NotifyScript(cmd)


def scripted_rs(port, tag="", **kw):
    rs = real(port, tcp_check(delay_loop=0.01), **kw)
    return dataclasses.replace(rs, notify_up=S(f"up{tag} {port}"), notify_down=S(f"down{tag} {port}"))


def scripted_vs(*servers, tag="", **kw):
    return virtual(*servers, quorum_up=S(f"qup{tag}"), quorum_down=S(f"qdown{tag}"), **kw)


async def flip(probe, rec, mgr, port, ok):
    n = len(rec.changes)
    probe.ok[port] = ok
    await until(lambda: len(rec.changes) > n)
    await mgr.settle()


# ---------------------------------------------------------------- which transition runs which script

async def test_each_transition_runs_its_script_once_and_the_start_state_none():
    probe, rec, runs = Scripted(), Recorder(), Runs()
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, notifier=runs)
    vs = scripted_vs(scripted_rs(201), scripted_rs(202), quorum=2)
    await mgr.start(pairs_of([vs]))
    try:
        await until(lambda: probe.count(201) >= 3 and probe.count(202) >= 3)
        assert runs.runs == []  # up and with quorum from the start: keepalived runs nothing for that
        await flip(probe, rec, mgr, 201, False)
        assert runs.runs == [("notify_down", "down 201"), ("quorum_down", "qdown")]
        await until(lambda: probe.count(201) >= 3 + 3)  # more failures: no more scripts
        await flip(probe, rec, mgr, 201, True)
        assert runs.runs[2:] == [("notify_up", "up 201"), ("quorum_up", "qup")]
        await until(lambda: probe.count(201) >= 6 + 3)
        assert len(runs.runs) == 4
    finally:
        await mgr.stop()
    assert len(runs.runs) == 4  # no omega: stopping runs nothing


async def test_quorum_down_at_start_only_with_a_sorry_server_as_keepalived():
    probe, rec, runs = Scripted(), Recorder(), Runs()
    probe.ok[211] = probe.ok[212] = False
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, notifier=runs)
    plain = scripted_vs(scripted_rs(211), alpha=True, port=80, tag="-plain")
    sorry = scripted_vs(scripted_rs(212), alpha=True, port=81, tag="-sorry",
                        sorry_server=Endpoint(LO, 8080))
    await mgr.start(pairs_of([plain, sorry]))
    try:
        await mgr.settle()
        # keepalived's update_quorum_state(init): "Starting with quorum down" runs quorum_down only where it puts
        # the sorry server in
        assert ("quorum_down", "qdown-sorry") in runs.runs
        assert ("quorum_down", "qdown-plain") not in runs.runs
    finally:
        await mgr.stop()


async def test_alpha_first_failed_check_runs_notify_down_once():
    probe, rec, runs = Scripted(), Recorder(), Runs()
    probe.ok[221] = False
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, notifier=runs)
    vs = virtual(scripted_rs(221), alpha=True)
    await mgr.start(pairs_of([vs]))
    try:
        await until(lambda: probe.count(221) >= 4)
        # keepalived's update_svr_checker_state: an alpha checker's first failure confirms the server down
        assert runs.runs == [("notify_down", "down 221")]
        await flip(probe, rec, mgr, 221, True)
        assert runs.runs == [("notify_down", "down 221"), ("notify_up", "up 221")]
    finally:
        await mgr.stop()


async def test_a_server_the_pool_holds_down_after_a_restart_runs_nothing_until_it_changes():
    probe, rec, runs = Scripted(), Recorder(), Runs()
    probe.ok[231] = False
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, notifier=runs,
                        pool_state=lambda v, r: PoolState(False, None, "was down"))
    vs = virtual(scripted_rs(231))
    await mgr.start(pairs_of([vs]))
    try:
        await until(lambda: probe.count(231) >= 3)
        assert runs.runs == []  # the daemon before ran its notify_down already
        await flip(probe, rec, mgr, 231, True)
        assert runs.runs == [("notify_up", "up 231")]
    finally:
        await mgr.stop()


async def test_a_reload_that_changes_the_script_runs_the_new_one():
    probe, rec, runs = Scripted(), Recorder(), Runs()
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, notifier=runs)
    await mgr.start(pairs_of([scripted_vs(scripted_rs(241))]))
    try:
        await until(lambda: probe.count(241) >= 2)
        mgr.update(pairs_of([scripted_vs(scripted_rs(241, tag="-new"), tag="-new")]))
        await mgr.settle()
        assert runs.runs == []  # a reload that keeps the server is no transition
        await flip(probe, rec, mgr, 241, False)
        assert runs.runs == [("notify_down", "down-new 241"), ("quorum_down", "qdown-new")]
    finally:
        await mgr.stop()


async def test_a_reload_that_removes_up_servers_runs_their_notify_down_and_quorum_down():
    probe, rec, runs = Scripted(), Recorder(), Runs()
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, notifier=runs)
    a = scripted_vs(scripted_rs(251), scripted_rs(252), quorum=2, port=80)
    b = scripted_vs(scripted_rs(253, tag="-b"), port=81, tag="-b")
    await mgr.start(pairs_of([a, b]))
    try:
        await until(lambda: all(probe.count(p) >= 2 for p in (251, 252, 253)))
        # 252 leaves a (its quorum goes with it); b leaves altogether (omega or not, as keepalived's
        # clear_diff_services), each with the scripts of the configuration it was in
        mgr.update(pairs_of([scripted_vs(scripted_rs(251), quorum=2, port=80)]))
        await mgr.settle()
        assert sorted(runs.runs) == sorted([("notify_down", "down 252"), ("quorum_down", "qdown"),
                                            ("notify_down", "down-b 253"), ("quorum_down", "qdown-b")])
    finally:
        await mgr.stop()


async def test_stopping_runs_the_down_scripts_only_under_omega():
    async def stopped(omega):
        probe, rec, runs = Scripted(), Recorder(), Runs()
        mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, notifier=runs)
        await mgr.start(pairs_of([scripted_vs(scripted_rs(261), omega=omega)]))
        await until(lambda: probe.count(261) >= 2)
        await mgr.stop()
        return runs.runs

    assert await stopped(True) == [("notify_down", "down 261"), ("quorum_down", "qdown")]
    assert await stopped(False) == []  # keepalived: "Only send non SNMP notifies when stopping if omega set"


async def test_a_check_add_server_runs_no_script_of_its_own_but_counts_in_the_files_quorum():
    """check.add builds a one-server block with no scripts (the API may not name one); the manager merges it
    into the file's virtual server of the same address, whose quorum scripts it can then trigger."""
    probe, rec, runs = Scripted(), Recorder(), Runs()
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, notifier=runs)
    from_file = scripted_vs(scripted_rs(281), quorum=2)
    added = virtual(real(282, tcp_check(delay_loop=0.01)))  # as check_block + loads give it
    await mgr.start(pairs_of([from_file]) + pairs_of([added]))
    try:
        await until(lambda: probe.count(282) >= 2)
        await flip(probe, rec, mgr, 282, False)
        assert runs.runs == [("quorum_down", "qdown")]
    finally:
        await mgr.stop()


# ---------------------------------------------------------------- how a script runs

def script(path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


async def test_a_real_script_runs_with_its_quoted_arguments_through_the_manager(tmp_path):
    """From the config text to a file the script writes: keepalived's `notify_down "SCRIPT ARGS"` quoting."""
    out = tmp_path / "out"
    sh = script(tmp_path / "notify.sh", f'for a in "$@"; do printf "[%s]" "$a" >> {out}; done; echo >> {out}\n')
    cfg = loads(f"""virtual_server 10.0.0.1 80 {{
  real_server 127.0.0.1 271 {{
    notify_down "{sh} down 'web 1'"
    notify_up "{sh} up"
    TCP_CHECK {{ delay_loop 0.01 }}
  }}
}}""")
    probe, rec = Scripted(), Recorder()
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe)
    await mgr.start(pairs_of(cfg.virtual_servers))
    try:
        await until(lambda: probe.count(271) >= 2)
        probe.ok[271] = False
        await until(lambda: out.exists() and out.read_text().count("\n") == 1)
        probe.ok[271] = True
        await until(lambda: out.read_text().count("\n") == 2)
        assert out.read_text() == "[down][web 1]\n[up]\n"  # no shell: the words as quoted, nothing added
    finally:
        await mgr.stop()


async def test_run_returns_before_the_script_ends(tmp_path):
    go, done = tmp_path / "go", tmp_path / "done"
    sh = script(tmp_path / "wait.sh", f"while [ ! -e {go} ]; do sleep 0.01; done; touch {done}\n")
    n = Notifier()
    task = n.run("k", "notify_up", S(sh), "test")
    assert task is not None and not task.done()  # queued: the caller (the health loop) goes on
    await until(lambda: n.runs == 1)  # the script is running...
    assert not done.exists() and not task.done()  # ...and still waiting; the loop answered meanwhile
    go.touch()
    await task
    assert done.exists()


async def test_scripts_due_together_are_forked_one_at_a_time(monkeypatch):
    """Forking takes the loop ~3 ms a child: 200 at once in one loop iteration held it 0.6 s (bench in the
    report); one at a time, other work runs between them. Counted, not timed."""
    real_exec, now, most = asyncio.create_subprocess_exec, [0], [0]

    async def counting(*a, **kw):
        now[0] += 1
        most[0] = max(most[0], now[0])
        try:
            await asyncio.sleep(0)  # where another spawn would get in
            return await real_exec(*a, **kw)
        finally:
            now[0] -= 1

    monkeypatch.setattr(asyncio, "create_subprocess_exec", counting)
    n = Notifier()
    await asyncio.gather(*(n.run(("rs", i), "notify_up", S("/bin/true"), f"r{i}") for i in range(20)))
    assert n.runs == 20 and most[0] == 1


async def test_a_hung_script_is_killed_after_the_timeout(tmp_path, caplog):
    pid = tmp_path / "pid"
    sh = script(tmp_path / "hang.sh", f"echo $$ > {pid}; trap '' TERM; sleep 60 & wait; sleep 60\n")
    n = Notifier(timeout=0.2)
    with caplog.at_level(logging.ERROR, "hdslb.health"):
        await n.run("k", "quorum_up", S(sh), "virtual server v")
    p = int(pid.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(p, 0)  # gone (SIGTERM ignored: SIGKILL after the grace), its sleep too: the group was killed
    assert "quorum_up of virtual server v: " in caplog.text and "killed: still running after 0.2 s" in caplog.text


async def test_a_failing_script_is_logged_with_its_status_and_bounded_output(tmp_path, caplog):
    sh = script(tmp_path / "fail.sh", f"head -c {OUTPUT_LIMIT * 4} /dev/zero | tr '\\0' x; echo; exit 3\n")
    with caplog.at_level(logging.INFO, "hdslb.health"):
        await Notifier().run("k", "notify_down", S(sh), "real server r")
    [rec] = [r for r in caplog.records if "notify_down of real server r" in r.getMessage()]
    assert rec.levelno == logging.ERROR and f"{sh} exited 3; output: " in rec.getMessage()
    assert rec.getMessage().split("output: ", 1)[1].count("x") == OUTPUT_LIMIT  # the rest was read and dropped


async def test_a_missing_script_is_logged_and_changes_nothing(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, "hdslb.health"):
        await Notifier().run("k", "notify_up", S(f"{tmp_path}/nope arg"), "real server r")
    assert f"notify_up of real server r: cannot run {tmp_path}/nope: " in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="enable_script_security judges scripts run as root")
async def test_enable_script_security_refuses_a_writable_script_as_misc_check_does(tmp_path, caplog):
    out = tmp_path / "ran"
    sh = script(tmp_path / "open.sh", f"touch {out}\n")
    os.chmod(sh, os.stat(sh).st_mode | stat.S_IWOTH)
    n = Notifier()
    with caplog.at_level(logging.ERROR, "hdslb.health"):
        await n.run("k", "notify_up", S(sh), "real server r", script_security=True)
    assert not out.exists() and "not run (enable_script_security)" in caplog.text and "writable by everyone" \
        in caplog.text
    await n.run("k", "notify_up", S(sh), "real server r", script_security=False)
    assert out.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a script as nobody: needs root")
async def test_a_script_run_as_a_user_runs_in_that_users_group_alone(caplog):
    """As MISC_CHECK (hdslb.health.misc._credentials): keepalived's set_privileges, not group root."""
    import pwd

    gid = pwd.getpwnam("nobody").pw_gid
    with caplog.at_level(logging.INFO, "hdslb.health"):
        await Notifier().run("k", "notify_up", NotifyScript("sh -c 'echo $(id -g) $(id -G)'", "nobody"),
                             "real server r")
    assert f"sh exited 0; output: '{gid} {gid}'" in caplog.text, caplog.text  # (it said '0 0')


async def test_one_servers_scripts_run_in_order(tmp_path):
    go, log_ = tmp_path / "go", tmp_path / "log"
    down = script(tmp_path / "down.sh", f"while [ ! -e {go} ]; do sleep 0.01; done; echo down >> {log_}\n")
    up = script(tmp_path / "up.sh", f"echo up >> {log_}\n")
    n = Notifier()
    first = n.run(("rs", 1), "notify_down", S(down), "r")
    second = n.run(("rs", 1), "notify_up", S(up), "r")
    other = n.run(("rs", 2), "notify_up", S(up), "r2")
    await other  # another server's script does not wait
    done, _ = await asyncio.wait([second], timeout=0.5)
    assert not done and log_.read_text() == "up\n"  # only r2's: r's notify_up waits for its notify_down
    go.touch()
    await asyncio.gather(first, second)
    assert log_.read_text() == "up\ndown\nup\n"


async def test_close_kills_what_outlives_the_grace(tmp_path):
    pid = tmp_path / "pid"
    sh = script(tmp_path / "hang.sh", f"echo $$ > {pid}; exec sleep 60\n")
    n = Notifier()
    n.run("k", "notify_down", S(sh), "r")
    await until(lambda: pid.exists() and pid.read_text().strip())
    await n.close(grace=0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid.read_text()), 0)
    assert n.pending == 0


# ---------------------------------------------------------------- the config line

def _rs_line(line: str):
    return loads("virtual_server 10.0.0.1 80 {\n real_server 10.0.0.2 80 {\n  " + line + "\n }\n}\n") \
        .virtual_servers[0].real_servers[0]


def test_the_line_is_script_user_group_as_keepalived_2_reads_it():
    assert _rs_line("notify_up /bin/true").notify_up == NotifyScript("/bin/true")
    assert _rs_line('notify_up "/bin/echo a \'b c\'" nobody').notify_up == NotifyScript("/bin/echo a 'b c'", "nobody")
    assert _rs_line("notify_down '/bin/echo a' root root").notify_down == NotifyScript("/bin/echo a", "root root")


@pytest.mark.parametrize("line,why", [
    ("notify_up /bin/echo hello", "user 'hello' does not exist"),  # arguments need quotes, as in keepalived
    ('notify_up "/bin/true" root no-such-group-nt', "group 'no-such-group-nt' does not exist"),
    ('notify_up "/bin/true" root root extra', "got extra 'extra'"),
    ('notify_up ""', "expects SCRIPT"),
])
def test_a_bad_line_is_refused_at_its_line(line, why):
    with pytest.raises(ConfigError) as e:
        _rs_line(line)
    assert ":3:" in str(e.value) and why in str(e.value)


# ---------------------------------------------------------------- through hdslbd

async def test_hdslbd_runs_the_files_scripts_and_a_reloads_new_ones(tmp_path, probe):  # noqa: F811
    """The daemon's own health manager, its config file and reload: real scripts write what ran."""
    from tests.unit.test_health_restore import CONF, daemon, stop

    out = tmp_path / "ran"
    sh = script(tmp_path / "n.sh", f'echo "$*" >> {out}\n')
    scripted = CONF.replace("    real_server 192.168.100.2 80 {\n",
                            f'    quorum_down "{sh} quorum_down"\n    quorum_up "{sh} quorum_up"\n'
                            f'    real_server 192.168.100.2 80 {{\n        notify_down "{sh} down .2"\n'
                            f'        notify_up "{sh} up .2"\n')
    d = await daemon(tmp_path, scripted)
    try:
        probe["192.168.100.2"] = False
        await until(lambda: out.exists() and out.read_text().count("\n") == 2)
        assert sorted(out.read_text().splitlines()) == ["down .2", "quorum_down"]
        v2 = scripted.replace("up .2", "up-v2 .2").replace(' quorum_up"', ' q-up-v2"')
        (tmp_path / "hdslb.conf").write_text(v2)
        await d.reload_config()
        probe["192.168.100.2"] = True
        await until(lambda: out.read_text().count("\n") == 4)
        assert sorted(out.read_text().splitlines()[2:]) == ["q-up-v2", "up-v2 .2"]
    finally:
        await stop(d)
