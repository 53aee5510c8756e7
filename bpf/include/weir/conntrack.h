/* Conntrack: one LRU map of connections for both families, one API for every object.
 *
 * An entry is keyed by a tuple (addresses, ports in network order, protocol,
 * family) and a scope (enum weir_ct_scope, the key's `dir`): policy's INGRESS
 * and EGRESS, the load balancer's SERVICE and REV_NAT. A lookup says which way
 * it looks (CT_LOOKUP_FORWARD: the tuple as the packet has it; CT_LOOKUP_REVERSE:
 * the packet is the reply of an entry; CT_LOOKUP_BIDIR: both, forward first).
 * The reply of a directional (policy) entry is the reversed tuple in the other
 * direction; the reply of an LB entry is the reversed tuple in the same scope.
 *
 * TCP lifetimes follow SYN/FIN/RST; an expired entry is treated as absent, and
 * a SYN on an entry whose connection closed starts a new one on the same tuple.
 * UDP, SCTP and ICMP echo live WEIR_CT_LIFETIME_NON_TCP after their last
 * packet. An ICMP error belongs to the connection it quotes (ct_related) and
 * never has an entry of its own. The node deletes expired entries.
 */
#pragma once

#include <bpf/bpf_helpers.h>
#include "defs.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEIR_CT_MAX);
	__type(key, struct weir_ct_key);
	__type(value, struct weir_ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} conntrack SEC(".maps");

#define NSEC_PER_SEC 1000000000ULL

/* Which way a lookup looks (flags). */
#define CT_LOOKUP_FORWARD 1
#define CT_LOOKUP_REVERSE 2
#define CT_LOOKUP_BIDIR (CT_LOOKUP_FORWARD | CT_LOOKUP_REVERSE)

enum ct_result { CT_NEW, CT_ESTABLISHED, CT_REPLY };

/* What one packet brings to an entry, and when (read once per packet). */
struct ct_packet {
	__u64 now; /* CLOCK_MONOTONIC ns, coarse: see ct_packet_init */
	__u64 bytes;
	__u8 tcp_flags;
};

static __always_inline void ct_packet_init(struct ct_packet *pkt, const struct flow *f, __u64 bytes)
{
	/* The coarse clock (one tick behind at most) costs ~30 ns less per packet than
	 * bpf_ktime_get_ns (bench/chain_cost.py); lifetimes are seconds. */
	pkt->now = bpf_ktime_get_coarse_ns();
	pkt->bytes = bytes;
	pkt->tcp_flags = f->tcp_flags;
}

static __always_inline int tcp_syn_only(__u8 tcp_flags)
{
	return (tcp_flags & WEIR_TCP_FLAG_SYN) && !(tcp_flags & WEIR_TCP_FLAG_ACK);
}

/* The key of a tuple; addresses are 16 bytes (IPv4 in the first 4). */
static __always_inline void ct_key_init(struct weir_ct_key *key, __u8 family, __u8 proto, const void *saddr,
					const void *daddr, __be16 sport, __be16 dport, __u8 scope)
{
	__builtin_memset(key, 0, sizeof(*key));
	if (family == WEIR_FAMILY_INET) {
		__builtin_memcpy(key->saddr, saddr, 4);
		__builtin_memcpy(key->daddr, daddr, 4);
	} else {
		__builtin_memcpy(key->saddr, saddr, 16);
		__builtin_memcpy(key->daddr, daddr, 16);
	}
	key->sport = sport;
	key->dport = dport;
	key->proto = proto;
	key->family = family;
	key->dir = scope;
}

/* The key of a parsed packet. TCP, UDP and SCTP key on both ports; ICMP echo
 * uses the id on both sides, so request and reply share a tuple.
 */
static __always_inline void ct_key_from_flow(struct weir_ct_key *key, const struct flow *f, __u8 scope)
{
	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(key->saddr, f->saddr, 16);
	__builtin_memcpy(key->daddr, f->daddr, 16);
	key->proto = f->proto;
	key->family = f->family;
	key->dir = scope;
	key->sport = f->sport;
	if (f->proto == WEIR_IP_PROTO_TCP || f->proto == WEIR_IP_PROTO_UDP || f->proto == WEIR_IP_PROTO_SCTP)
		key->dport = f->dport;
	else
		key->dport = f->sport;
}

/* The key a reply to `key` would have. */
static __always_inline void ct_reverse(struct weir_ct_key *rev, const struct weir_ct_key *key)
{
	__builtin_memcpy(rev->saddr, key->daddr, 16);
	__builtin_memcpy(rev->daddr, key->saddr, 16);
	rev->sport = key->dport;
	rev->dport = key->sport;
	rev->proto = key->proto;
	rev->family = key->family;
	rev->dir = key->dir <= WEIR_CT_SCOPE_EGRESS ? key->dir ^ 1 : key->dir;
	rev->pad = 0;
}

