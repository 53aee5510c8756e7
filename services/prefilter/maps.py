"""The prefilter's BPF object and maps: load, pin, generations, counters.

`PrefilterMaps` knows nothing of revisions or persistence; it turns entries
into map contents. Hosts go to the host hash maps, shorter prefixes to the
IPv6 LPM trie or the IPv4 hash by (length, address), whose span array and block
hash (services/prefilter/gates.py) say where IPv4 entries are. Each of those lists exists per generation, as an
inner map inside an ARRAY_OF_MAPS (a `pybpf.MapOfMaps`, inner maps made from
the object's templates), and `pf_active` names the live generation:
incremental changes edit the live inner maps, a bulk replace fills fresh inner
maps, swaps them into the other generation and flips `pf_active` with one map
update (the four lists must change together, so one swap per list is not enough).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

import structlog

from pybpf import BpfObject, KeyNotFoundError, Map, MapOfMaps, Program
from pybpf.batch import update_packed, value_stride
from services.common.chain_client import Placement, Register
from services.common.datapath import Counter, Hook, IpcacheKey, Slot
from services.common.lpm import ipcache_key, ipcache_network
from services.common.objects import load_service_object, pin_programs
from services.common.validate import Network
from services.prefilter.defs import GENERATIONS, V4_PAGES, V4_SPANS, EntryFlag, IfStats, PrefilterEntry
from services.prefilter.denylist import Capacity, Entry, Table, empty_table, value_of
from services.prefilter.gates import V4Gates
from services.prefilter.keys import KINDS, V4_HOST, V4_LPM, Kind, kind_of

__all__ = ["KINDS", "OWN_MAPS", "Kind", "PrefilterMaps", "dump_pinned", "kind_of"]

log = structlog.get_logger("weir.prefilter.maps")

PROGRAM = "prefilter_xdp"
# Time for programs that looked up the old generation before a flip to finish;
# XDP runs to completion in microseconds, this is a generous bound.
FLIP_GRACE_SECONDS = 0.05


SPANS = "pf_v4_span"
BLOCKS = "pf_v4_block"
PAGES = "pf_v4_page"
OWN_MAPS = [
    *(k.outer for k in KINDS),
    SPANS,
    BLOCKS,
    "pf_active",
    "pf_entry_stats",
    "pf_if_stats",
    "pf_config",
    "pf_valid_dst",
]


def _read(outers: dict[Kind, MapOfMaps], generation: int) -> dict[Network, tuple[int, bool]]:
    out: dict[Network, tuple[int, bool]] = {}
    for kind, outer in outers.items():
        inner = outer.get(generation)
        if inner is None:
            continue
        with inner:
            for raw_key, raw_value in inner.items():
                value = PrefilterEntry.from_buffer_copy(raw_value)
                out[kind.network(raw_key)] = (value.id, bool(value.flags & EntryFlag.AUDIT))
    return out


def dump_pinned(pin_dir: Path) -> dict[Network, tuple[int, bool]]:
    """Read the live list straight from a prefilter's pins, without the service."""
    maps = {name: Map.from_pin(pin_dir / name) for name in OWN_MAPS}
    try:
        active = int(maps["pf_active"].typed(ctypes.c_uint32, ctypes.c_uint32)[0])
        return _read({kind: MapOfMaps(maps[kind.outer]) for kind in KINDS}, active)
    finally:
        for m in maps.values():
            m.close()


def _table(entries: Iterable[Entry]) -> Table:
    table = empty_table()
    for e in entries:
        kind = kind_of(e.network)
        table[kind][kind.key(e.network)] = value_of(e)
    return table


