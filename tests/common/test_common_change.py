"""The change protocol: a failure anywhere leaves maps and store as they were."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.change import Change
from services.common.errors import ResourceExhausted
from services.common.store import Store


class FullMapError(Exception):
    pass


def test_map_failure_undoes_earlier_writes_and_rolls_back_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    fake_map: dict[int, int] = {1: 10}
    with pytest.raises(FullMapError), Change(store) as change:
        store.put("k", "a", {"v": 1})
        change.apply(lambda: fake_map.__setitem__(1, 11), undo=lambda: fake_map.__setitem__(1, 10))
        change.apply(lambda: fake_map.__setitem__(2, 20), undo=lambda: fake_map.pop(2))
        raise FullMapError("map is full")
    assert fake_map == {1: 10}
    assert store.get("k", "a") is None


def test_commit_failure_undoes_map_writes(tmp_path: Path) -> None:
    class FailingCommit(Store):
        def commit(self) -> None:
            import sqlite3

            raise sqlite3.OperationalError("database or disk is full")

    store = FailingCommit(tmp_path / "s.db")
    fake_map: dict[int, int] = {}
    with pytest.raises(ResourceExhausted, match=r"s\.db"), Change(store) as change:
        store.put("k", "a", {"v": 1})
        change.apply(lambda: fake_map.__setitem__(1, 1), undo=lambda: fake_map.pop(1))
    assert fake_map == {}
    assert store.get("k", "a") is None


def test_success_commits_both(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    fake_map: dict[int, int] = {}
    with Change(store) as change:
        store.put("k", "a", {"v": 1})
        change.apply(lambda: fake_map.__setitem__(1, 1), undo=lambda: fake_map.pop(1))
    assert fake_map == {1: 1}
    assert store.get("k", "a") == {"v": 1}


def test_attempt_undoes_a_half_applied_batch(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    fake_map: dict[int, int] = {}

    def half_batch() -> None:
        fake_map[1] = 1
        raise FullMapError("map is full after one of two")

    with pytest.raises(FullMapError), Change(store) as change:
        store.put("k", "a", {"v": 1})
        change.attempt(half_batch, undo=lambda: fake_map.pop(1, None))
    assert fake_map == {}
    assert store.get("k", "a") is None


def test_a_failed_store_write_inside_the_change_is_resource_exhausted_naming_the_file(tmp_path: Path) -> None:
    class FullDisk(Store):
        def put(self, kind: str, key: str, doc: dict[str, object]) -> None:
            import sqlite3

            raise sqlite3.OperationalError("database or disk is full")

    store = FullDisk(tmp_path / "state.db")
    fake_map: dict[int, int] = {}
    with pytest.raises(ResourceExhausted, match=r"state\.db.*free disk space"), Change(store) as change:
        change.apply(lambda: fake_map.__setitem__(1, 1), undo=lambda: fake_map.pop(1))
        store.put("k", "a", {"v": 1})
    assert fake_map == {}
