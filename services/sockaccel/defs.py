"""Structs and constants the socket-layer fast path shares with its service.

`bpf/include/weir/sockaccel_defs.h` is generated from this module.
"""

from __future__ import annotations

import ctypes
import sys
from enum import IntEnum

from services.common.cdefs import render_header

MAX_CONNECTIONS = 65536  # sockets in the fast path at once (two per connection)
MAX_ADDRESSES = 4096  # endpoint addresses of this node (both families)
# A redirect has no flow control of its own (the sender never waits for the receiver), so a
# socket whose peer has this many redirected bytes unread goes to TCP, whose window then
# holds the sender back. The service sets it (--max-queued) in the config map's QUEUE_LIMIT.
DEFAULT_MAX_QUEUED = 16 << 20


class NodeFlag(IntEnum):
    """Bits of the node's word in `sockaccel_config`."""

    ENABLED = 1  # new connections may be accelerated, accelerated ones keep going
    POLICY_BOUND = 2  # the policy service's maps are the ones this object reads


class ConfigIndex(IntEnum):
    """Slots of the `sockaccel_config` array."""

    NODE = 0  # the node's word (NodeFlag)
    QUEUE_LIMIT = 1  # unread redirected bytes at which a socket goes to TCP


class AddrFlag(IntEnum):
    """Bits of a local address's entry in `sockaccel_addrs`."""

    ENDPOINT = 1  # a managed endpoint (policy applies to it)
    HOST = 2  # this node's own address (a host process or the L7 proxy)
    DISABLED = 4  # the operator turned acceleration off for this endpoint


class ConnState(IntEnum):
    """What the fast path does with a socket's messages."""

    REDIRECT = 1  # hand each message to the peer socket
    FALLBACK = 2  # normal path, for good: never redirected again (keeps byte order)
    PAUSED = 3  # normal path while the peer catches up; redirects again once TCP holds nothing unread


class Role(IntEnum):
    CLIENT = 1
    SERVER = 2


class Stat(IntEnum):
    """Indexes of the per-CPU counters in `sockaccel_stats`."""

    ACCEL_STARTED = 0  # sockets that went into the fast path
    ACCEL_ENDED = 1  # sockets that left it (closed or fell back)
    MSGS_REDIRECTED = 2
    BYTES_REDIRECTED = 3
    REFUSED_POLICY = 4  # established pairs policy did not allow both ways
    REFUSED_DISABLED = 5  # established while off (node or endpoint)
    REFUSED_NOT_LOCAL = 6  # a peer that is no endpoint or host address of this node
    REFUSED_NO_POLICY = 7  # the policy maps were not bound yet
    REFUSED_FULL = 8  # the sockhash or the connection table was full
    FALLBACK_DISABLED = 9  # turned off while accelerated
    FALLBACK_POLICY = 10  # policy no longer allows the pair
    FALLBACK_PEER_GONE = 11  # the peer socket left the sockhash (closed)
    FALLBACK_NOT_READY = 12  # the first message went out before the peer was in the sockhash
    PASSED = 13  # messages that went the normal path (after a fallback)
    FALLBACK_RECEIVER_FULL = 14  # the peer left --max-queued bytes unread: paused, TCP's window takes over
    RESUMED = 15  # paused sockets that went back to redirecting


NUM_STATS = len(Stat)
FALLBACK_STATS = {
    "disabled": Stat.FALLBACK_DISABLED,
    "policy": Stat.FALLBACK_POLICY,
    "peer_gone": Stat.FALLBACK_PEER_GONE,
    "peer_not_ready": Stat.FALLBACK_NOT_READY,
    "receiver_full": Stat.FALLBACK_RECEIVER_FULL,
}
REFUSED_STATS = {
    "policy": Stat.REFUSED_POLICY,
    "disabled": Stat.REFUSED_DISABLED,
    "not_local": Stat.REFUSED_NOT_LOCAL,
    "no_policy": Stat.REFUSED_NO_POLICY,
    "full": Stat.REFUSED_FULL,
}


class SockKey(ctypes.Structure):
    """A socket by its own view of the connection: local then remote; ports in host order."""

    _fields_ = [
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("local", ctypes.c_uint8 * 16),
        ("remote", ctypes.c_uint8 * 16),
    ]


class AddrKey(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3), ("addr", ctypes.c_uint8 * 16)]


class AddrInfo(ctypes.Structure):
    """A local address: the endpoint id policy is keyed by (0 for the host) and its flags."""

    _fields_ = [("endpoint", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class Conn(ctypes.Structure):
    """One socket in the fast path: who it talks to, under which pair, and what it carried."""

    _fields_ = [
        ("state", ctypes.c_uint8),
        ("role", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),  # the Stat that ended its acceleration, 0 while redirecting
        ("pad", ctypes.c_uint8),
        ("server_port", ctypes.c_uint16),
        ("pad2", ctypes.c_uint16),
        ("client_endpoint", ctypes.c_uint32),
        ("server_endpoint", ctypes.c_uint32),
        ("client_identity", ctypes.c_uint32),
        ("server_identity", ctypes.c_uint32),
        ("cookie", ctypes.c_uint64),
        ("sk", ctypes.c_uint64),  # the socket's kernel address, for the peer's flow control (not shown)
        ("started_ns", ctypes.c_uint64),
        ("msgs", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
    ]


class StatValue(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64)]


CONSTANTS = {
    "SOCKACCEL_MAX_CONNECTIONS": MAX_CONNECTIONS,
    "SOCKACCEL_MAX_ADDRESSES": MAX_ADDRESSES,
    "SOCKACCEL_NUM_STATS": NUM_STATS,
    "SOCKACCEL_DEFAULT_MAX_QUEUED": DEFAULT_MAX_QUEUED,
}


def c_header() -> str:
    return render_header(
        "services/sockaccel/defs.py",
        CONSTANTS,
        [NodeFlag, ConfigIndex, AddrFlag, ConnState, Role, Stat],
        [SockKey, AddrKey, AddrInfo, Conn, StatValue],
    )


if __name__ == "__main__":
    sys.stdout.write(c_header())
