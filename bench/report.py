"""Turn section results into printed tables, bench/results/<date>.json, a PNG chart and a README Markdown block."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": cpu, "python": platform.python_version()}


def table(headers: list[str], rows: list[list], title: str = "") -> str:
    cells = [[("" if c is None else str(c)) for c in r] for r in rows]
    w = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    sep = "  "
    out = [title] if title else []
    out.append(sep.join(h.ljust(w[i]) for i, h in enumerate(headers)).rstrip())
    out.append(sep.join("-" * w[i] for i in range(len(headers))))
    for r in cells:
        out.append(sep.join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
    return "\n".join(out)


def _pf(p) -> str:
    return "n/a" if p is None else ("PASS" if p else "MISS")


def _f(x, fmt="{:.2f}"):
    return "" if x is None else fmt.format(x)


def targets_table(ts: list[dict], title: str) -> str:
    rows = []
    for t in ts:
        val = t.get("value")
        extra = f" (LB-only est. {t['lb_only_ratio']})" if "lb_only_ratio" in t else ""
        rows.append([t["name"], ("n/a" if val is None else f"{val}") + extra, t.get("limit"), _pf(t.get("pass"))
                     + (f" ({t['na']})" if t.get("na") else "")])
    head = ["target", "measured", "limit", "result"]
    if any("ceiling" in t for t in ts):  # e2e: what a bare redirect reaches on the same ratio
        head.append("bare redirect's ratio")
        for row, t in zip(rows, ts):
            row.append(t.get("ceiling", ""))
    return table(head, rows, title)


# --------------------------------------------------------------------------- sections

def fmt_prog_cost(r: dict) -> str:
    if "na" in r:
        return f"prog cost: n/a ({r['na']})"
    parts = []
    rows = [[x["case"], _f(x["ns"], "{:.1f}"), _f(x["ratio"]), x["check"], x.get("method", "")] for x in r["hdslb"]]
    parts.append(table(["hdslb case", "ns/pkt", "x minimal", "check", "method"], rows,
                       "1a. hdslb XDP program, BPF_PROG_TEST_RUN"))
    rows = [[x["prog"], _f(x["ns"], "{:.1f}"), _f(x["ratio"]), x["desc"]] for x in r["reference"] if not x["alternative"]]
    parts.append(table(["reference (cumulative stages)", "ns/pkt", "x minimal", "what it adds"], rows,
                       "1b. reference programs (bcc, same headers); the stages rebuild hdslb's established path"))
    rows = [[x["prog"], _f(x["ns"], "{:.1f}"), x["desc"]] for x in r["reference"] if x["alternative"]]
    parts.append(table(["alternative", "ns/pkt", "what changes"], rows, "1c. one step done another way"))
    rows = [[x["stage"], _f(x["ns"], "{:.1f}"), x["check"]] for x in r["new_flow_stages"]]
    parts.append(table(["new-flow path, in place (cumulative)", "ns/pkt", "check"], rows,
                       "1d. where a new flow's time goes (hdslb's own program, each step made to fail)"))
    rows = [[x["prog"], _f(x["ns"], "{:.1f}"), _f(x["insert_ns"], "{:.1f}"), x["desc"]] for x in r.get("inserts", [])]
    parts.append(table(["insert microbench", "ns/iter", "insert ns", "map"], rows,
                       "1e. cost of inserting a never-seen key, by map type"))
    rows = [[x["map"], x["flows"], _f(x["ns"], "{:.1f}"), x["check"], x["desc"]] for x in r.get("lookups", [])]
    if rows:
        parts.append(table(["lookup microbench", "keys in turn", "ns/lookup", "check", "map"], rows,
                           "1h. established lookup (hit + last_seen/state written) by working set: beyond the caches "
                           "each packet waits on memory"))
    rows = [[x["mode"], _f(x["ns"], "{:.1f}"), _f(x["ratio"]), _f(x["single_ns"], "{:.0f}"), x["check"]]
            for x in r.get("modes", [])]
    if rows:
        parts.append(table(["forwarding mode, established", "ns/pkt", "x minimal", "single-run ns", "check"], rows,
                           "1g. every mode through the control plane's model: one packet per test run, calibrated "
                           "on FNAT v4 (its repeat-loop figure from 1a)"))
    rows = [[x["table"], _f(x["alone_ns"], "{:.1f}"), _f(x["both_ns"], "{:.1f}")] for x in r.get("contention", [])
            if "na" not in x]
    if rows:
        parts.append(table(["conn table", "one CPU ns/pkt", "both CPUs at once ns/pkt"], rows,
                           "1i. one established flow on both CPUs at once: both read a shared value (written at most once a jiffy)"))
    rows = [[x["table"], x["flood_on"], x["idle"], f"{x['idle_lost_client']} / {x['idle_lost_server']}",
             f"{x['active_lost']} of {x['active']}", f"{x['flood_entries']} into {x['size']}"]
            for x in r.get("flood", []) if "na" not in x]
    rows += [[x["table"], "n/a", "", "", "", x["na"]] for x in r.get("flood", []) if "na" in x]
    if rows:
        parts.append(table(["conn table", "flood on CPU", "idle conns", "idle lost: client / server entry",
                            "sending conns lost", "flood entries"], rows,
                           "1k. a SYN flood from spoofed sources, 4 x a full table: which established connections "
                           "lose an entry (the kernel's LRU)"))
    prof = r.get("profile") or {}
    rows = []
    for c in prof.get("cases", []):
        if "na" in c:
            rows.append([c["case"], "n/a", "", "", c["na"]])
            continue
        top = ", ".join(f"{t['sym']} {t['ns']:.0f}" for t in c["top"][:4])
        for i, g in enumerate(c["groups"]):
            rows.append([c["case"] if i == 0 else "", g["group"], _f(g["ns"], "{:.1f}"), _f(g["pct"], "{:.0f}%"),
                         top if i == 0 else ""])
    if rows:
        parts.append(table(["case", "where (kernel symbols, grouped)", "ns/pkt", "share", "top symbols (ns)"], rows,
                           "1j. where the time goes: perf samples on the bench CPU, idle left out, scaled to the "
                           f"case's ns/packet (return stack overflow mitigation: {prof.get('srso', 'unknown')})"))
    parts.append(targets_table(r["targets"], "1f. targets"))
    return "\n\n".join(parts)


E2E_COLS = [("udp", "UDP Mpps"), ("udp_trafgen", "UDP Mpps (trafgen)"), ("cps", "conn/s"), ("cps_light", "conn/s"),
            ("iperf_tso_off", "TCP Gbit/s TSO off"), ("iperf_tso_on", "TCP Gbit/s TSO on")]


E2E_TITLES = {"udp": "2b. UDP delivered, as ratios",
              "udp_trafgen": "2b'. UDP delivered with trafgen sending (user-space generator: the second opinion)",
              "cps": "2c. new TCP connections/s (wrk, Connection: close)",
              "cps_light": "2c'. new TCP connections/s with light endpoints (cps_loop: connect, reset once established)",
              "iperf_tso_off": "2d. TCP throughput (iperf3), offloads off", "iperf_tso_on": "2e. TCP throughput, TSO/GSO/GRO on"}


def _metric(m: dict, key: str):
    if m is None:
        return None
    if "na" in m:
        return None
    return {"udp": m.get("mpps"), "udp_trafgen": m.get("mpps"), "cps": m.get("cps"), "cps_light": m.get("cps"),
            "iperf_tso_off": m.get("gbps"),
            "iperf_tso_on": m.get("gbps")}[key]


def fmt_e2e(r: dict) -> str:
    if "na" in r:
        return f"e2e: n/a ({r['na']})"
    rows_ = r["rows"]
    by = {x["peer"]: x for x in rows_}
    parts = []
    fl = r.get("floor", {})
    from bench.history import e2e_generator

    gen = e2e_generator(r)
    parts.append(f"2. end to end, two-arm netns lab (64-byte UDP from the {gen} generator; "
                 f"generator+sink floor {fl.get('mpps', 0):.2f} Mpps = {1e3 / fl['mpps']:.0f} ns/pkt)"
                 if fl.get("mpps") else "2. end to end, two-arm netns lab")
    rows = []
    for x in rows_:
        u = x.get("udp") or {"na": "not measured"}
        rows.append([x["peer"],
                     "n/a" if "na" in u else _f(u.get("mpps"), "{:.3f}"),
                     "" if "na" in u else _f(u.get("gen_mpps")),
                     "" if "na" in u else _f(u.get("lb_ns"), "{:.0f}"),
                     "" if "na" in u else _f(u.get("lb_only_mpps")),
                     "" if "na" in u else "/".join(f"{s:.2f}" for s in u.get("spread", [])),
                     u.get("na", "") + (f"hdslbd CPU {u['daemon_cpu_pct']}%" if "daemon_cpu_pct" in u else "")
                     + ("passes (forward, back): " + " / ".join(f"{m:.3f}" for m in u["passes_mpps"])
                        if "passes_mpps" in u else "")])
    parts.append(table(["peer", "delivered Mpps", "sent Mpps", "LB ns/pkt (est.)", "LB-only Mpps (est.)",
                        "spread rs1/rs2", "note"], rows,
                       "2a. UDP packets/s delivered to the real servers (the peers the targets compare, here and in 2c: "
                       "the mean of two passes after the per-peer loop, forward then back)"))
    for key, label in E2E_COLS:
        rows = []
        nft = _metric((by.get("nftables DNAT") or {}).get(key), key)
        rt = _metric((by.get("plain routing") or {}).get(key), key)
        for x in rows_:
            m = x.get(key) or {}
            v = _metric(m, key)
            note = m.get("na", "") if m else ""
            if m and m.get("errors"):
                note += f"errors: {m['errors']}"
            if m and "passes" in m:
                note += f" passes (forward, back) {'/'.join(map(str, m['passes']))}, runs {'/'.join(map(str, m['runs']))}"
            elif m and len(m.get("runs", ())) > 1:
                note += f" median of {'/'.join(map(str, m['runs']))}"
            if m and "daemon_cpu_pct" in m:
                note += f" hdslbd CPU {m['daemon_cpu_pct']}%"
            fmtv = "{:.3f}" if key.startswith("udp") else ("{:.0f}" if key.startswith("cps") else "{:.2f}")
            rows.append([x["peer"], "n/a" if v is None else _f(v, fmtv),
                         _f(v / nft) if v is not None and nft else "", _f(v / rt) if v is not None and rt else "",
                         note.strip()])
        parts.append(table(["peer", label, "x nft DNAT", "x routing", "note"], rows, E2E_TITLES[key]))
    rows, same_minute, abba = [], False, False
    for x in rows_:
        fl = dict((x.get("udp_flows") or {}).get("by_flows") or {})
        same_minute |= "1024" in fl
        abba |= bool(fl) and "order" in x["udp_flows"]
        # the 1024-flow figure of the same minute when the run measured one (since the main UDP figure of the
        # targets' peers is measured after the loop), else the main figure
        base = fl.pop("1024", None) or _metric(x.get("udp"), "udp")
        if fl and base:
            rows.append([x["peer"], _f(base, "{:.3f}")] + [_f(v, "{:.3f}") for v in fl.values()]
                        + [_f(list(fl.values())[-1] / base)])
    if rows:
        counts = [c for c in next(x["udp_flows"]["by_flows"] for x in rows_
                                  if (x.get("udp_flows") or {}).get("by_flows")) if c != "1024"]
        parts.append(table(["peer", "1024 flows"] + [f"{c} flows" for c in counts] + [f"{counts[-1]} / 1024"], rows,
                           f"2g. UDP Mpps by concurrent flows ({gen} generator, source ports"
                           + ("; the columns of a row measured in the same minute" if same_minute else "")
                           + ("; the peers forward and back, each figure the mean of its two passes" if abba else "")
                           + ")"))
    parts.append(targets_table(r["targets"], "2f. targets (measured = ratio of delivered rates; LB-only est. in brackets)"))
    return "\n\n".join(parts)


def _fmt_memory(m: dict, what: str) -> str:
    if "na" in m:
        return f"3a. memory ({what}): n/a ({m['na']})"
    rows = [["conn4_map entries (max)", m["max_entries"]], ["connections filled by the fast path", m["filled_connections"]],
            ["entries after the fill", m.get("entries_after_fill", "n/a")],
            ["memlock (fdinfo)", f"{m['memlock_bytes'] / 2**20:.1f} MiB"],
            ["bpftool bytes_memlock", f"{m.get('bpftool_bytes_memlock', 0) / 2**20:.1f} MiB" if m.get("bpftool_bytes_memlock") else "n/a"],
            ["Percpu delta at creation", f"{m['percpu_delta'] / 2**20:.1f} MiB"],
            ["MemAvailable drop (creation / after fill)", f"{m['memavailable_delta'] / 2**20:.0f} / {m['memavailable_delta_after_fill'] / 2**20:.0f} MiB"],
            ["bytes per entry", f"{m['bytes_per_entry']:.0f}"],
            ["bytes per connection (2 entries)", f"{m['bytes_per_connection']:.0f}"],
            ["layout", m["layout"]["note"]],
            ["conn6_map beside (IPv6/NAT64, fixed)", f"{m['conn6_map']['max_entries']} entries, "
                                                     f"{m['conn6_map']['memlock_bytes'] / 2**10:.0f} KiB"
             if "conn6_map" in m else "n/a"],
            ["fill (chained SYNs)", f"{m['fill_seconds']} s, {m['fill_ns_per_conn']} ns/conn, drops {m['fill_drops'] or 'none'}"]]
    rows += [[f"daemon {'runs' if name.startswith(('aging sweep', 'a restart')) else 'reads'} {name}", _fmt_scan(v)]
             for name, v in m.get("scans", {}).items()]
    return table(["memory", "value"], rows, f"3a. memory at {m['connections']} connections ({what})")


def _fmt_scan(v: dict) -> str:
    """One of 3a's scans: a timed read of the table ({entries, seconds}), or ipvsadm -Lnc's paged listing
    (scale.conn_pages_cost: pages, lines, daemon and client seconds, the loop's longest stall)."""
    if "pages" in v:
        text = (f"{v['daemon_seconds']} s daemon + {v['client_seconds']} s client: {v['lines']} lines in "
                f"{v['pages']} pages, loop held at most {v['longest_loop_stall_s']} s")
        return text + (f" ({v['error']})" if v.get("error") else "")
    if "first_seconds" in v:  # a restart into the other table kind (scale.restart_into_other_kind)
        return (f"{v['first_seconds']} s + {v['second_seconds']} s copying {v['entries']} entries "
                f"({v['load_seconds']} s compile and set-aside before)")
    return f"{v['seconds']} s for {v['entries']} entries"


def fmt_scale(r: dict) -> str:
    parts = []
    for key, what in (("memory", "per-CPU values, the default"), ("memory_shared", "--conn-table shared")):
        if key in r:
            parts.append(_fmt_memory(r[key], what))
    ob = r.get("op_breakdown", {})
    if ob.get("routes"):
        rows = [[x["routes_in_model"], x["route_add_model_us"], x["save_state_us"]] for x in ob["routes"]]
        parts.append(table(["routes in model", "route_add model-only us", "save-state after each change us"], rows,
                           "3b. one control op, in process: the model's work vs the save after every change"))
    if "daemon" in r:
        parts.append(f"3c. daemon loads: n/a ({r['daemon']['na']})")
    else:
        rows = []
        for k in ("latency_idle", "latency_traffic"):
            for op, v in r.get(k, {}).items():
                rows.append([op, "idle" if k == "latency_idle" else f"{r.get('traffic_mpps')} Mpps through the LB",
                             v["p50_us"], v["p99_us"], v["n"]])
        parts.append(table(["control op", "while", "p50 us", "p99 us", "n"], rows, "3c. control-op latency (unix socket)"))
        rows = []
        s = r.get("services", {})
        if s:
            rows.append(["ipvsadm -R 10k services + 100k RS", f"{s['seconds']} s",
                         f"{s['services_loaded']} services, {s['lines_refused']} lines refused", s.get("note", "")])
        ro = r.get("routes", {})
        if ro:
            rate = (f"{ro['rate_per_s']}/s" if "rate_per_s" in ro else
                    f"{ro['rate_first_1k_per_s']}/s first 1k, {ro['rate_last_1k_per_s']}/s last 1k")
            rows.append([ro.get("label", "100k routes (Client, one connection)"), f"{ro['seconds']} s",
                         f"{ro['loaded']} routes", rate + (" (budget hit)" if ro["timed_out"] else "")
                         + (f"; {ro['first_error']}" if ro.get("first_error") else "")])
        re_ = r.get("rest", {})
        if re_:
            rows.append(["REST 10k services + 100k RS (PATCH /v2/vs)", "n/a" if "na" in re_ else f"{re_['seconds']} s",
                         re_.get("na", f"{re_.get('services_loaded')} services, {re_.get('rs_loaded')} RS"),
                         (re_.get("first_error") or "") + (" (budget hit)" if re_.get("timed_out") else "")])
        rp = r.get("rest_per_service", {})
        if rp:
            rows.append(["REST 10k x PUT /v2/vs/{VipPort} with RSs", "n/a" if "na" in rp else f"{rp['seconds']} s",
                         rp.get("na", f"{rp.get('services_loaded')} services, {rp.get('rs_loaded')} RS"),
                         (rp.get("first_error") or "") + (" (budget hit)" if rp.get("timed_out") else "")])
        rr = r.get("rest_resync", {})
        if rr:
            rows.append(["REST the same 10k PUTs again (nothing changed: a re-sync)", f"{rr['seconds']} s",
                         f"{rr.get('services_loaded')} services", rr.get("first_error") or ""])
        parts.append(table(["load", "time", "loaded", "note"], rows, "3d. bulk loads against a running hdslbd"))
        ts = [x["target"] for x in (s, ro, re_, rp) if x and "target" in x]
        for key in ("memory_shared", "memory"):
            if "target" in r.get(key, {}):
                ts.insert(0, r[key]["target"])
        parts.append(targets_table(ts, "3e. targets"))
        li = r.get("listing")
        if li:
            rows = [[op, "n/a" if t is None else f"{t} s", ""] for op, t in li.get("round_trip_s", {}).items()]
            rows += [[f"daemon.status while {k}", f"p50 {v['p50_ms']} / p99 {v['p99_ms']} / max {v['max_ms']} ms",
                      f"n {v['n']}, {v['busy_calls']} listings meanwhile"] for k, v in li.get("status_while", {}).items()]
            parts.append(table(["op", "time", "note"], rows,
                               f"3f. listing {li.get('services')} services x 10 real servers: round trips, and what "
                               "another client waits meanwhile (max = longest event-loop stall)"))
    return "\n\n".join(parts)


def markdown(res: dict) -> str:
    mc = res["machine"]
    lines = [f"Benchmarks ({res['date']}, {mc['nproc']} vCPU, {mc['cpu']}, kernel {mc['kernel']}; `make bench`)", ""]
    pc = res.get("prog_cost", {})
    if pc.get("hdslb"):
        lines += ["| per-packet cost (BPF_PROG_TEST_RUN) | ns | x minimal |", "|---|---:|---:|"]
        for x in pc["hdslb"]:
            if not x.get("cross_check"):
                lines.append(f"| {x['case']} | {x['ns']:.0f} | {x['ratio']:.2f} |")
        for x in pc.get("modes", [])[1:]:
            if x["ns"] is not None:
                lines.append(f"| established {x['mode']} (calibrated single runs) | {x['ns']:.0f} | {x['ratio']:.2f} |")
        for x in pc["reference"]:
            if x["prog"] in ("ref_bare_tx", "ref_minimal"):
                lines.append(f"| reference: {x['desc']} | {x['ns']:.0f} | {x['ratio']:.2f} |")
        lines.append("")
    e = res.get("e2e", {})
    if e.get("rows"):
        lines += ["| e2e (netns, veth) | UDP Mpps | UDP Mpps (trafgen) | conn/s | TCP Gbit/s (TSO off / on) |",
                  "|---|---:|---:|---:|---:|"]
        for x in e["rows"]:
            u, c = _metric(x.get("udp"), "udp"), _metric(x.get("cps"), "cps")
            tg = _metric(x.get("udp_trafgen"), "udp_trafgen")
            t0, t1 = _metric(x.get("iperf_tso_off"), "iperf_tso_off"), _metric(x.get("iperf_tso_on"), "iperf_tso_on")
            lines.append(f"| {x['peer']} | {_f(u, '{:.2f}') or 'n/a'} | {_f(tg, '{:.2f}') or 'n/a'} | "
                         f"{_f(c, '{:.0f}') or 'n/a'} | {_f(t0) or 'n/a'} / {_f(t1) or 'n/a'} |")
        lines.append("")
    s = res.get("scale", {})
    m, sh = s.get("memory", {}), s.get("memory_shared", {})
    if "bytes_per_connection" in m:
        lines.append(f"Connection table: {m['bytes_per_connection']:.0f} B per IPv4 connection (both directions, "
                     f"{mc['nproc']} CPUs, per-CPU values) at {m['connections']} connections"
                     + (f"; {sh['bytes_per_connection']:.0f} B with --conn-table shared." if "bytes_per_connection" in sh
                        else "."))
    return "\n".join(lines)


def chart(res: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install matplotlib)"
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    e = res.get("e2e", {})
    ax = axes[0]
    if e.get("rows"):
        names = [x["peer"] for x in e["rows"] if _metric(x.get("udp"), "udp") is not None]
        vals = [_metric(x["udp"], "udp") for x in e["rows"] if _metric(x.get("udp"), "udp") is not None]
        est = [x["udp"].get("lb_only_mpps") or 0 for x in e["rows"] if _metric(x.get("udp"), "udp") is not None]
        ys = range(len(names))
        ax.barh([y + 0.2 for y in ys], vals, height=0.4, label="delivered (1 core: generator + LB + sink)")
        ax.barh([y - 0.2 for y in ys], est, height=0.4, label="LB-only estimate (floor removed)")
        ax.set_yticks(list(ys), names)
        ax.invert_yaxis()
        ax.set_xlabel("Mpps, 64-byte UDP")
        ax.set_title("end to end (netns lab)")
        ax.legend(fontsize=8)
    ax = axes[1]
    pc = res.get("prog_cost", {})
    if pc.get("hdslb"):
        items = [(x["prog"], x["ns"]) for x in pc["reference"] if not x["alternative"]]
        own = [("hdslb: " + x["case"], x["ns"]) for x in pc["hdslb"] if not x.get("cross_check")]
        ax.barh(range(len(items) + len(own)), [v for _, v in items + own],
                color=["tab:gray"] * len(items) + ["tab:blue"] * len(own))
        items += own
        ax.set_yticks(range(len(items)), [n for n, _ in items], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ns per packet (BPF_PROG_TEST_RUN, log scale)")
        ax.set_title("per-packet cost")
    mc = res["machine"]
    fig.suptitle(f"hdslb bench {res['date']} — {mc['nproc']} vCPU {mc['cpu']}, kernel {mc['kernel']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(res: dict, partial: bool = False) -> tuple[Path, Path | None, str | None]:
    """The day's results file; a quick or partial run (--quick, --only, --peers) writes <date>-quick or
    <date>-partial beside it (not kept in git) so it never replaces that day's full run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = res["date"] + ("-quick" if res.get("quick") else "-partial" if partial else "")
    jp = RESULTS / f"{stem}.json"
    jp.write_text(json.dumps(res, indent=1, default=str) + "\n")
    pp = RESULTS / f"{stem}.png"
    err = chart(res, pp)
    return jp, (None if err else pp), err


def today() -> str:
    return datetime.date.today().isoformat()
