"""Blocking control-socket client used by the CLIs (ipvsadm, dpip, hdslb-ctl)."""

from __future__ import annotations

import errno
import itertools
import socket

from hdslb.ctl import protocol
from hdslb.errors import HdslbError

_ids = itertools.count(1)


class DaemonUnreachable(Exception):
    """No daemon answers on the socket; the message names the path that was tried."""


class Client:
    def __init__(self, path: str | None = None, timeout: float = 30.0):
        self.path = protocol.resolve_socket(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def connect(self) -> None:
        if self._sock is not None:
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            raise DaemonUnreachable(
                f"cannot reach hdslbd at {self.path}: {e.strerror} "
                f"(is it running? see `hdslb-ctl up`, --ctl-socket or ${protocol.ENV_CTL_SOCKET})"
            ) from None
        self._sock = s

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise DaemonUnreachable(f"hdslbd at {self.path} closed the connection")
            buf += chunk
        return bytes(buf)

    def call(self, op: str, args: dict | None = None):
        """Send one request; return its data or raise HdslbError(errno, message)."""
        self.connect()
        req_id = next(_ids)
        try:
            self._sock.sendall(protocol.encode(protocol.request(req_id, op, args)))
            n = protocol.frame_length(self._recv_exact(protocol.HEADER_SIZE))
            rep = protocol.decode_body(self._recv_exact(n))
        except TimeoutError:
            # A daemon that holds the socket but does not answer (stopped, wedged): say so by name. Still an
            # OSError, so the CLIs report it and exit 1; never "unreachable", which would let `up` start a second.
            self.close()
            raise TimeoutError(f"hdslbd at {self.path} did not answer {op} within {self.timeout:g} s") from None
        except (ConnectionResetError, BrokenPipeError) as e:
            # A daemon that died with our connection still in its listen queue (kill -9, then `hdslb-ctl up`
            # at once) resets it: nobody serves the socket, which is what the callers ask about.
            self.close()
            raise DaemonUnreachable(f"hdslbd at {self.path} went away: {e.strerror}") from None
        if rep.get("id") == 0 and rep.get("ok") is False:  # about the connection or frame, not one request's id
            self.close()  # the daemon closes it after such a reply
            raise HdslbError(rep.get("errno", errno.EIO), rep.get("error", "unknown error"))
        if rep.get("id") != req_id:
            raise protocol.ProtocolError(f"reply id {rep.get('id')} does not match request {req_id}")
        if rep.get("ok"):
            return rep.get("data")
        e = HdslbError(rep.get("errno", errno.EIO), rep.get("error", "unknown error"))
        e.index = rep.get("index")  # a refused batch: the position of the op refused
        raise e

    def batch(self, ops: list, dry_run: bool = False) -> dict:
        """Send many changes as one request (op "batch"): all are applied, or none (HdslbError.index says which
        op was refused). dry_run: only check them, apply nothing."""
        return self.call("batch", {"ops": [[op, args] for op, args in ops], **({"dry_run": True} if dry_run else {})})


def call(op: str, args: dict | None = None, path: str | None = None, timeout: float = 30.0):
    with Client(path, timeout) as c:
        return c.call(op, args)
