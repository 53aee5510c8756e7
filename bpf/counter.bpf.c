/* A minimal object: counts the packets it sees per hook and hands them on.
 * Used by tests and benchmarks to stand in for a real object in any slot.
 */
#include "weir/chain.h"

/* Packets and bytes seen by this instance of the object, per hook, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_NUM_HOOKS);
	__type(key, __u32);
	__type(value, struct weir_counter);
} counter_stats SEC(".maps");

static __always_inline void count(__u32 hook, __u64 bytes)
{
	struct weir_counter *c = bpf_map_lookup_elem(&counter_stats, &hook);

	if (c)
		counter_add(c, bytes);
}

#define COUNTER_TC(name, hook, calls)                    \
	SEC("tc")                                        \
	int name(struct __sk_buff *skb)                  \
	{                                                \
		count(hook, skb->len);                   \
		return weir_tc_next(skb, calls);         \
	}

COUNTER_TC(count_from_container, WEIR_HOOK_FROM_CONTAINER, &calls_from_container)
COUNTER_TC(count_to_container, WEIR_HOOK_TO_CONTAINER, &calls_to_container)
COUNTER_TC(count_from_network, WEIR_HOOK_FROM_NETWORK, &calls_from_network)
COUNTER_TC(count_to_network, WEIR_HOOK_TO_NETWORK, &calls_to_network)

SEC("xdp")
int count_xdp(struct xdp_md *ctx)
{
	count(WEIR_HOOK_XDP, ctx->data_end - ctx->data);
	return weir_xdp_next(ctx);
}

/* Does nothing: the floor a chain's cost is measured against (bench/chain_cost.py). */
SEC("tc")
int empty_tc(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
