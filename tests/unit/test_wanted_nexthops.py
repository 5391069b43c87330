"""wanted_nexthops() keeps each service's next hops between calls: after any change (real servers, services, routes,
local addresses, SNAT services, interfaces) it must still say what a walk of the whole model says."""

import random

from hdslb.balancer import Balancer, Iface

from .test_balancer import Recorder
from .test_batch import IFACES


def _walk(b: Balancer) -> dict:
    """The rule, walked from scratch: every real server's next hop, SNAT gateways and small dst-ranges, on a
    served interface, not unspecified, not one of our own addresses."""
    local = {ad.addr for ad in b.addrs} | {la.addr for s in b.services.values() for la in s.laddrs} | \
        set(b.retired_laddrs)
    want = {}

    def add(nh, ifname):
        if ifname in b.ifaces and not nh.is_unspecified and nh not in local:
            want[nh] = ifname

    for s in b.services.values():
        if s.match is None:
            for d in s.dests.values():
                nh = b.nexthop(d.addr)
                if nh and nh[0].version == d.addr.version:
                    add(*nh)
    for svc in b.snat_order:
        m = svc.match
        for via, ifname in b._gateways:
            if via.version == 4 and m.oif in (None, ifname):
                add(via, ifname)
        if m.dst is not None and int(m.dst[1]) - int(m.dst[0]) < b.SNAT_PROBE_RANGE:
            for i in range(int(m.dst[0]), int(m.dst[1]) + 1):
                import ipaddress

                nh = b.nexthop(ipaddress.IPv4Address(i))
                if nh and m.oif in (None, nh[1]):
                    add(*nh)
    return want


def _svc(i: int) -> dict:
    return {"proto": "tcp", "addr": f"10.0.0.{i + 1}", "port": 80}


def test_wanted_next_hops_equal_a_fresh_walk_after_every_change():
    rng = random.Random(11)
    b = Balancer(Recorder(), dict(IFACES))
    b.WANTED_STALE_ABOVE_S = float("inf")  # never served stale: each answer is the model's now
    b.addr_add({"addr": "192.168.1.254", "prefixlen": 24, "ifname": "eth1"})
    for i in range(8):
        b.service_add(dict(_svc(i), sched="rr"))

    def rs():
        return f"192.168.{rng.randrange(1, 4)}.{rng.randrange(1, 12)}"

    def svc():
        return _svc(rng.randrange(10))

    ops = [
        lambda: b.dest_add({"svc": svc(), "addr": rs(), "port": 80}),
        lambda: b.dest_add({"svc": svc(), "addr": rs(), "port": 80}),
        lambda: b.dest_del({"svc": svc(), "addr": rs(), "port": 80}),
        lambda: b.service_add(dict(svc(), sched="rr")),
        lambda: b.service_del(svc()),
        lambda: b.route_add({"prefix": f"192.168.{rng.randrange(2, 4)}.0", "prefixlen": 24, "ifname": "eth1",
                             **({"via": "192.168.1.1"} if rng.random() < 0.5 else {})}),
        lambda: b.route_del({"prefix": f"192.168.{rng.randrange(2, 4)}.0", "prefixlen": 24}),
        lambda: b.addr_add({"addr": f"192.168.{rng.randrange(1, 4)}.{rng.randrange(1, 12)}", "prefixlen": 32,
                            "ifname": "eth1"}),
        lambda: b.addr_del({"addr": f"192.168.{rng.randrange(1, 4)}.{rng.randrange(1, 12)}", "prefixlen": 32,
                            "ifname": "eth1"}),
        lambda: b.laddr_add({"svc": svc(), "addr": rs(), "ifname": "eth1"}),
        lambda: b.service_add({"match": {"proto": "tcp", "src_range": "10.9.0.0-10.9.0.255", "oif": "eth1",
                                         "dst_range": f"192.168.3.{rng.randrange(1, 5)}-192.168.3.9"},
                               "sched": "rr"}),
        lambda: b.ifaces.pop("eth0") if "eth0" in b.ifaces else b.ifaces.update(eth0=IFACES["eth0"]),
        lambda: b.ifaces.pop("eth1") if rng.random() < 0.2 and "eth1" in b.ifaces else
        b.ifaces.update(eth1=Iface("eth1", 3, b"\x04" * 6, 1500)),
    ]
    applied = 0
    for _ in range(2500):
        try:
            rng.choice(ops)()
            applied += 1
        except Exception:  # refused (exists, not found, unknown interface, ...): the model did not change
            pass
        b._wgen += 1  # what the daemon's kick does; interface changes do not bump it themselves
        assert b.wanted_nexthops() == _walk(b)
    assert applied > 800 and any(s.dests for s in b.services.values())
