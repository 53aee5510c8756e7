"""The datapath contract shared by the BPF C programs and the Python services.

This module is the single source of every constant and struct that both sides
use: hook points, chain slots, the `skb->cb[]` layout, drop reasons and the
layouts of the shared maps' keys and values. `bpf/include/weir/defs.h` is
generated from it (`python -m services.common.datapath`), so the two sides can
never drift apart.
"""

from __future__ import annotations

import ctypes
import sys
from enum import IntEnum

from services.common.cdefs import render_header


class Hook(IntEnum):
    """Where an entry program is attached; each hook has its own call map."""

    FROM_CONTAINER = 0  # tc ingress on the host side of an endpoint veth
    TO_CONTAINER = 1  # tc egress on the host side of an endpoint veth
    FROM_NETWORK = 2  # tc ingress on a network-facing device
    TO_NETWORK = 3  # tc egress on a network-facing device
    XDP = 4  # XDP on a network-facing device


class Slot(IntEnum):
    """Fixed indexes in every call map, in the order a packet visits them."""

    PREFILTER = 0
    LB = 1  # service translation (DNAT) before policy, so policy sees the backend
    POLICY = 2
    LB_REPLY = 3  # reverse NAT of replies, after policy has matched them to their connection
    IPSEC = 4
    L7 = 5
    CUSTOM0 = 6
    CUSTOM1 = 7


NUM_SLOTS = len(Slot)
MAX_ENDPOINTS = 65536


class Direction(IntEnum):
    """Traffic direction from the point of view of the endpoint or node."""

    INGRESS = 0
    EGRESS = 1


class CtScope(IntEnum):
    """The `dir` field of a conntrack key: who owns an entry and how its replies are found.

    Policy entries are directional (INGRESS and EGRESS equal Direction): a reply is the
    reversed tuple in the other direction. The LB's scopes have no direction: a reply is
    the reversed tuple in the same scope.
    """

    INGRESS = 0  # policy, to-container: as Direction.INGRESS
    EGRESS = 1  # policy, from-container: as Direction.EGRESS
    SERVICE = 2  # client -> frontend: which backend this connection uses
    REV_NAT = 3  # client -> backend (after DNAT): how to turn replies back into the frontend


class Family(IntEnum):
    """Address families as the kernel numbers them (AF_INET, AF_INET6), in every struct with a family."""

    INET = 2
    INET6 = 10


class IpProto(IntEnum):
    """IP protocol numbers the datapath reads: L4 protocols and the IPv6 extension headers."""

    HOPOPTS = 0  # IPv6 hop-by-hop options
    ICMP = 1
    TCP = 6
    UDP = 17
    ROUTING = 43  # IPv6 routing header
    FRAGMENT = 44  # IPv6 fragment header
    ESP = 50
    AH = 51  # authentication header: length is (hdrlen + 2) * 4 bytes
    ICMPV6 = 58
    NONE = 59  # IPv6: no next header
    DSTOPTS = 60  # IPv6 destination options
    SCTP = 132  # ports in the first 4 bytes, as TCP and UDP


class TcpFlag(IntEnum):
    """Bits of the TCP header's flags byte (offset 13)."""

    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20


HOOK_DIRECTION = {
    Hook.FROM_CONTAINER: Direction.EGRESS,
    Hook.TO_CONTAINER: Direction.INGRESS,
    Hook.FROM_NETWORK: Direction.INGRESS,
    Hook.TO_NETWORK: Direction.EGRESS,
    Hook.XDP: Direction.INGRESS,
}


