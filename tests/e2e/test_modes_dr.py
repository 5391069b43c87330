"""DR (-g) and TUNNEL (-i) on a one-arm lab, IPv4 and IPv6 (one lab and one daemon per family).

    client 192.168.100.1 / fd00:100::1 ─┐
    LB veth-lb0 ────────────────────────┤ switch     VIPs .100 / ::100 (DR) and .101 / ::101 (TUNNEL),
    rs1 .2 / ::2,  rs2 .3 / ::3 ────────┘            owned by the balancer, held by both servers on lo

Both modes leave the client's packet as it was (client -> VIP): DR changes only the MACs, TUNNEL wraps it in
IPIP (v4) or IPv6-in-IPv6 from the route's source (`dpip route ... src`); the servers (TUNNEL: after
`hdslb-ctl decap up eth0`) answer the client directly from the VIP, so the balancer never sees a reply.
Servers hold v4 VIPs with arp_ignore=1/arp_announce=2; a v6 address on lo is never advertised on eth0
(Linux answers a neighbour solicitation only for addresses on the interface asked). The v6 daemon runs
with the slow path, which answers neighbour solicitations for the VIPs. Captures on the switch ports and
on the client's interface show what was on each wire.
"""

from __future__ import annotations

import collections
import re
import socket
from dataclasses import dataclass

import pytest

from hdslb.lab import modes
from hdslb.lab.servers import start_nginx, start_udp_echo
from hdslb.lab.topology import OneArm

from .conftest import Balancer

pytestmark = pytest.mark.root

SINK_PORT = 9100


@dataclass(frozen=True)
class Fam:
    v: int
    vip_dr: str
    vip_tun: str
    tun_src: str  # outer source of encapsulated packets
    net: str
    overhead: int  # bytes the outer header adds
    outer_proto: int  # outer IP protocol / next header of a tunnel packet
    tcp_header: int  # IP + TCP header bytes below the MSS

    @property
    def dpip(self) -> list[str]:
        return ["-6"] if self.v == 6 else []

    def addr(self, host) -> str:
        return host.ip6 if self.v == 6 else host.ip

    def host_port(self, addr) -> str:
        return f"[{addr}]" if self.v == 6 else addr

    def url(self, vip, path="/") -> str:
        return f"http://{self.host_port(vip)}{path}"


V4 = Fam(4, "192.168.100.100", "192.168.100.101", "192.168.100.254", "192.168.100.0/24", 20, 4, 40)
V6 = Fam(6, "fd00:100::100", "fd00:100::101", "fd00:100::254", "fd00:100::/64", 40, 41, 60)


@pytest.fixture(scope="module", params=[V4, V6], ids=["v4", "v6"])
def lab1(request):
    fam = request.param
    lab = OneArm(n_servers=2, ipv6=fam.v == 6)
    lab.setup()
    lb = Balancer(lab)
    try:
        servers = start_nginx(lab)
        start_udp_echo(lab)
        for s in lab.servers:
            modes.server_vip(lab, s, fam.vip_dr, fam.vip_tun)
        # room for the outer header: the client's packets to the TUNNEL VIP leave that many bytes free
        mtu = 1500 - fam.overhead
        modes.route(lab, lab.client, f"{fam.vip_tun}/{128 if fam.v == 6 else 32}", dev="eth0", mtu=mtu,
                    advmss=mtu - fam.tcp_header)
        lb.ctl("up", "veth-lb0", "--xdp-mode", "native", "--pin-root", str(lab.pin_dir.parent),
               "--log-file", str(lab.workdir / "hdslbd.log"), *(["--slowpath"] if fam.v == 6 else []))
        for a in (fam.vip_dr, fam.vip_tun, fam.tun_src):
            lb.dpip(*fam.dpip, "addr", "add", f"{a}/{128 if fam.v == 6 else 32}", "dev", "veth-lb0")
        lb.dpip(*fam.dpip, "route", "add", fam.net, "dev", "veth-lb0", "src", fam.tun_src)
        yield fam, lab, lb, servers
    finally:
        try:
            lb.down()
        finally:
            lab.teardown()


@pytest.fixture(scope="module")
def tunnel(lab1):
    _fam, lab, _lb, _servers = lab1
    for s in lab.servers:
        modes.decap_up(lab, s, "eth0")
    return lab1


def curl(lab, url, timeout=5):
    r = lab.client_run(["taskset", "-c", "0", "curl", "-s", "-m", str(timeout), url], check=False,
                       timeout=timeout + 5)
    return r.stdout.split() if r.returncode == 0 else []


