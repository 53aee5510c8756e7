"""Loading a service's BPF object the same way in every service.

An object is opened with the node's globals directory as pin root (so the
shared maps it declares with LIBBPF_PIN_BY_NAME are reused), the service's own
maps are reused from its pin directory when a previous run left them (so a
restart keeps their contents and the datapath never sees empty maps), and
after loading the own maps and the programs are pinned there. An own map whose pin was
removed is first found again through the programs pinned beside it (`services.common.pins`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from pybpf import BpfObject, Map, Program
from services.common.pins import recover_service_pins


def load_service_object(
    path: Path,
    globals_dir: Path,
    pin_dir: Path,
    own_maps: Iterable[str],
    max_entries: Mapping[str, int] | None = None,
) -> BpfObject:
    globals_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    pin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = list(own_maps)
    recover_service_pins(pin_dir, names)  # a removed pin: reuse the map the placed programs use
    obj = BpfObject.open(path, pin_root=globals_dir)
    for name, size in (max_entries or {}).items():
        obj.set_map_max_entries(name, size)
    for name in names:
        if (pin_dir / name).exists():
            obj.reuse_map(name, Map.from_pin(pin_dir / name))
    obj.load()
    for name in names:
        if not (pin_dir / name).exists():
            obj.maps[name].pin(pin_dir / name)
    return obj


def pin_programs(obj: BpfObject, names: Iterable[str], pin_dir: Path) -> dict[str, Program]:
    """Pin (replacing an older pin of the same name) and return the named programs."""
    out = {}
    for name in names:
        program = obj.programs[name]
        (pin_dir / name).unlink(missing_ok=True)
        program.pin(pin_dir / name)
        out[name] = program
    return out
