"""What each forwarding mode asks of the hosts around the balancer, as lab helpers.

The topologies (hdslb.lab.topology) wire namespaces; these helpers give the real servers and clients the
configuration a mode needs, the way an operator would on real machines:

    DR       server_vip(): the VIP on the server's lo, arp_ignore=1 / arp_announce=2 so only the balancer
             answers ARP for it; the server answers the client directly (OneArm: they share the switch).
    TUNNEL   server_vip() + decap_up(): `hdslb-ctl decap up eth0` on the server strips the IPIP header in
             XDP; route() with mtu/advmss on the client leaves room for the 20-byte outer header.
    NAT      route(..., via=<an address the balancer owns on the servers' side>): replies go back through it.
    SNAT     TwoArm's client side is the outside network: start_outside() runs nginx and the UDP echo there,
             the servers are the inside hosts with their default route via the balancer.

Observation helpers, so tests assert on what hosts actually see: Capture (AF_PACKET on one interface of a
lab namespace, parsed frames, a tcpdump for assertions), icmp_echo() (ping without the ping binary),
udp_ask() (one datagram, the reply and the address it came from).

Everything made here lives inside the lab's namespaces (deleted at teardown); what outlives a namespace
(decap pins, capture sockets that would keep a namespace alive) is registered with the lab's teardown.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from hdslb.lab import netns as nx

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
PACKET_OUTGOING = 4  # sll_pkttype of a frame the interface sent
TUNNEL_OVERHEAD = 20  # bytes an IPv4-in-IPv4 header adds


def _host_ns(host) -> str:
    return host.ns if hasattr(host, "ns") else str(host)


# --------------------------------------------------------------------------- host configuration


def server_vip(lab, host, *vips: str, ifname: str = "eth0") -> None:
    """DR / TUNNEL real server: own each VIP on lo without ever answering ARP for it.

    arp_ignore=1: answer ARP only for addresses on the interface asked (the VIP is on lo, so never);
    arp_announce=2: never use the VIP as the sender address of our own ARP requests. Both as LVS-DR
    documents, on `all` (the kernel takes the max of all and the interface) and on the interfaces.
    IPv6 VIPs go on lo as /128 (there is no ND equivalent of arp_ignore: do not put a v6 VIP on a server
    that shares a link with the client).
    """
    ns = _host_ns(host)
    nx.sysctl(ns, {
        "net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.all.arp_announce": 2,
        f"net.ipv4.conf.{ifname}.arp_ignore": 1, f"net.ipv4.conf.{ifname}.arp_announce": 2,
        "net.ipv4.conf.lo.arp_ignore": 1, "net.ipv4.conf.lo.arp_announce": 2,
    })
    for vip in vips:
        plen = 128 if ":" in vip else 32
        argv = ["ip", "-n", ns, "addr", "add", f"{vip}/{plen}", "dev", "lo"]
        if ":" in vip:
            argv.append("nodad")
        nx.sh(argv)


def route(lab, host, dst: str, via: str | None = None, dev: str | None = None, mtu: int | None = None,
          advmss: int | None = None, src: str | None = None) -> None:
    """`ip route replace` inside the host's namespace (NAT replies via the LB, MTU room for TUNNEL, ...)."""
    ns = _host_ns(host)
    argv = ["ip", "-n", ns]
    if ":" in dst or (via and ":" in via):
        argv.append("-6")
    argv += ["route", "replace", dst]
    for k, v in (("via", via), ("dev", dev), ("src", src), ("mtu", mtu), ("advmss", advmss)):
        if v is not None:
            argv += [k, str(v)]
    nx.sh(argv)


def routes_via_lb(lab, hosts: Iterable, via: str, dst: str = "default") -> None:
    """NAT / SNAT: each host sends `dst` (default: everything off its subnet) through the balancer's address."""
    for h in hosts:
        route(lab, h, dst, via=via)


def add_addrs(lab, host, addrs: Sequence[str], ifname: str | None = None) -> None:
    """Extra addresses on a host's interface (several client sources, e.g. for hash schedulers)."""
    ns = _host_ns(host)
    ifname = ifname or host.ifname
    plen = host.plen if hasattr(host, "plen") else 24
    for a in addrs:
        nx.addr_add(ns, ifname, a if "/" in a else f"{a}/{128 if ':' in a else plen}")


