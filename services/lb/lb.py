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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import structlog
from google.protobuf import json_format
from weir.lb.v1 import lb_pb2 as pb

from services.common.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from services.common.store import Store
from services.lb import model
from services.lb.defs import MAX_BACKENDS, BackendState
from services.lb.maglev import maglev_table, weighted_table
from services.lb.maps import Change, Counts, Frontend, LbMaps
from services.lb.model import Backend, Service

log = structlog.get_logger("weir.lb")

KIND = "service"
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 10_000
MAX_REV_NAT = 65535
MAX_SERVICE_ID = 1 << 30
FrontendKey = tuple[str, int, int]  # address, port, protocol

NodeAddresses = Callable[[], list[str]]


@dataclass
class Ids:
    """Stable numbers of one service: its id, its backends', its frontends' reverse NAT."""

    service: int
    backends: dict[str, int] = field(default_factory=dict)
    rev_nat: dict[str, int] = field(default_factory=dict)  # frontend address -> index


class IdPool:
    """Small, reusable ids from 1 to `limit`; taking one costs about the same at any size."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used: set[int] = set()
        self._hint = 1

    def take(self) -> int:
        if len(self._used) >= self._limit:
            raise ResourceExhausted(f"all {self._limit} ids are in use")
        candidate = self._hint
        while candidate in self._used:
            candidate = candidate % self._limit + 1
        self._used.add(candidate)
        self._hint = candidate % self._limit + 1
        return candidate

    def hold(self, ids: Iterable[int]) -> None:
        self._used.update(ids)

    def release(self, ids: Iterable[int]) -> None:
        self._used.difference_update(ids)

    def __contains__(self, value: int) -> bool:
        return value in self._used


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
        # Indexes kept in step with _services/_ids, so a change costs the same with 10 or 10k services.
        self._owners: dict[FrontendKey, str] = {}
        self._service_ids = IdPool(MAX_SERVICE_ID)
        self._backend_ids = IdPool(MAX_BACKENDS)
        self._rev_nat_ids = IdPool(MAX_REV_NAT)

    # ---- life cycle ----

    def start(self) -> None:
        """Load, then rewrite every persisted service and remove what none of them owns."""
        self._maps.load()
        addresses = self._node_addresses()
        for _name, doc in self._store.items(KIND):
            service = model.from_proto(json_format.ParseDict(doc["spec"], pb.Service()))
            unhealthy = set(doc.get("unhealthy", []))
            service = replace(service, backends=tuple(
                replace(b, healthy=b.key not in unhealthy) for b in service.backends))  # fmt: skip
            ids = Ids(doc["ids"]["service"], dict(doc["ids"]["backends"]), dict(doc["ids"]["rev_nat"]))
            self._remember(service, ids, self._frontends(service, ids, addresses))
        self._maps.write([self._change(s, self._ids[n], None, addresses) for n, s in self._services.items()])
        stale = [f for f in self._maps.frontend_keys() if f not in self._owners]
        if stale:
            self._maps.delete(0, [Frontend(a, p, proto, 0) for a, p, proto in stale], [])
        for service_id in self._maps.service_ids():
            if service_id not in self._service_ids:
                self._maps.delete(service_id, [], [])
        leftover = sorted(i for i in self._maps.backend_ids() if i not in self._backend_ids)
        if leftover:
            self._maps.delete(0, [], leftover)

    def close(self) -> None:
        self._maps.close()

    # ---- bookkeeping ----

    def _frontends(self, service: Service, ids: Ids | None, addresses: list[str]) -> list[Frontend]:
        hosts = addresses if service.node_port else [service.address]
        return [Frontend(a, service.port, service.proto, ids.rev_nat.get(a, 0) if ids else 0) for a in hosts]

    def _remember(self, service: Service, ids: Ids, frontends: list[Frontend]) -> None:
        self._forget(service.name)
        self._services[service.name] = service
        self._ids[service.name] = ids
        self._owners.update({f.key_tuple: service.name for f in frontends})
        self._hold(ids)

    def _hold(self, ids: Ids) -> None:
        self._service_ids.hold([ids.service])
        self._backend_ids.hold(ids.backends.values())
        self._rev_nat_ids.hold(ids.rev_nat.values())

    def _release(self, ids: Ids) -> None:
        self._service_ids.release([ids.service])
        self._backend_ids.release(ids.backends.values())
        self._rev_nat_ids.release(ids.rev_nat.values())

    def _forget(self, name: str) -> None:
        ids = self._ids.pop(name, None)
        self._services.pop(name, None)
        if ids is None:
            return
        for key in [k for k, owner in self._owners.items() if owner == name]:
            del self._owners[key]
        self._release(ids)

    def _allocate(self, service: Service, old: Ids | None, frontends: list[Frontend]) -> Ids:
        """Ids for a service: kept where it had them, else taken from the pools (held until released)."""
        ids = Ids(old.service if old else self._service_ids.take())
        for b in service.backends:
            ids.backends[b.key] = old.backends[b.key] if old and b.key in old.backends else self._backend_ids.take()
        for f in frontends:
            ids.rev_nat[f.address] = old.rev_nat[f.address] if old and f.address in old.rev_nat else (
                self._rev_nat_ids.take())
        return ids

    @staticmethod
    def _table(service: Service, ids: Ids) -> list[int]:
        chosen = [(b.key, b.weight) if b.selectable else (b.key, 0) for b in service.backends]
        slots = maglev_table(chosen, service.table_size, service.seed) if service.maglev else weighted_table(chosen)
        order = [ids.backends[b.key] for b in service.backends]
        return [order[i] for i in slots]

    def _change(self, service: Service, ids: Ids, previous: Ids | None, addresses: list[str]) -> Change:
        frontends = self._frontends(service, ids, addresses)
        stale_frontends: list[Frontend] = []
        stale_backends: list[int] = []
        old = self._services.get(service.name)
        if previous is not None and old is not None:
            current = {f.key_tuple for f in frontends}
            stale_frontends = [f for f in self._frontends(old, previous, addresses) if f.key_tuple not in current]
            stale_backends = [i for k, i in previous.backends.items() if k not in ids.backends]
        return Change(ids.service, service, frontends, stale_frontends, ids.backends, stale_backends,
                      self._table(service, ids))

    def _persist(self, items: list[tuple[Service, Ids]]) -> None:
        docs = []
        for service, ids in items:
            spec = json_format.MessageToDict(model.to_proto(service), preserving_proto_field_name=True)
            docs.append((service.name, {
                "spec": spec,
                "ids": {"service": ids.service, "backends": ids.backends, "rev_nat": ids.rev_nat},
                "unhealthy": [b.key for b in service.backends if not b.healthy],
            }))  # fmt: skip
        with self._store.transaction():
            self._store.put_many(KIND, docs)

    # ---- changes ----

    def upsert(self, msg: pb.Service) -> Service:
        """Create or replace a service with its backends; all or nothing."""
        return self.upsert_many([msg])[0]

    def upsert_many(self, msgs: list[pb.Service]) -> list[Service]:
        """Create or replace many services in one change: all are checked before any is written."""
        services = [model.from_proto(m) for m in msgs]
        if not services:
            raise InvalidArgument("no services given")
        names = [s.name for s in services]
        if len(set(names)) != len(names):
            raise InvalidArgument("a service name is given twice")
        addresses = self._node_addresses()
        claimed: dict[FrontendKey, str] = {}
        plans: list[tuple[Service, list[Frontend]]] = []
        new_frontends = 0
        for service in services:
            old = self._services.get(service.name)
            if old is not None:  # keep what health checks learnt about backends that stay
                known = {b.key: b.healthy for b in old.backends}
                service = replace(service, backends=tuple(
                    replace(b, healthy=known.get(b.key, True)) for b in service.backends))  # fmt: skip
            frontends = self._frontends(service, self._ids.get(service.name), addresses)
            if not frontends:
                raise InvalidArgument(f"service {service.name}: this node has no IPv4 address for a node port")
            for f in frontends:
                owner = claimed.get(f.key_tuple) or self._owners.get(f.key_tuple)
                if owner is not None and owner != service.name:
                    raise AlreadyExists(
                        f"frontend {f.address}:{f.port}/{service.protocol} already belongs to service {owner}"
                    )
                claimed[f.key_tuple] = service.name
            new_frontends += len(frontends) - (len(self._frontends(old, None, addresses)) if old else 0)
            plans.append((service, frontends))
        in_use = len(self._owners)
        if in_use + new_frontends > self._max_frontends:
            raise ResourceExhausted(
                f"these services need {new_frontends} more frontend(s) but only {self._max_frontends - in_use} "
                f"of {self._max_frontends} are free; delete services or restart the load balancer with a "
                "larger --max-services"
            )
        allocated: list[tuple[Service, Ids]] = []
        try:
            for service, frontends in plans:
                allocated.append((service, self._allocate(service, self._ids.get(service.name), frontends)))
            changes = [self._change(s, ids, self._ids.get(s.name), addresses) for s, ids in allocated]
            self._maps.write(changes)
            self._persist(allocated)
        except Exception:
            for service, ids in allocated:  # give back what this change took; keep what others hold
                self._release(ids)
                if service.name in self._ids:
                    self._hold(self._ids[service.name])
            raise
        for (service, ids), change in zip(allocated, changes, strict=True):
            self._remember(service, ids, change.frontends)
        log.info("services upserted", services=len(allocated))
        return [service for service, _ in allocated]

    def delete(self, name: str) -> None:
        service = self.get(name)
        ids = self._ids[name]
        self._maps.delete(ids.service, self._frontends(service, ids, self._node_addresses()),
                          list(ids.backends.values()))
        self._store.delete(KIND, name)
        self._forget(name)

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
        addresses = self._node_addresses()
        change = self._change(service, ids, ids, addresses)
        self._maps.write([change])
        self._persist([(service, ids)])
        self._remember(service, ids, change.frontends)
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
        return [f"{a}:{p}" for (a, p, _), owner in self._owners.items() if owner == name]

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
