/* Events to the ring buffer, each kind under a rate limit of its own.
 *
 * Every event goes through event_reserve(kind). A kind's limit (event_limits,
 * written by the orchestrator) is a token bucket kept per CPU in the GCRA form:
 * the time the next event is "due"; an event passes when that time is at most
 * `burst` intervals ahead of now, and moves it one interval on. A flood
 * therefore costs a few inlined array lookups and one coarse clock read per
 * packet once its bucket is empty, and never reaches the ring buffer. The coarse
 * clock (a tick's resolution) costs a fraction of bpf_ktime_get_ns() (measured:
 * a limited tc drop 3% over no event at all, against 23% with the precise
 * clock); within a tick up to `burst` events pass, and the rate holds on average.
 * A kind may also be sampled, one candidate in N per CPU (a countdown beside the
 * bucket: the first, then every N-th), before the bucket: prefilter drops, the
 * line-rate path, are by default, so most of a flood skips the clock as well.
 * What became of every event is counted per CPU and kind (event_stats): emitted,
 * held back by the limit, sampled out, or lost because the ring buffer was full,
 * so the orchestrator can report every loss. A kind with no limit written (all
 * zero) is not limited.
 */
#pragma once

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "defs.h"
#include "maps.h"

/* Rate limit of each event kind (enum weir_event_kind); written by the orchestrator. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WEIR_NUM_EVENT_KINDS);
	__type(key, __u32);
	__type(value, struct weir_event_limit);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} event_limits SEC(".maps");

/* Each CPU's token bucket and sampler per kind. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_NUM_EVENT_KINDS);
	__type(key, __u32);
	__type(value, struct weir_event_bucket);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} event_buckets SEC(".maps");

/* What became of the events of each kind, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_NUM_EVENT_KINDS);
	__type(key, __u32);
	__type(value, struct weir_event_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} event_stats SEC(".maps");

/* Whether an event of `kind` may go out now; counts it in *st when not. */
static __always_inline int event_admit(__u32 kind, struct weir_event_stats *st)
{
	struct weir_event_limit *lim = bpf_map_lookup_elem(&event_limits, &kind);
	struct weir_event_bucket *b;
	__u64 now, next;

	if (!lim)
		return 1;
	if (lim->flags & WEIR_EVENT_LIMIT_FLAG_OFF) {
		if (st)
			st->limited++;
		return 0;
	}
	if (lim->sample <= 1 && !lim->interval_ns)
		return 1;
	b = bpf_map_lookup_elem(&event_buckets, &kind);
	if (!b)
		return 1;
	/* One in `sample`: a countdown, no division and no random number per packet. */
	if (lim->sample > 1) {
		if (b->skip) {
			b->skip--;
			if (st)
				st->sampled_out++;
			return 0;
		}
		b->skip = lim->sample - 1;
	}
	if (!lim->interval_ns)
		return 1;
	now = bpf_ktime_get_coarse_ns();
	next = (b->due > now ? b->due : now) + lim->interval_ns;
	if (next - now > (__u64)(lim->burst ? lim->burst : 1) * lim->interval_ns) {
		if (st)
			st->limited++;
		return 0;
	}
	b->due = next;
	return 1;
}

/* A ring-buffer record for an event of `kind` (its rule and NAT fields zeroed),
 * or NULL when the limit holds it back or the ring buffer is full. The caller
 * fills the rest and submits it.
 */
static __always_inline struct weir_event *event_reserve(__u32 kind)
{
	struct weir_event_stats *st = bpf_map_lookup_elem(&event_stats, &kind);
	struct weir_event *ev;

	if (!event_admit(kind, st))
		return 0;
	ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (!ev) {
		if (st)
			st->lost++;
		return 0;
	}
	if (st)
		st->emitted++;
	ev->rule = 0;
	ev->nat_port = 0;
	ev->pad2 = 0;
	__builtin_memset(ev->nat_addr, 0, sizeof(ev->nat_addr));
	return ev;
}

/* Hand a reserved event to the reader. A wake-up per record would cost an irq_work
 * (a self-IPI, a VM exit on a guest) and a reader thread woken for one record; so the
 * reader is woken only when this record takes the unread bytes past a multiple of
 * WEIR_EVENTS_WAKEUP_BYTES, and otherwise finds it on its next timed poll
 * (EVENTS_POLL_MS, services/common/datapath.py). A reader that falls behind is woken
 * once per WEIR_EVENTS_WAKEUP_BYTES, never per record.
 */
static __always_inline void event_submit(struct weir_event *ev)
{
	__u64 unread = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	__u64 before = unread > sizeof(*ev) + 8 ? unread - sizeof(*ev) - 8 : 0;

	bpf_ringbuf_submit(ev, (unread / WEIR_EVENTS_WAKEUP_BYTES) != (before / WEIR_EVENTS_WAKEUP_BYTES)
				       ? BPF_RB_FORCE_WAKEUP
				       : BPF_RB_NO_WAKEUP);
}
