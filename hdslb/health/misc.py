"""MISC_CHECK: run the operator's command and judge its exit status, as keepalived's check_misc.c does.

  exit 0         up; with misc_dynamic the weight stays as the script last set it ("weight unchanged")
  exit 1         down
  exit 2..255    with misc_dynamic: up, weight = status - 2 (0..253); without: down
  killed/timeout down; after misc_timeout the command's process group gets SIGTERM, then SIGKILL 2 s later

misc_path is split like a shell word list (quotes group) but no shell runs it. The command gets its own
session and process group so a timeout kills the whole tree, and no stdin/stdout/stderr: a chatty script
can neither block on a full pipe nor fill a log.

As keepalived: the check's `user USER [GROUP]`, else global_defs script_user, else the daemon's own user (root)
runs the command, in GROUP, else the user's own group, and no other group; with global_defs enable_script_security
a command that would run as root is not run when it, or a directory on its path, can be changed by anyone but root
(insecure_reason); the check then fails with that reason.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import shlex
import shutil
import signal
import stat
from typing import Optional

from hdslb.config.model import MiscCheck, RealServer
from hdslb.health.base import CheckResult, failed, os_reason, passed, seconds

KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL (keepalived: 2)


async def check_misc(checker: MiscCheck, rs: RealServer) -> CheckResult:
    try:
        argv = shlex.split(checker.misc_path)
    except ValueError as e:
        return failed(f"MISC_CHECK cannot parse misc_path {checker.misc_path!r}: {e}")
    if not argv:
        return failed("MISC_CHECK misc_path is empty")
    name = argv[0]
    timeout = checker.misc_timeout if checker.misc_timeout is not None else checker.delay_loop
    if checker.script_security and _runs_as_root(checker.user):
        why = insecure_reason(name)
        if why is not None:
            return failed(f"MISC_CHECK {name} not run (enable_script_security): {why}; run it as another user "
                          f"(script_user, or `user` in the check) or make it and its directories root's alone")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True, **_credentials(checker.user))
    except (OSError, KeyError, ValueError) as e:
        why = os_reason(e) if isinstance(e, OSError) else str(e)
        as_user = f" as {checker.user}" if checker.user else ""
        return failed(f"MISC_CHECK cannot run {name}{as_user}: {why}")
    try:
        status = await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        await _terminate(proc)
        return failed(f"MISC_CHECK {name} timed out after {seconds(timeout)}")
    except asyncio.CancelledError:
        _kill_group(proc.pid, signal.SIGKILL)
        raise
    if status < 0:
        return failed(f"MISC_CHECK {name} was killed by signal {-status}")
    if status == 0:
        # keepalived.conf(5) for misc_dynamic: "exit status 0: svc check success, weight unchanged" (check_misc.c
        # sets a weight for 2..255 only); the configured weight comes back when the script exits 2 + that weight.
        return passed(f"MISC_CHECK {name} exited 0")
    if checker.misc_dynamic and 2 <= status <= 255:
        return passed(f"MISC_CHECK {name} exited {status}: weight {status - 2}", status - 2)
    return failed(f"MISC_CHECK {name} exited {status}")


def _runs_as_root(user: Optional[str]) -> bool:
    if not user:
        return os.geteuid() == 0
    try:
        return pwd.getpwnam(user.split()[0]).pw_uid == 0
    except KeyError:
        return False  # an unknown user: the spawn fails with that reason


def insecure_reason(program: str) -> Optional[str]:
    """keepalived's enable_script_security test: why a program run as root could be replaced by a non-root user
    (it, or a directory on its path, owned by someone else or writable by a non-root group or by everyone),
    or None. A writable directory with the sticky bit (/tmp) is fine: nobody else can replace root's entries in
    it, and the next component is checked in turn. Both the path as written and the one symlinks lead to count.
    A program that cannot be found is not judged here: running it fails with its own reason."""
    path = program if "/" in program else shutil.which(program)
    if path is None:
        return None
    written, real = os.path.abspath(path), os.path.realpath(path)
    seen = set()
    for full in (written, real):
        parts = full.split(os.sep)[1:]
        comps = ["/"] + ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for i, comp in enumerate(comps):
            if comp in seen:
                continue
            seen.add(comp)
            try:
                st = os.stat(comp)
            except OSError:
                return None
            last = i == len(comps) - 1
            if st.st_uid != 0:
                return f"{comp} is owned by uid {st.st_uid}, not root"
            group_w = bool(st.st_mode & stat.S_IWGRP) and st.st_gid != 0
            other_w = bool(st.st_mode & stat.S_IWOTH)
            if (group_w or other_w) and (last or not st.st_mode & stat.S_ISVTX):
                return f"{comp} is writable by {'everyone' if other_w else f'group {st.st_gid}'}"
    return None


def _credentials(user: Optional[str]) -> dict:
    """`user NAME [[:]GROUP]` → subprocess user=/group=/extra_groups=; nothing when unset (run as the daemon).

    As keepalived's set_privileges (lib/notify.c): the group is GROUP, else NAME's own primary group ("If GROUPNAME
    is not specified, the group of the user is used"), and it is the only supplementary group (setgroups(1, &gid)).
    Setting the uid alone left the command in hdslbd's group, root: a script run as `nobody` could read and write
    whatever group root may (a 0640 root:root key, the config)."""
    if not user:
        return {}
    words = user.split()
    group = words[1].lstrip(":") if len(words) > 1 else ""
    gid = grp.getgrnam(group).gr_gid if group else pwd.getpwnam(words[0]).pw_gid  # KeyError: unknown, said so
    creds = {"user": words[0], "group": gid}
    if os.geteuid() == 0:  # setgroups needs CAP_SETGID; a daemon not root cannot change users anyway
        creds["extra_groups"] = [gid]
    return creds


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), KILL_GRACE)
    except asyncio.TimeoutError:
        pass
    finally:
        # Whatever the leader did, nothing it started may outlive the check: not when it ignores SIGTERM, and not
        # when the check is cancelled during the grace (server or service removed, hdslbd stopping), which would
        # otherwise skip this line and leave a script that traps TERM running for good.
        _kill_group(proc.pid, signal.SIGKILL)
    await proc.wait()


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session made the child its group's leader: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
