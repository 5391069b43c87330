"""Section 1 of `make bench` (bench/prog_cost.py), the parts that need no BPF: how a case's ratio to the minimal
program is taken (each run beside one of the minimal's), and table 1j (perf's per-symbol samples on the bench CPU,
grouped and scaled to a case's ns/packet), tested on a report of the shape perf prints (taken from a run of the
established case on this machine kind)."""

import json
import pathlib

from bench import prog_cost, report

PERF_REPORT = """\
# To display the perf.data header info, please use --header/--header-only options.
#
#
# Total Lost Samples: 0
#
# Samples: 12K of event 'cpu-clock:ppp'
# Event count (approx.): 3001250000
#
# Overhead  Symbol
# ........  ..............................................
#
    37.95%  [k] bpf_prog_8b7b6073d83fa847_xdp_main
    13.55%  [k] pv_native_safe_halt
    12.40%  [k] htab_map_hash
    10.34%  [k] htab_lru_percpu_map_lookup_elem
     8.59%  [k] bpf_test_run
     6.57%  [k] lookup_nulls_elem_raw
     5.04%  [k] __local_bh_enable_ip
     3.25%  [k] bpf_test_timer_continue
     1.14%  [k] memcmp
     0.51%  [k] srso_alias_return_thunk
     0.22%  [k] bpf_dispatcher_xdp
     0.17%  [k] smp_call_function_many_cond
     0.01%  [.] _PyEval_EvalFrameDefault


#
# (Tip: For a higher level overview, try: perf report --sort comm,dso)
#
"""


def test_a_perf_report_is_read_symbol_by_symbol_and_its_comments_are_not():
    syms = prog_cost.parse_perf_report(PERF_REPORT)
    assert syms["htab_map_hash"] == 12.40
    assert syms["bpf_prog_8b7b6073d83fa847_xdp_main"] == 37.95
    assert syms["_PyEval_EvalFrameDefault"] == 0.01
    assert len(syms) == 13
    assert prog_cost.parse_perf_report("# Samples: 0\n\nError: no samples\n") == {}


def test_idle_is_left_out_and_the_groups_add_up_to_the_cases_time():
    shares = prog_cost.profile_shares(prog_cost.parse_perf_report(PERF_REPORT), 89.0)
    groups = {g["group"]: g for g in shares["groups"]}
    # pv_native_safe_halt is the CPU waiting, not the packet
    busy = sum(p for s, p in prog_cost.parse_perf_report(PERF_REPORT).items() if s != "pv_native_safe_halt")
    lookup = 12.40 + 10.34 + 6.57 + 1.14
    table = groups["conn table (hash, bucket walk, key compare, insert, LRU lists)"]
    assert abs(table["ns"] - 89.0 * lookup / busy) < 0.1
    assert abs(groups["XDP program (its own instructions)"]["ns"] - 89.0 * 37.95 / busy) < 0.1
    harness = groups["test-run loop (BPF_PROG_TEST_RUN itself)"]
    assert abs(harness["pct"] - 100 * (8.59 + 5.04 + 3.25 + 0.22) / busy) < 0.1
    assert groups["return thunks (SRSO mitigation)"]["ns"] > 0
    assert abs(sum(g["ns"] for g in shares["groups"]) - 89.0) < 0.5
    assert abs(sum(g["pct"] for g in shares["groups"]) - 100) < 0.5
    assert all("halt" not in t["sym"] for t in shares["top"])
    assert shares["top"][0]["sym"] == "bpf_prog_8b7b6073d83fa847_xdp_main"
    assert prog_cost.profile_shares({"pv_native_safe_halt": 100.0}, 89.0) == {"groups": [], "top": []}


