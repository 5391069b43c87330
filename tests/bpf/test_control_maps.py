"""The control plane's map writers against the compiled program: the Balancer, through the daemon's MapDataPath and
Maps, sets up hash tables (batched hash_cells writes and the sched_map swap), SNAT rules, persistence, and the
packets go where the model says. test_modes.py pins the ABI with hand-written entries; this pins the writers."""

import ctypes as ct
import ipaddress

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from hdslb import sched
from hdslb.balancer import Balancer, Iface
from hdslb.daemon import MapDataPath
from hdslb.fastpath import abi
from hdslb.fastpath.testrun import XDP_PASS, XDP_TX, run_xdp

from .conftest import LB_MAC, LO_IFINDEX

A = ipaddress.ip_address
LB = ":".join(f"{b:02x}" for b in LB_MAC)
VIP, CLIENT = "10.0.0.100", "10.0.0.1"
RSS = ("192.168.100.2", "192.168.100.3", "192.168.100.4")
SVC = {"proto": "tcp", "addr": VIP, "port": 80}


def mac_of(addr: str) -> bytes:
    return bytes.fromhex("0255000000") + bytes([int(A(addr).packed[-1])])


@pytest.fixture
def bal(fastpath, maps):
    ifaces = {"lo": Iface("lo", LO_IFINDEX, LB_MAC, 1500)}
    b = Balancer(MapDataPath(maps, lambda name: ifaces[name].ifindex if name else 0), ifaces, max_services=64,
                 max_dests=256, max_hash_cells=fastpath.sizes.max_hash_cells)
    b.route_add({"prefix": "192.168.100.0", "prefixlen": 24, "ifname": "lo"})
    for rs in RSS:
        b.neigh_add({"addr": rs, "lladdr": mac_of(rs).hex(":"), "ifname": "lo"})
    return b


def syn(src=CLIENT, sport=40000, dst=VIP, dport=80):
    return Ether(src="02:cc:00:00:00:01", dst=LB) / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S")


def run(fastpath, pkt):
    v, out, _ = run_xdp(fastpath.prog_fd, bytes(pkt))
    return v, Ether(out)


def test_mh_through_the_model_lands_where_the_python_table_says(fastpath, maps, bal):
    bal.service_add(dict(SVC, sched="mh", flags=["mh-port"], sched_params={"size": 251}))
    for rs in RSS[:2]:
        bal.dest_add({"svc": SVC, "addr": rs, "port": 80, "fwd": "dr"})
    svc = bal.get_service(SVC)

    def check():
        off, n = svc.hcells
        cells = maps.hash_cells(off, n)
        want = sched.build_table("mh", [sched.Dest(slot_id=d.slot, weight=1, addr=d.addr, port=d.port)
                                        for d in svc.dests.values()], size=251, port=True)
        assert cells == want.entries, "the batched write put the table where sched_map points"
        by_slot = {d.slot: d.addr for d in svc.dests.values()}
        for i in range(16):
            client, sport = f"10.0.{i % 4}.{i + 1}", 41000 + 13 * i
            v, out = run(fastpath, syn(client, sport))
            assert v == XDP_TX and out[Ether].dst == ":".join(f"{b:02x}" for b in mac_of(str(
                by_slot[want.hash_pick(client, sport)])))

    check()
    first = svc.hcells
    bal.dest_add({"svc": SVC, "addr": RSS[2], "port": 80, "fwd": "dr"})  # a rebuild: new cells, one swap
    assert svc.hcells[0] != first[0]
    for name in maps.CONN_MAPS:
        for k in list(maps.t[name].keys()):
            del maps.t[name][k]
    check()


def test_snat_rules_written_by_the_model(fastpath, maps, bal):
    bal.addr_add({"addr": "10.0.0.254", "prefixlen": 24, "ifname": "lo", "sapool": True})
    bal.neigh_add({"addr": "10.0.0.1", "lladdr": "02:99:00:00:00:09", "ifname": "lo"})
    other = {"proto": "udp", "src_range": "192.168.100.2-192.168.100.9"}
    match = {"proto": "tcp", "src_range": "192.168.100.2-192.168.100.9", "oif": "lo"}
    bal.service_add({"match": other, "sched": "rr"})
    bal.service_add({"match": match, "sched": "sh"})
    bal.dest_add({"svc": {"match": match}, "addr": "10.0.0.254", "port": 0})
    assert [r["svc_id"] for r in maps.snat_rules()] == [s.svc_id for s in bal.snat_order]
    pkt = Ether(src="02:55:00:00:00:02", dst=LB) / IP(src="192.168.100.2", dst="10.0.0.1") / \
        TCP(sport=50000, dport=80, flags="S")
    v, out = run(fastpath, pkt)
    assert v == XDP_TX and (out[IP].src, out[IP].dst) == ("10.0.0.254", "10.0.0.1")
    # deleting the first rule moves the second down; it still matches
    bal.service_del({"match": other})
    assert [r["svc_id"] for r in maps.snat_rules()] == [bal.snat_order[0].svc_id]
    v, out = run(fastpath, Ether(src="02:55:00:00:00:02", dst=LB) / IP(src="192.168.100.3", dst="10.0.0.1") /
                 TCP(sport=50001, dport=80, flags="S"))
    assert v == XDP_TX and out[IP].src == "10.0.0.254"
    bal.service_del({"match": match})
    assert maps.snat_rules() == []
    v, _ = run(fastpath, Ether(src="02:55:00:00:00:02", dst=LB) / IP(src="192.168.100.4", dst="10.0.0.1") /
               UDP(sport=50002, dport=53))
    assert v == XDP_PASS