def add_services(fam, lab, lb, vip, switch):
    svc = fam.host_port(vip)
    lb.ipvsadm("-A", "-t", f"{svc}:80", "-s", "rr")
    lb.ipvsadm("-A", "-u", f"{svc}:53", "-s", "rr")
    for s in lab.servers:
        rs = fam.addr(s)
        lb.ipvsadm("-a", "-t", f"{svc}:80", "-r", rs, switch)  # no port: DR/TUNNEL keep the service's
        lb.ipvsadm("-a", "-u", f"{svc}:53", "-r", rs, switch)


def diag(lab, lb) -> str:
    parts = [lb.ipvsadm("-Ln", "--stats", check=False).stdout, lb.ipvsadm("-Lnc", check=False).stdout,
             lb.dpip("neigh", "show", check=False).stdout, lb.dpip("-6", "neigh", "show", check=False).stdout]
    try:
        st = lb.call("stats.get")
        parts.append(" ".join(f"{k}={v}" for k, v in sorted(st["counters"].items()) if v))
        slow = (st.get("slowpath") or {}).get("counters", {})
        parts.append(" ".join(f"slowpath.{k}={v}" for k, v in sorted(slow.items()) if v))
    except Exception as e:
        parts.append(f"stats.get: {e}")
    parts.append(lb.log()[-2000:])
    return "\n".join(parts)


def check_direct_service(fam, lab, lb, servers, vip, n=10):
    """n requests spread over both servers; servers saw the client's own address arriving for the VIP; the
    client got its replies from the VIP, sent by the servers' MACs (not the balancer's)."""
    client = fam.addr(lab.client)
    before = {s.name: len(s.access_log_lines()) for s in servers}
    client_cap = modes.Capture(lab, lab.cl_ns, "eth0")
    bodies = [curl(lab, fam.url(vip)) for _ in range(n)]
    assert all(bodies), f"{sum(not b for b in bodies)} of {n} failed\n{diag(lab, lb)}"
    per = collections.Counter(b[0] for b in bodies)
    assert set(per) == {"rs1", "rs2"} and min(per.values()) >= n // 2 - 1, f"{per}\n{diag(lab, lb)}"  # see test_modes.assert_spread
    assert {b[1] for b in bodies} == {client}
    for s in servers:
        logged = s.access_log_lines()[before[s.name]:]
        assert {(ln.split()[0], ln.split()[2]) for ln in logged} == {(client, f"{vip}:80")}, logged
    replies = [f for f in client_cap.read() if not f.outgoing and f.proto == socket.IPPROTO_TCP and f.sport == 80]
    assert replies and {f.src for f in replies} == {vip}
    assert {f.smac for f in replies} == {s.mac for s in lab.servers}, "replies come straight from the servers"
    client_cap.close()

    for i in range(4):
        text, frm = modes.udp_ask(lab.cl_ns, vip, 53, b"direct%d" % i)
        assert frm == vip and text.split()[1].startswith(fam.host_port(client) + ":"), (text, frm, diag(lab, lb))
    st = lb.call("service.list", {"svc": {"proto": "udp", "addr": vip, "port": 53}})["services"][0]["stats"]
    assert (st["inpkts"], st["outpkts"]) == (4, 0), f"the balancer saw no reply\n{st}"


def test_dr_rewrites_only_the_mac_and_servers_answer_directly(lab1):
    fam, lab, lb, servers = lab1
    add_services(fam, lab, lb, fam.vip_dr, "-g")
    wire = {s.role: modes.Capture(lab, lab.sw_ns, f"sw-{s.role}") for s in lab.servers}
    check_direct_service(fam, lab, lb, servers, fam.vip_dr)
    for s in lab.servers:
        to_rs = [f for f in wire[s.role].read(settle=0) if f.outgoing and f.dst == fam.vip_dr and f.dport == 80]
        assert to_rs, f"nothing for the VIP reached {s.role}"
        # the client's packet, untouched above L2, from the balancer's MAC to the server's
        assert {(f.smac, f.dmac, f.src) for f in to_rs} == {(lab.lb_mac, s.mac, fam.addr(lab.client))}
        wire[s.role].close()
    out = lb.ipvsadm("-Ln").stdout
    rs1 = re.escape(fam.host_port(fam.addr(lab.server(1))))
    assert re.search(rf"{rs1}:80\s+Route\s+1\s", out), out


