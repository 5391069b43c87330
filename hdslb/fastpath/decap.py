"""The real-server side of TUNNEL mode: load, attach, pin, inspect and remove bpf/hdslb_decap.c.

The balancer's TUNNEL mode sends each client packet to the real server inside an outer IPv4 or IPv6 header
(IPIP, IPv6-in-IPv6, and the mixed 4in6/6in4). A real server with the kernel's ipip/ip6_tunnel modules can
decapsulate with a tunnel device; where those are missing, `hdslb-ctl decap up IFACE` attaches this small
XDP program instead. It strips the outer header of tunnel packets addressed to one of this host's addresses
(the `decap_addrs` map) and passes the inner packet to the kernel.

One instance per (network namespace, interface), pinned under PIN_ROOT/decap/<netns>/<ifname>/:
  prog          the XDP program (what `down` and `show` compare with the interface's attached program)
  decap_addrs   outer destinations decapsulated for
  decap_stats   per-CPU counters (bpf/include/decap_abi.h, enum decap_counter)
The netlink attachment and the pins outlive the process that made them. `show` and `down` read the pins
with plain bpf(2) calls, so only `up` pays for a compile.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import ipaddress
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from hdslb.fastpath import abi

log = logging.getLogger("hdslb.fastpath.decap")

DEFAULT_PIN_ROOT = "/run/hdslb/bpffs"  # same bpffs as the balancer: mounted before `ip netns exec` (ENV-NOTES)
SOURCE = abi.BPF_DIR / "hdslb_decap.c"
ABI_HEADER = abi.BPF_DIR / "include" / "decap_abi.h"
PROG_PIN = "prog"
MAPS = ("decap_addrs", "decap_stats")
MAX_ADDRS = 1024  # -DMAX_DECAP_ADDRS: a host's own addresses, with a wide margin
XDP_MODES = ("auto", "native", "generic")
HOST_ADDRS = ("all", "iface", "none")  # which of this host's addresses `up` decapsulates for

AF_TAG = {4: 4, 6: 6}  # DECAP_AF_INET / DECAP_AF_INET6
KEY = struct.Struct("=B3x16s")  # struct decap_addr_key: u8 af, 3 pad, 16-byte address (network order)
VALUE_SIZE = 4  # __u32 (unused, 1)

# linux/if_link.h XDP_FLAGS_* and the statfs magic of bpffs (linux/magic.h BPF_FS_MAGIC)
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
BPF_FS_MAGIC = 0xCAFE4A11
INIT_NET_INO = 0xEFFFFFF9  # PROC_NET_INIT_INO: the inode of the initial network namespace


class DecapError(Exception):
    """Something an operator can act on; the message says what and how."""


# --------------------------------------------------------------------------- ABI


def counter_names() -> list[str]:
    """Counter names in index order, lower-case without DECAP_CNT_, read from decap_abi.h."""
    text = ABI_HEADER.read_text()
    m = re.search(r"enum\s+decap_counter\s*\{(.*?)\};", text, re.S)
    if not m:
        raise RuntimeError(f"enum decap_counter not found in {ABI_HEADER}")
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    names = [item.split("=")[0].strip() for item in body.split(",") if item.strip()]
    if names[-1] != "DECAP_CNT_MAX":
        raise RuntimeError(f"enum decap_counter in {ABI_HEADER} must end with DECAP_CNT_MAX")
    return [n[len("DECAP_CNT_"):].lower() for n in names[:-1]]


def pack_key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return KEY.pack(AF_TAG[addr.version], addr.packed.ljust(16, b"\0"))


def unpack_key(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    af, a = KEY.unpack(raw)
    return ipaddress.IPv4Address(a[:4]) if af == AF_TAG[4] else ipaddress.IPv6Address(a)


def parse_addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An --addr value; ValueError with the reason when it is not a usable unicast address."""
    a = ipaddress.ip_address(text.strip("[]"))
    if a.is_multicast or a.is_unspecified or a == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{text} is not a unicast address")
    if a.version == 6 and a.ipv4_mapped is not None:
        raise ValueError(f"{text} is IPv4-mapped, never a packet's destination: give {a.ipv4_mapped}")
    return a


# --------------------------------------------------------------------------- bpf(2) through libbcc


