"""The ipcache: the security identity of every address the node knows, as an LPM trie.

The orchestrator is its only writer (objects read it under globals/). `Ipcache` keeps
what it wrote, so a change writes only the difference and knows which prefixes map to
an identity. A restarted orchestrator `reconcile`s the pinned map with what it wants:
add and change first, remove last, so an address never falls back to world in between.
After every change it bumps the ipcache's generation (the `ipcache_generation` map), which
tells the policy datapath that the verdicts it cached before are stale.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import struct
import time

from pyroute2 import IPRoute

from pybpf import KeyNotFoundError, Map
from pybpf.batch import update_packed
from services.common.datapath import IpcacheKey, IpcacheValue
from services.common.lpm import ipcache_key as ipcache_key
from services.common.lpm import ipcache_key_bytes
from services.common.lpm import ipcache_network as ipcache_network
from services.common.validate import Network

AF_INET, AF_INET6 = 2, 10
_VALUE = struct.Struct("=II")  # IpcacheValue: identity, flags
_NONE: frozenset[Network] = frozenset()


def host_addresses() -> list[Network]:
    """Every address of this (the node's) network namespace, as host routes."""
    with IPRoute() as ipr:
        addresses = [str(a.get("address")) for a in ipr.get_addr()]
    return [ipaddress.ip_network(a) for a in addresses if a and a != "None"]


class Ipcache:
    """The pinned ipcache map and what this process wrote to it."""

    def __init__(self, ipcache: Map, generation: Map) -> None:
        """`generation` is the pinned `ipcache_generation` map beside the ipcache."""
        self._map = ipcache.typed(IpcacheKey, IpcacheValue)
        self._generation = generation.typed(ctypes.c_uint32, ctypes.c_uint32)
        self._entries: dict[Network, int] = {}
        self._by_identity: dict[int, set[Network]] = {}

    def read(self) -> dict[Network, int]:
        """What the map holds now (a previous run's entries, right after start)."""
        return {ipcache_network(k): int(v.identity) for k, v in self._map.items()}

    def _bump(self) -> None:
        """Move the generation on (after the change it announces; never to 0)."""
        last = int(self._generation.lookup(0) or 0)
        if last == 0:  # start from the boot clock, past what a lost map's conntrack stamps may hold
            last = time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000_000
        self._generation.update(0, last % 0xFFFFFFFF + 1)

    def reconcile(self, wanted: dict[Network, int]) -> None:
        """Make the map hold exactly `wanted` (adds and changes before removals)."""
        current = self.read()
        for network, identity in wanted.items():
            if current.get(network) != identity:
                self._map.update(ipcache_key(network), IpcacheValue(identity, 0))
        for network in current.keys() - wanted.keys():
            with contextlib.suppress(KeyNotFoundError):
                self._map.delete(ipcache_key(network))
        self._bump()
        self._entries = dict(wanted)
        self._by_identity = {}
        for network, identity in wanted.items():
            self._by_identity.setdefault(identity, set()).add(network)

    def get(self, network: Network) -> int | None:
        return self._entries.get(network)

    def put(self, network: Network, identity: int) -> None:
        old = self._entries.get(network)
        if old == identity:
            return
        self._map.update(ipcache_key(network), IpcacheValue(identity, 0))
        self._bump()
        self._entries[network] = identity
        if old is not None:
            self._by_identity[old].discard(network)
        self._by_identity.setdefault(identity, set()).add(network)

    def put_many(self, items: list[tuple[Network, int]]) -> None:
        """`put` for many networks: the changed entries in one batch, one generation bump for all."""
        changed = [(n, i) for n, i in dict(items).items() if self._entries.get(n) != i]
        if not changed:
            return
        keys = b"".join([ipcache_key_bytes(n) for n, _ in changed])
        values = b"".join([_VALUE.pack(i, 0) for _, i in changed])
        update_packed(self._map, keys, values, len(changed))
        self._bump()
        for network, identity in changed:
            old = self._entries.get(network)
            self._entries[network] = identity
            if old is not None:
                self._by_identity[old].discard(network)
            self._by_identity.setdefault(identity, set()).add(network)

    def delete(self, network: Network) -> None:
        old = self._entries.get(network)
        if old is None:
            return
        with contextlib.suppress(KeyNotFoundError):
            self._map.delete(ipcache_key(network))
        self._bump()
        del self._entries[network]
        self._by_identity[old].discard(network)

    def networks_of(self, identity: int) -> frozenset[Network] | set[Network]:
        """The prefixes that map to an identity (the set this class keeps: read, never change it)."""
        return self._by_identity.get(identity, _NONE)

    def prefixes_of(self, identity: int) -> list[str]:
        """The prefixes that map to an identity, sorted."""
        return sorted(str(n) for n in self._by_identity.get(identity, ()))
