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

/*
 * HC' = ~(~HC + ~m + m') (RFC 1624, eqn. 3) in two steps, so that several changed fields go into a checksum at
 * once and one field's change into several checksums: the partial sum of each field's change (hcsum_delta*,
 * at most 4 x 0xffff for 32 bits; sums of a few dozen stay far from overflow), then one update (hcsum_apply).
 */
static __always_inline __u32 hcsum_delta4(__be32 from, __be32 to)
{
	return (~from & 0xffff) + (~from >> 16) + (to & 0xffff) + (to >> 16);
}

static __always_inline __u32 hcsum_delta2(__be16 from, __be16 to)
{
	return (__u16)~from + (__u32)to;
}

/* a 128-bit field: an IPv6 address in an L4 pseudo-header */
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

/* One field into one checksum. */
static __always_inline void hcsum_replace4(__sum16 *sum, __be32 from, __be32 to)
{
	hcsum_apply(sum, hcsum_delta4(from, to));
}

static __always_inline void hcsum_replace2(__sum16 *sum, __be16 from, __be16 to)
{
	hcsum_apply(sum, hcsum_delta2(from, to));
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

/* Fold 32-bit adds so a running sum never overflows across many terms. */
static __always_inline __u32 hcsum_add(__u32 c, __u32 v)
{
	c += v;
	return c + (c < v);
}

#endif /* HDSLB_CSUM_H */
