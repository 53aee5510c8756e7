"""The CiliumNetworkPolicy language: every field implemented as Cilium means it, or refused by name.

Each case is a small CNP/CCNP document and what it must become (or the status it must be
refused with, and the field the message must name). The documents follow Cilium's policy
language docs (https://docs.cilium.io/en/stable/security/policy/language/), its
Kubernetes policy docs (https://docs.cilium.io/en/stable/network/kubernetes/policy/) and
the code they describe (cilium/cilium: pkg/policy/api/*.go, rule_validation.go,
pkg/k8s/apis/cilium.io/utils/utils.go).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from weir.policy.v1 import policy_pb2 as pb

from services.common.errors import InvalidArgument, Unimplemented, WeirError
from services.policy import cnp
from services.policy.rules import (
    HttpHeaderMatch,
    HttpRule,
    PortRule,
    Rule,
    cidr_count,
    from_document,
    from_proto,
    to_proto,
)

LANGUAGE = "https://docs.cilium.io/en/stable/security/policy/language/"
K8S_POLICY = "https://docs.cilium.io/en/stable/network/kubernetes/policy/"
NS = "k8s:io.kubernetes.pod.namespace"


def doc(
    spec: Any = None,
    *,
    kind: str | None = "CiliumNetworkPolicy",
    namespace: str | None = "prod",
    specs: Any = None,
    **extra: Any,
) -> str:
    """A policy object as JSON (YAML's subset), so every value is exactly what the case wrote."""
    obj: dict[str, Any] = {"apiVersion": "cilium.io/v2", "metadata": {"name": "p"}, **extra}
    if kind is not None:
        obj["kind"] = kind
    if namespace is not None:
        obj["metadata"]["namespace"] = namespace
    if spec is not None:
        obj["spec"] = spec
    if specs is not None:
        obj["specs"] = specs
    return json.dumps(obj)


def ingress(*peers: Any, selector: Any = None) -> dict[str, Any]:
    return {"endpointSelector": {} if selector is None else selector, "ingress": list(peers)}


def egress(*peers: Any, selector: Any = None) -> dict[str, Any]:
    return {"endpointSelector": {} if selector is None else selector, "egress": list(peers)}


def parse(text: str) -> list[Rule]:
    rules = [from_proto(m) for m in from_document(text)]
    for rule in rules:  # what is stored reloads to the same rule
        assert from_proto(to_proto(rule)) == rule
    return rules


def one(text: str) -> Rule:
    [rule] = parse(text)
    return rule


def ports(text: str) -> tuple[PortRule, ...]:
    rule = one(text)
    return (rule.ingress or rule.egress)[0].ports


# ---- accepted documents and the rules they become ----


def _namespaced_l3() -> None:
    # LANGUAGE#endpoints-based: role=frontend may reach role=backend, in the policy's namespace
    rule = one(
        doc(
            ingress(
                {"fromEndpoints": [{"matchLabels": {"role": "frontend"}}]},
                selector={"matchLabels": {"role": "backend"}},
            )
        )
    )
    assert (rule.namespace, rule.key) == ("prod", "prod/p")
    assert rule.selector.matches({"role": "backend", "io.kubernetes.pod.namespace": "prod"})
    assert not rule.selector.matches({"role": "backend", "io.kubernetes.pod.namespace": "dev"})
    assert not rule.selector.matches({"role": "backend"})
    [peer] = rule.ingress[0].endpoints
    assert peer.matches({"role": "frontend", "io.kubernetes.pod.namespace": "prod"})
    assert not peer.matches({"role": "frontend", "io.kubernetes.pod.namespace": "dev"})


def _default_namespace() -> None:
    # a CNP applied without a namespace lands in kubectl's "default"
    rule = one(doc(ingress({}), namespace=None))
    assert rule.key == "default/p" and rule.selector.matches({"io.kubernetes.pod.namespace": "default"})


def _peer_in_other_namespace() -> None:
    # K8S_POLICY (namespaces): a peer selector naming the namespace label keeps it
    for key in (NS, "io.kubernetes.pod.namespace", "any:io.kubernetes.pod.namespace"):
        rule = one(doc(ingress({"fromEndpoints": [{"matchLabels": {key: "dev", "app": "x"}}]})))
        [peer] = rule.ingress[0].endpoints
        assert peer.matches({"app": "x", "io.kubernetes.pod.namespace": "dev"}), key
        assert not peer.matches({"app": "x", "io.kubernetes.pod.namespace": "prod"}), key
    expr = {"key": NS, "operator": "In", "values": ["dev", "qa"]}
    [peer] = one(doc(ingress({"fromEndpoints": [{"matchExpressions": [expr]}]}))).ingress[0].endpoints
    assert peer.matches({"io.kubernetes.pod.namespace": "qa"})


def _empty_peer_in_namespace() -> None:
    # fromEndpoints: [{}] in a CNP selects every pod of the policy's namespace only
    [peer] = one(doc(ingress({"fromEndpoints": [{}]}))).ingress[0].endpoints
    assert peer.matches({"io.kubernetes.pod.namespace": "prod"})
    assert not peer.matches({"io.kubernetes.pod.namespace": "dev"})
    assert not peer.matches({"reserved:world": ""})


def _reserved_peer_not_namespaced() -> None:
    # utils.go getEndpointSelector: selectors on reserved labels get no namespace
    [peer] = one(doc(ingress({"fromEndpoints": [{"matchLabels": {"reserved:host": ""}}]}))).ingress[0].endpoints
    assert peer.matches({"reserved:host": ""}) and not peer.matches({"host": ""})
    [peer] = one(doc(ingress({"fromEndpoints": [{"matchLabels": {"$host": ""}}]}))).ingress[0].endpoints
    assert peer.match_labels == (("reserved:host", ""),)


def _namespace_labels_peer() -> None:
    # a peer selecting by namespace labels spans namespaces (no namespace added)
    key = "io.cilium.k8s.namespace.labels.team"
    [peer] = one(doc(ingress({"fromEndpoints": [{"matchLabels": {key: "a"}}]}))).ingress[0].endpoints
    assert peer.matches({key: "a", "io.kubernetes.pod.namespace": "dev"})


def _ccnp_peers_are_pods() -> None:
    # utils.go: a clusterwide policy's peer selectors need the namespace label (pods, not reserved identities)
    rule = one(doc(egress({"toEndpoints": [{}]}), kind="CiliumClusterwideNetworkPolicy", namespace=None))
    assert rule.namespace == "" and rule.key == "p" and rule.selector.matches({"anything": "x"})
    [peer] = rule.egress[0].endpoints
    assert peer.matches({"io.kubernetes.pod.namespace": "dev"}) and not peer.matches({"reserved:world": ""})


def _ccnp_init_subject() -> None:
    # utils.go matchesPodInit: a clusterwide policy for reserved:init leaves its peers as written
    spec = egress({"toEndpoints": [{}]}, selector={"matchLabels": {"reserved:init": ""}})
    [peer] = one(doc(spec, kind="CiliumClusterwideNetworkPolicy", namespace=None)).egress[0].endpoints
    assert peer.matches({"reserved:world": ""})


def _plain_rule() -> None:
    # no kind: Weir's plain cluster-wide rule, selectors as written (as a rule message)
    [peer] = one(doc(ingress({"fromEndpoints": [{}]}), kind=None, namespace=None)).ingress[0].endpoints
    assert peer.matches({"reserved:world": ""})


def _specs() -> None:
    # CNP `specs:` (K8S_POLICY): one policy, several specs, each with its own selector and default deny
    rule = one(
        doc(
            ingress({}, selector={"matchLabels": {"a": "1"}}),
            specs=[
                {
                    **egress({}, selector={"matchLabels": {"b": "2"}}),
                    "enableDefaultDeny": {"egress": False},
                    "description": "second",
                }
            ],
        )
    )
    first, second = rule.parts()
    assert first.name == second.name == "p" and first.namespace == second.namespace == "prod"
    assert first.ingress and not first.egress and second.egress and not second.ingress
    assert second.selector.matches({"b": "2", "io.kubernetes.pod.namespace": "prod"})
    assert (second.default_deny_ingress, second.default_deny_egress, second.description) == (True, False, "second")
    only = one(doc(specs=[ingress({}), egress({})]))
    assert len(only.parts()) == 2 and only.ingress and only.specs[0].egress


def _default_deny() -> None:
    # LANGUAGE (enableDefaultDeny): unset is true per direction
    rule = one(doc({**ingress({}), "enableDefaultDeny": {"ingress": False}}))
    assert (rule.default_deny_ingress, rule.default_deny_egress) == (False, True)
    rule = one(doc(ingress({})))
    assert (rule.default_deny_ingress, rule.default_deny_egress) == (True, True)


def _label_sources() -> None:
    # labels.ParseSelectLabel: a key without a source is any; an endpoint's key without one is k8s
    def peer(key: str) -> Any:
        [selector] = (
            one(doc(ingress({"fromEndpoints": [{"matchLabels": {key: "x", NS: "prod"}}]}))).ingress[0].endpoints
        )
        return selector

    for key in ("app", "any:app"):
        assert all(peer(key).matches({k: "x", NS: "prod"}) for k in ("app", "k8s:app", "container:app")), key
    assert peer("k8s:app").matches({"app": "x", NS: "prod"}) and peer("k8s:app").matches({"k8s:app": "x", NS: "prod"})
    assert not peer("k8s:app").matches({"container:app": "x", NS: "prod"})
    assert peer("container:app").matches({"container:app": "x", NS: "prod"})
    assert not peer("container:app").matches({"app": "x", NS: "prod"})


def _icmps() -> None:
    # LANGUAGE#icmp-icmpv6 and icmp.go: family defaults to IPv4; names per family
    fields = [
        {"type": 8},
        {"type": "EchoRequest", "family": "IPv6"},
        {"type": "3"},
        {"type": "PacketTooBig", "family": "IPv6"},
        {"type": "Timestamp", "family": "IPv4"},
        {"type": "EchoReply"},  # type 0 is that type alone, not every type
    ]
    got = ports(doc(egress({"icmps": [{"fields": fields}]})))
    assert [(p.protocol, p.first, p.last) for p in got] == [
        ("ICMP", 8, 8),
        ("ICMPV6", 128, 128),
        ("ICMP", 3, 3),
        ("ICMPV6", 2, 2),
        ("ICMP", 13, 13),
        ("ICMP", 0, 0),
    ]


def _to_ports() -> None:
    # LANGUAGE#layer-4-examples: numbers (strings or not), ranges, names, port 0, protocols in any case
    spec = ingress(
        {
            "toPorts": [
                {
                    "ports": [
                        {"port": "80", "protocol": "TCP"},
                        {"port": 53, "protocol": "udp"},
                        {"port": "8000", "endPort": 8080},
                        {"port": "HTTP-alt", "protocol": "TCP"},
                        {"port": "0", "protocol": "ANY"},
                        {"port": "9", "protocol": "SCTP"},
                        {"port": "0x10"},
                        {"port": "443", "endPort": 443},
                    ]
                }
            ]
        }
    )
    assert ports(doc(spec)) == (
        PortRule("TCP", 80, 80),
        PortRule("UDP", 53, 53),
        PortRule("ANY", 8000, 8080),
        PortRule("TCP", 0, 0, "http-alt"),
        PortRule("ANY", 0, 65535),
        PortRule("SCTP", 9, 9),
        PortRule("ANY", 0, 0, "0x10"),
        PortRule("ANY", 443, 443),
    )


def _l7_http() -> None:
    # LANGUAGE#layer-7-examples (HTTP): method and path, headers as "Name" or "Name: value", an empty
    # rule allowing every request, headerMatches (name and value), host; ports named or numbered, TCP.
    spec = ingress(
        {
            "fromEndpoints": [{"matchLabels": {"org": "empire"}}],
            "toPorts": [
                {
                    "ports": [{"port": "80", "protocol": "TCP"}, {"port": "http", "protocol": "tcp"}],
                    "rules": {
                        "http": [
                            {"method": "GET", "path": "/public"},
                            {"method": "PUT", "path": "/avatar", "headers": ["X-My-Header: true", "X-Present"]},
                            {},
                            {
                                "host": "api\\.example\\.com",
                                "headerMatches": [{"name": "x-token", "value": "s"}, {"name": "x-any"}],
                            },
                        ]
                    },
                }
            ],
        }
    )
    expected = (
        HttpRule("GET", "/public"),
        HttpRule("PUT", "/avatar", "", (HttpHeaderMatch("X-My-Header", "true"), HttpHeaderMatch("X-Present"))),
        HttpRule(),
        HttpRule("", "", "api\\.example\\.com", (HttpHeaderMatch("x-token", "s"), HttpHeaderMatch("x-any"))),
    )
    assert ports(doc(spec)) == (PortRule("TCP", 80, 80, "", expected), PortRule("TCP", 0, 0, "http", expected))


def _entities() -> None:
    # LANGUAGE#entities-based and entity.go: the entities this node has identities for
    peer = one(doc(egress({"toEntities": ["host", "world", "all", "cluster", "remote-node"]}))).egress[0]
    assert peer.entities == ("host", "world", "all", "cluster", "remote-node")


def _cidrs() -> None:
    # LANGUAGE#ip-cidr-based
    rule = one(
        doc(egress({"toCIDR": ["192.0.2.0/24"]}, {"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.96.0.0/12"]}]}))
    )
    assert str(rule.egress[0].cidrs[0].network) == "192.0.2.0/24"
    assert [str(e) for e in rule.egress[1].cidrs[0].excepts] == ["10.96.0.0/12"]


