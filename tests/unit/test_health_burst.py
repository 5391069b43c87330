"""Health verdicts reach the pool in batches (Daemon._on_health): a burst builds each touched table once, a lone
verdict is applied in the next loop iteration, down servers' templates go after the table no longer holds them, and
a verdict for a server removed meanwhile is dropped with a warning. Over the real Daemon code and a recording
datapath (tests/unit/test_api_security.HarnessDaemon); the checkers never run (warmup 3600): verdicts are fed in."""

from __future__ import annotations

import asyncio
import logging
from ipaddress import ip_address

import pytest

from hdslb import sched
from tests.unit.test_api_security import HarnessDaemon
from tests.unit.test_health import until

N = 20
VS_KEY = ("TCP", "10.0.0.100:80")
SVC = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}


def conf(n: int = N) -> str:
    rs = "".join(f"    real_server 192.168.1.{1 + i} 80 {{\n        weight 1\n"
                 f"        TCP_CHECK {{\n            warmup 3600\n        }}\n    }}\n" for i in range(n))
    return ("local_address_group lg {\n    192.168.100.200 eth1\n}\n"
            "virtual_server 10.0.0.100 80 {\n    lb_algo mh\n    hash_table_size 251\n    lb_kind FNAT\n"
            f"    persistence_timeout 60\n    laddr_group_name lg\n{rs}}}\n")


@pytest.fixture
async def d(tmp_path):
    path = tmp_path / "hdslb.conf"
    path.write_text(conf())
    dm = HarnessDaemon(path, tmp_path)
    await dm.reload_config()
    yield dm
    await dm.stop()


@pytest.fixture
def builds(monkeypatch):
    """The scheduling tables built (what an mh/conhash verdict costs: 45-390 ms each at 64k entries)."""
    built = []
    real = sched.build_table
    monkeypatch.setattr(sched, "build_table", lambda name, *a, **kw: (built.append(name), real(name, *a, **kw))[1])
    return built


def rs(i: int):
    return (ip_address(f"192.168.1.{1 + i}"), 80)


def health(dm):
    return [x.health for x in dm.bal.get_service(SVC).dests.values()]


def calls(dm, since: int = 0):
    return [c[0] for c in dm.bal.dp.calls[since:]]


async def test_a_burst_of_verdicts_builds_the_mh_table_once_and_ends_as_one_by_one(d, builds):
    down = [0, 3, 4, 7, 11, 12, 18]
    ref = d.bal.scratch()  # the same model, verdict by verdict
    for i in down:
        ref.dest_health({"svc": SVC, "addr": str(rs(i)[0]), "port": 80}, False, None, "TCP_CHECK: refused")
    want = ref._plan(ref.get_service(SVC)).table.entries
    builds.clear()
    n = len(d.bal.dp.calls)
    for i in down:  # delivered in one go, as the health manager's dispatcher does with what is queued
        await d._on_health(VS_KEY, rs(i), False, None, "TCP_CHECK: refused")
    await asyncio.sleep(0)
    assert builds == ["mh"]  # one by one: 7 builds of the table
    assert calls(d, n).count("sched_set") == 1
    assert [i for i, h in enumerate(health(d)) if h == "down"] == down
    sets = [c for c in d.bal.dp.calls[n:] if c[0] == "sched_set"]
    assert sets[0][1][1].entries == want


async def test_down_servers_templates_go_after_the_table_without_them(d):
    n = len(d.bal.dp.calls)
    for i in (2, 5):
        await d._on_health(VS_KEY, rs(i), False, None, "TCP_CHECK: refused")
    await asyncio.sleep(0)
    seq = calls(d, n)
    assert seq.count("persist_flush") == 2 and seq.index("sched_set") < seq.index("persist_flush")
    svc = d.bal.get_service(SVC)
    flushed = [c[1] for c in d.bal.dp.calls[n:] if c[0] == "persist_flush"]
    assert flushed == [(svc.svc_id, svc.dests[rs(i)].slot) for i in (2, 5)]


async def test_a_lone_verdict_after_a_quiet_spell_is_applied_at_once_one_right_after_a_slow_burst_waits(d, builds):
    loop = asyncio.get_running_loop()
    d._verdict_cost, d._verdicts_done = 0.3, loop.time() - 60  # a slow application, a minute ago
    builds.clear()
    await d._on_health(VS_KEY, rs(1), False, None, "TCP_CHECK: refused")
    await asyncio.sleep(0)  # the next loop iteration
    assert health(d)[1] == "down" and builds == ["mh"]
    d._verdict_cost = 0.3  # as if that application had been slow, and had just ended
    d._verdicts_done = loop.time()
    await d._on_health(VS_KEY, rs(2), False, None, "TCP_CHECK: refused")
    await d._on_health(VS_KEY, rs(3), False, None, "TCP_CHECK: refused")
    await asyncio.sleep(0)
    assert health(d)[2:4] == ["up", "up"] and d._verdict_handle is not None  # waits for the spacing
    await d._on_health(VS_KEY, rs(4), False, None, "TCP_CHECK: refused")  # joins them
    await until(lambda: d._verdict_handle is None, timeout=5)
    assert health(d)[2:5] == ["down"] * 3 and builds == ["mh", "mh"]


async def test_a_verdict_for_a_server_removed_meanwhile_is_dropped(d, builds, caplog):
    d._verdict_cost, d._verdicts_done = 0.3, asyncio.get_running_loop().time()  # the next application waits
    await d._on_health(VS_KEY, rs(6), False, None, "TCP_CHECK: refused")
    await d._on_health(VS_KEY, rs(8), False, None, "TCP_CHECK: refused")
    d.bal.dest_del({"svc": SVC, "addr": "192.168.1.7", "port": 80})  # not through a control op (see below)
    builds.clear()
    with caplog.at_level(logging.WARNING, logger="hdslb"):
        await until(lambda: d._verdict_handle is None, timeout=5)
    assert ip_address("192.168.1.7") not in {a for a, _ in d.bal.get_service(SVC).dests}
    assert d.bal.get_service(SVC).dests[rs(8)].health == "down" and builds == ["mh"]
    assert any("192.168.1.7:80" in r.getMessage() and "No such destination" in r.getMessage()
               for r in caplog.records)


async def test_a_control_op_and_a_quorum_notice_come_after_the_verdicts_received_before_them(d):
    d._verdict_cost, d._verdicts_done = 0.3, asyncio.get_running_loop().time()  # the next application waits
    await d._on_health(VS_KEY, rs(9), False, None, "TCP_CHECK: refused")
    assert health(d)[9] == "up"
    d.dispatch("health.list", {})  # reads do not wait for it
    assert health(d)[9] == "up"
    d.dispatch("dest.edit", {"svc": SVC, "addr": "192.168.1.10", "port": 80, "weight": 5})
    assert health(d)[9] == "down" and d._verdict_handle is None
    await d._on_health(VS_KEY, rs(10), False, None, "TCP_CHECK: refused")
    assert health(d)[10] == "up"
    await d._on_quorum(VS_KEY, True)
    assert health(d)[10] == "down"


async def test_stop_applies_the_verdicts_still_waiting(d):
    d._verdict_cost, d._verdicts_done = 0.3, asyncio.get_running_loop().time()
    await d._on_health(VS_KEY, rs(13), False, None, "TCP_CHECK: refused")
    assert health(d)[13] == "up"
    await d.stop()
    assert health(d)[13] == "down" and d._verdict_handle is None
