"""Observing a node: flows name their rule and backend, floods stay bounded, metrics scrape.

One node for the module: the real orchestrator (a small event rate limit for drops, the
Prometheus endpoint on in the node's namespace), policy and lb services, two endpoints and
real traffic. The policy lets the client reach the backend on TCP 8080 (`backend-in`) and
denies UDP 9000 by a deny rule (`no-udp-9000`); a VIP sends TCP 80 to the backend's 8080.
`weir observe` is run as an operator runs it, against the same node.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from weir.common.v1 import common_pb2
from weir.lb.v1 import lb_pb2, lb_pb2_grpc
from weir.orchestrator.v1 import orchestrator_pb2 as pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from weir.policy.v1 import policy_pb2, policy_pb2_grpc
from weir.prefilter.v1 import prefilter_pb2, prefilter_pb2_grpc

from services.common import netns as common_netns
from services.common.datapath import EventKind
from services.orchestrator.eventlimits import DEFAULT_PREFILTER_RATE, DEFAULT_PREFILTER_SAMPLE, default_limits
from tests.e2e.test_lb import run_in_node_cgroup
from tests.e2e.test_policy import known, sel, tcp, udp
from tests.harness import netns, traffic
from tests.harness.node import NET_IFNAME, REPO, Node, pid_prefix

pytestmark = pytest.mark.root

VIP = "198.19.0.1"
UDP_VIP = "198.19.0.2"
DENIED = "203.0.113.7"  # an address of the outside namespace the prefilter denies
METRICS_PORT = 9464
DROP_RATE, DROP_BURST = 100, 10  # per CPU
FLOOD = 20000
_names = itertools.count()


@dataclass
class Observed:
    node: Node
    client: pb.Endpoint
    backend: pb.Endpoint

    def stub(self) -> pb_grpc.OrchestratorStub:
        return pb_grpc.OrchestratorStub(grpc.insecure_channel(f"unix://{self.node.socket('orchestrator')}"))

    def flows(self, **request: object) -> list[pb.Flow]:
        messages = self.stub().GetFlows(pb.GetFlowsRequest(**request), timeout=10)  # type: ignore[arg-type]
        return [m.flow for m in messages if m.HasField("flow")]

    def wait_flows(self, count: int, **request: object) -> list[pb.Flow]:
        deadline = time.monotonic() + 10
        while len(found := self.flows(**request)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return found

    def udp(self, port: int, count: int = 1) -> None:
        with netns.entered(self.client.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            for _ in range(count):
                sock.sendto(b"x", (self.backend.ipv4, port))

    def weir(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(REPO / "weir"), "--instance", self.node.name, "--run-dir", str(self.node.run_dir), *args]
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The node's /metrics, parsed by prometheus-client: (sample name, labels) -> value."""
        with common_netns.entered(self.node.ns):
            body = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
        out = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out


@pytest.fixture(scope="module")
def o(tmp_path_factory: pytest.TempPathFactory, built: Path) -> Iterator[Observed]:
    name = f"{pid_prefix()}o{next(_names)}"
    node = Node(name, tmp_path_factory.mktemp(name))
    try:
        node.setup()
        node.start(
            "orchestrator",
            "--metrics-listen", f"127.0.0.1:{METRICS_PORT}",
            "--flow-event-limit", f"drop={DROP_RATE}/{DROP_BURST}",
        )  # fmt: skip
        node.start("policy")
        node.start("lb")
        node.start("prefilter")
        prefilter = prefilter_pb2_grpc.PrefilterStub(node.channel("prefilter"))
        prefilter.Attach(prefilter_pb2.AttachRequest(interface=NET_IFNAME), timeout=10)
        prefilter.AddEntries(prefilter_pb2.AddEntriesRequest(entries=[prefilter_pb2.Entry(cidr=f"{DENIED}/32")]))
        client = node.create_endpoint("client", {"app": "client"}, ipv6=False)
        backend = node.create_endpoint("backend", {"app": "backend"}, ipv6=False)
        policy = policy_pb2_grpc.PolicyStub(node.channel("policy"))
        known(policy, client, backend)
        rules = [
            policy_pb2.Rule(
                name="backend-in",
                endpoint_selector=sel(app="backend"),
                ingress=[policy_pb2.PeerRule(endpoints=[sel(app="client")], ports=[tcp(8080)])],
            ),
            policy_pb2.Rule(
                name="no-udp-9000",
                endpoint_selector=sel(app="backend"),
                ingress_deny=[policy_pb2.PeerRule(endpoints=[sel(app="client")], ports=[udp(9000)])],
            ),
        ]
        policy.ImportRules(policy_pb2.ImportRulesRequest(rules=rules), timeout=30)
        service = lb_pb2.Service(
            name="web", address=VIP, port=80, protocol="TCP", backends=[lb_pb2.Backend(address=backend.ipv4, port=8080)]
        )
        lb_pb2_grpc.LoadBalancerStub(node.channel("lb")).UpsertService(
            lb_pb2.UpsertServiceRequest(service=service), timeout=10
        )
        yield Observed(node, client, backend)
    finally:
        node.teardown()


