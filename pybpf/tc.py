"""Attaching SCHED_CLS programs as direct-action tc filters on a clsact qdisc.

The filter lives in the interface, not in this process: it stays after the
Python object is dropped or the process dies, until ``close()`` (see
``pybpf.attachment``). The clsact qdisc is created when missing; only the
attachment that created it may remove it, and only when no filter is left on
either direction.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os

from pybpf import _libbpf
from pybpf._fd import FdHandle
from pybpf._rtnl import count_tc_filters, ifindex
from pybpf.attachment import Attachment
from pybpf.errors import BpfError, check
from pybpf.programs import Program

__all__ = ["TcAttachment", "TcDirection", "attach_tc", "detach_tc", "query_tc"]

BPF_TC_F_REPLACE = 1
_CLSACT_PARENTS = (0xFFFFFFF2, 0xFFFFFFF3)  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_{IN,E}GRESS)


class TcDirection(enum.IntEnum):
    """Which side of the clsact qdisc (libbpf's BPF_TC_INGRESS / BPF_TC_EGRESS)."""

    INGRESS = 1
    EGRESS = 2


_BOTH = int(TcDirection.INGRESS | TcDirection.EGRESS)  # the whole clsact qdisc


def query_tc(interface: int | str, direction: TcDirection, handle: int = 1, priority: int = 1) -> int | None:
    """The id of the program at (handle, priority), or None when there is none."""
    index = ifindex(interface)
    hook = _libbpf.new_tc_hook(index, int(direction))
    opts = _libbpf.new_tc_opts(handle, priority)
    ret, kernel_says = _libbpf.call_netlink(_libbpf.bpf_tc_query, ctypes.byref(hook), ctypes.byref(opts))
    # The kernel answers EINVAL when there is no clsact qdisc or no filter at that
    # priority ("Cannot find specified filter chain"), ENOENT for no such handle.
    if ret in (-errno.ENOENT, -errno.EINVAL):
        return None
    check(ret, f"query tc {direction.name.lower()} on {interface}", kernel_says=kernel_says)
    prog_id: int = opts.prog_id
    return prog_id


def detach_tc(interface: int | str, direction: TcDirection, handle: int = 1, priority: int = 1) -> bool:
    """Remove whatever filter sits at (handle, priority), whoever placed it.

    Prefer ``TcAttachment.find(...).close()``, which removes only a given
    program. Returns False when there was none. The clsact qdisc is left in place.
    """
    index = ifindex(interface)
    hook = _libbpf.new_tc_hook(index, int(direction))
    opts = _libbpf.new_tc_opts(handle, priority)
    ret, kernel_says = _libbpf.call_netlink(_libbpf.bpf_tc_detach, ctypes.byref(hook), ctypes.byref(opts))
    if ret in (-errno.ENOENT, -errno.EINVAL) and query_tc(index, direction, handle, priority) is None:
        return False
    check(ret, f"detach tc {direction.name.lower()} filter from {interface}", kernel_says=kernel_says)
    return True


def _create_clsact(index: int) -> bool:
    """Create the clsact qdisc; True if we did, False if it was already there."""
    hook = _libbpf.new_tc_hook(index, int(TcDirection.INGRESS))
    ret, kernel_says = _libbpf.call_netlink(_libbpf.bpf_tc_hook_create, ctypes.byref(hook))
    if ret == -errno.EEXIST:
        return False
    check(ret, f"create clsact qdisc on ifindex {index}", kernel_says=kernel_says)
    return True


class TcAttachment(Attachment):
    """A direct-action filter at (handle, priority) on one clsact direction."""

    def __init__(
        self,
        index: int,
        direction: TcDirection,
        handle: int,
        priority: int,
        program: Program,
        created_hook: bool,
    ) -> None:
        self.ifindex = index
        self.direction = direction
        self.handle = handle
        self.priority = priority
        self.program_id = program.id
        self.created_hook = created_hook
        self._prog = FdHandle(os.dup(program.fd), what=f"tc program {program.name}")

    @classmethod
    def find(
        cls,
        interface: int | str,
        program: Program,
        direction: TcDirection,
        handle: int = 1,
        priority: int = 1,
    ) -> TcAttachment | None:
        """Take back the filter of ``program`` at (handle, priority) (e.g. after a restart).

        Returns None when another program (or none) is there. The result never
        removes the clsact qdisc: who created it is not known any more.
        """
        index = ifindex(interface)
        if query_tc(index, direction, handle, priority) != program.id:
            return None
        return cls(index, direction, handle, priority, program, created_hook=False)

    @property
    def attached(self) -> bool:
        """Whether our program is still the filter at our (handle, priority)."""
        return not self.closed and query_tc(self.ifindex, self.direction, self.handle, self.priority) == self.program_id

    def update(self, program: Program) -> None:
        """Run ``program`` at our (handle, priority) instead of ours, in one step.

        The filter's program is replaced in place (tc's replace), so no packet
        meets an empty hook. Raises BpfError(EEXIST) when the filter there no
        longer runs our program (theirs is left): the check and the replace are
        two netlink calls, so a writer racing between them is not caught.
        """
        what = f"replace tc program {self.program_id} on ifindex {self.ifindex} by {program.name}"
        if not self.attached:
            raise BpfError(errno.EEXIST, f"{what}: the filter no longer runs our program; left alone")
        hook = _libbpf.new_tc_hook(self.ifindex, int(self.direction))
        opts = _libbpf.new_tc_opts(self.handle, self.priority, program.fd, BPF_TC_F_REPLACE)
        ret, kernel_says = _libbpf.call_netlink(_libbpf.bpf_tc_attach, ctypes.byref(hook), ctypes.byref(opts))
        check(ret, what, kernel_says=kernel_says)
        self._prog.close()
        self._prog = FdHandle(os.dup(program.fd), what=f"tc program {program.name}")
        self.program_id = program.id

    def _detach(self) -> None:
        self._prog.close()
        try:
            self._remove_filter()
            if self.created_hook:
                self._remove_hook_if_unused()
        except BpfError as exc:
            if exc.errno != errno.ENODEV:  # the interface is gone, and its filters with it
                raise

    def _remove_filter(self) -> None:
        # A filter that another attachment replaced is no longer ours to remove.
        if query_tc(self.ifindex, self.direction, self.handle, self.priority) != self.program_id:
            return
        hook = _libbpf.new_tc_hook(self.ifindex, int(self.direction))
        opts = _libbpf.new_tc_opts(self.handle, self.priority)
        ret, kernel_says = _libbpf.call_netlink(_libbpf.bpf_tc_detach, ctypes.byref(hook), ctypes.byref(opts))
        if ret != -errno.ENOENT:
            check(ret, f"detach tc filter from ifindex {self.ifindex}", kernel_says=kernel_says)

    def _remove_hook_if_unused(self) -> None:
        if any(count_tc_filters(self.ifindex, parent) for parent in _CLSACT_PARENTS):
            return
        hook = _libbpf.new_tc_hook(self.ifindex, _BOTH)
        ret, kernel_says = _libbpf.call_netlink(_libbpf.bpf_tc_hook_destroy, ctypes.byref(hook))
        if ret not in (-errno.ENOENT, -errno.EINVAL):
            check(ret, f"destroy clsact qdisc on ifindex {self.ifindex}", kernel_says=kernel_says)

    def __repr__(self) -> str:
        return (
            f"<TcAttachment ifindex={self.ifindex} {self.direction.name} "
            f"handle={self.handle} priority={self.priority} prog={self.program_id}>"
        )


def attach_tc(
    interface: int | str,
    program: Program,
    direction: TcDirection,
    handle: int = 1,
    priority: int = 1,
    replace: bool = True,
) -> TcAttachment:
    """Attach ``program`` as a direct-action filter, creating clsact if needed.

    With ``replace=False`` an existing filter at (handle, priority) raises
    BpfError(EEXIST); with ``replace=True`` it is replaced in place. A handle
    or priority of 0 lets the kernel choose; the attachment records what it got.
    """
    index = ifindex(interface)
    created = _create_clsact(index)
    hook = _libbpf.new_tc_hook(index, int(direction))
    flags = BPF_TC_F_REPLACE if replace else 0
    opts = _libbpf.new_tc_opts(handle, priority, program.fd, flags)
    what = f"attach tc program {program.name} to {interface} {direction.name.lower()}"
    ret, kernel_says = _libbpf.call_netlink(_libbpf.bpf_tc_attach, ctypes.byref(hook), ctypes.byref(opts))
    if ret < 0:
        if created:
            _libbpf.call_netlink(_libbpf.bpf_tc_hook_destroy, ctypes.byref(_libbpf.new_tc_hook(index, _BOTH)))
        if ret == -errno.EEXIST:
            raise BpfError(
                errno.EEXIST,
                f"{what}: a filter exists at handle {handle} priority {priority} and replace=False",
            )
        check(ret, what, kernel_says=kernel_says)
    return TcAttachment(index, direction, opts.handle, opts.priority, program, created)
