"""The listing's batched stats read (Maps.all_stats, what service.list and /metrics use at scale) against the
per-key reads it replaces: the same sums, for every slot, across batch boundaries."""

from __future__ import annotations

import ctypes as ct

from hdslb.fastpath.maps import STAT_FIELDS


def _fill(maps, name: str, slots) -> None:
    t = maps.t[name]
    for i in slots:
        v = t.Leaf()
        for cpu in range(len(v)):  # a different value on every CPU and field: a sum over the wrong axis shows
            for j, f in enumerate(STAT_FIELDS):
                setattr(v[cpu], f, (i + 1) * 1000 + cpu * 10 + j + (1 << 40 if f.endswith("bytes") else 0))
        t[ct.c_uint32(i)] = v


def test_batched_stats_equal_the_per_key_reads_for_every_slot(maps):
    n = maps.t["dest_stats"].max_entries
    # used slots on both sides of the 4096-entry batch boundary, the last slot, and zero slots in between
    slots = [s for s in (0, 1, 7, maps.CONN_BATCH - 1, maps.CONN_BATCH, maps.CONN_BATCH + 1, n - 1) if s < n]
    _fill(maps, "dest_stats", slots)
    _fill(maps, "svc_stats", [0, 3])
    try:
        got = maps.all_stats("dest_stats")
        assert got == {s: maps.dest_stats(s) for s in slots}
        assert all(type(v) is int for d in got.values() for v in d.values())  # msgpack-able, exact
        assert maps.all_stats("svc_stats") == {0: maps.svc_stats(0), 3: maps.svc_stats(3)}
        assert maps.dest_stats(2) == dict.fromkeys(STAT_FIELDS, 0) and 2 not in got
    finally:
        for s in slots:
            maps.zero_dest_stats(s)
        maps.zero_svc_stats(0)
        maps.zero_svc_stats(3)
