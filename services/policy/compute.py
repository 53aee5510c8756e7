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
import ipaddress
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from services.common.datapath import Direction, ReservedIdentity
from services.common.errors import ResourceExhausted
from services.common.validate import Network
from services.policy.defs import PREFIX_IDENTITY, PREFIX_PROTO
from services.policy.rules import PeerRule, Rule

ANY = 0
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
PROTOCOL_NAMES = {0: "ANY", TCP: "TCP", UDP: "UDP", ICMP: "ICMP", ICMPV6: "ICMPv6"}


@dataclass(frozen=True)
class EndpointView:
    """What the policy needs of an endpoint (the orchestrator owns the rest)."""

    name: str
    id: int
    ipv4: str
    ipv6: str
    labels: dict[str, str] = field(hash=False, compare=False)
    identity: int = 0

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

    @property
    def key_prefixlen(self) -> int:
        return PREFIX_IDENTITY if self.proto == ANY else PREFIX_PROTO + self.port_prefix

    def covers(self, proto: int, port: int) -> bool:
        if self.proto == ANY:
            return True
        size = 1 << (16 - self.port_prefix)
        return self.proto == proto and self.port <= port < self.port + size


@dataclass(frozen=True)
class EndpointPolicy:
    endpoint: EndpointView
    ingress_enforced: bool
    egress_enforced: bool
    entries: tuple[MapEntry, ...]

    def enforced(self, direction: Direction) -> bool:
        return self.ingress_enforced if direction is Direction.INGRESS else self.egress_enforced

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
    rule: str


def port_prefixes(first: int, last: int, bits: int = 16) -> Iterator[tuple[int, int]]:
    """Cover [first, last] with the fewest (value, prefix length) pairs."""
    while first <= last:
        size = first & -first if first else 1 << bits
        while size > last - first + 1:
            size >>= 1
        yield first, bits - size.bit_length() + 1
        first += size


def _protocols(peer: PeerRule) -> Iterator[tuple[int, int, int]]:
    if not peer.ports:
        yield ANY, 0, 65535
        return
    for p in peer.ports:
        if p.protocol == "ANY":
            if (p.first, p.last) == (0, 65535):
                yield ANY, 0, 65535
            else:
                yield TCP, p.first, p.last
                yield UDP, p.first, p.last
        elif p.protocol == "ICMP":
            yield ICMP, p.first, p.last
            yield ICMPV6, p.first, p.last
        else:
            yield (TCP if p.protocol == "TCP" else UDP), p.first, p.last


