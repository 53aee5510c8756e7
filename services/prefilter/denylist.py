"""The prefilter's desired state: which CIDRs are denied (or audited), and their ids.

Pure Python, no kernel: it validates a change against the current list and the
maps' capacity before anything is written, so a refused change leaves both the
list and the maps as they were.

The list is kept as the maps hold it: per kind (v4/v6 hosts, v4/v6 prefixes) a dict
from the raw map key to the raw map value (a `PrefilterEntry`: counter id and
flags). A bulk replace of a million hosts then costs a few passes in C (slicing,
`dict`, `array`, `bytes.join`) and no Python object per entry beyond the two byte
strings the dict holds; `Entry` objects (with an `ipaddress` network) are made
only for the entries a small change, a listing or a counter read names.
"""

from __future__ import annotations

import ctypes
import struct
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.common.validate import CidrError, Network, is_host, parse_cidr
from services.prefilter.defs import EntryFlag, PrefilterEntry
from services.prefilter.keys import HOSTS, KINDS, Kind, kind_of, raw_key
from services.prefilter.netdict import NetworkDict

Table = dict[Kind, dict[bytes, bytes]]  # raw map key -> raw map value, per list
Wanted = dict[Kind, dict[bytes, int]]  # raw map key -> flags, per list
VALUE = struct.Struct("=II")  # PrefilterEntry: id, flags (native order, as the map has it)
MISSING = 0xFFFFFFFF  # a flags word no entry has: marks keys not on the current list
_MISSING_VALUE = VALUE.pack(0, MISSING)
assert VALUE.size == ctypes.sizeof(PrefilterEntry)


@dataclass(frozen=True)
class Entry:
    network: Network
    audit: bool
    id: int

    @property
    def host(self) -> bool:
        return is_host(self.network)


@dataclass(frozen=True)
class Capacity:
    """How many entries the maps hold: exact hosts per family, prefixes per family."""

    hosts: int
    prefixes: int

    @property
    def ids(self) -> int:
        """Counter slots: one per entry the maps can hold (both families share them)."""
        return 2 * (self.hosts + self.prefixes)


def flags_of(audit: bool) -> int:
    return int(EntryFlag.AUDIT) if audit else 0


def value_of(entry: Entry) -> bytes:
    return VALUE.pack(entry.id, flags_of(entry.audit))


def empty_table() -> Table:
    return {kind: {} for kind in KINDS}


def ids_of(values: Iterable[bytes]) -> array[int]:
    """The counter ids in raw values, in one pass in C."""
    return array("I", b"".join(values))[0::2]


def split(buf: bytes, size: int) -> list[bytes]:
    return [buf[i : i + size] for i in range(0, len(buf), size)]


def pack_values(ids: array[int], flags: array[int]) -> bytes:
    """Raw values (id, flags) for parallel arrays of ids and flags."""
    out = array("I", bytes(8 * len(ids)))
    out[0::2] = ids
    out[1::2] = flags
    return out.tobytes()


def parse_entries(items: Iterable[tuple[str, bool]]) -> NetworkDict[bool]:
    """CIDR text and audit flag -> network and audit flag; the first bad CIDR is refused."""
    out: NetworkDict[bool] = NetworkDict()
    for index, (text, audit) in enumerate(items):
        try:
            network = parse_cidr(text)
        except CidrError as exc:
            raise InvalidArgument(f"entry {index}: {exc}") from None
        if network in out and out[network] != audit:
            raise InvalidArgument(f"entry {index}: {network} is given twice with different modes")
        out[network] = audit
    return out


@dataclass(frozen=True)
class Packed:
    """A block of hosts of one family and mode, addresses packed back to back in network order."""

    version: int
    addresses: bytes
    audit: bool
    where: str = "packed block"  # how an error message names the block


def parse_wanted(items: Iterable[tuple[str, bool]], packed: Iterable[Packed] = ()) -> Wanted:
    """A whole list from CIDR text and packed host blocks; the first bad entry is refused.

    The same CIDR given twice with one mode counts once; with two modes it is refused.
    """
    wanted: Wanted = {kind: {} for kind in KINDS}
    index = -1
    for index, (text, audit) in enumerate(items):
        try:
            kind, raw = raw_key(text)
        except CidrError as exc:
            raise InvalidArgument(f"entry {index}: {exc}") from None
        flags = flags_of(audit)
        if wanted[kind].setdefault(raw, flags) != flags:
            raise InvalidArgument(f"entry {index}: {kind.network(raw)} is given twice with different modes")
    for group in packed:
        kind = HOSTS[group.version]
        size = kind.address_size
        if len(group.addresses) % size:
            raise InvalidArgument(
                f"{group.where}: {len(group.addresses)} bytes is not a whole number of "
                f"{size}-byte IPv{group.version} addresses"
            )
        keys = split(group.addresses, size)
        flags = flags_of(group.audit)
        into = wanted[kind]
        if into:
            clash = next((k for k in keys if into.get(k, flags) != flags), None)
            if clash is not None:
                raise InvalidArgument(f"{group.where}: {kind.network(clash)} is given twice with different modes")
        into.update(dict.fromkeys(keys, flags))
    return wanted


