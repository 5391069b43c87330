"""ICMP errors about a balanced flow, translated by the slow path: a real server's error about a packet we sent
it goes to the client as if the VIP had sent it; an error from the client's side (a router on the way to the
client, the client itself) about a packet we sent the client goes to the real server, as LVS forwards it, so
path-MTU discovery works for what the servers send (downloads). NAT (masquerade): the real server's error is
addressed to the client itself, routed through the balancer and punted by the fast path only because it quotes a
NAT flow; the dispatcher takes it although it is not to us, and it is translated like the FullNAT one."""

import ipaddress
import types

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.l2 import Ether

from hdslb.slowpath import packets as P
from hdslb.slowpath.dispatch import SlowPath
from hdslb.slowpath.runner import SlowPathRunner

A = ipaddress.ip_address
CLIENT, VIP, LIP, RS = "10.0.0.1", "10.0.0.100", "192.168.100.200", "192.168.100.2"
ROUTER = "10.0.0.254"
CMAC, RMAC, LBMAC = b"\x02\xcc\0\0\0\x01", b"\x02\x55\0\0\0\x02", b"\x02\xaa\0\0\0\x01"


def _runner(entries: dict):
    """A runner over a stand-in conn table: {(proto, saddr, sport, daddr, dport): entry}."""
    def conn_get(proto, saddr, sport, daddr, dport):
        e = entries.get((proto, str(saddr), sport, str(daddr), dport))
        return None if e is None else dict(e, proto=proto, saddr=A(saddr), sport=sport, daddr=A(daddr), dport=dport)

    d = types.SimpleNamespace(maps=types.SimpleNamespace(conn_get=conn_get),
                              bal=types.SimpleNamespace(ifaces={"eth1": types.SimpleNamespace(name="eth1", ifindex=7),
                                                                "eth0": types.SimpleNamespace(name="eth0", ifindex=5)}))
    r = types.SimpleNamespace(d=d, sp=types.SimpleNamespace(ttl=64))
    for name in ("_translate_icmp6_error", "_translate_icmp_xlat"):
        setattr(r, name, types.MethodType(getattr(SlowPathRunner, name), r))
    return r


def _pair(proto, fwd, client, vip, src, server, cport=40000, vport=80, sport=2000, svport=80, out_on=(5, CMAC),
          in_on=(7, RMAC)) -> dict:
    """Both entries of a flow as conn_get gives them: client:cport -> vip:vport is sent on as src:sport ->
    server:svport (by in_on's interface and MAC); the reply server:svport -> src:sport goes back as vip:vport ->
    client:cport (by out_on's)."""
    def entry(to, out, on):
        return {"to_saddr": A(to[0]), "to_sport": to[1], "to_daddr": A(to[2]), "to_dport": to[3], "out": out,
                "ifindex": on[0], "dmac": on[1], "smac": LBMAC, "fwd": fwd, "need_l2": False}

    return {(proto, client, cport, vip, vport): entry((src, sport, server, svport), False, in_on),
            (proto, server, svport, src, sport): entry((vip, vport, client, cport), True, out_on)}


def _flow(proto, fwd, lport=2000):
    """A flow client:40000 -> VIP:80 to RS:80, FullNAT through LIP:lport or NAT, both entries."""
    if fwd == "fnat":
        return _pair(proto, fwd, CLIENT, VIP, LIP, RS, sport=lport)
    return _pair(proto, fwd, CLIENT, VIP, CLIENT, RS, sport=40000)


def assert_checksums(p):
    """The error's IP and ICMP checksums are what scapy computes for its bytes."""
    chk = IP(bytes(p[IP]))
    del chk[IP].chksum
    del chk[ICMP].chksum
    chk = IP(bytes(chk))
    assert (p[IP].chksum, p[ICMP].chksum) == (chk[IP].chksum, chk[ICMP].chksum)


def _error(outer_src, outer_dst, quoted, mtu=1400):
    icmp = bytes(ICMP(type=3, code=4, nexthopmtu=mtu) / bytes(quoted)[:28])
    return P.parse_icmp_error(icmp)


