"""Flows: datapath events with their endpoints, labels and verdict, in a bounded buffer.

The events reader thread hands every decoded event to `Flows.add`, which names its peers
from the endpoints and identities it follows (their change listeners run on the worker
thread), keeps the newest `capacity` flows, and offers each to the GetFlows subscribers.
Nothing is lost silently: flows pushed out of the buffer and flows a slow subscriber could
not take are counted, and each subscription reports its own losses in its stream (the
datapath's own losses, events its rate limits held back or its ring buffer had no room
for, are counted in BPF: see eventlimits.py). A verdict or drop names the policy rule
behind it, from the rule id the datapath reports (rulenames.py).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from services.common.datapath import Direction, Hook, Reason
from services.common.errors import InvalidArgument
from services.orchestrator.endpoints import Endpoint
from services.orchestrator.events import PROTOCOLS, FlowEvent
from services.orchestrator.identities import CIDR_PREFIX, IdentityChange

DEFAULT_CAPACITY = 4096
MAX_CAPACITY = 1 << 20
SUBSCRIBER_DEPTH = 4096
MAX_LAST = 65536
MAX_FILTER_VALUES = 256
VERDICTS = ("FORWARDED", "DROPPED", "AUDIT", "TRANSLATED", "ACCELERATED", "REDIRECTED")
MAX_RULE_NAME = 512
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def verdict_of(event: FlowEvent) -> str:
    """DROPPED, AUDIT, TRANSLATED and REDIRECTED as Hubble names them; ACCELERATED (the socket fast path) is Weir's own.

    An L7 request is FORWARDED when a rule allowed it and DROPPED when Envoy denied it (403).
    """
    if event.type == "DROP":
        return "DROPPED"
    if event.l7 is not None:
        return "FORWARDED" if event.l7.allowed else "DROPPED"
    if event.type == "PROXY_REDIRECT":
        return "REDIRECTED"
    if event.type == "TRANSLATE":
        return "TRANSLATED"
    if event.type.startswith("ACCEL_"):
        return "ACCELERATED"
    return "AUDIT" if event.reason == Reason.POLICY_AUDIT.name else "FORWARDED"


@dataclass(frozen=True)
class Peer:
    """One side of a flow, named by the endpoint at its address (if any)."""

    address: str
    port: int
    identity: int
    endpoint: str = ""
    endpoint_id: int = 0
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Flow:
    seq: int
    time_ns: int
    verdict: str
    event: FlowEvent
    source: Peer
    destination: Peer
    rule: str = ""  # the policy rule behind the verdict, "" when none (or unknown)


@dataclass
class FlowFilter:
    """What GetFlows asks for: any value within a criterion, every criterion given."""

    endpoints: frozenset[str] = frozenset()
    labels: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()
    ports: frozenset[int] = frozenset()
    protocols: frozenset[str] = frozenset()
    verdicts: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()
    rules: frozenset[str] = frozenset()

    @classmethod
    def parse(
        cls,
        endpoints: Sequence[str] = (),
        labels: Sequence[str] = (),
        cidrs: Sequence[str] = (),
        ports: Sequence[int] = (),
        protocols: Sequence[str] = (),
        verdicts: Sequence[str] = (),
        reasons: Sequence[str] = (),
        rules: Sequence[str] = (),
    ) -> FlowFilter:
        """Raises InvalidArgument naming the field of the first bad value."""
        for name, values in (
            ("endpoints", endpoints), ("labels", labels), ("cidrs", cidrs), ("ports", ports),
            ("protocols", protocols), ("verdicts", verdicts), ("reasons", reasons), ("rules", rules),
        ):  # fmt: skip
            if len(values) > MAX_FILTER_VALUES:
                raise InvalidArgument(f"{name}: {len(values)} values; at most {MAX_FILTER_VALUES}")
        for label in labels:
            if "=" not in label and ":" not in label:
                raise InvalidArgument(f"labels: {label!r} is not k=v (or reserved:NAME, cidr:PREFIX)")
        networks = []
        for text in cidrs:
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise InvalidArgument(f"cidrs: {text!r} is not an address or a CIDR") from None
        for port in ports:
            if not 1 <= port <= 65535:
                raise InvalidArgument(f"ports: {port} is not in 1-65535")
        known_protocols = {p.upper(): p for p in PROTOCOLS.values()}
        for protocol in protocols:
            if protocol.upper() not in known_protocols:
                raise InvalidArgument(f"protocols: {protocol!r} is not one of {', '.join(PROTOCOLS.values())}")
        for verdict in verdicts:
            if verdict.upper() not in VERDICTS:
                raise InvalidArgument(f"verdicts: {verdict!r} is not one of {', '.join(VERDICTS)}")
        for reason in reasons:
            if reason.upper() not in Reason.__members__:
                raise InvalidArgument(f"reasons: {reason!r} is not one of {', '.join(Reason.__members__)}")
        for rule in rules:
            if not rule or len(rule) > MAX_RULE_NAME:
                raise InvalidArgument(f"rules: {rule[:40]!r} is not a rule name (1-{MAX_RULE_NAME} characters)")
        return cls(
            endpoints=frozenset(endpoints),
            labels=frozenset(labels),
            networks=tuple(networks),
            ports=frozenset(ports),
            protocols=frozenset(known_protocols[p.upper()] for p in protocols),
            verdicts=frozenset(v.upper() for v in verdicts),
            reasons=frozenset(r.upper() for r in reasons),
            rules=frozenset(rules),
        )

    def match(self, flow: Flow) -> bool:
        ev, src, dst = flow.event, flow.source, flow.destination
        if self.verdicts and flow.verdict not in self.verdicts:
            return False
        if self.reasons and ev.reason not in self.reasons:
            return False
        if self.rules and flow.rule not in self.rules:
            return False
        if self.protocols and ev.protocol not in self.protocols:
            return False
        if self.ports and not {src.port, dst.port} & self.ports:
            return False
        if self.endpoints and not {src.endpoint, dst.endpoint} & self.endpoints:
            return False
        if self.labels and not (set(src.labels) | set(dst.labels)) & self.labels:
            return False
        return not self.networks or any(_within(a, self.networks) for a in (src.address, dst.address))


def _within(address: str, networks: Iterable[Network]) -> bool:
    if not address:
        return False
    ip = ipaddress.ip_address(address)
    return any(ip.version == n.version and ip in n for n in networks)


@dataclass(eq=False)
class Subscription:
    """A GetFlows stream's queue; a full queue drops its oldest flow and counts it."""

    queue: asyncio.Queue[Flow]
    dropped: int = 0


