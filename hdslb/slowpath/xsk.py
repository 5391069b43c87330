"""AF_XDP sockets in pure Python (ctypes + mmap, no C extension): the slow path's packet I/O with the XDP program.

Public API
    Umem(frame_count=4096, frame_size=2048)    packet memory shared with the kernel (one anonymous mmap)
    XskSocket(ifindex_or_name, queue_id=0, umem=None, rx_size=2048, tx_size=2048, fill_size=4096,
              comp_size=2048, need_wakeup=True, copy_mode=True, tx_frames=None, netns=None, bind_timeout=1.0)
      .fd                        put it in the program's XSKMAP at key queue_id (the caller does)
      .ifindex .queue_id .umem .zerocopy .bind_retries .closed
      .recv_batch(max_n=256)     -> list[bytes]: whole Ethernet frames, copied out of the UMEM
      .send_batch(frames)        -> int: frames accepted (the others are counted: tx_no_frame, tx_bad_len)
      .flush()                   -> int: kick descriptors the kernel has not taken yet, reap; returns those left
      .stats()                   -> dict: kernel XDP_STATISTICS + our counters + frame accounting
      .audit()                   -> dict: accounting after checking every frame's owner; raises on inconsistency
      .attach_loop(loop, on_frames, batch=256) / .detach_loop()   asyncio: add_reader, no busy loop
      .close()                   idempotent; XskSocket is also a context manager
    XskRings(umem_buf, frame_size, rx, tx, fill, comp, ...)   the ring and frame accounting on its own, over
                                 any buffers (what XskSocket drives; unit tests drive it with a fake kernel)
    AddrRing / DescRing / RingOffsets                           one ring of 8-byte addrs / 16-byte xdp_descs
    call_in_netns(netns, fn)     fn() on a thread inside a named network namespace (what netns= uses)

An XSK can only bind to an interface of the network namespace its socket was created in: netns="name" (from
/run/netns) creates it there from a helper thread, the rest of the process stays where it is.

Frame ownership (exact, checked by audit()):
  * At open the UMEM is split once. rx_pool = min(fill_size, frame_count - tx_frames) frames belong to
    receive and live in the kernel (fill ring → kernel → rx ring). recv_batch copies each packet out and posts
    the same frame straight back to the fill ring, so receive never waits for transmit and the fill ring is
    refilled on every batch. tx_pool = frame_count - rx_pool frames belong to transmit: each is in our free
    list or in flight (tx ring → kernel → completion ring). send_batch reaps the completion ring before it
    takes frames, and between kicks.
  * rx_pool + tx_free + tx_inflight == frame_count at every return to the caller.
  * A descriptor we cannot trust is counted and dropped: rx_bad (address outside the UMEM or not a frame lent
    to the kernel for receive, duplicate in one batch, length 0 or past its frame: a frame of ours is
    recycled to the fill ring), comp_bad (completion of a frame not in flight: ignored, never freed twice).
  * tx_frames (the least tx_pool may be) defaults to frame_count // 4: the slow path receives far more than
    it sends. Frames the fill ring cannot hold go to tx_pool as well.

Kernel facts this relies on (ENV-NOTES, kernel 6.18):
  * veth has copy mode only; XDP_USE_NEED_WAKEUP works. In copy mode the kernel sends only from sendmsg(),
    at most 32 descriptors per call (then EAGAIN): flush() kicks until the tx consumer index catches up.
  * A received frame starts XDP_PACKET_HEADROOM (256) bytes into its UMEM frame, so the largest frame
    received is frame_size - 256 (1792 bytes with 2048-byte frames); transmit may use the whole frame.
  * Right after close() the queue stays busy for 50–80 ms: bind() retries EBUSY for bind_timeout seconds.
  * Close order: memoryviews → ring mmaps → socket (a live ring mmap keeps the socket and the queue bound).
  * Ring indices are free-running u32s read and written through memoryviews of the mmaps. Each write is one
    aligned 4-byte store and descriptors are written before the producer index, which is what x86 (TSO)
    needs; a weakly ordered CPU would need barriers that pure Python cannot issue.
  * Not thread-safe: one thread (the event loop's) drives a socket.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import socket
import struct
import threading
import time
from array import array
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

log = logging.getLogger("hdslb.slowpath.xsk")

AF_XDP = 44
SOL_XDP = 283

# setsockopt/getsockopt(SOL_XDP, ...) option names (linux/if_xdp.h)
XDP_MMAP_OFFSETS = 1
XDP_RX_RING = 2
XDP_TX_RING = 3
XDP_UMEM_REG = 4
XDP_UMEM_FILL_RING = 5
XDP_UMEM_COMPLETION_RING = 6
XDP_STATISTICS = 7
XDP_OPTIONS = 8

# sockaddr_xdp.sxdp_flags
XDP_SHARED_UMEM = 1 << 0
XDP_COPY = 1 << 1
XDP_ZEROCOPY = 1 << 2
XDP_USE_NEED_WAKEUP = 1 << 3

XDP_RING_NEED_WAKEUP = 1 << 0  # ring flags word: the kernel only moves this ring when we make a syscall
XDP_OPTIONS_ZEROCOPY = 1 << 0

# mmap page offsets selecting which ring of the socket to map
XDP_PGOFF_RX_RING = 0
XDP_PGOFF_TX_RING = 0x80000000
XDP_UMEM_PGOFF_FILL_RING = 0x100000000
XDP_UMEM_PGOFF_COMPLETION_RING = 0x180000000

XDP_PACKET_HEADROOM = 256  # bytes the kernel leaves in front of a received frame

# struct xdp_statistics, in order (u64 each)
KERNEL_STATS = ("rx_dropped", "rx_invalid_descs", "tx_invalid_descs", "rx_ring_full",
                "rx_fill_ring_empty_descs", "tx_ring_empty_descs")
# our own counters: rx_frames handed to the caller; rx_bad descriptors dropped as untrustworthy; tx_frames
# posted to the tx ring; tx_completed returned by the completion ring; tx_no_frame refused for lack of a free
# frame or tx slot; tx_bad_len refused as empty or longer than a frame; comp_bad completions of frames not in
# flight; tx_kicks sendmsg() calls; tx_kick_errors kicks failing with more than "busy, again" (last_kick_errno)
COUNTERS = ("rx_frames", "rx_bad", "tx_frames", "tx_completed", "tx_no_frame", "tx_bad_len", "comp_bad",
            "tx_kicks", "tx_kick_errors")

_XDP_UMEM_REG = struct.Struct("=QQIIII")  # addr, len, chunk_size, headroom, flags, tx_metadata_len
_SOCKADDR_XDP = struct.Struct("=HHIII")  # family, flags, ifindex, queue_id, shared_umem_fd
_MMAP_OFFSETS = struct.Struct("=16Q")  # rx, tx, fill, completion × (producer, consumer, desc, flags)
_M32 = 0xFFFFFFFF
# kick results that mean "sent some or busy, call again": EAGAIN after each 32-descriptor batch or when the
# completion ring is full; EBUSY when the driver dropped one frame (its descriptor is consumed and completed)
_KICK_AGAIN = frozenset((0, errno.EAGAIN, errno.EBUSY))

# owner of each UMEM frame, one byte per frame (XskRings._owner)
_FREE, _RX, _TX, _HELD = 0, 1, 2, 3

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass(frozen=True)
class RingOffsets:
    """Byte offsets inside one ring's mmap, as XDP_MMAP_OFFSETS reports them."""

    producer: int
    consumer: int
    desc: int
    flags: int


