"""Runs every checker on its own schedule in the daemon's loop, keeps real-server and quorum state, tells the daemon.

keepalived's rules, as its checker epilogues (check_tcp.c, check_udp.c, check_misc.c) and ipwrapper.c apply them:

  - Each checker of each (virtual server, real server) pair is its own task. The first probe waits a
    random 0..warmup seconds (warmup unset: 0..delay_loop; 0: at once), so a thousand servers are not all
    probed in the same instant. After that, delay_loop between probes. A checker that starts down (alpha, a
    server the pool had down, a down server's checkers changed by a reload) holds its server out of the pool
    until its first probe passes: without warmup its first probe waits 0..DOWN_FIRST_PROBE seconds, as
    keepalived launches every checker BOOTSTRAP_DELAY (1 s) after it starts or reloads, not up to delay_loop
    (60 s by default) with the server out of rotation, or the sorry server in, all that time.
  - A failing checker that is up retries `retry` times, delay_before_retry apart, before it is declared
    down. A checker that is already down is not retried: it is probed again after delay_loop.
  - alpha: checkers start down, so real servers stay out of the pool until every checker has passed once.
  - A real server is up only while all of its checkers are up; one without checkers is always up.
  - Quorum: the weights of the up real servers are summed. Quorum is gained at >= quorum + hysteresis and
    lost at < quorum - hysteresis (or at 0). It starts as whatever the initial weights say.
  - omega: when the daemon stops or a virtual server is removed, its up real servers are reported down
    and its quorum lost, so the daemon can run the down/quorum_down actions. hdslbd's stop is not the service's
    end (the fast path goes on forwarding, the restarted daemon adopts the pool): only `hdslb-ctl down` stops
    the manager as ending (stop(ending=True)).

The daemon hears about changes through two callbacks, called one at a time and in order from one
dispatcher task (a slow callback delays later notices, never a probe):

  on_change(vs_key, rs_key, up, weight, reason)
      up=True:  put the server in the pool, or set its weight (misc_dynamic), to `weight`
      up=False, weight=0:    inhibit_on_failure: keep the server in the pool at weight 0
      up=False, weight=None: take the server out of the pool
  on_quorum(vs_key, lost)
      lost=True: activate the sorry_server (and quorum_down); lost=False: back to the real servers.

Where the manager starts from. Without pool_state/quorum_lost (keepalived without a restart to survive), a server
is assumed to be in the pool at its configured weight, and the daemon is told about every server that starts
down (alpha) and every virtual server that starts without quorum. With them (hdslbd after a restart restores
the previous daemon's verdicts), a new server starts as the pool has it: one the pool holds down starts down
(every checker must pass once to bring it back, as under alpha), a virtual server whose sorry server is in starts
without quorum, and one the pool shows with quorum (a sorry server configured, none in) starts with it, so a weight
between quorum - hysteresis and quorum + hysteresis keeps it, as it kept it in the daemon before. Where the start
state still differs from the pool (alpha; no checkers, so up; a configured weight the pool does not have) the
daemon is told at once, so after start the manager and the pool agree and the first probe result that differs
produces a notice.

Scripts (hdslb.health.notify): a real server's notify_up / notify_down and a virtual server's quorum_up /
quorum_down run where keepalived runs them (check/ipwrapper.c), queued, never awaited:
  - notify_up / notify_down when the server's checks bring it up or take it down; not for the state it starts in
    (keepalived runs none at start unless global_defs rs_init_notifies, which hdslb refuses as unknown), with one
    exception, keepalived's: under alpha, a server's first failed check runs notify_down (it started down,
    unannounced; keepalived's update_svr_checker_state), once per server here (keepalived: once per checker).
  - quorum_up / quorum_down when the live weight crosses quorum + hysteresis upwards / quorum - hysteresis (or 0)
    downwards. At start (and for a virtual server a reload adds) only quorum_down, and only when the service has
    a sorry_server and starts below quorum: keepalived's "Starting with quorum down" (update_quorum_state, init).
  - A reload that removes an up real server runs its notify_down, one that removes a virtual server the
    notify_down of its up servers and its quorum_down if it had quorum, omega or not (keepalived's
    clear_diff_services); the scripts are the old configuration's. A reload that keeps a server runs none, and
    later transitions run the new configuration's scripts.
  - hdslbd stopping runs them only under omega (keepalived: "Only send non SNMP notifies when stopping if omega
    set"), and only when the service ends with it (`down`), and stop() waits for them
    (hdslb.health.notify.STOP_GRACE).
  - A restart that restores the previous daemon's verdicts (pool_state) is not a transition: nothing runs.

Concurrency: a probe holds one socket (or one child process) while it runs, so at most `slots` probes run at
once, first come first served (a slot is held for the probe only; timers and state cost no descriptors). As
keepalived does for its checker process, the slots are sized to the checkers: every checker gets a slot of its own
when the file-descriptor limit allows, and the soft RLIMIT_NOFILE is raised (up to the hard limit) to
checkers + FD_RESERVE at start and at each update() that adds checkers. A fixed bound smaller than the checkers
makes a blackholed server's probe (a slot held for the whole connect_timeout) delay everyone else's: with 2,500
of 5,000 servers blackholed, 256 slots and a 3 s timeout, a server that answers was probed every ~30 s instead
of every delay_loop (6 s), measured with bench/health_scale.py. Where the hard limit leaves fewer descriptors
than checkers, the slots are what it allows, a warning says so once per sizing, and probes that wait for a slot
are reported (warning, at most once a minute).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import logging
import random
import resource
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from hdslb.config.model import Checker, IPAddress, MiscCheck, RealServer, VirtualServer
from hdslb.health.base import CheckResult, failed, hostport
from hdslb.health.notify import Notifier
from hdslb.health.probe import Probe, run_check
from hdslb.health.state import (CheckerState, HeldOf, PoolState, PoolWeightOf, RsKey, ServerState, ServiceState,
                                VsKey)

log = logging.getLogger("hdslb.health")

OnChange = Callable[[VsKey, RsKey, bool, Optional[int], str], Any]  # may be a coroutine function
OnQuorum = Callable[[VsKey, bool], Any]
PoolStateOf = Callable[[VsKey, RsKey], Optional[PoolState]]  # None: the pool does not have it (yet)
# True: the pool shows the quorum lost (its sorry server is in); False: held (a restart adopted it, no sorry server in);
# None: the pool cannot say (weigh the servers)
QuorumLostOf = Callable[[VsKey], Optional[bool]]
Pair = Tuple[VirtualServer, RealServer]

# Descriptors left for the daemon itself beside the probes: pinned maps and programs, AF_XDP sockets, the control
# and REST listeners and their clients, state and log files.
FD_RESERVE = 256
SLOT_WAIT_WARN_EVERY = 60.0  # seconds between two "probes waited for a slot" warnings
NOT_CHECKED = "not checked yet"  # the reason of a server up at start, until every checker of it has run
# the reason of a server alpha keeps down until its first checks pass: out of the pool, though nothing failed yet
ALPHA_PENDING = "alpha: down until every check has passed"
STOP_DRAIN_TIMEOUT = 5.0  # seconds stop() waits for the daemon's callbacks: a stuck one must not block shutdown
# seconds within which, without warmup, a checker that starts down is first probed (keepalived's BOOTSTRAP_DELAY)
DOWN_FIRST_PROBE = 1.0


def pairs_of(virtual_servers: Iterable[VirtualServer]) -> List[Pair]:
    """Every (virtual server, real server) of a config, in file order: what start()/update() take."""
    return [(vs, rs) for vs in virtual_servers for rs in vs.real_servers]


class HealthManager:
    def __init__(self, on_change: OnChange, on_quorum: Optional[OnQuorum] = None, *,
                 probe: Probe = run_check, max_concurrent: Optional[int] = None,
                 script_user: Optional[str] = None, script_security: bool = False,
                 rng: Optional[random.Random] = None, pool_state: Optional[PoolStateOf] = None,
                 quorum_lost: Optional[QuorumLostOf] = None, notifier: Optional[Notifier] = None):
        """probe is replaceable for tests; max_concurrent fixes the probe slots (None: sized to the checkers and
        the file-descriptor limit, see "Concurrency" above); script_user is global_defs' default user for
        MISC_CHECK (`user` in the check wins), script_security its enable_script_security (see
        hdslb.health.misc.insecure_reason). pool_state and quorum_lost say what the daemon's pool holds, for
        servers and virtual servers the manager starts checking (see "Where the manager starts from" above).
        notifier runs the notify/quorum scripts (see "Scripts" above; replaceable for tests)."""
        self._notifier = notifier if notifier is not None else Notifier()
        self._on_change = on_change
        self._on_quorum = on_quorum
        self._pool_state = pool_state
        self._quorum_lost = quorum_lost
        self._probe = probe
        self._max_concurrent = max_concurrent
        self._script_user = script_user
        self._script_security = script_security
        self._rng = rng or random.Random()
        self._services: Dict[VsKey, ServiceState] = {}
        self._tasks: Set[asyncio.Task] = set()
        self._running = False
        self._events: Optional[asyncio.Queue] = None
        self._dispatcher: Optional[asyncio.Task] = None
        self._slots = Slots(1)
        self._quorum_due: Dict[VsKey, Tuple[ServiceState, Dict[int, ServerState]]] = {}  # services to weigh
        self._warned_wait = -SLOT_WAIT_WARN_EVERY
        self._down_index: Optional[Dict[IPAddress, list]] = None  # see down(); None: to be rebuilt

    # ------------------------------------------------------------ lifecycle

    async def start(self, pairs: Optional[Sequence[Pair]] = None) -> None:
        """Start checking (pairs, if given, replace what update() set). Returns at once."""
        if self._running:
            raise RuntimeError("health manager already started")
        if pairs is not None:
            self.update(pairs)
        # Created here, not in __init__, so they belong to the running loop.
        self._events = asyncio.Queue()
        self._size_slots()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="health-dispatch")
        self._running = True
        for svc in self._services.values():
            for srv in svc.servers.values():
                self._begin(srv)
            self._quorum(svc)

    async def stop(self, ending: bool = True) -> None:
        """Cancel every probe (MISC_CHECK children are killed), deliver omega notices, let running scripts finish
        (hdslb.health.notify.STOP_GRACE; then they are killed), then return. ending False: the pool outlives the
        manager (hdslbd stopping while its fast path goes on forwarding, for a restart to adopt): omega has nothing
        to report or run, the service is not going away."""
        if not self._running:
            return
        self._running = False
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for svc in self._services.values() if ending else ():
            if svc.vs.omega:
                self._scripts_gone(svc)
            self._omega(svc, "hdslbd is stopping (omega)")
        try:
            await asyncio.wait_for(self._events.join(), STOP_DRAIN_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("health: %d notices undelivered at stop: a callback is stuck", self._events.qsize())
        self._dispatcher.cancel()
        await asyncio.gather(self._dispatcher, return_exceptions=True)
        self._dispatcher = None
        await self._notifier.close()  # omega's scripts among them; what outlives STOP_GRACE is killed

    async def settle(self) -> None:
        """Wait until every notice queued so far has been delivered (after start(), update())."""
        if self._events is not None:
            await self._events.join()

    def update(self, pairs: Sequence[Pair]) -> None:
        """Reload: servers that remain keep their state, new ones start, removed ones stop.

        A remaining server whose checkers changed gets fresh checkers that start in its current state,
        so a reload neither brings a failed server back nor drops a healthy one (keepalived: "do not
        re-add failed RS instantly on reload"). Removed servers get no notice: the reload itself removes
        them from the pool.
        """
        self._down_index = None
        wanted: Dict[VsKey, Tuple[VirtualServer, Dict[RsKey, RealServer]]] = {}
        for vs, rs in pairs:
            wanted.setdefault(vs.key, (vs, {}))[1][rs.key] = rs
        for key in [k for k in self._services if k not in wanted]:
            svc = self._services.pop(key)
            self._cancel(svc.servers.values())
            if self._running:
                self._scripts_gone(svc)
                self._omega(svc, "virtual server removed (omega)")
        for key, (vs, rss) in wanted.items():
            svc = self._services.get(key)
            if svc is None:
                svc = self._services[key] = ServiceState(vs)
                lost = self._quorum_lost(key) if self._quorum_lost is not None else None
                if lost is not None:
                    # as the pool has it: its sorry server in (regaining quorum takes it out), or quorum held across
                    # a restart (in the hysteresis band it stays; weighed afresh, it was lost there)
                    svc.quorum_up = not lost
            svc.vs = vs
            for rk in [k for k in svc.servers if k not in rss]:
                gone = svc.servers.pop(rk)
                self._cancel([gone])
                if self._running and gone.alive:
                    self._script_rs(gone, False)  # keepalived: clear_service_rs on reload
            for rk, rs in rss.items():
                srv = svc.servers.get(rk)
                if srv is None:
                    srv = svc.servers[rk] = self._new_server(vs, rs)
                    if self._running:
                        self._begin(srv)
                else:
                    self._refresh(svc, srv, vs, rs)
            if self._running:
                self._quorum(svc)
        if self._running:
            self._size_slots()

    # ------------------------------------------------------------ probe slots

    @property
    def slots(self) -> int:
        """How many probes may run at once."""
        return self._slots.size

    def _size_slots(self) -> None:
        """One slot per checker, as far as RLIMIT_NOFILE allows (raised toward its hard limit if need be)."""
        n = sum(len(srv.checkers) for svc in self._services.values() for srv in svc.servers.values())
        if self._max_concurrent is not None:
            size = self._max_concurrent
        else:
            soft = raise_nofile(n + FD_RESERVE)
            size = max(1, min(n, soft - FD_RESERVE))
            if size < n:
                log.warning("health: %d checkers but room for %d probes at once (RLIMIT_NOFILE %d, %d kept for "
                            "hdslbd itself): when more are due, they wait, and each blackholed server holds a "
                            "probe for its connect_timeout, delaying the others' checks; raise the limit "
                            "(systemd LimitNOFILE=, ulimit -n) to %d or more", n, size, soft, FD_RESERVE,
                            n + FD_RESERVE)
        self._slots.resize(size)

    # ------------------------------------------------------------ queries

    def status(self, pool_weight: Optional[PoolWeightOf] = None, held: Optional[HeldOf] = None) -> Dict[str, Any]:
        """{"10.0.0.1:80/TCP": {"quorum", "weight", …, "real_servers": {"192.168.100.2:80": {...}}}}. pool_weight
        (vs_key, rs_key) -> the weight the daemon's pool has the server at, reported as each server's pool_weight:
        the manager's own "weight" is its checks' (the configured one, or misc_dynamic's), which a weight set by
        hand since (ipvsadm -e -w) does not change. held (vs_key, rs_key) -> whether the pool holds the server out
        for its sorry server, reported as "held"."""
        return {str(svc.vs): svc.as_dict(pool_weight, held) for svc in self._services.values()}

    def up_states(self) -> List[Tuple[VsKey, RsKey, bool]]:
        """(vs key, rs key, up) of every checked real server: what /metrics needs, read on the event loop in a few ms
        where status() builds a dict per server and checker (~1 s at 100k servers)."""
        return [(vs_key, rs_key, srv.alive) for vs_key, svc in self._services.items()  # (vs.key: made on each read)
                for rs_key, srv in svc.servers.items()]

    def server(self, vs_key: VsKey, rs_key: RsKey) -> ServerState:
        return self._services[vs_key].servers[rs_key]

    def is_up(self, vs_key: VsKey, rs_key: RsKey) -> bool:
        return self.server(vs_key, rs_key).alive

    def quorum_up(self, vs_key: VsKey) -> Optional[bool]:
        return self._services[vs_key].quorum_up

    def down(self, addrs: Optional[Iterable[IPAddress]] = None) -> List[Tuple[VsKey, RsKey, Optional[int], str]]:
        """(vs_key, rs_key, weight, reason) of every server its checks hold down (of those at `addrs`, if given), as
        its last notice said: weight 0 under inhibit_on_failure (in at weight 0), None (out). For the daemon to hold
        them down again where the pool got them back without a transition (a reload, or ipvsadm -a, adding a server
        removed by hand). By address from an index rebuilt only after a server went up or down, or a reload: the
        daemon asks after every control op that added a real server (10k REST PUTs, one each)."""
        if self._down_index is None:
            index: Dict[IPAddress, list] = {}
            for svc in self._services.values():
                for srv in svc.servers.values():
                    if not srv.alive:
                        index.setdefault(srv.rs_key[0], []).append((svc.vs.key, srv))
            self._down_index = index
        idx = self._down_index
        keys = idx.keys() if addrs is None else {a for a in addrs if a in idx}
        return [(vs_key, srv.rs_key, 0 if srv.inhibit else None, srv.reason)
                for a in keys for vs_key, srv in idx[a] if not srv.alive]

    # ------------------------------------------------------------ servers and their tasks

    def set_script_policy(self, script_user: Optional[str], script_security: bool) -> None:
        """global_defs script_user / enable_script_security after a reload; takes effect with the next update()
        (checkers whose effective user or policy changed are restarted, their servers keep their state)."""
        self._script_user = script_user
        self._script_security = script_security

    def _checkers(self, rs: RealServer) -> Tuple[Checker, ...]:
        if self._script_user is None and not self._script_security:
            return rs.checkers
        return tuple(dataclasses.replace(c, user=c.user if c.user is not None else self._script_user,
                                         script_security=self._script_security)
                     if isinstance(c, MiscCheck) else c for c in rs.checkers)

    def _new_server(self, vs: VirtualServer, rs: RealServer) -> ServerState:
        pool = self._pool_state(vs.key, rs.key) if self._pool_state is not None else None
        # alpha: down until checked, unless the previous daemon's verdict had it in rotation (a restart loses no
        # server: with a quorum, taking every server out would send all new flows to the sorry server until the
        # first checks ran); else as the pool has it (keepalived: up).
        up = (pool is None or pool.up) and (not vs.alpha or (pool is not None and pool.restored))
        checkers = [CheckerState(c, up=up) for c in self._checkers(rs)]
        alive = all(c.up for c in checkers)
        if alive and pool is not None and pool.weight is not None and pool.weight != rs.weight:
            # a misc_dynamic weight outlives the restart until the script says otherwise
            dyn = next((cs for cs in checkers if isinstance(cs.checker, MiscCheck) and cs.checker.misc_dynamic), None)
            if dyn is not None:
                dyn.dynamic_weight = pool.weight
        if not checkers:
            reason = "no checkers: always up"
        elif alive:
            reason = NOT_CHECKED  # until every checker has passed once (_record)
        elif vs.alpha:
            reason = ALPHA_PENDING
        else:
            reason = "down when checking began" + (f" ({pool.reason})" if pool.reason else "") + \
                     ": up once every check has passed"
        # What the daemon has: without pool_state, keepalived's assumption (in at the configured weight).
        told = rs.weight if pool is None else pool.weight if pool.up else None
        return ServerState(vs_key=vs.key, rs=rs, inhibit=rs.inhibit_on_failure or vs.inhibit_on_failure,
                           checkers=checkers, alive=alive, since=time.time(), reason=reason, notified_weight=told,
                           alpha_pending=vs.alpha and not alive, started_down=not alive)

    def _begin(self, srv: ServerState) -> None:
        """Start a server's checker tasks; tell the daemon where the state it starts in differs from the pool's
        (alpha, no checkers, a configured weight the pool does not have)."""
        for cs in srv.checkers:
            self._spawn(srv, cs)
        told_up = srv.notified_weight is not None
        if srv.alive != told_up or (srv.alive and srv.weight != srv.notified_weight):
            self._tell(srv, srv.alive, srv.reason)

    def _spawn(self, srv: ServerState, cs: CheckerState) -> None:
        t = asyncio.create_task(self._run(srv, cs),
                                name=f"health {cs.checker.kind} {hostport(*srv.rs_key)} of {srv.vs_key[1]}")
        cs.task = t
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _cancel(self, servers: Iterable[ServerState]) -> None:
        for srv in servers:
            for cs in srv.checkers:
                if cs.task is not None:
                    cs.task.cancel()  # stop() still awaits it: it stays in self._tasks until done
                    cs.task = None

    def _refresh(self, svc: ServiceState, srv: ServerState, vs: VirtualServer, rs: RealServer) -> None:
        checkers = self._checkers(rs)
        srv.rs = rs
        if checkers != tuple(cs.checker for cs in srv.checkers):
            self._cancel([srv])
            srv.checkers = [CheckerState(c, up=srv.alive) for c in checkers]
            if self._running:
                for cs in srv.checkers:
                    self._spawn(srv, cs)
        else:
            for cs, c in zip(srv.checkers, checkers):
                cs.checker = c  # equal, but carries the new file positions
        inhibit = rs.inhibit_on_failure or vs.inhibit_on_failure
        changed = inhibit != srv.inhibit
        srv.inhibit = inhibit
        if self._running:
            if changed and not srv.alive:
                self._tell(srv, False, srv.reason)  # in at weight 0 <-> out, as the new setting says
            self._reconcile(svc, srv, "reload")

    async def _run(self, srv: ServerState, cs: CheckerState) -> None:
        svc = self._services[srv.vs_key]
        delay = self._first_delay(cs.checker, down=not cs.up and not cs.has_run)
        while True:
            await asyncio.sleep(delay)
            if self._slots.full:
                self._slot_wait_warning()
            async with self._slots:
                try:
                    result = await self._probe(cs.checker, srv.rs)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 — only a replaced probe can get here
                    log.exception("probe of %s raised", hostport(*srv.rs_key))
                    result = failed(f"probe error: {type(e).__name__}: {e}")
            delay = self._record(svc, srv, cs, result)

    def _slot_wait_warning(self) -> None:
        now = time.monotonic()
        if now - self._warned_wait >= SLOT_WAIT_WARN_EVERY:
            self._warned_wait = now
            log.warning("health: all %d probe slots busy, %d probes waiting: checks run later than delay_loop "
                        "(said at most once a minute)", self._slots.size, self._slots.waiting + 1)

    def _first_delay(self, c: Checker, down: bool = False) -> float:
        """Random 0..warmup; warmup unset: 0..delay_loop for a checker that starts up (its server is in the pool
        meanwhile), 0..DOWN_FIRST_PROBE for one that starts down (its server is out until the probe passes)."""
        if c.warmup is not None:
            limit = c.warmup
        else:
            limit = min(c.delay_loop, DOWN_FIRST_PROBE) if down else c.delay_loop
        return self._rng.uniform(0, limit) if limit > 0 else 0.0

    # ------------------------------------------------------------ keepalived's state rules

    def _record(self, svc: ServiceState, srv: ServerState, cs: CheckerState, res: CheckResult) -> float:
        """Apply one result as keepalived's checker epilogue does; return the delay to the next probe."""
        c = cs.checker
        cs.last_check = time.time()
        cs.reason = res.reason
        delay = c.delay_loop
        reason = f"{c.kind}: {res.reason}"
        if res.ok:
            cs.failures = 0
            cs.retry_it = 0
            if res.weight is not None:
                cs.dynamic_weight = res.weight
            cs.up = True
        else:
            cs.failures += 1
            srv.last_failure = reason
            if cs.up and cs.retry_it < c.retry:
                cs.retry_it += 1
                delay = c.delay_before_retry
                log.debug("%s of %s failed, retry %d/%d: %s", c.kind, hostport(*srv.rs_key),
                          cs.retry_it, c.retry, res.reason)
            elif cs.up or not cs.has_run:
                if cs.up and c.retry:
                    reason += f" (after {c.retry} {'retry' if c.retry == 1 else 'retries'})"
                cs.retry_it = 0
                cs.up = False
        cs.has_run = True
        told = srv.notified_weight
        self._reconcile(svc, srv, reason)
        if res.weight is not None and srv.alive and srv.notified_weight != told:
            srv.reason = reason  # a misc_dynamic weight moved it: say so, not the exit that set the one before
        if res.ok and srv.alive and srv.reason == NOT_CHECKED and all(x.has_run for x in srv.checkers):
            # Up since start and now checked by every checker: say so. Only the reason shown changes (health.list,
            # hdslb-ctl health show kept "not checked yet" for a server that had passed every check since start);
            # nothing changed for the daemon, so no verdict and no script.
            srv.reason = reason
        if srv.started_down and not res.ok and not srv.alive:
            # Down since checking began, and now a check says why: show that (health.list, hdslb-ctl health show said
            # "alpha: down until every check has passed" for as long as an alpha server kept failing, and logged
            # nothing, so nothing said what failed). Only the reason shown changes: no verdict, the state is the same.
            srv.started_down = False
            srv.reason = reason
            log.warning("real server %s of %s/%s stays down: %s", hostport(*srv.rs_key), srv.vs_key[1], srv.vs_key[0],
                        reason)
        if srv.alpha_pending and not res.ok and not srv.alive:
            self._script_rs(srv, False)  # keepalived: alpha's first failed check confirms the server down
        return delay

    def _reconcile(self, svc: ServiceState, srv: ServerState, reason: str) -> None:
        """Bring the server's state (and the daemon) in line with its checkers."""
        alive = all(cs.up for cs in srv.checkers)
        if alive != srv.alive:
            srv.alive = alive
            srv.started_down = False
            self._down_index = None
            srv.since = time.time()
            srv.reason = reason
            self._tell(srv, alive, reason)
            self._script_rs(srv, alive)
            self._quorum_soon(svc, srv)
        elif alive and srv.weight != srv.notified_weight:
            self._tell(srv, True, reason)
            self._quorum_soon(svc, srv)

    def _quorum_soon(self, svc: ServiceState, srv: ServerState) -> None:
        """Weigh a service once per loop iteration, counting again only the servers that changed: summing all n
        servers instead cost 9 ms an iteration at 5,000 servers, ~300 times while half of them went down
        (bench/health_scale.py --profile)."""
        if not self._quorum_due:
            asyncio.get_running_loop().call_soon(self._weigh_due)
        self._quorum_due.setdefault(svc.vs.key, (svc, {}))[1][id(srv)] = srv

    def _weigh_due(self) -> None:
        due, self._quorum_due = self._quorum_due, {}
        for key, (svc, changed) in due.items():
            if self._running and self._services.get(key) is svc:
                for srv in changed.values():
                    if svc.servers.get(srv.rs_key) is srv:  # else removed: update() counted its service again
                        svc.recount_one(srv)
                self._quorum(svc, recount=False)

    def _tell(self, srv: ServerState, up: bool, reason: str, *, remove: bool = False) -> None:
        weight = srv.weight if up else (0 if srv.inhibit and not remove else None)
        srv.notified_weight = weight if up else None
        where = f"{hostport(*srv.rs_key)} of {srv.vs_key[1]}/{srv.vs_key[0]}"
        if up:
            log.info("real server %s is up, weight %d: %s", where, weight, reason)
        else:
            log.warning("real server %s is down%s: %s", where, " (inhibited: weight 0)" if weight == 0 else "",
                        reason)
        # An up verdict names a weight only when a misc_dynamic script set one: else the server is up at the
        # weight its owner gives it (the config, or ipvsadm -e / REST since), which the checker's copy of the
        # configured weight must not pin (it did: a drain by hand after one flap never reached the fast path).
        sent = (weight if srv.dynamic else None) if up else weight
        self._emit(self._on_change, srv.vs_key, srv.rs_key, up, sent, reason)

    def _quorum(self, svc: ServiceState, recount: bool = True) -> None:
        """Weigh the service (recount=False: `live` is already up to date) and act on quorum gained or lost."""
        vs = svc.vs
        total = svc.recount() if recount else svc.live
        gain, lose = vs.quorum + vs.hysteresis, vs.quorum - vs.hysteresis
        if svc.quorum_up is None:
            svc.quorum_up = total >= gain
            if not svc.quorum_up:
                # keepalived runs quorum_down at start only to go with the sorry server it puts in
                self._quorum_changed(svc, True, f"starting with quorum down: weight {total} < {gain}",
                                     script=vs.sorry_server is not None)
        elif not svc.quorum_up and total >= gain:
            svc.quorum_up = True
            self._quorum_changed(svc, False, f"gained quorum: weight {total} >= {vs.quorum}+{vs.hysteresis}")
        elif svc.quorum_up and (total == 0 or total < lose):
            svc.quorum_up = False
            self._quorum_changed(svc, True, f"lost quorum: weight {total} < {vs.quorum}-{vs.hysteresis}")

    def _quorum_changed(self, svc: ServiceState, lost: bool, why: str, *, script: bool = True) -> None:
        (log.warning if lost else log.info)("virtual server %s %s", svc.vs, why)
        if self._on_quorum is not None:
            self._emit(self._on_quorum, svc.vs.key, lost)
        if script:
            self._script_vs(svc, not lost)

    def _omega(self, svc: ServiceState, reason: str) -> None:
        """keepalived's omega: report up servers down (removed, even if inhibited) and quorum lost."""
        if not svc.vs.omega:
            return
        self._down_index = None
        for srv in svc.servers.values():
            if srv.alive:
                srv.alive = False
                srv.reason = reason
                self._tell(srv, False, reason, remove=True)
        if svc.quorum_up:
            svc.quorum_up = False
            self._quorum_changed(svc, True, reason, script=False)  # the scripts: _scripts_gone

    # ------------------------------------------------------------ scripts (hdslb.health.notify)

    def _script_rs(self, srv: ServerState, up: bool) -> None:
        srv.alpha_pending = False
        rs = srv.rs
        self._notifier.run(("rs", srv.vs_key, srv.rs_key), "notify_up" if up else "notify_down",
                           rs.notify_up if up else rs.notify_down,
                           f"real server {hostport(*srv.rs_key)} of {srv.vs_key[1]}/{srv.vs_key[0]}",
                           script_user=self._script_user, script_security=self._script_security)

    def _script_vs(self, svc: ServiceState, up: bool) -> None:
        vs = svc.vs
        self._notifier.run(("vs", vs.key), "quorum_up" if up else "quorum_down", vs.quorum_up if up else vs.quorum_down,
                           f"virtual server {vs}", script_user=self._script_user,
                           script_security=self._script_security)

    def _scripts_gone(self, svc: ServiceState) -> None:
        """A virtual server removed (or hdslbd stopping under omega): notify_down for its up servers, quorum_down
        if it had quorum, as keepalived's clear_service_vs does."""
        for srv in svc.servers.values():
            if srv.alive:
                self._script_rs(srv, False)
        if svc.quorum_up:
            self._script_vs(svc, False)

    @property
    def notifier(self) -> Notifier:
        return self._notifier

    # ------------------------------------------------------------ notices to the daemon

    def _emit(self, fn: Callable, *args: Any) -> None:
        if self._events is not None:
            self._events.put_nowait((fn, args))

    async def _dispatch(self) -> None:
        while True:
            fn, args = await self._events.get()
            try:
                r = fn(*args)
                if inspect.isawaitable(r):
                    await r
            except Exception:  # noqa: BLE001 — a failing callback must not stop later notices
                log.exception("health callback %s%r failed", getattr(fn, "__name__", fn), args)
            finally:
                self._events.task_done()


def raise_nofile(want: int) -> int:
    """Raise the soft RLIMIT_NOFILE to `want` (never above the hard limit, never lower it); return the soft limit
    now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max(want, 1 << 20)  # unlimited: any number of slots fits
    if soft >= want:
        return soft
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (OSError, ValueError) as e:
            log.warning("health: cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, new, e)
            return soft
        log.info("health: RLIMIT_NOFILE raised from %d to %d for %d checkers", soft, new, want - FD_RESERVE)
        return new
    return soft


class Slots:
    """A semaphore whose size can change (a reload adds checkers): at most `size` holders, first come first served."""

    def __init__(self, size: int):
        self.size = size
        self.used = 0
        self._waiters: collections.deque = collections.deque()

    @property
    def full(self) -> bool:
        return self.used >= self.size

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def resize(self, size: int) -> None:
        """A smaller size takes effect as probes finish; a larger one lets waiting probes in at once."""
        self.size = max(1, size)
        self._wake()

    async def __aenter__(self) -> None:
        if self.used < self.size and not self._waiters:
            self.used += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # _wake counted the slot as ours before setting the result
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # handed a slot, then cancelled before using it
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    async def __aexit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        self.used -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used < self.size:
            fut = self._waiters.popleft()
            if not fut.done():
                self.used += 1
                fut.set_result(None)
