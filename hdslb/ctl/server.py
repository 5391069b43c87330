"""The daemon's control socket: accept msgpack frames, dispatch them to the command registry, reply.

A bad frame gets an error reply and the connection is closed; a failing command gets errno + message;
neither can take the daemon down. No client can hold the daemon either: a frame that has begun must arrive
whole within FRAME_TIMEOUT_S, a reply must be taken within WRITE_TIMEOUT_S, the bytes of requests being read
are bounded across all connections, and past MAX_CLIENTS connections the longest-idle one makes room.

The socket is root's alone (0600), whatever the umask: controlling the balancer is CAP_NET_ADMIN's business.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import time

from hdslb.ctl import protocol
from hdslb.errors import HdslbError
from hdslb.heap import collections_paused

log = logging.getLogger("hdslb.ctl")

SOCKET_MODE = 0o600
FRAME_TIMEOUT_S = 10.0  # from a request's first byte to its last; idle connections between requests may wait
WRITE_TIMEOUT_S = 30.0  # a reply the peer does not read within this drops the connection (the CLIs wait 30 s)
MAX_CLIENTS = 64  # connections at once; one more closes the longest-idle, or is refused when none is idle
SMALL_FRAME = 1 << 20  # requests this small are always read; larger ones share INFLIGHT_MAX
INFLIGHT_MAX = protocol.MAX_FRAME  # bytes of large requests being read at once, all connections together


class CtlServer:
    def __init__(self, path: str, dispatch):
        """dispatch(op, args) -> data (may be a coroutine); raises HdslbError for refusals."""
        self.path = path
        self.dispatch = dispatch
        self.server: asyncio.AbstractServer | None = None
        self._conns: dict[asyncio.StreamWriter, float | None] = {}  # -> monotonic time it went idle; None: busy
        self._inflight = 0  # bytes of large requests admitted and not yet decoded
        self._refusing = 0  # connections being told EBUSY
        self._tasks: set[asyncio.Task] = set()  # one per connection

    async def start(self) -> None:
        _claim_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            # bind() gives the file 0777 & ~umask; nobody can connect before listen(), which start_unix_server
            # calls, so setting the mode first leaves no moment where another user could get a connection in.
            os.chmod(self.path, SOCKET_MODE)
            self.server = await asyncio.start_unix_server(self._accept, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self._conns):  # idle clients (ipvsadm -i, hdslb-top) must not hold the stop
                w.transport.abort()
            if self._tasks:  # let their handlers see the close and end, rather than be cancelled mid-read
                await asyncio.wait(list(self._tasks), timeout=1.0)
            await self.server.wait_closed()
            self.server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        if len(self._conns) >= MAX_CLIENTS:
            idle = [(t, i, w) for i, (w, t) in enumerate(self._conns.items()) if t is not None]
            if not idle:
                return False
            since, _, w = min(idle)
            log.warning("control socket: %d connections; closing one idle for %.0f s", len(self._conns),
                        time.monotonic() - since)
            del self._conns[w]
            w.transport.abort()
        self._conns[writer] = time.monotonic()
        return True

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A new connection, served by a task of our own. Handed to asyncio as a coroutine, its task got a
        done-callback (Python < 3.12) that calls task.exception(), which raises on a task cancelled: a connection
        still open when hdslbd exits (asyncio.run cancels it; `hdslb-ctl up` polls while a start fails) logged an
        "Exception in callback ... CancelledError" traceback. Cancelled at exit is a normal end; a failure in the
        handler is logged by _serve_conn itself."""
        task = asyncio.get_running_loop().create_task(self._serve_conn(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        abort = False  # close without flushing: a peer that does not read would keep the transport forever
        if not self._admit(writer):
            await self._refuse(reader, writer)
            return
        try:
            while True:
                self._conns[writer] = time.monotonic()
                try:
                    first = await reader.readexactly(1)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self._conns[writer] = None
                req_id, reserved = 0, 0
                try:
                    async with asyncio.timeout(FRAME_TIMEOUT_S):
                        n = protocol.frame_length(first + await reader.readexactly(protocol.HEADER_SIZE - 1))
                        if n > SMALL_FRAME:
                            if self._inflight + n > INFLIGHT_MAX:
                                await _discard(reader, n)  # read on, so the peer's send completes and it hears why
                                raise _Busy(n)
                            reserved, self._inflight = n, self._inflight + n
                        body = await reader.readexactly(n)
                    msg = protocol.decode_body(body)
                    req_id = msg.get("id") if type(msg.get("id")) is int else 0
                    req_id, op, args = protocol.validate_request(msg)
                except TimeoutError:
                    log.warning("control socket: a request did not arrive whole within %g s; connection closed",
                                FRAME_TIMEOUT_S)
                    await self._send(writer, 0, "", protocol.reply_err(
                        0, errno.ETIMEDOUT, f"request incomplete after {FRAME_TIMEOUT_S:g} s"))
                    return
                except _Busy as e:
                    await self._send(writer, 0, "", protocol.reply_err(
                        0, errno.ENOBUFS, f"{e.args[0]} bytes of request do not fit beside the {self._inflight} "
                                          f"other control clients are sending; try again"))
                    return
                except (protocol.ProtocolError, asyncio.IncompleteReadError) as e:
                    await self._send(writer, req_id, "", protocol.reply_err(req_id, errno.EPROTO, str(e)))
                    return
                finally:
                    self._inflight -= reserved
                    body = None
                if not await self._send(writer, req_id, op, await self.handle(req_id, op, args, encode=True)):
                    abort = True
                    return
        except (ConnectionError, OSError):
            return
        except Exception:  # a bug here must not surface as asyncio's "unhandled exception in callback"
            log.exception("control connection failed")
            abort = True
        finally:
            self._conns.pop(writer, None)
            if abort:
                writer.transport.abort()
            else:
                writer.close()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """No room and nobody idle: take the peer's request (unread, it would make our close a reset and the peer
        would only see the connection drop) and answer EBUSY. Refusals are bounded too."""
        self._refusing += 1
        try:
            if self._refusing > MAX_CLIENTS:
                writer.transport.abort()
                return
            log.warning("control socket: refusing a connection, %d busy ones already", len(self._conns))
            async with asyncio.timeout(FRAME_TIMEOUT_S):
                await _discard(reader, protocol.frame_length(await reader.readexactly(protocol.HEADER_SIZE)))
            if await self._send(writer, 0, "", protocol.reply_err(
                    0, errno.EBUSY, f"hdslbd is busy with {len(self._conns)} control connections; try again")):
                writer.close()
                return
            writer.transport.abort()
        except (TimeoutError, asyncio.IncompleteReadError, protocol.ProtocolError, ConnectionError, OSError):
            writer.transport.abort()
        finally:
            self._refusing -= 1

    async def _send(self, writer: asyncio.StreamWriter, req_id: int, op: str, rep: dict | list) -> bool:
        """Write one reply (or its frame, already encoded, as pieces); False when the peer did not take it within
        WRITE_TIMEOUT_S. A frame in pieces is written a piece at a time, each taken by the transport (or the
        peer) before the next: a 27 MB frame written in one call held the loop up to 54 ms copying it."""
        try:
            parts = rep if type(rep) is list else [protocol.encode(rep)]
        except Exception as e:
            parts = [protocol.encode(_unencodable(req_id, op, e))]
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                for i in range(len(parts)):
                    writer.write(parts[i])
                    parts[i] = b""  # (each piece freed once the transport holds it)
                    await writer.drain()
        except TimeoutError:
            log.warning("control socket: a client did not read its reply within %g s; connection dropped",
                        WRITE_TIMEOUT_S)
            return False
        return True

    async def handle(self, req_id: int, op: str, args: dict, encode: bool = False) -> dict | list:
        """The reply to one request. A command answering with a coroutine (a big listing, built in chunks with
        the loop served in between) is built with the cyclic collector paused; with encode, its reply comes back
        as the encoded frame's pieces, made inside that pause (so the listing's objects are gone before the
        collector is back, else it walks them all: see hdslb.heap.collections_paused) and in chunks
        (protocol.encode_parts)."""
        try:
            data = self.dispatch(op, args)
            if asyncio.iscoroutine(data):
                with collections_paused():
                    rep = protocol.reply_ok(req_id, await data)
                    if encode:
                        try:
                            return await protocol.encode_parts(rep, consume=True)
                        except Exception as e:  # rep is consumed: the refusal is the reply
                            return _unencodable(req_id, op, e)
                    return rep
            return protocol.reply_ok(req_id, data)
        except HdslbError as e:
            return protocol.reply_err(req_id, e.errno, e.message, getattr(e, "index", None))
        except Exception as e:  # a bug in a command must not kill the daemon; it is logged and reported
            log.exception("op %s failed", op)
            return protocol.reply_err(req_id, errno.EIO, f"internal error in {op}: {e}")


def _unencodable(req_id: int, op: str, e: Exception) -> dict:
    """The reply instead of one that cannot be encoded."""
    if isinstance(e, protocol.ProtocolError):  # larger than a frame may be: the client could not read it either
        log.error("reply to %s not sent: %s", op, e)
        return protocol.reply_err(req_id, errno.EMSGSIZE, f"the reply to {op} is too large: {e}")
    # a command returned something msgpack cannot carry: a bug, reported as one
    log.error("reply to %s cannot be encoded", op, exc_info=e)
    return protocol.reply_err(req_id, errno.EIO, f"internal error in {op}: reply cannot be encoded: {e}")


async def _discard(reader: asyncio.StreamReader, n: int) -> None:
    while n > 0:
        chunk = await reader.read(min(n, 1 << 16))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", n)
        n -= len(chunk)


class _Busy(Exception):
    """A large request that does not fit in INFLIGHT_MAX beside those being read."""


def _claim_socket_path(path: str) -> None:
    """Remove a stale socket left by a dead daemon; refuse to steal one a live daemon answers on, and refuse to
    remove anything that is not a socket (a mistyped --ctl-socket must not delete a file)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise HdslbError(errno.EEXIST, f"control socket path {path} exists and is not a socket; "
                                       f"remove it or choose another --ctl-socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        s.close()
    raise HdslbError(errno.EADDRINUSE, f"another hdslbd is already serving {path}")
