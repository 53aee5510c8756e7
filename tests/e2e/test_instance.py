"""Instances own only what they made: one process per service and instance, their own cgroup hooks."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pybpf import Program, query_cgroup
from services.lb.maps import SOCK_PROGRAMS
from tests.harness.node import REPO, Node

pytestmark = pytest.mark.root


def _pins(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


@pytest.mark.parametrize("service", ["orchestrator", "lb"])
def test_a_second_copy_fails_before_touching_anything_and_names_the_holder(
    make_node: Callable[..., Node], service: str
) -> None:
    node = make_node("orchestrator", "lb")
    first = node.services[service].process
    socket_ino = node.socket(service).stat().st_ino
    pins, state = _pins(node.bpffs_root), _mtimes(node.state_dir)
    started = time.monotonic()
    second = subprocess.run(node.argv(service), cwd=REPO, capture_output=True, text=True, timeout=30)
    assert second.returncode != 0
    assert time.monotonic() - started < 10
    lines = [line for line in second.stderr.splitlines() if f"pid {first.pid}" in line]
    assert len(lines) == 1, second.stderr
    assert f"services.{service}" in lines[0] and "--instance" in lines[0]
    assert "Traceback" not in second.stderr
    # The first is untouched: still serving on the same socket, same pins, no store writes.
    assert first.poll() is None
    assert node.socket(service).stat().st_ino == socket_ino
    assert node.serving(service)
    assert _pins(node.bpffs_root) == pins
    assert _mtimes(node.state_dir) == state


def test_a_dead_holder_leaves_no_lock_behind(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator")
    node.kill("orchestrator")
    node.start("orchestrator")
    lock = node.run_dir / "orchestrator.lock"
    assert lock.read_text().strip() == str(node.services["orchestrator"].process.pid)


def _attached(cgroup: Path) -> set[int]:
    return {prog_id for attach_type in SOCK_PROGRAMS.values() for prog_id in query_cgroup(cgroup, attach_type)}


def _own(node: Node) -> set[int]:
    ids = set()
    for name in SOCK_PROGRAMS:
        with Program.from_pin(node.bpffs_root / "lb" / name) as program:
            ids.add(program.id)
    return ids


def test_instances_sharing_a_cgroup_never_detach_each_others_socket_hooks(make_node: Callable[..., Node]) -> None:
    one = make_node("orchestrator", "lb")
    two = make_node()
    shared = ("--cgroup-root", str(one.cgroup_root))
    two.start("orchestrator", *shared)
    two.start("lb", *shared)
    first, second = _own(one), _own(two)
    assert len(first) == len(second) == len(SOCK_PROGRAMS) and not first & second
    assert _attached(one.cgroup_root) == first | second
    # A restart replaces only the restarting instance's older programs.
    one.kill("lb", 15)
    one.start("lb")
    assert _attached(one.cgroup_root) == _own(one) | second
    assert not _own(one) & first


def test_a_service_makes_its_instance_cgroup_and_records_it(make_node: Callable[..., Node]) -> None:
    node = make_node()
    node.cgroup_root.rmdir()  # the harness makes it; here the instance must
    node.start("orchestrator")  # the LB registers its programs with it before it serves
    node.start("lb")
    assert node.cgroup_root.is_dir()
    assert _attached(node.cgroup_root) == _own(node)
    assert (node.run_dir / "cgroup.made").read_text().strip() == str(node.cgroup_root)
    assert os.stat(node.run_dir).st_mode & 0o777 == 0o700
