"""/metrics: Prometheus text that parses, node_exporter IPVS style names, values read from the fake daemon."""

import asyncio
import gzip
import logging
import re

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from hdslb.api.app import make_app
from hdslb.api.metrics import HdslbCollector, health_index, render
from tests.unit.test_api import COUNTERS, FakeCtx, quick_start

SVC_L = {"local_address": "10.0.0.100", "local_port": "80", "proto": "TCP"}


def rs_l(ip, port="80"):
    return dict(SVC_L, remote_address=ip, remote_port=port)


def scrape(ctx) -> dict:
    """{sample name: {frozenset(labels): value}} of one collect."""
    text = HdslbCollector(ctx).exposition().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def val(m, name, **labels):
    return m[name][frozenset(labels.items())]


@pytest.fixture
def ctx():
    return quick_start(FakeCtx(n_conns=7))


async def test_metrics_endpoint_parses(ctx):
    async with TestClient(TestServer(make_app(ctx))) as c:
        r = await c.get("/metrics")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["hdslb_connections"].type == "counter"
    assert fams["hdslb_backend_weight"].type == "gauge"
    assert "hdslb_connections_total" in text


def test_service_and_backend_traffic(ctx):
    m = scrape(ctx)
    assert val(m, "hdslb_connections_total", **SVC_L) == 30
    assert val(m, "hdslb_incoming_packets_total", **SVC_L) == 300
    assert val(m, "hdslb_outgoing_packets_total", **SVC_L) == 280
    assert val(m, "hdslb_incoming_bytes_total", **SVC_L) == 30000
    assert val(m, "hdslb_outgoing_bytes_total", **SVC_L) == 280000
    assert val(m, "hdslb_backend_connections_total", **rs_l("192.168.100.2")) == 10
    assert val(m, "hdslb_backend_outgoing_bytes_total", **rs_l("192.168.100.3")) == 190000
    assert val(m, "hdslb_backend_connections_active", **rs_l("192.168.100.2")) == 3
    assert val(m, "hdslb_backend_connections_inactive", **rs_l("192.168.100.2")) == 1
    assert val(m, "hdslb_backend_weight", **rs_l("192.168.100.3")) == 2
    assert "hdslb_backend_up" not in m, "no health checker, no up metric"


def test_fastpath_counters_and_conn_table(ctx):
    m = scrape(ctx)
    for name, n in COUNTERS.items():
        assert val(m, "hdslb_fastpath_packets_total", reason=name) == n
    assert val(m, "hdslb_fastpath_cpu_packets_total", cpu="0") == 500
    assert val(m, "hdslb_fastpath_cpu_packets_total", cpu="1") == 500
    assert val(m, "hdslb_conn_table_entries") == 7
    assert val(m, "hdslb_conn_table_size") == 4096


def test_persistent_services_export_their_templates_against_the_table_size(ctx):
    """A full template table's LRU evicts live templates (their clients move): PersistConn per real server and the
    table's size are what an alert compares (sum of the one over the other)."""
    m = scrape(ctx)
    assert "hdslb_backend_persistent_connections" not in m, "not persistent: no series"
    assert val(m, "hdslb_persist_table_size") == ctx.sizes.max_persist
    ctx.bal.service_edit({"proto": "tcp", "addr": "10.0.0.100", "port": 80, "persistent": 300})
    slots = {str(d.addr): d.slot for d in ctx.svc().dests.values()}
    ctx.persist_list = lambda: [{"dest_slot": slots["192.168.100.2"]}] * 3 + [{"dest_slot": slots["192.168.100.3"]}]
    m = scrape(ctx)
    assert val(m, "hdslb_backend_persistent_connections", **rs_l("192.168.100.2")) == 3
    assert val(m, "hdslb_backend_persistent_connections", **rs_l("192.168.100.3")) == 1


def test_conn_table_per_family(ctx):
    """Each table evicts on its own when full: entries and size per table, beside the totals."""
    ctx.conn_table = lambda: {"size": 5120, "size4": 4096, "size6": 1024, "entries": 7, "entries4": 5,
                              "entries6": 2, "expired": 3, "evicted": 40}
    m = scrape(ctx)
    # a full table evicts: what an operator alerts on, and what the sweep removed beside it
    assert val(m, "hdslb_conn_table_evicted_total") == 40 and val(m, "hdslb_conn_table_expired_total") == 3
    assert val(m, "hdslb_conn_table_entries") == 7 and val(m, "hdslb_conn_table_size") == 5120
    assert val(m, "hdslb_conn_table_family_entries", family="4") == 5
    assert val(m, "hdslb_conn_table_family_entries", family="6") == 2
    assert val(m, "hdslb_conn_table_family_size", family="6") == 1024


