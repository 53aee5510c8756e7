/* Fragment tracking: a later fragment gets the ports of its datagram.
 *
 * Only the first fragment of a datagram carries the L4 header, so a later one
 * cannot be judged on its own. The first fragment's ports are remembered in an
 * LRU map keyed by (family, protocol, fragment id, addresses); a later fragment
 * takes them from there, and so gets the verdict (conntrack entry, policy,
 * translation) of its datagram. A later fragment whose first fragment was never
 * seen (evicted, reordered, or never sent) has no ports: the caller drops it
 * with WEIR_REASON_FRAG_NOT_FOUND. Entries are never deleted: the LRU evicts
 * them, and a reused id overwrites its old entry.
 *
 * One map for every object, pinned under globals/. An object that changes the
 * addresses of a datagram (DNAT) sees its fragments under the old addresses and
 * the objects after it under the new ones: the key holds both addresses, so the
 * two never meet.
 */
#pragma once

#include <bpf/bpf_helpers.h>
#include "defs.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEIR_FRAG_MAX);
	__type(key, struct weir_frag_key);
	__type(value, struct weir_frag_ports);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} frag_datagrams SEC(".maps");

static __always_inline void frag_key(struct weir_frag_key *key, const struct flow *f)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->family = f->family;
	key->proto = f->proto;
	key->id = f->frag_id;
	__builtin_memcpy(key->saddr, f->saddr, 16);
	__builtin_memcpy(key->daddr, f->daddr, 16);
}

/* Protocols whose flows have ports in parse_l4(); fragments of others need no tracking. */
static __always_inline int proto_has_ports(__u8 proto)
{
	return proto == WEIR_IP_PROTO_TCP || proto == WEIR_IP_PROTO_UDP || proto == WEIR_IP_PROTO_SCTP ||
	       proto == WEIR_IP_PROTO_ICMP || proto == WEIR_IP_PROTO_ICMPV6;
}

/* Give a fragment its datagram's ports: a first fragment records them, a later
 * one reads them into *f (l4_ok set). Returns 0, or -WEIR_REASON_FRAG_NOT_FOUND
 * for a later fragment of a datagram this node has not seen begin. Whole
 * datagrams cost one comparison.
 */
static __always_inline int frag_track(struct flow *f)
{
	struct weir_frag_key key;
	struct weir_frag_ports ports, *known;

	if (f->frag == FLOW_FRAG_NONE || !proto_has_ports(f->proto))
		return 0;
	frag_key(&key, f);
	if (f->frag == FLOW_FRAG_FIRST) {
		ports.sport = f->sport;
		ports.dport = f->dport;
		bpf_map_update_elem(&frag_datagrams, &key, &ports, BPF_ANY);
		return 0;
	}
	known = bpf_map_lookup_elem(&frag_datagrams, &key);
	if (!known)
		return -WEIR_REASON_FRAG_NOT_FOUND;
	f->sport = known->sport;
	f->dport = known->dport;
	f->l4_ok = 1;
	return 0;
}

/* parse_skb() and frag_track() together: the flow of a TC packet with the
 * ports of its datagram. Returns PARSE_IP, PARSE_NOT_IP or -reason.
 */
static __always_inline int parse_skb_tracked(struct __sk_buff *skb, struct flow *f)
{
	int ret = parse_skb(skb, f);

	if (ret != PARSE_IP)
		return ret;
	return frag_track(f);
}
