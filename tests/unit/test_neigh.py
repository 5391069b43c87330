"""The neighbour table's state machine on a fake clock: resolution, aging, re-probing, failure, queues, static."""

import ipaddress

import pytest

from hdslb.slowpath.neigh import DPVS_STATE, NeighTable, Probe, State

IP = ipaddress.ip_address("192.168.100.2")
MAC1 = bytes.fromhex("525400000002")
MAC2 = bytes.fromhex("525400000099")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, s):
        self.t += s


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def tbl(clock):
    return NeighTable(now=clock, timeout=60, unres_queue_length=128, max_probes=3, retrans=1.0)


def test_incomplete_reachable_stale_reprobe_reachable(tbl, clock):
    mac, ev = tbl.resolve(IP, "eth1", b"frame-1")
    assert mac is None and ev.queued == 1 and ev.probes == [Probe(IP, "eth1", None)]
    assert tbl.get(IP).state is State.INCOMPLETE

    ev = tbl.learn(IP, MAC1, "eth1", confirmed=True)
    assert tbl.get(IP).state is State.REACHABLE
    assert ev.updates == [(IP, MAC1, "eth1", False)]
    assert ev.send == [("eth1", b"frame-1", MAC1)]

    clock.advance(59.9)
    assert not tbl.tick().probes and tbl.get(IP).state is State.REACHABLE
    clock.advance(0.1)
    tbl.tick()
    assert tbl.get(IP).state is State.STALE

    # still usable while stale; using it starts a unicast re-probe to the MAC we have
    mac, ev = tbl.resolve(IP, "eth1")
    assert mac == MAC1 and ev.probes == [Probe(IP, "eth1", MAC1)]
    assert tbl.get(IP).state is State.PROBE

    ev = tbl.learn(IP, MAC1, "eth1", confirmed=True)
    assert tbl.get(IP).state is State.REACHABLE and ev.updates == [(IP, MAC1, "eth1", False)]


def test_reprobe_goes_broadcast_after_the_first_unicast_then_fails(tbl, clock):
    tbl.learn(IP, MAC1, "eth1", confirmed=True)
    clock.advance(60)
    tbl.tick()
    _, ev = tbl.resolve(IP, "eth1")
    assert ev.probes == [Probe(IP, "eth1", MAC1)]
    clock.advance(1)
    assert tbl.tick().probes == [Probe(IP, "eth1", None)]
    clock.advance(1)
    assert tbl.tick().probes == [Probe(IP, "eth1", None)]
    assert tbl.resolve(IP, "eth1")[0] == MAC1, "still used while being re-probed"
    clock.advance(1)
    ev = tbl.tick()
    assert ev.deletes == [(IP, "eth1")] and not ev.probes
    assert tbl.get(IP).state is State.FAILED and tbl.get(IP).mac is None


def test_incomplete_retries_then_fails_and_drops_the_queue(tbl, clock):
    for i in range(3):
        tbl.resolve(IP, "eth1", b"f%d" % i)
    probes = []
    for _ in range(2):
        clock.advance(1)
        ev = tbl.tick()
        probes += ev.probes
        assert ev.dropped == 0
    assert len(probes) == 2  # three in all, one second apart, the first at creation
    clock.advance(1)
    ev = tbl.tick()
    assert ev.dropped == 3 and not ev.probes and not ev.deletes  # never in the map: nothing to delete
    e = tbl.get(IP)
    assert e.state is State.FAILED and not e.queue
    assert tbl.stats["failed"] == 1 and tbl.stats["dropped_failed"] == 3

    # hold-down: frames to a dead next hop are dropped, not queued, and start no probe burst
    _, ev = tbl.resolve(IP, "eth1", b"late")
    assert ev.dropped == 1 and not ev.probes and ev.queued == 0
    clock.advance(3)
    _, ev = tbl.resolve(IP, "eth1", b"later")
    assert ev.queued == 1 and ev.probes == [Probe(IP, "eth1", None)]
    assert tbl.get(IP).state is State.INCOMPLETE


