"""Fixtures every test reuses: nodes with the suite running, endpoints, clean-up.

Names of everything a test makes start with a prefix unique to the pytest
process, and a session finaliser removes whatever a failed test left.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import netns
from tests.harness.node import BPF_BUILD, Node, leftover_check, pid_prefix

PREFIX = pid_prefix()
_counter = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root, bpffs and network namespaces")


@pytest.fixture(scope="session")
def built() -> Path:
    """The BPF objects exist (./weir test builds them before pytest starts)."""
    if not (BPF_BUILD / "entry.o").exists():
        pytest.fail("bpf/build/entry.o is missing: run ./weir setup (or make -C bpf)")
    return BPF_BUILD


@pytest.fixture(scope="session", autouse=True)
def _session_cleanup() -> Iterator[None]:
    yield
    for ns in netns.names(PREFIX):
        netns.remove(ns)
    assert not leftover_check(PREFIX), f"tests left behind: {leftover_check(PREFIX)}"


@pytest.fixture
def make_node(tmp_path_factory: pytest.TempPathFactory, built: Path) -> Iterator[Callable[..., Node]]:
    """Factory for nodes; each starts the services named and is torn down after the test."""
    made: list[Node] = []

    def make(*services: str) -> Node:
        name = f"{PREFIX}n{next(_counter)}"
        node = Node(name, tmp_path_factory.mktemp(name))
        made.append(node)
        node.setup()
        for service in services:
            node.start(service)
        return node

    yield make
    for node in made:
        node.teardown()


@pytest.fixture
def node(make_node: Callable[..., Node]) -> Node:
    """A node with the orchestrator running."""
    return make_node("orchestrator")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)
