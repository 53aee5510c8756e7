"""Packed batch writes (pybpf.bulk): the batch syscall where the map has one, element by element where not."""

from __future__ import annotations

import struct
from ctypes import c_uint32, c_uint64

import pytest

import pybpf
from pybpf import bulk

BPF_F_NO_PREALLOC = 1


def test_packed_update_and_delete_on_a_hash_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk, "CHUNK", 3)  # several syscalls for 10 elements
    with pybpf.Map.create(pybpf.MapType.HASH, 4, 8, 16, key_type=c_uint32, value_type=c_uint64) as m:
        keys = struct.pack("=10I", *range(10))
        values = struct.pack("=10Q", *(i * 100 for i in range(10)))
        assert bulk.update_packed(m, keys, values) == 10
        assert {k: m[k] for k in m} == {i: i * 100 for i in range(10)}
        assert bulk.delete_packed(m, keys[: 4 * 4]) == 4
        assert sorted(m) == list(range(4, 10))
        with pytest.raises(pybpf.KeyNotFoundError):
            bulk.delete_packed(m, struct.pack("=2I", 5, 0))  # 5 goes, 0 is not there
        assert 5 not in m


def test_packed_update_falls_back_where_the_map_has_no_batch() -> None:
    with pybpf.Map.create(pybpf.MapType.LPM_TRIE, 8, 4, 16, flags=BPF_F_NO_PREALLOC) as m:
        keys = struct.pack("=I4B", 24, 10, 1, 2, 0) + struct.pack("=I4B", 16, 10, 9, 0, 0)
        assert bulk.update_packed(m, keys, struct.pack("=2I", 7, 8)) == 2
        assert m[struct.pack("=I4B", 32, 10, 1, 2, 77)] == struct.pack("=I", 7)  # longest match
        assert m[struct.pack("=I4B", 32, 10, 9, 1, 1)] == struct.pack("=I", 8)


def test_packed_values_of_a_per_cpu_map_cover_every_cpu() -> None:
    with pybpf.Map.create(pybpf.MapType.PERCPU_ARRAY, 4, 8, 4, key_type=c_uint32, value_type=c_uint64) as m:
        stride = bulk.value_stride(m)
        assert stride == 8 * len(m.lookup_percpu(0) or [])
        ncpus = stride // 8
        bulk.update_packed(m, struct.pack("=2I", 1, 3), struct.pack(f"={2 * ncpus}Q", *([5] * ncpus + [6] * ncpus)))
        assert m.lookup_sum(1) == 5 * ncpus and m.lookup_sum(3) == 6 * ncpus and m.lookup_sum(0) == 0


def test_buffers_of_the_wrong_size_are_refused_before_any_write() -> None:
    with pybpf.Map.create(pybpf.MapType.HASH, 4, 8, 16) as m:
        with pytest.raises(ValueError, match="not a whole number of 4-byte keys"):
            bulk.update_packed(m, bytes(6), bytes(8))
        with pytest.raises(ValueError, match="16 value bytes for 1 keys"):
            bulk.update_packed(m, bytes(4), bytes(16))
        assert list(m) == []
