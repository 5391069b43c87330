"""The REST API over a real Balancer with a recording datapath: routes, statuses, set semantics, auth, OpenAPI."""

import contextlib
import errno
import ipaddress
import logging
import socket
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from hdslb.api import app as api_app
from hdslb.api import openapi
from hdslb.fastpath.loader import Sizes
from hdslb.api.app import ROUTES, make_app, start_api, stop_api
from hdslb.balancer import Balancer, Iface
from hdslb.ctl import commands
from hdslb.errors import HdslbError

SVC = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}
VS = "/v2/vs/10.0.0.100-80-tcp"
CONF = {"Content-Type": "text/x-hdslb-conf"}  # what POST /v2/config takes
COUNTERS = {"rx": 1000, "verdict_pass": 10, "verdict_drop": 7, "verdict_tx": 983, "verdict_redirect": 0,
            "drop_malformed_ip": 3, "drop_no_route": 4, "conn_new": 50}


class Recorder:
    """A DataPath that records what would be written to the maps."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *a: self.calls.append((name, a))


class FakeMaps:
    def __init__(self, ctx):
        self.ctx = ctx

    def counters(self):
        return dict(COUNTERS)

    def per_cpu_counters(self):
        return {k: [v - v // 2, v // 2] for k, v in COUNTERS.items()}

    def neighs(self):
        idx = {i.name: i.ifindex for i in self.ctx.bal.ifaces.values()}
        return [{"addr": n.addr, "lladdr": ":".join(f"{b:02x}" for b in n.lladdr), "ifindex": idx[n.ifname],
                 "permanent": True, "updated_ns": 0} for n in self.ctx.bal.neighs.values()]

    def zero_svc_stats(self, svc_id):
        self.ctx.svc_traffic.pop(svc_id, None)

    def zero_dest_stats(self, slot):
        self.ctx.dest_traffic.pop(slot, None)


def traffic(conns, inpkts, outpkts, inbytes, outbytes):
    return {"conns": conns, "inpkts": inpkts, "outpkts": outpkts, "inbytes": inbytes, "outbytes": outbytes}


class FakeCtx:
    """What commands.py needs from the daemon, over a real Balancer; records every op dispatched."""

    def __init__(self, n_conns=0):
        ifaces = {"eth0": Iface("eth0", 2, b"\x02" * 6, 1500), "eth1": Iface("eth1", 3, b"\x04" * 6, 1500)}
        self.bal = Balancer(Recorder(), ifaces)
        self.maps = FakeMaps(self)
        self.sizes = Sizes(max_conns=4096, conn_table="percpu")
        self.rates = {}
        self.xdp_modes = {"eth0": "native", "eth1": "native"}
        self.pid, self.ctl_path, self.pin_dir = 4242, "/tmp/x.ctrl", "/sys/fs/bpf/x"
        self.svc_traffic, self.dest_traffic, self.counts = {}, {}, {}
        self.conns = [{"proto": 6, "af": 4, "saddr": "1.1.1.1", "sport": 1000 + i, "daddr": "10.0.0.100",
                       "dport": 80, "state": "established", "out": False} for i in range(n_conns)]
        self.ops = []
        self.fail_op = None  # (op, predicate(args)) -> raise a refusal, to test midway failures

    def dispatch(self, op, args):
        self.ops.append((op, args))
        if self.fail_op and self.fail_op[0] == op and self.fail_op[1](args):
            raise HdslbError(errno.ENOSPC, "no free real server slot (limit 2)")
        return commands.dispatch(self, op, args)

    def mutations(self):
        """Changes in order, the ops inside a batch command in their place."""
        out = []
        for op, args in self.ops:
            if op == "batch":
                out += [o for o, _ in args["ops"]]
            elif not commands.is_read_only(op):
                out.append(op)
        return out

    def svc_stats(self, svc_id):
        return self.svc_traffic.get(svc_id, traffic(0, 0, 0, 0, 0))

    def dest_stats(self, slot):
        return self.dest_traffic.get(slot, traffic(0, 0, 0, 0, 0))

    def conn_counts(self):
        return self.counts

    def laddr_conns(self):
        return {}

    def conn_list(self):
        return list(self.conns)

    def conn_table(self):
        return {"size": self.sizes.max_conns, "entries": len(self.conns), "expired": 0, "evicted": 0}

    def link_stats(self, ifname):
        return {"rx_packets": 1, "rx_bytes": 2, "tx_packets": 3, "tx_bytes": 4, "drops": 0}

    def uptime(self):
        return 12.5

    def resolve_soon(self):
        pass

    def announce(self, addr, ifname):
        pass

    # helpers for tests
    def svc(self, addr="10.0.0.100", port=80, proto="tcp"):
        return self.bal.services[(proto, ipaddress.ip_address(addr), port)]

    def dests(self, **kw):
        return {(str(d.addr), d.port): (d.weight, d.fwd) for d in self.svc(**kw).dests.values()}


def quick_start(ctx):
    ctx.bal.addr_add({"addr": "10.0.0.100", "prefixlen": 24, "ifname": "eth0"})
    ctx.bal.service_add(dict(SVC, sched="rr"))
    ctx.bal.dest_add({"svc": SVC, "addr": "192.168.100.2", "port": 80, "fwd": "fnat"})
    ctx.bal.dest_add({"svc": SVC, "addr": "192.168.100.3", "port": 80, "fwd": "fnat", "weight": 2})
    ctx.bal.laddr_add({"svc": SVC, "addr": "192.168.100.200", "ifname": "eth1"})
    svc = ctx.svc()
    ctx.svc_traffic[svc.svc_id] = traffic(30, 300, 280, 30000, 280000)
    slots = {str(d.addr): d.slot for d in svc.dests.values()}
    ctx.dest_traffic[slots["192.168.100.2"]] = traffic(10, 100, 90, 10000, 90000)
    ctx.dest_traffic[slots["192.168.100.3"]] = traffic(20, 200, 190, 20000, 190000)
    ctx.counts = {slots["192.168.100.2"]: (3, 1), slots["192.168.100.3"]: (5, 0)}
    ctx.rates = {("svc", svc.svc_id): {"cps": 5, "inpps": 50, "outpps": 45, "inbps": 5000, "outbps": 45000}}
    return ctx


@pytest.fixture
def ctx():
    return quick_start(FakeCtx(n_conns=7))


@contextlib.asynccontextmanager
async def serving(ctx):
    """A test client of the REST app over ctx (also as client.ctx)."""
    async with TestClient(TestServer(make_app(ctx))) as c:
        c.ctx = ctx
        yield c


@pytest.fixture
async def client(ctx):
    async with serving(ctx) as c:
        yield c


async def expect(resp, status, field="<any>"):
    body = await resp.json()
    assert resp.status == status, body
    if status >= 400:
        assert set(body) >= {"error", "errno", "field"}, body
        if field != "<any>":
            assert body["field"] == field, body
    return body


# --- virtual servers ----------------------------------------------------------------------------------
async def test_list_and_get_vs_are_dpvs_agent_shaped(client):
    body = await expect(await client.get("/v2/vs"), 200)
    openapi._validator("VirtualServerList").validate(body)
    [vs] = body["Items"]
    assert (vs["Id"], vs["Af"], vs["Proto"], vs["Addr"], vs["Port"], vs["SchedName"]) == (
        "10.0.0.100-80-tcp", 2, 6, "10.0.0.100", 80, "rr")
    assert vs["Stats"]["Conns"] == 30 and vs["Stats"]["Cps"] == 5 and vs["Stats"]["OutBps"] == 45000
    rs = {r["Spec"]["ip"]: r for r in vs["RSs"]["Items"]}
    assert rs["192.168.100.3"]["Spec"] == {"ip": "192.168.100.3", "port": 80, "weight": 2, "mode": "FNAT",
                                           "inhibited": False, "overloaded": False}
    assert rs["192.168.100.2"]["ActiveConns"] == 3 and rs["192.168.100.2"]["InactConns"] == 1
    assert vs["Laddrs"]["Items"][0]["addr"] == "192.168.100.200"
    one = await expect(await client.get(VS), 200)
    assert one["Items"] == body["Items"]


async def test_put_vs_creates_then_updates(client, ctx):
    r = await client.put("/v2/vs/10.0.0.101-443-tcp", json={"SchedName": "wrr"})
    assert (await expect(r, 201))["Id"] == "10.0.0.101-443-tcp"
    assert ctx.svc("10.0.0.101", 443).sched == "wrr"
    r = await client.put("/v2/vs/10.0.0.101-443-tcp", json={"SchedName": "rr"})
    assert (await expect(r, 200))["result"] == "updated"
    assert ctx.svc("10.0.0.101", 443).sched == "rr"
    # no body: create-or-keep, defaults as ipvsadm (wlc)
    await expect(await client.put("/v2/vs/10.0.0.102-53-udp"), 201)
    assert ctx.svc("10.0.0.102", 53, "udp").sched == "wlc"
    assert [op for op in ctx.mutations()] == ["service.add", "service.add", "service.edit", "service.add"]


async def test_put_vs_ipv6_id(client, ctx):
    await expect(await client.put("/v2/vs/2001:db8::1-443-tcp", json={"SchedName": "rr"}), 201)
    assert ctx.svc("2001:db8::1", 443).sched == "rr"
    body = await expect(await client.get("/v2/vs/2001:db8::1-443-tcp"), 200)
    assert body["Items"][0]["Af"] == 10 and body["Items"][0]["Id"] == "2001:db8::1-443-tcp"


async def test_post_vs_conflict_is_409(client):
    await expect(await client.post("/v2/vs", json={"Addr": "10.0.0.7", "Port": 80, "Proto": "tcp"}), 201)
    body = await expect(await client.post("/v2/vs", json={"Addr": "10.0.0.7", "Port": 80, "Proto": 6}), 409)
    assert body["errno"] == errno.EEXIST and "exists" in body["error"]


async def test_delete_vs_and_unknown_is_404(client, ctx):
    await expect(await client.delete(VS), 200)
    assert not ctx.bal.services
    body = await expect(await client.delete(VS), 404)
    assert body["errno"] == errno.ESRCH
    await expect(await client.get(VS), 404)
    await expect(await client.get(VS + "/rs"), 404)


@pytest.mark.parametrize("path", ["/v2/vs/10.0.0.100-80", "/v2/vs/10.0.0.300-80-tcp", "/v2/vs/10.0.0.1-99999-tcp",
                                  "/v2/vs/10.0.0.1-80-sctp"])
async def test_bad_vipport_is_400_naming_it(client, path):
    await expect(await client.get(path), 400, field="VipPort")


@pytest.mark.parametrize("body,field", [
    ({"SchedName": "nope"}, "SchedName"),
    ({"SchedName": "rr", "Weight": 1}, "Weight"),
    ({"Timeout": -1}, "Timeout"),
    ({"SynProxy": "yes"}, "SynProxy"),
    ([1, 2], None),
])
async def test_bad_vs_body_is_400_naming_the_field(client, ctx, body, field):
    before = list(ctx.bal.dp.calls)
    b = await expect(await client.put(VS, json=body), 400, field=field)
    assert b["errno"] == errno.EINVAL
    assert ctx.bal.dp.calls == before, "a refused body changes nothing"


async def test_not_json_is_400(client):
    r = await client.put(VS, data=b"{nope", headers={"Content-Type": "application/json"})
    assert "not JSON" in (await expect(r, 400, field=None))["error"]


@pytest.mark.parametrize("body,field", [({"SynProxy": True}, "SynProxy"), ({"Quic": True}, "Quic"),
                                        ({"Fwmark": 3}, "Fwmark")])
async def test_unimplemented_is_501(client, body, field):
    b = await expect(await client.put("/v2/vs/10.0.0.9-80-tcp", json=body), 501, field=field)
    assert b["errno"] == errno.EOPNOTSUPP


async def test_every_scheduler_and_persistence_over_rest(client, ctx):
    await expect(await client.put("/v2/vs/10.0.0.9-80-tcp", json={"SchedName": "mh", "Timeout": 300,
                                                                    "Netmask": "255.255.255.0"}), 201)
    s = ctx.bal.get_service({"proto": "tcp", "addr": "10.0.0.9", "port": 80})
    assert (s.sched, s.persistent, s.netmask, s.persist_plen) == ("mh", 300, "255.255.255.0", 24)
    await expect(await client.put("/v2/vs/10.0.0.9-80-tcp", json={"Timeout": 0}), 200)  # 0 turns it off
    assert s.persistent is None and s.sched == "mh"
    body = await expect(await client.get("/v2/vs/10.0.0.9-80-tcp"), 200)
    assert body["Items"][0]["SchedName"] == "mh" and body["Items"][0]["Timeout"] == 0


async def test_snat_match_service_over_rest(client, ctx):
    ctx.bal.addr_add({"addr": "203.0.113.1", "prefixlen": 24, "ifname": "eth0", "sapool": True})
    match = {"Src": {"Start": "192.168.100.1", "End": "192.168.100.254"}, "OutIfName": "eth0"}
    r = await client.post("/v2/vs", json={"Proto": "icmp", "Match": match, "SchedName": "sh"})
    body = await expect(r, 201)
    vid = body["Id"]
    assert vid.startswith("match-") and r.headers["Location"] == f"/v2/vs/{vid}"
    await expect(await client.put(f"/v2/vs/{vid}/rs", json={"Items": [{"ip": "203.0.113.1", "port": 0}]}), 200)
    svc = next(s for s in ctx.bal.services.values() if s.match)
    assert [(str(d.addr), d.port, d.fwd) for d in svc.dests.values()] == [("203.0.113.1", 0, "snat")]
    got = (await expect(await client.get("/v2/vs"), 200))["Items"]
    openapi._validator("VirtualServerList").validate({"Items": got})
    item = next(i for i in got if i["Id"] == vid)
    assert item["Proto"] == 1 and item["Match"]["Src"] == {"Start": "192.168.100.1", "End": "192.168.100.254"}
    assert item["RSs"]["Items"][0]["Spec"]["mode"] == "SNAT"
    # the match is the identity: a PUT cannot change it; a VIP with a Match is refused
    await expect(await client.put(f"/v2/vs/{vid}", json={"Match": match}), 400, field="Match")
    await expect(await client.post("/v2/vs", json={"Proto": "tcp", "Addr": "10.0.0.1", "Port": 80,
                                                  "Match": match}), 400, field="Addr")
    await expect(await client.get("/v2/vs/match-999"), 404)
    await expect(await client.delete(f"/v2/vs/{vid}"), 200)
    assert not any(s.match for s in ctx.bal.services.values())


# --- real servers -----------------------------------------------------------------------------------
async def test_get_rs(client):
    body = await expect(await client.get(VS + "/rs"), 200)
    openapi._validator("RealServerExpandList").validate(body)
    assert sorted(r["Spec"]["ip"] for r in body["Items"]) == ["192.168.100.2", "192.168.100.3"]


async def test_put_rs_adds_and_updates_only_what_is_given(client, ctx):
    r = await client.put(VS + "/rs", json={"Items": [
        {"ip": "192.168.100.2", "weight": 5},          # exists: weight changes
        {"ip": "192.168.100.3", "port": 80},           # exists, nothing given: unchanged
        {"ip": "192.168.100.4", "mode": "FNAT"},       # new: weight 1, port = the service's
    ]})
    body = await expect(r, 200)
    assert body == {"added": ["192.168.100.4:80"], "updated": ["192.168.100.2:80"], "removed": [],
                    "unchanged": ["192.168.100.3:80"], "warnings": []}
    assert ctx.dests() == {("192.168.100.2", 80): (5, "fnat"), ("192.168.100.3", 80): (2, "fnat"),
                           ("192.168.100.4", 80): (1, "fnat")}


async def test_post_rs_replaces_the_set(client, ctx):
    r = await client.post(VS + "/rs", json={"Items": [{"ip": "192.168.100.3", "weight": 3},
                                                       {"ip": "192.168.100.9", "port": 8080}]})
    body = await expect(r, 200)
    assert body == {"added": ["192.168.100.9:8080"], "updated": ["192.168.100.3:80"],
                    "removed": ["192.168.100.2:80"], "unchanged": [], "warnings": []}
    assert ctx.dests() == {("192.168.100.3", 80): (3, "fnat"), ("192.168.100.9", 8080): (1, "fnat")}
    # additions go in before removals: the service is never left short during the swap
    muts = ctx.mutations()
    assert muts.index("dest.del") > muts.index("dest.add")


async def test_post_rs_empty_list_removes_all(client, ctx):
    body = await expect(await client.post(VS + "/rs", json={"Items": []}), 200)
    assert sorted(body["removed"]) == ["192.168.100.2:80", "192.168.100.3:80"]
    assert ctx.dests() == {}


async def test_delete_rs(client, ctx):
    body = await expect(await client.delete(VS + "/rs", json={"Items": [{"ip": "192.168.100.2"}]}), 200)
    assert body["removed"] == ["192.168.100.2:80"]
    assert list(ctx.dests()) == [("192.168.100.3", 80)]


async def test_delete_rs_with_an_absent_item_removes_nothing(client, ctx):
    before = ctx.dests()
    r = await client.delete(VS + "/rs", json={"Items": [{"ip": "192.168.100.3"}, {"ip": "192.168.100.77"}]})
    await expect(r, 404, field="Items[1]")
    assert ctx.dests() == before and "dest.del" not in ctx.mutations()


async def test_rs_body_validated_before_anything_applies(client, ctx):
    before = list(ctx.bal.dp.calls)
    r = await client.put(VS + "/rs", json={"Items": [{"ip": "192.168.100.5"},
                                                      {"ip": "192.168.100.6", "weight": 70000}]})
    body = await expect(r, 400, field="Items[1].weight")
    assert "65535" in body["error"]
    r = await client.put(VS + "/rs", json={"Items": [{"ip": "192.168.100.5"}, {"port": 80}]})
    await expect(r, 400, field="Items[1].ip")
    r = await client.put(VS + "/rs", json={"Items": [{"ip": "192.168.100.5"}, {"ip": "192.168.100.5", "port": 80}]})
    assert "twice" in (await expect(r, 400, field="Items[1]"))["error"]
    r = await client.put(VS + "/rs", json={"Items": [{"ip": "192.168.100.5", "inhibited": True}]})
    await expect(r, 501, field="Items[0].inhibited")
    assert ctx.bal.dp.calls == before


async def test_rs_failure_midway_changes_nothing(client, ctx):
    ctx.bal.max_dests = 3  # two real servers exist: 192.168.100.7 takes the last slot, .8 finds none
    before, writes = ctx.dests(), len(ctx.bal.dp.calls)
    r = await client.post(VS + "/rs", json={"Items": [{"ip": "192.168.100.2", "weight": 9}, {"ip": "192.168.100.7"},
                                                       {"ip": "192.168.100.8"}]})
    body = await expect(r, 507, field="Items[2]")
    assert body["errno"] == errno.ENOSPC and "192.168.100.8:80" in body["error"]
    assert "nothing was changed" in body["error"] and "rolled_back" not in body
    assert ctx.dests() == before
    assert len(ctx.bal.dp.calls) == writes, "a refused batch writes no map entry"
    assert [op for op, _ in ctx.ops if op == "batch"] == ["batch"], "the set goes as one request"


async def test_rs_refused_mode_is_undone(client, ctx):
    before = ctx.dests()
    r = await client.put(VS + "/rs", json={"Items": [{"ip": "192.168.100.7"},
                                                     {"ip": "192.168.100.8", "port": 8080, "mode": "DR"}]})
    body = await expect(r, 400, field="Items[1]")
    assert "cannot rewrite ports" in body["error"] and "nothing was changed" in body["error"]
    assert ctx.dests() == before
    # every mode is accepted where it makes sense
    await expect(await client.put(VS + "/rs", json={"Items": [{"ip": "192.168.100.8", "mode": "DR"},
                                                              {"ip": "192.168.100.9", "mode": "TUNNEL"},
                                                              {"ip": "192.168.100.10", "port": 8080,
                                                               "mode": "NAT"}]}), 200)


async def test_rs_on_unknown_service_is_404(client):
    await expect(await client.put("/v2/vs/10.9.9.9-80-tcp/rs", json={"Items": [{"ip": "1.2.3.4"}]}), 404)


# --- local addresses --------------------------------------------------------------------------------
async def test_laddr_routes(client, ctx):
    body = await expect(await client.get(VS + "/laddr"), 200)
    openapi._validator("LocalAddressExpandList").validate(body)
    assert body["Items"] == [{"af": 2, "addr": "192.168.100.200", "device": "eth1", "conns": 0, "portConflict": 0}]
    await expect(await client.put(VS + "/laddr", json={"addr": "192.168.100.201", "device": "eth1"}), 201)
    # the same again is a no-op, on another device a conflict
    assert (await expect(await client.put(VS + "/laddr", json={"addr": "192.168.100.201", "device": "eth1"}),
                         200))["result"] == "unchanged"
    await expect(await client.put(VS + "/laddr", json={"addr": "192.168.100.201", "device": "eth0"}), 409,
                 field="device")
    await expect(await client.delete(VS + "/laddr", json={"addr": "192.168.100.201"}), 200)
    assert [str(la.addr) for la in ctx.svc().laddrs] == ["192.168.100.200"]
    await expect(await client.delete(VS + "/laddr", json={"addr": "192.168.100.201"}), 404)


async def test_unknown_device_in_body_is_400_naming_it(client):
    b = await expect(await client.put(VS + "/laddr", json={"addr": "192.168.100.9", "device": "eth9"}), 400,
                     field="device")
    assert b["errno"] == errno.ENODEV
    await expect(await client.put(VS + "/laddr", json={"addr": "192.168.100.9"}), 400, field="device")
    b = await expect(await client.put("/v2/neigh", json={"addr": "192.168.100.9", "lladdr": "02:00:00:00:00:09",
                                                          "device": "eth9"}), 400, field="device")
    assert b["errno"] == errno.ENODEV


@pytest.mark.parametrize("match,field", [({"Src": {"Start": "10.0.0.2"}, "InIfName": "eth9"}, "Match.InIfName"),
                                         ({"InIfName": "eth1", "OutIfName": "eth9"}, "Match.OutIfName")])
async def test_unknown_device_in_a_snat_match_is_400_naming_it(client, match, field):
    """POST /v2/vs with a Match naming an interface the balancer is not attached to was 404 (ENODEV as if the URL
    named the device); the body names it, so it is a bad field value, as a local address's device."""
    before = list(client.ctx.bal.dp.calls)
    b = await expect(await client.post("/v2/vs", json={"Proto": "tcp", "Match": match}), 400, field=field)
    assert b["errno"] == errno.ENODEV and "'eth9'" in b["error"]
    assert client.ctx.bal.dp.calls == before and not client.ctx.bal.snat_order


