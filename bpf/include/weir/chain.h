/* The chain contract: how entry programs and object programs hand a packet on.
 *
 * An entry program copies its hook's chain word (chain_state) into the packet's
 * metadata: the active generation of the hook's call map and the slots filled
 * in it. It then tail-calls the first filled slot. Each object does its work
 * and calls weir_tc_next() / weir_xdp_next(), which tail-calls the next filled
 * slot after its own, in the generation the packet started in, so a chain swap
 * never shows a packet half of one chain and half of another. A slot that the
 * word says is filled but whose tail call falls through (its program removed
 * under the packet) drops the packet as MISSED_TAIL_CALL: the chain fails
 * closed, never skipping an object. When no slot is left the packet is forwarded.
 *
 * TC metadata lives in skb->cb[] (see enum weir_cb); XDP metadata lives in
 * data_meta as struct weir_xdp_meta, put there by the XDP entry program.
 * Every tail call has a constant index (bpf_tail_call_static), so the JIT
 * patches it into a direct jump.
 */
#pragma once

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "defs.h"
#include "events.h"
#include "maps.h"
#include "parse.h"

static __always_inline void counter_add(struct weir_counter *c, __u64 bytes)
{
	c->packets++;
	c->bytes += bytes;
}

static __always_inline void metrics_bump(__u8 reason, __u8 dir, __u64 bytes)
{
	__u32 index = reason | (__u32)dir << WEIR_REASON_COUNTER_DIR_SHIFT;
	struct weir_counter *val = bpf_map_lookup_elem(&reason_counters, &index);

	if (val)
		counter_add(val, bytes);
}

static __always_inline __u8 hook_direction(__u32 hook)
{
	return hook == WEIR_HOOK_FROM_CONTAINER || hook == WEIR_HOOK_TO_NETWORK
		       ? WEIR_DIRECTION_EGRESS
		       : WEIR_DIRECTION_INGRESS;
}

static __always_inline void entry_count(__u32 hook, __u64 bytes)
{
	struct weir_counter *c = bpf_map_lookup_elem(&entry_stats, &hook);

	if (c)
		counter_add(c, bytes);
}

/* The identity of the endpoint a to-container packet is for; 0 elsewhere. */
static __always_inline __u32 dst_identity_of(__u32 hook, __u32 ifindex)
{
	struct weir_endpoint_info *ep;

	if (hook != WEIR_HOOK_TO_CONTAINER)
		return 0;
	ep = bpf_map_lookup_elem(&endpoints, &ifindex);
	return ep ? ep->identity : 0;
}

/* The event kind (rate limit) of a DROP or VERDICT event at a hook. */
static __always_inline __u32 event_kind_of(__u8 type, __u32 hook)
{
	if (type != WEIR_EVENT_TYPE_DROP)
		return type == WEIR_EVENT_TYPE_TRANSLATE ? WEIR_EVENT_KIND_TRANSLATE : WEIR_EVENT_KIND_VERDICT;
	return hook == WEIR_HOOK_XDP ? WEIR_EVENT_KIND_PREFILTER : WEIR_EVENT_KIND_DROP;
}

/* The flow an event parses, per CPU: off the stack, which the event function
 * (weir_tc_event) shares with its caller's frame, 512 bytes for both.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow);
} event_flow SEC(".maps");

/* Fill a reserved event with a packet's fields: its flow parsed into the
 * per-CPU scratch; the endpoint, identities and rule are the caller's.
 */
static __always_inline int event_fill(struct weir_event *ev, __u8 type, __u8 reason, __u32 hook, __u32 ifindex,
				      void *data, void *data_end)
{
	__u32 zero = 0;
	struct flow *f = bpf_map_lookup_elem(&event_flow, &zero);

	if (!f)
		return -1;
	parse_flow(data, data_end, f);
	ev->type = type;
	ev->reason = reason;
	ev->dir = hook_direction(hook);
	ev->hook = hook;
	ev->ifindex = ifindex;
	ev->len = f->len;
	ev->dst_identity = dst_identity_of(hook, ifindex);
	ev->family = f->family;
	ev->proto = f->proto;
	ev->sport = f->sport;
	ev->dport = f->dport;
	ev->pad = 0;
	__builtin_memcpy(ev->saddr, f->saddr, 16);
	__builtin_memcpy(ev->daddr, f->daddr, 16);
	return 0;
}