def wanted_of(networks: Mapping[Network, bool]) -> Wanted:
    """The `Wanted` form of parsed networks (for callers holding `parse_entries` output)."""
    wanted: Wanted = {kind: {} for kind in KINDS}
    for network, audit in networks.items():
        kind = kind_of(network)
        wanted[kind][kind.key(network)] = flags_of(audit)
    return wanted


class EntryView(Mapping[Network, Entry]):
    """The list as network -> Entry; Entry objects are made on access only."""

    def __init__(self, table: Table) -> None:
        self._table = table

    def __getitem__(self, network: Network) -> Entry:
        kind = kind_of(network)
        raw = self._table[kind][kind.key(network)]
        entry_id, flags = VALUE.unpack(raw)
        return Entry(network, bool(flags & EntryFlag.AUDIT), entry_id)

    def __contains__(self, network: object) -> bool:
        if not hasattr(network, "network_address"):
            return False
        kind = kind_of(network)  # type: ignore[arg-type]
        return kind.key(network) in self._table[kind]  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Network]:
        for kind, raws in self._table.items():
            for raw in raws:
                yield kind.network(raw)

    def __len__(self) -> int:
        return sum(len(raws) for raws in self._table.values())

    def pairs(self) -> Iterator[tuple[Network, Entry]]:
        for kind, raws in self._table.items():
            for raw, value in raws.items():
                network = kind.network(raw)
                entry_id, flags = VALUE.unpack(value)
                yield network, Entry(network, bool(flags & EntryFlag.AUDIT), entry_id)

    def values(self) -> Iterator[Entry]:  # type: ignore[override]
        return (entry for _, entry in self.pairs())


@dataclass
class ReplacePlan:
    """A whole new list with ids assigned, and what it takes from the current one."""

    table: Table
    fresh_ids: list[int]  # ids of entries new to the list
    leaving_ids: list[int]  # ids of entries that leave it
    changed: int  # entries added, removed or switched in mode
    reused_ids: set[int] = field(default_factory=set)  # fresh ids that leaving entries held

    def entries(self) -> list[Entry]:
        return list(EntryView(self.table).values())


