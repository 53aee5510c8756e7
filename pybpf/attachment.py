"""The common shape of an attached program: a value with a lifetime.

An attachment stays in the kernel until ``close()`` (alias ``detach()``) is
called. It is deliberately NOT detached when the Python object is garbage
collected or the process exits, even by SIGKILL: the datapath must survive a
restart of the service that installed it. A service that restarts finds its
programs through the query functions of each hook and takes over from there.
"""

from __future__ import annotations

import ctypes
import errno
from types import TracebackType
from typing import Self

from pybpf import _libbpf
from pybpf.errors import check
from pybpf.programs import AttachType

__all__ = ["Attachment", "query_programs"]


class Attachment:
    """Base of the per-hook attachments; subclasses implement ``_detach``."""

    _closed = False

    def _detach(self) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Detach from the hook (when still ours) and release held fds. Idempotent."""
        if self._closed:
            return
        self._detach()
        self._closed = True

    def detach(self) -> None:
        """Same as ``close()``."""
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def query_programs(target_fd: int, attach_type: AttachType, what: str) -> list[int]:
    """BPF_PROG_QUERY on any target fd (cgroup, sockmap...), growing the id buffer as needed."""
    size = 64
    while True:
        ids = (ctypes.c_uint32 * size)()
        count = ctypes.c_uint32(size)
        attach_flags = ctypes.c_uint32(0)
        ret = _libbpf.bpf_prog_query(
            target_fd, int(attach_type), 0, ctypes.byref(attach_flags), ids, ctypes.byref(count)
        )
        if ret == -errno.ENOSPC:
            size *= 4
            continue
        check(ret, f"query {attach_type.name} on {what}")
        return list(ids[: count.value])
