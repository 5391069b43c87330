"""Typed writers and readers for the fast path's maps; bcc derives the ctypes, this module fills them."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket
import time

from hdslb.fastpath import abi

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


def _af(ip: IPAddr) -> int:
    return 4 if ip.version == 4 else 6


def _put_addr(field, ip: IPAddr | None) -> None:
    raw = b"" if ip is None else ip.packed
    ct.memmove(ct.addressof(field), raw.ljust(16, b"\0"), 16)


def _get_addr(field, af: int) -> IPAddr:
    raw = ct.string_at(ct.addressof(field), 16)
    return ipaddress.IPv4Address(raw[:4]) if af == 4 else ipaddress.IPv6Address(raw)


def _put_mac(field, mac: bytes) -> None:
    ct.memmove(ct.addressof(field), bytes(mac), 6)


def _mac_str(field) -> str:
    return ":".join(f"{b:02x}" for b in ct.string_at(ct.addressof(field), 6))


STAT_FIELDS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")


class Maps:
    """All map access of the daemon goes through here; one instance per loaded FastPath."""

    def __init__(self, fastpath):
        self.fp = fastpath
        self.t = {n: fastpath.table(n.encode()) for n in (
            "svc_map", "sched_map", "sched_cursor", "dest_map", "laddr_map", "local_map", "iface_map",
            "route4_map", "route6_map", "neigh_map", "conn_map", "svc_stats", "dest_stats", "counters",
            "cfg_map", "if_stats")}
        self.counter_names = abi.counter_names()

    # --- configuration writes -------------------------------------------------------------------
    CFG_F_KNI_ROUTES = 0x1

    def set_cfg(self, lport_min: int | None = None, lport_max: int | None = None, kni_routes: bool | None = None) -> None:
        """Change the runtime settings given; the others keep their value."""
        t = self.t["cfg_map"]
        v = t[ct.c_uint32(0)]
        if lport_min is not None:
            v.lport_min, v.lport_max = lport_min, lport_max
        if kni_routes is not None:
            v.flags = (v.flags | self.CFG_F_KNI_ROUTES) if kni_routes else (v.flags & ~self.CFG_F_KNI_ROUTES)
        t[ct.c_uint32(0)] = v

    def set_iface(self, ifindex: int, mac: bytes, mtu: int, xsk_slot: int = 0) -> None:
        t = self.t["iface_map"]
        v = t.Leaf()
        _put_mac(v.mac, mac)
        v.mtu = mtu
        v.xsk_slot = xsk_slot
        t[ct.c_uint32(ifindex)] = v

    def del_iface(self, ifindex: int) -> None:
        self._delete("iface_map", ct.c_uint32(ifindex))

    def _svc_key(self, proto: int, addr: IPAddr, port: int):
        k = self.t["svc_map"].Key()
        _put_addr(k.addr, addr)
        k.port = socket.htons(port)
        k.proto = proto
        k.af = _af(addr)
        return k

    def set_service(self, proto: int, addr: IPAddr, port: int, svc_id: int) -> None:
        t = self.t["svc_map"]
        v = t.Leaf()
        v.svc_id = svc_id
        v.flags = abi.SVC_F_VALID
        t[self._svc_key(proto, addr, port)] = v

    def del_service(self, proto: int, addr: IPAddr, port: int, svc_id: int) -> None:
        self._delete("svc_map", self._svc_key(proto, addr, port))
        self._delete("sched_map", ct.c_uint32(svc_id))
        self._delete("laddr_map", ct.c_uint32(svc_id))
        self.zero_svc_stats(svc_id)

    def set_sched(self, svc_id: int, slots: list[int], gen: int) -> None:
        """Replace a service's ring in one map update (readers see the old or the new table, never a mix)."""
        if len(slots) > abi.SCHED_RING_MAX:
            raise ValueError(f"ring of {len(slots)} exceeds {abi.SCHED_RING_MAX}")
        t = self.t["sched_map"]
        v = t.Leaf()
        v.len = len(slots)
        v.gen = gen & 0xFFFFFFFF
        for i, s in enumerate(slots):
            v.slot[i] = s
        t[ct.c_uint32(svc_id)] = v

    def set_dest(self, slot: int, addr: IPAddr, port: int, fwd: str, svc_id: int, drain: bool) -> None:
        t = self.t["dest_map"]
        v = t.Leaf()
        _put_addr(v.addr, addr)
        v.port = socket.htons(port)
        v.af = _af(addr)
        v.fwd = abi.FWD[fwd]
        v.svc_id = svc_id
        v.flags = abi.DEST_F_VALID | (abi.DEST_F_DRAIN if drain else 0)
        t[ct.c_uint32(slot)] = v

    def clear_dest(self, slot: int) -> None:
        t = self.t["dest_map"]
        t[ct.c_uint32(slot)] = t.Leaf()
        self.zero_dest_stats(slot)

    def set_laddrs(self, svc_id: int, laddrs: list[tuple[IPAddr, int]]) -> None:
        t = self.t["laddr_map"]
        v = t.Leaf()
        v.n = len(laddrs)
        for i, (ip, ifindex) in enumerate(laddrs):
            _put_addr(v.a[i].addr, ip)
            v.a[i].ifindex = ifindex
            v.a[i].af = _af(ip)
            v.a[i].af = _af(ip)
        t[ct.c_uint32(svc_id)] = v

    def _local_key(self, ip: IPAddr):
        k = self.t["local_map"].Key()
        _put_addr(k.addr, ip)
        k.af = _af(ip)
        return k

    def set_local(self, ip: IPAddr, flags: int, ifindex: int) -> None:
        t = self.t["local_map"]
        v = t.Leaf()
        v.flags, v.ifindex = flags, ifindex
        t[self._local_key(ip)] = v

    def del_local(self, ip: IPAddr) -> None:
        self._delete("local_map", self._local_key(ip))

    def _route_key(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network):
        t = self.t["route4_map" if net.version == 4 else "route6_map"]
        k = t.Key()
        k.prefixlen = net.prefixlen
        ct.memmove(ct.addressof(k) + 4, net.network_address.packed, len(net.network_address.packed))
        return t, k

    def set_route(self, net, ifindex: int, gw: IPAddr | None, src: IPAddr | None, mtu: int, kni: bool) -> None:
        t, k = self._route_key(net)
        v = t.Leaf()
        _put_addr(v.gw, gw)
        _put_addr(v.src, src)
        v.ifindex, v.mtu = ifindex, mtu
        v.flags = (abi.ROUTE_F_GW if gw is not None else 0) | (abi.ROUTE_F_KNI if kni else 0)
        t[k] = v

    def del_route(self, net) -> None:
        t, k = self._route_key(net)
        try:
            del t[k]
        except KeyError:
            pass

    def _neigh_key(self, ip: IPAddr):
        k = self.t["neigh_map"].Key()
        _put_addr(k.addr, ip)
        k.af = _af(ip)
        return k

    def set_neigh(self, ip: IPAddr, mac: bytes, ifindex: int, permanent: bool) -> None:
        t = self.t["neigh_map"]
        v = t.Leaf()
        _put_mac(v.mac, mac)
        v.ifindex = ifindex
        v.flags = abi.NEIGH_F_PERMANENT if permanent else abi.NEIGH_F_LEARNED
        v.updated = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # same clock as bpf_ktime_get_coarse_ns
        t[self._neigh_key(ip)] = v

    def del_neigh(self, ip: IPAddr) -> None:
        self._delete("neigh_map", self._neigh_key(ip))

    def neighs(self) -> list[dict]:
        out = []
        for k, v in self.t["neigh_map"].items():
            out.append({"addr": _get_addr(k.addr, k.af), "lladdr": _mac_str(v.mac), "ifindex": v.ifindex,
                        "permanent": bool(v.flags & abi.NEIGH_F_PERMANENT), "updated_ns": v.updated})
        return out

    def _delete(self, name: str, key) -> None:
        try:
            del self.t[name][key]
        except KeyError:
            pass

    # --- reads ----------------------------------------------------------------------------------
    def _sum_stats(self, name: str, idx: int) -> dict:
        per_cpu = self.t[name][ct.c_uint32(idx)]
        return {f: sum(getattr(c, f) for c in per_cpu) for f in STAT_FIELDS}

    def svc_stats(self, svc_id: int) -> dict:
        return self._sum_stats("svc_stats", svc_id)

    def dest_stats(self, slot: int) -> dict:
        return self._sum_stats("dest_stats", slot)

    def all_stats(self, name: str) -> dict[int, dict]:
        """Every non-zero entry of svc_stats/dest_stats, summed over CPUs, in one batched read (the estimator
        would otherwise pay one syscall per service and per real server every interval)."""
        out = {}
        for k, per_cpu in self.t[name].items_lookup_batch():
            total = {f: sum(getattr(c, f) for c in per_cpu) for f in STAT_FIELDS}
            if any(total.values()):
                out[getattr(k, "value", k)] = total
        return out

    def _zero(self, name: str, idx: int) -> None:
        t = self.t[name]
        t[ct.c_uint32(idx)] = t.Leaf()

    def zero_svc_stats(self, svc_id: int) -> None:
        self._zero("svc_stats", svc_id)

    def zero_dest_stats(self, slot: int) -> None:
        self._zero("dest_stats", slot)

    IF_FIELDS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "pass", "drops")

    def if_stats(self, ifindex: int) -> dict:
        """Fast-path counters of frames received on ifindex: totals, and per CPU under "per_cpu"."""
        per_cpu = self.t["if_stats"][ct.c_uint32(ifindex & 1023)]
        out = {f: int(sum(getattr(c, f) for c in per_cpu)) for f in self.IF_FIELDS}
        out["per_cpu"] = [{f: int(getattr(c, f)) for f in self.IF_FIELDS} for c in per_cpu]
        return out

    def counters(self) -> dict[str, int]:
        t = self.t["counters"]
        return {name: int(sum(t[ct.c_uint32(i)])) for i, name in enumerate(self.counter_names)}

    def per_cpu_counters(self) -> dict[str, list[int]]:
        t = self.t["counters"]
        return {name: [int(x) for x in t[ct.c_uint32(i)]] for i, name in enumerate(self.counter_names)}

    def add_counter(self, name: str, n: int) -> None:
        """Counters the daemon owns (e.g. conn_expired) live beside the program's so they survive restarts."""
        t = self.t["counters"]
        k = ct.c_uint32(self.counter_names.index(name))
        v = t[k]
        v[0] += n
        t[k] = v

    def _conn_key(self, c: dict):
        k = self.t["conn_map"].Key()
        _put_addr(k.saddr, c["saddr"])
        _put_addr(k.daddr, c["daddr"])
        k.sport, k.dport = socket.htons(c["sport"]), socket.htons(c["dport"])
        k.proto, k.af = c["proto"], c["af"]
        return k

    def conn_last_seen(self, c: dict) -> int | None:
        """Latest last_seen over the CPU copies of one direction, or None once it is gone."""
        try:
            per_cpu = self.t["conn_map"][self._conn_key(c)]
        except KeyError:
            return None
        return max((v.last_seen for v in per_cpu if v.flags & abi.CONN_F_VALID), default=None)

    def conn_get(self, proto: int, saddr, sport: int, daddr, dport: int) -> dict | None:
        """One direction of a flow by its tuple, merged over CPU copies like conns(); None if absent."""
        c = {"proto": proto, "af": saddr.version if hasattr(saddr, "version") else 4, "saddr": saddr,
             "sport": sport, "daddr": daddr, "dport": dport}
        try:
            per_cpu = self.t["conn_map"][self._conn_key(c)]
        except KeyError:
            return None
        best = max((v for v in per_cpu if v.flags & abi.CONN_F_VALID), key=lambda v: v.last_seen, default=None)
        if best is None:
            return None
        return dict(c, to_saddr=_get_addr(best.saddr, c["af"]), to_sport=socket.ntohs(best.sport),
                    to_daddr=_get_addr(best.daddr, c["af"]), to_dport=socket.ntohs(best.dport),
                    ifindex=best.ifindex, dmac=ct.string_at(ct.addressof(best.dmac), 6),
                    smac=ct.string_at(ct.addressof(best.smac), 6), out=bool(best.flags & abi.CONN_F_OUT))

    def del_conn(self, c: dict) -> bool:
        try:
            del self.t["conn_map"][self._conn_key(c)]
            return True
        except KeyError:
            return False

    def conn_entries(self) -> int:
        return sum(1 for _ in self.t["conn_map"].keys())

    def conns(self):
        """Yield one dict per connection direction, merging the per-CPU copies (latest last_seen wins)."""
        for k, per_cpu in self.t["conn_map"].items():
            best, cpu = None, -1
            for i, v in enumerate(per_cpu):
                if v.flags & abi.CONN_F_VALID and (best is None or v.last_seen > best.last_seen):
                    best, cpu = v, i
            if best is None:
                continue
            yield {
                "proto": k.proto, "af": k.af,
                "saddr": _get_addr(k.saddr, k.af), "sport": socket.ntohs(k.sport),
                "daddr": _get_addr(k.daddr, k.af), "dport": socket.ntohs(k.dport),
                "to_saddr": _get_addr(best.saddr, k.af), "to_sport": socket.ntohs(best.sport),
                "to_daddr": _get_addr(best.daddr, k.af), "to_dport": socket.ntohs(best.dport),
                "out": bool(best.flags & abi.CONN_F_OUT), "state": best.state, "svc_id": best.svc_id,
                "dest_slot": best.dest_slot, "last_seen_ns": best.last_seen, "cpu": cpu,
            }
