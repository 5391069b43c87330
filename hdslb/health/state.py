"""What the health manager remembers per checker, real server and virtual server, and how it is reported.

Timestamps are wall-clock seconds since the epoch (time.time()): they are for people and for JSON.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from hdslb.config.model import Checker, IPAddress, RealServer, VirtualServer
from hdslb.health.base import hostport

VsKey = Tuple[str, str]  # VirtualServer.key: ("TCP", "10.0.0.1:80") or ("TCP", "group web")
RsKey = Tuple[IPAddress, int]  # RealServer.key
PoolWeightOf = Callable[[VsKey, RsKey], Optional[int]]  # the weight the daemon's pool has a server at, if known
HeldOf = Callable[[VsKey, RsKey], bool]  # the daemon's pool holds the server out while its sorry server stands in

MAX_WEIGHT = 65535


class PoolState(NamedTuple):
    """What the daemon's pool already holds for a real server the manager starts checking: after a restart, the
    verdict of the hdslbd before (the saved model keeps it). up=False: out of rotation (removed or inhibited);
    weight: the weight it is in at, None if unknown or if the services it stands for disagree."""

    up: bool
    weight: Optional[int] = None
    reason: str = ""  # why it is down, as the daemon recorded it
    restored: bool = False  # up by the previous daemon's verdict (a restart's restored model): alpha keeps it up


@dataclass
class CheckerState:
    """One checker of one real server: keepalived's checker_t fields that matter for state."""

    checker: Checker
    up: bool  # keepalived's is_up: starts False under alpha, True otherwise
    has_run: bool = False
    retry_it: int = 0  # retries spent on the current run of failures
    failures: int = 0  # consecutive failed probes
    reason: str = "not checked yet"
    last_check: Optional[float] = None
    dynamic_weight: Optional[int] = None  # last weight a misc_dynamic exit asked for
    task: Optional[asyncio.Task] = field(default=None, repr=False)

    def as_dict(self) -> Dict[str, Any]:
        return {"kind": self.checker.kind, "state": "up" if self.up else "down", "reason": self.reason,
                "last_check": self.last_check, "failures": self.failures}


@dataclass
class ServerState:
    """A real server as one virtual server sees it: up only while every one of its checkers is up."""

    vs_key: VsKey
    rs: RealServer
    inhibit: bool  # on failure ask for weight 0 instead of removal
    checkers: List[CheckerState]
    alive: bool
    reason: str  # why it is in its current state
    since: float  # when it entered it
    last_failure: Optional[str] = None
    notified_weight: Optional[int] = None  # the weight the daemon was last told (None: not in the pool)
    counted: int = 0  # what it adds to its service's `live` weight, as last counted (ServiceState.recount*)
    # alpha: started down and no notify script has run for it yet; its first failed check runs notify_down
    alpha_pending: bool = False
    # down since checking began (alpha, or the pool had it down) and its reason still says only that: its first
    # failed check gives the reason shown
    started_down: bool = False

    @property
    def rs_key(self) -> RsKey:
        return self.rs.key

    @property
    def weight(self) -> int:
        """keepalived: each misc_dynamic checker moves the configured weight by (its weight - configured)."""
        w = self.rs.weight + sum(c.dynamic_weight - self.rs.weight
                                 for c in self.checkers if c.dynamic_weight is not None)
        return max(0, min(MAX_WEIGHT, w))

    @property
    def dynamic(self) -> bool:
        """A misc_dynamic checker has set the weight (it then overrides the configured one)."""
        return any(c.dynamic_weight is not None for c in self.checkers)

    @property
    def failures(self) -> int:
        return max((c.failures for c in self.checkers), default=0)

    @property
    def last_check(self) -> Optional[float]:
        return max((c.last_check for c in self.checkers if c.last_check is not None), default=None)

    def as_dict(self, pool_weight: Optional[PoolWeightOf] = None, held: Optional[HeldOf] = None) -> Dict[str, Any]:
        """weight: the weight its checks give it (configured, or a misc_dynamic script's); with pool_weight, also
        "pool_weight": the weight the daemon's pool has it at now (ipvsadm -e since, 0 while down or held out for
        a sorry server), None when the pool does not have it or the services it stands for disagree; with held,
        also "held": up, but out of the pool while its virtual server's sorry server stands in (quorum lost)."""
        out = {"state": "up" if self.alive else "down", "weight": self.weight, "inhibit": self.inhibit,
               "reason": self.reason, "since": self.since, "last_failure": self.last_failure,
               "last_check": self.last_check, "failures": self.failures,
               "checkers": [c.as_dict() for c in self.checkers]}
        if pool_weight is not None:
            out["pool_weight"] = pool_weight(self.vs_key, self.rs_key)
        if held is not None:  # (one down by its checks is out for that; one held is at pool weight 0: asked only then)
            out["held"] = self.alive and out.get("pool_weight", 0) == 0 and held(self.vs_key, self.rs_key)
        return out


@dataclass
class ServiceState:
    """A virtual server's real servers and its quorum (None until first computed)."""

    vs: VirtualServer
    servers: Dict[RsKey, ServerState] = field(default_factory=dict)
    quorum_up: Optional[bool] = None
    live: int = 0  # weight_sum() as last counted: kept up to date server by server (recount_one)

    def weight_sum(self) -> int:
        """keepalived's weigh_live_realservers: inhibited (weight 0) servers add nothing."""
        return sum(s.weight for s in self.servers.values() if s.alive)

    def recount(self) -> int:
        """Count every server's weight again (after a reload); returns `live`."""
        for s in self.servers.values():
            s.counted = s.weight if s.alive else 0
        self.live = sum(s.counted for s in self.servers.values())
        return self.live

    def recount_one(self, srv: ServerState) -> None:
        """One server changed (up/down, weight): `live` follows without summing the others, so weighing after
        each of a big pool's changes costs O(1), not O(servers)."""
        now = srv.weight if srv.alive else 0
        self.live += now - srv.counted
        srv.counted = now

    def as_dict(self, pool_weight: Optional[PoolWeightOf] = None, held: Optional[HeldOf] = None) -> Dict[str, Any]:
        return {"quorum": None if self.quorum_up is None else ("up" if self.quorum_up else "down"),
                "weight": self.weight_sum(), "quorum_needed": self.vs.quorum, "hysteresis": self.vs.hysteresis,
                "real_servers": {hostport(*k): s.as_dict(pool_weight, held) for k, s in self.servers.items()}}
