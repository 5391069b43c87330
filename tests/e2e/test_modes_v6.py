"""IPv6 on a two-arm lab, one daemon for the module: FullNAT v6 -> v6, NAT64 (v6 VIP -> v4 servers), NAT v6.

    client fd00:10::1 ── veth-lb0  LB  veth-lb1 ── switch ── rs1 192.168.100.2 / fd00:100::2, rs2 .3 / ::3

VIP6 fd00:10::100 balances to the servers' v6 addresses from the v6 local address fd00:100::200; VIP64
fd00:10::101 balances to their v4 addresses from the v4 local address 192.168.100.200; VIP6_NAT
fd00:10::102 masquerades to their v6 addresses (their default route is fd00:100::254, owned by the
balancer). The client only has IPv6 towards the VIPs (curl -6). The balancer runs with the slow path, which answers neighbour
solicitations for its v6 addresses (XDP answers them itself while no slow path runs: the last test kills the daemon).
"""

from __future__ import annotations

import collections
import hashlib
import re

import pytest

from hdslb.lab import modes
from hdslb.lab.servers import start_nginx, start_udp_echo
from hdslb.lab.topology import TwoArm

from .conftest import Balancer

pytestmark = pytest.mark.root

VIP6 = "fd00:10::100"
VIP64 = "fd00:10::101"
VIP6_NAT = "fd00:10::102"
GW6 = "fd00:100::254"  # the servers' v6 default route: an address only the balancer owns (NAT replies)
LADDR6 = "fd00:100::200"
LADDR4 = "192.168.100.200"


@pytest.fixture(scope="module")
def lab6():
    lab = TwoArm(n_servers=2, ipv6=True)
    lab.setup()
    lb = Balancer(lab)
    try:
        servers = start_nginx(lab)
        start_udp_echo(lab)
        lb.ctl("up", "veth-lb0", "veth-lb1", "--xdp-mode", "native", "--slowpath",
               "--pin-root", str(lab.pin_dir.parent), "--log-file", str(lab.workdir / "hdslbd.log"))
        lb.dpip("-6", "addr", "add", f"{VIP6}/64", "dev", "veth-lb0")
        lb.dpip("-6", "addr", "add", f"{VIP64}/128", "dev", "veth-lb0")
        lb.dpip("-6", "addr", "add", f"{VIP6_NAT}/128", "dev", "veth-lb0")
        lb.dpip("-6", "route", "add", "fd00:100::/64", "dev", "veth-lb1")
        lb.dpip("-6", "addr", "add", f"{GW6}/64", "dev", "veth-lb1")
        modes.routes_via_lb(lab, lab.servers, GW6)
        lb.dpip("route", "add", "192.168.100.0/24", "dev", "veth-lb1")
        yield lab, lb, servers
    finally:
        try:
            lb.down()
        finally:
            lab.teardown()


def curl6(lab, url, *opts, timeout=5):
    r = lab.client_run(["taskset", "-c", "0", "curl", "-6", "-s", "-m", str(timeout), *opts, url], check=False,
                       timeout=timeout + 10)
    return r


def diag(lab, lb) -> str:
    parts = [lb.ipvsadm("-Ln", "--stats", check=False).stdout, lb.ipvsadm("-Lnc", check=False).stdout,
             lb.dpip("-6", "neigh", "show", check=False).stdout, lb.dpip("neigh", "show", check=False).stdout,
             modes.nx.sh(["ip", "-n", lab.cl_ns, "-6", "neigh"], check=False).stdout]
    try:
        st = lb.call("stats.get")
        parts.append(" ".join(f"{k}={v}" for k, v in sorted(st["counters"].items()) if v))
        parts.append(" ".join(f"{k}={v}" for k, v in sorted((st.get("slowpath") or {}).get("counters", {}).items()) if v))
    except Exception as e:
        parts.append(f"stats.get: {e}")
    parts.append(lb.log()[-2000:])
    return "\n".join(parts)


def spread_and_source(lab, lb, servers, vip, seen_as, n=10):
    before = {s.name: len(s.access_log_lines()) for s in servers}
    bodies = []
    for _ in range(n):
        r = curl6(lab, f"http://[{vip}]/")
        assert r.returncode == 0 and r.stdout, f"curl -6 exit {r.returncode}\n{diag(lab, lb)}"
        bodies.append(r.stdout.split())
    per = collections.Counter(b[0] for b in bodies)
    assert set(per) == {"rs1", "rs2"} and min(per.values()) >= n // 2 - 1, f"{per}\n{diag(lab, lb)}"  # see test_modes.assert_spread
    assert {b[1] for b in bodies} == {seen_as}
    for s in servers:
        logged = s.access_log_lines()[before[s.name]:]
        assert len(logged) == per[s.name] and {ln.split()[0] for ln in logged} == {seen_as}, logged


