"""What ipvsadm and dpip share: --ctl-socket, the usage-error type, exit codes, and turning failures into text.

Both tools follow one shape: a pure parser (argv -> requests), the daemon calls, a pure formatter (reply -> text).
Everything here sits around that shape so the parsers and formatters stay free of I/O.
"""

from __future__ import annotations

import ipaddress
import sys
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
    """The address in `text` (of the given IP version, if one is asked for), or None when it is not one."""
    try:
        a = ipaddress.ip_address(text)
    except ValueError:
        return None
    return a if version in (None, a.version) else None


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
    except (ProtocolError, OSError) as e:  # OSError: permission denied on the socket, timeouts, resets
        print(f"{prog}: {e}", file=sys.stderr)
    return EXIT_FAIL