def parse_mmap_offsets(raw: bytes) -> dict[str, RingOffsets]:
    """struct xdp_mmap_offsets → {'rx', 'tx', 'fill', 'comp'}; needs the 128-byte layout with ring flags (≥ 5.4)."""
    if len(raw) < _MMAP_OFFSETS.size:
        raise OSError(errno.EINVAL, f"XDP_MMAP_OFFSETS returned {len(raw)} bytes: kernel without need_wakeup flags")
    v = _MMAP_OFFSETS.unpack_from(raw)
    return {name: RingOffsets(*v[4 * i:4 * i + 4]) for i, name in enumerate(("rx", "tx", "fill", "comp"))}


def _pow2(name: str, n: int) -> int:
    if n <= 0 or n & (n - 1):
        raise ValueError(f"{name} must be a power of two, got {n}")
    return n


class _Ring:
    """One single-producer, single-consumer ring: u32 producer, u32 consumer, u32 flags, then `size` entries.

    The side we play keeps its own index in `prod` or `cons` (we are its only writer) and reads the other
    side's index from shared memory each time it needs it.
    """

    entry = 0  # bytes per entry

    def __init__(self, buf, off: RingOffsets, size: int):
        self.size = _pow2("ring size", size)
        self.mask = size - 1
        if off.producer % 4 or off.consumer % 4 or off.flags % 4 or off.desc % 8:
            raise ValueError(f"misaligned ring offsets {off}")
        end = off.desc + size * self.entry
        base = memoryview(buf)
        if base.nbytes < end:
            base.release()
            raise ValueError(f"ring buffer of {base.nbytes} bytes, need {end}")
        flat = base.cast("B")
        raw = flat[:end]
        self._views = [base, flat, raw]
        self._u32 = self._view(raw.cast("I"))
        self._u64 = self._view(raw.cast("Q"))
        self._pi, self._ci, self._fi = off.producer // 4, off.consumer // 4, off.flags // 4
        self._d4, self._d8 = off.desc // 4, off.desc // 8
        self.prod = self._u32[self._pi]
        self.cons = self._u32[self._ci]

    def _view(self, v: memoryview) -> memoryview:
        self._views.append(v)
        return v

    def release(self) -> None:
        """Drop every view of the buffer (the mmap cannot be closed while one exists)."""
        for v in reversed(self._views):
            v.release()
        self._views.clear()

    def _spans(self, start: int, n: int) -> list[tuple[int, int]]:
        """Slot ranges (first slot, count) holding n entries from free-running index start, split at the wrap."""
        s = start & self.mask
        if s + n <= self.size:
            return [(s, n)]
        k = self.size - s
        return [(s, k), (0, n - k)]

    # --- producer side (fill, tx)
    def free_slots(self) -> int:
        return self.size - ((self.prod - self._u32[self._ci]) & _M32)

    def unconsumed(self) -> int:
        """Entries we produced that the kernel has not consumed yet."""
        return (self.prod - self._u32[self._ci]) & _M32

    def peer_consumer(self) -> int:
        return self._u32[self._ci]

    def _publish(self, n: int) -> None:
        self.prod = (self.prod + n) & _M32
        self._u32[self._pi] = self.prod  # after the entries: the kernel may read them from now on

    # --- consumer side (rx, completion)
    def available(self) -> int:
        # min(): a producer index more than `size` ahead is corrupt; never read slots twice in one batch
        return min((self._u32[self._pi] - self.cons) & _M32, self.size)

    def _release(self, n: int) -> None:
        self.cons = (self.cons + n) & _M32
        self._u32[self._ci] = self.cons  # after reading the entries: the kernel may overwrite them now

    def needs_wakeup(self) -> bool:
        return bool(self._u32[self._fi] & XDP_RING_NEED_WAKEUP)