def _deny_sections() -> None:
    # LANGUAGE#deny-policies: ingressDeny and egressDeny with ports (PortDenyRule) and ICMP
    rule = one(
        doc(
            {
                "endpointSelector": {},
                "ingressDeny": [{"fromEntities": ["world"], "toPorts": [{"ports": [{"port": "22"}]}]}],
                "egressDeny": [{"icmps": [{"fields": [{"type": 8}]}]}],
            }
        )
    )
    assert rule.ingress_deny[0].ports == (PortRule("ANY", 22, 22),) and rule.egress_deny[0].ports[0].protocol == "ICMP"


def _ignored_metadata() -> None:
    # fields that only identify or annotate a policy: accepted, no effect on the rule
    plain = one(doc(ingress({})))
    text = doc(
        {
            **ingress({}),
            "labels": [{"key": "team", "value": "a", "source": "k8s"}, "k8s:x=y"],
            "log": {"value": "audit-me"},
            "description": "why",
        },
        status={"conditions": []},
    )
    obj = json.loads(text)
    obj["metadata"].update(labels={"a": "b"}, annotations={"x": "y"}, uid="1", resourceVersion="7", generation=3)
    rule = one(json.dumps(obj))
    assert rule == Rule(**{**plain.__dict__, "description": "why"})


