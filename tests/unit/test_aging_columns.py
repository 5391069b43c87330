"""The sweep's two implementations agree: numpy columns (the daemon's path) and the plain-Python reference, on
random conn tables with every case the sweep must get right."""

import random
import socket
import struct

import pytest

from hdslb.fastpath import abi, aging

KEY = struct.Struct(aging.KEY_FMT)
VAL = struct.Struct(aging.VAL_FMT)
VALID, OUT, XLAT = abi.CONN_F_VALID, abi.CONN_F_OUT, abi.CONN_F_XLAT
LIM = aging.Limits(by_state=(0, 30_000, 30_000, 900_000, 7_000, 60_000, 10_000, 60_000, 120_000),
                   udp=300_000, close=10_000)


def _addr(rnd, af):
    return rnd.randbytes(4) + bytes(12) if af == 4 else rnd.randbytes(16)


def _val(rnd, saddr, daddr, sport, dport, flags, state, slot, last):
    return VAL.pack(sport, dport, 7, b"\x02" * 6, b"\x04" * 6, 3, flags, state, slot, 1, last, saddr, daddr)


def _entry(rnd, key, rewrite, out, ncpu, now, xlat=False):
    """A conn entry: key bytes and ncpu copies, some not filled in, the newest rewriting as `rewrite` says."""
    saddr, daddr, sport, dport = rewrite
    copies = []
    filled = rnd.sample(range(ncpu), rnd.randint(0 if rnd.random() < 0.05 else 1, ncpu))
    for c in range(ncpu):
        if c in filled:
            fl = VALID | (OUT if out else 0) | (XLAT if xlat else 0)
            last = now - rnd.choice([0, 5, 5_000, 20_000, 40_000, 100_000, 400_000, 2_000_000])
            copies.append(_val(rnd, saddr, daddr, sport, dport, fl, rnd.randint(0, 10), rnd.randint(0, 50), last))
        else:
            copies.append(bytes(aging.VAL_SIZE) if rnd.random() < 0.7 else
                          _val(rnd, saddr, daddr, sport, dport, 0, 3, 9, now))  # stale, not filled in
    return key, b"".join(copies)


