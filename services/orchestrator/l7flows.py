"""L7 requests as flows: the l7 service's access-log events, followed into the node's flow buffer.

Envoy's access log reaches the l7 service over the gRPC access log service; this follows
that service's `WatchEvents` stream and turns each request into a flow of type L7 (verdict
FORWARDED when a rule allowed it, DROPPED with POLICY_DENIED when Envoy answered 403), with
the method, path, host, status and rule. The l7 service is optional and may restart: the
stream is reopened with backoff, quietly, asking for the events the service still keeps, so
requests made before the stream (re)opened are not missed; those already taken are skipped
by their time and identity.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import grpc
import structlog
from weir.common.v1 import common_pb2
from weir.l7.v1 import l7_pb2 as pb
from weir.l7.v1 import l7_pb2_grpc as pb_grpc

from services.common.datapath import Hook, Reason
from services.orchestrator.events import FlowEvent, L7Info

log = structlog.get_logger("weir.orchestrator.l7flows")

RETRY_FIRST = 0.5
RETRY_MAX = 5.0
# An ingress listener serves the server endpoint (its to-container side), an egress one the client.
HOOKS = {common_pb2.DIRECTION_INGRESS: Hook.TO_CONTAINER, common_pb2.DIRECTION_EGRESS: Hook.FROM_CONTAINER}


def _split(address: str) -> tuple[str, int]:
    """ "a.b.c.d:port" or "[v6]:port" into (address, port); anything else as (text, 0)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address, 0
    return host.strip("[]"), int(port)


def to_flow_event(event: pb.L7Event, endpoint_id: int) -> FlowEvent:
    allowed = event.verdict == pb.VERDICT_ALLOWED
    src, src_port = _split(event.source)
    dst, dst_port = _split(event.destination)
    return FlowEvent(
        type="L7",
        reason=Reason.FORWARDED.name if allowed else Reason.POLICY_DENIED.name,
        hook=HOOKS.get(event.direction, Hook.TO_CONTAINER),
        ifindex=0,
        endpoint_id=endpoint_id,
        length=0,
        src_identity=0,
        dst_identity=0,
        protocol="TCP",
        src=src,
        dst=dst,
        src_port=src_port,
        dst_port=dst_port or event.port,
        l7=L7Info(event.method, event.path, event.host, event.status, event.rule, allowed),
    )


class L7Follower:
    """A task that keeps a WatchEvents stream to the l7 service open and hands each event on."""

    def __init__(
        self, socket_path: Path, on_event: Callable[[FlowEvent], object], endpoint_id: Callable[[str], int]
    ) -> None:
        """endpoint_id(name) gives the id of the endpoint a listener belongs to (0 if unknown)."""
        self._target = f"unix://{socket_path}"
        self._socket = socket_path
        self._on_event = on_event
        self._endpoint_id = endpoint_id
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self.received = 0
        self._last_ms = 0  # the newest event time taken, and the events taken at that time
        self._at_last: set[bytes] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="l7-flows")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = RETRY_FIRST
        while True:
            if self._socket.exists():
                try:
                    await self._follow()
                    delay = RETRY_FIRST  # a stream that ended cleanly: the service stopped
                except grpc.aio.AioRpcError as exc:
                    log.debug("l7 events unavailable", code=exc.code().name)
                finally:
                    self.connected = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _follow(self) -> None:
        async with grpc.aio.insecure_channel(self._target) as channel:
            stream = pb_grpc.L7Stub(channel).WatchEvents(pb.WatchEventsRequest(replay=True))
            self.connected = True
            async for event in stream:
                if self._taken(event):
                    continue
                self.received += 1
                self._on_event(to_flow_event(event, self._endpoint_id(event.endpoint)))

    def _taken(self, event: pb.L7Event) -> bool:
        """Whether a replayed event was taken before (events come in time order)."""
        key = event.SerializeToString(deterministic=True)
        if event.time_unix_ms < self._last_ms or (event.time_unix_ms == self._last_ms and key in self._at_last):
            return True
        if event.time_unix_ms > self._last_ms:
            self._last_ms, self._at_last = event.time_unix_ms, set()
        self._at_last.add(key)
        return False
