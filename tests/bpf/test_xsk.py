"""XskSocket against the real kernel: a veth pair in a private namespace, frames redirected by a tiny XDP program.

Layout, per XDP mode (generic, native), all inside one namespace `xsk<4 hex>` removed at the end:

    AF_PACKET (inject, capture) ── xa ══ veth ══ xb ── XDP: ethertype 0x88B5 → XSKMAP[rx_queue] → XskSocket
                                                          everything else → XDP_PASS

Only frames of the local-experimental ethertype 0x88B5 are redirected, so the kernel's own chatter on the link
(IPv6 ND, ...) can never reach the socket or the captures. Both veth ends have one queue so every frame is on
queue 0. Rates are printed (pytest -s), never asserted.
"""

import asyncio
import ctypes as ct
import errno
import os
import secrets
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from bench import livegen
from hdslb.lab import netns as nx
from hdslb.slowpath.xsk import Umem, XskSocket, call_in_netns

pytestmark = pytest.mark.root

ETH_P_TEST = 0x88B5  # IEEE 802 local experimental ethertype
DST = bytes.fromhex("02000000000b")
SRC = bytes.fromhex("02000000000a")
MTU = 3000  # above what a 2048-byte UMEM frame can receive, to provoke the kernel's oversize drop

PROG = r"""
#include <uapi/linux/if_ether.h>

/* the slow path's queue sockets, keyed by rx queue; a missing entry means XDP_PASS */
BPF_XSKMAP(xsks, 64);

int xsk_redirect(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end || eth->h_proto != htons(0x88B5))
        return XDP_PASS;
    return xsks.redirect_map(ctx->rx_queue_index, XDP_PASS);
}

/* on the peer in native mode (veth wants a program there); never sees the test frames in the wrong place */
int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }

/* traffic generator: run with BPF_F_TEST_XDP_LIVE_FRAMES on xa, each run transmits its frame */
int xdp_tx(struct xdp_md *ctx) { return XDP_TX; }
"""

SO_RCVBUFFORCE = 33
XDP_FLAGS = {"generic": 1 << 1, "native": 1 << 2}  # XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE


def frame(seq: int, size: int = 64) -> bytes:
    """An Ethernet frame of `size` bytes whose payload encodes seq, so loss and reordering show."""
    head = DST + SRC + ETH_P_TEST.to_bytes(2, "big") + seq.to_bytes(4, "big")
    body = bytes((seq + k) & 0xFF for k in range(max(0, size - len(head))))
    return head + body


class XskLab:
    """One namespace with the veth pair, the redirect program on xb in one XDP mode, and helpers."""

    def __init__(self, bpf, mode: str):
        from bcc import BPF

        self.bpf, self.mode = bpf, mode
        self.ns = f"xsk{secrets.token_hex(2)}"
        nx.netns_add(self.ns)
        try:
            nx.sh(["ip", "-n", self.ns, "link", "add", "xa", "numtxqueues", "1", "numrxqueues", "1", "mtu", MTU,
                   "type", "veth", "peer", "name", "xb", "numtxqueues", "1", "numrxqueues", "1", "mtu", MTU])
            for dev in ("xa", "xb"):
                nx.link_up(self.ns, dev)
            redirect = bpf.load_func("xsk_redirect", BPF.XDP)
            call_in_netns(self.ns, lambda: BPF.attach_xdp("xb", redirect, XDP_FLAGS[mode]))
            if mode == "native":
                passer = bpf.load_func("xdp_pass", BPF.XDP)
                call_in_netns(self.ns, lambda: BPF.attach_xdp("xa", passer, XDP_FLAGS[mode]))
            self.xa_ifindex = call_in_netns(self.ns, lambda: socket.if_nametoindex("xa"))
            self.xb_ifindex = call_in_netns(self.ns, lambda: socket.if_nametoindex("xb"))
            # protocol 0: sends, never receives, so nothing piles up in it
            self.injector = call_in_netns(self.ns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
            self.injector.bind(("xa", 0))
        except BaseException:
            self.teardown()
            raise

    def capture_socket(self) -> socket.socket:
        """An AF_PACKET socket receiving the test ethertype on xa; close it after the test (it buffers a lot)."""
        s = call_in_netns(self.ns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST)))
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)  # hold a whole test's frames unread
        s.bind(("xa", ETH_P_TEST))
        return s

    def open(self, **kw) -> XskSocket:
        """An XskSocket on xb queue 0, entered in the XSKMAP (the kernel removes the entry when it closes)."""
        x = XskSocket("xb", 0, netns=self.ns, **kw)
        self.bpf["xsks"][ct.c_int(0)] = ct.c_int(x.fd)
        return x

    def inject(self, frames) -> None:
        for f in frames:
            self.injector.send(f)

    def teardown(self) -> None:
        if getattr(self, "injector", None):
            self.injector.close()
        nx.netns_del(self.ns)


