"""The bench's reference programs (make bench, never make test) compile against the fast path's shared headers
and pass the verifier: a header change that breaks them must fail here, not in the next benchmark run."""

import os

from bcc import BPF

from bench import ref_progs


def test_every_reference_program_compiles_and_loads():
    b = ref_progs.compile_refs()
    names = [n for n, _ in ref_progs.STAGES + ref_progs.ALTERNATIVES + ref_progs.INSERTS]
    names += [f"ref_{step}_{m}" for m, _ in ref_progs.LOOKUPS for step in ("fill", "look")]
    names += ["bench_redirect", "bench_sink"]
    for name in names:
        assert b.load_func(name.encode(), BPF.XDP).fd >= 0, name


def _stub_section(monkeypatch, name: str, stub) -> None:
    """bench.run imports a section as `from bench import <name>`: once any test has imported the real module it
    is an attribute of the package, which that import returns before sys.modules; both are replaced."""
    import sys

    import bench

    monkeypatch.setitem(sys.modules, f"bench.{name}", stub)
    monkeypatch.setattr(bench, name, stub, raising=False)


def test_a_failed_section_exits_1_and_never_writes_over_the_days_results(monkeypatch, tmp_path):
    """A section that raises is n/a in the output, but the run is not the day's result: exit 1, -partial file."""
    import types

    from bench import report, run

    def broken(quick, log):
        raise RuntimeError("header does not compile")

    _stub_section(monkeypatch, "prog_cost", types.SimpleNamespace(run=broken))
    monkeypatch.setattr(run, "SECTIONS", ("prog_cost",))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "chart", lambda res, path: "no chart in tests")
    assert run.main([]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"{report.today()}-partial.json"]


def test_a_part_of_a_section_that_failed_also_fails_the_run(monkeypatch, tmp_path):
    """scale.run catches each part's failure (memory, loads) as {"na": reason} so the others still run; the run
    must still exit 1 and write -partial (a sweep stand-in lacking `bal` once cost a day's memory rows silently)."""
    import types

    from bench import report, run

    parts = {"memory": {"na": "AttributeError: no bal"}, "op_breakdown": {"rows": []}}
    _stub_section(monkeypatch, "scale", types.SimpleNamespace(run=lambda q, log: parts))
    monkeypatch.setattr(run, "SECTIONS", ("scale",))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "chart", lambda res, path: "no chart in tests")
    monkeypatch.setattr(report, "fmt_scale", lambda res: "scale")
    assert run.main([]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"{report.today()}-partial.json"]


def test_the_scale_tables_format_every_scan_the_memory_part_records():
    """3a's scans hold timed reads ({entries, seconds}) and, since the paged -Lnc, conn_pages_cost's result (pages,
    lines, daemon/client seconds): the table once failed on the latter (KeyError 'seconds') and the whole scale
    section was lost. Formatted here from the day's committed full run with a pages scan added."""
    import copy
    import json
    import pathlib

    from bench import report

    res = json.loads((pathlib.Path(report.__file__).parent / "results" / "2026-12-06.json").read_text())["scale"]
    res = copy.deepcopy(res)
    pages = {"pages": 50, "lines": 1000000, "reply_bytes": 123, "daemon_seconds": 7.5, "client_seconds": 4.1,
             "longest_loop_stall_s": 0.031}
    res["memory"]["scans"]["conn.list pages (ipvsadm -Lnc)"] = pages
    res["memory_shared"]["scans"]["conn.list pages (ipvsadm -Lnc)"] = dict(pages, error="frame too big")
    text = report.fmt_scale(res)
    assert "7.5 s daemon + 4.1 s client: 1000000 lines in 50 pages, loop held at most 0.031 s" in text
    assert "(frame too big)" in text


