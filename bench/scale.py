"""Section 3: scale — memory per connection at 1M connections, bulk load times, control-op latency under traffic.

- Memory: a FastPath compiled with Sizes(max_conns=1<<21) (2M entries of conn4_map = 1M IPv4 connections, one
  entry per direction), filled with 1M real connections by the fast path itself: chained SYNs in BPF_PROG_TEST_RUN
  (see prog_cost.new_flow_chain; every iteration is a new flow) spread over 16 local addresses per
  service so no local port repeats. Memory is the map's `memlock` from /proc/self/fdinfo (the kernel's
  own accounting), cross-checked with `bpftool map show` and the Percpu/MemAvailable deltas in
  /proc/meminfo around the map's creation.
- Load times run against hdslbd started with hdslb-ctl in a lab namespace with --max-services 16384
  --max-dests 131072: `ipvsadm -R` of 10k services x 10 real servers (one process; the lines go as one
  batch request, validated on a scratch model and applied with each service's table built once),
  100k routes with `dpip -b FILE` (one process, one batch request), and the REST API (keep-alive
  HTTP/1.1): one PUT /v2/vs/{VipPort} per service carrying its 10 real servers (RSs). Times are wall
  clock from the tool's start to its exit (REST: first request to last reply), process start and
  parsing included. Each load has a time budget; what did not finish in it is reported with the count
  loaded, not extrapolated silently.
- Control-op latency: service.list / dest.edit / daemon.status round trips on the control socket while
  the UDP generator (livegen.make: live frames, or the XDP loop) pushes UDP through the balancer, and idle for
  comparison.
- Listing at scale (3f), with the 10k x 10 of `ipvsadm -R` loaded: the round trip of what ipvsadm -Ln, hdslb-ctl
  top and a Prometheus scrape ask (service.list, stats.get, conn.list, GET /metrics), and `daemon.status` p50 /
  p99 / max on a second connection while another client lists back to back (or scrapes /metrics back to back):
  the max is the longest the daemon's event loop was held, what ARP/ND answers and health checks waited too.
"""

from __future__ import annotations

import ctypes as ct
import http.client
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import threading
import time

from bench import livegen, ref_progs

TARGET_BYTES_PER_CONN = 256
TARGET_LOAD_S = 10.0
# The daemon of the load section: room for the 10k-service loads (4096 services / 65,536 slots by default).
MAX_SERVICES = 16384
MAX_DESTS = 131072


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


def _fdinfo(fd: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k.strip()] = v.strip()
    return out


# --------------------------------------------------------------------------- memory at 1M connections

