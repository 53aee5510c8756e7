/* Service load balancer: frontends to backends, per packet and per socket.
 *
 * Per packet (IPv4, TCP and UDP): in the from-container chain (slot LB, before
 * policy) a packet to a cluster frontend is DNATed to a backend; on the
 * network-facing device (from-network, slot LB) a packet to a node port is.
 * The backend of a connection lives in a conntrack entry of scope SERVICE;
 * an entry of scope REV_NAT, keyed by the translated tuple, carries the
 * reverse-NAT index, so replies get the frontend back as their source in the
 * to-container and to-network chains (slot LB_REPLY, after policy). A later
 * fragment takes its datagram's ports (frag.h) and so its connection: only
 * its address is rewritten, since it carries no L4 header.
 *
 * Per socket: cgroup connect4/sendmsg4 translate the destination once, and
 * recvmsg4/getpeername4 translate it back, so no packet needs NAT at all.
 *
 * A new connection takes its service's session-affinity backend if it has a
 * fresh one, else the backend in the service's selection table (Maglev or a
 * weighted list, built by the service) at the flow's hash. Terminating
 * backends are in no table but keep their connections; a backend in
 * maintenance loses them too.
 */
#include <stddef.h>
#include "weir/chain.h"
#include "weir/conntrack.h"
#include "weir/frag.h"
#include "weir/lb_defs.h"

#define INNER_PLACEHOLDER 1

/* Frontend (address, port, protocol) -> service. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_LB_MAX_SERVICES);
	__type(key, struct weir_lb_service_key);
	__type(value, struct weir_lb_service);
} lb_services SEC(".maps");

/* Backend id -> address, port, state. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct weir_lb_backend);
} lb_backends SEC(".maps");

struct lb_table_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, INNER_PLACEHOLDER);
	__uint(map_flags, BPF_F_INNER_MAP);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
};

/* Service id -> its selection table (slot -> backend id), swapped whole. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, WEIR_LB_MAX_SERVICES);
	__type(key, __u32);
	__array(values, struct lb_table_inner);
} lb_tables SEC(".maps");

/* Reverse-NAT index -> the frontend replies must come from. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_LB_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct weir_lb_rev_nat);
} lb_rev_nat SEC(".maps");

/* (service, client address) -> backend, for session affinity. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEIR_LB_AFFINITY_MAX);
	__type(key, struct weir_lb_affinity_key);
	__type(value, struct weir_lb_affinity);
} lb_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, WEIR_LB_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct weir_lb_stats);
} lb_service_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, WEIR_LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct weir_lb_stats);
} lb_backend_stats SEC(".maps");

/* (socket cookie, backend) -> frontend, for recvmsg4 and getpeername4. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEIR_LB_SOCK_REVNAT_MAX);
	__type(key, struct weir_sock_rev_key);
	__type(value, struct weir_sock_rev);
} lb_sock_revnat SEC(".maps");

static __always_inline void stats_add(void *map, __u32 id, __u64 bytes, int new_conn)
{
	struct weir_lb_stats *s = bpf_map_lookup_elem(map, &id);
	struct weir_lb_stats init = { .packets = 1, .bytes = bytes, .new_conns = new_conn };

	if (!s) {
		bpf_map_update_elem(map, &id, &init, BPF_NOEXIST);
		return;
	}
	s->packets++;
	s->bytes += bytes;
	s->new_conns += new_conn;
}

static __always_inline struct weir_lb_backend *usable_backend(__u32 id, int allow_terminating)
{
	struct weir_lb_backend *b;

	if (!id)
		return 0;
	b = bpf_map_lookup_elem(&lb_backends, &id);
	if (!b || b->state == WEIR_BACKEND_STATE_MAINTENANCE)
		return 0;
	if (!allow_terminating && b->state != WEIR_BACKEND_STATE_ACTIVE)
		return 0;
	return b;
}

/* Pick a backend for a new connection: affinity first, then the table at `hash`. */
static __always_inline __u32 select_backend(struct weir_lb_service *svc, __u32 hash, __u8 family,
					    const __u8 *client)
{
	struct weir_lb_affinity_key akey = {};
	struct weir_lb_affinity *aff, anew = {};
	__u32 sid = svc->service_id, slot, *id;
	__u64 now = 0;
	void *table;

	if (svc->flags & WEIR_SERVICE_FLAG_AFFINITY) {
		/* Only affinity needs a clock; the coarse one (a tick's lag on second-long timeouts). */
		now = bpf_ktime_get_coarse_ns();
		akey.service_id = sid;
		akey.family = family;
		__builtin_memcpy(akey.addr, client, 16);
		aff = bpf_map_lookup_elem(&lb_affinity, &akey);
		if (aff && now - aff->last_used < (__u64)svc->affinity_timeout * NSEC_PER_SEC &&
		    usable_backend(aff->backend_id, 0)) {
			aff->last_used = now;
			return aff->backend_id;
		}
	}
	if (!svc->table_size)
		return 0;
	table = bpf_map_lookup_elem(&lb_tables, &sid);
	if (!table)
		return 0;
	slot = hash % svc->table_size;
	id = bpf_map_lookup_elem(table, &slot);
	if (!id)
		return 0;
	if (svc->flags & WEIR_SERVICE_FLAG_AFFINITY) {
		anew.backend_id = *id;
		anew.last_used = now;
		bpf_map_update_elem(&lb_affinity, &akey, &anew, BPF_ANY);
	}
	return *id;
}

