"""A restart that asks for another --conn-table or another table size keeps the pinned connections: the old
table is set aside, a new one made, and its entries copied over (hdslb/fastpath/conn_move.py) before and after
the new program is attached. Each FastPath here has its own pins (the session's builds are never touched)."""

import ctypes as ct
import os
import shutil
import socket
import struct

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from hdslb.fastpath import abi, conn_move, loader
from hdslb.fastpath.testrun import XDP_TX, run_xdp

from .conftest import LB_MAC, LO_IFINDEX

CLIENT, VIP, LIP, RS1 = "10.0.0.1", "10.0.0.100", "192.168.100.200", "192.168.100.2"
RS_MAC = bytes.fromhex("025500000002")
LB_MAC_S = ":".join(f"{b:02x}" for b in LB_MAC)
V, O, W = abi.CONN_F_VALID, abi.CONN_F_OUT, abi.CONN_F_WAS_EST
SYN_RECV, EST, FIN_WAIT = 1, 2, 3
SMALL = dict(max_services=64, max_dests=256, max_local=64, max_routes=256, max_neigh=64)


def a4(x):
    return socket.inet_aton(x)


def key4(saddr, sport, daddr, dport):
    return struct.pack("=2s2sBBH4s4s", sport.to_bytes(2, "big"), dport.to_bytes(2, "big"), socket.IPPROTO_TCP, 4, 0,
                       a4(saddr), a4(daddr))


def val4(to, flags=V, state=EST, last=1000):
    ts, tsp, td, tdp = to
    return struct.pack("=2s2sI6s6sHBBIB3xQ4s4s", tsp.to_bytes(2, "big"), tdp.to_bytes(2, "big"), LO_IFINDEX, RS_MAC,
                       LB_MAC, 0, flags, state, 0, 1, last, a4(ts), a4(td))


def key6(sport):
    z = socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.inet_pton(socket.AF_INET6, "fd00::100")
    return struct.pack("=2s2sBBH16s16s", sport.to_bytes(2, "big"), (80).to_bytes(2, "big"), socket.IPPROTO_TCP, 6, 0,
                       *z)


def val6(last):
    z = socket.inet_pton(socket.AF_INET6, "fd00::200"), socket.inet_pton(socket.AF_INET6, "fd00::2")
    return struct.pack("=2s2sI6s6sHBBIB3xQ16s16s", (2002).to_bytes(2, "big"), (8080).to_bytes(2, "big"), LO_IFINDEX,
                       RS_MAC, LB_MAC, 0, V, EST, 0, 1, last, *z)


def fd_of(fp, name):
    return fp.bpf[name].map_fd


def put(fd, key, copies):
    """Write an entry from user space: `copies` is one value (shared table) or one per possible CPU."""
    v = b"".join(copies)
    kb, vb = ct.create_string_buffer(key, len(key)), ct.create_string_buffer(v, len(v))
    assert loader._libbcc().bpf_update_elem(fd, kb, vb, 0) == 0


def get(fd, key, size, ncopies):
    """The entry's value copies, or None."""
    kb, vb = ct.create_string_buffer(key, len(key)), ct.create_string_buffer(size * ncopies)
    if loader._libbcc().bpf_lookup_elem(fd, kb, vb) != 0:
        return None
    raw = vb.raw
    return [raw[i * size:(i + 1) * size] for i in range(ncopies)]


def field(v, off, fmt):
    return struct.unpack_from(fmt, v, off)[0]


def state_of(v):
    return v[23]


def last_of(v):
    return field(v, 32, "<Q")


def keys(fp, name):
    return [bytes(k) for k in fp.table(name).keys()]


def start(pin, table, max_conns, max_conns6=256, adopt=True, bpf_dir=None):
    fp = loader.FastPath(pin, loader.Sizes(max_conns=max_conns, max_conns6=max_conns6, conn_table=table, **SMALL),
                         **({"bpf_dir": bpf_dir} if bpf_dir else {}))
    fp.load(adopt=adopt)
    return fp