@pytest.mark.parametrize("fwd", ["fnat", "nat"])
@pytest.mark.parametrize("l4", [TCP, UDP])
def test_an_error_from_the_client_side_goes_to_the_real_server(fwd, l4):
    """A router on the client's path cannot take the server's 1500-byte reply (VIP:80 -> client:40000): its
    "fragmentation needed" reaches the VIP and is sent on to the real server, quoting the packet as the server
    sent it (RS:80 -> LIP:lport, or -> client for NAT), from the address the server sends that flow to."""
    proto = 6 if l4 is TCP else 17
    sent = IP(src=VIP, dst=CLIENT, flags="DF", len=1500) / l4(sport=80, dport=40000)
    r = _runner(_flow(proto, fwd))
    out = SlowPathRunner.translate_icmp_error(r, _error(ROUTER, VIP, sent))
    assert out is not None
    ifname, frame = out
    p = Ether(frame)
    assert ifname == "eth1" and (p.dst, p.src) == ("02:55:00:00:00:02", "02:aa:00:00:00:01")
    peer = LIP if fwd == "fnat" else CLIENT
    assert (p[IP].src, p[IP].dst, p[ICMP].type, p[ICMP].code, p[ICMP].nexthopmtu) == (peer, RS, 3, 4, 1400)
    q = p[IPerror]
    inner = q[TCPerror] if l4 is TCP else q[UDPerror]
    assert (q.src, q.dst, inner.sport, inner.dport) == (RS, peer, 80, 2000 if fwd == "fnat" else 40000)
    assert_checksums(p)
    q2 = IP(bytes(q)[:20])
    del q2.chksum
    assert IP(bytes(q2)).chksum == q.chksum, "the quoted header's checksum is the rewritten header's"


def test_an_error_from_a_real_server_still_goes_to_the_client():
    sent = IP(src=LIP, dst=RS, flags="DF") / TCP(sport=2000, dport=80)
    r = _runner(_flow(6, "fnat"))
    ifname, frame = SlowPathRunner.translate_icmp_error(r, _error(RS, LIP, sent))
    p = Ether(frame)
    assert ifname == "eth0" and (p[IP].src, p[IP].dst) == (VIP, CLIENT)
    assert (p[IPerror].src, p[IPerror].dst, p[TCPerror].sport, p[TCPerror].dport) == (CLIENT, VIP, 40000, 80)


@pytest.mark.parametrize("fwd", ["dr", "tunnel"])
def test_an_error_about_a_flow_the_balancer_does_not_rewrite_is_left(fwd):
    """DR and TUNNEL replies leave the servers straight to the client: no rewrite to undo here (not forwarded)."""
    sent = IP(src=VIP, dst=CLIENT, flags="DF") / TCP(sport=80, dport=40000)
    flows = _flow(6, "fnat")
    flows[(6, CLIENT, 40000, VIP, 80)] = dict(flows[(6, CLIENT, 40000, VIP, 80)], fwd=fwd, to_saddr=A(CLIENT),
                                               to_sport=40000)
    assert SlowPathRunner.translate_icmp_error(_runner(flows), _error(ROUTER, VIP, sent)) is None


def test_an_error_quoting_no_flow_is_left():
    sent = IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=40001)
    assert SlowPathRunner.translate_icmp_error(_runner(_flow(6, "fnat")), _error(ROUTER, VIP, sent)) is None


# --- NAT: an error routed through us to the client, dispatcher and runner together ---------------------------
class _Sock:
    def __init__(self):
        self.sent = []

    def send_batch(self, frames):
        self.sent += frames


def _nat_runner(entries: dict, ours=(VIP, LIP)):
    """A real SlowPath (dispatcher) over a stand-in model where VIP and LIP (or ours) are ours, and a runner carrying
    out its Actions on stand-in sockets per interface, over a stand-in conn table."""
    base = _runner(entries)
    ifaces = {"eth0": types.SimpleNamespace(name="eth0", ifindex=5, mac=LBMAC),
              "eth1": types.SimpleNamespace(name="eth1", ifindex=7, mac=LBMAC)}
    model = types.SimpleNamespace(ifaces=ifaces, neighs={},
                                  local_reasons=lambda a: (0x8, 0) if str(a) in ours else (0, 0))
    r = SlowPathRunner.__new__(SlowPathRunner)
    r.d = types.SimpleNamespace(maps=base.d.maps, bal=model)
    r.sp = SlowPath(model, proactive=False)
    r.socks = {("eth0", 0): _Sock(), ("eth1", 0): _Sock()}
    r.dirty, r.translated = {}, 0
    return r


def _carried(r, in_if: str, frame: bytes, out_if: str) -> bytes:
    """The dispatcher takes one ICMP error arriving on in_if and the runner translates it: the one frame it sends,
    on out_if (nothing goes back out of in_if)."""
    act = r.sp.handle(in_if, frame)
    assert act.counters["icmp_error"] == 1 and act.counters["unexpected"] == 0, act.counters
    r.carry_out(act)
    assert r.translated == 1 and (in_if == out_if or not r.socks[(in_if, 0)].sent)
    (out,) = r.socks[(out_if, 0)].sent
    return out


def _nat_error_frame(outer_src, outer_dst, quoted, kind=3):
    icmp = ICMP(type=3, code=4, nexthopmtu=1400) if kind == 3 else ICMP(type=11, code=0)
    return bytes(Ether(src=RMAC, dst=LBMAC) / IP(src=outer_src, dst=outer_dst) / icmp / bytes(quoted)[:28])


