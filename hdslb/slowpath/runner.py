"""The slow path inside hdslbd: AF_XDP sockets per (interface, rx queue), the dispatcher, and map updates.

The XDP program redirects what it owns but cannot finish (ARP for owned addresses, ICMP echo to them, packets
whose next hop has no MAC yet) to the socket registered at key slot * XSK_MAX_QUEUES + queue in its XSKMAP.
Frames go to SlowPath.handle_batch; its Actions are carried out here: frames sent on the egress interface's
socket, neighbours written to (or deleted from) the fast path's neighbour map. A map write that fails (the map
full, a map swapped under us) is counted, kept as the address's pending write and retried every tick until it
lands or a newer write for the address replaces it: the neighbour table never believes in an entry the fast
path does not have.
"""

from __future__ import annotations

import asyncio
import ctypes as ct
import glob
import ipaddress
import logging
import os
import time

from hdslb.slowpath.dispatch import Actions, SlowPath
from hdslb.slowpath.neigh import MAX_NEIGH, NeighTable, gc_thresholds

log = logging.getLogger("hdslb.slowpath")

XSK_MAX_QUEUES = 16  # bpf/include/hdslb_abi.h
TICK_S = 0.25
RETRY_PER_TICK = 256  # failed neighbour-map writes retried per tick: a map that stays full costs this, no more


def rx_queue_count(ifname: str) -> int:
    """Receive queues the interface exposes (veth shows more than it activates: binding tells)."""
    return len(glob.glob(f"/sys/class/net/{ifname}/queues/rx-*"))


def rx_queues(ifname: str) -> int:
    """The queues the slow path tries to serve: at most XSK_MAX_QUEUES (the fast path's XSKMAP block per interface)."""
    return max(1, min(rx_queue_count(ifname), XSK_MAX_QUEUES))


# Per-socket counters stats.get and /metrics carry: ours, then the kernel's (XDP_STATISTICS). rx_ring_full and
# rx_fill_ring_empty_descs are frames the kernel dropped because the slow path was not draining fast enough.
SOCKET_COUNTERS = ("rx_frames", "tx_frames", "rx_bad", "tx_no_frame", "rx_dropped", "rx_ring_full",
                   "rx_fill_ring_empty_descs", "rx_invalid_descs", "tx_invalid_descs")


