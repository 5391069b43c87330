"""The sorry server is in the pool exactly while its virtual server's quorum is lost, and it is the one the config
names now: a reload that removes or changes sorry_server while quorum is lost takes the old one out (and puts the
new one in), and quorum regained takes out whichever is in."""

from __future__ import annotations

import dataclasses
import inspect
from ipaddress import ip_address

from tests.unit.test_config_apply import BASE, Ctx
from tests.unit.test_health import until
from tests.unit.test_health_restore import CONF, SVC, daemon, probe, stop  # noqa: F401 — probe is a fixture

SORRY9, SORRY8 = (ip_address("192.168.100.9"), 80), (ip_address("192.168.100.8"), 80)


def sorry_in(d):
    return sorted(k for k, x in d.bal.get_service(SVC).dests.items() if x.sorry)


# ---------------------------------------------------------------- the reload plan


def with_sorry(text, sorry):
    return text.replace("    laddr_group_name lg\n", f"    laddr_group_name lg\n    sorry_server {sorry}\n")


def test_the_plan_removes_a_sorry_server_the_file_no_longer_names():
    ctx = Ctx()
    ctx.apply(with_sorry(BASE, "192.168.100.9 80"))
    svc = next(iter(ctx.bal.services.values()))
    d = ctx.bal.dest_add({"svc": svc.ident, "addr": "192.168.100.9", "port": 80, "fwd": "fnat", "weight": 1})
    d.sorry = True  # quorum was lost
    assert ctx.apply(with_sorry(BASE, "192.168.100.9 80")) == []  # still named: health checking's, left alone
    assert ctx.apply(with_sorry(BASE, "192.168.100.8 80")) == [
        ("dest.del", {"svc": svc.ident, "addr": "192.168.100.9", "port": 80})]
    d = ctx.bal.dest_add({"svc": svc.ident, "addr": "192.168.100.8", "port": 80, "fwd": "fnat", "weight": 1})
    d.sorry = True
    assert ctx.apply(BASE) == [("dest.del", {"svc": svc.ident, "addr": "192.168.100.8", "port": 80})]
    assert sorted(str(a) for a, _ in svc.dests) == ["192.168.100.2", "192.168.100.3"]


def test_a_former_sorry_server_can_become_a_real_server():
    ctx = Ctx()
    ctx.apply(with_sorry(BASE, "192.168.100.9 80"))
    svc = next(iter(ctx.bal.services.values()))
    ctx.bal.dest_add({"svc": svc.ident, "addr": "192.168.100.9", "port": 80, "fwd": "fnat", "weight": 1}).sorry = True
    text = BASE.replace("    real_server 192.168.100.3 80 {", "    real_server 192.168.100.9 80 {")
    ops = ctx.apply(text)
    assert [o for o, _ in ops][:2] == ["dest.del", "dest.del"] and ops[-1][0] == "dest.add"
    assert not svc.dests[SORRY9].sorry and svc.dests[SORRY9].weight == 1


# ---------------------------------------------------------------- the daemon


async def lost_quorum(tmp_path, probe):  # noqa: F811
    probe["192.168.100.2"] = False
    d = await daemon(tmp_path, CONF)
    await until(lambda: sorry_in(d) == [SORRY9])
    await d.health.settle()
    return d


async def reload(d, text):
    with open(d.settings.config_file, "w") as f:
        f.write(text)
    await d.reload_config()
    await d.health.settle()


async def test_a_reload_without_sorry_server_while_quorum_is_lost_takes_it_out(tmp_path, probe):  # noqa: F811
    d = await lost_quorum(tmp_path, probe)
    try:
        await reload(d, CONF.replace("    sorry_server 192.168.100.9 80\n", ""))
        assert sorry_in(d) == []
        assert d.health.quorum_up(("TCP", "10.0.0.100:80")) is False  # still lost: nothing to put in
    finally:
        await stop(d)


