"""The orchestrator's endpoints, followed on its watch stream (a snapshot first, then changes).

The fast path needs to know which local addresses are endpoints and which endpoint id
policy keys them by; the orchestrator owns that. The stream reconnects forever, so the
service starts without the orchestrator and catches up when it comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
import structlog
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc

from services.sockaccel.sockaccel import EndpointView

log = structlog.get_logger("weir.sockaccel")
RECONNECT_SECONDS = 0.5

OnEndpoints = Callable[[bool, list[EndpointView], list[str]], Awaitable[object]]


def endpoint_view(msg: orch_pb.Endpoint) -> EndpointView:
    return EndpointView(msg.name, msg.id, msg.ipv4, msg.ipv6)


async def follow_endpoints(socket_path: Path, on_change: OnEndpoints) -> None:
    """on_change(snapshot, upserted, deleted names) for every endpoint change, forever."""
    while True:
        try:
            async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
                stub = orch_grpc.OrchestratorStub(channel)
                pending: list[EndpointView] = []
                async for change in stub.WatchEndpoints(orch_pb.WatchEndpointsRequest(snapshot=True)):
                    if change.kind == "EXISTS":
                        pending.append(endpoint_view(change.endpoint))
                    elif change.kind == "SYNCED":
                        await on_change(True, pending, [])
                        pending = []
                    elif change.kind == "DELETED":
                        await on_change(False, [], [change.name])
                    else:
                        await on_change(False, [endpoint_view(change.endpoint)], [])
        except grpc.RpcError as exc:
            log.info("endpoint stream interrupted; reconnecting", code=exc.code().name)
        await asyncio.sleep(RECONNECT_SECONDS)
