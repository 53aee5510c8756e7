"""How full the node's maps are: entries against max_entries, for `weir status` and the metrics.

Counting walks a map's keys (one syscall each), so it is done on request, never on a timer.
Only hash-like maps are counted (an array always holds max_entries).
"""

from __future__ import annotations

from dataclasses import dataclass

from pybpf import Map


@dataclass(frozen=True)
class Fill:
    name: str
    entries: int
    capacity: int


class MapFill:
    def __init__(self, maps: dict[str, Map]) -> None:
        self._maps = dict(sorted(maps.items()))

    def read(self) -> list[Fill]:
        return [Fill(name, sum(1 for _ in m), m.max_entries) for name, m in self._maps.items()]
