"""Prometheus metrics read from the daemon at scrape time, named like node_exporter's IPVS collector (hdslb_ prefix).

A custom Collector, not process-global counters: every scrape asks the same commands ipvsadm and the REST API
use (service.list, stats.get), so the numbers on /metrics are the numbers `ipvsadm -L --stats` prints.

Per service (labels local_address, local_port, proto):
    hdslb_connections_total, hdslb_{incoming,outgoing}_{packets,bytes}_total
Per real server (labels local_address, local_port, remote_address, remote_port, proto):
    hdslb_backend_connections_total, hdslb_backend_{incoming,outgoing}_{packets,bytes}_total,
    hdslb_backend_connections_active, hdslb_backend_connections_inactive, hdslb_backend_weight,
    hdslb_backend_up (only when the daemon runs health checkers)
Fast path:
    hdslb_fastpath_packets_total{reason}   every fast-path counter (rx, verdict_*, pass_*, drop_*, ...)
    hdslb_fastpath_cpu_packets_total{cpu}  rx per CPU
    hdslb_conn_table_entries, hdslb_conn_table_size
    hdslb_slowpath_frames_total{counter[, ifname]}  (only when the daemon has a slow path)

Service and real-server traffic are separate families (node_exporter keeps one set of totals) so that
sum(hdslb_incoming_packets_total) never counts a packet twice.
"""

from __future__ import annotations

import ipaddress
import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hdslb.api import dispatch

log = logging.getLogger("hdslb.api.metrics")

SVC_LABELS = ["local_address", "local_port", "proto"]
RS_LABELS = ["local_address", "local_port", "remote_address", "remote_port", "proto"]
# (metric stem, traffic_stats field, help)
TRAFFIC = (
    ("connections", "conns", "connections scheduled"),
    ("incoming_packets", "inpkts", "packets client -> real server"),
    ("outgoing_packets", "outpkts", "packets real server -> client"),
    ("incoming_bytes", "inbytes", "bytes client -> real server"),
    ("outgoing_bytes", "outbytes", "bytes real server -> client"),
)


def _split_hostport(s: str) -> tuple[str, int]:
    """'10.0.0.1:80' or '[fd00::1]:80' (the health checker's spelling) -> (address, port)."""
    if s.startswith("["):
        host, _, port = s[1:].partition("]:")
    else:
        host, _, port = s.rpartition(":")
    return str(ipaddress.ip_address(host)), int(port)


def health_index(status: dict) -> dict:
    """health.status() -> {(PROTO, vip, vport, rip, rport): up}. Group-defined services have no single VIP: skipped."""
    out = {}
    for vs, st in (status or {}).items():
        try:
            hp, _, proto = vs.rpartition("/")
            vip, vport = _split_hostport(hp)
        except ValueError:
            continue
        for rs, rst in (st.get("real_servers") or {}).items():
            try:
                rip, rport = _split_hostport(rs)
            except ValueError:
                continue
            out[(proto.upper(), vip, vport, rip, rport)] = rst.get("state") == "up"
    return out


