"""Endpoint policy: rules in, identities, ipcache and per-endpoint maps out.

`Policy` is the plain class behind the gRPC layer. It keeps the rules (and
audit settings) in the state store, learns endpoints from the orchestrator
through an injected function, computes every endpoint's policy with
`PolicyComputer` and writes only the endpoints whose maps change. A change is
computed completely (validation, map capacity) before anything is written.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog
from weir.policy.v1 import policy_pb2 as pb

from services.common.datapath import Direction
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.store import Store
from services.policy import rules as rules_mod
from services.policy.compute import (
    ICMP,
    ICMPV6,
    PROTOCOL_NAMES,
    TCP,
    UDP,
    EndpointPolicy,
    EndpointView,
    MapEntry,
    PolicyComputer,
    lpm_identity,
)
from services.policy.identities import Identities
from services.policy.maps import ConntrackEntry, Hits, PolicyMaps, config_flags
from services.policy.rules import Rule
from services.prefilter.cidr import Network

log = structlog.get_logger("weir.policy")

START_WAIT_SECONDS = 30.0
RULE = "rule"
AUDIT = "audit"
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 10_000

Fetched = tuple[str, int, str, str, dict[str, str]]  # name, id, ipv4, ipv6, labels
FetchEndpoints = Callable[[], list[Fetched]]
HostAddresses = Callable[[], list[Network]]


@dataclass(frozen=True)
class TraceResult:
    allowed: bool
    verdict: str
    source_identity: int
    destination_identity: int
    steps: list[str]
    rules: list[str]


class Policy:
    """Rules, identities and the policy maps of one node."""

    def __init__(
        self, maps: PolicyMaps, store: Store, fetch_endpoints: FetchEndpoints, host_addresses: HostAddresses
    ) -> None:
        self._maps = maps
        self._store = store
        self._fetch = fetch_endpoints
        self._host_addresses = host_addresses
        self._identities = Identities(store)
        self._rules: dict[str, Rule] = {}
        self._endpoints: list[EndpointView] = []
        self._hosts: list[Network] = []
        self._computed: dict[int, EndpointPolicy] = {}
        self._ipcache: dict[Network, int] = {}  # as last written to the map
        self._written_ipcache = False  # until the first write, the map holds what a previous run left
        self._seen: tuple[object, ...] = ()
        self._installed: dict[int, tuple[frozenset[tuple[MapEntry, bool]], int]] = {}

    # ---- life cycle ----

    def start(self, wait_for_endpoints: float = START_WAIT_SECONDS) -> None:
        """Load, then rebuild every endpoint's map from the persisted rules.

        Waits (up to `wait_for_endpoints` seconds) for the orchestrator to answer:
        without its endpoint list the maps cannot be rebuilt, and guessing "no
        endpoints" would throw every endpoint's policy away. The pinned maps keep
        enforcing meanwhile.
        """
        self._maps.load()
        self._rules = {name: rules_mod.from_stored(doc) for name, doc in self._store.items(RULE)}
        deadline = time.monotonic() + wait_for_endpoints
        while True:
            try:
                self.refresh(force=True)
                return
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                log.info("waiting for the orchestrator")
                time.sleep(0.5)

    def close(self) -> None:
        self._maps.close()

    def refresh(self, force: bool = False) -> list[str]:
        """Re-read endpoints and host addresses; if they changed, rewrite what that changes.

        Returns the endpoints whose maps were rewritten. Cheap when nothing changed,
        so it can run every second whatever the number of rules.
        """
        fetched = self._fetch()
        hosts = self._host_addresses()
        seen = (tuple((n, i, a, b, tuple(sorted(lab.items()))) for n, i, a, b, lab in fetched), tuple(hosts))
        if seen == self._seen and not force:
            return []
        self._endpoints = self._endpoint_views(fetched)
        self._hosts = hosts
        changed = self._apply(self._rules, force)
        self._seen = seen
        return changed

    def _endpoint_views(self, fetched: list[Fetched] | None = None) -> list[EndpointView]:
        return [
            EndpointView(name, ep_id, v4, v6, labels, self._identities.for_labels(labels))
            for name, ep_id, v4, v6, labels in (self._fetch() if fetched is None else fetched)
        ]

    def _cidr_identities(self, rules: Iterable[Rule]) -> dict[Network, int]:
        return {n: self._identities.for_cidr(n) for rule in rules for n in rule.cidrs()}

    def _computer(self, rules: Iterable[Rule], cidrs: dict[Network, int]) -> PolicyComputer:
        return PolicyComputer(rules, self._endpoints, cidrs, self._hosts, self._maps.capacity)

    def _apply(self, rules: dict[str, Rule], force: bool = False, changed_rules: Iterable[Rule] = ()) -> list[str]:
        """Compute, then write: maps first (with old and new CIDR identities), ipcache, final maps.

        With `changed_rules` (and the same CIDR identities as before), only the
        endpoints those rules select are recomputed: nothing else can change.
        """
        old_cidrs = {n: i for n, i in self._cidr_identities(self._rules.values()).items()}
        try:
            new_cidrs = self._cidr_identities(rules.values())
            computer = self._computer(rules.values(), new_cidrs)
            affected = self._affected(list(changed_rules)) if new_cidrs.keys() == old_cidrs.keys() else None
            if affected is None or force:
                final = computer.all()
            else:
                final = {**self._computed, **{ep.id: computer.endpoint(ep) for ep in affected}}
        except Exception:
            self._identities.release_cidrs(set(old_cidrs))
            raise
        changed: set[str] = set()
        removed_cidrs = old_cidrs.keys() - new_cidrs.keys()
        if removed_cidrs and not force:
            transition = self._computer(rules.values(), {**old_cidrs, **new_cidrs}).all()
            changed |= self._install(transition, force)
        changed |= self._install(final, force)
        ipcache = computer.ipcache()
        self._maps.write_ipcache(ipcache, self._ipcache if self._written_ipcache else None)
        self._ipcache, self._written_ipcache = ipcache, True
        self._identities.release_cidrs(set(new_cidrs))
        self._identities.flush()
        for stale in self._maps.endpoint_ids() - set(final):
            self._maps.remove(stale)
            self._installed.pop(stale, None)
        self._computed = final
        return sorted(changed)

    def _affected(self, changed_rules: list[Rule]) -> list[EndpointView] | None:
        """Endpoints a change of these rules (in their old or new version) can touch; None: all."""
        def view(ep: EndpointView) -> tuple[object, ...]:
            return (ep.id, ep.name, ep.identity, ep.ipv4, ep.ipv6, tuple(sorted(ep.labels.items())))

        computed_for = {view(p.endpoint) for p in self._computed.values()}
        if not changed_rules or computed_for != {view(ep) for ep in self._endpoints}:
            return None  # the endpoints changed too: every peer set may have
        selectors = [r.selector for r in changed_rules]
        selectors += [self._rules[r.name].selector for r in changed_rules if r.name in self._rules]
        return [ep for ep in self._endpoints if any(sel.matches(ep.labels) for sel in selectors)]

    def _install(self, policies: dict[int, EndpointPolicy], force: bool) -> set[str]:
        changed = set()
        for ep_id, policy in policies.items():
            flags = config_flags(policy.ingress_enforced, policy.egress_enforced, self._audit(policy.endpoint.name))
            signature = (frozenset((e, e.deny) for e in policy.entries), flags)
            if not force and self._installed.get(ep_id) == signature:
                continue
            self._maps.install(ep_id, policy.entries, flags)
            self._installed[ep_id] = signature
            changed.add(policy.endpoint.name)
        return changed

    # ---- rules ----

    @property
    def revision(self) -> int:
        return self._store.revision(RULE)

    def import_rules(self, messages: Iterable[pb.Rule], document: str = "") -> tuple[int, list[str]]:
        """Add or replace rules by name, all or none; returns (revision, endpoints rewritten)."""
        incoming = list(messages)
        if document:
            incoming += rules_mod.from_document(document)
        if not incoming:
            raise InvalidArgument("no rules given: pass rules or a document")
        parsed: dict[str, Rule] = {}
        for message in incoming:
            rule = rules_mod.from_proto(message)
            if rule.name in parsed:
                raise InvalidArgument(f"rule {rule.name} is given twice")
            parsed[rule.name] = rule
        self._endpoints = self._endpoint_views()
        changed = self._apply({**self._rules, **parsed}, changed_rules=parsed.values())
        with self._store.transaction():
            self._store.put_many(RULE, ((r.name, r.source) for r in parsed.values()))
            revision = self._store.bump_revision(RULE)
        self._rules.update(parsed)
        log.info("rules imported", rules=sorted(parsed), endpoints=changed, revision=revision)
        return revision, changed

    def delete_rules(self, names: Iterable[str]) -> tuple[int, list[str]]:
        wanted = list(names)
        if not wanted:
            raise InvalidArgument("no rule names given")
        for name in wanted:
            if name not in self._rules:
                raise NotFound(f"rule {name!r} does not exist")
        remaining = {n: r for n, r in self._rules.items() if n not in wanted}
        changed = self._apply(remaining, changed_rules=[self._rules[n] for n in wanted])
        with self._store.transaction():
            self._store.delete_many(RULE, wanted)
            revision = self._store.bump_revision(RULE)
        self._rules = remaining
        return revision, changed

    def list_rules(self, page_size: int = 0, page_token: str = "") -> tuple[list[Rule], str, int]:
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size {page_size} is above the maximum of {MAX_PAGE_SIZE}")
        size = page_size or DEFAULT_PAGE_SIZE
        rest = [self._rules[n] for n in sorted(self._rules) if n > page_token]
        return rest[:size], (rest[size - 1].name if len(rest) > size else ""), self.revision

    def get_rule(self, name: str) -> Rule:
        if name not in self._rules:
            raise NotFound(f"rule {name!r} does not exist")
        return self._rules[name]

    # ---- endpoints ----

    def _endpoint(self, name: str) -> EndpointView:
        for ep in self._endpoints:
            if ep.name == name:
                return ep
        self.refresh()
        for ep in self._endpoints:
            if ep.name == name:
                return ep
        raise NotFound(f"endpoint {name!r} does not exist")

    def _audit(self, name: str) -> bool:
        doc = self._store.get(AUDIT, name)
        return bool(doc and doc.get("audit"))

    def set_audit(self, name: str, audit: bool) -> None:
        self._endpoint(name)
        if audit:
            self._store.put(AUDIT, name, {"audit": True})
        else:
            self._store.delete(AUDIT, name)
        self._apply(self._rules)

    def endpoint_policy(self, name: str) -> tuple[EndpointPolicy, bool, dict[MapEntry, Hits]]:
        """The computed policy, the audit flag and each entry's hit counters from the map."""
        ep = self._endpoint(name)
        policy = self._computed.get(ep.id)
        if policy is None:
            self.refresh()
            policy = self._computed[ep.id]
        in_map = self._maps.read(ep.id)
        hits = {}
        for entry in policy.entries:
            key = (int(entry.direction), entry.identity, entry.proto, entry.port, entry.key_prefixlen)
            hits[entry] = in_map[key][1] if key in in_map else Hits(0, 0)
        return policy, self._audit(name), hits

    def identities(self) -> list[tuple[int, str, list[str]]]:
        prefixes: dict[int, list[str]] = {}
        for network, identity in self._ipcache.items():
            prefixes.setdefault(identity, []).append(str(network))
        return [(i, text, sorted(prefixes.get(i, []))) for i, text in sorted(self._identities.labels_of().items())]

    # ---- trace ----

    def trace(self, source: str, destination: str, port: int, protocol: str) -> TraceResult:
        """The verdict the datapath gives a new flow, and the rules that decided it."""
        try:
            src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
        except ValueError as exc:
            raise InvalidArgument(f"trace: {exc}") from None
        if src.version != dst.version:
            raise InvalidArgument("trace: source and destination must be of one family")
        proto_name = (protocol or "TCP").upper()
        protos = {"TCP": TCP, "UDP": UDP, "ICMP": ICMP if src.version == 4 else ICMPV6}
        if proto_name not in protos:
            raise InvalidArgument(f"trace: protocol {protocol!r} is not one of TCP, UDP, ICMP")
        if port > (255 if proto_name == "ICMP" else 65535):
            raise InvalidArgument(f"trace: port {port} is out of range")
        proto = protos[proto_name]
        self.refresh()
        src_id, dst_id = lpm_identity(self._ipcache, source), lpm_identity(self._ipcache, destination)
        steps: list[str] = []
        deciding: list[str] = []
        allowed = True
        for address, direction, peer in ((source, Direction.EGRESS, dst_id), (destination, Direction.INGRESS, src_id)):
            ep = next((e for e in self._endpoints if address in (e.ipv4, e.ipv6)), None)
            if ep is None:
                continue
            policy = self._computed[ep.id]
            where = f"{direction.name.lower()} of {ep.name}"
            if not policy.enforced(direction):
                steps.append(f"{where}: allowed (no rule selects {ep.name} for {direction.name.lower()})")
                continue
            entry = policy.lookup(direction, peer, proto, port)
            if entry is not None and not entry.deny:
                steps.append(f"{where}: allowed by {', '.join(entry.rules)}")
                deciding += entry.rules
                continue
            reason = f"denied by {', '.join(entry.rules)}" if entry else "denied: no rule allows it"
            if self._audit(ep.name):
                steps.append(f"{where}: {reason} (audit mode: passes)")
            else:
                steps.append(f"{where}: {reason}")
                allowed = False
            if entry:
                deciding += entry.rules
        verdict = "ALLOWED" if allowed else "DENIED"
        return TraceResult(allowed, verdict, src_id, dst_id, steps, deciding)

    # ---- conntrack ----

    def conntrack(self, limit: int = 0) -> list[ConntrackEntry]:
        return self._maps.conntrack(limit)

    def collect(self) -> int:
        return self._maps.collect_conntrack()


def protocol_name(proto: int) -> str:
    return PROTOCOL_NAMES.get(proto, str(proto))

