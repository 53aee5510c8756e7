"""Which of a service's background tasks are failing, reported through gRPC health.

A service can answer calls while a loop it depends on (health checks, garbage
collection, a refresh) keeps failing; its maps then drift from what it says. Callers and
supervisors see that through the standard health service: NOT_SERVING while any task is
failing, SERVING again once every one has recovered. `ServiceServer` binds one of these
to its health servicer when it starts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("weir.health")

Sink = Callable[[bool], Awaitable[None]]


class Readiness:
    """The set of failing tasks; the bound sink hears every change of the overall answer."""

    def __init__(self) -> None:
        self._failing: set[str] = set()
        self._sink: Sink | None = None

    @property
    def serving(self) -> bool:
        return not self._failing

    @property
    def failing(self) -> frozenset[str]:
        return frozenset(self._failing)

    async def bind(self, sink: Sink) -> None:
        """Report to ``sink`` from now on (it hears the current answer at once)."""
        self._sink = sink
        await sink(self.serving)

    async def set(self, task: str, ok: bool) -> None:
        """Record whether ``task`` is healthy; tell the sink if the overall answer changed."""
        before = self.serving
        if ok:
            self._failing.discard(task)
        else:
            self._failing.add(task)
        if self.serving != before:
            log.warning("health.changed", serving=self.serving, failing=sorted(self._failing))
            if self._sink is not None:
                await self._sink(self.serving)
