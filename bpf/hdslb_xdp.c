/* hdslb_xdp.c: the XDP entry point — parse, classify, find or create the connection, rewrite, transmit. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <linux/ipv6.h>
#include <linux/in.h>

#include "hdslb_abi.h"
#include "parse.h"
#include "csum.h"
#include "jhash.h"

/*
 * Sizes and locations come from the loader as -D flags (hdslb/fastpath/loader.py), never by editing this
 * text. Every map-touching function lives in this file because bcc rewrites map calls only in the main file.
 */
#ifndef PIN_DIR
#error "PIN_DIR (bpffs directory for this instance) must be passed by the loader"
#endif
#if !defined(CONN4_MAP_FD) || !defined(CONN6_MAP_FD)
#error "CONN4_MAP_FD and CONN6_MAP_FD (fds of the pre-created conn maps) must be passed by the loader"
#endif
#ifndef HDSLB_NR_CPUS
#error "HDSLB_NR_CPUS (number of possible CPUs) must be passed by the loader"
#endif
#ifndef MAX_CONNS
#define MAX_CONNS 262144
#endif
#ifndef MAX_CONNS6
#define MAX_CONNS6 (MAX_CONNS / 4)
#endif
#ifndef MAX_SERVICES
#define MAX_SERVICES 4096
#endif
#ifndef MAX_DESTS
#define MAX_DESTS 65536
#endif
#ifndef MAX_LOCAL
#define MAX_LOCAL 4096
#endif
#ifndef MAX_ROUTES
#define MAX_ROUTES 131072
#endif
#ifndef MAX_NEIGH
#define MAX_NEIGH 16384
#endif
#ifndef MAX_IFACES
#define MAX_IFACES 64
#endif
#ifndef MAX_HASH_CELLS
#define MAX_HASH_CELLS 2097152
#endif
#ifndef MAX_PERSIST
#define MAX_PERSIST 65536
#endif

/* VIP:port:proto -> service id; the first lookup for a packet that has no connection yet. */
BPF_TABLE_PINNED("hash", struct svc_key, struct svc_val, svc_map, MAX_SERVICES, PIN_DIR "/svc_map");
/* Service id -> scheduling ring; replaced whole by the daemon so a packet never sees half a table. */
BPF_TABLE_PINNED("hash", __u32, struct sched_tbl, sched_map, MAX_SERVICES, PIN_DIR "/sched_map");
/* Per-CPU position in each service's ring: rr/wrr without atomics (each CPU walks the ring itself). */
BPF_TABLE_PINNED("percpu_array", __u32, __u32, sched_cursor, MAX_SERVICES, PIN_DIR "/sched_cursor");
/* Hash scheduler tables (sh, dh, mh, conhash): cells [hoff, hoff + len) of a service's sched_tbl. */
BPF_TABLE_PINNED("array", __u32, __u32, hash_cells, MAX_HASH_CELLS, PIN_DIR "/hash_cells");
/* Persistence templates (ipvsadm -p): client network -> real server, shared by all CPUs. */
BPF_TABLE_PINNED("lru_hash", struct persist_key, struct persist_val, persist_map, MAX_PERSIST, PIN_DIR "/persist_map");
/* SNAT services' match rules (ipvsadm -H), tried in order; cfg_map says how many are in use. */
BPF_TABLE_PINNED("array", __u32, struct snat_rule, snat_map, SNAT_RULES_MAX, PIN_DIR "/snat_map");
/* Real servers by slot id; slots are stable while a real server exists so conns can count against them. */
BPF_TABLE_PINNED("array", __u32, struct dest_val, dest_map, MAX_DESTS, PIN_DIR "/dest_map");
/* Service id -> the local addresses FNAT may use as source (ipvsadm --add-laddr). */
BPF_TABLE_PINNED("hash", __u32, struct laddr_set, laddr_map, MAX_SERVICES, PIN_DIR "/laddr_map");
/* Per-CPU local-port cursor: each CPU walks the port range from its own offset (DPVS sa_pool, without FDIR). */
BPF_TABLE_PINNED("percpu_array", __u32, __u32, lport_cursor, 1, PIN_DIR "/lport_cursor");
/* Addresses we own (DPVS local routes): ARP is answered for these. */
BPF_TABLE_PINNED("hash", struct local_key, struct local_val, local_map, MAX_LOCAL, PIN_DIR "/local_map");
/* Interfaces we are attached to: our MAC per ifindex, for ARP replies and rewritten frames. */
BPF_TABLE_PINNED("hash", __u32, struct iface_val, iface_map, MAX_IFACES, PIN_DIR "/iface_map");
/* Net routes (DPVS route4_output): longest-prefix match to the egress interface and next hop. */
BPF_TABLE_PINNED("lpm_trie", struct route4_key, struct route_val, route4_map, MAX_ROUTES, PIN_DIR "/route4_map", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct route6_key, struct route_val, route6_map, MAX_ROUTES, PIN_DIR "/route6_map", BPF_F_NO_PREALLOC);
/* Next hop -> MAC; filled by dpip neigh add, by ARP learned here, and by the daemon's resolver. */
BPF_TABLE_PINNED("hash", struct neigh_key, struct neigh_val, neigh_map, MAX_NEIGH, PIN_DIR "/neigh_map");
/*
 * The connection tables: one entry per direction, per-CPU values so the hot path never shares a cache line
 * between CPUs. A key exists for all CPUs, but only the creating CPU's copy is filled in; a packet of the same
 * flow on another CPU (the sender migrated) adopts that copy once (conn_find). With CONN_SHARED
 * (--conn-table shared) one value serves every CPU instead: the memory no longer grows with the CPU count, at
 * the price of CPUs writing the same entry when a flow's packets cross them.
 * IPv4 flows live in conn4_map with 16-byte keys and 48-byte values; IPv6 flows and NAT64 flows (both of
 * their directions: the reply is an IPv4 key with IPv6 addresses to write) in conn6_map, 40 and 72 bytes. An
 * IPv4 connection so takes 112 bytes of element per direction instead of 160, and IPv6 capacity is sized on
 * its own (MAX_CONNS6). Both are created by the loader before this program is compiled: the code below
 * reaches them by fd (CONN4_MAP_FD, CONN6_MAP_FD), which is also what adoption needs
 * (bpf_map_lookup_percpu_elem). Which table a call works on is its first argument, T4 or T6, a constant
 * at every call: each inlined call compiles to one table's code.
 */
#ifdef CONN_SHARED
BPF_TABLE_PINNED("lru_hash", struct conn4_key, struct conn4_val, conn4_map, MAX_CONNS, PIN_DIR "/conn4_map");
BPF_TABLE_PINNED("lru_hash", struct conn_key, struct conn_val, conn6_map, MAX_CONNS6, PIN_DIR "/conn6_map");
#else
BPF_TABLE_PINNED("lru_percpu_hash", struct conn4_key, struct conn4_val, conn4_map, MAX_CONNS, PIN_DIR "/conn4_map");
BPF_TABLE_PINNED("lru_percpu_hash", struct conn_key, struct conn_val, conn6_map, MAX_CONNS6, PIN_DIR "/conn6_map");
#endif
#define T4 1
#define T6 0
#define CONN_MAP(t4) ((void *)((t4) ? bpf_pseudo_fd(1, CONN4_MAP_FD) : bpf_pseudo_fd(1, CONN6_MAP_FD)))
#define K4(k) ((struct conn4_key *)(k))
#define V4(v) ((struct conn4_val *)(v))
#define CV(v) ((struct conn_val *)(v))

static __always_inline void *conn_lookup(int t4, void *k)
{
	return bpf_map_lookup_elem(CONN_MAP(t4), k);
}

static __always_inline int conn_insert(int t4, void *k, void *v)
{
	return bpf_map_update_elem(CONN_MAP(t4), k, v, BPF_NOEXIST);
}

static __always_inline int conn_update(int t4, void *k, void *v)
{
	return bpf_map_update_elem(CONN_MAP(t4), k, v, BPF_ANY);
}

static __always_inline int conn_delete(int t4, void *k)
{
	return bpf_map_delete_elem(CONN_MAP(t4), k);
}

/* Addresses of a key or value of either table, as the wide union (IPv4 in .v4, the rest zero) and back. */
static __always_inline union hdslb_addr ck_addr(int t4, const void *k, int dst)
{
	union hdslb_addr a = {};

	if (t4)
		a.v4 = dst ? K4(k)->daddr.v4 : K4(k)->saddr.v4;
	else
		a = dst ? ((const struct conn_key *)k)->daddr : ((const struct conn_key *)k)->saddr;
	return a;
}

static __always_inline void ck_set(int t4, void *k, int dst, union hdslb_addr a)
{
	if (t4) {
		if (dst)
			K4(k)->daddr.v4 = a.v4;
		else
			K4(k)->saddr.v4 = a.v4;
	} else if (dst) {
		((struct conn_key *)k)->daddr = a;
	} else {
		((struct conn_key *)k)->saddr = a;
	}
}

static __always_inline union hdslb_addr cv_addr(int t4, const struct conn_val *v, int dst)
{
	union hdslb_addr a = {};

	if (t4)
		a.v4 = dst ? V4(v)->daddr.v4 : V4(v)->saddr.v4;
	else
		a = dst ? v->daddr : v->saddr;
	return a;
}

static __always_inline void cv_set(int t4, struct conn_val *v, int dst, union hdslb_addr a)
{
	if (t4) {
		if (dst)
			V4(v)->daddr.v4 = a.v4;
		else
			V4(v)->saddr.v4 = a.v4;
	} else if (dst) {
		v->daddr = a;
	} else {
		v->saddr = a;
	}
}
/* Traffic per service / per real server, per CPU; the daemon sums. */
BPF_TABLE_PINNED("percpu_array", __u32, struct traffic_stats, svc_stats, MAX_SERVICES, PIN_DIR "/svc_stats");
BPF_TABLE_PINNED("percpu_array", __u32, struct traffic_stats, dest_stats, MAX_DESTS, PIN_DIR "/dest_stats");
/* Verdicts and drop reasons, indexed by enum hdslb_counter. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, counters, CNT_MAX, PIN_DIR "/counters");
/*
 * Flows installed with one entry (DR, TUNNEL: the server answers the client itself), per CPU. With conn_new it
 * tells the entries flows inserted, so the daemon can tell the LRU's evictions from the entries it removed. A map
 * of its own, not a counter: the pinned counters array keeps its size across upgrades.
 */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, conn_single, 1, PIN_DIR "/conn_single");
/* Per-interface counters, per CPU (dpip link show -s). */
BPF_TABLE_PINNED("percpu_array", __u32, struct if_stats, if_stats, IF_STATS_SLOTS, PIN_DIR "/if_stats");
/* Runtime settings (local port range); read only on new flows. */
BPF_TABLE_PINNED("array", __u32, struct fp_cfg, cfg_map, 1, PIN_DIR "/cfg_map");

/*
 * The slow path's AF_XDP sockets, one per (interface, rx queue). Not pinned: sockets belong to the running
 * daemon, which registers them again after a restart. While none is registered the program answers ARP
 * itself, so a restarting daemon never makes the balancer's addresses unreachable.
 */
BPF_XSKMAP(xsks, MAX_IFACES * XSK_MAX_QUEUES);

/* ARP for IPv4 over Ethernet, the only kind we answer. */
struct arp_eth {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[6];
	__be32 spa;
	__u8 tha[6];
	__be32 tpa;
} __attribute__((packed));

/* Hide a value from clang's range analysis so a bounds mask it considers redundant survives for the verifier. */
#define barrier_var(v) asm volatile("" : "+r"(v))

#define ARPOP_REQUEST_ 1
#define ARPOP_REPLY_ 2

static __always_inline void count(__u32 idx)
{
	__u64 *c = counters.lookup(&idx);

	if (c)
		*c += 1;
}

static __always_inline void count_n(__u32 idx, __u64 n)
{
	__u64 *c = counters.lookup(&idx);

	if (c)
		*c += n;
}

