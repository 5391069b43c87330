"""What the schedulers take and give: Dest (a real server as scheduling sees it) and Table (what the fast path indexes).

The contract with the fast path, stated once:
  kind "ring": slot = entries[cursor % len(entries)], the per-CPU cursor advancing by one per new flow and,
               when the table is rebuilt (a new sched_tbl.gen), starting at 0 on every CPU (fo, lc, wlc), or at
               cpu * len // ncpus when `spread` (rr, wrr: SCHED_F_SPREAD);
  kind "hash": slot = entries[flow_hash(addr, port, seed) % len(entries)] (hashing.flow_hash), where `key` says
               which address is hashed ("src" or "dst") and whether the flow's source port is too ("+port").
  len(entries) == 0 means no real server takes new flows: the fast path drops with "no dest".
Every entry is a dest slot id (>= 0); tables never contain holes.
"""

from __future__ import annotations

import errno
import enum
import ipaddress
import math
from collections import Counter
from dataclasses import dataclass, field
from functools import reduce
from typing import Iterable, Optional, Union

from hdslb.errors import HdslbError

from .hashing import Address, flow_hash

RING = "ring"
HASH = "hash"
# Table.key values: what the fast path feeds to flow_hash.
KEY_NONE = ""
KEY_SRC = "src"
KEY_DST = "dst"
KEY_SRC_PORT = "src+port"


class SchedError(HdslbError, ValueError):
    """A table that cannot be built as asked (bad parameter, too many dests for the table): EINVAL.

    A ValueError for pure-function callers and an HdslbError so the control socket carries it as errno + message.
    """

    def __init__(self, message: str):
        super().__init__(errno.EINVAL, message)


class DestFlag(enum.IntFlag):
    """Why a dest with a positive weight still takes no new flows (both keep existing flows, as in LVS)."""

    NONE = 0
    OVERLOADED = 0x1  # LVS IP_VS_DEST_F_OVERLOAD: above its upper connection threshold
    DOWN = 0x2        # failed its health check; the checker prefers this to zeroing the configured weight


@dataclass(frozen=True)
class Dest:
    """A real server as the schedulers see it.

    slot_id is the fast path's dest slot, the value written into tables. addr/port are the server's identity,
    which mh and conhash hash (slot ids differ between nodes, addresses do not). active/inactive are live
    connection counts, read only by lc/wlc.
    """

    slot_id: int
    weight: int
    flags: DestFlag = DestFlag.NONE
    addr: Optional[Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]] = None
    port: int = 0
    active: int = 0
    inactive: int = 0

    @property
    def available(self) -> bool:
        """Takes new flows: LVS's test is weight > 0 and not overloaded; a failed health check is the same."""
        return self.weight > 0 and not self.flags

    @property
    def ident(self) -> str:
        """"addr:port" ("[v6]:port"), canonical, so every node hashes the same string for the same server."""
        if self.addr is None:
            raise SchedError(f"dest in slot {self.slot_id} has no address; mh and conhash hash the server address")
        try:
            ip = ipaddress.ip_address(str(self.addr))
        except ValueError:
            raise SchedError(f"dest in slot {self.slot_id}: invalid address {self.addr!r}") from None
        return f"[{ip}]:{self.port}" if ip.version == 6 else f"{ip}:{self.port}"


@dataclass(frozen=True)
class Table:
    """A scheduling table: see the module docstring for how the fast path indexes it."""

    sched: str
    kind: str
    entries: list[int] = field(default_factory=list)
    key: str = KEY_NONE
    seed: int = 0
    spread: bool = False  # ring: each CPU starts a new table its own share of the way in (see the module docstring)

    def __len__(self) -> int:
        return len(self.entries)

    def counts(self) -> Counter:
        """Entries per slot id: the share of new flows each dest gets (for tests, `show` and metrics)."""
        return Counter(self.entries)

    def ring_pick(self, cursor: int) -> Optional[int]:
        """The slot the fast path picks for a ring table at this cursor value; None when the table is empty."""
        if self.kind != RING:
            raise SchedError(f"{self.sched} table is a {self.kind} table, not a ring")
        return self.entries[cursor % len(self.entries)] if self.entries else None

    def hash_index(self, addr: Address, port: int = 0) -> int:
        """The bucket the fast path reads for a flow to/from `addr` (the port counts only for "+port" keys)."""
        if self.kind != HASH:
            raise SchedError(f"{self.sched} table is a {self.kind} table, not a hash table")
        if not self.entries:
            raise SchedError(f"{self.sched} table is empty")
        return flow_hash(addr, port if self.key.endswith("+port") else 0, self.seed) % len(self.entries)

    def hash_pick(self, addr: Address, port: int = 0) -> Optional[int]:
        """The slot the fast path picks for a flow; None when the table is empty."""
        return self.entries[self.hash_index(addr, port)] if self.entries else None


RING_HINT = ("the fast path's ring holds {n}: lc/wlc plan the next choices over any number of servers, mh and "
             "conhash hash over up to their table size")
SIZE_HINT = ": give it a larger table (--sched-flags size=N, hash_table_size in hdslb.conf)"
# What to do when a scheduler's table cannot give every server a place (appended to the refusal).
TOO_MANY_HINT = {"wrr": ": " + RING_HINT, "sh": SIZE_HINT, "dh": SIZE_HINT, "conhash": SIZE_HINT}


def check_dests(dests: Iterable[Dest]) -> list[Dest]:
    """Validate the caller's list once so every builder can trust it; order is kept (LVS's list order matters)."""
    out = list(dests)
    seen: set[int] = set()
    for d in out:
        if not isinstance(d, Dest):
            raise SchedError(f"expected a Dest, got {type(d).__name__}")
        for name in ("slot_id", "weight", "port", "active", "inactive"):
            v = getattr(d, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise SchedError(f"dest in slot {d.slot_id}: {name} must be a non-negative integer, got {v!r}")
        if d.slot_id in seen:
            raise SchedError(f"slot {d.slot_id} appears twice in the dest list")
        seen.add(d.slot_id)
    return out


def available(dests: Iterable[Dest]) -> list[Dest]:
    """The dests that take new flows (weight > 0, no flag), in the caller's order."""
    return [d for d in dests if d.available]


def gcd_of(weights: Iterable[int]) -> int:
    """GCD of the positive weights, 1 when there are none (as ip_vs_wrr_gcd_weight)."""
    return reduce(math.gcd, (w for w in weights if w > 0), 0) or 1


def scale_weights(weights: list[int], budget: int, sched: str = "") -> list[int]:
    """Weights whose sum fits `budget`, keeping every positive weight >= 1 and the proportions as close as floors allow.

    Unchanged when they already fit. Otherwise divided by their GCD (no loss at all), and if that is still too
    long, w' = max(1, w * B // sum) for the largest B whose result fits. The search is over B because the
    floor of 1 can push a naive B = budget over the limit when many weights are small.
    """
    if sum(weights) <= budget:
        return list(weights)
    if len(weights) > budget:
        who = f"{sched}: " if sched else ""
        raise SchedError(f"{who}{len(weights)} real servers cannot have an entry each in a table of {budget}"
                         + TOO_MANY_HINT.get(sched, "").format(n=budget))
    g = gcd_of(weights)
    weights = [w // g for w in weights]
    total = sum(weights)
    if total <= budget:
        return weights

    def scaled(b: int) -> list[int]:
        return [max(1, w * b // total) for w in weights]

    lo, hi = 0, total  # sum(scaled(0)) == len(weights) <= budget; sum(scaled(total)) == total > budget
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sum(scaled(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return scaled(lo)