class SlowPathRunner:
    def __init__(self, daemon, neigh_timeout: float = 60.0, unres_queue_length: int = 128, ttl: int = 64):
        self.d = daemon
        sizes = getattr(daemon, "sizes", None)
        thresh2, thresh3 = gc_thresholds(getattr(sizes, "max_neigh", MAX_NEIGH))
        self.neigh = NeighTable(now=time.monotonic, timeout=neigh_timeout, unres_queue_length=unres_queue_length,
                                gc_thresh2=thresh2, gc_thresh3=thresh3)
        self.sp = SlowPath(daemon.bal, self.neigh, ttl=ttl)
        # address -> the write that failed, (ip, mac, ifname, permanent) or (ip, ifname) for a delete; oldest first
        self.dirty: dict = {}
        self.socks: dict[tuple[str, int], object] = {}  # (ifname, queue) -> XskSocket
        self._tick_task: asyncio.Task | None = None
        self._kick = asyncio.Event()
        self.translated = 0  # ICMP errors about balanced flows forwarded to their clients
        self.macs: dict = {}  # wanted next hop -> (MAC, ifindex) last written to the fast path (see _note_mac)
        self._remac_busy = False  # a conn_remac walk runs (remac)
        self._remac_waiting: dict = {}  # (old MAC, ifindex) -> (next hop, new MAC) asked for while one ran

    # --- lifecycle ------------------------------------------------------------------------------
    def open(self) -> None:
        """One socket per interface queue; raises if the first queue of an interface cannot be served."""
        from hdslb.slowpath.xsk import XskSocket

        loop = asyncio.get_running_loop()
        for ifc in self.d.bal.ifaces.values():
            total = rx_queue_count(ifc.name)
            if total > XSK_MAX_QUEUES:
                log.warning("slow path: %s has %d receive queues, the slow path serves the first %d: on the others "
                            "ARP, neighbour solicitations and pings for our addresses are answered in XDP, and ICMP "
                            "errors about flows (path MTU) are not translated; "
                            "'ethtool -L %s combined %d' keeps every queue served", ifc.name, total, XSK_MAX_QUEUES,
                            ifc.name, XSK_MAX_QUEUES)
            for q in range(rx_queues(ifc.name)):
                try:
                    sock = XskSocket(ifc.name, q)
                except OSError as e:
                    if q == 0:
                        raise
                    log.debug("%s queue %d not served: %s", ifc.name, q, e)
                    break
                self.socks[(ifc.name, q)] = sock
                sock.attach_loop(loop, lambda frames, n=ifc.name: self.carry_out(self.sp.handle_batch(n, frames)))
        self.register()
        # Neighbours the fast path already holds (a previous daemon's, the kernel's) are adopted, not relearned.
        # Those beyond gc_thresh3 are deleted from the map (nothing would age them there).
        by_index = {i.ifindex: i.name for i in self.d.bal.ifaces.values()}
        held = [n for n in self.d.maps.neighs() if not n["permanent"] and n["ifindex"] in by_index]
        # what established connections were made with, so a MAC that moved while no daemon ran is followed too
        self.macs = {ipaddress.ip_address(n["addr"]): (bytes.fromhex(n["lladdr"].replace(":", "")), n["ifindex"])
                     for n in held}
        self.carry_out(self.sp.adopt((n["addr"], bytes.fromhex(n["lladdr"].replace(":", "")), by_index[n["ifindex"]])
                                     for n in held))
        self._tick_task = asyncio.create_task(self._ticker())
        log.info("slow path: %d AF_XDP sockets on %s", len(self.socks), ", ".join(sorted({k[0] for k in self.socks})))

    def register(self) -> None:
        """Put every socket into the (current) program's XSKMAP; again after a datapath reload."""
        xsks = self.d.fp.table(b"xsks")
        slots = {name: i for i, name in enumerate(self.d.bal.ifaces)}
        for (ifname, q), sock in self.socks.items():
            xsks[ct.c_int(slots[ifname] * XSK_MAX_QUEUES + q)] = ct.c_int(sock.fd)

    async def close(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
            await asyncio.gather(self._tick_task, return_exceptions=True)
        for sock in self.socks.values():
            sock.close()  # the kernel drops the XSKMAP entry: XDP answers ARP itself again
        self.socks.clear()

    # --- work -----------------------------------------------------------------------------------
    def carry_out(self, act: Actions) -> None:
        # Map writes first: they never raise, and nothing after them (a send, a translation) can lose them.
        for d in act.neigh_deletes:
            self._write(d)
        for u in act.neigh_updates:
            self._write(u)
        for _ifname, err in act.icmp_errors:
            out = self.translate_icmp_error(err)
            if out is None:
                continue
            self.translated += 1
            if out[0] is None:  # no MAC known for its destination: routed and resolved as an unresolved next hop
                self.carry_out(self.sp.send_routed(out[1]))
            else:
                act.tx.append(out)
        for ifname, frames in act.by_iface().items():
            sock = self.socks.get((ifname, 0))
            if sock is not None:
                sock.send_batch(frames)

    def _write(self, op: tuple) -> bool:
        """One neighbour-map write: (ip, ifname) deletes, (ip, mac, ifname, permanent) sets. Never raises: a
        failure is counted and the write kept for retry_dirty(); a success clears what was pending for ip."""
        ip = op[0]
        self.dirty.pop(ip, None)  # this write supersedes whatever was pending for the address
        try:
            if len(op) == 2:
                self.d.maps.del_neigh(ip)
            else:
                _ip, mac, ifname, permanent = op
                ifc = self.d.bal.ifaces.get(ifname)
                if ifc is None:
                    return True  # the interface went away: nothing to write
                self.d.maps.set_neigh(ip, mac, ifc.ifindex, permanent=permanent)
                self._note_mac(ip, mac, ifc.ifindex)
            return True
        except Exception as e:  # the map full (E2BIG/ENOMEM), a map swapped during a datapath reload, ...
            if not self.dirty:
                log.warning("slow path: neighbour map write for %s failed (%s); retried every tick", ip, e)
            self.dirty[ip] = op
            self.sp.counters["neigh_write_failed"] += 1
            return False

    def _note_mac(self, ip, mac: bytes, ifindex: int) -> None:
        """A next hop the balancer sends flows to (a real server, a gateway: NeighTable.wanted) got a MAC written;
        if it had another one on the same interface, established connections still carry the old one (each
        entry keeps its first packet's MAC): move them (Maps.conn_remac, a walk of the tables, in a worker
        thread). Only wanted next hops are remembered, so the memory is bounded by the model, not by what a
        segment sends."""
        wanted = self.neigh.wanted
        if ip not in wanted and ip not in self.macs:
            return
        old = self.macs.get(ip)
        self.macs[ip] = (bytes(mac), ifindex)
        if old is None or old[1] != ifindex or old[0] == bytes(mac):
            return
        self.remac(ip, old[0], bytes(mac), ifindex)

    def remac(self, ip, old: bytes, new: bytes, ifindex: int) -> None:
        """Move the connections on `old` to `new` (Maps.conn_remac) in a worker thread, one walk at a time: a next
        hop that flaps between two MACs (a server answering ARP from two NICs) would otherwise start a walk of
        the whole table per flap, piling up behind each other. Requests made meanwhile wait, one per old MAC and
        interface (a later one for the same old MAC replaces its target), so they are bounded by the next hops."""
        from hdslb.slowpath import packets as P

        def done(n):
            self.sp.counters["conn_remac"] += n
            log.warning("slow path: next hop %s moved from %s to %s: %d connection entries follow it", ip,
                        P.mac_str(old), P.mac_str(new), n)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not inside the daemon's loop (tests, tools): do it here
            done(self.d.maps.conn_remac(old, new, ifindex))
            return
        if self._remac_busy:
            self._remac_waiting[(old, ifindex)] = (ip, new)
            return
        self._remac_busy = True
        fut = loop.run_in_executor(None, self.d.maps.conn_remac, old, new, ifindex)

        def finished(f):
            self._remac_busy = False
            if not f.cancelled():
                if f.exception() is not None:
                    log.error("slow path: moving connections of %s to its new MAC failed: %s", ip, f.exception())
                else:
                    done(f.result())
            if self._remac_waiting:
                (o, i), (nip, n) = next(iter(self._remac_waiting.items()))
                del self._remac_waiting[(o, i)]
                self.remac(nip, o, n, i)

        fut.add_done_callback(finished)

    def retry_dirty(self, limit: int = RETRY_PER_TICK) -> int:
        """Retry up to limit pending map writes, oldest first; returns how many landed."""
        done = 0
        for op in list(self.dirty.values())[:limit]:
            done += self._write(op)
        return done

    def translate_icmp_error(self, err) -> tuple[str | None, bytes] | None:
        """An ICMP error about a packet of a balanced flow that we rewrote, rewritten as its other side must see it
        and framed for that side's interface (no interface: a frame to route, _translate_icmp_tunnel's); None when it
        quotes no such flow.

        From a real server, about a packet we sent it (LIP:lport -> RS:port): the error the client would have got
        without the balancer (from the VIP, quoting client:cport -> VIP:vport). From the client's side (a router
        on its path, the client itself), about a packet we sent the client (VIP:vport -> client:cport): the error
        the real server would have got (from the address it sends the flow to, LIP or the client, quoting
        RS:port -> that address), as LVS forwards it, so path-MTU discovery works for what servers send. DR and
        TUNNEL flows' replies do not cross the balancer: nothing of theirs is rewritten here.

        NAT (masquerade): the real server's error about a packet we forwarded to it (client:cport -> RS:port) is
        addressed to the client itself and only routed through us (err.to_local False); it is translated like the
        FullNAT one (from the VIP, quoting client:cport -> VIP:vport) when it quotes a NAT flow, and left
        otherwise. SNAT: an inside host's error about a reply we translated for it goes on to the outside server
        from the sapool address, quoting server:port -> sapool:port (netfilter NAT's related-ICMP handling); an
        outside router's error to the sapool address about what an inside host sent goes on to that host from the
        router, as netfilter and DPVS's SNAT (which rewrite only its destination) deliver it. NAT64: the error
        changes family on the way (_translate_icmp_xlat)."""
        import struct

        from hdslb.slowpath import packets as P

        if err.inner_sport is None:
            return None
        if err.tunnel is not None:
            return self._translate_icmp_tunnel(err)
        # The entry keyed by the quoted packet's reverse: for a packet to a real server (RS:port -> LIP:lport),
        # the flow's reply entry; for a packet to a client (client:cport -> VIP:vport), its inbound entry.
        back = self.d.maps.conn_get(err.inner_proto, err.inner_dst, err.inner_dport, err.inner_src, err.inner_sport)
        if back is None or back.get("need_l2"):
            return None  # (an unresolved next hop: no MAC to send to)
        if back["to_saddr"].version != err.af:
            return self._translate_icmp_xlat(err, back)
        if err.af == 6:
            return self._translate_icmp6_error(err, back)
        fwd = back.get("fwd")
        if not back["out"] and fwd not in ("fnat", "nat", "snat"):
            return None
        # Not to us, only routed through: a NAT flow's error to its client (from its real server), or a SNAT
        # inside host's error to the outside server about a reply we translated for it (the quote's reverse is the
        # flow's forward entry: it leaves from the sapool address, quoting server:port -> sapool:port). A SNAT
        # forward entry is never a to-us error's: what reaches our sapool address quotes the reply side.
        snat_fwd = not back["out"] and fwd == "snat"
        if err.to_local and snat_fwd or not err.to_local and not (snat_fwd or back["out"] and fwd == "nat"):
            return None
        # Either way the entry's rewrite says where the error goes: from to_saddr (the VIP; LIP or, NAT, the
        # client) to to_daddr (the client; the real server), quoting what to_daddr sent: to_daddr:to_dport ->
        # to_saddr:to_sport.
        esrc, esport, edst, edport = back["to_saddr"], back["to_sport"], back["to_daddr"], back["to_dport"]
        q = bytearray(err.quoted)
        ihl = (q[0] & 0x0F) * 4
        q[12:16], q[16:20] = edst.packed, esrc.packed
        q[10:12] = b"\0\0"
        q[10:12] = struct.pack("!H", P.checksum(bytes(q[:ihl])))
        if err.inner_proto == P.IPPROTO_ICMP:
            # a SNAT'd ping: its echo id is the port on the side the fast path keys it (a request's source), and
            # the quoted echo checksum follows it (RFC 1624), so the host's ping matches the quote to its socket
            old_id, cks = struct.unpack_from("!H", q, ihl + 4)[0], struct.unpack_from("!H", q, ihl + 2)[0]
            new_id = edport if q[ihl] == P.ICMP_ECHO else esport
            s = (~cks & 0xFFFF) + (~old_id & 0xFFFF) + new_id
            s = (s & 0xFFFF) + (s >> 16)
            q[ihl + 2:ihl + 6] = struct.pack("!HH", ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF, new_id)
        else:
            q[ihl:ihl + 4] = struct.pack("!HH", edport, esport)
        if err.inner_proto == 17 and len(q) >= ihl + 8:
            q[ihl + 6:ihl + 8] = b"\0\0"  # the quoted UDP checksum no longer matches; 0 means "none"
        icmp = bytearray(struct.pack("!BBHHH", err.type, err.code, 0, 0, err.mtu or 0)) + q
        icmp[2:4] = struct.pack("!H", P.checksum(bytes(icmp)))
        # A SNAT reply entry's error came from the outside (the server, or a router on the way: traceroute from
        # inside hosts names each hop): it keeps its sender, only its destination and quote are translated.
        sender = err.src if back["out"] and fwd == "snat" and err.src is not None else esrc
        ip = P.ipv4_header(sender, edst, 1, len(icmp), ttl=self.sp.ttl)
        ifname = next((i.name for i in self.d.bal.ifaces.values() if i.ifindex == back["ifindex"]), None)
        if ifname is None:
            return None
        return ifname, P.retag(back["dmac"] + back["smac"] + b"\x08\x00" + ip + bytes(icmp), err.tags)

    def _translate_icmp_tunnel(self, err) -> tuple[None, bytes] | None:
        """TUNNEL: a router between us and a real server cannot forward an IPIP (or 6in6) packet we sent (a smaller
        MTU, a TTL run out) and tells the outer source, quoting the client's packet inside it. As LVS (ip_vs_in_icmp's
        IPIP case) the client gets the error from the VIP quoting its own packet, "fragmentation needed" with the
        MTU less the outer header (only when the client set DF, as LVS), so path-MTU discovery works past the
        balancer; without it the client's large packets were lost for good. The client's MAC is nowhere in a
        TUNNEL flow (one entry, toward the server): the frame goes out with none, routed and resolved as a
        rewritten packet with an unresolved next hop is (returned with ifname None)."""
        import struct

        from hdslb.slowpath import packets as P

        if not err.to_local:
            return None
        fwd = self.d.maps.conn_get(err.inner_proto, err.inner_src, err.inner_sport, err.inner_dst, err.inner_dport)
        if fwd is None or fwd.get("fwd") != "tunnel" or fwd["out"] or fwd["to_daddr"] != err.tunnel:
            return None
        info = 0
        if err.af == 6:  # Packet Too Big: the outer header's 40 bytes less, never under the minimum MTU
            if err.mtu is not None:
                info = max(err.mtu - P.IPV6_HLEN, P.IPV6_MIN_MTU)
            icmp = bytearray(struct.pack("!BBHI", err.type, err.code, 0, info)) + err.quoted
            icmp[2:4] = struct.pack("!H", P.icmp6_checksum(err.inner_dst, err.inner_src, bytes(icmp)))
            l3 = P.ipv6_header(err.inner_dst, err.inner_src, P.IPPROTO_ICMPV6, len(icmp), hlim=self.sp.ttl)
            return None, bytes(12) + b"\x86\xdd" + l3 + bytes(icmp)
        if err.mtu is not None:
            if not struct.unpack_from("!H", err.quoted, 6)[0] & 0x4000:
                return None  # the client does no path-MTU discovery: nothing it can act on
            info = err.mtu - P.IPV4_HLEN if err.mtu > 68 + P.IPV4_HLEN else err.mtu
        icmp = bytearray(struct.pack("!BBHHH", err.type, err.code, 0, 0, info)) + err.quoted
        icmp[2:4] = struct.pack("!H", P.checksum(bytes(icmp)))
        ip = P.ipv4_header(err.inner_dst, err.inner_src, P.IPPROTO_ICMP, len(icmp), ttl=self.sp.ttl)
        return None, bytes(12) + b"\x08\x00" + ip + bytes(icmp)

    def _translate_icmp6_error(self, err, back: dict) -> tuple[str, bytes] | None:
        """translate_icmp_error for IPv6 (FullNAT v6): Packet Too Big, destination unreachable or time exceeded
        about a packet we rewrote, sent on as the other side must see it. IPv6 routers never fragment, so without
        this a smaller MTU between the balancer and the servers (or the clients) was a path-MTU black hole for
        every v6 flow, where IPv4 was translated. The quoted header and ports are rewritten; the quoted L4
        checksum is left (nobody checks a quote's). A NAT real server's error to its client (routed through us,
        punted because it quotes a NAT flow) goes to the client from the VIP, as IPv4's does."""
        import struct

        from hdslb.slowpath import packets as P

        if not back["out"] and back.get("fwd") not in ("fnat", "nat"):
            return None
        if not err.to_local and not (back["out"] and back.get("fwd") == "nat"):
            return None  # not to us: only a NAT flow's error to its client is ours to translate
        esrc, esport, edst, edport = back["to_saddr"], back["to_sport"], back["to_daddr"], back["to_dport"]
        q = bytearray(err.quoted)
        q[8:24], q[24:40] = edst.packed, esrc.packed
        q[P.IPV6_HLEN:P.IPV6_HLEN + 4] = struct.pack("!HH", edport, esport)
        icmp = bytearray(struct.pack("!BBHI", err.type, err.code, 0, err.mtu or 0)) + q
        icmp[2:4] = struct.pack("!H", P.icmp6_checksum(esrc, edst, bytes(icmp)))
        ip6 = P.ipv6_header(esrc, edst, P.IPPROTO_ICMPV6, len(icmp), hlim=self.sp.ttl)
        ifname = next((i.name for i in self.d.bal.ifaces.values() if i.ifindex == back["ifindex"]), None)
        if ifname is None:
            return None
        return ifname, P.retag(back["dmac"] + back["smac"] + b"\x86\xdd" + ip6 + bytes(icmp), err.tags)

    def _translate_icmp_xlat(self, err, back: dict) -> tuple[str, bytes] | None:
        """translate_icmp_error for NAT64, whose two sides are of two families (RFC 7915 4.2, 5.2): a real server's
        (or a router's on its side) ICMPv4 error to the local address goes to the IPv6 client from the VIP as the
        ICMPv6 error it stands for (fragmentation needed: Packet Too Big with the MTU + 20), and a Packet Too Big,
        unreachable or time exceeded from the client's side about a reply we translated goes to the real server
        from the local address as ICMPv4 (MTU - 20), quoting what each was sent as it sent it. Without it a
        smaller MTU on either side of a NAT64 service was a path-MTU black hole (the error reached the slow path,
        to an address of ours, and was dropped there)."""
        import struct

        from hdslb.slowpath import packets as P

        if not err.to_local or back.get("fwd") != "fnat" or back["to_daddr"].version == err.af:
            return None  # NAT64 is FullNAT; nothing routed through us is ours to translate across families
        esrc, esport, edst, edport = back["to_saddr"], back["to_sport"], back["to_daddr"], back["to_dport"]
        if err.af == 4:
            kind = P.icmp4_to_icmp6(err.type, err.code, err.mtu, struct.unpack_from("!H", err.quoted, 2)[0])
            if kind is None:
                return None
            q = P.quote_4to6(err.quoted, edst, esrc, edport, esport)
            icmp = bytearray(struct.pack("!BBHI", kind[0], kind[1], 0, kind[2]) + q)
            icmp[2:4] = struct.pack("!H", P.icmp6_checksum(esrc, edst, bytes(icmp)))
            l3 = P.ipv6_header(esrc, edst, P.IPPROTO_ICMPV6, len(icmp), hlim=self.sp.ttl)
            ethertype = b"\x86\xdd"
        else:
            kind = P.icmp6_to_icmp4(err.type, err.code, err.mtu)
            if kind is None:
                return None
            q = P.quote_6to4(err.quoted, edst, esrc, edport, esport)
            icmp = bytearray(struct.pack("!BBHI", kind[0], kind[1], 0, kind[2]) + q)
            icmp[2:4] = struct.pack("!H", P.checksum(bytes(icmp)))
            l3 = P.ipv4_header(esrc, edst, P.IPPROTO_ICMP, len(icmp), ttl=self.sp.ttl)
            ethertype = b"\x08\x00"
        ifname = next((i.name for i in self.d.bal.ifaces.values() if i.ifindex == back["ifindex"]), None)
        if ifname is None:
            return None
        return ifname, P.retag(back["dmac"] + back["smac"] + ethertype + l3 + bytes(icmp), err.tags)

    def kick(self) -> None:
        self._kick.set()

    def announce(self, ip, ifname: str) -> None:
        self.carry_out(self.sp.announce(ip, ifname))

    async def _ticker(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), timeout=TICK_S)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            try:
                self.carry_out(self.sp.tick())
                if len(self.macs) > len(self.neigh.wanted) + 64:  # next hops no longer wanted: forgotten
                    wanted = self.neigh.wanted
                    self.macs = {a: m for a, m in self.macs.items() if a in wanted}
                if self.dirty:
                    self.retry_dirty()
            except Exception:
                log.exception("slow path tick failed")

    def stats(self) -> dict:
        n = self.neigh
        out = {"counters": dict(self.sp.counters, icmp_error_translated=self.translated), "sockets": {},
               "neigh": {"entries": len(n), "learned": n.learned, "gc_thresh2": n.gc_thresh2,
                         "gc_thresh3": n.gc_thresh3, "unres_bytes": n.unres_bytes, "unres_qbytes": n.unres_qbytes,
                         "write_pending": len(self.dirty)}}
        for (ifname, q), sock in self.socks.items():
            st = sock.stats()
            out["sockets"][f"{ifname}/{q}"] = {k: st[k] for k in SOCKET_COUNTERS if k in st}
        return out
