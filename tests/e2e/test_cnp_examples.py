"""CiliumNetworkPolicy examples on real traffic: Cilium's documented examples, Weir's verdicts.

One node (the orchestrator and policy processes) with endpoints in two namespaces is
shared by every case; each case imports one document (adapted from Cilium's docs; the
place is named in the case), sends real TCP, UDP and ICMP echo over IPv4 and IPv6
between the endpoints' namespaces, and checks each flow against Cilium's meaning.
The document is deleted after the case, so cases stay independent.
"""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.policy.v1 import policy_pb2 as pb
from weir.policy.v1 import policy_pb2_grpc as pb_grpc

from tests.e2e.test_policy import known
from tests.harness import traffic
from tests.harness.node import NODE_NET_V4, OUTSIDE_V4, Node, pid_prefix

pytestmark = pytest.mark.root

DOCS = "docs.cilium.io/en/stable/security/policy/language/"

# name -> (namespace, labels, named ports)
ENDPOINTS: dict[str, tuple[str, dict[str, str], dict[str, tuple[int, str]]]] = {
    "web": ("prod", {"app": "web"}, {"http": (8080, "TCP")}),
    "client": ("prod", {"app": "client"}, {}),
    "dev-web": ("dev", {"app": "web"}, {"http": (9090, "TCP")}),
    "dev-client": ("dev", {"app": "client"}, {}),
    "other": ("", {"app": "other"}, {}),
}
HOST, WORLD = "host", "world"  # flows from the node itself and from the outside network
_counter = itertools.count()


@dataclass(frozen=True)
class Flow:
    src: str  # an endpoint name, HOST or WORLD
    dst: str  # an endpoint name
    kind: str  # tcp, udp, ping
    port: int = 0
    allowed: bool = True
    family: int = 4

    def __str__(self) -> str:
        what = f"{self.kind}/{self.port}" if self.port else self.kind
        return f"{self.src} -> {self.dst} {what} v{self.family}: {'allowed' if self.allowed else 'denied'}"


def tcp(src: str, dst: str, port: int, allowed: bool = True, family: int = 4) -> Flow:
    return Flow(src, dst, "tcp", port, allowed, family)


def udp(src: str, dst: str, port: int, allowed: bool = True) -> Flow:
    return Flow(src, dst, "udp", port, allowed)


def ping(src: str, dst: str, allowed: bool = True, family: int = 4) -> Flow:
    return Flow(src, dst, "ping", 0, allowed, family)


@dataclass(frozen=True)
class Case:
    id: str
    source: str  # where in Cilium's documentation the example comes from
    document: str
    flows: tuple[Flow, ...]
    keys: tuple[str, ...]  # the rules (namespace/name) the document makes


