"""Forwarding modes and scheduling features on a two-arm lab, one daemon for the module.

    client 10.0.0.1 (also the "outside" network for SNAT: nginx + UDP echo as "outside")
      └─ veth-lb0  LB  veth-lb1 ─ switch ─ rs1 192.168.100.2, rs2 192.168.100.3 (inside hosts for SNAT)

The servers' default route is 192.168.100.254, an address only the balancer owns (dpip addr add), so NAT
replies and SNAT traffic must cross the balancer. What is asserted is what the hosts see: the address a
server logged as the client's, the address a client got its reply from, the source an outside server saw.
"""

from __future__ import annotations

import collections
import re
import socket
import subprocess
import time

import pytest

from hdslb.lab import modes
from hdslb.lab.servers import start_nginx, start_udp_echo
from hdslb.lab.topology import TwoArm

from .conftest import Balancer

pytestmark = pytest.mark.root

LB_INSIDE = "192.168.100.254"  # the servers' gateway, owned by the balancer on veth-lb1
SAPOOL = "10.0.0.254"  # SNAT source address on the outside arm
LADDR = "192.168.100.200"  # FNAT local address
VIP_NAT = "10.0.0.100"
VIP_FNAT = "10.0.0.101"  # plain rr, no persistence (spread, weight-0 drain)
VIP_PERSIST = "10.0.0.102"  # rr -p 60
VIP_PERSIST_NET = "10.0.0.103"  # rr -p 60 -M 255.255.255.0
CLIENTS_EXTRA = ("10.0.0.31", "10.0.0.32")  # more client addresses on the client's interface
SNAT_MATCH = "src-range=192.168.100.2-192.168.100.9,oif=veth-lb0"


@pytest.fixture(scope="module")
def lab2():
    lab = TwoArm(n_servers=2)
    lab.setup()
    lb = Balancer(lab)
    try:
        servers = start_nginx(lab)
        start_udp_echo(lab)
        outside = modes.start_outside(lab)
        modes.routes_via_lb(lab, lab.servers, LB_INSIDE)
        lb.up("veth-lb0", "veth-lb1")
        lb.dpip("addr", "add", f"{SAPOOL}/24", "dev", "veth-lb0", "sapool")
        lb.dpip("addr", "add", f"{VIP_NAT}/24", "dev", "veth-lb0")
        for vip in (VIP_FNAT, VIP_PERSIST, VIP_PERSIST_NET):
            lb.dpip("addr", "add", f"{vip}/32", "dev", "veth-lb0")
        lb.dpip("addr", "add", f"{LB_INSIDE}/24", "dev", "veth-lb1")
        yield lab, lb, servers, outside
    finally:
        try:
            lb.down()
        finally:
            lab.teardown()


def curl(lab, ns, url, *opts, timeout=5):
    """One HTTP GET from inside ns: the body's words (nginx answers "<name> <remote_addr>"), [] on failure.

    Pinned to CPU 0: on veth the fast path runs on the sender's CPU and rr cursors are per CPU, so pinned
    requests see one strict rotation.
    """
    r = modes.nx.run(ns, ["taskset", "-c", "0", "curl", "-s", "-m", str(timeout), *opts, url], check=False,
                     timeout=timeout + 5)
    return r.stdout.split() if r.returncode == 0 else []


SLOW_GET = """
import hashlib, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
s.bind(('0.0.0.0', int(sys.argv[2]))); s.connect((sys.argv[1], 80))
s.sendall(b'GET /big HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n')
buf = bytearray()
while True:
    b = s.recv(16384)
    if not b: break
    buf += b; time.sleep(0.01)
body = bytes(buf).split(b'\\r\\n\\r\\n', 1)[1]
print(len(body), hashlib.sha256(body).hexdigest())
"""


def fnat_service(lb, vip, *extra):
    """rr FullNAT service vip:80 over rs1 and rs2 (made once: tests may share it)."""
    if ("tcp", vip, 80) in _have(lb):
        return
    lb.ipvsadm("-A", "-t", f"{vip}:80", "-s", "rr", *extra)
    for rs in ("192.168.100.2", "192.168.100.3"):
        lb.ipvsadm("-a", "-t", f"{vip}:80", "-r", f"{rs}:80", "-b")
    lb.ipvsadm("--add-laddr", "-z", LADDR, "-t", f"{vip}:80", "-F", "veth-lb1")


