"""The lab plumbing each forwarding mode relies on, checked without a balancer: if one of these fails, a
failure in test_modes*.py is the lab's, not the balancer's."""

from __future__ import annotations

import socket
import struct

import pytest

from hdslb.lab import modes
from hdslb.lab import netns as nx
from hdslb.lab.servers import start_udp_echo
from hdslb.lab.topology import OneArm, TwoArm

pytestmark = pytest.mark.root

VIP = "192.168.100.100"


def test_dr_server_answers_the_vip_from_its_own_mac_and_never_arps_for_it():
    with OneArm(n_servers=1) as lab:
        rs1 = lab.server(1)
        start_udp_echo(lab)
        modes.server_vip(lab, rs1, VIP)
        cap = modes.Capture(lab, lab.cl_ns, "eth0")

        # A frame for the VIP sent straight to rs1's MAC (what the balancer does in DR) is answered
        # from the VIP, by rs1, directly to the client.
        modes.neigh(lab, lab.client, VIP, rs1.mac)
        text, frm = modes.udp_ask(lab.cl_ns, VIP, 53, b"dr")
        assert frm == VIP and text.startswith(f"rs1 {lab.client.ip}:"), (text, frm)
        replies = cap.wait(lambda f: not f.outgoing and f.proto == socket.IPPROTO_UDP and f.sport == 53)
        assert replies and {(f.smac, f.src) for f in replies} == {(rs1.mac, VIP)}

        # Nobody answers ARP for the VIP: rs1 holds it on lo with arp_ignore=1 (only the balancer may).
        modes.neigh_flush(lab, lab.client)
        nx.sh(["ip", "-n", lab.cl_ns, "neigh", "del", VIP, "dev", "eth0"], check=False)
        cap.clear()
        assert modes.udp_ask(lab.cl_ns, VIP, 53, b"dr", timeout=1.5) == ("", "")
        arp_replies = [f for f in cap.read() if f.ethertype == 0x0806 and not f.outgoing]
        assert arp_replies == []
        # and rs1 keeps answering ARP for its own address
        text, frm = modes.udp_ask(lab.cl_ns, rs1.ip, 53, b"own")
        assert frm == rs1.ip and text.startswith("rs1 ")


def test_nat_and_snat_hosts_route_through_an_address_only_the_balancer_can_own():
    with TwoArm(n_servers=2) as lab:
        outside = modes.start_outside(lab)
        lb_inside = "192.168.100.254"
        modes.routes_via_lb(lab, lab.servers, lb_inside)
        for i in (1, 2):
            out = nx.sh(["ip", "-n", lab.server(i).ns, "route", "get", lab.client.ip]).stdout
            assert f"via {lb_inside} dev eth0" in out, out
        # No kernel address on the LB's arms: with no balancer, the outside is unreachable from inside ...
        assert nx.addrs(lab.lb_ns, "veth-lb0") == [] and nx.addrs(lab.lb_ns, "veth-lb1") == []
        r = lab.server_run(1, ["curl", "-s", "-m", "1", f"http://{lab.client.ip}/"], check=False)
        assert r.returncode != 0
        assert modes.icmp_echo(lab.server(1).ns, lab.client.ip, count=1, timeout=1) == []
        # ... and the inside from outside (the client has only its connected route).
        r = lab.client_run(["curl", "-s", "-m", "1", f"http://{lab.server(1).ip}/"], check=False)
        assert r.returncode != 0
        # The outside servers themselves answer (as "outside") on the outside network.
        assert outside[0].name == "outside"
        r = lab.client_run(["curl", "-s", "-m", "2", f"http://{lab.client.ip}/"])
        assert r.stdout.split()[0] == "outside"
        text, frm = modes.udp_ask(lab.cl_ns, lab.client.ip, 53)
        assert text.startswith("outside ") and frm == lab.client.ip
        assert modes.icmp_echo(lab.cl_ns, lab.client.ip, count=2) == [(lab.client.ip, 1), (lab.client.ip, 2)]


def test_tunnel_server_decapsulates_ipip_and_answers_the_client_from_the_vip():
    """What the balancer sends in TUNNEL mode, crafted by hand: IPIP to rs1, inner packet client -> VIP."""
    with OneArm(n_servers=1) as lab:
        rs1 = lab.server(1)
        start_udp_echo(lab)
        modes.server_vip(lab, rs1, VIP)
        modes.decap_up(lab, rs1, "eth0")
        wire = modes.Capture(lab, lab.sw_ns, f"sw-{rs1.role}")
        outer_src = "192.168.100.254"
        with nx.ns_socket(lab.cl_ns, socket.AF_INET, socket.SOCK_DGRAM) as udp, \
                nx.ns_socket(lab.cl_ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(modes.ETH_P_ALL)) as raw:
            udp.bind((lab.client.ip, 0))
            udp.settimeout(2)
            sport = udp.getsockname()[1]
            inner = _ipv4(lab.client.ip, VIP, socket.IPPROTO_UDP,
                          struct.pack("!HHHH", sport, 53, 8 + 6, 0) + b"tunnel")
            frame = (bytes.fromhex(rs1.mac.replace(":", "")) + bytes.fromhex(lab.client.mac.replace(":", ""))
                     + struct.pack("!H", modes.ETH_P_IP) + _ipv4(outer_src, rs1.ip, 4, inner))
            raw.bind(("eth0", 0))
            raw.send(frame)
            data, frm = udp.recvfrom(200)
        assert frm[0] == VIP and data.decode() == f"rs1 {lab.client.ip}:{sport}"
        seen = [f for f in wire.read() if f.proto == 4]
        assert seen and seen[0].src == outer_src and seen[0].inner.dst == VIP
        pins = nx.BPFFS_DIR / "decap" / rs1.ns
        assert pins.is_dir(), "decap pins its program and maps per namespace and interface"
    assert not pins.exists(), "the lab's teardown ran `hdslb-ctl decap down`, which removed the pins"


def _ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", modes._csum(hdr)) + hdr[12:]
    return hdr + payload