class AddrRing(_Ring):
    """A ring of u64 UMEM addresses: the fill ring (we produce) or the completion ring (we consume)."""

    entry = 8

    def produce(self, addrs: Sequence[int]) -> None:
        """Write addrs and publish them; the caller has checked free_slots()."""
        n = len(addrs)
        if not n:
            return
        q, d, i = self._u64, self._d8, 0
        for s, k in self._spans(self.prod, n):
            q[d + s:d + s + k] = array("Q", addrs[i:i + k])
            i += k
        self._publish(n)

    def consume(self, max_n: int) -> list[int]:
        """Read up to max_n addresses and give their slots back to the kernel."""
        n = min(max_n, self.available())
        if n <= 0:
            return []
        q, d = self._u64, self._d8
        out: list[int] = []
        for s, k in self._spans(self.cons, n):
            out += q[d + s:d + s + k].tolist()
        self._release(n)
        return out


class DescRing(_Ring):
    """A ring of struct xdp_desc {u64 addr; u32 len; u32 options}: rx (we consume) or tx (we produce)."""

    entry = 16

    def produce(self, addrs: Sequence[int], lens: Sequence[int]) -> None:
        """Write descriptors (options stay 0: the kernel zeroes the ring and never writes tx options)."""
        n = len(addrs)
        if not n:
            return
        q, u, d8, d4, i = self._u64, self._u32, self._d8, self._d4, 0
        for s, k in self._spans(self.prod, n):
            q[d8 + 2 * s:d8 + 2 * (s + k):2] = array("Q", addrs[i:i + k])
            u[d4 + 4 * s + 2:d4 + 4 * (s + k):4] = array("I", lens[i:i + k])
            i += k
        self._publish(n)

    def consume(self, max_n: int) -> tuple[list[int], list[int]]:
        """Read up to max_n descriptors as (addrs, lens) and give their slots back to the kernel.

        Releasing at once is safe: the slot only held the descriptor; the frame it names stays ours until
        we post it to the fill ring again.
        """
        n = min(max_n, self.available())
        if n <= 0:
            return [], []
        q, u, d8, d4 = self._u64, self._u32, self._d8, self._d4
        addrs: list[int] = []
        lens: list[int] = []
        for s, k in self._spans(self.cons, n):
            addrs += q[d8 + 2 * s:d8 + 2 * (s + k):2].tolist()
            lens += u[d4 + 4 * s + 2:d4 + 4 * (s + k):4].tolist()
        self._release(n)
        return addrs, lens


