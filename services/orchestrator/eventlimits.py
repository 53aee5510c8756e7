"""The datapath's event rate limits (event_limits) and what became of its events (event_stats).

Every BPF program emits its events through one per-CPU token bucket per kind
(bpf/include/weir/events.h), so a flood of denied packets costs the stream a
bounded number of events and the packet path one map lookup once the bucket is
empty. The orchestrator writes the limits at start (from its flags) and reads
the per-kind counts for GetFlowStats and the metrics: emitted, held back by the
limit, sampled out, and lost because the ring buffer was full.

Limits changed at run time (SetEventLimits, `weir event-limits`) are kept in the
orchestrator's store with the change protocol, so a restart keeps them. Each stored limit
remembers the flag (or default) in force when it was set: if the flag for that kind has
changed by the next start, the operator's newer word is the flag and the stored limit is
dropped; otherwise the stored limit wins over the unchanged flag.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import structlog

from pybpf import Map
from services.common.change import Change
from services.common.datapath import EventKind, EventLimit, EventLimitFlag, EventStats
from services.common.store import Store, StoreError

log = structlog.get_logger("weir.orchestrator.eventlimits")
KIND = "event_limit"  # store documents: {"limit": Limit, "flag": the Limit the flags gave then}

# Per kind and per CPU: events per second and burst. Prefilter drops are the line-rate path,
# so they get a lower rate and are sampled (one in DEFAULT_PREFILTER_SAMPLE, the first of a
# quiet spell included); every kind can be changed with --flow-event-limit.
DEFAULT_RATE = 1000
DEFAULT_BURST = 100
DEFAULT_PREFILTER_RATE = 100
DEFAULT_PREFILTER_SAMPLE = 16
MAX_RATE = 1_000_000
MAX_SAMPLE = 1 << 20


@dataclass(frozen=True)
class Limit:
    """One kind's limit: `rate` events/s per CPU (0: no limit), `burst`, one in `sample`; `off` emits none."""

    rate: int = DEFAULT_RATE
    burst: int = DEFAULT_BURST
    sample: int = 1
    off: bool = False

    def check(self) -> None:
        """ValueError if a field is out of range (what parse_limit refuses)."""
        if not 0 <= self.rate <= MAX_RATE:
            raise ValueError(f"RATE {self.rate} is not in 0-{MAX_RATE} (events per second per CPU; 0: no limit)")
        if not 1 <= self.burst <= MAX_RATE:
            raise ValueError(f"BURST {self.burst} is not in 1-{MAX_RATE}")
        if not 1 <= self.sample <= MAX_SAMPLE:
            raise ValueError(f"SAMPLE {self.sample} is not in 1-{MAX_SAMPLE}")

    @classmethod
    def from_doc(cls, doc: Any) -> Limit:
        """A stored limit; ValueError if the document is not one."""
        if not isinstance(doc, dict) or set(doc) != {"rate", "burst", "sample", "off"}:
            raise ValueError(f"not an event limit: {doc!r}")
        rate, burst, sample, off = doc["rate"], doc["burst"], doc["sample"], doc["off"]
        if not all(type(v) is int for v in (rate, burst, sample)) or type(off) is not bool:
            raise ValueError(f"not an event limit: {doc!r}")
        limit = cls(rate, burst, sample, off)
        limit.check()
        return limit

    def packed(self) -> EventLimit:
        return EventLimit(
            interval_ns=1_000_000_000 // self.rate if self.rate else 0,
            burst=self.burst,
            sample=self.sample,
            flags=EventLimitFlag.OFF if self.off else 0,
        )


@dataclass(frozen=True)
class KindStats:
    kind: str
    emitted: int
    limited: int
    sampled_out: int
    lost: int
    limit: Limit


def default_limits() -> dict[EventKind, Limit]:
    limits = {kind: Limit() for kind in EventKind}
    limits[EventKind.PREFILTER] = Limit(rate=DEFAULT_PREFILTER_RATE, sample=DEFAULT_PREFILTER_SAMPLE)
    return limits