class DenyList:
    """Entries by raw map key, with stable counter ids and capacity checks."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self.table: Table = empty_table()
        self._free: list[int] = []
        self._next_id = 0

    @property
    def entries(self) -> EntryView:
        return EntryView(self.table)

    def entry(self, kind: Kind, raw: bytes) -> Entry:
        """The entry at a raw key (KeyError if absent)."""
        entry_id, flags = VALUE.unpack(self.table[kind][raw])
        return Entry(kind.network(raw), bool(flags & EntryFlag.AUDIT), entry_id)

    def count(self) -> int:
        return sum(len(raws) for raws in self.table.values())

    def _held(self) -> set[int]:
        return set(ids_of(v for raws in self.table.values() for v in raws.values()))

    def restore(self, entries: Iterable[Entry]) -> None:
        """Rebuild from persisted entries (ids included)."""
        table = empty_table()
        for e in entries:
            kind = kind_of(e.network)
            table[kind][kind.key(e.network)] = value_of(e)
        self.restore_table(table)

    def restore_table(self, table: Table) -> None:
        """Rebuild from a persisted table (ids included)."""
        self.table = {kind: table.get(kind, {}) for kind in KINDS}
        used = self._held()
        self._next_id = max(used, default=-1) + 1
        self._free = sorted(set(range(self._next_id)) - used, reverse=True)

    def _allocate(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next_id >= self.capacity.ids:
            raise ResourceExhausted("no counter slot is free")
        self._next_id += 1
        return self._next_id - 1

    def _take(self, count: int) -> list[int]:
        """`count` ids: freed ones first, then never-used ones (all or, if too few, none)."""
        reused = self._free[-count:][::-1] if count else []
        rest = count - len(reused)
        if self._next_id + rest > self.capacity.ids:
            raise ResourceExhausted("no counter slot is free")
        del self._free[len(self._free) - len(reused) :]
        fresh = list(range(self._next_id, self._next_id + rest))
        self._next_id += rest
        return reused + fresh

    def check_counts(self, counts: Mapping[Kind, int]) -> None:
        """Refuse a list that does not fit the maps, saying which map and by how much."""
        for kind in KINDS:
            count = counts.get(kind, 0)
            limit = self.capacity.hosts if kind.host else self.capacity.prefixes
            if count > limit:
                version = kind.version
                what = "host (/32)" if version == 4 and kind.host else "host (/128)" if kind.host else "prefix"
                raise ResourceExhausted(
                    f"{count} IPv{version} {what} entries do not fit: the map holds {limit}; "
                    "restart the prefilter with a larger --host-entries/--prefix-entries"
                )

    def plan_add(self, wanted: Mapping[Network, bool]) -> tuple[list[Entry], list[Entry]]:
        """(new entries, entries whose mode changes) for an add; ids are assigned here."""
        changed: list[Entry] = []
        fresh: list[tuple[Network, bool]] = []
        counts = {kind: len(raws) for kind, raws in self.table.items()}
        for network, audit in wanted.items():
            kind = kind_of(network)
            current = self.table[kind].get(kind.key(network))
            if current is None:
                fresh.append((network, audit))
                counts[kind] += 1
                continue
            entry_id, flags = VALUE.unpack(current)
            if bool(flags & EntryFlag.AUDIT) != audit:
                changed.append(Entry(network, audit, entry_id))
        self.check_counts(counts)
        added = [Entry(network, audit, self._allocate()) for network, audit in fresh]
        return added, changed

    def plan_delete(self, networks: Iterable[Network]) -> list[Entry]:
        entries = self.entries
        removed = []
        for network in networks:
            entry = entries.get(network)
            if entry is None:
                raise NotFound(f"{network} is not on the deny list")
            removed.append(entry)
        return removed

    def plan_replace(self, wanted: Wanted) -> ReplacePlan:
        """The whole new list; kept entries keep their ids, new ones take the ids of
        leaving entries first. Undo with `abort(plan.fresh_ids)`."""
        self.check_counts({kind: len(raws) for kind, raws in wanted.items()})
        leaving: list[int] = []
        changed = 0
        staged: list[tuple[Kind, dict[bytes, int], array[int], array[int], list[int] | None]] = []
        for kind in KINDS:
            current, new = self.table[kind], wanted.get(kind, {})
            flags = array("I", new.values())
            if current:
                old = array("I", b"".join([current.get(k, _MISSING_VALUE) for k in new]))
                ids, old_flags = old[0::2], old[1::2]
                leaving.extend(ids_of([current[k] for k in current.keys() - new.keys()]))
                changed += sum(1 for a, b in zip(old_flags, flags, strict=True) if a != b)
                holes: list[int] | None = [i for i, f in enumerate(old_flags) if f == MISSING]
            else:
                ids, holes = array("I", bytes(4 * len(new))), None  # None: every position is new
                changed += len(new)
            staged.append((kind, new, ids, flags, holes))
        changed += len(leaving)
        need = sum(len(new) if holes is None else len(holes) for _, new, _, _, holes in staged)
        spare = leaving[::-1][:need]  # leaving ids first, as `pop` from the end would give them
        fresh = spare + self._take(need - len(spare))
        table: Table = {}
        at = 0
        for kind, new, ids, flags, holes in staged:
            if holes is None:
                ids = array("I", fresh[at : at + len(new)])
                at += len(new)
            else:
                for i in holes:
                    ids[i] = fresh[at]
                    at += 1
            table[kind] = dict(zip(new, split(pack_values(ids, flags), VALUE.size), strict=True))
        return ReplacePlan(table, fresh, leaving, changed, set(spare))

    def abort(self, ids: Iterable[int]) -> None:
        """Give back the ids a plan took that no current entry holds."""
        held = self._held()
        free = set(self._free) | {i for i in ids if i not in held}
        while self._next_id - 1 in free:  # ids past every held one go back to never-used
            self._next_id -= 1
            free.discard(self._next_id)
        self._free = sorted(free, reverse=True)

    def commit_replace(self, plan: ReplacePlan) -> None:
        reused = plan.reused_ids
        self._free.extend(i for i in plan.leaving_ids if i not in reused)
        self.table = {kind: plan.table.get(kind, {}) for kind in KINDS}

    def commit(self, upserts: Iterable[Entry] = (), removed: Iterable[Entry] = ()) -> None:
        for entry in removed:
            kind = kind_of(entry.network)
            self.table[kind].pop(kind.key(entry.network), None)
            self._free.append(entry.id)
        for entry in upserts:
            kind = kind_of(entry.network)
            self.table[kind][kind.key(entry.network)] = value_of(entry)
