"""The node's one metrics endpoint carries every service's RPCs, by service, method and code.

Node A runs the whole suite the way `./weir up` runs it, with `--metrics-listen`; node B
(another instance on the same host, its own namespace) runs an orchestrator with its own
endpoint and a prefilter. Real calls go to each service's socket, and the scrape is parsed
with prometheus-client's parser: each service's calls move by exactly what was sent (a
refused call under its code), none of B's calls appear in A's scrape, a service that does
not answer is counted as a scrape error, and a restarted service's counts begin again with
a newer start time.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from weir.prefilter.v1 import prefilter_pb2, prefilter_pb2_grpc

from services.common import netns as common_netns
from tests.harness.node import Node, pid_prefix
from tests.harness.suite import SUITE_SERVICES, running_suite

pytestmark = pytest.mark.root

METRICS_PORT = 9464
RPCS = "weir_rpc_requests_total"
ERRORS = "weir_scrape_errors_total"
STARTED = "weir_service_start_time_seconds"
# A call of each service that nobody else makes (the scrape itself asks lb ListServices and
# GetCounters, prefilter GetCounters), with an empty request, and the code it answers.
CALLS = {
    "orchestrator": ("/weir.orchestrator.v1.Orchestrator/ListEndpoints", "OK"),
    "prefilter": ("/weir.prefilter.v1.Prefilter/ListEntries", "OK"),
    "policy": ("/weir.policy.v1.Policy/ListRules", "OK"),
    "lb": ("/weir.lb.v1.LoadBalancer/GetService", "NOT_FOUND"),  # no service has the empty name
    "sockaccel": ("/weir.sockaccel.v1.SockAccel/GetStatus", "OK"),
    "ipsec": ("/weir.ipsec.v1.Ipsec/GetStatus", "OK"),
    "l7": ("/weir.l7.v1.L7/GetState", "OK"),
}
ADD = "/weir.prefilter.v1.Prefilter/AddEntries"
_names = itertools.count()

Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(node: Node) -> Scrape:
    """The node's /metrics, parsed by prometheus-client: (sample name, sorted labels) -> value."""
    with common_netns.entered(node.ns):
        body = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).read().decode()
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(metrics: Scrape, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def rpcs(metrics: Scrape, service: str, method: str, code: str) -> float:
    return value(metrics, RPCS, service=service, method=method, code=code)


def services_in(metrics: Scrape) -> set[str]:
    return {dict(labels)["service"] for name, labels in metrics if name == RPCS}


def call(node: Node, service: str, method: str, times: int) -> None:
    """Send `times` calls with an empty request; whatever status they get is what is counted."""
    with node.channel(service) as channel:
        stub: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            method, request_serializer=bytes, response_deserializer=bytes
        )
        for _ in range(times):
            try:
                stub(b"", timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED), exc


