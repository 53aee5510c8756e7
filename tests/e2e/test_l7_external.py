"""Envoy run beside the service (as compose runs it): the service writes the bootstrap and watches.

The test plays compose's part: it starts Envoy from the bootstrap the service wrote, kills
it, and starts it again; the service never starts one itself, reports what the admin
endpoint says, and configures whichever Envoy connects.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from weir.l7.v1 import l7_pb2 as pb

from services.l7.envoy import Sidecar
from tests.harness.l7 import WEB_RULES, Service, free_port, listener, request, start_upstream
from tests.harness.node import REPO


@pytest.fixture
def external(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    monkeypatch.setenv("WEIR_L7_ENVOY", "external")
    upstream = start_upstream()
    service = Service(tmp_path, upstream)
    try:
        yield service
    finally:
        if service.process is not None:
            service.stop()
            print(f"---- l7.log ----\n{service.tail(40)}")
        upstream.server.shutdown()


def start_envoy(service: Service) -> subprocess.Popen[bytes]:
    bootstrap = service.workdir / "run" / "l7" / "envoy.json"
    binary = Sidecar("x", service.workdir, service.socket).binary()
    argv = [binary, "-c", str(bootstrap), "--disable-hot-restart", "--concurrency", "1", "--log-level", "error"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


def test_an_envoy_run_beside_the_service_is_configured_and_watched(external: Service) -> None:
    service = external
    with open(service.log, "ab") as out:
        service.process = subprocess.Popen(service.argv(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 30
    while not service.socket.exists():
        assert time.monotonic() < deadline and service.process.poll() is None, service.tail()
        time.sleep(0.1)
    assert not service.serving(), "healthy without an Envoy"
    port = free_port()
    reply = service.stub().SetListeners(
        pb.SetListenersRequest(endpoint="web", listeners=[listener(port, service.upstream, WEB_RULES)]), timeout=10
    )
    state = service.stub().GetState(pb.GetStateRequest(), timeout=5)
    assert not state.envoy.managed and not state.envoy.ready and state.envoy.pid == 0
    envoy = start_envoy(service)
    try:
        deadline = time.monotonic() + 15
        while not service.serving():
            assert time.monotonic() < deadline, service.tail()
            time.sleep(0.1)
        while service.stub().GetState(pb.GetStateRequest(), timeout=5).acked_version != reply.config_version:
            assert time.monotonic() < deadline, service.tail()
            time.sleep(0.05)
        assert request(port, "GET", "/public")[0] == 200 and request(port, "POST", "/admin")[0] == 403
        envoy.send_signal(signal.SIGKILL)
        envoy.wait(timeout=10)
        with pytest.raises(ConnectionRefusedError):
            request(port, "POST", "/admin")
        envoy = start_envoy(service)  # compose's restart
        deadline = time.monotonic() + 15
        while True:
            try:
                if request(port, "GET", "/public", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, service.tail()
            time.sleep(0.05)
        assert request(port, "POST", "/admin")[0] == 403
    finally:
        envoy.kill()
        envoy.wait(timeout=10)
