"""TCP_CHECK: the real server is up if a TCP connection to it completes within connect_timeout.

As keepalived: connect, then close at once; nothing is sent.
"""

from __future__ import annotations

import asyncio
import socket

from hdslb.config.model import RealServer, TcpCheck
from hdslb.health.base import (BindError, CheckResult, close_without_time_wait, failed, hostport, open_socket, os_reason,
                               passed, seconds, target)


async def check_tcp(checker: TcpCheck, rs: RealServer) -> CheckResult:
    ip, port = target(checker, rs)
    where = hostport(ip, port)
    try:
        sock = open_socket(checker, ip, socket.SOCK_STREAM)
    except BindError as e:
        return failed(f"connect to {where}: {e.strerror}")
    except OSError as e:
        return failed(f"connect to {where}: cannot open a socket: {os_reason(e)}")
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
