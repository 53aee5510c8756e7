"""Conntrack garbage collection: the owner of the node's conntrack map collects it.

Objects (policy, LB) create and refresh entries from the datapath and treat an expired
entry as absent; the orchestrator deletes expired ones periodically, so the LRU map's
room goes to live connections rather than to whatever was least recently touched.
"""

from __future__ import annotations

import contextlib
import time

from pybpf import KeyNotFoundError, Map
from services.common.datapath import CtKey, CtValue


class Conntrack:
    def __init__(self, conntrack: Map) -> None:
        self._map = conntrack.typed(CtKey, CtValue)

    def collect(self) -> int:
        """Delete the entries whose time is up; returns how many."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        expired = [key for key, value in self._map.items() if int(value.expires) <= now]
        for key in expired:
            with contextlib.suppress(KeyNotFoundError):
                self._map.delete(key)
        return len(expired)
