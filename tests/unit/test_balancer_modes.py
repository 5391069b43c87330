"""The model for every forwarding mode, scheduler, persistence and thresholds: what each mode allows, the hash
cell allocator and its write-swap-free order, SNAT rule ordering, templates, overload, restarts."""

import copy
import errno
import ipaddress

import pytest

from hdslb import sched
from hdslb.balancer import (SNAT_RULES_MAX, Balancer, CellAllocator, Dest, Iface, overload_next, restore,
                            snapshot)
from hdslb.errors import HdslbError

from .test_balancer import Recorder

A = ipaddress.ip_address
SVC = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}
SVC6 = {"proto": "tcp", "addr": "2001:db8::100", "port": 80}
MATCH = {"proto": "tcp", "src_range": "192.168.100.1-192.168.100.254", "oif": "eth0"}


def make(max_hash_cells=1 << 21):
    ifaces = {"eth0": Iface("eth0", 2, b"\x02" * 6, 1500), "eth1": Iface("eth1", 3, b"\x04" * 6, 1500)}
    return Balancer(Recorder(), ifaces, max_hash_cells=max_hash_cells)


@pytest.fixture
def bal():
    return make()


def calls(b, *names):
    return [c for c in b.dp.calls if c[0] in names]


def frozen(b):
    """Everything a refused op must leave as it was."""
    return (copy.deepcopy(b.services), copy.deepcopy(b.addrs), copy.deepcopy(b.cells.runs), set(b._slots_used),
            set(b._ids_used), list(b.snat_order), len(b.dp.calls))


# --- the hash cell allocator ------------------------------------------------------------------------
def test_allocator_first_fit_free_merge_and_fragmentation():
    c = CellAllocator(1000)
    a, b_, d = c.alloc(100), c.alloc(200), c.alloc(300)
    assert (a, b_, d) == (0, 100, 300) and c.free_cells() == 400
    c.free(100, 200)  # a hole in the middle
    assert c.runs == [[100, 200], [600, 400]]
    assert c.alloc(150) == 100, "first fit takes the hole"
    assert c.alloc(250) == 600, "too big for what is left of the hole"
    assert c.largest() == 150 and c.free_cells() == 200
    with pytest.raises(HdslbError) as e:
        c.alloc(151)  # 200 free in total, but not in one piece
    assert e.value.errno == errno.ENOSPC and "contiguous" in e.value.message
    c.free(0, 100)
    c.free(100, 150)
    assert c.runs[0] == [0, 300], "neighbouring runs merge on both sides"
    with pytest.raises(RuntimeError):
        c.free(10, 5)  # already free
    c2 = CellAllocator(100)
    c2.reserve(40, 20)
    assert c2.runs == [[0, 40], [60, 40]]
    with pytest.raises(HdslbError):
        c2.reserve(50, 20)  # overlaps what is taken


def test_hash_table_is_written_then_swapped_then_old_cells_freed(bal):
    bal.service_add(dict(SVC, sched="mh", sched_params={"size": 251}))
    for i in range(3):
        bal.dest_add({"svc": SVC, "addr": f"192.168.100.{i + 2}", "port": 80})
    svc = bal.get_service(SVC)
    old = svc.hcells
    bal.dp.calls.clear()
    bal.dest_add({"svc": SVC, "addr": "192.168.100.9", "port": 80})
    names = [c[0] for c in bal.dp.calls]
    assert names == ["dest_set", "hash_cells_set", "sched_set"]
    (_, (first, entries)), (_, (_, table, hoff)) = bal.dp.calls[1], bal.dp.calls[2]
    assert hoff == first and entries == table.entries and len(entries) == 251
    assert table.kind == sched.HASH and table.key == sched.KEY_SRC
    # the new table went to other cells than the live one, which are free only now
    assert first != old[0] and svc.hcells == (first, 251)
    assert [old[0], 251] in bal.cells.runs or any(r[0] <= old[0] < r[0] + r[1] for r in bal.cells.runs)
    # the table is what the fast path must compute: a flow's bucket is Table.hash_pick
    assert set(entries) == {d.slot for d in svc.dests.values()}


