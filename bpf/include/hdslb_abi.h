/* hdslb_abi.h: every key, value, flag and enum that both the XDP program and the Python control plane read or write. */
#ifndef HDSLB_ABI_H
#define HDSLB_ABI_H

/*
 * Rules for this file (Python parses the enums below by name and checks struct sizes against bcc's ctypes):
 * fixed-width types only, explicit padding, no bitfields, byte order noted on every multi-byte field.
 * Addresses are 16-byte unions from day one so IPv6 needs no ABI change: IPv4 lives in the first word,
 * the other twelve bytes are zero.
 */

/* An IPv4 or IPv6 address; v4 in v4 (first word), remaining bytes zero. Network order. */
union hdslb_addr {
	__be32 v4;
	__be32 v6[4];
	__u8 b[16];
};

/* Address family tags used in keys (not AF_INET values: one byte, stable across libcs). */
enum hdslb_af {
	HDSLB_AF_INET = 4,
	HDSLB_AF_INET6 = 6,
};

/* Forwarding modes, as ipvsadm -b/-g/-m/-i/-J name them. */
enum hdslb_fwd {
	FWD_FNAT = 1,
	FWD_DR = 2,
	FWD_NAT = 3,
	FWD_TUNNEL = 4,
	FWD_SNAT = 5,
};

/* A virtual service: who we balance. 20 bytes. */
struct svc_key {
	union hdslb_addr addr; /* VIP, network order */
	__be16 port;           /* VIP port, network order */
	__u8 proto;            /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 af;               /* enum hdslb_af */
};

/* svc_val.flags */
#define SVC_F_VALID 0x1
#define SVC_F_PERSIST 0x2 /* ipvsadm -p: a client (masked by persist_plen) sticks to one real server */

/* What the fast path needs about a service; the scheduling table is a separate map so it can be swapped whole. 12 bytes. */
struct svc_val {
	__u32 svc_id;          /* index into per-service maps (sched, laddrs, stats); assigned by the daemon */
	__u32 flags;           /* SVC_F_* */
	__u32 persist_timeout; /* seconds a persistence template lives after its last new connection (-p) */
	__u8 persist_plen;     /* -M netmask as a prefix length: v4 0..32, v6 0..128 */
	__u8 pad[3];
};

/* Longest scheduling ring a service can have; rr/wrr rings longer than this are scaled by hdslb/sched. */
#ifndef SCHED_RING_MAX
#define SCHED_RING_MAX 1024
#endif

/* sched_tbl.kind */
#define SCHED_RING 1 /* rr, wrr, lc, wlc, fo: slot[cursor % len], per-CPU cursor */
#define SCHED_HASH 2 /* sh, dh, mh, conhash: hash_cells[hoff + hash % len] */

/* sched_tbl.flags */
#define SCHED_F_SPREAD 0x1 /* ring: each CPU walks a new table (gen) from cpu * len / ncpus, not from entry 0, so
			    * the CPUs' first new flows after a rebuild go to different servers (rr, wrr: a cycle's
			    * shares do not depend on where it starts; lc/wlc rings are plans that start with the
			    * least loaded servers and leave it clear) */

/* sched_tbl.key: what a hash table hashes (hdslb/sched Table.key) */
#define HKEY_SRC 1      /* client address */
#define HKEY_DST 2      /* destination address (dh; SNAT: the outside address) */
#define HKEY_SRC_PORT 3 /* client address and source port */

/*
 * A service's scheduling table, written in one map update so no packet ever sees half a table.
 * Rings: the fast path picks slot[cursor % len] with a per-CPU cursor. Hash tables live in hash_cells
 * (too big for this value): the daemon writes a new table into free cells, then swaps this value to point
 * at it, then frees the old cells; the fast path reads hash_cells[hoff + jhash_2words(addr, port, seed) % len],
 * addr being the address as one host-order word (v6: the XOR of its four words), port host order or 0.
 * Dest slots are u32 everywhere (rings, hash cells, connections); 0xffffffff marks an empty slot.
 */
