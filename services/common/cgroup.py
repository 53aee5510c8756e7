"""The instance's own cgroup2 subtree: made by the first service that needs it, removed by teardown.

Socket hooks attach to ``config.cgroup_root`` (by default ``<cgroup2>/<instance>``), so two
instances never share an attach point unless told to. Teardown may remove the directory
only if this instance made it (a user's ``--cgroup-root`` is never removed) and it is empty;
the run directory records that we made it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from services.common.config import NodeConfig

MADE_MARKER = "cgroup.made"


def _marker(config: NodeConfig) -> Path:
    return config.run_dir / MADE_MARKER


def ensure_cgroup(config: NodeConfig) -> None:
    """Create the instance's cgroup directory if missing and remember that we made it."""
    path = config.cgroup_root
    if path.is_dir():
        return
    path.mkdir(parents=False)
    config.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _marker(config).write_text(f"{path}\n")


def made_by_instance(config: NodeConfig) -> bool:
    """Whether this instance created its cgroup directory (so teardown may remove it)."""
    try:
        return Path(_marker(config).read_text().strip()) == config.cgroup_root
    except OSError:
        return False


def remove_cgroup_if_ours(config: NodeConfig) -> bool:
    """rmdir the cgroup if we made it and it holds no processes or children; True if removed."""
    if not made_by_instance(config) or not config.cgroup_root.is_dir():
        return False
    try:
        os.rmdir(config.cgroup_root)  # the kernel refuses while processes or children remain
    except OSError:
        return False
    with contextlib.suppress(OSError):
        _marker(config).unlink()
    return True