def test_ring_and_empty_tables_use_no_cells_and_switching_frees_them(bal):
    bal.service_add(dict(SVC, sched="sh"))
    assert bal.get_service(SVC).hcells is None, "no dest: an empty table, no cells"
    bal.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80})
    assert bal.get_service(SVC).hcells == (0, 256)
    bal.service_edit(dict(SVC, sched="rr"))
    assert bal.get_service(SVC).hcells is None and bal.cells.free_cells() == bal.cells.size
    t = calls(bal, "sched_set")[-1][1][1]
    assert (t.kind, t.entries) == (sched.RING, [0])


def test_a_new_table_must_leave_room_for_a_rebuild():
    b = make(max_hash_cells=800)
    for port in (80, 81):
        b.service_add({"proto": "tcp", "addr": "10.0.0.1", "port": port, "sched": "sh"})
        b.dest_add({"svc": {"proto": "tcp", "addr": "10.0.0.1", "port": port}, "addr": "192.168.100.2"})
    # 512 of 800 used: a third 256-cell table would fit, but then no table could ever be rebuilt
    third = {"proto": "tcp", "addr": "10.0.0.1", "port": 82}
    b.service_add(dict(third, sched="rr"))
    b.dest_add({"svc": third, "addr": "192.168.100.2"})
    before = frozen(b)
    with pytest.raises(HdslbError) as e:
        b.service_edit(dict(third, sched="sh"))
    assert e.value.errno == errno.ENOSPC and "room to rebuild" in e.value.message
    assert frozen(b) == before
    # the two live tables can still be rebuilt, any number of times
    for i in range(5):
        b.dest_add({"svc": {"proto": "tcp", "addr": "10.0.0.1", "port": 80}, "addr": f"192.168.100.{10 + i}"})
    assert b.cells.free_cells() == 800 - 512


def test_a_table_that_cannot_be_built_changes_nothing(bal):
    quick = dict(SVC, sched="mh")
    before = frozen(bal)
    with pytest.raises(HdslbError) as e:
        bal.service_add(dict(quick, sched_params={"size": 1000}))  # not a prime
    assert e.value.errno == errno.EINVAL and "prime" in e.value.message
    assert frozen(bal) == before
    with pytest.raises(HdslbError) as e:
        bal.service_add(dict(quick, sched_params={"size": 1 << 22}))  # more than hash_cells holds
    assert e.value.errno == errno.EINVAL
    assert frozen(bal) == before


@pytest.mark.parametrize("name,key,port", [("sh", sched.KEY_SRC, False), ("dh", sched.KEY_DST, False),
                                           ("mh", sched.KEY_SRC_PORT, True), ("conhash", sched.KEY_SRC, False),
                                           ("wlc", sched.KEY_NONE, False), ("fo", sched.KEY_NONE, False)])
def test_every_scheduler_builds(bal, name, key, port):
    bal.service_add(dict(SVC, sched=name, flags=["mh-port"] if port else [],
                         sched_params={"size": 4093} if name in ("mh", "conhash") else {}))
    bal.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80, "weight": 2})
    bal.dest_add({"svc": SVC, "addr": "192.168.100.3", "port": 80})
    t = calls(bal, "sched_set")[-1][1][1]
    assert t.sched == name and t.key == key and set(t.entries) <= {0, 1}


def test_sched_flags_belong_to_their_scheduler(bal):
    with pytest.raises(HdslbError) as e:
        bal.service_add(dict(SVC, sched="sh", flags=["mh-port"]))
    assert e.value.errno == errno.EINVAL and "for scheduler mh" in e.value.message
    with pytest.raises(HdslbError):
        bal.service_add(dict(SVC, sched="rr", sched_params={"size": 7}))
    bal.service_add(dict(SVC, sched="sh", flags=["sh-port", "sh-fallback"]))
    assert calls(bal, "sched_set")[-1][1][1].key == sched.KEY_SRC_PORT


# --- what each forwarding method allows -------------------------------------------------------------
def with_dests(b):
    b.addr_add({"addr": "203.0.113.1", "prefixlen": 24, "ifname": "eth0", "sapool": True})
    b.addr_add({"addr": "203.0.113.2", "prefixlen": 32, "ifname": "eth0"})
    b.service_add(dict(SVC, sched="rr"))
    b.service_add(dict(SVC6, sched="rr"))
    b.service_add({"match": MATCH, "sched": "rr"})