static __always_inline int drop(__u32 reason)
{
	count(reason);
	return XDP_DROP;
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

/*
 * Addresses no flow can come from, the sources Linux calls martian (ip_route_input_slow, ip6_rcv_core):
 * IPv4 0.0.0.0/8, 127.0.0.0/8, multicast 224.0.0.0/4 and the limited broadcast; IPv6 ::, ::1, multicast
 * ff00::/8 and IPv4-mapped ::ffff:0:0/96 (RFC 4291 2.5.5.2). A connection from one would send its replies
 * there. (240.0.0.0/4 is not on the list: Linux routes it, and some networks use it.)
 */
static __always_inline int martian4(__be32 a)
{
	__u32 h = bpf_ntohl(a);
	__u32 top = h >> 24;

	return top == 0 || top == 127 || (top >= 224 && top < 240) || h == 0xffffffff;
}

static __always_inline int martian6(const __be32 *a)
{
	if ((bpf_ntohl(a[0]) >> 24) == 0xff)
		return 1;
	if (a[0] | a[1])
		return 0;
	if (a[2] == bpf_htonl(0xffff))
		return 1;
	return a[2] == 0 && (a[3] == 0 || a[3] == bpf_htonl(1));
}

/* A multicast or broadcast Ethernet address (the group bit): never a sender, never a reply's destination. */
static __always_inline int mac_group(const __u8 *mac)
{
	return mac[0] & 1;
}

static __always_inline struct local_val *local_lookup4(__be32 addr)
{
	struct local_key lk = {};

	lk.addr.v4 = addr;
	lk.af = HDSLB_AF_INET;
	return local_map.lookup(&lk);
}

/* A key past the XSKMAP: no socket, so what would be punted is handled as with no slow path. */
#define XSK_KEY_NONE (MAX_IFACES * XSK_MAX_QUEUES)

/*
 * The XSKMAP key of the slow-path socket serving this packet's interface and queue. An AF_XDP socket takes only
 * frames of the queue it is bound to (the kernel drops a frame redirected to it from another queue, counted
 * nowhere), and the slow path binds at most XSK_MAX_QUEUES of an interface's queues: a frame received on a later
 * queue of a NIC with more (one per core is common) has no socket, and is answered or passed as when no slow
 * path runs. It went to queue 0's socket and was lost: pings, path-MTU errors and IPv6 solicitations for our
 * addresses that RSS spread there (half of them on a 32-queue NIC) were never seen.
 */
static __always_inline __u32 xsk_key(struct xdp_md *ctx, struct iface_val *ifv)
{
	__u32 q = ctx->rx_queue_index;

	if (q >= XSK_MAX_QUEUES)
		return XSK_KEY_NONE;
	return (__u32)ifv->xsk_slot * XSK_MAX_QUEUES + q;
}

static __always_inline int slowpath_up(__u32 key)
{
	return xsks.lookup(&key) != 0;
}

/*
 * What is handed to the slow path shares each interface queue's AF_XDP ring: ARP, neighbour discovery, the answers
 * to the slow path's own probes, ICMP. Python serves ~20-30k frames a second, so one host flooding it starved the
 * rest: pinging a VIP at ~100 kpps, or sending ~40 kpps of ARP requests for it from made-up senders, lost the
 * real servers' answers to our probes with the flood, next hops went FAILED and about half the new connections
 * failed until the flood stopped. Two budgets, PUNT_RATE frames a second each (bursts of PUNT_BURST) over all
 * CPUs, as Linux bounds the ICMP it sends (icmp_msgs_per_sec, icmp_msgs_burst):
 *   PUNT_ICMP   ICMP to our addresses (echo, errors to translate): beyond it dropped (drop_icmp_ratelimit);
 *   PUNT_NEIGH  ARP requests and IPv6 solicitations for our addresses: beyond it answered here as when no slow
 *               path runs (arp_reply, nd_reply), without learning the asker.
 * The answers to the slow path's own probes are never limited. A GCRA bucket per budget: the value is when the
 * bucket is next empty. Shared by the CPUs without a lock: a race lets a packet more through, nothing worse. Not
 * pinned: a restarted program starts with full buckets.
 */
#define PUNT_RATE 2000
#define PUNT_BURST 200
#define PUNT_COST (1000000000ULL / PUNT_RATE)
#define PUNT_ICMP 0
#define PUNT_NEIGH 1

BPF_ARRAY(punt_tat, __u64, 2);

static __always_inline int punt_allowed(__u32 budget)
{
	__u64 *tat = punt_tat.lookup(&budget);
	__u64 now = bpf_ktime_get_ns(), t;

	if (!tat)
		return 1;
	t = *tat > now ? *tat : now;
	if (t - now > (PUNT_BURST - 1) * PUNT_COST)
		return 0;
	*tat = t + PUNT_COST;
	return 1;
}

/*
 * Learn sender IP -> MAC from ARP, unless an operator pinned that neighbour with dpip neigh add. Only a real
 * unicast host is learned, as the slow path does (dispatch._learnable): not a martian sender address (0.0.0.0
 * is an ARP probe's, RFC 5227: answered, never learned), not a group or all-zero MAC, and not one of our own
 * addresses (someone else claiming a VIP or local address is a conflict, not a next hop).
 */
static __always_inline void arp_learn(__be32 ip, const __u8 *mac, __u32 ifindex)
{
	struct route4_key rk = { .prefixlen = 32, .addr = ip };
	struct neigh_key nk = {};
	struct neigh_val nv = {};
	struct neigh_val *old;
	struct route_val *rt;

	if (martian4(ip) || mac_group(mac) || !(mac[0] | mac[1] | mac[2] | mac[3] | mac[4] | mac[5]))
		return;
	if (local_lookup4(ip))
		return;
	nk.addr.v4 = ip;
	nk.af = HDSLB_AF_INET;
	old = neigh_map.lookup(&nk);
	if (old && (old->flags & NEIGH_F_PERMANENT))
		return;
	/* Linux keeps a table per interface; this map is keyed by address alone, so what one interface hears about an
	 * address routed out of another (a host on the client side asking for the VIP "from" a real server's address)
	 * would move that next hop to its MAC. Not learned here: the slow path's rule (neigh_other_iface), by the
	 * route, or without one by the interface the entry is on. */
	rt = route4_map.lookup(&rk);
	if (rt ? rt->ifindex != ifindex : old && old->ifindex != ifindex)
		return;
	__builtin_memcpy(nv.mac, mac, 6);
	nv.flags = NEIGH_F_LEARNED;
	nv.ifindex = ifindex;
	nv.updated = bpf_ktime_get_coarse_ns();
	neigh_map.update(&nk, &nv);
	count(CNT_ARP_LEARN);
}

/*
 * Answer ARP requests for addresses we own on the interface they arrived on, in place (XDP_TX); learn
 * senders. Everything else ARP goes to the kernel unchanged.
 */
static __always_inline int handle_arp(struct xdp_md *ctx, struct hdr_cursor *nh, void *data_end, struct ethhdr *eth)
{
	struct arp_eth *a = nh->pos;
	__u32 ifindex = ctx->ingress_ifindex;
	struct iface_val *ifv;
	struct local_val *lv;
	__be32 tpa;
	int busy = 0;

	if ((void *)(a + 1) > data_end)
		return drop(CNT_DROP_MALFORMED_ARP);
	if (a->htype != bpf_htons(1) || a->ptype != bpf_htons(ETH_P_IP) || a->hlen != 6 || a->plen != 4)
		goto pass;
	ifv = iface_map.lookup(&ifindex);
	if (!ifv)
		goto pass;
	lv = local_lookup4(a->tpa);
	if (lv && lv->ifindex && lv->ifindex != ifindex)
		lv = 0; /* owned, but on another interface: that side answers */

	/* The slow path answers and learns when it runs; the code below is the fallback while it does not. It also
	 * gets the replies to our MAC addressed to 0.0.0.0: the answers to its probes sent from the unspecified
	 * address (no address of ours on this interface, RFC 5227), without which such a next hop never resolved
	 * (probed, failed, probed again, its queued frames dropped). Other replies to our MAC may answer the
	 * kernel's own ARP (its address on this interface): those stay the kernel's. */
	if ((lv && (a->op == bpf_htons(ARPOP_REQUEST_) || a->op == bpf_htons(ARPOP_REPLY_))) ||
	    (a->op == bpf_htons(ARPOP_REPLY_) && !a->tpa && mac_eq(eth->h_dest, ifv->mac))) {
		__u32 key = xsk_key(ctx, ifv);

		if (slowpath_up(key)) {
			if (lv && a->op == bpf_htons(ARPOP_REQUEST_) && !punt_allowed(PUNT_NEIGH)) {
				busy = 1; /* a flood: answered below, the asker not learned */
			} else {
				count(CNT_PUNT_ARP);
				return xsks.redirect_map(key, XDP_PASS);
			}
		} else if (slowpath_up((__u32)ifv->xsk_slot * XSK_MAX_QUEUES)) {
			busy = 1; /* a queue the slow path does not serve: answered below, its table left alone */
		}
	}
	/* A neighbour we send to announcing another MAC (a gratuitous ARP from a replaced or failed-over server, or
	 * any ARP it sends): the slow path takes it, as Linux updates an existing entry from any ARP of its sender,
	 * so new and established flows follow at once, not after the entry's timeout and re-probes. Only for a
	 * learned entry on this interface whose MAC differs: everything else stays the kernel's (this one ARP it
	 * does not see; its own entry is re-confirmed by its usual probes). */
	if (!lv && (a->op == bpf_htons(ARPOP_REQUEST_) || a->op == bpf_htons(ARPOP_REPLY_))) {
		struct neigh_key nk = {};
		struct neigh_val *nv;

		nk.addr.v4 = a->spa;
		nk.af = HDSLB_AF_INET;
		nv = neigh_map.lookup(&nk);
		if (nv && !(nv->flags & NEIGH_F_PERMANENT) && nv->ifindex == ifindex && !mac_eq(nv->mac, a->sha)) {
			__u32 key = xsk_key(ctx, ifv);

			if (slowpath_up(key)) {
				count(CNT_PUNT_ARP);
				return xsks.redirect_map(key, XDP_PASS);
			}
		}
	}
	if (a->op == bpf_htons(ARPOP_REQUEST_)) {
		if (!lv)
			goto pass;
		/* (with the slow path up the neighbour table is its own: entries written behind its back would never
		 * be aged, and a flood from made-up senders would fill the map) */
		if (!busy)
			arp_learn(a->spa, a->sha, ifindex);
		tpa = a->tpa;
		__builtin_memcpy(a->tha, a->sha, 6);
		a->tpa = a->spa;
		__builtin_memcpy(a->sha, ifv->mac, 6);
		a->spa = tpa;
		a->op = bpf_htons(ARPOP_REPLY_);
		__builtin_memcpy(eth->h_dest, eth->h_source, 6);
		__builtin_memcpy(eth->h_source, ifv->mac, 6);
		count(CNT_ARP_REPLY);
		return XDP_TX;
	}
	if (a->op == bpf_htons(ARPOP_REPLY_) && (lv || mac_eq(eth->h_dest, ifv->mac)))
		arp_learn(a->spa, a->sha, ifindex);
pass:
	count(CNT_PASS_ARP);
	return XDP_PASS;
}

#ifdef CONN_SHARED
/* The one shared copy (see the per-CPU version below). */
static __always_inline struct conn_val *conn_newest(int t4, void *k, __u8 *state, __u8 *was_est)
{
	struct conn_val *o = conn_lookup(t4, k);

	*state = CS_NONE;
	*was_est = 0;
	if (!o || !(o->flags & CONN_F_VALID))
		return 0;
	*state = o->state;
	*was_est = o->flags & CONN_F_WAS_EST;
	return o;
}

static __always_inline struct conn_val *conn_find(int t4, void *k)
{
	struct conn_val *v = conn_lookup(t4, k);

	return (v && (v->flags & CONN_F_VALID)) ? v : 0;
}
#else
/* The newest filled-in copy of k over every CPU (read in place: no copy on the stack), or 0 when there is none;
 * *state gets the flow's state, the furthest any copy has seen (states only move forward, and the packet that
 * advanced it may have crossed another CPU than the newest one), and *was_est CONN_F_WAS_EST if any copy has it.
 * The winner is looked up again by its CPU: the verifier refuses the branch-free pointer select clang makes of
 * keeping the best pointer. */
static __always_inline struct conn_val *conn_newest(int t4, void *k, __u8 *state, __u8 *was_est)
{
	struct conn_val *o;
	__u64 newest = 0;
	__s32 best = -1;

	*state = CS_NONE;
	*was_est = 0;
	for (__u32 cpu = 0; cpu < HDSLB_NR_CPUS; cpu++) {
		o = bpf_map_lookup_percpu_elem(CONN_MAP(t4), k, cpu);
		if (!o || !(o->flags & CONN_F_VALID))
			continue;
		if (o->state > *state)
			*state = o->state;
		*was_est |= o->flags & CONN_F_WAS_EST;
		if (o->last_seen > newest) {
			newest = o->last_seen;
			best = cpu;
		}
	}
	if (best < 0)
		return 0;
	o = bpf_map_lookup_percpu_elem(CONN_MAP(t4), k, (__u32)best);
	return (o && (o->flags & CONN_F_VALID)) ? o : 0;
}

/*
 * Find this flow's entry. The per-CPU value on this CPU is used when filled in; otherwise the flow was
 * created on another CPU (e.g. the sender moved), so copy the newest other copy here once and go on lockless.
 */
static __always_inline struct conn_val *conn_find(int t4, void *k)
{
	struct conn_val *v = conn_lookup(t4, k);
	struct conn_val *o;
	__u8 state, was_est;

	if (!v)
		return 0;
	if (v->flags & CONN_F_VALID)
		return v;
	o = conn_newest(t4, k, &state, &was_est);
	if (!o)
		return 0;
	if (t4)
		__builtin_memcpy(v, o, sizeof(struct conn4_val));
	else
		__builtin_memcpy(v, o, sizeof(struct conn_val));
	v->state = state;
	v->flags |= was_est;
	count(CNT_CONN_ADOPT);
	return v;
}
#endif /* CONN_SHARED */

/*
 * A segment that may open a flow: SYN alone (ECE/CWR may ride along). SYN+ACK belongs to a flow already open,
 * and SYN with FIN or RST is no segment a TCP sends (the "Christmas tree" and scanning combinations that
 * conntrack calls invalid): none of them creates, reschedules or removes a connection.
 */
static __always_inline int tcp_opens(const struct tcphdr *th)
{
	return th->syn && !th->ack && !th->rst && !th->fin;
}

/* The other direction's key of the entry (k, v): its rewritten tuple reversed, in the other family for NAT64
 * (a NAT64 flow is in conn6_map both ways: its IPv4 reply key is a wide key with af IPv4). */
static __always_inline void conn_partner_key(int t4, void *out, const void *k, const struct conn_val *v)
{
	const struct conn_key *kh = k; /* the head both key layouts share */
	struct conn_key *oh = out;

	ck_set(t4, out, 0, cv_addr(t4, v, 1));
	ck_set(t4, out, 1, cv_addr(t4, v, 0));
	oh->sport = v->dport;
	oh->dport = v->sport;
	oh->proto = kh->proto;
	oh->af = (v->flags & CONN_F_XLAT) ? (kh->af == HDSLB_AF_INET6 ? HDSLB_AF_INET : HDSLB_AF_INET6) : kh->af;
}

/*
 * A SYN that finds an entry: a retransmission keeps its real server, but a new connection on a finished
 * flow's tuple (the client reused its port: the entry is in FIN_WAIT/CLOSE) or on a flow whose real server
 * no longer takes new flows (drained, down, removed) is scheduled afresh, as LVS does with conn_reuse_mode
 * and expire_nodest_conn. Without this, a client that reuses a port quickly (a refused connection leaves
 * no TIME_WAIT) would be sent to a dead server for as long as the old entry lives. Afresh means through
 * pick_dest: a persistent client whose template names a drained server goes back to it (LVS does the same).
 */
static __always_inline int conn_reusable(int t4, void *k, struct conn_val *cv, struct tcphdr *th)
{
	__u32 slot = cv->dest_slot;
	struct dest_val *d;
	__u8 state, was_est;

	if (!th || !tcp_opens(th) || (cv->flags & CONN_F_OUT))
		return 0;
	/* A finished connection: closed after its handshake completed. A handshake cut by a reset is not one:
	 * the client retransmits the same SYN, which must keep its local port (the RST that ended the attempt
	 * may have cleared the server's TIME_WAIT for exactly that port; a fresh port may still be in one).
	 * This CPU's copy may not have seen the end (the FIN crossed another CPU): when it does not say finished,
	 * the flow's state is read over every CPU's copy (only SYNs that find an entry pay for it). */
	state = cv->state;
	was_est = cv->flags & CONN_F_WAS_EST;
#ifndef CONN_SHARED /* a shared table's cv is the only copy */
	if (!((state == CS_FIN_WAIT || state == CS_CLOSE) && was_est))
		conn_newest(t4, k, &state, &was_est);
#endif
	if ((state == CS_FIN_WAIT || state == CS_CLOSE) && was_est)
		return 1;
	/* The real server's FIN or reset is seen by the reply entry only (the flow's state is the further of its
	 * two entries, as for aging): a connection the server reset or closed is finished too, as LVS's CLOSE is
	 * whichever side reset it. Read only for a completed handshake's tuple: a retransmitted SYN never pays. */
	if (was_est && (cv->fwd == FWD_FNAT || cv->fwd == FWD_NAT || cv->fwd == FWD_SNAT)) {
		struct conn_key rk = {}; /* big enough for either table's key */
		__u8 rstate, rwas;

		conn_partner_key(t4, &rk, k, cv);
		conn_newest(t4, &rk, &rstate, &rwas);
		if (rstate == CS_FIN_WAIT || rstate == CS_CLOSE)
			return 1;
	}
	d = dest_map.lookup(&slot);
	return !d || !(d->flags & DEST_F_VALID) || (d->flags & DEST_F_DRAIN) || d->svc_id != cv->svc_id;
}

static __always_inline int addr_eq(const union hdslb_addr *a, const union hdslb_addr *b);

/*
 * Remove a flow's inbound entry and, for the modes that have one, its reply entry: the entry at the reply key
 * only if it is this flow's (it points back at the client). A full table's LRU evicts entries one by one: the
 * flow's reply entry may be gone and its local port held by another client's flow since, whose reply entry
 * removed here handed the port out again while that flow's inbound entry still sent to it (two flows on one
 * tuple at the real server, the answers to one going to the other's client).
 */
static __always_inline void conn_expire(int t4, void *k, struct conn_val *cv)
{
	const struct conn_key *kh = k; /* the head both key layouts share */
	struct conn_key rk = {};       /* big enough for either table's key */
	union hdslb_addr client = ck_addr(t4, k, 0), to;
	struct conn_val *o;
	__u8 state, was_est;

	if (cv->fwd == FWD_FNAT || cv->fwd == FWD_NAT || cv->fwd == FWD_SNAT) {
		conn_partner_key(t4, &rk, k, cv);
		o = conn_newest(t4, &rk, &state, &was_est);
		if (o && (o->flags & CONN_F_OUT) && o->dport == kh->sport) {
			to = cv_addr(t4, o, 1);
			if (addr_eq(&to, &client) && conn_delete(t4, &rk) == 0)
				count(CNT_CONN_EXPIRED);
		}
	}
	if (conn_delete(t4, k) == 0)
		count(CNT_CONN_EXPIRED);
	count(CNT_CONN_REUSED);
}

/*
 * A field of a flow's value written on its packets (state, last_seen). A shared value is stored only when it
 * changes (last_seen then at most once a jiffy): every CPU reads the one value, and a store on each packet would
 * move its cache line between the CPUs whenever one flow's packets land on both (bench table 1i: 122 ns a packet
 * instead of 36). A per-CPU value is each CPU's own: stored every time, which measured faster live once the
 * table outgrows the caches (32k flows: 2.2 Mpps against 1.9 with the compare first, alternating runs).
 */
#ifdef CONN_SHARED
#define CONN_SET(field, val) do { __typeof__(field) v_ = (val); if ((field) != v_) (field) = v_; } while (0)
#else
#define CONN_SET(field, val) ((field) = (val))
#endif

/* Coarse TCP progress, enough for ActiveConn/InActConn and, later, per-state timeouts. */
static __always_inline void tcp_track(struct conn_val *cv, struct tcphdr *th)
{
	__u8 st = cv->state;

	if (th->rst)
		st = CS_CLOSE;
	else if (th->fin)
		st = st < CS_FIN_WAIT ? CS_FIN_WAIT : st;
	else if (th->syn && !th->ack)
		st = st == CS_NONE ? CS_SYN_RECV : st;
	else if (th->ack && st == CS_SYN_RECV && !(cv->flags & CONN_F_OUT)) {
		st = CS_ESTABLISHED;
		cv->flags |= CONN_F_WAS_EST;
	}
	CONN_SET(cv->state, st);
}

/*
 * The client's SYN on a flow whose handshake the real server refused or cut (its reset, or FIN, is in the reply
 * entry: only a flow that never completed its handshake gets here, conn_reusable schedules the others afresh):
 * the reply entry starts over at SYN_RECV, as LVS moves CLOSE back to SYN_RECV on a SYN. The server's SYN-ACK
 * would do it (conn_restart), but reads only its own CPU's copy, and the reset may have crossed another CPU
 * (the server's packets are spread over the CPUs by whoever sent them: veth, RPS): that copy's CLOSE was then
 * the flow's state for good, so the connection the server accepted next was inactive, timed by the close
 * timeout and swept after a few idle seconds. Every copy of the reply entry is read and each one that says
 * FIN_WAIT or CLOSE is set back, here where only SYNs that find an entry pay. The entry at the reply key is
 * this flow's only if it points back at the client (a full table's LRU may have given the port to another).
 */
static __always_inline void conn_restart_reply(int t4, void *k, struct conn_val *cv)
{
	const struct conn_key *kh = k; /* the head both key layouts share */
	struct conn_key rk = {};       /* big enough for either table's key */
	union hdslb_addr client = ck_addr(t4, k, 0), to;
	struct conn_val *o;

	if (cv->fwd != FWD_FNAT && cv->fwd != FWD_NAT && cv->fwd != FWD_SNAT)
		return;
	conn_partner_key(t4, &rk, k, cv);
#ifdef CONN_SHARED
	o = conn_lookup(t4, &rk);
	if (o && (o->flags & (CONN_F_VALID | CONN_F_OUT)) == (CONN_F_VALID | CONN_F_OUT) &&
	    (o->state == CS_FIN_WAIT || o->state == CS_CLOSE) && o->dport == kh->sport) {
		to = cv_addr(t4, o, 1);
		if (addr_eq(&to, &client))
			o->state = CS_SYN_RECV;
	}
#else
	for (__u32 cpu = 0; cpu < HDSLB_NR_CPUS; cpu++) {
		o = bpf_map_lookup_percpu_elem(CONN_MAP(t4), &rk, cpu);
		if (!o || (o->flags & (CONN_F_VALID | CONN_F_OUT)) != (CONN_F_VALID | CONN_F_OUT) ||
		    (o->state != CS_FIN_WAIT && o->state != CS_CLOSE) || o->dport != kh->sport)
			continue;
		to = cv_addr(t4, o, 1);
		if (addr_eq(&to, &client))
			o->state = CS_SYN_RECV;
	}
#endif
}

/*
 * A new handshake on an entry whose last one ended: the client's SYN, or the server's SYN-ACK, on an entry in
 * FIN_WAIT or CLOSE that conn_reusable kept (the client retransmits its SYN after a reset cut the handshake;
 * the server answers a SYN on a tuple it had reset). As in LVS's table (a SYN moves CLOSE to SYN_RECV), the
 * entry starts over at SYN_RECV, so the handshake's ACK establishes it: left in CLOSE, the connection would be
 * timed by the close timeout, swept after a few idle seconds, and its later packets dropped. The flow's state
 * is the furthest any CPU's copy has seen, so the other CPUs' copies (which may say CLOSE) are emptied: a CPU
 * that meets the flow again adopts this copy. Only SYNs that find an entry get here.
 */
static __always_inline void conn_restart(int t4, void *k, struct conn_val *cv, struct tcphdr *th)
{
	__u8 state = cv->state, was_est;

	if (!th || !th->syn || th->rst || th->fin || !th->ack != !(cv->flags & CONN_F_OUT))
		return; /* client side: SYN alone; server side: SYN-ACK */
#ifndef CONN_SHARED
	/* the client's reset may have crossed another CPU: its SYN reads every copy, as conn_reusable does (the
	 * server's SYN-ACK, which every new flow has, reads this CPU's only) */
	if (!th->ack && state != CS_FIN_WAIT && state != CS_CLOSE)
		conn_newest(t4, k, &state, &was_est);
#endif
	if (!th->ack)
		conn_restart_reply(t4, k, cv);
	if (state != CS_FIN_WAIT && state != CS_CLOSE)
		return;
	cv->state = CS_SYN_RECV;
#ifndef CONN_SHARED
	__u32 me = bpf_get_smp_processor_id();

	for (__u32 cpu = 0; cpu < HDSLB_NR_CPUS; cpu++) {
		struct conn_val *o;

		if (cpu == me)
			continue;
		o = bpf_map_lookup_percpu_elem(CONN_MAP(t4), k, cpu);
		if (o)
			o->flags &= ~CONN_F_VALID;
	}
#endif
}

/* A packet of a known flow: its TCP progress and last-seen time. */
static __always_inline void conn_touch(struct conn_val *cv, struct tcphdr *th)
{
	if (th)
		tcp_track(cv, th);
	CONN_SET(cv->last_seen, bpf_jiffies64());
}

static __always_inline void account(struct conn_val *cv, __u32 l3len)
{
	__u32 sid = cv->svc_id;
	__u32 did = cv->dest_slot;
	struct traffic_stats *ss = svc_stats.lookup(&sid);
	struct traffic_stats *ds = dest_stats.lookup(&did);

	if (cv->flags & CONN_F_OUT) {
		if (ss) {
			ss->outpkts++;
			ss->outbytes += l3len;
		}
		if (ds) {
			ds->outpkts++;
			ds->outbytes += l3len;
		}
	} else {
		if (ss) {
			ss->inpkts++;
			ss->inbytes += l3len;
		}
		if (ds) {
			ds->inpkts++;
			ds->inbytes += l3len;
		}
	}
}

/* The slow path's socket for this packet's interface and queue; -1 while no slow path serves it. */
static __always_inline int ingress_xsk(struct xdp_md *ctx, __u32 *key)
{
	__u32 in_if = ctx->ingress_ifindex;
	struct iface_val *inv = iface_map.lookup(&in_if);

	if (!inv)
		return -1;
	*key = xsk_key(ctx, inv);
	return slowpath_up(*key) ? 0 : -1;
}

/* A connection created before its next hop was resolved takes the MAC as soon as the neighbour table has
 * it; returns 1 while it still has none (the packet then goes to the slow path's queue). */
static __always_inline int conn_fill_l2(struct conn_val *cv)
{
	struct neigh_key nk = {};
	struct neigh_val *nv;

	__builtin_memcpy(&nk.addr.v4, cv->dmac, 4);
	nk.af = HDSLB_AF_INET;
	nv = neigh_map.lookup(&nk);
	if (!nv)
		return 1;
	__builtin_memcpy(cv->dmac, nv->mac, 6);
	cv->flags &= ~CONN_F_NEED_L2;
	count(CNT_CONN_L2_FILLED);
	return 0;
}

/* A rewritten packet whose next hop has no MAC: the slow path queues it, resolves, sends; without one it is lost. */
static __always_inline int punt_no_neigh(struct xdp_md *ctx)
{
	__u32 key;

	if (ingress_xsk(ctx, &key) < 0)
		return drop(CNT_DROP_NO_NEIGH);
	count(CNT_PUNT_NO_NEIGH);
	return xsks.redirect_map(key, XDP_DROP);
}

static __always_inline int send_l2(struct xdp_md *ctx, struct ethhdr *eth, struct conn_val *cv)
{
	__builtin_memcpy(eth->h_dest, cv->dmac, 6);
	__builtin_memcpy(eth->h_source, cv->smac, 6);
	if (cv->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(cv->ifindex, 0);
}

/*
 * TUNNEL, packet too big for the encapsulation: tell the client (ICMP fragmentation needed, next-hop MTU =
 * egress MTU - 20) so path MTU discovery shrinks its packets, as LVS does. Built in place from the client's
 * frame: Ethernet back to the sender, an IPv4 header from the VIP, the ICMP header, then the client's IP
 * header (options included) and at least the first 8 bytes of its payload (RFC 792; they never move). Sent
 * back out the way it came.
 */
#define TOO_BIG_QUOTE 28     /* a 20-byte client IP header + 8 bytes */
#define TOO_BIG_QUOTE_OPT 68 /* a client IP header with options (60 bytes at most) + at least 8 bytes */
/* Make the frame an ICMP error of total bytes, in place, addressed back to the client: move its start by delta
 * (the quoted header lands right after the new headers), cut it to total, write the Ethernet header. Returns
 * the Ethernet header with total bytes proven in bounds, or 0. */
static __always_inline struct ethhdr *reshape_for_error(struct xdp_md *ctx, int delta, int total, const __u8 *cmac,
							 const __u8 *lmac, __be16 proto)
{
	struct ethhdr *eth;
	int len;

	if (bpf_xdp_adjust_head(ctx, delta))
		return 0;
	len = (int)((long)ctx->data_end - (long)ctx->data);
	if (bpf_xdp_adjust_tail(ctx, total - len))
		return 0;
	eth = (void *)(long)ctx->data;
	if ((void *)eth + total > (void *)(long)ctx->data_end)
		return 0;
	__builtin_memcpy(eth->h_dest, cmac, 6);
	__builtin_memcpy(eth->h_source, lmac, 6);
	eth->h_proto = proto;
	return eth;
}

/*
 * The VLAN tags (up to two, 4 bytes each) of a frame whose L2 header is l2len bytes, read before it is reshaped, to
 * put back with retag_error. tags[1] is read whatever the depth: the caller has at least 20 bytes in the frame.
 */
static __always_inline int error_tags(struct xdp_md *ctx, __be32 tags[2])
{
	void *data = (void *)(long)ctx->data;

	if (data + 20 > (void *)(long)ctx->data_end)
		return -1;
	__builtin_memcpy(tags, data + 12, 8);
	return 0;
}

/*
 * An error built untagged by reshape_for_error goes back the way the frame it answers came: on its VLAN, with its
 * one or two tags, as ARP and ND answers are sent (left untagged it landed on the native VLAN and never reached a
 * tagged client: a path-MTU black hole). The frame grows by the tags and the MACs move in front of them; the
 * ethertype the error wrote stays last. Returns 0, or -1 when the frame cannot grow.
 */
static __always_inline int retag_error(struct xdp_md *ctx, __u32 l2len, const __be32 tags[2])
{
	void *data, *data_end;
	__u8 macs[12];

	if (l2len == sizeof(struct ethhdr))
		return 0;
	data = (void *)(long)ctx->data;
	if (data + 12 > (void *)(long)ctx->data_end)
		return -1;
	__builtin_memcpy(macs, data, 12);
	if (bpf_xdp_adjust_head(ctx, l2len == 18 ? -4 : -8))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + 22 > data_end)
		return -1;
	__builtin_memcpy(data, macs, 12);
	__builtin_memcpy(data + 12, &tags[0], 4);
	if (l2len == 22)
		__builtin_memcpy(data + 16, &tags[1], 4);
	return 0;
}

/* The error quoting quote bytes of the client's datagram (a constant at each call: sizes the verifier can check). */
static __always_inline int icmp_too_big4_quote(struct xdp_md *ctx, __u32 l2len, __u32 mtu, const int quote)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph;
	struct icmphdr *ic;
	__u8 cmac[6], lmac[6];
	__be32 client, vip, tags[2];
	int delta;

	if (l2len != 14 && l2len != 18 && l2len != 22)
		return drop(CNT_DROP_TOO_BIG);
	barrier_var(l2len); /* keep the bound below for the verifier */
	iph = data + (l2len & 0x3f);
	if ((void *)(eth + 1) > data_end || (void *)iph + quote > data_end || error_tags(ctx, tags))
		return drop(CNT_DROP_TOO_BIG);
	__builtin_memcpy(cmac, eth->h_source, 6);
	__builtin_memcpy(lmac, eth->h_dest, 6);
	client = iph->saddr;
	vip = iph->daddr;
	if (martian4(client) || mac_group(cmac))
		return drop(CNT_DROP_MARTIAN); /* an ICMP error is never sent to a group (RFC 1122 3.2.2) */
	/* the quoted header starts where the new Ethernet + IP + ICMP headers end */
	delta = (int)l2len - (int)(sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct icmphdr));
	eth = reshape_for_error(ctx, delta, sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct icmphdr) + quote,
				cmac, lmac, bpf_htons(ETH_P_IP));
	if (!eth)
		return drop(CNT_DROP_TOO_BIG);
	iph = (void *)(eth + 1);
	ic = (void *)(iph + 1);
	iph->version = 4;
	iph->ihl = 5;
	iph->tos = 0xc0; /* internetwork control, as the kernel's ICMP errors */
	iph->tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct icmphdr) + quote);
	iph->id = 0;
	iph->frag_off = 0;
	iph->ttl = 64;
	iph->protocol = IPPROTO_ICMP;
	iph->check = 0;
	iph->saddr = vip;
	iph->daddr = client;
	iph->check = ip4_csum_full(iph);
	ic->type = ICMP_DEST_UNREACH;
	ic->code = ICMP_FRAG_NEEDED;
	ic->checksum = 0;
	ic->un.frag.__unused = 0;
	ic->un.frag.mtu = bpf_htons((__u16)mtu);
	ic->checksum = hcsum_fold32(bpf_csum_diff(0, 0, (__be32 *)ic, sizeof(*ic) + quote, 0)) ^ 0xffff;
	if (retag_error(ctx, l2len, tags))
		return drop(CNT_DROP_TOO_BIG);
	count(CNT_ICMP_TOO_BIG);
	return XDP_TX;
}