class HdslbCollector:
    """Reads the daemon context on every collect(); a section that fails is logged and left out, not fatal."""

    def __init__(self, ctx):
        self.ctx = ctx

    def describe(self):
        return []  # no scrape at registration time

    def collect(self):
        for section in (self._services, self._fastpath, self._slowpath):
            try:
                fams = list(section())
            except Exception as e:
                log.warning("metrics: %s skipped: %s", section.__name__.strip("_"), e)
                continue
            yield from fams

    # --- services and real servers ------------------------------------------------------------------
    def _services(self):
        data = dispatch(self.ctx, "service.list", {"svc": None})
        svc = {stem: CounterMetricFamily(f"hdslb_{stem}", f"Service {doc}", labels=SVC_LABELS)
               for stem, _, doc in TRAFFIC}
        rs = {stem: CounterMetricFamily(f"hdslb_backend_{stem}", f"Real server {doc}", labels=RS_LABELS)
              for stem, _, doc in TRAFFIC}
        active = GaugeMetricFamily("hdslb_backend_connections_active", "Established TCP connections (ActiveConn)",
                                   labels=RS_LABELS)
        inactive = GaugeMetricFamily("hdslb_backend_connections_inactive", "Other connections (InActConn)",
                                     labels=RS_LABELS)
        weight = GaugeMetricFamily("hdslb_backend_weight", "Real server weight", labels=RS_LABELS)
        health = self._health()
        up = GaugeMetricFamily("hdslb_backend_up", "1 while every health checker of the real server passes",
                               labels=RS_LABELS)
        overloaded = GaugeMetricFamily("hdslb_backend_overloaded",
                                       "1 while above its upper connection threshold (-x): no new flows",
                                       labels=RS_LABELS)
        for s in data["services"]:
            proto = s["proto"].upper()
            # a SNAT service has no VIP: its match (what -H says) names it, one series per service
            vaddr = ("match:" + ",".join(f"{k}={v}" for k, v in s["match"].items() if v)) if s.get("match") \
                else s["addr"]
            sl = [vaddr, str(s["port"]), proto]
            stats = s.get("stats") or {}
            for stem, key, _ in TRAFFIC:
                svc[stem].add_metric(sl, stats.get(key, 0))
            for d in s["dests"]:
                rl = [vaddr, str(s["port"]), d["addr"], str(d["port"]), proto]
                dstats = d.get("stats") or {}
                for stem, key, _ in TRAFFIC:
                    rs[stem].add_metric(rl, dstats.get(key, 0))
                active.add_metric(rl, d.get("active", 0))
                inactive.add_metric(rl, d.get("inactive", 0))
                weight.add_metric(rl, d["weight"])
                overloaded.add_metric(rl, 1 if d.get("overloaded") else 0)
                if health is not None:
                    h = health.get((proto, s["addr"], s["port"], d["addr"], d["port"]))
                    if h is not None:
                        up.add_metric(rl, 1 if h else 0)
        yield from svc.values()
        yield from rs.values()
        yield from (active, inactive, weight, overloaded)
        if health is not None:
            yield up

    def _health(self) -> dict | None:
        checker = getattr(self.ctx, "health", None)
        status = getattr(checker, "status", None)
        if not callable(status):
            return None
        try:
            return health_index(status())
        except Exception as e:
            log.warning("metrics: health status skipped: %s", e)
            return None

    # --- fast path ----------------------------------------------------------------------------------
    def _fastpath(self):
        st = dispatch(self.ctx, "stats.get", {})
        pk = CounterMetricFamily("hdslb_fastpath_packets", "Fast-path counters by reason (verdicts, passes, drops)",
                                 labels=["reason"])
        for name, n in sorted((st.get("counters") or {}).items()):
            pk.add_metric([name], n)
        yield pk
        cpu = CounterMetricFamily("hdslb_fastpath_cpu_packets", "Packets the XDP program saw, per CPU",
                                  labels=["cpu"])
        for i, n in enumerate((st.get("per_cpu") or {}).get("rx", [])):
            cpu.add_metric([str(i)], n)
        yield cpu
        table = st.get("conn_table") or {}
        entries = table.get("entries")
        if entries is None:
            entries = self._conn_entries()
        size = table.get("size") or self.ctx.sizes.max_conns
        yield GaugeMetricFamily("hdslb_conn_table_entries", "Connection table entries in use (one per direction)",
                                value=entries)
        yield GaugeMetricFamily("hdslb_conn_table_size", "Connection table capacity (entries)", value=size)
        if "entries4" in table:  # each table evicts on its own when full: watch each against its size
            fe = GaugeMetricFamily("hdslb_conn_table_family_entries",
                                   "Entries in use per connection table (4: IPv4 flows, 6: IPv6 and NAT64 flows)",
                                   labels=["family"])
            fs = GaugeMetricFamily("hdslb_conn_table_family_size", "Capacity per connection table (entries)",
                                   labels=["family"])
            for f in ("4", "6"):
                fe.add_metric([f], table.get("entries" + f, 0))
                fs.add_metric([f], table.get("size" + f, 0))
            yield fe
            yield fs

    def _conn_entries(self) -> int:
        fn = getattr(self.ctx, "conn_table_entries", None)
        if callable(fn):
            return fn()
        return len(dispatch(self.ctx, "conn.list", {})["conns"])

    # --- slow path ----------------------------------------------------------------------------------
    def _slowpath(self):
        fn = getattr(self.ctx, "slowpath_stats", None)
        if not callable(fn):
            return
        stats = fn() or {}
        nested = bool(stats) and all(isinstance(v, dict) for v in stats.values())
        fam = CounterMetricFamily("hdslb_slowpath_frames", "Slow-path (AF_XDP) frame counters",
                                  labels=["ifname", "counter"] if nested else ["counter"])
        rows = ([([ifn, k], v) for ifn, per in sorted(stats.items()) for k, v in sorted(per.items())] if nested
                else [([k], v) for k, v in sorted(stats.items())])
        for labels, v in rows:
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                fam.add_metric(labels, v)
        yield fam
        fn = getattr(self.ctx, "slowpath_neigh", None)
        neigh = (fn() or {}) if callable(fn) else {}
        if neigh:
            g = GaugeMetricFamily("hdslb_slowpath_neigh", "Slow-path neighbour table and unresolved queues: entries, "
                                  "learned, gc_thresh2/3 (its bounds), unres_bytes (queued) against unres_qbytes, "
                                  "write_pending (neigh_map writes to retry)", labels=["field"])
            for k, v in sorted(neigh.items()):
                if isinstance(v, int) and not isinstance(v, bool):
                    g.add_metric([k], v)
            yield g
