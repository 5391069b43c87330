"""Section 2: end to end in the two-arm netns lab — hdslb beside plain routing, nftables DNAT, HAProxy and a bare XDP redirect.

One lab, one run, every peer configured for the same VIP (10.0.0.100) and the same real servers
(192.168.100.2, .3), one after the other:

    client ns ── veth ── LB ns (the peer under test) ── veth ── switch ns (bench_sink on sw-lb1) ── bridge ── rsN

- UDP packets/s: the live-frames generator (bench/livegen.py) transmits 64-byte UDP frames to VIP:9 (to
  the first real server for the peers that do not balance) from 1024 source ports on the client's eth0;
  on a kernel that refuses live frames, the XDP broadcast loop of bench/loopgen.py does (slower per frame,
  the same "one core" arrangement; the results' settings name the generator used).
  bench_sink on the switch port facing the LB counts, per real server, frames that arrive addressed to
  that server's IP and MAC, and drops them, so nothing behind the LB is ever the bottleneck. The
  generator runs in the client's namespace on one CPU and the whole path (generator, veth, LB, sink)
  runs to completion on that CPU (softirq in the sender's context), so `delivered` is the rate of one
  core doing all of it. `LB ns/pkt` subtracts the generator+sink floor (generator straight into a sink
  on the LB's ingress veth) to estimate the LB's own per-packet cost; `LB-only Mpps` is its inverse.
- The same UDP measurement with 8192 and 32768 source ports (concurrent flows) for nftables DNAT, the bare
  redirect and hdslb native: per-flow state that outgrows the CPU caches shows here, not at 1024 flows.
- The same UDP measurement with trafgen (netsniff-ng) sending instead, pinned to the same CPU: a user-space
  generator as a second, slower opinion (~1.7 Mpps into a veth here), so a peer's rate is also seen without
  the kernel's test-run loop transmitting.
- New TCP connections/s: wrk with `Connection: close` against nginx through the VIP (a Python
  connect/close loop when wrk is missing). wrk and nginx take most of a short connection's CPU on these
  two cores, so the same is also measured with light endpoints: bench/cps_loop.c (compiled here) keeps
  2 x 64 connects in flight and resets each connection as soon as its handshake completes (SYN, SYN-ACK,
  ACK, RST through the balancer; nginx accepts and finds it reset), which leaves the balancer's own share
  of the cores larger.
- TCP throughput: iperf3 to the first real server through the VIP, with offloads off (the lab's default,
  what XDP on veth needs) and, for the kernel peers only, with TSO/GSO/GRO/tx-checksum on everywhere.

Cleanup: the lab owns namespaces and processes; everything else lives inside them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import livegen, ref_progs, trafgen

VIP = "10.0.0.100"
# Each hdslb peer gets its own pool of local addresses, as an FNAT deployment has (DPVS's laddr pools):
# - a pool, because the real servers keep every FNAT connection's (laddr, lport) in TIME_WAIT for 60 s, and with
#   one address the ~64k ports come round again within seconds at the lab's 30k+ new connections/s: measured
#   with wrk, 3 % of the SYNs then met a TIME_WAIT that refused them (TcpExtPAWSTimewait on the servers) and
#   were retransmitted a second later (27.4k conn/s; with 8 addresses 2 refusals in 426k and 30.9k conn/s);
# - its own, because a daemon started --fresh (an empty conn table) may hand out ports the previous peer just
#   used, and a peer sharing the previous one's addresses could pay retransmits that say nothing about it.
LADDR_POOL = 8
CPS_RUNS = 3  # conn/s is the median of this many runs per peer (one with --quick)
LADDRS = tuple(tuple(f"192.168.100.{200 + LADDR_POOL * i + j}" for j in range(LADDR_POOL)) for i in range(4))
LB_CL_IP, LB_RS_IP = "10.0.0.254", "192.168.100.254"  # kernel addresses, for the kernel peers only
UDP_PORT = ref_progs.SINK_PORT
XDP_DRV, XDP_SKB = 1 << 2, 1 << 1
BIN = Path(sys.executable).parent

TARGETS = [  # (metric, peer compared to, factor)
    ("udp_mpps", "bare XDP redirect (native)", 0.75),
    ("udp_mpps", "plain routing", 2.5),
    ("udp_mpps", "nftables DNAT", 4.0),
    ("cps", "nftables DNAT", 1.5),
    ("cps_light", "nftables DNAT", 1.5),  # the same target read with light endpoints (cps_loop)
]


def _build_cps_loop():
    """Compile bench/cps_loop.c into a private directory; an NA (reported per peer) when there is no compiler."""
    import tempfile

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return NA("no C compiler to build bench/cps_loop.c (make bench installs gcc)")
    out = os.path.join(tempfile.mkdtemp(prefix="hdslb-bench-"), "cps_loop")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cps_loop.c")
    r = subprocess.run([cc, "-O2", "-Wall", "-o", out, src], capture_output=True, text=True)
    if r.returncode != 0:
        return NA(f"building cps_loop failed: {r.stderr.strip()[-200:]}")
    return out


def _tool(name: str, module: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


HDSLB_CTL = _tool("hdslb-ctl", "cli.hdslb_ctl")
IPVSADM = _tool("ipvsadm", "cli.ipvsadm")
DPIP = _tool("dpip", "cli.dpip")


def _xdp(ns: str, ifname: str, fn, flags: int) -> None:
    from bcc import BPF

    livegen.in_netns(ns, BPF.attach_xdp, ifname, fn, flags)


def _unxdp(ns: str, ifname: str, flags: int) -> None:
    from bcc import BPF

    try:
        livegen.in_netns(ns, BPF.remove_xdp, ifname, flags)
    except Exception:
        pass


class NA(Exception):
    """A metric that does not apply to (or failed for) a peer; the message is the reason printed."""


# --------------------------------------------------------------------------- peers

class Peer:
    """One balancer (or non-balancer) under test; setup() configures the LB namespace, teardown() undoes it."""

    name = ""
    pid = None  # a control-plane process whose CPU time is worth reporting
    kind = "kernel"  # kernel | xdp
    udp_dst = VIP  # where the generator's frames go
    http = f"http://{VIP}/"
    iperf = VIP
    gro_for_udp = True  # live frames into veth-lb0 need its NAPI: an XDP program or GRO
    cps_na = ""
    cps_light_na = ""
    iperf_na = ""
    tso_na = ""
    udp_na = ""

    def __init__(self, bench: "E2E"):
        self.b = bench
        self.lab = bench.lab

    def setup(self) -> None: ...

    def teardown(self) -> None: ...


class KernelBase(Peer):
    """Addresses on both LB arms, forwarding on, static neighbours for the real servers."""

    def setup(self):
        from hdslb.lab import netns as nx

        ns = self.lab.lb_ns
        nx.addr_add(ns, "veth-lb0", f"{LB_CL_IP}/24")
        nx.addr_add(ns, "veth-lb1", f"{LB_RS_IP}/24")
        nx.sysctl(ns, {"net.ipv4.ip_forward": 1})
        for s in self.lab.servers:
            nx.sh(["ip", "-n", ns, "neigh", "replace", s.ip, "lladdr", s.mac, "dev", "veth-lb1", "nud", "permanent"])

    def teardown(self):
        from hdslb.lab import netns as nx

        ns = self.lab.lb_ns
        nx.sysctl(ns, {"net.ipv4.ip_forward": 0})
        for ifname in ("veth-lb0", "veth-lb1"):
            nx.sh(["ip", "-n", ns, "addr", "flush", "dev", ifname], check=False)
        nx.sh(["ip", "-n", ns, "neigh", "flush", "dev", "veth-lb1"], check=False)


class Routing(KernelBase):
    name = "plain routing"
    udp_dst = None  # set from the lab: the first real server
    http = None
    iperf = None

    def __init__(self, bench):
        super().__init__(bench)
        rs1 = self.lab.servers[0].ip
        self.udp_dst, self.http, self.iperf = rs1, f"http://{rs1}/", rs1


class NftDnat(KernelBase):
    name = "nftables DNAT"
    TABLE = "hdslb_bench"

    def setup(self):
        from hdslb.lab import netns as nx

        super().setup()
        nx.addr_add(self.lab.lb_ns, "veth-lb0", f"{VIP}/24")
        rs = [s.ip for s in self.lab.servers]
        rr = ", ".join(f"{i} : {ip}" for i, ip in enumerate(rs))
        n = len(rs)
        rules = f"""
