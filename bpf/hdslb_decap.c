/* hdslb_decap.c: XDP for a real server in TUNNEL mode — strip the outer IPv4/IPv6 header, pass the inner packet. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>

#include "parse.h"
#include "decap_abi.h"

/*
 * The balancer's TUNNEL mode (LVS/DPVS "ipip", -i) sends the client's packet unchanged inside an outer
 * IPv4 (protocol 4 or 41) or IPv6 (next header 4 or 41) header addressed to the real server. Linux would
 * decapsulate with the ipip / ip6_tunnel modules; where they are missing (or unwanted), this program does
 * it in XDP, like Katran's inline decap: the outer header is removed and the inner packet continues into
 * the kernel as if it had arrived bare, so the VIP on lo answers the client directly.
 *
 * Built by hdslb/fastpath/decap.py with bcc; sizes and the pin directory come as -D flags. Map code stays
 * in this file because bcc rewrites map calls only in the main file.
 */
#ifndef PIN_DIR
#error "PIN_DIR (bpffs directory of this decap instance) must be passed by the loader"
#endif
#ifndef MAX_DECAP_ADDRS
#define MAX_DECAP_ADDRS 1024
#endif

#define IP_MF 0x2000     /* more fragments (host order, in frag_off) */
#define IP_OFFSET 0x1fff /* fragment offset mask (host order) */
/* IPv6 extension headers walked before the tunnelled header; encapsulators add at most a Destination
 * Options header (RFC 2473 tunnel encapsulation limit), a Hop-by-Hop header is allowed in front of it. */
#define DECAP_MAX_EXT 4

/* This host's addresses: a tunnel packet is decapsulated only when its outer destination is one of them. */
BPF_TABLE_PINNED("hash", struct decap_addr_key, __u32, decap_addrs, MAX_DECAP_ADDRS, PIN_DIR "/decap_addrs");
/* Per-CPU packet counters (enum decap_counter); pinned so `hdslb-ctl decap show` reads them later. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, decap_stats, DECAP_CNT_MAX, PIN_DIR "/decap_stats");

/* Ethernet plus the VLAN tags parse_ethhdr skips: what is moved forward over the stripped outer header. */
struct l2_hdr {
	struct ethhdr eth;
	struct vlan_hdr vlan[VLAN_MAX_DEPTH];
} __attribute__((packed));

/* IPv6 Fragment header (RFC 8200 4.5); only its next header is read. */
struct frag6_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* network order */
	__be32 identification; /* network order */
};

/* What the outer header parse found: where the inner packet starts and what it is. */
struct tunnel {
	int outer_len;    /* bytes of outer IP header (options and extension headers included) */
	int inner_avail;  /* bytes the outer header says follow it: the inner packet must fit in them */
	__u8 inner_proto; /* IPPROTO_IPIP or IPPROTO_IPV6 */
	__u8 outer_af;    /* DECAP_AF_INET or DECAP_AF_INET6 */
	__u8 outer_ecn;   /* ECN field of the outer header (RFC 3168 codepoint, 0..3) */
};

#define ECN_NOT_ECT 0
#define ECN_ECT_1 1
#define ECN_ECT_0 2
#define ECN_CE 3
#define IPV6_ECN_SHIFT 20 /* ECN bits in the first 32-bit word of an IPv6 header (host order) */

static __always_inline void count(__u32 idx)
{
	__u64 *c = decap_stats.lookup(&idx);

	if (c)
		*c += 1; /* per-CPU: no other CPU writes this slot */
}

static __always_inline int is_tunnel_proto(__u8 proto)
{
	return proto == IPPROTO_IPIP || proto == IPPROTO_IPV6;
}

/*
 * The outer IPv4 header checksum (RFC 1071), options included: ip_rcv drops a header that fails it before any
 * tunnel handler runs, and a corrupted header may carry a corrupted length, protocol or ECN field. hlen is
 * 20..60 and lies inside the frame (checked by the caller); the loop reads it 16 bits at a time.
 */
static __always_inline int ip4_csum_ok(struct iphdr *iph, void *data_end, int hlen)
{
	__u16 *w = (__u16 *)iph;
	__u64 sum = 0;

	if ((void *)(iph + 1) > data_end)
		return 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
#pragma unroll
	for (int i = 0; i < 10; i++) { /* options: up to 40 bytes, 4 at a time */
		__u32 *opt = (__u32 *)(iph + 1) + i;

		if ((int)sizeof(*iph) + i * 4 >= hlen)
			break;
		if ((void *)(opt + 1) > data_end)
			return 0;
		sum += *opt;
	}
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return sum == 0xffff;
}

