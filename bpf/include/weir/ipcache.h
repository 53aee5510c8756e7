/* ipcache: the security identity of any address, shared by every object.
 *
 * An LPM trie over (family, address); the policy service keeps it (endpoints,
 * the host's addresses, CIDRs named in rules). Anything it does not cover is
 * the world.
 */
#pragma once

#include "weir/chain.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, WEIR_IPCACHE_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weir_ipcache_key);
	__type(value, struct weir_ipcache_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ipcache SEC(".maps");

/* The ipcache's generation (key 0): its writer bumps it after every change, so
 * a verdict cached under one generation is known stale once the ipcache moves
 * (see policy.bpf.c). 0 until the first write.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ipcache_generation SEC(".maps");

static __always_inline __u32 ipcache_generation_now(void)
{
	__u32 zero = 0, *gen = bpf_map_lookup_elem(&ipcache_generation, &zero);

	return gen ? *(volatile __u32 *)gen : 0;
}

/* Identity of an address of `family` (WEIR_FAMILY_INET or _INET6); addr is 16 bytes (IPv4 in the first 4). */
static __always_inline __u32 ipcache_identity(__u8 family, const __u8 *addr)
{
	struct weir_ipcache_key key = {};
	struct weir_ipcache_value *val;

	key.family = family;
	if (family == WEIR_FAMILY_INET) {
		key.prefixlen = 32 + 32;
		__builtin_memcpy(key.addr, addr, 4);
	} else {
		key.prefixlen = 32 + 128;
		__builtin_memcpy(key.addr, addr, 16);
	}
	val = bpf_map_lookup_elem(&ipcache, &key);
	return val ? val->identity : WEIR_RESERVED_IDENTITY_WORLD;
}
