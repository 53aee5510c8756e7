"""One file descriptor and the rule for when it is closed.

A handle either owns its fd (it closes it on ``close()`` and, unless told
otherwise, when garbage collected) or borrows it from an owner such as a loaded
``BpfObject``. A borrowed handle keeps its owner alive, so the fd number can never
be reused behind its back, and is invalidated when the owner closes.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Protocol

from pybpf import _libbpf
from pybpf.errors import check


class FdHandle:
    """A file descriptor that knows whether, and when, to close itself."""

    def __init__(self, fd: int, *, owner: Any = None, close_on_gc: bool = True, what: str = "fd") -> None:
        if fd < 0:
            raise ValueError(f"{what}: invalid file descriptor {fd}")
        self._fd = fd
        self._owner = owner
        self._what = what
        self._finalizer: weakref.finalize[Any, Any] | None = None
        if owner is None and close_on_gc:
            self._finalizer = weakref.finalize(self, os.close, fd)

    @property
    def fd(self) -> int:
        """The descriptor; raises ValueError once closed."""
        if self._fd < 0:
            raise ValueError(f"{self._what} is closed")
        return self._fd

    @property
    def owned(self) -> bool:
        """True when this handle (not a BpfObject) closes the fd."""
        return self._owner is None

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def dup(self) -> int:
        """A new, independent descriptor for the same kernel object (close-on-exec)."""
        return os.dup(self.fd)

    def close(self) -> None:
        """Close an owned fd; forget a borrowed one. Idempotent."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        if self._finalizer is not None:
            self._finalizer()
        elif self._owner is None:
            os.close(fd)
        self._owner = None


def fd_kind(fd: int) -> str:
    """What a BPF fd refers to ("bpf-map", "bpf-prog", "bpf_link"), from /proc/self/fd."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""
    return target.removeprefix("anon_inode:")


def pin_fd(fd: int, path: str | os.PathLike[str], what: str) -> None:
    """Pin the object behind ``fd`` at ``path`` on a bpffs; raises BpfError."""
    check(_libbpf.bpf_obj_pin(fd, os.fsencode(path)), f"pin {what} at {os.fspath(path)}")


def get_pinned(path: str | os.PathLike[str], what: str) -> int:
    """Open a pinned object and return a new fd for it; raises BpfError."""
    return check(_libbpf.bpf_obj_get(os.fsencode(path)), f"open pinned {what} {os.fspath(path)}")


def unpin(path: str | os.PathLike[str], *, missing_ok: bool = False) -> None:
    """Remove a pin. The object lives on while fds, attachments or programs hold it."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


class HasFd(Protocol):
    """Anything with an ``fd`` (a Map, a Program)."""

    @property
    def fd(self) -> int: ...


def as_fd(value: HasFd | int) -> int:
    """The fd of a Map or Program, or the int itself."""
    return value if isinstance(value, int) else value.fd