def test_conn_table_without_stats_get_support(ctx):
    ctx.conn_table = lambda: None  # an older stats.get: no conn_table; fall back to counting conn.list
    assert val(scrape(ctx), "hdslb_conn_table_entries") == 7
    ctx.conn_table_entries = lambda: 11
    assert val(scrape(ctx), "hdslb_conn_table_entries") == 11


def test_backend_up_from_health_checker(ctx):
    class Health:
        def status(self):
            return {"10.0.0.100:80/TCP": {"real_servers": {"192.168.100.2:80": {"state": "up"},
                                                           "192.168.100.3:80": {"state": "down"}}},
                    "group web/TCP": {"real_servers": {"192.168.1.1:80": {"state": "up"}}}}

    ctx.health = Health()
    m = scrape(ctx)
    assert val(m, "hdslb_backend_up", **rs_l("192.168.100.2")) == 1
    assert val(m, "hdslb_backend_up", **rs_l("192.168.100.3")) == 0
    assert len(m["hdslb_backend_up"]) == 2


def test_health_index_spellings():
    idx = health_index({"[2001:db8::1]:443/TCP": {"real_servers": {"[2001:db8::2]:8443": {"state": "up"}}},
                        "10.0.0.1:53/UDP": {"real_servers": {"10.0.1.1:53": {"state": "down"}}}})
    assert idx == {("TCP", "2001:db8::1", 443, "2001:db8::2", 8443): True,
                   ("UDP", "10.0.0.1", 53, "10.0.1.1", 53): False}


def test_slowpath_frames(ctx):
    ctx.slowpath_stats = lambda: {"rx_frames": 12, "tx_frames": 9, "ok": True}
    m = scrape(ctx)
    assert val(m, "hdslb_slowpath_frames_total", counter="rx_frames") == 12
    assert len(m["hdslb_slowpath_frames_total"]) == 2, "non-integers are left out"
    ctx.slowpath_stats = lambda: {"eth0": {"rx_frames": 3}, "eth1": {"rx_frames": 4}}
    assert val(scrape(ctx), "hdslb_slowpath_frames_total", ifname="eth1", counter="rx_frames") == 4


def test_the_daemon_exports_its_slow_path(ctx):
    """hdslbd gives /metrics the slow path's counters and its neighbour table's size against the bounds."""
    from hdslb.daemon import Daemon

    class Runner:
        def stats(self):
            return {"counters": {"arp_reply": 5, "neigh_unsolicited": 2}, "sockets": {},
                    "neigh": {"entries": 10, "learned": 7, "gc_thresh2": 4096, "gc_thresh3": 8192,
                              "unres_bytes": 0, "unres_qbytes": 8 << 20, "write_pending": 1}}

    d = Daemon.__new__(Daemon)
    d.slow = Runner()
    ctx.slowpath_stats, ctx.slowpath_neigh = d.slowpath_stats, d.slowpath_neigh
    m = scrape(ctx)
    assert val(m, "hdslb_slowpath_frames_total", counter="neigh_unsolicited") == 2
    assert val(m, "hdslb_slowpath_neigh", field="gc_thresh3") == 8192
    assert val(m, "hdslb_slowpath_neigh", field="write_pending") == 1
    d.slow = None  # --no-slowpath
    assert Daemon.slowpath_stats(d) == {} and Daemon.slowpath_neigh(d) == {}


def test_a_failing_section_does_not_break_the_scrape(ctx, caplog):
    def broken():
        raise RuntimeError("maps gone")

    ctx.maps.counters = broken
    with caplog.at_level(logging.WARNING):
        m = scrape(ctx)
    assert "hdslb_fastpath_packets_total" not in m and val(m, "hdslb_connections_total", **SVC_L) == 30
    assert "maps gone" in caplog.text


def test_values_are_read_at_scrape_time(ctx):
    col = HdslbCollector(ctx)
    series = (b'hdslb_backend_weight{local_address="10.0.0.100",local_port="80",'
              b'remote_address="192.168.100.2",remote_port="80",proto="TCP"}')
    assert series + b" 1\n" in col.exposition()
    ctx.bal.dest_edit({"svc": {"proto": "tcp", "addr": "10.0.0.100", "port": 80}, "addr": "192.168.100.2", "weight": 7})
    assert series + b" 7\n" in col.exposition()