@dataclass(frozen=True)
class _Named:
    name: str
    id: int
    identity: int
    labels: tuple[str, ...]


class Flows:
    """The newest flows and the state that names their peers; fed by the events thread."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, rule_names: Callable[[int], str] | None = None) -> None:
        """rule_names: a rule id (as the datapath reports it) to the rule's name, "" when unknown."""
        if capacity < 1:
            raise ValueError(f"flow buffer of {capacity}: at least 1")
        self.capacity = capacity
        self._ring: deque[Flow] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._seq = 0
        self.evicted = 0
        self.subscriber_dropped = 0
        self._rule_names = rule_names
        # (endpoint, direction, verdict) -> policy verdicts read from the datapath's events.
        self.policy_verdicts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._by_address: dict[str, _Named] = {}
        self._by_id: dict[int, _Named] = {}
        self._identity_labels: dict[int, tuple[str, ...]] = {}
        self._subscribers: set[Subscription] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # ---- following endpoints and identities (worker thread) ----

    def seed(self, endpoints: Iterable[Endpoint], identities: IdentityChange) -> None:
        for endpoint in endpoints:
            self.endpoint_changed("CREATED", endpoint)
        self.identities_changed(identities)

    def endpoint_changed(self, kind: str, endpoint: Endpoint) -> None:
        labels = tuple(sorted(f"{k}={v}" for k, v in endpoint.labels.items()))
        named = _Named(endpoint.name, endpoint.id, endpoint.identity, labels)
        with self._lock:
            if kind == "DELETED":
                self._by_id.pop(endpoint.id, None)
            else:
                self._by_id[endpoint.id] = named
            for address in (endpoint.ipv4, endpoint.ipv6):
                if not address:
                    continue
                if kind == "DELETED":
                    if self._by_address.get(address, named).id == endpoint.id:
                        self._by_address.pop(address, None)
                else:
                    self._by_address[address] = named

    def identities_changed(self, change: IdentityChange) -> None:
        with self._lock:
            for info in change.upserted:
                self._identity_labels[info.id] = tuple(info.labels)
            cidrs = change.cidrs
            self._identity_labels.update(zip(cidrs.ids, [(f"{CIDR_PREFIX}{c}",) for c in cidrs.cidrs], strict=True))
            for identity in change.deleted:
                self._identity_labels.pop(identity, None)

    def endpoint_id(self, name: str) -> int:
        """The id of the endpoint of that name, 0 if none (L7 events name their endpoint)."""
        with self._lock:
            return next((n.id for n in self._by_id.values() if n.name == name), 0)

    # ---- flows (events thread) ----

    def _peer(self, address: str, port: int, identity: int, on_hook: int) -> Peer:
        """on_hook: the endpoint of the hook's interface when it is this side (e.g. :: before DAD)."""
        named = self._by_address.get(address) or self._by_id.get(on_hook)
        if named is not None:
            return Peer(address, port, identity or named.identity, named.name, named.id, named.labels)
        return Peer(address, port, identity, labels=self._identity_labels.get(identity, ()))

    def add(self, event: FlowEvent, time_ns: int | None = None) -> Flow:
        """Buffer one event as a flow and offer it to every subscriber."""
        sending = event.endpoint_id if event.hook is Hook.FROM_CONTAINER else 0
        receiving = event.endpoint_id if event.hook is Hook.TO_CONTAINER else 0
        rule = event.l7.rule if event.l7 is not None else self._rule_name(event.rule_id)
        with self._lock:
            self._seq += 1
            if event.l7 is None and (event.type == "VERDICT" or event.reason.startswith("POLICY_")):
                named = self._by_id.get(event.endpoint_id)
                direction = Direction(event.direction).name
                self.policy_verdicts[(named.name if named else "", direction, verdict_of(event))] += 1
            flow = Flow(
                seq=self._seq,
                time_ns=time.time_ns() if time_ns is None else time_ns,
                verdict=verdict_of(event),
                event=event,
                source=self._peer(event.src, event.src_port, event.src_identity, sending),
                destination=self._peer(event.dst, event.dst_port, event.dst_identity, receiving),
                rule=rule,
            )
            if len(self._ring) == self.capacity:
                self.evicted += 1
            self._ring.append(flow)
            subscribers = list(self._subscribers) if self._loop is not None else []
        for sub in subscribers:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._offer, sub, flow)
        return flow

    def _rule_name(self, rule_id: int) -> str:
        if not rule_id or self._rule_names is None:
            return ""
        return self._rule_names(rule_id) or f"#{rule_id}"

    def _offer(self, sub: Subscription, flow: Flow) -> None:
        if sub.queue.full():
            sub.queue.get_nowait()
            sub.dropped += 1
            self.subscriber_dropped += 1
        sub.queue.put_nowait(flow)

    # ---- readers (event loop) ----

    def subscribe(self) -> Subscription:
        sub = Subscription(asyncio.Queue(min(self.capacity, SUBSCRIBER_DEPTH)))  # no more than the buffer holds
        with self._lock:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    def snapshot(self) -> tuple[list[Flow], int]:
        """The buffered flows (oldest first) and the flows evicted so far."""
        with self._lock:
            return list(self._ring), self.evicted

    @property
    def seen(self) -> int:
        return self._seq

    def __len__(self) -> int:
        return len(self._ring)
