"""A connection's expire_s (ipvsadm -Lnc's time column, conn.list and /v2/conns): the running idle timeout of its
flow's state less the flow's idle time, never below 0, the same from the numpy columns (aging.Listing) and from the
dict-based Daemon.conn_list, and following the running timeouts (ipvsadm --set) from the next listing on."""

import socket
import types

import pytest

from hdslb.daemon import Daemon, settings_from_args
from hdslb.fastpath import abi, aging
from tests.unit.test_aging_columns import KEY, OUT, VAL, VALID
from tests.unit.test_conn_listing import BASE, TICK, _dicts, to_ns

NAMES = abi.conn_states()
HZ = 10**9 // TICK  # jiffies a second in these tables
NOW = 10_000_000  # jiffies
DEFAULTS = dict(settings_from_args(["eth0"]).timeouts)  # syn_recv 30, established 90, fin_wait 7, close 3, udp 300
SET = dict(DEFAULTS, established=900, fin_wait=120, udp=2)  # after ipvsadm --set 900 120 2
# the timeout a flow in each state lives idle (the rule written out: a SYN not yet answered is syn_recv's, a state
# past the known ones closes); UDP flows live the udp timeout whatever their state
RULE = {"none": "syn_recv", "syn_recv": "syn_recv", "established": "established", "fin_wait": "fin_wait",
        "close": "close", "?": "close"}
TCP_STATES = [s for s in NAMES if s != "udp"] + ["?"]


def _ip(n: int) -> bytes:
    return socket.inet_aton(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}") + bytes(12)


def _entry(key, rewrite, flags, state, last, ncpu, cpu):
    sa, da, sp, dp = rewrite
    copies = [VAL.pack(sp, dp, 7, b"\x02" * 6, b"\x04" * 6, 3, flags, state, 1, 1, last, sa, da) if c == cpu
              else bytes(aging.VAL_SIZE) for c in range(ncpu)]
    return key, b"".join(copies)


def _flow(n, proto, state, idle_in, idle_out, ncpu=2):
    """A FullNAT flow's two entries (each pointing at the other), inbound idle idle_in s, reply idle idle_out s
    (None: a lone entry, as DR/TUNNEL flows have), both in `state` (an index; past the names: unknown)."""
    cl, vip, rs, la = _ip(4 * n), _ip(4 * n + 1), _ip(4 * n + 2), _ip(4 * n + 3)
    cp, vp, rp, lp = 1000 + n % 60000, 80, 8080, 2000 + n % 60000
    kin = KEY.pack(socket.htons(cp), socket.htons(vp), proto, 4, 0, cl, vip)
    kout = KEY.pack(socket.htons(rp), socket.htons(lp), proto, 4, 0, rs, la)
    ents = [_entry(kin, (la, rs, socket.htons(lp), socket.htons(rp)), VALID, state, NOW - idle_in * HZ, ncpu,
                   n % ncpu)]
    if idle_out is not None:
        ents.append(_entry(kout, (vip, cl, socket.htons(vp), socket.htons(cp)), VALID | OUT, state,
                           NOW - idle_out * HZ, ncpu, (n + 1) % ncpu))
    return ents


def _fake(timeouts, ents, ncpu=2):
    """What Daemon.conn_list / conn_listing / idle_limits read of a daemon, over these raw entries."""
    d = types.SimpleNamespace(settings=types.SimpleNamespace(timeouts=timeouts),
                              _conns=lambda: _dicts(ents, ncpu, False))
    d.idle_limits = lambda unit=lambda x: x: Daemon.idle_limits(d, unit)
    _stand_in_maps(d, ents, ncpu)
    return d


def _stand_in_maps(d, ents, ncpu):
    d.maps = types.SimpleNamespace() if not hasattr(d, "maps") else d.maps
    d.maps._aging_buffers = lambda: [(b"".join(k for k, _ in ents), b"".join(v for _, v in ents), ncpu)]
    d.maps.clock = types.SimpleNamespace(tick_ns=TICK, to_mono_ns=lambda j: j * TICK + BASE)
    d.maps.conn_shared = False


def _both(d, monkeypatch):
    """(the columns listing's entries, the dict listing's entries), at one clock."""
    import hdslb.daemon as dmod

    monkeypatch.setattr(dmod.time, "clock_gettime_ns", lambda clk: to_ns(NOW))
    return Daemon.conn_listing(d).entries(), Daemon.conn_list(d)


def _grid():
    """(proto, state name, the timeout it lives by) for every TCP state, an unknown one, and UDP flows."""
    for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        for state in TCP_STATES if proto == socket.IPPROTO_TCP else ["none", "udp"]:
            tname = RULE[state] if proto == socket.IPPROTO_TCP else "udp"
            yield proto, state, tname


