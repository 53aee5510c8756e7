"""Policy computation without a kernel: selectors, port prefixes, deny precedence, lookups."""

from __future__ import annotations

import ipaddress

import pytest
from weir.policy.v1 import policy_pb2 as pb

from services.common.datapath import Direction, ReservedIdentity
from services.common.errors import InvalidArgument, ResourceExhausted
from services.policy.compute import ICMP, TCP, UDP, EndpointView, PolicyComputer, lpm_identity, port_prefixes
from services.policy.rules import from_document, from_proto

WEB = EndpointView("web", 1, "198.18.0.10", "", {"app": "web"}, 300)
DB = EndpointView("db", 2, "198.18.0.11", "", {"app": "db", "tier": "data"}, 301)
CLIENT = EndpointView("client", 3, "198.18.0.12", "", {"app": "client"}, 302)


def sel(**labels: str) -> pb.EndpointSelector:
    return pb.EndpointSelector(match_labels=labels)


def computer(*rules: pb.Rule, capacity: int = 1000) -> PolicyComputer:
    parsed = [from_proto(r) for r in rules]
    cidrs = {n: 1 << 24 | i for i, n in enumerate(sorted({c for r in parsed for c in r.cidrs()}, key=str))}
    return PolicyComputer(parsed, [WEB, DB, CLIENT], cidrs, capacity)


@pytest.mark.parametrize(
    ("first", "last", "expected"),
    [
        (80, 80, [(80, 16)]),
        (0, 65535, [(0, 0)]),
        (8000, 8003, [(8000, 14)]),
        (1, 4, [(1, 16), (2, 15), (4, 16)]),
        (0, 255, [(0, 8)]),
    ],
)
def test_port_ranges_become_prefixes(first: int, last: int, expected: list[tuple[int, int]]) -> None:
    assert list(port_prefixes(first, last)) == expected


def test_every_port_of_a_range_is_covered_exactly() -> None:
    covered: set[int] = set()
    for port, plen in port_prefixes(1000, 2999):
        size = 1 << (16 - plen)
        assert not covered & set(range(port, port + size))
        covered |= set(range(port, port + size))
    assert covered == set(range(1000, 3000))


def test_unselected_endpoint_is_not_enforced_and_selected_one_denies_by_default() -> None:
    rule = pb.Rule(
        name="db-in",
        endpoint_selector=sel(app="db"),
        ingress=[pb.PeerRule(endpoints=[sel(app="web")], ports=[pb.PortRule(port=5432, protocol="TCP")])],
    )
    policies = computer(rule).all()
    assert not policies[WEB.id].ingress_enforced and not policies[WEB.id].egress_enforced
    db = policies[DB.id]
    assert db.ingress_enforced and not db.egress_enforced
    assert db.lookup(Direction.INGRESS, WEB.identity, TCP, 5432).deny is False  # type: ignore[union-attr]
    assert db.lookup(Direction.INGRESS, WEB.identity, TCP, 5433) is None
    assert db.lookup(Direction.INGRESS, CLIENT.identity, TCP, 5432) is None


def test_deny_wins_over_a_more_specific_allow() -> None:
    allow = pb.Rule(
        name="allow-web",
        endpoint_selector=sel(app="db"),
        ingress=[pb.PeerRule(endpoints=[sel(app="web")], ports=[pb.PortRule(port=5432, protocol="TCP")])],
    )
    deny = pb.Rule(
        name="deny-range",
        endpoint_selector=sel(tier="data"),
        ingress_deny=[pb.PeerRule(entities=["all"], ports=[pb.PortRule(port=5000, end_port=6000, protocol="TCP")])],
    )
    db = computer(allow, deny).endpoint(DB)
    hit = db.lookup(Direction.INGRESS, WEB.identity, TCP, 5432)
    assert hit is not None and hit.deny and hit.rules == ("deny-range",)


def test_any_protocol_allow_does_not_hide_a_port_deny() -> None:
    allow = pb.Rule(
        name="allow-all-web", endpoint_selector=sel(app="db"), ingress=[pb.PeerRule(endpoints=[sel(app="web")])]
    )
    deny = pb.Rule(
        name="deny-53",
        endpoint_selector=sel(app="db"),
        ingress_deny=[pb.PeerRule(ports=[pb.PortRule(port=53, protocol="UDP")])],
    )
    db = computer(allow, deny).endpoint(DB)
    assert db.lookup(Direction.INGRESS, WEB.identity, UDP, 53).deny  # type: ignore[union-attr]
    assert not db.lookup(Direction.INGRESS, WEB.identity, UDP, 54).deny  # type: ignore[union-attr]
    assert not db.lookup(Direction.INGRESS, WEB.identity, ICMP, 8).deny  # type: ignore[union-attr]
    assert db.lookup(Direction.INGRESS, CLIENT.identity, UDP, 53).deny  # type: ignore[union-attr]
    assert db.lookup(Direction.INGRESS, CLIENT.identity, UDP, 54) is None


