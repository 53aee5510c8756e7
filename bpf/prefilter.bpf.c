/* Prefilter: drop packets whose source address is on a deny list, at XDP.
 *
 * Its other mode (off by default; pf_config's VALID_DESTINATIONS bit): drop
 * packets whose destination is neither a local endpoint nor a node address (both
 * from the ipcache: a label identity or the host's) nor in pf_valid_dst (the
 * service frontends and the destinations the operator added), as
 * INVALID_DESTINATION. Multicast, broadcast and non-IP frames pass.
 *
 * Exact hosts (/32, /128) live in hash maps, shorter IPv6 prefixes in an LPM
 * trie, shorter IPv4 prefixes in a hash keyed like the trie (length, masked
 * address). An IPv4 source is first placed (services/prefilter/gates.py): its
 * /16's span (an array slot) names the lengths below 24 that cover or lie in
 * the /16 and whether any /24 of it holds entries of length 24..32; such a /24
 * has a block naming those lengths and, exactly, the addresses they cover (in
 * a page array for the densest spans, else a hash). A miss far from every entry
 * costs one array read, a miss next to entries one block read more, whatever
 * the size of the list (bench/prefilter_cost.py);
 * only a covered address and the lengths a span names are walked, longest
 * first, in the hashes. All kinds exist in two
 * generations (outer ARRAY_OF_MAPS with one inner map per generation) and
 * `pf_active` names the live one, so a bulk replace fills the other
 * generation and flips one word: no packet sees a half-written list.
 *
 * The program runs in the PREFILTER slot of calls_xdp, behind the
 * orchestrator's entry_xdp, and hands passed packets to the next filled slot.
 */
#include "weir/chain.h"
#include "weir/ipcache.h"
#include "weir/prefilter_defs.h"

#define INNER_PLACEHOLDER 1 /* real sizes are chosen by the service: hash and LPM inner maps may differ in max_entries */

/* Inner map templates give sizes, not BTF types: clang 14 emits the key and
 * value structs of a template that no variable instantiates as forward
 * declarations, which libbpf cannot size.
 */

struct v4_host_inner {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, INNER_PLACEHOLDER);
	__uint(key_size, sizeof(struct weir_v4_addr));
	__uint(value_size, sizeof(struct weir_prefilter_entry));
};

struct v6_host_inner {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, INNER_PLACEHOLDER);
	__uint(key_size, sizeof(struct weir_v6_addr));
	__uint(value_size, sizeof(struct weir_prefilter_entry));
};

struct v4_lpm_inner {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, INNER_PLACEHOLDER);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(key_size, sizeof(struct weir_lpm_v4_key));
	__uint(value_size, sizeof(struct weir_prefilter_entry));
};

/* An array without BPF_F_INNER_MAP: every inner map has the template's size, so lookups are inlined. */
struct v4_span_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WEIR_PREFILTER_V4_SPANS);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(struct weir_v4_span));
};

struct v4_page_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WEIR_PREFILTER_V4_PAGES);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(struct weir_v4_block));
};

struct v4_block_inner {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, INNER_PLACEHOLDER);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(struct weir_v4_block));
};

struct v6_lpm_inner {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, INNER_PLACEHOLDER);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(key_size, sizeof(struct weir_lpm_v6_key));
	__uint(value_size, sizeof(struct weir_prefilter_entry));
};

#define OUTER(name, inner)                                     \
	struct {                                               \
		__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);      \
		__uint(max_entries, WEIR_PREFILTER_GENERATIONS); \
		__type(key, __u32);                            \
		__array(values, struct inner);                 \
	} name SEC(".maps")

/* Deny lists by generation; index = generation. */
OUTER(pf_v4_host, v4_host_inner);
OUTER(pf_v6_host, v6_host_inner);
OUTER(pf_v4_lpm, v4_lpm_inner); /* by (length, masked address), despite the name */
OUTER(pf_v4_span, v4_span_inner); /* /16 (host order) -> lengths below 24 + SPAN_LONG */
OUTER(pf_v4_block, v4_block_inner); /* /24 (host order) -> lengths 24..32 and the addresses they cover */
OUTER(pf_v4_page, v4_page_inner); /* the blocks of paged spans: span.page - 1 + the /24's third octet */
OUTER(pf_v6_lpm, v6_lpm_inner);

/* The live generation: one __u32 at index 0. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} pf_active SEC(".maps");

/* Key 0: the prefilter's mode bits (enum weir_prefilter_config_flag). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} pf_config SEC(".maps");

/* Valid destinations the ipcache does not say: frontends and the operator's (enum weir_valid_destination). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, WEIR_PREFILTER_VALID_DST_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weir_ipcache_key);
	__type(value, __u32);
} pf_valid_dst SEC(".maps");

/* Hits per entry, by the entry's id; sized by the service before load. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_PREFILTER_STATS_DEFAULT);
	__type(key, __u32);
	__type(value, struct weir_counter);
} pf_entry_stats SEC(".maps");

/* Totals per ingress interface. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, WEIR_PREFILTER_MAX_INTERFACES);
	__type(key, __u32);
	__type(value, struct weir_if_stats);
} pf_if_stats SEC(".maps");

/* The entry of length `len` (0..31) covering host-order address `h`, if any. */
static __always_inline struct weir_prefilter_entry *v4_net(void *nets, __u32 h, __u32 len)
{
	struct weir_lpm_v4_key key = { .prefixlen = len };
	__u32 masked = len ? bpf_htonl(h & (~0u << (32 - len))) : 0;

	__builtin_memcpy(key.addr, &masked, 4);
	return bpf_map_lookup_elem(nets, &key);
}

