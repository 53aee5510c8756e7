"""Routes to remote nodes' endpoint CIDRs: direct, or through the VXLAN overlay.

Direct: each remote CIDR is routed via the remote node's underlay address (the
packet crosses the underlay as plain IP). VXLAN: each remote CIDR is routed into
the instance's VXLAN device (external/collect_md, UDP 8472 as Cilium's, NOARP),
and `tunnel_map` says which node owns it; the overlay program on the device
(bpf/overlay.bpf.c) sets the tunnel key from it, with the source's identity in
the VNI, and reads the VNI back on the way in.

Every route carries the route protocol NODE_ROUTE_PROTOCOL and the instance's own
metric (`route_metric`), so a restarted orchestrator (`reconcile`) and teardown find
exactly the routes their instance made, and another instance in the same namespace (or
a route of the operator's to the same destination) keeps its own. The VXLAN device carries the
ifalias `weir-overlay/<instance>` (not the endpoints' `weir/<instance>/` tag,
which endpoint reconciliation would take for a leftover veth). All of it lives
in the node's own namespace, which stands for the node: one node per namespace.

`remote_nodes` (an LPM trie shared with the ipsec program) holds every remote CIDR,
whatever its routing, with its node's id and key index: written before the routes are
made and cleared after they went, so the ipsec program's strict mode knows a node that
encrypts (key index above 0) from the first packet the kernel routes to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pybpf import KeyNotFoundError, Map, Program, TcDirection, attach_tc
from services.common.datapath import (
    NODE_ROUTE_PROTOCOL,
    TUNNEL_MAX,
    VXLAN_PORT,
    IpcacheKey,
    TcPriority,
    TunnelValue,
)
from services.common.errors import FailedPrecondition, ResourceExhausted
from services.common.lpm import ipcache_key, ipcache_network
from services.common.overlay import VXLAN6_OVERHEAD, VXLAN_OVERHEAD, overlay_ifname
from services.common.validate import Network
from services.orchestrator.ipcache import AF_INET, AF_INET6

log = structlog.get_logger("weir.routing")

DIRECT, VXLAN = "direct", "vxlan"
# The routes' metric is FIRST_METRIC + a hash of the instance name below METRICS: never 0
# (IPv4's default) or 1024 (IPv6's), which routes made before they were scoped carry.
FIRST_METRIC, METRICS = 2048, 1 << 15
UNSCOPED_METRICS = (0, 1024)
DEFAULT_UNDERLAY_MTU = 1500
IFF_NOARP = 0x80
TC_HANDLE = 1


class Remote(Protocol):
    """What routing needs of a remote node (services.orchestrator.nodes.NodeRecord has it)."""

    @property
    def name(self) -> str: ...
    @property
    def node_id(self) -> int: ...
    @property
    def addresses(self) -> tuple[str, ...]: ...
    @property
    def cidrs(self) -> tuple[str, ...]: ...
    @property
    def routing(self) -> str: ...
    @property
    def key_index(self) -> int: ...


@dataclass(frozen=True)
class Route:
    """One route this instance wants: a remote CIDR via a gateway (direct) or into the overlay."""

    dst: Network
    gateway: str  # "" for the overlay
    outer_v6: bool = False  # into the overlay towards an IPv6 underlay address: 20 bytes less room


def overlay_mac(instance: str) -> str:
    """A stable, locally administered MAC for the instance's VXLAN device.

    Each node's differs: the kernel drops a decapsulated frame whose source MAC is the
    receiving device's own. The inner destination (the sender's own device address, as
    NOARP makes it) is never the receiver's; the overlay's ingress program makes the
    packet the host's (bpf/overlay.bpf.c).
    """
    digest = hashlib.sha256(f"overlay/{instance}".encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


def overlay_alias(instance: str) -> str:
    return f"weir-overlay/{instance}"


def underlay_address(node: Remote, version: int) -> str:
    """The node's first underlay address of an IP version ("" when it has none)."""
    return next((a for a in node.addresses if ipaddress.ip_address(a).version == version), "")


