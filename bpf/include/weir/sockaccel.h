/* The socket layer's questions to the node's state: which local addresses are
 * endpoints (and which endpoint), and does policy allow a pair both ways.
 *
 * A pair (client, server, server port) is allowed when the client's egress and
 * the server's ingress both allow it, exactly as the chain would decide for the
 * connection's first packet: a direction an endpoint does not enforce allows;
 * an entry's verdict decides; no entry allows only under default-allow. Audit
 * mode never allows here (the chain must see the flow to report it), nor does an
 * entry that sends the flow to the L7 proxy. The host side (a host process, the
 * L7 proxy) has no endpoint policy of its own.
 */
#pragma once

#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "weir/ipcache.h"
#include "weir/policy.h"
#include "weir/sockaccel_defs.h"

#define SOCKACCEL_AF_INET 2
#define SOCKACCEL_AF_INET6 10

/* Fill a key's address from a socket's fields: IPv4, or IPv6 with v4-mapped
 * addresses folded to IPv4 so both ends of a dual-stack pair use one key form.
 */
static __always_inline int sockaccel_addr(__u32 family, __u32 ip4, const __u32 *ip6, __u8 *family_out, __u8 *addr)
{
	__u32 a[4];

	if (family == SOCKACCEL_AF_INET) {
		*family_out = WEIR_FAMILY_INET;
		__builtin_memcpy(addr, &ip4, 4);
		return 0;
	}
	if (family != SOCKACCEL_AF_INET6)
		return -1;
	a[0] = ip6[0];
	a[1] = ip6[1];
	a[2] = ip6[2];
	a[3] = ip6[3];
	if (a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff)) {
		*family_out = WEIR_FAMILY_INET;
		__builtin_memcpy(addr, &a[3], 4);
		return 0;
	}
	*family_out = WEIR_FAMILY_INET6;
	__builtin_memcpy(addr, a, 16);
	return 0;
}

/* A remote port as the socket contexts give it (network order, in the upper
 * half on older kernels) in host order.
 */
static __always_inline __u16 sockaccel_remote_port(__u32 raw)
{
	return raw > 0xffff ? (__u16)bpf_ntohl(raw) : bpf_ntohs((__u16)raw);
}

/* policy_verdict without its hit counters: the handshake already counted this flow in the
 * chain, and the fast path's re-checks are not packets.
 */
static __always_inline int sockaccel_verdict(__u32 ep, __u8 dir, __u32 peer, __u16 port_be)
{
	struct weir_policy_entry *e;
	void *inner = bpf_map_lookup_elem(&policy_maps, &ep);

	if (!inner)
		return VERDICT_NONE;
	e = policy_lookup_one(inner, dir, peer, WEIR_IP_PROTO_TCP, port_be);
	if (!e)
		e = policy_lookup_one(inner, dir, WEIR_RESERVED_IDENTITY_UNKNOWN, WEIR_IP_PROTO_TCP, port_be);
	if (!e)
		return VERDICT_NONE;
	/* An entry with a proxy port sends the flow through the L7 proxy: the two endpoints
	 * must never be joined directly (their legs to and from the proxy may be).
	 */
	if (e->proxy_port)
		return VERDICT_DENY;
	return (e->flags & WEIR_POLICY_FLAG_DENY) ? VERDICT_DENY : VERDICT_ALLOW;
}

/* Does endpoint `ep` allow the flow with `peer` in `dir` on TCP `port` (host order)? */
static __always_inline int sockaccel_direction_allows(__u32 ep, __u8 dir, __u32 peer, __u16 port)
{
	struct weir_endpoint_policy_config *cfg = bpf_map_lookup_elem(&policy_config, &ep);
	__u32 enforced, default_allow;
	int verdict;

	if (!cfg)
		return 1;
	enforced = dir == WEIR_DIRECTION_EGRESS ? WEIR_CONFIG_FLAG_EGRESS_ENFORCED : WEIR_CONFIG_FLAG_INGRESS_ENFORCED;
	default_allow = dir == WEIR_DIRECTION_EGRESS ? WEIR_CONFIG_FLAG_EGRESS_DEFAULT_ALLOW
						     : WEIR_CONFIG_FLAG_INGRESS_DEFAULT_ALLOW;
	if (!(cfg->flags & enforced))
		return 1;
	verdict = sockaccel_verdict(ep, dir, peer, bpf_htons(port));
	if (verdict == VERDICT_ALLOW)
		return 1;
	return verdict == VERDICT_NONE && (cfg->flags & default_allow);
}

/* Both directions of a pair; an endpoint id of 0 is the host (no policy of its own). */
static __always_inline int sockaccel_pair_allowed(__u32 client_ep, __u32 server_ep, __u32 client_id,
						  __u32 server_id, __u16 port)
{
	if (client_ep && !sockaccel_direction_allows(client_ep, WEIR_DIRECTION_EGRESS, server_id, port))
		return 0;
	if (server_ep && !sockaccel_direction_allows(server_ep, WEIR_DIRECTION_INGRESS, client_id, port))
		return 0;
	return 1;
}
