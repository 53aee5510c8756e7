"""Bootstrap of every Weir gRPC service: listeners, health, reflection, clean shutdown.

Each service only registers its servicers; this module makes them reachable the same way
everywhere: a 0600 unix socket (plus opt-in TLS TCP), gRPC health checking, server
reflection (so grpcurl works with no proto files), the Telemetry RPC counts (for the node's
metrics endpoint), and a SIGTERM that drains calls, runs the
service's clean-up and removes the socket.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import grpc.aio
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import telemetry
from services.common.config import NodeConfig
from services.common.errors import ErrorInterceptor, FailedPrecondition, WeirError
from services.common.health import Readiness
from services.common.logs import setup_logging

log = structlog.get_logger("weir.server")

Register = Callable[[grpc.aio.Server], Sequence[str]]
OnStop = Callable[[], Awaitable[None] | None]

STOP_GRACE_SECONDS = 5.0
# How long past its grace a gRPC server's stop may take before we go on without it: a stop
# that never returned once left a service (and the Envoy it owns) running after SIGTERM.
STOP_MARGIN_SECONDS = 5.0
# Bulk calls (a million prefilter entries, ten thousand services) exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 256 << 20
GRPC_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
_MAX_UNIX_PATH = 107  # sizeof(sun_path) - 1 on Linux


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead process; refuse to steal one that a live server holds."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FailedPrecondition(f"{path} exists and is not a socket; remove it or change --run-dir")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise FailedPrecondition(f"another process is already serving on {path}")


def _read(path: Path | None) -> bytes | None:
    """Read a TLS file, turning a missing or unreadable one into an actionable startup error."""
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(f"cannot read TLS file {path}: {exc.strerror}") from exc


def check_key_file(path: Path) -> None:
    """Refuse a private key others can read or anyone but its owner can write; warn if group-readable.

    A key readable by every user is no longer a secret; a group-readable one (Debian's
    ``ssl-cert`` convention) is a choice someone made, so it only gets a warning.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise FailedPrecondition(f"cannot read TLS file {path}: {exc.strerror}") from exc
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise FailedPrecondition(
            f"TLS private key {path} has mode {mode:04o}, so other users can read or change it; "
            f"run 'chmod 600 {path}' (or 640 for a group that needs it)"
        )
    if mode & stat.S_IRGRP:
        log.warning("TLS private key is readable by its group", path=str(path), mode=f"{mode:04o}")


def check_tls_files(config: NodeConfig) -> None:
    """Exit 1 with one line if a TCP listener's TLS files are missing or the key is not private.

    Run at the very start of a service, before it loads or waits on anything, so a bad key
    is reported at once rather than after the service has touched the datapath.
    """
    if not config.tcp_listen:
        return
    try:
        for path in (config.tls_cert, config.tls_client_ca):
            _read(path)
        if config.tls_key is not None:
            check_key_file(config.tls_key)
            _read(config.tls_key)
    except WeirError as exc:
        log.error("cannot serve", error=str(exc))
        raise SystemExit(1) from None