@pytest.mark.parametrize("kind", [3, 11])
@pytest.mark.parametrize("l4", [TCP, UDP])
def test_a_nat_real_servers_error_to_the_client_is_translated_and_sent_to_the_client(l4, kind):
    """NAT: RS sends its "fragmentation needed" (or a router past us its time exceeded) about client:40000 ->
    RS:80 to the client; the fast path punts it on eth1. It leaves on the client's interface (eth0) from the VIP,
    quoting client:40000 -> VIP:80, the packet the client sent, as LVS's ip_vs_out_icmp does."""
    proto = 6 if l4 is TCP else 17
    r = _nat_runner(_flow(proto, "nat"))
    sent = IP(src=CLIENT, dst=RS, flags="DF", len=1500) / l4(sport=40000, dport=80)
    p = Ether(_carried(r, "eth1", _nat_error_frame(RS, CLIENT, sent, kind), "eth0"))
    assert (p.dst, p.src) == ("02:cc:00:00:00:01", "02:aa:00:00:00:01")
    assert (p[IP].src, p[IP].dst, p[ICMP].type) == (VIP, CLIENT, kind)
    if kind == 3:
        assert (p[ICMP].code, p[ICMP].nexthopmtu) == (4, 1400)
    q = p[IPerror]
    inner = q[TCPerror] if l4 is TCP else q[UDPerror]
    assert (q.src, q.dst, inner.sport, inner.dport) == (CLIENT, VIP, 40000, 80)
    assert_checksums(p)


def test_an_error_not_to_us_is_translated_only_for_a_nat_flow():
    """The dispatcher takes an error not to us on the fast path's word; the runner still translates it only when
    the quote's reverse is a NAT reply entry: not an FNAT flow's (those errors come to LIP), not a NAT flow's
    inbound entry, not a quote of no flow."""
    flows = {**_flow(6, "fnat", lport=2001), **_flow(6, "nat")}  # the NAT inbound entry wins the shared key
    r = _nat_runner(flows)
    for quoted in (IP(src=LIP, dst=RS) / TCP(sport=2001, dport=80),  # FNAT: reverse is its reply entry
                   IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=40000),  # reverse is the inbound entry
                   IP(src=CLIENT, dst=RS) / TCP(sport=40001, dport=80)):  # no flow
        act = r.sp.handle("eth1", _nat_error_frame(RS, "10.0.0.9", quoted))
        assert act.counters["icmp_error"] == 1
        r.carry_out(act)
    assert r.translated == 0 and not any(s.sent for s in r.socks.values())
    # the same FNAT error addressed to LIP (to us) is translated, as before
    r.carry_out(r.sp.handle("eth1", _nat_error_frame(RS, LIP, IP(src=LIP, dst=RS) / TCP(sport=2001, dport=80))))
    assert r.translated == 1


def test_anything_else_not_to_us_stays_unexpected():
    r = _nat_runner(_flow(6, "nat"))
    for frame in (bytes(Ether(src=RMAC, dst=LBMAC) / IP(src=RS, dst=CLIENT) / ICMP(type=8) / b"x"),
                  bytes(Ether(src=RMAC, dst=LBMAC) / IP(src=RS, dst=CLIENT) / ICMP(type=0) / b"x"),
                  bytes(Ether(src=RMAC, dst=LBMAC) / IP(src=RS, dst=CLIENT) / TCP(sport=80, dport=40000))):
        act = r.sp.handle("eth1", frame)
        assert act.counters["unexpected"] == 1 and not act.icmp_errors, frame


# --- SNAT: an inside host's error about a reply we translated for it --------------------------------------------
INSIDE, OUTSIDE, SAPOOL = "192.168.100.5", "10.0.0.1", "10.0.0.254"


def _snat_flow(proto):
    """inside:33000 -> outside:80 leaving from SAPOOL:5000 by eth0; the reply comes back to SAPOOL:5000."""
    return _pair(proto, "snat", INSIDE, OUTSIDE, SAPOOL, OUTSIDE, cport=33000, sport=5000, out_on=(7, RMAC),
                 in_on=(5, CMAC))


@pytest.mark.parametrize("l4", [TCP, UDP])
def test_a_snat_inside_hosts_error_leaves_from_the_sapool_address(l4):
    """SNAT: the inside host cannot take a reply we translated for it (outside:80 -> inside:33000; a closed UDP
    port, a TCP stack's error) and sends its error to the outside server, routed through us. Passed on as it was,
    it carried the private address outside and quoted a flow the server never had; as netfilter's NAT does, it
    leaves from the sapool address quoting outside:80 -> SAPOOL:5000, the packet the server sent."""
    proto = 6 if l4 is TCP else 17
    r = _nat_runner(_snat_flow(proto))
    received = IP(src=OUTSIDE, dst=INSIDE) / l4(sport=80, dport=33000)
    p = Ether(_carried(r, "eth1", _nat_error_frame(INSIDE, OUTSIDE, received), "eth0"))
    assert (p.dst, p.src) == ("02:cc:00:00:00:01", "02:aa:00:00:00:01")
    assert (p[IP].src, p[IP].dst, p[ICMP].type, p[ICMP].code) == (SAPOOL, OUTSIDE, 3, 4)
    q = p[IPerror]
    inner = q[TCPerror] if l4 is TCP else q[UDPerror]
    assert (q.src, q.dst, inner.sport, inner.dport) == (OUTSIDE, SAPOOL, 80, 5000)
    assert_checksums(p)


