"""The DPVS quick start with interface names, one-arm and two-arm, against real nginx and UDP servers."""

import collections
import hashlib
import re
import subprocess
import threading
import time

import pytest


LADDR = "192.168.100.200"
REQUESTS = 200


def curl_loop(lab, url, n):
    """n sequential HTTP requests from the client namespace; returns the response bodies (one per line)."""
    script = f'for i in $(seq {n}); do curl -s -m 5 {url} || echo FAIL; done'
    r = lab.client_run(["bash", "-c", script], check=False, timeout=300)
    return r.stdout.splitlines()


def pinned_lport_cursor(pin_dir: str) -> list[int]:
    """Each CPU's local-port cursor, read from the daemon's pinned lport_cursor map (a per-CPU u32 array)."""
    import ctypes as ct

    from bcc.libbcc import lib

    from hdslb.fastpath.loader import possible_cpus

    fd = lib.bpf_obj_get(f"{pin_dir}/lport_cursor".encode())
    assert fd >= 0, "lport_cursor is pinned"
    try:
        n = possible_cpus()
        vals, key = (ct.c_uint64 * n)(), ct.c_uint32(0)  # per-CPU values are 8-byte slots
        assert lib.bpf_lookup_elem(fd, ct.byref(key), ct.byref(vals)) == 0
        return [v & 0xFFFFFFFF for v in vals]
    finally:
        import os
        os.close(fd)


def quick_start(lb, lab, vip, ifname_client, ifname_server, two_arm):
    lb.up(*([ifname_client, ifname_server] if two_arm else [ifname_client]))
    prefix = "10.0.0.100/24" if two_arm else "192.168.100.100/24"
    lb.dpip("addr", "add", prefix, "dev", ifname_client)
    if two_arm:
        lb.dpip("route", "add", "192.168.100.0/24", "dev", ifname_server)
    lb.ipvsadm("-A", "-t", f"{vip}:80", "-s", "rr")
    for rs in lab.server_ips:
        lb.ipvsadm("-a", "-t", f"{vip}:80", "-r", f"{rs}:80", "-b")
    lb.ipvsadm("--add-laddr", "-z", LADDR, "-t", f"{vip}:80", "-F", ifname_server)
    lb.ipvsadm("-A", "-u", f"{vip}:53", "-s", "rr")
    for rs in lab.server_ips:
        lb.ipvsadm("-a", "-u", f"{vip}:53", "-r", f"{rs}:53", "-b")
    lb.ipvsadm("--add-laddr", "-z", LADDR, "-u", f"{vip}:53", "-F", ifname_server)


def check_http_spread(lab, lb, servers, vip):
    before = {s.name: len(s.access_log_remote_addrs()) for s in servers}
    lines = curl_loop(lab, f"http://{vip}/", REQUESTS)
    assert len(lines) == REQUESTS and "FAIL" not in lines, f"{lines.count('FAIL')} failed\n{lb.log()[-3000:]}"
    per = collections.Counter(line.split()[0] for line in lines)
    assert set(per) == {s.name for s in servers}
    for name, n in per.items():
        assert abs(n - REQUESTS / 2) <= 10, per
    # the body is "<server> <remote_addr>": every server saw the local address as the source
    assert {line.split()[1] for line in lines} == {LADDR}
    for s in servers:
        seen = s.access_log_remote_addrs()[before[s.name]:]
        assert seen and set(seen) == {LADDR}, (s.name, set(seen))
    return per


