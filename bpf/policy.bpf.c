/* Endpoint policy: stateful L3/L4 enforcement per endpoint, both directions.
 *
 * In the from-container chain the program enforces the source endpoint's
 * egress policy; in the to-container chain, the destination endpoint's
 * ingress policy. Every packet of the original direction, of a new connection
 * or an established one, is looked up in the endpoint's policy map under the
 * peer's identity (from the ipcache), then under "any identity"; replies and
 * related ICMP errors pass on their conntrack entry. The
 * service computes the maps so that one lookup gives the final verdict (deny
 * rules already win over allows there). An endpoint that no rule selects in a
 * direction is not enforced in that direction; one in audit mode records the
 * verdict and lets the packet pass.
 *
 * An allow entry with a proxy port sends the flow to the L7 proxy (l7.h): at
 * from-container by assigning the proxy's socket, at to-container through the
 * hairpin device. Such a flow never caches its verdict, so every packet of it
 * finds its entry (and the proxy) again, and a rule change that takes the proxy
 * port away sends the next packet direct. The proxy's upstream legs carry a
 * mark (Envoy's SO_MARK): from an egress listener, the client endpoint's
 * identity, which the destination's ingress policy judges in place of the
 * proxy's address; from an ingress listener, a flow this very policy admitted
 * before the proxy, which passes without another lookup (and without going to
 * the proxy again).
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
#include "weir/l7.h"
#include "weir/policy.h"

/* Endpoint id -> the revision of its policy (map and flags); the service bumps
 * it after every change. Key 0 holds the last revision issued. See policy_stamp().
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WEIR_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, __u32);
} policy_revisions SEC(".maps");

#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile typeof(x) *)&(x) = (v))

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

/* The port the policy keys on: TCP/UDP/SCTP destination port, ICMP type (both network order). */
static __always_inline __u16 policy_port(const struct flow *f)
{
	if (f->proto == WEIR_IP_PROTO_ICMP || f->proto == WEIR_IP_PROTO_ICMPV6)
		return bpf_htons(bpf_ntohs(f->dport) >> 8);
	return f->dport;
}

static __always_inline __u32 enforced_flag(__u8 dir)
{
	return dir == WEIR_DIRECTION_EGRESS ? WEIR_CONFIG_FLAG_EGRESS_ENFORCED : WEIR_CONFIG_FLAG_INGRESS_ENFORCED;
}

static __always_inline __u32 default_allow_flag(__u8 dir)
{
	return dir == WEIR_DIRECTION_EGRESS ? WEIR_CONFIG_FLAG_EGRESS_DEFAULT_ALLOW
					    : WEIR_CONFIG_FLAG_INGRESS_DEFAULT_ALLOW;
}

/* Whether an ICMP error quotes a connection conntrack knows. The quoted packet
 * went the other way through this same hook, so its tuple is looked up in the
 * other direction's scope, as it is (the connection's own packet) and reversed
 * (a reply of the connection). The whole packet is made linear first: the quote
 * may lie past the part parse_skb() pulled.
 */
static __always_inline int icmp_error_related(struct __sk_buff *skb, const struct flow *f, __u8 dir, __u64 now)
{
	struct weir_ct_key key;
	struct flow quoted;

	if (skb->data_end - skb->data < skb->len)
		bpf_skb_pull_data(skb, skb->len);
	if (parse_icmp_quoted((void *)(long)skb->data, (void *)(long)skb->data_end, f, &quoted) < 0)
		return 0;
	ct_key_from_flow(&key, &quoted, dir ^ 1);
	return ct_related(&key, now);
}

/* Whether a flow's conntrack key holds every input of its policy lookup but the
 * peer's identity (protocol and destination port): TCP, UDP and SCTP. An ICMP
 * entry is keyed by the echo id alone, so its packets' types are judged each time.
 */
static __always_inline int verdict_cacheable(const struct flow *f)
{
	return f->proto == WEIR_IP_PROTO_TCP || f->proto == WEIR_IP_PROTO_UDP || f->proto == WEIR_IP_PROTO_SCTP;
}

/* The stamp under which an allow verdict is cached: the endpoint's policy
 * revision and the ipcache generation, both read before every lookup they cover
 * (their writers bump them after the change), so a stamp never vouches for a
 * verdict from older maps. 0 (nothing cached) when either is unknown.
 */
static __always_inline __u64 policy_stamp(__u32 ep)
{
	__u32 *revision = bpf_map_lookup_elem(&policy_revisions, &ep), generation;
	__u32 rev = revision ? READ_ONCE(*revision) : 0;

	if (!rev)
		return 0;
	generation = ipcache_generation_now();
	if (!generation)
		return 0;
	return (__u64)rev << 32 | generation;
}

