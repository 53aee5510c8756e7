"""The little rtnetlink pybpf needs beyond libbpf: names to ifindexes, and
whether any tc filter remains on a clsact direction (libbpf cannot list them).

Like libbpf's own netlink calls, these act in the calling thread's network
namespace.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from pybpf.errors import BpfError

_NLMSG = struct.Struct("=IHHII")  # struct nlmsghdr
_TCMSG = struct.Struct("=BxxxiIII")  # struct tcmsg
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_RTM_NEWTFILTER, _RTM_GETTFILTER = 44, 46
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300


def ifindex(interface: int | str) -> int:
    """The ifindex of an interface given by index or name; BpfError(ENODEV) if absent."""
    if isinstance(interface, int):
        return interface
    try:
        return socket.if_nametoindex(interface)
    except OSError as exc:
        raise BpfError(errno.ENODEV, f"interface {interface}: no such device") from exc


def count_tc_filters(index: int, parent: int) -> int:
    """How many tc filter messages a dump of ``parent`` on ``index`` returns."""
    header = _NLMSG.pack(_NLMSG.size + _TCMSG.size, _RTM_GETTFILTER, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
    request = header + _TCMSG.pack(socket.AF_UNSPEC, index, 0, parent, 0)
    count = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.sendall(request)
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, msg_type, _, _, _ = _NLMSG.unpack_from(data, offset)
                if msg_type == _NLMSG_DONE:
                    return count
                if msg_type == _NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, offset + _NLMSG.size)
                    if err:
                        raise BpfError(-err, f"dump tc filters: {os.strerror(-err)}")
                    return count
                if msg_type == _RTM_NEWTFILTER:
                    count += 1
                offset += (length + 3) & ~3
                if length == 0:
                    break
