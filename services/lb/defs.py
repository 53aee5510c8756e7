"""Structs and constants the load balancer's BPF programs share with the service.

`bpf/include/weir/lb_defs.h` is generated from this module. Addresses are 16
bytes (IPv4 in the first 4) and ports are in network order, as on the wire.
"""

from __future__ import annotations

import ctypes
import sys
from enum import IntEnum

from services.common.cdefs import render_header

MAX_SERVICES = 65536  # frontends (a node port counts once per node address)
MAX_BACKENDS = 262144
MAX_TABLE = 131071  # largest selection table (a prime)
DEFAULT_MAGLEV_TABLE = 1021
AFFINITY_MAX = 65536
SOCK_REVNAT_MAX = 65536


class BackendState(IntEnum):
    ACTIVE = 0
    TERMINATING = 1  # keeps its connections, takes no new ones
    MAINTENANCE = 2  # takes nothing: its connections move on their next packet


class ServiceFlag(IntEnum):
    AFFINITY = 1  # session affinity by client address
    NODE_PORT = 2


class LbServiceKey(ctypes.Structure):
    _network_order_ = ("port",)
    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
    ]


class LbService(ctypes.Structure):
    _fields_ = [
        ("service_id", ctypes.c_uint32),
        ("table_size", ctypes.c_uint32),  # 0: no active backend
        ("flags", ctypes.c_uint32),
        ("affinity_timeout", ctypes.c_uint32),  # seconds
        ("rev_nat_index", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("pad2", ctypes.c_uint32),
    ]


class LbBackend(ctypes.Structure):
    _network_order_ = ("port",)
    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("state", ctypes.c_uint8),
        ("weight", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class LbRevNat(ctypes.Structure):
    """What a reply's source becomes: the frontend address and port."""

    _network_order_ = ("port",)
    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class LbAffinityKey(ctypes.Structure):
    _fields_ = [
        ("service_id", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("addr", ctypes.c_uint8 * 16),
    ]


class LbAffinity(ctypes.Structure):
    _fields_ = [("backend_id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("last_used", ctypes.c_uint64)]


class LbStats(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("new_conns", ctypes.c_uint64)]


class SockRevKey(ctypes.Structure):
    """A socket (by cookie) and the backend it talks to (IPv4)."""

    _network_order_ = ("addr", "port")
    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("addr", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class SockRev(ctypes.Structure):
    _network_order_ = ("addr", "port")
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


CONSTANTS = {
    "LB_MAX_SERVICES": MAX_SERVICES,
    "LB_MAX_BACKENDS": MAX_BACKENDS,
    "LB_MAX_TABLE": MAX_TABLE,
    "LB_AFFINITY_MAX": AFFINITY_MAX,
    "LB_SOCK_REVNAT_MAX": SOCK_REVNAT_MAX,
}


def c_header() -> str:
    return render_header(
        "services/lb/defs.py",
        CONSTANTS,
        [BackendState, ServiceFlag],
        [LbServiceKey, LbService, LbBackend, LbRevNat, LbAffinityKey, LbAffinity, LbStats, SockRevKey, SockRev],
    )


if __name__ == "__main__":
    sys.stdout.write(c_header())
