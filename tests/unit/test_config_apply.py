"""From a config file to control ops: start-up, reload diffs, ownership, and refusals that name the file."""

import errno
from ipaddress import ip_address

import pytest

from hdslb.balancer import LOCAL_LADDR, Balancer, Iface
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


# --- a config load builds each touched table once ---------------------------------------------------------------
def mh_conf(servers: int, weight: int = 1, size: int = 251, other_weight: int = 1, extra: str = "") -> str:
    """One mh service of `servers` real servers (line 5 is its virtual_server) and a wrr one beside it."""
    rs = "".join(f"    real_server 192.168.1.{1 + i} 80 {{\n        weight {weight}\n    }}\n" for i in range(servers))
    return ("local_address_group lg {\n    192.168.100.200 eth1\n}\n\n"
            f"virtual_server 10.0.0.100 80 {{\n    lb_algo mh\n    hash_table_size {size}\n    lb_kind FNAT\n"
            f"    laddr_group_name lg\n{rs}{extra}}}\n"
            f"virtual_server 10.0.0.101 80 {{\n    lb_algo wrr\n    lb_kind FNAT\n    laddr_group_name lg\n"
            f"    real_server 192.168.2.1 80 {{\n        weight {other_weight}\n    }}\n"
            f"    real_server 192.168.2.2 80 {{\n        weight 1\n    }}\n}}\n")


class MapState:
    """A DataPath that keeps what the maps would hold at the end (not the writes): what packets can reach. Slots and
    hash cells are named by what they hold (service, server), since where a table or a slot lands may differ."""

    def __init__(self):
        self.svc, self.dest, self.cells, self.sched, self.laddrs, self.local = {}, {}, {}, {}, {}, {}
        self.snat, self.snat_count, self.flushed, self.held = {}, 0, [], {}

    def service_set(self, svc):
        self.svc[svc.svc_id] = (svc.proto, str(svc.addr), svc.port, svc.persistent, svc.persist_plen)

    def service_del(self, svc):
        self.svc.pop(svc.svc_id, None)
        self.sched.pop(svc.svc_id, None)

    def dest_set(self, svc, d, no_persist=False):
        self.dest[d.slot] = (svc.svc_id, str(d.addr), d.port, d.fwd, d.eff_weight == 0, no_persist)
        self.held[d.slot] = (str(d.addr), d.port)  # who a slot held last, for the template flushes after its clear

    def dest_clear(self, d):
        self.dest.pop(d.slot, None)

    def hash_cells_set(self, first, entries):
        self.cells.update((first + i, e) for i, e in enumerate(entries))

    def sched_set(self, svc, table, hoff):
        self.sched[svc.svc_id] = (table.kind, table.key, table.seed, hoff, len(table.entries),
                                  None if table.kind == "hash" else list(table.entries))

    def laddrs_set(self, svc, laddrs):
        self.laddrs[svc.svc_id] = list(laddrs)

    def local_set(self, addr, flags, ifindex):
        self.local[str(addr)] = (flags, ifindex)

    def local_del(self, addr):
        self.local.pop(str(addr), None)

    def snat_rule_set(self, i, svc):
        self.snat[i] = svc.svc_id

    def snat_rule_clear(self, i):
        self.snat.pop(i, None)

    def snat_count_set(self, n):
        self.snat_count = n

    def persist_flush(self, svc_id, slot):
        self.flushed.append((svc_id, None if slot is None else self.held[slot]))

    def final(self) -> dict:
        def server(slot):
            d = self.dest.get(slot)
            return None if d is None else d[:3]

        tables = {}
        for sid, (kind, key, seed, hoff, n, ring) in self.sched.items():
            entries = [self.cells.get(hoff + i) for i in range(n)] if kind == "hash" else ring
            tables[sid] = (kind, key, seed, [server(s) for s in entries])
        return {"svc": self.svc, "dests": sorted(self.dest.values()), "tables": tables, "laddrs": self.laddrs,
                "local": self.local, "snat": (self.snat, self.snat_count)}


def model(bal) -> dict:
    """snapshot() without what differs by how many tables were built on the way: a service's table generation
    (bumped per build) and where its hash cells and its servers' slots landed (the final maps are compared too)."""
    from hdslb.balancer import snapshot

    snap = snapshot(bal)
    for v in snap["services"]:
        v.pop("sched_gen")
        v["hcells"] = v["hcells"] and v["hcells"][1]
        for d in v["dests"]:
            d.pop("slot")
    return snap


