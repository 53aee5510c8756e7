"""BPF links (``bpf_link``): attachments owned by a file descriptor (kernel 5.7+).

Unlike the netlink and BPF_PROG_ATTACH attachments, a link lives exactly as long
as something holds it: an fd or a pin. pybpf never closes a link fd on garbage
collection (the attachment must not vanish when a Python object is dropped),
but the kernel closes it when the process exits: pin a link that must outlive
the process.
"""

from __future__ import annotations

import ctypes
import errno
import os
from types import TracebackType
from typing import Self

from pybpf import _libbpf
from pybpf._fd import FdHandle, fd_kind, get_pinned, pin_fd, unpin
from pybpf.errors import BpfError, check
from pybpf.programs import AttachType, Program

__all__ = ["Link"]

BPF_F_REPLACE = 1 << 2


class Link:
    """A handle on one bpf_link; ``close()`` releases it, ``detach()`` cuts it."""

    def __init__(self, fd: int) -> None:
        """Take ownership of a link fd; BpfError when ``fd`` is not a link."""
        if fd_kind(fd) not in ("bpf_link", "bpf-link"):  # BPF_LINK_CREATE vs BPF_OBJ_GET
            raise BpfError(errno.EINVAL, f"link: fd {fd} is not a BPF link")
        self._handle = FdHandle(fd, close_on_gc=False, what="link")
        head = self._info()
        self.id: int = head.id
        self.program_id: int = head.prog_id
        self.link_type: int = head.type
        self.pin_path: str | None = None
        cgroup = head.type == _libbpf.BPF_LINK_TYPE_CGROUP
        self.cgroup_id: int | None = head.cgroup_id if cgroup else None
        """For a cgroup link: the cgroup's id (the inode number of its cgroup2 directory)."""
        self.attach_type: AttachType | None = None
        """For a cgroup link: the hook it is attached to (None for one pybpf does not name)."""
        if cgroup and head.cgroup_attach_type in AttachType._value2member_map_:
            self.attach_type = AttachType(head.cgroup_attach_type)

    def _info(self) -> _libbpf.bpf_link_info_head:
        head = _libbpf.bpf_link_info_head()
        size = ctypes.c_uint32(ctypes.sizeof(head))
        check(
            _libbpf.bpf_obj_get_info_by_fd(self.fd, ctypes.byref(head), ctypes.byref(size)),
            f"link info of fd {self.fd}",
        )
        return head

    @classmethod
    def from_pin(cls, path: str | os.PathLike[str]) -> Link:
        """Open a pinned link; raises BpfError (ENOENT when nothing is there)."""
        fd = get_pinned(path, "link")
        try:
            link = cls(fd)
        except BaseException:
            os.close(fd)
            raise
        link.pin_path = os.fspath(path)
        return link

    @property
    def fd(self) -> int:
        return self._handle.fd

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin the link so it survives this process; EEXIST if the path is taken."""
        pin_fd(self.fd, path, f"link {self.id}")
        self.pin_path = os.fspath(path)

    def unpin(self) -> None:
        """Remove the pin made by ``pin()`` or opened by ``from_pin()``."""
        if self.pin_path is not None:
            unpin(self.pin_path, missing_ok=True)
            self.pin_path = None

    def update(self, program: Program, expected: Program | None = None) -> None:
        """Make the link run ``program`` instead, in one step (BPF_LINK_UPDATE, 5.7+).

        With ``expected`` the kernel swaps only while the link still runs that
        program (BPF_F_REPLACE), else raises BpfError(EPERM). Raises BpfError
        (EINVAL for a program of another type, ENOLINK when the link was detached).
        """
        flags, old_fd = (BPF_F_REPLACE, expected.fd) if expected is not None else (0, 0)
        opts = _libbpf.new_link_update_opts(flags, old_fd)
        check(
            _libbpf.bpf_link_update(self.fd, program.fd, ctypes.byref(opts)),
            f"update link {self.id} to program {program.name}",
        )
        self.program_id = self._info().prog_id

    def detach(self) -> None:
        """Detach the program now, even if the link is pinned (kernel 5.9+)."""
        check(_libbpf.bpf_link_detach(self.fd), f"detach link {self.id}")

    def close(self) -> None:
        """Release the fd: the program detaches unless the link is pinned. Idempotent."""
        self._handle.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        hook = f" {self.attach_type.name} cgroup={self.cgroup_id}" if self.attach_type is not None else ""
        return f"<Link id={self.id} prog={self.program_id}{hook} pin={self.pin_path}>"
