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

from pybpf import AttachType, BpfError, query_cgroup
from services.common.config import NodeConfig

MADE_MARKER = "cgroup.made"
ATTACH_TYPES = tuple(t for t in AttachType if t.name.startswith("CGROUP_"))


def _marker(config: NodeConfig) -> Path:
    return config.run_dir / MADE_MARKER


def ensure_cgroup(config: NodeConfig) -> bool:
    """Create the instance's cgroup directory if missing and remember that we made it.

    Only the parent is expected to exist (the cgroup2 mount or a subtree the operator
    made); without it nothing is created here, and a service that attaches to the cgroup
    reports the problem itself. Returns whether the directory exists.
    """
    path = config.cgroup_root
    if path.is_dir():
        return True
    try:
        path.mkdir(parents=False)
    except OSError:
        return False
    config.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _marker(config).write_text(f"{path}\n")
    return True


def made_by_instance(config: NodeConfig) -> bool:
    """Whether this instance created its cgroup directory (so teardown may remove it)."""
    try:
        return Path(_marker(config).read_text().strip()) == config.cgroup_root
    except OSError:
        return False


def attached_programs(path: Path) -> list[int]:
    """Ids of every program attached directly to a cgroup, of any cgroup attach type."""
    found = []
    for attach_type in ATTACH_TYPES:
        with contextlib.suppress(BpfError, OSError):
            found += query_cgroup(path, attach_type)
    return found


def remove_cgroup_if_ours(config: NodeConfig) -> bool:
    """rmdir the cgroup if we made it and it is empty; True if removed.

    Empty means no processes and no children (the kernel checks those) and no programs
    attached (the kernel would drop them with the directory: another instance sharing the
    subtree would lose its hooks).
    """
    if not made_by_instance(config) or not config.cgroup_root.is_dir() or attached_programs(config.cgroup_root):
        return False
    try:
        os.rmdir(config.cgroup_root)  # the kernel refuses while processes or children remain
    except OSError:
        return False
    with contextlib.suppress(OSError):
        _marker(config).unlink()
    return True