/* ---- per-packet NAT (IPv4) ---- */

/* The IPv4 TCP/UDP flow of a packet, with its datagram's ports when it is a
 * later fragment; -1 when the LB has nothing to do with it (other families and
 * protocols, packets the parser refuses, fragments of unknown datagrams: policy
 * judges those).
 */
static __always_inline int parse_v4(struct __sk_buff *skb, struct flow *f)
{
	if (parse_skb_tracked(skb, f) != PARSE_IP || f->family != WEIR_FAMILY_INET)
		return -1;
	if (f->proto != WEIR_IP_PROTO_TCP && f->proto != WEIR_IP_PROTO_UDP)
		return -1;
	return 0;
}

static __always_inline __u32 flow_v4(const __u8 *addr)
{
	__u32 a;

	__builtin_memcpy(&a, addr, 4);
	return a;
}

/* Rewrite the destination (is_dst) or source address and port, with checksums.
 * A later fragment has no L4 header: only its address changes.
 */
static __always_inline int nat_v4(struct __sk_buff *skb, const struct flow *f, int is_dst, __u32 new_addr,
				  __u16 new_port)
{
	__u32 old_addr = flow_v4(is_dst ? f->daddr : f->saddr);
	__u16 old_port = is_dst ? f->dport : f->sport;
	__u32 addr_off = f->l3off + (is_dst ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));
	__u32 csum_off, port_off;
	__u64 l4flags = 0;

	if (f->l4off) {
		if (f->proto == WEIR_IP_PROTO_TCP) {
			csum_off = f->l4off + offsetof(struct tcphdr, check);
			port_off = f->l4off + (is_dst ? offsetof(struct tcphdr, dest) : offsetof(struct tcphdr, source));
		} else {
			csum_off = f->l4off + offsetof(struct udphdr, check);
			port_off = f->l4off + (is_dst ? offsetof(struct udphdr, dest) : offsetof(struct udphdr, source));
			l4flags = BPF_F_MARK_MANGLED_0;
		}
		if (bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr, l4flags | BPF_F_PSEUDO_HDR | 4) < 0)
			return -1;
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, l4flags | 2) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) < 0)
			return -1;
	}
	if (bpf_l3_csum_replace(skb, f->l3off + offsetof(struct iphdr, check), old_addr, new_addr, 4) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, addr_off, &new_addr, 4, 0) < 0)
		return -1;
	return 0;
}

/* A TRANSLATE event for a new connection's first packet (still to the frontend), naming its backend. */
static __always_inline void translate_event(struct __sk_buff *skb, const struct weir_lb_backend *b)
{
	struct weir_event *ev = event_for_packet(WEIR_EVENT_TYPE_TRANSLATE, WEIR_REASON_FORWARDED,
						 skb->cb[WEIR_CB_HOOK], skb->ifindex, skb->cb[WEIR_CB_ENDPOINT],
						 skb->cb[WEIR_CB_SRC_IDENTITY], (void *)(long)skb->data,
						 (void *)(long)skb->data_end);

	if (!ev)
		return;
	__builtin_memcpy(ev->nat_addr, b->addr, 4);
	ev->nat_port = b->port;
	event_submit(ev);
}