def pins(pin):
    return sorted(n for n in os.listdir(pin) if n.startswith(("conn4_map", "conn6_map")))


def test_a_restart_with_another_table_kind_or_size_keeps_the_connections(own_pin, tmp_path):
    pin = own_pin
    ncpu = loader.possible_cpus()
    empty4 = bytes(abi.CONN4_VAL_SIZE)
    fin = key4(CLIENT, 40000, VIP, 80)                 # an IPv4 flow's two entries, its copies on two CPUs
    back = key4(RS1, 8080, LIP, 2001)
    fwd_to, back_to = (LIP, 2001, RS1, 8080), (VIP, 80, CLIENT, 40000)
    fps = []
    try:
        # per-CPU tables of 1024 + 256 entries, as a first start made them
        fp = start(pin, "percpu", 1024, adopt=False)
        fps.append(fp)
        copies_in = [val4(fwd_to, V | W, FIN_WAIT, 5000), val4(fwd_to, V, EST, 9000)] + [empty4] * (ncpu - 2)
        put(fd_of(fp, "conn4_map"), fin, copies_in[:ncpu] if ncpu > 1 else [val4(fwd_to, V | W, FIN_WAIT, 9000)])
        put(fd_of(fp, "conn4_map"), back, [val4(back_to, V | O, EST, 8000)] + [empty4] * (ncpu - 1))
        put(fd_of(fp, "conn6_map"), key6(40001), [val6(7000)] + [bytes(abi.CONN_VAL_SIZE)] * (ncpu - 1))
        fp.close()

        # restart asking for a shared table of twice the size (and a bigger IPv6 one)
        fp = start(pin, "shared", 2048, 512)
        fps.append(fp)
        assert set(fp.conn_moves) == {"conn4_map", "conn6_map"}
        assert pins(pin) == ["conn4_map", "conn4_map_old1", "conn6_map", "conn6_map_old1"]
        assert int(fp.table("conn4_map").max_entries) == 2048
        r = fp.move_conns(final=False)
        assert (r.copied, r.kept, r.dropped) == (3, 0, 0)
        # the newest copy, with the furthest state and WAS_EST any copy had (as the fast path's conn_newest)
        (got,) = get(fd_of(fp, "conn4_map"), fin, abi.CONN4_VAL_SIZE, 1)
        assert last_of(got) == 9000 and state_of(got) == FIN_WAIT and got[22] == V | W
        # meanwhile the old program, still attached, adds a flow and moves one on; the new one moves another
        old = loader._libbcc().bpf_obj_get(os.path.join(pin, "conn4_map_old1").encode())
        assert old >= 0
        late = key4(CLIENT, 40002, VIP, 80)
        put(old, late, [val4(fwd_to, V, SYN_RECV, 9500)] + [empty4] * (ncpu - 1))
        put(old, back, [val4(back_to, V | O, FIN_WAIT, 9600)] + [empty4] * (ncpu - 1))
        put(fd_of(fp, "conn4_map"), fin, [val4(fwd_to, V | W, CLOSE_ := 4, 9700)])
        put(old, fin, [val4(fwd_to, V, EST, 9100)] + [empty4] * (ncpu - 1))  # older than the new table's
        os.close(old)
        r = fp.move_conns(final=True)
        assert (r.copied, r.kept, r.dropped) == (2, 2, 0), r  # fin kept (the new table's is newer), the IPv6 one too
        assert pins(pin) == ["conn4_map", "conn6_map"] and not fp.conn_moves
        fd4 = fd_of(fp, "conn4_map")
        assert state_of(get(fd4, fin, abi.CONN4_VAL_SIZE, 1)[0]) == CLOSE_      # the new program's, kept
        assert state_of(get(fd4, back, abi.CONN4_VAL_SIZE, 1)[0]) == FIN_WAIT   # moved on in the old: copied
        assert last_of(get(fd4, late, abi.CONN4_VAL_SIZE, 1)[0]) == 9500        # added in the old: copied
        assert len(keys(fp, "conn4_map")) == 3 and len(keys(fp, "conn6_map")) == 1
        # the moved reply entry forwards as before (CLOSE_ on `fin` makes its SYN-less packets stale)
        pkt = Ether(src="02:55:00:00:00:02", dst=LB_MAC_S) / IP(src=RS1, dst=LIP) / TCP(sport=8080, dport=2001,
                                                                                          flags="A")
        v, out, _ = run_xdp(fp.prog_fd, bytes(pkt))
        p = Ether(out)
        assert v == XDP_TX and (p[IP].src, p[IP].dst, p[TCP].sport, p[TCP].dport) == (VIP, CLIENT, 80, 40000)

        # many more entries, then back to per-CPU in a table smaller than them: the newest are kept
        fd4 = fd_of(fp, "conn4_map")
        for i in range(300):
            put(fd4, key4("10.9.0.1", 1000 + i, VIP, 80), [val4(fwd_to, V, EST, 20000 + i)])
        fp.close()
        fp = start(pin, "percpu", 256)
        fps.append(fp)
        assert pins(pin) == ["conn4_map", "conn4_map_old1", "conn6_map", "conn6_map_old1"]
        r = fp.move_conns(final=False)
        fill = conn_move.limit(256, ncpu)  # what an LRU table of 256 takes without evicting (128 on 2 CPUs)
        assert (r.copied, r.dropped) == (fill + 1, 303 - fill), r  # conn4's newest, and the IPv6 one
        fd4 = fd_of(fp, "conn4_map")
        got = {k: get(fd4, k, abi.CONN4_VAL_SIZE, ncpu) for k in keys(fp, "conn4_map")}
        # the newest: the reply entry the packet above touched (last_seen now) and the newest of the 300
        assert set(got) == {back} | {key4("10.9.0.1", 1000 + i, VIP, 80) for i in range(300 - fill + 1, 300)}
        # an entry of a shared table becomes CPU 0's copy, the others empty (another CPU takes it over)
        assert all(v[1:] == [empty4] * (ncpu - 1) and v[0][22] & V for v in got.values())

        # the daemon died before the second copy: the next start finds the set-aside tables and copies again
        fp.close()
        fp = start(pin, "percpu", 256)
        fps.append(fp)
        assert set(fp.conn_moves) == {"conn4_map", "conn6_map"} and "conn4_map_old1" in pins(pin)
        r = fp.move_conns(final=True)
        assert (r.copied, r.kept, r.dropped) == (0, fill + 1, 303 - fill) and pins(pin) == ["conn4_map", "conn6_map"]
        assert len(keys(fp, "conn4_map")) == fill

        # one that died between setting a table aside and pinning the new one: the next start makes it and copies
        fp.close()
        os.rename(os.path.join(pin, "conn4_map"), os.path.join(pin, "conn4_map_old1"))
        fp = start(pin, "percpu", 256)
        fps.append(fp)
        assert list(fp.conn_moves) == ["conn4_map"]
        r = fp.move_conns(final=True)
        assert (r.copied, r.dropped) == (fill, 0) and len(keys(fp, "conn4_map")) == fill
        assert pins(pin) == ["conn4_map", "conn6_map"]

        # a start that fails after setting the tables aside puts them back as they were
        fp.close()
        broken = tmp_path / "bpf"
        shutil.copytree(abi.BPF_DIR, broken)
        (broken / "hdslb_xdp.c").write_text((broken / "hdslb_xdp.c").read_text() + "\n#error broken on purpose\n")
        with pytest.raises(RuntimeError, match="cannot compile"):
            start(pin, "shared", 4096, bpf_dir=broken)
        assert pins(pin) == ["conn4_map", "conn6_map"]
        fp = start(pin, "percpu", 256)
        fps.append(fp)
        assert not fp.conn_moves and len(keys(fp, "conn4_map")) == fill
    finally:
        for f in fps:
            f.close()