def test_a_denied_flow_names_its_deny_rule_and_weir_observe_filters_by_it(o: Observed) -> None:
    o.udp(9000)
    flows = o.wait_flows(1, rules=["no-udp-9000"])
    assert flows, o.flows(ports=[9000])
    flow = flows[-1]
    assert (flow.verdict, flow.reason, flow.rule, flow.protocol) == (
        "DROPPED",
        "POLICY_DENY_RULE",
        "no-udp-9000",
        "UDP",
    )
    assert (flow.source.endpoint, flow.destination.endpoint, flow.destination.port) == ("client", "backend", 9000)
    assert o.flows(rules=["backend-in"], ports=[9000]) == []
    shown = o.weir("observe", "--verdict", "dropped", "--rule", "no-udp-9000", "--last", "1")
    assert shown.returncode == 0, shown.stderr
    assert "DROPPED (POLICY_DENY_RULE) rule=no-udp-9000" in shown.stdout and ":9000" in shown.stdout
    as_json = o.weir("observe", "--rule", "no-udp-9000", "--last", "1", "-o", "json")
    assert json.loads(as_json.stdout.splitlines()[-1])["rule"] == "no-udp-9000"
    bad = o.weir("observe", "--rule", "x" * 600)
    assert bad.returncode == 1 and "rules:" in bad.stderr and "Traceback" not in bad.stderr


def test_a_prefilter_drop_is_a_dropped_flow_at_xdp_and_the_rest_are_sampled_out(o: Observed) -> None:
    before = _kind(o.stub().GetFlowStats(pb.GetFlowStatsRequest(), timeout=10), "PREFILTER")
    assert (before.rate, before.sample) == (DEFAULT_PREFILTER_RATE, DEFAULT_PREFILTER_SAMPLE)
    assert traffic.ping(o.node.outside, o.client.ipv4, count=4, source=DENIED, wait=0.3) == 0
    flows = o.wait_flows(1, reasons=["PREFILTER_DENIED"])  # the first drop on a CPU is the sampler's pick
    assert flows and all(f.verdict == "DROPPED" and f.hook == common_pb2.HOOK_XDP for f in flows)
    assert flows[-1].src == DENIED and flows[-1].dst == o.client.ipv4
    after = _kind(o.stub().GetFlowStats(pb.GetFlowStatsRequest(), timeout=10), "PREFILTER")
    assert after.emitted - before.emitted == len(flows)
    assert (after.emitted + after.sampled_out) - (before.emitted + before.sampled_out) >= 4  # every drop counted


def test_a_vip_connection_is_translated_to_its_backend_then_forwarded_by_the_rule(o: Observed) -> None:
    with traffic.server(o.backend.netns, o.backend.ipv4, 8080):
        assert traffic.tcp_connects(o.client.netns, VIP, 80, timeout=3)
    translated = o.wait_flows(1, verdicts=["TRANSLATED"])
    assert len(translated) == 1, translated  # one per connection, not per packet
    flow = translated[0]
    assert (flow.type, flow.destination.address, flow.destination.port) == ("TRANSLATE", VIP, 80)
    assert (flow.translated_address, flow.translated_port) == (o.backend.ipv4, 8080)
    assert flow.source.endpoint == "client"
    forwarded = o.wait_flows(1, verdicts=["FORWARDED"], rules=["backend-in"])
    assert forwarded and forwarded[-1].destination.address == o.backend.ipv4 and forwarded[-1].seq > flow.seq
    shown = o.weir("observe", "--verdict", "translated", "--last", "1")
    assert f"backend={o.backend.ipv4}:8080" in shown.stdout, shown


def test_a_socket_lb_connect_is_translated_at_connect_time(o: Observed) -> None:
    before = {f.seq for f in o.flows(verdicts=["TRANSLATED"])}
    run_in_node_cgroup(  # a host process: the socket LB translates its connect() itself
        o.node,
        f"""
        import contextlib, socket
        with contextlib.suppress(OSError), socket.create_connection(("{VIP}", 80), timeout=0.5):
            pass
        """,
    )
    deadline = time.monotonic() + 10
    while not (new := [f for f in o.flows(verdicts=["TRANSLATED"]) if f.seq not in before]):
        assert time.monotonic() < deadline, "no TRANSLATED flow for the socket LB's connect()"
        time.sleep(0.05)
    flow = new[0]
    assert (flow.destination.address, flow.destination.port) == (VIP, 80)
    assert (flow.translated_address, flow.translated_port) == (o.backend.ipv4, 8080)
    assert (flow.protocol, flow.type) == ("TCP", "TRANSLATE")


