"""The `weir` command as an operator runs it, against one running node (the real suite).

Every command runs through the repository's `./weir` script (which hands it to the venv's
`python -m services.cli`), in table and JSON form; the JSON is checked against what the
services answer over gRPC themselves. Bad input, unknown commands and a node that is not
running give the documented exit codes (1, 2, 3) with one line on stderr, never a
traceback. `weir down` runs last: it stops the suite and tears the node down.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from prometheus_client.parser import text_string_to_metric_families
from weir.common.v1 import common_pb2
from weir.lb.v1 import lb_pb2, lb_pb2_grpc
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc
from weir.policy.v1 import policy_pb2, policy_pb2_grpc
from weir.prefilter.v1 import prefilter_pb2, prefilter_pb2_grpc

from services.common import netns as common_netns
from tests.harness import netns
from tests.harness.node import OUTSIDE_V4, REPO, Node, pid_prefix
from tests.harness.suite import SUITE_SERVICES, running_suite
from tests.harness.traffic import tcp_connects

pytestmark = pytest.mark.root

WEIR = REPO / "weir"
METRICS_PORT = 9464
_names = itertools.count()


def as_dict(message: Message) -> dict[str, Any]:
    """What the CLI prints for a message under -o json."""
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


@dataclass
class Cli:
    node: Node
    suite: subprocess.Popen[bytes]
    web: orch_pb.Endpoint
    client: orch_pb.Endpoint

    def run(self, *args: str, in_node: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`./weir --instance N --run-dir D ARGS...`; the unix sockets reach the node from anywhere."""
        argv = [str(WEIR), "--instance", self.node.name, "--run-dir", str(self.node.run_dir), *args]
        if in_node:
            argv = [*netns.nsenter_argv(self.node.ns), *argv]
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.run(*args)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "-o", "json").stdout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        argv = [str(WEIR), "--instance", self.node.name, "--run-dir", str(self.node.run_dir), *args]
        return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def channel(self, service: str) -> grpc.Channel:
        return self.node.channel(service)


def assert_refused(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, built: Path) -> Iterator[Cli]:
    name = f"{pid_prefix()}c{next(_names)}"
    metrics = ("--metrics-listen", f"127.0.0.1:{METRICS_PORT}")
    with running_suite(name, tmp_path_factory.mktemp(name), *metrics) as (node, suite):
        web = node.create_endpoint("web", {"app": "web"}, ipv6=False)
        client = node.create_endpoint("client", {"app": "client"}, ipv6=False)
        rule = policy_pb2.Rule(
            name="web-in",
            endpoint_selector=policy_pb2.EndpointSelector(match_labels={"app": "web"}),
            ingress=[
                policy_pb2.PeerRule(
                    endpoints=[policy_pb2.EndpointSelector(match_labels={"app": "client"})],
                    ports=[policy_pb2.PortRule(port=80, protocol="TCP")],
                )
            ],
        )
        with node.channel("policy") as ch:
            policy_pb2_grpc.PolicyStub(ch).ImportRules(policy_pb2.ImportRulesRequest(rules=[rule]), timeout=30)
        yield Cli(node, suite, web, client)


def _deny_traffic(cli: Cli, until: subprocess.Popen[str], timeout: float = 30) -> None:
    """Connections from outside to web:80 (the policy denies them) until ``until`` exits."""
    deadline = time.monotonic() + timeout
    while until.poll() is None and time.monotonic() < deadline:
        assert not tcp_connects(cli.node.outside, cli.web.ipv4, 80, timeout=0.3)


# ---- status, metrics ----


