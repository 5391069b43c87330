"""e2e fixtures: a lab with real servers, and the balancer started the way an operator starts it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hdslb.lab import netns as nx
from hdslb.lab.servers import start_nginx, start_udp_echo
from hdslb.lab.topology import OneArm, TwoArm

BIN = Path(sys.executable).parent


def tool(name: str, module: str) -> list[str]:
    """The installed console script when present (what operators run), else the module."""
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


HDSLB_CTL = tool("hdslb-ctl", "cli.hdslb_ctl")
IPVSADM = tool("ipvsadm", "cli.ipvsadm")
DPIP = tool("dpip", "cli.dpip")


class Balancer:
    """Runs the operator tools inside the lab's LB namespace against the lab's control socket."""

    def __init__(self, lab):
        self.lab = lab

    def run(self, argv, check=True, timeout=120):
        r = self.lab.lb_run(argv, check=False, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, argv))} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def ctl(self, *a, **kw):
        return self.run(HDSLB_CTL + list(a), **kw)

    def ipvsadm(self, *a, **kw):
        return self.run(IPVSADM + list(a), **kw)

    def dpip(self, *a, **kw):
        return self.run(DPIP + list(a), **kw)

    def call(self, op, args=None):
        from hdslb.ctl.client import call

        return call(op, args, path=str(self.lab.ctrl_path))

    def up(self, *ifaces, mode="native"):
        self.ctl("up", *ifaces, "--xdp-mode", mode, "--pin-root", str(self.lab.pin_dir.parent),
                 "--log-file", str(self.lab.workdir / "hdslbd.log"))

    def down(self):
        self.ctl("down", check=False)

    def log(self) -> str:
        p = self.lab.workdir / "hdslbd.log"
        return p.read_text(errors="replace") if p.exists() else ""


def _lab(cls):
    lab = cls(n_servers=2)
    lab.setup()
    try:
        servers = start_nginx(lab)
        echo = start_udp_echo(lab)
        lb = Balancer(lab)
        yield lab, lb, servers, echo
    finally:
        try:
            Balancer(lab).down()
        finally:
            lab.teardown()


@pytest.fixture(scope="module")
def one_arm():
    yield from _lab(OneArm)


@pytest.fixture(scope="module")
def two_arm():
    yield from _lab(TwoArm)
