"""The life of a datapath service process, the same for every object.

Mount check, one worker thread, the state store (opened by `services.common.state`,
which holds the service when the store is unusable while its datapath exists), the
plain class that owns the maps (built and started on the worker, since it uses the
store; adopted from the pinned maps when told), a check that puts back a removed pin
of its maps, its periodic tasks (which turn the health to NOT_SERVING while they keep
failing), the gRPC server, and on SIGTERM the reverse order. Each service's
`__main__` only says how to build its class, its servicer and its periodic tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import grpc.aio
import structlog

from services.common.bpffs import ensure_bpffs
from services.common.cgroup import ensure_cgroup
from services.common.config import NodeConfig
from services.common.errors import WeirError
from services.common.health import Readiness
from services.common.instance_lock import acquire_or_exit
from services.common.periodic import Every, Periodic
from services.common.pins import PinGuard
from services.common.server import check_tls_files, serve
from services.common.state import (
    Held,
    Mode,
    Refusing,
    datapath_exists,
    decide,
    discard_fresh,
    open_state,
    refuse_calls,
    remedy,
    settle,
)
from services.common.store import Store, StoreError
from services.common.worker import Worker

log = structlog.get_logger("weir.service")
PIN_CHECK_SECONDS = 2.0  # how soon a pin removed under a running service is put back

# What a stored document that no longer parses raises inside an owner's start.
DOCUMENT_ERRORS = (StoreError, LookupError, TypeError, ValueError)


class CannotAdoptError(Exception):
    """The service cannot rebuild its state from the datapath; the message says why."""


class Owner(Protocol):
    """What a service's plain class offers its process: start (load, reconcile), adopt and close.

    ``adopt`` is `start` for a fresh store: it first fills the store from the pinned maps
    (what it can), so the reconcile keeps the datapath; it raises `CannotAdoptError` if it cannot.
    """

    def start(self) -> None: ...

    def adopt(self) -> None: ...

    def close(self) -> None: ...


T = TypeVar("T", bound=Owner)
Background = Callable[[Worker, T], Coroutine[Any, Any, None]]
Tasks = Callable[[Worker, T], Sequence[Every]]


async def run_datapath_service(
    service: str,
    config: NodeConfig,
    build: Callable[[Store], T],
    add_servicer: Callable[[grpc.aio.Server, Worker, T], str],
    background: Background[T] | None = None,
    tasks: Tasks[T] | None = None,
    can_adopt: bool = True,
    adopt_note: str = "",
) -> None:
    """Start `build(store)` on the worker, serve it until SIGTERM, then stop it cleanly.

    ``tasks`` are run as `Periodic` loops; ``background`` is a bare coroutine that gets
    none of their protection (kept for services not yet moved to ``tasks``).
    """
    acquire_or_exit(config, service)  # before anything: a second copy must touch nothing
    check_tls_files(config)
    ensure_bpffs(config.bpffs_root)
    ensure_cgroup(config)
    worker = Worker(service)
    datapath = datapath_exists([config.service_pin_dir(service)])
    opened = await worker.call(open_state, config, service, datapath, can_adopt, adopt_note)
    if opened.store is None:
        assert opened.held is not None
        await serve_held(service, config, worker, opened.held, add_servicer)
        return
    while True:
        store = opened.store
        owner = await worker.call(build, store)
        try:
            await worker.call(owner.adopt if opened.mode is Mode.ADOPT else owner.start)
            await worker.call(settle, store)
            break
        except CannotAdoptError as exc:
            held = Held(store.path, f"was unusable and {exc}", remedy(service, False))
            log.error(held.message)
            # discard: else the next plain start would take the empty file for the state
            await _hold(service, config, worker, held, add_servicer, store, owner, discard=True)
            return
        except WeirError as exc:  # e.g. a held orchestrator refusing the registration: one line, no traceback
            log.error("cannot start", error=str(exc), state=str(store.path))
            await worker.call(store.close)
            await worker.call(owner.close)
            worker.shutdown()
            raise SystemExit(1) from None
        except DOCUMENT_ERRORS as exc:
            if opened.mode is not Mode.NORMAL:
                raise  # a fresh store that does not read back: a bug, not the operator's file
            problem = exc.problem if isinstance(exc, StoreError) else f"cannot be read back ({exc!r})"
            await worker.call(store.close)
            await worker.call(owner.close)
            opened = await worker.call(decide, config, service, problem, True, can_adopt, adopt_note)
            if opened.store is None:
                assert opened.held is not None
                await serve_held(service, config, worker, opened.held, add_servicer)
                return
    task = asyncio.create_task(background(worker, owner)) if background else None
    readiness = Readiness()
    pin_dir = config.service_pin_dir(service)
    guard = await worker.call(lambda: PinGuard(pin_dir, sorted(p.name for p in pin_dir.iterdir())))

    async def check_pins() -> None:
        await worker.call(guard.check)

    every = [Every("pins", PIN_CHECK_SECONDS, check_pins), *(tasks(worker, owner) if tasks else ())]
    loops = [Periodic(e, readiness).start() for e in every]

    def register(server: grpc.aio.Server) -> Sequence[str]:
        return [add_servicer(server, worker, owner)]

    async def on_stop() -> None:
        for loop in loops:
            await loop.stop()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await worker.call(store.close)
        await worker.call(owner.close)
        worker.shutdown()

    await serve(service, config, register, on_stop, readiness)


async def _hold(
    service: str,
    config: NodeConfig,
    worker: Worker,
    held: Held,
    add_servicer: Callable[[grpc.aio.Server, Worker, T], str],
    store: Store,
    owner: T,
    discard: bool = False,
) -> None:
    await worker.call(store.close)
    await worker.call(owner.close)
    if discard:
        discard_fresh(store.path)
    await serve_held(service, config, worker, held, add_servicer)


async def serve_held(
    service: str,
    config: NodeConfig,
    worker: Worker,
    held: Held,
    add_servicer: Callable[[grpc.aio.Server, Worker, Any], str] | None = None,
    names: Sequence[str] = (),
) -> None:
    """Serve NOT_SERVING and refuse every call, touching nothing, until SIGTERM.

    The service's servicer runs over a `Refusing` owner (``add_servicer``), or, given only
    ``names``, a generic handler answers every call.
    """
    readiness = Readiness()
    await readiness.set("state", False)

    def register(server: grpc.aio.Server) -> Sequence[str]:
        if add_servicer is not None:  # its servicer over an owner that refuses every use
            return [add_servicer(server, worker, Refusing(held))]
        refuse_calls(server, held)
        return list(names)

    async def on_stop() -> None:
        worker.shutdown()

    await serve(service, config, register, on_stop, readiness)
