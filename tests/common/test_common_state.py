"""Opening a state database: when a service starts, starts fresh, or holds its datapath."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from services.common.config import NodeConfig
from services.common.state import Mode, open_state, settle
from services.common.store import SCHEMA_VERSION, Store, StoreError


def config(tmp_path: Path, **kw: bool) -> NodeConfig:
    return NodeConfig(instance="t", state_dir=tmp_path / "state", **kw)  # type: ignore[arg-type]


def test_a_first_start_creates_the_store_with_its_version(tmp_path: Path) -> None:
    opened = open_state(config(tmp_path), "svc", datapath=False)
    assert opened.store is not None and opened.mode is Mode.NORMAL
    opened.store.close()
    db = sqlite3.connect(tmp_path / "state" / "svc.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


@pytest.mark.parametrize("damage", ["missing", "garbage", "version"])
def test_an_unusable_store_with_a_datapath_holds_until_told(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "state" / "svc.db"
    Store(path).close()
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"nope" * 1000)
    else:
        db = sqlite3.connect(path)
        db.execute("PRAGMA user_version=7")
        db.close()
    held = open_state(config(tmp_path), "svc", datapath=True)
    assert held.store is None and held.held is not None and str(path) in held.held.message
    assert path.exists() == (damage != "missing")  # nothing moved, nothing created

    adopted = open_state(config(tmp_path, adopt_datapath=True), "svc", datapath=True)
    assert adopted.store is not None and adopted.mode is Mode.ADOPT
    adopted.store.close()
    # The adopt did not finish (no settle): a plain start must not take the fresh file as the state.
    again = open_state(config(tmp_path), "svc", datapath=True)
    assert again.store is None and again.held is not None and "did not finish" in again.held.problem

    reset = open_state(config(tmp_path, reset_state=True), "svc", datapath=True)
    assert reset.store is not None and reset.mode is Mode.RESET
    settle(reset.store)
    reset.store.close()
    plain = open_state(config(tmp_path), "svc", datapath=True)
    assert plain.store is not None and plain.mode is Mode.NORMAL
    plain.store.close()


def test_a_policy_like_service_cannot_adopt_and_stays_held(tmp_path: Path) -> None:
    opened = open_state(config(tmp_path, adopt_datapath=True), "svc", datapath=True, can_adopt=False)
    assert opened.held is not None and "--reset" in opened.held.remedy and "--adopt" not in opened.held.remedy
    assert not (tmp_path / "state" / "svc.db").exists()


def test_flags_change_nothing_for_a_good_store(tmp_path: Path) -> None:
    with Store(tmp_path / "state" / "svc.db") as store:
        store.put("k", "a", {"x": 1})
    opened = open_state(config(tmp_path, reset_state=True), "svc", datapath=True)
    assert opened.store is not None and opened.mode is Mode.NORMAL
    assert opened.store.get("k", "a") == {"x": 1}
    opened.store.close()


def test_a_document_that_does_not_parse_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "svc.db"
    with Store(path) as store:
        store.put("k", "a", {"x": 1})
    db = sqlite3.connect(path)
    db.execute("UPDATE docs SET doc = '{broken'")
    db.commit()
    db.close()
    with Store(path) as store, pytest.raises(StoreError, match=str(path)):
        store.items("k")
