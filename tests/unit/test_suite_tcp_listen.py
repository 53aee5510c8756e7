"""The suite's --tcp-listen forms: one address per service, or one port range in a documented order."""

from __future__ import annotations

import pytest

from services.orchestrator.suite import SERVICES, plan_tcp


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1:7000", "one address per service"),
        ("127.0.0.1:7000-7002", "has 3 ports"),
        ("dns=127.0.0.1:7000", "does not name a service"),
        ("lb=127.0.0.1:1,lb=127.0.0.1:2", "lb is given twice"),
        ("127.0.0.1:7000-99999", "bad port"),
    ],
)
def test_unusable_tcp_listen_values_are_refused(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_tcp(value)


def test_tcp_listen_plans() -> None:
    assert plan_tcp(None) == {}
    assert plan_tcp("[::1]:7000-7009") == {s: f"[::1]:{7000 + i}" for i, s in enumerate(SERVICES)}
    assert plan_tcp("policy=10.0.0.1:9") == {"policy": "10.0.0.1:9"}
