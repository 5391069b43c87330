"""What a request says is what it gets: an address deleted only with its own prefix, a DELETE of real servers
that names another state refused, a range with an End but no Start refused, unknown query parameters refused
(dpvs-agent's own ones taken)."""

import pytest

from hdslb.api import openapi
from tests.unit.test_api import VS, FakeCtx, expect, quick_start, serving


@pytest.fixture
async def client():
    ctx = quick_start(FakeCtx())
    ctx.bal.addr_add({"addr": "10.0.0.7", "prefixlen": 24, "ifname": "eth0"})
    async with serving(ctx) as c:
        yield c


def addrs(ctx):
    return {str(a.addr) for a in ctx.bal.addrs}


async def test_deleting_an_address_with_another_prefix_deletes_nothing(client):
    b = await expect(await client.delete("/v2/device/eth0/addr", json={"addr": "10.0.0.7/8"}), 404, field="addr")
    assert "10.0.0.7/24" in b["error"] and "10.0.0.7" in addrs(client.ctx)
    await expect(await client.delete("/v2/device/eth0/addr", json={"addr": "10.0.0.7/24"}), 200)
    assert "10.0.0.7" not in addrs(client.ctx)


async def test_deleting_an_address_without_a_prefix_still_works(client):
    await expect(await client.delete("/v2/device/eth0/addr", json={"addr": "10.0.0.7"}), 200)
    assert "10.0.0.7" not in addrs(client.ctx)


@pytest.mark.parametrize("item,field", [({"weight": 99}, "Items[0].weight"), ({"mode": "DR"}, "Items[0].mode")])
async def test_delete_rs_naming_another_state_is_refused(client, item, field):
    body = {"Items": [{"ip": "192.168.100.3", **item}]}
    await expect(await client.delete(VS + "/rs", json=body), 400, field=field)
    assert len(client.ctx.svc().dests) == 2


@pytest.mark.parametrize("item", [{"weight": 0, "inhibited": False, "overloaded": False},  # dpvs-agent's Go client
                                  {"port": 80, "weight": 2, "mode": "FNAT"}])               # what GET showed
async def test_delete_rs_takes_zero_values_and_the_servers_own(client, item):
    await expect(await client.delete(VS + "/rs", json={"Items": [{"ip": "192.168.100.3", **item}]}), 200)
    assert len(client.ctx.svc().dests) == 1


@pytest.mark.parametrize("which", ["Src", "Dest"])
async def test_a_match_range_with_end_but_no_start_is_400(client, which):
    n = len(client.ctx.bal.services)
    body = {"Proto": "tcp", "Match": {which: {"End": "10.0.0.1"}}}
    await expect(await client.post("/v2/vs", json=body), 400, field=f"Match.{which}.Start")
    assert len(client.ctx.bal.services) == n


@pytest.mark.parametrize("method,path,query", [
    ("GET", "/v2/conns", "limt=5"), ("GET", "/v2/vs", "statz=true"), ("PUT", VS + "/rs", "bogus=1"),
    ("GET", "/v2/neigh", "dev=eth0"),
])
async def test_unknown_query_parameters_are_400_naming_them(client, method, path, query):
    kw = {"json": {"Items": []}} if method == "PUT" else {}
    b = await expect(await client.request(method, f"{path}?{query}", **kw), 400, field=query.split("=")[0])
    assert "unknown query parameter" in b["error"]


@pytest.mark.parametrize("method,path", [
    ("GET", "/v2/vs?stats=true"), ("GET", VS + "?stats=true"), ("GET", VS + "/rs?stats=true"),
    ("GET", VS + "/laddr?stats=true"), ("GET", "/v2/device?stats=true"),
    ("GET", "/v2/device/eth0/addr?stats=true&verbose=true"), ("GET", "/v2/device/eth0/route?stats=true"),
    ("PUT", VS + "/rs?healthcheck=true"), ("GET", "/v2/conns?offset=0&limit=5"), ("GET", "/v2/neigh?af=4"),
])
async def test_dpvs_agents_query_parameters_are_taken(client, method, path):
    kw = {"json": {"Items": [{"ip": "192.168.100.3", "weight": 2}]}} if method == "PUT" else {}
    await expect(await client.request(method, path, **kw), 200)


@pytest.mark.parametrize("opt,status,field", [({"ConnTimeout": 5}, 501, "Items[1].ConnTimeout"),
                                              ({"Netmask": 64}, 400, "Items[1].Netmask"),
                                              ({"Netmask": "255.0.255.0"}, 400, "Items[1].Netmask")])
