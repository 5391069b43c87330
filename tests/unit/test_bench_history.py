"""bench/history.py: the targets over the full runs on record (bench/results/targets.jsonl), the figures the
README's target table is made from."""

from __future__ import annotations

import json

import pytest

from bench import history

AMD = {"cpu": "AMD EPYC", "nproc": 2, "kernel": "6.18.44-fc-v1272", "python": "3.11.7"}
XEON = {"cpu": "Intel Xeon", "nproc": 2, "kernel": "6.18.44-fc-v1272", "python": "3.11.7"}
EST = "established (worst direction) <= 1.3 x minimal"
UDP = "hdslb native udp_mpps >= 2.5 x plain routing"
UDP_SHARED = "hdslb native, --conn-table shared, udp_mpps >= 2.5 x plain routing"
PUT = "10k services + 100k RS via REST (PUT per service) <= 10 s"


def _res(machine=AMD, est=2.7, udp=2.1, udp_shared=2.3, put=9.5, date="2026-12-07", started="05:26"):
    """A results dict shaped as bench.run writes it (only what history reads)."""
    return {
        "date": date, "started": started, "commit": "abc1234", "machine": machine, "seconds": 900.0,
        "prog_cost": {"targets": [{"name": EST, "value": est, "limit": 1.3, "pass": est <= 1.3},
                                  {"name": "new flow <= 3 x minimal", "value": None, "limit": 3.0, "pass": None}]},
        "e2e": {"targets": [{"name": UDP, "value": udp, "limit": 2.5, "pass": udp >= 2.5, "ceiling": 2.9},
                            {"name": UDP_SHARED, "value": udp_shared, "limit": 2.5, "pass": udp_shared >= 2.5}]},
        "scale": {"rest_per_service": {"seconds": put, "target": {"name": PUT, "value": put, "limit": 10.0,
                                                                  "pass": put <= 10}},
                  "memory": {"na": "AttributeError"}, "op_breakdown": {"routes": []}},
    }


def test_a_run_records_every_target_it_measured_and_leaves_out_what_it_could_not():
    ts = history.targets_of(_res())
    assert [t["name"] for t in ts] == [EST, UDP, UDP_SHARED, PUT]  # new flow n/a, memory n/a: not "missed"
    assert ts[1] == {"name": UDP, "value": 2.1, "limit": 2.5, "pass": False}


def test_records_append_and_load_back_in_order(tmp_path):
    log = tmp_path / "targets.jsonl"
    history.record(_res(est=2.5, started="01:00"), log)
    history.record(_res(est=2.9, started="02:00"), log)
    runs = history.load(log)
    assert [r["started"] for r in runs] == ["01:00", "02:00"]
    assert runs[0]["machine"] == {"cpu": "AMD EPYC", "nproc": 2, "kernel": "6.18.44-fc-v1272"}
    assert runs[1]["targets"][0]["value"] == 2.9 and runs[1]["commit"] == "abc1234"
    assert history.load(tmp_path / "missing.jsonl") == []


@pytest.mark.parametrize("line, why", [
    ("{not json", "Expecting property name"),
    ('{"date": "2026-12-07", "targets": []}', "no machine"),
    ('{"machine": {}, "targets": [{"name": "x", "value": "fast", "pass": true}]}', "target 'x'"),
    ('{"machine": {}, "targets": [{"name": "x", "value": 1.0}]}', "'pass'"),
])
def test_a_damaged_line_is_named_by_file_and_line_and_the_command_exits_2(tmp_path, capsys, line, why):
    log = tmp_path / "targets.jsonl"
    history.record(_res(), log)
    with open(log, "a") as f:
        f.write(line + "\n")
    with pytest.raises(history.HistoryError) as e:
        history.load(log)
    assert str(e.value).startswith(f"{log}:2: ") and why in str(e.value)
    assert history.main(["--file", str(log)]) == 2
    assert f"{log}:2: " in capsys.readouterr().err


def test_the_summary_reads_the_last_runs_of_the_newest_runs_machine_kind():
    runs = [history.entry(_res(machine=AMD, est=2.0, udp=2.6, put=12.0)),  # beyond --last 3
            history.entry(_res(machine=AMD, est=2.4, udp=2.6, put=9.0)),
            history.entry(_res(machine=XEON, est=9.9, udp=9.9, put=1.0)),  # another machine kind: not counted
            history.entry(_res(machine=dict(AMD, kernel="6.18.50"), est=3.1, udp=2.2, put=11.0)),  # same 6.18
            history.entry(_res(machine=AMD, est=2.7, udp=2.1, put=9.9))]
    s = history.summary(runs, last=3)
    assert len(s["runs"]) == 3 and all(r["machine"]["cpu"] == "AMD EPYC" for r in s["runs"])
    u = s["targets"][UDP]
    assert u["values"] == [2.6, 2.2, 2.1] and u["met"] == 1 and u["latest"] == 2.1 and not u["latest_pass"]
    p = s["targets"][PUT]
    assert p["values"] == [9.0, 11.0, 9.9] and p["met"] == 2 and p["latest_pass"]
    rows = {r[0]: r for r in history.table_rows(s, md=True)}
    assert rows["64-byte UDP ≥ 2.5 × plain routing (per-CPU / shared)"][1:] == [
        "2.10 / 2.30", "2.10–2.60 / 2.30", "missed (1 of 3) / missed (0 of 3)"]
    assert rows["… by 10k REST `PUT /v2/vs/{VipPort}` with `RSs` ≤ 10 s"][1:] == [
        "9.9 s", "9.0–11.0 s", "**met** (2 of 3)"]
    assert rows["established flow ≤ 1.3 × the minimal parse+rewrite+TX program"][2] == "2.40–3.10 ×"