def one_by_one(bal, text: str, name: str = "lb.conf") -> None:
    """What hdslbd's config apply did before batches: every op applied (and its table built) alone."""
    cfg = loads(text, name=name)
    want = desired(cfg, lambda ip: "eth1")
    ops = plan(bal, want, bal.config_owned)
    for op, args in ops:
        if op == "service.add":
            args["own_vip"] = True
    bal.set_expire_quiescent_template(cfg.ipvs_defs.conn.expire_quiescent_template)
    for op, args in ops:
        commands.dispatch(commands.ScratchCtx(bal), op, args)
    bal.config_owned = set(want)


@pytest.fixture
def counted(monkeypatch):
    """Scheduling tables built with at least one real server (an empty one costs nothing), per service address."""
    from hdslb import sched

    built = []
    real = sched.build_table

    def counting(name, dests, **kw):
        dests = list(dests)
        if dests:
            built.append(name)
        return real(name, dests, **kw)

    monkeypatch.setattr(sched, "build_table", counting)
    return built


def harness(tmp_path, text):
    from tests.unit.test_api_security import HarnessDaemon

    conf = tmp_path / "lb.conf"
    conf.write_text(text)
    d = HarnessDaemon(conf, tmp_path)
    d.bal = Balancer(MapState(), d.bal.ifaces)
    return d, conf


async def test_a_load_and_a_reload_build_each_touched_table_once(tmp_path, counted):
    """40 mh servers: one table for each service at load (all new: no dry run, see
    test_a_first_load_has_no_dry_run_and_a_refusal_takes_back_what_it_added) and for the changed one at a reload,
    in the dry run and once in the apply (they were built per real server: 40 + 40 + 2 + 2 here, 800 tables and
    25 s for 400 mh servers of 64k entries)."""
    d, conf = harness(tmp_path, mh_conf(40))
    await d.reload_config()
    assert sorted(counted) == ["mh", "wrr"]
    counted.clear()
    conf.write_text(mh_conf(41, weight=2))  # every weight changes and a server comes
    await d.reload_config()
    assert counted == ["mh", "mh"], "one mh table in the dry run, one in the apply; the wrr service is untouched"
    counted.clear()
    await d.reload_config()
    assert counted == []


async def test_batched_config_apply_gives_the_model_and_maps_of_one_op_at_a_time(tmp_path):
    """The same files applied op by op (as before) and by hdslbd's batched apply: the same model and the same maps
    (tables hold the same servers in the same places), at load and after reloads that add, remove and change
    servers, change the scheduler's table and remove a service (and its templates go the same way)."""
    texts = [mh_conf(12), mh_conf(10, weight=3, extra="    real_server 192.168.1.99 80 {\n        weight 2\n    }\n"),
             mh_conf(10, weight=3, size=509, other_weight=4), mh_conf(10, weight=3, size=509, other_weight=4)
             [:mh_conf(10).index("virtual_server 10.0.0.101")]]
    d, conf = harness(tmp_path, texts[0])
    old = Balancer(MapState(), d.bal.ifaces)
    for i, text in enumerate(texts):
        conf.write_text(text)
        await d.reload_config()
        one_by_one(old, text)
        assert model(d.bal) == model(old), i
        assert d.bal.dp.final() == old.dp.final(), i
        assert sorted(d.bal.dp.flushed) == sorted(old.dp.flushed), i
        if i == 3:
            assert len(d.bal.services) == 1
    assert d.bal.config_owned == old.config_owned


async def test_a_reload_leaves_the_tables_of_unchanged_services_alone(tmp_path):
    d, conf = harness(tmp_path, mh_conf(12))
    await d.reload_config()
    mh = d.bal.get_service({"proto": "tcp", "addr": "10.0.0.100", "port": 80})
    gen, cells, flushed = mh.sched_gen, mh.hcells, len(d.bal.dp.flushed)
    conf.write_text(mh_conf(12, other_weight=5))
    await d.reload_config()
    assert (mh.sched_gen, mh.hcells) == (gen, cells) and len(d.bal.dp.flushed) == flushed