/* Hand an allowed flow to the proxy (see l7.h); a flow the proxy cannot take drops. */
static __always_inline int redirect_to_proxy(struct __sk_buff *skb, const struct flow *f, __u8 dir, __u32 ep,
					     __u32 src_identity, __u16 proxy_port, int new_flow, void *calls)
{
	__u32 zero = 0, *hairpin;

	if (f->family != WEIR_FAMILY_INET || f->proto != WEIR_IP_PROTO_TCP || !f->l4_ok)
		return weir_tc_drop(skb, WEIR_REASON_PROXY_UNAVAILABLE);
	if (dir == WEIR_DIRECTION_EGRESS) {
		if (l7_assign(skb, f, proxy_port) < 0)
			return weir_tc_drop(skb, WEIR_REASON_PROXY_UNAVAILABLE);
		skb->mark = WEIR_XFRM_MARK_L7_PROXY;
		if (new_flow)
			l7_event(skb, skb->cb[WEIR_CB_HOOK], ep, src_identity, proxy_port);
		return weir_tc_next(skb, calls);
	}
	hairpin = bpf_map_lookup_elem(&l7_hairpin, &zero);
	if (!hairpin || !*hairpin)
		return weir_tc_drop(skb, WEIR_REASON_PROXY_UNAVAILABLE);
	skb->mark = (__u32)proxy_port << WEIR_MARK_IDENTITY_SHIFT | WEIR_XFRM_MARK_L7_PROXY;
	if (new_flow)
		l7_event(skb, skb->cb[WEIR_CB_HOOK], ep, src_identity, proxy_port);
	metrics_bump(WEIR_REASON_FORWARDED, dir, skb->len);
	return bpf_redirect(*hairpin, BPF_F_INGRESS);
}

/* Enforce the endpoint's policy in one direction, on every packet of the
 * original direction: a new connection and an established one are judged alike,
 * so a policy change that denies an open connection cuts it at its next packet.
 * An established TCP/UDP/SCTP connection keeps the stamp (policy revision,
 * ipcache generation) of its last allow verdict; while both are unchanged the
 * lookup would give the same answer, so it is skipped. Replies of a known
 * connection pass without a lookup, and so do ICMP errors that quote one
 * (related); an error that quotes nothing known is judged as a new ICMP packet
 * of its type and never gets an entry of its own. With the direction's
 * default-allow flag, a packet no entry matches passes (deny entries still drop).
 *
 * A packet of an endpoint hook on an interface no endpoint owns is dropped
 * (UNKNOWN_ENDPOINT); so is one the parser refuses (its reason) and a later
 * fragment of a datagram whose first fragment was not seen (FRAG_NOT_FOUND).
 * Non-IP packets pass.
 */
