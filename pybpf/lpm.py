"""Keys for LPM_TRIE maps built from ``ipaddress`` values.

An LPM trie key is a ``__u32 prefixlen`` followed by the address bytes in
network order; these Structures have that layout, so a map typed with them
gives and takes keys that convert to and from networks.
"""

from __future__ import annotations

import ctypes
import ipaddress

__all__ = ["LpmKeyV4", "LpmKeyV6", "Network"]

Network = str | ipaddress.IPv4Network | ipaddress.IPv6Network | ipaddress.IPv4Address | ipaddress.IPv6Address


class _LpmKey(ctypes.Structure):
    _version = 0

    @classmethod
    def of(cls, network: Network) -> _LpmKey:
        """The key for a network ("10.0.0.0/8") or an address (a full-length prefix)."""
        net = ipaddress.ip_network(network, strict=False)
        if net.version != cls._version:
            raise ValueError(f"{network!s} is not an IPv{cls._version} network")
        key = cls()
        key.prefixlen = net.prefixlen
        ctypes.memmove(key.addr, net.network_address.packed, len(net.network_address.packed))
        return key

    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """The network this key stands for."""
        address = ipaddress.ip_address(bytes(self.addr))
        return ipaddress.ip_network(f"{address}/{self.prefixlen}", strict=False)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and bytes(self) == bytes(other)

    def __hash__(self) -> int:
        return hash(bytes(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.network()})"


class LpmKeyV4(_LpmKey):
    """``struct { __u32 prefixlen; __u8 addr[4]; }``"""

    _version = 4
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 4)]


class LpmKeyV6(_LpmKey):
    """``struct { __u32 prefixlen; __u8 addr[16]; }``"""

    _version = 6
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]