def assert_spread(names, n, what=""):
    """rr over two servers from one CPU: both used, evenly but for one. (A first SYN sent before the
    balancer has resolved a server's MAC is dropped, drop_no_neigh, and retransmitted a second later: the
    retransmission takes the next rr slot, so one server may get one more.)"""
    per = collections.Counter(names)
    assert set(per) == {"rs1", "rs2"} and min(per.values()) >= n // 2 - 1, f"{per}\n{what}"
    return per


def _have(lb) -> set:
    return {(s["proto"], s["addr"], s["port"]) for s in lb.call("service.list", {"svc": None})["services"]}


def nat_services(lb):
    """Masquerading TCP :80 and UDP :53 on VIP_NAT over rs1 and rs2 (made once)."""
    if ("tcp", VIP_NAT, 80) in _have(lb):
        return
    lb.ipvsadm("-A", "-t", f"{VIP_NAT}:80", "-s", "rr")
    lb.ipvsadm("-A", "-u", f"{VIP_NAT}:53", "-s", "rr")
    for rs in ("192.168.100.2", "192.168.100.3"):
        lb.ipvsadm("-a", "-t", f"{VIP_NAT}:80", "-r", f"{rs}:80", "-m")
        lb.ipvsadm("-a", "-u", f"{VIP_NAT}:53", "-r", f"{rs}:53", "-m")


def snat_services(lb):
    """SNAT for TCP, UDP and ICMP from 192.168.100.2-9 leaving by veth-lb0, from the sapool address (made once)."""
    if lb.ipvsadm("-Ln").stdout.count(f"{SAPOOL}:0") >= 3:
        return
    for proto in ("tcp", "udp", "icmp"):
        lb.ipvsadm("-A", "-s", "rr", "-H", f"proto={proto},{SNAT_MATCH}")
        lb.ipvsadm("-a", "-H", f"proto={proto},{SNAT_MATCH}", "-r", f"{SAPOOL}:0", "-J")


def service(lb, proto, vip, port):
    return lb.call("service.list", {"svc": {"proto": proto, "addr": vip, "port": port}})["services"][0]


def diag(lab, lb) -> str:
    """What to read when a test here fails: the balancer's own view and log tail."""
    parts = []
    for argv in (("-Ln", "--stats"), ("-Lnc",)):
        parts.append(lb.ipvsadm(*argv, check=False).stdout)
    try:
        c = lb.call("stats.get")["counters"]
        parts.append(" ".join(f"{k}={v}" for k, v in sorted(c.items()) if v))
    except Exception as e:  # the daemon may be what failed
        parts.append(f"stats.get: {e}")
    parts.append(lb.log()[-2000:])
    return "\n".join(parts)


def test_nat_servers_see_the_client_and_reply_through_the_balancer(lab2):
    lab, lb, servers, _ = lab2
    nat_services(lb)
    before = {s.name: len(s.access_log_lines()) for s in servers}

    bodies = [curl(lab, lab.cl_ns, f"http://{VIP_NAT}/") for _ in range(10)]
    assert all(bodies), f"{sum(not b for b in bodies)} of 10 requests failed\n{diag(lab, lb)}"
    # Masquerading keeps the client's address: each server logged 10.0.0.1, not a local address.
    per = assert_spread([b[0] for b in bodies], 10, diag(lab, lb))
    assert {b[1] for b in bodies} == {lab.client.ip}
    for s in servers:
        logged = s.access_log_lines()[before[s.name]:]
        assert len(logged) == per[s.name] and {ln.split()[0] for ln in logged} == {lab.client.ip}, logged
        assert {ln.split()[2] for ln in logged} == {f"{s.ip}:80"}  # the balancer rewrote VIP -> RIP

    # UDP: the reply reaches an unconnected client socket from the VIP (the server answered from its own
    # address; the balancer rewrote it on the way back) and names the client's own address and port.
    for i in range(4):
        text, frm = modes.udp_ask(lab.cl_ns, VIP_NAT, 53, b"nat%d" % i)
        assert frm == VIP_NAT and text.split()[1].startswith(lab.client.ip + ":"), (text, frm, diag(lab, lb))
    st = service(lb, "udp", VIP_NAT, 53)["stats"]
    assert (st["inpkts"], st["outpkts"]) == (4, 4), "replies crossed the balancer"
    out = lb.ipvsadm("-Ln").stdout
    assert re.search(r"192\.168\.100\.2:80\s+Masq\s+1\s", out) and re.search(r"192\.168\.100\.3:53\s+Masq\s", out), out


