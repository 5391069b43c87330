"""Soak: hdslbd in a two-arm netns lab under constant traffic and churn, observed, then checked for invariants.

    python -m bench.soak [--duration 600] [--interval 5] [--servers 3] [--keep]     (root; `make soak`)

Traffic (client namespace, all at once): a curl loop of short HTTP requests, short bursts of bench/cps_loop,
two rate-limited /big downloads in a loop (checked by sha256), a UDP request/response client on four
source ports, a second curl loop to a service that comes and goes, and a ping to the VIP.
Churn (one step every few seconds, in a fixed cycle): ipvsadm services and real servers added and removed,
weight changes and drains, REST adds and deletes, a server stopped and started (its health check flaps),
`hdslb-ctl reload` of an edited config, `reload --datapath`, `ipvsadm -Z`, and `kill -9` + restart (each into the
other `--conn-table`, so the pinned connections are copied into a table of the other kind under the churn).
Observation every --interval seconds: RSS, fds, asyncio tasks when exposed, connection entries, neighbour
table size, drops by reason, health states against which servers run, ActiveConn/InActConn against the
established connections the servers really have, warnings/errors/tracebacks in the log.
After the traffic stops and the (shortened) timeouts pass, the invariants below are checked; exit 1 when one fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from hdslb.lab import netns as nx
from hdslb.lab.servers import Nginx, UdpEcho
from hdslb.lab.topology import TwoArm

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
VIP = "10.0.0.100"
LADDR = "192.168.100.254"
KNI_ADDR = "192.168.100.250/24"  # the LB's kernel address for health checks (DPVS's KNI)
# Short timeouts so the table drains within the soak (seconds).
TCP_EST, TCP_FIN, TCP_SYN, TCP_CLOSE, UDP_NORMAL = 8, 4, 4, 3, 4
DRAIN_WAIT = TCP_EST + 12
# Drops the churn explains: new flows while a service has no server that takes them (every server of the
# flapped/drained set out at once, or the service just removed), and TCP segments of flows whose entries a
# removal or the short timeouts took away. The drop_no_conn of the soak runs were that, one client FIN at a time,
# not the restarts they sometimes followed (captured on both sides of the balancer: 9 kill -9 restarts under
# traffic dropped nothing): a /big download whose whole body landed in the socket buffer at once sits idle while
# curl's --limit-rate pays it out (up to ~10 s, past TCP_EST), the sweep expires it, and its FIN is dropped with
# its 9 retransmissions (backoff from 0.2 s: 7 drops within 7 s, then one at about +13, +27 and +55 s).
# drop_no_laddr: the ipvsadm service is built line by line as an operator does (-A, -a, then --add-laddr), and a
# SYN of the curl loop aimed at it can arrive between the -a and the --add-laddr.
EXPLAINED_DROPS = {"drop_no_dest", "drop_no_conn", "drop_no_laddr"}


def tool(name: str, module: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


CTL, IPVSADM, DPIP = tool("hdslb-ctl", "cli.hdslb_ctl"), tool("ipvsadm", "cli.ipvsadm"), tool("dpip", "cli.dpip")


def conf_text(n_servers: int, variant: int) -> str:
    """The config file; variant 1 changes weights and adds a service on :8080 (what `reload` swings between)."""
    rs = []
    for i in range(1, n_servers + 1):
        w = (i if variant else 1)
        rs.append(f"""
    real_server 192.168.100.{i + 1} 80 {{
        weight {w}
        TCP_CHECK {{
            connect_timeout 1
            retry 1
            delay_before_retry 0.5
        }}
    }}""")
    udp_rs = "".join(f"""
    real_server 192.168.100.{i + 1} 53 {{
        weight 1
    }}""" for i in range(1, n_servers + 1))
    extra = ""
    if variant:
        extra = f"""
virtual_server {VIP} 8080 {{
    lb_algo rr
    lb_kind FNAT
    protocol TCP
    laddr_group_name lg
    real_server 192.168.100.2 80 {{
        weight 1
    }}
}}
"""
    return f"""! soak config, variant {variant}