def test_failed_entry_is_forgotten_after_the_hold(tbl, clock):
    tbl.resolve(IP, "eth1")
    for _ in range(3):
        clock.advance(1)
        tbl.tick()
    assert tbl.get(IP).state is State.FAILED
    clock.advance(3)
    tbl.tick()
    assert IP not in tbl


def test_permanent_never_changes(tbl, clock):
    tbl.set_permanent(IP, MAC1, "eth1")
    ev = tbl.learn(IP, MAC2, "eth1", confirmed=True)
    assert not ev.updates and tbl.stats["ignored_permanent"] == 1
    tbl.learn(IP, MAC2, "eth0", confirmed=False)
    clock.advance(10_000)
    ev = tbl.tick()
    assert not (ev.probes or ev.deletes or ev.updates)
    e = tbl.get(IP)
    assert (e.state, e.mac, e.ifname) == (State.PERMANENT, MAC1, "eth1")
    mac, ev = tbl.resolve(IP, "eth1", b"x")
    assert mac == MAC1 and not ev.probes and ev.queued == 0
    row = tbl.show()[0]
    assert (row["state"], row["flags"], row["lladdr"]) == ("REACHABLE", ["static"], "52:54:00:00:00:02")


def test_static_entry_added_while_frames_wait_sends_them(tbl):
    tbl.resolve(IP, "eth1", b"a")
    tbl.resolve(IP, "eth1", b"b")
    ev = tbl.set_permanent(IP, MAC1, "eth1")
    assert ev.send == [("eth1", b"a", MAC1), ("eth1", b"b", MAC1)] and not ev.updates
    ev = tbl.remove(IP)
    assert not ev.deletes, "the model deletes static entries from the map itself"
    assert IP not in tbl


def test_mac_change_replaces_the_old_one(tbl, clock):
    tbl.learn(IP, MAC1, "eth1", confirmed=True)
    clock.advance(5)
    ev = tbl.learn(IP, MAC2, "eth1", confirmed=False)  # e.g. a gratuitous ARP from the replaced server
    assert ev.updates == [(IP, MAC2, "eth1", False)]
    e = tbl.get(IP)
    assert e.mac == MAC2 and e.state is State.STALE
    assert tbl.stats["mac_changed"] == 1


def test_same_mac_unconfirmed_keeps_state(tbl):
    tbl.learn(IP, MAC1, "eth1", confirmed=True)
    ev = tbl.learn(IP, MAC1, "eth1", confirmed=False)
    assert not ev.updates and tbl.get(IP).state is State.REACHABLE


def test_na_without_override_does_not_replace_but_casts_doubt(tbl):
    tbl.learn(IP, MAC1, "eth1", confirmed=True)
    ev = tbl.learn(IP, MAC2, "eth1", confirmed=True, override=False)
    e = tbl.get(IP)
    assert not ev.updates and e.mac == MAC1 and e.state is State.STALE


def test_learn_without_create_only_updates_existing(tbl):
    assert not tbl.learn(IP, MAC1, "eth1", confirmed=False, create=False).updates
    assert IP not in tbl
    ev = tbl.learn(IP, MAC1, "eth1", confirmed=False, create=True)
    assert ev.updates and tbl.get(IP).state is State.STALE


def test_confirmation_without_mac_only_confirms(tbl):
    tbl.resolve(IP, "eth1", b"x")
    ev = tbl.learn(IP, None, "eth1", confirmed=True)
    assert not ev.updates and not ev.send and tbl.get(IP).state is State.INCOMPLETE
    tbl.learn(IP, MAC1, "eth1", confirmed=False)
    ev = tbl.learn(IP, None, "eth1", confirmed=True)
    assert tbl.get(IP).state is State.REACHABLE and ev.updates


