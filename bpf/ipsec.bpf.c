/* IPsec: mark packets for the kernel's xfrm layer, in the IPSEC slot.
 *
 * From-container: the destination is looked up in ipsec_cidrs (the endpoint
 * ranges of remote nodes). A hit marks the packet ENCRYPT with the remote
 * node's id and the key index (SPI) this node uses towards it; the xfrm OUT
 * policy of that node (matched on the node id) and its state (matched on the
 * whole mark) encrypt it in tunnel mode between the underlay addresses. A range
 * whose encryption cannot be done (BLOCK) is marked ENCRYPT with node 0, which
 * only the default-drop policy matches; without that policy the packet is
 * dropped here. Either way it never leaves in plaintext.
 *
 * Strict mode (the service follows the node table): a destination no entry of
 * ipsec_cidrs covers, in the range of a remote node that publishes a key index
 * (remote_nodes, written by the orchestrator before it routes there), is a node
 * that encrypts whose peer the service has not installed yet: the packet drops
 * as ENCRYPTION_PENDING. That holds from the orchestrator's UpsertNode on, and
 * while the service is down or restarting (this program and its maps stay).
 *
 * From-network: ESP from a peer's underlay address is marked DECRYPT with the
 * peer's node id, which that peer's IN states match; xfrm finds the key by the
 * SPI in the ESP header. The decrypted packet comes back through this chain as
 * plain IP and goes on to its endpoint.
 */
#include "weir/chain.h"
#include "weir/ipsec_defs.h"
#include "weir/remote_nodes.h"

/* Remote endpoint ranges -> node id, key index, flags. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, WEIR_IPSEC_MAX_PEER_CIDRS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weir_ipsec_key);
	__type(value, struct weir_peer_cidr_value);
} ipsec_cidrs SEC(".maps");

/* Peer underlay addresses (full-length prefixlen) -> node id, for ESP on ingress. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_IPSEC_MAX_PEERS);
	__type(key, struct weir_ipsec_key);
	__type(value, struct weir_underlay_value);
} ipsec_underlay SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weir_ipsec_config);
} ipsec_config SEC(".maps");

/* Packets and bytes per enum weir_ipsec_stat. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_IPSEC_NUM_STATS);
	__type(key, __u32);
	__type(value, struct weir_counter);
} ipsec_stats SEC(".maps");

static __always_inline void ipsec_count(__u32 stat, __u64 bytes)
{
	struct weir_counter *c = bpf_map_lookup_elem(&ipsec_stats, &stat);

	if (c)
		counter_add(c, bytes);
}

static __always_inline void ipsec_key_of(struct weir_ipsec_key *key, struct flow *f, __u8 *addr)
{
	key->prefixlen = 32 + (f->family == WEIR_FAMILY_INET ? 32 : 128);
	key->family = f->family;
	__builtin_memcpy(key->addr, addr, 16);
}

static __always_inline int ipsec_xfrm_block(void)
{
	__u32 zero = 0;
	struct weir_ipsec_config *cfg = bpf_map_lookup_elem(&ipsec_config, &zero);

	return cfg && cfg->xfrm_block;
}

/* Strict mode: the destination is in the range of a remote node that encrypts. */
static __always_inline int ipsec_pending(struct weir_ipsec_key *key)
{
	struct weir_tunnel_value *node;
	__u32 zero = 0;
	struct weir_ipsec_config *cfg = bpf_map_lookup_elem(&ipsec_config, &zero);

	if (!cfg || !cfg->strict)
		return 0;
	/* struct weir_ipsec_key and struct weir_ipcache_key share their layout */
	node = bpf_map_lookup_elem(&remote_nodes, key);
	return node && node->key_index;
}

SEC("tc")
int ipsec_from_container(struct __sk_buff *skb)
{
	struct weir_peer_cidr_value *peer;
	struct weir_ipsec_key key = {};
	struct flow f;

	if (parse_skb(skb, &f) != PARSE_IP)
		return weir_tc_next(skb, &calls_from_container);
	ipsec_key_of(&key, &f, f.daddr);
	peer = bpf_map_lookup_elem(&ipsec_cidrs, &key);
	if (!peer) {
		if (ipsec_pending(&key)) {
			ipsec_count(WEIR_IPSEC_STAT_PENDING, skb->len);
			return weir_tc_drop(skb, WEIR_REASON_ENCRYPTION_PENDING);
		}
		return weir_tc_next(skb, &calls_from_container);
	}
	if ((peer->flags & WEIR_PEER_FLAG_BLOCK) || !peer->spi || !peer->node_id) {
		if (!ipsec_xfrm_block()) {
			ipsec_count(WEIR_IPSEC_STAT_DROPPED, skb->len);
			return weir_tc_drop(skb, WEIR_REASON_ENCRYPTION_UNAVAILABLE);
		}
		skb->mark = WEIR_XFRM_MARK_ENCRYPT;
		ipsec_count(WEIR_IPSEC_STAT_BLOCKED, skb->len);
		return weir_tc_next(skb, &calls_from_container);
	}
	skb->mark = peer->node_id << WEIR_IPSEC_NODE_SHIFT | (__u32)peer->spi << WEIR_IPSEC_SPI_SHIFT |
		    WEIR_XFRM_MARK_ENCRYPT;
	ipsec_count(WEIR_IPSEC_STAT_MARKED_ENCRYPT, skb->len);
	return weir_tc_next(skb, &calls_from_container);
}

SEC("tc")
int ipsec_from_network(struct __sk_buff *skb)
{
	struct weir_underlay_value *peer;
	struct weir_ipsec_key key = {};
	struct flow f;

	if (parse_skb(skb, &f) != PARSE_IP || f.proto != WEIR_IP_PROTO_ESP)
		return weir_tc_next(skb, &calls_from_network);
	ipsec_key_of(&key, &f, f.saddr);
	peer = bpf_map_lookup_elem(&ipsec_underlay, &key);
	if (peer) {
		skb->mark = peer->node_id << WEIR_IPSEC_NODE_SHIFT | WEIR_XFRM_MARK_DECRYPT;
		ipsec_count(WEIR_IPSEC_STAT_MARKED_DECRYPT, skb->len);
	}
	return weir_tc_next(skb, &calls_from_network);
}

char LICENSE[] SEC("license") = "GPL";
