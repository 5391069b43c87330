"""From a config file to control ops: start-up, reload diffs, ownership, and refusals that name the file."""

import errno

import pytest

from hdslb.balancer import Balancer, Iface
from hdslb.config import loads
from hdslb.config.apply import desired, plan
from hdslb.ctl import commands
from hdslb.errors import HdslbError

from .test_balancer import Recorder

BASE = """
local_address_group lg {
    192.168.100.200 eth1
}
virtual_server 10.0.0.100 80 {
    lb_algo wrr
    lb_kind FNAT
    protocol TCP
    laddr_group_name lg
    real_server 192.168.100.2 80 {
        weight 3
    }
    real_server 192.168.100.3 80 {
        weight 1
    }
}
"""


class Ctx:
    def __init__(self):
        ifaces = {"eth0": Iface("eth0", 2, b"\x02" * 6, 1500), "eth1": Iface("eth1", 3, b"\x04" * 6, 1500)}
        self.bal = Balancer(Recorder(), ifaces)

    def resolve_soon(self):
        pass

    def announce(self, *a):
        pass

    def apply(self, text):
        cfg = loads(text, name="lb.conf")
        want = desired(cfg, lambda ip: "eth1")
        ops = plan(self.bal, want, self.bal.config_owned)
        for op, args in ops:
            commands.dispatch(self, op, args)
        self.bal.config_owned = set(want)
        return ops


def test_start_creates_services_dests_and_laddrs():
    ctx = Ctx()
    ops = ctx.apply(BASE)
    assert [o for o, _ in ops] == ["service.add", "dest.add", "dest.add", "laddr.add"]
    svc = next(iter(ctx.bal.services.values()))
    assert svc.sched == "wrr" and sorted(d.weight for d in svc.dests.values()) == [1, 3]
    assert [str(la.addr) for la in svc.laddrs] == ["192.168.100.200"]
    assert ctx.apply(BASE) == [], "applying the same file again changes nothing"


def test_reload_diff_touches_only_what_changed():
    ctx = Ctx()
    ctx.apply(BASE)
    new = BASE.replace("192.168.100.3 80 {\n        weight 1", "192.168.100.9 80 {\n        weight 1") \
              .replace("weight 3", "weight 5").replace("lb_algo wrr", "lb_algo rr")
    ops = ctx.apply(new)
    assert sorted(o for o, _ in ops) == ["dest.add", "dest.del", "dest.edit", "service.edit"]


def test_removed_virtual_server_is_deleted_but_ipvsadm_services_stay():
    ctx = Ctx()
    ctx.apply(BASE)
    ctx.bal.service_add({"proto": "udp", "addr": "10.0.0.53", "port": 53, "sched": "rr"})  # operator's own
    ops = ctx.apply("")
    assert [o for o, _ in ops] == ["service.del"]
    assert [s.proto for s in ctx.bal.services.values()] == ["udp"]


def test_unknown_local_address_group_is_refused_at_load_with_its_line():
    from hdslb.config import ConfigError

    with pytest.raises(ConfigError) as e:
        loads(BASE.replace("laddr_group_name lg", "laddr_group_name nope"), name="lb.conf")
    assert str(e.value).startswith("lb.conf:9:")


def test_every_lb_kind_applies_and_model_refusals_still_fail():
    ctx = Ctx()
    ctx.apply(BASE.replace("lb_kind FNAT", "lb_kind DR"))
    svc = next(iter(ctx.bal.services.values()))
    assert {d.fwd for d in svc.dests.values()} == {"dr"}
    # an IPv6 local address for an IPv4 service passes the parser; the model refuses it (NAT46)
    with pytest.raises(HdslbError) as e:
        Ctx().apply(BASE.replace("192.168.100.200 eth1", "fd00::200 eth1"))
    assert e.value.errno == errno.EOPNOTSUPP




MODES = """
virtual_server 10.0.0.100 80 {
    lb_algo mh
    mh-port
    hash_table_size 4093
    lb_kind DR
    persistence_timeout 300
    persistence_granularity 255.255.255.0
    real_server 192.168.100.2 80 {
        uthreshold 100
        lthreshold 50
    }
}
virtual_server match outbound {
    protocol UDP
    lb_algo sh
    lb_kind SNAT
    src-range 192.168.100.1-192.168.100.254
    oif eth0
    real_server 203.0.113.1 0 {
        weight 5
    }
}
"""


def test_modes_persistence_thresholds_and_snat_from_the_file():
    ctx = Ctx()
    ctx.bal.addr_add({"addr": "203.0.113.1", "prefixlen": 24, "ifname": "eth0", "sapool": True})
    ops = ctx.apply(MODES)
    assert [o for o, _ in ops] == ["service.add", "dest.add", "service.add", "dest.add"]
    vip = ctx.bal.get_service({"proto": "tcp", "addr": "10.0.0.100", "port": 80})
    assert (vip.sched, vip.flags, vip.sched_params, vip.persistent, vip.netmask) == \
        ("mh", ["mh-port"], {"size": 4093}, 300, "255.255.255.0")
    d = next(iter(vip.dests.values()))
    assert (d.fwd, d.u_threshold, d.l_threshold) == ("dr", 100, 50)
    snat = next(s for s in ctx.bal.services.values() if s.match)
    assert (snat.proto, snat.sched, str(snat.match)) == \
        ("udp", "sh", "proto=udp,src-range=192.168.100.1-192.168.100.254,oif=eth0")
    assert [(str(x.addr), x.port, x.fwd, x.weight) for x in snat.dests.values()] == [("203.0.113.1", 0, "snat", 5)]
    assert ctx.apply(MODES) == [], "applying the same file again changes nothing"
    # dropping persistence in the file turns it off (an edit that says "none", not "unchanged")
    ops = ctx.apply(MODES.replace("    persistence_timeout 300\n    persistence_granularity 255.255.255.0\n", ""))
    assert [o for o, _ in ops] == ["service.edit"] and (vip.persistent, vip.netmask) == (None, None)
    # and the SNAT service goes away like any other config-owned service
    ops = ctx.apply(MODES[:MODES.index("virtual_server match")])
    assert [o for o, _ in ops] == ["service.del", "service.edit"] and not ctx.bal.snat_order


def test_options_not_acted_on_are_reported_and_acted_on_ones_are_not():
    from hdslb.config.apply import inactive_notices

    cfg = loads(MODES.replace("    lb_kind DR\n", "    lb_kind DR\n    establish_timeout 60\n")
                .replace("protocol UDP", "protocol UDP\n    ops"), name="lb.conf")
    notices = inactive_notices(cfg)
    assert any("ops: accepted, not acted on" in n for n in notices)
    assert any("establish_timeout: accepted, not acted on" in n for n in notices)
    for acted in ("persistence_timeout", "persistence_granularity", "lb_kind", "lb_algo", "mh-port",
                  "hash_table_size", "uthreshold", "src-range", "oif"):
        assert not any(f": {acted}: " in n for n in notices), acted
