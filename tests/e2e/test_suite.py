"""`./weir up` as a user runs it: every service of the node starts, answers, and stops on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from tests.harness import netns
from tests.harness.node import REPO, Node

pytestmark = pytest.mark.root

SERVICES = ["orchestrator", "prefilter", "policy", "lb"]


def test_suite_starts_every_service_and_stops_cleanly(make_node: Callable[..., Node]) -> None:
    node = make_node()
    argv = [
        *netns.nsenter_argv(node.ns),
        sys.executable,
        "-m",
        "services.orchestrator.suite",
        *node.argv("x")[node.argv("x").index("--instance") :],
    ]
    suite = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(node.serving(s) for s in SERVICES):
            assert suite.poll() is None, suite.communicate()[0].decode(errors="replace")[-3000:]
            time.sleep(0.3)
        assert all(node.serving(s) for s in SERVICES)
        suite.send_signal(signal.SIGTERM)
        assert suite.wait(timeout=30) == 0
        assert not any(node.socket(s).exists() for s in SERVICES)
    finally:
        if suite.poll() is None:
            suite.kill()
            suite.wait()