def test_a_snat_forward_entry_never_answers_an_error_to_us():
    """An error addressed to one of our addresses whose quote's reverse is a SNAT forward entry quotes a packet
    we sent an inside host: nothing on that path addresses its errors to us, so it is left."""
    r = _nat_runner(_snat_flow(6))
    received = IP(src=OUTSIDE, dst=INSIDE) / TCP(sport=80, dport=33000)
    r.carry_out(r.sp.handle("eth1", _nat_error_frame(INSIDE, VIP, received)))
    assert r.translated == 0 and not any(s.sent for s in r.socks.values())


@pytest.mark.parametrize("kind", [3, 11])
@pytest.mark.parametrize("l4", [TCP, UDP])
def test_an_outside_routers_error_reaches_the_snat_inside_host_from_that_router(l4, kind):
    """SNAT, the other way: a router on the outside path cannot forward what the inside host sent (SAPOOL:5000 ->
    outside:80; a smaller MTU, a TTL run out under traceroute) and tells the sapool address. The inside host gets
    it quoting its own packet (inside:33000 -> outside:80) and from the router that sent it, as netfilter's NAT and
    DPVS's SNAT (which rewrite only the destination) deliver it. It came from the outside server's address, so a
    traceroute from inside showed the destination at every hop."""
    proto = 6 if l4 is TCP else 17
    router = "198.51.100.1"  # a hop between the balancer and the outside server
    r = _nat_runner(_snat_flow(proto), ours=(SAPOOL,))
    sent = IP(src=SAPOOL, dst=OUTSIDE, flags="DF", len=1500) / l4(sport=5000, dport=80)
    p = Ether(_carried(r, "eth0", _nat_error_frame(router, SAPOOL, sent, kind), "eth1"))
    assert (p.dst, p.src) == ("02:55:00:00:00:02", "02:aa:00:00:00:01")
    assert (p[IP].src, p[IP].dst, p[ICMP].type) == (router, INSIDE, kind)
    q = p[IPerror]
    inner = q[TCPerror] if l4 is TCP else q[UDPerror]
    assert (q.src, q.dst, inner.sport, inner.dport) == (INSIDE, OUTSIDE, 33000, 80)
    assert_checksums(p)


@pytest.mark.parametrize("kind", [3, 11])
def test_an_outside_error_about_a_snat_ping_reaches_the_inside_host(kind):
    """An inside host's ping leaves SNAT'd (inside id 33000 -> SAPOOL id 5000; the fast path's ICMP flows key the
    echo id as the request's source port). A router that cannot reach the destination (or whose TTL ran out under
    `traceroute -I`/mtr) tells the sapool address, quoting the echo request as it left. The error was dropped (a
    quote without TCP/UDP ports matched no flow): the inside host's ping waited in silence. It now reaches the
    host from the router, quoting its own request (its id, the quoted ICMP checksum updated with it), as
    netfilter's NAT delivers it."""
    router = "198.51.100.1"
    r = _nat_runner(_pair(1, "snat", INSIDE, OUTSIDE, SAPOOL, OUTSIDE, cport=33000, vport=0, sport=5000, svport=0,
                          out_on=(7, RMAC), in_on=(5, CMAC)), ours=(SAPOOL,))
    sent = IP(src=SAPOOL, dst=OUTSIDE, ttl=1) / ICMP(type=8, id=5000, seq=7) / b"pingdata"
    p = Ether(_carried(r, "eth0", _nat_error_frame(router, SAPOOL, sent, kind), "eth1"))
    assert (p[IP].src, p[IP].dst, p[ICMP].type) == (router, INSIDE, kind)
    q = p[IPerror]
    assert (q.src, q.dst) == (INSIDE, OUTSIDE)
    echo = bytes(q.payload)[:8]
    assert echo[0] == 8 and int.from_bytes(echo[4:6], "big") == 33000 and int.from_bytes(echo[6:8], "big") == 7
    as_sent = bytes(IP(src=INSIDE, dst=OUTSIDE, ttl=1) / ICMP(type=8, id=33000, seq=7) / b"pingdata")[20:28]
    assert echo == as_sent, "the quoted echo header is the inside host's, checksum included"
    assert_checksums(p)


# --- TUNNEL: a router between the balancer and a real server, about an IPIP packet we sent -----------------------
TUNSRC = "192.168.100.254"


