"""gc_paused holds the cyclic collector off for one call and puts it back as it was."""

from __future__ import annotations

import gc

import pytest

from services.common.gcpause import gc_paused


@gc_paused
def _state(fail: bool = False) -> bool:
    if fail:
        raise ValueError("refused")
    return gc.isenabled()


def test_the_collector_is_off_inside_and_on_again_after_a_return_or_a_raise() -> None:
    assert gc.isenabled()
    assert _state() is False and gc.isenabled()
    with pytest.raises(ValueError):
        _state(fail=True)
    assert gc.isenabled()


def test_a_collector_turned_off_elsewhere_stays_off() -> None:
    gc.disable()
    try:
        assert _state() is False and not gc.isenabled()
    finally:
        gc.enable()
