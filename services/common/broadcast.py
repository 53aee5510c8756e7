"""Watch streams: one publisher (any thread), many async subscribers, each with a bounded queue.

The worker thread publishes changes as it commits them; each gRPC watch call reads its
own `Subscription`. A subscriber that cannot keep up must not grow memory without bound
nor slow the others: its queue is bounded. What happens when it is full depends on what
is watched. For flows (samples anyway) the oldest item is dropped and counted; for state
changes a gap would leave the watcher wrong, so its stream ends with ABORTED and it
re-lists and watches again.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Generic, Self, TypeVar

from services.common.errors import Aborted

T = TypeVar("T")

DEFAULT_DEPTH = 1024


class _Overflow:
    """Marks, in a queue, the point where a state watch lost changes."""


_OVERFLOW = _Overflow()


class Subscription(Generic[T]):
    """One subscriber's queue; iterate it with ``async for``, leave it with ``with`` (or close)."""

    def __init__(self, hub: Broadcast[T], depth: int, drop_oldest: bool) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[T | _Overflow] = asyncio.Queue(depth)
        self._drop_oldest = drop_oldest
        self.dropped = 0
        self.overflowed = False

    def offer(self, item: T) -> None:
        """Queue an item (on the loop thread); a full queue drops the oldest or overflows."""
        if self.overflowed:
            return
        if self._queue.full():
            if not self._drop_oldest:
                self.overflowed = True  # what is queued is useless now: the reader must re-list
                while not self._queue.empty():
                    self._queue.get_nowait()
                self._queue.put_nowait(_OVERFLOW)
                return
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(item)

    async def get(self) -> T:
        """The next item; raises Aborted once this subscriber has overflowed (state watches)."""
        item = _OVERFLOW if self.overflowed else await self._queue.get()
        if isinstance(item, _Overflow):
            raise Aborted(
                f"this watch fell more than {self._queue.maxsize} changes behind and missed some; "
                "list again and start a new watch"
            )
        return item

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        return await self.get()

    def close(self) -> None:
        self._hub.unsubscribe(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Broadcast(Generic[T]):
    """Fan-out of published items to every current subscriber."""

    def __init__(self, depth: int = DEFAULT_DEPTH, drop_oldest: bool = False) -> None:
        self._depth = depth
        self._drop_oldest = drop_oldest
        self._subscribers: set[Subscription[T]] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def subscribe(self) -> Subscription[T]:
        """A new subscription (call on the event loop); it sees items published from now on."""
        self._loop = asyncio.get_running_loop()
        subscription = Subscription(self, self._depth, self._drop_oldest)
        with self._lock:
            self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription[T]) -> None:
        with self._lock:
            self._subscribers.discard(subscription)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def publish(self, item: T) -> None:
        """Hand ``item`` to every subscriber; safe from any thread, never blocks."""
        with self._lock:
            targets = list(self._subscribers)
            loop = self._loop
        if not targets or loop is None or loop.is_closed():
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        for subscription in targets:
            if on_loop:
                subscription.offer(item)
            else:
                loop.call_soon_threadsafe(subscription.offer, item)