def recv_n(x: XskSocket, n: int, timeout: float = 3.0) -> list[bytes]:
    """Frames from x until n arrived or timeout; waits in select(), as an event loop would."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        select.select([x.fd], [], [], min(left, 0.1))
        got += x.recv_batch(256)
    return got


def capture(sock: socket.socket, n: int, timeout: float = 3.0) -> list[bytes]:
    """Frames arriving on xa (not the ones xa sent) until n arrived or timeout."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        r, _, _ = select.select([sock], [], [], 0.1)
        if r:
            data, addr = sock.recvfrom(65536)
            if addr[2] != socket.PACKET_OUTGOING:
                got.append(data)
    return got


def settle(x: XskSocket, timeout: float = 1.0) -> None:
    """Wait until every tx frame has come back through the completion ring."""
    deadline = time.monotonic() + timeout
    while x.flush() or x.stats()["tx_inflight"]:
        assert time.monotonic() < deadline, f"tx frames not completed: {x.stats()}"
        time.sleep(0.005)


def assert_accounting(x: XskSocket) -> dict:
    acc = x.audit()
    assert acc["rx_pool"] + acc["tx_free"] + acc["tx_inflight"] == acc["frame_count"]
    return acc


@pytest.fixture(scope="module")
def bpf():
    from bcc import BPF

    b = BPF(text=PROG)  # one compile (~2 s) shared by both modes
    yield b
    b.cleanup()


@pytest.fixture(scope="module", params=["generic", "native"])
def lab(request, bpf):
    nx.require_root()
    lab = XskLab(bpf, request.param)
    yield lab
    lab.teardown()
    assert not nx.netns_exists(lab.ns)


@pytest.fixture
def cap(lab):
    s = lab.capture_socket()
    yield s
    s.close()


@pytest.fixture
def xsk(lab):
    x = lab.open()
    yield x
    x.close()


def test_rx_byte_exact(lab, xsk):
    # 18..1792 bytes: 1792 is the most a 2048-byte frame receives (256 bytes of headroom)
    sent = [frame(i, 18 + (i * 97) % (1792 - 17)) for i in range(300)] + [frame(300, 1792)]
    lab.inject(sent)
    got = recv_n(xsk, len(sent))
    assert got == sent
    st = xsk.stats()
    assert st["rx_frames"] == 301 and st["rx_bad"] == 0 and st["rx_dropped"] == 0
    assert_accounting(xsk)


def test_tx_byte_exact(lab, xsk, cap):
    sent = [frame(i, 18 + (i * 131) % (2048 - 17)) for i in range(499)] + [frame(499, 2048)]  # a whole frame
    assert xsk.send_batch(sent) == 500  # 16 kicks of ≤ 32 descriptors
    got = capture(cap, len(sent))
    assert got == sent
    settle(xsk)
    st = xsk.stats()
    assert st["tx_frames"] == st["tx_completed"] == 500
    assert st["tx_no_frame"] == st["tx_bad_len"] == st["tx_invalid_descs"] == st["comp_bad"] == 0
    assert assert_accounting(xsk)["tx_free"] == st["tx_pool"]


