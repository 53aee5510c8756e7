"""The life of a datapath service process, the same for every object.

Mount check, one worker thread, the state store, the plain class that owns the
maps (built and started on the worker, since it uses the store), its periodic
tasks (which turn the health to NOT_SERVING while they keep failing), the gRPC
server, and on SIGTERM the reverse order. Each service's `__main__` only says how
to build its class, its servicer and its periodic tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import grpc.aio

from services.common.bpffs import ensure_bpffs
from services.common.cgroup import ensure_cgroup
from services.common.config import NodeConfig
from services.common.health import Readiness
from services.common.instance_lock import acquire_or_exit
from services.common.periodic import Every, Periodic
from services.common.server import check_tls_files, serve
from services.common.store import Store
from services.common.worker import Worker


class Owner(Protocol):
    """What a service's plain class offers its process: start (load, reconcile) and close."""

    def start(self) -> None: ...

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
    store = await worker.call(Store.open, config, service)
    owner = await worker.call(build, store)
    await worker.call(owner.start)
    task = asyncio.create_task(background(worker, owner)) if background else None
    readiness = Readiness()
    loops = [Periodic(every, readiness).start() for every in (tasks(worker, owner) if tasks else ())]

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