def _tunnel_runner(client: str, vip: str, tunsrc: str, rs: str):
    """A _nat_runner over one TUNNEL flow client:40000 -> vip:80, encapsulated from tunsrc (ours) to rs, with the
    client reachable on eth0: what a router's error about the encapsulated packet is translated against."""
    entries = {(6, client, 40000, vip, 80): {
        "to_saddr": A(tunsrc), "to_sport": 40000, "to_daddr": A(rs), "to_dport": 80, "out": False, "ifindex": 7,
        "dmac": RMAC, "smac": LBMAC, "fwd": "tunnel", "need_l2": False}}
    r = _nat_runner(entries, ours=(tunsrc,))
    r.d.bal.nexthop = lambda a: (a, "eth0")
    r.d.bal.neighs = {A(client): types.SimpleNamespace(lladdr=CMAC, ifname="eth0")}
    return r


@pytest.mark.parametrize("kind", [3, 11])
def test_a_routers_error_about_our_ipip_packet_reaches_the_client_from_the_vip(kind):
    """TUNNEL across routers (its use: real servers in another network): a hop on the way to the real server whose
    MTU is smaller than the encapsulated packet says "fragmentation needed" (1400) to the tunnel's outer source,
    quoting the IPIP packet with the client's header inside. It was dropped (the quote has no ports of its own), so
    the client never learnt the path MTU and its large segments were lost for good. As LVS (ip_vs_in_icmp's IPIP
    case) the client now gets the error from the VIP, quoting its own packet, with the MTU less the 20 bytes the
    tunnel adds; other errors (a TTL run out) go to it as they are."""
    from scapy.layers.l2 import Ether as E

    r = _tunnel_runner(CLIENT, VIP, TUNSRC, RS)
    client_pkt = IP(src=CLIENT, dst=VIP, flags="DF", len=1500, id=9) / TCP(sport=40000, dport=80, flags="A")
    sent = IP(src=TUNSRC, dst=RS, proto=4, flags="DF", len=1520) / client_pkt
    icmp = ICMP(type=3, code=4, nexthopmtu=1400) if kind == 3 else ICMP(type=11, code=0)
    frame = bytes(E(src=RMAC, dst=LBMAC) / IP(src="192.168.100.99", dst=TUNSRC) / icmp / bytes(sent)[:68])
    r.carry_out(r.sp.handle("eth1", frame))
    assert r.translated == 1
    (out,) = r.socks[("eth0", 0)].sent
    p = E(out)
    assert (p.dst, p.src) == ("02:cc:00:00:00:01", "02:aa:00:00:00:01")
    assert (p[IP].src, p[IP].dst, p[ICMP].type) == (VIP, CLIENT, kind)
    if kind == 3:
        assert (p[ICMP].code, p[ICMP].nexthopmtu) == (4, 1380)
    assert bytes(p[ICMP].payload)[:28] == bytes(client_pkt)[:28], "quotes the client's own header and 8 bytes"
    assert_checksums(p)


# --- IPv6 (FullNAT v6): the same translations; found in a lab, where a real server's Packet Too Big about a v6
# flow never reached the client (the fast path passed it to the kernel, the runner took IPv4 only)
CLIENT6, VIP6, LIP6, RS6, ROUTER6 = "fd00:10::1", "fd00:10::100", "fd00:100::fe", "fd00:100::2", "fd00:10::fe"


def _flow6(proto, lport=2000):
    return _pair(proto, "fnat", CLIENT6, VIP6, LIP6, RS6, sport=lport)


def _error6(src, dst, quoted, mtu=1280):
    from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6

    p = IPv6(src=src, dst=dst) / ICMPv6PacketTooBig(mtu=mtu) / bytes(quoted)[:48]
    return P.parse_icmp6_error(bytes(p)[40:])


def _check6(frame, ifname, want_ifname, src, dst, qsrc, qdst, qsport, qdport, l4):
    from scapy.layers.inet6 import ICMPv6PacketTooBig, IPerror6, IPv6, TCPerror as _T, UDPerror as _U

    assert ifname == want_ifname
    p = Ether(frame)
    assert (p[IPv6].src, p[IPv6].dst, p[IPv6].nh) == (src, dst, 58)
    assert p[ICMPv6PacketTooBig].mtu == 1280
    q = p[IPerror6]
    inner = q[TCPerror] if l4 is TCP else q[UDPerror]
    assert (q.src, q.dst, inner.sport, inner.dport) == (qsrc, qdst, qsport, qdport)
    chk = Ether(frame)
    del chk[ICMPv6PacketTooBig].cksum
    assert Ether(bytes(chk))[ICMPv6PacketTooBig].cksum == p[ICMPv6PacketTooBig].cksum, "ICMPv6 checksum"
    assert p[IPv6].plen == len(bytes(p[IPv6].payload))


