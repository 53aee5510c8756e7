"""Keys of the LPM tries laid out as the ipcache's (ipcache, tunnel_map, pf_valid_dst).

`IpcacheKey` (services.common.datapath) counts family and pad (32 bits) in its prefix
length before the address bits, so one trie holds IPv4 and IPv6 prefixes apart.
"""

from __future__ import annotations

import ctypes
import ipaddress
import struct

from services.common.datapath import Family, IpcacheKey
from services.common.validate import Network


def ipcache_key(network: Network) -> IpcacheKey:
    key = IpcacheKey()
    key.family = Family.INET if network.version == 4 else Family.INET6
    key.prefixlen = 32 + network.prefixlen
    packed = network.network_address.packed
    ctypes.memmove(key.addr, packed, len(packed))
    return key


_KEY = struct.Struct("=IB3x16s")  # IpcacheKey's layout (checked against it in tests)


def ipcache_key_bytes(network: Network) -> bytes:
    """`bytes(ipcache_key(network))`, packed in one call (batches of thousands of keys)."""
    family = Family.INET if network.version == 4 else Family.INET6
    return _KEY.pack(32 + network.prefixlen, family, network.network_address.packed)


def ipcache_network(key: IpcacheKey) -> Network:
    size = 4 if key.family == Family.INET else 16
    address = ipaddress.ip_address(bytes(key.addr)[:size])
    return ipaddress.ip_network(f"{address}/{key.prefixlen - 32}")