@pytest.mark.parametrize("timeouts", [DEFAULTS, SET], ids=["defaults", "after --set 900 120 2"])
def test_expire_is_the_state_timeout_less_the_idle_time_never_negative(timeouts, monkeypatch):
    ents, want, n = [], {}, 0
    for proto, state, tname in _grid():
        t = timeouts[tname]
        idx = NAMES.index(state) if state in NAMES else len(NAMES) + 3
        for idle in sorted({0, 1, t - 1, t, t + 1, t + 5000}):
            n += 1
            # the reply entry 7 s staler: the flow's idle time is its newest packet's, either direction's
            ents += _flow(n, proto, idx, idle, idle + 7)
            want[1000 + n] = (state, idle, max(0, t - idle))
    d = _fake(timeouts, ents)
    cols, dicts = _both(d, monkeypatch)
    assert cols == dicts
    got = {c["sport"]: (c["state"], c["idle_s"], c["expire_s"]) for c in cols if not c["out"]}
    assert got == want
    # both entries of a flow show the flow's times
    assert sorted((c["idle_s"], c["expire_s"]) for c in cols if c["out"]) == sorted(
        (i, e) for _, i, e in want.values())
    assert min(e for _, _, e in want.values()) == 0 and any(i > 0 and e > 0 for _, i, e in want.values())


def test_the_newer_direction_times_the_flow_and_a_lone_entry_times_itself(monkeypatch):
    est = NAMES.index("established")
    ents = (_flow(1, socket.IPPROTO_TCP, est, 50, 10)  # the server spoke last, 10 s ago
            + _flow(2, socket.IPPROTO_TCP, est, 95, None))  # a DR entry alone, past 90 s
    cols, dicts = _both(_fake(DEFAULTS, ents), monkeypatch)
    assert cols == dicts
    assert [(c["sport"] if not c["out"] else c["dport"], c["out"], c["idle_s"], c["expire_s"]) for c in cols] == [
        (1001, False, 10, 80), (2001, True, 10, 80), (1002, False, 95, 0)]


async def test_ipvsadm_set_reaches_the_next_listing_and_rest(tmp_path, monkeypatch):
    """Through the daemon's own conn.list (columns) and /v2/conns: ipvsadm --set's timeouts are what the next
    listing counts down from; idle_s stays as it was."""
    import hdslb.daemon as dmod
    from aiohttp.test_utils import TestClient, TestServer

    from hdslb.api import openapi
    from hdslb.api.app import make_app
    from tests.unit.test_timeouts import harness

    d, _ = await harness(tmp_path)
    est, fin = NAMES.index("established"), NAMES.index("fin_wait")
    ents = (_flow(1, socket.IPPROTO_TCP, est, 40, 60) + _flow(2, socket.IPPROTO_TCP, fin, 5, 5)
            + _flow(3, socket.IPPROTO_UDP, NAMES.index("udp"), 1, 1))
    _stand_in_maps(d, ents, 2)
    d.maps.persists = lambda: []
    d.maps.conns = lambda: _dicts(ents, 2, False)  # what the dict-based conn_list reads
    monkeypatch.setattr(dmod.time, "clock_gettime_ns", lambda clk: to_ns(NOW))

    async def listed():
        got = await d.dispatch("conn.list", {"limit": 100, "inbound": True})
        return [(c["sport"], c["idle_s"], c["expire_s"]) for c in got["conns"]]

    assert await listed() == [(1001, 40, 50), (1002, 5, 2), (1003, 1, 299)]
    d.dispatch("timeouts.set", {"tcp": 900, "tcpfin": 0, "udp": 2})
    assert await listed() == [(1001, 40, 860), (1002, 5, 2), (1003, 1, 1)]
    d.dispatch("timeouts.set", {"tcp": 0, "tcpfin": 3, "udp": 0})
    assert await listed() == [(1001, 40, 860), (1002, 5, 0), (1003, 1, 1)]
    async with TestClient(TestServer(make_app(d))) as client:
        resp = await client.get("/v2/conns?offset=0&limit=10")
        body = await resp.json()
        assert resp.status == 200, body
    openapi._validator("ConnPage").validate(body)  # idle_s and expire_s are in the document's Conn
    assert [(c["sport"], c["out"], c["idle_s"], c["expire_s"]) for c in body["Items"]] == [
        (1001, False, 40, 860), (8080, True, 40, 860), (1002, False, 5, 0), (8080, True, 5, 0),
        (1003, False, 1, 1), (8080, True, 1, 1)]
    d._conn_cache = (0.0, None)
    assert Daemon.conn_list(d) == body["Items"], "the dict-based listing serves the same"