def test_persistence_templates_are_listed_and_flushed_with_their_server(fastpath, maps, bal):
    bal.service_add(dict(SVC, sched="rr", persistent=60, netmask="255.255.255.0"))
    for rs in RSS[:2]:
        bal.dest_add({"svc": SVC, "addr": rs, "port": 80, "fwd": "dr"})
    svc = bal.get_service(SVC)
    assert run(fastpath, syn("10.1.2.3", 42000))[0] == XDP_TX
    temps = maps.persists()
    assert [(t["svc_id"], str(t["addr"])) for t in temps] == [(svc.svc_id, "10.1.2.0")], "masked by -M /24"
    slot = temps[0]["dest_slot"]
    gone = next(d for d in svc.dests.values() if d.slot == slot)
    bal.dest_edit({"svc": SVC, "addr": str(gone.addr), "port": 80, "weight": 0})
    assert maps.persists(), "a drain keeps templates (LVS)"
    bal.dest_del({"svc": SVC, "addr": str(gone.addr), "port": 80})
    assert maps.persists() == []


def _sticky_pair(fastpath, bal):
    """A DR -p 60 service on two servers and CLIENT's first connection: (its server, the other) as Dests."""
    bal.service_add(dict(SVC, sched="rr", persistent=60))
    for rs in RSS[:2]:
        bal.dest_add({"svc": SVC, "addr": rs, "port": 80, "fwd": "dr"})
    svc = bal.get_service(SVC)
    first = server_of(fastpath, CLIENT, 42000)
    x = next(d for d in svc.dests.values() if str(d.addr) == first)
    return x, next(d for d in svc.dests.values() if d is not x)


def server_of(fastpath, src, sport):
    """The real server a new connection went to (DR: told by the destination MAC)."""
    v, out = run(fastpath, syn(src, sport))
    assert v == XDP_TX
    return next(rs for rs in RSS if mac_of(rs) == bytes.fromhex(out[Ether].dst.replace(":", "")))


def dest_flags(maps, d):
    return maps.t["dest_map"][ct.c_uint32(d.slot)].flags


def rs_of(d):
    return {"svc": SVC, "addr": str(d.addr), "port": 80}


def test_the_model_keeps_persistent_clients_on_a_drained_server_and_moves_them_off_a_failed_one(fastpath, maps,
                                                                                                 bal):
    """What the operator and the checkers do, through Balancer -> MapDataPath -> dest_map, decides where a client
    with a template goes: a drain by hand keeps it (LVS), a health check's down or weight 0 moves it."""
    x, other = _sticky_pair(fastpath, bal)
    sport = iter(range(42001, 42100))
    bal.dest_edit(dict(rs_of(x), weight=0))
    assert dest_flags(maps, x) == abi.DEST_F_VALID | abi.DEST_F_DRAIN
    assert server_of(fastpath, CLIENT, next(sport)) == str(x.addr), "drained: its persistent client stays"
    assert server_of(fastpath, "10.9.9.9", next(sport)) == str(other.addr), "a new client does not go there"
    assert maps.persists(), "a drain keeps templates"
    bal.dest_edit(dict(rs_of(x), weight=1))
    bal.dest_health(rs_of(x), False, None, "connection refused")
    assert dest_flags(maps, x) == abi.DEST_F_VALID | abi.DEST_F_DRAIN | abi.DEST_F_NO_PERSIST
    assert server_of(fastpath, CLIENT, next(sport)) == str(other.addr), "down: the client moves"
    bal.dest_health(rs_of(x), True, None, "")
    assert dest_flags(maps, x) == abi.DEST_F_VALID
    # a checker's weight 0 (misc_dynamic; inhibit_on_failure reports down at weight 0, as above) on the server the
    # client has now: it moves back
    bal.dest_health(rs_of(other), True, 0, "")
    assert dest_flags(maps, other) == abi.DEST_F_VALID | abi.DEST_F_DRAIN | abi.DEST_F_NO_PERSIST
    assert server_of(fastpath, CLIENT, next(sport)) == str(x.addr)
    bal.dest_health(rs_of(other), True, None, "")
    assert dest_flags(maps, other) == abi.DEST_F_VALID