@pytest.mark.parametrize("text,line,what", [
    # the table is refused at the batch's end (8 servers, 7 entries): the service's line
    (mh_conf(8, size=7), 5, "8 real servers exceed the table size 7"),
    # an op refused on its own (NAT46): still the line of its service
    (mh_conf(3).replace("192.168.100.200 eth1", "fd00::200 eth1"), 5, "NAT46"),
])
async def test_a_refused_config_names_its_line_and_applies_nothing(tmp_path, text, line, what):
    d, conf = harness(tmp_path, mh_conf(12))
    await d.reload_config()
    snap, maps = model(d.bal), d.bal.dp.final()
    conf.write_text(text)
    with pytest.raises(HdslbError) as e:
        await d.reload_config()
    assert f"lb.conf:{line}:" in e.value.message and what in e.value.message, e.value.message
    assert "nothing was applied" in e.value.message
    assert model(d.bal) == snap and d.bal.dp.final() == maps
    # and a first load refused the same way leaves an empty model
    (tmp_path / "first").mkdir()
    d2, _ = harness(tmp_path / "first", text)
    with pytest.raises(HdslbError) as e:
        await d2.reload_config()
    assert f"lb.conf:{line}:" in e.value.message and not d2.bal.services and d2.bal.dp.final()["dests"] == []


async def test_a_first_load_has_no_dry_run_and_a_refusal_takes_back_what_it_added(tmp_path, monkeypatch):
    """A config of only new services (a first load, a reload that only adds) is applied at once, without the dry
    run on a scratch model (about a second less of the event loop at 4,000 x 10). Refused
    anywhere, its services are taken out again: nothing reached the maps (local addresses included) and nothing
    was announced on the wire; accepted, each new local address is announced once the batch stands."""
    from hdslb.balancer import Balancer as B

    dry = []
    real_scratch = B.scratch
    monkeypatch.setattr(B, "scratch", lambda self, *a, **kw: dry.append(1) or real_scratch(self, *a, **kw))
    # the second service's local addresses are IPv6 (NAT46, refused at its laddr.add, after the first service,
    # its servers and its local address were added)
    two = mh_conf(3) + ("local_address_group lg6 {\n    fd00::200 eth1\n}\n"
                        "virtual_server 10.0.0.102 80 {\n    lb_algo rr\n    lb_kind FNAT\n"
                        "    laddr_group_name lg6\n    real_server 192.168.3.1 80 {\n    }\n}\n")
    d, conf = harness(tmp_path, two)
    said = []
    d.announce = lambda *a: said.append(a)
    with pytest.raises(HdslbError) as e:
        await d.reload_config()
    line = two.splitlines().index("virtual_server 10.0.0.102 80 {") + 1
    assert f"lb.conf:{line}:" in e.value.message and "NAT46" in e.value.message, e.value.message
    assert "nothing was applied" in e.value.message
    assert dry == [], "no dry run for a config of new services"
    assert not d.bal.services and not d.bal.config_owned and not d.bal.is_local(ip_address("192.168.100.200"))
    assert d.bal.dp.final() == MapState().final(), "nothing of it reached the maps"
    assert said == [], "nothing announced for a refused config"
    # the same file without the bad service: applied at once, its local address announced after the batch
    conf.write_text(mh_conf(3))
    await d.reload_config()
    assert dry == [] and len(d.bal.services) == 2
    maps = d.bal.dp.final()
    assert sorted(maps["laddrs"]) == sorted(s.svc_id for s in d.bal.services.values())
    assert all(v == [(ip_address("192.168.100.200"), 3)] for v in maps["laddrs"].values()), maps["laddrs"]
    assert maps["local"]["192.168.100.200"][0] & LOCAL_LADDR
    # the local address after each service's batch; then the two VIPs the file made ours, on every interface
    assert said == [("192.168.100.200", "eth1")] * 2 + [(vip, ifn) for vip in ("10.0.0.100", "10.0.0.101")
                                                        for ifn in ("eth0", "eth1")]
    # a reload that only adds a service: no dry run either; one that changes a weight has one
    conf.write_text(mh_conf(3) + "virtual_server 10.0.0.103 80 {\n    lb_algo rr\n    lb_kind FNAT\n"
                                 "    laddr_group_name lg\n    real_server 192.168.3.1 80 {\n    }\n}\n")
    await d.reload_config()
    assert dry == [] and len(d.bal.services) == 3
    conf.write_text(mh_conf(3, other_weight=4))
    await d.reload_config()
    assert dry == [1] and len(d.bal.services) == 2


