"""The targets over the full runs on record: `bench/results/targets.jsonl`, one line per full `make bench` run.

This VM's speed drifts by tens of percent within minutes, so one run says little about a target near its limit;
what the README reports is each target's latest value beside its range and how many of the last runs met it, on
the same kind of machine. Each full run appends its line here (a quick or partial run does not), so those
figures can be recomputed from the repository rather than from results files a day's later run replaced.

    python -m bench.history [--last N] [--markdown] [--file PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LOG = Path(__file__).resolve().parent / "results" / "targets.jsonl"
LAST = 9

# The README's rows: a label, the targets it shows side by side (per-CPU / shared), the value's format and unit.
# A target a run checks that no row names is shown on a row of its own, under its own name.
ROWS = (
    ("established flow ≤ 1.3 × the minimal parse+rewrite+TX program",
     ("established (worst direction) <= 1.3 x minimal",), "{:.2f}", " ×"),
    ("new flow ≤ 3 × minimal", ("new flow <= 3 x minimal",), "{:.0f}", " ×"),
    ("64-byte UDP ≥ 0.75 × a bare XDP redirect, per-CPU table / `--conn-table shared`",
     ("hdslb native udp_mpps >= 0.75 x bare XDP redirect (native)",
      "hdslb native, --conn-table shared, udp_mpps >= 0.75 x bare XDP redirect (native)"), "{:.2f}", ""),
    ("64-byte UDP ≥ 2.5 × plain routing (per-CPU / shared)",
     ("hdslb native udp_mpps >= 2.5 x plain routing",
      "hdslb native, --conn-table shared, udp_mpps >= 2.5 x plain routing"), "{:.2f}", ""),
    ("64-byte UDP ≥ 4 × nftables DNAT (per-CPU / shared)",
     ("hdslb native udp_mpps >= 4.0 x nftables DNAT",
      "hdslb native, --conn-table shared, udp_mpps >= 4.0 x nftables DNAT"), "{:.2f}", ""),
    ("new connections/s ≥ 1.5 × nftables DNAT, wrk / light endpoints (per-CPU)",
     ("hdslb native cps >= 1.5 x nftables DNAT", "hdslb native cps_light >= 1.5 x nftables DNAT"), "{:.2f}", ""),
    ("new connections/s ≥ 1.5 × nftables DNAT, wrk / light endpoints (shared)",
     ("hdslb native, --conn-table shared, cps >= 1.5 x nftables DNAT",
      "hdslb native, --conn-table shared, cps_light >= 1.5 x nftables DNAT"), "{:.2f}", ""),
    ("≤ 256 B of map memory per connection (per-CPU / shared)",
     ("<= 256 B per connection (both directions), percpu table",
      "<= 256 B per connection (both directions), shared table"), "{:.0f}", " B"),
    ("10k services + 100k real servers by `ipvsadm -R` ≤ 10 s",
     ("10k services + 100k RS via ipvsadm -R <= 10 s",), "{:.1f}", " s"),
    ("… by REST `PATCH /v2/vs` (one request) ≤ 10 s",
     ("10k services + 100k RS via REST (PATCH /v2/vs) <= 10 s",), "{:.1f}", " s"),
    ("… by 10k REST `PUT /v2/vs/{VipPort}` with `RSs` ≤ 10 s",
     ("10k services + 100k RS via REST (PUT per service) <= 10 s",), "{:.1f}", " s"),
    ("100k routes (`dpip -b`) ≤ 10 s", ("100k routes <= 10 s",), "{:.1f}", " s"),
)
SCALE_PARTS = ("memory", "memory_shared", "services", "routes", "rest", "rest_per_service")


class HistoryError(ValueError):
    pass


def targets_of(res: dict) -> list[dict]:
    """Every target a run's results checked ({name, value, limit, pass}), from the sections that ran; a target
    that could not be measured (value None) is left out rather than recorded as missed."""
    ts = []
    for sec in ("prog_cost", "e2e"):
        ts += (res.get(sec) or {}).get("targets") or []
    scale = res.get("scale") or {}
    ts += [scale[k]["target"] for k in SCALE_PARTS if isinstance(scale.get(k), dict) and "target" in scale[k]]
    return [{"name": t["name"], "value": t["value"], "limit": t.get("limit"), "pass": bool(t.get("pass"))}
            for t in ts if t.get("value") is not None and t.get("pass") is not None]


def entry(res: dict) -> dict:
    e = {"date": res["date"], "started": res.get("started"), "commit": res.get("commit"),
         "machine": {k: res["machine"].get(k) for k in ("cpu", "nproc", "kernel")},
         "seconds": res.get("seconds"), "targets": targets_of(res)}
    if res.get("e2e"):
        e["generator"] = e2e_generator(res["e2e"])
    return e


def e2e_generator(e2e: dict) -> str:
    """The UDP generator an e2e section's results name; results from before it was named used live frames."""
    return (e2e.get("settings") or {}).get("generator") or "live frames"


def generator(run: dict) -> str:
    """The UDP generator a recorded run used; runs recorded before it was named used live frames."""
    return run.get("generator") or "live frames"


def record(res: dict, path: Path | None = None) -> dict:
    """Append a full run's line to the log (created if missing) and return it."""
    path = path or LOG
    e = entry(res)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n")
    return e


