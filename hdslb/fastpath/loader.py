"""Compile the XDP program with bcc, pin its maps under a per-instance bpffs directory, attach and detach it.

This module and maps.py are the only places that import bcc.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hdslb.fastpath import abi

log = logging.getLogger("hdslb.fastpath")

DEFAULT_PIN_ROOT = "/run/hdslb/bpffs"
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
CONN_TABLES = ("percpu", "shared")  # the conn maps' kinds: a value per CPU, or one for all
CONN_TABLE_CHOICES = ("auto", *CONN_TABLES)  # --conn-table / conn_table: auto (the default) picks by the CPU count
# The most possible CPUs a per-CPU conn table is built for. The program walks every CPU's copy of a flow in loops
# clang unrolls at each place they are inlined, and the verifier walks them with a state per CPU seen so far: the
# program grows with the CPU count in size and with its square in the verifier's work. Measured (tests/bpf/
# test_many_cpus.py keeps it): xdp_main loads on up to 6 CPUs; on 7 its jumps no longer fit the 16 bits of an
# instruction's offset once the verifier has expanded it ("cannot be patched due to 16-bit range", ENOMEM), before
# the 1M-instruction limit that stopped it on 12. 4 keeps a margin for the program to grow. Above it auto picks the
# shared table and an explicit percpu is refused (its values would also take 48 B per CPU an entry: 3.2 KB on 64).
PERCPU_MAX_CPUS = 4


@dataclass
class Sizes:
    """Map capacities, passed to the compiler as -D flags. hdslbd sets max_services/max_dests from --max-services
    and --max-dests (the Balancer hands out service ids and dest slots below them)."""

    max_conns: int = 262144        # conn4_map: IPv4 connection entries (two a connection for FNAT/NAT/SNAT)
    max_conns6: int = 0            # conn6_map: IPv6 and NAT64 entries; 0: max_conns / 4 (conn6_entries)
    max_services: int = 4096
    max_dests: int = 65536
    max_local: int = 4096
    max_routes: int = 131072
    max_neigh: int = 16384
    max_ifaces: int = 64
    max_hash_cells: int = 1 << 21  # sh/dh/mh/conhash tables of every service together (a u32 per cell)
    max_persist: int = 65536       # persistence templates (ipvsadm -p), LRU
    conn_table: str = "percpu"     # CONN_TABLES: the conn maps' values per CPU, or one shared value per entry

    def conn6_entries(self) -> int:
        return self.max_conns6 or max(256, self.max_conns // 4)


def sweep_batch(table: str, ncpus: int) -> int:
    """Dead flows per BPF_PROG_RUN of hdslb_sweep: as many as fit the test run's packet (3.5 KB, 96 B a flow),
    fewer with many CPUs, whose per-CPU copies each flow's check walks. The verifier walks every flow of the batch
    and, in each, every CPU's copy with a state per CPU seen so far: its instructions grow with the square of the
    CPU count (measured, bpf tests' sizes: 32 flows take 975k of its 1M on 8 CPUs, 25 flows 888k on 9), so the
    batch shrinks with the square: 32 up to 8 CPUs, 25 on 9, 20 on 10, 16 on 11."""
    return 32 if table == "shared" else max(1, min(32, 2048 // max(1, ncpus) ** 2))


def possible_cpus() -> int:
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


def conn_table_refusal(asked: str, ncpus: int) -> str | None:
    """Why the conn table kind asked for cannot run on this many possible CPUs (None: it can)."""
    if asked != "percpu" or ncpus <= PERCPU_MAX_CPUS:
        return None
    return (f"this host has {ncpus} possible CPUs, more than the {PERCPU_MAX_CPUS} a per-CPU connection table is "
            f"built for (its program would be too large for the kernel's verifier): use --conn-table shared "
            f"(conn_table shared), or auto, which picks it")


def resolve_conn_table(asked: str, ncpus: int) -> str:
    """The conn table kind a start runs with: auto is percpu up to PERCPU_MAX_CPUS possible CPUs, shared above;
    percpu or shared as asked (percpu above the limit raises ValueError with conn_table_refusal's reason)."""
    if asked not in CONN_TABLE_CHOICES:
        raise ValueError(f"conn table {asked!r}: expected one of {', '.join(CONN_TABLE_CHOICES)}")
    why = conn_table_refusal(asked, ncpus)
    if why:
        raise ValueError(why)
    if asked == "auto":
        return "percpu" if ncpus <= PERCPU_MAX_CPUS else "shared"
    return asked


def conn_table_estimate(entries: int, ncpus: int, table: str = "percpu", family: int = 4) -> int:
    """Bytes the kernel locks for a preallocated LRU hash of `entries` conn entries (htab_map_mem_usage): per
    entry a 48-byte element header and the key, then per CPU table a pointer to the per-CPU value and the value
    once per *possible* CPU, per shared table the value once, inline; a bucket head (16 B) per power-of-two
    bucket. family 4 is conn4_map (16-byte keys, 48-byte values), 6 conn6_map (40, 72). Per-CPU values make it
    grow with the CPU count: conn4_map ~184 B an entry on 2 CPUs, ~1.6 KB on 32, ~3.2 KB on 64; shared, 128 B
    whatever the count."""
    n_buckets = 1 << max(0, (entries - 1).bit_length())
    ks, vs = (abi.CONN4_KEY_SIZE, abi.CONN4_VAL_SIZE) if family == 4 else (abi.CONN_KEY_SIZE, abi.CONN_VAL_SIZE)
    key, val = (ks + 7) // 8 * 8, (vs + 7) // 8 * 8
    per_entry = 48 + key + (val if table == "shared" else 8 + val * ncpus)
    return entries * per_entry + n_buckets * 16


def conn_tables_estimate(sizes: "Sizes", ncpus: int, table: str | None = None) -> int:
    """Both conn tables of these sizes together."""
    table = table or sizes.conn_table
    return (conn_table_estimate(sizes.max_conns, ncpus, table, 4)
            + conn_table_estimate(sizes.conn6_entries(), ncpus, table, 6))


def conn_table_advice(sizes: "Sizes", ncpus: int, table: str, mem_total: int) -> str | None:
    """A warning when per-CPU conn tables take a large share of the machine's memory (a DPVS config's
    conn_pool_size of 2^21 is ~7 GiB with per-CPU values on 64 CPUs), saying what shared ones would take."""
    if table != "percpu" or mem_total <= 0:
        return None
    need = conn_tables_estimate(sizes, ncpus, "percpu")
    if need < mem_total // 10:
        return None
    return (f"the connection tables take {need / 2**30:.1f} GiB ({100 * need / mem_total:.0f}% of memory): their "
            f"values are per CPU on {ncpus} possible CPUs; --conn-table shared would take "
            f"{conn_tables_estimate(sizes, ncpus, 'shared') / 2**30:.1f} GiB, a smaller --max-conns (conn_pool_size) "
            f"or --max-conns6 (conn6_pool_size) less")


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


def ensure_bpffs(root: str) -> None:
    """Make `root` a bpffs mount if it is not on one already.

    Inside `ip netns exec` /sys is remounted, so /sys/fs/bpf is not usable there; a bpffs mounted under
    /run before `ip netns exec` runs is inherited, so pins made through it outlive this process. A directory on
    a bpffs (statfs, not only a mount point: `--pin-root /run/hdslb/bpffs/mine`) is used as it is: a bpffs
    mounted over it inside `ip netns exec` lived in that command's mount namespace only, so a daemon killed with
    -9 took its pins with it and the next start found its XDP program attached with no maps to adopt.
    """
    from hdslb.fastpath.decap import _in_private_mount_ns, is_bpffs

    os.makedirs(root, exist_ok=True)
    if is_bpffs(root):
        return
    if os.listdir(root):  # a mount over it would hide what it holds from every process (/run/hdslb, /var/lib, ...)
        raise OSError(errno.ENOTEMPTY, f"--pin-root {root} is neither on a bpffs nor empty: mounting a bpffs there "
                                       f"would hide what it holds; give a directory on a bpffs (the default "
                                       f"{DEFAULT_PIN_ROOT}, or one below it) or an empty one")
    if _in_private_mount_ns():
        log.warning("%s is not on a bpffs and this process has a mount namespace of its own (as under `ip netns "
                    "exec`): a bpffs mounted here goes with it, and the pins with it; mount one there beforehand "
                    "(mount -t bpf bpf %s) for flows to outlive a crash", root, root)
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
        self._prog_id: int | None = None
        self.conn_memlock: int | None = None  # kernel memory of both conn tables, from fdinfo, after load()
        self.conn_memlock_by_map: dict[str, int] = {}
        self.sweep_fn = None  # hdslb_sweep (see bpf/hdslb_xdp.c), loaded with the program
        self.sweep_batch = 0
        self.legacy_conn_pin: str | None = None  # an adopted single-table conn_map, until migrate_legacy_conns()
        # conn maps pinned with another --conn-table or size, set aside as NAME_oldN (newest first), until
        # move_conns(final=True) has copied their connections into the new ones: {name: [paths]}
        self.conn_moves: dict[str, list[str]] = {}
        self._conn_renamed: list[tuple[str, str]] = []  # (pin, its set-aside path) done by this load()
        # other maps pinned with another size (--max-services, ...), set aside as NAME_old1 until finish_resize():
        # {name: path}; the daemon's model rewrites the tables it owns, the fast path's own state is copied
        self.resized: dict[str, str] = {}
        self.allow_resize = True  # False: a pin of another size is refused (a reload has no model to write them)
        self._resize_renamed: list[tuple[str, str]] = []
        self.attached: dict[str, int] = {}  # ifname -> XDP flags used

    @property
    def prog_fd(self) -> int:
        return self.fn.fd

    def cflags(self, conn_fds: dict, ncpus: int) -> list[str]:
        s = self.sizes
        return [
            f"-I{self.bpf_dir / 'include'}",
            f'-DPIN_DIR="{self.pin_dir}"',
            f"-DCONN4_MAP_FD={conn_fds['conn4_map']}",
            f"-DCONN6_MAP_FD={conn_fds['conn6_map']}",
            f"-DHDSLB_NR_CPUS={ncpus}",
            f"-DSWEEP_BATCH={sweep_batch(s.conn_table, ncpus)}",
            f"-DMAX_CONNS={s.max_conns}",
            f"-DMAX_CONNS6={s.conn6_entries()}",
            f"-DMAX_SERVICES={s.max_services}",
            f"-DMAX_DESTS={s.max_dests}",
            f"-DMAX_LOCAL={s.max_local}",
            f"-DMAX_ROUTES={s.max_routes}",
            f"-DMAX_NEIGH={s.max_neigh}",
            f"-DMAX_IFACES={s.max_ifaces}",
            f"-DMAX_HASH_CELLS={s.max_hash_cells}",
            f"-DMAX_PERSIST={s.max_persist}",
            *(["-DCONN_SHARED"] if s.conn_table == "shared" else []),
            "-fno-strict-aliasing",  # conn entries of both tables are read through the same head (struct conn_val)
            "-Wno-unused-function",
        ]

    # name -> (family, key size, value size): IPv4 flows, then IPv6 and NAT64 flows (bpf/hdslb_xdp.c)
    CONN_MAPS = {"conn4_map": (4, abi.CONN4_KEY_SIZE, abi.CONN4_VAL_SIZE),
                 "conn6_map": (6, abi.CONN_KEY_SIZE, abi.CONN_VAL_SIZE)}
    LEGACY_CONN_PIN = "conn_map"  # one table for both families, before conn4_map/conn6_map

    def has_pins(self) -> bool:
        return (any(os.path.exists(os.path.join(self.pin_dir, n)) for n in (*self.CONN_MAPS, self.LEGACY_CONN_PIN))
                or any(self._old_conn_pins(n) for n in self.CONN_MAPS))

    def load(self, adopt: bool = False) -> None:
        """Compile and load the program.

        adopt=False starts clean: this instance's old pins are removed and every map is created empty.
        adopt=True keeps the pinned maps (connections, counters, tables) of a previous daemon or program
        version and compiles the new program against them, so forwarding state survives.
        """
        from bcc import BPF

        ensure_bpffs(os.path.dirname(self.pin_dir.rstrip("/")) or "/")
        lib = _libbcc()
        table = self.sizes.conn_table
        if table not in CONN_TABLES:
            raise ValueError(f"conn table {table!r}: expected one of {', '.join(CONN_TABLES)}")
        map_type = BPF_MAP_TYPE_LRU_HASH if table == "shared" else BPF_MAP_TYPE_LRU_PERCPU_HASH
        fds: dict[str, int] = {}
        self.conn_moves, self._conn_renamed = {}, []
        try:
            if adopt and self.has_pins():
                legacy = os.path.join(self.pin_dir, self.LEGACY_CONN_PIN)
                if os.path.exists(legacy):
                    self._check_legacy(lib, legacy, map_type)
                    self.legacy_conn_pin = legacy  # its connections move over once attached (migrate_legacy_conns)
                try:
                    for name in self.CONN_MAPS:
                        if self.legacy_conn_pin and not os.path.exists(os.path.join(self.pin_dir, name)):
                            fds[name] = self._create_conn_map(lib, name, map_type)
                        else:
                            fds[name] = self._open_conn_map(lib, name, map_type, fds)
                except BaseException:
                    self._undo_conn_renames(fds)
                    raise
            else:
                if os.path.isdir(self.pin_dir):
                    shutil.rmtree(self.pin_dir)
                os.makedirs(self.pin_dir)
                self._create_conn_maps(lib, map_type, fds)
            if adopt and self.allow_resize:
                try:
                    self._set_aside_resized()
                except BaseException:
                    self._undo_resize_renames()
                    self._undo_conn_renames(fds)
                    raise
            pinned_before = set(os.listdir(self.pin_dir))  # bcc pins the maps it creates as it compiles
            held: dict[str, int] = {}  # counter maps of another layout set aside: {name: fd}, re-pinned on failure
            try:
                self._compile(BPF, fds, adopt, pinned_before)
                if adopt:
                    self._copy_resized()
                    reset = self._check_pinned_sizes()
                    if reset:  # counters of another version's layout: new empty ones, the flows kept
                        for name in reset:
                            path = os.path.join(self.pin_dir, name)
                            held[name] = lib.bpf_obj_get(path.encode())
                            os.unlink(path)
                        self.close()
                        self._compile(BPF, fds, adopt, pinned_before)
                        self._check_pinned_sizes()
                        log.warning("%s pinned by another hdslb version with another layout (%s): created anew for "
                                    "this version, these counters start from zero; services and connections are "
                                    "kept", ", ".join(reset), "; ".join(reset.values()))
                self.fn = self.bpf.load_func("xdp_main", BPF.XDP)
                self.sweep_fn = self.bpf.load_func("hdslb_sweep", BPF.XDP)  # run by the daemon's sweep, never attached
            except Exception:
                if adopt:  # a refused adoption leaves the pins as it found them (no new map of this build)
                    self.close()
                    self.fn = self.sweep_fn = None
                    self._unpin_new(pinned_before)
                    self._undo_conn_renames(fds)
                    self._undo_resize_renames()
                    for name, fd in held.items():
                        path = os.path.join(self.pin_dir, name)
                        if os.path.exists(path):
                            os.unlink(path)
                        if fd >= 0 and lib.bpf_obj_pin(fd, path.encode()) != 0:
                            log.error("cannot pin %s back (%s)", path, os.strerror(ctypes.get_errno()))
                raise
            finally:
                for fd in held.values():
                    if fd >= 0:
                        os.close(fd)
            self.sweep_batch = sweep_batch(table, possible_cpus())
            self.conn_memlock_by_map = {n: _fd_memlock(fd) or 0 for n, fd in fds.items()}
            self.conn_memlock = sum(self.conn_memlock_by_map.values()) or None
        finally:
            for fd in fds.values():
                os.close(fd)
        if self.conn_memlock:
            log.info("connection tables: %d IPv4 + %d IPv6 entries, %.1f MiB of kernel memory (%s)",
                     self.sizes.max_conns, self.sizes.conn6_entries(), self.conn_memlock / 2**20,
                     f"values per CPU on {possible_cpus()} possible CPUs" if table == "percpu" else "one shared value")
        self._check_abi()

    def _compile(self, BPF, fds: dict, adopt: bool, pinned_before: set) -> None:
        try:
            self.bpf = BPF(src_file=str(self.bpf_dir / "hdslb_xdp.c"), cflags=self.cflags(fds, possible_cpus()))
        except Exception as e:
            if adopt:
                self._unpin_new(pinned_before)
                raise RuntimeError(f"cannot compile against the pinned maps in {self.pin_dir} (a map layout "
                                   f"or size changed?): {e}; start with --fresh to discard that state") from e
            raise

    def _unpin_new(self, pinned_before: set) -> None:
        for name in set(os.listdir(self.pin_dir)) - pinned_before:
            try:
                os.unlink(os.path.join(self.pin_dir, name))
            except OSError as e:
                log.warning("cannot remove %s/%s: %s", self.pin_dir, name, e)

    # --- the single-table layout of earlier versions ------------------------------------------------------
    # One conn_map held both families: key (saddr[16], daddr[16], sport, dport, proto, af, pad), value
    # (saddr[16], daddr[16], then the 40-byte head conn_val has now). Its connections are carried over on a
    # restart into the new program (adopt), so an upgrade keeps flows as any restart does.
    LEGACY_KEY_SIZE, LEGACY_VAL_SIZE = 40, 72

    def _check_legacy(self, lib, path: str, map_type: int) -> None:
        fd = lib.bpf_obj_get(path.encode())
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"cannot open pinned connection map {path}")
        try:
            kind, ks, vs = (_fdinfo_int(fd, f) for f in ("map_type", "key_size", "value_size"))
        finally:
            os.close(fd)
        if (ks, vs) != (self.LEGACY_KEY_SIZE, self.LEGACY_VAL_SIZE):
            raise RuntimeError(f"the pinned connection table {path} has a layout this hdslb does not know "
                               f"(key {ks} B, value {vs} B): start with --fresh to discard its connections")
        if kind != map_type:
            have = "shared" if kind == BPF_MAP_TYPE_LRU_HASH else "percpu"
            raise RuntimeError(f"the pinned connection table in {self.pin_dir} is --conn-table {have}, not "
                               f"{self.sizes.conn_table}: start with --fresh to discard its connections and change it")

    def migrate_legacy_conns(self) -> int:
        """Move the connections of an adopted single-table conn_map into conn4_map / conn6_map, then unpin it.
        Called right after the new program is attached: until then the old program keeps serving (and adding
        to) the old table; packets of old flows that arrive in between miss (TCP retransmits; a UDP flow may be
        scheduled anew, and is then put back on its old server). Returns the entries moved."""
        import numpy as np

        from bcc.libbcc import lib

        from hdslb.fastpath import aging, conn_move

        path, self.legacy_conn_pin = self.legacy_conn_pin, None
        if not path:
            return 0
        fd = lib.bpf_obj_get(path.encode())
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"cannot open pinned connection map {path}")
        shared = self.sizes.conn_table == "shared"
        ncpu = 1 if shared else possible_cpus()
        kl, vl = self.LEGACY_KEY_SIZE, self.LEGACY_VAL_SIZE
        moved = 0
        try:
            for K, V in conn_move.batches(lib, fd, kl, vl * ncpu, path):
                V = V.reshape(len(V), ncpu, vl)
                wk = np.concatenate([K[:, 32:40], K[:, 0:32]], axis=1)        # head first, then addresses
                wv = np.concatenate([V[:, :, 32:72], V[:, :, 0:32]], axis=2)
                flags = np.bitwise_or.reduce(wv[:, :, aging.V_FLAGS], axis=1)
                v4 = (wk[:, aging.K_AF] == 4) & ((flags & abi.CONN_F_XLAT) == 0)
                for name, sel in (("conn4_map", v4), ("conn6_map", ~v4)):
                    m = int(sel.sum())
                    if not m:
                        continue
                    if name == "conn4_map":
                        ok = np.concatenate([wk[sel, :8], wk[sel, aging.K_SADDR:aging.K_SADDR + 4],
                                             wk[sel, aging.K_DADDR:aging.K_DADDR + 4]], axis=1)
                        ov = np.concatenate([wv[sel][:, :, :aging.V_SADDR + 4],
                                             wv[sel][:, :, aging.V_DADDR:aging.V_DADDR + 4]], axis=2)
                    else:
                        ok, ov = wk[sel], wv[sel]
                    conn_move.write_raw(lib, self.bpf[name].map_fd, ok, ov.reshape(m, -1), name)
                    moved += m
        finally:
            os.close(fd)
        os.unlink(path)
        log.info("moved %d connection entries from the single-table layout into conn4_map/conn6_map", moved)
        return moved

    def _conn_entries(self, name: str) -> int:
        return self.sizes.max_conns if self.CONN_MAPS[name][0] == 4 else self.sizes.conn6_entries()

    OLD_CONN_PIN = re.compile(r"(conn[46]_map)_old([0-9]+)")  # NAME_oldN: a conn map set aside, see conn_moves

    def _old_conn_pins(self, name: str) -> list[str]:
        """The set-aside pins of conn map `name` whose connections are still to be copied, newest first."""
        try:
            names = os.listdir(self.pin_dir)
        except OSError:
            return []
        found = [(int(m.group(2)), n) for n in names if (m := self.OLD_CONN_PIN.fullmatch(n)) and m.group(1) == name]
        return [os.path.join(self.pin_dir, n) for _, n in sorted(found, reverse=True)]

    def _open_conn_map(self, lib, name: str, map_type: int, fds: dict) -> int:
        """The pinned conn map `name` of a previous daemon. One of another table kind or size is set aside
        (NAME_oldN) and a new one made in its place: its connections are copied over by move_conns(). One of
        another key or value size is returned as it is, for _check_pinned_sizes to refuse."""
        path = os.path.join(self.pin_dir, name)
        olds = self._old_conn_pins(name)
        if not os.path.exists(path) and olds:  # a start that died between setting one aside and making the new one
            self.conn_moves[name] = olds
            return self._create_conn_map(lib, name, map_type)
        fd = lib.bpf_obj_get(path.encode())
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"cannot open pinned connection map {path}")
        _fam, ks, vs = self.CONN_MAPS[name]
        have = {f: _fdinfo_int(fd, f) for f in ("map_type", "key_size", "value_size", "max_entries")}
        want = {"map_type": map_type, "key_size": ks, "value_size": vs, "max_entries": self._conn_entries(name)}
        if (have["key_size"], have["value_size"]) != (ks, vs) or have == want or None in have.values():
            if olds:
                self.conn_moves[name] = olds
            return fd  # its size is checked with every other pinned map's (_check_pinned_sizes)
        os.close(fd)
        kind = {BPF_MAP_TYPE_LRU_HASH: "shared", BPF_MAP_TYPE_LRU_PERCPU_HASH: "percpu"}.get(have["map_type"])
        if kind is None:
            raise RuntimeError(f"the pinned {name} in {self.pin_dir} is a map of type {have['map_type']}, not a "
                               f"connection table: start with --fresh to discard the pinned state")
        n = max((int(self.OLD_CONN_PIN.fullmatch(os.path.basename(p)).group(2)) for p in olds), default=0) + 1
        aside = os.path.join(self.pin_dir, f"{name}_old{n}")
        os.rename(path, aside)
        self._conn_renamed.append((path, aside))
        log.warning("%s: pinned as --conn-table %s with %d entries, this start asks for %s with %d: its "
                    "connections are copied into a new table (the old one stays pinned as %s until they are)",
                    name, kind, have["max_entries"], self.sizes.conn_table, want["max_entries"], aside)
        self.conn_moves[name] = [aside, *olds]
        fds[name] = self._create_conn_map(lib, name, map_type)
        return fds[name]

    def _undo_conn_renames(self, fds: dict) -> None:
        """A load() that fails puts back the conn maps it set aside (and drops the new ones it made for them)."""
        for path, _aside in self._conn_renamed:
            if os.path.basename(path) in fds:
                os.close(fds.pop(os.path.basename(path)))
        _put_back(self._conn_renamed)
        self._conn_renamed, self.conn_moves = [], {}

    def move_conns(self, final: bool) -> "conn_move.MoveResult":
        """Copy the connections of conn maps set aside by load() (another --conn-table or size) into the new
        ones: called before the new program is attached (final=False: the old program still forwards) and
        after it (final=True: what the old one added meanwhile; then the old pins go). See conn_move."""
        from bcc.libbcc import lib

        from hdslb.fastpath import conn_move

        total = conn_move.MoveResult()
        ncpu = possible_cpus()
        dst_copies = 1 if self.sizes.conn_table == "shared" else ncpu
        for name, olds in list(self.conn_moves.items()):
            _fam, ks, vs = self.CONN_MAPS[name]
            for path in olds:  # newest first: an older table's entry is copied only where it is newer
                fd = lib.bpf_obj_get(path.encode())
                if fd < 0:
                    raise OSError(ctypes.get_errno(), f"cannot open the set-aside connection map {path}")
                try:
                    copies = 1 if _fdinfo_int(fd, "map_type") == BPF_MAP_TYPE_LRU_HASH else ncpu
                    total += conn_move.move(lib, fd, copies, self.bpf[name].map_fd, dst_copies, ks, vs,
                                            self._conn_entries(name), ncpu, name)
                finally:
                    os.close(fd)
            if final:
                for path in olds:
                    os.unlink(path)
                del self.conn_moves[name]
        return total

    # Maps sized by an option other than the conn tables': {name: Sizes field}. A restart asking for another size
    # makes them anew. What the control plane owns (services, real servers, local addresses, scheduling tables) is
    # written again from the saved model before the program is attached (restore() rewrites every entry it owns);
    # what the fast path itself writes (COPIED: counters, round-robin cursors, persistence templates) is copied.
    RESIZABLE = {**{n: "max_services" for n in ("svc_map", "sched_map", "sched_cursor", "laddr_map", "svc_stats")},
                 **{n: "max_dests" for n in ("dest_map", "dest_stats")},
                 "hash_cells": "max_hash_cells", "persist_map": "max_persist"}
    COPIED = ("svc_stats", "dest_stats", "sched_cursor", "persist_map")

    def _set_aside_resized(self) -> None:
        """Before compiling: set aside (NAME_old1) each RESIZABLE pin whose size is not what this start asks for,
        so bcc makes it anew at the new size. A NAME_old1 already there is a resize a start did not finish: the
        map beside it was made by that start and is made again."""
        self.resized, self._resize_renamed = {}, []
        for name, opt in self.RESIZABLE.items():
            path = os.path.join(self.pin_dir, name)
            aside = f"{path}_old1"
            if os.path.exists(aside):
                if os.path.exists(path):
                    os.unlink(path)
                self.resized[name] = aside
                continue
            if not os.path.exists(path):
                continue
            fd = _libbcc().bpf_obj_get(path.encode())
            if fd < 0:
                raise OSError(ctypes.get_errno(), f"cannot open pinned map {path}")
            try:
                have = _fdinfo_int(fd, "max_entries")
            finally:
                os.close(fd)
            want = getattr(self.sizes, opt)
            if have is None or have == want:
                continue
            os.rename(path, aside)
            self._resize_renamed.append((path, aside))
            self.resized[name] = aside
            log.warning("%s: pinned with %d entries, this start asks for %d (%s): made anew; %s", name, have, want,
                        self.SIZE_OPTIONS[name], "its entries are copied over" if name in self.COPIED else
                        "the saved model writes its entries again")

    def _copy_resized(self) -> None:
        """After compiling: copy the fast path's own state (COPIED) from the set-aside maps into the new ones, the
        entries that fit: array slots below the new size, and of the persistence templates the latest-expiring.
        A set-aside map of another type, key or value size than this build's is refused (an upgrade that also
        changed its layout: the previous version must be started again, or --fresh)."""
        import numpy as np

        from hdslb.fastpath import conn_move

        lib = _libbcc()
        ncpu = possible_cpus()
        for name, aside in self.resized.items():
            t = self.bpf[name]
            fd = lib.bpf_obj_get(aside.encode())
            if fd < 0:
                raise OSError(ctypes.get_errno(), f"cannot open the set-aside map {aside}")
            try:
                fields = ("map_type", "key_size", "value_size")
                have, want = ({f: _fdinfo_int(x, f) for f in fields} for x in (fd, t.map_fd))
                if have != want:
                    raise RuntimeError(f"the pinned {name} in {self.pin_dir} was made by another hdslb version "
                                       f"({have} against this build's {want}) and is to be resized: start the "
                                       f"version that made it again, or start with --fresh to discard the "
                                       f"pinned state")
                if name not in self.COPIED:
                    continue
                per_cpu = want["map_type"] in (BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH)
                raw = ((want["value_size"] + 7) // 8 * 8) * ncpu if per_cpu else want["value_size"]
                K, V = conn_move.read_raw(lib, fd, want["key_size"], raw, aside)
                n_new = int(t.max_entries)
                if name == "persist_map":  # the templates expiring last, as many as the LRU table holds
                    fill = conn_move.limit(n_new, ncpu)
                    if len(K) > fill:
                        order = np.argsort(V[:, 8:16].copy().view("<u8")[:, 0])[::-1][:fill]
                        K, V = K[order], V[order]
                else:  # arrays: the slots the new size has
                    keep = K.copy().view("<u4")[:, 0] < n_new
                    K, V = K[keep], V[keep]
                conn_move.write_raw(lib, t.map_fd, K, V, name)
            finally:
                os.close(fd)

    def _undo_resize_renames(self) -> None:
        _put_back(self._resize_renamed)
        self._resize_renamed, self.resized = [], {}

    def finish_resize(self) -> list[str]:
        """Once the new program runs (and the model has written the new maps): unpin the set-aside ones."""
        done = sorted(self.resized)
        for aside in self.resized.values():
            if os.path.exists(aside):
                os.unlink(aside)
        self.resized, self._resize_renamed = {}, []
        return done

    # The option that sizes a pinned map, for the refusal's message (the rest have fixed sizes).
    SIZE_OPTIONS = {"conn4_map": "--max-conns (conn_pool_size)", "conn6_map": "--max-conns6 (conn6_pool_size)",
                    **{n: "--max-services" for n in ("svc_map", "sched_map", "sched_cursor", "laddr_map", "svc_stats")},
                    **{n: "--max-dests" for n in ("dest_map", "dest_stats")},
                    "hash_cells": "--max-hash-cells", "persist_map": "--max-persist"}

    # Counters whose size or layout follows the build (CNT_MAX grows with every new drop reason, if_stats with the
    # per-interface counters): another version's are replaced by empty ones of this build's layout rather than
    # refused, so an upgrade that counts one more thing keeps services and flows. Everything else is refused.
    RESETTABLE = ("counters", "if_stats")

    def _check_pinned_sizes(self) -> dict[str, str]:
        """bcc adopts a pinned map whatever its kind, size or layout: a restart with another --max-services (say)
        would run on the old map while the daemon hands out ids up to the new limit, and an upgrade whose struct
        grew or shrank would have the daemon read and write values of the wrong size (a kernel copy past the end
        of its buffer). Every pinned map this program uses is held to the type, key size, value size and entries
        the build declares; a mismatch is refused, naming the map and what differs, before anything is loaded
        or attached (the previous program keeps forwarding). The RESETTABLE counters are the exception: those of
        another layout are returned ({name: what differs}) for load() to create anew."""
        from bcc import libbcc

        reset = {}
        lib = libbcc.lib
        lib.bpf_table_key_size_id.restype = lib.bpf_table_leaf_size_id.restype = ctypes.c_size_t
        lib.bpf_table_key_size_id.argtypes = lib.bpf_table_leaf_size_id.argtypes = [ctypes.c_void_p,
                                                                                      ctypes.c_ulonglong]
        for name in sorted(os.listdir(self.pin_dir)):
            try:
                t = self.bpf[name]
            except KeyError:
                continue  # not one of this program's maps
            mod, mid = self.bpf.module, t.map_id
            want = {"map_type": lib.bpf_table_type_id(mod, mid), "key_size": lib.bpf_table_key_size_id(mod, mid),
                    "value_size": lib.bpf_table_leaf_size_id(mod, mid), "max_entries": int(t.max_entries)}
            have = {f: _fdinfo_int(t.map_fd, f) for f in want}
            diff = [f for f in want if have[f] is not None and have[f] != want[f]]
            if not diff:
                continue
            what = ", ".join(f"{f.replace('_', ' ')} {have[f]} (this build: {want[f]})" for f in diff)
            if name in self.RESETTABLE and "map_type" not in diff:
                reset[name] = what
                continue
            if diff == ["max_entries"] and name in self.SIZE_OPTIONS:
                raise RuntimeError(f"the pinned {name} in {self.pin_dir} has {have['max_entries']} entries, not "
                                   f"{want['max_entries']}: keep {self.SIZE_OPTIONS[name]} as it was, or start with "
                                   f"--fresh to discard the pinned state and resize")
            raise RuntimeError(f"the pinned {name} in {self.pin_dir} does not have the layout this hdslb's program "
                               f"declares: {what}. Another hdslb version made it; nothing was changed and the "
                               f"attached program keeps forwarding. Start the version that made it again, or start "
                               f"with --fresh to discard the pinned state (services, connections, counters)")
        return reset

    def _create_conn_maps(self, lib, map_type: int, fds: dict) -> None:
        """Create and pin both conn maps empty (their fds into fds); warn first when per-CPU ones take much of
        the memory."""
        advice = conn_table_advice(self.sizes, possible_cpus(), self.sizes.conn_table, _mem_total())
        if advice:
            log.warning("%s", advice)
        for name in self.CONN_MAPS:
            fds[name] = self._create_conn_map(lib, name, map_type)

    def _create_conn_map(self, lib, name: str, map_type: int) -> int:
        """Create and pin an empty conn map."""
        family, ks, vs = self.CONN_MAPS[name]
        table, entries = self.sizes.conn_table, self._conn_entries(name)
        fd = lib.bcc_create_map(map_type, name.encode(), ks, vs, entries, 0)
        if fd < 0:
            need = conn_table_estimate(entries, possible_cpus(), table, family)
            per = (f"on {possible_cpus()} possible CPUs (values are per CPU; --conn-table shared keeps one)"
                   if table == "percpu" else "(one shared value an entry)")
            opt = "--max-conns (conn_pool_size)" if family == 4 else "--max-conns6 (conn6_pool_size)"
            raise OSError(-fd, f"cannot create the IPv{family} connection map: {entries} entries need "
                               f"~{need / 2**20:.0f} MiB of kernel memory {per}: {os.strerror(-fd)}; lower {opt}")
        if lib.bpf_obj_pin(fd, os.path.join(self.pin_dir, name).encode()) != 0:
            os.close(fd)
            raise OSError(ctypes.get_errno(), f"cannot pin the connection map under {self.pin_dir}")
        return fd

    def _check_abi(self) -> None:
        for name, (_fam, kw, vw) in self.CONN_MAPS.items():
            t = self.bpf[name]
            ks, vs = ctypes.sizeof(t.Key), ctypes.sizeof(t.sLeaf if hasattr(t, "sLeaf") else t.Leaf)
            if (ks, vs) != (kw, vw):
                raise RuntimeError(f"{name} ABI mismatch: C has key {ks}/value {vs}, abi.py says {kw}/{vw}")

    def table(self, name: str):
        return self.bpf[name]

    def attach(self, ifname: str, mode: str = "auto") -> str:
        """Attach to `ifname`, atomically replacing a program already there in the same mode; returns the mode used.

        Only this instance's program (one using its pinned maps: a restart's predecessor, the one a datapath reload
        swaps out) is replaced. Another program there, found now or attached since (a second instance or another
        tool starting at the same moment: both saw the interface free, and the later attach replaced the other's
        program), is refused (XdpForeignError) and keeps running: the kernel swaps only over the program looked at.
        auto keeps the mode that program runs in. Another mode asked for explicitly (a restart with a changed
        --xdp-mode) cannot be attached over it (the kernel runs one mode at a time): the old one is detached first,
        packets in between reaching the kernel's stack, and put back if the new mode fails."""
        flags_of = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
        current, old_fd = self._own_program(ifname)
        try:
            fallback = mode == "auto" and current not in flags_of  # a first attach may fall back to generic
            if mode == "auto":
                mode = current if current in flags_of else "generic" if is_veth(ifname) else "native"
            flags = flags_of[mode]
            if current in flags_of and current != mode:
                log.warning("%s runs XDP in %s mode; switching to %s (packets in between reach the kernel's stack)",
                            ifname, current, mode)
                self._swap(ifname, -1, flags_of[current], old_fd)
                try:
                    self._swap(ifname, self.fn.fd, flags)
                except Exception:
                    self._swap(ifname, self.fn.fd, flags_of[current])
                    self.attached[ifname] = flags_of[current]
                    log.error("%s: %s mode refused; attached again in %s mode", ifname, mode, current)
                    raise
            else:
                try:
                    self._swap(ifname, self.fn.fd, flags, old_fd)
                except XdpForeignError:
                    raise
                except Exception as e:
                    if not (fallback and mode == "native"):
                        raise XdpAttachError(
                            f"{ifname}: the driver refused XDP in {mode} mode ({e})"
                            + ("; --xdp-mode generic works on any interface (slower)" if mode == "native" else "")
                        ) from None
                    # The driver has no native XDP (or refuses it as configured: LRO on, an MTU too large): the
                    # generic hook runs on any interface, as `ip link set xdp` users expect of auto.
                    log.warning("%s: native XDP refused (%s); attaching in generic mode", ifname, e)
                    mode, flags = "generic", XDP_FLAGS_SKB_MODE
                    try:
                        self._swap(ifname, self.fn.fd, flags)
                    except XdpForeignError:
                        raise
                    except Exception as e2:
                        raise XdpAttachError(f"{ifname}: the kernel refused XDP in native and in generic mode "
                                             f"({e2})") from None
        finally:
            if old_fd >= 0:
                os.close(old_fd)
        self.attached[ifname] = flags
        return mode

    def prog_id(self) -> int | None:
        """The kernel's id of this build's XDP program (what an interface it is attached to reports)."""
        if self._prog_id is None and self.fn is not None:
            info = _obj_info(self.fn.fd)
            self._prog_id = int.from_bytes(info.raw[4:8], "little") if info is not None else None  # bpf_prog_info.id
        return self._prog_id

    def _own_program(self, ifname: str) -> tuple[str | None, int]:
        """(mode, descriptor) of the program ifname runs, which must be this instance's (else XdpForeignError);
        (None, -1) when it runs none. The caller closes the descriptor."""
        from hdslb.fastpath import xdp_pass

        current, prog_id = xdp_pass.query(ifname)
        if not prog_id:
            return None, -1
        info = prog_info(prog_id)
        if info is not None and not info[1] & pinned_map_ids(self.pin_dir):
            raise XdpForeignError(foreign_xdp_message(ifname, prog_id, info[0], self.pin_dir))
        fd = _fd_by_id("bpf_prog_get_fd_by_id", prog_id)
        return (current, fd) if fd >= 0 else (None, -1)  # (detached meanwhile: none is expected there)

    def _swap(self, ifname: str, fd: int, flags: int, expected_fd: int = -1) -> None:
        """xdp_pass.swap: fd in place of the program expected_fd (-1: none); another one there is named."""
        from hdslb.fastpath import xdp_pass

        try:
            xdp_pass.swap(ifname, fd, flags, expected_fd)
        except FileExistsError:
            _mode, prog_id = xdp_pass.query(ifname)
            info = prog_info(prog_id) if prog_id else None
            if info is None:
                raise XdpForeignError(f"{ifname}: its XDP program changed while hdslbd attached; nothing was "
                                      f"changed, start again") from None
            raise XdpForeignError(foreign_xdp_message(ifname, prog_id, info[0], self.pin_dir)) from None

    def detach(self, ifname: str) -> None:
        """Detach this program from ifname; one that replaced it there (another instance's, another tool's) stays."""
        flags = self.attached.pop(ifname, 0)
        try:
            self._swap(ifname, -1, flags, self.fn.fd)
        except XdpForeignError as e:
            log.warning("%s not detached: %s", ifname, e)

    def detach_all(self) -> None:
        for ifname in list(self.attached):
            try:
                self.detach(ifname)
            except Exception as e:  # the interface may be gone already
                log.warning("detach %s: %s", ifname, e)

    def unpin(self) -> None:
        from hdslb.fastpath.decap import is_bpffs

        # only on a bpffs, where pins live: a start that failed before its pin root was one (refused above) must not
        # remove a directory of that name elsewhere
        if os.path.isdir(self.pin_dir) and is_bpffs(self.pin_dir):
            shutil.rmtree(self.pin_dir)

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
            release_freed_heap()


def _put_back(renamed: list[tuple[str, str]]) -> None:
    """Undo pin renames [(pin, set-aside path)], last first: whatever was made at the pin is unpinned."""
    for path, aside in reversed(renamed):
        try:
            if os.path.exists(path):
                os.unlink(path)
            os.rename(aside, path)
        except OSError as e:
            log.error("cannot put %s back as %s: %s", aside, path, e)


def release_freed_heap() -> None:
    """Give the heap a compile freed back to the kernel (glibc's malloc_trim; a no-op elsewhere).

    bcc/LLVM take ~220 MB a compile and free it at cleanup, but glibc keeps freed memory in its arenas (the
    compile runs in an executor thread, with its own arena): without this every `reload --datapath` left
    the daemon ~110 MB larger for good (276 -> 569 MiB over eight reloads in the soak)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def _obj_info(fd: int, size: int = 256):
    """bpf_obj_get_info_by_fd into a zeroed buffer; None when the kernel refuses."""
    from bcc import libbcc

    lib = libbcc.lib
    lib.bpf_obj_get_info.restype = ctypes.c_int
    lib.bpf_obj_get_info.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    buf = ctypes.create_string_buffer(size)
    n = ctypes.c_uint32(size)
    return buf if lib.bpf_obj_get_info(fd, buf, ctypes.byref(n)) == 0 else None


def pinned_map_ids(pin_dir: str) -> set[int]:
    """Kernel ids of the maps pinned in pin_dir (an instance's maps, whichever program version made them)."""
    lib = _libbcc()
    ids = set()
    try:
        names = os.listdir(pin_dir)
    except FileNotFoundError:
        return ids
    for name in names:
        fd = lib.bpf_obj_get(os.path.join(pin_dir, name).encode())
        if fd < 0:
            continue
        try:
            info = _obj_info(fd)
            if info is not None:
                ids.add(int.from_bytes(info.raw[4:8], "little"))  # struct bpf_map_info: type, id, ...
        finally:
            os.close(fd)
    return ids


def _fd_by_id(call: str, obj_id: int) -> int:
    """A descriptor of the loaded program or map with this id (libbcc's bpf_prog/map_get_fd_by_id), < 0 if gone."""
    from bcc import libbcc

    fn = getattr(libbcc.lib, call)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_uint32]
    return fn(obj_id)


def prog_info(prog_id: int) -> tuple[str, set[int]] | None:
    """(name, ids of the maps it uses) of a loaded program, None when it is gone."""
    from bcc import libbcc

    fd = _fd_by_id("bpf_prog_get_fd_by_id", prog_id)
    if fd < 0:
        return None
    try:
        # struct bpf_prog_info: nr_map_ids (u32) at 52, map_ids (u64 pointer) at 56, name[16] at 64
        info = _obj_info(fd)
        if info is None:
            return None
        n = int.from_bytes(info.raw[52:56], "little")
        name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
        if not n:
            return name, set()
        ids = (ctypes.c_uint32 * n)()
        buf = ctypes.create_string_buffer(256)
        ctypes.memmove(ctypes.addressof(buf) + 52, ctypes.byref(ctypes.c_uint32(n)), 4)
        ctypes.memmove(ctypes.addressof(buf) + 56, ctypes.byref(ctypes.c_uint64(ctypes.addressof(ids))), 8)
        ln = ctypes.c_uint32(256)
        if libbcc.lib.bpf_obj_get_info(fd, buf, ctypes.byref(ln)) != 0:
            return name, set()
        return name, set(ids)
    finally:
        os.close(fd)


def foreign_xdp(ifname: str, ours: set[int]) -> tuple[int, str] | None:
    """(id, name) of an XDP program on ifname that is not this instance's (it uses none of the map ids `ours`, those
    of the instance's pins), None when the interface runs none or ours."""
    from hdslb.fastpath import xdp_pass

    _mode, prog_id = xdp_pass.query(ifname)
    if not prog_id:
        return None
    info = prog_info(prog_id)
    if info is None:
        return None  # detached meanwhile
    name, maps = info
    return None if maps & ours else (prog_id, name or "?")


def progs_using(ours: set[int]) -> set[int]:
    """Ids of every loaded program that uses one of the map ids `ours`, wherever it is attached (any namespace)."""
    from bcc import libbcc

    lib = libbcc.lib
    lib.bpf_prog_get_next_id.restype = ctypes.c_int
    lib.bpf_prog_get_next_id.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    out, cur, nxt = set(), 0, ctypes.c_uint32(0)
    while lib.bpf_prog_get_next_id(cur, ctypes.byref(nxt)) == 0:
        cur = nxt.value
        info = prog_info(cur)
        if info is not None and info[1] & ours:
            out.add(cur)
    return out


def our_xdp_links(ours: set[int]) -> list[tuple[str, str, int]]:
    """(interface, mode, program id) of every interface of this network namespace whose XDP program uses one of
    the map ids `ours` (an instance's pins): what a daemon of that instance attached."""
    from pyroute2 import IPRoute

    from hdslb.fastpath import xdp_pass

    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    out = []
    for name in names:
        try:
            mode, prog_id = xdp_pass.query(name)
        except OSError:  # gone meanwhile
            continue
        info = prog_info(prog_id) if prog_id else None
        if info is not None and info[1] & ours:
            out.append((name, mode, prog_id))
    return out


# What makes an XDP program an hdslb fast path: its function name and maps only hdslb_xdp.c declares together.
FASTPATH_PROG = "xdp_main"
FASTPATH_MAPS = frozenset({"svc_map", "conn4_map", "cfg_map", "local_map"})


def map_name(map_id: int) -> str | None:
    """The name of a loaded map (struct bpf_map_info: name[16] at 24), None when it is gone."""
    fd = _fd_by_id("bpf_map_get_fd_by_id", map_id)
    if fd < 0:
        return None
    try:
        info = _obj_info(fd)
        return None if info is None else info.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    finally:
        os.close(fd)


def _bpffs_mounts() -> list[str]:
    """Every bpffs mounted in this mount namespace (/proc/self/mountinfo: the fifth field is the mount point, the
    type follows the ' - ' separator; spaces in a mount point are written as \\040)."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                if post.split(" ", 1)[0] == "bpf":
                    out.append(pre.split(" ")[4].replace("\\040", " "))
    except OSError:
        pass
    return out


def _pinned_anywhere() -> set[int]:
    """Ids of the maps pinned anywhere on a bpffs of this mount namespace."""
    lib = _libbcc()
    ids: set[int] = set()
    for root in _bpffs_mounts():
        for top, _dirs, files in os.walk(root):
            for name in files:
                fd = lib.bpf_obj_get(os.path.join(top, name).encode())
                if fd < 0:
                    continue
                try:
                    kind = _fdinfo_int(fd, "map_type")  # a pinned program or link has no map_type
                    info = _obj_info(fd) if kind is not None else None
                    if info is not None:
                        ids.add(int.from_bytes(info.raw[4:8], "little"))
                finally:
                    os.close(fd)
    return ids


def _held_by_processes() -> set[int]:
    """Ids of the maps some process holds a descriptor of (/proc/PID/fdinfo's map_id lines): a running daemon's,
    pinned or not."""
    ids: set[int] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("map_id:"):
                            ids.add(int(line.split()[1]))
                            break
            except (OSError, ValueError):
                continue
    return ids


def orphaned_fastpaths() -> list[tuple[str, str, int]]:
    """(interface, mode, program id) of every hdslb fast path attached in this network namespace that nothing can
    reach any more: none of its maps is pinned on a bpffs here or held by a process. Such a program goes on
    forwarding with the tables it had (its pins were removed, or lived on a bpffs that went with a mount namespace)
    and no daemon can adopt, change or detach it; `hdslb-ctl down` names it."""
    from pyroute2 import IPRoute

    from hdslb.fastpath import xdp_pass

    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    found = []
    for name in names:
        try:
            mode, prog_id = xdp_pass.query(name)
        except OSError:
            continue
        info = prog_info(prog_id) if prog_id else None
        if info is None or info[0] != FASTPATH_PROG:
            continue
        if FASTPATH_MAPS <= {map_name(m) for m in info[1]}:
            found.append((name, mode, prog_id, info[1]))
    if not found:
        return []
    reachable = _pinned_anywhere() | _held_by_processes()
    return [(name, mode, prog_id) for name, mode, prog_id, maps in found if not maps & reachable]


class XdpAttachError(RuntimeError):
    """An interface refused the program: the message names it, the mode and what to do."""

    code = errno.EOPNOTSUPP


class XdpForeignError(XdpAttachError):
    """The interface runs another instance's or another tool's XDP program, which attaching would replace."""

    code = errno.EBUSY


def foreign_xdp_message(ifname: str, prog_id: int, prog_name: str, pin_dir: str) -> str:
    return (f"{ifname} already runs XDP program id {prog_id} ({prog_name or '?'}), which is not this instance's (it "
            f"uses none of the maps pinned in {pin_dir}): another hdslbd instance or another tool owns the interface, "
            f"and attaching would replace it. Nothing was changed. Stop that one first; a program nobody runs any "
            f"more goes with `ip link set dev {ifname} xdp off` (xdpgeneric off for generic mode)")


def is_veth(ifname: str) -> bool:
    """veth needs help for native XDP_TX/redirect (an XDP program on the peer), so auto picks generic for it."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.link("get", ifname=ifname)
    info = links[0].get_attr("IFLA_LINKINFO")
    return bool(info) and info.get_attr("IFLA_INFO_KIND") == "veth"