def tunnel_address(node: Remote) -> str:
    """The underlay address the overlay sends to: IPv4 first, as Cilium prefers."""
    return underlay_address(node, 4) or underlay_address(node, 6)


def routes_of(node: Remote) -> set[Route]:
    out = set()
    for text in node.cidrs:
        dst = ipaddress.ip_network(text)
        if node.routing == VXLAN:
            out.add(Route(dst, "", outer_v6=ipaddress.ip_address(tunnel_address(node)).version == 6))
        else:
            out.add(Route(dst, underlay_address(node, dst.version)))
    return out


def tunnel_value(node: Remote) -> TunnelValue:
    address = ipaddress.ip_address(tunnel_address(node))
    value = TunnelValue(family=AF_INET if address.version == 4 else AF_INET6, key_index=node.key_index)
    value.node_id = node.node_id
    ctypes.memmove(value.addr, address.packed, len(address.packed))
    return value


def route_metric(instance: str) -> int:
    """The metric of the instance's node routes: what tells its routes from another instance's."""
    digest = hashlib.sha256(f"routes/{instance}".encode()).digest()
    return FIRST_METRIC + int.from_bytes(digest[:4], "big") % METRICS


def own_routes(instance: str, unscoped: bool = True) -> list[tuple[Network, int, int]]:
    """The instance's node routes in this namespace: (dst, family, metric).

    With `unscoped`, also the node routes made before routes carried the instance's metric
    (whichever instance made them: they cannot be told apart, and an upgraded node replaces them).
    """
    metrics = {route_metric(instance), *(UNSCOPED_METRICS if unscoped else ())}
    out = []
    with IPRoute() as ipr:
        for family in (AF_INET, AF_INET6):
            for route in ipr.get_routes(family=family, proto=NODE_ROUTE_PROTOCOL):
                metric = int(route.get_attr("RTA_PRIORITY") or 0)
                if route.get("proto") != NODE_ROUTE_PROTOCOL or metric not in metrics:
                    continue
                dst = route.get_attr("RTA_DST") or ("0.0.0.0" if family == AF_INET else "::")
                out.append((ipaddress.ip_network(f"{dst}/{route['dst_len']}"), family, metric))
    return out


def remove_own_routes(instance: str) -> list[str]:
    """Delete the instance's node routes in this namespace (teardown); other instances' stay."""
    removed = []
    with IPRoute() as ipr:
        for dst, family, metric in own_routes(instance):
            with contextlib.suppress(NetlinkError):
                ipr.route("del", dst=str(dst), family=family, proto=NODE_ROUTE_PROTOCOL, priority=metric)
                removed.append(str(dst))
    return removed