class Reason(IntEnum):
    """Why a packet left the chain: 0 is forwarded, everything else is a drop."""

    FORWARDED = 0
    INVALID_PACKET = 1  # a truncated or malformed L2/L3 header
    PREFILTER_DENIED = 2
    POLICY_DENIED = 3
    POLICY_DENY_RULE = 4
    NO_SERVICE_BACKEND = 5
    CT_INVALID = 6  # conntrack cannot track it: a truncated or malformed L4 header
    UNKNOWN_ENDPOINT = 7  # an endpoint hook's packet on an interface the endpoints map does not know
    MISSED_TAIL_CALL = 8
    POLICY_AUDIT = 9  # would have been dropped by policy; the endpoint is in audit mode, so it passed
    FRAG_NOT_FOUND = 10  # a non-first fragment whose first fragment was never seen: its ports are unknown
    EXT_HDR_LIMIT = 11  # more IPv6 extension headers than the parser walks (IPV6_EXT_MAX)
    POLICY_PENDING = 12  # a new endpoint whose policy is not in its maps yet (EndpointFlag.POLICY_PENDING)
    # An L7 port's flow found no proxy listener (Envoy down or not configured yet, or an IPv6
    # flow, which the proxy does not serve): dropped, never let through unchecked.
    PROXY_UNAVAILABLE = 13
    # A packet routed into the overlay (VXLAN) device whose destination no remote node owns
    # (no tunnel_map entry): there is no node to send it to.
    NO_TUNNEL_ENDPOINT = 14
    # The prefilter's valid-destination mode: to none of a local endpoint, a node address,
    # a service frontend or a destination the operator added.
    INVALID_DESTINATION = 15
    # Encryption was asked for the destination but cannot be done (no key, a removed peer,
    # no xfrm in the kernel): dropped, never sent in plaintext.
    ENCRYPTION_UNAVAILABLE = 16
    # Strict encryption: an endpoint's packet to a node that publishes a key index (it
    # encrypts) while the ipsec service has no peer for that node yet (a node just added,
    # the service down): dropped until the peer is installed, never sent in plaintext.
    ENCRYPTION_PENDING = 17


class Cb(IntEnum):
    """Per-packet metadata between tail calls, one `skb->cb[]` word each."""

    HOOK = 0  # the Hook the packet entered through
    SLOT = 1  # the Slot currently running; the next program starts after it
    ENDPOINT = 2  # endpoint id of the interface, 0 when none
    SRC_IDENTITY = 3  # security identity of the source, 0 when unknown
    FLAGS = 4  # the chain word: the packet's call-map generation and the slots filled in it


# The chain word (Cb.FLAGS, XdpMeta.flags, and per hook in the chain_state map): bit i set
# when slot i is filled in the word's generation, CHAIN_GENERATION_BIT set for generation 1.
# Each call map holds CHAIN_GENERATIONS generations of NUM_SLOTS slots: generation g's slot s
# is index g * NUM_SLOTS + s. The entry program copies its hook's word into the packet, so a
# packet finishes in the generation it started in, whatever the orchestrator flips meanwhile.
CHAIN_GENERATIONS = 2
CHAIN_GENERATION_BIT = 1 << 8


class TcPriority(IntEnum):
    """tc filter priorities on one device (lower runs first); the orchestrator attaches by these."""

    ENTRY = 1  # the chain's entry program (from/to-container, from/to-network)
    L7_REDIRECT = 2  # the L7 proxy redirect, after the chain's verdict
    XFRM_MARK = 3  # marking packets for ESP, after policy and the redirect


class CgroupOrder(IntEnum):
    """Order of the socket-layer programs on the node's cgroup (attached in this order, multi)."""

    LB_SOCKET = 0  # connect/sendmsg/recvmsg/getpeername translation of service addresses
    SOCKACCEL = 1  # sock_ops and sk_msg fast path, on the translated addresses


XFRM_MARK_MASK = 0x0F00  # the field of skb->mark that the values below use


class XfrmMark(IntEnum):
    """Values of the skb->mark field XFRM_MARK_MASK, one owner each (ip xfrm matches on them)."""

    ENCRYPT = 0x0E00  # ipsec: send through ESP
    DECRYPT = 0x0D00  # ipsec: came in decrypted
    L7_PROXY = 0x0A00  # l7: headed to the proxy (policy routes it to the local stack)
    L7_FROM_EGRESS_PROXY = 0x0B00  # l7: Envoy's upstream for an egress listener; identity in the other bits
    L7_FROM_INGRESS_PROXY = 0x0C00  # l7: Envoy's upstream for an ingress listener (admitted before the proxy)
    OVERLAY = 0x0900  # orchestrator: came out of the VXLAN overlay; the source identity (the VNI) in the other bits


