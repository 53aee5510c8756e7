"""Plain dotted-quad IPv4 text to an int without the `ipaddress` module, for bulk requests.

Validating tens of thousands of addresses through `ipaddress.ip_address` costs more than
everything else a bulk upsert does. `parse_ipv4` takes only the canonical form
("10.0.0.1": four decimal octets, no leading zeros, no spaces) and returns None for
anything else, so callers fall back to the full check, which gives the error message.
"""

from __future__ import annotations

_LOOPBACK = 127 << 24
_LINK_LOCAL = (169 << 24) | (254 << 16)
_MULTICAST = 224 << 24
_BROADCAST = 0xFFFFFFFF


def parse_ipv4(text: str) -> int | None:
    """The address of a canonical dotted quad, or None when `text` is anything else."""
    parts = text.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        if not (0 < len(part) <= 3 and part.isascii() and part.isdigit()) or (len(part) > 1 and part[0] == "0"):
            return None
        octet = int(part)
        if octet > 255:
            return None
        value = value << 8 | octet
    return value


def plain_unicast(value: int) -> bool:
    """Not unspecified, loopback, link-local, multicast or the limited broadcast address."""
    return (
        value != 0
        and value >> 24 != _LOOPBACK >> 24
        and value >> 16 != _LINK_LOCAL >> 16
        and value >> 28 != _MULTICAST >> 28
        and value != _BROADCAST
    )
