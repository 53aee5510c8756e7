"""SOCKHASH maps: sockets keyed by a value of the caller's choosing."""

from __future__ import annotations

import ctypes
import errno
import socket
from collections.abc import Iterator
from typing import Any

from pybpf.errors import NotSupportedError
from pybpf.maps import Map, MapType, UpdateFlag

__all__ = ["SockHash"]


class SockHash:
    """A SOCKHASH (or SOCKMAP) map that takes sockets as values.

    An update stores the socket behind an fd (the kernel takes its own
    reference: the fd may be closed afterwards). Reading a value back does not
    give a socket: with an 8-byte value the kernel returns the socket's cookie
    (as ``SO_COOKIE`` reports it), with a 4-byte value lookups fail.
    """

    def __init__(self, map_: Map, key_type: type | None = ctypes.c_uint32) -> None:
        """Wrap ``map_`` (shared); ValueError when it is not a SOCKHASH/SOCKMAP."""
        if map_.type not in (MapType.SOCKHASH, MapType.SOCKMAP):
            raise ValueError(f"map {map_.name} is {map_.type.name}, not SOCKHASH")
        value_type = ctypes.c_uint64 if map_.value_size == 8 else ctypes.c_uint32
        self.map = map_.typed(key_type, value_type)

    def update(self, key: Any, sock: socket.socket | int, flags: UpdateFlag = UpdateFlag.ANY) -> None:
        """Add a socket (a TCP socket must be established or listening)."""
        fd = sock if isinstance(sock, int) else sock.fileno()
        self.map.update(key, fd, flags)

    def __setitem__(self, key: Any, sock: socket.socket | int) -> None:
        self.update(key, sock)

    def delete(self, key: Any) -> None:
        """Remove the socket at ``key``; KeyNotFoundError when absent."""
        self.map.delete(key)

    def cookie(self, key: Any) -> int | None:
        """The cookie of the socket at ``key``, or None (needs an 8-byte value, 5.x+)."""
        if self.map.value_size != 8:
            raise NotSupportedError(
                errno.EOPNOTSUPP, f"lookup map {self.map.name}: socket cookies need an 8-byte value"
            )
        value: int | None = self.map.lookup(key)
        return value

    def keys(self) -> Iterator[Any]:
        return self.map.keys()