def _lib():
    from bcc import libbcc

    lib = libbcc.lib
    lib.bpf_obj_pin.restype = ctypes.c_int
    lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.bpf_obj_get.restype = ctypes.c_int
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_obj_get_info.restype = ctypes.c_int
    lib.bpf_obj_get_info.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    return lib


def _errno_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def obj_get(path: str) -> int:
    fd = _lib().bpf_obj_get(path.encode())
    if fd < 0:
        raise _errno_error(f"cannot open pinned object {path}")
    return fd


def obj_pin(fd: int, path: str) -> None:
    if _lib().bpf_obj_pin(fd, path.encode()) != 0:
        raise _errno_error(f"cannot pin {path}")


def obj_id(fd: int) -> int:
    """The kernel id of a program or map (second u32 of bpf_prog_info / bpf_map_info)."""
    buf = ctypes.create_string_buffer(256)
    n = ctypes.c_uint32(len(buf))
    if _lib().bpf_obj_get_info(fd, buf, ctypes.byref(n)) != 0:
        raise _errno_error("BPF_OBJ_GET_INFO_BY_FD")
    return struct.unpack_from("=II", buf.raw)[1]


def possible_cpus() -> int:
    """Per-CPU values come back as one 8-byte-aligned slot per *possible* CPU."""
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


class PinnedMaps:
    """decap_addrs and decap_stats of one instance, opened from their pins (no compile needed)."""

    def __init__(self, pin_dir: str):
        self.pin_dir = pin_dir
        self.fds: dict[str, int] = {}
        try:
            for name in MAPS:
                self.fds[name] = obj_get(os.path.join(pin_dir, name))
        except OSError:
            self.close()
            raise
        self.names = counter_names()
        self.ncpus = possible_cpus()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def addrs(self) -> list:
        lib, fd = _lib(), self.fds["decap_addrs"]
        key, nxt = ctypes.create_string_buffer(KEY.size), ctypes.create_string_buffer(KEY.size)
        out = []
        if lib.bpf_get_first_key(fd, key, KEY.size) != 0:
            return out  # empty map
        while True:
            out.append(unpack_key(key.raw))
            if lib.bpf_get_next_key(fd, key, nxt) != 0:
                break
            ctypes.memmove(key, nxt, KEY.size)
        return sorted(out, key=lambda a: (a.version, a))

    def set_addrs(self, want: Iterable, prune: bool = True) -> None:
        """Make the map hold `want`: new entries first, then (prune) the stale ones, so no current address is
        ever missing for a packet in flight. prune=False only adds; a later call prunes."""
        lib, fd = _lib(), self.fds["decap_addrs"]
        want = set(want)
        if len(want) > MAX_ADDRS:
            raise DecapError(f"{len(want)} addresses to decapsulate for; at most {MAX_ADDRS} fit")
        one = ctypes.create_string_buffer(struct.pack("=I", 1), VALUE_SIZE)
        for a in sorted(want, key=lambda a: (a.version, a)):
            k = ctypes.create_string_buffer(pack_key(a), KEY.size)
            if lib.bpf_update_elem(fd, k, one, 0) != 0:
                raise _errno_error(f"cannot add {a} to decap_addrs")
        for a in (set(self.addrs()) - want) if prune else ():
            k = ctypes.create_string_buffer(pack_key(a), KEY.size)
            if lib.bpf_delete_elem(fd, k) != 0 and ctypes.get_errno() != errno.ENOENT:
                raise _errno_error(f"cannot remove {a} from decap_addrs")

    def per_cpu_counters(self) -> dict[str, list[int]]:
        lib, fd = _lib(), self.fds["decap_stats"]
        val = ctypes.create_string_buffer(8 * self.ncpus)
        out = {}
        for i, name in enumerate(self.names):
            k = ctypes.c_uint32(i)
            if lib.bpf_lookup_elem(fd, ctypes.byref(k), val) != 0:
                raise _errno_error(f"cannot read counter {name}")
            out[name] = list(struct.unpack(f"={self.ncpus}Q", val.raw))
        return out

    def counters(self) -> dict[str, int]:
        return {k: sum(v) for k, v in self.per_cpu_counters().items()}

    def zero(self) -> None:
        lib, fd = _lib(), self.fds["decap_stats"]
        val = ctypes.create_string_buffer(8 * self.ncpus)
        for i in range(len(self.names)):
            k = ctypes.c_uint32(i)
            if lib.bpf_update_elem(fd, ctypes.byref(k), val, 0) != 0:
                raise _errno_error("cannot zero the counters")


