"""Restarts that lose no flow: kill -9 of the daemon, a datapath reload, and the connection table under pressure."""

import hashlib
import os
import signal
import subprocess
import time

import pytest

from .conftest import HDSLB_CTL
from .test_fnat import LADDR, curl_loop

VIP = "192.168.100.100"
TRANSFERS = 20


def start_transfers(lab, n, rate="1M"):
    """n rate-limited downloads of /big from the client; returns [(Popen, output path)]."""
    out = []
    for i in range(n):
        path = lab.workdir / f"t{i}.out"
        p = subprocess.Popen(["ip", "netns", "exec", lab.cl_ns, "curl", "-s", "-m", "120", "--limit-rate", rate,
                              "-o", str(path), f"http://{VIP}/big"])
        lab.procs.append(p)
        out.append((p, path))
    return out


def check_transfers(transfers, servers):
    want = servers[0].big_sha256
    for p, path in transfers:
        assert p.wait(timeout=150) == 0, f"curl exited {p.returncode}"
        body = path.read_bytes()
        assert len(body) == servers[0].big_size and hashlib.sha256(body).hexdigest() == want


def daemon_pid(lb):
    return lb.call("daemon.status")["pid"]


@pytest.fixture(scope="module")
def lab_up(one_arm):
    from .test_fnat import quick_start

    lab, lb, servers, echo = one_arm
    quick_start(lb, lab, VIP, "veth-lb0", "veth-lb0", two_arm=False)
    return one_arm


@pytest.mark.root
def test_kill_9_then_restart_loses_no_flow(lab_up):
    lab, lb, servers, _ = lab_up
    before = lb.ipvsadm("-Ln").stdout
    transfers = start_transfers(lab, TRANSFERS)
    time.sleep(2)
    pid = daemon_pid(lb)
    new_before = lb.call("stats.get")["counters"]["conn_new"]
    subprocess.run(["kill", "-9", str(pid)], check=True)
    # the fast path keeps forwarding with nobody at the control socket, new connections included
    lines = curl_loop(lab, f"http://{VIP}/", 10)
    assert len(lines) == 10 and "FAIL" not in lines, lines
    lb.up("veth-lb0")
    assert daemon_pid(lb) != pid
    # the counters went on: those from before the kill, and the ten connections made while no daemon ran
    assert lb.call("stats.get")["counters"]["conn_new"] >= new_before + 10
    # same services, real servers, forwarding and weights (the connection columns have moved on)
    assert [ln.split()[:4] for ln in lb.ipvsadm("-Ln").stdout.splitlines()] == [ln.split()[:4] for ln in before.splitlines()]
    assert LADDR in lb.ipvsadm("-G").stdout
    lines = curl_loop(lab, f"http://{VIP}/", 10)
    assert len(lines) == 10 and "FAIL" not in lines, lines
    check_transfers(transfers, servers)
    assert "adopted pinned state" in lb.log()


@pytest.mark.root
def test_datapath_reload_keeps_flows(lab_up):
    lab, lb, servers, _ = lab_up
    transfers = start_transfers(lab, TRANSFERS)
    time.sleep(2)
    prog_before = lab.lb_run(["ip", "link", "show", "veth-lb0"]).stdout
    r = lb.ctl("reload", "--datapath")
    assert "connection entries kept" in r.stdout
    prog_after = lab.lb_run(["ip", "link", "show", "veth-lb0"]).stdout
    assert prog_before != prog_after, "a new program id is attached"
    lines = curl_loop(lab, f"http://{VIP}/", 10)
    assert "FAIL" not in lines
    check_transfers(transfers, servers)


