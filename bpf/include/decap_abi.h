/* decap_abi.h: the key and counters the real-server decapsulation program (hdslb_decap.c) shares with Python. */
#ifndef HDSLB_DECAP_ABI_H
#define HDSLB_DECAP_ABI_H

/*
 * Same rules as hdslb_abi.h: fixed-width types, explicit padding, byte order on every multi-byte field.
 * hdslb/fastpath/decap.py parses the enum below by name and packs the key by hand (the bpf test tier checks
 * the layout against bcc's ctypes), so `hdslb-ctl decap show` can read the pinned maps without compiling.
 */

/* Address family tags in decap_addr_key.af (the values hdslb_abi.h uses, not AF_INET/AF_INET6). */
#define DECAP_AF_INET 4
#define DECAP_AF_INET6 6

/* An outer destination this host decapsulates for: one of its own addresses (the real server's RIP). */
struct decap_addr_key {
	__u8 af;      /* DECAP_AF_INET or DECAP_AF_INET6 */
	__u8 pad[3];  /* zero */
	__be32 addr[4]; /* network order; IPv4 in addr[0], addr[1..3] zero */
};

/*
 * Per-CPU packet counters, indexed by this enum. Python reads the names from this header (lower-case,
 * without DECAP_CNT_), so a new counter needs no Python change. Every packet lands in exactly one counter.
 */
enum decap_counter {
	DECAP_CNT_DECAP_4IN4 = 0,  /* IPv4 in IPv4 (outer protocol 4): inner packet passed to the kernel */
	DECAP_CNT_DECAP_6IN4,      /* IPv6 in IPv4 (outer protocol 41) */
	DECAP_CNT_DECAP_4IN6,      /* IPv4 in IPv6 (outer next header 4) */
	DECAP_CNT_DECAP_6IN6,      /* IPv6 in IPv6 (outer next header 41) */
	DECAP_CNT_PASS,            /* not a tunnel packet: passed untouched */
	DECAP_CNT_PASS_NOT_LOCAL,  /* a tunnel packet for an address not in decap_addrs: passed untouched */
	DECAP_CNT_PASS_FRAGMENT,   /* a fragment of a tunnel packet for us: passed untouched (not decapsulated) */
	DECAP_CNT_DROP_MALFORMED,  /* a tunnel packet for us whose outer or inner header is truncated or invalid (outer IPv4
	                            * header checksum included) */
	DECAP_CNT_DROP_ADJUST,     /* bpf_xdp_adjust_head refused to strip the outer header */
	DECAP_CNT_DROP_ECN,        /* outer header marked CE over a Not-ECT inner packet (RFC 6040: drop) */
	DECAP_CNT_MAX
};

#endif /* HDSLB_DECAP_ABI_H */
