"""Policy computation without a kernel: selectors, port prefixes, deny precedence, lookups."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from weir.policy.v1 import policy_pb2 as pb

from services.common.datapath import Direction, ReservedIdentity
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.validate import Network
from services.policy.compute import (
    ANY,
    ICMP,
    ICMPV6,
    SCTP,
    TCP,
    UDP,
    EndpointView,
    NamedPort,
    PolicyComputer,
    lpm_identity,
    port_prefixes,
)
from services.policy.defs import ConfigFlag
from services.policy.maps import config_flags
from services.policy.rules import PeerRule, PortRule, Requirement, Rule, Selector, from_document, from_proto

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


# ---- Cilium's meanings (issue 10): protocols, default deny, entities, reserved labels, named ports, keys ----

NS_LABEL = "io.kubernetes.pod.namespace"
WEB_SEL = Selector((("app", "web"),))
DB_SEL = Selector((("app", "db"),))


def peer(*selectors: Selector, ports: tuple[PortRule, ...] = (), entities: tuple[str, ...] = ()) -> PeerRule:
    return PeerRule(endpoints=selectors, entities=entities, ports=ports)


def compute(
    *rules: Rule, endpoints: tuple[EndpointView, ...] = (WEB, DB, CLIENT), cidrs: dict[Network, int] | None = None
) -> PolicyComputer:
    return PolicyComputer(rules, endpoints, cidrs or {}, 1000)


def test_any_port_zero_is_tcp_udp_and_sctp_on_every_port_never_icmp() -> None:
    rule = Rule("any-port", DB_SEL, ingress=(peer(WEB_SEL, ports=(PortRule("ANY", 0, 65535),)),))
    db = compute(rule).endpoint(DB)
    assert {e.proto for e in db.entries} == {TCP, UDP, SCTP}  # no any-protocol (proto 0) entry
    for proto in (TCP, UDP, SCTP):
        assert db.lookup(Direction.INGRESS, WEB.identity, proto, 31337) is not None
    assert db.lookup(Direction.INGRESS, WEB.identity, ICMP, 8) is None
    assert db.lookup(Direction.INGRESS, WEB.identity, ICMPV6, 128) is None
    # a peer rule with no ports at all stays an L3 allow, ICMP included
    l3 = compute(Rule("l3", DB_SEL, ingress=(peer(WEB_SEL),))).endpoint(DB)
    assert [e.proto for e in l3.entries] == [ANY]
    assert l3.lookup(Direction.INGRESS, WEB.identity, ICMP, 8) is not None


def test_icmp_is_ipv4_only_icmpv6_is_ipv6_only_and_sctp_has_ports() -> None:
    rule = Rule("typed", DB_SEL, ingress=(
        peer(WEB_SEL, ports=(PortRule("ICMP", 8, 8), PortRule("ICMPV6", 128, 128), PortRule("SCTP", 9000, 9000))),
    ))  # fmt: skip
    db = compute(rule).endpoint(DB)
    assert db.lookup(Direction.INGRESS, WEB.identity, ICMP, 8) is not None
    assert db.lookup(Direction.INGRESS, WEB.identity, ICMPV6, 8) is None
    assert db.lookup(Direction.INGRESS, WEB.identity, ICMPV6, 128) is not None
    assert db.lookup(Direction.INGRESS, WEB.identity, ICMP, 128) is None
    assert db.lookup(Direction.INGRESS, WEB.identity, SCTP, 9000) is not None
    assert db.lookup(Direction.INGRESS, WEB.identity, TCP, 9000) is None
    assert sorted((e.proto, e.port) for e in db.entries) == [(ICMP, 8), (ICMPV6, 128), (SCTP, 9000)]


def test_enable_default_deny_false_makes_a_direction_default_allow_and_keeps_denies() -> None:
    client_sel = Selector((("app", "client"),))
    loose = Rule("loose", DB_SEL, ingress=(peer(WEB_SEL, ports=(PortRule("TCP", 80, 80),)),),
                 ingress_deny=(peer(client_sel, ports=(PortRule("TCP", 22, 22),)),),
                 default_deny_ingress=False)  # fmt: skip
    db = compute(loose).endpoint(DB)
    assert db.ingress_enforced and db.ingress_default_allow and not db.egress_enforced
    assert db.lookup(Direction.INGRESS, CLIENT.identity, TCP, 22).deny  # type: ignore[union-attr]
    flags = config_flags(db.ingress_enforced, db.egress_enforced, False, db.ingress_default_allow,
                         db.egress_default_allow)  # fmt: skip
    assert flags == ConfigFlag.INGRESS_ENFORCED | ConfigFlag.INGRESS_DEFAULT_ALLOW
    # one selecting rule with default deny (unset is true) turns it back on
    strict = Rule("strict", DB_SEL, ingress=(peer(client_sel, ports=(PortRule("TCP", 5432, 5432),)),))
    both = compute(loose, strict).endpoint(DB)
    assert both.ingress_enforced and not both.ingress_default_allow
    # default deny false for egress only leaves ingress default deny
    egress_loose = Rule("egress-loose", DB_SEL, ingress=(peer(WEB_SEL),), egress=(peer(WEB_SEL),),
                        default_deny_egress=False)  # fmt: skip
    eg = compute(egress_loose).endpoint(DB)
    assert eg.egress_default_allow and not eg.ingress_default_allow


def test_cluster_and_remote_node_entities() -> None:
    world = {ipaddress.ip_network("203.0.113.0/24"): 1 << 24 | 1}
    rule = Rule("cl", DB_SEL, ingress=(peer(entities=("cluster",)),), egress=(peer(entities=("remote-node",)),))
    db = compute(rule, cidrs=world).endpoint(DB)
    ingress = {e.identity for e in db.entries if e.direction is Direction.INGRESS}
    assert ingress == {WEB.identity, DB.identity, CLIENT.identity, ReservedIdentity.HOST, ReservedIdentity.REMOTE_NODE}
    assert {e.identity for e in db.entries if e.direction is Direction.EGRESS} == {ReservedIdentity.REMOTE_NODE}


def test_reserved_label_selectors_select_reserved_identities() -> None:
    cidr_id = 1 << 24 | 7
    cidrs = {ipaddress.ip_network("198.51.100.0/24"): cidr_id}
    rule = Rule("res", DB_SEL, ingress=(
        peer(Selector((("reserved:host", ""),)), ports=(PortRule("TCP", 22, 22),)),
        peer(Selector((("reserved:world", ""),)), ports=(PortRule("TCP", 443, 443),)),
        peer(Selector(), ports=(PortRule("TCP", 80, 80),)),  # an empty selector: endpoints only
    ))  # fmt: skip
    db = compute(rule, cidrs=cidrs).endpoint(DB)
    ssh = {e.identity for e in db.entries if e.covers(TCP, 22)}
    assert ssh == {ReservedIdentity.HOST}
    assert {e.identity for e in db.entries if e.covers(TCP, 443)} == {ReservedIdentity.WORLD, cidr_id}
    assert {e.identity for e in db.entries if e.covers(TCP, 80)} == {WEB.identity, DB.identity, CLIENT.identity}


def test_named_port_on_ingress_resolves_against_the_selected_endpoint() -> None:
    web = replace(WEB, named_ports=(NamedPort("http", 8080, "TCP"),))
    db = replace(DB, named_ports=(NamedPort("http", 9090, "TCP"),))
    rule = Rule(
        "http-in", Selector(), ingress=(peer(Selector((("app", "client"),)), ports=(PortRule("TCP", 0, 0, "http"),)),)
    )
    policies = compute(rule, endpoints=(web, db, CLIENT)).all()
    assert policies[web.id].lookup(Direction.INGRESS, CLIENT.identity, TCP, 8080) is not None
    assert policies[web.id].lookup(Direction.INGRESS, CLIENT.identity, TCP, 80) is None
    assert policies[db.id].lookup(Direction.INGRESS, CLIENT.identity, TCP, 9090) is not None
    assert policies[db.id].lookup(Direction.INGRESS, CLIENT.identity, TCP, 8080) is None
    # the client defines no "http": its ingress is enforced and allows nothing
    assert policies[CLIENT.id].ingress_enforced and not policies[CLIENT.id].entries
    # a UDP rule does not take a TCP named port
    udp_rule = Rule("http-udp", Selector(), ingress=(peer(ports=(PortRule("UDP", 0, 0, "http"),)),))
    assert not compute(udp_rule, endpoints=(web,)).endpoint(web).entries


def test_named_port_on_egress_resolves_per_destination_peer() -> None:
    web = replace(WEB, named_ports=(NamedPort("http", 8080, "TCP"),))
    db = replace(DB, named_ports=(NamedPort("http", 9090, "TCP"), NamedPort("dns", 53, "UDP")))
    rule = Rule("client-out", Selector((("app", "client"),)), egress=(
        peer(Selector(match_expressions=(Requirement("app", "In", frozenset({"web", "db"})),)),
             ports=(PortRule("ANY", 0, 0, "http"),)),
    ))  # fmt: skip
    client = compute(rule, endpoints=(web, db, CLIENT)).endpoint(CLIENT)
    assert client.lookup(Direction.EGRESS, web.identity, TCP, 8080) is not None
    assert client.lookup(Direction.EGRESS, web.identity, TCP, 9090) is None
    assert client.lookup(Direction.EGRESS, db.identity, TCP, 9090) is not None
    assert client.lookup(Direction.EGRESS, db.identity, TCP, 8080) is None
    assert sorted((e.identity, e.proto, e.port) for e in client.entries) == [
        (web.identity, TCP, 8080), (db.identity, TCP, 9090)
    ]  # fmt: skip
    # a name no endpoint defines allows nothing
    nothing = Rule("none", Selector((("app", "client"),)), egress=(peer(ports=(PortRule("TCP", 0, 0, "grpc"),)),))
    client = compute(nothing, endpoints=(web, db, CLIENT)).endpoint(CLIENT)
    assert client.egress_enforced and not client.entries


def test_specs_are_parts_of_one_rule_credited_to_its_key() -> None:
    second = Rule("multi", DB_SEL, ingress=(peer(WEB_SEL, ports=(PortRule("TCP", 5432, 5432),)),))
    rule = Rule("multi", WEB_SEL, ingress=(peer(Selector((("app", "client"),)), ports=(PortRule("TCP", 80, 80),)),),
                specs=(second,))  # fmt: skip
    policies = compute(rule).all()
    web_entry = policies[WEB.id].lookup(Direction.INGRESS, CLIENT.identity, TCP, 80)
    db_entry = policies[DB.id].lookup(Direction.INGRESS, WEB.identity, TCP, 5432)
    assert web_entry is not None and web_entry.rules == ("multi",)
    assert db_entry is not None and db_entry.rules == ("multi",)
    assert policies[DB.id].lookup(Direction.INGRESS, CLIENT.identity, TCP, 80) is None


def test_namespaced_rules_of_one_name_coexist_and_stay_in_their_namespace() -> None:
    prod_web = EndpointView("prod-web", 11, "198.18.1.1", "", {"app": "web", NS_LABEL: "prod"}, 400, "prod")
    prod_client = EndpointView("prod-client", 12, "198.18.1.2", "", {"app": "client", NS_LABEL: "prod"}, 401, "prod")
    dev_web = EndpointView("dev-web", 13, "198.18.1.3", "", {"app": "web", NS_LABEL: "dev"}, 402, "dev")
    dev_client = EndpointView("dev-client", 14, "198.18.1.4", "", {"app": "client", NS_LABEL: "dev"}, 403, "dev")

    def allow(ns: str, port: int) -> Rule:
        # as the parser leaves a namespaced rule: its selectors carry the namespace (Cilium's ParseToCiliumRule)
        here = ((NS_LABEL, ns),)
        return Rule("web-in", Selector((("app", "web"), *here)), namespace=ns, ingress=(
            peer(Selector((("app", "client"), *here)), ports=(PortRule("TCP", port, port),)),
        ))  # fmt: skip

    prod, dev = allow("prod", 80), allow("dev", 8080)
    assert (prod.key, dev.key) == ("prod/web-in", "dev/web-in")
    policies = compute(prod, dev, endpoints=(prod_web, prod_client, dev_web, dev_client)).all()
    entry = policies[prod_web.id].lookup(Direction.INGRESS, prod_client.identity, TCP, 80)
    assert entry is not None and entry.rules == ("prod/web-in",)
    assert policies[prod_web.id].lookup(Direction.INGRESS, dev_client.identity, TCP, 80) is None
    assert policies[prod_web.id].lookup(Direction.INGRESS, prod_client.identity, TCP, 8080) is None
    entry = policies[dev_web.id].lookup(Direction.INGRESS, dev_client.identity, TCP, 8080)
    assert entry is not None and entry.rules == ("dev/web-in",)
    assert not policies[prod_client.id].ingress_enforced
