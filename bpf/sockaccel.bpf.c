// SPDX-License-Identifier: GPL-2.0
/* Socket-layer acceleration: node-local TCP between allowed sockets skips the
 * stack below the socket.
 *
 * sock_ops (on the node's cgroup) sees each TCP socket become ESTABLISHED. When
 * both ends are local (an endpoint, or the host / the L7 proxy) and policy
 * allows the pair both ways, the socket goes into sockaccel_socks under its own
 * view of the connection, with a record in sockaccel_conns.
 *
 * sk_msg (on that sockhash) runs for each message such a socket sends. While the
 * record says REDIRECT and the node, both endpoints and policy still allow the
 * pair, the whole message goes to the peer socket's receive queue. Otherwise the
 * record turns FALLBACK, for good, and this and every later message take the
 * normal path. The order of bytes survives the switch because it only goes one
 * way: a receiver reads what was redirected to it before what TCP brought
 * (tcp_bpf_recvmsg), and everything redirected was sent before anything that
 * took TCP. A socket is never taken out of the sockhash while it lives (the
 * kernel removes it on close), so nothing queued for it is ever purged; and a
 * redirect that finds no peer passes the message on instead of dropping it.
 *
 * A redirect has no window: the sender never waits for the receiver. So a socket
 * whose peer has the queue limit of redirected bytes unread turns PAUSED and
 * sends on TCP, whose window holds it back; it redirects again only when TCP
 * holds none of its bytes unread (all it wrote is acked, the peer has read all
 * TCP brought), the one moment the switch back cannot reorder anything.
 */
#include <linux/bpf.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include "weir/events.h"
#include "weir/sockaccel.h"

/* The two kernel fields the flow control reads, relocated by libbpf (CO-RE). */
struct sock___weir {
	void *sk_user_data;
} __attribute__((preserve_access_index));

struct sk_psock___weir {
	__u32 msg_tot_len;
} __attribute__((preserve_access_index));

struct tcp_sock___weir {
	__u32 copied_seq;
	__u32 write_seq;
	__u32 rcv_nxt;
	__u32 snd_una;
} __attribute__((preserve_access_index));

#define SK_USER_DATA_PTRMASK (~7UL) /* sk_user_data keeps flags in its low bits */

/* Accelerated sockets by their own view of the connection (value: the cookie). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, WEIR_SOCKACCEL_MAX_CONNECTIONS);
	__type(key, struct weir_sock_key);
	__type(value, __u64);
} sockaccel_socks SEC(".maps");

/* The fast path's record of each socket in it: pair, state, what it carried. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_SOCKACCEL_MAX_CONNECTIONS);
	__type(key, struct weir_sock_key);
	__type(value, struct weir_conn);
} sockaccel_conns SEC(".maps");

/* This node's local addresses that may be an end of an accelerated pair. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_SOCKACCEL_MAX_ADDRESSES);
	__type(key, struct weir_addr_key);
	__type(value, struct weir_addr_info);
} sockaccel_addrs SEC(".maps");

/* The node's settings by enum weir_config_index: its word (enum weir_node_flag), the queue limit. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} sockaccel_config SEC(".maps");

/* Counters by enum weir_stat, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_SOCKACCEL_NUM_STATS);
	__type(key, __u32);
	__type(value, __u64);
} sockaccel_stats SEC(".maps");

static __always_inline void stat_add(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&sockaccel_stats, &idx);

	if (v)
		*v += n;
}

static __always_inline __u32 config_word(__u32 idx)
{
	__u32 *word = bpf_map_lookup_elem(&sockaccel_config, &idx);

	return word ? *word : 0;
}

static __always_inline __u32 node_flags(void)
{
	return config_word(WEIR_CONFIG_INDEX_NODE);
}

static __always_inline __u32 queue_limit(void)
{
	__u32 limit = config_word(WEIR_CONFIG_INDEX_QUEUE_LIMIT);

	return limit ? limit : WEIR_SOCKACCEL_DEFAULT_MAX_QUEUED;
}

static __always_inline struct weir_addr_info *addr_info(__u8 family, const __u8 *addr)
{
	struct weir_addr_key key = { .family = family };

	__builtin_memcpy(key.addr, addr, 16);
	return bpf_map_lookup_elem(&sockaccel_addrs, &key);
}

static __always_inline void peer_key(const struct weir_sock_key *key, struct weir_sock_key *peer)
{
	*peer = (struct weir_sock_key){ .family = key->family };
	peer->local_port = key->remote_port;
	peer->remote_port = key->local_port;
	__builtin_memcpy(peer->local, key->remote, 16);
	__builtin_memcpy(peer->remote, key->local, 16);
}

/* One event per socket entering or leaving the fast path; the client is the source. */
static __always_inline void accel_event(__u8 type, const struct weir_sock_key *key, const struct weir_conn *c)
{
	int client = c->role == WEIR_ROLE_CLIENT;
	struct weir_event *ev = event_reserve(WEIR_EVENT_KIND_ACCEL);
	__u16 cport = client ? key->local_port : key->remote_port;

	if (!ev)
		return;
	ev->type = type;
	ev->reason = 0;
	ev->dir = WEIR_DIRECTION_EGRESS;
	ev->hook = WEIR_HOOK_FROM_CONTAINER;
	ev->ifindex = 0;
	ev->endpoint = client ? c->client_endpoint : c->server_endpoint;
	ev->len = (__u32)c->bytes;
	ev->src_identity = c->client_identity;
	ev->dst_identity = c->server_identity;
	ev->family = key->family;
	ev->proto = WEIR_IP_PROTO_TCP;
	ev->sport = bpf_htons(cport);
	ev->dport = bpf_htons(c->server_port);
	ev->pad = 0;
	__builtin_memcpy(ev->saddr, client ? key->local : key->remote, 16);
	__builtin_memcpy(ev->daddr, client ? key->remote : key->local, 16);
	event_submit(ev);
}

