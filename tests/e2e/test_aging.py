"""Connection aging per state and a connection table that fills up: entries leave on time, service goes on.

The small_lb daemon runs with --no-slowpath, so the fallback (ARP answered in XDP, next hops probed over a
packet socket) keeps real traffic in the suite too."""

import contextlib
import time

import pytest

from hdslb.lab.servers import start_nginx, start_udp_echo
from hdslb.lab.topology import OneArm

from .conftest import Balancer
from .test_fnat import curl_loop

VIP = "192.168.100.100"
CONF = """
ipvs_defs {
    tcp {
        timeout {
            established 5
            fin_wait    1
            close       1
        }
    }
    udp {
        timeout {
            normal 2
        }
    }
}
"""


@contextlib.contextmanager
def aging_lab(n_servers, services, *daemon_args, nginx=True, conf_text=CONF):
    """A one-arm lab whose daemon runs with CONF's short timeouts; services: (ipvsadm proto flag, port)."""
    lab = OneArm(n_servers=n_servers)
    lab.setup()
    try:
        if nginx:
            start_nginx(lab)
        start_udp_echo(lab)
        lb = Balancer(lab)
        conf = lab.workdir / "aging.conf"
        conf.write_text(conf_text)
        lb.up_args = ["veth-lb0", "--xdp-mode", "native", "--pin-root", str(lab.pin_dir.parent),
                      "--log-file", str(lab.workdir / "hdslbd.log"), "-f", str(conf), *daemon_args]
        lb.ctl("up", *lb.up_args)
        lb.dpip("addr", "add", f"{VIP}/24", "dev", "veth-lb0")
        for proto, port in services:
            lb.ipvsadm("-A", proto, f"{VIP}:{port}", "-s", "rr")
            for rs in lab.server_ips:
                lb.ipvsadm("-a", proto, f"{VIP}:{port}", "-r", f"{rs}:{port}", "-b")
            lb.ipvsadm("--add-laddr", "-z", "192.168.100.200", proto, f"{VIP}:{port}", "-F", "veth-lb0")
        yield lab, lb
    finally:
        try:
            Balancer(lab).down()
        finally:
            lab.teardown()


@pytest.fixture(scope="module", params=["percpu", "shared"])
def small_lb(request):
    """Both conn table kinds (--conn-table): aging, eviction and listing read either layout."""
    with aging_lab(2, (("-t", 80), ("-u", 53)), "--max-conns", "1000", "--aging-interval", "0.5",
                   "--no-slowpath", "--conn-table", request.param) as lab_lb:
        assert lab_lb[1].call("stats.get")["conn_table"]["kind"] == request.param
        assert f"conn table:     {request.param}, 1000 IPv4 + 256 IPv6 entries" in lab_lb[1].ctl("status").stdout
        yield lab_lb


def conns(lb, proto):
    return [c for c in lb.call("conn.list")["conns"] if c["proto"] == proto and c["daddr"] == VIP]


def udp_flows(lab, n, first_port=20000):
    """n UDP request/response flows, one per source port; returns how many got an answer."""
    script = (
        "import socket\n"
        f"ok = 0\n"
        f"for p in range({first_port}, {first_port + n}):\n"
        "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)\n"
        "    s.bind(('0.0.0.0', p))\n"
        f"    s.sendto(b'x', ('{VIP}', 53))\n"
        "    try:\n"
        "        s.recvfrom(100); ok += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "    s.close()\n"
        "print(ok)\n")
    return int(lab.client_run(["python3", "-c", script], timeout=600).stdout.strip())


@pytest.mark.root
def test_udp_flow_leaves_after_its_timeout(small_lb):
    lab, lb = small_lb
    assert udp_flows(lab, 3, first_port=31000) == 3
    assert len(conns(lb, 17)) == 3
    expired = lb.call("stats.get")["conn_table"]["expired"]
    time.sleep(3.5)  # udp normal 2 s + one sweep
    assert conns(lb, 17) == []
    assert lb.call("stats.get")["conn_table"]["expired"] >= expired + 6  # both directions of three flows


