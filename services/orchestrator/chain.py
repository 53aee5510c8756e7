"""The chain: a node's entry programs, call maps and shared maps.

`Chain` loads `bpf/build/entry.o` with the node's globals directory as pin
root, so the call maps, metrics, endpoints and events maps are created once,
pinned by name, and reused by every object any service loads afterwards. The
entry programs are pinned under the orchestrator's own directory so that other
tools can find them; attachments hold their own references, so the datapath
keeps running when the orchestrator process is gone.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from pybpf import BpfObject, Map, ProgArray, Program, ProgType
from services.common.datapath import (
    NUM_SLOTS,
    Counter,
    Direction,
    EndpointInfo,
    Hook,
    MetricKey,
    Reason,
    Slot,
)
from services.common.errors import InvalidArgument, NotFound
from services.common.objects import load_service_object, pin_programs

ENTRY_PROGRAMS = {
    Hook.FROM_CONTAINER: "entry_from_container",
    Hook.TO_CONTAINER: "entry_to_container",
    Hook.FROM_NETWORK: "entry_from_network",
    Hook.TO_NETWORK: "entry_to_network",
    Hook.XDP: "entry_xdp",
}
CALL_MAPS = {
    Hook.FROM_CONTAINER: "calls_from_container",
    Hook.TO_CONTAINER: "calls_to_container",
    Hook.FROM_NETWORK: "calls_from_network",
    Hook.TO_NETWORK: "calls_to_network",
    Hook.XDP: "calls_xdp",
}


def hook_program_type(hook: Hook) -> ProgType:
    """The program type every program in a hook's call map must have."""
    return ProgType.XDP if hook is Hook.XDP else ProgType.SCHED_CLS


@dataclass(frozen=True)
class SlotState:
    hook: Hook
    slot: Slot
    program_id: int
    program_name: str


@dataclass(frozen=True)
class ReasonCount:
    reason: Reason | int
    direction: Direction
    packets: int
    bytes: int


class Chain:
    """Owns the entry programs and the call maps of one node."""

    def __init__(self, bpf_dir: Path, globals_dir: Path, pin_dir: Path) -> None:
        self._obj_path = bpf_dir / "entry.o"
        self._globals_dir = globals_dir
        self._pin_dir = pin_dir
        self._obj: BpfObject | None = None
        self.programs: dict[Hook, Program] = {}
        self.calls: dict[Hook, ProgArray] = {}
        self.endpoints: Map
        self.metrics: Map
        self.entry_stats: Map
        self.events: Map

    def load(self) -> None:
        """Load (or reload, on restart) the entry programs; shared maps are reused."""
        obj = load_service_object(self._obj_path, self._globals_dir, self._pin_dir, [])
        self._obj = obj
        pinned = pin_programs(obj, ENTRY_PROGRAMS.values(), self._pin_dir)
        self.programs = {hook: pinned[name] for hook, name in ENTRY_PROGRAMS.items()}
        for hook, name in CALL_MAPS.items():
            self.calls[hook] = ProgArray(obj.maps[name])
        self.endpoints = obj.maps["endpoints"].typed(ctypes.c_uint32, EndpointInfo)
        self.metrics = obj.maps["metrics"].typed(MetricKey, Counter)
        self.entry_stats = obj.maps["entry_stats"].typed(ctypes.c_uint32, Counter)
        self.events = obj.maps["events"]

    def close(self) -> None:
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    # ---- slots ----

    def set_slot(self, hook: Hook, slot: int, program: Program) -> SlotState:
        """Place program into hook's call map at slot: one atomic map update."""
        checked = self._check_slot(slot)
        wanted = hook_program_type(hook)
        if program.type != wanted:
            raise InvalidArgument(
                f"program {program.name!r} (id {program.id}) has type {program.type.name}; "
                f"hook {hook.name} takes {wanted.name} programs"
            )
        self.calls[hook].set(checked, program)
        return SlotState(hook, checked, program.id, program.name)

    def clear_slot(self, hook: Hook, slot: int) -> SlotState:
        checked = self._check_slot(slot)
        self.calls[hook].clear(checked)
        return SlotState(hook, checked, 0, "")

    def slot(self, hook: Hook, slot: int) -> SlotState:
        checked = self._check_slot(slot)
        program_id = self.calls[hook].get_id(checked)
        if not program_id:
            return SlotState(hook, checked, 0, "")
        try:
            with Program.from_id(program_id) as program:
                name = program.name
        except OSError:
            name = ""
        return SlotState(hook, checked, program_id, name)

    def slots(self, hook: Hook) -> list[SlotState]:
        return [self.slot(hook, s) for s in Slot]

    @staticmethod
    def _check_slot(slot: int) -> Slot:
        if not 0 <= slot < NUM_SLOTS:
            raise InvalidArgument(f"slot {slot} is out of range: slots are 0..{NUM_SLOTS - 1}")
        return Slot(slot)

    @staticmethod
    def open_program(pin_path: str = "", program_id: int = 0) -> Program:
        """Find a program by pin path or id; NotFound with the path or id otherwise."""
        if pin_path:
            if not os.path.isabs(pin_path):
                raise InvalidArgument(f"pin path {pin_path!r} must be absolute")
            try:
                return Program.from_pin(pin_path)
            except FileNotFoundError as exc:
                raise NotFound(f"no program is pinned at {pin_path}") from exc
            except OSError as exc:
                if exc.errno == 2:
                    raise NotFound(f"no program is pinned at {pin_path}") from exc
                raise InvalidArgument(f"{pin_path} is not a pinned program: {exc.strerror}") from exc
        if program_id:
            try:
                return Program.from_id(program_id)
            except OSError as exc:
                raise NotFound(f"no loaded program has id {program_id}") from exc
        raise InvalidArgument("give a program as pin_path or program_id")

    # ---- counters ----

    def entry_counts(self) -> dict[Hook, tuple[int, int]]:
        """Packets and bytes each hook's entry program has seen, summed over CPUs."""
        out = {}
        for hook in Hook:
            total = self.entry_stats.lookup_sum(hook.value)
            out[hook] = (int(total.packets), int(total.bytes)) if total else (0, 0)
        return out

    def reason_counts(self) -> list[ReasonCount]:
        out = []
        for key in self.metrics:
            total = self.metrics.lookup_sum(key)
            if total is None:
                continue
            reason: Reason | int = Reason(key.reason) if key.reason in Reason._value2member_map_ else key.reason
            out.append(ReasonCount(reason, Direction(key.dir), int(total.packets), int(total.bytes)))
        return sorted(out, key=lambda r: (int(r.reason), r.direction))