def test_unresolved_queue_is_bounded_and_flushes_in_order(clock):
    tbl = NeighTable(now=clock, unres_queue_length=4)
    queued = dropped = 0
    for i in range(6):
        mac, ev = tbl.resolve(IP, "eth1", b"frame-%d" % i)
        queued += ev.queued
        dropped += ev.dropped
    assert (queued, dropped) == (4, 2)
    assert tbl.stats["dropped_full"] == 2
    assert tbl.show()[0]["queued"] == 4
    ev = tbl.learn(IP, MAC1, "eth1", confirmed=True)
    assert [f for _, f, _ in ev.send] == [b"frame-0", b"frame-1", b"frame-2", b"frame-3"]
    assert not tbl.get(IP).queue


def test_one_queue_per_next_hop(tbl):
    other = ipaddress.ip_address("192.168.100.3")
    tbl.resolve(IP, "eth1", b"to-2")
    tbl.resolve(other, "eth1", b"to-3")
    ev = tbl.learn(other, MAC2, "eth1", confirmed=True)
    assert ev.send == [("eth1", b"to-3", MAC2)]
    assert len(tbl.get(IP).queue) == 1


def test_unused_stale_entries_are_forgotten(tbl, clock):
    tbl.learn(IP, MAC1, "eth1", confirmed=False)
    clock.advance(59)
    assert not tbl.tick().deletes
    clock.advance(1)
    assert tbl.tick().deletes == [(IP, "eth1")]
    assert IP not in tbl


def test_used_stale_entries_are_kept_and_reconfirmed(tbl, clock):
    tbl.learn(IP, MAC1, "eth1", confirmed=True)
    for _ in range(5):  # a next hop the daemon keeps wanting: confirmed once per timeout, never dropped
        clock.advance(60)
        tbl.tick()
        mac, ev = tbl.resolve(IP, "eth1")
        assert mac == MAC1 and ev.probes == [Probe(IP, "eth1", MAC1)]
        tbl.learn(IP, MAC1, "eth1", confirmed=True)
        assert tbl.get(IP).state is State.REACHABLE


def test_route_moved_to_another_interface(tbl):
    tbl.learn(IP, MAC1, "eth1", confirmed=True)
    mac, ev = tbl.resolve(IP, "eth0", b"x")
    assert mac is None and ev.deletes == [(IP, "eth1")] and ev.probes == [Probe(IP, "eth0", None)]
    assert tbl.get(IP).ifname == "eth0"


def test_heard_on_another_interface_never_touches_the_entry(tbl):
    """Linux keeps a table per interface: an ARP or NA heard on eth0 about an address whose entry is on eth1 (a host
    on the client side claiming a real server's address) changes nothing; only a route moving moves it
    (test_route_moved_to_another_interface). It used to move the entry there, with the other host's MAC."""
    tbl.learn(IP, MAC1, "eth1", confirmed=True)
    for mac in (MAC1, MAC2):
        ev = tbl.learn(IP, mac, "eth0", confirmed=True)
        assert not ev.updates and not ev.deletes and ev.counters["neigh_other_iface"] == 1
    e = tbl.get(IP)
    assert (e.ifname, e.mac, e.state) == ("eth1", MAC1, State.REACHABLE)
    # nor is a next hop wanted on eth1 made on eth0 by what eth0 hears
    other = ipaddress.ip_address("192.168.100.3")
    tbl.keep_wanted({other: "eth1"})
    tbl.remove(other)
    ev = tbl.learn(other, MAC2, "eth0", confirmed=False)
    assert not ev.updates and tbl.get(other) is None


def test_adopt_takes_over_map_entries_as_stale(tbl, clock):
    tbl.resolve(IP, "eth1", b"q")
    ev = tbl.adopt(IP, MAC1, "eth1")
    assert ev.send == [("eth1", b"q", MAC1)] and not ev.updates
    other = ipaddress.ip_address("10.0.0.1")
    tbl.adopt(other, MAC2, "eth0")
    assert tbl.get(other).state is State.STALE
    tbl.learn(other, MAC1, "eth0", confirmed=True)
    tbl.adopt(other, MAC2, "eth0")
    assert tbl.get(other).mac == MAC1, "what the table learned beats what the map held"


