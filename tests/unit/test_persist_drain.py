"""Which real servers keep their persistent clients (LVS's ip_vs_check_template), as the control plane tells the fast
path through DEST_F_NO_PERSIST: an operator's drain keeps them, a failed health check or a checker's weight 0 does
not, expire_quiescent_template turns the drain's answer around. Every change the answer depends on writes the slot
again: ipvsadm -e / REST (dest_edit), the health checkers (dest_health, the daemon's callback), a reload that
toggles expire_quiescent_template, a restart's restore."""

import asyncio
import re

import pytest

from hdslb.balancer import Dest, keeps_persistent, restore, snapshot
from hdslb.fastpath import abi

from .test_api_security import BASE, HarnessDaemon
from .test_balancer_modes import SVC, calls, make

RS1 = {"svc": SVC, "addr": "192.168.100.2", "port": 80}
RS2 = {"svc": SVC, "addr": "192.168.100.3", "port": 80}


def d(**kw):
    return Dest(addr=None, port=80, fwd="fnat", weight=kw.pop("weight", 1), slot=0, **kw)


@pytest.mark.parametrize("dest,quiescent,keeps", [
    (d(), False, True),
    (d(), True, True),
    (d(weight=0), False, True),                       # drained by hand: LVS keeps the template
    (d(weight=0), True, False),                       # ... unless expire_quiescent_template
    (d(overloaded=True), False, True),                # LVS does not look at the overload for a template
    (d(health="down"), False, False),                 # failed its check (also inhibit_on_failure: down at 0)
    (d(health="down", weight=0), False, False),
    (d(health_weight=0), False, False),               # a checker's weight 0 (misc_dynamic)
    (d(weight=0, health_weight=5), True, True),       # a checker's weight wins over the configured one
    (d(weight=3, health_weight=0), False, False),
])
def test_keeps_persistent(dest, quiescent, keeps):
    assert keeps_persistent(dest, quiescent) is keeps


def no_persist_of(bal, rs):
    """The no_persist argument of the last slot write of real server rs."""
    want = (rs["addr"], rs["port"])
    writes = [c[1] for c in calls(bal, "dest_set") if (str(c[1][1].addr), c[1][1].port) == want]
    assert writes, f"{want} was never written"
    return writes[-1][2]


@pytest.fixture
def bal():
    b = make()
    b.service_add(dict(SVC, sched="rr", persistent=60))
    for rs in (RS1, RS2):
        b.dest_add(dict(rs))
    return b


def test_each_change_writes_the_slot_with_its_answer(bal):
    svc = bal.get_service(SVC)
    assert no_persist_of(bal, RS1) is False
    bal.dest_edit(dict(RS1, weight=0))
    assert no_persist_of(bal, RS1) is False and not calls(bal, "persist_flush"), "a drain keeps its clients"
    bal.dest_health(RS1, False, None, "connect refused")
    assert no_persist_of(bal, RS1) is True
    assert calls(bal, "persist_flush")[-1][1] == (svc.svc_id, svc.dests[bal._dest_key(svc, RS1)].slot)
    bal.dest_health(RS1, True, None, "")
    assert no_persist_of(bal, RS1) is False, "back up (still drained by hand): its clients may come back"
    bal.dp.calls.clear()
    bal.dest_health(RS2, True, 0, "")  # a checker's weight 0: its templates go, as a failure's would
    slot2 = svc.dests[bal._dest_key(svc, RS2)].slot
    assert no_persist_of(bal, RS2) is True and calls(bal, "persist_flush") == [("persist_flush",
                                                                                (svc.svc_id, slot2))]
    bal.dest_health(RS2, True, 4, "")
    assert no_persist_of(bal, RS2) is False


def test_a_drain_under_expire_quiescent_template_flags_and_flushes(bal):
    svc = bal.get_service(SVC)
    bal.set_expire_quiescent_template(True)
    bal.dp.calls.clear()
    bal.dest_edit(dict(RS1, weight=0))
    slot = svc.dests[bal._dest_key(svc, RS1)].slot
    assert no_persist_of(bal, RS1) is True
    assert calls(bal, "persist_flush") == [("persist_flush", (svc.svc_id, slot))]
    bal.dp.calls.clear()
    bal.dest_edit(dict(RS1, u_threshold=10))  # still drained: nothing more to drop
    assert no_persist_of(bal, RS1) is True and not calls(bal, "persist_flush")
    bal.dest_edit(dict(RS1, weight=2))
    assert no_persist_of(bal, RS1) is False


