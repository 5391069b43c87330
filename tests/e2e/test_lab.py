"""The netns lab itself: topologies wire up as described, servers answer, and teardown leaves nothing behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def _need_root():
    # On CI a missing privilege is a broken runner, not a reason to silently test nothing.
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("e2e tests need root and CI is set")
        pytest.skip("needs root")


from hdslb.fastpath import xdp_pass  # noqa: E402
from hdslb.lab import netns as nx  # noqa: E402
from hdslb.lab import servers as srv  # noqa: E402
from hdslb.lab.topology import OneArm, TwoArm  # noqa: E402


def udp_ask(ns: str, dst: str, port: int = 53, payload: bytes = b"ping") -> tuple[str, tuple, int]:
    """One datagram from inside ns: the reply text, the address it came from, our source port."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with nx.ns_socket(ns, family, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(payload, (dst, port))
        data, src = s.recvfrom(1024)
        return data.decode(), src, s.getsockname()[1]


def assert_gone(lab, pids):
    existing = nx.netns_list()
    assert not [n for n in existing if n.startswith(lab.prefix + "-")], existing
    assert nx.pids_alive(pids) == []
    assert not lab.ctrl_path.exists()
    assert not lab.record_path.exists()
    assert lab.workdir is None or not lab.workdir.exists()


def test_xdp_pass_loads_without_bcc():
    fd = xdp_pass.load()
    try:
        assert fd > 0
    finally:
        os.close(fd)


def test_onearm_wiring_and_servers():
    with OneArm() as lab:
        p = lab.prefix
        assert {f"{p}-cl", f"{p}-lb", f"{p}-sw", f"{p}-rs1", f"{p}-rs2"} <= set(nx.netns_list())
        assert [s.ip for s in lab.servers] == ["192.168.100.2", "192.168.100.3"]
        assert lab.client.ip == "192.168.100.1"

        # The LB interface is up, bridged, and has no kernel IPv4 address (the balancer owns addresses).
        lb0 = nx.link_info(lab.lb_ns, "veth-lb0")
        assert "UP" in lb0["flags"]
        assert nx.addrs(lab.lb_ns, "veth-lb0") == []
        assert nx.link_info(lab.sw_ns, "sw-lb0")["master"] == "br0"
        # XDP_PASS sits on the switch side of veth-lb0, in native mode, so the LB can XDP_TX.
        assert nx.run(lab.sw_ns, [sys.executable, "-c",
                                  "from hdslb.fastpath import xdp_pass as x; print(x.query('sw-lb0')[0])"],
                      env=nx.package_env()).stdout.strip() == "native"
        for ns, ifname in [(lab.lb_ns, "veth-lb0"), (lab.sw_ns, "sw-lb0"), (lab.cl_ns, "eth0")]:
            feats = nx.offloads(ns, ifname)
            assert not feats["tx-checksumming"] and not feats["generic-segmentation-offload"], (ns, ifname)

        # The LB namespace sees the shared bpffs and the lab's control socket path.
        out = lab.lb_run(["sh", "-c", f"stat -f -c %T {nx.BPFFS_DIR}; echo $HDSLB_CTRL"]).stdout.split()
        assert out == ["bpf_fs", str(lab.ctrl_path)]

        web = srv.start_nginx(lab, big_size=1 << 20)
        echo = srv.start_udp_echo(lab)

        # Direct client -> server traffic over the switch (no LB involved).
        r = lab.client_run(["curl", "-sS", "-m", "3", "http://192.168.100.2/"])
        assert r.stdout == "rs1 192.168.100.1\n"
        r = lab.client_run(["sh", "-c", "curl -sS -m 5 http://192.168.100.3/big | sha256sum"])
        assert r.stdout.split()[0] == web[1].big_sha256
        assert web[0].access_log_remote_addrs() == ["192.168.100.1"]
        assert web[1].access_log_remote_addrs() == ["192.168.100.1"]

        text, src, port = udp_ask(lab.cl_ns, "192.168.100.3")
        assert text == f"rs2 192.168.100.1:{port}"
        assert src == ("192.168.100.3", 53)

        # DR/TUNNEL readiness: a datagram to an address held on lo is answered from that address.
        lab.server_run(1, ["ip", "addr", "add", "192.168.100.100/32", "dev", "lo"])
        nx.route_add(lab.cl_ns, "192.168.100.100/32", via="192.168.100.2")
        text, src, port = udp_ask(lab.cl_ns, "192.168.100.100")
        assert (text, src) == (f"rs1 192.168.100.1:{port}", ("192.168.100.100", 53))
        assert echo[0].running() and echo[1].running()


