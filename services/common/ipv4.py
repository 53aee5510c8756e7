"""Plain dotted-quad IPv4 text to numbers without the `ipaddress` parser, for bulk requests.

Validating tens of thousands of addresses through `ipaddress.ip_address` costs more than
everything else a bulk upsert does. These take only the canonical form ("10.0.0.1": four
decimal octets, no leading zeros, no spaces; "10.0.0.0/8" with the host bits clear) and
return None for anything else, so callers fall back to the full check, which gives the
error message. One regular expression and `inet_aton`, both in C, do the work.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterator
from typing import Any

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_ADDRESS_RE = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
_NETWORK_RE = re.compile(rf"({_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET})/(3[0-2]|[12][0-9]|[0-9])")

_LOOPBACK = 127
_LINK_LOCAL = (169 << 8) | 254
_MULTICAST = 0xE  # 224.0.0.0/4
_BROADCAST = 0xFFFFFFFF


def parse_ipv4(text: str) -> int | None:
    """The address of a canonical dotted quad, or None when `text` is anything else."""
    if _ADDRESS_RE.fullmatch(text) is None:
        return None
    return int.from_bytes(socket.inet_aton(text), "big")


class IPv4Network(ipaddress.IPv4Network):
    """An `ipaddress.IPv4Network` that computes its hash and text once.

    The standard one computes both in Python on every dict or set operation and every
    str(), and a bulk request keys several tables by each of its thousands of prefixes.
    Equal to (and hashing as) the standard class, so both mix freely in one dict.
    """

    def __init__(self, address: Any, strict: bool = True, text: str | None = None) -> None:
        """`text`: the canonical form ("10.0.0.0/8") when the caller has it, as str() would give it.

        Takes what the standard class takes: its methods (supernet, subnets...) build this class.
        """
        super().__init__(address, strict)
        self._hash = hash(int(self.network_address) ^ int(self.netmask))
        self._text = text if text is not None else super().__str__()

    @classmethod
    def of(cls, value: int, prefixlen: int, text: str | None = None) -> IPv4Network:
        """The network `value`/`prefixlen` (host bits clear, prefixlen 0..32: the caller checked both),
        built without `ipaddress`'s constructor, which costs more than everything else a bulk request
        does per prefix. The same attributes as that constructor sets (`hosts` is a method here)."""
        network = cls.__new__(cls)
        vars(network).update(
            network_address=ipaddress.IPv4Address(value),
            netmask=_NETMASKS[prefixlen],
            _prefixlen=prefixlen,
            _hash=hash(value ^ _MASK_INTS[prefixlen]),
            _text=text if text is not None else f"{ipaddress.IPv4Address(value)}/{prefixlen}",
        )
        return network

    def hosts(self) -> Iterator[ipaddress.IPv4Address]:
        """As the standard class (which answers a list for a /32): a /31 holds two hosts, a /32 its one address."""
        if self.prefixlen == 32:
            return iter([self.network_address])
        if self.prefixlen == 31:
            return iter(self)
        return super().hosts()

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return self._text


_NETMASKS = [ipaddress.IPv4Network(f"0.0.0.0/{n}").netmask for n in range(33)]
_MASK_INTS = [int(mask) for mask in _NETMASKS]


def parse_ipv4_network(text: str) -> ipaddress.IPv4Network | None:
    """The network of a canonical "a.b.c.d/n" with no host bits set, or None for anything else."""
    match = _NETWORK_RE.fullmatch(text)
    if match is None:
        return None
    value, prefixlen = int.from_bytes(socket.inet_aton(match[1]), "big"), int(match[2])
    if value & (0xFFFFFFFF >> prefixlen):
        return None
    return IPv4Network.of(value, prefixlen, text)


def plain_unicast(value: int) -> bool:
    """Not unspecified, loopback, link-local, multicast or the limited broadcast address."""
    return (
        value != 0
        and value >> 24 != _LOOPBACK
        and value >> 16 != _LINK_LOCAL
        and value >> 28 != _MULTICAST
        and value != _BROADCAST
    )