def memory(quick: bool, log, table: str = "percpu") -> dict:
    from hdslb.fastpath.loader import DEFAULT_PIN_ROOT, FastPath, Sizes, ensure_bpffs, possible_cpus
    from hdslb.fastpath.maps import Maps
    from hdslb.fastpath.testrun import run_xdp

    from bench import prog_cost as pc

    conns = 1 << 20 if not quick else 1 << 17
    # Two entries a connection, and a power of two as the config's default conn_pool_size (2^21) is: the kernel
    # rounds the bucket array (16 B a bucket) up to one, so a table just above a power of two pays it twice.
    entries = 2 * conns
    ensure_bpffs(DEFAULT_PIN_ROOT)
    # a table measured just before is freed after an RCU grace period: wait for the counters to settle
    m0, deadline = _meminfo(), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        m1 = _meminfo()
        if m1.get("Percpu") == m0.get("Percpu") and abs(m1["MemAvailable"] - m0["MemAvailable"]) < 4 << 20:
            break
        m0 = m1
    fp = FastPath(os.path.join(DEFAULT_PIN_ROOT, f"bench-scale-{os.getpid()}"),
                  Sizes(max_conns=entries, max_conns6=256, max_services=64, max_dests=256, max_local=64, max_routes=256,
                        max_neigh=64, conn_table=table))
    res: dict = {"table": table, "connections": conns, "max_entries": entries, "possible_cpus": possible_cpus()}
    try:
        fp.load()
        m1 = _meminfo()
        maps = Maps(fp)
        # The connections are IPv4: they fill conn4_map. conn6_map (IPv6 and NAT64 flows) is sized apart
        # (--max-conns6, here its minimum as for an IPv4-only site) and reported beside as a fixed cost.
        t = fp.table("conn4_map")
        info = _fdinfo(t.map_fd)
        memlock = int(info.get("memlock", 0))
        res["conn6_map"] = {"max_entries": fp.sizes.conn6_entries(),
                            "memlock_bytes": int(_fdinfo(fp.table("conn6_map").map_fd).get("memlock", 0))}
        res.update({"memlock_bytes": memlock, "map_id": int(info.get("map_id", 0)),
                    "percpu_delta": m1.get("Percpu", 0) - m0.get("Percpu", 0),
                    "memavailable_delta": m0["MemAvailable"] - m1["MemAvailable"]})
        if shutil.which("bpftool") and res["map_id"]:
            r = subprocess.run(["bpftool", "-j", "map", "show", "id", str(res["map_id"])], capture_output=True, text=True)
            try:
                res["bpftool_bytes_memlock"] = int(json.loads(r.stdout).get("bytes_memlock", 0))
            except ValueError:
                pass
        # fill with real connections, made by the fast path itself (chained SYNs, 16 laddrs per service)
        b = pc._Bench(True, log)
        b.fp, b.maps = fp, maps
        b.setup()
        A = ipaddress.ip_address
        svc_b = pc.chain_services(maps)
        maps.set_laddrs(pc.TCP_SVC, [(A(f"192.168.101.{i + 1}"), pc.LO_IFINDEX) for i in range(16)])
        maps.set_laddrs(svc_b, [(A(f"192.168.102.{i + 1}"), pc.LO_IFINDEX) for i in range(16)])
        from scapy.layers.inet import IP, TCP
        from scapy.layers.l2 import Ether

        syn = bytes(Ether(src=pc.CLIENT_MAC, dst=pc.LB_MAC) / IP(src="10.3.0.1", dst=pc.VIP)
                    / TCP(sport=30000, dport=80, flags="S"))
        before = maps.counters()
        t0 = time.monotonic()
        _, _, ns = run_xdp(fp.prog_fd, syn, conns)
        fill_s = time.monotonic() - t0
        after = maps.counters()
        made = after["conn_new"] - before["conn_new"]
        res.update({"filled_connections": made, "fill_seconds": round(fill_s, 2), "fill_ns_per_conn": ns,
                    "entries_after_fill": maps.conn_entries(),
                    "fill_drops": {k: after[k] - before[k] for k in after
                                   if k.startswith("drop") and after[k] != before[k]}})
        m2 = _meminfo()
        res["memavailable_delta_after_fill"] = m0["MemAvailable"] - m2["MemAvailable"]
        # What the daemon pays to look at that table: the aging sweep's and connection counts' batched view,
        # and the full per-entry dicts of ipvsadm -Lnc / conn.list.
        scans = {}
        for name, fn in (("entries (stats.get)", maps.conn_entries),
                         ("aging columns (sweep, ActiveConn/InActConn)", lambda: len(maps.conn_aging_columns())),
                         ("conn.list dicts (ipvsadm -Lnc)", lambda: sum(1 for _ in maps.conns()))):
            t0 = time.monotonic()
            n = fn()
            scans[name] = {"entries": n, "seconds": round(time.monotonic() - t0, 2)}
        scans["conn.list pages (ipvsadm -Lnc: columns snapshot, 20k-entry pages encoded)"] = conn_pages_cost(maps)
        scans.update(restart_into_other_kind(fp))
        # The aging sweep with every flow past its timeout (the clock moved a day on): scan, pairing, and the
        # removal of all of them (hdslb_sweep in the kernel), as the daemon runs it.
        import types

        from hdslb.daemon import DEFAULT_TIMEOUTS, Daemon
        from hdslb.fastpath.clock import JiffiesClock

        class _DayLater(JiffiesClock):
            def mono_to_jiffies(self, ns):
                return super().mono_to_jiffies(ns + 86400 * 10**9)

        maps.clock = _DayLater()
        d = types.SimpleNamespace(maps=maps, settings=types.SimpleNamespace(timeouts=dict(DEFAULT_TIMEOUTS)),
                                  _conn_cache=None, _counts_cache=None,
                                  bal=types.SimpleNamespace(services={}))  # no model: no nodest/template work
        t0 = time.monotonic()
        gone = Daemon.sweep(d)
        scans["aging sweep removing every flow (scan + removal in the kernel)"] = {
            "entries": gone, "seconds": round(time.monotonic() - t0, 2)}
        res["scans"] = scans
        res["bytes_per_entry"] = memlock / entries
        res["bytes_per_connection"] = 2 * memlock / entries
        res["target"] = {"name": f"<= {TARGET_BYTES_PER_CONN} B per connection (both directions), {table} table",
                         "note": f"IPv4 connections in conn4_map; conn6_map ({res['conn6_map']['max_entries']} "
                                 f"entries) takes {res['conn6_map']['memlock_bytes'] / 2**10:.0f} KiB beside, "
                                 "whatever the connection count",
                         "value": round(res["bytes_per_connection"], 1), "limit": TARGET_BYTES_PER_CONN,
                         # per connection to 0.1 B: memlock also counts the map's own ~0.9 KB, whatever its size
                         "pass": round(res["bytes_per_connection"], 1) <= TARGET_BYTES_PER_CONN}
        ks, vs = ct.sizeof(t.Key), ct.sizeof(getattr(t, "sLeaf", t.Leaf))
        res["layout"] = {"key_bytes": ks, "value_bytes": vs,
                         "note": (f"per entry: key {ks} B + value {vs} B x {res['possible_cpus']} possible CPUs "
                                  "(per-CPU map) + hash/LRU element header" if table == "percpu" else
                                  f"per entry: key {ks} B + value {vs} B once (shared by every CPU) + hash/LRU "
                                  "element header")}
        log(f"  conn4_map ({table}) {entries} entries: memlock {memlock / 2**20:.1f} MiB, {res['bytes_per_connection']:.0f} B/conn; "
            f"filled {made} conns in {fill_s:.1f} s")
    finally:
        fp.close()
        fp.unpin()
    return res


