"""The service load balancer: services in, frontends, tables and backends out.

`LoadBalancer` is the plain class behind the gRPC layer. It validates a whole
service first (addresses, ports, weights, table size, frontend clashes,
capacity), allocates stable ids (service, backends, reverse-NAT indexes),
builds the selection table (Maglev or weighted hash) over the backends that
may take new connections, writes the maps and then persists the service, so a
restarted service rewrites exactly what it was given.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import structlog
from google.protobuf import json_format
from weir.lb.v1 import lb_pb2 as pb

from services.common.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from services.common.store import Store
from services.lb import model
from services.lb.defs import MAX_BACKENDS, BackendState
from services.lb.maglev import maglev_table, weighted_table
from services.lb.maps import Counts, Frontend, LbMaps
from services.lb.model import Backend, Service

log = structlog.get_logger("weir.lb")

KIND = "service"
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 10_000
MAX_REV_NAT = 65535

NodeAddresses = Callable[[], list[str]]


@dataclass
class Ids:
    """Stable numbers of one service: its id, its backends', its frontends' reverse NAT."""

    service: int
    backends: dict[str, int] = field(default_factory=dict)
    rev_nat: dict[str, int] = field(default_factory=dict)  # frontend address -> index


@dataclass
class Health:
    failures: int = 0
    successes: int = 0
    next_at: float = 0.0


class LoadBalancer:
    """Services of one node and the maps that realise them."""

    def __init__(self, maps: LbMaps, store: Store, node_addresses: NodeAddresses, max_frontends: int) -> None:
        self._maps = maps
        self._store = store
        self._node_addresses = node_addresses
        self._max_frontends = max_frontends
        self._services: dict[str, Service] = {}
        self._ids: dict[str, Ids] = {}
        self._health: dict[tuple[str, str], Health] = {}

    # ---- life cycle ----

    def start(self) -> None:
        """Load, then rewrite every persisted service and remove what none of them owns."""
        self._maps.load()
        for name, doc in self._store.items(KIND):
            service = model.from_proto(json_format.ParseDict(doc["spec"], pb.Service()))
            healthy = doc.get("unhealthy", [])
            service = replace(service, backends=tuple(
                replace(b, healthy=b.key not in healthy) for b in service.backends))  # fmt: skip
            self._services[name] = service
            self._ids[name] = Ids(doc["ids"]["service"], dict(doc["ids"]["backends"]), dict(doc["ids"]["rev_nat"]))
        for name, service in self._services.items():
            self._write(service, self._ids[name], previous=None)
        wanted_frontends = {
            (f.address, f.port, f.proto) for name in self._services for f in self._frontends(self._services[name])
        }
        stale = [f for f in self._maps.frontend_keys() if f not in wanted_frontends]
        if stale:
            self._maps.delete(0, [Frontend(a, p, proto, 0) for a, p, proto in stale], [])
        wanted_backends = {i for ids in self._ids.values() for i in ids.backends.values()}
        wanted_services = {ids.service for ids in self._ids.values()}
        for service_id in self._maps.service_ids() - wanted_services:
            self._maps.delete(service_id, [], [])
        leftover = sorted(self._maps.backend_ids() - wanted_backends)
        if leftover:
            self._maps.delete(0, [], leftover)

    def close(self) -> None:
        self._maps.close()

    # ---- ids ----

    def _frontends(self, service: Service, ids: Ids | None = None) -> list[Frontend]:
        addresses = self._node_addresses() if service.node_port else [service.address]
        ids = ids or self._ids.get(service.name)
        return [
            Frontend(a, service.port, service.proto, ids.rev_nat.get(a, 0) if ids else 0) for a in addresses
        ]

    def _allocate(self, service: Service) -> Ids:
        old = self._ids.get(service.name)
        used_services = {i.service for n, i in self._ids.items() if n != service.name}
        used_backends = {b for n, i in self._ids.items() if n != service.name for b in i.backends.values()}
        used_rev = {r for n, i in self._ids.items() if n != service.name for r in i.rev_nat.values()}
        ids = Ids(old.service if old else _lowest_free(used_services, 1 << 30))
        pool = iter(_free_numbers(used_backends, MAX_BACKENDS))
        for b in service.backends:
            ids.backends[b.key] = old.backends[b.key] if old and b.key in old.backends else next(pool)
        rev_pool = iter(_free_numbers(used_rev, MAX_REV_NAT))
        for f in self._frontends(service, old):
            ids.rev_nat[f.address] = old.rev_nat[f.address] if old and f.address in old.rev_nat else next(rev_pool)
        return ids

    # ---- changes ----

    def _check(self, service: Service) -> None:
        mine = {(f.address, f.port, f.proto) for f in self._frontends(service)}
        if not mine:
            raise InvalidArgument(f"service {service.name}: this node has no IPv4 address to serve a node port on")
        total = len(mine)
        for other in self._services.values():
            if other.name == service.name:
                continue
            theirs = {(f.address, f.port, f.proto) for f in self._frontends(other)}
            clash = mine & theirs
            if clash:
                address, port, _ = sorted(clash)[0]
                raise AlreadyExists(
                    f"frontend {address}:{port}/{service.protocol} already belongs to service {other.name}"
                )
            total += len(theirs)
        if total > self._max_frontends:
            raise ResourceExhausted(
                f"service {service.name} needs {len(mine)} frontend(s) but only "
                f"{self._max_frontends - (total - len(mine))} of {self._max_frontends} are free; "
                "delete services or restart the load balancer with a larger --max-services"
            )

    @staticmethod
    def _table(service: Service, ids: Ids) -> list[int]:
        chosen = [(b.key, b.weight) if b.selectable else (b.key, 0) for b in service.backends]
        slots = maglev_table(chosen, service.table_size, service.seed) if service.maglev else weighted_table(chosen)
        order = [ids.backends[b.key] for b in service.backends]
        return [order[i] for i in slots]

    def _write(self, service: Service, ids: Ids, previous: Ids | None) -> None:
        frontends = self._frontends(service, ids)
        stale_frontends = []
        stale_backends: list[int] = []
        if previous is not None:
            old_service = self._services.get(service.name)
            if old_service is not None:
                current = {(f.address, f.port, f.proto) for f in frontends}
                stale_frontends = [f for f in self._frontends(old_service, previous)
                                   if (f.address, f.port, f.proto) not in current]
            stale_backends = [i for k, i in previous.backends.items() if k not in ids.backends]
        self._maps.write(ids.service, service, frontends, stale_frontends, ids.backends, stale_backends,
                         self._table(service, ids))

    def _persist(self, service: Service, ids: Ids) -> None:
        spec = json_format.MessageToDict(model.to_proto(service), preserving_proto_field_name=True)
        self._store.put(KIND, service.name, {
            "spec": spec,
            "ids": {"service": ids.service, "backends": ids.backends, "rev_nat": ids.rev_nat},
            "unhealthy": [b.key for b in service.backends if not b.healthy],
        })  # fmt: skip

    def upsert(self, msg: pb.Service) -> Service:
        """Create or replace a service with its backends; all or nothing."""
        service = model.from_proto(msg)
        old = self._services.get(service.name)
        if old is not None:  # keep what health checks learnt about backends that stay
            known = {b.key: b.healthy for b in old.backends}
            service = replace(service, backends=tuple(
                replace(b, healthy=known.get(b.key, True)) for b in service.backends))  # fmt: skip
        self._check(service)
        ids = self._allocate(service)
        self._write(service, ids, self._ids.get(service.name))
        self._persist(service, ids)
        self._services[service.name] = service
        self._ids[service.name] = ids
        log.info("service upserted", service=service.name, backends=len(service.backends))
        return service

    def delete(self, name: str) -> None:
        service = self.get(name)
        ids = self._ids[name]
        self._maps.delete(ids.service, self._frontends(service, ids), list(ids.backends.values()))
        self._store.delete(KIND, name)
        del self._services[name], self._ids[name]

    def set_backend(
        self, name: str, address: str, port: int, weight: int | None, state: BackendState | None
    ) -> Service:
        service = self.get(name)
        try:
            backend = service.backend(address, port)
        except KeyError:
            raise NotFound(f"service {name} has no backend {address}:{port}") from None
        if weight is not None and weight < 0:
            raise InvalidArgument(f"weight {weight} is negative")
        if weight is not None and weight > 65535:
            raise InvalidArgument(f"weight {weight} is above 65535")
        changed = replace(
            backend,
            weight=backend.weight if weight is None else weight,
            state=backend.state if state is None else state,
        )
        return self._replace(service.with_backend(changed))

    def _replace(self, service: Service) -> Service:
        ids = self._ids[service.name]
        self._write(service, ids, ids)
        self._persist(service, ids)
        self._services[service.name] = service
        return service

    # ---- queries ----

    def get(self, name: str) -> Service:
        if name not in self._services:
            raise NotFound(f"service {name!r} does not exist")
        return self._services[name]

    def service_id(self, name: str) -> int:
        self.get(name)
        return self._ids[name].service

    def frontends(self, name: str) -> list[str]:
        return [f"{f.address}:{f.port}" for f in self._frontends(self.get(name))]

    def list_page(self, page_size: int = 0, page_token: str = "") -> tuple[list[Service], str]:
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size {page_size} is above the maximum of {MAX_PAGE_SIZE}")
        size = page_size or DEFAULT_PAGE_SIZE
        rest = [self._services[n] for n in sorted(self._services) if n > page_token]
        return rest[:size], (rest[size - 1].name if len(rest) > size else "")

    def counters(self, name: str) -> tuple[Counts, list[tuple[Backend, Counts]]]:
        service = self.get(name)
        ids = self._ids[name]
        return self._maps.counts("lb_service_stats", ids.service), [
            (b, self._maps.counts("lb_backend_stats", ids.backends[b.key])) for b in service.backends
        ]

    def datapath_table(self, name: str) -> list[tuple[str, int]]:
        """The live selection table as backend (address, port) per slot, read from the map."""
        ids = self._ids[name]
        by_id = {i: key for key, i in ids.backends.items()}
        out = []
        for backend_id in self._maps.table(ids.service):
            address, port = by_id[backend_id].rsplit(":", 1)
            out.append((address, int(port)))
        return out

    # ---- active health checks ----

    def check_health(self, now: float | None = None) -> list[str]:
        """Probe due backends with a TCP connect; rewrite services whose rotation changed."""
        now = time.monotonic() if now is None else now
        changed = []
        for name, service in list(self._services.items()):
            hc = service.health
            if not hc.interval_ms:
                continue
            updated = service
            for b in service.backends:
                state = self._health.setdefault((name, b.key), Health())
                if now < state.next_at:
                    continue
                state.next_at = now + hc.interval_ms / 1000
                ok = _tcp_probe(b.address, b.port, hc.timeout_ms / 1000)
                state.successes, state.failures = (state.successes + 1, 0) if ok else (0, state.failures + 1)
                if b.healthy and state.failures >= hc.unhealthy_threshold:
                    updated = updated.with_backend(replace(b, healthy=False))
                elif not b.healthy and state.successes >= hc.healthy_threshold:
                    updated = updated.with_backend(replace(b, healthy=True))
            if updated != service:
                self._replace(updated)
                changed.append(name)
                log.info("health changed rotation", service=name,
                         unhealthy=[b.key for b in updated.backends if not b.healthy])
        return changed


def _tcp_probe(address: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def _lowest_free(used: set[int], limit: int) -> int:
    for candidate in range(1, limit):
        if candidate not in used:
            return candidate
    raise ResourceExhausted("no service id is free")


def _free_numbers(used: set[int], limit: int) -> Iterator[int]:
    for candidate in range(1, limit + 1):
        if candidate not in used:
            yield candidate
    raise ResourceExhausted(f"all {limit} ids are in use")
