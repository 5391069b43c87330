"""The AF_XDP slow path (hdslbd --slowpath): ARP and ICMP echo for owned addresses answered from Python, real
servers reached with no static or pre-learned neighbour, the host's own traffic untouched."""

import time

import pytest

from hdslb.lab.servers import start_nginx
from hdslb.lab.topology import OneArm

from .conftest import Balancer
from .test_fnat import LADDR, curl_loop

VIP = "192.168.100.100"
NEIGH_TIMEOUT = 2  # neigh_defs timeout: how long a learned MAC is trusted before it is confirmed again

PING = """
import os, socket, struct, sys, time
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(1)
ok = 0
for seq in range(3):
    body = struct.pack('!BBHHH', 8, 0, 0, 0x4242, seq) + b'hdslb-ping'
    body = body[:2] + struct.pack('!H', csum(body)) + body[4:]
    s.sendto(body, (sys.argv[1], 0))
    try:
        data = s.recv(200)
        ok += data[20] == 0 and struct.unpack('!H', data[24:26])[0] == 0x4242
    except OSError:
        pass
print(ok)
"""


@pytest.fixture(scope="module")
def sp_lab():
    lab = OneArm(n_servers=2)
    lab.setup()
    try:
        servers = start_nginx(lab)
        lb = Balancer(lab)
        conf = lab.workdir / "neigh.conf"
        conf.write_text(f"neigh_defs {{\n    <init> timeout {NEIGH_TIMEOUT}\n}}\n")
        lb.ctl("up", "veth-lb0", "--xdp-mode", "native", "--pin-root", str(lab.pin_dir.parent),
               "--log-file", str(lab.workdir / "hdslbd.log"), "-f", str(conf))
        lb.dpip("addr", "add", f"{VIP}/24", "dev", "veth-lb0")
        lb.ipvsadm("-A", "-t", f"{VIP}:80", "-s", "rr")
        for rs in lab.server_ips:
            lb.ipvsadm("-a", "-t", f"{VIP}:80", "-r", f"{rs}:80", "-b")
        lb.ipvsadm("--add-laddr", "-z", LADDR, "-t", f"{VIP}:80", "-F", "veth-lb0")
        yield lab, lb, servers
    finally:
        try:
            Balancer(lab).down()
        finally:
            lab.teardown()


@pytest.mark.root
def test_quick_start_through_the_slow_path(sp_lab):
    lab, lb, servers = sp_lab
    assert "slow path: 1 AF_XDP sockets on veth-lb0" in lb.log()
    lines = curl_loop(lab, f"http://{VIP}/", 20)
    assert "FAIL" not in lines and {ln.split()[0] for ln in lines} == {"rs1", "rs2"}
    sp = lb.call("stats.get")["slowpath"]
    c = lb.call("stats.get")["counters"]
    assert sp["counters"]["arp_reply"] >= 1, "the client's ARP for the VIP was answered by the slow path"
    assert c["punt_arp"] >= 1 and c["arp_reply"] == 0, "not by the XDP fallback"
    neighs = {n["addr"]: n for n in lb.call("neigh.list")["neighs"]}
    assert all(ip in neighs and neighs[ip]["lladdr"] for ip in lab.server_ips), neighs
    # the fast path's own per-interface and per-CPU counters (the kernel's do not see XDP_TX)
    link = lb.dpip("-s", "link", "show", "veth-lb0").stdout.splitlines()
    rx, tx = int(link[4].split()[0]), int(link[4].split()[1])
    assert rx >= 20 * 5 and tx >= 20 * 5, link
    # DPVS's dump_nic_basic lines, the state from the namespace's own sysfs (what DPVS scripts grep for UP)
    assert link[0].split()[1:3] == ["veth-lb0:", "socket"] and link[1].split()[0] == "UP", link
    cpu = lb.dpip("-s", "link", "show", "cpu").stdout.splitlines()
    assert sum(int(ln.split()[1]) for ln in cpu[1:]) >= rx
    rates = lb.dpip("-s", "link", "show", "veth-lb0", "-i", "0.2", "-c", "2").stdout.splitlines()
    assert rates[:3] == link[:3] and len(rates) == 3 + 2 * 4 and rates[3].split()[0] == "ipackets/pps", rates


