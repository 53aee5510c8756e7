/* The L7 proxy redirect: a TCP flow whose policy entry carries a proxy port is
 * handed to the proxy's listener with its original destination kept.
 *
 * At TC ingress (the from-container hook, for an endpoint's egress rules) the
 * packet is assigned to a socket with bpf_sk_assign: the proxy's own socket of
 * the connection when it already took it (the packet's tuple finds it), else
 * the listener on the proxy port, bound to the instance's loopback address (key 1
 * of l7_hairpin: every instance of a namespace has its own, so one never assigns
 * its flows to another's proxy). The
 * packet is marked WEIR_XFRM_MARK_L7_PROXY, which a policy-routing rule sends
 * to a `local 0.0.0.0/0 dev lo` table, so the stack delivers it locally although
 * its destination is another address; the listener is transparent
 * (IP_TRANSPARENT), so the accepted socket's local address is the original
 * destination and Envoy's ORIGINAL_DST cluster connects there.
 *
 * At TC egress (the to-container hook, for an endpoint's ingress rules) a socket
 * cannot be assigned; the packet is sent back into the stack through the
 * ingress of the hairpin device (l7_hairpin) with the proxy port in the mark's
 * upper half, and the program on that device's ingress assigns it.
 *
 * No socket (Envoy down, its listener not there yet, an IPv6 flow, which the
 * proxy does not serve) drops the packet: an L7 port fails closed.
 */
#pragma once

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "weir/chain.h"

#define WEIR_PACKET_HOST 0
#define WEIR_L7_HAIRPIN_IFINDEX 0
#define WEIR_L7_PROXY_ADDRESS 1

/* Key 0 -> the ifindex of the hairpin device (0: none yet, ingress L7 flows drop);
 * key 1 -> the IPv4 address (network order) the proxy's listeners bind to (0: none yet,
 * L7 flows drop). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} l7_hairpin SEC(".maps");

static __always_inline __u32 l7_mark_kind(__u32 mark)
{
	return mark & WEIR_XFRM_MARK_MASK;
}

/* The identity an egress proxy's upstream mark carries (see MARK_IDENTITY_SHIFT). */
static __always_inline __u32 l7_mark_identity(__u32 mark)
{
	return (mark >> WEIR_MARK_IDENTITY_SHIFT) | ((mark & 0xff) << 16);
}

/* Assign the packet to the proxy's socket; 0 on success, -1 when there is none. */
static __always_inline int l7_assign(struct __sk_buff *skb, const struct flow *f, __u16 proxy_port)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	__u32 key, *address;
	long err;

	if (f->family != WEIR_FAMILY_INET || f->proto != WEIR_IP_PROTO_TCP || !proxy_port)
		return -1;
	__builtin_memcpy(&tuple.ipv4.saddr, f->saddr, 4);
	__builtin_memcpy(&tuple.ipv4.daddr, f->daddr, 4);
	tuple.ipv4.sport = f->sport;
	tuple.ipv4.dport = f->dport;
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN && sk->state != BPF_TCP_TIME_WAIT) {
			err = bpf_sk_assign(skb, sk, 0);
			bpf_sk_release(sk);
			return err ? -1 : 0;
		}
		bpf_sk_release(sk);
	}
	key = WEIR_L7_PROXY_ADDRESS;
	address = bpf_map_lookup_elem(&l7_hairpin, &key);
	if (!address || !*address)
		return -1;
	tuple.ipv4.daddr = *address;
	tuple.ipv4.dport = bpf_htons(proxy_port);
	sk = bpf_sk_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return -1;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return -1;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return err ? -1 : 0;
}

/* A redirect event: the flow, with the proxy port in `pad`. */
static __always_inline void l7_event(struct __sk_buff *skb, __u32 hook, __u32 ep, __u32 src_identity,
				     __u16 proxy_port)
{
	struct weir_event *ev;
	struct flow f;
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;

	ev = event_reserve(WEIR_EVENT_KIND_REDIRECT);
	if (!ev)
		return;
	parse_flow(data, data_end, &f);
	ev->type = WEIR_EVENT_TYPE_PROXY_REDIRECT;
	ev->reason = 0;
	ev->dir = hook_direction(hook);
	ev->hook = hook;
	ev->ifindex = skb->ifindex;
	ev->endpoint = ep;
	ev->len = f.len;
	ev->src_identity = src_identity;
	ev->dst_identity = dst_identity_of(hook, skb->ifindex);
	ev->family = f.family;
	ev->proto = f.proto;
	ev->sport = f.sport;
	ev->dport = f.dport;
	ev->pad = proxy_port;
	__builtin_memcpy(ev->saddr, f.saddr, 16);
	__builtin_memcpy(ev->daddr, f.daddr, 16);
	event_submit(ev);
}