/*
 * The outer IPv4 options, as ip_options_compile reads them before any tunnel handler runs: each option
 * after End (0) / NOP (1) has a length of at least 2 that stays inside the header, else the kernel drops the
 * packet. A source route (IPOPT_LSRR 131, IPOPT_SSRR 137; linux/ip.h) asks to be forwarded further, which a
 * host refuses (accept_source_route is off on hosts): such a packet is not for us to open either. hlen is 20..60.
 */
static __always_inline int ip4_opts_ok(struct iphdr *iph, void *data_end, int hlen)
{
	int off = sizeof(*iph);

#pragma unroll
	for (int i = 0; i < 40; i++) { /* each step takes at least one of at most 40 option bytes */
		__u8 *o;
		__u8 len;

		if (off >= hlen || off >= 60)
			return 1;
		o = (__u8 *)iph + off;
		if ((void *)(o + 1) > data_end)
			return 0;
		if (o[0] == IPOPT_END)
			return 1;
		if (o[0] == IPOPT_NOOP) {
			off++;
			continue;
		}
		if ((void *)(o + 2) > data_end)
			return 0;
		len = o[1];
		if (len < 2 || off + len > hlen || o[0] == IPOPT_LSRR || o[0] == IPOPT_SSRR)
			return 0;
		off += len;
	}
	return 1;
}

/*
 * Outer IPv4. Returns the counter that decides the packet's fate, or -1 with *t filled in when the packet
 * is a well-formed, unfragmented tunnel packet for one of our addresses. Nothing is validated before the
 * address matched: other hosts' packets, however broken, are the kernel's business.
 */
static __always_inline int parse_outer4(struct hdr_cursor *nh, void *data_end, struct tunnel *t)
{
	struct iphdr *iph = nh->pos;
	struct decap_addr_key key = {};
	int hlen, tot;

	if ((void *)(iph + 1) > data_end)
		return DECAP_CNT_PASS;
	if (!is_tunnel_proto(iph->protocol))
		return DECAP_CNT_PASS;
	key.af = DECAP_AF_INET;
	key.addr[0] = iph->daddr;
	if (!decap_addrs.lookup(&key))
		return DECAP_CNT_PASS_NOT_LOCAL;
	if (iph->version != 4 || iph->ihl < 5)
		return DECAP_CNT_DROP_MALFORMED;
	hlen = iph->ihl * 4; /* 20..60: options are stripped with the header */
	if (nh->pos + hlen > data_end || !ip4_csum_ok(iph, data_end, hlen))
		return DECAP_CNT_DROP_MALFORMED;
	if (hlen > (int)sizeof(*iph) && !ip4_opts_ok(iph, data_end, hlen))
		return DECAP_CNT_DROP_MALFORMED;
	tot = bpf_ntohs(iph->tot_len);
	if (tot < hlen || nh->pos + tot > data_end)
		return DECAP_CNT_DROP_MALFORMED;
	/* A fragment carries only part of the inner packet; the kernel reassembles (and, having no ipip
	 * module, drops) it. Encapsulated packets must fit the path MTU: see README "TUNNEL mode". */
	if (iph->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return DECAP_CNT_PASS_FRAGMENT;
	t->outer_len = hlen;
	t->inner_avail = tot - hlen;
	t->inner_proto = iph->protocol;
	t->outer_af = DECAP_AF_INET;
	t->outer_ecn = iph->tos & 3;
	return -1;
}

/* Outer IPv6, with up to DECAP_MAX_EXT Hop-by-Hop / Destination Options headers; same contract as parse_outer4. */
static __always_inline int parse_outer6(struct hdr_cursor *nh, void *data_end, struct tunnel *t)
{
	struct ipv6hdr *ip6 = nh->pos;
	struct decap_addr_key key = {};
	struct frag6_hdr *fh;
	int off = sizeof(*ip6), plen, hbh_late = 0;
	__u8 nexthdr;

	if ((void *)(ip6 + 1) > data_end)
		return DECAP_CNT_PASS;
	nexthdr = ip6->nexthdr;

#pragma unroll
	for (int i = 0; i < DECAP_MAX_EXT; i++) {
		struct ipv6_opt_hdr *oh;

		if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_DSTOPTS)
			break;
		if (nexthdr == IPPROTO_HOPOPTS && i > 0)
			hbh_late = 1;
		oh = nh->pos + off;
		if ((void *)(oh + 1) > data_end)
			return DECAP_CNT_PASS; /* not recognisably a tunnel packet: the kernel judges it */
		nexthdr = oh->nexthdr;
		off += (oh->hdrlen + 1) * 8;
	}
	if (nexthdr == IPPROTO_FRAGMENT) {
		fh = nh->pos + off;
		if ((void *)(fh + 1) > data_end || !is_tunnel_proto(fh->nexthdr))
			return DECAP_CNT_PASS;
	} else if (!is_tunnel_proto(nexthdr)) {
		return DECAP_CNT_PASS;
	}
	key.af = DECAP_AF_INET6;
	__builtin_memcpy(key.addr, ip6->daddr.in6_u.u6_addr32, sizeof(key.addr));
	if (!decap_addrs.lookup(&key))
		return DECAP_CNT_PASS_NOT_LOCAL;
	/* RFC 8200 4.1: Hop-by-Hop Options only right after the IPv6 header; ip6_input refuses one further on. */
	if (ip6->version != 6 || hbh_late)
		return DECAP_CNT_DROP_MALFORMED;
	plen = bpf_ntohs(ip6->payload_len);
	/* payload_len 0 would be a jumbogram (RFC 2675), which no Ethernet frame carries. */
	if (plen == 0 || nh->pos + sizeof(*ip6) + plen > data_end || off > (int)sizeof(*ip6) + plen)
		return DECAP_CNT_DROP_MALFORMED;
	if (nexthdr == IPPROTO_FRAGMENT)
		return DECAP_CNT_PASS_FRAGMENT;
	t->outer_len = off;
	t->inner_avail = sizeof(*ip6) + plen - off;
	t->inner_proto = nexthdr;
	t->outer_af = DECAP_AF_INET6;
	t->outer_ecn = (bpf_ntohl(*(__be32 *)ip6) >> IPV6_ECN_SHIFT) & 3;
	return -1;
}

