"""What the soak (bench/soak.py) found, each reduced to its smallest reproduction against a running hdslbd."""

import re

import pytest

from hdslb.lab.topology import OneArm

from .conftest import Balancer

RELOADS = 4
# A compile takes ~220 MB of heap (bcc/LLVM), freed at close() but kept by glibc's arenas unless trimmed: over four
# reloads RSS grew by 30-290 MiB (276 -> 307..569 MiB) before the fix; with it, it ends ~60 MiB below the start's
# (the start's own compile is given back at the first reload).
ALLOWED_GROWTH_KB = 10 * 1024


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


@pytest.fixture(scope="module")
def bare():
    lab = OneArm(n_servers=1)
    lab.setup()
    try:
        lb = Balancer(lab)
        lb.up("veth-lb0")
        yield lab, lb
    finally:
        try:
            lb.down()
        finally:
            lab.teardown()


@pytest.mark.root
def test_datapath_reloads_do_not_grow_the_daemon_by_a_compile_each(bare):
    lab, lb = bare
    pid = lb.call("daemon.status")["pid"]
    before = rss_kb(pid)
    for _ in range(RELOADS):
        lb.ctl("reload", "--datapath")
    after = rss_kb(pid)
    assert after - before <= ALLOWED_GROWTH_KB, (
        f"RSS {before // 1024} -> {after // 1024} MiB over {RELOADS} datapath reloads")
