"""Security identities of the node, and what the ipcache says about each address.

The orchestrator allocates every identity, as Cilium's agent does: a label identity when
an endpoint is created (the same label set always gets the same number; they are kept in
the store, so a restart changes nothing), CIDR identities when a service asks for the
CIDRs its rules name (held per owner, freed when no owner holds them), and the reserved
host and world identities. Numbers follow the datapath contract: labels from
FIRST_LABEL_IDENTITY, CIDRs from FIRST_CIDR_IDENTITY.

The ipcache follows from five sources, in this order of precedence for one prefix: an
endpoint's address, a host address, a remote node's underlay address (the reserved
remote-node identity, as Cilium's node manager puts node IPs in its ipcache), another
node's endpoint (cluster mode), a published CIDR. In cluster mode label identities are
allocated through the cluster (`use_cluster`), so the same labels get the same number on
every node. A CIDR can be reserved before it is published, so its holder installs maps
that know the new number before any address maps to it. Every change is reported to
listeners (the watch streams) as identities upserted and deleted.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from services.common.change import Change
from services.common.collector import collector_paused
from services.common.datapath import FIRST_CIDR_IDENTITY, FIRST_LABEL_IDENTITY, ReservedIdentity
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.ipv4 import parse_ipv4_network
from services.common.store import Store
from services.common.validate import Network
from services.orchestrator.ipcache import Ipcache
from services.orchestrator.limits import summary

KIND = "identity"
CIDR_PREFIX = "cidr:"
MAX_LABEL_IDENTITY = FIRST_CIDR_IDENTITY - 1
MAX_CIDR_IDENTITY = (1 << 32) - 1
MAX_CIDRS_PER_CALL = 100_000
OWNER_RE = re.compile(r"^[a-z0-9][-a-z0-9.]{0,62}$")
RESERVED = {
    int(ReservedIdentity.HOST): "reserved:host",
    int(ReservedIdentity.WORLD): "reserved:world",
    int(ReservedIdentity.REMOTE_NODE): "reserved:remote-node",
}


def label_key(labels: dict[str, str]) -> str:
    """Canonical text of a label set: sorted k=v, comma-separated."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def cidr_key(network: Network) -> str:
    return f"{CIDR_PREFIX}{network}"


@dataclass(frozen=True)
class IdentityInfo:
    """An identity as the API shows it: what it stands for and where the ipcache uses it."""

    id: int
    labels: tuple[str, ...]
    prefixes: tuple[str, ...]
    owners: tuple[str, ...]


@dataclass(frozen=True)
class CidrIdentities:
    """CIDR identities in parallel lists (item i of each is one identity): a bulk allocation
    changes thousands, and an `IdentityInfo` each costs more than the allocation."""

    ids: list[int] = field(default_factory=list)
    cidrs: list[str] = field(default_factory=list)  # its one label is "cidr:" + this
    published: list[bool] = field(default_factory=list)  # its one prefix is its CIDR; else it has none
    owners: list[tuple[str, ...]] = field(default_factory=list)  # sorted

    def infos(self) -> list[IdentityInfo]:
        return [
            IdentityInfo(i, (f"{CIDR_PREFIX}{cidr}",), (cidr,) if published else (), owners)
            for i, cidr, published, owners in zip(self.ids, self.cidrs, self.published, self.owners, strict=True)
        ]


@dataclass(frozen=True)
class IdentityChange:
    """Identities one change upserted (CIDR identities apart, in `cidrs`) and deleted."""

    upserted: list[IdentityInfo]
    cidrs: CidrIdentities
    deleted: list[int]

    def infos(self) -> list[IdentityInfo]:
        """Every upserted identity as an `IdentityInfo`, by number."""
        return sorted([*self.upserted, *self.cidrs.infos()], key=lambda info: info.id)


Listener = Callable[[IdentityChange], None]


@dataclass
class _State:
    """The in-memory state a failed change puts back."""

    by_key: dict[str, int]
    owners: dict[str, frozenset[str]]
    published: dict[Network, int]


@functools.lru_cache(maxsize=64)
def _owner_forms(owners: frozenset[str]) -> tuple[tuple[str, ...], str]:
    """The holders of a CIDR identity sorted, and as stored (a JSON list): a few distinct sets
    (usually one owner) shared by thousands of CIDRs. Owner names match OWNER_RE: no escaping."""
    ordered = tuple(sorted(owners))
    return ordered, json.dumps(list(ordered), separators=(",", ":"))