def _bind(add_port: Callable[[], int], address: str) -> int:
    """Run a grpc add_*_port call; grpc signals failure by RuntimeError or by port 0."""
    try:
        port = add_port()
    except RuntimeError as exc:
        raise FailedPrecondition(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise FailedPrecondition(f"cannot listen on {address}")
    return port


class ServiceServer:
    """One service's gRPC server; ``serve`` runs one until a signal, tests drive it directly."""

    def __init__(
        self,
        service: str,
        config: NodeConfig,
        register: Register,
        on_stop: OnStop | None = None,
        readiness: Readiness | None = None,
    ) -> None:
        self.service = service
        self.config = config
        self.socket_path = config.socket_path(service)
        self.health = health.aio.HealthServicer()
        self.readiness = readiness if readiness is not None else Readiness()
        self.tcp_port: int | None = None
        self.service_names: tuple[str, ...] = ()
        self._register = register
        self._on_stop = on_stop
        self._server: grpc.aio.Server | None = None
        self._socket_ino: int | None = None
        self._stopped = False

    async def start(self) -> None:
        """Register everything, bind the listeners and start serving."""
        run_dir = self.config.run_dir
        if len(os.fsencode(self.socket_path)) > _MAX_UNIX_PATH:
            raise FailedPrecondition(
                f"socket path {self.socket_path} is longer than {_MAX_UNIX_PATH} bytes; choose a shorter --run-dir"
            )
        if not run_dir.exists():
            run_dir.mkdir(mode=0o700, parents=True)
            os.chmod(run_dir, 0o700)
        _clear_stale_socket(self.socket_path)

        # so_reuseport=0: a second instance on the same TCP port must fail, not share it.
        server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=GRPC_OPTIONS)
        self._server = server
        self.service_names = tuple(self._register(server))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        counts = telemetry.add_to_server(server, self.service, self.config.instance)
        await self.readiness.bind(self._set_serving)
        names = (*self.service_names, counts, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)

        old_umask = os.umask(0o177)  # the socket is created 0600 from the start
        try:
            target = f"unix:{self.socket_path.absolute()}"
            _bind(lambda: server.add_insecure_port(target), target)
            if self.socket_path.exists():  # grpc binds here; lets stop() clean up a failed start
                self._socket_ino = os.lstat(self.socket_path).st_ino
            if self.config.tcp_listen is not None:
                self.tcp_port = self._add_tls_port(server, self.config.tcp_listen)
            await server.start()
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        self._socket_ino = os.lstat(self.socket_path).st_ino
        log.info(
            "serving",
            socket=str(self.socket_path),
            tcp=self.config.tcp_listen,
            tcp_port=self.tcp_port,
            services=list(self.service_names),
        )

    async def _set_serving(self, serving: bool) -> None:
        """Set every name's health (the server's "" and each service's) to one answer."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    def _add_tls_port(self, server: grpc.aio.Server, address: str) -> int:
        """Add the TLS TCP listener; a client CA makes client certificates mandatory."""
        cert = _read(self.config.tls_cert)
        if self.config.tls_key is not None:
            check_key_file(self.config.tls_key)
        key = _read(self.config.tls_key)
        if cert is None or key is None:
            raise FailedPrecondition("a TCP listener requires --tls-cert and --tls-key")
        client_ca = _read(self.config.tls_client_ca)
        if client_ca is None:
            log.warning(
                "TCP listener accepts any client",
                address=address,
                hint="set --tls-client-ca so clients must present a certificate",
            )
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
        return _bind(lambda: server.add_secure_port(address, credentials), address)

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Report NOT_SERVING, drain calls for ``grace`` seconds, run on_stop, remove the socket.

        Idempotent, so it is safe from both a signal path and a ``finally``.
        """
        if self._stopped:
            return
        self._stopped = True
        try:
            await self.health.enter_graceful_shutdown()
            if self._server is not None:
                await stop_bounded(self._server, grace)
            if self._on_stop is not None:
                result = self._on_stop()
                if inspect.isawaitable(result):
                    await result
        finally:
            self._remove_socket()
            log.info("stopped", socket=str(self.socket_path))

    def _remove_socket(self) -> None:
        """Unlink our socket, but not one a newer instance has bound in its place."""
        try:
            if os.lstat(self.socket_path).st_ino == self._socket_ino:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass


async def serve(
    service: str,
    config: NodeConfig,
    register: Register,
    on_stop: OnStop | None = None,
    readiness: Readiness | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly (see ``ServiceServer.stop``).

    A start that fails (a busy port, a TLS key others can read) logs one error line and
    exits with status 1 after the clean-up.

    ``readiness`` lets background tasks turn the health to NOT_SERVING while they fail.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    server = ServiceServer(service, config, register, on_stop, readiness)
    try:
        try:
            await server.start()
        except WeirError as exc:  # one line that says why, not a traceback
            log.error("cannot serve", error=str(exc))
            raise SystemExit(1) from None
        await stop.wait()
        log.info("stopping", signal=received[0] if received else None)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.stop()


async def stop_bounded(server: grpc.aio.Server, grace: float) -> None:
    """Stop a gRPC server, giving up after grace plus a margin so the rest of a shutdown still runs."""
    try:
        await asyncio.wait_for(server.stop(grace), grace + STOP_MARGIN_SECONDS)
    except TimeoutError:
        log.error("grpc server did not stop in time; going on with the shutdown", grace=grace)


def run(
    service: str,
    config: NodeConfig,
    register: Register,
    on_stop: OnStop | None = None,
) -> None:
    """A service's ``main``: set up logging, serve, exit 1 with a clear line if startup fails."""
    setup_logging(service, config.log_level)
    try:
        asyncio.run(serve(service, config, register, on_stop))
    except WeirError as exc:
        log.error("cannot serve", error=str(exc))
        raise SystemExit(1) from None


def channel(socket_path: Path | str) -> grpc.aio.Channel:
    """A client channel to a service's unix socket, e.g. ``channel(config.socket_path("lb"))``."""
    return grpc.aio.insecure_channel(f"unix:{Path(socket_path).absolute()}")
