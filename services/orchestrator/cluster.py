"""Cluster mode: nodes, label identities and the ipcache shared through etcd (`--kvstore`).

As in Cilium's kvstore mode, etcd holds three things under `weir/v1/`:

- `nodes/<name>`: each node's record, bound to that node's lease. The node keeps the lease
  alive (a keepalive every third of its TTL); a node that stops doing so for a whole TTL
  (the grace period) loses the lease, etcd deletes its keys, and every other node drops
  its routes and ipcache entries as the deletes arrive on its watch.
- `identities/labels/<label key>` -> number and `identities/ids/<number>` -> label key: a
  label identity is created by one transaction that puts both only if neither exists, so
  two nodes racing for the same labels or the same number never both win; the loser reads
  the winner's number (same labels) or tries the next number.
- `ipcache/<node>/<prefix>` -> {identity, node, endpoint}: the node's endpoints, bound to
  its lease. Every node watches the prefix and puts other nodes' entries in its ipcache.

Identity keys are garbage-collected: an identity that no `ipcache/` entry of any node (and
no endpoint of this node) has used for the whole grace period (`--kvstore-identity-gc-seconds`)
is deleted by a transaction that fails if either key changed meanwhile. A node publishing an
endpoint rewrites its identity's keys after its ipcache key (so a collection racing with it
fails, or the keys come back), and every node forgets a collected label set it does not use.

When etcd cannot be reached the datapath is left alone: the ipcache keeps what it had,
local endpoint changes are queued and published (with a full resync of this node's keys)
when etcd answers again; only a new label set cannot get a number meanwhile, and its
endpoint is refused with UNAVAILABLE, as Cilium's agent cannot allocate a global identity
without its kvstore. Without `--kvstore` none of this runs and the node keeps using only
its SQLite store.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import queue
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from services.common.datapath import FIRST_LABEL_IDENTITY
from services.common.errors import Aborted, InvalidArgument
from services.common.validate import NAME_RE, Network
from services.common.worker import Worker
from services.orchestrator.endpoints import Endpoint
from services.orchestrator.identities import MAX_LABEL_IDENTITY, Identities
from services.orchestrator.kvstore import Entry, KvStore, KvStoreConfig, KvStoreUnavailable, WatchEvent

log = structlog.get_logger("weir.orchestrator.cluster")

PREFIX = "weir/v1/"
NODES = f"{PREFIX}nodes/"
LABELS = f"{PREFIX}identities/labels/"
IDS = f"{PREFIX}identities/ids/"
IPCACHE = f"{PREFIX}ipcache/"
DEFAULT_LEASE_SECONDS = 15
DEFAULT_IDENTITY_GC_SECONDS = 900.0  # as Cilium's identity GC interval
MAX_GC_SCAN_SECONDS = 60.0
DEFAULT_CONNECT_SECONDS = 15.0
MIN_LEASE_SECONDS = 2
RETRY_SECONDS = 1.0
MAX_ALLOCATE_ATTEMPTS = 256
SPREAD = 16  # a new number is drawn from this many lowest free ones


@dataclass(frozen=True)
class NodeRecord:
    """What a node publishes about itself (the shape of the node table's record)."""

    name: str
    node_id: int = 0
    addresses: tuple[str, ...] = ()
    cidrs: tuple[str, ...] = ()
    routing: str = ""
    key_index: int = 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> NodeRecord:
        doc = json.loads(data)
        return cls(
            name=str(doc["name"]),
            node_id=int(doc.get("node_id", 0)),
            addresses=tuple(str(a) for a in doc.get("addresses", ())),
            cidrs=tuple(str(c) for c in doc.get("cidrs", ())),
            routing=str(doc.get("routing", "")),
            key_index=int(doc.get("key_index", 0)),
        )


@dataclass(frozen=True)
class RemoteEntry:
    """Another node's endpoint address, as its ipcache key says."""

    network: Network
    identity: int
    node: str
    endpoint: str


class ClusterSink(Protocol):
    """What the cluster changes on this node (called on the cluster's threads)."""

    def learn_identity(self, pairs: list[tuple[str, int]]) -> None: ...

    def remote_up(self, entries: list[RemoteEntry]) -> None: ...

    def remote_down(self, networks: list[Network]) -> None: ...

    def forget_identity(self, pairs: list[tuple[str, int]]) -> None: ...


NodeUpsert = Callable[[NodeRecord], None]
NodeDelete = Callable[[str], None]


@dataclass(frozen=True)
class ClusterStatus:
    node_name: str
    endpoints: tuple[str, ...]
    connected: bool
    lease_id: int
    lease_ttl: int
    last_error: str
    nodes: tuple[NodeRecord, ...]
    pending: int
    remote_prefixes: int
    conflicts: tuple[str, ...]


def ipcache_key(node: str, network: Network) -> str:
    return f"{IPCACHE}{node}/{network}"


def parse_ipcache_key(key: str) -> tuple[str, Network] | None:
    node, sep, prefix = key.removeprefix(IPCACHE).partition("/")
    try:
        return (node, ipaddress.ip_network(prefix)) if sep else None
    except ValueError:
        return None


@dataclass
class _Known:
    """What this node has read from etcd (the watch side's view)."""

    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    remote: dict[str, RemoteEntry] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)


