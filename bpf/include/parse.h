/* parse.h: bounds-checked header parsing helpers for XDP; one contract for all of them. */
#ifndef HDSLB_PARSE_H
#define HDSLB_PARSE_H

/* Self-contained: every program that parses (the balancer, the decap program, the bench's reference
 * programs) gets the header types these helpers dereference. */
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

/*
 * Contract (as in xdp-tutorial's parsing_helpers.h): each helper takes a cursor into the packet and
 * data_end, checks that the whole header fits, stores a pointer to it, advances the cursor past it and
 * returns the next protocol number (host order), or -1 if the header does not fit or is malformed.
 * "Fits" means inside the frame (data_end: what the verifier needs) and inside the enclosing datagram
 * (cursor.end: the frame's end until an IP header narrows it to its own length). Bytes between the two are
 * link padding (a short frame is padded to 60 bytes) or junk: never a header, never a length's room.
 */

struct hdr_cursor {
	void *pos;
	void *end; /* end of the innermost datagram parsed so far (<= data_end) */
};

struct vlan_hdr {
	__be16 tci;
	__be16 encap_proto; /* network order */
};

#define VLAN_MAX_DEPTH 2 /* 802.1Q and 802.1ad (QinQ) */

static __always_inline int proto_is_vlan(__u16 h_proto)
{
	return h_proto == bpf_htons(ETH_P_8021Q) || h_proto == bpf_htons(ETH_P_8021AD);
}

/* Ethernet, skipping up to VLAN_MAX_DEPTH VLAN tags; returns the inner ethertype in network order. */
static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end, struct ethhdr **ethhdr)
{
	struct ethhdr *eth = nh->pos;
	struct vlan_hdr *vlh;
	__u16 h_proto;

	nh->end = data_end;
	if ((void *)(eth + 1) > data_end)
		return -1;
	nh->pos = eth + 1;
	*ethhdr = eth;
	vlh = nh->pos;
	h_proto = eth->h_proto;

#pragma unroll
	for (int i = 0; i < VLAN_MAX_DEPTH; i++) {
		if (!proto_is_vlan(h_proto))
			break;
		if ((void *)(vlh + 1) > data_end)
			return -1;
		h_proto = vlh->encap_proto;
		vlh++;
	}
	nh->pos = vlh;
	return h_proto;
}

/* IPv4: version 4, ihl >= 5, tot_len covering the header and within the frame; the datagram ends at tot_len. */
static __always_inline int parse_iphdr(struct hdr_cursor *nh, void *data_end, struct iphdr **iphdr)
{
	struct iphdr *iph = nh->pos;
	int hdrsize;

	if ((void *)(iph + 1) > data_end)
		return -1;
	if (iph->version != 4 || iph->ihl < 5)
		return -1;
	hdrsize = iph->ihl * 4;
	if (nh->pos + hdrsize > data_end)
		return -1;
	if (bpf_ntohs(iph->tot_len) < hdrsize || nh->pos + bpf_ntohs(iph->tot_len) > data_end)
		return -1;
	nh->end = nh->pos + bpf_ntohs(iph->tot_len);
	nh->pos += hdrsize;
	*iphdr = iph;
	return iph->protocol;
}

/*
 * IPv6: version 6 and the payload (payload_len) inside the frame; the datagram ends there. Extension headers
 * are not walked: the next header is returned as it stands. A payload_len of 0 (a jumbogram, which needs a
 * Hop-by-Hop header) leaves no room for an upper-layer header, so such a TCP or UDP header does not fit.
 */
static __always_inline int parse_ip6hdr(struct hdr_cursor *nh, void *data_end, struct ipv6hdr **ip6hdr)
{
	struct ipv6hdr *ip6 = nh->pos;

	if ((void *)(ip6 + 1) > data_end)
		return -1;
	if (ip6->version != 6 || (void *)(ip6 + 1) + bpf_ntohs(ip6->payload_len) > data_end)
		return -1;
	nh->end = (void *)(ip6 + 1) + bpf_ntohs(ip6->payload_len);
	nh->pos = ip6 + 1;
	*ip6hdr = ip6;
	return ip6->nexthdr;
}

/* TCP: doff >= 5 and the whole header (options included) inside the frame and the datagram. */
static __always_inline int parse_tcphdr(struct hdr_cursor *nh, void *data_end, struct tcphdr **tcphdr)
{
	struct tcphdr *h = nh->pos;
	int len;

	if ((void *)(h + 1) > data_end)
		return -1;
	len = h->doff * 4;
	if (len < (int)sizeof(*h))
		return -1;
	if (nh->pos + len > data_end || nh->pos + len > nh->end)
		return -1;
	nh->pos += len;
	*tcphdr = h;
	return 0;
}

/*
 * UDP: the 8-byte header inside the frame and the datagram, and a length field that is at least the header and
 * at most what the IP datagram carries (a shorter one leaves IP-level padding, as the kernel accepts).
 */
static __always_inline int parse_udphdr(struct hdr_cursor *nh, void *data_end, struct udphdr **udphdr)
{
	struct udphdr *h = nh->pos;
	__u16 len;

	if ((void *)(h + 1) > data_end || (void *)(h + 1) > nh->end)
		return -1;
	len = bpf_ntohs(h->len);
	if (len < sizeof(*h) || nh->pos + len > nh->end)
		return -1;
	nh->pos = h + 1;
	*udphdr = h;
	return 0;
}

#endif /* HDSLB_PARSE_H */
