/* Endpoint policy maps and their lookup, shared by every program that asks
 * "does this endpoint's policy allow this flow?" (the policy program, and the
 * socket layer before it accelerates a connection).
 *
 * An endpoint's policy map is an LPM trie keyed (direction, identity, protocol,
 * port prefix); the policy service computes it so that one lookup under the
 * peer's identity, then one under "any identity", gives the final verdict.
 */
#pragma once

#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "weir/defs.h"
#include "weir/policy_defs.h"

#define INNER_PLACEHOLDER 1 /* real sizes are chosen by the service */

/* Template of an endpoint's policy map (sizes only; see prefilter.bpf.c why). */
struct policy_inner {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, INNER_PLACEHOLDER);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(key_size, sizeof(struct weir_policy_key));
	__uint(value_size, sizeof(struct weir_policy_entry));
};

/* Endpoint id -> that endpoint's policy map; swapped whole on recompute. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, WEIR_POLICY_MAX_ENDPOINTS);
	__type(key, __u32);
	__array(values, struct policy_inner);
} policy_maps SEC(".maps");

/* Endpoint id -> enforcement flags (ingress, egress, audit). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_POLICY_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct weir_endpoint_policy_config);
} policy_config SEC(".maps");

/* Rule id (PolicyEntry.rule) -> the rule's name; written by the policy service,
 * read by the orchestrator to name the rule behind a flow. Never read here.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_RULE_NAMES_MAX);
	__type(key, __u32);
	__type(value, struct weir_rule_name);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy_rule_names SEC(".maps");

enum verdict { VERDICT_NONE, VERDICT_ALLOW, VERDICT_DENY };

static __always_inline struct weir_policy_entry *policy_lookup_one(void *inner, __u8 dir, __u32 identity,
								  __u8 proto, __u16 port)
{
	struct weir_policy_key key = { .prefixlen = WEIR_POLICY_PREFIX_FULL, .dir = dir, .proto = proto };
	__u32 id_be = bpf_htonl(identity);

	__builtin_memcpy(key.identity, &id_be, 4);
	__builtin_memcpy(key.port, &port, 2);
	return bpf_map_lookup_elem(inner, &key);
}

/* The verdict of a flow; *proxy_port (host order) is the allow entry's L7 proxy port, 0 when none;
 * *rule the id of the rule behind the entry that matched (0 when none matched).
 */
static __always_inline int policy_verdict_rule(__u32 ep, __u8 dir, __u32 identity, __u8 proto, __u16 port,
					       __u64 bytes, __u16 *proxy_port, __u32 *rule)
{
	struct weir_policy_entry *e;
	void *inner = bpf_map_lookup_elem(&policy_maps, &ep);

	*proxy_port = 0;
	*rule = 0;
	if (!inner)
		return VERDICT_NONE;
	e = policy_lookup_one(inner, dir, identity, proto, port);
	if (!e)
		e = policy_lookup_one(inner, dir, WEIR_RESERVED_IDENTITY_UNKNOWN, proto, port);
	if (!e)
		return VERDICT_NONE;
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, bytes);
	*rule = e->rule;
	if (e->flags & WEIR_POLICY_FLAG_DENY)
		return VERDICT_DENY;
	*proxy_port = e->proxy_port;
	return VERDICT_ALLOW;
}

static __always_inline int policy_verdict(__u32 ep, __u8 dir, __u32 identity, __u8 proto, __u16 port,
					  __u64 bytes, __u16 *proxy_port)
{
	__u32 rule;

	return policy_verdict_rule(ep, dir, identity, proto, port, bytes, proxy_port, &rule);
}
