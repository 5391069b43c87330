"""Ring schedulers (rr, wrr, fo, lc, wlc): one cycle of LVS's choices, written out so the fast path only counts.

LVS keeps a cursor per service under a lock and decides at each new connection. XDP runs on every CPU without
locks, so the decisions are made here ahead of time: the table is the sequence LVS would produce over one
cycle, and each CPU walks it with its own cursor (entries[cursor % len]). When the table is rebuilt, lc/wlc
(plans that start with the least loaded servers) and fo (one entry) are walked from the first entry on every
CPU; rr/wrr tables are `spread`: CPU i starts at i * len // ncpus (LVS wrr restarts its walk when a server
changes, but every CPU starting at entry 0 would send the CPUs' first new flows all to one server). Each CPU
sees the LVS interleaving from its starting point; across CPUs the shares are still exact per cycle.
"""

from __future__ import annotations

import heapq
from typing import Optional

from .model import RING, RING_HINT, Dest, SchedError, Table, available, gcd_of, scale_weights

# LVS's connection overhead: an active connection costs 256 inactive ones (ip_vs_dest_conn_overhead).
ACTIVE_COST = 256
DEFAULT_HORIZON = 256


def _fit(n: int, max_len: Optional[int], sched: str) -> None:
    if max_len is not None and n > max_len:
        raise SchedError(f"{sched}: {n} real servers take new flows and {RING_HINT.format(n=max_len)}")


def rr(dests: list[Dest], max_len: Optional[int] = None) -> Table:
    """Round robin: each available dest once, in list order (ip_vs_rr starts after the list head)."""
    ring = [d.slot_id for d in available(dests)]
    _fit(len(ring), max_len, "rr")
    return Table("rr", RING, ring, spread=True)


def wrr_sequence(weights: list[int]) -> list[int]:
    """One cycle of ip_vs_wrr_schedule as indices into `weights`, starting from a freshly initialised service.

    The kernel keeps a current weight cw, starting at mw = max - (gcd - 1), and walks the list returning every
    dest with weight >= cw; at the end of the list cw drops by gcd, and when it reaches 0 or below it wraps to
    mw. A cycle therefore holds max/gcd passes and each dest appears weight/gcd times. Weights <= 0 never match
    (cw >= 1), as the kernel skips them.
    """
    di = gcd_of(weights)
    mw = max(weights, default=0) - (di - 1)
    seq = []
    cw = mw
    while cw > 0:
        seq.extend(i for i, w in enumerate(weights) if w >= cw)
        cw -= di
    return seq


