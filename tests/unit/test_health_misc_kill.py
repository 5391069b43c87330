"""A MISC_CHECK command never outlives its check: not on timeout, and not when the check is cancelled during the
SIGTERM grace (hdslbd stopping, the server or its virtual server removed by a reload) by a script that ignores
SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from hdslb.health import HealthManager, check_misc, pairs_of
from hdslb.health.misc import KILL_GRACE
from tests.unit.test_health import Recorder, misc_check, real, until, virtual

# Writes its pid, ignores SIGTERM, and would run for ever; its `sleep` children share its process group.
STUBBORN = "sh -c 'echo $$ > {pidfile}; trap \"\" TERM; while :; do sleep 0.1; done'"


def gone(pid: int) -> bool:
    """Exited and reaped (a zombie still holds its /proc entry)."""
    return not os.path.exists(f"/proc/{pid}")


@pytest.fixture
def pidfile(tmp_path):
    """Where the script writes its pid; a test that fails does not leave the script running."""
    path = tmp_path / "pid"
    yield path
    if path.exists() and path.read_text().strip():
        try:
            os.killpg(int(path.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


async def pid_of(pidfile) -> int:
    await until(lambda: pidfile.exists() and pidfile.read_text().strip())
    return int(pidfile.read_text())


async def test_a_script_ignoring_sigterm_is_killed_after_the_grace(pidfile):
    r = await check_misc(misc_check(STUBBORN.format(pidfile=pidfile), timeout=0.2), real())
    assert not r.ok and "timed out after 0.2s" in r.reason
    assert gone(int(pidfile.read_text()))


async def test_cancel_during_the_sigterm_grace_still_kills_the_script(pidfile):
    task = asyncio.create_task(check_misc(misc_check(STUBBORN.format(pidfile=pidfile), timeout=0.2), real()))
    pid = await pid_of(pidfile)
    await asyncio.sleep(0.5)  # timed out at 0.2 s: now inside the 2 s grace after SIGTERM
    assert not task.done() and not gone(pid)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await until(lambda: gone(pid), timeout=KILL_GRACE / 2)


async def test_removing_the_server_during_the_grace_kills_the_script(pidfile):
    rec = Recorder()
    mgr = HealthManager(rec.on_change, rec.on_quorum)
    rs = real(85, misc_check(STUBBORN.format(pidfile=pidfile), timeout=0.2))
    keep = real(86)
    await mgr.start(pairs_of([virtual(rs, keep)]))
    try:
        pid = await pid_of(pidfile)
        await asyncio.sleep(0.5)
        mgr.update(pairs_of([virtual(keep)]))  # a reload drops the server while its script is in the grace
        await until(lambda: gone(pid), timeout=KILL_GRACE / 2)
    finally:
        await mgr.stop()


async def test_stopping_during_the_grace_kills_the_script(pidfile):
    rec = Recorder()
    mgr = HealthManager(rec.on_change, rec.on_quorum)
    await mgr.start(pairs_of([virtual(real(87, misc_check(STUBBORN.format(pidfile=pidfile), timeout=0.2)))]))
    pid = await pid_of(pidfile)
    await asyncio.sleep(0.5)
    await mgr.stop()
    await until(lambda: gone(pid), timeout=KILL_GRACE / 2)
