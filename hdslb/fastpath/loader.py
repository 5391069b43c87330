"""Compile the XDP program with bcc, pin its maps under a per-instance bpffs directory, attach and detach it.

This module and maps.py are the only places that import bcc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hdslb.fastpath import abi

log = logging.getLogger("hdslb.fastpath")

DEFAULT_PIN_ROOT = "/run/hdslb/bpffs"
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
CONN_TABLES = ("percpu", "shared")  # --conn-table: a value per CPU (the default), or one for all
BPF_FS_MAGIC = "bpf"


@dataclass
class Sizes:
    """Map capacities, passed to the compiler as -D flags. hdslbd sets max_services/max_dests from --max-services
    and --max-dests (the Balancer hands out service ids and dest slots below them)."""

    max_conns: int = 262144
    max_services: int = 4096
    max_dests: int = 65536
    max_local: int = 4096
    max_routes: int = 131072
    max_neigh: int = 16384
    max_ifaces: int = 64
    max_hash_cells: int = 1 << 21  # sh/dh/mh/conhash tables of every service together (a u32 per cell)
    max_persist: int = 65536       # persistence templates (ipvsadm -p), LRU
    conn_table: str = "percpu"     # CONN_TABLES: the conn map's values per CPU, or one shared value per entry


def possible_cpus() -> int:
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


def conn_table_estimate(entries: int, ncpus: int, table: str = "percpu") -> int:
    """Bytes the kernel locks for a preallocated LRU hash of `entries` conn entries (htab_map_mem_usage): per
    entry a 48-byte element header and the key, then per CPU table a pointer to the per-CPU value and the value
    once per *possible* CPU, per shared table the value once, inline; a bucket head (16 B) per power-of-two
    bucket. Per-CPU values make it grow with the CPU count: ~256 B an entry on 2 CPUs, ~2.4 KB on 32, ~4.7 KB
    on 64; shared, ~180 B whatever the count."""
    n_buckets = 1 << max(0, (entries - 1).bit_length())
    key, val = (abi.CONN_KEY_SIZE + 7) // 8 * 8, (abi.CONN_VAL_SIZE + 7) // 8 * 8
    per_entry = 48 + key + (val if table == "shared" else 8 + val * ncpus)
    return entries * per_entry + n_buckets * 16


def conn_table_advice(entries: int, ncpus: int, table: str, mem_total: int) -> str | None:
    """A warning when a per-CPU conn table takes a large share of the machine's memory (a DPVS config's
    conn_pool_size of 2^21 is ~9 GiB with per-CPU values on 64 CPUs), saying what the shared one would take."""
    if table != "percpu" or mem_total <= 0:
        return None
    need = conn_table_estimate(entries, ncpus)
    if need < mem_total // 10:
        return None
    return (f"the connection table takes {need / 2**30:.1f} GiB ({100 * need / mem_total:.0f}% of memory): its "
            f"values are per CPU on {ncpus} possible CPUs; --conn-table shared would take "
            f"{conn_table_estimate(entries, ncpus, 'shared') / 2**30:.1f} GiB, a smaller --max-conns (conn_pool_size) "
            f"less")


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _fdinfo_int(fd: int, field: str) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _fd_memlock(fd: int) -> int | None:
    return _fdinfo_int(fd, "memlock")


def _mount_type(path: str) -> str | None:
    """Filesystem type of the mount point exactly at `path`, from this process's mountinfo."""
    real = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if fields[4] == real:
                found = right.split()[0]
    return found


def ensure_bpffs(root: str) -> None:
    """Make `root` a bpffs mount if it is not one already.

    Inside `ip netns exec` /sys is remounted, so /sys/fs/bpf is not usable there; a bpffs mounted under
    /run before `ip netns exec` runs is inherited, so pins made through it outlive this process.
    """
    os.makedirs(root, exist_ok=True)
    if _mount_type(root) == BPF_FS_MAGIC:
        return
    subprocess.run(["mount", "-t", "bpf", "bpf", root], check=True)
    log.info("mounted bpffs at %s", root)


