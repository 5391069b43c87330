"""Network-namespace plumbing for the labs: ip/ethtool over subprocess, plus a Lab base that owns cleanup.

Every helper takes the *full* namespace name and runs `ip -n NS ...` or `ip netns exec NS ...`, so no
command here ever addresses an interface of the host's own namespace. `Lab` records every namespace,
process and temporary path it creates and removes them all in `teardown()`, which is idempotent and
tolerates a half-built lab.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

log = logging.getLogger("hdslb.lab")

DEFAULT_TIMEOUT = 10.0  # seconds; any single ip/ethtool/sysctl call that takes longer is a hung kernel
RUN_DIR = Path("/run/hdslb")
BPFFS_DIR = RUN_DIR / "bpffs"  # shared bpffs for pins that must survive `ip netns exec` (ENV-NOTES)
LABS_DIR = RUN_DIR / "labs"  # one JSON per live lab: who owns it, so `gc()` can clean after a crash
NETNS_DIR = Path("/run/netns")
PREFIX_RE = re.compile(r"^[a-z0-9]{1,8}$")  # default prefixes are "hl" + 4 hex digits
IFNAMSIZ = 16  # kernel limit including the NUL: names are at most 15 characters

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class CommandError(RuntimeError):
    """A lab command failed; the message carries the argv and whatever it printed, ready to read."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        what = "timed out" if returncode is None else f"exit {returncode}"
        out = (stderr or stdout).strip()
        super().__init__(f"{' '.join(self.argv)}: {what}" + (f": {out}" if out else ""))


# --------------------------------------------------------------------------- commands