static __always_inline int sock_ops_key(struct bpf_sock_ops *skops, struct weir_sock_key *key)
{
	__u32 local6[4] = { skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2], skops->local_ip6[3] };
	__u32 remote6[4] = { skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2],
			     skops->remote_ip6[3] };
	__u8 remote_family;

	*key = (struct weir_sock_key){};
	if (sockaccel_addr(skops->family, skops->local_ip4, local6, &key->family, key->local) ||
	    sockaccel_addr(skops->family, skops->remote_ip4, remote6, &remote_family, key->remote) ||
	    remote_family != key->family)
		return -1;
	key->local_port = (__u16)skops->local_port;
	key->remote_port = sockaccel_remote_port(skops->remote_port);
	return 0;
}

static __always_inline void on_established(struct bpf_sock_ops *skops, __u8 role)
{
	struct weir_addr_info *local, *remote, *client, *server;
	struct weir_conn conn = { .state = WEIR_CONN_STATE_REDIRECT, .role = role };
	struct weir_sock_key key;
	__u32 flags = node_flags();

	if (sock_ops_key(skops, &key))
		return;
	local = addr_info(key.family, key.local);
	remote = addr_info(key.family, key.remote);
	if (!local || !remote || !((local->flags | remote->flags) & WEIR_ADDR_FLAG_ENDPOINT)) {
		stat_add(WEIR_STAT_REFUSED_NOT_LOCAL, 1);
		return;
	}
	if (!(flags & WEIR_NODE_FLAG_ENABLED) || ((local->flags | remote->flags) & WEIR_ADDR_FLAG_DISABLED)) {
		stat_add(WEIR_STAT_REFUSED_DISABLED, 1);
		return;
	}
	if (!(flags & WEIR_NODE_FLAG_POLICY_BOUND)) {
		stat_add(WEIR_STAT_REFUSED_NO_POLICY, 1);
		return;
	}
	client = role == WEIR_ROLE_CLIENT ? local : remote;
	server = role == WEIR_ROLE_CLIENT ? remote : local;
	conn.server_port = role == WEIR_ROLE_CLIENT ? key.remote_port : key.local_port;
	conn.client_endpoint = client->endpoint;
	conn.server_endpoint = server->endpoint;
	conn.client_identity = ipcache_identity(key.family, role == WEIR_ROLE_CLIENT ? key.local : key.remote);
	conn.server_identity = ipcache_identity(key.family, role == WEIR_ROLE_CLIENT ? key.remote : key.local);
	if (!sockaccel_pair_allowed(conn.client_endpoint, conn.server_endpoint, conn.client_identity,
				    conn.server_identity, conn.server_port)) {
		stat_add(WEIR_STAT_REFUSED_POLICY, 1);
		return;
	}
	conn.cookie = bpf_get_socket_cookie(skops);
	conn.sk = (__u64)(unsigned long)skops->sk;
	conn.started_ns = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&sockaccel_conns, &key, &conn, BPF_ANY)) {
		stat_add(WEIR_STAT_REFUSED_FULL, 1);
		return;
	}
	if (bpf_sock_hash_update(skops, &sockaccel_socks, &key, BPF_ANY)) {
		bpf_map_delete_elem(&sockaccel_conns, &key);
		stat_add(WEIR_STAT_REFUSED_FULL, 1);
		return;
	}
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	stat_add(WEIR_STAT_ACCEL_STARTED, 1);
	accel_event(WEIR_EVENT_TYPE_ACCEL_START, &key, &conn);
}

