"""Loaded BPF programs: identity, pinning and BPF_PROG_TEST_RUN.

A ``Program`` wraps one program fd, with the same ownership rules as ``Map``:
handles from ``Program(fd)``, ``from_pin`` and ``from_id`` own their fd; those
of a ``BpfObject`` borrow it until the object closes (``clone()`` to keep one).
Closing a program fd never detaches it from a hook that holds it.
"""

from __future__ import annotations

import builtins
import ctypes
import enum
import errno
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from pybpf import _libbpf
from pybpf._fd import FdHandle, fd_kind, get_pinned, pin_fd
from pybpf.errors import BpfError, check

__all__ = ["AttachType", "ProgType", "Program", "ProgramInfo", "TestRunResult"]


class ProgType(enum.IntEnum):
    """Kernel ``enum bpf_prog_type``."""

    UNSPEC = 0
    SOCKET_FILTER = 1
    KPROBE = 2
    SCHED_CLS = 3
    SCHED_ACT = 4
    TRACEPOINT = 5
    XDP = 6
    PERF_EVENT = 7
    CGROUP_SKB = 8
    CGROUP_SOCK = 9
    LWT_IN = 10
    LWT_OUT = 11
    LWT_XMIT = 12
    SOCK_OPS = 13
    SK_SKB = 14
    CGROUP_DEVICE = 15
    SK_MSG = 16
    RAW_TRACEPOINT = 17
    CGROUP_SOCK_ADDR = 18
    LWT_SEG6LOCAL = 19
    LIRC_MODE2 = 20
    SK_REUSEPORT = 21
    FLOW_DISSECTOR = 22
    CGROUP_SYSCTL = 23
    RAW_TRACEPOINT_WRITABLE = 24
    CGROUP_SOCKOPT = 25
    TRACING = 26
    STRUCT_OPS = 27
    EXT = 28
    LSM = 29
    SK_LOOKUP = 30
    SYSCALL = 31

    @classmethod
    def _missing_(cls, value: object) -> ProgType | None:
        if not isinstance(value, int):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"UNKNOWN_{value}"
        member._value_ = value
        return member


class AttachType(enum.IntEnum):
    """Kernel ``enum bpf_attach_type`` (without the ``BPF_`` prefix)."""

    CGROUP_INET_INGRESS = 0
    CGROUP_INET_EGRESS = 1
    CGROUP_INET_SOCK_CREATE = 2
    CGROUP_SOCK_OPS = 3
    SK_SKB_STREAM_PARSER = 4
    SK_SKB_STREAM_VERDICT = 5
    CGROUP_DEVICE = 6
    SK_MSG_VERDICT = 7
    CGROUP_INET4_BIND = 8
    CGROUP_INET6_BIND = 9
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_INET4_POST_BIND = 12
    CGROUP_INET6_POST_BIND = 13
    CGROUP_UDP4_SENDMSG = 14
    CGROUP_UDP6_SENDMSG = 15
    LIRC_MODE2 = 16
    FLOW_DISSECTOR = 17
    CGROUP_SYSCTL = 18
    CGROUP_UDP4_RECVMSG = 19
    CGROUP_UDP6_RECVMSG = 20
    CGROUP_GETSOCKOPT = 21
    CGROUP_SETSOCKOPT = 22
    TRACE_RAW_TP = 23
    TRACE_FENTRY = 24
    TRACE_FEXIT = 25
    MODIFY_RETURN = 26
    LSM_MAC = 27
    TRACE_ITER = 28
    CGROUP_INET4_GETPEERNAME = 29
    CGROUP_INET6_GETPEERNAME = 30
    CGROUP_INET4_GETSOCKNAME = 31
    CGROUP_INET6_GETSOCKNAME = 32
    XDP_DEVMAP = 33
    CGROUP_INET_SOCK_RELEASE = 34
    XDP_CPUMAP = 35
    SK_LOOKUP = 36
    XDP = 37
    SK_SKB_VERDICT = 38
    SK_REUSEPORT_SELECT = 39
    SK_REUSEPORT_SELECT_OR_MIGRATE = 40
    PERF_EVENT = 41
    TRACE_KPROBE_MULTI = 42
    LSM_CGROUP = 43


@dataclass(frozen=True)
class ProgramInfo:
    """What the kernel says about a program (``struct bpf_prog_info``)."""

    type: ProgType
    id: int
    name: str
    tag: str
    run_count: int
    run_time_ns: int


def program_info(fd: int) -> ProgramInfo:
    """Read ``struct bpf_prog_info``; raises BpfError if ``fd`` is not a program."""
    if fd_kind(fd) != "bpf-prog":
        raise BpfError(errno.EINVAL, f"program info: fd {fd} is not a BPF program")
    info = _libbpf.bpf_prog_info()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(
        _libbpf.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
        f"program info of fd {fd}",
    )
    return ProgramInfo(
        type=ProgType(info.type),
        id=info.id,
        name=info.name.decode(errors="replace"),
        tag=bytes(info.tag).hex(),
        run_count=info.run_cnt,
        run_time_ns=info.run_time_ns,
    )


