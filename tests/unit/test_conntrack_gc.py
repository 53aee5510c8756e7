"""Conntrack GC (services/orchestrator/conntrack.py) on a real LRU map: only expired entries go."""

from __future__ import annotations

import ctypes

import pytest

from pybpf import Map, MapType
from services.common.datapath import CtKey, CtValue
from services.orchestrator.conntrack import Conntrack


def _key(n: int) -> CtKey:
    key = CtKey()
    key.saddr[:4] = [10, 0, n >> 8, n & 0xFF]
    key.daddr[:4] = [10, 1, 0, 1]
    key.sport, key.dport, key.proto, key.family = n, 80, 6, 2
    return key


def test_collect_deletes_exactly_the_expired_entries() -> None:
    with Map.create(MapType.LRU_HASH, ctypes.sizeof(CtKey), ctypes.sizeof(CtValue), 4096) as raw:
        m = raw.typed(CtKey, CtValue)
        for n in range(3000):
            value = CtValue()
            value.expires = 1_000 + n  # entries 0..999 are due at now=2000 (expires <= now)
            value.backend_id = n
            m.update(_key(n), value)
        assert Conntrack(raw).collect(now=1_999) == 1000
        left = {bytes(k): v.backend_id for k, v in m.items()}
        assert len(left) == 2000
        assert left == {bytes(_key(n)): n for n in range(1000, 3000)}
        assert Conntrack(raw).collect(now=0) == 0
        assert Conntrack(raw).collect(now=10**18) == 2000
        assert list(m.keys()) == []


def test_a_map_of_another_layout_is_refused() -> None:
    with Map.create(MapType.HASH, 4, 4, 8) as other, pytest.raises(ValueError, match="CtKey"):
        Conntrack(other)