def remove_overlay_device(instance: str) -> str:
    """Delete the instance's VXLAN device if it is there and carries its tag; its name, or ""."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=overlay_ifname(instance))
        if not found:
            return ""
        link = ipr.get_links(found[0])[0]
        if str(link.get_attr("IFLA_IFALIAS") or "") != overlay_alias(instance):
            return ""
        ipr.link("del", index=found[0])
    return overlay_ifname(instance)


class Routing:
    """The routes, the VXLAN device and tunnel_map entries for this node's remote nodes."""

    def __init__(
        self,
        instance: str,
        tunnel_map: Map,
        programs: dict[str, Program],
        local_vxlan: bool,
        local_addresses: Iterable[str] = (),
        remote_nodes: Map | None = None,
    ) -> None:
        """`programs` are overlay_egress and overlay_ingress; `local_vxlan`: the local node's mode is VXLAN."""
        self._instance = instance
        self._tunnel = tunnel_map.typed(IpcacheKey, TunnelValue)
        self._remote_nodes = remote_nodes.typed(IpcacheKey, TunnelValue) if remote_nodes is not None else None
        self._programs = programs
        self._local_vxlan = local_vxlan
        self._local_addresses = tuple(local_addresses)
        self._vxlan_nodes: set[str] = set()
        self._metric = route_metric(instance)

    @property
    def ifname(self) -> str:
        return overlay_ifname(self._instance)

    @property
    def _port_taken(self) -> str:
        return (
            f"the VXLAN overlay cannot have {self.ifname} on UDP {VXLAN_PORT}: another VXLAN device or socket of this "
            "namespace holds it (one node per namespace); remove it or use direct routing"
        )

    # ---- changes ----

    def apply(self, old: Remote | None, new: Remote | None) -> None:
        """Move one node's routes and tunnel entries from `old` to `new` (either may be None)."""
        before = routes_of(old) if old else set()
        after = routes_of(new) if new else set()
        if new is not None and new.routing == VXLAN:
            self._vxlan_nodes.add(new.name)
            self._ensure_device()
        tunnels_before = {r.dst for r in before if not r.gateway}
        tunnels_after = {r.dst for r in after if not r.gateway}
        if new is not None:
            self._put_remote(new)
        if new is not None and tunnels_after:
            if len(self._tunnel_keys()) + len(tunnels_after - tunnels_before) > TUNNEL_MAX:
                raise ResourceExhausted(f"tunnel_map is full ({TUNNEL_MAX} remote CIDRs)")
            value = tunnel_value(new)
            for dst in tunnels_after:
                self._tunnel.update(ipcache_key(dst), value)
        with IPRoute() as ipr:
            for route in after:
                self._add(ipr, route)
            for route in before - after:
                if route.dst not in {r.dst for r in after}:
                    self._remove(ipr, route)
        for dst in tunnels_before - tunnels_after:
            with contextlib.suppress(KeyNotFoundError):
                self._tunnel.delete(ipcache_key(dst))
        self._delete_remote({r.dst for r in before} - {r.dst for r in after})
        if new is None or new.routing != VXLAN:
            if old is not None:
                self._vxlan_nodes.discard(old.name)
            self._drop_device_if_unused()

    def reconcile(self, nodes: Iterable[Remote]) -> None:
        """After a (re)start: make routes, device and tunnel_map hold exactly what `nodes` want."""
        wanted: dict[Network, Route] = {}
        tunnels: dict[Network, TunnelValue] = {}
        self._vxlan_nodes = set()
        for node in nodes:
            for route in routes_of(node):
                wanted[route.dst] = route
                if not route.gateway:
                    tunnels[route.dst] = tunnel_value(node)
            if node.routing == VXLAN:
                self._vxlan_nodes.add(node.name)
        if self._vxlan_nodes or self._local_vxlan:
            self._ensure_device()
        remote: set[Network] = set()
        for node in nodes:
            remote |= self._put_remote(node)
        for dst, value in tunnels.items():
            self._tunnel.update(ipcache_key(dst), value)
        with IPRoute() as ipr:
            for route in wanted.values():
                self._add(ipr, route)
            for dst, family, metric in own_routes(self._instance):
                if dst not in wanted or metric != self._metric:
                    with contextlib.suppress(NetlinkError):
                        ipr.route("del", dst=str(dst), family=family, proto=NODE_ROUTE_PROTOCOL, priority=metric)
        for key in self._tunnel_keys():
            if ipcache_network(key) not in tunnels:
                with contextlib.suppress(KeyNotFoundError):
                    self._tunnel.delete(key)
        if self._remote_nodes is not None:
            keys = list(self._remote_nodes.keys())
            self._delete_remote({ipcache_network(k) for k in keys} - remote)
        self._drop_device_if_unused()

    # ---- helpers ----

    def _put_remote(self, node: Remote) -> set[Network]:
        """The node's CIDRs into remote_nodes (before any route to them); returns them."""
        networks = {ipaddress.ip_network(c) for c in node.cidrs}
        if self._remote_nodes is not None:
            value = tunnel_value(node)
            for dst in networks:
                self._remote_nodes.update(ipcache_key(dst), value)
        return networks

    def _delete_remote(self, networks: Iterable[Network]) -> None:
        if self._remote_nodes is None:
            return
        for dst in networks:
            with contextlib.suppress(KeyNotFoundError):
                self._remote_nodes.delete(ipcache_key(dst))

    def _tunnel_keys(self) -> list[IpcacheKey]:
        return list(self._tunnel.keys())

    def _add(self, ipr: IPRoute, route: Route) -> None:
        family = AF_INET if route.dst.version == 4 else AF_INET6
        if route.gateway:
            try:
                ipr.route(
                    "replace",
                    dst=str(route.dst),
                    family=family,
                    gateway=route.gateway,
                    proto=NODE_ROUTE_PROTOCOL,
                    priority=self._metric,
                )
            except NetlinkError as exc:
                if exc.code not in (errno.ENETUNREACH, errno.EHOSTUNREACH):  # IPv6 answers the latter
                    raise
                raise FailedPrecondition(
                    f"{route.dst} cannot be routed via {route.gateway}: this node has no route to that underlay "
                    "address (direct routing needs the nodes on one link); use VXLAN routing or fix the underlay"
                ) from None
        else:
            # The device's MTU leaves room for an outer IPv4 header; a node reached over IPv6
            # gets a route MTU 20 bytes lower, so senders learn the right size (no black hole).
            index = ipr.link_lookup(ifname=self.ifname)[0]
            metrics = {"metrics": {"mtu": self._underlay_mtu(ipr) - VXLAN6_OVERHEAD}} if route.outer_v6 else {}
            ipr.route(
                "replace",
                dst=str(route.dst),
                family=family,
                oif=index,
                proto=NODE_ROUTE_PROTOCOL,
                priority=self._metric,
                **metrics,
            )

    def _remove(self, ipr: IPRoute, route: Route) -> None:
        family = AF_INET if route.dst.version == 4 else AF_INET6
        with contextlib.suppress(NetlinkError):
            ipr.route("del", dst=str(route.dst), family=family, proto=NODE_ROUTE_PROTOCOL, priority=self._metric)

    def _underlay_mtu(self, ipr: IPRoute) -> int:
        """The MTU of the device that holds the local node's underlay address (1500 when unknown)."""
        wanted = set(self._local_addresses)
        for addr in ipr.get_addr():
            if str(addr.get_attr("IFA_ADDRESS")) in wanted:
                return int(ipr.get_links(addr["index"])[0].get_attr("IFLA_MTU"))
        return DEFAULT_UNDERLAY_MTU

    def _ensure_device(self) -> None:
        """Make (or find) the VXLAN device, up, with the overlay programs on both directions."""
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.ifname)
            if not found:
                try:
                    ipr.link(
                        "add",
                        ifname=self.ifname,
                        kind="vxlan",
                        vxlan_collect_metadata=1,
                        vxlan_port=VXLAN_PORT,
                        vxlan_learning=0,
                    )
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
                    raise FailedPrecondition(self._port_taken) from None
                index = ipr.link_lookup(ifname=self.ifname)[0]
                mtu = self._underlay_mtu(ipr) - VXLAN_OVERHEAD
                ipr.link(
                    "set",
                    index=index,
                    ifalias=overlay_alias(self._instance),
                    address=overlay_mac(self._instance),
                    mtu=mtu,
                )
                ipr.link("set", index=index, flags=IFF_NOARP, change=IFF_NOARP)
                try:
                    ipr.link("set", index=index, state="up")
                except NetlinkError as exc:
                    ipr.link("del", index=index)
                    if exc.code != errno.EADDRINUSE:
                        raise
                    raise FailedPrecondition(self._port_taken) from None
                log.info("overlay device made", ifname=self.ifname, mtu=mtu)
            else:
                index = found[0]
        attach_tc(index, self._programs["overlay_egress"], TcDirection.EGRESS, TC_HANDLE, TcPriority.ENTRY)
        attach_tc(index, self._programs["overlay_ingress"], TcDirection.INGRESS, TC_HANDLE, TcPriority.ENTRY)

    def _drop_device_if_unused(self) -> None:
        if self._vxlan_nodes or self._local_vxlan:
            return
        if remove_overlay_device(self._instance):
            log.info("overlay device removed: no node uses VXLAN", ifname=self.ifname)
