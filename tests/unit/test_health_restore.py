"""After a restart the health manager starts from the pool the previous hdslbd left (restore() keeps every dest's
verdict and the sorry server), so the first check result that differs changes the pool: a server that was down
comes back once its check passes, a sorry server goes once quorum is there, a dest nobody checks any more is up."""

from __future__ import annotations

import asyncio
from ipaddress import ip_address

import pytest

import hdslb.health
from hdslb.balancer import restore, snapshot
from hdslb.health import CheckResult, HealthManager, pairs_of
from hdslb.health.state import PoolState
from tests.unit.test_api_security import HarnessDaemon
from tests.unit.test_health import Recorder, Scripted, misc_check, real, tcp_check, until, virtual

# ---------------------------------------------------------------- the manager


async def test_a_server_the_pool_holds_down_starts_down_and_a_pass_brings_it_back():
    probe, rec = Scripted(), Recorder()
    rs = real(141, tcp_check(retry=3, delay_loop=0.02), weight=4)
    vs = virtual(rs)
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe,
                        pool_state=lambda v, r: PoolState(False, None, "TCP_CHECK: refused"))
    probe.ok[141] = False
    await mgr.start(pairs_of([vs]))
    try:
        await until(lambda: probe.count(141) >= 3)
        assert rec.changes == []  # down in the pool and down here: nothing to say, and no retries
        # its reason: the pool's until a check fails, then that check's (hdslb-ctl health show says what fails now)
        assert not mgr.is_up(vs.key, rs.key) and mgr.server(vs.key, rs.key).reason == "TCP_CHECK: port 141 says no"
        probe.ok[141] = True
        await until(lambda: rec.changes)
        assert rec.states() == [(True, None)]  # up at the weight the pool's owner gives it (no misc_dynamic here)
    finally:
        await mgr.stop()


async def test_a_server_the_pool_holds_up_is_not_told_again_and_a_failure_takes_it_out():
    probe, rec = Scripted(), Recorder()
    rs = real(142, tcp_check(delay_loop=0.02), weight=4)
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, pool_state=lambda v, r: PoolState(True, 4))
    await mgr.start(pairs_of([virtual(rs)]))
    try:
        await until(lambda: probe.count(142) >= 2)
        assert rec.changes == []
        probe.ok[142] = False
        await until(lambda: rec.changes)
        assert rec.states() == [(False, None)]
    finally:
        await mgr.stop()


async def test_where_the_pool_differs_the_daemon_is_told_at_start():
    probe, rec = Scripted(), Recorder()
    nocheck = real(143, weight=2)  # down in the pool, but nothing checks it: up
    stale = real(144, tcp_check(), weight=5)  # in at a weight the config no longer says
    unknown = real(145, tcp_check(), weight=3)  # in, at a weight the services disagree on
    alpha = real(146, tcp_check(), weight=1)  # in the pool, not from a restart (the config just added it)
    kept = real(148, tcp_check(), weight=1)  # in rotation under the previous daemon (a restart's restored model)
    pool = {143: PoolState(False, None, "was checked"), 144: PoolState(True, 1), 145: PoolState(True, None),
            146: PoolState(True, 1), 148: PoolState(True, 1, restored=True)}
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, pool_state=lambda v, r: pool[r[1]])
    await mgr.start(pairs_of([virtual(nocheck, stale, unknown), virtual(alpha, kept, port=81, alpha=True)]))
    try:
        await mgr.settle()
        assert sorted((k[1], up, w) for k, up, w, _ in rec.changes) == [
            (143, True, None), (144, True, None), (145, True, None), (146, False, None)]
    finally:
        await mgr.stop()


async def test_a_misc_dynamic_weight_in_the_pool_is_kept_until_the_script_says_otherwise():
    probe, rec = Scripted(), Recorder()
    rs = real(147, misc_check("true", dynamic=True, delay_loop=0.02), weight=1)
    vs = virtual(rs)
    probe.weight[147] = 10
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, pool_state=lambda v, r: PoolState(True, 10))
    await mgr.start(pairs_of([vs]))
    try:
        await until(lambda: probe.count(147) >= 2)
        assert rec.changes == [] and mgr.status()[str(vs)]["weight"] == 10
        probe.weight[147] = 1
        await until(lambda: rec.changes)
        assert rec.states() == [(True, 1)]
    finally:
        await mgr.stop()


