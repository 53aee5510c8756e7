"""The chain: a node's entry programs, call maps, registrations and shared maps.

`Chain` loads `bpf/build/entry.o` with the node's globals directory as pin
root, so the call maps, chain words, metrics, endpoints and events maps are
created once, pinned by name, and reused by every object any service loads
afterwards. The entry programs are pinned under the orchestrator's own
directory; attachments hold their own references, so the datapath keeps
running when the orchestrator process is gone.

Only this class writes call maps. Services register their pinned programs
(hook, slot, pin path); the registration is kept in the store and the program
is placed by a chain swap (`Generations.install`): the idle generation of the
hook's call map is cleared and filled from every registration of that hook,
then the hook's chain word flips to it in one map write. Packets already in
the chain finish in the generation they started in. On start the chain is
rebuilt from the store, and a call-map pin that someone removed is put back.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from pybpf import BpfError, BpfObject, Map, ProgArray, Program, ProgType
from services.common import reasons
from services.common.chain_client import Placement, Register
from services.common.change import Change
from services.common.datapath import (
    CHAIN_GENERATION_BIT,
    CHAIN_GENERATIONS,
    NUM_SLOTS,
    Counter,
    Direction,
    EndpointInfo,
    Hook,
    Reason,
    Slot,
)
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.objects import load_service_object, pin_programs
from services.common.pins import map_ids, recover_pins
from services.common.store import Store
from services.orchestrator.limits import MAX_PATH, MAX_PROGRAMS, summary

log = structlog.get_logger("weir.chain")

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
STATE_MAP = "chain_state"
CHAIN_MAPS = [*CALL_MAPS.values(), STATE_MAP]
KIND = "slot"
OPERATOR = "operator"  # registrations made with SetSlot by a person or tool
SERVICE_RE = re.compile(r"[a-z0-9][-a-z0-9_.]{0,62}")
# Time for packets that read the old chain word before a flip to leave the
# chain before its generation is rewritten; a chain runs in microseconds.
GRACE_SECONDS = 0.02


def hook_program_type(hook: Hook) -> ProgType:
    """The program type every program in a hook's call map must have."""
    return ProgType.XDP if hook is Hook.XDP else ProgType.SCHED_CLS


def check_slot(slot: int) -> Slot:
    if not 0 <= slot < NUM_SLOTS:
        raise InvalidArgument(f"slot {slot} is out of range: slots are 0..{NUM_SLOTS - 1}")
    return Slot(slot)


@dataclass(frozen=True)
class SlotState:
    hook: Hook
    slot: Slot
    program_id: int
    program_name: str
    service: str = ""
    generation: int = 0


@dataclass(frozen=True)
class ReasonCount:
    reason: Reason | int
    direction: Direction
    packets: int
    bytes: int


@dataclass(frozen=True)
class Registration:
    """A program a service (or the operator) wants in one slot of one hook."""

    hook: Hook
    slot: Slot
    service: str
    pin_path: str = ""
    program_id: int = 0

    @property
    def key(self) -> str:
        return f"{self.hook.name}/{self.slot.name}"

    def doc(self) -> dict[str, object]:
        return {"service": self.service, "pin_path": self.pin_path, "program_id": self.program_id}

    @classmethod
    def from_doc(cls, key: str, doc: dict[str, object]) -> Registration:
        hook, slot = key.split("/")
        return cls(Hook[hook], Slot[slot], str(doc["service"]), str(doc["pin_path"]), int(str(doc["program_id"])))


