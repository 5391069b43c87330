"""What loading and reloading a config with many real servers costs, through hdslbd's own config code.

    python -m bench.config_load                                  # 10 mh services x 40 servers, 1000 wrr x 10
    python -m bench.config_load --case mh:10:40 --case conhash:4:100

What runs: Daemon.reload_config (parse, plan, the dry run on a scratch model, the apply) over a datapath that writes
nothing, for each --case SCHED:SERVICES:SERVERS: the first load of the file, a reload that changes one real server's
weight in every service, one that changes every weight, and a reload of the same file (no change). Measured: wall
seconds and scheduling tables built with real servers (sched.build_table calls, the dry run's and the apply's together; mh and conhash
tables are 64k entries at their default size). Run it on two checkouts to compare (before/after). Also the longest
the event loop was held meanwhile (a 1 ms ticker beside the reload). Prints one table and one JSON line; asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time


def config_text(sched: str, services: int, servers: int, bump: int = 0) -> str:
    """SERVICES virtual servers of SERVERS real servers each; the first `bump` of each at weight 2, the rest 1."""
    out = ["local_address_group lg {\n    192.168.100.200 eth1\n}\n"]
    for s in range(services):
        rs = "".join(f"    real_server 172.{16 + s // 250}.{s % 250}.{1 + i % 250} {80 + i // 250} {{\n"
                     f"        weight {2 if i < bump else 1}\n    }}\n" for i in range(servers))
        out.append(f"virtual_server 10.{s // 250}.{s % 250}.1 80 {{\n    lb_algo {sched}\n    lb_kind FNAT\n"
                   f"    laddr_group_name lg\n{rs}}}\n")
    return "".join(out)


async def one(sched_name: str, services: int, servers: int) -> dict:
    from hdslb import sched
    from bench.harness import ifaces, quiet_daemon
    from hdslb.balancer import Balancer, NullDataPath

    tmp = tempfile.mkdtemp(prefix="cf-load-")
    conf = os.path.join(tmp, "hdslb.conf")
    with open(conf, "w") as f:
        f.write(config_text(sched_name, services, servers))

    d = quiet_daemon(conf, tmp)
    d.bal = Balancer(NullDataPath(), ifaces(), max_services=d.sizes.max_services, max_dests=d.sizes.max_dests,
                     max_hash_cells=d.sizes.max_hash_cells)
    built = [0]
    real_build = sched.build_table

    def counting(name, dests, **kw):  # tables with real servers (a service's add builds an empty one: no cost)
        dests = list(dests)
        built[0] += bool(dests)
        return real_build(name, dests, **kw)

    sched.build_table = counting
    out = {"case": f"{sched_name}:{services}:{servers}"}
    try:
        for step, text in (("load", None), ("reload_1_weight_each", config_text(sched_name, services, servers, 1)),
                           ("reload_all_weights", config_text(sched_name, services, servers, servers)),
                           ("reload_same", None)):
            if text is not None:
                with open(conf, "w") as f:
                    f.write(text)
            built[0] = 0
            gaps = [0.0]

            async def ticker():  # the longest the event loop was held (health checks, ARP/ND, control calls wait)
                last = time.perf_counter()
                while True:
                    await asyncio.sleep(0.001)
                    now = time.perf_counter()
                    gaps[0] = max(gaps[0], now - last)
                    last = now

            tick = asyncio.ensure_future(ticker())
            await asyncio.sleep(0.01)
            t = time.perf_counter()
            await d.reload_config()
            took = time.perf_counter() - t
            await asyncio.sleep(0.01)  # the ticker's next tick measures the gap the reload's last step made
            tick.cancel()
            out[step] = {"s": round(took, 3), "tables": built[0], "loop_max_ms": round(gaps[0] * 1e3)}
    finally:
        sched.build_table = real_build
        if d.health is not None:
            await d.health.stop()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", action="append", help="SCHED:SERVICES:SERVERS (repeatable)")
    a = p.parse_args(argv)
    cases = a.case or ["mh:10:40", "wrr:1000:10"]
    rows = []
    for c in cases:
        sch, n, m = c.split(":")
        rows.append(asyncio.run(one(sch, int(n), int(m))))
    steps = ("load", "reload_1_weight_each", "reload_all_weights", "reload_same")
    print(f"{'case':<16}" + "".join(f" {s + ' s':>22} {'tables':>6} {'loop ms':>7}" for s in steps))
    for r in rows:
        print(f"{r['case']:<16}" + "".join(f" {r[s]['s']:>22} {r[s]['tables']:>6} {r[s]['loop_max_ms']:>7}"
                                           for s in steps))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
