"""Batched map writes from packed buffers: no Python object per element.

`Map.update_batch` encodes every key and value through its codec, which is right
for a few hundred typed elements and the bulk of the cost for a million. These
helpers take the keys and values already packed back to back (as the kernel's
batch wants them), check only the buffer sizes, and hand them to
`bpf_map_update_batch` / `bpf_map_delete_batch` in chunks. Map types without
batch support (LPM tries, for one) are written element by element from the
same buffers. Raises like `Map.update_batch`; elements before a failing one
stay written.
"""

from __future__ import annotations

import ctypes
import errno

from pybpf import _libbpf
from pybpf.errors import ENOTSUPP, check
from pybpf.maps import Map, UpdateFlag

CHUNK = 1 << 18  # elements per syscall: bounds the kernel's copy of one batch


def value_stride(m: Map) -> int:
    """Bytes one element's value takes in a batch buffer (all CPUs' copies for per-CPU maps)."""
    if m.is_percpu:
        return ((m.value_size + 7) // 8 * 8) * _libbpf.possible_cpus()
    return m.value_size


def _count(m: Map, keys: bytes | memoryview, values: bytes | memoryview | None) -> int:
    if len(keys) % m.key_size:
        raise ValueError(f"map {m.name}: {len(keys)} key bytes is not a whole number of {m.key_size}-byte keys")
    count = len(keys) // m.key_size
    if values is not None and len(values) != count * value_stride(m):
        raise ValueError(f"map {m.name}: {len(values)} value bytes for {count} keys of {value_stride(m)}-byte values")
    return count


def _unsupported(ret: int) -> bool:
    return ret in (-ENOTSUPP, -errno.EOPNOTSUPP)


def update_packed(m: Map, keys: bytes | memoryview, values: bytes | memoryview) -> int:
    """Write ``len(keys) // key_size`` elements from packed keys and values; returns how many."""
    count = _count(m, keys, values)
    ksize, vsize = m.key_size, value_stride(m)
    kview, vview = memoryview(keys).cast("B"), memoryview(values).cast("B")
    done = 0
    while done < count:
        n = min(CHUNK, count - done)
        kbuf = (ctypes.c_char * (n * ksize)).from_buffer_copy(kview[done * ksize : (done + n) * ksize])
        vbuf = (ctypes.c_char * (n * vsize)).from_buffer_copy(vview[done * vsize : (done + n) * vsize])
        written = ctypes.c_uint32(n)
        opts = _libbpf.new_batch_opts()
        ret = _libbpf.bpf_map_update_batch(m.fd, kbuf, vbuf, ctypes.byref(written), ctypes.byref(opts))
        if _unsupported(ret):
            for i in range(done, count):
                m.update(bytes(kview[i * ksize : (i + 1) * ksize]), bytes(vview[i * vsize : (i + 1) * vsize]),
                         UpdateFlag.ANY)  # fmt: skip
            return count
        check(ret, f"update_batch map {m.name} (after {done + written.value} of {count} elements)", key_op=True)
        done += n
    return count


def delete_packed(m: Map, keys: bytes | memoryview) -> int:
    """Delete the elements of packed keys; KeyNotFoundError for an absent one (those before it are gone)."""
    count = _count(m, keys, None)
    ksize = m.key_size
    kview = memoryview(keys).cast("B")
    done = 0
    while done < count:
        n = min(CHUNK, count - done)
        kbuf = (ctypes.c_char * (n * ksize)).from_buffer_copy(kview[done * ksize : (done + n) * ksize])
        deleted = ctypes.c_uint32(n)
        opts = _libbpf.new_batch_opts()
        ret = _libbpf.bpf_map_delete_batch(m.fd, kbuf, ctypes.byref(deleted), ctypes.byref(opts))
        if _unsupported(ret):
            for i in range(done, count):
                m.delete(bytes(kview[i * ksize : (i + 1) * ksize]))
            return count
        check(ret, f"delete_batch map {m.name} (after {done + deleted.value} of {count} elements)", key_op=True)
        done += n
    return count