# --- devices ----------------------------------------------------------------------------------------
async def test_device_list(client):
    body = await expect(await client.get("/v2/device"), 200)
    assert [d["ifname"] for d in body["Items"]] == ["eth0", "eth1"]


async def test_device_addr_routes(client, ctx):
    body = await expect(await client.get("/v2/device/eth0/addr"), 200)
    openapi._validator("InetAddrList").validate(body)
    assert body["Items"] == [{"addr": "10.0.0.100/24", "device": "eth0", "scope": "global", "sapool": False}]
    await expect(await client.put("/v2/device/eth1/addr?sapool=true", json={"addr": "192.168.100.250/24"}), 201)
    assert [a.sapool for a in ctx.bal.addrs if str(a.addr) == "192.168.100.250"] == [True]
    await expect(await client.put("/v2/device/eth1/addr?sapool=true", json={"addr": "192.168.100.250/24"}), 200)
    await expect(await client.put("/v2/device/eth1/addr", json={"addr": "192.168.100.250/16"}), 409, field="addr")
    await expect(await client.put("/v2/device/eth1/addr?sapool=maybe", json={"addr": "192.168.100.251"}), 400,
                 field="sapool")
    await expect(await client.put("/v2/device/eth1/addr", json={"addr": "192.168.100.300/24"}), 400, field="addr")
    await expect(await client.delete("/v2/device/eth1/addr", json={"addr": "192.168.100.250/24"}), 200)
    await expect(await client.delete("/v2/device/eth1/addr", json={"addr": "192.168.100.250"}), 404)


