"""Which addresses are ours (local_map, ARP/ND answers): one index over the model, each change written once.

Balancer.local_reasons() answers from an index of every local address, built in one walk of the addresses and
services and dropped by every change that can move it; inside a batch (Balancer.deferred) or a restore each
touched address's local_map entry is written once, at the end. Before, every answer walked every service: a
config batch of N services, each its own VIP, walked them 2N times (4,000 services: 35 s to load).
"""

import ipaddress
import random

import pytest

from hdslb.balancer import (LOCAL_IFADDR, LOCAL_LADDR, LOCAL_SAPOOL, LOCAL_VIP, Balancer, Iface, restore,
                            snapshot)

IFACES = {"eth0": Iface("eth0", 2, b"\x02" * 6, 1500), "eth1": Iface("eth1", 3, b"\x04" * 6, 1500)}


class LocalMap:
    """A datapath that keeps local_map as the fast path would hold it, and accepts every other write."""

    def __init__(self):
        self.local = {}
        self.writes = 0

    def local_set(self, addr, flags, ifindex):
        self.local[addr] = (flags, ifindex)
        self.writes += 1

    def local_del(self, addr):
        self.local.pop(addr, None)
        self.writes += 1

    def __getattr__(self, name):
        return lambda *a, **kw: None


def scan(b, addr):
    """local_reasons by its definition: a walk of every address and service (what the index must equal)."""
    flags, ifindex = 0, 0
    for ad in b.addrs:
        if ad.addr == addr:
            flags |= LOCAL_IFADDR | (LOCAL_SAPOOL if ad.sapool else 0)
            ifindex = b.ifaces[ad.ifname].ifindex
    for svc in b.services.values():
        for la in svc.laddrs:
            if la.addr == addr:
                flags |= LOCAL_LADDR
                ifindex = ifindex or b.ifaces[la.ifname].ifindex
        if svc.own_vip and svc.addr == addr:
            flags |= LOCAL_VIP
    if addr in b.retired_laddrs:  # a local address no service has, kept while its flows last
        flags |= LOCAL_LADDR
        ifindex = ifindex or b.ifaces[b.retired_laddrs[addr]].ifindex
    return flags, ifindex


POOL = [f"10.0.0.{i}" for i in range(1, 7)]  # few addresses: services, VIPs and local addresses collide often


def svc(i):
    return {"proto": "tcp", "addr": POOL[i % len(POOL)], "port": 80 + i // len(POOL)}


def random_op(b, rng):
    """One change that can move an address's reasons; refused ones (exists, not found) are fine."""
    k = rng.randrange(7)
    a = rng.choice(POOL)
    if k == 0:
        return b.addr_add, {"addr": a, "prefixlen": 32, "ifname": rng.choice(list(IFACES)), "sapool": rng.random() < .3}
    if k == 1:
        return b.addr_del, {"addr": a, "prefixlen": 32, "ifname": None}
    if k == 2:
        return b.service_add, dict(svc(rng.randrange(12)), sched="rr", own_vip=rng.random() < .6)
    if k == 3:
        return b.service_del, svc(rng.randrange(12))
    if k == 4:
        return b.laddr_add, {"svc": svc(rng.randrange(12)), "addr": a, "ifname": rng.choice(list(IFACES))}
    if k == 5:
        return b.laddr_del, {"svc": svc(rng.randrange(12)), "addr": a}
    # the sweep found no flow through the retired local addresses but these
    return b.release_laddrs, {ipaddress.ip_address(x) for x in POOL if rng.random() < .5}


def check(b):
    everyone = {ipaddress.ip_address(a) for a in POOL}
    for addr in everyone:
        want = scan(b, addr)
        assert b.local_reasons(addr) == want, addr
        assert b.is_local(addr) == bool(want[0] & (LOCAL_IFADDR | LOCAL_LADDR)), addr
        assert b.dp.local.get(addr) == (want if want[0] else None), addr  # the map holds exactly the model's answer


@pytest.mark.parametrize("seed", range(12))
def test_the_index_and_local_map_follow_every_change_in_and_out_of_batches(seed):
    rng = random.Random(seed)
    b = Balancer(LocalMap(), IFACES)
    for _ in range(60):
        if rng.random() < .3:  # a batch of changes: written at its end
            with b.deferred():
                for _ in range(rng.randrange(1, 8)):
                    fn, args = random_op(b, rng)
                    try:
                        fn(args)
                    except Exception:
                        pass
                    b.local_reasons(ipaddress.ip_address(rng.choice(POOL)))  # a read inside the batch sees it too
        else:
            fn, args = random_op(b, rng)
            try:
                fn(args)
            except Exception:
                pass
        check(b)
    other = Balancer(LocalMap(), IFACES)
    other.local_reasons(ipaddress.ip_address(POOL[0]))  # an index built before the restore replaces the model
    restore(other, snapshot(b))
    check(other)


def test_a_batch_of_own_vip_services_walks_the_services_a_few_times_not_once_per_service():
    b = Balancer(LocalMap(), IFACES)

    class Walks(dict):
        n = 0

        def values(self):
            Walks.n += 1
            return super().values()

    b.services = Walks()
    with b.deferred():
        for i in range(200):
            b.service_add({"proto": "tcp", "addr": f"10.1.{i // 250}.{i % 250 + 1}", "port": 80, "sched": "rr",
                           "own_vip": True})
            b.laddr_add({"svc": {"proto": "tcp", "addr": f"10.1.{i // 250}.{i % 250 + 1}", "port": 80},
                         "addr": "192.168.100.200", "ifname": "eth1"})
    assert Walks.n <= 4  # was 400+: local_reasons walked every service for each VIP and each local address
    assert len(b.dp.local) == 201 and b.dp.writes == 201  # each address written once, at the end
    assert b.dp.local[ipaddress.ip_address("192.168.100.200")] == (LOCAL_LADDR, 3)
    assert b.dp.local[ipaddress.ip_address("10.1.0.1")] == (LOCAL_VIP, 0)