def test_runs_of_another_udp_generator_are_not_mixed_into_the_ranges():
    """A kernel that refuses live frames makes the e2e section use the XDP loop generator, whose heavier floor
    compresses every UDP ratio: the ranges cover the newest run's generator only (older records name none:
    live frames)."""
    def run(gen, udp, started):
        r = _res(udp=udp, started=started)
        if gen:
            r["e2e"]["settings"] = {"generator": gen}
        return history.entry(r)

    runs = [run(None, 2.4, "01:00"), run("live frames", 2.3, "02:00"), run("XDP loop", 1.9, "03:00"),
            run("XDP loop", 1.95, "04:00")]
    assert runs[0]["generator"] == "live frames" and runs[2]["generator"] == "XDP loop"  # results naming none
    del runs[0]["generator"]  # and a record from before the field: live frames too
    no_e2e = _res()
    del no_e2e["e2e"]
    assert "generator" not in history.entry(no_e2e)  # no UDP measured, no generator to name
    s = history.summary(runs)
    assert s["targets"][UDP]["values"] == [1.9, 1.95] and len(s["runs"]) == 2
    assert "UDP from the XDP loop generator" in history.text(s)
    s = history.summary(runs[:2])
    assert s["targets"][UDP]["values"] == [2.4, 2.3] and "UDP from the live frames generator" in history.text(s)


def test_a_value_that_rounds_to_its_limit_shows_the_digits_that_tell_them_apart():
    """2.496 × routing is a miss; printed as 2.50 beside "missed" it would read as a pass."""
    runs = [history.entry(_res(udp=2.4963, put=10.04)), history.entry(_res(udp=2.2, put=9.96))]
    rows = {r[0]: r for r in history.table_rows(history.summary(runs))}
    assert rows["64-byte UDP ≥ 2.5 × plain routing (per-CPU / shared)"][2] == "2.20–2.496 / 2.30"
    assert rows["… by 10k REST `PUT /v2/vs/{VipPort}` with `RSs` ≤ 10 s"][1:] == [
        "9.96 s", "9.96–10.04 s", "met (1 of 2)"]


def test_a_target_the_latest_run_did_not_measure_says_so():
    older, latest = _res(), _res()
    latest["e2e"] = {"na": "RuntimeError: lab"}  # (a run with a failed section is not recorded; a peer can be n/a)
    s = history.summary([history.entry(older), history.entry(latest)])
    rows = {r[0]: r for r in history.table_rows(s)}
    row = rows["64-byte UDP ≥ 2.5 × plain routing (per-CPU / shared)"]
    assert row[1] == "n/a / n/a" and row[3].startswith("not in the latest run (0 of 1)")


def test_a_target_no_row_names_gets_a_row_of_its_own():
    r = _res()
    r["e2e"]["targets"].append({"name": "hdslb native udp_mpps >= 9 x something new", "value": 1.5, "limit": 9,
                                "pass": False})
    rows = history.table_rows(history.summary([history.entry(r)]))
    assert rows[-1] == ["hdslb native udp_mpps >= 9 x something new", "1.5", "1.5", "missed (0 of 1)"]


def test_the_committed_record_loads_and_every_target_it_holds_has_the_readmes_row():
    """The README's target table is `python -m bench.history --markdown` over this file: a renamed target would
    split off a row of its own and the table would lose its history silently."""
    runs = history.load()
    assert len(runs) >= 9
    named = {n for _, names, _, _ in history.ROWS for n in names}
    for r in runs:
        assert {t["name"] for t in r["targets"]} <= named, r["started"]
        assert r["commit"] and r["started"] and r["machine"]["cpu"]
    summ = history.summary(runs)
    n = len(summ["runs"])  # the newest run's machine kind and generator: a new kernel build starts a new range
    assert 1 <= n <= 9 and summ["runs"][-1] is runs[-1]
    md = history.markdown(summ)
    assert md.splitlines()[0] == f"| target (benchmark issue) | latest | last {n} runs | result (runs met) |"
    assert len(md.splitlines()) == 2 + len(history.ROWS)


def test_the_command_prints_the_table(tmp_path, capsys):
    log = tmp_path / "t.jsonl"
    history.record(_res(), log)
    assert history.main(["--file", str(log), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| 64-byte UDP ≥ 2.5 × plain routing (per-CPU / shared) | 2.10 / 2.30 |" in out
    assert history.main(["--file", str(log)]) == 0
    assert "targets over the last 1 full runs on this machine kind (2 vCPU AMD EPYC" in capsys.readouterr().out
    json.loads(log.read_text())  # one line, valid JSON
