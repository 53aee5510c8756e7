"""How a datapath service asks the orchestrator for its place in the chain.

Only the orchestrator writes call maps and attaches entry programs. A service
pins its programs, then registers them (hook, slot, pin path) over the
orchestrator's unix socket; while the orchestrator is not up, it waits and
retries (the service is not serving yet, and the datapath keeps running with
what the orchestrator placed before). A refusal (wrong program type, a slot
held by another service) is raised: retrying would not change the answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from weir.common.v1 import common_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

from pybpf import XdpMode
from services.common.datapath import Hook, Slot
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

log = structlog.get_logger("weir.chain_client")

TIMEOUT = 10.0
RETRY_SECONDS = 0.5
LOG_EVERY_SECONDS = 5.0
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
XDP_MODES = {
    XdpMode.AUTO: pb.XDP_MODE_UNSPECIFIED,
    XdpMode.NATIVE: pb.XDP_MODE_NATIVE,
    XdpMode.GENERIC: pb.XDP_MODE_GENERIC,
}


@dataclass(frozen=True)
class Placement:
    """A pinned program and the slot of the hook it belongs in."""

    hook: Hook
    slot: Slot
    pin_path: Path


Register = Callable[[list[Placement]], None]


@dataclass(frozen=True)
class XdpPlacement:
    interface: str
    ifindex: int
    mode: XdpMode
    program_id: int


def _error(exc: grpc.RpcError, what: str) -> Exception:
    """The orchestrator's answer as the same status in this service."""
    code, details = exc.code(), exc.details() or ""
    message = f"{what}: the orchestrator says {details}"
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(message)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(message)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(message)
    return Unavailable(f"{what}: the orchestrator answers {code.name}: {details}")


class ChainClient:
    """The orchestrator's chain calls, for one service."""

    def __init__(self, socket_path: Path, service: str) -> None:
        self._socket = socket_path
        self._service = service

    def _stub(self, channel: grpc.Channel) -> pb_grpc.OrchestratorStub:
        return pb_grpc.OrchestratorStub(channel)

    def register(self, placements: Iterable[Placement]) -> None:
        """Register the programs, waiting for the orchestrator as long as it takes."""
        request = pb.RegisterProgramsRequest(
            service=self._service,
            programs=[
                pb.ProgramRegistration(
                    hook=common_pb2.Hook.Value(f"HOOK_{p.hook.name}"),
                    slot=common_pb2.Slot.Value(f"SLOT_{p.slot.name}"),
                    pin_path=str(p.pin_path),
                )
                for p in placements
            ],
        )
        last_log = 0.0
        while True:
            try:
                with grpc.insecure_channel(f"unix://{self._socket}") as channel:
                    self._stub(channel).RegisterPrograms(request, timeout=TIMEOUT, wait_for_ready=False)
                log.info("programs registered with the orchestrator", programs=len(request.programs))
                return
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise _error(exc, "registering the programs") from None
            if time.monotonic() - last_log > LOG_EVERY_SECONDS:
                log.info("waiting for the orchestrator to register programs", socket=str(self._socket))
                last_log = time.monotonic()
            time.sleep(RETRY_SECONDS)

    def attach_xdp(self, interface: str, mode: XdpMode) -> XdpPlacement:
        """Ask the orchestrator to run the XDP chain on an interface."""
        try:
            with grpc.insecure_channel(f"unix://{self._socket}") as channel:
                reply = self._stub(channel).AttachXdp(
                    pb.AttachXdpRequest(interface=interface, mode=XDP_MODES[mode]), timeout=TIMEOUT
                )
        except grpc.RpcError as exc:
            raise _error(exc, f"attaching XDP to {interface}") from None
        attached = XdpMode.NATIVE if reply.mode == pb.XDP_MODE_NATIVE else XdpMode.GENERIC
        return XdpPlacement(reply.interface, reply.ifindex, attached, reply.program_id)

    def detach_xdp(self, interface: str) -> None:
        try:
            with grpc.insecure_channel(f"unix://{self._socket}") as channel:
                self._stub(channel).DetachXdp(pb.DetachXdpRequest(interface=interface), timeout=TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return  # already gone: detaching is idempotent
            raise _error(exc, f"detaching XDP from {interface}") from None
