"""The four lists the prefilter keeps, and their raw map keys, from CIDR text without `ipaddress`.

Hosts (/32, /128) are keyed by the packed address, shorter prefixes by the LPM
key (prefix length as a little-endian u32, then the packed address). The deny list
keeps its entries by these raw keys, so a bulk load turns straight into map
buffers. Text is parsed with `inet_pton` (C); anything it does not take as a plain
canonical CIDR goes to `parse_cidr`, which accepts or explains exactly as before.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from dataclasses import dataclass

from services.common.validate import MAX_CIDR_CHARS, Network, parse_cidr
from services.prefilter.defs import LpmV4Key, LpmV6Key, V4Addr, V6Addr


@dataclass(frozen=True)
class Kind:
    """One of the four inner lists: which outer map, which key layout, which capacity."""

    outer: str
    version: int
    host: bool

    @property
    def key_type(self) -> type[ctypes.Structure]:
        if self.host:
            return V4Addr if self.version == 4 else V6Addr
        return LpmV4Key if self.version == 4 else LpmV6Key

    @property
    def address_size(self) -> int:
        return 4 if self.version == 4 else 16

    def key(self, network: Network) -> bytes:
        packed = network.network_address.packed
        if self.host:
            return packed
        return network.prefixlen.to_bytes(4, "little") + packed

    def text(self, raw: bytes) -> str:
        """The CIDR as `str(network)` writes it, without making the network (listings of 1M entries)."""
        if self.host:
            address = socket.inet_ntop(socket.AF_INET, raw) if self.version == 4 else str(ipaddress.IPv6Address(raw))
            return f"{address}/{8 * len(raw)}"
        packed = raw[4:]
        address = socket.inet_ntop(socket.AF_INET, packed) if self.version == 4 else str(ipaddress.IPv6Address(packed))
        return f"{address}/{int.from_bytes(raw[:4], 'little')}"

    def network(self, raw: bytes) -> Network:
        if self.host:
            return ipaddress.ip_network(ipaddress.ip_address(raw))
        prefixlen = int.from_bytes(raw[:4], "little")
        return ipaddress.ip_network(f"{ipaddress.ip_address(raw[4:])}/{prefixlen}")


V4_HOST = Kind("pf_v4_host", 4, True)
V6_HOST = Kind("pf_v6_host", 6, True)
V4_LPM = Kind("pf_v4_lpm", 4, False)
V6_LPM = Kind("pf_v6_lpm", 6, False)
KINDS = [V4_HOST, V6_HOST, V4_LPM, V6_LPM]
HOSTS = {4: V4_HOST, 6: V6_HOST}


def kind_of(network: Network) -> Kind:
    host = network.prefixlen == network.max_prefixlen
    return next(k for k in KINDS if k.version == network.version and k.host == host)


def _slow(text: str) -> tuple[Kind, bytes]:
    network = parse_cidr(text)  # raises CidrError with the reason
    kind = kind_of(network)
    return kind, kind.key(network)


def raw_key(text: str) -> tuple[Kind, bytes]:
    """The list and raw map key a CIDR names; CidrError (from `parse_cidr`) if it names none."""
    if len(text) > MAX_CIDR_CHARS:
        return _slow(text)
    address, slash, length = text.partition("/")
    v6 = ":" in address
    try:
        packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, address)
    except (OSError, ValueError):
        return _slow(text)
    bits = 128 if v6 else 32
    if not slash:
        prefixlen = bits
    elif length.isascii() and length.isdigit() and int(length) <= bits:
        prefixlen = int(length)
    else:
        return _slow(text)
    if prefixlen == bits:
        return (V6_HOST if v6 else V4_HOST), packed
    if int.from_bytes(packed, "big") & ((1 << (bits - prefixlen)) - 1):
        return _slow(text)  # host bits set: refused with the reason
    return (V6_LPM if v6 else V4_LPM), prefixlen.to_bytes(4, "little") + packed