async def test_a_sorry_server_in_the_pool_means_quorum_starts_lost():
    probe, rec = Scripted(), Recorder()
    a, b = real(151, tcp_check(delay_loop=0.02)), real(152, tcp_check(delay_loop=0.02))
    vs = virtual(a, b, quorum=2)
    probe.ok[152] = False
    pool = {151: PoolState(True, 1), 152: PoolState(False)}
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=probe, pool_state=lambda v, r: pool[r[1]],
                        quorum_lost=lambda v: True)
    await mgr.start(pairs_of([vs]))
    try:
        await until(lambda: probe.count(152) >= 2)
        await mgr.settle()
        assert rec.quorum == [] and mgr.quorum_up(vs.key) is False  # lost, as the pool says: nothing to do
        probe.ok[152] = True
        await until(lambda: rec.quorum)
        assert rec.quorum == [(vs.key, False)]  # gained: the daemon takes the sorry server out
    finally:
        await mgr.stop()


async def test_quorum_already_there_takes_the_sorry_server_out_at_start():
    rec = Recorder()
    rs = real(153, tcp_check())
    vs = virtual(rs)
    mgr = HealthManager(rec.on_change, rec.on_quorum, probe=Scripted(), pool_state=lambda v, r: PoolState(True, 1),
                        quorum_lost=lambda v: True)
    await mgr.start(pairs_of([vs]))
    try:
        await mgr.settle()
        assert rec.quorum == [(vs.key, False)]
    finally:
        await mgr.stop()


# ---------------------------------------------------------------- the daemon across a restart

CONF = """global_defs {
    log_level INFO
}
local_address_group lg {
    192.168.100.200 eth1
}
virtual_server 10.0.0.100 80 {
    lb_algo wrr
    lb_kind FNAT
    laddr_group_name lg
    quorum 2
    sorry_server 192.168.100.9 80
    real_server 192.168.100.2 80 {
        weight 1
        TCP_CHECK {
            delay_loop 0.02
            warmup 0
            retry 0
        }
    }
    real_server 192.168.100.3 80 {
        weight 1
        TCP_CHECK {
            delay_loop 0.02
            warmup 0
            retry 0
        }
    }
}
"""
SVC = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}
RS2, RS3, SORRY = ((ip_address(f"192.168.100.{n}"), 80) for n in (2, 3, 9))


@pytest.fixture
def probe(monkeypatch):
    """Every health manager the daemon makes asks this probe: the answer per real server address."""
    answers = {}  # address -> ok

    async def scripted(checker, rs):
        if answers.get("gate") is not None:  # an asyncio.Event: no check ends until it is set
            await answers["gate"].wait()
        ok = answers.get(str(rs.ip), True)
        return CheckResult(ok, "fine" if ok else "refused")

    class Manager(HealthManager):
        def __init__(self, *a, **kw):
            super().__init__(*a, probe=scripted, **kw)

    monkeypatch.setattr(hdslb.health, "HealthManager", Manager)
    return answers


async def daemon(tmp_path, text, snap=None):
    """An hdslbd starting with the config in `text` (and the saved model `snap`), as Daemon.start does it."""
    conf = tmp_path / "hdslb.conf"
    conf.write_text(text)
    d = HarnessDaemon(conf, tmp_path)
    if snap is not None:
        d._restore_model(snap)
    from hdslb.config import load

    d.apply_config(load(str(conf)))
    await d._start_health()
    return d


def dests(d):
    return d.bal.get_service(SVC).dests


async def stop(d):
    if d.health is not None:
        await d.health.stop()


async def crashed_with_rs2_down(tmp_path, probe, text=CONF):
    """A daemon that saw .2 fail (quorum lost, sorry server in), then died: the model it saved."""
    probe["192.168.100.2"] = False
    old = await daemon(tmp_path, text)
    await until(lambda: dests(old)[RS2].health == "down" and SORRY in dests(old))
    await old.health.settle()
    snap = snapshot(old.bal)
    await stop(old)
    return snap


async def test_restart_brings_a_recovered_server_back_and_the_sorry_server_out(tmp_path, probe):
    snap = await crashed_with_rs2_down(tmp_path, probe)
    probe["192.168.100.2"] = True  # it recovered while hdslbd was down
    new = await daemon(tmp_path, CONF, snap)
    try:
        assert dests(new)[RS2].health == "down" and dests(new)[SORRY].sorry  # as the model was saved
        await until(lambda: dests(new)[RS2].health == "up" and SORRY not in dests(new))
        assert dests(new)[RS2].eff_weight == 1
    finally:
        await stop(new)


async def test_restart_keeps_a_server_that_is_still_down_out_without_a_flap(tmp_path, probe):
    snap = await crashed_with_rs2_down(tmp_path, probe)
    seen = []
    new = await daemon(tmp_path, CONF, snap)
    try:
        real_health = new.bal.dest_health
        new.bal.dest_health = lambda a, up, w, why: (seen.append((a["addr"], up)), real_health(a, up, w, why))[1]
        await asyncio.sleep(0.15)  # several delay_loops
        assert seen == [] and dests(new)[RS2].health == "down" and dests(new)[SORRY].sorry
    finally:
        await stop(new)