def test_tunnel_encapsulates_to_the_server_which_answers_directly(tunnel):
    fam, lab, lb, servers = tunnel
    add_services(fam, lab, lb, fam.vip_tun, "-i")
    wire = {s.role: modes.Capture(lab, lab.sw_ns, f"sw-{s.role}") for s in lab.servers}
    check_direct_service(fam, lab, lb, servers, fam.vip_tun)
    for s in lab.servers:
        frames = [f for f in wire[s.role].read(settle=0) if f.outgoing and f.src]
        tun = [f for f in frames if f.proto == fam.outer_proto]
        assert tun, f"no tunnel packet reached {s.role}: {frames[:5]}"
        assert {(f.smac, f.dmac, f.src, f.dst) for f in tun} == {(lab.lb_mac, s.mac, fam.tun_src, fam.addr(s))}
        assert {(f.inner.src, f.inner.dst) for f in tun} == {(fam.addr(lab.client), fam.vip_tun)}
        assert not [f for f in frames if f.dst == fam.vip_tun], "every packet for the VIP was encapsulated"
        wire[s.role].close()
    out = lb.ipvsadm("-Ln").stdout
    rs2 = re.escape(fam.host_port(fam.addr(lab.server(2))))
    assert re.search(rf"{rs2}:80\s+Tunnel\s+1\s", out), out


SINK = """
import hashlib, socket, sys
srv = socket.socket(socket.AF_INET6); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # v4 and v6 on one socket
srv.bind(('::', int(sys.argv[1]))); srv.listen(8)
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
    fam, lab, lb, servers = tunnel
    sink = lab.spawn(lab.server(1).ns, ["python3", "-c", SINK, str(SINK_PORT)])
    modes.nx.wait_listening(sink, SINK_PORT, what="upload sink on rs1")
    svc = f"{fam.host_port(fam.vip_tun)}:{SINK_PORT}"
    lb.ipvsadm("-A", "-t", svc, "-s", "rr")
    lb.ipvsadm("-a", "-t", svc, "-r", fam.addr(lab.server(1)), "-i")  # the sink runs on rs1 only
    wire = modes.Capture(lab, lab.sw_ns, "sw-rs1", snaplen=64)
    r = lab.client_run(["python3", "-c", UPLOAD, fam.vip_tun, str(SINK_PORT)], check=False, timeout=60)
    assert r.returncode == 0, f"{r.stderr[-1500:]}\n{diag(lab, lb)}"
    got_n, got_sha, sent_n, sent_sha = r.stdout.split()
    assert (got_n, got_sha) == (sent_n, sent_sha), "the server received every byte, in order"
    sizes = [f.length for f in wire.read() if f.outgoing and f.proto == fam.outer_proto]
    wire.close()
    assert sizes and max(sizes) <= 1500 and max(sizes) > 1400, (max(sizes or [0]), len(sizes))


def test_tunnel_path_mtu_discovery_when_the_client_does_not_leave_room(tunnel):
    """No MTU room on the client's route: its full-sized segments do not fit once encapsulated. The balancer
    answers with ICMP fragmentation needed (v4, DF) or ICMPv6 Packet Too Big (v6), the client's kernel learns
    the path MTU and resends smaller, and 4 MB still arrive intact (without the error the upload would stall)."""
    fam, lab, lb, servers = tunnel
    port = SINK_PORT + 1
    sink = lab.spawn(lab.server(1).ns, ["python3", "-c", SINK, str(port)])
    modes.nx.wait_listening(sink, port, what="upload sink on rs1")
    svc = f"{fam.host_port(fam.vip_tun)}:{port}"
    lb.ipvsadm("-A", "-t", svc, "-s", "rr")
    lb.ipvsadm("-a", "-t", svc, "-r", fam.addr(lab.server(1)), "-i")
    plen = 128 if fam.v == 6 else 32
    modes.route(lab, lab.client, f"{fam.vip_tun}/{plen}", dev="eth0")  # no mtu, no advmss: full 1500 bytes
    flush = ["ip", "-n", lab.cl_ns] + (["-6"] if fam.v == 6 else []) + ["route", "flush", "cache"]
    modes.nx.sh(flush)  # forget a path MTU learned by an earlier test
    before = lb.call("stats.get")["counters"]["icmp_too_big"]
    try:
        r = lab.client_run(["python3", "-c", UPLOAD, fam.vip_tun, str(port)], check=False, timeout=60)
        assert r.returncode == 0, f"{r.stderr[-1500:]}\n{diag(lab, lb)}"
        got_n, got_sha, sent_n, sent_sha = r.stdout.split()
        assert (got_n, got_sha) == (sent_n, sent_sha), "the server received every byte, in order"
        assert lb.call("stats.get")["counters"]["icmp_too_big"] > before
    finally:
        mtu = 1500 - fam.overhead
        modes.route(lab, lab.client, f"{fam.vip_tun}/{plen}", dev="eth0", mtu=mtu, advmss=mtu - fam.tcp_header)
        modes.nx.sh(flush)