def restart_into_other_kind(fp) -> dict:
    """A restart asking for the other --conn-table on these pins, as hdslbd makes it: the loader sets the full
    table aside and makes the new one (timed with its compile), then the copy before attaching and the pass
    after (nothing attached here: the second pass finds every entry already there)."""
    from hdslb.fastpath.loader import FastPath, Sizes

    other = "shared" if fp.sizes.conn_table == "percpu" else "percpu"
    new = FastPath(fp.pin_dir, Sizes(**{**fp.sizes.__dict__, "conn_table": other}))
    try:
        t0 = time.monotonic()
        new.load(adopt=True)
        t1 = time.monotonic()
        first = new.move_conns(final=False)
        t2 = time.monotonic()
        second = new.move_conns(final=True)
        t3 = time.monotonic()
    finally:
        new.close()
    return {f"a restart into a {other} table (compile + set aside, copy before attaching, pass after)": {
        "entries": first.copied, "seconds": round(t3 - t1, 2), "load_seconds": round(t1 - t0, 2),
        "first_seconds": round(t2 - t1, 2), "second_seconds": round(t3 - t2, 2), "dropped": first.dropped,
        "second_kept": second.kept}}


def conn_pages_cost(maps, old: bool = False) -> dict:
    """ipvsadm -Lnc as the daemon serves it, on these maps: conn.list page by page (inbound entries, pages of the
    CLI's size, each reply msgpack-encoded on the loop as the control server does), with a task ticking every
    millisecond on the same event loop to find its longest stall; then the client's side (decoding and formatting
    every page). old: the dict-based listing instead (one unpaged reply; past ~210k connections refused as larger
    than a control frame after it was built and encoded)."""
    import asyncio
    import types

    import msgpack

    from cli import ipvsadm
    from hdslb.ctl import commands, protocol
    from hdslb.daemon import DEFAULT_TIMEOUTS, Daemon

    d = types.SimpleNamespace(maps=maps, settings=types.SimpleNamespace(timeouts=dict(DEFAULT_TIMEOUTS)),
                              persist_list=lambda: [], _conn_cache=(0.0, None))
    d.idle_limits = lambda unit=lambda x: x: Daemon.idle_limits(d, unit)
    d._conns = lambda: Daemon._conns(d)
    if old:
        d.conn_list = lambda: Daemon.conn_list(d)
        d.conn_list_async = lambda: Daemon.conn_list_async(d)
    else:
        d.conn_listing = lambda inbound=False: Daemon.conn_listing(d, inbound)
    fmt = ipvsadm.parse(["-Lnc"]).fmt

    async def main():
        stall, done, replies = [0.0], [False], []

        async def ticker():
            last = time.monotonic()
            while not done[0]:
                await asyncio.sleep(0.001)
                now = time.monotonic()
                stall[0] = max(stall[0], now - last)
                last = now

        tick = asyncio.create_task(ticker())
        t0 = time.monotonic()
        args = {} if old else {"limit": ipvsadm.CONN_PAGE, "inbound": True}
        err = None
        while True:
            res = commands.dispatch(d, "conn.list", args)
            data = await res if asyncio.iscoroutine(res) else res
            try:
                replies.append(protocol.encode(protocol.reply_ok(1, data)))
            except protocol.ProtocolError as e:
                err = str(e)
                break
            await asyncio.sleep(0)  # the reply goes out: other clients' turn
            if old or data.get("next") is None:
                break
            args = {"limit": ipvsadm.CONN_PAGE, "inbound": True, "cursor": data["cursor"], "offset": data["next"]}
        daemon_s = time.monotonic() - t0
        done[0] = True
        await tick
        return replies, daemon_s, stall[0], err

    replies, daemon_s, stall, err = asyncio.run(main())
    t0, lines = time.monotonic(), 0
    for r in replies:
        text = ipvsadm.format_conn_lines(msgpack.unpackb(r[4:], raw=False)["data"]["conns"], fmt)
        lines += text.count("\n")
    return {"pages": len(replies), "lines": lines, "reply_bytes": sum(len(r) for r in replies),
            "daemon_seconds": round(daemon_s, 2), "client_seconds": round(time.monotonic() - t0, 2),
            "longest_loop_stall_s": round(stall, 3), **({"error": err} if err else {})}