@pytest.mark.parametrize("args,err,why", [
    ({"svc": SVC, "addr": "192.168.100.2", "port": 8080, "fwd": "dr"}, errno.EINVAL, "cannot rewrite ports"),
    ({"svc": SVC, "addr": "192.168.100.2", "port": 8080, "fwd": "tunnel"}, errno.EINVAL, "cannot rewrite ports"),
    ({"svc": SVC, "addr": "2001:db8::2", "port": 80, "fwd": "fnat"}, errno.EOPNOTSUPP, "NAT46"),
    # not "needs FullNAT (-b)", which -b then refuses: NAT46 is the reason whatever the method
    ({"svc": SVC, "addr": "2001:db8::2", "port": 80, "fwd": "nat"}, errno.EOPNOTSUPP, "NAT46"),
    ({"svc": SVC6, "addr": "192.168.100.2", "port": 80, "fwd": "dr"}, errno.EOPNOTSUPP, "needs FullNAT"),
    ({"svc": SVC6, "addr": "192.168.100.2", "port": 80, "fwd": "nat"}, errno.EOPNOTSUPP, "needs FullNAT"),
    ({"svc": SVC, "addr": "192.168.100.2", "port": 80, "fwd": "snat"}, errno.EINVAL, "belong to SNAT match"),
    ({"svc": {"match": MATCH}, "addr": "203.0.113.1", "port": 0, "fwd": "fnat"}, errno.EINVAL, "SNAT real servers only"),
    ({"svc": {"match": MATCH}, "addr": "203.0.113.2", "port": 0}, errno.EADDRNOTAVAIL, "sapool"),
    ({"svc": {"match": MATCH}, "addr": "203.0.113.1", "port": 80}, errno.EINVAL, "ADDR:0"),
    ({"svc": {"match": MATCH}, "addr": "2001:db8::1", "port": 0}, errno.EOPNOTSUPP, "IPv4 only"),
    ({"svc": SVC, "addr": "192.168.100.2", "port": 80, "u_threshold": 5, "l_threshold": 9}, errno.ERANGE, "-y"),
    ({"svc": SVC, "addr": "192.168.100.2", "port": 80, "fwd": "bogus"}, errno.EINVAL, "forwarding method"),
])
def test_dest_refusals_per_mode_change_nothing(bal, args, err, why):
    with_dests(bal)
    before = frozen(bal)
    with pytest.raises(HdslbError) as e:
        bal.dest_add(args)
    assert e.value.errno == err and why in e.value.message, e.value.message
    assert frozen(bal) == before


def test_every_mode_is_accepted_where_it_makes_sense(bal):
    with_dests(bal)
    for fwd, addr, port in (("fnat", "192.168.100.2", 8080), ("dr", "192.168.100.3", 80),
                            ("nat", "192.168.100.4", 8081), ("tunnel", "192.168.100.5", 0)):
        d = bal.dest_add({"svc": SVC, "addr": addr, "port": port, "fwd": fwd})
        assert (d.fwd, d.port) == (fwd, port or 80)
    src = bal.dest_add({"svc": {"match": MATCH}, "addr": "203.0.113.1", "port": 0})
    route_src = bal.dest_add({"svc": {"match": MATCH}, "addr": "0.0.0.0"})
    assert (src.fwd, src.port, route_src.port) == ("snat", 0, 0)
    written = {c[1][1].addr: c[1][1].fwd for c in calls(bal, "dest_set")}
    assert written[A("192.168.100.5")] == "tunnel" and written[A("0.0.0.0")] == "snat"


def test_nat64_is_fnat_behind_an_ipv6_vip_with_ipv4_throughout(bal):
    bal.service_add(dict(SVC6, sched="rr"))
    bal.dest_add({"svc": SVC6, "addr": "192.168.100.2", "port": 80, "fwd": "fnat"})
    bal.laddr_add({"svc": SVC6, "addr": "192.168.100.200", "ifname": "eth1"})  # v4 laddrs: NAT64
    for args in ({"svc": SVC6, "addr": "2001:db8::2", "port": 80, "fwd": "fnat"},
                 {"svc": SVC6, "addr": "2001:db8::3", "port": 80, "fwd": "dr"}):
        with pytest.raises(HdslbError) as e:
            bal.dest_add(args)
        assert "IPv4" in e.value.message
    with pytest.raises(HdslbError) as e:
        bal.laddr_add({"svc": SVC6, "addr": "2001:db8::200", "ifname": "eth1"})
    assert e.value.errno == errno.EOPNOTSUPP
    # the dest cannot be edited away from FullNAT while it crosses families
    with pytest.raises(HdslbError):
        bal.dest_edit({"svc": SVC6, "addr": "192.168.100.2", "port": 80, "fwd": "nat"})
    # an IPv4 service never takes IPv6 local addresses
    bal.service_add(dict(SVC, sched="rr"))
    with pytest.raises(HdslbError) as e:
        bal.laddr_add({"svc": SVC, "addr": "2001:db8::200", "ifname": "eth1"})
    assert e.value.errno == errno.EOPNOTSUPP


