"""The state file's bytes (pack_snapshot) reuse each service's packed row while nothing it was made from changed,
and each route's (a Route is never changed in place): they must always equal packing snapshot() afresh, whatever
changed the model and by whichever path (a control op, a health verdict, or code setting a field directly), and
an unchanged service or route must not be packed again."""

import random

import msgpack

from hdslb.balancer import Balancer, pack_snapshot, snapshot

from .test_balancer import Recorder
from .test_batch import IFACES


def _fresh(b: Balancer, extra: dict) -> bytes:
    return msgpack.packb(dict(snapshot(b), **extra), use_bin_type=True)


def _svc(i: int) -> dict:
    return {"proto": "tcp" if i % 3 else "udp", "addr": f"10.0.{i // 250}.{i % 250 + 1}", "port": 80 + i % 7}


def _ops(b: Balancer, rng: random.Random):
    """One random change each call, through every path that can change a saved field."""
    svcs = list(b.services.values())
    pick = rng.choice(svcs) if svcs else None
    d = rng.choice(list(pick.dests.values())) if pick and pick.dests else None
    ident = pick.ident if pick else None
    n = rng.randrange(len(b.services) + 40)
    return rng.choice([
        lambda: b.service_add(dict(_svc(n), sched=rng.choice(["rr", "wrr", "wlc", "mh", "sh"]),
                                   **({"persistent": 300, "netmask": "255.255.255.0"} if rng.random() < 0.3 else {}))),
        lambda: b.dest_add({"svc": ident, "addr": f"192.168.{rng.randrange(4)}.{rng.randrange(1, 250)}",
                            "port": 80, "weight": rng.randrange(5)}),
        lambda: b.dest_edit({"svc": ident, "addr": str(d.addr), "port": d.port, "weight": rng.randrange(1, 9),
                             "u_threshold": rng.choice([0, 100])}),
        lambda: b.dest_del({"svc": ident, "addr": str(d.addr), "port": d.port}),
        lambda: b.dest_health({"svc": ident, "addr": str(d.addr), "port": d.port}, rng.random() < 0.5,
                              rng.choice([None, 0, 3]), rng.choice(["", "connection refused"])),
        lambda: b.service_edit(dict(ident, sched=rng.choice(["rr", "wlc", "mh"]),
                                    flags=rng.choice([[], ["mh-port"]]))),
        lambda: b.service_del(ident),
        lambda: b.laddr_add({"svc": ident, "addr": f"192.168.100.{rng.randrange(200, 210)}", "ifname": "eth1"}),
        lambda: b.neigh_add({"addr": f"192.168.9.{rng.randrange(1, 9)}", "lladdr": "02:00:00:00:00:09",
                             "ifname": "eth1"}),
        lambda: b.route_add({"prefix": f"20.{rng.randrange(250)}.0.0", "prefixlen": 16, "ifname": "eth1"}),
        lambda: b.route_add({"prefix": f"20.{rng.randrange(250)}.0.0", "prefixlen": 16, "ifname": "eth1",
                             "via": "192.168.1.1", "mtu": rng.choice([0, 1400]), "metric": rng.randrange(3)}),
        lambda: b.route_set({"prefix": f"20.{rng.randrange(250)}.0.0", "prefixlen": 16, "ifname": "eth1",
                             "mtu": rng.choice([0, 1300, 1400])}),
        lambda: b.route_del({"prefix": f"20.{rng.randrange(250)}.0.0", "prefixlen": 16}),
        lambda: b.addr_add({"addr": f"192.168.1.{rng.randrange(240, 250)}", "prefixlen": 24, "ifname": "eth1"}),
        lambda: b.addr_del({"addr": f"192.168.1.{rng.randrange(240, 250)}", "prefixlen": 24, "ifname": "eth1"}),
        # what no control op does, but code could: a field set in place, a list or dict changed in place
        lambda: setattr(d, "reason", rng.choice(["", "set directly"])),
        lambda: setattr(d, "sorry", not d.sorry),
        lambda: setattr(d, "slot", d.slot),  # the same value: nothing to pack again
        lambda: pick.sched_params.update(size=rng.choice([251, 509])),
        lambda: pick.flags.append("sh-port"),
        lambda: setattr(pick, "sched_gen", pick.sched_gen + 1),
        lambda: b.config_owned.symmetric_difference_update({pick.key}),
        lambda: setattr(pick.laddrs[0], "ifname", "eth0") if pick.laddrs else None,
    ])


def test_packed_state_equals_a_fresh_snapshot_after_every_change():
    rng = random.Random(7)
    b = Balancer(Recorder(), dict(IFACES))
    for i in range(30):
        b.service_add(dict(_svc(i), sched="rr"))
        for j in range(1 + i % 4):
            b.dest_add({"svc": _svc(i), "addr": f"192.168.{j}.{i + 1}", "port": 80})
    extra = {"checks": [], "timeouts": {"tcp": 900}}
    assert pack_snapshot(b, extra) == _fresh(b, extra)
    applied = 0
    for _ in range(3000):
        try:
            _ops(b, rng)()
            applied += 1
        except Exception:  # refused ops (exists, not found, no room, a wrong family): nothing to check then
            pass
        assert pack_snapshot(b, extra) == _fresh(b, extra)
    assert applied > 1500 and b.services


def test_an_unchanged_service_is_not_packed_again_and_a_changed_one_is(monkeypatch):
    import hdslb.balancer as balancer

    b = Balancer(Recorder(), dict(IFACES))
    for i in range(3):
        b.service_add(dict(_svc(i), sched="rr"))
        b.dest_add({"svc": _svc(i), "addr": f"192.168.1.{i + 1}", "port": 80})
    pack_snapshot(b)
    made = []
    real = balancer._service_row
    monkeypatch.setattr(balancer, "_service_row", lambda b, v: made.append(v.port) or real(b, v))
    pack_snapshot(b)
    assert made == [], "nothing changed: every row reused"
    next(iter(b.services[("udp", *list(b.services)[0][1:])].dests.values())).weight = 4
    got = pack_snapshot(b)
    assert made == [80], "only the service whose real server changed is made again"
    assert got == _fresh(b, {})


def test_an_unchanged_route_is_not_packed_again_and_routes_do_not_change_in_place(monkeypatch):
    import dataclasses

    import pytest

    import hdslb.balancer as balancer

    b = Balancer(Recorder(), dict(IFACES))
    for i in range(5):
        b.route_add({"prefix": f"20.{i}.0.0", "prefixlen": 16, "ifname": "eth1"})
    pack_snapshot(b)
    made = []
    real = balancer._route_row
    monkeypatch.setattr(balancer, "_route_row", lambda r: made.append(str(r.net)) or real(r))
    b.route_add({"prefix": "20.9.0.0", "prefixlen": 16, "ifname": "eth1"})
    b.route_set({"prefix": "20.2.0.0", "prefixlen": 16, "ifname": "eth1", "mtu": 1400})
    got = pack_snapshot(b)
    assert sorted(made) == ["20.2.0.0/16", "20.9.0.0/16"], "only the new and the changed route are made"
    assert got == _fresh(b, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.routes[0].mtu = 1200  # the packed row kept on it could no longer say what it is