struct sched_tbl {
	__u32 len;     /* ring: entries used in slot[]; hash: table size */
	__u32 gen;     /* bumped by the daemon on every rebuild (debugging aid) */
	__u8 kind;     /* SCHED_RING / SCHED_HASH */
	__u8 key;      /* HKEY_* (hash tables) */
	__u16 flags;   /* SCHED_F_* (was padding: zero in tables written before it existed) */
	__u32 seed;    /* hash seed (initval of jhash_2words) */
	__u32 hoff;    /* hash tables: first cell in hash_cells */
	__u32 pad2;
	__u32 slot[SCHED_RING_MAX]; /* ring: dest slot ids, host order */
};

#define DEST_SLOT_NONE 0xffffffff

/* dest_val.flags */
#define DEST_F_VALID 0x1
#define DEST_F_DRAIN 0x2 /* weight 0: established flows continue, no new flows */
/* A persistence template naming it is not honoured (LVS ip_vs_check_template refuses it): down by its health
 * check, a checker's weight 0, or drained while expire_quiescent_template is set. A drain alone keeps the
 * server's persistent clients coming back until their templates expire. */
#define DEST_F_NO_PERSIST 0x4

/* One real server, indexed by its slot id. 28 bytes. */
struct dest_val {
	union hdslb_addr addr; /* real server address, network order */
	__be16 port;           /* real server port, network order */
	__u8 af;               /* enum hdslb_af */
	__u8 fwd;              /* enum hdslb_fwd */
	__u32 svc_id;          /* owning service */
	__u32 flags;           /* DEST_F_* */
};

/* Local (FNAT source) addresses a service may use. */
#ifndef LADDR_MAX
#define LADDR_MAX 16
#endif

struct laddr_ent {
	union hdslb_addr addr; /* network order */
	__u32 ifindex;         /* interface the address was added on (-F) */
	__u8 af;               /* enum hdslb_af */
	__u8 pad[3];
};

struct laddr_set {
	__u32 n; /* entries used */
	__u32 pad;
	struct laddr_ent a[LADDR_MAX];
};

/* Persistence templates (LVS ip_vs_conn templates): one per (service, client network). LRU, shared by all CPUs. */
struct persist_key {
	union hdslb_addr addr; /* client address masked to the service's persist_plen, network order */
	__u32 svc_id;
	__u8 af;
	__u8 pad[3];
};

struct persist_val {
	__u32 dest_slot; /* the real server this client sticks to */
	__u32 seq;       /* was padding: bumped by the CPU that replaces a stale template, which swaps dest_slot and seq
			  * as one 8-byte word (compare-and-swap), so a CPU replacing it at the same time sees it lost */
	__u64 expires;   /* bpf_ktime_get_coarse_ns() after which the template is void */
};

/*
 * SNAT services (ipvsadm -A -H proto=..,src-range=..,dst-range=..,iif=..,oif=.. ; real servers -J): packets
 * from inside that match no connection and no VIP are tried against these rules in order; the first match
 * is the service. IPv4 only. Ranges inclusive, host order; 0/0 means any. iif/oif 0 = any (oif is the
 * egress interface the route to the destination picks).
 */
#ifndef SNAT_RULES_MAX
#define SNAT_RULES_MAX 16
#endif

#define SNAT_F_VALID 0x1

struct snat_rule {
	__u32 svc_id;
	__u8 proto;   /* IPPROTO_TCP / UDP / ICMP; 0 = any of them */
	__u8 flags;   /* SNAT_F_* */
	__u16 pad;
	__u32 src_min; /* host order */
	__u32 src_max;
	__u32 dst_min;
	__u32 dst_max;
	__u32 iif;    /* ingress ifindex, 0 = any */
	__u32 oif;    /* egress ifindex, 0 = any */
};

/* Addresses the balancer owns (DPVS "local routes"): VIPs, local addresses, interface addresses. */
struct local_key {
	union hdslb_addr addr; /* network order */
	__u8 af;
	__u8 pad[3];
};

#define LOCAL_F_IFADDR 0x1 /* added with dpip addr add */
#define LOCAL_F_LADDR 0x2  /* an FNAT local address (--add-laddr) */
#define LOCAL_F_SAPOOL 0x4 /* usable as a SNAT/FNAT source pool */
#define LOCAL_F_VIP 0x8    /* a VIP declared in the config file (no dpip addr add needed) */