def wrr(dests: list[Dest], max_len: Optional[int] = None) -> Table:
    """Weighted round robin with LVS's interleaving (3:2:1 gives A A B A B C).

    The cycle is sum(weight)/gcd entries long. When that exceeds max_len the weights are scaled down
    (model.scale_weights: gcd first, then proportionally, every dest keeping at least one entry) and the
    interleaving is that of the scaled weights. Overloaded or down dests are left out of the list, so the
    ring is what LVS produces for the list without them (LVS skips them in place, which can interleave the
    others differently while they are overloaded, with the same shares).
    """
    avail = available(dests)
    weights = [d.weight for d in avail]
    g = gcd_of(weights)
    weights = [w // g for w in weights]  # the cycle LVS produces depends only on weight/gcd
    if max_len is not None:
        weights = scale_weights(weights, max_len, "wrr")
    return Table("wrr", RING, [avail[i].slot_id for i in wrr_sequence(weights)], spread=True)


def fo(dests: list[Dest], max_len: Optional[int] = None) -> Table:
    """Weighted failover: every new flow to the highest-weight available dest; on a tie the first in the list.

    That is DPVS/LVS fo (a strict `>` while walking the list). The table has one entry, or none.
    """
    best: Optional[Dest] = None
    for d in available(dests):
        if best is None or d.weight > best.weight:
            best = d
    ring = [best.slot_id] if best else []
    _fit(len(ring), max_len, "fo")
    return Table("fo", RING, ring)


def overhead(active: int, inactive: int) -> int:
    """LVS's load estimate of a dest (ip_vs_dest_conn_overhead): active * 256 + inactive."""
    return active * ACTIVE_COST + inactive


def pick_least(dests: list[Dest], weighted: bool = True, horizon: int = DEFAULT_HORIZON,
               max_len: Optional[int] = None) -> Table:
    """lc / wlc from a snapshot of connection counts (Dest.active, Dest.inactive).

    The ring is the sequence of choices LVS's lc (weighted=False) or wlc (weighted=True) would make for the
    next new connections if none ended meanwhile: each pick goes to the dest with the least overhead (wlc:
    least overhead/weight; ties to the earlier dest, as LVS's strict comparison does) and adds one active
    connection (256) to it. A dest far behind gets every early entry; once loads have levelled the choices
    go round in a fixed order, one round being every dest once (wlc: weight/gcd times).

    Length: at least `horizon` and at least one round, then up to the end of a round (or back to the last end
    of a round when that would pass max_len), so a ring walked again and again holds whole rounds: cut
    mid-round, the dests early in the list got one entry more than the others on every walk (3 against 2
    with 100 dests and 256 entries), and a round longer than the ring left the last dests out altogether.

    Staleness: the counts are as of the call. The daemon rebuilds periodically (every stats interval), so
    between rebuilds the ring ignores connections that ended and new flows from other services. If more new
    flows arrive than the ring holds, the ring repeats from its start, catch-up entries included, and the
    least-loaded dest overshoots; so pass horizon = the new flows the service sees per interval (it is capped
    by max_len) and the plan covers about one interval.
    """
    if horizon < 1:
        raise SchedError(f"{'wlc' if weighted else 'lc'}: horizon must be at least 1, got {horizon}")
    sched = "wlc" if weighted else "lc"
    avail = available(dests)
    if not avail:
        return Table(sched, RING, [])
    g = gcd_of([d.weight for d in avail])
    period = sum(d.weight // g for d in avail) if weighted else len(avail)  # picks in one round
    want = max(horizon, period)
    cap = want + period - 1
    if max_len is not None:
        want, cap = min(want, max_len), min(cap, max_len)

    def load(oh: int, d: Dest):
        # LVS cross-multiplies (loh * dw > doh * lw). A float quotient orders the same way: equal rationals
        # divide to the same correctly rounded double, and distinct ones this small (oh < 2^40, w < 2^16)
        # never collide; Fraction was exact too but cost ~2 ms per rebuild, paid on every real-server change.
        return oh / d.weight if weighted else oh

    heap = [(load(overhead(d.active, d.inactive), d), i) for i, d in enumerate(avail)]
    ohs = [overhead(d.active, d.inactive) for d in avail]
    heapq.heapify(heap)  # (load, list index): the index breaks ties in list order, as LVS does
    ring = []
    for _ in range(cap):
        _, i = heapq.heappop(heap)
        ring.append(avail[i].slot_id)
        ohs[i] += ACTIVE_COST
        heapq.heappush(heap, (load(ohs[i], avail[i]), i))
    # Where the rounds begin: from `start` on, every pick repeats one round later (within what was planned).
    start = len(ring) - period
    while start > 0 and ring[start - 1] == ring[start - 1 + period]:
        start -= 1
    if start + period <= want:
        rounds = -(-(want - start) // period)  # up to the end of the round `want` falls in ...
        if start + rounds * period > cap:
            rounds -= 1                          # ... or back to the last one that fits
        return Table(sched, RING, ring[:start + rounds * period])
    return Table(sched, RING, ring[:want])  # no whole round fits after the catch-up: the plan as far as it goes


def lc(dests: list[Dest], max_len: Optional[int] = None, horizon: int = DEFAULT_HORIZON) -> Table:
    return pick_least(dests, weighted=False, horizon=horizon, max_len=max_len)


def wlc(dests: list[Dest], max_len: Optional[int] = None, horizon: int = DEFAULT_HORIZON) -> Table:
    return pick_least(dests, weighted=True, horizon=horizon, max_len=max_len)
