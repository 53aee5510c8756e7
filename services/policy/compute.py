"""From rules, endpoints and identities to map contents: per-endpoint policy maps.

Pure Python, no kernel: the same function gives what the service writes, what
a restarted service compares the pinned maps with, and what `Trace` explains.
Identities and the ipcache are the orchestrator's; they come in as data.

An endpoint's policy map is a set of LPM entries keyed (direction, identity,
protocol, port prefix). The datapath looks up the peer's identity first, then
identity 0 ("any"); an entry's verdict is final. So for each identity table the
computation folds in every rule that applies to that identity (rules for "any"
peer included) and lets deny win over allow before it emits an entry: one
lookup then gives Cilium's answer, and a longer (more specific) prefix never
turns a denied flow into an allowed one.
"""

from __future__ import annotations

import bisect
import collections
import functools
import ipaddress
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

from services.common.datapath import Direction, ReservedIdentity
from services.common.errors import ResourceExhausted
from services.common.validate import Network
from services.policy.defs import PREFIX_IDENTITY, PREFIX_PROTO
from services.policy.rules import HttpRule, PeerRule, PortRule, Rule, Selector

ANY = 0
TCP, UDP, ICMP, ICMPV6, SCTP = 6, 17, 1, 58, 132
PROTOCOL_NAMES = {0: "ANY", TCP: "TCP", UDP: "UDP", SCTP: "SCTP", ICMP: "ICMP", ICMPV6: "ICMPV6"}
PROTOCOL_NUMBERS = {name: number for number, name in PROTOCOL_NAMES.items() if number}
# Cilium's ANY in a port rule: the protocols with ports (pkg/policy/api/l4.go), never ICMP.
PORT_PROTOCOLS = (TCP, UDP, SCTP)

# Labels of the reserved identities, as Cilium gives them (source "reserved"), so a
# selector naming `reserved:host` selects the host. CIDR identities carry reserved:world
# too (as Cilium's CIDR identities do), so it selects what the `world` entity does.
RESERVED_LABELS: dict[int, dict[str, str]] = {
    ReservedIdentity.HOST: {"reserved:host": ""},
    ReservedIdentity.WORLD: {"reserved:world": ""},
    ReservedIdentity.REMOTE_NODE: {"reserved:remote-node": ""},
}
CIDR_LABELS = {"reserved:world": ""}


@dataclass(frozen=True, order=True)
class NamedPort:
    """A container port an endpoint declares by name (a pod's `ports[].name`)."""

    name: str
    port: int
    protocol: str  # TCP, UDP or SCTP


@dataclass(frozen=True)
class EndpointView:
    """What the policy needs of an endpoint (the orchestrator owns the rest)."""

    name: str
    id: int
    ipv4: str
    ipv6: str
    labels: dict[str, str] = field(hash=False, compare=False)
    identity: int = 0
    namespace: str = ""  # also in `labels` (io.kubernetes.pod.namespace), where selectors see it
    named_ports: tuple[NamedPort, ...] = ()

    def ports_named(self, name: str, protocols: Iterable[int]) -> set[tuple[int, int]]:
        """(protocol, port) of this endpoint's named port `name`, for these protocols."""
        wanted = set(protocols)
        return {
            (PROTOCOL_NUMBERS[p.protocol], p.port)
            for p in self.named_ports
            if p.name == name and PROTOCOL_NUMBERS.get(p.protocol) in wanted
        }

    def addresses(self) -> list[Network]:
        return [ipaddress.ip_network(a) for a in (self.ipv4, self.ipv6) if a]


@dataclass(frozen=True)
class MapEntry:
    """One policy map entry; proto 0 means every protocol (and then every port)."""

    direction: Direction
    identity: int
    proto: int
    port: int
    port_prefix: int
    deny: bool
    rules: tuple[str, ...] = field(compare=False)
    l7: bool = False  # an allow whose flows go through the L7 proxy (a port rule with HTTP rules)
    proxy_port: int = 0  # the proxy port those flows go to (given by the service; 0 until then)

    @property
    def key_prefixlen(self) -> int:
        return PREFIX_IDENTITY if self.proto == ANY else PREFIX_PROTO + self.port_prefix

    def covers(self, proto: int, port: int) -> bool:
        if self.proto == ANY:
            return True
        size = 1 << (16 - self.port_prefix)
        return self.proto == proto and self.port <= port < self.port + size


