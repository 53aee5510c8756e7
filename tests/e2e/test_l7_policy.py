"""L7 policy end to end: policy rules with HTTP sections, the datapath redirect, a real Envoy.

A node runs the orchestrator, policy and l7 services; a client and a server endpoint (and
the outside namespace) talk real HTTP. The server's HTTP server records what reaches it,
so a 403 from Envoy (nothing upstream) is told apart from an answer of the server.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from weir.common.v1 import common_pb2
from weir.l7.v1 import l7_pb2 as l7pb
from weir.l7.v1 import l7_pb2_grpc as l7_grpc
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc
from weir.policy.v1 import policy_pb2 as pb
from weir.policy.v1 import policy_pb2_grpc as pb_grpc

from tests.harness import netns
from tests.harness.l7 import Upstream, running, start_upstream
from tests.harness.node import OUTSIDE_V4, Node

pytestmark = pytest.mark.root

PORT = 80
OTHER_PORT = 8080
DENIED = "RBAC: access denied"
WAIT = 30.0


@dataclass
class L7Node:
    node: Node
    client: orch_pb.Endpoint
    server: orch_pb.Endpoint
    web: Upstream  # the server endpoint's HTTP server on PORT
    other: Upstream  # and on OTHER_PORT

    @property
    def policy(self) -> pb_grpc.PolicyStub:
        return pb_grpc.PolicyStub(self.node.channel("policy"))

    @property
    def l7(self) -> l7_grpc.L7Stub:
        return l7_grpc.L7Stub(self.node.channel("l7"))

    def apply(self, *rules: pb.Rule, expect: dict[str, int]) -> None:
        """Import rules; wait until each endpoint of `expect` has that many listeners, acknowledged by Envoy."""
        self.policy.ImportRules(pb.ImportRulesRequest(rules=list(rules)), timeout=15)
        self.wait_listeners(expect)

    def wait_listeners(self, expect: dict[str, int]) -> l7pb.State:
        deadline = time.monotonic() + WAIT
        while True:
            state = self.l7.GetState(l7pb.GetStateRequest(), timeout=5)
            have = {ep.endpoint: len(ep.listeners) for ep in state.endpoints}
            if (
                all(have.get(name, 0) == n for name, n in expect.items())
                and state.acked_version == state.config_version
                and state.envoy.ready
            ):
                return state
            assert time.monotonic() < deadline, (expect, state)
            time.sleep(0.1)

    def listeners(self, endpoint: str) -> list[l7pb.Listener]:
        state = self.l7.GetState(l7pb.GetStateRequest(endpoint=endpoint), timeout=5)
        return [x for ep in state.endpoints for x in ep.listeners]


def request(
    ns: str, address: str, port: int, method: str, path: str, headers: dict[str, str] | None = None,
    timeout: float = 5.0, source: str = "",
) -> tuple[int, str]:  # fmt: skip
    """One HTTP request from namespace `ns`: (status, body)."""
    with netns.entered(ns):
        sock = socket.create_connection(
            (address, port), timeout=timeout, source_address=(source, 0) if source else None
        )
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    conn.sock = sock
    try:
        conn.request(method, path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.read().decode()
    finally:
        conn.close()


def refused(ns: str, address: str, port: int) -> bool:
    """Whether a request cannot even connect (the datapath dropped its SYN).

    The wait is shorter than TCP's first SYN retransmission (1 s), so a proxy that comes
    back meanwhile cannot turn a dropped SYN into a connection.
    """
    try:
        request(ns, address, port, "GET", "/public/gap", timeout=0.7)
    except (TimeoutError, ConnectionError, OSError):
        return True
    return False


def sel(**labels: str) -> pb.EndpointSelector:
    return pb.EndpointSelector(match_labels=labels)


def http_port(port: int, *rules: pb.HttpRule) -> pb.PortRule:
    return pb.PortRule(port=port, protocol="TCP", http=list(rules))


def server_in(*ports: pb.PortRule, name: str = "server-l7", peers: list[pb.EndpointSelector] | None = None) -> pb.Rule:
    """The server's ingress: from the client (or `peers`) on these ports."""
    peer = pb.PeerRule(endpoints=peers if peers is not None else [sel(app="client")], ports=list(ports))
    return pb.Rule(name=name, endpoint_selector=sel(app="server"), ingress=[peer])