def test_tx_more_frames_than_the_pool(lab, cap):
    umem = Umem(256)
    with lab.open(umem=umem, rx_size=64, fill_size=128, tx_size=64, comp_size=64) as x:
        assert x.stats()["tx_pool"] == 128
        sent = [frame(i) for i in range(1000)]
        n = x.send_batch(sent)
        # frames are reused as completions come back; what still found none is counted, never lost silently
        assert n + x.stats()["tx_no_frame"] == 1000
        assert n > 128  # more than the pool: completions were reaped between kicks
        assert capture(cap, n) == sent[:n]
        settle(x)
        assert_accounting(x)
    umem.close()


def test_rx_overflow_keeps_accounting_and_recovers(lab):
    umem = Umem(256)
    with lab.open(umem=umem, rx_size=64, fill_size=128, tx_size=64, comp_size=64) as x:
        assert (x.stats()["rx_pool"], x.stats()["tx_pool"]) == (128, 128)
        lab.inject(frame(i) for i in range(2000))  # nobody reads: the rx ring (64) overflows
        time.sleep(0.1)
        got = recv_n(x, 2000, timeout=0.5)
        st = x.stats()
        assert 0 < len(got) <= 128 and st["rx_ring_full"] > 0
        assert got == sorted(got, key=lambda f: f[14:18])  # what arrived arrived in order
        assert_accounting(x)
        assert x.send_batch([frame(i) for i in range(50)]) == 50  # tx unaffected
        settle(x)
        for rnd in range(3):  # and the socket still receives, several times the rx ring over
            sent = [frame(10000 + rnd * 100 + i) for i in range(40)]
            lab.inject(sent)
            assert recv_n(x, 40) == sent
        assert x.stats()["rx_bad"] == 0
        assert_accounting(x)
    umem.close()


def test_oversize_rx_frame_dropped_by_kernel(lab, xsk):
    """A frame longer than a UMEM frame minus headroom never reaches us; the kernel counts it, we go on."""
    big = frame(1, 1792 + 1)
    lab.inject([big, frame(2)])
    assert recv_n(xsk, 1) == [frame(2)]
    st = xsk.stats()
    assert st["rx_dropped"] == 1 and st["rx_bad"] == 0
    assert_accounting(xsk)


def test_tx_bad_length_counted(lab, xsk):
    assert xsk.send_batch([b"", b"x" * 2049, frame(7)]) == 1
    assert xsk.stats()["tx_bad_len"] == 2
    settle(xsk)
    assert_accounting(xsk)


def test_close_and_reopen_same_queue(lab):
    retries = 0
    for rnd in range(4):
        x = lab.open()
        retries += x.bind_retries
        sent = [frame(rnd * 10 + i) for i in range(5)]
        lab.inject(sent)
        assert recv_n(x, 5) == sent, f"round {rnd}"
        x.close()
        x.close()  # idempotent
        with pytest.raises(ValueError):
            x.recv_batch()
    print(f"\n[{lab.mode}] reopen after close: {retries} EBUSY retries over 3 reopens")


def test_one_socket_per_queue_and_bad_queue(lab, xsk):
    with pytest.raises(OSError) as e:
        XskSocket("xb", 0, netns=lab.ns, bind_timeout=0.05)
    assert e.value.errno == errno.EBUSY
    with pytest.raises(OSError) as e:
        XskSocket(lab.xb_ifindex, 5, netns=lab.ns)
    assert e.value.errno == errno.EINVAL and "queue" in str(e.value)
    with pytest.raises(OSError) as e:
        XskSocket("nonexistent0", netns=lab.ns)
    assert e.value.errno == errno.ENODEV


def test_failed_setup_leaves_nothing_behind(lab):
    umem = Umem(64)
    with pytest.raises(ValueError):
        XskSocket("xb", 0, umem=umem, tx_frames=64, netns=lab.ns)  # rings mapped, then no frame left for rx
    assert not umem.in_use
    umem.close()
    with lab.open() as x:  # the queue is free and nothing leaked a ring mapping
        lab.inject([frame(3)])
        assert recv_n(x, 1) == [frame(3)]