table ip {self.TABLE} {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {VIP} udp dport {UDP_PORT} dnat to numgen inc mod {n} map {{ {rr} }}
        ip daddr {VIP} tcp dport 80 dnat to numgen inc mod {n} map {{ {rr} }}
        ip daddr {VIP} tcp dport 5201 dnat to {rs[0]}
    }}
}}
"""
        nx.run(self.lab.lb_ns, ["nft", "-f", "-"], input=rules)

    def teardown(self):
        from hdslb.lab import netns as nx

        nx.run(self.lab.lb_ns, ["nft", "delete", "table", "ip", self.TABLE], check=False)
        super().teardown()


class HAProxy(KernelBase):
    name = "HAProxy (TCP mode)"
    udp_na = "HAProxy does not balance UDP"
    # a proxy completes the client's handshake itself: a connection reset before any data never reaches a server
    cps_light_na = "a proxy answers the handshake itself (the reset connection never reaches a real server)"

    def setup(self):
        from hdslb.lab import netns as nx

        exe = shutil.which("haproxy")
        if not exe:
            raise NA("haproxy not installed (apt-get install haproxy)")
        super().setup()
        nx.addr_add(self.lab.lb_ns, "veth-lb0", f"{VIP}/24")
        rs = self.lab.servers
        web = "\n".join(f"    server {s.role} {s.ip}:80" for s in rs)
        cfg = Path(self.lab.workdir) / "haproxy.cfg"
        cfg.write_text(f"""global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend web
    bind {VIP}:80
    default_backend web
backend web
    balance roundrobin
{web}
frontend perf
    bind {VIP}:5201
    default_backend perf
backend perf
    server {rs[0].role} {rs[0].ip}:5201
