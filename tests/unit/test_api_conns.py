"""GET /v2/conns pages one snapshot of the table: offset 0 makes REST's shared snapshot, and another client's offset
0 replaces it. Each reply names its snapshot, and ?snapshot= pages that one, so a client walking the table is not
switched to someone else's snapshot halfway (duplicates, entries missed, a total that changes, unnoticed)."""

import errno

import pytest

from tests.unit.test_api import FakeCtx, expect, quick_start, serving


class Listing:
    """What Daemon.conn_listing makes (hdslb.fastpath.aging.Listing): a snapshot, read by entries(start, stop)."""

    def __init__(self, conns):
        self.conns = list(conns)

    def __len__(self):
        return len(self.conns)

    def entries(self, start=0, stop=None):
        return self.conns[start:stop]


@pytest.fixture
async def client():
    ctx = quick_start(FakeCtx(n_conns=6))
    ctx.conn_listing = lambda inbound: Listing(ctx.conns)
    async with serving(ctx) as c:
        yield c


def sports(body):
    return [c["sport"] for c in body["Items"]]


async def test_a_walk_names_its_snapshot_and_keeps_it(client):
    a = await expect(await client.get("/v2/conns?limit=2"), 200)
    assert sports(a) == [1000, 1001] and a["total"] == 6 and a["snapshot"]
    page = await expect(await client.get(f"/v2/conns?offset=2&limit=2&snapshot={a['snapshot']}"), 200)
    assert sports(page) == [1002, 1003] and page["snapshot"] == a["snapshot"]
    client.ctx.conns = client.ctx.conns[3:]  # the table changes, and another client starts its own walk
    b = await expect(await client.get("/v2/conns?limit=2"), 200)
    assert sports(b) == [1003, 1004] and b["total"] == 3 and b["snapshot"] != a["snapshot"]
    # without ?snapshot= a later offset reads the newest shared snapshot (the other client's) ...
    assert sports(await expect(await client.get("/v2/conns?offset=2&limit=2"), 200)) == [1005]
    # ... with it, the first walk goes on in its own
    page = await expect(await client.get(f"/v2/conns?offset=4&limit=2&snapshot={a['snapshot']}"), 200)
    assert sports(page) == [1004, 1005] and page["total"] == 6
    # a walk read to its end does not take the shared snapshot away from the other client
    assert sports(await expect(await client.get(f"/v2/conns?offset=2&limit=2&snapshot={b['snapshot']}"),
                               200)) == [1005]
    assert sports(await expect(await client.get("/v2/conns?offset=1&limit=2"), 200)) == [1004, 1005]


async def test_a_first_page_nobody_walked_on_is_replaced_and_its_walk_told(client):
    """A client polling the first page keeps one snapshot alive, as before; a walk whose snapshot another
    client's offset 0 replaced before its second page is told so (410), not switched."""
    a = await expect(await client.get("/v2/conns?limit=2"), 200)
    await expect(await client.get("/v2/conns?limit=2"), 200)
    assert len(client.ctx.conn_snapshots) == 1
    await expect(await client.get(f"/v2/conns?offset=2&snapshot={a['snapshot']}"), 410, field="snapshot")


async def test_a_snapshot_gone_is_410_naming_it(client):
    b = await expect(await client.get("/v2/conns?offset=2&snapshot=0123456789abcdef"), 410, field="snapshot")
    assert b["errno"] == errno.ESTALE and "offset 0" in b["error"]
