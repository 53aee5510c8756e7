"""`weir down`: stop the node's suite, then remove what the node made (`./weir teardown`).

The suite's pid is in its instance lock (``<run-dir>/suite.lock``); it gets SIGTERM and is
waited for, so its services stop cleanly before the teardown runs. A service started on
its own (not by the suite) still holds its lock, and the teardown refuses, naming it.
Run it in the node's network namespace, as ``./weir teardown``.
"""

from __future__ import annotations

import os
import signal
import time

import click

from services.cli.client import CliFailure, current
from services.common.config import NodeConfig
from services.common.errors import FailedPrecondition
from services.common.instance_lock import release, try_lock

STOP_TIMEOUT = 30.0


def _suite_running(config: NodeConfig) -> int | None:
    """The pid holding the suite's lock, or None when no suite runs."""
    if not config.run_dir.is_dir():
        return None
    if try_lock(config, "suite") is not None:
        release(config, "suite")
        return None
    text = (config.run_dir / "suite.lock").read_text().strip()
    return int(text) if text.isdigit() else None


def _stop(config: NodeConfig, pid: int) -> None:
    """SIGTERM the suite and wait for its lock to be free (the kernel frees it when the suite exits)."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if _suite_running(config) is None:
            return
        time.sleep(0.2)
    raise CliFailure(f"the suite (pid {pid}) did not stop within {STOP_TIMEOUT:g}s")


@click.command()
@click.option("--purge-state", is_flag=True, help="also delete the state directory (endpoints, rules, services)")
@click.option(
    "--bpffs-root", type=click.Path(), default=None, help="the node's bpffs root (default /sys/fs/bpf/<instance>)"
)
@click.option("--state-dir", type=click.Path(), default=None, help="the node's state dir (default /var/lib/<instance>)")
@click.option("--cgroup-root", type=click.Path(), default=None, help="the node's cgroup2 subtree")
def down(purge_state: bool, bpffs_root: str | None, state_dir: str | None, cgroup_root: str | None) -> None:
    """Stop the suite and remove the node's endpoints, attachments, pins and run dir."""
    node = current()
    config = NodeConfig(
        instance=node.instance,
        run_dir=node.run_dir,
        bpffs_root=bpffs_root or os.environ.get("WEIR_BPFFS_ROOT"),
        state_dir=state_dir or os.environ.get("WEIR_STATE_DIR"),
        cgroup_root=cgroup_root or os.environ.get("WEIR_CGROUP_ROOT"),
    )
    from services.orchestrator.teardown import teardown  # pyroute2 and pybpf: only this command needs them

    pid = _suite_running(config)
    if pid is not None:
        click.echo(f"stopping the suite (pid {pid})", err=True)
        _stop(config, pid)
    try:
        report = teardown(config, purge_state=purge_state)
    except FailedPrecondition as exc:
        raise CliFailure(str(exc)) from None
    for what in report.removed:
        click.echo(f"removed {what}")
    for what in report.kept:
        click.echo(f"kept {what}")
    if not report.removed:
        click.echo(f"nothing of instance {config.instance!r} was left")
