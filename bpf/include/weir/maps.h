/* Maps shared by every Weir object, pinned by name under <bpffs>/globals/.
 *
 * Every object that includes this header declares the same maps; libbpf reuses
 * an existing pin (the loader passes the globals directory as pin_root_path),
 * so all objects of a node share one copy of each.
 */
#pragma once

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "defs.h"

/* One call map per hook point, written only by the orchestrator. It holds
 * WEIR_CHAIN_GENERATIONS generations of the chain: generation g's slot s
 * (enum weir_slot) is index g * WEIR_NUM_SLOTS + s. A chain upgrade fills the
 * idle generation, then flips the hook's word in chain_state.
 */
#define WEIR_CALL_MAP(name)                                                   \
	struct {                                                              \
		__uint(type, BPF_MAP_TYPE_PROG_ARRAY);                        \
		__uint(max_entries, WEIR_NUM_SLOTS * WEIR_CHAIN_GENERATIONS); \
		__type(key, __u32);                                           \
		__type(value, __u32);                                         \
		__uint(pinning, LIBBPF_PIN_BY_NAME);                          \
	} name SEC(".maps")

WEIR_CALL_MAP(calls_from_container);
WEIR_CALL_MAP(calls_to_container);
WEIR_CALL_MAP(calls_from_network);
WEIR_CALL_MAP(calls_to_network);
WEIR_CALL_MAP(calls_xdp);

/* The live chain word of each hook (index = enum weir_hook): the active
 * generation and the slots filled in it. One __u32, so a flip is one write.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WEIR_NUM_HOOKS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} chain_state SEC(".maps");

/* Forwarded and dropped packets per (reason, direction), per CPU, at index
 * reason | dir << WEIR_REASON_COUNTER_DIR_SHIFT (services/common/reasons.py reads it).
 * An array: a bump is one inlined slot lookup, with no hashing and no first insert.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_REASON_COUNTERS);
	__type(key, __u32);
	__type(value, struct weir_counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} reason_counters SEC(".maps");

/* Packets seen by each hook's entry program, per CPU; index = enum weir_hook. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_NUM_HOOKS);
	__type(key, __u32);
	__type(value, struct weir_counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} entry_stats SEC(".maps");

/* Endpoints of this node by host-side ifindex; written by the orchestrator. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct weir_endpoint_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

/* Drops, verdicts and redirects, streamed to user space as flows. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, WEIR_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");
