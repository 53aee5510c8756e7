/* The chain contract: how entry programs and object programs hand a packet on.
 *
 * An entry program fills the per-packet metadata and tail-calls the first
 * filled slot of its hook's call map. Each object does its work and calls
 * weir_tc_next() / weir_xdp_next(), which tail-calls the next filled slot after
 * its own; an empty slot is skipped because a tail call into it falls through.
 * When no slot is left the packet is forwarded and counted as such.
 *
 * TC metadata lives in skb->cb[] (see enum weir_cb); XDP metadata lives in
 * data_meta as struct weir_xdp_meta, put there by the XDP entry program.
 */
#pragma once

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "defs.h"
#include "maps.h"
#include "parse.h"

static __always_inline void counter_add(struct weir_counter *c, __u64 bytes)
{
	c->packets++;
	c->bytes += bytes;
}

static __always_inline void metrics_bump(__u8 reason, __u8 dir, __u64 bytes)
{
	struct weir_metric_key key = { .reason = reason, .dir = dir };
	struct weir_counter *val = bpf_map_lookup_elem(&metrics, &key);
	struct weir_counter init = { .packets = 1, .bytes = bytes };

	if (val) {
		counter_add(val, bytes);
		return;
	}
	if (bpf_map_update_elem(&metrics, &key, &init, BPF_NOEXIST) == 0)
		return;
	val = bpf_map_lookup_elem(&metrics, &key);
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

/* Emit one event for a packet; best effort (a full ring buffer drops the event,
 * never the verdict).
 */
static __always_inline void emit_event(__u8 type, __u8 reason, __u32 hook, __u32 ifindex,
				       __u32 endpoint, __u32 src_identity, void *data,
				       void *data_end)
{
	struct weir_event *ev;
	struct flow f;

	ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (!ev)
		return;
	parse_flow(data, data_end, &f);
	ev->type = type;
	ev->reason = reason;
	ev->dir = hook_direction(hook);
	ev->hook = hook;
	ev->ifindex = ifindex;
	ev->endpoint = endpoint;
	ev->len = f.len;
	ev->src_identity = src_identity;
	ev->dst_identity = 0;
	ev->family = f.family;
	ev->proto = f.proto;
	ev->sport = f.sport;
	ev->dport = f.dport;
	ev->pad = 0;
	__builtin_memcpy(ev->saddr, f.saddr, 16);
	__builtin_memcpy(ev->daddr, f.daddr, 16);
	bpf_ringbuf_submit(ev, 0);
}

/* ---- TC ---- */

/* Tail-call the first filled slot at or after `start`; returns only when none is. */
static __always_inline void tc_tail_from(struct __sk_buff *skb, void *calls, __u32 start)
{
#pragma unroll
	for (__u32 i = 0; i < WEIR_NUM_SLOTS; i++) {
		if (i < start)
			continue;
		skb->cb[WEIR_CB_SLOT] = i;
		bpf_tail_call(skb, calls, i);
	}
}

static __always_inline int weir_tc_forward(struct __sk_buff *skb)
{
	metrics_bump(WEIR_REASON_FORWARDED, hook_direction(skb->cb[WEIR_CB_HOOK]), skb->len);
	return TC_ACT_OK;
}

/* Drop with a reason: counted per (reason, direction) and reported as an event. */
static __always_inline int weir_tc_drop(struct __sk_buff *skb, __u8 reason)
{
	__u32 hook = skb->cb[WEIR_CB_HOOK];

	metrics_bump(reason, hook_direction(hook), skb->len);
	emit_event(WEIR_EVENT_TYPE_DROP, reason, hook, skb->ifindex, skb->cb[WEIR_CB_ENDPOINT],
		   skb->cb[WEIR_CB_SRC_IDENTITY], (void *)(long)skb->data,
		   (void *)(long)skb->data_end);
	return TC_ACT_SHOT;
}

/* Hand the packet to the next filled slot after the running one, or forward it. */
static __always_inline int weir_tc_next(struct __sk_buff *skb, void *calls)
{
	tc_tail_from(skb, calls, skb->cb[WEIR_CB_SLOT] + 1);
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
	skb->cb[WEIR_CB_FLAGS] = 0;
	tc_tail_from(skb, calls, 0);
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

static __always_inline void xdp_tail_from(struct xdp_md *ctx, __u32 start)
{
#pragma unroll
	for (__u32 i = 0; i < WEIR_NUM_SLOTS; i++) {
		struct weir_xdp_meta *meta;

		if (i < start)
			continue;
		meta = xdp_meta(ctx);
		if (!meta)
			return;
		meta->slot = i;
		bpf_tail_call(ctx, &calls_xdp, i);
	}
}

/* Next filled XDP slot after the running one, or XDP_PASS. Without metadata
 * (a driver that refuses data_meta) the chain ends here.
 */
static __always_inline int weir_xdp_next(struct xdp_md *ctx)
{
	struct weir_xdp_meta *meta = xdp_meta(ctx);

	if (meta)
		xdp_tail_from(ctx, meta->slot + 1);
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
	meta->flags = 0;
	xdp_tail_from(ctx, 0);
	return weir_xdp_forward(ctx);
}