class Generations:
    """The call maps and chain words of one node: fill the idle generation, then flip.

    Generation g of a hook holds slot s at index g * NUM_SLOTS + s of the hook's
    call map; the hook's word in chain_state names the live generation and the
    slots filled in it (the entry copies it into each packet).
    """

    def __init__(self, calls: dict[Hook, ProgArray], state: Map) -> None:
        self.calls = calls
        self._state = state.typed(ctypes.c_uint32, ctypes.c_uint32)
        self._flipped: dict[Hook, float] = {}

    def word(self, hook: Hook) -> int:
        return int(self._state[hook.value])

    def active(self, hook: Hook) -> int:
        return 1 if self.word(hook) & CHAIN_GENERATION_BIT else 0

    def program_id(self, hook: Hook, slot: Slot, generation: int | None = None) -> int:
        """The program in a slot of a generation (the live one by default); 0 when empty."""
        gen = self.active(hook) if generation is None else generation
        return self.calls[hook].get_id(gen * NUM_SLOTS + slot) or 0

    def install(self, hook: Hook, programs: dict[Slot, Program]) -> int:
        """Make `programs` the hook's whole chain in one flip; returns the new live generation.

        The idle generation is cleared and filled first; packets in flight keep
        the generation their entry program gave them.
        """
        wait = self._flipped.get(hook, 0.0) + GRACE_SECONDS - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        idle = (self.active(hook) + 1) % CHAIN_GENERATIONS
        calls = self.calls[hook]
        mask = 0
        for slot in Slot:
            index = idle * NUM_SLOTS + slot
            program = programs.get(slot)
            if program is None:
                calls.clear(index)
            else:
                calls.set(index, program)
                mask |= 1 << slot
        self._state[hook.value] = mask | (CHAIN_GENERATION_BIT if idle else 0)
        self._flipped[hook] = time.monotonic()
        return idle


