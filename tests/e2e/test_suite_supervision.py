"""`./weir up` supervises: a dead service comes back while the others keep serving.

One node runs the suite for the whole module. A service killed with SIGKILL is started
again by the suite (same socket, new pid, back-off growing when it dies again soon), the
other services answer throughout, an idle node polled by `weir status` logs nothing at
info level, and SIGTERM stops the suite and every child.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.orchestrator import suite as supervisor
from services.orchestrator.suite import BACKOFF_MAX, SERVICES, SUITE, Member, backoff
from tests.harness.node import REPO, Node, pid_prefix
from tests.harness.suite import SUITE_SERVICES, running_suite, stop_suite

_names = itertools.count()
RESTART_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def suite_node(tmp_path_factory: pytest.TempPathFactory, built: Path) -> Iterator[tuple[Node, subprocess.Popen[bytes]]]:
    name = f"{pid_prefix()}s{next(_names)}"
    with running_suite(name, tmp_path_factory.mktemp(name)) as running:
        yield running


def _pid(node: Node, service: str) -> int:
    return int((node.run_dir / f"{service}.lock").read_text())


def _log(node: Node) -> str:
    return (node.workdir / "suite.log").read_text(errors="replace")


class Prober:
    """Asks a service's health every 50 ms in a thread; counts the answers that were not SERVING."""

    def __init__(self, node: Node, service: str) -> None:
        self.node, self.service = node, service
        self.asked = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.asked += 1
            if not self.node.serving(self.service):
                self.failed += 1
            time.sleep(0.05)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _kill_and_wait_back(node: Node, service: str) -> tuple[int, float]:
    """SIGKILL a service; return its new pid once it answers SERVING again, and how long that took."""
    old = _pid(node, service)
    socket_path = node.socket(service)
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    deadline = killed + RESTART_TIMEOUT
    while time.monotonic() < deadline:
        if socket_path.exists() and node.serving(service) and _pid(node, service) != old:
            return _pid(node, service), time.monotonic() - killed
        time.sleep(0.1)
    raise AssertionError(f"{service} did not come back within {RESTART_TIMEOUT}s:\n{_log(node)[-3000:]}")


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff(100) == BACKOFF_MAX
    assert SERVICES == [m.name for m in SUITE] == SUITE_SERVICES


def test_a_child_restarts_after_its_backoff_and_resets_only_once_up_and_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    child = supervisor.Child(Member("probe"), [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ),
                        tmp_path / "probe.sock")  # fmt: skip
    child.start()
    assert child.process is not None and child.process.wait(timeout=30) == 3
    now = time.monotonic()
    child.tend(now)
    assert (child.failures, child.restart_at) == (1, now + 1)
    first = child.process
    child.tend(now + 0.5)
    assert child.process is first  # still waiting out its back-off
    child.argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    child.tend(now + 1)
    assert child.process is not first and child.restart_at is None
    try:
        child.started -= supervisor.HEALTHY_RESET  # it has run long enough...
        child.tend(time.monotonic())
        assert child.failures == 1  # ...but nothing answers SERVING on its socket
        monkeypatch.setattr(supervisor, "serving", lambda socket: socket == tmp_path / "probe.sock")
        child.next_health_check = 0
        child.tend(time.monotonic())
        assert child.failures == 0
    finally:
        child.terminate()
        child.wait()


@pytest.mark.root
def test_a_killed_service_comes_back_while_another_answers_throughout(
    suite_node: tuple[Node, subprocess.Popen[bytes]],
) -> None:
    node, suite = suite_node
    with Prober(node, "lb") as lb:
        new_pid, took = _kill_and_wait_back(node, "policy")
    assert suite.poll() is None
    assert lb.asked > 10 and lb.failed == 0
    assert node.socket("policy").exists()
    assert "weir-suite: policy exited with -9; restarting in 1s" in _log(node)
    assert took < 15
    assert all(node.serving(s) for s in SUITE_SERVICES)
    assert Path(f"/proc/{new_pid}").exists()


@pytest.mark.root
def test_the_orchestrator_comes_back_and_a_second_death_waits_longer(
    suite_node: tuple[Node, subprocess.Popen[bytes]],
) -> None:
    node, suite = suite_node
    with Prober(node, "prefilter") as prefilter:
        _kill_and_wait_back(node, "orchestrator")
        _, took = _kill_and_wait_back(node, "orchestrator")
    assert suite.poll() is None
    assert prefilter.asked > 10 and prefilter.failed == 0
    log = _log(node)
    assert "orchestrator exited with -9; restarting in 1s" in log
    assert "orchestrator exited with -9; restarting in 2s" in log  # died again soon: the back-off grew
    assert took >= 2
    deadline = time.monotonic() + RESTART_TIMEOUT  # the others re-register with the new orchestrator
    while time.monotonic() < deadline and not all(node.serving(s) for s in SUITE_SERVICES):
        time.sleep(0.2)
    assert all(node.serving(s) for s in SUITE_SERVICES)


@pytest.mark.root
def test_an_idle_node_polled_by_weir_status_logs_nothing_at_info(
    suite_node: tuple[Node, subprocess.Popen[bytes]],
) -> None:
    node, _ = suite_node
    time.sleep(2)  # let the restarts of the earlier tests settle
    mark = len(_log(node))
    argv = [str(REPO / "weir"), "--instance", node.name, "--run-dir", str(node.run_dir), "status"]
    for _ in range(3):
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        time.sleep(1)
    lines = [json.loads(line) for line in _log(node)[mark:].splitlines() if line.startswith("{")]
    assert [line for line in lines if line["level"] != "debug"] == []


@pytest.mark.root
def test_sigterm_stops_the_suite_and_every_child(suite_node: tuple[Node, subprocess.Popen[bytes]]) -> None:
    node, suite = suite_node
    children = {s: _pid(node, s) for s in SUITE_SERVICES}
    assert all(Path(f"/proc/{pid}").exists() for pid in children.values())
    mark = len(_log(node))
    started = time.monotonic()
    assert stop_suite(suite) == 0
    assert time.monotonic() - started < 20
    assert not [s for s, pid in children.items() if Path(f"/proc/{pid}").exists()]
    assert not any(node.socket(s).exists() for s in SUITE_SERVICES)
    assert "exited with" not in _log(node)[mark:]  # stopped, not restarted
