"""Program arrays: the jump tables of ``bpf_tail_call``."""

from __future__ import annotations

import ctypes
import errno

from pybpf._fd import HasFd, as_fd
from pybpf.errors import BpfError
from pybpf.maps import Map, MapType

__all__ = ["ProgArray"]


class ProgArray:
    """A PROG_ARRAY map seen as slots holding programs.

    Writing takes a program (or its fd); reading gives back the program's id,
    which is what the kernel returns to user space for these maps.
    """

    def __init__(self, map_: Map) -> None:
        """Wrap ``map_`` (shared, not copied); ValueError when it is not a PROG_ARRAY."""
        if map_.type != MapType.PROG_ARRAY:
            raise ValueError(f"map {map_.name} is {map_.type.name}, not PROG_ARRAY")
        self.map = map_.typed(ctypes.c_uint32, ctypes.c_uint32)

    def set(self, index: int, program: HasFd | int) -> None:
        """Point slot ``index`` at ``program``; tail calls through it jump there."""
        self.map.update(index, as_fd(program))

    def clear(self, index: int) -> bool:
        """Empty slot ``index``; returns False when it was already empty."""
        try:
            self.map.delete(index)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def get_id(self, index: int) -> int | None:
        """The id of the program in slot ``index``, or None when empty."""
        prog_id: int | None = self.map.lookup(index)
        return prog_id

    def __len__(self) -> int:
        return self.map.max_entries