def test_tunnel_outer_source_is_the_route_src_else_the_first_laddr(bal):
    bal.service_add(dict(SVC, sched="rr"))
    d = bal.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80, "fwd": "tunnel"})
    svc = bal.get_service(SVC)
    assert bal.tunnel_source(svc, d) is None
    assert "drop_no_src" in bal.dest_warnings(svc, d)[0]
    bal.laddr_add({"svc": SVC, "addr": "192.168.100.200", "ifname": "eth1"})
    assert bal.tunnel_source(svc, d) == A("192.168.100.200") and not bal.dest_warnings(svc, d)
    # `dpip route add 192.168.100.0/24 dev eth1 src 192.168.100.254` wins, and reaches route_val.src
    bal.route_add({"prefix": "192.168.100.0", "prefixlen": 24, "ifname": "eth1", "src": "192.168.100.254"})
    assert bal.tunnel_source(svc, d) == A("192.168.100.254")
    r = calls(bal, "route_set")[-1][1][0]
    assert r.src == A("192.168.100.254")


def test_dr_warns_when_the_server_is_not_on_a_connected_network(bal):
    bal.service_add(dict(SVC, sched="rr"))
    bal.route_add({"prefix": "172.16.0.0", "prefixlen": 16, "ifname": "eth1", "via": "192.168.100.1"})
    d = bal.dest_add({"svc": SVC, "addr": "172.16.0.2", "port": 80, "fwd": "dr"})
    assert "via 192.168.100.1" in bal.dest_warnings(bal.get_service(SVC), d)[0]


def test_services_refuse_what_the_fast_path_cannot_do(bal):
    for args, err in ((dict(SVC, port=0), errno.EINVAL),
                      (dict(SVC, port=0, persistent=300), errno.EOPNOTSUPP),
                      ({"match": dict(MATCH, src_range="2001:db8::1-2001:db8::9")}, errno.EOPNOTSUPP),
                      ({"match": dict(MATCH, src_range="10.0.0.1:80-90")}, errno.EOPNOTSUPP),
                      ({"match": dict(MATCH, src_range="10.0.0.9-10.0.0.1")}, errno.EINVAL),
                      ({"match": dict(MATCH, proto="sctp")}, errno.EINVAL),
                      ({"match": dict(MATCH, oif="nope0")}, errno.ENODEV),
                      ({"match": MATCH, "persistent": 300}, errno.EOPNOTSUPP),
                      (dict(SVC, persistent=86400 * 32), errno.EINVAL),
                      (dict(SVC, persistent=60, netmask="255.0.255.0"), errno.EINVAL)):
        before = frozen(bal)
        with pytest.raises(HdslbError) as e:
            bal.service_add(args)
        assert e.value.errno == err, (args, e.value.message)
        assert frozen(bal) == before


# --- SNAT rules ---------------------------------------------------------------------------------------
def snat_calls(b):
    return [(c[0], c[1][0] if c[0] == "snat_count_set" else c[1][0],
             c[1][1].match.src[0].packed[-1] if c[0] == "snat_rule_set" else None)
            for c in calls(b, "snat_rule_set", "snat_rule_clear", "snat_count_set")]


def add_snat(b, last_octet):
    m = dict(MATCH, src_range=f"192.168.{last_octet}.1-192.168.{last_octet}.254")
    b.service_add({"match": m, "sched": "rr"})
    return {"match": m}


