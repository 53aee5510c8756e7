/* Endpoint policy: stateful L3/L4 enforcement per endpoint, both directions.
 *
 * In the from-container chain the program enforces the source endpoint's
 * egress policy; in the to-container chain, the destination endpoint's
 * ingress policy. A packet of a known connection (or its reply) passes on its
 * conntrack entry; a new one is looked up in the endpoint's policy map under
 * the peer's identity (from the ipcache), then under "any identity". The
 * service computes the maps so that one lookup gives the final verdict (deny
 * rules already win over allows there). An endpoint that no rule selects in a
 * direction is not enforced in that direction; one in audit mode records the
 * verdict and lets the packet pass.
 *
 * Packets are judged on their real L4 ports: the parser walks VLAN tags, IPv4
 * options and IPv6 extension headers, and a later fragment takes the ports of
 * its datagram's first fragment (frag.h), so it shares the datagram's
 * conntrack entry and verdict.
 */
#include "weir/chain.h"
#include "weir/conntrack.h"
#include "weir/frag.h"
#include "weir/ipcache.h"
#include "weir/policy.h"

/* IPv6 link control is never subject to policy: neighbour discovery and router
 * messages, and anything to a link-local-scope multicast group (MLD reports).
 */
static __always_inline int is_nd(const struct flow *f)
{
	__u8 type = bpf_ntohs(f->dport) >> 8;

	if (f->family == WEIR_FAMILY_INET6 && f->daddr[0] == 0xff && (f->daddr[1] & 0x0f) == 0x02)
		return 1;
	return f->proto == WEIR_IP_PROTO_ICMPV6 && type >= 133 && type <= 137;
}

/* The port the policy keys on: TCP/UDP destination port, ICMP type (both network order). */
static __always_inline __u16 policy_port(const struct flow *f)
{
	if (f->proto == WEIR_IP_PROTO_ICMP || f->proto == WEIR_IP_PROTO_ICMPV6)
		return bpf_htons(bpf_ntohs(f->dport) >> 8);
	return f->dport;
}

/* Enforce the endpoint's policy in one direction. A packet of an endpoint hook
 * on an interface no endpoint owns is dropped (UNKNOWN_ENDPOINT); so is one the
 * parser refuses (its reason) and a later fragment of a datagram whose first
 * fragment was not seen (FRAG_NOT_FOUND). Non-IP packets pass.
 */
static __always_inline int enforce(struct __sk_buff *skb, __u8 dir, void *calls)
{
	__u32 ep = skb->cb[WEIR_CB_ENDPOINT];
	struct weir_endpoint_policy_config *cfg;
	struct weir_ct_value *ct = 0, init = {};
	struct weir_ct_key key;
	struct ct_packet pkt;
	struct flow f;
	__u32 peer, self_identity;
	int ret, verdict;

	if (!ep)
		return weir_tc_drop(skb, WEIR_REASON_UNKNOWN_ENDPOINT);
	ret = parse_skb_tracked(skb, &f);
	if (ret == PARSE_NOT_IP)
		return weir_tc_next(skb, calls); /* ARP and the like */
	if (ret < 0)
		return weir_tc_drop(skb, -ret);
	if (is_nd(&f))
		return weir_tc_next(skb, calls);

	ct_packet_init(&pkt, &f, skb->len);
	ct_key_from_flow(&key, &f, dir);
	if (ct_lookup(&key, CT_LOOKUP_BIDIR, &pkt, &ct) != CT_NEW)
		return weir_tc_next(skb, calls);

	peer = ipcache_identity(f.family, dir == WEIR_DIRECTION_EGRESS ? f.daddr : f.saddr);
	self_identity = ipcache_identity(f.family, dir == WEIR_DIRECTION_EGRESS ? f.saddr : f.daddr);
	init.src_identity = dir == WEIR_DIRECTION_EGRESS ? self_identity : peer;
	cfg = bpf_map_lookup_elem(&policy_config, &ep);
	if (!cfg || !(cfg->flags & (dir == WEIR_DIRECTION_EGRESS ? WEIR_CONFIG_FLAG_EGRESS_ENFORCED
								     : WEIR_CONFIG_FLAG_INGRESS_ENFORCED))) {
		ct_create(&key, &init, &pkt);
		return weir_tc_next(skb, calls);
	}
	verdict = policy_verdict(ep, dir, peer, f.l4_ok ? f.proto : 0, policy_port(&f), skb->len);
	if (verdict == VERDICT_ALLOW) {
		ct_create(&key, &init, &pkt);
		skb->cb[WEIR_CB_SRC_IDENTITY] = init.src_identity;
		return weir_tc_next(skb, calls);
	}
	if (cfg->flags & WEIR_CONFIG_FLAG_AUDIT) {
		metrics_bump(WEIR_REASON_POLICY_AUDIT, dir, skb->len);
		emit_event(WEIR_EVENT_TYPE_VERDICT, WEIR_REASON_POLICY_AUDIT, skb->cb[WEIR_CB_HOOK], skb->ifindex,
			   ep, init.src_identity, (void *)(long)skb->data, (void *)(long)skb->data_end);
		ct_create(&key, &init, &pkt);
		return weir_tc_next(skb, calls);
	}
	skb->cb[WEIR_CB_SRC_IDENTITY] = init.src_identity;
	return weir_tc_drop(skb, verdict == VERDICT_DENY ? WEIR_REASON_POLICY_DENY_RULE : WEIR_REASON_POLICY_DENIED);
}

SEC("tc")
int policy_egress(struct __sk_buff *skb)
{
	return enforce(skb, WEIR_DIRECTION_EGRESS, &calls_from_container);
}

SEC("tc")
int policy_ingress(struct __sk_buff *skb)
{
	return enforce(skb, WEIR_DIRECTION_INGRESS, &calls_to_container);
}

char LICENSE[] SEC("license") = "GPL";
