"""Finding a map whose pin was removed, through the programs that still use it.

A removed pin does not remove the map: the programs placed in the datapath keep using
it. A restarted service that found no pin would make a fresh, empty map that those
programs never read (a policy map that enforces nothing, a deny list that drops
nothing). So before loading, a service re-pins the live map: its pinned programs
name their maps by id (``bpf_prog_info.map_ids``), and a map's name (the first 15
bytes of the object's name) says which one it is. While running, `PinGuard` puts
back a pin removed under it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from pathlib import Path

import structlog

from pybpf import BpfError, Map, Program, _libbpf
from pybpf.errors import check

log = structlog.get_logger("weir.pins")

MAX_MAP_IDS = 64
BPF_OBJ_NAME_LEN = 15  # visible bytes of a kernel object name


def map_ids(program: Program) -> list[int]:
    """Ids of the maps a program uses (bpf_prog_info.map_ids)."""
    ids = (ctypes.c_uint32 * MAX_MAP_IDS)()
    info = _libbpf.bpf_prog_info()
    info.nr_map_ids = MAX_MAP_IDS
    info.map_ids = ctypes.addressof(ids)
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(_libbpf.bpf_obj_get_info_by_fd(program.fd, ctypes.byref(info), ctypes.byref(size)),
          f"map ids of program {program.name}")  # fmt: skip
    return list(ids[: min(info.nr_map_ids, MAX_MAP_IDS)])


def _program_pins(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.is_file() or not p.is_dir())
    except FileNotFoundError:
        return []


def recover_pins(map_dir: Path, names: Iterable[str], program_pins: Iterable[Path]) -> list[str]:
    """Re-pin under ``map_dir`` each named map whose pin is gone but which a pinned program uses.

    ``program_pins`` are candidate pins (anything that is not a program is skipped).
    Returns the names re-pinned; a name no program uses is left for the caller to create.
    """
    missing = [name for name in names if not (map_dir / name).exists()]
    if not missing:
        return []
    repinned = []
    for pin in program_pins:
        if not missing:
            break
        try:
            with Program.from_pin(pin) as program:
                ids = map_ids(program)
        except BpfError:
            continue
        for map_id in ids:
            try:
                found = Map.from_id(map_id)
            except BpfError:
                continue
            with found:
                name = next((n for n in missing if n[:BPF_OBJ_NAME_LEN] == found.name), None)
                if name is None:
                    continue
                map_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                found.pin(map_dir / name)
            missing.remove(name)
            repinned.append(name)
            log.warning("a map's pin was removed; re-pinned the live map its programs use",
                        map=name, id=map_id, pin=str(map_dir / name))  # fmt: skip
    return repinned


def recover_service_pins(pin_dir: Path, names: Iterable[str]) -> list[str]:
    """`recover_pins` for a service's own maps, found through the programs pinned beside them."""
    return recover_pins(pin_dir, names, _program_pins(pin_dir))


class PinGuard:
    """Remembers which map each pin of a directory held; puts back pins removed meanwhile."""

    def __init__(self, pin_dir: Path, names: Iterable[str]) -> None:
        self._pin_dir = pin_dir
        self._ids: dict[str, int] = {}
        for name in names:
            try:
                with Map.from_pin(pin_dir / name) as m:
                    self._ids[name] = m.id
            except (BpfError, OSError):
                continue

    def check(self) -> list[str]:
        """Re-pin each remembered map whose pin is gone (the map lives on in its programs)."""
        repinned = []
        for name, map_id in self._ids.items():
            path = self._pin_dir / name
            if path.exists():
                continue
            with Map.from_id(map_id) as found:
                self._pin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                found.pin(path)
            repinned.append(name)
            log.warning("a map's pin was removed while running; re-pinned it", map=name, id=map_id, pin=str(path))
        return repinned
