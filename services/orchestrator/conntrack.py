"""Conntrack garbage collection: the owner of the node's conntrack map collects it.

Objects (policy, LB) create and refresh entries from the datapath and treat an expired
entry as absent; the orchestrator deletes expired ones periodically, so the LRU map's
room goes to live connections rather than to whatever was least recently touched.

A pass reads the whole map with batch lookups and deletes the expired keys with batch
deletes, with no Python object per entry: each connection leaves one to four entries
(policy's per direction, the LB's service and reverse-NAT ones), and a per-entry walk
cost the node's busiest process more CPU per connection than the datapath did.
"""

from __future__ import annotations

import ctypes
import struct
import time

from pybpf import Map
from pybpf.batch import delete_packed, lookup_packed
from services.common.datapath import CtKey, CtValue

_EXPIRES = struct.Struct("=Q")
_EXPIRES_OFFSET = CtValue.expires.offset


class Conntrack:
    def __init__(self, conntrack: Map) -> None:
        if conntrack.key_size != ctypes.sizeof(CtKey) or conntrack.value_size != ctypes.sizeof(CtValue):
            raise ValueError(f"map {conntrack.name} does not hold CtKey -> CtValue")
        self._map = conntrack

    def collect(self, now: int | None = None) -> int:
        """Delete the entries whose time is up (CLOCK_MONOTONIC ns, now by default); returns how many."""
        if now is None:
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        keys, values, count = lookup_packed(self._map)
        ksize, vsize = self._map.key_size, self._map.value_size
        unpack = _EXPIRES.unpack_from
        expired = bytearray()
        for i in range(count):
            if unpack(values, i * vsize + _EXPIRES_OFFSET)[0] <= now:
                expired += keys[i * ksize : (i + 1) * ksize]
        # An entry deleted meanwhile (by its datapath or an LRU eviction) is skipped.
        return delete_packed(self._map, expired, missing_ok=True) if expired else 0
