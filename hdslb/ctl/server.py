"""The daemon's control socket: accept msgpack frames, dispatch them to the command registry, reply.

A bad frame gets an error reply and the connection is closed; a failing command gets errno + message;
neither can take the daemon down.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket

from hdslb.ctl import protocol
from hdslb.errors import HdslbError

log = logging.getLogger("hdslb.ctl")


class CtlServer:
    def __init__(self, path: str, dispatch):
        """dispatch(op, args) -> data (may be a coroutine); raises HdslbError for refusals."""
        self.path = path
        self.dispatch = dispatch
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        _claim_socket_path(self.path)
        self.server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    hdr = await reader.readexactly(protocol.HEADER_SIZE)
                except asyncio.IncompleteReadError:
                    return
                req_id = 0
                try:
                    body = await reader.readexactly(protocol.frame_length(hdr))
                    req_id, op, args = protocol.validate_request(protocol.decode_body(body))
                except (protocol.ProtocolError, asyncio.IncompleteReadError) as e:
                    writer.write(protocol.encode(protocol.reply_err(req_id, errno.EPROTO, str(e))))
                    await writer.drain()
                    return
                writer.write(protocol.encode(await self.handle(req_id, op, args)))
                await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            return
        finally:
            writer.close()

    async def handle(self, req_id: int, op: str, args: dict) -> dict:
        try:
            data = self.dispatch(op, args)
            if asyncio.iscoroutine(data):
                data = await data
            return protocol.reply_ok(req_id, data)
        except HdslbError as e:
            return protocol.reply_err(req_id, e.errno, e.message, getattr(e, "index", None))
        except Exception as e:  # a bug in a command must not kill the daemon; it is logged and reported
            log.exception("op %s failed", op)
            return protocol.reply_err(req_id, errno.EIO, f"internal error in {op}: {e}")


def _claim_socket_path(path: str) -> None:
    """Remove a stale socket left by a dead daemon; refuse to steal one a live daemon answers on."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        s.close()
    raise HdslbError(errno.EADDRINUSE, f"another hdslbd is already serving {path}")
