"""Services and backends as the load balancer keeps them, validated from protobuf.

Every check happens here, before any map is touched, and says what is wrong
with which field, so a refused upsert changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from weir.lb.v1 import lb_pb2 as pb

from services.common import validate
from services.common.errors import InvalidArgument
from services.common.ipv4 import parse_ipv4, plain_unicast
from services.lb.defs import DEFAULT_MAGLEV_TABLE, MAX_BACKENDS, MAX_SERVICES, MAX_TABLE, BackendState
from services.lb.maglev import is_prime, weighted_table_size

# Request limits, checked before anything is parsed or allocated. One service may hold
# a quarter of the backend ids, so no single request can take them all; a bulk call
# may carry as many services as there are frontends and as many backends as there are ids.
MAX_BACKENDS_PER_SERVICE = MAX_BACKENDS // 4
MAX_SERVICES_PER_CALL = MAX_SERVICES
MAX_BACKENDS_PER_CALL = MAX_BACKENDS

PROTOCOLS = {"TCP": 6, "UDP": 17}
STATES = {
    pb.BACKEND_STATE_UNSPECIFIED: BackendState.ACTIVE,
    pb.BACKEND_STATE_ACTIVE: BackendState.ACTIVE,
    pb.BACKEND_STATE_TERMINATING: BackendState.TERMINATING,
    pb.BACKEND_STATE_MAINTENANCE: BackendState.MAINTENANCE,
}
_STATE_TO_PROTO = {state: pb.BackendState.Value(f"BACKEND_STATE_{state.name}") for state in BackendState}
KINDS = {pb.KIND_UNSPECIFIED: False, pb.KIND_CLUSTER_IP: False, pb.KIND_NODE_PORT: True}  # -> node port?
ALGORITHMS = {pb.ALGORITHM_UNSPECIFIED: False, pb.ALGORITHM_HASH: False, pb.ALGORITHM_MAGLEV: True}  # -> Maglev?


@dataclass(frozen=True)
class Backend:
    address: str
    port: int
    weight: int = 1
    state: BackendState = BackendState.ACTIVE
    healthy: bool = True

    @cached_property
    def key(self) -> str:
        """address:port; read several times per backend on every upsert, so made once."""
        return f"{self.address}:{self.port}"

    @property
    def selectable(self) -> bool:
        """Whether it may take new connections."""
        return self.state is BackendState.ACTIVE and self.weight > 0 and self.healthy


@dataclass(frozen=True)
class HealthCheck:
    interval_ms: int = 0
    timeout_ms: int = 1000
    unhealthy_threshold: int = 2
    healthy_threshold: int = 2


@dataclass(frozen=True)
class Service:
    name: str
    node_port: bool
    address: str  # cluster IP; "" for node ports
    port: int
    protocol: str
    backends: tuple[Backend, ...]
    maglev: bool = False
    table_size: int = DEFAULT_MAGLEV_TABLE
    seed: int = 0
    affinity_timeout: int = 0
    health: HealthCheck = field(default_factory=HealthCheck)

    @property
    def proto(self) -> int:
        return PROTOCOLS[self.protocol]

    def backend(self, address: str, port: int) -> Backend:
        for b in self.backends:
            if (b.address, b.port) == (address, port):
                return b
        raise KeyError(f"{address}:{port}")

    def with_backend(self, changed: Backend) -> Service:
        return replace(self, backends=tuple(changed if b.key == changed.key else b for b in self.backends))


def _address(text: str, where: str) -> str:
    """An IPv4 unicast address: the load balancer serves IPv4 frontends and backends.

    The canonical dotted quad of a plain unicast address (nearly every request) passes
    without `ipaddress`; anything else gets the full check and its message.
    """
    value = parse_ipv4(text)
    if value is not None and plain_unicast(value):
        return text
    return str(validate.address(text, where, versions=(4,), unicast=True))


def _port(value: int, where: str) -> int:
    return validate.port(value, where)


def backend_from_proto(msg: pb.Backend, where: str) -> Backend:
    weight = msg.weight if msg.HasField("weight") else 1
    if weight < 0:
        raise InvalidArgument(f"{where}: weight {weight} is negative")
    if weight > 65535:
        raise InvalidArgument(f"{where}: weight {weight} is above 65535")
    state = validate.choice(msg.state, STATES, f"{where}: state")
    return Backend(_address(msg.address, where), _port(msg.port, where), weight, state)


# Health check bounds: a probe every millisecond per backend would be a busy loop, a
# timeout of days would hold a probe slot forever, a threshold of billions never flips.
HEALTH_INTERVAL_MS = (50, 86_400_000)  # 0 turns the check off
HEALTH_TIMEOUT_MS = (1, 60_000)  # 0 means 1000
HEALTH_THRESHOLD = (1, 1000)  # 0 means 2
MAX_AFFINITY_SECONDS = 86_400


def _health_limits(hc: pb.HealthCheck, where: str) -> None:
    """Refuse health check values outside their bounds (0 keeps its documented meaning)."""
    for field_name, (low, high) in (("interval_ms", HEALTH_INTERVAL_MS), ("timeout_ms", HEALTH_TIMEOUT_MS),
                                    ("unhealthy_threshold", HEALTH_THRESHOLD),
                                    ("healthy_threshold", HEALTH_THRESHOLD)):  # fmt: skip
        value = getattr(hc, field_name)
        if value and not low <= value <= high:
            raise InvalidArgument(f"{where}.{field_name}: {value} is out of range (0 or {low}-{high})")


def check_limits(msgs: list[pb.Service]) -> None:
    """Refuse a request over the per-call limits; costs O(services), never looks at a backend."""
    validate.at_most(len(msgs), MAX_SERVICES_PER_CALL, "services")
    validate.at_most(sum(len(m.backends) for m in msgs), MAX_BACKENDS_PER_CALL, "backends")


def check_table(service: Service) -> None:
    """Refuse weights whose hash table would exceed the largest table, before it is built."""
    if service.maglev:
        return
    size = weighted_table_size([b.weight for b in service.backends])
    if size > MAX_TABLE:
        raise InvalidArgument(
            f"service {service.name}: the weights need a hash table of {size} slots, above the limit of "
            f"{MAX_TABLE}; use smaller weights (they are divided by their greatest common divisor)"
        )


def from_proto(msg: pb.Service) -> Service:
    """Validate a service message; raises InvalidArgument naming the faulty field."""
    validate.name(msg.name, "service")
    where = f"service {msg.name}"
    validate.at_most(len(msg.backends), MAX_BACKENDS_PER_SERVICE, f"backends for {where}")
    protocol = validate.protocol(msg.protocol, where, allowed=PROTOCOLS)
    node_port = validate.choice(msg.kind, KINDS, f"{where}: kind")
    maglev = validate.choice(msg.algorithm, ALGORITHMS, f"{where}: algorithm")
    address = "" if node_port else _address(msg.address, f"{where}: address")
    port = _port(msg.port, f"{where}: frontend")
    backends = tuple(backend_from_proto(b, f"{where}: backends[{i}]") for i, b in enumerate(msg.backends))
    seen = set()
    for b in backends:
        if b.key in seen:
            raise InvalidArgument(f"{where}: backend {b.key} is listed twice")
        seen.add(b.key)
    size = msg.maglev_table_size or DEFAULT_MAGLEV_TABLE
    if maglev and not is_prime(size):
        raise InvalidArgument(f"{where}: Maglev table size {size} is not a prime (try 1021, 4093 or 16381)")
    if maglev and size > MAX_TABLE:
        raise InvalidArgument(f"{where}: Maglev table size {size} is above the maximum {MAX_TABLE}")
    if maglev and size < len(backends):
        raise InvalidArgument(f"{where}: Maglev table size {size} is smaller than the {len(backends)} backends")
    if msg.affinity_timeout_seconds > MAX_AFFINITY_SECONDS:
        raise InvalidArgument(f"{where}: affinity_timeout_seconds {msg.affinity_timeout_seconds} is above the "
                              f"maximum of {MAX_AFFINITY_SECONDS} (a day, as in Kubernetes)")  # fmt: skip
    hc = msg.health_check
    _health_limits(hc, f"{where}: health_check")
    health = HealthCheck(
        hc.interval_ms,
        hc.timeout_ms or 1000,
        hc.unhealthy_threshold or 2,
        hc.healthy_threshold or 2,
    )
    service = Service(
        msg.name,
        node_port,
        address,
        port,
        protocol,
        backends,
        maglev,
        size,
        msg.maglev_seed,
        msg.affinity_timeout_seconds,
        health,
    )
    check_table(service)
    return service


def to_doc(service: Service) -> dict[str, Any]:
    """``MessageToDict(to_proto(service), preserving_proto_field_name=True)``, built directly.

    The store keeps every service in this form; building it through the protobuf
    message costs more than the rest of a bulk upsert.
    """
    doc: dict[str, Any] = {"name": service.name, "kind": "KIND_NODE_PORT" if service.node_port else "KIND_CLUSTER_IP"}
    if service.address:
        doc["address"] = service.address
    if service.port:
        doc["port"] = service.port
    if service.protocol:
        doc["protocol"] = service.protocol
    if service.backends:
        doc["backends"] = [_backend_doc(b) for b in service.backends]
    doc["algorithm"] = "ALGORITHM_MAGLEV" if service.maglev else "ALGORITHM_HASH"
    if service.maglev and service.table_size:
        doc["maglev_table_size"] = service.table_size
    if service.seed:
        doc["maglev_seed"] = str(service.seed)  # proto3 JSON writes 64-bit integers as strings
    if service.affinity_timeout:
        doc["affinity_timeout_seconds"] = service.affinity_timeout
    hc = service.health
    fields = (("interval_ms", hc.interval_ms), ("timeout_ms", hc.timeout_ms),
              ("unhealthy_threshold", hc.unhealthy_threshold), ("healthy_threshold", hc.healthy_threshold))  # fmt: skip
    doc["health_check"] = {name: value for name, value in fields if value}
    return doc


def _backend_doc(b: Backend) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if b.address:
        doc["address"] = b.address
    if b.port:
        doc["port"] = b.port
    doc["weight"] = b.weight  # optional: present even when 0
    doc["state"] = f"BACKEND_STATE_{b.state.name}"
    if b.healthy:
        doc["healthy"] = True
    return doc


def state_to_proto(state: BackendState) -> pb.BackendState.ValueType:
    return _STATE_TO_PROTO[state]


def to_proto(service: Service) -> pb.Service:
    return pb.Service(
        name=service.name,
        kind=pb.KIND_NODE_PORT if service.node_port else pb.KIND_CLUSTER_IP,
        address=service.address,
        port=service.port,
        protocol=service.protocol,
        backends=[
            pb.Backend(
                address=b.address, port=b.port, weight=b.weight, state=state_to_proto(b.state), healthy=b.healthy
            )
            for b in service.backends
        ],
        algorithm=pb.ALGORITHM_MAGLEV if service.maglev else pb.ALGORITHM_HASH,
        maglev_table_size=service.table_size if service.maglev else 0,
        maglev_seed=service.seed,
        affinity_timeout_seconds=service.affinity_timeout,
        health_check=pb.HealthCheck(
            interval_ms=service.health.interval_ms,
            timeout_ms=service.health.timeout_ms,
            unhealthy_threshold=service.health.unhealthy_threshold,
            healthy_threshold=service.health.healthy_threshold,
        ),
    )