@pytest.mark.parametrize("l4", [TCP, UDP])
def test_a_v6_packet_too_big_from_the_server_side_goes_to_the_client(l4):
    from scapy.layers.inet6 import IPv6

    proto = 6 if l4 is TCP else 17
    sent = IPv6(src=LIP6, dst=RS6, plen=1400) / l4(sport=2000, dport=80)
    out = SlowPathRunner.translate_icmp_error(_runner(_flow6(proto)), _error6(RS6, LIP6, sent))
    assert out is not None, "translated"
    _check6(out[1], out[0], "eth0", VIP6, CLIENT6, CLIENT6, VIP6, 40000, 80, l4)


def test_a_v6_packet_too_big_from_the_client_side_goes_to_the_real_server():
    from scapy.layers.inet6 import IPv6

    sent = IPv6(src=VIP6, dst=CLIENT6, plen=1400) / TCP(sport=80, dport=40000)
    out = SlowPathRunner.translate_icmp_error(_runner(_flow6(6)), _error6(ROUTER6, VIP6, sent))
    assert out is not None, "translated"
    _check6(out[1], out[0], "eth1", LIP6, RS6, RS6, LIP6, 80, 2000, TCP)


def test_a_v6_error_quoting_no_flow_is_left():
    from scapy.layers.inet6 import IPv6

    sent = IPv6(src=LIP6, dst=RS6) / TCP(sport=2999, dport=80)
    assert SlowPathRunner.translate_icmp_error(_runner(_flow6(6)), _error6(RS6, LIP6, sent)) is None


def _nat_flow6(proto):
    """NAT v6: client:40000 -> VIP:80 to RS:80 with the client's address kept; the reply entry RS -> client."""
    return _pair(proto, "nat", CLIENT6, VIP6, CLIENT6, RS6, sport=40000)


@pytest.mark.parametrize("l4", [TCP, UDP])
def test_a_nat_v6_real_servers_error_to_the_client_is_translated(l4):
    """NAT over IPv6: a Packet Too Big about client:40000 -> RS:80 (from the server, or a router on the servers'
    side) is addressed to the client and only routed through us. The fast path passed it to the kernel, so the
    client never learnt the smaller MTU (IPv6 routers do not fragment: a black hole for what it sends); now it is
    punted when it quotes a NAT flow, taken by the dispatcher though not to us, and sent to the client from the
    VIP quoting client:40000 -> VIP:80, as IPv4's is. A FullNAT flow's error not to us is still left."""
    from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6

    proto = 6 if l4 is TCP else 17
    r = _nat_runner(_nat_flow6(proto))
    r.d.bal.local_reasons = lambda a: (0x8, 0) if str(a) in (VIP6, LIP6) else (0, 0)
    sent = IPv6(src=CLIENT6, dst=RS6, plen=1400) / l4(sport=40000, dport=80)
    frame = bytes(Ether(src=RMAC, dst=LBMAC) / IPv6(src=RS6, dst=CLIENT6) / ICMPv6PacketTooBig(mtu=1280)
                  / bytes(sent)[:48])
    out = _carried(r, "eth1", frame, "eth0")
    _check6(out, "eth0", "eth0", VIP6, CLIENT6, CLIENT6, VIP6, 40000, 80, l4)
    # the same not to us, quoting a FullNAT flow: left
    r2 = _nat_runner(_flow6(proto))
    r2.d.bal.local_reasons = r.d.bal.local_reasons
    fnat = IPv6(src=LIP6, dst=RS6) / l4(sport=2000, dport=80)
    r2.carry_out(r2.sp.handle("eth1", bytes(Ether(src=RMAC, dst=LBMAC) / IPv6(src=RS6, dst="fd00:10::9")
                                            / ICMPv6PacketTooBig(mtu=1280) / bytes(fnat)[:48])))
    assert r2.translated == 0 and not any(s.sent for s in r2.socks.values())


# --- NAT64: an IPv6 client, IPv4 real servers; the errors change family (RFC 7915 4.2, 5.2) ------------------
def _flow64(proto, lport=2000):
    """client6:40000 -> VIP6:80 to RS:80 from LIP:lport; the reply entry (IPv4 key) writes IPv6 addresses."""
    return _pair(proto, "fnat", CLIENT6, VIP6, LIP, RS, sport=lport)


def _icmp6_checksum_ok(p, layer):
    from scapy.layers.inet6 import IPv6

    chk = IPv6(bytes(p[IPv6]))
    del chk[layer].cksum
    return IPv6(bytes(chk))[layer].cksum == p[layer].cksum