async def test_a_vip_a_config_makes_ours_is_announced_once_on_every_interface(tmp_path):
    """A config's virtual servers own their VIPs (ARP/ND answered on every interface), but only their local
    addresses were announced: a router still holding a moved VIP at the box that had it kept sending there until
    its entry timed out. Each VIP the file makes ours now gets a gratuitous ARP / unsolicited NA on each interface
    (once for a VIP of several services; none again at a reload that keeps it; an interface address is announced
    by its dpip addr add)."""
    six = ("local_address_group lg6 {\n    fd00:100::200 eth1\n}\n"
           "virtual_server fd00:10::100 80 {\n    lb_algo rr\n    lb_kind FNAT\n    laddr_group_name lg6\n"
           "    real_server fd00:100::2 80 {\n    }\n}\n"
           "virtual_server fd00:10::100 443 {\n    lb_algo rr\n    lb_kind FNAT\n    laddr_group_name lg6\n"
           "    real_server fd00:100::2 443 {\n    }\n}\n")
    d, conf = harness(tmp_path, six)
    said = []
    d.announce = lambda *a: said.append(a)
    await d.reload_config()
    assert sorted(said) == sorted([("fd00:100::200", "eth1")] * 2 + [("fd00:10::100", "eth0"), ("fd00:10::100", "eth1")])
    said.clear()
    await d.reload_config()
    assert said == [], "nothing new: nothing announced"
    # a reload that adds services: only their VIPs, not the ones kept
    conf.write_text(six + mh_conf(1))
    await d.reload_config()
    assert sorted(said) == sorted([("192.168.100.200", "eth1")] * 2 + [(vip, ifn) for vip in ("10.0.0.100", "10.0.0.101")
                                                                       for ifn in ("eth0", "eth1")])


async def test_a_reload_is_judged_by_the_tables_it_ends_with(tmp_path):
    """12 servers to 5 in a table of 7: the file is good. Op by op, the table's new size came before the servers
    went (12 > 7) and the reload was refused; a first load of the same file was not."""
    d, conf = harness(tmp_path, mh_conf(12))
    await d.reload_config()
    conf.write_text(mh_conf(5, size=7))
    await d.reload_config()
    svc = d.bal.get_service({"proto": "tcp", "addr": "10.0.0.100", "port": 80})
    assert (svc.sched_params, len(svc.dests)) == ({"size": 7}, 5)
    table = d.bal.dp.final()["tables"][svc.svc_id][3]  # what the maps hold: 7 cells over the 5 servers
    assert len(table) == 7 and {x[1] for x in table} == {str(x.addr) for x in svc.dests.values()}


# ---------------------------------------------------------------- hdslb-ctl check: what the model refuses too

NETIF = "netif_defs {\n    <init> device eth0 {\n    }\n    <init> device eth1 {\n    }\n}\n"


@pytest.mark.parametrize("change,says", [
    (("lb_algo wrr", "lb_algo mh\n    hash_table_size 100"), "table size 100 is not a prime"),
    (("192.168.100.200 eth1", "192.168.100.200 lb9"), "device 'lb9' is not managed"),
])
def test_check_refuses_what_a_start_would_refuse(tmp_path, capsys, change, says):
    """It only parsed: `check` said OK, then `up -f` (and a reload) refused the file."""
    from cli.hdslb_ctl import main

    conf = tmp_path / "lb.conf"
    conf.write_text(NETIF + BASE)
    assert main(["check", "-f", str(conf)]) == 0
    assert f"{conf}: OK" in capsys.readouterr().out
    conf.write_text(NETIF + BASE.replace(*change))
    assert main(["check", "-f", str(conf)]) == 1
    err = capsys.readouterr().err
    assert says in err and f"{conf}:11:1: " in err  # the virtual_server's line, as the daemon names it


@pytest.mark.parametrize("kw", ["iif", "oif"])
def test_check_names_the_line_of_a_snat_match_on_an_unknown_interface(tmp_path, capsys, kw):
    """A SNAT match naming an interface the balancer does not manage was refused without a line
    (`lb.conf: service.add : device 'lb9' is not managed ...`): the refusal's service could not be named again
    from the op's arguments (the same interface lookup failed), so no virtual_server was found for it."""
    from cli.hdslb_ctl import main

    conf = tmp_path / "lb.conf"
    conf.write_text(NETIF + BASE + f"virtual_server match out {{\n    lb_kind SNAT\n    protocol UDP\n"
                                   f"    {kw} lb9\n    real_server 0.0.0.0 0 {{\n    }}\n}}\n")
    line = conf.read_text().splitlines().index("virtual_server match out {") + 1
    assert main(["check", "-f", str(conf)]) == 1
    err = capsys.readouterr().err
    assert "device 'lb9' is not managed" in err and f"{conf}:{line}:1: service.add: " in err, err


