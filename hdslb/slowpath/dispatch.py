"""The slow path's dispatcher: frames the XDP program punts to AF_XDP in, frames to send and neighbour-map writes out.

Pure logic over the balancer model and a NeighTable: no sockets, no maps, no clock of its own. The daemon feeds
every received frame with the interface it came from to handle(), calls tick() a few times a second, and
carries out the returned Actions: transmit each (ifname, frame) on that interface's socket, apply
neigh_deletes and neigh_updates to the fast path's neighbour map (an address is in at most one of the two
lists of one Actions, so their order does not matter). handle() never raises on any frame.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from hdslb.slowpath import packets as P
from hdslb.slowpath.neigh import NeighEvents, NeighTable, Probe

log = logging.getLogger("hdslb.slowpath")

# Counter names, for metrics and `hdslb-ctl` (rx_* are per kind of received frame).
RX_KINDS = ("arp_request", "arp_reply", "arp", "icmp_echo", "icmp6_echo", "nd_ns", "nd_na", "icmp_error",
            "unresolved", "other")
COUNTERS = ("rx", *(f"rx_{k}" for k in RX_KINDS), "tx", "arp_reply", "arp_request", "icmp_echo_reply", "nd_na",
            "nd_ns", "announce", "unres_queued", "unres_dropped", "unres_sent", "nexthop_known", "no_route",
            "addr_conflict", "icmp_error", "malformed", "unexpected", "error",
            # limits (neigh.py): entries refused at gc_thresh3, entries a forced GC evicted, frames dropped at
            # the unresolved queues' byte cap; neighbour map writes that failed (the runner retries them)
            "neigh_table_full", "neigh_gc_forced", "unres_bytes_full", "neigh_write_failed",
            # ARP replies / neighbour advertisements about a neighbour we never asked for: not learned
            "neigh_unsolicited",
            # connection entries moved to a next hop's new MAC (the runner, when a real server's MAC moved)
            "conn_remac",
            # ARP/ND about a neighbour heard on another interface than the one its entry (or route) is on: ignored
            "neigh_other_iface")


@dataclass
class Actions:
    """What one call asks the daemon to do, and what it counted."""

    tx: list = field(default_factory=list)  # (ifname, frame bytes), in order
    neigh_updates: list = field(default_factory=list)  # (ip, mac bytes, ifname, permanent)
    neigh_deletes: list = field(default_factory=list)  # (ip, ifname)
    icmp_errors: list = field(default_factory=list)  # (ifname, packets.IcmpError) for translation (to_local: to us)
    counters: Counter = field(default_factory=Counter)

    def __post_init__(self):
        # addresses in each list: a write for an address not there yet appends, O(1), instead of filtering
        # the lists (a forced GC's thousands of deletes, a batch's hundreds of updates)
        self._updated = {u[0] for u in self.neigh_updates}
        self._deleted = {d[0] for d in self.neigh_deletes}

    def count(self, name: str, n: int = 1) -> None:
        if n:
            self.counters[name] += n

    def send(self, ifname: str, frame: bytes, counter: str | None = None) -> None:
        self.tx.append((ifname, frame))
        if counter:
            self.count(counter)

    # Last write per address wins and lands in exactly one list: the map is keyed by address alone, so a
    # delete followed by an update is just the update, and an update followed by a delete just the delete.
    def neigh_set(self, ip, mac: bytes, ifname: str, permanent: bool = False) -> None:
        self._forget(ip)
        self.neigh_updates.append((ip, mac, ifname, permanent))
        self._updated.add(ip)

    def neigh_del(self, ip, ifname: str) -> None:
        self._forget(ip)
        self.neigh_deletes.append((ip, ifname))
        self._deleted.add(ip)

    def _forget(self, ip) -> None:
        if ip in self._updated:
            self.neigh_updates = [u for u in self.neigh_updates if u[0] != ip]
            self._updated.discard(ip)
        if ip in self._deleted:
            self.neigh_deletes = [d for d in self.neigh_deletes if d[0] != ip]
            self._deleted.discard(ip)

    def extend(self, other: Actions) -> Actions:
        self.tx += other.tx
        for ip, ifname in other.neigh_deletes:
            self.neigh_del(ip, ifname)
        for u in other.neigh_updates:
            self.neigh_set(*u)
        self.icmp_errors += other.icmp_errors
        self.counters.update(other.counters)
        return self

    def by_iface(self) -> dict:
        """tx grouped per interface, order kept: one send_batch per socket."""
        out: dict = {}
        for ifname, frame in self.tx:
            out.setdefault(ifname, []).append(frame)
        return out

    def __bool__(self) -> bool:
        return bool(self.tx or self.neigh_updates or self.neigh_deletes or self.icmp_errors)


def local_entry(model, addr) -> tuple[int, int]:
    """(flags, ifindex) of addr's local_map entry, by the model's own rule (Balancer.local_reasons).

    ifindex 0 means "answer ARP/ND on every interface" (a VIP with own_vip and no interface address).
    """
    return model.local_reasons(addr)


def is_local(model, addr) -> bool:
    """addr is ours on some interface (pings to it are answered wherever they arrive, like Linux)."""
    return local_entry(model, addr)[0] != 0


def owned_on(model, addr, ifname: str) -> bool:
    """addr is answered for in ARP/ND on ifname: the same test the XDP program applies to ARP."""
    flags, ifindex = local_entry(model, addr)
    return bool(flags) and (ifindex == 0 or ifindex == model.ifaces[ifname].ifindex)


_ZERONET = ipaddress.ip_network("0.0.0.0/8")
CONFLICT_LOG_INTERVAL = 60.0  # seconds between log lines about the same address claimed by the same MAC


def martian_source(model, ip) -> bool:
    """A source address no host on a link can have, which Linux drops before answering anything
    (ip_route_input_slow, fib_validate_source): unspecified, 0/8, loopback, multicast, the limited broadcast,
    an IPv4-mapped IPv6 address, or one of our own addresses. An echo reply or ARP reply to it would go to
    nobody, to a whole group or back to ourselves (the fast path drops such openers too: drop_martian)."""
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast:
        return True
    if ip.version == 4:
        if ip == P.V4_BCAST or ip in _ZERONET:
            return True
    elif ip.ipv4_mapped is not None:
        return True
    return is_local(model, ip)


def _unspecified(version: int):
    return P.V4_ANY if version == 4 else P.V6_ANY


class SlowPath:
    def __init__(self, model, neigh: NeighTable | None = None, now=time.monotonic, ttl: int = 64,
                 proactive: bool = True):
        self.model = model
        self.neigh = neigh if neigh is not None else NeighTable(now=now)
        self.now = now
        self.ttl = ttl  # TTL / hop limit of the echo replies we originate (ipv4_defs default_ttl)
        # Resolve every real server's next hop before traffic needs it, and keep confirming it (the resolver
        # the daemon ran before the slow path existed); without it only punted frames start resolution.
        self.proactive = proactive
        self.counters: Counter = Counter({k: 0 for k in COUNTERS})
        self._static_seen = None  # (the model's neighs dict, its length) at the last sync of static entries
        self._conflicts_logged: dict = {}  # (address, MAC) -> when an address conflict was last logged
        self.static_syncs = 0  # full syncs of static entries done (each costs one pass over them)

    # --- entry points ---------------------------------------------------------------------------
    def handle(self, ifname: str, frame: bytes) -> Actions:
        """One received frame from ifname."""
        act = Actions()
        try:
            self._sync_static(act, full=False)
            self._handle(ifname, bytes(frame), act)
        except Exception:  # a bug must cost one frame, never the daemon
            log.exception("slow path: frame from %s (%d bytes) raised", ifname, len(frame))
            act.count("error")
        return self._account(act)

    def send_routed(self, frame: bytes) -> Actions:
        """A frame we made whose destination's MAC no entry holds (a TUNNEL client's ICMP error): routed and
        resolved as a rewritten frame with an unresolved next hop is (queued while its ARP is answered)."""
        act = Actions()
        try:
            self._sync_static(act, full=False)
            eth = P.parse_eth(frame)
            self._unresolved(eth, frame, frame[eth.l2len:], act)
        except Exception:  # a bug must cost one frame, never the daemon
            log.exception("slow path: routing a frame of ours (%d bytes) raised", len(frame))
            act.count("error")
        return self._account(act)

    def handle_batch(self, ifname: str, frames) -> Actions:
        """A batch from one socket (XskSocket.attach_loop's callback): one Actions for all of it."""
        act = Actions()
        for f in frames:
            act.extend(self.handle(ifname, f))
        return act  # already accounted frame by frame

    def tick(self) -> Actions:
        """Periodic work: probe retries and failures, aging, and (proactive) real servers' next hops."""
        act = Actions()
        try:
            self._sync_static(act)
            self._apply(self.neigh.tick(), act)
            if self.proactive:
                self._apply(self.neigh.keep_wanted(self.wanted()), act)
        except Exception:
            log.exception("slow path: tick raised")
            act.count("error")
        return self._account(act)

    def sync_static(self) -> Actions:
        """Mirror the model's static neighbours now (a full sync): what `dpip neigh show` lists right after a
        `neigh add` or `del` must be that change, not wait for the next frame or tick."""
        act = Actions()
        self._sync_static(act)
        return self._account(act)

    def adopt(self, neighs) -> Actions:
        """Take over what the fast path's neighbour map already holds ((ip, mac, ifname) each, at start); those
        beyond gc_thresh3 are deleted from the map, where nothing would ever age them."""
        act = Actions()
        for ip, mac, ifname in neighs:
            self._apply(self.neigh.adopt(ip, mac, ifname), act)
        return self._account(act)

    def announce(self, ip, ifname: str) -> Actions:
        """Gratuitous ARP (IPv4) or unsolicited NA (IPv6) for an address we just took on ifname."""
        act = Actions()
        try:
            a = ipaddress.ip_address(ip)
        except ValueError:
            return self._account(act)
        ifc = self.model.ifaces.get(ifname)
        if ifc is not None:
            frame = P.gratuitous_arp(ifc.mac, a) if a.version == 4 else P.unsolicited_na(ifc.mac, a)
            act.send(ifname, frame, "announce")
        return self._account(act)

    def wanted(self) -> dict:
        """Next hop -> egress interface for every real server and SNAT gateway (what new connections will
        need): the model's one rule, shared with the daemon's own resolver."""
        return self.model.wanted_nexthops()

    def show(self, ifname: str | None = None, af: int | None = None) -> list[dict]:
        return self.neigh.show(ifname, af)

    # --- bookkeeping ----------------------------------------------------------------------------
    def _account(self, act: Actions) -> Actions:
        act.count("tx", len(act.tx))
        self.counters.update(act.counters)
        return act

    def _sync_static(self, act: Actions, full: bool = True) -> None:
        """Mirror the model's static neighbours (dpip neigh add/del) as PERMANENT entries.

        Per frame (full False) only when the model's set looks changed: another dict or another count, so an
        added or deleted static neighbour counts from the next frame at O(1) a frame, whatever the size of the
        table. A static neighbour given a new MAC in place is caught by the tick's full sync (the model writes
        static entries into the fast path's map itself, so only queued frames could wait that long). A full
        sync walks the static entries, never the learned ones."""
        want = self.model.neighs
        seen = (want, len(want))
        if not full and self._static_seen is not None and self._static_seen[0] is want \
                and self._static_seen[1] == seen[1]:
            return
        self._static_seen = seen
        self.static_syncs += 1
        for ip in [ip for ip in self.neigh.static_ips if ip not in want]:
            self._apply(self.neigh.remove(ip), act)
        for ip, n in want.items():
            e = self.neigh.entries.get(ip)
            if e is None or not e.permanent or e.mac != n.lladdr or e.ifname != n.ifname:
                self._apply(self.neigh.set_permanent(ip, n.lladdr, n.ifname), act)

    def _apply(self, ev: NeighEvents, act: Actions) -> None:
        for ip, ifname in ev.deletes:
            act.neigh_del(ip, ifname)
        for ip, mac, ifname, perm in ev.updates:
            act.neigh_set(ip, mac, ifname, perm)
        for p in ev.probes:
            self._send_probe(p, act)
        for ifname, frame, mac in ev.send:
            ifc = self.model.ifaces.get(ifname)
            if ifc is None:  # the interface went away while the frame waited
                act.count("unres_dropped")
                continue
            act.send(ifname, P.set_macs(frame, mac, ifc.mac), "unres_sent")
        act.count("unres_queued", ev.queued)
        act.count("unres_dropped", ev.dropped)
        for name, n in ev.counters.items():
            act.count(name, n)

    def _send_probe(self, p: Probe, act: Actions) -> None:
        ifc = self.model.ifaces.get(p.ifname)
        if ifc is None:
            return
        src = self.probe_source(p.ip, p.ifname)
        if p.ip.version == 4:
            act.send(p.ifname, P.arp_request(ifc.mac, src, p.ip, dmac=p.mac or P.BROADCAST), "arp_request")
        else:
            act.send(p.ifname, P.nd_ns(ifc.mac, src, p.ip, dmac=p.mac), "nd_ns")

    def probe_source(self, target, ifname: str):
        """Sender address of an ARP request / NS for target on ifname: the model's one rule (Balancer.probe_source)."""
        return self.model.probe_source(target, ifname)

    def _learnable(self, ip, mac: bytes, act: Actions, ifname: str = "?") -> bool:
        """A neighbour may be learned at ip/mac: a real unicast host that is not claiming one of our addresses."""
        if ip.is_unspecified or ip.is_multicast or not P.is_unicast_mac(mac):
            return False
        if ip == P.V4_BCAST:
            return False
        if is_local(self.model, ip):
            self._conflict(ip, mac, ifname, act)  # someone else answers for our address: never learned
            return False
        # 0/8, loopback, IPv4-mapped: never a neighbour (XDP's arp_learn skips them too)
        return not martian_source(self.model, ip)

    def _conflict(self, ip, mac: bytes, ifname: str, act: Actions) -> None:
        """Another host claims an address of ours (its ARP/NS sender or NA target): counted (addr_conflict) and
        logged, at most once a minute per address and MAC, naming the MAC, so an operator whose VIP another box
        took (a duplicate address, a keepalived peer still holding it) sees who, not only a counter moving."""
        act.count("addr_conflict")
        now = self.now()
        key = (ip, bytes(mac) if mac else b"")
        last = self._conflicts_logged.get(key)
        if last is not None and now - last < CONFLICT_LOG_INTERVAL:
            return
        if len(self._conflicts_logged) >= 1024:  # bounded whatever a hostile segment sends
            self._conflicts_logged.clear()
        self._conflicts_logged[key] = now
        log.warning("slow path: %s is ours but %s on %s claims it (address conflict; counted addr_conflict)",
                    ip, P.mac_str(mac) if mac else "a host", ifname)

    # --- classification -------------------------------------------------------------------------
    def _handle(self, ifname: str, frame: bytes, act: Actions) -> None:
        act.count("rx")
        eth = P.parse_eth(frame)
        if eth is None:
            act.count("rx_other")
            act.count("malformed")
            return
        ifc = self.model.ifaces.get(ifname)
        l3 = frame[eth.l2len:]
        # The fast path hands over rewritten frames with a zero destination and our own source MAC: check
        # for those before treating our source MAC as a frame of ours looped back.
        if ifc is not None and eth.dst == P.ZERO_MAC and eth.ethertype in (P.ETH_P_IP, P.ETH_P_IPV6):
            self._unresolved(eth, frame, l3, act)
            return
        if ifc is None or eth.src == ifc.mac:  # not an interface we manage, or our own frame looped back
            act.count("rx_other")
            act.count("unexpected")
            return
        if eth.ethertype == P.ETH_P_ARP:
            self._arp(ifc, eth, l3, act)
        elif eth.ethertype == P.ETH_P_IP:
            self._ipv4(ifc, eth, frame, l3, act)
        elif eth.ethertype == P.ETH_P_IPV6:
            self._ipv6(ifc, eth, frame, l3, act)
        else:
            act.count("rx_other")
            act.count("unexpected")

    def _arp(self, ifc, eth: P.Eth, body: bytes, act: Actions) -> None:
        arp = P.parse_arp(body)
        if arp is None:
            act.count("rx_arp")
            act.count("malformed")
            return
        if arp.op not in (P.ARPOP_REQUEST, P.ARPOP_REPLY):
            act.count("rx_arp")
            act.count("unexpected")
            return
        ours = owned_on(self.model, arp.tpa, ifc.name)
        learnable = self._learnable(arp.spa, arp.sha, act, ifc.name)
        if arp.op == P.ARPOP_REQUEST:
            act.count("rx_arp_request")
            # An ARP probe (RFC 5227: from 0.0.0.0) is answered; a request from another martian sender is not,
            # as Linux (its route lookup for the sender fails). One from an address of ours is a conflict
            # (counted by _learnable) and still answered, so the other host learns the address is taken.
            if ours and (arp.spa == P.V4_ANY or is_local(self.model, arp.spa)
                         or not martian_source(self.model, arp.spa)):
                reply = P.retag(P.arp_reply(ifc.mac, arp.tpa, arp.sha, arp.spa), eth.tags)
                act.send(ifc.name, reply, "arp_reply")
            # The asker is talking to us, so it is worth an entry; anyone else's request (gratuitous ARP
            # included) only refreshes an entry we have, which is how a moved MAC is picked up.
            ev = self.neigh.learn(arp.spa, arp.sha, ifc.name, confirmed=False, create=ours) if learnable else None
            if ev is not None:
                self._apply(ev, act)
            if not ours and not (ev and ev.updates):
                act.count("unexpected")
            return
        act.count("rx_arp_reply")
        to_us = eth.dst == ifc.mac
        if learnable:
            # A reply only updates an entry we have (Linux with arp_accept=0): one for an address we never asked
            # about would let anyone plant entries. Two-way reachability is proven only by a reply sent to our
            # MAC (Linux: REACHABLE vs STALE).
            if arp.spa not in self.neigh.entries:
                act.count("neigh_unsolicited")
                return
            self._apply(self.neigh.learn(arp.spa, arp.sha, ifc.name, confirmed=to_us, create=False), act)

    def _unresolved(self, eth: P.Eth, frame: bytes, l3: bytes, act: Actions) -> None:
        """A frame the fast path rewrote but could not address: its next hop had no MAC."""
        act.count("rx_unresolved")
        ip = P.parse_ipv4(l3) if eth.ethertype == P.ETH_P_IP else P.parse_ipv6(l3)
        if ip is None:
            act.count("malformed")
            return
        dst = ip.dst
        if dst.is_multicast or dst.is_unspecified or is_local(self.model, dst):
            act.count("unexpected")  # nothing a neighbour lookup can deliver (or a loop back to us)
            return
        nh = self.model.nexthop(dst)
        if nh is None or nh[1] not in self.model.ifaces or nh[0].version != dst.version:
            act.count("no_route")
            return
        nh_ip, oif = nh
        # the frame keeps its VLAN tags, as the fast path keeps them on the flow's later packets (it rewrites MACs
        # only; TUNNEL's encapsulated frames come untagged)
        mac, ev = self.neigh.resolve(nh_ip, oif, frame)
        self._apply(ev, act)
        if mac is not None:
            act.send(oif, P.set_macs(frame, mac, self.model.ifaces[oif].mac), "nexthop_known")

    def _ipv4(self, ifc, eth: P.Eth, frame: bytes, l3: bytes, act: Actions) -> None:
        ip = P.parse_ipv4(l3)
        if ip is None:
            act.count("rx_other")
            act.count("malformed")
            return
        if ip.proto != P.IPPROTO_ICMP or ip.is_fragment:
            act.count("rx_other")
            act.count("unexpected")
            return
        icmp = ip.payload
        kind = icmp[0] if icmp else -1
        # Not to us: only an error the fast path punted because it quotes a NAT flow (a real server's error about
        # a packet we forwarded to it, addressed to the client); everything else stays unexpected.
        local = is_local(self.model, ip.dst)
        if not local and kind not in (P.ICMP_DEST_UNREACH, P.ICMP_TIME_EXCEEDED):
            act.count("rx_other")
            act.count("unexpected")
            return
        if kind == P.ICMP_ECHO:
            act.count("rx_icmp_echo")
            if martian_source(self.model, ip.src):
                act.count("unexpected")
                return
            reply = P.icmp_echo_reply(frame, smac=ifc.mac, ttl=self.ttl)
            if reply is None:
                act.count("malformed")
            else:
                act.send(ifc.name, reply, "icmp_echo_reply")
        elif kind in (P.ICMP_DEST_UNREACH, P.ICMP_TIME_EXCEEDED):
            act.count("rx_icmp_error")
            err = P.parse_icmp_error(icmp) if P.checksum(icmp) == 0 else None
            if err is None:
                act.count("malformed")
            else:
                act.icmp_errors.append((ifc.name, dataclasses.replace(err, to_local=local, src=ip.src,
                                                                      tags=eth.tags)))
                act.count("icmp_error")
        else:
            act.count("rx_other")
            act.count("malformed" if kind < 0 else "unexpected")

    def _ipv6(self, ifc, eth: P.Eth, frame: bytes, l3: bytes, act: Actions) -> None:
        ip6 = P.parse_ipv6(l3)
        if ip6 is None:
            act.count("rx_other")
            act.count("malformed")
            return
        if ip6.nh != P.IPPROTO_ICMPV6:
            act.count("rx_other")
            act.count("unexpected")
            return
        kind = ip6.payload[0] if ip6.payload else -1
        rx = {P.ICMPV6_ECHO_REQUEST: "icmp6_echo", P.ND_NEIGHBOR_SOLICIT: "nd_ns", P.ND_NEIGHBOR_ADVERT: "nd_na",
              P.ICMPV6_DEST_UNREACH: "icmp_error", P.ICMPV6_PKT_TOOBIG: "icmp_error",
              P.ICMPV6_TIME_EXCEED: "icmp_error"}.get(kind, "other")
        act.count(f"rx_{rx}")
        if not P.icmp6_ok(ip6):
            act.count("malformed")
            return
        if rx == "icmp6_echo":
            if not is_local(self.model, ip6.dst) or martian_source(self.model, ip6.src):
                act.count("unexpected")
                return
            reply = P.icmp6_echo_reply(frame, smac=ifc.mac, hlim=self.ttl)
            if reply is None:
                act.count("malformed")
            else:
                act.send(ifc.name, reply, "icmp_echo_reply")
        elif rx in ("nd_ns", "nd_na"):
            nd = P.parse_nd(ip6.payload)
            if nd is None or ip6.hlim != P.ND_HOP_LIMIT:
                act.count("malformed")  # RFC 4861 7.1: silently discarded
                return
            (self._ns if rx == "nd_ns" else self._na)(ifc, eth, ip6, nd, act)
        elif rx == "icmp_error":
            # not to us: only a NAT real server's error to its client, punted because it quotes a NAT flow (the
            # runner translates it only when it does)
            local = is_local(self.model, ip6.dst)
            err = P.parse_icmp6_error(ip6.payload)
            if err is None:
                act.count("malformed")
            else:
                act.icmp_errors.append((ifc.name, dataclasses.replace(err, to_local=local, tags=eth.tags)))
                act.count("icmp_error")
        else:
            act.count("unexpected")

    def _ns(self, ifc, eth: P.Eth, ip6: P.IPv6, nd: P.ND, act: Actions) -> None:
        dad = ip6.src.is_unspecified
        if dad and (nd.lladdr is not None or not ip6.dst.is_multicast):
            act.count("malformed")  # RFC 4861 7.1.1: DAD probes carry no source link-layer option
            return
        if not owned_on(self.model, nd.target, ifc.name):
            act.count("unexpected")
            return
        if dad:
            # someone probes an address we hold: defend it to all nodes (not solicited: nobody to answer)
            dst, dmac, solicited = P.ALL_NODES, P.mcast_mac(P.ALL_NODES), False
        else:
            dst, dmac, solicited = ip6.src, nd.lladdr or eth.src, True
            if nd.lladdr is not None and self._learnable(ip6.src, nd.lladdr, act, ifc.name):
                self._apply(self.neigh.learn(ip6.src, nd.lladdr, ifc.name, confirmed=False, create=True), act)
        na = P.retag(P.nd_na(ifc.mac, nd.target, dst, dmac, solicited=solicited, override=True), eth.tags)
        act.send(ifc.name, na, "nd_na")

    def _na(self, ifc, eth: P.Eth, ip6: P.IPv6, nd: P.ND, act: Actions) -> None:
        if nd.solicited and ip6.dst.is_multicast:
            act.count("malformed")  # RFC 4861 7.1.2
            return
        if is_local(self.model, nd.target):
            self._conflict(nd.target, nd.lladdr or eth.src, ifc.name, act)
            return
        if nd.lladdr is not None and not P.is_unicast_mac(nd.lladdr):
            act.count("malformed")
            return
        if nd.target not in self.neigh.entries:
            act.count("neigh_unsolicited")  # RFC 4861 7.2.5: no entry, the advertisement is silently discarded
            return
        to_us = eth.dst == ifc.mac or owned_on(self.model, ip6.dst, ifc.name)
        self._apply(self.neigh.learn(nd.target, nd.lladdr, ifc.name, confirmed=nd.solicited and to_us,
                                     override=nd.override, create=False), act)