def _table(seed, ncpu, n_flows=400):
    rnd = random.Random(seed)
    now = 10_000_000
    ents = []
    for f in range(n_flows):
        af = rnd.choice([4, 4, 6])
        proto = rnd.choice([socket.IPPROTO_TCP, socket.IPPROTO_UDP])
        cl, vip, rs, la = (_addr(rnd, af) for _ in range(4))
        cp, vp, rp, lp = (rnd.randrange(1, 65536) for _ in range(4))
        kin = KEY.pack(cp, vp, proto, af, 0, cl, vip)
        kind = rnd.random()
        if kind < 0.1:  # DR/TUNNEL: one entry, its partner key holds nothing
            ents.append(_entry(rnd, kin, (cl, rs, cp, rp), False, ncpu, now))
            continue
        xlat = kind < 0.15
        raf = 10 - af if xlat else af
        ra, rl = (_addr(rnd, raf), _addr(rnd, raf)) if xlat else (rs, la)
        kout = KEY.pack(rp, lp, proto, raf, 0, ra, rl)
        ein = _entry(rnd, kin, (rl, ra, lp, rp), False, ncpu, now, xlat)
        eout = _entry(rnd, kout, (vip, cl, vp, cp), True, ncpu, now, xlat)
        if kind < 0.25:  # the reply key now belongs to another flow: its inbound entry points elsewhere
            ein = _entry(rnd, kin, (rl, ra, (lp + 1) % 65536, rp), False, ncpu, now, xlat)
        pair = [ein, eout]
        rnd.shuffle(pair)
        ents.extend(pair)
    rnd.shuffle(ents)
    for _ in range(n_flows // 20):  # a walk of a live table meets some entries twice
        k, _v = rnd.choice(ents)
        ents.insert(rnd.randrange(len(ents) + 1), _entry(rnd, k, (_addr(rnd, 4),) * 2 + (1, 2), rnd.random() < .5,
                                                          ncpu, now))
    return ents, now


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("ncpu", [1, 2, 4])
def test_numpy_columns_agree_with_the_reference(seed, ncpu):
    ents, now = _table(seed, ncpu)
    kbuf, vbuf = b"".join(k for k, _ in ents), b"".join(v for _, v in ents)
    recs = aging.rows(kbuf, vbuf, ncpu)
    # the daemon reads the table in batches: columns built per batch, then joined
    cut = len(ents) // 3
    parts = [aging.Columns.extract(b"".join(k for k, _ in ch), b"".join(v for _, v in ch), ncpu)
             for ch in (ents[:cut], ents[cut:2 * cut], ents[2 * cut:])]
    cols = aging.Columns.from_batches(parts)
    assert cols is not None and len(cols) == len(aging.unique(recs))
    want = aging.expired_rows(recs, now, LIM)
    assert 0 < len(want) < len(recs), "the table mixes live and dead flows"
    assert any(len(keys) == 2 for keys, _ in want) and any(len(keys) == 1 for keys, _ in want)
    assert cols.expired(now, LIM) == want
    assert cols.counts() == aging.counts_rows(recs)


def test_empty_table():
    cols = aging.Columns.from_batches([])
    assert len(cols) == 0 and cols.expired(1000, LIM) == [] and cols.counts() == {}


def test_a_hash_collision_hands_the_sweep_to_the_reference(monkeypatch):
    ents, now = _table(1, 2, 50)
    kbuf, vbuf = b"".join(k for k, _ in ents), b"".join(v for _, v in ents)
    import numpy as np

    monkeypatch.setattr(aging, "hash_rows", lambda a: np.zeros(len(a), np.uint64))
    assert aging.Columns.from_batches([aging.Columns.extract(kbuf, vbuf, 2)]) is None


@pytest.mark.parametrize("ncpu", [1, 2, 4])
def test_compact_ipv4_entries_widen_to_the_wide_layout(ncpu):
    """conn4_map's entries (16-byte keys, 48-byte values) reach the sweep widened: the same bytes the wide table
    would hold for the same IPv4 flow, so partner keys, the sweep and the counts need no second layout; and
    narrow_key() gives the compact key back for the removal."""
    rnd = random.Random(ncpu)
    k4, v4, kw, vw = [], [], [], []
    for _ in range(50):
        s, d, ns, nd = (rnd.randbytes(4) for _ in range(4))
        sp, dp, nsp, ndp, slot, last = (rnd.randrange(65536) for _ in range(6))
        k4.append(struct.pack("=HHBBH4s4s", sp, dp, 6, 4, 0, s, d))
        kw.append(KEY.pack(sp, dp, 6, 4, 0, s + bytes(12), d + bytes(12)))
        for _c in range(ncpu):
            head = (nsp, ndp, 7, b"\x02" * 6, b"\x04" * 6, 3, VALID, 2, slot, 1, last)
            v4.append(struct.pack("=HHI6s6sHBBIB3xQ4s4s", *head, ns, nd))
            vw.append(VAL.pack(*head, ns + bytes(12), nd + bytes(12)))
    assert struct.calcsize("=HHBBH4s4s") == aging.KEY4_SIZE and struct.calcsize("=HHI6s6sHBBIB3xQ4s4s") == aging.VAL4_SIZE
    wk, wv = aging.widen(b"".join(k4), b"".join(v4), ncpu)
    assert (wk, wv) == (b"".join(kw), b"".join(vw))
    assert [aging.narrow_key(k) for k in kw] == k4
    assert aging.rows(wk, wv, ncpu) == aging.rows(b"".join(kw), b"".join(vw), ncpu)


@pytest.mark.parametrize("out_state", ["close", "fin_wait"])
def test_a_flow_the_server_closed_is_timed_and_counted_by_that(out_state):
    """The flow's state is the furthest either entry saw: an ESTABLISHED inbound entry whose reply entry saw
    the server's reset (CLOSE) or FIN (FIN_WAIT) is inactive and expires by that state's timeout, in both
    implementations."""
    names = abi.conn_states()
    tmo = {"none": 30_000, "syn_recv": 30_000, "established": 90_000, "fin_wait": 7_000, "close": 3_000}
    lim = aging.Limits(by_state=tuple(tmo.get(n, 3_000) for n in names), udp=300_000, close=3_000)
    timeout = tmo[out_state]
    now = 10_000_000
    cl, vip, rs, la = (bytes([i]) * 4 + bytes(12) for i in (1, 2, 3, 4))
    kin, kout = KEY.pack(1000, 80, 6, 4, 0, cl, vip), KEY.pack(80, 2000, 6, 4, 0, rs, la)

    def table(idle):
        vin = _val(None, la, rs, 2000, 80, VALID, names.index("established"), 5, now - idle)
        vout = _val(None, vip, cl, 80, 1000, VALID | OUT, names.index(out_state), 5, now - idle)
        kbuf, vbuf = kin + kout, vin + vout
        return aging.rows(kbuf, vbuf, 1), aging.Columns.from_batches([aging.Columns.extract(kbuf, vbuf, 1)])

    recs, cols = table(timeout - 1)
    assert aging.counts_rows(recs) == cols.counts() == {5: (0, 1)}
    assert aging.expired_rows(recs, now, lim) == cols.expired(now, lim) == []
    recs, cols = table(timeout + 1)
    assert aging.expired_rows(recs, now, lim) == cols.expired(now, lim) == [((kin, kout), now - timeout - 1)]


def test_real_servers_are_walked_only_when_the_table_has_inbound_udp_flows():
    """The sweep's expire_nodest_conn check needs every real server; a table with no inbound UDP flow must not
    pay the walk (45 ms at 100k real servers, each sweep)."""
    ents, _now = _table(3, 2)
    udp = socket.IPPROTO_UDP

    def cols_of(keep):
        es = [(k, v) for k, v in ents if keep(KEY.unpack(k)[2])]
        return aging.Columns.from_batches([aging.Columns.extract(b"".join(k for k, _ in es),
                                                                 b"".join(v for _, v in es), 2)])

    asked = []

    def dests():
        asked.append(1)
        return []

    assert len(cols_of(lambda proto: proto != udp).nodest_udp(dests)) == 0 and asked == []
    gone = cols_of(lambda proto: True).nodest_udp(dests)
    assert asked == [1] and len(gone) > 0, "no real server at all: every inbound UDP flow is gone"
