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
# IPv4 prefixes are found by length in one hash, walked longest first, and only the
# lengths present are tried: for lengths >= GATE_LEN, those present in the packet's
# /GATE_LEN (a bitmap per /GATE_LEN, keyed by the address >> (32 - GATE_LEN)); for
# shorter ones, those present at all (the bitmap at key GATE_SHORT, no /24 index),
# whose bit GATE_ANY_LONG says whether any /24 has a bitmap at all. A list without
# IPv4 prefixes has no GATE_SHORT key: one lookup and the walk is over.
V4_GATE_LEN = 24
V4_GATE_SHORT = 0xFFFFFFFF
V4_GATE_ANY_LONG = 1 << 31


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


class IfStats(ctypes.Structure):
    """Totals per interface: dropped, audited (matched, passed) and passed packets."""

    _fields_ = [("dropped", Counter), ("audited", Counter), ("passed", Counter)]


CONSTANTS = {
    "PREFILTER_GENERATIONS": GENERATIONS,
    "PREFILTER_STATS_DEFAULT": DEFAULT_HOST_ENTRIES + DEFAULT_PREFIX_ENTRIES,
    "PREFILTER_MAX_INTERFACES": MAX_INTERFACES,
    "PREFILTER_VALID_DST_MAX": VALID_DST_MAX,
    "PREFILTER_V4_GATE_LEN": V4_GATE_LEN,
    "PREFILTER_V4_GATE_SHORT": V4_GATE_SHORT,
    "PREFILTER_V4_GATE_ANY_LONG": V4_GATE_ANY_LONG,
}


def c_header() -> str:
    return render_header(
        "services/prefilter/defs.py",
        CONSTANTS,
        [EntryFlag, PrefilterConfigFlag, ValidDestination],
        [PrefilterEntry, LpmV4Key, LpmV6Key, V4Addr, V6Addr, IfStats],
    )


if __name__ == "__main__":
    sys.stdout.write(c_header())