@dataclass(frozen=True)
class L7Rule:
    """One HTTP rule of an L7 port, for the peers its section names (None: every peer).

    `http` None is an allow-all rule: an L4-only allow of the same port and peers, which
    the proxy must let through as it is (as Cilium wildcards L7 for such peers).
    """

    name: str
    http: HttpRule | None
    identities: frozenset[int] | None


@dataclass(frozen=True)
class L7Port:
    """A TCP port of an endpoint, in one direction, whose flows go through the proxy."""

    direction: Direction
    port: int
    rules: tuple[L7Rule, ...]


@dataclass(frozen=True)
class EndpointPolicy:
    endpoint: EndpointView
    ingress_enforced: bool
    egress_enforced: bool
    entries: tuple[MapEntry, ...]
    # Enforced, but no selecting rule asks for default deny: what no entry matches passes.
    ingress_default_allow: bool = False
    egress_default_allow: bool = False
    l7_ports: tuple[L7Port, ...] = ()

    def enforced(self, direction: Direction) -> bool:
        return self.ingress_enforced if direction is Direction.INGRESS else self.egress_enforced

    def default_allow(self, direction: Direction) -> bool:
        return self.ingress_default_allow if direction is Direction.INGRESS else self.egress_default_allow

    def lookup(self, direction: Direction, identity: int, proto: int, port: int) -> MapEntry | None:
        """What the datapath finds: longest match for the identity, else for any identity."""
        for table in (identity, ANY):
            found = [
                e for e in self.entries
                if e.direction is direction and e.identity == table and e.covers(proto, port)
            ]  # fmt: skip
            if found:
                return max(found, key=lambda e: e.key_prefixlen)
        return None


@dataclass(frozen=True)
class Grant:
    """One (peers, protocol, port range) a rule allows or denies."""

    identities: frozenset[int] | None  # None: every identity
    proto: int
    first: int
    last: int
    deny: bool
    rule: str  # the rule's key (namespace/name)
    http: tuple[HttpRule, ...] = ()  # the port rule's L7 rules (an allow of one TCP port only)

    @property
    def l7(self) -> bool:
        return bool(self.http)


def port_prefixes(first: int, last: int, bits: int = 16) -> Iterator[tuple[int, int]]:
    """Cover [first, last] with the fewest (value, prefix length) pairs."""
    while first <= last:
        size = first & -first if first else 1 << bits
        while size > last - first + 1:
            size >>= 1
        yield first, bits - size.bit_length() + 1
        first += size


def rule_protocols(protocol: str) -> tuple[int, ...]:
    """The IP protocols of a port rule's protocol: ANY is TCP, UDP and SCTP (as Cilium's)."""
    return PORT_PROTOCOLS if protocol == "ANY" else (PROTOCOL_NUMBERS[protocol],)


def _protocols(peer: PeerRule) -> Iterator[tuple[int, int, int, tuple[HttpRule, ...]]]:
    """(protocol, first, last, HTTP rules) of a peer's numbered ports; no ports: every protocol.

    Only a peer rule with no ports at all is an L3 allow (ICMP included); `ANY` port 0
    covers every port of TCP, UDP and SCTP, and ICMP only through an ICMP rule. HTTP rules
    apply to TCP only; a port rule with HTTP rules over a range of ports (Cilium refuses
    those) allows nothing, so L7 rules never fail open.
    """
    if not peer.ports:
        yield ANY, 0, 65535, ()
        return
    for p in peer.ports:
        if not p.name:
            for proto in rule_protocols(p.protocol):
                if p.http and proto == TCP and p.first != p.last:
                    continue
                yield proto, p.first, p.last, (p.http if proto == TCP else ())


