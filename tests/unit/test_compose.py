"""compose.yaml runs the same services as `./weir up`, and docker-compose accepts it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.orchestrator.suite import SERVICES

COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"
L7 = {"l7"}  # run by compose, not yet by the suite
SIDECARS = {"envoy"}  # not Weir services: programs a service configures


def test_compose_lists_the_suite() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert set(doc["services"]) - SIDECARS == set(SERVICES) | L7
    for name, spec in doc["services"].items():
        if name not in SIDECARS:
            assert spec["command"][-1] == f"services.{name}"
        assert spec["network_mode"] == "host" and spec["privileged"] is True


def test_compose_runs_envoy_beside_the_l7_service() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    l7, envoy = doc["services"]["l7"], doc["services"]["envoy"]
    assert l7["environment"]["WEIR_L7_ENVOY"] == "external"
    run_dir = l7["environment"]["WEIR_RUN_DIR"]
    assert f"-c {run_dir}/l7/envoy.json" in envoy["command"][-1]
    assert envoy["depends_on"] == ["l7"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is installed by ./weir setup")
def test_docker_compose_validates_the_file() -> None:
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