def _libbcc():
    from bcc import libbcc

    lib = libbcc.lib
    lib.bcc_create_map.restype = ctypes.c_int
    lib.bcc_create_map.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.bpf_obj_pin.restype = ctypes.c_int
    lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.bpf_obj_get.restype = ctypes.c_int
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    return lib


class FastPath:
    """One compiled instance of bpf/hdslb_xdp.c with its pinned maps."""

    def __init__(self, pin_dir: str, sizes: Sizes | None = None, bpf_dir: Path = abi.BPF_DIR):
        self.pin_dir = pin_dir
        self.sizes = sizes or Sizes()
        self.bpf_dir = Path(bpf_dir)
        self.bpf = None
        self.fn = None
        self.conn_memlock: int | None = None  # kernel memory of the conn table, from fdinfo, after load()
        self.attached: dict[str, int] = {}  # ifname -> XDP flags used

    @property
    def prog_fd(self) -> int:
        return self.fn.fd

    def cflags(self, conn_fd: int, ncpus: int) -> list[str]:
        s = self.sizes
        return [
            f"-I{self.bpf_dir / 'include'}",
            f'-DPIN_DIR="{self.pin_dir}"',
            f"-DCONN_MAP_FD={conn_fd}",
            f"-DHDSLB_NR_CPUS={ncpus}",
            f"-DMAX_CONNS={s.max_conns}",
            f"-DMAX_SERVICES={s.max_services}",
            f"-DMAX_DESTS={s.max_dests}",
            f"-DMAX_LOCAL={s.max_local}",
            f"-DMAX_ROUTES={s.max_routes}",
            f"-DMAX_NEIGH={s.max_neigh}",
            f"-DMAX_IFACES={s.max_ifaces}",
            f"-DMAX_HASH_CELLS={s.max_hash_cells}",
            f"-DMAX_PERSIST={s.max_persist}",
            *(["-DCONN_SHARED"] if s.conn_table == "shared" else []),
            "-Wno-unused-function",
        ]

    def has_pins(self) -> bool:
        return os.path.exists(os.path.join(self.pin_dir, "conn_map"))

    def load(self, adopt: bool = False) -> None:
        """Compile and load the program.

        adopt=False starts clean: this instance's old pins are removed and every map is created empty.
        adopt=True keeps the pinned maps (connections, counters, tables) of a previous daemon or program
        version and compiles the new program against them, so forwarding state survives.
        """
        from bcc import BPF

        ensure_bpffs(os.path.dirname(self.pin_dir.rstrip("/")) or "/")
        lib = _libbcc()
        conn_pin = os.path.join(self.pin_dir, "conn_map").encode()
        table = self.sizes.conn_table
        if table not in CONN_TABLES:
            raise ValueError(f"conn table {table!r}: expected one of {', '.join(CONN_TABLES)}")
        map_type = BPF_MAP_TYPE_LRU_HASH if table == "shared" else BPF_MAP_TYPE_LRU_PERCPU_HASH
        if adopt and self.has_pins():
            conn_fd = lib.bpf_obj_get(conn_pin)
            if conn_fd < 0:
                raise OSError(ctypes.get_errno(), f"cannot open pinned connection map {conn_pin.decode()}")
            pinned = _fdinfo_int(conn_fd, "map_type")
            if pinned is not None and pinned != map_type:
                os.close(conn_fd)
                have = "shared" if pinned == BPF_MAP_TYPE_LRU_HASH else "percpu"
                raise RuntimeError(f"the pinned connection table in {self.pin_dir} is --conn-table {have}, not "
                                   f"{table}: start with --fresh to discard its connections and change it")
        else:
            if os.path.isdir(self.pin_dir):
                shutil.rmtree(self.pin_dir)
            os.makedirs(self.pin_dir)
            conn_fd = self._create_conn_map(lib, map_type, conn_pin)
        try:
            try:
                self.bpf = BPF(src_file=str(self.bpf_dir / "hdslb_xdp.c"),
                               cflags=self.cflags(conn_fd, possible_cpus()))
            except Exception as e:
                if adopt:
                    raise RuntimeError(f"cannot compile against the pinned maps in {self.pin_dir} (a map layout "
                                       f"or size changed?): {e}; start with --fresh to discard that state") from e
                raise
            self.fn = self.bpf.load_func("xdp_main", BPF.XDP)
            self.conn_memlock = _fd_memlock(conn_fd)
        finally:
            os.close(conn_fd)
        if self.conn_memlock:
            log.info("connection table: %d entries, %.1f MiB of kernel memory (%d B an entry, %s)",
                     self.sizes.max_conns, self.conn_memlock / 2**20, self.conn_memlock // max(1, self.sizes.max_conns),
                     f"values per CPU on {possible_cpus()} possible CPUs" if table == "percpu" else "one shared value")
        self._check_abi()

    def _create_conn_map(self, lib, map_type: int, conn_pin: bytes) -> int:
        """Create and pin an empty conn map; warn first when a per-CPU one takes much of the memory."""
        table, entries = self.sizes.conn_table, self.sizes.max_conns
        advice = conn_table_advice(entries, possible_cpus(), table, _mem_total())
        if advice:
            log.warning("%s", advice)
        conn_fd = lib.bcc_create_map(map_type, b"conn_map", abi.CONN_KEY_SIZE, abi.CONN_VAL_SIZE, entries, 0)
        if conn_fd < 0:
            need = conn_table_estimate(entries, possible_cpus(), table)
            per = (f"on {possible_cpus()} possible CPUs (values are per CPU; --conn-table shared keeps one)"
                   if table == "percpu" else "(one shared value an entry)")
            raise OSError(-conn_fd, f"cannot create the connection map: {entries} entries need "
                                    f"~{need / 2**20:.0f} MiB of kernel memory {per}: "
                                    f"{os.strerror(-conn_fd)}; lower --max-conns (conn_pool_size)")
        if lib.bpf_obj_pin(conn_fd, conn_pin) != 0:
            os.close(conn_fd)
            raise OSError(ctypes.get_errno(), f"cannot pin the connection map under {self.pin_dir}")
        return conn_fd

    def _check_abi(self) -> None:
        t = self.bpf["conn_map"]
        ks, vs = ctypes.sizeof(t.Key), ctypes.sizeof(t.sLeaf if hasattr(t, "sLeaf") else t.Leaf)
        if (ks, vs) != (abi.CONN_KEY_SIZE, abi.CONN_VAL_SIZE):
            raise RuntimeError(f"conn map ABI mismatch: C has key {ks}/value {vs}, abi.py says "
                               f"{abi.CONN_KEY_SIZE}/{abi.CONN_VAL_SIZE}")

    def table(self, name: str):
        return self.bpf[name]

    def attach(self, ifname: str, mode: str = "auto") -> str:
        """Attach to `ifname`, atomically replacing a program already there; returns the mode used."""
        from bcc import BPF

        if mode == "auto":
            mode = "generic" if is_veth(ifname) else "native"
        flags = XDP_FLAGS_DRV_MODE if mode == "native" else XDP_FLAGS_SKB_MODE
        BPF.attach_xdp(ifname, self.fn, flags)
        self.attached[ifname] = flags
        return mode

    def detach(self, ifname: str) -> None:
        from bcc import BPF

        flags = self.attached.pop(ifname, 0)
        BPF.remove_xdp(ifname, flags)

    def detach_all(self) -> None:
        for ifname in list(self.attached):
            try:
                self.detach(ifname)
            except Exception as e:  # the interface may be gone already
                log.warning("detach %s: %s", ifname, e)

    def unpin(self) -> None:
        if os.path.isdir(self.pin_dir):
            shutil.rmtree(self.pin_dir)

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


def is_veth(ifname: str) -> bool:
    """veth needs help for native XDP_TX/redirect (an XDP program on the peer), so auto picks generic for it."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.link("get", ifname=ifname)
    info = links[0].get_attr("IFLA_LINKINFO")
    return bool(info) and info.get_attr("IFLA_INFO_KIND") == "veth"
