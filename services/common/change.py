"""The one change protocol every service follows: validate, plan, store, maps, commit.

A refused or failed request must leave the maps and the store exactly as they were. The
caller validates and plans before it opens a `Change`; inside it, store writes join one
SQLite transaction and every map write is recorded with the action that undoes it. If
anything raises (a full map, a failed store write, a failed commit), the map writes are
undone newest first and the transaction rolls back, so the state before the call is the
state after it.

    with Change(store) as change:
        store.put("rules", name, doc)
        change.apply(lambda: policy_map.update(key, new), undo=lambda: policy_map.update(key, old))

A store that fails with "disk full" surfaces as `ResourceExhausted`, any other SQLite
failure as `Unavailable`, both naming the database file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from types import TracebackType
from typing import Protocol, Self, TypeVar

import structlog

from services.common.errors import ResourceExhausted, Unavailable

log = structlog.get_logger(__name__)

T = TypeVar("T")


class _Transactional(Protocol):
    """What a Change needs of a store (`services.common.store.Store` has it)."""

    @property
    def path(self) -> object: ...

    def begin(self) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


class Change:
    """One all-or-nothing change across a store transaction and any number of map writes."""

    def __init__(self, store: _Transactional | None) -> None:
        """``store`` may be None for a change that touches only maps."""
        self._store = store
        self._undo: list[Callable[[], object]] = []
        self._open = False

    def __enter__(self) -> Self:
        if self._store is not None:
            self._call_store(self._store.begin)
            self._open = True
        return self

    def apply(self, do: Callable[[], T], undo: Callable[[], object]) -> T:
        """Run ``do`` now; if the change later fails, run ``undo`` (newest first)."""
        result = do()
        self._undo.append(undo)
        return result

    def attempt(self, do: Callable[[], T], undo: Callable[[], object]) -> T:
        """Like `apply`, for a write that may half-apply (a batch, several maps).

        ``undo`` is registered before ``do`` runs, so it also runs when ``do`` fails
        partway; it must therefore tolerate writes that never happened.
        """
        self._undo.append(undo)
        return do()

    def on_failure(self, undo: Callable[[], object]) -> None:
        """Register an undo for something already done (ids taken from a pool, caches)."""
        self._undo.append(undo)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            try:
                if self._open and self._store is not None:
                    self._call_store(self._store.commit)
                    self._open = False
                return
            except BaseException:
                self._abort()
                raise
        self._abort()
        if isinstance(exc, sqlite3.Error) and self._store is not None:
            # A store write inside the change failed (a full disk shows here when SQLite
            # spills pages before the commit): say so with the file, not as a bug.
            raise store_error(exc, self._store.path) from exc

    def _abort(self) -> None:
        """Undo every recorded write (newest first), then roll the store back."""
        for undo in reversed(self._undo):
            try:  # keep undoing the rest even if one undo fails
                undo()
            except Exception as undo_exc:
                log.error("change.undo_failed", error=str(undo_exc))
        self._undo.clear()
        if self._open and self._store is not None:
            self._open = False
            try:
                self._store.rollback()
            except sqlite3.Error as rb_exc:
                log.error("change.rollback_failed", error=str(rb_exc))

    def _call_store(self, fn: Callable[[], None]) -> None:
        assert self._store is not None
        try:
            fn()
        except sqlite3.Error as exc:
            raise store_error(exc, self._store.path) from exc


def store_error(exc: sqlite3.Error, path: object) -> Exception:
    """The status-mapped error for a failed store write (disk full is RESOURCE_EXHAUSTED)."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and ("full" in text or "disk I/O" in text):
        return ResourceExhausted(f"the state store {path} could not be written ({text}); free disk space and retry")
    return Unavailable(f"the state store {path} failed ({text})")
