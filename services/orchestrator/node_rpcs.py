"""The orchestrator's remote-node RPCs: validate, call `NodeTable`, fill the reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
from weir.orchestrator.v1 import orchestrator_pb2 as pb

from services.common.errors import InvalidArgument
from services.common.worker import Worker
from services.orchestrator.nodes import NodeRecord, NodeTable, parse_record
from services.orchestrator.routing import DIRECT, VXLAN

Context = grpc.aio.ServicerContext[Any, Any]

MODES = {pb.ROUTING_MODE_UNSPECIFIED: DIRECT, pb.ROUTING_MODE_DIRECT: DIRECT, pb.ROUTING_MODE_VXLAN: VXLAN}
MODE_TO_PROTO = {DIRECT: pb.ROUTING_MODE_DIRECT, VXLAN: pb.ROUTING_MODE_VXLAN}


def node_from_proto(node: pb.Node) -> NodeRecord:
    if node.routing not in MODES:
        raise InvalidArgument(f"node {node.name!r}: routing {node.routing} is not one of "
                              f"{', '.join(pb.RoutingMode.keys()[1:])}")  # fmt: skip
    return parse_record(
        node.name, node.node_id, list(node.addresses), list(node.cidrs), MODES[node.routing], node.key_index
    )


def node_to_proto(record: NodeRecord) -> pb.Node:
    return pb.Node(
        name=record.name,
        node_id=record.node_id,
        addresses=list(record.addresses),
        cidrs=list(record.cidrs),
        routing=MODE_TO_PROTO[record.routing],
        key_index=record.key_index,
    )


class NodeRpcs:
    """UpsertNode, DeleteNode, GetNode, ListNodes, WatchNodes, GetLocalNode (mixed into the servicer)."""

    def __init__(self, worker: Worker, nodes: NodeTable) -> None:
        self._node_worker = worker
        self._nodes = nodes
        self._node_loop = asyncio.get_running_loop()
        self._node_watchers: set[asyncio.Queue[pb.NodeChange]] = set()
        nodes.on_change(self.node_changed)

    async def UpsertNode(self, request: pb.UpsertNodeRequest, context: Context) -> pb.Node:
        record = node_from_proto(request.node)
        return node_to_proto(await self._node_worker.call(self._nodes.upsert, record))

    async def DeleteNode(self, request: pb.DeleteNodeRequest, context: Context) -> pb.DeleteNodeResponse:
        await self._node_worker.call(self._nodes.delete, request.name)
        return pb.DeleteNodeResponse()

    async def GetNode(self, request: pb.GetNodeRequest, context: Context) -> pb.Node:
        return node_to_proto(await self._node_worker.call(self._nodes.get, request.name))

    async def GetLocalNode(self, request: pb.GetLocalNodeRequest, context: Context) -> pb.Node:
        return node_to_proto(self._nodes.local)

    async def ListNodes(self, request: pb.ListNodesRequest, context: Context) -> pb.ListNodesResponse:
        page, token = await self._node_worker.call(
            self._nodes.list_page, request.page.page_size, request.page.page_token
        )
        return pb.ListNodesResponse(nodes=[node_to_proto(n) for n in page], next_page_token=token)

    async def WatchNodes(self, request: pb.WatchNodesRequest, context: Context) -> AsyncIterator[pb.NodeChange]:
        queue: asyncio.Queue[pb.NodeChange] = asyncio.Queue()
        self._node_watchers.add(queue)  # before the snapshot: a change meanwhile is sent (again) after it
        try:
            for record in await self._node_worker.call(self._nodes.all):
                yield pb.NodeChange(kind="EXISTS", node=node_to_proto(record))
            yield pb.NodeChange(kind="SYNCED")
            while True:
                yield await queue.get()
        finally:
            self._node_watchers.discard(queue)

    def node_changed(self, kind: str, record: NodeRecord) -> None:
        """From the worker thread (or another source's): hand the change to every watcher on the loop."""
        change = pb.NodeChange(kind=kind, node=node_to_proto(record))
        for queue in list(self._node_watchers):
            self._node_loop.call_soon_threadsafe(queue.put_nowait, change)