class XskRings:
    """Frame accounting and batching over the four rings of one socket and its UMEM; no syscalls of its own.

    kick_tx() is called to make the kernel send (returns 0 or an errno); wake_rx() when the fill ring asks
    for a wakeup. XskSocket passes syscalls; unit tests pass a fake kernel working on plain bytearrays.
    """

    def __init__(self, umem_buf, frame_size: int, rx: DescRing, tx: DescRing, fill: AddrRing, comp: AddrRing, *,
                 tx_frames: int | None = None, need_wakeup: bool = True,
                 kick_tx: Callable[[], int] = lambda: 0, wake_rx: Callable[[], None] = lambda: None):
        self._umem = umem_buf
        self.frame_size = _pow2("frame_size", frame_size)
        self.frame_count = len(umem_buf) // frame_size
        self._shift = frame_size.bit_length() - 1
        if tx_frames is None:
            tx_frames = max(1, self.frame_count // 4)
        self.rx_pool = min(fill.size, self.frame_count - tx_frames)
        self.tx_pool = self.frame_count - self.rx_pool
        if self.rx_pool < 1 or tx_frames < 1:
            raise ValueError(f"{self.frame_count} frames cannot hold {tx_frames} tx frames and any rx frame")
        self._rx, self._tx, self._fill, self._comp = rx, tx, fill, comp
        self._need_wakeup = need_wakeup
        self._kick_tx, self._wake_rx = kick_tx, wake_rx
        for name in COUNTERS:
            setattr(self, name, 0)
        self.last_kick_errno = 0
        self._tx_inflight = 0
        self._owner = bytearray(self.frame_count)  # _FREE / _RX / _TX / _HELD per frame
        rx_addrs = [i << self._shift for i in range(self.rx_pool)]
        self._owner[:self.rx_pool] = bytes([_RX]) * self.rx_pool
        # LIFO: the frame freed last is reused first while it is still in cache
        self._free = [i << self._shift for i in range(self.frame_count - 1, self.rx_pool - 1, -1)]
        if fill.free_slots() < len(rx_addrs):
            raise ValueError("fill ring already holds entries")
        fill.produce(rx_addrs)

    # ------------------------------------------------------------------ receive
    def recv_batch(self, max_n: int = 256) -> list[bytes]:
        """Up to max_n received frames, copied out; their UMEM frames go back to the fill ring before return."""
        addrs, lens = self._rx.consume(max_n)
        if not addrs:
            return []
        umem, owner, shift, fs, count = self._umem, self._owner, self._shift, self.frame_size, self.frame_count
        out: list[bytes] = []
        back: list[int] = []
        for a, n in zip(addrs, lens):
            i = a >> shift
            if i >= count or owner[i] != _RX:
                # not a frame lent to the kernel for receive (or seen twice in this batch): recycling it
                # could post one frame twice, so drop the descriptor and keep the frame where it is
                self.rx_bad += 1
                continue
            owner[i] = _HELD
            base = i << shift
            back.append(base)
            if n == 0 or a - base + n > fs:
                self.rx_bad += 1  # length runs past the frame: drop the packet, recycle the frame
                continue
            out.append(umem[a:a + n])
        for base in back:
            owner[base >> shift] = _RX
        # cannot overflow: the fill ring holds rx_pool ≤ fill.size entries and these frames are not in it
        self._fill.produce(back)
        if self._need_wakeup and self._fill.needs_wakeup():
            self._wake_rx()
        self.rx_frames += len(out)
        return out

    # ------------------------------------------------------------------ transmit
    def reap(self) -> int:
        """Move completed tx frames back to the free list; returns how many."""
        addrs = self._comp.consume(self._comp.size)
        if not addrs:
            return 0
        owner, shift, count, free = self._owner, self._shift, self.frame_count, self._free
        done = 0
        for a in addrs:
            i = a >> shift
            if i < count and owner[i] == _TX and a & (self.frame_size - 1) == 0:
                owner[i] = _FREE
                free.append(a)
                done += 1
            else:
                self.comp_bad += 1  # never free a frame that is not in flight: it would be handed out twice
        self._tx_inflight -= done
        self.tx_completed += done
        return done

    def send_batch(self, frames: Iterable[bytes]) -> int:
        """Queue whole Ethernet frames for transmission and kick the kernel; returns how many were accepted.

        A frame is refused (and counted) when it is empty or longer than a UMEM frame (tx_bad_len), or when
        no tx frame is free even after kicking and reaping (tx_no_frame).
        """
        umem, owner, shift, fs, free, tx = self._umem, self._owner, self._shift, self.frame_size, self._free, self._tx
        self.reap()
        accepted = 0
        it = iter(frames)
        pending = None  # a frame taken from `it` that found no room in the previous round
        while True:
            room = min(len(free), tx.free_slots())
            if room == 0:
                self.flush()
                room = min(len(free), tx.free_slots())
                if room == 0:
                    break
            addrs: list[int] = []
            lens: list[int] = []
            while len(addrs) < room:
                f = pending if pending is not None else next(it, None)
                pending = None
                if f is None:
                    break
                n = len(f)
                if n == 0 or n > fs:
                    self.tx_bad_len += 1
                    continue
                a = free.pop()
                umem[a:a + n] = f
                owner[a >> shift] = _TX
                addrs.append(a)
                lens.append(n)
            if not addrs:
                break
            tx.produce(addrs, lens)
            self._tx_inflight += len(addrs)
            self.tx_frames += len(addrs)
            accepted += len(addrs)
            self.flush()
            pending = next(it, None)
            if pending is None:
                break
        # whatever is left found no frame: count it, never block the caller
        for f in ([pending] if pending is not None else []) + list(it):
            if len(f) == 0 or len(f) > fs:
                self.tx_bad_len += 1
            else:
                self.tx_no_frame += 1
        return accepted

    def flush(self) -> int:
        """Kick until the kernel has taken every posted descriptor (≤ 32 per kick), reaping as it goes.

        Stops early when kicks make no progress (device queue busy, link down); returns the descriptors still
        in the tx ring, which the next flush() or send_batch() kicks again.
        """
        tx = self._tx
        stalls = 0
        while tx.unconsumed():
            if self._need_wakeup and not tx.needs_wakeup():
                break  # the driver polls the ring itself (zero-copy with need_wakeup): no syscall needed
            before = tx.peer_consumer()
            err = self._kick_tx()
            self.tx_kicks += 1
            if err not in _KICK_AGAIN:
                self.tx_kick_errors += 1
                self.last_kick_errno = err
                break
            # a full completion ring stops the kernel (it reserves a completion slot per frame it sends)
            self.reap()
            if tx.peer_consumer() == before:
                stalls += 1
                if stalls >= 3:
                    break
            else:
                stalls = 0
        self.reap()
        return tx.unconsumed()

    def tx_unsent(self) -> int:
        """Descriptors posted to the tx ring that the kernel has not consumed."""
        return self._tx.unconsumed()

    # ------------------------------------------------------------------ accounting
    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}

    def accounting(self) -> dict[str, int]:
        return {"frame_count": self.frame_count, "rx_pool": self.rx_pool, "tx_pool": self.tx_pool,
                "tx_free": len(self._free), "tx_inflight": self._tx_inflight}

    def audit(self) -> dict[str, int]:
        """accounting() after checking it against every frame's owner byte and the ring occupancies."""
        acc = self.accounting()
        owner, shift = self._owner, self._shift
        problems = []
        if owner.count(_RX) != self.rx_pool:
            problems.append(f"{owner.count(_RX)} frames owned by rx, expected {self.rx_pool}")
        if owner.count(_HELD):
            problems.append(f"{owner.count(_HELD)} rx frames held outside a batch")
        if owner.count(_TX) != self._tx_inflight:
            problems.append(f"{owner.count(_TX)} frames owned by tx, counted {self._tx_inflight} in flight")
        if len(set(self._free)) != len(self._free):
            problems.append("a frame is twice in the free list")
        if owner.count(_FREE) != len(self._free) or any(owner[a >> shift] != _FREE for a in self._free):
            problems.append("free list and owner bytes disagree")
        if len(self._free) + self._tx_inflight != self.tx_pool:
            problems.append(f"tx_free {len(self._free)} + tx_inflight {self._tx_inflight} != tx_pool {self.tx_pool}")
        if self._fill.unconsumed() + self._rx.available() > self.rx_pool:
            problems.append("fill + rx rings hold more frames than the rx pool")
        if self._tx.unconsumed() > self._tx_inflight:
            problems.append("tx ring holds more descriptors than frames in flight")
        if problems:
            raise RuntimeError("XSK frame accounting broken: " + "; ".join(problems))
        return acc

    def release(self) -> None:
        """Drop the ring views (before the ring mmaps are closed)."""
        for r in (self._rx, self._tx, self._fill, self._comp):
            r.release()