@pytest.mark.root
def test_restart_from_a_model_older_than_the_maps_drops_what_it_does_not_have(lab_up):
    """A crash inside the save-coalescing window of a burst leaves the pinned maps newer than the saved model.
    Simulated here by taking the last service, address and route out of the saved model after a kill -9: the
    restarted daemon removes them from the fast path too (the model is what runs), and the rest keeps serving."""
    import msgpack

    from hdslb.daemon import DEFAULT_STATE_DIR, instance_name

    lab, lb, servers, _ = lab_up
    extra = f"{VIP}:8080"
    lb.ipvsadm("-A", "-t", extra, "-s", "rr")
    lb.ipvsadm("-a", "-t", extra, "-r", f"{lab.server_ips[0]}:80", "-b")
    lb.ipvsadm("--add-laddr", "-z", LADDR, "-t", extra, "-F", "veth-lb0")
    lb.dpip("addr", "add", "10.98.0.1/32", "dev", "veth-lb0")
    lb.dpip("route", "add", "10.99.0.0/24", "dev", "veth-lb0")
    ok = lab.client_run(["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", f"http://{extra}/"],
                        check=False)
    assert ok.stdout == "200", "the extra service balances before the crash"
    time.sleep(0.2)  # past the save coalescing
    pid = daemon_pid(lb)
    subprocess.run(["kill", "-9", str(pid)], check=True)
    path = f"{DEFAULT_STATE_DIR}/{instance_name(str(lab.ctrl_path))}.state"
    with open(path, "rb") as f:
        snap = msgpack.unpackb(f.read(), raw=False)
    snap["services"] = [s for s in snap["services"] if s["port"] != 8080]
    snap["addrs"] = [a for a in snap["addrs"] if a["addr"] != "10.98.0.1"]
    snap["routes"] = [r for r in snap["routes"] if r["net"] not in ("10.98.0.1/32", "10.99.0.0/24")]
    with open(path, "wb") as f:
        f.write(msgpack.packb(snap, use_bin_type=True))
    lb.up("veth-lb0")
    assert "8080" not in lb.ipvsadm("-Ln").stdout
    assert "removed 1 services" in lb.log()
    assert "1 local addresses and 2 routes" in lb.log(), "the address, its local route and the other route"
    assert "10.98.0.1" not in lb.dpip("addr", "show").stdout
    r = lab.client_run(["curl", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}", f"http://{extra}/"],
                       check=False)
    assert r.stdout != "200", "no longer balanced: the fast path forgot the service with the model"
    lines = curl_loop(lab, f"http://{VIP}/", 10)
    assert len(lines) == 10 and "FAIL" not in lines, lines


def wait_gone(pid):
    """Until a killed process has released what it held (its sockets): gone, or a zombie whose threads have all
    ended (the leader turns zombie first; the files go with the last thread)."""
    import os

    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z" and len(os.listdir(f"/proc/{pid}/task")) <= 1:
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)


def xdp_prog_id(lab, ifname="veth-lb0"):
    import json

    link = json.loads(lab.lb_run(["ip", "-j", "-d", "link", "show", ifname]).stdout)[0]
    return (link.get("xdp") or {}).get("prog", {}).get("id")


def assert_still_serving(lab, lb, pid, prog):
    """The running daemon, its program and its pins as they were, and the VIP balanced."""
    assert daemon_pid(lb) == pid
    assert xdp_prog_id(lab) == prog, "the program on the interface is the running daemon's"
    assert (lab.pin_dir / "conn4_map").exists() and (lab.pin_dir / "svc_map").exists()
    lines = curl_loop(lab, f"http://{VIP}/", 6)
    assert len(lines) == 6 and "FAIL" not in lines, lines


@pytest.mark.root
def test_a_second_daemon_on_the_same_instance_refuses_and_changes_nothing(lab_up):
    """hdslbd started by hand (or by a unit) beside a running one used to adopt the pins, attach over the running
    program, then fail at the control socket and, cleaning up, detach XDP and remove the pins: the instance
    stopped forwarding. It must refuse before touching anything."""
    import sys

    lab, lb, servers, _ = lab_up
    pid, prog = daemon_pid(lb), xdp_prog_id(lab)
    assert prog
    r = lab.lb_run([sys.executable, "-m", "hdslb.daemon", "veth-lb0", "--ctl-socket", str(lab.ctrl_path),
                    "--pin-root", str(lab.pin_dir.parent), "--xdp-mode", "native", "--fresh"],
                   check=False, timeout=120)
    assert r.returncode == 1 and f"hdslbd pid {pid} already runs with" in r.stderr, r.stderr
    assert_still_serving(lab, lb, pid, prog)
    r = lb.ctl("up", "veth-lb0", "--pin-root", str(lab.pin_dir.parent), check=False)
    assert r.returncode == 1 and "already serves" in r.stderr  # hdslb-ctl up twice: told, nothing started
    assert_still_serving(lab, lb, pid, prog)