/* The longest entry of length 24..32 covering h, from its block (NULL: none, or a change under way):
 * in the page array when the span has pages, else in the block hash.
 */
static __always_inline struct weir_prefilter_entry *lookup_v4_block(__u32 gen, __u32 h, __be32 saddr, __u32 page,
								    void *nets)
{
	struct weir_prefilter_entry *e;
	struct weir_v4_block *blk;
	struct weir_v4_addr host;
	__u32 slot = h >> (32 - WEIR_PREFILTER_V4_BLOCK_LEN), low = h & ((1u << (32 - WEIR_PREFILTER_V4_BLOCK_LEN)) - 1);
	__u32 lengths;
	void *blocks, *hosts;
	int len;

	/* Two call sites, kept apart: the verifier inlines an array's lookup only where every
	 * map reaching the call is that array (one shared call costs ~15 ns more per packet).
	 */
	if (page) {
		blocks = bpf_map_lookup_elem(&pf_v4_page, &gen);
		if (!blocks)
			return 0;
		slot = page - 1 + (slot & (WEIR_PREFILTER_V4_BLOCKS_PER_SPAN - 1));
		blk = bpf_map_lookup_elem(blocks, &slot);
		barrier_var(blk);
	} else {
		blocks = bpf_map_lookup_elem(&pf_v4_block, &gen);
		if (!blocks)
			return 0;
		blk = bpf_map_lookup_elem(blocks, &slot);
	}
	if (!blk || !(blk->covered[(low >> 3) & 31] & (1u << (low & 7))))
		return 0;
	lengths = blk->lengths;
	if (lengths & WEIR_PREFILTER_V4_BLOCK_HOSTS) {
		hosts = bpf_map_lookup_elem(&pf_v4_host, &gen);
		__builtin_memcpy(host.addr, &saddr, 4);
		e = hosts ? bpf_map_lookup_elem(hosts, &host) : 0;
		if (e)
			return e;
	}
	if (!nets)
		return 0;
#pragma unroll
	for (len = 31; len >= WEIR_PREFILTER_V4_BLOCK_LEN; len--) {
		if (!(lengths & (1u << (len - WEIR_PREFILTER_V4_BLOCK_LEN))))
			continue;
		e = v4_net(nets, h, len);
		if (e)
			return e;
	}
	return 0;
}

static __always_inline struct weir_prefilter_entry *lookup_v4(__u32 gen, __be32 saddr)
{
	struct weir_prefilter_entry *e;
	__u32 h = bpf_ntohl(saddr), slot = h >> (32 - WEIR_PREFILTER_V4_SPAN_LEN), span;
	struct weir_v4_span *v;
	void *spans, *nets;
	int len;

	spans = bpf_map_lookup_elem(&pf_v4_span, &gen);
	if (!spans)
		return 0;
	v = bpf_map_lookup_elem(spans, &slot);
	if (!v || !v->bits)
		return 0; /* nothing listed in or over this /16 */
	span = v->bits;
	nets = bpf_map_lookup_elem(&pf_v4_lpm, &gen);
	if (span & WEIR_PREFILTER_V4_SPAN_LONG) {
		e = lookup_v4_block(gen, h, saddr, v->page, nets);
		if (e)
			return e;
	}
	if (!nets || !(span & ((1u << WEIR_PREFILTER_V4_BLOCK_LEN) - 1)))
		return 0; /* no shorter length to try: skip the walk's tests */
#pragma unroll
	for (len = WEIR_PREFILTER_V4_BLOCK_LEN - 1; len >= 0; len--) {
		if (!(span & (1u << len)))
			continue;
		e = v4_net(nets, h, len);
		if (e)
			return e;
	}
	return 0;
}

static __always_inline struct weir_prefilter_entry *lookup_v6(__u32 gen, struct in6_addr *saddr)
{
	struct weir_lpm_v6_key key = { .prefixlen = 128 };
	struct weir_prefilter_entry *e = 0;
	struct weir_v6_addr host;
	void *inner;

	__builtin_memcpy(host.addr, saddr, 16);
	inner = bpf_map_lookup_elem(&pf_v6_host, &gen);
	if (inner)
		e = bpf_map_lookup_elem(inner, &host);
	if (e)
		return e;
	inner = bpf_map_lookup_elem(&pf_v6_lpm, &gen);
	if (!inner)
		return 0;
	__builtin_memcpy(key.addr, saddr, 16);
	return bpf_map_lookup_elem(inner, &key);
}

