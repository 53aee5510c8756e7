"""Consuming a BPF ring buffer (BPF_MAP_TYPE_RINGBUF, kernel 5.8+)."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from types import TracebackType
from typing import Self

from pybpf import _libbpf
from pybpf.errors import check
from pybpf.maps import Map, MapType

__all__ = ["RingBuffer"]


class RingBuffer:
    """Calls ``callback(record: bytes)`` for each record the BPF side submits.

    Records are delivered only inside ``poll()`` or ``consume()``, in the calling
    thread. An exception raised by the callback stops that call and is re-raised
    from it; later records stay in the buffer for the next call.
    """

    def __init__(self, map_: Map, callback: Callable[[bytes], None]) -> None:
        """Raises ValueError for a map that is not a RINGBUF, BpfError from libbpf."""
        self._ptr: int | None = None
        if map_.type != MapType.RINGBUF:
            raise ValueError(f"map {map_.name} is {map_.type.name}, not RINGBUF")
        self.map = map_
        self._callback = callback
        self._error: BaseException | None = None
        self._sample = _libbpf.RINGBUF_SAMPLE_FN(self._on_sample)
        ptr = _libbpf.ring_buffer__new(map_.fd, self._sample, None, None)
        if not ptr:
            check(-(_libbpf.get_errno() or errno.EINVAL), f"ring buffer on map {map_.name}")
        self._ptr = ptr

    def _on_sample(self, _ctx: int | None, data: int | None, size: int) -> int:
        try:
            self._callback(ctypes.string_at(data, size) if data else b"")
        except BaseException as exc:  # handed back to the caller of poll()
            self._error = exc
            return -errno.ECANCELED
        return 0

    def _live(self) -> int:
        if self._ptr is None:
            raise ValueError(f"ring buffer on map {self.map.name} is closed")
        return self._ptr

    def _finish(self, ret: int, what: str) -> int:
        error, self._error = self._error, None
        if error is not None:
            raise error
        if ret == -errno.EINTR:
            return 0
        return check(ret, f"{what} ring buffer {self.map.name}")

    def poll(self, timeout_ms: int = -1) -> int:
        """Wait up to ``timeout_ms`` (-1: forever) for records; return how many were handled."""
        return self._finish(_libbpf.ring_buffer__poll(self._live(), timeout_ms), "poll")

    def consume(self) -> int:
        """Handle the records already there without waiting; return how many."""
        return self._finish(_libbpf.ring_buffer__consume(self._live()), "consume")

    def fileno(self) -> int:
        """An epoll fd that becomes readable when records arrive (for selectors)."""
        fd: int = _libbpf.ring_buffer__epoll_fd(self._live())
        return fd

    def close(self) -> None:
        """Free libbpf's consumer (the map itself is untouched). Idempotent."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            _libbpf.ring_buffer__free(ptr)

    def __del__(self) -> None:
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