class Cluster:
    """This node's membership: its lease, what it publishes, what it learns from the others."""

    def __init__(
        self,
        kv: KvStore,
        local: NodeRecord,
        sink: ClusterSink,
        lease_ttl: int = DEFAULT_LEASE_SECONDS,
        identity_gc: float = DEFAULT_IDENTITY_GC_SECONDS,
    ):
        """`identity_gc`: seconds an identity no endpoint uses is kept in etcd (0: never collected)."""
        if not NAME_RE.fullmatch(local.name):
            raise InvalidArgument(f"node name {local.name!r} is invalid: lowercase letters, digits, '-' and '.'")
        if lease_ttl < MIN_LEASE_SECONDS:
            raise InvalidArgument(f"kvstore lease of {lease_ttl}s is too short: at least {MIN_LEASE_SECONDS}s")
        self._kv = kv
        self._local = local
        self._sink = sink
        self._ttl = lease_ttl
        self._lock = threading.Lock()
        self._lease = 0
        self._lease_left = 0
        self._connected = False
        self._watching = False
        self._last_error = ""
        self._own: dict[str, bytes] = {}
        self._pending: dict[str, bytes | None] = {}
        self._resync = True
        self._node_dirty = False
        self._known = _Known()
        self._used_ids: set[int] = set()
        self._conflicts: list[str] = []
        self.allocation_retries = 0  # lost races (another node took the number first)
        self._identity_gc = identity_gc
        self._unused: dict[int, tuple[float, int]] = {}  # number -> (unused since, mod revision then)
        self._numbered: dict[int, str] = {}  # number -> label key, as this node last knew it (kept after a release)
        self.identities_collected = 0
        self._node_listeners: list[tuple[NodeUpsert, NodeDelete]] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- life cycle ----

    @property
    def name(self) -> str:
        return self._local.name

    def set_local(self, record: NodeRecord) -> None:
        """Publish a changed record of this node (addresses, CIDRs, routing, key index)."""
        if record.name != self.name:
            raise InvalidArgument(f"node {self.name!r} cannot publish a record named {record.name!r}")
        with self._lock:
            self._local = record
            self._node_dirty = True
        self._wake.set()

    def on_node(self, upsert: NodeUpsert, delete: NodeDelete) -> None:
        """Call upsert(record) for every other node seen or changed, delete(name) when it goes."""
        self._node_listeners.append((upsert, delete))

    @staticmethod
    def wait_reachable(kv: KvStore, timeout: float) -> None:
        """Block until etcd answers; `KvStoreUnavailable` with what went wrong after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                kv.version()
                return
            except KvStoreUnavailable as exc:
                if time.monotonic() >= deadline:
                    raise KvStoreUnavailable(
                        f"cannot reach the kvstore at {','.join(kv.config.endpoints)} within {timeout:g}s: "
                        f"{exc}; start etcd (or fix --kvstore/TLS flags), or run without --kvstore for a "
                        "standalone node"
                    ) from None
                time.sleep(min(RETRY_SECONDS, max(0.0, deadline - time.monotonic())))

    def start(self, label_identities: dict[str, int], endpoints: Iterable[Endpoint]) -> None:
        """Publish this node's identities, register with a lease, then follow the others.

        `label_identities` are the ones this node already holds (from its store); each is
        published unless another node has the same labels under another number, which is
        reported as a conflict (in the status and the log) and left as it is.
        """
        for key, identity in label_identities.items():
            self._used_ids.add(identity)
            self._publish_identity(key, identity)
        for endpoint in endpoints:
            self.endpoint_changed("CREATED", endpoint)
        for target, name in ((self._session_loop, "session"), (self._watch_loop, "watch")):
            thread = threading.Thread(target=target, name=f"cluster-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop following and publishing; the lease is left to expire (a restart keeps the node)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._kv.close()

    # ---- identities ----

    def allocate(self, key: str) -> int:
        """The cluster-wide number of a label set: the existing one, or a new one made in one
        transaction that fails if either the labels or the number already exist."""
        with self._lock:
            known = self._known.labels.get(key)
        if known is not None:
            return known
        try:
            current = self._kv.get(LABELS + key)
            for _ in range(MAX_ALLOCATE_ATTEMPTS):
                if current is not None:
                    return self._remember(key, int(current))
                candidate = self._next_free()
                if self._kv.create({LABELS + key: str(candidate).encode(), IDS + str(candidate): key.encode()}):
                    log.info("identity allocated in the cluster", labels=key, identity=candidate)
                    return self._remember(key, candidate)
                # Lost a race: another node made these labels (use its number) or took this number.
                self.allocation_retries += 1
                current = self._kv.get(LABELS + key)
                if current is None:
                    with self._lock:
                        self._used_ids.add(candidate)
        except KvStoreUnavailable as exc:
            raise KvStoreUnavailable(
                f"labels {key!r} have no identity yet and the kvstore is needed to allocate one: {exc}"
            ) from None
        raise Aborted(f"no identity for labels {key!r} after {MAX_ALLOCATE_ATTEMPTS} tries; try again")

    def _remember(self, key: str, identity: int) -> int:
        with self._lock:
            self._known.labels[key] = identity
            self._numbered[identity] = key
            self._used_ids.add(identity)
        return identity

    def _next_free(self) -> int:
        """One of the lowest free numbers, picked at random so nodes allocating at once seldom
        try the same one (numbers stay dense; a lost race costs one more round trip)."""
        free: list[int] = []
        with self._lock:
            candidate = FIRST_LABEL_IDENTITY
            while len(free) < SPREAD and candidate <= MAX_LABEL_IDENTITY:
                if candidate not in self._used_ids:
                    free.append(candidate)
                candidate += 1
        if not free:
            raise Aborted(f"no label identity left between {FIRST_LABEL_IDENTITY} and {MAX_LABEL_IDENTITY}")
        return random.choice(free)

    def _publish_identity(self, key: str, identity: int) -> None:
        try:
            if self._kv.create({LABELS + key: str(identity).encode(), IDS + str(identity): key.encode()}):
                self._remember(key, identity)
                return
            theirs = self._kv.get(LABELS + key)
            owner = self._kv.get(IDS + str(identity))
        except KvStoreUnavailable as exc:
            log.warning("identity not published (kvstore unavailable)", labels=key, identity=identity, error=str(exc))
            return
        if theirs is not None and int(theirs) == identity:
            self._remember(key, identity)
            return
        conflict = f"labels {key!r} are {identity} on this node but " + (
            f"{int(theirs)} in the cluster" if theirs is not None else f"{identity} is {owner!r} in the cluster"
        )
        self._conflicts.append(conflict)
        log.warning("identity conflict with the cluster", conflict=conflict)

    # ---- publishing this node's endpoints ----

    def endpoint_changed(self, kind: str, endpoint: Endpoint) -> None:
        """An endpoint listener: queue this node's ipcache keys for the session thread."""
        with self._lock:
            for network in endpoint.networks():
                key = ipcache_key(self.name, network)
                if kind == "DELETED":
                    self._own.pop(key, None)
                    self._pending[key] = None
                else:
                    value = {"identity": endpoint.identity, "node": self.name, "endpoint": endpoint.name}
                    self._own[key] = self._pending[key] = json.dumps(value, sort_keys=True).encode()
        self._wake.set()

    def _session_loop(self) -> None:
        """Keep the lease, the node key and this node's ipcache keys in etcd."""
        next_keepalive = 0.0
        gc_every = min(MAX_GC_SCAN_SECONDS, max(1.0, self._identity_gc / 2))
        next_gc = time.monotonic() + gc_every
        while not self._stop.is_set():
            try:
                if self._lease == 0:
                    lease = self._kv.grant(self._ttl)
                    self._kv.put(NODES + self.name, self._local.to_json(), lease)
                    with self._lock:
                        self._lease, self._lease_left, self._resync = lease, self._ttl, True
                    log.info("registered in the cluster", node=self.name, lease=lease, ttl=self._ttl)
                    next_keepalive = time.monotonic() + self._ttl / 3
                if self._node_dirty:
                    with self._lock:
                        record, self._node_dirty = self._local, False
                    try:
                        self._kv.put(NODES + self.name, record.to_json(), self._lease)
                    except KvStoreUnavailable:
                        self._node_dirty = True
                        raise
                if self._resync:
                    self._full_sync()
                self._drain()
                if time.monotonic() >= next_keepalive:
                    left = self._kv.keepalive(self._lease)
                    if left <= 0:
                        log.warning("kvstore lease expired; registering again", node=self.name, lease=self._lease)
                        with self._lock:
                            self._lease = 0
                        continue
                    next_keepalive = time.monotonic() + self._ttl / 3
                    self._lease_left = left
                    if self._lease_left and not self._connected:
                        log.info("kvstore reachable again", node=self.name)
                self._connected = True
                if self._identity_gc > 0 and time.monotonic() >= next_gc:
                    self._collect_identities()
                    next_gc = time.monotonic() + gc_every
            except KvStoreUnavailable as exc:
                if self._connected:
                    log.warning("kvstore unreachable; local changes are kept until it returns", error=str(exc))
                self._connected = False
                self._last_error = str(exc)
                self._stop.wait(RETRY_SECONDS)
                continue
            wake_at = min(next_keepalive, next_gc) if self._identity_gc > 0 else next_keepalive
            self._wake.wait(max(0.0, wake_at - time.monotonic()))
            self._wake.clear()

    def _full_sync(self) -> None:
        """Make etcd hold exactly this node's keys (after a new lease or an outage)."""
        with self._lock:
            own, self._pending = dict(self._own), {}
        try:
            entries, _ = self._kv.get_prefix(f"{IPCACHE}{self.name}/")
            for entry in entries:
                if entry.key not in own:
                    self._kv.delete(entry.key)
            for key, value in own.items():
                self._kv.put(key, value, self._lease)
            self._touch_identities(own.values())
        except KvStoreUnavailable:
            self._resync = True
            raise
        self._resync = False

    def _drain(self) -> None:
        with self._lock:
            ops, self._pending = self._pending, {}
        done: set[str] = set()
        try:
            for key, value in ops.items():
                if value is None:
                    self._kv.delete(key)
                else:
                    self._kv.put(key, value, self._lease)
                done.add(key)
            self._touch_identities(v for v in ops.values() if v is not None)
        finally:
            with self._lock:
                for key, value in ops.items():
                    if key not in done and key not in self._pending:
                        self._pending[key] = value

    # ---- following the others ----

    def _watch_loop(self) -> None:
        """List everything, then watch from that revision; on a broken stream, list again."""
        while not self._stop.is_set():
            cancel: Callable[[], None] | None = None
            try:
                entries, revision = self._kv.get_prefix(PREFIX)
                self._apply_snapshot(entries)
                events: queue.Queue[list[WatchEvent] | KvStoreUnavailable] = queue.Queue()
                cancel = self._kv.watch_prefix(PREFIX, revision + 1, events.put)
                self._watching = True
                while not self._stop.is_set():
                    try:
                        item = events.get(timeout=0.5)
                    except queue.Empty:
                        continue
                    if isinstance(item, KvStoreUnavailable):
                        raise item
                    self._apply_events(item)
            except KvStoreUnavailable as exc:
                self._last_error = str(exc)
                self._stop.wait(RETRY_SECONDS)
            finally:
                self._watching = False
                if cancel is not None:
                    cancel()

    def _apply_snapshot(self, entries: list[Entry]) -> None:
        fresh = _Known()
        for entry in entries:
            self._read_into(fresh, entry.key, entry.value)
        with self._lock:
            old = self._known
            fresh.labels = {**old.labels, **fresh.labels}
            self._known = fresh
            self._used_ids |= set(fresh.labels.values())
        self._deliver(old, fresh)

    def _apply_events(self, events: list[WatchEvent]) -> None:
        with self._lock:
            old = self._known
            new = _Known(dict(old.nodes), dict(old.remote), dict(old.labels))
        for event in events:
            if event.value is not None:
                self._read_into(new, event.key, event.value)
            elif event.key.startswith(NODES):
                name = event.key.removeprefix(NODES)
                new.nodes.pop(name, None)
                new.remote = {k: e for k, e in new.remote.items() if e.node != name}
            elif event.key.startswith(IPCACHE):
                new.remote.pop(event.key, None)
            elif event.key.startswith(LABELS):
                new.labels.pop(event.key.removeprefix(LABELS), None)
        with self._lock:
            self._known = new
            self._used_ids |= set(new.labels.values())
        self._deliver(old, new)

    def _read_into(self, known: _Known, key: str, value: bytes) -> None:
        """One key's value into `known`; a value that does not parse is logged and skipped."""
        try:
            if key.startswith(NODES):
                record = NodeRecord.from_json(value)
                if record.name != self.name:
                    known.nodes[record.name] = record
            elif key.startswith(LABELS):
                known.labels[key.removeprefix(LABELS)] = int(value)
            elif key.startswith(IPCACHE):
                parsed = parse_ipcache_key(key)
                if parsed is None or parsed[0] == self.name:
                    return
                doc = json.loads(value)
                known.remote[key] = RemoteEntry(
                    parsed[1], int(doc["identity"]), parsed[0], str(doc.get("endpoint", ""))
                )
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable key in the kvstore skipped", key=key, error=repr(exc))

    def _deliver(self, old: _Known, new: _Known) -> None:
        """Tell this node (sink, node listeners) what changed between two views."""
        learned = [(k, i) for k, i in new.labels.items() if old.labels.get(k) != i]
        if learned:
            with self._lock:
                self._numbered.update((i, k) for k, i in learned)
            self._sink.learn_identity(learned)
        forgotten = [(k, i) for k, i in old.labels.items() if k not in new.labels]
        if forgotten:
            log.info("identities collected in the cluster", identities=[i for _, i in forgotten])
            self._sink.forget_identity(forgotten)
        gone = [e.network for k, e in old.remote.items() if k not in new.remote]
        still = {e.network for e in new.remote.values()}
        gone = [n for n in gone if n not in still]
        if gone:
            self._sink.remote_down(gone)
        up = [e for k, e in new.remote.items() if old.remote.get(k) != e]
        if up:
            self._sink.remote_up(up)
        for name, record in new.nodes.items():
            if old.nodes.get(name) != record:
                log.info("node seen in the cluster", node=name)
                for upsert, _ in self._node_listeners:
                    upsert(record)
        for name in old.nodes.keys() - new.nodes.keys():
            log.info("node left the cluster (lease expired or removed)", node=name)
            for _, delete in self._node_listeners:
                delete(name)

    # ---- identity garbage collection ----

    def _touch_identities(self, values: Iterable[bytes]) -> None:
        """Rewrite the keys of the identities just published (after their ipcache keys): a
        collection that read them before fails on the new revision, or the keys come back."""
        numbers = {int(json.loads(v)["identity"]) for v in values}
        with self._lock:
            by_number = dict(self._numbered)
        for number in numbers:
            key = by_number.get(number)
            if key is None:
                continue
            pairs = {LABELS + key: str(number).encode(), IDS + str(number): key.encode()}
            if not self._kv.put_if_value(IDS + str(number), key.encode(), pairs) and not self._kv.create(pairs):
                theirs = self._kv.get(LABELS + key)
                if theirs is None or int(theirs) != number:
                    conflict = f"labels {key!r} are {number} on this node but the cluster reassigned them"
                    self._conflicts.append(conflict)
                    log.warning("identity conflict with the cluster", conflict=conflict)

    def _collect_identities(self) -> None:
        """Delete identity keys no endpoint of any node has used for the whole grace period."""
        identity_entries, _ = self._kv.get_prefix(f"{PREFIX}identities/")
        ipcache_entries, _ = self._kv.get_prefix(IPCACHE)
        used: set[int] = set()
        for entry in ipcache_entries:
            try:
                used.add(int(json.loads(entry.value)["identity"]))
            except (ValueError, KeyError, TypeError):
                continue
        with self._lock:
            used |= {int(json.loads(v)["identity"]) for v in self._own.values()}
        labels = {e.key.removeprefix(LABELS): e for e in identity_entries if e.key.startswith(LABELS)}
        now = time.monotonic()
        unused: dict[int, tuple[float, int]] = {}
        for entry in identity_entries:
            if not entry.key.startswith(IDS):
                continue
            try:
                number = int(entry.key.removeprefix(IDS))
            except ValueError:
                continue
            if number in used:
                continue
            since, revision = self._unused.get(number, (now, entry.mod_revision))
            if revision != entry.mod_revision:
                since, revision = now, entry.mod_revision
            if now - since < self._identity_gc:
                unused[number] = (since, revision)
                continue
            key = entry.value.decode()
            revisions = {entry.key: entry.mod_revision}
            label = labels.get(key)
            if label is not None and label.value == str(number).encode():
                revisions[label.key] = label.mod_revision
            if self._kv.delete_unchanged(revisions):
                self.identities_collected += 1
                log.info("identity released: no endpoint used it for the grace period", labels=key, identity=number)
        self._unused = unused

    # ---- status ----

    def status(self) -> ClusterStatus:
        with self._lock:
            nodes = (self._local, *sorted(self._known.nodes.values(), key=lambda r: r.name))
            return ClusterStatus(
                node_name=self.name,
                endpoints=self._kv.config.endpoints,
                connected=self._connected and self._watching,
                lease_id=self._lease,
                lease_ttl=self._lease_left,
                last_error=self._last_error,
                nodes=nodes,
                pending=len(self._pending) + (len(self._own) if self._resync else 0),
                remote_prefixes=len(self._known.remote),
                conflicts=tuple(self._conflicts),
            )


