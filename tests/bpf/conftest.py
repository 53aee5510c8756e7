"""Fixtures of the bpf tier: a private datapath per table, reset before every row.

Every test here runs packets through the real BPF objects with test_run; it
needs root and the objects in bpf/build, but no namespace, device or service.
Each table module loads its datapath once (under a pin root named for this
pytest process, removed at the end) and every row starts from empty conntrack
and metrics.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.harness.bpfrun import Datapath, datapath
from tests.harness.node import pid_prefix

HERE = Path(__file__).parent
CGROUP2 = Path("/sys/fs/cgroup/unified")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of this directory is a bpf-tier test that needs root."""
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.bpf)
            item.add_marker(pytest.mark.root)
            if os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason="the bpf tier needs root (test_run, bpffs)"))


@pytest.fixture(scope="module")
def make_datapath(request: pytest.FixtureRequest) -> Iterator[Callable[[], Datapath]]:
    """Factory for this module's datapath(s), each under its own pin root, closed after the module."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    with ExitStack() as stack:
        made: list[Datapath] = []

        def make() -> Datapath:
            if not (Path(__file__).parents[2] / "bpf" / "build" / "entry.o").exists():
                pytest.fail("bpf/build/entry.o is missing: run ./weir setup (or make -C bpf)")
            dp = stack.enter_context(datapath(f"{pid_prefix()}-{module}-{len(made)}"))
            made.append(dp)
            return dp

        yield make


@pytest.fixture(scope="module")
def scratch_cgroup(request: pytest.FixtureRequest) -> Iterator[Path]:
    """An empty cgroup for the LB's socket programs (the tables never use them), removed after."""
    if not os.path.ismount(CGROUP2):
        pytest.skip(f"no cgroup2 mount at {CGROUP2}")
    path = CGROUP2 / f"{pid_prefix()}-{request.module.__name__.rsplit('.', 1)[-1]}"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()
