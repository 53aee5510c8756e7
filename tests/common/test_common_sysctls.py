"""Settings the node changes are recorded once, before the first change, and put back by restore."""

from __future__ import annotations

from pathlib import Path

from services.common import sysctls
from services.common.config import NodeConfig


def test_only_changed_settings_are_recorded_and_the_first_originals_win(tmp_path: Path) -> None:
    config = NodeConfig(instance="t", state_dir=tmp_path / "state")
    off, on = tmp_path / "off", tmp_path / "on"
    off.write_text("0\n")
    on.write_text("1\n")
    settings = {str(off): "1", str(on): "1"}
    sysctls.set_recorded(config, settings)
    assert off.read_text() == "1"
    sysctls.set_recorded(config, settings)  # a restart: already on, nothing new recorded
    assert sysctls.restore(config) == {str(off): "0"}
    assert off.read_text() == "0" and on.read_text() == "1\n"
    assert not sysctls.record_path(config).exists()
    assert sysctls.restore(config) == {}
