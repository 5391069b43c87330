"""bench/readme.py prints the README's benchmark tables from a full run's results; the README must show the
latest full run's (the benchmark issue: "the README shows the latest table with the machine it ran on")."""

from __future__ import annotations

import json
from pathlib import Path

from bench import readme

ROOT = Path(__file__).resolve().parents[2]


def _latest_full_run() -> Path:
    runs = [p for p in (ROOT / "bench" / "results").glob("*.json") if p.stem.count("-") == 2]  # not -quick/-partial

    def started(p: Path) -> str:
        res = json.loads(p.read_text())
        return res.get("date", "") + (res.get("started") or "")

    return max(runs, key=started)


def test_the_readme_shows_every_table_of_the_latest_full_run():
    res = json.loads(_latest_full_run().read_text())
    text = (ROOT / "README.md").read_text()
    tables = readme.tables(res)
    assert len(tables) == 7
    for t in tables:
        assert t in text, f"README's table differs from `python -m bench.readme`: {t.splitlines()[0]}"
    assert f"Latest full run: {res['date']} {res['started']}" in text and res["commit"] in text


def test_the_tables_name_the_generator_and_mark_what_a_peer_does_not_do():
    res = json.loads(_latest_full_run().read_text())
    res["e2e"]["settings"]["generator"] = "live frames"
    res["e2e"]["rows"][0]["udp"] = {"na": "not measured"}
    e2e = readme.e2e(res["e2e"])
    assert "UDP Mpps (live frames)" in e2e and f"| {res['e2e']['rows'][0]['peer']} | n/a |" in e2e
    del res["e2e"]["settings"]["generator"]  # runs before the generator was recorded used live frames
    assert "(live frames)" in readme.flows(res["e2e"])


def test_a_profile_group_without_samples_is_a_dash():
    """perf leaves out a group it sampled nothing in (a new flow's locks, in one run): the cell is "–", not an error."""
    res = json.loads(_latest_full_run().read_text())
    for c in res["prog_cost"]["profile"]["cases"]:
        c["groups"] = [g for g in c["groups"] if not g["group"].startswith("locks")]
    locks = next(line for line in readme.profile(res["prog_cost"]).splitlines() if line.startswith("| locks"))
    assert locks == "| locks | – | – | – |"


def test_a_file_that_is_not_a_full_runs_results_exits_2_with_its_name(tmp_path, capsys):
    bad = tmp_path / "2026-12-07-quick.json"
    bad.write_text(json.dumps({"date": "2026-12-07", "e2e": {"rows": []}}))
    assert readme.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "full run" in err
    assert readme.main([str(tmp_path / "missing.json")]) == 2