/* The quote is the client's IP header and at least 8 bytes after it (RFC 792): 28 bytes without options; with
 * options, 68 (any header length fits, and routers may quote more: RFC 1812 4.3.2.3). */
static __always_inline int icmp_too_big4(struct xdp_md *ctx, __u32 l2len, __u32 mtu, int options)
{
	if (options)
		return icmp_too_big4_quote(ctx, l2len, mtu, TOO_BIG_QUOTE_OPT);
	return icmp_too_big4_quote(ctx, l2len, mtu, TOO_BIG_QUOTE);
}

/*
 * TUNNEL, before anything is counted or tracked: does the packet (l3len bytes, the IP datagram) fit the egress
 * interface's MTU with the outer header? Returns -1 when it does (or the MTU is unknown); otherwise the packet
 * is answered with ICMP fragmentation needed (DF set) or dropped (drop_too_big), and that verdict is returned.
 */
static __always_inline int tunnel4_too_big(struct xdp_md *ctx, __u32 oif, __u32 l2len, __u32 l3len)
{
	struct iface_val *ov = iface_map.lookup(&oif);
	__u32 off = l2len;
	struct iphdr *in;

	if (!ov || ov->mtu <= sizeof(struct iphdr) || l3len + sizeof(struct iphdr) <= ov->mtu)
		return -1;
	barrier_var(off);
	in = (void *)(long)ctx->data + (off & 0x3f);
	if ((void *)(in + 1) <= (void *)(long)ctx->data_end && (in->frag_off & bpf_htons(0x4000)))
		return icmp_too_big4(ctx, l2len, ov->mtu - sizeof(struct iphdr), in->ihl != 5);
	return drop(CNT_DROP_TOO_BIG);
}

/*
 * Cut the frame to the IP datagram (l2len + l3len bytes) before a header goes in front of it: link padding or
 * junk after tot_len would otherwise travel inside the tunnel, past the MTU check made on tot_len. Returns 0,
 * or -1 when the frame cannot be cut.
 */
static __always_inline int trim_to_datagram(struct xdp_md *ctx, __u32 l2len, __u32 l3len)
{
	__u32 len = (__u32)((long)ctx->data_end - (long)ctx->data);
	__u32 want = l2len + l3len;

	barrier_var(len); /* a length, not a pointer compare with an unbounded offset (which the verifier refuses) */
	if (len > want && bpf_xdp_adjust_tail(ctx, (int)want - (int)len))
		return -1;
	return 0;
}

/*
 * TUNNEL (ipvsadm -i): wrap the client's packet in an outer IPv4 header to the real server (IPIP, as LVS),
 * outer source from the entry. The frame leaves untagged: the head moves by exactly what the new Ethernet +
 * outer IP headers need beyond the old L2 header, so the inner packet's bytes never move. The MTU was checked
 * before (tunnel4_too_big).
 */
static __always_inline int encap4(struct xdp_md *ctx, struct conn4_val *cv, __u32 l2len, __u32 l3len, int punt)
{
	void *data, *data_end;
	struct ethhdr *eth;
	struct iphdr *outer, *inner;
	int delta;

	if (l2len != 14 && l2len != 18 && l2len != 22)
		return drop(CNT_DROP_MALFORMED_ETH);
	if (trim_to_datagram(ctx, l2len, l3len))
		return drop(CNT_DROP_MALFORMED_IP);
	delta = (int)l2len - (int)(sizeof(struct ethhdr) + sizeof(struct iphdr));
	if (bpf_xdp_adjust_head(ctx, delta))
		return drop(CNT_DROP_TOO_BIG); /* no headroom for the outer header */
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	outer = (void *)(eth + 1);
	inner = (void *)(outer + 1);
	if ((void *)(inner + 1) > data_end)
		return drop(CNT_DROP_MALFORMED_IP);
	outer->version = 4;
	outer->ihl = 5;
	outer->tos = inner->tos;
	outer->tot_len = bpf_htons(bpf_ntohs(inner->tot_len) + sizeof(struct iphdr));
	outer->id = 0;
	outer->frag_off = inner->frag_off & bpf_htons(0x4000); /* copy DF (RFC 2003) */
	outer->ttl = 64;
	outer->protocol = IPPROTO_IPIP;
	outer->check = 0;
	outer->saddr = cv->saddr.v4;
	outer->daddr = cv->daddr.v4;
	outer->check = ip4_csum_full(outer);
	eth->h_proto = bpf_htons(ETH_P_IP);
	if (punt) {
		/* the slow path knows these by a zero destination MAC (the entry has none yet) and our source */
		__builtin_memset(eth->h_dest, 0, 6);
		__builtin_memcpy(eth->h_source, cv->smac, 6);
		return punt_no_neigh(ctx);
	}
	return send_l2(ctx, eth, CV(cv));
}

/*
 * Send a packet of a known connection: account, track TCP state, then per mode — FNAT/NAT/SNAT rewrite
 * addresses and ports as the entry says (incremental checksums), DR rewrites only the L2 header, TUNNEL
 * encapsulates — and transmit.
 */
/*
 * A rewritten flow's TCP or UDP header: the new ports, and its checksum updated once with da (the addresses'
 * change, which the pseudo-header carries) and the ports' change. A UDP checksum that computes to zero goes as
 * 0xffff; an IPv4 UDP checksum of zero means "none" and stays so when none_ok (IPv6 and translated packets
 * always carry one: handle_ipv6 drops an IPv6 datagram without one, xlat46 an IPv4 one, before this).
 */
static __always_inline void l4_rewrite(struct tcphdr *th, struct udphdr *uh, __u32 da, __be16 sport, __be16 dport,
				       int none_ok)
{
	if (th) {
		hcsum_apply(&th->check, da + hcsum_delta2(th->source, sport) + hcsum_delta2(th->dest, dport));
		th->source = sport;
		th->dest = dport;
	} else if (uh) {
		if (uh->check || !none_ok) {
			hcsum_apply(&uh->check, da + hcsum_delta2(uh->source, sport) + hcsum_delta2(uh->dest, dport));
			if (!uh->check)
				uh->check = 0xffff;
		}
		uh->source = sport;
		uh->dest = dport;
	}
}