@pytest.mark.root
def test_closed_tcp_connection_leaves_after_close_timeout(small_lb):
    lab, lb = small_lb
    import subprocess

    # one connection held open, idle, then closed by the client
    hold = ("import socket, time\n"
            f"s = socket.create_connection(('{VIP}', 80)); time.sleep(3); s.close(); time.sleep(0.5)\n")
    p = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "python3", "-c", hold])
    lab.procs.append(p)
    time.sleep(1.5)
    live = conns(lb, 6)
    assert [c["state"] for c in live if not c["out"]] == ["established"], live
    before = [c for c in live if not c["out"]][0]
    assert 0 < before["expire_s"] <= 5 and before["idle_s"] + before["expire_s"] == 5, before
    listed = [ln for ln in lb.ipvsadm("-Lnc").stdout.splitlines() if "ESTABLISHED" in ln]
    after = [c for c in conns(lb, 6) if not c["out"]][0]
    shared = lb.call("stats.get")["conn_table"]["kind"] == "shared"
    assert len(listed) == 1 and listed[0].startswith("[-]tcp" if shared else ("[0]tcp", "[1]tcp")), listed
    # ipvsadm's time column is the time left (expire_s, counting down on the idle connection), not the idle time
    shown = int(listed[0].split()[1].rstrip("s"))
    assert after["expire_s"] <= shown <= before["expire_s"], (before, listed, after)
    assert p.wait(timeout=30) == 0
    time.sleep(2.5)  # fin_wait/close 1 s + sweeps
    assert conns(lb, 6) == []
    out = lb.ipvsadm("-Ln").stdout
    dest_lines = [ln for ln in out.splitlines() if ln.strip().startswith("->") and "RemoteAddress" not in ln]
    assert dest_lines and all(ln.split()[-2:] == ["0", "0"] for ln in dest_lines), out


@pytest.mark.root
def test_a_connection_the_server_resets_is_closed_inactive_and_leaves_after_close_timeout(small_lb):
    """A real server aborting a connection (a reset, SO_LINGER 0) ends it as LVS's state table does: ipvsadm
    -Lnc says CLOSE, -Ln counts it inactive, and it leaves after the close timeout (1 s here), not the
    established one (5 s), although the client never sends another packet."""
    lab, lb = small_lb
    import subprocess

    port = 8081
    rst_server = ("import socket, struct\n"
                  "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                  f"s.bind(('0.0.0.0', {port})); s.listen(16)\n"
                  "while True:\n"
                  "    c, _ = s.accept(); c.recv(16)\n"
                  "    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0)); c.close()\n")
    for i in range(1, len(lab.server_ips) + 1):
        lab.spawn(lab.server(i).ns, ["python3", "-c", rst_server])
    lb.ipvsadm("-A", "-t", f"{VIP}:{port}", "-s", "rr")
    try:
        for rs in lab.server_ips:
            lb.ipvsadm("-a", "-t", f"{VIP}:{port}", "-r", f"{rs}:{port}", "-b")
        lb.ipvsadm("--add-laddr", "-z", "192.168.100.200", "-t", f"{VIP}:{port}", "-F", "veth-lb0")
        time.sleep(0.5)  # the servers listen
        client = ("import socket, time\n"
                  f"s = socket.create_connection(('{VIP}', {port}), timeout=5); s.sendall(b'x')\n"
                  "try:\n"
                  "    s.recv(16)\n"
                  "except ConnectionResetError:\n"
                  "    print('reset', flush=True)\n"
                  "time.sleep(4)\n")
        p = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "python3", "-c", client], stdout=subprocess.PIPE,
                             text=True)
        lab.procs.append(p)
        # the reset has crossed the balancer once the client has it (a fixed 0.4 s was too short for a client
        # starting on a loaded machine)
        assert p.stdout.readline().strip() == "reset"
        mine = [c for c in conns(lb, 6) if c["dport"] == port and not c["out"]]
        assert [c["state"] for c in mine] == ["close"], mine
        out = lb.ipvsadm("-Ln").stdout
        lines = out[out.index(f"{VIP}:{port}"):].splitlines()[1:3]
        assert sum(int(ln.split()[-2]) for ln in lines) == 0, out  # ActiveConn
        time.sleep(2.5)  # close 1 s + sweeps, well within established's 5 s
        assert [c for c in conns(lb, 6) if c["dport"] == port] == []
        assert p.wait(timeout=30) == 0
    finally:
        lb.ipvsadm("-D", "-t", f"{VIP}:{port}")