CASES = [
    Case(
        "l3-labels-namespaced",
        f"{DOCS} Layer 3 examples, Labels based (ingress from frontend to backend), in namespace prod",
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: l3-rule, namespace: prod}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - fromEndpoints:
            - matchLabels: {app: client}
        """,
        (
            tcp("client", "web", 80), tcp("client", "web", 80, family=6), udp("client", "web", 5353),
            ping("client", "web"), ping("client", "web", family=6),
            tcp("dev-client", "web", 80, allowed=False),  # app=client, but of namespace dev
            tcp("other", "web", 80, allowed=False),
            tcp("dev-client", "dev-web", 80),  # dev's web is not selected by prod's policy
        ),
        ("prod/l3-rule",),
    ),
    Case(
        "same-name-in-two-namespaces",
        f"{DOCS} Layer 4 examples (toPorts), one policy name applied in two namespaces",
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: web-policy, namespace: prod}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - fromEndpoints: [{matchLabels: {app: client}}]
            toPorts: [{ports: [{port: "80", protocol: TCP}]}]
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: web-policy, namespace: dev}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - fromEndpoints: [{matchLabels: {app: client}}]
            toPorts: [{ports: [{port: "9000", protocol: TCP}]}]
        """,
        (
            tcp("client", "web", 80), tcp("client", "web", 9000, allowed=False),
            tcp("dev-client", "dev-web", 9000), tcp("dev-client", "dev-web", 80, allowed=False),
            tcp("client", "dev-web", 9000, allowed=False), tcp("dev-client", "web", 80, allowed=False),
        ),
        ("dev/web-policy", "prod/web-policy"),
    ),
    Case(
        "l4-egress-port-blocks-icmp",
        f"{DOCS} Layer 4 examples, Limit ingress/egress ports (egress to TCP 80 only; ICMP is then blocked)",
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: l4-rule, namespace: prod}
        spec:
          endpointSelector: {matchLabels: {app: client}}
          egress:
          - toPorts:
            - ports: [{port: "80", protocol: TCP}]
        """,
        (
            tcp("client", "web", 80), tcp("client", "dev-web", 80, family=6),
            tcp("client", "web", 8080, allowed=False), udp("client", "web", 80, allowed=False),
            ping("client", "web", allowed=False), ping("client", "web", allowed=False, family=6),
            tcp("dev-client", "web", 8080),  # dev-client is not selected
        ),
        ("prod/l4-rule",),
    ),
    Case(
        "any-port-zero-is-not-icmp",
        f"{DOCS} Layer 4 examples (port \"0\" and protocol ANY: every port of TCP, UDP and SCTP, not ICMP)",
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: any-port, namespace: prod}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - fromEndpoints: [{matchLabels: {app: client}}]
            toPorts: [{ports: [{port: "0", protocol: ANY}]}]
        """,
        (
            tcp("client", "web", 8080), tcp("client", "web", 22, family=6), udp("client", "web", 5353),
            ping("client", "web", allowed=False), ping("client", "web", allowed=False, family=6),
        ),
        ("prod/any-port",),
    ),
    Case(
        "icmpv6-echo-request-only",
        f"{DOCS} ICMP/ICMPv6 (icmps with family IPv6 and type EchoRequest)",
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: icmp-rule, namespace: prod}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - fromEndpoints: [{matchLabels: {app: client}}]
            icmps:
            - fields:
              - {type: EchoRequest, family: IPv6}
        """,
        (
            ping("client", "web", family=6), ping("client", "web", allowed=False),
            tcp("client", "web", 80, allowed=False),
        ),
        ("prod/icmp-rule",),
    ),
    Case(
        "icmp-both-families",
        f"{DOCS} ICMP/ICMPv6 (the documented example: type 8 for IPv4, EchoRequest for IPv6)",
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: icmp-rule, namespace: prod}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - fromEndpoints: [{matchLabels: {app: client}}]
            icmps:
            - fields:
              - type: 8
                family: IPv4
              - type: EchoRequest
                family: IPv6
        """,
        (ping("client", "web"), ping("client", "web", family=6), ping("dev-client", "web", allowed=False)),
        ("prod/icmp-rule",),
    ),
    Case(
        "entity-cluster",
        f"{DOCS} Entities based (fromEntities: cluster; the outside network is world)",
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: from-cluster, namespace: prod}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - fromEntities: [cluster]
        """,
        (
            tcp("client", "web", 80), tcp("dev-client", "web", 80), tcp("other", "web", 80, family=6),
            ping(HOST, "web"), tcp(WORLD, "web", 80, allowed=False), ping(WORLD, "web", allowed=False),
        ),
        ("prod/from-cluster",),
    ),
    Case(
        "deny-wins",
        f"{DOCS} Deny policies (ingressDeny beside an allow-all ingress)",
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: deny-client-80, namespace: prod}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - fromEntities: [all]
          ingressDeny:
          - fromEndpoints: [{matchLabels: {app: client}}]
            toPorts: [{ports: [{port: "80", protocol: TCP}]}]
        """,
        (
            tcp("client", "web", 80, allowed=False), tcp("client", "web", 80, allowed=False, family=6),
            tcp("client", "web", 8080), ping("client", "web"),
            tcp("dev-client", "web", 80),  # the deny's peer is prod's client only
        ),
        ("prod/deny-client-80",),
    ),
    Case(
        "default-deny-off",
        f"{DOCS} Default deny (enableDefaultDeny: ingress false: other traffic passes, a deny still drops)",
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: loose, namespace: prod}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          enableDefaultDeny: {ingress: false}
          ingressDeny:
          - fromEndpoints: [{matchLabels: {app: client}}]
            toPorts: [{ports: [{port: "80", protocol: TCP}]}]
        """,
        (
            tcp("client", "web", 80, allowed=False), tcp("client", "web", 8080), ping("client", "web"),
            tcp("other", "web", 80),
        ),
        ("prod/loose",),
    ),
    Case(
        "named-port-ingress",
        f"{DOCS} Layer 4 examples with a named port (toPorts port: http, the endpoint declares http: 8080)",
        """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: http-in, namespace: prod}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - fromEndpoints: [{matchLabels: {app: client}}]
            toPorts: [{ports: [{port: http, protocol: TCP}]}]
        """,
        (
            tcp("client", "web", 8080), tcp("client", "web", 80, allowed=False),
            tcp("client", "web", 9090, allowed=False),
        ),
        ("prod/http-in",),
    ),
    Case(
        "named-port-egress-per-peer",
        f"{DOCS} Layer 4 examples with a named port on egress (each destination's own number), cluster-wide",
        """
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {name: client-to-http}
        spec:
          endpointSelector: {matchLabels: {app: client}}
          egress:
          - toEndpoints: [{matchLabels: {app: web}}]
            toPorts: [{ports: [{port: http, protocol: TCP}]}]
        """,
        (
            tcp("client", "web", 8080), tcp("client", "dev-web", 9090), tcp("dev-client", "dev-web", 9090),
            tcp("client", "dev-web", 8080, allowed=False), tcp("client", "web", 9090, allowed=False),
        ),
        ("client-to-http",),
    ),
]  # fmt: skip


@dataclass
class Env:
    node: Node
    endpoints: dict[str, orch_pb.Endpoint]

    @property
    def policy(self) -> pb_grpc.PolicyStub:
        return pb_grpc.PolicyStub(self.node.channel("policy"))

    def address(self, name: str, family: int) -> str:
        ep = self.endpoints[name]
        return ep.ipv6 if family == 6 else ep.ipv4

    def source(self, flow: Flow) -> tuple[str, str]:
        """The namespace a flow starts in and the source address to bind (if any)."""
        if flow.src == HOST:
            return self.node.ns, NODE_NET_V4
        if flow.src == WORLD:
            return self.node.outside, OUTSIDE_V4
        return self.endpoints[flow.src].netns, ""

    def passes(self, flow: Flow) -> bool:
        """Whether the flow gets through, on real sockets (a server runs for TCP and UDP)."""
        ns, bind = self.source(flow)
        dst = self.address(flow.dst, flow.family)
        if flow.kind == "ping":
            return traffic.ping(ns, dst, count=1, wait=0.6, source=bind) == 1
        server_ns = self.endpoints[flow.dst].netns
        if flow.kind == "tcp":
            with traffic.server(server_ns, dst, flow.port):
                return traffic.tcp_connects(ns, dst, flow.port, timeout=0.8, source=bind)
        with traffic.server(server_ns, dst, flow.port, "udp", reply=b"r:"):
            return traffic.udp_exchange(ns, dst, flow.port, b"q", timeout=0.8, source=bind) == b"r:q"

    def clear_rules(self) -> None:
        listed = self.policy.ListRules(pb.ListRulesRequest(), timeout=10).rules
        keys = [f"{r.namespace}/{r.name}" if r.namespace else r.name for r in listed]
        if keys:
            self.policy.DeleteRules(pb.DeleteRulesRequest(names=keys), timeout=10)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, built: Path) -> Iterator[Env]:
    name = f"{pid_prefix()}cnp{next(_counter)}"
    node = Node(name, tmp_path_factory.mktemp(name))
    try:
        node.setup()
        node.start("orchestrator")
        node.start("policy")
        made = {
            ep: node.create_endpoint(ep, labels, namespace=ns, named_ports=ports)
            for ep, (ns, labels, ports) in ENDPOINTS.items()
        }
        e = Env(node, made)
        known(e.policy, *made.values(), timeout=10)
        yield e
    finally:
        node.teardown()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cilium_example(env: Env, case: Case) -> None:
    env.policy.ImportRules(pb.ImportRulesRequest(document=textwrap.dedent(case.document)), timeout=10)
    try:
        listed = env.policy.ListRules(pb.ListRulesRequest(), timeout=10).rules
        assert sorted(f"{r.namespace}/{r.name}" if r.namespace else r.name for r in listed) == sorted(case.keys)
        wrong = [str(flow) for flow in case.flows if env.passes(flow) != flow.allowed]
        assert not wrong, f"{case.id} ({case.source}): flows that did not go as Cilium's meaning says: {wrong}"
    finally:
        env.clear_rules()


def test_trace_names_rule_section_and_connection_path(env: Env) -> None:
    """Trace per enforcement point: the deciding rule and section, and how a reply or related packet passes."""
    web, client = env.endpoints["web"], env.endpoints["client"]
    doc = textwrap.dedent("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: web-in, namespace: prod}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - fromEndpoints: [{matchLabels: {app: client}}]
            toPorts: [{ports: [{port: http, protocol: TCP}]}]
          ingressDeny:
          - fromEndpoints: [{matchLabels: {app: client}}]
            toPorts: [{ports: [{port: "22", protocol: TCP}]}]
    """)
    env.policy.ImportRules(pb.ImportRulesRequest(document=doc), timeout=10)
    try:
        trace = env.policy.Trace(pb.TraceRequest(source=client.ipv4, destination=web.ipv4, port=8080, protocol="TCP"))
        assert trace.allowed and trace.path == "policy" and list(trace.deciding_rules) == ["prod/web-in"]
        assert any("prod/web-in (ingress)" in s for s in trace.steps), trace.steps
        denied = env.policy.Trace(
            pb.TraceRequest(source=client.ipv6, destination=web.ipv6, port=22, protocol="TCP", connection="established")
        )
        assert not denied.allowed and denied.path == "policy"
        assert any("prod/web-in (ingressDeny)" in s for s in denied.steps), denied.steps
        # the web's answer to the client's allowed connection is a reply: no lookup
        reply = env.policy.Trace(
            pb.TraceRequest(source=web.ipv4, destination=client.ipv4, port=8080, protocol="TCP", connection="reply")
        )
        assert reply.allowed and reply.path == "reply", reply
        # an ICMP error about it is related; about a denied connection there is none to relate to
        related = env.policy.Trace(
            pb.TraceRequest(source=web.ipv4, destination=client.ipv4, port=8080, protocol="TCP", connection="related")
        )
        assert related.allowed and related.path == "related"
        unrelated = env.policy.Trace(
            pb.TraceRequest(source=web.ipv4, destination=client.ipv4, port=22, protocol="TCP", connection="related")
        )
        assert unrelated.path == "policy" and "no related path" in unrelated.steps[0]
        with pytest.raises(grpc.RpcError) as refused:
            env.policy.Trace(pb.TraceRequest(source=client.ipv4, destination=web.ipv4, port=80, connection="later"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "new, established, reply, related" in (refused.value.details() or "")
    finally:
        env.clear_rules()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"namespace": "Prod"}, "namespace"),
        ({"namespace": "prod", "labels": {"io.kubernetes.pod.namespace": "dev"}}, "io.kubernetes.pod.namespace"),
        ({"named_ports": [orch_pb.NamedPort(name="http", port=0)]}, "named_ports[0].port"),
        ({"named_ports": [orch_pb.NamedPort(name="HTTP", port=80)]}, "named_ports[0].name"),
        ({"named_ports": [orch_pb.NamedPort(name="dns", port=53, protocol="ICMP")]}, "named_ports[0].protocol"),
        ({"named_ports": [orch_pb.NamedPort(name="a", port=1), orch_pb.NamedPort(name="a", port=2)]},
         "named_ports[1].name"),
    ],
)  # fmt: skip
def test_endpoint_namespace_and_named_ports_are_checked(env: Env, change: dict[str, object], field: str) -> None:
    request = orch_pb.CreateEndpointRequest(name="refused", ipv4="198.18.0.250", **change)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as refused:
        env.node.orchestrator().CreateEndpoint(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (refused.value.details() or ""), refused.value.details()
    names = [e.name for e in env.node.orchestrator().ListEndpoints(orch_pb.ListEndpointsRequest()).endpoints]
    assert "refused" not in names


def test_endpoint_carries_namespace_and_named_ports(env: Env) -> None:
    got = env.node.orchestrator().GetEndpoint(orch_pb.GetEndpointRequest(name="web"), timeout=10)
    assert got.namespace == "prod" and got.labels["io.kubernetes.pod.namespace"] == "prod"
    assert [(p.name, p.port, p.protocol) for p in got.named_ports] == [("http", 8080, "TCP")]
    # the namespace is part of the identity: the same app label in another namespace is another identity
    assert env.endpoints["web"].identity != env.endpoints["dev-web"].identity


def test_rules_are_keyed_by_namespace_and_name(env: Env) -> None:
    """Two policies of one name in two namespaces are two rules; a bare name must not pick one at random."""
    [case] = [c for c in CASES if c.id == "same-name-in-two-namespaces"]
    env.policy.ImportRules(pb.ImportRulesRequest(document=textwrap.dedent(case.document)), timeout=10)
    try:
        got = env.policy.GetRule(pb.GetRuleRequest(name="dev/web-policy"), timeout=10)
        assert (got.namespace, got.name) == ("dev", "web-policy")
        with pytest.raises(grpc.RpcError) as get_bare:
            env.policy.GetRule(pb.GetRuleRequest(name="web-policy"), timeout=10)
        with pytest.raises(grpc.RpcError) as delete_bare:
            env.policy.DeleteRules(pb.DeleteRulesRequest(names=["web-policy"]), timeout=10)
        for refused in (get_bare, delete_bare):
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "dev/web-policy, prod/web-policy" in (refused.value.details() or "")
        env.policy.DeleteRules(pb.DeleteRulesRequest(names=["dev/web-policy"]), timeout=10)
        assert env.passes(tcp("dev-client", "dev-web", 80))  # dev's web is no longer selected
        assert not env.passes(tcp("client", "web", 9000))  # prod's rule is untouched
        # with one left, the bare name means it
        assert env.policy.GetRule(pb.GetRuleRequest(name="web-policy"), timeout=10).namespace == "prod"
        with pytest.raises(grpc.RpcError) as missing:
            env.policy.GetRule(pb.GetRuleRequest(name="dev/web-policy"), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        env.clear_rules()


# Fields Cilium knows that this node refuses, and fields nobody knows: each through the real
# service, which must name the field and leave the rules and the maps as they were.
BASE_DOCUMENT = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-in, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
REFUSED = [
    ("toFQDNs", grpc.StatusCode.UNIMPLEMENTED,
     "egress:\n  - toFQDNs: [{matchName: example.com}]\n    toPorts: [{ports: [{port: '443'}]}]"),
    ("nodeSelector", grpc.StatusCode.UNIMPLEMENTED,
     "nodeSelector: {matchLabels: {role: edge}}\n  ingress: [{fromEntities: [world]}]"),
    ("rules", grpc.StatusCode.UNIMPLEMENTED,
     "ingress:\n  - toPorts: [{ports: [{port: '9092', protocol: TCP}], rules: {kafka: [{topic: orders}]}}]"),
    ("protocol", grpc.StatusCode.INVALID_ARGUMENT,
     "ingress:\n  - toPorts: [{ports: [{port: '80'}], rules: {http: [{method: GET}]}}]"),
    ("toServices", grpc.StatusCode.UNIMPLEMENTED, "egress:\n  - toServices: [{k8sService: {serviceName: db}}]"),
    ("fromRequires", grpc.StatusCode.UNIMPLEMENTED,
     "ingress:\n  - fromRequires: [{matchLabels: {env: prod}}]"),
    ("authentication", grpc.StatusCode.UNIMPLEMENTED,
     "ingress:\n  - fromEntities: [cluster]\n    authentication: {mode: required}"),
    ("fromEndpoint", grpc.StatusCode.INVALID_ARGUMENT, "ingress:\n  - fromEndpoint: [{}]"),
    ("icmps", grpc.StatusCode.INVALID_ARGUMENT,
     "ingress:\n  - icmps: [{fields: [{type: 8}]}]\n    toPorts: [{ports: [{port: '80'}]}]"),
]  # fmt: skip


@pytest.mark.parametrize(("field", "code", "body"), REFUSED, ids=[r[0] for r in REFUSED])
def test_a_refused_field_is_named_and_changes_nothing(env: Env, field: str, code: grpc.StatusCode, body: str) -> None:
    """docs.cilium.io .../policy/language/: what this node cannot enforce is refused, never dropped."""
    env.policy.ImportRules(pb.ImportRulesRequest(document=BASE_DOCUMENT), timeout=10)
    try:
        before_rules = env.policy.ListRules(pb.ListRulesRequest(), timeout=10)
        before_map = env.policy.GetEndpointPolicy(pb.GetEndpointPolicyRequest(endpoint="web"), timeout=10)
        # The same policy with the refused part in place of its ingress section.
        refused = BASE_DOCUMENT[: BASE_DOCUMENT.index("  ingress:")] + f"  {body}\n"
        with pytest.raises(grpc.RpcError) as caught:
            env.policy.ImportRules(pb.ImportRulesRequest(document=refused), timeout=10)
        assert caught.value.code() == code, caught.value.details()
        assert field in (caught.value.details() or ""), caught.value.details()
        after_rules = env.policy.ListRules(pb.ListRulesRequest(), timeout=10)
        assert list(after_rules.rules) == list(before_rules.rules) and after_rules.revision == before_rules.revision
        after_map = env.policy.GetEndpointPolicy(pb.GetEndpointPolicyRequest(endpoint="web"), timeout=10)
        assert [(e.identity, e.protocol, e.port, e.deny) for e in after_map.entries] == [
            (e.identity, e.protocol, e.port, e.deny) for e in before_map.entries
        ]
        assert env.passes(Flow("client", "web", "tcp", 80)) and not env.passes(Flow("client", "web", "tcp", 81))
    finally:
        env.clear_rules()