def test_nat_real_servers_icmp_error_reaches_the_client_translated(lab2):
    """A NAT real server's "fragmentation needed" about a packet of a flow (client:cport -> RS:80) is addressed to
    the client and routed back through the balancer, not to an address of ours: the fast path punts it because it
    quotes the flow and the slow path sends it on as the client must see it, from the VIP and quoting
    client:cport -> VIP:80 (LVS: ip_vs_out_icmp), so the client's path-MTU discovery works."""
    from .test_slowpath import CLIENT_ICMP, SERVER_ICMP, inbound_flow

    lab, lb, _, _ = lab2
    nat_services(lb)
    p = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "python3", "-c", CLIENT_ICMP, VIP_NAT],
                         stdout=subprocess.PIPE, text=True)
    lab.procs.append(p)
    cport = int(p.stdout.readline())
    flow = inbound_flow(lb, daddr=VIP_NAT, sport=cport)
    assert flow is not None and flow["to_saddr"] == lab.client.ip, flow
    before = lb.call("stats.get")["slowpath"]["counters"]["icmp_error_translated"]
    rs_index = lab.server_ips.index(flow["to_daddr"]) + 1
    # from the server to the client, quoting client:cport -> RS:80 as the server received it
    lab.server_run(rs_index, ["python3", "-c", SERVER_ICMP, lab.client.ip, flow["to_daddr"], str(cport)])
    out, _ = p.communicate(timeout=15)
    assert out.split() == ["3", "4", "1400", VIP_NAT, lab.client.ip, VIP_NAT, str(cport), "80"], \
        (out, diag(lab, lb))
    assert lb.call("stats.get")["slowpath"]["counters"]["icmp_error_translated"] == before + 1


def forget_neigh(lb, addr, ifname):
    """Make the balancer forget a neighbour it may have learned (from ARP the fast path answered): dpip neigh
    del only knows static entries, so pin one and delete it, which removes the address from the neighbour map."""
    lb.dpip("neigh", "add", addr, "lladdr", "02:00:00:00:00:01", "dev", ifname)
    lb.dpip("neigh", "del", addr, "dev", ifname)


def test_snat_resolves_an_outside_host_it_has_not_heard_from(lab2):
    """The first packet to an outside host whose MAC the balancer never learned must still get there: the
    balancer resolves the next hop (a router would ARP), it cannot wait for the outside host to speak first."""
    lab, lb, _, outside = lab2
    snat_services(lb)
    forget_neigh(lb, lab.client.ip, "veth-lb0")
    cap = modes.Capture(lab, lab.cl_ns, "eth0")
    body = curl(lab, lab.server(1).ns, f"http://{lab.client.ip}/", timeout=5)
    seen = [(f.ethertype, f.src, f.dst, f.proto, f.dport) for f in cap.read() if not f.outgoing]
    cap.close()
    assert body == ["outside", SAPOOL], (body, f"outside host received: {seen}",
                                         lb.dpip("neigh", "show", check=False).stdout, diag(lab, lb))


def test_snat_inside_hosts_reach_the_outside_from_the_sapool_address(lab2):
    lab, lb, _, outside = lab2
    nginx_out, _echo_out = outside
    snat_services(lb)
    # The outside host's MAC, pinned: this test is about translation; resolving an unknown outside next hop
    # is the test above.
    lb.dpip("neigh", "add", lab.client.ip, "lladdr", lab.client.mac, "dev", "veth-lb0")
    before = len(nginx_out.access_log_lines())

    # TCP: both inside hosts fetch from the outside server, which sees only the sapool address.
    for i in (1, 2):
        for _ in range(3):
            body = curl(lab, lab.server(i).ns, f"http://{lab.client.ip}/")
            assert body == ["outside", SAPOOL], (i, body, diag(lab, lb))
    logged = nginx_out.access_log_lines()[before:]
    assert len(logged) == 6 and {ln.split()[0] for ln in logged} == {SAPOOL}, logged

    # UDP: the outside echo names the sapool address; the inside host gets the reply from the outside address.
    for i in (1, 2):
        text, frm = modes.udp_ask(lab.server(i).ns, lab.client.ip, 53, b"snat")
        assert frm == lab.client.ip and text.startswith(f"outside {SAPOOL}:"), (text, frm, diag(lab, lb))

    # ICMP echo: requests arrive outside from the sapool address, replies come back to the inside host.
    cap = modes.Capture(lab, lab.cl_ns, "eth0")
    replies = modes.icmp_echo(lab.server(1).ns, lab.client.ip, count=3)
    assert replies == [(lab.client.ip, 1), (lab.client.ip, 2), (lab.client.ip, 3)], diag(lab, lb)
    reqs = [f for f in cap.read() if not f.outgoing and f.proto == socket.IPPROTO_ICMP and f.icmp_type == 8]
    assert len(reqs) == 3 and {f.src for f in reqs} == {SAPOOL}, reqs
    cap.close()

    # A source outside src-range is not translated (nor forwarded): rs2 with an extra address .60 gets nothing.
    modes.add_addrs(lab, lab.server(2), ["192.168.100.60"])
    assert curl(lab, lab.server(2).ns, f"http://{lab.client.ip}/", "--interface", "192.168.100.60",
                timeout=2) == []
    assert len(nginx_out.access_log_lines()) == before + 6

    out = lb.ipvsadm("-Ln").stdout
    assert re.search(rf"{re.escape(SAPOOL)}:0\s+SNAT\s+1\s", out), out
    assert "192.168.100.2-192.168.100.9" in out, out


