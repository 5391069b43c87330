"""What every checker shares: the result of one probe, keepalived's defaults, and the address a probe goes to.

Every probe is `async def check(checker, rs) -> CheckResult`: it performs ONE attempt, never raises for a
network or process failure (the reason goes in the result), and never blocks the event loop. Retries,
scheduling and state belong to the manager.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

from hdslb.config.model import IPAddress, NetChecker, RealServer

# keepalived.conf(5), LVS CONFIGURATION, virtual_server section; the config loader fills these in, so they
# matter here only for checkers built by hand.
DEFAULT_CONNECT_TIMEOUT = 5.0  # "Optional connection timeout in seconds. The default is 5 seconds"
DEFAULT_DELAY_LOOP = 60.0  # "delay timer for checker polling (60 seconds if not specified)"
DEFAULT_RETRY = 1  # "Default: 1 unless specified below" (MISC_CHECK: 0, DNS_CHECK: 3)
DEFAULT_DELAY_BEFORE_RETRY = 1.0  # "3 seconds for HTTP_GET and SSL_GET, and 1 second otherwise"
DEFAULT_STATUS_CODES = ((200, 299),)  # url status_code: "Default is 200-299"


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str  # a sentence a person can act on: what was tried, against what, what came back
    weight: Optional[int] = None  # MISC_CHECK with misc_dynamic: the weight the exit code asks for


def passed(reason: str, weight: Optional[int] = None) -> CheckResult:
    return CheckResult(True, reason, weight)


def failed(reason: str) -> CheckResult:
    return CheckResult(False, reason)


def hostport(ip: IPAddress, port: int) -> str:
    """'192.168.100.2:80', '[fd00::2]:80': the spelling ipvsadm uses."""
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def seconds(t: float) -> str:
    """'1.0s', '0.05s': floats keep the precision the operator wrote."""
    return f"{float(t)}s"


def target(checker: NetChecker, rs: RealServer) -> Tuple[IPAddress, int]:
    """connect_ip / connect_port, each defaulting to the real server's own (keepalived)."""
    ip = checker.connect_ip if checker.connect_ip is not None else rs.ip
    port = checker.connect_port if checker.connect_port is not None else rs.port
    return ip, port


def local_addr(checker: NetChecker, ip: IPAddress) -> Optional[Tuple[str, int]]:
    """bindto / bind_port as a socket address, or None when neither is set (the kernel picks)."""
    if checker.bindto is None and checker.bind_port is None:
        return None
    host = str(checker.bindto) if checker.bindto is not None else ("::" if ip.version == 6 else "0.0.0.0")
    return host, checker.bind_port or 0


class BindError(OSError):
    """bindto/bind_port could not be used: a local problem, worded as one."""


def open_socket(checker: NetChecker, ip: IPAddress, kind: int) -> socket.socket:
    """A non-blocking socket of the target's family, bound as the checker asks."""
    sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, kind)
    try:
        sock.setblocking(False)
        local = local_addr(checker, ip)
        if local is not None:
            try:
                sock.bind(local)
            except OSError as e:
                raise BindError(e.errno, f"cannot bind to {local[0]}:{local[1]}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def probe_socket(checker: NetChecker, rs: RealServer, kind: int, verb: str):
    """(sock, ip, port, where) for a probe of rs: the socket open_socket() gives, the target and how messages
    name it; or the failed CheckResult when the socket cannot be opened or bound (its reason starts with `verb`,
    e.g. "connect to")."""
    ip, port = target(checker, rs)
    where = hostport(ip, port)
    try:
        return open_socket(checker, ip, kind), ip, port, where
    except BindError as e:
        return failed(f"{verb} {where}: {e.strerror}")
    except OSError as e:
        return failed(f"{verb} {where}: cannot open a socket: {os_reason(e)}")


def close_without_time_wait(checker: NetChecker, sock) -> None:
    """Make the coming close() of a probe's TCP socket an abort (RST) when the checker binds a fixed bind_port.

    Closing first, we would hold the connection in TIME_WAIT for 60 s, and every probe in that time fails to
    bind the same local port ("Address already in use"). SO_REUSEADDR is not the cure: bind() would then
    succeed, but connect() from that port to the same real server collides with our own TIME_WAIT entry for the
    same four-tuple and fails (EADDRNOTAVAIL) unless net.ipv4.tcp_tw_reuse allows it, which by default it does
    on loopback only. SO_LINGER {on, 0 s} closes with a reset and leaves nothing behind, and loses nothing: a
    TCP_CHECK sends no data, an HTTP check has read all it wanted. Without bind_port the kernel picks a fresh
    port each time and a normal close (FIN) stays, as keepalived's, so real servers do not log resets."""
    if checker.bind_port:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # the socket is gone already: nothing to linger


def os_reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__
