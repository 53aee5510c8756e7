"""Fan-out of the datapath's events ring buffer to any number of watchers.

A ring buffer has one consumer position, so one thread polls it and hands
each decoded record to every subscriber's asyncio queue. A slow watcher loses
its oldest events (its queue is bounded), never the datapath's. The datapath
wakes this thread only every EVENTS_WAKEUP_BYTES of records (events.h), so the
thread also drains the ring every EVENTS_POLL_MS.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pybpf import Map, RingBuffer
from services.common.datapath import EVENTS_POLL_MS, HOOK_DIRECTION, Event, EventType, Hook, Reason

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


# struct weir_event as one unpack (little-endian, as the datapath writes it; the ports are
# in network order and swapped below): the ctypes Event and a call per field cost ~4x more,
# and the reader decodes every event the datapath emits.
_LAYOUT = struct.Struct("<4B5I2B3H16s16sIHH16s")
if _LAYOUT.size != ctypes.sizeof(Event):
    raise ImportError(f"event layout is {_LAYOUT.size} bytes, struct weir_event {ctypes.sizeof(Event)}")
_TYPE_NAMES = {m.value: m.name for m in EventType}
_REASON_NAMES = {m.value: m.name for m in Reason}
_HOOKS = {m.value: m for m in Hook}


def _port(value: int) -> int:
    """A port read little-endian from network order."""
    return ((value & 0xFF) << 8) | (value >> 8)


def _address(family: int, raw: bytes) -> str:
    if family == 2:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == 10:
        return str(ipaddress.IPv6Address(raw))
    return ""


def decode(raw: bytes) -> FlowEvent:
    """Turn one ring-buffer record (struct weir_event) into a FlowEvent."""
    (type_, reason, _dir, hook, ifindex, endpoint, length, src_identity, dst_identity, family, proto, sport,
     dport, _pad, saddr, daddr, rule, nat_port, _pad2, nat_addr) = _LAYOUT.unpack_from(raw)  # fmt: skip
    l4 = proto in (6, 17)
    translated = type_ == EventType.TRANSLATE and family in (2, 10)
    return FlowEvent(
        type=_TYPE_NAMES.get(type_, str(type_)),
        reason=_REASON_NAMES.get(reason, str(reason)),
        hook=_HOOKS.get(hook, Hook.FROM_CONTAINER),
        ifindex=ifindex,
        endpoint_id=endpoint,
        length=length,
        src_identity=src_identity,
        dst_identity=dst_identity,
        protocol=PROTOCOLS.get(proto, str(proto)),
        src=_address(family, saddr),
        dst=_address(family, daddr),
        src_port=_port(sport) if l4 else 0,
        dst_port=_port(dport) if l4 else 0,
        rule_id=rule,
        nat_addr=_address(family, nat_addr) if translated else "",
        nat_port=_port(nat_port) if translated else 0,
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
        self._rounds = 0  # poll-and-consume rounds finished by the polling thread

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
                ring.poll(EVENTS_POLL_MS)  # back early on a wake-up
                ring.consume()  # records submitted without one: poll reads only rings epoll names
                self._rounds += 1

    async def caught_up(self, timeout: float = 1.0) -> None:
        """Return once every record submitted before the call has been read.

        The datapath wakes the reader only per EVENTS_WAKEUP_BYTES, so a reader of the flow
        buffer (GetFlows right after traffic) waits for one full round to begin and end after
        its call: at most two EVENTS_POLL_MS periods.
        """
        behind = self._behind(timeout)  # a plain sleep loop: a thread each would let many calls starve the pool
        while behind():
            await asyncio.sleep(EVENTS_POLL_MS / 4000)

    def wait_caught_up(self, timeout: float = 1.0) -> None:
        """caught_up for a thread other than the event loop's (the metrics scrape)."""
        behind = self._behind(timeout)
        while behind():
            time.sleep(EVENTS_POLL_MS / 4000)

    def _behind(self, timeout: float) -> Callable[[], bool]:
        """Whether a caller arriving now still waits: until two more rounds end (the round under
        way may be past its consume), the reader stops, or `timeout` runs out."""
        target, deadline = self._rounds + 2, time.monotonic() + timeout
        return lambda: self._reading() and self._rounds < target and time.monotonic() < deadline

    def _reading(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

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