def test_ipv6_and_udp_labels():
    ctx = FakeCtx()
    ctx.bal.service_add({"proto": "udp", "addr": "2001:db8::1", "port": 53, "sched": "rr"})
    ctx.bal.dest_add({"svc": {"proto": "udp", "addr": "2001:db8::1", "port": 53}, "addr": "2001:db8::2"})
    m = scrape(ctx)
    assert val(m, "hdslb_backend_weight", local_address="2001:db8::1", local_port="53", proto="UDP",
               remote_address="2001:db8::2", remote_port="53") == 1


def test_snat_services_get_one_series_each_and_overload_is_exported(ctx):
    ctx.bal.addr_add({"addr": "203.0.113.1", "prefixlen": 24, "ifname": "eth0", "sapool": True})
    for rng in ("192.168.1.1-192.168.1.9", "192.168.2.1-192.168.2.9"):
        ctx.bal.service_add({"match": {"proto": "tcp", "src_range": rng}, "sched": "rr"})
        ctx.bal.dest_add({"svc": {"match": {"proto": "tcp", "src_range": rng}}, "addr": "203.0.113.1", "port": 0})
    ctx.bal.dest_edit({"svc": {"proto": "tcp", "addr": "10.0.0.100", "port": 80}, "addr": "192.168.100.2",
                       "port": 80, "u_threshold": 5})
    ctx.counts = {next(d.slot for d in ctx.svc().dests.values() if str(d.addr) == "192.168.100.2"): (5, 0)}
    ctx.bal.conn_counts = ctx.conn_counts
    ctx.bal.refresh_dynamic()
    m = scrape(ctx)
    snat = {dict(k)["local_address"] for k in m["hdslb_connections_total"]} - {"10.0.0.100"}
    assert snat == {"match:proto=tcp,src_range=192.168.1.1-192.168.1.9",
                    "match:proto=tcp,src_range=192.168.2.1-192.168.2.9"}
    assert val(m, "hdslb_backend_overloaded", **rs_l("192.168.100.2")) == 1
    assert val(m, "hdslb_backend_overloaded", **rs_l("192.168.100.3")) == 0


async def test_gzip_when_the_scraper_accepts_it(ctx):
    """Prometheus asks for gzip: 10k services x 10 real servers are ~130 MB of text, ~3 MB gzipped."""
    async with TestClient(TestServer(make_app(ctx))) as c:
        r = await c.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
        assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
        text = gzip.decompress(await r.read()).decode()
        plain = await c.get("/metrics", headers={"Accept-Encoding": "identity"}, auto_decompress=False)
        assert "Content-Encoding" not in plain.headers
        assert await plain.text() == text
        refused = await c.get("/metrics", headers={"Accept-Encoding": "gzip;q=0"}, auto_decompress=False)
        assert "Content-Encoding" not in refused.headers
    assert 'hdslb_connections_total{local_address="10.0.0.100",local_port="80",proto="TCP"} 30' in text


@pytest.mark.parametrize("header,gz", [
    ("*;q=0, gzip", True),          # gzip named outright wins over * (it read "*;q=0" first and stopped)
    ("*;q=0, gzip;q=0.5", True),
    ("identity, *;q=0, GZIP", True),
    ("gzip;q=0, *", False),         # ... and so does its refusal
    ("*", True), ("*;q=0", False), ("deflate, *;q=0.1", True),
    ("gzip", True), ("gzip;q=0", False), ("gzip;q=0.000", False), ("gzip;q=x", False),
    ("identity", False), ("", False), ("br, deflate", False),
])
def test_accepts_gzip_by_rfc_9110(header, gz):
    from hdslb.api.app import _accepts_gzip

    assert _accepts_gzip(header) is gz


async def test_gzip_named_beside_a_refused_wildcard_is_gzipped(ctx):
    async with TestClient(TestServer(make_app(ctx))) as c:
        r = await c.get("/metrics", headers={"Accept-Encoding": "*;q=0, gzip"}, auto_decompress=False)
        assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
        assert b"hdslb_connections_total" in gzip.decompress(await r.read())


