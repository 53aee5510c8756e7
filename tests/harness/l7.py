"""The L7 service for tests: its real process, an upstream HTTP server, requests through Envoy.

The upstream records every request it gets, so a test can tell an answer from Envoy
(403 "RBAC: access denied", nothing upstream) from the upstream's own.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
from weir.common.v1 import common_pb2
from weir.l7.v1 import l7_pb2 as pb
from weir.l7.v1 import l7_pb2_grpc as pb_grpc

from tests.harness.node import REPO

START_TIMEOUT = 30.0
INGRESS = common_pb2.DIRECTION_INGRESS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Upstream:
    """The HTTP server behind Envoy: answers 200 and records (method, path, headers)."""

    server: ThreadingHTTPServer
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)  # the client address of each request, in order

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host!s}:{port}"

    def got(self, method: str, path: str) -> bool:
        return any(m == method and p == path for m, p, _ in self.seen)


class _Server(ThreadingHTTPServer):
    """No reverse DNS lookup of its own address on bind (HTTPServer's getfqdn).

    In an endpoint's namespace the lookup's query is dropped on its way out, and the
    resolver's 5 s timeout was what every L7 test's set-up waited for.
    """

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


def start_upstream(address: str = "127.0.0.1", port: int = 0) -> Upstream:
    """Serve in a thread; the listening socket is made here (so inside a namespace entered around the call)."""
    upstream: Upstream

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            upstream.seen.append((self.command, self.path, dict(self.headers)))
            upstream.peers.append(str(self.client_address[0]))
            body = f"upstream {self.command} {self.path}".encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:
            return

    server = _Server((address, port), Handler)
    server.daemon_threads = True
    upstream = Upstream(server)
    # shutdown() waits for the loop's next poll: 0.5 s by default, in every test's teardown
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return upstream


@dataclass
class Service:
    """The l7 service process and what tests use of it."""

    workdir: Path
    upstream: Upstream
    process: subprocess.Popen[bytes] | None = None
    wrap: tuple[str, ...] = ()  # e.g. nsenter into a namespace

    @property
    def socket(self) -> Path:
        return self.workdir / "run" / "l7.sock"

    @property
    def log(self) -> Path:
        return self.workdir / "l7.log"

    def argv(self) -> list[str]:
        return [
            *self.wrap, sys.executable, "-m", "services.l7", "--instance", f"l7t{os.getpid()}",
            "--run-dir", str(self.workdir / "run"), "--state-dir", str(self.workdir / "state"),
            "--bpffs-root", str(self.workdir / "bpffs"), "--cgroup-root", str(self.workdir / "cgroup"),
        ]  # fmt: skip

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"l7 exited with {self.process.returncode}:\n{self.tail()}")
            if self.socket.exists() and self.serving():
                return
            time.sleep(0.1)
        raise TimeoutError(f"l7 did not become healthy:\n{self.tail()}")

    def serving(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            with grpc.insecure_channel(f"unix://{self.socket}") as channel:
                check = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[attr-defined]
                reply = check(health_pb2.HealthCheckRequest(), timeout=1)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        # The service's own stop is bounded but long on a loaded machine: API grace (5 s),
        # Envoy's drain (admin call 1 s + 1 s), then SIGTERM and SIGKILL waits (5 s each).
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill_all()  # the test fails, but leaves no service or Envoy behind
            raise

    def kill_all(self) -> None:
        """SIGKILL the service and the Envoy its pid file names."""
        assert self.process is not None
        pid_file = self.workdir / "run" / "l7" / "envoy.pid"
        try:
            envoy = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            envoy = 0
        self.process.kill()
        self.process.wait(timeout=10)
        if envoy and running(envoy):
            os.kill(envoy, signal.SIGKILL)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def stub(self) -> pb_grpc.L7Stub:
        return pb_grpc.L7Stub(grpc.insecure_channel(f"unix://{self.socket}"))


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left for an init that does not reap does not count)."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def rule(
    name: str, method: str = "", path: str = "", host: str = "", headers: tuple[pb.HeaderMatch, ...] = ()
) -> pb.HttpRule:
    return pb.HttpRule(name=name, method=method, path=path, host=host, headers=list(headers))


def listener(proxy_port: int, upstream: Upstream, rules: list[pb.HttpRule], port: int = 80) -> pb.Listener:
    return pb.Listener(direction=INGRESS, port=port, proxy_port=proxy_port, upstream=upstream.address, rules=rules)


def request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, timeout: float = 5, source: str = ""
) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=timeout, source_address=(source, 0) if source else None
    )
    try:
        conn.request(method, path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read().decode()
    finally:
        conn.close()


# The rules of endpoint "web" in the tests: one of each kind of match.
WEB_RULES = [
    rule("public", method="GET", path="/public(/.*)?"),
    rule("token", headers=(pb.HeaderMatch(name="X-Token", exact="s3cret"),)),
    rule("traced", method="PUT", headers=(pb.HeaderMatch(name="x-trace", present=True),)),
    rule("api-host", host=r"api\.example\.com(:[0-9]+)?"),
]
