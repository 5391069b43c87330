"""DR (-g) and TUNNEL (-i) on a one-arm lab, one daemon for the module.

    client 192.168.100.1 ─┐
    LB veth-lb0 ──────────┤ switch    VIPs 192.168.100.100 (DR) and .101 (TUNNEL), owned by the balancer
    rs1 .2, rs2 .3 ───────┘           and held by both servers on lo with arp_ignore=1 / arp_announce=2

Both modes leave the client's packet as it was (client -> VIP): DR changes only the MAC, TUNNEL wraps it in
IPIP from 192.168.100.254 (`dpip route ... src`); the servers (TUNNEL: after `hdslb-ctl decap up eth0`)
answer the client directly from the VIP, so the balancer never sees a reply. Captures on the switch ports
and on the client's interface show what was on each wire.
"""

from __future__ import annotations

import collections
import re
import socket

import pytest

from hdslb.lab import modes
from hdslb.lab.servers import start_nginx, start_udp_echo
from hdslb.lab.topology import OneArm

from .conftest import Balancer

pytestmark = pytest.mark.root

VIP_DR = "192.168.100.100"
VIP_TUN = "192.168.100.101"
TUN_SRC = "192.168.100.254"  # outer source of encapsulated packets
SINK_PORT = 9100


@pytest.fixture(scope="module")
def lab1():
    lab = OneArm(n_servers=2)
    lab.setup()
    lb = Balancer(lab)
    try:
        servers = start_nginx(lab)
        start_udp_echo(lab)
        for s in lab.servers:
            modes.server_vip(lab, s, VIP_DR, VIP_TUN)
        # room for the 20-byte outer header: the client's packets to the TUNNEL VIP stay within 1480 bytes
        modes.route(lab, lab.client, f"{VIP_TUN}/32", dev="eth0", mtu=1500 - modes.TUNNEL_OVERHEAD,
                    advmss=1500 - modes.TUNNEL_OVERHEAD - 40)
        lb.up("veth-lb0")
        for a in (VIP_DR, VIP_TUN, TUN_SRC):
            lb.dpip("addr", "add", f"{a}/32", "dev", "veth-lb0")
        lb.dpip("route", "add", "192.168.100.0/24", "dev", "veth-lb0", "src", TUN_SRC)
        yield lab, lb, servers
    finally:
        try:
            lb.down()
        finally:
            lab.teardown()


@pytest.fixture(scope="module")
def tunnel(lab1):
    lab, lb, servers = lab1
    for s in lab.servers:
        modes.decap_up(lab, s, "eth0")
    return lab1


def curl(lab, url, timeout=5):
    r = lab.client_run(["taskset", "-c", "0", "curl", "-s", "-m", str(timeout), url], check=False,
                       timeout=timeout + 5)
    return r.stdout.split() if r.returncode == 0 else []


def add_services(lb, vip, switch):
    lb.ipvsadm("-A", "-t", f"{vip}:80", "-s", "rr")
    lb.ipvsadm("-A", "-u", f"{vip}:53", "-s", "rr")
    for rs in ("192.168.100.2", "192.168.100.3"):
        lb.ipvsadm("-a", "-t", f"{vip}:80", "-r", rs, switch)  # no port: DR/TUNNEL keep the service's
        lb.ipvsadm("-a", "-u", f"{vip}:53", "-r", rs, switch)


def diag(lab, lb) -> str:
    parts = [lb.ipvsadm("-Ln", "--stats", check=False).stdout, lb.ipvsadm("-Lnc", check=False).stdout]
    try:
        c = lb.call("stats.get")["counters"]
        parts.append(" ".join(f"{k}={v}" for k, v in sorted(c.items()) if v))
    except Exception as e:
        parts.append(f"stats.get: {e}")
    parts.append(lb.log()[-2000:])
    return "\n".join(parts)


def check_direct_service(lab, lb, servers, vip, n=10):
    """n requests spread 50/50; servers saw the client's own address arriving for the VIP; the client got
    its replies from the VIP, sent by the servers' MACs (not the balancer's)."""
    before = {s.name: len(s.access_log_lines()) for s in servers}
    client_cap = modes.Capture(lab, lab.cl_ns, "eth0")
    bodies = [curl(lab, f"http://{vip}/") for _ in range(n)]
    assert all(bodies), f"{sum(not b for b in bodies)} of {n} failed\n{diag(lab, lb)}"
    per = collections.Counter(b[0] for b in bodies)
    assert set(per) == {"rs1", "rs2"} and min(per.values()) >= n // 2 - 1, f"{per}\n{diag(lab, lb)}"  # see test_modes.assert_spread
    assert {b[1] for b in bodies} == {lab.client.ip}
    for s in servers:
        logged = s.access_log_lines()[before[s.name]:]
        assert {(ln.split()[0], ln.split()[2]) for ln in logged} == {(lab.client.ip, f"{vip}:80")}, logged
    replies = [f for f in client_cap.read() if not f.outgoing and f.proto == socket.IPPROTO_TCP and f.sport == 80]
    assert replies and {f.src for f in replies} == {vip}
    assert {f.smac for f in replies} == {s.mac for s in lab.servers}, "replies come straight from the servers"
    client_cap.close()

    for i in range(4):
        text, frm = modes.udp_ask(lab.cl_ns, vip, 53, b"direct%d" % i)
        assert frm == vip and text.split()[1].startswith(lab.client.ip + ":"), (text, frm, diag(lab, lb))
    st = lb.call("service.list", {"svc": {"proto": "udp", "addr": vip, "port": 53}})["services"][0]["stats"]
    assert (st["inpkts"], st["outpkts"]) == (4, 0), f"the balancer saw no reply\n{st}"