INSIDE_ICMP = """
import socket, struct, sys
def csum(b):
    b += b'\\0' * (len(b) % 2); s = sum(struct.unpack('!%dH' % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
outside, me = sys.argv[1], sys.argv[2]
t = socket.create_connection((outside, 80), timeout=5); hport = t.getsockname()[1]
inner = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 1500, 1, 0x4000, 63, 6, 0, socket.inet_aton(outside), socket.inet_aton(me))
inner = inner[:10] + struct.pack('!H', csum(inner)) + inner[12:]
inner += struct.pack('!HHI', 80, hport, 12345)
icmp = struct.pack('!BBHHH', 3, 4, 0, 0, 1400) + inner
icmp = icmp[:2] + struct.pack('!H', csum(icmp)) + icmp[4:]
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).sendto(icmp, (outside, 0))
print(hport)
"""


def test_snat_inside_hosts_icmp_error_reaches_the_outside_from_the_sapool_address(lab2):
    """An inside host's ICMP error about a reply we translated for it (outside:80 -> host:hport) is addressed to
    the outside server and routed through us. It left as it was, from the host's private address and quoting a
    flow the server never had; now the fast path punts it (the quote's reverse is the flow's SNAT entry) and it
    leaves from the sapool address quoting outside:80 -> sapool:port, as netfilter's NAT translates related ICMP."""
    from .test_slowpath import PRINT_UNREACH, inbound_flow

    lab, lb, _, _ = lab2
    snat_services(lb)
    lb.dpip("neigh", "add", lab.client.ip, "lladdr", lab.client.mac, "dev", "veth-lb0")
    listen = ("import socket, struct\nr = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n"
              "r.settimeout(8)\nprint('ready', flush=True)\n" + PRINT_UNREACH)
    p = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "python3", "-c", listen], stdout=subprocess.PIPE,
                         text=True)
    lab.procs.append(p)
    assert p.stdout.readline().strip() == "ready"
    before = lb.call("stats.get")["slowpath"]["counters"]["icmp_error_translated"]
    me = lab.server(1).ip
    hport = int(lab.server_run(1, ["python3", "-c", INSIDE_ICMP, lab.client.ip, me]).stdout)
    flow = inbound_flow(lb, saddr=me, sport=hport)
    assert flow is not None and flow["to_saddr"] == SAPOOL, flow
    out, _ = p.communicate(timeout=15)
    assert out.split() == ["3", "4", "1400", SAPOOL, lab.client.ip, SAPOOL, "80", str(flow["to_sport"])], \
        (out, diag(lab, lb))
    assert lb.call("stats.get")["slowpath"]["counters"]["icmp_error_translated"] == before + 1


