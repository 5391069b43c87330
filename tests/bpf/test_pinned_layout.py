"""An upgrade meets pinned maps made by another hdslb version. bcc adopts a pinned map whatever its layout: a
value that grew was adopted silently (the daemon's ctypes buffers then smaller than the kernel's copies), one
that shrank failed in the verifier with nothing naming the map. Both must be refused before anything is loaded,
naming the map, what differs and --fresh; pins of this build's layout are adopted as before."""

import os
import shutil

import pytest

from hdslb.fastpath import loader

SIZES = dict(max_conns=4096, max_services=64, max_dests=256, max_local=64, max_routes=256, max_neigh=64)
BPF_MAP_TYPE_HASH = 1


@pytest.fixture
def pin_dir():
    loader.ensure_bpffs(loader.DEFAULT_PIN_ROOT)
    path = os.path.join(loader.DEFAULT_PIN_ROOT, f"pytest-layout-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _pins_with_iface_map(pin_dir: str, key_size: int, value_size: int, map_type: int = BPF_MAP_TYPE_HASH) -> None:
    """Conn tables of this build's layout, and an iface_map as another version would have pinned it."""
    lib = loader._libbcc()
    fds: dict = {}
    loader.FastPath(pin_dir, loader.Sizes(**SIZES))._create_conn_maps(lib, loader.BPF_MAP_TYPE_LRU_PERCPU_HASH, fds)
    fd = lib.bcc_create_map(map_type, b"iface_map", key_size, value_size, 64, 0)
    assert fd >= 0
    fds["iface_map"] = fd
    try:
        assert lib.bpf_obj_pin(fd, os.path.join(pin_dir, "iface_map").encode()) == 0
    finally:
        for fd in fds.values():
            os.close(fd)


@pytest.mark.root
@pytest.mark.parametrize("key_size,value_size,map_type,why", [
    (4, 24, BPF_MAP_TYPE_HASH, "value size 24 (this build: 16)"),   # a value that grew: adopted silently before
    (4, 8, BPF_MAP_TYPE_HASH, "value size 8 (this build: 16)"),     # one that shrank: a bare verifier error before
    (8, 16, BPF_MAP_TYPE_HASH, "key size 8 (this build: 4)"),
    (4, 16, 9, "map type 9 (this build: 1)"),                        # an LRU hash where a hash is declared
])
def test_a_pinned_map_of_another_layout_is_refused_naming_it(pin_dir, key_size, value_size, map_type, why):
    _pins_with_iface_map(pin_dir, key_size, value_size, map_type)
    before = sorted(os.listdir(pin_dir))
    fp = loader.FastPath(pin_dir, loader.Sizes(**SIZES))
    try:
        with pytest.raises(RuntimeError) as e:
            fp.load(adopt=True)
    finally:
        fp.close()
    msg = str(e.value)
    assert "iface_map" in msg and why in msg and "--fresh" in msg and pin_dir in msg, msg
    assert fp.fn is None, "nothing was loaded"
    assert sorted(os.listdir(pin_dir)) == before, "the pins are left as they were"


@pytest.mark.root
def test_pins_of_this_layout_are_adopted(pin_dir):
    _pins_with_iface_map(pin_dir, 4, 16)
    fp = loader.FastPath(pin_dir, loader.Sizes(**SIZES))
    try:
        fp.load(adopt=True)
        assert fp.fn is not None
    finally:
        fp.close()


def _pin_counters(pin_dir: str, entries: int) -> None:
    """A fast-path counters array as a version counting `entries` reasons pinned it, with counts in it."""
    import ctypes as ct

    lib = loader._libbcc()
    ncpu = loader.possible_cpus()
    fd = lib.bcc_create_map(6, b"counters", 4, 8, entries, 0)  # BPF_MAP_TYPE_PERCPU_ARRAY of u64
    assert fd >= 0
    try:
        vals = (ct.c_uint64 * ncpu)(*([7] * ncpu))
        assert lib.bpf_update_elem(fd, ct.byref(ct.c_uint32(0)), vals, 0) == 0
        assert lib.bpf_obj_pin(fd, os.path.join(pin_dir, "counters").encode()) == 0
    finally:
        os.close(fd)


def _max_entries(path: str) -> int:
    lib = loader._libbcc()
    fd = lib.bpf_obj_get(path.encode())
    try:
        return loader._fdinfo_int(fd, "max_entries")
    finally:
        os.close(fd)


@pytest.mark.root
def test_counters_of_another_version_start_anew_and_the_rest_is_adopted(pin_dir, caplog):
    """An upgrade that counts one more drop reason (CNT_MAX grew) used to be refused: --fresh, every flow lost.
    The counters are created anew for this build (and said so); services and connections are adopted."""
    import logging

    _pins_with_iface_map(pin_dir, 4, 16)
    _pin_counters(pin_dir, 3)
    fp = loader.FastPath(pin_dir, loader.Sizes(**SIZES))
    try:
        with caplog.at_level(logging.WARNING, logger="hdslb.fastpath"):
            fp.load(adopt=True)
        assert fp.fn is not None
        want = int(fp.table("counters").max_entries)
        assert want > 3 and _max_entries(os.path.join(pin_dir, "counters")) == want
        assert "counters pinned by another hdslb version" in caplog.text and "max entries 3" in caplog.text
        assert all(v == 0 for v in fp.table("counters")[0]), "a new, empty map"
    finally:
        fp.close()


@pytest.mark.root
def test_a_refusal_puts_counters_of_another_version_back(pin_dir):
    _pins_with_iface_map(pin_dir, 4, 24)  # refused: the flows' tables cannot be made anew
    _pin_counters(pin_dir, 3)
    fp = loader.FastPath(pin_dir, loader.Sizes(**SIZES))
    try:
        with pytest.raises(RuntimeError, match="iface_map"):
            fp.load(adopt=True)
    finally:
        fp.close()
    assert _max_entries(os.path.join(pin_dir, "counters")) == 3, "the previous version's counters, as they were"


def test_a_pin_root_under_a_bpffs_is_used_as_it_is(pin_dir, monkeypatch):
    """`--pin-root /run/hdslb/bpffs/NAME` (a directory on the bpffs, not a mount point) got a bpffs of its own
    mounted over it: under `ip netns exec` that mount lived in the command's mount namespace, so kill -9 took the
    pins with it, the restart found its XDP program attached with no maps to adopt, and `down` left it running."""
    calls = []
    monkeypatch.setattr(loader.subprocess, "run", lambda *a, **kw: calls.append(a))
    sub = os.path.join(pin_dir, "instance")
    loader.ensure_bpffs(sub)
    assert calls == [] and os.path.isdir(sub)
    outside = f"/tmp/pytest-not-bpffs-{os.getpid()}"
    try:
        loader.ensure_bpffs(outside)
        assert calls and calls[0][0][:3] == ["mount", "-t", "bpf"]  # not on a bpffs: mounted, as before
    finally:
        os.rmdir(outside)
