"""What the one parser changes for real traffic: extension headers and fragments meet policy.

Two endpoints on a node with the orchestrator and the policy service; the
client sends with real sockets (a TCP socket carrying a Destination Options
header, UDP datagrams larger than the veth MTU, so the kernel fragments them)
and the server's sockets say what arrived.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from weir.common.v1 import common_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.policy.v1 import policy_pb2 as pb
from weir.policy.v1 import policy_pb2_grpc as pb_grpc

from tests.harness import netns, traffic
from tests.harness.node import Node

pytestmark = pytest.mark.root

BIG = 4000  # bytes of UDP payload: fragmented on the wire (MTU 1500)
ALLOWED, DENIED = 5353, 5354
# A Destination Options header of 8 bytes (hdrlen 0) holding one PadN option.
DSTOPTS = bytes([0, 0, 1, 4, 0, 0, 0, 0])
IPV6_DSTOPTS = getattr(socket, "IPV6_DSTOPTS", 59)


@dataclass
class Pair:
    node: Node
    client: orch_pb.Endpoint
    server: orch_pb.Endpoint

    def rules(self, *rules: pb.Rule) -> None:
        stub = pb_grpc.PolicyStub(self.node.channel("policy"))
        stub.ImportRules(pb.ImportRulesRequest(rules=list(rules)), timeout=10)

    def reasons(self) -> dict[tuple[str, int], int]:
        reply = self.node.orchestrator().GetMetrics(orch_pb.GetMetricsRequest(), timeout=5)
        return {(r.reason, r.direction): r.counter.packets for r in reply.reasons}


@pytest.fixture
def pair(make_node: Callable[..., Node]) -> Pair:
    node = make_node("orchestrator", "policy")
    p = Pair(node, node.create_endpoint("client", {"app": "client"}), node.create_endpoint("server", {"app": "server"}))
    stub = pb_grpc.PolicyStub(node.channel("policy"))
    for ep in (p.client, p.server):  # the policy service has seen both
        stub.GetEndpointPolicy(pb.GetEndpointPolicyRequest(endpoint=ep.name), timeout=10)
    return p


def server_rule(ingress: list[pb.PeerRule], ingress_deny: list[pb.PeerRule] | None = None) -> pb.Rule:
    return pb.Rule(
        name="server-in",
        endpoint_selector=pb.EndpointSelector(match_labels={"app": "server"}),
        ingress=ingress,
        ingress_deny=ingress_deny or [],
    )


def tcp_with_dstopts(ns: str, address: str, port: int) -> bool:
    """Whether a TCP exchange succeeds from a socket whose every packet carries a Destination Options header."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DSTOPTS, DSTOPTS)
        sock.settimeout(0.8)
        try:
            sock.connect((address, port))
            sock.sendall(b"probe")
            return sock.recv(64).endswith(b"probe")
        except OSError:
            return False


def test_destination_options_do_not_hide_a_denied_port(pair: Pair) -> None:
    """Allow all ingress but TCP/22: a SYN to 22 behind a Destination Options header is denied."""
    server = pair.server
    pair.rules(server_rule(
        ingress=[pb.PeerRule(entities=["all"])],
        ingress_deny=[pb.PeerRule(entities=["all"], ports=[pb.PortRule(port=22, protocol="TCP")])],
    ))  # fmt: skip
    ingress = common_pb2.DIRECTION_INGRESS
    with traffic.server(server.netns, server.ipv6, 80), traffic.server(server.netns, server.ipv6, 22):
        assert tcp_with_dstopts(pair.client.netns, server.ipv6, 80)  # the header itself is fine
        before = pair.reasons().get(("POLICY_DENY_RULE", ingress), 0)
        assert not tcp_with_dstopts(pair.client.netns, server.ipv6, 22)
        assert pair.reasons().get(("POLICY_DENY_RULE", ingress), 0) > before  # denied by the rule, for TCP/22
        assert not traffic.tcp_connects(pair.client.netns, server.ipv6, 22, timeout=0.8)


def big_exchange(ns: str, address: str, port: int, tag: bytes) -> bytes | None:
    """Send one BIG datagram, return the server's (also fragmented) answer or None."""
    return traffic.udp_exchange(ns, address, port, tag * BIG, timeout=1.0)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_fragmented_datagrams_to_an_allowed_port_arrive(pair: Pair, family: str) -> None:
    pair.rules(server_rule(ingress=[pb.PeerRule(
        endpoints=[pb.EndpointSelector(match_labels={"app": "client"})],
        ports=[pb.PortRule(port=ALLOWED, protocol="UDP")],
    )]))  # fmt: skip
    address = getattr(pair.server, family)
    with traffic.server(pair.server.netns, address, ALLOWED, "udp", reply=b"r:") as srv:
        for tag in (b"a", b"b", b"c"):
            assert big_exchange(pair.client.netns, address, ALLOWED, tag) == b"r:" + tag * BIG
        assert [len(data) for data, _ in srv.received] == [BIG] * 3
    with traffic.server(pair.server.netns, address, DENIED, "udp", reply=b"r:") as srv:
        assert big_exchange(pair.client.netns, address, DENIED, b"d") is None
        assert srv.received == []


def send_big(ns: str, address: str, port: int, count: int) -> None:
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with sock:
        for i in range(count):
            sock.sendto(bytes([i]) * BIG, (address, port))


def test_v6_fragments_to_a_denied_port_stay_denied_between_endpoints_with_fragmented_flows(pair: Pair) -> None:
    """Fragmented flows the policy allowed (the server's own, and one to an allowed port)
    open no conntrack entry that fragments to a denied port could ride on."""
    client, server = pair.client, pair.server
    pair.rules(server_rule(ingress=[pb.PeerRule(
        endpoints=[pb.EndpointSelector(match_labels={"app": "client"})],
        ports=[pb.PortRule(port=ALLOWED, protocol="UDP")],
    )]))  # fmt: skip
    with traffic.server(client.netns, client.ipv6, 7000, "udp") as at_client:
        send_big(server.netns, client.ipv6, 7000, 3)  # the server's egress is not enforced
        deadline = time.monotonic() + 2
        while len(at_client.received) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(at_client.received) == 3
    with traffic.server(server.netns, server.ipv6, DENIED, "udp") as denied:
        send_big(client.netns, server.ipv6, DENIED, 3)
        time.sleep(0.5)
        assert denied.received == []
        with traffic.server(server.netns, server.ipv6, ALLOWED, "udp", reply=b"r:"):
            assert big_exchange(client.netns, server.ipv6, ALLOWED, b"a") == b"r:" + b"a" * BIG
        send_big(client.netns, server.ipv6, DENIED, 3)
        time.sleep(0.5)
        assert denied.received == []
