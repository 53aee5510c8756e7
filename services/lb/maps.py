"""The load balancer's BPF object: programs in their slots and cgroup, and its maps.

`LbMaps` writes one service at a time in an order that keeps every packet's
lookups consistent: backends exist before a table names them, a table never
has fewer slots than its service's `table_size` says, and backends go only
after no table names them any more.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from pybpf import BPF_F_INNER_MAP as BPF_F_INNER_MAP  # re-exported: bench/lb_cost.py imports it from here
from pybpf import (
    AttachType,
    BpfError,
    BpfObject,
    KeyNotFoundError,
    Map,
    MapOfMaps,
    Program,
    attach_cgroup,
    detach_cgroup,
    query_cgroup,
)
from pybpf.batch import delete_packed, pack_u32, update_packed
from services.common.chain_client import Placement, Register
from services.common.datapath import Hook, Slot
from services.common.objects import load_service_object, pin_programs
from services.lb.defs import BackendState, LbBackend, LbRevNat, LbService, LbServiceKey, LbStats, ServiceFlag
from services.lb.model import Backend, Service

log = structlog.get_logger("weir.lb.maps")

OWN_MAPS = [
    "lb_services", "lb_backends", "lb_tables", "lb_rev_nat", "lb_affinity",
    "lb_service_stats", "lb_backend_stats", "lb_sock_revnat",
]  # fmt: skip
TC_PROGRAMS = {
    "lb_from_container": (Hook.FROM_CONTAINER, Slot.LB),
    "lb_from_network": (Hook.FROM_NETWORK, Slot.LB),
    "lb_to_container": (Hook.TO_CONTAINER, Slot.LB_REPLY),
    "lb_to_network": (Hook.TO_NETWORK, Slot.LB_REPLY),
}
SOCK_PROGRAMS = {
    "lb_connect4": AttachType.CGROUP_INET4_CONNECT,
    "lb_sendmsg4": AttachType.CGROUP_UDP4_SENDMSG,
    "lb_recvmsg4": AttachType.CGROUP_UDP4_RECVMSG,
    "lb_getpeername4": AttachType.CGROUP_INET4_GETPEERNAME,
}
STATS_MAPS = ("lb_service_stats", "lb_backend_stats")


@dataclass(frozen=True)
class Frontend:
    address: str
    port: int
    proto: int
    rev_nat_index: int

    @property
    def key_tuple(self) -> tuple[str, int, int]:
        return (self.address, self.port, self.proto)

    def key(self) -> LbServiceKey:
        key = LbServiceKey()
        ctypes.memmove(key.addr, socket.inet_aton(self.address), 4)  # validated dotted quads only
        key.port = int.from_bytes(self.port.to_bytes(2, "big"), "little")
        key.proto = self.proto
        key.family = 2
        return key


def _as_int(raw: object) -> int:
    return int.from_bytes(raw, "little") if isinstance(raw, (bytes, bytearray)) else int(raw)  # type: ignore[call-overload]


def _net_port(port: int) -> int:
    """A port as the u16 the BPF side reads in network order."""
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def backend_value(backend: Backend) -> LbBackend:
    value = LbBackend()
    ctypes.memmove(value.addr, socket.inet_aton(backend.address), 4)
    value.port = _net_port(backend.port)
    value.family = 2
    value.state = backend.state
    value.weight = backend.weight
    return value


@dataclass(frozen=True)
class ServiceWrite:
    """One service as the maps must hold it, and what of its previous version must go."""

    service_id: int
    service: Service
    frontends: list[Frontend]
    stale_frontends: list[Frontend]
    backend_ids: dict[str, int]
    stale_backend_ids: list[int]
    table: list[int]
    fresh: bool = False  # a new service: none of its frontends is in the maps yet


Change = ServiceWrite  # the old name, still used by bench/lb_cost.py


@dataclass(frozen=True)
class Counts:
    packets: int
    bytes: int
    new_conns: int


class LbMaps:
    """Owns the LB object, its slots and cgroup attachments, and its maps."""

    def __init__(
        self,
        bpf_dir: Path,
        globals_dir: Path,
        pin_dir: Path,
        cgroup: Path,
        sizes: Mapping[str, int] | None = None,
        register: Register | None = None,
    ) -> None:
        """``sizes`` overrides the max_entries of own maps (small maps for tests and small nodes);
        ``register`` hands the pinned tc programs to the orchestrator (none: the caller places them).
        """
        self._path = bpf_dir / "lb.o"
        self._sizes = dict(sizes or {})
        self._register = register
        self._globals_dir = globals_dir
        self._pin_dir = pin_dir
        self._cgroup = cgroup
        self._obj: BpfObject | None = None
        self.maps: dict[str, Map] = {}
        self.programs: dict[str, Program] = {}
        self._services: Map
        self._backends: Map
        self._rev_nat: Map
        self._tables: MapOfMaps
        self._stats: dict[str, Map] = {}

    def load(self) -> None:
        """Load, reuse this service's pins, register for the slots, (re)attach the socket hooks."""
        obj = load_service_object(self._path, self._globals_dir, self._pin_dir, OWN_MAPS, self._sizes)
        self._obj = obj
        self.maps = {name: obj.maps[name] for name in OWN_MAPS}
        self._services = obj.typed_map("lb_services", LbServiceKey, LbService)
        self._backends = obj.typed_map("lb_backends", ctypes.c_uint32, LbBackend)
        self._rev_nat = obj.typed_map("lb_rev_nat", ctypes.c_uint32, LbRevNat)
        self._tables = obj.map_of_maps("lb_tables", ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32)
        self._stats = {name: obj.typed_map(name, ctypes.c_uint32, LbStats) for name in STATS_MAPS}
        previous = self._pinned_ids()
        self.programs = pin_programs(obj, [*TC_PROGRAMS, *SOCK_PROGRAMS], self._pin_dir)
        if self._register is not None:
            self._register([Placement(hook, slot, self._pin_dir / name) for name, (hook, slot) in TC_PROGRAMS.items()])
        self._attach_sockets(previous)

    def _pinned_ids(self) -> set[int]:
        """Ids of the socket programs this instance pinned last time (its own, to replace)."""
        ids = set()
        for name in SOCK_PROGRAMS:
            try:
                with Program.from_pin(self._pin_dir / name) as program:
                    ids.add(program.id)
            except (BpfError, OSError):
                continue
        return ids

    def _attach_sockets(self, previous: set[int]) -> None:
        """Attach the socket programs to the node's cgroup, replacing our older ones only.

        Another instance's programs of the same name may share the cgroup: they stay.
        """
        self._cgroup.mkdir(parents=True, exist_ok=True)
        for name, attach_type in SOCK_PROGRAMS.items():
            stale = [prog_id for prog_id in query_cgroup(self._cgroup, attach_type) if prog_id in previous]
            attach_cgroup(self._cgroup, self.programs[name], attach_type, multi=True)
            for prog_id in stale:
                with Program.from_id(prog_id) as program:
                    detach_cgroup(self._cgroup, program, attach_type)

    def detach_sockets(self) -> None:
        for name, attach_type in SOCK_PROGRAMS.items():
            if self._cgroup.exists() and self.programs[name].id in query_cgroup(self._cgroup, attach_type):
                detach_cgroup(self._cgroup, self.programs[name], attach_type)

    def close(self) -> None:
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    # ---- writing a service ----

    def _table_size(self, frontends: list[Frontend]) -> int | None:
        for f in frontends:
            value = self._services.lookup(f.key())
            if value is not None:
                return int(value.table_size)
        return None

    def _shrinks(self, change: ServiceWrite) -> bool:
        """Whether the table gets no more slots than the frontends name now (read only when unknown)."""
        return not change.fresh and len(change.table) <= (self._table_size(change.frontends) or 0)

    def write(self, changes: list[ServiceWrite]) -> None:
        """Make the maps hold these services, in batches: backends, reverse NAT, tables, frontends.

        A frontend's `table_size` never exceeds the slots of the table it names:
        services whose table shrinks get their frontends first, the others after
        the tables. The tables of all services swap in one batch (one RCU wait
        for the lot, not one per service).
        """
        backends = [(c.backend_ids[b.key], backend_value(b)) for c in changes for b in c.service.backends]
        self._batch(self._backends, backends)
        rev_nat = []
        for c in changes:
            for f in c.frontends:
                value = LbRevNat()
                ctypes.memmove(value.addr, socket.inet_aton(f.address), 4)
                value.port = _net_port(f.port)
                value.family = 2
                rev_nat.append((f.rev_nat_index, value))
        self._batch(self._rev_nat, rev_nat)
        shrinks = [self._shrinks(c) for c in changes]
        shrinking = [c for c, shrink in zip(changes, shrinks, strict=True) if shrink]
        growing = [c for c, shrink in zip(changes, shrinks, strict=True) if not shrink]
        self._write_frontends(shrinking)
        self._write_tables(changes)
        self._write_frontends(growing)
        self._delete_frontends([f for c in changes for f in c.stale_frontends])
        stale = [i for c in changes for i in c.stale_backend_ids]
        for m in (self._backends, self._stats["lb_backend_stats"]):
            self._delete_keys(m, stale)

    @staticmethod
    def _batch(m: Map, items: Sequence[tuple[Any, ctypes.Structure]]) -> None:
        """One packed batch: keys (u32 ids or structures) and values laid out back to back."""
        if not items:
            return
        first = items[0][0]
        keys = pack_u32(k for k, _ in items) if isinstance(first, int) else b"".join(bytes(k) for k, _ in items)
        update_packed(m, keys, b"".join(bytes(v) for _, v in items), len(items))

    def _write_frontends(self, changes: list[ServiceWrite]) -> None:
        items = []
        for c in changes:
            flags = (ServiceFlag.AFFINITY if c.service.affinity_timeout else 0) | (
                ServiceFlag.NODE_PORT if c.service.node_port else 0
            )
            for f in c.frontends:
                items.append((f.key(), LbService(
                    service_id=c.service_id, table_size=len(c.table), flags=flags,
                    affinity_timeout=c.service.affinity_timeout, rev_nat_index=f.rev_nat_index,
                )))  # fmt: skip
        self._batch(self._services, items)

    def _write_tables(self, changes: list[ServiceWrite]) -> None:
        for c in changes:
            if not c.table:
                with contextlib.suppress(KeyNotFoundError):
                    self._tables.delete(c.service_id)
        filled = [(c.service_id, pack_u32(c.table)) for c in changes if c.table]
        if filled:
            self._tables.replace_many_packed(filled, name=lambda service_id: f"lb_table_{service_id}")

    def _delete_frontends(self, frontends: list[Frontend]) -> None:
        """Each frontend and then its reverse-NAT entry, the absent ones skipped (two batches)."""
        if frontends:
            delete_packed(self._services, b"".join(bytes(f.key()) for f in frontends), len(frontends), missing_ok=True)
            self._delete_keys(self._rev_nat, [f.rev_nat_index for f in frontends])

    def delete(self, service_id: int, frontends: list[Frontend], backend_ids: list[int], stats: bool = True) -> None:
        """Remove a service's frontends, table and backends (and their counters, if ``stats``).

        Absent keys are skipped, so it also cleans up after a half-written service.
        """
        self._delete_frontends(frontends)
        with contextlib.suppress(KeyNotFoundError):
            self._tables.delete(service_id)
        self._delete_keys(self._backends, backend_ids)
        if stats:
            self.delete_stats(service_id, backend_ids)

    def delete_stats(self, service_id: int, backend_ids: list[int]) -> None:
        """Forget the counters of ids that no service holds (a new holder starts from zero)."""
        self._delete_keys(self._stats["lb_service_stats"], [service_id])
        self._delete_keys(self._stats["lb_backend_stats"], backend_ids)

    @staticmethod
    def _delete_keys(handle: Map, keys: list[int]) -> None:
        """Delete u32 keys in one batch; absent ones are skipped."""
        if keys:
            delete_packed(handle, pack_u32(keys), len(keys), missing_ok=True)

    # ---- reading ----

    def frontend_keys(self) -> set[tuple[str, int, int]]:
        out = set()
        for key in self._services:
            port = int.from_bytes(int(key.port).to_bytes(2, "little"), "big")
            out.add((str(ipaddress.ip_address(bytes(key.addr)[:4])), port, int(key.proto)))
        return out

    def backend_ids(self) -> set[int]:
        return {int(k) for k in self._backends}

    def frontends(self) -> list[tuple[Frontend, LbService]]:
        """Every frontend with what the datapath does for it (read back to adopt a lost store)."""
        out = []
        for key, value in self._services.items():
            port = int.from_bytes(int(key.port).to_bytes(2, "little"), "big")
            address = str(ipaddress.ip_address(bytes(key.addr)[:4]))
            out.append((Frontend(address, port, int(key.proto), int(value.rev_nat_index)), value))
        return out

    def backends(self) -> dict[int, Backend]:
        """Every backend by id, as the datapath has it."""
        out = {}
        for key, value in self._backends.items():
            port = int.from_bytes(int(value.port).to_bytes(2, "little"), "big")
            address = str(ipaddress.ip_address(bytes(value.addr)[:4]))
            out[int(key)] = Backend(address, port, int(value.weight), BackendState(int(value.state)))
        return out

    def table(self, service_id: int) -> list[int]:
        """A service's selection table (backend ids by slot); empty when it has none."""
        inner = self._tables.get(service_id)
        if inner is None:
            return []
        with inner:
            return [_as_int(v) for _, v in sorted(inner.items(), key=lambda kv: _as_int(kv[0]))]

    def service_ids(self) -> set[int]:
        return {int(k) for k in self._tables}

    def counts(self, name: str, key: int) -> Counts:
        total = self._stats[name].lookup_sum(key)
        if total is None:
            return Counts(0, 0, 0)
        return Counts(int(total.packets), int(total.bytes), int(total.new_conns))
