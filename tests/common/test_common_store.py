"""Store: JSON documents round trip, atomic transactions, revisions, private files."""

from __future__ import annotations

import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.config import NodeConfig
from services.common.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state" / "svc.db") as s:
        yield s


def test_round_trip(store: Store) -> None:
    store.put("endpoint", "b", {"ip": "10.0.0.2", "labels": {"app": "web"}, "ports": [80]})
    store.put("endpoint", "a", {"ip": "10.0.0.1"})
    store.put("service", "a", {"vip": "10.96.0.1"})
    assert store.get("endpoint", "b") == {"ip": "10.0.0.2", "labels": {"app": "web"}, "ports": [80]}
    assert store.get("endpoint", "zz") is None
    assert store.items("endpoint") == [("a", {"ip": "10.0.0.1"}), ("b", store.get("endpoint", "b"))]
    assert store.keys("endpoint") == ["a", "b"]
    assert store.keys("service") == ["a"]
    store.put("endpoint", "a", {"ip": "10.0.0.9"})
    assert store.get("endpoint", "a") == {"ip": "10.0.0.9"}
    assert store.delete("endpoint", "a") is True
    assert store.delete("endpoint", "a") is False
    assert store.keys("endpoint") == ["b"]


def test_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "svc.db"
    with Store(path) as first:
        first.put("k", "x", {"n": 1})
        first.bump_revision("k")
    with Store(path) as second:
        assert second.get("k", "x") == {"n": 1}
        assert second.revision("k") == 1


def test_transaction_commits_everything(store: Store) -> None:
    with store.transaction():
        store.put("k", "1", {"v": 1})
        store.put("k", "2", {"v": 2})
        assert store.bump_revision("k") == 1
    assert store.keys("k") == ["1", "2"]
    assert store.revision("k") == 1


def test_transaction_rollback_leaves_nothing(store: Store) -> None:
    store.put("k", "old", {"v": 0})
    with pytest.raises(RuntimeError, match="boom"), store.transaction():
        store.put("k", "1", {"v": 1})
        store.delete("k", "old")
        store.bump_revision("k")
        raise RuntimeError("boom")
    assert store.items("k") == [("old", {"v": 0})]
    assert store.revision("k") == 0
    store.put("k", "after", {"v": 2})  # the connection is usable again, outside a transaction
    assert store.keys("k") == ["after", "old"]


def test_nested_transaction_failure_undoes_only_the_inner_part(store: Store) -> None:
    with store.transaction():
        store.put("k", "outer", {})
        with pytest.raises(KeyError), store.transaction():
            store.put("k", "inner", {})
            raise KeyError("inner")
    assert store.keys("k") == ["outer"]


def test_revisions_count_per_kind(store: Store) -> None:
    assert store.revision("a") == 0
    assert store.bump_revision("a") == 1
    assert store.bump_revision("a") == 2
    assert store.bump_revision("b") == 1
    assert store.revision("a") == 2


def test_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "svc.db"
    with Store(path) as s:
        s.put("k", "x", {"psk": "secret"})
        for file in path.parent.iterdir():  # the db and its -wal/-shm
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


def test_open_uses_the_node_state_dir(tmp_path: Path) -> None:
    config = NodeConfig(state_dir=tmp_path)
    with Store.open(config, "lb") as s:
        assert s.path == tmp_path / "lb.db"
    assert (tmp_path / "lb.db").exists()


def test_uses_wal(store: Store) -> None:
    db = sqlite3.connect(store.path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


@pytest.mark.parametrize("bad", [["not", "a", "dict"], {"x": float("nan")}, {"x": object()}])
def test_rejects_what_json_cannot_hold(store: Store, bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        store.put("k", "x", bad)  # type: ignore[arg-type]
    assert store.get("k", "x") is None


def test_refuses_other_threads(store: Store) -> None:
    errors: list[BaseException] = []

    def use() -> None:
        try:
            store.get("k", "x")
        except sqlite3.ProgrammingError as exc:
            errors.append(exc)

    worker = threading.Thread(target=use)
    worker.start()
    worker.join()
    assert len(errors) == 1
