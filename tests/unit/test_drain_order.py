"""No new flow meets a table that still names a server the fast path already refuses.

The fast path checks the slot a table picks (pick_dest's dest_usable: a slot flagged DEST_F_DRAIN is refused) and
drops the flow (`drop_no_dest`) when it is drained: tables never hold a drained server, so that only happens when
a server's slot says "drained" before its service's table has stopped naming it. A drain (ipvsadm -e -w 0, REST,
a reload), a failed health check or a sorry server's hold must therefore swap the table first and flag the slot
after; an undrain the other way round. An mh or conhash table takes 25-160 ms to write (and a reload's batch
builds its tables at its end): new flows hashing to the drained server were dropped all that time, where LVS
drains without dropping anything.
"""

import ipaddress

import pytest

from hdslb.balancer import Balancer, Iface

SVC = {"proto": "tcp", "addr": "10.0.0.100", "port": 80}
RS = [{"svc": SVC, "addr": f"192.168.100.{i}", "port": 80} for i in (2, 3, 4)]


class FastPathModel:
    """What the maps hold, as far as pick_dest reads them: each slot's drain flag, each service's live table. Every
    write is checked: no live table may name a slot flagged drained (or cleared)."""

    def __init__(self):
        self.drained: dict[int, bool] = {}   # slot -> DEST_F_DRAIN (absent: cleared)
        self.cells: dict[int, int] = {}
        self.tables: dict[int, list] = {}    # svc_id -> the slots its live table names
        self.bad: list[str] = []

    def _check(self, what):
        for svc_id, slots in self.tables.items():
            for s in set(slots):
                if self.drained.get(s, True):
                    self.bad.append(f"after {what}: service {svc_id}'s live table names slot {s}, which the fast "
                                    f"path refuses ({'cleared' if s not in self.drained else 'drained'})")

    def dest_set(self, svc, d, no_persist=False):
        self.drained[d.slot] = d.eff_weight == 0
        self._check(f"dest_set({d.addr}, drain={d.eff_weight == 0})")

    def dest_clear(self, d):
        self.drained.pop(d.slot, None)
        self._check(f"dest_clear({d.addr})")

    def hash_cells_set(self, first, entries):
        for i, s in enumerate(entries):
            self.cells[first + i] = s

    def sched_set(self, svc, table, hoff):
        if table.kind == "hash":
            self.tables[svc.svc_id] = [self.cells[hoff + i] for i in range(len(table.entries))]
        else:
            self.tables[svc.svc_id] = list(table.entries)
        self._check(f"sched_set({svc.sched})")

    def service_del(self, svc):
        self.tables.pop(svc.svc_id, None)

    def __getattr__(self, name):
        return lambda *a, **k: None


def make(sched_name):
    ifaces = {"eth0": Iface("eth0", 2, b"\x02" * 6, 1500)}
    b = Balancer(FastPathModel(), ifaces)
    b.service_add(dict(SVC, sched=sched_name, persistent=60))
    for rs in RS:
        b.dest_add(dict(rs, fwd="fnat", weight=2))
    assert not b.dp.bad
    return b


SCHEDS = ["rr", "wrr", "wlc", "sh", "mh", "conhash", "fo"]


@pytest.mark.parametrize("sched_name", SCHEDS)
def test_drain_by_hand_swaps_the_table_before_flagging_the_slot(sched_name):
    b = make(sched_name)
    b.dest_edit(dict(RS[0], weight=0))
    assert b.dp.bad == []
    b.dest_edit(dict(RS[0], weight=3))  # back: the slot is usable before a table names it again
    assert b.dp.bad == []


@pytest.mark.parametrize("sched_name", SCHEDS)
def test_drain_in_a_batch_flags_the_slot_once_the_tables_stand(sched_name):
    """A reload, ipvsadm -R, a REST bulk PUT: one batch, tables built at its end."""
    b = make(sched_name)
    with b.deferred():
        b.dest_edit(dict(RS[0], weight=0))
        b.dest_edit(dict(RS[1], weight=5))
    assert b.dp.bad == []
    svc = b.get_service(SVC)
    assert [d.eff_weight for d in svc.dests.values()] == [0, 5, 2]
    assert b.dp.drained == {d.slot: d.eff_weight == 0 for d in svc.dests.values()}
    with b.deferred():
        b.dest_edit(dict(RS[0], weight=1))
    assert b.dp.bad == [] and not any(b.dp.drained.values())


@pytest.mark.parametrize("sched_name", SCHEDS)
def test_health_down_and_sorry_hold_swap_the_table_first(sched_name):
    b = make(sched_name)
    b.dest_health(dict(RS[0]), False, None, "connect refused")
    assert b.dp.bad == []
    b.dest_health(dict(RS[0]), True, None, "")
    assert b.dp.bad == []
    b.dest_health_many([(dict(RS[1]), False, None, "timeout"), (dict(RS[2]), False, 0, "timeout")])
    assert b.dp.bad == []
    b.dest_health_many([(dict(RS[1]), True, None, ""), (dict(RS[2]), True, None, "")])
    assert b.dp.bad == []
    b.hold_for_sorry(SVC, True)  # keepalived's lost quorum: every real server out
    assert b.dp.bad == [] and all(b.dp.drained.values())
    b.hold_for_sorry(SVC, False)
    assert b.dp.bad == [] and not any(b.dp.drained.values())


def test_a_deferred_slot_write_never_lands_on_a_slot_removed_later_in_the_batch():
    """The drained slot is written after the tables; if the batch removed the server (or its service) meanwhile, the
    slot stays cleared, and a slot handed to a new server in the same batch keeps that server."""
    b = make("rr")
    svc = b.get_service(SVC)
    slot = svc.dests[(ipaddress.ip_address(RS[0]["addr"]), 80)].slot
    with b.deferred():
        b.dest_edit(dict(RS[0], weight=0))
        b.dest_del(dict(RS[0]))
    assert slot not in b.dp.drained and b.dp.bad == []
    other = {"proto": "tcp", "addr": "10.0.0.101", "port": 80}
    b2 = make("rr")
    with b2.deferred():
        b2.dest_edit(dict(RS[1], weight=0))
        b2.service_del(SVC)
        b2.service_add(dict(other, sched="rr"))
        b2.dest_add({"svc": other, "addr": "192.168.100.9", "port": 80, "fwd": "fnat"})
    new = b2.get_service(other)
    (d,) = new.dests.values()
    assert b2.dp.drained.get(d.slot) is False
    assert b2.dp.bad == []