class Chain:
    """Owns the entry programs, the call maps and the slot registrations of one node."""

    def __init__(self, bpf_dir: Path, globals_dir: Path, pin_dir: Path, store: Store | None = None) -> None:
        self._obj_path = bpf_dir / "entry.o"
        self._globals_dir = globals_dir
        self._pin_dir = pin_dir
        self._store = store
        self._obj: BpfObject | None = None
        self.programs: dict[Hook, Program] = {}
        self.generations: Generations
        self.endpoints: Map
        self.metrics: Map
        self.entry_stats: Map
        self.events: Map
        self.event_limits: Map
        self.event_stats: Map

    def load(self) -> None:
        """Load (or reload, on restart) the entry programs; shared maps are reused.

        A chain map whose pin was removed is found again through the entry
        programs of the previous run (their pins) and re-pinned, so every
        object loaded against it keeps working.
        """
        self._recover_pins()
        obj = load_service_object(self._obj_path, self._globals_dir, self._pin_dir, [])
        self._obj = obj
        pinned = pin_programs(obj, ENTRY_PROGRAMS.values(), self._pin_dir)
        self.programs = {hook: pinned[name] for hook, name in ENTRY_PROGRAMS.items()}
        calls = {hook: ProgArray(obj.maps[name]) for hook, name in CALL_MAPS.items()}
        self.generations = Generations(calls, obj.maps[STATE_MAP])
        self.endpoints = obj.maps["endpoints"].typed(ctypes.c_uint32, EndpointInfo)
        self.metrics = reasons.typed(obj.maps[reasons.MAP_NAME])
        self.entry_stats = obj.maps["entry_stats"].typed(ctypes.c_uint32, Counter)
        self.events = obj.maps["events"]
        self.event_limits = obj.maps["event_limits"]
        self.event_stats = obj.maps["event_stats"]

    def start(self) -> None:
        """Load, then rebuild every hook's chain from the registrations in the store."""
        self.load()
        for hook in Hook:
            self._install(hook)

    def close(self) -> None:
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    # ---- pins ----

    def _recover_pins(self) -> None:
        if not self._pin_dir.exists():
            return
        missing = [name for name in CHAIN_MAPS if not (self._globals_dir / name).exists()]
        found = recover_pins(self._globals_dir, missing, sorted(self._pin_dir.glob("entry_*")))
        for name in missing:
            if name not in found:
                log.warning(
                    "chain map pin was removed and no live map was found; a fresh one is made "
                    "(objects loaded against the old one must be reloaded)",
                    map=name,
                )

    def ensure_pins(self) -> list[str]:
        """Re-pin any chain map whose pin was removed (the maps themselves live on)."""
        assert self._obj is not None, "load() first"
        repinned = []
        for name in CHAIN_MAPS:
            if not (self._globals_dir / name).exists():
                self._obj.maps[name].pin(self._globals_dir / name)
                repinned.append(name)
                log.warning("chain map pin was removed; re-pinned", map=name)
        if repinned:
            for hook in Hook:
                self._install(hook)
        return repinned

    def _stale_call_maps(self, program: Program) -> list[str]:
        """Call maps the program tail-calls through that are not this node's (a re-made map)."""
        ours = {calls.map.id for calls in self.generations.calls.values()}
        stale = []
        for map_id in map_ids(program):
            if map_id in ours:
                continue
            try:
                with Map.from_id(map_id) as used:
                    if used.name.startswith("calls_"):
                        stale.append(f"{used.name} (id {map_id})")
            except BpfError:
                continue
        return stale

    # ---- registrations ----

    def _registrations(self, hook: Hook | None = None) -> dict[tuple[Hook, Slot], Registration]:
        assert self._store is not None, "the chain has no store"
        regs = (Registration.from_doc(k, d) for k, d in self._store.items(KIND))
        return {(r.hook, r.slot): r for r in regs if hook is None or r.hook is hook}

    def _open(self, reg: Registration) -> Program | None:
        """The registered program, else the one now live in its slot (kept, with a warning)."""
        if reg.pin_path and os.path.exists(reg.pin_path):
            return Program.from_pin(reg.pin_path)
        if reg.program_id:
            try:
                return Program.from_id(reg.program_id)
            except BpfError:
                pass
        live = self.generations.program_id(reg.hook, reg.slot)
        log.warning(
            "registered program is gone; keeping the live one",
            slot=reg.key,
            service=reg.service,
            pin=reg.pin_path,
            live_id=live,
        )
        if live:
            try:
                return Program.from_id(live)
            except BpfError:
                return None
        return None

    def _install(self, hook: Hook) -> int:
        programs: dict[Slot, Program] = {}
        try:
            for (_, slot), reg in self._registrations(hook).items():
                program = self._open(reg)
                if program is not None:
                    programs[slot] = program
                    if self._stale_call_maps(program):
                        log.warning(
                            "registered program uses a call map that is no longer the node's; "
                            "its service must reload it",
                            slot=reg.key,
                            service=reg.service,
                        )
            return self.generations.install(hook, programs)
        finally:
            for program in programs.values():
                program.close()

    def register(self, service: str, wanted: Iterable[tuple[Hook, int, str, int]]) -> list[SlotState]:
        """Register programs (hook, slot, pin path or program id) for a service, all or none.

        Each hook touched gets one chain swap. A slot another service holds is
        refused; the operator (`OPERATOR`) may take any slot.
        """
        assert self._store is not None, "the chain has no store"
        if not service:
            raise InvalidArgument("service is required: the name the registration is kept under")
        if not SERVICE_RE.fullmatch(service):
            raise InvalidArgument(f"service {summary(service)} is invalid: up to 63 lowercase letters, digits, "
                                  "'-', '_' or '.'")  # fmt: skip
        wanted = list(wanted)
        if len(wanted) > MAX_PROGRAMS:
            raise InvalidArgument(f"{len(wanted)} programs in one registration; at most {MAX_PROGRAMS} "
                                  "(one per slot of each hook)")  # fmt: skip
        self.ensure_pins()
        current = self._registrations()
        regs: list[Registration] = []
        for hook, slot_number, pin_path, program_id in wanted:
            slot = check_slot(slot_number)
            with self.open_program(pin_path, program_id) as program:
                expected = hook_program_type(hook)
                if program.type != expected:
                    raise InvalidArgument(
                        f"program {program.name!r} (id {program.id}) has type {program.type.name}; "
                        f"hook {hook.name} takes {expected.name} programs"
                    )
                stale = self._stale_call_maps(program)
                if stale:
                    raise FailedPrecondition(
                        f"program {program.name!r} (id {program.id}) tail-calls through {', '.join(stale)}, "
                        "not this node's call maps (they were made anew): reload the program and register again"
                    )
                held = current.get((hook, slot))
                if held is not None and held.service not in (service, OPERATOR) and service != OPERATOR:
                    raise FailedPrecondition(
                        f"slot {slot.name} of hook {hook.name} is registered by service {held.service!r}; "
                        "it must clear it first"
                    )
                regs.append(Registration(hook, slot, service, pin_path, program.id))
        if not regs:
            raise InvalidArgument("no programs given")
        hooks = sorted({r.hook for r in regs})
        with Change(self._store) as change:
            for reg in regs:
                self._store.put(KIND, reg.key, reg.doc())
            for hook in hooks:
                self._swap_in_change(change, hook, current)
        return [self.slot(r.hook, r.slot) for r in regs]

    def registrar(self, service: str) -> Register:
        """A `Register` for a service running in this process (benchmarks; services use ChainClient)."""

        def register(placements: list[Placement]) -> None:
            self.register(service, [(p.hook, p.slot, str(p.pin_path), 0) for p in placements])

        return register

    def _swap_in_change(self, change: Change, hook: Hook, before: dict[tuple[Hook, Slot], Registration]) -> None:
        change.apply(lambda: self._install(hook), undo=lambda: self._restore(hook, before))

    def _restore(self, hook: Hook, regs: dict[tuple[Hook, Slot], Registration]) -> None:
        """Undo of a failed registration: the chain the old registrations describe."""
        programs: dict[Slot, Program] = {}
        try:
            for (h, slot), reg in regs.items():
                program = self._open(reg) if h is hook else None
                if program is not None:
                    programs[slot] = program
            self.generations.install(hook, programs)
        finally:
            for program in programs.values():
                program.close()

    def set_slot(self, hook: Hook, slot: int, pin_path: str = "", program_id: int = 0) -> SlotState:
        """Register a program in a slot as the operator (replacing whoever held it)."""
        return self.register(OPERATOR, [(hook, slot, pin_path, program_id)])[0]

    def clear_slot(self, hook: Hook, slot: int) -> SlotState:
        """Forget a slot's registration and swap in the chain without it."""
        assert self._store is not None, "the chain has no store"
        checked = check_slot(slot)
        self.ensure_pins()
        current = self._registrations()
        with Change(self._store) as change:
            self._store.delete(KIND, Registration(hook, checked, "").key)
            self._swap_in_change(change, hook, current)
        return self.slot(hook, checked)

    def swap(self, hook: Hook) -> int:
        """Rebuild a hook's chain from its registrations in the idle generation and flip to it."""
        self.ensure_pins()
        return self._install(hook)

    def slot(self, hook: Hook, slot: int) -> SlotState:
        checked = check_slot(slot)
        generation = self.generations.active(hook)
        program_id = self.generations.program_id(hook, checked, generation)
        reg = self._registrations(hook).get((hook, checked)) if self._store is not None else None
        service = reg.service if reg is not None else ""
        if not program_id:
            return SlotState(hook, checked, 0, "", service, generation)
        try:
            with Program.from_id(program_id) as program:
                name = program.name
        except OSError:
            name = ""
        return SlotState(hook, checked, program_id, name, service, generation)

    def slots(self, hook: Hook) -> list[SlotState]:
        self.ensure_pins()
        return [self.slot(hook, s) for s in Slot]

    @staticmethod
    def open_program(pin_path: str = "", program_id: int = 0) -> Program:
        """Find a program by pin path or id; NotFound with the path or id otherwise."""
        if pin_path:
            if "\0" in pin_path or len(pin_path) > MAX_PATH:
                raise InvalidArgument(f"pin path {summary(pin_path)} is not a path (a NUL, or over {MAX_PATH} bytes)")
            if not os.path.isabs(pin_path):
                raise InvalidArgument(f"pin path {summary(pin_path)} must be absolute")
            try:
                return Program.from_pin(pin_path)
            except FileNotFoundError as exc:
                raise NotFound(f"no program is pinned at {summary(pin_path)}") from exc
            except OSError as exc:
                if exc.errno == 2:
                    raise NotFound(f"no program is pinned at {summary(pin_path)}") from exc
                raise InvalidArgument(f"{summary(pin_path)} is not a pinned program: {exc.strerror}") from exc
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
        for (code, direction), total in reasons.read_reason_counters(self.metrics).items():
            reason: Reason | int = Reason(code) if code in Reason._value2member_map_ else code
            out.append(ReasonCount(reason, Direction(direction), int(total.packets), int(total.bytes)))
        return sorted(out, key=lambda r: (int(r.reason), r.direction))


def local_register(entry: BpfObject) -> Register:
    """A `Register` that places programs straight into an entry object's call maps.

    For benchmarks and tests that run the objects without an orchestrator
    process; each call swaps the hooks it names, as the orchestrator does.
    """
    generations = Generations({h: ProgArray(entry.maps[n]) for h, n in CALL_MAPS.items()}, entry.maps[STATE_MAP])
    placed: dict[Hook, dict[Slot, Program]] = {}

    def register(placements: list[Placement]) -> None:
        for p in placements:
            old = placed.setdefault(p.hook, {}).get(p.slot)
            if old is not None:
                old.close()
            placed[p.hook][p.slot] = Program.from_pin(p.pin_path)
        for hook in {p.hook for p in placements}:
            generations.install(hook, placed[hook])

    return register
