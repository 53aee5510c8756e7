"""Event limits set at run time outlive the orchestrator: kept in its store, put back at start.

A real orchestrator in a node namespace, started with `--flow-event-limit drop=100/10`.
Limits changed with SetEventLimits survive a SIGKILL and a restart with the same flags,
both as the orchestrator reports them and in the pinned `event_limits` map the BPF programs
read; refused requests change neither. A flag changed since a limit was set at run time is
the operator's newer word: it applies, and the stored limit for that kind is dropped. A
stored limit that does not read back holds the orchestrator, naming its database.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from weir.orchestrator.v1 import orchestrator_pb2 as pb

from pybpf import Map
from services.common.datapath import EventKind, EventLimit, EventLimitFlag
from services.orchestrator.eventlimits import Limit, default_limits
from tests.harness.node import Node, pid_prefix

pytestmark = pytest.mark.root

_names = itertools.count()
FLAG = ("--flow-event-limit", "drop=100/10")


@pytest.fixture
def node(tmp_path_factory: pytest.TempPathFactory, built: Path) -> Iterator[Node]:
    name = f"{pid_prefix()}l{next(_names)}"
    node = Node(name, tmp_path_factory.mktemp(name))
    try:
        node.setup()
        node.start("orchestrator", *FLAG)
        yield node
    finally:
        node.teardown()


def shown(node: Node) -> dict[str, Limit]:
    """Each kind's limit as GetFlowStats reports it."""
    stats = node.orchestrator().GetFlowStats(pb.GetFlowStatsRequest(), timeout=10)
    return {k.kind: Limit(k.rate, k.burst, k.sample, k.off) for k in stats.event_kinds}


def in_map(node: Node) -> dict[str, tuple[int, int, int, bool]]:
    """Each kind's limit as the BPF programs read it: (interval_ns, burst, sample, off)."""
    pinned = Map.from_pin(node.bpffs_root / "globals" / "event_limits").typed(ctypes.c_uint32, EventLimit)
    try:
        out = {}
        for kind in EventKind:
            v = pinned.lookup(int(kind))
            out[kind.name] = (int(v.interval_ns), int(v.burst), int(v.sample), bool(v.flags & EventLimitFlag.OFF))
        return out
    finally:
        pinned.close()


def packed(limit: Limit) -> tuple[int, int, int, bool]:
    p = limit.packed()
    return (int(p.interval_ns), int(p.burst), int(p.sample), bool(p.flags & EventLimitFlag.OFF))


def restart(node: Node, *flags: str) -> None:
    node.kill("orchestrator", signal.SIGKILL)
    node.start("orchestrator", *flags)


def set_limits(node: Node, *limits: str) -> None:
    node.orchestrator().SetEventLimits(pb.SetEventLimitsRequest(limits=limits), timeout=10)


def refused(node: Node, *limits: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        set_limits(node, *limits)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    return str(err.value.details())


def test_limits_set_at_run_time_survive_a_sigkill_and_refusals_change_nothing(node: Node) -> None:
    defaults = default_limits()
    set_limits(node, "drop=7/3", "verdict=off", "prefilter=50/20:4")
    wanted = {
        "DROP": Limit(7, 3, 1),
        "VERDICT": Limit(off=True),
        "PREFILTER": Limit(50, 20, 4),
        "TRANSLATE": defaults[EventKind.TRANSLATE],
    }
    assert {k: shown(node)[k] for k in wanted} == wanted
    for bad in (("translate=5", "drop=fast"), ("drop=1", "flows=3"), ("accel=5/0",), ()):
        refused(node, *bad)  # all or none: the good half of a request is not applied either
    assert {k: shown(node)[k] for k in wanted} == wanted
    restart(node, *FLAG)
    after = shown(node)
    assert {k: after[k] for k in wanted} == wanted
    assert after["ACCEL"] == defaults[EventKind.ACCEL]
    table = in_map(node)
    for kind, limit in wanted.items():
        assert table[kind] == packed(limit), kind


def test_a_flag_changed_since_wins_for_its_kind_and_the_others_stay(node: Node) -> None:
    set_limits(node, "drop=7/3", "redirect=9/9")
    restart(node, "--flow-event-limit", "drop=300/30")
    after = shown(node)
    assert after["DROP"] == Limit(300, 30, 1)  # the operator changed the flag after the run-time change
    assert after["REDIRECT"] == Limit(9, 9, 1)  # its flag (the default) did not change
    assert in_map(node)["DROP"] == packed(Limit(300, 30, 1))
    restart(node, *FLAG)  # back to the first flag: nothing stored for drop any more, so the flag applies
    assert shown(node)["DROP"] == Limit(100, 10, 1)
    assert shown(node)["REDIRECT"] == Limit(9, 9, 1)


def test_a_stored_limit_that_does_not_read_back_holds_the_orchestrator(node: Node) -> None:
    set_limits(node, "drop=7/3")
    node.kill("orchestrator", signal.SIGKILL)
    db = node.state_dir / "orchestrator.db"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE docs SET doc = ? WHERE kind = 'event_limit'", (json.dumps({"limit": {"rate": "x"}}),))
    with pytest.raises(TimeoutError):  # held: it serves, but never SERVING
        node.start("orchestrator", *FLAG, timeout=5)
    deadline = time.monotonic() + 60  # a loaded machine may take longer than the 5 s to open the socket
    while True:
        with pytest.raises(grpc.RpcError) as err:
            node.orchestrator().GetFlowStats(pb.GetFlowStatsRequest(), timeout=10)
        if err.value.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert str(db) in str(err.value.details()) and "event limit" in str(err.value.details())
    assert in_map(node)["DROP"] == packed(Limit(7, 3, 1))  # the datapath is kept as it was
