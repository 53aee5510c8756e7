"""The suite as one instance: TLS TCP listeners for every service, and only one suite per instance."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.common.test_common_server import _make_pki
from tests.harness import netns
from tests.harness.node import REPO, Node

pytestmark = pytest.mark.root

SERVICES = ["orchestrator", "prefilter", "policy", "lb"]  # the suite's documented order

SERVICE_NAMES = {
    "orchestrator": "weir.orchestrator.v1.Orchestrator",
    "prefilter": "weir.prefilter.v1.Prefilter",
    "policy": "weir.policy.v1.Policy",
    "lb": "weir.lb.v1.LoadBalancer",
}

# Asks every target, over mutual TLS from inside the node, which of the services answers there.
_CLIENT = textwrap.dedent(
    """
    import json, sys
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    pki, targets, names = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    read = lambda n: open(f"{pki}/{n}", "rb").read()
    creds = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
    out = {}
    for target in targets:
        with grpc.secure_channel(target, creds) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            found = []
            for name in names:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == 1:
                        found.append(name)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        found.append(exc.code().name)
            out[target] = found
    print(json.dumps(out))
    """
)


def _suite_argv(node: Node, *extra: str) -> list[str]:
    common = node.argv("x")[node.argv("x").index("--instance") :]
    return [*netns.nsenter_argv(node.ns), sys.executable, "-m", "services.orchestrator.suite", *common, *extra]


@contextmanager
def running_suite(node: Node, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    suite = subprocess.Popen(_suite_argv(node, *extra), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(node.serving(s) for s in SERVICES):
            assert suite.poll() is None, suite.communicate()[0].decode(errors="replace")[-3000:]
            time.sleep(0.3)
        assert all(node.serving(s) for s in SERVICES)
        yield suite
    finally:
        if suite.poll() is None:
            suite.send_signal(signal.SIGTERM)
            try:
                suite.wait(timeout=30)
            except subprocess.TimeoutExpired:
                suite.kill()
                suite.wait()


def _who_answers(node: Node, pki: Path, targets: list[str]) -> dict[str, list[str]]:
    argv = [
        *netns.nsenter_argv(node.ns),
        sys.executable,
        "-c",
        _CLIENT,
        str(pki),
        json.dumps(targets),
        json.dumps(list(SERVICE_NAMES.values())),
    ]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answers: dict[str, list[str]] = json.loads(result.stdout)
    return answers


def _tls(pki: Path) -> tuple[str, ...]:
    return (
        "--tls-cert",
        str(pki / "server.pem"),
        "--tls-key",
        str(pki / "server.key"),
        "--tls-client-ca",
        str(pki / "ca.pem"),
    )


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path / "pki"
    d.mkdir()
    _make_pki(d)
    return d


def test_a_port_range_gives_each_service_its_tls_listener_in_order(make_node: Callable[..., Node], pki: Path) -> None:
    node = make_node()
    with running_suite(node, "--tcp-listen", "127.0.0.1:7100-7109", *_tls(pki)):
        targets = [f"127.0.0.1:{7100 + i}" for i in range(len(SERVICES))]
        answers = _who_answers(node, pki, targets)
        assert answers == {t: [SERVICE_NAMES[s]] for t, s in zip(targets, SERVICES, strict=True)}


def test_addresses_by_name_give_only_the_named_services_a_listener(make_node: Callable[..., Node], pki: Path) -> None:
    node = make_node()
    with running_suite(node, "--tcp-listen", "lb=127.0.0.1:7201,orchestrator=127.0.0.1:7200", *_tls(pki)):
        answers = _who_answers(node, pki, ["127.0.0.1:7200", "127.0.0.1:7201"])
        assert answers == {"127.0.0.1:7200": [SERVICE_NAMES["orchestrator"]], "127.0.0.1:7201": [SERVICE_NAMES["lb"]]}
        listening = netns.run(node.ns, "ss", "-Htln").stdout
        assert sorted(line.split()[3].rpartition(":")[2] for line in listening.splitlines()) == ["7200", "7201"]


def test_a_second_suite_of_the_same_instance_fails_before_touching_anything(make_node: Callable[..., Node]) -> None:
    node = make_node()
    with running_suite(node) as first:
        sockets = {s: node.socket(s).stat().st_ino for s in SERVICES}
        started = time.monotonic()
        second = subprocess.run(_suite_argv(node), cwd=REPO, capture_output=True, text=True, timeout=30)
        assert second.returncode != 0
        assert time.monotonic() - started < 10
        lines = [line for line in second.stderr.splitlines() if f"pid {first.pid}" in line]
        assert len(lines) == 1, second.stderr
        assert "services.orchestrator.suite" in lines[0]
        assert "Traceback" not in second.stderr and "exited with" not in second.stderr  # no service was started
        assert first.poll() is None
        assert {s: node.socket(s).stat().st_ino for s in SERVICES} == sockets
        assert all(node.serving(s) for s in SERVICES)


def test_a_service_refuses_a_key_others_can_read_with_one_line(make_node: Callable[..., Node], pki: Path) -> None:
    node = make_node()
    (pki / "server.key").chmod(0o644)
    argv = node.argv("prefilter", ("--tcp-listen", "127.0.0.1:7300", *_tls(pki)))
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    errors = [json.loads(line) for line in result.stderr.splitlines() if '"cannot serve"' in line]
    assert len(errors) == 1, result.stderr
    assert str(pki / "server.key") in errors[0]["error"] and "0644" in errors[0]["error"]
    assert "Traceback" not in result.stderr
    assert not node.socket("prefilter").exists()