def test_show_uses_dpvs_state_names(tbl, clock):
    ips = [ipaddress.ip_address(f"10.0.0.{i}") for i in range(1, 7)]
    tbl.resolve(ips[0], "eth0", b"x")  # INCOMPLETE
    tbl.learn(ips[1], MAC1, "eth0", confirmed=True)  # REACHABLE
    tbl.learn(ips[2], MAC1, "eth0", confirmed=False)  # STALE
    tbl.learn(ips[3], MAC1, "eth0", confirmed=True)
    tbl.set_permanent(ips[4], MAC2, "eth1")  # PERMANENT
    v6 = ipaddress.ip_address("2001:db8::2")
    tbl.learn(v6, MAC2, "eth0", confirmed=True)
    tbl.entries[ips[3]].state = State.STALE
    tbl.resolve(ips[3], "eth0")  # PROBE
    rows = {r["addr"]: r for r in tbl.show()}
    assert [rows[str(i)]["state"] for i in ips[:5]] == ["SEND", "REACHABLE", "PROBE", "DELAY", "REACHABLE"]
    assert rows["10.0.0.1"]["lladdr"] == "" and rows["10.0.0.1"]["queued"] == 1
    assert rows["10.0.0.3"]["nud"] == "stale" and rows["10.0.0.3"]["flags"] == ["learned"]
    assert [r["addr"] for r in tbl.show(af=6)] == ["2001:db8::2"]
    assert [r["addr"] for r in tbl.show(ifname="eth1")] == ["10.0.0.5"]
    assert set(DPVS_STATE) == set(State)
    assert list(rows) == sorted(rows, key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))


def test_keep_wanted_notes_use_of_reachable_next_hops_and_resolves_the_rest(tbl, clock):
    other = ipaddress.ip_address("192.168.100.3")
    new = ipaddress.ip_address("192.168.100.4")
    tbl.learn(IP, MAC1, "eth1", confirmed=True)
    tbl.learn(other, MAC2, "eth1", confirmed=True)
    clock.advance(60)
    tbl.tick()                                           # both STALE now
    tbl.learn(IP, MAC1, "eth1", confirmed=True)          # IP confirmed again: REACHABLE
    clock.advance(1)
    ev = tbl.keep_wanted({IP: "eth1", other: "eth1", new: "eth1"})
    assert tbl.get(IP).state is State.REACHABLE and tbl.get(IP).used == clock()
    # the stale one is re-confirmed by unicast to its known MAC, the unknown one asked for by broadcast
    assert ev.probes == [Probe(other, "eth1", MAC2), Probe(new, "eth1", None)]
    assert tbl.get(other).state is State.PROBE and tbl.get(new).state is State.INCOMPLETE
    # a wanted next hop whose route moved to another interface is resolved afresh there
    ev = tbl.keep_wanted({IP: "eth2"})
    assert tbl.get(IP).ifname == "eth2" and tbl.get(IP).state is State.INCOMPLETE
    assert ev.deletes == [(IP, "eth1")] and ev.probes == [Probe(IP, "eth2", None)]


def test_a_wanted_next_hop_is_never_forgotten_while_wanted(tbl, clock):
    tbl.learn(IP, MAC1, "eth1", confirmed=True)
    for _ in range(10):                                  # 10 minutes, asked for every minute
        clock.advance(60)
        tbl.tick()
        tbl.keep_wanted({IP: "eth1"})
        tbl.learn(IP, MAC1, "eth1", confirmed=True)      # the probe's answer
    assert tbl.get(IP) is not None and tbl.get(IP).state is State.REACHABLE