async def test_unknown_device_in_url_is_404(client):
    for path in ("/v2/device/eth9/addr", "/v2/device/eth9/route"):
        b = await expect(await client.get(path), 404)
        assert b["errno"] == errno.ENODEV and "eth9" in b["error"]
    await expect(await client.put("/v2/device/eth9/addr", json={"addr": "10.1.1.1"}), 404)
    await expect(await client.put("/v2/device/eth9/route", json={"dst": "10.1.0.0/16"}), 404)


async def test_device_route_routes(client, ctx):
    body = await expect(await client.get("/v2/device/eth0/route"), 200)
    openapi._validator("RouteList").validate(body)
    assert {r["dst"] for r in body["Items"]} == {"10.0.0.100/32", "10.0.0.0/24"}
    r = await client.put("/v2/device/eth1/route", json={"dst": "0.0.0.0/0", "gateway": "192.168.100.1"})
    await expect(r, 201)
    r = await client.put("/v2/device/eth1/route", json={"dst": "0.0.0.0/0", "gateway": "192.168.100.254", "mtu": 1400})
    assert (await expect(r, 200))["result"] == "updated"
    [rt] = [x for x in ctx.bal.routes if x.net.prefixlen == 0]
    assert str(rt.via) == "192.168.100.254" and rt.mtu == 1400
    await expect(await client.put("/v2/device/eth1/route", json={"dst": "10.1.0.0/16", "device": "eth0"}), 400,
                 field="device")
    await expect(await client.put("/v2/device/eth1/route", json={"dst": "10.1.0.1/16"}), 400, field="dst")
    await expect(await client.put("/v2/device/eth1/route", json={"dst": "10.1.0.0/16", "src": "10.9.0.0/16"}), 501,
                 field="src")
    await expect(await client.delete("/v2/device/eth1/route", json={"dst": "0.0.0.0/0"}), 200)
    assert not [x for x in ctx.bal.routes if x.net.prefixlen == 0]
    await expect(await client.delete("/v2/device/eth1/route", json={"dst": "0.0.0.0/0"}), 404)