def test_table_1j_shows_each_profiled_case_and_says_when_perf_was_not_there():
    res = json.loads((pathlib.Path(__file__).parents[2] / "bench/results/2026-12-06.json").read_text())["prog_cost"]
    est = prog_cost.profile_shares(prog_cost.parse_perf_report(PERF_REPORT), 89.0)
    res["profile"] = {"srso": "Vulnerable: Safe RET, no microcode",
                      "cases": [{"case": "established TCP client->server", "ns": 89.0, **est},
                                {"case": "new TCP flow (chained SYNs)", "na": "perf not installed (linux-perf)"}]}
    text = report.fmt_prog_cost(res)
    part = text[text.index("1j."):text.index("1f.")]
    assert "Safe RET" in part
    assert "perf not installed" in part
    row = next(line for line in part.splitlines() if line.startswith("established TCP client->server"))
    assert "XDP program" in row and "htab_map_hash 13" in row


def test_a_profile_without_perf_is_na_and_costs_nothing_else(monkeypatch):
    monkeypatch.setattr(prog_cost.shutil, "which", lambda name: None)
    b = prog_cost._Bench(True, lambda *a: None)
    ran = []
    out = b.profile("established TCP client->server", lambda: ran.append(1), 80.0)
    assert out == {"case": "established TCP client->server", "na": "perf not installed (linux-perf)"}
    assert ran == []


def test_a_profile_that_breaks_is_na_not_the_sections_failure(monkeypatch):
    monkeypatch.setattr(prog_cost.shutil, "which", lambda name: "/bin/false-perf")

    def broken(*a, **k):
        raise OSError("no such file")

    monkeypatch.setattr(prog_cost.subprocess, "Popen", broken)
    out = prog_cost._Bench(True, lambda *a: None).profile("x", lambda: None, 1.0)
    assert out["case"] == "x" and "no such file" in out["na"]


def test_a_case_is_timed_beside_the_minimal_program_so_a_slow_spell_moves_both(monkeypatch):
    """The box slows down while a case runs (1x, 1.5x, 2x): each of the case's runs is paired with a run of the
    minimal program made just before it, and the ratio is the median of the pairs', not the case's median over a
    minimal measured earlier at full speed (that would read 120 / 30 = 4 x)."""
    drift = iter([1.0, 1.5, 2.0])  # one step per pair: the minimal run and the case run after it
    calls = []

    def fake_run_xdp(fd, pkt, repeat):
        calls.append(fd)
        return 2, pkt, round(30 * next(drift))  # the minimal program: 30 ns at full speed

    monkeypatch.setattr(prog_cost, "run_xdp", fake_run_xdp)
    b = prog_cost._Bench(True, lambda *a: None)
    b.minimal = (7, b"pkt")
    case = iter([80, 120, 160])  # the case: 80 ns at full speed
    runs, mins, ratio = b.paired(lambda: (calls.append("case"), next(case))[1])
    assert calls == [7, "case", 7, "case", 7, "case"]
    assert runs == [80, 120, 160] and mins == [30, 45, 60]
    assert abs(ratio - 80 / 30) < 1e-9


def test_table_1k_shows_each_flood_case_and_a_table_kind_that_could_not_run():
    res = json.loads((pathlib.Path(__file__).parents[2] / "bench/results/2026-12-06.json").read_text())["prog_cost"]
    res["flood"] = [{"table": "percpu", "flood_on": "other", "idle": 400, "idle_lost_client": 256,
                     "idle_lost_server": 250, "active": 100, "active_lost": 3, "flood_syns": 8192,
                     "flood_entries": 16384, "entries": 4096, "size": 4096},
                    {"table": "shared", "na": "RuntimeError: a connection's SYN: XDP_DROP"}]
    text = report.fmt_prog_cost(res)
    part = text[text.index("1k."):text.index("1f.")]
    row = next(line for line in part.splitlines() if line.startswith("percpu"))
    assert row.split()[:4] == ["percpu", "other", "400", "256"] and "250" in row and "3 of 100" in row, row
    assert "16384 into 4096" in row
    assert "a connection's SYN: XDP_DROP" in part
