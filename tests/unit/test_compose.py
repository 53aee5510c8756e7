"""compose.yaml runs the same services as `./weir up`, and docker-compose accepts it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.orchestrator.suite import SERVICES

COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"


def test_compose_lists_the_suite() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert sorted(doc["services"]) == sorted(SERVICES)
    for name, spec in doc["services"].items():
        assert spec["command"][-1] == f"services.{name}"
        assert spec["network_mode"] == "host" and spec["privileged"] is True


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is installed by ./weir setup")
def test_docker_compose_validates_the_file() -> None:
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