def test_a_section_whose_table_fails_keeps_its_measurements(monkeypatch, tmp_path):
    """A formatting bug must not throw away a section's minutes of measurements: they stay in the results file
    (-partial, exit 1), with the formatting error beside them."""
    import json
    import pathlib
    import types

    from bench import report, run

    parts = json.loads((pathlib.Path(report.__file__).parent / "results" / "2026-12-06.json").read_text())["scale"]
    _stub_section(monkeypatch, "scale", types.SimpleNamespace(run=lambda q, log: parts))
    monkeypatch.setattr(run, "SECTIONS", ("scale",))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "chart", lambda res, path: "no chart in tests")

    def broken(res):
        raise KeyError("seconds")

    monkeypatch.setattr(report, "fmt_scale", broken)
    assert run.main([]) == 1
    out = json.loads((tmp_path / f"{report.today()}-partial.json").read_text())
    assert out["scale"]["memory"] == parts["memory"] and "KeyError" in out["scale"]["format_na"]


def test_the_new_flow_chain_opens_a_flow_at_every_repeat():
    """Table 1a's new-flow figure loops a SYN that each rewrite turns into the next new flow. When the program began
    to open flows only for frames addressed to the interface's MAC, the chain's second SYN (sent to the real
    server's MAC) went to the kernel and the figure measured a pass (51 ns instead of ~900): the chain's own check
    said so only in the log. Its check must find every repeat a new flow."""
    from bench import prog_cost

    b = prog_cost._Bench(True, lambda *a: None, max_conns=1 << 18)
    try:
        b.load()
        b.runs, b.chain_repeat, b.repeat = 1, 2000, 1000
        b.minimal = (b.fp.prog_fd, b"\x00" * 14)  # what the pairs are timed beside does not matter here
        b.profile = lambda *a, **k: {}
        *_, check = b.new_flow_chain()
    finally:
        b.close()
    assert "moved" not in check, check


def test_the_flood_table_runs_on_both_table_kinds():
    """Table 1k (bench/prog_cost.flood) builds its own small-table programs: it must keep working, whatever the
    kernel's LRU decides (the figures themselves are not pinned: they are the kernel's)."""
    from bench import prog_cost

    rows = prog_cost.flood(True, lambda *a: None)
    assert {r["table"] for r in rows} == {"percpu", "shared"} and not [r for r in rows if "na" in r], rows
    for r in rows:
        assert r["flood_entries"] >= 2 * r["flood_syns"] - 64, r       # the flood made its entries
        assert r["entries"] <= r["size"] < r["flood_entries"], r        # into a table it overflowed
        assert 0 <= r["idle_lost_client"] <= r["idle"] and 0 <= r["idle_lost_server"] <= r["idle"], r
        assert 0 <= r["active_lost"] <= r["active"], r


def test_a_full_run_is_recorded_in_the_targets_history_and_a_partial_or_quick_one_is_not(monkeypatch, tmp_path):
    """The README's ranges come from bench/results/targets.jsonl: each full run appends its targets, with its
    commit and start time; a --quick run, a --only/--peers run or one with a failed section never does."""
    import json
    import types

    from bench import history, report, run

    targets = [{"name": "established (worst direction) <= 1.3 x minimal", "value": 2.7, "limit": 1.3, "pass": False}]
    _stub_section(monkeypatch, "prog_cost", types.SimpleNamespace(run=lambda q, log: {"targets": targets}))
    monkeypatch.setattr(run, "SECTIONS", ("prog_cost",))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "chart", lambda res, path: "no chart in tests")
    monkeypatch.setattr(report, "fmt_prog_cost", lambda res: "1. per-packet cost")
    log = tmp_path / "targets.jsonl"
    monkeypatch.setattr(history, "LOG", log)
    assert run.main(["--quick"]) == 0 and run.main(["--only", "prog_cost"]) == 0
    assert not log.exists()
    assert run.main([]) == 0
    (line,) = log.read_text().splitlines()
    e = json.loads(line)
    assert e["targets"] == targets and e["date"] == report.today() and len(e["started"]) == 5
    assert e["commit"] and e["commit"] == json.loads((tmp_path / f"{report.today()}.json").read_text())["commit"]


def test_the_commit_says_when_tracked_files_differ_from_it(tmp_path):
    """A run's commit is only a fair label when the checkout is that commit; edits to tracked files are flagged
    (results files excepted: a run writes them)."""
    import subprocess

    from bench import run

    def git(*a):
        subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results" / "t.jsonl").write_text("{}\n")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "t")
    clean = run.commit(str(tmp_path))
    assert clean and "+" not in clean
    (tmp_path / "bench" / "results" / "t.jsonl").write_text("{}\n{}\n")
    (tmp_path / "untracked.py").write_text("")
    assert run.commit(str(tmp_path)) == clean
    (tmp_path / "a.py").write_text("x = 2\n")
    assert run.commit(str(tmp_path)) == clean + "+changes"
    assert run.commit(str(tmp_path / "nowhere")) is None