@pytest.mark.root
def test_a_udp_client_on_one_tuple_follows_when_its_server_is_removed(small_lb):
    """A client sending on one UDP source port without pause never lets its flow idle out: when its real server
    is removed the next sweep expires the flow and the following datagrams reach the other server (before, they
    went to the removed one for as long as the client kept sending)."""
    lab, lb = small_lb
    import subprocess

    script = ("import socket, sys, time\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.3); s.bind(('0.0.0.0', 33000))\n"
              "end = time.time() + 6\n"
              "while time.time() < end:\n"
              f"    s.sendto(b'x', ('{VIP}', 53))\n"
              "    try:\n"
              "        print(s.recvfrom(100)[0].decode().split()[0], flush=True)\n"
              "    except OSError:\n"
              "        print('-', flush=True)\n"
              "    time.sleep(0.1)\n")
    p = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "python3", "-c", script], stdout=subprocess.PIPE,
                         text=True)
    lab.procs.append(p)
    first = p.stdout.readline().strip()
    assert first in ("rs1", "rs2"), first
    gone = lab.server_ips[int(first[2:]) - 1]
    lb.ipvsadm("-d", "-u", f"{VIP}:53", "-r", f"{gone}:53")
    try:
        out = p.communicate(timeout=30)[0].split()
        assert out[-15:] == [f"rs{3 - int(first[2:])}"] * 15, out  # the last 1.5 s: the other server only
    finally:
        lb.ipvsadm("-a", "-u", f"{VIP}:53", "-r", f"{gone}:53", "-b")


@pytest.mark.root
def test_full_table_keeps_serving_and_reports_evictions(small_lb):
    lab, lb = small_lb
    # the earlier tests of this daemon made and swept flows (timeouts, resets, a removed server) in a table
    # never full: none of that may read as an eviction
    assert lb.call("stats.get")["conn_table"]["evicted"] == 0
    assert "connection table full" not in lb.log()
    answered = udp_flows(lab, 5000, first_port=40000)
    assert answered == 5000, "every flow is served although the table holds 1000 entries"
    t = lb.call("stats.get")["conn_table"]
    assert (t["size4"], t["size6"], t["size"]) == (1000, 256, 1256) and t["entries"] <= 1000
    assert t["entries4"] == t["entries"] and t["entries6"] == 0, "IPv4 flows fill conn4_map only"
    assert t["evicted"] >= 2 * 5000 - 1000 - t["expired"] - 50, t
    # the operator hears of it: hdslbd's log after the next sweep (every 0.5 s here), and hdslb-ctl status
    deadline = time.monotonic() + 10
    while "connection table full" not in lb.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    (line,) = [x for x in lb.log().splitlines() if "connection table full" in x]
    assert "WARNING" in line and "IPv4 entries" in line and "--max-conns" in line, line
    evicted = int(line.split("its LRU evicted ")[1].split()[0])  # (logged once a minute: maybe mid-flood)
    assert 16 <= evicted <= lb.call("stats.get")["conn_table"]["evicted"], line
    assert "evicted by the full table's LRU" in lb.ctl("status").stdout
    lines = curl_loop(lab, f"http://{VIP}/", 20)
    assert "FAIL" not in lines and len(lines) == 20


@pytest.mark.root
def test_without_the_slow_path_xdp_answers_arp(small_lb):
    lab, lb = small_lb
    c = lb.call("stats.get")["counters"]
    assert c["arp_reply"] > 0 and c["punt_arp"] == 0, "ARP for the VIP answered in XDP, nothing punted"