def test_snat_rules_grow_entry_first_and_shrink_without_losing_a_live_rule(bal):
    s1, s2, s3 = (add_snat(bal, n) for n in (1, 2, 3))
    assert snat_calls(bal) == [("snat_rule_set", 0, 1), ("snat_count_set", 1, None),
                               ("snat_rule_set", 1, 1), ("snat_count_set", 2, None),
                               ("snat_rule_set", 2, 1), ("snat_count_set", 3, None)]
    assert [s.match.src[0] for s in bal.snat_order] == [A("192.168.1.1"), A("192.168.2.1"), A("192.168.3.1")]
    bal.dp.calls.clear()
    bal.service_del(s2)
    # the rule moves down before the count drops; the stale tail is cleared once it is no longer counted; the
    # service's tables go only after its rule
    names = [c[0] for c in bal.dp.calls]
    assert names[:4] == ["snat_rule_set", "snat_count_set", "snat_rule_clear", "service_del"]
    assert bal.dp.calls[0][1][0] == 1 and bal.dp.calls[0][1][1].match.src[0] == A("192.168.3.1")
    assert bal.dp.calls[1][1] == (2,) and bal.dp.calls[2][1] == (2,)
    assert [s.match.src[0] for s in bal.snat_order] == [A("192.168.1.1"), A("192.168.3.1")]
    # the last one: no move, just the count and the clear
    bal.dp.calls.clear()
    bal.service_del(s3)
    assert [c[0] for c in bal.dp.calls][:2] == ["snat_count_set", "snat_rule_clear"]
    s4 = add_snat(bal, 4)
    assert bal.snat_order[-1].key == bal.get_service(s4).key, "creation order"
    assert bal.get_service(s1).match.src[0] == A("192.168.1.1")


def test_snat_rule_capacity(bal):
    for n in range(SNAT_RULES_MAX):
        add_snat(bal, n)
    before = frozen(bal)
    with pytest.raises(HdslbError) as e:
        add_snat(bal, 99)
    assert e.value.errno == errno.ENOSPC and frozen(bal) == before


def test_snat_match_is_the_identity_and_its_sources_are_sapool_addresses(bal):
    bal.addr_add({"addr": "203.0.113.1", "prefixlen": 24, "ifname": "eth0", "sapool": True})
    bal.service_add({"match": MATCH, "sched": "sh"})
    # the same match however it is spelt
    same = {"proto": "tcp", "src-range": "192.168.100.1-192.168.100.254:0-0", "oif": "eth0", "iif": ""}
    with pytest.raises(HdslbError) as e:
        bal.service_add({"match": same})
    assert e.value.errno == errno.EEXIST
    bal.dest_add({"svc": {"match": same}, "addr": "203.0.113.1", "port": 0})
    # a source address in use cannot be deleted from under the service
    with pytest.raises(HdslbError) as e:
        bal.addr_del({"addr": "203.0.113.1"})
    assert e.value.errno == errno.EBUSY
    with pytest.raises(HdslbError):
        bal.addr_flush({"ifname": "eth0"})
    assert [str(a.addr) for a in bal.addrs] == ["203.0.113.1"]
    bal.dest_del({"svc": {"match": MATCH}, "addr": "203.0.113.1", "port": 0})
    bal.addr_del({"addr": "203.0.113.1"})
    with pytest.raises(HdslbError):
        bal.laddr_add({"svc": {"match": MATCH}, "addr": "203.0.113.9", "ifname": "eth0"})


@pytest.mark.parametrize("rng,err,why", [
    ("2001:db8::1", errno.EOPNOTSUPP, "IPv4 only"),  # was "port ranges are not supported": split at its first colon
    ("2001:db8::1-2001:db8::9", errno.EOPNOTSUPP, "IPv4 only"),
    ("::", errno.EOPNOTSUPP, "IPv4 only"),
    ("[2001:db8::1]:0", errno.EOPNOTSUPP, "IPv4 only"),
    ("10.0.0.1-10.0.0.9:80", errno.EOPNOTSUPP, "port ranges"),  # an IPv4 range with ports: still the port refusal
    ("10.0.0.1:x", errno.EOPNOTSUPP, "port ranges"),
])
@pytest.mark.parametrize("key", ["src_range", "dst_range"])
def test_a_snat_match_range_is_ipv4_only(bal, key, rng, err, why):
    before = frozen(bal)
    with pytest.raises(HdslbError) as e:
        bal.service_add({"match": {"proto": "tcp", key: rng}})
    assert e.value.errno == err and why in e.value.message, e.value.message
    assert frozen(bal) == before


def test_a_snat_match_range_may_end_in_the_any_port(bal):
    bal.service_add({"match": {"proto": "tcp", "src_range": "10.0.0.1-10.0.0.9:0-0"}})
    assert [str(s.match) for s in bal.snat_order] == ["proto=tcp,src-range=10.0.0.1-10.0.0.9"]