def test_without_need_wakeup_kernel_picks_mode(lab, cap):
    """need_wakeup off (kick on every send) and copy mode left to the kernel: veth still ends up in copy mode."""
    with lab.open(need_wakeup=False, copy_mode=False) as x:
        assert not x.zerocopy
        lab.inject([frame(1), frame(2)])
        assert recv_n(x, 2) == [frame(1), frame(2)]
        assert x.send_batch([frame(i) for i in range(100)]) == 100
        assert capture(cap, 100) == [frame(i) for i in range(100)]
        settle(x)
        assert_accounting(x)


def test_umem_is_single_use(lab):
    u = Umem(512)
    with lab.open(umem=u) as x:
        with pytest.raises(ValueError):
            XskSocket("xb", 0, umem=u, netns=lab.ns)
        lab.inject([frame(1)])
        assert recv_n(x, 1) == [frame(1)]
    assert not u.buf.closed and not u.in_use  # the caller's Umem outlives the socket, reusable
    with lab.open(umem=u) as x:
        lab.inject([frame(2)])
        assert recv_n(x, 1) == [frame(2)]
    u.close()


async def test_attach_loop_delivers_and_idles(lab, xsk, cap):
    loop = asyncio.get_running_loop()
    sent = [frame(i, 60 + i % 200) for i in range(600)]
    got: list[bytes] = []
    batches: list[int] = []
    done = loop.create_future()

    def on_frames(fs):
        batches.append(len(fs))
        got.extend(fs)
        xsk.send_batch(fs)  # reflect from inside the callback, as the daemon answers ARP/ICMP
        if len(got) >= len(sent) and not done.done():
            done.set_result(None)

    xsk.attach_loop(loop, on_frames, batch=64)
    with pytest.raises(RuntimeError):
        xsk.attach_loop(loop, on_frames)
    await loop.run_in_executor(None, lab.inject, sent)
    await asyncio.wait_for(done, 5)
    assert got == sent and max(batches) <= 64
    assert await loop.run_in_executor(None, capture, cap, len(sent)) == sent
    # idle: the reader costs nothing while no frame arrives (no busy loop)
    cpu = time.process_time()
    await asyncio.sleep(0.3)
    assert time.process_time() - cpu < 0.05
    xsk.detach_loop()
    lab.inject([frame(9999)])
    await asyncio.sleep(0.05)
    assert len(got) == len(sent)  # detached: nothing delivered
    assert recv_n(xsk, 1) == [frame(9999)]
    settle(xsk)
    assert_accounting(xsk)


async def test_tx_held_while_link_down_then_sent_by_the_loop(lab, cap):
    """Descriptors the kernel refuses (link down) stay queued and the attached loop kicks them again later."""
    loop = asyncio.get_running_loop()
    sent = [frame(i) for i in range(10)]
    with lab.open() as x:
        x.attach_loop(loop, lambda fs: None)
        nx.sh(["ip", "-n", lab.ns, "link", "set", "xb", "down"])
        try:
            assert x.send_batch(sent) == 10
            st = x.stats()
            assert st["tx_unsent"] == 10 and st["tx_kick_errors"] >= 1 and st["last_kick_errno"] == errno.ENETDOWN
        finally:
            nx.link_up(lab.ns, "xb")
        assert await loop.run_in_executor(None, capture, cap, 10) == sent  # no send_batch/flush call from us
        settle(x)
        assert_accounting(x)


# --- rates (printed, never asserted) ------------------------------------------------------------------------------

_BLASTER = textwrap.dedent("""
    import os, socket, sys, time
    if os.cpu_count() > 1:
        os.sched_setaffinity(0, {0})
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.setsockopt(263, 20, 1)  # SOL_PACKET, PACKET_QDISC_BYPASS
    s.bind(("xa", 0))
    f = bytes.fromhex(sys.argv[1]); end = time.monotonic() + float(sys.argv[2]); n = 0
    while time.monotonic() < end:
        for _ in range(1000):
            try:
                s.send(f)
            except OSError:
                pass
        n += 1000
    print(n)
""")