struct local_val {
	__u32 flags;   /* LOCAL_F_* */
	__u32 ifindex; /* the interface it lives on (ARP is answered there) */
};

/* Interfaces the program is attached to; keyed by ifindex (host order). */
struct iface_val {
	__u8 mac[6];
	__u16 xsk_slot;  /* this interface's block of XSKMAP keys: slot * XSK_MAX_QUEUES + rx queue */
	__u32 flags;
	__u32 mtu;
};

/* Net routes: longest-prefix match, one trie per family (an LPM key must be a struct, prefixlen first). */
struct route4_key {
	__u32 prefixlen; /* host order, bits */
	__be32 addr;     /* network order */
};

struct route6_key {
	__u32 prefixlen; /* host order, bits */
	__u8 addr[16];   /* network order */
};

#define ROUTE_F_GW 0x1  /* next hop is gw, not the destination itself */
#define ROUTE_F_KNI 0x2 /* scope kni_host: hand matching traffic to the kernel */

struct route_val {
	union hdslb_addr gw;  /* next hop when ROUTE_F_GW, network order */
	union hdslb_addr src; /* preferred source, network order (zero = none) */
	__u32 ifindex;        /* egress interface */
	__u32 mtu;
	__u32 flags;          /* ROUTE_F_* */
	__u32 pad;
};

/* The neighbour table: next hop IP -> MAC on an interface. */
struct neigh_key {
	union hdslb_addr addr; /* network order */
	__u8 af;
	__u8 pad[3];
};

#define NEIGH_F_PERMANENT 0x1 /* dpip neigh add: never overwritten by learning */
#define NEIGH_F_LEARNED 0x2   /* learned from ARP by the fast path */

struct neigh_val {
	__u8 mac[6];
	__u16 flags;     /* NEIGH_F_* */
	__u32 ifindex;
	__u32 pad;
	__u64 updated;   /* bpf_ktime_get_coarse_ns() of the last confirmation */
};

/*
 * One direction of a connection: the tuple as it arrives. Two tables hold them (see hdslb_xdp.c): IPv4 flows
 * in conn4_map with this compact key (16 bytes), IPv6 and NAT64 flows in conn6_map with the wide one (40
 * bytes). Both start with the same 8 bytes (ports, protocol, family), so code reading those does not care which.
 */
union hdslb_addr4 {
	__be32 v4;
};

#define CONN_KEY_HEAD \
	__be16 sport;           /* network order */ \
	__be16 dport;           /* network order */ \
	__u8 proto;                                 \
	__u8 af;                                    \
	__u16 pad;

struct conn4_key {
	CONN_KEY_HEAD
	union hdslb_addr4 saddr; /* network order */
	union hdslb_addr4 daddr; /* network order */
};

struct conn_key {
	CONN_KEY_HEAD
	union hdslb_addr saddr; /* network order */
	union hdslb_addr daddr; /* network order */
};

/* conn_val.flags */
#define CONN_F_VALID 0x1 /* this CPU's copy is filled in (per-CPU map: other CPUs' slots start zeroed) */
#define CONN_F_OUT 0x2   /* reply direction (real server -> local address) */
#define CONN_F_NEED_L2 0x4 /* next hop unresolved when created: dmac[0..3] holds the IPv4 next hop whose MAC to find */
#define CONN_F_XLAT 0x8    /* NAT64: the packet leaves in the other address family (v6 in -> v4 out, or back) */
#define CONN_F_WAS_EST 0x10 /* the handshake completed (this CPU's copy saw the client's ACK) */

/* Coarse TCP states for aging and ActiveConn/InActConn, ordered by progress. */
enum conn_state {
	CS_NONE = 0,
	CS_SYN_RECV = 1,
	CS_ESTABLISHED = 2,
	CS_FIN_WAIT = 3,
	CS_CLOSE = 4,
	CS_UDP = 5,
};
#define CONN_STATES 6
#define IDLE_TMO_SLOTS 8 /* fp_cfg.idle_tmo: a power of two >= CONN_STATES, so a masked index is in bounds */

/*
 * One direction of a connection: what to rewrite the packet to and where to send it. The L2 result is
 * cached (DPVS fast_xmit) so an established packet costs one lookup: no route or neighbour lookup.
 * Everything but the new addresses comes first and is laid out alike in both tables' values (40 bytes), so
 * the code that tracks state, counts and sends reads either through a struct conn_val pointer; the addresses
 * follow: 4 bytes each in conn4_map (48 bytes a value), 16 in conn6_map (72).
 */
