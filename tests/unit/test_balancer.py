"""The balancer model: invariants, local/net routes from addresses, refused changes leave no trace."""

import copy
import errno
import ipaddress

import pytest

from hdslb.balancer import Balancer, Iface
from hdslb.errors import HdslbError


class Recorder:
    """A DataPath that records what would be written to the maps."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *a: self.calls.append((name, a))


SVC = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}


@pytest.fixture
def bal():
    ifaces = {"eth0": Iface("eth0", 2, b"\x02" * 6, 1500), "eth1": Iface("eth1", 3, b"\x04" * 6, 1500)}
    return Balancer(Recorder(), ifaces)


def last_table(b):
    """The table of the last sched_set the model wrote."""
    return [c for c in b.dp.calls if c[0] == "sched_set"][-1][1][1]


def quick_start(b):
    b.addr_add({"addr": "10.0.0.100", "prefixlen": 24, "ifname": "eth0"})
    b.service_add(dict(SVC, sched="rr"))
    b.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80, "fwd": "fnat"})
    b.dest_add({"svc": SVC, "addr": "192.168.100.3", "port": 80, "fwd": "fnat", "weight": 2})
    b.laddr_add({"svc": SVC, "addr": "192.168.100.200", "ifname": "eth1"})


def test_quick_start_model(bal):
    quick_start(bal)
    svc = bal.services[("tcp", ipaddress.ip_address("10.0.0.100"), 80)]
    assert [d.weight for d in svc.dests.values()] == [1, 2]
    # dpip addr add /24 makes a local route and a net route, as DPVS does
    routes = {(str(r.net), r.local) for r in bal.routes}
    assert routes == {("10.0.0.100/32", True), ("10.0.0.0/24", False)}
    sched = last_table(bal).entries
    assert sorted(sched) == [0, 1]  # rr: one entry per server regardless of weight
    locals_ = {str(c[1][0]) for c in bal.dp.calls if c[0] == "local_set"}
    assert locals_ == {"10.0.0.100", "192.168.100.200"}


def test_host_address_gets_no_net_route(bal):
    bal.addr_add({"addr": "10.0.0.5", "prefixlen": 32, "ifname": "eth0"})
    assert [(str(r.net), r.local) for r in bal.routes] == [("10.0.0.5/32", True)]


def test_default_scheduler_is_wlc_like_ipvsadm(bal):
    assert bal.service_add(SVC).sched == "wlc"


def test_wlc_ring_follows_live_connection_counts(bal):
    quick_start(bal)
    bal.service_edit(dict(SVC, sched="wlc"))
    bal.conn_counts = lambda: {0: (10, 0), 1: (0, 0)}  # slot 0 busy, slot 1 idle
    bal.refresh_dynamic()
    ring = last_table(bal).entries
    assert ring[:10] == [1] * 10, "the idle server takes the new flows until loads level"


def test_unknown_scheduler_is_refused_like_ipvsadm(bal):
    with pytest.raises(HdslbError) as e:
        bal.service_add(dict(SVC, sched="lblc"))
    assert e.value.errno == errno.ENOENT and "Scheduler not found: lblc" in e.value.message


@pytest.mark.parametrize("op,args,err", [
    ("service_add", dict(SVC, sched="rr"), errno.EEXIST),
    ("service_add", dict(SVC, proto="sctp"), errno.EINVAL),
    ("service_add", dict(SVC, proto=[1]), errno.EINVAL),  # what the wire can carry: never a TypeError
    ("service_add", {"match": {"proto": ["tcp"]}}, errno.EINVAL),
    ("service_add", {"match": {1: "tcp"}}, errno.EINVAL),
    ("service_add", dict(SVC, addr="10.0.0.300"), errno.EINVAL),
    ("service_add", dict(SVC, port=70000, sched="rr"), errno.EINVAL),
    ("service_del", dict(SVC, port=81), errno.ESRCH),
    ("dest_add", {"svc": SVC, "addr": "192.168.100.2", "port": 80}, errno.EEXIST),
    ("dest_add", {"svc": SVC, "addr": "192.168.100.9", "weight": -1}, errno.EINVAL),
    ("dest_add", {"svc": SVC, "addr": "192.168.100.9", "port": 8080, "fwd": "dr"}, errno.EINVAL),
    ("dest_add", {"svc": SVC, "addr": "fd00::9"}, errno.EOPNOTSUPP),
    ("dest_del", {"svc": SVC, "addr": "192.168.100.9"}, errno.ENOENT),
    ("laddr_add", {"svc": SVC, "addr": "192.168.100.201", "ifname": "nope0"}, errno.ENODEV),
    ("addr_add", {"addr": "10.0.0.100", "prefixlen": 24, "ifname": "eth0"}, errno.EEXIST),
    ("addr_add", {"addr": "10.0.0.7", "prefixlen": 33, "ifname": "eth0"}, errno.EINVAL),
    ("route_add", {"prefix": "10.1.0.1", "prefixlen": 16, "ifname": "eth0"}, errno.EINVAL),
    ("route_add", {"prefix": "10.1.0.0", "prefixlen": 16, "ifname": "eth0", "via": "fd00::1"}, errno.EINVAL),
    ("route_del", {"prefix": "10.9.0.0", "prefixlen": 16, "ifname": "eth0"}, errno.ESRCH),
    ("neigh_add", {"addr": "10.0.0.1", "lladdr": "zz:00", "ifname": "eth0"}, errno.EINVAL),
    # addresses no host has on a link: the fast path would never see, or could not answer, their traffic
    *[("service_add", dict(SVC, addr=a, sched="rr"), errno.EINVAL)
      for a in ("0.0.0.0", "224.0.0.5", "255.255.255.255", "127.0.0.1", "::", "ff02::1", "::1", "::ffff:10.0.0.9")],
    *[("dest_add", {"svc": SVC, "addr": a}, errno.EINVAL) for a in ("0.0.0.0", "255.255.255.255", "239.1.1.1")],
    *[("laddr_add", {"svc": SVC, "addr": a, "ifname": "eth1"}, errno.EINVAL) for a in ("0.0.0.0", "224.0.0.1")],
    ("addr_add", {"addr": "224.0.0.9", "prefixlen": 32, "ifname": "eth0"}, errno.EINVAL),
    ("neigh_add", {"addr": "255.255.255.255", "lladdr": "02:00:00:00:00:01", "ifname": "eth0"}, errno.EINVAL),
    ("route_add", {"prefix": "10.1.0.0", "prefixlen": 16, "ifname": "eth0", "via": "224.0.0.1"}, errno.EINVAL),
    ("route_add", {"prefix": "10.1.0.0", "prefixlen": 16, "ifname": "eth0", "mtu": 100000}, errno.EINVAL),
    ("route_add", {"prefix": "10.1.0.0", "prefixlen": 16, "ifname": "eth0", "mtu": 40}, errno.EINVAL),
    # a gateway of ours: its MAC is never resolved (nothing answers us for our own address), so every new flow the
    # route takes would wait for it and be dropped; Linux refuses it too ("Nexthop has invalid gateway")
    ("route_add", {"prefix": "10.1.0.0", "prefixlen": 16, "ifname": "eth0", "via": "10.0.0.100"}, errno.EINVAL),
    ("route_add", {"prefix": "10.1.0.0", "prefixlen": 16, "ifname": "eth1", "via": "192.168.100.200"}, errno.EINVAL),
    ("route_set", {"prefix": "10.0.0.0", "prefixlen": 24, "ifname": "eth0", "via": "10.0.0.100"}, errno.EINVAL),
    ("addr_del", {"addr": "10.0.0.100", "prefixlen": 8, "ifname": "eth0"}, errno.EADDRNOTAVAIL),
])
def test_refused_changes_change_nothing(bal, op, args, err):
    quick_start(bal)
    before = (copy.deepcopy(bal.services), copy.deepcopy(bal.routes), copy.deepcopy(bal.addrs), len(bal.dp.calls))
    with pytest.raises(HdslbError) as e:
        getattr(bal, op)(args)
    assert e.value.errno == err, e.value.message
    assert (bal.services, bal.routes, bal.addrs, len(bal.dp.calls)) == before


def test_address_delete_takes_any_prefix_length_unless_one_is_given(bal):
    quick_start(bal)
    bal.addr_del({"addr": "10.0.0.100", "ifname": "eth0"})  # dpip addr del 10.0.0.100 dev eth0
    assert not bal.addrs
    bal.addr_add({"addr": "10.0.0.100", "prefixlen": 24, "ifname": "eth0"})
    bal.addr_del({"addr": "10.0.0.100", "prefixlen": 24, "ifname": "eth0"})
    assert not bal.addrs


def test_address_delete_hands_its_net_route_to_another_address_on_that_net(bal):
    """Two addresses on one net share the net route the first made (the second's add finds it there, as DPVS's
    EDPVS_EXIST): deleting the first (renumbering: add the new, delete the old) removed that route while the second
    stayed, so every real server on the net was dropped (drop_no_route) with `addr show` still listing a /24 there.
    The route now passes to the remaining address, as Linux promotes a secondary; with none left it goes."""
    bal.addr_add({"addr": "192.168.100.254", "prefixlen": 24, "ifname": "eth0"})
    bal.addr_add({"addr": "192.168.100.253", "prefixlen": 24, "ifname": "eth0"})
    bal.addr_add({"addr": "192.168.100.252", "prefixlen": 25, "ifname": "eth0"})  # another net: not its heir
    net = ipaddress.ip_network("192.168.100.0/24")
    bal.dp.calls.clear()
    bal.addr_del({"addr": "192.168.100.254", "ifname": "eth0"})
    assert [(str(r.src), r.ifname, r.scope) for r in bal.routes if r.net == net] == [
        ("192.168.100.253", "eth0", "link")]
    # the fast path's entry is rewritten in place, never deleted in between (a new flow then would be dropped)
    writes = [(c[0], c[1][0]) for c in bal.dp.calls if c[0] in ("route_set", "route_del")]
    assert ("route_del", net) not in writes and writes[-1][0] == "route_set" and writes[-1][1].src == \
        ipaddress.ip_address("192.168.100.253")
    bal.addr_del({"addr": "192.168.100.253", "ifname": "eth0"})
    assert not [r for r in bal.routes if r.net == net] and bal.dp.calls[-1] == ("route_del", (net,))


def test_snat_real_server_any_address_is_still_taken(bal):
    """0.0.0.0:0 under a SNAT match service means: the src of the route taken (not refused as unspecified)."""
    m = {"match": {"proto": "tcp", "src-range": "192.168.100.2-192.168.100.254", "oif": "eth0"}}
    bal.service_add(dict(m, sched="rr"))
    bal.dest_add({"svc": m, "addr": "0.0.0.0", "port": 0, "fwd": "snat"})


def test_weight_zero_drains(bal):
    quick_start(bal)
    bal.dest_edit({"svc": SVC, "addr": "192.168.100.3", "port": 80, "weight": 0})
    ring = last_table(bal).entries
    drained = [c for c in bal.dp.calls if c[0] == "dest_set"][-1][1][1]
    assert ring == [0] and drained.weight == 0


def test_route_metric_and_longest_prefix(bal):
    bal.route_add({"prefix": "10.0.0.0", "prefixlen": 8, "ifname": "eth0", "metric": 10})
    bal.route_add({"prefix": "10.0.0.0", "prefixlen": 8, "ifname": "eth1", "metric": 5})
    bal.route_add({"prefix": "10.1.0.0", "prefixlen": 16, "ifname": "eth0", "via": "10.0.0.254"})
    assert bal.route_lookup(ipaddress.ip_address("10.2.3.4")).ifname == "eth1"
    assert bal.nexthop(ipaddress.ip_address("10.1.2.3")) == (ipaddress.ip_address("10.0.0.254"), "eth0")
    assert bal.nexthop(ipaddress.ip_address("11.0.0.1")) is None
    bal.route_del({"prefix": "10.0.0.0", "prefixlen": 8, "ifname": "eth1", "metric": 5})
    assert bal.route_lookup(ipaddress.ip_address("10.2.3.4")).ifname == "eth0"


def test_route_set_replaces_the_route_of_its_metric_and_names_the_metrics_there_are(bal):
    """dpip route set of a route added with a metric, the metric left out, answered "not found" for a route the
    operator could see in `route show`; it now names the metrics that prefix has."""
    bal.route_add({"prefix": "10.12.0.0", "prefixlen": 16, "ifname": "eth0", "metric": 3})
    with pytest.raises(HdslbError) as e:
        bal.route_set({"prefix": "10.12.0.0", "prefixlen": 16, "ifname": "eth0", "mtu": 1300})
    assert e.value.message == "route 10.12.0.0/16 metric 0 not found (it has metric 3: name it with `metric`)"
    bal.route_set({"prefix": "10.12.0.0", "prefixlen": 16, "ifname": "eth1", "mtu": 1300, "metric": 3})
    (r,) = bal.routes
    assert (r.ifname, r.mtu, r.metric) == ("eth1", 1300, 3)
    with pytest.raises(HdslbError) as e:
        bal.route_set({"prefix": "10.13.0.0", "prefixlen": 16, "ifname": "eth0"})
    assert e.value.message == "route 10.13.0.0/16 not found"


def test_route_set_rewrites_the_fast_path_entry_in_place(bal):
    """`dpip route set P via NEWGW` deleted P's LPM entry, then wrote the new one: between the two map writes a new
    flow to P fell to a less specific route (another gateway, or drop_no_route with none). The entry is now
    overwritten, never missing."""
    bal.route_add({"prefix": "0.0.0.0", "prefixlen": 0, "ifname": "eth0", "via": "10.0.0.1"})
    bal.route_add({"prefix": "172.16.0.0", "prefixlen": 16, "ifname": "eth1", "via": "10.1.0.1"})
    bal.dp.calls.clear()
    bal.route_set({"prefix": "172.16.0.0", "prefixlen": 16, "ifname": "eth1", "via": "10.1.0.2"})
    assert [c[0] for c in bal.dp.calls] == ["route_set"] * len(bal.dp.calls)
    assert bal.dp.calls[-1][1][0].via == ipaddress.ip_address("10.1.0.2")
    assert [str(r.via) for r in bal.routes] == ["10.0.0.1", "10.1.0.2"]


def test_service_delete_releases_ids_and_local_addresses(bal):
    quick_start(bal)
    bal.service_del(SVC)
    assert not bal.services and not bal._slots_used and not bal._ids_used
    la = ipaddress.ip_address("192.168.100.200")
    assert ("local_del", (la,)) not in bal.dp.calls and la in bal.retired_laddrs  # while its flows last
    assert bal.release_laddrs({la}) == [] and bal.release_laddrs(set()) == [la]  # (the sweep found none)
    assert ("local_del", (la,)) in bal.dp.calls


def test_edit_changes_only_what_it_mentions(bal):
    quick_start(bal)
    bal.service_edit(dict(SVC, sched="wrr"))
    bal.service_edit(dict(SVC, netmask="255.255.255.0"))
    svc = bal.get_service(SVC)
    assert (svc.sched, svc.netmask) == ("wrr", "255.255.255.0")


def test_route_delete_by_prefix_alone(bal):
    bal.route_add({"prefix": "172.0.0.0", "prefixlen": 16, "ifname": "eth1"})
    bal.route_del({"prefix": "172.0.0.0", "prefixlen": 16, "ifname": None})
    assert not bal.routes


def test_route_delete_with_a_metric_removes_that_metric_and_without_one_the_lowest(bal):
    """`dpip route del P metric 0` with routes of metric 10 (added first) and 0 removed the metric-10 one: a metric
    of 0 was read as no metric given, and the first route added went. A metric given, 0 included, names the route;
    without one the lowest metric goes, the one in use, as `ip route del` takes the first of its sorted list."""
    bal.route_add({"prefix": "172.16.0.0", "prefixlen": 16, "ifname": "eth0", "via": "10.0.0.1", "metric": 10})
    bal.route_add({"prefix": "172.16.0.0", "prefixlen": 16, "ifname": "eth0", "via": "10.0.0.2"})
    bal.route_del({"prefix": "172.16.0.0", "prefixlen": 16, "ifname": None, "metric": 0})
    assert [(str(r.via), r.metric) for r in bal.routes] == [("10.0.0.1", 10)]
    with pytest.raises(HdslbError) as e:
        bal.route_del({"prefix": "172.16.0.0", "prefixlen": 16, "ifname": None, "metric": 0})
    assert (e.value.errno, e.value.message) == (errno.ESRCH, "route 172.16.0.0/16 metric 0 not found")
    bal.route_add({"prefix": "172.16.0.0", "prefixlen": 16, "ifname": "eth0", "via": "10.0.0.2", "metric": 5})
    bal.route_del({"prefix": "172.16.0.0", "prefixlen": 16, "ifname": None})
    assert [(str(r.via), r.metric) for r in bal.routes] == [("10.0.0.1", 10)]


def test_snapshot_restore_keeps_ids_slots_and_rewrites_the_maps(bal):
    from hdslb.balancer import restore, snapshot

    quick_start(bal)
    bal.neigh_add({"addr": "192.168.100.2", "lladdr": "02:00:00:00:00:02", "ifname": "eth1"})
    bal.dest_del({"svc": SVC, "addr": "192.168.100.2", "port": 80})  # leaves a hole at slot 0
    snap = snapshot(bal)
    other = Balancer(Recorder(), bal.ifaces)
    restore(other, snap)
    assert snapshot(other) == snap
    d = other.get_service(SVC).dests[(ipaddress.ip_address("192.168.100.3"), 80)]
    assert d.slot == 1
    written = {c[0] for c in other.dp.calls}
    assert {"service_set", "dest_set", "sched_set", "laddrs_set", "local_set", "route_set", "neigh_set"} <= written
    # new objects get free ids, never ones the restored state holds: a never-used one first (slot 0 may still be
    # named by the removed server's flows), the hole once nothing else is left
    assert other.dest_add({"svc": SVC, "addr": "192.168.100.9", "port": 80}).slot == 2
    other.max_dests = 3
    assert other.dest_add({"svc": SVC, "addr": "192.168.100.10", "port": 80}).slot == 0


def test_restore_refuses_a_missing_interface(bal):
    from hdslb.balancer import restore, snapshot

    quick_start(bal)
    snap = snapshot(bal)
    other = Balancer(Recorder(), {"eth0": bal.ifaces["eth0"]})
    with pytest.raises(HdslbError) as e:
        restore(other, snap)
    assert e.value.errno == errno.ENODEV and not other.services


@pytest.mark.parametrize("mask", ["0.0.0.255", "255.0.255.0", "٢٤", "/²"])
def test_persistence_mask_must_be_contiguous_and_ascii(mask):
    """ipaddress reads 0.0.0.255 as a host mask (/24) and str.isdigit takes other scripts' digits: both refused,
    for ipvsadm -M and the config alike (they reach the model as text)."""
    from hdslb.balancer import netmask_plen

    with pytest.raises(HdslbError) as e:
        netmask_plen(mask, 4)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("how", ["health", "drain", "overload"])
def test_sh_server_out_of_service_moves_only_its_clients(bal, how):
    """-s sh with 4 servers: one failing its check, drained to weight 0, or over its upper threshold must not
    move the clients of the other three (LVS sh-fallback); back in service, the table is as before. (A drain
    keeps the layout when the weights are 1, as in LVS, where a weight-0 server holds one bucket in a row.)"""
    w = 1 if how == "drain" else 2
    bal.service_add(dict(SVC, sched="sh", flags=["sh-fallback"]))
    for i in range(4):
        bal.dest_add({"svc": SVC, "addr": f"192.168.100.{i + 2}", "port": 80, "fwd": "fnat", "weight": w,
                      "u_threshold": 10 if how == "overload" else 0})
    before = list(last_table(bal).entries)
    gone = 2  # slot of 192.168.100.4
    rs = {"svc": SVC, "addr": "192.168.100.4", "port": 80}
    bal.conn_counts = lambda: {}
    if how == "health":
        bal.dest_health(rs, False, None, "connection refused")
    elif how == "drain":
        bal.dest_edit(dict(rs, weight=0))
    else:
        bal.conn_counts = lambda: {gone: (10, 0)}
        bal.refresh_dynamic()
    during = last_table(bal).entries
    assert gone not in during
    assert all(a == b for a, b in zip(before, during) if a != gone)
    if how == "health":
        bal.dest_health(rs, True, None, "")
    elif how == "drain":
        bal.dest_edit(dict(rs, weight=w))
    else:
        bal.conn_counts = lambda: {gone: (0, 0)}
        bal.refresh_dynamic()
    assert last_table(bal).entries == before


def test_changing_the_scheduler_drops_the_old_one_s_flags_and_table_parameters(bal):
    """`ipvsadm -E -t VIP:80 -s rr` on a `-s sh --sched-flags sh-port,size=512` service was refused ("scheduler
    flag sh-port is for scheduler sh, not rr"): the edit kept flags and table parameters the new scheduler
    does not have. They belong to the scheduler being replaced; what the edit names still counts."""
    bal.service_add(dict(SVC, sched="sh", flags=["sh-port", "sh-fallback"], sched_params={"size": 512}))
    bal.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80, "fwd": "fnat"})
    svc = bal.service_edit(dict(SVC, sched="rr"))
    assert (svc.sched, svc.flags, svc.sched_params) == ("rr", [], {})
    assert last_table(bal).entries == [0] and svc.hcells is None  # the sh table's cells are free again
    svc = bal.service_edit(dict(SVC, sched="mh", sched_params={"size": 251}))
    assert (svc.flags, svc.sched_params, len(last_table(bal))) == ([], {"size": 251}, 251)
    svc = bal.service_edit(dict(SVC, sched="sh"))  # mh's size=251 is not sh's: sh's default table
    assert (svc.sched_params, len(last_table(bal))) == ({}, 256)
    svc = bal.service_edit(dict(SVC, persistent=60))  # an edit that keeps the scheduler keeps its options
    bal.service_edit(dict(SVC, flags=["sh-port"]))
    assert bal.service_edit(dict(SVC, persistent=30)).flags == ["sh-port"]
    before = copy.deepcopy((svc.sched, svc.flags, svc.sched_params, bal.dp.calls))
    with pytest.raises(HdslbError, match="sh-port is for scheduler sh, not mh"):
        bal.service_edit(dict(SVC, sched="mh", flags=["sh-port"]))  # named in the edit: refused, nothing changes
    assert (svc.sched, svc.flags, svc.sched_params, bal.dp.calls) == before


# ---------------------------------------------------------------- health verdicts in a burst

MH = {"proto": "tcp", "addr": "10.0.0.101", "port": 80}


def mh_pool(b, n=8):
    b.service_add(dict(MH, sched="mh", sched_params={"size": 4093}, persistent=60))
    for i in range(n):
        b.dest_add({"svc": MH, "addr": f"192.168.7.{1 + i}", "port": 80, "fwd": "fnat"})
    return b.get_service(MH)


def verdict(i, up, weight=None):
    return ({"svc": MH, "addr": f"192.168.7.{1 + i}", "port": 80}, up, weight, "" if up else "TCP_CHECK: refused")


BURST = [verdict(0, False), verdict(3, False), verdict(5, False), verdict(3, True, 4), verdict(6, False),
         verdict(7, True, 3)]


def calls_for(b, name, svc, since=0):
    return [i for i, c in enumerate(b.dp.calls) if i >= since and c[0] == name
            and (c[1][0] is svc if name == "sched_set" else c[1][0] == svc.svc_id)]


def counting_builds(monkeypatch):
    """Count the scheduling tables built (hdslb.sched.build_table: what an mh/conhash verdict costs)."""
    from hdslb import sched

    built = []
    real = sched.build_table
    monkeypatch.setattr(sched, "build_table", lambda name, *a, **kw: (built.append(name), real(name, *a, **kw))[1])
    return built


def test_a_burst_of_health_verdicts_builds_the_mh_table_once_as_one_by_one_would_end(bal, monkeypatch):
    svc = mh_pool(bal)
    one = Balancer(Recorder(), bal.ifaces)
    mh_pool(one)
    for v in BURST:
        one.dest_health(*v)
    n = len(bal.dp.calls)
    built = counting_builds(monkeypatch)
    out = bal.dest_health_many(BURST)
    assert [type(r).__name__ for r in out] == ["Dest"] * len(BURST)
    assert built == ["mh"]  # one by one: 6 builds
    assert len(calls_for(bal, "sched_set", svc, n)) == 1
    assert [c[0] for c in bal.dp.calls[n:]].count("hash_cells_set") == 1
    assert last_table(bal).entries == last_table(one).entries
    assert [(d.health, d.eff_weight) for d in svc.dests.values()] == \
        [(d.health, d.eff_weight) for d in one.get_service(MH).dests.values()]


def test_a_burst_flushes_the_down_servers_templates_after_the_table_no_longer_holds_them(bal):
    svc = mh_pool(bal)
    n = len(bal.dp.calls)
    bal.dest_health_many(BURST)
    table = calls_for(bal, "sched_set", svc, n)[0]
    slots = {d.slot for d in svc.dests.values()}
    flushed = calls_for(bal, "persist_flush", svc, n)
    down = [svc.dests[(ipaddress.ip_address(f"192.168.7.{1 + i}"), 80)].slot for i in (0, 3, 5, 6)]
    assert sorted(bal.dp.calls[i][1][1] for i in flushed) == sorted(down) and set(down) <= slots
    assert all(i > table for i in flushed)  # after the table without them, as dest_del in a batch


def test_a_burst_drops_a_verdict_for_a_server_removed_meanwhile(bal):
    svc = mh_pool(bal)
    bal.dest_del({"svc": MH, "addr": "192.168.7.4", "port": 80})
    n = len(bal.dp.calls)
    out = bal.dest_health_many(BURST)
    assert isinstance(out[1], HdslbError) and out[1].errno == errno.ENOENT and isinstance(out[3], HdslbError)
    assert [type(r).__name__ for i, r in enumerate(out) if i not in (1, 3)] == ["Dest"] * 4
    assert len(calls_for(bal, "sched_set", svc, n)) == 1
    assert sum(d.health == "down" for d in svc.dests.values()) == 3


def test_a_burst_whose_table_cannot_be_built_gets_its_verdicts_one_by_one(bal):
    """rr rings hold ring_max servers: a burst ending with three up cannot be built; one by one, the last verdict
    alone is refused, as it would have been without the burst."""
    b = Balancer(Recorder(), bal.ifaces, ring_max=2)
    b.service_add(dict(SVC, sched="rr", persistent=60))
    rs = [{"svc": SVC, "addr": f"192.168.100.{i}", "port": 80, "fwd": "fnat"} for i in (2, 3, 4)]
    b.dest_add(rs[0])
    b.dest_add(rs[1])
    b.dest_health(rs[0], False, None, "down")
    b.dest_add(rs[2])
    svc = b.get_service(SVC)
    n = len(b.dp.calls)
    out = b.dest_health_many([(rs[1], False, None, "down"), (rs[0], True, None, ""), (rs[1], True, None, "")])
    assert [isinstance(r, HdslbError) for r in out] == [False, False, True]
    assert "rr: 3 real servers" in out[2].message
    assert [d.health for d in svc.dests.values()] == ["up", "down", "up"]
    assert sorted(last_table(b).entries) == sorted(svc.dests[(ipaddress.ip_address(f"192.168.100.{i}"), 80)].slot
                                                   for i in (2, 4))
    b3 = svc.dests[(ipaddress.ip_address("192.168.100.3"), 80)].slot
    flushed = calls_for(b, "persist_flush", svc, n)
    assert [b.dp.calls[i][1][1] for i in flushed] == [b3]  # once, by its own verdict, not twice


def test_health_verdicts_in_a_caller_s_batch_build_its_tables_at_its_end(bal, monkeypatch):
    svc = mh_pool(bal)
    built = counting_builds(monkeypatch)
    n = len(bal.dp.calls)
    with bal.deferred():
        for v in BURST:
            bal.dest_health(*v)
        assert built == [] and calls_for(bal, "sched_set", svc, n) == []
        assert calls_for(bal, "persist_flush", svc, n) == []
    assert built == ["mh"] and len(calls_for(bal, "persist_flush", svc, n)) == 4


def test_a_service_named_op_after_op_is_parsed_once_and_odd_spellings_are_still_refused(bal, monkeypatch):
    """A bulk load names the same service in each of its real servers' ops (ipvsadm -R: 3 parses of its address
    per line): the last service's key is remembered for the exact same str/str/int spelling. True == 1 in Python,
    so a boolean port must not hit that memory: it is refused as before."""
    import hdslb.balancer as balancer

    bal.service_add(dict(SVC, sched="rr"))
    parsed = []
    real_ip = balancer.ip
    monkeypatch.setattr(balancer, "ip", lambda v, what="address": parsed.append(what) or real_ip(v, what))
    for i in range(10):
        bal.dest_add({"svc": dict(SVC), "addr": f"192.168.100.{i + 2}", "port": 80})
    assert parsed.count("service address") <= 1 and parsed.count("real server address") == 10
    for bad in (dict(SVC, port=True), dict(SVC, port=80.0), dict(SVC, proto="tcp ")):
        with pytest.raises(HdslbError):
            bal.svc_key(bad)
    assert bal.svc_key(dict(SVC, addr="10.0.0.101"))[1] == ipaddress.ip_address("10.0.0.101")
    assert bal.get_service(dict(SVC)).port == 80


def test_a_local_address_cannot_be_the_vip_or_a_real_server(bal):
    """FullNAT's source toward the real servers: the VIP there made 2 of 3 new connections hang in SYN_RECV (the
    servers' replies to the VIP were taken for new client traffic), a real server's address all of those to it."""
    quick_start(bal)
    before = snapshot_of(bal)
    for addr, says in (("10.0.0.100", "is the service's VIP"), ("192.168.100.2", "is a real server")):
        with pytest.raises(HdslbError) as e:
            bal.laddr_add({"svc": SVC, "addr": addr, "ifname": "eth1"})
        assert e.value.errno == errno.EINVAL and says in e.value.message
    with pytest.raises(HdslbError, match="is a local address of this service"):
        bal.dest_add({"svc": SVC, "addr": "192.168.100.200", "port": 80, "fwd": "fnat"})
    assert snapshot_of(bal) == before


def snapshot_of(b):
    from hdslb.balancer import snapshot

    return snapshot(b)


def test_neigh_del_with_a_device_removes_only_that_devices_entry(bal):
    """`dpip neigh del ADDR dev IF` (REST DELETE /v2/neigh with device) names the interface: the static entry of
    another interface stays, and an interface the balancer does not run on is refused as neigh add refuses it.
    Before, the device was ignored: `neigh del 192.168.100.2 dev nosuch0` (or `dev eth0` for an eth1 entry)
    removed the entry and exited 0."""
    bal.neigh_add({"addr": "192.168.100.2", "lladdr": "02:00:00:00:00:02", "ifname": "eth1"})
    with pytest.raises(HdslbError) as e:
        bal.neigh_del({"addr": "192.168.100.2", "ifname": "eth0"})
    assert e.value.errno == errno.ENOENT and "on eth1" in e.value.message
    with pytest.raises(HdslbError) as e:
        bal.neigh_del({"addr": "192.168.100.2", "ifname": "nosuch0"})
    assert e.value.errno == errno.ENODEV
    assert ipaddress.ip_address("192.168.100.2") in bal.neighs
    bal.neigh_del({"addr": "192.168.100.2", "ifname": "eth1"})
    assert ipaddress.ip_address("192.168.100.2") not in bal.neighs
    bal.neigh_add({"addr": "192.168.100.2", "lladdr": "02:00:00:00:00:02", "ifname": "eth1"})
    bal.neigh_del({"addr": "192.168.100.2"})  # no device: the address's entry, wherever it is
    assert ipaddress.ip_address("192.168.100.2") not in bal.neighs
