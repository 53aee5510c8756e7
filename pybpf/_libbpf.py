"""The one place that talks to libbpf.so.1 (1.1.x) through ctypes.

Every function pybpf calls is declared here with its argtypes and restype, so a
pointer is never truncated to a C int and a wrong call fails in Python, not in
libbpf. The ``*_opts`` structs mirror the 1.1 headers field for field, holes
included, because libbpf rejects an opts struct whose tail it does not know.

libbpf reports through a print callback, which is where the verifier log
arrives; ``capture_output()`` collects those messages for the calling thread so
that a failed load can quote them. Messages nobody captures go to the
``pybpf.libbpf`` logger.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
import re
import threading
from collections.abc import Iterator
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Any

_log = logging.getLogger("pybpf.libbpf")

lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(None, use_errno=True)

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8

LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2


def _sized(cls: type[Structure]) -> Any:
    """Return an instance of an opts struct with ``sz`` already set, as libbpf demands."""
    inst = cls()
    inst.sz = ctypes.sizeof(cls)
    return inst


class bpf_object_open_opts(Structure):  # noqa: N801 - the C name, on purpose
    """libbpf.h ``struct bpf_object_open_opts`` (1.1)."""

    _fields_ = [
        ("sz", c_size_t),
        ("object_name", c_char_p),
        ("relaxed_maps", c_bool),
        ("pin_root_path", c_char_p),
        ("_removed_attach_prog_fd", c_uint32),  # __u32 :32
        ("kconfig", c_char_p),
        ("btf_custom_path", c_char_p),
        ("kernel_log_buf", c_char_p),
        ("kernel_log_size", c_size_t),
        ("kernel_log_level", c_uint32),
    ]


class bpf_test_run_opts(Structure):  # noqa: N801 - the C name, on purpose
    """bpf.h ``struct bpf_test_run_opts`` (1.1)."""

    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


class bpf_map_create_opts(Structure):  # noqa: N801 - the C name, on purpose
    """bpf.h ``struct bpf_map_create_opts`` (1.1)."""

    _fields_ = [
        ("sz", c_size_t),
        ("btf_fd", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("inner_map_fd", c_uint32),
        ("map_flags", c_uint32),
        ("map_extra", c_uint64),
        ("numa_node", c_uint32),
        ("map_ifindex", c_uint32),
    ]


class bpf_map_batch_opts(Structure):  # noqa: N801 - the C name, on purpose
    """bpf.h ``struct bpf_map_batch_opts`` (1.1)."""

    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class bpf_tc_hook(Structure):  # noqa: N801 - the C name, on purpose
    """libbpf.h ``struct bpf_tc_hook`` (1.1); ends with ``size_t :0``."""

    _fields_ = [
        ("sz", c_size_t),
        ("ifindex", c_int),
        ("attach_point", c_int),
        ("parent", c_uint32),
    ]


class bpf_tc_opts(Structure):  # noqa: N801 - the C name, on purpose
    """libbpf.h ``struct bpf_tc_opts`` (1.1); ends with ``size_t :0``."""

    _fields_ = [
        ("sz", c_size_t),
        ("prog_fd", c_int),
        ("flags", c_uint32),
        ("prog_id", c_uint32),
        ("handle", c_uint32),
        ("priority", c_uint32),
    ]


class bpf_link_update_opts(Structure):  # noqa: N801 - the C name, on purpose
    """bpf.h ``struct bpf_link_update_opts`` (1.1)."""

    _fields_ = [("sz", c_size_t), ("flags", c_uint32), ("old_prog_fd", c_uint32)]


class bpf_xdp_attach_opts(Structure):  # noqa: N801 - the C name, on purpose
    """libbpf.h ``struct bpf_xdp_attach_opts`` (1.1); ends with ``size_t :0``."""

    _fields_ = [("sz", c_size_t), ("old_prog_fd", c_int)]


class bpf_xdp_query_opts(Structure):  # noqa: N801 - the C name, on purpose
    """libbpf.h ``struct bpf_xdp_query_opts`` (1.1); ends with ``size_t :0``."""

    _fields_ = [
        ("sz", c_size_t),
        ("prog_id", c_uint32),
        ("drv_prog_id", c_uint32),
        ("hw_prog_id", c_uint32),
        ("skb_prog_id", c_uint32),
        ("attach_mode", c_uint8),
    ]


class bpf_map_info(Structure):  # noqa: N801 - the C name, on purpose
    """linux/bpf.h ``struct bpf_map_info``; the kernel fills what it knows."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("btf_id", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("_pad", c_uint32),  # __u32 :32
        ("map_extra", c_uint64),
    ]


