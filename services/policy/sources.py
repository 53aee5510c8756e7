"""Where the policy service learns about the node: endpoints and host addresses.

Endpoints come from the orchestrator over its unix socket; a failure raises
(Unavailable) instead of answering "no endpoints", so a restarting
orchestrator never makes the policy service drop everyone's policy.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
from pyroute2 import IPRoute
from weir.common.v1 import common_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc

from services.common.errors import Unavailable
from services.prefilter.cidr import Network

PAGE = 1000
TIMEOUT = 5.0
RECONNECT_SECONDS = 1.0


class OrchestratorEndpoints:
    """Fetches the node's endpoints: (name, id, ipv4, ipv6, labels) tuples."""

    def __init__(self, socket_path: Path) -> None:
        self._socket = socket_path
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        self._stub = orch_grpc.OrchestratorStub(self._channel)

    def __call__(self) -> list[tuple[str, int, str, str, dict[str, str]]]:
        out = []
        token = ""
        try:
            while True:
                reply = self._stub.ListEndpoints(
                    orch_pb.ListEndpointsRequest(page=common_pb2.PageRequest(page_size=PAGE, page_token=token)),
                    timeout=TIMEOUT,
                )
                out += [(e.name, e.id, e.ipv4, e.ipv6, dict(e.labels)) for e in reply.endpoints]
                token = reply.next_page_token
                if not token:
                    return out
        except grpc.RpcError as exc:
            raise Unavailable(f"the orchestrator at {self._socket} does not answer: {exc.code().name}") from None

    def close(self) -> None:
        self._channel.close()


def host_addresses() -> list[Network]:
    """Every address of this (the node's) network namespace, as host routes."""
    with IPRoute() as ipr:
        addresses = [str(a.get("address")) for a in ipr.get_addr()]
    return [ipaddress.ip_network(a) for a in addresses if a and a != "None"]


async def watch_endpoints(socket_path: Path, on_change: Callable[[], Awaitable[object]]) -> None:
    """Call on_change whenever the orchestrator creates or deletes an endpoint, forever.

    The stream is re-opened after an error (the orchestrator restarting); the
    periodic refresh covers whatever happens while it is down.
    """
    while True:
        try:
            async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
                stub = orch_grpc.OrchestratorStub(channel)
                async for _ in stub.WatchEndpoints(orch_pb.WatchEndpointsRequest()):
                    await on_change()
        except grpc.RpcError:
            pass
        await asyncio.sleep(RECONNECT_SECONDS)