def peers_may_take(rule: Rule, networks: Iterable[Network]) -> bool:
    """Whether new CIDR identities for `networks` can enter a peer set of `rule` (any spec):
    a peer CIDR containing one of them, the world entity, or a selector of CIDR identities."""
    wanted = list(networks)
    for part in rule.parts():
        for peer in (*part.ingress, *part.egress, *part.ingress_deny, *part.egress_deny):
            if "world" in peer.entities:
                return True
            if any(_names_reserved(sel) and sel.matches(CIDR_LABELS) for sel in peer.endpoints):
                return True
            for c in peer.cidrs:
                if any(n.version == c.network.version and n.subnet_of(c.network) for n in wanted):  # type: ignore[arg-type]
                    return True
    return False


def _names_reserved(selector: Selector) -> bool:
    """Whether a selector names a reserved label: only such a selector selects reserved identities."""
    keys = [k for k, _ in selector.match_labels] + [r.key for r in selector.match_expressions]
    return any(k.partition(":")[0] == "reserved" for k in keys if ":" in k)


@functools.lru_cache(maxsize=1 << 16)
def _label_dict(text: str) -> dict[str, str]:
    """An identity's label text ("k=v,k=v", as the orchestrator keys label sets) as labels."""
    return dict(pair.partition("=")[::2] for pair in text.split(",") if pair)