class Umem:
    """Packet memory shared with the kernel: frame_count frames of frame_size bytes in one page-aligned mmap.

    One socket at a time may use it (no XDP_SHARED_UMEM). A Umem the caller made is closed by the caller,
    after the socket; one made by XskSocket is closed with it.
    """

    def __init__(self, frame_count: int = 4096, frame_size: int = 2048):
        # aligned mode: power-of-two chunks of 2 KiB up to a page, so a frame never straddles two pages
        if _pow2("frame_size", frame_size) < 2048 or frame_size > mmap.PAGESIZE:
            raise ValueError(f"frame_size must be 2048..{mmap.PAGESIZE}, got {frame_size}")
        if frame_count < 2:
            raise ValueError(f"frame_count must be at least 2, got {frame_count}")
        self.frame_count = frame_count
        self.frame_size = frame_size
        self.size = frame_count * frame_size
        self.buf = mmap.mmap(-1, self.size)
        anchor = ctypes.c_char.from_buffer(self.buf)  # an export of the mmap: drop it at once so close() works
        self.address = ctypes.addressof(anchor)
        del anchor
        self.in_use = False

    def close(self) -> None:
        if not self.buf.closed:
            self.buf.close()


def _ifindex(ifindex_or_name: int | str) -> int:
    if isinstance(ifindex_or_name, int):
        return ifindex_or_name
    try:
        return socket.if_nametoindex(ifindex_or_name)
    except OSError:
        raise OSError(errno.ENODEV, f"no interface {ifindex_or_name!r} in this network namespace") from None


