/* The VXLAN overlay between nodes, on the orchestrator's VXLAN device (external,
 * collect_md, UDP 8472 as Cilium's).
 *
 * Egress (tc egress of the VXLAN device): the kernel routed an endpoint's packet
 * to a remote node's endpoint CIDR into this device. The program finds the remote
 * node in tunnel_map (an LPM trie over the remote CIDRs, written by the
 * orchestrator) and sets the tunnel key: the remote node's underlay address and,
 * in the VNI, the source's security identity (from the ipcache: a local
 * endpoint's label identity; the node itself travels as remote-node, anything
 * else as world). A destination no remote node owns drops as NO_TUNNEL_ENDPOINT.
 *
 * Ingress (tc ingress of the VXLAN device): the kernel decapsulated a packet;
 * the program reads the VNI back and carries it to the destination endpoint's
 * ingress policy in skb->mark (XfrmMark OVERLAY, the identity in the other bits),
 * so that policy judges the source by the identity its node gave it, with no
 * ipcache lookup, as Cilium's bpf_overlay does.
 */
#include "weir/chain.h"
#include "weir/ipcache.h"
#include "weir/remote_nodes.h" /* the orchestrator writes it through this object */

#define WEIR_PACKET_HOST 0
#define VXLAN_VNI_MASK 0xffffff

/* Remote endpoint CIDR -> the node that owns it (struct weir_tunnel_value). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, WEIR_TUNNEL_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weir_ipcache_key);
	__type(value, struct weir_tunnel_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tunnel_map SEC(".maps");

static __always_inline struct weir_tunnel_value *tunnel_lookup(const struct flow *f)
{
	struct weir_ipcache_key key = {};

	key.family = f->family;
	if (f->family == WEIR_FAMILY_INET) {
		key.prefixlen = 32 + 32;
		__builtin_memcpy(key.addr, f->daddr, 4);
	} else {
		key.prefixlen = 32 + 128;
		__builtin_memcpy(key.addr, f->daddr, 16);
	}
	return bpf_map_lookup_elem(&tunnel_map, &key);
}

/* The identity a packet carries to another node: only what means the same there. */
static __always_inline __u32 identity_to_send(__u32 identity)
{
	if (identity == WEIR_RESERVED_IDENTITY_HOST)
		return WEIR_RESERVED_IDENTITY_REMOTE_NODE;
	if (identity >= WEIR_FIRST_CIDR_IDENTITY || identity > VXLAN_VNI_MASK)
		return WEIR_RESERVED_IDENTITY_WORLD; /* CIDR identities are node-local */
	return identity;
}

SEC("tc")
int overlay_egress(struct __sk_buff *skb)
{
	struct weir_tunnel_value *node;
	struct bpf_tunnel_key key = {};
	struct flow f;
	__u64 flags = 0;
	int ret;

	skb->cb[WEIR_CB_HOOK] = WEIR_HOOK_TO_NETWORK;
	skb->cb[WEIR_CB_ENDPOINT] = 0;
	skb->cb[WEIR_CB_SRC_IDENTITY] = 0;
	ret = parse_skb(skb, &f);
	if (ret == PARSE_NOT_IP)
		return TC_ACT_SHOT; /* nothing but IP is sent to another node (no ARP on a NOARP device) */
	if (ret < 0)
		return weir_tc_drop(skb, -ret);
	skb->cb[WEIR_CB_SRC_IDENTITY] = ipcache_identity(f.family, f.saddr);
	node = tunnel_lookup(&f);
	if (!node)
		return weir_tc_drop(skb, WEIR_REASON_NO_TUNNEL_ENDPOINT);
	key.tunnel_id = identity_to_send(skb->cb[WEIR_CB_SRC_IDENTITY]);
	key.tunnel_ttl = 64;
	if (node->family == WEIR_FAMILY_INET) {
		__u32 addr;

		__builtin_memcpy(&addr, node->addr, 4);
		key.remote_ipv4 = bpf_ntohl(addr);
	} else {
		__builtin_memcpy(key.remote_ipv6, node->addr, 16);
		flags = BPF_F_TUNINFO_IPV6;
	}
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), flags) < 0)
		return weir_tc_drop(skb, WEIR_REASON_NO_TUNNEL_ENDPOINT);
	return TC_ACT_OK; /* counted as forwarded by the chain that let it out */
}

SEC("tc")
int overlay_ingress(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};
	__u32 identity;

	skb->cb[WEIR_CB_HOOK] = WEIR_HOOK_FROM_NETWORK;
	skb->cb[WEIR_CB_ENDPOINT] = 0;
	skb->cb[WEIR_CB_SRC_IDENTITY] = 0;
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0 &&
	    bpf_skb_get_tunnel_key(skb, &key, sizeof(key), BPF_F_TUNINFO_IPV6) < 0)
		return weir_tc_drop(skb, WEIR_REASON_INVALID_PACKET);
	identity = key.tunnel_id & VXLAN_VNI_MASK;
	skb->cb[WEIR_CB_SRC_IDENTITY] = identity;
	/* The mark's layout is the L7 upstream's (l7_mark_identity reads both). */
	skb->mark = (identity & 0xffff) << WEIR_MARK_IDENTITY_SHIFT | WEIR_XFRM_MARK_OVERLAY | ((identity >> 16) & 0xff);
	/* The inner destination MAC is the sender's device's (NOARP): the stack must take it anyway. */
	bpf_skb_change_type(skb, WEIR_PACKET_HOST);
	return TC_ACT_OK; /* the destination endpoint's chain counts it */
}

char LICENSE[] SEC("license") = "GPL";