/* Reserve and fill an event for a packet (rule 0, no NAT), or NULL when its
 * kind's limit holds it back or the ring buffer is full (both counted). The
 * caller may add the rule or the translation, then submits it.
 */
static __always_inline struct weir_event *event_for_packet(__u8 type, __u8 reason, __u32 hook, __u32 ifindex,
							   __u32 endpoint, __u32 src_identity, void *data,
							   void *data_end)
{
	struct weir_event *ev = event_reserve(event_kind_of(type, hook));

	if (!ev)
		return 0;
	ev->endpoint = endpoint;
	ev->src_identity = src_identity;
	if (event_fill(ev, type, reason, hook, ifindex, data, data_end) < 0) {
		bpf_ringbuf_discard(ev, 0);
		return 0;
	}
	return ev;
}

/* Emit one event for a packet, naming the policy rule behind it (0: none);
 * best effort (a limited or full ring buffer drops the event, never the verdict).
 */
static __always_inline void emit_event_rule(__u8 type, __u8 reason, __u32 hook, __u32 ifindex, __u32 endpoint,
					    __u32 src_identity, __u32 rule, void *data, void *data_end)
{
	struct weir_event *ev = event_for_packet(type, reason, hook, ifindex, endpoint, src_identity, data, data_end);

	if (!ev)
		return;
	ev->rule = rule;
	event_submit(ev);
}

static __always_inline void emit_event(__u8 type, __u8 reason, __u32 hook, __u32 ifindex, __u32 endpoint,
				       __u32 src_identity, void *data, void *data_end)
{
	emit_event_rule(type, reason, hook, ifindex, endpoint, src_identity, 0, data, data_end);
}

/* The live chain word of a hook. */
static __always_inline __u32 chain_word(__u32 hook)
{
	__u32 *word = bpf_map_lookup_elem(&chain_state, &hook);

	return word ? *word : 0;
}

/* If slot i is pending (filled, after the running one): record it, tail-call it
 * in the word's generation, and return 1 if the call fell through. Spelled out
 * per slot (WEIR_FOR_EACH_SLOT) so that every index is a compile-time constant.
 */
#define WEIR_TRY_SLOT(ctx, calls, word, pending, set_slot, i)                       \
	if ((pending) & (1u << (i))) {                                               \
		set_slot(i);                                                         \
		if ((word) & WEIR_CHAIN_GENERATION_BIT)                              \
			bpf_tail_call_static(ctx, calls, WEIR_NUM_SLOTS + (i));      \
		else                                                                 \
			bpf_tail_call_static(ctx, calls, (i));                       \
		return 1;                                                            \
	}

_Static_assert(WEIR_NUM_SLOTS == 8, "WEIR_FOR_EACH_SLOT spells out 8 slots");
#define WEIR_FOR_EACH_SLOT(ctx, calls, word, pending, set_slot)   \
	WEIR_TRY_SLOT(ctx, calls, word, pending, set_slot, 0)     \
	WEIR_TRY_SLOT(ctx, calls, word, pending, set_slot, 1)     \
	WEIR_TRY_SLOT(ctx, calls, word, pending, set_slot, 2)     \
	WEIR_TRY_SLOT(ctx, calls, word, pending, set_slot, 3)     \
	WEIR_TRY_SLOT(ctx, calls, word, pending, set_slot, 4)     \
	WEIR_TRY_SLOT(ctx, calls, word, pending, set_slot, 5)     \
	WEIR_TRY_SLOT(ctx, calls, word, pending, set_slot, 6)     \
	WEIR_TRY_SLOT(ctx, calls, word, pending, set_slot, 7)

/* The filled slots of a chain word at or after `start` (start <= NUM_SLOTS). */
static __always_inline __u32 chain_pending(__u32 word, __u32 start)
{
	return word & ((1u << WEIR_NUM_SLOTS) - 1) & ~((1u << (start & 31)) - 1);
}

