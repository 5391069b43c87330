"""Reference XDP programs for the benchmarks, compiled with bcc exactly as the fast path is (same headers, one compile).

What is here and why:
- ref_bare_tx: `return XDP_TX`, the floor of a program that forwards.
- ref_minimal: parse (the fast path's own parse.h) + rewrite dst address/port with incremental checksums +
  MAC swap + XDP_TX; the yardstick the prog-cost targets are ratios to.
- ref_stage_*: the minimal program grown one step at a time towards hdslb's established-flow path (full
  FNAT rewrite, per-CPU LRU conn lookup with hdslb's own key/value, verdict counters, per-service and
  per-real-server stats, last_seen + TCP state). When a prog-cost target is missed, the steps say where the
  nanoseconds go.
- bench_redirect: the ceiling for the e2e section: rewrite MACs and bpf_redirect() to the other arm.
- bench_sink: on the receiving side; counts UDP frames to the bench port per real server (checking that
  the frame is addressed to that server's IP and MAC) and drops them, passes everything else.

Lookup stages build the key from the packet and the entry rewrites the packet to that same tuple (a
"self loop"), so BPF_PROG_TEST_RUN's repeat loop, which reuses the rewritten buffer, hits every time.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket

from hdslb.fastpath import abi

SINK_PORT = 9  # UDP discard: bench frames go to VIP:9 / RS:9
SINK_MAX = 64  # per-real-server counters; index SINK_OTHER counts frames to the port that matched no server
SINK_OTHER = SINK_MAX - 1

STAGES = [
    ("ref_bare_tx", "return XDP_TX"),
    ("ref_parse", "parse eth/ip/tcp + MAC swap + XDP_TX"),
    ("ref_minimal", "parse + dst addr/port rewrite (incr. csum) + MAC swap + XDP_TX"),
    ("ref_stage_fnat", "+ full FNAT rewrite (src and dst addr/port, MACs from constants)"),
    ("ref_stage_conn", "+ per-CPU LRU conn lookup (hdslb key/value), rewrite from the entry"),
    ("ref_stage_count", "+ 2 verdict counters (rx, tx) in a per-CPU array"),
    ("ref_stage_stats", "+ per-service and per-real-server traffic stats"),
    ("ref_stage_tcp", "+ TCP state tracking"),
    ("ref_stage_full", "+ last_seen = bpf_ktime_get_coarse_ns() (= hdslb's established path)"),
]

# Not cumulative: one step of the chain done another way, to show what a change would buy.
ALTERNATIVES = [
    ("ref_alt_jiffies", "ref_stage_full with last_seen = bpf_jiffies64() instead of ktime_get_coarse"),
    ("ref_alt_key16", "ref_stage_conn with a 16-byte IPv4-only key instead of the 40-byte conn_key"),
    ("ref_alt_hash", "ref_stage_conn with a plain per-CPU hash (no LRU) instead of lru_percpu_hash"),
]

# Insert cost by map type: each iteration inserts a never-seen key (a per-CPU sequence number in saddr).
# Run with a repeat that stays under INS_MAX in total, minus ref_ins_none (sequence + key building only).
INS_MAX = 1 << 18
INSERTS = [
    ("ref_ins_none", "sequence number + key/value building, no insert (baseline)"),
    ("ref_ins_lru_pcpu", "insert into lru_percpu_hash (hdslb's conn map type)"),
    ("ref_ins_lru_pcpu_nocommon", "insert into lru_percpu_hash with BPF_F_NO_COMMON_LRU"),
    ("ref_ins_lru", "insert into lru_hash (one shared value)"),
    ("ref_ins_pcpu", "insert into percpu_hash (no LRU)"),
    ("ref_ins_hash", "insert into hash (no LRU, shared value)"),
]

SRC = r"""
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/in.h>
#include "hdslb_abi.h"
#include "parse.h"
#include "csum.h"

