"""Endpoint policy: rules in, per-endpoint maps out, from the node state it follows.

`Policy` is the plain class behind the gRPC layer. It keeps the rules (and
audit settings) in the state store. Endpoints and identities (with the ipcache)
belong to the orchestrator: the service follows them through `on_endpoints` and
`on_identities` (fed by watch streams in the background) and recomputes, so a
request never waits for a refresh. CIDR identities for rules are allocated by
the orchestrator.

A rule change follows the one change protocol (services/common/change.py):
validate, plan (compute every map and reserve new CIDR identities), then in one
`Change` the store transaction, the map swaps (each recorded with the map it
replaced) and the publication of new CIDRs in the ipcache; on any failure the
maps are swapped back, the reservation released and the store rolled back.
CIDRs no rule names any more are released after the commit; until then the maps
keep their identities, which is correct for whichever address they still cover.
"""

from __future__ import annotations

import bisect
import contextlib
import ipaddress
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import structlog
from google.protobuf import json_format
from pyroute2.netlink.exceptions import NetlinkError
from weir.common.v1 import common_pb2
from weir.l7.v1 import l7_pb2 as l7pb
from weir.policy.v1 import policy_pb2 as pb

from services.common.change import Change, store_error
from services.common.collector import collector_paused
from services.common.datapath import MARK_IDENTITY_SHIFT, Direction, ReservedIdentity, XfrmMark
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable, WeirError
from services.common.service import CannotAdoptError
from services.common.store import Store, StoreError
from services.common.validate import Network
from services.policy import rules as rules_mod
from services.policy.compute import (
    ICMP,
    ICMPV6,
    PROTOCOL_NAMES,
    PROTOCOL_NUMBERS,
    EndpointPolicy,
    EndpointView,
    L7Port,
    MapEntry,
    PolicyComputer,
    lpm_identity,
    peers_may_take,
)
from services.policy.l7push import ListenerPush
from services.policy.limits import MAX_CIDRS_PER_REQUEST, MAX_RULES_PER_REQUEST, at_most, brief, shown, summary
from services.policy.maps import HAIRPIN_PROGRAM, ConntrackEntry, Hits, PolicyMaps, Saved, config_flags
from services.policy.reserve import reserve_early
from services.policy.rules import HttpRule, Rule
from services.policy.sources import OWNER, IdentityView, cidr_label

log = structlog.get_logger("weir.policy")

START_WAIT_SECONDS = 30.0
NO_ADOPT = "policy rules cannot be rebuilt from the policy maps"
RULE = "rule"
AUDIT = "audit"
OLD_IDENTITIES = "identity"  # identities this service allocated before the orchestrator owned them
PROXY_PORT = "proxyport"  # key: endpoint/direction/port of an L7 port; doc: {"port": proxy port}
DEFAULT_PROXY_PORTS = range(15000, 16000)
PROXY_BIND = "127.0.0.1"  # where the listeners bind unless told (the service gives its instance's: redirect.py)
WORLD_CIDRS = ("0.0.0.0/0", "::/0")
DEFAULT_PAGE_SIZE = 500
ADDRESS_TEXT_RE = re.compile(r"[0-9A-Fa-f.:]{2,45}")
MAX_PAGE_SIZE = 10_000
CONNECTIONS = ("new", "established", "reply", "related")
MAX_INCREMENTAL_CIDRS = 64  # new CIDR identities above which a rule change recomputes every endpoint
ICMP_UNREACHABLE = {ICMP: 3, ICMPV6: 1}  # the ICMP type of a destination-unreachable error

Signature = tuple[frozenset[tuple[MapEntry, bool]], int]


class NodeState(Protocol):
    """The orchestrator as policy uses it (services.policy.sources.Orchestrator)."""

    def snapshot(self) -> tuple[list[EndpointView], list[IdentityView]]: ...

    def allocate(self, networks: Iterable[Network], reserve_only: bool = False) -> dict[Network, int]: ...

    def release(self, networks: Iterable[Network]) -> None: ...

    def policy_ready(self, installed: Iterable[tuple[str, int]], revision: int, resend: bool = False) -> None: ...


@dataclass(frozen=True)
class TraceResult:
    allowed: bool
    verdict: str
    source_identity: int
    destination_identity: int
    steps: list[str]
    rules: list[str]
    # "policy" (looked up), "reply" or "related" (passed on a connection's conntrack entry).
    path: str = "policy"


