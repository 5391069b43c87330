"""Do flows survive a kill -9 of hdslbd? Live flows through FNAT, captured on both sides, while hdslbd is killed
and restarted; every lost or retransmitted segment and every drop counter placed against the kills.

    python -m bench.restart_flows [--kills 4] [--down 2] [--gap 15] [--established 30] [--steps cps,reload_dp]

Two-arm lab, two real servers (TCP echo :9000, nginx :80, UDP echo :53). From the client at once: 8 long TCP echo
flows (a 64-byte message every 20 ms each, the reply's delay measured), 8 slots of short ones (2-12 s each,
replaced as they end: flows end and start inside the down windows), a curl loop of short requests, two
rate-limited /big download loops and 4 UDP request/reply sockets (20 ms). Each kill: SIGKILL to hdslbd, --down
seconds, then `hdslb-ctl up` as before (the window lasts until the new daemon is ready). --steps adds events
before the kills: cps (bench/cps_loop burst), reload_dp, flap (nginx on rs2 stopped for 8 s).
Observed: the fast path's counters every 0.1 s (read from the pins, so also while no daemon runs), the frames on
the client's eth0 and on the servers' side of the balancer (sw-lb1), nstat on every host.
Reported: drop counter moves with their time after the last event; retransmitted segments (client's and servers')
and whether the balancer passed each copy on (a spurious retransmission, an answer late on a loaded machine) or
none (a drop); flows by how they lie against the windows; UDP losses and re-mappings (a new local port = a new flow).
Exit 1 when a flow was harmed: a drop counter moved, a segment was retransmitted with no copy forwarded, a
reply came over 0.15 s late, a UDP reply was lost or moved, or a request failed (but for transfers from the
nginx that --steps flap stops, and requests to it in the 3 s its health check may take).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from hdslb.fastpath.abi import counter_names
from hdslb.lab.servers import Nginx, UdpEcho
from hdslb.lab.topology import TwoArm

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
VIP, LADDR = "10.0.0.100", "192.168.100.254"
SLOW = 0.15  # seconds: a reply later than this is a stall (a loss recovered by a retransmission timeout)


def tool(name: str, module: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


CTL, DPIP = tool("hdslb-ctl", "cli.hdslb_ctl"), tool("dpip", "cli.dpip")


def conf_text(established: int) -> str:
    def rs(port, check=""):
        return "".join(f"""
    real_server 192.168.100.{i} {port} {{
        weight 1{check}
    }}""" for i in (2, 3))

    check = """
        TCP_CHECK {
            connect_timeout 1
            retry 1
            delay_before_retry 0.5
        }"""
    svc = "\n".join(f"""virtual_server {VIP} {port} {{
    delay_loop 1
    lb_algo {algo}
    lb_kind FNAT
    protocol {proto}
    laddr_group_name lg{rs(port, check if port == 80 else "")}
}}""" for port, algo, proto in ((80, "wlc", "TCP"), (9000, "rr", "TCP"), (53, "rr", "UDP")))
    return f"""ipvs_defs {{
    conn {{
        <init> conn_pool_size 65536
    }}
    udp {{
        timeout {{
            normal 4
        }}
    }}
    tcp {{
        timeout {{
            established {established}
            syn_recv 4
            fin_wait 4
            close 3
        }}
    }}
}}
local_address_group lg {{
    {LADDR} veth-lb1
}}
{svc}
"""


# TCP echo on :9000 (real servers).
ECHO_SERVER = r"""
import select, signal, socket
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); ls.bind(("0.0.0.0", 9000)); ls.listen(512)
conns, stop = [], [False]
signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
while not stop[0]:
    for s in select.select([ls] + conns, [], [], 0.2)[0]:
        if s is ls:
            conns.append(ls.accept()[0]); continue
        try:
            d = s.recv(65536)
            if d:
                s.sendall(d); continue
        except OSError:
            pass
        conns.remove(s); s.close()
