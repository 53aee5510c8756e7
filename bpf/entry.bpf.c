/* The orchestrator's entry programs: one per hook point. Each fills the chain
 * metadata and tail-calls the first filled slot of its hook's call map.
 */
#include "weir/chain.h"

SEC("tc")
int entry_from_container(struct __sk_buff *skb)
{
	return weir_tc_entry(skb, WEIR_HOOK_FROM_CONTAINER, &calls_from_container);
}

SEC("tc")
int entry_to_container(struct __sk_buff *skb)
{
	return weir_tc_entry(skb, WEIR_HOOK_TO_CONTAINER, &calls_to_container);
}

SEC("tc")
int entry_from_network(struct __sk_buff *skb)
{
	return weir_tc_entry(skb, WEIR_HOOK_FROM_NETWORK, &calls_from_network);
}

SEC("tc")
int entry_to_network(struct __sk_buff *skb)
{
	return weir_tc_entry(skb, WEIR_HOOK_TO_NETWORK, &calls_to_network);
}

SEC("xdp")
int entry_xdp(struct xdp_md *ctx)
{
	return weir_xdp_entry(ctx);
}

char LICENSE[] SEC("license") = "GPL";
