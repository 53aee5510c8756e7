"""Structs and constants the policy program shares with the policy service.

`bpf/include/weir/policy_defs.h` is generated from this module. The shared
conntrack and ipcache layouts live in services/common/datapath.py, since the
service load balancer uses them too.
"""

from __future__ import annotations

import ctypes
import sys
from enum import IntEnum

from services.common.cdefs import render_header

DEFAULT_POLICY_ENTRIES = 16384  # per endpoint, as Cilium's default policy map size
MAX_POLICY_ENDPOINTS = 4096
# The policy key's bit layout after prefixlen: dir (8), identity (32), proto (8), port (16).
PREFIX_IDENTITY = 8 + 32
PREFIX_PROTO = PREFIX_IDENTITY + 8
PREFIX_FULL = PREFIX_PROTO + 16
# policy_revisions (an array by endpoint id) holds each endpoint's policy revision: the service
# gives every change of an endpoint's map or flags a new, node-wide revision (never 0), after
# the change; the datapath caches an allow verdict in a connection's conntrack entry under it
# and looks the policy up again once it moves. Key 0 (no endpoint) holds the last one issued.
REVISION_KEY = 0


class PolicyFlag(IntEnum):
    DENY = 1


class ConfigFlag(IntEnum):
    """Per-endpoint enforcement, as computed from the rules that select it."""

    INGRESS_ENFORCED = 1
    EGRESS_ENFORCED = 2
    AUDIT = 4
    # Enforced, but no selecting rule asks for default deny (enableDefaultDeny false):
    # a packet no entry matches passes; deny entries still drop.
    INGRESS_DEFAULT_ALLOW = 8
    EGRESS_DEFAULT_ALLOW = 16


class PolicyKey(ctypes.Structure):
    """LPM key of an endpoint's policy map; identity and port in network order.

    A wildcard protocol is a prefix that stops after the identity; a port range
    is a set of port prefixes; "any identity" is identity 0, looked up second.
    """

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("dir", ctypes.c_uint8),
        ("identity", ctypes.c_uint8 * 4),
        ("proto", ctypes.c_uint8),
        ("port", ctypes.c_uint8 * 2),
    ]


class PolicyEntry(ctypes.Structure):
    """Verdict of a policy key, the L7 proxy port, the rule that decided it and hit counters."""

    _fields_ = [
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("proxy_port", ctypes.c_uint16),
        ("rule", ctypes.c_uint32),  # id of the rule behind the verdict (policy_rule_names), 0: none
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
    ]


class EndpointPolicyConfig(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32)]


CONSTANTS = {
    "POLICY_ENTRIES_DEFAULT": DEFAULT_POLICY_ENTRIES,
    "POLICY_MAX_ENDPOINTS": MAX_POLICY_ENDPOINTS,
    "POLICY_PREFIX_FULL": PREFIX_FULL,
    "POLICY_REVISION_KEY": REVISION_KEY,
}


def c_header() -> str:
    return render_header(
        "services/policy/defs.py",
        CONSTANTS,
        [PolicyFlag, ConfigFlag],
        [PolicyKey, PolicyEntry, EndpointPolicyConfig],
    )


if __name__ == "__main__":
    sys.stdout.write(c_header())
