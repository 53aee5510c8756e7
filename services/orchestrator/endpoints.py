"""Endpoints: a network namespace and a veth pair (or an adopted interface).

`Endpoints` owns the desired state of a node's endpoints (in the state store),
the netlink objects that realise it, the entry-program attachments on each
host-side interface and the endpoints map the datapath reads. A restarted
orchestrator calls `reconcile()`: what the store knows is re-adopted, what it
does not know but carries this instance's tag is removed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from pybpf import TcDirection, attach_tc, detach_tc
from services.common.change import Change
from services.common.datapath import MAX_ENDPOINTS, EndpointFlag, EndpointInfo, Hook, Slot, TcPriority
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.common.store import Store
from services.common.validate import Network
from services.orchestrator import netdev
from services.orchestrator.chain import Chain
from services.orchestrator.identities import Identities
from services.orchestrator.limits import MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_LABELS, summary

log = structlog.get_logger("weir.endpoints")

KIND = "endpoint"
DEVICE_KIND = "device"  # network devices' store documents (services.orchestrator.devices.KIND)
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a Kubernetes namespace (DNS label)
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"  # the label a namespaced policy selects by, as in Cilium
DEFAULT_NAMESPACE = "default"  # an endpoint created without one is in it, as a pod kubectl creates
# A port name: an IANA service name (RFC 6335 5.1), as Kubernetes checks a container port's name.
PORT_NAME_RE = re.compile(r"([a-z0-9]-?)*[a-z](-?[a-z0-9])*")
MAX_PORT_NAME = 15
MAX_NAMED_PORTS = 64
PORT_PROTOCOLS = ("TCP", "UDP", "SCTP")
TC_HANDLE = 1
TC_PRIORITY = TcPriority.ENTRY
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class NamedPort:
    """A container port declared by name; policy port rules may name it instead of a number."""

    name: str
    port: int
    protocol: str = "TCP"


@dataclass
class Endpoint:
    name: str
    id: int
    ipv4: str = ""
    ipv6: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    netns: str = ""
    host_ifname: str = ""
    host_ifindex: int = 0
    mac: str = ""
    adopted: bool = False
    identity: int = 0
    # Traffic dropped until the policy service says this endpoint's map is installed.
    policy_pending: bool = False
    namespace: str = ""  # also its label io.kubernetes.pod.namespace
    named_ports: list[NamedPort] = field(default_factory=list)

    def networks(self) -> list[Network]:
        """The endpoint's addresses as host prefixes (its ipcache entries)."""
        return [ipaddress.ip_network(a) for a in (self.ipv4, self.ipv6) if a]

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Endpoint:
        fields = dict(doc)
        fields["named_ports"] = [NamedPort(**p) for p in doc.get("named_ports", ())]
        return cls(**fields)