@pytest.mark.root
def test_ping_to_the_vip_is_answered(sp_lab):
    lab, lb, _ = sp_lab
    r = lab.client_run(["python3", "-c", PING, VIP], timeout=30)
    assert r.stdout.strip() == "3", r.stdout + r.stderr
    assert lb.call("stats.get")["slowpath"]["counters"]["icmp_echo_reply"] >= 3


@pytest.mark.root
def test_hosts_own_traffic_keeps_working(sp_lab):
    lab, lb, _ = sp_lab
    # the LB host's kernel has its own address on the same interface; its TCP sessions are not ours
    lab.lb_run(["ip", "addr", "add", "192.168.100.250/24", "dev", "veth-lb0"])
    r = lab.lb_run(["curl", "-s", "-m", "5", "http://192.168.100.2/"], check=False)
    assert r.stdout.startswith("rs1 192.168.100.250"), r.stdout + r.stderr


@pytest.mark.root
def test_unknown_next_hop_is_queued_and_resolved(sp_lab):
    lab, lb, _ = sp_lab
    rs2 = lab.server(2)
    lb.ipvsadm("-e", "-t", f"{VIP}:80", "-r", f"{lab.server(1).ip}:80", "-b", "-w", "0")  # new flows: rs2 only
    before = lb.call("stats.get")
    # a static entry, then its deletion: the fast path has no MAC for rs2 until the slow path resolves it
    # again (within a tick), so the next SYN must go through the slow path and still be answered
    lb.dpip("neigh", "add", rs2.ip, "lladdr", rs2.mac, "dev", "veth-lb0")
    lb.dpip("neigh", "del", rs2.ip, "dev", "veth-lb0")
    lines = curl_loop(lab, f"http://{VIP}/", 5)
    after = lb.call("stats.get")
    lb.ipvsadm("-e", "-t", f"{VIP}:80", "-r", f"{lab.server(1).ip}:80", "-b", "-w", "1")
    assert lines == ["rs2 192.168.100.200"] * 5, lines
    assert after["counters"]["punt_no_neigh"] > before["counters"]["punt_no_neigh"], "the SYN was punted"
    sent = ("unres_sent", "nexthop_known")  # queued until ARP answered, or sent at once with a known MAC
    sp0, sp1 = before["slowpath"]["counters"], after["slowpath"]["counters"]
    assert sum(sp1[k] for k in sent) > sum(sp0[k] for k in sent)
    # the punted frames were recognised as waiting for a MAC (zero destination MAC, our source), not dropped
    assert sp1["rx_unresolved"] > sp0["rx_unresolved"] and sp1["unexpected"] == sp0["unexpected"], (sp0, sp1)
    assert rs2.ip in {n["addr"] for n in lb.call("neigh.list")["neighs"] if n["lladdr"]}


@pytest.mark.root
def test_traffic_follows_a_real_server_whose_mac_changed(sp_lab):
    lab, lb, _ = sp_lab
    rs1 = lab.server(1)
    new_mac = "02:42:de:ad:be:01"
    lab.server_run(1, ["ip", "link", "set", "dev", rs1.ifname, "address", new_mac])
    t0 = time.monotonic()
    ok_since = None
    while time.monotonic() - t0 < NEIGH_TIMEOUT + 10:
        lines = curl_loop(lab, f"http://{VIP}/", 2)
        if "FAIL" not in lines:
            ok_since = time.monotonic()
            break
        time.sleep(0.2)
    assert ok_since is not None, "requests to the server with a new MAC never recovered"
    assert ok_since - t0 <= NEIGH_TIMEOUT + 5, f"took {ok_since - t0:.1f} s"
    neighs = {n["addr"]: n["lladdr"] for n in lb.call("neigh.list")["neighs"]}
    assert neighs[rs1.ip] == new_mac