@collector_paused()  # thousands of new objects would set off full collections of the whole heap
def parse_cidrs(texts: Sequence[str]) -> list[Network]:
    """CIDRs of a request, counted before any is parsed; a scoped IPv6 address is refused."""
    if len(texts) > MAX_CIDRS_PER_CALL:
        raise InvalidArgument(f"{len(texts)} CIDRs in one call; at most {MAX_CIDRS_PER_CALL}")
    out: list[Network] = []
    for text in texts:
        network = parse_ipv4_network(text)  # the common case, without ipaddress's parser
        if network is not None:
            out.append(network)
            continue
        if "%" in text:
            raise InvalidArgument(f"CIDR {summary(text)} has a scope (%zone); a CIDR has none")
        try:
            out.append(ipaddress.ip_network(text))
        except ValueError:
            raise InvalidArgument(f"CIDR {summary(text)} is invalid: write an address or address/length "
                                  "without host bits") from None  # fmt: skip
    return out


class Identities:
    """Allocates identities and keeps the ipcache in line with endpoints, hosts and CIDRs."""

    def __init__(self, store: Store, ipcache: Ipcache) -> None:
        self._store = store
        self._ipcache = ipcache
        self._by_key: dict[str, int] = {}
        self._owners: dict[str, frozenset[str]] = {}
        self._published: dict[Network, int] = {}
        for key, doc in store.items(KIND):
            self._by_key[key] = int(doc["id"])
            if key.startswith(CIDR_PREFIX):
                self._owners[key] = frozenset(doc.get("owners", []))
                if doc.get("published"):
                    self._published[ipaddress.ip_network(key.removeprefix(CIDR_PREFIX))] = int(doc["id"])
        self._endpoints: dict[Network, int] = {}
        self._hosts: set[Network] = set()
        self._nodes: set[Network] = set()
        self._remote: dict[Network, int] = {}
        self._cluster_allocate: Callable[[str], int] | None = None
        self._listeners: list[Listener] = []

    def on_change(self, listener: Listener) -> None:
        """Call listener(upserted, deleted ids) after every change (on the caller's thread)."""
        self._listeners.append(listener)

    # ---- queries ----

    def _text(self) -> dict[int, str]:
        out = dict(RESERVED)
        out.update({i: key for key, i in self._by_key.items()})
        return out

    def info(self, identity: int, text: str) -> IdentityInfo:
        labels = tuple(text.split(",")) if text else ()
        owners = _owner_forms(self._owners.get(text, frozenset()))[0]
        return IdentityInfo(identity, labels, tuple(self._ipcache.prefixes_of(identity)), owners)

    def all(self) -> list[IdentityInfo]:
        return [self.info(i, text) for i, text in sorted(self._text().items())]

    def snapshot(self) -> IdentityChange:
        """Every identity, as a change that upserts them all."""
        return self._change(self._text(), [])

    def _change(self, texts: dict[int, str], deleted: list[int]) -> IdentityChange:
        """The change that upserts the identities `texts` names (number -> text) and deletes `deleted`."""
        upserted: list[IdentityInfo] = []
        cidrs = CidrIdentities()
        for identity, text in sorted(texts.items()):
            if text.startswith(CIDR_PREFIX):
                cidr = text[len(CIDR_PREFIX) :]
                networks = self._ipcache.networks_of(identity)
                if not networks or (len(networks) == 1 and str(next(iter(networks))) == cidr):
                    cidrs.ids.append(identity)
                    cidrs.cidrs.append(cidr)
                    cidrs.published.append(bool(networks))
                    cidrs.owners.append(_owner_forms(self._owners.get(text, frozenset()))[0])
                    continue
            upserted.append(self.info(identity, text))
        return IdentityChange(upserted, cidrs, deleted)

    def for_labels(self, labels: dict[str, str]) -> int:
        """The identity of a label set, allocated (and stored) the first time it is seen."""
        key = label_key(labels)
        if key in self._by_key:
            return self._by_key[key]
        if self._cluster_allocate is not None:
            identity = self._cluster_allocate(key)
            if identity in self._text():
                raise FailedPrecondition(f"the cluster gave labels {summary(key)} identity {identity}, which is "
                               f"{summary(self._text()[identity])} on this node")  # fmt: skip
        else:
            identity = self._allocator(FIRST_LABEL_IDENTITY, MAX_LABEL_IDENTITY)()
        self._store.put(KIND, key, {"id": identity})
        self._by_key[key] = identity
        self._notify([identity], [])
        return identity

    # ---- cluster mode ----

    def use_cluster(self, allocate: Callable[[str], int]) -> None:
        """New label identities come from `allocate(label key)` (the cluster), not from this node."""
        self._cluster_allocate = allocate

    def label_identities(self) -> dict[str, int]:
        """Label key -> identity, as allocated on (or learned by) this node."""
        return {k: i for k, i in self._by_key.items() if not k.startswith(CIDR_PREFIX)}

    def learn(self, key: str, identity: int) -> bool:
        """A label identity another node allocated; False if it clashes with one of this node's."""
        if self._by_key.get(key) == identity:
            return True
        if key in self._by_key or identity in self._text() or key.startswith(CIDR_PREFIX):
            return False
        self._store.put(KIND, key, {"id": identity})
        self._by_key[key] = identity
        self._notify([identity], [])
        return True

    def forget(self, key: str, identity: int) -> bool:
        """A label identity the cluster released: dropped unless an endpoint of this node uses it."""
        if self._by_key.get(key) != identity or identity in self._endpoints.values():
            return False
        self._store.delete(KIND, key)
        del self._by_key[key]
        self._notify([], [identity])
        return True

    def remote_up(self, identity: int, addresses: Iterable[Network]) -> None:
        """Addresses of another node's endpoint map to its identity (unless this node claims them)."""
        networks = list(addresses)
        touched = self._touched(networks)
        for network in networks:
            self._remote[network] = identity
        self._refresh(networks, touched)

    def remote_down(self, addresses: Iterable[Network]) -> None:
        networks = list(addresses)
        touched = self._touched(networks)
        for network in networks:
            self._remote.pop(network, None)
        self._refresh(networks, touched)

    def remote(self) -> dict[Network, int]:
        return dict(self._remote)

    # ---- the ipcache's sources ----

    def endpoint_up(self, identity: int, addresses: Iterable[Network]) -> None:
        """An endpoint's addresses map to its identity."""
        networks = list(addresses)
        touched = self._touched(networks)
        for network in networks:
            self._endpoints[network] = identity
        self._refresh(networks, touched)

    def endpoint_down(self, addresses: Iterable[Network]) -> None:
        networks = list(addresses)
        touched = self._touched(networks)
        for network in networks:
            self._endpoints.pop(network, None)
        self._refresh(networks, touched)

    def set_hosts(self, addresses: Iterable[Network]) -> bool:
        """The node's own addresses map to the host identity; True if they changed."""
        wanted = set(addresses)
        if wanted == self._hosts:
            return False
        networks = list(wanted ^ self._hosts)
        touched = self._touched(networks)
        self._hosts = wanted
        self._refresh(networks, touched)
        return True

    def set_remote_nodes(self, addresses: Iterable[Network]) -> bool:
        """Remote nodes' underlay addresses map to remote-node; True if they changed."""
        wanted = set(addresses)
        if wanted == self._nodes:
            return False
        networks = list(wanted ^ self._nodes)
        touched = self._touched(networks)
        self._nodes = wanted
        self._refresh(networks, touched)
        return True

    def sync_ipcache(self) -> None:
        """After a start: the pinned ipcache holds exactly what the sources say."""
        wanted = {n: i for n in self._all_networks() if (i := self._wanted(n)) is not None}
        self._ipcache.reconcile(wanted)

    # ---- CIDR identities ----

    def allocate_cidrs(self, owner: str, networks: list[Network], reserve_only: bool = False) -> list[IdentityInfo]:
        """Identities for `networks`, held by `owner` (idempotent); published unless reserve_only."""
        self.allocate_cidr_ids(owner, networks, reserve_only)
        keys = dict.fromkeys(map(cidr_key, networks))
        return [self.info(self._by_key[key], key) for key in keys]

    @collector_paused()
    def allocate_cidr_ids(self, owner: str, networks: list[Network], reserve_only: bool = False) -> list[int]:
        """`allocate_cidrs`, answering only the identity of each network (in order): a bulk
        caller knows its CIDRs, and thousands of `IdentityInfo`s cost more than the allocation."""
        self._check_owner(owner)
        keys = {n: cidr_key(n) for n in networks}
        before = self._save()
        touched = self._touched(keys)
        new: list[int] = []
        published: list[Network] = []
        next_free = self._allocator(FIRST_CIDR_IDENTITY, MAX_CIDR_IDENTITY)
        with Change(self._store) as change:
            change.on_failure(lambda: self._restore(before, published, touched))
            docs = []
            for network, key in keys.items():
                if key not in self._by_key:
                    self._by_key[key] = next_free()
                    new.append(self._by_key[key])
                owners = self._owners.get(key, frozenset())
                publish = not reserve_only and network not in self._published
                if owner in owners and not publish and key in before.by_key:
                    continue  # nothing changes for this one
                self._owners[key] = owners | {owner}
                if publish:
                    self._published[network] = self._by_key[key]
                    published.append(network)
                docs.append((key, self._doc(network, key)))
            self._store.put_many_text(KIND, docs)
            self._refresh(published, touched, notify=False)
        self._notify([*new, *touched, *(self._by_key[keys[n]] for n in published)], [])
        return [self._by_key[keys[n]] for n in networks]

    @collector_paused()
    def release_cidrs(self, owner: str, networks: list[Network]) -> None:
        """Drop owner's hold; a CIDR nobody holds leaves the ipcache and frees its identity."""
        self._check_owner(owner)
        keys = {n: cidr_key(n) for n in networks}
        before = self._save()
        touched = self._touched(keys)
        freed: list[int] = []
        unpublished: list[Network] = []
        with Change(self._store) as change:
            change.on_failure(lambda: self._restore(before, unpublished, touched))
            docs, gone = [], []
            for network, key in keys.items():
                if owner not in self._owners.get(key, frozenset()):
                    continue
                self._owners[key] -= {owner}
                if self._owners[key]:
                    docs.append((key, self._doc(network, key)))
                    continue
                del self._owners[key]
                if self._published.pop(network, None) is not None:
                    unpublished.append(network)
                freed.append(self._by_key.pop(key))
                gone.append(key)
            self._store.put_many_text(KIND, docs)
            self._store.delete_many(KIND, gone)
            self._refresh(unpublished, touched, notify=False)
        gone_ids = set(freed)
        self._notify([i for i in touched if i not in gone_ids], freed)

    # ---- helpers ----

    @staticmethod
    def _check_owner(owner: str) -> None:
        if not OWNER_RE.fullmatch(owner):
            raise InvalidArgument(f"owner {summary(owner)} is invalid: use lowercase letters, digits, '-' and '.'")

    def _doc(self, network: Network, key: str) -> str:
        """The stored document of a CIDR identity, as JSON text (written for thousands of CIDRs at once)."""
        published = "true" if network in self._published else "false"
        return f'{{"id":{self._by_key[key]},"owners":{_owner_forms(self._owners[key])[1]},"published":{published}}}'

    def _allocator(self, first: int, last: int) -> Callable[[], int]:
        """Hands out the lowest free numbers of [first, last], one call each (one scan for many)."""
        used = set(self._by_key.values())
        candidate = first

        def next_free() -> int:
            nonlocal candidate
            while candidate in used and candidate <= last:
                candidate += 1
            if candidate > last:
                raise ResourceExhausted(f"no identity left between {first} and {last}")
            used.add(candidate)
            return candidate

        return next_free

    def _wanted(self, network: Network) -> int | None:
        if network in self._endpoints:
            return self._endpoints[network]
        if network in self._hosts:
            return int(ReservedIdentity.HOST)
        if network in self._nodes:
            return int(ReservedIdentity.REMOTE_NODE)
        if network in self._remote:
            return self._remote[network]
        return self._published.get(network)

    def _all_networks(self) -> set[Network]:
        return set(self._endpoints) | self._hosts | self._nodes | set(self._remote) | set(self._published)

    def _touched(self, networks: Iterable[Network]) -> set[int]:
        """Identities the ipcache gives these networks now (their prefixes are about to change)."""
        return {i for n in networks if (i := self._ipcache.get(n)) is not None}

    def _refresh(self, networks: Iterable[Network], touched: set[int], notify: bool = True) -> None:
        """Write the ipcache entries of these networks from the sources (adds before removals)."""
        changed = set(touched)
        removals = []
        puts = []
        for network in networks:
            wanted = self._wanted(network)
            if wanted is None:
                removals.append(network)
            else:
                puts.append((network, wanted))
                changed.add(wanted)
        self._ipcache.put_many(puts)  # one batch: thousands of CIDRs cost a few syscalls
        for network in removals:
            self._ipcache.delete(network)
        if notify:
            self._notify(sorted(changed), [])

    def _save(self) -> _State:
        return _State(dict(self._by_key), dict(self._owners), dict(self._published))

    def _restore(self, state: _State, networks: list[Network], touched: set[int]) -> None:
        self._by_key, self._owners, self._published = state.by_key, state.owners, state.published
        self._refresh(networks, touched, notify=False)

    def _notify(self, upserted: Iterable[int], deleted: list[int]) -> None:
        ids = set(upserted) - set(deleted)
        if not ids and not deleted:
            return
        text = self._text()
        change = self._change({i: text[i] for i in ids if i in text}, deleted)
        for listener in self._listeners:
            listener(change)
