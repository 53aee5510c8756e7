"""Feature probes: does the running kernel support a map or program type?

``has_*`` answer True or False; ``require_*`` return quietly or raise
NotSupportedError, for code that wants to fail early with a clear message.
Results are cached for the life of the process.
"""

from __future__ import annotations

import errno
import functools

from pybpf import _libbpf
from pybpf.errors import ENOTSUPP, NotSupportedError, check
from pybpf.maps import MapType
from pybpf.programs import ProgType

__all__ = ["has_map_type", "has_prog_type", "require_map_type", "require_prog_type"]


def _probe(ret: int, what: str) -> bool:
    if ret in (-errno.EOPNOTSUPP, -ENOTSUPP):
        return False  # libbpf itself does not know how to probe this type
    return check(ret, what) == 1


@functools.cache
def has_map_type(map_type: MapType) -> bool:
    """True when the kernel can create maps of ``map_type``; BpfError if probing fails."""
    return _probe(_libbpf.libbpf_probe_bpf_map_type(int(map_type), None), f"probe map type {map_type.name}")


@functools.cache
def has_prog_type(prog_type: ProgType) -> bool:
    """True when the kernel can load programs of ``prog_type``; BpfError if probing fails."""
    return _probe(
        _libbpf.libbpf_probe_bpf_prog_type(int(prog_type), None),
        f"probe program type {prog_type.name}",
    )


def require_map_type(map_type: MapType) -> None:
    """Raise NotSupportedError unless the kernel supports ``map_type``."""
    if not has_map_type(map_type):
        raise NotSupportedError(errno.EOPNOTSUPP, f"map type {map_type.name}: not supported by this kernel")


def require_prog_type(prog_type: ProgType) -> None:
    """Raise NotSupportedError unless the kernel supports ``prog_type``."""
    if not has_prog_type(prog_type):
        raise NotSupportedError(errno.EOPNOTSUPP, f"program type {prog_type.name}: not supported by this kernel")