def download_big(lab, lb, servers, vip):
    out = lab.workdir / f"big-{vip.replace(':', '_')}"
    r = curl6(lab, f"http://[{vip}]/big", "-o", str(out), timeout=60)
    assert r.returncode == 0, f"curl exit {r.returncode}\n{diag(lab, lb)}"
    body = out.read_bytes()
    assert len(body) == servers[0].big_size and hashlib.sha256(body).hexdigest() == servers[0].big_sha256


def test_fnat_v6_reaches_v6_servers_from_a_v6_local_address(lab6):
    lab, lb, servers = lab6
    lb.ipvsadm("-A", "-t", f"[{VIP6}]:80", "-s", "rr")
    lb.ipvsadm("-A", "-u", f"[{VIP6}]:53", "-s", "rr")
    for s in lab.servers:
        lb.ipvsadm("-a", "-t", f"[{VIP6}]:80", "-r", f"[{s.ip6}]:80", "-b")
        lb.ipvsadm("-a", "-u", f"[{VIP6}]:53", "-r", f"[{s.ip6}]:53", "-b")
    lb.ipvsadm("--add-laddr", "-z", LADDR6, "-t", f"[{VIP6}]:80", "-F", "veth-lb1")
    lb.ipvsadm("--add-laddr", "-z", LADDR6, "-u", f"[{VIP6}]:53", "-F", "veth-lb1")
    spread_and_source(lab, lb, servers, VIP6, LADDR6)
    download_big(lab, lb, servers, VIP6)
    for i in range(4):
        text, frm = modes.udp_ask(lab.cl_ns, VIP6, 53, b"v6-%d" % i)
        assert frm == VIP6 and text.split()[1].startswith(f"[{LADDR6}]:"), (text, frm, diag(lab, lb))
    out = lb.ipvsadm("-Ln").stdout
    assert re.search(r"\[fd00:100::2\]:80\s+FullNat\s+1\s", out), out


def test_nat64_reaches_v4_servers_from_a_v4_local_address(lab6):
    lab, lb, servers = lab6
    lb.ipvsadm("-A", "-t", f"[{VIP64}]:80", "-s", "rr")
    for s in lab.servers:
        lb.ipvsadm("-a", "-t", f"[{VIP64}]:80", "-r", f"{s.ip}:80", "-b")
    lb.ipvsadm("--add-laddr", "-z", LADDR4, "-t", f"[{VIP64}]:80", "-F", "veth-lb1")
    spread_and_source(lab, lb, servers, VIP64, LADDR4)
    download_big(lab, lb, servers, VIP64)
    out = lb.ipvsadm("-Ln").stdout
    assert re.search(rf"TCP\s+\[{VIP64}\]:80 rr", out) and re.search(r"192\.168\.100\.3:80\s+FullNat\s+1\s", out), out


def test_nat_v6_servers_see_the_client_and_reply_through_the_balancer(lab6):
    lab, lb, servers = lab6
    lb.ipvsadm("-A", "-t", f"[{VIP6_NAT}]:80", "-s", "rr")
    for s in lab.servers:
        lb.ipvsadm("-a", "-t", f"[{VIP6_NAT}]:80", "-r", f"[{s.ip6}]:80", "-m")
    spread_and_source(lab, lb, servers, VIP6_NAT, lab.client.ip6)
    st = lb.call("service.list", {"svc": {"proto": "tcp", "addr": VIP6_NAT, "port": 80}})["services"][0]["stats"]
    assert st["outpkts"] > 0, "replies crossed the balancer"
    out = lb.ipvsadm("-Ln").stdout
    assert re.search(r"\[fd00:100::3\]:80\s+Masq\s+1\s", out), out


VIP6_UP = "fd00:10::103"