static __always_inline int enforce(struct __sk_buff *skb, __u8 dir, void *calls)
{
	__u32 ep = skb->cb[WEIR_CB_ENDPOINT];
	struct weir_endpoint_policy_config *cfg;
	struct weir_ct_value *ct = 0, init = {};
	struct weir_ct_key key;
	struct ct_packet pkt;
	struct flow f;
	__u32 peer, src_identity, kind, rule = 0;
	__u64 stamp = 0;
	__u16 proxy_port = 0;
	int ret, verdict, state = CT_NEW, error;

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
	error = flow_is_icmp_error(&f);
	if (error) {
		if (icmp_error_related(skb, &f, dir, pkt.now))
			return weir_tc_next(skb, calls);
	} else {
		ct_key_from_flow(&key, &f, dir);
		state = ct_lookup(&key, CT_LOOKUP_BIDIR, &pkt, &ct);
		if (state == CT_REPLY)
			return weir_tc_next(skb, calls);
	}

	if (!error && verdict_cacheable(&f)) {
		stamp = policy_stamp(ep);
		if (ct && stamp && READ_ONCE(ct->policy_stamp) == stamp)
			return weir_tc_next(skb, calls); /* allowed under this very policy and ipcache */
	}
	cfg = bpf_map_lookup_elem(&policy_config, &ep);
	if (!cfg || !(cfg->flags & enforced_flag(dir))) {
		if (state == CT_NEW && !error) {
			init.src_identity = ipcache_identity(f.family, f.saddr);
			ct_create(&key, &init, &pkt);
		}
		return weir_tc_next(skb, calls);
	}
	kind = dir == WEIR_DIRECTION_INGRESS ? l7_mark_kind(skb->mark) : 0;
	/* The client's identity from the mark: an egress proxy's upstream (not the proxy's
	 * address), or a packet out of the overlay (its VNI, overlay.bpf.c: no ipcache lookup).
	 */
	if (kind == WEIR_XFRM_MARK_L7_FROM_EGRESS_PROXY || kind == WEIR_XFRM_MARK_OVERLAY)
		peer = l7_mark_identity(skb->mark);
	else
		peer = ipcache_identity(f.family, dir == WEIR_DIRECTION_EGRESS ? f.daddr : f.saddr);
	if (dir == WEIR_DIRECTION_INGRESS)
		src_identity = peer;
	else if (ct)
		src_identity = ct->src_identity; /* the endpoint's own, kept since the connection began */
	else
		src_identity = ipcache_identity(f.family, f.saddr);
	if (kind == WEIR_XFRM_MARK_L7_FROM_INGRESS_PROXY)
		verdict = VERDICT_ALLOW; /* admitted by this policy before it went to the proxy */
	else
		verdict = policy_verdict_rule(ep, dir, peer, f.l4_ok ? f.proto : 0, policy_port(&f), skb->len,
					      &proxy_port, &rule);
	if (verdict == VERDICT_NONE && (cfg->flags & default_allow_flag(dir)))
		verdict = VERDICT_ALLOW;
	init.src_identity = src_identity;
	if (verdict == VERDICT_ALLOW) {
		/* Never cached: each packet must find the proxy (or its absence); out of the overlay,
		 * the sender's identity is the VNI's, which can change with no local revision to say so.
		 */
		if (proxy_port || kind == WEIR_XFRM_MARK_OVERLAY)
			stamp = 0;
		if (ct)
			WRITE_ONCE(ct->policy_stamp, stamp);
		else if (!error) {
			init.policy_stamp = stamp;
			ct_create(&key, &init, &pkt);
		}
		skb->cb[WEIR_CB_SRC_IDENTITY] = src_identity;
		if (state == CT_NEW && !error && !kind)
			weir_tc_event(skb, WEIR_TC_EVENT(WEIR_EVENT_TYPE_VERDICT, WEIR_REASON_FORWARDED, skb->cb[WEIR_CB_HOOK]),
				      ep, src_identity, rule);
		if (proxy_port)
			return redirect_to_proxy(skb, &f, dir, ep, src_identity, proxy_port, state == CT_NEW, calls);
		return weir_tc_next(skb, calls);
	}
	if (ct)
		WRITE_ONCE(ct->policy_stamp, 0);
	if (cfg->flags & WEIR_CONFIG_FLAG_AUDIT) {
		metrics_bump(WEIR_REASON_POLICY_AUDIT, dir, skb->len);
		weir_tc_event(skb, WEIR_TC_EVENT(WEIR_EVENT_TYPE_VERDICT, WEIR_REASON_POLICY_AUDIT, skb->cb[WEIR_CB_HOOK]),
			      ep, src_identity, rule);
		if (state == CT_NEW && !error)
			ct_create(&key, &init, &pkt);
		return weir_tc_next(skb, calls);
	}
	skb->cb[WEIR_CB_SRC_IDENTITY] = src_identity;
	return weir_tc_drop_rule(skb, verdict == VERDICT_DENY ? WEIR_REASON_POLICY_DENY_RULE : WEIR_REASON_POLICY_DENIED,
				 rule);
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

/* The hairpin device's ingress: a to-container flow for an ingress L7 rule comes
 * back into the stack here (proxy port in the mark's upper half) and is assigned
 * to the proxy's socket. Nothing else is expected on this device: it drops.
 */
SEC("tc")
int l7_hairpin_ingress(struct __sk_buff *skb)
{
	__u16 proxy_port = skb->mark >> WEIR_MARK_IDENTITY_SHIFT;
	struct flow f;

	if (l7_mark_kind(skb->mark) != WEIR_XFRM_MARK_L7_PROXY || parse_skb(skb, &f) != PARSE_IP ||
	    l7_assign(skb, &f, proxy_port) < 0) {
		metrics_bump(WEIR_REASON_PROXY_UNAVAILABLE, WEIR_DIRECTION_INGRESS, skb->len);
		weir_tc_event(skb, WEIR_TC_EVENT(WEIR_EVENT_TYPE_DROP, WEIR_REASON_PROXY_UNAVAILABLE, WEIR_HOOK_TO_CONTAINER),
			      0, 0, 0);
		return TC_ACT_SHOT;
	}
	skb->mark = WEIR_XFRM_MARK_L7_PROXY;
	bpf_skb_change_type(skb, WEIR_PACKET_HOST); /* its MAC was the endpoint's: the stack must take it */
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