/* Translate a packet to a frontend; returns a TC verdict or -1 to go on. */
static __always_inline int lb_forward(struct __sk_buff *skb)
{
	struct weir_lb_service_key skey = {};
	struct weir_lb_service *svc;
	struct weir_lb_backend *b = 0;
	struct weir_ct_key key, rkey;
	struct weir_ct_value *ct = 0, init = {};
	struct ct_packet pkt;
	struct flow f;
	__u32 backend_id = 0, baddr;
	int new_conn = 0;

	if (parse_v4(skb, &f) < 0)
		return -1;
	__builtin_memcpy(skey.addr, f.daddr, 4);
	skey.port = f.dport;
	skey.proto = f.proto;
	skey.family = WEIR_FAMILY_INET;
	svc = bpf_map_lookup_elem(&lb_services, &skey);
	if (!svc) {
		/* A new direct connection on the tuple of an old translated one: its
		 * replies must not be given the old frontend's address.
		 */
		if (f.proto == WEIR_IP_PROTO_TCP && tcp_syn_only(f.tcp_flags)) {
			ct_key_from_flow(&rkey, &f, WEIR_CT_SCOPE_REV_NAT);
			ct_delete(&rkey);
		}
		return -1;
	}

	ct_packet_init(&pkt, &f, skb->len);
	ct_key_from_flow(&key, &f, WEIR_CT_SCOPE_SERVICE);
	if (ct_lookup(&key, CT_LOOKUP_FORWARD, &pkt, &ct) == CT_ESTABLISHED) {
		b = usable_backend(ct->backend_id, 1);
		if (b)
			backend_id = ct->backend_id;
	}
	if (!b) {
		__u8 client[16] = {};

		__builtin_memcpy(client, f.saddr, 4);
		backend_id = select_backend(svc, bpf_get_hash_recalc(skb), WEIR_FAMILY_INET, client);
		b = usable_backend(backend_id, 0);
		if (!b)
			return weir_tc_drop(skb, WEIR_REASON_NO_SERVICE_BACKEND);
		init.backend_id = backend_id;
		init.rev_nat_index = svc->rev_nat_index;
		ct_create(&key, &init, &pkt);
		new_conn = 1;
	}
	baddr = flow_v4(b->addr);
	ct_key_init(&rkey, WEIR_FAMILY_INET, f.proto, f.saddr, &baddr, f.sport, b->port, WEIR_CT_SCOPE_REV_NAT);
	/* A new connection writes its reply-side entry outright (replacing what an older
	 * connection on the tuple left), with no lookup first; later packets refresh it.
	 */
	if (new_conn || ct_lookup(&rkey, CT_LOOKUP_FORWARD, &pkt, &ct) != CT_ESTABLISHED ||
	    ct->rev_nat_index != svc->rev_nat_index) {
		init.backend_id = backend_id;
		init.rev_nat_index = svc->rev_nat_index;
		ct_create(&rkey, &init, &pkt);
	}
	stats_add(&lb_service_stats, svc->service_id, skb->len, new_conn);
	stats_add(&lb_backend_stats, backend_id, skb->len, new_conn);
	if (new_conn)
		translate_event(skb, b);
	if (nat_v4(skb, &f, 1, baddr, b->port) < 0)
		return weir_tc_drop(skb, WEIR_REASON_INVALID_PACKET);
	return -1;
}

/* Give a reply the frontend as its source, if it belongs to a translated connection. */
static __always_inline int lb_reply(struct __sk_buff *skb)
{
	struct weir_ct_key key;
	struct weir_ct_value *ct = 0;
	struct weir_lb_rev_nat *rn;
	struct ct_packet pkt;
	struct flow f;
	__u32 index, vip;

	if (parse_v4(skb, &f) < 0)
		return -1;
	ct_packet_init(&pkt, &f, skb->len);
	ct_key_from_flow(&key, &f, WEIR_CT_SCOPE_REV_NAT);
	if (ct_lookup(&key, CT_LOOKUP_REVERSE, &pkt, &ct) != CT_REPLY)
		return -1;
	index = ct->rev_nat_index;
	rn = bpf_map_lookup_elem(&lb_rev_nat, &index);
	if (!rn)
		return -1;
	vip = flow_v4(rn->addr);
	/* The connection's backend choice lives as long as the connection does. */
	ct_key_init(&key, WEIR_FAMILY_INET, f.proto, f.daddr, &vip, f.dport, rn->port, WEIR_CT_SCOPE_SERVICE);
	ct = ct_get(&key, 0);
	if (ct) {
		pkt.bytes = 0;
		ct_touch(ct, f.proto, &pkt, 1);
	}
	if (nat_v4(skb, &f, 0, vip, rn->port) < 0)
		return weir_tc_drop(skb, WEIR_REASON_INVALID_PACKET);
	return -1;
}

#define LB_TC(name, fn, calls)                   \
	SEC("tc")                                \
	int name(struct __sk_buff *skb)          \
	{                                        \
		int verdict = fn(skb);           \
		if (verdict >= 0)                \
			return verdict;          \
		return weir_tc_next(skb, calls); \
	}

LB_TC(lb_from_container, lb_forward, &calls_from_container)
LB_TC(lb_from_network, lb_forward, &calls_from_network)
LB_TC(lb_to_container, lb_reply, &calls_to_container)
LB_TC(lb_to_network, lb_reply, &calls_to_network)

/* ---- per-socket LB (IPv4) ---- */

static __always_inline struct weir_lb_service *sock_service(struct bpf_sock_addr *ctx, __u8 proto)
{
	struct weir_lb_service_key skey = {};
	__u32 addr = ctx->user_ip4;

	__builtin_memcpy(skey.addr, &addr, 4);
	skey.port = (__u16)ctx->user_port;
	skey.proto = proto;
	skey.family = WEIR_FAMILY_INET;
	return bpf_map_lookup_elem(&lb_services, &skey);
}

