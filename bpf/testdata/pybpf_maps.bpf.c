// SPDX-License-Identifier: GPL-2.0
/* Test fixture for pybpf: one map of each type pybpf supports, an XDP program
 * whose verdict comes from a map, a tc program and a tail-call pair. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

struct pair {
	__u64 packets;
	__u64 bytes;
};

struct lpm_v4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

struct event {
	__u32 len;
	__u32 verdict;
};

/* Generic hash: u32 -> struct pair. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, struct pair);
} hash_map SEC(".maps");

/* A hash that fills up quickly, for "map is full". */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} tiny_hash SEC(".maps");

/* Slot 0: XDP verdict (1 = drop). Slot 1: tc verdict (1 = shot). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32);
} array_map SEC(".maps");

/* Slot 0: packets and bytes seen by xdp_verdict, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pair);
} percpu_array SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} percpu_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} lru_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4);
	__type(value, __u32);
} lpm_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v6);
	__type(value, __u32);
} lpm_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32);
} prog_array SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} sock_hash SEC(".maps");

/* Shared with pybpf_reuse.bpf.c through its pin. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shared_counter SEC(".maps");

/* Counts into percpu_array, reports to events, then drops when
 * array_map[0] == 1 and passes otherwise. */
SEC("xdp")
int xdp_verdict(struct xdp_md *ctx)
{
	__u32 zero = 0, verdict = XDP_PASS;
	__u32 len = ctx->data_end - ctx->data;
	struct pair *counters;
	struct event *ev;
	__u32 *drop;

	drop = bpf_map_lookup_elem(&array_map, &zero);
	if (drop && *drop == 1)
		verdict = XDP_DROP;

	counters = bpf_map_lookup_elem(&percpu_array, &zero);
	if (counters) {
		counters->packets += 1;
		counters->bytes += len;
	}

	ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (ev) {
		ev->len = len;
		ev->verdict = verdict;
		bpf_ringbuf_submit(ev, 0);
	}
	return verdict;
}

/* Shoots the packet when array_map[1] == 1. */
SEC("tc")
int tc_verdict(struct __sk_buff *skb)
{
	__u32 one = 1;
	__u32 *shot = bpf_map_lookup_elem(&array_map, &one);

	return (shot && *shot == 1) ? TC_ACT_SHOT : TC_ACT_OK;
}

/* Jumps through prog_array[0]; XDP_PASS tells that the slot was empty. */
SEC("xdp")
int xdp_tail_entry(struct xdp_md *ctx)
{
	bpf_tail_call(ctx, &prog_array, 0);
	return XDP_PASS;
}

/* The tail-call target: XDP_TX tells that the jump happened. */
SEC("xdp")
int xdp_tail_target(struct xdp_md *ctx)
{
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