global_defs {{
    log_level INFO
}}
ipvs_defs {{
    conn {{
        <init> conn_pool_size 65536
    }}
    udp {{
        timeout {{
            normal {UDP_NORMAL}
        }}
    }}
    tcp {{
        timeout {{
            established {TCP_EST}
            syn_recv {TCP_SYN}
            fin_wait {TCP_FIN}
            close {TCP_CLOSE}
        }}
    }}
}}
local_address_group lg {{
    {LADDR} veth-lb1
}}
virtual_server {VIP} 80 {{
    delay_loop 1
    lb_algo wlc
    lb_kind FNAT
    protocol TCP
    laddr_group_name lg{''.join(rs)}
}}
virtual_server {VIP} 53 {{
    lb_algo rr
    lb_kind FNAT
    protocol UDP
    laddr_group_name lg{udp_rs}
}}
{extra}"""


UDP_CLIENT = r"""
import json, socket, sys, time, collections
vip, out, n = sys.argv[1], sys.argv[2], 4
socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 40000 + i)); s.settimeout(1.0)
    socks.append(s)
st = {"sent": 0, "ok": 0, "lost": 0, "by": collections.Counter()}
stop = False
import signal
def _t(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, _t)
last = 0
while not stop:
    for s in socks:
        st["sent"] += 1
        s.sendto(b"q", (vip, 53))
        try:
            d = s.recv(200).decode().split()
            st["ok"] += 1; st["by"][d[0]] += 1
        except OSError:
            st["lost"] += 1
    if time.time() - last > 2:
        with open(out + ".tmp", "w") as f: json.dump(st, f)
        import os; os.replace(out + ".tmp", out); last = time.time()
    time.sleep(0.2)