/* The same map kinds and sizes hdslb uses, so a stage costs what the fast path's step costs. */
BPF_TABLE("lru_percpu_hash", struct conn_key, struct conn_val, ref_conn, 65536);
/* Alternatives: an IPv4-only 16-byte key, and the same key/value without LRU. */
struct conn_key4 {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};
BPF_TABLE("lru_percpu_hash", struct conn_key4, struct conn_val, ref_conn16, 65536);
BPF_TABLE("percpu_hash", struct conn_key, struct conn_val, ref_conn_hash, 65536);
BPF_TABLE("percpu_array", __u32, __u64, ref_counters, 32);
BPF_TABLE("percpu_array", __u32, struct traffic_stats, ref_svc_stats, 4096);
BPF_TABLE("percpu_array", __u32, struct traffic_stats, ref_dest_stats, 65536);

BPF_TABLE("lru_percpu_hash", struct conn_key, struct conn_val, ins_lru_pcpu, INS_MAX);
BPF_F_TABLE("lru_percpu_hash", struct conn_key, struct conn_val, ins_lru_pcpu_nocommon, INS_MAX, BPF_F_NO_COMMON_LRU);
BPF_TABLE("lru_hash", struct conn_key, struct conn_val, ins_lru, INS_MAX);
BPF_TABLE("percpu_hash", struct conn_key, struct conn_val, ins_pcpu, INS_MAX);
BPF_TABLE("hash", struct conn_key, struct conn_val, ins_hash, INS_MAX);
BPF_TABLE("lru_percpu_hash", struct conn_key, struct conn_val, look_lru_pcpu, LOOK_MAX);
BPF_TABLE("lru_hash", struct conn_key, struct conn_val, look_lru, LOOK_MAX);
BPF_TABLE("lru_percpu_hash", struct conn4_key, struct conn4_val, look_lru_pcpu4, LOOK_MAX);
BPF_TABLE("lru_hash", struct conn4_key, struct conn4_val, look_lru4, LOOK_MAX);
BPF_PERCPU_ARRAY(look_seq, __u64, 1);
BPF_ARRAY(look_n, __u32, 1);
BPF_PERCPU_ARRAY(ins_seq, __u64, 1);

/* A key never seen before on each call (sequence number, CPU in the top bits), and a filled value. */
static __always_inline int ins_prep(struct conn_key *k, struct conn_val *v)
{
	__u32 zero = 0;
	__u64 *seq = ins_seq.lookup(&zero);

	if (!seq)
		return -1;
	*seq += 1;
	k->saddr.v4 = (__u32)*seq | (bpf_get_smp_processor_id() << 24);
	k->daddr.v4 = 0x0164a8c0;
	k->sport = 80;
	k->dport = 1025;
	k->proto = IPPROTO_TCP;
	k->af = HDSLB_AF_INET;
	v->saddr.v4 = k->daddr.v4;
	v->daddr.v4 = k->saddr.v4;
	v->ifindex = 1;
	v->flags = CONN_F_VALID;
	return 0;
}

int ref_ins_none(struct xdp_md *ctx)
{
	struct conn_key k = {};
	struct conn_val v = {};

	if (ins_prep(&k, &v) == 0 && k.saddr.v4 == v.saddr.v4)
		return XDP_PASS; /* never: keeps the key building from being optimised away */
	return XDP_DROP;
}

struct redir_cfg {
	__u32 ifindex;
	__u8 dmac[6];
	__u8 smac[6];
};
/* bench_redirect's target: egress ifindex and the MACs to write. */
BPF_ARRAY(redir_cfg, struct redir_cfg, 1);

struct sink_dst {
	__u32 idx;
	__u8 mac[6];
	__u16 pad;
};
/* bench_sink: real server IP (network order) -> counter index and the MAC frames to it must carry. */
BPF_HASH(sink_dst, __be32, struct sink_dst, SINK_MAX);
BPF_PERCPU_ARRAY(sink_cnt, __u64, SINK_MAX);

static __always_inline void ref_count(__u32 idx)
{
	__u64 *c = ref_counters.lookup(&idx);

	if (c)
		*c += 1;
}

