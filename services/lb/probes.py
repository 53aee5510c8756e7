"""Health probes of backends, run on the event loop, never on the worker.

A probe to a dead backend waits for its whole timeout; done one after another on the
worker, twenty dead backends kept every LB call waiting for seconds. Here each probe is
an asyncio connect with its own timeout, all in flight at once, and a round only
collects those that finished: the worker sees their results in one batched change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from services.lb.lb import Probe

Connect = Callable[[str, int, float], Coroutine[Any, Any, bool]]


async def tcp_connects(address: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to address:port is accepted within ``timeout`` seconds."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class Prober:
    """Probes in flight, by (service, backend); at most one per backend at a time."""

    def __init__(self, connect: Connect = tcp_connects) -> None:
        self._connect = connect
        self._inflight: dict[tuple[str, str], tuple[Probe, asyncio.Task[bool]]] = {}

    @property
    def busy(self) -> frozenset[tuple[str, str]]:
        return frozenset(self._inflight)

    def launch(self, probes: Iterable[Probe]) -> None:
        for probe in probes:
            if probe.key not in self._inflight:
                task = asyncio.create_task(self._connect(probe.address, probe.port, probe.timeout))
                self._inflight[probe.key] = (probe, task)

    def finished(self) -> list[tuple[Probe, bool]]:
        """Results of the probes that are done, taken out of the in-flight set."""
        done = [(key, probe, task) for key, (probe, task) in self._inflight.items() if task.done()]
        out = []
        for key, probe, task in done:
            del self._inflight[key]
            out.append((probe, not task.cancelled() and task.exception() is None and task.result()))
        return out

    async def close(self) -> None:
        for _, task in self._inflight.values():
            task.cancel()
        for _, task in self._inflight.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._inflight.clear()
