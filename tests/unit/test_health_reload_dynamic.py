"""A reload that edits a real server whose misc_dynamic check set its weight keeps that weight, as keepalived's does.

The config's dest.edit gives the configured weight, which the model takes as the weight (as from ipvsadm -e): a
reload that changed such a server's weight, its uthreshold or its service's lb_kind put it back at the configured
weight, a script's 0 (drained: no new flows) included, and for good, since the checker, having told its weight once,
tells it again only when the script's answer changes. keepalived's reload carries the server's effective weight over
(check/ipwrapper.c clear_diff_rs: new_rs->effective_weight = rs->effective_weight)."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

import hdslb.health
from hdslb.health import CheckResult, HealthManager
from tests.unit.test_health import until
from tests.unit.test_health_restore import daemon, stop

CONF = """virtual_server 10.0.0.100 80 {
    lb_algo wrr
    lb_kind DR
    real_server 192.168.100.2 80 {
        weight 3
        MISC_CHECK {
            misc_path /bin/true
            misc_dynamic
            delay_loop 0.02
            warmup 0
        }
    }
    real_server 192.168.100.3 80 {
        weight 1
    }
}
"""
SVC = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}
RS2 = (ip_address("192.168.100.2"), 80)


@pytest.fixture
def script(monkeypatch):
    """The weight the misc_dynamic script answers with, and how many times it ran."""
    state = {"weight": 5, "runs": 0}

    async def scripted(checker, rs):
        state["runs"] += 1
        return CheckResult(True, f"exit {state['weight'] + 2}", state["weight"])

    class Manager(HealthManager):
        def __init__(self, *a, **kw):
            super().__init__(*a, probe=scripted, **kw)

    monkeypatch.setattr(hdslb.health, "HealthManager", Manager)
    return state


def rs2(d):
    return d.bal.get_service(SVC).dests[RS2]


@pytest.mark.parametrize("weight", [5, 0])
@pytest.mark.parametrize("old,new", [
    ("weight 3", "weight 4"),
    ("weight 3", "weight 3\n        uthreshold 100"),
    ("lb_kind DR", "lb_kind TUN"),
], ids=["weight", "uthreshold", "lb_kind"])
async def test_a_reload_editing_the_server_keeps_its_checks_weight(tmp_path, script, weight, old, new):
    script["weight"] = weight
    d = await daemon(tmp_path, CONF)
    try:
        await until(lambda: rs2(d).eff_weight == weight)
        await d.health.settle()
        with open(d.settings.config_file, "w") as f:
            f.write(CONF.replace(old, new))
        r = await d.reload_config()
        assert any(x.startswith("dest.edit") and "192.168.100.2:80" in x for x in r["applied"]), r["applied"]
        await d.health.settle()
        assert rs2(d).eff_weight == weight
        runs = script["runs"]
        await until(lambda: script["runs"] >= runs + 2)  # the script says the same: nothing else changes it
        await d.health.settle()
        x = rs2(d)
        assert (x.health, x.eff_weight) == ("up", weight)
        assert "uthreshold" not in new or x.u_threshold == 100  # and the edit itself is applied
        assert "TUN" not in new or x.fwd == "tunnel"
        script["weight"] = 2  # a new answer from the script still moves it
        await until(lambda: rs2(d).eff_weight == 2)
    finally:
        await stop(d)