@pytest.mark.parametrize("l4", [TCP, UDP])
def test_a_nat64_servers_fragmentation_needed_reaches_the_client_as_packet_too_big(l4):
    """A router on the servers' side cannot take what we translated from the client (LIP:2000 -> RS:80, 1400
    bytes, DF): its "fragmentation needed" (MTU 1300) reaches LIP. It was dropped (the runner took one family),
    so the client kept sending 1420-byte IPv6 packets into a black hole; it now gets Packet Too Big with MTU
    1320 from the VIP, quoting client6:40000 -> VIP6:80 with the payload length it sent."""
    from scapy.layers.inet6 import ICMPv6PacketTooBig, IPerror6, IPv6

    proto = 6 if l4 is TCP else 17
    sent = IP(src=LIP, dst=RS, flags="DF", len=1400, ttl=63) / l4(sport=2000, dport=80)
    out = SlowPathRunner.translate_icmp_error(_runner(_flow64(proto)), _error(RS, LIP, sent, mtu=1300))
    assert out is not None, "translated"
    ifname, frame = out
    p = Ether(frame)
    assert ifname == "eth0" and (p.dst, p.src, p.type) == ("02:cc:00:00:00:01", "02:aa:00:00:00:01", 0x86DD)
    assert (p[IPv6].src, p[IPv6].dst, p[IPv6].nh) == (VIP6, CLIENT6, 58)
    assert p[IPv6].plen == len(bytes(p[IPv6].payload))
    assert p[ICMPv6PacketTooBig].mtu == 1320
    q = p[IPerror6]
    inner = q[TCPerror] if l4 is TCP else q[UDPerror]
    assert (q.src, q.dst, q.nh, q.plen, q.hlim) == (CLIENT6, VIP6, proto, 1380, 63)
    assert (inner.sport, inner.dport) == (40000, 80)
    assert _icmp6_checksum_ok(p, ICMPv6PacketTooBig)


@pytest.mark.parametrize("l4", [TCP, UDP])
def test_a_packet_too_big_from_a_nat64_clients_side_reaches_the_server_as_fragmentation_needed(l4):
    """Downloads: the server's 1500-byte IPv4 reply leaves us as 1520 bytes of IPv6 (VIP6:80 -> client6:40000)
    and a router on the client's path with MTU 1480 answers Packet Too Big to the VIP. The server must hear
    "fragmentation needed" with MTU 1460 from LIP, quoting RS:80 -> LIP:2000 as it sent it."""
    from scapy.layers.inet6 import IPv6

    proto = 6 if l4 is TCP else 17
    sent = IPv6(src=VIP6, dst=CLIENT6, plen=1480, hlim=60) / l4(sport=80, dport=40000)
    out = SlowPathRunner.translate_icmp_error(_runner(_flow64(proto)), _error6(ROUTER6, VIP6, sent, mtu=1480))
    assert out is not None, "translated"
    ifname, frame = out
    p = Ether(frame)
    assert ifname == "eth1" and (p.dst, p.type) == ("02:55:00:00:00:02", 0x0800)
    assert (p[IP].src, p[IP].dst, p[ICMP].type, p[ICMP].code, p[ICMP].nexthopmtu) == (LIP, RS, 3, 4, 1460)
    q = p[IPerror]
    inner = q[TCPerror] if l4 is TCP else q[UDPerror]
    assert (q.src, q.dst, q.proto, q.len, q.ttl, q.flags) == (RS, LIP, proto, 1500, 60, 2)
    assert (inner.sport, inner.dport) == (80, 2000)
    if l4 is UDP:
        assert inner.chksum == 0
    assert_checksums(p)
    q2 = IP(bytes(q)[:20])
    del q2.chksum
    assert IP(bytes(q2)).chksum == q.chksum, "the quoted header's checksum is the translated header's"


@pytest.mark.parametrize("v4,v6", [((3, 3), (1, 4)), ((3, 1), (1, 0)), ((3, 13), (1, 1)), ((11, 0), (3, 0)),
                                   ((3, 2), (4, 1))], ids=["port", "host", "prohibited", "ttl", "protocol"])
def test_nat64_error_kinds_map_as_rfc7915_says(v4, v6):
    """Server side to client: port unreachable stays port unreachable, host unreachable is no route, filtered
    is administratively prohibited, TTL exceeded is hop limit exceeded, protocol unreachable a parameter problem
    at the Next Header field. The client's side to the server: the reverse for those ICMPv6 has."""
    from scapy.layers.inet6 import IPv6

    r = _runner(_flow64(17))
    icmp = bytes(ICMP(type=v4[0], code=v4[1]) / bytes(IP(src=LIP, dst=RS) / UDP(sport=2000, dport=80))[:28])
    ifname, frame = SlowPathRunner.translate_icmp_error(r, P.parse_icmp_error(icmp))
    p = Ether(frame)
    assert ifname == "eth0" and (p[IPv6].payload.type, p[IPv6].payload.code) == v6
    if v6[0] == 4:
        assert bytes(p[IPv6].payload)[4:8] == (6).to_bytes(4, "big"), "points at the Next Header field"
    assert P.icmp6_to_icmp4(1, 4, None) == (3, 3, 0) and P.icmp6_to_icmp4(1, 0, None) == (3, 1, 0)
    assert P.icmp6_to_icmp4(3, 1, None) == (11, 1, 0) and P.icmp6_to_icmp4(1, 1, None) == (3, 10, 0)