#define CONN_VAL_HEAD \
	__be16 sport;    /* new source port, network order */ \
	__be16 dport;    /* new destination port, network order */ \
	__u32 ifindex;   /* egress interface */ \
	__u8 dmac[6];    /* next hop MAC; while CONN_F_NEED_L2: the IPv4 next hop in dmac[0..3] (network order) */ \
	__u8 smac[6];    /* our MAC on ifindex */ \
	__u16 svc_id;    /* service, for per-service counters */ \
	__u8 flags;      /* CONN_F_* */ \
	__u8 state;      /* enum conn_state (this CPU's view) */ \
	__u32 dest_slot; /* real server slot, for per-dest counters */ \
	__u8 fwd;        /* enum hdslb_fwd: FNAT/NAT/SNAT rewrite both ends, DR rewrites L2 only, TUNNEL encapsulates */ \
	__u8 pad[3]; \
	__u64 last_seen; /* bpf_jiffies64() of the last packet on this CPU (a clock read inline, no helper call) */

struct conn4_val {
	CONN_VAL_HEAD
	union hdslb_addr4 saddr; /* new source, network order */
	union hdslb_addr4 daddr; /* new destination, network order */
};

struct conn_val {
	CONN_VAL_HEAD
	union hdslb_addr saddr; /* new source, network order */
	union hdslb_addr daddr; /* new destination, network order */
};

/* Per-service and per-real-server traffic counters (per-CPU, summed by the daemon). */
struct traffic_stats {
	__u64 conns;
	__u64 inpkts;  /* client -> server direction */
	__u64 outpkts; /* server -> client direction */
	__u64 inbytes;
	__u64 outbytes;
};

/* Per-interface fast-path counters (dpip link show -s), per CPU, indexed by ingress ifindex & (IF_STATS_SLOTS - 1). */
#define IF_STATS_SLOTS 1024

struct if_stats {
	__u64 rx_packets; /* frames the program saw on this interface */
	__u64 rx_bytes;
	__u64 tx_packets; /* of those, sent on by the fast path (XDP_TX or redirect) */
	__u64 tx_bytes;
	__u64 pass;       /* handed to the kernel */
	__u64 drops;      /* dropped (every drop also has a reason counter) */
};

/* Runtime settings the daemon can change without recompiling (index 0 of the cfg array). */
struct fp_cfg {
	__u16 lport_min;  /* FNAT/SNAT local port range, host order, inclusive */
	__u16 lport_max;
	__u32 flags;      /* CFG_F_* */
	__u32 snat_rules; /* snat_rule entries in use (0 = no SNAT service: inside traffic costs nothing) */
	__u32 pad;
	/* Idle timeout per enum conn_state, in jiffies (CS_UDP: every UDP flow), the daemon's aging timeouts.
	 * Used only while CFG_F_RECLAIM is set: a local port held by a flow idle past its timeout is taken back
	 * at once instead of waiting for the sweep. */
	__u32 idle_tmo[IDLE_TMO_SLOTS];
};

#define CFG_F_KNI_ROUTES 0x1 /* some route has scope kni_host: check destinations against the trie first */
#define CFG_F_RECLAIM 0x2    /* idle_tmo is filled in: alloc_lport may reclaim an expired flow's port */
#define CFG_F_NAT64 0x4      /* an IPv6 service exists: a NAT64 flow's IPv4 reply entry may be in conn6_map */

/* Receive queues per interface the slow path can serve (XSKMAP keys per interface). */
#define XSK_MAX_QUEUES 16

/* Tries at finding a free local port before the SYN is dropped as "lport_exhausted". */
#define LPORT_TRIES 16

/*
 * Fast-path counters, indexed by this enum in a per-CPU array. Names double as metric labels:
 * Python reads this enum by parsing this header, so a new counter needs no Python change.
 */