/* ---- TC ---- */

/* Tail-call the first filled slot at or after `start`. Returns 0 when no slot
 * is left, 1 when a filled slot's tail call fell through.
 */
static __always_inline int tc_tail_from(struct __sk_buff *skb, void *calls, __u32 start)
{
	__u32 word = skb->cb[WEIR_CB_FLAGS];
	__u32 pending = chain_pending(word, start);

#define TC_SET_SLOT(i) (skb->cb[WEIR_CB_SLOT] = (i))
	WEIR_FOR_EACH_SLOT(skb, calls, word, pending, TC_SET_SLOT)
#undef TC_SET_SLOT
	return 0;
}

static __always_inline int weir_tc_forward(struct __sk_buff *skb)
{
	metrics_bump(WEIR_REASON_FORWARDED, hook_direction(skb->cb[WEIR_CB_HOOK]), skb->len);
	return TC_ACT_OK;
}

/* emit_event_rule() for a TC packet, as a global function: the verifier checks
 * it once per program, where each inlined copy (it parses the packet again) was
 * checked anew at every call site and, with its states multiplied by the
 * caller's, took policy_egress past Linux 6.1's million-instruction limit.
 * `what` packs the type, reason and hook (WEIR_TC_EVENT), five arguments at most.
 */
#define WEIR_TC_EVENT(type, reason, hook) ((__u32)(type) | (__u32)(reason) << 8 | (__u32)(hook) << 16)

int weir_tc_event(struct __sk_buff *skb, __u32 what, __u32 endpoint, __u32 src_identity, __u32 rule);

#ifndef WEIR_NO_PROGRAMS /* libbpf would take a lone global function for a program */
__noinline int weir_tc_event(struct __sk_buff *skb, __u32 what, __u32 endpoint, __u32 src_identity, __u32 rule)
{
	struct weir_event *ev = event_reserve(event_kind_of(what & 0xff, what >> 16));

	if (!ev)
		return 0;
	/* into the record at once, so that they need no room on the stack meanwhile */
	ev->endpoint = endpoint;
	ev->src_identity = src_identity;
	ev->rule = rule;
	if (event_fill(ev, what & 0xff, (what >> 8) & 0xff, what >> 16, skb->ifindex, (void *)(long)skb->data,
		       (void *)(long)skb->data_end) < 0) {
		bpf_ringbuf_discard(ev, 0);
		return 0;
	}
	event_submit(ev);
	return 0;
}
#endif

/* Drop with a reason and the policy rule that decided it (0: none): counted per
 * (reason, direction) and reported as an event.
 */
static __always_inline int weir_tc_drop_rule(struct __sk_buff *skb, __u8 reason, __u32 rule)
{
	__u32 hook = skb->cb[WEIR_CB_HOOK];

	metrics_bump(reason, hook_direction(hook), skb->len);
	weir_tc_event(skb, WEIR_TC_EVENT(WEIR_EVENT_TYPE_DROP, reason, hook), skb->cb[WEIR_CB_ENDPOINT],
		      skb->cb[WEIR_CB_SRC_IDENTITY], rule);
	return TC_ACT_SHOT;
}

/* Drop with a reason: counted per (reason, direction) and reported as an event. */
static __always_inline int weir_tc_drop(struct __sk_buff *skb, __u8 reason)
{
	return weir_tc_drop_rule(skb, reason, 0);
}

/* Hand the packet to the next filled slot after the running one, or forward it.
 * `calls` is the hook's call map (the same map in every generation).
 */
static __always_inline int weir_tc_next(struct __sk_buff *skb, void *calls)
{
	if (tc_tail_from(skb, calls, skb->cb[WEIR_CB_SLOT] + 1))
		return weir_tc_drop(skb, WEIR_REASON_MISSED_TAIL_CALL);
	return weir_tc_forward(skb);
}

