"""One compiled fast path for the whole bpf tier (a bcc compile costs ~2 s and ~220 MB)."""

import ctypes as ct
import os
import shutil

import pytest

from hdslb.fastpath.loader import CONN_TABLES, DEFAULT_PIN_ROOT, FastPath, Sizes, ensure_bpffs  # noqa: F401 (CONN_TABLES: for the modules)
from hdslb.fastpath.maps import Maps

LO_IFINDEX = 1  # BPF_PROG_TEST_RUN without a ctx runs as if received on loopback
LB_MAC = bytes.fromhex("02aa00000001")


@pytest.fixture(scope="session")
def fastpath_of():
    """The program compiled for one conn table kind ("percpu", "shared"), once per session per kind."""
    built: dict[str, FastPath] = {}

    def get(table: str) -> FastPath:
        if table not in built:
            ensure_bpffs(DEFAULT_PIN_ROOT)
            fp = FastPath(os.path.join(DEFAULT_PIN_ROOT, f"pytest-bpf-{os.getpid()}-{table}"),
                          Sizes(max_conns=4096, max_services=64, max_dests=256, max_local=64, max_routes=256,
                                max_neigh=64, conn_table=table))
            built[table] = fp
            fp.load()
        return built[table]

    yield get
    for fp in built.values():
        fp.close()
        fp.unpin()


@pytest.fixture
def own_pin(request):
    """A pin directory for a test's own FastPath loads (never the session builds' pins), emptied before and
    removed after."""
    ensure_bpffs(DEFAULT_PIN_ROOT)
    path = os.path.join(DEFAULT_PIN_ROOT, f"pytest-{request.node.module.__name__.rsplit('.', 1)[-1]}-{os.getpid()}")
    if os.path.isdir(path):
        shutil.rmtree(path)
    yield path
    if os.path.isdir(path):
        shutil.rmtree(path)


@pytest.fixture
def fastpath(fastpath_of):
    """The default build (per-CPU conn table). Modules about connections override this to run on both kinds
    (CONN_TABLES)."""
    return fastpath_of("percpu")




@pytest.fixture
def maps(fastpath):
    """Maps emptied before each test so tests cannot see each other's flows or counters."""
    m = Maps(fastpath)
    for name in ("svc_map", "sched_map", "laddr_map", "local_map", "iface_map", "route4_map", "route6_map", "neigh_map",
                 "conn4_map", "conn6_map", "persist_map"):
        t = m.t[name]
        for k in list(t.keys()):
            del t[k]
    for name, n in (("counters", len(m.counter_names)), ("svc_stats", 64), ("dest_stats", 256),
                    ("sched_cursor", 64), ("lport_cursor", 1), ("snat_map", 16), ("conn_single", 1),
                    ("punt_tat", 2)):
        t = fastpath.table(name)
        for i in range(n):
            t[ct.c_uint32(i)] = t.Leaf()
    m.t["cfg_map"][ct.c_uint32(0)] = m.t["cfg_map"].Leaf()  # flags (KNI routes, NAT64), SNAT rule count
    m.set_cfg(1025, 65535)
    m.set_idle_timeouts(None)  # a test that wants port reclaiming turns it on
    m.set_iface(LO_IFINDEX, LB_MAC, 1500)
    return m


@pytest.fixture
def slowpath_up(fastpath):
    """An AF_XDP socket (on lo, copy mode) in the XSKMAP slot BPF_PROG_TEST_RUN's packets map to (interface slot
    0, queue 0), as the daemon's slow path registers its sockets: punts become XDP_REDIRECT. Closing the socket
    removes the entry."""
    from hdslb.slowpath.xsk import XskSocket

    x = XskSocket("lo", 0)
    fastpath.table("xsks")[ct.c_int(0)] = ct.c_int(x.fd)
    yield x
    x.close()


def on_cpu(cpu, fn):
    """fn() run with this thread pinned to `cpu`: BPF_PROG_TEST_RUN runs the program on the caller's CPU."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        return fn()
    finally:
        os.sched_setaffinity(0, old)
