"""Generated bad and edge requests at every Policy RPC of a real policy service.

Each message is well formed (protobuf accepts it) but its values are the ones that break
services: empty, huge, NUL, trailing newlines, scoped IPv6, out-of-range numbers, broken
and hostile YAML. The service must answer each with a status a client can act on (never
INTERNAL or UNKNOWN), and a refused call must leave ListRules and ListIdentities as they were.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from weir.common.v1 import common_pb2
from weir.policy.v1 import policy_pb2 as pb
from weir.policy.v1 import policy_pb2_grpc as pb_grpc

from tests.e2e.test_policy import known, sel, three_tier
from tests.harness.node import Node

pytestmark = pytest.mark.root

EDGE_TEXT = [
    "", "x", "x\n", "web\x00", "\x00", " ", "backend", "db", "frontend", "backend-in", "TCP", "udp", "ICMP", "ANY",
    "99", "-1", "fe80::5%eth0", "fe80::5%eth0/128", "10.0.0.0/8", "10.0.0.1/8", "0.0.0.0/0", "::/0", "198.18.0.1",
    "2001:db8::1", "999.1.1.1", "10.0.0.0/33", "a" * 300, "A" * 5000, "é", "\u202e", "In", "NotIn", "Exists",
    "world", "host", "all", "%", "/", "..", "a.b", "-a",
]  # fmt: skip
EDGE_INTS = [0, 1, 80, 255, 256, 1000, 65535, 65536, 2**31, 2**32 - 1]
DOCUMENTS = [
    "metadata: {name: x}\nspec: [1]\n", "metadata: {name: x}\nspec: 7\n", "spec: {}\n", "[[[[[[[[[[", "{a: &a [*a]}",
    "metadata: {name: x}\nspec: " + "[" * 5000 + "]" * 5000, "- 1\n- 2\n", "kind: List\nitems: 5\n",
    "metadata: {name: x}\nspec: {ingress: [{toPorts: [{ports: [{port: [1]}]}]}]}\n",
    "metadata: {name: x}\nspec: {egress: [{toCIDR: ['fe80::1%lo']}]}\n", "\x00", "!!python/object:os.system {}",
    "a: !!binary AAAA\n", "metadata: {name: 'x\\n'}\nspec: {}\n", "---\n---\n", "{\"metadata\": {\"name\": 5}}",
]  # fmt: skip

texts = st.one_of(st.sampled_from(EDGE_TEXT), st.text(max_size=40))
numbers = st.one_of(st.sampled_from(EDGE_INTS), st.integers(0, 2**32 - 1))


@st.composite
def selectors(draw: st.DrawFn) -> pb.EndpointSelector:
    labels = draw(st.dictionaries(texts, texts, max_size=3))
    expressions = draw(st.lists(st.builds(pb.LabelRequirement, key=texts, operator=texts,
                                          values=st.lists(texts, max_size=3)), max_size=2))  # fmt: skip
    return pb.EndpointSelector(match_labels=labels, match_expressions=expressions)


@st.composite
def peers(draw: st.DrawFn) -> pb.PeerRule:
    cidrs = draw(st.lists(st.builds(lambda c, e: pb.CidrRule(cidr=c, **{"except": e}), texts,
                                    st.lists(texts, max_size=2)), max_size=3))  # fmt: skip
    ports = draw(st.lists(st.builds(pb.PortRule, port=numbers, end_port=numbers, protocol=texts), max_size=3))
    return pb.PeerRule(endpoints=draw(st.lists(selectors(), max_size=2)), cidrs=cidrs,
                       entities=draw(st.lists(texts, max_size=2)), ports=ports)  # fmt: skip


@st.composite
def rules(draw: st.DrawFn) -> pb.Rule:
    section = st.lists(peers(), max_size=2)
    return pb.Rule(name=draw(texts), endpoint_selector=draw(selectors()), ingress=draw(section),
                   egress=draw(section), ingress_deny=draw(section), egress_deny=draw(section),
                   description=draw(texts))  # fmt: skip


def calls(stub: pb_grpc.PolicyStub) -> st.SearchStrategy[tuple[str, Callable[[], Any]]]:
    """(name, a call of one RPC with a generated request)."""
    timeout = 20

    def call(name: str, method: Callable[..., Any], request: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return request.map(lambda r: (name, lambda: method(r, timeout=timeout)))

    return st.one_of(
        call("ImportRules", stub.ImportRules, st.builds(pb.ImportRulesRequest, rules=st.lists(rules(), max_size=2))),
        call(
            "ImportRules(document)",
            stub.ImportRules,
            st.builds(pb.ImportRulesRequest, document=st.one_of(st.sampled_from(DOCUMENTS), texts)),
        ),
        call("DeleteRules", stub.DeleteRules, st.builds(pb.DeleteRulesRequest, names=st.lists(texts, max_size=3))),
        call(
            "ListRules",
            stub.ListRules,
            st.builds(pb.ListRulesRequest, page=st.builds(common_pb2.PageRequest, page_size=numbers, page_token=texts)),
        ),
        call("GetRule", stub.GetRule, st.builds(pb.GetRuleRequest, name=texts)),
        call("ListIdentities", stub.ListIdentities, st.just(pb.ListIdentitiesRequest())),
        call("GetEndpointPolicy", stub.GetEndpointPolicy, st.builds(pb.GetEndpointPolicyRequest, endpoint=texts)),
        call("SetAuditMode", stub.SetAuditMode, st.builds(pb.SetAuditModeRequest, endpoint=texts, audit=st.booleans())),
        call(
            "Trace",
            stub.Trace,
            st.builds(pb.TraceRequest, source=texts, destination=texts, port=numbers, protocol=texts),
        ),
        call("ListConntrack", stub.ListConntrack, st.builds(pb.ListConntrackRequest, limit=numbers)),
    )


def test_generated_bad_requests_get_clean_statuses_and_change_nothing(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator", "policy")
    endpoints = [node.create_endpoint(name, {"app": name}) for name in ("frontend", "backend", "db")]
    stub = pb_grpc.PolicyStub(node.channel("policy"))
    known(stub, *endpoints)
    stub.ImportRules(pb.ImportRulesRequest(rules=[*three_tier(), pb.Rule(name="web", endpoint_selector=sel(
        app="frontend"), egress=[pb.PeerRule(cidrs=[pb.CidrRule(cidr="203.0.113.0/24")])])]), timeout=10)  # fmt: skip

    def state() -> tuple[Any, Any]:
        """Rules and identities; the host's link-local addresses come and go with the kernel's DAD, not requests."""
        identities = stub.ListIdentities(pb.ListIdentitiesRequest(), timeout=10).identities
        held = [(i.id, tuple(i.labels), tuple(p for p in i.prefixes if not p.startswith("fe80:"))) for i in identities]
        return stub.ListRules(pb.ListRulesRequest(), timeout=10), held

    seen: dict[str, int] = {}

    @settings(max_examples=500, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(calls(stub))
    def one(named: tuple[str, Callable[[], Any]]) -> None:
        name, rpc = named
        before = state()
        try:
            rpc()
        except grpc.RpcError as exc:
            code = exc.code()
            assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (name, code, exc.details())
            assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{name} took longer than its deadline"
            after = state()
            assert after == before, (
                f"{name} was refused ({code.name}: {exc.details()}) but changed the rules "
                f"or identities:\n{before}\n---\n{after}"
            )
            seen[code.name] = seen.get(code.name, 0) + 1
            return
        seen["OK"] = seen.get("OK", 0) + 1
        settle()

    def settle(timeout: float = 3.0) -> None:
        """After an accepted change, wait for the orchestrator's identity stream to catch up with it."""
        deadline = time.monotonic() + timeout
        last = state()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = state()
            if now == last:
                return
            last = now

    one()
    assert seen.get("INVALID_ARGUMENT", 0) > 50, seen
