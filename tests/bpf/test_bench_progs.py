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