@pytest.mark.root
def test_an_interface_running_another_xdp_program_is_refused(lab_up):
    """A second instance (another control socket) on the same interface, or any interface running another tool's
    XDP program: attaching would replace that program. Refused, naming it; both keep running."""
    lab, lb, servers, _ = lab_up
    pid, prog = daemon_pid(lb), xdp_prog_id(lab)
    other = lab.workdir / "other.ctrl"
    other_pins = lab.pin_dir.parent / f"{lab.pin_dir.name}-other"
    try:
        r = lb.ctl("up", "veth-lb0", "--ctl-socket", str(other), "--pin-root", str(other_pins), "--xdp-mode",
                   "native", "--api-listen", "off", "--log-file", str(lab.workdir / "other.log"), check=False)
        assert r.returncode == 1 and f"veth-lb0 already runs XDP program id {prog} (xdp_main)" in r.stderr, r.stderr
        assert "not this instance's" in r.stderr
        assert_still_serving(lab, lb, pid, prog)
        lab.lb_run(["ip", "link", "add", "rsx0", "type", "veth", "peer", "name", "rsx1"])
        lab.lb_run(["ip", "link", "set", "rsx0", "up"])
        import sys

        lab.lb_run([sys.executable, "-m", "hdslb.fastpath.xdp_pass", "rsx0", "--generic"])
        foreign = xdp_prog_id(lab, "rsx0")
        r = lb.ctl("up", "rsx0", "--ctl-socket", str(other), "--pin-root", str(other_pins), "--api-listen", "off",
                   "--log-file", str(lab.workdir / "other.log"), check=False)
        assert r.returncode == 1 and f"rsx0 already runs XDP program id {foreign} (hdslb_xdp_pass)" in r.stderr, \
            r.stderr
        assert xdp_prog_id(lab, "rsx0") == foreign
    finally:
        lb.ctl("down", "--ctl-socket", str(other), check=False)  # had it started (a failure above)
        lab.lb_run(["ip", "link", "del", "rsx0"], check=False)
        import shutil

        shutil.rmtree(other_pins, ignore_errors=True)
    assert_still_serving(lab, lb, pid, prog)


@pytest.mark.root
def test_a_restart_that_fails_leaves_the_adopted_fast_path_forwarding(lab_up):
    """After a kill -9, a restart that fails once attached (here: its REST port is taken) used to detach XDP and
    remove the pins on its way out: every flow and service the previous daemon left was gone. It must leave them
    forwarding, and the next start adopts them."""
    import sys

    lab, lb, servers, _ = lab_up
    adopted = lb.log().count("adopted pinned state")
    transfers = start_transfers(lab, 4)
    time.sleep(1)
    pid = daemon_pid(lb)
    subprocess.run(["kill", "-9", str(pid)], check=True)
    wait_gone(pid)
    squatter = subprocess.Popen(["ip", "netns", "exec", lab.lb_ns, sys.executable, "-c",
                                 "import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                                 "s.bind(('127.0.0.1', 53225)); "
                                 "s.listen(); print('ok', flush=True); time.sleep(300)"], stdout=subprocess.PIPE)
    try:
        assert squatter.stdout.readline().strip() == b"ok", lab.lb_run(["ss", "-tanp"], check=False).stdout
        r = lb.ctl("up", "veth-lb0", "--xdp-mode", "native", "--pin-root", str(lab.pin_dir.parent),
                   "--log-file", str(lab.workdir / "hdslbd.log"), check=False)
        assert r.returncode == 1
        assert "the fast path stays attached with its pinned state" in lb.log()
        assert xdp_prog_id(lab) and (lab.pin_dir / "conn4_map").exists()
        lines = curl_loop(lab, f"http://{VIP}/", 6)
        assert len(lines) == 6 and "FAIL" not in lines, lines
    finally:
        squatter.kill()
        squatter.wait()
    lb.up("veth-lb0")
    assert lb.log().count("adopted pinned state") == adopted + 2  # the failed start, then this one
    check_transfers(transfers, servers)


