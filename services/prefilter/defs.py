"""Structs and constants the prefilter's BPF program shares with the service.

`bpf/include/weir/prefilter_defs.h` is generated from this module.
"""

from __future__ import annotations

import ctypes
import sys
from enum import IntEnum

from services.common.cdefs import render_header
from services.common.datapath import Counter

DEFAULT_HOST_ENTRIES = 1_000_000
DEFAULT_PREFIX_ENTRIES = 64_000
GENERATIONS = 2  # the live list and the one a bulk replace is building
MAX_INTERFACES = 1024
VALID_DST_MAX = 65536  # service frontends and extra valid destinations
# Where IPv4 entries are, so a miss does not walk what is not there (services/prefilter/gates.py):
# a span per /SPAN_LEN (an array of V4_SPANS V4Span, indexed by address >> (32 - SPAN_LEN)) says which
# prefix lengths below BLOCK_LEN cover or lie in it, and (V4_SPAN_LONG) whether any /BLOCK_LEN of it
# holds entries of length BLOCK_LEN..32; such a /BLOCK_LEN has a V4Block with those lengths and the
# exact set of its addresses they cover: in the page array when its span has pages (V4Span.page,
# 256 pages from page - 1 on), else in a hash keyed by address >> (32 - BLOCK_LEN).
V4_SPAN_LEN = 16
V4_SPANS = 1 << V4_SPAN_LEN
V4_BLOCK_LEN = 24
V4_SPAN_LONG = 1 << 31
V4_BLOCKS_PER_SPAN = 1 << (V4_BLOCK_LEN - V4_SPAN_LEN)
V4_PAGES = 256 * V4_BLOCKS_PER_SPAN  # the densest 256 spans of a bulk list get pages
V4_BLOCK_HOSTS = 1 << (32 - V4_BLOCK_LEN)  # V4Block.lengths bit of /32 hosts (bit L - BLOCK_LEN for length L)


class EntryFlag(IntEnum):
    AUDIT = 1  # count, but let the packet pass


class PrefilterConfigFlag(IntEnum):
    """Bits of pf_config (key 0)."""

    VALID_DESTINATIONS = 1  # drop what is for no local endpoint, node address or frontend (INVALID_DESTINATION)


class ValidDestination(IntEnum):
    """Values of pf_valid_dst: why a prefix is a valid destination (besides the ipcache's)."""

    FRONTEND = 1  # a service frontend (from the lb service)
    EXTRA = 2  # named by the operator


class PrefilterEntry(ctypes.Structure):
    """Value of the host and prefix maps: the entry's counter index and flags."""

    _fields_ = [("id", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class LpmV4Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 4)]


class LpmV6Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


class V4Addr(ctypes.Structure):
    """Key of the IPv4 host map: the address in network order."""

    _fields_ = [("addr", ctypes.c_uint8 * 4)]


class V6Addr(ctypes.Structure):
    """Key of the IPv6 host map: the address in network order."""

    _fields_ = [("addr", ctypes.c_uint8 * 16)]


class V4Span(ctypes.Structure):
    """Value of the span array: length bits (and V4_SPAN_LONG), and 1 + the first page of its blocks (0: none)."""

    _fields_ = [("bits", ctypes.c_uint32), ("page", ctypes.c_uint32)]


class V4Block(ctypes.Structure):
    """Value of the block hash: lengths present in one /24 (bit L - 24) and the addresses they cover.

    `covered` is a bitmap of the block's 256 addresses, byte i bit j for address 8 * i + j.
    """

    _fields_ = [("lengths", ctypes.c_uint32), ("covered", ctypes.c_uint8 * ((1 << (32 - V4_BLOCK_LEN)) // 8))]


class IfStats(ctypes.Structure):
    """Totals per interface: dropped, audited (matched, passed) and passed packets."""

    _fields_ = [("dropped", Counter), ("audited", Counter), ("passed", Counter)]


CONSTANTS = {
    "PREFILTER_GENERATIONS": GENERATIONS,
    "PREFILTER_STATS_DEFAULT": DEFAULT_HOST_ENTRIES + DEFAULT_PREFIX_ENTRIES,
    "PREFILTER_MAX_INTERFACES": MAX_INTERFACES,
    "PREFILTER_VALID_DST_MAX": VALID_DST_MAX,
    "PREFILTER_V4_SPAN_LEN": V4_SPAN_LEN,
    "PREFILTER_V4_SPANS": V4_SPANS,
    "PREFILTER_V4_BLOCK_LEN": V4_BLOCK_LEN,
    "PREFILTER_V4_SPAN_LONG": V4_SPAN_LONG,
    "PREFILTER_V4_BLOCK_HOSTS": V4_BLOCK_HOSTS,
    "PREFILTER_V4_PAGES": V4_PAGES,
    "PREFILTER_V4_BLOCKS_PER_SPAN": V4_BLOCKS_PER_SPAN,
}


def c_header() -> str:
    return render_header(
        "services/prefilter/defs.py",
        CONSTANTS,
        [EntryFlag, PrefilterConfigFlag, ValidDestination],
        [PrefilterEntry, LpmV4Key, LpmV6Key, V4Addr, V6Addr, V4Span, V4Block, IfStats],
    )


if __name__ == "__main__":
    sys.stdout.write(c_header())
