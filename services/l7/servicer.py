"""The L7 service's gRPC layer: convert, call `L7Proxy` (or read the sidecar, xDS, access log), reply."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
from weir.common.v1 import common_pb2
from weir.l7.v1 import l7_pb2 as pb
from weir.l7.v1 import l7_pb2_grpc as pb_grpc

from services.common import validate
from services.common.worker import Worker
from services.l7 import model
from services.l7.accesslog import AccessLog, L7Event
from services.l7.envoy import Sidecar
from services.l7.model import HeaderMatch, HttpRule, Listener
from services.l7.proxy import L7Proxy
from services.l7.xds import Ads

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["L7"].full_name
Context = grpc.aio.ServicerContext[Any, Any]
APPLY_TIMEOUT = 5.0

DIRECTIONS = {common_pb2.DIRECTION_INGRESS: "ingress", common_pb2.DIRECTION_EGRESS: "egress"}
DIRECTION_NUMBERS = {name: number for number, name in DIRECTIONS.items()}


def _header(h: pb.HeaderMatch) -> HeaderMatch:
    return HeaderMatch(h.name, h.exact if h.WhichOneof("match") == "exact" else None)


def _rule(r: pb.HttpRule, where: str) -> HttpRule:
    validate.at_most(len(r.headers), model.MAX_HEADERS, f"headers in {where}")
    validate.at_most(len(r.sources), model.MAX_SOURCES, f"sources in {where}")
    validate.at_most(len(r.destinations), model.MAX_SOURCES, f"destinations in {where}")
    return HttpRule(
        r.name, r.method, r.path, r.host, tuple(_header(h) for h in r.headers), tuple(r.sources),
        tuple(r.destinations),
    )  # fmt: skip


def listener_from(endpoint: str, x: pb.Listener, where: str) -> Listener:
    validate.at_most(len(x.rules), model.MAX_RULES, f"rules in {where}")
    return Listener(
        endpoint=endpoint,
        direction=validate.choice(x.direction, DIRECTIONS, f"{where}.direction"),
        port=x.port,
        proxy_port=x.proxy_port,
        rules=tuple(_rule(r, f"{where}.rules[{i}]") for i, r in enumerate(x.rules)),
        upstream=x.upstream,
        bind_address=x.bind_address or model.DEFAULT_BIND,
        transparent=x.transparent,
        use_original_dst=x.use_original_dst,
        protocol=validate.protocol(x.protocol, f"{where}.protocol", allowed=("TCP",)),
        upstream_mark=x.upstream_mark,
    )


def listener_pb(x: Listener) -> pb.Listener:
    return pb.Listener(
        direction=DIRECTION_NUMBERS[x.direction],
        port=x.port,
        protocol=x.protocol,
        proxy_port=x.proxy_port,
        rules=[
            pb.HttpRule(
                name=r.name,
                method=r.method,
                path=r.path,
                host=r.host,
                headers=[
                    pb.HeaderMatch(name=h.name, exact=h.exact)
                    if h.exact is not None
                    else pb.HeaderMatch(name=h.name, present=True)
                    for h in r.headers
                ],
                sources=r.sources,
                destinations=r.destinations,
            )
            for r in x.rules
        ],
        upstream=x.upstream,
        bind_address=x.bind_address,
        transparent=x.transparent,
        use_original_dst=x.use_original_dst,
        upstream_mark=x.upstream_mark,
    )


def event_pb(e: L7Event, listeners: dict[str, Listener]) -> pb.L7Event:
    found = listeners.get(e.listener)
    endpoint, direction, port = e.endpoint, "", 0
    if found is not None:
        direction, port = found.direction, found.port
    else:
        parts = e.listener.split("/")
        if len(parts) == 3 and parts[2].isdigit():
            direction, port = parts[1], int(parts[2])
    return pb.L7Event(
        time_unix_ms=e.time_unix_ms,
        endpoint=endpoint,
        direction=DIRECTION_NUMBERS.get(direction, common_pb2.DIRECTION_UNSPECIFIED),
        port=port,
        method=e.method,
        path=e.path,
        host=e.host,
        status=e.status,
        source=e.source,
        destination=e.destination,
        rule=e.rule,
        verdict=pb.VERDICT_ALLOWED if e.allowed else pb.VERDICT_DENIED,
        details=e.details,
    )


class L7Servicer(pb_grpc.L7Servicer):
    def __init__(self, worker: Worker, proxy: L7Proxy, ads: Ads, access: AccessLog, sidecar: Sidecar) -> None:
        self._worker = worker
        self._proxy = proxy
        self._ads = ads
        self._access = access
        self._sidecar = sidecar

    async def SetListeners(self, request: pb.SetListenersRequest, context: Context) -> pb.SetListenersResponse:
        validate.at_most(len(request.listeners), model.MAX_LISTENERS_PER_ENDPOINT, "listeners")
        validate.name(request.endpoint, "endpoint")
        listeners = [listener_from(request.endpoint, x, f"listeners[{i}]") for i, x in enumerate(request.listeners)]
        change = await self._worker.call(self._proxy.set_listeners, request.endpoint, listeners)
        reply = pb.SetListenersResponse(config_version=change.version, changed=change.changed)
        if request.wait_applied:
            applied, nack = await self._ads.wait_applied(change.version, APPLY_TIMEOUT)
            reply.applied = applied
            reply.nack = nack.message if nack is not None else ""
        return reply

    async def GetState(self, request: pb.GetStateRequest, context: Context) -> pb.State:
        if request.endpoint:
            validate.name(request.endpoint, "endpoint")
        endpoints = await self._worker.call(self._proxy.listeners, request.endpoint)
        await self._sidecar.check()
        status = self._ads.status()
        sidecar = self._sidecar.status()
        state = pb.State(
            endpoints=[
                pb.EndpointListeners(endpoint=name, listeners=[listener_pb(x) for x in xs])
                for name, xs in endpoints.items()
            ],
            config_version=status.version,
            acked_version=status.acked_version,
            envoy=pb.EnvoyStatus(
                managed=sidecar.managed,
                ready=sidecar.ready,
                pid=sidecar.pid,
                restarts=sidecar.restarts,
                last_exit=sidecar.last_exit,
                connected=status.streams > 0,
            ),
        )
        if status.last_nack is not None:
            n = status.last_nack
            state.last_nack.CopyFrom(
                pb.Nack(version=n.version, type_url=n.type_url, message=n.message, time_unix_ms=n.time_unix_ms)
            )
        return state

    async def GetCounters(self, request: pb.GetCountersRequest, context: Context) -> pb.GetCountersResponse:
        if request.endpoint:
            validate.name(request.endpoint, "endpoint")
        listeners = await self._worker.call(self._proxy.by_name)
        counters = []
        for (name, rule), count in sorted(self._access.counters().items()):
            found = listeners.get(name)
            if found is None or (request.endpoint and found.endpoint != request.endpoint):
                continue
            counters.append(
                pb.RuleCounter(
                    endpoint=found.endpoint,
                    direction=DIRECTION_NUMBERS[found.direction],
                    port=found.port,
                    rule=rule,
                    allowed=count.allowed,
                    denied=count.denied,
                )
            )
        return pb.GetCountersResponse(counters=counters)

    async def WatchEvents(self, request: pb.WatchEventsRequest, context: Context) -> AsyncIterator[pb.L7Event]:
        if request.endpoint:
            validate.name(request.endpoint, "endpoint")
        with self._access.events.subscribe() as subscription:
            listeners = await self._worker.call(self._proxy.by_name)
            replayed = self._access.recent() if request.replay else []
            for event in replayed:
                if not request.endpoint or event.endpoint == request.endpoint:
                    yield event_pb(event, listeners)
            seen = {id(e) for e in replayed}  # an event recorded while replaying comes twice
            async for event in subscription:
                if id(event) in seen:
                    continue
                if not request.endpoint or event.endpoint == request.endpoint:
                    if event.listener not in listeners:
                        listeners = await self._worker.call(self._proxy.by_name)
                    yield event_pb(event, listeners)