""")
        log = Path(self.lab.workdir) / "haproxy.log"
        self.proc = self.lab.spawn(self.lab.lb_ns, [exe, "-f", str(cfg), "-db"], log=log)
        nx.wait_listening(self.proc, 80, "tcp", what="haproxy", log_path=log)

    def teardown(self):
        p = getattr(self, "proc", None)
        if p is not None:
            self.lab.stop(p)
        super().teardown()


class BareRedirect(Peer):
    kind = "xdp"
    cps_na = iperf_na = tso_na = "one-way program (no return path)"

    def __init__(self, bench, generic: bool):
        super().__init__(bench)
        self.generic = generic
        self.name = f"bare XDP redirect ({'generic' if generic else 'native'})"
        self.udp_dst = self.lab.servers[0].ip
        self.gro_for_udp = generic

    def setup(self):
        lab = self.lab
        lb1 = lab.lb_ifaces["veth-lb1"]
        idx = livegen.in_netns(lab.lb_ns, socket.if_nametoindex, "veth-lb1")
        ref_progs.set_redirect(idx, lab.servers[0].mac, lb1.mac)
        _xdp(lab.lb_ns, "veth-lb0", ref_progs.load("bench_redirect"), XDP_SKB if self.generic else XDP_DRV)

    def teardown(self):
        _unxdp(self.lab.lb_ns, "veth-lb0", XDP_SKB if self.generic else XDP_DRV)


class Hdslb(Peer):
    kind = "xdp"

    def __init__(self, bench, generic: bool, aging: float | None = None, laddrs: tuple = LADDRS[0],
                 conn_table: str = "percpu"):
        super().__init__(bench)
        self.laddrs = laddrs
        self.generic = generic
        self.aging = aging
        self.conn_table = conn_table
        self.name = (f"hdslb FNAT ({'generic' if generic else 'native'}" + (f", aging sweep every {aging:g} s" if aging else "")
                     + (f", --conn-table {conn_table}" if conn_table != "percpu" else "") + ")")
        self.gro_for_udp = generic
        self.pid = None
        self.tso_na = ("generic XDP cannot redirect GSO packets larger than the MTU" if generic
                       else "native XDP on a veth forces TSO off on its peer")

    def run(self, tool, *args, timeout=120):
        r = self.lab.lb_run(tool + [str(a) for a in args], check=False, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, tool[-1:] + list(args)))}: {(r.stderr or r.stdout).strip()}")
        return r.stdout

    def setup(self):
        lab = self.lab
        mode = "generic" if self.generic else "native"
        extra = (["--aging-interval", self.aging] if self.aging else []) + ["--conn-table", self.conn_table]
        self.run(HDSLB_CTL, "up", "veth-lb0", "veth-lb1", "--xdp-mode", mode, "--pin-root", lab.pin_dir.parent,
                 "--log-file", Path(lab.workdir) / f"hdslbd-{mode}.log", "--fresh",
                 "--state-dir", self.state_dir(), *extra)
        from hdslb.ctl.client import call

        self.pid = call("daemon.status", path=str(lab.ctrl_path))["pid"]
        self.run(DPIP, "addr", "add", f"{VIP}/24", "dev", "veth-lb0")
        self.run(DPIP, "route", "add", "192.168.100.0/24", "dev", "veth-lb1")
        for s in lab.servers:
            self.run(DPIP, "neigh", "add", s.ip, "lladdr", s.mac, "dev", "veth-lb1")
        for proto, port, servers in (("-u", UDP_PORT, lab.servers), ("-t", 80, lab.servers),
                                     ("-t", 5201, lab.servers[:1])):
            self.run(IPVSADM, "-A", proto, f"{VIP}:{port}", "-s", "rr")
            for s in servers:
                self.run(IPVSADM, "-a", proto, f"{VIP}:{port}", "-r", f"{s.ip}:{port}", "-b")
            for la in self.laddrs:
                self.run(IPVSADM, "--add-laddr", "-z", la, proto, f"{VIP}:{port}", "-F", "veth-lb1")

    def state_dir(self) -> Path:
        """On tmpfs like the daemon's default (/run/hdslb/state): the model is saved with fsync after every change."""
        from hdslb.lab import netns as nx

        return self.lab.add_path(nx.RUN_DIR / f"bench-state-{self.lab.prefix}")

    def teardown(self):
        r = self.lab.lb_run(HDSLB_CTL + ["down"], check=False, timeout=60)
        if r.returncode == 0:
            return
        # The next peer must not be measured through this one: stop the daemon we started and detach its program
        # (what down should have done), then say so loudly.
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for ifname in ("veth-lb0", "veth-lb1"):
            self.lab.lb_run(["ip", "link", "set", "dev", ifname, "xdp", "off"], check=False)
            self.lab.lb_run(["ip", "link", "set", "dev", ifname, "xdpgeneric", "off"], check=False)
        raise RuntimeError(f"hdslb-ctl down exited {r.returncode}: {(r.stderr or r.stdout).strip()}; hdslbd "
                           f"{self.pid} stopped by SIGTERM and XDP detached instead")


# --------------------------------------------------------------------------- the bench

ALL_VETH_ENDS = lambda lab: ([(lab.cl_ns, "eth0"), (lab.lb_ns, "veth-lb0"), (lab.lb_ns, "veth-lb1"),  # noqa: E731
                              (lab.sw_ns, "sw-lb1")]
                             + [(lab.sw_ns, f"sw-{s.role}") for s in lab.servers]
                             + [(s.ns, "eth0") for s in lab.servers])