# An identity in a mark's bits outside XFRM_MARK_MASK: its low 16 bits in the mark's upper
# half, its next 8 bits in the mark's low byte: 24 bits, which every endpoint's (label)
# identity fits (CIDR identities, from FIRST_CIDR_IDENTITY, never own a proxy listener).
MARK_IDENTITY_SHIFT = 16
# The policy-routing table and rule priority that deliver packets marked L7_PROXY to the
# local stack (a `local 0.0.0.0/0 dev lo` route), where the socket they were assigned takes them.
# Remote nodes: the routes the orchestrator adds for them carry this route protocol (so
# teardown finds them), VXLAN uses Cilium's port, and tunnel_map holds one entry per remote CIDR.
NODE_ROUTE_PROTOCOL = 87
VXLAN_PORT = 8472
TUNNEL_MAX = 16384
L7_PROXY_ROUTE_TABLE = 2005
L7_PROXY_RULE_PRIORITY = 90


class EventType(IntEnum):
    """Kinds of records on the events ring buffer."""

    DROP = 1
    VERDICT = 2
    ACCEL_START = 3  # a socket went into the socket-layer fast path (sockaccel)
    ACCEL_END = 4  # a socket left it: closed, turned off, or policy changed (len = bytes it redirected)
    PROXY_REDIRECT = 5  # a new connection sent to the L7 proxy; `pad` holds the proxy port (host order)
    TRANSLATE = 6  # a new connection to a service address given a backend (nat_addr, nat_port)


class EventKind(IntEnum):
    """What an event's rate limit and counters are kept by (index of event_limits and event_stats)."""

    DROP = 0  # drops in tc programs (policy, parser, missed tail calls, ...)
    PREFILTER = 1  # drops at XDP: the line-rate path, sampled
    VERDICT = 2  # policy verdicts of new connections (allowed) and audit-mode verdicts
    TRANSLATE = 3  # LB translations of new connections
    REDIRECT = 4  # new connections sent to the L7 proxy
    ACCEL = 5  # sockets entering or leaving the socket fast path


class EventLimitFlag(IntEnum):
    """Bits of EventLimit.flags."""

    OFF = 1  # emit no event of this kind (counted as limited)


class ReservedIdentity(IntEnum):
    """Security identities with a fixed meaning; label identities start at FIRST_LABEL_IDENTITY."""

    UNKNOWN = 0  # in policy keys: any identity
    HOST = 1
    WORLD = 2
    REMOTE_NODE = 6  # another node of the cluster (Cilium's number)


FIRST_LABEL_IDENTITY = 256
FIRST_CIDR_IDENTITY = 1 << 24  # node-local CIDR identities, as Cilium numbers them


class CtFlag(IntEnum):
    """Bits of a conntrack entry's flags."""

    REPLY_SEEN = 1
    TX_CLOSING = 2  # FIN seen in the original direction
    RX_CLOSING = 4  # FIN seen in the reply direction
    RST = 8


# Seconds a conntrack entry lives after its last packet, by state (Cilium's defaults).
CT_LIFETIMES = {
    "TCP_SYN": 60,
    "TCP_ESTABLISHED": 21600,
    "TCP_CLOSE": 10,
    "NON_TCP": 60,
}


# The reason_counters map is a per-CPU array of Counters, one per (reason, direction) at
# index reason | direction << REASON_COUNTER_DIR_SHIFT: an array slot costs the datapath no
# hashing and no insert on first use, where the per-CPU hash it replaced cost ~20 ns a packet.
REASON_COUNTER_DIR_SHIFT = 8
REASON_COUNTERS = len(Direction) << REASON_COUNTER_DIR_SHIFT


class Counter(ctypes.Structure):
    """A packets/bytes pair; per-CPU in every map that holds it."""

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class EndpointFlag(IntEnum):
    """Bits of EndpointInfo.flags."""

    # Set by the orchestrator when it makes an endpoint while a policy program is in the chain,
    # cleared once the policy service says the endpoint's map is installed. Meanwhile the entry
    # programs drop the endpoint's traffic (Reason.POLICY_PENDING) whenever the hook's chain has
    # a policy slot, so no flow is admitted (and kept by conntrack) before its policy applies.
    POLICY_PENDING = 1


