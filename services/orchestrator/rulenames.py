"""Policy rule names by the ids the datapath reports in events (policy_rule_names).

The policy service writes the map (pinned in the node's globals) before any policy
entry carries the id, so a flow can be named on the events thread without asking
the policy service. The map exists once the policy service has loaded; until then
(and when a rule id is unknown) a flow has no rule name. Names are cached: the policy
service never gives an id to another name while it runs.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

from pybpf import Map
from services.common.datapath import RuleName

MAP_NAME = "policy_rule_names"
CACHE_MAX = 65536


class RuleNames:
    """Reads the node's policy_rule_names map, opened on first need."""

    def __init__(self, globals_dir: Path) -> None:
        self._path = globals_dir / MAP_NAME
        self._map: Map | None = None
        self._cache: dict[int, str] = {}
        self._lock = threading.Lock()

    def __call__(self, rule_id: int) -> str:
        """The rule's name, "" when the map or the id is not there."""
        with self._lock:
            name = self._cache.get(rule_id)
            if name is not None:
                return name
            if self._map is None:
                if not self._path.exists():
                    return ""
                self._map = Map.from_pin(self._path).typed(ctypes.c_uint32, RuleName)
            value = self._map.lookup(rule_id)
            if value is None:
                return ""
            name = bytes(value.name).rstrip(b"\0").decode(errors="replace")
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[rule_id] = name
            return name

    def close(self) -> None:
        with self._lock:
            if self._map is not None:
                self._map.close()
                self._map = None
