"""Envoy's control plane: an aggregated (ADS), state-of-the-world xDS server.

Every generation of the configuration (`resources.Resources`) has one version, used for
every resource type. A connected Envoy is sent clusters, then listeners, then the route
configurations it asks for, each with a fresh nonce; when the configuration changes,
every stream gets the new generation in that order. Envoy answers each response with
an ACK (the version it now runs) or a NACK (``error_detail``): a NACK is recorded for
the API and logged, and nothing is sent again until the configuration or what Envoy asks
for changes, so a resource Envoy refuses is never retried in a loop. Envoy keeps the
last configuration it accepted in force.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc.aio
import structlog
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from services.common.server import GRPC_OPTIONS
from services.l7.accesslog import AccessLog
from services.l7.resources import LISTENER, ROUTE, TYPES, Resources

log = structlog.get_logger("weir.l7.xds")
Context = grpc.aio.ServicerContext[Any, Any]
MAX_NACK_MESSAGE = 2048


@dataclass(frozen=True)
class Nack:
    """Envoy refused ``version`` of ``type_url`` and said why."""

    version: int
    type_url: str
    message: str
    time_unix_ms: int


@dataclass
class _Sent:
    version: int
    names: frozenset[str]
    nonce: str


class _Changed:
    """Queued on a stream when a new generation is published."""


_CHANGED = _Changed()


@dataclass
class _Stream:
    """One Envoy's ADS stream: what it asked for, what it was sent, what it acknowledged."""

    node: str
    queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | _Changed | None] = field(default_factory=asyncio.Queue)
    subscribed: dict[str, frozenset[str]] = field(default_factory=dict)  # type -> names asked for
    sent: dict[str, _Sent] = field(default_factory=dict)
    acked: dict[str, tuple[int, frozenset[str]]] = field(default_factory=dict)  # type -> (version, names)


@dataclass(frozen=True)
class XdsStatus:
    version: int  # the generation served
    acked_version: int  # the newest generation the newest stream acknowledged for every type it needs
    last_nack: Nack | None
    streams: int
    node: str


class Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """The ADS servicer and the generation it serves; `publish` is safe from any thread."""

    def __init__(self, initial: Resources) -> None:
        self._lock = threading.Lock()
        self._current = initial
        self._streams: list[_Stream] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nonces = itertools.count(1)
        self._last_nack: Nack | None = None
        self._applied = asyncio.Condition()

    @property
    def current(self) -> Resources:
        with self._lock:
            return self._current

    def publish(self, resources: Resources) -> None:
        """Serve ``resources`` from now on and push them to every connected Envoy."""
        with self._lock:
            self._current = resources
            streams = list(self._streams)
            loop = self._loop
        log.info("xds.publish", version=resources.version, streams=len(streams))
        if loop is None or loop.is_closed():
            return
        for stream in streams:
            loop.call_soon_threadsafe(stream.queue.put_nowait, _CHANGED)

    def status(self) -> XdsStatus:
        with self._lock:
            current = self._current
            newest = self._streams[-1] if self._streams else None
            return XdsStatus(
                version=current.version,
                acked_version=_acked_version(newest, current) if newest else 0,
                last_nack=self._last_nack,
                streams=len(self._streams),
                node=newest.node if newest else "",
            )

    async def wait_applied(self, version: int, timeout: float) -> tuple[bool, Nack | None]:
        """Wait until an Envoy acknowledges ``version`` (or a newer one), or refuses it."""
        deadline = time.monotonic() + timeout
        async with self._applied:
            while True:
                status = self.status()
                if status.acked_version >= version:
                    return True, None
                if status.last_nack is not None and status.last_nack.version >= version:
                    return False, status.last_nack
                left = deadline - time.monotonic()
                if left <= 0:
                    return False, None
                try:
                    await asyncio.wait_for(self._applied.wait(), left)
                except TimeoutError:
                    return False, None

    async def _notify(self) -> None:
        async with self._applied:
            self._applied.notify_all()

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Context
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stream = _Stream(node="")
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._streams.append(stream)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    stream.queue.put_nowait(request)
            finally:
                stream.queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await stream.queue.get()) is not None:
                types = TYPES if isinstance(item, _Changed) else self._on_request(stream, item)
                for type_url in types:
                    response = self._response(stream, type_url)
                    if response is not None:
                        yield response
                await self._notify()
        finally:
            reader.cancel()
            with self._lock:
                self._streams.remove(stream)
            log.info("xds.stream_closed", node=stream.node)
            await self._notify()

    def _on_request(self, stream: _Stream, request: discovery_pb2.DiscoveryRequest) -> tuple[str, ...]:
        """Record what one request says (subscription, ACK, NACK); the types to answer."""
        type_url = request.type_url
        if type_url not in TYPES:
            log.warning("xds.unknown_type", type_url=type_url)
            return ()
        if request.node.id and not stream.node:
            stream.node = request.node.id
            log.info("xds.stream_opened", node=stream.node)
        sent = stream.sent.get(type_url)
        # A nonce other than the last one sent answers a response a newer one replaced: ignored.
        # (With nothing sent yet on this stream, e.g. after our restart, it is a first request.)
        if request.response_nonce and sent is not None and request.response_nonce != sent.nonce:
            return ()
        if request.HasField("error_detail") and sent is not None:
            nack = Nack(
                sent.version,
                type_url,
                request.error_detail.message[:MAX_NACK_MESSAGE],
                int(time.time() * 1000),
            )
            with self._lock:
                self._last_nack = nack
            log.warning("xds.nack", node=stream.node, version=nack.version, type_url=type_url, message=nack.message)
        elif sent is not None and request.response_nonce == sent.nonce:
            stream.acked[type_url] = (sent.version, sent.names)
        stream.subscribed[type_url] = frozenset(request.resource_names)
        return (type_url,)

    def _response(self, stream: _Stream, type_url: str) -> discovery_pb2.DiscoveryResponse | None:
        """What to send on ``type_url`` now, or None if Envoy has it (or refused it) already."""
        if type_url not in stream.subscribed:
            return None
        current = self.current
        available = current.by_type[type_url]
        names = stream.subscribed[type_url]
        wildcard = type_url != ROUTE and (not names or "*" in names)
        chosen = frozenset(available) if wildcard else frozenset(n for n in names if n in available)
        sent = stream.sent.get(type_url)
        if sent is not None and sent.version == current.version and sent.names == chosen:
            return None
        nonce = str(next(self._nonces))
        stream.sent[type_url] = _Sent(current.version, chosen, nonce)
        return discovery_pb2.DiscoveryResponse(
            version_info=str(current.version),
            type_url=type_url,
            nonce=nonce,
            resources=[available[n] for n in sorted(chosen)],
        )


def _acked_version(stream: _Stream, current: Resources) -> int:
    """The generation ``stream`` runs for every type it needs (routes: every current one)."""
    versions = []
    for type_url in TYPES:
        needed = frozenset(current.by_type[type_url])
        if type_url == ROUTE and not needed:
            continue
        acked = stream.acked.get(type_url)
        if acked is None:
            return 0
        version, names = acked
        if type_url == ROUTE and not needed <= names:
            return 0
        versions.append(version)
    if LISTENER not in stream.acked:
        return 0
    return min(versions)


async def serve_control(path: Path, ads: Ads, access: AccessLog) -> grpc.aio.Server:
    """The server Envoy talks to: ADS and the access log service, on a 0600 unix socket."""
    path.unlink(missing_ok=True)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(access, server)
    old = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{path.absolute()}")
        await server.start()
    finally:
        os.umask(old)
    return server
