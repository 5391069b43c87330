"""keepalived's notify_up / notify_down (a real server's) and quorum_up / quorum_down (a virtual server's) scripts.

The health manager calls run() where keepalived calls do_rs_notifies / do_vs_notifies (check/ipwrapper.c): on a
transition, never for the state a server or service starts in (see hdslb.health.manager, "Scripts"). run() only
queues: the script runs in a task of its own, so neither a probe, a verdict nor the control socket waits for it.

How a script runs, as keepalived 2 runs it (lib/notify.c) unless said otherwise:
  - the command line is split into words like misc_path (quotes group, backslashes escape) and executed
    directly, through no shell, with no arguments added and hdslbd's environment, in a session and process
    group of its own, stdin from /dev/null;
  - as the line's USER [GROUP], else global_defs script_user, else hdslbd's own user; with
    enable_script_security a script that would run as root is not run when it or a directory on its path can be
    changed by anyone but root: MISC_CHECK's rules and code (hdslb.health.misc);
  - a script that cannot be found, is not executable or is refused is logged as an error, each time it is due,
    with the reason, as a MISC_CHECK that cannot run is (keepalived disables such a script when it reads the
    config, with a log line); nothing else changes;
  - hdslb, not keepalived: stdout and stderr are logged (the first OUTPUT_LIMIT bytes; keepalived sends them to
    /dev/null), the exit status is logged (an error when it is not 0), and a script still running after
    NOTIFY_TIMEOUT is killed (its process group gets SIGTERM, then SIGKILL 2 s later, as a MISC_CHECK past its
    misc_timeout). keepalived never kills a notify script; a hung one would live on. 10 s is keepalived's default
    for the scripts it does time out (startup_script_timeout, shutdown_script_timeout): long enough for
    `dpip addr add`, a curl to a pager; short enough that a hung one does not pile up children.
  - hdslb, not keepalived: the scripts of one real server (or one virtual server) run one after the other, in
    the order of the transitions, so a notify_down still running is not overtaken by the notify_up after it
    (keepalived forks each at once and lets them race). Different servers' scripts run in parallel.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import signal
from typing import Any, Dict, Optional, Set

from hdslb.config.model import NotifyScript
from hdslb.health import misc
from hdslb.health.base import os_reason

log = logging.getLogger("hdslb.health")

NOTIFY_TIMEOUT = 10.0  # seconds a notify script may run before its process group is killed
OUTPUT_LIMIT = 4096  # bytes of a script's stdout+stderr that are logged; the rest is read and dropped
STOP_GRACE = 5.0  # seconds close() waits for running scripts (omega's at shutdown among them) before killing them


class Notifier:
    """Runs notify scripts off the event loop's critical path; one queue per key (a server, a service)."""

    def __init__(self, *, timeout: float = NOTIFY_TIMEOUT):
        self.timeout = timeout
        self._tails: Dict[Any, asyncio.Task] = {}  # key -> the last run queued for it
        self._tasks: Set[asyncio.Task] = set()
        self._procs: Set[asyncio.subprocess.Process] = set()
        # One fork at a time: starting a child takes ~3 ms of the loop, and 200 scripts due in the same instant
        # (a rack going down) forked in one loop iteration held it for 0.6 s; taken one by one, other work
        # (probes, verdicts, the control socket) runs between them.
        self._spawning = asyncio.Lock()
        self.runs = 0  # scripts started (for tests and metrics)

    def run(self, key: Any, keyword: str, script: Optional[NotifyScript], what: str, *,
            script_user: Optional[str] = None, script_security: bool = False) -> Optional[asyncio.Task]:
        """Queue `script` (keyword: notify_up, …; what: whose, for the log) behind the scripts already queued for
        `key`; returns at once (the task, for tests), or None when there is no script."""
        if script is None:
            return None
        user = script.user if script.user is not None else script_user
        prev = self._tails.get(key)
        t = asyncio.get_running_loop().create_task(
            self._after(prev, keyword, script.command, user, script_security, what), name=f"{keyword} {what}")
        self._tails[key] = t
        self._tasks.add(t)
        t.add_done_callback(lambda t, key=key: self._done(key, t))
        return t

    def _done(self, key: Any, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if self._tails.get(key) is t:
            del self._tails[key]

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def close(self, grace: float = STOP_GRACE) -> None:
        """Let running and queued scripts finish for up to `grace` seconds, then kill what is left."""
        tasks = list(self._tasks)
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=grace)
        procs = list(self._procs)
        for t in late:
            t.cancel()
        for p in procs:
            misc._kill_group(p.pid, signal.SIGKILL)
        await asyncio.gather(*late, return_exceptions=True)
        await asyncio.gather(*(p.wait() for p in procs))  # reaped: no zombie outlives hdslbd's stop

    async def _after(self, prev: Optional[asyncio.Task], *args: Any) -> None:
        if prev is not None:
            try:
                await asyncio.shield(prev)  # a cancelled follower must not cancel the script before it
            except BaseException:  # noqa: BLE001 — its outcome is logged by itself
                if asyncio.current_task().cancelling():
                    raise
        await self._exec(*args)

    async def _exec(self, keyword: str, command: str, user: Optional[str], security: bool, what: str) -> None:
        head = f"{keyword} of {what}"
        try:
            argv = shlex.split(command)
        except ValueError as e:  # the config reader split it already: only a replaced model gets here
            log.error("%s: cannot split %r: %s", head, command, e)
            return
        name = argv[0]
        if security and misc._runs_as_root(user):
            why = misc.insecure_reason(name)
            if why is not None:
                log.error("%s: %s not run (enable_script_security): %s; run it as another user (script_user, or "
                          "USER after the script) or make it and its directories root's alone", head, name, why)
                return
        try:
            async with self._spawning:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True, **misc._credentials(user))
        except (OSError, KeyError, ValueError) as e:
            why = os_reason(e) if isinstance(e, OSError) else str(e)
            log.error("%s: cannot run %s%s: %s", head, name, f" as {user}" if user else "", why)
            return
        self.runs += 1
        self._procs.add(proc)
        reader = asyncio.ensure_future(_read_bounded(proc.stdout, OUTPUT_LIMIT))
        try:
            try:
                status = await asyncio.wait_for(proc.wait(), self.timeout)
            except asyncio.TimeoutError:
                await misc._terminate(proc)
                log.error("%s: %s killed: still running after %s s%s", head, name, f"{self.timeout:g}",
                          _said(await _settle(reader)))
                return
            except asyncio.CancelledError:
                misc._kill_group(proc.pid, signal.SIGKILL)
                raise
            out = await _settle(reader)
        finally:
            self._procs.discard(proc)
            if not reader.done():
                reader.cancel()
        if status == 0:
            log.info("%s: %s exited 0%s", head, name, _said(out))
        elif status < 0:
            log.error("%s: %s was killed by signal %d%s", head, name, -status, _said(out))
        else:
            log.error("%s: %s exited %d%s", head, name, status, _said(out))


async def _read_bounded(stream: asyncio.StreamReader, limit: int) -> bytes:
    """The first `limit` bytes; the rest is read and dropped, so a chatty script never blocks on a full pipe."""
    kept = bytearray()
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return bytes(kept)
        if len(kept) < limit:
            kept += chunk[:limit - len(kept)]


async def _settle(reader: asyncio.Future) -> bytes:
    """What the script said; a grandchild that keeps the pipe open must not hold the run: give up after 1 s."""
    try:
        return await asyncio.wait_for(asyncio.shield(reader), 1.0)
    except asyncio.TimeoutError:
        return b""


def _said(out: bytes) -> str:
    text = out.decode("utf-8", "replace").strip()
    return f"; output: {text!r}" if text else ""
