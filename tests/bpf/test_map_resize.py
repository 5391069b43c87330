"""A restart with another --max-services, --max-dests, --max-hash-cells or --max-persist makes those maps anew at
the new size (a map's size is fixed when it is made): what the fast path itself wrote (counters, round-robin
cursors, persistence templates) is copied, the control plane's tables are left for the daemon's saved model to
write again, and the old pins go once the daemon calls finish_resize(). Its own pins, never the session's."""

import ctypes as ct
import os
import shutil
import struct

import pytest

from hdslb.fastpath import abi, conn_move, loader

SMALL = dict(max_conns=1024, max_conns6=256, max_local=64, max_routes=256, max_neigh=64)


def start(pin, services, dests, cells=4096, persist=256, adopt=True, bpf_dir=None):
    fp = loader.FastPath(pin, loader.Sizes(max_services=services, max_dests=dests, max_hash_cells=cells,
                                           max_persist=persist, **SMALL), **({"bpf_dir": bpf_dir} if bpf_dir else {}))
    fp.load(adopt=adopt)
    return fp


def raw_put(fp, name, key: bytes, value: bytes):
    kb, vb = ct.create_string_buffer(key, len(key)), ct.create_string_buffer(value, len(value))
    assert loader._libbcc().bpf_update_elem(fp.bpf[name].map_fd, kb, vb, 0) == 0


def raw_get(fp, name, key: bytes, size: int):
    kb, vb = ct.create_string_buffer(key, len(key)), ct.create_string_buffer(size)
    return vb.raw if loader._libbcc().bpf_lookup_elem(fp.bpf[name].map_fd, kb, vb) == 0 else None


def u32(i):
    return struct.pack("=I", i)


def stats(ncpu, base):
    """A traffic_stats value per CPU (conns, inpkts, outpkts, inbytes, outbytes)."""
    return b"".join(struct.pack("=5Q", base + c, 2, 3, 4, 5) for c in range(ncpu))


def persist_key(i):
    return struct.pack("=4s12xIB3x", bytes([10, 0, i >> 8, i & 255]), 0, 4)


def persist_val(slot, expires):
    return struct.pack("=IIQ", slot, 0, expires)


def sizes_of(fp, *names):
    return [int(fp.bpf[n].max_entries) for n in names]


def olds(pin):
    return sorted(n for n in os.listdir(pin) if n.endswith("_old1"))


def test_a_restart_with_other_map_sizes_keeps_what_the_fast_path_wrote(own_pin, tmp_path):
    pin = own_pin
    ncpu = loader.possible_cpus()
    fps = []
    try:
        fp = start(pin, 64, 256, adopt=False)
        fps.append(fp)
        raw_put(fp, "svc_stats", u32(63), stats(ncpu, 1000))
        raw_put(fp, "dest_stats", u32(200), stats(ncpu, 2000))
        raw_put(fp, "sched_cursor", u32(5), b"".join(struct.pack("=Q", 7 + c) for c in range(ncpu)))
        for i in range(200):
            raw_put(fp, "persist_map", persist_key(i), persist_val(i, 10_000 + i))
        raw_put(fp, "dest_map", u32(3), b"\x01" * 28)  # struct dest_val
        fp.close()

        # bigger: every resizable map made anew, the fast path's own state copied, the control plane's left empty
        fp = start(pin, 128, 512, cells=8192, persist=512)
        fps.append(fp)
        assert sorted(fp.resized) == sorted(loader.FastPath.RESIZABLE)
        assert sizes_of(fp, "svc_map", "svc_stats", "dest_map", "dest_stats", "hash_cells", "persist_map") == \
            [128, 128, 512, 512, 8192, 512]
        assert raw_get(fp, "svc_stats", u32(63), 40 * ncpu) == stats(ncpu, 1000)
        assert raw_get(fp, "dest_stats", u32(200), 40 * ncpu) == stats(ncpu, 2000)
        assert raw_get(fp, "sched_cursor", u32(5), 8 * ncpu) == b"".join(struct.pack("=Q", 7 + c) for c in range(ncpu))
        assert raw_get(fp, "persist_map", persist_key(199), 16) == persist_val(199, 10_199)
        assert len(list(fp.table("persist_map").keys())) == 200
        assert raw_get(fp, "dest_map", u32(3), 28) == bytes(28)  # the daemon's model writes it again
        assert len(olds(pin)) == len(loader.FastPath.RESIZABLE)
        assert fp.finish_resize() == sorted(loader.FastPath.RESIZABLE) and olds(pin) == [] and not fp.resized

        # a start that did not finish (died before finish_resize): the next one makes the maps again from the
        # set-aside ones, whatever the new ones held
        fp.close()
        fp = start(pin, 32, 128, cells=8192, persist=64)
        fps.append(fp)
        assert "svc_stats_old1" in olds(pin)
        fp.close()
        fp = start(pin, 32, 128, cells=8192, persist=64)
        fps.append(fp)
        # smaller: slots past the new size are gone; of the templates, those expiring last, as many as fit
        assert sizes_of(fp, "svc_stats", "dest_stats", "persist_map") == [32, 128, 64]
        assert raw_get(fp, "svc_stats", u32(63), 40 * ncpu) is None and raw_get(fp, "dest_stats", u32(200), 40) is None
        fill = conn_move.limit(64, ncpu)
        kept = sorted(struct.unpack_from("=Q", raw_get(fp, "persist_map", bytes(k), 16), 8)[0]
                      for k in fp.table("persist_map").keys())
        assert kept == [10_000 + i for i in range(200 - fill, 200)]
        fp.finish_resize()

        # a start that fails after setting maps aside puts them back as they were
        fp.close()
        broken = tmp_path / "bpf"
        shutil.copytree(abi.BPF_DIR, broken)
        (broken / "hdslb_xdp.c").write_text((broken / "hdslb_xdp.c").read_text() + "\n#error broken on purpose\n")
        with pytest.raises(RuntimeError, match="cannot compile"):
            start(pin, 256, 1024, bpf_dir=broken)
        assert olds(pin) == []
        fp = start(pin, 32, 128, cells=8192, persist=64)
        fps.append(fp)
        assert not fp.resized and sizes_of(fp, "svc_stats", "persist_map") == [32, 64]

        # a reload (allow_resize off: no model to write the maps) refuses another size as before
        fp.close()
        fp = loader.FastPath(pin, loader.Sizes(max_services=64, max_dests=128, max_hash_cells=8192, max_persist=64,
                                               **SMALL))
        fp.allow_resize = False
        with pytest.raises(RuntimeError, match=r"has 32 entries, not 64: keep --max-services\b"):
            fp.load(adopt=True)
        assert olds(pin) == []
    finally:
        for f in fps:
            f.close()
