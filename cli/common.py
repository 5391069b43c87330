"""What ipvsadm and dpip share: --ctl-socket, the usage-error type, exit codes, and turning failures into text.

Both tools follow one shape: a pure parser (argv -> requests), the daemon calls, a pure formatter (reply -> text).
Everything here sits around that shape so the parsers and formatters stay free of I/O.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import sys
from types import SimpleNamespace
from typing import Callable

from hdslb.ctl.client import DaemonUnreachable
from hdslb.ctl.protocol import ProtocolError
from hdslb.errors import HdslbError

EXIT_OK = 0
EXIT_FAIL = 1  # the daemon refused, or could not be reached
EXIT_USAGE = 2  # bad command line; nothing was sent

CTL_SOCKET_OPT = "--ctl-socket"


class UsageError(Exception):
    """A bad command line. The message is printed as is (each tool words it its own way), exit code 2."""


def take_ctl_socket(argv: list[str]) -> tuple[str | None, list[str]]:
    """Remove `--ctl-socket PATH` or `--ctl-socket=PATH` from anywhere in argv.

    Taken out before the tool's own parser runs, so neither ipvsadm's option table nor dpip's object grammar
    has to know about it. None means: let the client fall back to $HDSLB_CTRL, then the default path.
    """
    path, rest = None, []
    it = iter(argv)
    for tok in it:
        if tok == CTL_SOCKET_OPT:
            path = next(it, None)
            if not path:
                raise UsageError(f"{CTL_SOCKET_OPT} needs a path")
        elif tok.startswith(CTL_SOCKET_OPT + "="):
            path = tok.split("=", 1)[1]
            if not path:
                raise UsageError(f"{CTL_SOCKET_OPT} needs a path")
        else:
            rest.append(tok)
    return path, rest


def ip_or_none(text: str, version: int | None = None):
    """The address in `text` (of the given IP version, if one is asked for), or None when it is not one. A scoped
    IPv6 address (fe80::1%eth0) is not one here: the daemon keys on the address alone (hdslb.net.addr)."""
    try:
        a = ipaddress.ip_address(text)
    except ValueError:
        return None
    return a if version in (None, a.version) and not getattr(a, "scope_id", None) else None


def closed_stdout_quiet(run: Callable[[], int]) -> int:
    """Run a tool's main; when whoever reads its output has gone (`hdslb-ctl status | head -1`, `ipvsadm -Ln |
    grep -q VIP`), end quietly with status 0, as hdslb-ctl top does: the reader has what it wanted. Without this
    the write's BrokenPipeError became "[Errno 32] Broken pipe" and exit 1 (or a traceback), and output still
    buffered at exit an "Exception ignored ... BrokenPipeError" line. Pending output is flushed here, where its
    failure can be caught; stdout then points at /dev/null so the interpreter's own flush at exit is silent
    (Python's documented recipe for SIGPIPE)."""
    try:
        try:
            return run()
        finally:  # (also on SystemExit: argparse's --help and usage errors exit after writing)
            sys.stdout.flush()
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # a stdout without a descriptor (tests, embedding)
            pass
        return EXIT_OK


def guarded(run: Callable[[], int], daemon_prefix: str, prog: str) -> int:
    """Run the daemon-talking part of a tool and map every way it can fail to a message on stderr and exit 1.

    `daemon_prefix` is what goes before a daemon's refusal: ipvsadm prints ipvs_strerror() bare, dpip prints
    "dpip: <error>". Reaching no daemon, a garbled frame or a socket error is reported the same way for both.
    """
    try:
        return run()
    except HdslbError as e:
        print(f"{daemon_prefix}{e.message}", file=sys.stderr)
    except DaemonUnreachable as e:
        print(str(e), file=sys.stderr)
    except BrokenPipeError:  # our stdout's reader went away, not the daemon: closed_stdout_quiet's business
        raise
    except (ProtocolError, OSError) as e:  # OSError: permission denied on the socket, timeouts, resets
        print(f"{prog}: {e}", file=sys.stderr)
    return EXIT_FAIL


def run_lines(client, lines: list, run_alone: Callable, report: Callable[[str], None], warn: Callable[[str], None],
              noun: str, expects: Callable | None = None) -> bool:
    """Run the lines of ipvsadm -R / dpip -b: [(line number, Invocation)]. A run of lines that only change rules
    goes as one batch request; a line that reads (a listing, -Z, show) runs alone, in its place, through
    run_alone(invocation). When reads split the changes into several batches, all the changes are first checked
    together on the daemon's scratch copy (a dry run), so a refused change still leaves everything as it was.
    A failure is reported as `line N: reason; <what was applied>` through report (a read that fails after
    changes were applied says which); returns False then. expects(invocation) gives, for a line that reads, batch
    ops that fail as that read would and change nothing (-Z of a service that is not there: an edit naming only
    the service); they join the dry run in the line's place, so such a read refuses the whole input up front."""
    from hdslb.ctl.commands import BATCH_OPS

    segments: list = []  # [True, [(n, inv), ...]] for a run of changes, [False, [(n, inv)]] for a line alone
    for n, inv in lines:
        change = bool(inv.requests) and all(op in BATCH_OPS for op, _ in inv.requests)
        if change and segments and segments[-1][0]:
            segments[-1][1].append((n, inv))
        else:
            segments.append([change, [(n, inv)]])

    def ops_of(run) -> tuple[list, list]:
        ops, where = [], []
        for n, inv in run:
            for req in inv.requests:
                ops.append(req)
                where.append(n)
        return ops, where

    def at(e: HdslbError, where: list) -> str:
        i = getattr(e, "index", None)
        return f"line {where[i]}: " if isinstance(i, int) and 0 <= i < len(where) else ""

    checks: list = []  # the dry run: every change, and the reads' expectations in their places
    n_changes = n_expected = 0
    for change, run in segments:
        if change:
            checks += run
            n_changes += 1
        elif expects is not None and (exp := expects(run[0][1])):
            checks.append((run[0][0], SimpleNamespace(requests=exp)))
            n_expected += 1
    if n_changes > 1 or (n_changes and n_expected):
        ops, where = ops_of(checks)
        if ops:
            try:
                client.batch(ops, dry_run=True)
            except HdslbError as e:
                report(f"{at(e, where)}{e.message}; nothing of the {noun} was applied")
                return False
    done = None  # the last line whose change was applied
    for change, run in segments:
        try:
            if change:
                ops, where = ops_of(run)
                try:
                    data = client.batch(ops)
                except HdslbError as e:
                    raise _At(at(e, where), e) from None
                for w in (data or {}).get("warnings", ()):
                    warn(f"line {where[w['index']]}: {w['warning']}")
            else:
                try:
                    run_alone(run[0][1])
                except HdslbError as e:
                    raise _At(f"line {run[0][0]}: ", e) from None
        except _At as f:
            applied = (f"nothing of the {noun} was applied" if done is None else
                       f"the changes up to line {done} were applied, none after")
            report(f"{f.where}{f.err.message}; {applied}")
            return False
        if change:
            done = run[-1][0]
    return True


class _At(Exception):
    def __init__(self, where: str, err: HdslbError):
        super().__init__(where)
        self.where, self.err = where, err


# What only a shell-style split reads differently from str.split(): quotes, backslashes, comments, and blanks
# other than space and tab (str.split() splits on any Unicode blank, a shell on space, tab and newline only).
_SHELL_SYNTAX = re.compile(r"""['"\\#]|[^\S \t]""")


def shell_words(line: str, comments: bool = False) -> list[str]:
    """shlex.split(line, comments) for one input line of a batch or restore file; a line without quoting,
    comments or unusual blanks (nearly every line of a generated file) is split by str.split(), 20x cheaper:
    shlex was most of parsing a 100k-line file. Raises ValueError on an unbalanced quote, as shlex does."""
    if _SHELL_SYNTAX.search(line) is None:
        return line.split()
    return shlex.split(line, comments=comments)
