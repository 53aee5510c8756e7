"""Packed batch writes (pybpf.batch): round trips on maps with and without kernel batch ops, per-CPU ones included."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from ctypes import c_uint32, c_uint64

import pytest

from pybpf import KeyNotFoundError, LpmKeyV4, Map, MapFullError, MapType
from pybpf.batch import delete_packed, lookup_packed, pack_u32, update_packed, value_stride


@pytest.fixture
def hash_map() -> Iterator[Map]:
    with Map.create(MapType.HASH, 4, 4, 64, key_type=c_uint32, value_type=c_uint32) as m:
        yield m


def test_pack_u32_lays_out_native_u32s() -> None:
    assert pack_u32([1, 0xFFFFFFFF]) == bytes(c_uint32(1)) + bytes(c_uint32(0xFFFFFFFF))
    assert pack_u32(range(0)) == b""


def test_update_and_delete_in_chunks(hash_map: Map) -> None:
    keys = list(range(50))
    assert update_packed(hash_map, pack_u32(keys), pack_u32(k * 3 for k in keys), 50, chunk=7) == 50
    assert dict(hash_map.items()) == {k: k * 3 for k in keys}
    assert delete_packed(hash_map, pack_u32(keys[:20]), 20, chunk=6) == 20
    assert sorted(hash_map.keys()) == keys[20:]


def test_delete_of_an_absent_key_raises_unless_missing_ok(hash_map: Map) -> None:
    update_packed(hash_map, pack_u32([1, 2, 3]), pack_u32([1, 2, 3]), 3)
    with pytest.raises(KeyNotFoundError):
        delete_packed(hash_map, pack_u32([1, 9]), 2)
    assert sorted(hash_map.keys()) == [2, 3]  # the key before the absent one is gone
    assert delete_packed(hash_map, pack_u32([2, 9, 3]), 3, missing_ok=True) == 2
    assert list(hash_map.keys()) == []


def test_a_full_map_raises_and_keeps_what_fit() -> None:
    with Map.create(MapType.HASH, 4, 4, 4, key_type=c_uint32, value_type=c_uint32) as m:
        with pytest.raises(MapFullError):
            update_packed(m, pack_u32(range(6)), pack_u32(range(6)), 6)
        assert len(list(m.keys())) == 4


def test_layout_mistakes_are_refused_before_any_write(hash_map: Map) -> None:
    with pytest.raises(ValueError, match="key bytes"):
        update_packed(hash_map, b"\0" * 7, b"\0" * 8, 2)
    with pytest.raises(ValueError, match="value bytes"):
        update_packed(hash_map, b"\0" * 8, b"\0" * 4, 2)
    with pytest.raises(ValueError, match="not a whole number of 4-byte keys"):
        update_packed(hash_map, b"\0" * 6, b"\0" * 4)
    with Map.create(MapType.PERCPU_HASH, 4, 8, 4) as percpu, pytest.raises(ValueError, match="value bytes"):
        update_packed(percpu, b"\0" * 4, b"\0" * 8, 1)  # one CPU's value, where every possible CPU's is due
    assert list(hash_map.keys()) == []


def test_per_cpu_maps_take_packed_deletes() -> None:
    with Map.create(MapType.PERCPU_HASH, 4, 8, 8, key_type=c_uint32) as m:
        m.update_batch([1, 2, 3], [b"\0" * 8] * 3)
        assert delete_packed(m, pack_u32([1, 7, 3]), 3, missing_ok=True) == 2
        assert list(m.keys()) == [2]


def test_structures_and_lpm_tries() -> None:
    with Map.create(MapType.LPM_TRIE, 8, 4, 16, flags=1, key_type=LpmKeyV4, value_type=c_uint32) as m:
        keys = [LpmKeyV4.of("10.0.0.0/8"), LpmKeyV4.of("10.1.0.0/16")]
        update_packed(m, b"".join(bytes(k) for k in keys), pack_u32([8, 16]), 2)
        assert m.lookup(LpmKeyV4.of("10.1.2.3")) == 16
        assert m.lookup(LpmKeyV4.of("10.9.0.1")) == 8


def test_a_map_type_without_batch_ops_is_written_element_by_element() -> None:
    """DEVMAP_HASH has no batch operations (ENOTSUPP): the same bytes go in one by one."""
    with Map.create(MapType.DEVMAP_HASH, 4, 4, 8, key_type=c_uint32, value_type=c_uint32) as m:
        assert update_packed(m, pack_u32([10, 20, 30]), pack_u32([1, 1, 1]), 3, chunk=2) == 3  # 1: lo
        assert sorted(m.keys()) == [10, 20, 30]
        assert delete_packed(m, pack_u32([10, 99, 30]), 3, missing_ok=True) == 2
        assert list(m.keys()) == [20]
        with pytest.raises(KeyNotFoundError):
            delete_packed(m, pack_u32([99]), 1)


def test_packed_values_of_a_per_cpu_map_cover_every_cpu() -> None:
    with Map.create(MapType.PERCPU_ARRAY, 4, 8, 4, key_type=c_uint32, value_type=c_uint64) as m:
        stride = value_stride(m)
        ncpus = stride // 8
        assert ncpus == len(m.lookup_percpu(0) or [])
        values = struct.pack(f"={2 * ncpus}Q", *([5] * ncpus + [6] * ncpus))
        assert update_packed(m, pack_u32([1, 3]), values) == 2  # the count follows from the keys
        assert m.lookup_sum(1) == 5 * ncpus and m.lookup_sum(3) == 6 * ncpus and m.lookup_sum(0) == 0


def test_memoryviews_are_taken_as_they_are() -> None:
    with Map.create(MapType.HASH, 4, 8, 16, key_type=c_uint32, value_type=c_uint64) as m:
        keys = memoryview(struct.pack("=10I", *range(10)))
        values = memoryview(struct.pack("=10Q", *(i * 100 for i in range(10))))
        assert update_packed(m, keys, values, chunk=3) == 10
        assert {k: m[k] for k in m} == {i: i * 100 for i in range(10)}


def _unpacked(keys: bytes, values: bytes, count: int) -> dict[int, int]:
    return dict(zip(struct.unpack(f"{count}I", keys), struct.unpack(f"{count}I", values), strict=True))


@pytest.mark.parametrize("kind", [MapType.HASH, MapType.LRU_HASH])
def test_lookup_packed_reads_every_element_once_across_chunks(kind: MapType) -> None:
    with Map.create(kind, 4, 4, 256, key_type=c_uint32, value_type=c_uint32) as m:
        keys = list(range(1000, 1100))
        update_packed(m, pack_u32(keys), pack_u32(k + 7 for k in keys), 100)
        got = lookup_packed(m, chunk=9)
        assert got[2] == 100
        assert _unpacked(*got) == {k: k + 7 for k in keys}


def test_lookup_packed_of_an_empty_map_and_of_a_type_without_batch_lookup(hash_map: Map) -> None:
    assert lookup_packed(hash_map) == (b"", b"", 0)
    with Map.create(MapType.LPM_TRIE, 8, 4, 16, flags=1, key_type=LpmKeyV4, value_type=c_uint32) as m:
        m.update(LpmKeyV4.of("10.1.0.0/16"), 5)
        keys, values, count = lookup_packed(m)
        assert count == 1
        assert keys == bytes(LpmKeyV4.of("10.1.0.0/16"))
        assert struct.unpack("I", values) == (5,)


def test_lookup_packed_gives_every_cpu_value_of_a_per_cpu_map() -> None:
    with Map.create(MapType.PERCPU_HASH, 4, 8, 8, key_type=c_uint32) as m:
        stride = value_stride(m)
        update_packed(m, pack_u32([3]), struct.pack("Q", 11) * (stride // 8), 1)
        keys, values, count = lookup_packed(m)
        assert (keys, count) == (pack_u32([3]), 1)
        assert set(struct.unpack(f"{stride // 8}Q", values)) == {11}
