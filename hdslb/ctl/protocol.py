"""Control-socket framing: a 4-byte big-endian length, then one msgpack map.

Request: {"v": 1, "id": <int>, "op": "<noun.verb>", "args": {...}}
Reply:   {"v": 1, "id": <same>, "ok": true,  "data": <any>}
      or {"v": 1, "id": <same>, "ok": false, "errno": <int>, "error": "<message>"[, "index": <int>]}

op "batch" carries {"ops": [[op, args], ...]}: all applied or none; a refusal's "index" is the op refused.

This module never touches a socket, so the CLIs, the daemon and the tests share one codec.
"""

from __future__ import annotations

import os
import struct

import msgpack

VERSION = 1
DEFAULT_CTL_SOCKET = "/var/run/hdslb_ctrl"  # the seed's ctrl_defs ipc_msg unix_domain
ENV_CTL_SOCKET = "HDSLB_CTRL"
MAX_FRAME = 64 * 1024 * 1024  # a restore of 100k real servers fits; anything larger is a bug or an attack
_HDR = struct.Struct("!I")


class ProtocolError(Exception):
    """A frame that cannot be decoded; the peer gets an error reply, the connection is closed."""


class _TooMany(Exception):
    pass


def resolve_socket(explicit: str | None = None) -> str:
    """--ctl-socket beats $HDSLB_CTRL beats the default."""
    return explicit or os.environ.get(ENV_CTL_SOCKET) or DEFAULT_CTL_SOCKET


def encode(msg: dict) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HDR.pack(len(body)) + body


async def encode_parts(msg: dict, chunk: int = 200, consume: bool = False) -> list[bytes]:
    """encode(msg) as the pieces whose concatenation it is, made with the event loop served between chunks of
    its long lists: a listing of 10k services x 10 real servers is a 27 MB frame that took 0.24 s to pack in one
    piece, every other client (and the slow path) waiting; 500 services a chunk still held it up to 47 ms. Maps
    are walked three levels deep (reply, data, its fields). With consume (the caller's own reply, read by nothing
    else) each packed chunk's items are dropped from their list as it goes: freeing 110k dicts at the end took
    another 0.2 s in one piece. The pieces are written as they are (the control server's _send): joining them
    into one frame copied 27 MB twice more and wrote it in one call, 20-50 ms of the loop."""
    import asyncio

    pk = msgpack.Packer(use_bin_type=True)
    parts: list[bytes] = []

    async def put(v, depth: int) -> None:
        if type(v) is dict and depth < 3:
            parts.append(pk.pack_map_header(len(v)))
            for k, x in v.items():
                parts.append(pk.pack(k))
                await put(x, depth + 1)
        elif type(v) is list and len(v) > chunk:
            parts.append(pk.pack_array_header(len(v)))
            for i in range(0, len(v), chunk):
                if i:
                    await asyncio.sleep(0)
                part = v[i:i + chunk]
                parts.append(b"".join(map(pk.pack, part)))
                if consume:
                    v[i:i + chunk] = [None] * len(part)
                part = None
        else:
            parts.append(pk.pack(v))

    await put(msg, 0)
    n = sum(map(len, parts))
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    parts.insert(0, _HDR.pack(n))
    return parts


def frame_length(header: bytes) -> int:
    (n,) = _HDR.unpack(header)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return n


HEADER_SIZE = _HDR.size


# Bytes per map or array a frame must carry on average: a frame of empty maps (1 byte each, 72 once decoded) would
# turn 64 MiB into 4.6 GiB of daemon memory. Real frames spend 30 (a 100k-op batch), and even a batch of ops
# without arguments ([["dest.del", {}], ...]) more than 5.
MIN_BYTES_PER_CONTAINER = 4


def decode_body(body: bytes) -> dict:
    budget = [max(4096, len(body) // MIN_BYTES_PER_CONTAINER)]

    def count(obj):
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooMany
        return obj

    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False, list_hook=count, object_hook=count)
    except _TooMany:
        raise ProtocolError(f"frame of {len(body)} bytes holds more than one map or array per "
                            f"{MIN_BYTES_PER_CONTAINER} bytes") from None
    except msgpack.StackError:
        raise ProtocolError("undecodable frame: nested too deeply") from None
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable frame: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("frame is not a map")
    return msg


def request(req_id: int, op: str, args: dict | None = None) -> dict:
    return {"v": VERSION, "id": req_id, "op": op, "args": args or {}}


def validate_request(msg: dict) -> tuple[int, str, dict]:
    if msg.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {msg.get('v')!r} (this daemon speaks {VERSION})")
    req_id, op, args = msg.get("id"), msg.get("op"), msg.get("args", {})
    if not isinstance(req_id, int):
        raise ProtocolError("request id missing or not an integer")
    if not isinstance(op, str) or not op:
        raise ProtocolError("op missing")
    if not isinstance(args, dict):
        raise ProtocolError("args must be a map")
    return req_id, op, args


def reply_ok(req_id: int, data=None) -> dict:
    return {"v": VERSION, "id": req_id, "ok": True, "data": data}


def reply_err(req_id: int, err: int, message: str, index: int | None = None) -> dict:
    """index: for a refused batch, the position of the op refused (nothing of the batch was applied)."""
    rep = {"v": VERSION, "id": req_id, "ok": False, "errno": int(err), "error": str(message)}
    if index is not None:
        rep["index"] = int(index)
    return rep