class PrefilterMaps:
    """Owns the prefilter object, its pinned maps and program."""

    def __init__(
        self, bpf_dir: Path, globals_dir: Path, pin_dir: Path, capacity: Capacity, register: Register | None = None
    ) -> None:
        """`register` hands the pinned program to the orchestrator (none: the caller places it)."""
        self._path = bpf_dir / "prefilter.o"
        self._register = register
        self._globals_dir = globals_dir
        self._pin_dir = pin_dir
        self.capacity = capacity
        self._obj: BpfObject | None = None
        self.program: Program
        self.maps: dict[str, Map] = {}
        self._active: Map
        self._outers: dict[Kind, MapOfMaps] = {}
        self._span_outer: MapOfMaps
        self._block_outer: MapOfMaps
        self._page_outer: MapOfMaps
        self._gates: dict[int, V4Gates] = {}  # per generation with inner maps made by this process
        self._entry_stats: Map
        self._if_stats: Map
        self._config: Map
        self._valid_dst: Map

    def load(self) -> None:
        """Load the program, reusing this service's pinned maps; register it for its slot."""
        obj = load_service_object(
            self._path, self._globals_dir, self._pin_dir, OWN_MAPS, {"pf_entry_stats": self.capacity.ids}
        )
        self._obj = obj
        self.maps = {name: obj.maps[name] for name in OWN_MAPS}
        self._active = obj.typed_map("pf_active", ctypes.c_uint32, ctypes.c_uint32)
        self._outers = {kind: obj.map_of_maps(kind.outer) for kind in KINDS}
        self._span_outer = obj.map_of_maps(SPANS)
        self._block_outer = obj.map_of_maps(BLOCKS)
        self._page_outer = obj.map_of_maps(PAGES)
        self._entry_stats = obj.typed_map("pf_entry_stats", ctypes.c_uint32, Counter)
        self._if_stats = obj.typed_map("pf_if_stats", ctypes.c_uint32, IfStats)
        self._config = obj.typed_map("pf_config", ctypes.c_uint32, ctypes.c_uint32)
        self._valid_dst = obj.typed_map("pf_valid_dst", IpcacheKey, ctypes.c_uint32)
        self.program = pin_programs(obj, [PROGRAM], self._pin_dir)[PROGRAM]
        if self._register is not None:
            self._register([Placement(Hook.XDP, Slot.PREFILTER, self._pin_dir / PROGRAM)])

    def close(self) -> None:
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    # ---- generations ----

    @property
    def active(self) -> int:
        return int(self._active[0])

    def inner(self, kind: Kind, generation: int) -> Map | None:
        """The inner map of one kind in one generation (an owned handle), if any."""
        return self._outers[kind].get(generation)

    def _capacity(self, kind: Kind) -> int:
        return self.capacity.hosts if kind.host else self.capacity.prefixes

    @property
    def idle(self) -> int:
        """The generation a bulk replace fills (not the live one)."""
        return (self.active + 1) % GENERATIONS

    def install(self, entries: Table | Iterable[Entry]) -> int:
        """Make `entries` the whole live list in one step; returns the new generation.

        Fresh inner maps are filled and swapped into the idle generation, then
        `pf_active` flips. If filling fails, the live generation is untouched.
        """
        table = entries if isinstance(entries, dict) else _table(entries)
        target, previous = self.idle, self.active
        try:
            self.fill(target, table)
        except Exception:
            self.drop(target)
            raise
        self.flip(target)
        self.retire(previous)
        return target

    def fill(self, generation: int, table: Table) -> None:
        """Put fresh inner maps holding `table` into a generation that is not live.

        Each list goes in as one packed batch (keys and values joined in C, no
        object per entry).
        """
        if generation == self.active:
            raise ValueError(f"generation {generation} is live; fill the idle one")
        fresh: dict[Kind, Map] = {}
        gates = V4Gates(table.get(V4_HOST, {}), table.get(V4_LPM, {}), pages=True)
        (span_keys, span_values), (block_keys, block_values), (page_keys, page_values) = gates.packed()
        spans: Map | None = None
        blocks: Map | None = None
        pages: Map | None = None
        try:
            for kind in KINDS:
                inner = self._outers[kind].create_inner(self._capacity(kind))
                fresh[kind] = inner
                raws = table.get(kind)
                if raws:
                    update_packed(inner, b"".join(raws.keys()), b"".join(raws.values()))
            spans = self._span_outer.create_inner(V4_SPANS)
            update_packed(spans, span_keys, span_values)
            blocks = self._block_outer.create_inner(self._block_capacity)
            update_packed(blocks, block_keys, block_values)
            pages = self._page_outer.create_inner(V4_PAGES)
            update_packed(pages, page_keys, page_values)
            for kind, inner in fresh.items():
                self._outers[kind].swap(generation, inner)
            self._span_outer.swap(generation, spans)
            self._block_outer.swap(generation, blocks)
            self._page_outer.swap(generation, pages)
            self._gates[generation] = gates
        finally:
            for made in [*fresh.values(), spans, blocks, pages]:
                if made is not None:
                    made.close()  # the outer map holds them now (or, on failure, nobody does)

    @property
    def _block_capacity(self) -> int:
        """At most one block per IPv4 entry (hosts and prefixes share /24s more often than not)."""
        return self.capacity.hosts + self.capacity.prefixes

    def flip(self, generation: int) -> None:
        """Make a generation live: one map update that every later packet sees."""
        self._active[0] = generation

    def drop(self, generation: int) -> None:
        """Remove the inner maps of a generation that is not live (absent ones are skipped)."""
        if generation == self.active:
            raise ValueError(f"generation {generation} is live; it cannot be dropped")
        self._gates.pop(generation, None)
        for outer in [*self._outers.values(), self._span_outer, self._block_outer, self._page_outer]:
            with contextlib.suppress(KeyNotFoundError):
                outer.delete(generation)

    def retire(self, generation: int) -> None:
        """Drop the generation that was live before a flip, once programs that read it are done."""
        time.sleep(FLIP_GRACE_SECONDS)
        self.drop(generation)

    # ---- incremental changes on the live generation ----

    def upsert(self, entries: list[Entry]) -> None:
        """Write entries into the live generation (a failure may leave some written).

        IPv4 entries go in before the spans and blocks that lead to them.
        """
        for kind, group in self._by_kind(entries):
            with self._live(kind) as inner:
                self._write(inner, kind, group)
            if kind in (V4_HOST, V4_LPM):
                self._gate(kind, group, add=True)

    def remove(self, entries: list[Entry], missing_ok: bool = False) -> None:
        for kind, group in self._by_kind(entries):
            inner = self.inner(kind, self.active)
            if inner is None:
                continue
            with inner:
                for entry in group:
                    try:
                        inner.delete(kind.key(entry.network))
                    except KeyNotFoundError:
                        if not missing_ok:
                            raise
            if kind in (V4_HOST, V4_LPM):
                self._gate(kind, group, add=False)

    def _gate(self, kind: Kind, entries: list[Entry], add: bool) -> None:
        """Bring the live spans and blocks in line with IPv4 entries added or removed."""
        gates = self._gates.setdefault(self.active, V4Gates())
        if kind == V4_HOST:
            change = gates.add_host if add else gates.discard_host
        else:
            change = gates.add_prefix if add else gates.discard_prefix
        for entry in entries:
            change(kind.key(entry.network))
        spans, blocks, pages = gates.take_changes()
        if pages:
            with self._live_inner(self._page_outer, V4_PAGES) as inner:
                update_packed(inner, array("I", pages).tobytes(), b"".join(pages.values()))
        with self._live_inner(self._block_outer, self._block_capacity) as inner:
            for block, value in blocks.items():
                key = block.to_bytes(4, sys.byteorder)
                if value is not None:
                    inner.update(key, value)
                else:
                    with contextlib.suppress(KeyNotFoundError):
                        inner.delete(key)
        if spans:
            with self._live_inner(self._span_outer, V4_SPANS) as inner:
                update_packed(inner, array("I", spans).tobytes(), b"".join(spans.values()))

    def _live_inner(self, outer: MapOfMaps, max_entries: int) -> Map:
        inner = outer.get(self.active)
        if inner is not None:
            return inner
        inner = outer.create_inner(max_entries)
        outer.swap(self.active, inner)
        return inner

    def _live(self, kind: Kind) -> Map:
        inner = self.inner(kind, self.active)
        if inner is not None:
            return inner
        inner = self._outers[kind].create_inner(self._capacity(kind))
        self._outers[kind].swap(self.active, inner)
        return inner

    @staticmethod
    def _by_kind(entries: Iterable[Entry]) -> Iterator[tuple[Kind, list[Entry]]]:
        groups: dict[Kind, list[Entry]] = {}
        for entry in entries:
            groups.setdefault(kind_of(entry.network), []).append(entry)
        yield from groups.items()

    @staticmethod
    def _items(kind: Kind, entries: list[Entry]) -> list[tuple[bytes, bytes]]:
        return [(kind.key(e.network), value_of(e)) for e in entries]

    @staticmethod
    def _write(inner: Map, kind: Kind, entries: list[Entry]) -> None:
        if entries:
            items = PrefilterMaps._items(kind, entries)
            inner.update_batch([k for k, _ in items], [v for _, v in items])

    # ---- reading back ----

    def live(self) -> dict[Network, tuple[int, bool]]:
        """The live generation's list as network -> (counter id, audit), as the datapath has it."""
        return _read(self._outers, self.active)

    def live_table(self) -> Table:
        """The live generation's raw contents, per list (for adopting the maps into a fresh store)."""
        table = empty_table()
        for kind, outer in self._outers.items():
            inner = outer.get(self.active)
            if inner is None:
                continue
            with inner:
                table[kind] = {bytes(k): bytes(v) for k, v in inner.typed(None, None).items()}
        return table

    def reset_counters(self, ids: Iterable[int]) -> None:
        """Zero the counters of ids given to new entries (one packed batch, zeros for every CPU)."""
        keys = array("I", ids)
        if keys:
            update_packed(self._entry_stats, keys.tobytes(), bytes(value_stride(self._entry_stats) * len(keys)))

    def hits(self, entry_id: int) -> Counter:
        total = self._entry_stats.lookup_sum(entry_id)
        return total if total is not None else Counter()

    def interface_counters(self) -> dict[int, IfStats]:
        return {int(ifindex): self._if_stats.lookup_sum(ifindex) for ifindex in self._if_stats}

    # ---- the valid-destination mode ----

    def set_flags(self, flags: int) -> None:
        """Write pf_config (PrefilterConfigFlag bits)."""
        self._config.update(0, flags)

    def flags(self) -> int:
        return int(self._config.lookup(0) or 0)

    def valid_destinations(self) -> dict[Network, int]:
        """pf_valid_dst as it is: prefix -> ValidDestination."""
        return {ipcache_network(k): int(v) for k, v in self._valid_dst.items()}

    def put_valid_destination(self, network: Network, kind: int) -> None:
        self._valid_dst.update(ipcache_key(network), kind)

    def delete_valid_destination(self, network: Network) -> None:
        with contextlib.suppress(KeyNotFoundError):
            self._valid_dst.delete(ipcache_key(network))