"""

# The client's flows; on SIGTERM a JSON summary to argv[2].
FLOWS_CLIENT = r"""
import json, os, random, select, signal, socket, struct, sys, time
vip, out, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])
random.seed(1)
stop = [False]
signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
def retrans(s):  # tcp_info.tcpi_total_retrans
    try:
        return struct.unpack_from("I", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 100)[0]
    except OSError:
        return -1
class Flow:
    def __init__(self, kind, life, every):
        self.kind, self.every, self.s = kind, every, socket.socket()
        self.opened, self.closed, self.err, self.retrans = time.time(), None, None, None
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.s.settimeout(3); self.s.connect((vip, 9000)); self.s.setblocking(False)
        except OSError as e:
            self.err = f"connect: {e}"
        self.end = self.opened + life if life else None
        self.next, self.buf, self.sent, self.recv, self.stalls, self.maxlat = time.time(), b"", 0, 0, [], 0.0
    def row(self):
        return {"kind": self.kind, "opened": self.opened, "closed": self.closed, "sent": self.sent, "recv": self.recv,
                "maxlat": self.maxlat, "stalls": self.stalls[:20], "err": self.err,
                "retrans": self.retrans if self.retrans is not None else retrans(self.s)}
flows = [Flow("long", None, 0.02) for _ in range(8)] + [Flow("short", random.uniform(2, 12), 0.05) for _ in range(8)]
done = []
us = []
for i in range(4):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 41000 + i)); u.setblocking(False)
    us.append({"s": u, "sent": 0, "ok": 0, "lost": [], "pending": {}, "answers": {}})
next_u = time.time()
while not stop[0]:
    now = time.time()
    for f in flows:
        if not f.err and now >= f.next:
            try:
                f.s.send(f"{f.sent} {now:.6f}".ljust(63).encode() + b"\n"); f.sent += 1
            except BlockingIOError:
                pass
            except OSError as e:
                f.err = f"send at {now:.3f}: {e}"
            f.next = max(f.next + f.every, now)
    if now >= next_u:
        for u in us:
            u["sent"] += 1; u["pending"][u["sent"]] = now; u["s"].sendto(b"q", (vip, 53))
        next_u = max(next_u + 0.02, now)
    ready = select.select([f.s for f in flows if not f.err] + [u["s"] for u in us], [], [], 0.005)[0]
    now = time.time()
    for s in ready:
        f = next((x for x in flows if x.s is s), None)
        if f is None:
            u = next(x for x in us if x["s"] is s)
            try:
                who = " ".join(s.recv(200).decode().split()[:2])  # "<server> <laddr>:<lport>": the flow it is
            except BlockingIOError:
                continue
            a = u["answers"].setdefault(who, [now, now, 0]); a[1] = now; a[2] += 1
            if u["pending"]:
                u["pending"].pop(min(u["pending"])); u["ok"] += 1
            continue
        try:
            d = s.recv(65536)
        except OSError as e:
            f.err = f"recv at {now:.3f}: {e}"; continue
        if not d:
            f.err = f"closed by the peer at {now:.3f}"; continue
        f.buf += d
        while len(f.buf) >= 64:
            m, f.buf = f.buf[:64], f.buf[64:]
            sent_at = float(m.split()[1]); f.recv += 1; f.maxlat = max(f.maxlat, now - sent_at)
            if now - sent_at > slow:
                f.stalls.append((sent_at, now - sent_at))
    for u in us:
        for k, t in list(u["pending"].items()):
            if now - t > 0.5:
                u["lost"].append(t); del u["pending"][k]
    for i, f in enumerate(flows):
        if f.end and (f.err or now >= f.end):
            f.retrans, f.closed = retrans(f.s), now
            f.s.close(); done.append(f.row()); flows[i] = Flow("short", random.uniform(2, 12), 0.05)
for f in flows:
    f.retrans = retrans(f.s)
with open(out, "w") as fo:
    json.dump({"tcp": done + [f.row() for f in flows],
               "udp": [{k: v for k, v in u.items() if k not in ("s", "pending")} for u in us]}, fo)
