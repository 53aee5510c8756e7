"""A mapping keyed by networks that stays O(1) per lookup whatever networks a client sends.

`ipaddress` hashes a network as ``int(address) ^ int(netmask)``; Python hashes a big int
modulo 2**61 - 1, which folds the 128 bits of IPv6 linearly, so ordinary host lists (and
any list a client picks to that end) share hashes by the thousand, and a dict of them
degrades to a linear scan per lookup: quadratic changes. This mapping keys by the packed
address and prefix length (bytes, hashed with the process's random SipHash key) and keeps
the network object alongside.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from typing import TypeVar

from services.common.validate import Network

V = TypeVar("V")


def network_key(network: Network) -> bytes:
    """Packed address and prefix length: equal for equal networks, distinct across families."""
    return network.network_address.packed + bytes((network.prefixlen,))


class NetworkDict(MutableMapping[Network, V]):
    """A dict from networks to values, in insertion order, hashed by `network_key`."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[Network, V]] = ()) -> None:
        self._items: dict[bytes, tuple[Network, V]] = {network_key(n): (n, v) for n, v in items}

    def __getitem__(self, network: Network) -> V:
        return self._items[network_key(network)][1]

    def __setitem__(self, network: Network, value: V) -> None:
        self._items[network_key(network)] = (network, value)

    def __delitem__(self, network: Network) -> None:
        del self._items[network_key(network)]

    def __contains__(self, network: object) -> bool:
        return hasattr(network, "network_address") and network_key(network) in self._items  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Network]:
        return (network for network, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def pairs(self) -> Iterator[tuple[Network, V]]:
        """(network, value) pairs without a lookup per pair (``items()`` does one)."""
        return iter(self._items.values())
