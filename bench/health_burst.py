"""A rack going down: what a burst of health verdicts costs the event loop, through hdslbd's own code.

    python -m bench.health_burst                       # 200 of 400 servers of one mh service go down over 6 s
    python -m bench.health_burst --spread 0            # all 200 verdicts delivered at once
    python -m bench.health_burst --sched conhash --maps  # into real BPF maps (root; compiles the fast path, ~3 s)

What runs: the Daemon's config and health-callback code (Daemon._on_health, as the health manager's dispatcher calls
it) over a model of --services virtual servers x --servers real servers (--sched; mh and conhash at their default
64k-entry tables). By default the datapath only records; --maps writes real pinned BPF maps (a fast path loaded,
attached to no interface, pinned under /run/hdslb/bpffs/hb-burst-<pid>, removed on exit). A feeder task delivers
--verdicts down verdicts (spread over the services) at times spread evenly over --spread seconds (a delay_loop: each
server's checker fails at its own phase), each verdict the way the dispatcher delivers it.

Measured, from the first verdict until every one is in the pool:
  - loop busy: CPU seconds of the process (single-threaded: the time the loop was held), and tables built;
  - verdict latency: from when it was due (its checker's decision) to its real server's table no longer holding
    it, p50 / max (verdicts that fall due while the loop is held are delivered together once it is free, as the
    health manager's dispatcher delivers what queued);
  - loop lag: a ticker that wants to run every 10 ms, p99 / max lateness (what a control client or an ARP answer
    waits).
Run it on two checkouts to compare (before/after). Prints one table and one JSON line; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from ipaddress import ip_address

BASE_VIP = "10.0.0.{}"


def config_text(services: int, servers: int, sched: str) -> str:
    out = ["local_address_group lg {\n    192.168.100.200 eth1\n}\n"]
    for s in range(services):
        rs = "".join(f"    real_server {server_addr(s, i)} 80 {{\n        weight 1\n"
                     f"        TCP_CHECK {{\n            warmup 3600\n        }}\n    }}\n" for i in range(servers))
        out.append(f"virtual_server {BASE_VIP.format(1 + s)} 80 {{\n    lb_algo {sched}\n    lb_kind FNAT\n"
                   f"    persistence_timeout 60\n    laddr_group_name lg\n{rs}}}\n")
    return "".join(out)


def server_addr(s: int, i: int) -> str:
    return f"172.{16 + s}.{i // 250}.{1 + i % 250}"


def pct(xs, p):
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] if xs else float("nan")


async def run(a) -> dict:
    from hdslb import sched
    from bench.harness import ifaces, quiet_daemon
    from hdslb.balancer import Balancer, NullDataPath

    tmp = tempfile.mkdtemp(prefix="hb-burst-")
    conf = os.path.join(tmp, "hdslb.conf")
    with open(conf, "w") as f:
        f.write(config_text(a.services, a.servers, a.sched))
    fp = None
    ifs = ifaces()

    d = quiet_daemon(conf, tmp)
    if a.maps:
        from hdslb.fastpath.loader import DEFAULT_PIN_ROOT, FastPath, Sizes, ensure_bpffs
        from hdslb.fastpath.maps import Maps

        ensure_bpffs(DEFAULT_PIN_ROOT)
        fp = FastPath(os.path.join(DEFAULT_PIN_ROOT, f"hb-burst-{os.getpid()}"),
                      Sizes(max_conns=4096, max_services=64, max_dests=4096, max_local=64, max_routes=256,
                            max_neigh=64, max_persist=4096))
        fp.load()
        d.maps = Maps(fp)
        d.bal = Balancer(d._datapath(d.maps), ifs, max_services=64, max_dests=4096)
    else:
        d.bal = Balancer(NullDataPath(), ifs)
    try:
        t = time.perf_counter()
        with d.bal.deferred():  # one table per service, as ipvsadm -R loads (the load is not what is measured)
            await d.reload_config()
        load_s = time.perf_counter() - t
        loop = asyncio.get_running_loop()
        n = a.verdicts
        targets = [(s, i) for i in range(a.servers) for s in range(a.services)][:n]
        vs_keys = {s: ("TCP", f"{BASE_VIP.format(1 + s)}:80") for s in range(a.services)}
        delivered, applied = {}, {}
        svcs = {s: d.bal.get_service({"proto": "tcp", "addr": BASE_VIP.format(1 + s), "port": 80})
                for s in range(a.services)}

        built = [0]
        real_build = sched.build_table

        def counting(*x, **kw):
            built[0] += 1
            return real_build(*x, **kw)

        sched.build_table = counting
        real_sched_set = d.bal.dp.sched_set

        def sched_set(svc, table, hoff):  # a server is out once a table without it is written
            real_sched_set(svc, table, hoff)
            now = loop.time()
            for (s, i), t0 in delivered.items():
                if (s, i) not in applied and svcs[s] is svc:
                    dest = svc.dests.get((ip_address(server_addr(s, i)), 80))
                    if dest is not None and dest.health == "down":
                        applied[(s, i)] = now

        d.bal.dp.sched_set = sched_set
        lags = []
        done = asyncio.Event()

        async def ticker():
            while not done.is_set():
                t0 = loop.time()
                await asyncio.sleep(0.01)
                lags.append(loop.time() - t0 - 0.01)

        async def feeder():
            start = loop.time()
            due = [start + a.spread * k / n for k in range(n)]
            k = 0
            while k < n:
                if due[k] > loop.time():
                    await asyncio.sleep(due[k] - loop.time())
                else:
                    await asyncio.sleep(0)  # let the rest of the loop run between deliveries, as checker tasks do
                now = loop.time()
                while k < n and due[k] <= now:  # what fell due meanwhile is delivered in one go, as queued
                    s, i = targets[k]
                    delivered[(s, i)] = due[k]  # when its checker decided: a held loop delays the delivery too
                    await d._on_health(vs_keys[s], (ip_address(server_addr(s, i)), 80), False, None,
                                       "TCP_CHECK: connect timeout")
                    k += 1

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        lags.clear()
        cpu0, t0 = time.process_time(), loop.time()
        await feeder()
        while len(applied) < n:
            await asyncio.sleep(0.001)
        wall = loop.time() - t0
        cpu = time.process_time() - cpu0
        done.set()
        await tick
        sched.build_table = real_build
        lat = [applied[k] - delivered[k] for k in delivered]
        return {"sched": a.sched, "services": a.services, "servers": a.servers, "verdicts": n, "spread_s": a.spread,
                "maps": bool(a.maps), "load_s": round(load_s, 2), "wall_s": round(wall, 2),
                "loop_busy_s": round(cpu, 2), "tables_built": built[0],
                "latency_p50_s": round(pct(lat, 0.5), 3), "latency_max_s": round(max(lat), 3),
                "lag_p99_ms": round(pct(lags, 0.99) * 1e3, 1), "lag_max_ms": round(max(lags) * 1e3, 1)}
    finally:
        if d.health is not None:
            await d.health.stop()
        if fp is not None:
            fp.close()
            fp.unpin()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sched", default="mh", help="lb_algo of every service (mh, conhash, wrr, ...)")
    p.add_argument("--services", type=int, default=1)
    p.add_argument("--servers", type=int, default=400, help="real servers per service")
    p.add_argument("--verdicts", type=int, default=200, help="down verdicts (spread over the services)")
    p.add_argument("--spread", type=float, default=6.0, help="seconds the verdicts arrive over (0: at once)")
    p.add_argument("--maps", action="store_true", help="write real BPF maps (root)")
    a = p.parse_args(argv)
    r = asyncio.run(run(a))
    rows = [("scheduler, services x real servers", f"{r['sched']}, {r['services']} x {r['servers']}"
             + (" (BPF maps)" if r["maps"] else "")),
            ("down verdicts, delivered over", f"{r['verdicts']}, {r['spread_s']} s"),
            ("all in the pool after", f"{r['wall_s']} s"),
            ("loop busy (CPU), tables built", f"{r['loop_busy_s']} s, {r['tables_built']}"),
            ("verdict to pool p50 / max", f"{r['latency_p50_s']} / {r['latency_max_s']} s"),
            ("loop lag p99 / max", f"{r['lag_p99_ms']} / {r['lag_max_ms']} ms")]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
