"""SMTP_CHECK: the real server is up if it holds an SMTP dialogue: a 220 greeting, 250 to HELO, a reply to QUIT.

As keepalived (check_smtp.c): connect, read the greeting (its code must be 220), send `HELO <helo_name>` (default
keepalived's smtpchecker.keepalived.org), want 250, send QUIT and read its reply, whatever its code (the server
answered; keepalived does not look at it either). A reply may span lines (`250-…` up to `250 …`); its code is
the first three digits. Each `host { }` block (keepalived's older way to check several addresses from one
checker) is one such dialogue, and every one must pass, in order; a host's connect options default to the
SMTP_CHECK's own. connect_timeout bounds each step (the connect, each read and each write), as keepalived's
connection timeout bounds each I/O.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from typing import Optional, Tuple

from hdslb.config.model import RealServer, SmtpCheck, SmtpHost
from hdslb.health.base import (CheckResult, close_without_time_wait, failed, os_reason, passed, probe_socket, seconds)

LINE_LIMIT = 4096  # bytes: the longest reply line read (RFC 5321 allows 512)
MAX_REPLY_LINES = 100  # lines of one multi-line reply before it counts as nonsense


async def check_smtp(checker: SmtpCheck, rs: RealServer) -> CheckResult:
    hosts = [_host_checker(checker, h) for h in checker.hosts] or [checker]
    result = passed("no host")
    for c in hosts:
        result = await _dialogue(c, rs)
        if not result.ok:
            return result
    if len(hosts) > 1:
        return passed(f"{len(hosts)} SMTP hosts answered")
    return result


def _host_checker(checker: SmtpCheck, host: SmtpHost) -> SmtpCheck:
    """The checker as one host block sees it: the block's connect options over the checker's."""
    over = {f.name: getattr(host, f.name) for f in dataclasses.fields(host)
            if f.name != "where" and getattr(host, f.name) is not None}
    return dataclasses.replace(checker, **over, hosts=())


class _Failed(Exception):
    pass


async def _dialogue(checker: SmtpCheck, rs: RealServer) -> CheckResult:
    opened = probe_socket(checker, rs, socket.SOCK_STREAM, "connect to")
    if isinstance(opened, CheckResult):
        return opened
    sock, ip, port, where = opened
    timeout = checker.connect_timeout
    writer = None
    step = f"connect to {where}"
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (str(ip), port)), timeout)
        reader, writer = await asyncio.open_connection(sock=sock, limit=LINE_LIMIT)
        step = f"greeting from {where}"
        code, text = await asyncio.wait_for(_reply(reader), timeout)
        if code != 220:
            return failed(f"SMTP greeting from {where} is {text!r} (want 220)")
        step = f"HELO to {where}"
        writer.write(f"HELO {checker.helo_name}\r\n".encode("utf-8"))
        await asyncio.wait_for(writer.drain(), timeout)
        code, text = await asyncio.wait_for(_reply(reader), timeout)
        if code != 250:
            return failed(f"SMTP HELO answered {text!r} by {where} (want 250)")
        step = f"QUIT to {where}"
        writer.write(b"QUIT\r\n")
        await asyncio.wait_for(writer.drain(), timeout)
        await asyncio.wait_for(_reply(reader), timeout)
    except asyncio.TimeoutError:
        return failed(f"SMTP {step} timed out after {seconds(timeout)}")
    except ConnectionRefusedError:
        return failed(f"connect to {where} refused")
    except _Failed as e:
        return failed(f"SMTP {step}: {e}")
    except OSError as e:
        return failed(f"SMTP {step} failed: {os_reason(e)}")
    finally:
        close_without_time_wait(checker, sock)
        if writer is not None:
            writer.transport.abort()
        else:
            sock.close()
    return passed(f"SMTP dialogue with {where}")


async def _reply(reader: asyncio.StreamReader) -> Tuple[Optional[int], str]:
    """One SMTP reply: (its code, or None if the line has none; its last line, for the reason)."""
    for _ in range(MAX_REPLY_LINES):
        try:
            raw = await reader.readline()
        except ValueError:  # the line does not fit the stream's buffer
            raise _Failed(f"a reply line is longer than {LINE_LIMIT} bytes") from None
        if not raw.endswith(b"\n"):
            raise _Failed("connection closed before a reply" if not raw else f"reply cut short: {raw[:60]!r}")
        line = raw.decode("latin-1").rstrip("\r\n")
        code = int(line[:3]) if len(line) >= 3 and line[:3].isascii() and line[:3].isdigit() else None
        if code is None or line[3:4] != "-":
            return code, line[:80]
    raise _Failed(f"a reply of more than {MAX_REPLY_LINES} lines")
