"""Network-facing devices: the entry programs of the from-network and to-network hooks.

A device the operator names gets `entry_from_network` on tc ingress and
`entry_to_network` on tc egress, so objects in those call maps (node ports,
reverse NAT of their replies) see the node's own traffic with the network.
Devices are remembered in the state store and re-attached after a restart.
"""

from __future__ import annotations

import structlog

from pybpf import TcDirection, attach_tc, detach_tc, query_tc
from services.common.datapath import Hook
from services.common.errors import NotFound
from services.common.store import Store
from services.orchestrator import netdev
from services.orchestrator.chain import Chain

log = structlog.get_logger("weir.devices")

KIND = "device"
TC_HANDLE = 1
TC_PRIORITY = 1
HOOKS = ((Hook.FROM_NETWORK, TcDirection.INGRESS), (Hook.TO_NETWORK, TcDirection.EGRESS))


class Devices:
    def __init__(self, chain: Chain, store: Store) -> None:
        self._chain = chain
        self._store = store

    def attach(self, ifname: str) -> int:
        ifindex = netdev.link_index(ifname)
        if ifindex is None:
            raise NotFound(f"interface {ifname!r} does not exist in the node's namespace")
        for hook, direction in HOOKS:
            attach_tc(ifindex, self._chain.programs[hook], direction, handle=TC_HANDLE, priority=TC_PRIORITY,
                      replace=True)
        self._store.put(KIND, ifname, {"ifindex": ifindex})
        log.info("device attached", interface=ifname)
        return ifindex

    def detach(self, ifname: str) -> None:
        if self._store.get(KIND, ifname) is None:
            raise NotFound(f"device {ifname!r} is not attached")
        ifindex = netdev.link_index(ifname)
        if ifindex is not None:
            for hook, direction in HOOKS:
                if query_tc(ifindex, direction, TC_HANDLE, TC_PRIORITY) == self._chain.programs[hook].id:
                    detach_tc(ifindex, direction, TC_HANDLE, TC_PRIORITY)
        self._store.delete(KIND, ifname)

    def list(self) -> list[tuple[str, int]]:
        return [(name, netdev.link_index(name) or 0) for name in self._store.keys(KIND)]

    def reconcile(self) -> None:
        """Re-attach the (reloaded) entry programs; forget devices that are gone."""
        for name in self._store.keys(KIND):
            if netdev.link_index(name) is None:
                log.warning("device vanished; forgetting it", interface=name)
                self._store.delete(KIND, name)
            else:
                self.attach(name)
