"""pybpf: load BPF objects, use their maps and attach their programs, over libbpf 1.1.

Usage::

    from ctypes import c_uint32, c_uint64
    import pybpf

    with pybpf.BpfObject.load_file("bpf/build/counter.o", pin_root="/sys/fs/bpf/weir") as obj:
        counts = obj.typed_map("counts", c_uint32, c_uint64)  # bound once, cached
        counts.update(7, 0, pybpf.UpdateFlag.NOEXIST)
        xdp = pybpf.attach_xdp("eth0", obj.programs["count_packets"], pybpf.XdpMode.AUTO)
        print(xdp.mode, counts.lookup_sum(7) if counts.is_percpu else counts[7])
        xdp.close()  # attachments stay until closed, even if this process dies

        tables = obj.map_of_maps("tables", c_uint32, c_uint32, c_uint32)
        old_id = tables.replace(1, {0: 10, 1: 11})  # a fresh inner map, filled, swapped in

Errors are ``pybpf.BpfError`` (an ``OSError`` with ``errno``) or a subclass that
says what happened: ``KeyNotFoundError``, ``KeyExistsError``, ``MapFullError``,
``NotSupportedError``, ``IncompatibleMapError``, ``VerifierError``.
"""

from pybpf.attachment import Attachment, query_programs
from pybpf.cgroup import CgroupAttachment, attach_cgroup, detach_cgroup, link_cgroup, query_cgroup
from pybpf.errors import (
    BpfError,
    IncompatibleMapError,
    KeyExistsError,
    KeyNotFoundError,
    MapFullError,
    NotSupportedError,
    VerifierError,
)
from pybpf.features import has_map_type, has_prog_type, require_map_type, require_prog_type
from pybpf.link import Link
from pybpf.lpm import LpmKeyV4, LpmKeyV6
from pybpf.map_of_maps import MapOfMaps
from pybpf.maps import BPF_F_INNER_MAP, Map, MapInfo, MapSpec, MapType, UpdateFlag, unpin
from pybpf.object import BpfObject, ProgramSpec
from pybpf.prog_array import ProgArray
from pybpf.programs import AttachType, Program, ProgramInfo, ProgType, TestRunResult
from pybpf.ringbuf import RingBuffer
from pybpf.skmsg import SkMsgAttachment, attach_sk_msg, query_sk_msg
from pybpf.sockhash import SockHash
from pybpf.tc import TcAttachment, TcDirection, attach_tc, detach_tc, query_tc
from pybpf.xdp import XdpAttachment, XdpMode, XdpStatus, attach_xdp, detach_xdp, query_xdp

__all__ = [
    "BPF_F_INNER_MAP",
    "AttachType",
    "Attachment",
    "BpfError",
    "BpfObject",
    "CgroupAttachment",
    "IncompatibleMapError",
    "KeyExistsError",
    "KeyNotFoundError",
    "Link",
    "LpmKeyV4",
    "LpmKeyV6",
    "Map",
    "MapFullError",
    "MapInfo",
    "MapOfMaps",
    "MapSpec",
    "MapType",
    "NotSupportedError",
    "ProgArray",
    "ProgType",
    "Program",
    "ProgramInfo",
    "ProgramSpec",
    "RingBuffer",
    "SkMsgAttachment",
    "SockHash",
    "TcAttachment",
    "TcDirection",
    "TestRunResult",
    "UpdateFlag",
    "VerifierError",
    "XdpAttachment",
    "XdpMode",
    "XdpStatus",
    "attach_cgroup",
    "attach_sk_msg",
    "attach_tc",
    "attach_xdp",
    "detach_cgroup",
    "detach_tc",
    "detach_xdp",
    "has_map_type",
    "has_prog_type",
    "link_cgroup",
    "query_cgroup",
    "query_programs",
    "query_sk_msg",
    "query_tc",
    "query_xdp",
    "require_map_type",
    "require_prog_type",
    "unpin",
]
