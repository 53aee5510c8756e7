"""Attaching SK_MSG verdict programs to a SOCKHASH/SOCKMAP.

libbpf 1.1 has no ``bpf_program__attach_sockmap``, so this uses
BPF_PROG_ATTACH with the map as target. The program stays attached to the map
(and to sockets added to the map afterwards) until ``close()`` or until the map
is freed; it is not detached when the process exits (see ``pybpf.attachment``).
"""

from __future__ import annotations

import errno
import os

from pybpf import _libbpf
from pybpf._fd import FdHandle
from pybpf.attachment import Attachment, query_programs
from pybpf.errors import check
from pybpf.maps import Map
from pybpf.programs import AttachType, Program
from pybpf.sockhash import SockHash

__all__ = ["SkMsgAttachment", "attach_sk_msg", "query_sk_msg"]


def _map_of(sockhash: SockHash | Map) -> Map:
    return sockhash.map if isinstance(sockhash, SockHash) else sockhash


class SkMsgAttachment(Attachment):
    """An SK_MSG program attached to a socket map."""

    def __init__(self, program: Program, sock_map: Map) -> None:
        self.program_id = program.id
        self.map_id = sock_map.id
        self._prog = FdHandle(os.dup(program.fd), what=f"sk_msg program {program.name}")
        self._map = FdHandle(os.dup(sock_map.fd), what=f"map {sock_map.name}")

    def _detach(self) -> None:
        ret = _libbpf.bpf_prog_detach2(self._prog.fd, self._map.fd, int(AttachType.SK_MSG_VERDICT))
        self._prog.close()
        self._map.close()
        if ret != -errno.ENOENT:
            check(ret, f"detach sk_msg program from map id {self.map_id}")

    def __repr__(self) -> str:
        return f"<SkMsgAttachment map={self.map_id} prog={self.program_id}>"


def attach_sk_msg(program: Program, sockhash: SockHash | Map) -> SkMsgAttachment:
    """Run ``program`` on every sendmsg of sockets added to ``sockhash`` from now on.

    Sockets already in the map keep the programs they had when added. Raises
    BpfError (EBUSY when another SK_MSG program is attached to the map).
    """
    sock_map = _map_of(sockhash)
    ret = _libbpf.bpf_prog_attach(program.fd, sock_map.fd, int(AttachType.SK_MSG_VERDICT), 0)
    check(ret, f"attach sk_msg program {program.name} to map {sock_map.name}")
    return SkMsgAttachment(program, sock_map)


def query_sk_msg(sockhash: SockHash | Map) -> list[int]:
    """Ids of the SK_MSG programs attached to a socket map (kernel 5.19+)."""
    sock_map = _map_of(sockhash)
    return query_programs(sock_map.fd, AttachType.SK_MSG_VERDICT, f"map {sock_map.name}")
