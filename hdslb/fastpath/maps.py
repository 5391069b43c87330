"""Typed writers and readers for the fast path's maps; bcc derives the ctypes, this module fills them."""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import os
import socket
import struct
import time

from hdslb.fastpath.clock import JiffiesClock
from hdslb.fastpath import abi, aging
from hdslb.fastpath.loader import FastPath

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


def _bpf_update_elem(fd, key, value, flags) -> int:
    """bcc's bpf_update_elem, bound on first use (bcc is imported only where maps are)."""
    global _bpf_update_elem
    from bcc.libbcc import lib

    _bpf_update_elem = lib.bpf_update_elem
    return _bpf_update_elem(fd, key, value, flags)


def _af(ip: IPAddr) -> int:
    return 4 if ip.version == 4 else 6


def _put_addr(field, ip: IPAddr | None) -> None:
    """An address into a 16-byte union hdslb_addr, or a 4-byte union hdslb_addr4 (conn4_map, IPv4 only)."""
    raw, n = b"" if ip is None else ip.packed, ct.sizeof(field)
    if len(raw) > n:
        raise ValueError(f"{ip} does not fit a {n}-byte address field")
    ct.memmove(ct.addressof(field), raw.ljust(n, b"\0"), n)


def _get_addr(field, af: int) -> IPAddr:
    raw = ct.string_at(ct.addressof(field), ct.sizeof(field))
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
        self.clock = JiffiesClock()  # conn_val.last_seen is bpf_jiffies64()
        self.t = {n: fastpath.table(n.encode()) for n in (
            "svc_map", "sched_map", "sched_cursor", "dest_map", "laddr_map", "local_map", "iface_map",
            "route4_map", "route6_map", "neigh_map", "conn4_map", "conn6_map", "svc_stats", "dest_stats", "counters",
            "cfg_map", "if_stats", "lport_cursor")}
        if ct.sizeof(self.t["dest_map"].Leaf) != self._DEST_VAL.size:  # set_dest packs it by hand
            raise RuntimeError(f"struct dest_val is {ct.sizeof(self.t['dest_map'].Leaf)} bytes in the program, "
                               f"{self._DEST_VAL.size} in Maps._DEST_VAL: update the packer with the header")
        # Maps of the forwarding modes beyond FNAT; looked up by name so a program without them still loads
        # (a write that needs one then says which map is missing).
        for n in ("hash_cells", "persist_map", "snat_map", "conn_single"):
            try:
                self.t[n] = fastpath.table(n.encode())
            except KeyError:
                pass
        # --conn-table shared: one value an entry, not one per CPU (bcc's Leaf is then the struct, not an array)
        self.conn_shared = not hasattr(self.t["conn4_map"].Leaf(), "__len__")
        self.counter_names = abi.counter_names()
        self.batch_cells = True  # BPF_MAP_UPDATE_BATCH for hash_cells; off after the first refusal
        # What the last count of the conn tables (conn_entries_by_family, or the sweep's read) found: the entries
        # per family, and at least how many entries the tables' LRU had evicted by then (see _evicted_bound)
        self.last_count: dict[int, int] | None = None
        self.evicted_bound: int | None = None

    def _table(self, name: str):
        t = self.t.get(name)
        if t is None:
            raise RuntimeError(f"the loaded XDP program has no {name} map (an older bpf/hdslb_xdp.c?)")
        return t

    # --- configuration writes -------------------------------------------------------------------
    CFG_F_KNI_ROUTES = abi.defines()["CFG_F_KNI_ROUTES"]  # read from bpf/include/hdslb_abi.h, as the counters

    def set_cfg(self, lport_min: int | None = None, lport_max: int | None = None, kni_routes: bool | None = None,
                snat_rules: int | None = None) -> None:
        """Change the runtime settings given; the others keep their value."""
        t = self.t["cfg_map"]
        v = t[ct.c_uint32(0)]
        if lport_min is not None:
            v.lport_min, v.lport_max = lport_min, lport_max
        if kni_routes is not None:
            v.flags = (v.flags | self.CFG_F_KNI_ROUTES) if kni_routes else (v.flags & ~self.CFG_F_KNI_ROUTES)
        if snat_rules is not None:
            v.snat_rules = snat_rules
        t[ct.c_uint32(0)] = v

    def seed_lport_cursor(self, values: list | None = None) -> None:
        """Start each CPU's local-port cursor at a random place (or at values, per CPU). A daemon that starts
        with an empty conn table (first start, --fresh) would otherwise hand out the same ports as the last
        one did, right into the real servers' TIME_WAIT for them (60 s), where a new SYN is refused unless its
        sequence number happens to be newer: the client retries a second later."""
        import random

        t = self.t["lport_cursor"]
        n = len(t.Leaf())
        rng = random.SystemRandom()
        # Written raw: the kernel lays a per-CPU u32 out in 8-byte slots, and bcc's 4-byte leaf array fills only
        # the first CPU's slot.
        raw = (ct.c_uint64 * n)(*[values[i] if values is not None else rng.randrange(1 << 32) for i in range(n)])
        key = ct.c_uint32(0)
        if _bpf_update_elem(t.map_fd, ct.byref(key), ct.byref(raw), 0) < 0:
            err = ct.get_errno()
            raise OSError(err, f"cannot seed the local-port cursor: {os.strerror(err)}")

    CFG_F_RECLAIM = abi.defines()["CFG_F_RECLAIM"]

    def set_idle_timeouts(self, timeouts: dict | None) -> None:
        """Give the fast path the aging timeouts (seconds, by state name as the daemon keeps them: syn_recv,
        established, fin_wait, close, udp) so it can take back the local port of a flow idle past its timeout
        before the sweep removes it. None turns reclaiming off."""
        t = self.t["cfg_map"]
        v = t[ct.c_uint32(0)]
        if timeouts is None:
            v.flags &= ~self.CFG_F_RECLAIM
        else:
            secs = abi.state_timeouts(timeouts)
            if len(secs) > len(v.idle_tmo):
                raise RuntimeError(f"conn_state has {len(secs)} states, fp_cfg.idle_tmo {len(v.idle_tmo)}")
            secs += [timeouts["close"]] * (len(v.idle_tmo) - len(secs))  # slots past the last state: masked reads
            for i, sec in enumerate(secs):
                v.idle_tmo[i] = min(self.clock.seconds_to_jiffies(sec), 0xFFFFFFFF)
            v.flags |= self.CFG_F_RECLAIM
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

    def set_service(self, proto: int, addr: IPAddr, port: int, svc_id: int, persist_timeout: int = 0,
                    persist_plen: int = 0) -> None:
        """persist_timeout > 0 makes the service persistent (-p), clients grouped by persist_plen (-M)."""
        t = self.t["svc_map"]
        v = t.Leaf()
        v.svc_id = svc_id
        v.flags = abi.SVC_F_VALID | (abi.SVC_F_PERSIST if persist_timeout else 0)
        v.persist_timeout = persist_timeout
        v.persist_plen = persist_plen
        if addr.version == 6:
            self.set_nat64()
        t[self._svc_key(proto, addr, port)] = v

    CFG_F_NAT64 = abi.defines()["CFG_F_NAT64"]

    def set_nat64(self) -> None:
        """Tell the fast path an IPv6 service exists, before its first flow: a NAT64 flow's IPv4 replies are then
        looked for in conn6_map, and IPv4 local ports are checked against both tables. Never cleared (a flow may
        outlive its service; the cost is one more lookup for IPv4 packets of no connection)."""
        t = self.t["cfg_map"]
        v = t[ct.c_uint32(0)]
        if not v.flags & self.CFG_F_NAT64:
            v.flags |= self.CFG_F_NAT64
            t[ct.c_uint32(0)] = v

    def del_service(self, proto: int | None, addr: IPAddr | None, port: int | None, svc_id: int) -> None:
        """proto None: a SNAT service, which has no svc_map entry (its snat_map rule is removed first)."""
        if proto is not None:
            self._delete("svc_map", self._svc_key(proto, addr, port))
        self._delete("sched_map", ct.c_uint32(svc_id))
        self._delete("laddr_map", ct.c_uint32(svc_id))
        self.zero_svc_stats(svc_id)

    def prune_services(self, keep_keys: set, keep_ids: set, keep_slots: set) -> dict:
        """Remove what services and real servers the model does not have: svc_map entries whose key (raw bytes)
        is not in keep_keys, sched_map/laddr_map entries of other service ids, filled dest_map slots not in
        keep_slots. After a restart from a saved model that missed the last changes before a crash, the maps
        then say what the model says. Connections already made keep their rewrite and keep flowing."""
        out = {"services": 0, "tables": 0, "dests": 0}
        t = self.t["svc_map"]
        for k in list(t.keys()):
            if bytes(k) not in keep_keys:
                self._delete("svc_map", k)
                out["services"] += 1
        for name in ("sched_map", "laddr_map"):
            t = self.t[name]
            for k in list(t.keys()):
                if k.value not in keep_ids:
                    self._delete(name, k)
                    out["tables"] += name == "sched_map"
        t = self.t["dest_map"]
        for batch in self._batches("dest_map"):
            if batch is None:
                items = [(k.value, v) for k, v in t.items()]
            else:
                keys, vals, n = batch
                items = [(keys[i], vals[i]) for i in range(n) if vals[i].flags & abi.DEST_F_VALID]
            stale = [slot for slot, v in items if v.flags & abi.DEST_F_VALID and slot not in keep_slots]
            for slot in stale:
                self.clear_dest(slot)
            out["dests"] += len(stale)
        return out

    def prune_addresses(self, keep_local: set, keep_nets: set) -> dict:
        """The same for what addresses and routes the model does not have: local_map entries (addresses the fast
        path owns: interface addresses, VIPs, local addresses) not in keep_local, and LPM route entries of
        prefixes not in keep_nets. Neighbours are not pruned: the table also holds what was learned."""
        out = {"addresses": 0, "routes": 0}
        keep = {bytes(self._local_key(a)) for a in keep_local}
        t = self.t["local_map"]
        for k in list(t.keys()):
            if bytes(k) not in keep:
                self._delete("local_map", k)
                out["addresses"] += 1
        keep = {bytes(self._route_key(n)[1]) for n in keep_nets}
        for name in ("route4_map", "route6_map"):
            t = self.t[name]
            for k in list(t.keys()):
                if bytes(k) not in keep:
                    self._delete(name, k)
                    out["routes"] += 1
        return out

    def svc_key_bytes(self, proto: int, addr: IPAddr, port: int) -> bytes:
        return bytes(self._svc_key(proto, addr, port))

    def set_sched(self, svc_id: int, slots: list[int], gen: int, kind: int = abi.SCHED_RING, key: int = 0,
                  seed: int = 0, hoff: int = 0, hlen: int | None = None, spread: bool = False) -> None:
        """Replace a service's table in one map update (readers see the old or the new table, never a mix).

        Rings carry their slots here; a hash table (kind SCHED_HASH) is only pointed at: hlen cells from hoff in
        hash_cells, which set_hash_cells wrote before this call. spread (Table.spread: rr, wrr): each CPU starts a
        new ring at cpu * len / ncpus instead of its first entry.
        """
        t = self.t["sched_map"]
        v = t.Leaf()
        v.gen = gen & 0xFFFFFFFF
        v.kind = kind
        v.flags = abi.SCHED_F_SPREAD if spread and kind == abi.SCHED_RING else 0
        if kind == abi.SCHED_HASH:
            v.len = len(slots) if hlen is None else hlen
            v.key, v.seed, v.hoff = key, seed & 0xFFFFFFFF, hoff
        else:
            if len(slots) > abi.SCHED_RING_MAX:
                raise ValueError(f"ring of {len(slots)} exceeds {abi.SCHED_RING_MAX}")
            v.len = len(slots)
            for i, s in enumerate(slots):
                v.slot[i] = s
        t[ct.c_uint32(svc_id)] = v

    def set_hash_cells(self, first: int, entries: list[int]) -> None:
        """Write a hash table's cells (dest slots) at [first, first + len): one BPF_MAP_UPDATE_BATCH call when the
        kernel takes it (a 65537-cell Maglev table in a few ms), else one update per cell."""
        t = self._table("hash_cells")
        n = len(entries)
        if n == 0:
            return
        if self.batch_cells:
            keys = (ct.c_uint32 * n)(*range(first, first + n))
            vals = (t.Leaf * n)(*entries)
            try:
                t.items_update_batch(keys, vals)
                return
            except Exception:  # kernels or map types without batch ops: fall back for good
                self.batch_cells = False
        for i, s in enumerate(entries):
            t[ct.c_uint32(first + i)] = t.Leaf(s)

    def hash_cells(self, first: int, n: int) -> list[int]:
        t = self._table("hash_cells")
        return [int(t[ct.c_uint32(first + i)].value) for i in range(n)]

    # --- SNAT rules -----------------------------------------------------------------------------
    def set_snat_rule(self, index: int, svc_id: int, proto: int, src: tuple | None, dst: tuple | None,
                      iif: int, oif: int) -> None:
        """Rule `index` of the ordered SNAT match list; ranges are (lo, hi) IPv4 addresses or None (any)."""
        t = self._table("snat_map")
        v = t.Leaf()
        v.svc_id, v.proto, v.flags = svc_id, proto, abi.SNAT_F_VALID
        v.src_min, v.src_max = (int(src[0]), int(src[1])) if src else (0, 0)
        v.dst_min, v.dst_max = (int(dst[0]), int(dst[1])) if dst else (0, 0)
        v.iif, v.oif = iif, oif
        t[ct.c_uint32(index)] = v

    def clear_snat_rule(self, index: int) -> None:
        t = self._table("snat_map")
        t[ct.c_uint32(index)] = t.Leaf()

    def snat_rules(self) -> list[dict]:
        t = self._table("snat_map")
        n = self.t["cfg_map"][ct.c_uint32(0)].snat_rules
        out = []
        for i in range(min(n, abi.SNAT_RULES_MAX)):
            v = t[ct.c_uint32(i)]
            out.append({"svc_id": v.svc_id, "proto": v.proto, "flags": v.flags,
                        "src": (v.src_min, v.src_max), "dst": (v.dst_min, v.dst_max), "iif": v.iif, "oif": v.oif})
        return out

    # --- persistence templates ------------------------------------------------------------------
    def _persist_items(self):
        t = self._table("persist_map")
        try:
            return list(t.items_lookup_batch())
        except Exception:  # no batch ops for this map type here
            return list(t.items())

    def persists(self) -> list[dict]:
        """Live templates: {svc_id, af, addr (client network), dest_slot, expires_ns}."""
        out = []
        for k, v in self._persist_items():
            out.append({"svc_id": k.svc_id, "af": k.af, "addr": _get_addr(k.addr, k.af),
                        "dest_slot": v.dest_slot, "expires_ns": v.expires})
        return out

    def renew_persists(self, temps: list[dict]) -> int:
        """Set the expiry of templates as persists() lists them (svc_id, af, addr, dest_slot, expires_ns), each
        only while it still leads to that server (the fast path may have replaced it); returns how many."""
        want = {(t["svc_id"], t["af"], t["addr"].packed.ljust(16, b"\0"), t["dest_slot"]): t["expires_ns"]
                for t in temps}
        tbl = self._table("persist_map")
        done = 0
        for k, v in self._persist_items():
            exp = want.get((k.svc_id, k.af, bytes(k.addr.b), v.dest_slot))
            if exp is not None:
                v.expires = exp
                # BPF_EXIST: a template deleted meanwhile (its server removed, -p changed) stays deleted
                done += _bpf_update_elem(tbl.map_fd, ct.byref(k), ct.byref(v), 2) == 0
        return done

    def del_persists(self, svc_id: int, slot: int | None = None) -> int:
        """Delete a service's templates (only those leading to `slot` when given); returns how many."""
        return self.del_persists_many({(svc_id, slot)})

    def del_persists_many(self, pairs) -> int:
        """del_persists for every (svc_id, slot or None) of pairs in one read of the map; returns how many."""
        pairs = set(pairs)
        whole = {svc_id for svc_id, slot in pairs if slot is None}
        if not pairs:
            return 0
        t = self._table("persist_map")
        gone = 0
        for k, v in self._persist_items():
            if k.svc_id in whole or (k.svc_id, v.dest_slot) in pairs:
                try:
                    del t[k]
                    gone += 1
                except KeyError:
                    pass
        return gone

    # struct dest_val, packed by hand: a bulk load writes 100k of them, and bcc's ctypes leaf and item write
    # cost ~11 us each (10 % of a REST load of 10k services); this is ~2 us. Checked against bcc's layout in tests.
    _DEST_VAL = struct.Struct("=16s2sBBII")

    def set_dest(self, slot: int, addr: IPAddr, port: int, fwd: str, svc_id: int, drain: bool,
                 no_persist: bool = False) -> None:
        """drain: no new flows from the scheduler; no_persist: templates naming it are not honoured either."""
        t = self.t["dest_map"]
        val = self._DEST_VAL.pack(addr.packed, port.to_bytes(2, "big"), _af(addr), abi.FWD[fwd], svc_id,
                                  abi.DEST_F_VALID | (abi.DEST_F_DRAIN if drain else 0) |
                                  (abi.DEST_F_NO_PERSIST if no_persist else 0))
        if _bpf_update_elem(t.map_fd, ct.byref(ct.c_uint32(slot)), val, 0) < 0:
            err = ct.get_errno()
            raise OSError(err, f"cannot write real server slot {slot}: {os.strerror(err)}")

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
        """Every non-zero entry of svc_stats/dest_stats, summed over CPUs, in batched reads (the estimator would
        otherwise pay one syscall per service and per real server every interval, and service.list one per
        service and real server per call: 1.6 s of the event loop at 10k x 10). Summed in numpy a batch at a time;
        Python dicts are made only for the slots in use. Same sums as svc_stats/dest_stats (u64 per field)."""
        import numpy as np

        t = self.t[name]
        ncpu = len(t.Leaf())
        size = ct.sizeof(t.Leaf)
        nf = len(STAT_FIELDS)
        if size != 8 * nf * ncpu:
            raise RuntimeError(f"{name}: unexpected value layout ({size} bytes for {ncpu} CPUs)")
        out = {}
        for batch in self._batches(name):
            if batch is None:  # no batch ops: key by key
                for k, per_cpu in self.t[name].items():
                    total = {f: sum(getattr(c, f) for c in per_cpu) for f in STAT_FIELDS}
                    if any(total.values()):
                        out[getattr(k, "value", k)] = total
                return out
            keys, vals, n = batch
            if n == 0:
                continue
            # The per-CPU sums of a whole batch in numpy (a slot is ncpu x nf u64), then Python ints only for the
            # non-zero slots: at 10k services x 10 real servers every slot may be in use.
            sums = np.frombuffer(vals, np.uint64, n * ncpu * nf).reshape(n, ncpu, nf).sum(axis=1, dtype=np.uint64)
            idx = np.flatnonzero(sums.any(axis=1))
            slots = np.frombuffer(keys, np.uint32, n)[idx].tolist()
            for slot, row in zip(slots, sums[idx].tolist()):
                out[slot] = dict(zip(STAT_FIELDS, row))
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

    def single_entry_flows(self) -> int:
        """Flows the fast path installed with one entry (DR, TUNNEL), all CPUs (0 for a program without the map)."""
        t = self.t.get("conn_single")
        return sum(t[ct.c_uint32(0)]) if t is not None else 0

    def per_cpu_counters(self) -> dict[str, list[int]]:
        t = self.t["counters"]
        return {name: [int(x) for x in t[ct.c_uint32(i)]] for i, name in enumerate(self.counter_names)}

    def counter(self, name: str) -> int:
        return int(sum(self.t["counters"][ct.c_uint32(self.counter_names.index(name))]))

    def inserted_entries(self) -> int:
        """Entries the fast path's flows have inserted into the conn tables: two a flow, one for DR and TUNNEL."""
        return 2 * self.counter("conn_new") - self.single_entry_flows()

    def _evicted_bound(self, inserted_before: int, counts: dict[int, int]) -> None:
        """Record a count of the tables and what it proves about the LRU's evictions. Entries leave a table in
        three ways: removed and counted in conn_expired by the program (the sweep's deletes included), or evicted
        by the LRU, which nothing counts. What flows had inserted before the count, less the entries the count
        found, less what conn_expired holds after it, is therefore at most what was evicted: an entry inserted
        during the walk is not among those inserted before it, an entry removed during it is in conn_expired
        after it, and one the walk saw twice only lowers the figure. A lower bound, never an overestimate
        (a count reused while flows are made, or taken while the sweep deletes, used to read as evictions)."""
        self.last_count = counts
        self.evicted_bound = max(0, inserted_before - sum(counts.values()) - self.counter("conn_expired"))

    # The conn tables (bpf/hdslb_xdp.c): IPv4 flows in conn4_map, IPv6 and NAT64 flows in conn6_map. An IPv4
    # tuple is looked for in both (a NAT64 flow's reply key is IPv4 but lives in conn6_map).
    CONN_MAPS = tuple(FastPath.CONN_MAPS)

    def _conn_tables_for(self, af: int) -> tuple[str, ...]:
        return self.CONN_MAPS if af == 4 else ("conn6_map",)

    def _conn_key(self, name: str, c: dict):
        k = self.t[name].Key()
        _put_addr(k.saddr, c["saddr"])
        _put_addr(k.daddr, c["daddr"])
        k.sport, k.dport = socket.htons(c["sport"]), socket.htons(c["dport"])
        k.proto, k.af = c["proto"], c["af"]
        return k

    def conn_get(self, proto: int, saddr, sport: int, daddr, dport: int) -> dict | None:
        """One direction of a flow by its tuple, merged over CPU copies like conns(); None if absent."""
        c = {"proto": proto, "af": saddr.version if hasattr(saddr, "version") else 4, "saddr": saddr,
             "sport": sport, "daddr": daddr, "dport": dport}
        for name in self._conn_tables_for(c["af"]):
            try:
                per_cpu = self._copies(self.t[name][self._conn_key(name, c)])
                break
            except KeyError:
                continue
        else:
            return None
        best = max((v for v in per_cpu if v.flags & abi.CONN_F_VALID), key=lambda v: v.last_seen, default=None)
        if best is None:
            return None
        to_af = (10 - c["af"]) if best.flags & abi.CONN_F_XLAT else c["af"]
        return dict(c, to_saddr=_get_addr(best.saddr, to_af), to_sport=socket.ntohs(best.sport),
                    to_daddr=_get_addr(best.daddr, to_af), to_dport=socket.ntohs(best.dport),
                    ifindex=best.ifindex, dmac=ct.string_at(ct.addressof(best.dmac), 6),
                    smac=ct.string_at(ct.addressof(best.smac), 6), out=bool(best.flags & abi.CONN_F_OUT),
                    fwd=abi.FWD_NAMES.get(best.fwd), need_l2=bool(best.flags & abi.CONN_F_NEED_L2))

    CONN_BATCH = 4096

    def _batches(self, name: str):
        """A map read with BPF_MAP_LOOKUP_BATCH a few thousand entries at a time: one syscall per batch instead
        of two per entry (get_next_key + lookup), and a fixed buffer, not one sized for the whole map.
        Yields (keys, values, count); the arrays are reused by the next batch: copy what you keep. Entries added
        or removed during the walk may be missed or seen twice, as with any walk of a live hash map. None is
        yielded once if this kernel has no batch ops for the map type (the caller then walks key by key)."""
        from bcc.libbcc import lib

        t = self.t[name]
        n = self.CONN_BATCH
        keys, vals = (t.Key * n)(), (t.Leaf * n)()
        token, nxt, cnt = ct.c_uint32(0), ct.c_uint32(0), ct.c_uint32(0)
        first = True
        while True:
            cnt.value = n
            res = lib.bpf_lookup_batch(t.map_fd, None if first else ct.byref(token), ct.byref(nxt),
                                       ct.addressof(keys), ct.addressof(vals), ct.byref(cnt))
            err = ct.get_errno()
            if res != 0 and err != errno.ENOENT:
                if first and err in (errno.EINVAL, 524):  # 524: the kernel's ENOTSUPP
                    yield None
                    return
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH on {name}: {os.strerror(err)}")
            yield keys, vals, cnt.value
            if res != 0:  # ENOENT: the walk is complete
                return
            token.value, first = nxt.value, False

    def _conn_items(self):
        """(key, value copies (see _copies)) of every entry of both conn tables, batched (see _batches); the
        objects are reused."""
        shared = self.conn_shared
        for name in self.CONN_MAPS:
            for batch in self._batches(name):
                if batch is None:
                    for k, v in self.t[name].items():
                        yield k, ((v,) if shared else v)
                    break
                keys, vals, n = batch
                for i in range(n):
                    yield keys[i], ((vals[i],) if shared else vals[i])

    def _copies(self, v):
        """A conn entry's value copies: the per-CPU array, or the one shared value as a sequence of one."""
        return (v,) if self.conn_shared else v

    @staticmethod
    def _newest(per_cpu):
        """The newest filled-in CPU copy, its CPU, and the flow's state: the furthest any copy has seen (TCP
        states only move forward, and a FIN may have crossed another CPU than the last packet did)."""
        best, cpu, state = None, -1, 0
        for i, v in enumerate(per_cpu):
            if v.flags & abi.CONN_F_VALID:
                state = max(state, v.state)
                if best is None or v.last_seen > best.last_seen:
                    best, cpu = v, i
        return best, cpu, state

    def conn_remac(self, old: bytes, new: bytes, ifindex: int) -> int:
        """Point every connection entry that sends to next-hop MAC `old` out of ifindex at `new` instead; returns
        the entries changed.

        An entry keeps its next hop's MAC from its first packet (the cached L2 result, DPVS fast_xmit), so when a
        real server or gateway answers from another MAC (a replaced server, a VRRP failover, a migrated VM) new
        flows follow the neighbour table while established ones went on sending to the old MAC until they ended
        (a UDP flow the client kept busy: never). The slow path calls this when it writes a moved MAC. The walk
        is batched; the writes are BPF_EXIST (an entry removed meanwhile stays removed). A packet that updates an
        entry between the read and the write loses that update (its last-seen time, a state step), which the
        next packet redoes: rare, and far better than a flow sent to a MAC that is gone."""
        changed = 0
        for name in self.CONN_MAPS:
            t = self.t[name]
            hits = []
            for batch in self._batches(name):
                if batch is None:
                    items = ((k, v) for k, v in t.items())
                else:
                    keys, vals, n = batch
                    items = ((keys[i], vals[i]) for i in range(n))
                for k, v in items:
                    copies = self._copies(v)
                    if any(c.flags & abi.CONN_F_VALID and not c.flags & abi.CONN_F_NEED_L2 and c.ifindex == ifindex
                           and ct.string_at(ct.addressof(c.dmac), 6) == old for c in copies):
                        hits.append((type(k).from_buffer_copy(k), type(v).from_buffer_copy(v)))
                if batch is None:
                    break
            for k, v in hits:
                for c in self._copies(v):
                    if c.ifindex == ifindex and ct.string_at(ct.addressof(c.dmac), 6) == old:
                        _put_mac(c.dmac, new)
                changed += _bpf_update_elem(t.map_fd, ct.byref(k), ct.byref(v), 2) == 0
        return changed

    def conn_entries(self) -> int:
        """Entries in both conn tables."""
        return sum(self.conn_entries_by_family().values())

    def conn_entries_by_family(self) -> dict[int, int]:
        """Entries per conn table: 4 (conn4_map, IPv4 flows), 6 (conn6_map, IPv6 and NAT64 flows). Each table
        evicts on its own when full, so each is worth watching against its size."""
        out = {}
        inserted = self.inserted_entries()  # before the walk (see _evicted_bound)
        for name in self.CONN_MAPS:
            n = 0
            for batch in self._batches(name):
                if batch is None:
                    n = sum(1 for _ in self.t[name].keys())
                    break
                n += batch[2]
            out[FastPath.CONN_MAPS[name][0]] = n
        self._evicted_bound(inserted, out)
        return out

    # conn_key and conn_val as bytes (bpf/include/hdslb_abi.h); the loader checks the sizes against the C.
    _KEY = struct.Struct(aging.KEY_FMT)
    _VAL = struct.Struct(aging.VAL_FMT)

    def _check_conn_layout(self, name: str) -> None:
        t = self.t[name]
        leaf = t.sLeaf if hasattr(t, "sLeaf") else t.Leaf
        compact = name == "conn4_map"
        offs = {(t.Key, "proto"): aging.K_PROTO, (t.Key, "af"): aging.K_AF,
                (t.Key, "saddr"): aging.K4_SADDR if compact else aging.K_SADDR,
                (t.Key, "daddr"): aging.K4_DADDR if compact else aging.K_DADDR,
                (leaf, "saddr"): aging.V_SADDR, (leaf, "daddr"): aging.V4_DADDR if compact else aging.V_DADDR,
                (leaf, "sport"): aging.V_SPORT, (leaf, "dport"): aging.V_DPORT, (leaf, "flags"): aging.V_FLAGS,
                (leaf, "state"): aging.V_STATE, (leaf, "dest_slot"): aging.V_SLOT, (leaf, "last_seen"): aging.V_LAST}
        ks, vs = (aging.KEY4_SIZE, aging.VAL4_SIZE) if compact else (aging.KEY_SIZE, aging.VAL_SIZE)
        if ct.sizeof(t.Key) != ks or ct.sizeof(leaf) != vs or \
                any(getattr(ty, f).offset != off for (ty, f), off in offs.items()):
            raise RuntimeError(f"{name}'s key/value layout changed: update fastpath/aging.py")

    def _aging_buffers(self):
        """(key bytes, value bytes, CPUs) of both conn tables, batch by batch, in conn6_map's wide layout (the
        views are reused by the next batch). A walk read to its end also counts the tables (last_count)."""
        inserted = self.inserted_entries()  # before the walk (see _evicted_bound)
        counts = {}
        for name in self.CONN_MAPS:
            self._check_conn_layout(name)
            t = self.t[name]
            fam = FastPath.CONN_MAPS[name][0]
            counts[fam] = 0
            ncpu = 1 if self.conn_shared else len(t.Leaf())
            ks, vs = ct.sizeof(t.Key), ct.sizeof(t.sLeaf if hasattr(t, "sLeaf") else t.Leaf)
            widen = aging.widen if name == "conn4_map" else (lambda k, v, n: (k, v))
            for batch in self._batches(name):
                if batch is None:  # no batch ops: the same from a key-by-key walk
                    items = [(bytes(k), bytes(v)) for k, v in t.items()]
                    counts[fam] += len(items)
                    yield (*widen(b"".join(k for k, _ in items), b"".join(v for _, v in items), ncpu), ncpu)
                    break
                keys, vals, n = batch
                counts[fam] += n
                yield (*widen(memoryview(keys).cast("B")[:n * ks], memoryview(vals).cast("B")[:n * vs * ncpu], ncpu),
                       ncpu)
        self._evicted_bound(inserted, counts)

    def conn_aging_view(self) -> list[tuple]:
        """What the aging sweep and the connection counts need of every entry, unpacked straight from the batch
        buffers (no ctypes fields, no address objects): one tuple per entry, see hdslb.fastpath.aging (the
        reference implementation; the daemon uses conn_aging_columns)."""
        out = []
        for kbuf, vbuf, ncpu in self._aging_buffers():
            out.extend(aging.rows(kbuf, vbuf, ncpu))
        return out

    def conn_aging_columns(self):
        """conn_aging_view() as numpy columns (hdslb.fastpath.aging.Columns), several times cheaper for a big
        table; None in the (astronomically rare) case its key hashing cannot tell two keys apart."""
        return aging.Columns.from_batches([aging.Columns.extract(k, v, n) for k, v, n in self._aging_buffers()])

    # --- the sweep's removal ----------------------------------------------------------------------------
    def remove_dead_flows(self, dead: list) -> int:
        """Remove the flows the sweep found dead, [(wide raw keys, newest last_seen the scan saw)], unless a
        packet came since (see remove_dead_requests). Returns the entries removed."""
        # struct sweep_req: two wide keys (the second zero for a one-entry flow), last, nkeys, removed
        tail, none = struct.Struct("<QII").pack, bytes(aging.KEY_SIZE)
        return self.remove_dead_requests(b"".join(
            bytes(keys[0]) + (bytes(keys[1]) if len(keys) > 1 else none) + tail(last, min(2, len(keys)), 0)
            for keys, last in dead))

    def remove_dead_requests(self, blob: bytes) -> int:
        """Run hdslb_sweep (bpf/hdslb_xdp.c) over sweep requests (aging.Columns.sweep_requests), SWEEP_BATCH
        flows a BPF_PROG_RUN: each flow's entries go only if no CPU's copy has seen a packet since the scan,
        checked in the kernel right before the delete; nothing is read back into Python."""
        import numpy as np

        from hdslb.fastpath.testrun import run_xdp

        size, batch, fd = aging.Columns.SWEEP_REQ, self.fp.sweep_batch, self.fp.sweep_fn.fd
        removed = 0
        for off in range(0, len(blob), batch * size):
            _verdict, out, _ = run_xdp(fd, blob[off:off + batch * size])
            removed += int(np.frombuffer(out, "<u4")[size // 4 - 1::size // 4].sum())
        return removed

    def conns(self):
        """Yield one dict per connection direction, merging the per-CPU copies (latest last_seen wins)."""
        shared = self.conn_shared
        for k, per_cpu in self._conn_items():
            best, cpu, state = self._newest(per_cpu)
            if shared:
                cpu = None  # one value for every CPU
            if best is None:
                continue
            to_af = (10 - k.af) if best.flags & abi.CONN_F_XLAT else k.af  # NAT64: the other family (4 <-> 6)
            yield {
                "proto": k.proto, "af": k.af,
                "saddr": _get_addr(k.saddr, k.af), "sport": socket.ntohs(k.sport),
                "daddr": _get_addr(k.daddr, k.af), "dport": socket.ntohs(k.dport),
                "to_saddr": _get_addr(best.saddr, to_af), "to_sport": socket.ntohs(best.sport),
                "to_daddr": _get_addr(best.daddr, to_af), "to_dport": socket.ntohs(best.dport),
                "out": bool(best.flags & abi.CONN_F_OUT), "state": state, "svc_id": best.svc_id,
                "dest_slot": best.dest_slot, "last_seen_ns": self.clock.to_mono_ns(best.last_seen), "cpu": cpu,
            }