async def test_restart_without_the_check_puts_the_server_back(tmp_path, probe):
    snap = await crashed_with_rs2_down(tmp_path, probe)
    unchecked = CONF.replace("""        TCP_CHECK {
            delay_loop 0.02
            warmup 0
            retry 0
        }
""", "")  # no checker anywhere now
    new = await daemon(tmp_path, unchecked, snap)
    try:
        assert dests(new)[RS2].health == "up" and dests(new)[RS2].eff_weight == 1
        assert SORRY not in dests(new)  # weight 2 >= quorum 2
    finally:
        await stop(new)
    nosorry = unchecked.replace("    sorry_server 192.168.100.9 80\n", "")  # and nothing to weigh at all
    new = await daemon(tmp_path, nosorry, snap)
    try:
        assert new.health is None
        assert dests(new)[RS2].health == "up" and SORRY not in dests(new)
    finally:
        await stop(new)


async def test_restart_with_a_new_weight_uses_it(tmp_path, probe):
    old = await daemon(tmp_path, CONF)
    await until(lambda: old.health._running)
    old.bal.dest_health({"svc": SVC, "addr": "192.168.100.3", "port": 80}, True, 1, "")  # a checker's verdict
    snap = snapshot(old.bal)
    await stop(old)
    heavier = CONF.replace("192.168.100.3 80 {\n        weight 1", "192.168.100.3 80 {\n        weight 7")
    new = await daemon(tmp_path, heavier, snap)
    try:
        await new.health.settle()
        assert dests(new)[RS3].eff_weight == 7
    finally:
        await stop(new)


async def test_a_restart_keeps_alphas_servers_in_rotation_until_a_check_fails(tmp_path, probe):
    """alpha starts a server down until its checks pass. After a restart it took every server the previous daemon
    had in rotation out too: with a quorum, the sorry server took every new flow (and persistence templates went)
    until the first checks ran, up to a delay_loop later. A server the restored model has up keeps its verdict
    (nothing failed); one the restart's config adds is alpha's; a failure still takes a kept one out."""
    alpha = CONF.replace("    quorum 2\n", "    quorum 2\n    alpha\n")
    old = await daemon(tmp_path, alpha)
    await until(lambda: dests(old)[RS2].health == "up" and dests(old)[RS3].health == "up" and SORRY not in dests(old))
    snap = snapshot(old.bal)
    await stop(old)
    probe["gate"] = hang = asyncio.Event()
    more = alpha.replace("    real_server 192.168.100.3 80 {", """    real_server 192.168.100.4 80 {
        weight 1
        TCP_CHECK {
            delay_loop 0.02
            warmup 0
            retry 0
        }
    }
    real_server 192.168.100.3 80 {""")
    new = await daemon(tmp_path, more, snap)
    try:
        await asyncio.sleep(0.05)
        ds = dests(new)
        assert (ds[RS2].health, ds[RS3].health) == ("up", "up") and SORRY not in ds, ds
        assert ds[(ip_address("192.168.100.4"), 80)].health == "down"  # new: alpha's
        probe["192.168.100.2"] = False
        hang.set()
        await until(lambda: dests(new)[RS2].health == "down")
    finally:
        hang.set()
        await stop(new)


# ---------------------------------------------------------------- a weight given by hand after a flap

PLAIN = CONF.replace("    quorum 2\n", "").replace("    sorry_server 192.168.100.9 80\n", "")


async def test_a_weight_given_by_hand_after_a_flap_is_the_weight(tmp_path, probe):
    """An up verdict used to carry the checker's copy of the configured weight, kept as health_weight over the
    server's own: after one flap, ipvsadm -e -w 0 (a drain) and REST weight changes said done and never reached
    the fast path."""
    d = await daemon(tmp_path, PLAIN)
    try:
        await d.health.settle()
        probe["192.168.100.2"] = False
        await until(lambda: dests(d)[RS2].health == "down")
        probe["192.168.100.2"] = True
        await until(lambda: dests(d)[RS2].health == "up")
        await d.health.settle()
        assert dests(d)[RS2].eff_weight == 1
        d.dispatch("dest.edit", {"svc": SVC, "addr": "192.168.100.2", "port": 80, "weight": 0})
        assert dests(d)[RS2].eff_weight == 0
        last = [a for name, a in d.bal.dp.calls if name == "dest_set" and a[1] is dests(d)[RS2]][-1]
        assert last[1].eff_weight == 0  # written as drained
        d.dispatch("dest.edit", {"svc": SVC, "addr": "192.168.100.2", "port": 80, "weight": 4})
        assert dests(d)[RS2].eff_weight == 4
        probe["192.168.100.2"] = False  # another flap keeps the weight given by hand
        await until(lambda: dests(d)[RS2].health == "down")
        probe["192.168.100.2"] = True
        await until(lambda: dests(d)[RS2].health == "up")
        assert dests(d)[RS2].eff_weight == 4
    finally:
        await stop(d)


