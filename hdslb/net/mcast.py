"""Solicited-node multicast memberships for the balancer's own IPv6 addresses, held through the host kernel.

A neighbour solicitation for an address goes to its solicited-node group (ff02::1:ffXX:XXXX, RFC 4861 7.2.2), and a
switch that snoops MLD (RFC 4541) forwards a group only to the ports that reported it. Linux joins that group for
every address it holds and reports it (RFC 4861 7.2.1, RFC 3810); our VIPs and local addresses are not the kernel's,
so nothing reported them: behind a snooping switch with a querier the solicitations for a VIP never reached the
balancer and the VIP went unreachable as soon as its clients' neighbour entries expired. Here a socket per interface
joins the group of every owned address answered on that interface (IPV6_JOIN_GROUP): the kernel then sends the MLD
reports, answers the queries (XDP passes MLD to it) and opens the NIC's multicast filter for the group.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct

log = logging.getLogger("hdslb.mcast")

IPV6_JOIN_GROUP = 20  # linux/in6.h (IPV6_ADD_MEMBERSHIP)
IPV6_LEAVE_GROUP = 21


def solicited_node(addr: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    """ff02::1:ff00:0/104 with the address's low 24 bits (RFC 4291 2.7.1)."""
    return ipaddress.IPv6Address(b"\xff\x02" + b"\0" * 9 + b"\x01\xff" + addr.packed[13:])


def wanted_groups(owned: dict, ifaces: dict) -> dict:
    """ifname -> the solicited-node groups to hold there: owned maps each address of ours to the interface it is
    answered on (None: every interface, a config VIP); ifaces is the model's {name: Iface}."""
    out: dict = {name: set() for name in ifaces}
    for addr, ifname in owned.items():
        if addr.version != 6:
            continue
        group = solicited_node(addr)
        for name in (ifaces if ifname is None else (ifname,)):
            if name in out:
                out[name].add(group)
    return out


class Memberships:
    """The groups joined per interface, kept to what sync() is given. Sockets are made on demand; a socket whose
    memberships are full (its option memory, net.core.optmem_max: ENOBUFS/ENOMEM) is followed by another."""

    def __init__(self, make_socket=None):
        self._make = make_socket or (lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
        self.joined: dict = {}  # ifname -> {group: socket}
        self._socks: dict = {}  # ifname -> [sockets], the last one taking new groups
        self._failed: set = set()  # (ifname, group) already logged as refused

    def sync(self, want: dict, ifindex: dict) -> None:
        """Join what want ({ifname: set of groups}) has and leave what it no longer has; ifindex: {ifname: index}.
        Never raises: a refusal is logged once per interface and group, and tried again at the next sync."""
        for ifname in list(self.joined):
            keep = want.get(ifname, set())
            for group in [g for g in self.joined[ifname] if g not in keep]:
                self._leave(ifname, group, ifindex.get(ifname))
        for ifname, groups in want.items():
            have = self.joined.setdefault(ifname, {})
            for group in groups:
                if group not in have:
                    self._join(ifname, group, ifindex[ifname])

    def close(self) -> None:
        """Leave everything (closing the sockets drops their memberships)."""
        for socks in self._socks.values():
            for sk in socks:
                sk.close()
        self._socks.clear()
        self.joined.clear()

    @staticmethod
    def _mreq(group, index: int) -> bytes:
        return group.packed + struct.pack("@I", index)

    def _join(self, ifname: str, group, index: int) -> None:
        socks = self._socks.setdefault(ifname, [])
        for attempt in range(2):
            try:
                if not socks or attempt:
                    socks.append(self._make())
                sk = socks[-1]
                sk.setsockopt(socket.IPPROTO_IPV6, IPV6_JOIN_GROUP, self._mreq(group, index))
            except OSError as e:
                if e.errno in (errno.ENOBUFS, errno.ENOMEM) and attempt == 0:
                    continue  # this socket is full: the next one takes it
                if (ifname, group) not in self._failed:
                    self._failed.add((ifname, group))
                    log.warning("cannot join %s on %s (%s): a switch snooping MLD will not forward solicitations "
                                "for the addresses of ours in that group there", group, ifname, e.strerror or e)
                return
            self.joined[ifname][group] = sk
            self._failed.discard((ifname, group))
            return

    def _leave(self, ifname: str, group, index: int | None) -> None:
        sk = self.joined[ifname].pop(group)
        if index is None:
            return
        try:
            sk.setsockopt(socket.IPPROTO_IPV6, IPV6_LEAVE_GROUP, self._mreq(group, index))
        except OSError as e:
            log.debug("leaving %s on %s: %s", group, ifname, e)
