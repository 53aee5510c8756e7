"""`./weir up` as a user runs it: every service of the node starts, answers, and stops on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.harness import netns
from tests.harness.node import REPO, Node

pytestmark = pytest.mark.root

SERVICES = ["orchestrator", "prefilter", "policy", "lb"]


def serving(node: Node, service: str) -> bool:
    try:
        with node.channel(service) as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            reply = check(health_pb2.HealthCheckRequest(), timeout=1)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def test_suite_starts_every_service_and_stops_cleanly(make_node: Callable[..., Node]) -> None:
    node = make_node()
    argv = [*netns.nsenter_argv(node.ns), sys.executable, "-m", "services.orchestrator.suite",
            *node.argv("x")[node.argv("x").index("--instance"):]]
    suite = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(serving(node, s) for s in SERVICES):
            assert suite.poll() is None, suite.communicate()[0].decode(errors="replace")[-3000:]
            time.sleep(0.3)
        assert all(serving(node, s) for s in SERVICES)
        suite.send_signal(signal.SIGTERM)
        assert suite.wait(timeout=30) == 0
        assert not any(node.socket(s).exists() for s in SERVICES)
    finally:
        if suite.poll() is None:
            suite.kill()
            suite.wait()