class EndpointInfo(ctypes.Structure):
    """Value of the endpoints map, keyed by the host-side ifindex."""

    _fields_ = [
        ("id", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class XdpMeta(ctypes.Structure):
    """What the XDP entry program puts in front of the packet (data_meta)."""

    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class Event(ctypes.Structure):
    """A record on the events ring buffer (drops, verdicts, redirects); ports in network order.

    The flow is the parser's: the protocol after every IPv6 extension header, and for a later
    fragment the ports of its datagram are 0 (the emitter does not look fragments up).
    """

    _network_order_ = ("sport", "dport", "nat_port")
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("hook", ctypes.c_uint8),
        ("ifindex", ctypes.c_uint32),
        ("endpoint", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("src_identity", ctypes.c_uint32),
        ("dst_identity", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        # The policy rule behind a verdict or drop (policy's rule id, 0 when none decided it).
        ("rule", ctypes.c_uint32),
        # TRANSLATE: the backend the connection was given (same family as daddr).
        ("nat_port", ctypes.c_uint16),
        ("pad2", ctypes.c_uint16),
        ("nat_addr", ctypes.c_uint8 * 16),
    ]


class EventLimit(ctypes.Structure):
    """Value of event_limits (one per EventKind), written by the orchestrator.

    A token bucket per CPU: at most one event per `interval_ns` on average, `burst` at once;
    `sample` N > 1 keeps one candidate in N (the first, then every N-th, per CPU) before the
    bucket. All zero: no limit.
    """

    _fields_ = [
        ("interval_ns", ctypes.c_uint64),
        ("burst", ctypes.c_uint32),
        ("sample", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class EventBucket(ctypes.Structure):
    """Value of event_buckets (per CPU, one per EventKind): the token bucket and the sampler."""

    _fields_ = [
        ("due", ctypes.c_uint64),  # when the next event is due (GCRA), coarse CLOCK_MONOTONIC ns
        ("skip", ctypes.c_uint32),  # candidates the sampler still leaves out before the next one
        ("pad", ctypes.c_uint32),
    ]


class EventStats(ctypes.Structure):
    """Value of event_stats (per CPU, one per EventKind): what became of each event to emit."""

    _fields_ = [
        ("emitted", ctypes.c_uint64),  # reserved on the ring buffer
        ("limited", ctypes.c_uint64),  # held back by the rate limit (or the kind is off)
        ("sampled_out", ctypes.c_uint64),  # not picked by the sampler
        ("lost", ctypes.c_uint64),  # the ring buffer was full
    ]


class RuleName(ctypes.Structure):
    """Value of policy_rule_names (rule id -> name): the policy service writes, flows read it."""

    _fields_ = [("name", ctypes.c_uint8 * 128)]  # RULE_NAME_MAX bytes, NUL-padded


class IpcacheKey(ctypes.Structure):
    """Key of the ipcache LPM trie: prefixlen counts family + pad (32 bits) + address bits."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("addr", ctypes.c_uint8 * 16),
    ]


class IpcacheValue(ctypes.Structure):
    _fields_ = [("identity", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class TunnelValue(ctypes.Structure):
    """Value of tunnel_map (keyed by a remote node's endpoint CIDR, as the ipcache is): where to send it."""

    _fields_ = [
        ("family", ctypes.c_uint8),  # of the remote node's underlay address
        ("key_index", ctypes.c_uint8),  # the remote node's encryption key index (0-15)
        ("node_id", ctypes.c_uint16),
        ("addr", ctypes.c_uint8 * 16),  # the remote node's underlay address, network order (IPv4 in the first 4)
    ]


class FragKey(ctypes.Structure):
    """A fragmented datagram: family, protocol, fragment id (network order) and addresses."""

    _network_order_ = ("id",)
    _fields_ = [
        ("family", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
        ("id", ctypes.c_uint32),  # IPv4: the 16-bit id in the first 2 bytes; IPv6: the 32-bit id
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
    ]


class FragPorts(ctypes.Structure):
    """The L4 ports of a fragmented datagram, from its first fragment (network order)."""

    _network_order_ = ("sport", "dport")
    _fields_ = [("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16)]


class CtKey(ctypes.Structure):
    """A connection as its owner keys it: `dir` is a CtScope; ports in network order.

    ICMP echo uses the echo id as both ports, so a reply's reversed key matches.
    """

    _network_order_ = ("sport", "dport")
    _fields_ = [
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class CtValue(ctypes.Structure):
    """State of a connection; backend_id and rev_nat_index are the load balancer's."""

    _fields_ = [
        ("expires", ctypes.c_uint64),  # CLOCK_MONOTONIC ns
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("src_identity", ctypes.c_uint32),
        ("flags", ctypes.c_uint16),
        ("rev_nat_index", ctypes.c_uint16),
        ("backend_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        # Policy's verdict cache: the (policy revision << 32 | ipcache generation) under which
        # this connection's original direction was last allowed; 0 when it never was.
        ("policy_stamp", ctypes.c_uint64),
    ]


ENUMS: list[type[IntEnum]] = [
    Hook, Slot, Direction, CtScope, Family, IpProto, TcpFlag, Reason, Cb, EventType, ReservedIdentity, CtFlag,
    EndpointFlag, XfrmMark, EventKind, EventLimitFlag,
]  # fmt: skip
STRUCTS: list[type[ctypes.Structure]] = [
    Counter, EndpointInfo, XdpMeta, Event, IpcacheKey, IpcacheValue, FragKey, FragPorts, CtKey,
    CtValue, TunnelValue, EventLimit, EventBucket, EventStats, RuleName,
]  # fmt: skip

# How often the events reader drains the ring buffer when no wake-up came (milliseconds):
# the longest an event waits before it is a flow, below EVENTS_WAKEUP_BYTES unread.
EVENTS_POLL_MS = 50

# Map sizes that both sides must agree on.
CONSTANTS = {
    "NUM_SLOTS": NUM_SLOTS,
    "NUM_HOOKS": len(Hook),
    "CHAIN_GENERATIONS": CHAIN_GENERATIONS,
    "CHAIN_GENERATION_BIT": CHAIN_GENERATION_BIT,
    "MAX_ENDPOINTS": MAX_ENDPOINTS,
    "REASON_COUNTERS": REASON_COUNTERS,
    "REASON_COUNTER_DIR_SHIFT": REASON_COUNTER_DIR_SHIFT,
    "EVENTS_BYTES": 1 << 20,
    # The reader is woken each time the unread bytes pass a multiple of this (about 680
    # events), not per event; it also drains the ring every EVENTS_POLL_MS (events.h).
    "EVENTS_WAKEUP_BYTES": 64 * 1024,
    "NUM_EVENT_KINDS": len(EventKind),
    "RULE_NAME_MAX": 128,  # bytes of a policy rule's name in policy_rule_names (NUL-padded, cut if longer)
    "RULE_NAMES_MAX": 65536,
    "IPCACHE_MAX": 512 * 1024,
    "CT_MAX": 256 * 1024,
    "FRAG_MAX": 8192,  # datagrams in flight whose first fragment was seen (Cilium's default)
    "VLAN_MAX": 2,  # 802.1Q / 802.1ad tags the parser unwraps
    "IPV6_EXT_MAX": 8,  # IPv6 extension headers the parser walks before it gives up
    "PARSE_PULL": 128,  # bytes made linear before parsing; more only when the headers go on
    "FIRST_CIDR_IDENTITY": FIRST_CIDR_IDENTITY,
    "FIRST_LABEL_IDENTITY": FIRST_LABEL_IDENTITY,
    "XFRM_MARK_MASK": XFRM_MARK_MASK,
    "MARK_IDENTITY_SHIFT": MARK_IDENTITY_SHIFT,
    "TUNNEL_MAX": TUNNEL_MAX,
    **{f"CT_LIFETIME_{name}": seconds for name, seconds in CT_LIFETIMES.items()},
}


def c_header() -> str:
    """The C header `bpf/include/weir/defs.h`."""
    return render_header("services/common/datapath.py", CONSTANTS, ENUMS, STRUCTS)


if __name__ == "__main__":
    sys.stdout.write(c_header())
