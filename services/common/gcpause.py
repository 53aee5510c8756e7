"""The cyclic garbage collector held off for the length of one bulk change.

A bulk call (10k policy rules, 10k CIDR identities) allocates hundreds of thousands of
objects that all survive it. Each 700 allocations start a collection, and every few of
those rescan the whole heap, which at that size holds every rule: a third of a 10k-rule
import went to collections that found nothing to free. Paused, the collector instead
looks once at what the call left, at the first allocation after it; objects freed by
reference counting (nearly all garbage) are freed at once either way.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def gc_paused(fn: Callable[P, T]) -> Callable[P, T]:
    """Run `fn` with the cyclic collector off (left as it was if it is off already, as when
    another thread's bulk call holds it off: the first to start turns it back on)."""

    @functools.wraps(fn)
    def paused(*args: P.args, **kwargs: P.kwargs) -> T:
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return paused
