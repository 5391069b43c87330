"""Health checking at scale: thousands of real servers checked by hdslb's HealthManager with the real probes.

    python -m bench.health_scale                           # 5000 TCP_CHECKs, half blackholed (root, ~1 min)
    python -m bench.health_scale --kind http --servers 2000 --blackholed 0.2
    python -m bench.health_scale --max-concurrent 256      # the bound hdslb had before (see README, Health checks)

What runs: a network namespace `hc-hs-<pid>` whose loopback owns 10.99.0.0/16 (a `local` route: every address in it
is this host's), one asyncio server in it on port 80 that answers a TCP_CHECK (accept, close) and an HTTP_GET
(`HTTP/1.0 200 OK`), and an nftables rule that silently drops SYNs to 10.99.128.0/17: those real servers are
blackholed (every probe to one runs into connect_timeout). The checker process runs in the namespace too: a config
text with one virtual_server and N real_server blocks is loaded as the daemon loads it, and a HealthManager checks
them with the probes hdslbd uses (hdslb.health.run_check), wrapped only to time each probe. --kind misc runs a
MISC_CHECK per server instead: /bin/true, or for a "blackholed" one a sleep that misc_timeout (= --connect-timeout)
kills.

What is measured, in the checker process while it checks for --seconds:
  - first round: time from start until every checker has finished its first probe (the checks are spread over
    delay_loop by the random first delay, so the floor is about delay_loop + connect_timeout);
  - late: for answering servers, how much later than "previous probe's end + delay_loop" each probe started (the
    time it waited for a free probe slot); p50/p99/max in seconds;
  - loop lag: a ticker that wants to run every 10 ms; p99 and max of its lateness (what ipvsadm -L / daemon.status
    would wait), plus the time one HealthManager.status() takes (what daemon.status adds for health);
  - peak file descriptors (/proc/self/fd, sampled every 50 ms), the soft RLIMIT_NOFILE, probes in flight;
  - RSS peak (VmHWM), CPU seconds (user+sys) over the run, probes completed per second.
Prints one table and one JSON line. Nothing asserts a time: this is a measurement, not a test.
Everything created (namespace, server process) is removed by PID / name on exit, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time

NET = "10.99"
DOWN_FROM = 128  # third octet from which addresses are blackholed (10.99.128.0/17)
PORT = 80


def addr(i: int, blackholed: bool) -> str:
    """The i-th server address of its half: answering ones in 10.99.0.0/17, blackholed in 10.99.128.0/17."""
    base = (DOWN_FROM << 8) if blackholed else 0
    n = base + 1 + i
    return f"{NET}.{n >> 8}.{n & 255}"


def config_text(n: int, blackholed: float, kind: str, delay_loop: float, timeout: float, retry: int,
                dbr: float) -> str:
    down = int(round(n * blackholed))
    lines = [f"virtual_server 10.0.0.1 80 {{", " lb_kind FNAT", f" delay_loop {delay_loop}"]
    for i in range(n):
        ip = addr(i, True) if i < down else addr(i - down, False)
        if kind == "tcp":
            check = (f"  TCP_CHECK {{\n   connect_timeout {timeout}\n   retry {retry}\n"
                     f"   delay_before_retry {dbr}\n  }}")
        elif kind == "http":
            check = (f"  HTTP_GET {{\n   url {{\n    path /health\n   }}\n   connect_timeout {timeout}\n"
                     f"   retry {retry}\n   delay_before_retry {dbr}\n  }}")
        else:  # a script that answers at once, or (blackholed) one that hangs until misc_timeout kills it
            cmd = f"/bin/sleep {timeout * 10}" if i < down else "/bin/true"
            check = (f"  MISC_CHECK {{\n   misc_path \"{cmd}\"\n   misc_timeout {timeout}\n"
                     f"   retry {retry}\n   delay_before_retry {dbr}\n  }}")
        lines.append(f" real_server {ip} {PORT} {{\n  weight 1\n{check}\n }}")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the real servers (one process)

async def _serve() -> None:
    async def handle(reader, writer):
        try:
            data = await asyncio.wait_for(reader.read(4096), 5)
            if data.startswith(b"GET "):
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "0.0.0.0", PORT, backlog=65535)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# ------------------------------------------------------------------ the checker (one process)

async def _check(a) -> dict:
    from hdslb.config import loads
    from hdslb.health import HealthManager, pairs_of, run_check

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if a.nofile or a.nofile_hard:
        hard = a.nofile_hard or max(hard, a.nofile)
        soft = min(a.nofile or soft, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    t = time.monotonic()
    cfg = loads(config_text(a.servers, a.blackholed, a.kind, a.delay_loop, a.connect_timeout, a.retry,
                            a.delay_before_retry), name="bench")
    parse_s = time.monotonic() - t
    pairs = pairs_of(cfg.virtual_servers)
    loop = asyncio.get_running_loop()
    if a.debug:  # asyncio names every callback that held the loop 50 ms or more (stderr, printed by run())
        import logging
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        loop.set_debug(True)
        loop.slow_callback_duration = 0.05
    starts: dict = {}  # rs key -> [(start, end, ok)]
    inflight = [0, 0]  # now, peak

    async def probe(checker, rs):
        t0 = loop.time()
        inflight[0] += 1
        inflight[1] = max(inflight[1], inflight[0])
        try:
            res = await run_check(checker, rs)
        finally:
            inflight[0] -= 1
        starts.setdefault(rs.key, []).append((t0, loop.time(), res.ok))
        return res

    changes = [0]

    def on_change(*_):
        changes[0] += 1

    kw = {"probe": probe}
    if a.max_concurrent:
        kw["max_concurrent"] = a.max_concurrent
    mgr = HealthManager(on_change, **kw)
    lags, lag_at, fds, status_s = [], [], [], []
    stop = asyncio.Event()

    async def ticker():
        while not stop.is_set():
            t0 = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - t0 - 0.01)
            lag_at.append(t0)

    async def sampler():
        while not stop.is_set():
            fds.append(len(os.listdir("/proc/self/fd")))
            await asyncio.sleep(0.05)

    async def status_poller():
        while not stop.is_set():
            t0 = time.perf_counter()
            mgr.status()
            status_s.append(time.perf_counter() - t0)
            await asyncio.sleep(1.0)

    gc_pauses, gc_t = [], [0.0]

    def gc_cb(phase, info):  # the collector's own pauses: with thousands of tasks a full one can stall the loop
        if phase == "start":
            gc_t[0] = time.perf_counter()
        elif info.get("generation") == 2:
            gc_pauses.append(time.perf_counter() - gc_t[0])

    gc.callbacks.append(gc_cb)
    helpers = [asyncio.create_task(f()) for f in (ticker, sampler, status_poller)]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = loop.time()
    await mgr.start(pairs)
    if not a.no_freeze:  # as hdslbd's HeapSettler does once the model (and the checkers) are loaded
        gc.collect()
        gc.freeze()
    keys = [rs.key for _, rs in pairs]
    first_round = None
    while loop.time() - t0 < a.seconds:
        await asyncio.sleep(0.1)
        if first_round is None and all(k in starts for k in keys):
            first_round = max(v[0][1] for v in starts.values()) - t0
    wall = loop.time() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    eff = getattr(mgr, "slots", getattr(mgr, "_max_concurrent", a.max_concurrent))  # _max_concurrent: before slots
    stop.set()  # before stop(): cancelling thousands of checker tasks at shutdown is not what is measured
    await asyncio.gather(*helpers)
    gc.callbacks.remove(gc_cb)
    await mgr.stop()

    late = []
    for k, runs in starts.items():
        if k[0].packed[2] >= DOWN_FROM:
            continue
        for (s0, e0, ok0), (s1, _, _) in zip(runs, runs[1:]):
            if ok0:  # after a pass the next probe is due delay_loop after its end
                late.append(max(0.0, s1 - (e0 + a.delay_loop)))
    hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024

    def pct(xs, p):
        return sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] if xs else float("nan")

    probes = sum(len(v) for v in starts.values())
    return {
        "servers": a.servers, "blackholed": int(round(a.servers * a.blackholed)), "kind": a.kind,
        "delay_loop_s": a.delay_loop, "connect_timeout_s": a.connect_timeout, "max_concurrent": eff,
        "nofile_soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0], "nofile_soft_at_start": soft, "nofile_hard": hard,
        "parse_s": round(parse_s, 2), "first_round_s": None if first_round is None else round(first_round, 2),
        "checked_once": sum(1 for k in keys if k in starts),
        "late_p50_s": round(pct(late, 0.5), 3), "late_p99_s": round(pct(late, 0.99), 3),
        "late_max_s": round(max(late, default=float("nan")), 3),
        "lag_p99_ms": round(pct(lags, 0.99) * 1e3, 1), "lag_max_ms": round(max(lags) * 1e3, 1),
        "lag_max_at_s": round(lag_at[lags.index(max(lags))] - t0, 1),
        "gc_full": len(gc_pauses), "gc_full_max_ms": round(max(gc_pauses, default=0) * 1e3, 1),
        "status_ms": round(statistics.median(status_s) * 1e3, 1) if status_s else None,
        "fds_peak": max(fds), "inflight_peak": inflight[1], "probes": probes,
        "probes_per_s": round(probes / wall, 1), "down_notices": changes[0],
        "cpu_s": round((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime), 1),
        "wall_s": round(wall, 1), "rss_peak_mib": round(hwm / 2 ** 20, 1),
    }


# ------------------------------------------------------------------ the lab

def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def run(a) -> dict:
    ns = f"hc-hs-{os.getpid()}"
    server = None
    py = sys.executable
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    try:
        _sh("ip", "netns", "add", ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", ns, "route", "add", "local", f"{NET}.0.0/16", "dev", "lo")
        _sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.core.somaxconn=65535",
            "net.ipv4.tcp_max_syn_backlog=65535", "net.ipv4.ip_local_port_range=1024 65000")
        nft = (f"table inet hc {{\n chain in {{\n  type filter hook input priority 0;\n"
               f"  ip daddr {NET}.{DOWN_FROM}.0/17 tcp dport {PORT} drop\n }}\n}}\n")
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=nft, text=True, check=True)
        server = subprocess.Popen(["ip", "netns", "exec", ns, py, "-m", "bench.health_scale", "--serve"],
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the real-server process did not start")
        argv = [a2 for a2 in sys.argv[1:]]
        out = _sh("ip", "netns", "exec", ns, "env", f"PYTHONPATH={root}", py, "-m", "bench.health_scale",
                  "--inner", *argv, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"checker process failed:\n{out.stderr[-3000:]}")
        if a.debug:
            print(out.stderr[-20000:], file=sys.stderr)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if server is not None:
            server.terminate()  # ip netns exec execs the interpreter: this PID is the server itself
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        _sh("ip", "netns", "del", ns, check=False)


def table(r: dict) -> str:
    rows = [
        ("real servers (blackholed)", f"{r['servers']} ({r['blackholed']}), {r['kind']}"),
        ("delay_loop / connect_timeout", f"{r['delay_loop_s']} s / {r['connect_timeout_s']} s"),
        ("probe slots (max_concurrent)", r["max_concurrent"]),
        ("RLIMIT_NOFILE soft (at start) / hard",
         f"{r['nofile_soft']} ({r['nofile_soft_at_start']}) / {r['nofile_hard']}"),
        ("config load", f"{r['parse_s']} s"),
        ("first round complete", f"{r['first_round_s']} s ({r['checked_once']} checked)"),
        ("answering servers' probes late p50/p99/max", f"{r['late_p50_s']} / {r['late_p99_s']} / {r['late_max_s']} s"),
        ("loop lag p99 / max (at)", f"{r['lag_p99_ms']} / {r['lag_max_ms']} ms ({r['lag_max_at_s']} s)"),
        ("full GC collections, longest", f"{r['gc_full']}, {r['gc_full_max_ms']} ms"),
        ("status() (health.list's part)", f"{r['status_ms']} ms"),
        ("fds peak / probes in flight peak", f"{r['fds_peak']} / {r['inflight_peak']}"),
        ("probes, per second", f"{r['probes']}, {r['probes_per_s']}/s"),
        ("CPU over wall", f"{r['cpu_s']} s / {r['wall_s']} s"),
        ("RSS peak", f"{r['rss_peak_mib']} MiB"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--servers", type=int, default=5000)
    p.add_argument("--blackholed", type=float, default=0.5, help="fraction of servers whose SYNs are dropped")
    p.add_argument("--kind", choices=("tcp", "http", "misc"), default="tcp")
    p.add_argument("--delay-loop", type=float, default=6.0)
    p.add_argument("--connect-timeout", type=float, default=3.0)
    p.add_argument("--retry", type=int, default=1)
    p.add_argument("--delay-before-retry", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=40.0, help="how long to check")
    p.add_argument("--max-concurrent", type=int, default=0, help="probe slots (0: the manager's default)")
    p.add_argument("--nofile", type=int, default=0, help="soft RLIMIT_NOFILE for the checker (0: inherited)")
    p.add_argument("--nofile-hard", type=int, default=0, help="hard RLIMIT_NOFILE for the checker (0: inherited)")
    p.add_argument("--no-freeze", action="store_true",
                   help="leave the heap unfrozen (hdslbd freezes it after start: HDSLB_GC_FREEZE)")
    p.add_argument("--profile", metavar="FILE", help="cProfile the checking process into FILE")
    p.add_argument("--debug", action="store_true", help="asyncio debug: name callbacks that held the loop >= 50 ms")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        asyncio.run(_serve())
        return 0
    if a.inner:
        if a.profile:  # where the checking process's CPU goes (pstats file; `python -m pstats FILE`)
            import cProfile
            prof = cProfile.Profile()
            r = prof.runcall(asyncio.run, _check(a))
            prof.dump_stats(a.profile)
        else:
            r = asyncio.run(_check(a))
        print(json.dumps(r))
        return 0
    if os.geteuid() != 0:
        print("health_scale needs root (a network namespace)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`, kill: still remove the lab (finally)
    r = run(a)
    print(table(r))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
