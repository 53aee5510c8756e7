// SPDX-License-Identifier: GPL-2.0
/* Test fixture for pybpf: a shared_counter whose max_entries differs from
 * the one in pybpf_maps.bpf.c, so reusing that pin must be refused. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shared_counter SEC(".maps");

SEC("tc")
int read_shared(struct __sk_buff *skb)
{
	__u32 zero = 0;
	__u64 *value = bpf_map_lookup_elem(&shared_counter, &zero);

	return value ? (int)*value : -1;
}

char LICENSE[] SEC("license") = "GPL";
