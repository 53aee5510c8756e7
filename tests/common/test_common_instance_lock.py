"""The instance lock: one holder per role, a refusal that names it, released when the holder dies."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services.common.config import NodeConfig
from services.common.errors import FailedPrecondition
from services.common.instance_lock import acquire, lock_path, release

REPO = Path(__file__).resolve().parents[2]
_HOLDER = textwrap.dedent(
    """
    import sys
    from services.common.config import NodeConfig
    from services.common.instance_lock import acquire
    acquire(NodeConfig(instance="t", run_dir=sys.argv[1]), "probe")
    print("held", flush=True)
    sys.stdin.read()
    """
)


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_command(tmp_path: Path) -> None:
    config = NodeConfig(instance="t", run_dir=tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(config.run_dir), "marker-zq"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(FailedPrecondition) as refused:
            acquire(config, "probe")
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and "marker-zq" in message and "\n" not in message
        acquire(config, "other")  # another role of the same instance is free
        release(config, "other")
    finally:
        holder.communicate("")
    acquire(config, "probe")  # the holder's death released the lock
    assert lock_path(config, "probe").read_text().strip() == str(os.getpid())
    release(config, "probe")
