"""Health checks from the config file: a dead real server leaves rotation and comes back; inhibit_on_failure keeps
live connections; quorum loss brings in the sorry server; a reload changes the set without breaking transfers."""

import hashlib
import subprocess
import time

import pytest

from hdslb.lab.servers import Nginx
from hdslb.lab.topology import OneArm

from .conftest import Balancer

VIP_A, VIP_B = "192.168.100.100", "192.168.100.101"
CHECK_PORT = 9000

CONF = f"""
local_address_group lg {{
    192.168.100.200 veth-lb0
}}

! plain checks on the service port
virtual_server {VIP_A} 80 {{
    delay_loop 1
    lb_algo rr
    lb_kind FNAT
    protocol TCP
    laddr_group_name lg
    real_server 192.168.100.2 80 {{
        TCP_CHECK {{
            connect_timeout 1
            retry 1
            delay_before_retry 0.5
        }}
    }}
    real_server 192.168.100.3 80 {{
        TCP_CHECK {{
            connect_timeout 1
            retry 1
            delay_before_retry 0.5
        }}
    }}
    real_server 192.168.100.4 80 {{
        TCP_CHECK {{
            connect_timeout 1
            retry 1
            delay_before_retry 0.5
        }}
    }}
}}

! checks on a side port, inhibit on failure, quorum with a sorry server
virtual_server {VIP_B} 80 {{
    delay_loop 1
    lb_algo rr
    lb_kind FNAT
    protocol TCP
    laddr_group_name lg
    inhibit_on_failure
    quorum 1
    sorry_server 192.168.100.5 80
    real_server 192.168.100.2 80 {{
        TCP_CHECK {{
            connect_port {CHECK_PORT}
            connect_timeout 1
            retry 1
            delay_before_retry 0.5
        }}
    }}
    real_server 192.168.100.3 80 {{
        TCP_CHECK {{
            connect_port {CHECK_PORT}
            connect_timeout 1
            retry 1
            delay_before_retry 0.5
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def hc():
    lab = OneArm(n_servers=4)
    lab.setup()
    try:
        servers = [Nginx(lab, i).start() for i in range(1, 5)]
        side = {i: lab.spawn(lab.server(i).ns, ["python3", "-m", "http.server", str(CHECK_PORT)]) for i in (1, 2)}
        # health checks leave through the kernel (DPVS's KNI): it needs an address on the servers' subnet
        lab.lb_run(["ip", "addr", "add", "192.168.100.250/24", "dev", "veth-lb0"])
        lb = Balancer(lab)
        conf = lab.workdir / "lb.conf"
        conf.write_text(CONF)
        lb.ctl("up", "veth-lb0", "--xdp-mode", "native", "--pin-root", str(lab.pin_dir.parent),
               "--log-file", str(lab.workdir / "hdslbd.log"), "-f", str(conf))
        lb.dpip("route", "add", "192.168.100.0/24", "dev", "veth-lb0")
        time.sleep(2.5)  # first checks (warmup is random up to delay_loop)
        yield lab, lb, servers, side, conf
    finally:
        try:
            Balancer(lab).down()
        finally:
            lab.teardown()


def get(lab, vip, path="/"):
    r = lab.client_run(["curl", "-s", "-m", "2", f"http://{vip}{path}"], check=False, timeout=10)
    return r.stdout.split()[0] if r.returncode == 0 and r.stdout else None


def dest(lb, vip, addr):
    svc = lb.call("service.list", {"svc": {"proto": "tcp", "addr": vip, "port": 80}})["services"][0]
    return next((d for d in svc["dests"] if d["addr"] == addr), None)


@pytest.mark.root
def test_config_declares_the_services(hc):
    lab, lb, servers, side, conf = hc
    out = lb.ipvsadm("-Ln").stdout
    assert f"TCP  {VIP_A}:80 rr" in out and f"TCP  {VIP_B}:80 rr" in out
    assert {get(lab, VIP_A) for _ in range(6)} == {"rs1", "rs2", "rs3"}
    assert lb.ctl("check", "-f", str(conf)).returncode == 0


@pytest.mark.root
def test_dead_server_leaves_rotation_and_returns(hc):
    lab, lb, servers, side, conf = hc
    servers[2].stop()  # rs3
    t0 = time.monotonic()
    answers, down_at = [], None
    while time.monotonic() - t0 < 6:
        answers.append((time.monotonic(), get(lab, VIP_A)))
        if down_at is None and dest(lb, VIP_A, "192.168.100.4")["health"]["state"] == "down":
            down_at = time.monotonic()
    assert down_at is not None and down_at - t0 <= 3.0, "out of rotation within delay_loop + connect_timeout"
    d = dest(lb, VIP_A, "192.168.100.4")
    assert d["weight"] == 0 and d["health"]["reason"]
    # requests to the others never fail; after detection nothing fails at all
    bad = [(round(t - t0, 2), a) for t, a in answers if t > down_at + 0.1 and a not in ("rs1", "rs2")]
    assert not bad, bad
    assert all(a in ("rs1", "rs2", None) for t, a in answers)
    servers[2].start()
    t1 = time.monotonic()
    while time.monotonic() - t1 < 6 and dest(lb, VIP_A, "192.168.100.4")["health"]["state"] != "up":
        time.sleep(0.2)
    assert dest(lb, VIP_A, "192.168.100.4")["health"]["state"] == "up"
    assert "rs3" in {get(lab, VIP_A) for _ in range(6)}


@pytest.mark.root
def test_inhibit_keeps_live_connection_and_quorum_loss_brings_sorry_server(hc):
    lab, lb, servers, side, conf = hc
    # a long download pinned to rs1 via VIP B: find it by trying until rs1 answers a probe first
    out = lab.workdir / "inhibit.out"
    dl = None
    for _ in range(4):
        if get(lab, VIP_B) == "rs2":  # the next new flow goes to rs1 (rr)
            dl = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "curl", "-s", "-m", "60", "--limit-rate",
                                   "1M", "-o", str(out), f"http://{VIP_B}/big"])
            lab.procs.append(dl)
            break
    assert dl is not None
    time.sleep(1)
    lab.stop(side[1])  # rs1's check port dies; its web server keeps serving
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5 and dest(lb, VIP_B, "192.168.100.2")["health"]["state"] != "down":
        time.sleep(0.2)
    d = dest(lb, VIP_B, "192.168.100.2")
    assert d["health"]["state"] == "down" and d["weight"] == 0
    assert {get(lab, VIP_B) for _ in range(4)} == {"rs2"}
    # quorum 1: with rs2 also down nothing is up -> the sorry server takes new flows
    lab.stop(side[2])
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5 and dest(lb, VIP_B, "192.168.100.5") is None:
        time.sleep(0.2)
    assert dest(lb, VIP_B, "192.168.100.5") is not None, "sorry server added"
    assert {get(lab, VIP_B) for _ in range(3)} == {"rs4"}
    # the live connection to the inhibited rs1 completed with every byte
    assert dl.wait(timeout=60) == 0
    body = out.read_bytes()
    assert len(body) == servers[0].big_size and hashlib.sha256(body).hexdigest() == servers[0].big_sha256


@pytest.mark.root
def test_reload_changes_the_set_without_breaking_a_transfer(hc):
    lab, lb, servers, side, conf = hc
    # a long transfer to rs2 (192.168.100.3), which stays in the new set
    out = lab.workdir / "reload.out"
    dl = None
    for _ in range(6):
        if get(lab, VIP_A) == "rs1":  # rr: the next new flow goes to rs2
            dl = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "curl", "-s", "-m", "60", "--limit-rate",
                                   "1M", "-w", "%{remote_ip} %{size_download}", "-o", str(out), f"http://{VIP_A}/big"])
            lab.procs.append(dl)
            break
    assert dl is not None
    time.sleep(1)
    new = conf.read_text().replace("real_server 192.168.100.2 80 {", "real_server 192.168.100.5 80 {", 1)
    conf.write_text(new)
    r = lb.ctl("reload")
    assert "dest.del" in r.stdout and "dest.add" in r.stdout
    listing = lb.ipvsadm("-Ln").stdout
    assert "192.168.100.5:80" in listing
    time.sleep(2.5)  # the new server's first check
    assert {get(lab, VIP_A) for _ in range(9)} == {"rs2", "rs3", "rs4"}
    assert dl.wait(timeout=60) == 0
    body = out.read_bytes()
    assert len(body) == servers[0].big_size and hashlib.sha256(body).hexdigest() == servers[0].big_sha256

    # an invalid reload is refused with file:line and changes nothing
    before = lb.ipvsadm("-Ln").stdout
    conf.write_text(new.replace("delay_loop 1", "delay_loop soon", 1))
    bad = lb.ctl("reload", check=False)
    assert bad.returncode != 0 and f"{conf}:" in bad.stderr and "nothing was applied" in bad.stderr
    assert [ln.split()[:4] for ln in lb.ipvsadm("-Ln").stdout.splitlines()] == \
        [ln.split()[:4] for ln in before.splitlines()]
    assert lb.ctl("check", "-f", str(conf), check=False).returncode == 1
    conf.write_text(new)


@pytest.mark.root
def test_check_added_at_run_time_takes_a_server_out_and_del_brings_it_back(hc):
    lab, lb, servers, side, conf = hc
    vip = "192.168.100.102"
    listener = lab.spawn(lab.server(3).ns, ["python3", "-m", "http.server", "9001"])
    lb.ipvsadm("-A", "-t", f"{vip}:80", "-s", "rr")
    for rs in ("192.168.100.2", "192.168.100.4"):
        lb.ipvsadm("-a", "-t", f"{vip}:80", "-r", f"{rs}:80", "-b")
    lb.ipvsadm("--add-laddr", "-z", "192.168.100.200", "-t", f"{vip}:80", "-F", "veth-lb0")
    lb.dpip("addr", "add", f"{vip}/32", "dev", "veth-lb0")
    lb.ctl("health", "add", "-t", f"{vip}:80", "-r", "192.168.100.4:80", "--delay-loop", "1",
           "connect_port=9001", "connect_timeout=1", "retry=0")
    time.sleep(2.5)
    assert dest(lb, vip, "192.168.100.4")["health"]["state"] == "up"
    assert {get(lab, vip) for _ in range(4)} == {"rs1", "rs3"}
    lab.stop(listener)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5 and dest(lb, vip, "192.168.100.4")["health"]["state"] != "down":
        time.sleep(0.2)
    assert dest(lb, vip, "192.168.100.4")["health"]["state"] == "down"
    assert "192.168.100.4:80" in lb.ctl("health", "show").stdout
    assert {get(lab, vip) for _ in range(4)} == {"rs1"}
    bad = lb.ctl("health", "add", "-t", f"{vip}:80", "-r", "192.168.100.4:80", "bogus=1", check=False)
    assert bad.returncode == 1 and "bogus" in bad.stderr
    lb.ctl("health", "del", "-t", f"{vip}:80", "-r", "192.168.100.4:80")
    assert dest(lb, vip, "192.168.100.4")["health"]["state"] == "up"
    assert {get(lab, vip) for _ in range(4)} == {"rs1", "rs3"}


@pytest.mark.root
def test_a_persistent_client_stays_on_a_drained_server_and_leaves_a_failed_one(hc):
    """A sticky server drained by hand (ipvsadm -e -w 0) keeps the client whose template names it, as LVS does,
    while a new client goes elsewhere; the same server failing its health check loses the client at once."""
    lab, lb, servers, side, conf = hc
    vip, port, fresh = "192.168.100.103", "9002", "192.168.100.91"
    rss = {"rs1": "192.168.100.2", "rs2": "192.168.100.3"}
    listeners = {name: lab.spawn(lab.server(int(name[2:])).ns, ["python3", "-m", "http.server", port])
                 for name in rss}
    lb.ipvsadm("-A", "-t", f"{vip}:80", "-s", "rr", "-p", "60")
    for rs in rss.values():
        lb.ipvsadm("-a", "-t", f"{vip}:80", "-r", f"{rs}:80", "-b")
    lb.ipvsadm("--add-laddr", "-z", "192.168.100.200", "-t", f"{vip}:80", "-F", "veth-lb0")
    lb.dpip("addr", "add", f"{vip}/32", "dev", "veth-lb0")
    for rs in rss.values():  # checks first: a new check holds its server down until its first pass (alpha)
        lb.ctl("health", "add", "-t", f"{vip}:80", "-r", f"{rs}:80", "--delay-loop", "1", f"connect_port={port}",
               "connect_timeout=1", "retry=0")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5 and any(dest(lb, vip, rs)["health"]["state"] != "up" for rs in rss.values()):
        time.sleep(0.2)
    lab.client_run(["ip", "addr", "add", f"{fresh}/24", "dev", lab.client.ifname])
    try:
        first = {get(lab, vip) for _ in range(3)}
        assert len(first) == 1 and None not in first, first
        (sticky,) = first
        (other,) = set(rss) - first
        lb.ipvsadm("-e", "-t", f"{vip}:80", "-r", f"{rss[sticky]}:80", "-b", "-w", "0")
        assert {get(lab, vip) for _ in range(4)} == {sticky}, "drained: its persistent client keeps coming"
        r = lab.client_run(["curl", "-s", "-m", "2", "--interface", fresh, f"http://{vip}/"], check=False, timeout=10)
        assert r.stdout.split()[:1] == [other], "a new client does not go to the drained server"
        lb.ipvsadm("-e", "-t", f"{vip}:80", "-r", f"{rss[sticky]}:80", "-b", "-w", "1")
        assert {get(lab, vip) for _ in range(2)} == {sticky}
        lab.stop(listeners[sticky])
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5 and dest(lb, vip, rss[sticky])["health"]["state"] != "down":
            time.sleep(0.2)
        assert dest(lb, vip, rss[sticky])["health"]["state"] == "down"
        assert {get(lab, vip) for _ in range(3)} == {other}, "down by its check: the client moves"
    finally:
        lab.client_run(["ip", "addr", "del", f"{fresh}/24", "dev", lab.client.ifname], check=False)
        for rs in rss.values():
            lb.ctl("health", "del", "-t", f"{vip}:80", "-r", f"{rs}:80", check=False)
        lb.ipvsadm("-D", "-t", f"{vip}:80", check=False)
        lb.dpip("addr", "del", f"{vip}/32", "dev", "veth-lb0", check=False)
        for p in listeners.values():
            if p in lab.procs:
                lab.stop(p)


@pytest.mark.root
def test_restart_brings_back_servers_that_recovered_while_hdslbd_was_down(hc):
    """The restarted daemon adopts the saved verdicts (VIP B's servers down, its sorry server in) and its checks
    revise them: servers that came back while it was dead return, and the sorry server goes."""
    lab, lb, servers, side, conf = hc
    assert dest(lb, VIP_B, "192.168.100.2")["health"]["state"] == "down", "left down by the quorum test"
    assert dest(lb, VIP_B, "192.168.100.5") is not None, "sorry server in since the quorum test"
    pid = lb.call("daemon.status")["pid"]
    subprocess.run(["kill", "-9", str(pid)], check=True)
    for i in (1, 2):
        side[i] = lab.spawn(lab.server(i).ns, ["python3", "-m", "http.server", str(CHECK_PORT)])
    lb.ctl("up", "veth-lb0", "--xdp-mode", "native", "--pin-root", str(lab.pin_dir.parent),
           "--log-file", str(lab.workdir / "hdslbd.log"), "-f", str(conf))
    assert lb.call("daemon.status")["pid"] != pid and "adopted pinned state" in lb.log()

    def recovered():
        return dest(lb, VIP_B, "192.168.100.5") is None and all(
            dest(lb, VIP_B, a)["health"]["state"] == "up" for a in ("192.168.100.2", "192.168.100.3"))

    t0 = time.monotonic()
    while time.monotonic() - t0 < 8 and not recovered():
        time.sleep(0.2)
    assert recovered(), lb.ipvsadm("-Ln").stdout
    assert {get(lab, VIP_B) for _ in range(4)} == {"rs1", "rs2"}