async def test_a_stale_checker_weight_from_an_older_daemon_does_not_pin_the_weight(tmp_path, probe):
    old = await daemon(tmp_path, PLAIN)
    await old.health.settle()
    old.bal.dest_health({"svc": SVC, "addr": "192.168.100.2", "port": 80}, True, 1, "")  # as older daemons told it
    snap = snapshot(old.bal)
    await stop(old)
    new = await daemon(tmp_path, PLAIN, snap)
    try:
        await new.health.settle()
        new.dispatch("dest.edit", {"svc": SVC, "addr": "192.168.100.2", "port": 80, "weight": 0})
        assert dests(new)[RS2].eff_weight == 0
    finally:
        await stop(new)


async def test_a_stop_under_omega_leaves_the_pool_forwarding_for_the_restart(tmp_path, probe):
    """hdslbd stopped (SIGTERM: a restart, an upgrade) under omega used to report every up server down and quorum lost
    to its own pool, and save that: the fast path, which goes on forwarding, sent every new flow of the service to
    the sorry server (dropped them, without one) until the restarted daemon's checks had passed again. The service
    does not end with the control plane; `hdslb-ctl down` does end it, and omega applies there."""
    text = CONF.replace("    quorum 2\n", "    quorum 2\n    omega\n")
    old = await daemon(tmp_path, text)
    await old.health.settle()
    await old.stop()
    assert [dests(old)[k].health for k in (RS2, RS3)] == ["up", "up"] and SORRY not in dests(old)
    new = await daemon(tmp_path, text, snapshot(old.bal))
    try:
        await new.health.settle()
        assert [dests(new)[k].health for k in (RS2, RS3)] == ["up", "up"] and SORRY not in dests(new)
        new._detach_on_stop = True  # hdslb-ctl down
    finally:
        await new.stop()
    assert [dests(new)[k].health for k in (RS2, RS3)] == ["down", "down"] and dests(new)[SORRY].sorry


async def test_a_start_that_fails_under_omega_leaves_the_adopted_pool(tmp_path, probe):
    """A restart that fails once its checks run (its REST port taken, its config refused) leaves the fast path it
    adopted forwarding; under omega its clean-up reported every server down to that pool all the same."""
    text = CONF.replace("    quorum 2\n", "    quorum 2\n    omega\n")
    d = await daemon(tmp_path, text)
    await d.health.settle()
    await d._start_failed(True, RuntimeError("the REST port is taken"))
    d._apply_verdicts()
    assert [dests(d)[k].health for k in (RS2, RS3)] == ["up", "up"] and SORRY not in dests(d)


async def test_a_restart_keeps_the_quorum_of_a_service_in_its_hysteresis_band(tmp_path, probe):
    """quorum 2, hysteresis 1: gained at weight 3, lost below 1. With .2 down the weight is 2: the previous daemon kept
    quorum (no sorry server in). The restart weighed the adopted pool as a fresh start does (>= quorum + hysteresis)
    and lost it: the sorry server took every new flow, .3 (up, passing) was held out and quorum_down ran, because of
    the restart alone, until the weight reached 3 again. The pool shows the quorum: no sorry server in."""
    text = CONF.replace("    quorum 2\n", "    quorum 2\n    hysteresis 1\n    quorum_down /bin/false\n") \
        .replace("        weight 1\n", "        weight 2\n")
    old = await daemon(tmp_path, text)
    await old.health.settle()
    probe["192.168.100.2"] = False
    await until(lambda: dests(old)[RS2].health == "down")
    await old.health.settle()
    assert old.health.quorum_up(("TCP", "10.0.0.100:80")) and SORRY not in dests(old)  # weight 1: in the band
    snap = snapshot(old.bal)
    await stop(old)
    new = await daemon(tmp_path, text, snap)
    try:
        await until(lambda: new.health.server(("TCP", "10.0.0.100:80"), RS3).last_check is not None)
        await new.health.settle()
        assert new.health.quorum_up(("TCP", "10.0.0.100:80")) and SORRY not in dests(new)
        assert dests(new)[RS3].health == "up" and dests(new)[RS3].eff_weight == 2  # not held for a sorry server
        assert new.health.notifier.runs == 0  # no quorum_down: nothing changed but the daemon
    finally:
        await stop(new)
