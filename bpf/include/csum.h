/* csum.h: incremental Internet checksum updates (RFC 1624) for rewritten addresses and ports. */
#ifndef HDSLB_CSUM_H
#define HDSLB_CSUM_H

/*
 * One's-complement sums are byte-order independent as long as old and new values are in the same
 * order, so every helper takes fields exactly as they sit in the packet (network order).
 */

static __always_inline __u16 hcsum_fold32(__u32 c)
{
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)c;
}

/* HC' = ~(~HC + ~m + m') for a 32-bit field. */
static __always_inline void hcsum_replace4(__sum16 *sum, __be32 from, __be32 to)
{
	__u32 c = (__u16)~*sum;

	c += (~from & 0xffff) + (~from >> 16);
	c += (to & 0xffff) + (to >> 16);
	*sum = ~hcsum_fold32(c);
}

static __always_inline void hcsum_replace2(__sum16 *sum, __be16 from, __be16 to)
{
	__u32 c = (__u16)~*sum;

	c += (__u16)~from;
	c += to;
	*sum = ~hcsum_fold32(c);
}

/* The same in two steps, for several fields into several checksums: the partial sum of a field's change
 * (at most 4 x 0xffff; sums of a few stay far from overflow), then one update per checksum. */
static __always_inline __u32 hcsum_delta4(__be32 from, __be32 to)
{
	return (~from & 0xffff) + (~from >> 16) + (to & 0xffff) + (to >> 16);
}

static __always_inline __u32 hcsum_delta2(__be16 from, __be16 to)
{
	return (__u16)~from + (__u32)to;
}

static __always_inline __u32 hcsum_delta16(const __be32 *from, const __be32 *to)
{
	__u32 d = 0;

#pragma unroll
	for (int i = 0; i < 4; i++)
		d += hcsum_delta4(from[i], to[i]);
	return d;
}

static __always_inline void hcsum_apply(__sum16 *sum, __u32 delta)
{
	*sum = ~hcsum_fold32((__u16)~*sum + delta);
}

/* UDP over IPv4: a zero checksum means "none" and stays zero; a computed zero is sent as 0xffff. */
static __always_inline void udp_csum_replace4(__sum16 *sum, __be32 from, __be32 to)
{
	if (*sum == 0)
		return;
	hcsum_replace4(sum, from, to);
	if (*sum == 0)
		*sum = 0xffff;
}

static __always_inline void udp_csum_replace2(__sum16 *sum, __be16 from, __be16 to)
{
	if (*sum == 0)
		return;
	hcsum_replace2(sum, from, to);
	if (*sum == 0)
		*sum = 0xffff;
}

/* A full IPv4 header checksum for a header we built (20 bytes, no options). */
static __always_inline __sum16 ip4_csum_full(const void *hdr)
{
	const __u16 *w = hdr;
	__u32 c = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		c += w[i];
	return ~hcsum_fold32(c);
}

/* HC' for a 128-bit field (an IPv6 address in an L4 pseudo-header), as eight 16-bit replacements. */
static __always_inline void hcsum_replace16(__sum16 *sum, const __be32 *from, const __be32 *to)
{
	__u32 c = (__u16)~*sum;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		c += (~from[i] & 0xffff) + (~from[i] >> 16);
		c += (to[i] & 0xffff) + (to[i] >> 16);
	}
	*sum = ~hcsum_fold32(c);
}

/* Fold 32-bit adds so a running sum never overflows across many terms. */
static __always_inline __u32 hcsum_add(__u32 c, __u32 v)
{
	c += v;
	return c + (c < v);
}

#endif /* HDSLB_CSUM_H */