def neigh(lab, host, addr: str, mac: str, ifname: str | None = None) -> None:
    """A permanent neighbour entry on a host (pins a next hop's MAC, e.g. to test plumbing without the LB)."""
    ns = _host_ns(host)
    nx.sh(["ip", "-n", ns, "neigh", "replace", addr, "lladdr", mac, "dev", ifname or host.ifname,
           "nud", "permanent"])


def neigh_flush(lab, host, ifname: str | None = None) -> None:
    ns = _host_ns(host)
    nx.sh(["ip", "-n", ns, "neigh", "flush", "dev", ifname or host.ifname], check=False)


def decap_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "hdslb-ctl"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cli.hdslb_ctl"]


def decap_up(lab, host, ifname: str = "eth0", *extra: str) -> str:
    """TUNNEL real server: `hdslb-ctl decap up IFACE` in the host's namespace; `decap down` at teardown.

    Returns what the command printed. The namespace's deletion would detach the program anyway; the
    explicit down also removes whatever the command pinned outside the namespace.
    """
    ns = _host_ns(host)
    r = nx.run(ns, decap_cmd() + ["decap", "up", ifname, *extra], env=nx.package_env(), timeout=60)

    def down():
        if nx.netns_exists(ns):
            nx.run(ns, decap_cmd() + ["decap", "down", ifname], env=nx.package_env(), check=False, timeout=30)

    lab.on_teardown(down)
    return r.stdout


def start_outside(lab, host=None, name: str = "outside", nginx: bool = True, udp_echo: bool = True) -> list:
    """SNAT: servers on the outside network (TwoArm's client namespace by default); [Nginx, UdpEcho]."""
    from hdslb.lab.servers import Nginx, UdpEcho

    host = host or lab.client
    out = []
    if nginx:
        out.append(Nginx(lab, host, name=name).start())
    if udp_echo:
        out.append(UdpEcho(lab, host, name=name).start())
    return out


# --------------------------------------------------------------------------- observing traffic


@dataclass
class Frame:
    """One captured frame, parsed as far as the tests need (IPv4/IPv6, TCP/UDP ports, ICMP type, IPIP inner)."""

    outgoing: bool
    smac: str
    dmac: str
    ethertype: int
    src: str = ""
    dst: str = ""
    proto: int = 0  # IP protocol / IPv6 next header
    sport: int = 0
    dport: int = 0
    icmp_type: int | None = None
    length: int = 0  # IP total length (bytes on the wire minus the Ethernet header)
    tcp_flags: int = 0
    inner: "Frame | None" = None  # the encapsulated packet of an IPIP / 6in4 / 4in6 / 6in6 frame
    payload: bytes = field(default=b"", repr=False)  # L4 payload (UDP / TCP data), truncated to the capture


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _parse_ip(f: Frame, data: bytes, v6: bool, depth: int = 0) -> None:
    if v6:
        if len(data) < 40:
            return
        f.proto = data[6]
        f.src = str(ipaddress.IPv6Address(data[8:24]))
        f.dst = str(ipaddress.IPv6Address(data[24:40]))
        f.length = 40 + struct.unpack("!H", data[4:6])[0]
        l4 = data[40:]
    else:
        if len(data) < 20:
            return
        ihl = (data[0] & 15) * 4
        f.proto = data[9]
        f.src = socket.inet_ntoa(data[12:16])
        f.dst = socket.inet_ntoa(data[16:20])
        f.length = struct.unpack("!H", data[2:4])[0]
        l4 = data[ihl:]
    if f.proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP) and len(l4) >= 4:
        f.sport, f.dport = struct.unpack("!HH", l4[:4])
        if f.proto == socket.IPPROTO_TCP and len(l4) >= 20:
            f.tcp_flags = l4[13]
            f.payload = l4[(l4[12] >> 4) * 4:]
        elif f.proto == socket.IPPROTO_UDP:
            f.payload = l4[8:]
    elif f.proto in (socket.IPPROTO_ICMP, 58) and l4:
        f.icmp_type = l4[0]
    elif f.proto in (4, 41) and depth == 0:  # IPv4 / IPv6 encapsulated
        inner = Frame(f.outgoing, f.smac, f.dmac, ETH_P_IP if f.proto == 4 else ETH_P_IPV6)
        _parse_ip(inner, l4, f.proto == 41, depth + 1)
        f.inner = inner