class E2E:
    def __init__(self, quick: bool, log):
        self.quick = quick
        self.log = log
        self.lab = None
        self.warmup = 0.7 if quick else 1.0
        self.window = 1.0 if quick else 2.0
        self.windows = 1 if quick else 3
        self.tcp_secs = 2 if quick else 5
        self.floor_mpps = None

    # -- lab ----------------------------------------------------------------------------------
    def setup(self):
        from hdslb.lab import netns as nx
        from hdslb.lab.servers import start_iperf3, start_nginx
        from hdslb.lab.topology import TwoArm

        self.lab = TwoArm(n_servers=2)
        self.lab.setup()
        lab = self.lab
        tcp = {"net.ipv4.tcp_tw_reuse": 1, "net.ipv4.ip_local_port_range": "1024 65535",
               "net.core.somaxconn": 4096, "net.ipv4.tcp_max_syn_backlog": 4096}
        for ns in [lab.cl_ns, lab.lb_ns] + [s.ns for s in lab.servers]:
            nx.sysctl(ns, tcp)
        # kernel peers that do not NAT the source need the way back to the client
        for s in lab.servers:
            nx.route_add(s.ns, lab.client_net, via=LB_RS_IP)
        nx.route_add(lab.cl_ns, lab.server_net, via=LB_CL_IP)
        ref_progs.compile_refs()
        self.sink = ref_progs.load("bench_sink")
        ref_progs.set_sink_dsts([(s.ip, s.mac) for s in lab.servers])
        _unxdp(lab.sw_ns, "sw-lb1", XDP_DRV)  # replaces the lab's XDP_PASS; the sink passes what it does not count
        _xdp(lab.sw_ns, "sw-lb1", self.sink, XDP_DRV)
        self.nginx = start_nginx(lab)
        self.iperf3 = start_iperf3(lab, which=[1])
        self.cps_loop = _build_cps_loop()

    def teardown(self):
        if isinstance(getattr(self, "cps_loop", None), str):
            shutil.rmtree(os.path.dirname(self.cps_loop), ignore_errors=True)
            self.cps_loop = None
        if self.lab is not None:
            self.lab.teardown()
            self.lab = None

    def gro(self, on: bool) -> None:
        from hdslb.lab import netns as nx

        nx.run(self.lab.lb_ns, ["ethtool", "-K", "veth-lb0", "gro", "on" if on else "off"], check=False)

    def tso(self, on: bool) -> None:
        """Offloads on/off on every veth end. XDP programs force TSO off on their veth's peer, so the client's
        XDP_PASS and the sink come off while offloads are on, and go back after."""
        from hdslb.lab import netns as nx

        lab = self.lab
        if on:
            _unxdp(lab.sw_ns, "sw-lb1", XDP_DRV)
            nx.xdp_pass_attach(lab.cl_ns, "eth0", detach=True)
        val = "on" if on else "off"
        for ns, ifname in ALL_VETH_ENDS(lab):
            nx.run(ns, ["ethtool", "-K", ifname, "tx", val, "tso", val, "gso", val, "gro", val], check=False)
        if not on:
            nx.xdp_pass_attach(lab.cl_ns, "eth0")
            _xdp(lab.sw_ns, "sw-lb1", self.sink, XDP_DRV)

    # -- metrics ------------------------------------------------------------------------------
    def _frame(self, dst_ip: str) -> bytes:
        lab = self.lab
        return livegen.udp_frame(lab.lb_ifaces["veth-lb0"].mac, lab.client.mac, lab.client.ip, dst_ip, UDP_PORT)

    def _pump(self, frame: bytes, gen=None) -> dict:
        """Generator on CPU 0 in the client namespace (livegen.make's unless `gen` makes another from
        (ns, ifname, frame)); sink counts over `windows` windows after a warm-up."""
        rates, per = [], None
        if gen is None:
            g = livegen.make(self.lab.cl_ns, "eth0", frame, cpu=0, nflows=1024).start()
        else:
            g = gen(self.lab.cl_ns, "eth0", frame).start()
        try:
            time.sleep(self.warmup)
            for _ in range(self.windows):
                c0, t0 = ref_progs.sink_counts(), time.monotonic()
                time.sleep(self.window)
                c1, t1 = ref_progs.sink_counts(), time.monotonic()
                d = [b - a for a, b in zip(c0, c1)]
                rates.append(sum(d[:-1]) / (t1 - t0))
                per = d if per is None else [x + y for x, y in zip(per, d)]
        finally:
            g.stop()
        n = len(self.lab.servers)
        good = sum(per[:n]) or 1
        return {"mpps": statistics.median(rates) / 1e6, "windows_mpps": [round(r / 1e6, 3) for r in rates],
                "gen_mpps": g.rate / 1e6, "spread": [round(x / good, 3) for x in per[:n]],
                "misaddressed": per[-1]}

    def floor(self) -> dict:
        """Generator straight into the sink on the LB's ingress veth: what the path costs without any LB."""
        lab = self.lab
        _xdp(lab.lb_ns, "veth-lb0", self.sink, XDP_DRV)
        try:
            s0 = lab.servers[0]
            frame = livegen.udp_frame(s0.mac, lab.client.mac, lab.client.ip, s0.ip, UDP_PORT)
            r = self._pump(frame)
        finally:
            _unxdp(lab.lb_ns, "veth-lb0", XDP_DRV)
        self.floor_mpps = r["mpps"]
        return r

    def udp(self, peer: Peer) -> dict:
        if peer.udp_na:
            raise NA(peer.udp_na)
        if peer.gro_for_udp:
            self.gro(True)
        try:
            r = self._pump(self._frame(peer.udp_dst))
        finally:
            if peer.gro_for_udp:
                self.gro(False)
        if r["mpps"] < 0.001:
            raise NA(f"nothing delivered (generator sent {r['gen_mpps']:.2f} Mpps)")
        if self.floor_mpps:
            lb_ns = 1e3 / r["mpps"] - 1e3 / self.floor_mpps
            r["lb_ns"] = lb_ns
            r["lb_only_mpps"] = 1e3 / lb_ns if lb_ns > 0 else None
        return r

    # 1024 again here: the peer's main UDP figure is measured after the loop (abba), minutes away from these
    FLOW_COUNTS = (1024, 8192, 32768)
    FLOW_PEERS = ("nftables DNAT", "bare XDP redirect (native)", "hdslb FNAT (native)",
                  "hdslb FNAT (native, --conn-table shared)")

    def udp_flows(self, peer: Peer) -> dict:
        """UDP Mpps with more concurrent flows than the main measurement's 1024 (the live-frames generator's
        source ports): a balancer's per-flow state outgrows the CPU caches, which a 1024-flow test hides. The
        1024-flow figure is measured again in the same minute, so the table's ratios compare neighbours."""
        if peer.udp_na:
            raise NA(peer.udp_na)
        if peer.name not in self.FLOW_PEERS:
            raise NA("measured for " + ", ".join(self.FLOW_PEERS))
        out = {}
        windows = self.windows
        self.windows = 1
        if peer.gro_for_udp:
            self.gro(True)
        try:
            for n in self.FLOW_COUNTS:
                r = self._pump(self._frame(peer.udp_dst),
                               gen=lambda ns, ifname, frame: livegen.make(ns, ifname, frame, cpu=0, nflows=n))
                out[str(n)] = round(r["mpps"], 3)
        finally:
            self.windows = windows
            if peer.gro_for_udp:
                self.gro(False)
        return {"by_flows": out}

    def udp_trafgen(self, peer: Peer) -> dict:
        """The same UDP measurement with trafgen sending (a user-space generator: the second, slower opinion)."""
        if peer.udp_na:
            raise NA(peer.udp_na)
        if shutil.which("trafgen") is None:
            raise NA("trafgen not installed (netsniff-ng)")
        if peer.gro_for_udp:
            self.gro(True)
        try:
            r = self._pump(self._frame(peer.udp_dst), gen=lambda ns, ifname, frame: trafgen.TrafGen(ns, ifname, frame))
        finally:
            if peer.gro_for_udp:
                self.gro(False)
        if r["mpps"] < 0.001:
            raise NA(f"nothing delivered (trafgen sent {r['gen_mpps']:.2f} Mpps)")
        r["generator"] = "trafgen, 1 CPU, random UDP source port"
        return r

    def cps(self, peer: Peer) -> dict:
        if peer.cps_na:
            raise NA(peer.cps_na)
        wrk = shutil.which("wrk")
        secs = self.tcp_secs
        if wrk:
            r = self.lab.client_run([wrk, "-t2", "-c64", f"-d{secs}s", "--timeout", "2s", "-H", "Connection: close",
                                     peer.http], check=False, timeout=secs + 30)
            m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
            if not m:
                raise NA(f"wrk failed: {(r.stderr or r.stdout).strip()[-200:]}")
            errs = re.search(r"Socket errors: (.*)", r.stdout)
            non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
            reqs = re.search(r"(\d+) requests in", r.stdout)
            return {"cps": float(m.group(1)), "tool": "wrk -t2 -c64 (Connection: close)",
                    "requests": int(reqs.group(1)) if reqs else None,
                    "errors": (errs.group(1).strip() if errs else "") + (f" non-2xx {non2xx.group(1)}" if non2xx else "")}
        return self._cps_python(peer, secs)

    def cps_light(self, peer: Peer) -> dict:
        if peer.cps_na or peer.cps_light_na:
            raise NA(peer.cps_na or peer.cps_light_na)
        if isinstance(self.cps_loop, NA):
            raise self.cps_loop
        host = peer.http.split("/")[2]
        conc, procs = 64, 2
        r = self.lab.client_run([self.cps_loop, host, "80", str(self.tcp_secs), str(conc), str(procs), "rst"],
                                check=False, timeout=self.tcp_secs + 30)
        try:
            cps, errs = r.stdout.split()
        except ValueError:
            raise NA(f"cps_loop failed: {(r.stderr or r.stdout).strip()[-200:]}") from None
        return {"cps": float(cps), "tool": f"cps_loop {procs} x {conc} in flight, reset once established",
                "errors": "" if errs == "0" else errs}

    def _cps_python(self, peer: Peer, secs: int) -> dict:
        host = peer.http.split("/")[2]
        script = f"""
import multiprocessing as mp, socket, time
def w(q):
    n = e = 0
    end = time.monotonic() + {secs}
    while time.monotonic() < end:
        try:
            s = socket.create_connection(("{host}", 80), timeout=2)
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            while s.recv(4096):
                pass
            s.close(); n += 1
        except OSError:
            e += 1
    q.put((n, e))
q = mp.Queue(); ps = [mp.Process(target=w, args=(q,)) for _ in range(4)]
[p.start() for p in ps]; r = [q.get() for _ in ps]; [p.join() for p in ps]
print(sum(x for x, _ in r) / {secs}, sum(y for _, y in r))
"""
        r = self.lab.client_run([sys.executable, "-c", script], check=False, timeout=secs + 30)
        try:
            cps, errs = r.stdout.split()
        except ValueError:
            raise NA(f"connect loop failed: {(r.stderr or r.stdout).strip()[-200:]}") from None
        return {"cps": float(cps), "tool": "python connect/close loop x4 (wrk not installed)", "errors": errs}

    def iperf(self, peer: Peer, tso: bool) -> dict:
        if peer.iperf_na:
            raise NA(peer.iperf_na)
        if tso and peer.tso_na:
            raise NA(peer.tso_na)
        secs = self.tcp_secs
        if tso:
            self.tso(True)
        try:
            r = self.lab.client_run(["iperf3", "-c", peer.iperf, "-t", str(secs), "-J", "--connect-timeout", "3000"],
                                    check=False, timeout=secs + 30)
        finally:
            if tso:
                self.tso(False)
        try:
            j = json.loads(r.stdout)
        except ValueError:
            raise NA(f"iperf3: {(r.stderr or r.stdout).strip()[-200:]}") from None
        if "error" in j:
            raise NA(f"iperf3: {j['error']}")
        end = j["end"]
        return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
                "retransmits": end.get("sum_sent", {}).get("retransmits")}

    def _median_cps(self, fn, runs: int = CPS_RUNS) -> dict:
        """conn/s moves ±10 % from one 5-second run to the next (more with the light endpoints): the median of
        `runs` runs (of an even count, the mean of the middle two), with every run's figure kept beside it."""
        results = [fn() for _ in range(1 if self.quick else runs)]
        results.sort(key=lambda r: r["cps"])
        med = dict(results[len(results) // 2])
        if len(results) % 2 == 0:
            med["cps"] = statistics.mean(r["cps"] for r in results[len(results) // 2 - 1:len(results) // 2 + 1])
        med["runs"] = [round(r["cps"]) for r in results]
        return med

    # -- run ----------------------------------------------------------------------------------
    # The UDP and conn/s targets are ratios between peers. Measured in the per-peer loop they would be minutes
    # apart, and this VM's speed drifts by tens of percent within minutes: those metrics of the peers the targets
    # compare are measured in one sequence after the loop instead, forward then back (A B C D E E D C B A, a
    # peer's metrics in reverse order too), each figure the mean of its two passes. Every measurement's two passes
    # sit symmetrically about the sequence's middle, so a drift linear in time moves all alike.
    ABBA = {"udp": ("plain routing", "nftables DNAT", "bare XDP redirect (native)", "hdslb FNAT (native)",
                    "hdslb FNAT (native, --conn-table shared)"),
            "cps": ("plain routing", "nftables DNAT", "hdslb FNAT (native)", "hdslb FNAT (native, --conn-table shared)"),
            "cps_light": ("plain routing", "nftables DNAT", "hdslb FNAT (native)",
                          "hdslb FNAT (native, --conn-table shared)"),
            # table 2g compares the two table kinds at 8k and 32k flows: one pass a peer, minutes apart, put
            # either kind ahead by up to 30 % in turn over the runs
            "udp_flows": FLOW_PEERS}
    ABBA_CPS_RUNS = 2  # conn/s runs a pass (the loop's CPS_RUNS in all, and one more)

    def later(self, name: str) -> tuple:
        """The metrics of peer `name` measured after the loop (abba), not in it."""
        return tuple(k for k, names in self.ABBA.items() if name in names)

    def abba(self, made: list) -> None:
        """The ABBA metrics of made ([(maker, row)] of the loop), forward then back; fills their rows."""
        seq = [(mk, row, keys) for mk, row in made
               if (keys := tuple(k for k in self.later(row["peer"]) if row.get(k) is None))]
        got: dict[tuple, list] = {(id(row), k): [] for _, row, keys in seq for k in keys}
        for n, (mk, row, keys) in enumerate(seq + seq[::-1]):
            peer = mk(self)
            results: dict = {}
            failed = None
            try:
                peer.setup()
                # the back pass mirrors the forward one measurement by measurement, a peer's metrics included
                for k in (keys if n < len(seq) else keys[::-1]):
                    results[k] = self._abba_one(peer, k)
            except Exception as e:
                failed = {"na": f"setup failed: {type(e).__name__}: {str(e).strip()[-200:]}"}
            finally:
                try:
                    peer.teardown()
                except Exception as e:
                    self.log(f"  {peer.name}: teardown: {e}")
            for k in (keys if n < len(seq) else keys[::-1]):
                r = results.get(k) or failed or {"na": "not measured"}
                got[(id(row), k)].append(r)
                self.log(f"  {peer.name:<28} {k + ', pass ' + ('1' if n < len(seq) else '2'):<14} {_short(r)}")
        for _, row, keys in seq:
            for k in keys:
                passes = got[(id(row), k)]
                row[k] = (combine_passes(passes, self.floor_mpps) if k == "udp" else
                          combine_flows(passes) if k == "udp_flows" else combine_cps(passes))

    def _abba_one(self, peer: Peer, key: str) -> dict:
        cpu0, t0 = _cpu_s(peer.pid), time.monotonic()
        try:
            if key == "udp":
                r = self.udp(peer)
            elif key == "udp_flows":
                r = self.udp_flows(peer)
            else:
                fn = self.cps if key == "cps" else self.cps_light
                r = self._median_cps(lambda: fn(peer), runs=self.ABBA_CPS_RUNS)
        except NA as e:
            return {"na": str(e)}
        except Exception as e:
            return {"na": f"{type(e).__name__}: {str(e).strip()[-200:]}"}
        cpu1 = _cpu_s(peer.pid)
        if cpu0 is not None and cpu1 is not None:
            r["daemon_cpu_pct"] = round(100 * (cpu1 - cpu0) / (time.monotonic() - t0), 1)
        return r

    def measure(self, peer: Peer, later: tuple = ()) -> dict:
        """Every metric of one peer; those in `later` are left None (measured after the loop: abba)."""
        row: dict = {"peer": peer.name, "kind": peer.kind}
        try:
            peer.setup()
        except Exception as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            for k in ("udp", "udp_flows", "udp_trafgen", "cps", "cps_light", "iperf_tso_off", "iperf_tso_on"):
                row[k] = {"na": f"setup failed: {msg}"}
            peer.teardown()
            return row
        try:
            for key, fn in (("udp", lambda: self.udp(peer)), ("udp_flows", lambda: self.udp_flows(peer)),
                            ("udp_trafgen", lambda: self.udp_trafgen(peer)),
                            ("cps", lambda: self._median_cps(lambda: self.cps(peer))),
                            ("cps_light", lambda: self._median_cps(lambda: self.cps_light(peer))),
                            ("iperf_tso_off", lambda: self.iperf(peer, False)),
                            ("iperf_tso_on", lambda: self.iperf(peer, True))):
                if key in later:
                    row[key] = None
                    continue
                cpu0 = _cpu_s(peer.pid)
                t0 = time.monotonic()
                try:
                    row[key] = fn()
                    if cpu0 is not None and _cpu_s(peer.pid) is not None:
                        # the daemon shares the 2 cores with the data path: how much it took while measured
                        row[key]["daemon_cpu_pct"] = round(100 * (_cpu_s(peer.pid) - cpu0) / (time.monotonic() - t0), 1)
                except NA as e:
                    row[key] = {"na": str(e)}
                except Exception as e:
                    row[key] = {"na": f"{type(e).__name__}: {str(e).strip()[-200:]}"}
                self.log(f"  {peer.name:<28} {key:<14} {_short(row[key])}")
        finally:
            try:
                peer.teardown()
            except Exception as e:
                self.log(f"  {peer.name}: teardown: {e}")
        return row

    def run(self, peers: list[str] | None = None) -> dict:
        out: dict = {"rows": []}
        self.setup()
        try:
            f = self.floor()
            out["floor"] = f
            self.log(f"  generator + sink floor: {f['mpps']:.2f} Mpps ({1e3 / f['mpps']:.0f} ns/pkt)")
            makers = [Routing, NftDnat, HAProxy, lambda b: BareRedirect(b, False), lambda b: BareRedirect(b, True),
                      lambda b: Hdslb(b, False, laddrs=LADDRS[0]), lambda b: Hdslb(b, True, laddrs=LADDRS[1]),
                      # the daemon's aging sweep reads the whole conn table from Python every 2 s on the same
                      # two cores: the same balancer with the sweep made rare shows what that costs
                      lambda b: Hdslb(b, False, aging=60.0, laddrs=LADDRS[2]),
                      # one value an entry for every CPU instead of one per CPU (the memory alternative)
                      lambda b: Hdslb(b, False, laddrs=LADDRS[3], conn_table="shared")]
            made = []
            for mk in makers:
                peer = mk(self)
                if peers and not any(p in peer.name for p in peers):
                    continue
                row = self.measure(peer, later=self.later(peer.name))
                out["rows"].append(row)
                made.append((mk, row))
            self.abba(made)
        finally:
            self.teardown()
        out["targets"] = targets(out["rows"])
        out["settings"] = {"warmup_s": self.warmup, "window_s": self.window, "windows": self.windows,
                           "tcp_seconds": self.tcp_secs, "flows": 1024, "frame_bytes": 64,
                           "generator": livegen.generator_name()}
        return out


def combine_passes(passes: list[dict], floor_mpps: float | None) -> dict:
    """One peer's UDP from its forward and back passes (E2E.abba): the mean rate, every window kept; n/a
    unless every pass measured."""
    bad = [r["na"] for r in passes if "na" in r]
    if bad or not passes:
        return {"na": bad[0] if bad else "not measured"}
    mpps = statistics.mean(r["mpps"] for r in passes)
    out = {"mpps": mpps, "passes_mpps": [round(r["mpps"], 3) for r in passes],
           "windows_mpps": [w for r in passes for w in r["windows_mpps"]],
           "gen_mpps": statistics.mean(r["gen_mpps"] for r in passes),
           "spread": [round(statistics.mean(x), 3) for x in zip(*(r["spread"] for r in passes))],
           "misaddressed": sum(r["misaddressed"] for r in passes), "order": "forward and back (A B ... B A)"}
    if floor_mpps:
        lb_ns = 1e3 / mpps - 1e3 / floor_mpps
        out["lb_ns"] = lb_ns
        out["lb_only_mpps"] = 1e3 / lb_ns if lb_ns > 0 else None
    return out


def combine_flows(passes: list[dict]) -> dict:
    """One peer's UDP by concurrent flows from its forward and back passes (E2E.abba): each flow count's mean
    rate, every pass kept; n/a unless every pass measured."""
    bad = [r["na"] for r in passes if "na" in r]
    if bad or not passes:
        return {"na": bad[0] if bad else "not measured"}
    counts = list(passes[0]["by_flows"])
    return {"by_flows": {c: round(statistics.mean(r["by_flows"][c] for r in passes), 3) for c in counts},
            "passes": {c: [r["by_flows"][c] for r in passes] for c in counts},
            "order": "forward and back (A B ... B A)"}


def combine_cps(passes: list[dict]) -> dict:
    """One peer's conn/s from its forward and back passes (E2E.abba): the mean of the passes' figures, every run
    kept; n/a unless every pass measured."""
    bad = [r["na"] for r in passes if "na" in r]
    if bad or not passes:
        return {"na": bad[0] if bad else "not measured"}
    out = dict(passes[0])
    out.update(cps=statistics.mean(r["cps"] for r in passes), passes=[round(r["cps"]) for r in passes],
               runs=[x for r in passes for x in r.get("runs", [round(r["cps"])])],
               errors=" ".join(r["errors"] for r in passes if r.get("errors")), order="forward and back (A B ... B A)")
    if all("daemon_cpu_pct" in r for r in passes):
        out["daemon_cpu_pct"] = round(statistics.mean(r["daemon_cpu_pct"] for r in passes), 1)
    return out


def _cpu_s(pid: int | None) -> float | None:
    """utime + stime of pid and its threads, seconds (None when there is no such process)."""
    if not pid:
        return None
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _short(m: dict) -> str:
    if "na" in m:
        return f"n/a ({m['na']})"
    if "by_flows" in m:
        s = ", ".join(f"{k} flows {v:.3f} Mpps" for k, v in m["by_flows"].items())
    elif "mpps" in m:
        s = f"{m['mpps']:.3f} Mpps (gen {m['gen_mpps']:.2f}, spread {m['spread']})"
    elif "cps" in m:
        s = f"{m['cps']:.0f} conn/s {m.get('errors') or ''}"
    elif "gbps" in m:
        s = f"{m['gbps']:.2f} Gbit/s"
    else:
        s = str(m)
    if "daemon_cpu_pct" in m:
        s += f"  [hdslbd CPU {m['daemon_cpu_pct']}%]"
    return s


def value(row: dict, metric: str):
    if metric == "udp_mpps":
        return (row.get("udp") or {}).get("mpps")
    if metric == "udp_trafgen_mpps":
        return (row.get("udp_trafgen") or {}).get("mpps")
    if metric == "udp_lb_only_mpps":
        return (row.get("udp") or {}).get("lb_only_mpps")
    if metric == "cps":
        return (row.get("cps") or {}).get("cps")
    if metric == "cps_light":
        return (row.get("cps_light") or {}).get("cps")
    if metric == "iperf_tso_off":
        return (row.get("iperf_tso_off") or {}).get("gbps")
    if metric == "iperf_tso_on":
        return (row.get("iperf_tso_on") or {}).get("gbps")
    return None


# Whose ratios the targets are read for: the default build, and the shared conn table beside it (as section 3e
# reads the memory target for both); the second only when its peer ran.
TARGET_PEERS = (("hdslb FNAT (native)", "hdslb native"),
                ("hdslb FNAT (native, --conn-table shared)", "hdslb native, --conn-table shared,"))


def targets(rows: list[dict]) -> list[dict]:
    by = {r["peer"]: r for r in rows}
    res = []
    for peer, label in TARGET_PEERS:
        if peer in by or peer == TARGET_PEERS[0][0]:
            res.extend(_targets_of(by, by.get(peer), label))
    return res


def _targets_of(by: dict, me: dict | None, label: str) -> list[dict]:
    res = []
    for metric, other, factor in TARGETS:
        name = f"{label} {metric} >= {factor} x {other}"
        a = value(me, metric) if me else None
        b = value(by[other], metric) if other in by else None
        if a is None or not b:
            res.append({"name": name, "value": None, "limit": factor, "pass": None,
                        "na": "missing measurement"})
            continue
        entry = {"name": name, "value": round(a / b, 4), "limit": factor, "pass": a / b >= factor}
        # What a program that does nothing but redirect reaches on the same ratio: the most any XDP balancer
        # could show with this generator and lab (a limit above it cannot be met by the balancer's own work).
        ceil = by.get("bare XDP redirect (native)")
        c = value(ceil, metric) if ceil and other != "bare XDP redirect (native)" else None
        if c:
            entry["ceiling"] = round(c / b, 2)
        # the same ratio on the derived LB-only rates (generator+sink floor removed), for information
        if metric == "udp_mpps":
            la, lb = value(me, "udp_lb_only_mpps"), value(by[other], "udp_lb_only_mpps")
            if la and lb:
                entry["lb_only_ratio"] = round(la / lb, 2)
        res.append(entry)
    return res


def run(quick: bool = False, log=print, peers: list[str] | None = None) -> dict:
    if os.geteuid() != 0:
        return {"na": "needs root"}
    e = E2E(quick, log)
    t0 = time.monotonic()
    res = e.run(peers)
    res["seconds"] = round(time.monotonic() - t0, 1)
    return res
