"""collector_paused: no cyclic collection inside a bulk change, and the collector comes back after."""

from __future__ import annotations

import gc
import threading

import pytest

from services.common.collector import collector_paused


def test_paused_inside_nested_and_restored_after_even_on_error() -> None:
    assert gc.isenabled()

    @collector_paused()
    def bulk() -> bool:
        with collector_paused():
            inner = gc.isenabled()
        return inner or gc.isenabled()

    assert bulk() is False
    assert gc.isenabled()
    with pytest.raises(ValueError), collector_paused():
        raise ValueError("a refused change")
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled() -> None:
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_threads_resume_only_when_the_last_leaves() -> None:
    inside, leave = threading.Event(), threading.Event()

    @collector_paused()
    def slow() -> None:
        inside.set()
        leave.wait(5)

    thread = threading.Thread(target=slow)
    thread.start()
    inside.wait(5)
    with collector_paused():
        pass
    assert not gc.isenabled(), "the other thread is still inside"
    leave.set()
    thread.join(5)
    assert gc.isenabled()
