"""Maglev hashing (-s mh) gives the same answer from two independently started daemons.

Two balancers fed the same servers (ECMP pairs, a restart with --fresh, a replacement box) must send a
given client to the same real server, or every failover breaks sessions. The daemon is stopped fully
(`hdslb-ctl down`: program detached, pins and saved model removed) between the two runs, so nothing but
the configuration is shared.
"""

from __future__ import annotations

import collections

import pytest

from hdslb.lab import modes
from hdslb.lab import netns as nx
from hdslb.lab.servers import start_nginx
from hdslb.lab.topology import TwoArm

from .conftest import Balancer

pytestmark = pytest.mark.root

VIP = "10.0.0.100"
LADDR = "192.168.100.200"
SOURCES = [f"10.0.0.{i}" for i in range(11, 27)]  # 16 client addresses


@pytest.fixture(scope="module")
def mh_lab():
    lab = TwoArm(n_servers=2)
    lab.setup()
    lb = Balancer(lab)
    try:
        servers = start_nginx(lab)
        modes.add_addrs(lab, lab.client, SOURCES)
        yield lab, lb, servers
    finally:
        try:
            lb.down()
        finally:
            lab.teardown()


def start_and_configure(lb):
    lb.up("veth-lb0", "veth-lb1")
    lb.dpip("addr", "add", f"{VIP}/24", "dev", "veth-lb0")
    lb.dpip("route", "add", "192.168.100.0/24", "dev", "veth-lb1")
    lb.ipvsadm("-A", "-t", f"{VIP}:80", "-s", "mh")
    for rs in ("192.168.100.2", "192.168.100.3"):
        lb.ipvsadm("-a", "-t", f"{VIP}:80", "-r", f"{rs}:80", "-b")
    lb.ipvsadm("--add-laddr", "-z", LADDR, "-t", f"{VIP}:80", "-F", "veth-lb1")


def choices(lab, lb) -> dict[str, str]:
    """{client source address: the server that answered}, each source asked twice (from different ports)."""
    out = {}
    for src in SOURCES:
        got = set()
        for _ in range(2):
            r = lab.client_run(["curl", "-s", "-m", "5", "--interface", src, f"http://{VIP}/"], check=False,
                               timeout=10)
            assert r.returncode == 0 and r.stdout, f"{src}: curl exit {r.returncode}\n{lb.log()[-2000:]}"
            got.add(r.stdout.split()[0])
        assert len(got) == 1, f"{src} moved between servers within one daemon: {got}"
        out[src] = got.pop()
    return out


def test_mh_choices_are_identical_across_independent_daemons(mh_lab):
    lab, lb, servers = mh_lab
    start_and_configure(lb)
    assert " mh" in lb.ipvsadm("-Ln").stdout
    first = choices(lab, lb)
    assert set(first.values()) == {"rs1", "rs2"}, collections.Counter(first.values())
    # the servers saw the local address, as FNAT does
    assert {a for s in servers for a in s.access_log_remote_addrs()} == {LADDR}

    lb.down()
    assert lb.ctl("status", check=False).returncode == 3, "the first daemon is gone"
    assert not lab.pin_dir.exists() or not any(lab.pin_dir.iterdir()), "its pinned maps are gone"
    r = nx.run(lab.cl_ns, ["curl", "-s", "-m", "1", f"http://{VIP}/"], check=False)
    assert r.returncode != 0, "nothing answers for the VIP between the two daemons"

    start_and_configure(lb)
    second = choices(lab, lb)
    moved = {src: (first[src], second[src]) for src in SOURCES if first[src] != second[src]}
    assert not moved, f"{len(moved)} of {len(SOURCES)} sources changed server: {moved}"