static __always_inline int xmit_conn4(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *iph,
				      struct tcphdr *th, struct udphdr *uh, struct icmphdr *ic, struct conn4_val *cv)
{
	__be32 old_s = iph->saddr, old_d = iph->daddr;
	__be32 new_s = cv->saddr.v4, new_d = cv->daddr.v4;
	__u32 l3len = bpf_ntohs(iph->tot_len);
	__u32 l2len = (__u32)((long)iph - (long)ctx->data);
	int punt = 0, rc;

	/* a packet the tunnel cannot carry is answered or dropped before it counts as the flow's */
	if (cv->fwd == FWD_TUNNEL && (rc = tunnel4_too_big(ctx, cv->ifindex, l2len, l3len)) >= 0)
		return rc;
	if (cv->flags & CONN_F_NEED_L2)
		punt = conn_fill_l2(CV(cv));
	conn_touch(CV(cv), th);
	account(CV(cv), l3len);

	if (cv->fwd == FWD_TUNNEL)
		return encap4(ctx, cv, l2len, l3len, punt);
	if (cv->fwd != FWD_DR) {
		/* the addresses' change, once: into the L4 checksum (pseudo-header) with the ports', and the IP one */
		__u32 da = hcsum_delta4(old_s, new_s) + hcsum_delta4(old_d, new_d);

		if (th || uh) {
			l4_rewrite(th, uh, da, cv->sport, cv->dport, 1);
		} else if (ic) {
			/* SNAT of ICMP echo: the identifier plays the port (no pseudo-header in ICMPv4's checksum). */
			__be16 id = (cv->flags & CONN_F_OUT) ? cv->dport : cv->sport;

			hcsum_replace2(&ic->checksum, ic->un.echo.id, id);
			ic->un.echo.id = id;
		}
		hcsum_apply(&iph->check, da);
		iph->saddr = new_s;
		iph->daddr = new_d;
	}
	if (punt) {
		/* the slow path knows these by a zero destination MAC (the entry has none yet) and our source */
		__builtin_memset(eth->h_dest, 0, 6);
		__builtin_memcpy(eth->h_source, cv->smac, 6);
		return punt_no_neigh(ctx);
	}
	return send_l2(ctx, eth, CV(cv));
}

/* An address as the one host-order word the hash schedulers hash (v6: XOR of its words, as LVS folds it). */
static __always_inline __u32 addr_word(const union hdslb_addr *a, __u8 af)
{
	if (af == HDSLB_AF_INET)
		return bpf_ntohl(a->v4);
	return bpf_ntohl(a->v6[0]) ^ bpf_ntohl(a->v6[1]) ^ bpf_ntohl(a->v6[2]) ^ bpf_ntohl(a->v6[3]);
}

/* Network-order mask word i (0..3) of a prefix length. */
static __always_inline __be32 plen_mask(__u32 plen, int i)
{
	int bits = (int)plen - 32 * i;

	if (bits <= 0)
		return 0;
	if (bits >= 32)
		return 0xffffffff;
	return bpf_htonl(~0u << (32 - bits));
}

static __always_inline int dest_usable(struct dest_val *d, __u32 svc_id)
{
	return d && (d->flags & DEST_F_VALID) && !(d->flags & DEST_F_DRAIN) && d->svc_id == svc_id;
}

/* Whether a persistence template naming d is honoured, as LVS's ip_vs_check_template: a drained (weight 0) or
 * overloaded server keeps its persistent clients; one the daemon flagged DEST_F_NO_PERSIST (down, a checker's
 * weight 0, drained with expire_quiescent_template) or that is gone does not. */
static __always_inline int dest_persists(struct dest_val *d, __u32 svc_id)
{
	return d && (d->flags & DEST_F_VALID) && !(d->flags & DEST_F_NO_PERSIST) && d->svc_id == svc_id;
}

/*
 * Which real server a new flow goes to: the client's persistence template if the service has -p and the
 * template's server still takes its persistent clients (dest_persists: a drained one does); else the
 * service's table (a ring walked by a per-CPU cursor, or a hash table indexed by the flow's hash), which
 * holds only servers that take new flows. Returns 0 when nothing is available.
 */
static __always_inline struct dest_val *pick_dest(struct svc_val *sv, __u8 af, const union hdslb_addr *src,
						 __be16 sport, const union hdslb_addr *dst, __u32 *slot_out, __u64 now)
{
	__u32 svc_id = sv->svc_id;
	struct persist_key pk = {};
	struct persist_val npv = {};
	struct persist_val *pv = 0;
	struct sched_tbl *t;
	struct dest_val *d;
	__u32 slot, idx;
	int persist = sv->flags & SVC_F_PERSIST;
	__u64 ttl = (__u64)sv->persist_timeout * 1000000000ULL;
	__u64 seen = 0, cur = 0;
	int lost = 0; /* another CPU's template won: cur is its first word */

	if (persist) {
#pragma unroll
		for (int i = 0; i < 4; i++)
			pk.addr.v6[i] = src->v6[i] & plen_mask(sv->persist_plen, i);
		pk.svc_id = svc_id;
		pk.af = af;
		pv = persist_map.lookup(&pk);
		if (pv)
			seen = *(volatile __u64 *)pv; /* dest_slot and seq, for replacing it should it be stale */
		if (pv && pv->expires > now) {
			slot = pv->dest_slot;
			d = dest_map.lookup(&slot);
			if (dest_persists(d, svc_id)) {
				pv->expires = now + ttl;
				count(CNT_PERSIST_HIT);
				*slot_out = slot;
				return d;
			}
		}
	}
	t = sched_map.lookup(&svc_id);
	if (!t || t->len == 0)
		return 0;
	if (t->kind == SCHED_HASH) {
		const union hdslb_addr *a = t->key == HKEY_DST ? dst : src;
		__u32 port = t->key == HKEY_SRC_PORT ? bpf_ntohs(sport) : 0;
		__u32 cell = t->hoff + hdslb_jhash_2words(addr_word(a, af), port, t->seed) % t->len;
		__u32 *c = hash_cells.lookup(&cell);

		if (!c)
			return 0;
		slot = *c;
	} else {
		__u32 *cur = sched_cursor.lookup(&svc_id);
		__u32 g = t->gen << 16, c;

		if (!cur || t->len > SCHED_RING_MAX)
			return 0;
		/* The cursor's top half is the generation of the table it walks: a rebuilt table is walked from its
		 * start (an lc/wlc ring is a plan that begins with the least loaded servers; LVS wrr restarts its
		 * walk too), the same table goes on where it was. With SCHED_F_SPREAD (rr, wrr) each CPU starts
		 * its own share of the way in, so N CPUs' first new flows are not a burst of N to one server. */
		c = *cur;
		if ((c & 0xffff0000) != g) {
			c = g;
			if (t->flags & SCHED_F_SPREAD)
				c |= bpf_get_smp_processor_id() * t->len / HDSLB_NR_CPUS;
		}
		idx = (c & 0xffff) % t->len;
		*cur = g | (idx + 1);
		barrier_var(idx); /* keep the mask: the verifier needs the bound clang would prove and drop */
		idx &= SCHED_RING_MAX - 1;
		slot = t->slot[idx];
	}
	if (slot == DEST_SLOT_NONE)
		return 0;
	d = dest_map.lookup(&slot);
	if (!dest_usable(d, svc_id))
		return 0;
	if (persist) {
		npv.dest_slot = slot;
		npv.expires = now + ttl;
#ifdef HDSLB_TEST_PERSIST_RACE
		/* Tests only (never in the daemon's build): another CPU's connection from this client network writes
		 * its template between the lookup above and the write below, the one the test stored beforehand under
		 * svc_id + HDSLB_TEST_PERSIST_RACE: inserted where there was none, or claimed in place where this one
		 * found it stale (as the compare-and-swap below would have let the other CPU do). */
		{
			struct persist_val *rv;

			pk.svc_id += HDSLB_TEST_PERSIST_RACE; /* (no second key on the stack: it is full) */
			rv = persist_map.lookup(&pk);
			pk.svc_id -= HDSLB_TEST_PERSIST_RACE;
			if (rv && pv) {
				pv->dest_slot = rv->dest_slot;
				pv->seq = (__u32)(seen >> 32) + 1; /* (the seq of a little-endian word: tests run on x86) */
				pv->expires = rv->expires;
			} else if (rv) {
				persist_map.update(&pk, rv);
			}
		}
#endif
		if (pv) {
			/* A stale template (expired, or its server no longer keeps persistent clients), which another
			 * CPU's connection from this network may be replacing too: claimed by a compare-and-swap of its first word
			 * (dest_slot and seq) against what the lookup read. The CPU whose swap fails follows the
			 * server the winner swapped in, so the client is not split across servers (one window remains:
			 * a third connection reading the template between the winner's swap and its expiry store). */
			__u64 want;

			npv.seq = (__u32)(seen >> 32) + 1; /* seq: the word changes even when the server does not */
			__builtin_memcpy(&want, &npv, sizeof(want));
			cur = __sync_val_compare_and_swap((__u64 *)pv, seen, want);
			if (cur == seen)
				pv->expires = npv.expires;
			else
				lost = 1;
		} else {
			/* The first connection from this network: insert only if no other CPU's first connection
			 * did meanwhile (both missed the lookup and scheduled, maybe different servers). The loser
			 * follows the winner's template, so the client is not split across servers. */
			if (persist_map.insert(&pk, &npv) != 0) {
				pv = persist_map.lookup(&pk);
				if (pv) {
					cur = *(volatile __u64 *)pv;
					lost = 1;
				}
			}
		}
		if (lost) { /* its server, if a template naming it is honoured */
			__u32 won;
			struct dest_val *wd;

			__builtin_memcpy(&won, &cur, sizeof(won)); /* dest_slot: the word's first four bytes */
			wd = dest_map.lookup(&won);
			if (dest_persists(wd, svc_id)) {
				count(CNT_PERSIST_HIT);
				slot = won;
				d = wd;
			}
		}
	}
	*slot_out = slot;
	return d;
}

/* Route an IPv4 destination (DPVS route4_output): the route, and the next hop whose MAC we need. */
static __always_inline struct route_val *route4(__be32 dst, __be32 *nh)
{
	struct route4_key rk = {};
	struct route_val *rt;

	rk.prefixlen = 32;
	rk.addr = dst;
	rt = route4_map.lookup(&rk);
	if (rt)
		*nh = (rt->flags & ROUTE_F_GW) ? rt->gw.v4 : dst;
	return rt;
}

/*
 * The L2 half of a new connection's forward entry: our MAC on the egress interface and the next hop's MAC
 * (or, while the slow path runs, a note to find it later). Returns 0 or the drop counter.
 */
static __always_inline __u32 new_l2(struct xdp_md *ctx, struct conn_val *cv, __u32 oif, __be32 nh)
{
	struct iface_val *ifv = iface_map.lookup(&oif);
	struct neigh_key nk = {};
	struct neigh_val *nv;
	__u32 key;

	if (!ifv)
		return CNT_DROP_NO_IFACE;
	__builtin_memcpy(cv->smac, ifv->mac, 6);
	cv->ifindex = oif;
	nk.addr.v4 = nh;
	nk.af = HDSLB_AF_INET;
	nv = neigh_map.lookup(&nk);
	if (nv) {
		__builtin_memcpy(cv->dmac, nv->mac, 6);
		return 0;
	}
	if (ingress_xsk(ctx, &key) < 0)
		return CNT_DROP_NO_NEIGH;
	cv->flags |= CONN_F_NEED_L2;
	__builtin_memcpy(cv->dmac, &nh, 4); /* the next hop to find, until its MAC replaces it */
	return 0;
}

/* The reply entry's way back: out of the interface the client's packet came in on, to the MAC it came from. */
static __always_inline void back_l2(struct xdp_md *ctx, struct ethhdr *eth, struct conn_val *ov)
{
	ov->ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(ov->dmac, eth->h_source, 6);
	__builtin_memcpy(ov->smac, eth->h_dest, 6);
}

static __always_inline int addr_eq(const union hdslb_addr *a, const union hdslb_addr *b)
{
	return ((a->v6[0] ^ b->v6[0]) | (a->v6[1] ^ b->v6[1]) | (a->v6[2] ^ b->v6[2]) | (a->v6[3] ^ b->v6[3])) == 0;
}

/*
 * The reply key rk (real server -> local address:port) is taken. When the flow holding it has been idle past
 * its state's timeout in both directions on every CPU, it is dead: only the daemon's sweep has not removed it
 * yet (a big table is swept seldom). Remove both of its entries, as the sweep would, so the port can go to the
 * new flow now. Returns 1 when rk is free again.
 */
static __always_inline int conn_reclaim(int t4, struct fp_cfg *cfg, void *rk, __u64 now)
{
	struct conn_key *rh = rk; /* the head both key layouts share */
	struct conn_val *rv, *iv;
	struct conn_key ik = {}; /* big enough for either table's key */
	__u64 last;
	__u8 state, istate, was_est;
	int partner = 0;

	if (!(cfg->flags & CFG_F_RECLAIM))
		return 0;
	rv = conn_newest(t4, rk, &state, &was_est);
	if (!rv || !(rv->flags & CONN_F_OUT))
		return 0; /* being installed by another CPU right now, or not a reply entry */
	last = rv->last_seen;
	conn_partner_key(t4, &ik, rk, rv);
	iv = conn_newest(t4, &ik, &istate, &was_est);
	/* The inbound entry is this flow's only if it still points at rk (a client's tuple may carry a newer flow). */
	if (iv && iv->sport == rh->dport && iv->dport == rh->sport) {
		union hdslb_addr is = cv_addr(t4, iv, 0), id = cv_addr(t4, iv, 1);
		union hdslb_addr rs = ck_addr(t4, rk, 0), rd = ck_addr(t4, rk, 1);

		if (addr_eq(&is, &rd) && addr_eq(&id, &rs)) {
			partner = 1;
			/* the flow's state, as the sweep takes it: the inbound entry's, or the reply entry's once that is
			 * further and past ESTABLISHED (a reset or FIN from the server closes it as the client's would) */
			if (state <= CS_ESTABLISHED || istate > state)
				state = istate;
			if (iv->last_seen > last)
				last = iv->last_seen;
		}
	}
	if (rh->proto == IPPROTO_UDP)
		state = CS_UDP;
	/* signed: another CPU may have stamped the flow a jiffy after this SYN read the clock (alive, not 2^64 idle) */
	if ((__s64)(now - last) <= (__s64)cfg->idle_tmo[state & (IDLE_TMO_SLOTS - 1)])
		return 0;
	if (partner && conn_delete(t4, &ik) == 0)
		count(CNT_CONN_EXPIRED);
	if (conn_delete(t4, rk) == 0)
		count(CNT_CONN_EXPIRED);
	count(CNT_LPORT_RECLAIMED);
	return 1;
}

/*
 * An IPv4 reply tuple can be asked for in both tables: a plain IPv4 flow's in conn4_map, a NAT64 flow's in
 * conn6_map (the same local address may serve both kinds of service). Once a port's reply entry is in one
 * table, it is given up again if the other table holds the same tuple. Both sides insert first and check
 * after, so of two CPUs taking the same port for the two kinds at once at least one sees the other. Only
 * while IPv6 services exist (CFG_F_NAT64); returns 1 when the tuple is taken in the other table.
 */
static __always_inline int lport_taken_other(int t4, struct fp_cfg *cfg, void *ok)
{
	struct conn_key *oh = ok;

	if (!(cfg->flags & CFG_F_NAT64) || oh->af != HDSLB_AF_INET)
		return 0;
	if (t4) {
		struct conn_key wk = {};

		wk.saddr.v4 = K4(ok)->saddr.v4;
		wk.daddr.v4 = K4(ok)->daddr.v4;
		wk.sport = oh->sport;
		wk.dport = oh->dport;
		wk.proto = oh->proto;
		wk.af = HDSLB_AF_INET;
		return conn_lookup(T6, &wk) != 0;
	} else {
		struct conn4_key nk = {};

		nk.saddr.v4 = oh->saddr.v4;
		nk.daddr.v4 = oh->daddr.v4;
		nk.sport = oh->sport;
		nk.dport = oh->dport;
		nk.proto = oh->proto;
		nk.af = HDSLB_AF_INET;
		return conn_lookup(T4, &nk) != 0;
	}
}

static __always_inline int lport_claim(int t4, struct fp_cfg *cfg, void *ok, struct conn_val *ov)
{
	if (conn_insert(t4, ok, ov) != 0)
		return 0;
	if (!lport_taken_other(t4, cfg, ok))
		return 1;
	conn_delete(t4, ok);
	return 0;
}

/*
 * A local port (FNAT, SNAT) no live flow to this peer uses: try ports from this CPU's cursor; inserting the
 * reply key is itself the collision check. A port whose flow has expired but not yet been swept is taken back
 * (conn_reclaim); one try per SYN pays that cost, so a range full of live flows stays cheap to fail in.
 * Returns 0 once the reply entry is in, else the drop counter.
 */
