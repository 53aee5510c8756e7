"""Fan-out of the datapath's events ring buffer to any number of watchers.

A ring buffer has one consumer position, so one thread polls it and hands
each decoded record to every subscriber's asyncio queue. A slow watcher loses
its oldest events (its queue is bounded), never the datapath's.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pybpf import Map, RingBuffer
from services.common.datapath import HOOK_DIRECTION, Event, EventType, Hook, Reason

QUEUE_DEPTH = 4096
PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}


@dataclass(frozen=True)
class L7Info:
    """What Envoy's access log said of one HTTP request (type L7 flows only)."""

    method: str
    path: str
    host: str
    status: int
    rule: str  # the rule that allowed it; empty when denied
    allowed: bool


@dataclass(frozen=True)
class FlowEvent:
    type: str
    reason: str
    hook: Hook
    ifindex: int
    endpoint_id: int
    length: int
    src_identity: int
    dst_identity: int
    protocol: str
    src: str
    dst: str
    src_port: int
    dst_port: int
    l7: L7Info | None = None
    rule_id: int = 0  # the policy rule behind a verdict or drop (policy_rule_names), 0: none
    nat_addr: str = ""  # TRANSLATE: the backend
    nat_port: int = 0

    @property
    def direction(self) -> int:
        return HOOK_DIRECTION[self.hook]


def _name(enum: type[EventType] | type[Reason], value: int) -> str:
    return enum(value).name if value in enum._value2member_map_ else str(value)


def decode(raw: bytes) -> FlowEvent:
    """Turn one ring-buffer record (struct weir_event) into a FlowEvent."""
    ev = Event.from_buffer_copy(raw[: ctypes.sizeof(Event)])
    size = 4 if ev.family == 2 else 16
    src = str(ipaddress.ip_address(bytes(ev.saddr)[:size])) if ev.family in (2, 10) else ""
    dst = str(ipaddress.ip_address(bytes(ev.daddr)[:size])) if ev.family in (2, 10) else ""
    l4 = ev.proto in (6, 17)
    translated = ev.type == EventType.TRANSLATE and ev.family in (2, 10)
    return FlowEvent(
        type=_name(EventType, ev.type),
        reason=_name(Reason, ev.reason),
        hook=Hook(ev.hook) if ev.hook in Hook._value2member_map_ else Hook.FROM_CONTAINER,
        ifindex=ev.ifindex,
        endpoint_id=ev.endpoint,
        length=ev.len,
        src_identity=ev.src_identity,
        dst_identity=ev.dst_identity,
        protocol=PROTOCOLS.get(ev.proto, str(ev.proto)),
        src=src,
        dst=dst,
        src_port=int.from_bytes(ev.sport.to_bytes(2, "little"), "big") if l4 else 0,
        dst_port=int.from_bytes(ev.dport.to_bytes(2, "little"), "big") if l4 else 0,
        rule_id=ev.rule,
        nat_addr=str(ipaddress.ip_address(bytes(ev.nat_addr)[:size])) if translated else "",
        nat_port=int.from_bytes(ev.nat_port.to_bytes(2, "little"), "big") if translated else 0,
    )


class EventHub:
    """Polls the events map in a thread and fans records out to subscribers."""

    def __init__(self, events: Map, on_event: Callable[[FlowEvent], object] | None = None) -> None:
        """on_event (e.g. Flows.add) gets every event, on the polling thread, watched or not."""
        self._events = events
        self._on_event = on_event
        self._subscribers: set[asyncio.Queue[FlowEvent]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def subscribe(self) -> asyncio.Queue[FlowEvent]:
        queue: asyncio.Queue[FlowEvent] = asyncio.Queue(QUEUE_DEPTH)
        with self._lock:
            self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[FlowEvent]) -> None:
        with self._lock:
            self._subscribers.discard(queue)

    def _run(self) -> None:
        with RingBuffer(self._events, self._on_record) as ring:
            while not self._stop.is_set():
                ring.poll(200)

    def _on_record(self, raw: bytes) -> None:
        with self._lock:
            queues = list(self._subscribers) if self._loop is not None else []
        if not queues and self._on_event is None:
            return
        event = decode(raw)
        if self._on_event is not None:
            self._on_event(event)
        for queue in queues:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_offer, queue, event)


def _offer(queue: asyncio.Queue[FlowEvent], event: FlowEvent) -> None:
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(event)