class bpf_prog_info(Structure):  # noqa: N801 - the C name, on purpose
    """linux/bpf.h ``struct bpf_prog_info`` (6.1 uapi); pointers left zero."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", c_uint8 * BPF_TAG_SIZE),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", c_uint32),
        ("gpl_compatible", c_uint32, 1),
        ("_pad0", c_uint32, 31),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("nr_jited_ksyms", c_uint32),
        ("nr_jited_func_lens", c_uint32),
        ("jited_ksyms", c_uint64),
        ("jited_func_lens", c_uint64),
        ("btf_id", c_uint32),
        ("func_info_rec_size", c_uint32),
        ("func_info", c_uint64),
        ("nr_func_info", c_uint32),
        ("nr_line_info", c_uint32),
        ("line_info", c_uint64),
        ("jited_line_info", c_uint64),
        ("nr_jited_line_info", c_uint32),
        ("line_info_rec_size", c_uint32),
        ("jited_line_info_rec_size", c_uint32),
        ("nr_prog_tags", c_uint32),
        ("prog_tags", c_uint64),
        ("run_time_ns", c_uint64),
        ("run_cnt", c_uint64),
        ("recursion_misses", c_uint64),
        ("verified_insns", c_uint32),
        ("attach_btf_obj_id", c_uint32),
        ("attach_btf_id", c_uint32),
        ("_pad1", c_uint32),  # __u32 :32
    ]


class bpf_link_info_head(Structure):  # noqa: N801 - the C name, on purpose
    """linux/bpf.h ``struct bpf_link_info`` up to its ``cgroup`` member.

    The union after ``prog_id`` is 8-byte aligned; for a cgroup link
    (BPF_LINK_TYPE_CGROUP) it holds ``{ __u64 cgroup_id; __u32 attach_type; }``.
    The kernel fills only as many bytes as it is given.
    """

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("prog_id", c_uint32),
        ("_pad", c_uint32),
        ("cgroup_id", c_uint64),
        ("cgroup_attach_type", c_uint32),
        ("_pad2", c_uint32),
    ]


BPF_LINK_TYPE_CGROUP = 3


def new_object_open_opts() -> bpf_object_open_opts:
    """Zeroed open opts with ``sz`` set."""
    opts: bpf_object_open_opts = _sized(bpf_object_open_opts)
    return opts


def new_map_create_opts(map_flags: int = 0, inner_map_fd: int = 0) -> bpf_map_create_opts:
    """Map-create opts with ``sz``, flags and (for maps of maps) the inner template set."""
    opts: bpf_map_create_opts = _sized(bpf_map_create_opts)
    opts.map_flags = map_flags
    opts.inner_map_fd = inner_map_fd
    return opts


def new_test_run_opts() -> bpf_test_run_opts:
    """Zeroed test-run opts with ``sz`` set."""
    opts: bpf_test_run_opts = _sized(bpf_test_run_opts)
    return opts


def new_batch_opts(elem_flags: int = 0) -> bpf_map_batch_opts:
    """Batch opts with ``sz`` and the per-element flags set."""
    opts: bpf_map_batch_opts = _sized(bpf_map_batch_opts)
    opts.elem_flags = elem_flags
    return opts


def new_tc_hook(ifindex: int, attach_point: int) -> bpf_tc_hook:
    """A tc hook on one clsact direction of ``ifindex``."""
    hook: bpf_tc_hook = _sized(bpf_tc_hook)
    hook.ifindex = ifindex
    hook.attach_point = attach_point
    return hook


def new_tc_opts(handle: int, priority: int, prog_fd: int = 0, flags: int = 0) -> bpf_tc_opts:
    """tc filter opts; detach and query want prog_fd, flags and prog_id zero."""
    opts: bpf_tc_opts = _sized(bpf_tc_opts)
    opts.handle, opts.priority, opts.prog_fd, opts.flags = handle, priority, prog_fd, flags
    return opts


def new_xdp_attach_opts(old_prog_fd: int = 0) -> bpf_xdp_attach_opts:
    """XDP attach opts; ``old_prog_fd`` only matters with XDP_FLAGS_REPLACE."""
    opts: bpf_xdp_attach_opts = _sized(bpf_xdp_attach_opts)
    opts.old_prog_fd = old_prog_fd
    return opts


def new_link_update_opts(flags: int = 0, old_prog_fd: int = 0) -> bpf_link_update_opts:
    """Link update opts; BPF_F_REPLACE in ``flags`` makes ``old_prog_fd`` the expected program."""
    opts: bpf_link_update_opts = _sized(bpf_link_update_opts)
    opts.flags, opts.old_prog_fd = flags, old_prog_fd
    return opts


def new_xdp_query_opts() -> bpf_xdp_query_opts:
    """Zeroed XDP query opts with ``sz`` set."""
    opts: bpf_xdp_query_opts = _sized(bpf_xdp_query_opts)
    return opts


PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
RINGBUF_SAMPLE_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)


def _declare(name: str, restype: Any, *argtypes: Any) -> Any:
    func = getattr(lib, name)
    func.restype = restype
    func.argtypes = list(argtypes)
    return func


_p = c_void_p
_u32p = POINTER(c_uint32)

libbpf_set_print = _declare("libbpf_set_print", _p, PRINT_FN)
libbpf_strerror = _declare("libbpf_strerror", c_int, c_int, c_char_p, c_size_t)
libbpf_num_possible_cpus = _declare("libbpf_num_possible_cpus", c_int)
libbpf_probe_bpf_map_type = _declare("libbpf_probe_bpf_map_type", c_int, c_int, _p)
libbpf_probe_bpf_prog_type = _declare("libbpf_probe_bpf_prog_type", c_int, c_int, _p)

bpf_object__open_file = _declare("bpf_object__open_file", _p, c_char_p, POINTER(bpf_object_open_opts))
bpf_object__load = _declare("bpf_object__load", c_int, _p)
bpf_object__close = _declare("bpf_object__close", None, _p)
bpf_object__name = _declare("bpf_object__name", c_char_p, _p)
bpf_object__next_map = _declare("bpf_object__next_map", _p, _p, _p)
bpf_object__next_program = _declare("bpf_object__next_program", _p, _p, _p)

bpf_map__name = _declare("bpf_map__name", c_char_p, _p)
bpf_map__fd = _declare("bpf_map__fd", c_int, _p)
bpf_map__type = _declare("bpf_map__type", c_int, _p)
bpf_map__key_size = _declare("bpf_map__key_size", c_uint32, _p)
bpf_map__value_size = _declare("bpf_map__value_size", c_uint32, _p)
bpf_map__max_entries = _declare("bpf_map__max_entries", c_uint32, _p)
bpf_map__set_max_entries = _declare("bpf_map__set_max_entries", c_int, _p, c_uint32)
bpf_map__map_flags = _declare("bpf_map__map_flags", c_uint32, _p)
bpf_map__map_extra = _declare("bpf_map__map_extra", c_uint64, _p)
bpf_map__is_internal = _declare("bpf_map__is_internal", c_bool, _p)
bpf_map__pin_path = _declare("bpf_map__pin_path", c_char_p, _p)
bpf_map__reuse_fd = _declare("bpf_map__reuse_fd", c_int, _p, c_int)
bpf_map__inner_map = _declare("bpf_map__inner_map", _p, _p)

bpf_program__name = _declare("bpf_program__name", c_char_p, _p)
bpf_program__section_name = _declare("bpf_program__section_name", c_char_p, _p)
bpf_program__fd = _declare("bpf_program__fd", c_int, _p)
bpf_program__type = _declare("bpf_program__type", c_int, _p)

bpf_map_lookup_elem = _declare("bpf_map_lookup_elem", c_int, c_int, _p, _p)
bpf_map_update_elem = _declare("bpf_map_update_elem", c_int, c_int, _p, _p, c_uint64)
bpf_map_delete_elem = _declare("bpf_map_delete_elem", c_int, c_int, _p)
bpf_map_get_next_key = _declare("bpf_map_get_next_key", c_int, c_int, _p, _p)
bpf_map_update_batch = _declare("bpf_map_update_batch", c_int, c_int, _p, _p, _u32p, POINTER(bpf_map_batch_opts))
bpf_map_delete_batch = _declare("bpf_map_delete_batch", c_int, c_int, _p, _u32p, POINTER(bpf_map_batch_opts))
bpf_map_lookup_batch = _declare(
    "bpf_map_lookup_batch", c_int, c_int, _p, _p, _p, _p, _u32p, POINTER(bpf_map_batch_opts)
)

bpf_obj_pin = _declare("bpf_obj_pin", c_int, c_int, c_char_p)
bpf_obj_get = _declare("bpf_obj_get", c_int, c_char_p)
bpf_obj_get_info_by_fd = _declare("bpf_obj_get_info_by_fd", c_int, c_int, _p, _u32p)
bpf_prog_get_fd_by_id = _declare("bpf_prog_get_fd_by_id", c_int, c_uint32)
bpf_map_create = _declare(
    "bpf_map_create", c_int, c_int, c_char_p, c_uint32, c_uint32, c_uint32, POINTER(bpf_map_create_opts)
)
bpf_map_get_fd_by_id = _declare("bpf_map_get_fd_by_id", c_int, c_uint32)
bpf_prog_test_run_opts = _declare("bpf_prog_test_run_opts", c_int, c_int, POINTER(bpf_test_run_opts))

bpf_xdp_attach = _declare("bpf_xdp_attach", c_int, c_int, c_int, c_uint32, POINTER(bpf_xdp_attach_opts))
bpf_xdp_detach = _declare("bpf_xdp_detach", c_int, c_int, c_uint32, POINTER(bpf_xdp_attach_opts))
bpf_xdp_query = _declare("bpf_xdp_query", c_int, c_int, c_int, POINTER(bpf_xdp_query_opts))

bpf_tc_hook_create = _declare("bpf_tc_hook_create", c_int, POINTER(bpf_tc_hook))
bpf_tc_hook_destroy = _declare("bpf_tc_hook_destroy", c_int, POINTER(bpf_tc_hook))
bpf_tc_attach = _declare("bpf_tc_attach", c_int, POINTER(bpf_tc_hook), POINTER(bpf_tc_opts))
bpf_tc_detach = _declare("bpf_tc_detach", c_int, POINTER(bpf_tc_hook), POINTER(bpf_tc_opts))
bpf_tc_query = _declare("bpf_tc_query", c_int, POINTER(bpf_tc_hook), POINTER(bpf_tc_opts))

bpf_prog_attach = _declare("bpf_prog_attach", c_int, c_int, c_int, c_int, c_uint32)
bpf_prog_detach2 = _declare("bpf_prog_detach2", c_int, c_int, c_int, c_int)
bpf_prog_query = _declare("bpf_prog_query", c_int, c_int, c_int, c_uint32, _u32p, _u32p, _u32p)
bpf_link_create = _declare("bpf_link_create", c_int, c_int, c_int, c_int, _p)
bpf_link_detach = _declare("bpf_link_detach", c_int, c_int)
bpf_link_update = _declare("bpf_link_update", c_int, c_int, c_int, POINTER(bpf_link_update_opts))

ring_buffer__new = _declare("ring_buffer__new", _p, c_int, RINGBUF_SAMPLE_FN, _p, _p)
ring_buffer__free = _declare("ring_buffer__free", None, _p)
ring_buffer__poll = _declare("ring_buffer__poll", c_int, _p, c_int)
ring_buffer__consume = _declare("ring_buffer__consume", c_int, _p)
ring_buffer__epoll_fd = _declare("ring_buffer__epoll_fd", c_int, _p)

_vsnprintf = _libc.vsnprintf
_vsnprintf.restype = c_int
_vsnprintf.argtypes = [c_void_p, c_size_t, c_char_p, c_void_p]

# A va_list reaches the callback as a pointer on these ABIs; copying the bytes
# it points to is va_copy, which lets us measure the message before printing it.
_VA_LIST_SIZE = {"x86_64": 24, "aarch64": 32}.get(platform.machine())
_FALLBACK_MESSAGE_SIZE = 1 << 20


def get_errno() -> int:
    """errno as libbpf left it (for the pointer-returning calls)."""
    return ctypes.get_errno()


def strerror(err: int) -> str:
    """libbpf's text for an errno, including its own LIBBPF_ERRNO__* codes."""
    buf = ctypes.create_string_buffer(256)
    libbpf_strerror(err, buf, len(buf))
    return buf.value.decode(errors="replace")


