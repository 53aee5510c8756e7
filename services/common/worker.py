"""One thread that owns a service's control state (store, netlink, maps).

gRPC handlers run on the asyncio loop; the work they ask for is blocking
(netlink through pyroute2, which runs its own event loop and refuses to nest in
ours; SQLite; bpf syscalls). `Worker.call` runs it on a single dedicated
thread, so changes are applied one at a time in arrival order and the loop
stays free for health checks and streams meanwhile. Objects that are not
thread-safe (the SQLite store) are created on this thread and used only there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class Worker:
    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run fn(*args, **kwargs) on the worker thread and await its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """The same, from synchronous code (start-up, tests)."""
        return self._executor.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