@pytest.mark.root
def test_a_saved_model_without_pins_is_restored_into_new_maps(lab_up):
    """The pins gone but the saved model there (the bpffs remounted, another --pin-root, a reboot with the state dir
    on disk): the start used to come up empty and overwrite the model, every service lost. It restores the model
    into new maps (connections and counters start empty). The program the old daemon left attached uses maps no
    longer pinned: that is refused until the operator detaches it, as the message says."""
    import shutil

    lab, lb, servers, _ = lab_up
    before = lb.ipvsadm("-Ln").stdout
    pid = daemon_pid(lb)
    subprocess.run(["kill", "-TERM", str(pid)], check=True)  # stops the control plane, the fast path stays
    wait_gone(pid)
    shutil.rmtree(lab.pin_dir)
    r = lb.ctl("up", "veth-lb0", "--xdp-mode", "native", "--pin-root", str(lab.pin_dir.parent),
               "--log-file", str(lab.workdir / "hdslbd.log"), check=False)
    assert r.returncode == 1 and "veth-lb0 already runs XDP program id" in r.stderr, r.stderr
    assert "ip link set dev veth-lb0 xdp off" in r.stderr
    lab.lb_run(["ip", "link", "set", "dev", "veth-lb0", "xdp", "off"])
    lb.up("veth-lb0")
    assert "restoring the saved model" in lb.log()
    assert [ln.split()[:4] for ln in lb.ipvsadm("-Ln").stdout.splitlines()] == \
        [ln.split()[:4] for ln in before.splitlines()]
    assert LADDR in lb.ipvsadm("-G").stdout
    lines = curl_loop(lab, f"http://{VIP}/", 6)
    assert len(lines) == 6 and "FAIL" not in lines, lines


