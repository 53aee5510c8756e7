"""Objects: describe then load, pinned maps shared between objects, refused
pins and programs, ownership of maps and programs after close."""

from __future__ import annotations

import errno
from ctypes import c_uint32, c_uint64
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pybpf import BpfError, BpfObject, IncompatibleMapError, Map, MapType, ProgType, VerifierError

PACKET = bytes(Ether() / IP() / UDP() / (b"x" * 16))


def test_spec_before_load_and_resize(objects: dict[str, Path], pin_dir: Path) -> None:
    obj = BpfObject.open(objects["pybpf_maps"], pin_root=pin_dir)
    try:
        assert not obj.loaded and obj.name == "pybpf_maps"
        specs = obj.map_specs
        assert specs["lpm_v4"].type == MapType.LPM_TRIE and specs["lpm_v4"].key_size == 8
        assert specs["shared_counter"].pin_path == str(pin_dir / "shared_counter")
        assert specs["hash_map"].pin_path is None
        assert obj.program_specs["tc_verdict"].type == ProgType.SCHED_CLS
        assert obj.program_specs["xdp_verdict"].section == "xdp"
        with pytest.raises(ValueError, match="not loaded"):
            obj.maps  # noqa: B018
        obj.set_map_max_entries("hash_map", 128)
        with pytest.raises(KeyError):
            obj.set_map_max_entries("no_such_map", 1)
        assert obj.load() is obj
        assert obj.maps["hash_map"].max_entries == 128
        assert (pin_dir / "shared_counter").exists()
        with pytest.raises(ValueError, match="already loaded"):
            obj.set_map_max_entries("hash_map", 64)
        with pytest.raises(ValueError, match="already loaded"):
            obj.load()
    finally:
        obj.close()
    assert repr(obj) == "<BpfObject pybpf_maps closed>"


def test_pinned_map_is_shared_by_two_objects(objects: dict[str, Path], pin_dir: Path) -> None:
    with (
        BpfObject.load_file(objects["pybpf_maps"], pin_root=pin_dir) as a,
        BpfObject.load_file(objects["pybpf_reuse"], pin_root=pin_dir) as b,
    ):
        shared_a = a.maps["shared_counter"].typed(c_uint32, c_uint64)
        assert b.maps["shared_counter"].id == shared_a.id
        shared_a[0] = 41
        assert b.programs["bump_shared"].test_run(PACKET).retval == 42  # B's program sees A's write
        assert shared_a[0] == 42
    # Both objects are gone; the pin keeps the map and its value.
    with Map.from_pin(pin_dir / "shared_counter", key_type=c_uint32, value_type=c_uint64) as pinned:
        assert pinned[0] == 42
    with BpfObject.load_file(objects["pybpf_reuse"], pin_root=pin_dir) as again:
        assert again.programs["bump_shared"].test_run(PACKET).retval == 43


def test_incompatible_pin_is_refused(objects: dict[str, Path], pin_dir: Path) -> None:
    with BpfObject.load_file(objects["pybpf_maps"], pin_root=pin_dir):
        pass
    obj = BpfObject.open(objects["pybpf_incompat"], pin_root=pin_dir)
    with pytest.raises(IncompatibleMapError) as refused:
        obj.load()
    obj.close()
    message = str(refused.value)
    assert refused.value.field == "max_entries" and refused.value.errno == errno.EINVAL
    assert "map shared_counter" in message and str(pin_dir / "shared_counter") in message
    assert "has max_entries 1, the object declares 2" in message


def test_reuse_map_checks_compatibility(objects: dict[str, Path], pin_dir: Path) -> None:
    (pin_dir / "a").mkdir()
    (pin_dir / "b").mkdir()
    (pin_dir / "c").mkdir()
    with BpfObject.load_file(objects["pybpf_maps"], pin_root=pin_dir / "a") as a:
        shared = a.maps["shared_counter"].typed(c_uint32, c_uint64)
        with (
            BpfObject.open(objects["pybpf_incompat"], pin_root=pin_dir / "b") as wrong,
            pytest.raises(IncompatibleMapError, match="given map has max_entries 1"),
        ):
            wrong.reuse_map("shared_counter", shared)
        with BpfObject.open(objects["pybpf_reuse"], pin_root=pin_dir / "c") as b:
            b.reuse_map("shared_counter", shared)
            b.load()
            assert b.maps["shared_counter"].id == shared.id
            shared[0] = 9
            assert b.programs["bump_shared"].test_run(PACKET).retval == 10


def test_rejected_program_raises_verifier_error(objects: dict[str, Path]) -> None:
    with pytest.raises(VerifierError) as rejected:
        BpfObject.load_file(objects["pybpf_reject"])
    err = rejected.value
    assert err.errno == errno.EACCES
    assert "load program xdp_unchecked of object pybpf_reject" in str(err)
    assert "invalid access to packet" in err.log
    assert "processed" in err.log
    assert err.reason and err.reason in str(err).splitlines()[0]
    assert len(str(err).splitlines()) <= 21


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(BpfError) as missing:
        BpfObject.open(tmp_path / "missing.o")
    assert missing.value.errno == errno.ENOENT
    garbage = tmp_path / "garbage.o"
    garbage.write_bytes(b"not an ELF file")
    with pytest.raises(BpfError):
        BpfObject.open(garbage)


def test_borrowed_handles_follow_the_object(objects: dict[str, Path], pin_dir: Path) -> None:
    obj = BpfObject.load_file(objects["pybpf_maps"], pin_root=pin_dir)
    borrowed = obj.maps["array_map"].typed(c_uint32, c_uint32)
    borrowed.close()  # a no-op: the object owns the fd
    borrowed[0] = 1  # drop
    kept_map = obj.maps["array_map"].clone().typed(c_uint32, c_uint32)
    kept_prog = obj.programs["xdp_verdict"].clone()
    obj.close()
    obj.close()  # idempotent
    assert borrowed.closed and obj.maps["array_map"].closed
    assert kept_map[0] == 1
    assert kept_prog.test_run(PACKET).retval == 1  # XDP_DROP: the map outlived the object
    kept_map.close()
    kept_prog.close()