def test_exposition_format_rules(ctx):
    """One HELP and one TYPE per family, before its samples; counters end in _total; no series twice;
    label values escaped (quotes, backslashes, newlines) so that a parser gets them back exactly."""
    ctx.bal.service_add({"proto": "udp", "addr": "2001:db8::1", "port": 53, "sched": "rr"})
    ctx.bal.dest_add({"svc": {"proto": "udp", "addr": "2001:db8::1", "port": 53}, "addr": "2001:db8::2"})
    odd = 'eth"0\\x\nnew'
    ctx.slowpath_stats = lambda: {odd: {"rx_frames": 3}, "eth1": {"rx_frames": 4}}
    text = HdslbCollector(ctx).exposition().decode()
    types, seen, current = {}, set(), None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            current = line.split()[2]
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name == current and name not in types, f"one HELP then one TYPE per family: {line}"
            types[name] = kind
            assert (kind == "counter") == name.endswith("_total"), name
            continue
        m = re.match(r"([a-z_]+)(\{.*\})? (\S+)$", line)
        assert m and m.group(1) == current, f"a sample outside its family: {line}"
        assert (m.group(1), m.group(2)) not in seen, f"duplicate series: {line}"
        seen.add((m.group(1), m.group(2)))
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    frames = {s.labels["ifname"]: s.value for s in fams["hdslb_slowpath_frames"].samples}
    assert frames == {odd: 3, "eth1": 4}
    v6 = [s.labels for s in fams["hdslb_backend_weight"].samples if s.labels["proto"] == "UDP"]
    assert v6 == [{"local_address": "2001:db8::1", "local_port": "53", "remote_address": "2001:db8::2",
                   "remote_port": "53", "proto": "UDP"}]


def test_the_slow_paths_sockets_and_the_kernels_drops_on_them(ctx):
    """Frames the kernel dropped on an AF_XDP socket (ring full: the slow path fell behind) reach /metrics."""
    from types import SimpleNamespace

    from hdslb.slowpath.runner import SlowPathRunner
    from hdslb.slowpath.xsk import COUNTERS, KERNEL_STATS

    class Sock:
        def __init__(self, n):
            self.n = n

        def stats(self):  # XskSocket.stats(): the kernel's XDP_STATISTICS and our own counters
            return {**{k: self.n for k in KERNEL_STATS + COUNTERS}, "last_kick_errno": 0}

    runner = SlowPathRunner(SimpleNamespace(bal=ctx.bal, maps=None, sizes=SimpleNamespace(max_neigh=64)))
    runner.socks = {("eth0", 0): Sock(7), ("eth1", 1): Sock(3)}
    ctx.slow = runner
    m = scrape(ctx)
    for counter in ("rx_ring_full", "rx_fill_ring_empty_descs", "rx_dropped", "rx_frames", "tx_no_frame"):
        assert val(m, "hdslb_slowpath_socket_frames_total", ifname="eth0", queue="0", counter=counter) == 7
        assert val(m, "hdslb_slowpath_socket_frames_total", ifname="eth1", queue="1", counter=counter) == 3


def test_per_interface_fast_path_counters(ctx):
    """dpip link show -s's counters (the kernel's interface counters never see XDP_TX or redirects)."""
    ctx.link_stats = lambda ifname: {"rx_packets": 10, "rx_bytes": 1000, "tx_packets": 7, "tx_bytes": 700,
                                     "pass": 2, "drops": 1, "per_cpu": []} if ifname == "eth1" else \
        {"rx_packets": 5, "rx_bytes": 500, "tx_packets": 0, "tx_bytes": 0, "pass": 5, "drops": 0, "per_cpu": []}
    m = scrape(ctx)
    assert val(m, "hdslb_interface_receive_packets_total", ifname="eth1") == 10
    assert val(m, "hdslb_interface_receive_bytes_total", ifname="eth1") == 1000
    assert val(m, "hdslb_interface_transmit_packets_total", ifname="eth1") == 7
    assert val(m, "hdslb_interface_transmit_bytes_total", ifname="eth1") == 700
    assert val(m, "hdslb_interface_pass_packets_total", ifname="eth0") == 5
    assert val(m, "hdslb_interface_drop_packets_total", ifname="eth1") == 1
    assert len(m["hdslb_interface_receive_packets_total"]) == 2