class Policy:
    """Rules and the policy maps of one node, computed from the node state it follows."""

    def __init__(
        self,
        maps: PolicyMaps,
        store: Store,
        node: NodeState,
        l7: ListenerPush | None = None,
        proxy_ports: range = DEFAULT_PROXY_PORTS,
        setup_redirect: Callable[..., object] | None = None,
        proxy_bind: str = PROXY_BIND,
    ) -> None:
        """`l7` delivers L7 listeners to the l7 service (None: nobody is told; the flows of
        L7 ports then drop); `setup_redirect(program, map)` prepares the node's routing and
        hairpin device for the proxy redirect once the programs are loaded."""
        self._maps = maps
        self._store = store
        self._node = node
        self._l7 = l7
        self._proxy_range = proxy_ports
        self._setup_redirect = setup_redirect
        self._proxy_bind = proxy_bind
        self._proxy_ports: dict[str, int] = {}
        self._stored_proxy_ports: dict[str, int] = {}
        self._rules: dict[str, Rule] = {}
        self._endpoints: dict[str, EndpointView] = {}
        self._identities: dict[int, IdentityView] = {}
        self._computed: dict[int, EndpointPolicy] = {}
        self._installed: dict[int, Signature] = {}
        self._seen: object = None
        self._names: list[str] = []
        self._names_of: dict[str, Rule] | None = None

    # ---- life cycle ----

    def start(self, wait_for_node: float = START_WAIT_SECONDS) -> None:
        """Load, take the node's state, hold the CIDRs the rules name, rebuild every map.

        Waits (up to `wait_for_node` seconds) for the orchestrator to answer; the
        pinned maps keep enforcing meanwhile.
        """
        self._maps.load()
        if self._setup_redirect is not None:
            try:
                self._setup_redirect(self._maps.programs[HAIRPIN_PROGRAM], self._maps.maps["l7_hairpin"])
            except (OSError, WeirError, NetlinkError) as exc:  # L7 flows then drop (fail closed); the rest works
                log.error("the L7 redirect could not be set up; L7 ports drop their flows", error=brief(str(exc)))
        self._stored_proxy_ports = {key: int(doc["port"]) for key, doc in self._store.items(PROXY_PORT)}
        self._proxy_ports = dict(self._stored_proxy_ports)
        self._rules = self._stored_rules()
        deadline = time.monotonic() + wait_for_node
        while True:
            try:
                endpoints, identities = self._node.snapshot()
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                log.info("waiting for the orchestrator")
                time.sleep(0.5)
        self._endpoints = {e.name: e for e in endpoints}
        self._identities = {i.id: i for i in identities}
        wanted = self._rule_cidrs(self._rules.values())
        self._learn_cidrs(self._node.allocate(wanted))
        self._release(self._held() - wanted)
        if self._store.keys(OLD_IDENTITIES):
            with self._store.transaction():
                self._store.clear(OLD_IDENTITIES)
        self._recompute(force=True)

    def adopt(self) -> None:
        """Rules are not in the maps (only what they compiled to), so there is nothing to adopt."""
        raise CannotAdoptError(NO_ADOPT)

    def _stored_rules(self) -> dict[str, Rule]:
        rules = {}
        for name, doc in self._store.items(RULE):
            try:
                rule = rules_mod.from_stored(doc)
                rules[rule.key] = rule
            except (json_format.Error, WeirError, LookupError, TypeError, ValueError) as exc:
                raise StoreError(self._store.path, f"holds rule {name!r} that does not parse ({exc})") from None
        return rules

    def close(self) -> None:
        self._maps.close()

    # ---- the node state it follows ----

    @collector_paused()
    def on_endpoints(self, snapshot: bool, upserted: list[EndpointView], deleted: list[str]) -> list[str]:
        """An endpoint stream message: the whole set (snapshot) or changes. Returns endpoints rewritten."""
        if snapshot:
            self._endpoints = {}
        for name in deleted:
            self._endpoints.pop(name, None)
        self._endpoints.update({e.name: e for e in upserted})
        changed = self._recompute()
        self._node.policy_ready([(p.endpoint.name, p.endpoint.id) for p in self._computed.values()],
                                self.revision, resend=snapshot)  # fmt: skip
        return changed

    @collector_paused()
    def on_identities(self, snapshot: bool, upserted: list[IdentityView], deleted: list[int]) -> list[str]:
        """An identity stream message: the whole set (snapshot) or changes. Returns endpoints rewritten."""
        if snapshot:
            self._identities = {}
        for identity in deleted:
            self._identities.pop(identity, None)
        self._identities.update({i.id: i for i in upserted})
        return self._recompute()

    def _cidr_ids(self) -> dict[Network, int]:
        return {cidr: i.id for i in self._identities.values() if (cidr := i.cidr) is not None}

    def _held(self) -> set[Network]:
        return {cidr for i in self._identities.values() if OWNER in i.owners and (cidr := i.cidr) is not None}

    def _ipcache(self) -> dict[Network, int]:
        return {prefix: i.id for i in self._identities.values() for prefix in i.prefixes}

    @staticmethod
    def _rule_cidrs(rules: Iterable[Rule]) -> set[Network]:
        return {n for rule in rules for n in rule.cidrs()}

    def _learn_cidrs(self, allocated: dict[Network, int]) -> None:
        """What an allocation answered, until the identity stream says the same."""
        for network, identity in allocated.items():
            known = self._identities.get(identity)
            prefixes = known.prefixes if known else ()
            owners = (known.owners if known else frozenset()) | {OWNER}
            self._identities[identity] = IdentityView(identity, cidr_label(network), prefixes, owners)

    def _release(self, networks: set[Network]) -> None:
        if not networks:
            return
        self._node.release(networks)
        for identity, view in list(self._identities.items()):
            if view.cidr in networks:
                owners = view.owners - {OWNER}
                if owners:
                    self._identities[identity] = IdentityView(identity, view.text, view.prefixes, owners)
                else:
                    del self._identities[identity]

    def _recompute(self, force: bool = False) -> list[str]:
        """Bring every endpoint's map in line with the state followed; cheap when nothing changed."""
        cidrs = self._cidr_ids()
        seen = self._inputs(cidrs)
        if seen == self._seen and not force:
            return []
        policies = self._computer(self._rules.values(), cidrs).all()
        with self._changing(None) as (change, holds):
            changed = self._install(policies, change, holds, force)
        for stale in self._maps.endpoint_ids() - set(policies):
            self._maps.remove(stale)
            self._installed.pop(stale, None)
        self._computed = policies
        self._seen = seen
        self._sync_l7()
        return sorted(changed)

    def _inputs(self, cidrs: dict[Network, int]) -> object:
        """What the maps were computed from, besides the rules (a stream message that changes
        none of it, such as a new prefix of a known identity, recomputes nothing)."""
        endpoints = sorted(_endpoint_inputs(e) for e in self._endpoints.values())
        labels = frozenset(self._label_ids().items())
        return tuple(endpoints), frozenset(cidrs.items()), labels  # compared, never listed: no sort by text

    def _label_ids(self) -> dict[int, str]:
        """Label identities some address maps to: this node's endpoints' and, in a cluster, other
        nodes' (one no address uses, as a standalone node's label sets of deleted endpoints, is left out)."""
        return {
            i.id: i.text
            for i in self._identities.values()
            if i.prefixes and i.cidr is None and not i.text.startswith("reserved:")
        }

    def _computer(self, rules: Iterable[Rule], cidrs: dict[Network, int]) -> PolicyComputer:
        return PolicyComputer(
            rules, self._endpoints.values(), cidrs, self._maps.capacity, self._proxy_port, self._label_ids()
        )

    # ---- L7: proxy ports and listeners ----

    def _proxy_port(self, endpoint: str, direction: Direction, port: int) -> int:
        """The proxy port of an L7 port: the one it had (kept in the store), else the lowest free."""
        key = f"{endpoint}/{direction.name.lower()}/{port}"
        found = self._proxy_ports.get(key)
        if found is not None:
            return found
        taken = set(self._proxy_ports.values())
        for candidate in self._proxy_range:
            if candidate not in taken:
                self._proxy_ports[key] = candidate
                return candidate
        raise ResourceExhausted(
            f"no proxy port left for {key}: all {len(self._proxy_range)} of "
            f"{self._proxy_range.start}-{self._proxy_range.stop - 1} are in use (restart the policy service "
            "with a larger --proxy-ports range, or use fewer L7 ports)"
        )

    def _sync_l7(self) -> None:
        """Keep only the proxy ports an L7 port uses (in the store too) and hand the listeners on."""
        wanted: dict[str, int] = {}
        listeners: dict[str, list[l7pb.Listener]] = {}
        for policy in self._computed.values():
            ep = policy.endpoint
            for l7_port in policy.l7_ports:
                key = f"{ep.name}/{l7_port.direction.name.lower()}/{l7_port.port}"
                proxy_port = self._proxy_ports.get(key)
                if proxy_port is None:
                    continue
                wanted[key] = proxy_port
                listeners.setdefault(ep.name, []).append(self._listener(ep, l7_port, proxy_port))
        self._proxy_ports = dict(wanted)
        if wanted != self._stored_proxy_ports:
            try:
                with self._store.transaction():
                    for key in self._stored_proxy_ports.keys() - wanted.keys():
                        self._store.delete(PROXY_PORT, key)
                    for key, port in wanted.items():
                        if self._stored_proxy_ports.get(key) != port:
                            self._store.put(PROXY_PORT, key, {"port": port})
                self._stored_proxy_ports = dict(wanted)
            except (sqlite3.Error, StoreError) as exc:
                log.warning("proxy ports not stored; the next change stores them", error=brief(str(exc)))
        if self._l7 is not None:
            self._l7.set_listeners(listeners)

    def _cidrs_of(self, identities: frozenset[int] | None) -> list[str] | None:
        """The prefixes of these identities (ipcache), None for every peer."""
        if identities is None:
            return None
        cidrs: set[str] = set()
        for identity in identities:
            if identity == ReservedIdentity.WORLD:
                cidrs.update(WORLD_CIDRS)
            view = self._identities.get(identity)
            if view is not None:
                cidrs.update(str(p) for p in view.prefixes)
        return sorted(cidrs)

    def _listener(self, ep: EndpointView, l7_port: L7Port, proxy_port: int) -> l7pb.Listener:
        """The l7 service's listener of one L7 port: transparent, to the original destination."""
        ingress = l7_port.direction is Direction.INGRESS
        rules = []
        for rule in l7_port.rules:
            cidrs = self._cidrs_of(rule.identities)
            if cidrs is not None and not cidrs:
                continue  # its peers have no address yet: it admits nobody
            message = _http_rule(rule.name, rule.http)
            if cidrs:
                (message.sources if ingress else message.destinations).extend(cidrs)
            rules.append(message)
        mark = int(XfrmMark.L7_FROM_INGRESS_PROXY) if ingress else egress_proxy_mark(ep.identity)
        return l7pb.Listener(
            direction=common_pb2.DIRECTION_INGRESS if ingress else common_pb2.DIRECTION_EGRESS,
            port=l7_port.port,
            protocol="TCP",
            proxy_port=proxy_port,
            rules=rules,
            bind_address=self._proxy_bind,
            transparent=True,
            use_original_dst=True,  # Envoy's ORIGINAL_DST cluster takes only a restored local address
            upstream_mark=mark,
        )

    @contextlib.contextmanager
    def _changing(self, store: Store | None) -> Iterator[tuple[Change, list[Saved]]]:
        """A Change, and the replaced maps it holds for undo (closed when it is over)."""
        holds: list[Saved] = []
        try:
            with Change(store) as change:
                yield change, holds
        finally:
            for saved in holds:
                saved.close()

    def _install(
        self, policies: dict[int, EndpointPolicy], change: Change, holds: list[Saved], force: bool = False
    ) -> set[str]:
        """Swap in every map that changes (one batch), recorded in `change` with the maps it replaced."""
        changed = set()
        before = dict(self._installed)
        change.on_failure(lambda: self._reset_installed(before))
        installs: list[tuple[int, Sequence[MapEntry], int]] = []
        saved: list[tuple[int, Saved]] = []
        for ep_id, policy in policies.items():
            flags = config_flags(
                policy.ingress_enforced,
                policy.egress_enforced,
                self._audit(policy.endpoint.name),
                ingress_default_allow=policy.ingress_default_allow,
                egress_default_allow=policy.egress_default_allow,
            )
            signature = (frozenset((e, e.deny) for e in policy.entries), flags)
            if not force and self._installed.get(ep_id) == signature:
                continue
            saved.append((ep_id, self._maps.save(ep_id)))
            holds.append(saved[-1][1])
            installs.append((ep_id, policy.entries, flags))
            self._installed[ep_id] = signature
            changed.add(policy.endpoint.name)
        if installs:  # the undo tolerates endpoints the failed batch never reached
            change.attempt(lambda: self._maps.install_many(installs), undo=lambda: self._restore(saved))
        return changed

    def _restore(self, saved: list[tuple[int, Saved]]) -> None:
        for endpoint_id, held in reversed(saved):
            self._maps.restore(endpoint_id, held)

    def _reset_installed(self, before: dict[int, Signature]) -> None:
        self._installed = before

    def _change_rules(
        self,
        rules: dict[str, Rule],
        changed_rules: list[Rule],
        write_store: Callable[[], int],
        early: dict[Network, int] | None = None,
    ) -> tuple[int, list[str]]:
        """The change protocol for a new rule set; returns (revision, endpoints rewritten).

        `early`: CIDR identities reserved while the rules were checked (services.policy.reserve).
        """
        wanted, held = self._rule_cidrs(rules.values()), self._held()
        added, removed = wanted - held, held - wanted
        reserved = {n: i for n, i in (early or {}).items() if n in added}
        if early and len(reserved) < len(early):
            self._release_quietly(early.keys() - added)  # not needed after all
        try:
            rest = added - reserved.keys()
            if rest:
                reserved |= self._node.allocate(rest, reserve_only=True)
            cidr_ids = {**self._cidr_ids(), **reserved}  # what _cidr_ids() gives once `reserved` is learned
            computer = self._computer(rules.values(), cidr_ids)
            affected = None if removed else self._affected(changed_rules, rules, added)
            if affected is None:
                policies = computer.all()
            else:
                policies = {**self._computed, **{ep.id: computer.endpoint(ep) for ep in affected}}
            with self._changing(self._store) as (change, holds):
                try:
                    revision = write_store()
                except sqlite3.Error as exc:
                    raise store_error(exc, self._store.path) from exc
                changed = self._install(policies, change, holds)
                if added:
                    change.apply(lambda: self._node.allocate(added), undo=lambda: self._node.release(added))
        except BaseException:
            if reserved:
                self._release_quietly(set(reserved))
            raise
        self._rules = rules
        self._computed = policies
        self._learn_cidrs(reserved)
        self._seen = self._inputs(cidr_ids)
        self._sync_l7()
        if removed:
            try:
                self._release(removed)
                final = self._computer(rules.values(), self._cidr_ids()).all()
                with self._changing(None) as (change, holds):
                    changed |= self._install(final, change, holds)
                self._computed = final
                self._seen = self._inputs(self._cidr_ids())
                self._sync_l7()
            except WeirError as exc:
                log.warning(
                    "CIDR identities kept until the next change",
                    cidrs=summary(sorted(map(str, removed))),
                    error=brief(str(exc)),
                )
        return revision, sorted(changed)

    def _release_quietly(self, networks: set[Network]) -> None:
        try:
            self._node.release(networks)
        except WeirError as exc:
            log.warning(
                "reserved CIDR identities not released; the next change releases them",
                cidrs=summary(sorted(map(str, networks))),
                error=brief(str(exc)),
            )

    def _affected(
        self, changed_rules: list[Rule], rules: dict[str, Rule], added: set[Network] | None = None
    ) -> list[EndpointView] | None:
        """Endpoints a change of these rules (in their old or new version) can touch; None: all.

        New CIDR identities (`added`, a few at most) also touch the endpoints of every rule in
        the new set `rules` whose peers may take them (compute.peers_may_take).
        """
        computed_for = {_endpoint_inputs(p.endpoint) for p in self._computed.values()}
        if not changed_rules or computed_for != {_endpoint_inputs(ep) for ep in self._endpoints.values()}:
            return None  # the endpoints changed too: every peer set may have
        if added and len(added) > MAX_INCREMENTAL_CIDRS:
            return None  # a bulk change: one pass over everything costs less than the checks
        versions = [*changed_rules, *(self._rules[r.key] for r in changed_rules if r.key in self._rules)]
        if added:
            versions += [r for r in rules.values() if peers_may_take(r, added)]
        selectors = {part.selector for rule in versions for part in rule.parts()}
        return [ep for ep in self._endpoints.values() if any(sel.matches(ep.labels) for sel in selectors)]

    # ---- rules ----

    @property
    def revision(self) -> int:
        return self._store.revision(RULE)

    @collector_paused()
    def import_rules(self, messages: Iterable[pb.Rule], document: str = "") -> tuple[int, list[str]]:
        """Add or replace rules by key (namespace/name), all or none; returns (revision, endpoints rewritten).

        The request's sizes are checked first (services.policy.limits), then every rule,
        before anything is written. A bulk request's CIDRs are reserved while its rules are
        checked (after its sizes), and released if they are refused (services.policy.reserve).
        """
        incoming = list(messages)
        at_most(len(incoming), MAX_RULES_PER_REQUEST, "rules")
        if document:
            incoming += rules_mod.from_document(document)
        if not incoming:
            raise InvalidArgument("no rules given: pass rules or a document")
        at_most(len(incoming), MAX_RULES_PER_REQUEST, "rules")
        texts = [text for m in incoming for text in rules_mod.cidr_texts(m)]
        at_most(len(texts), MAX_CIDRS_PER_REQUEST, "CIDRs (excepts included)")
        for message in incoming:
            rules_mod.check_limits(message)
        early = reserve_early(self._node, texts, self._held)
        parsed: dict[str, Rule] = {}
        try:
            for message in incoming:
                rule = rules_mod.from_proto(message, sized=False)  # the limits are checked
                if rule.key in parsed:
                    raise InvalidArgument(f"rule {rule.key} is given twice")
                parsed[rule.key] = rule
        except BaseException:
            if early is not None and (reserved := early.result()):
                self._release_quietly(set(reserved))
            raise

        def write() -> int:
            self._store.put_many_text(RULE, ((key, r.source_text) for key, r in parsed.items()))
            return self._store.bump_revision(RULE)

        revision, changed = self._change_rules(
            {**self._rules, **parsed}, list(parsed.values()), write, early.result() if early is not None else None
        )
        log.info("rules imported", rules=summary(sorted(parsed)), count=len(parsed), endpoints=summary(changed),
                 revision=revision)  # fmt: skip
        return revision, changed

    @collector_paused()
    def delete_rules(self, names: Iterable[str]) -> tuple[int, list[str]]:
        wanted = list(names)
        if not wanted:
            raise InvalidArgument("no rule names given")
        at_most(len(wanted), MAX_RULES_PER_REQUEST, "rule names")
        wanted = list(dict.fromkeys(self._key(name) for name in wanted))
        gone = set(wanted)
        remaining = {n: r for n, r in self._rules.items() if n not in gone}

        def write() -> int:
            self._store.delete_many(RULE, wanted)
            return self._store.bump_revision(RULE)

        revision, changed = self._change_rules(remaining, [self._rules[n] for n in wanted], write)
        log.info("rules deleted", rules=summary(sorted(wanted)), count=len(wanted), endpoints=summary(changed),
                 revision=revision)  # fmt: skip
        return revision, changed

    def list_rules(self, page_size: int = 0, page_token: str = "") -> tuple[list[Rule], str, int]:
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size {page_size} is above the maximum of {MAX_PAGE_SIZE}")
        size = page_size or DEFAULT_PAGE_SIZE
        names = self._sorted_names()
        first = bisect.bisect_right(names, page_token)
        page = [self._rules[n] for n in names[first : first + size]]
        more = first + size < len(names)
        return page, (page[-1].key if more else ""), self.revision

    def _sorted_names(self) -> list[str]:
        """The rule names in order, sorted once per rule set (a page is then O(log n + page))."""
        if self._names_of is not self._rules:
            self._names = sorted(self._rules)
            self._names_of = self._rules
        return self._names

    def get_rule(self, name: str) -> Rule:
        return self._rules[self._key(name)]

    def _key(self, name: str) -> str:
        """The key a request's rule name means: `namespace/name`, or `name` (a cluster-wide rule,
        else the one namespaced rule of that name)."""
        if name in self._rules:
            return name
        if "/" not in name:
            matches = sorted(k for k, r in self._rules.items() if r.name == name)
            if len(matches) == 1:
                return matches[0]
            if matches:
                raise InvalidArgument(
                    f"rule name {shown(name)} is in several namespaces ({', '.join(matches)}): "
                    "give it as namespace/name"
                )
        raise NotFound(f"rule {shown(name)} does not exist")

    # ---- endpoints ----

    def _endpoint(self, name: str) -> EndpointView:
        ep = self._endpoints.get(name)
        if ep is None or ep.id not in self._computed:
            raise NotFound(
                f"endpoint {shown(name)} is not known to the policy service; it follows the orchestrator's "
                "endpoints, so a just-created endpoint appears within moments"
            )
        return ep

    def _audit(self, name: str) -> bool:
        doc = self._store.get(AUDIT, name)
        return bool(doc and doc.get("audit"))

    def set_audit(self, name: str, audit: bool) -> None:
        ep = self._endpoint(name)
        with self._changing(self._store) as (change, holds):
            try:
                if audit:
                    self._store.put(AUDIT, name, {"audit": True})
                else:
                    self._store.delete(AUDIT, name)
            except sqlite3.Error as exc:
                raise store_error(exc, self._store.path) from exc
            self._install({ep.id: self._computed[ep.id]}, change, holds)

    def endpoint_policy(self, name: str) -> tuple[EndpointPolicy, bool, dict[MapEntry, Hits]]:
        """The computed policy, the audit flag and each entry's hit counters from the map."""
        ep = self._endpoint(name)
        policy = self._computed[ep.id]
        in_map = self._maps.read(ep.id)
        hits = {}
        for entry in policy.entries:
            key = (int(entry.direction), entry.identity, entry.proto, entry.port, entry.key_prefixlen)
            hits[entry] = in_map[key][1] if key in in_map else Hits(0, 0)
        return policy, self._audit(name), hits

    def identities(self) -> list[tuple[int, str, list[str]]]:
        """The node's identities as last streamed: (id, labels text, ipcache prefixes)."""
        return [(i, view.text, sorted(str(p) for p in view.prefixes)) for i, view in sorted(self._identities.items())]

    # ---- trace ----

    def trace(self, source: str, destination: str, port: int, protocol: str, connection: str = "") -> TraceResult:
        """The verdict the datapath gives a packet, and the rules (and their sections) that decided it.

        `connection` places the packet in its connection: a new or established packet (in the
        connection's original direction) is looked up in policy; a reply, or a related ICMP
        error, passes on the conntrack entry of the connection it answers (source and
        destination swapped, `port` its destination port) when that connection is allowed,
        and is looked up as a new packet of its own when it is not (no entry exists then).
        """
        kind = connection or "new"
        if kind not in CONNECTIONS:
            raise InvalidArgument(f"trace: connection {shown(connection)} is not one of {', '.join(CONNECTIONS)}")
        for field_name, text in (("source", source), ("destination", destination)):
            if not ADDRESS_TEXT_RE.fullmatch(text):
                raise InvalidArgument(f"trace: {field_name} {shown(text)} is not an IPv4 or IPv6 address "
                                      "(a scope such as %eth0 is not accepted)")  # fmt: skip
        try:
            src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
        except ValueError:
            raise InvalidArgument(f"trace: {shown(source)} or {shown(destination)} is not an IP address") from None
        if src.version != dst.version:
            raise InvalidArgument("trace: source and destination must be of one family")
        proto_name = (protocol or "TCP").upper()
        if proto_name not in PROTOCOL_NUMBERS:
            raise InvalidArgument(f"trace: protocol {shown(protocol)} is not one of {', '.join(PROTOCOL_NUMBERS)}")
        proto = PROTOCOL_NUMBERS[proto_name]
        icmp = ICMP if src.version == 4 else ICMPV6
        if proto in (ICMP, ICMPV6) and proto != icmp:
            raise InvalidArgument(f"trace: {proto_name} is not IPv{src.version}'s; use {PROTOCOL_NAMES[icmp]} "
                                  f"for IPv{src.version} addresses")  # fmt: skip
        if port > (255 if proto == icmp else 65535):
            raise InvalidArgument(f"trace: port {port} is out of range")
        if kind in ("new", "established"):
            result = self._lookup(source, destination, proto, port)
            return replace(result, steps=[f"{kind} packet in the original direction: policy is looked up",
                                          *result.steps])  # fmt: skip
        flow = f"{destination} -> {source} {proto_name}/{port}"
        original = self._lookup(destination, source, proto, port)
        if original.allowed:
            what = "reply" if kind == "reply" else "related ICMP error"
            steps = [f"{what} of the connection {flow}, which policy allows:",
                     *(f"  {step}" for step in original.steps),
                     f"passes as {kind} on the connection's conntrack entry (no policy lookup)"]  # fmt: skip
            return TraceResult(True, "ALLOWED", original.destination_identity, original.source_identity, steps,
                               original.rules, kind)  # fmt: skip
        # No allowed connection, so no conntrack entry: the packet is new in its own direction.
        if kind == "reply":
            result = self._lookup(source, destination, proto, port)
            alone = f"a new {proto_name} packet to port {port}"
        else:
            result = self._lookup(source, destination, icmp, ICMP_UNREACHABLE[icmp])
            alone = f"a new {PROTOCOL_NAMES[icmp]} packet (destination unreachable)"
        steps = [f"no {kind} path: policy denies the connection {flow}, so it has no conntrack entry; "
                 f"looked up as {alone}", *result.steps]  # fmt: skip
        return replace(result, steps=steps)

    def _lookup(self, source: str, destination: str, proto: int, port: int) -> TraceResult:
        """A packet looked up in policy: egress of the source endpoint, ingress of the destination's."""
        ipcache = self._ipcache()
        src_id, dst_id = lpm_identity(ipcache, source), lpm_identity(ipcache, destination)
        steps: list[str] = []
        deciding: list[str] = []
        allowed = True
        for address, direction, peer in ((source, Direction.EGRESS, dst_id), (destination, Direction.INGRESS, src_id)):
            ep = next((e for e in self._endpoints.values() if address in (e.ipv4, e.ipv6)), None)
            if ep is None or ep.id not in self._computed:
                continue
            policy = self._computed[ep.id]
            way = direction.name.lower()
            where = f"{way} of {ep.name}"
            if not policy.enforced(direction):
                steps.append(f"{where}: allowed (no rule selects {ep.name} for {way})")
                continue
            entry = policy.lookup(direction, peer, proto, port)
            if entry is not None and not entry.deny:
                steps.append(f"{where}: allowed by {_credited(entry.rules, way)}")
                deciding += entry.rules
                continue
            if entry is None and policy.default_allow(direction):
                steps.append(f"{where}: allowed: no rule matches, and every rule selecting {ep.name} for {way} "
                             "sets enableDefaultDeny false (default allow)")  # fmt: skip
                continue
            reason = f"denied by {_credited(entry.rules, way + 'Deny')}" if entry else "denied: no rule allows it"
            if self._audit(ep.name):
                steps.append(f"{where}: {reason} (audit mode: passes)")
            else:
                steps.append(f"{where}: {reason}")
                allowed = False
            if entry:
                deciding += entry.rules
        verdict = "ALLOWED" if allowed else "DENIED"
        return TraceResult(allowed, verdict, src_id, dst_id, steps, list(dict.fromkeys(deciding)), "policy")

    # ---- conntrack ----

    def conntrack(self, limit: int = 0) -> list[ConntrackEntry]:
        """The node's conntrack entries (the orchestrator collects expired ones)."""
        return self._maps.conntrack(limit)