def test_an_unconnected_udp_sendto_a_vip_is_translated_once_per_socket_and_backend(o: Observed) -> None:
    stub = o.stub()
    service = lb_pb2.Service(
        name="dns",
        address=UDP_VIP,
        port=53,
        protocol="UDP",
        backends=[lb_pb2.Backend(address=o.backend.ipv4, port=5353)],
    )
    lb_pb2_grpc.LoadBalancerStub(o.node.channel("lb")).UpsertService(lb_pb2.UpsertServiceRequest(service=service))
    sendto = f"""
        import socket
        for _ in range(2):  # two sockets, five datagrams each, never connected
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _ in range(5):
                    s.sendto(b"q", ("{UDP_VIP}", 53))
        """

    def new_flows(before: set[int], count: int) -> list[pb.Flow]:
        deadline = time.monotonic() + 10
        while len(new := [f for f in o.flows(verdicts=["TRANSLATED"], ports=[53]) if f.seq not in before]) < count:
            assert time.monotonic() < deadline, f"{len(new)} TRANSLATED flows for unconnected sendto, not {count}"
            time.sleep(0.05)
        return new

    before = {f.seq for f in o.flows(verdicts=["TRANSLATED"])}
    stats_before = _kind(stub.GetFlowStats(pb.GetFlowStatsRequest(), timeout=10), "TRANSLATE")
    run_in_node_cgroup(o.node, sendto)  # a host process: the socket LB translates each sendmsg() itself
    flows = new_flows(before, 2)
    time.sleep(0.5)
    assert len(new_flows(before, 2)) == 2  # one per socket and backend, not one per datagram
    for flow in flows:
        assert (flow.protocol, flow.type, flow.verdict) == ("UDP", "TRANSLATE", "TRANSLATED")
        assert (flow.destination.address, flow.destination.port) == (UDP_VIP, 53)
        assert (flow.translated_address, flow.translated_port) == (o.backend.ipv4, 5353)
    stats_after = _kind(stub.GetFlowStats(pb.GetFlowStatsRequest(), timeout=10), "TRANSLATE")
    assert stats_after.emitted - stats_before.emitted == 2
    shown = o.weir("observe", "--verdict", "translated", "--port", "53", "--last", "1")
    assert f"backend={o.backend.ipv4}:5353" in shown.stdout, shown
    # Through the TRANSLATE kind's limit like every other event: off, the sends make no flow.
    stub.SetEventLimits(pb.SetEventLimitsRequest(limits=["translate=off"]), timeout=10)
    try:
        seen = {f.seq for f in o.flows(verdicts=["TRANSLATED"])}
        run_in_node_cgroup(o.node, sendto)
        held = _kind(stub.GetFlowStats(pb.GetFlowStatsRequest(), timeout=10), "TRANSLATE")
        assert held.emitted == stats_after.emitted and held.rate_limited - stats_after.rate_limited == 2
        time.sleep(0.5)
        assert [f for f in o.flows(verdicts=["TRANSLATED"]) if f.seq not in seen] == []
    finally:
        default = default_limits()[EventKind.TRANSLATE]
        stub.SetEventLimits(pb.SetEventLimitsRequest(limits=[f"translate={default.rate}/{default.burst}"]), timeout=10)


def _kind(stats: pb.FlowStats, kind: str) -> pb.EventKindStats:
    return next(k for k in stats.event_kinds if k.kind == kind)