static __always_inline __u32 alloc_lport(int t4, struct fp_cfg *cfg, __u32 *pc, void *ok, struct conn_val *ov)
{
	struct conn_key *oh = ok; /* the head both key layouts share */
	__u32 span, start, cpu;
	int reclaim_tried = 0;

	if (cfg->lport_max < cfg->lport_min)
		return CNT_DROP_LPORT_EXHAUSTED;
	span = (__u32)cfg->lport_max - cfg->lport_min + 1;
	/* Each CPU starts in its own part of the range (fewer collisions) but may use all of it. */
	cpu = bpf_get_smp_processor_id();
	start = cpu * (span / HDSLB_NR_CPUS);
#pragma unroll
	for (int i = 0; i < LPORT_TRIES; i++) {
		__u32 n = *pc;

		*pc = n + 1;
		oh->dport = bpf_htons((__u16)(cfg->lport_min + ((n + start) % span)));
		if (lport_claim(t4, cfg, ok, ov))
			return 0;
		if (!reclaim_tried) {
			reclaim_tried = 1;
			if (conn_reclaim(t4, cfg, ok, ov->last_seen) && lport_claim(t4, cfg, ok, ov))
				return 0;
		}
	}
	return CNT_DROP_LPORT_EXHAUSTED;
}

static __always_inline void conn_new_stats(__u32 svc_id, __u32 slot)
{
	struct traffic_stats *st;

	st = svc_stats.lookup(&svc_id);
	if (st)
		st->conns++;
	st = dest_stats.lookup(&slot);
	if (st)
		st->conns++;
	count(CNT_CONN_NEW);
}

/*
 * The entries of a new flow to a service, once its real server d is picked and the forward entry iv has its
 * L2 half: per forwarding mode — FNAT: a local address of the server's family and a free local port, both
 * directions; NAT: destination rewrite in, and a reply entry for the answers that route back through us; DR
 * and TUNNEL: the inbound direction only (the server answers the client itself). Family-neutral: the same
 * code serves IPv4 (t4: conn4_map's compact layout), IPv6 and NAT64 (xlat: the server's family differs from
 * the client's; both entries in conn6_map). Returns 0 with both entries installed, or the drop counter with
 * nothing left behind.
 */
static __always_inline __u32 conn_install(int t4, struct xdp_md *ctx, struct ethhdr *eth, void *k, __u32 svc_id,
					  struct fp_cfg *cfg, struct dest_val *d, __u32 slot, struct route_val *rt,
					  struct conn_val *iv, int xlat, __u8 state)
{
	struct conn_key *kh = k; /* the head both key layouts share */
	__u32 zero = 0, li, err;
	struct laddr_set *ls;
	struct conn_key ok = {}; /* big enough for either table's key and value */
	struct conn_val ov = {};
	union hdslb_addr src;
	__u64 jnow = bpf_jiffies64(); /* last_seen */
	__u32 *pc;
	int have_ok = 0;

	iv->dest_slot = slot;
	iv->svc_id = svc_id;
	iv->flags |= CONN_F_VALID | (xlat ? CONN_F_XLAT : 0);
	iv->state = state; /* the first packet is forwarded from this copy, so its state is set here */
	iv->fwd = d->fwd;
	iv->last_seen = jnow;
	cv_set(t4, iv, 1, d->addr);

	/* The reply entry (NAT, FNAT): real server -> client side, sent back the way the client's packet came. */
	ck_set(t4, &ok, 0, d->addr);
	ok.sport = d->port;
	ok.proto = kh->proto;
	ok.af = d->af;
	cv_set(t4, &ov, 0, ck_addr(t4, k, 1));
	cv_set(t4, &ov, 1, ck_addr(t4, k, 0));
	ov.sport = kh->dport;
	ov.dport = kh->sport;
	back_l2(ctx, eth, &ov);
	ov.dest_slot = slot;
	ov.svc_id = svc_id;
	ov.flags = CONN_F_VALID | CONN_F_OUT | (xlat ? CONN_F_XLAT : 0);
	ov.state = state;
	ov.fwd = d->fwd;
	ov.last_seen = jnow;

	switch (d->fwd) {
	case FWD_FNAT:
		ls = laddr_map.lookup(&svc_id);
		pc = lport_cursor.lookup(&zero);
		if (!ls || ls->n == 0 || ls->n > LADDR_MAX || !pc)
			return CNT_DROP_NO_LADDR;
		li = *pc % ls->n;
		barrier_var(li);
		li &= LADDR_MAX - 1;
		if (ls->a[li].af != d->af)
			return CNT_DROP_NO_LADDR;
		ck_set(t4, &ok, 1, ls->a[li].addr);
		err = alloc_lport(t4, cfg, pc, &ok, &ov);
		if (err)
			return err;
		have_ok = 1;
		cv_set(t4, iv, 0, ls->a[li].addr);
		iv->sport = ok.dport;
		iv->dport = d->port;
		break;
	case FWD_NAT:
		ck_set(t4, &ok, 1, ck_addr(t4, k, 0));
		ok.dport = kh->sport;
		if (conn_insert(t4, &ok, &ov) != 0)
			return CNT_DROP_CONN_INSERT;
		have_ok = 1;
		cv_set(t4, iv, 0, ck_addr(t4, k, 0));
		iv->sport = kh->sport;
		iv->dport = d->port;
		break;
	case FWD_DR:
		cv_set(t4, iv, 0, ck_addr(t4, k, 0));
		iv->sport = kh->sport;
		iv->dport = kh->dport;
		break;
	case FWD_TUNNEL:
		/* outer source: the route's src (dpip route ... src), else the service's first local address */
		src = rt->src;
		if (!(src.v6[0] | src.v6[1] | src.v6[2] | src.v6[3])) {
			ls = laddr_map.lookup(&svc_id);
			if (!ls || ls->n == 0 || ls->a[0].af != d->af)
				return CNT_DROP_NO_SRC;
			src = ls->a[0].addr;
		}
		cv_set(t4, iv, 0, src);
		iv->sport = kh->sport;
		iv->dport = kh->dport;
		break;
	default:
		return CNT_DROP_NO_DEST;
	}
	if (conn_update(t4, k, iv) != 0) {
		if (have_ok)
			conn_delete(t4, &ok);
		return CNT_DROP_CONN_INSERT;
	}
	if (!have_ok) {
		__u64 *n = conn_single.lookup(&zero);

		if (n)
			(*n)++;
	}
	conn_new_stats(svc_id, slot);
	return 0;
}

/*
 * Is the frame addressed to the MAC of the interface it came in on? Only such a frame opens a flow. Linux drops a
 * frame for another host (PACKET_OTHERHOST) before IP sees it, and LVS leaves broadcast and multicast frames to
 * the stack (ip_vs_in: "remote client: only PACKET_HOST"); DPVS drops the others' too. Here a frame flooded by a
 * switch, seen in promiscuous mode (tcpdump) or sent to the broadcast MAC opened a flow, duplicating another
 * balancer's, and its reply entry took the frame's destination as its source MAC (back_l2): the answers went out
 * from ff:ff:ff:ff:ff:ff, or from another host's MAC, teaching the switch to send that host's traffic here. Asked
 * only where a flow would open (an established packet never pays it); such a frame goes to the kernel, which
 * drops it as Linux does.
 */
static __always_inline int l2_not_ours(struct xdp_md *ctx, struct ethhdr *eth)
{
	__u32 in_if = ctx->ingress_ifindex;
	struct iface_val *ifv = iface_map.lookup(&in_if);

	return ifv && !mac_eq(eth->h_dest, ifv->mac);
}

/*
 * The first packet of a would-be flow from a source no flow can have: a martian address, its own destination
 * (a land attack: the server would answer itself) or any other address of ours (Linux's fib_validate_source
 * refuses a local source from the wire too: only a spoofer sends it), a group Ethernet source (the reply
 * entry would send to it), or TCP/UDP port 0. Asked before anything is scheduled or stored; the caller drops
 * it as drop_martian. The local-address lookup comes last: only a packet that passed the rest pays it.
 */
static __always_inline int bad_opener4(struct ethhdr *eth, struct iphdr *iph, struct conn4_key *k, int ports)
{
	return martian4(iph->saddr) || iph->saddr == iph->daddr || mac_group(eth->h_source) || (ports && !k->sport) ||
	       local_lookup4(iph->saddr);
}

static __always_inline struct local_val *local_lookup6(const __u8 *addr);

static __always_inline int bad_opener6(struct ethhdr *eth, struct conn_key *k)
{
	return martian6(k->saddr.v6) || addr_eq(&k->saddr, &k->daddr) || mac_group(eth->h_source) || !k->sport ||
	       local_lookup6(k->saddr.b);
}

/* A new flow to an IPv4 service: schedule, route to the real server, install the entries, forward. */
static __always_inline int new_conn4(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *iph,
				     struct tcphdr *th, struct udphdr *uh, struct conn4_key *k, struct svc_val *sv,
				     struct fp_cfg *cfg)
{
	struct dest_val *d;
	struct route_val *rt;
	__u32 slot = DEST_SLOT_NONE, err;
	__be32 nh = 0;
	struct conn4_val iv = {};
	union hdslb_addr src = { .v4 = k->saddr.v4 }, dst = { .v4 = k->daddr.v4 };

	d = pick_dest(sv, HDSLB_AF_INET, &src, k->sport, &dst, &slot, bpf_ktime_get_coarse_ns());
	if (!d || d->af != HDSLB_AF_INET)
		return drop(CNT_DROP_NO_DEST);
	rt = route4(d->addr.v4, &nh);
	if (!rt)
		return drop(CNT_DROP_NO_ROUTE);
	err = new_l2(ctx, CV(&iv), rt->ifindex, nh);
	if (err)
		return drop(err);
	/* TUNNEL: a first packet too big for the tunnel opens no flow (answered or dropped, as on a known flow) */
	if (d->fwd == FWD_TUNNEL) {
		int rc = tunnel4_too_big(ctx, rt->ifindex, (__u32)((long)iph - (long)ctx->data), bpf_ntohs(iph->tot_len));

		if (rc >= 0)
			return rc;
	}
	err = conn_install(T4, ctx, eth, k, sv->svc_id, cfg, d, slot, rt, CV(&iv), 0, th ? CS_SYN_RECV : CS_UDP);
	if (err)
		return drop(err);
	return xmit_conn4(ctx, eth, iph, th, uh, 0, &iv);
}

/*
 * SNAT (ipvsadm -J with -H match): an inside host's new flow to the outside leaves with a sapool address and
 * a free port (ICMP echo: identifier) as its source; the reply entry translates the answers back. The
 * service's "real servers" are the sapool addresses; 0.0.0.0 means the src of the route taken.
 */
static __always_inline int new_snat4(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *iph,
				     struct tcphdr *th, struct udphdr *uh, struct icmphdr *ic, struct conn4_key *k,
				     __u32 svc_id, struct route_val *rt, __be32 nh, struct fp_cfg *cfg)
{
	struct svc_val sv = {};
	struct dest_val *d;
	__u32 slot = DEST_SLOT_NONE, err, zero = 0;
	__u32 *pc;
	__be32 src;
	struct conn4_key ok = {};
	struct conn4_val ov = {};
	struct conn4_val iv = {};
	union hdslb_addr sa = { .v4 = k->saddr.v4 }, da = { .v4 = k->daddr.v4 };
	__u64 now = bpf_ktime_get_coarse_ns(); /* persistence templates */
	__u64 jnow = bpf_jiffies64();          /* last_seen */

	sv.svc_id = svc_id;
	sv.flags = SVC_F_VALID;
	d = pick_dest(&sv, HDSLB_AF_INET, &sa, k->sport, &da, &slot, now);
	if (!d || d->af != HDSLB_AF_INET)
		return drop(CNT_DROP_NO_DEST);
	src = d->addr.v4 ? d->addr.v4 : rt->src.v4;
	if (!src)
		return drop(CNT_DROP_NO_SRC);
	err = new_l2(ctx, CV(&iv), rt->ifindex, nh);
	if (err)
		return drop(err);
	pc = lport_cursor.lookup(&zero);
	if (!pc)
		return drop(CNT_DROP_LPORT_EXHAUSTED);

	/* Reply: outside -> sapool:port becomes outside -> inside host. */
	ok.saddr = k->daddr;
	ok.daddr.v4 = src;
	ok.sport = k->dport;
	ok.proto = k->proto;
	ok.af = HDSLB_AF_INET;
	ov.saddr = k->daddr;
	ov.daddr = k->saddr;
	ov.sport = k->dport;
	ov.dport = k->sport;
	back_l2(ctx, eth, CV(&ov));
	ov.dest_slot = slot;
	ov.svc_id = svc_id;
	ov.flags = CONN_F_VALID | CONN_F_OUT;
	ov.state = th ? CS_SYN_RECV : CS_UDP;
	ov.fwd = FWD_SNAT;
	ov.last_seen = jnow;
	err = alloc_lport(T4, cfg, pc, &ok, CV(&ov));
	if (err)
		return drop(err);

	iv.saddr.v4 = src;
	iv.daddr = k->daddr;
	iv.sport = ok.dport;
	iv.dport = k->dport;
	iv.dest_slot = slot;
	iv.svc_id = svc_id;
	iv.flags |= CONN_F_VALID;
	iv.state = ov.state;
	iv.fwd = FWD_SNAT;
	iv.last_seen = jnow;
	if (conn_update(T4, k, &iv) != 0) {
		conn_delete(T4, &ok);
		return drop(CNT_DROP_CONN_INSERT);
	}
	conn_new_stats(svc_id, slot);
	return xmit_conn4(ctx, eth, iph, th, uh, ic, &iv);
}

/* The first SNAT rule this packet matches (its service id), or -1. Only asked when SNAT services exist. */
static __always_inline int snat_match(struct xdp_md *ctx, struct iphdr *iph, __u8 proto, __u32 n, __u32 oif)
{
	__u32 hs = bpf_ntohl(iph->saddr), hd = bpf_ntohl(iph->daddr);

	for (__u32 i = 0; i < SNAT_RULES_MAX; i++) {
		struct snat_rule *r;
		__u32 key = i;

		if (i >= n)
			break;
		r = snat_map.lookup(&key);
		if (!r || !(r->flags & SNAT_F_VALID))
			continue;
		if (r->proto && r->proto != proto)
			continue;
		if ((r->src_min || r->src_max) && (hs < r->src_min || hs > r->src_max))
			continue;
		if ((r->dst_min || r->dst_max) && (hd < r->dst_min || hd > r->dst_max))
			continue;
		if (r->iif && r->iif != ctx->ingress_ifindex)
			continue;
		if (r->oif && r->oif != oif)
			continue;
		return (int)r->svc_id;
	}
	return -1;
}

/* Inside traffic that matches no connection and no VIP: SNAT it if a rule says so (*matched set, the verdict
 * returned), else leave it alone. */
static __always_inline int try_snat4(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *iph, struct tcphdr *th,
				     struct udphdr *uh, struct icmphdr *ic, struct conn4_key *k, struct fp_cfg *cfg,
				     int *matched)
{
	struct route_val *rt;
	__be32 nh = 0;
	int svc;

	/* ours, or no one's to translate (broadcast, multicast, loopback, "this network": mDNS, SSDP...) */
	if (martian4(iph->daddr) || local_lookup4(iph->daddr))
		return XDP_PASS;
	rt = route4(iph->daddr, &nh);
	if (!rt || (rt->flags & ROUTE_F_KNI))
		return XDP_PASS;
	svc = snat_match(ctx, iph, k->proto, cfg->snat_rules, rt->ifindex);
	if (svc < 0 || l2_not_ours(ctx, eth))
		return XDP_PASS;
	*matched = 1;
	/* Only a SYN opens a TCP flow; anything else without a connection is stale or forged. */
	if (th && !tcp_opens(th))
		return drop(CNT_DROP_NO_CONN);
	if (bad_opener4(eth, iph, k, k->proto != IPPROTO_ICMP))
		return drop(CNT_DROP_MARTIAN);
	return new_snat4(ctx, eth, iph, th, uh, ic, k, (__u32)svc, rt, nh, cfg);
}

/* ---- IPv6 and NAT64 ------------------------------------------------------------------------------- */

static __always_inline struct local_val *local_lookup6(const __u8 *addr)
{
	struct local_key lk = {};

	__builtin_memcpy(lk.addr.b, addr, 16);
	lk.af = HDSLB_AF_INET6;
	return local_map.lookup(&lk);
}

/* Route an IPv6 destination: the route, and the next hop whose MAC we need. */
static __always_inline struct route_val *route6(const union hdslb_addr *dst, union hdslb_addr *nh)
{
	struct route6_key rk = {};
	struct route_val *rt;

	rk.prefixlen = 128;
	__builtin_memcpy(rk.addr, dst->b, 16);
	rt = route6_map.lookup(&rk);
	if (rt)
		*nh = (rt->flags & ROUTE_F_GW) ? rt->gw : *dst;
	return rt;
}

/* new_l2 for an IPv6 next hop. v6 next hops are resolved ahead by the daemon (no slow-path queue): no MAC, no flow. */
static __always_inline __u32 new_l2_6(struct conn_val *cv, __u32 oif, const union hdslb_addr *nh)
{
	struct iface_val *ifv = iface_map.lookup(&oif);
	struct neigh_key nk = {};
	struct neigh_val *nv;

	if (!ifv)
		return CNT_DROP_NO_IFACE;
	__builtin_memcpy(cv->smac, ifv->mac, 6);
	cv->ifindex = oif;
	nk.addr = *nh;
	nk.af = HDSLB_AF_INET6;
	nv = neigh_map.lookup(&nk);
	if (!nv)
		return CNT_DROP_NO_NEIGH;
	__builtin_memcpy(cv->dmac, nv->mac, 6);
	return 0;
}

