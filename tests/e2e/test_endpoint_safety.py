"""A new endpoint is never open: its traffic waits for its policy (real orchestrator, policy, traffic).

Between the moment the orchestrator attaches the entry programs to a new endpoint and the
moment the policy service installs that endpoint's map, the policy program sees an endpoint
without a config and lets everything through, creating conntrack entries that keep the flow
open afterwards. These tests send to the new endpoint's address from before it exists and
check that nothing policy denies ever gets through or into conntrack, also after an
orchestrator restart.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.policy.v1 import policy_pb2 as pb
from weir.policy.v1 import policy_pb2_grpc as pb_grpc

from pybpf import Map
from services.common.datapath import CtKey, CtScope, CtValue
from tests.harness import netns, traffic
from tests.harness.node import Node

pytestmark = pytest.mark.root

DENIED_PORT = 9999


class Prober:
    """UDP datagrams from one namespace to an address, every millisecond; counts replies."""

    def __init__(self, ns: str, address: str, port: int) -> None:
        with netns.entered(ns):
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.settimeout(0.001)
        self._target = (address, port)
        self._stop = threading.Event()
        self.sent = 0
        self.replies = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self._sock.sendto(b"probe", self._target)
                self.sent += 1
            with contextlib.suppress(OSError):
                if self._sock.recv(64):
                    self.replies += 1

    @contextlib.contextmanager
    def running(self) -> Iterator[Prober]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=2)
            self._sock.close()


def next_ipv4(node: Node) -> str:
    """The address Node.create_endpoint gives the next endpoint."""
    return f"198.18.0.{node.endpoint_count + 10}"


def ct_entries_into(node: Node, address: str) -> list[str]:
    """Conntrack entries of flows into this IPv4 address at its own ingress (what its policy admitted)."""
    raw = ipaddress.ip_address(address).packed
    with Map.from_pin(node.bpffs_root / "globals/conntrack", key_type=CtKey, value_type=CtValue) as ct:
        return [
            f"{ipaddress.ip_address(bytes(k.saddr[:4]))} -> {address} proto {k.proto}"
            for k in ct.keys()  # noqa: SIM118 - a BPF map, not a dict
            if k.family == socket.AF_INET and k.dir == CtScope.INGRESS and bytes(k.daddr[:4]) == raw
        ]


def pending_drops(node: Node) -> int:
    reply = node.orchestrator().GetMetrics(orch_pb.GetMetricsRequest(), timeout=5)
    return sum(r.counter.packets for r in reply.reasons if r.reason == "POLICY_PENDING")


def db_rule() -> pb.Rule:
    """The db takes TCP 5432 from the backend only: DENIED_PORT from anyone is denied."""
    return pb.Rule(
        name="db-in",
        endpoint_selector=pb.EndpointSelector(match_labels={"app": "db"}),
        ingress=[pb.PeerRule(endpoints=[pb.EndpointSelector(match_labels={"app": "backend"})],
                             ports=[pb.PortRule(port=5432, protocol="TCP")])],
    )  # fmt: skip


def create_under_fire(node: Node, peer: orch_pb.Endpoint, name: str) -> tuple[orch_pb.Endpoint, Prober]:
    """Create an endpoint while the peer sends to its (future) address; then answer on the denied port."""
    target = next_ipv4(node)
    with Prober(peer.netns, target, DENIED_PORT).running() as prober:
        time.sleep(0.1)
        endpoint = node.create_endpoint(name, {"app": "db"}, ipv6=False)
        assert endpoint.ipv4 == target
        with traffic.server(endpoint.netns, endpoint.ipv4, DENIED_PORT, "udp", reply=b"r:"):
            time.sleep(1.0)
    assert prober.sent > 500, "the prober did not send"
    return endpoint, prober


def test_new_endpoint_admits_nothing_before_its_policy_also_after_a_restart(
    make_node: Callable[..., Node],
) -> None:
    node = make_node("orchestrator", "policy")
    peer = node.create_endpoint("peer", {"app": "peer"}, ipv6=False)
    pb_grpc.PolicyStub(node.channel("policy")).ImportRules(pb.ImportRulesRequest(rules=[db_rule()]), timeout=10)

    for name in ("db", "db-after-restart"):
        drops = pending_drops(node)
        endpoint, prober = create_under_fire(node, peer, name)
        assert not endpoint.policy_pending, "CreateEndpoint returned before the endpoint's policy was installed"
        assert prober.replies == 0, f"{name}: {prober.replies} replies on a port policy denies"
        assert ct_entries_into(node, endpoint.ipv4) == [], f"{name}: a denied flow got into conntrack"
        assert pending_drops(node) > drops, f"{name}: nothing was held back while the policy was pending"
        got = node.orchestrator().GetEndpoint(orch_pb.GetEndpointRequest(name=name), timeout=5)
        assert not got.policy_pending
        if name == "db":
            node.kill("orchestrator")
            node.start("orchestrator")


def test_without_policy_nothing_waits(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator")
    started = time.monotonic()
    a = node.create_endpoint("a")
    b = node.create_endpoint("b")
    assert time.monotonic() - started < 4.0
    assert not a.policy_pending and not b.policy_pending
    assert traffic.ping(a.netns, b.ipv4, count=2) == 2


def test_policy_ready_from_a_stranger_changes_nothing(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator")
    a = node.create_endpoint("a")
    before = node.orchestrator().ListEndpoints(orch_pb.ListEndpointsRequest(), timeout=5)
    bogus = orch_pb.EndpointPolicyReadyRequest(endpoints=[
        orch_pb.EndpointPolicyReadyRequest.Ready(name="a", id=a.id + 1),
        orch_pb.EndpointPolicyReadyRequest.Ready(name="nope", id=1),
    ])  # fmt: skip
    assert list(node.orchestrator().EndpointPolicyReady(bogus, timeout=5).released) == []
    assert node.orchestrator().ListEndpoints(orch_pb.ListEndpointsRequest(), timeout=5) == before


def test_pending_endpoint_stays_closed_without_policy_across_a_restart(make_node: Callable[..., Node]) -> None:
    """With the policy service down, a new endpoint returns pending and stays dropped, also after
    an orchestrator restart, until the policy service is back and has installed its map."""
    node = make_node("orchestrator", "policy")
    peer = node.create_endpoint("peer", {"app": "peer"}, ipv6=False)
    node.kill("policy")
    stub = node.orchestrator()
    request = orch_pb.CreateEndpointRequest(name="late", ipv4="198.18.3.3", labels={"app": "web"}, policy_wait_ms=300)
    started = time.monotonic()
    late = stub.CreateEndpoint(request, timeout=10)
    assert late.policy_pending and time.monotonic() - started < 3
    assert traffic.ping(peer.netns, late.ipv4, count=2, wait=0.5) == 0
    drops = pending_drops(node)
    assert drops > 0

    node.kill("orchestrator")
    node.start("orchestrator")
    assert node.orchestrator().GetEndpoint(orch_pb.GetEndpointRequest(name="late"), timeout=5).policy_pending
    assert traffic.ping(peer.netns, late.ipv4, count=2, wait=0.5) == 0
    assert pending_drops(node) > drops

    node.start("policy")
    deadline = time.monotonic() + 10
    while node.orchestrator().GetEndpoint(orch_pb.GetEndpointRequest(name="late"), timeout=5).policy_pending:
        assert time.monotonic() < deadline, "the policy service never said the endpoint's policy is installed"
        time.sleep(0.1)
    assert traffic.ping(peer.netns, late.ipv4, count=2) == 2