def test_a_flood_of_denied_packets_keeps_the_stream_bounded_and_reports_what_the_limit_held_back(
    o: Observed,
) -> None:
    stub = o.stub()
    before = _kind(stub.GetFlowStats(pb.GetFlowStatsRequest(), timeout=10), "DROP")
    assert (before.rate, before.burst) == (DROP_RATE, DROP_BURST)
    stream = stub.GetFlows(pb.GetFlowsRequest(follow=True, rules=["no-udp-9000"]), timeout=60)
    messages: list[pb.GetFlowsResponse] = []

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end
            for message in stream:
                messages.append(message)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.5)
    started = time.monotonic()
    o.udp(9000, FLOOD)
    elapsed = time.monotonic() - started
    time.sleep(2.5)  # the follower hears of the losses within a second of them
    stream.cancel()
    reader.join(timeout=5)
    after = _kind(stub.GetFlowStats(pb.GetFlowStatsRequest(), timeout=10), "DROP")
    flows = [m.flow for m in messages if m.HasField("flow")]
    held_back = sum(m.lost.rate_limited for m in messages if m.HasField("lost"))
    cpus = os.cpu_count() or 1
    bound = cpus * (DROP_BURST + DROP_RATE * (elapsed + 3.5))  # every CPU's bucket, over the whole window
    assert 0 < len(flows) <= bound < FLOOD / 4, (len(flows), bound, elapsed)
    emitted, limited = after.emitted - before.emitted, after.rate_limited - before.rate_limited
    assert emitted + limited + (after.lost - before.lost) >= FLOOD  # every dropped packet's event is accounted for
    assert limited >= FLOOD - bound and after.lost == before.lost
    assert held_back >= FLOOD - bound, held_back  # the follower was told, not left to guess
    shown = o.weir("metrics", "-o", "json")
    kinds = {k["kind"]: k for k in json.loads(shown.stdout)["flows"]["event_kinds"]}
    assert int(kinds["DROP"]["rate_limited"]) >= limited


def test_the_metrics_endpoint_parses_and_its_counters_move_with_real_traffic(o: Observed) -> None:
    def value(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    def moved(name: str, labels: dict[str, str], by: float = 1) -> bool:
        return value(after, name, **labels) >= value(before, name, **labels) + by

    before = o.scrape()
    o.udp(9000, 5)
    traffic.ping(o.node.outside, o.client.ipv4, count=3, source=DENIED, wait=0.3)
    with traffic.server(o.backend.netns, o.backend.ipv4, 8080):
        assert traffic.tcp_connects(o.client.netns, VIP, 80, timeout=3)
    o.wait_flows(2, verdicts=["TRANSLATED"])
    time.sleep(0.5)
    after = o.scrape()
    assert moved("weir_datapath_packets_total", {"reason": "POLICY_DENY_RULE", "direction": "INGRESS"}, 5)
    assert moved("weir_datapath_packets_total", {"reason": "FORWARDED", "direction": "EGRESS"})
    backend = {"service": "web", "backend": f"{o.backend.ipv4}:8080"}
    assert moved("weir_lb_connections_total", backend) and moved("weir_lb_packets_total", backend)
    assert moved("weir_policy_verdicts_total", {"endpoint": "backend", "direction": "INGRESS", "verdict": "FORWARDED"})
    assert moved("weir_datapath_events_total", {"kind": "DROP", "outcome": "emitted"})
    assert moved("weir_prefilter_packets_total", {"interface": NET_IFNAME, "outcome": "dropped"}, 3)
    assert moved("weir_prefilter_entry_hits_total", {"cidr": f"{DENIED}/32"}, 3)
    assert value(after, "weir_conntrack_entries") >= 1
    assert value(after, "weir_map_entries", map="endpoints") == 2
    assert value(after, "weir_map_capacity", map="conntrack") > 0
    rpc = {"service": "orchestrator", "method": "/weir.orchestrator.v1.Orchestrator/GetFlows", "code": "OK"}
    assert moved("weir_rpc_requests_total", rpc)


def test_event_limits_change_at_run_time_and_bad_input_changes_nothing(o: Observed) -> None:
    shown = o.weir("event-limits", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    kinds = {k["kind"]: k for k in json.loads(shown.stdout)["event_kinds"]}
    assert (kinds["DROP"]["rate"], kinds["DROP"]["burst"]) == (DROP_RATE, DROP_BURST)
    for bad in (["drop=fast"], ["flows=10"], ["drop=5", "verdict=-1"]):
        refused = o.weir("event-limits", *bad)
        assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr and "limits:" in refused.stderr
        assert "Traceback" not in refused.stderr
    with pytest.raises(grpc.RpcError) as err:
        o.stub().SetEventLimits(pb.SetEventLimitsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = {k.kind: k for k in o.stub().GetFlowStats(pb.GetFlowStatsRequest(), timeout=10).event_kinds}
    assert (after["DROP"].rate, after["VERDICT"].rate) == (DROP_RATE, kinds["VERDICT"]["rate"])  # nothing changed
    try:
        changed = o.weir("event-limits", "drop=off")
        assert changed.returncode == 0 and "off" in changed.stdout, changed
        before = _kind(o.stub().GetFlowStats(pb.GetFlowStatsRequest(), timeout=10), "DROP")
        o.udp(9000, 50)
        time.sleep(0.5)
        now = _kind(o.stub().GetFlowStats(pb.GetFlowStatsRequest(), timeout=10), "DROP")
        assert now.emitted == before.emitted and now.rate_limited >= before.rate_limited + 50
    finally:
        o.weir("event-limits", f"drop={DROP_RATE}/{DROP_BURST}")