async def test_a_bulk_items_refused_option_is_named_by_its_item(client, opt, status, field):
    """PATCH /v2/vs names a refused item by field (Items[i]...): a bad option of the 2nd service of a 10k bulk was
    named "ConnTimeout" or "Netmask" alone, with nothing saying which of the 10k items had it."""
    n = len(client.ctx.bal.services)
    items = [{"Addr": "10.0.1.1", "Port": 80, "Proto": "tcp"}, {"Addr": "10.0.1.2", "Port": 80, "Proto": "tcp", **opt}]
    b = await expect(await client.patch("/v2/vs", json={"Items": items}), status, field=field)
    assert b["error"].startswith(field + ": ")
    assert len(client.ctx.bal.services) == n


@pytest.mark.parametrize("path,name", [("/v2/conns?limit=1&offset=0&limit=5000", "limit"),
                                       ("/v2/neigh?af=4&af=6", "af"), ("/v2/vs?stats=true&stats=false", "stats")])
async def test_a_query_parameter_given_twice_is_400_naming_it(client, path, name):
    """Only the first of a repeated parameter was read (?limit=1&limit=5000 paged by 1, ?af=4&af=6 listed IPv4
    only): as a key given twice in a JSON body, it is refused."""
    b = await expect(await client.get(path), 400, field=name)
    assert "twice" in b["error"]


@pytest.mark.parametrize("path,status", [("/v2/health", 200), ("/v2/conns?limit=5", 200), ("/metrics", 200),
                                         ("/v2/vs/10.0.0.1-80-tcp", 404), ("/v2/conns?limt=5", 400)])
async def test_head_is_answered_as_get_without_a_body(client, path, status):
    """HEAD, which every HTTP server must answer as GET (RFC 9110 9.1; haproxy's `option httpchk HEAD /v2/health`
    is a common liveness probe), was a 405."""
    r = await client.head(path)
    assert r.status == status and await r.read() == b""
    assert r.headers["Content-Type"] == (await client.get(path)).headers["Content-Type"]


async def test_health_is_not_ok_before_the_daemon_is_ready(client):
    """hdslbd serves REST before its config file is applied and its checks started (seconds at thousands of virtual
    servers): /v2/health said Ok meanwhile, and a probe or a VRRP track script trusting it put a balancer with no
    services in service."""
    client.ctx.ready = False
    r = await client.get("/v2/health")
    b = await r.json()
    assert r.status == 503 and b["state"] == "Warning" and "starting" in b["msg"] and b["ready"] is False
    client.ctx.ready = True
    assert (await expect(await client.get("/v2/health"), 200))["state"] == "Ok"


async def test_health_is_not_ok_while_an_interface_is_gone(client):
    """An interface deleted takes its XDP program with it (hdslbd attaches again when it comes back; daemon.status
    lists it under gone): /v2/health still said Ok, attached to it."""
    client.ctx.ifaces_gone = {"eth1"}
    b = await expect(await client.get("/v2/health"), 200)
    assert b["state"] == "Warning" and "eth1" in b["msg"] and "gone" in b["msg"] and b["gone"] == ["eth1"]
    client.ctx.ifaces_gone = set()
    assert (await expect(await client.get("/v2/health"), 200))["state"] == "Ok"


@pytest.mark.parametrize("method,path,body", [
    ("PUT", VS + "/rs", {"Items": [{"ip": "172.16.0.1", "mode": "DR"}]}),
    ("POST", VS + "/rs", {"Items": [{"ip": "192.168.100.2"}, {"ip": "172.16.0.1", "mode": "DR"}]}),
    ("PUT", VS, {"RSs": {"Items": [{"ip": "172.16.0.1", "mode": "DR"}]}}),
    ("PUT", "/v2/vs/10.0.0.9-80-tcp", {"SchedName": "rr", "RSs": {"Items": [{"ip": "172.16.0.1", "mode": "DR"}]}}),
])
async def test_a_real_servers_warnings_are_in_the_reply(client, method, path, body):
    """A change accepted that cannot work yet (a DR server with no route to it) is warned about by ipvsadm (on
    stderr) and PATCH /v2/vs (warnings): PUT/POST .../rs and PUT /v2/vs with RSs answered 200 and said nothing."""
    r = await client.request(method, path, json=body)
    b = await r.json()
    assert r.status in (200, 201), b
    assert b["warnings"] == ["172.16.0.1:80: no route to 172.16.0.1: DR needs the real server on a directly "
                             "connected network"]
    openapi._validator("SetChange").validate(b)