# --- persistence ------------------------------------------------------------------------------------
def test_persistence_reaches_the_service_entry_and_templates_go_with_their_server(bal):
    bal.service_add(dict(SVC, sched="rr", persistent=300, netmask="255.255.255.0"))
    svc = bal.get_service(SVC)
    assert (svc.persistent, svc.netmask, svc.persist_plen) == (300, "255.255.255.0", 24)
    assert calls(bal, "service_set")[-1][1][0] is svc
    d1 = bal.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80})
    bal.dest_add({"svc": SVC, "addr": "192.168.100.3", "port": 80})
    bal.dp.calls.clear()
    bal.dest_edit({"svc": SVC, "addr": "192.168.100.2", "port": 80, "weight": 0})  # drained: LVS keeps them
    assert not calls(bal, "persist_flush")
    bal.dest_health({"svc": SVC, "addr": "192.168.100.3", "port": 80}, False, None, "connect refused")
    assert calls(bal, "persist_flush") == [("persist_flush", (svc.svc_id, 1))]
    bal.dp.calls.clear()
    bal.dest_del({"svc": SVC, "addr": "192.168.100.2", "port": 80})
    names = [c[0] for c in bal.dp.calls]
    assert names == ["sched_set", "dest_clear", "persist_flush"], "table, slot, then its templates"
    assert calls(bal, "persist_flush")[0][1] == (svc.svc_id, d1.slot)
    # a new mask (or no persistence) voids every template of the service
    bal.dp.calls.clear()
    bal.service_edit(dict(SVC, netmask="255.255.0.0"))
    assert calls(bal, "persist_flush") == [("persist_flush", (svc.svc_id, None))] and svc.persist_plen == 16
    assert calls(bal, "service_set"), "the new mask reaches svc_map"
    bal.service_edit(dict(SVC, persistent=0))
    assert svc.persistent is None
    bal.dp.calls.clear()
    bal.service_del(SVC)
    assert calls(bal, "persist_flush") == [("persist_flush", (svc.svc_id, None))]


def test_a_new_persistence_timeout_alone_keeps_the_templates(bal):
    """ipvsadm -E -t VIP:PORT -p 600 (or a reload changing persistence_timeout) keeps every client on its server, as
    LVS's ip_vs_edit_service leaves templates alone: the new timeout reaches svc_map and renewals take it. Flushing
    them moved each persistent client to a server scheduled afresh (found in a netns lab: a client went rs1, rs2,
    rs1 over three -E -p edits). A new mask, or persistence turned off, still voids them."""
    bal.service_add(dict(SVC, sched="rr", persistent=300, netmask="255.255.255.0"))
    svc = bal.get_service(SVC)
    bal.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80})
    bal.dp.calls.clear()
    bal.service_edit(dict(SVC, persistent=600))
    assert svc.persistent == 600 and calls(bal, "service_set"), "the new timeout reaches svc_map"
    assert not calls(bal, "persist_flush")
    bal.service_edit(dict(SVC, netmask="24"))  # the same mask written as a prefix length
    assert not calls(bal, "persist_flush")
    bal.service_edit(dict(SVC, persistent=60, netmask="255.255.0.0"))
    assert calls(bal, "persist_flush") == [("persist_flush", (svc.svc_id, None))]
    bal.dp.calls.clear()
    bal.service_edit(dict(SVC, persistent=0))
    assert calls(bal, "persist_flush") == [("persist_flush", (svc.svc_id, None))]


def test_expire_quiescent_template_drops_templates_on_drain(bal):
    bal.expire_quiescent_template = True
    bal.service_add(dict(SVC, sched="rr", persistent=60))
    d = bal.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80})
    bal.dest_edit({"svc": SVC, "addr": "192.168.100.2", "port": 80, "weight": 0})
    assert calls(bal, "persist_flush")[-1][1] == (bal.get_service(SVC).svc_id, d.slot)


def test_ipv6_persistence_mask_is_a_prefix_length(bal):
    bal.service_add(dict(SVC6, persistent=60, netmask="64"))
    assert bal.get_service(SVC6).persist_plen == 64
    bal.service_add(dict(SVC6, port=81, persistent=60, netmask="128"))
    assert bal.get_service(dict(SVC6, port=81)).netmask is None, "the full mask is the default: not shown"