def test_status_reports_every_service_and_the_chain_as_the_orchestrator_does(cli: Cli) -> None:
    doc = cli.json("status")
    assert {s["service"]: s["health"] for s in doc["services"]} == dict.fromkeys(SUITE_SERVICES, "SERVING")
    for s in doc["services"]:
        assert s["reachable"] is True
        assert s["pid"] == int((cli.node.run_dir / f"{s['service']}.lock").read_text())
    with cli.channel("orchestrator") as ch:
        stub = orch_grpc.OrchestratorStub(ch)
        slots = stub.ListSlots(orch_pb.ListSlotsRequest(), timeout=10).slots
        xdp = stub.ListXdp(orch_pb.ListXdpRequest(), timeout=10).attachments
        endpoints = stub.ListEndpoints(orch_pb.ListEndpointsRequest(), timeout=10).endpoints
    assert doc["slots"] == [as_dict(s) for s in slots]
    assert doc["xdp"] == [as_dict(a) for a in xdp]
    assert doc["counts"]["endpoints"] == len(endpoints) >= 2
    assert doc["counts"]["policy_rules"] >= 1
    assert {(s["hook"], s["slot"]) for s in doc["slots"] if s["program_id"]} >= {
        ("HOOK_TO_CONTAINER", "SLOT_POLICY"),
        ("HOOK_XDP", "SLOT_PREFILTER"),
    }
    table = cli.ok("status").stdout
    for service in SUITE_SERVICES:
        assert service in table
    assert table.count("SERVING") == len(SUITE_SERVICES)
    assert "policy_ingress" in table and "prefilter_xdp" in table
    fill = {m["name"]: m for m in doc["maps"]}
    assert int(fill["endpoints"]["entries"]) == len(endpoints) and int(fill["conntrack"]["capacity"]) > 0
    assert "maps (fill)" in table


def test_weir_up_hands_metrics_listen_to_the_orchestrator_which_serves_prometheus(cli: Cli) -> None:
    with common_netns.entered(cli.node.ns):
        body = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    names = {sample.name for family in text_string_to_metric_families(body) for sample in family.samples}
    assert {
        "weir_datapath_packets_total",
        "weir_hook_packets_total",
        "weir_map_entries",
        "weir_rpc_requests_total",
    } <= names
    rpc_services = {
        sample.labels["service"]
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == "weir_rpc_requests_total"
    }
    assert rpc_services == set(SUITE_SERVICES)


def test_metrics_prints_the_orchestrators_counters(cli: Cli) -> None:
    with cli.channel("orchestrator") as ch:
        before = orch_grpc.OrchestratorStub(ch).GetMetrics(orch_pb.GetMetricsRequest(), timeout=10)
    doc = cli.json("metrics")
    hooks = {e["hook"]: int(e["counter"]["packets"]) for e in doc["entry"]}
    assert set(hooks) == {as_dict(e)["hook"] for e in before.entry}
    for e in before.entry:
        assert hooks[as_dict(e)["hook"]] >= e.counter.packets  # counters only grow
    reasons = {(r["reason"], r["direction"]) for r in doc["reasons"]}
    assert reasons >= {(r.reason, as_dict(r)["direction"]) for r in before.reasons}
    rpcs = {(r["service"], r["method"].rpartition("/")[2], r["code"]): int(r["count"]) for r in doc["rpcs"]}
    assert rpcs[("orchestrator", "GetMetrics", "OK")] >= 1
    assert {service for service, _, _ in rpcs} == set(SUITE_SERVICES)  # every service's calls, not one's
    table = cli.ok("metrics").stdout
    assert "HOOK_TO_CONTAINER" in table and "FORWARDED" in table
    assert "rpcs" in table and "GetMetrics" in table


# ---- endpoints ----