@pytest.mark.root
def test_route_flush_and_re_add_moves_traffic(sp_lab):
    lab, lb, _ = sp_lab
    lb.dpip("route", "flush")
    assert "192.168.100.0/24" not in lb.dpip("route", "show").stdout
    before = lb.call("stats.get")["counters"]["drop_no_route"]
    assert curl_loop(lab, f"http://{VIP}/", 2) == ["FAIL", "FAIL"]
    assert lb.call("stats.get")["counters"]["drop_no_route"] > before
    lb.dpip("route", "add", "192.168.100.0/24", "dev", "veth-lb0")
    lines = curl_loop(lab, f"http://{VIP}/", 4)
    assert "FAIL" not in lines


@pytest.mark.root
def test_renumbering_keeps_the_connected_route(sp_lab):
    """Add a new address on the servers' net, delete the old one that made the net route: the route passes to the
    new address (it was deleted with the old one, and every new flow to the servers was dropped, drop_no_route)."""
    lab, lb, _ = sp_lab
    lb.dpip("route", "flush")  # the net route as the VIP's address makes it (another test may have replaced it)
    lb.dpip("addr", "del", f"{VIP}/24", "dev", "veth-lb0")
    lb.dpip("addr", "add", f"{VIP}/24", "dev", "veth-lb0")
    lb.dpip("addr", "add", "192.168.100.97/24", "dev", "veth-lb0")
    lb.dpip("addr", "del", f"{VIP}/24", "dev", "veth-lb0")
    lb.dpip("addr", "add", f"{VIP}/32", "dev", "veth-lb0")  # the VIP alone, as a host address
    try:
        routes = lb.dpip("route", "show").stdout
        assert "inet 192.168.100.0/24 via 0.0.0.0 src 192.168.100.97 dev veth-lb0" in routes, routes
        assert "FAIL" not in curl_loop(lab, f"http://{VIP}/", 4)
    finally:
        lb.dpip("addr", "del", f"{VIP}/32", "dev", "veth-lb0")
        lb.dpip("addr", "add", f"{VIP}/24", "dev", "veth-lb0")
        lb.dpip("addr", "del", "192.168.100.97/24", "dev", "veth-lb0")
    assert "inet 192.168.100.0/24 via 0.0.0.0 src 192.168.100.100 dev veth-lb0" in lb.dpip("route", "show").stdout


@pytest.mark.root
def test_kni_host_route_gives_an_address_to_the_kernel(sp_lab):
    lab, lb, _ = sp_lab
    assert "FAIL" not in curl_loop(lab, f"http://{VIP}/", 2)
    lb.dpip("route", "add", f"{VIP}/32", "dev", "veth-lb0", "scope", "kni_host")
    before = lb.call("stats.get")["counters"]["pass_kni"]
    assert curl_loop(lab, f"http://{VIP}/", 1) == ["FAIL"]  # the kernel owns nothing there
    assert lb.call("stats.get")["counters"]["pass_kni"] > before
    lb.dpip("route", "del", f"{VIP}/32", "dev", "veth-lb0")
    assert "FAIL" not in curl_loop(lab, f"http://{VIP}/", 2)


PING6 = """
import socket, struct, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6); s.settimeout(2)
ok = 0
for seq in range(3):
    s.sendto(struct.pack('!BBHHH', 128, 0, 0, 0x4243, seq) + b'hdslb-ping6', (sys.argv[1], 0))
    try:
        while True:
            data = s.recv(200)
            if data[0] == 129:
                ok += struct.unpack('!H', data[4:6])[0] == 0x4243
                break
    except OSError:
        pass
print(ok)
"""


@pytest.mark.root
def test_ipv6_neighbour_discovery_and_ping_through_the_slow_path():
    lab = OneArm(n_servers=1, ipv6=True)
    lab.setup()
    try:
        lb = Balancer(lab)
        lb.ctl("up", "veth-lb0", "--xdp-mode", "native", "--pin-root", str(lab.pin_dir.parent),
               "--log-file", str(lab.workdir / "hdslbd.log"))
        addr6 = "fd00:100::100"
        lb.dpip("-6", "addr", "add", f"{addr6}/64", "dev", "veth-lb0")
        r = lab.client_run(["python3", "-c", PING6, addr6], timeout=30)
        assert r.stdout.strip() == "3", r.stdout + r.stderr
        c = lb.call("stats.get")["slowpath"]["counters"]
        assert c["nd_na"] >= 1 and c["icmp_echo_reply"] >= 3, c
        neigh = lab.client_run(["ip", "-6", "neigh", "show", addr6]).stdout
        assert lab.lb_mac in neigh, neigh
    finally:
        try:
            Balancer(lab).down()
        finally:
            lab.teardown()