@pytest.mark.root
def test_kill_9_and_restart_keep_a_flow_in_either_table_also_switching_kinds(small_lb):
    """The pinned table of either kind is adopted by the next daemon; a restart asking for the other kind copies
    the connections into a new table of that kind (it was refused, naming --fresh): the held connection answers
    after a kill -9 and a start of the other kind, then another kill -9 and a start of the first kind again."""
    import subprocess

    lab, lb = small_lb
    kind = lb.call("stats.get")["conn_table"]["kind"]
    hold = ("import socket, time\n"
            f"s = socket.create_connection(('{VIP}', 80)); time.sleep(3)\n"
            "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.recv(100).split(b'\\r\\n')[0].decode())\n")
    p = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "python3", "-c", hold], stdout=subprocess.PIPE, text=True)
    lab.procs.append(p)
    time.sleep(1)
    subprocess.run(["kill", "-9", str(lb.call("daemon.status")["pid"])], check=True)
    other = "shared" if kind == "percpu" else "percpu"
    i = lb.up_args.index("--conn-table")
    lb.ctl("up", *lb.up_args[:i], *lb.up_args[i + 2:], "--conn-table", other)
    assert lb.call("stats.get")["conn_table"]["kind"] == other
    assert f"entries copied into the new {other} tables" in lb.log()
    subprocess.run(["kill", "-9", str(lb.call("daemon.status")["pid"])], check=True)
    lb.ctl("up", *lb.up_args)
    assert lb.call("stats.get")["conn_table"]["kind"] == kind
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0 and out.strip().startswith("HTTP/1.1 200"), out


@pytest.fixture(scope="module")
def one_port_lb():
    """One local port and one real server: every flow needs the same (laddr, lport) and the sweep never runs,
    so only the fast path's reclaiming can free the port."""
    with aging_lab(1, (("-u", 53),), "--lport-range", "20000-20000", "--aging-interval", "3600",
                   nginx=False) as lab_lb:
        yield lab_lb


@pytest.mark.root
def test_expired_flows_port_goes_to_a_new_flow_without_waiting_for_the_sweep(one_port_lb):
    lab, lb = one_port_lb
    assert udp_flows(lab, 1, first_port=32000) == 1
    before = lb.call("stats.get")
    assert udp_flows(lab, 1, first_port=32001) == 0, "the only port is held by a live flow"
    assert lb.call("stats.get")["counters"]["drop_lport_exhausted"] > before["counters"]["drop_lport_exhausted"]
    time.sleep(2.5)  # udp normal 2 s; the sweep (every hour) does not run
    assert [c["sport"] for c in conns(lb, 17)] == [32000], "the first flow is still there: nothing swept it"
    assert udp_flows(lab, 1, first_port=32002) == 1
    after = lb.call("stats.get")
    assert after["counters"]["lport_reclaimed"] == before["counters"]["lport_reclaimed"] + 1
    assert after["conn_table"]["expired"] == before["conn_table"]["expired"] + 2
    time.sleep(1.1)  # conn.list reuses one table scan for a second (CONN_SCAN_CACHE_S)
    assert [c["sport"] for c in conns(lb, 17)] == [32002]


