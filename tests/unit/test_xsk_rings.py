"""XSK ring and frame accounting without a kernel: XskRings driven by a fake kernel over plain memory."""

import errno
import mmap

import pytest

from hdslb.slowpath.xsk import (AddrRing, DescRing, RingOffsets, Umem, XDP_PACKET_HEADROOM, XskRings,
                                parse_mmap_offsets)

# the layout kernel 6.18 reports for every ring (producer and consumer on separate cache lines)
OFF = RingOffsets(producer=0, consumer=128, desc=320, flags=196)
M32 = 0xFFFFFFFF
NEAR_WRAP = M32 - 6  # start every index a few entries before the u32 wrap


class KRing:
    """The kernel's side of one ring: it reads our producer (or consumer) and writes its own."""

    def __init__(self, size, entry, start):
        self.size, self.entry = size, entry
        self.buf = bytearray(OFF.desc + size * entry)
        self.u32 = memoryview(self.buf).cast("I")
        self.u64 = memoryview(self.buf).cast("Q")
        self.u32[OFF.producer // 4] = start
        self.u32[OFF.consumer // 4] = start

    prod = property(lambda s: s.u32[OFF.producer // 4])
    cons = property(lambda s: s.u32[OFF.consumer // 4])

    def set_prod(self, v):
        self.u32[OFF.producer // 4] = v & M32

    def set_cons(self, v):
        self.u32[OFF.consumer // 4] = v & M32

    def set_flags(self, v):
        self.u32[OFF.flags // 4] = v

    def filled(self):
        return (self.prod - self.cons) & M32

    def slot(self, idx):
        return OFF.desc + (idx & (self.size - 1)) * self.entry


class FakeKernel:
    """Copy-mode AF_XDP semantics on plain memory: fill → rx with 256 bytes headroom, tx → wire + completion,
    at most 32 descriptors per kick, EAGAIN when the completion ring is full or the batch is used up."""

    def __init__(self, frame_count=64, frame_size=2048, rx=16, tx=16, fill=32, comp=16, start=NEAR_WRAP):
        self.frame_size = frame_size
        self.umem = mmap.mmap(-1, frame_count * frame_size)
        self.rx, self.tx = KRing(rx, 16, start), KRing(tx, 16, start)
        self.fill, self.comp = KRing(fill, 8, start), KRing(comp, 8, start)
        self.tx.set_flags(1)  # copy mode always wants a kick for tx
        self.cache = []  # frames taken from the fill ring and not yet used (the kernel's pool free list)
        self.wire = []
        self.rx_ring_full = self.fill_empty = 0
        self.stalled = False  # the device refuses to send (queue busy)
        self.fail_errno = 0  # the next kick fails with this errno (link down ...)
        self.kicks = self.wakeups = 0

    def rings(self, **kw):
        return XskRings(self.umem, self.frame_size,
                        DescRing(self.rx.buf, OFF, self.rx.size), DescRing(self.tx.buf, OFF, self.tx.size),
                        AddrRing(self.fill.buf, OFF, self.fill.size), AddrRing(self.comp.buf, OFF, self.comp.size),
                        kick_tx=self.kick, wake_rx=self.wake, **kw)

    def _take_fill(self):
        if self.cache:
            return self.cache.pop()
        f = self.fill
        if not f.filled():
            return None
        a = int.from_bytes(f.buf[f.slot(f.cons):f.slot(f.cons) + 8], "little")
        f.set_cons(f.cons + 1)
        return a

    def post_rx(self, addr, length):
        r = self.rx
        s = r.slot(r.prod)
        r.buf[s:s + 8] = addr.to_bytes(8, "little")
        r.buf[s + 8:s + 12] = length.to_bytes(4, "little")
        r.set_prod(r.prod + 1)

    def deliver(self, packets):
        """Receive packets as xsk_rcv does: a frame from the fill ring, copy, then an rx descriptor."""
        done = 0
        for p in packets:
            a = self._take_fill()
            if a is None:
                self.fill_empty += 1
                continue
            if self.rx.filled() == self.rx.size:
                self.rx_ring_full += 1
                self.cache.append(a)  # copy mode puts the frame back in its pool, it is not lost
                continue
            a += XDP_PACKET_HEADROOM
            self.umem[a:a + len(p)] = p
            self.post_rx(a, len(p))
            done += 1
        return done

    def complete(self, addr):
        c = self.comp
        s = c.slot(c.prod)
        c.buf[s:s + 8] = addr.to_bytes(8, "little")
        c.set_prod(c.prod + 1)

    def kick(self):
        self.kicks += 1
        if self.fail_errno:
            err, self.fail_errno = self.fail_errno, 0
            return err
        t = self.tx
        for _ in range(32):
            if not t.filled():
                return 0
            if self.stalled or self.comp.filled() == self.comp.size:
                return errno.EAGAIN
            s = t.slot(t.cons)
            a = int.from_bytes(t.buf[s:s + 8], "little")
            n = int.from_bytes(t.buf[s + 8:s + 12], "little")
            assert t.buf[s + 12:s + 16] == bytes(4), "tx options must stay 0"
            self.wire.append(bytes(self.umem[a:a + n]))
            t.set_cons(t.cons + 1)
            self.complete(a)
        return errno.EAGAIN if t.filled() else 0

    def wake(self):
        self.wakeups += 1


def frames(n, size=60, tag=0):
    return [bytes([(tag + i + k) & 0xFF for k in range(size)]) + i.to_bytes(4, "big") for i in range(n)]


def drain(r, max_n=256):
    out = []
    while True:
        got = r.recv_batch(max_n)
        if not got:
            return out
        out += got


# --- rings on their own ------------------------------------------------------------------------------------------


def test_parse_mmap_offsets():
    raw = b"".join(v.to_bytes(8, "little") for v in (0, 128, 320, 196) * 4)
    off = parse_mmap_offsets(raw)
    assert set(off) == {"rx", "tx", "fill", "comp"} and off["comp"] == OFF
    with pytest.raises(OSError):
        parse_mmap_offsets(raw[:96])  # a kernel without ring flags


@pytest.mark.parametrize("start", [0, NEAR_WRAP, M32])
def test_addr_ring_wraps_slots_and_u32_index(start):
    k = KRing(8, 8, start)
    ring = AddrRing(k.buf, OFF, 8)
    assert ring.free_slots() == 8
    for rnd in range(5):  # 5 × 5 entries: slot wrap several times, and the u32 index wraps when near it
        addrs = [rnd * 100 + i for i in range(5)]
        ring.produce(addrs)
        assert k.prod == (start + 5 * (rnd + 1)) & M32 and ring.free_slots() == 3
        got = [int.from_bytes(k.buf[k.slot(k.cons + i):k.slot(k.cons + i) + 8], "little") for i in range(5)]
        assert got == addrs
        k.set_cons(k.cons + 5)  # the kernel consumed them
    # and as a consumer (the completion ring's role)
    k2 = KRing(8, 8, start)
    cring = AddrRing(k2.buf, OFF, 8)
    for rnd in range(5):
        for i in range(6):
            s = k2.slot(k2.prod)
            k2.buf[s:s + 8] = (rnd * 10 + i).to_bytes(8, "little")
            k2.set_prod(k2.prod + 1)
        assert cring.consume(4) == [rnd * 10 + i for i in range(4)]
        assert cring.consume(100) == [rnd * 10 + 4, rnd * 10 + 5]
        assert k2.cons == k2.prod and cring.consume(1) == []


def test_desc_ring_strided_fields():
    k = KRing(4, 16, M32 - 1)
    ring = DescRing(k.buf, OFF, 4)
    ring.produce([0x1000, 0x2000, 0x3000], [60, 1514, 7])
    descs = [(int.from_bytes(k.buf[k.slot(k.cons + i):k.slot(k.cons + i) + 8], "little"),
              int.from_bytes(k.buf[k.slot(k.cons + i) + 8:k.slot(k.cons + i) + 12], "little")) for i in range(3)]
    assert descs == [(0x1000, 60), (0x2000, 1514), (0x3000, 7)]
    rx = DescRing(k.buf, OFF, 4)  # same memory read from the consumer side
    rx.cons = k.cons
    assert rx.consume(8) == ([0x1000, 0x2000, 0x3000], [60, 1514, 7])


def test_ring_rejects_bad_geometry():
    with pytest.raises(ValueError):
        AddrRing(bytearray(4096), OFF, 6)  # not a power of two
    with pytest.raises(ValueError):
        DescRing(bytearray(OFF.desc + 10 * 16), OFF, 16)  # buffer too short
    with pytest.raises(ValueError):
        AddrRing(bytearray(4096), RingOffsets(0, 128, 322, 196), 8)  # misaligned descriptors


def test_umem_validation():
    with pytest.raises(ValueError):
        Umem(16, 1000)
    with pytest.raises(ValueError):
        Umem(16, 8192)
    u = Umem(16, 2048)
    assert u.size == 32768 and u.address % mmap.PAGESIZE == 0
    u.close()
    u.close()  # idempotent


# --- frame accounting ------------------------------------------------------------------------------------------


def test_initial_split_and_fill():
    k = FakeKernel(frame_count=64, fill=32)
    r = k.rings(tx_frames=16)
    assert (r.rx_pool, r.tx_pool) == (32, 32)  # rx capped by the fill ring; the rest goes to tx
    assert k.fill.filled() == 32
    assert r.audit() == {"frame_count": 64, "rx_pool": 32, "tx_pool": 32, "tx_free": 32, "tx_inflight": 0}
    r2 = FakeKernel(frame_count=64, fill=64).rings()
    assert (r2.rx_pool, r2.tx_pool) == (48, 16)  # default: a quarter of the frames for tx
    with pytest.raises(ValueError):
        FakeKernel(frame_count=8).rings(tx_frames=8)  # nothing left for rx


def test_rx_byte_exact_and_frames_recycled_across_wrap():
    k = FakeKernel(frame_count=64, rx=16, fill=32)
    r = k.rings(tx_frames=32)
    sent = []
    for rnd in range(40):  # 40 × 12 frames: the u32 indices wrap, every rx frame is reused many times
        batch = frames(12, size=60 + rnd * 30, tag=rnd)
        assert k.deliver(batch) == 12
        sent += batch
        got = r.recv_batch(5) + r.recv_batch(100)
        assert got == batch
        assert k.fill.filled() == r.rx_pool  # every frame went straight back to the kernel
        r.audit()
    assert r.rx_frames == len(sent) and r.rx_bad == 0


def test_rx_ring_overflow_keeps_accounting():
    k = FakeKernel(frame_count=64, rx=16, fill=32)
    r = k.rings(tx_frames=32)
    burst = frames(100)
    assert k.deliver(burst) == 16
    assert k.rx_ring_full == 84 and k.fill_empty == 0
    assert drain(r, 7) == burst[:16]
    r.audit()
    after = frames(10, tag=9)
    assert k.deliver(after) == 10 and drain(r) == after  # not wedged
    r.audit()


def test_rx_malformed_descriptors():
    k = FakeKernel(frame_count=64, rx=16, fill=32)
    r = k.rings(tx_frames=32)
    good = frames(1)[0]
    # a frame the kernel really took from the fill ring, but a length past the end of its frame
    a = k._take_fill()
    k.post_rx(a + XDP_PACKET_HEADROOM, k.frame_size - XDP_PACKET_HEADROOM + 1)
    k.post_rx(1 << 40, 60)  # outside the UMEM
    k.post_rx(r.rx_pool * k.frame_size + 256, 60)  # a tx frame: never lent to the kernel for rx
    k.deliver([good])
    fill_before = k.fill.prod
    assert r.recv_batch(16) == [good]
    assert r.rx_bad == 3 and r.rx_frames == 1
    assert (k.fill.prod - fill_before) & M32 == 2  # the over-long frame and the good one were recycled
    r.audit()
    # a length of zero is malformed too, and its frame comes back
    a = k._take_fill()
    k.post_rx(a + XDP_PACKET_HEADROOM, 0)
    assert r.recv_batch(16) == [] and r.rx_bad == 4
    r.audit()


def test_rx_duplicate_in_one_batch_is_posted_once():
    k = FakeKernel(frame_count=64, rx=16, fill=32)
    r = k.rings(tx_frames=32)
    k.deliver([b"x" * 60])
    s = k.rx.slot(k.rx.prod - 1)
    k.post_rx(int.from_bytes(k.rx.buf[s:s + 8], "little"), 60)  # the same frame delivered twice
    fill_before = k.fill.prod
    assert r.recv_batch(16) == [b"x" * 60]
    assert r.rx_bad == 1 and (k.fill.prod - fill_before) & M32 == 1
    r.audit()


def test_tx_byte_exact_many_kicks_and_frame_reuse():
    k = FakeKernel(frame_count=64, tx=16, comp=16, fill=32)
    r = k.rings(tx_frames=32)
    batch = [bytes([i % 251]) * (14 + (i * 37) % 2000) for i in range(1000)]  # lengths 14..2013
    assert r.send_batch(batch) == 1000  # 32 tx frames, 16 tx slots: frames are reaped and reused on the way
    assert k.wire == batch
    assert r.tx_frames == r.tx_completed == 1000 and r.tx_no_frame == 0
    assert k.kicks >= 1000 // 32
    assert r.audit()["tx_free"] == 32


def test_tx_bad_lengths_counted():
    k = FakeKernel()
    r = k.rings()
    assert r.send_batch([b"", b"a" * 2049, b"b" * 2048, b"c" * 14]) == 2
    assert r.tx_bad_len == 2 and k.wire == [b"b" * 2048, b"c" * 14]
    r.audit()


def test_tx_stall_counts_no_frame_then_recovers():
    k = FakeKernel(frame_count=64, tx=16, comp=16, fill=32)
    r = k.rings(tx_frames=32)
    k.stalled = True  # the device queue is busy: kicks make no progress
    batch = frames(50)
    assert r.send_batch(batch) == 16  # 32 free frames but only 16 tx ring slots
    assert r.tx_no_frame == 34 and r.tx_unsent() == 16
    r.audit()
    k.stalled = False
    assert r.flush() == 0
    assert k.wire == batch[:16]
    assert r.audit()["tx_free"] == 32


def test_tx_waits_for_completion_ring_space():
    k = FakeKernel(frame_count=64, tx=32, comp=8, fill=16)
    r = k.rings(tx_frames=48)
    batch = frames(200)
    assert r.send_batch(batch) == 200  # the kernel stops every 8 frames until we reap
    assert k.wire == batch
    r.audit()


def test_tx_kick_error_leaves_frames_for_later():
    k = FakeKernel()
    r = k.rings()
    k.fail_errno = errno.ENETDOWN
    assert r.send_batch(frames(5)) == 5
    assert r.tx_kick_errors == 1 and r.last_kick_errno == errno.ENETDOWN and r.tx_unsent() == 5
    r.audit()
    assert r.flush() == 0 and k.wire == frames(5)
    r.audit()


def test_completion_of_unknown_frame_ignored():
    k = FakeKernel(frame_count=64, fill=32)
    r = k.rings(tx_frames=32)
    assert r.send_batch(frames(3)) == 3
    free = r.accounting()["tx_free"]
    k.complete(0)  # an rx frame
    k.complete(r.rx_pool * k.frame_size)  # a tx frame that is already free
    k.complete(1 << 40)  # outside the UMEM
    assert r.reap() == 0
    assert r.comp_bad == 3 and r.accounting()["tx_free"] == free
    r.audit()


def test_fill_ring_wakeup():
    k = FakeKernel()
    r = k.rings()
    k.deliver(frames(2))
    k.fill.set_flags(1)
    r.recv_batch(10)
    assert k.wakeups == 1
    r2 = FakeKernel().rings(need_wakeup=False)
    assert r2.flush() == 0


def test_audit_detects_corruption():
    k = FakeKernel()
    r = k.rings()
    r._free.append(r._free[-1])  # a frame twice in the free list
    with pytest.raises(RuntimeError, match="twice"):
        r.audit()


def test_release_lets_buffers_close():
    k = FakeKernel()
    r = k.rings()
    r.release()
    for kr in (k.rx, k.tx, k.fill, k.comp):
        kr.u32.release()
        kr.u64.release()
        kr.buf.extend(b"\0")  # a bytearray with live exports cannot be resized
