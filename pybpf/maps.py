"""BPF maps as typed Python handles.

A ``Map`` wraps one map fd. Its key and value types are ctypes types (a scalar
such as ``c_uint32`` gives and takes ints; a Structure gives and takes
instances) or ``None`` for raw bytes; their sizes are checked against the map
when the handle is made. Per-CPU maps give one value per possible CPU.

Ownership: ``Map(fd)``, ``Map.from_pin`` and ``Map.from_id`` own their fd and
close it on ``close()`` or garbage collection. Maps of a loaded ``BpfObject``
borrow the object's fd: their ``close()`` does nothing and they stop working when
the object closes; ``clone()`` gives an owned handle that outlives it. Closing
a map fd never destroys a map that is pinned or used by a loaded program.
"""

from __future__ import annotations

import builtins
import ctypes
import enum
import errno
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from pybpf import _libbpf
from pybpf._codec import Codec, CType, add_values
from pybpf._fd import FdHandle, fd_kind, get_pinned, pin_fd, unpin
from pybpf.errors import ENOTSUPP, BpfError, check, error_for

__all__ = ["BPF_F_INNER_MAP", "Map", "MapInfo", "MapSpec", "MapType", "UpdateFlag", "unpin"]

BPF_F_INNER_MAP = 1 << 12
"""An ARRAY inner map with this flag may differ in max_entries from its template (5.10+)."""


class MapType(enum.IntEnum):
    """Kernel ``enum bpf_map_type``; unknown future values still convert."""

    UNSPEC = 0
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    CGROUP_ARRAY = 8
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    SOCKMAP = 15
    CPUMAP = 16
    XSKMAP = 17
    SOCKHASH = 18
    CGROUP_STORAGE = 19
    REUSEPORT_SOCKARRAY = 20
    PERCPU_CGROUP_STORAGE = 21
    QUEUE = 22
    STACK = 23
    SK_STORAGE = 24
    DEVMAP_HASH = 25
    STRUCT_OPS = 26
    RINGBUF = 27
    INODE_STORAGE = 28
    TASK_STORAGE = 29
    BLOOM_FILTER = 30
    USER_RINGBUF = 31

    @classmethod
    def _missing_(cls, value: object) -> MapType | None:
        if not isinstance(value, int):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"UNKNOWN_{value}"
        member._value_ = value
        return member

    @property
    def is_percpu(self) -> bool:
        """True for types whose values hold one slot per possible CPU."""
        return self in _PERCPU_TYPES


_PERCPU_TYPES = frozenset(
    {
        MapType.PERCPU_HASH,
        MapType.PERCPU_ARRAY,
        MapType.LRU_PERCPU_HASH,
        MapType.PERCPU_CGROUP_STORAGE,
    }
)


class UpdateFlag(enum.IntEnum):
    """How an update treats an existing key (BPF_ANY, BPF_NOEXIST, BPF_EXIST)."""

    ANY = 0
    NOEXIST = 1
    EXIST = 2


@dataclass(frozen=True)
class MapInfo:
    """What the kernel says about a map (``struct bpf_map_info``)."""

    type: MapType
    id: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    map_extra: int


@dataclass(frozen=True)
class MapSpec:
    """A map as an object declares it, before (or regardless of) loading.

    ``inner`` is the inner map template of an ARRAY_OF_MAPS or HASH_OF_MAPS
    (``__array(values, struct inner)`` in C), None for other maps.
    """

    name: str
    type: MapType
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    map_extra: int
    pin_path: str | None
    inner: MapSpec | None = None


def map_info(fd: int) -> MapInfo:
    """Read ``struct bpf_map_info`` for a map fd; raises BpfError if fd is not a map."""
    if fd_kind(fd) != "bpf-map":
        raise BpfError(errno.EINVAL, f"map info: fd {fd} is not a BPF map ({fd_kind(fd)!r})")
    info = _libbpf.bpf_map_info()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(
        _libbpf.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
        f"map info of fd {fd}",
    )
    return MapInfo(
        type=MapType(info.type),
        id=info.id,
        name=info.name.decode(errors="replace"),
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
        map_extra=info.map_extra,
    )


