"""Netmask as dpvs-agent has it: VirtualServerSpecExpand.Netmask is a uint32 (DPVS's __be32 IPv4 mask read on x86,
the prefix length for IPv6). GET shows it so; PUT takes it back (and the spellings hdslb took before)."""

import pytest

from hdslb.api import openapi
from tests.unit.test_api import FakeCtx, expect, quick_start, serving

V4 = "/v2/vs/10.0.0.9-80-tcp"
V6 = "/v2/vs/2001:db8::9-80-tcp"


@pytest.fixture
async def client():
    ctx = quick_start(FakeCtx())
    async with serving(ctx) as c:
        yield c


async def netmask(c, path):
    body = await expect(await c.get(path), 200)
    openapi._validator("VirtualServerList").validate(body)
    return body["Items"][0]["Netmask"]


@pytest.mark.parametrize("given,shown,model", [
    ("255.255.255.0", 16777215, "255.255.255.0"),   # ipvsadm -M spelling
    (24, 16777215, "255.255.255.0"),                # a prefix length
    (16777215, 16777215, "255.255.255.0"),          # what GET shows: round trip
    (65535, 65535, "255.255.0.0"),
    (4294967295, 4294967295, None),                 # all ones: no granularity
    (0, 4294967295, None),
])
async def test_ipv4_netmask_is_dpvs_agents_uint32(client, given, shown, model):
    await expect(await client.put(V4, json={"SchedName": "rr", "Timeout": 60, "Netmask": given}), 201)
    assert await netmask(client, V4) == shown
    svc = client.ctx.bal.get_service({"proto": "tcp", "addr": "10.0.0.9", "port": 80})
    assert svc.netmask == model
    await expect(await client.put(V4, json={"Netmask": await netmask(client, V4)}), 200)  # GET -> PUT keeps it
    assert client.ctx.bal.get_service({"proto": "tcp", "addr": "10.0.0.9", "port": 80}).netmask == model


async def test_ipv6_netmask_is_the_prefix_length(client):
    await expect(await client.put(V6, json={"Timeout": 60}), 201)
    assert await netmask(client, V6) == 128
    await expect(await client.put(V6, json={"Netmask": 64}), 200)
    assert await netmask(client, V6) == 64


@pytest.mark.parametrize("bad", [16777216, 200, "٢٤", -1, 2**32])  # 0.0.0.1 / 200.0.0.0 are not masks
async def test_a_bad_netmask_is_400_naming_it(client, bad):
    await expect(await client.put(V4, json={"Netmask": bad}), 400, field="Netmask")
    assert not any(str(s.addr) == "10.0.0.9" for s in client.ctx.bal.services.values())


async def test_a_host_mask_is_not_a_netmask(client):
    await expect(await client.put(V4, json={"Netmask": "0.0.0.255"}), 400, field="Netmask")


@pytest.mark.parametrize("path,bad", [(V4, "abc"), (V4, "33"), (V4, "/40"), (V6, "ffff::"), (V6, "0"), (V6, "129")])
async def test_a_netmask_string_the_model_refuses_is_400_naming_it(client, path, bad):
    """A string Netmask went to the model unchecked unless it was a dotted IPv4 mask: the model's refusal came back
    with field null."""
    await expect(await client.put(path, json={"Timeout": 60, "Netmask": bad}), 400, field="Netmask")
    assert not any(str(s.addr) in ("10.0.0.9", "2001:db8::9") for s in client.ctx.bal.services.values())