static __always_inline void on_close(struct bpf_sock_ops *skops)
{
	struct weir_sock_key key;
	struct weir_conn *conn;

	if (sock_ops_key(skops, &key))
		return;
	conn = bpf_map_lookup_elem(&sockaccel_conns, &key);
	if (!conn)
		return;
	if (conn->state != WEIR_CONN_STATE_FALLBACK) {
		stat_add(WEIR_STAT_ACCEL_ENDED, 1);
		accel_event(WEIR_EVENT_TYPE_ACCEL_END, &key, conn);
	}
	bpf_map_delete_elem(&sockaccel_conns, &key);
}

SEC("sockops")
int sockaccel_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		on_established(skops, WEIR_ROLE_CLIENT);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_established(skops, WEIR_ROLE_SERVER);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			on_close(skops);
		break;
	}
	return 1;
}

/* Why a redirecting socket must leave the fast path now; 0 while it may stay. */
static __always_inline __u32 fallback_reason(const struct weir_sock_key *key, const struct weir_conn *c)
{
	struct weir_addr_info *local, *remote;

	if (!(node_flags() & WEIR_NODE_FLAG_ENABLED))
		return WEIR_STAT_FALLBACK_DISABLED;
	local = addr_info(key->family, key->local);
	remote = addr_info(key->family, key->remote);
	if (!local || !remote || ((local->flags | remote->flags) & WEIR_ADDR_FLAG_DISABLED))
		return WEIR_STAT_FALLBACK_DISABLED;
	if (!sockaccel_pair_allowed(c->client_endpoint, c->server_endpoint, c->client_identity, c->server_identity,
				    c->server_port))
		return WEIR_STAT_FALLBACK_POLICY;
	return 0;
}

/* Bytes redirected to the socket at `peer` that it has not read yet (its psock's
 * ingress queue), read through the address its record keeps; 0 when unknown. A
 * stale address can only make the answer wrong, never touch memory: it is read
 * with bpf_probe_read_kernel, and the answer only decides redirect or TCP.
 */
static __always_inline __u64 peer_queued(struct weir_sock_key *peer)
{
	struct weir_conn *pc = bpf_map_lookup_elem(&sockaccel_conns, peer);
	struct sock___weir *s;
	struct sk_psock___weir *psock = NULL;
	unsigned long data = 0;
	__u32 len = 0;

	if (!pc || !pc->sk || !bpf_core_field_exists(psock->msg_tot_len))
		return 0;
	s = (void *)pc->sk;
	if (bpf_probe_read_kernel(&data, sizeof(data), __builtin_preserve_access_index(&s->sk_user_data)))
		return 0;
	psock = (void *)(data & SK_USER_DATA_PTRMASK);
	if (psock)
		bpf_probe_read_kernel(&len, sizeof(len), __builtin_preserve_access_index(&psock->msg_tot_len));
	return len;
}

static __always_inline __u32 read_u32(const void *addr)
{
	__u32 v = 0;

	bpf_probe_read_kernel(&v, sizeof(v), addr);
	return v;
}

/* May a paused socket redirect again without the receiver reading new bytes before old ones?
 * Only when TCP holds none of this direction's bytes: everything this socket wrote is acked
 * (so it reached the peer), the peer's application has read all TCP brought it, and the peer
 * has drained below half the limit. Nothing new can enter TCP meanwhile: only this socket
 * writes this direction, and it is inside its own sendmsg.
 */
