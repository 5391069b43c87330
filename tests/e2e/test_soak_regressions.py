"""What the soak (bench/soak.py) found, each reduced to its smallest reproduction against a running hdslbd."""

import re
import time

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


@pytest.mark.root
def test_hdslbd_keeps_its_model_out_of_full_collections(bare):
    """The real daemon turns hdslb.heap on (tests/unit/test_heap.py has the rule): frozen at start, and again
    after a bulk change settles, so full collections at 10k x 10 no longer walk the model with the loop held."""
    lab, lb = bare
    st = lb.call("daemon.status")["heap"]
    assert st["enabled"] and st["settles"] >= 1 and st["frozen_objects"] > 10000, st
    from hdslb.ctl.client import Client

    before = st["settles"]
    ops = [["service.add", {"proto": "udp", "addr": f"10.77.{i // 256}.{i % 256}", "port": 53, "sched": "rr"}]
           for i in range(2500)]
    with Client(str(lab.ctrl_path), 60) as c:
        c.batch(ops)
        try:
            deadline = time.monotonic() + 20  # the save after a burst is coalesced: a few seconds at most
            while c.call("daemon.status")["heap"]["settles"] == before and time.monotonic() < deadline:
                time.sleep(0.2)
            assert c.call("daemon.status")["heap"]["settles"] == before + 1
        finally:
            c.batch([["service.del", {"proto": "udp", "addr": a["addr"], "port": 53}] for _, a in ops])
