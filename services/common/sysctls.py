"""Kernel settings a node changes, recorded before the first change so teardown can put them back.

The orchestrator turns on forwarding in the node's namespace. What the settings were before
is written once to ``<state_dir>/sysctls.json`` (a later start finds them already changed and
must not record its own values as the originals); ``restore`` writes them back and forgets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from services.common.config import NodeConfig

FORWARDING = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding")
RECORD = "sysctls.json"


def record_path(config: NodeConfig) -> Path:
    return config.state_dir / RECORD


def _recorded(config: NodeConfig) -> dict[str, str]:
    try:
        data = json.loads(record_path(config).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_record(config: NodeConfig, values: dict[str, str]) -> None:
    config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = record_path(config).with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=1, sort_keys=True))
    os.replace(tmp, record_path(config))


def set_recorded(config: NodeConfig, settings: dict[str, str]) -> None:
    """Set each /proc/sys path to its value, first recording the old value of any that change."""
    recorded = _recorded(config)
    changes = {}
    for path, value in settings.items():
        current = Path(path).read_text().strip()
        if current != value:
            changes[path] = value
            recorded.setdefault(path, current)
    if not changes:
        return
    _write_record(config, recorded)
    for path, value in changes.items():
        Path(path).write_text(value)


def enable_forwarding(config: NodeConfig) -> None:
    """The node routes between endpoints and the network (in its own namespace only)."""
    set_recorded(config, dict.fromkeys(FORWARDING, "1"))


def restore(config: NodeConfig) -> dict[str, str]:
    """Put back every recorded original value and drop the record; returns what was restored."""
    recorded = _recorded(config)
    for path, value in recorded.items():
        Path(path).write_text(value)
    record_path(config).unlink(missing_ok=True)
    return recorded
