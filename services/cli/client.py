"""How the CLI reaches a node's services, and how their failures become exit codes.

Each service listens on ``<run-dir>/<service>.sock``; the run directory comes from the
same flags and WEIR_* variables the services take (``--instance``, ``--run-dir``), so a
command finds the node the suite was started as. A missing socket or one nobody answers
is "unreachable" (exit 3); a status the service answered is exit 1 with its code name and
message on stderr; usage errors are click's exit 2.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from weir.common.v1 import common_pb2
from weir.lb.v1 import lb_pb2_grpc
from weir.orchestrator.v1 import orchestrator_pb2_grpc
from weir.policy.v1 import policy_pb2_grpc
from weir.prefilter.v1 import prefilter_pb2_grpc

from services.common.config import ENV

EXIT_OK, EXIT_RPC, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
CONNECT_TIMEOUT = 3.0
CALL_TIMEOUT = 60.0

R = TypeVar("R")

STUBS: dict[str, Callable[[grpc.Channel], Any]] = {
    "orchestrator": orchestrator_pb2_grpc.OrchestratorStub,
    "prefilter": prefilter_pb2_grpc.PrefilterStub,
    "policy": policy_pb2_grpc.PolicyStub,
    "lb": lb_pb2_grpc.LoadBalancerStub,
}


class CliFailure(click.ClickException):
    """A status a service answered (or a command's own refusal): one line on stderr, exit 1."""

    exit_code = EXIT_RPC

    def show(self, file: Any = None) -> None:
        click.echo(f"weir: {self.message}", err=True)


class Unreachable(CliFailure):
    """No socket, or nobody answering on it: exit 3, so a script can wait and retry."""

    exit_code = EXIT_UNREACHABLE


def rpc_failure(service: str, exc: grpc.RpcError) -> CliFailure:
    """A status a service answered: exit 1 with ``CODE: message``."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return CliFailure(f"{service}: {code.name}: {details}")


def page(token: str) -> common_pb2.PageRequest:
    """The request side of one page of a list call (the service's default size)."""
    return common_pb2.PageRequest(page_token=token)


def default_run_dir(instance: str) -> Path:
    """The run directory the services use by default (NodeConfig's rule, without its other checks)."""
    return Path("/run") / instance


class Node:
    """The sockets of one node and channels to them, opened on first use."""

    def __init__(self, instance: str, run_dir: Path | None, timeout: float = CALL_TIMEOUT) -> None:
        self.instance = instance
        self.run_dir = run_dir or default_run_dir(instance)
        self.timeout = timeout
        self._channels: dict[str, grpc.Channel] = {}

    @classmethod
    def from_env(cls) -> Node:
        run_dir = os.environ.get(ENV["run_dir"])
        return cls(os.environ.get(ENV["instance"], "weir"), Path(run_dir) if run_dir else None)

    def socket(self, service: str) -> Path:
        return self.run_dir / f"{service}.sock"

    def services_found(self) -> list[str]:
        """Every service with a socket in the run directory (the suite's and any other)."""
        if not self.run_dir.is_dir():
            return []
        return sorted(p.stem for p in self.run_dir.glob("*.sock"))

    def channel(self, service: str) -> grpc.Channel:
        """A ready channel to a service; exit 3 when it is not there or does not answer."""
        if service in self._channels:
            return self._channels[service]
        path = self.socket(service)
        if not path.exists():
            raise Unreachable(
                f"{service} is not running on node {self.instance!r}: {path} does not exist "
                "(start the node with ./weir up, or give --instance/--run-dir)"
            )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:  # refused at once, not after a timeout
            probe.settimeout(CONNECT_TIMEOUT)
            try:
                probe.connect(str(path))
            except OSError as exc:
                raise Unreachable(f"{service} does not answer on {path}: {exc.strerror or exc}") from None
        channel = grpc.insecure_channel(f"unix://{path}")
        try:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT)
        except grpc.FutureTimeoutError:
            channel.close()
            raise Unreachable(f"{service} does not answer on {path} within {CONNECT_TIMEOUT:g}s") from None
        self._channels[service] = channel
        return channel

    def stub(self, service: str) -> Any:
        return STUBS[service](self.channel(service))

    def call(self, service: str, method: str, request: Any) -> Any:
        """One unary call; a status other than OK becomes exit 1 naming the service and code."""
        try:
            return getattr(self.stub(service), method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise rpc_failure(service, exc) from None

    @contextmanager
    def streaming(self, service: str) -> Iterator[None]:
        """Map a stream's failure like a call's; its deadline or a cancel is a normal end."""
        try:
            yield
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() in (
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                return
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unreachable(f"{service}: stream ended: {exc.details()}") from None
            raise rpc_failure(service, exc) from None

    def health(self, service: str) -> str:
        """The service's overall health status name, or why it has none."""
        path = self.socket(service)
        if not path.exists():
            return "NO_SOCKET"
        with grpc.insecure_channel(f"unix://{path}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                    health_pb2.HealthCheckRequest(), timeout=CONNECT_TIMEOUT
                )
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                return (
                    "UNREACHABLE"
                    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                    else code.name
                )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def pid(self, service: str) -> int | None:
        """The pid recorded in the service's instance lock, if it is a number."""
        try:
            text = (self.run_dir / f"{service}.lock").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


def paged(fetch: Callable[[str], Any], field: str) -> list[Any]:
    """Every item of a paged list call (``fetch(token)`` returns one page)."""
    items: list[Any] = []
    token = ""
    while True:
        page = fetch(token)
        items.extend(getattr(page, field))
        token = page.next_page_token
        if not token:
            return items


def current() -> Node:
    """The node the running command talks to (set up by the `weir` group)."""
    node: Node = click.get_current_context().find_root().ensure_object(dict)["node"]
    return node