def test_an_overloaded_server_keeps_its_persistent_clients(fastpath, maps, bal):
    """LVS's ip_vs_sched_persist takes a valid template's server without looking at IP_VS_DEST_F_OVERLOAD: above
    its upper threshold a server gets no new clients but its persistent ones still come."""
    x, other = _sticky_pair(fastpath, bal)
    bal.dest_edit(dict(rs_of(x), u_threshold=1))
    bal.conn_counts = lambda: {x.slot: (1, 0)}
    bal.refresh_dynamic()
    assert x.overloaded and dest_flags(maps, x) == abi.DEST_F_VALID
    assert server_of(fastpath, CLIENT, 42001) == str(x.addr)
    assert server_of(fastpath, "10.9.9.9", 42002) == str(other.addr), "no new client while overloaded"


def test_expire_quiescent_template_stops_a_drained_server_keeping_its_clients(fastpath, maps, bal):
    """ipvs_defs conn expire_quiescent_template (LVS's sysctl): a drain then drops the server's templates and
    refuses any it meets; turning it on (a reload) flags the servers drained before and drops their templates,
    turning it off lets a drained server keep its persistent clients again."""
    x, other = _sticky_pair(fastpath, bal)
    bal.dest_edit(dict(rs_of(x), weight=0))
    assert maps.persists() and dest_flags(maps, x) & abi.DEST_F_NO_PERSIST == 0
    bal.set_expire_quiescent_template(True)
    assert dest_flags(maps, x) == abi.DEST_F_VALID | abi.DEST_F_DRAIN | abi.DEST_F_NO_PERSIST
    assert maps.persists() == [], "the drained server's templates went, as a drain under the flag drops them"
    assert server_of(fastpath, CLIENT, 42001) == str(other.addr)
    bal.set_expire_quiescent_template(False)
    assert dest_flags(maps, x) == abi.DEST_F_VALID | abi.DEST_F_DRAIN
    # the client's template names `other` now: drained by hand, it keeps the client
    bal.dest_edit(dict(rs_of(x), weight=1))
    bal.dest_edit(dict(rs_of(other), weight=0))
    assert server_of(fastpath, CLIENT, 42002) == str(other.addr)
    # and under the flag, a drain drops the templates and flags the server at once
    bal.dest_edit(dict(rs_of(other), weight=1))
    bal.set_expire_quiescent_template(True)
    assert dest_flags(maps, other) == abi.DEST_F_VALID and maps.persists()
    bal.dest_edit(dict(rs_of(other), weight=0))
    assert dest_flags(maps, other) == abi.DEST_F_VALID | abi.DEST_F_DRAIN | abi.DEST_F_NO_PERSIST
    assert maps.persists() == []
    assert server_of(fastpath, CLIENT, 42003) == str(x.addr)


def test_prune_services_removes_what_the_model_does_not_have(maps):
    """A restart from a saved model older than the maps: entries of the service and real server the model does
    not have go, the model's stay; pruning again changes nothing."""
    import socket

    m, A = maps, ipaddress.ip_address
    for svc_id, vip in ((5, "10.9.0.1"), (6, "10.9.0.2")):
        m.set_service(socket.IPPROTO_TCP, A(vip), 80, svc_id)
        m.set_sched(svc_id, [svc_id * 10], 1)
        m.set_laddrs(svc_id, [(A("192.168.9.200"), 1)])
        m.set_dest(svc_id * 10, A(f"192.168.9.{svc_id}"), 80, "fnat", svc_id, drain=False)
    keep = {m.svc_key_bytes(socket.IPPROTO_TCP, A("10.9.0.1"), 80)}
    out = m.prune_services(keep, {5}, {50})
    assert out["services"] == 1 and out["tables"] == 1 and out["dests"] >= 1
    assert {bytes(k) for k in m.t["svc_map"].keys()} == keep
    assert {k.value for k in m.t["sched_map"].keys()} == {5}
    assert {k.value for k in m.t["laddr_map"].keys()} == {5}
    dest = m.t["dest_map"]
    assert dest[ct.c_uint32(50)].flags & 1 and not dest[ct.c_uint32(60)].flags & 1
    assert m.prune_services(keep, {5}, {50}) == {"services": 0, "tables": 0, "dests": 0}
    m.del_service(socket.IPPROTO_TCP, A("10.9.0.1"), 80, 5)
    m.clear_dest(50)


