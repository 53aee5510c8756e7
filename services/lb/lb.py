"""The service load balancer: services in, frontends, tables and backends out.

`LoadBalancer` is the plain class behind the gRPC layer. It validates a whole
service first (addresses, ports, weights, table size, frontend clashes,
capacity), allocates stable ids (service, backends, reverse-NAT indexes),
builds the selection table (Maglev or weighted hash) over the backends that
may take new connections, and applies it with the one change protocol (store
transaction, map writes that are undone if anything fails, commit), so a refused
or failed call leaves maps, store and id pools as they were, and a restarted
service rewrites exactly what it was given. Health checks run off the worker (see `probes`); only
their results come here, in one batched change per round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace

import structlog
from google.protobuf import json_format
from weir.lb.v1 import lb_pb2 as pb

from services.common import paging, validate
from services.common.change import Change
from services.common.collector import collector_paused
from services.common.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, WeirError
from services.common.store import Store, StoreError
from services.lb import model
from services.lb.defs import DEFAULT_MAGLEV_TABLE, MAX_BACKENDS, MAX_TABLE, BackendState, LbService, ServiceFlag
from services.lb.maglev import maglev_table, weighted_table
from services.lb.maps import Counts, Frontend, LbMaps, ServiceWrite
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


@dataclass(frozen=True)
class Probe:
    """One health probe to run: a TCP connect to a backend, with its timeout."""

    service: str
    backend: str
    address: str
    port: int
    timeout: float

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.backend)


class LoadBalancer:
    """Services of one node and the maps that realise them."""

    def __init__(self, maps: LbMaps, store: Store, node_addresses: NodeAddresses, max_frontends: int) -> None:
        self._maps = maps
        self._store = store
        self._node_addresses = node_addresses
        self._max_frontends = max_frontends
        self._services: dict[str, Service] = {}
        # Services with an active health check, in the order of _services: due_probes walks only
        # these (every round, ten a second), not all services.
        self._checked: dict[str, None] = {}
        self._ids: dict[str, Ids] = {}
        self._health: dict[tuple[str, str], Health] = {}
        self._health_pending: set[str] = set()  # services with probe results not yet applied
        # Indexes kept in step with _services/_ids, so a change costs the same with 10 or 10k services.
        self._owners: dict[FrontendKey, str] = {}
        self._frontends_of: dict[str, list[FrontendKey]] = {}  # the inverse of _owners
        self._sorted_names: list[str] | None = None  # for paging; None after a change
        self._service_ids = IdPool(MAX_SERVICE_ID)
        self._backend_ids = IdPool(MAX_BACKENDS)
        self._rev_nat_ids = IdPool(MAX_REV_NAT)

    # ---- life cycle ----

    def start(self) -> None:
        """Load, then rewrite every persisted service and remove what none of them owns."""
        self._maps.load()
        self._reconcile()

    def adopt(self) -> None:
        """Start from a fresh store filled with the services the maps hold (see `_adopted`)."""
        self._maps.load()
        adopted = self._adopted()
        with self._store.transaction():
            for service, ids in adopted:
                self._store.put(KIND, service.name, self._doc(service, ids))
        log.warning("adopted services from the live maps", services=[s.name for s, _ in adopted])
        self._reconcile()

    def _adopted(self) -> list[tuple[Service, Ids]]:
        """Services rebuilt from the maps, named ``adopted-<service id>``.

        Kept: frontends (cluster IP or node port), protocol, affinity timeout, every backend
        with a slot in the table (address, port, weight, state) and all ids, so established
        flows keep their backend. Not in the maps, so back to defaults: the name, health
        checks, the Maglev seed (Maglev is recognised by its interleaved table, a weighted hash
        table holds each backend in one run), and backends that had no slot (draining,
        unhealthy or weight 0).
        """
        backends = self._maps.backends()
        grouped: dict[int, list[tuple[Frontend, LbService]]] = {}
        for frontend, value in self._maps.frontends():
            grouped.setdefault(int(value.service_id), []).append((frontend, value))
        out = []
        for service_id, frontends in sorted(grouped.items()):
            table = self._maps.table(service_id)
            first, value = frontends[0]
            chosen = sorted({b for b in table if b in backends})
            node_port = bool(int(value.flags) & ServiceFlag.NODE_PORT)
            protocol = next((n for n, p in model.PROTOCOLS.items() if p == first.proto), "TCP")
            size = len(table)
            runs = sum(1 for i, b in enumerate(table) if i == 0 or table[i - 1] != b)
            maglev = runs > len(set(table))
            service = Service(
                name=f"adopted-{service_id}", node_port=node_port, address="" if node_port else first.address,
                port=first.port, protocol=protocol, backends=tuple(backends[i] for i in chosen),
                maglev=maglev, table_size=size if maglev else DEFAULT_MAGLEV_TABLE,
                affinity_timeout=int(value.affinity_timeout),
            )  # fmt: skip
            rev_nat = {f.address: f.rev_nat_index for f, _ in frontends}
            ids = Ids(service_id, {backends[i].key: i for i in chosen}, rev_nat)
            out.append((service, ids))
        return out

    def _reconcile(self) -> None:
        addresses = self._node_addresses()
        for name, doc in self._store.items(KIND):
            try:
                service = model.from_proto(json_format.ParseDict(doc["spec"], pb.Service()))
            except (json_format.ParseError, WeirError, KeyError, TypeError) as exc:
                raise StoreError(self._store.path, f"holds service {name!r} that does not parse ({exc})") from None
            unhealthy = set(doc.get("unhealthy", []))
            service = replace(service, backends=tuple(
                replace(b, healthy=b.key not in unhealthy) for b in service.backends))  # fmt: skip
            ids = Ids(doc["ids"]["service"], dict(doc["ids"]["backends"]), dict(doc["ids"]["rev_nat"]))
            self._remember(service, ids, self._frontends(service, ids, addresses))
        self._maps.write([self._write(s, self._ids[n], None, addresses) for n, s in self._services.items()])
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
        self._sorted_names = None
        self._services[service.name] = service
        if service.health.interval_ms:
            self._checked[service.name] = None
        self._ids[service.name] = ids
        self._owners.update({f.key_tuple: service.name for f in frontends})
        self._frontends_of[service.name] = [f.key_tuple for f in frontends]
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
        self._sorted_names = None
        ids = self._ids.pop(name, None)
        self._services.pop(name, None)
        self._checked.pop(name, None)
        if ids is None:
            return
        for key in self._frontends_of.pop(name, []):
            if self._owners.get(key) == name:
                del self._owners[key]
        self._release(ids)

    def _allocate(self, service: Service, old: Ids | None, frontends: list[Frontend]) -> Ids:
        """Ids for a service: kept where it had them, else taken from the pools (held until released).

        If a pool runs out halfway, the ids this call took are given back before it raises.
        """
        taken: list[tuple[IdPool, int]] = []

        def take(pool: IdPool) -> int:
            taken.append((pool, pool.take()))
            return taken[-1][1]

        try:
            ids = Ids(old.service if old else take(self._service_ids))
            for b in service.backends:
                kept = old.backends.get(b.key) if old else None
                ids.backends[b.key] = kept if kept is not None else take(self._backend_ids)
            for f in frontends:
                kept = old.rev_nat.get(f.address) if old else None
                ids.rev_nat[f.address] = kept if kept is not None else take(self._rev_nat_ids)
        except Exception:
            for pool, value in taken:
                pool.release([value])
            raise
        return ids

    def _give_back(self, allocated: list[tuple[Service, Ids]]) -> None:
        """Release the ids a failed change took; keep those the current services hold."""
        for service, ids in allocated:
            self._release(ids)
            if service.name in self._ids:
                self._hold(self._ids[service.name])

    @staticmethod
    def _table(service: Service, ids: Ids) -> list[int]:
        chosen = [(b.key, b.weight) if b.selectable else (b.key, 0) for b in service.backends]
        slots = (maglev_table(chosen, service.table_size, service.seed) if service.maglev
                 else weighted_table(chosen, limit=MAX_TABLE))  # fmt: skip
        order = [ids.backends[b.key] for b in service.backends]
        return [order[i] for i in slots]

    def _write(
        self, service: Service, ids: Ids, before: tuple[Service, Ids] | None, addresses: list[str]
    ) -> ServiceWrite:
        """What the maps must hold for ``service``, and what of its version ``before`` must go."""
        frontends = self._frontends(service, ids, addresses)
        stale_frontends: list[Frontend] = []
        stale_backends: list[int] = []
        if before is not None:
            old, old_ids = before
            current = {f.key_tuple for f in frontends}
            stale_frontends = [f for f in self._frontends(old, old_ids, addresses) if f.key_tuple not in current]
            stale_backends = [i for k, i in old_ids.backends.items() if k not in ids.backends]
        return ServiceWrite(
            ids.service, service, frontends, stale_frontends, ids.backends, stale_backends, self._table(service, ids)
        )

    @staticmethod
    def _doc(service: Service, ids: Ids) -> dict[str, object]:
        spec = model.to_doc(service)
        return {
            "spec": spec,
            "ids": {"service": ids.service, "backends": ids.backends, "rev_nat": ids.rev_nat},
            "unhealthy": [b.key for b in service.backends if not b.healthy],
        }

    def _apply(self, change: Change, items: list[tuple[Service, Ids]], addresses: list[str]) -> list[ServiceWrite]:
        """Store, then maps, inside ``change``; the undo puts every service back as it was."""
        before = {s.name: (self._services[s.name], self._ids[s.name]) for s, _ in items if s.name in self._services}
        writes = [self._write(s, ids, before.get(s.name), addresses) for s, ids in items]
        writes = [w if w.service.name in before else replace(w, fresh=True) for w in writes]
        restore = [self._write(*before[s.name], (s, ids), addresses) for s, ids in items if s.name in before]
        created = [w for w in writes if w.service.name not in before]
        self._store.put_many(KIND, ((s.name, self._doc(s, ids)) for s, ids in items))

        def undo() -> None:
            if restore:
                self._maps.write(restore)
            for w in created:
                self._maps.delete(w.service_id, w.frontends, list(w.backend_ids.values()))

        change.attempt(lambda: self._maps.write(writes), undo=undo)
        return writes

    # ---- changes ----

    def upsert(self, msg: pb.Service) -> Service:
        """Create or replace a service with its backends; all or nothing."""
        return self.upsert_many([msg])[0]

    @collector_paused()
    def upsert_many(self, msgs: list[pb.Service]) -> list[Service]:
        """Create or replace many services in one change: all are checked before any is written.

        Costs O(services + backends) (plus the table builds): every lookup is in a dict.
        """
        model.check_limits(msgs)
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
        with Change(self._store) as change:
            change.on_failure(lambda: self._give_back(allocated))
            for service, frontends in plans:
                allocated.append((service, self._allocate(service, self._ids.get(service.name), frontends)))
            writes = self._apply(change, allocated, addresses)
        for (service, ids), write in zip(allocated, writes, strict=True):
            self._remember(service, ids, write.frontends)
        log.info("services upserted", services=len(allocated))
        return [service for service, _ in allocated]

    @collector_paused()
    def delete(self, name: str) -> None:
        """Remove a service, its frontends, table and backends; all or nothing."""
        service = self.get(name)
        ids = self._ids[name]
        addresses = self._node_addresses()
        frontends = self._frontends(service, ids, addresses)
        backend_ids = list(ids.backends.values())
        restore = self._write(service, ids, None, addresses)
        with Change(self._store) as change:
            self._store.delete(KIND, name)
            change.attempt(lambda: self._maps.delete(ids.service, frontends, backend_ids, stats=False),
                           undo=lambda: self._maps.write([restore]))  # fmt: skip
        self._forget(name)
        self._maps.delete_stats(ids.service, backend_ids)  # counters of ids nobody holds any more

    def set_backend(
        self, name: str, address: str, port: int, weight: int | None, state: BackendState | None
    ) -> Service:
        service = self.get(name)
        address = str(validate.address(address, "address", versions=(4,)))
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
        updated = service.with_backend(changed)
        model.check_table(updated)
        return self._replace([updated])[0]

    def _replace(self, services: list[Service]) -> list[Service]:
        """Rewrite existing services (same ids) in one change."""
        items = [(s, self._ids[s.name]) for s in services]
        addresses = self._node_addresses()
        with Change(self._store) as change:
            writes = self._apply(change, items, addresses)
        for (service, ids), write in zip(items, writes, strict=True):
            self._remember(service, ids, write.frontends)
        return services

    # ---- queries ----

    def get(self, name: str) -> Service:
        if name not in self._services:
            raise NotFound(f"service {validate.shown(name)} does not exist")
        return self._services[name]

    def service_id(self, name: str) -> int:
        self.get(name)
        return self._ids[name].service

    def frontends(self, name: str) -> list[str]:
        return [f"{a}:{p}" for a, p, _ in self._frontends_of.get(name, [])]

    @collector_paused()
    def list_page(self, page_size: int = 0, page_token: str = "") -> tuple[list[Service], str]:
        """Services ordered by name; the token says where the next page starts."""
        if self._sorted_names is None:  # sorted once per change, not once per page
            self._sorted_names = sorted(self._services)
        return paging.page(self._sorted_names, page_size, page_token, self._services.__getitem__,
                           default_size=DEFAULT_PAGE_SIZE, max_size=MAX_PAGE_SIZE)  # fmt: skip

    def counters(self, name: str) -> tuple[Counts, list[tuple[Backend, Counts]]]:
        service = self.get(name)
        ids = self._ids[name]
        return self._maps.counts("lb_service_stats", ids.service), [
            (b, self._maps.counts("lb_backend_stats", ids.backends[b.key])) for b in service.backends
        ]

    # ---- active health checks (probes run off the worker; see services.lb.probes) ----

    def due_probes(self, now: float | None = None, busy: Collection[tuple[str, str]] = ()) -> list[Probe]:
        """Backends whose next probe is due (and not still in flight); their clocks move on."""
        now = time.monotonic() if now is None else now
        due = []
        known = set()
        for name in self._checked:
            service = self._services[name]
            hc = service.health
            for b in service.backends:
                key = (name, b.key)
                known.add(key)
                state = self._health.setdefault(key, Health())
                if now < state.next_at or key in busy:
                    continue
                state.next_at = now + hc.interval_ms / 1000
                due.append(Probe(name, b.key, b.address, b.port, hc.timeout_ms / 1000))
        for key in [k for k in self._health if k not in known]:
            del self._health[key]  # deleted services and backends, or checks turned off
        return due

    def apply_probes(self, results: Iterable[tuple[Probe, bool]]) -> list[str]:
        """Count probe results; rewrite the services whose rotation changed, in one change.

        A service stays pending until its rewrite succeeds, so a round that fails (a full
        disk) is retried by the next round even when no new probe result arrives.
        """
        for probe, ok in results:
            state = self._health.get(probe.key)
            if state is None or probe.service not in self._services:
                continue  # deleted while the probe ran
            state.successes, state.failures = (state.successes + 1, 0) if ok else (0, state.failures + 1)
            self._health_pending.add(probe.service)
        changed = []
        for name in sorted(self._health_pending):
            service = self._services.get(name)
            if service is None:
                continue
            hc, updated = service.health, service
            for b in service.backends:
                state = self._health.get((name, b.key))
                if state is None:
                    continue
                if b.healthy and state.failures >= hc.unhealthy_threshold:
                    updated = updated.with_backend(replace(b, healthy=False))
                elif not b.healthy and state.successes >= hc.healthy_threshold:
                    updated = updated.with_backend(replace(b, healthy=True))
            if updated != service:
                changed.append(updated)
        if changed:
            self._replace(changed)
            for s in changed:
                log.info("health changed rotation", service=s.name,
                         unhealthy=[b.key for b in s.backends if not b.healthy])  # fmt: skip
        self._health_pending.clear()
        return [s.name for s in changed]

    def health_round(
        self, results: Iterable[tuple[Probe, bool]], busy: Collection[tuple[str, str]] = ()
    ) -> list[Probe]:
        """One round on the worker: apply finished probes, then say which to start next."""
        self.apply_probes(results)
        return self.due_probes(busy=busy)
