"""Hash schedulers (sh, dh, mh, conhash): fixed-size tables the fast path indexes by flow_hash(key) % len.

All four hash with hashing.flow_hash (jhash_2words of the address, the port or 0, and the table's seed), so the
C side has one hash whatever the scheduler; only which address is hashed, and whether the source port joins
it, differ (Table.key). No table holds an unavailable dest (weight 0, overloaded, down): the fast path never
has to fail or rehash a lookup. sh and dh keep such a dest's place in their layout and hand its buckets to
the others (LVS keeps it in place and, with the sh-fallback flag, rehashes its clients elsewhere: the same
clients move); mh and conhash are rebuilt without it, which moves (almost) only its buckets.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from functools import reduce
from typing import Optional

from .hashing import jhash
from .model import HASH, KEY_DST, KEY_SRC, KEY_SRC_PORT, Dest, SchedError, Table, available, gcd_of, scale_weights

SH_SIZE = 256         # LVS: 1 << CONFIG_IP_VS_SH_TAB_BITS (and DH)
MH_SIZE = 65537       # a prime, 2**16 + 1: still ~65 buckets per dest with 1000 dests
CONHASH_SIZE = 65536
CONHASH_REPLICAS = 160  # DPVS conhash: REPLICA virtual nodes per unit of weight/gcd
# Second Maglev hash (the skip) uses the same jhash under another initval, as LVS uses two hsiphash keys.
MH_SKIP_SALT = 0x9E3779B9
_U32 = 0xFFFFFFFF


def _check_size(sched: str, size: int, max_len: Optional[int]) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise SchedError(f"{sched}: table size must be a positive integer, got {size!r}")
    if max_len is not None and size > max_len:
        raise SchedError(f"{sched}: table size {size} exceeds the fast path's maximum of {max_len} entries")


def _check_seed(sched: str, seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _U32:
        raise SchedError(f"{sched}: seed must be a 32-bit unsigned integer, got {seed!r}")
    return seed


def _by_ident(sched: str, dests: list[Dest]) -> list[tuple[str, Dest]]:
    """Available dests sorted by identity: the table must not depend on the order dests were added on a node."""
    pairs = sorted(((d.ident, d) for d in available(dests)), key=lambda p: p[0])
    for (a, _), (b, _) in zip(pairs, pairs[1:]):
        if a == b:
            raise SchedError(f"{sched}: two dests have the same address {a}")
    return pairs


def _buckets(sched: str, key: str, dests: list[Dest], max_len: Optional[int], size: int, seed: int) -> Table:
    """LVS sh/dh assignment (ip_vs_sh_reassign): walk the dest list filling buckets in order, max(weight, 1)
    consecutive buckets per dest, wrapping until the table is full. Every dest holds its place in that layout,
    available or not, so a server that is drained, overloaded or down moves only its own clients: its buckets
    go to the available dests (_fallback), which is what LVS's sh-fallback achieves by rehashing, and they come
    back to it when it does. When the weights add up to more than the table, LVS lets the first dests take it
    all; here they are scaled to fit (model.scale_weights) so every dest keeps >= 1 bucket; when even one
    bucket each does not fit, the layout is over the available dests alone.
    Not consistent: adding or removing a server, or changing a weight, reshuffles most buckets, as in LVS.
    """
    _check_size(sched, size, max_len)
    seed = _check_seed(sched, seed)
    avail = available(dests)
    if not avail:
        return Table(sched, HASH, [], key, seed)
    placed = dests if len(dests) <= size else avail
    weights = scale_weights([max(1, d.weight) for d in placed], size, sched)
    one_round = [d for d, w in zip(placed, weights) for _ in range(w)]
    layout = (one_round * (size // len(one_round) + 1))[:size]
    return Table(sched, HASH, _fallback(layout, avail), key, seed)


def _fallback(layout: list[Dest], avail: list[Dest]) -> list[int]:
    """The layout's buckets as slots, each bucket of an unavailable dest handed to the available dest whose
    bucket count is furthest below its weight (ties to the earlier dest), so the orphans spread by weight."""
    ok = {id(d) for d in avail}
    have = Counter(id(d) for d in layout if id(d) in ok)
    heap = [((have[id(d)] + 1) / d.weight, i) for i, d in enumerate(avail)]
    heapq.heapify(heap)
    out = []
    for d in layout:
        if id(d) not in ok:
            _, i = heap[0]
            d = avail[i]
            have[id(d)] += 1
            heapq.heapreplace(heap, ((have[id(d)] + 1) / d.weight, i))
        out.append(d.slot_id)
    return out


def sh(dests: list[Dest], max_len: Optional[int] = None, size: int = SH_SIZE, port: bool = False,
       seed: int = 0) -> Table:
    """Source hashing; `port` also hashes the client's source port (ipvsadm's sh-port flag)."""
    return _buckets("sh", KEY_SRC_PORT if port else KEY_SRC, dests, max_len, size, seed)


def dh(dests: list[Dest], max_len: Optional[int] = None, size: int = SH_SIZE, seed: int = 0) -> Table:
    """Destination hashing on the packet's destination address, as LVS dh: meant for services matching many
    destinations (transparent caches); for a single VIP every flow lands on the same server."""
    return _buckets("dh", KEY_DST, dests, max_len, size, seed)


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def mh(dests: list[Dest], max_len: Optional[int] = None, size: int = MH_SIZE, port: bool = False,
       seed: int = 0) -> Table:
    """Maglev hashing (Eisenbud et al., NSDI '16, section 3.4), weighted by the relative frequency of turns.

    Each dest's preference list over the table is (offset + j * skip) % size, with offset and skip from two
    jhashes of its identity "addr:port" under `seed`; size must be prime so every skip visits every bucket.
    Dests take turns claiming their next free preferred bucket until the table is full. With equal weights
    the turns are plain round robin in identity order (the paper's algorithm). With weights, turns follow
    stride scheduling: dest i's k-th turn comes at virtual time (k + 1/2) / (weight_i / gcd). When the
    table is full at time T, dest i holds round(T * weight_i / gcd) buckets for one common T: the
    Sainte-Lague apportionment of the table to the weights, as fair a rounding as there is. (LVS ip_vs_mh
    instead gives each dest weight/gcd turns in a row per round; a table that fills part-way through a
    round favours the dests early in the list, by up to half their share with ~1000 dests.)
    Same seed, same dests => the same table on every node, whatever their order or slot ids.
    """
    if not isinstance(size, int) or isinstance(size, bool) or not is_prime(size):
        raise SchedError(f"mh: table size {size!r} is not a prime (try 65537, 65521, 4093 or 251)")
    _check_size("mh", size, max_len)
    seed = _check_seed("mh", seed)
    key = KEY_SRC_PORT if port else KEY_SRC
    pairs = _by_ident("mh", dests)
    if not pairs:
        return Table("mh", HASH, [], key, seed)
    if len(pairs) > size:
        raise SchedError(f"mh: {len(pairs)} real servers exceed the table size {size}: give it a larger prime "
                         f"(--sched-flags size=N, hash_table_size in hdslb.conf)")
    slots = [d.slot_id for _, d in pairs]
    g = gcd_of([d.weight for _, d in pairs])
    units = [d.weight // g for _, d in pairs]
    idents = [ident.encode() for ident, _ in pairs]
    nxt = [jhash(b, seed) % size for b in idents]
    skip = [jhash(b, seed ^ MH_SKIP_SALT) % (size - 1) + 1 for b in idents]

    # Heap of (virtual time of the next turn, identity rank). Times are scaled by 2 * lcm(units) to exact
    # integers, so ties are real ties and every node breaks them the same way (by identity).
    span = 2 * reduce(_lcm, units, 1)
    stride = [span // u for u in units]
    turns = [(st // 2, i) for i, st in enumerate(stride)]
    heapq.heapify(turns)
    table = [-1] * size  # -1 only while populating: every bucket is claimed before we return
    for _ in range(size):
        t, i = turns[0]
        c = nxt[i]
        while table[c] >= 0:
            c += skip[i]
            if c >= size:
                c -= size
        table[c] = slots[i]
        nxt[i] = c
        heapq.heapreplace(turns, (t + stride[i], i))
    return Table("mh", HASH, table, key, seed)


def conhash(dests: list[Dest], max_len: Optional[int] = None, size: int = CONHASH_SIZE,
            replicas: int = CONHASH_REPLICAS, seed: int = 0) -> Table:
    """Consistent hashing over source addresses, as DPVS conhash, materialised into `size` buckets.

    Each dest gets replicas * weight/gcd virtual nodes, named "addr:port-i" and placed on a ring of `size`
    positions at jhash(name, seed) % size. Bucket b belongs to the first virtual node at or after b
    (wrapping); collisions go to the smaller name. Removing a dest therefore moves only its own buckets and
    adding one moves buckets only to it, exactly, as long as the other dests' virtual node counts stay put:
    that holds while the gcd of the weights does not change and sum(weight/gcd) * replicas <= size (beyond
    that the per-unit count is lowered so the ring never has more nodes than buckets). DPVS shares the
    gcd caveat.
    """
    _check_size("conhash", size, max_len)
    seed = _check_seed("conhash", seed)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise SchedError(f"conhash: replicas must be a positive integer, got {replicas!r}")
    pairs = _by_ident("conhash", dests)
    if not pairs:
        return Table("conhash", HASH, [], KEY_SRC, seed)
    g = gcd_of([d.weight for _, d in pairs])
    units = scale_weights([d.weight // g for _, d in pairs], size, "conhash")
    per_unit = min(replicas, max(1, size // sum(units)))

    points = []
    for (ident, d), u in zip(pairs, units):
        for i in range(u * per_unit):
            name = f"{ident}-{i}"
            points.append((jhash(name.encode(), seed) % size, name, d.slot_id))
    points.sort()
    entries = []
    k = 0
    for b in range(size):
        while k < len(points) and points[k][0] < b:
            k += 1
        entries.append(points[k][2] if k < len(points) else points[0][2])
    return Table("conhash", HASH, entries, KEY_SRC, seed)