/* The body of every TC entry program: metadata, counters, first slot. */
static __always_inline int weir_tc_entry(struct __sk_buff *skb, __u32 hook, void *calls)
{
	__u32 ifindex = skb->ifindex;
	struct weir_endpoint_info *ep = bpf_map_lookup_elem(&endpoints, &ifindex);

	entry_count(hook, skb->len);
	skb->cb[WEIR_CB_HOOK] = hook;
	skb->cb[WEIR_CB_SLOT] = 0;
	skb->cb[WEIR_CB_ENDPOINT] = ep ? ep->id : 0;
	skb->cb[WEIR_CB_SRC_IDENTITY] = (ep && hook == WEIR_HOOK_FROM_CONTAINER) ? ep->identity : 0;
	skb->cb[WEIR_CB_FLAGS] = chain_word(hook);
	/* A new endpoint waits for its policy: while its map is not installed, its
	 * traffic is dropped whenever this hook's chain has a policy slot, so
	 * nothing passes (or enters conntrack) before the policy applies.
	 */
	if (ep && (ep->flags & WEIR_ENDPOINT_FLAG_POLICY_PENDING) &&
	    (skb->cb[WEIR_CB_FLAGS] & (1u << WEIR_SLOT_POLICY)))
		return weir_tc_drop(skb, WEIR_REASON_POLICY_PENDING);
	if (tc_tail_from(skb, calls, 0))
		return weir_tc_drop(skb, WEIR_REASON_MISSED_TAIL_CALL);
	return weir_tc_forward(skb);
}

/* ---- XDP ---- */

static __always_inline struct weir_xdp_meta *xdp_meta(struct xdp_md *ctx)
{
	struct weir_xdp_meta *meta = (void *)(long)ctx->data_meta;

	if ((void *)(meta + 1) > (void *)(long)ctx->data)
		return 0;
	return meta;
}

static __always_inline int weir_xdp_forward(struct xdp_md *ctx)
{
	metrics_bump(WEIR_REASON_FORWARDED, WEIR_DIRECTION_INGRESS,
		     ctx->data_end - ctx->data);
	return XDP_PASS;
}

static __always_inline int weir_xdp_drop(struct xdp_md *ctx, __u8 reason)
{
	metrics_bump(reason, WEIR_DIRECTION_INGRESS, ctx->data_end - ctx->data);
	emit_event(WEIR_EVENT_TYPE_DROP, reason, WEIR_HOOK_XDP, ctx->ingress_ifindex, 0, 0,
		   (void *)(long)ctx->data, (void *)(long)ctx->data_end);
	return XDP_DROP;
}

/* As tc_tail_from, with the metadata in data_meta (none: nothing to call). */
static __always_inline int xdp_tail_from(struct xdp_md *ctx, __u32 start)
{
	struct weir_xdp_meta *meta = xdp_meta(ctx);
	__u32 word, pending;

	if (!meta)
		return 0;
	word = meta->flags;
	pending = chain_pending(word, start);
#define XDP_SET_SLOT(i) (meta->slot = (i))
	WEIR_FOR_EACH_SLOT(ctx, &calls_xdp, word, pending, XDP_SET_SLOT)
#undef XDP_SET_SLOT
	return 0;
}

/* Next filled XDP slot after the running one, or XDP_PASS. Without metadata
 * (a driver that refuses data_meta) the chain ends here.
 */
static __always_inline int weir_xdp_next(struct xdp_md *ctx)
{
	struct weir_xdp_meta *meta = xdp_meta(ctx);

	if (meta && xdp_tail_from(ctx, meta->slot + 1))
		return weir_xdp_drop(ctx, WEIR_REASON_MISSED_TAIL_CALL);
	return weir_xdp_forward(ctx);
}

static __always_inline int weir_xdp_entry(struct xdp_md *ctx)
{
	struct weir_xdp_meta *meta;

	entry_count(WEIR_HOOK_XDP, ctx->data_end - ctx->data);
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct weir_xdp_meta)) < 0)
		return weir_xdp_forward(ctx);
	meta = xdp_meta(ctx);
	if (!meta)
		return weir_xdp_forward(ctx);
	meta->slot = 0;
	meta->flags = chain_word(WEIR_HOOK_XDP);
	if (xdp_tail_from(ctx, 0))
		return weir_xdp_drop(ctx, WEIR_REASON_MISSED_TAIL_CALL);
	return weir_xdp_forward(ctx);
}