# --- neighbours -------------------------------------------------------------------------------------
async def test_neigh_routes(client, ctx):
    r = await client.put("/v2/neigh", json={"addr": "192.168.100.2", "lladdr": "02:00:00:00:00:02", "device": "eth1"})
    await expect(r, 201)
    r = await client.put("/v2/neigh", json={"addr": "192.168.100.2", "lladdr": "02:00:00:00:00:03", "device": "eth1"})
    await expect(r, 200)
    body = await expect(await client.get("/v2/neigh?device=eth1"), 200)
    openapi._validator("NeighList").validate(body)
    assert [(n["addr"], n["lladdr"], n["device"]) for n in body["Items"]] == [
        ("192.168.100.2", "02:00:00:00:00:03", "eth1")]
    assert (await expect(await client.get("/v2/neigh?device=eth0"), 200))["Items"] == []
    await expect(await client.get("/v2/neigh?device=eth9"), 404, field="device")
    await expect(await client.get("/v2/neigh?af=5"), 400, field="af")
    await expect(await client.put("/v2/neigh", json={"addr": "192.168.100.3", "lladdr": "zz", "device": "eth1"}),
                 400, field="lladdr")
    await expect(await client.put("/v2/neigh", json={"addr": "192.168.100.3", "lladdr": "02:00:00:00:00:03",
                                                     "device": "eth7"}), 400, field="device")
    # a device given names the entry's interface: another's, or one not run, removes nothing
    await expect(await client.delete("/v2/neigh", json={"addr": "192.168.100.2", "device": "eth0"}), 404)
    await expect(await client.delete("/v2/neigh", json={"addr": "192.168.100.2", "device": "eth7"}), 400,
                 field="device")
    await expect(await client.delete("/v2/neigh", json={"addr": "192.168.100.2", "device": "eth1"}), 200)
    await client.put("/v2/neigh", json={"addr": "192.168.100.2", "lladdr": "02:00:00:00:00:02", "device": "eth1"})
    await expect(await client.delete("/v2/neigh", json={"addr": "192.168.100.2"}), 200)
    await expect(await client.delete("/v2/neigh", json={"addr": "192.168.100.2"}), 404)