def parse_limit(text: str) -> tuple[EventKind, Limit]:
    """`KIND=RATE[/BURST][:SAMPLE]` or `KIND=off` (KIND any case); ValueError says what is wrong.

    RATE 0 means no limit; SAMPLE N keeps one candidate event in N before the bucket.
    """
    kind_text, sep, spec = text.partition("=")
    kind = EventKind.__members__.get(kind_text.strip().upper())
    if not sep or kind is None:
        kinds = ", ".join(EventKind.__members__)
        raise ValueError(f"{text!r}: give KIND=RATE[/BURST][:SAMPLE] or KIND=off, KIND one of {kinds}")
    if spec.strip().lower() == "off":
        return kind, Limit(off=True)
    rate_burst, _, sample_text = spec.partition(":")
    rate_text, _, burst_text = rate_burst.partition("/")
    default = default_limits()[kind]
    try:
        rate = int(rate_text)
        burst = int(burst_text) if burst_text else default.burst
        sample = int(sample_text) if sample_text else 1
    except ValueError:
        raise ValueError(f"{text!r}: RATE, BURST and SAMPLE are whole numbers") from None
    limit = Limit(rate, burst, sample)
    try:
        limit.check()
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    return kind, limit


class EventLimits:
    """Owns the node's event_limits (written) and event_stats (read) maps, and the limits set at run time."""

    def __init__(self, limits_map: Map, stats_map: Map, store: Store | None = None) -> None:
        """Without a store (benchmarks), limits set at run time last as long as the process."""
        self._limits_map = limits_map.typed(ctypes.c_uint32, EventLimit)
        self._stats_map = stats_map.typed(ctypes.c_uint32, EventStats)
        self._store = store
        self.limits: dict[EventKind, Limit] = {}
        self._flags: dict[EventKind, Limit] = {}
        self._lost_at_start = 0

    def configure(self, flags: dict[EventKind, Limit]) -> None:
        """Write every kind's limit: set at run time, else the flag, else the default; remember the losses so far.

        A stored limit whose kind's flag changed since it was set gives way to the flag.
        StoreError if a stored document is not a limit (the orchestrator then holds, as for
        any unreadable state).
        """
        self._flags = {**default_limits(), **flags}
        wanted = dict(self._flags)
        stale = []
        for key, doc in self._store.items(KIND) if self._store is not None else ():
            kind = EventKind.__members__.get(key)
            try:
                if kind is None:
                    raise ValueError(f"no event kind {key!r}")
                limit, flag = Limit.from_doc(doc.get("limit")), Limit.from_doc(doc.get("flag"))
            except ValueError as exc:
                assert self._store is not None
                raise StoreError(self._store.path, f"holds an event limit that does not read back ({exc})") from None
            if flag == self._flags[kind]:
                wanted[kind] = limit
            else:
                stale.append(key)
                log.info("event limit flag changed since the limit was set at run time; the flag applies", kind=key)
        if stale and self._store is not None:
            with Change(self._store):
                self._store.delete_many(KIND, stale)
        for kind, limit in wanted.items():
            self._limits_map.update(int(kind), limit.packed())
        self.limits = wanted
        self._lost_at_start = sum(s.lost for s in self.stats())

    def change(self, limits: dict[EventKind, Limit]) -> None:
        """Set these kinds' limits now and keep them across restarts, all or none; the others stay."""
        old = dict(self.limits)
        with Change(self._store) as change:
            for kind, limit in limits.items():
                if self._store is not None:
                    self._store.put(KIND, kind.name, {"limit": asdict(limit), "flag": asdict(self._flags[kind])})
            for kind, limit in limits.items():
                change.apply(partial(self._write, kind, limit), undo=partial(self._write, kind, old[kind]))
        self.limits = {**old, **limits}

    def _write(self, kind: EventKind, limit: Limit) -> None:
        self._limits_map.update(int(kind), limit.packed())

    def stats(self) -> list[KindStats]:
        out = []
        for kind in EventKind:
            total = self._stats_map.lookup_sum(int(kind))
            emitted, limited, sampled_out, lost = (
                (0, 0, 0, 0) if total is None else (total.emitted, total.limited, total.sampled_out, total.lost)
            )
            limit = self.limits.get(kind, Limit(rate=0))
            out.append(KindStats(kind.name, int(emitted), int(limited), int(sampled_out), int(lost), limit))
        return out

    def lost_since_start(self) -> int:
        """Events the ring buffer had no room for since `configure` (the orchestrator's start)."""
        return max(0, sum(s.lost for s in self.stats()) - self._lost_at_start)


def cpus() -> int:
    """CPUs the per-CPU buckets run on (a node-wide rate is this many times the per-CPU one)."""
    return os.cpu_count() or 1
