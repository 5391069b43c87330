"""A check added at run time (check.add, `hdslb-ctl health add`) counts its real server in the quorum at the server's
weight, not at 1.

Found in a netns lab: a virtual server with quorum 8 and two servers of weight 5, both passing their checks; `hdslb-ctl
health add` of a TCP_CHECK on one of them weighed the service at 1 + 5 = 6 < 8, so quorum was lost, both healthy
servers left the pool and the sorry server took every new flow. The check's real_server block was written without a
weight, and keepalived's default weight is 1 (a misc_dynamic exit 0 also set the server to 1)."""

from __future__ import annotations

from tests.unit.test_health import until
from tests.unit.test_health_restore import CONF, SVC, daemon, dests, probe, stop  # noqa: F401 — a fixture
from hdslb.api import dispatch_async

HEAVY = CONF.replace("quorum 2", "quorum 8").replace("weight 1", "weight 5")
VS = ("TCP", "10.0.0.100:80")


async def test_a_run_time_check_weighs_its_server_at_its_weight(tmp_path, probe):  # noqa: F811
    d = await daemon(tmp_path, HEAVY)
    try:
        await until(lambda: d.health.quorum_up(VS) is True)
        await dispatch_async(d, "check.add", {"svc": SVC, "addr": "192.168.100.2", "port": 80, "kind": "TCP_CHECK",
                                              "params": {"connect_port": 8080}})
        await d.health.settle()
        assert d.health.quorum_up(VS) is True, "10 >= 8: still quorum"
        assert not [x for x in dests(d).values() if x.sorry] and all(x.eff_weight == 5 for x in dests(d).values())
        assert d.health.status()["10.0.0.100:80/TCP"]["weight"] == 10
    finally:
        await stop(d)