# --- daemon -----------------------------------------------------------------------------------------
async def test_stats(client):
    body = await expect(await client.get("/v2/stats"), 200)
    openapi._validator("Stats").validate(body)
    assert body["counters"]["drop_no_route"] == 4 and body["per_cpu"]["rx"] == [500, 500]
    assert body["conn_table"]["entries"] == 7


async def test_conns_are_paged(client):
    body = await expect(await client.get("/v2/conns"), 200)
    assert (body["total"], body["offset"], body["limit"], len(body["Items"])) == (7, 0, 100, 7)
    body = await expect(await client.get("/v2/conns?offset=2&limit=3"), 200)
    assert [c["sport"] for c in body["Items"]] == [1002, 1003, 1004] and body["total"] == 7
    body = await expect(await client.get("/v2/conns?offset=6&limit=3"), 200)
    assert [c["sport"] for c in body["Items"]] == [1006]
    assert (await expect(await client.get("/v2/conns?offset=70"), 200))["Items"] == []
    await expect(await client.get("/v2/conns?limit=0"), 400, field="limit")
    await expect(await client.get("/v2/conns?limit=100000"), 400, field="limit")
    await expect(await client.get("/v2/conns?offset=-1"), 400, field="offset")


async def test_config_is_501_without_daemon_support(client):
    b = await expect(await client.get("/v2/config"), 501)
    assert b["errno"] == errno.EOPNOTSUPP
    await expect(await client.post("/v2/config", data="x", headers=CONF), 501)