# --- thresholds -------------------------------------------------------------------------------------
def test_overload_follows_lvs():
    d = Dest(addr=A("10.0.0.2"), port=80, fwd="fnat", weight=1, slot=0, u_threshold=100, l_threshold=50)
    seq = []
    for total in (99, 100, 80, 50, 49, 100):
        d.overloaded = overload_next(d, total)
        seq.append(d.overloaded)
    assert seq == [False, True, True, True, False, True]
    d = Dest(addr=A("10.0.0.2"), port=80, fwd="fnat", weight=1, slot=0, u_threshold=8)  # no l: 3/4 of u
    seq = []
    for total in (8, 6, 5, 7):
        d.overloaded = overload_next(d, total)
        seq.append(d.overloaded)
    assert seq == [True, True, False, False]
    d.u_threshold = 0
    assert overload_next(d, 10**6) is False


def _overloaded(bal) -> list:
    return [(s, d) for s in bal.services.values() for d in s.dests.values() if d.overloaded]


def test_overloaded_servers_leave_the_table_until_they_fall_below(bal):
    bal.service_add(dict(SVC, sched="rr"))
    bal.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80, "u_threshold": 10, "l_threshold": 5})
    bal.dest_add({"svc": SVC, "addr": "192.168.100.3", "port": 80})
    counts = {0: (0, 0)}
    bal.conn_counts = lambda: counts
    n = len(calls(bal, "sched_set"))
    bal.refresh_dynamic()
    assert len(calls(bal, "sched_set")) == n, "nothing changed: no rebuild"
    counts[0] = (6, 4)  # active + inactive = 10: LVS's totalconns reaches u_threshold
    became = bal.refresh_dynamic()  # (what became overloaded: the daemon logs it)
    assert calls(bal, "sched_set")[-1][1][1].entries == [1] and _overloaded(bal) == became
    assert [(s.svc_id, d.slot) for s, d in became] == [(bal.get_service(SVC).svc_id, 0)]
    counts[0] = (3, 3)
    assert bal.refresh_dynamic() == []  # still overloaded: nothing new to say
    assert calls(bal, "sched_set")[-1][1][1].entries == [1], "6 is not below l_threshold 5"
    counts[0] = (2, 2)
    assert bal.refresh_dynamic() == []
    assert sorted(calls(bal, "sched_set")[-1][1][1].entries) == [0, 1] and not _overloaded(bal)
    # raising the upper threshold lifts an overload at once, as LVS's edit does
    counts[0] = (20, 0)
    assert len(bal.refresh_dynamic()) == 1
    assert _overloaded(bal)
    bal.dest_edit({"svc": SVC, "addr": "192.168.100.2", "port": 80, "u_threshold": 100, "l_threshold": 5})
    assert not _overloaded(bal) and sorted(calls(bal, "sched_set")[-1][1][1].entries) == [0, 1]


def test_a_refused_periodic_rebuild_keeps_the_old_table_and_says_why():
    b = make(max_hash_cells=600)
    b.service_add(dict(SVC, sched="sh"))
    b.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80, "u_threshold": 1})
    b.dest_add({"svc": SVC, "addr": "192.168.100.3", "port": 80})
    b.cells.alloc(b.cells.largest())  # something else took every free cell
    b.conn_counts = lambda: {0: (5, 0)}
    n = len(calls(b, "sched_set"))
    assert b.refresh_dynamic() == []
    svc = b.get_service(SVC)
    assert len(calls(b, "sched_set")) == n and not svc.dests[(A("192.168.100.2"), 80)].overloaded
    assert "contiguous" in b.refresh_errors[svc.svc_id]


# --- restarts and dry runs ----------------------------------------------------------------------------
def full_model(b):
    with_dests(b)
    b.service_edit(dict(SVC, sched="mh", sched_params={"size": 251}, persistent=60))
    b.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80, "fwd": "dr", "u_threshold": 9})
    b.dest_add({"svc": {"match": MATCH}, "addr": "203.0.113.1", "port": 0})
    add_snat(b, 7)


