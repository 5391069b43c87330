"""UDP_CHECK: send one datagram and judge the answer (or the silence) as keepalived does.

keepalived's rules (keepalived.conf(5) and check_udp.c):
  - no payload configured: a random one is sent;
  - without require_reply, only an ICMP error (port/host unreachable) fails the check: silence for
    connect_timeout counts as up;
  - with require_reply, a reply must arrive within connect_timeout; with require_reply DATA it must also
    be at most max_reply_length (255) bytes and match DATA over the shorter of the two lengths.
The socket is connect()ed so the kernel hands ICMP errors back as ECONNREFUSED on recv.
"""

from __future__ import annotations

import asyncio
import os
import socket

from hdslb.config.model import RealServer, UdpCheck
from hdslb.health.base import (UDP_MAX_REPLY_LENGTH, CheckResult, failed, os_reason, passed, probe_socket, seconds)

_RANDOM_PAYLOAD = 16  # bytes sent when no payload is configured


async def check_udp(checker: UdpCheck, rs: RealServer) -> CheckResult:
    opened = probe_socket(checker, rs, socket.SOCK_DGRAM, "UDP to")
    if isinstance(opened, CheckResult):
        return opened
    sock, ip, port, where = opened
    timeout = checker.connect_timeout
    try:
        # connect() on a UDP socket only records the peer: it returns at once.
        sock.connect((str(ip), port))
        sock.send(checker.payload if checker.payload else os.urandom(_RANDOM_PAYLOAD))
        reply = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, UDP_MAX_REPLY_LENGTH + 1),
                                       timeout)
    except asyncio.TimeoutError:
        if checker.require_reply is None:
            return passed(f"no ICMP error from {where} within {seconds(timeout)}")
        return failed(f"no reply from {where} within {seconds(timeout)}")
    except ConnectionRefusedError:
        return failed(f"{where} is unreachable (ICMP port unreachable)")
    except OSError as e:
        return failed(f"UDP to {where} failed: {os_reason(e)}")
    finally:
        sock.close()
    want = checker.require_reply
    if want:
        if len(reply) > UDP_MAX_REPLY_LENGTH:
            return failed(f"reply from {where} is longer than {UDP_MAX_REPLY_LENGTH} bytes (max_reply_length)")
        n = min(len(reply), len(want))
        if reply[:n] != want[:n]:
            return failed(f"reply from {where} starts {reply[:n].hex()} (want {want[:n].hex()})")
    return passed(f"{len(reply)}-byte reply from {where}")