def check_name(name: str) -> str:
    """An endpoint name, matched whole (a trailing newline is not part of a valid name)."""
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"endpoint name {summary(name)} is invalid: use 1-32 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class EndpointSpec:
    """A validated CreateEndpoint request."""

    name: str
    ipv4: str
    ipv6: str
    labels: dict[str, str]
    adopt_interface: str
    namespace: str = ""
    named_ports: tuple[NamedPort, ...] = ()

    @classmethod
    def parse(
        cls,
        name: str,
        ipv4: str,
        ipv6: str,
        labels: dict[str, str],
        adopt_interface: str,
        namespace: str = "",
        named_ports: tuple[NamedPort, ...] = (),
    ) -> EndpointSpec:
        check_name(name)
        if not ipv4 and not ipv6:
            raise InvalidArgument("an endpoint needs an IPv4 or an IPv6 address")
        try:
            v4 = netdev.valid_address(ipv4, 4) if ipv4 else ""
            v6 = netdev.valid_address(ipv6, 6) if ipv6 else ""
        except ValueError as exc:
            raise InvalidArgument(f"invalid address: {exc}") from None
        if len(labels) > MAX_LABELS:
            raise InvalidArgument(f"{len(labels)} labels; an endpoint has at most {MAX_LABELS}")
        for key, value in labels.items():
            if len(key) > MAX_LABEL_KEY or not LABEL_KEY_RE.fullmatch(key):
                raise InvalidArgument(f"label key {summary(key)} is invalid: an optional DNS prefix and '/', "
                                      "then up to 63 letters, digits, '-', '_' or '.'")  # fmt: skip
            if len(value) > MAX_LABEL_VALUE or not LABEL_VALUE_RE.fullmatch(value):
                raise InvalidArgument(f"label value {summary(value)} of {summary(key)} is invalid: up to 63 "
                                      "letters, digits, '-', '_' or '.'")  # fmt: skip
        if adopt_interface:
            netdev.valid_ifname(adopt_interface, "adopt_interface")
        labels = dict(labels)
        namespace = namespace or labels.get(NAMESPACE_LABEL, DEFAULT_NAMESPACE)
        if not NAMESPACE_RE.fullmatch(namespace):
            raise InvalidArgument(f"namespace {summary(namespace)} is invalid: a DNS label of 1-63 lowercase "
                                  "letters, digits or '-', starting and ending with a letter or digit")  # fmt: skip
        if labels.get(NAMESPACE_LABEL, namespace) != namespace:
            raise InvalidArgument(f"labels: {NAMESPACE_LABEL} is {summary(labels[NAMESPACE_LABEL])} but namespace "
                                  f"is {namespace!r}; set only namespace (the label follows it)")  # fmt: skip
        labels[NAMESPACE_LABEL] = namespace
        if len(labels) > MAX_LABELS:
            raise InvalidArgument(f"{len(labels)} labels with the namespace's; an endpoint has at most {MAX_LABELS}")
        return cls(name, v4, v6, labels, adopt_interface, namespace, check_named_ports(named_ports))


def check_named_ports(ports: tuple[NamedPort, ...]) -> tuple[NamedPort, ...]:
    """Named container ports as Kubernetes checks a pod's: IANA names, unique, port 1-65535, TCP/UDP/SCTP."""
    if len(ports) > MAX_NAMED_PORTS:
        raise InvalidArgument(f"named_ports: {len(ports)} given; an endpoint has at most {MAX_NAMED_PORTS}")
    seen: set[str] = set()
    out = []
    for i, p in enumerate(ports):
        where = f"named_ports[{i}]"
        if len(p.name) > MAX_PORT_NAME or not PORT_NAME_RE.fullmatch(p.name):
            raise InvalidArgument(f"{where}.name {summary(p.name)} is not a port name: at most {MAX_PORT_NAME} "
                                  "lowercase letters, digits and single inner '-', with a letter")  # fmt: skip
        if p.name in seen:
            raise InvalidArgument(f"{where}.name {p.name!r} is given twice; port names are unique per endpoint")
        seen.add(p.name)
        if not 1 <= p.port <= 65535:
            raise InvalidArgument(f"{where}.port {p.port} of {p.name!r} is out of range (1-65535)")
        protocol = (p.protocol or "TCP").upper()
        if protocol not in PORT_PROTOCOLS:
            raise InvalidArgument(f"{where}.protocol {summary(p.protocol)} of {p.name!r} is not one of "
                                  f"{', '.join(PORT_PROTOCOLS)}")  # fmt: skip
        out.append(NamedPort(p.name, p.port, protocol))
    return tuple(out)