def test_endpoint_create_get_list_delete(cli: Cli) -> None:
    created = cli.json("endpoint", "create", "cli-ep", "--ipv4", "198.18.0.60", "-l", "app=tmp", "-l", "tier=x")
    with cli.channel("orchestrator") as ch:
        stub = orch_grpc.OrchestratorStub(ch)
        assert created == as_dict(stub.GetEndpoint(orch_pb.GetEndpointRequest(name="cli-ep"), timeout=10))
        listed = stub.ListEndpoints(orch_pb.ListEndpointsRequest(), timeout=10).endpoints
    # an endpoint given no namespace is in "default", which is also its label
    assert created["labels"] == {"app": "tmp", "tier": "x", "io.kubernetes.pod.namespace": "default"}
    assert created["ipv4"] == "198.18.0.60" and created["namespace"] == "default"
    assert cli.json("endpoint", "list") == [as_dict(e) for e in listed]
    assert cli.json("endpoint", "get", "cli-ep") == created
    table = cli.ok("endpoint", "get", "cli-ep").stdout
    assert "198.18.0.60" in table and "app=tmp" in table and "tier=x" in table
    assert "cli-ep" in cli.ok("endpoint", "list").stdout
    assert cli.json("endpoint", "delete", "cli-ep") == {"deleted": ["cli-ep"]}
    assert_refused(cli.run("endpoint", "get", "cli-ep"), 1, "weir: orchestrator: NOT_FOUND:", "cli-ep")
    placed = cli.json("endpoint", "create", "cli-ns", "--ipv4", "198.18.0.61", "-l", "app=tmp", "--namespace", "prod",
                      "--named-port", "http=8080", "--named-port", "dns=53/udp")  # fmt: skip
    assert placed["namespace"] == "prod" and placed["labels"]["io.kubernetes.pod.namespace"] == "prod"
    assert [(p["name"], p["port"], p["protocol"]) for p in placed["named_ports"]] == [
        ("http", 8080, "TCP"),
        ("dns", 53, "UDP"),
    ]
    assert cli.json("endpoint", "delete", "cli-ns") == {"deleted": ["cli-ns"]}
    assert_refused(cli.run("endpoint", "create", "cli-bad", "--ipv4", "198.18.0.62", "--named-port", "http=80",
                           "--named-port", "http=81"), 1, "weir: orchestrator: INVALID_ARGUMENT:")  # fmt: skip
    assert_refused(
        cli.run("endpoint", "create", "Bad_Name", "--ipv4", "198.18.0.61"), 1, "orchestrator: INVALID_ARGUMENT:"
    )
    assert "cli-ep" not in cli.ok("endpoint", "list").stdout


# ---- policy ----

DOCUMENT = """\
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: cli-doc
spec:
  endpointSelector:
    matchLabels:
      app: nothing-yet
  ingress:
  - fromEntities: [world]
    toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
"""


