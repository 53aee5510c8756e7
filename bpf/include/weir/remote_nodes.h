/* The remote nodes' endpoint ranges, whatever their routing: remote CIDR -> the
 * node that owns it (struct weir_tunnel_value: its id, underlay address and the
 * key index it publishes). Written by the orchestrator before it routes to a
 * node and cleared after the routes went; read by the ipsec program, whose
 * strict mode drops an endpoint's packet to a node that encrypts (key index
 * above 0) while the ipsec service has no peer for it yet. Pinned by name under
 * globals/, so the orchestrator's overlay object and the ipsec object share it.
 */
#pragma once

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "defs.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, WEIR_TUNNEL_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weir_ipcache_key);
	__type(value, struct weir_tunnel_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} remote_nodes SEC(".maps");
