"""Remote nodes: what this node knows of the others, and the routes that follow from it.

A node record is a plain dataclass (`NodeRecord`), the same whatever set it: the API in
a standalone setup (UpsertNode/DeleteNode), or another source later (cluster mode's etcd
watcher calls `NodeTable.upsert(record)` / `NodeTable.delete(name)` with the records it
learns). `NodeTable` validates a record against the local node, the other nodes and the
local endpoints, then stores it and moves the routes (`services.orchestrator.routing`) in
one change: a refused or failed request changes nothing. Listeners (the WatchNodes
streams) hear of every change after it is made.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from services.common.change import Change
from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.common.store import Store
from services.common.validate import Network, cidr, shown
from services.common.validate import address as valid_address
from services.orchestrator.routing import DIRECT, VXLAN, Routing

log = structlog.get_logger("weir.nodes")

KIND = "node"
NODE_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?")
MAX_NODE_ID = 65535
MAX_KEY_INDEX = 15
MAX_ADDRESSES = 2  # one IPv4 and one IPv6 underlay address
MAX_CIDRS = 64
ROUTING_MODES = (DIRECT, VXLAN)
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

Listener = Callable[[str, "NodeRecord"], None]


@dataclass(frozen=True)
class NodeRecord:
    """One node: plain data, so any source (the API, an etcd watcher) can build it.

    `addresses` are underlay addresses (at most one IPv4 and one IPv6), `cidrs` the
    endpoint CIDRs the node owns, `routing` "direct" or "vxlan", `key_index` the
    encryption key index (0-15) the encryption issue uses.
    """

    name: str
    node_id: int
    addresses: tuple[str, ...] = ()
    cidrs: tuple[str, ...] = ()
    routing: str = DIRECT
    key_index: int = 0

    def networks(self) -> list[Network]:
        return [ipaddress.ip_network(c) for c in self.cidrs]

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["addresses"], doc["cidrs"] = list(self.addresses), list(self.cidrs)
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> NodeRecord:
        fields = dict(doc)
        fields["addresses"] = tuple(doc.get("addresses", ()))
        fields["cidrs"] = tuple(doc.get("cidrs", ()))
        return cls(**fields)


def parse_record(
    name: str,
    node_id: int,
    addresses: Iterable[str],
    cidrs: Iterable[str],
    routing: str,
    key_index: int,
    local: bool = False,
) -> NodeRecord:
    """A record checked on its own (the checks against other nodes are `NodeTable`'s).

    The `local` node's record (from its flags) may have no underlay address yet.
    """
    if not NODE_NAME_RE.fullmatch(name):
        raise InvalidArgument(f"node name {shown(name)} is invalid: 1-63 lowercase letters, digits, '-' or '.', "
                              "starting and ending with a letter or digit")  # fmt: skip
    if not 1 <= node_id <= MAX_NODE_ID:
        raise InvalidArgument(f"node {name!r}: node_id {node_id} is out of range (1-{MAX_NODE_ID})")
    routing = (routing or DIRECT).lower()
    if routing not in ROUTING_MODES:
        raise InvalidArgument(f"node {name!r}: routing {shown(routing)} is not one of {', '.join(ROUTING_MODES)}")
    if not 0 <= key_index <= MAX_KEY_INDEX:
        raise InvalidArgument(f"node {name!r}: key_index {key_index} is out of range (0-{MAX_KEY_INDEX})")
    addrs = list(addresses)
    if not addrs and not local:
        raise InvalidArgument(f"node {name!r}: give at least one underlay address")
    if len(addrs) > MAX_ADDRESSES:
        raise InvalidArgument(f"node {name!r}: {len(addrs)} addresses; at most one IPv4 and one IPv6")
    parsed = [valid_address(a, f"node {name!r} addresses", unicast=True) for a in addrs]
    if len({a.version for a in parsed}) != len(parsed):
        raise InvalidArgument(f"node {name!r}: two underlay addresses of one IP version; give one of each")
    nets = list(cidrs)
    if len(nets) > MAX_CIDRS:
        raise InvalidArgument(f"node {name!r}: {len(nets)} CIDRs; at most {MAX_CIDRS}")
    networks = [cidr(c, f"node {name!r} cidrs") for c in nets]
    for i, a in enumerate(networks):
        if a.prefixlen == 0:
            raise InvalidArgument(f"node {name!r}: CIDR {a} is a default route; a node owns endpoint CIDRs")
        for b in networks[i + 1 :]:
            if a.version == b.version and a.overlaps(b):
                raise InvalidArgument(f"node {name!r}: CIDRs {a} and {b} overlap")
    versions = {a.version for a in parsed}
    if routing == DIRECT and not local:
        for net in networks:
            if net.version not in versions:
                raise InvalidArgument(f"node {name!r}: CIDR {net} is IPv{net.version} but the node has no "
                                      f"IPv{net.version} underlay address to route it via")  # fmt: skip
    for net in networks:
        for ip in parsed:
            if ip in net:
                raise InvalidArgument(f"node {name!r}: underlay address {ip} lies in its endpoint CIDR {net}")
    return NodeRecord(name, node_id, tuple(str(a) for a in parsed), tuple(str(n) for n in networks), routing, key_index)


@dataclass
class NodeTable:
    """The remote nodes of this node, in the store, with their routes.

    `local` is this node's own record (from its flags); `endpoint_networks` gives the
    local endpoints' addresses, which no remote CIDR may cover. Like every class that
    owns maps and the store, it is used from the orchestrator's worker thread: another
    source (an etcd watcher) calls `upsert`/`delete` through `worker.call`, as the
    servicer does.
    """

    store: Store
    local: NodeRecord
    routing: Routing
    endpoint_networks: Callable[[], list[Network]]
    _listeners: list[Listener] = field(default_factory=list)

    def on_change(self, listener: Listener) -> None:
        """Call listener(kind, record) after a node is upserted ("UPSERTED") or deleted ("DELETED")."""
        self._listeners.append(listener)

    # ---- queries ----

    def get(self, name: str) -> NodeRecord:
        doc = self.store.get(KIND, name)
        if doc is None:
            raise NotFound(f"node {shown(name)} does not exist")
        return NodeRecord.from_doc(doc)

    def all(self) -> list[NodeRecord]:
        return [NodeRecord.from_doc(doc) for _, doc in self.store.items(KIND)]

    def list_page(self, page_size: int = 0, page_token: str = "") -> tuple[list[NodeRecord], str]:
        """A page of nodes ordered by name; the token is the last name returned."""
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size {page_size} is above the maximum of {MAX_PAGE_SIZE}")
        size = page_size or DEFAULT_PAGE_SIZE
        rest = [NodeRecord.from_doc(doc) for key, doc in self.store.items(KIND) if key > page_token]
        page = rest[:size]
        return page, (page[-1].name if len(rest) > size else "")

    # ---- changes ----

    def upsert(self, record: NodeRecord) -> NodeRecord:
        """Add or replace a remote node and its routes; refused input changes nothing."""
        self._check(record)
        old_doc = self.store.get(KIND, record.name)
        old = NodeRecord.from_doc(old_doc) if old_doc else None
        if old == record:
            return record
        with Change(self.store) as change:
            self.store.put(KIND, record.name, record.to_doc())
            change.attempt(lambda: self.routing.apply(old, record), undo=lambda: self.routing.apply(record, old))
        log.info("node upserted", node=record.name, node_id=record.node_id, routing=record.routing,
                 cidrs=list(record.cidrs))  # fmt: skip
        self._changed("UPSERTED", record)
        return record

    def delete(self, name: str) -> NodeRecord:
        """Forget a remote node and remove its routes and tunnel entries."""
        old = self.get(name)
        with Change(self.store) as change:
            self.store.delete(KIND, name)
            change.attempt(lambda: self.routing.apply(old, None), undo=lambda: self.routing.apply(None, old))
        log.info("node deleted", node=name)
        self._changed("DELETED", old)
        return old

    def underlay_networks(self) -> list[Network]:
        """Every remote node's underlay addresses, as host prefixes (the ipcache's remote-node entries)."""
        return underlay_networks(self.store)

    def reconcile(self) -> None:
        """After a (re)start: routes, overlay device and tunnel_map as the store says."""
        self.routing.reconcile(self.all())

    def check_endpoint_address(self, network: Network) -> None:
        """Refuse a local endpoint address that a remote node's CIDR covers."""
        for node in self.all():
            for net in node.networks():
                if net.version == network.version and network.subnet_of(net):  # type: ignore[arg-type]
                    raise InvalidArgument(f"address {network.network_address} lies in {net}, which node "
                                          f"{node.name!r} owns")  # fmt: skip

    # ---- helpers ----

    def _check(self, record: NodeRecord) -> None:
        if record.name == self.local.name:
            raise InvalidArgument(f"node {record.name!r} is this node (the local node is set by its flags)")
        if record.node_id == self.local.node_id:
            raise AlreadyExists(f"node_id {record.node_id} is the local node's ({self.local.name!r})")
        mine = record.networks()
        for net in mine:
            for local in self.local.networks():
                if net.version == local.version and net.overlaps(local):
                    raise InvalidArgument(f"node {record.name!r}: CIDR {net} overlaps the local node's {local}")
            for ep in self.endpoint_networks():
                if ep.version == net.version and ep.subnet_of(net):  # type: ignore[arg-type]
                    raise InvalidArgument(f"node {record.name!r}: CIDR {net} covers local endpoint address "
                                          f"{ep.network_address}")  # fmt: skip
        for address in record.addresses:
            if address in self.local.addresses:
                raise AlreadyExists(f"node {record.name!r}: address {address} is the local node's")
        for other in self.all():
            if other.name == record.name:
                continue
            if other.node_id == record.node_id:
                raise AlreadyExists(f"node_id {record.node_id} belongs to node {other.name!r}")
            shared = set(other.addresses) & set(record.addresses)
            if shared:
                raise AlreadyExists(f"node {record.name!r}: address {sorted(shared)[0]} belongs to node "
                                    f"{other.name!r}")  # fmt: skip
            for net in mine:
                for theirs in other.networks():
                    if net.version == theirs.version and net.overlaps(theirs):
                        raise InvalidArgument(f"node {record.name!r}: CIDR {net} overlaps {theirs} of node "
                                              f"{other.name!r}")  # fmt: skip

    def _changed(self, kind: str, record: NodeRecord) -> None:
        for listener in self._listeners:
            listener(kind, record)