def test_check_takes_any_interface_when_the_file_names_none(tmp_path, capsys):
    from cli.hdslb_ctl import main

    conf = tmp_path / "lb.conf"
    conf.write_text(BASE.replace("192.168.100.200 eth1", "192.168.100.200 bond7"))  # the command line's, maybe
    assert main(["check", "-f", str(conf)]) == 0


def _snat(name, src):
    return (f"virtual_server match {name} {{\n    lb_kind SNAT\n    protocol TCP\n    src-range {src}\n    oif eth0\n"
            f"    real_server 0.0.0.0 0 {{\n    }}\n}}\n")


async def test_two_snat_services_of_one_protocol_load_and_two_alike_are_refused_at_the_line(tmp_path, capsys):
    """A file with two SNAT `virtual_server match` services of one protocol (other source ranges) did not load: the
    check that no VIP:port is served twice took every match service for the VIP None:None and crashed formatting it
    (AttributeError, no FILE:LINE; hdslb-ctl check and hdslbd -f died with a traceback, a reload logged "a bug").
    Two that match alike are refused naming both, instead of the second silently replacing the first."""
    from cli.hdslb_ctl import main
    from tests.unit.test_api_security import HarnessDaemon

    conf = tmp_path / "lb.conf"
    conf.write_text(NETIF + BASE + _snat("a", "10.8.0.0-10.8.0.255") + _snat("b", "10.9.0.0-10.9.0.255"))
    assert main(["check", "-f", str(conf)]) == 0, capsys.readouterr().err
    d = HarnessDaemon(conf, tmp_path)
    await d.reload_config()
    assert sum(1 for key in d.bal.services if key[0] == "match") == 2
    conf.write_text(NETIF + BASE + _snat("a", "10.8.0.0-10.8.0.255") + _snat("b", "10.8.0.0-10.8.0.255"))
    second = conf.read_text().splitlines().index("virtual_server match b {") + 1
    assert main(["check", "-f", str(conf)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{conf}:{second}:1: virtual_server match b matches what virtual_server at {conf}:"), err
    with pytest.raises(HdslbError) as ei:
        await d.reload_config()
    assert ei.value.message.startswith(f"{conf}:{second}:1: virtual_server match b matches")
    assert sum(1 for key in d.bal.services if key[0] == "match") == 2  # nothing applied


async def test_an_fnat_virtual_server_without_a_local_address_is_warned_about(tmp_path, capsys):
    """An FNAT virtual_server with no laddr_group_name (a DPVS keepalived.conf trimmed of its local_address_group, a
    typo'd group line) loaded in silence: check said OK, the reload reported nothing, and the fast path dropped every
    new flow (drop_no_laddr) while the health checks, leaving through the kernel, passed. check, a start and a reload
    now warn of it, naming the virtual_server's line; a NAT64 service (IPv6 VIP, IPv4 servers and local addresses)
    is not warned of."""
    from cli.hdslb_ctl import main
    from tests.unit.test_api_security import HarnessDaemon

    bare = BASE.replace("    laddr_group_name lg\n", "")
    nat64 = ("virtual_server 2001:db8::1 80 {\n    lb_kind FNAT\n    laddr_group_name lg\n"
             "    real_server 192.168.100.7 80 {\n    }\n}\n")
    conf = tmp_path / "lb.conf"
    conf.write_text(NETIF + bare + nat64)
    line = conf.read_text().splitlines().index("virtual_server 10.0.0.100 80 {") + 1
    assert main(["check", "-f", str(conf)]) == 0
    out = capsys.readouterr().out
    warned = [x for x in out.splitlines() if x.startswith("warning: ")]
    assert warned == [f"warning: {conf}:{line}:1: virtual_server is lb_kind FNAT with IPv4 real servers and no IPv4 "
                      f"local address (laddr_group_name): each new flow is dropped (drop_no_laddr) until a "
                      f"local_address_group gives it one"], out
    d = HarnessDaemon(conf, tmp_path)
    r = await d.reload_config()
    assert [w for w in r["warnings"] if "drop_no_laddr" in w] == [warned[0][len("warning: "):]]
    conf.write_text(NETIF + BASE + nat64)
    r = await d.reload_config()
    assert not [w for w in r["warnings"] if "drop_no_laddr" in w]
