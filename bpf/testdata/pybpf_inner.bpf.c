// SPDX-License-Identifier: GPL-2.0
/* Test fixture for pybpf's maps of maps: programs that read through an
 * ARRAY_OF_MAPS and a HASH_OF_MAPS and count what they saw in `seen`, so a
 * test can tell which inner map each run met (or that it met none). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define SEEN_NO_INNER 0xffffffff /* the outer slot was empty */
#define SEEN_NO_VALUE 0xfffffffe /* the inner map lacked slot 0 */
#define SEEN_TORN 0xfffffffd     /* slots 0 and 3 of one inner map differ */

/* An inner array of 4 u32: every slot holds the same value (its "version"). */
struct version_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32);
};

/* An inner hash u32 -> u32 that may be any size (hash sizes are not compared). */
struct table_inner {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 2);
	__type(key, __u32);
	__array(values, struct version_inner);
} versions SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 8);
	__type(key, __u32);
	__array(values, struct table_inner);
} tables SEC(".maps");

/* An inner array of any size (BPF_F_INNER_MAP), as the LB's selection tables. */
struct slots_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_INNER_MAP);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 8);
	__type(key, __u32);
	__array(values, struct slots_inner);
} slots SEC(".maps");

/* What the programs saw -> how many times. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} seen SEC(".maps");

static __always_inline void count(__u32 what)
{
	__u64 one = 1, *n = bpf_map_lookup_elem(&seen, &what);

	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&seen, &what, &one, BPF_NOEXIST);
}

/* Reads slots 0 and 3 of versions[0]. */
SEC("xdp")
int read_version(struct xdp_md *ctx)
{
	__u32 zero = 0, three = 3, *first, *last;
	void *inner = bpf_map_lookup_elem(&versions, &zero);

	if (!inner) {
		count(SEEN_NO_INNER);
		return XDP_PASS;
	}
	first = bpf_map_lookup_elem(inner, &zero);
	last = bpf_map_lookup_elem(inner, &three);
	if (!first || !last)
		count(SEEN_NO_VALUE);
	else if (*first != *last)
		count(SEEN_TORN);
	else
		count(*first);
	return XDP_PASS;
}

/* Reads key 1 of tables[7]. */
SEC("xdp")
int read_table(struct xdp_md *ctx)
{
	__u32 seven = 7, one = 1, *value;
	void *inner = bpf_map_lookup_elem(&tables, &seven);

	if (!inner) {
		count(SEEN_NO_INNER);
		return XDP_PASS;
	}
	value = bpf_map_lookup_elem(inner, &one);
	count(value ? *value : SEEN_NO_VALUE);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
