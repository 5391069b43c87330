"""One daemon per instance, and what a restart finds on disk: the lock that makes a second hdslbd on the same pins
or state file refuse before touching anything, the temp files of saves cut short, a state file gone while pins
forward."""

import asyncio
import errno
import os

import pytest

from hdslb import daemon as D
from hdslb.daemon import Daemon, settings_from_args
from hdslb.errors import HdslbError


def _daemon(tmp_path, *extra) -> Daemon:
    return Daemon(settings_from_args(["eth0", "--state-dir", str(tmp_path / "state"), "--pin-root",
                                      str(tmp_path / "bpf"), *extra]))


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "LOCK_DIR", str(tmp_path / "lock"))
    return tmp_path / "lock"


def test_a_second_daemon_on_the_same_instance_is_refused_naming_the_first(tmp_path, lock_dir):
    first = _daemon(tmp_path)
    first._take_locks()
    try:
        with pytest.raises(HdslbError) as e:
            _daemon(tmp_path)._take_locks()
        assert e.value.errno == errno.EBUSY
        msg = e.value.message
        assert f"hdslbd pid {os.getpid()}" in msg and first.pin_dir in msg and "nothing was changed" in msg, msg
        # the same pins under another state dir, or the same state file with other pins: refused as well
        with pytest.raises(HdslbError, match="the pinned maps in"):
            _daemon(tmp_path, "--state-dir", str(tmp_path / "other-state"))._take_locks()
        with pytest.raises(HdslbError, match="the state file"):
            _daemon(tmp_path, "--pin-root", str(tmp_path / "other-bpf"))._take_locks()
        other = _daemon(tmp_path, "--instance", "other")  # another instance runs beside it
        other._take_locks()
        other._release_locks()
    finally:
        first._release_locks()
    second = _daemon(tmp_path)  # the first gone (stopped or killed: the kernel drops its locks), a start goes on
    second._take_locks()
    second._release_locks()
    assert os.listdir(lock_dir) == [], "a stopped daemon leaves no lock file behind"


def test_a_refused_daemon_keeps_none_of_the_locks_it_took(tmp_path):
    first = _daemon(tmp_path, "--pin-root", str(tmp_path / "other-bpf"))  # holds only the state file's lock
    first._take_locks()
    try:
        second = _daemon(tmp_path)
        with pytest.raises(HdslbError, match="the state file"):
            second._take_locks()
        assert second._locks == []
        third = _daemon(tmp_path, "--state-dir", str(tmp_path / "s3"))  # the pins' lock was given back
        third._take_locks()
        third._release_locks()
    finally:
        first._release_locks()


def test_temp_files_of_saves_cut_short_are_removed_at_start(tmp_path):
    d = _daemon(tmp_path)
    state = d.settings.state_file
    os.makedirs(os.path.dirname(state))
    for name in (f"{state}.4242.tmp", f"{state}.17.tmp", state, f"{state}.bak", f"{state}.x.tmp",
                 os.path.join(os.path.dirname(state), "other.state.4242.tmp")):
        with open(name, "wb") as f:
            f.write(b"x")
    d._remove_stale_saves()
    assert sorted(os.listdir(os.path.dirname(state))) == sorted(
        ["hdslb_ctrl.state", "hdslb_ctrl.state.bak", "hdslb_ctrl.state.x.tmp", "other.state.4242.tmp"])


def test_a_state_file_gone_while_pins_forward_refuses_the_start(tmp_path):
    class Pins:
        def has_pins(self):
            return True

    d = _daemon(tmp_path)
    d.fp = Pins()
    with pytest.raises(HdslbError) as e:
        d._read_state()
    msg = e.value.message
    assert d.settings.state_file in msg and "does not exist" in msg and "--state-dir" in msg and "--fresh" in msg
    d.fp.has_pins = lambda: False
    assert d._read_state() is None, "no pins, no file: a first start"


