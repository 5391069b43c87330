"""Prometheus metrics read from the daemon at scrape time, named like node_exporter's IPVS collector (hdslb_ prefix).

Read at scrape time, no process-global counters: every scrape asks the same commands ipvsadm and the REST API
use (service.list, stats.get, link.list), so the numbers on /metrics are the numbers `ipvsadm -L --stats` prints.
`ipvsadm -Z` zeroes the service and real-server counters, as on LVS (node_exporter's IPVS counters drop the
same way): Prometheus takes the drop for a counter reset. The fast-path, interface and slow-path counters are
never zeroed, and the fast path's live in pinned maps, so they run on across daemon restarts.

Per service (labels local_address, local_port, proto):
    hdslb_connections_total, hdslb_{incoming,outgoing}_{packets,bytes}_total
Per real server (labels local_address, local_port, remote_address, remote_port, proto):
    hdslb_backend_connections_total, hdslb_backend_{incoming,outgoing}_{packets,bytes}_total,
    hdslb_backend_connections_active, hdslb_backend_connections_inactive, hdslb_backend_weight,
    hdslb_backend_up (only when the daemon runs health checkers),
    hdslb_backend_persistent_connections (persistent services: live templates, ipvsadm's PersistConn)
Fast path:
    hdslb_fastpath_packets_total{reason}   every fast-path counter (rx, verdict_*, pass_*, drop_*, ...)
    hdslb_fastpath_cpu_packets_total{cpu}  rx per CPU
    hdslb_conn_table_entries, hdslb_conn_table_size, hdslb_persist_table_size
    hdslb_interface_{receive,transmit}_{packets,bytes}_total{ifname}, hdslb_interface_{pass,drop}_packets_total
    hdslb_slowpath_frames_total{counter[, ifname]}  (only when the daemon has a slow path)
    hdslb_slowpath_socket_frames_total{ifname, queue, counter}  its AF_XDP sockets, the kernel's drops included

Service and real-server traffic are separate families (node_exporter keeps one set of totals) so that
sum(hdslb_incoming_packets_total) never counts a packet twice.

The text is written here, not by prometheus_client: 10k services x 10 real servers are ~950k series, and
prometheus_client's generic writer took 14-18 s a scrape for them in hdslbd, all on its event loop (most of it
escaping and formatting the same five labels nine times per real server). A scrape (collect_families_async) reads
the daemon on its event loop, service.list yielding to the loop between chunks of services; turning that listing
into the per-service and per-real-server series, writing and compressing the text (render, and gzip when the
scraper accepts it, as Prometheus does) run in a worker thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import zlib

from hdslb.api import dispatch, dispatch_async

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

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the Prometheus text format this module writes


def escape_label_value(v: str) -> str:
    """Text format 0.0.4: backslash, double quote and line feed are escaped in label values."""
    if "\\" in v or '"' in v or "\n" in v:
        v = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return v


def labels_text(names, values) -> str:
    """'{a="1",b="2"}' (names are this module's constants, valid as they are)."""
    return "{" + ",".join(f'{n}="{escape_label_value(str(v))}"' for n, v in zip(names, values)) + "}"


class Family:
    """One metric family: its samples as (label text, value). Counters get the _total suffix in the text, as
    prometheus_client's CounterMetricFamily does; HELP and TYPE are written once, even when it has no sample."""

    __slots__ = ("name", "type", "help", "labels", "rows")

    def __init__(self, name: str, typ: str, help_: str, labels=(), value=None):
        self.name, self.type, self.help, self.labels, self.rows = name, typ, help_, tuple(labels), []
        if value is not None:
            self.rows.append(("", value))

    @property
    def sample_name(self) -> str:
        return self.name + "_total" if self.type == "counter" else self.name

    def add_metric(self, values, value) -> None:
        self.rows.append((labels_text(self.labels, values), value))

    def add_row(self, label_text: str, value) -> None:
        """A sample whose label text (labels_text over this family's label names) is already made."""
        self.rows.append((label_text, value))


def _value(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)  # exact, also past 2**53
    v = float(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def render_chunks(families):
    """The text exposition format 0.0.4 of families, a family at a time as bytes (a pure function: safe in a worker
    thread). At 10k services x 10 real servers the text is ~130 MB: made whole (the pieces, their str, its bytes)
    a scrape held ~450 MB at its peak; a family at a time, a few MB (gzip_body compresses as they come)."""
    for f in families:
        name = f.sample_name
        doc = f.help.replace("\\", "\\\\").replace("\n", "\\n")
        yield "".join([f"# HELP {name} {doc}\n# TYPE {name} {f.type}\n",
                       *(f"{name}{lab} {_value(v)}\n" for lab, v in f.rows)]).encode()


def render(families) -> bytes:
    """The whole text of render_chunks()."""
    return b"".join(render_chunks(families))


def gzip_body(families) -> bytes:
    """render(families) gzipped (level 1: ~130 MB of text in ~1 s to ~4 MB), compressed a family at a time."""
    z = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    return b"".join([*(z.compress(c) for c in render_chunks(families)), z.flush()])


def _split_hostport(s: str) -> tuple[str, int]:
    """'10.0.0.1:80' or '[fd00::1]:80' (the health checker's spelling) -> (address, port)."""
    if s.startswith("["):
        host, _, port = s[1:].partition("]:")
    else:
        host, _, port = s.rpartition(":")
    return str(ipaddress.ip_address(host)), int(port)


def health_index(status: dict, services_of=None) -> dict:
    """health.status() -> {(PROTO, vip, vport, rip, rport): up}. A check whose identity names no single VIP (a
    virtual_server_group's, "group web/TCP") stands for every service services_of((PROTO, "group web")) gives (the
    daemon's health_services: service idents); without it such a check is skipped."""
    out = {}
    for vs, st in (status or {}).items():
        hp, _, proto = vs.rpartition("/")
        try:
            vips = [_split_hostport(hp)]
        except ValueError:
            idents = services_of((proto.upper(), hp)) if services_of is not None else ()
            vips = [(str(ipaddress.ip_address(i["addr"])), i["port"]) for i in idents if i.get("addr") is not None]
        for rs, rst in (st.get("real_servers") or {}).items():
            try:
                rip, rport = _split_hostport(rs)
            except ValueError:
                continue
            for vip, vport in vips:
                out[(proto.upper(), vip, vport, rip, rport)] = rst.get("state") == "up"
    return out


class HdslbCollector:
    """Reads the daemon context on every collect(); a section that fails is logged and left out, not fatal."""

    def __init__(self, ctx):
        self.ctx = ctx

    def collect_families(self) -> list[Family]:
        """Every family, read from the daemon now (on its event loop); render() turns them into text."""
        return self._read_sections((self._services, self._fastpath, self._interfaces, self._slowpath))

    @staticmethod
    def _read_sections(sections) -> list[Family]:
        """Each section's families; one that fails is logged and left out, the others still served."""
        out = []
        for section in sections:
            try:
                out += list(section())
            except Exception as e:
                log.warning("metrics: %s skipped: %s", section.__name__.strip("_"), e)
        return out

    async def collect_families_async(self) -> list[Family]:
        """collect_families() for the event loop: the same families in the same order, the service listing
        awaited (at scale it is built in chunks, the loop served in between) and turned into series in a worker
        thread (~950k samples at 10k services x 10 real servers); the small sections are read on the loop."""
        out = []
        try:
            box = [await dispatch_async(self.ctx, "service.list", {"svc": None})]
            health = self._health_source()

            def series() -> None:
                data = box.pop()  # the listing's last reference: freed in this thread (~0.1 s of the loop at 10k x 10)
                box.append(list(self._services(data, self._index_of(health) if isinstance(health, tuple) else health)))
                # (handed over in the box, not returned: the executor's future would hold the series too, and
                # could be the one to let go of them last, on the loop, after the text is written)

            await asyncio.get_running_loop().run_in_executor(None, series)
            out += box.pop()
        except Exception as e:
            log.warning("metrics: services skipped: %s", e)
        return out + self._read_sections((self._fastpath, self._interfaces, self._slowpath))

    def exposition(self) -> bytes:
        return render(self.collect_families())

    # --- services and real servers ------------------------------------------------------------------
    def _services(self, data: dict | None = None, health: dict | None | bool = False):
        """The service and real-server families of a service.list reply (read now when not given; health: the
        health index, read now when not given). Reads only its arguments when both are given: safe in a thread."""
        if data is None:
            data = dispatch(self.ctx, "service.list", {"svc": None})
            if asyncio.iscoroutine(data):  # a big listing inside the event loop: collect_families_async awaits it
                data.close()
                raise RuntimeError("service.list must be awaited here: use collect_families_async")
        svc = {stem: Family(f"hdslb_{stem}", "counter", f"Service {doc}", SVC_LABELS) for stem, _, doc in TRAFFIC}
        rs = {stem: Family(f"hdslb_backend_{stem}", "counter", f"Real server {doc}", RS_LABELS)
              for stem, _, doc in TRAFFIC}
        active = Family("hdslb_backend_connections_active", "gauge", "Established TCP connections (ActiveConn)",
                        RS_LABELS)
        inactive = Family("hdslb_backend_connections_inactive", "gauge", "Other connections (InActConn)", RS_LABELS)
        weight = Family("hdslb_backend_weight", "gauge", "Real server weight", RS_LABELS)
        if health is False:
            health = self._health()
        up = Family("hdslb_backend_up", "gauge", "1 while every health checker of the real server passes", RS_LABELS)
        overloaded = Family("hdslb_backend_overloaded", "gauge",
                            "1 while above its upper connection threshold (-x): no new flows", RS_LABELS)
        # persistent services only: with hdslb_persist_table_size, what tells a full template table (its LRU then
        # evicts live templates, and their clients lose their server) before it fills
        persist = Family("hdslb_backend_persistent_connections", "gauge",
                         "Live persistence templates leading to the real server (PersistConn)", RS_LABELS)
        traffic_rs = [(rs[stem], key) for stem, key, _ in TRAFFIC]
        traffic_svc = [(svc[stem], key) for stem, key, _ in TRAFFIC]
        for s in data["services"]:
            proto = s["proto"].upper()
            # a SNAT service has no VIP: its match (what -H says) names it, one series per service
            vaddr = ("match:" + ",".join(f"{k}={v}" for k, v in s["match"].items() if v)) if s.get("match") \
                else s["addr"]
            sl = labels_text(SVC_LABELS, (vaddr, s["port"], proto))
            stats = s.get("stats") or {}
            for fam, key in traffic_svc:
                fam.add_row(sl, stats.get(key, 0))
            for d in s["dests"]:
                # one label text for the nine series of a real server
                rl = labels_text(RS_LABELS, (vaddr, s["port"], d["addr"], d["port"], proto))
                dstats = d.get("stats") or {}
                for fam, key in traffic_rs:
                    fam.add_row(rl, dstats.get(key, 0))
                active.add_row(rl, d.get("active", 0))
                inactive.add_row(rl, d.get("inactive", 0))
                weight.add_row(rl, d["weight"])
                overloaded.add_row(rl, 1 if d.get("overloaded") else 0)
                if s.get("persistent"):
                    persist.add_row(rl, d.get("persist_conns", 0))
                if health is not None:
                    h = health.get((proto, s["addr"], s["port"], d["addr"], d["port"]))
                    if h is not None:
                        up.add_row(rl, 1 if h else 0)
        yield from svc.values()
        yield from rs.values()
        yield from (active, inactive, weight, overloaded, persist)
        if health is not None:
            yield up

    def _health(self) -> dict | None:
        src = self._health_source()
        return self._index_of(src) if isinstance(src, tuple) else src

    def _health_source(self):
        """What hdslb_backend_up is made from, read on the event loop: the checkers' rows (_health_rows, a few ms at
        100k checked servers; _index_of makes the index from them, in the scrape's worker thread), or the index of
        a checker that has only status(); None without a checker."""
        checker = getattr(self.ctx, "health", None)
        services_of = getattr(self.ctx, "health_services", None)
        services_of = services_of if callable(services_of) else None
        try:
            if callable(getattr(checker, "up_states", None)):
                return self._health_rows(checker, services_of)
            status = getattr(checker, "status", None)
            return health_index(status(), services_of) if callable(status) else None
        except Exception as e:
            log.warning("metrics: health status skipped: %s", e)
            return None

    @staticmethod
    def _health_rows(checker, services_of) -> tuple[list, dict]:
        """(the checkers' (vs key, rs key, up) rows, {vs key: [(vip, vport)] of the services it stands for}): a
        group's check stands for each member service (services_of: the daemon's health_services)."""
        rows = checker.up_states()
        vips = {}
        for k in {r[0] for r in rows}:
            idents = services_of(k) if services_of is not None else ()
            vips[k] = [(i["addr"], i["port"]) for i in idents if i.get("addr") is not None]
        return rows, vips

    @staticmethod
    def _index_of(src: tuple[list, dict]) -> dict:
        """{(PROTO, vip, vport, rip, rport): up} from _health_rows(), as health_index() makes it from status()
        (reads only its argument: safe in a worker thread). A vs key no service stands for is read as ADDR:PORT."""
        rows, vips = src
        out, text, where = {}, {}, {}
        for vs_key, (rip, rport), up in rows:
            at = where.get(vs_key)
            if at is None:
                try:
                    at = [(str(ipaddress.ip_address(a)), p) for a, p in vips.get(vs_key) or ()] or \
                        [_split_hostport(vs_key[1])]
                except ValueError:
                    at = []
                where[vs_key] = at
            r = text.get(rip)
            if r is None:
                r = text[rip] = str(rip)
            for vip, vport in at:
                out[(vs_key[0].upper(), vip, vport, r, rport)] = up
        return out

    # --- fast path ----------------------------------------------------------------------------------
    def _fastpath(self):
        st = dispatch(self.ctx, "stats.get", {})
        pk = Family("hdslb_fastpath_packets", "counter", "Fast-path counters by reason (verdicts, passes, drops)",
                    ["reason"])
        for name, n in sorted((st.get("counters") or {}).items()):
            pk.add_metric([name], n)
        yield pk
        cpu = Family("hdslb_fastpath_cpu_packets", "counter", "Packets the XDP program saw, per CPU", ["cpu"])
        for i, n in enumerate((st.get("per_cpu") or {}).get("rx", [])):
            cpu.add_metric([str(i)], n)
        yield cpu
        table = st.get("conn_table") or {}
        entries = table.get("entries")
        if entries is None:
            entries = self._conn_entries()
        size = table.get("size") or self.ctx.sizes.max_conns
        yield Family("hdslb_conn_table_entries", "gauge", "Connection table entries in use (one per direction)",
                     value=entries)
        yield Family("hdslb_conn_table_size", "gauge", "Connection table capacity (entries)", value=size)
        max_persist = getattr(getattr(self.ctx, "sizes", None), "max_persist", None)
        if max_persist:
            yield Family("hdslb_persist_table_size", "gauge",
                         "Persistence template table capacity (--max-persist; full, its LRU evicts live templates)",
                         value=max_persist)
        # A full table makes room by evicting its least recently used entries (idle flows break): alert on this.
        if table.get("evicted") is not None:
            yield Family("hdslb_conn_table_evicted", "counter",
                         "Entries the full connection table's LRU evicted (inserted less alive less removed)",
                         value=table["evicted"])
        if table.get("expired") is not None:
            yield Family("hdslb_conn_table_expired", "counter",
                         "Entries removed: aged out by the sweep, a reused tuple, a reclaimed port",
                         value=table["expired"])
        if "entries4" in table:  # each table evicts on its own when full: watch each against its size
            fe = Family("hdslb_conn_table_family_entries", "gauge",
                        "Entries in use per connection table (4: IPv4 flows, 6: IPv6 and NAT64 flows)", ["family"])
            fs = Family("hdslb_conn_table_family_size", "gauge", "Capacity per connection table (entries)",
                        ["family"])
            for f in ("4", "6"):
                fe.add_metric([f], table.get("entries" + f, 0))
                fs.add_metric([f], table.get("size" + f, 0))
            yield fe
            yield fs
        socks = (st.get("slowpath") or {}).get("sockets") or {}
        if socks:  # the slow path's AF_XDP sockets, one per interface queue ("eth0/0")
            fam = Family("hdslb_slowpath_socket_frames", "counter",
                         "AF_XDP socket counters per interface queue: rx_frames/tx_frames handled, rx_bad/tx_no_frame "
                         "refused by the slow path, rx_dropped/rx_ring_full/rx_fill_ring_empty_descs/*_invalid_descs "
                         "the kernel's (XDP_STATISTICS: frames lost while the slow path was behind)",
                         ["ifname", "queue", "counter"])
            for name, per in sorted(socks.items()):
                ifname, _, queue = name.rpartition("/")
                for k, v in sorted((per or {}).items()):
                    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                        fam.add_metric([ifname, queue, k], v)
            yield fam

    # (family, if_stats field, help): the fast path's counters of the frames it saw on each interface
    IFACE = (
        ("hdslb_interface_receive_packets", "rx_packets", "Frames the XDP program saw arrive on the interface"),
        ("hdslb_interface_receive_bytes", "rx_bytes", "Bytes of the frames the XDP program saw arrive"),
        ("hdslb_interface_transmit_packets", "tx_packets",
         "Of the frames that arrived on the interface, those the fast path sent on (XDP_TX or redirect)"),
        ("hdslb_interface_transmit_bytes", "tx_bytes", "Bytes of the frames the fast path sent on"),
        ("hdslb_interface_pass_packets", "pass", "Of the frames that arrived on the interface, those handed to the "
                                                 "kernel"),
        ("hdslb_interface_drop_packets", "drops", "Of the frames that arrived on the interface, those dropped "
                                                  "(hdslb_fastpath_packets_total has each drop's reason)"),
    )

    def _interfaces(self):
        """dpip link show -s: the kernel's own interface counters never see XDP_TX or redirected frames."""
        links = dispatch(self.ctx, "link.list", {}).get("links") or []
        for name, field, doc in self.IFACE:
            fam = Family(name, "counter", doc, ["ifname"])
            for link in links:
                v = (link.get("stats") or {}).get(field)
                if isinstance(v, int) and not isinstance(v, bool):
                    fam.add_metric([link["ifname"]], v)
            yield fam

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
        fam = Family("hdslb_slowpath_frames", "counter", "Slow-path (AF_XDP) frame counters",
                     ["ifname", "counter"] if nested else ["counter"])
        rows = ([([ifn, k], v) for ifn, per in sorted(stats.items()) for k, v in sorted(per.items())] if nested
                else [([k], v) for k, v in sorted(stats.items())])
        for labels, v in rows:
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                fam.add_metric(labels, v)
        yield fam
        fn = getattr(self.ctx, "slowpath_neigh", None)
        neigh = (fn() or {}) if callable(fn) else {}
        if neigh:
            g = Family("hdslb_slowpath_neigh", "gauge", "Slow-path neighbour table and unresolved queues: entries, "
                       "learned, gc_thresh2/3 (its bounds), unres_bytes (queued) against unres_qbytes, "
                       "write_pending (neigh_map writes to retry)", ["field"])
            for k, v in sorted(neigh.items()):
                if isinstance(v, int) and not isinstance(v, bool):
                    g.add_metric([k], v)
            yield g
