"""The sorry server is in the pool exactly while its virtual server's quorum is lost, and it is the one the config
names now: a reload that removes or changes sorry_server while quorum is lost takes the old one out (and puts the
new one in), and quorum regained takes out whichever is in."""

from __future__ import annotations

import dataclasses
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
