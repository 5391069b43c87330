"""The README's benchmark tables from one full run's results: `python -m bench.readme bench/results/DATE.json`.

The README's Benchmarks section is prose around tables; the prose is written by hand, the tables are these (the
targets table is `python -m bench.history --markdown`). Each table is printed as the README has it, in the
README's order, so a new run's figures replace the old ones table for table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.history import e2e_generator

NA = "n/a"


def _n(x, fmt="{:.0f}") -> str:
    return NA if x is None else fmt.format(x)


def _md(head: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---"] * right_from + ["---:"] * (len(head) - right_from)
    line = lambda cells: ("| " + " | ".join(cells) + " |").replace("|  |", "| |")  # noqa: E731
    return "\n".join([line(head), "|" + "|".join(align) + "|"] + [line(r) for r in rows])


def _by(rows: list[dict], key: str) -> dict:
    return {r[key]: r for r in rows}


def per_packet(pc: dict) -> str:
    h, m, ref = _by(pc["hdslb"], "case"), _by(pc["modes"], "mode"), _by(pc["reference"], "prog")
    one = lambda c: [_n(h[c]["ns"]), _n(h[c]["ratio"], "{:.1f}")]  # noqa: E731
    many = lambda *ms: [" / ".join(_n(m[x]["ns"]) for x in ms),  # noqa: E731
                        " / ".join(_n(m[x]["ratio"], "{:.1f}") for x in ms)]
    new = "new TCP flow (SYN: schedule + lport + 2 inserts)"
    reused = next(c for c in h if c.startswith("SYN on a finished flow's tuple"))
    rows = [
        ["established TCP client→server", *one("established TCP client->server")],
        ["established TCP server→client", *one("established TCP server->client")],
        ["established UDP client→server", *one("established UDP client->server")],
        ["not ours → XDP_PASS", *one("not ours -> XDP_PASS")],
        ["malformed (ihl 3) → XDP_DROP", *one("malformed (ihl 3) -> XDP_DROP")],
        [new, _n(h[new]["ns"]), _n(h[new]["ratio"])],
        ["SYN on a finished flow's tuple (client reused its port)²", _n(h[reused]["ns"]), _n(h[reused]["ratio"])],
        ["established DR / NAT in / NAT out (`-g`, `-m`)¹",
         *many("DR (-g)", "NAT (-m), client->server", "NAT (-m), server->client")],
        ["established TUNNEL (`-i`, IPIP)¹", *many("TUNNEL (-i, IPIP)")],
        ["established FNAT v6 / NAT64¹", *many("FNAT v6", "NAT64 (v6 VIP -> v4 server)")],
        ["established SNAT (`-J`), inside→outside / outside→inside¹",
         *many("SNAT (-J), inside->outside", "SNAT (-J), outside->inside")],
        ["reference: return XDP_TX", _n(ref["ref_bare_tx"]["ns"]), _n(ref["ref_bare_tx"]["ratio"], "{:.1f}")],
        ["reference: parse + rewrite (incr. csum) + MAC swap + XDP_TX", _n(ref["ref_minimal"]["ns"]), "1.0"],
    ]
    return _md(["per-packet cost (BPF_PROG_TEST_RUN)", "ns", "× minimal"], rows)


def lookups(pc: dict) -> str:
    ns = {(x["map"], x["flows"]): x["ns"] for x in pc["lookups"]}
    counts = sorted({x["flows"] for x in pc["lookups"]})
    pair = lambda a, b, n: f"{_n(ns.get((a, n)))} / {_n(ns.get((b, n)))} ns"  # noqa: E731
    rows = [["wide entries (40 B key, 72 B value; `conn6_map`), per-CPU / shared",
             *[pair("lru_pcpu", "lru", n) for n in counts]],
            ["compact IPv4 entries (16 B key, 48 B value; `conn4_map`), per-CPU / shared",
             *[pair("lru_pcpu4", "lru4", n) for n in counts]]]
    return _md(["established lookup by working set (table 1h)", *[f"{n:,} keys" if i == 0 else f"{n:,}"
                                                                   for i, n in enumerate(counts)]], rows)


def contention(pc: dict) -> str:
    c = _by(pc["contention"], "table")
    g = lambda x: f"{x:g} ns"  # noqa: E731
    rows = [["per-CPU values (default)", g(c["percpu"]["alone_ns"]), g(c["percpu"]["both_ns"])],
            ["`--conn-table shared`", g(c["shared"]["alone_ns"]), g(c["shared"]["both_ns"])]]
    return _md(["the same established flow on both CPUs at once (table 1i)", "one CPU", "both CPUs together"], rows)


PROFILE_ROWS = [("the XDP program's own instructions", "XDP program"),
                ("conn table: hash, bucket walk, key compare, insert, LRU lists", "conn table"),
                ("BPF_PROG_TEST_RUN's own loop", "test-run loop"),
                ("locks", "locks"),
                ("return thunks (SRSO mitigation)", "return thunks"),
                ("other kernel functions (route and neighbour lookups, helpers)", "other")]


def profile(pc: dict) -> str:
    cases = pc["profile"]["cases"]

    def cell(case, prefix):
        v = next((g["ns"] for g in case["groups"] if g["group"].startswith(prefix)), 0)  # no samples: absent
        return "–" if round(v) == 0 else f"{v:.0f}"

    rows = [[label, *[cell(c, p) for c in cases]] for label, p in PROFILE_ROWS]
    rows.append(["total (the case's ns from the tables above)", *[_n(c["ns"]) for c in cases]])
    return _md(["where a packet's time goes (table 1j: perf on the bench CPU, ns a packet)", "minimal",
                "established TCP", "new TCP flow"], rows)


def _peer(name: str) -> str:
    return name.replace("--conn-table shared", "`--conn-table shared`")


def e2e(r: dict) -> str:
    gen = e2e_generator(r)

    def v(x, key, field, fmt):
        m = x.get(key) or {}
        return NA if "na" in m or m.get(field) is None else fmt.format(m[field])

    rows = [[_peer(x["peer"]), v(x, "udp", "mpps", "{:.2f}"), v(x, "udp_trafgen", "mpps", "{:.2f}"),
             v(x, "cps", "cps", "{:.0f}"), v(x, "cps_light", "cps", "{:.0f}"),
             f"{v(x, 'iperf_tso_off', 'gbps', '{:.2f}')} / {v(x, 'iperf_tso_on', 'gbps', '{:.2f}')}"]
            for x in r["rows"]]
    return _md(["e2e (netns, veth, 64-byte UDP)", f"UDP Mpps ({gen})", "UDP Mpps (trafgen)", "conn/s (wrk)",
                "conn/s (light)", "TCP Gbit/s (TSO off / on)"], rows)


def flows(r: dict) -> str:
    gen = e2e_generator(r)
    got = [(x["peer"], x["udp_flows"]["by_flows"]) for x in r["rows"]
           if (x.get("udp_flows") or {}).get("by_flows")]
    counts = list(got[0][1])
    return _md([f"UDP Mpps by concurrent flows ({gen})", *[f"{int(c):,}" for c in counts]],
               [[_peer(p), *[f"{f[c]:.2f}" for c in counts]] for p, f in got])


def scale(s: dict, slowpath: dict | None) -> str:
    lat = lambda d, op: f"{d[op]['p50_us']:.0f} / {d[op]['p99_us']:.0f} µs"  # noqa: E731
    ops = ("daemon.status", "dest.edit", "service.list")
    li = s["listing"]
    sw = li["status_while"]
    ms_ = lambda x: f"{x:.1f}" if x < 10 else f"{x:.0f}"  # noqa: E731
    sw_cell = ", ".join(f"{ms_(sw[k]['p99_ms'])} / {sw[k]['max_ms']:.0f} ms" for k in
                        ("idle", "service.list back to back", "GET /metrics back to back"))

    def scan(mem, prefix):
        return next(v for k, v in mem["scans"].items() if k.startswith(prefix))

    m, ms = s["memory"], s["memory_shared"]
    pages = scan(m, "conn.list pages")
    to_shared, to_pcpu = scan(m, "a restart into"), scan(ms, "a restart into")
    rows = [
        ["map memory per IPv4 connection at 1M (both directions)",
         f"{m['bytes_per_connection']:.0f} B per-CPU ({m['possible_cpus']} CPUs), "
         f"{ms['bytes_per_connection']:.0f} B `--conn-table shared`"],
        ["`ipvsadm -R` of 10k services × 10 real servers (one batch)", f"{s['services']['seconds']:.1f} s"],
        ["100k routes, `dpip -b` (one batch)", f"{s['routes']['seconds']:.1f} s"],
        ["REST `PATCH /v2/vs`, 10k × 10 in one request", f"{s['rest']['seconds']:.1f} s"],
        ["REST, 10k `PUT /v2/vs/{VipPort}` with `RSs` (one request per service)",
         f"{s['rest_per_service']['seconds']:.1f} s"],
        ["the same 10k PUTs again, nothing changed (a controller's re-sync)", f"{s['rest_resync']['seconds']:.1f} s"],
        ["control op p50 / p99, idle: `daemon.status`, `dest.edit`, `service.list`",
         ", ".join(lat(s["latency_idle"], o) for o in ops)],
        [f"the same with {s['traffic_mpps']:.1f} Mpps crossing the balancer",
         ", ".join(lat(s["latency_traffic"], o) for o in ops)],
        ["at 10k × 10: `service.list` of everything, a gzipped `/metrics` scrape (request to decoded reply)",
         f"{li['round_trip_s']['service.list']:.1f} s, {li['round_trip_s']['GET /metrics (gzip)']:.1f} s"],
        ["another client's `daemon.status` meanwhile, p99 / at most: idle, listing back to back, scraping back to "
         "back", sw_cell],
        ["1M connections: entry count, the sweep's columns, `ipvsadm -Lnc` (all 1M lines, paged), a sweep removing "
         "all", f"{scan(m, 'entries')['seconds']:.1f} s, {scan(m, 'aging columns')['seconds']:.1f} s, "
                f"{pages['daemon_seconds']:.1f} s of hdslbd and {pages['client_seconds']:.1f} s of the client (event "
                f"loop held ≤ {pages['longest_loop_stall_s'] * 1e3:.0f} ms), {scan(m, 'aging sweep')['seconds']:.1f} s"],
        ["1M connections, a restart into the other table kind (per-CPU → shared; shared → per-CPU): the copy before "
         "attaching + the pass after",
         f"{to_shared['first_seconds']:.1f} + {to_shared['second_seconds']:.1f} s; {to_pcpu['first_seconds']:.1f} + "
         f"{to_pcpu['second_seconds']:.1f} s ({to_shared['entries']:,} entries; the compile with the table set aside "
         f"before: {to_shared['load_seconds']:.1f} s, {to_pcpu['load_seconds']:.1f} s)"],
    ]
    if slowpath and slowpath.get("answered_per_s"):
        rows.append(["the slow path answering ICMP echo from Python", f"{slowpath['answered_per_s'] / 1e3:.0f}k/s"])
    return _md(["scale (bench section 3)", ""], rows, right_from=2)


def tables(res: dict) -> list[str]:
    pc, r, s = res["prog_cost"], res["e2e"], res["scale"]
    return [per_packet(pc), lookups(pc), contention(pc), profile(pc), e2e(r), flows(r), scale(s, res.get("slowpath"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a full run's bench/results/DATE.json")
    a = ap.parse_args(argv)
    try:
        res = json.loads(a.results.read_text())
        out = tables(res)
    except (OSError, ValueError, KeyError, StopIteration, TypeError) as e:
        print(f"bench.readme: {a.results}: {type(e).__name__}: {e} (a full run's results are needed)", file=sys.stderr)
        return 2
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
