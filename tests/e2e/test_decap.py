"""TUNNEL mode, real-server side: `hdslb-ctl decap` in a namespace lets the kernel's sockets get tunnelled packets.

Two namespaces joined by a veth: `tx` plays the balancer (it sends IPIP / IPv6-in-IPv6 frames as TUNNEL mode
does) and `rs` the real server, whose VIP sits on lo with arp_ignore as in an LVS TUN setup. This kernel has
no ipip module, so without the decap program the real server cannot receive any of it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from hdslb.fastpath import decap
from hdslb.lab import netns as nx

from .conftest import HDSLB_CTL

pytestmark = pytest.mark.root

TX4, RS4, VIP4, CLIENT4 = "10.77.0.1", "10.77.0.2", "10.77.100.1", "10.99.0.5"
TX6, RS6, VIP6, CLIENT6 = "fd77::1", "fd77::2", "fd77:100::1", "fd99::5"
UDP_PORT, TCP_PORT = 9999, 8080


class DecapLab(nx.Lab):
    """tx (balancer side) ── veth ── rs (real server, VIP on lo)."""

    def _build(self) -> None:
        self.tx = self.add_netns("tx")
        self.rs = self.add_netns("rs", sysctls={
            # LVS TUN real-server settings: never answer ARP for the VIP on lo, never use it as an ARP source.
            "net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.all.arp_announce": 2,
            # The inner source is the client, which arrives on eth0 without being routed there.
            "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
        })
        # decap pins of rs live in the shared bpffs; removed at teardown even if a test failed before `down`.
        self.add_path(os.path.join(decap.DEFAULT_PIN_ROOT, "decap", self.rs))
        nx.veth_add(self.tx, "eth0", self.rs, "eth0")
        for ns, a4, a6 in ((self.tx, TX4, TX6), (self.rs, RS4, RS6)):
            nx.addr_add(ns, "eth0", f"{a4}/24")
            nx.addr_add(ns, "eth0", f"{a6}/64")
            nx.offloads_off(ns, "eth0")
            nx.link_up(ns, "eth0")
        nx.addr_add(self.rs, "lo", f"{VIP4}/32")
        nx.addr_add(self.rs, "lo", f"{VIP6}/128")
        # Replies go straight back to the client through the balancer side, as in LVS TUN/DR.
        nx.route_add(self.rs, "10.99.0.0/24", via=TX4)
        nx.route_add(self.rs, "fd99::/64", via=TX6)
        self.tx_mac = nx.link_mac(self.tx, "eth0")
        self.rs_mac = nx.link_mac(self.rs, "eth0")

    def ctl(self, ns: str, *args: str, check: bool = True):
        r = nx.run(ns, HDSLB_CTL + list(args), check=False, timeout=120, env=nx.package_env())
        if check and r.returncode != 0:
            raise AssertionError(f"hdslb-ctl {' '.join(args)} in {ns} exited {r.returncode}\n"
                                 f"stdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def show(self) -> dict:
        (st,) = json.loads(self.ctl(self.rs, "decap", "show", "eth0", "--json").stdout)
        return st


@pytest.fixture(scope="module")
def lab():
    lab = DecapLab(prefix=f"dc{secrets.token_hex(2)}")
    lab.setup()
    try:
        yield lab
    finally:
        try:
            lab.ctl(lab.rs, "decap", "down", "eth0", check=False)
        finally:
            lab.teardown()


@pytest.fixture
def sockets(lab):
    """UDP listeners on the VIPs inside rs, and a raw Ethernet socket on tx's eth0 to send tunnel frames."""
    opened = []
    try:
        l4 = nx.ns_socket(lab.rs, socket.AF_INET, socket.SOCK_DGRAM)
        opened.append(l4)
        l4.bind((VIP4, UDP_PORT))
        l6 = nx.ns_socket(lab.rs, socket.AF_INET6, socket.SOCK_DGRAM)
        opened.append(l6)
        l6.bind((VIP6, UDP_PORT))
        tx = nx.ns_socket(lab.tx, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
        opened.append(tx)
        tx.bind(("eth0", 0))
        yield {4: l4, 6: l6, "tx": tx}
    finally:
        for s in opened:  # an open socket keeps its namespace alive after `ip netns del`
            s.close()


def outer(lab, family: int):
    return IP(src=TX4, dst=RS4) if family == 4 else IPv6(src=TX6, dst=RS6)


def udp_inner(family: int, payload: bytes):
    ip = IP(src=CLIENT4, dst=VIP4) if family == 4 else IPv6(src=CLIENT6, dst=VIP6)
    return ip / UDP(sport=5555, dport=UDP_PORT) / payload


def send_tunnelled(lab, sockets, outer_family: int, inner_family: int, payload: bytes) -> None:
    frame = Ether(src=lab.tx_mac, dst=lab.rs_mac) / outer(lab, outer_family) / udp_inner(inner_family, payload)
    sockets["tx"].send(bytes(frame))


def received(sock, timeout: float, settle: float = 0.2) -> list[tuple[bytes, str]]:
    """Datagrams the listener got, with their source address: waits up to timeout for the first one,
    then `settle` seconds more for any duplicate."""
    got, deadline = [], time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return got
        sock.settimeout(left)
        try:
            data, src = sock.recvfrom(2048)
        except socket.timeout:
            return got
        got.append((data, src[0]))
        deadline = min(deadline, time.monotonic() + settle)


COMBOS = [(4, 4, "decap_4in4"), (6, 6, "decap_6in6"), (6, 4, "decap_4in6"), (4, 6, "decap_6in4")]


@pytest.mark.parametrize("mode", ["native", "generic"])
def test_tunnelled_udp_reaches_the_vip_socket_only_with_decap(lab, sockets, mode):
    # Control: the kernel alone cannot take these packets apart (no ipip / ip6_tunnel here).
    for outer_f, inner_f, _ in COMBOS:
        send_tunnelled(lab, sockets, outer_f, inner_f, b"before up")
    assert received(sockets[4], 0.5) == [] and received(sockets[6], 0.2) == []

    r = lab.ctl(lab.rs, "decap", "up", "eth0", "--xdp-mode", mode)
    assert f"({mode} XDP)" in r.stdout, r.stdout
    try:
        # The CLI has exited: the attachment and the pins outlive it.
        info = nx.link_info(lab.rs, "eth0")
        assert info.get("xdp", {}).get("prog", {}).get("name") == "xdp_decap", info.get("xdp")
        st = lab.show()
        assert st["attached"] and st["mode"] == mode
        assert {RS4, RS6, VIP4, VIP6} <= set(st["addrs"])
        assert not any(a.startswith("127.") or a == "::1" or a.startswith("fe80") for a in st["addrs"])

        for outer_f, inner_f, _ in COMBOS:
            payload = f"{outer_f}in{inner_f} via {mode}".encode()
            send_tunnelled(lab, sockets, outer_f, inner_f, payload)
            got = received(sockets[inner_f], 3.0)
            assert got == [(payload, CLIENT4 if inner_f == 4 else CLIENT6)], (outer_f, inner_f, got)

        st = lab.show()
        c = st["counters"]
        assert {name: c[name] for _, _, name in COMBOS} == {name: 1 for _, _, name in COMBOS}, c
        assert c["drop_malformed"] == 0 and c["drop_adjust"] == 0

        # Running up again (addresses changed, a new version) swaps the program in place, keeping counters.
        lab.ctl(lab.rs, "decap", "up", "eth0", "--xdp-mode", mode, "--host-addrs", "iface", "--addr", VIP4)
        again = lab.show()
        assert again["prog_id"] != st["prog_id"] and again["attached"] and again["mode"] == mode
        assert set(again["addrs"]) == {RS4, RS6, VIP4}
        assert again["counters"]["decap_4in4"] == 1
        send_tunnelled(lab, sockets, 4, 4, b"after refresh")
        assert received(sockets[4], 3.0) == [(b"after refresh", CLIENT4)]
    finally:
        r = lab.ctl(lab.rs, "decap", "down", "eth0")
    assert "detached from eth0" in r.stdout
    assert "xdp" not in nx.link_info(lab.rs, "eth0")
    assert not os.path.exists(decap.instance_dir("eth0", netns=lab.rs))
    send_tunnelled(lab, sockets, 4, 4, b"after down")
    assert received(sockets[4], 0.5) == []


def test_tunnelled_syn_is_answered_from_the_vip_straight_to_the_client(lab, sockets):
    """The whole point of TUNNEL mode: the real server's kernel accepts the inner SYN for the VIP and replies
    from the VIP to the client directly, by its own routes (never back through a tunnel)."""
    listener = nx.ns_socket(lab.rs, socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((VIP4, TCP_PORT))
        listener.listen(8)
        lab.ctl(lab.rs, "decap", "up", "eth0", "--host-addrs", "iface")
        try:
            syn = (Ether(src=lab.tx_mac, dst=lab.rs_mac) / IP(src=TX4, dst=RS4) /
                   IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=TCP_PORT, flags="S", seq=1000))
            tx = sockets["tx"]
            tx.send(bytes(syn))
            deadline = time.monotonic() + 5
            synack = None
            while synack is None and time.monotonic() < deadline:
                tx.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    frame = Ether(tx.recv(2048))
                except socket.timeout:
                    break
                if TCP in frame and frame[IP].src == VIP4 and frame[TCP].dport == 40000:
                    synack = frame
            assert synack is not None, "no SYN-ACK from the VIP"
            assert synack[IP].dst == CLIENT4 and synack[TCP].flags == "SA" and synack[TCP].ack == 1001
            assert IP not in synack[IP].payload, "the reply must not be encapsulated"
            assert lab.show()["counters"]["decap_4in4"] >= 1
            assert "zeroed" in lab.ctl(lab.rs, "decap", "zero", "eth0").stdout
            # Plain frames (the tx namespace's kernel answers the SYN-ACK with a RST, ND traffic) may count
            # "pass" again right after zeroing; every tunnel counter must read zero.
            after = lab.show()["counters"]
            assert not any(v for k, v in after.items() if k != "pass"), after
        finally:
            lab.ctl(lab.rs, "decap", "down", "eth0")
    finally:
        listener.close()


def test_up_refuses_to_replace_another_programs_xdp(lab):
    nx.xdp_pass_attach(lab.tx, "eth0")
    try:
        r = lab.ctl(lab.tx, "decap", "up", "eth0", check=False)
        assert r.returncode == 1, r
        assert "already runs XDP program" in r.stderr and "not this decap instance's" in r.stderr
        assert nx.link_info(lab.tx, "eth0")["xdp"]["prog"]["name"] == "hdslb_xdp_pass"
        assert not os.path.exists(decap.instance_dir("eth0", netns=lab.tx))
    finally:
        nx.xdp_pass_attach(lab.tx, "eth0", detach=True)


def test_show_and_down_without_an_instance(lab):
    r = lab.ctl(lab.tx, "decap", "show")
    assert r.returncode == 0 and f"no decap instance in network namespace {lab.tx}" in r.stdout
    r = lab.ctl(lab.tx, "decap", "down", "eth0", check=False)
    assert r.returncode == 1 and "no decap instance on eth0" in r.stderr
    r = lab.ctl(lab.tx, "decap", "up", "nosuch0", check=False)
    assert r.returncode == 1 and "no interface 'nosuch0'" in r.stderr
