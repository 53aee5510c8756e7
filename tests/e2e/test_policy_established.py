"""Policy on established flows and related ICMP errors, with real processes and real traffic.

A node runs the orchestrator and the policy service; a client and a server
endpoint talk over TCP and UDP. A rule change that stops allowing an open flow
(its allow rule deleted, or a deny rule added) cuts it at its next packet from
the side that opened it, while the other side's packets, replies of the flow,
still pass. An ICMP error about an allowed flow (port unreachable) reaches the
socket that sent the datagram; for a flow the policy does not allow, none comes.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from weir.common.v1 import common_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.policy.v1 import policy_pb2 as pb
from weir.policy.v1 import policy_pb2_grpc as pb_grpc

from tests.e2e.test_policy import known, sel, tcp, udp
from tests.harness import netns, traffic
from tests.harness.node import Node

pytestmark = pytest.mark.root

TCP_PORT, UDP_PORT, CLOSED_PORT, UNALLOWED_PORT = 8080, 5353, 5399, 5398
WAIT = 1.0  # how long a message that should arrive may take, and how long one that should not is awaited


@dataclass
class Pair:
    node: Node
    client: orch_pb.Endpoint
    server: orch_pb.Endpoint

    @property
    def policy(self) -> pb_grpc.PolicyStub:
        return pb_grpc.PolicyStub(self.node.channel("policy"))

    def reasons(self) -> dict[tuple[str, int], int]:
        reply = self.node.orchestrator().GetMetrics(orch_pb.GetMetricsRequest(), timeout=5)
        return {(r.reason, r.direction): r.counter.packets for r in reply.reasons}

    def counted(self, reason: str, direction: int, before: dict[tuple[str, int], int]) -> int:
        return self.reasons().get((reason, direction), 0) - before.get((reason, direction), 0)


@pytest.fixture
def pair(make_node: Callable[..., Node]) -> Pair:
    node = make_node("orchestrator", "policy")
    p = Pair(node, node.create_endpoint("client", {"app": "client"}), node.create_endpoint("server", {"app": "server"}))
    known(p.policy, p.client, p.server)
    return p


def rules(direction: str) -> list[pb.Rule]:
    """The flow's allow rule ("flow") and a base rule that keeps both directions enforced without it.

    ingress: the server's ingress policy allows the client; egress: the client's egress
    policy allows the server. The base rule allows nothing the flow uses, either way, so
    the flow's replies pass only as replies.
    """
    flow = [tcp(TCP_PORT), udp(UDP_PORT)]
    if direction == "ingress":
        peer = [sel(app="client")]
        return [
            pb.Rule(name="flow", endpoint_selector=sel(app="server"),
                    ingress=[pb.PeerRule(endpoints=peer, ports=flow)]),
            pb.Rule(name="base", endpoint_selector=sel(app="server"),
                    ingress=[pb.PeerRule(endpoints=peer, ports=[tcp(1)])],
                    egress=[pb.PeerRule(endpoints=peer, ports=[tcp(1)])]),
        ]  # fmt: skip
    peer = [sel(app="server")]
    return [
        pb.Rule(name="flow", endpoint_selector=sel(app="client"), egress=[pb.PeerRule(endpoints=peer, ports=flow)]),
        pb.Rule(name="base", endpoint_selector=sel(app="client"),
                ingress=[pb.PeerRule(endpoints=peer, ports=[tcp(1)])],
                egress=[pb.PeerRule(endpoints=peer, ports=[tcp(1)])]),
    ]  # fmt: skip


def deny_rule(direction: str, ports: list[pb.PortRule]) -> pb.Rule:
    if direction == "ingress":
        return pb.Rule(name="deny", endpoint_selector=sel(app="server"),
                       ingress_deny=[pb.PeerRule(endpoints=[sel(app="client")], ports=ports)])  # fmt: skip
    return pb.Rule(name="deny", endpoint_selector=sel(app="client"),
                   egress_deny=[pb.PeerRule(endpoints=[sel(app="server")], ports=ports)])  # fmt: skip


def cut_flow(p: Pair, how: str, direction: str, ports: list[pb.PortRule]) -> str:
    """Stop allowing the flow; returns the drop reason its next packet must be counted under."""
    if how == "delete":
        p.policy.DeleteRules(pb.DeleteRulesRequest(names=["flow"]), timeout=10)
        return "POLICY_DENIED"
    p.policy.ImportRules(pb.ImportRulesRequest(rules=[deny_rule(direction, ports)]), timeout=10)
    return "POLICY_DENY_RULE"


DIRECTIONS = {"ingress": common_pb2.DIRECTION_INGRESS, "egress": common_pb2.DIRECTION_EGRESS}


@contextmanager
def tcp_connection(p: Pair, address: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    """An open TCP connection from the client to the server: (client side, server side)."""
    with netns.entered(p.server.netns):
        listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, TCP_PORT))
        listener.listen(1)
        with netns.entered(p.client.netns):
            client = socket.create_connection((address, TCP_PORT), timeout=WAIT)
        listener.settimeout(WAIT)
        served, _ = listener.accept()
    for sock in (client, served):
        sock.settimeout(WAIT)
        # Each message its own segment at once: after the cut the client's acks no longer reach
        # the server, and Nagle would hold the server's next message back for them.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with client, served:
        yield client, served


def arrives(sock: socket.socket, message: bytes) -> bool:
    """Whether `message` (and nothing else) is the next thing the socket reads within WAIT."""
    got = b""
    deadline = time.monotonic() + WAIT
    while len(got) < len(message) and time.monotonic() < deadline:
        try:
            chunk = sock.recv(len(message) - len(got))
        except TimeoutError:
            break
        if not chunk:
            break
        got += chunk
    assert got in (b"", message), f"read {got!r} where {message!r} or nothing was expected"
    return got == message


@pytest.mark.parametrize("how", ["delete", "deny"])
@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_open_tcp_connection_is_cut_at_its_next_packet(pair: Pair, direction: str, how: str) -> None:
    p = pair
    p.policy.ImportRules(pb.ImportRulesRequest(rules=rules(direction)), timeout=10)
    with tcp_connection(p, p.server.ipv4) as (client, served):
        for n in range(5):
            client.sendall(b"c%03d" % n)
            assert arrives(served, b"c%03d" % n)
            served.sendall(b"s%03d" % n)
            assert arrives(client, b"s%03d" % n)
        before = p.reasons()
        reason = cut_flow(p, how, direction, [tcp(TCP_PORT)])
        # The server's side is the flow's reply direction: not judged (no rule allows it), so it
        # still reaches the client. (Sent first: the client's acks no longer reach the server.)
        served.sendall(b"s005")
        assert arrives(client, b"s005")
        client.sendall(b"c005")
        assert not arrives(served, b"c005"), "the client's next message went through after the policy change"
        assert p.counted(reason, DIRECTIONS[direction], before) >= 1
        other = DIRECTIONS["egress" if direction == "ingress" else "ingress"]
        assert p.counted("POLICY_DENIED", other, before) == 0, "a reply was judged by policy"


@pytest.mark.parametrize("how", ["delete", "deny"])
@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_udp_flow_is_cut_at_its_next_packet(pair: Pair, direction: str, how: str) -> None:
    p = pair
    p.policy.ImportRules(pb.ImportRulesRequest(rules=rules(direction)), timeout=10)
    stream = traffic.CountedStream(p.client.netns, p.server.netns, p.server.ipv6, UDP_PORT, rate=200).start()
    try:
        time.sleep(0.5)
        assert stream.received_so_far() > 20, "the allowed stream did not flow"
        cut_flow(p, how, direction, [udp(UDP_PORT)])
        time.sleep(0.2)  # datagrams in flight at the change
        received = stream.received_so_far()
        time.sleep(0.5)
        assert stream.received_so_far() == received, "datagrams kept arriving after the policy change"
    finally:
        result = stream.finish(drain=0.2)
    assert result.sent > result.received


def icmp_rules() -> list[pb.Rule]:
    """Both sides enforced both ways; only the client's UDP to the server's CLOSED_PORT is allowed.

    No rule allows ICMP: a port unreachable from the server gets back only as related.
    """
    client, server = sel(app="client"), sel(app="server")
    return [
        pb.Rule(name="server", endpoint_selector=server,
                ingress=[pb.PeerRule(endpoints=[client], ports=[udp(CLOSED_PORT)])],
                egress=[pb.PeerRule(endpoints=[client], ports=[tcp(1)])]),
        pb.Rule(name="client", endpoint_selector=client,
                ingress=[pb.PeerRule(endpoints=[server], ports=[tcp(1)])],
                egress=[pb.PeerRule(endpoints=[server], ports=[udp(CLOSED_PORT), udp(UNALLOWED_PORT)])]),
    ]  # fmt: skip


def udp_outcome(p: Pair, address: str, port: int) -> str:
    """Send one datagram on a connected UDP socket and read: "refused", "nothing" or "answered"."""
    with netns.entered(p.client.netns):
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(WAIT)
        sock.connect((address, port))
        sock.send(b"anyone?")
        try:
            sock.recv(64)
        except TimeoutError:
            return "nothing"
        except ConnectionRefusedError as err:
            assert err.errno == errno.ECONNREFUSED
            return "refused"
    return "answered"


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_port_unreachable_reaches_the_client_of_an_allowed_flow_only(pair: Pair, family: str) -> None:
    p = pair
    p.policy.ImportRules(pb.ImportRulesRequest(rules=icmp_rules()), timeout=10)
    address = p.server.ipv4 if family == "v4" else p.server.ipv6
    before = p.reasons()
    assert udp_outcome(p, address, CLOSED_PORT) == "refused"
    for direction in DIRECTIONS.values():
        assert p.counted("POLICY_DENIED", direction, before) == 0, "the related port unreachable was judged"
    # Not allowed into the server: the datagram is dropped there, so no error is ever sent.
    assert udp_outcome(p, address, UNALLOWED_PORT) == "nothing"
    assert p.counted("POLICY_DENIED", common_pb2.DIRECTION_INGRESS, before) >= 1
