"""Envoy's access log, received over gRPC (ALS) and turned into L7 events and counters.

Each HTTP entry names its listener through a custom tag the listener's logger carries
(`resources.LISTENER_TAG`), and the rule that allowed it through the RBAC filter's
dynamic metadata (the id of the policy that matched, which is the rule's name). A request
no rule matched is Envoy's 403 with ``rbac_access_denied`` in its details. Events go to
a bounded buffer (the newest kept) and to every watcher; counters are per rule (allowed)
and per listener (denied).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc.aio
import structlog
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from services.common.broadcast import Broadcast
from services.l7.resources import LISTENER_TAG, RBAC_FILTER

log = structlog.get_logger("weir.l7.accesslog")
Context = grpc.aio.ServicerContext[Any, Any]
DEFAULT_KEEP = 4096
POLICY_ID_KEY = "enforced_effective_policy_id"
MAX_FIELD_CHARS = 2048  # method, path and host are cut to this in events


@dataclass(frozen=True)
class L7Event:
    time_unix_ms: int
    listener: str  # endpoint/direction/port
    method: str
    path: str
    host: str
    status: int
    source: str
    destination: str
    rule: str
    allowed: bool
    details: str

    @property
    def endpoint(self) -> str:
        return self.listener.split("/", 1)[0]


def _address(address: address_pb2.Address) -> str:
    sock = address.socket_address
    if not sock.address:
        return ""
    host = f"[{sock.address}]" if ":" in sock.address else sock.address
    return f"{host}:{sock.port_value}"


def event_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> L7Event:
    """One access log entry as an L7 event."""
    common = entry.common_properties
    rbac = common.metadata.filter_metadata.get(RBAC_FILTER)
    rule = ""
    if rbac is not None and POLICY_ID_KEY in rbac.fields:
        rule = rbac.fields[POLICY_ID_KEY].string_value
    details = entry.response.response_code_details
    status = entry.response.response_code.value
    allowed = bool(rule) and "rbac_access_denied" not in details
    request = entry.request
    return L7Event(
        time_unix_ms=common.start_time.ToMilliseconds() or int(time.time() * 1000),
        listener=common.custom_tags.get(LISTENER_TAG, ""),
        method=base_pb2.RequestMethod.Name(request.request_method) if request.request_method else "",
        path=request.path[:MAX_FIELD_CHARS],
        host=request.authority[:MAX_FIELD_CHARS],
        status=status,
        source=_address(common.downstream_remote_address),
        destination=_address(common.downstream_local_address),
        rule=rule if allowed else "",
        allowed=allowed,
        details=details[:MAX_FIELD_CHARS],
    )


@dataclass
class Count:
    allowed: int = 0
    denied: int = 0


class AccessLog(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """The ALS servicer, the recent events and the per-rule counters."""

    def __init__(self, keep: int = DEFAULT_KEEP) -> None:
        self._lock = threading.Lock()
        self._recent: collections.deque[L7Event] = collections.deque(maxlen=keep)
        self._counts: dict[tuple[str, str], Count] = {}
        self.events: Broadcast[L7Event] = Broadcast(drop_oldest=True)

    def record(self, event: L7Event) -> None:
        with self._lock:
            self._recent.append(event)
            count = self._counts.setdefault((event.listener, event.rule), Count())
            if event.allowed:
                count.allowed += 1
            else:
                count.denied += 1
        self.events.publish(event)

    def recent(self) -> list[L7Event]:
        with self._lock:
            return list(self._recent)

    def counters(self) -> dict[tuple[str, str], Count]:
        """(listener, rule) -> counts; rule "" holds a listener's denials."""
        with self._lock:
            return {key: Count(c.allowed, c.denied) for key, c in self._counts.items()}

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Context
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                try:
                    self.record(event_of(entry))
                except (ValueError, KeyError) as exc:
                    log.warning("accesslog.bad_entry", error=str(exc))
        return als_pb2.StreamAccessLogsResponse()
