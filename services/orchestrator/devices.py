"""Network-facing devices: the entry programs of the from-network, to-network and XDP hooks.

A device the operator names gets `entry_from_network` on tc ingress and
`entry_to_network` on tc egress, so objects in those call maps (node ports,
reverse NAT of their replies) see the node's own traffic with the network.
A device can also get `entry_xdp` (the prefilter asks for it when a user
attaches the prefilter): the XDP chain runs there, never an object's program.
Devices are remembered in the state store and re-attached after a restart.
"""

from __future__ import annotations

import builtins

import structlog

from pybpf import NotSupportedError, TcDirection, XdpMode, attach_tc, detach_tc, detach_xdp, query_tc, query_xdp
from pybpf import attach_xdp as pybpf_attach_xdp
from services.common.chain_client import XdpPlacement as XdpState
from services.common.datapath import Hook, TcPriority
from services.common.errors import FailedPrecondition, NotFound
from services.common.store import Store
from services.orchestrator import netdev
from services.orchestrator.chain import Chain

log = structlog.get_logger("weir.devices")

KIND = "device"
ENDPOINT_KIND = "endpoint"  # the endpoints' store documents (services.orchestrator.endpoints.KIND)
XDP_KIND = "xdp"
TC_HANDLE = 1
TC_PRIORITY = TcPriority.ENTRY
HOOKS = ((Hook.FROM_NETWORK, TcDirection.INGRESS), (Hook.TO_NETWORK, TcDirection.EGRESS))


class Devices:
    def __init__(self, chain: Chain, store: Store) -> None:
        self._chain = chain
        self._store = store

    def own_program_ids(self) -> set[int]:
        """Ids of the entry programs (and XDP programs this node placed): what may sit on a device."""
        ids = {p.id for p in self._chain.programs.values()}
        return ids | {int(doc["program_id"]) for _, doc in self._store.items(XDP_KIND)}

    def attach(self, ifname: str) -> int:
        """Attach the network entry programs to a device nobody else uses (refused otherwise)."""
        netdev.valid_ifname(ifname)
        ifindex = netdev.link_index(ifname)
        if ifindex is None:
            raise NotFound(f"interface {ifname!r} does not exist in the node's namespace")
        if self._store.get(KIND, ifname) is not None:
            raise FailedPrecondition(f"device {ifname} is already attached")
        for _, doc in self._store.items(ENDPOINT_KIND):
            if doc.get("host_ifname") == ifname:
                raise FailedPrecondition(f"interface {ifname} is the interface of endpoint {doc.get('name')!r}; "
                                         "an endpoint's interface cannot be a network device")  # fmt: skip
        if netdev.is_weir_link(ifindex):
            raise FailedPrecondition(f"interface {ifname} is an endpoint interface Weir made "
                                     f"({netdev.link_alias(ifindex)}); it cannot be a network device")  # fmt: skip
        foreign = netdev.foreign_programs(ifindex, self.own_program_ids())
        if foreign:
            raise FailedPrecondition(f"interface {ifname} already carries programs that are not this node's "
                                     f"({', '.join(foreign)}); detach them first")  # fmt: skip
        self._attach_entries(ifindex)
        self._store.put(KIND, ifname, {"ifindex": ifindex})
        log.info("device attached", interface=ifname)
        return ifindex

    def _attach_entries(self, ifindex: int) -> None:
        for hook, direction in HOOKS:
            attach_tc(
                ifindex, self._chain.programs[hook], direction, handle=TC_HANDLE, priority=TC_PRIORITY, replace=True
            )

    def detach(self, ifname: str) -> None:
        netdev.valid_ifname(ifname)
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
                ifindex = netdev.link_index(name) or 0
                self._attach_entries(ifindex)
                self._store.put(KIND, name, {"ifindex": ifindex})
        for name, doc in self._store.items(XDP_KIND):
            try:
                self.attach_xdp(name, XdpMode[doc["requested"]])
            except (NotFound, FailedPrecondition) as exc:
                log.warning("cannot re-attach the XDP entry; forgetting it", interface=name, error=str(exc))
                self._store.delete(XDP_KIND, name)

    # ---- XDP ----

    def _is_ours(self, ifname: str, prog_id: int) -> bool:
        doc = self._store.get(XDP_KIND, ifname)
        return prog_id == self._chain.programs[Hook.XDP].id or (doc is not None and doc["program_id"] == prog_id)

    def attach_xdp(self, ifname: str, mode: XdpMode = XdpMode.AUTO) -> XdpState:
        """Attach the XDP entry program; someone else's XDP program is never replaced."""
        netdev.valid_ifname(ifname)
        ifindex = netdev.link_index(ifname)
        if ifindex is None:
            raise NotFound(f"interface {ifname!r} does not exist on this node")
        current = query_xdp(ifindex)
        for attached_mode in (XdpMode.NATIVE, XdpMode.GENERIC, XdpMode.OFFLOAD):
            prog_id = current.get(attached_mode)
            if prog_id and not self._is_ours(ifname, prog_id):
                raise FailedPrecondition(
                    f"interface {ifname} already runs XDP program id {prog_id} ({attached_mode.name.lower()}); "
                    "detach it first"
                )
            if prog_id and mode not in (XdpMode.AUTO, attached_mode):
                detach_xdp(ifindex, attached_mode)  # switching modes: ours, so safe to move
        try:
            attachment = pybpf_attach_xdp(ifindex, self._chain.programs[Hook.XDP], mode, replace=True)
        except NotSupportedError as exc:
            raise FailedPrecondition(
                f"interface {ifname} does not support {mode.name.lower()} XDP: {exc.strerror}"
            ) from None
        state = XdpState(ifname, ifindex, attachment.mode, attachment.program_id)
        self._store.put(
            XDP_KIND, ifname, {"requested": mode.name, "mode": state.mode.name, "program_id": state.program_id}
        )
        log.info("xdp entry attached", interface=ifname, mode=state.mode.name)
        return state

    def detach_xdp(self, ifname: str) -> None:
        netdev.valid_ifname(ifname)
        if self._store.get(XDP_KIND, ifname) is None:
            raise NotFound(f"the XDP entry is not attached to {ifname!r}")
        ifindex = netdev.link_index(ifname)
        if ifindex is not None:
            current = query_xdp(ifindex)
            for mode in (XdpMode.NATIVE, XdpMode.GENERIC):
                prog_id = current.get(mode)
                if prog_id and self._is_ours(ifname, prog_id):
                    detach_xdp(ifindex, mode)
        self._store.delete(XDP_KIND, ifname)
        log.info("xdp entry detached", interface=ifname)

    def xdp_attachments(self) -> builtins.list[XdpState]:
        out = []
        for name, doc in self._store.items(XDP_KIND):
            ifindex = netdev.link_index(name)
            if ifindex is None:
                continue
            mode = XdpMode[doc["mode"]]
            out.append(XdpState(name, ifindex, mode, query_xdp(ifindex).get(mode) or 0))
        return out
