"""The datapath's packet counters per (reason, direction): where each one sits, and reading them.

Every object bumps one slot of the shared per-CPU array `reason_counters` when a packet
leaves the chain (FORWARDED, or the reason it was dropped). A slot never bumped reads as
zero, so readers skip zeros rather than missing keys.
"""

from __future__ import annotations

import ctypes

from pybpf import Map
from services.common.datapath import REASON_COUNTER_DIR_SHIFT, REASON_COUNTERS, Counter

MAP_NAME = "reason_counters"
_REASON_MASK = (1 << REASON_COUNTER_DIR_SHIFT) - 1


def reason_index(reason: int, direction: int) -> int:
    """The slot of (reason, direction) in reason_counters."""
    return reason | direction << REASON_COUNTER_DIR_SHIFT


def typed(counters: Map) -> Map:
    """The map with the datapath's layout: u32 slot -> one Counter per CPU."""
    return counters.typed(ctypes.c_uint32, Counter)


def read_reason_counters(counters: Map) -> dict[tuple[int, int], Counter]:
    """Every (reason, direction) with a packet counted, summed over CPUs (`counters` as `typed` gives it)."""
    out: dict[tuple[int, int], Counter] = {}
    for index in range(REASON_COUNTERS):
        total = counters.lookup_sum(index)
        if total is not None and total.packets:
            out[(index & _REASON_MASK, index >> REASON_COUNTER_DIR_SHIFT)] = total
    return out


def zero_reason_counters(counters: Map) -> None:
    """Set every slot back to zero on every CPU (an array's slots cannot be deleted)."""
    zero = Counter()
    for index in range(REASON_COUNTERS):
        counters.update(index, zero)