@dataclass(frozen=True)
class TestRunResult:
    """The outcome of BPF_PROG_TEST_RUN.

    ``retval`` is the program's return value as a signed 32-bit int; ``data`` the
    packet as the program left it; ``duration_ns`` the kernel's mean time per
    repetition; ``ctx_out`` the context given back in the type it was passed in
    (bytes or the same Structure), or None when no context was passed.
    """

    __test__ = False  # not a pytest test class despite its name

    retval: int
    data: bytes
    duration_ns: int
    ctx_out: Any = None


class Program:
    """A handle on one loaded BPF program."""

    _handle: FdHandle
    _info: ProgramInfo
    _name: str

    def __init__(self, fd: int) -> None:
        """Take ownership of ``fd`` (pass ``os.dup(fd)`` to keep yours)."""
        info = program_info(fd)
        self._setup(FdHandle(fd, what=f"program {info.name}"), info, info.name)

    @classmethod
    def from_pin(cls, path: str | os.PathLike[str]) -> Program:
        """Open a pinned program; raises BpfError (ENOENT when nothing is there)."""
        fd = get_pinned(path, "program")
        try:
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_id(cls, prog_id: int) -> Program:
        """Open a program by kernel id; raises BpfError (ENOENT when gone)."""
        return cls(check(_libbpf.bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}"))

    @classmethod
    def _wrap(cls, handle: FdHandle, name: str) -> Program:
        inst = cls.__new__(cls)
        inst._setup(handle, program_info(handle.fd), name)
        return inst

    def _setup(self, handle: FdHandle, info: ProgramInfo, name: str) -> None:
        self._handle = handle
        self._info = info
        self._name = name

    @property
    def fd(self) -> int:
        return self._handle.fd

    @property
    def name(self) -> str:
        """libbpf's name for object programs; the kernel's (at most 15 chars) otherwise."""
        return self._name

    @property
    def type(self) -> ProgType:
        return self._info.type

    @property
    def id(self) -> int:
        return self._info.id

    @property
    def tag(self) -> str:
        """The kernel's hash of the instructions, as hex."""
        return self._info.tag

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def info(self) -> ProgramInfo:
        """Fresh info from the kernel (run counts change; id, type and tag do not)."""
        return program_info(self.fd)

    def clone(self) -> Program:
        """An owned handle on a dup of the fd, usable after this one (or its object) closes."""
        return Program._wrap(FdHandle(self._handle.dup(), what=f"program {self._name}"), self._name)

    def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin the program at ``path`` on a bpffs; EEXIST if the path is taken."""
        pin_fd(self.fd, path, f"program {self._name}")

    def test_run(
        self,
        data: bytes = b"",
        *,
        repeat: int = 1,
        ctx: bytes | ctypes.Structure | None = None,
        data_out_size: int | None = None,
    ) -> TestRunResult:
        """Run the program in the kernel on ``data`` (BPF_PROG_TEST_RUN, 4.12+).

        ``data_out_size`` defaults to room for the packet plus 4 KiB of growth.
        Raises BpfError; ENOSPC when ``data_out_size`` is too small.
        """
        opts = _libbpf.new_test_run_opts()
        data_in = ctypes.create_string_buffer(bytes(data), len(data))
        out_size = len(data) + 4096 if data_out_size is None else data_out_size
        data_out = ctypes.create_string_buffer(max(out_size, 1))
        if data:
            opts.data_in = ctypes.addressof(data_in)
            opts.data_size_in = len(data)
        opts.data_out = ctypes.addressof(data_out)
        opts.data_size_out = out_size
        ctx_raw = bytes(ctx) if ctx is not None else b""
        ctx_in = ctypes.create_string_buffer(ctx_raw, len(ctx_raw))
        ctx_out = ctypes.create_string_buffer(max(len(ctx_raw), 1))
        if ctx_raw:
            opts.ctx_in = ctypes.addressof(ctx_in)
            opts.ctx_size_in = len(ctx_raw)
            opts.ctx_out = ctypes.addressof(ctx_out)
            opts.ctx_size_out = len(ctx_raw)
        opts.repeat = repeat
        check(
            _libbpf.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts)),
            f"test_run program {self._name}",
        )
        ctx_result: Any = None
        if ctx_raw:
            if isinstance(ctx, ctypes.Structure):
                ctx_result = type(ctx).from_buffer_copy(ctx_out.raw)
            else:
                ctx_result = ctx_out.raw[: opts.ctx_size_out]
        return TestRunResult(
            retval=ctypes.c_int32(opts.retval).value,
            data=data_out.raw[: opts.data_size_out],
            duration_ns=opts.duration,
            ctx_out=ctx_result,
        )

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
        return f"<Program {self._name} {self.type.name} id={self.id} {state}>"
