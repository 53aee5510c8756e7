"""Maps of maps: inner maps made from the template, checked, and swapped atomically
under a program that reads through them (BPF_PROG_TEST_RUN)."""

from __future__ import annotations

import threading
import time
from ctypes import c_uint32, c_uint64
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

import pybpf
from pybpf import IncompatibleMapError, KeyNotFoundError, Map, MapOfMaps, MapType
from pybpf.batch import pack_u32

PACKET = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000, dport=2000))
NO_INNER, NO_VALUE, TORN = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD


def seen(obj: pybpf.BpfObject) -> dict[int, int]:
    """What the programs counted since the last call (and forget it)."""
    counts = obj.typed_map("seen", c_uint32, c_uint64)
    out = dict(counts.items())
    counts.clear()
    return out


def versions(obj: pybpf.BpfObject) -> MapOfMaps:
    return obj.map_of_maps("versions", c_uint32, c_uint32, c_uint32)


def version_items(version: int) -> dict[int, int]:
    return dict.fromkeys(range(4), version)


def test_spec_carries_the_inner_template(objects: dict[str, Path]) -> None:
    with pybpf.BpfObject.open(objects["pybpf_inner"]) as obj:
        before = obj.map_specs["versions"].inner
        assert before is not None
        assert (before.type, before.key_size, before.value_size, before.max_entries) == (MapType.ARRAY, 4, 4, 4)
        assert obj.map_specs["seen"].inner is None
        obj.load()
        assert obj.map_specs["versions"].inner == before  # libbpf dropped it at load; pybpf kept it
        tables = obj.map_specs["tables"].inner
        assert tables is not None and tables.type == MapType.HASH


def test_typed_handles_are_bound_once(inner_obj: pybpf.BpfObject) -> None:
    first = inner_obj.typed_map("seen", c_uint32, c_uint64)
    assert inner_obj.typed_map("seen", c_uint32, c_uint64) is first
    assert inner_obj.typed_map("seen", c_uint32, None) is not first  # other types, another view
    assert versions(inner_obj) is versions(inner_obj)
    with pytest.raises(KeyError, match="no map 'nope'"):
        inner_obj.typed_map("nope", c_uint32, c_uint32)
    with pytest.raises(IncompatibleMapError, match="value_size"):
        inner_obj.typed_map("seen", c_uint32, c_uint32)


def test_swap_is_seen_whole_before_and_after(inner_obj: pybpf.BpfObject) -> None:
    program, outer = inner_obj.programs["read_version"], versions(inner_obj)
    program.test_run(PACKET)
    assert seen(inner_obj) == {NO_INNER: 1}
    assert outer.replace(0, version_items(1)) is None  # nothing was there
    first_id = outer.inner_id(0)
    program.test_run(PACKET, repeat=3)
    assert seen(inner_obj) == {1: 3}

    with outer.new_inner(version_items(2)) as fresh:
        program.test_run(PACKET)  # built aside: the program still reads the old one
        assert seen(inner_obj) == {1: 1}
        assert outer.swap(0, fresh) == first_id
        assert outer.inner_id(0) == fresh.id
    program.test_run(PACKET, repeat=2)
    assert seen(inner_obj) == {2: 2}

    current = outer.get(0)
    assert current is not None
    with current:
        assert dict(current.items()) == version_items(2)
    assert outer.delete(0) == fresh.id
    assert outer.get(0) is None and 0 not in outer
    with pytest.raises(KeyNotFoundError, match="versions: no inner map at 0"):
        outer.delete(0)


def test_swaps_under_a_running_program_never_show_an_empty_or_torn_map(inner_obj: pybpf.BpfObject) -> None:
    """A delete-then-insert "swap" fails this test: the runs then meet NO_INNER."""
    program, outer = inner_obj.programs["read_version"], versions(inner_obj)
    outer.replace(0, version_items(0))
    stop, swaps = threading.Event(), [0]

    def swap_forever() -> None:
        while not stop.is_set():
            swaps[0] += 1
            outer.replace(0, version_items(swaps[0] % 50 + 1))

    swapper = threading.Thread(target=swap_forever)
    swapper.start()
    runs, repeat, deadline = 0, 20000, time.monotonic() + 30
    try:
        while (runs < 40 or swaps[0] < 20) and time.monotonic() < deadline:
            program.test_run(PACKET, repeat=repeat)  # the GIL is released while the kernel runs it
            runs += 1
    finally:
        stop.set()
        swapper.join()
    counts = seen(inner_obj)
    assert sum(counts.values()) == runs * repeat
    assert not counts.keys() & {NO_INNER, NO_VALUE, TORN}, counts
    assert len(counts) > 1 and swaps[0] >= 20, "the swaps never overlapped the runs: the test proved nothing"


