"""The Telemetry servicer every Weir service serves beside its own API.

It hands out the process's RPC counts (services/common/rpcmetrics.py) with the service's
and instance's names and the process's start time, so the node's Prometheus endpoint (the
orchestrator) can ask each service at scrape time over the socket it already has, and
tell a restarted process's fresh counts from a counter going backwards. It answers even
while a service is held (a store it cannot use): counting calls touches no state.
"""

from __future__ import annotations

from typing import Any

import grpc.aio
from weir.common.v1 import telemetry_pb2 as pb
from weir.common.v1 import telemetry_pb2_grpc as pb_grpc

from services.common import rpcmetrics

SERVICE_NAME = "weir.common.v1.Telemetry"


class TelemetryServicer(pb_grpc.TelemetryServicer):
    def __init__(self, service: str, instance: str) -> None:
        self._service = service
        self._instance = instance

    async def GetRpcCounts(
        self, request: pb.GetRpcCountsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RpcCounts:
        return pb.RpcCounts(
            service=self._service,
            instance=self._instance,
            start_time_seconds=rpcmetrics.START_TIME,
            counts=[pb.RpcCount(method=m, code=c, count=n) for m, c, n in rpcmetrics.counts()],
        )


def add_to_server(server: grpc.aio.Server, service: str, instance: str) -> str:
    """Register the servicer; returns its name (for reflection)."""
    pb_grpc.add_TelemetryServicer_to_server(TelemetryServicer(service, instance), server)
    return SERVICE_NAME