def client_out(*ports: pb.PortRule, name: str = "client-l7") -> pb.Rule:
    """The client's egress: to the server on these ports."""
    peer = pb.PeerRule(endpoints=[sel(app="server")], ports=list(ports))
    return pb.Rule(name=name, endpoint_selector=sel(app="client"), egress=[peer])


PUBLIC = pb.HttpRule(method="GET", path="/public(/.*)?")


@pytest.fixture
def l7node(make_node: Callable[..., Node]) -> Iterator[L7Node]:
    node = make_node("orchestrator")
    node.start_together("policy", "l7")  # l7 waits for nobody; policy retries its pushes to l7
    client = node.create_endpoint("client", {"app": "client"})
    server = node.create_endpoint("server", {"app": "server"})
    with netns.entered(server.netns):
        web = start_upstream(server.ipv4, PORT)
        other = start_upstream(server.ipv4, OTHER_PORT)
    deadline = time.monotonic() + WAIT
    while True:  # policy follows the endpoints from the orchestrator's stream
        try:
            pb_grpc.PolicyStub(node.channel("policy")).GetEndpointPolicy(
                pb.GetEndpointPolicyRequest(endpoint="server"), timeout=5
            )
            pb_grpc.PolicyStub(node.channel("policy")).GetEndpointPolicy(
                pb.GetEndpointPolicyRequest(endpoint="client"), timeout=5
            )
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    try:
        yield L7Node(node, client, server, web, other)
    finally:
        web.server.shutdown()
        other.server.shutdown()
        web.server.server_close()
        other.server.server_close()


def test_ingress_rule_allows_public_denies_admin_with_403(l7node: L7Node) -> None:
    c = l7node
    c.apply(server_in(http_port(PORT, PUBLIC)), expect={"server": 1})
    (listener,) = c.listeners("server")
    assert listener.direction == common_pb2.DIRECTION_INGRESS and listener.port == PORT and listener.transparent
    shown = c.policy.GetEndpointPolicy(pb.GetEndpointPolicyRequest(endpoint="server"), timeout=5)
    assert {e.proxy_port for e in shown.entries if e.port == PORT} == {listener.proxy_port}
    assert request(c.client.netns, c.server.ipv4, PORT, "GET", "/public") == (200, "upstream GET /public")
    status, body = request(c.client.netns, c.server.ipv4, PORT, "POST", "/admin")
    assert (status, body) == (403, DENIED)
    assert not c.web.got("POST", "/admin")
    # The upstream saw the proxy's connection, not the client's: the flow went through Envoy.
    assert c.web.got("GET", "/public")


def test_egress_rule_on_the_client(l7node: L7Node) -> None:
    c = l7node
    c.apply(client_out(http_port(PORT, PUBLIC)), expect={"client": 1})
    (listener,) = c.listeners("client")
    assert listener.direction == common_pb2.DIRECTION_EGRESS
    assert request(c.client.netns, c.server.ipv4, PORT, "GET", "/public/x") == (200, "upstream GET /public/x")
    assert request(c.client.netns, c.server.ipv4, PORT, "DELETE", "/public") == (403, DENIED)
    assert not c.web.got("DELETE", "/public")


def test_network_to_endpoint(l7node: L7Node) -> None:
    c = l7node
    world = pb.PeerRule(entities=["world"], ports=[http_port(PORT, PUBLIC)])
    c.apply(pb.Rule(name="from-world", endpoint_selector=sel(app="server"), ingress=[world]), expect={"server": 1})
    assert request(c.node.outside, c.server.ipv4, PORT, "GET", "/public", source=OUTSIDE_V4)[0] == 200
    assert request(c.node.outside, c.server.ipv4, PORT, "PUT", "/public", source=OUTSIDE_V4) == (403, DENIED)