def test_prune_addresses_removes_what_the_model_does_not_have(maps):
    """The same for local_map and the LPM route tries: the model's entries stay, the others go, v4 and v6."""
    m, A, N = maps, ipaddress.ip_address, ipaddress.ip_network
    for a in ("10.9.1.1", "10.9.1.2", "2001:db8:9::1"):
        m.set_local(A(a), 1, LO_IFINDEX)
    for n in ("10.9.2.0/24", "10.9.3.0/24", "10.9.3.128/25", "2001:db8:9::/64", "2001:db8:a::/48"):
        m.set_route(N(n), LO_IFINDEX, None, None, 0, False)
    keep_local, keep_nets = {A("10.9.1.1"), A("2001:db8:9::1")}, {N("10.9.3.0/24"), N("2001:db8:9::/64")}
    assert m.prune_addresses(keep_local, keep_nets) == {"addresses": 1, "routes": 3}
    assert m.t["local_map"].get(m._local_key(A("10.9.1.2"))) is None
    assert m.t["local_map"].get(m._local_key(A("10.9.1.1"))) is not None
    routes = {(bytes(k)) for name in ("route4_map", "route6_map") for k in m.t[name].keys()}
    assert routes == {bytes(m._route_key(n)[1]) for n in keep_nets}
    assert m.prune_addresses(keep_local, keep_nets) == {"addresses": 0, "routes": 0}
    m.prune_addresses(set(), set())
    assert not list(m.t["local_map"].keys()) and not list(m.t["route4_map"].keys())


@pytest.mark.parametrize("addr,fwd,drain,no_persist", [("192.168.9.7", "fnat", False, False),
                                                       ("2001:db8::7", "dr", True, False),
                                                       ("192.168.9.8", "nat", True, True)])
def test_dest_written_raw_matches_the_program_s_struct(maps, addr, fwd, drain, no_persist):
    """set_dest packs struct dest_val by hand (speed); it must land exactly where bcc's view of the struct has
    each field, for both families and the flags."""
    import socket

    from hdslb.fastpath import abi

    slot = 250
    maps.set_dest(slot, A(addr), 8080, fwd, 77, drain=drain, no_persist=no_persist)
    v = maps.t["dest_map"][ct.c_uint32(slot)]
    assert bytes(v.addr.b)[:len(A(addr).packed)] == A(addr).packed
    assert (v.port, v.af, v.fwd, v.svc_id) == (socket.htons(8080), A(addr).version, abi.FWD[fwd], 77)
    assert v.flags == abi.DEST_F_VALID | (abi.DEST_F_DRAIN if drain else 0) | \
        (abi.DEST_F_NO_PERSIST if no_persist else 0)
    maps.clear_dest(slot)


def test_a_dest_val_layout_change_is_refused_at_start(fastpath, monkeypatch):
    """set_dest packs struct dest_val by hand: if the header grows and the packer does not, the daemon must not
    start writing short values (the kernel would read past them)."""
    import struct

    from hdslb.fastpath.maps import Maps

    monkeypatch.setattr(Maps, "_DEST_VAL", struct.Struct("=16s2sBBIII"))
    with pytest.raises(RuntimeError, match="struct dest_val is 28 bytes"):
        Maps(fastpath)


def test_a_template_lives_while_a_connection_it_scheduled_does(fastpath, maps, bal):
    """LVS does not expire a persistence template while it controls connections: a client whose one long
    connection outlives -p still has its next connection sent to the same server. The fast path renews a
    template only when a new connection uses it, so the aging sweep renews the template of a client that still
    has a live flow to the template's server (here one that already ran out); a client with none loses its
    template at its time."""
    import time
    import types

    from hdslb.daemon import DEFAULT_TIMEOUTS, Daemon

    bal.service_add(dict(SVC, sched="rr", persistent=60, netmask="255.255.255.0"))
    for rs in RSS[:2]:
        bal.dest_add({"svc": SVC, "addr": rs, "port": 80, "fwd": "dr"})
    assert run(fastpath, syn("10.1.2.3", 42000))[0] == XDP_TX          # a long connection, still going
    ack = syn("10.1.2.3", 42000)
    ack[TCP].flags = "A"
    assert run(fastpath, ack)[0] == XDP_TX
    assert run(fastpath, syn("10.1.3.4", 42001))[0] == XDP_TX          # a connection that ended (swept)
    t = maps.t["conn4_map"]
    for k in list(t.keys()):
        if ipaddress.ip_address(k.saddr.v4.to_bytes(4, "little")) == A("10.1.3.4"):
            del t[k]
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    pt = maps.t["persist_map"]
    for k in list(pt.keys()):                                          # 60 s on: both templates ran out
        v = pt[k]
        v.expires = now - 10**9
        pt[k] = v
    d = types.SimpleNamespace(maps=maps, bal=bal, _conn_cache=None, _counts_cache=None,
                              settings=types.SimpleNamespace(timeouts=dict(DEFAULT_TIMEOUTS)))
    Daemon.sweep(d)
    left = {str(x["addr"]): x["expires_ns"] for x in maps.persists()}
    assert left["10.1.2.0"] >= now + 59 * 10**9, "renewed: its client has a live connection"
    assert left["10.1.3.0"] < now, "not renewed: its client has none"
    hits = maps.counters()["persist_hit"]
    first = [c for c in maps.conns() if str(c["saddr"]) == "10.1.2.3"][0]["dest_slot"]
    for i in range(4):                                                 # its network's next connections follow it
        assert run(fastpath, syn(f"10.1.2.{10 + i}", 42100 + i))[0] == XDP_TX
    assert maps.counters()["persist_hit"] == hits + 4
    assert {c["dest_slot"] for c in maps.conns() if str(c["saddr"]).startswith("10.1.2.")} == {first}