class PolicyComputer:
    """Rules + endpoints + CIDR identities -> policy map contents.

    `cidr_identities` are the node's CIDR identities (all of them: "world" and a
    rule's CIDR select every CIDR identity inside it, whoever asked for it). Every
    spec of a rule (`Rule.parts()`) counts as a rule of its own, credited to the
    rule's key.
    """

    def __init__(
        self,
        rules: Iterable[Rule],
        endpoints: Iterable[EndpointView],
        cidr_identities: dict[Network, int],
        capacity: int,
        proxy_port: Callable[[str, Direction, int], int] | None = None,
        label_identities: dict[int, str] | None = None,
    ) -> None:
        """`proxy_port(endpoint name, direction, port)` gives an L7 port's proxy port (None: 0).

        `label_identities` (number -> label text "k=v,k=v") are the label identities the node
        knows beyond its own endpoints': in a cluster, other nodes' endpoints, which a selector
        selects by their labels as Cilium's selector cache does.
        """
        self.proxy_port = proxy_port
        self.rules = sorted(rules, key=lambda r: r.key)
        self.endpoints = sorted(endpoints, key=lambda e: e.name)
        self.label_identities = [(i, _label_dict(text)) for i, text in sorted((label_identities or {}).items())]
        self.cidr_identities = cidr_identities
        self.capacity = capacity
        self._cidrs = _CidrIndex(cidr_identities)
        self._by_selector: dict[object, set[int]] = {}
        # Every spec of every rule, in rule order: an endpoint matches each distinct selector
        # once (`endpoint`), not once per rule that repeats it.
        self._parts = [part for rule in self.rules for part in rule.parts()]
        self._by_part_selector: dict[Selector, list[int]] = {}
        for index, part in enumerate(self._parts):
            self._by_part_selector.setdefault(part.selector, []).append(index)
        self._by_port_name: dict[tuple[str, tuple[int, ...]], dict[int, set[tuple[int, int]]]] = {}

    def _selected(self, selector: Selector) -> set[int]:
        """The identities a selector selects: endpoints' and, when it names one, reserved ones."""
        if selector not in self._by_selector:
            ids = {ep.identity for ep in self.endpoints if selector.matches(ep.labels)}
            ids |= {i for i, labels in self.label_identities if selector.matches(labels)}
            if _names_reserved(selector):
                ids |= {i for i, labels in RESERVED_LABELS.items() if selector.matches(labels)}
                if selector.matches(CIDR_LABELS):
                    ids |= set(self.cidr_identities.values())
            self._by_selector[selector] = ids
        return self._by_selector[selector]

    def _peer_identities(self, peer: PeerRule) -> frozenset[int] | None:
        if peer.any_peer or "all" in peer.entities:
            return None
        ids: set[int] = set()
        for selector in peer.endpoints:
            ids |= self._selected(selector)
        if "host" in peer.entities:
            ids.add(ReservedIdentity.HOST)
        if "remote-node" in peer.entities:
            ids.add(ReservedIdentity.REMOTE_NODE)
        if "cluster" in peer.entities:
            # Cilium's cluster entity: the cluster's endpoints, the host and the other nodes.
            ids |= {ep.identity for ep in self.endpoints} | {i for i, _ in self.label_identities}
            ids |= {ReservedIdentity.HOST, ReservedIdentity.REMOTE_NODE}
        if "world" in peer.entities:
            ids.add(ReservedIdentity.WORLD)
            ids |= set(self.cidr_identities.values())
        for c in peer.cidrs:
            excluded = {i for e in c.excepts for i in self._cidrs.within(e)}
            ids |= self._cidrs.within(c.network) - excluded
        return frozenset(ids)

    def _named_by_identity(self, name: str, protocols: tuple[int, ...]) -> dict[int, set[tuple[int, int]]]:
        """identity -> (protocol, port) of `name` on the endpoints of that identity that define it."""
        key = (name, protocols)
        if key not in self._by_port_name:
            found: dict[int, set[tuple[int, int]]] = {}
            for ep in self.endpoints:
                ports = ep.ports_named(name, protocols)
                if ports:
                    found.setdefault(ep.identity, set()).update(ports)
            self._by_port_name[key] = found
        return self._by_port_name[key]

    def _named(
        self, ep: EndpointView, direction: Direction, ids: frozenset[int] | None, port: PortRule, deny: bool, rule: str
    ) -> Iterator[Grant]:
        """A named port resolved per endpoint; a name nobody defines allows nothing.

        Ingress: the selected endpoint's own ports (as Cilium's Endpoint.GetNamedPort). Egress:
        per destination identity, the ports its endpoints give the name, so each peer gets its
        own number (Kubernetes NetworkPolicy's meaning). Cilium instead looks the name up
        node-wide (pkg/types/namedport.go) and allows nothing when two numbers conflict.
        """
        protocols = rule_protocols(port.protocol)
        if direction is Direction.INGRESS:
            for proto, number in sorted(ep.ports_named(port.name, protocols)):
                yield Grant(ids, proto, number, number, deny, rule, port.http if proto == TCP else ())
            return
        for identity, ports in sorted(self._named_by_identity(port.name, protocols).items()):
            if ids is None or identity in ids:
                for proto, number in sorted(ports):
                    yield Grant(frozenset({identity}), proto, number, number, deny, rule,
                                port.http if proto == TCP else ())  # fmt: skip

    def _grants(self, ep: EndpointView, parts: list[Rule], direction: Direction) -> list[Grant]:
        grants = []
        for rule in parts:
            allow, deny = (
                (rule.ingress, rule.ingress_deny) if direction is Direction.INGRESS else (rule.egress, rule.egress_deny)
            )
            for peers, is_deny in ((allow, False), (deny, True)):
                for peer in peers:
                    ids = self._peer_identities(peer)
                    if ids is not None and not ids:
                        continue
                    for proto, first, last, http in _protocols(peer):
                        grants.append(Grant(ids, proto, first, last, is_deny, rule.key, () if is_deny else http))
                    for port in peer.ports:
                        if port.name:
                            grants.extend(self._named(ep, direction, ids, port, is_deny, rule.key))
        return grants

    @staticmethod
    def _table(direction: Direction, identity: int, relevant: list[Grant]) -> Iterator[MapEntry]:
        if len(relevant) == 1 and relevant[0].proto != ANY:
            # One port rule for the peer (a bulk import's usual case): what _segments gives for it.
            g = relevant[0]
            l7 = g.l7 and not g.deny
            for port, plen in port_prefixes(g.first, g.last):
                yield MapEntry(direction, identity, g.proto, port, plen, g.deny, (g.rule,), l7)
            return
        any_deny = [g for g in relevant if g.proto == ANY and g.deny]
        any_allow = [g for g in relevant if g.proto == ANY and not g.deny]
        if any_deny:
            yield MapEntry(direction, identity, ANY, 0, 0, True, tuple(sorted({g.rule for g in any_deny})))
            return
        if any_allow:
            yield MapEntry(direction, identity, ANY, 0, 0, False, tuple(sorted({g.rule for g in any_allow})))
        for proto in sorted({g.proto for g in relevant if g.proto != ANY}):
            segments = _segments([g for g in relevant if g.proto == proto], skip_allows=bool(any_allow))
            for first, last, deny, names, l7 in segments:
                for port, plen in port_prefixes(first, last):
                    yield MapEntry(direction, identity, proto, port, plen, deny, names, l7)

    def endpoint(self, ep: EndpointView) -> EndpointPolicy:
        hits = [indexes for selector, indexes in self._by_part_selector.items() if selector.matches(ep.labels)]
        selecting = [
            self._parts[i] for i in (sorted(itertools.chain(*hits)) if len(hits) > 1 else hits[0] if hits else [])
        ]
        # A direction is enforced when a selecting spec has a section for it; it denies by
        # default unless every such spec says enableDefaultDeny: false for it (Cilium's rule).
        with_section = {
            Direction.INGRESS: [r for r in selecting if r.ingress or r.ingress_deny],
            Direction.EGRESS: [r for r in selecting if r.egress or r.egress_deny],
        }
        default_allow = {
            Direction.INGRESS: not any(r.default_deny_ingress for r in with_section[Direction.INGRESS]),
            Direction.EGRESS: not any(r.default_deny_egress for r in with_section[Direction.EGRESS]),
        }
        entries: list[MapEntry] = []
        l7_ports: list[L7Port] = []
        for direction in Direction:
            if not with_section[direction]:
                continue
            grants = self._grants(ep, with_section[direction], direction)
            every = [g for g in grants if g.identities is None]
            by_identity: dict[int, list[Grant]] = {}
            for g in grants:
                for i in g.identities or ():
                    by_identity.setdefault(i, []).append(g)
            entries.extend(self._table(direction, ANY, every))
            for identity in sorted(by_identity):
                relevant = by_identity[identity] if not every else [*every, *by_identity[identity]]
                entries.extend(self._table(direction, identity, relevant))
            l7_ports.extend(_l7_ports(direction, grants, entries))
        if len(entries) > self.capacity:
            raise ResourceExhausted(
                f"endpoint {ep.name} would need {len(entries)} policy map entries; its map holds "
                f"{self.capacity} (restart the policy service with a larger --policy-entries, or use "
                "fewer port ranges and peers)"
            )
        ingress, egress = bool(with_section[Direction.INGRESS]), bool(with_section[Direction.EGRESS])
        if self.proxy_port is not None:
            entries = [
                replace(e, proxy_port=self.proxy_port(ep.name, e.direction, e.port)) if e.l7 else e for e in entries
            ]
        return EndpointPolicy(
            ep,
            ingress,
            egress,
            tuple(entries),
            ingress_default_allow=ingress and default_allow[Direction.INGRESS],
            egress_default_allow=egress and default_allow[Direction.EGRESS],
            l7_ports=tuple(l7_ports),
        )

    def all(self) -> dict[int, EndpointPolicy]:
        return {ep.id: self.endpoint(ep) for ep in self.endpoints}