/* The inner header must be the family the outer header announced and lie wholly inside the outer payload. */
static __always_inline int inner_ok(void *inner, void *data_end, const struct tunnel *t)
{
	if (t->inner_proto == IPPROTO_IPIP) {
		struct iphdr *iph = inner;
		int tot;

		if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl < 5)
			return 0;
		tot = bpf_ntohs(iph->tot_len);
		return tot >= iph->ihl * 4 && tot <= t->inner_avail;
	} else {
		struct ipv6hdr *ip6 = inner;

		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return 0;
		return (int)sizeof(*ip6) + bpf_ntohs(ip6->payload_len) <= t->inner_avail;
	}
}

/*
 * RFC 6040 decapsulation, as Linux tunnels do it (INET_ECN_decapsulate): a congestion mark (CE) a router put on
 * the outer header must survive on the inner one, or the sender never slows down. Outer CE over an ECN-capable
 * inner packet marks it CE; outer CE over a Not-ECT inner packet cannot be signalled and is dropped. Outer ECT(1)
 * over an ECT(0) inner packet makes it ECT(1) (figure 4: an L4S AQM on the tunnel path marks so). IPv4 gets an
 * incremental header checksum update (RFC 1624). Returns 0, or -1 to drop.
 */
static __always_inline __u8 ecn_after(__u8 outer, __u8 inner)
{
	if (outer == ECN_CE)
		return ECN_CE;
	return outer == ECN_ECT_1 && inner == ECN_ECT_0 ? ECN_ECT_1 : inner;
}

static __always_inline int ecn_decap(void *inner, void *data_end, const struct tunnel *t)
{
	__u8 ecn, want;

	if (t->outer_ecn != ECN_CE && t->outer_ecn != ECN_ECT_1)
		return 0;
	if (t->inner_proto == IPPROTO_IPIP) {
		struct iphdr *iph = inner;
		__u16 old, new;
		__u32 sum;

		if ((void *)(iph + 1) > data_end)
			return -1;
		ecn = iph->tos & 3;
		if (t->outer_ecn == ECN_CE && ecn == ECN_NOT_ECT)
			return -1;
		want = ecn_after(t->outer_ecn, ecn);
		if (want == ecn)
			return 0;
		old = *(__u16 *)iph; /* version/ihl and tos, as they sit in the header */
		iph->tos = (iph->tos & ~3) | want;
		new = *(__u16 *)iph;
		sum = (__u16)~iph->check;
		sum += (__u16)~old;
		sum += new;
		sum = (sum & 0xffff) + (sum >> 16);
		sum = (sum & 0xffff) + (sum >> 16);
		iph->check = ~(__u16)sum;
	} else {
		__be32 *w = inner;

		if ((void *)(w + 1) > data_end)
			return -1;
		ecn = (bpf_ntohl(*w) >> IPV6_ECN_SHIFT) & 3;
		if (t->outer_ecn == ECN_CE && ecn == ECN_NOT_ECT)
			return -1;
		want = ecn_after(t->outer_ecn, ecn);
		*w = (*w & ~bpf_htonl(3 << IPV6_ECN_SHIFT)) | bpf_htonl((__u32)want << IPV6_ECN_SHIFT);
	}
	return 0;
}