def test_a_shorter_persistence_timeout_is_looked_after_at_its_own_pace(fastpath, maps, bal):
    """The sweep looks at the templates every quarter of the shortest -p, so none runs out between two looks. That
    pace is the -p there is now: after -p 60 became -p 8 the next look was still 15 s away (it was stored from the
    last look's -p), and an 8 s template ran out under its client's live connection, whose next connection was
    then scheduled afresh (found in a netns lab: the template was gone from ipvsadm -Lnc for ~2 s of a 16 s
    connection)."""
    import time
    import types

    from hdslb.daemon import DEFAULT_TIMEOUTS, Daemon

    bal.service_add(dict(SVC, sched="rr", persistent=60))
    bal.dest_add({"svc": SVC, "addr": RSS[0], "port": 80, "fwd": "dr"})
    assert run(fastpath, syn("10.1.2.3", 42000))[0] == XDP_TX
    ack = syn("10.1.2.3", 42000)
    ack[TCP].flags = "A"
    assert run(fastpath, ack)[0] == XDP_TX
    d = types.SimpleNamespace(maps=maps, bal=bal, _conn_cache=None, _counts_cache=None,
                              settings=types.SimpleNamespace(timeouts=dict(DEFAULT_TIMEOUTS)))
    Daemon.sweep(d)                                                    # a look at the templates (-p 60)
    bal.service_edit(dict(SVC, persistent=8))
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    pt = maps.t["persist_map"]
    for k in list(pt.keys()):                                          # 3 s left of an 8 s template
        v = pt[k]
        v.expires = now + 3 * 10**9
        pt[k] = v
    time.sleep(2.1)                                                    # a quarter of the new -p on
    Daemon.sweep(d)
    [t] = maps.persists()
    assert t["expires_ns"] >= now + 8 * 10**9, "renewed at the new -p's pace: its client has a live connection"


def test_renewing_templates_never_brings_back_one_deleted_meanwhile(fastpath, maps, bal, monkeypatch):
    """The sweep renews templates from a thread while the daemon may delete them (a real server removed): a
    template deleted between the read and the write stays deleted, the others are renewed."""
    bal.service_add(dict(SVC, sched="rr", persistent=60))
    bal.dest_add({"svc": SVC, "addr": RSS[0], "port": 80, "fwd": "dr"})
    for client in ("10.1.2.3", "10.1.2.4"):
        assert run(fastpath, syn(client, 42000))[0] == XDP_TX
    temps = maps.persists()
    items = maps._persist_items()
    t = maps.t["persist_map"]
    gone = next(k for k, _ in items if ipaddress.ip_address(bytes(k.addr.b)[:4]) == A("10.1.2.4"))
    del t[gone]                                            # deleted after the sweep read the templates
    monkeypatch.setattr(maps, "_persist_items", lambda: items)
    assert maps.renew_persists([dict(x, expires_ns=x["expires_ns"] + 10**9) for x in temps]) == 1
    monkeypatch.undo()
    assert [str(x["addr"]) for x in maps.persists()] == ["10.1.2.3"]


def test_evicted_counts_only_what_the_lru_evicted(fastpath, maps, bal):
    """stats.get's conn_table.evicted is the entries flows inserted less those alive and those removed. A DR
    or TUNNEL flow inserts one entry, not two: 30 DR flows and 20 FullNAT flows in a table with room for all
    of them evicted nothing (each DR flow used to count as one eviction, so a DR site saw every connection
    as evicted). Flows swept away are expired, not evicted."""
    import types

    from hdslb.daemon import Daemon

    bal.service_add(dict(SVC, sched="rr"))
    bal.dest_add({"svc": SVC, "addr": RSS[0], "port": 80, "fwd": "dr"})
    fnat = {"proto": "tcp", "addr": VIP, "port": 81}
    bal.service_add(dict(fnat, sched="rr"))
    bal.dest_add({"svc": fnat, "addr": RSS[1], "port": 80, "fwd": "fnat"})
    bal.laddr_add({"svc": fnat, "addr": "192.168.100.200", "ifname": "lo"})
    for i in range(30):
        assert run(fastpath, syn(f"10.1.0.{i + 1}", 43000 + i))[0] == XDP_TX
    for i in range(20):
        assert run(fastpath, syn(f"10.2.0.{i + 1}", 44000 + i, dport=81))[0] == XDP_TX
    d = types.SimpleNamespace(maps=maps, sizes=fastpath.sizes, _entries_cache=(0.0, None, 0.0), _evicted=0)
    d.conn_table_entries_by_family = lambda: Daemon.conn_table_entries_by_family(d)
    ct_ = Daemon.conn_table(d)
    assert (ct_["entries"], ct_["expired"], ct_["evicted"]) == (70, 0, 0)
    t = maps.t["conn4_map"]
    for k in list(t.keys())[:5]:                           # entries the LRU took for newer ones
        del t[k]
    assert Daemon.conn_table(d)["evicted"] == 5