# --------------------------------------------------------------------------- daemon-side loads and latency

def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p / 100))] if s else float("nan")


def _latency(client, ops: list[tuple[str, dict]], n: int) -> dict:
    out = {}
    for op, args in ops:
        ds = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.call(op, args)
            ds.append((time.perf_counter() - t0) * 1e6)
        out[op] = {"p50_us": round(statistics.median(ds), 1), "p99_us": round(_pct(ds, 99), 1), "n": n}
    return out


def restore_text(n_svc: int, rs_per: int) -> str:
    lines = []
    for i in range(n_svc):
        vip = ipaddress.IPv4Address("10.100.0.0") + i
        lines.append(f"-A -t {vip}:80 -s rr")
        for j in range(rs_per):
            rs = ipaddress.IPv4Address("172.16.0.0") + i * rs_per + j
            lines.append(f"-a -t {vip}:80 -r {rs}:80 -b -w 1")
    return "\n".join(lines) + "\n"


def daemon_loads(quick: bool, log) -> dict:
    from hdslb.ctl.client import Client

    from bench import e2e

    class BigHdslb(e2e.Hdslb):
        """The e2e peer, started with limits that fit the bulk loads."""

        def run(self, tool, *args, timeout=120):
            if tool is e2e.HDSLB_CTL and args[:1] == ("up",):
                args = (*args, "--max-services", MAX_SERVICES, "--max-dests", MAX_DESTS)
            return super().run(tool, *args, timeout=timeout)

    res: dict = {"limits": {"max_services": MAX_SERVICES, "max_dests": MAX_DESTS}}
    bench = e2e.E2E(quick, log)
    bench.setup()
    peer = BigHdslb(bench, generic=False)
    try:
        peer.setup()
        lab = bench.lab
        path = str(lab.ctrl_path)
        # control-op latency, idle then under traffic
        n = 200 if quick else 1000
        svc = {"proto": "udp", "addr": e2e.VIP, "port": e2e.UDP_PORT}
        ops = [("daemon.status", {}), ("service.list", {}),
               ("dest.edit", {"svc": svc, "addr": lab.servers[0].ip, "port": e2e.UDP_PORT, "weight": 1})]
        with Client(path) as c:
            res["latency_idle"] = _latency(c, ops, n)
            g = livegen.make(lab.cl_ns, "eth0", bench._frame(e2e.VIP), cpu=0).start()
            try:
                time.sleep(0.5)
                c0, t0 = sum(ref_progs.sink_counts()[:-1]), time.monotonic()
                res["latency_traffic"] = _latency(c, ops, n)
                res["traffic_mpps"] = round((sum(ref_progs.sink_counts()[:-1]) - c0) / (time.monotonic() - t0) / 1e6, 3)
            finally:
                g.stop()
        log(f"  control-op latency idle {res['latency_idle']}")
        log(f"  control-op latency with {res['traffic_mpps']} Mpps through the LB {res['latency_traffic']}")
        res["services"] = _ipvsadm_restore(peer, lab, quick, log,
                                           measure=lambda: res.__setitem__("listing", listing(lab, quick, log)))
        res["routes"] = _routes(lab, quick, log)
        res["rest"] = _rest(lab, quick, log, bulk=True)
        try:
            lab.lb_run(e2e.IPVSADM + ["-C"], check=False, timeout=300)
        except Exception:
            pass
        res["rest_per_service"] = _rest(lab, quick, log, bulk=False)
        if res["rest_per_service"].get("services_loaded") == 10_000:
            res["rest_resync"] = _rest(lab, quick, log, bulk=False, resync=True)
    finally:
        try:
            peer.teardown()
        finally:
            bench.teardown()
    return res