def test_envoy_killed_requests_refused_then_work_again(l7node: L7Node) -> None:
    c = l7node
    c.apply(server_in(http_port(PORT, PUBLIC)), expect={"server": 1})
    assert request(c.client.netns, c.server.ipv4, PORT, "GET", "/public")[0] == 200
    before = c.l7.GetState(l7pb.GetStateRequest(), timeout=5).envoy
    os.kill(before.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while running(before.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert refused(c.client.netns, c.server.ipv4, PORT)
    assert not c.web.got("GET", "/public/gap")
    assert flows(c.node, reason="PROXY_UNAVAILABLE"), "the gap's packets drop with their own reason"
    deadline = time.monotonic() + WAIT
    while True:
        state = c.l7.GetState(l7pb.GetStateRequest(), timeout=5)
        if state.envoy.restarts > before.restarts and state.envoy.ready and state.acked_version == state.config_version:
            try:
                if request(c.client.netns, c.server.ipv4, PORT, "GET", "/public", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert request(c.client.netns, c.server.ipv4, PORT, "POST", "/admin") == (403, DENIED)


def flows(node: Node, type_: str = "", reason: str = "") -> list[orch_pb.Flow]:
    """The orchestrator's buffered flows of one event type or drop reason."""
    request = orch_pb.GetFlowsRequest(reasons=[reason] if reason else [])
    with node.channel("orchestrator") as channel:
        replies = list(orch_grpc.OrchestratorStub(channel).GetFlows(request, timeout=10))
    return [r.flow for r in replies if r.HasField("flow") and (not type_ or r.flow.type == type_)]


def test_header_and_host_rules_each_allow_and_deny(l7node: L7Node) -> None:
    c = l7node
    token = pb.HttpRule(headers=[pb.HttpHeaderMatch(name="X-Token", value="s3cret")])
    traced = pb.HttpRule(method="PUT", headers=[pb.HttpHeaderMatch(name="x-trace")])
    api = pb.HttpRule(host=r"api\.example\.com(:[0-9]+)?")
    c.apply(server_in(http_port(PORT, token, traced, api)), expect={"server": 1})
    ns, ip = c.client.netns, c.server.ipv4
    assert request(ns, ip, PORT, "POST", "/a", {"X-Token": "s3cret"})[0] == 200
    assert request(ns, ip, PORT, "POST", "/a", {"X-Token": "wrong"}) == (403, DENIED)
    assert request(ns, ip, PORT, "PUT", "/t", {"x-trace": "1"})[0] == 200
    assert request(ns, ip, PORT, "PUT", "/t") == (403, DENIED)
    assert request(ns, ip, PORT, "GET", "/h", {"Host": "api.example.com"})[0] == 200
    assert request(ns, ip, PORT, "GET", "/h", {"Host": "www.example.com"}) == (403, DENIED)
    assert not c.web.got("POST", "/a") or len([x for x in c.web.seen if x[1] == "/a"]) == 1


def test_port_without_l7_rules_is_not_proxied(l7node: L7Node) -> None:
    c = l7node
    l4 = pb.PortRule(port=OTHER_PORT, protocol="TCP")
    c.apply(server_in(http_port(PORT, PUBLIC), l4), expect={"server": 1})
    assert [x.port for x in c.listeners("server")] == [PORT]
    assert request(c.client.netns, c.server.ipv4, OTHER_PORT, "POST", "/admin")[0] == 200
    assert request(c.client.netns, c.server.ipv4, PORT, "GET", "/public")[0] == 200
    # The L4-only port reached the server from the client itself; the L7 port from the proxy.
    assert c.other.peers == [c.client.ipv4]
    assert c.web.peers and c.client.ipv4 not in c.web.peers
    counters = c.l7.GetCounters(l7pb.GetCountersRequest(endpoint="server"), timeout=5).counters
    assert {x.port for x in counters} <= {PORT}
    redirects = flows(c.node, "PROXY_REDIRECT")
    assert {f.dst_port for f in redirects} == {PORT}


def test_rule_change_applies_on_open_keepalive_connection_and_removal_goes_direct(l7node: L7Node) -> None:
    c = l7node
    c.apply(server_in(http_port(PORT, PUBLIC)), expect={"server": 1})
    with netns.entered(c.client.netns):
        sock = socket.create_connection((c.server.ipv4, PORT), timeout=5)
    conn = http.client.HTTPConnection(c.server.ipv4, PORT, timeout=5)
    conn.sock = sock
    conn.auto_open = 0  # a closed connection raises instead of quietly reconnecting

    def ask(method: str, path: str) -> int:
        conn.request(method, path)
        reply = conn.getresponse()
        reply.read()
        return reply.status

    try:
        assert ask("GET", "/public") == 200
        assert ask("POST", "/admin") == 403
        before = c.l7.GetState(l7pb.GetStateRequest(), timeout=5).config_version
        admin = pb.HttpRule(method="POST", path="/admin")
        c.policy.ImportRules(pb.ImportRulesRequest(rules=[server_in(http_port(PORT, PUBLIC, admin))]), timeout=15)
        deadline = time.monotonic() + WAIT
        while True:
            state = c.wait_listeners({"server": 1})
            if state.config_version > before:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert ask("POST", "/admin") == 200  # same connection, new rules
        assert ask("GET", "/public") == 200
        assert conn.sock is sock
    finally:
        conn.close()
    # The last L7 rule of the port goes: its flows go direct again and the listener goes away.
    c.apply(server_in(pb.PortRule(port=PORT, protocol="TCP")), expect={"server": 0})
    assert c.listeners("server") == []
    c.web.peers.clear()
    assert request(c.client.netns, c.server.ipv4, PORT, "DELETE", "/anything")[0] == 200
    assert c.web.peers == [c.client.ipv4]


def test_access_log_events_and_rule_counters(l7node: L7Node) -> None:
    c = l7node
    c.apply(server_in(http_port(PORT, PUBLIC)), expect={"server": 1})
    assert request(c.client.netns, c.server.ipv4, PORT, "GET", "/public/1")[0] == 200
    assert request(c.client.netns, c.server.ipv4, PORT, "POST", "/admin")[0] == 403
    deadline = time.monotonic() + WAIT
    while True:
        counters = {x.rule: x for x in c.l7.GetCounters(l7pb.GetCountersRequest(endpoint="server")).counters}
        if counters.get("server-l7#1") and counters["server-l7#1"].allowed >= 1 and "" in counters:
            break
        assert time.monotonic() < deadline, counters
        time.sleep(0.1)
    assert counters[""].denied >= 1
    stream = c.l7.WatchEvents(l7pb.WatchEventsRequest(endpoint="server", replay=True), timeout=10)
    seen = []
    for event in stream:
        seen.append((event.method, event.path, event.status, event.rule, event.verdict))
        if len(seen) == 2:
            break
    stream.cancel()
    assert ("GET", "/public/1", 200, "server-l7#1", l7pb.VERDICT_ALLOWED) in seen
    assert ("POST", "/admin", 403, "", l7pb.VERDICT_DENIED) in seen


def test_egress_proxy_upstream_is_judged_as_the_client_by_the_server(l7node: L7Node) -> None:
    c = l7node
    c.apply(
        client_out(http_port(PORT, PUBLIC)),
        server_in(pb.PortRule(port=PORT, protocol="TCP")),
        expect={"client": 1, "server": 0},
    )
    assert request(c.client.netns, c.server.ipv4, PORT, "GET", "/public")[0] == 200
    # The server admits only another label now: the proxy's upstream, carrying the client's
    # identity in its mark, is dropped at the server, and Envoy answers 503.
    c.apply(server_in(pb.PortRule(port=PORT, protocol="TCP"), peers=[sel(app="nobody")]), expect={"client": 1})
    status, _ = request(c.client.netns, c.server.ipv4, PORT, "GET", "/public/late", timeout=10)
    assert status == 503
    assert not c.web.got("GET", "/public/late")


def test_l7_ports_fail_closed_while_l7_is_down_and_proxy_ports_survive_a_policy_restart(l7node: L7Node) -> None:
    c = l7node
    c.node.kill("l7", signal.SIGTERM)
    deadline = time.monotonic() + WAIT
    while any(running(int(p.read_text())) for p in c.node.run_dir.glob("l7/envoy.pid")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    l4 = pb.PortRule(port=OTHER_PORT, protocol="TCP")
    c.policy.ImportRules(pb.ImportRulesRequest(rules=[server_in(http_port(PORT, PUBLIC), l4)]), timeout=15)
    assert refused(c.client.netns, c.server.ipv4, PORT)  # no proxy: never let through unchecked
    assert not c.web.got("GET", "/public/gap")
    assert request(c.client.netns, c.server.ipv4, OTHER_PORT, "GET", "/x")[0] == 200  # L4 policy works on
    shown = c.policy.GetEndpointPolicy(pb.GetEndpointPolicyRequest(endpoint="server"), timeout=5)
    ports = {e.proxy_port for e in shown.entries if e.port == PORT}
    assert len(ports) == 1 and 0 not in ports
    c.node.start("l7")
    c.wait_listeners({"server": 1})
    assert request(c.client.netns, c.server.ipv4, PORT, "GET", "/public")[0] == 200
    # A restarted policy service gives the port the proxy port it had.
    c.node.kill("policy", signal.SIGTERM)
    c.node.start("policy")
    shown = c.policy.GetEndpointPolicy(pb.GetEndpointPolicyRequest(endpoint="server"), timeout=5)
    assert {e.proxy_port for e in shown.entries if e.port == PORT} == ports
    (listener,) = c.wait_listeners({"server": 1}).endpoints[0].listeners
    assert {listener.proxy_port} == ports
    assert request(c.client.netns, c.server.ipv4, PORT, "POST", "/admin") == (403, DENIED)


# Cilium's HTTP example (docs: security/policy/language, "Layer 7 Examples"), with the labels of
# this test's endpoints: GET /public(/...) allowed, PUT /avatar with a header, nothing else.
CNP_L7 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: rule1
spec:
  endpointSelector:
    matchLabels:
      app: server
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      rules:
        http:
        - method: GET
          path: "/public(/.*)?"
        - method: PUT
          path: "/avatar"
          headers:
          - 'X-My-Header: true'
"""


def test_a_cilium_l7_policy_document_is_enforced(l7node: L7Node) -> None:
    c = l7node
    c.policy.ImportRules(pb.ImportRulesRequest(document=CNP_L7), timeout=15)
    c.wait_listeners({"server": 1})
    got = c.policy.GetRule(pb.GetRuleRequest(name="default/rule1"), timeout=5)
    assert [h.path for h in got.ingress[0].ports[0].http] == ["/public(/.*)?", "/avatar"]
    server = c.server.ipv4
    assert request(c.client.netns, server, PORT, "GET", "/public/a") == (200, "upstream GET /public/a")
    assert request(c.client.netns, server, PORT, "PUT", "/avatar", {"X-My-Header": "true"})[0] == 200
    assert request(c.client.netns, server, PORT, "PUT", "/avatar", {"X-My-Header": "false"}) == (403, DENIED)
    assert request(c.client.netns, server, PORT, "PUT", "/avatar") == (403, DENIED)
    assert request(c.client.netns, server, PORT, "GET", "/private") == (403, DENIED)
    assert not c.web.got("GET", "/private")


def test_a_bad_l7_rule_is_refused_before_envoy_and_changes_nothing(l7node: L7Node) -> None:
    c = l7node
    c.apply(server_in(http_port(PORT, PUBLIC)), expect={"server": 1})
    before = c.l7.GetState(l7pb.GetStateRequest(), timeout=5)
    rules_before = c.policy.ListRules(pb.ListRulesRequest(), timeout=5)
    bad = server_in(http_port(PORT, pb.HttpRule(method="GET", path="/public(")), name="server-l7")
    with pytest.raises(grpc.RpcError) as err:
        c.policy.ImportRules(pb.ImportRulesRequest(rules=[bad]), timeout=15)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ingress[0].ports[0].http[0].path" in (err.value.details() or "")
    bad_doc = CNP_L7.replace('path: "/avatar"', 'path: "(?=x)"')
    with pytest.raises(grpc.RpcError) as err:
        c.policy.ImportRules(pb.ImportRulesRequest(document=bad_doc), timeout=15)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "http[1].path" in (err.value.details() or "")
    after = c.l7.GetState(l7pb.GetStateRequest(), timeout=5)
    assert after.config_version == before.config_version and not after.HasField("last_nack")
    assert c.policy.ListRules(pb.ListRulesRequest(), timeout=5) == rules_before
    assert request(c.client.netns, c.server.ipv4, PORT, "GET", "/public")[0] == 200


def test_l7_requests_become_flows_in_the_node_stream(l7node: L7Node) -> None:
    c = l7node
    c.apply(server_in(http_port(PORT, PUBLIC)), expect={"server": 1})
    assert request(c.client.netns, c.server.ipv4, PORT, "GET", "/public/flow")[0] == 200
    assert request(c.client.netns, c.server.ipv4, PORT, "POST", "/admin/flow")[0] == 403
    orchestrator = orch_grpc.OrchestratorStub(c.node.channel("orchestrator"))
    deadline = time.monotonic() + WAIT
    while True:
        flows = [
            item.flow
            for item in orchestrator.GetFlows(orch_pb.GetFlowsRequest(endpoints=["server"]), timeout=10)
            if item.HasField("flow") and item.flow.type == "L7"
        ]
        if len(flows) >= 2:
            break
        assert time.monotonic() < deadline, flows
        time.sleep(0.2)
    seen = {(f.l7.method, f.l7.path): f for f in flows}
    allowed, denied = seen[("GET", "/public/flow")], seen[("POST", "/admin/flow")]
    assert (allowed.verdict, allowed.l7.status, allowed.l7.rule) == ("FORWARDED", 200, "server-l7#1")
    assert (denied.verdict, denied.reason, denied.l7.status, denied.l7.rule) == ("DROPPED", "POLICY_DENIED", 403, "")
    for flow in (allowed, denied):
        assert flow.source.endpoint == "client" and flow.destination.endpoint == "server"
        assert flow.dst == c.server.ipv4 and flow.dst_port == PORT and flow.protocol == "TCP"
    only_denied = orchestrator.GetFlows(orch_pb.GetFlowsRequest(endpoints=["server"], verdicts=["DROPPED"]), timeout=10)
    assert all(i.flow.verdict == "DROPPED" for i in only_denied if i.HasField("flow"))


def test_egress_rule_to_the_network(l7node: L7Node) -> None:
    c = l7node
    with netns.entered(c.node.outside):
        outside = start_upstream(OUTSIDE_V4, PORT)
    try:
        world = pb.PeerRule(entities=["world"], ports=[http_port(PORT, PUBLIC)])
        c.apply(pb.Rule(name="to-world", endpoint_selector=sel(app="client"), egress=[world]), expect={"client": 1})
        assert request(c.client.netns, OUTSIDE_V4, PORT, "GET", "/public")[0] == 200
        assert request(c.client.netns, OUTSIDE_V4, PORT, "POST", "/admin") == (403, DENIED)
        assert outside.got("GET", "/public") and not outside.got("POST", "/admin")
        assert c.client.ipv4 not in outside.peers  # the proxy's connection, not the client's
    finally:
        outside.server.shutdown()
        outside.server.server_close()