static __always_inline __u64 ct_lifetime(const struct weir_ct_value *ct, __u8 proto)
{
	if (proto != WEIR_IP_PROTO_TCP)
		return WEIR_CT_LIFETIME_NON_TCP;
	if (ct->flags & WEIR_CT_FLAG_RST)
		return WEIR_CT_LIFETIME_TCP_CLOSE;
	if ((ct->flags & (WEIR_CT_FLAG_TX_CLOSING | WEIR_CT_FLAG_RX_CLOSING)) ==
	    (WEIR_CT_FLAG_TX_CLOSING | WEIR_CT_FLAG_RX_CLOSING))
		return WEIR_CT_LIFETIME_TCP_CLOSE;
	if (ct->flags & WEIR_CT_FLAG_REPLY_SEEN)
		return WEIR_CT_LIFETIME_TCP_ESTABLISHED;
	return WEIR_CT_LIFETIME_TCP_SYN;
}

/* Account one packet to an entry and move its TCP state and expiry on. */
static __always_inline void ct_touch(struct weir_ct_value *ct, __u8 proto, const struct ct_packet *pkt, int reply)
{
	__u16 flags = ct->flags;

	if (reply)
		flags |= WEIR_CT_FLAG_REPLY_SEEN;
	if (pkt->tcp_flags & WEIR_TCP_FLAG_RST)
		flags |= WEIR_CT_FLAG_RST;
	if (pkt->tcp_flags & WEIR_TCP_FLAG_FIN)
		flags |= reply ? WEIR_CT_FLAG_RX_CLOSING : WEIR_CT_FLAG_TX_CLOSING;
	ct->flags = flags;
	__sync_fetch_and_add(&ct->packets, 1);
	__sync_fetch_and_add(&ct->bytes, pkt->bytes);
	ct->expires = pkt->now + ct_lifetime(ct, proto) * NSEC_PER_SEC;
}

/* The live entry of a key, untouched, or NULL. */
static __always_inline struct weir_ct_value *ct_get(const struct weir_ct_key *key, __u64 now)
{
	struct weir_ct_value *ct = bpf_map_lookup_elem(&conntrack, key);

	return ct && ct->expires > now ? ct : 0;
}

/* Find the connection of this packet in the ways `lookup` asks for and account
 * the packet to it. Returns CT_ESTABLISHED (the key's own entry), CT_REPLY (the
 * packet answers an entry) or CT_NEW; *out points at the entry found.
 */
static __always_inline int ct_lookup(const struct weir_ct_key *key, int lookup, const struct ct_packet *pkt,
				     struct weir_ct_value **out)
{
	struct weir_ct_key rev;
	struct weir_ct_value *ct;

	if (lookup & CT_LOOKUP_FORWARD) {
		ct = ct_get(key, pkt->now);
		if (ct) {
			if (tcp_syn_only(pkt->tcp_flags) &&
			    (ct->flags & (WEIR_CT_FLAG_RST | WEIR_CT_FLAG_TX_CLOSING)))
				return CT_NEW;
			ct_touch(ct, key->proto, pkt, 0);
			*out = ct;
			return CT_ESTABLISHED;
		}
	}
	if (lookup & CT_LOOKUP_REVERSE) {
		ct_reverse(&rev, key);
		ct = ct_get(&rev, pkt->now);
		if (ct) {
			ct_touch(ct, key->proto, pkt, 1);
			*out = ct;
			return CT_REPLY;
		}
	}
	return CT_NEW;
}

/* Whether the connection of a quoted tuple is known: `key` is the quoted
 * packet's tuple in the scope it was seen in, looked up as it is and as a reply.
 * Nothing is accounted: an error is not a packet of the connection.
 */
static __always_inline int ct_related(const struct weir_ct_key *key, __u64 now)
{
	struct weir_ct_key rev;

	if (ct_get(key, now))
		return 1;
	ct_reverse(&rev, key);
	return ct_get(&rev, now) != 0;
}

/* Create (or replace) the entry of a new connection from `init` (the owner's
 * fields: identity, backend, reverse-NAT index), with this packet accounted.
 */
static __always_inline void ct_create(const struct weir_ct_key *key, const struct weir_ct_value *init,
				      const struct ct_packet *pkt)
{
	struct weir_ct_value ct = *init;

	ct.packets = 1;
	ct.bytes = pkt->bytes;
	ct.flags = 0;
	if (pkt->tcp_flags & WEIR_TCP_FLAG_RST)
		ct.flags |= WEIR_CT_FLAG_RST;
	if (pkt->tcp_flags & WEIR_TCP_FLAG_FIN)
		ct.flags |= WEIR_CT_FLAG_TX_CLOSING;
	ct.expires = pkt->now + ct_lifetime(&ct, key->proto) * NSEC_PER_SEC;
	bpf_map_update_elem(&conntrack, key, &ct, BPF_ANY);
}

static __always_inline void ct_delete(const struct weir_ct_key *key)
{
	bpf_map_delete_elem(&conntrack, key);
}