/*
 * IPv6 routers never fragment: a packet too big for the 6in6 tunnel is answered with ICMPv6 Packet Too Big
 * (RFC 4443) from the VIP to the client, quoting as much of it as fits the minimum MTU (1280 - 40 - 8 bytes),
 * like the kernel. The frame is rewritten in place and sent back the way it came.
 */
#define TOO_BIG_QUOTE6 1232
#define IPV6_MIN_MTU 1280
#define ICMPV6_PKT_TOOBIG_ 2

static __always_inline int icmp_too_big6(struct xdp_md *ctx, __u32 l2len, __u32 mtu)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6;
	__u8 *ic;
	__u8 cmac[6], lmac[6];
	struct in6_addr client, vip;
	__be32 tags[2];
	__u32 sum;
	int delta;

	if (l2len != 14 && l2len != 18 && l2len != 22)
		return drop(CNT_DROP_TOO_BIG);
	barrier_var(l2len);
	ip6 = data + (l2len & 0x3f);
	if ((void *)(eth + 1) > data_end || (void *)ip6 + TOO_BIG_QUOTE6 > data_end || error_tags(ctx, tags))
		return drop(CNT_DROP_TOO_BIG);
	__builtin_memcpy(cmac, eth->h_source, 6);
	__builtin_memcpy(lmac, eth->h_dest, 6);
	__builtin_memcpy(&client, &ip6->saddr, 16);
	__builtin_memcpy(&vip, &ip6->daddr, 16);
	if (martian6(client.in6_u.u6_addr32) || mac_group(cmac))
		return drop(CNT_DROP_MARTIAN); /* never an ICMPv6 error to a group (RFC 4443 2.4) */
	delta = (int)l2len - (int)(sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + 8);
	eth = reshape_for_error(ctx, delta, sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + 8 + TOO_BIG_QUOTE6, cmac,
				lmac, bpf_htons(ETH_P_IPV6));
	if (!eth)
		return drop(CNT_DROP_TOO_BIG);
	ip6 = (void *)(eth + 1);
	ic = (void *)(ip6 + 1);
	ip6->version = 6;
	ip6->priority = 0;
	ip6->flow_lbl[0] = ip6->flow_lbl[1] = ip6->flow_lbl[2] = 0;
	ip6->payload_len = bpf_htons(8 + TOO_BIG_QUOTE6);
	ip6->nexthdr = IPPROTO_ICMPV6;
	ip6->hop_limit = 64;
	__builtin_memcpy(&ip6->saddr, &vip, 16);
	__builtin_memcpy(&ip6->daddr, &client, 16);
	if (mtu < IPV6_MIN_MTU)
		mtu = IPV6_MIN_MTU; /* hosts ignore a smaller one (RFC 8200 5); such a tunnel link is misconfigured */
	ic[0] = ICMPV6_PKT_TOOBIG_;
	ic[1] = 0;
	ic[2] = ic[3] = 0;
	*(__be32 *)(ic + 4) = bpf_htonl(mtu);
	/* pseudo-header (addresses, upper-layer length, next header) + message, 512 bytes a csum_diff at most */
	sum = bpf_csum_diff(0, 0, (__be32 *)&ip6->saddr, 32, 0);
	sum = hcsum_add(sum, bpf_htonl(8 + TOO_BIG_QUOTE6));
	sum = hcsum_add(sum, bpf_htonl(IPPROTO_ICMPV6));
	sum = bpf_csum_diff(0, 0, (__be32 *)ic, 512, sum);
	sum = bpf_csum_diff(0, 0, (__be32 *)(ic + 512), 512, sum);
	sum = bpf_csum_diff(0, 0, (__be32 *)(ic + 1024), 8 + TOO_BIG_QUOTE6 - 1024, sum);
	*(__sum16 *)(ic + 2) = hcsum_fold32(sum) ^ 0xffff;
	if (retag_error(ctx, l2len, tags))
		return drop(CNT_DROP_TOO_BIG);
	count(CNT_ICMP_TOO_BIG);
	return XDP_TX;
}

/* tunnel4_too_big for 6in6: IPv6 is never fragmented on the way, so a packet that does not fit is always
 * answered with Packet Too Big (or dropped when it cannot be quoted). -1: it fits. */
static __always_inline int tunnel6_too_big(struct xdp_md *ctx, __u32 oif, __u32 l2len, __u32 l3len)
{
	struct iface_val *ov = iface_map.lookup(&oif);

	if (!ov || ov->mtu <= sizeof(struct ipv6hdr) || l3len + sizeof(struct ipv6hdr) <= ov->mtu)
		return -1;
	return icmp_too_big6(ctx, l2len, ov->mtu - sizeof(struct ipv6hdr));
}

/* TUNNEL for IPv6: IPv6-in-IPv6 (next header 41) to the real server; the inner bytes never move. The MTU was
 * checked before (tunnel6_too_big); bytes after the inner datagram are cut (trim_to_datagram). */
static __always_inline int encap6(struct xdp_md *ctx, struct conn_val *cv, __u32 l2len, __u32 l3len)
{
	void *data, *data_end;
	struct ethhdr *eth;
	struct ipv6hdr *outer, *inner;
	int delta;

	if (l2len != 14 && l2len != 18 && l2len != 22)
		return drop(CNT_DROP_MALFORMED_ETH);
	if (trim_to_datagram(ctx, l2len, l3len))
		return drop(CNT_DROP_MALFORMED_IP);
	delta = (int)l2len - (int)(sizeof(struct ethhdr) + sizeof(struct ipv6hdr));
	if (bpf_xdp_adjust_head(ctx, delta))
		return drop(CNT_DROP_TOO_BIG);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	outer = (void *)(eth + 1);
	inner = (void *)(outer + 1);
	if ((void *)(inner + 1) > data_end)
		return drop(CNT_DROP_MALFORMED_IP);
	__builtin_memcpy(outer, inner, 4); /* version, traffic class, flow label of the inner packet */
	outer->payload_len = bpf_htons(l3len);
	outer->nexthdr = IPPROTO_IPV6;
	outer->hop_limit = 64;
	__builtin_memcpy(&outer->saddr, cv->saddr.b, 16);
	__builtin_memcpy(&outer->daddr, cv->daddr.b, 16);
	eth->h_proto = bpf_htons(ETH_P_IPV6);
	return send_l2(ctx, eth, cv);
}

/* A packet of a known IPv6 connection (same family out): FNAT/NAT rewrite, DR L2 only, TUNNEL 6in6. */
static __always_inline int xmit_conn6(struct xdp_md *ctx, struct ethhdr *eth, struct ipv6hdr *ip6,
				      struct tcphdr *th, struct udphdr *uh, struct conn_val *cv)
{
	__u32 l3len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	__u32 l2len = (__u32)((long)ip6 - (long)ctx->data);
	int rc;

	if (cv->fwd == FWD_TUNNEL && (rc = tunnel6_too_big(ctx, cv->ifindex, l2len, l3len)) >= 0)
		return rc;
	conn_touch(cv, th);
	account(cv, l3len);
	if (cv->fwd == FWD_TUNNEL)
		return encap6(ctx, cv, l2len, l3len);
	if (cv->fwd != FWD_DR) {
		/* the addresses' change once (at most 8 x 4 x 0xffff: no overflow), then each checksum once */
		__u32 da = hcsum_delta16(ip6->saddr.in6_u.u6_addr32, cv->saddr.v6) +
			   hcsum_delta16(ip6->daddr.in6_u.u6_addr32, cv->daddr.v6);

		l4_rewrite(th, uh, da, cv->sport, cv->dport, 0);
		__builtin_memcpy(&ip6->saddr, cv->saddr.b, 16);
		__builtin_memcpy(&ip6->daddr, cv->daddr.b, 16);
	}
	return send_l2(ctx, eth, cv);
}

/*
 * NAT64, client side in: a v6 packet of a translated connection leaves as IPv4 (RFC 7915 header
 * translation, no options, DF set). L4 checksums change only by the addresses and ports: the pseudo-header's
 * length and protocol sum the same in both families, and an IPv4 address is its 16-byte form's only non-zero word.
 */
static __always_inline int xlat64(struct xdp_md *ctx, struct ipv6hdr *ip6, struct tcphdr *th, struct udphdr *uh,
				  struct conn_val *cv)
{
	void *data, *data_end;
	struct ethhdr *eth;
	struct iphdr *iph;
	__u32 l2len = (__u32)((long)ip6 - (long)ctx->data);
	__u16 plen = bpf_ntohs(ip6->payload_len);
	__u8 proto = ip6->nexthdr, ttl = ip6->hop_limit;
	__u8 tos = (__u8)((bpf_ntohl(*(__be32 *)ip6) >> 20) & 0xff);
	int punt = 0, delta;

	if (cv->flags & CONN_F_NEED_L2)
		punt = conn_fill_l2(cv);
	conn_touch(cv, th);
	account(cv, sizeof(*ip6) + plen);
	l4_rewrite(th, uh, hcsum_delta16(ip6->saddr.in6_u.u6_addr32, cv->saddr.v6) +
			   hcsum_delta16(ip6->daddr.in6_u.u6_addr32, cv->daddr.v6),
		   cv->sport, cv->dport, 0);
	if (l2len != 14 && l2len != 18 && l2len != 22)
		return drop(CNT_DROP_MALFORMED_ETH);
	delta = (int)l2len + (int)sizeof(struct ipv6hdr) - (int)(sizeof(struct ethhdr) + sizeof(struct iphdr));
	if (bpf_xdp_adjust_head(ctx, delta))
		return drop(CNT_DROP_MALFORMED_IP);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	iph = (void *)(eth + 1);
	if ((void *)(iph + 1) > data_end)
		return drop(CNT_DROP_MALFORMED_IP);
	iph->version = 4;
	iph->ihl = 5;
	iph->tos = tos;
	iph->tot_len = bpf_htons(plen + sizeof(struct iphdr));
	iph->id = 0;
	iph->frag_off = bpf_htons(0x4000);
	iph->ttl = ttl;
	iph->protocol = proto;
	iph->check = 0;
	iph->saddr = cv->saddr.v4;
	iph->daddr = cv->daddr.v4;
	iph->check = ip4_csum_full(iph);
	eth->h_proto = bpf_htons(ETH_P_IP);
	if (punt) {
		/* the slow path knows these by a zero destination MAC (the entry has none yet) and our source */
		__builtin_memset(eth->h_dest, 0, 6);
		__builtin_memcpy(eth->h_source, cv->smac, 6);
		return punt_no_neigh(ctx);
	}
	return send_l2(ctx, eth, cv);
}

/* NAT64, real server's reply: the v4 packet leaves as IPv6 to the client. A UDP reply without a checksum
 * (legal in v4, not in v6) is dropped and counted rather than sent invalid. */
static __always_inline int xlat46(struct xdp_md *ctx, struct iphdr *iph, struct tcphdr *th, struct udphdr *uh,
				  struct conn_val *cv)
{
	void *data, *data_end;
	struct ethhdr *eth;
	struct ipv6hdr *ip6;
	__u32 l2len = (__u32)((long)iph - (long)ctx->data);
	__u32 ihl = iph->ihl * 4;
	__u16 tot = bpf_ntohs(iph->tot_len);
	__u8 proto = iph->protocol, ttl = iph->ttl, tos = iph->tos;
	__be32 old[4] = {};
	int delta;

	if (uh && uh->check == 0)
		return drop(CNT_DROP_MALFORMED_L4);
	if (tot < ihl)
		return drop(CNT_DROP_MALFORMED_IP);
	{
		/* The datagram grows by the IPv6 header less its own (RFC 7915): one that would no longer fit the
		 * egress MTU is answered as a router would (DF: fragmentation needed, with the MTU less 20, from the
		 * address it was sent to) or dropped (drop_too_big), before anything is counted or tracked. */
		__u32 oif = cv->ifindex, grown = (__u32)(tot - ihl) + sizeof(struct ipv6hdr);
		/* up to 1280 bytes fits any IPv6 link (RFC 8200): most replies never look the MTU up */
		struct iface_val *ov = grown > 1280 ? iface_map.lookup(&oif) : 0;

		if (ov && ov->mtu > sizeof(struct ipv6hdr) && grown > ov->mtu) {
			if (iph->frag_off & bpf_htons(0x4000))
				return icmp_too_big4(ctx, l2len,
						     ov->mtu - (sizeof(struct ipv6hdr) - sizeof(struct iphdr)), ihl != 20);
			return drop(CNT_DROP_TOO_BIG);
		}
	}
	conn_touch(cv, th);
	account(cv, tot);
	{
		__be32 old_d[4] = {};

		old[0] = iph->saddr;
		old_d[0] = iph->daddr;
		l4_rewrite(th, uh, hcsum_delta16(old, cv->saddr.v6) + hcsum_delta16(old_d, cv->daddr.v6),
			   cv->sport, cv->dport, 0);
	}
	if (l2len != 14 && l2len != 18 && l2len != 22)
		return drop(CNT_DROP_MALFORMED_ETH);
	delta = (int)(l2len + ihl) - (int)(sizeof(struct ethhdr) + sizeof(struct ipv6hdr));
	if (bpf_xdp_adjust_head(ctx, delta))
		return drop(CNT_DROP_TOO_BIG);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	ip6 = (void *)(eth + 1);
	if ((void *)(ip6 + 1) > data_end)
		return drop(CNT_DROP_MALFORMED_IP);
	*(__be32 *)ip6 = bpf_htonl((6u << 28) | ((__u32)tos << 20));
	ip6->payload_len = bpf_htons(tot - ihl);
	ip6->nexthdr = proto;
	ip6->hop_limit = ttl;
	__builtin_memcpy(&ip6->saddr, cv->saddr.b, 16);
	__builtin_memcpy(&ip6->daddr, cv->daddr.b, 16);
	eth->h_proto = bpf_htons(ETH_P_IPV6);
	return send_l2(ctx, eth, cv);
}

/*
 * A new flow to an IPv6 service. Same modes as IPv4 (FNAT with v6 local addresses, NAT, DR, TUNNEL as 6in6),
 * plus NAT64: an FNAT real server that is IPv4 gets a v4 local address and both entries say XLAT.
 */
static __always_inline int new_conn6(struct xdp_md *ctx, struct ethhdr *eth, struct ipv6hdr *ip6,
				     struct tcphdr *th, struct udphdr *uh, struct conn_key *k, struct svc_val *sv,
				     struct fp_cfg *cfg)
{
	struct dest_val *d;
	struct route_val *rt;
	__u32 slot = DEST_SLOT_NONE, err;
	union hdslb_addr nh = {};
	struct conn_val iv = {};
	int x64;

	d = pick_dest(sv, HDSLB_AF_INET6, &k->saddr, k->sport, &k->daddr, &slot, bpf_ktime_get_coarse_ns());
	if (!d)
		return drop(CNT_DROP_NO_DEST);
	x64 = d->af == HDSLB_AF_INET;
	if (x64 && d->fwd != FWD_FNAT)
		return drop(CNT_DROP_NO_DEST); /* only FNAT translates families */
	if (x64) {
		rt = route4(d->addr.v4, &nh.v4);
		if (!rt)
			return drop(CNT_DROP_NO_ROUTE);
		err = new_l2(ctx, &iv, rt->ifindex, nh.v4);
	} else {
		rt = route6(&d->addr, &nh);
		if (!rt)
			return drop(CNT_DROP_NO_ROUTE);
		err = new_l2_6(&iv, rt->ifindex, &nh);
		if (!err && d->fwd == FWD_TUNNEL) {
			int rc = tunnel6_too_big(ctx, rt->ifindex, (__u32)((long)ip6 - (long)ctx->data),
						 sizeof(*ip6) + bpf_ntohs(ip6->payload_len));

			if (rc >= 0)
				return rc; /* a first packet too big for the tunnel opens no flow */
		}
	}
	if (!err)
		err = conn_install(T6, ctx, eth, k, sv->svc_id, cfg, d, slot, rt, &iv, x64, th ? CS_SYN_RECV : CS_UDP);
	if (err)
		return drop(err);
	if (x64)
		return xlat64(ctx, ip6, th, uh, &iv);
	return xmit_conn6(ctx, eth, ip6, th, uh, &iv);
}

/*
 * NAT (masquerade): an ICMP error about a packet we forwarded to a real server (client:cport -> RS:port), sent by
 * the server or a router past us, is addressed to the client and routed back through us, never to an address of
 * ours (FNAT's errors go to the local address and are punted as such). Like LVS (ip_vs_out_icmp) it must reach
 * the client translated (from the VIP, quoting client:cport -> VIP:vport), which the slow path does. Does the
 * error at q (the quoted IPv4 header, inside the frame up to data_end and the datagram up to end) quote a TCP or
 * UDP packet of a NAT flow, i.e. is the quoted packet's reverse (RS:port -> client:cport) a NAT reply entry?
 * SNAT is the same seen from the other side: an inside host's error about a reply we translated for it (outside
 * server:port -> host:hport) is addressed to the outside server and must leave from the sapool address, quoting
 * server:port -> sapool:port, as netfilter's NAT does for related ICMP; the quote's reverse is then the flow's
 * forward (inside -> outside) SNAT entry. Only ICMP errors not to us ask this: the established path never pays.
 */