# --------------------------------------------------------------------------- the compiled program


class DecapProgram:
    """One compile of bpf/hdslb_decap.c whose maps live (or are adopted) under pin_dir."""

    def __init__(self, pin_dir: str, bpf_dir: Path = abi.BPF_DIR, max_addrs: int = MAX_ADDRS):
        self.pin_dir = pin_dir
        self.bpf_dir = Path(bpf_dir)
        self.max_addrs = max_addrs
        self.bpf = None
        self.fn = None

    def cflags(self) -> list[str]:
        return [
            f"-I{self.bpf_dir / 'include'}",
            f'-DPIN_DIR="{self.pin_dir}"',
            f"-DMAX_DECAP_ADDRS={self.max_addrs}",
            "-Wno-unused-function",
        ]

    def load(self) -> None:
        """Compile and load; maps already pinned under pin_dir are adopted (addresses and counters survive)."""
        from bcc import BPF

        os.makedirs(self.pin_dir, exist_ok=True)
        try:
            self.bpf = BPF(src_file=str(self.bpf_dir / "hdslb_decap.c"), cflags=self.cflags())
            self.fn = self.bpf.load_func("xdp_decap", BPF.XDP)
        except Exception as e:
            self.close()
            raise DecapError(f"cannot compile/load {self.bpf_dir / 'hdslb_decap.c'} with maps in {self.pin_dir}: {e}"
                             " (if a map layout changed, `hdslb-ctl decap down` the interface first)") from e

    @property
    def prog_fd(self) -> int:
        return self.fn.fd

    @property
    def prog_id(self) -> int:
        return obj_id(self.fn.fd)

    def table(self, name: str):
        return self.bpf[name]

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()  # closes our fds; the netlink attachment and the pins keep the objects alive
            self.bpf = None
            self.fn = None


# --------------------------------------------------------------------------- where things live


def netns_name() -> str:
    """This process's network namespace as a directory name: its `ip netns` name, 'init' for the initial
    namespace, else 'netns-<inode>' (a container's unnamed namespace)."""
    st = os.stat("/proc/self/ns/net")
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir():
        for p in sorted(netns_dir.iterdir()):
            try:
                s = p.stat()
            except OSError:
                continue
            if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
                return p.name
    return "init" if st.st_ino == INIT_NET_INO else f"netns-{st.st_ino}"


def check_ifname(ifname: str) -> str:
    if not ifname or len(ifname) > 15 or "/" in ifname or ifname in (".", "..") or any(c.isspace() for c in ifname):
        raise ValueError(f"bad interface name {ifname!r} (1..15 characters, no '/' or spaces)")
    return ifname


def instance_dir(ifname: str, pin_root: str = DEFAULT_PIN_ROOT, netns: str | None = None) -> str:
    return os.path.join(pin_root, "decap", netns or netns_name(), check_ifname(ifname))


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def is_bpffs(path: str) -> bool:
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def _in_private_mount_ns() -> bool:
    """True when this process has a mount namespace of its own that its parent does not share, as under
    `ip netns exec` (which unshares one per command): a mount made here disappears when the process exits."""
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink(f"/proc/{os.getppid()}/ns/mnt")
    except OSError:
        return False


def ensure_pin_root(pin_root: str) -> None:
    """Make sure pins under pin_root land in a bpffs that outlives this process. A pin root not made yet inside a
    bpffs (`--pin-root /run/hdslb/bpffs/site`, as hdslbd takes one) is made there: only its nearest existing
    directory can say where it will be (statfs of a missing path fails, which read as 'not a bpffs')."""
    if not os.path.exists(pin_root):
        above = os.path.dirname(os.path.abspath(pin_root))
        while not os.path.exists(above):
            above = os.path.dirname(above)
        if is_bpffs(above):
            os.makedirs(pin_root, exist_ok=True)
    if is_bpffs(pin_root):
        return
    if _in_private_mount_ns():
        raise DecapError(
            f"{pin_root} is not a bpffs mount, and this command runs in a private mount namespace (as under "
            f"`ip netns exec`) where a mount vanishes with the command and the pins with it; mount it once "
            f"in the host's mount namespace first: mkdir -p {pin_root} && mount -t bpf bpf {pin_root}")
    from hdslb.fastpath.loader import ensure_bpffs

    ensure_bpffs(pin_root)