def load(path: Path | None = None) -> list[dict]:
    """The log's runs, oldest first. A line that is not a run's record is an error naming file:line."""
    path = path or LOG
    if not path.exists():
        return []
    runs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            if not isinstance(e, dict) or not isinstance(e.get("machine"), dict):
                raise ValueError("not a run's record (no machine)")
            for t in e["targets"]:
                if not isinstance(t["name"], str) or not isinstance(t["value"], (int, float)) or \
                        not isinstance(t["pass"], bool):
                    raise ValueError(f"target {t.get('name')!r}: name, value and pass must be a string, a number "
                                     "and a boolean")
        except (ValueError, KeyError, TypeError) as err:
            raise HistoryError(f"{path}:{n}: {err}") from None
        runs.append(e)
    return runs


def kind(machine: dict) -> tuple:
    """Runs compare on the same kind of machine: CPU model, vCPU count and the kernel's major.minor."""
    return machine.get("cpu"), machine.get("nproc"), ".".join(str(machine.get("kernel", "")).split(".")[:2])


def summary(runs: list[dict], last: int = LAST) -> dict:
    """Per target over the last `last` runs of the newest run's machine kind: the latest value and pass, the
    range, and in how many of the runs that checked it the target was met."""
    if not runs:
        return {"runs": [], "targets": {}}
    # the UDP ratios move with the generator (another floor in every peer): runs of another one are not mixed in
    k = kind(runs[-1]["machine"]), generator(runs[-1])
    sel = [r for r in runs if (kind(r["machine"]), generator(r)) == k][-last:]
    out: dict[str, dict] = {}
    for r in sel:
        for t in r["targets"]:
            s = out.setdefault(t["name"], {"values": [], "met": 0, "limit": t.get("limit")})
            s["values"].append(t["value"])
            s["met"] += t["pass"]
            s["latest"], s["latest_pass"] = t["value"], t["pass"]
            s["in_latest"] = r is sel[-1]
    return {"runs": sel, "targets": out}


def _rows(summ: dict):
    t = summ["targets"]
    named = [n for _, names, _, _ in ROWS for n in names]
    rows = [(label, [n for n in names if n in t], fmt, unit) for label, names, fmt, unit in ROWS]
    rows += [(n, [n], "{:g}", "") for n in t if n not in named]
    return [r for r in rows if r[1]]


def _fmt(v: float, fmt: str, limit) -> str:
    """A value that rounds to its limit without being it gets the digits that tell them apart (2.496 against
    2.5 reads 2.496, not 2.50 next to "missed")."""
    s = fmt.format(v)
    if limit is None or v == limit:
        return s
    digits = int(fmt[3]) if fmt.startswith("{:.") and fmt[3].isdigit() else 0
    while s == fmt.format(limit) and digits < 6:
        digits += 1
        s = f"{v:.{digits}f}"
    return s


def _span(vals, fmt, limit=None):
    lo, hi = _fmt(min(vals), fmt, limit), _fmt(max(vals), fmt, limit)
    return lo if lo == hi else f"{lo}–{hi}"


def _result(s: dict, md: bool) -> str:
    if not s["in_latest"]:
        word = "not in the latest run"
    else:
        word = ("**met**" if md else "met") if s["latest_pass"] else "missed"
    return f"{word} ({s['met']} of {len(s['values'])})"


def table_rows(summ: dict, md: bool = False) -> list[list[str]]:
    t = summ["targets"]
    out = []
    for label, names, fmt, unit in _rows(summ):
        latest = " / ".join(_fmt(t[n]["latest"], fmt, t[n]["limit"]) if t[n]["in_latest"] else "n/a"
                            for n in names) + unit
        span = " / ".join(_span(t[n]["values"], fmt, t[n]["limit"]) for n in names) + unit
        out.append([label, latest, span, " / ".join(_result(t[n], md) for n in names)])
    return out


def _period(summ: dict) -> str:
    runs = summ["runs"]

    def when(r):
        return f"{r['date']} {r['started']}" if r.get("started") else r["date"]

    return when(runs[0]) if len(runs) == 1 else f"{when(runs[0])} to {when(runs[-1])}"


def markdown(summ: dict) -> str:
    n = len(summ["runs"])
    lines = [f"| target (benchmark issue) | latest | last {n} runs | result (runs met) |", "|---|---:|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(summ, md=True)]
    return "\n".join(lines)


def text(summ: dict) -> str:
    from bench.report import table

    if not summ["runs"]:
        return "targets over the runs on record: none recorded yet"
    m = summ["runs"][-1]["machine"]
    title = (f"targets over the last {len(summ['runs'])} full runs on this machine kind ({m['nproc']} vCPU "
             f"{m['cpu']}, kernel {m['kernel']}, UDP from the {generator(summ['runs'][-1])} generator; "
             f"{_period(summ)}; bench/results/targets.jsonl)")
    return table(["target", "latest", f"last {len(summ['runs'])} runs", "result (runs met)"],
                 table_rows(summ), title)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.history",
                                 description="the benchmark targets over the full runs on record")
    ap.add_argument("--last", type=int, default=LAST, help=f"how many runs (default {LAST})")
    ap.add_argument("--markdown", action="store_true", help="the README's table")
    ap.add_argument("--file", type=Path, default=None, help=f"the log (default {LOG})")
    a = ap.parse_args(argv)
    if a.last < 1:
        ap.error("--last must be at least 1")
    try:
        summ = summary(load(a.file), a.last)
    except (HistoryError, OSError) as e:
        print(f"bench.history: {e}", file=sys.stderr)
        return 2
    print(markdown(summ) if a.markdown else text(summ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