def _empty_refused_fields() -> None:
    # a refused field written out empty asks for nothing
    assert one(doc(egress({"toFQDNs": [], "toServices": None, "toEndpoints": [{}]})))


def _lists() -> None:
    # kubectl get -o yaml output: a List, or a typed list whose items may leave kind out
    items = [json.loads(doc(ingress({}))), {**json.loads(doc(ingress({}))), "metadata": {"name": "q"}}]
    assert [r.key for r in parse(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))] == [
        "prod/p",
        "default/q",
    ]
    items = [{"metadata": {"name": "c"}, "spec": ingress({})}]
    [rule] = parse(json.dumps({"kind": "CiliumClusterwideNetworkPolicyList", "items": items}))
    assert rule.key == "c"


ACCEPTED: dict[str, Callable[[], None]] = {
    f.__name__.lstrip("_"): f
    for f in (
        _namespaced_l3,
        _default_namespace,
        _peer_in_other_namespace,
        _empty_peer_in_namespace,
        _reserved_peer_not_namespaced,
        _namespace_labels_peer,
        _ccnp_peers_are_pods,
        _ccnp_init_subject,
        _plain_rule,
        _specs,
        _default_deny,
        _label_sources,
        _icmps,
        _to_ports,
        _l7_http,
        _entities,
        _cidrs,
        _deny_sections,
        _ignored_metadata,
        _empty_refused_fields,
        _lists,
    )
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_an_implemented_field_means_what_it_means_in_cilium(case: str) -> None:
    ACCEPTED[case]()


# ---- refused documents: status and the place the message names ----

UNIMP, INVAL = Unimplemented, InvalidArgument
PORTS = [{"ports": [{"port": "80", "protocol": "TCP"}]}]
SEL = {"matchLabels": {"app": "x"}}
REFUSED: dict[str, tuple[str, type[WeirError], str]] = {
    # known to Cilium, not implemented by this node (UNIMPLEMENTED, the field named). The fields are those of
    # pkg/policy/api rule.go (nodeSelector: LANGUAGE#host-policies), egress.go (toFQDNs: LANGUAGE#dns-based,
    # toServices: LANGUAGE#services-based, toGroups), ingress.go, l4.go (rules: LANGUAGE#layer-7-examples,
    # serverNames, listener, TLS), cidr.go (cidrGroupRef), entity.go; extended protocols: rule_validation.go
    "host policy": (
        doc({"nodeSelector": {}, "ingress": [{}]}, kind="CiliumClusterwideNetworkPolicy", namespace=None),
        UNIMP,
        "spec.nodeSelector",
    ),
    "toFQDNs with toPorts": (
        doc(egress({"toFQDNs": [{"matchName": "x.com"}], "toPorts": PORTS})),
        UNIMP,
        "spec.egress[0].toFQDNs: toFQDNs needs DNS proxying",
    ),
    "toServices": (doc(egress({"toServices": [{"k8sService": {"serviceName": "a"}}]})), UNIMP, "egress[0].toServices"),
    "toGroups": (doc(egress({"toGroups": [{"aws": {}}]})), UNIMP, "egress[0].toGroups"),
    "fromGroups": (doc(ingress({"fromGroups": [{"aws": {}}]})), UNIMP, "ingress[0].fromGroups"),
    "fromRequires": (doc(ingress({"fromRequires": [SEL], "fromEndpoints": [SEL]})), UNIMP, "ingress[0].fromRequires"),
    "toRequires": (doc(egress({"toRequires": [SEL]})), UNIMP, "egress[0].toRequires"),
    "fromNodes": (doc(ingress({"fromNodes": [SEL]})), UNIMP, "ingress[0].fromNodes"),
    "toNodes": (doc(egress({"toNodes": [SEL]})), UNIMP, "egress[0].toNodes"),
    "kafka rules": (
        doc(ingress({"toPorts": [{**PORTS[0], "rules": {"kafka": [{"topic": "t"}]}}]})),
        UNIMP,
        "ingress[0].toPorts[0].rules.kafka",
    ),
    "dns rules": (
        doc(egress({"toPorts": [{**PORTS[0], "rules": {"dns": [{"matchName": "a.com"}]}}]})),
        UNIMP,
        "egress[0].toPorts[0].rules.dns",
    ),
    "l7proto rules": (
        doc(ingress({"toPorts": [{**PORTS[0], "rules": {"l7proto": "x", "l7": [{}]}}]})),
        UNIMP,
        "rules.l7proto",
    ),
    "header secret": (
        doc(
            ingress({"toPorts": [{**PORTS[0], "rules": {"http": [{"headerMatches": [{"name": "a", "secret": {}}]}]}}]})
        ),
        UNIMP,
        "rules.http[0].headerMatches[0].secret",
    ),
    "header mismatch action": (
        doc(
            ingress(
                {"toPorts": [{**PORTS[0], "rules": {"http": [{"headerMatches": [{"name": "a", "mismatch": "LOG"}]}]}}]}
            )
        ),
        UNIMP,
        "headerMatches[0].mismatch",
    ),
    "L7 on ANY": (
        doc(ingress({"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{}]}}]})),
        INVAL,
        "ports[0].protocol: L7 rules can only apply to TCP (not ANY)",
    ),
    "L7 on UDP": (
        doc(ingress({"toPorts": [{"ports": [{"port": "80", "protocol": "UDP"}], "rules": {"http": [{}]}}]})),
        INVAL,
        "L7 rules can only apply to TCP (not UDP)",
    ),
    "L7 on port 0": (
        doc(ingress({"toPorts": [{"ports": [{"port": "0", "protocol": "TCP"}], "rules": {"http": [{}]}}]})),
        INVAL,
        "ports[0].port: L7 rules can not be used when a port is 0",
    ),
    "L7 on a range": (
        doc(
            ingress(
                {"toPorts": [{"ports": [{"port": "80", "endPort": 90, "protocol": "TCP"}], "rules": {"http": [{}]}}]}
            )
        ),
        UNIMP,
        "ports[0].endPort: L7 rules on a port range",
    ),
    "L7 in a deny section": (
        doc({"endpointSelector": {}, "ingressDeny": [{"toPorts": [{**PORTS[0], "rules": {"http": [{}]}}]}]}),
        INVAL,
        "ingressDeny[0].toPorts[0]: unknown field 'rules'",
    ),
    "L7 bad regex": (
        doc(ingress({"toPorts": [{**PORTS[0], "rules": {"http": [{"path": "/a(b"}]}}]})),
        INVAL,
        "ingress[0].ports[0].http[0].path: '/a(b' is not an RE2 regex",
    ),
    "L7 unknown http field": (
        doc(ingress({"toPorts": [{**PORTS[0], "rules": {"http": [{"paths": "/"}]}}]})),
        INVAL,
        "rules.http[0]: unknown field 'paths'",
    ),
    "L7 bad header name": (
        doc(ingress({"toPorts": [{**PORTS[0], "rules": {"http": [{"headers": ["Bad(Name) x"]}]}}]})),
        INVAL,
        "http[0].headers[0].name: 'Bad(Name)' is not an HTTP header name",
    ),
    "serverNames": (
        doc(egress({"toPorts": [{**PORTS[0], "serverNames": ["a.com"]}]})),
        UNIMP,
        "toPorts[0].serverNames",
    ),
    "listener": (doc(egress({"toPorts": [{**PORTS[0], "listener": {"name": "l"}}]})), UNIMP, "toPorts[0].listener"),
    "originatingTLS": (doc(egress({"toPorts": [{**PORTS[0], "originatingTLS": {}}]})), UNIMP, "originatingTLS"),
    "terminatingTLS": (doc(ingress({"toPorts": [{**PORTS[0], "terminatingTLS": {}}]})), UNIMP, "terminatingTLS"),
    "authentication": (doc(ingress({"authentication": {"mode": "required"}})), UNIMP, "ingress[0].authentication"),
    "auth": (doc(egress({"auth": {"type": "null"}})), UNIMP, "egress[0].auth"),
    "cidrGroupRef": (doc(egress({"toCIDRSet": [{"cidrGroupRef": "g"}]})), UNIMP, "toCIDRSet[0].cidrGroupRef"),
    "cidrGroupSelector": (doc(ingress({"fromCIDRSet": [{"cidrGroupSelector": {}}]})), UNIMP, "cidrGroupSelector"),
    "extended protocol": (
        doc(ingress({"toPorts": [{"ports": [{"port": "0", "protocol": "VRRP"}]}]})),
        UNIMP,
        "ports[0].protocol: protocol 'VRRP'",
    ),
    "Kubernetes NetworkPolicy": (doc(ingress({}), kind="NetworkPolicy"), UNIMP, "kind NetworkPolicy"),
    "cidr label source": (
        doc(ingress({"fromEndpoints": [{"matchLabels": {"cidr:10.0.0.0/8": ""}}]})),
        UNIMP,
        "fromEndpoints[0].matchLabels: label key 'cidr:",
    ),
    **{
        f"entity {e}": (doc(egress({"toEntities": ["world", e]})), UNIMP, f"toEntities[1]: entity '{e}'")
        for e in ("init", "health", "unmanaged", "kube-apiserver", "ingress", "world-ipv4", "world-ipv6", "none")
    },
    # not Cilium's, or not valid (INVALID_ARGUMENT, the field named): the CRD schema (unknown fields, enums),
    # rule_validation.go (a spec needs a section; one L3 kind per rule; icmps without toPorts; at most 40
    # ports or ICMP fields; port required), icmp.go (type names per family), iana.IsSvcName (port names)
    "unknown top field": (doc(ingress({}), extra_field=1), INVAL, "unknown field 'extra_field'"),
    "flat rule": (json.dumps({"metadata": {"name": "p"}, **ingress({})}), INVAL, "unknown field 'endpointSelector'"),
    "unknown spec field": (doc({**ingress({}), "egres": []}), INVAL, "spec: unknown field 'egres'"),
    "unknown peer field": (
        doc(ingress({"fromEndpoint": [{}]})),
        INVAL,
        "spec.ingress[0]: unknown field 'fromEndpoint'",
    ),
    "L7 in a deny rule": (
        doc({"endpointSelector": {}, "ingressDeny": [{"toPorts": [{**PORTS[0], "rules": {}}]}]}),
        INVAL,
        "ingressDeny[0].toPorts[0]: unknown field 'rules'",
    ),
    "unknown metadata field": (doc(ingress({}), metadata={"name": "p", "nmespace": "x"}), INVAL, "'nmespace'"),
    "unknown kind": (doc(ingress({}), kind="Deployment"), INVAL, "kind 'Deployment'"),
    "other apiVersion": (doc(ingress({}), apiVersion="cilium.io/v1"), INVAL, "apiVersion 'cilium.io/v1'"),
    "no name": (json.dumps({"kind": "CiliumNetworkPolicy", "spec": ingress({})}), INVAL, "metadata.name is required"),
    "bad namespace": (doc(ingress({}), namespace="Prod_1"), INVAL, "namespace 'Prod_1' is invalid"),
    "CCNP with a namespace": (doc(ingress({}), kind="CiliumClusterwideNetworkPolicy"), INVAL, "metadata.namespace"),
    "subject in another namespace": (
        doc(ingress({}, selector={"matchLabels": {NS: "dev"}})),
        INVAL,
        "only endpoints of its own namespace",
    ),
    "no spec": (doc(), INVAL, "needs spec or a non-empty specs list"),
    "empty specs": (doc(specs=[]), INVAL, "needs spec or a non-empty specs list"),
    "spec without sections": (doc({"endpointSelector": {}}), INVAL, "spec: a spec needs at least one of"),
    "spec without selector": (doc({"ingress": [{}]}), INVAL, "spec.endpointSelector is required"),
    "specs entry without sections": (doc(ingress({}), specs=[{"endpointSelector": {}}]), INVAL, "specs[0]: a spec"),
    "defaultDeny not a boolean": (
        doc({**ingress({}), "enableDefaultDeny": {"ingress": "no"}}),
        INVAL,
        "enableDefaultDeny.ingress must be true or false",
    ),
    "defaultDeny unknown key": (
        doc({**ingress({}), "enableDefaultDeny": {"both": True}}),
        INVAL,
        "unknown field 'both'",
    ),
    "unknown label source": (
        doc(ingress({"fromEndpoints": [{"matchLabels": {"foo:app": "x"}}]})),
        INVAL,
        "unknown source 'foo'",
    ),
    "ambiguous reserved key": (
        doc(ingress({"fromEndpoints": [{"matchLabels": {"reserved.host": ""}}]})),
        INVAL,
        "write reserved:host",
    ),
    "label value a number": (doc(ingress({}, selector={"matchLabels": {"v": 1}})), INVAL, "quote 1"),
    "bad operator": (
        doc(ingress({}, selector={"matchExpressions": [{"key": "a", "operator": "Has"}]})),
        INVAL,
        "matchExpressions[0].operator: 'Has'",
    ),
    "Exists with values": (
        doc(ingress({}, selector={"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]})),
        INVAL,
        "takes no values",
    ),
    "unknown entity": (doc(egress({"toEntities": ["galaxy"]})), INVAL, "toEntities[0]: entity 'galaxy' is not one of"),
    "ICMP bad type name": (
        doc(egress({"icmps": [{"fields": [{"type": "PacketTooBig"}]}]})),
        INVAL,
        "fields[0].type: 'PacketTooBig' is not an IPv4 ICMP type: use 0-255 or one of EchoReply",
    ),
    "ICMP type 256": (
        doc(egress({"icmps": [{"fields": [{"type": 256}]}]})),
        INVAL,
        "type: 256 is out of range (0-255)",
    ),
    "ICMP bad family": (
        doc(egress({"icmps": [{"fields": [{"type": 8, "family": "ipv4"}]}]})),
        INVAL,
        "family: 'ipv4' is not IPv4 or IPv6",
    ),
    "ICMP type missing": (
        doc(egress({"icmps": [{"fields": [{"family": "IPv4"}]}]})),
        INVAL,
        "fields[0].type is required",
    ),
    "ICMP type a boolean": (
        doc(egress({"icmps": [{"fields": [{"type": True}]}]})),
        INVAL,
        "fields[0].type must be a number, not a boolean",
    ),
    "ICMP fields empty": (doc(egress({"icmps": [{"fields": []}]})), INVAL, "icmps[0].fields is empty"),
    "ICMP 41 fields": (doc(egress({"icmps": [{"fields": [{"type": 8}] * 41}]})), INVAL, "at most 40"),
    "icmps with toPorts": (
        doc(egress({"icmps": [{"fields": [{"type": 8}]}], "toPorts": PORTS})),
        INVAL,
        "icmps and toPorts cannot be combined",
    ),
    "fromEndpoints with fromCIDR": (
        doc(ingress({"fromEndpoints": [{}], "fromCIDR": ["10.0.0.0/8"]})),
        INVAL,
        "fromEndpoints and fromCIDR cannot be combined",
    ),
    "fromCIDR with fromCIDRSet": (
        doc(ingress({"fromCIDR": ["10.0.0.0/8"], "fromCIDRSet": [{"cidr": "10.0.0.0/8"}]})),
        INVAL,
        "fromCIDR and fromCIDRSet cannot be combined",
    ),
    "fromEntities with fromEndpoints": (
        doc(ingress({"fromEntities": ["host"], "fromEndpoints": [{}]})),
        INVAL,
        "fromEndpoints and fromEntities cannot be combined",
    ),
    "toEndpoints with toCIDRSet": (
        doc(egress({"toEndpoints": [{}], "toCIDRSet": [{"cidr": "10.0.0.0/8"}]})),
        INVAL,
        "toCIDRSet cannot be combined",
    ),
    "ICMP in toPorts": (
        doc(ingress({"toPorts": [{"ports": [{"port": "8", "protocol": "ICMP"}]}]})),
        INVAL,
        "not a toPorts protocol; allow ICMP with icmps",
    ),
    "unknown protocol": (
        doc(ingress({"toPorts": [{"ports": [{"port": "1", "protocol": "QUIC"}]}]})),
        INVAL,
        "protocol 'QUIC' is not one of TCP, UDP, SCTP, ANY",
    ),
    "endPort below port": (
        doc(ingress({"toPorts": [{"ports": [{"port": "90", "endPort": 80}]}]})),
        INVAL,
        "endPort 80 is below port 90",
    ),
    "endPort with port 0": (
        doc(ingress({"toPorts": [{"ports": [{"port": "0", "endPort": 80}]}]})),
        INVAL,
        "endPort needs a port above 0",
    ),
    "endPort with a named port": (
        doc(ingress({"toPorts": [{"ports": [{"port": "http", "endPort": 80}]}]})),
        INVAL,
        "a named port ('http') takes no endPort",
    ),
    "port with leading zeros": (doc(ingress({"toPorts": [{"ports": [{"port": "017"}]}]})), INVAL, "leading zeros"),
    "port missing": (doc(ingress({"toPorts": [{"ports": [{"protocol": "TCP"}]}]})), INVAL, "ports[0].port is required"),
    "port name too long": (doc(ingress({"toPorts": [{"ports": [{"port": "a" * 16}]}]})), INVAL, "nor a port name"),
    "port name with --": (doc(ingress({"toPorts": [{"ports": [{"port": "a--b"}]}]})), INVAL, "nor a port name"),
    "port name ending in -": (doc(ingress({"toPorts": [{"ports": [{"port": "web-"}]}]})), INVAL, "nor a port name"),
    "port 65536": (doc(ingress({"toPorts": [{"ports": [{"port": "65536"}]}]})), INVAL, "65536 is out of range"),
    "ports empty": (doc(ingress({"toPorts": [{"ports": []}]})), INVAL, "toPorts[0].ports is empty"),
    "41 ports": (doc(ingress({"toPorts": [{"ports": [{"port": "80"}] * 41}]})), INVAL, "Cilium allows at most 40"),
    "CIDRSet without cidr": (doc(egress({"toCIDRSet": [{"except": ["10.0.0.0/9"]}]})), INVAL, "toCIDRSet[0].cidr is"),
    "except outside": (
        doc(egress({"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/8"]}]})),
        INVAL,
        "toCIDRSet[0]: except 11.0.0.0/8 is not inside 10.0.0.0/8",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_refused_field_is_named_with_its_status(case: str) -> None:
    text, status, place = REFUSED[case]
    with pytest.raises(WeirError) as err:
        from_document(text)
    assert type(err.value) is status, f"{case}: {type(err.value).__name__}: {err.value}"
    assert place in str(err.value), f"{case}: {err.value}"
    assert str(err.value).startswith("document object 0: ") or case == "no name", str(err.value)


def test_yaml_integer_keys_are_refused_by_name() -> None:
    text = "metadata: {name: p}\nspec: {endpointSelector: {}, ingress: [{}]}\n7: x\n"
    with pytest.raises(InvalidArgument, match="document object 0: key 7 is not a string"):
        from_document(text)


# ---- the message path: the same fields, validated the same way ----


def test_an_icmp_type_message_field_means_that_type_alone() -> None:
    """icmp_type carries a type exactly (0 included); port 0 keeps meaning every type."""
    sel = pb.EndpointSelector(match_labels={"app": "x"})

    def port(p: pb.PortRule) -> PortRule:
        return (
            from_proto(pb.Rule(name="r", endpoint_selector=sel, ingress=[pb.PeerRule(ports=[p])])).ingress[0].ports[0]
        )

    assert port(pb.PortRule(icmp_type=0, protocol="ICMP")) == PortRule("ICMP", 0, 0)
    assert port(pb.PortRule(icmp_type=129, protocol="ICMPV6")) == PortRule("ICMPV6", 129, 129)
    assert port(pb.PortRule(port=0, protocol="ICMP")) == PortRule("ICMP", 0, 255)
    for bad, needle in [
        (pb.PortRule(icmp_type=8, protocol="TCP"), "icmp_type needs protocol ICMP or ICMPV6"),
        (pb.PortRule(icmp_type=8, port=8, protocol="ICMP"), "icmp_type takes no port"),
        (pb.PortRule(icmp_type=256, protocol="ICMP"), "icmp_type 256 is above 255"),
    ]:
        with pytest.raises(InvalidArgument, match=needle):
            port(bad)


def test_rule_messages_validate_the_new_fields() -> None:
    sel = pb.EndpointSelector(match_labels={"app": "x"})
    peer = pb.PeerRule(
        ports=[
            pb.PortRule(name="http", protocol="TCP"),
            pb.PortRule(port=9, protocol="SCTP"),
            pb.PortRule(port=128, protocol="ICMPV6"),
        ],
        entities=["cluster", "remote-node"],
    )
    rule = from_proto(
        pb.Rule(
            name="r",
            namespace="prod",
            endpoint_selector=sel,
            ingress=[peer],
            specs=[pb.Rule(endpoint_selector=sel, egress=[pb.PeerRule(endpoints=[sel])])],
        )
    )
    assert rule.key == "prod/r" and rule.specs[0].key == "prod/r"
    assert rule.ingress[0].ports == (
        PortRule("TCP", 0, 0, "http"),
        PortRule("SCTP", 9, 9),
        PortRule("ICMPV6", 128, 128),
    )
    assert rule.specs[0].egress[0].endpoints[0].matches({"app": "x", "io.kubernetes.pod.namespace": "prod"})
    assert not rule.specs[0].egress[0].endpoints[0].matches({"app": "x"})
    assert from_proto(to_proto(rule)) == rule  # confining is idempotent
    bad = {
        "namespace": (pb.Rule(name="r", namespace="Prod"), INVAL, "namespace 'Prod' is invalid"),
        "spec with a name": (pb.Rule(name="r", specs=[pb.Rule(name="x")]), INVAL, "specs[0]: a further spec"),
        "nested specs": (pb.Rule(name="r", specs=[pb.Rule(specs=[pb.Rule()])]), INVAL, "specs[0]: a further spec"),
        "bad port name": (
            pb.Rule(name="r", ingress=[pb.PeerRule(ports=[pb.PortRule(name="Http")])]),
            INVAL,
            "ports[0].name: 'Http' is not a port name",
        ),
        "name and number": (
            pb.Rule(name="r", ingress=[pb.PeerRule(ports=[pb.PortRule(name="http", port=80)])]),
            INVAL,
            "takes no port",
        ),
        "named ICMP": (
            pb.Rule(name="r", ingress=[pb.PeerRule(ports=[pb.PortRule(name="a", protocol="ICMP")])]),
            INVAL,
            "cannot be ICMP",
        ),
        "ICMPv6 type 256": (
            pb.Rule(name="r", ingress=[pb.PeerRule(ports=[pb.PortRule(port=256, protocol="ICMPV6")])]),
            INVAL,
            "ICMP type 256 is above 255",
        ),
        "entity health": (pb.Rule(name="r", ingress=[pb.PeerRule(entities=["health"])]), UNIMP, "entity 'health'"),
        "spec's bad selector": (
            pb.Rule(name="r", specs=[pb.Rule(endpoint_selector=pb.EndpointSelector(match_labels={"x:y": "z"}))]),
            INVAL,
            "rule r: specs[0]: endpoint_selector: label key 'x:y'",
        ),
    }
    for case, (msg, status, place) in bad.items():
        with pytest.raises(WeirError) as err:
            from_proto(msg)
        assert type(err.value) is status and place in str(err.value), (case, err.value)


def test_specs_cidrs_are_counted_and_get_identities() -> None:
    cidr = pb.PeerRule(cidrs=[pb.CidrRule(cidr="10.0.0.0/8", **{"except": ["10.1.0.0/16"]})])
    msg = pb.Rule(name="r", egress=[cidr], specs=[pb.Rule(egress=[cidr, cidr])])
    assert cidr_count(msg) == 6
    assert len(list(from_proto(msg).cidrs())) == 6


# ---- generated documents: only WeirError, and what is accepted reloads ----

KEYS = sorted(
    {
        k
        for p in (
            cnp.OBJECT,
            cnp.LIST,
            cnp.METADATA,
            cnp.RULE,
            cnp.DEFAULT_DENY,
            cnp.LOG,
            *cnp.PEERS.values(),
            cnp.PORT_RULE,
            cnp.PORT,
            cnp.ICMP_RULE,
            cnp.ICMP_FIELD,
            cnp.CIDR_RULE,
            cnp.SELECTOR,
            cnp.REQUIREMENT,
        )
        for k in (*p.fields, *p.refused)
    }
)
HOSTILE_TEXT = [
    "",
    "p",
    "prod",
    "0",
    "80",
    "017",
    "65536",
    "http",
    "HTTP",
    "a--b",
    "TCP",
    "icmp",
    "ANY",
    "VRRP",
    "IPv4",
    "IPv6",
    "EchoRequest",
    "EchoReply",
    "In",
    "Exists",
    "host",
    "world",
    "health",
    "galaxy",
    "10.0.0.0/8",
    "fe80::1%lo/64",
    "::/0",
    "k8s:app",
    "reserved:host",
    "$host",
    "reserved.host",
    "cidr:1.2.3.4/32",
    "x:y",
    "io.kubernetes.pod.namespace",
    NS,
    "CiliumNetworkPolicy",
    "CiliumClusterwideNetworkPolicy",
    "List",
    "cilium.io/v2",
    "\u202e",
    "\ud800",
    "a" * 300,
    "\t",
    "é",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 8, 255, 65535]),
    st.floats(allow_nan=False),
    st.sampled_from(HOSTILE_TEXT),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(HOSTILE_TEXT), st.integers(0, 3))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=30,
)


def mostly(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the well-shaped value, else a hostile one (hypothesis favours small integers: 0 is likely)."""
    return st.integers(0, 15).flatmap(lambda n: values if n == 15 else strategy)


def pick(good: list[Any], bad: list[Any]) -> st.SearchStrategy[Any]:
    """One of `good`, now and then one of `bad`."""
    return st.integers(0, 7).flatmap(lambda n: st.sampled_from(bad if n == 7 else good))


label_keys = pick(
    ["app", "k8s:app", "any:app", "container:app", "reserved:host", "$host", NS, "io.kubernetes.pod.namespace",
     "io.cilium.k8s.namespace.labels.team", "reserved:init"],
    ["foo:bar", "cidr:10.0.0.0/8", "reserved.host", "bad key"],
)  # fmt: skip
label_values = pick(["", "x", "prod", "dev"], ["a b", 1, True])
requirements = st.fixed_dictionaries(
    {"key": mostly(label_keys), "operator": mostly(pick(["In", "NotIn", "Exists", "DoesNotExist"], ["Has"]))},
    optional={"values": mostly(st.lists(label_values, max_size=2))},
)
selectors = st.fixed_dictionaries(
    {},
    optional={
        "matchLabels": mostly(st.dictionaries(label_keys, label_values, max_size=2)),
        "matchExpressions": mostly(st.lists(requirements, max_size=2)),
    },
)
port_protocols = st.fixed_dictionaries(
    {"port": mostly(pick(["80", "0", 0, 443, "http", "HTTP", 53], ["017", "65536", "a--b", -1, 2**40, 1.5]))},
    optional={
        "endPort": mostly(pick([0, 80, 8080, 65535, "80"], [70000, -1, 2**40])),
        "protocol": mostly(pick(["TCP", "udp", "SCTP", "ANY", ""], ["ICMP", "VRRP"])),
    },
)
port_rules = st.integers(0, 7).flatmap(
    lambda n: (
        st.fixed_dictionaries({"ports": mostly(st.lists(port_protocols, max_size=3))})
        if n < 7
        else st.fixed_dictionaries(
            {"ports": st.just([{"port": "80"}])}, optional=dict.fromkeys(cnp.PORT_RULE.refused, values)
        )
    )
)
icmp_fields = st.fixed_dictionaries(
    {"type": mostly(pick([8, "8", "EchoRequest", 128, "PacketTooBig"], ["EchoReply", 0, 300, -1, 2**40]))},
    optional={"family": mostly(pick(["IPv4", "IPv6"], ["ipv6"]))},
)
cidr_texts = pick(["10.0.0.0/8", "192.0.2.0/24", "::/0", "10.0.0.1"], ["fe80::1%lo/64", "10.0.0.1/8", "x"])
cidr_rules = st.fixed_dictionaries(
    {"cidr": mostly(cidr_texts)}, optional={"except": mostly(st.lists(cidr_texts, max_size=2))}
)
entities = pick(["host", "world", "all", "cluster", "remote-node"], ["health", "galaxy"])


@st.composite
def peers(draw: st.DrawFn, section: str) -> dict[str, Any]:
    prefix = "from" if section.startswith("ingress") else "to"
    l3 = {
        f"{prefix}Endpoints": st.lists(selectors, max_size=2),
        f"{prefix}CIDR": st.lists(cidr_texts, max_size=2),
        f"{prefix}CIDRSet": st.lists(cidr_rules, max_size=2),
        f"{prefix}Entities": st.lists(entities, max_size=2),
    }
    out: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(sorted(l3)), max_size=2, unique=True)):  # two: Cilium refuses
        out[key] = draw(mostly(l3[key]))
    l4 = draw(pick(["", "toPorts", "icmps"], ["both"]))
    if l4 in ("toPorts", "both"):
        out["toPorts"] = draw(mostly(st.lists(port_rules, max_size=2)))
    if l4 in ("icmps", "both"):
        out["icmps"] = draw(
            mostly(st.lists(st.fixed_dictionaries({"fields": mostly(st.lists(icmp_fields, max_size=2))})))
        )
    if draw(st.integers(0, 7)) == 7:  # now and then any key of the place, with any value
        place = cnp.PEERS[section]
        out[draw(st.sampled_from(sorted(place.fields | place.refused.keys())))] = draw(values)
    return out


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {"endpointSelector": draw(mostly(selectors))}
    for section in ("ingress", "egress", "ingressDeny", "egressDeny"):
        if draw(st.integers(0, 2)) < 2:
            rule[section] = draw(mostly(st.lists(peers(section), min_size=1, max_size=2)))
    rule.update(
        draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "enableDefaultDeny": mostly(
                        st.fixed_dictionaries(
                            {}, optional={"ingress": mostly(st.booleans()), "egress": mostly(st.booleans())}
                        )
                    ),
                    "description": mostly(pick(["why", ""], ["\ud800"])),
                    "labels": mostly(st.just([{"key": "a", "value": "b"}])),
                    "log": mostly(st.just({"value": "audit"})),
                },
            )
        )
    )
    if draw(st.integers(0, 9)) == 9:
        rule[draw(st.sampled_from(sorted(cnp.RULE.fields | cnp.RULE.refused.keys())))] = draw(values)
    return rule


@st.composite
def documents(draw: st.DrawFn) -> str:
    """A policy object, mostly well-shaped, with hostile values and stray schema keys in it."""
    metadata = draw(
        st.fixed_dictionaries(
            {"name": pick(["p"], ["Bad", "x\n"])},
            optional={"namespace": pick(["prod", ""], ["Prod"]), "labels": values},
        )
    )
    obj: dict[Any, Any] = {"metadata": metadata}
    kind = draw(pick(["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", None], [5, "List"]))
    if kind is not None:
        obj["kind"] = kind
    if kind == "CiliumClusterwideNetworkPolicy" and draw(st.integers(0, 7)) < 7:
        metadata.pop("namespace", None)
    if draw(st.integers(0, 7)) < 7:  # (hypothesis favours small integers: the likely branch is the small one)
        obj["spec"] = draw(specs())
    if draw(st.integers(0, 2)) == 2:
        obj["specs"] = draw(st.lists(specs(), max_size=2))
    if draw(st.integers(0, 9)) == 9:
        obj.update(draw(st.dictionaries(keys, values, max_size=2)))
    if draw(st.integers(0, 9)) == 9:
        obj = {"kind": "List", "items": [obj, obj]}
    return yaml.safe_dump(obj, allow_unicode=True) if draw(st.booleans()) else json.dumps(obj, default=str)


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(documents())
def test_generated_documents_raise_only_weir_errors_and_accepted_ones_reload(text: str) -> None:
    try:
        messages = from_document(text)
    except WeirError:
        return
    for message in messages:
        rule = from_proto(message)
        assert from_proto(to_proto(rule)) == rule
        assert to_proto(rule) == to_proto(from_proto(to_proto(rule)))


# One valid policy using every implemented field; the test below breaks it in exactly one place, so each
# hostile value is the only fault and reaches the code that reads its place.
BASE: dict[str, Any] = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "p", "namespace": "prod", "labels": {"a": "b"}},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "db"}, "matchExpressions": [{"key": "k8s:tier", "operator": "In",
                                                                                  "values": ["a"]}]},
        "description": "why",
        "enableDefaultDeny": {"ingress": True, "egress": False},
        "labels": [{"key": "a", "value": "b", "source": "k8s"}],
        "log": {"value": "audit"},
        "ingress": [
            {"fromEndpoints": [{"matchLabels": {"reserved:host": ""}}, {}],
             "toPorts": [{"ports": [{"port": "80", "endPort": 90, "protocol": "TCP"}, {"port": "http"}]}]},
            {"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}], "icmps": [{"fields": [
                {"type": 8}, {"type": "EchoRequest", "family": "IPv6"}]}]},
        ],
        "egress": [{"toCIDR": ["192.0.2.0/24"]}, {"toEntities": ["world", "cluster"]}],
        "ingressDeny": [{"fromEntities": ["world"], "toPorts": [{"ports": [{"port": "22"}]}]}],
        "egressDeny": [{"toEndpoints": [{"matchExpressions": [{"key": "app", "operator": "Exists"}]}]}],
    },
    "specs": [{"endpointSelector": {}, "egress": [{"toEndpoints": [{}], "toPorts": [{"ports": [{"port": 0}]}]}]}],
}  # fmt: skip


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        found += _paths(child, (*path, key))
    return found


PATHS = _paths(BASE)[1:]
leaves = st.one_of(scalars, values, st.sampled_from([{}, [], [{}], {"x": 1}, [None], 2**40, -1, "0" * 7]))


def test_the_base_policy_is_accepted() -> None:
    assert len(one(json.dumps(BASE)).parts()) == 2 and len(PATHS) > 80


@settings(max_examples=600, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(st.sampled_from(PATHS), leaves, st.one_of(st.none(), keys), st.booleans())
def test_one_hostile_value_anywhere_raises_only_weir_errors(path: tuple[Any, ...], value: Any, key: Any,
                                                            as_yaml: bool) -> None:  # fmt: skip
    obj = json.loads(json.dumps(BASE))
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    if key is not None and isinstance(parent[path[-1]], dict):
        parent[path[-1]][key] = value  # a key added where the schema has its own
    else:
        parent[path[-1]] = value
    text = yaml.safe_dump(obj, allow_unicode=True) if as_yaml else json.dumps(obj, default=str)
    try:
        messages = from_document(text)
    except WeirError:
        return
    for message in messages:
        rule = from_proto(message)
        assert from_proto(to_proto(rule)) == rule


def test_a_key_given_twice_is_refused_not_dropped() -> None:
    """YAML keeps the last of two equal keys; a second `ingress:` would silently replace the first."""
    text = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-in, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingressDeny: [{fromEntities: [world]}]
  ingressDeny: [{fromEntities: [host]}]
"""
    with pytest.raises(InvalidArgument, match="line 8: key 'ingressDeny' is given twice"):
        from_document(text)
    with pytest.raises(InvalidArgument, match="key 'name' is given twice"):
        from_document('{"metadata": {"name": "a", "name": "b"}, "spec": {}}')
