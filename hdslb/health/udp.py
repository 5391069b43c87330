"""UDP_CHECK: send one datagram and judge the answer (or the silence) as keepalived does.

keepalived's rules (keepalived.conf(5) and check_udp.c):
  - no payload configured: a random one is sent;
  - without require_reply, only an ICMP error (port/host unreachable) fails the check: silence for
    connect_timeout counts as up;
  - with require_reply, a reply must arrive within connect_timeout; with require_reply DATA it must also
    be min_reply_length (default 0) to max_reply_length (default 255) bytes long and match DATA over the shorter
    of the two lengths (check_udp_reply; without DATA the lengths are not looked at, as in keepalived). The read
    takes max_reply_length + 1 bytes, so a longer reply is seen to be longer.
The socket is connect()ed so the kernel hands ICMP errors back as ECONNREFUSED on recv.
"""

from __future__ import annotations

import asyncio
import os
import socket

from hdslb.config.model import RealServer, UdpCheck
from hdslb.health.base import CheckResult, failed, os_reason, passed, probe_socket, seconds

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
        reply = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, checker.max_reply_length + 1),
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
        if len(reply) > checker.max_reply_length:
            return failed(f"reply from {where} is longer than {checker.max_reply_length} bytes (max_reply_length)")
        if len(reply) < checker.min_reply_length:
            return failed(f"{len(reply)}-byte reply from {where} is shorter than {checker.min_reply_length} bytes "
                          f"(min_reply_length)")
        n = min(len(reply), len(want))
        if reply[:n] != want[:n]:
            return failed(f"reply from {where} starts {reply[:n].hex()} (want {want[:n].hex()})")
    return passed(f"{len(reply)}-byte reply from {where}")