def underlay_networks(store: Store) -> list[Network]:
    """The stored remote nodes' underlay addresses as host prefixes (readable before a `NodeTable`
    exists, so a restarted orchestrator's ipcache never loses them in between)."""
    records = [NodeRecord.from_doc(doc) for _, doc in store.items(KIND)]
    return [ipaddress.ip_network(a) for record in records for a in record.addresses]


def local_record(name: str, node_id: int, addresses: Iterable[str], cidrs: Iterable[str], routing: str) -> NodeRecord:
    """The local node's record from its flags."""
    return parse_record(name, node_id, addresses, cidrs, routing, 0, local=True)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The orchestrator's flags that describe the local node (GetLocalNode shows them)."""
    group = parser.add_argument_group("local node")
    group.add_argument("--node-id", type=int, default=1, help=f"this node's id, 1-{MAX_NODE_ID} (default 1)")
    group.add_argument(
        "--node-address", action="append", default=[], help="an underlay address of this node (IPv4 and/or IPv6)"
    )
    group.add_argument("--node-cidr", action="append", default=[], help="an endpoint CIDR this node owns (repeatable)")
    group.add_argument(
        "--routing",
        choices=ROUTING_MODES,
        default=DIRECT,
        help="how other nodes reach this one's endpoints; vxlan makes the overlay device at start (default direct)",
    )


def local_from_args(instance: str, args: argparse.Namespace) -> NodeRecord:
    """The local node's record from the flags; a bad flag exits with a usage error."""
    try:
        return local_record(instance, args.node_id, args.node_address, args.node_cidr, args.routing)
    except InvalidArgument as exc:
        raise SystemExit(f"weir-orchestrator: the local node's flags: {exc}") from None