async def test_a_reload_changing_sorry_server_while_quorum_is_lost_swaps_it(tmp_path, probe):  # noqa: F811
    d = await lost_quorum(tmp_path, probe)
    try:
        await reload(d, CONF.replace("sorry_server 192.168.100.9 80", "sorry_server 192.168.100.8 80"))
        assert sorry_in(d) == [SORRY8]
        probe["192.168.100.2"] = True  # quorum back: the new one goes
        await until(lambda: sorry_in(d) == [])
    finally:
        await stop(d)


async def test_quorum_regained_takes_out_every_sorry_server_in_named_or_not(tmp_path, probe):  # noqa: F811
    d = await lost_quorum(tmp_path, probe)
    try:
        # one the config does not name is in too (put in under an older config, the notice that took it out lost)
        d.bal.dest_add({"svc": SVC, "addr": "192.168.100.8", "port": 80, "fwd": "fnat", "weight": 1}).sorry = True
        await d._on_quorum(("TCP", "10.0.0.100:80"), False)
        assert sorry_in(d) == []
        await d._on_quorum(("TCP", "10.0.0.100:80"), True)
        assert sorry_in(d) == [SORRY9]
        d.want = {k: dataclasses.replace(w, sorry=None) for k, w in d.want.items()}  # a config without one
        await d._on_quorum(("TCP", "10.0.0.100:80"), False)
        assert sorry_in(d) == []
    finally:
        await stop(d)


async def test_a_reload_adding_sorry_server_while_quorum_is_lost_puts_it_in(tmp_path, probe):  # noqa: F811
    probe["192.168.100.2"] = False
    d = await daemon(tmp_path, CONF.replace("    sorry_server 192.168.100.9 80\n", ""))
    try:
        await until(lambda: d.health.quorum_up(("TCP", "10.0.0.100:80")) is False)
        await d.health.settle()
        assert sorry_in(d) == []
        await reload(d, CONF)
        assert sorry_in(d) == [SORRY9]
    finally:
        await stop(d)


# ---------------------------------------------------------------- the pool while the sorry server stands in
# keepalived (check/ipwrapper.c): on losing quorum the sorry server goes in and "Remove remaining alive real
# servers" (perform_quorum_state(vs, false)); a server whose check passes meanwhile is added "only if we have
# quorum or no sorry server"; on regaining quorum the alive servers come back and the sorry server goes.

def table_slots(d):
    """The slots of the last scheduling table written for SVC."""
    svc_id = d.bal.get_service(SVC).svc_id
    t = [a[1] for name, a in d.bal.dp.calls if name == "sched_set" and a[0].svc_id == svc_id][-1]
    return {e for e in t.entries}


def slots(d, *keys):
    return {d.bal.get_service(SVC).dests[k].slot for k in keys}


RS2, RS3, RS4 = ((ip_address(f"192.168.100.{n}"), 80) for n in (2, 3, 4))
CONF3 = CONF.replace("    quorum 2\n", "    quorum 3\n").replace("""    real_server 192.168.100.3 80 {""", """    real_server 192.168.100.4 80 {
        weight 1
        TCP_CHECK {
            delay_loop 0.02
            warmup 0
            retry 0
        }
    }
    real_server 192.168.100.3 80 {""")