class _Generator:
    """64-byte frames into xb as fast as this machine allows: live frames (native, where the kernel allows them),
    else a Python blaster on an AF_PACKET socket."""

    def __init__(self, lab, seconds: float):
        self.lab, self.seconds, self.sent = lab, seconds, 0
        self._stop = threading.Event()
        self._err: BaseException | None = None
        self._thread = self._proc = None
        self.kind = "blaster"
        if lab.mode == "native":
            from bcc import BPF

            self._fd = lab.bpf.load_func("xdp_tx", BPF.XDP).fd
            if livegen.live_frames_allowed():  # some kernel builds refuse them (EPERM): the blaster then
                self.kind = "live frames"
        if self.kind == "live frames":
            self._thread = threading.Thread(target=self._live, daemon=True)
            self._thread.start()
        else:
            self._proc = subprocess.Popen(nx.ns_argv(lab.ns, [sys.executable, "-c", _BLASTER, frame(0).hex(),
                                                              str(seconds)]), stdout=subprocess.PIPE, text=True)

    def _live(self):
        def loop():
            if os.cpu_count() > 1:
                os.sched_setaffinity(0, {0})  # this thread only: the consumer keeps the other CPUs
            end = time.monotonic() + self.seconds
            while time.monotonic() < end and not self._stop.is_set():
                livegen.run_live(self._fd, frame(0), 20000, self.lab.xa_ifindex)
                self.sent += 20000

        try:
            call_in_netns(self.lab.ns, loop)
        except BaseException as e:
            self._err = e

    def join(self):
        if self._thread:
            self._thread.join()
            if self._err:
                raise self._err
        else:
            out, _ = self._proc.communicate(timeout=self.seconds + 10)
            self.sent = int(out.strip() or 0)


def _measure(lab, reflect: bool, seconds: float = 1.5) -> dict:
    """Drain (and optionally send back) frames for `seconds` while the generator runs; event-loop style waits.

    The generator gets CPU 0 and this thread the last CPU: left to the scheduler, a consumer woken by the
    generator's softirq is often placed behind it on the same CPU and the rx ring overflows meanwhile.
    """
    umem = Umem(8192)
    affinity = os.sched_getaffinity(0)
    if os.cpu_count() > 1:
        os.sched_setaffinity(0, {os.cpu_count() - 1})  # this thread only
    try:
        with lab.open(rx_size=4096, fill_size=8192, tx_size=2048, comp_size=2048, umem=umem) as x:
            gen = _Generator(lab, seconds)
            n = 0
            t0 = time.monotonic()
            end = t0 + seconds
            while time.monotonic() < end:
                fs = x.recv_batch(256)
                if not fs:
                    select.select([x.fd], [], [], 0.01)
                    continue
                n += len(fs)
                if reflect:
                    x.send_batch(fs)
            dt = time.monotonic() - t0
            gen.join()
            settle(x, 2.0)
            st = x.stats()
            assert_accounting(x)
    finally:
        os.sched_setaffinity(0, affinity)
        umem.close()
    return {"offered": gen.sent / seconds, "rx": n / dt, "tx": st["tx_completed"] / dt,
            "ring_full": st["rx_ring_full"], "fill_empty": st["rx_fill_ring_empty_descs"], "gen": gen.kind}


def test_rates_64_byte_frames(lab):
    rx = _measure(lab, reflect=False)
    rf = _measure(lab, reflect=True)
    print(f"\n[{lab.mode}, {rx['gen']}] offered {rx['offered'] / 1e3:.0f} kpps: rx-only {rx['rx'] / 1e3:.0f} kpps "
          f"(dropped: rx ring full {rx['ring_full']}, fill empty {rx['fill_empty']}); "
          f"reflect rx {rf['rx'] / 1e3:.0f} kpps, tx {rf['tx'] / 1e3:.0f} kpps "
          f"(offered {rf['offered'] / 1e3:.0f} kpps)")
    assert rx["rx"] > 0 and rf["tx"] > 0