def _vformat(fmt: bytes, ap: int) -> str:
    if _VA_LIST_SIZE is not None:
        copy = ctypes.create_string_buffer(ctypes.string_at(ap, _VA_LIST_SIZE), _VA_LIST_SIZE)
        size = _vsnprintf(None, 0, fmt, ctypes.addressof(copy)) + 1
    else:
        size = _FALLBACK_MESSAGE_SIZE
    buf = ctypes.create_string_buffer(size)
    _vsnprintf(buf, size, fmt, ap)
    return buf.value.decode(errors="replace")


class _Captures(threading.local):
    def __init__(self) -> None:
        self.stack: list[list[str]] = []


_captures = _Captures()
_LEVELS = {LIBBPF_WARN: logging.WARNING, LIBBPF_INFO: logging.INFO, LIBBPF_DEBUG: logging.DEBUG}


def _on_print(level: int, fmt: bytes | None, ap: int | None) -> int:
    try:
        stack = _captures.stack
        py_level = _LEVELS.get(level, logging.DEBUG)
        wanted = (bool(stack) and level != LIBBPF_DEBUG) or _log.isEnabledFor(py_level)
        if not wanted or fmt is None or ap is None:
            return 0
        text = _vformat(fmt, ap)
        if stack and level != LIBBPF_DEBUG:
            stack[-1].append(text)
        else:
            _log.log(py_level, "%s", text.rstrip("\n"))
    except Exception:  # never let an exception unwind into C
        return 0
    return 0


_print_callback = PRINT_FN(_on_print)
libbpf_set_print(_print_callback)


@contextlib.contextmanager
def capture_output() -> Iterator[list[str]]:
    """Collect libbpf's messages (warnings and info) printed by this thread meanwhile."""
    messages: list[str] = []
    _captures.stack.append(messages)
    try:
        yield messages
    finally:
        _captures.stack.pop()


def possible_cpus() -> int:
    """Number of possible CPUs: per-CPU map values hold one slot for each."""
    n: int = libbpf_num_possible_cpus()
    if n <= 0:
        raise OSError(-n, f"libbpf_num_possible_cpus: {strerror(-n)}")
    return n


_EXTACK = re.compile(r"Kernel error message: (.*)")


def call_netlink(func: Any, *args: Any) -> tuple[int, str]:
    """Call a libbpf netlink function; return its result and the kernel's extack text.

    libbpf would otherwise print that text as a warning even where the caller
    expects the failure (a query that finds nothing).
    """
    with capture_output() as messages:
        ret: int = func(*args)
    notes = [m.group(1).strip() for text in messages for m in _EXTACK.finditer(text)]
    return ret, "; ".join(notes)