def test_nat64_edge_cases():
    """A router that leaves the MTU zero (pre-RFC 1191): the plateau below the quoted length, + 20; an MTU that
    would go under IPv6's 1280 is 1280 (the client cannot go lower) and one under IPv4's 68 is 68; a code with
    no IPv6 counterpart (host precedence violation) and an error routed through us are left."""
    from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6

    r = _runner(_flow64(6))
    sent = IP(src=LIP, dst=RS, flags="DF", len=1500) / TCP(sport=2000, dport=80)
    _, frame = SlowPathRunner.translate_icmp_error(r, _error(RS, LIP, sent, mtu=0))
    assert Ether(frame)[ICMPv6PacketTooBig].mtu == 1492 + 20
    _, frame = SlowPathRunner.translate_icmp_error(r, _error(RS, LIP, sent, mtu=576))
    assert Ether(frame)[ICMPv6PacketTooBig].mtu == 1280
    assert P.icmp6_to_icmp4(2, 0, 60) == (3, 4, 68)
    prec = P.parse_icmp_error(bytes(ICMP(type=3, code=14) / bytes(sent)[:28]))
    assert SlowPathRunner.translate_icmp_error(r, prec) is None
    import dataclasses
    routed = dataclasses.replace(_error(RS, LIP, sent), to_local=False)
    assert SlowPathRunner.translate_icmp_error(r, routed) is None


def test_a_routers_packet_too_big_about_our_6in6_packet_reaches_the_client_from_the_vip():
    """The 6in6 form of the IPIP case above: IPv6 routers never fragment, so a hop between the balancer and a
    TUNNEL real server with a smaller MTU answers every encapsulated full-sized packet with Packet Too Big to the
    outer source. Dropped, the client's large packets were a black hole; it now gets Packet Too Big from the VIP
    quoting its own packet, with the MTU less the 40-byte outer header (at least 1280)."""
    from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6

    r = _tunnel_runner(CLIENT6, VIP6, LIP6, RS6)
    client_pkt = IPv6(src=CLIENT6, dst=VIP6, plen=1460) / TCP(sport=40000, dport=80, flags="A")
    sent = IPv6(src=LIP6, dst=RS6, nh=41, plen=1500) / client_pkt
    frame = bytes(Ether(src=RMAC, dst=LBMAC) / IPv6(src="fd00:100::99", dst=LIP6) / ICMPv6PacketTooBig(mtu=1400)
                  / bytes(sent)[:88])
    r.carry_out(r.sp.handle("eth1", frame))
    assert r.translated == 1
    (out,) = r.socks[("eth0", 0)].sent
    p = Ether(out)
    assert (p.dst, p.src) == ("02:cc:00:00:00:01", "02:aa:00:00:00:01")
    assert (p[IPv6].src, p[IPv6].dst, p[ICMPv6PacketTooBig].mtu) == (VIP6, CLIENT6, 1360)
    assert bytes(p[ICMPv6PacketTooBig].payload)[:48] == bytes(client_pkt)[:48]
    chk = IPv6(bytes(p[IPv6]))
    del chk[ICMPv6PacketTooBig].cksum
    assert IPv6(bytes(chk))[ICMPv6PacketTooBig].cksum == p[ICMPv6PacketTooBig].cksum


@pytest.mark.parametrize("tags", [bytes.fromhex("81000007"), bytes.fromhex("88a8000a8100000b")], ids=["dot1q", "qinq"])
@pytest.mark.parametrize("kind", ["fnat", "fnat6", "nat64"])
def test_a_translated_error_keeps_the_vlan_tags_it_came_with(kind, tags):
    """The fast path rewrites a flow's MACs and keeps its VLAN tags, so both sides of a tagged one-arm balancer share
    the tag; the error about the flow is sent on with the tags it came with. It left untagged, onto the native
    VLAN, and a tagged client never learnt its path MTU (a black hole for its large packets)."""
    import dataclasses

    from scapy.layers.inet6 import IPv6

    if kind == "fnat":
        sent = IP(src=LIP, dst=RS, flags="DF") / TCP(sport=2000, dport=80)
        r, err = _runner(_flow(6, "fnat")), _error(RS, LIP, sent)
    elif kind == "fnat6":
        sent = IPv6(src=LIP6, dst=RS6, plen=1400) / TCP(sport=2000, dport=80)
        r, err = _runner(_flow6(6)), _error6(RS6, LIP6, sent)
    else:
        sent = IP(src=LIP, dst=RS, flags="DF", len=1400, ttl=63) / TCP(sport=2000, dport=80)
        r, err = _runner(_flow64(6)), _error(RS, LIP, sent, mtu=1300)
    plain = SlowPathRunner.translate_icmp_error(r, err)
    assert plain is not None and Ether(plain[1]).type in (0x0800, 0x86DD)
    ifname, frame = SlowPathRunner.translate_icmp_error(r, dataclasses.replace(err, tags=tags))
    assert ifname == plain[0] and frame == plain[1][:12] + tags + plain[1][12:]