def test_a_v6_vip_stays_reachable_while_no_daemon_runs(lab6):
    """kill -9 of hdslbd: a client that lost its neighbour entry for an IPv6 VIP solicits it again and XDP
    answers (nd_reply), as it answers ARP for IPv4. It used to pass the solicitation to the kernel, which does not
    hold the VIP: with the slow path dead nobody answered and the VIP was unreachable until the daemon was back."""
    import os
    import subprocess
    import time

    lab, lb, servers = lab6
    lb.dpip("-6", "addr", "add", f"{VIP6_UP}/128", "dev", "veth-lb0")
    lb.ipvsadm("-A", "-t", f"[{VIP6_UP}]:80", "-s", "rr")
    for s in lab.servers:
        lb.ipvsadm("-a", "-t", f"[{VIP6_UP}]:80", "-r", f"[{s.ip6}]:80", "-b")
    lb.ipvsadm("--add-laddr", "-z", LADDR6, "-t", f"[{VIP6_UP}]:80", "-F", "veth-lb1")
    r = curl6(lab, f"http://[{VIP6_UP}]/")
    assert r.returncode == 0 and r.stdout, f"curl -6 exit {r.returncode}\n{diag(lab, lb)}"
    before = lb.call("stats.get")["counters"]["nd_reply"]
    pid = lb.call("daemon.status")["pid"]
    subprocess.run(["kill", "-9", str(pid)], check=True)
    try:
        while os.path.exists(f"/proc/{pid}/task") and len(os.listdir(f"/proc/{pid}/task")) > 1:
            time.sleep(0.05)  # its AF_XDP sockets (the slow path) go with its last thread
        time.sleep(0.2)
        modes.nx.sh(["ip", "-n", lab.cl_ns, "-6", "neigh", "del", VIP6_UP, "dev", "eth0"], check=False)
        r = curl6(lab, f"http://[{VIP6_UP}]/")
        neigh = modes.nx.sh(["ip", "-n", lab.cl_ns, "-6", "neigh"], check=False).stdout
        assert r.returncode == 0 and r.stdout, f"curl -6 exit {r.returncode} with no daemon\n{neigh}"
    finally:
        lb.up("veth-lb0", "veth-lb1")
    assert lb.call("stats.get")["counters"]["nd_reply"] > before, "answered by XDP"


def test_a_v6_vip_behind_a_switch_snooping_mld_is_reachable():
    """A switch that snoops MLD with a querier (a bridge here, multicast_querier on) forwards a solicited-node group
    only to the ports that reported it. The kernel reports the groups of the addresses it holds, not of our VIPs and
    local addresses: the client's solicitation for the VIP never reached the balancer and the VIP was unreachable
    (curl: connection failed, the client's entry FAILED). hdslbd now joins those groups through the kernel, which
    reports them."""
    import time

    from hdslb.lab.servers import start_nginx
    from hdslb.lab.topology import OneArm

    vip, laddr = "fd00:100::100", "fd00:100::200"
    lab = OneArm(n_servers=1, ipv6=True)
    lab.setup()
    lb = Balancer(lab)
    try:
        start_nginx(lab)
        modes.nx.sh(["ip", "-n", lab.sw_ns, "link", "set", lab.bridge, "type", "bridge", "mcast_snooping", "1",
                     "mcast_querier", "1"])
        lb.ctl("up", "veth-lb0", "--xdp-mode", "native", "--pin-root", str(lab.pin_dir.parent),
               "--log-file", str(lab.workdir / "hdslbd.log"))
        lb.dpip("-6", "addr", "add", f"{vip}/64", "dev", "veth-lb0")
        lb.ipvsadm("-A", "-t", f"[{vip}]:80", "-s", "rr")
        lb.ipvsadm("-a", "-t", f"[{vip}]:80", "-r", f"[{lab.servers[0].ip6}]:80", "-b")
        lb.ipvsadm("--add-laddr", "-z", laddr, "-t", f"[{vip}]:80", "-F", "veth-lb0")

        def lb_groups():
            out = modes.nx.sh(["bridge", "-n", lab.sw_ns, "mdb", "show"], check=False).stdout
            return {ln.split(" grp ")[1].split()[0] for ln in out.splitlines() if " port sw-lb0 " in ln}

        want = {"ff02::1:ff00:100", "ff02::1:ff00:200"}  # the VIP's and the local address's groups
        for _ in range(100):  # reported once joined (hdslbd syncs its memberships every second)
            if want <= lb_groups():
                break
            time.sleep(0.1)
        assert want <= lb_groups(), modes.nx.sh(["bridge", "-n", lab.sw_ns, "mdb", "show"], check=False).stdout
        modes.nx.sh(["ip", "-n", lab.cl_ns, "-6", "neigh", "flush", "all"], check=False)
        r = curl6(lab, f"http://[{vip}]/")
        assert r.returncode == 0 and r.stdout.split()[0] == "rs1", f"curl -6 exit {r.returncode}\n{diag(lab, lb)}"
        # an address given up is left
        lb.dpip("-6", "addr", "add", "fd00:100::150/128", "dev", "veth-lb0")
        for _ in range(100):
            if "ff02::1:ff00:150" in lb_groups():
                break
            time.sleep(0.1)
        assert "ff02::1:ff00:150" in lb_groups()
        lb.dpip("-6", "addr", "del", "fd00:100::150/128", "dev", "veth-lb0")
        for _ in range(100):
            if "ff02::1:ff00:150" not in lb_groups():
                break
            time.sleep(0.1)
        assert "ff02::1:ff00:150" not in lb_groups() and want <= lb_groups()
    finally:
        try:
            lb.down()
        finally:
            lab.teardown()