@pytest.mark.root
def test_a_next_hop_probed_from_the_unspecified_address_resolves():
    """With no address of ours on an interface (a DR VIP is never a probe source), the slow path probes its next
    hops from 0.0.0.0 as RFC 5227 allows, and Linux answers to 0.0.0.0. The fast path handed the slow path only
    ARP addressed to one of our addresses, so that answer never reached it: the server's entry went SEND, NONE
    (failed), SEND... with a broadcast probe a second and the frames queued for it dropped at each failure."""
    lab = OneArm(n_servers=1)
    lab.setup()
    try:
        lb = Balancer(lab)
        lb.ctl("up", "veth-lb0", "--xdp-mode", "native", "--pin-root", str(lab.pin_dir.parent),
               "--log-file", str(lab.workdir / "hdslbd.log"))
        rs = lab.server(1)
        lb.dpip("route", "add", f"{lab.server_net}", "dev", "veth-lb0")
        lb.ipvsadm("-A", "-t", f"{VIP}:80", "-s", "rr")
        lb.ipvsadm("-a", "-t", f"{VIP}:80", "-r", f"{rs.ip}:80", "-g")  # a wanted next hop: resolved ahead
        assert lb.dpip("addr", "show").stdout.strip() == "", "no address of ours: the probe's sender is 0.0.0.0"
        deadline = time.monotonic() + 20  # one probe a second, three before a failure: a bound, not a timing
        entry = {}
        while time.monotonic() < deadline:
            entry = next((n for n in lb.call("neigh.list")["neighs"] if n["addr"] == rs.ip), {})
            if entry.get("state") == "REACHABLE":
                break
            time.sleep(0.2)
        assert entry.get("state") == "REACHABLE" and entry.get("lladdr") == rs.mac, entry
        sp = lb.call("stats.get")["slowpath"]["counters"]
        assert sp["rx_arp_reply"] >= 1, sp
    finally:
        try:
            Balancer(lab).down()
        finally:
            lab.teardown()

# Prints the first ICMP unreachable the raw socket `r` receives: type, code, MTU, outer source, quoted source,
# quoted destination and quoted ports; "none" after 8 s.
PRINT_UNREACH = """try:
    while True:
        d = r.recv(300)
        ihl = (d[0] & 15) * 4; icmp = d[ihl:]
        if icmp[0] == 3:
            q = icmp[8:]; qihl = (q[0] & 15) * 4
            print(icmp[0], icmp[1], struct.unpack('!H', icmp[6:8])[0], socket.inet_ntoa(d[12:16]),
                  socket.inet_ntoa(q[12:16]), socket.inet_ntoa(q[16:20]), *struct.unpack('!HH', q[qihl:qihl + 4]))
            break
except OSError as e:
    print('none', e)
"""

def inbound_flow(lb, **match):
    """The inbound connection entry whose fields have the values given (conn.list reuses a scan for a second, so a
    flow just made may take that long to show), or None after 6 s."""
    for _ in range(30):
        flow = next((c for c in lb.call("conn.list")["conns"]
                     if not c["out"] and all(c[k] == v for k, v in match.items())), None)
        if flow is not None:
            return flow
        time.sleep(0.2)
    return None


CLIENT_ICMP = """
import socket, struct, sys, time
t = socket.create_connection((sys.argv[1], 80)); print(t.getsockname()[1], flush=True)
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); r.settimeout(8)
""" + PRINT_UNREACH