class Endpoints:
    """The endpoints of one node (instance), their interfaces and attachments."""

    def __init__(self, instance: str, chain: Chain, store: Store, identities: Identities) -> None:
        self._instance = instance
        self._chain = chain
        self._store = store
        self._identities = identities
        self._listeners: list[Callable[[str, Endpoint], None]] = []
        # More checks of a new endpoint's addresses (remote nodes' CIDRs: services.orchestrator.nodes).
        self.address_checks: list[Callable[[Network], None]] = []
        self._ready_listeners: list[Callable[[str], None]] = []

    def on_change(self, listener: Callable[[str, Endpoint], None]) -> None:
        """Call listener(kind, endpoint) after each endpoint is created ("CREATED") or deleted ("DELETED")."""
        self._listeners.append(listener)

    def on_policy_ready(self, listener: Callable[[str], None]) -> None:
        """Call listener(name) when an endpoint's traffic is let through (its policy is installed)."""
        self._ready_listeners.append(listener)

    def _changed(self, kind: str, endpoint: Endpoint) -> None:
        for listener in self._listeners:
            listener(kind, endpoint)

    def all(self) -> list[Endpoint]:
        return self._all()

    def all_networks(self) -> list[Network]:
        """Every endpoint's addresses as host prefixes."""
        return [n for e in self._all() for n in e.networks()]

    # ---- queries ----

    def get(self, name: str) -> Endpoint:
        doc = self._store.get(KIND, check_name(name))
        if doc is None:
            raise NotFound(f"endpoint {name!r} does not exist")
        return Endpoint.from_doc(doc)

    def list_page(self, page_size: int = 0, page_token: str = "") -> tuple[list[Endpoint], str]:
        """A page of endpoints ordered by name; the token is the last name returned."""
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size {page_size} is above the maximum of {MAX_PAGE_SIZE}")
        size = page_size or DEFAULT_PAGE_SIZE
        rest = [Endpoint.from_doc(doc) for key, doc in self._store.items(KIND) if key > page_token]
        page = rest[:size]
        token = page[-1].name if len(rest) > size else ""
        return page, token

    # ---- changes ----

    def create(self, spec: EndpointSpec) -> Endpoint:
        """Make (or adopt) an endpoint; on any failure, undo what was made."""
        existing = self._store.get(KIND, spec.name)
        if existing is not None:
            raise AlreadyExists(f"endpoint {spec.name!r} already exists")
        self._check_addresses_free(spec)
        endpoint = Endpoint(
            name=spec.name,
            id=self._allocate_id(),
            ipv4=spec.ipv4,
            ipv6=spec.ipv6,
            labels=spec.labels,
            adopted=bool(spec.adopt_interface),
            namespace=spec.namespace,
            named_ports=list(spec.named_ports),
            identity=self._identities.for_labels(spec.labels),
            policy_pending=self.policy_in_chain(),
        )
        try:
            if spec.adopt_interface:
                self._adopt(endpoint, spec.adopt_interface)
            else:
                self._make(endpoint)
            # The endpoints map first: an entry program on an interface it does not know drops (UNKNOWN_ENDPOINT).
            self._chain.endpoints.update(endpoint.host_ifindex, self._info(endpoint))
            self._attach(endpoint)
            self._identities.endpoint_up(endpoint.identity, endpoint.networks())
        except Exception:
            self._identities.endpoint_down(endpoint.networks())
            self._teardown(endpoint)
            raise
        self._store.put(KIND, endpoint.name, asdict(endpoint))
        log.info(
            "endpoint created",
            endpoint=endpoint.name,
            id=endpoint.id,
            ifname=endpoint.host_ifname,
            identity=endpoint.identity,
        )
        self._changed("CREATED", endpoint)
        return endpoint

    def delete(self, name: str) -> None:
        endpoint = self.get(name)
        self._identities.endpoint_down(endpoint.networks())
        self._teardown(endpoint)
        self._store.delete(KIND, name)
        log.info("endpoint deleted", endpoint=name)
        self._changed("DELETED", endpoint)

    def policy_in_chain(self) -> bool:
        """Whether a policy program is in an endpoint hook's chain (then a new endpoint waits for it)."""
        policy = 1 << Slot.POLICY
        return any(self._chain.generations.word(h) & policy for h in (Hook.FROM_CONTAINER, Hook.TO_CONTAINER))

    def policy_ready(self, ready: list[tuple[str, int]], revision: int = 0) -> list[str]:
        """The policy service installed these endpoints' maps: let their traffic through.

        Names it does not know, or of another id (deleted and made again since), are skipped.
        """
        released = []
        for name, endpoint_id in ready:
            doc = self._store.get(KIND, name)
            if doc is None:
                continue
            endpoint = Endpoint.from_doc(doc)
            if endpoint.id != endpoint_id or not endpoint.policy_pending:
                continue
            endpoint.policy_pending = False
            with Change(self._store) as change:
                self._store.put(KIND, name, asdict(endpoint))
                change.apply(self._flag_writer(endpoint, False), undo=self._flag_writer(endpoint, True))
            released.append(name)
        if released:
            log.info(
                "endpoint policy installed; traffic let through",
                endpoints=len(released),
                first=released[0],
                revision=revision,
            )
            for name in released:
                for listener in self._ready_listeners:
                    listener(name)
        return released

    def _flag_writer(self, endpoint: Endpoint, pending: bool) -> Callable[[], None]:
        return lambda: self._chain.endpoints.update(endpoint.host_ifindex, self._info(endpoint, pending))

    def reconcile(self) -> None:
        """After a (re)start: re-adopt known endpoints, remove tagged leftovers."""
        known = {}
        for name, doc in self._store.items(KIND):
            endpoint = Endpoint.from_doc(doc)
            if self._still_there(endpoint):
                endpoint.host_ifindex = netdev.link_index(endpoint.host_ifname) or 0
                endpoint.identity = self._identities.for_labels(endpoint.labels)
                self._identities.endpoint_up(endpoint.identity, endpoint.networks())
                self._chain.endpoints.update(endpoint.host_ifindex, self._info(endpoint))
                self._attach(endpoint)
                self._store.put(KIND, name, asdict(endpoint))
                known[netdev.alias(self._instance, name)] = endpoint
                log.info("endpoint re-adopted", endpoint=name)
            else:
                log.warning("endpoint vanished while the orchestrator was down", endpoint=name)
                self._teardown(endpoint)
                self._store.delete(KIND, name)
        prefix = netdev.alias(self._instance, "")
        # Ours are the namespaces at the far end of our tagged veths (found before those go).
        namespaces = netdev.peered_namespaces(netdev.netns_name(self._instance, ""), netdev.tagged_peers(prefix))
        for tag, ifindex in netdev.tagged_links(prefix).items():
            if tag not in known:
                log.warning("removing an interface no endpoint owns", alias=tag)
                netdev.delete_link(ifindex)
        names = {e.netns for e in known.values()}
        for ns, ours in namespaces.items():
            if ns in names:
                continue
            if ours:
                log.warning("removing a namespace no endpoint owns", netns=ns)
                netdev.remove_netns(ns)
            else:
                log.info("leaving a namespace this instance did not make", netns=ns)
        valid = {e.host_ifindex for e in known.values()}
        for ifindex in list(self._chain.endpoints.keys()):
            if ifindex not in valid:
                self._chain.endpoints.delete(ifindex)

    # ---- helpers ----

    def _make(self, endpoint: Endpoint) -> None:
        endpoint.netns = netdev.netns_name(self._instance, endpoint.name)
        endpoint.host_ifname = netdev.host_ifname(self._instance, endpoint.name)
        if netdev.netns_exists(endpoint.netns) or netdev.link_index(endpoint.host_ifname):
            raise AlreadyExists(
                f"namespace {endpoint.netns} or interface {endpoint.host_ifname} already exists "
                "but belongs to no endpoint; delete it or restart the orchestrator to clean up"
            )
        veth = netdev.create_veth(endpoint.host_ifname, netdev.alias(self._instance, endpoint.name), endpoint.netns)
        endpoint.host_ifindex = veth.host_ifindex
        endpoint.mac = veth.peer_mac
        netdev.configure_container(endpoint.netns, veth.host_mac, endpoint.ipv4, endpoint.ipv6)
        netdev.add_host_routes(veth.host_ifindex, endpoint.ipv4, endpoint.ipv6, veth.peer_mac)

    def _adopt(self, endpoint: Endpoint, ifname: str) -> None:
        ifindex = netdev.link_index(ifname)
        if ifindex is None:
            raise NotFound(f"interface {ifname!r} does not exist in the node's namespace")
        for other in self._all():
            if other.host_ifname == ifname:
                raise FailedPrecondition(f"interface {ifname!r} already belongs to endpoint {other.name!r}")
        if self._store.get(DEVICE_KIND, ifname) is not None:
            raise FailedPrecondition(f"interface {ifname!r} is attached as a network device; detach it first")
        if netdev.is_weir_link(ifindex):
            raise FailedPrecondition(f"interface {ifname!r} is an endpoint interface Weir made "
                                     f"({netdev.link_alias(ifindex)}); it cannot be adopted")  # fmt: skip
        foreign = netdev.foreign_programs(ifindex, {p.id for p in self._chain.programs.values()})
        if foreign:
            raise FailedPrecondition(f"interface {ifname!r} already carries programs that are not this node's "
                                     f"({', '.join(foreign)}); detach them first")  # fmt: skip
        endpoint.host_ifname = ifname
        endpoint.host_ifindex = ifindex
        netdev.add_host_routes(ifindex, endpoint.ipv4, endpoint.ipv6, "")

    def _attach(self, endpoint: Endpoint) -> None:
        """Attach (or atomically replace) the entry programs on the host side."""
        for hook, direction in (
            (Hook.FROM_CONTAINER, TcDirection.INGRESS),
            (Hook.TO_CONTAINER, TcDirection.EGRESS),
        ):
            attach_tc(
                endpoint.host_ifindex,
                self._chain.programs[hook],
                direction,
                handle=TC_HANDLE,
                priority=TC_PRIORITY,
                replace=True,
            )

    def _teardown(self, endpoint: Endpoint) -> None:
        """Remove what create() made; tolerant of parts that are already gone."""
        if endpoint.host_ifindex:
            with contextlib.suppress(KeyError):
                self._chain.endpoints.delete(endpoint.host_ifindex)
        if endpoint.adopted:
            if endpoint.host_ifindex and netdev.link_index(endpoint.host_ifname) == endpoint.host_ifindex:
                for direction in (TcDirection.INGRESS, TcDirection.EGRESS):
                    detach_tc(endpoint.host_ifindex, direction, handle=TC_HANDLE, priority=TC_PRIORITY)
                netdev.remove_host_routes(endpoint.host_ifindex, endpoint.ipv4, endpoint.ipv6)
            return
        ifindex = netdev.link_index(endpoint.host_ifname) if endpoint.host_ifname else None
        if ifindex is not None:
            netdev.delete_link(ifindex)
        if endpoint.netns:
            netdev.remove_netns(endpoint.netns)

    def _still_there(self, endpoint: Endpoint) -> bool:
        if not endpoint.host_ifname or netdev.link_index(endpoint.host_ifname) is None:
            return False
        return endpoint.adopted or netdev.netns_exists(endpoint.netns)

    def _all(self) -> list[Endpoint]:
        return [Endpoint.from_doc(doc) for _, doc in self._store.items(KIND)]

    def _allocate_id(self) -> int:
        used = {e.id for e in self._all()}
        for candidate in range(1, MAX_ENDPOINTS):
            if candidate not in used:
                return candidate
        raise ResourceExhausted(f"this node already has {MAX_ENDPOINTS - 1} endpoints")

    def _check_addresses_free(self, spec: EndpointSpec) -> None:
        others = self._all()
        for other in others:
            for mine, theirs in ((spec.ipv4, other.ipv4), (spec.ipv6, other.ipv6)):
                if mine and mine == theirs:
                    raise AlreadyExists(f"address {mine} already belongs to endpoint {other.name!r}")
        for network in (ipaddress.ip_network(a) for a in (spec.ipv4, spec.ipv6) if a):
            for check in self.address_checks:
                check(network)
        endpoint_links = {o.host_ifindex for o in others}
        for address in (spec.ipv4, spec.ipv6):
            conflict = netdev.node_conflict(address, endpoint_links) if address else ""
            if conflict:
                raise FailedPrecondition(f"{conflict}; it cannot be an endpoint's address")

    @staticmethod
    def _info(endpoint: Endpoint, pending: bool | None = None) -> EndpointInfo:
        waiting = endpoint.policy_pending if pending is None else pending
        flags = EndpointFlag.POLICY_PENDING if waiting else 0
        return EndpointInfo(id=endpoint.id, identity=endpoint.identity, flags=flags, pad=0)