Segment = tuple[int, int, bool, tuple[str, ...], bool]


def _segments(grants: list[Grant], skip_allows: bool) -> list[Segment]:
    """Port intervals with their verdict (deny wins), rules and L7 flag, by one sweep over the grants.

    Neighbouring intervals are joined only when the same rules decide them (and both go
    through the L7 proxy or neither does), so an entry (and Trace, and the hit counters)
    credits exactly the rules that cover its ports. An allowed interval goes through the
    proxy when an allow with HTTP rules covers it.

    With `skip_allows`, allowed intervals are left out unless they go through the proxy:
    an any-protocol allow entry already covers them.
    """
    starts: dict[int, list[Grant]] = {}
    ends: dict[int, list[Grant]] = {}
    for g in grants:
        starts.setdefault(g.first, []).append(g)
        ends.setdefault(g.last + 1, []).append(g)
    active: collections.Counter[tuple[bool, str, bool]] = collections.Counter()
    out: list[Segment] = []
    cuts = sorted(starts.keys() | ends.keys())
    for start, end in itertools.pairwise(cuts):
        for g in ends.get(start, []):
            active[(g.deny, g.rule, g.l7)] -= 1
            if not active[(g.deny, g.rule, g.l7)]:
                del active[(g.deny, g.rule, g.l7)]
        for g in starts.get(start, []):
            active[(g.deny, g.rule, g.l7)] += 1
        denies = sorted({rule for deny, rule, _ in active if deny})
        allows = sorted({rule for deny, rule, _ in active if not deny})
        l7 = any(is_l7 for deny, _, is_l7 in active if not deny)
        if denies:
            verdict, names, l7 = True, tuple(denies), False
        elif allows and (l7 or not skip_allows):
            verdict, names = False, tuple(allows)
        else:
            continue
        if out and out[-1][1] == start - 1 and out[-1][2:] == (verdict, names, l7):
            out[-1] = (out[-1][0], end - 1, verdict, names, l7)
        else:
            out.append((start, end - 1, verdict, names, l7))
    return out