async def test_config_get_and_reload(ctx):
    seen = []

    async def reload_config(text):
        if "bad" in text:
            from hdslb.config.model import ConfigError, Where
            raise ConfigError(Where("<rest>", 3, 5), "lb_algo", "unknown scheduler 'bad'")
        seen.append(text)
        return {"added": ["10.0.0.1:80/TCP"]}

    ctx.config_text = lambda: "virtual_server 10.0.0.100 80 {\n}\n"
    ctx.reload_config = reload_config
    async with TestClient(TestServer(make_app(ctx))) as c:
        r = await c.get("/v2/config")
        assert r.status == 200 and r.content_type == "text/plain"
        assert (await r.text()).startswith("virtual_server")
        body = await expect(await c.post("/v2/config", data="virtual_server 10.0.0.1 80 {}\n", headers=CONF), 200)
        assert body == {"result": "reloaded", "changes": {"added": ["10.0.0.1:80/TCP"]}}
        b = await expect(await c.post("/v2/config", data="lb_algo bad\n", headers=CONF), 400, field="lb_algo")
        assert "<rest>:3:5" in b["error"]
        await expect(await c.post("/v2/config", data="  \n", headers=CONF), 400)
    assert seen == ["virtual_server 10.0.0.1 80 {}\n"]


async def test_health(client, ctx):
    body = await expect(await client.get("/v2/health"), 200)
    assert body["state"] == "Ok" and body["pid"] == 4242
    ctx.xdp_modes.clear()
    assert (await expect(await client.get("/v2/health"), 200))["state"] == "Warning"
    ctx.uptime = None  # daemon.status itself breaks
    r = await client.get("/v2/health")
    assert r.status == 503 and (await r.json())["state"] == "Failure"


