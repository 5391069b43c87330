"""conn.list from the conn table's numpy columns (hdslb.fastpath.aging.Listing) and its pages: the same entries,
field for field, as the dict-based Daemon.conn_list on tables with flows in every pair of states; pages served
from one snapshot per listing (consistent, the table read once), cursors that expire or are unknown refused
clearly, bad paging arguments refused before anything is read, and an unpaged reply too large for a control frame
refused naming paging before it is built."""

import asyncio
import errno
import ipaddress
import random
import socket
import struct
import types

import pytest

from hdslb.ctl import commands, protocol
from hdslb.daemon import Daemon
from hdslb.errors import HdslbError
from hdslb.fastpath import abi, aging
from tests.unit.test_aging_columns import KEY, OUT, VAL, VALID, XLAT, _addr, _table

NAMES = abi.conn_states()
LIM_S = aging.Limits(by_state=(10, 30, 30, 900, 7, 3, 60), udp=300, close=3)
TICK = 1_000_000  # ns a jiffy in these tables (last_seen values are jiffies)
BASE = 5_000


def to_ns(j):
    return j * TICK + BASE


def _unique(ents):
    """Each key once, at its first place with its last value (what the columns keep of a live walk)."""
    return list({k: (k, v) for k, v in ents}.values())


def _dicts(ents, ncpu, shared):
    """What Maps.conns() yields for these raw entries: the newest filled-in copy, the furthest state."""
    out = []
    for k, v in ents:
        sport, dport, proto, af, _pad, sa, da = KEY.unpack(k)
        copies = [VAL.unpack(v[i * aging.VAL_SIZE:(i + 1) * aging.VAL_SIZE]) for i in range(ncpu)]
        best, cpu, state = None, -1, 0
        for i, c in enumerate(copies):
            if c[6] & VALID:
                state = max(state, c[7])
                if best is None or c[10] > best[10]:
                    best, cpu = c, i
        if best is None:
            continue
        to_af = (10 - af) if best[6] & XLAT else af

        def ip(raw, fam):
            return ipaddress.IPv4Address(raw[:4]) if fam == 4 else ipaddress.IPv6Address(raw)

        out.append({"proto": proto, "af": af, "saddr": ip(sa, af), "sport": socket.ntohs(sport),
                    "daddr": ip(da, af), "dport": socket.ntohs(dport), "to_saddr": ip(best[11], to_af),
                    "to_sport": socket.ntohs(best[0]), "to_daddr": ip(best[12], to_af),
                    "to_dport": socket.ntohs(best[1]), "out": bool(best[6] & OUT), "state": state,
                    "svc_id": best[5], "dest_slot": best[8], "last_seen_ns": to_ns(best[10]),
                    "cpu": None if shared else cpu})
    return out


def _old(ents, ncpu, shared, now_ns, monkeypatch):
    """The dict-based listing (Daemon.conn_list) over these entries."""
    import hdslb.daemon as dmod

    monkeypatch.setattr(dmod.time, "clock_gettime_ns", lambda clk: now_ns)
    fake = types.SimpleNamespace(_conns=lambda: _dicts(ents, ncpu, shared), idle_limits=lambda: LIM_S)
    return Daemon.conn_list(fake)