def _roundup8(n: int) -> int:
    return (n + 7) & ~7


class Map:
    """A handle on one BPF map: typed lookups, updates, iteration, batches, pins."""

    _handle: FdHandle
    _info: MapInfo
    _name: str
    _keys: Codec
    _values: Codec

    def __init__(self, fd: int, *, key_type: CType | None = None, value_type: CType | None = None) -> None:
        """Take ownership of ``fd`` (pass ``os.dup(fd)`` to keep yours)."""
        info = map_info(fd)
        self._setup(FdHandle(fd, what=f"map {info.name}"), info, info.name, key_type, value_type)

    @classmethod
    def from_pin(
        cls,
        path: str | os.PathLike[str],
        *,
        key_type: CType | None = None,
        value_type: CType | None = None,
    ) -> Map:
        """Open a map pinned on a bpffs; raises BpfError (ENOENT when nothing is there)."""
        fd = get_pinned(path, "map")
        try:
            return cls(fd, key_type=key_type, value_type=value_type)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_id(cls, map_id: int, *, key_type: CType | None = None, value_type: CType | None = None) -> Map:
        """Open a map by its kernel id; raises BpfError (ENOENT when gone)."""
        fd = check(_libbpf.bpf_map_get_fd_by_id(map_id), f"open map id {map_id}")
        return cls(fd, key_type=key_type, value_type=value_type)

    @classmethod
    def create(
        cls,
        map_type: MapType,
        key_size: int,
        value_size: int,
        max_entries: int,
        *,
        flags: int = 0,
        name: str = "",
        key_type: CType | None = None,
        value_type: CType | None = None,
    ) -> Map:
        """Create a map from user space, e.g. an inner map to place into a map of maps.

        Raises BpfError (EINVAL for a combination the kernel refuses, ENOMEM when
        the memory cannot be had); the map lives as long as a handle, pin or outer
        map holds it.
        """
        opts = _libbpf.new_map_create_opts(flags)
        fd = check(
            _libbpf.bpf_map_create(
                int(map_type), name[:15].encode() or None, key_size, value_size, max_entries, ctypes.byref(opts)
            ),
            f"create {map_type.name} map {name or '(unnamed)'}",
        )
        try:
            return cls(fd, key_type=key_type, value_type=value_type)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _wrap(
        cls,
        handle: FdHandle,
        info: MapInfo,
        name: str,
        key_type: CType | None,
        value_type: CType | None,
    ) -> Map:
        """A handle over an existing FdHandle (borrowed from an object, or a typed view)."""
        inst = cls.__new__(cls)
        inst._setup(handle, info, name, key_type, value_type)
        return inst

    def _setup(
        self,
        handle: FdHandle,
        info: MapInfo,
        name: str,
        key_type: CType | None,
        value_type: CType | None,
    ) -> None:
        self._handle = handle
        self._info = info
        self._name = name
        self._keys = Codec(key_type, info.key_size, f"map {name}: key_size")
        self._values = Codec(value_type, info.value_size, f"map {name}: value_size")

    def typed(self, key_type: CType | None, value_type: CType | None) -> Map:
        """A view of this map with other key/value types; it shares this handle's fd."""
        return Map._wrap(self._handle, self._info, self._name, key_type, value_type)

    def clone(self) -> Map:
        """An owned handle on a dup of the fd, usable after this one (or its object) closes."""
        handle = FdHandle(self._handle.dup(), what=f"map {self._name}")
        return Map._wrap(handle, self._info, self._name, self._keys.ctype, self._values.ctype)

    @property
    def fd(self) -> int:
        return self._handle.fd

    @property
    def name(self) -> str:
        """libbpf's name for object maps; the kernel's (at most 15 chars) otherwise."""
        return self._name

    @property
    def info(self) -> MapInfo:
        return self._info

    @property
    def type(self) -> MapType:
        return self._info.type

    @property
    def id(self) -> int:
        return self._info.id

    @property
    def key_size(self) -> int:
        return self._info.key_size

    @property
    def value_size(self) -> int:
        return self._info.value_size

    @property
    def max_entries(self) -> int:
        return self._info.max_entries

    @property
    def flags(self) -> int:
        return self._info.flags

    @property
    def key_type(self) -> CType | None:
        return self._keys.ctype

    @property
    def value_type(self) -> CType | None:
        return self._values.ctype

    @property
    def is_percpu(self) -> bool:
        return self._info.type.is_percpu

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def _value_buffer_size(self) -> int:
        if self.is_percpu:
            return _roundup8(self.value_size) * _libbpf.possible_cpus()
        return self.value_size

    def _encode_value(self, value: Any) -> bytes:
        if not self.is_percpu:
            return self._values.encode(value)
        ncpus = _libbpf.possible_cpus()
        items = list(value) if isinstance(value, (list, tuple)) else [value] * ncpus
        if len(items) != ncpus:
            raise ValueError(f"map {self._name}: {ncpus} per-CPU values expected, got {len(items)}")
        stride = _roundup8(self.value_size)
        return b"".join(self._values.encode(v).ljust(stride, b"\0") for v in items)

    def _decode_value(self, raw: bytes) -> Any:
        if not self.is_percpu:
            return self._values.decode(raw)
        stride, size = _roundup8(self.value_size), self.value_size
        return [self._values.decode(raw[i : i + size]) for i in range(0, len(raw), stride)]

    def _lookup_raw(self, key: Any) -> bytes | None:
        buf = ctypes.create_string_buffer(self._value_buffer_size())
        ret = _libbpf.bpf_map_lookup_elem(self.fd, self._keys.encode(key), buf)
        if ret == -errno.ENOENT:
            return None
        check(ret, f"lookup map {self._name}", key_op=True)
        return buf.raw

    def lookup(self, key: Any) -> Any:
        """The value at ``key`` (a list, one per CPU, for per-CPU maps), or None."""
        raw = self._lookup_raw(key)
        return None if raw is None else self._decode_value(raw)

    def lookup_percpu(self, key: Any) -> list[Any] | None:
        """One value per possible CPU, or None; TypeError for a map that is not per-CPU."""
        if not self.is_percpu:
            raise TypeError(f"map {self._name} ({self.type.name}) is not a per-CPU map")
        values: list[Any] | None = self.lookup(key)
        return values

    def lookup_sum(self, key: Any) -> Any:
        """The per-CPU values at ``key`` added up (ints, or Structures field by field)."""
        values = self.lookup_percpu(key)
        return None if values is None else add_values(values)

    def __getitem__(self, key: Any) -> Any:
        raw = self._lookup_raw(key)
        if raw is None:
            raise error_for(errno.ENOENT, f"lookup map {self._name}", key_op=True)
        return self._decode_value(raw)

    def __contains__(self, key: Any) -> bool:
        return self._lookup_raw(key) is not None

    def update(self, key: Any, value: Any, flags: UpdateFlag = UpdateFlag.ANY) -> None:
        """Set ``key`` to ``value``; per-CPU maps take a list (one per CPU) or one value for all.

        Raises KeyExistsError (NOEXIST), KeyNotFoundError (EXIST) or MapFullError.
        """
        ret = _libbpf.bpf_map_update_elem(self.fd, self._keys.encode(key), self._encode_value(value), int(flags))
        check(ret, f"update map {self._name}", key_op=True)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.update(key, value)

    def delete(self, key: Any) -> None:
        """Remove ``key``; raises KeyNotFoundError when it is absent."""
        ret = _libbpf.bpf_map_delete_elem(self.fd, self._keys.encode(key))
        check(ret, f"delete from map {self._name}", key_op=True)

    def __delitem__(self, key: Any) -> None:
        self.delete(key)

    def keys(self) -> Iterator[Any]:
        """Iterate over keys with get_next_key.

        Deleting the current key of a hash map while iterating makes the kernel
        restart from the first key, so collect keys first when deleting.
        """
        prev: bytes | None = None
        buf = ctypes.create_string_buffer(self.key_size)
        while True:
            ret = _libbpf.bpf_map_get_next_key(self.fd, prev, buf)
            if ret == -errno.ENOENT:
                return
            check(ret, f"iterate map {self._name}")
            prev = buf.raw
            yield self._keys.decode(prev)

    def __iter__(self) -> Iterator[Any]:
        return self.keys()

    def items(self) -> Iterator[tuple[Any, Any]]:
        """Iterate over (key, value); keys deleted meanwhile are skipped."""
        for key in self.keys():
            raw = self._lookup_raw(key)
            if raw is not None:
                yield key, self._decode_value(raw)

    def values(self) -> Iterator[Any]:
        for _, value in self.items():
            yield value

    def update_batch(self, keys: Sequence[Any], values: Sequence[Any], flags: UpdateFlag = UpdateFlag.ANY) -> int:
        """Update many keys in one syscall; returns the number of elements written.

        The kernel's batch accepts no per-element NOEXIST/EXIST (only BPF_F_LOCK,
        whatever libbpf's header says), so with those flags, and where the map
        type has no batch support, this updates key by key. Raises like ``update``;
        the elements before the failing one stay written.
        """
        if len(keys) != len(values):
            raise ValueError(f"update_batch map {self._name}: {len(keys)} keys, {len(values)} values")
        if not keys:
            return 0
        if flags == UpdateFlag.ANY:
            key_buf = b"".join(self._keys.encode(k) for k in keys)
            value_buf = b"".join(self._encode_value(v) for v in values)
            count = ctypes.c_uint32(len(keys))
            opts = _libbpf.new_batch_opts()
            ret = _libbpf.bpf_map_update_batch(self.fd, key_buf, value_buf, ctypes.byref(count), ctypes.byref(opts))
            if ret not in (-ENOTSUPP, -errno.EOPNOTSUPP):
                check(ret, self._batch_what("update_batch", count.value, len(keys)), key_op=True)
                return count.value
        for key, value in zip(keys, values, strict=True):
            self.update(key, value, flags)
        return len(keys)

    def delete_batch(self, keys: Sequence[Any]) -> int:
        """Delete many keys in one syscall (or one by one where unsupported).

        Raises KeyNotFoundError when a key is absent; the keys before it are deleted.
        """
        if not keys:
            return 0
        key_buf = b"".join(self._keys.encode(k) for k in keys)
        count = ctypes.c_uint32(len(keys))
        opts = _libbpf.new_batch_opts()
        ret = _libbpf.bpf_map_delete_batch(self.fd, key_buf, ctypes.byref(count), ctypes.byref(opts))
        if ret in (-ENOTSUPP, -errno.EOPNOTSUPP):
            for key in keys:
                self.delete(key)
            return len(keys)
        check(ret, self._batch_what("delete_batch", count.value, len(keys)), key_op=True)
        return count.value

    def _batch_what(self, op: str, done: int, total: int) -> str:
        progress = f" (after {done} of {total} elements)" if done < total else ""
        return f"{op} map {self._name}{progress}"

    def clear(self) -> int:
        """Delete every key (hash-like maps); returns how many were deleted."""
        keys = list(self.keys())
        return self.delete_batch(keys)

    def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin the map at ``path`` (on a bpffs) so it outlives every fd; EEXIST if taken."""
        pin_fd(self.fd, path, f"map {self._name}")

    def close(self) -> None:
        """Release an owned fd (a borrowed one is left to its object). Idempotent."""
        if self._handle.owned:
            self._handle.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: builtins.type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._handle.fd}"
        return f"<Map {self._name} {self.type.name} id={self.id} {state}>"