def test_snapshot_restore_keeps_cells_reserved_rebuilds_beside_them_and_rewrites_snat_rules(bal):
    full_model(bal)
    snap = snapshot(bal)
    other = make()
    restore(other, snap)
    svc = other.get_service(SVC)
    old = bal.get_service(SVC).hcells
    assert svc.hcells != old and svc.hcells[1] == 251, "rebuilt beside the adopted table"
    assert other.cells.free_cells() == other.cells.size - 251, "the adopted cells are free again"
    assert [s.match for s in other.snat_order] == [s.match for s in bal.snat_order]
    rules = [c for c in other.dp.calls if c[0] in ("snat_rule_set", "snat_count_set", "snat_rule_clear")]
    assert rules[:3] == [("snat_rule_set", (0, other.snat_order[0])), ("snat_rule_set", (1, other.snat_order[1])),
                         ("snat_count_set", (2,))]
    assert len(rules) == 3 + SNAT_RULES_MAX - 2
    d = svc.dests[(A("192.168.100.2"), 80)]
    assert (d.fwd, d.u_threshold, svc.persistent, svc.sched_params) == ("dr", 9, 60, {"size": 251})
    # tables before the svc_map entry that leads packets to them
    names = [c[0] for c in other.dp.calls]
    assert names.index("sched_set") < names.index("service_set")


def test_a_dry_run_model_refuses_what_the_real_one_would(bal):
    full_model(bal)
    scratch = Balancer(Recorder(), bal.ifaces, max_hash_cells=bal.cells.size)
    restore(scratch, snapshot(bal), tables=False)
    assert scratch.dp.calls == [] and scratch.cells.runs == bal.cells.runs
    for b in (bal, scratch):
        with pytest.raises(HdslbError) as e:
            b.dest_add({"svc": SVC, "addr": "192.168.100.9", "port": 8080, "fwd": "dr"})
        assert e.value.errno == errno.EINVAL
        with pytest.raises(HdslbError) as e:
            add_snat(b, 7)
        assert e.value.errno == errno.EEXIST


def test_next_hops_resolved_ahead_include_snat_gateways(bal):
    bal.route_add({"prefix": "192.168.100.0", "prefixlen": 24, "ifname": "eth1"})
    bal.route_add({"prefix": "0.0.0.0", "prefixlen": 0, "ifname": "eth0", "via": "203.0.113.254"})
    bal.route_add({"prefix": "198.51.100.0", "prefixlen": 24, "ifname": "eth1", "via": "192.168.100.1"})
    bal.addr_add({"addr": "203.0.113.1", "prefixlen": 24, "ifname": "eth0", "sapool": True})
    bal.service_add(dict(SVC, sched="rr"))
    bal.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80, "fwd": "dr"})
    assert bal.wanted_nexthops() == {A("192.168.100.2"): "eth1"}, "no SNAT: real servers only"
    bal.service_add({"match": MATCH, "sched": "rr"})  # oif eth0: traffic leaves by the default gateway
    bal.dest_add({"svc": {"match": MATCH}, "addr": "203.0.113.1", "port": 0})
    assert bal.wanted_nexthops() == {A("192.168.100.2"): "eth1", A("203.0.113.254"): "eth0"}
    # a small dst-range on a connected network: each of its hosts
    bal.service_add({"match": {"proto": "udp", "dst_range": "203.0.113.10-203.0.113.11"}, "sched": "rr"})
    want = bal.wanted_nexthops()
    assert {A("203.0.113.10"), A("203.0.113.11"), A("192.168.100.1")} <= set(want)
    bal.route_del({"prefix": "0.0.0.0", "prefixlen": 0})
    assert A("203.0.113.254") not in bal.wanted_nexthops()


def test_probe_source_never_uses_a_vip_its_dr_servers_hold(bal):
    A = ipaddress.ip_address
    vip = {"proto": "tcp", "addr": "192.168.100.100", "port": 80}
    bal.addr_add({"addr": "192.168.100.100", "prefixlen": 24, "ifname": "eth0"})
    bal.service_add(dict(vip, sched="rr"))
    # no DR server yet: the VIP on the servers' subnet is a fine sender
    assert bal.probe_source(A("192.168.100.2"), "eth0") == A("192.168.100.100")
    bal.dest_add({"svc": vip, "addr": "192.168.100.2", "port": 80, "fwd": "dr"})
    # the DR server holds the VIP on lo and would drop "who-has .2 tell VIP" as a martian
    assert bal.probe_source(A("192.168.100.2"), "eth0") == A("0.0.0.0")
    bal.addr_add({"addr": "192.168.100.254", "prefixlen": 24, "ifname": "eth0"})
    assert bal.probe_source(A("192.168.100.2"), "eth0") == A("192.168.100.254")
    bal.route_add({"prefix": "192.168.100.0", "prefixlen": 25, "ifname": "eth0", "src": "192.168.100.253"})
    assert bal.probe_source(A("192.168.100.2"), "eth0") == A("192.168.100.253"), "the operator's src wins"
