"""The load balancer's gRPC layer: convert, call one `LoadBalancer` method, fill the reply."""

from __future__ import annotations

from typing import Any

import grpc.aio
from weir.lb.v1 import lb_pb2 as pb
from weir.lb.v1 import lb_pb2_grpc as pb_grpc

from services.common import validate
from services.common.errors import InvalidArgument
from services.common.worker import Worker
from services.lb import model
from services.lb.lb import LoadBalancer
from services.lb.maps import Counts
from services.lb.model import Service

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LoadBalancer"].full_name
Context = grpc.aio.ServicerContext[Any, Any]


def _counter(c: Counts) -> pb.LbCounter:
    return pb.LbCounter(packets=c.packets, bytes=c.bytes, new_connections=c.new_conns)


class LoadBalancerServicer(pb_grpc.LoadBalancerServicer):
    def __init__(self, worker: Worker, lb: LoadBalancer) -> None:
        self._worker = worker
        self._lb = lb

    async def _reply(self, service: Service) -> pb.Service:
        return (await self._replies([service]))[0]

    async def _replies(self, services: list[Service]) -> list[pb.Service]:
        """The services as answered, ids and frontends read in one trip to the worker (not two per service)."""

        def ids_and_frontends() -> list[tuple[int, list[str]]]:
            return [(self._lb.service_id(s.name), self._lb.frontends(s.name)) for s in services]

        out = []
        for service, (service_id, frontends) in zip(services, await self._worker.call(ids_and_frontends), strict=True):
            msg = model.to_proto(service)
            msg.id = service_id
            msg.frontends.extend(frontends)
            out.append(msg)
        return out

    async def UpsertService(self, request: pb.UpsertServiceRequest, context: Context) -> pb.Service:
        if not request.HasField("service"):
            raise InvalidArgument("service is required")
        return await self._reply(await self._worker.call(self._lb.upsert, request.service))

    async def UpsertServices(self, request: pb.UpsertServicesRequest, context: Context) -> pb.UpsertServicesResponse:
        services = await self._worker.call(self._lb.upsert_many, list(request.services))
        return pb.UpsertServicesResponse(services=await self._replies(services))

    async def DeleteService(self, request: pb.DeleteServiceRequest, context: Context) -> pb.DeleteServiceResponse:
        await self._worker.call(self._lb.delete, request.name)
        return pb.DeleteServiceResponse()

    async def GetService(self, request: pb.GetServiceRequest, context: Context) -> pb.Service:
        return await self._reply(await self._worker.call(self._lb.get, request.name))

    async def ListServices(self, request: pb.ListServicesRequest, context: Context) -> pb.ListServicesResponse:
        services, token = await self._worker.call(self._lb.list_page, request.page.page_size, request.page.page_token)
        return pb.ListServicesResponse(services=await self._replies(services), next_page_token=token)

    async def SetBackend(self, request: pb.SetBackendRequest, context: Context) -> pb.Service:
        chosen = validate.choice(request.state, model.STATES, "state")
        state = chosen if request.state else None
        weight = request.weight if request.HasField("weight") else None
        service = await self._worker.call(
            self._lb.set_backend, request.service, request.address, request.port, weight, state
        )
        return await self._reply(service)

    async def GetCounters(self, request: pb.GetCountersRequest, context: Context) -> pb.GetCountersResponse:
        service, backends = await self._worker.call(self._lb.counters, request.service)
        return pb.GetCountersResponse(
            service=_counter(service),
            backends=[pb.BackendCounter(address=b.address, port=b.port, counter=_counter(c)) for b, c in backends],
        )