class IdentitiesSink:
    """Applies what the cluster says to `Identities` on the orchestrator's worker thread."""

    def __init__(self, worker: Worker, identities: Identities) -> None:
        self._worker = worker
        self._identities = identities

    def learn_identity(self, pairs: list[tuple[str, int]]) -> None:
        def learn() -> None:
            for key, identity in pairs:
                if not self._identities.learn(key, identity):
                    log.warning("cluster identity clashes with this node's", labels=key, identity=identity)

        self._worker.run(learn)

    def remote_up(self, entries: list[RemoteEntry]) -> None:
        def up() -> None:
            by_identity: dict[int, list[Network]] = {}
            for entry in entries:
                by_identity.setdefault(entry.identity, []).append(entry.network)
            for identity, networks in by_identity.items():
                self._identities.remote_up(identity, networks)

        self._worker.run(up)

    def remote_down(self, networks: list[Network]) -> None:
        self._worker.run(self._identities.remote_down, networks)

    def forget_identity(self, pairs: list[tuple[str, int]]) -> None:
        def forget() -> None:
            for key, identity in pairs:
                self._identities.forget(key, identity)

        self._worker.run(forget)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The orchestrator's cluster-mode flags (none of them set: a standalone node)."""
    group = parser.add_argument_group("cluster mode (etcd)")
    group.add_argument(
        "--kvstore",
        default="",
        help="comma-separated etcd endpoints, e.g. http://10.0.0.1:2379; unset: standalone (SQLite only)",
    )
    group.add_argument("--kvstore-ca", type=Path, default=None, help="CA that signed etcd's certificate (TLS)")
    group.add_argument("--kvstore-cert", type=Path, default=None, help="client certificate for etcd (mutual TLS)")
    group.add_argument("--kvstore-key", type=Path, default=None, help="key of --kvstore-cert")
    group.add_argument(
        "--kvstore-lease-seconds",
        type=int,
        default=DEFAULT_LEASE_SECONDS,
        help=f"TTL of this node's lease: the grace period before other nodes drop a silent node "
        f"(default {DEFAULT_LEASE_SECONDS})",
    )
    group.add_argument(
        "--kvstore-identity-gc-seconds",
        type=float,
        default=DEFAULT_IDENTITY_GC_SECONDS,
        help=f"how long an identity no endpoint of any node uses stays in etcd before it is released "
        f"(default {DEFAULT_IDENTITY_GC_SECONDS:g}; 0: never)",
    )
    group.add_argument(
        "--kvstore-connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_SECONDS,
        help=f"how long start-up waits for etcd before exiting (default {DEFAULT_CONNECT_SECONDS:g})",
    )
    group.add_argument("--node-name", default="", help="this node's name in the cluster (default: the instance name)")


def config_from_args(args: argparse.Namespace) -> KvStoreConfig | None:
    """The kvstore to use, or None for a standalone node."""
    if not args.kvstore:
        return None
    return KvStoreConfig.parse(args.kvstore, args.kvstore_ca, args.kvstore_cert, args.kvstore_key)


def connect_or_exit(args: argparse.Namespace, role: str) -> KvStore | None:
    """For the orchestrator's main: the kvstore, reachable, or one clear line and exit status 1.

    An operator who asked for cluster mode gets no half-started node: like Cilium's agent,
    start-up waits up to --kvstore-connect-timeout for etcd, then gives up and says why.
    """
    try:
        config = config_from_args(args)
        if config is None:
            return None
        kv = KvStore(config)
        try:
            Cluster.wait_reachable(kv, args.kvstore_connect_timeout)
        except KvStoreUnavailable:
            kv.close()
            raise
        return kv
    except (InvalidArgument, KvStoreUnavailable) as exc:
        print(f"weir-{role}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