async def test_lost_quorum_leaves_new_flows_to_the_sorry_server_alone(tmp_path, probe):  # noqa: F811
    d = await lost_quorum(tmp_path, probe)
    try:
        ds = d.bal.get_service(SVC).dests
        assert ds[RS3].health == "up" and ds[RS3].held and ds[RS3].eff_weight == 0  # alive, out of the pool
        assert not ds[SORRY9].held and ds[SORRY9].eff_weight == 1
        assert table_slots(d) == slots(d, SORRY9)
        # the fast path is told: no new flows, no persistence to it (existing flows go on)
        last = [a for name, a in d.bal.dp.calls if name == "dest_set" and a[1] is ds[RS3]][-1]
        assert last[2] is True  # no_persist
        listing = d.dispatch("service.list", {})
        listing = await listing if inspect.isawaitable(listing) else listing
        row = next(x for x in listing["services"][0]["dests"] if x["addr"] == "192.168.100.3")
        assert row["weight"] == 0 and row["conf_weight"] == 1 and row["health"]["held"] is True
        probe["192.168.100.2"] = True  # quorum back: both servers in, the sorry server out
        await until(lambda: sorry_in(d) == [])
        assert not ds[RS3].held and ds[RS3].eff_weight == 1
        assert table_slots(d) == slots(d, RS2, RS3)
    finally:
        await stop(d)


async def test_a_server_that_recovers_while_quorum_is_still_lost_stays_out(tmp_path, probe):  # noqa: F811
    probe["192.168.100.2"] = probe["192.168.100.3"] = False
    d = await daemon(tmp_path, CONF3)
    try:
        await until(lambda: sorry_in(d) == [SORRY9])
        await d.health.settle()
        ds = d.bal.get_service(SVC).dests
        assert table_slots(d) == slots(d, SORRY9) and ds[RS4].held
        probe["192.168.100.3"] = True  # weight 2 of quorum 3: still lost
        await until(lambda: ds[RS3].health == "up")
        await d.health.settle()
        assert ds[RS3].held and ds[RS3].eff_weight == 0 and table_slots(d) == slots(d, SORRY9)
        probe["192.168.100.2"] = True  # quorum: all three together, the sorry server out
        await until(lambda: sorry_in(d) == [])
        assert table_slots(d) == slots(d, RS2, RS3, RS4)
        assert not any(x.held for x in ds.values())
    finally:
        await stop(d)


async def test_held_servers_survive_a_restart_and_leave_with_the_sorry_server(tmp_path, probe):  # noqa: F811
    from hdslb.balancer import snapshot

    d = await lost_quorum(tmp_path, probe)
    snap = snapshot(d.bal)
    await stop(d)
    assert next(x for x in snap["services"][0]["dests"] if x["addr"] == "192.168.100.3")["held"] is True
    new = await daemon(tmp_path, CONF, snap)
    try:
        ds = new.bal.get_service(SVC).dests
        assert ds[RS3].held and sorry_in(new) == [SORRY9]  # as saved: quorum still lost
        probe["192.168.100.2"] = True
        await until(lambda: sorry_in(new) == [])
        assert not ds[RS3].held and ds[RS3].eff_weight == 1
    finally:
        await stop(new)


async def test_a_reload_changing_the_method_while_quorum_is_lost_moves_the_sorry_server_too(tmp_path, probe):  # noqa: F811
    d = await lost_quorum(tmp_path, probe)
    try:
        assert d.bal.get_service(SVC).dests[SORRY9].fwd == "fnat"
        await reload(d, CONF.replace("lb_kind FNAT", "lb_kind NAT").replace("    laddr_group_name lg\n", ""))
        ds = d.bal.get_service(SVC).dests
        assert {k: x.fwd for k, x in ds.items()} == {RS2: "nat", RS3: "nat", SORRY9: "nat"}
        assert sorry_in(d) == [SORRY9] and ds[RS3].held
    finally:
        await stop(d)


async def test_the_sorry_server_removed_by_hand_lets_the_held_servers_back(tmp_path, probe):  # noqa: F811
    d = await lost_quorum(tmp_path, probe)
    try:
        ds = d.bal.get_service(SVC).dests
        assert ds[RS3].held
        d.bal.dest_del({"svc": SVC, "addr": "192.168.100.9", "port": 80})  # ipvsadm -d while quorum is lost
        assert not ds[RS3].held and ds[RS3].eff_weight == 1 and table_slots(d) == slots(d, RS3)
    finally:
        await stop(d)
