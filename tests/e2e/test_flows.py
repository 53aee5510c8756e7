"""GetFlows: the datapath's events as flows with their endpoints, from a bounded buffer.

One node (real orchestrator with a small flow buffer and no event rate limits for drops and
verdicts, real policy service) and real traffic between two endpoints: a policy lets the
frontend reach the backend on TCP 8080 only. The datapath reports drops, policy verdicts of
new connections, audit verdicts and socket acceleration, each naming the rule behind it, not
every forwarded packet. The flood runs last: it wraps the buffer. (The rate limits are
tested in test_observe.py.)
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from weir.common.v1 import common_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from weir.policy.v1 import policy_pb2, policy_pb2_grpc

from tests.e2e import test_sockaccel as sa
from tests.e2e.test_policy import known, sel, tcp
from tests.harness import netns, traffic
from tests.harness.node import Node, pid_prefix

pytestmark = pytest.mark.root

BUFFER = 1000
FLOOD = 5000
_names = itertools.count()


@dataclass
class Flows:
    node: Node
    frontend: pb.Endpoint
    backend: pb.Endpoint

    def stub(self, **options: int) -> pb_grpc.OrchestratorStub:
        channel = grpc.insecure_channel(f"unix://{self.node.socket('orchestrator')}", options=list(options.items()))
        return pb_grpc.OrchestratorStub(channel)

    def get(self, **request: object) -> list[pb.GetFlowsResponse]:
        return list(self.stub().GetFlows(pb.GetFlowsRequest(**request), timeout=10))  # type: ignore[arg-type]

    def flows(self, **request: object) -> list[pb.Flow]:
        return [m.flow for m in self.get(**request) if m.HasField("flow")]

    def stats(self) -> pb.FlowStats:
        return self.stub().GetFlowStats(pb.GetFlowStatsRequest(), timeout=10)

    def denied_tcp(self, port: int) -> None:
        assert not traffic.tcp_connects(self.frontend.netns, self.backend.ipv4, port, timeout=0.3)

    def denied_udp(self, port: int, count: int = 1) -> None:
        with netns.entered(self.frontend.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            for _ in range(count):
                sock.sendto(b"x", (self.backend.ipv4, port))


@pytest.fixture(scope="module")
def f(tmp_path_factory: pytest.TempPathFactory, built: Path) -> Iterator[Flows]:
    name = f"{pid_prefix()}f{next(_names)}"
    node = Node(name, tmp_path_factory.mktemp(name))
    try:
        node.setup()
        node.start(
            "orchestrator",
            "--flow-buffer",
            str(BUFFER),
            "--flow-event-limit",
            "drop=0",
            "--flow-event-limit",
            "verdict=0",
        )
        node.start("policy")
        frontend = node.create_endpoint("frontend", {"app": "frontend"}, ipv6=False)
        backend = node.create_endpoint("backend", {"app": "backend"}, ipv6=False)
        policy = policy_pb2_grpc.PolicyStub(node.channel("policy"))
        known(policy, frontend, backend)
        rule = policy_pb2.Rule(
            name="backend-in",
            endpoint_selector=sel(app="backend"),
            ingress=[policy_pb2.PeerRule(endpoints=[sel(app="frontend")], ports=[tcp(8080)])],
        )
        policy.ImportRules(policy_pb2.ImportRulesRequest(rules=[rule]), timeout=30)
        yield Flows(node, frontend, backend)
    finally:
        node.teardown()


def wait_for(f: Flows, count: int, **request: object) -> list[pb.Flow]:
    """The flows matching once at least `count` arrived (the events thread reads asynchronously)."""
    deadline = time.monotonic() + 5
    while len(found := f.flows(**request)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_a_denied_connection_is_a_dropped_flow_with_its_reason_and_both_endpoints(f: Flows) -> None:
    f.denied_tcp(8081)
    flows = wait_for(f, 1, ports=[8081], last=1)
    assert len(flows) == 1
    flow = flows[0]
    assert (flow.verdict, flow.reason, flow.type, flow.protocol) == ("DROPPED", "POLICY_DENIED", "DROP", "TCP")
    assert flow.hook == common_pb2.HOOK_TO_CONTAINER
    src, dst = flow.source, flow.destination
    assert (src.endpoint, src.address, src.identity) == ("frontend", f.frontend.ipv4, f.frontend.identity)
    assert (dst.endpoint, dst.address, dst.port, dst.identity) == ("backend", f.backend.ipv4, 8081, f.backend.identity)
    assert "app=frontend" in src.labels and "app=backend" in dst.labels
    assert dst.endpoint_id == f.backend.id and flow.endpoint_id == f.backend.id
    assert abs(flow.time.ToNanoseconds() - time.time_ns()) < 10 * 10**9
    retries = wait_for(f, 1, ports=[8081])  # the SYN's retransmissions are flows of their own
    assert flows[0].seq == retries[-1].seq


def test_an_allowed_connection_is_one_forwarded_flow_naming_its_rule_not_one_per_packet(f: Flows) -> None:
    with traffic.server(f.backend.netns, f.backend.ipv4, 8080):
        assert traffic.tcp_connects(f.frontend.netns, f.backend.ipv4, 8080, timeout=2)
    f.denied_tcp(8083)  # a flow after it: once it is in, the allowed one is too
    wait_for(f, 1, ports=[8083])
    allowed = f.flows(ports=[8080])
    assert len(allowed) == 1, allowed  # the SYN's verdict; the rest of the connection rides conntrack
    flow = allowed[0]
    assert (flow.verdict, flow.type, flow.reason, flow.rule) == ("FORWARDED", "VERDICT", "FORWARDED", "backend-in")
    assert (flow.source.endpoint, flow.destination.endpoint, flow.destination.port) == ("frontend", "backend", 8080)
    assert f.flows(rules=["backend-in"], ports=[8080]) == allowed
    assert f.flows(rules=["someone-else"]) == []
    denied = f.flows(ports=[8083])
    assert denied and all(fl.rule == "" for fl in denied)  # a default deny: no rule decided it


def test_a_drop_is_in_the_flows_of_a_call_made_right_after_it(f: Flows) -> None:
    """The datapath wakes the reader only per batch of records; GetFlows reads what is pending first."""
    for port in range(9100, 9120):
        f.denied_udp(port)
        time.sleep(0.01)  # the packet has crossed the veth and the chain when sendto returns; give the drop a moment
        assert [fl.destination.port for fl in f.flows(ports=[port])] == [port], f"no flow for UDP {port} yet"


def test_filters_narrow_within_or_across_and(f: Flows) -> None:
    f.denied_tcp(8081)
    f.denied_udp(5354)
    wait_for(f, 1, ports=[5354])
    everything = f.flows()
    seqs = [fl.seq for fl in everything]

    def expect(keep: Callable[[pb.Flow], bool], **request: object) -> list[pb.Flow]:
        got = f.flows(**request)
        assert [fl.seq for fl in got] == [fl.seq for fl in everything if keep(fl)], request
        return got

    def ends(fl: pb.Flow) -> tuple[pb.FlowPeer, pb.FlowPeer]:
        return fl.source, fl.destination

    assert expect(lambda fl: fl.protocol == "UDP", protocols=["udp"])
    assert expect(lambda fl: 8081 in (fl.src_port, fl.dst_port), ports=[8081])
    assert expect(lambda fl: bool({fl.src_port, fl.dst_port} & {8081, 5354}), ports=[8081, 5354])
    assert not expect(lambda fl: False, protocols=["UDP"], ports=[8081])
    assert expect(lambda fl: "backend" in (fl.source.endpoint, fl.destination.endpoint), endpoints=["backend"])
    assert not expect(lambda fl: False, endpoints=["nobody"])
    assert expect(lambda fl: fl.reason == "POLICY_DENIED", verdicts=["dropped"], reasons=["policy_denied"])
    assert expect(lambda fl: fl.verdict == "FORWARDED", verdicts=["FORWARDED", "ACCELERATED"])
    assert not expect(lambda fl: False, verdicts=["TRANSLATED", "ACCELERATED"])
    assert not expect(lambda fl: False, reasons=["PREFILTER_DENIED"])
    frontend_v4 = expect(lambda fl: f.frontend.ipv4 in (fl.src, fl.dst), cidrs=[f"{f.frontend.ipv4}/32"])
    assert frontend_v4 and len(frontend_v4) < len(everything)  # the endpoints' IPv6 neighbour traffic is left out
    assert expect(lambda fl: f.backend.ipv4 in (fl.src, fl.dst), cidrs=["198.18.0.0/24", "10.255.0.0/16"])
    assert not expect(lambda fl: False, cidrs=["10.255.0.0/16"])
    assert expect(lambda fl: any("app=frontend" in p.labels for p in ends(fl)), labels=["app=frontend"])
    assert not expect(lambda fl: False, labels=["app=nobody"])
    newest = [fl.seq for fl in f.flows(last=2)]  # a late SYN retransmission may have come in since
    assert len(newest) == 2 and seqs[-2] <= newest[0] < newest[1] and newest[1] >= seqs[-1]


def test_follow_delivers_a_flow_made_after_the_call_started(f: Flows) -> None:
    f.denied_tcp(8082)
    wait_for(f, 1, ports=[8082])
    started = time.time_ns()
    stream = f.stub().GetFlows(pb.GetFlowsRequest(follow=True, ports=[8082]), timeout=15)
    got: list[pb.GetFlowsResponse] = []
    reader = threading.Thread(target=lambda: got.append(next(stream)))
    reader.start()
    deadline = time.monotonic() + 10
    while reader.is_alive() and time.monotonic() < deadline:
        f.denied_tcp(8082)
    reader.join(timeout=5)
    stream.cancel()
    assert len(got) == 1 and got[0].HasField("flow"), got  # the old 8082 flow is not replayed
    assert got[0].flow.time.ToNanoseconds() >= started
    since = Timestamp()
    since.FromNanoseconds(started)
    assert all(fl.time.ToNanoseconds() >= started for fl in f.flows(ports=[8082], since=since))
    assert len(f.flows(ports=[8082], since=since)) < len(f.flows(ports=[8082]))


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GetFlowsRequest(cidrs=["10.0.0.0/33"]), "cidrs"),
        (pb.GetFlowsRequest(ports=[70000]), "ports"),
        (pb.GetFlowsRequest(ports=[0]), "ports"),
        (pb.GetFlowsRequest(verdicts=["MAYBE"]), "verdicts"),
        (pb.GetFlowsRequest(reasons=["NOPE"]), "reasons"),
        (pb.GetFlowsRequest(protocols=["GRE"]), "protocols"),
        (pb.GetFlowsRequest(labels=["novalue"]), "labels"),
        (pb.GetFlowsRequest(last=10**6), "last"),
        (pb.GetFlowsRequest(since=Timestamp(seconds=-5)), "since"),
        (pb.GetFlowsRequest(rules=[""]), "rules"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(f: Flows, request_: pb.GetFlowsRequest, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(f.stub().GetFlows(request_, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(f"{field}:"), err.value.details()


def test_socket_acceleration_is_an_accelerated_flow_between_named_endpoints(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    s = sa.make_setup(make_node, tmp_path)
    sa.allow_client_to_server(s)
    s.mode(True)
    with sa.echo_server(s) as out:
        sa.assert_every_byte(sa.run_echo(s, out, conns=1, sizes=[10]), [10])
    request = pb.GetFlowsRequest(verdicts=["accelerated"], endpoints=["server"])
    stub = pb_grpc.OrchestratorStub(s.node.channel("orchestrator"))
    deadline = time.monotonic() + 5
    while (
        len(flows := [m.flow for m in stub.GetFlows(request, timeout=10) if m.HasField("flow")]) < 4
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert sorted(fl.type for fl in flows) == ["ACCEL_END", "ACCEL_END", "ACCEL_START", "ACCEL_START"]
    for fl in flows:
        assert (fl.verdict, fl.source.endpoint, fl.destination.endpoint) == ("ACCELERATED", "client", "server")
        assert (fl.source.identity, fl.destination.identity) == (s.client.identity, s.server.identity)
        assert "app=client" in fl.source.labels and fl.destination.port == sa.PORT


def settled(f: Flows) -> pb.FlowStats:
    """The stats once the events reader has caught up (no new flow for half a second)."""
    deadline = time.monotonic() + 15
    stats = f.stats()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if (now := f.stats()).seen == stats.seen:
            return now
        stats = now
    raise AssertionError(f"flows still arriving: {stats}")


def test_a_flood_keeps_the_buffer_bounded_the_newest_kept_and_reports_what_was_lost(f: Flows) -> None:
    before = f.stats()
    # A follower that reads nothing during the flood (no BDP probing: its window stays small).
    slow = f.stub(**{"grpc.http2.bdp_probe": 0}).GetFlows(pb.GetFlowsRequest(follow=True, ports=[9999]), timeout=30)
    first = threading.Thread(target=lambda: next(slow))  # the call is up once it returns a message
    first.start()
    while first.is_alive():
        f.denied_udp(9999)
        time.sleep(0.05)
    f.denied_udp(9999, FLOOD)
    f.denied_udp(9998)  # the newest
    stats = settled(f)
    # 5001 events fit the 1 MiB ring buffer: every one became a flow, none is counted as unreported.
    assert stats.seen >= before.seen + FLOOD + 1 and stats.datapath_unreported == 0
    assert stats.capacity == BUFFER and stats.buffered == BUFFER
    assert stats.evicted == stats.seen - BUFFER > 0
    replay = f.get()
    assert replay[0].HasField("lost") and replay[0].lost.evicted == stats.evicted  # said first, never silent
    flows = [m.flow for m in replay[1:]]
    assert len(flows) <= BUFFER and flows[-1].destination.port == 9998
    assert [fl.seq for fl in flows] == list(range(flows[0].seq, flows[0].seq + len(flows)))
    lost = 0
    for message in slow:
        if message.HasField("lost"):
            lost += message.lost.dropped
        elif message.flow.seq >= flows[-1].seq - 1:
            break
    slow.cancel()
    assert lost > 0 and f.stats().subscriber_dropped >= lost