def call_in_netns(netns: str | None, fn: Callable):
    """fn() run on a helper thread that entered network namespace `netns` (a name in /run/netns or a path).

    Sockets keep the namespace they were created in and interface names resolve in the caller's namespace,
    so creating an XSK for a namespace's interface must happen in it; setns only moves the calling thread,
    and this process's other threads never leave their namespace. netns None calls fn() here.
    """
    if netns is None:
        return fn()
    path = netns if "/" in netns else os.path.join("/run/netns", netns)
    box: dict = {}

    def work():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=work, name=f"netns-{os.path.basename(path)}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _bind_hint(err: int) -> str:
    return {
        errno.EBUSY: " (another XSK or a zero-copy user owns this queue)",
        errno.EINVAL: " (queue_id beyond the device's queues, or bad flags)",
        errno.EOPNOTSUPP: " (zero-copy not supported here: use copy_mode=True)",
        errno.ENODEV: " (no such ifindex in the socket's network namespace)",
    }.get(err, "")


class XskSocket:
    """An AF_XDP socket bound to one queue of one interface, with its own UMEM and four mmap'd rings."""

    def __init__(self, ifindex_or_name: int | str, queue_id: int = 0, umem: Umem | None = None,
                 rx_size: int = 2048, tx_size: int = 2048, fill_size: int = 4096, comp_size: int = 2048,
                 need_wakeup: bool = True, copy_mode: bool = True, tx_frames: int | None = None,
                 netns: str | None = None, bind_timeout: float = 1.0):
        # everything close() looks at exists before the first thing that can fail
        self._closed = False
        self._sock: socket.socket | None = None
        self._maps: list[mmap.mmap] = []
        self._ring_views: list[_Ring] = []  # every ring made, even if setup fails before XskRings exists
        self._rings: XskRings | None = None
        self._loop = None
        self._on_frames = None
        self._batch = 256
        self._retry_handle = None
        self._retry_delay = 0.0
        self._own_umem = umem is None
        self.umem = umem if umem is not None else Umem()
        if self.umem.in_use:
            if self._own_umem:
                self.umem.close()
            raise ValueError("this Umem is already used by another XskSocket (shared UMEM is not supported)")
        self.umem.in_use = True
        self.queue_id = queue_id
        self.zerocopy = False
        self.bind_retries = 0  # EBUSY retries the last bind needed (the queue's previous socket lingering)
        try:
            def make():
                idx = _ifindex(ifindex_or_name)
                return idx, socket.socket(AF_XDP, socket.SOCK_RAW, 0)

            self.ifindex, self._sock = call_in_netns(netns, make)
            self.fd = self._sock.fileno()
            self._setup(rx_size, tx_size, fill_size, comp_size, need_wakeup, copy_mode, tx_frames, bind_timeout)
        except BaseException:
            self.close()
            raise

    def _setup(self, rx_size, tx_size, fill_size, comp_size, need_wakeup, copy_mode, tx_frames, bind_timeout):
        s, u = self._sock, self.umem
        s.setsockopt(SOL_XDP, XDP_UMEM_REG, _XDP_UMEM_REG.pack(u.address, u.size, u.frame_size, 0, 0, 0))
        for opt, name, n in ((XDP_UMEM_FILL_RING, "fill_size", fill_size),
                             (XDP_UMEM_COMPLETION_RING, "comp_size", comp_size),
                             (XDP_RX_RING, "rx_size", rx_size), (XDP_TX_RING, "tx_size", tx_size)):
            s.setsockopt(SOL_XDP, opt, _pow2(name, n))
        off = parse_mmap_offsets(s.getsockopt(SOL_XDP, XDP_MMAP_OFFSETS, _MMAP_OFFSETS.size))
        rx = self._ring(DescRing, XDP_PGOFF_RX_RING, off["rx"], rx_size)
        tx = self._ring(DescRing, XDP_PGOFF_TX_RING, off["tx"], tx_size)
        fill = self._ring(AddrRing, XDP_UMEM_PGOFF_FILL_RING, off["fill"], fill_size)
        comp = self._ring(AddrRing, XDP_UMEM_PGOFF_COMPLETION_RING, off["comp"], comp_size)
        # the fill ring is stocked before bind, so the first packet already finds a frame
        self._rings = XskRings(u.buf, u.frame_size, rx, tx, fill, comp, tx_frames=tx_frames,
                               need_wakeup=need_wakeup, kick_tx=self._kick, wake_rx=self._wake)
        flags = (XDP_COPY if copy_mode else 0) | (XDP_USE_NEED_WAKEUP if need_wakeup else 0)
        self._bind(flags, bind_timeout)
        s.setblocking(False)
        opts = s.getsockopt(SOL_XDP, XDP_OPTIONS, 4)
        self.zerocopy = bool(struct.unpack("=I", opts[:4])[0] & XDP_OPTIONS_ZEROCOPY)

    def _ring(self, kind: type, pgoff: int, off: RingOffsets, size: int):
        m = mmap.mmap(self.fd, off.desc + size * kind.entry, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                      mmap.PROT_READ | mmap.PROT_WRITE, offset=pgoff)
        self._maps.append(m)
        ring = kind(m, off, size)
        self._ring_views.append(ring)
        return ring

    def _bind(self, flags: int, timeout: float) -> None:
        addr = ctypes.create_string_buffer(_SOCKADDR_XDP.pack(AF_XDP, flags, self.ifindex, self.queue_id, 0),
                                           _SOCKADDR_XDP.size)
        deadline = time.monotonic() + timeout
        while True:
            if _libc.bind(self.fd, addr, _SOCKADDR_XDP.size) == 0:
                return
            err = ctypes.get_errno()
            # a queue stays busy ~50 ms after its previous socket closed (deferred release in the kernel)
            if err == errno.EBUSY and time.monotonic() < deadline:
                self.bind_retries += 1
                time.sleep(0.01)
                continue
            raise OSError(err, f"bind AF_XDP ifindex {self.ifindex} queue {self.queue_id}: "
                               f"{os.strerror(err)}{_bind_hint(err)}")

    def _kick(self) -> int:
        try:
            self._sock.send(b"", socket.MSG_DONTWAIT)  # without MSG_DONTWAIT copy mode says EOPNOTSUPP
        except OSError as e:
            return e.errno or errno.EIO
        return 0

    def _wake(self) -> None:
        try:
            self._sock.recv(0, socket.MSG_DONTWAIT)
        except OSError:
            pass  # a wakeup is a hint; the next batch asks again

    # ------------------------------------------------------------------ data path
    def _live(self) -> XskRings:
        if self._closed:
            raise ValueError("I/O on a closed XskSocket")
        return self._rings

    def recv_batch(self, max_n: int = 256) -> list[bytes]:
        """Up to max_n received Ethernet frames (bytes); never blocks, [] when the rx ring is empty."""
        return self._live().recv_batch(max_n)

    def send_batch(self, frames: Iterable[bytes]) -> int:
        """Transmit whole Ethernet frames out of the bound queue; returns how many were accepted."""
        n = self._live().send_batch(frames)
        self._retry_later()
        return n

    def flush(self) -> int:
        """Kick descriptors the kernel has not taken and reap completions; returns descriptors still unsent."""
        return self._live().flush()

    def stats(self) -> dict[str, int]:
        rings = self._live()
        raw = self._sock.getsockopt(SOL_XDP, XDP_STATISTICS, 8 * len(KERNEL_STATS))
        kernel = dict(zip(KERNEL_STATS, struct.unpack_from(f"={len(KERNEL_STATS)}Q", raw)))
        return {**kernel, **rings.counters(), **rings.accounting(), "tx_unsent": rings.tx_unsent(),
                "last_kick_errno": rings.last_kick_errno}

    def audit(self) -> dict[str, int]:
        return self._live().audit()

    # ------------------------------------------------------------------ asyncio
    def attach_loop(self, loop, on_frames: Callable[[list[bytes]], object], batch: int = 256) -> None:
        """Call on_frames(list_of_frames) from `loop` whenever frames arrive, batch frames at most per call.

        The socket's fd is readable while its rx ring is non-empty and the kernel wakes it on every rx flush,
        so add_reader costs nothing while idle; a long burst is drained one batch per loop iteration so
        other callbacks keep running. Exceptions from on_frames go to the loop's exception handler.
        """
        self._live()
        if self._loop is not None:
            raise RuntimeError("XskSocket is already attached to an event loop")
        self._loop, self._on_frames, self._batch = loop, on_frames, batch
        loop.add_reader(self.fd, self._on_readable)

    def detach_loop(self) -> None:
        if self._loop is None:
            return
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        self._loop.remove_reader(self.fd)
        self._loop = self._on_frames = None

    def _on_readable(self) -> None:
        frames = self._rings.recv_batch(self._batch)
        if frames:
            self._on_frames(frames)

    def _retry_later(self) -> None:
        """With a loop attached, keep kicking unsent tx descriptors (backing off to 100 ms) until they go."""
        if self._loop is None or self._retry_handle is not None or self._closed:
            return
        if not self._rings.tx_unsent():
            self._retry_delay = 0.0
            return
        self._retry_delay = min(max(self._retry_delay * 2, 0.001), 0.1)
        self._retry_handle = self._loop.call_later(self._retry_delay, self._retry)

    def _retry(self) -> None:
        self._retry_handle = None
        if not self._closed:
            self._rings.flush()
            self._retry_later()

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Unbind and free everything; idempotent. Order: views, ring mmaps, socket, then an owned UMEM."""
        if self._closed:
            return
        self._closed = True
        try:
            self.detach_loop()
        except Exception:  # a closed loop must not stop the kernel objects from being freed
            log.debug("detach_loop during close", exc_info=True)
        for ring in self._ring_views:
            ring.release()
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view we do not know of: the socket then stays bound until it is freed
                log.warning("XSK ring mmap still exported at close", exc_info=True)
        self._maps.clear()
        if self._sock is not None:
            self._sock.close()
        self.umem.in_use = False
        if self._own_umem:
            self.umem.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> XskSocket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.fd}"
        return f"<XskSocket ifindex={getattr(self, 'ifindex', '?')} queue={self.queue_id} {state}>"
