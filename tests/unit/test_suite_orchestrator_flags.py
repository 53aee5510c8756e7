"""`./weir up` hands the orchestrator's own flags (metrics, flow event limits) to it alone."""

from __future__ import annotations

import pytest

from services.orchestrator.suite import _split_orchestrator


def test_the_orchestrators_flags_go_to_it_alone() -> None:
    own, rest = _split_orchestrator(
        [
            "--instance",
            "n1",
            "--metrics-listen",
            "127.0.0.1:9464",
            "--flow-event-limit",
            "drop=5/2",
            "--log-level",
            "info",
        ]
    )
    assert own == ["--metrics-listen", "127.0.0.1:9464", "--flow-event-limit", "drop=5/2"]
    assert rest == ["--instance", "n1", "--log-level", "info"]


@pytest.mark.parametrize("bad", [["--metrics-listen", "localhost"], ["--flow-event-limit", "drop=fast"]])
def test_a_bad_value_stops_the_suite_before_it_starts(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _split_orchestrator(bad)
    assert exit_.value.code == 2
    assert bad[1] in capsys.readouterr().err