def test_evicted_is_not_fooled_by_a_reused_count_nor_by_the_sweeps_deletes(fastpath, maps, bal):
    """evicted was the inserted entries as of now less a count of the table and conn_expired. A big table's
    count is reused for up to 5 s (it reads the whole table), so every flow made since read as evicted, and
    the /metrics counter went up and then back down; and the sweep's deletes reached conn_expired only after
    all of them were done, so a count taken meanwhile read them as evicted too. Now the count is what proves
    the figure (what was inserted before it, less what it found, less conn_expired after it), and hdslb_sweep
    counts each delete in the kernel as it makes it."""
    import time
    import types

    from hdslb.daemon import DEFAULT_TIMEOUTS, Daemon
    from hdslb.fastpath import aging

    from .test_fastpath import _age_conns

    bal.service_add(dict(SVC, sched="rr"))
    bal.dest_add({"svc": SVC, "addr": RSS[1], "port": 80, "fwd": "fnat"})
    bal.laddr_add({"svc": SVC, "addr": "192.168.100.200", "ifname": "lo"})
    for i in range(10):
        assert run(fastpath, syn(f"10.2.0.{i + 1}", 44000 + i))[0] == XDP_TX
    d = types.SimpleNamespace(maps=maps, sizes=fastpath.sizes, _entries_cache=(0.0, None, 0.0), _evicted=0,
                              settings=types.SimpleNamespace(timeouts=dict(DEFAULT_TIMEOUTS)))
    d.conn_table_entries_by_family = lambda: Daemon.conn_table_entries_by_family(d)
    assert (Daemon.conn_table(d)["entries"], Daemon.conn_table(d)["evicted"]) == (20, 0)
    d._entries_cache = (time.monotonic(), d._entries_cache[1], 1.0)   # a count that took 1 s: reused for 5 s
    for i in range(10, 25):
        assert run(fastpath, syn(f"10.2.0.{i + 1}", 44000 + i))[0] == XDP_TX
    ct_ = Daemon.conn_table(d)
    assert (ct_["entries"], ct_["evicted"]) == (20, 0), "the reused count is 15 flows old; nothing was evicted"

    _age_conns(maps, 3600)                                             # every flow idle past its timeout
    now = maps.clock.mono_to_jiffies(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
    dead = aging.expired_rows(maps.conn_aging_view(), now, Daemon.idle_limits(d, maps.clock.seconds_to_jiffies))
    before = maps.counter("conn_expired")
    assert maps.remove_dead_flows(dead) == 50
    assert maps.counter("conn_expired") == before + 50, "counted by hdslb_sweep as it deletes, not afterwards"
    d._entries_cache = (0.0, None, 0.0)
    ct_ = Daemon.conn_table(d)
    assert (ct_["entries"], ct_["expired"], ct_["evicted"]) == (0, 50, 0)


def test_a_udp_flow_whose_server_was_removed_is_scheduled_afresh(fastpath, maps, bal):
    """A client that keeps sending on one UDP tuple (syslog, SIP, QUIC, a resolver with a fixed port) never lets
    its flow go idle: after its real server was removed (by hand, or by a failing health check) it was sent
    to that server for good. The sweep now expires such flows at once, as LVS does with expire_nodest_conn,
    so the next datagram is scheduled to a server that is there, also when the removed server's slot went to
    a new server meanwhile. A drained server (weight 0) keeps its flows, as in LVS."""
    import types

    from hdslb.daemon import DEFAULT_TIMEOUTS, Daemon

    usvc = {"proto": "udp", "addr": VIP, "port": 53}
    bal.service_add(dict(usvc, sched="rr"))
    for rs in RSS[:2]:
        bal.dest_add({"svc": usvc, "addr": rs, "port": 53, "fwd": "fnat"})
    bal.laddr_add({"svc": usvc, "addr": "192.168.100.200", "ifname": "lo"})

    def dgram(sport):
        return Ether(src="02:cc:00:00:00:01", dst=LB) / IP(src=CLIENT, dst=VIP) / UDP(sport=sport, dport=53) / b"q"

    def server_of(sport):
        v, out = run(fastpath, dgram(sport))
        assert v == XDP_TX
        return out[IP].dst

    first = {sport: server_of(sport) for sport in (5000, 5001, 5002, 5003)}
    gone, stays = RSS[0], RSS[1]
    bal.dest_edit({"svc": usvc, "addr": stays, "port": 53, "weight": 0})    # drained: its flows go on
    svc = bal.get_service(usvc)
    freed = next(x.slot for x in svc.dests.values() if str(x.addr) == gone)
    bal.dest_del({"svc": usvc, "addr": gone, "port": 53})
    # a freed slot rests while never-used ones remain (Balancer's IdPool): with none left, it is reused
    limit, bal.max_dests = bal.max_dests, bal._slots_used.hwm
    try:
        bal.dest_add({"svc": usvc, "addr": RSS[2], "port": 53, "fwd": "fnat"})
    finally:
        bal.max_dests = limit
    assert next(x.slot for x in svc.dests.values() if str(x.addr) == RSS[2]) == freed, "the new server's slot"
    d = types.SimpleNamespace(maps=maps, bal=bal, _conn_cache=None, _counts_cache=None,
                              settings=types.SimpleNamespace(timeouts=dict(DEFAULT_TIMEOUTS)))
    removed = Daemon.sweep(d)
    assert removed == 2 * sum(1 for s in first.values() if s == gone)
    for sport, was in first.items():
        assert server_of(sport) == (RSS[2] if was == gone else stays), sport


def test_a_udp_flow_whose_server_failed_its_check_is_scheduled_afresh_an_inhibited_ones_is_not(fastpath, maps, bal):
    """keepalived removes a server that fails its check (LVS's expire_nodest_conn then moves its UDP flows) unless
    inhibit_on_failure keeps it in at weight 0, where its flows go on as a drained server's do. The model keeps a
    failed server (to bring it back), so the sweep has to count it as gone: a client sending on one tuple stayed on
    it for good (found in a netns lab, hdslb/daemon.py Daemon.real_servers)."""
    import types

    from hdslb.daemon import DEFAULT_TIMEOUTS, Daemon

    usvc = {"proto": "udp", "addr": VIP, "port": 53}
    bal.service_add(dict(usvc, sched="rr"))
    for rs in RSS[:3]:
        bal.dest_add({"svc": usvc, "addr": rs, "port": 53, "fwd": "fnat"})
    bal.laddr_add({"svc": usvc, "addr": "192.168.100.200", "ifname": "lo"})

    def server_of(sport):
        pkt = Ether(src="02:cc:00:00:00:01", dst=LB) / IP(src=CLIENT, dst=VIP) / UDP(sport=sport, dport=53) / b"q"
        v, out = run(fastpath, pkt)
        assert v == XDP_TX
        return out[IP].dst

    first = {sport: server_of(sport) for sport in range(6000, 6006)}
    failed, inhibited, fine = RSS[0], RSS[1], RSS[2]
    assert set(first.values()) == {failed, inhibited, fine}
    bal.dest_health({"svc": usvc, "addr": failed, "port": 53}, False, None, "connect refused")
    bal.dest_health({"svc": usvc, "addr": inhibited, "port": 53}, False, 0, "connect refused")
    d = types.SimpleNamespace(maps=maps, bal=bal, _conn_cache=None, _counts_cache=None,
                              settings=types.SimpleNamespace(timeouts=dict(DEFAULT_TIMEOUTS)))
    assert Daemon.sweep(d) == 2 * sum(1 for s in first.values() if s == failed)
    for sport, was in first.items():
        now = server_of(sport)
        assert now == (fine if was == failed else was), (sport, was, now)


def test_a_snat_ping_whose_source_address_was_removed_is_scheduled_afresh(fastpath, maps, bal):
    """A ping through SNAT keeps its identifier, so, like a UDP client on one tuple, it never goes idle: once its
    sapool address was taken out of the SNAT service (ipvsadm -d ... -J), its echoes went on leaving from that
    address for as long as it ran (the sweep's nodest check looked at UDP flows only). It is scheduled afresh
    onto a source the service still has."""
    import types

    from scapy.layers.inet import ICMP

    from hdslb.daemon import DEFAULT_TIMEOUTS, Daemon

    for a in ("10.0.0.253", "10.0.0.254"):
        bal.addr_add({"addr": a, "prefixlen": 24, "ifname": "lo", "sapool": True})
    bal.neigh_add({"addr": "10.0.0.1", "lladdr": "02:99:00:00:00:09", "ifname": "lo"})
    match = {"proto": "icmp", "src_range": "192.168.100.2-192.168.100.9", "oif": "lo"}
    bal.service_add({"match": match, "sched": "rr"})
    for a in ("10.0.0.253", "10.0.0.254"):
        bal.dest_add({"svc": {"match": match}, "addr": a, "port": 0})

    def source_of(ident):
        v, out = run(fastpath, Ether(src="02:55:00:00:00:02", dst=LB) / IP(src="192.168.100.2", dst="10.0.0.1") /
                     ICMP(type=8, id=ident, seq=1))
        assert v == XDP_TX
        return out[IP].src

    first = {ident: source_of(ident) for ident in (100, 101, 102, 103)}
    assert set(first.values()) == {"10.0.0.253", "10.0.0.254"}
    bal.dest_del({"svc": {"match": match}, "addr": "10.0.0.253", "port": 0})
    d = types.SimpleNamespace(maps=maps, bal=bal, _conn_cache=None, _counts_cache=None,
                              settings=types.SimpleNamespace(timeouts=dict(DEFAULT_TIMEOUTS)))
    assert Daemon.sweep(d) == 2 * sum(1 for s in first.values() if s == "10.0.0.253")
    assert {ident: source_of(ident) for ident in first} == dict.fromkeys(first, "10.0.0.254")


@pytest.mark.parametrize("name,spread", [("rr", True), ("wrr", True), ("wlc", False), ("lc", False), ("fo", False)])
def test_the_model_marks_rr_and_wrr_rings_spread_and_leaves_lc_wlc_fo_at_entry_0(fastpath, maps, bal, name, spread):
    """sched_tbl.flags SCHED_F_SPREAD reaches the map through Balancer -> MapDataPath.sched_set -> Maps.set_sched (a
    line of that chain was once lost in a merge, and every CPU went back to starting a rebuilt rr ring at entry 0)."""
    bal.service_add(dict(SVC, sched=name))
    for rs in RSS[:2]:
        bal.dest_add({"svc": SVC, "addr": rs, "port": 80, "fwd": "dr"})
    v = maps.t["sched_map"][ct.c_uint32(bal.get_service(SVC).svc_id)]
    assert v.len >= 1 and v.flags == (abi.SCHED_F_SPREAD if spread else 0)


def test_a_local_address_taken_from_its_services_stays_ours_while_its_flows_last(fastpath, maps, bal):
    """A reload that changed a local_address_group (or ipvsadm --del-laddr, or removing the service) took the
    address out of local_map at once: ARP for it went unanswered, and each FullNAT flow through it (its entries
    still there) stalled for good once the real server's ARP entry for it aged. It stays ours, ARP answered, until
    a sweep finds no flow using it, and a restart keeps it so (the saved model has it)."""
    import types

    from scapy.layers.l2 import ARP

    from hdslb.balancer import restore, snapshot
    from hdslb.daemon import DEFAULT_TIMEOUTS, Daemon

    laddr = "192.168.100.200"
    bal.service_add(dict(SVC, sched="rr"))
    bal.dest_add({"svc": SVC, "addr": RSS[0], "port": 80, "fwd": "fnat"})
    bal.laddr_add({"svc": SVC, "addr": laddr, "ifname": "lo"})
    v, out = run(fastpath, syn())
    assert v == XDP_TX and out[IP].src == laddr

    def arp_answered():
        who = Ether(src=mac_of(RSS[0]), dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=mac_of(RSS[0]), psrc=RSS[0], pdst=laddr)
        v, out = run(fastpath, who)
        return v == XDP_TX and out[ARP].op == 2 and out[ARP].psrc == laddr

    assert arp_answered()
    bal.laddr_del({"svc": SVC, "addr": laddr})
    assert arp_answered(), "its flow goes on"
    again = Balancer(bal.dp, bal.ifaces, max_services=64, max_dests=256,
                     max_hash_cells=fastpath.sizes.max_hash_cells)
    restore(again, snapshot(bal))  # a restart, which prunes what the model lacks from the adopted maps
    Daemon._prune_to_model(types.SimpleNamespace(bal=again, maps=maps))
    assert A(laddr) in again.retired_laddrs and arp_answered()
    d = types.SimpleNamespace(maps=maps, bal=again, _conn_cache=None, _counts_cache=None, _laddrs_in_use=None,
                              settings=types.SimpleNamespace(timeouts=dict(DEFAULT_TIMEOUTS)),
                              _state_changed=lambda: None)
    Daemon.sweep(d)
    Daemon._release_laddrs(d)
    assert arp_answered() and A(laddr) in again.retired_laddrs, "a flow still uses it"
    for name in maps.CONN_MAPS:  # the flow ended (swept)
        for k in list(maps.t[name].keys()):
            del maps.t[name][k]
    Daemon.sweep(d)
    Daemon._release_laddrs(d)
    assert not arp_answered() and not again.retired_laddrs
