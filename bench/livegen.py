"""Live-frames packet generator: BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES transmits real frames on a veth.

Why this and not trafgen/iperf3 -u: user-space generators top out near 0.3 Mpps here (ENV-NOTES), far below
what an XDP balancer forwards, so they would measure themselves. The kernel's test-run loop in live mode
runs an XDP program on page-pool frames and turns XDP_TX into a real transmit on `ingress_ifindex`: several
Mpps from one core.

The program is a handful of raw instructions (no bcc compile, ~no memory): it rewrites the whole frame from
a template baked into the instructions (live-mode pages are recycled with whatever the last run left in
them), sets a pseudo-random UDP source port from a small range (so the balancer sees many flows) and
returns XDP_TX. UDP checksum is 0 ("none"), so changing the port needs no checksum work.

    from bench.livegen import LiveGen, udp_frame
    with LiveGen("hl12-cl", "eth0", udp_frame(...), cpu=0) as g:
        time.sleep(2)
    print(g.sent, g.rate)

    ip netns exec NS python -m bench.livegen eth0 --dst-mac .. --src-mac .. --src 10.0.0.1 --dst 10.0.0.100 -t 3
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import ipaddress
import os
import socket
import struct
import sys
import threading
import time

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_BPF = 321  # x86_64
BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_PROG_TYPE_XDP = 6
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
XDP_DROP, XDP_TX = 1, 3
HELPER_GET_PRANDOM_U32 = 7
CLONE_NEWNET = 0x40000000
ETH_UDP_SPORT_OFF = 14 + 20  # frames built by udp_frame(): no VLAN, no IP options


# --------------------------------------------------------------------------- raw bpf(2)

class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


class TestAttr(ctypes.Structure):
    # union bpf_attr, the "test" member (include/uapi/linux/bpf.h)
    _fields_ = [
        ("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32), ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32), ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class XdpMd(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint32), ("data_end", ctypes.c_uint32), ("data_meta", ctypes.c_uint32),
                ("ingress_ifindex", ctypes.c_uint32), ("rx_queue_index", ctypes.c_uint32),
                ("egress_ifindex", ctypes.c_uint32)]


def bpf(cmd: int, attr) -> int:
    rc = _libc.syscall(ctypes.c_long(_SYS_BPF), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return rc


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """struct bpf_insn: u8 code, u8 dst:4|src:4, s16 off, s32 imm (little-endian)."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def ld_imm64(dst: int, value: int) -> bytes:
    lo, hi = value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF
    return (insn(0x18, dst, imm=struct.unpack("<i", struct.pack("<I", lo))[0])
            + insn(0, imm=struct.unpack("<i", struct.pack("<I", hi))[0]))


def load_xdp(insns: bytes, name: bytes = b"bench_prog") -> int:
    """BPF_PROG_LOAD an XDP program from raw instructions; returns the fd (caller closes)."""
    buf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = _ProgLoadAttr(prog_type=BPF_PROG_TYPE_XDP, insn_cnt=len(insns) // 8, insns=ctypes.addressof(buf),
                         license=ctypes.addressof(lic), log_level=1, log_size=len(log),
                         log_buf=ctypes.addressof(log), prog_name=name[:15])
    try:
        return bpf(BPF_PROG_LOAD, attr)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror}\n{log.value.decode(errors='replace')}") from None