def test_twoarm_wiring():
    with TwoArm(n_servers=2) as lab:
        p = lab.prefix
        assert {f"{p}-cl", f"{p}-lb", f"{p}-sw", f"{p}-rs1", f"{p}-rs2"} <= set(nx.netns_list())
        assert nx.addrs(lab.cl_ns, "eth0") == ["10.0.0.1/24"]
        assert lab.vip == "10.0.0.100"
        for ifname in ("veth-lb0", "veth-lb1"):
            assert nx.addrs(lab.lb_ns, ifname) == []
        assert set(nx.links(lab.lb_ns)) >= {"lo", "veth-lb0", "veth-lb1"}
        # veth-lb0 is wired straight to the client; veth-lb1 to the switch.
        assert lab.lb_ifaces["veth-lb0"].peer_mac == lab.client.mac
        assert nx.link_info(lab.sw_ns, "sw-lb1")["master"] == "br0"
        # Native XDP_PASS on the far end of both LB veths (IFLA_XDP_ATTACHED 1 = driver mode).
        for ns, ifname in [(lab.cl_ns, "eth0"), (lab.sw_ns, "sw-lb1")]:
            xdp = nx.link_info(ns, ifname)["xdp"]
            assert xdp_pass.XDP_ATTACHED[xdp["mode"]] == "native"
            assert xdp["prog"]["name"] == "hdslb_xdp_pass"

        # Servers share their switch; the client has no route there without the LB (expected).
        # (no ping on the CI image: the UDP echo is the probe)
        srv.start_udp_echo(lab, which=[2])
        text, _src, port = udp_ask(lab.server(1).ns, "192.168.100.3")
        assert text == f"rs2 192.168.100.2:{port}"
        r = nx.sh(["ip", "-n", lab.cl_ns, "route", "get", "192.168.100.2"], check=False)
        assert r.returncode != 0 and "unreachable" in r.stderr.lower()


def test_teardown_on_exception_removes_everything():
    lab = OneArm(n_servers=1)
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"):
        with lab:
            srv.start_nginx(lab, big_size=4096)
            srv.start_udp_echo(lab)
            # Include children we did not spawn ourselves (nginx workers).
            pids = [pid for ns in lab.namespaces for pid in nx.netns_pids(ns)]
            assert len(pids) >= 3
            lab.ctrl_path.touch()  # as a daemon would leave it
            raise RuntimeError("boom")
    assert_gone(lab, pids)
    lab.teardown()  # idempotent


def test_failed_setup_cleans_up(monkeypatch):
    def broken(*_a, **_k):
        raise nx.CommandError(["xdp_pass"], 1, "", "injected failure")

    monkeypatch.setattr(nx, "xdp_pass_attach", broken)  # the last step of OneArm's build
    lab = OneArm()
    with pytest.raises(nx.CommandError, match="injected"):
        lab.setup()
    assert_gone(lab, [])


def test_gc_cleans_labs_of_dead_owners():
    lab = OneArm(n_servers=1).setup()
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()
        rec = lab.record_path.read_text().replace(f'"owner_pid": {os.getpid()}', f'"owner_pid": {dead.pid}')
        lab.record_path.write_text(rec)
        # `only`: labs of concurrent test runs are none of this test's business.
        assert nx.gc(dry_run=True, only=[lab.prefix]) == [lab.prefix]
        assert nx.gc(only=[lab.prefix]) == [lab.prefix]
        assert not [n for n in nx.netns_list() if n.startswith(lab.prefix + "-")]
    finally:
        lab.teardown()