async def test_unknown_path_and_method_are_json_errors(client):
    await expect(await client.get("/v2/nope"), 404)
    b = await expect(await client.patch("/v2/vs/10.0.0.100-80-tcp"), 405)
    assert b["errno"] == errno.EOPNOTSUPP


async def test_rest_changes_go_through_ctx_dispatch(client, ctx):
    """The daemon's dispatch persists the model; REST must not go around it."""
    await expect(await client.put(VS + "/rs", json={"Items": [{"ip": "192.168.100.5"}]}), 200)
    assert ("batch", {"ops": [["dest.add", {"svc": SVC, "addr": "192.168.100.5", "port": 80}]]}) in ctx.ops


async def test_command_registry_is_used_without_ctx_dispatch():
    ctx = quick_start(FakeCtx())
    ctx.dispatch = None  # a bare context: the api falls back to commands.dispatch
    async with TestClient(TestServer(make_app(ctx))) as c:
        await expect(await c.put(VS, json={"SchedName": "wrr"}), 200)
    assert ctx.svc().sched == "wrr"


# --- auth -------------------------------------------------------------------------------------------
TOKEN = "s3cret-t0ken-value-0123456789"


async def test_token_required_when_configured(ctx):
    async with TestClient(TestServer(make_app(ctx, token=TOKEN))) as c:
        for headers in ({}, {"Authorization": "Bearer guess-123"}, {"Authorization": TOKEN},
                        {"Authorization": "Basic " + TOKEN}):
            r = await c.get("/v2/vs", headers=headers)
            b = await expect(r, 401)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert TOKEN not in await r.text() and "guess-123" not in b["error"], "never echo a credential"
        r = await c.get("/metrics")
        assert r.status == 401
        await expect(await c.get("/v2/vs", headers={"Authorization": f"Bearer {TOKEN}"}), 200)
        await expect(await c.get("/v2/nope", headers={"Authorization": "Bearer x"}), 401)