"""

# Every IPv4 TCP frame on an interface, one line each: time src sport dst dport flags seq ack payload-length.
SNIFFER = r"""
import signal, socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)); s.bind((sys.argv[1], 0))  # ETH_P_ALL: both ways
s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: bursts of connections
s.setsockopt(socket.SOL_SOCKET, 29, 1)  # SO_TIMESTAMP
s.settimeout(0.5)
stop = [False]
signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
with open(sys.argv[2], "w", buffering=1 << 16) as f:
    while not stop[0]:
        try:
            d, anc, _, _ = s.recvmsg(128, 64)
        except (socket.timeout, InterruptedError):
            continue
        ts = next((sum(x * m for x, m in zip(struct.unpack("qq", v[:16]), (1, 1e-6))) for _, t, v in anc if t == 29), 0)
        if len(d) < 54 or d[12:14] != b"\x08\x00" or d[23] != 6:
            continue
        ihl = (d[14] & 15) * 4; l4 = 14 + ihl
        sp, dp, seq, ack, off, fl = struct.unpack("!HHIIBB", d[l4:l4 + 14])
        plen = struct.unpack("!H", d[16:18])[0] - ihl - (off >> 4) * 4
        f.write(f"{ts:.6f} {socket.inet_ntoa(d[26:30])} {sp} {socket.inet_ntoa(d[30:34])} {dp} {fl} {seq} {ack} {plen}\n")
    st = s.getsockopt(263, 6, 8)  # PACKET_STATISTICS: frames, drops
    print("capture drops", struct.unpack("II", st)[1], flush=True)
