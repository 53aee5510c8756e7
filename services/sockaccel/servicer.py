"""The fast path's gRPC layer: convert, call one `SockAccel` method, fill the reply."""

from __future__ import annotations

from typing import Any

import grpc.aio
from weir.sockaccel.v1 import sockaccel_pb2 as pb
from weir.sockaccel.v1 import sockaccel_pb2_grpc as pb_grpc

from services.common import validate
from services.common.worker import Worker
from services.sockaccel.sockaccel import INHERIT, OFF, ON, Counters, ModeChange, SockAccel

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SockAccel"].full_name
Context = grpc.aio.ServicerContext[Any, Any]

NODE_MODES = {pb.MODE_ON: True, pb.MODE_OFF: False}
ENDPOINT_MODES = {pb.MODE_ON: ON, pb.MODE_OFF: OFF, pb.MODE_INHERIT: INHERIT}
MODE_NAMES = {ON: pb.MODE_ON, OFF: pb.MODE_OFF, INHERIT: pb.MODE_INHERIT}


def _change(change: ModeChange) -> pb.ModeResponse:
    return pb.ModeResponse(revision=change.revision, changed=change.changed)


def _counters(c: Counters) -> pb.Counters:
    return pb.Counters(
        accelerated_current=c.accelerated_current,
        accelerated_total=c.accelerated_total,
        messages_redirected=c.messages_redirected,
        bytes_redirected=c.bytes_redirected,
        messages_passed=c.messages_passed,
        fallbacks=c.fallbacks,
        refused=c.refused,
        resumed=c.resumed,
    )


class SockAccelServicer(pb_grpc.SockAccelServicer):
    def __init__(self, worker: Worker, accel: SockAccel) -> None:
        self._worker = worker
        self._accel = accel

    async def SetMode(self, request: pb.SetModeRequest, context: Context) -> pb.ModeResponse:
        enabled = validate.choice(request.mode, NODE_MODES, "mode (MODE_ON or MODE_OFF for the node)")
        return _change(await self._worker.call(self._accel.set_mode, enabled))

    async def SetEndpointMode(self, request: pb.SetEndpointModeRequest, context: Context) -> pb.ModeResponse:
        mode = validate.choice(request.mode, ENDPOINT_MODES, "mode (MODE_ON, MODE_OFF or MODE_INHERIT)")
        return _change(await self._worker.call(self._accel.set_endpoint_mode, request.endpoint, mode))

    async def GetStatus(self, request: pb.GetStatusRequest, context: Context) -> pb.Status:
        s = await self._worker.call(self._accel.status)
        return pb.Status(
            mode=pb.MODE_ON if s.enabled else pb.MODE_OFF,
            supported=s.supported,
            unsupported_reason=s.unsupported_reason,
            policy_bound=s.policy_bound,
            attached=s.attached,
            endpoints=[pb.EndpointMode(endpoint=n, mode=MODE_NAMES[m]) for n, m in sorted(s.endpoints.items())],
            counters=_counters(s.counters),
            revision=s.revision,
        )

    async def ListConnections(self, request: pb.ListConnectionsRequest, context: Context) -> pb.ListConnectionsResponse:
        found, token = await self._worker.call(self._accel.connections, request.page.page_size, request.page.page_token)
        return pb.ListConnectionsResponse(
            connections=[
                pb.Connection(
                    local=c.socket.local,
                    local_port=c.socket.local_port,
                    remote=c.socket.remote,
                    remote_port=c.socket.remote_port,
                    role=c.role,
                    state=c.state,
                    reason=c.reason,
                    client_endpoint=c.socket.conn.client_endpoint,
                    server_endpoint=c.socket.conn.server_endpoint,
                    client_identity=c.socket.conn.client_identity,
                    server_identity=c.socket.conn.server_identity,
                    server_port=c.socket.conn.server_port,
                    messages=c.socket.conn.msgs,
                    bytes=c.socket.conn.bytes,
                    cookie=c.socket.conn.cookie,
                )
                for c in found
            ],
            next_page_token=token,
        )
