"""Packed batch writes: many elements of a map in one syscall, with no Python object per element.

``Map.update_batch`` encodes every key and value through its codec, which is right for a
few hundred typed elements and the bulk of the cost for a million. Here the caller hands
over keys and values already laid out back to back, as the kernel's batch wants them
(``pack_u32`` for u32s, ``bytes(array_of_structs)`` for structures, ``value_stride`` bytes
per value of a per-CPU map), and they go to libbpf 1.1's ``bpf_map_update_batch`` /
``bpf_map_delete_batch`` in chunks, so one call never pins an unbounded buffer in the kernel.
``lookup_packed`` reads a whole map the same way (``bpf_map_lookup_batch``), keys and values
back to back, where iterating with get_next_key costs two syscalls and two objects per element.

Where the map type has no batch operation (LPM tries, DEVMAP_HASH: the kernel answers
ENOTSUPP or EOPNOTSUPP) the same bytes are written element by element, and that answer is
remembered per map type so later calls go straight there. Errors raise as ``Map.update``
does; elements before a failing one stay written.
"""

from __future__ import annotations

import array
import ctypes
import errno
from collections.abc import Iterable

from pybpf import _libbpf
from pybpf.errors import ENOTSUPP, check
from pybpf.maps import Map, MapType

__all__ = ["CHUNK", "delete_packed", "lookup_packed", "pack_u32", "update_packed", "value_stride"]

Buffer = bytes | bytearray | memoryview

CHUNK = 65536
"""Elements per batch syscall: large enough that the syscalls cost nothing next to the
work, small enough that the kernel's copy of one batch stays a few megabytes."""

_UNSUPPORTED = (-ENOTSUPP, -errno.EOPNOTSUPP)
_no_update_batch: set[MapType] = set()
_no_delete_batch: set[MapType] = set()
_no_lookup_batch: set[MapType] = set()


def pack_u32(values: Iterable[int]) -> bytes:
    """Native-endian u32s back to back (the layout of a u32 key or value array)."""
    packed = array.array("I", values)
    if packed.itemsize != 4:  # pragma: no cover - every Linux ABI pybpf runs on has a 4-byte unsigned int
        packed = array.array("L", packed)
    return packed.tobytes()