async def test_start_api_refuses_other_addresses_without_a_token(ctx):
    for host in ("0.0.0.0", "192.0.2.1", "::", "", "lb.example"):
        with pytest.raises(HdslbError) as e:
            await start_api(ctx, host, 0)
        assert "token" in e.value.message
    assert api_app.is_loopback("127.0.0.1") and api_app.is_loopback("::1") and api_app.is_loopback("localhost")


async def test_token_never_logged(ctx, caplog):
    caplog.set_level(logging.DEBUG)
    runner = await start_api(ctx, "0.0.0.0", 0, token=TOKEN)
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as s:
            for auth in (f"Bearer {TOKEN}", f"Bearer {TOKEN}x", "Bearer nope"):
                async with s.get(f"http://127.0.0.1:{port}/v2/vs?stats=true", headers={"Authorization": auth}) as r:
                    await r.read()
            async with s.put(f"http://127.0.0.1:{port}/v2/vs/bad", headers={"Authorization": f"Bearer {TOKEN}"},
                             json={}) as r:
                assert r.status == 400
    finally:
        await stop_api(runner)
    assert "REST API on http://0.0.0.0" in caplog.text and "bearer token required" in caplog.text
    assert "/v2/vs" in caplog.text, "the access log is on (and captured)"
    assert TOKEN not in caplog.text
    lines = [r.getMessage() for r in caplog.records if r.name == "hdslb.api.access"]
    assert len(lines) == 4
    assert lines[0].startswith('127.0.0.1 "GET /v2/vs?stats=true HTTP/1.1" 200 ')
    assert [ln.split('" ')[1].split()[0] for ln in lines] == ["200", "401", "401", "400"]


async def test_start_api_on_loopback_without_token(ctx):
    runner = await start_api(ctx, "127.0.0.1", 0)
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/v2/health") as r:
                assert r.status == 200
    finally:
        await stop_api(runner)


async def test_start_api_port_in_use_is_a_clear_error(ctx):
    sk = socket.socket()
    sk.bind(("127.0.0.1", 0))
    sk.listen()
    try:
        with pytest.raises(HdslbError, match="cannot serve the REST API"):
            await start_api(ctx, "127.0.0.1", sk.getsockname()[1])
    finally:
        sk.close()


# --- the OpenAPI document ---------------------------------------------------------------------------
def test_openapi_document_validates():
    validate = pytest.importorskip("openapi_spec_validator").validate
    validate(openapi.document())


def test_openapi_document_structure():
    """What holds without openapi-spec-validator: the required keys, and every $ref resolves."""
    doc = openapi.document()
    assert doc["openapi"] == "3.1.0" and {"title", "version"} <= set(doc["info"]) and doc["paths"]

    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for v in node.values():
                yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in refs(doc):
        target = doc
        for part in ref.lstrip("#/").split("/"):
            target = target[part]
    for path, item in doc["paths"].items():
        for m, op in item.items():
            if m != "parameters":
                assert op["responses"] and op["operationId"], (m, path)


async def test_openapi_served_and_matches_the_routes(client, ctx):
    doc = await expect(await client.get("/v2/openapi.json"), 200)
    assert doc["openapi"].startswith("3.")
    in_doc = {(m.upper(), p) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    app = make_app(ctx)
    in_app = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    assert {(r.method, r.resource.canonical) for r in app.router.routes() if r.method == "HEAD"} == {
        ("HEAD", p) for m, p, _ in ROUTES if m == "GET"}, "every GET answers HEAD too"
    assert in_doc == in_app == {(m, p) for m, p, _ in ROUTES}
    # every x-hdslb-ops entry names a registered command (or a documented ctx hook)
    for item in doc["paths"].values():
        for m, op in item.items():
            if m != "parameters":
                for name in op["x-hdslb-ops"]:
                    assert name in commands.COMMANDS or name.startswith("ctx."), name


async def test_rs_failure_on_the_first_step_reports_no_rollback(client, ctx):
    before = ctx.dests()
    r = await client.put(VS + "/rs", json={"Items": [{"ip": "2001:db8::7"}]})
    body = await expect(r, 501, field="Items[0]")
    assert "NAT46" in body["error"] and "rolled_back" not in body
    assert ctx.dests() == before