SERVER_ICMP = """
import socket, struct, sys
def csum(b):
    b += b'\\0' * (len(b) % 2); s = sum(struct.unpack('!%dH' % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
lip, rs, lport = sys.argv[1], sys.argv[2], int(sys.argv[3])
inner = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 1500, 1, 0x4000, 63, 6, 0, socket.inet_aton(lip), socket.inet_aton(rs))
inner = inner[:10] + struct.pack('!H', csum(inner)) + inner[12:]
inner += struct.pack('!HHI', lport, 80, 12345)
icmp = struct.pack('!BBHHH', 3, 4, 0, 0, 1400) + inner
icmp = icmp[:2] + struct.pack('!H', csum(icmp)) + icmp[4:]
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).sendto(icmp, (lip, 0))
"""


@pytest.mark.root
def test_icmp_error_about_a_flow_is_translated_for_its_client(sp_lab):
    import subprocess

    lab, lb, _ = sp_lab
    p = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "python3", "-c", CLIENT_ICMP, VIP],
                         stdout=subprocess.PIPE, text=True)
    lab.procs.append(p)
    cport = int(p.stdout.readline())
    flow = next(c for c in lb.call("conn.list")["conns"] if not c["out"] and c["sport"] == cport)
    rs_index = lab.server_ips.index(flow["to_daddr"]) + 1
    lab.server_run(rs_index, ["python3", "-c", SERVER_ICMP, flow["to_saddr"], flow["to_daddr"],
                              str(flow["to_sport"])])
    out, _ = p.communicate(timeout=15)
    # type 3 code 4, MTU 1400, from the VIP, quoting client:cport -> VIP:80 as the client sent it
    assert out.split() == ["3", "4", "1400", VIP, lab.client.ip, VIP, str(cport), "80"], out
    assert lb.call("stats.get")["slowpath"]["counters"]["icmp_error_translated"] >= 1


CLIENT_SIDE_ERROR = """
import socket, struct, sys
def csum(b):
    b += b'\\0' * (len(b) % 2); s = sum(struct.unpack('!%dH' % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
vip, client = sys.argv[1], sys.argv[2]
t = socket.create_connection((vip, 80)); cport = t.getsockname()[1]; print(cport, flush=True)
sys.stdin.readline()
inner = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 1500, 1, 0x4000, 63, 6, 0, socket.inet_aton(vip), socket.inet_aton(client))
inner = inner[:10] + struct.pack('!H', csum(inner)) + inner[12:]
inner += struct.pack('!HHI', 80, cport, 12345)
icmp = struct.pack('!BBHHH', 3, 4, 0, 0, 1400) + inner
icmp = icmp[:2] + struct.pack('!H', csum(icmp)) + icmp[4:]
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).sendto(icmp, (vip, 0))
sys.stdin.readline()
"""

SERVER_LISTEN = """
import socket, struct
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); r.settimeout(8); print('ready', flush=True)
""" + PRINT_UNREACH


@pytest.mark.root
def test_icmp_error_from_the_client_side_is_sent_on_to_the_real_server(sp_lab):
    """A router on the client's path cannot forward the server's full-size reply: its "fragmentation needed" to
    the VIP reaches the real server, from the local address and quoting RS:80 -> LIP:lport as the server sent it,
    so the server's path-MTU discovery works through FullNAT (LVS forwards such errors too)."""
    import subprocess

    lab, lb, _ = sp_lab
    c = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "python3", "-c", CLIENT_SIDE_ERROR, VIP, lab.client.ip],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lab.procs.append(c)
    cport = int(c.stdout.readline())
    flow = inbound_flow(lb, sport=cport)
    rs_index = lab.server_ips.index(flow["to_daddr"]) + 1
    s = subprocess.Popen(["ip", "netns", "exec", lab.server(rs_index).ns, "python3", "-c", SERVER_LISTEN],
                         stdout=subprocess.PIPE, text=True)
    lab.procs.append(s)
    assert s.stdout.readline().strip() == "ready"
    before = lb.call("stats.get")["slowpath"]["counters"]["icmp_error_translated"]
    c.stdin.write("send\n")
    c.stdin.flush()
    out, _ = s.communicate(timeout=15)
    c.stdin.write("done\n")
    c.stdin.flush()
    c.wait(timeout=10)
    assert out.split() == ["3", "4", "1400", LADDR, flow["to_daddr"], LADDR, "80", str(flow["to_sport"])], out
    assert lb.call("stats.get")["slowpath"]["counters"]["icmp_error_translated"] == before + 1
