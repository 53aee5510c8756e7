"""Validation of what requests name: addresses, CIDRs, ports, protocols and object names.

Every service checks its input here, before any plan or write, so the same mistake gets
the same message in every service, and the message says which field is wrong and why.
CIDRs are strict: "10.1.2.3/16" is refused (host bits set) rather than silently widened
to 10.1.0.0/16, because it is most likely a typo. Scoped IPv6 addresses ("fe80::5%eth0")
are refused everywhere: no map key can hold the scope, so the API and the datapath would
disagree about which entry it is. Whatever a message quotes from a request is cut short
(``shown``), so a huge field never becomes a huge error or log line.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

from services.common.errors import InvalidArgument

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")
K = TypeVar("K", bound=int)

# Protocol names requests use, and their IP protocol numbers.
PROTOCOL_NUMBERS = {"ICMP": 1, "TCP": 6, "UDP": 17, "ICMPV6": 58, "SCTP": 132}
# A lowercase DNS label, or several joined by dots: at most 63 characters.
NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?")
# Longest text that can be an address or a CIDR (a full IPv6 address in IPv4-mapped
# notation and "/128" is 49 characters); anything longer is refused before it is parsed.
MAX_CIDR_CHARS = 64
IFNAMSIZ = 16  # the kernel's limit, with the terminating NUL
# Longest request text quoted in an error message.
SHOWN_CHARS = 80


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """``repr(text)``, cut to about ``limit`` characters with the full length said, for messages and logs."""
    quoted = repr(text)
    if len(quoted) <= limit:
        return quoted
    return f"{quoted[:limit]}... ({len(text)} characters)"


class CidrError(ValueError):
    """A CIDR that cannot be used, with the reason in its message."""


def parse_cidr(text: str) -> Network:
    """Parse "a.b.c.d/n", "x::y/n" or a bare address (a host entry); CidrError says why not."""
    if len(text) > MAX_CIDR_CHARS:
        raise CidrError(f"{shown(text)} is not a CIDR: longer than {MAX_CIDR_CHARS} characters")
    if "%" in text:
        raise CidrError(f"{shown(text)} has a scope (%zone): a CIDR cannot name an interface; drop the %zone")
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
    """Whether a network is one address (/32, /128)."""
    return network.prefixlen == network.max_prefixlen


def cidr(text: str, where: str) -> Network:
    """A CIDR of a request field; InvalidArgument names the field."""
    try:
        return parse_cidr(text)
    except CidrError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None


def address(text: str, where: str, versions: Iterable[int] = (4, 6), unicast: bool = False) -> Address:
    """An IP address of a request field, of one of ``versions``; never scoped ("fe80::5%eth0").

    ``unicast`` also refuses what cannot be a frontend or a backend: unspecified,
    multicast, loopback, broadcast and link-local addresses (a link-local address
    means nothing off its own link, so a VIP or a backend on one cannot be reached
    from the other interfaces the service is reached through).
    """
    if len(text) > MAX_CIDR_CHARS or "%" in text:
        reason = "has a scope (%zone); drop it" if "%" in text[:MAX_CIDR_CHARS] else "is not an IP address"
        raise InvalidArgument(f"{where}: {shown(text)} {reason}")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(f"{where}: {shown(text)} is not an IP address") from None
    allowed = tuple(versions)
    if ip.version not in allowed:
        raise InvalidArgument(f"{where}: {text} is IPv{ip.version}; only IPv{' and IPv'.join(map(str, allowed))} "
                              "is accepted here")  # fmt: skip
    if unicast and (ip.is_unspecified or ip.is_multicast or ip.is_loopback):
        raise InvalidArgument(f"{where}: {text} cannot be used (unspecified, multicast or loopback)")
    if unicast and ip == ipaddress.IPv4Address("255.255.255.255"):
        raise InvalidArgument(f"{where}: {text} cannot be used (the limited broadcast address)")
    if unicast and ip.is_link_local:
        raise InvalidArgument(f"{where}: {text} cannot be used (link-local: it is only reachable on its own link)")
    return ip


def port(value: int, where: str, allow_zero: bool = False) -> int:
    """A TCP/UDP port (1-65535, or 0 when ``allow_zero`` means "any")."""
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise InvalidArgument(f"{where}: port {value} is out of range ({low}-65535)")
    return value


def protocol(text: str, where: str, allowed: Iterable[str] = ("TCP", "UDP"), default: str = "TCP") -> str:
    """A protocol name, upper-cased ("" means ``default``); refused unless in ``allowed``."""
    names = tuple(allowed)
    name = (text or default).upper()
    if name not in names:
        raise InvalidArgument(f"{where}: protocol {shown(text)} is not {' or '.join(names)}")
    return name


def protocol_number(name: str) -> int:
    """The IP protocol number of a validated protocol name."""
    return PROTOCOL_NUMBERS[name.upper()]


def name(text: str, what: str, pattern: re.Pattern[str] = NAME_RE) -> str:
    """An object name (a service, a rule): lowercase letters, digits, '-' and '.', at most 63.

    The whole text must match (``fullmatch``): "web\\n" is not "web".
    """
    if len(text) > 253 or not pattern.fullmatch(text):
        raise InvalidArgument(f"{what} name {shown(text)} is invalid: use lowercase letters, digits, '-' and '.' "
                              "(at most 63, starting and ending with a letter or digit)")  # fmt: skip
    return text


def interface(text: str, where: str = "interface") -> str:
    """A network interface name as the kernel accepts it (dev_valid_name).

    At most IFNAMSIZ-1 bytes, not "." or "..", no '/', ':', NUL or whitespace; refused
    here so a bad name is INVALID_ARGUMENT, not a confusing NOT_FOUND or an OS error.
    """
    if not text:
        raise InvalidArgument(f"{where}: an interface name is required")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > IFNAMSIZ - 1:
        raise InvalidArgument(f"{where}: interface name {shown(text)} is {size} bytes; the kernel allows at most "
                              f"{IFNAMSIZ - 1}")  # fmt: skip
    if text in (".", "..") or any(c in "/:\0" or c.isspace() for c in text):
        raise InvalidArgument(f"{where}: interface name {shown(text)} is invalid: no '/', ':', NUL or whitespace, "
                              "and not '.' or '..'")  # fmt: skip
    return text


def choice(value: K, allowed: Mapping[K, T], where: str) -> T:
    """The meaning of an enum field's number; an unknown number is refused, never mapped to a default.

    (proto3 keeps numbers it does not know, so a client built from a newer proto can
    send one; treating it as the default would silently do something else.)
    """
    if value not in allowed:
        raise InvalidArgument(f"{where}: unknown value {value}; expected one of "
                              f"{', '.join(str(v) for v in sorted(allowed))}")  # fmt: skip
    return allowed[value]


def at_most(count: int, limit: int, what: str) -> None:
    """Refuse a request carrying more than ``limit`` of something, before any work is done on it."""
    if count > limit:
        raise InvalidArgument(f"{count} {what} in one request is over the limit of {limit}; split the request")
