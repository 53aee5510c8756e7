"""Attaching programs to cgroup v2 hooks (sock_addr, sock_ops, skb...).

``attach_cgroup`` uses BPF_PROG_ATTACH: the attachment belongs to the cgroup and
stays after the process exits, until ``close()`` (see ``pybpf.attachment``).
``link_cgroup`` makes a ``Link`` instead, which lives only while an fd or a pin
holds it.
"""

from __future__ import annotations

import errno
import os

from pybpf import _libbpf
from pybpf._fd import FdHandle
from pybpf.attachment import Attachment, query_programs
from pybpf.errors import check
from pybpf.link import Link
from pybpf.programs import AttachType, Program

__all__ = ["CgroupAttachment", "attach_cgroup", "detach_cgroup", "link_cgroup", "query_cgroup"]

BPF_F_ALLOW_MULTI = 1 << 1


def _open_cgroup(path: str | os.PathLike[str]) -> FdHandle:
    return FdHandle(os.open(path, os.O_RDONLY | os.O_DIRECTORY), what=f"cgroup {path}")


class CgroupAttachment(Attachment):
    """A program attached to a cgroup with BPF_PROG_ATTACH."""

    def __init__(self, cgroup_path: str, program: Program, attach_type: AttachType, cgroup: FdHandle) -> None:
        self.cgroup_path = cgroup_path
        self.attach_type = attach_type
        self.program_id = program.id
        self._cgroup = cgroup
        self._prog = FdHandle(os.dup(program.fd), what=f"cgroup program {program.name}")

    @classmethod
    def find(
        cls, cgroup_path: str | os.PathLike[str], program: Program, attach_type: AttachType
    ) -> CgroupAttachment | None:
        """Take back the attachment of ``program`` to a cgroup hook (e.g. after a restart).

        Returns None when ``program`` is not attached there.
        """
        if program.id not in query_cgroup(cgroup_path, attach_type):
            return None
        return cls(os.fspath(cgroup_path), program, attach_type, _open_cgroup(cgroup_path))

    @property
    def attached(self) -> bool:
        """Whether our program is still attached to the hook."""
        return not self.closed and self.program_id in query_cgroup(self.cgroup_path, self.attach_type)

    def _detach(self) -> None:
        ret = _libbpf.bpf_prog_detach2(self._prog.fd, self._cgroup.fd, int(self.attach_type))
        self._prog.close()
        self._cgroup.close()
        if ret != -errno.ENOENT:  # already detached by someone else
            check(ret, f"detach {self.attach_type.name} from cgroup {self.cgroup_path}")

    def __repr__(self) -> str:
        return f"<CgroupAttachment {self.cgroup_path} {self.attach_type.name} prog={self.program_id}>"


def attach_cgroup(
    cgroup_path: str | os.PathLike[str],
    program: Program,
    attach_type: AttachType,
    multi: bool = True,
) -> CgroupAttachment:
    """Attach ``program`` to a cgroup v2 directory.

    ``multi`` (BPF_F_ALLOW_MULTI) lets other programs share the hook, the norm
    when several services hook the same cgroup. Raises BpfError (EINVAL when the
    program was not loaded for ``attach_type``, EPERM when the hook is taken
    without multi).
    """
    cgroup = _open_cgroup(cgroup_path)
    flags = BPF_F_ALLOW_MULTI if multi else 0
    ret = _libbpf.bpf_prog_attach(program.fd, cgroup.fd, int(attach_type), flags)
    if ret < 0:
        cgroup.close()
        check(ret, f"attach {program.name} to cgroup {os.fspath(cgroup_path)} as {attach_type.name}")
    return CgroupAttachment(os.fspath(cgroup_path), program, attach_type, cgroup)


def detach_cgroup(cgroup_path: str | os.PathLike[str], program: Program, attach_type: AttachType) -> bool:
    """Detach ``program`` from a cgroup hook without its attachment (e.g. after a restart).

    The same as ``CgroupAttachment.find(...).close()``: only ``program`` is removed.

    Returns False when it was not attached there.
    """
    cgroup = _open_cgroup(cgroup_path)
    try:
        ret = _libbpf.bpf_prog_detach2(program.fd, cgroup.fd, int(attach_type))
    finally:
        cgroup.close()
    if ret == -errno.ENOENT:
        return False
    check(ret, f"detach {program.name} from cgroup {os.fspath(cgroup_path)}")
    return True


def link_cgroup(cgroup_path: str | os.PathLike[str], program: Program, attach_type: AttachType) -> Link:
    """Attach ``program`` to a cgroup through a bpf_link (BPF_LINK_CREATE, 5.7+).

    The link detaches when its last fd closes, unless pinned (``Link.pin``); a
    pinned link is taken back after a restart with ``Link.from_pin``.
    """
    cgroup = _open_cgroup(cgroup_path)
    try:
        fd = check(
            _libbpf.bpf_link_create(program.fd, cgroup.fd, int(attach_type), None),
            f"link {program.name} to cgroup {os.fspath(cgroup_path)} as {attach_type.name}",
        )
    finally:
        cgroup.close()
    return Link(fd)


def query_cgroup(cgroup_path: str | os.PathLike[str], attach_type: AttachType) -> list[int]:
    """Ids of the programs attached (by any means) directly to a cgroup hook."""
    cgroup = _open_cgroup(cgroup_path)
    try:
        return query_programs(cgroup.fd, attach_type, f"cgroup {os.fspath(cgroup_path)}")
    finally:
        cgroup.close()
