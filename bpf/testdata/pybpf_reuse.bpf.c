// SPDX-License-Identifier: GPL-2.0
/* Test fixture for pybpf: declares the same pinned shared_counter as
 * pybpf_maps.bpf.c so that two loaded objects share one map. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shared_counter SEC(".maps");

/* Increments shared_counter[0] and returns the new value. */
SEC("tc")
int bump_shared(struct __sk_buff *skb)
{
	__u32 zero = 0;
	__u64 *value = bpf_map_lookup_elem(&shared_counter, &zero);

	if (!value)
		return -1;
	return __sync_add_and_fetch(value, 1);
}

char LICENSE[] SEC("license") = "GPL";