/* A TRANSLATE event for a connect() (or an unconnected UDP sendmsg()) the socket LB sent
 * to a backend. The source is not known yet (the socket is bound after connect, or by
 * this very send), so it is left empty; the hook is FROM_CONTAINER, as for every
 * socket-layer event.
 */
static __always_inline void sock_translate_event(struct bpf_sock_addr *ctx, __u8 proto, const struct weir_lb_backend *b)
{
	struct weir_event *ev = event_reserve(WEIR_EVENT_KIND_TRANSLATE);
	__u32 vip = ctx->user_ip4;

	if (!ev)
		return;
	ev->type = WEIR_EVENT_TYPE_TRANSLATE;
	ev->reason = WEIR_REASON_FORWARDED;
	ev->dir = WEIR_DIRECTION_EGRESS;
	ev->hook = WEIR_HOOK_FROM_CONTAINER;
	ev->ifindex = 0;
	ev->endpoint = 0;
	ev->len = 0;
	ev->src_identity = 0;
	ev->dst_identity = 0;
	ev->family = WEIR_FAMILY_INET;
	ev->proto = proto;
	ev->sport = 0;
	ev->dport = (__u16)ctx->user_port;
	ev->pad = 0;
	__builtin_memset(ev->saddr, 0, sizeof(ev->saddr));
	__builtin_memset(ev->daddr, 0, sizeof(ev->daddr));
	__builtin_memcpy(ev->daddr, &vip, 4);
	__builtin_memcpy(ev->nat_addr, b->addr, 4);
	ev->nat_port = b->port;
	event_submit(ev);
}

/* Send a socket's service address to a backend and report it as a TRANSLATE event:
 * every connect(), and a sendmsg() of an unconnected UDP socket when it is the socket's
 * first to that backend (no reverse-NAT entry yet), so a datagram stream is one flow per
 * socket and backend, as a connection is one flow, not one per packet.
 */
static __always_inline int sock_translate(struct bpf_sock_addr *ctx, __u8 proto, int connecting)
{
	struct weir_lb_service *svc = sock_service(ctx, proto);
	struct weir_sock_rev_key rkey = {};
	struct weir_sock_rev rev = {};
	struct weir_lb_backend *b;
	__u8 client[16] = {};
	__u64 cookie;
	__u32 backend_id, baddr;

	if (!svc)
		return 1;
	cookie = bpf_get_socket_cookie(ctx);
	backend_id = select_backend(svc, (__u32)(cookie ^ (cookie >> 32)) * 2654435761u, WEIR_FAMILY_INET, client);
	b = usable_backend(backend_id, 0);
	if (!b)
		return 0; /* no backend: the connect fails (EPERM) */
	__builtin_memcpy(&baddr, b->addr, 4);
	rev.addr = ctx->user_ip4;
	rev.port = (__u16)ctx->user_port;
	rkey.cookie = cookie;
	rkey.addr = baddr;
	rkey.port = b->port;
	if (!connecting && !bpf_map_lookup_elem(&lb_sock_revnat, &rkey))
		connecting = 1; /* this unconnected socket's first datagram to the backend */
	bpf_map_update_elem(&lb_sock_revnat, &rkey, &rev, BPF_ANY);
	stats_add(&lb_service_stats, svc->service_id, 0, 1);
	stats_add(&lb_backend_stats, backend_id, 0, 1);
	if (connecting)
		sock_translate_event(ctx, proto, b);
	ctx->user_ip4 = baddr;
	ctx->user_port = b->port;
	return 1;
}

static __always_inline int sock_untranslate(struct bpf_sock_addr *ctx)
{
	struct weir_sock_rev_key rkey = {};
	struct weir_sock_rev *rev;

	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.addr = ctx->user_ip4;
	rkey.port = (__u16)ctx->user_port;
	rev = bpf_map_lookup_elem(&lb_sock_revnat, &rkey);
	if (rev) {
		ctx->user_ip4 = rev->addr;
		ctx->user_port = rev->port;
	}
	return 1;
}

SEC("cgroup/connect4")
int lb_connect4(struct bpf_sock_addr *ctx)
{
	return sock_translate(ctx, ctx->protocol == WEIR_IP_PROTO_UDP ? WEIR_IP_PROTO_UDP : WEIR_IP_PROTO_TCP, 1);
}

SEC("cgroup/sendmsg4")
int lb_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock_translate(ctx, WEIR_IP_PROTO_UDP, 0);
}

SEC("cgroup/recvmsg4")
int lb_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock_untranslate(ctx);
}

SEC("cgroup/getpeername4")
int lb_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock_untranslate(ctx);
}

char LICENSE[] SEC("license") = "GPL";