def generator_insns(template: bytes, sport_base: int, nflows: int) -> bytes:
    """r1=ctx: bounds check, copy template 8 bytes at a time, sport = base + (prandom & (nflows-1)), XDP_TX."""
    if nflows & (nflows - 1) or not 1 <= nflows <= 32768:
        raise ValueError("nflows must be a power of two <= 32768")
    n = len(template)
    p = bytearray()
    p += insn(0x61, 2, 1, 0)          # r2 = ctx->data
    p += insn(0x61, 3, 1, 4)          # r3 = ctx->data_end
    p += insn(0xBF, 4, 2)             # r4 = r2
    p += insn(0x07, 4, imm=n)         # r4 += len
    body = bytearray()
    off = 0
    while n - off >= 8:
        body += ld_imm64(5, struct.unpack_from("<Q", template, off)[0])
        body += insn(0x7B, 2, 5, off)  # *(u64 *)(r2 + off) = r5
        off += 8
    for size, code in ((4, 0x62), (2, 0x6A), (1, 0x72)):  # BPF_ST | BPF_MEM | W/H/B with an immediate
        if n - off >= size:
            body += insn(code, 2, 0, off, struct.unpack_from({4: "<i", 2: "<h", 1: "<b"}[size], template, off)[0])
            off += size
    body += insn(0xBF, 7, 2)                          # r7 = r2 (r1-r5 do not survive a call)
    body += insn(0x85, imm=HELPER_GET_PRANDOM_U32)    # r0 = bpf_get_prandom_u32()
    body += insn(0x57, 0, imm=nflows - 1)             # r0 &= nflows - 1
    body += insn(0x07, 0, imm=sport_base)             # r0 += base
    body += insn(0xDC, 0, imm=16)                     # r0 = htobe16(r0)
    body += insn(0x6B, 7, 0, ETH_UDP_SPORT_OFF)       # *(u16 *)(r7 + 34) = r0
    body += insn(0xB7, 0, imm=XDP_TX)
    body += insn(0x95)
    # if r4 > r3 goto drop (skip the body)
    p += insn(0x2D, 4, 3, len(body) // 8)
    p += body
    p += insn(0xB7, 0, imm=XDP_DROP)
    p += insn(0x95)
    return bytes(p)


def udp_frame(dst_mac: str, src_mac: str, src: str, dst: str, dport: int, sport: int = 10000,
              size: int = 60, ttl: int = 64) -> bytes:
    """Ethernet/IPv4/UDP frame of `size` bytes without FCS (60 = a 64-byte frame on the wire), UDP checksum 0."""
    mac = lambda m: bytes(int(x, 16) for x in m.split(":"))  # noqa: E731
    l3len = size - 14
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, l3len, 0, 0x4000, ttl, socket.IPPROTO_UDP, 0,
                     ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    s = sum(struct.unpack("!10H", ip))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    ip = ip[:10] + struct.pack("!H", ~s & 0xFFFF) + ip[12:]
    udp = struct.pack("!HHHH", sport, dport, l3len - 20, 0)
    frame = mac(dst_mac) + mac(src_mac) + b"\x08\x00" + ip + udp
    return frame + b"\0" * (size - len(frame))


def run_live(prog_fd: int, frame: bytes, repeat: int, ifindex: int, batch_size: int = 64) -> int:
    """One BPF_PROG_RUN in live-frames mode: `repeat` frames transmitted on ifindex; returns ns it took."""
    data = ctypes.create_string_buffer(frame, len(frame))
    ctx = XdpMd(0, len(frame), 0, ifindex, 0, 0)
    attr = TestAttr(prog_fd=prog_fd, data_in=ctypes.addressof(data), data_size_in=len(frame), repeat=repeat,
                    ctx_in=ctypes.addressof(ctx), ctx_size_in=ctypes.sizeof(ctx),
                    flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=batch_size)
    t0 = time.perf_counter_ns()
    bpf(BPF_PROG_TEST_RUN, attr)
    return time.perf_counter_ns() - t0


def setns(ns: str) -> None:
    """Move the calling *thread* into network namespace ns (other threads stay where they are)."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(ns: str | None, fn, *args, **kw):
    """Run fn in a short-lived thread inside ns (None: here) and return its result; exceptions propagate."""
    if ns is None:
        return fn(*args, **kw)
    box: dict = {}

    def work():
        try:
            setns(ns)
            box["r"] = fn(*args, **kw)
        except BaseException as e:
            box["e"] = e

    t = threading.Thread(target=work, name=f"netns-{ns}")
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box.get("r")


class LiveGen:
    """Transmit `frame` on ns/ifname from a background thread until stop(); counts frames and time.

    The thread moves itself into ns (the test run resolves ingress_ifindex in the caller's namespace) and
    pins itself to `cpu` so the rest of the path can have the other core. Each syscall sends `chunk`
    frames (~0.1 s), so stop() returns quickly.
    """

    def __init__(self, ns: str | None, ifname: str, frame: bytes, cpu: int | None = 0, nflows: int = 1024,
                 sport_base: int = 10000, chunk: int = 1 << 18, batch_size: int = 64):
        self.ns, self.ifname, self.frame, self.cpu = ns, ifname, frame, cpu
        self.chunk, self.batch_size = chunk, batch_size
        self.prog_fd = load_xdp(generator_insns(frame, sport_base, nflows), b"bench_livegen")
        self.sent = 0
        self.busy_ns = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = self._t1 = 0.0

    def _work(self) -> None:
        try:
            if self.ns:
                setns(self.ns)
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})  # pid 0 = this thread
            ifindex = socket.if_nametoindex(self.ifname)
            while not self._stop.is_set():
                self.busy_ns += run_live(self.prog_fd, self.frame, self.chunk, ifindex, self.batch_size)
                self.sent += self.chunk
        except BaseException as e:  # reported by stop()
            self.error = e

    def start(self) -> "LiveGen":
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._work, name="livegen", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._t1 = time.monotonic()
        if self.prog_fd >= 0:
            os.close(self.prog_fd)
            self.prog_fd = -1
        if self.error is not None:
            raise self.error

    @property
    def rate(self) -> float:
        """Frames per second while the generator ran (transmitted by XDP, not necessarily delivered)."""
        return self.sent / (self.busy_ns / 1e9) if self.busy_ns else 0.0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


_LIVE_ALLOWED: bool | None = None


def live_frames_allowed() -> bool:
    """Whether this kernel transmits live frames for us: some builds refuse the mode with EPERM whatever the
    program and interface (6.18.44-fc-v1300; fc-v1272 allowed it). Probed once, with a program that drops."""
    global _LIVE_ALLOWED
    if _LIVE_ALLOWED is None:
        fd = load_xdp(insn(0xB7, 0, imm=XDP_DROP) + insn(0x95), b"bench_probe")
        try:
            run_live(fd, udp_frame("02:00:00:00:00:02", "02:00:00:00:00:01", "10.0.0.1", "10.0.0.2", 9), 1, 0)
            _LIVE_ALLOWED = True
        except PermissionError:
            _LIVE_ALLOWED = False
        finally:
            os.close(fd)
    return _LIVE_ALLOWED


def generator_name() -> str:
    """What make() uses on this kernel, for the report's headings and the results."""
    return "live frames" if live_frames_allowed() else "XDP loop"


def make(ns: str, ifname: str, frame: bytes, cpu: int | None = 0, nflows: int = 1024):
    """The fastest generator this kernel allows: live frames, else the XDP broadcast loop (bench/loopgen.py).
    Both put the whole path (generator, veth, the LB, the sink) on `cpu`; neither is started."""
    if live_frames_allowed():
        return LiveGen(ns, ifname, frame, cpu=cpu, nflows=nflows)
    from bench.loopgen import LoopGen

    return LoopGen(ns, ifname, frame, cpu=cpu, nflows=nflows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.livegen", description="transmit 64-byte UDP frames at line rate")
    ap.add_argument("ifname")
    ap.add_argument("--dst-mac", required=True)
    ap.add_argument("--src-mac", required=True)
    ap.add_argument("--src", required=True)
    ap.add_argument("--dst", required=True)
    ap.add_argument("--dport", type=int, default=9)
    ap.add_argument("--flows", type=int, default=1024)
    ap.add_argument("-t", "--seconds", type=float, default=3.0)
    ap.add_argument("--cpu", type=int, default=0)
    a = ap.parse_args(argv)
    frame = udp_frame(a.dst_mac, a.src_mac, a.src, a.dst, a.dport)
    if not live_frames_allowed():
        print("this kernel refuses live frames (EPERM): nothing sent; the bench uses bench/loopgen.py instead")
        return 1
    with LiveGen(None, a.ifname, frame, cpu=a.cpu, nflows=a.flows) as g:
        time.sleep(a.seconds)
    print(f"sent {g.sent} frames, {g.rate / 1e6:.2f} Mpps while running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
