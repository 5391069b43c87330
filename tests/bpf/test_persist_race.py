"""Persistence templates when two CPUs see a client network's first connections at once (BPF_PROG_TEST_RUN).

Both miss the template lookup and schedule, maybe different servers; each then writes its template. A race
of two CPUs cannot be run deterministically, so the state it leaves is made instead: this module's build has
a hook (-DHDSLB_TEST_PERSIST_RACE, never in the daemon's build) that, between pick_dest's lookup and its write,
copies a template the test stored under svc_id + HDSLB_TEST_PERSIST_RACE to the real key (or, where the lookup
found a stale template, into it in place, as a winning compare-and-swap would): another CPU's template landing
exactly there.
"""

import ipaddress
import os
import time

import pytest
from scapy.layers.inet import IP

from hdslb.fastpath.loader import DEFAULT_PIN_ROOT, FastPath, Sizes, ensure_bpffs
from hdslb.fastpath.maps import _put_addr

from .test_modes import A, CLIENT, RS1, RS2, RS3, TCP_, VIP, c4, dest, ring, run, service

RACE = 1000  # the hook's svc_id offset


class _RaceBuild(FastPath):
    def cflags(self, conn_fds, ncpus):
        return [*super().cflags(conn_fds, ncpus), f"-DHDSLB_TEST_PERSIST_RACE={RACE}"]


@pytest.fixture(scope="module")
def fastpath():
    ensure_bpffs(DEFAULT_PIN_ROOT)
    fp = _RaceBuild(os.path.join(DEFAULT_PIN_ROOT, f"pytest-bpf-{os.getpid()}-race"),
                    Sizes(max_conns=4096, max_services=64, max_dests=256, max_local=64, max_routes=256,
                          max_neigh=64))
    try:  # a load that fails (the compile) has already pinned the conn maps: removed all the same
        fp.load()
        yield fp
    finally:
        fp.close()
        fp.unpin()


@pytest.fixture
def m(fastpath, maps):
    maps.set_route(ipaddress.ip_network("192.168.100.0/24"),
                   1, None, None, 1500, False)
    for a in (RS1, RS2, RS3):
        maps.set_neigh(A(a), bytes.fromhex("025500000002"), 1, permanent=True)
    maps.set_laddrs(0, [(A("192.168.100.200"), 1)])
    return maps


def _template(fp, client, svc_id, slot):
    t = fp.table("persist_map")
    k, v = t.Key(), t.Leaf()
    _put_addr(k.addr, A(client))
    k.svc_id, k.af = svc_id, 4
    v.dest_slot = slot
    v.expires = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 60 * 10**9  # bpf_ktime_get_coarse_ns's clock
    t[k] = v
    return k


def test_a_first_connection_that_loses_the_template_race_follows_the_winner(fastpath, m):
    """The ring's next entry is RS1, but another CPU's first connection from the same client has just left a
    template for RS2: this connection goes to RS2 too and the template stays RS2's. (It went to RS1 and
    overwrote the template, splitting the client's connections across two servers.)"""
    service(fastpath, TCP_, VIP, 80, persist=60, plen=32)
    dest(m, 0, RS1, 80, "fnat")
    dest(m, 1, RS2, 80, "fnat")
    ring(fastpath, 0, [0, 1])
    k = _template(fastpath, CLIENT, RACE, 1)  # the other CPU's template, stored where the hook finds it
    out = run(fastpath, c4(sport=45000))[1]
    assert out[IP].dst == RS2
    k.svc_id = 0
    assert fastpath.table("persist_map")[k].dest_slot == 1, "the winner's template is kept"
    assert m.counters()["persist_hit"] == 1
    # later connections (no race) stay there
    assert {run(fastpath, c4(sport=45001 + i))[1][IP].dst for i in range(3)} == {RS2}


@pytest.mark.parametrize("no_persist", [False, True])
def test_a_connection_that_loses_the_race_to_a_drained_server_s_template_follows_it_while_it_holds(fastpath, m,
                                                                                                  no_persist):
    """The other CPU's first connection wrote a template for RS2 just before RS2 was drained; this one missed it,
    took RS1 from the new ring and lost the insert. A drained server's template holds (LVS), so this connection
    follows it to RS2 and the client stays on one server; a template the fast path would refuse (RS2 down) is
    not followed."""
    service(fastpath, TCP_, VIP, 80, persist=60, plen=32)
    dest(m, 0, RS1, 80, "fnat")
    dest(m, 1, RS2, 80, "fnat", drain=True, no_persist=no_persist)
    ring(fastpath, 0, [0])
    _template(fastpath, CLIENT, RACE, 1)
    assert run(fastpath, c4(sport=45000))[1][IP].dst == (RS1 if no_persist else RS2)
    assert m.counters()["persist_hit"] == (0 if no_persist else 1)


def test_without_a_race_the_first_connection_writes_its_own_template(fastpath, m):
    """The hook's build behaves as the daemon's when nothing is stored for it: the ring's pick, template written."""
    service(fastpath, TCP_, VIP, 80, persist=60, plen=32)
    dest(m, 0, RS1, 80, "fnat")
    dest(m, 1, RS2, 80, "fnat")
    ring(fastpath, 0, [0, 1])
    assert run(fastpath, c4(sport=45000))[1][IP].dst == RS1
    ((k, v),) = list(fastpath.table("persist_map").items())
    assert v.dest_slot == 0 and m.counters()["persist_hit"] == 0


@pytest.mark.parametrize("why", ["expired", "no_persist"])
def test_a_connection_that_loses_the_race_to_replace_a_stale_template_follows_the_winner(fastpath, m, why):
    """A stale template (expired, or its server no longer keeps persistent clients: down, say) is replaced by a
    compare-and-swap of its first word. Here another CPU's connection swaps in RS3 after this one read the
    template and scheduled RS2: this connection goes to RS3 too and the template stays RS3's. (Each CPU
    overwrote the template with its own choice, and their connections went to different servers.) A drained
    server's template is not stale: test_modes has it honoured."""
    service(fastpath, TCP_, VIP, 80, persist=60, plen=32)
    for slot, rs in enumerate((RS1, RS2, RS3)):
        stale = why == "no_persist" and slot == 0
        dest(m, slot, rs, 80, "fnat", drain=stale, no_persist=stale)
    ring(fastpath, 0, [1])
    k = _template(fastpath, CLIENT, 0, 0)  # the client's template: RS1 ...
    t = fastpath.table("persist_map")
    if why == "expired":  # ... long expired, or its server down (above)
        v = t[k]
        v.expires = 1
        t[k] = v
    _template(fastpath, CLIENT, RACE, 2)  # the other CPU's choice: RS3
    out = run(fastpath, c4(sport=45100))[1]
    assert out[IP].dst == RS3
    assert t[k].dest_slot == 2, "the winner's template is kept"
    assert m.counters()["persist_hit"] == 1


def test_a_stale_template_replaced_without_a_race_takes_this_connections_server(fastpath, m):
    service(fastpath, TCP_, VIP, 80, persist=60, plen=32)
    dest(m, 0, RS1, 80, "fnat")
    dest(m, 1, RS2, 80, "fnat")
    ring(fastpath, 0, [1])
    k = _template(fastpath, CLIENT, 0, 0)
    t = fastpath.table("persist_map")
    v = t[k]
    v.expires, v.seq = 1, 7
    t[k] = v
    assert run(fastpath, c4(sport=45200))[1][IP].dst == RS2
    v = t[k]
    assert (v.dest_slot, v.seq) == (1, 8) and v.expires > time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert m.counters()["persist_hit"] == 0
