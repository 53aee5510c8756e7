"""The socket-layer fast path: its modes, the node's local addresses, and what it reports.

`SockAccel` is the plain class the gRPC layer, the tests and the benchmarks call. The
desired state is the node's mode and per-endpoint overrides (in the store); the
datapath's view of which local addresses may be an end of an accelerated pair is
rebuilt from the orchestrator's endpoints (each change) and the node's own addresses.

What turning off means: the node word (or an endpoint's flag) changes in one map write.
sock_ops reads it at every ESTABLISHED, so no new pair is accelerated; sk_msg reads it
at every message of an accelerated socket, so each socket moves to the normal path at its
next message, for good. No socket is taken out of the sockhash, so no queued byte is
purged and the receiver reads redirected bytes before those TCP brings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from services.common import paging
from services.common.change import Change as StoreChange
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.store import Store
from services.common.validate import name as valid_name
from services.sockaccel.defs import FALLBACK_STATS, REFUSED_STATS, AddrFlag, AddrInfo, ConnState, Role, Stat
from services.sockaccel.maps import SockaccelMaps, Socket

log = structlog.get_logger("weir.sockaccel")

NODE = "node"
ENDPOINT = "endpoint"
REVISION = "mode"
ON, OFF, INHERIT = "on", "off", "inherit"
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000
STAT_NAMES = {v: k for k, v in {**FALLBACK_STATS, **REFUSED_STATS}.items()}


@dataclass(frozen=True)
class EndpointView:
    name: str
    id: int
    ipv4: str
    ipv6: str


@dataclass(frozen=True)
class ModeChange:
    revision: int
    changed: bool


@dataclass(frozen=True)
class Counters:
    accelerated_current: int
    accelerated_total: int
    messages_redirected: int
    bytes_redirected: int
    messages_passed: int
    fallbacks: dict[str, int]
    refused: dict[str, int]
    resumed: int


@dataclass(frozen=True)
class Status:
    enabled: bool
    supported: bool
    unsupported_reason: str
    policy_bound: bool
    attached: bool
    endpoints: dict[str, str]
    counters: Counters
    revision: int


@dataclass(frozen=True)
class Connection:
    socket: Socket
    role: str
    state: str
    reason: str


class SockAccel:
    """Node-local TCP between allowed sockets, handed from socket to socket."""

    def __init__(
        self,
        maps: SockaccelMaps,
        store: Store,
        host_addresses: Callable[[], list[str]],
        support: Callable[[], str],
    ) -> None:
        """``support`` says why the kernel cannot run the fast path ("" when it can)."""
        self._maps = maps
        self._store = store
        self._host_addresses = host_addresses
        self._support = support
        self._unsupported = ""
        self._endpoints: dict[str, EndpointView] = {}
        self._synced = False

    # ---- life cycle ----

    def start(self) -> None:
        """Load and attach (when the kernel can), then put back the stored mode."""
        self._unsupported = self._support()
        if self._unsupported:
            log.warning("socket acceleration unavailable", reason=self._unsupported)
            return
        self._maps.load()
        self._maps.set_enabled(self._node_enabled())
        if not self._maps.policy_bound:
            log.warning("the policy service's maps are not pinned yet: nothing is accelerated until they are")

    def adopt(self) -> None:
        """Nothing to adopt beyond the maps themselves: modes start off, addresses come from the orchestrator."""
        self.start()

    def close(self) -> None:
        self._maps.close()

    def rebind(self) -> bool:
        """Load again when the policy service pins maps this object does not read (periodic).

        That is once they first exist, and again whenever they are replaced (the policy service
        started anew after its pins were removed): reading the old ones would keep an old policy.
        Sockets already in the fast path keep the programs (and maps) they were added with, so
        on a replacement they are all sent to the normal path; new ones use the new maps. True
        when it loaded.
        """
        if self._unsupported or not self._maps.loaded or not self._maps.policy_stale():
            return False
        replaced = self._maps.policy_ids is not None
        self._maps.load()
        retired = self._maps.retire_sockets() if replaced else 0
        log.info("bound to the policy service's maps; acceleration follows policy now",
                 maps=self._maps.policy_ids, retired=retired)  # fmt: skip
        return True

    # ---- modes ----

    def _node_enabled(self) -> bool:
        doc = self._store.get(NODE, "mode")
        return bool(doc and doc.get("enabled"))

    def _require_supported(self) -> None:
        if self._unsupported:
            raise FailedPrecondition(f"socket acceleration cannot run here: {self._unsupported} (needs Linux 4.17+)")

    def set_mode(self, enabled: bool) -> ModeChange:
        self._require_supported()
        if self._node_enabled() == enabled:
            return ModeChange(self._store.revision(REVISION), False)
        before = self._maps.enabled()
        with StoreChange(self._store) as change:
            self._store.put(NODE, "mode", {"enabled": enabled})
            revision = self._store.bump_revision(REVISION)
            change.apply(lambda: self._maps.set_enabled(enabled), undo=lambda: self._maps.set_enabled(before))
        log.info("socket acceleration turned " + (ON if enabled else OFF), revision=revision)
        return ModeChange(revision, True)

    def set_endpoint_mode(self, endpoint: str, mode: str) -> ModeChange:
        valid_name(endpoint, "endpoint")
        if mode not in (ON, OFF, INHERIT):
            raise InvalidArgument(f"mode {mode!r} is not one of on, off, inherit")
        self._require_supported()
        if endpoint not in self._endpoints:
            hint = "" if self._synced else " (the orchestrator's endpoints have not arrived yet)"
            raise NotFound(f"endpoint {endpoint!r} is not an endpoint of this node{hint}")
        doc = self._store.get(ENDPOINT, endpoint)
        current = doc["mode"] if doc else INHERIT
        if current == mode:
            return ModeChange(self._store.revision(REVISION), False)
        before = self._overrides()
        after = {k: v for k, v in before.items() if k != endpoint} | ({} if mode == INHERIT else {endpoint: mode})
        with StoreChange(self._store) as change:
            if mode == INHERIT:
                self._store.delete(ENDPOINT, endpoint)
            else:
                self._store.put(ENDPOINT, endpoint, {"mode": mode})
            revision = self._store.bump_revision(REVISION)
            change.attempt(lambda: self._write_addresses(after), undo=lambda: self._write_addresses(before))
        log.info("endpoint acceleration mode set", endpoint=endpoint, mode=mode, revision=revision)
        return ModeChange(revision, True)

    def _overrides(self) -> dict[str, str]:
        return {name: str(doc["mode"]) for name, doc in self._store.items(ENDPOINT)}

    # ---- the node's local addresses ----

    def set_endpoints(self, snapshot: bool, upserted: Iterable[EndpointView], deleted: Iterable[str]) -> None:
        """Follow the orchestrator's endpoints (a snapshot replaces them all)."""
        if snapshot:
            self._endpoints = {}
            self._synced = True
        for e in upserted:
            self._endpoints[e.name] = e
        for name in deleted:
            self._endpoints.pop(name, None)
        if not self._unsupported and self._maps.loaded:
            self._write_addresses(self._overrides())

    def _write_addresses(self, overrides: dict[str, str]) -> None:
        wanted: dict[str, AddrInfo] = {}
        for address in self._host_addresses():
            wanted[address] = AddrInfo(endpoint=0, flags=AddrFlag.HOST)
        for e in self._endpoints.values():
            flags = AddrFlag.ENDPOINT | (AddrFlag.DISABLED if overrides.get(e.name) == OFF else 0)
            for address in (e.ipv4, e.ipv6):
                if address:
                    wanted[str(ipaddress.ip_address(address))] = AddrInfo(endpoint=e.id, flags=flags)
        self._maps.replace_addresses(wanted)

    # ---- reading ----

    def counters(self) -> Counters:
        if self._unsupported or not self._maps.loaded:
            return Counters(0, 0, 0, 0, 0, {}, {}, 0)
        s = self._maps.stats()
        current = sum(1 for sock in self._maps.sockets() if sock.conn.state != ConnState.FALLBACK)
        return Counters(
            accelerated_current=current,
            accelerated_total=s[Stat.ACCEL_STARTED],
            messages_redirected=s[Stat.MSGS_REDIRECTED],
            bytes_redirected=s[Stat.BYTES_REDIRECTED],
            messages_passed=s[Stat.PASSED],
            fallbacks={name: s[stat] for name, stat in FALLBACK_STATS.items()},
            refused={name: s[stat] for name, stat in REFUSED_STATS.items()},
            resumed=s[Stat.RESUMED],
        )

    def status(self) -> Status:
        loaded = not self._unsupported and self._maps.loaded
        return Status(
            enabled=self._node_enabled(),
            supported=not self._unsupported,
            unsupported_reason=self._unsupported,
            policy_bound=loaded and self._maps.policy_bound,
            attached=loaded and self._maps.attached(),
            endpoints=self._overrides(),
            counters=self.counters(),
            revision=self._store.revision(REVISION),
        )

    def connections(self, page_size: int, token: str) -> tuple[list[Connection], str]:
        size = paging.page_size(page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if self._unsupported or not self._maps.loaded:
            return [], ""
        found = {f"{s.local}|{s.local_port:05d}|{s.remote}|{s.remote_port:05d}": s for s in self._maps.sockets()}
        return paging.page(sorted(found), size, token, lambda k: _connection(found[k]), size, MAX_PAGE_SIZE)


def _connection(s: Socket) -> Connection:
    conn = s.conn
    return Connection(
        socket=s,
        role=Role(conn.role).name if conn.role in Role._value2member_map_ else str(conn.role),
        state=ConnState(conn.state).name if conn.state in ConnState._value2member_map_ else str(conn.state),
        reason=STAT_NAMES.get(Stat(conn.reason), "") if conn.reason in Stat._value2member_map_ and conn.reason else "",
    )
