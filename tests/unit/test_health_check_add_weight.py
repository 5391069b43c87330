"""Checks added at run time (check.add, `hdslb-ctl health add`) and the config file's checks.

- The added check counts its real server in the quorum at the server's weight, not at 1. Found in a netns lab: a
  virtual server with quorum 8 and two healthy servers of weight 5; `hdslb-ctl health add` of a TCP_CHECK on one
  weighed the service at 1 + 5 = 6 < 8, so quorum was lost, both healthy servers left the pool and the sorry server
  took every new flow. The check's real_server block had no weight, and keepalived's default weight is 1.
- A server the config file checks is refused, naming the file's line: the added check replaced the file's checks of
  that server, silently, and with them its notify_up/notify_down, inhibit_on_failure and misc_dynamic weight (seen
  in the lab: `health show` then listed only the TCP_CHECK)."""

from __future__ import annotations

import errno

import pytest

from hdslb.api import dispatch_async
from hdslb.errors import HdslbError
from tests.unit.test_health import until
from tests.unit.test_health_restore import CONF, SVC, daemon, dests, probe, stop  # noqa: F401 — a fixture

# .2 is checked by the file, .3 is in the file without a check (always up): both weight 5, quorum 8
HEAVY = CONF.replace("quorum 2", "quorum 8").replace("weight 1", "weight 5")
_i = HEAVY.index("    real_server 192.168.100.3 80 {")
HEAVY = HEAVY[:_i] + "    real_server 192.168.100.3 80 {\n        weight 5\n    }\n}\n"
VS = ("TCP", "10.0.0.100:80")


async def test_a_run_time_check_weighs_its_server_at_its_weight(tmp_path, probe):  # noqa: F811
    d = await daemon(tmp_path, HEAVY)
    try:
        await until(lambda: d.health.quorum_up(VS) is True)
        await dispatch_async(d, "check.add", {"svc": SVC, "addr": "192.168.100.3", "port": 80, "kind": "TCP_CHECK",
                                              "params": {"connect_port": 8080}})
        await d.health.settle()
        assert d.health.quorum_up(VS) is True, "10 >= 8: still quorum"
        assert not [x for x in dests(d).values() if x.sorry] and all(x.eff_weight == 5 for x in dests(d).values())
        assert d.health.status()["10.0.0.100:80/TCP"]["weight"] == 10
    finally:
        await stop(d)


async def test_a_server_the_file_checks_is_refused(tmp_path, probe):  # noqa: F811
    d = await daemon(tmp_path, HEAVY)
    try:
        with pytest.raises(HdslbError) as e:
            await dispatch_async(d, "check.add", {"svc": SVC, "addr": "192.168.100.2", "port": 80,
                                                  "kind": "TCP_CHECK"})
        assert e.value.errno == errno.EEXIST
        assert "hdslb.conf:" in e.value.message and "config file" in e.value.message, e.value.message
        assert d.ctl_checks == {}
        rs = d.health.server(VS, next(k for k in dests(d) if str(k[0]) == "192.168.100.2")).rs
        assert str(rs.where).startswith(str(tmp_path)), "still the file's real server and checks"
    finally:
        await stop(d)
