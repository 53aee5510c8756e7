"""Opening a service's state database without ever wiping a live datapath by accident.

A service reconciles its maps with its store on start: what the store does not name is
removed. So a store that is missing, unreadable or from another schema version must not
be taken for an empty one while the service's datapath still exists (its pins, or for the
orchestrator its tagged links): the service then keeps the datapath as it is, reports
NOT_SERVING, refuses every call with FAILED_PRECONDITION naming the file, and waits to be
restarted with one of

- ``--adopt-datapath``: move the bad file aside and rebuild the state from the pinned maps
  (what each service can rebuild is in its ``adopt``; a service that cannot stays held);
- ``--reset``: move the bad file aside and start empty (the datapath is made to match).

The flags act only when the store is unusable: with a readable store they change nothing,
so a flag left in a unit file never wipes a later restart. With no datapath there is
nothing to lose: a missing file is a first start, an unusable one is moved aside.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import structlog

from services.common.config import NodeConfig
from services.common.errors import FailedPrecondition
from services.common.store import Store, StoreError

log = structlog.get_logger("weir.state")

META, PENDING = "_meta", "pending"
_SIDE_FILES = ("", "-wal", "-shm", "-journal")
_OPEN_CALLS = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/weir.common.v1.Telemetry/")


class Mode(enum.Enum):
    """How the owner of the store starts."""

    NORMAL = "normal"  # the store is good (or there is no datapath to lose)
    ADOPT = "adopt"  # a fresh store, to be filled from the pinned maps before the reconcile
    RESET = "reset"  # a fresh store on purpose: the reconcile empties the datapath


@dataclass(frozen=True)
class Held:
    """Why a service keeps its datapath untouched and serves nothing."""

    path: Path
    problem: str
    remedy: str

    @property
    def message(self) -> str:
        return f"state database {self.path} {self.problem}; the datapath is kept as it is. {self.remedy}"


@dataclass(frozen=True)
class Opened:
    store: Store | None
    mode: Mode
    held: Held | None = None


def datapath_exists(pin_dirs: Iterable[Path], extra: bool = False) -> bool:
    """Whether a previous run left a datapath: any pin in these directories (or ``extra``)."""
    for directory in pin_dirs:
        try:
            if any(directory.iterdir()):
                return True
        except (FileNotFoundError, NotADirectoryError):
            continue
    return extra


def remedy(service: str, can_adopt: bool, adopt_note: str = "") -> str:
    """What the operator can do, in one sentence."""
    reset = f"--reset (start {service} empty: what its maps hold is removed)"
    if not can_adopt:
        why = f" ({adopt_note})" if adopt_note else ""
        return f"Restore the file, or restart {service} with {reset}; it cannot adopt the datapath{why}."
    adopt = "--adopt-datapath (rebuild its state from the pinned maps)"
    return f"Restore the file, or restart {service} with {adopt} or {reset}."


def _move_aside(path: Path) -> Path | None:
    """Rename the database and its side files to ``<name>.bad-<time>``; returns the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    moved = None
    for suffix in _SIDE_FILES:
        old = path.with_name(path.name + suffix)
        if old.exists():
            new = path.with_name(f"{path.name}.bad-{stamp}{suffix}")
            old.rename(new)
            moved = moved or new
    return moved


def discard_fresh(path: Path) -> None:
    """Remove a store `open_state` made fresh for an adopt that did not happen."""
    for suffix in _SIDE_FILES:
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def open_state(
    config: NodeConfig, service: str, datapath: bool, can_adopt: bool = True, adopt_note: str = ""
) -> Opened:
    """Open the store of ``service`` or decide to hold; see the module docstring for the rules."""
    path = config.state_db(service)
    existed = path.exists()
    problem = ""
    if existed:
        try:
            store = Store(path)
        except StoreError as exc:
            problem = exc.problem
        else:
            if store.get(META, PENDING) is None:
                return Opened(store, Mode.NORMAL)
            store.close()
            problem = "was left half-built by an --adopt-datapath or --reset that did not finish"
    elif not datapath:
        return Opened(Store(path), Mode.NORMAL)  # a first start
    else:
        problem = "is missing"
    return decide(config, service, problem, datapath, can_adopt, adopt_note)


def decide(
    config: NodeConfig,
    service: str,
    problem: str,
    datapath: bool = True,
    can_adopt: bool = True,
    adopt_note: str = "",
) -> Opened:
    """The store of ``service`` has ``problem``: start fresh (as told, or with nothing to lose) or hold."""
    path = config.state_db(service)
    if not datapath:
        moved = _move_aside(path)
        log.warning("unusable state database moved aside; nothing to lose, starting empty",
                    path=str(path), problem=problem, moved_to=str(moved))  # fmt: skip
        return Opened(Store(path), Mode.NORMAL)
    if config.reset_state or (config.adopt_datapath and can_adopt):
        mode = Mode.RESET if config.reset_state else Mode.ADOPT
        moved = _move_aside(path)
        log.warning("state database unusable; starting from a fresh one as told", path=str(path),
                    problem=problem, mode=mode.value, moved_to=str(moved) if moved else None)  # fmt: skip
        store = Store(path)
        store.put(META, PENDING, {"mode": mode.value})  # until `settle`: a crash meanwhile is not a state
        return Opened(store, mode)
    held = Held(path, problem, remedy(service, can_adopt, adopt_note))
    log.error(held.message)
    return Opened(None, Mode.NORMAL, held)


def settle(store: Store) -> None:
    """The owner started from a fresh store: from now on it is the state."""
    store.delete(META, PENDING)


class _Refuse(grpc.GenericRpcHandler):
    """Answers every call but health, reflection and telemetry with FAILED_PRECONDITION."""

    def __init__(self, message: str) -> None:
        self._message = message

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method = handler_call_details.method
        if method.startswith(_OPEN_CALLS):
            return None
        message = self._message

        async def refuse(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
            raise AssertionError("unreachable")  # abort raises

        return grpc.unary_unary_rpc_method_handler(refuse)


class Refusing:
    """Stands in for a held service's plain class: any use raises FAILED_PRECONDITION."""

    def __init__(self, held: Held) -> None:
        self._held = held

    def __getattr__(self, name: str) -> Any:
        raise FailedPrecondition(self._held.message)


def refuse_calls(server: grpc.aio.Server, held: Held) -> None:
    """Make ``server`` refuse its API while held (registered before the service's own handlers)."""
    server.add_generic_rpc_handlers((_Refuse(held.message),))