def sh(argv: Sequence[str], *, check: bool = True, timeout: float = DEFAULT_TIMEOUT,
       env: Mapping[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command in the caller's namespace and capture its text output.

    Used only for commands that name their target (`ip -n NS ...`, `ip netns ...`, `mount`, `stat`).
    """
    argv = [str(a) for a in argv]
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            env=dict(env) if env is not None else None, input=input,
                            stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise CommandError(argv, None, _text(e.stdout), _text(e.stderr)) from None
    if check and cp.returncode != 0:
        raise CommandError(argv, cp.returncode, cp.stdout, cp.stderr)
    return cp


def ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """argv wrapped in `ip netns exec NS`; ip execs the command, so a Popen's pid is the command itself."""
    return ["ip", "netns", "exec", ns, *[str(a) for a in argv]]


def run(ns: str, argv: Sequence[str], check: bool = True, timeout: float = DEFAULT_TIMEOUT,
        env: Mapping[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run argv inside namespace ns and wait for it; CommandError on failure when check."""
    return sh(ns_argv(ns, argv), check=check, timeout=timeout, env=env, input=input)


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


# --------------------------------------------------------------------------- namespaces


def netns_list() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_add(name: str) -> None:
    sh(["ip", "netns", "add", name])
    sh(["ip", "-n", name, "link", "set", "lo", "up"])  # loopback down breaks local sockets in surprising ways


def netns_pids(name: str) -> list[int]:
    """Pids whose network namespace is `name` (what `ip netns pids` prints); [] if it is gone."""
    if not netns_exists(name):
        return []
    cp = sh(["ip", "netns", "pids", name], check=False)
    return [int(x) for x in cp.stdout.split() if x.isdigit()]


def netns_del(name: str) -> None:
    """Delete a namespace; its veths disappear once no process or socket holds it any more."""
    if netns_exists(name):
        sh(["ip", "netns", "del", name])


# --------------------------------------------------------------------------- links and addresses


def _check_ifname(name: str) -> str:
    if not name or len(name) >= IFNAMSIZ or "/" in name or " " in name:
        raise ValueError(f"bad interface name {name!r} (1..15 characters, no '/' or spaces)")
    return name


def veth_add(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """Create a veth pair with one end in each namespace.

    The request is sent from inside ns_a (`ip -n`) and the peer is created directly in ns_b, so neither
    end ever exists in the host namespace and host interface names can never collide.
    """
    sh(["ip", "-n", ns_a, "link", "add", _check_ifname(if_a), "type", "veth",
        "peer", "name", _check_ifname(if_b), "netns", ns_b])


def link_move(ns: str, ifname: str, to_ns: str, new_name: str | None = None) -> None:
    """Move an interface from one lab namespace to another, optionally renaming it on the way."""
    argv = ["ip", "-n", ns, "link", "set", ifname, "netns", to_ns]
    if new_name:
        argv += ["name", _check_ifname(new_name)]
    sh(argv)


def link_rename(ns: str, ifname: str, new_name: str) -> None:
    sh(["ip", "-n", ns, "link", "set", ifname, "down"])  # a running link cannot be renamed
    sh(["ip", "-n", ns, "link", "set", ifname, "name", _check_ifname(new_name)])


def link_up(ns: str, ifname: str) -> None:
    sh(["ip", "-n", ns, "link", "set", ifname, "up"])


def link_exists(ns: str, ifname: str) -> bool:
    return sh(["ip", "-n", ns, "link", "show", "dev", ifname], check=False).returncode == 0


def link_info(ns: str, ifname: str) -> dict:
    """`ip -d -j link show` of one interface, as a dict (flags, address, master, xdp, ...)."""
    return json.loads(sh(["ip", "-d", "-j", "-n", ns, "link", "show", "dev", ifname]).stdout)[0]


def link_mac(ns: str, ifname: str) -> str:
    return link_info(ns, ifname)["address"]


def links(ns: str) -> list[str]:
    return [li["ifname"] for li in json.loads(sh(["ip", "-j", "-n", ns, "link", "show"]).stdout)]


def bridge_add(ns: str, name: str = "br0") -> None:
    # No STP and no forwarding delay: ports forward as soon as they are up, so labs are ready at once.
    sh(["ip", "-n", ns, "link", "add", _check_ifname(name), "type", "bridge",
        "stp_state", "0", "forward_delay", "0"])
    link_up(ns, name)


def bridge_attach(ns: str, bridge: str, ifname: str) -> None:
    sh(["ip", "-n", ns, "link", "set", ifname, "master", bridge])


def addr_add(ns: str, ifname: str, cidr: str) -> None:
    argv = ["ip", "-n", ns, "addr", "add", cidr, "dev", ifname]
    if ":" in cidr:
        argv.append("nodad")  # usable at once, no 1 s tentative state
    sh(argv)


def addrs(ns: str, ifname: str, family: int = socket.AF_INET) -> list[str]:
    """Addresses on ifname as 'a.b.c.d/len' strings."""
    fam = "-4" if family == socket.AF_INET else "-6"
    info = json.loads(sh(["ip", fam, "-j", "-n", ns, "addr", "show", "dev", ifname]).stdout)
    return [f"{a['local']}/{a['prefixlen']}" for i in info for a in i.get("addr_info", [])]


def route_add(ns: str, dst: str, via: str | None = None, dev: str | None = None) -> None:
    argv = ["ip", "-n", ns, "route", "add", dst]
    if via:
        argv += ["via", via]
    if dev:
        argv += ["dev", dev]
    sh(argv)


def offloads_off(ns: str, ifname: str) -> None:
    """Turn off checksum/segmentation offloads on a lab veth end.

    Why: XDP rewrites packets after the stack left checksums to "hardware" (the far end then counts
    checksum errors), and GSO super-packets cannot be redirected between veths (ENV-NOTES). Features a
    device cannot change are reported by ethtool and ignored here.
    """
    cp = run(ns, ["ethtool", "-K", ifname, "tx", "off", "tso", "off", "gso", "off", "gro", "off"],
             check=False)
    if cp.returncode != 0:
        log.debug("ethtool -K %s in %s: %s", ifname, ns, (cp.stderr or cp.stdout).strip())


def offloads(ns: str, ifname: str) -> dict[str, bool]:
    """The device's features as ethtool -k reports them ('tx-checksumming' -> False, ...)."""
    out = run(ns, ["ethtool", "-k", ifname]).stdout
    feats = {}
    for line in out.splitlines()[1:]:
        name, _, rest = line.strip().partition(": ")
        if rest:
            feats[name] = rest.startswith("on")
    return feats


def sysctl(ns: str, settings: Mapping[str, object]) -> None:
    """Write sysctls inside ns (net.* keys are per namespace); one exec for the whole batch."""
    if settings:
        run(ns, ["sysctl", "-q", "-w", *[f"{k}={v}" for k, v in settings.items()]])


def xdp_pass_attach(ns: str, ifname: str, generic: bool = False, detach: bool = False) -> None:
    """Attach (or detach) the bare XDP_PASS program to ifname inside ns (see hdslb.fastpath.xdp_pass)."""
    argv = [sys.executable, "-m", "hdslb.fastpath.xdp_pass", ifname]
    if generic:
        argv.append("--generic")
    if detach:
        argv.append("--detach")
    run(ns, argv, env=package_env())


# --------------------------------------------------------------------------- in-namespace sockets and waits


def ns_socket(ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM, proto: int = 0) -> socket.socket:
    """A socket created inside namespace ns, usable from this process (a socket keeps its netns for life).

    setns(CLONE_NEWNET) only moves the calling thread, so a short-lived helper thread does it and the
    rest of the process never leaves the host namespace. Note an open socket keeps the namespace alive
    after `ip netns del`: close it before expecting the lab's links to vanish.
    """
    box: dict = {}

    def work():
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
                box["sock"] = socket.socket(family, type, proto)
            finally:
                os.close(fd)
        except BaseException as e:  # handed to the caller's thread
            box["err"] = e

    t = threading.Thread(target=work, name=f"setns-{ns}")
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["sock"]


_LISTEN_STATES = {"tcp": "0A", "udp": "07"}  # TCP_LISTEN; UDP sockets sit in TCP_CLOSE (7) once bound


def listening(pid: int, port: int, proto: str = "tcp") -> bool:
    """Whether the netns of `pid` has a socket bound/listening on port (reads /proc/PID/net/{proto,proto6})."""
    want = f"{port:04X}"
    for fam in ("", "6"):
        try:
            lines = Path(f"/proc/{pid}/net/{proto}{fam}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[1].rsplit(":", 1)[1] == want and f[3] == _LISTEN_STATES[proto]:
                return True
    return False


def wait_listening(proc: subprocess.Popen, port: int, proto: str = "tcp", timeout: float = 5.0,
                   what: str = "", log_path: str | Path | None = None) -> None:
    """Poll until proc's namespace has port open; fail early, with the log's tail, if proc dies first."""
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            raise RuntimeError(f"{what or proc.args} exited with {rc} before listening on {proto}/{port}"
                               + _tail(log_path))
        if listening(proc.pid, port, proto):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what or proc.args} not listening on {proto}/{port} after {timeout:.0f} s"
                               + _tail(log_path))
        time.sleep(0.02)


def _tail(path, n: int = 20) -> str:
    if not path:
        return ""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return ""
    return "\n" + "\n".join(lines) if lines else ""


# --------------------------------------------------------------------------- environment


def repo_root() -> Path:
    """Directory holding the hdslb package, for PYTHONPATH of commands run inside namespaces."""
    return Path(__file__).resolve().parents[2]


def package_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ plus PYTHONPATH reaching this checkout, so `python -m hdslb...` works in any namespace."""
    env = dict(os.environ)
    root = str(repo_root())
    pp = env.get("PYTHONPATH", "")
    if root not in pp.split(os.pathsep):
        env["PYTHONPATH"] = root + (os.pathsep + pp if pp else "")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def ensure_bpffs(path: Path = BPFFS_DIR) -> Path:
    """Make `path` a bpffs mount in this mount namespace; never unmounted (it is shared by every lab).

    Mounted before any `ip netns exec`, it is inherited by commands run through it (which remount /sys,
    hiding /sys/fs/bpf), so a daemon's pins survive restarts of the daemon.
    """
    path.mkdir(parents=True, exist_ok=True)
    # Serialised: two labs starting at once would otherwise stack two bpffs instances on one path.
    with open(path.parent / ".bpffs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fstype = sh(["stat", "-f", "-c", "%T", str(path)]).stdout.strip()
        if fstype != "bpf_fs":
            sh(["mount", "-t", "bpf", "bpf", str(path)])
    return path


def require_root() -> None:
    if os.geteuid() != 0:
        raise PermissionError("the netns lab needs root (namespaces, veths, XDP)")
    for tool in ("ip", "ethtool", "sysctl"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"the netns lab needs `{tool}` on PATH")


# --------------------------------------------------------------------------- process helpers


def _proc_start_time(pid: int) -> int | None:
    """Start time in clock ticks (field 22 of /proc/PID/stat): tells a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    if pid <= 1 or pid == os.getpid():
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_process(proc: subprocess.Popen, timeout: float = 3.0, sig: int = signal.SIGTERM) -> int | None:
    """Ask proc to stop with sig, SIGKILL it after timeout; returns its exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


# --------------------------------------------------------------------------- the Lab base


def _fresh_prefix() -> str:
    """'hl' + 4 random hex digits, not used by any existing namespace or lab record."""
    taken = {n.split("-", 1)[0] for n in netns_list()}
    while True:
        prefix = f"hl{secrets.token_hex(2)}"
        if prefix not in taken and not (LABS_DIR / f"{prefix}.json").exists():
            return prefix


class Lab:
    """Bookkeeping every topology shares: a unique prefix, owned namespaces, processes and paths.

    Subclasses implement `_build()`; `setup()` calls it and tears everything down if it raises.
    `teardown()` may be called any number of times, at any stage of construction.
    """

    def __init__(self, prefix: str | None = None, keep_workdir: bool | None = None):
        self.prefix = prefix or _fresh_prefix()
        if not PREFIX_RE.match(self.prefix):
            # Namespace, pin and socket names embed it; keep it short and shell-safe.
            raise ValueError(f"lab prefix {self.prefix!r}: 1..8 characters of [a-z0-9]")
        self.namespaces: list[str] = []  # created by us, in creation order
        self.procs: list[subprocess.Popen] = []  # spawned by us, still to be stopped
        self._stoppers: list = []  # callables run first at teardown (servers stop gracefully)
        self._paths: list[Path] = []  # files/dirs removed at teardown
        self.workdir: Path | None = None
        # HDSLB_LAB_KEEP=1 keeps logs and configs after teardown, for post-mortems.
        self.keep_workdir = bool(os.environ.get("HDSLB_LAB_KEEP")) if keep_workdir is None else keep_workdir
        self._up = False
        self._torn_down = False
        self._atexit = False

    # -- names

    def ns(self, role: str) -> str:
        """Full namespace name for a role ('cl', 'lb', 'rs1', 'sw')."""
        return f"{self.prefix}-{role}"

    @property
    def record_path(self) -> Path:
        return LABS_DIR / f"{self.prefix}.json"

    # -- lifecycle

    def setup(self):
        if self._up:
            return self
        require_root()
        ensure_bpffs()
        if any(n.startswith(self.prefix + "-") for n in netns_list()):
            raise FileExistsError(f"namespaces with prefix {self.prefix}- already exist (gc() cleans dead labs)")
        self._torn_down = False
        if not self._atexit:  # covers a lab left open when the interpreter exits normally
            atexit.register(self.teardown)
            self._atexit = True
        try:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"hdslb-{self.prefix}-"))
            self.workdir.chmod(0o755)  # nginx workers run as nobody and read files below it
            self._record()
            self._build()
        except BaseException:
            self.teardown()
            raise
        self._up = True
        return self

    def _build(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        """Stop what we started, delete our namespaces and paths. Safe to repeat; never raises."""
        if self._torn_down:
            return
        errors = []
        for stop in reversed(self._stoppers):
            try:
                stop()
            except Exception as e:  # keep going: a stuck server must not leak namespaces
                errors.append(f"stop {stop}: {e}")
        self._stoppers.clear()
        for proc in reversed(self.procs):
            try:
                stop_process(proc)
            except Exception as e:
                errors.append(f"stop pid {proc.pid}: {e}")
        self.procs.clear()
        for ns in reversed(self.namespaces):
            # Anything still living in our namespaces was started there by us or by our children
            # (nginx workers, a daemon's helpers): kill those pids, or the namespace outlives `del`.
            for pid in netns_pids(ns):
                _kill_pid(pid)
            try:
                netns_del(ns)
            except Exception as e:
                errors.append(f"netns del {ns}: {e}")
        self.namespaces.clear()
        for p in reversed(self._paths):
            _remove(p)
        self._paths.clear()
        if self.workdir is not None and not self.keep_workdir:
            _remove(self.workdir)
        _remove(self.record_path)
        if self._atexit:
            atexit.unregister(self.teardown)  # drop the reference: test sessions make many labs
            self._atexit = False
        self._up = False
        self._torn_down = True
        if errors:
            log.warning("lab %s teardown: %s", self.prefix, "; ".join(errors))

    def __enter__(self):
        return self.setup()

    def __exit__(self, *exc):
        self.teardown()
        return False

    # -- creation helpers that also record ownership

    def add_netns(self, role: str, sysctls: Mapping[str, object] | None = None) -> str:
        name = self.ns(role)
        self.namespaces.append(name)  # recorded first: a half-made namespace is still ours to delete
        netns_add(name)
        if sysctls:
            sysctl(name, sysctls)
        return name

    def add_path(self, path: str | Path) -> Path:
        """Remove this file or directory at teardown."""
        p = Path(path)
        self._paths.append(p)
        return p

    def on_teardown(self, fn) -> None:
        """Run fn() first thing at teardown (servers use it to stop gracefully)."""
        self._stoppers.append(fn)

    def spawn(self, ns: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              log: str | Path | None = None, cwd: str | Path | None = None) -> subprocess.Popen:
        """Start argv inside ns in the background, stdout+stderr to `log` (default: workdir/<argv0>.log).

        The Popen's pid is the command itself (ip netns exec execs it) and is stopped at teardown.
        A new session keeps a terminal's Ctrl-C away from it, so teardown stops it in order.
        """
        if ns not in self.namespaces:
            raise ValueError(f"{ns} is not a namespace of lab {self.prefix}")
        if log is None:
            assert self.workdir is not None
            log = self.workdir / f"{ns}-{Path(str(argv[0])).name}-{len(self.procs)}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(ns_argv(ns, argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=dict(env) if env is not None else None,
                                    cwd=cwd, start_new_session=True)
        proc.log_path = Path(log)  # type: ignore[attr-defined]  # for error messages
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 3.0, sig: int = signal.SIGTERM) -> int | None:
        """Stop one spawned process now (SIGTERM, then SIGKILL) and forget it."""
        rc = stop_process(proc, timeout, sig)
        if proc in self.procs:
            self.procs.remove(proc)
        return rc

    # -- crash recovery

    def _record(self) -> None:
        LABS_DIR.mkdir(parents=True, exist_ok=True)
        self.record_path.write_text(json.dumps({
            "prefix": self.prefix, "kind": type(self).__name__, "owner_pid": os.getpid(),
            "owner_start": _proc_start_time(os.getpid()), "workdir": str(self.workdir),
        }))


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError as e:
        log.warning("cannot remove %s: %s", p, e)


def gc(dry_run: bool = False, only: Iterable[str] | None = None) -> list[str]:
    """Remove labs whose owning process is gone (a killed test run); returns the prefixes cleaned.

    Only labs with a record under /run/hdslb/labs are touched, so namespaces this code did not create
    are never deleted. `only` limits the sweep to those prefixes.
    """
    only = set(only) if only is not None else None
    cleaned = []
    if not LABS_DIR.is_dir():
        return cleaned
    for rec in sorted(LABS_DIR.glob("*.json")):
        try:
            info = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        prefix = info.get("prefix", "")
        if prefix != rec.stem or (only is not None and prefix not in only):
            continue
        owner = int(info.get("owner_pid", 0))
        if owner and _proc_start_time(owner) == info.get("owner_start"):
            continue  # owner still alive: its lab, not garbage
        cleaned.append(prefix)
        if dry_run:
            continue
        for ns in [n for n in netns_list() if n.startswith(prefix + "-")]:
            for pid in netns_pids(ns):
                _kill_pid(pid)
            try:
                netns_del(ns)
            except CommandError as e:
                log.warning("gc %s: %s", ns, e)
        ctrl = RUN_DIR / f"{prefix}.ctrl"
        _remove(ctrl)
        wd = info.get("workdir")
        if wd and Path(wd).name.startswith(f"hdslb-{prefix}-"):
            _remove(Path(wd))
        _remove(rec)
    return cleaned


def pids_alive(pids: Iterable[int]) -> list[int]:
    """The subset of pids that still exist (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive
