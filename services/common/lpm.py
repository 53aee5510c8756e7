"""Keys of the LPM tries laid out as the ipcache's (ipcache, tunnel_map, pf_valid_dst).

`IpcacheKey` (services.common.datapath) counts family and pad (32 bits) in its prefix
length before the address bits, so one trie holds IPv4 and IPv6 prefixes apart.
"""

from __future__ import annotations

import ctypes
import ipaddress

from services.common.datapath import Family, IpcacheKey
from services.common.validate import Network


def ipcache_key(network: Network) -> IpcacheKey:
    key = IpcacheKey()
    key.family = Family.INET if network.version == 4 else Family.INET6
    key.prefixlen = 32 + network.prefixlen
    packed = network.network_address.packed
    ctypes.memmove(key.addr, packed, len(packed))
    return key


def ipcache_network(key: IpcacheKey) -> Network:
    size = 4 if key.family == Family.INET else 16
    address = ipaddress.ip_address(bytes(key.addr)[:size])
    return ipaddress.ip_network(f"{address}/{key.prefixlen - 32}")