def test_weight_zero_drains_a_server_while_its_live_connection_finishes(lab2):
    lab, lb, servers, _ = lab2
    fnat_service(lb, VIP_FNAT)
    assert {curl(lab, lab.cl_ns, f"http://{VIP_FNAT}/")[0] for _ in range(4)} == {"rs1", "rs2"}
    # A paced reader with a small receive buffer keeps the server sending for several seconds (curl's
    # --limit-rate lets socket buffers swallow the whole file, after which the flow is only closing).
    cport = 45123
    dl = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "python3", "-c", SLOW_GET, VIP_FNAT, str(cport)],
                          stdout=subprocess.PIPE, text=True)
    lab.procs.append(dl)
    deadline = time.monotonic() + 5
    flow = None
    while flow is None and time.monotonic() < deadline:
        flow = next((c for c in lb.call("conn.list")["conns"]
                     if not c["out"] and c["daddr"] == VIP_FNAT and c["sport"] == cport), None)
        time.sleep(0.1)
    assert flow, f"the download's connection is not in the table\n{diag(lab, lb)}"
    busy = flow["to_daddr"]
    other = next(s for s in servers if s.ip != busy)
    lb.ipvsadm("-e", "-t", f"{VIP_FNAT}:80", "-r", f"{busy}:80", "-b", "-w", "0")
    # ActiveConn comes from connection states the daemon samples (stats interval, 2 s): allow it to catch up
    deadline = time.monotonic() + 5
    while True:
        listing = lb.ipvsadm("-Ln").stdout
        if re.search(rf"{re.escape(busy)}:80\s+FullNat\s+0\s+1\s", listing) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert re.search(rf"{re.escape(busy)}:80\s+FullNat\s+0\s+1\s", listing), \
        f"drained server shows weight 0 and its one active connection\n{listing}\n{flow}\n{diag(lab, lb)}"
    # New connections avoid the drained server while the old one is still moving bytes.
    names = [curl(lab, lab.cl_ns, f"http://{VIP_FNAT}/")[0] for _ in range(8)]
    assert dl.poll() is None, "the download finished before the drain was exercised"
    assert set(names) == {other.name}, names
    out, _ = dl.communicate(timeout=90)
    assert dl.returncode == 0 and out.split() == [str(servers[0].big_size), servers[0].big_sha256], out
    lb.ipvsadm("-e", "-t", f"{VIP_FNAT}:80", "-r", f"{busy}:80", "-b", "-w", "1")
    assert {curl(lab, lab.cl_ns, f"http://{VIP_FNAT}/")[0] for _ in range(4)} == {"rs1", "rs2"}


def test_persistence_keeps_one_client_on_one_server(lab2):
    lab, lb, servers, _ = lab2
    fnat_service(lb, VIP_PERSIST, "-p", "60")
    fnat_service(lb, VIP_FNAT)
    sticky = [curl(lab, lab.cl_ns, f"http://{VIP_PERSIST}/") for _ in range(20)]
    assert all(sticky), diag(lab, lb)
    assert len({b[0] for b in sticky}) == 1, collections.Counter(b[0] for b in sticky)
    # the same client on a service without -p is spread
    assert_spread([curl(lab, lab.cl_ns, f"http://{VIP_FNAT}/")[0] for _ in range(20)], 20)
    assert re.search(rf"TCP\s+{re.escape(VIP_PERSIST)}:80 rr persistent 60", lb.ipvsadm("-Ln").stdout)


def test_persistence_is_per_client_network(lab2):
    """Templates are per client address (default mask) or per client network (-M): a second client with its
    own template takes rr's next server; with -M 255.255.255.0 both share one template and one server."""
    lab, lb, servers, _ = lab2
    a, b = CLIENTS_EXTRA
    have = {x.split("/")[0] for x in modes.nx.addrs(lab.cl_ns, "eth0")}
    modes.add_addrs(lab, lab.client, [x for x in CLIENTS_EXTRA if x not in have])
    fnat_service(lb, VIP_PERSIST, "-p", "60")
    fnat_service(lb, VIP_PERSIST_NET, "-p", "60", "-M", "255.255.255.0")

    def ask(vip, src):
        got = curl(lab, lab.cl_ns, f"http://{vip}/", "--interface", src)
        assert got, f"{src} -> {vip} failed\n{diag(lab, lb)}"
        return got[0]

    per_addr = {src: {ask(VIP_PERSIST, src) for _ in range(5)} for src in (a, b)}
    assert all(len(v) == 1 for v in per_addr.values()), per_addr
    assert per_addr[a] != per_addr[b], f"two clients, two templates, rr gave them different servers: {per_addr}"
    per_net = [ask(VIP_PERSIST_NET, src) for src in (a, b) * 5]
    assert len(set(per_net)) == 1, collections.Counter(per_net)
    assert re.search(rf"TCP\s+{re.escape(VIP_PERSIST_NET)}:80 rr persistent 60 mask 255.255.255.0",
                     lb.ipvsadm("-Ln").stdout)


def test_listing_names_every_forwarding_method(lab2):
    lab, lb, _, _ = lab2
    nat_services(lb)
    snat_services(lb)
    fnat_service(lb, VIP_FNAT)
    out = lb.ipvsadm("-Ln").stdout
    for name in ("FullNat", "Masq", "SNAT"):
        assert re.search(rf"->\s+\S+\s+{name}\s+\d+\s", out), (name, out)