def test_cidr_except_and_world() -> None:
    rule = pb.Rule(
        name="from-net",
        endpoint_selector=sel(app="web"),
        ingress=[
            pb.PeerRule(cidrs=[pb.CidrRule(cidr="203.0.113.0/24", **{"except": ["203.0.113.8/32"]})]),
        ],
    )
    c = computer(rule)
    # the ipcache as the orchestrator writes it: CIDR identities, the host, endpoints
    ipcache = {**c.cidr_identities, ipaddress.ip_network("192.0.2.1/32"): ReservedIdentity.HOST}
    ipcache |= {ipaddress.ip_network(ep.ipv4): ep.identity for ep in (WEB, DB, CLIENT)}
    allowed_id, except_id = lpm_identity(ipcache, "203.0.113.7"), lpm_identity(ipcache, "203.0.113.8")
    assert allowed_id != except_id and lpm_identity(ipcache, "198.51.100.9") == ReservedIdentity.WORLD
    web = c.endpoint(WEB)
    assert web.lookup(Direction.INGRESS, allowed_id, TCP, 80) is not None
    assert web.lookup(Direction.INGRESS, except_id, TCP, 80) is None
    assert lpm_identity(ipcache, "192.0.2.1") == ReservedIdentity.HOST
    assert lpm_identity(ipcache, DB.ipv4) == DB.identity


def test_selectors_with_expressions() -> None:
    rule = pb.Rule(
        name="exp",
        endpoint_selector=pb.EndpointSelector(
            match_expressions=[
                pb.LabelRequirement(key="app", operator="In", values=["web", "db"]),
                pb.LabelRequirement(key="tier", operator="DoesNotExist"),
            ]
        ),
        egress=[pb.PeerRule(entities=["world"])],
    )
    policies = computer(rule).all()
    assert [p.endpoint.name for p in policies.values() if p.egress_enforced] == ["web"]


def test_overflowing_an_endpoint_map_is_refused() -> None:
    ports = [pb.PortRule(port=p, protocol="TCP") for p in range(1000, 1100, 2)]
    rule = pb.Rule(name="many", endpoint_selector=sel(app="db"), ingress=[pb.PeerRule(ports=ports)])
    with pytest.raises(ResourceExhausted, match="endpoint db would need 50 policy map entries; its map holds 10"):
        computer(rule, capacity=10).all()


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (pb.Rule(name="x", ingress=[pb.PeerRule(ports=[pb.PortRule(port=70000)])]), "port 70000 is above 65535"),
        (
            pb.Rule(name="x", ingress=[pb.PeerRule(ports=[pb.PortRule(port=90, end_port=80)])]),
            "end_port 80 is below port 90",
        ),
        (
            pb.Rule(name="x", ingress=[pb.PeerRule(ports=[pb.PortRule(port=1, protocol="GRE")])]),
            "protocol 'GRE' is not one of",
        ),
        (pb.Rule(name="x", ingress=[pb.PeerRule(cidrs=[pb.CidrRule(cidr="10.0.0.0/33")])]), "out of range"),
        (
            pb.Rule(
                name="x",
                endpoint_selector=pb.EndpointSelector(
                    match_expressions=[pb.LabelRequirement(key="app", operator="Matches", values=["a"])]
                ),
            ),
            "operator 'Matches'",
        ),
        (pb.Rule(name="x", endpoint_selector=sel(**{"bad key!": "v"})), "not a valid label key"),
        (pb.Rule(name="Bad_Name"), "rule name 'Bad_Name' is invalid"),
        (pb.Rule(name="x", ingress=[pb.PeerRule(entities=["galaxy"])]), "entity 'galaxy'"),
    ],
)
def test_bad_rules_say_where(rule: pb.Rule, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        from_proto(rule)


def test_cilium_style_yaml_imports() -> None:
    doc = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-policy}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  - fromCIDRSet: [{cidr: 203.0.113.0/24, except: [203.0.113.8/32]}]
  egressDeny:
  - toEntities: [world]
"""
    [rule] = [from_proto(r) for r in from_document(doc)]
    # a CiliumNetworkPolicy without metadata.namespace is in "default", as kubectl would put it
    assert rule.name == "db-policy" and rule.key == "default/db-policy"
    assert rule.selector.matches({"app": "db", "io.kubernetes.pod.namespace": "default"})
    assert not rule.selector.matches({"app": "db"})
    assert rule.ingress[0].ports[0].first == 5432 and rule.ingress[1].cidrs[0].excepts
    assert rule.egress_deny[0].entities == ("world",)


@pytest.mark.parametrize("deny", [False, True])
def test_an_entry_credits_only_the_rules_covering_its_ports(deny: bool) -> None:
    section = "ingress_deny" if deny else "ingress"
    rules = [
        pb.Rule(name=f"p{port}", endpoint_selector=sel(app="db"),
                **{section: [pb.PeerRule(endpoints=[sel(app="web")],  # type: ignore[arg-type]
                                         ports=[pb.PortRule(port=port, protocol="TCP")])]})
        for port in (1000, 1001)
    ]  # fmt: skip
    rules.append(
        pb.Rule(
            name="range",
            endpoint_selector=sel(app="db"),
            ingress=[
                pb.PeerRule(
                    endpoints=[sel(app="client")], ports=[pb.PortRule(port=2000, end_port=2003, protocol="TCP")]
                )
            ],
        )
    )
    db = computer(*rules).all()[DB.id]
    for port in (1000, 1001):
        entry = db.lookup(Direction.INGRESS, WEB.identity, TCP, port)
        assert entry is not None and entry.deny is deny and entry.rules == (f"p{port}",), entry
    assert db.lookup(Direction.INGRESS, CLIENT.identity, TCP, 2002).rules == ("range",)  # type: ignore[union-attr]
    assert sum(1 for e in db.entries if e.identity == CLIENT.identity) == 1  # one rule's range stays one prefix