@pytest.mark.root
def test_down_with_no_daemon_takes_down_what_it_left(lab_up):
    """`hdslb-ctl down` after a kill -9 used to say "cannot reach hdslbd" and leave the program attached, the pins
    and the model: the documented way out did nothing. It detaches the instance's program (only one using its
    pinned maps) and removes its pins and model; a second down says there is nothing left."""
    import os

    from hdslb.daemon import DEFAULT_STATE_DIR, instance_name

    from .conftest import HDSLB_CTL
    from .test_fnat import quick_start

    lab, lb, servers, _ = lab_up
    state = f"{DEFAULT_STATE_DIR}/{instance_name(str(lab.ctrl_path))}.state"
    pid = daemon_pid(lb)
    subprocess.run(["kill", "-9", str(pid)], check=True)
    wait_gone(pid)
    # from the wrong namespace (here: the host's) nothing is taken down: the program runs where hdslbd ran
    wrong = subprocess.run([*HDSLB_CTL, "down", "--ctl-socket", str(lab.ctrl_path), "--pin-root",
                            str(lab.pin_dir.parent)], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and "not attached to an interface of this network namespace" in wrong.stderr, \
        wrong.stderr
    assert xdp_prog_id(lab) and lab.pin_dir.exists() and os.path.exists(state)
    r = lb.ctl("down", "--pin-root", str(lab.pin_dir.parent), check=False)
    assert r.returncode == 0, r.stderr
    assert "detached XDP program id" in r.stdout and str(lab.pin_dir) in r.stdout and state in r.stdout, r.stdout
    assert xdp_prog_id(lab) is None and not lab.pin_dir.exists()
    assert not os.path.exists(state)
    r = lb.ctl("down", "--pin-root", str(lab.pin_dir.parent), check=False)
    assert r.returncode == 1 and "nothing of instance" in r.stderr, r.stderr
    quick_start(lb, lab, VIP, "veth-lb0", "veth-lb0", two_arm=False)  # the module's lab as the other tests left it


@pytest.mark.root
def test_down_names_a_fast_path_whose_pins_are_gone(lab_up):
    """After a kill -9 whose pins were lost as well (removed, or on a bpffs that went with a mount namespace), the
    program went on forwarding with its old tables and `down` said "nothing of instance ... is left". It now names
    the interface and program, an hdslb fast path that nothing can reach, with the command that detaches it (and
    does not detach it unasked: whose it was cannot be told); the command works."""
    import re
    import shutil

    from .test_fnat import quick_start

    lab, lb, servers, _ = lab_up
    pid, prog = daemon_pid(lb), xdp_prog_id(lab)
    subprocess.run(["kill", "-9", str(pid)], check=True)
    wait_gone(pid)
    shutil.rmtree(lab.pin_dir)
    r = lb.ctl("down", "--pin-root", str(lab.pin_dir.parent), check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"veth-lb0 still runs XDP program id {prog}, an hdslb fast path nothing can reach" in r.stderr, r.stderr
    assert xdp_prog_id(lab) == prog  # named, not detached
    cmd = re.search(r"`(ip link set dev veth-lb0 xdp\S* off)`", r.stderr).group(1)
    lab.lb_run(cmd.split())
    assert xdp_prog_id(lab) is None
    r = lb.ctl("down", "--pin-root", str(lab.pin_dir.parent), check=False)
    assert r.returncode == 1 and "nothing of instance" in r.stderr and "still runs" not in r.stderr, r.stderr
    quick_start(lb, lab, VIP, "veth-lb0", "veth-lb0", two_arm=False)


@pytest.mark.root
def test_an_interface_recreated_while_hdslbd_runs_is_attached_again(tmp_path):
    """A veth pair deleted and made again (or a driver reloaded) comes back with a new ifindex and no XDP program;
    hdslbd went on as if attached (status said so) and nothing forwarded there until someone restarted it. It
    restarts itself now (same pid: exec), adopts its pins and attaches to the new interface."""
    import os

    from hdslb.ctl.client import DaemonUnreachable, call

    from .conftest import HDSLB_CTL, IPVSADM

    ns, ctl, state = f"rs{os.getpid()}", str(tmp_path / f"rs{os.getpid()}.ctrl"), str(tmp_path / "state")
    log = tmp_path / "hdslbd.log"

    def run(*argv, check=True):
        return subprocess.run(["ip", "netns", "exec", ns, *map(str, argv)], check=check, capture_output=True,
                              text=True, timeout=120)

    def prog_id():
        import json

        link = json.loads(run("ip", "-j", "-d", "link", "show", "rsa").stdout)[0]
        return (link.get("xdp") or {}).get("prog", {}).get("id")

    def status():
        try:
            return call("daemon.status", None, path=ctl)
        except (DaemonUnreachable, OSError):
            return None

    def make_veth():
        run("ip", "link", "add", "rsa", "type", "veth", "peer", "name", "rsb")
        run("ip", "link", "set", "rsa", "up")
        run("ip", "link", "set", "rsb", "up")

    pid = None
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        run("ip", "link", "set", "lo", "up")
        make_veth()
        run(*HDSLB_CTL, "up", "rsa", "--ctl-socket", ctl, "--xdp-mode", "generic", "--state-dir", state,
            "--api-listen", "off", "--log-file", log)
        run(*IPVSADM, "--ctl-socket", ctl, "-A", "-t", "10.0.0.1:80", "-s", "rr")
        pid, before = status()["pid"], prog_id()
        assert before
        run("ip", "link", "del", "rsa")
        make_veth()
        assert prog_id() is None
        deadline = time.monotonic() + 90  # a bound for a restart (a compile) on a loaded machine, not a measurement
        while time.monotonic() < deadline and not (prog_id() and (status() or {}).get("ready")):
            time.sleep(0.5)
        assert prog_id() and (status() or {}).get("ready"), log.read_text()
        assert status()["pid"] == pid and "restarting hdslbd to attach to it" in log.read_text()
        assert "10.0.0.1:80" in run(*IPVSADM, "--ctl-socket", ctl, "-Ln").stdout
    finally:
        deadline = time.monotonic() + 90
        while pid and time.monotonic() < deadline and not (status() or {}).get("ready"):
            time.sleep(0.5)  # a restart under way finishes before it is stopped
        run(*HDSLB_CTL, "down", "--ctl-socket", ctl, "--state-dir", state, check=False)
        if pid:
            try:
                os.kill(pid, 9)  # only if down could not stop it: it must not outlive its namespace
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", ns], check=False)
        import shutil

        shutil.rmtree(f"/run/hdslb/bpffs/rs{os.getpid()}", ignore_errors=True)


@pytest.mark.root
def test_a_restart_in_another_xdp_mode_switches_the_mode(lab_up):
    """--xdp-mode changed across a restart (native to generic, say a driver whose native XDP misbehaves): the kernel
    runs one mode at a time, so attaching in the other mode over the running program failed (EBUSY, a traceback;
    and the failed start's clean-up then wiped the pins). The old mode is detached first, then the new attached."""
    import json

    lab, lb, servers, _ = lab_up

    def mode():
        link = json.loads(lab.lb_run(["ip", "-j", "-d", "link", "show", "veth-lb0"]).stdout)[0]
        return (link.get("xdp") or {}).get("mode")

    for want, code in (("generic", 2), ("native", 1)):  # IFLA_XDP_ATTACHED: 1 driver, 2 generic (skb)
        pid = daemon_pid(lb)
        subprocess.run(["kill", "-9", str(pid)], check=True)
        wait_gone(pid)
        lb.up("veth-lb0", mode=want)
        assert mode() == code and lb.call("daemon.status")["interfaces"] == {"veth-lb0": want}
        lines = curl_loop(lab, f"http://{VIP}/", 4)
        assert len(lines) == 4 and "FAIL" not in lines, lines

    # Detached behind hdslbd's back: status said attached while nothing was balanced. It says so (the watch looks
    # every second), and a datapath reload attaches the program again.
    lab.lb_run(["ip", "link", "set", "dev", "veth-lb0", "xdp", "off"])
    deadline = time.monotonic() + 30
    while "veth-lb0" not in lb.call("daemon.status")["lost"] and time.monotonic() < deadline:
        time.sleep(0.2)
    out = lb.ctl("status").stdout
    assert "NOT ATTACHED:   veth-lb0: no XDP program on the interface" in out, out
    assert "veth-lb0 no longer runs hdslbd's XDP program" in lb.log()
    lb.ctl("reload", "--datapath")
    deadline = time.monotonic() + 30
    while "veth-lb0" in lb.call("daemon.status")["lost"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "attached:       veth-lb0 (native XDP)" in lb.ctl("status").stdout
    lines = curl_loop(lab, f"http://{VIP}/", 4)
    assert len(lines) == 4 and "FAIL" not in lines, lines


@pytest.mark.root
def test_a_restart_with_another_conn_table_kind_or_size_keeps_the_flows(lab_up):
    """--conn-table and --max-conns are fixed when the connection tables are made (a map's type and size are), so
    a restart asking for others used to be refused unless --fresh threw every flow away. Now the pinned tables
    are set aside, new ones made and the connections copied over, before and after the new program is attached:
    downloads running across a stop and start into a bigger shared table, and another back to the default
    (--conn-table auto: per-CPU up to 8 possible CPUs, the shared pins then copied as for an asked kind),
    complete intact, new connections work throughout, and the old tables' pins are gone."""
    from hdslb.fastpath import loader

    lab, lb, servers, _ = lab_up
    ncpus = loader.possible_cpus()
    auto = loader.resolve_conn_table("auto", ncpus)
    transfers = start_transfers(lab, TRANSFERS)
    time.sleep(2)
    for extra, kind, size in ((("--conn-table", "shared", "--max-conns", "524288"), "shared", 524288),
                              ((), auto, 262144)):
        pid = daemon_pid(lb)
        subprocess.run(["kill", "-TERM", str(pid)], check=True)
        wait_gone(pid)
        lb.up("veth-lb0", *extra)
        table = lb.call("stats.get")["conn_table"]
        assert (table["kind"], table["size4"]) == (kind, size)
        shown = f"{kind} (auto: {ncpus} possible CPUs)" if not extra else kind
        assert f"conn table:     {shown}, {size} IPv4" in lb.ctl("status").stdout
        assert table["entries"] >= 2 * TRANSFERS, table  # each running download's two entries came over
        assert f"entries copied into the new {kind} tables after attaching" in lb.log()
        assert sorted(n for n in os.listdir(lab.pin_dir) if n.startswith("conn")) == ["conn4_map", "conn6_map",
                                                                                      "conn_single"]
        lines = curl_loop(lab, f"http://{VIP}/", 4)
        assert len(lines) == 4 and "FAIL" not in lines, lines
    check_transfers(transfers, servers)


@pytest.mark.root
def test_a_restart_with_other_map_sizes_keeps_services_flows_and_counters(lab_up):
    """--max-services and --max-dests size maps made at the first start; a restart asking for others used to be
    refused without --fresh. Now those maps are made anew: the saved model writes the services, real servers and
    scheduling tables again, and the counters and cursors the fast path keeps are copied. Downloads running across
    the restarts complete, the services and their counters are as before; sizes too small for the saved model
    are refused before anything is touched, naming the option and the least it can be."""
    lab, lb, servers, _ = lab_up
    transfers = start_transfers(lab, TRANSFERS)
    time.sleep(2)

    def listing():
        return [ln.split()[:4] for ln in lb.ipvsadm("-Ln").stdout.splitlines()]

    def conns():
        return sum(int(ln.split()[2]) for ln in lb.ipvsadm("-Ln", "--stats").stdout.splitlines()
                   if ln.startswith(("TCP", "UDP")))

    before, conns_before = listing(), conns()
    assert conns_before >= TRANSFERS
    for extra in (("--max-services", "8192", "--max-dests", "131072", "--max-hash-cells", "4194304"), ()):
        pid = daemon_pid(lb)
        subprocess.run(["kill", "-TERM", str(pid)], check=True)
        wait_gone(pid)
        lb.up("veth-lb0", *extra)
        assert listing() == before and conns() >= conns_before
        assert "resized maps in use, the old ones unpinned" in lb.log()
        assert not [n for n in os.listdir(lab.pin_dir) if n.endswith("_old1")]
        lines = curl_loop(lab, f"http://{VIP}/", 4)
        assert len(lines) == 4 and "FAIL" not in lines, lines
    pid = daemon_pid(lb)
    subprocess.run(["kill", "-TERM", str(pid)], check=True)
    wait_gone(pid)
    pins_before = sorted(os.listdir(lab.pin_dir))
    r = lb.run(HDSLB_CTL + ["up", "veth-lb0", "--max-services", "1", "--pin-root", str(lab.pin_dir.parent),
                               "--log-file", str(lab.workdir / "hdslbd.log")], check=False)
    assert r.returncode != 0 and "--max-services 1 (it uses up to 2: --max-services 2 at least)" in r.stdout + r.stderr
    assert sorted(os.listdir(lab.pin_dir)) == pins_before
    lb.up("veth-lb0")
    assert listing() == before
    check_transfers(transfers, servers)


@pytest.mark.root
def test_reload_datapath_copies_a_set_aside_table_that_a_start_left_pinned(lab_up):
    """A start whose copy into new connection tables failed logs it and leaves the set-aside table pinned
    (conn4_map_old1) for the next start to copy; `reload --datapath`, which loads the maps afresh, finds it too and
    copies it once the new program is attached. The pin is made here as such a start leaves it: a shared table of
    the conn4_map layout holding one connection the running table lacks (a live one's value, another client
    port); after the reload the running table holds it, the pin is gone, and the downloads never noticed."""
    import ctypes as ct

    import numpy as np

    from hdslb.fastpath import conn_move, loader

    lab, lb, servers, _ = lab_up
    transfers = start_transfers(lab, 4)
    time.sleep(2)
    lib = loader._libbcc()
    _fam, ks, vs = loader.FastPath.CONN_MAPS["conn4_map"]
    live = lib.bpf_obj_get(os.path.join(lab.pin_dir, "conn4_map").encode())
    assert live >= 0
    old = lib.bcc_create_map(loader.BPF_MAP_TYPE_LRU_HASH, b"conn4_map", ks, vs, 262144, 0)
    assert old >= 0
    try:
        ncpu = loader.possible_cpus()
        K, M = conn_move.read_folded(lib, live, ks, vs, ncpu, "conn4_map")
        assert len(K) >= 8  # the downloads' entries, both directions
        key = K[:1].copy()
        key[0, 0:2] = (0, 1)  # port 1 (network order): no running connection has it
        assert not any(bytes(k) == bytes(key[0]) for k in K)
        conn_move.write_raw(lib, old, key, M[:1], "conn4_map_old1")
        path = os.path.join(lab.pin_dir, "conn4_map_old1")
        assert lib.bpf_obj_pin(old, path.encode()) == 0
        r = lb.ctl("reload", "--datapath")
        assert "connection entries kept" in r.stdout
        assert "conn4_map_old1" not in os.listdir(lab.pin_dir)
        assert "entries copied into the new percpu tables after attaching" in lb.log()
        got = ct.create_string_buffer(vs * ncpu)
        kb = ct.create_string_buffer(bytes(key[0]), ks)
        assert lib.bpf_lookup_elem(live, kb, got) == 0, "the set-aside entry is in the running table"
        copies = np.frombuffer(got.raw, np.uint8).reshape(ncpu, vs)
        assert any(bytes(c) == bytes(M[0]) for c in copies)
        lib.bpf_delete_elem(live, kb)
        lines = curl_loop(lab, f"http://{VIP}/", 4)
        assert len(lines) == 4 and "FAIL" not in lines, lines
        check_transfers(transfers, servers)
    finally:
        os.close(old)
        os.close(live)
        try:
            os.unlink(os.path.join(lab.pin_dir, "conn4_map_old1"))
        except FileNotFoundError:
            pass


@pytest.mark.root
def test_a_model_restored_after_a_reboot_announces_its_addresses():
    """After a reboot (/run emptied: no pins, no program) hdslbd restores the saved model of its --state-dir into new
    maps. Its addresses were taken again silently: a router holding a VIP at a MAC this box no longer has (a NIC or
    the box replaced) went on sending there until its entry expired. Each is announced now (gratuitous ARP,
    unsolicited NA), as its add announced it and DPVS's dpip addr add at its start does."""
    from hdslb.lab import netns as nx
    from hdslb.lab.topology import OneArm

    from .conftest import Balancer

    vip4, vip6 = "192.168.100.100", "fd00:100::100"
    lab = OneArm(n_servers=1, ipv6=True)
    lab.setup()
    lb = Balancer(lab)
    up = ("up", "veth-lb0", "--xdp-mode", "native", "--pin-root", str(lab.pin_dir.parent), "--state-dir",
          str(lab.workdir / "state"), "--log-file", str(lab.workdir / "hdslbd.log"))
    try:
        lb.ctl(*up)
        lb.dpip("addr", "add", f"{vip4}/32", "dev", "veth-lb0")
        lb.dpip("-6", "addr", "add", f"{vip6}/128", "dev", "veth-lb0")
        pins = lb.call("daemon.status")["pin_dir"]
        # the reboot: the daemon, its program and its pins gone; the saved model on disk kept
        os.kill(daemon_pid(lb), signal.SIGKILL)
        nx.sh(["ip", "-n", lab.lb_ns, "link", "set", "dev", "veth-lb0", "xdp", "off"])
        subprocess.run(["rm", "-rf", pins], check=True)
        # the client still has the VIPs at the MAC of the NIC the box had before
        old = "02:de:ad:be:ef:01"
        for fam, vip in (("-4", vip4), ("-6", vip6)):
            nx.sh(["ip", "-n", lab.cl_ns, fam, "neigh", "replace", vip, "lladdr", old, "dev", "eth0", "nud", "stale"])
        lb.ctl(*up)
        assert "restoring the saved model" in lb.log()
        deadline = time.monotonic() + 10  # a bound for the announcement to be heard, not a measurement
        while True:
            out = {fam: nx.sh(["ip", "-n", lab.cl_ns, fam, "neigh", "show", vip], check=False).stdout
                   for fam, vip in (("-4", vip4), ("-6", vip6))}
            if all(lab.lb_mac in o for o in out.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert all(lab.lb_mac in o for o in out.values()), out
    finally:
        try:
            lb.ctl("down", "--pin-root", str(lab.pin_dir.parent), "--state-dir", str(lab.workdir / "state"),
                   check=False)
        finally:
            lab.teardown()
