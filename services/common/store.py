"""The embedded store of a service's desired state: JSON documents in one SQLite file.

A restarted service reads back what it was told and reconciles its pinned maps with it, so
this must be durable (WAL, synchronous=FULL) and private (0700 directory, 0600 file).

The file carries its schema version (SQLite's ``user_version``): a file from another
version, or one SQLite cannot read, raises `StoreError` naming the file, so a service
can refuse to start from it instead of treating it as empty (see `services.common.state`).

Not thread-safe by design: a service calls it from one thread (its worker), and the
sqlite3 connection refuses use from any other thread unless it is opened with
``any_thread`` by a caller that serializes its calls itself. Calls are short local disk writes.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from services.common.config import NodeConfig

SCHEMA_VERSION = 1  # bump when the tables or the meaning of stored documents change
_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    kind TEXT NOT NULL,
    key  TEXT NOT NULL,
    doc  TEXT NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS revisions (
    kind     TEXT PRIMARY KEY,
    revision INTEGER NOT NULL
) WITHOUT ROWID;
"""


def _create_private_dirs(path: Path) -> None:
    """Create missing directories 0700 (existing ones are left as the operator made them)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(directory, 0o700)


class StoreError(Exception):
    """The state database cannot be used as it is; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"state database {path} {problem}")
        self.path = path
        self.problem = problem


class Store:
    """Documents (JSON objects) by (kind, key), plus a revision counter per kind."""

    def __init__(self, path: Path, *, any_thread: bool = False) -> None:
        """Open (creating if needed) the database at ``path``; StoreError if it is unusable.

        ``any_thread``: calls may come from several threads, one at a time (the caller's lock),
        as from an in-process stand-in for another service.
        """
        self.path = path
        _create_private_dirs(path.parent)
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
            # isolation_level=None: no implicit transactions; transaction() issues BEGIN itself.
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=not any_thread)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(path, f"cannot be opened ({exc})") from None
        try:
            self._setup()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(path, f"is not a readable SQLite database ({exc})") from None
        except StoreError:
            self._db.close()
            raise
        self._depth = 0

    def _setup(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version not in (0, SCHEMA_VERSION):
            raise StoreError(self.path, f"has schema version {version}, this build reads version {SCHEMA_VERSION}")
        self._db.executescript(_SCHEMA)
        if version == 0:  # a new file, or one written before the version was recorded (same tables)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @classmethod
    def open(cls, config: NodeConfig, service: str) -> Store:
        """The store of ``service`` on this node."""
        return cls(config.state_db(service))

    def close(self) -> None:
        """Close the database (the WAL is checkpointed by SQLite)."""
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Make the puts/deletes/bumps inside atomic: all of them, or (on exception) none.

        Nested use joins a savepoint, so an inner failure that the caller catches undoes
        only the inner part.
        """
        name = f"sp{self._depth}"
        self._db.execute("BEGIN IMMEDIATE" if self._depth == 0 else f"SAVEPOINT {name}")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("ROLLBACK")
            else:
                self._db.execute(f"ROLLBACK TO {name}")
                self._db.execute(f"RELEASE {name}")
            raise
        self._depth -= 1
        self._db.execute("COMMIT" if self._depth == 0 else f"RELEASE {name}")

    def begin(self) -> None:
        """Open a transaction that `commit` or `rollback` ends (used by `services.common.change`)."""
        if self._depth:
            raise RuntimeError("a store transaction is already open")
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1

    def commit(self) -> None:
        """Commit the transaction `begin` opened."""
        self._db.execute("COMMIT")
        self._depth = 0

    def rollback(self) -> None:
        """Drop everything written since `begin` (SQLite may have rolled back already, e.g. on a full disk)."""
        self._depth = 0
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def put(self, kind: str, key: str, doc: dict[str, Any]) -> None:
        """Insert or replace one document."""
        if not isinstance(doc, dict):
            raise TypeError(f"a stored document must be a dict, got {type(doc).__name__}")
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
        self._db.execute(
            "INSERT INTO docs (kind, key, doc) VALUES (?, ?, ?) "
            "ON CONFLICT (kind, key) DO UPDATE SET doc = excluded.doc",
            (kind, key, text),
        )

    def put_many(self, kind: str, docs: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Insert or replace many documents in one statement (bulk loads of large lists)."""
        rows = (
            (kind, key, json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)) for key, doc in docs
        )
        self._db.executemany(
            "INSERT INTO docs (kind, key, doc) VALUES (?, ?, ?) "
            "ON CONFLICT (kind, key) DO UPDATE SET doc = excluded.doc",
            rows,
        )

    def put_many_text(self, kind: str, docs: Iterable[tuple[str, str]]) -> None:
        """`put_many` of documents the caller already wrote as JSON objects (thousands of one
        shape cost less as f-strings than through `json.dumps`); reading them back checks them."""
        self._db.executemany(
            "INSERT INTO docs (kind, key, doc) VALUES (?, ?, ?) "
            "ON CONFLICT (kind, key) DO UPDATE SET doc = excluded.doc",
            ((kind, key, text) for key, text in docs),
        )

    def delete_many(self, kind: str, keys: Iterable[str]) -> None:
        """Remove many documents of a kind; absent keys are ignored."""
        self._db.executemany("DELETE FROM docs WHERE kind = ? AND key = ?", ((kind, key) for key in keys))

    def clear(self, kind: str) -> int:
        """Remove every document of a kind; returns how many there were."""
        return self._db.execute("DELETE FROM docs WHERE kind = ?", (kind,)).rowcount

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        """The document, or None if absent."""
        row = self._db.execute("SELECT doc FROM docs WHERE kind = ? AND key = ?", (kind, key)).fetchone()
        return None if row is None else self._load(kind, key, row[0])

    def delete(self, kind: str, key: str) -> bool:
        """Remove a document; True if it existed (so callers can stay idempotent)."""
        cur = self._db.execute("DELETE FROM docs WHERE kind = ? AND key = ?", (kind, key))
        return cur.rowcount > 0

    def items(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        """All documents of a kind, ordered by key."""
        rows = self._db.execute("SELECT key, doc FROM docs WHERE kind = ? ORDER BY key", (kind,)).fetchall()
        return [(key, self._load(kind, key, text)) for key, text in rows]

    def keys(self, kind: str) -> list[str]:
        """All keys of a kind, ordered."""
        rows = self._db.execute("SELECT key FROM docs WHERE kind = ? ORDER BY key", (kind,)).fetchall()
        return [key for (key,) in rows]

    def revision(self, kind: str) -> int:
        """The current revision of a kind; 0 before the first bump."""
        row = self._db.execute("SELECT revision FROM revisions WHERE kind = ?", (kind,)).fetchone()
        return 0 if row is None else int(row[0])

    def bump_revision(self, kind: str) -> int:
        """Increment and return the revision of a kind (part of any enclosing transaction)."""
        row = self._db.execute(
            "INSERT INTO revisions (kind, revision) VALUES (?, 1) "
            "ON CONFLICT (kind) DO UPDATE SET revision = revision + 1 RETURNING revision",
            (kind,),
        ).fetchone()
        return int(row[0])

    def _load(self, kind: str, key: str, text: str) -> dict[str, Any]:
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise StoreError(self.path, f"holds a {kind} document {key!r} that is not a JSON object")
        return doc