static __always_inline struct weir_if_stats *if_stats(__u32 ifindex)
{
	struct weir_if_stats *s = bpf_map_lookup_elem(&pf_if_stats, &ifindex);
	struct weir_if_stats zero = {};

	if (s)
		return s;
	bpf_map_update_elem(&pf_if_stats, &ifindex, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&pf_if_stats, &ifindex);
}

/* The entry that denies this packet's source, or NULL. */
static __always_inline struct weir_prefilter_entry *match(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct cursor c;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct ipv6hdr *ip6;
	__u32 zero = 0, *gen;
	int proto;

	gen = bpf_map_lookup_elem(&pf_active, &zero);
	if (!gen)
		return 0;
	cursor_init(&c, data, data_end);
	proto = parse_ethhdr(&c, &eth);
	if (proto == ETH_P_IP && parse_iphdr(&c, &ip) >= 0)
		return lookup_v4(*gen, ip->saddr);
	if (proto == ETH_P_IPV6 && parse_ipv6hdr(&c, &ip6) >= 0)
		return lookup_v6(*gen, &ip6->saddr);
	return 0;
}

static __always_inline int valid_dst_enforced(void)
{
	__u32 zero = 0, *flags = bpf_map_lookup_elem(&pf_config, &zero);

	return flags && (*flags & WEIR_PREFILTER_CONFIG_FLAG_VALID_DESTINATIONS);
}

/* Whether an address of `family` is a destination this node serves. */
static __always_inline int valid_address(__u8 family, const __u8 *addr)
{
	struct weir_ipcache_key key = {};
	__u32 identity = ipcache_identity(family, addr);

	if (identity == WEIR_RESERVED_IDENTITY_HOST ||
	    (identity >= WEIR_FIRST_LABEL_IDENTITY && identity < WEIR_FIRST_CIDR_IDENTITY))
		return 1;
	key.family = family;
	if (family == WEIR_FAMILY_INET) {
		key.prefixlen = 32 + 32;
		__builtin_memcpy(key.addr, addr, 4);
	} else {
		key.prefixlen = 32 + 128;
		__builtin_memcpy(key.addr, addr, 16);
	}
	return bpf_map_lookup_elem(&pf_valid_dst, &key) != 0;
}

/* The valid-destination check; non-IP, multicast and broadcast always pass. */
static __always_inline int valid_destination(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct cursor c;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct ipv6hdr *ip6;
	__u8 addr[16] = {};
	int proto;

	cursor_init(&c, data, data_end);
	proto = parse_ethhdr(&c, &eth);
	if (proto == ETH_P_IP && parse_iphdr(&c, &ip) >= 0) {
		__builtin_memcpy(addr, &ip->daddr, 4);
		if ((addr[0] & 0xf0) == 0xe0 || ip->daddr == 0xffffffff)
			return 1;
		return valid_address(WEIR_FAMILY_INET, addr);
	}
	if (proto == ETH_P_IPV6 && parse_ipv6hdr(&c, &ip6) >= 0) {
		__builtin_memcpy(addr, &ip6->daddr, 16);
		if (addr[0] == 0xff)
			return 1;
		return valid_address(WEIR_FAMILY_INET6, addr);
	}
	return 1;
}

SEC("xdp")
int prefilter_xdp(struct xdp_md *ctx)
{
	__u64 bytes = ctx->data_end - ctx->data;
	struct weir_prefilter_entry *e = match(ctx);
	struct weir_if_stats *ifs = if_stats(ctx->ingress_ifindex);
	struct weir_counter *hits;
	__u32 id;

	if (e) {
		id = e->id;
		hits = bpf_map_lookup_elem(&pf_entry_stats, &id);
		if (hits)
			counter_add(hits, bytes);
		if (!(e->flags & WEIR_ENTRY_FLAG_AUDIT)) {
			if (ifs)
				counter_add(&ifs->dropped, bytes);
			metrics_bump(WEIR_REASON_PREFILTER_DENIED, WEIR_DIRECTION_INGRESS, bytes);
			/* The line-rate path: its events have a kind (limit, sampling) of their own. */
			emit_event(WEIR_EVENT_TYPE_DROP, WEIR_REASON_PREFILTER_DENIED, WEIR_HOOK_XDP, ctx->ingress_ifindex,
				   0, 0, (void *)(long)ctx->data, (void *)(long)ctx->data_end);
			return XDP_DROP;
		}
		if (ifs)
			counter_add(&ifs->audited, bytes);
	}
	if (valid_dst_enforced() && !valid_destination(ctx)) {
		if (ifs)
			counter_add(&ifs->dropped, bytes);
		return weir_xdp_drop(ctx, WEIR_REASON_INVALID_DESTINATION);
	}
	if (!e && ifs)
		counter_add(&ifs->passed, bytes);
	return weir_xdp_next(ctx);
}

char LICENSE[] SEC("license") = "GPL";