class PolicyComputer:
    """Rules + endpoints + CIDR identities -> policy map contents.

    `cidr_identities` are the node's CIDR identities (all of them: "world" and a
    rule's CIDR select every CIDR identity inside it, whoever asked for it).
    """

    def __init__(
        self,
        rules: Iterable[Rule],
        endpoints: Iterable[EndpointView],
        cidr_identities: dict[Network, int],
        capacity: int,
    ) -> None:
        self.rules = sorted(rules, key=lambda r: r.name)
        self.endpoints = sorted(endpoints, key=lambda e: e.name)
        self.cidr_identities = cidr_identities
        self.capacity = capacity
        self._cidrs = _CidrIndex(cidr_identities)
        self._by_selector: dict[object, set[int]] = {}

    def _peer_identities(self, peer: PeerRule) -> frozenset[int] | None:
        if peer.any_peer or "all" in peer.entities:
            return None
        ids: set[int] = set()
        for selector in peer.endpoints:
            if selector not in self._by_selector:
                self._by_selector[selector] = {ep.identity for ep in self.endpoints if selector.matches(ep.labels)}
            ids |= self._by_selector[selector]
        if "host" in peer.entities:
            ids.add(ReservedIdentity.HOST)
        if "world" in peer.entities:
            ids.add(ReservedIdentity.WORLD)
            ids |= set(self.cidr_identities.values())
        for c in peer.cidrs:
            excluded = {i for e in c.excepts for i in self._cidrs.within(e)}
            ids |= self._cidrs.within(c.network) - excluded
        return frozenset(ids)

    def _grants(self, rules: list[Rule], direction: Direction) -> list[Grant]:
        grants = []
        for rule in rules:
            allow, deny = (
                (rule.ingress, rule.ingress_deny) if direction is Direction.INGRESS else (rule.egress, rule.egress_deny)
            )
            for peers, is_deny in ((allow, False), (deny, True)):
                for peer in peers:
                    ids = self._peer_identities(peer)
                    if ids is not None and not ids:
                        continue
                    for proto, first, last in _protocols(peer):
                        grants.append(Grant(ids, proto, first, last, is_deny, rule.name))
        return grants

    @staticmethod
    def _table(direction: Direction, identity: int, relevant: list[Grant]) -> Iterator[MapEntry]:
        any_deny = [g for g in relevant if g.proto == ANY and g.deny]
        any_allow = [g for g in relevant if g.proto == ANY and not g.deny]
        if any_deny:
            yield MapEntry(direction, identity, ANY, 0, 0, True, tuple(sorted({g.rule for g in any_deny})))
            return
        if any_allow:
            yield MapEntry(direction, identity, ANY, 0, 0, False, tuple(sorted({g.rule for g in any_allow})))
        for proto in sorted({g.proto for g in relevant if g.proto != ANY}):
            segments = _segments([g for g in relevant if g.proto == proto], skip_allows=bool(any_allow))
            for first, last, deny, names in segments:
                for port, plen in port_prefixes(first, last):
                    yield MapEntry(direction, identity, proto, port, plen, deny, names)

    def endpoint(self, ep: EndpointView) -> EndpointPolicy:
        selecting = [r for r in self.rules if r.selector.matches(ep.labels)]
        enforced = {
            Direction.INGRESS: any(r.ingress or r.ingress_deny for r in selecting),
            Direction.EGRESS: any(r.egress or r.egress_deny for r in selecting),
        }
        entries: list[MapEntry] = []
        for direction in Direction:
            if not enforced[direction]:
                continue
            grants = self._grants(selecting, direction)
            every = [g for g in grants if g.identities is None]
            by_identity: dict[int, list[Grant]] = {}
            for g in grants:
                for i in g.identities or ():
                    by_identity.setdefault(i, []).append(g)
            entries.extend(self._table(direction, ANY, every))
            for identity in sorted(by_identity):
                relevant = by_identity[identity] if not every else [*every, *by_identity[identity]]
                entries.extend(self._table(direction, identity, relevant))
        if len(entries) > self.capacity:
            raise ResourceExhausted(
                f"endpoint {ep.name} would need {len(entries)} policy map entries; its map holds "
                f"{self.capacity} (restart the policy service with a larger --policy-entries, or use "
                "fewer port ranges and peers)"
            )
        return EndpointPolicy(ep, enforced[Direction.INGRESS], enforced[Direction.EGRESS], tuple(entries))

    def all(self) -> dict[int, EndpointPolicy]:
        return {ep.id: self.endpoint(ep) for ep in self.endpoints}


def _segments(grants: list[Grant], skip_allows: bool) -> list[tuple[int, int, bool, tuple[str, ...]]]:
    """Port intervals with their verdict (deny wins) and rules, by one sweep over the grants.

    Neighbouring intervals are joined only when the same rules decide them, so an entry
    (and Trace, and the hit counters) credits exactly the rules that cover its ports.

    With `skip_allows`, allowed intervals are left out: an any-protocol allow
    entry already covers them.
    """
    starts: dict[int, list[Grant]] = {}
    ends: dict[int, list[Grant]] = {}
    for g in grants:
        starts.setdefault(g.first, []).append(g)
        ends.setdefault(g.last + 1, []).append(g)
    active: collections.Counter[tuple[bool, str]] = collections.Counter()
    out: list[tuple[int, int, bool, tuple[str, ...]]] = []
    cuts = sorted(starts.keys() | ends.keys())
    for start, end in itertools.pairwise(cuts):
        for g in ends.get(start, []):
            active[(g.deny, g.rule)] -= 1
            if not active[(g.deny, g.rule)]:
                del active[(g.deny, g.rule)]
        for g in starts.get(start, []):
            active[(g.deny, g.rule)] += 1
        denies = sorted(rule for deny, rule in active if deny)
        allows = sorted(rule for deny, rule in active if not deny)
        if denies:
            verdict, names = True, tuple(denies)
        elif allows and not skip_allows:
            verdict, names = False, tuple(allows)
        else:
            continue
        if out and out[-1][1] == start - 1 and out[-1][2:] == (verdict, names):
            out[-1] = (out[-1][0], end - 1, verdict, names)
        else:
            out.append((start, end - 1, verdict, names))
    return out


class _CidrIndex:
    """CIDR identities sorted by address, to find those inside a prefix by bisection."""

    def __init__(self, identities: dict[Network, int]) -> None:
        rows = sorted((n.version, int(n.network_address), n.prefixlen, i) for n, i in identities.items())
        self._rows = rows
        self._keys = [(v, a) for v, a, _, _ in rows]

    def within(self, network: Network) -> set[int]:
        first = int(network.network_address)
        last = int(network.broadcast_address)
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