def _status(path: str) -> dict:
    from hdslb.ctl.client import call

    return call("daemon.status", path=path, timeout=120)


def _ipvsadm_restore(peer, lab, quick: bool, log, measure=None) -> dict:
    from bench import e2e

    n_svc, rs_per = 10_000, 10
    budget = 60.0
    text = restore_text(n_svc, rs_per)
    nlines = text.count("\n")
    path = str(lab.ctrl_path)
    base = _status(path)["services"]
    t0 = time.monotonic()
    timed_out = False
    progress: list = []  # (seconds, services) polled on a second connection while -R runs
    stop = threading.Event()

    def poll():
        while not stop.wait(budget / 10):
            try:
                progress.append((round(time.monotonic() - t0, 1), _status(path)["services"] - base))
            except Exception:
                pass

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        r = lab.lb_run(e2e.IPVSADM + ["-R"], check=False, timeout=budget, input=text)
        stderr = r.stderr
    except Exception as e:  # CommandError on timeout: the ipvsadm process was killed
        timed_out = True
        stderr = getattr(e, "stderr", "") or ""
    took = time.monotonic() - t0
    stop.set()
    th.join()
    svcs = _status(path)["services"] - base
    refused = [ln for ln in stderr.splitlines() if ln.startswith("line ")]
    reasons: dict[str, int] = {}
    for ln in refused:
        msg = re.sub(r"\d+", "N", ln.split(":", 1)[1].strip())
        reasons[msg] = reasons.get(msg, 0) + 1
    out = {"services_requested": n_svc, "rs_requested": n_svc * rs_per, "lines": nlines,
           "method": "ipvsadm -R in the LB namespace: parse every line, then one batch request",
           "lines_per_s": round(nlines / took) if not timed_out else None,
           "seconds": round(took, 2), "timed_out": timed_out, "budget_s": budget, "services_loaded": svcs,
           "progress_s_services": progress, "lines_refused": len(refused), "refusals": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:4])}
    if timed_out:
        out["note"] = (f"stopped at the {budget:.0f} s budget with {svcs} services loaded "
                       f"(≈{svcs * (rs_per + 1) / took:.0f} lines/s)")
    elif refused:
        out["note"] = f"{len(refused)} of {nlines} lines refused; first reasons: {out['refusals']}"
    out["target"] = {"name": f"10k services + 100k RS via ipvsadm -R <= {TARGET_LOAD_S:.0f} s",
                     "value": round(took, 2) if not timed_out else None, "limit": TARGET_LOAD_S,
                     "pass": (not timed_out and not refused and took <= TARGET_LOAD_S)}
    log(f"  ipvsadm -R {n_svc} services/{n_svc * rs_per} RS: {took:.1f} s, {svcs} services loaded, "
        f"{len(refused)} lines refused{' (budget hit)' if timed_out else ''} {out['refusals']}")
    if measure is not None:  # what wants the 10k x 10 loaded (3f)
        try:
            measure()
        except Exception as e:
            log(f"  listing at scale: n/a ({type(e).__name__}: {e})")
    # leave the daemon small again for what follows
    t0 = time.monotonic()
    try:
        lab.lb_run(e2e.IPVSADM + ["-C"], check=False, timeout=300)
        out["flush_seconds"] = round(time.monotonic() - t0, 2)
    except Exception:
        pass
    return out