def test_hash_of_maps_swaps_and_inner_sizes_may_differ(inner_obj: pybpf.BpfObject) -> None:
    program = inner_obj.programs["read_table"]
    tables = inner_obj.map_of_maps("tables", c_uint32, c_uint32, c_uint32)
    assert tables.replace(7, {1: 10}, max_entries=100) is None  # a hash inner: size is free
    program.test_run(PACKET)
    old = tables.inner_id(7)
    with tables.new_inner({1: 20}, max_entries=2) as small, tables.new_inner({1: 30}) as other:
        tables.swap_many([(7, small), (3, other)])
        assert (tables.inner_id(7), tables.inner_id(3)) == (small.id, other.id) and old != small.id
    program.test_run(PACKET)
    assert seen(inner_obj) == {10: 1, 20: 1}
    assert sorted(tables) == [3, 7]


def test_inner_map_that_does_not_fit_the_template_is_refused(inner_obj: pybpf.BpfObject) -> None:
    outer = versions(inner_obj)
    outer.replace(0, version_items(5))
    with Map.create(MapType.ARRAY, 4, 8, 4, name="wide") as wide:
        with pytest.raises(IncompatibleMapError, match="map wide as inner map of versions: it has value_size 8") as err:
            outer.swap(0, wide)
        assert err.value.field == "value_size"
    with Map.create(MapType.HASH, 4, 4, 4, name="hashy") as hashy, pytest.raises(IncompatibleMapError) as kind:
        outer.swap(0, hashy)
    assert kind.value.field == "type" and "type HASH, the template ARRAY" in str(kind.value)
    with pytest.raises(IncompatibleMapError, match="max_entries"):
        outer.create_inner(max_entries=8)  # an array without BPF_F_INNER_MAP keeps its size
    with pytest.raises(IncompatibleMapError, match="value_size"):
        inner_obj.map_of_maps("versions", c_uint32, c_uint32, c_uint64)
    with pytest.raises(IncompatibleMapError, match="seen is HASH, not a map of maps"):
        inner_obj.map_of_maps("seen")
    inner_obj.programs["read_version"].test_run(PACKET)
    assert seen(inner_obj) == {5: 1}  # the refused swaps left the live map alone


def test_template_from_an_installed_map_or_from_the_kernel(inner_obj: pybpf.BpfObject, pin_dir: Path) -> None:
    inner_obj.maps["versions"].pin(pin_dir / "versions")
    with Map.from_pin(pin_dir / "versions") as pinned:
        blind = MapOfMaps(pinned, inner_key_type=c_uint32, inner_value_type=c_uint32)
        assert blind.template is None
        with pytest.raises(ValueError, match="inner template of map versions is unknown"):
            blind.create_inner()
        with (
            Map.create(MapType.ARRAY, 4, 8, 4, name="wide") as wide,
            pytest.raises(IncompatibleMapError, match="kernel refused it as an inner map"),
        ):
            blind.swap(0, wide)  # no template to check against: the kernel's EINVAL, explained
        versions(inner_obj).replace(1, version_items(9))
        learned = MapOfMaps(pinned, inner_key_type=c_uint32, inner_value_type=c_uint32)
        assert learned.template is not None and learned.template.value_size == 4
        learned.replace(0, version_items(4))
    inner_obj.programs["read_version"].test_run(PACKET)
    assert seen(inner_obj) == {4: 1}


def test_replace_many_packed_makes_each_inner_array_its_own_size(inner_obj: pybpf.BpfObject) -> None:
    slots = inner_obj.map_of_maps("slots", c_uint32, c_uint32, c_uint32)
    slots.replace_many_packed([(1, pack_u32([5, 6, 7])), (2, pack_u32([9]))], name=lambda key: f"slots_{key}")
    first = slots.inner_id(1)
    for key, want in ((1, {0: 5, 1: 6, 2: 7}), (2, {0: 9})):
        inner = slots.get(key)
        assert inner is not None
        with inner:
            assert dict(inner.items()) == want
            assert inner.info.max_entries == len(want) and inner.info.name == f"slots_{key}"
    slots.replace_many_packed([(1, pack_u32([8, 8]))])
    assert slots.inner_id(1) != first
    with pytest.raises(ValueError, match="4-byte values"):
        slots.replace_many_packed([(3, b"\0" * 6)])
    assert slots.inner_id(3) is None
    with pytest.raises(IncompatibleMapError, match="BPF_F_INNER_MAP"):
        versions(inner_obj).replace_many_packed([(0, pack_u32([1, 1, 1, 1]))])