def test_the_loop_generator_sends_from_many_ports_and_stops_clean(monkeypatch):
    """bench/loopgen.py stands in for live frames where the kernel refuses them (EPERM on 6.18.44-fc-v1300):
    its frames must keep reaching the interface's peer (no rate asserted: the bench measures that), carry the asked range of source ports, stop when
    told (the loop drained) and leave nothing behind in the namespace; livegen.make picks it exactly then."""
    import socket
    import time

    from bench import livegen, loopgen
    from hdslb.lab import netns as nx

    cl, lb = f"lg{os.getpid() % 100000}c", f"lg{os.getpid() % 100000}l"
    nx.netns_add(cl)
    try:
        nx.netns_add(lb)
        nx.veth_add(cl, "eth0", lb, "veth-lb0")
        nx.link_up(cl, "eth0")
        nx.link_up(lb, "veth-lb0")
        frame = livegen.udp_frame("02:00:00:00:00:02", "02:00:00:00:00:01", "10.9.0.1", "10.9.0.100",
                                  ref_progs.SINK_PORT)
        # 1. into the bench's sink on the peer: a rate, and nothing more once stopped
        sink = ref_progs.compile_refs().load_func(b"bench_sink", BPF.XDP)
        livegen.in_netns(lb, BPF.attach_xdp, "veth-lb0", sink, loopgen.XDP_FLAGS_DRV_MODE)
        c0 = ref_progs.sink_counts()[ref_progs.SINK_OTHER]
        g = loopgen.LoopGen(cl, "eth0", frame, cpu=0, nflows=1024).start()
        assert nx.link_exists(cl, "lg0") and nx.link_exists(cl, "lg1")
        time.sleep(0.3)
        g.stop()
        time.sleep(0.1)
        c1 = ref_progs.sink_counts()[ref_progs.SINK_OTHER]
        time.sleep(0.2)
        assert ref_progs.sink_counts()[ref_progs.SINK_OTHER] == c1  # drained
        # the loop went round (far more frames than were put in), and it counted what reached the peer
        assert c1 - c0 > 10 * loopgen.POPULATION and g.sent >= c1 - c0 - loopgen.POPULATION and g.rate > 0
        assert not nx.link_exists(cl, "lg0") and not nx.link_exists(cl, "lg1")
        livegen.in_netns(lb, BPF.remove_xdp, "veth-lb0", loopgen.XDP_FLAGS_DRV_MODE)
        # 2. the source ports: 8 flows from 20000, seen by a packet socket on the peer (GRO gives veth its NAPI)
        nx.sh(["ip", "netns", "exec", lb, "ethtool", "-K", "veth-lb0", "gro", "on"])
        s = nx.ns_socket(lb, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        s.bind(("veth-lb0", 0))
        s.settimeout(2)
        ports = set()
        with loopgen.LoopGen(cl, "eth0", frame, cpu=0, nflows=8, sport_base=20000):
            for _ in range(400):
                pkt = s.recv(128)
                if len(pkt) >= 36 and pkt[12:14] == b"\x08\x00" and pkt[23] == socket.IPPROTO_UDP:
                    ports.add(int.from_bytes(pkt[34:36], "big"))
        s.close()
        assert ports <= set(range(20000, 20008)) and len(ports) >= 6, ports
        assert not nx.link_exists(cl, "lg0")
    finally:
        nx.netns_del(lb)
        nx.netns_del(cl)
    # 3. the choice
    monkeypatch.setattr(livegen, "_LIVE_ALLOWED", False)
    assert isinstance(livegen.make(cl, "eth0", frame), loopgen.LoopGen) and livegen.generator_name() == "XDP loop"
    monkeypatch.setattr(livegen, "_LIVE_ALLOWED", True)
    g = livegen.make(cl, "eth0", frame)
    assert isinstance(g, livegen.LiveGen) and livegen.generator_name() == "live frames"
    os.close(g.prog_fd)