def value_stride(m: Map) -> int:
    """Bytes one element's value takes in a batch buffer (every possible CPU's copy for per-CPU maps)."""
    if m.is_percpu:
        return ((m.value_size + 7) // 8 * 8) * _libbpf.possible_cpus()
    return m.value_size


def _count(m: Map, op: str, keys: Buffer, values: Buffer | None, count: int | None) -> int:
    """The number of elements, after checking that the buffers hold whole keys and values."""
    if count is None:
        if len(keys) % m.key_size:
            whole = f"a whole number of {m.key_size}-byte keys"
            raise ValueError(f"{op} map {m.name}: {len(keys)} key bytes is not {whole}")
        count = len(keys) // m.key_size
    elif len(keys) != count * m.key_size:
        raise ValueError(f"{op} map {m.name}: {len(keys)} key bytes for {count} keys of {m.key_size}")
    if values is not None and len(values) != count * value_stride(m):
        raise ValueError(f"{op} map {m.name}: {len(values)} value bytes for {count} values of {value_stride(m)}")
    return count


def update_packed(m: Map, keys: Buffer, values: Buffer, count: int | None = None, chunk: int = CHUNK) -> int:
    """Write the packed elements (``count`` of them, or as many as ``keys`` holds); returns how many.

    Like ``Map.update_batch`` with BPF_ANY: raises MapFullError and the like.
    """
    count = _count(m, "update_packed", keys, values, count)
    ksize, vsize = m.key_size, value_stride(m)
    kview, vview = memoryview(keys).cast("B"), memoryview(values).cast("B")
    done = 0
    while done < count:
        n = min(chunk, count - done)
        kpart = bytes(kview[done * ksize : (done + n) * ksize])
        vpart = bytes(vview[done * vsize : (done + n) * vsize])
        if m.type not in _no_update_batch:
            written = ctypes.c_uint32(n)
            opts = _libbpf.new_batch_opts()
            ret = _libbpf.bpf_map_update_batch(m.fd, kpart, vpart, ctypes.byref(written), ctypes.byref(opts))
            if ret not in _UNSUPPORTED:
                check(ret, _what(m, "update_packed", done + written.value, count), key_op=True)
                done += n
                continue
            _no_update_batch.add(m.type)
        for i in range(n):
            ret = _libbpf.bpf_map_update_elem(
                m.fd, kpart[i * ksize : (i + 1) * ksize], vpart[i * vsize : (i + 1) * vsize], 0
            )
            check(ret, _what(m, "update_packed", done + i, count), key_op=True)
        done += n
    return count


def delete_packed(m: Map, keys: Buffer, count: int | None = None, missing_ok: bool = False, chunk: int = CHUNK) -> int:
    """Delete the packed keys; returns how many were deleted.

    An absent key raises KeyNotFoundError (the keys before it are deleted) unless
    ``missing_ok``, which deletes the others and skips it.
    """
    count = _count(m, "delete_packed", keys, None, count)
    ksize = m.key_size
    kview = memoryview(keys).cast("B")
    deleted = 0
    done = 0
    while done < count:
        n = min(chunk, count - done)
        kpart = bytes(kview[done * ksize : (done + n) * ksize])
        if m.type not in _no_delete_batch:
            gone = ctypes.c_uint32(n)
            opts = _libbpf.new_batch_opts()
            ret = _libbpf.bpf_map_delete_batch(m.fd, kpart, ctypes.byref(gone), ctypes.byref(opts))
            if ret == 0:
                deleted += n
                done += n
                continue
            if ret in _UNSUPPORTED:
                _no_delete_batch.add(m.type)
            elif ret != -errno.ENOENT or not missing_ok:
                check(ret, _what(m, "delete_packed", done + gone.value, count), key_op=True)
            else:
                # The batch stopped at an absent key: the ones before it are gone; go on one by one.
                deleted += gone.value
                kpart = kpart[gone.value * ksize :]
                done += gone.value
                n -= gone.value
        for i in range(n):
            ret = _libbpf.bpf_map_delete_elem(m.fd, kpart[i * ksize : (i + 1) * ksize])
            if ret == -errno.ENOENT and missing_ok:
                continue
            check(ret, _what(m, "delete_packed", done + i, count), key_op=True)
            deleted += 1
        done += n
    return deleted


def lookup_packed(m: Map, chunk: int = CHUNK) -> tuple[bytes, bytes, int]:
    """Every element of the map: (keys back to back, values back to back, count).

    Values are ``value_stride(m)`` bytes each. Elements written or deleted meanwhile may or
    may not be in the answer (as with any iteration); none appears twice. Map types with no
    batch lookup are read element by element.
    """
    ksize, vsize = m.key_size, value_stride(m)
    keys, values = bytearray(), bytearray()
    if m.type in _no_lookup_batch:
        return _lookup_each(m)
    token_in = ctypes.create_string_buffer(max(ksize, 8))
    token_out = ctypes.create_string_buffer(max(ksize, 8))
    first = True
    while True:
        kbuf = ctypes.create_string_buffer(chunk * ksize)
        vbuf = ctypes.create_string_buffer(chunk * vsize)
        got = ctypes.c_uint32(chunk)
        opts = _libbpf.new_batch_opts()
        ret = _libbpf.bpf_map_lookup_batch(
            m.fd, None if first else token_in, token_out, kbuf, vbuf, ctypes.byref(got), ctypes.byref(opts)
        )
        if ret in _UNSUPPORTED and first:
            _no_lookup_batch.add(m.type)
            return _lookup_each(m)
        if ret == -errno.ENOSPC and got.value == 0:
            chunk *= 2  # one hash bucket holds more elements than a chunk
            continue
        if ret not in (0, -errno.ENOENT):
            check(ret, f"lookup_packed map {m.name} (after {len(keys) // ksize} elements)")
        keys += kbuf.raw[: got.value * ksize]
        values += vbuf.raw[: got.value * vsize]
        if ret == -errno.ENOENT:
            return bytes(keys), bytes(values), len(keys) // ksize
        ctypes.memmove(token_in, token_out, len(token_out))
        first = False


def _lookup_each(m: Map) -> tuple[bytes, bytes, int]:
    keys, values, count = bytearray(), bytearray(), 0
    value = ctypes.create_string_buffer(value_stride(m))
    key = ctypes.create_string_buffer(m.key_size)
    prev = None
    while _libbpf.bpf_map_get_next_key(m.fd, prev, key) == 0:
        if _libbpf.bpf_map_lookup_elem(m.fd, key, value) == 0:
            keys += key.raw
            values += value.raw
            count += 1
        prev = ctypes.create_string_buffer(key.raw, m.key_size)
    return bytes(keys), bytes(values), count


def _what(m: Map, op: str, done: int, total: int) -> str:
    progress = f" (after {done} of {total} elements)" if done < total else ""
    return f"{op} map {m.name}{progress}"