/*
 * Remove the outer header: keep a copy of the L2 header (Ethernet and VLAN tags, l2_len bytes), move the
 * packet start past the outer header and write the copy back in front of the inner packet with the
 * innermost ethertype set to the inner family. The copies have constant sizes so the verifier can follow.
 */
static __always_inline int strip_outer(struct xdp_md *ctx, int l2_len, int outer_len, __be16 inner_eth_proto)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct l2_hdr l2;

	/* The frame holds l2 + outer + an inner header of at least 20 bytes, so 22 bytes are always there. */
	if (data + sizeof(l2) > data_end)
		return -1;
	__builtin_memcpy(&l2, data, sizeof(l2));
	if (l2_len == sizeof(struct ethhdr))
		l2.eth.h_proto = inner_eth_proto;
	else if (l2_len == sizeof(struct ethhdr) + sizeof(struct vlan_hdr))
		l2.vlan[0].encap_proto = inner_eth_proto;
	else
		l2.vlan[1].encap_proto = inner_eth_proto;

	if (bpf_xdp_adjust_head(ctx, outer_len))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + sizeof(l2) > data_end)
		return -1;
	if (l2_len == sizeof(struct ethhdr))
		__builtin_memcpy(data, &l2, sizeof(struct ethhdr));
	else if (l2_len == sizeof(struct ethhdr) + sizeof(struct vlan_hdr))
		__builtin_memcpy(data, &l2, sizeof(struct ethhdr) + sizeof(struct vlan_hdr));
	else
		__builtin_memcpy(data, &l2, sizeof(l2));
	return 0;
}

int xdp_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = { .pos = data };
	struct tunnel t = {};
	struct ethhdr *eth;
	int action = XDP_PASS;
	int eth_type, l2_len, verdict;
	__u32 cnt;

	eth_type = parse_ethhdr(&nh, data_end, &eth);
	if (eth_type == bpf_htons(ETH_P_IP)) {
		verdict = parse_outer4(&nh, data_end, &t);
	} else if (eth_type == bpf_htons(ETH_P_IPV6)) {
		verdict = parse_outer6(&nh, data_end, &t);
	} else {
		cnt = DECAP_CNT_PASS; /* ARP, more VLAN tags than we parse, a runt frame: untouched */
		goto out;
	}
	if (verdict >= 0) {
		cnt = verdict;
		if (cnt == DECAP_CNT_DROP_MALFORMED)
			action = XDP_DROP;
		goto out;
	}
	if (!inner_ok(nh.pos + t.outer_len, data_end, &t)) {
		cnt = DECAP_CNT_DROP_MALFORMED;
		action = XDP_DROP;
		goto out;
	}
	if (ecn_decap(nh.pos + t.outer_len, data_end, &t)) {
		cnt = DECAP_CNT_DROP_ECN;
		action = XDP_DROP;
		goto out;
	}
	l2_len = nh.pos - data;
	if (strip_outer(ctx, l2_len, t.outer_len,
			t.inner_proto == IPPROTO_IPIP ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6))) {
		/* The kernel has no tunnel module to make sense of it either. */
		cnt = DECAP_CNT_DROP_ADJUST;
		action = XDP_DROP;
		goto out;
	}
	if (t.outer_af == DECAP_AF_INET)
		cnt = t.inner_proto == IPPROTO_IPIP ? DECAP_CNT_DECAP_4IN4 : DECAP_CNT_DECAP_6IN4;
	else
		cnt = t.inner_proto == IPPROTO_IPIP ? DECAP_CNT_DECAP_4IN6 : DECAP_CNT_DECAP_6IN6;
out:
	count(cnt);
	return action;
}