def _to_single_table_layout(pin_dir: str, shared: bool) -> int:
    """Rewrite an instance's pinned conn4_map/conn6_map as the single conn_map of earlier versions (addresses
    first in key and value), as a host upgraded from one would have it. Returns the entries written."""
    import ctypes as ct
    import os

    from bcc.libbcc import lib as L

    from hdslb.fastpath import loader

    lib = loader._libbcc()
    ncpu = 1 if shared else loader.possible_cpus()
    old = []
    for name, (family, ks, vs) in loader.FastPath.CONN_MAPS.items():
        fd = lib.bpf_obj_get(os.path.join(pin_dir, name).encode())
        assert fd >= 0, name
        key, nxt, val = ct.create_string_buffer(ks), ct.create_string_buffer(ks), ct.create_string_buffer(vs * ncpu)
        first = True
        while L.bpf_get_next_key(fd, None if first else key, nxt) == 0:
            first = False
            ct.memmove(key, nxt, ks)
            if L.bpf_lookup_elem(fd, key, val) != 0:
                continue
            k, v = key.raw, val.raw
            if family == 4:
                lk = k[8:12] + bytes(12) + k[12:16] + bytes(12) + k[:8]
                lv = b"".join(c[40:44] + bytes(12) + c[44:48] + bytes(12) + c[:40]
                              for c in (v[i * vs:(i + 1) * vs] for i in range(ncpu)))
            else:
                lk = k[8:40] + k[:8]
                lv = b"".join(c[40:72] + c[:40] for c in (v[i * vs:(i + 1) * vs] for i in range(ncpu)))
            old.append((lk, lv))
        os.close(fd)
    fd = lib.bcc_create_map(loader.BPF_MAP_TYPE_LRU_HASH if shared else loader.BPF_MAP_TYPE_LRU_PERCPU_HASH,
                            b"conn_map", 40, 72, 4096, 0)
    assert fd >= 0
    for lk, lv in old:
        assert L.bpf_update_elem(fd, ct.create_string_buffer(lk, 40), ct.create_string_buffer(lv, len(lv)), 0) == 0
    assert lib.bpf_obj_pin(fd, os.path.join(pin_dir, "conn_map").encode()) == 0
    os.close(fd)
    for name in loader.FastPath.CONN_MAPS:
        os.unlink(os.path.join(pin_dir, name))
    return len(old)


@pytest.fixture(scope="module", params=["percpu", "shared"])
def upgrade_lb(request):
    """Default timeouts (established 90 s): the converted table is a snapshot taken before the restart (the
    old program would have kept it fresh), so its entries must outlive a restart slowed by a busy machine."""
    with aging_lab(2, (("-t", 80),), "--max-conns", "1000", "--no-slowpath", "--conn-table", request.param,
                   conf_text="") as lab_lb:
        yield lab_lb


@pytest.mark.root
def test_an_upgrade_from_the_single_table_layout_keeps_a_held_flow(upgrade_lb):
    """A host upgraded from the version with one conn_map for both families: the restarted daemon attaches,
    moves the old table's connections into conn4_map/conn6_map and unpins it; a connection held across the
    upgrade goes on (its request, sent a header line a second, completes after the restart, when only the
    moved entries can carry it: the converted table is a snapshot, and the old maps it came from are gone)."""
    import os
    import subprocess

    lab, lb = upgrade_lb
    st = lb.call("daemon.status")
    kind = st["conn_table"]["kind"]
    hold = ("import socket, time\n"
            f"s = socket.create_connection(('{VIP}', 80)); s.sendall(b'GET / HTTP/1.0\\r\\n')\n"
            "for i in range(20):\n    time.sleep(1); s.sendall(b'X-Wait: %d\\r\\n' % i)\n"
            "s.sendall(b'\\r\\n'); print(s.recv(100).split(b'\\r\\n')[0].decode())\n")
    p = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "python3", "-c", hold], stdout=subprocess.PIPE, text=True)
    lab.procs.append(p)
    # the held flow in the table before the kill: a second's sleep was not always enough on a loaded machine
    deadline = time.monotonic() + 15
    while not any(c["state"] == "established" for c in conns(lb, "tcp")) and time.monotonic() < deadline:
        time.sleep(0.2)
    t0 = time.monotonic()
    subprocess.run(["kill", "-9", str(st["pid"])], check=True)
    assert _to_single_table_layout(st["pin_dir"], kind == "shared") >= 2, "the held flow's two entries"
    lb.ctl("up", *lb.up_args)
    assert time.monotonic() - t0 < 18, "the request must still be going after the restart"
    assert "from the single-table layout into conn4_map/conn6_map" in lb.log()
    assert not os.path.exists(os.path.join(st["pin_dir"], "conn_map"))
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0 and out.strip().startswith("HTTP/1.1 200"), out
