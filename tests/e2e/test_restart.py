"""Restarts that lose no flow: kill -9 of the daemon, a datapath reload, and the connection table under pressure."""

import hashlib
import signal
import subprocess
import time

import pytest

from .test_fnat import LADDR, curl_loop

VIP = "192.168.100.100"
TRANSFERS = 20


def start_transfers(lab, n, rate="1M"):
    """n rate-limited downloads of /big from the client; returns [(Popen, output path)]."""
    out = []
    for i in range(n):
        path = lab.workdir / f"t{i}.out"
        p = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "curl", "-s", "-m", "120", "--limit-rate", rate,
                              "-o", str(path), f"http://{VIP}/big"])
        lab.procs.append(p)
        out.append((p, path))
    return out


def check_transfers(transfers, servers):
    want = servers[0].big_sha256
    for p, path in transfers:
        assert p.wait(timeout=150) == 0, f"curl exited {p.returncode}"
        body = path.read_bytes()
        assert len(body) == servers[0].big_size and hashlib.sha256(body).hexdigest() == want


def daemon_pid(lb):
    return lb.call("daemon.status")["pid"]


@pytest.fixture(scope="module")
def lab_up(one_arm):
    from .test_fnat import quick_start

    lab, lb, servers, echo = one_arm
    quick_start(lb, lab, VIP, "veth-lb0", "veth-lb0", two_arm=False)
    return one_arm


@pytest.mark.root
def test_kill_9_then_restart_loses_no_flow(lab_up):
    lab, lb, servers, _ = lab_up
    before = lb.ipvsadm("-Ln").stdout
    transfers = start_transfers(lab, TRANSFERS)
    time.sleep(2)
    pid = daemon_pid(lb)
    subprocess.run(["kill", "-9", str(pid)], check=True)
    # the fast path keeps forwarding with nobody at the control socket, new connections included
    lines = curl_loop(lab, f"http://{VIP}/", 10)
    assert len(lines) == 10 and "FAIL" not in lines, lines
    lb.up("veth-lb0")
    assert daemon_pid(lb) != pid
    # same services, real servers, forwarding and weights (the connection columns have moved on)
    assert [ln.split()[:4] for ln in lb.ipvsadm("-Ln").stdout.splitlines()] == [ln.split()[:4] for ln in before.splitlines()]
    assert LADDR in lb.ipvsadm("-G").stdout
    lines = curl_loop(lab, f"http://{VIP}/", 10)
    assert len(lines) == 10 and "FAIL" not in lines, lines
    check_transfers(transfers, servers)
    assert "adopted pinned state" in lb.log()


@pytest.mark.root
def test_datapath_reload_keeps_flows(lab_up):
    lab, lb, servers, _ = lab_up
    transfers = start_transfers(lab, TRANSFERS)
    time.sleep(2)
    prog_before = lab.lb_run(["ip", "link", "show", "veth-lb0"]).stdout
    r = lb.ctl("reload", "--datapath")
    assert "connection entries kept" in r.stdout
    prog_after = lab.lb_run(["ip", "link", "show", "veth-lb0"]).stdout
    assert prog_before != prog_after, "a new program id is attached"
    lines = curl_loop(lab, f"http://{VIP}/", 10)
    assert "FAIL" not in lines
    check_transfers(transfers, servers)