def refused_adds(node: Node, times: int) -> None:
    stub = prefilter_pb2_grpc.PrefilterStub(node.channel("prefilter"))
    for _ in range(times):
        with pytest.raises(grpc.RpcError) as err:
            stub.AddEntries(prefilter_pb2.AddEntriesRequest(entries=[prefilter_pb2.Entry(cidr="300.1.2.3/32")]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory, built: Path) -> Iterator[Node]:
    name = f"{pid_prefix()}r{next(_names)}"
    with running_suite(name, tmp_path_factory.mktemp(name), "--metrics-listen", f"127.0.0.1:{METRICS_PORT}") as (
        node,
        _suite,
    ):
        yield node


@pytest.fixture(scope="module")
def b(tmp_path_factory: pytest.TempPathFactory, built: Path) -> Iterator[Node]:
    name = f"{pid_prefix()}r{next(_names)}"
    node = Node(name, tmp_path_factory.mktemp(name))
    try:
        node.setup()
        node.start("orchestrator", "--metrics-listen", f"127.0.0.1:{METRICS_PORT}")
        node.start("prefilter")
        yield node
    finally:
        node.teardown()


def test_every_service_s_calls_move_by_service_method_and_code_in_the_node_s_one_scrape(a: Node) -> None:
    before = scrape(a)
    assert services_in(before) == set(SUITE_SERVICES)  # each answered the suite's health checks
    for service, (method, _code) in CALLS.items():
        call(a, service, method, 3)
    refused_adds(a, 2)
    after = scrape(a)
    for service, (method, code) in CALLS.items():
        moved = rpcs(after, service, method, code) - rpcs(before, service, method, code)
        assert moved == 3, (service, method, code, moved)
    assert rpcs(after, "prefilter", ADD, "INVALID_ARGUMENT") - rpcs(before, "prefilter", ADD, "INVALID_ARGUMENT") == 2
    assert rpcs(after, "prefilter", ADD, "OK") == rpcs(before, "prefilter", ADD, "OK")
    assert services_in(after) == set(SUITE_SERVICES)
    for service in SUITE_SERVICES:
        assert value(after, STARTED, service=service) > 0, service
        assert value(after, ERRORS, service=service) == value(before, ERRORS, service=service), service
    # Within a process's life no count goes backwards.
    for (name, labels), count in before.items():
        if name == RPCS:
            service = dict(labels)["service"]
            if value(after, STARTED, service=service) == value(before, STARTED, service=service):
                assert after.get((name, labels), 0.0) >= count, (labels, count)


def test_another_instance_s_calls_never_show_in_this_node_s_scrape(a: Node, b: Node) -> None:
    method = CALLS["prefilter"][0]
    a_before, b_before = scrape(a), scrape(b)
    refused_adds(b, 5)
    call(b, "prefilter", method, 4)
    a_after, b_after = scrape(a), scrape(b)
    assert (
        rpcs(b_after, "prefilter", ADD, "INVALID_ARGUMENT") - rpcs(b_before, "prefilter", ADD, "INVALID_ARGUMENT") == 5
    )
    assert rpcs(b_after, "prefilter", method, "OK") - rpcs(b_before, "prefilter", method, "OK") == 4
    assert rpcs(a_after, "prefilter", ADD, "INVALID_ARGUMENT") == rpcs(a_before, "prefilter", ADD, "INVALID_ARGUMENT")
    assert rpcs(a_after, "prefilter", method, "OK") == rpcs(a_before, "prefilter", method, "OK")
    assert services_in(b_after) == {"orchestrator", "prefilter"}


def test_a_service_that_does_not_answer_is_a_scrape_error_and_a_restart_counts_from_zero(b: Node) -> None:
    method = CALLS["prefilter"][0]
    call(b, "prefilter", method, 3)
    before = scrape(b)
    counted, started = rpcs(before, "prefilter", method, "OK"), value(before, STARTED, service="prefilter")
    assert counted >= 3 and started > 0
    b.kill("prefilter", signal.SIGKILL)  # its socket stays behind, refusing connections
    down = scrape(b)
    assert value(down, ERRORS, service="prefilter") == value(before, ERRORS, service="prefilter") + 1
    assert "prefilter" not in services_in(down)
    assert value(down, STARTED, service="prefilter") == 0
    assert "orchestrator" in services_in(down) and value(down, "weir_map_capacity", map="conntrack") > 0
    b.start("prefilter")
    call(b, "prefilter", method, 2)
    back = scrape(b)
    assert value(back, STARTED, service="prefilter") > started
    assert rpcs(back, "prefilter", method, "OK") == 2  # a new process: its counts began at zero
    assert value(back, ERRORS, service="prefilter") == value(down, ERRORS, service="prefilter")


def test_grpcurl_lists_the_telemetry_service_on_every_socket(a: Node) -> None:
    grpcurl = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "grpcurl"
    if not grpcurl.exists():
        pytest.skip("grpcurl is not installed in .venv (./weir setup installs it)")
    for service in SUITE_SERVICES:
        listed = subprocess.run(
            [str(grpcurl), "-plaintext", "-unix", str(a.socket(service)), "list"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "weir.common.v1.Telemetry" in listed.stdout.split(), (service, listed.stdout, listed.stderr)
