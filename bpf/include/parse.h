/* parse.h: bounds-checked header parsing helpers for XDP; one contract for all of them. */
#ifndef HDSLB_PARSE_H
#define HDSLB_PARSE_H

/*
 * Contract (as in xdp-tutorial's parsing_helpers.h): each helper takes a cursor into the packet and
 * data_end, checks that the whole header fits, stores a pointer to it, advances the cursor past it and
 * returns the next protocol number (host order), or -1 if the header does not fit or is malformed.
 */

struct hdr_cursor {
	void *pos;
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

/* IPv4: version 4, ihl >= 5, tot_len covering the header and within the frame. */
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
	nh->pos += hdrsize;
	*iphdr = iph;
	return iph->protocol;
}

/* TCP: doff >= 5 and the whole header (options included) inside the frame. */
static __always_inline int parse_tcphdr(struct hdr_cursor *nh, void *data_end, struct tcphdr **tcphdr)
{
	struct tcphdr *h = nh->pos;
	int len;

	if ((void *)(h + 1) > data_end)
		return -1;
	len = h->doff * 4;
	if (len < (int)sizeof(*h))
		return -1;
	if (nh->pos + len > data_end)
		return -1;
	nh->pos += len;
	*tcphdr = h;
	return 0;
}

/* UDP: the 8-byte header inside the frame and a length field that is at least the header. */
static __always_inline int parse_udphdr(struct hdr_cursor *nh, void *data_end, struct udphdr **udphdr)
{
	struct udphdr *h = nh->pos;

	if ((void *)(h + 1) > data_end)
		return -1;
	if (bpf_ntohs(h->len) < sizeof(*h))
		return -1;
	nh->pos = h + 1;
	*udphdr = h;
	return 0;
}

#endif /* HDSLB_PARSE_H */