def test_toggling_expire_quiescent_template_rewrites_the_drained_servers_only(bal):
    svc = bal.get_service(SVC)
    bal.dest_edit(dict(RS1, weight=0))
    bal.dest_health(RS2, False, None, "down")  # down: refused either way, nothing to rewrite
    bal.dp.calls.clear()
    bal.set_expire_quiescent_template(False)
    assert bal.dp.calls == [], "unchanged: nothing written"
    bal.set_expire_quiescent_template(True)
    slot = svc.dests[bal._dest_key(svc, RS1)].slot
    assert [(c[0], c[1][1].slot if c[0] == "dest_set" else c[1]) for c in bal.dp.calls] == \
        [("dest_set", slot), ("persist_flush", (svc.svc_id, slot))]
    assert no_persist_of(bal, RS1) is True
    bal.dp.calls.clear()
    bal.set_expire_quiescent_template(False)
    assert [c[0] for c in bal.dp.calls] == ["dest_set"] and no_persist_of(bal, RS1) is False


def test_a_restore_writes_each_slot_with_its_answer(bal):
    bal.dest_edit(dict(RS1, weight=0))
    bal.dest_health(RS2, False, None, "down")
    snap = snapshot(bal)
    for quiescent, rs1 in ((False, False), (True, True)):
        b = make()
        b.expire_quiescent_template = quiescent
        restore(b, snap)
        assert (no_persist_of(b, RS1), no_persist_of(b, RS2)) == (rs1, True)


CONF = BASE.replace("lb_algo wrr", "lb_algo rr\n    persistence_timeout 60").replace(
    "        weight 3\n    }", "        weight 0\n    }\n    real_server 192.168.100.3 80 {\n        weight 1\n    }")
QUIESCENT = "ipvs_defs {\n    conn {\n        expire_quiescent_template\n    }\n}\n"


async def test_a_reload_that_toggles_expire_quiescent_template_rewrites_the_drained_server(tmp_path):
    assert "persistence_timeout 60" in CONF and re.search(r"weight 0\n", CONF)
    conf = tmp_path / "hdslb.conf"
    conf.write_text(CONF)
    dm = HarnessDaemon(conf, tmp_path)
    await dm.reload_config()
    bal = dm.bal
    assert no_persist_of(bal, RS1) is False
    conf.write_text(QUIESCENT + CONF)
    r = await dm.reload_config()
    assert any("expire_quiescent_template" in line for line in r["applied"])
    assert no_persist_of(bal, RS1) is True and no_persist_of(bal, RS2) is False
    svc = bal.get_service(SVC)
    assert calls(bal, "persist_flush")[-1][1] == (svc.svc_id, svc.dests[bal._dest_key(svc, RS1)].slot)
    conf.write_text(CONF)
    await dm.reload_config()
    assert no_persist_of(bal, RS1) is False


async def test_the_health_callback_reaches_the_slot(tmp_path):
    conf = tmp_path / "hdslb.conf"
    conf.write_text(CONF)
    dm = HarnessDaemon(conf, tmp_path)
    await dm.reload_config()
    await dm._on_health(("TCP", "10.0.0.100:80"), ("192.168.100.3", 80), False, 0, "inhibited")
    await asyncio.sleep(0)  # verdicts apply in the next loop iteration (Daemon._on_health)
    assert no_persist_of(dm.bal, RS2) is True
    await dm._on_health(("TCP", "10.0.0.100:80"), ("192.168.100.3", 80), True, 1, "")
    await asyncio.sleep(0)
    assert no_persist_of(dm.bal, RS2) is False


def test_the_python_flag_values_are_the_header_s():
    text = abi.ABI_HEADER.read_text()
    for name in ("DEST_F_VALID", "DEST_F_DRAIN", "DEST_F_NO_PERSIST"):
        m = re.search(rf"#define {name} (0x[0-9a-fA-F]+)", text)
        assert m and int(m.group(1), 16) == getattr(abi, name), name
