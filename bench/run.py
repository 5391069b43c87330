"""`make bench`: every section in one run, each on its own (a failing section prints n/a and the rest go on).

    python -m bench.run [--quick] [--only prog_cost|e2e|scale] [--peers NAME,...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback

from bench import history, report

SECTIONS = ("prog_cost", "e2e", "scale", "slowpath")


def _log(msg: str) -> None:
    print(msg, flush=True)


def commit(root: str) -> str | None:
    """The checkout's commit, "+changes" when tracked files outside bench/results differ from it."""
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        st = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                             ":(exclude)bench/results"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+changes" if st.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description="hdslb benchmarks against its peers")
    ap.add_argument("--quick", action="store_true", help="small counts, ~2 minutes (development)")
    ap.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    ap.add_argument("--peers", help="e2e: only peers whose name contains one of these (comma separated)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (BPF, network namespaces)", file=sys.stderr)
        return 2
    # the lab runs `python -m hdslb...` inside namespaces: make this checkout importable there
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = root + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    if root not in sys.path:
        sys.path.insert(0, root)
    try:  # a lab left behind by a killed earlier run would hold names and memory
        from hdslb.lab import netns

        netns.gc()
    except Exception:
        pass

    res: dict = {"date": report.today(), "started": time.strftime("%H:%M"), "commit": commit(root),
                 "machine": report.machine(), "quick": a.quick}
    _log(f"hdslb bench {res['date']}  {res['machine']}  {'(quick)' if a.quick else ''}")
    t0 = time.monotonic()
    printed, failed = [], []
    for name in SECTIONS:
        if a.only and name not in a.only:
            continue
        _log(f"\n== {name} ==")
        try:
            if name == "prog_cost":
                from bench import prog_cost

                res[name] = prog_cost.run(a.quick, _log)
                text = report.fmt_prog_cost(res[name])
            elif name == "e2e":
                from bench import e2e

                peers = [p.strip() for p in a.peers.split(",")] if a.peers else None
                res[name] = e2e.run(a.quick, _log, peers)
                text = report.fmt_e2e(res[name])
            elif name == "slowpath":
                from bench import slowpath

                res[name] = slowpath.run(a.quick, _log)
                r = res[name]
                text = report.table(["measure", "per second"], [
                    ["echo replies answered by the slow path", r["answered_per_s"]],
                    ["echo requests sent (2 Python senders)", r["sent_per_s"]]], "4. slow path (AF_XDP, Python)")
            else:
                from bench import scale

                res[name] = scale.run(a.quick, _log)
                text = report.fmt_scale(res[name])
        except Exception as e:  # one section's failure must not cost the others
            traceback.print_exc()
            if name in res:  # it ran, its table failed: the measurements are kept in the results file
                res[name]["format_na"] = f"{type(e).__name__}: {e}"
                text = f"{name}: table n/a ({res[name]['format_na']}; measurements in the results file)"
            else:
                res[name] = {"na": f"{type(e).__name__}: {e}"}
                text = f"{name}: n/a ({res[name]['na']})"
            failed.append(name)
        else:  # a section that caught a part's failure (scale's memory, loads, ...) says so as {"na": reason}
            failed += [f"{name}.{k}" for k, v in res[name].items() if isinstance(v, dict) and "na" in v]
        printed.append(text)
    res["seconds"] = round(time.monotonic() - t0, 1)
    # A run with a failed section is not the day's result: it goes beside it (-partial), never over it.
    partial = bool(a.only or a.peers or failed)
    jp, pp, err = report.write(res, partial=partial)
    if not (partial or a.quick):  # only a full run counts towards the targets' record
        history.record(res)
    _log("\n== summary ==\n")
    _log("\n\n".join(printed))
    try:
        _log("\n" + history.text(history.summary(history.load())))
    except history.HistoryError as e:
        _log(f"\ntargets over the runs on record: n/a ({e})")
    _log("\n== README block ==\n")
    _log(report.markdown(res))
    _log(f"\nresults: {jp}" + (f"\nchart:   {pp}" if pp else f"\nchart:   n/a ({err})") + f"\ntook {res['seconds']} s")
    if failed:
        _log(f"\nbench: section(s) failed: {', '.join(failed)} (tracebacks above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