@contextlib.contextmanager
def _locked(pin_root: str):
    """One decap up/down at a time per pin root (two at once on one interface would race on its pins): a flock
    on the pin root's directory itself. A lock file beside it failed wherever that parent takes no file: a pin
    root inside a bpffs (its regular files are refused, EPERM) or /sys/fs/bpf (sysfs, EACCES), so every decap
    command failed there. No pin root yet: nothing is pinned to race on (up makes it before locking)."""
    try:
        fd = os.open(pin_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- interfaces and addresses


def _ipr():
    from pyroute2 import IPRoute

    return IPRoute()


def ifindex(ifname: str) -> int | None:
    with _ipr() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
    return idx[0] if idx else None


def xdp_state(ifname: str) -> tuple[str | None, int | None]:
    """(mode, program id) attached to ifname; (None, None) when none is."""
    from hdslb.fastpath import xdp_pass

    return xdp_pass.query(ifname)


def link_names() -> list[str]:
    """Every interface of this network namespace, by name."""
    with _ipr() as ipr:
        return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]


def find_attached(prog_id: int) -> tuple[str, str] | None:
    """(interface, XDP mode) of this namespace that runs program prog_id, or None: an instance's interface renamed
    since `up` (ip link set name, a udev rule) still runs its program under the new name."""
    for name in link_names():
        try:
            mode, pid = xdp_state(name)
        except Exception:  # gone between the listing and the query
            continue
        if pid == prog_id:
            return name, mode
    return None


def host_addresses(which: str = "all", ifname: str | None = None) -> list:
    """This namespace's addresses a tunnel may be addressed to: every address (`all`) or ifname's (`iface`).

    Loopback and IPv6 link-local addresses are left out: a balancer cannot address a real server by them.
    Addresses on lo other than 127/8 and ::1 (VIPs, a real server's own address on lo) are kept.
    """
    if which == "none":
        return []
    out = set()
    with _ipr() as ipr:
        kw = {}
        if which == "iface":
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                raise DecapError(f"no interface {ifname!r} in network namespace {netns_name()}")
            kw["index"] = idx[0]
        for msg in ipr.get_addr(**kw):
            text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if not text:
                continue
            a = ipaddress.ip_address(text)
            if a.is_loopback or (a.version == 6 and a.is_link_local):
                continue
            out.add(a)
    return sorted(out, key=lambda a: (a.version, a))


# --------------------------------------------------------------------------- attach / detach


def _netlink_xdp(idx: int, fd: int, flags: int) -> None:
    with _ipr() as ipr:
        ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]})


def _nl_errno(e: Exception) -> int:
    return getattr(e, "code", 0) or 0


def attach(ifname: str, prog_fd: int, mode: str, current_mode: str | None, restore_fd: int | None = None) -> str:
    """Attach prog_fd to ifname, replacing our previous program atomically when the mode stays the same.

    auto keeps the mode already in use, else tries native and falls back to generic where the driver has no
    XDP. Changing mode means detaching first (the kernel never runs native and generic side by side); if the
    new mode then fails, restore_fd (our previous program) goes back in the old mode. Returns the mode used.
    """
    idx = ifindex(ifname)
    if idx is None:
        raise DecapError(f"no interface {ifname!r} in network namespace {netns_name()}")
    if mode == "auto":
        order = [current_mode] if current_mode in MODE_FLAGS else ["native", "generic"]
    else:
        order = [mode]
    detached = None
    if current_mode in MODE_FLAGS and current_mode != order[0]:
        _netlink_xdp(idx, -1, MODE_FLAGS[current_mode])
        detached = current_mode
    errors = []
    for m in order:
        try:
            _netlink_xdp(idx, prog_fd, MODE_FLAGS[m])
            return m
        except Exception as e:  # pyroute2 NetlinkError: code is the errno
            code = _nl_errno(e)
            errors.append(f"{m}: {os.strerror(code) if code else e}")
    msg = f"cannot attach XDP to {ifname}: " + "; ".join(errors)
    if detached and restore_fd is not None:
        try:
            _netlink_xdp(idx, restore_fd, MODE_FLAGS[detached])
            msg += f"; the previous decap program is attached again ({detached})"
        except Exception as e:
            msg += f"; the previous decap program could not be put back ({detached}: {e}): decap is OFF on {ifname}"
    raise DecapError(msg)


