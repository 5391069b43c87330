"""conn_move's arithmetic without a kernel: how copies fold, which entries a move writes, what a smaller table
keeps. (tests/bpf/test_conn_move.py moves real pinned tables; tests/e2e/test_restart.py live flows.)"""

import struct

import numpy as np

from hdslb.fastpath import abi, aging, conn_move

V, O, W = abi.CONN_F_VALID, abi.CONN_F_OUT, abi.CONN_F_WAS_EST
SIZE = abi.CONN4_VAL_SIZE


def val(flags=V, state=2, last=0, sport=1):
    v = bytearray(SIZE)
    struct.pack_into("=H", v, 0, sport)
    v[22], v[23] = flags, state
    struct.pack_into("<Q", v, 32, last)
    return bytes(v)


def arr(rows, width):
    return np.frombuffer(b"".join(rows), np.uint8).reshape(len(rows), width).copy()


def keys(*ids):
    return arr([struct.pack("<QQ", i, i * 7) for i in ids], 16)


def test_fold_takes_the_newest_filled_in_copy_with_the_furthest_state():
    empty = bytes(SIZE)
    table = np.stack([
        arr([val(V | W, 3, 50, sport=1), val(V, 2, 90, sport=2)], SIZE),  # CPU 1 newer, CPU 0 further on
        arr([empty, val(V | O, 1, 10, sport=3)], SIZE),                      # only CPU 1's copy filled in
        arr([val(0, 4, 99), empty], SIZE),                                   # no copy filled in: not a flow
    ])
    ok, M = conn_move.fold(table)
    assert ok.tolist() == [True, True, False]
    assert struct.unpack_from("=H", M[0], 0)[0] == 2 and M[0][23] == 3 and M[0][22] == V | W
    assert conn_move.last_seen(M).tolist()[:2] == [90, 10]
    assert struct.unpack_from("=H", M[1], 0)[0] == 3 and M[1][23] == 1 and M[1][22] == V | O
    # one copy (a shared table) is taken as it is
    ok, M = conn_move.fold(table[:, 1:2])
    assert ok.tolist() == [True, True, False] and M[0][23] == 2


def test_a_move_writes_what_the_new_table_lacks_or_has_older():
    src_K, src_M = keys(1, 2, 3, 4), arr([val(last=40), val(last=10), val(last=30), val(last=20)], SIZE)
    dst_K, dst_M = keys(3, 2), arr([val(last=35), val(last=5)], SIZE)
    idx, kept, dropped = conn_move.plan(src_K, src_M, dst_K, dst_M, fill=1000)
    # 1 and 4 are missing, 2 is older there, 3 newer there (the new program moved it on): kept; oldest first
    assert idx.tolist() == [1, 3, 0] and (kept, dropped) == (1, 0)
    # into an empty table, everything, oldest first
    idx, kept, dropped = conn_move.plan(src_K, src_M, keys(), arr([], SIZE).reshape(0, SIZE), fill=1000)
    assert idx.tolist() == [1, 3, 2, 0] and (kept, dropped) == (0, 0)


def test_a_smaller_table_keeps_the_newest_entries():
    n = 100
    src_K = keys(*range(n))
    src_M = arr([val(last=1000 + (i * 37) % n) for i in range(n)], SIZE)  # ages shuffled
    idx, kept, dropped = conn_move.plan(src_K, src_M, keys(), arr([], SIZE).reshape(0, SIZE), fill=60)
    assert len(idx) == 60 and dropped == 40 and kept == 0
    lasts = conn_move.last_seen(src_M)[idx]
    assert lasts.tolist() == sorted(lasts.tolist()) and lasts.min() == 1040  # the 60 newest, oldest first
    # keys the new table already has take no more room: only the ones it lacks compete for what is left
    dst_K, dst_M = keys(*range(50)), arr([val(last=1)] * 50, SIZE)
    idx, kept, dropped = conn_move.plan(src_K, src_M, dst_K, dst_M, fill=60)
    present = set(range(50))
    adds = [i for i in idx.tolist() if i not in present]
    assert len(adds) == 60 - 50 and dropped == 50 - 10 and len(idx) == 50 + 10


def test_keys_are_matched_by_their_bytes_even_when_hashes_collide(monkeypatch):
    src_K, src_M = keys(1, 2, 3), arr([val(last=9), val(last=9), val(last=9)], SIZE)
    dst_K, dst_M = keys(3, 1), arr([val(last=10), val(last=1)], SIZE)
    want = conn_move.plan(src_K, src_M, dst_K, dst_M, fill=1000)
    monkeypatch.setattr(conn_move, "hash_rows", lambda a: np.zeros(len(a), np.uint64))
    got = conn_move.plan(src_K, src_M, dst_K, dst_M, fill=1000)
    assert got[0].tolist() == want[0].tolist() == [0, 1] and got[1:] == want[1:] == (1, 0)


def test_a_move_leaves_room_for_the_lru_lists_of_every_cpu():
    # each CPU's free list: half its share of the table, at most 128
    assert conn_move.limit(1 << 20, 2) == (1 << 20) - 256
    assert conn_move.limit(1 << 20, 4096) == (1 << 20) - 4096 * 128
    assert conn_move.limit(256, 2) == 256 - 2 * 64
    assert conn_move.limit(512, 2) == 512 - 2 * 128
    assert conn_move.limit(256, 1) == 256 - 128
    assert conn_move.limit(256, 1024) == 0


def test_spread_puts_a_value_in_cpu_0s_copy():
    M = arr([val(last=5), val(last=6)], SIZE)
    out = conn_move.spread(M, 4)
    assert out.shape == (2, 4, SIZE) and (out[:, 0] == M).all() and not out[:, 1:].any()
    assert conn_move.spread(M, 1).shape == (2, 1, SIZE)


def test_hash_rows_takes_the_compact_and_the_wide_keys():
    assert aging.hash_rows(keys(1, 2)).shape == (2,)
    assert aging.hash_rows(np.zeros((3, 40), np.uint8)).shape == (3,)
    assert aging.hash_rows(keys(1))[0] != aging.hash_rows(keys(2))[0]


async def test_a_copy_that_fails_is_logged_and_leaves_the_daemon_running(caplog):
    """hdslbd's start copies set-aside tables before and after the attach (Daemon._move_conns): a copy the kernel
    refuses is an error line saying the old tables stay pinned for the next start, never an exception that would
    stop a daemon already forwarding; a copy that works says what it copied and when."""
    import asyncio
    import errno
    import logging
    import types

    from hdslb.daemon import Daemon

    def refused(final):
        raise OSError(errno.ENOMEM, "BPF_MAP_UPDATE_BATCH on conn4_map: Cannot allocate memory")

    me = types.SimpleNamespace(fp=types.SimpleNamespace(move_conns=refused),
                               sizes=types.SimpleNamespace(conn_table="shared"))
    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.INFO, logger="hdslb"):
        await Daemon._move_conns(me, loop, final=True)
    err = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(err) == 1 and "Cannot allocate memory" in err[0].getMessage()
    assert "they stay pinned and the next start copies them again" in err[0].getMessage()
    caplog.clear()
    me.fp.move_conns = lambda final: conn_move.MoveResult(copied=5, kept=2, dropped=1)
    with caplog.at_level(logging.INFO, logger="hdslb"):
        await Daemon._move_conns(me, loop, final=False)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("5 entries copied into the new shared tables before attaching (2 already there" in m and
               "1 oldest left out" in m for m in msgs), msgs
    assert any(r.levelno == logging.WARNING and "did not fit the smaller" in r.getMessage() for r in caplog.records)
