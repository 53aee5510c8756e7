/* Conntrack: one LRU map of connections for both families, shared by objects.
 *
 * An entry is keyed by the tuple as first seen at one hook direction. A packet
 * of the same connection in the same direction matches its key; a reply
 * matches the reversed tuple at the opposite direction. TCP lifetimes follow
 * SYN/FIN/RST; the policy service deletes expired entries, and an expired
 * entry is treated as absent.
 */
#pragma once

#include "weir/chain.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEIR_CT_MAX);
	__type(key, struct weir_ct_key);
	__type(value, struct weir_ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} conntrack SEC(".maps");

#define NSEC_PER_SEC 1000000000ULL
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04

enum ct_result { CT_NEW, CT_ESTABLISHED, CT_REPLY };

static __always_inline void ct_key_from_flow(struct weir_ct_key *key, const struct flow *f, __u8 dir)
{
	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(key->saddr, f->saddr, 16);
	__builtin_memcpy(key->daddr, f->daddr, 16);
	key->proto = f->proto;
	key->family = f->family;
	key->dir = dir;
	if (f->proto == IPPROTO_TCP || f->proto == IPPROTO_UDP) {
		key->sport = f->sport;
		key->dport = f->dport;
	} else {
		/* ICMP echo: the id on both sides, so request and reply share a tuple. */
		key->sport = f->sport;
		key->dport = f->sport;
	}
}

static __always_inline void ct_reverse(struct weir_ct_key *rev, const struct weir_ct_key *key)
{
	__builtin_memcpy(rev->saddr, key->daddr, 16);
	__builtin_memcpy(rev->daddr, key->saddr, 16);
	rev->sport = key->dport;
	rev->dport = key->sport;
	rev->proto = key->proto;
	rev->family = key->family;
	rev->dir = key->dir ^ 1;
	rev->pad = 0;
}

static __always_inline __u64 ct_lifetime(const struct weir_ct_value *ct, __u8 proto)
{
	if (proto != IPPROTO_TCP)
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
static __always_inline void ct_touch(struct weir_ct_value *ct, __u8 proto, __u8 tcp_flags, int reply,
				     __u64 bytes, __u64 now)
{
	__u16 flags = ct->flags;

	if (reply)
		flags |= WEIR_CT_FLAG_REPLY_SEEN;
	if (tcp_flags & TCP_FLAG_RST)
		flags |= WEIR_CT_FLAG_RST;
	if (tcp_flags & TCP_FLAG_FIN)
		flags |= reply ? WEIR_CT_FLAG_RX_CLOSING : WEIR_CT_FLAG_TX_CLOSING;
	ct->flags = flags;
	__sync_fetch_and_add(&ct->packets, 1);
	__sync_fetch_and_add(&ct->bytes, bytes);
	ct->expires = now + ct_lifetime(ct, proto) * NSEC_PER_SEC;
}

/* Find the connection of this packet: same direction, or the reply of one. */
static __always_inline int ct_lookup(const struct weir_ct_key *key, __u8 tcp_flags, __u64 bytes,
				     struct weir_ct_value **out)
{
	struct weir_ct_key rev;
	struct weir_ct_value *ct;
	__u64 now = bpf_ktime_get_ns();

	ct = bpf_map_lookup_elem(&conntrack, key);
	if (ct && ct->expires > now) {
		/* A SYN on a closed entry starts a new connection on the same tuple. */
		if ((tcp_flags & TCP_FLAG_SYN) && !(tcp_flags & 0x10) &&
		    (ct->flags & (WEIR_CT_FLAG_RST | WEIR_CT_FLAG_TX_CLOSING)))
			return CT_NEW;
		ct_touch(ct, key->proto, tcp_flags, 0, bytes, now);
		*out = ct;
		return CT_ESTABLISHED;
	}
	ct_reverse(&rev, key);
	ct = bpf_map_lookup_elem(&conntrack, &rev);
	if (ct && ct->expires > now) {
		ct_touch(ct, key->proto, tcp_flags, 1, bytes, now);
		*out = ct;
		return CT_REPLY;
	}
	return CT_NEW;
}

static __always_inline void ct_create(const struct weir_ct_key *key, __u8 tcp_flags, __u64 bytes,
				      __u32 src_identity)
{
	struct weir_ct_value ct = {};

	ct.src_identity = src_identity;
	ct.packets = 1;
	ct.bytes = bytes;
	if (tcp_flags & TCP_FLAG_RST)
		ct.flags |= WEIR_CT_FLAG_RST;
	if (tcp_flags & TCP_FLAG_FIN)
		ct.flags |= WEIR_CT_FLAG_TX_CLOSING;
	ct.expires = bpf_ktime_get_ns() + ct_lifetime(&ct, key->proto) * NSEC_PER_SEC;
	bpf_map_update_elem(&conntrack, key, &ct, BPF_ANY);
}
