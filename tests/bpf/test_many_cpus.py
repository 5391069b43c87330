"""The per-CPU build on hosts with more possible CPUs than this VM. The loops over every CPU's copy of a flow
(conn_newest, conn_restart, ...) are unrolled HDSLB_NR_CPUS times, and the verifier walks them with a state per
CPU seen so far: both programs' instructions grow with the square of the CPU count. Each test compiles with
possible_cpus() patched (the kernel's own CPU count does not matter to the verifier) and checks both programs
load: xdp_main and hdslb_sweep, whose batch must shrink as the CPU count grows (it failed with E2BIG from 10)."""

import os
import shutil

import pytest

from hdslb.fastpath import loader

SIZES = dict(max_conns=4096, max_services=64, max_dests=256, max_local=64, max_routes=256, max_neigh=64)
# the most possible CPUs xdp_main's per-CPU build loads with (measured: 6; on 7 its jumps overflow 16 bits once the
# verifier has expanded it). A change that makes this fail has shrunk the margin above loader.PERCPU_MAX_CPUS.
XDP_MAIN_MAX_CPUS = 6


def _load_with_cpus(ncpus: int, table: str = "percpu") -> loader.FastPath:
    loader.ensure_bpffs(loader.DEFAULT_PIN_ROOT)
    pin = os.path.join(loader.DEFAULT_PIN_ROOT, f"pytest-many-cpus-{os.getpid()}-{ncpus}")
    shutil.rmtree(pin, ignore_errors=True)
    fp = loader.FastPath(pin, loader.Sizes(conn_table=table, **SIZES))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loader, "possible_cpus", lambda: ncpus)
        try:
            fp.load()
        except BaseException:
            fp.close()
            fp.unpin()
            raise
    return fp


@pytest.fixture(scope="module")
def ceiling_build():
    """The per-CPU program compiled once for the most CPUs xdp_main takes."""
    fp = _load_with_cpus(XDP_MAIN_MAX_CPUS)
    yield fp
    fp.close()
    fp.unpin()


def test_sweep_loads_as_far_as_xdp_main(ceiling_build):
    assert ceiling_build.fn is not None and ceiling_build.fn.fd >= 0
    assert ceiling_build.sweep_fn is not None and ceiling_build.sweep_fn.fd >= 0
    assert ceiling_build.sweep_batch == loader.sweep_batch("percpu", XDP_MAIN_MAX_CPUS) >= 1


@pytest.mark.parametrize("ncpus", [loader.PERCPU_MAX_CPUS, 256])
def test_the_table_auto_picks_loads_at_the_limit_and_far_above(ncpus):
    """--conn-table auto (the default) picks percpu up to PERCPU_MAX_CPUS possible CPUs, within what the per-CPU
    program loads with (a margin below XDP_MAIN_MAX_CPUS), and shared above, which loads whatever the count.
    Before, the default was percpu whatever the count: hdslbd did not start on 10 or more possible CPUs."""
    assert loader.PERCPU_MAX_CPUS < XDP_MAIN_MAX_CPUS
    kind = loader.resolve_conn_table("auto", ncpus)
    assert kind == ("percpu" if ncpus <= loader.PERCPU_MAX_CPUS else "shared")
    fp = _load_with_cpus(ncpus, kind)
    try:
        assert fp.fn is not None and fp.fn.fd >= 0 and fp.sweep_fn is not None and fp.sweep_fn.fd >= 0
        assert fp.sweep_batch == 32  # the sweep's full batch up to the limit (its speed at 1M flows is benchmarked)
    finally:
        fp.close()
        fp.unpin()
