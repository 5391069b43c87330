"""The bench's reference programs (make bench, never make test) compile against the fast path's shared headers
and pass the verifier: a header change that breaks them must fail here, not in the next benchmark run."""

from bcc import BPF

from bench import ref_progs


def test_every_reference_program_compiles_and_loads():
    b = ref_progs.compile_refs()
    names = [n for n, _ in ref_progs.STAGES + ref_progs.ALTERNATIVES + ref_progs.INSERTS]
    names += [f"ref_{step}_{m}" for m, _ in ref_progs.LOOKUPS for step in ("fill", "look")]
    names += ["bench_redirect", "bench_sink"]
    for name in names:
        assert b.load_func(name.encode(), BPF.XDP).fd >= 0, name


def test_a_failed_section_exits_1_and_never_writes_over_the_days_results(monkeypatch, tmp_path):
    """A section that raises is n/a in the output, but the run is not the day's result: exit 1, -partial file."""
    import types

    from bench import report, run

    def broken(quick, log):
        raise RuntimeError("header does not compile")

    monkeypatch.setitem(__import__("sys").modules, "bench.prog_cost", types.SimpleNamespace(run=broken))
    monkeypatch.setattr(run, "SECTIONS", ("prog_cost",))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "chart", lambda res, path: "no chart in tests")
    assert run.main([]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"{report.today()}-partial.json"]