def detach(ifname: str, mode: str) -> None:
    idx = ifindex(ifname)
    if idx is not None and mode in MODE_FLAGS:
        _netlink_xdp(idx, -1, MODE_FLAGS[mode])


def pinned_prog_id(pin_dir: str) -> int | None:
    path = os.path.join(pin_dir, PROG_PIN)
    if not os.path.exists(path):
        return None
    fd = obj_get(path)
    try:
        return obj_id(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the three verbs


@dataclass
class DecapStatus:
    ifname: str
    netns: str
    pin_dir: str
    prog_id: int | None  # the pinned program
    attached_mode: str | None  # native / generic when *our* program is the one on the interface
    attached_prog_id: int | None  # whatever is on the interface (ours or another tool's)
    iface_exists: bool
    addrs: list = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    moved_to: str | None = None  # the interface running our program when it is not ifname (renamed since `up`)
    moved_mode: str | None = None

    @property
    def attached(self) -> bool:
        return self.attached_mode is not None

    def as_dict(self) -> dict:
        return {"ifname": self.ifname, "netns": self.netns, "pin_dir": self.pin_dir, "prog_id": self.prog_id,
                "attached": self.attached, "mode": self.attached_mode, "attached_prog_id": self.attached_prog_id,
                "iface_exists": self.iface_exists, "moved_to": self.moved_to, "addrs": [str(a) for a in self.addrs],
                "counters": dict(self.counters)}


def _require_root() -> None:
    if os.geteuid() != 0:
        raise DecapError("needs root (loading and attaching XDP needs CAP_BPF and CAP_NET_ADMIN)")


def up(ifname: str, mode: str = "auto", addrs: Sequence = (), host_addrs: str = "all",
       pin_root: str = DEFAULT_PIN_ROOT) -> DecapStatus:
    """Compile, fill decap_addrs, attach to ifname and pin; running it again refreshes the addresses and
    swaps the program in place, keeping the counters."""
    _require_root()
    check_ifname(ifname)
    if mode not in XDP_MODES:
        raise DecapError(f"unknown XDP mode {mode!r} (one of {', '.join(XDP_MODES)})")
    if host_addrs not in HOST_ADDRS:
        raise DecapError(f"unknown --host-addrs {host_addrs!r} (one of {', '.join(HOST_ADDRS)})")
    ns = netns_name()
    if ifindex(ifname) is None:
        raise DecapError(f"no interface {ifname!r} in network namespace {ns}")
    want = set(host_addresses(host_addrs, ifname)) | {parse_addr(str(a)) for a in addrs}
    if not want:
        where = {"all": f"network namespace {ns} has no usable address", "iface": f"{ifname} has no usable address",
                 "none": "--host-addrs none"}[host_addrs]
        raise DecapError(f"nothing to decapsulate for: {where} and no --addr was given")
    ensure_pin_root(pin_root)
    pin_dir = instance_dir(ifname, pin_root, ns)
    with _locked(pin_root):
        existed = os.path.isdir(pin_dir)
        old_id = pinned_prog_id(pin_dir) if existed else None
        cur_mode, cur_id = xdp_state(ifname)
        if cur_id is not None and cur_id != old_id:
            other = _instance_of(cur_id, pin_root, ns)
            if other is not None:
                raise DecapError(f"{ifname} runs the decap program of instance {other} (the interface was renamed "
                                 f"since `decap up {other}`): `hdslb-ctl decap down {other}` first")
            raise DecapError(f"{ifname} already runs XDP program id {cur_id} ({cur_mode}), which is not this "
                             f"decap instance's; remove it first (ip link set dev {ifname} xdp off), "
                             "one interface holds one XDP program")
        ours_mode = cur_mode if cur_id is not None else None
        prog, maps = DecapProgram(pin_dir), None
        new_pin = os.path.join(pin_dir, PROG_PIN + "_new")  # bpffs refuses '.' in pinned names
        try:
            prog.load()
            maps = PinnedMaps(pin_dir)
            # New addresses before the new program sees a packet; stale ones go once it is attached, so a
            # failed swap leaves the running program with at least its old list.
            maps.set_addrs(want, prune=False)
            if os.path.exists(new_pin):
                os.unlink(new_pin)
            obj_pin(prog.prog_fd, new_pin)
            restore_fd = obj_get(os.path.join(pin_dir, PROG_PIN)) if ours_mode else None
            try:
                used = attach(ifname, prog.prog_fd, mode, ours_mode, restore_fd)
            finally:
                if restore_fd is not None:
                    os.close(restore_fd)
            os.replace(new_pin, os.path.join(pin_dir, PROG_PIN))  # bpffs renames atomically
            maps.set_addrs(want)
            prog_id = prog.prog_id
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(new_pin)
            if not existed:
                _remove_instance_dir(pin_dir)
            raise
        finally:
            if maps is not None:
                maps.close()
            prog.close()
    log.info("decap on %s (%s XDP), prog id %d, pins %s", ifname, used, prog_id, pin_dir)
    return DecapStatus(ifname, ns, pin_dir, prog_id, used, prog_id, True,
                       sorted(want, key=lambda a: (a.version, a)))


def _instance_of(prog_id: int, pin_root: str, ns: str) -> str | None:
    """The interface name of this namespace's decap instance whose pinned program is prog_id, or None."""
    base = os.path.join(pin_root, "decap", ns)
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else ():
        try:
            if pinned_prog_id(os.path.join(base, name)) == prog_id:
                return name
        except OSError:
            continue
    return None


def down(ifname: str, pin_root: str = DEFAULT_PIN_ROOT) -> DecapStatus:
    """Detach our program from ifname (never another tool's) and remove the instance's pins."""
    _require_root()
    ns = netns_name()
    pin_dir = instance_dir(ifname, pin_root, ns)
    with _locked(pin_root):
        if not os.path.isdir(pin_dir):
            raise DecapError(f"no decap instance on {ifname} in network namespace {ns} (nothing pinned at {pin_dir})")
        st = _status(ifname, ns, pin_dir, read_maps=False)
        if st.attached:
            detach(ifname, st.attached_mode)
        elif st.moved_to is not None:
            detach(st.moved_to, st.moved_mode)
        elif st.attached_prog_id is not None:
            log.warning("%s runs XDP program id %s, not ours: left attached", ifname, st.attached_prog_id)
        _remove_instance_dir(pin_dir)
    return st


def _remove_instance_dir(pin_dir: str) -> None:
    shutil.rmtree(pin_dir, ignore_errors=True)
    # the namespace's directory once its last instance is gone, then `<pin root>/decap` once the last namespace's
    # is (each rmdir fails on a directory still in use, which stays)
    ns_dir = os.path.dirname(pin_dir)
    for d in (ns_dir, os.path.dirname(ns_dir)):
        try:
            os.rmdir(d)
        except OSError:
            break


def _status(ifname: str, ns: str, pin_dir: str, read_maps: bool = True) -> DecapStatus:
    prog_id = pinned_prog_id(pin_dir)
    exists = ifindex(ifname) is not None
    cur_mode, cur_id = xdp_state(ifname) if exists else (None, None)
    ours = cur_id is not None and cur_id == prog_id
    st = DecapStatus(ifname, ns, pin_dir, prog_id, cur_mode if ours else None, cur_id, exists)
    if prog_id is not None and not ours:
        st.moved_to, st.moved_mode = find_attached(prog_id) or (None, None)
    if read_maps:
        with PinnedMaps(pin_dir) as maps:
            st.addrs = maps.addrs()
            st.counters = maps.counters()
    return st


def show(ifname: str | None = None, pin_root: str = DEFAULT_PIN_ROOT) -> list[DecapStatus]:
    """Every decap instance of this network namespace (or the one on ifname)."""
    ns = netns_name()
    base = os.path.join(pin_root, "decap", ns)
    if ifname is not None:
        pin_dir = instance_dir(ifname, pin_root, ns)
        if not os.path.isdir(pin_dir):
            raise DecapError(f"no decap instance on {ifname} in network namespace {ns} (nothing pinned at {pin_dir})")
        names = [ifname]
    else:
        names = sorted(os.listdir(base)) if os.path.isdir(base) else []
    return [_status(n, ns, os.path.join(base, n)) for n in names]


def zero(ifname: str, pin_root: str = DEFAULT_PIN_ROOT) -> None:
    ns = netns_name()
    pin_dir = instance_dir(ifname, pin_root, ns)
    if not os.path.isdir(pin_dir):
        raise DecapError(f"no decap instance on {ifname} in network namespace {ns} (nothing pinned at {pin_dir})")
    with PinnedMaps(pin_dir) as maps:
        maps.zero()
