"""The orchestrator's node table as the ipsec service's peers: a follower of WatchNodes.

Every remote node with a key index above 0 (a node that has a key and publishes its
index) is a peer: its underlay address of the local underlay's family, its endpoint
CIDRs, its key index as the newest key it has, VXLAN routing as an overlay peer. A node
with key index 0 does not encrypt and is no peer; a peer it was is deleted, and its CIDRs
stay blocked, as for any deleted peer (never plaintext; `ForgetCidrs` opens them).

Each change re-syncs the whole set (`sync`), so the snapshot after a reconnection also
removes the peers of nodes deleted while the stream was down. Peers from the API are
left alone. The stream reconnects with backoff when the orchestrator restarts; the
datapath keeps what it has meanwhile.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import structlog
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc

from services.common.errors import WeirError
from services.common.worker import Worker
from services.ipsec.ipsec import NODES, Ipsec

log = structlog.get_logger("weir.ipsec")

FIRST_RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 8.0
TIMEOUT = 10.0


@dataclass(frozen=True)
class NodeView:
    """What the ipsec service needs of a node record."""

    name: str
    node_id: int
    addresses: tuple[str, ...]
    cidrs: tuple[str, ...]
    vxlan: bool
    key_index: int


def node_view(msg: orch_pb.Node) -> NodeView:
    return NodeView(
        msg.name,
        msg.node_id,
        tuple(msg.addresses),
        tuple(msg.cidrs),
        msg.routing == orch_pb.ROUTING_MODE_VXLAN,
        msg.key_index,
    )


def sync(ipsec: Ipsec, nodes: Iterable[NodeView]) -> list[str]:
    """Make the node table's peers match `nodes`; returns one line per node that cannot be a peer."""
    wanted = {n.name: n for n in nodes if n.key_index > 0}
    for peer in ipsec.peers():
        if peer.source == NODES and peer.name not in wanted:
            ipsec.delete_peer(peer.name, source=NODES)
            log.info("peer deleted: its node is gone or has no key index", peer=peer.name)
    local = ipsec.local()
    if local is None:
        return [f"{len(wanted)} node(s) wait for the local node (SetLocalNode)"] if wanted else []
    problems = []
    for node in wanted.values():
        address = next((a for a in node.addresses if ipaddress.ip_address(a).version == local.underlay.version), "")
        if not address:
            problems.append(f"node {node.name!r} has no IPv{local.underlay.version} underlay address")
            continue
        try:
            ipsec.upsert_peer(node.name, node.node_id, address, node.cidrs, node.key_index, node.vxlan, NODES)
        except WeirError as exc:
            problems.append(f"node {node.name!r}: {exc}")
    ipsec.check_overlay()
    return problems


class NodeFollower:
    """Follows the orchestrator's WatchNodes stream into the ipsec service's peers."""

    def __init__(self, socket_path: Path, worker: Worker, ipsec: Ipsec) -> None:
        self._socket = socket_path
        self._worker = worker
        self._ipsec = ipsec
        self._nodes: dict[str, NodeView] | None = None  # None until the first snapshot
        self._problems: list[str] = []

    async def run(self) -> None:
        """Forever: connect, take the snapshot, follow changes; reconnect after 0.5, 1, 2 ... 8 s."""
        delay = FIRST_RETRY_SECONDS
        down = False
        while True:
            try:
                async with grpc.aio.insecure_channel(f"unix://{self._socket}") as channel:
                    stub = orch_grpc.OrchestratorStub(channel)
                    await self._adopt_local(stub)
                    pending: dict[str, NodeView] = {}
                    async for change in stub.WatchNodes(orch_pb.WatchNodesRequest()):
                        delay, down = FIRST_RETRY_SECONDS, False
                        if change.kind == "EXISTS":
                            pending[change.node.name] = node_view(change.node)
                        elif change.kind == "SYNCED":
                            self._nodes = pending
                            await self.resync()
                        elif self._nodes is not None and change.kind == "UPSERTED":
                            self._nodes[change.node.name] = node_view(change.node)
                            await self.resync()
                        elif self._nodes is not None and change.kind == "DELETED":
                            self._nodes.pop(change.node.name, None)
                            await self.resync()
            except grpc.RpcError as exc:
                (log.debug if down else log.info)(
                    "node stream interrupted; reconnecting", code=exc.code().name, retry_seconds=delay
                )
                down = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_SECONDS)

    async def resync(self) -> None:
        """Apply the last known node set again (also periodically: a refused node may become possible)."""
        if self._nodes is None:
            return
        try:
            problems = await self._worker.call(sync, self._ipsec, list(self._nodes.values()))
        except (WeirError, OSError) as exc:
            problems = [f"sync failed: {exc}"]
        if problems != self._problems:
            for line in problems:
                log.warning("a node is not made a peer", problem=line)
            self._problems = problems

    async def _adopt_local(self, stub: orch_grpc.OrchestratorAsyncStub) -> None:
        """No local node set yet: take the orchestrator's (its first IPv4 underlay address, else IPv6)."""
        if await self._worker.call(self._ipsec.local) is not None:
            return
        local = await stub.GetLocalNode(orch_pb.GetLocalNodeRequest(), timeout=TIMEOUT)
        addresses = sorted(local.addresses, key=lambda a: ipaddress.ip_address(a).version)
        if not addresses:
            return
        try:
            await self._worker.call(self._ipsec.set_local, local.name, local.node_id, addresses[0])
            log.info("local node taken from the orchestrator", name=local.name, node_id=local.node_id)
        except WeirError as exc:
            log.warning("the orchestrator's local node cannot be this service's", error=str(exc))
