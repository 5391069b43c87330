"""ipvsadm --set in a live lab: a UDP flow that would live 300 s idle goes at the next sweep once the udp
timeout is 2 s, -L --timeout shows the values, and they survive a kill -9 and restart of hdslbd."""

import subprocess
import time

import pytest

from .test_aging import aging_lab, conns, udp_flows
from .test_restart import wait_gone


def timeout_line(lb) -> str:
    return lb.ipvsadm("-L", "--timeout").stdout


def listed_within(lb, seconds: float) -> list:
    """The UDP flow's entries once listed (the daemon reuses a connection scan for up to a second)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        found = conns(lb, 17)
        if found:
            return found
        time.sleep(0.2)
    return []


def gone_within(lb, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if conns(lb, 17) == []:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.root
def test_set_udp_timeout_expires_flows_shows_and_survives_kill_9():
    # the config sets no timeouts: DPVS's defaults, udp 300 s
    with aging_lab(2, (("-u", 53),), "--aging-interval", "0.5", nginx=False,
                   conf_text="global_defs {\n    log_level INFO\n}\n") as (lab, lb):
        assert timeout_line(lb) == "Timeout (tcp tcpfin udp): 90 7 300\n"
        assert udp_flows(lab, 1, first_port=31000) == 1
        listed = listed_within(lb, 5)
        assert listed and all(c["expire_s"] > 290 for c in listed), listed
        time.sleep(3.5)  # idle past 2 s and several sweeps: under the 300 s default it stays
        assert len(conns(lb, 17)) == 1

        bad = lb.ipvsadm("--set", "0", "0", "-1", check=False)
        assert bad.returncode == 2 and bad.stderr == "invalid timeout value `-1' specified\n"
        assert timeout_line(lb) == "Timeout (tcp tcpfin udp): 90 7 300\n"  # nothing changed

        lb.ipvsadm("--set", "0", "0", "2")
        assert timeout_line(lb) == "Timeout (tcp tcpfin udp): 90 7 2\n"
        assert gone_within(lb, 10), conns(lb, 17)  # idle > 2 s already: the next sweep takes it
        assert udp_flows(lab, 1, first_port=31100) == 1
        listed = listed_within(lb, 5)
        assert listed and all(c["expire_s"] <= 2 for c in listed), listed
        assert gone_within(lb, 10), conns(lb, 17)

        pid = lb.call("daemon.status")["pid"]
        subprocess.run(["kill", "-9", str(pid)], check=True)
        wait_gone(pid)
        lb.ctl("up", *lb.up_args)
        assert lb.call("daemon.status")["pid"] != pid
        assert timeout_line(lb) == "Timeout (tcp tcpfin udp): 90 7 2\n"
        assert lb.ipvsadm("-Ln", "--timeout").stdout == "Timeout (tcp tcpfin udp): 90 7 2\n"
        assert udp_flows(lab, 1, first_port=31200) == 1
        listed = listed_within(lb, 5)
        assert listed and all(c["expire_s"] <= 2 for c in listed), listed
        assert gone_within(lb, 10), conns(lb, 17)
