// SPDX-License-Identifier: GPL-2.0
/* Test fixture for pybpf: socket-level hooks (sk_msg on a sockhash and a
 * cgroup connect4 program), each counting its calls. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} sock_map SEC(".maps");

/* Slot 0: sk_msg calls. Slot 1: connect4 calls. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} calls SEC(".maps");

static __always_inline void count(__u32 slot)
{
	__u64 *value = bpf_map_lookup_elem(&calls, &slot);

	if (value)
		__sync_fetch_and_add(value, 1);
}

SEC("sk_msg")
int msg_pass(struct sk_msg_md *msg)
{
	count(0);
	return SK_PASS;
}

SEC("cgroup/connect4")
int connect4_count(struct bpf_sock_addr *ctx)
{
	count(1);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