async def test_a_gzipped_scrape_is_written_a_family_at_a_time(ctx, monkeypatch):
    """At 10k services x 10 real servers the text is ~130 MB: made whole before gzip (its pieces, one str, its
    bytes) a scrape held ~450 MB at its peak. The gzipped body is compressed as each family's text is made; the
    same text comes out."""
    from hdslb.api import metrics

    fams = HdslbCollector(ctx).collect_families()
    chunks = list(metrics.render_chunks(fams))
    assert len(chunks) == len(fams) and b"".join(chunks) == metrics.render(fams)
    assert gzip.decompress(metrics.gzip_body(fams)) == metrics.render(fams)

    def whole(families):
        raise AssertionError("the whole text was made for a gzipped scrape")

    monkeypatch.setattr(metrics, "render", whole)
    async with TestClient(TestServer(make_app(ctx))) as c:
        r = await c.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
        assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await r.read()).startswith(b"# HELP ")


async def test_backend_up_covers_every_service_of_a_virtual_server_group(tmp_path):
    """A virtual_server_group's checks watch the real servers of every member service: hdslb_backend_up has a
    series for each of them (it had none: the check's identity, "group web", names no single VIP, so an alert on
    hdslb_backend_up == 0 never saw a group's servers go down)."""
    from tests.unit.test_api_security import HarnessDaemon

    conf = tmp_path / "hdslb.conf"
    conf.write_text("virtual_server_group web {\n  10.0.0.100 80\n  10.0.0.101 80\n}\n"
                    "virtual_server group web {\n  lb_kind DR\n  real_server 192.168.100.2 80 {\n  }\n}\n"
                    "virtual_server 10.0.0.102 80 {\n  lb_kind DR\n  real_server 192.168.100.3 80 {\n  }\n}\n")
    d = HarnessDaemon(conf, tmp_path)
    await d.reload_config()

    class Health:  # what the checkers of that config report (none run here: no probe leaves this test)
        def status(self):
            return {"group web/TCP": {"real_servers": {"192.168.100.2:80": {"state": "down"}}},
                    "10.0.0.102:80/TCP": {"real_servers": {"192.168.100.3:80": {"state": "up"}}}}

    d.health = Health()
    text = (await HdslbCollector(d).collect_families_async())
    up = {(s.labels["local_address"], s.labels["remote_address"]): s.value
          for f in text_string_to_metric_families(render(text).decode()) if f.name == "hdslb_backend_up"
          for s in f.samples}
    assert up == {("10.0.0.100", "192.168.100.2"): 0, ("10.0.0.101", "192.168.100.2"): 0,
                  ("10.0.0.102", "192.168.100.3"): 1}


async def test_backend_up_reads_the_checkers_states_not_their_status(ctx):
    """A scrape read health.status() on the event loop (every check's dict, built and parsed back: 1.7 s at 10k
    services x 10 checked real servers, each scrape) to make hdslb_backend_up. It reads the checkers' states (a
    list of tuples), the series made from them in the scrape's worker thread."""
    from ipaddress import ip_address

    class Health:
        def up_states(self):
            return [(("TCP", "10.0.0.100:80"), (ip_address("192.168.100.2"), 80), True),
                    (("TCP", "10.0.0.100:80"), (ip_address("192.168.100.3"), 80), False)]

        def status(self):
            raise AssertionError("status() on the event loop")

    ctx.health = Health()
    fams = await HdslbCollector(ctx).collect_families_async()
    up = {(s.labels["remote_address"]): s.value for f in text_string_to_metric_families(render(fams).decode())
          if f.name == "hdslb_backend_up" for s in f.samples}
    assert up == {"192.168.100.2": 1, "192.168.100.3": 0}


async def test_the_checkers_states_say_what_their_status_says():
    from hdslb.health import HealthManager, pairs_of
    from hdslb.api.metrics import HdslbCollector as C
    from tests.unit.test_health import Recorder, real, tcp_check, virtual

    async def never(checker, rs):
        await asyncio.Event().wait()

    mgr = HealthManager(Recorder().on_change, probe=never)
    await mgr.start(pairs_of([virtual(*[real(p, tcp_check(warmup=3600.0)) for p in (8080, 8081)], port=80),
                              virtual(real(53, tcp_check(warmup=3600.0)), port=53)]))
    try:
        mgr.server(("TCP", "10.0.0.1:80"), next(iter(mgr._services[("TCP", "10.0.0.1:80")].servers))).alive = False
        assert C._index_of(C._health_rows(mgr, None)) == health_index(mgr.status())
    finally:
        await mgr.stop()
