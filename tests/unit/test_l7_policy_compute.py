"""Which policy entries go through the L7 proxy, and the listeners' rules, from the rules alone."""

from __future__ import annotations

import pytest
from weir.policy.v1 import policy_pb2 as pb

from services.common.datapath import Direction
from services.common.errors import InvalidArgument, Unimplemented
from services.policy.compute import EndpointPolicy, EndpointView, PolicyComputer
from services.policy.rules import from_proto

WEB = EndpointView("web", 1, "198.18.0.10", "", {"app": "web"}, 300)
CLIENT = EndpointView("client", 3, "198.18.0.12", "", {"app": "client"}, 302)
OTHER = EndpointView("other", 4, "198.18.0.13", "", {"app": "other"}, 303)
GET = pb.HttpRule(method="GET", path="/public")


def sel(**labels: str) -> pb.EndpointSelector:
    return pb.EndpointSelector(match_labels=labels)


def web_in(*peers: pb.PeerRule, name: str = "web-in") -> pb.Rule:
    return pb.Rule(name=name, endpoint_selector=sel(app="web"), ingress=list(peers))


def compute(*rules: pb.Rule, proxy: bool = True) -> EndpointPolicy:
    ports: dict[tuple[str, Direction, int], int] = {}

    def proxy_port(endpoint: str, direction: Direction, port: int) -> int:
        return ports.setdefault((endpoint, direction, port), 15000 + len(ports))

    computer = PolicyComputer([from_proto(r) for r in rules], [WEB, CLIENT, OTHER], {}, 1000,
                              proxy_port if proxy else None)  # fmt: skip
    return computer.endpoint(WEB)


def test_only_the_port_with_http_rules_goes_to_the_proxy_even_beside_a_port_of_the_same_rule() -> None:
    peer = pb.PeerRule(
        endpoints=[sel(app="client")],
        ports=[pb.PortRule(port=80, protocol="TCP", http=[GET]), pb.PortRule(port=81, protocol="TCP")],
    )
    policy = compute(web_in(peer))
    by_port = {e.port: e for e in policy.entries if e.identity == CLIENT.identity}
    assert by_port[80].l7 and by_port[80].proxy_port == 15000 and by_port[80].port_prefix == 16
    assert not by_port[81].l7 and by_port[81].proxy_port == 0
    (port,) = policy.l7_ports
    assert (port.direction, port.port) == (Direction.INGRESS, 80)
    assert [(r.name, r.http is not None, r.identities) for r in port.rules] == [
        ("web-in#1", True, frozenset({CLIENT.identity}))
    ]


def test_an_l4_only_allow_of_the_same_port_becomes_an_allow_all_rule_for_its_peers() -> None:
    l7 = pb.PeerRule(endpoints=[sel(app="client")], ports=[pb.PortRule(port=80, protocol="TCP", http=[GET])])
    l4 = pb.PeerRule(endpoints=[sel(app="other")], ports=[pb.PortRule(port=80, protocol="TCP")])
    policy = compute(web_in(l7), web_in(l4, name="web-l4"))
    entries = {e.identity: e for e in policy.entries if e.port == 80}
    assert entries[CLIENT.identity].l7 and not entries[OTHER.identity].l7  # the other peer goes direct
    rules = {r.name: r for r in policy.l7_ports[0].rules}
    assert rules["web-l4#1"].http is None and rules["web-l4#1"].identities == frozenset({OTHER.identity})


def test_http_rules_cover_tcp_only_and_never_a_port_range() -> None:
    """As Cilium's PortRule validation: L7 on ANY (or UDP) is refused, not narrowed to TCP silently."""
    any_proto = pb.PeerRule(ports=[pb.PortRule(port=53, protocol="ANY", http=[GET])])
    ranged = pb.PeerRule(ports=[pb.PortRule(port=8000, end_port=8010, protocol="TCP", http=[GET])])
    with pytest.raises(InvalidArgument, match="only apply to TCP"):
        compute(web_in(any_proto))
    with pytest.raises(Unimplemented, match="port range"):
        compute(web_in(ranged))


def test_a_deny_wins_over_an_l7_allow_and_sends_nothing_to_the_proxy() -> None:
    allow = pb.PeerRule(ports=[pb.PortRule(port=80, protocol="TCP", http=[GET])])
    deny = pb.PeerRule(endpoints=[sel(app="client")], ports=[pb.PortRule(port=80, protocol="TCP")])
    rule = pb.Rule(name="r", endpoint_selector=sel(app="web"), ingress=[allow], ingress_deny=[deny])
    policy = compute(rule)
    client = next(e for e in policy.entries if e.identity == CLIENT.identity and e.port == 80)
    assert client.deny and not client.l7 and client.proxy_port == 0


def test_without_a_proxy_port_source_l7_entries_carry_port_zero() -> None:
    peer = pb.PeerRule(ports=[pb.PortRule(port=80, protocol="TCP", http=[GET])])
    (entry,) = [e for e in compute(web_in(peer), proxy=False).entries if e.port == 80]
    assert entry.l7 and entry.proxy_port == 0