def _listing(ents, ncpu, shared, now_ns, inbound=False, batches=3):
    cut = max(1, len(ents) // batches)
    parts = [aging.ListColumns.extract(b"".join(k for k, _ in ents[i:i + cut]),
                                       b"".join(v for _, v in ents[i:i + cut]), ncpu)
             for i in range(0, len(ents), cut)]
    cols = aging.ListColumns.from_batches(parts)
    return aging.Listing(cols, now_ns, to_ns, LIM_S, NAMES, shared, inbound)


def _every_state_pair(ncpu, now):
    """A TCP flow (inbound + reply entry pointing at each other) for every pair of states, both entry orders,
    a UDP one, a lone entry, and an IPv6 and a NAT64 pair."""
    rnd = random.Random(7)
    ents = []

    def val(sa, da, sp, dp, flags, state, last, cpu_filled=0):
        copies = []
        for c in range(ncpu):
            if c == cpu_filled % ncpu:
                copies.append(VAL.pack(sp, dp, 7, b"\x02" * 6, b"\x04" * 6, 11 + c, flags, state, 40 + c, 1, last,
                                       sa, da))
            else:
                copies.append(bytes(aging.VAL_SIZE))
        return b"".join(copies)

    n = 0
    for af, raf, proto in ((4, 4, socket.IPPROTO_TCP), (6, 6, socket.IPPROTO_TCP), (6, 4, socket.IPPROTO_TCP),
                           (4, 4, socket.IPPROTO_UDP)):
        states = range(len(NAMES) + 1) if proto == socket.IPPROTO_TCP else (0, 5)
        for sin in states:
            for sout in states:
                n += 1
                cl, vip = _addr(rnd, af), _addr(rnd, af)
                rs, la = _addr(rnd, raf), _addr(rnd, raf)
                cp, vp, rp, lp = 1000 + n, 80, 8080, 2000 + n
                xl = XLAT if af != raf else 0
                kin = KEY.pack(cp, vp, proto, af, 0, cl, vip)
                kout = KEY.pack(rp, lp, proto, raf, 0, rs, la)
                lin, lout = now - rnd.choice([0, 2000, 50_000, 600_000]), now - rnd.choice([0, 9000, 400_000])
                ein = (kin, val(la, rs, lp, rp, VALID | xl, sin, lin, n))
                eout = (kout, val(vip, cl, vp, cp, VALID | OUT | xl, sout, lout, n + 1))
                ents += [ein, eout] if n % 2 else [eout, ein]
    cl, vip, rs = (_addr(rnd, 4) for _ in range(3))
    ents.append((KEY.pack(5, 80, socket.IPPROTO_TCP, 4, 0, cl, vip), val(cl, rs, 5, 80, VALID, 2, now - 10)))
    return ents


@pytest.mark.parametrize("ncpu,shared", [(1, True), (2, False), (4, False)])
def test_every_state_pair_lists_as_the_dict_path(ncpu, shared, monkeypatch):
    now = 10_000_000
    ents = _every_state_pair(ncpu, now)
    old = _old(ents, ncpu, shared, to_ns(now), monkeypatch)
    lst = _listing(ents, ncpu, shared, to_ns(now))
    new = lst.entries()
    assert len(new) == len(old) == len(ents)
    assert {c["state"] for c in new} == set(NAMES) | {"?"}, "flows in every state"
    assert new == old
    assert [list(c) for c in new] == [list(c) for c in old], "the same fields in the same order"
    # pages are slices of the same
    assert lst.entries(0, 7) + lst.entries(7, 40) + lst.entries(40) == old


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ncpu", [1, 2, 4])
def test_random_tables_list_as_the_dict_path(seed, ncpu, monkeypatch):
    ents, now = _table(seed, ncpu, 300)
    ents = _unique(ents)
    shared = ncpu == 1
    old = _old(ents, ncpu, shared, to_ns(now), monkeypatch)
    lst = _listing(ents, ncpu, shared, to_ns(now))
    assert lst.entries() == old
    inbound = _listing(ents, ncpu, shared, to_ns(now), inbound=True)
    assert inbound.entries() == [c for c in old if not c["out"]]


@pytest.mark.parametrize("ncpu,shared", [(1, True), (2, False)])
def test_an_icmp_flow_is_listed_as_icmp_not_as_udp(ncpu, shared, monkeypatch):
    """A SNAT'd ping is one flow in the UDP state (CS_UDP, the udp timeout); ipvsadm -Lnc printed it as
    `[1]icmp 300s UDP ...` (seen in a netns lab). Listed by its protocol, as LVS names the state ("ICMP"), by both
    listing paths; a UDP flow stays "udp"."""
    now = 10_000_000
    rnd = random.Random(3)
    ents = []
    for i, proto in enumerate((socket.IPPROTO_ICMP, socket.IPPROTO_UDP, socket.IPPROTO_ICMPV6)):
        af = 6 if proto == socket.IPPROTO_ICMPV6 else 4
        cl, out, rs = (_addr(rnd, af) for _ in range(3))
        copy = VAL.pack(7 + i, 0, 7, b"\x02" * 6, b"\x04" * 6, 1, VALID, abi.conn_states().index("udp"), 3, 1,
                        now - 5, out, rs)
        ents.append((KEY.pack(7 + i, 0, proto, af, 0, cl, rs), copy + bytes(aging.VAL_SIZE) * (ncpu - 1)))
    old = _old(ents, ncpu, shared, to_ns(now), monkeypatch)
    new = _listing(ents, ncpu, shared, to_ns(now)).entries()
    assert [c["state"] for c in new] == [c["state"] for c in old] == ["icmp", "udp", "icmp"]
    assert new == old


def test_max_bytes_bounds_the_encoded_size():
    now = 10_000_000
    ents = _every_state_pair(2, now)
    lst = _listing(ents, 2, False, to_ns(now))
    for a, b in ((0, None), (0, 1), (10, 60)):
        size = len(protocol.encode({"conns": lst.entries(a, b)}))
        assert size <= lst.max_bytes(a, b) < 2 * size


# --- paging through commands.conn_list, on a fake daemon ---------------------------------------------
class FakeDaemon:
    """conn_listing() from columns over a table that changes under it (entries(): what the table holds now)."""

    def __init__(self, ents, ncpu=2, now=10_000_000):
        self.ents, self.ncpu, self.now, self.reads = ents, ncpu, now, 0
        self.persist_list = lambda: [{"proto": "tcp", "client": "10.1.0.0"}]

    def conn_listing(self, inbound=False):
        self.reads += 1
        return _listing(self.ents, self.ncpu, False, to_ns(self.now), inbound)


async def _call(ctx, args):
    res = commands.dispatch(ctx, "conn.list", args)
    return await res if asyncio.iscoroutine(res) else res


async def test_pages_come_from_one_snapshot():
    ents, now = _table(3, 2, 300)
    ents = _unique(ents)
    d = FakeDaemon(ents)
    whole = d.conn_listing().entries()
    d.reads = 0
    first = await _call(d, {"limit": 100})
    assert first["templates"] and first["offset"] == 0 and first["total"] == len(whole)
    got, page = list(first["conns"]), first
    d.ents = ents[: len(ents) // 2]  # the table changes meanwhile: the listing does not
    while page["next"] is not None:
        page = await _call(d, {"limit": 100, "cursor": page["cursor"], "offset": page["next"]})
        assert page["templates"] == [] and page["cursor"] == first["cursor"]
        got += page["conns"]
    assert got == whole and d.reads == 1, "one read of the table for the whole listing"
    # read to its end, a cursor listing is gone
    with pytest.raises(HdslbError) as e:
        await _call(d, {"limit": 100, "cursor": first["cursor"], "offset": 0})
    assert e.value.errno == errno.ESTALE and "start the listing again" in e.value.message


async def test_inbound_pages_hold_the_client_direction_only():
    ents, _ = _table(4, 2, 200)
    d = FakeDaemon(_unique(ents))
    want = [c for c in d.conn_listing().entries() if not c["out"]]
    page = await _call(d, {"limit": 33, "inbound": True})
    got = list(page["conns"])
    while page["next"] is not None:
        page = await _call(d, {"limit": 33, "cursor": page["cursor"], "offset": page["next"]})
        got += page["conns"]
    assert got == want and page["total"] == len(want)


async def test_a_cursor_expires_and_snapshots_are_bounded(monkeypatch):
    ents, _ = _table(5, 2, 100)
    d = FakeDaemon(_unique(ents))
    t = [1000.0]
    d.conn_snapshots = commands.ConnSnapshots(ttl=60, cap=2, clock=lambda: t[0])
    a = await _call(d, {"limit": 10})
    t[0] += 59
    assert (await _call(d, {"cursor": a["cursor"], "offset": 10, "limit": 10}))["offset"] == 10  # renewed
    t[0] += 59
    await _call(d, {"cursor": a["cursor"], "offset": 20, "limit": 10})
    t[0] += 61
    with pytest.raises(HdslbError) as e:
        await _call(d, {"cursor": a["cursor"], "offset": 30, "limit": 10})
    assert e.value.errno == errno.ESTALE and "unknown or expired" in e.value.message
    # at most `cap` listings: the oldest goes first
    b = await _call(d, {"limit": 10})
    c = await _call(d, {"limit": 10})
    x = await _call(d, {"limit": 10})
    assert len(d.conn_snapshots) == 2
    with pytest.raises(HdslbError):
        await _call(d, {"cursor": b["cursor"], "offset": 10, "limit": 10})
    for p in (c, x):
        assert (await _call(d, {"cursor": p["cursor"], "offset": 10, "limit": 10}))["offset"] == 10


@pytest.mark.parametrize("args,word", [
    ({"limit": 0}, "limit"), ({"limit": commands.CONN_PAGE_MAX + 1}, "limit"), ({"limit": "5"}, "limit"),
    ({"limit": True}, "limit"), ({"offset": -1}, "offset"), ({"offset": 1.5}, "offset"),
    ({"cursor": 5}, "cursor"), ({"cursor": ""}, "cursor"), ({"cursor": "x" * 65}, "cursor"),
    ({"limit": 5, "inbound": "yes"}, "inbound"), ({"cursor": "abc", "shared": True}, "shared"),
])
async def test_bad_paging_arguments_are_refused_and_read_nothing(args, word):
    d = FakeDaemon(_unique(_table(6, 2, 20)[0]))
    d.conn_snapshots = commands.ConnSnapshots()
    with pytest.raises(HdslbError) as e:
        await _call(d, args)
    assert e.value.errno == errno.EINVAL and word in e.value.message
    assert d.reads == 0 and len(d.conn_snapshots) == 0


async def test_an_unknown_cursor_is_refused():
    d = FakeDaemon(_unique(_table(6, 2, 20)[0]))
    with pytest.raises(HdslbError) as e:
        await _call(d, {"cursor": "0123456789abcdef", "offset": 0})
    assert e.value.errno == errno.ESTALE and d.reads == 0


@pytest.mark.parametrize("args", [{"inbound": 1}, {"inbound": "yes"}, {"templates_only": "x"},
                                  {"templates_only": 1, "limit": 5}])
async def test_conn_list_flags_are_checked_paged_or_not(args):
    """An op refuses a value of the wrong type before doing anything (README, Control operations): unpaged,
    conn.list took {"inbound": 1} and {"templates_only": "x"} (the paging check never ran)."""
    d = FakeDaemon(_unique(_table(6, 2, 20)[0]))
    with pytest.raises(HdslbError) as e:
        await _call(d, args)
    assert e.value.errno == errno.EINVAL and next(iter(k for k in args if k != "limit")) in e.value.message
    assert d.reads == 0


async def test_an_unpaged_inbound_listing_lists_the_client_direction_only():
    """inbound: true asked unpaged came back with both directions (the flag reached paged listings only)."""
    d = FakeDaemon(_unique(_table(6, 2, 40)[0]))
    got = await _call(d, {"inbound": True})
    assert got["conns"] == [c for c in d.conn_listing().entries() if not c["out"]] and got["conns"]


async def test_an_unpaged_listing_too_large_for_a_frame_is_refused_naming_paging(monkeypatch):
    ents, _ = _table(7, 2, 300)
    d = FakeDaemon(_unique(ents))
    whole = await _call(d, {})
    assert whole["conns"] == d.conn_listing().entries()  # small: today's reply
    built = []
    real = aging.Listing.entries
    monkeypatch.setattr(aging.Listing, "entries", lambda self, *a: built.append(1) or real(self, *a))
    monkeypatch.setattr(protocol, "MAX_FRAME", 20_000)
    with pytest.raises(HdslbError) as e:
        await _call(d, {})
    assert e.value.errno == errno.EMSGSIZE and "pages" in e.value.message and "cursor" in e.value.message
    assert built == [], "refused before any entry was built"
    # a page still fits
    assert len((await _call(d, {"limit": 20}))["conns"]) == 20


async def test_rest_offsets_share_one_snapshot():
    """/v2/conns takes offset and limit only: offset 0 reads the table, later offsets read that snapshot."""
    ents, _ = _table(8, 2, 100)
    d = FakeDaemon(_unique(ents))
    whole = d.conn_listing().entries()
    d.reads = 0
    p0 = await _call(d, {"offset": 0, "limit": 50, "shared": True})
    d.ents = d.ents[:10]
    p1 = await _call(d, {"offset": 50, "limit": 50, "shared": True})
    p2 = await _call(d, {"offset": 100, "limit": 500, "shared": True})
    assert p0["conns"] + p1["conns"] + p2["conns"] == whole and d.reads == 1
    assert p2["next"] is None and p0["total"] == len(whole)
    again = await _call(d, {"offset": 0, "limit": 50, "shared": True})  # offset 0: the table anew
    assert d.reads == 2 and again["total"] == len(d.conn_listing().entries())


def test_ipvsadm_lnc_pages_through_and_prints_as_one_listing_would(monkeypatch, capsys):
    """ipvsadm -Lnc asks for pages of inbound entries and prints each as it comes: the same text as today's one
    reply, the templates last; each page is written before the next is asked for."""
    from cli import ipvsadm

    ents, _ = _table(9, 2, 300)
    d = FakeDaemon(_unique(ents))
    whole = {"conns": d.conn_listing().entries(), "templates": [{"proto": "tcp", "client": "10.1.0.0", "plen": 24,
                                                                  "vaddr": "10.0.0.100", "vport": 80,
                                                                  "daddr": "192.168.100.2", "dport": 80,
                                                                  "expire_s": 5}]}
    d.persist_list = lambda: whole["templates"]
    calls, written = [], []

    class Client:
        def __init__(self, path=None):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def call(self, op, args=None):
            calls.append((op, dict(args), len(written)))
            return asyncio.run(_call(d, args))

    monkeypatch.setattr(ipvsadm, "Client", Client)
    monkeypatch.setattr(ipvsadm, "CONN_PAGE", 50)
    real_write = ipvsadm.sys.stdout.write
    monkeypatch.setattr(ipvsadm.sys.stdout, "write", lambda s: written.append(s) or real_write(s))
    assert ipvsadm.main(["-Lnc"]) == 0
    out = capsys.readouterr().out
    want = ipvsadm.format_conns(whole, ipvsadm.parse(["-Lnc"]).fmt)
    assert out == want and out.count("\n") > 100
    pages = [a for op, a, _ in calls]
    assert pages[0] == {"limit": 50, "inbound": True} and len(pages) > 2
    assert all(a["cursor"] == pages[1]["cursor"] for a in pages[1:])
    assert [n for _, _, n in calls] == list(range(len(calls))), "each page written before the next is asked for"


async def test_rest_conns_pages_read_the_table_once():
    """GET /v2/conns?offset=&limit= (parameters unchanged): offset 0 reads the table, the later pages of the walk
    come from that snapshot though the table changes, and the items are conn.list's entries."""
    from tests.unit.test_api import FakeCtx, expect, quick_start, serving

    ctx = quick_start(FakeCtx(n_conns=0))
    fake = FakeDaemon(_unique(_table(10, 2, 120)[0]))
    whole = fake.conn_listing().entries()
    fake.reads = 0
    ctx.conn_listing = fake.conn_listing
    async with serving(ctx) as client:
        got, off = [], 0
        while True:
            body = await expect(await client.get(f"/v2/conns?offset={off}&limit=70"), 200)
            assert body["total"] == len(whole) and body["offset"] == off and body["limit"] == 70
            got += body["Items"]
            fake.ents = fake.ents[:5]  # the table changes under the walk
            off += 70
            if off >= body["total"]:
                break
        assert got == whole and fake.reads == 1
        body = await expect(await client.get("/v2/conns"), 200)  # offset 0: read anew
        assert fake.reads == 2 and body["total"] == len(_listing(fake.ents, 2, False, to_ns(fake.now)))
        await expect(await client.get("/v2/conns?offset=5&limit=0"), 400, field="limit")
        assert fake.reads == 2, "a refused request reads nothing"


async def test_ipvsadm_lnc_over_the_control_socket_past_the_frame_limit(tmp_path, monkeypatch):
    """Through the real control server and client, with the frame limit shrunk below the table's size: -Lnc
    pages through and prints every connection; the unpaged conn.list is refused with an error naming paging."""
    import io

    from cli import ipvsadm
    from hdslb.ctl.client import Client
    from hdslb.ctl.server import CtlServer

    d = FakeDaemon(_unique(_table(11, 2, 400)[0]))
    tmpl = [{"proto": "tcp", "client": "10.1.0.0", "plen": 24, "vaddr": "10.0.0.100", "vport": 80,
             "daddr": "192.168.100.2", "dport": 80, "expire_s": 5}]
    d.persist_list = lambda: tmpl
    want = ipvsadm.format_conns({"conns": d.conn_listing().entries(), "templates": d.persist_list()},
                                ipvsadm.parse(["-Lnc"]).fmt)
    monkeypatch.setattr(protocol, "MAX_FRAME", 64 * 1024)
    monkeypatch.setattr(ipvsadm, "CONN_PAGE", 100)
    path = str(tmp_path / "ctl.sock")
    srv = CtlServer(path, lambda op, args: commands.dispatch(d, op, args))
    await srv.start()
    try:
        def client_side():
            with pytest.raises(HdslbError) as e:
                Client(path).call("conn.list", {})
            assert e.value.errno == errno.EMSGSIZE and "pages" in e.value.message
            out = io.StringIO()
            monkeypatch.setattr(ipvsadm.sys, "stdout", out)
            assert ipvsadm.main(["-Lnc", "--ctl-socket", path]) == 0
            return out.getvalue()

        got = await asyncio.get_running_loop().run_in_executor(None, client_side)
    finally:
        await srv.stop()
    assert got == want and got.count("\n") > 300