def _scrape(lab) -> tuple[float, int]:
    """One GET /metrics (gzip, as Prometheus asks) in the LB namespace: (seconds, bytes on the wire)."""
    from hdslb.lab import netns as nx

    sock = nx.ns_socket(lab.lb_ns, socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(120)
    sock.connect(("127.0.0.1", 53225))
    conn = http.client.HTTPConnection("127.0.0.1", 53225, timeout=120)
    conn.sock = sock
    try:
        t0 = time.perf_counter()
        conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
        r = conn.getresponse()
        body = r.read()
        took = time.perf_counter() - t0
        if r.status != 200:
            raise RuntimeError(f"GET /metrics: {r.status}")
        return took, len(body)
    finally:
        conn.close()


def listing(lab, quick: bool, log) -> dict:
    """3f: with the services of ipvsadm -R loaded, what a listing costs and what it makes others wait.

    Round trips (client's wall clock, median of a few) of service.list (ipvsadm -Ln, top, /metrics read it),
    stats.get, conn.list and a gzipped GET /metrics; then daemon.status on its own connection, back to back for
    a few seconds, idle and while another client lists (service.list back to back, as `hdslb-ctl top` with a
    short interval or several ipvsadm -Ln) or scrapes /metrics back to back. Its max is the longest the event
    loop was held (the slow path's ARP/ND answers, health checks and every other client wait as long)."""
    from hdslb.ctl.client import Client

    path = str(lab.ctrl_path)
    services = _status(path)["services"]
    out: dict = {"services": services}
    trips = {}
    with Client(path, timeout=300) as c:
        for op in ("service.list", "stats.get", "conn.list"):
            ds = []
            for _ in range(2 if quick else 3):
                t0 = time.perf_counter()
                c.call(op, {"svc": None} if op == "service.list" else {})
                ds.append(time.perf_counter() - t0)
            trips[op] = round(statistics.median(ds), 3)
    try:
        ds = [_scrape(lab) for _ in range(2 if quick else 3)]
        trips["GET /metrics (gzip)"] = round(statistics.median(d for d, _ in ds), 3)
        out["metrics_bytes"] = ds[-1][1]
    except Exception as e:
        trips["GET /metrics (gzip)"] = None
        out["metrics_na"] = f"{type(e).__name__}: {e}"
    out["round_trip_s"] = trips
    secs = 4.0 if quick else 8.0

    def probe(busy) -> dict:
        stop, lists = threading.Event(), [0]

        def lister():
            with Client(path, timeout=300) as c2:
                while not stop.is_set():
                    if busy == "service.list":
                        c2.call("service.list", {"svc": None})
                    else:
                        _scrape(lab)
                    lists[0] += 1

        th = threading.Thread(target=lister, daemon=True) if busy else None
        ds = []
        with Client(path, timeout=300) as c:
            if th is not None:
                th.start()
                time.sleep(0.2)
            end = time.monotonic() + secs
            while time.monotonic() < end:
                t0 = time.perf_counter()
                c.call("daemon.status", {})
                ds.append((time.perf_counter() - t0) * 1e3)
                time.sleep(0.001)  # a prober, not a load: ~1k calls a second at most
        stop.set()
        if th is not None:
            th.join(300)
        return {"p50_ms": round(statistics.median(ds), 2), "p99_ms": round(_pct(ds, 99), 2),
                "max_ms": round(max(ds), 1), "n": len(ds), "busy_calls": lists[0]}

    out["status_while"] = {"idle": probe(None), "service.list back to back": probe("service.list")}
    if trips.get("GET /metrics (gzip)") is not None:
        out["status_while"]["GET /metrics back to back"] = probe("metrics")
    log(f"  listing at {services} services: round trips {trips}")
    for k, v in out["status_while"].items():
        log(f"    daemon.status while {k}: p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms, max {v['max_ms']} ms "
            f"(n {v['n']}, {v['busy_calls']} listings meanwhile)")
    return out


def listing_only(quick: bool = False, log=print) -> dict:
    """3f on its own (development: `python -c 'from bench import scale; scale.listing_only()'`): the lab,
    hdslbd with the load section's limits, ipvsadm -R of 10k x 10, the listing measurements, teardown."""
    from bench import e2e

    class BigHdslb(e2e.Hdslb):
        def run(self, tool, *args, timeout=120):
            if tool is e2e.HDSLB_CTL and args[:1] == ("up",):
                args = (*args, "--max-services", MAX_SERVICES, "--max-dests", MAX_DESTS)
            return super().run(tool, *args, timeout=timeout)

    res: dict = {}
    bench = e2e.E2E(quick, log)
    bench.setup()
    peer = BigHdslb(bench, generic=False)
    try:
        peer.setup()
        res["services"] = _ipvsadm_restore(peer, bench.lab, quick, log,
                                           measure=lambda: res.__setitem__("listing", listing(bench.lab, quick, log)))
    finally:
        try:
            peer.teardown()
        finally:
            bench.teardown()
    return res


def route_batch_text(n: int, ifname: str) -> str:
    base = int(ipaddress.IPv4Address("20.0.0.0"))
    return "".join(f"route add {ipaddress.IPv4Address(base + (i << 8))}/24 dev {ifname}\n" for i in range(n))


def _routes(lab, quick: bool, log) -> dict:
    """100k routes with `dpip -b FILE`: one process, every line parsed, one batch request."""
    from bench import e2e

    n = 100_000
    budget = 60.0
    path = os.path.join(str(lab.workdir), "routes.dpip")
    with open(path, "w") as f:
        f.write(route_batch_text(n, "veth-lb1"))
    ctrl = str(lab.ctrl_path)
    before = len(_call(ctrl, "route.list", {"af": 4})["routes"])
    t0 = time.monotonic()
    timed_out, err = False, None
    try:
        r = lab.lb_run(e2e.DPIP + ["-b", path], check=False, timeout=budget)
        if r.returncode != 0:
            err = (r.stderr or r.stdout).strip()[:300]
    except Exception as e:  # CommandError on timeout
        timed_out, err = True, str(e)[:300]
    took = time.monotonic() - t0
    loaded = len(_call(ctrl, "route.list", {"af": 4})["routes"]) - before
    t1 = time.monotonic()
    _call(ctrl, "route.flush", {"af": 4})
    flush = time.monotonic() - t1
    out = {"requested": n, "loaded": loaded, "errors": 0 if err is None else 1, "first_error": err,
           "seconds": round(took, 2), "budget_s": budget, "timed_out": timed_out, "flush_seconds": round(flush, 2),
           "method": "dpip -b FILE in the LB namespace (one process, one batch request)",
           "label": "100k routes (dpip -b, one batch)",
           "rate_per_s": round(loaded / took) if took else None,
           # kept for the report's columns: one batch has no per-1k marks
           "rate_first_1k_per_s": round(loaded / took) if took else None, "rate_last_1k_per_s": None}
    out["target"] = {"name": f"100k routes <= {TARGET_LOAD_S:.0f} s", "value": round(took, 2) if not timed_out else None,
                     "limit": TARGET_LOAD_S, "pass": (not timed_out and err is None and loaded == n
                                                      and took <= TARGET_LOAD_S)}
    log(f"  routes: {loaded} loaded in {took:.1f} s with dpip -b{' (budget hit)' if timed_out else ''}"
        f"{'; ' + err if err else ''}; route.flush {flush:.1f} s")
    return out


def _call(path: str, op: str, args: dict):
    from hdslb.ctl.client import call

    return call(op, args, path=path, timeout=120)


def _rest(lab, quick: bool, log, bulk: bool, resync: bool = False) -> dict:
    """10k services x 10 real servers over REST: bulk = one PATCH /v2/vs carrying them all (hdslb's bulk
    extension, one batch); else one PUT /v2/vs/{VipPort} with RSs per service (dpvs-agent shaped). resync: the
    same PUTs again over the services they made, nothing changed (a controller re-asserting its whole state)."""
    from hdslb.lab import netns as nx

    if importlib.util.find_spec("hdslb.api") is None:
        return {"na": "no REST API in this checkout (hdslb/api)"}
    try:
        sock = nx.ns_socket(lab.lb_ns, socket.AF_INET, socket.SOCK_STREAM)
        # http.client sends headers and body in two writes: without NODELAY, Nagle holds the body until the
        # server's delayed ACK (~40 ms a request). curl, Go's net/http and aiohttp set it too.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(60)
        sock.connect(("127.0.0.1", 53225))
    except OSError as e:
        return {"na": f"REST API not reachable on 127.0.0.1:53225 in the LB namespace: {e}"}
    conn = http.client.HTTPConnection("127.0.0.1", 53225, timeout=60)
    conn.sock = sock
    n_svc, rs_per = 10_000, 10
    budget = 60.0
    done, first_err = 0, None
    t0 = time.monotonic()

    def req(method, url, body):
        conn.request(method, url, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status >= 300:
            raise RuntimeError(f"{method} {url}: {r.status} {data[:200]!r}")

    def rss(i):
        return [{"ip": str(ipaddress.IPv4Address("172.20.0.0") + i * rs_per + j), "port": 80, "weight": 1}
                for j in range(rs_per)]

    try:
        if bulk:
            conn.sock.settimeout(budget)
            req("PATCH", "/v2/vs", {"Items": [{"Addr": str(ipaddress.IPv4Address("10.200.0.0") + i), "Port": 80,
                                               "Proto": "tcp", "SchedName": "rr", "RSs": {"Items": rss(i)}}
                                              for i in range(n_svc)]})
            done = n_svc
        else:
            for i in range(n_svc):
                vip = ipaddress.IPv4Address("10.200.0.0") + i
                req("PUT", f"/v2/vs/{vip}-80-tcp", {"SchedName": "rr", "RSs": {"Items": rss(i)}})
                done += 1
                if time.monotonic() - t0 > budget:
                    break
    except Exception as e:
        first_err = str(e)[:300]
    took = time.monotonic() - t0
    conn.close()
    out = {"services_loaded": done, "rs_loaded": done * rs_per, "seconds": round(took, 2), "budget_s": budget,
           "first_error": first_err, "timed_out": done < n_svc and first_err is None,
           "requests_per_s": round(done / took) if took else None,
           "method": ("one PATCH /v2/vs with 10k services x 10 RSs (hdslb bulk extension, one batch; body built "
                      "and serialised inside the timing)" if bulk else
                      "PUT /v2/vs/{vip-80-tcp} with RSs (10 real servers) per service: one batch per request, one "
                      "keep-alive connection" + ("; again over the services it made, nothing changed" if resync
                                                 else ""))}
    if resync:  # no target: what a controller's periodic re-sync costs
        log(f"  REST PUT per service again, nothing changed: {done} services in {took:.1f} s"
            + (f"; stopped: {first_err}" if first_err else ""))
        return out
    out["target"] = {"name": f"10k services + 100k RS via REST ({'PATCH /v2/vs' if bulk else 'PUT per service'}) "
                             f"<= {TARGET_LOAD_S:.0f} s",
                     "value": round(took, 2) if done == n_svc else None, "limit": TARGET_LOAD_S,
                     "pass": done == n_svc and first_err is None and took <= TARGET_LOAD_S}
    log(f"  REST {'PATCH /v2/vs' if bulk else 'PUT per service'}: {done} services (+{done * rs_per} RS) in {took:.1f} s"
        + (f"; stopped: {first_err}" if first_err else "") + (" (budget hit)" if out["timed_out"] else ""))
    return out


def op_breakdown(quick: bool, log) -> dict:
    """Where a control op's time goes as the model grows, measured in this process without a daemon:
    the model's own work (Balancer over a null datapath) and the save the daemon does after every change
    (pack_snapshot + write + fsync to tmpfs, as hdslb.daemon._save_state)."""
    from hdslb.balancer import Balancer, Iface, pack_snapshot
    from hdslb.daemon import _NullDataPath

    bal = Balancer(_NullDataPath(), {"veth-lb1": Iface("veth-lb1", 3, b"\2" * 6, 1500)}, max_services=1 << 20,
                   max_dests=65535)
    sizes = [1000, 4000] if quick else [1000, 4000, 16000]
    out = []
    done = 0
    path = f"/run/hdslb/bench-save-{os.getpid()}"
    try:
        for size in sizes:
            t0 = time.perf_counter()
            k = 0
            while done < size:
                net = ipaddress.IPv4Network((int(ipaddress.IPv4Address("20.0.0.0")) + (done << 8), 24))
                bal.route_add({"prefix": str(net.network_address), "prefixlen": 24, "ifname": "veth-lb1"})
                done += 1
                k += 1
            model_us = (time.perf_counter() - t0) / max(k, 1) * 1e6
            took = 0.0
            for i in range(5):  # a route changed (its MTU), then the save: the routes are packed again each time
                bal.route_set({"prefix": str(net.network_address), "prefixlen": 24, "ifname": "veth-lb1",
                               "mtu": 1400 + i})
                t0 = time.perf_counter()
                with open(path, "wb") as f:
                    f.write(pack_snapshot(bal, {"checks": []}))
                    f.flush()
                    os.fsync(f.fileno())
                took += time.perf_counter() - t0
            save_us = took / 5 * 1e6
            out.append({"routes_in_model": size, "route_add_model_us": round(model_us, 1),
                        "save_state_us": round(save_us, 1)})
            log(f"    {size:>6} routes in the model: route_add (model only) {model_us:8.1f} us, "
                f"save after it {save_us:9.1f} us")
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return {"routes": out}


def run(quick: bool = False, log=print) -> dict:
    t0 = time.monotonic()
    res: dict = {}
    try:
        res["memory"] = memory(quick, log)
    except Exception as e:
        res["memory"] = {"na": f"{type(e).__name__}: {e}"}
        log(f"  memory: n/a ({e})")
    try:
        res["memory_shared"] = memory(quick, log, "shared")
    except Exception as e:
        res["memory_shared"] = {"na": f"{type(e).__name__}: {e}"}
        log(f"  memory (shared table): n/a ({e})")
    try:
        res["op_breakdown"] = op_breakdown(quick, log)
    except Exception as e:
        res["op_breakdown"] = {"na": f"{type(e).__name__}: {e}"}
    if os.geteuid() == 0:
        try:
            res.update(daemon_loads(quick, log))
        except Exception as e:
            res["daemon"] = {"na": f"{type(e).__name__}: {str(e)[-300:]}"}
            log(f"  daemon loads: n/a ({e})")
    res["seconds"] = round(time.monotonic() - t0, 1)
    return res
