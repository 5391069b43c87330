"""Solicited-node group memberships for our IPv6 addresses (hdslb.net.mcast), over stand-in sockets."""

import errno
import ipaddress
import socket
import struct

from hdslb.balancer import Balancer, Iface
from hdslb.net.mcast import IPV6_JOIN_GROUP, IPV6_LEAVE_GROUP, Memberships, solicited_node, wanted_groups

from .test_balancer import Recorder

A = ipaddress.ip_address
IFACES = {"eth0": Iface("eth0", 2, b"\x02" * 6, 1500), "eth1": Iface("eth1", 3, b"\x04" * 6, 1500)}
INDEX = {"eth0": 2, "eth1": 3}


class FakeSock:
    """Records memberships; refuses joins past `room` with ENOBUFS (a socket's option memory is full)."""

    def __init__(self, room=1000, fail=None):
        self.room, self.fail = room, fail
        self.groups = set()
        self.closed = False

    def setsockopt(self, level, opt, val):
        assert level == socket.IPPROTO_IPV6
        key = (ipaddress.IPv6Address(val[:16]), struct.unpack("@I", val[16:])[0])
        if opt == IPV6_JOIN_GROUP:
            if self.fail:
                raise OSError(self.fail, "refused")
            if len(self.groups) >= self.room:
                raise OSError(errno.ENOBUFS, "No buffer space available")
            self.groups.add(key)
        else:
            assert opt == IPV6_LEAVE_GROUP
            self.groups.remove(key)

    def close(self):
        self.closed = True


def test_solicited_node_group():
    assert solicited_node(A("2001:db8::1:2345:6789")) == A("ff02::1:ff45:6789")


def test_every_owned_ipv6_address_wants_its_group_where_it_is_answered():
    bal = Balancer(Recorder(), IFACES)
    bal.addr_add({"addr": "2001:db8::100", "prefixlen": 64, "ifname": "eth0"})
    bal.addr_add({"addr": "10.0.0.100", "prefixlen": 24, "ifname": "eth0"})  # IPv4: ARP, no group
    svc = {"proto": "tcp", "addr": "2001:db8::100", "port": 80}
    bal.service_add(dict(svc, sched="rr"))
    bal.laddr_add({"svc": svc, "addr": "fd00:100::200", "ifname": "eth1"})
    # a config VIP is answered on every interface
    bal.service_add({"proto": "tcp", "addr": "2001:db8::7:101", "port": 80, "sched": "rr", "own_vip": True})
    assert wanted_groups(bal.owned_addresses(), bal.ifaces) == {
        "eth0": {A("ff02::1:ff00:100"), A("ff02::1:ff07:101")},
        "eth1": {A("ff02::1:ff00:200"), A("ff02::1:ff07:101")}}
    first = bal.owned_addresses()
    assert bal.owned_addresses() is first, "the same dict while nothing changes (hdslbd syncs only on a change)"
    bal.addr_add({"addr": "2001:db8::150", "prefixlen": 128, "ifname": "eth0"})
    assert bal.owned_addresses() is not first and bal.owned_addresses()[A("2001:db8::150")] == "eth0"
    bal.addr_del({"addr": "2001:db8::150", "prefixlen": 128, "ifname": "eth0"})
    assert A("2001:db8::150") not in bal.owned_addresses()


def test_sync_joins_and_leaves_through_the_kernel():
    socks = []
    m = Memberships(lambda: socks.append(FakeSock()) or socks[-1])
    g1, g2, g3 = A("ff02::1:ff00:1"), A("ff02::1:ff00:2"), A("ff02::1:ff00:3")
    m.sync({"eth0": {g1, g2}, "eth1": {g1}}, INDEX)
    held = lambda: set().union(*(s.groups for s in socks))  # noqa: E731
    assert held() == {(g1, 2), (g2, 2), (g1, 3)}
    m.sync({"eth0": {g2, g3}, "eth1": set()}, INDEX)
    assert held() == {(g2, 2), (g3, 2)}
    m.sync({}, INDEX)  # an interface no longer served: all of it left
    assert held() == set()
    m.close()
    assert socks and all(s.closed for s in socks) and m.joined == {}


def test_a_full_socket_is_followed_by_another():
    socks = []
    m = Memberships(lambda: socks.append(FakeSock(room=2)) or socks[-1])
    groups = {A(f"ff02::1:ff00:{i:x}") for i in range(1, 6)}
    m.sync({"eth0": groups}, INDEX)
    assert len(socks) == 3 and set().union(*(s.groups for s in socks)) == {(g, 2) for g in groups}
    m.sync({"eth0": set()}, INDEX)  # each group is left on the socket that joined it
    assert all(not s.groups for s in socks)


def test_a_refused_join_is_logged_once_and_tried_again(caplog):
    socks = []
    m = Memberships(lambda: socks.append(FakeSock(fail=errno.ENODEV)) or socks[-1])
    g = A("ff02::1:ff00:1")
    m.sync({"eth0": {g}}, INDEX)
    m.sync({"eth0": {g}}, INDEX)
    assert m.joined["eth0"] == {} and sum("cannot join" in r.message for r in caplog.records) == 1
    socks[0].fail = None
    m.sync({"eth0": {g}}, INDEX)
    assert g in m.joined["eth0"]
