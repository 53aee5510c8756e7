"""Attaching XDP programs to network interfaces (netlink, kernel 4.8+).

The attachment lives in the interface, not in this process: it stays after
the Python object is dropped or the process dies, until ``close()`` or until
someone else detaches it (see ``pybpf.attachment``).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
from dataclasses import dataclass

from pybpf import _libbpf
from pybpf._fd import FdHandle
from pybpf._rtnl import ifindex
from pybpf.attachment import Attachment
from pybpf.errors import BpfError, NotSupportedError, check
from pybpf.programs import Program

__all__ = ["XdpAttachment", "XdpMode", "XdpStatus", "attach_xdp", "detach_xdp", "query_xdp"]

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4


class XdpMode(enum.Enum):
    """Where the program runs: in the driver, in the generic stack, or the best available."""

    NATIVE = XDP_FLAGS_DRV_MODE
    GENERIC = XDP_FLAGS_SKB_MODE
    OFFLOAD = XDP_FLAGS_HW_MODE
    AUTO = 0


@dataclass(frozen=True)
class XdpStatus:
    """Program ids attached to an interface, per mode (None where empty)."""

    native: int | None
    generic: int | None
    offload: int | None

    def get(self, mode: XdpMode) -> int | None:
        """The program id for one concrete mode."""
        return {
            XdpMode.NATIVE: self.native,
            XdpMode.GENERIC: self.generic,
            XdpMode.OFFLOAD: self.offload,
        }.get(mode)


def query_xdp(interface: int | str) -> XdpStatus:
    """Which XDP programs an interface runs; raises BpfError (ENODEV...)."""
    index = ifindex(interface)
    opts = _libbpf.new_xdp_query_opts()
    ret, kernel_says = _libbpf.call_netlink(_libbpf.bpf_xdp_query, index, 0, ctypes.byref(opts))
    check(ret, f"query xdp on {interface}", kernel_says=kernel_says)
    return XdpStatus(
        native=opts.drv_prog_id or None,
        generic=opts.skb_prog_id or None,
        offload=opts.hw_prog_id or None,
    )


class XdpAttachment(Attachment):
    """An XDP program attached to an interface in a known mode."""

    def __init__(self, index: int, program: Program, mode: XdpMode) -> None:
        self.ifindex = index
        self.mode = mode
        self.program_id = program.id
        self._prog = FdHandle(os.dup(program.fd), what=f"xdp program {program.name}")

    @classmethod
    def find(cls, interface: int | str, program: Program, mode: XdpMode = XdpMode.AUTO) -> XdpAttachment | None:
        """Take back the attachment of ``program`` on ``interface`` (e.g. after a restart).

        Returns None when ``program`` is not what the interface runs in ``mode``
        (AUTO: any mode). Closing the result detaches it only while it is still
        ``program`` there, like the attachment ``attach_xdp`` returned.
        """
        index = ifindex(interface)
        status = query_xdp(index)
        modes = [mode] if mode is not XdpMode.AUTO else [XdpMode.NATIVE, XdpMode.GENERIC, XdpMode.OFFLOAD]
        for concrete in modes:
            if status.get(concrete) == program.id:
                return cls(index, program, concrete)
        return None

    @property
    def attached(self) -> bool:
        """Whether our program is still the one running in our mode."""
        return not self.closed and query_xdp(self.ifindex).get(self.mode) == self.program_id

    def update(self, program: Program) -> None:
        """Run ``program`` in our place, in one step, only while ours is still there.

        The kernel swaps the programs atomically (XDP_FLAGS_REPLACE with ours as
        the expected one): no packet meets an empty hook. Raises BpfError(EEXIST)
        when someone else's program replaced ours (theirs is left), BpfError otherwise.
        """
        opts = _libbpf.new_xdp_attach_opts(self._prog.fd)
        flags = self.mode.value | XDP_FLAGS_REPLACE
        ret, kernel_says = _libbpf.call_netlink(
            _libbpf.bpf_xdp_attach, self.ifindex, program.fd, flags, ctypes.byref(opts)
        )
        what = f"replace xdp program {self.program_id} on ifindex {self.ifindex} by {program.name}"
        if ret == -errno.EEXIST:
            raise BpfError(errno.EEXIST, f"{what}: the interface no longer runs our program; left alone")
        check(ret, what, kernel_says=kernel_says)
        self._prog.close()
        self._prog = FdHandle(os.dup(program.fd), what=f"xdp program {program.name}")
        self.program_id = program.id

    def _detach(self) -> None:
        # Detach only if our program is still the one attached (XDP_FLAGS_REPLACE
        # with our fd as the expected one): a newer attachment that replaced ours
        # must survive our close(). EEXIST means "not ours any more".
        opts = _libbpf.new_xdp_attach_opts(self._prog.fd)
        flags = self.mode.value | XDP_FLAGS_REPLACE
        ret, kernel_says = _libbpf.call_netlink(_libbpf.bpf_xdp_detach, self.ifindex, flags, ctypes.byref(opts))
        self._prog.close()
        if ret not in (-errno.EEXIST, -errno.ENODEV):
            check(ret, f"detach xdp from ifindex {self.ifindex}", kernel_says=kernel_says)

    def __repr__(self) -> str:
        return f"<XdpAttachment ifindex={self.ifindex} {self.mode.name} prog={self.program_id}>"


def _attach(index: int, program: Program, mode: XdpMode, replace: bool) -> None:
    flags = mode.value | (0 if replace else XDP_FLAGS_UPDATE_IF_NOEXIST)
    ret, kernel_says = _libbpf.call_netlink(_libbpf.bpf_xdp_attach, index, program.fd, flags, None)
    what = f"attach xdp program {program.name} to ifindex {index} ({mode.name})"
    if ret == -errno.EBUSY and not replace:
        raise BpfError(errno.EBUSY, f"{what}: a program is already attached and replace=False")
    check(ret, what, kernel_says=kernel_says)


def attach_xdp(
    interface: int | str,
    program: Program,
    mode: XdpMode = XdpMode.AUTO,
    replace: bool = True,
) -> XdpAttachment:
    """Attach ``program`` to ``interface``; AUTO tries NATIVE, then GENERIC if unsupported.

    With ``replace=False`` an interface that already runs a program in that mode
    raises BpfError(EBUSY). A program in the other mode makes the kernel answer
    EEXIST. Raises NotSupportedError when the driver lacks the requested mode.
    """
    index = ifindex(interface)
    if mode is XdpMode.AUTO:
        try:
            _attach(index, program, XdpMode.NATIVE, replace)
            return XdpAttachment(index, program, XdpMode.NATIVE)
        except NotSupportedError:
            mode = XdpMode.GENERIC
    _attach(index, program, mode, replace)
    return XdpAttachment(index, program, mode)


def detach_xdp(interface: int | str, mode: XdpMode = XdpMode.AUTO) -> bool:
    """Remove the XDP program of ``mode`` (AUTO: whichever runs) whoever attached it.

    Prefer ``XdpAttachment.find(...).close()``, which removes only a given
    program; this is for clearing an interface. Returns False when no program
    was attached.
    """
    index = ifindex(interface)
    status = query_xdp(index)
    modes = [mode] if mode is not XdpMode.AUTO else [XdpMode.NATIVE, XdpMode.GENERIC, XdpMode.OFFLOAD]
    detached = False
    for concrete in modes:
        if status.get(concrete) is not None:
            ret, kernel_says = _libbpf.call_netlink(_libbpf.bpf_xdp_detach, index, concrete.value, None)
            check(ret, f"detach xdp from {interface}", kernel_says=kernel_says)
            detached = True
    return detached
