/* jhash.h: the kernel's jhash_2words (lib/jhash.h), the one hash every hash scheduler table is indexed by. */
#ifndef HDSLB_JHASH_H
#define HDSLB_JHASH_H

/*
 * hdslb/sched/hashing.py mirrors this exactly (flow_hash): the daemon builds a table knowing which bucket
 * each client lands in, and two daemons built from the same servers choose alike.
 */
#define HDSLB_JHASH_INITVAL 0xdeadbeef

static __always_inline __u32 hdslb_rol32(__u32 w, unsigned int s)
{
	return (w << s) | (w >> ((-s) & 31));
}

static __always_inline __u32 hdslb_jhash_2words(__u32 a, __u32 b, __u32 initval)
{
	__u32 c;

	initval += HDSLB_JHASH_INITVAL + (2 << 2);
	a += initval;
	b += initval;
	c = initval;
	/* __jhash_final */
	c ^= b; c -= hdslb_rol32(b, 14);
	a ^= c; a -= hdslb_rol32(c, 11);
	b ^= a; b -= hdslb_rol32(a, 25);
	c ^= b; c -= hdslb_rol32(b, 16);
	a ^= c; a -= hdslb_rol32(c, 4);
	b ^= a; b -= hdslb_rol32(a, 14);
	c ^= b; c -= hdslb_rol32(b, 24);
	return c;
}

#endif /* HDSLB_JHASH_H */