def check_udp(lab, vip, n=20):
    script = (
        "import socket\n"
        f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
        f"for i in range({n}):\n"
        f"    s.sendto(b'ping%03d' % i, ('{vip}', 53)); print(s.recvfrom(200)[0].decode())\n")
    r = lab.client_run(["python3", "-c", script], check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    replies = r.stdout.splitlines()
    assert len(replies) == n
    assert all(line.split()[1].startswith(LADDR + ":") for line in replies), replies[:3]
    return replies


def svc_stats(lb, proto, vip, port):
    data = lb.call("service.list", {"svc": {"proto": proto, "addr": vip, "port": port}})
    return data["services"][0]


@pytest.fixture(scope="module")
def one_arm_up(one_arm):
    lab, lb, servers, echo = one_arm
    quick_start(lb, lab, "192.168.100.100", "veth-lb0", "veth-lb0", two_arm=False)
    return one_arm


@pytest.mark.root
def test_one_arm_quick_start(one_arm_up):
    lab, lb, servers, _ = one_arm_up
    vip = "192.168.100.100"
    per = check_http_spread(lab, lb, servers, vip)

    # ipvsadm -Ln --stats: connections counted exactly, per real server as the servers saw them
    svc = svc_stats(lb, "tcp", vip, 80)
    assert svc["stats"]["conns"] == REQUESTS
    by_rs = {d["addr"]: d["stats"]["conns"] for d in svc["dests"]}
    names = {s.name: s.ip for s in servers}
    assert by_rs == {names[n]: c for n, c in per.items()}
    out = lb.ipvsadm("-Ln", "--stats").stdout
    assert re.search(rf"TCP\s+{re.escape(vip)}:80\s+{REQUESTS}\s", out), out

    # UDP through a UDP VIP; packet and byte counters match what was sent
    replies = check_udp(lab, vip, n=20)
    assert len(replies) == 20
    u = svc_stats(lb, "udp", vip, 53)["stats"]
    assert (u["inpkts"], u["outpkts"]) == (20, 20)
    assert u["inbytes"] == 20 * (20 + 8 + 7)

    listing = lb.ipvsadm("-Ln").stdout
    assert "FullNat" in listing and f"TCP  {vip}:80 rr" in listing
    assert LADDR in lb.ipvsadm("-G").stdout
    assert "192.168.100.0/24" in lb.dpip("route", "show").stdout


@pytest.mark.root
def test_two_arm_quick_start(two_arm):
    lab, lb, servers, _ = two_arm
    vip = "10.0.0.100"
    quick_start(lb, lab, vip, "veth-lb0", "veth-lb1", two_arm=True)
    # a fresh start seeds every CPU's local-port cursor at random (not where the last daemon began)
    seeds = pinned_lport_cursor(lb.call("daemon.status")["pin_dir"])
    assert len(seeds) >= 1 and all(seeds), seeds
    check_http_spread(lab, lb, servers, vip)
    check_udp(lab, vip)
    c = lb.call("stats.get")["counters"]
    assert c["verdict_redirect"] > 0, "two-arm traffic crosses interfaces by redirect"


@pytest.mark.root
def test_transfer_survives_client_moving_between_cpus(one_arm_up):
    """A download whose client is moved between CPUs mid-transfer: every byte arrives (conn adoption)."""
    lab, lb, servers, _ = one_arm_up
    before = lb.call("stats.get")["counters"]["conn_adopt"]
    # A small receive buffer and paced reads keep packets flowing for the whole transfer (curl's rate limit
    # lets socket buffers swallow the file in a second, after which moving the client moves no packets).
    client = (
        "import hashlib, socket, sys, time\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)\n"
        "s.connect(('192.168.100.100', 80))\n"
        "s.sendall(b'GET /big HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n')\n"
        "buf = bytearray()\n"
        "while True:\n"
        "    b = s.recv(32768)\n"
        "    if not b: break\n"
        "    buf += b; time.sleep(0.005)\n"
        "body = bytes(buf).split(b'\\r\\n\\r\\n', 1)[1]\n"
        "print(len(body), hashlib.sha256(body).hexdigest())\n")
    proc = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "taskset", "-c", "0", "python3", "-c", client],
                            stdout=subprocess.PIPE, text=True)
    lab.procs.append(proc)
    moves = 0
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
        moves += 1
        subprocess.run(["taskset", "-p", "-c", str(moves % 2), str(proc.pid)], capture_output=True)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, "client failed"
    size, digest = out.split()
    assert moves >= 4, f"transfer too short to migrate ({moves} moves)"
    assert int(size) == servers[0].big_size and digest == servers[0].big_sha256
    assert lb.call("stats.get")["counters"]["conn_adopt"] > before, "no packet was seen on a second CPU"


def metric(lab, name, **labels):
    from prometheus_client.parser import text_string_to_metric_families

    text = lab.lb_run(["curl", "-s", "-m", "5", "http://127.0.0.1:53225/metrics"]).stdout
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"{name} {labels} not in /metrics")


@pytest.mark.root
def test_metrics_and_rest_match_the_traffic(one_arm_up):
    import json

    lab, lb, servers, _ = one_arm_up
    vip = "192.168.100.100"
    labels = {"local_address": vip, "local_port": "80", "proto": "TCP"}
    before = metric(lab, "hdslb_connections_total", **labels)
    lines = curl_loop(lab, f"http://{vip}/", 20)
    assert "FAIL" not in lines
    assert metric(lab, "hdslb_connections_total", **labels) - before == 20
    assert metric(lab, "hdslb_backend_weight", remote_address="192.168.100.2", remote_port="80", **labels) == 1

    # the same state through REST, and a change made there is visible to ipvsadm
    vs = json.loads(lab.lb_run(["curl", "-s", f"http://127.0.0.1:53225/v2/vs/{vip}-80-tcp"]).stdout)
    assert "192.168.100.2" in json.dumps(vs)
    body = json.dumps({"Items": [{"ip": "192.168.100.3", "port": 80, "weight": 3}]})
    r = lab.lb_run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", "-H",
                    "Content-Type: application/json", "-d", body, f"http://127.0.0.1:53225/v2/vs/{vip}-80-tcp/rs"])
    assert r.stdout == "200", r.stdout
    assert re.search(r"192\.168\.100\.3:80\s+FullNat 3\s", lb.ipvsadm("-Ln").stdout)
    bad = lab.lb_run(["curl", "-s", "-w", " %{http_code}", "-X", "PUT", "-H", "Content-Type: application/json",
                      "-d", '{"Items": [{"ip": "192.168.100.3", "port": 80, "weight": "heavy"}]}',
                      f"http://127.0.0.1:53225/v2/vs/{vip}-80-tcp/rs"]).stdout
    assert bad.endswith(" 400") and "weight" in bad
    lb.ipvsadm("-e", "-t", f"{vip}:80", "-r", "192.168.100.3:80", "-b", "-w", "1")