enum hdslb_counter {
	CNT_RX = 0,
	CNT_VERDICT_PASS,
	CNT_VERDICT_DROP,
	CNT_VERDICT_TX,
	CNT_VERDICT_REDIRECT,
	CNT_PASS_NOT_IP,
	CNT_PASS_IPV6,
	CNT_PASS_NOT_OURS,
	CNT_PASS_LOCAL,
	CNT_PASS_KNI,     /* destination routed scope kni_host: the kernel's, not balanced */
	CNT_PASS_ARP,
	CNT_ARP_REPLY,
	CNT_ARP_LEARN,
	CNT_CONN_NEW,
	CNT_CONN_ADOPT,
	CNT_DROP_MALFORMED_ETH,
	CNT_DROP_MALFORMED_ARP,
	CNT_DROP_MALFORMED_IP,
	CNT_DROP_MALFORMED_L4,
	CNT_DROP_FRAGMENT,
	CNT_DROP_NO_CONN,
	CNT_DROP_NO_DEST,
	CNT_DROP_NO_LADDR,
	CNT_DROP_LPORT_EXHAUSTED,
	CNT_DROP_NO_ROUTE,
	CNT_DROP_NO_NEIGH,
	CNT_DROP_NO_IFACE,
	CNT_DROP_CONN_INSERT,
	CNT_CONN_EXPIRED, /* entries removed before the LRU had to evict them (per direction): idle past their
			   * timeout (the daemon's sweep; the program reclaiming a local port) or a finished flow
			   * whose tuple a new SYN reuses */
	CNT_PUNT_ARP,     /* ARP or IPv6 neighbour discovery for an owned address handed to the slow path (AF_XDP) */
	CNT_PUNT_ICMP,    /* ICMP echo to an owned address, or an ICMP error to translate, handed to the slow path */
	CNT_PUNT_NO_NEIGH, /* rewritten packet whose next hop has no MAC yet, queued by the slow path */
	CNT_CONN_L2_FILLED, /* a connection created without a MAC found it in the neighbour table */
	CNT_PERSIST_HIT,    /* a new connection followed its client's persistence template */
	CNT_DROP_TOO_BIG,   /* TUNNEL, NAT64 replies: the packet would exceed the egress MTU (and has no DF) */
	CNT_DROP_NO_SRC,    /* TUNNEL: no outer source (dpip route ... src, or a local address of the service) */
	CNT_ICMP_TOO_BIG,   /* TUNNEL, NAT64 replies: a packet too big for the encapsulation (or, NAT64, for IPv6)
			     * answered with ICMP fragmentation needed (IPv4 with DF) or ICMPv6 Packet Too Big */
	CNT_CONN_REUSED,    /* a SYN on a finished flow's tuple, or on a flow whose real server takes no new flows:
			     * the old entries are dropped and the SYN scheduled afresh (LVS conn_reuse_mode,
			     * expire_nodest_conn) */
	CNT_LPORT_RECLAIMED, /* a local port held by a flow idle past its timeout (not yet swept) given to a new flow */
	CNT_DROP_MARTIAN,   /* a packet that would open a flow from a source no flow can have: a martian address
			     * (0/8, 127/8, 224/4, 255.255.255.255; ::, ::1, ff00::/8, ::ffff:0:0/96), its own
			     * destination (land attack), a multicast or broadcast Ethernet source, or port 0; also a
			     * TUNNEL "too big" that would be answered to such a source */
	CNT_DROP_IPV6_EXTHDR, /* IPv6 to one of our addresses starting with an extension header the fast path does not
			       * walk (Hop-by-Hop, Routing, Destination Options, ...): not balanced, and not the kernel's */
	CNT_ND_REPLY,       /* IPv6 neighbour solicitation for an owned address answered in XDP (no slow path up):
			     * ARP_REPLY's counterpart */
	CNT_DROP_ICMP_RATELIMIT, /* ICMP to an owned address (echo, an error to translate) over what the slow path is
				  * given (PUNT_RATE a second): dropped so a ping flood cannot crowd ARP, ND and
				  * probe replies out of its socket (ARP/NS beyond theirs are answered in XDP) */
	CNT_ECHO_REPLY,     /* ICMP/ICMPv6 echo request to an owned address answered in XDP (no slow path up):
			     * ARP_REPLY's and ND_REPLY's counterpart for ping */
	CNT_MAX,
};

#endif /* HDSLB_ABI_H */
