"""Loop generator: 64-byte frames at Mpps from an XDP broadcast loop, for kernels that refuse live frames.

livegen.py transmits from the kernel's test-run loop (BPF_F_TEST_XDP_LIVE_FRAMES). Some kernel builds refuse
that mode (6.18.44-fc-v1300 returns EPERM for any program and interface; fc-v1272 allowed it), and a
user-space generator tops out near 0.3 Mpps here. This one keeps the frames inside the kernel instead:

    client ns:   lg0 (XDP: XDP_TX) ── veth ── lg1 (XDP: fan) ──► broadcast to {lg1, eth0}
                  ▲                                                  │           │
                  └──────────────────── the copy out of lg1 ─────────┘           └──► eth0 ── veth ── the LB

A few hundred frames are sent into lg0 once (an AF_PACKET socket); `fan` on lg1 sets a pseudo-random UDP
source port (as livegen does) and redirects with BPF_F_BROADCAST to a devmap holding lg1 and eth0: one copy
leaves on eth0 towards the balancer, the other goes back out of lg1 to lg0, whose program sends it straight
back (XDP_TX). Each trip round the loop emits one frame. veth schedules the receiver's NAPI on the sending
CPU, so once started from a thread pinned to `cpu` the loop, the balancer behind eth0 and the sink all run
in that CPU's softirq — the same "one core does the whole path" as the live-frames generator, with a
loop's own cost per frame (two tiny XDP runs, a frame clone, two more veth hops) in place of the test run's.
Stopping clears a flag: `fan` then drops what arrives and the loop drains.

Same interface as livegen.LiveGen (start, stop, sent, rate):

    with LoopGen("hl12-cl", "eth0", udp_frame(...), cpu=0, nflows=1024) as g:
        time.sleep(2)
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import time

from bench.livegen import ETH_UDP_SPORT_OFF, in_netns

XDP_FLAGS_DRV_MODE = 1 << 2
POPULATION = 192  # frames put into the loop: under veth's 256-slot rings, so the loop itself never drops

_PROG = r"""
#include <uapi/linux/bpf.h>

/* lg1 and the interface towards the balancer: `fan` broadcasts every frame to both */
BPF_DEVMAP(lg_ports, 2);
/* [0]: 1 while running, 0 drains the loop (fan drops what arrives); [1]: flows - 1 (a power of two less
 * one); [2]: the first UDP source port. Settings, not -D flags: one compile serves every generator. */
BPF_ARRAY(lg_ctl, u32, 3);
/* frames emitted towards the balancer, per CPU */
BPF_PERCPU_ARRAY(lg_sent, u64, 1);

int lg_fan(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    u32 k0 = 0, k1 = 1, k2 = 2;
    u32 *run = lg_ctl.lookup(&k0), *mask = lg_ctl.lookup(&k1), *base = lg_ctl.lookup(&k2);
    u64 *n = lg_sent.lookup(&k0);

    if (data + SPORT_OFF + 2 > end || !run || !*run || !mask || !base || !n)
        return XDP_DROP;
    *n += 1;
    *(u16 *)(data + SPORT_OFF) = bpf_htons(*base + (bpf_get_prandom_u32() & *mask));
    return lg_ports.redirect_map(0, BPF_F_BROADCAST);
}

int lg_bounce(struct xdp_md *ctx)
{
    return XDP_TX;
}
"""


_BPF = None  # compiled once per process (~2 s, ~200 MB), shared by every LoopGen in turn


def _compiled():
    global _BPF
    if _BPF is None:
        from bcc import BPF

        _BPF = BPF(text=_PROG, cflags=[f"-DSPORT_OFF={ETH_UDP_SPORT_OFF}"])
    return _BPF


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, timeout=10)


class LoopGen:
    """Frames out of ns/ifname from an XDP loop on a veth pair made in ns (lg0/lg1, removed by stop())."""

    def __init__(self, ns: str, ifname: str, frame: bytes, cpu: int | None = 0, nflows: int = 1024,
                 sport_base: int = 10000, population: int = POPULATION):
        if nflows & (nflows - 1) or not 1 <= nflows <= 32768:
            raise ValueError("nflows must be a power of two <= 32768")
        if len(frame) < ETH_UDP_SPORT_OFF + 2:
            raise ValueError("frame too short for a UDP source port")
        self.ns, self.ifname, self.frame, self.cpu = ns, ifname, frame, cpu
        self.nflows, self.sport_base, self.population = nflows, sport_base, population
        self.sent = 0
        self.bpf = None
        self._made = False
        self._t0 = self._t1 = 0.0

    def _sent_now(self) -> int:
        return sum(self.bpf["lg_sent"].getvalue(ctypes.c_int(0)))

    def start(self) -> "LoopGen":
        from bcc import BPF

        self.bpf = _compiled()
        try:
            _ip(self.ns, "link", "add", "name", "lg0", "type", "veth", "peer", "name", "lg1")
            self._made = True
            for dev in ("lg0", "lg1"):
                _ip(self.ns, "link", "set", dev, "up")
            fan, bounce = self.bpf.load_func("lg_fan", BPF.XDP), self.bpf.load_func("lg_bounce", BPF.XDP)
            in_netns(self.ns, self._fill_ports)  # a devmap resolves ifindexes in the writer's namespace
            in_netns(self.ns, BPF.attach_xdp, "lg1", fan, XDP_FLAGS_DRV_MODE)
            in_netns(self.ns, BPF.attach_xdp, "lg0", bounce, XDP_FLAGS_DRV_MODE)
            ctl = self.bpf["lg_ctl"]
            ctl[ctypes.c_int(1)] = ctypes.c_uint32(self.nflows - 1)
            ctl[ctypes.c_int(2)] = ctypes.c_uint32(self.sport_base)
            ctl[ctypes.c_int(0)] = ctypes.c_uint32(1)
            self._s0, self._t0 = self._sent_now(), time.monotonic()  # the loop emits from the first frame in
            in_netns(self.ns, self._inject)
        except BaseException:
            self._teardown()
            raise
        return self

    def _fill_ports(self) -> None:
        ports = self.bpf["lg_ports"]
        for slot, dev in enumerate(("lg1", self.ifname)):
            ports[ctypes.c_int(slot)] = ctypes.c_int(socket.if_nametoindex(dev))

    def _inject(self) -> None:
        """Send the loop's frames into lg0 from a thread pinned to `cpu`: the loop's NAPI runs where it starts."""
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})  # pid 0 = this thread
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            s.bind(("lg0", 0))
            for _ in range(self.population):
                s.send(self.frame)
        finally:
            s.close()

    def stop(self) -> None:
        if self.bpf is None:
            return
        try:
            self.bpf["lg_ctl"][ctypes.c_int(0)] = ctypes.c_uint32(0)
            self._t1 = time.monotonic()
            self.sent = self._sent_now() - self._s0
            if self.sent <= 0:
                raise RuntimeError(f"the XDP loop on {self.ns}/lg0-lg1 emitted nothing")
        finally:
            time.sleep(0.05)  # let the loop drain before its interfaces go
            self._teardown()

    def _teardown(self) -> None:
        if self._made:
            try:
                _ip(self.ns, "link", "del", "lg0")  # takes lg1 and both programs with it
            except subprocess.CalledProcessError:
                pass
            self._made = False
        self.bpf = None  # the compiled object stays for the next generator

    @property
    def rate(self) -> float:
        """Frames per second the loop emitted towards the balancer while it ran (not necessarily delivered)."""
        return self.sent / (self._t1 - self._t0) if self._t1 > self._t0 else 0.0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