"""

CURL_LOOP = r"""while :; do t=$EPOCHREALTIME; r=$(curl -s -m 2 http://%s/) && echo "$t ${r%% *}" || echo "$t FAIL"; sleep 0.05; done"""
BIG_LOOP = r"""while :; do t=$EPOCHREALTIME; curl -s -m 120 --limit-rate 400k -o /dev/null http://%s/big && echo "$t ok" || echo "$t FAIL"; done"""


class Run:
    def __init__(self, args):
        self.args = args
        self.lab = TwoArm(prefix=args.prefix or f"rf{secrets.token_hex(2)}", n_servers=2)
        self.events: list[tuple[float, str]] = []
        self.samples: list[tuple[float, dict]] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.nginx: dict[int, Nginx] = {}
        self.names = counter_names()
        self._stop = threading.Event()

    def ev(self, what: str) -> None:
        self.events.append((time.time(), what))
        print(f"[{time.time() - self.events[0][0]:6.1f}s] {what}", flush=True)

    def lb(self, argv, timeout=180, check=True):
        return self.lab.lb_run(argv, check=check, timeout=timeout)

    def call(self, op):
        from hdslb.ctl.client import call

        return call(op, None, path=str(self.lab.ctrl_path))

    def up(self) -> None:
        self.lb(CTL + ["up", "veth-lb0", "veth-lb1", "--xdp-mode", "native", "--pin-root",
                       str(self.lab.pin_dir.parent), "--log-file", str(self.lab.workdir / "hdslbd.log"),
                       "-f", str(self.lab.workdir / "lb.conf"), "--aging-interval", "1"])

    def counters(self) -> dict | None:
        """The fast path's counters straight from the pinned map: readable while no daemon runs."""
        r = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(self.lab.pin_dir / "counters")],
                           capture_output=True, text=True)
        if r.returncode:
            return None
        out = {}
        for e in json.loads(r.stdout):
            if "formatted" in e:
                k, v = e["formatted"]["key"], sum(x["value"] for x in e["formatted"]["values"])
            else:
                k = int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little")
                v = sum(int.from_bytes(bytes(int(b, 16) for b in x["value"]), "little") for x in e["values"])
            if v and k < len(self.names):
                out[self.names[k]] = v
        return out

    def sampler(self) -> None:
        while not self._stop.is_set():
            c = self.counters()
            if c is not None:
                self.samples.append((time.time(), c))
            time.sleep(0.1)

    def spawn(self, name, ns, argv):
        self.procs[name] = self.lab.spawn(ns, argv, log=self.lab.workdir / f"{name}.log")

    def setup(self) -> None:
        lab, w = self.lab, self.lab.workdir
        for i in (1, 2):
            self.nginx[i] = Nginx(lab, i, big_size=4 * 1024 * 1024).start()
            UdpEcho(lab, i).start()
            self.spawn(f"echo{i}", lab.server(i).ns, [sys.executable, "-c", ECHO_SERVER])
        self.lb(["ip", "addr", "add", "192.168.100.250/24", "dev", "veth-lb1"])  # health checks' source
        (w / "lb.conf").write_text(conf_text(self.args.established))
        self.up()
        self.lb(DPIP + ["route", "add", "192.168.100.0/24", "dev", "veth-lb1"])
        self.cps = None
        if shutil.which("gcc"):
            self.cps = w / "cps_loop"
            subprocess.run(["gcc", "-O2", "-o", str(self.cps), str(HERE / "cps_loop.c")], check=True)
        time.sleep(2)  # first health checks
        self.spawn("cap_cl", lab.cl_ns, [sys.executable, "-c", SNIFFER, "eth0", str(w / "cap_cl.txt")])
        self.spawn("cap_sw", lab.sw_ns, [sys.executable, "-c", SNIFFER, "sw-lb1", str(w / "cap_sw.txt")])
        threading.Thread(target=self.sampler, daemon=True).start()
        for ns in [lab.cl_ns] + [s.ns for s in lab.servers]:
            subprocess.run(["ip", "netns", "exec", ns, "nstat", "-n"], check=False)
        time.sleep(1)

    def traffic(self) -> None:
        lab, w = self.lab, self.lab.workdir
        self.ev("traffic starts")
        self.spawn("flows", lab.cl_ns, [sys.executable, "-c", FLOWS_CLIENT, VIP, str(w / "flows.json"), str(SLOW)])
        self.spawn("curl", lab.cl_ns, ["bash", "-c", CURL_LOOP % VIP])
        for i in range(2):
            self.spawn(f"big{i}", lab.cl_ns, ["bash", "-c", BIG_LOOP % VIP])
        time.sleep(self.args.gap)
        for step in filter(None, self.args.steps.split(",")):
            if step == "cps" and self.cps:
                self.ev("cps burst")
                self.lab.client_run([str(self.cps), VIP, "80", "3", "4", "1", "http"], check=False, timeout=60)
            elif step == "reload_dp":
                self.ev("reload --datapath")
                self.lb(CTL + ["reload", "--datapath"])
            elif step == "flap":
                self.ev("nginx rs2 stopped")
                self.nginx[2].stop()
                time.sleep(8)
                self.nginx[2].start()
            self.ev(f"{step} done")
            time.sleep(self.args.gap)
        for _ in range(self.args.kills):
            pid = self.call("daemon.status")["pid"]
            os.kill(pid, signal.SIGKILL)
            self.ev(f"kill -9 {pid}")
            time.sleep(self.args.down)
            self.up()
            self.ev("up (ready)")
            time.sleep(self.args.gap)
        self.ev("traffic stops")
        for name in ("flows", "curl", "big0", "big1"):
            self.lab.stop(self.procs[name], timeout=5)
        time.sleep(1)
        for name in ("cap_cl", "cap_sw"):
            self.lab.stop(self.procs[name], timeout=5)
        self._stop.set()
        self.nstat = {}
        for name, ns in [("client", lab.cl_ns)] + [(s.name, s.ns) for s in lab.servers]:
            r = subprocess.run(["ip", "netns", "exec", ns, "nstat", "-a"], capture_output=True, text=True)
            self.nstat[name] = {ln.split()[0]: int(ln.split()[1]) for ln in r.stdout.splitlines()[1:]
                                if ln.split() and ln.split()[1].isdigit()}

    # -- the report

    def when(self, t: float) -> str:
        last = [(te, w) for te, w in self.events if te <= t]
        return f"{last[-1][1]} +{t - last[-1][0]:.2f}s" if last else "before traffic"

    def windows(self) -> list[tuple[float, float]]:
        kills = [t for t, w in self.events if w.startswith("kill")]
        ups = [t for t, w in self.events if w.startswith("up (ready)")]
        return list(zip(kills, ups))

    def report(self) -> list[str]:
        w, harm = self.lab.workdir, []
        wins = self.windows()
        print("\n== down windows (kill -9 to the new hdslbd ready):", ", ".join(f"{b - a:.1f} s" for a, b in wins))
        print("\n== fast-path drop counters that moved")
        prev = self.samples[0][1] if self.samples else {}
        for t, c in self.samples[1:]:
            d = {k: v - prev.get(k, 0) for k, v in c.items() if k.startswith("drop_") and v != prev.get(k, 0)}
            if d:
                print(f"  {self.when(t):<28} {d}")
                harm.append(f"drops {d} at {self.when(t)}")
            prev = c
        # frames: the client's segments to the VIP, and what the balancer sent on to the servers (FNAT keeps
        # flags, sequence and acknowledgement numbers and the payload, so those match a segment to its copy)
        cl = [ln.split() for ln in open(w / "cap_cl.txt")]
        fwd = collections.Counter(tuple(f[5:9]) for f in (ln.split() for ln in open(w / "cap_sw.txt"))
                                  if f[1] == LADDR)
        first, spurious, lost = {}, 0, []
        for f in cl:
            if f[3] != VIP or (f[8] == "0" and not int(f[5]) & 3):  # only what TCP retransmits (data, SYN, FIN)
                continue
            key = (f[2], f[6], f[5])
            if key not in first:
                first[key] = float(f[0])
                continue
            if fwd[tuple(f[5:9])]:
                spurious += 1
            else:
                lost.append(f)
        print(f"\n== client segments retransmitted: {spurious} with every copy forwarded (spurious: the reply was "
              f"late, not lost), {len(lost)} with none forwarded (dropped by the balancer)")
        for f in lost[:20]:
            print(f"  {self.when(float(f[0])):<28} {f[1]}:{f[2]} -> {f[3]}:{f[4]} flags {int(f[5]):#04x} len {f[8]}, "
                  f"first sent at {self.when(first[(f[2], f[6], f[5])])}")
        if lost:
            harm.append(f"{len(lost)} retransmitted segments never forwarded")
        # the servers' side: their retransmitted segments, and whether each copy reached the client
        sw = [ln.split() for ln in open(w / "cap_sw.txt")]
        to_client = collections.Counter(tuple(f[5:9]) for f in cl if f[1] == VIP)
        seen, s_spurious, s_lost = set(), 0, []
        for f in sw:
            if f[3] != LADDR or (f[8] == "0" and not int(f[5]) & 3):
                continue
            key = (f[1], f[2], f[4], f[6], f[5])
            if key not in seen:
                seen.add(key)
            elif to_client[tuple(f[5:9])]:
                s_spurious += 1
            else:
                s_lost.append(f)
        print(f"== server segments retransmitted: {s_spurious} with every copy delivered to the client, "
              f"{len(s_lost)} with none delivered")
        for f in s_lost[:20]:
            print(f"  {self.when(float(f[0])):<28} {f[1]}:{f[2]} -> {f[3]}:{f[4]} flags {int(f[5]):#04x} len {f[8]}")
        if s_lost:
            harm.append(f"{len(s_lost)} retransmitted server segments never delivered")
        fl = json.loads((w / "flows.json").read_text())

        def inside(t):
            return t is not None and any(a <= t <= b for a, b in wins)

        rows = fl["tcp"]
        groups = {
            "open across a window": [r for r in rows if wins and r["opened"] < wins[0][0]
                                     and (r["closed"] is None or r["closed"] > wins[0][1])],
            "ended inside a window": [r for r in rows if inside(r["closed"])],
            "started inside a window": [r for r in rows if inside(r["opened"])],
            "started < 5 s after a restart": [r for r in rows if any(b < r["opened"] <= b + 5 for _, b in wins)],
            "all": rows,
        }
        print("\n== TCP echo flows        count  errors  stalls  max reply delay  TCP retransmissions (client)")
        for name, rs in groups.items():
            stalls = sum(len(r["stalls"]) for r in rs)
            errs = [r["err"] for r in rs if r["err"]]
            worst = max([r["maxlat"] for r in rs] or [0])
            print(f"  {name:<30} {len(rs):>5} {len(errs):>7} {stalls:>7} {worst:>12.3f} s"
                  f" {sum(max(r['retrans'], 0) for r in rs):>8}")
            if name == "all" and (errs or stalls):
                harm.append(f"TCP echo: errors {errs[:3]}, {stalls} stalls")
        for r in rows:
            for t, lat in r["stalls"][:3]:
                print(f"  stall: {r['kind']} flow, a reply {lat:.3f} s late, sent at {self.when(t)}")
        print("\n== UDP (4 sockets)")
        for u in fl["udp"]:
            print(f"  sent {u['sent']}, answered {u['ok']}, lost {len(u['lost'])}, flows (server laddr:lport) "
                  f"{list(u['answers'])}")
            if u["lost"] or len(u["answers"]) != 1:
                harm.append(f"UDP: {len(u['lost'])} lost, answered as {list(u['answers'])}")
        # a transfer from nginx when it is stopped (a download lasts ~10 s) and a request to it until its health
        # check takes the server out (~1-2 s) fail: expected
        stopped = [t for t, what in self.events if what == "nginx rs2 stopped"]
        for name in ("curl", "big0", "big1"):
            lines = [ln.split() for ln in (w / f"{name}.log").read_text().splitlines() if len(ln.split()) == 2]
            fails = [float(a.replace(",", ".")) for a, b in lines if b == "FAIL"]
            unexpected = [t for t in fails if not any(-12 < t - s < 3 for s in stopped)]
            print(f"== {name}: {len(lines)} requests, {len(fails)} failed ({len(fails) - len(unexpected)} of them "
                  f"around stopping nginx)"
                  + "".join(f"\n  failed: started at {self.when(t)}" for t in fails[:10]))
            if unexpected:
                harm.append(f"{name}: {len(unexpected)} failed")
        print("\n== nstat: " + "; ".join(f"{h} TcpRetransSegs {n.get('TcpRetransSegs', 0)}"
                                         for h, n in self.nstat.items()))
        print("   capture: " + "; ".join(f"{n} {(w / f'{n}.log').read_text().strip() or '?'}"
                                         for n in ("cap_cl", "cap_sw")))
        return harm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.restart_flows", description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=4, help="kill -9 + restart rounds (default 4)")
    ap.add_argument("--down", type=float, default=2, help="seconds between the kill and the restart (default 2)")
    ap.add_argument("--gap", type=float, default=15, help="seconds of traffic between events (default 15)")
    ap.add_argument("--established", type=int, default=30,
                    help="TCP established timeout (default 30: above the downloads' idle tail, see bench/soak.py)")
    ap.add_argument("--steps", default="", help="events before the kills: cps,reload_dp,flap")
    ap.add_argument("--prefix", help="the lab's namespace prefix (default rf + 4 random hex digits)")
    args = ap.parse_args(argv)
    r = Run(args)

    def _stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    harm = ["not run"]
    try:
        r.lab.setup()
        r.setup()
        r.traffic()
        harm = r.report()
    finally:
        r._stop.set()
        try:
            r.lb(CTL + ["down", "--pin-root", str(r.lab.pin_dir.parent)], check=False, timeout=60)
        finally:
            r.lab.teardown()
    print("\nrestart_flows: " + ("no flow harmed" if not harm else "HARMED\n  " + "\n  ".join(harm)))
    return 1 if harm else 0


if __name__ == "__main__":
    sys.exit(main())