static __always_inline int may_resume(const struct weir_conn *c, struct weir_sock_key *peer)
{
	struct weir_conn *pc = bpf_map_lookup_elem(&sockaccel_conns, peer);
	struct tcp_sock___weir *self = (void *)c->sk, *other;

	if (!pc || !c->sk || !pc->sk)
		return 0;
	other = (void *)pc->sk;
	if (read_u32(__builtin_preserve_access_index(&self->write_seq)) !=
	    read_u32(__builtin_preserve_access_index(&self->snd_una)))
		return 0;
	if (read_u32(__builtin_preserve_access_index(&other->rcv_nxt)) !=
	    read_u32(__builtin_preserve_access_index(&other->copied_seq)))
		return 0;
	return peer_queued(peer) < queue_limit() / 2;
}

static __always_inline void fall_back(const struct weir_sock_key *key, struct weir_conn *c, __u32 reason)
{
	c->state = WEIR_CONN_STATE_FALLBACK;
	c->reason = reason;
	stat_add(reason, 1);
	stat_add(WEIR_STAT_ACCEL_ENDED, 1);
	accel_event(WEIR_EVENT_TYPE_ACCEL_END, key, c);
}

SEC("sk_msg")
int sockaccel_msg(struct sk_msg_md *msg)
{
	__u32 local6[4] = { msg->local_ip6[0], msg->local_ip6[1], msg->local_ip6[2], msg->local_ip6[3] };
	__u32 remote6[4] = { msg->remote_ip6[0], msg->remote_ip6[1], msg->remote_ip6[2], msg->remote_ip6[3] };
	struct weir_sock_key key = {}, peer;
	struct weir_conn *c;
	__u8 remote_family;
	__u32 reason;
	__u64 size = msg->size;

	if (sockaccel_addr(msg->family, msg->local_ip4, local6, &key.family, key.local) ||
	    sockaccel_addr(msg->family, msg->remote_ip4, remote6, &remote_family, key.remote))
		return SK_PASS;
	key.local_port = (__u16)msg->local_port;
	key.remote_port = sockaccel_remote_port(msg->remote_port);
	c = bpf_map_lookup_elem(&sockaccel_conns, &key);
	if (!c)
		return SK_PASS;
	if (c->state == WEIR_CONN_STATE_FALLBACK) {
		stat_add(WEIR_STAT_PASSED, 1);
		return SK_PASS;
	}
	reason = fallback_reason(&key, c);
	if (reason) {
		fall_back(&key, c, reason);
		stat_add(WEIR_STAT_PASSED, 1);
		return SK_PASS;
	}
	peer_key(&key, &peer);
	if (c->state == WEIR_CONN_STATE_PAUSED) {
		if (!may_resume(c, &peer)) {
			stat_add(WEIR_STAT_PASSED, 1);
			return SK_PASS;
		}
		c->state = WEIR_CONN_STATE_REDIRECT;
		c->reason = 0;
		stat_add(WEIR_STAT_RESUMED, 1);
	} else if (peer_queued(&peer) >= queue_limit()) {
		/* No window on a redirect: hand this direction to TCP until the peer catches up. */
		c->state = WEIR_CONN_STATE_PAUSED;
		c->reason = WEIR_STAT_FALLBACK_RECEIVER_FULL;
		stat_add(WEIR_STAT_FALLBACK_RECEIVER_FULL, 1);
		stat_add(WEIR_STAT_PASSED, 1);
		return SK_PASS;
	}
	/* SK_DROP here means no peer: pass the message on rather than lose it. */
	if (bpf_msg_redirect_hash(msg, &sockaccel_socks, &peer, BPF_F_INGRESS) != SK_PASS) {
		fall_back(&key, c, c->msgs ? WEIR_STAT_FALLBACK_PEER_GONE : WEIR_STAT_FALLBACK_NOT_READY);
		stat_add(WEIR_STAT_PASSED, 1);
		return SK_PASS;
	}
	c->msgs++;
	c->bytes += size;
	stat_add(WEIR_STAT_MSGS_REDIRECTED, 1);
	stat_add(WEIR_STAT_BYTES_REDIRECTED, size);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