static __always_inline int icmp_quotes_nat4(struct iphdr *q, void *data_end, void *end)
{
	struct conn4_key qk = {};
	struct conn_val *cv;
	__be16 *ports;
	__u32 qlen;

	if ((void *)(q + 1) > data_end || (void *)(q + 1) > end)
		return 0;
	if (q->version != 4 || q->ihl < 5 || (q->protocol != IPPROTO_TCP && q->protocol != IPPROTO_UDP) ||
	    (q->frag_off & bpf_htons(0x1fff)))
		return 0; /* a later fragment quotes no ports */
	qlen = q->ihl * 4;
	barrier_var(qlen); /* keep the mask: a bounded offset for the verifier (ihl is 5..15) */
	ports = (void *)q + (qlen & 0x3f);
	if ((void *)(ports + 2) > data_end || (void *)(ports + 2) > end)
		return 0;
	qk.saddr.v4 = q->daddr;
	qk.daddr.v4 = q->saddr;
	qk.sport = ports[1];
	qk.dport = ports[0];
	qk.proto = q->protocol;
	qk.af = HDSLB_AF_INET;
	cv = conn_find(T4, &qk);
	if (!cv)
		return 0;
	return (cv->flags & CONN_F_OUT) ? cv->fwd == FWD_NAT : cv->fwd == FWD_SNAT;
}

/* icmp_quotes_nat4 for IPv6 NAT: does the ICMPv6 error quoting the IPv6 header at q quote a TCP or UDP packet of a
 * NAT flow (the quote's reverse, RS:port -> client:cport, a NAT reply entry)? IPv6 routers never fragment, so a
 * smaller MTU on the servers' side was a path-MTU black hole for what clients send a NAT v6 service. Only errors
 * not to us ask this. */
static __always_inline int icmp_quotes_nat6(struct ipv6hdr *q, void *data_end, void *end)
{
	struct conn_key qk = {};
	struct conn_val *cv;
	__be16 *ports;

	if ((void *)(q + 1) > data_end || (void *)(q + 1) > end)
		return 0;
	if (q->nexthdr != IPPROTO_TCP && q->nexthdr != IPPROTO_UDP)
		return 0;
	ports = (void *)(q + 1);
	if ((void *)(ports + 2) > data_end || (void *)(ports + 2) > end)
		return 0;
	__builtin_memcpy(qk.saddr.b, q->daddr.in6_u.u6_addr8, 16);
	__builtin_memcpy(qk.daddr.b, q->saddr.in6_u.u6_addr8, 16);
	qk.sport = ports[1];
	qk.dport = ports[0];
	qk.proto = q->nexthdr;
	qk.af = HDSLB_AF_INET6;
	cv = conn_find(T6, &qk);
	return cv && (cv->flags & CONN_F_OUT) && cv->fwd == FWD_NAT;
}

/*
 * Echo requests to an owned address answered here while no slow path serves the interface (a daemon restarting or
 * killed, --no-slowpath), as handle_arp and nd_answer answer ARP and solicitations: the kernel does not hold our
 * addresses, so a VIP stopped answering ping for the whole restart, and never did with --no-slowpath (DPVS and
 * Linux answer it). Rewritten in place and sent back (XDP_TX): addresses and MACs swapped, TTL / hop limit 64
 * (DPVS's default_ttl), the type made a reply; both checksums updated incrementally (a request with a bad ICMP
 * checksum gets a reply with a bad one, which its sender discards). Not for a martian or own source, an IPv4
 * header with options or a fragment (left to the kernel, as before). The slow path, when it runs, answers instead.
 */
#define ECHO_TTL 64

static __always_inline int echo_answer4(struct ethhdr *eth, struct iphdr *iph, struct icmphdr *ic,
					struct iface_val *ifv)
{
	__be32 a = iph->saddr;
	__be16 old = *(__be16 *)&iph->ttl; /* ttl and protocol: one 16-bit word of the header checksum */

	iph->saddr = iph->daddr;
	iph->daddr = a;
	iph->ttl = ECHO_TTL;
	hcsum_replace2(&iph->check, old, *(__be16 *)&iph->ttl);
	hcsum_replace2(&ic->checksum, bpf_htons(ICMP_ECHO << 8), bpf_htons(ICMP_ECHOREPLY << 8));
	ic->type = ICMP_ECHOREPLY;
	__builtin_memcpy(eth->h_dest, eth->h_source, 6);
	__builtin_memcpy(eth->h_source, ifv->mac, 6);
	count(CNT_ECHO_REPLY);
	return XDP_TX;
}

/* echo_answer4 for ICMPv6 (128 -> 129): swapping the addresses leaves the pseudo-header's sum as it was. */
static __always_inline int echo_answer6(struct ethhdr *eth, struct ipv6hdr *ip6, __u8 *icmp, struct iface_val *ifv)
{
	struct in6_addr a = ip6->saddr;

	ip6->saddr = ip6->daddr;
	ip6->daddr = a;
	ip6->hop_limit = ECHO_TTL;
	hcsum_replace2((__sum16 *)(icmp + 2), bpf_htons(128 << 8), bpf_htons(129 << 8));
	icmp[0] = 129;
	__builtin_memcpy(eth->h_dest, eth->h_source, 6);
	__builtin_memcpy(eth->h_source, ifv->mac, 6);
	count(CNT_ECHO_REPLY);
	return XDP_TX;
}

static __always_inline int handle_ipv4(struct xdp_md *ctx, struct hdr_cursor *nh, void *data_end, struct ethhdr *eth)
{
	struct iphdr *iph;
	struct tcphdr *th = 0;
	struct udphdr *uh = 0;
	struct icmphdr *ic = 0;
	struct conn4_key k = {};
	struct svc_key sk = {};
	struct conn4_val *cv;
	struct svc_val *sv;
	struct fp_cfg *cfg;
	__u32 zero = 0;
	int proto, rc, matched = 0;

	proto = parse_iphdr(nh, data_end, &iph);
	if (proto < 0)
		return drop(CNT_DROP_MALFORMED_IP);
	k.saddr.v4 = iph->saddr;
	k.daddr.v4 = iph->daddr;
	k.proto = proto;
	k.af = HDSLB_AF_INET;
	if (proto == IPPROTO_ICMP) {
		__u32 in_if = ctx->ingress_ifindex;
		struct iface_val *inv;
		int frag = iph->frag_off & bpf_htons(0x3fff);

		ic = nh->pos;
		if ((void *)(ic + 1) > data_end || (void *)(ic + 1) > nh->end) {
			/* a datagram too short for the 8-byte ICMP header is malformed; fragments stay the kernel's */
			if (!frag)
				return drop(CNT_DROP_MALFORMED_L4);
			goto not_balanced;
		}
		/* Echo of a SNAT flow: the identifier is the port (request: sport, reply: dport). */
		if (!frag && (ic->type == ICMP_ECHO || ic->type == ICMP_ECHOREPLY)) {
			if (ic->type == ICMP_ECHO)
				k.sport = ic->un.echo.id;
			else
				k.dport = ic->un.echo.id;
			cv = (struct conn4_val *)conn_find(T4, &k);
			if (cv)
				return xmit_conn4(ctx, eth, iph, 0, 0, ic, cv);
		}
		/* ICMP to our addresses is the slow path's (when it runs): echo requests are answered there;
		 * errors quoting a balanced flow are translated for its client. So are errors to a NAT flow's
		 * client about a packet we sent its real server (icmp_quotes_nat4). */
		if ((ic->type == ICMP_ECHO || ic->type == ICMP_DEST_UNREACH || ic->type == ICMP_TIME_EXCEEDED) &&
		    !frag && (local_lookup4(iph->daddr) ||
			      (ic->type != ICMP_ECHO && icmp_quotes_nat4((struct iphdr *)(ic + 1), data_end, nh->end))) &&
		    (inv = iface_map.lookup(&in_if))) {
			__u32 key = xsk_key(ctx, inv);

			if (slowpath_up(key)) {
				if (!punt_allowed(PUNT_ICMP))
					return drop(CNT_DROP_ICMP_RATELIMIT);
				count(CNT_PUNT_ICMP);
				return xsks.redirect_map(key, XDP_PASS);
			}
			/* no slow path: an echo request to an owned address is answered here (echo_answer4) */
			if (ic->type == ICMP_ECHO && ic->code == 0 && iph->ihl == 5 && !martian4(iph->saddr) &&
			    !mac_group(eth->h_source) && local_lookup4(iph->daddr) && !local_lookup4(iph->saddr))
				return echo_answer4(eth, iph, ic, inv);
		}
		if (!frag && ic->type == ICMP_ECHO) {
			cfg = cfg_map.lookup(&zero);
			if (cfg && cfg->snat_rules) {
				rc = try_snat4(ctx, eth, iph, 0, 0, ic, &k, cfg, &matched);
				if (matched)
					return rc;
			}
		}
		goto not_balanced;
	}
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		goto not_balanced;
	/* Fragments carry no (or a partial) L4 header: never balance them; ours are dropped and counted. */
	if (iph->frag_off & bpf_htons(0x3fff)) {
		if (local_lookup4(iph->daddr))
			return drop(CNT_DROP_FRAGMENT);
		goto not_balanced;
	}
	if (proto == IPPROTO_TCP) {
		if (parse_tcphdr(nh, data_end, &th) < 0)
			return drop(CNT_DROP_MALFORMED_L4);
		k.sport = th->source;
		k.dport = th->dest;
	} else {
		if (parse_udphdr(nh, data_end, &uh) < 0)
			return drop(CNT_DROP_MALFORMED_L4);
		k.sport = uh->source;
		k.dport = uh->dest;
	}

	cv = (struct conn4_val *)conn_find(T4, &k);
	if (cv && conn_reusable(T4, &k, CV(cv), th)) {
		conn_expire(T4, &k, CV(cv));
		cv = 0;
	}
	if (cv) {
		if (th && th->syn)
			conn_restart(T4, &k, CV(cv), th);
		return xmit_conn4(ctx, eth, iph, th, uh, 0, cv);
	}

	/* No connection: read the runtime settings once (established packets never do). */
	cfg = cfg_map.lookup(&zero);
	if (!cfg)
		goto not_balanced;
	/* A NAT64 flow's reply: an IPv4 key in conn6_map (looked for only while IPv6 services exist). */
	if (cfg->flags & CFG_F_NAT64) {
		struct conn_key wk = {};
		struct conn_val *wv;

		wk.saddr.v4 = k.saddr.v4;
		wk.daddr.v4 = k.daddr.v4;
		wk.sport = k.sport;
		wk.dport = k.dport;
		wk.proto = k.proto;
		wk.af = HDSLB_AF_INET;
		wv = conn_find(T6, &wk);
		if (wv && (wv->flags & CONN_F_XLAT)) {
			if (th && th->syn)
				conn_restart(T6, &wk, wv, th);
			return xlat46(ctx, iph, th, uh, wv);
		}
	}
	/* DPVS `scope kni_host` routes: such destinations belong to the kernel, even a VIP's; the trie is
	 * consulted only while such a route exists. */
	if (cfg->flags & CFG_F_KNI_ROUTES) {
		struct route4_key rk = { .prefixlen = 32, .addr = iph->daddr };
		struct route_val *rt = route4_map.lookup(&rk);

		if (rt && (rt->flags & ROUTE_F_KNI)) {
			count(CNT_PASS_KNI);
			return XDP_PASS;
		}
	}

	sk.addr.v4 = iph->daddr;
	sk.port = k.dport;
	sk.proto = proto;
	sk.af = HDSLB_AF_INET;
	sv = svc_map.lookup(&sk);
	if (!sv) {
		if (cfg->snat_rules) {
			rc = try_snat4(ctx, eth, iph, th, uh, 0, &k, cfg, &matched);
			if (matched)
				return rc;
		}
		goto not_balanced;
	}
	if (l2_not_ours(ctx, eth)) {
		count(CNT_PASS_NOT_OURS);
		return XDP_PASS;
	}
	/* Only a SYN opens a TCP flow; anything else without a connection is stale or forged. */
	if (th && !tcp_opens(th))
		return drop(CNT_DROP_NO_CONN);
	if (bad_opener4(eth, iph, &k, 1))
		return drop(CNT_DROP_MARTIAN);
	return new_conn4(ctx, eth, iph, th, uh, &k, sv, cfg);

not_balanced:
	count(local_lookup4(k.daddr.v4) ? CNT_PASS_LOCAL : CNT_PASS_NOT_OURS);
	return XDP_PASS;
}

/* ICMPv6 types the slow path answers for owned addresses. */
#define ICMPV6_DEST_UNREACH_ 1
#define ICMPV6_TIME_EXCEED_ 3
#define ICMPV6_ECHO_REQUEST_ 128
#define ICMPV6_NS_ 135
#define ICMPV6_NA_ 136

/* IPv6 extension headers (RFC 8200 4, IANA's list) other than ESP and AH, which end our parsing like a transport. */
static __always_inline int ipv6_exthdr(__u8 nh)
{
	return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_FRAGMENT || nh == IPPROTO_DSTOPTS ||
	       nh == 135 /* Mobility */ || nh == 139 /* HIP */ || nh == 140 /* Shim6 */ || nh == 253 || nh == 254;
}

/* IPv6 neighbour discovery (RFC 4861) answered in XDP while no slow path runs. */
#define ND_HOP_LIMIT 255
#define ND_OPT_SLLA 1      /* source link-layer address option */
#define ND_OPT_TLLA 2      /* target link-layer address option */
#define NA_F_SOLICITED 0x40
#define NA_F_OVERRIDE 0x20
#define ND_NS_MAX 128      /* the longest solicitation answered here: 24 bytes and up to 13 option units */
#define ND_NA_LEN 32       /* the advertisement: 24 bytes and the target link-layer address option */

/*
 * The fallback of the slow path's neighbour solicitation handling (dispatch._ns, and hdslbd's answer_ns with
 * --no-slowpath), as handle_arp's is of its ARP: while no slow-path socket serves the interface (a daemon
 * restarting or killed), a solicitation for an address owned here gets its advertisement from XDP, since the
 * kernel does not hold our addresses and would leave it unanswered: an IPv6 VIP would go unreachable as soon as
 * its clients' neighbour entries expired. Answered only when valid (RFC 4861 7.1.1): hop limit 255, code 0, a
 * correct checksum, at least 24 bytes and whole options (none of length 0), no multicast source; a DAD probe
 * (from ::) to a multicast group and without a source link-layer option. A solicitation is answered to its
 * sender (at its source link-layer address, else its Ethernet source) with Solicited and Override; a DAD probe to
 * all nodes with Override only, defending the address as the slow path does (and as ARP probes are answered).
 * Rewritten in place, the frame cut or grown to the advertisement (VLAN tags kept), and sent back (XDP_TX).
 * Returns the verdict, or -1 when it is not answered (the frame untouched: for the kernel, which discards it).
 */
static __always_inline int nd_answer(struct xdp_md *ctx, struct ipv6hdr *ip6, struct iface_val *ifv)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *icmp = (__u8 *)(ip6 + 1);
	__u32 plen = bpf_ntohs(ip6->payload_len);
	__u32 l2len = (__u32)((void *)ip6 - data);
	__u32 next = 24, sum, len, want;
	__u8 dmac[6];
	struct ethhdr *eth = data;
	int slla = 0, dad;

	if (l2len != 14 && l2len != 18 && l2len != 22)
		return -1;
	if ((void *)(eth + 1) > data_end || (void *)(icmp + 24) > data_end)
		return -1;
	if (ip6->hop_limit != ND_HOP_LIMIT || icmp[1] != 0 || plen < 24 || plen > ND_NS_MAX || (plen & 7))
		return -1;
	sum = bpf_csum_diff(0, 0, (__be32 *)&ip6->saddr, 32, 0); /* both addresses */
	sum = bpf_csum_diff(0, 0, (__be32 *)icmp, 24, sum);
