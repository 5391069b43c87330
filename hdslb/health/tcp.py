"""TCP_CHECK: the real server is up if a TCP connection to it completes within connect_timeout.

As keepalived: connect, then close at once; nothing is sent.
"""

from __future__ import annotations

import asyncio
import socket

from hdslb.config.model import RealServer, TcpCheck
from hdslb.health.base import (CheckResult, close_without_time_wait, failed, os_reason, passed, probe_socket, seconds)


async def check_tcp(checker: TcpCheck, rs: RealServer) -> CheckResult:
    opened = probe_socket(checker, rs, socket.SOCK_STREAM, "connect to")
    if isinstance(opened, CheckResult):
        return opened
    sock, ip, port, where = opened
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (str(ip), port)),
                               checker.connect_timeout)
    except asyncio.TimeoutError:
        return failed(f"connect to {where} timed out after {seconds(checker.connect_timeout)}")
    except ConnectionRefusedError:
        return failed(f"connect to {where} refused")
    except OSError as e:
        return failed(f"connect to {where} failed: {os_reason(e)}")
    finally:
        close_without_time_wait(checker, sock)
        sock.close()
    return passed(f"connected to {where}")