def test_dr_rewrites_only_the_mac_and_servers_answer_directly(lab1):
    lab, lb, servers = lab1
    add_services(lb, VIP_DR, "-g")
    wire = {s.role: modes.Capture(lab, lab.sw_ns, f"sw-{s.role}") for s in lab.servers}
    check_direct_service(lab, lb, servers, VIP_DR)
    for s in lab.servers:
        to_rs = [f for f in wire[s.role].read(settle=0) if f.outgoing and f.dst == VIP_DR and f.dport == 80]
        assert to_rs, f"nothing for the VIP reached {s.role}"
        # the client's packet, untouched above L2, from the balancer's MAC to the server's
        assert {(f.smac, f.dmac, f.src) for f in to_rs} == {(lab.lb_mac, s.mac, lab.client.ip)}
        wire[s.role].close()
    out = lb.ipvsadm("-Ln").stdout
    assert re.search(rf"{re.escape('192.168.100.2')}:80\s+Route\s+1\s", out), out


def test_tunnel_encapsulates_to_the_server_which_answers_directly(tunnel):
    lab, lb, servers = tunnel
    add_services(lb, VIP_TUN, "-i")
    wire = {s.role: modes.Capture(lab, lab.sw_ns, f"sw-{s.role}") for s in lab.servers}
    check_direct_service(lab, lb, servers, VIP_TUN)
    for s in lab.servers:
        frames = [f for f in wire[s.role].read(settle=0) if f.outgoing and f.ethertype == modes.ETH_P_IP]
        ipip = [f for f in frames if f.proto == 4]
        assert ipip, f"no IPIP reached {s.role}: {frames[:5]}"
        assert {(f.smac, f.dmac, f.src, f.dst) for f in ipip} == {(lab.lb_mac, s.mac, TUN_SRC, s.ip)}
        assert {(f.inner.src, f.inner.dst) for f in ipip} == {(lab.client.ip, VIP_TUN)}
        assert not [f for f in frames if f.dst == VIP_TUN], "every packet for the VIP was encapsulated"
        wire[s.role].close()
    out = lb.ipvsadm("-Ln").stdout
    assert re.search(rf"{re.escape('192.168.100.3')}:80\s+Tunnel\s+1\s", out), out


SINK = """
import hashlib, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(('0.0.0.0', int(sys.argv[1]))); srv.listen(8)
while True:
    c, _ = srv.accept(); h = hashlib.sha256(); n = 0
    while True:
        b = c.recv(65536)
        if not b: break
        h.update(b); n += len(b)
    c.sendall(b'%d %s' % (n, h.hexdigest().encode())); c.close()
"""

UPLOAD = """
import hashlib, socket, sys
data = bytes(range(251)) * (4 * 2**20 // 251)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s.sendall(data); s.shutdown(socket.SHUT_WR)
print(s.recv(200).decode(), len(data), hashlib.sha256(data).hexdigest())
"""


def test_tunnel_bulk_upload_fits_the_mtu_room(tunnel):
    """Full-sized client segments, encapsulated, still fit a 1500-byte link: 4 MB reach the server intact."""
    lab, lb, servers = tunnel
    sink = lab.spawn(lab.server(1).ns, ["python3", "-c", SINK, str(SINK_PORT)])
    modes.nx.wait_listening(sink, SINK_PORT, what="upload sink on rs1")
    lb.ipvsadm("-A", "-t", f"{VIP_TUN}:{SINK_PORT}", "-s", "rr")
    lb.ipvsadm("-a", "-t", f"{VIP_TUN}:{SINK_PORT}", "-r", "192.168.100.2", "-i")  # the sink runs on rs1 only
    wire = modes.Capture(lab, lab.sw_ns, "sw-rs1", snaplen=64)
    r = lab.client_run(["python3", "-c", UPLOAD, VIP_TUN, str(SINK_PORT)], check=False, timeout=60)
    assert r.returncode == 0, f"{r.stderr[-1500:]}\n{diag(lab, lb)}"
    got_n, got_sha, sent_n, sent_sha = r.stdout.split()
    assert (got_n, got_sha) == (sent_n, sent_sha), "the server received every byte, in order"
    sizes = [f.length for f in wire.read() if f.outgoing and f.proto == 4]
    wire.close()
    assert sizes and max(sizes) <= 1500 and max(sizes) > 1400, (max(sizes or [0]), len(sizes))