#pragma unroll
	for (int i = 3; i < ND_NS_MAX / 8; i++) {
		__u8 *opt = icmp + i * 8;

		if (i * 8 >= plen)
			break;
		if ((void *)(opt + 8) > data_end)
			return -1;
		sum = bpf_csum_diff(0, 0, (__be32 *)opt, 8, sum);
		if (i * 8 == next) { /* an option starts here */
			if (!opt[1])
				return -1;
			next += opt[1] * 8;
			if (opt[0] == ND_OPT_SLLA && opt[1] == 1) {
				__builtin_memcpy(dmac, opt + 2, 6);
				slla = 1;
			}
		}
	}
	if (next != plen) /* the last option runs past the message */
		return -1;
	sum = hcsum_add(sum, bpf_htonl(plen));
	sum = hcsum_add(sum, bpf_htonl(IPPROTO_ICMPV6));
	if (hcsum_fold32(sum) != 0xffff)
		return -1;
	dad = !(ip6->saddr.in6_u.u6_addr32[0] | ip6->saddr.in6_u.u6_addr32[1] | ip6->saddr.in6_u.u6_addr32[2] |
		ip6->saddr.in6_u.u6_addr32[3]);
	if (dad) {
		if (slla || ip6->daddr.in6_u.u6_addr8[0] != 0xff)
			return -1;
		dmac[0] = dmac[1] = 0x33; /* ff02::1's */
		dmac[2] = dmac[3] = dmac[4] = 0;
		dmac[5] = 1;
	} else {
		if (ip6->saddr.in6_u.u6_addr8[0] == 0xff)
			return -1;
		if (!slla)
			__builtin_memcpy(dmac, eth->h_source, 6);
		if (mac_group(dmac))
			return -1;
	}

	/* The addresses are written from the frame itself: growing or cutting the tail moves neither the IPv6
	 * header nor the first 24 bytes of the message, the target among them. */
	len = (__u32)((long)data_end - (long)data);
	want = l2len + sizeof(struct ipv6hdr) + ND_NA_LEN;
	barrier_var(len);
	if (len != want && bpf_xdp_adjust_tail(ctx, (int)want - (int)len))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	barrier_var(l2len); /* keep the bound for the verifier */
	eth = data;
	ip6 = data + (l2len & 0x3f);
	icmp = (__u8 *)(ip6 + 1);
	if ((void *)(eth + 1) > data_end || (void *)(icmp + ND_NA_LEN) > data_end)
		return drop(CNT_DROP_MALFORMED_L4); /* cannot happen: the frame was just made that long */
	__builtin_memcpy(eth->h_dest, dmac, 6);
	__builtin_memcpy(eth->h_source, ifv->mac, 6);
	*(__be32 *)ip6 = bpf_htonl(0x60000000); /* version 6, traffic class and flow label 0 */
	ip6->payload_len = bpf_htons(ND_NA_LEN);
	ip6->nexthdr = IPPROTO_ICMPV6;
	ip6->hop_limit = ND_HOP_LIMIT;
	if (dad) { /* to all nodes, ff02::1 */
		ip6->daddr.in6_u.u6_addr32[0] = bpf_htonl(0xff020000);
		ip6->daddr.in6_u.u6_addr32[1] = 0;
		ip6->daddr.in6_u.u6_addr32[2] = 0;
		ip6->daddr.in6_u.u6_addr32[3] = bpf_htonl(1);
	} else { /* back to the sender */
		__builtin_memcpy(ip6->daddr.in6_u.u6_addr8, ip6->saddr.in6_u.u6_addr8, 16);
	}
	__builtin_memcpy(ip6->saddr.in6_u.u6_addr8, icmp + 8, 16); /* from the target */
	icmp[0] = ICMPV6_NA_;
	icmp[1] = 0;
	icmp[2] = icmp[3] = 0; /* the checksum, below */
	icmp[4] = dad ? NA_F_OVERRIDE : NA_F_SOLICITED | NA_F_OVERRIDE; /* not a router */
	icmp[5] = icmp[6] = icmp[7] = 0;
	icmp[24] = ND_OPT_TLLA;
	icmp[25] = 1;
	__builtin_memcpy(icmp + 26, ifv->mac, 6);
	sum = bpf_csum_diff(0, 0, (__be32 *)&ip6->saddr, 32, 0);
	sum = bpf_csum_diff(0, 0, (__be32 *)icmp, ND_NA_LEN, sum);
	sum = hcsum_add(sum, bpf_htonl(ND_NA_LEN));
	sum = hcsum_add(sum, bpf_htonl(IPPROTO_ICMPV6));
	*(__sum16 *)(icmp + 2) = ~hcsum_fold32(sum);
	count(CNT_ND_REPLY);
	return XDP_TX;
}

/*
 * A neighbour we send to, announcing another MAC in a Neighbor Advertisement that is not addressed to us: the
 * unsolicited one to all nodes a host sends when its link-layer address changes (RFC 4861 7.2.6: a real server's
 * NIC replaced, a failover). The slow path takes it, as handle_arp hands it a gratuitous ARP, and follows it as
 * Linux does (an existing entry takes the new MAC when the Override flag says so); passed to the kernel, flows to
 * that server kept going to the old MAC until the entry's timeout and re-probes. Only for a learned entry on this
 * interface whose MAC differs from the advertisement's target link-layer option (its first option, as senders
 * write it); a stranger's advertisement stays the kernel's.
 */
static __always_inline int na_moved(const __u8 *icmp, void *data_end, void *end, __u32 ifindex)
{
	struct neigh_key nk = {};
	struct neigh_val *nv;

	if ((void *)(icmp + 32) > data_end || (void *)(icmp + 32) > end)
		return 0;
	if (icmp[24] != ND_OPT_TLLA || icmp[25] != 1)
		return 0;
	__builtin_memcpy(nk.addr.b, icmp + 8, 16);
	nk.af = HDSLB_AF_INET6;
	nv = neigh_map.lookup(&nk);
	return nv && !(nv->flags & NEIGH_F_PERMANENT) && nv->ifindex == ifindex && !mac_eq(nv->mac, icmp + 26);
}

/*
 * IPv6: TCP and UDP to v6 services are balanced like IPv4 (and NAT64-translated where the real server is v4). What
 * the slow path owns goes to it: echo requests to our addresses, neighbour solicitations for them and
 * advertisements sent to them (or moving a neighbour's MAC: na_moved). Without a slow path, solicitations for them are answered here (nd_answer).
 * Extension headers are not walked, so a packet to one of our addresses that starts with one (Hop-by-Hop, Routing,
 * Destination Options, Mobility, HIP, Shim6, experimental; a fragment header too) cannot be balanced, and is
 * dropped and counted (drop_ipv6_exthdr, drop_fragment) rather than passed: the kernel would answer it for a VIP
 * (a RST, an unreachable, or a local listener on the VIP), so one option header would be enough to reach the host
 * past the balancer. No legitimate sender needs them towards a VIP (MLD's Hop-by-Hop goes to multicast groups, not
 * to our addresses). ESP and AH are upper layers here: IPsec to the host's own addresses stays the kernel's. The
 * same headers to anyone else go to the kernel.
 */
static __always_inline int handle_ipv6(struct xdp_md *ctx, struct hdr_cursor *nh, void *data_end, struct ethhdr *eth)
{
	struct ipv6hdr *ip6;
	struct tcphdr *th = 0;
	struct udphdr *uh = 0;
	struct conn_key k = {};
	struct svc_key sk = {};
	struct conn_val *cv;
	struct svc_val *sv;
	struct fp_cfg *cfg;
	__u32 zero = 0;
	__u8 *icmp;
	__u32 in_if = ctx->ingress_ifindex;
	struct iface_val *inv;
	struct local_val *lv = 0;
	int ours = 0;

	if (parse_ip6hdr(nh, data_end, &ip6) < 0)
		return drop(CNT_DROP_MALFORMED_IP);
	if (ip6->nexthdr == IPPROTO_TCP) {
		if (parse_tcphdr(nh, data_end, &th) < 0)
			return drop(CNT_DROP_MALFORMED_L4);
		k.sport = th->source;
		k.dport = th->dest;
	} else if (ip6->nexthdr == IPPROTO_UDP) {
		if (parse_udphdr(nh, data_end, &uh) < 0)
			return drop(CNT_DROP_MALFORMED_L4);
		k.sport = uh->source;
		k.dport = uh->dest;
	} else if (ip6->nexthdr == IPPROTO_ICMPV6) {
		goto icmp6;
	} else {
		if (ipv6_exthdr(ip6->nexthdr) && local_lookup6(ip6->daddr.in6_u.u6_addr8))
			return drop(ip6->nexthdr == IPPROTO_FRAGMENT ? CNT_DROP_FRAGMENT : CNT_DROP_IPV6_EXTHDR);
		goto pass;
	}
	__builtin_memcpy(k.saddr.b, ip6->saddr.in6_u.u6_addr8, 16);
	__builtin_memcpy(k.daddr.b, ip6->daddr.in6_u.u6_addr8, 16);
	k.proto = ip6->nexthdr;
	k.af = HDSLB_AF_INET6;
	cv = conn_find(T6, &k);
	if (cv && conn_reusable(T6, &k, cv, th)) {
		conn_expire(T6, &k, cv);
		cv = 0;
	}
	if (cv) {
		if (th && th->syn)
			conn_restart(T6, &k, cv, th);
		if (uh && !uh->check)
			return drop(CNT_DROP_MALFORMED_L4); /* see below */
		if (cv->flags & CONN_F_XLAT)
			return xlat64(ctx, ip6, th, uh, cv);
		return xmit_conn6(ctx, eth, ip6, th, uh, cv);
	}
	cfg = cfg_map.lookup(&zero);
	if (!cfg)
		goto pass;
	if (cfg->flags & CFG_F_KNI_ROUTES) {
		struct route6_key rk = { .prefixlen = 128 };
		struct route_val *rt;

		__builtin_memcpy(rk.addr, k.daddr.b, 16);
		rt = route6_map.lookup(&rk);
		if (rt && (rt->flags & ROUTE_F_KNI)) {
			count(CNT_PASS_KNI);
			return XDP_PASS;
		}
	}
	sk.addr = k.daddr;
	sk.port = k.dport;
	sk.proto = k.proto;
	sk.af = HDSLB_AF_INET6;
	sv = svc_map.lookup(&sk);
	if (!sv || l2_not_ours(ctx, eth))
		goto pass;
	if (th && !tcp_opens(th))
		return drop(CNT_DROP_NO_CONN);
	/* UDP over IPv6 must carry a checksum (RFC 8200 8.1; the zero-checksum tunnels of RFC 6935 are an
	 * endpoint's opt-in, not a balanced service's): an incremental update of "none" would send garbage, and
	 * the server would drop it anyway. Checked only for balanced packets: the kernel's own tunnels may allow it. */
	if (uh && !uh->check)
		return drop(CNT_DROP_MALFORMED_L4);
	if (bad_opener6(eth, &k))
		return drop(CNT_DROP_MARTIAN);
	return new_conn6(ctx, eth, ip6, th, uh, &k, sv, cfg);

icmp6:
	icmp = (__u8 *)(ip6 + 1);
	if ((void *)(icmp + 8) > data_end || (void *)(icmp + 8) > nh->end)
		return drop(CNT_DROP_MALFORMED_L4);
	/* Echo, NA and errors (destination unreachable, packet too big, time exceeded: about a flow we rewrote, the
	 * slow path sends them on translated) to our addresses; NS by their target; an NA moving a neighbour's MAC. */
	if (icmp[0] == ICMPV6_ECHO_REQUEST_) {
		ours = local_lookup6(ip6->daddr.in6_u.u6_addr8) != 0;
	} else if (icmp[0] == ICMPV6_NA_) {
		ours = local_lookup6(ip6->daddr.in6_u.u6_addr8) != 0 || na_moved(icmp, data_end, nh->end, in_if);
	} else if (icmp[0] == ICMPV6_DEST_UNREACH_ || icmp[0] == ICMPV6_PKT_TOOBIG_ || icmp[0] == ICMPV6_TIME_EXCEED_) {
		/* to us; or, NAT, a real server's error to its client about a packet we forwarded (icmp_quotes_nat6) */
		ours = local_lookup6(ip6->daddr.in6_u.u6_addr8) != 0 ||
		       icmp_quotes_nat6((struct ipv6hdr *)(icmp + 8), data_end, nh->end);
	} else if (icmp[0] == ICMPV6_NS_ && (void *)(icmp + 24) <= data_end && (void *)(icmp + 24) <= nh->end) {
		lv = local_lookup6(icmp + 8); /* the target address */
		ours = lv != 0;
	}
	if (ours && (inv = iface_map.lookup(&in_if))) {
		__u32 key = xsk_key(ctx, inv);
		int action;

		if (slowpath_up(key)) {
			int nd = icmp[0] == ICMPV6_NS_ || icmp[0] == ICMPV6_NA_;

			if (!nd && !punt_allowed(PUNT_ICMP))
				return drop(CNT_DROP_ICMP_RATELIMIT);
			/* a flood of solicitations: answered below, as ARP is (handle_arp) */
			if (icmp[0] != ICMPV6_NS_ || punt_allowed(PUNT_NEIGH)) {
				count(nd ? CNT_PUNT_ARP : CNT_PUNT_ICMP);
				return xsks.redirect_map(key, XDP_PASS);
			}
		}
		/* no slow path: an echo request to an owned address is answered here (echo_answer4; before
		 * nd_answer, whose tail adjustment leaves no packet pointer usable after it) */
		if (icmp[0] == ICMPV6_ECHO_REQUEST_ && icmp[1] == 0 &&
		    !martian6(ip6->saddr.in6_u.u6_addr32) && !mac_group(eth->h_source) &&
		    !local_lookup6(ip6->saddr.in6_u.u6_addr8))
			return echo_answer6(eth, ip6, icmp, inv);
		/* no slow path (or a flood of solicitations, above): one for an address owned on this interface
		 * (handle_arp's rule) is answered here */
		if (lv && (!lv->ifindex || lv->ifindex == in_if)) {
			action = nd_answer(ctx, ip6, inv);
			if (action >= 0)
				return action;
		}
	}
pass:
	count(CNT_PASS_IPV6);
	return XDP_PASS;
}

/* ---- the daemon's sweep, in the kernel --------------------------------------------------------------- */

/*
 * The daemon finds dead flows in a scan of the tables (hdslb/fastpath/aging.py) and hands them here, SWEEP_BATCH
 * at a time, as the packet of a BPF_PROG_RUN: each flow's one or two entries (wide keys, IPv4 ones narrowed
 * for conn4_map first) go only if no copy on any CPU has seen a packet since the scan's `last`; `removed` says
 * how many went. One syscall for a batch instead of a lookup and a delete per entry from Python.
 */
struct sweep_req {
	struct conn_key k[2];
	__u64 last;      /* the newest last_seen the scan saw for the flow */
	__u32 nkeys;     /* 1 or 2 */
	__u32 removed;   /* out */
};

#ifndef SWEEP_BATCH
#define SWEEP_BATCH 8
#endif

/* Where the entry at wide key wk is (T4 with *nk filled in, T6, or -1) and its newest last_seen. */
static __always_inline int sweep_find(struct conn_key *wk, struct conn4_key *nk, __u64 *newest)
{
	struct conn_val *o;
	__u8 state, was_est;

	if (wk->af == HDSLB_AF_INET) {
		nk->sport = wk->sport;
		nk->dport = wk->dport;
		nk->proto = wk->proto;
		nk->af = wk->af;
		nk->pad = 0;
		nk->saddr.v4 = wk->saddr.v4;
		nk->daddr.v4 = wk->daddr.v4;
		if (conn_lookup(T4, nk)) {
			o = conn_newest(T4, nk, &state, &was_est);
			*newest = o ? o->last_seen : 0;
			return T4;
		}
	}
	if (!conn_lookup(T6, wk))
		return -1;
	o = conn_newest(T6, wk, &state, &was_est);
	*newest = o ? o->last_seen : 0;
	return T6;
}

int hdslb_sweep(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	for (__u32 i = 0; i < SWEEP_BATCH; i++) {
		struct sweep_req *r = data + i * sizeof(struct sweep_req);
		struct conn_key k0, k1;
		struct conn4_key n0 = {}, n1 = {};
		__u64 t0 = 0, t1 = 0;
		int w0, w1 = -1;
		__u32 removed = 0;

		if ((void *)(r + 1) > data_end)
			break;
		__builtin_memcpy(&k0, &r->k[0], sizeof(k0));
		__builtin_memcpy(&k1, &r->k[1], sizeof(k1));
		w0 = sweep_find(&k0, &n0, &t0);
		if (r->nkeys > 1)
			w1 = sweep_find(&k1, &n1, &t1);
		if (t0 > r->last || t1 > r->last) {
			r->removed = 0; /* a packet since the scan: the flow lives */
			continue;
		}
		if (w0 == T4 && conn_delete(T4, &n0) == 0)
			removed++;
		else if (w0 == T6 && conn_delete(T6, &k0) == 0)
			removed++;
		if (w1 == T4 && conn_delete(T4, &n1) == 0)
			removed++;
		else if (w1 == T6 && conn_delete(T6, &k1) == 0)
			removed++;
		/* counted here, with the deletes: a count of the table read meanwhile never sees entries gone that
		 * conn_expired does not hold yet (the daemon's evicted figure is what was inserted less both) */
		count_n(CNT_CONN_EXPIRED, removed);
		r->removed = removed;
	}
	return XDP_DROP;
}

int xdp_main(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = { .pos = data };
	struct ethhdr *eth;
	int action;
	int eth_type;

	count(CNT_RX);
	eth_type = parse_ethhdr(&nh, data_end, &eth);
	if (eth_type < 0) {
		action = drop(CNT_DROP_MALFORMED_ETH);
		goto out;
	}
	if (eth_type == bpf_htons(ETH_P_ARP)) {
		action = handle_arp(ctx, &nh, data_end, eth);
		goto out;
	}
	if (eth_type == bpf_htons(ETH_P_IPV6)) {
		action = handle_ipv6(ctx, &nh, data_end, eth);
		goto out;
	}
	if (eth_type != bpf_htons(ETH_P_IP)) {
		count(CNT_PASS_NOT_IP);
		action = XDP_PASS;
		goto out;
	}
	action = handle_ipv4(ctx, &nh, data_end, eth);
out:
	{
		__u32 slot = ctx->ingress_ifindex & (IF_STATS_SLOTS - 1);
		struct if_stats *is = if_stats.lookup(&slot);
		__u64 len = (__u64)((long)ctx->data_end - (long)ctx->data);

		if (is) {
			is->rx_packets++;
			is->rx_bytes += len;
			if (action == XDP_TX || action == XDP_REDIRECT) {
				is->tx_packets++;
				is->tx_bytes += len;
			} else if (action == XDP_PASS) {
				is->pass++;
			} else {
				is->drops++;
			}
		}
	}
	switch (action) {
	case XDP_PASS:
		count(CNT_VERDICT_PASS);
		break;
	case XDP_TX:
		count(CNT_VERDICT_TX);
		break;
	case XDP_REDIRECT:
		count(CNT_VERDICT_REDIRECT);
		break;
	default:
		count(CNT_VERDICT_DROP);
		break;
	}
	return action;
}