def egress_proxy_mark(identity: int) -> int:
    """The mark of an egress listener's upstream: L7_FROM_EGRESS_PROXY with the client's identity
    (its low 16 bits in the upper half, the next 8 in the low byte; bpf/include/weir/l7.h reads it)."""
    low, high = identity & 0xFFFF, (identity >> 16) & 0xFF
    return low << MARK_IDENTITY_SHIFT | int(XfrmMark.L7_FROM_EGRESS_PROXY) | high


def _http_rule(name: str, http: HttpRule | None) -> l7pb.HttpRule:
    """A policy rule's HTTP rule as the l7 service takes it (None: allow every request)."""
    if http is None:
        return l7pb.HttpRule(name=name)
    return l7pb.HttpRule(
        name=name,
        method=http.method,
        path=http.path,
        host=http.host,
        headers=[
            l7pb.HeaderMatch(name=h.name, present=True)
            if h.value is None
            else l7pb.HeaderMatch(name=h.name, exact=h.value)
            for h in http.headers
        ],
    )


def _credited(rules: Iterable[str], section: str) -> str:
    """Rules and the section that decided, as a policy's author wrote them: "prod/web (ingress)"."""
    return ", ".join(f"{rule} ({section})" for rule in rules)


def _endpoint_inputs(ep: EndpointView) -> tuple[object, ...]:
    """What of an endpoint the maps are computed from (its named ports too: they resolve rules)."""
    return (ep.name, ep.id, ep.ipv4, ep.ipv6, ep.identity, tuple(sorted(ep.labels.items())), ep.named_ports)


def protocol_name(proto: int) -> str:
    return PROTOCOL_NAMES.get(proto, str(proto))