def test_a_holder_being_killed_is_waited_for_not_taken_for_a_second_daemon(tmp_path):
    """`kill -9` then `hdslb-ctl up` at once: the killed daemon's leader is a zombie while its threads end, and its
    lock goes with the last of them. That dying holder is waited for; a live one is refused at once (above)."""
    import platform
    import subprocess
    import sys
    import time

    sys_exit = {"x86_64": 60, "aarch64": 93}.get(platform.machine())
    if sys_exit is None:
        pytest.skip("exit(2) syscall number unknown here")
    first = _daemon(tmp_path)
    path = first._lock_files()[0][0]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # A process holding the lock whose leader thread exits (exit(2), not exit_group) while another thread lives on
    # for a while: what a multi-threaded hdslbd looks like between SIGKILL and its end.
    script = f"""
import ctypes, fcntl, os, threading, time
fd = os.open({path!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, str(os.getpid()).encode(), 0)
threading.Thread(target=lambda: (time.sleep(1.0), os._exit(0))).start()
print("held", flush=True)
ctypes.CDLL(None).syscall({sys_exit}, 0)
"""
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"held"
        while True:  # until its leader is a zombie (its other thread still holds the lock)
            with open(f"/proc/{p.pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    break
            time.sleep(0.01)
        first._take_locks()
        assert [p for _, p in first._locks][0] == path
        first._release_locks()
    finally:
        p.kill()
        p.wait()


def test_a_restart_naming_fewer_interfaces_than_the_model_uses_is_refused_naming_them(tmp_path):
    """Restarted with `up eth0` where the saved model has a route and an address on eth1, the start adopted the pins,
    then failed in the restore with "device 'eth1' is not managed by this balancer": nothing said it came from the
    saved model or what to do. Refused before anything is loaded, naming the interface, what uses it and the way
    out."""
    from hdslb.balancer import Balancer, snapshot

    from .test_balancer import Recorder
    from .test_batch import IFACES

    bal = Balancer(Recorder(), dict(IFACES))
    bal.route_add({"prefix": "20.0.0.0", "prefixlen": 16, "ifname": "eth1"})
    bal.addr_add({"addr": "10.9.0.1", "prefixlen": 32, "ifname": "eth1"})
    snap = snapshot(bal)
    d = _daemon(tmp_path)
    d._check_snapshot_ifaces(snap, dict(IFACES))  # every interface named: fine
    with pytest.raises(HdslbError) as e:
        d._check_snapshot_ifaces(snap, {"eth0": IFACES["eth0"]})
    msg = e.value.message
    assert "eth1 (addresses, routes)" in msg and d.settings.state_file in msg and "eth0 eth1" in msg, msg
    assert "--fresh" in msg


def test_a_start_whose_sizes_do_not_hold_the_saved_model_is_refused_naming_the_least_they_can_be(tmp_path):
    """Maps of another size are made anew and the saved model written into them; service ids, real-server slots
    and hash-table cells past the new sizes could not be, so such a start is refused before anything is loaded,
    naming each option too small and the least it can be (it failed inside the restore)."""
    from hdslb.balancer import Balancer, snapshot

    from .test_balancer import Recorder
    from .test_batch import IFACES

    bal = Balancer(Recorder(), dict(IFACES))
    for port in (80, 81, 82):
        bal.service_add({"proto": "tcp", "addr": "10.0.0.1", "port": port, "sched": "mh"})
        for i in range(3):
            bal.dest_add({"svc": {"proto": "tcp", "addr": "10.0.0.1", "port": port}, "addr": f"10.1.0.{i + 1}",
                          "port": 80})
    snap = snapshot(bal)
    cells = max(v["hcells"][0] + v["hcells"][1] for v in snap["services"])
    _daemon(tmp_path)._check_snapshot_sizes(snap)  # the defaults hold it
    exact = _daemon(tmp_path, "--max-services", "3", "--max-dests", "9", "--max-hash-cells", str(cells))
    exact._check_snapshot_sizes(snap)  # nor sizes it just fits
    with pytest.raises(HdslbError) as e:
        _daemon(tmp_path, "--max-services", "2", "--max-dests", "8")._check_snapshot_sizes(snap)
    msg = e.value.message
    assert "--max-services 2 (it uses up to 3: --max-services 3 at least)" in msg, msg
    assert "--max-dests 8 (it uses up to 9: --max-dests 9 at least)" in msg and "--fresh" in msg, msg
    with pytest.raises(HdslbError, match=rf"--max-hash-cells 256 \(it uses up to {cells}"):
        _daemon(tmp_path, "--max-hash-cells", "256")._check_snapshot_sizes(snap)

async def _fresh_start_failing(monkeypatch, tmp_path, fastpath_cls):
    """A fresh start over one stand-in interface whose FastPath is fastpath_cls: (the daemon, the HdslbError raised)."""
    from hdslb.balancer import Iface
    from hdslb.fastpath import decap, loader

    monkeypatch.setattr(D, "read_ifaces", lambda names, where=None: {n: Iface(n, 2, b"\2\0\0\0\0\1", 1500)
                                                                     for n in names})
    monkeypatch.setattr(loader, "FastPath", fastpath_cls)
    monkeypatch.setattr(loader, "foreign_xdp", lambda name, ours: None)
    monkeypatch.setattr(decap, "is_bpffs", lambda path: True)  # (the pin directory load() makes is on a bpffs)
    d = _daemon(tmp_path)
    with pytest.raises(HdslbError) as e:
        await d.run()
    return d, e



async def test_a_fresh_start_whose_maps_cannot_be_made_is_refused_in_one_line_leaving_nothing(tmp_path, monkeypatch):
    """`hdslb-ctl up eth0 --max-conns 400000000`: the kernel cannot allocate the connection table. The loader's
    message (the estimate, the CPU count, the option to lower) came out as a traceback, and the start left the
    empty model it had saved and its pin directory, so the next start restored a model nobody ran. The start is
    refused as an HdslbError (main logs it in one line) and leaves nothing it made."""
    from hdslb.fastpath import loader

    class NoRoom(loader.FastPath):
        def load(self, adopt):
            os.makedirs(self.pin_dir, exist_ok=True)  # as load() makes it before creating the maps
            raise OSError(errno.E2BIG, "cannot create the IPv4 connection map: 400000000 entries need ~72279 MiB of "
                                       "kernel memory; lower --max-conns (conn_pool_size)")

    d, e = await _fresh_start_failing(monkeypatch, tmp_path, NoRoom)
    assert e.value.errno == errno.E2BIG and "lower --max-conns" in e.value.message, e.value.message
    assert not os.path.exists(d.settings.state_file), "the empty model this start saved is gone"
    assert not os.path.exists(d.pin_dir)


@pytest.mark.parametrize("reexec", [False, True])
async def test_systemd_is_told_a_reexec_is_a_reload_not_a_stop(tmp_path, monkeypatch, reexec):
    """An interface deleted and made again: hdslbd re-executes itself (same pid) to attach again. It told systemd
    STOPPING=1 on the way, as for a real stop; systemd then takes a Type=notify service for one shutting down
    (deactivating, stop-sigterm), ignores the READY=1 of the re-executed daemon and SIGKILLs it when
    TimeoutStopSec runs out. A re-exec now says RELOADING=1 (READY=1 follows from the new start); a stop still
    says STOPPING=1."""
    import socket as s

    path = str(tmp_path / "notify")
    srv = s.socket(s.AF_UNIX, s.SOCK_DGRAM)
    srv.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    d = _daemon(tmp_path)

    async def start():
        d.bal = type("Bal", (), {"services": {}})()
        d.reexec = reexec  # as _check_ifaces sets it, or a SIGTERM
        d._stop.set()

    async def stop():
        pass

    d.start, d.stop = start, stop
    try:
        await d.run()
        srv.setblocking(False)
        said = []
        while True:
            try:
                said.append(srv.recv(4096).decode())
            except BlockingIOError:
                break
    finally:
        srv.close()
    assert said[0].startswith("READY=1")
    assert ("STOPPING=1" in said[-1]) == (not reexec) and ("RELOADING=1" in said[-1]) == reexec, said


def test_down_without_a_daemon_removes_the_dead_control_socket_too(tmp_path):
    """After kill -9 (or a crash), `hdslb-ctl down` removed the pins and the saved model but left the control socket
    file, with nobody behind it: `[ -S /var/run/hdslb_ctrl ]` and the like still said an instance was there. The
    socket goes with the rest when nothing answers on it; a live one (another process serving the path) stays."""
    import socket

    from hdslb.daemon import down_offline

    ctl = str(tmp_path / "lb.ctrl")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(ctl)
    dead.close()  # the file stays, as a killed daemon leaves it
    s = settings_from_args(["eth0", "--ctl-socket", ctl, "--state-dir", str(tmp_path / "state"), "--pin-root",
                            str(tmp_path / "bpf")])
    done = down_offline(s)
    assert not os.path.exists(ctl) and any(ctl in line for line in done), done
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(ctl)
    live.listen(1)
    try:
        assert down_offline(s) == [] and os.path.exists(ctl)
    finally:
        live.close()
        os.unlink(ctl)


def test_a_reexec_does_not_run_fresh_again():
    """`hdslb-ctl up eth0 --fresh`, services added with ipvsadm, then the interface deleted and made again (a driver
    reload): hdslbd logged "restarting hdslbd to attach to it; services and connections are kept" and re-executed
    its own command line, --fresh included, which discarded the pinned maps and saved an empty model: every service
    and connection was gone. The re-exec runs the command line without --fresh (nor an abbreviation argparse
    takes for it); the rest stays as given."""
    from hdslb.daemon import reexec_argv

    orig = ["-m", "hdslb.daemon", "eth0", "--fresh", "--state-dir", "/s", "--fre", "-f", "/etc/hdslb.conf",
            "--xdp-mode", "generic"]
    assert reexec_argv(orig) == ["-m", "hdslb.daemon", "eth0", "--state-dir", "/s", "-f", "/etc/hdslb.conf",
                                 "--xdp-mode", "generic"]
    parse = D.build_parser().parse_args
    assert parse(orig[2:]).fresh is True and parse(reexec_argv(orig)[2:]).fresh is False


def test_ctrl_c_during_a_foreground_start_is_one_line_not_a_traceback(tmp_path, monkeypatch, caplog, capsys):
    """hdslbd run by hand, Ctrl-C while it compiled: a CancelledError and a KeyboardInterrupt traceback. The start
    stops as kill -9 would stop it (README: the next start adopts what it made; `hdslb-ctl down` removes it); that is
    now said in one line, exit 130."""
    async def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(D.Daemon, "run", interrupted)
    monkeypatch.setattr(D.os, "geteuid", lambda: 0)
    rc = D.main(["eth0", "--state-dir", str(tmp_path / "state"), "--pin-root", str(tmp_path / "bpf")])
    assert rc == 130
    assert "interrupted during the start" in caplog.text and "hdslb-ctl down" in caplog.text, caplog.text
    assert "Traceback" not in capsys.readouterr().err


async def test_keepalived_dump_signals_do_not_kill_the_daemon(tmp_path, monkeypatch, caplog):
    """keepalived dumps its data on SIGUSR1 and its stats on SIGUSR2; an operator's habit `kill -USR1 $(pidof
    hdslbd)` met no handler, and the default action ended hdslbd at once, without its stop (a coalesced save still
    pending was lost, and the restart removed what the saved model lacked from the fast path). They are answered
    with a log line naming what shows that state."""
    import signal

    caught = []
    before = {sig: signal.signal(sig, lambda s, f: caught.append(s)) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    d = _daemon(tmp_path)

    async def start():
        d.bal = type("Bal", (), {"services": {}})()
        loop = asyncio.get_running_loop()
        loop.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
        loop.call_later(0.05, os.kill, os.getpid(), signal.SIGUSR2)
        loop.call_later(0.2, d._stop.set)

    async def stop():
        pass

    d.start, d.stop = start, stop
    try:
        await d.run()
    finally:
        for sig, h in before.items():
            signal.signal(sig, h)
    assert caught == [], "the daemon left SIGUSR1/SIGUSR2 to their default action (the process ends)"
    assert "SIGUSR1" in caplog.text and "SIGUSR2" in caplog.text and "ipvsadm -Ln" in caplog.text, caplog.text


async def test_a_fresh_start_whose_program_does_not_compile_leaves_nothing(tmp_path, monkeypatch):
    """bcc's compile failing on a fresh start (kernel headers missing on a new box, a clang too old) raised bcc's bare
    Exception out of Daemon.start(): a traceback after clang's errors, the empty model and the new pins left for the
    next start to adopt. Refused in one line, as a map the kernel cannot make is, leaving nothing."""
    from hdslb.fastpath import loader

    class NoCompile(loader.FastPath):
        def load(self, adopt):
            os.makedirs(self.pin_dir, exist_ok=True)
            open(os.path.join(self.pin_dir, "conn4_map"), "w").close()  # the conn maps are pinned before the compile
            raise Exception("Failed to compile BPF module b'/opt/hdslb/bpf/hdslb_xdp.c'")

    d, e = await _fresh_start_failing(monkeypatch, tmp_path, NoCompile)
    assert "Failed to compile BPF module" in e.value.message, e.value.message
    assert not os.path.exists(d.settings.state_file) and not os.path.exists(d.pin_dir)


def test_down_without_a_daemon_never_removes_a_directory_that_holds_no_pins(tmp_path):
    """`hdslb-ctl down --pin-root /var/lib --instance mysql` (a wrong --pin-root, no daemon running) removed
    /var/lib/mysql whole, reporting "removed the pinned maps": pins live on a bpffs only, and the directory was
    taken down without a look. A directory not on a bpffs is refused, naming it, and nothing is changed (the saved
    model included)."""
    from hdslb.daemon import down_offline

    victim = tmp_path / "lib" / "mysql"
    victim.mkdir(parents=True)
    (victim / "ibdata1").write_text("precious")
    state = tmp_path / "state"
    state.mkdir()
    (state / "mysql.state").write_text("a model")
    s = settings_from_args(["eth0", "--ctl-socket", str(tmp_path / "x.ctrl"), "--instance", "mysql",
                            "--pin-root", str(tmp_path / "lib"), "--state-dir", str(state)])
    with pytest.raises(HdslbError) as e:
        down_offline(s)
    assert str(victim) in e.value.message and "bpffs" in e.value.message, e.value.message
    assert (victim / "ibdata1").read_text() == "precious" and (state / "mysql.state").exists()


def test_a_pin_root_that_is_not_a_bpffs_is_never_mounted_over_nor_cleaned(tmp_path, monkeypatch):
    """`hdslbd eth0 --pin-root /run/hdslb` (one level short of /run/hdslb/bpffs) or `--pin-root /var/lib`: a pin root
    not on a bpffs was made one by mounting a bpffs over it, whatever it held: the instance's state files and locks
    (or a system directory) vanished under the mount for every process until someone unmounted it. A non-empty
    directory is refused instead, naming it; an empty one is still mounted. And a start failing there no longer
    removes PIN_ROOT/INSTANCE, which is no pin directory of ours off a bpffs."""
    from hdslb.fastpath import decap, loader

    mounted = []
    monkeypatch.setattr(loader.subprocess, "run", lambda argv, check: mounted.append(argv[-1]))
    monkeypatch.setattr(decap, "_in_private_mount_ns", lambda: False)
    busy = tmp_path / "hdslb"
    (busy / "state").mkdir(parents=True)
    with pytest.raises(OSError) as e:
        loader.ensure_bpffs(str(busy))
    assert e.value.errno == errno.ENOTEMPTY and str(busy) in e.value.strerror and mounted == [], e.value
    loader.ensure_bpffs(str(tmp_path / "empty"))
    assert mounted == [str(tmp_path / "empty")]
    (busy / "inst").mkdir()
    (busy / "inst" / "keep").write_text("not a pin")
    loader.FastPath(str(busy / "inst")).unpin()
    assert (busy / "inst" / "keep").exists()