def _l7_ports(direction: Direction, grants: list[Grant], entries: list[MapEntry]) -> list[L7Port]:
    """The direction's L7 ports and their rules: each grant's HTTP rules for its peers, and an
    allow-all rule for the peers an L4-only allow of the same port admits.

    A port is L7 when an entry of it sends flows to the proxy. Rules are named after the policy
    rule (`namespace/name`) and their place among that rule's HTTP rules on the port.
    """
    ports = sorted({e.port for e in entries if e.l7 and e.direction is direction and e.proto == TCP})
    out = []
    for port in ports:
        covering = [g for g in grants if not g.deny and g.proto in (TCP, ANY) and g.first <= port <= g.last]
        rules: list[L7Rule] = []
        counts: collections.Counter[str] = collections.Counter()
        for g in covering:
            for http in g.http or (None,):
                counts[g.rule] += 1
                rules.append(L7Rule(f"{g.rule}#{counts[g.rule]}", http, g.identities))
        out.append(L7Port(direction, port, tuple(rules)))
    return out


class _CidrIndex:
    """CIDR identities sorted by address, to find those inside a prefix by bisection.

    A host prefix (/32, /128: a bulk list's usual entry) holds only itself: found by its
    key, without the sorted rows, which are made on the first shorter prefix asked for.
    """

    def __init__(self, identities: dict[Network, int]) -> None:
        self._identities = identities
        self._rows: list[tuple[int, int, int, int]] | None = None
        self._keys: list[tuple[int, int]] = []

    def within(self, network: Network) -> set[int]:
        if network.prefixlen == network.max_prefixlen:
            found = self._identities.get(network)
            return {found} if found is not None else set()
        if self._rows is None:
            found_in = self._identities.items()
            self._rows = sorted((n.version, int(n.network_address), n.prefixlen, i) for n, i in found_in)
            self._keys = [(v, a) for v, a, _, _ in self._rows]
        first = int(network.network_address)
        last = first | ((1 << (network.max_prefixlen - network.prefixlen)) - 1)  # broadcast_address, cheaper
        lo = bisect.bisect_left(self._keys, (network.version, first))
        hi = bisect.bisect_right(self._keys, (network.version, last))
        return {i for _, _, plen, i in self._rows[lo:hi] if plen >= network.prefixlen}


def lpm_identity(ipcache: dict[Network, int], address: str) -> int:
    """The identity the datapath gives an address: longest ipcache prefix, else world."""
    ip = ipaddress.ip_address(address)
    best: tuple[int, int] | None = None
    for network, identity in ipcache.items():
        if network.version == ip.version and ip in network and (best is None or network.prefixlen > best[0]):
            best = (network.prefixlen, identity)
    return best[1] if best else ReservedIdentity.WORLD
