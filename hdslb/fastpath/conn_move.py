"""Moving connections from one pinned conn table into another of another kind or size (the loader passes bcc's
libbcc in: it and maps.py are the only importers of bcc).

A restart that asks for another `--conn-table` or `--max-conns`/`--max-conns6` than the pinned tables have cannot
adopt them (a map's type and size are fixed when it is made). The loader then sets the old table aside under a
pin of its own, makes a new one, and the entries are copied across with these functions: once before the new
program is attached (the old one still forwards, and still adds to the old table), once after it (what the old
program added or moved on in between). The old table's pin goes only after the second copy has completed, so a
daemon that dies in between finds it at its next start and copies again.

An entry is copied when the new table lacks its key or holds an older copy of it (by last_seen): the second
pass so never undoes what the new program did after it was attached. Values are those of struct conn4_val /
conn_val, whatever the table kind; only how many copies an entry has differs:
- per-CPU to shared: the newest filled-in copy (CONN_F_VALID), with the furthest state any copy has seen and
  CONN_F_WAS_EST if any copy has it (as the fast path's conn_newest() folds them);
- shared to per-CPU: the value as CPU 0's copy, the others empty, as an entry the fast path made on CPU 0
  looks (another CPU takes it over on its first packet there);
- per-CPU to per-CPU: each copy folded the same way, then spread like a shared value: CPU numbering may differ
  after a reboot, and the fold is what any reader of the entry sees.
When the new table cannot take every live entry, the newest entries are kept (up to limit(): an LRU table evicts
before it is quite full) and the rest counted as dropped.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from hdslb.fastpath import abi
from hdslb.fastpath.aging import fold, hash_rows, last_seen  # noqa: F401 (fold, last_seen: this module's API too)

BATCH = 4096


@dataclass
class MoveResult:
    copied: int = 0     # entries written into the new table
    kept: int = 0       # entries the new table already had as new or newer
    dropped: int = 0    # the oldest entries that did not fit a smaller table

    def __iadd__(self, other: "MoveResult") -> "MoveResult":
        self.copied += other.copied
        self.kept += other.kept
        self.dropped += other.dropped
        return self


def batches(lib, fd: int, key_size: int, raw_size: int, what: str):
    """A map's entries read with BPF_MAP_LOOKUP_BATCH, as (keys (n, key_size), values (n, raw_size)) uint8 views
    of buffers the next batch reuses (raw_size: the value as user space reads it, every CPU's copy of a per-CPU
    map's, each rounded up to 8 bytes). lib: bcc's libbcc."""
    import numpy as np

    keys = (ctypes.c_uint8 * (key_size * BATCH))()
    vals = (ctypes.c_uint8 * (raw_size * BATCH))()
    token, nxt, cnt = ctypes.c_uint32(0), ctypes.c_uint32(0), ctypes.c_uint32(0)
    first = True
    while True:
        cnt.value = BATCH
        res = lib.bpf_lookup_batch(fd, None if first else ctypes.byref(token), ctypes.byref(nxt),
                                   ctypes.addressof(keys), ctypes.addressof(vals), ctypes.byref(cnt))
        err = ctypes.get_errno()
        if res != 0 and err != errno.ENOENT:
            raise OSError(err, f"BPF_MAP_LOOKUP_BATCH on {what}: {os.strerror(err)}")
        n = cnt.value
        if n:
            yield (np.frombuffer(keys, np.uint8, n * key_size).reshape(n, key_size),
                   np.frombuffer(vals, np.uint8, n * raw_size).reshape(n, raw_size))
        if res != 0:
            return
        token.value, first = nxt.value, False


def read_raw(lib, fd: int, key_size: int, raw_size: int, what: str):
    """Every entry of a map (see batches) as two arrays."""
    import numpy as np

    ks, vs = [], []
    for K, V in batches(lib, fd, key_size, raw_size, what):
        ks.append(K.copy())
        vs.append(V.copy())
    return (np.concatenate(ks) if ks else np.zeros((0, key_size), np.uint8),
            np.concatenate(vs) if vs else np.zeros((0, raw_size), np.uint8))


def write_raw(lib, fd: int, K, V, what: str) -> None:
    """Write entries (rows of keys and raw values, see batches) with BPF_MAP_UPDATE_BATCH, BATCH at a time."""
    import numpy as np

    for start in range(0, len(K), BATCH):
        kb = np.ascontiguousarray(K[start:start + BATCH]).tobytes()
        vb = np.ascontiguousarray(V[start:start + BATCH]).tobytes()
        c = ctypes.c_uint32(min(BATCH, len(K) - start))
        if lib.bpf_update_batch(fd, kb, vb, ctypes.byref(c)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"BPF_MAP_UPDATE_BATCH on {what}: {os.strerror(e)}")


def read_folded(lib, fd: int, key_size: int, val_size: int, copies: int, what: str):
    """Every entry of a conn table with a filled-in copy, as (keys (n, key_size) uint8, values (n, val_size)
    uint8) folded to one value each (fold) batch by batch: a per-CPU table's copies are never all held at once.
    A live table's walk may see a key twice: it is then copied twice."""
    import numpy as np

    ks, ms = [], []
    for K, V in batches(lib, fd, key_size, val_size * copies, what):
        ok, M = fold(V.reshape(len(V), copies, val_size))
        ks.append(K[ok].copy())
        ms.append(M[ok])
    K = np.concatenate(ks) if ks else np.zeros((0, key_size), np.uint8)
    M = np.concatenate(ms) if ms else np.zeros((0, val_size), np.uint8)
    return K, M


def match(src_K, dst_K):
    """For each source key: whether dst_K has it, and where (any row where it has not). Keys are matched by a
    64-bit hash of their bytes and then compared; should two destination keys share a hash, by the bytes
    themselves (slower)."""
    import numpy as np

    d_hash = hash_rows(dst_K)
    order = np.argsort(d_hash)
    sorted_hash = d_hash[order]
    if len(sorted_hash) > 1 and (sorted_hash[1:] == sorted_hash[:-1]).any():
        rows = lambda K: np.ascontiguousarray(K).view(np.dtype((np.void, K.shape[1])))[:, 0]  # noqa: E731
        d_rows = rows(dst_K)
        order = np.argsort(d_rows)
        pos = order[np.minimum(np.searchsorted(d_rows[order], rows(src_K)), len(order) - 1)]
    else:
        pos = order[np.minimum(np.searchsorted(sorted_hash, hash_rows(src_K)), len(order) - 1)]
    return (dst_K[pos] == src_K).all(axis=1), pos


def limit(capacity: int, ncpus: int) -> int:
    """How many entries a move fills an LRU table of `capacity` with. Such a table evicts before it is full: each
    CPU takes free elements from the common list into a list of its own, target_free = (capacity / possible CPUs
    / 2) clamped to 1..128 at a time, and one that finds fewer than that there evicts to make them up, while the
    other CPUs' lists may still hold some (kernel/bpf/bpf_lru_list.c). A move leaves that much room per CPU
    free: 256 entries of a big table on 2 CPUs."""
    target_free = min(128, max(1, capacity // max(1, ncpus) // 2))
    return max(0, capacity - ncpus * target_free)


def plan(src_K, src_M, dst_K, dst_M, fill: int):
    """Which folded source entries to write: (indexes into src, in the order to write them (oldest first), kept,
    dropped). An entry is written when the destination lacks its key or has an older copy; when the written ones
    and the destination's own would come to more than `fill` entries (limit()), the oldest of those to write that
    the destination lacks are left out."""
    import numpy as np

    s_last = last_seen(src_M)
    if len(dst_K):
        present, pos = match(src_K, dst_K)
        newer = ~present | (s_last > last_seen(dst_M)[pos])
        room_new = max(0, fill - len(dst_K))  # keys already there take no more room
    else:
        present = np.zeros(len(src_K), bool)
        newer = np.ones(len(src_K), bool)
        room_new = fill
    idx = np.flatnonzero(newer)
    idx = idx[np.argsort(s_last[idx], kind="stable")]  # oldest first
    adds = ~present[idx]
    dropped = 0
    n_add = int(adds.sum())
    if n_add > room_new:
        dropped = n_add - room_new
        drop_pos = np.flatnonzero(adds)[:dropped]  # the oldest of the entries the table does not have
        keep = np.ones(len(idx), bool)
        keep[drop_pos] = False
        idx = idx[keep]
    return idx, len(src_K) - len(idx) - dropped, dropped


def spread(M, copies: int):
    """Folded values as a table's values: one copy, or CPU 0's copy with the others empty."""
    import numpy as np

    if copies == 1:
        return M[:, None, :]
    out = np.zeros((len(M), copies, M.shape[1]), np.uint8)
    out[:, 0] = M
    return out


def move(lib, src_fd: int, src_copies: int, dst_fd: int, dst_copies: int, key_size: int, val_size: int,
         capacity: int, ncpus: int, what: str) -> MoveResult:
    """Copy src's entries into dst where dst lacks them or holds older ones (see the module's docstring)."""
    import numpy as np

    K, M = read_folded(lib, src_fd, key_size, val_size, src_copies, what + " (the old table)")
    dK, dM = read_folded(lib, dst_fd, key_size, val_size, dst_copies, what)
    idx, kept, dropped = plan(K, M, dK, dM, limit(capacity, ncpus))
    write_raw(lib, dst_fd, K[idx], spread(M[idx], dst_copies).reshape(len(idx), dst_copies * val_size), what)
    return MoveResult(copied=len(idx), kept=kept, dropped=dropped)