static __always_inline void swap_mac(struct ethhdr *eth)
{
	__u8 tmp[6];

	__builtin_memcpy(tmp, eth->h_source, 6);
	__builtin_memcpy(eth->h_source, eth->h_dest, 6);
	__builtin_memcpy(eth->h_dest, tmp, 6);
}

/* alt: 0 as the chain says, 1 jiffies for last_seen, 2 16-byte key, 3 non-LRU hash */
static __always_inline int staged_alt(struct xdp_md *ctx, const int stage, const int alt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = { .pos = data };
	struct ethhdr *eth;
	struct iphdr *iph;
	struct tcphdr *th;
	struct conn_key k = {};
	struct conn_val *cv = 0;
	int et, proto;

	if (stage >= 5)
		ref_count(0);
	et = parse_ethhdr(&nh, data_end, &eth);
	if (et != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	proto = parse_iphdr(&nh, data_end, &iph);
	if (proto != IPPROTO_TCP)
		return XDP_PASS;
	if (parse_tcphdr(&nh, data_end, &th) < 0)
		return XDP_DROP;
	if (stage == 1) {
		swap_mac(eth);
		return XDP_TX;
	}
	if (stage == 2) {
		__be32 nd = bpf_htonl(0xc0a86402); /* 192.168.100.2 */
		__be16 np = bpf_htons(80);

		hcsum_replace4(&th->check, iph->daddr, nd);
		hcsum_replace2(&th->check, th->dest, np);
		hcsum_replace4(&iph->check, iph->daddr, nd);
		th->dest = np;
		iph->daddr = nd;
		swap_mac(eth);
		return XDP_TX;
	}
	if (stage == 3) {
		__be32 ns = bpf_htonl(0xc0a864c8), nd = bpf_htonl(0xc0a86402);
		__be16 nsp = bpf_htons(1025), ndp = bpf_htons(80);
		__u8 dmac[6] = {2, 0x55, 0, 0, 0, 2}, smac[6] = {2, 0xaa, 0, 0, 0, 1};

		hcsum_replace4(&th->check, iph->saddr, ns);
		hcsum_replace4(&th->check, iph->daddr, nd);
		hcsum_replace2(&th->check, th->source, nsp);
		hcsum_replace2(&th->check, th->dest, ndp);
		th->source = nsp;
		th->dest = ndp;
		hcsum_replace4(&iph->check, iph->saddr, ns);
		hcsum_replace4(&iph->check, iph->daddr, nd);
		iph->saddr = ns;
		iph->daddr = nd;
		__builtin_memcpy(eth->h_dest, dmac, 6);
		__builtin_memcpy(eth->h_source, smac, 6);
		return XDP_TX;
	}
	/* stage >= 4: the established path, step by step */
	k.saddr.v4 = iph->saddr;
	k.daddr.v4 = iph->daddr;
	k.sport = th->source;
	k.dport = th->dest;
	k.proto = IPPROTO_TCP;
	k.af = HDSLB_AF_INET;
	if (alt == 2) {
		struct conn_key4 k4 = {};

		k4.saddr = iph->saddr;
		k4.daddr = iph->daddr;
		k4.sport = th->source;
		k4.dport = th->dest;
		k4.proto = IPPROTO_TCP;
		cv = ref_conn16.lookup(&k4);
	} else if (alt == 3) {
		cv = ref_conn_hash.lookup(&k);
	} else {
		cv = ref_conn.lookup(&k);
	}
	if (!cv || !(cv->flags & CONN_F_VALID))
		return XDP_PASS;
	{
		__be32 old_s = iph->saddr, old_d = iph->daddr;
		__be32 new_s = cv->saddr.v4, new_d = cv->daddr.v4;

		hcsum_replace4(&th->check, old_s, new_s);
		hcsum_replace4(&th->check, old_d, new_d);
		hcsum_replace2(&th->check, th->source, cv->sport);
		hcsum_replace2(&th->check, th->dest, cv->dport);
		th->source = cv->sport;
		th->dest = cv->dport;
		if (stage >= 7) {
			__u8 st = cv->state;

			if (th->rst)
				st = CS_CLOSE;
			else if (th->fin)
				st = st < CS_FIN_WAIT ? CS_FIN_WAIT : st;
			else if (th->syn && !th->ack)
				st = st == CS_NONE ? CS_SYN_RECV : st;
			else if (th->ack && st == CS_SYN_RECV && !(cv->flags & CONN_F_OUT))
				st = CS_ESTABLISHED;
			cv->state = st;
		}
		hcsum_replace4(&iph->check, old_s, new_s);
		hcsum_replace4(&iph->check, old_d, new_d);
		iph->saddr = new_s;
		iph->daddr = new_d;
		__builtin_memcpy(eth->h_dest, cv->dmac, 6);
		__builtin_memcpy(eth->h_source, cv->smac, 6);
	}
	if (stage >= 8)
		cv->last_seen = alt == 1 ? bpf_jiffies64() : bpf_ktime_get_coarse_ns();
	if (stage >= 6) {
		__u32 sid = cv->svc_id, did = cv->dest_slot;
		struct traffic_stats *ss = ref_svc_stats.lookup(&sid);
		struct traffic_stats *ds = ref_dest_stats.lookup(&did);
		__u32 l3 = bpf_ntohs(iph->tot_len);

		if (ss) {
			ss->inpkts++;
			ss->inbytes += l3;
		}
		if (ds) {
			ds->inpkts++;
			ds->inbytes += l3;
		}
	}
	if (stage >= 5)
		ref_count(3);
	if (cv->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(cv->ifindex, 0);
}

static __always_inline int staged(struct xdp_md *ctx, const int stage)
{
	return staged_alt(ctx, stage, 0);
}

int ref_bare_tx(struct xdp_md *ctx) { return XDP_TX; }
int ref_parse(struct xdp_md *ctx) { return staged(ctx, 1); }
int ref_minimal(struct xdp_md *ctx) { return staged(ctx, 2); }
int ref_stage_fnat(struct xdp_md *ctx) { return staged(ctx, 3); }
int ref_stage_conn(struct xdp_md *ctx) { return staged(ctx, 4); }
int ref_stage_count(struct xdp_md *ctx) { return staged(ctx, 5); }
int ref_stage_stats(struct xdp_md *ctx) { return staged(ctx, 6); }
int ref_stage_tcp(struct xdp_md *ctx) { return staged(ctx, 7); }
int ref_stage_full(struct xdp_md *ctx) { return staged(ctx, 8); }
int ref_alt_jiffies(struct xdp_md *ctx) { return staged_alt(ctx, 8, 1); }
int ref_alt_key16(struct xdp_md *ctx) { return staged_alt(ctx, 4, 2); }
int ref_alt_hash(struct xdp_md *ctx) { return staged_alt(ctx, 4, 3); }

@INS_PROGS@
/* The e2e ceiling: no parsing, no lookup beyond its one config entry; MACs for the next hop, redirect. */
int bench_redirect(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 zero = 0;
	struct redir_cfg *c;

	if ((void *)(eth + 1) > data_end)
		return XDP_DROP;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	c = redir_cfg.lookup(&zero);
	if (!c || !c->ifindex)
		return XDP_PASS;
	__builtin_memcpy(eth->h_dest, c->dmac, 6);
	__builtin_memcpy(eth->h_source, c->smac, 6);
	return bpf_redirect(c->ifindex, 0);
}

/* Count and drop the bench's UDP frames so the receiving side is never the bottleneck. */
int bench_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	struct udphdr *uh = (void *)(iph + 1);
	struct sink_dst *d;
	__u32 idx = SINK_OTHER;
	__be32 dst;
	__u64 *c;

	if ((void *)(uh + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || iph->protocol != IPPROTO_UDP || iph->ihl != 5 ||
	    uh->dest != bpf_htons(SINK_PORT))
		return XDP_PASS;
	dst = iph->daddr;
	d = sink_dst.lookup(&dst);
	if (d && d->idx < SINK_OTHER && eth->h_dest[0] == d->mac[0] && eth->h_dest[1] == d->mac[1] &&
	    eth->h_dest[2] == d->mac[2] && eth->h_dest[3] == d->mac[3] && eth->h_dest[4] == d->mac[4] &&
	    eth->h_dest[5] == d->mac[5])
		idx = d->idx;
	c = sink_cnt.lookup(&idx);
	if (c)
		*c += 1;
	return XDP_DROP;
}
"""

# Lookup cost by working set: LOOKUPS maps are filled with keys 1..n (fill program), then looked up in turn
# (key i, i+1, ... mod n) with the established path's writes to the value. Per-CPU values live apart from the
# hash element (one more cache line to fetch); a shared value follows the key in the element.
LOOK_MAX = 1 << 18
LOOKUPS = [
    ("lru_pcpu", "lru_percpu_hash, wide entries (conn6_map's layout): element, then the per-CPU value elsewhere"),
    ("lru", "lru_hash, wide entries: one shared value, inline after the key (160-byte element)"),
    ("lru_pcpu4", "lru_percpu_hash, compact IPv4 entries (conn4_map, the default): 16-byte key, 48-byte value"),
    ("lru4", "lru_hash, compact IPv4 entries (conn4_map --conn-table shared): 112-byte element"),
]
_LOOK_TYPES = {"lru_pcpu": "", "lru": "", "lru_pcpu4": "4", "lru4": "4"}  # struct conn{,4}_key / _val
_LOOK_PROG = """
int ref_fill_MAP(struct xdp_md *ctx)
{
	struct connT_key k = {};
	struct connT_val v = {};
	__u32 zero = 0;
	__u64 *seq = look_seq.lookup(&zero);

	if (!seq)
		return XDP_ABORTED;
	*seq += 1;
	k.saddr.v4 = (__u32)*seq;
	k.daddr.v4 = 0x0164a8c0;
	k.proto = IPPROTO_TCP;
	k.af = HDSLB_AF_INET;
	v.flags = CONN_F_VALID;
	return look_MAP.update(&k, &v) == 0 ? XDP_DROP : XDP_PASS;
}

int ref_look_MAP(struct xdp_md *ctx)
{
	struct connT_key k = {};
	struct connT_val *v;
	__u32 zero = 0;
	__u64 *seq = look_seq.lookup(&zero);
	__u32 *n = look_n.lookup(&zero);

	if (!seq || !n || !*n)
		return XDP_ABORTED;
	*seq += 1;
	k.saddr.v4 = (__u32)(*seq % *n) + 1;
	k.daddr.v4 = 0x0164a8c0;
	k.proto = IPPROTO_TCP;
	k.af = HDSLB_AF_INET;
	v = look_MAP.lookup(&k);
	if (!v || !(v->flags & CONN_F_VALID))
		return XDP_PASS;
	v->last_seen = bpf_jiffies64();
	v->state = CS_ESTABLISHED;
	return XDP_DROP;
}
"""

_INS_PROG = """
int ref_ins_MAP(struct xdp_md *ctx)
{
	struct conn_key k = {};
	struct conn_val v = {};

	if (ins_prep(&k, &v) == 0)
		ins_MAP.update(&k, &v);
	return XDP_DROP;
}
"""
# bcc rewrites map calls only outside macros, so each insert program is spelled out here.
SRC = SRC.replace("@INS_PROGS@", "".join(_INS_PROG.replace("MAP", n[len("ref_ins_"):]) for n, _ in INSERTS[1:])
                  + "".join(_LOOK_PROG.replace("MAP", n).replace("connT_", f"conn{_LOOK_TYPES[n]}_")
                            for n, _ in LOOKUPS))

_REF = None


def compile_refs():
    """The one bcc compile of all reference programs (shared by every section of a run)."""
    global _REF
    if _REF is None:
        from bcc import BPF

        _REF = BPF(text=SRC, cflags=[f"-I{abi.BPF_DIR / 'include'}", f"-DSINK_PORT={SINK_PORT}",
                                     f"-DSINK_MAX={SINK_MAX}", f"-DSINK_OTHER={SINK_OTHER}", f"-DINS_MAX={INS_MAX}", f"-DLOOK_MAX={LOOK_MAX}",
                                     "-Wno-unused-function"])
    return _REF


def load(name: str):
    from bcc import BPF

    return compile_refs().load_func(name.encode(), BPF.XDP)


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def add_self_loop(tcp_tuple: tuple[str, int, str, int], svc_id: int = 0, dest_slot: int = 0,
                  ifindex: int = 1) -> None:
    """A ref_conn entry for (saddr, sport, daddr, dport) that rewrites the packet to that same tuple."""
    b = compile_refs()
    t = b["ref_conn"]
    saddr, sport, daddr, dport = tcp_tuple
    k = t.Key()
    ct.memmove(ct.addressof(k.saddr), ipaddress.IPv4Address(saddr).packed.ljust(16, b"\0"), 16)
    ct.memmove(ct.addressof(k.daddr), ipaddress.IPv4Address(daddr).packed.ljust(16, b"\0"), 16)
    k.sport, k.dport, k.proto, k.af = socket.htons(sport), socket.htons(dport), socket.IPPROTO_TCP, 4
    v = t.sLeaf()
    ct.memmove(ct.addressof(v.saddr), ipaddress.IPv4Address(saddr).packed.ljust(16, b"\0"), 16)
    ct.memmove(ct.addressof(v.daddr), ipaddress.IPv4Address(daddr).packed.ljust(16, b"\0"), 16)
    v.sport, v.dport = socket.htons(sport), socket.htons(dport)
    v.ifindex, v.dest_slot, v.svc_id = ifindex, dest_slot, svc_id
    v.flags, v.state, v.fwd = abi.CONN_F_VALID, 2, abi.FWD["fnat"]
    ct.memmove(ct.addressof(v.dmac), bytes.fromhex("025500000002"), 6)
    ct.memmove(ct.addressof(v.smac), bytes.fromhex("02aa00000001"), 6)
    t[k] = t.Leaf(*([v] * len(t.Leaf())))
    h = b["ref_conn_hash"]
    h[h.Key.from_buffer_copy(bytes(k))] = h.Leaf(*([h.sLeaf.from_buffer_copy(bytes(v))] * len(h.Leaf())))
    t16 = b["ref_conn16"]
    k16 = t16.Key()
    k16.saddr = int.from_bytes(ipaddress.IPv4Address(saddr).packed, "little")
    k16.daddr = int.from_bytes(ipaddress.IPv4Address(daddr).packed, "little")
    k16.sport, k16.dport, k16.proto = socket.htons(sport), socket.htons(dport), socket.IPPROTO_TCP
    t16[k16] = t16.Leaf(*([t16.sLeaf.from_buffer_copy(bytes(v))] * len(t16.Leaf())))


def set_redirect(ifindex: int, dmac: str, smac: str) -> None:
    t = compile_refs()["redir_cfg"]
    v = t.Leaf()
    v.ifindex = ifindex
    ct.memmove(ct.addressof(v.dmac), mac_bytes(dmac), 6)
    ct.memmove(ct.addressof(v.smac), mac_bytes(smac), 6)
    t[ct.c_uint32(0)] = v


def set_sink_dsts(dsts: list[tuple[str, str]]) -> None:
    """[(real server ip, mac)] in counter-index order."""
    t = compile_refs()["sink_dst"]
    t.clear()
    for i, (ip, mac) in enumerate(dsts):
        v = t.Leaf()
        v.idx = i
        ct.memmove(ct.addressof(v.mac), mac_bytes(mac), 6)
        t[t.Key(int.from_bytes(ipaddress.IPv4Address(ip).packed, "little"))] = v


def sink_counts() -> list[int]:
    """Frames counted per real server index (sum over CPUs); the last entry is 'matched no server'."""
    t = compile_refs()["sink_cnt"]
    return [int(sum(t[ct.c_uint32(i)])) for i in range(SINK_MAX)]
