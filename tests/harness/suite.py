"""A node run the way `./weir up` runs it: the suite process in the node's namespace.

Tests that share one node per module (the CLI, supervision) start it once with
`running_suite` and get it torn down, suite and all, whatever the tests left.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from services.orchestrator.suite import SERVICES
from tests.harness import netns
from tests.harness.node import REPO, Node

SUITE_SERVICES = list(SERVICES)  # what `./weir up` starts (services.orchestrator.suite)
START_TIMEOUT = 60.0


def suite_argv(node: Node, *extra: str) -> list[str]:
    """`./weir up` for the node: the suite module with the node's flags, inside its namespace."""
    common = node.argv("x")[node.argv("x").index("--instance") :]
    return [*netns.nsenter_argv(node.ns), sys.executable, "-m", "services.orchestrator.suite", *common, *extra]


def wait_serving(node: Node, suite: subprocess.Popen[bytes], services: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(node.serving(s) for s in services):
        assert suite.poll() is None, f"the suite exited with {suite.returncode}"
        time.sleep(0.3)
    assert all(node.serving(s) for s in services), {s: node.serving(s) for s in services}


def stop_suite(suite: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM the suite and wait; a suite that hangs is killed (and the test sees the code)."""
    if suite.poll() is None:
        suite.send_signal(signal.SIGTERM)
        try:
            return suite.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            suite.kill()
            suite.wait()
    return suite.returncode


@contextlib.contextmanager
def running_suite(name: str, workdir: Path, *extra: str) -> Iterator[tuple[Node, subprocess.Popen[bytes]]]:
    """A node with every suite service SERVING (``extra``: more flags for `./weir up`); its output
    goes to ``<workdir>/suite.log``."""
    node = Node(name, workdir)
    suite: subprocess.Popen[bytes] | None = None
    try:
        node.setup()
        with open(workdir / "suite.log", "ab") as log:
            suite = subprocess.Popen(suite_argv(node, *extra), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_serving(node, suite, SUITE_SERVICES, START_TIMEOUT)
        yield node, suite
    finally:
        if suite is not None:
            stop_suite(suite)
        node.teardown()  # prints the tail of suite.log, for a failed test