with open(out, "w") as f: json.dump(st, f)
"""

PING_CLIENT = r"""
import json, os, signal, socket, struct, sys, time
vip, out = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(1.0)
ident, st, stop = os.getpid() & 0xFFFF, {"sent": 0, "ok": 0}, [False]
signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
def csum(b):
    n = sum(struct.unpack("!%dH" % (len(b) // 2), b)); n = (n >> 16) + (n & 0xFFFF); n += n >> 16
    return ~n & 0xFFFF
seq = 0
while not stop[0]:
    seq = (seq + 1) & 0xFFFF
    h = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"soak" * 8
    s.sendto(struct.pack("!BBHHH", 8, 0, csum(h), ident, seq) + b"soak" * 8, (vip, 0)); st["sent"] += 1
    end = time.time() + 1
    while time.time() < end:
        try:
            d = s.recv(2048)
        except OSError:
            break
        t, _, _, i, q = struct.unpack("!BBHHH", d[20:28])
        if t == 0 and i == ident and q == seq:
            st["ok"] += 1; break
    with open(out + ".tmp", "w") as f: json.dump(st, f)
    os.replace(out + ".tmp", out)
    time.sleep(0.5)
"""

CURL_LOOP = r"""
# short HTTP requests, one line per request: "<server>" or FAIL
while :; do t=$EPOCHREALTIME; r=$(curl -s -m 2 {url}) && echo "$t ${{r%% *}}" || echo "$t FAIL"; sleep {pause}; done
"""

BIG_LOOP = r"""
# rate-limited downloads of /big, one line per transfer: its start, then its sha256 or FAIL <curl status>
while :; do
  echo -n "$EPOCHREALTIME "
  curl -s -m 120 --limit-rate {rate} -o {out} http://{vip}/big; rc=$?
  if [ $rc = 0 ]; then sha256sum {out} | cut -c1-64; else echo "FAIL $rc"; fi
done
"""


class Soak:
    def __init__(self, args):
        self.args = args
        self.lab = TwoArm(prefix=f"sk{secrets.token_hex(2)}", n_servers=args.servers)
        self.obs: list[dict] = []
        self.events: list[tuple[float, str, str, float]] = []  # (t done, action, result, t started)
        self.failures: list[str] = []
        self.t0 = time.monotonic()
        self.epoch0 = time.time()
        self.restarts: list[float] = []  # t of every restart of hdslbd
        self.conn_table = "percpu"  # each kill -9 restart asks for the other kind: the connections are copied over
        self.variant = 0
        self.nginx: dict[int, Nginx] = {}
        self.traffic: dict[str, subprocess.Popen] = {}
        self.churn_svc = False  # the ipvsadm service :81 exists
        self.rest_svc = False  # the REST service :82 exists

    # -- helpers

    @property
    def t(self) -> float:
        return time.monotonic() - self.t0

    def run(self, argv, check=False, timeout=60):
        r = self.lab.lb_run(argv, check=False, timeout=timeout)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(map(str, argv))}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def call(self, op, args=None, timeout=30.0):
        from hdslb.ctl.client import call

        return call(op, args, path=str(self.lab.ctrl_path), timeout=timeout)

    def rest(self, method, path, body=None):
        argv = ["curl", "-s", "-m", "10", "-o", "-", "-w", "\n%{http_code}", "-X", method,
                f"http://127.0.0.1:53225{path}"]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        r = self.run(argv, timeout=20)
        body_s, _, code = r.stdout.rpartition("\n")
        return int(code or 0), body_s

    @property
    def log_path(self) -> Path:
        return self.lab.workdir / "hdslbd.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def event(self, what: str, result: str = "ok", started: float | None = None) -> None:
        self.events.append((self.t, what, result, self.t if started is None else started))
        print(f"[{self.t:6.1f}s] {what}: {result}", flush=True)

    # -- setup

    def up(self) -> None:
        self.run(CTL + ["up", "veth-lb0", "veth-lb1", "--xdp-mode", "native", "--pin-root",
                        str(self.lab.pin_dir.parent), "--log-file", str(self.log_path), "-f", str(self.conf),
                        "--aging-interval", "1", "--conn-table", self.conn_table], check=True, timeout=180)

    def setup(self) -> None:
        lab = self.lab
        lab.setup()
        for i in range(1, self.args.servers + 1):
            self.nginx[i] = Nginx(lab, i, big_size=4 * 1024 * 1024).start()
            UdpEcho(lab, i).start()
        lab.lb_run(["ip", "addr", "add", KNI_ADDR, "dev", "veth-lb1"])
        self.conf = lab.workdir / "soak.conf"
        self.conf.write_text(conf_text(self.args.servers, 0))
        self.up()
        self.run(DPIP + ["route", "add", "192.168.100.0/24", "dev", "veth-lb1"], check=True)
        time.sleep(3)  # first health checks
        cps = HERE / "cps_loop.c"
        self.cps = lab.workdir / "cps_loop"
        if shutil.which("gcc") and cps.exists():
            subprocess.run(["gcc", "-O2", "-o", str(self.cps), str(cps)], check=True)
        else:
            self.cps = None

    def start_traffic(self) -> None:
        lab, w = self.lab, self.lab.workdir

        def bg(name, argv):
            p = lab.spawn(lab.cl_ns, argv, log=w / f"traffic-{name}.log")
            self.traffic[name] = p

        bg("http", ["bash", "-c", CURL_LOOP.format(url=f"http://{VIP}/", pause=0.05)])
        bg("churnsvc", ["bash", "-c", CURL_LOOP.format(url=f"http://{VIP}:81/", pause=0.3)])
        for i in range(2):
            bg(f"big{i}", ["bash", "-c", BIG_LOOP.format(rate="400k", out=w / f"big{i}.out", vip=VIP)])
        bg("udp", [sys.executable, "-c", UDP_CLIENT, VIP, str(w / "udp.json")])
        bg("ping", [sys.executable, "-c", PING_CLIENT, VIP, str(w / "ping.json")])

    def stop_traffic(self) -> None:
        for p in self.traffic.values():
            self.lab.stop(p, timeout=5)

    def cps_burst(self) -> str:
        if not self.cps:
            return "skipped (no gcc)"
        r = self.lab.client_run([str(self.cps), VIP, "80", "3", "4", "1", "http"], check=False, timeout=30)
        return r.stdout.strip() or r.stderr.strip()[:100]

    # -- churn steps

    def steps(self):
        n = self.args.servers
        rs = [f"192.168.100.{i + 1}" for i in range(1, n + 1)]
        svc80 = ["-t", f"{VIP}:80"]
        svc81 = ["-t", f"{VIP}:81"]

        def ipv(*a):
            r = self.run(IPVSADM + list(a))
            return "ok" if r.returncode == 0 else f"exit {r.returncode}: {r.stderr.strip()[:120]}"

        def add_churn_svc():
            out = [ipv("-A", *svc81, "-s", "wrr")]
            out += [ipv("-a", *svc81, "-r", f"{a}:80", "-b", "-w", "2") for a in rs]
            out.append(ipv("--add-laddr", "-z", LADDR, *svc81, "-F", "veth-lb1"))
            self.churn_svc = True
            return ",".join(out)

        def del_churn_rs():
            return ipv("-d", *svc81, "-r", f"{rs[-1]}:80")

        def readd_churn_rs():
            return ipv("-a", *svc81, "-r", f"{rs[-1]}:80", "-b", "-w", "1")

        def weights():
            return ",".join(ipv("-e", *svc81, "-r", f"{a}:80", "-b", "-w", str(w + 1)) for w, a in enumerate(rs))

        def drain():
            return ipv("-e", *svc81, "-r", f"{rs[0]}:80", "-b", "-w", "0")

        def undrain():
            return ipv("-e", *svc81, "-r", f"{rs[0]}:80", "-b", "-w", "2")

        def del_churn_svc():
            self.churn_svc = False
            return ipv("-D", *svc81)

        def rest_add():
            code, body = self.rest("POST", "/v2/vs", {"Addr": VIP, "Port": 82, "Proto": "TCP", "SchedName": "rr"})
            c2, b2 = self.rest("PUT", f"/v2/vs/{VIP}-82-tcp/rs",
                               {"Items": [{"ip": a, "port": 80, "weight": 1, "mode": "FNAT"} for a in rs]})
            c3, b3 = self.rest("PUT", f"/v2/vs/{VIP}-82-tcp/laddr", {"addr": LADDR, "device": "veth-lb1"})
            self.rest_svc = True
            return f"{code} {c2} {c3}" + ("" if code < 300 and c2 < 300 and c3 < 300 else f" {body[:80]} {b2[:80]} {b3[:80]}")

        def rest_del_rs():
            code, body = self.rest("DELETE", f"/v2/vs/{VIP}-82-tcp/rs", {"Items": [{"ip": rs[0], "port": 80}]})
            return f"{code}" + ("" if code < 300 else f" {body[:120]}")

        def rest_del():
            code, body = self.rest("DELETE", f"/v2/vs/{VIP}-82-tcp")
            self.rest_svc = False
            return f"{code}" + ("" if code < 300 else f" {body[:120]}")

        def flap_down():
            self.nginx[n].stop()
            return f"nginx rs{n} stopped"

        def flap_up():
            self.nginx[n].start()
            return f"nginx rs{n} started"

        def reload():
            self.variant ^= 1
            self.conf.write_text(conf_text(n, self.variant))
            r = self.run(CTL + ["reload"])
            return f"variant {self.variant}: " + ("ok" if r.returncode == 0 else f"exit {r.returncode} {r.stderr.strip()[:120]}")

        def reload_dp():
            r = self.run(CTL + ["reload", "--datapath"], timeout=120)
            return "ok" if r.returncode == 0 else f"exit {r.returncode} {r.stderr.strip()[:120]}"

        def zero():
            return ipv("-Z")

        def kill9():
            pid = self.call("daemon.status")["pid"]
            os.kill(pid, signal.SIGKILL)
            time.sleep(2)
            self.conn_table = "shared" if self.conn_table == "percpu" else "percpu"
            self.up()
            self.restarts.append(self.t)
            table = self.call("stats.get")["conn_table"]
            copied = re.findall(r"(\d+) entries copied into the new \w+ tables (before|after) attaching",
                                self.log_text())[-2:]
            return (f"killed {pid}, now {self.call('daemon.status')['pid']} with a {table['kind']} table "
                    f"(asked {self.conn_table}; entries copied: {', '.join(f'{n} {w}' for n, w in copied)})")

        cycle = [add_churn_svc, weights, rest_add, flap_down, drain, reload, del_churn_rs, zero, flap_up,
                 rest_del_rs, undrain, readd_churn_rs, reload_dp, self.cps_burst, reload, rest_del, del_churn_svc]
        return cycle, kill9

    # -- observation

    def established_on_servers(self) -> int:
        n = 0
        for i in range(1, self.args.servers + 1):
            r = self.lab.server_run(i, ["ss", "-Htn", "state", "established", "( sport = :80 )"], check=False)
            n += len([ln for ln in r.stdout.splitlines() if ln.strip()])
        return n

    def observe(self) -> dict:
        o: dict = {"t": round(self.t), "at": self.t}  # at: when it began, unrounded (see invariants' RSS check)
        try:
            st = self.call("daemon.status")
            pid = st["pid"]
            o["pid"] = pid
            status = Path(f"/proc/{pid}/status").read_text()
            o["rss_kb"] = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
            o["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
            o["threads"] = int(re.search(r"Threads:\s+(\d+)", status).group(1))
            o["tasks"] = st.get("asyncio_tasks", st.get("tasks"))
            stats = self.call("stats.get")
            o["conns"] = _conn_entries(stats)
            neigh = (stats.get("slowpath") or {}).get("neigh") or {}
            o["neigh"] = neigh.get("entries", neigh.get("size"))
            o["drops"] = {k: v for k, v in stats["counters"].items() if k.startswith("drop_") and v}
            hl = self.call("health.list")
            states = _health_states(hl)
            o["health"] = _health_summary(states)
            # health against reality: a checked server whose nginx runs shown down, or stopped shown up
            o["hc_wrong"] = sorted(a.split(".")[-1] for a, st in states.items()
                                   if (st == "up") != self.nginx[int(a.split(".")[-1]) - 1].running())
            svcs = self.call("service.list")["services"]
            o["active"] = sum(d["active"] for s in svcs
                              if s.get("proto") == "tcp" for d in s.get("dests", []))
            o["inact"] = sum(d["inactive"] for s in svcs
                             if s.get("proto") == "tcp" for d in s.get("dests", []))
        except Exception as e:  # a daemon restarting: the row says so
            o["error"] = f"{type(e).__name__}: {e}"[:100]
        o["ss_est"] = self.established_on_servers()
        log = self.log_text()
        o["warn"] = len(re.findall(r" WARNING ", log))
        o["err"] = len(re.findall(r" (?:ERROR|CRITICAL) ", log))
        o["tb"] = log.count("Traceback")
        o["running"] = [i for i, s in self.nginx.items() if s.running()]
        self.obs.append(o)
        print(f"[{self.t:6.1f}s] obs " + json.dumps({k: v for k, v in o.items() if k not in ("drops", "at")}),
              flush=True)
        return o

    # -- main loop

    def soak(self) -> None:
        cycle, kill9 = self.steps()
        dur = self.args.duration
        kills = [dur * (i + 1) / (self.args.kills + 1) for i in range(self.args.kills)]
        next_obs = next_step = self.t
        i = 0
        while self.t < dur:
            if kills and self.t >= kills[0]:
                kills.pop(0)
                t = self.t
                self.event("kill -9 + restart", self._try(kill9), t)
            if self.t >= next_step:
                step = cycle[i % len(cycle)]
                i += 1
                t = self.t
                self.event(step.__name__, self._try(step), t)
                next_step = self.t + self.args.step
            if self.t >= next_obs:
                self.observe()
                next_obs = self.t + self.args.interval
            time.sleep(0.5)
        # leave the lab whole: every server running, the drained one back, the churned services gone
        if not self.nginx[self.args.servers].running():
            self.nginx[self.args.servers].start()
        self.run(IPVSADM + ["-D", "-t", f"{VIP}:81"])
        self.rest("DELETE", f"/v2/vs/{VIP}-82-tcp")
        self.event("churn over", "every server running, churn services removed")

    def _try(self, fn) -> str:
        try:
            return str(fn())
        except Exception as e:
            return f"EXC {type(e).__name__}: {e}"[:200]

    # -- invariants

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True)
        if not ok:
            self.failures.append(f"{name}: {detail}")

    def final(self) -> None:
        print("\n== after the churn: final traffic round, then the timeouts", flush=True)
        time.sleep(4)  # health checks see the restarted server
        r = self.lab.client_run(["bash", "-c", f"for i in $(seq 60); do curl -s -m 2 http://{VIP}/ || echo FAIL; done"],
                                check=False, timeout=300)
        answered = [ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()]
        self.stop_traffic()
        stats0 = self.call("stats.get")
        time.sleep(DRAIN_WAIT)
        o = self.observe()
        print("\n== invariants", flush=True)
        names = {f"rs{i}" for i in range(1, self.args.servers + 1)}
        self.check("every server that is up gets traffic", set(answered) == names and "FAIL" not in answered,
                   f"answered by {sorted(set(answered))}, {answered.count('FAIL')} FAIL")
        self.check("conn entries back to ~0 after the timeouts", o.get("conns", 99) <= 2,
                   f"{o.get('conns')} entries {DRAIN_WAIT}s after the traffic stopped")
        self.check("ActiveConn+InActConn back to 0", o.get("active", 1) + o.get("inact", 1) == 0,
                   f"ActiveConn {o.get('active')} InActConn {o.get('inact')}")
        drops = o.get("drops", {})
        unexplained = {k: v for k, v in drops.items() if k not in EXPLAINED_DROPS}
        self.check("no unexplained drops", not unexplained, f"all drops {drops}")
        # fds flat since the last restart has warmed up; RSS compared where the heap was just trimmed (right after
        # each datapath reload: the connection bursts between make it swing by tens of MiB), else first to last
        since = self.restarts[-1] + 30 if self.restarts else 30
        rows = [x for x in self.obs if x["t"] >= since and "rss_kb" in x and x.get("pid") == o.get("pid")]
        if len(rows) >= 4:
            fd0, fd1 = rows[0]["fds"], rows[-1]["fds"]
            self.check("open fds flat", fd1 - fd0 <= 2, f"{fd0} -> {fd1} over {rows[-1]['t'] - rows[0]['t']} s")
        else:
            self.check("open fds flat", False, "too few observations since the last restart")
        last_start = self.restarts[-1] if self.restarts else 0
        trimmed = []
        for done, what, _, _ in self.events:
            if what == "reload_dp" and done >= last_start:
                # the first observation begun after the reload ended: compared by the rounded "t", the one taken
                # at 574.4 s after a reload done at 574.3 s was passed over for the next, inside a connection
                # burst (252 against 231 MiB), and the check failed on a heap that had not grown
                after = next((x for x in self.obs if x.get("at", x["t"]) >= done and "rss_kb" in x), None)
                if after is not None and after.get("pid") == o.get("pid"):
                    trimmed.append(after["rss_kb"])
        if len(trimmed) >= 2:
            self.check("RSS flat after each datapath reload", trimmed[-1] - trimmed[0] <= 24 * 1024,
                       " -> ".join(f"{r // 1024}" for r in trimmed) + " MiB")
        elif len(rows) >= 4:
            rss0, rss1 = rows[0]["rss_kb"], rows[-1]["rss_kb"]
            self.check("RSS flat", rss1 - rss0 <= 32 * 1024, f"{rss0 // 1024} -> {rss1 // 1024} MiB")
        else:
            self.check("RSS flat", False, "too few observations since the last restart")
        self.check("no tracebacks in the log", o.get("tb", 1) == 0, f"{o.get('tb')} tracebacks")
        self.check("health checks match which servers run (end)", not o.get("hc_wrong", ["?"]),
                   f"mismatched: {o.get('hc_wrong')}")
        stuck = [b["t"] for a, b in zip(self.obs, self.obs[1:]) if a.get("hc_wrong") and b.get("hc_wrong")
                 and set(a["hc_wrong"]) & set(b["hc_wrong"]) and b["t"] - a["t"] >= 4]
        self.check("no health state wrong for two observations in a row", not stuck, f"at t={stuck}")
        self.counters_consistent()
        self.model_saved()
        self.traffic_summary()

    def counters_consistent(self) -> None:
        svcs = self.call("service.list")["services"]
        ipv = self.run(IPVSADM + ["-Ln", "--stats"]).stdout
        code, rest = self.rest("GET", "/v2/stats")
        code_m, metrics = self.rest("GET", "/metrics")
        bad = []
        ipv_conns = {}
        for ln in ipv.splitlines():
            m = re.match(r"(TCP|UDP)\s+(\S+):(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", ln)
            if m:
                ipv_conns[(m.group(1).lower(), m.group(2), int(m.group(3)))] = int(m.group(4))
        met = {}
        for ln in metrics.splitlines():
            m = re.match(r'hdslb_connections_total\{([^}]*)\}\s+(\S+)', ln)
            if m:
                met[m.group(1)] = float(m.group(2))
        for s in svcs:
            key = (s.get("proto"), s.get("addr"), s.get("port"))
            conns = (s.get("stats") or {}).get("conns")
            if key in ipv_conns and conns is not None and ipv_conns[key] != conns:
                bad.append(f"{key}: ipvsadm {ipv_conns[key]} ctl {conns}")
            lab = [v for k, v in met.items() if f'{s.get("addr")}' in k and f'{s.get("port")}' in k
                   and str(s.get("proto")) in k.lower()]
            if conns is not None and lab and int(lab[0]) != conns:
                bad.append(f"{key}: metrics {lab[0]} ctl {conns}")
        try:
            # REST first, the control op after: health checks and ARP keep rx/verdict/pass counters moving, so
            # those may only have grown; drops and connection events must be equal (no traffic any more)
            rc = json.loads(rest).get("counters", {})
            cc = self.call("stats.get")["counters"]
            diff = {k: (rc.get(k), v) for k, v in cc.items()
                    if (rc.get(k) != v if k.startswith(("drop_", "conn_")) else (rc.get(k) or 0) > v)}
            if diff:
                bad.append(f"REST /v2/stats vs stats.get counters differ: {diff}")
            fp = {m.group(1): float(m.group(2)) for m in
                  re.finditer(r'hdslb_fastpath_packets_total\{reason="(drop_\w+)"\}\s+(\S+)', metrics)}
            mdiff = {k: (fp.get(k, 0), v) for k, v in cc.items() if k.startswith("drop_") and int(fp.get(k, 0)) != v}
            if mdiff:
                bad.append(f"/metrics vs stats.get drops differ: {mdiff}")
        except ValueError:
            bad.append(f"/v2/stats not JSON (HTTP {code})")
        self.check("counters consistent (ipvsadm --stats, REST, /metrics)", not bad and bool(ipv_conns) and bool(met),
                   "; ".join(bad) or f"{len(ipv_conns)} services compared")

    def model_saved(self) -> None:
        import msgpack

        path = Path("/run/hdslb/state") / (self.lab.ctrl_path.stem + ".state")
        st = self.call("daemon.status")
        path = Path(st.get("state_file") or path)
        time.sleep(2)  # a coalesced save
        try:
            snap = msgpack.unpackb(path.read_bytes(), raw=False)
        except OSError as e:
            self.check("saved model equals the running one", False, f"{path}: {e}")
            return
        running = _model(self.call("service.list")["services"])
        saved = _model(snap["services"])
        diff = set(running) ^ set(saved)
        self.check("saved model equals the running one (services, real servers, weights, laddrs)", not diff,
                   f"only running: {sorted(set(running) - set(saved))[:5]} only saved: {sorted(set(saved) - set(running))[:5]}")

    def traffic_summary(self) -> None:
        w = self.lab.workdir
        print("\n== traffic", flush=True)
        for name in ("http", "churnsvc"):
            rows = [ln.split() for ln in (w / f"traffic-{name}.log").read_text(errors="replace").splitlines()]
            rows = [r for r in rows if len(r) == 2]
            lines = [r[1] for r in rows]
            print(f"  {name}: {len(lines)} requests, {lines.count('FAIL')} failed, by server "
                  f"{ {k: lines.count(k) for k in sorted(set(lines)) if k != 'FAIL'} }")
            fails = [float(r[0].replace(",", ".")) - self.epoch0 for r in rows if r[1] == "FAIL"]
            print(f"    failures by the churn step just before them: {self.attribute(fails)}")
            at_restart = [t for t in fails if self.attribute([t]).get("kill -9 + restart")]
            if at_restart:  # a restart must lose nothing: when, against the restarts' events above
                print(f"    those around a kill -9 + restart at t = {[round(t, 1) for t in at_restart]}")
        want = hashlib.sha256(b"".join([self.nginx[1].big_sha256.encode()])).hexdigest()  # noqa: F841
        for i in range(2):
            rows = [ln.split(None, 1) for ln in (w / f"traffic-big{i}.log").read_text(errors="replace").splitlines()]
            rows = [r for r in rows if len(r) == 2]
            bad = [(float(r[0].replace(",", ".")) - self.epoch0, r[1]) for r in rows if r[1] != self.nginx[1].big_sha256]
            print(f"  big{i}: {len(rows)} transfers, {len(rows) - len(bad)} intact, others "
                  f"{[f'{t:.0f}s {why}' for t, why in bad]} by the churn step before they started: "
                  f"{self.attribute([t for t, _ in bad])}")
        try:
            u = json.loads((w / "udp.json").read_text())
            print(f"  udp: sent {u['sent']}, answered {u['ok']}, lost {u['lost']}, by {u['by']}")
        except (OSError, ValueError):
            print("  udp: no summary")
        try:
            u = json.loads((w / "ping.json").read_text())
            print(f"  ping: sent {u['sent']}, answered {u['ok']}")
        except (OSError, ValueError):
            print("  ping: no summary")
        print("\n== churn events")
        for t, what, res, _ in self.events:
            print(f"  {t:6.1f}s {what:<16} {res}")

    def attribute(self, times: list[float]) -> dict:
        """{churn step: how many of times fell from its start to 6 s after its end}; 'none' for the rest."""
        out: dict = {}
        for t in times:
            near = [what for done, what, _, start in self.events if start - 0.5 <= t <= done + 6]
            k = near[-1] if near else "none"
            out[k] = out.get(k, 0) + 1
        return out

    def table(self) -> None:
        print("\n== observations")
        hdr = f"{'t':>5} {'pid':>7} {'rss MiB':>7} {'fds':>4} {'thr':>3} {'tasks':>5} {'conns':>6} {'neigh':>5} " \
              f"{'act':>4} {'inact':>5} {'ss_est':>6} {'warn':>4} {'err':>3} {'tb':>2}  {'health':<12} {'hc≠':<5} drops (cumulative)"
        print(hdr)
        for o in self.obs:
            if "error" in o:
                print(f"{o['t']:>5} {o['error']}")
                continue
            print(f"{o['t']:>5} {o['pid']:>7} {o['rss_kb'] / 1024:>7.1f} {o['fds']:>4} {o['threads']:>3} "
                  f"{str(o['tasks']):>5} {o['conns']:>6} {str(o['neigh']):>5} {o['active']:>4} {o['inact']:>5} "
                  f"{o['ss_est']:>6} {o['warn']:>4} {o['err']:>3} {o['tb']:>2}  {o['health']:<12} {','.join(o['hc_wrong']) or '-':<5} {o['drops']}")


def _conn_entries(stats: dict) -> int:
    for k in ("conn_entries", "conns"):
        if isinstance(stats.get(k), int):
            return stats[k]
    ct = stats.get("conn_table") or {}
    if isinstance(ct, dict):
        if isinstance(ct.get("entries"), int):
            return ct["entries"]
        return sum(v.get("entries", 0) for v in ct.values() if isinstance(v, dict))
    return -1


def _health_states(hl) -> dict:
    """{real server address: 'up'|'down'} over every checked service (a server down anywhere is down)."""
    out: dict = {}
    for svc in (hl.get("health") or {}).values():
        for rs, st in (svc.get("real_servers") or {}).items():
            a = rs.rsplit(":", 1)[0]
            if out.get(a) != "down":
                out[a] = st.get("state")
    return out


def _health_summary(states: dict) -> str:
    return "".join(f"{a.split('.')[-1]}{'U' if st == 'up' else 'D'} " for a, st in sorted(states.items())).strip()


def _model(services) -> list[tuple]:
    rows = []
    for s in services:
        key = (s.get("proto"), s.get("addr"), s.get("port"), s.get("sched"))
        rows.append(key)
        for d in s.get("dests", []):
            h = d.get("health")
            rows.append(key + ("rs", d.get("addr"), d.get("port"), d.get("weight"), d.get("fwd", d.get("mode")),
                               h.get("state") if isinstance(h, dict) else h))
        for la in s.get("laddrs", []):
            rows.append(key + ("laddr", la.get("addr"), la.get("ifname")))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600, help="seconds of traffic and churn (default 600)")
    ap.add_argument("--interval", type=float, default=5, help="seconds between observations (default 5)")
    ap.add_argument("--step", type=float, default=4, help="seconds between churn steps (default 4)")
    ap.add_argument("--servers", type=int, default=3)
    ap.add_argument("--kills", type=int, default=2, help="kill -9 + restarts, evenly spread (default 2)")
    args = ap.parse_args(argv)
    s = Soak(args)

    def _stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        s.setup()
        s.start_traffic()
        s.soak()
        s.final()
    except KeyboardInterrupt:
        s.failures.append("interrupted")
    except Exception as e:
        s.failures.append(f"harness: {type(e).__name__}: {e}")
        import traceback

        traceback.print_exc()
    finally:
        try:
            s.table()
        except Exception:
            pass
        log = s.log_text()
        tbs = [m.start() for m in re.finditer("Traceback", log)]
        for p in tbs[:3]:
            print("\n== log traceback\n" + log[max(0, p - 300):p + 2500])
        keep = Path(os.environ.get("SOAK_KEEP", "/tmp")) / f"{s.lab.prefix}-hdslbd.log"
        try:
            keep.write_text(log)
            print(f"\nlog kept in {keep}")
        except OSError:
            pass
        try:
            s.run(CTL + ["down"], timeout=60)
        finally:
            s.lab.teardown()
    print("\nsoak: " + ("OK" if not s.failures else "FAILED\n  " + "\n  ".join(s.failures)))
    return 0 if not s.failures else 1


if __name__ == "__main__":
    sys.exit(main())
