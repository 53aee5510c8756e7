"""Strict parsing of deny-list CIDRs, with errors an operator can act on.

Unlike `ipaddress.ip_network(strict=False)`, host bits are an error, not
something to silently mask: "10.1.2.3/16" most likely means a typo, and
dropping 10.1.0.0/16 instead would surprise.
"""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class CidrError(ValueError):
    """A CIDR that cannot be used, with the reason in its message."""


def parse_cidr(text: str) -> Network:
    """Parse "a.b.c.d/n", "x::y/n" or a bare address (a host entry)."""
    try:
        return ipaddress.ip_network(text, strict=True)  # the common, valid case in one step
    except ValueError:
        return _diagnose(text)


def _diagnose(text: str) -> Network:
    """Parse what ip_network refused (or tolerated, like spaces) and say exactly why it is wrong."""
    raw = text.strip()
    if not raw:
        raise CidrError("empty CIDR")
    address, slash, length = raw.partition("/")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise CidrError(f"{text!r} is not a CIDR: {address!r} is not an IPv4 or IPv6 address") from None
    max_len: int = ip.max_prefixlen
    if not slash:
        prefixlen: int = max_len
    elif not length.isdigit():
        raise CidrError(f"{text!r}: prefix length {length!r} is not a number")
    else:
        prefixlen = int(length)
        if prefixlen > max_len:
            raise CidrError(f"{text!r}: prefix length {prefixlen} is out of range for IPv{ip.version} (0-{max_len})")
    try:
        return ipaddress.ip_network(f"{ip}/{prefixlen}", strict=True)
    except ValueError:
        network = ipaddress.ip_network(f"{ip}/{prefixlen}", strict=False)
        raise CidrError(
            f"{text!r} has host bits set: the network of {ip}/{prefixlen} is {network}; "
            "write that, or use a longer prefix"
        ) from None


def is_host(network: Network) -> bool:
    return network.prefixlen == network.max_prefixlen
