"""Control commands for the new modes: warnings on accepted-but-not-yet-working real servers, templates next to
connections, and what service.list tells ipvsadm/REST about matches, tables, overload and count staleness."""

import errno

import pytest

from cli import ipvsadm
from hdslb.ctl import commands
from hdslb.errors import HdslbError

from .test_api import FakeCtx

SVC = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}


def test_dest_add_returns_warnings_but_applies():
    ctx = FakeCtx()
    ctx.bal.service_add(dict(SVC, sched="rr"))
    out = commands.dispatch(ctx, "dest.add", {"svc": SVC, "addr": "192.168.100.2", "fwd": "tunnel"})
    assert "no outer source address" in out["warnings"][0]
    assert len(ctx.svc().dests) == 1
    ctx.bal.route_add({"prefix": "192.168.100.0", "prefixlen": 24, "ifname": "eth1", "src": "192.168.100.254"})
    assert commands.dispatch(ctx, "dest.add", {"svc": SVC, "addr": "192.168.100.3", "fwd": "tunnel"}) is None
    data = commands.dispatch(ctx, "service.list", {"svc": SVC})["services"][0]
    assert {d["tunnel_src"] for d in data["dests"]} == {"192.168.100.254"}


def test_service_list_describes_matches_tables_and_overload():
    ctx = FakeCtx()
    ctx.counts_staleness = lambda: 3.0
    ctx.bal.addr_add({"addr": "203.0.113.1", "prefixlen": 24, "ifname": "eth0", "sapool": True})
    match = {"proto": "icmp", "src_range": "192.168.100.1-192.168.100.254"}
    commands.dispatch(ctx, "service.add", {"match": match, "sched": "sh"})
    commands.dispatch(ctx, "dest.add", {"svc": {"match": match}, "addr": "203.0.113.1", "port": 0})
    commands.dispatch(ctx, "service.add", dict(SVC, sched="mh", flags=["mh-port"], sched_params={"size": 251}))
    commands.dispatch(ctx, "dest.add", {"svc": SVC, "addr": "192.168.100.2", "fwd": "dr", "u_threshold": 2})
    commands.dispatch(ctx, "dest.add", {"svc": SVC, "addr": "192.168.100.3", "fwd": "dr"})
    ctx.counts = {1: (2, 0)}
    ctx.bal.conn_counts = ctx.conn_counts
    ctx.bal.refresh_dynamic()
    data = commands.dispatch(ctx, "service.list", {})
    assert data["counts_age_max_s"] == 3.0
    snat, vip = data["services"]
    assert snat["match"] == {"proto": "icmp", "src_range": "192.168.100.1-192.168.100.254", "dst_range": None,
                             "iif": None, "oif": None}
    assert [(d["addr"], d["port"], d["fwd"]) for d in snat["dests"]] == [("203.0.113.1", 0, "snat")]
    assert (vip["flags"], vip["sched_params"], vip["hash_cells"][1]) == (["mh-port"], {"size": 251}, 251)
    assert [d["overloaded"] for d in vip["dests"]] == [True, False]
    # laddr listings are for VIP services only
    assert [s["port"] for s in commands.dispatch(ctx, "laddr.list", {})["services"]] == [80]
    # a match service is deleted by its match
    commands.dispatch(ctx, "service.del", {"match": match})
    assert not ctx.bal.snat_order


def test_conn_list_carries_templates():
    ctx = FakeCtx(n_conns=2)
    tmpl = {"proto": "tcp", "client": "10.1.2.0", "plen": 24, "vaddr": "10.0.0.100", "vport": 80,
            "daddr": "192.168.100.2", "dport": 80, "dest_slot": 0, "expire_s": 5}
    ctx.persist_list = lambda: [tmpl]
    assert commands.dispatch(ctx, "conn.list", {}) == {"conns": ctx.conns, "templates": [tmpl]}
    assert commands.dispatch(ctx, "conn.list", {"templates_only": True}) == {"conns": [], "templates": [tmpl]}


def test_scheduler_parameters_the_daemon_takes_are_ones_ipvsadm_restores():
    """conhash's replicas and lc/wlc's horizon had no upper bound over the control socket and REST: a service made
    with replicas=2**32 was saved by ipvsadm -S as `--sched-flags replicas=4294967296`, and -R refused that line
    (--sched-flags takes 32-bit values), so the save could not be restored. The daemon now takes 0..2**32-1."""
    ctx = FakeCtx()
    for sched, params in (("conhash", {"replicas": 2**32}), ("wlc", {"horizon": 2**40})):
        with pytest.raises(HdslbError) as e:
            commands.dispatch(ctx, "service.add", dict(SVC, sched=sched, sched_params=params))
        assert e.value.errno == errno.EINVAL and "4294967295" in e.value.message
    assert not ctx.bal.services
    commands.dispatch(ctx, "service.add", dict(SVC, sched="conhash", sched_params={"replicas": 2**32 - 1}))
    saved = ipvsadm.format_save(commands.dispatch(ctx, "service.list", {}), ipvsadm.Format(numeric=True))
    assert saved == "-A -t 10.0.0.100:80 -s conhash --sched-flags replicas=4294967295\n"
    assert ipvsadm.parse_restore(saved)[0][1].requests[0][1]["sched_params"] == {"replicas": 2**32 - 1}
