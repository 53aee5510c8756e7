"""Background loops that survive their own failures and say so.

A loop that dies on its first unexpected error leaves a service that answers calls while
its datapath silently goes stale (dead backends stay in rotation, conntrack fills up).
`Periodic` runs one async callable on an interval, on the event loop (the callable sends
blocking work to the worker itself), and on failure: logs it with its traceback, retries
with exponential back-off, and after `unhealthy_after` consecutive failures marks the
service NOT_SERVING through `Readiness` until a run succeeds again. It never stops on an
exception; only cancellation (`stop`) ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from services.common.health import Readiness

log = structlog.get_logger("weir.periodic")


@dataclass(frozen=True)
class Every:
    """What to run and how often: ``fn`` every ``interval`` seconds while it succeeds."""

    name: str
    interval: float
    fn: Callable[[], Awaitable[object]]
    max_backoff: float = 30.0
    unhealthy_after: int = 3

    def delay(self, failures: int) -> float:
        """Seconds to the next run after ``failures`` consecutive failures (0: none)."""
        if failures == 0:
            return self.interval
        backoff: float = self.interval * 2.0**failures
        return min(backoff, max(self.max_backoff, self.interval))


class Periodic:
    """One running `Every`: its task, its failure count, its share of the service's health."""

    def __init__(self, every: Every, readiness: Readiness | None = None) -> None:
        self.every = every
        self.failures = 0
        self.runs = 0
        self._readiness = readiness
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Periodic:
        self._task = asyncio.create_task(self._loop(), name=f"periodic:{self.every.name}")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run_once(self) -> bool:
        """One run with its bookkeeping; True if it succeeded."""
        self.runs += 1
        try:
            await self.every.fn()
        except Exception as exc:
            self.failures += 1
            log.warning("periodic.failed", task=self.every.name, failures=self.failures,
                        retry_in=round(self.every.delay(self.failures), 3), error=str(exc) or type(exc).__name__,
                        exc_info=exc)  # fmt: skip
            if self.failures == self.every.unhealthy_after:
                await self._report(False)
            return False
        if self.failures:
            log.info("periodic.recovered", task=self.every.name, after_failures=self.failures)
            if self.failures >= self.every.unhealthy_after:
                await self._report(True)
            self.failures = 0
        return True

    async def _report(self, ok: bool) -> None:
        if self._readiness is not None:
            await self._readiness.set(self.every.name, ok)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every.delay(self.failures))
            try:
                await self.run_once()
            except Exception as exc:  # a failing health report must not end the loop either
                log.error("periodic.report_failed", task=self.every.name, error=str(exc))
