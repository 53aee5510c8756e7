"""Structs and constants the ipsec BPF program shares with the service.

`bpf/include/weir/ipsec_defs.h` is generated from this module. The mark layout
follows Cilium's: the XfrmMark kind in bits 8-11 (datapath.XFRM_MARK_MASK), the
key index (the ESP SPI, 1..15) in bits 12-15 and the remote node id in bits 16-31.
xfrm looks an OUT state up by its policy's mark, so each (peer, key) has its own OUT
policy and state, both on the whole mark: the SPI the program writes picks them.
"""

from __future__ import annotations

import ctypes
import sys
from enum import IntEnum

from services.common.cdefs import render_header
from services.common.datapath import XFRM_MARK_MASK, XfrmMark

SPI_SHIFT = 12
NODE_SHIFT = 16
MIN_SPI, MAX_SPI = 1, 15
MAX_NODE_ID = 0xFFFF
MAX_PEERS = 4096
MAX_PEER_CIDRS = 16384

STATE_MARK_MASK = 0xFFFF0000 | 0xF000 | XFRM_MARK_MASK  # states and OUT policies: node id, SPI and kind


class PeerFlag(IntEnum):
    """Bits of PeerCidrValue.flags."""

    # Encryption was asked for this range but no usable key or peer is there (a peer
    # removed, no key yet, a kernel without ESP): mark for encryption with node 0, which
    # only the default-drop policy matches, and drop in BPF when that policy is missing.
    BLOCK = 1


class IpsecKey(ctypes.Structure):
    """Key of the peer-CIDR LPM trie and the underlay hash: prefixlen counts family + pad + address bits."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("addr", ctypes.c_uint8 * 16),
    ]


class PeerCidrValue(ctypes.Structure):
    """Value of ipsec_cidrs: where a destination range lives and the key to reach it."""

    _fields_ = [
        ("node_id", ctypes.c_uint32),
        ("spi", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]


class UnderlayValue(ctypes.Structure):
    """Value of ipsec_underlay: the node id of a peer's underlay address (ESP from it is decrypted)."""

    _fields_ = [("node_id", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class IpsecConfig(ctypes.Structure):
    """ipsec_config[0]: whether the default-drop xfrm policy is installed (else BLOCK drops in BPF).

    `strict`: the service makes a peer of every remote node that publishes a key index
    (it follows the node table), so an endpoint's packet to such a node's range that no
    peer entry covers yet is dropped (ENCRYPTION_PENDING) rather than sent in plaintext.
    """

    _fields_ = [("xfrm_block", ctypes.c_uint32), ("strict", ctypes.c_uint32)]


class IpsecStat(IntEnum):
    """Index of ipsec_stats (per-CPU counters of the program)."""

    MARKED_ENCRYPT = 0
    MARKED_DECRYPT = 1
    BLOCKED = 2  # marked for the default-drop policy (no usable key for the range)
    DROPPED = 3  # dropped in BPF: BLOCK without the default-drop policy
    PENDING = 4  # dropped in BPF: strict, to a node with a key index that is no peer yet


CONSTANTS = {
    "IPSEC_SPI_SHIFT": SPI_SHIFT,
    "IPSEC_NODE_SHIFT": NODE_SHIFT,
    "IPSEC_MAX_PEERS": MAX_PEERS,
    "IPSEC_MAX_PEER_CIDRS": MAX_PEER_CIDRS,
    "IPSEC_NUM_STATS": len(IpsecStat),
}


def encrypt_mark(node_id: int, spi: int) -> int:
    """The skb mark that sends a packet through the state of (peer, key)."""
    return node_id << NODE_SHIFT | spi << SPI_SHIFT | XfrmMark.ENCRYPT


def decrypt_mark(node_id: int) -> int:
    """The skb mark of ESP from a peer, which its IN states match."""
    return node_id << NODE_SHIFT | XfrmMark.DECRYPT


def c_header() -> str:
    return render_header(
        "services/ipsec/defs.py",
        CONSTANTS,
        [PeerFlag, IpsecStat],
        [IpsecKey, PeerCidrValue, UnderlayValue, IpsecConfig],
    )


if __name__ == "__main__":
    sys.stdout.write(c_header())