def parse_frame(data: bytes, outgoing: bool = False) -> Frame:
    f = Frame(outgoing, _mac(data[6:12]), _mac(data[0:6]), struct.unpack("!H", data[12:14])[0] if len(data) >= 14 else 0)
    if f.ethertype in (ETH_P_IP, ETH_P_IPV6):
        _parse_ip(f, data[14:], f.ethertype == ETH_P_IPV6)
    return f


class Capture:
    """Frames on one interface of a lab namespace, both directions: an AF_PACKET socket read on demand.

    What it sees is what tcpdump would see there: on an interface with an XDP program, received frames as
    the program left them (after a decap, the inner packet); on a bridge port in the switch namespace, the
    frames as they travel on that wire. Closed at the lab's teardown (an open socket keeps its namespace).
    """

    def __init__(self, lab, ns: str, ifname: str, snaplen: int = 256):
        self.ns, self.ifname, self.snaplen = ns, ifname, snaplen
        self.sock = nx.ns_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)  # root: past rmem_max
        self.sock.bind((ifname, ETH_P_ALL))
        self.sock.setblocking(False)
        self.frames: list[Frame] = []
        lab.on_teardown(self.close)
        self.clear()

    def _drain(self) -> list[Frame]:
        got = []
        while True:
            try:
                data, addr = self.sock.recvfrom(self.snaplen)
            except (BlockingIOError, InterruptedError):
                break
            got.append(parse_frame(data, addr[2] == PACKET_OUTGOING))
        self.frames += got
        return got

    def clear(self) -> None:
        """Forget everything seen so far (including frames from before bind, on any interface)."""
        self._drain()
        self.frames = []

    def read(self, settle: float = 0.2) -> list[Frame]:
        """Every frame seen since the last clear(), after waiting `settle` seconds for stragglers."""
        if settle:
            time.sleep(settle)
        self._drain()
        return list(self.frames)

    def wait(self, pred, timeout: float = 3.0) -> list[Frame]:
        """Frames matching pred, waiting up to timeout for the first one; [] if none came."""
        deadline = time.monotonic() + timeout
        while True:
            match = [f for f in self.frames if pred(f)]
            if match or time.monotonic() >= deadline:
                return match
            select.select([self.sock], [], [], max(0.0, min(0.1, deadline - time.monotonic())))
            self._drain()

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.close()


def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def icmp_echo(ns: str, dst: str, count: int = 3, timeout: float = 2.0, ident: int | None = None) -> list[tuple[str, int]]:
    """Ping dst from inside ns (no ping binary needed): [(source of the reply, sequence)] per reply received.

    An ICMP datagram socket (net.ipv4.ping_group_range) would hide the reply's source behind the
    kernel's matching; a raw socket shows it, and matching on our identifier and the payload keeps other
    ICMP out.
    """
    ident = (os.getpid() & 0xFFFF) if ident is None else ident
    replies = []
    with nx.ns_socket(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        for seq in range(1, count + 1):
            payload = b"hdslb-lab-%05d" % seq
            hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            pkt = hdr[:2] + struct.pack("!H", _csum(hdr + payload)) + hdr[4:] + payload
            s.sendto(pkt, (dst, 0))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    data, src = s.recvfrom(2048)
                except socket.timeout:
                    break
                icmp = data[(data[0] & 15) * 4:]
                if len(icmp) >= 8 and icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (ident, seq) \
                        and icmp[8:] == payload:
                    replies.append((src[0], seq))
                    break
    return replies


def udp_ask(ns: str, dst: str, port: int, payload: bytes = b"ping", src: str | None = None,
            timeout: float = 2.0) -> tuple[str, str]:
    """One datagram from inside ns on an unconnected socket: (reply text, the address the reply came from).

    Unconnected, so a reply from any address is received and its source shown as it arrived (a connected
    socket would silently drop a reply from the wrong address). ('', '') on timeout.
    """
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with nx.ns_socket(ns, family, socket.SOCK_DGRAM) as s:
        if src:
            s.bind((src, 0))
        s.settimeout(timeout)
        s.sendto(payload, (dst, port))
        try:
            data, frm = s.recvfrom(2048)
        except socket.timeout:
            return "", ""
        return data.decode(errors="replace"), frm[0]