def test_policy_import_list_get_trace_delete(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "cnp.yaml"
    path.write_text(DOCUMENT)
    imported = cli.json("policy", "import", "-f", str(path))
    with cli.channel("policy") as ch:
        stub = policy_pb2_grpc.PolicyStub(ch)
        rules = stub.ListRules(policy_pb2.ListRulesRequest(), timeout=10)
        rule = stub.GetRule(policy_pb2.GetRuleRequest(name="cli-doc"), timeout=10)
        trace = stub.Trace(
            policy_pb2.TraceRequest(source=cli.client.ipv4, destination=cli.web.ipv4, port=80, protocol="TCP"),
            timeout=10,
        )
    assert imported["revision"] == str(rules.revision)
    assert cli.json("policy", "list") == [as_dict(r) for r in rules.rules]
    assert cli.json("policy", "get", "cli-doc") == as_dict(rule)
    assert {"cli-doc", "web-in"} <= {r["name"] for r in cli.json("policy", "list")}
    assert "cli-doc" in cli.ok("policy", "list").stdout
    # trace takes endpoint names or addresses, and answers what the service answers
    assert cli.json("policy", "trace", "--src", "client", "--dst", "web", "--port", "80") == as_dict(trace)
    assert trace.allowed
    denied = cli.ok("policy", "trace", "--src", cli.client.ipv4, "--dst", "web", "--port", "81").stdout
    assert denied.startswith("verdict: DENIED")
    entries = cli.json("policy", "endpoint", "web")
    assert entries["endpoint"] == "web" and entries["ingress_enforced"] is True
    deleted = cli.json("policy", "delete", "cli-doc")
    assert int(deleted["revision"]) > int(imported["revision"])
    assert_refused(cli.run("policy", "get", "cli-doc"), 1, "policy: NOT_FOUND:")
    path.write_text("kind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: {}, bogus: 1}\n")
    assert_refused(cli.run("policy", "import", "-f", str(path)), 1, "policy: INVALID_ARGUMENT:", "bogus")


# ---- load balancer ----


def test_service_upsert_get_list_delete(cli: Cli) -> None:
    upserted = cli.json(
        "service", "upsert", "cli-svc", "--address", "198.19.0.9", "--port", "8080",
        "-b", f"{cli.web.ipv4}:80", "-b", "198.18.0.99:80@3", "--algorithm", "maglev",
    )  # fmt: skip
    with cli.channel("lb") as ch:
        stub = lb_pb2_grpc.LoadBalancerStub(ch)
        service = stub.GetService(lb_pb2.GetServiceRequest(name="cli-svc"), timeout=10)
        listed = stub.ListServices(lb_pb2.ListServicesRequest(), timeout=10).services
    assert upserted == as_dict(service)
    assert [b.weight for b in service.backends] == [1, 3]
    assert service.algorithm == lb_pb2.ALGORITHM_MAGLEV
    assert cli.json("service", "list") == [as_dict(s) for s in listed]
    assert cli.json("service", "get", "cli-svc") == upserted
    assert "198.19.0.9:8080" in cli.ok("service", "get", "cli-svc").stdout
    assert_refused(cli.run("service", "upsert", "bad", "--address", "198.19.0.10", "--port", "80", "-b", "nope"), 2)
    assert_refused(
        cli.run("service", "upsert", "bad", "--address", "169.254.0.1", "--port", "80"), 1, "lb: INVALID_ARGUMENT:"
    )
    cli.ok("service", "delete", "cli-svc")
    assert_refused(cli.run("service", "get", "cli-svc"), 1, "lb: NOT_FOUND:")


# ---- prefilter ----


def _entries(cli: Cli) -> prefilter_pb2.ListEntriesResponse:
    with cli.channel("prefilter") as ch:
        stub = prefilter_pb2_grpc.PrefilterStub(ch)
        reply = prefilter_pb2.ListEntriesResponse()
        token = ""
        while True:
            page = stub.ListEntries(
                prefilter_pb2.ListEntriesRequest(page=common_pb2.PageRequest(page_token=token)), timeout=10
            )
            reply.entries.extend(page.entries)
            reply.revision = page.revision
            token = page.next_page_token
            if not token:
                return reply


def test_prefilter_bulk_add_with_progress_list_counters_delete(cli: Cli, tmp_path: Path) -> None:
    cidrs = [f"10.{i // 256}.{i % 256}.0/24" for i in range(2500)]
    path = tmp_path / "cidrs.txt"
    path.write_text("# deny list\n" + "\n".join(cidrs) + "\n\n")
    result = cli.run("prefilter", "add", "-f", str(path), "--chunk", "1000", "-o", "json")
    assert result.returncode == 0, result.stderr
    assert "2500/2500" in result.stderr  # the progress bar, on stderr
    added = json.loads(result.stdout)
    live = _entries(cli)
    assert added == {"changed": 2500, "entries": 2500, "revision": str(live.revision)}
    listed = cli.json("prefilter", "list")
    assert listed == {"revision": str(live.revision), "entries": [as_dict(e) for e in live.entries]}
    assert len(listed["entries"]) == 2500
    again = cli.json("prefilter", "add", "10.0.0.0/24", "--audit")
    assert again["changed"] == 1  # the mode changed
    with cli.channel("prefilter") as ch:
        counters = prefilter_pb2_grpc.PrefilterStub(ch).GetCounters(
            prefilter_pb2.GetCountersRequest(cidrs=["10.0.0.0/24"]), timeout=10
        )
    shown = cli.json("prefilter", "counters", "10.0.0.0/24")
    assert shown["entries"] == [as_dict(e) for e in counters.entries]
    assert shown["entries"][0]["mode"] == "MODE_AUDIT"
    assert "10.0.0.0/24" in cli.ok("prefilter", "counters", "10.0.0.0/24").stdout
    assert cli.json("prefilter", "delete", *cidrs[:2])["changed"] == 2
    with cli.channel("prefilter") as ch:
        prefilter_pb2_grpc.PrefilterStub(ch).ReplaceEntries(prefilter_pb2.ReplaceEntriesRequest(), timeout=30)
    assert "no entries" in cli.ok("prefilter", "list").stdout


def test_a_bad_cidr_is_exit_1_with_the_services_message_and_changes_nothing(cli: Cli, tmp_path: Path) -> None:
    before = _entries(cli)
    result = cli.run("prefilter", "add", "192.0.2.0/24", "10.0.0.0/33")
    assert_refused(result, 1, "weir: prefilter: INVALID_ARGUMENT:", "10.0.0.0/33")
    assert len(result.stderr.strip().splitlines()) == 1
    path = tmp_path / "cidrs.txt"
    path.write_text("\n".join([*(f"10.9.{i}.0/24" for i in range(30)), "not-a-cidr"]) + "\n")
    chunked = cli.run("prefilter", "add", "-f", str(path), "--chunk", "20")
    assert_refused(chunked, 1, "INVALID_ARGUMENT", "not-a-cidr", "entries 21-31; the first 20 are in place")
    after = _entries(cli)
    assert {e.cidr for e in after.entries} == {e.cidr for e in before.entries} | {f"10.9.{i}.0/24" for i in range(20)}
    with cli.channel("prefilter") as ch:
        prefilter_pb2_grpc.PrefilterStub(ch).ReplaceEntries(prefilter_pb2.ReplaceEntriesRequest(), timeout=30)


def test_prefilter_replace_loads_a_file_in_the_packed_form_all_or_nothing(cli: Cli, tmp_path: Path) -> None:
    hosts4 = [f"10.{i // 256}.{i % 256}.7" for i in range(3000)]
    hosts6 = [f"2001:db8::{i:x}/128" for i in range(1, 200)]
    path = tmp_path / "list.txt"
    path.write_text("\n".join(["# bulk", *hosts4, "192.0.2.9/32", *hosts6, "198.51.100.0/24"]) + "\n")
    replaced = cli.json("prefilter", "replace", "-f", str(path))
    live = _entries(cli)
    assert replaced == {"entries": 3201, "changed": 3201, "revision": str(live.revision)}
    assert {e.cidr for e in live.entries} == {
        *(f"{h}/32" for h in hosts4),
        "192.0.2.9/32",
        *hosts6,
        "198.51.100.0/24",
    }
    path.write_text("\n".join([*hosts4[:10], "10.0.0.1/33"]) + "\n")  # one bad line: nothing changes
    result = cli.run("prefilter", "replace", "-f", str(path))
    assert_refused(result, 1, "weir: prefilter: INVALID_ARGUMENT:", "10.0.0.1/33")
    assert _entries(cli) == live
    path.write_text("198.51.100.0/24\n203.0.113.5\n")
    assert cli.json("prefilter", "replace", "-f", str(path), "--audit")["entries"] == 2
    assert {(e.cidr, e.mode) for e in _entries(cli).entries} == {
        ("198.51.100.0/24", prefilter_pb2.MODE_AUDIT),
        ("203.0.113.5/32", prefilter_pb2.MODE_AUDIT),
    }
    with cli.channel("prefilter") as ch:
        prefilter_pb2_grpc.PrefilterStub(ch).ReplaceEntries(prefilter_pb2.ReplaceEntriesRequest(), timeout=30)


# ---- usage and reachability ----


@pytest.mark.parametrize(
    "args",
    [
        ("frobnicate",),
        ("endpoint", "create"),
        ("endpoint", "create", "x", "-l", "novalue"),
        ("observe", "--verdict", "MAYBE"),
        ("observe", "--since", "yesterday"),
        ("observe", "--ip", "10.0.0.0/33"),
        ("observe", "--last", "0"),
        ("prefilter", "add"),
        ("prefilter", "replace"),
        ("status", "-o", "yaml"),
    ],
)
def test_usage_errors_exit_2(cli: Cli, args: tuple[str, ...]) -> None:
    result = cli.run(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.strip()


def test_a_node_that_is_not_running_is_exit_3(tmp_path: Path) -> None:
    base = [str(WEIR), "--instance", f"{pid_prefix()}none", "--run-dir", str(tmp_path)]
    for args in (("status",), ("endpoint", "list", "-o", "json"), ("observe", "--duration", "1"), ("metrics",)):
        result = subprocess.run([*base, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert_refused(result, 3)
    result = subprocess.run([*base, "endpoint", "list"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert f"{tmp_path}/orchestrator.sock does not exist" in result.stderr
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # what a killed service leaves: nobody listens
    stale.bind(str(tmp_path / "orchestrator.sock"))
    stale.close()
    result = subprocess.run([*base, "endpoint", "list"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert_refused(result, 3, "does not answer")
    env = {**os.environ, "WEIR_INSTANCE": f"{pid_prefix()}none", "WEIR_RUN_DIR": str(tmp_path / "nothing")}
    result = subprocess.run([str(WEIR), "metrics"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert_refused(result, 3, f"{tmp_path}/nothing/orchestrator.sock")


# ---- observe ----


def test_observe_follow_shows_a_denied_connection_made_after_it_started(cli: Cli) -> None:
    watcher = cli.popen(
        "observe", "--follow", "--endpoint", "web", "--verdict", "dropped", "--protocol", "tcp", "--count", "1",
        "-o", "json",
    )  # fmt: skip
    started = time.time()
    try:
        _deny_traffic(cli, watcher)
        out, err = watcher.communicate(timeout=15)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out
    event = json.loads(lines[0])
    assert (event["type"], event["verdict"], event["reason"]) == ("DROP", "DROPPED", "POLICY_DENIED")
    assert (event["src"], event["dst"], event["dst_port"], event["protocol"]) == (OUTSIDE_V4, cli.web.ipv4, 80, "TCP")
    assert event["endpoint_id"] == cli.web.id and event["dst_identity"] == cli.web.identity
    assert event["hook"] == "HOOK_TO_CONTAINER"
    assert event["destination"]["endpoint"] == "web" and "app=web" in event["destination"]["labels"]
    assert event["source"]["endpoint"] == "" and event["source"]["address"] == OUTSIDE_V4
    assert time.mktime(time.strptime(event["time"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone >= int(started) - 1


def test_observe_table_shows_the_drop_reason_and_filters_leave_others_out(cli: Cli) -> None:
    watcher = cli.popen("observe", "--duration", "20", "--count", "2", "--port", "80")
    other = cli.popen("observe", "--duration", "4", "--protocol", "UDP", "--endpoint", "web")
    try:
        _deny_traffic(cli, watcher)
        out, err = watcher.communicate(timeout=15)
        other_out, other_err = other.communicate(timeout=15)
    finally:
        for p in (watcher, other):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert watcher.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert all(
        f"{OUTSIDE_V4}:" in line and f"-> {cli.web.ipv4}:80 TCP DROPPED (POLICY_DENIED)" in line for line in lines
    )
    assert other.returncode == 0, other_err
    assert other_out == ""  # TCP drops only: the UDP filter shows none


def test_observe_last_replays_the_newest_buffered_flows_and_exits(cli: Cli) -> None:
    watcher = cli.popen("observe", "--duration", "20", "--count", "1", "--port", "80")
    try:
        _deny_traffic(cli, watcher)  # at least one drop in the buffer, whatever ran before
        watcher.communicate(timeout=15)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    with cli.channel("orchestrator") as ch:
        stub = orch_grpc.OrchestratorStub(ch)
        request = orch_pb.GetFlowsRequest(endpoints=["web"], ports=[80], last=2)
        newest = [m.flow for m in stub.GetFlows(request, timeout=10) if m.HasField("flow")]
    started = time.monotonic()
    result = cli.ok("observe", "--endpoint", "web", "--port", "80", "--last", "2", "--since", "10m", "-o", "json")
    assert time.monotonic() - started < 10  # no follow: it does not wait for new flows
    flows = [json.loads(text) for text in result.stdout.splitlines()]
    assert [int(f["seq"]) for f in flows] == [f.seq for f in newest] and len(flows) == 2
    assert all(f["verdict"] == "DROPPED" and f["destination"]["endpoint"] == "web" for f in flows)
    table = cli.ok("observe", "--endpoint", "web", "--port", "80", "--last", "1").stdout.splitlines()
    assert len(table) == 1 and table[0].endswith(" to=web") and f"-> {cli.web.ipv4}:80 TCP DROPPED" in table[0]
    nothing = cli.ok("observe", "--endpoint", "client", "--port", "80", "--protocol", "UDP")
    assert nothing.stdout == "" and "no matching flows" in nothing.stderr
    stats = cli.json("metrics")["flows"]
    assert int(stats["capacity"]) == 4096 and int(stats["seen"]) >= int(stats["buffered"]) >= 1
    assert "SUBSCRIBER DROPPED" in cli.ok("metrics").stdout


# ---- down (last: it stops the node) ----


def test_down_stops_the_suite_and_tears_the_node_down(cli: Cli) -> None:
    node = cli.node
    result = cli.run(
        "down", "--bpffs-root", str(node.bpffs_root), "--state-dir", str(node.state_dir),
        "--cgroup-root", str(node.cgroup_root), in_node=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"stopping the suite (pid {cli.suite.pid})" in result.stderr
    assert cli.suite.wait(timeout=5) == 0
    assert f"removed pins {node.bpffs_root}" in result.stdout
    assert not node.bpffs_root.exists() and not node.run_dir.exists()
    assert not any(netns.exists(f"{node.name}.{ep}") for ep in ("web", "client"))
    assert_refused(cli.run("status"), 3)
