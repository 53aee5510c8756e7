"""The prefilter's desired state: which CIDRs are denied (or audited), and their ids.

Pure Python, no kernel: it validates a change against the current list and the
maps' capacity before anything is written, so a refused change leaves both the
list and the maps as they were.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.common.validate import CidrError, Network, is_host, parse_cidr
from services.prefilter.netdict import NetworkDict


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


class DenyList:
    """Entries by network, with stable counter ids and capacity checks."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self.entries: NetworkDict[Entry] = NetworkDict()  # a plain dict is quadratic for IPv6 (see netdict)
        self._free: list[int] = []
        self._next_id = 0

    def restore(self, entries: Iterable[Entry]) -> None:
        """Rebuild from persisted entries (ids included)."""
        self.entries = NetworkDict((e.network, e) for e in entries)
        used = {e.id for e in self.entries.values()}
        self._next_id = max(used, default=-1) + 1
        self._free = sorted(set(range(self._next_id)) - used, reverse=True)

    def _allocate(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next_id >= self.capacity.ids:
            raise ResourceExhausted("no counter slot is free")
        self._next_id += 1
        return self._next_id - 1

    def check_capacity(self, networks: Iterable[Network]) -> None:
        """Refuse a list that does not fit the maps, saying which map and by how much."""
        counts = {(4, True): 0, (4, False): 0, (6, True): 0, (6, False): 0}
        for network in networks:
            counts[(network.version, is_host(network))] += 1
        for (version, host), count in counts.items():
            limit = self.capacity.hosts if host else self.capacity.prefixes
            if count > limit:
                kind = "host (/32)" if version == 4 and host else "host (/128)" if host else "prefix"
                raise ResourceExhausted(
                    f"{count} IPv{version} {kind} entries do not fit: the map holds {limit}; "
                    "restart the prefilter with a larger --host-entries/--prefix-entries"
                )

    def plan_add(self, wanted: Mapping[Network, bool]) -> tuple[list[Entry], list[Entry]]:
        """(new entries, entries whose mode changes) for an add; ids are assigned here."""
        changed = [
            Entry(net, audit, self.entries[net].id)
            for net, audit in wanted.items()
            if net in self.entries and self.entries[net].audit != audit
        ]
        fresh = [net for net in wanted if net not in self.entries]
        self.check_capacity([*self.entries, *fresh])
        added = [Entry(net, wanted[net], self._allocate()) for net in fresh]
        return added, changed

    def plan_delete(self, networks: Iterable[Network]) -> list[Entry]:
        removed = []
        for network in networks:
            entry = self.entries.get(network)
            if entry is None:
                raise NotFound(f"{network} is not on the deny list")
            removed.append(entry)
        return removed

    def plan_replace(self, wanted: Mapping[Network, bool]) -> tuple[list[Entry], list[Entry]]:
        """(the whole new list, entries that leave it); kept entries keep their ids,
        new ones take the ids of leaving entries first. Undo with `release(new ids)`."""
        self.check_capacity(wanted)
        leaving = [e for net, e in self.entries.pairs() if net not in wanted]
        spare = [e.id for e in leaving]
        new_list = []
        for net, audit in wanted.items():
            current = self.entries.get(net)
            entry_id = current.id if current is not None else spare.pop() if spare else self._allocate()
            new_list.append(Entry(net, audit, entry_id))
        return new_list, leaving

    def abort(self, planned: Iterable[Entry]) -> None:
        """Give back the ids a plan took that no current entry holds."""
        held = {e.id for e in self.entries.values()}
        free = set(self._free) | {e.id for e in planned if e.id not in held}
        while self._next_id - 1 in free:  # ids past every held one go back to never-used
            self._next_id -= 1
            free.discard(self._next_id)
        self._free = sorted(free, reverse=True)

    def commit_replace(self, new_list: list[Entry], leaving: list[Entry]) -> None:
        reused = {e.id for e in new_list}
        self._free.extend(e.id for e in leaving if e.id not in reused)
        self.entries = NetworkDict((e.network, e) for e in new_list)

    def commit(self, upserts: Iterable[Entry] = (), removed: Iterable[Entry] = ()) -> None:
        for entry in removed:
            self.entries.pop(entry.network, None)
            self._free.append(entry.id)
        for entry in upserts:
            self.entries[entry.network] = entry
