"""A `virtual_server group` whose members use different ports, as keepalived builds it (check/ipvswrapper.c,
ipvs_group_cmd): DR and TUN real servers are on each member's port, a real server written without a port (or
with port 0) takes each member's, and health verdicts reach the real server of every member."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from hdslb.config import loads
from hdslb.config.model import ConfigError
from tests.unit.test_config_apply import Ctx
from tests.unit.test_health import until
from tests.unit.test_health_restore import daemon, probe, stop  # noqa: F401 — probe is a fixture

GROUP = """virtual_server_group WEB {
    10.0.0.1 80
    10.0.0.1 443
}
virtual_server group WEB {
    lb_algo rr
    lb_kind %s
%s
}
"""
CHECK = """        TCP_CHECK {
            delay_loop 0.02
            warmup 0
            retry 0%s
        }"""


def conf(kind="DR", rs="    real_server 192.168.100.2 80 {\n    }", extra=""):
    return GROUP % (kind, rs + extra)


def dests(ctx):
    return {svc.port: sorted((str(a), p) for a, p in svc.dests) for svc in ctx.bal.services.values()}


@pytest.mark.parametrize("kind", ["DR", "TUN"])
def test_dr_and_tun_real_servers_are_on_each_members_port(kind):
    ctx = Ctx()
    ctx.apply(conf(kind))
    assert dests(ctx) == {80: [("192.168.100.2", 80)], 443: [("192.168.100.2", 443)]}


@pytest.mark.parametrize("port", ["", " 0"])
def test_a_real_server_without_a_port_takes_each_members(port):
    ctx = Ctx()
    ctx.apply(conf("NAT", f"    real_server 192.168.100.2{port} {{\n    }}\n"
                          f"    sorry_server 192.168.100.9{port}"))
    assert dests(ctx) == {80: [("192.168.100.2", 80)], 443: [("192.168.100.2", 443)]}
    ctx.apply(conf("DR", f"    real_server 192.168.100.2{port} {{\n    }}"))  # a reload to DR: nothing moves
    assert dests(ctx) == {80: [("192.168.100.2", 80)], 443: [("192.168.100.2", 443)]}


def test_nat_real_servers_keep_the_port_written():
    ctx = Ctx()
    ctx.apply(conf("NAT", "    real_server 192.168.100.2 8080 {\n    }"))
    assert dests(ctx) == {80: [("192.168.100.2", 8080)], 443: [("192.168.100.2", 8080)]}


def test_a_check_of_a_server_without_a_port_needs_a_connect_port():
    with pytest.raises(ConfigError) as e:
        loads(conf("DR", "    real_server 192.168.100.2 {\n" + CHECK % "" + "\n    }"), name="lb.conf")
    assert "lb.conf:" in str(e.value) and "connect_port" in str(e.value)
    loads(conf("DR", "    real_server 192.168.100.2 {\n" + CHECK % "\n            connect_port 80" + "\n    }"),
          name="lb.conf")


def test_a_single_virtual_server_still_refuses_port_0():
    with pytest.raises(ConfigError, match="port 0 is only for SNAT"):
        loads("virtual_server 10.0.0.1 80 {\n lb_kind NAT\n real_server 192.168.100.2 0 {\n }\n}\n", name="lb.conf")


async def test_a_verdict_reaches_the_real_server_of_every_member(tmp_path, probe):  # noqa: F811
    text = conf("DR", "    real_server 192.168.100.2 80 {\n        weight 1\n" + CHECK % "" + "\n    }\n"
                      "    real_server 192.168.100.3 80 {\n        weight 1\n    }")
    d = await daemon(tmp_path, text)
    try:
        rs2 = ip_address("192.168.100.2")

        def health():
            return {p: d.bal.get_service({"proto": "tcp", "addr": "10.0.0.1", "port": p}).dests[(rs2, p)].health
                    for p in (80, 443)}
        await d.health.settle()
        assert health() == {80: "up", 443: "up"}
        probe["192.168.100.2"] = False
        await until(lambda: health() == {80: "down", 443: "down"})
        probe["192.168.100.2"] = True
        await until(lambda: health() == {80: "up", 443: "up"})
    finally:
        await stop(d)
