"""Periodic tasks: a failing loop keeps running, backs off, and is seen through gRPC health."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import grpc.aio
from grpc_health.v1.health_pb2 import HealthCheckRequest as HealthRequest
from grpc_health.v1.health_pb2 import HealthCheckResponse as HealthResponse

from services.common.config import NodeConfig
from services.common.health import Readiness
from services.common.periodic import Every, Periodic
from services.common.server import ServiceServer, channel

SERVICE = "weir.test.v1.Loop"


def register(server: grpc.aio.Server) -> list[str]:
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {})])
    return [SERVICE]


async def _status(ch: grpc.aio.Channel, name: str = "") -> Any:
    check = ch.unary_unary("/grpc.health.v1.Health/Check", HealthRequest.SerializeToString,
                           HealthResponse.FromString)  # fmt: skip
    return (await check(HealthRequest(service=name), timeout=2)).status


async def _wait_for(ch: grpc.aio.Channel, status: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await _status(ch) == status and await _status(ch, SERVICE) == status:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"health did not become {HealthResponse.ServingStatus.Name(status)}")


def test_failing_loop_turns_health_not_serving_and_back(tmp_path: Path) -> None:
    broken = {"now": False}
    runs: list[float] = []

    async def work() -> None:
        runs.append(time.monotonic())
        if broken["now"]:
            raise OSError("probe socket failed")

    async def scenario() -> None:
        readiness = Readiness()
        config = NodeConfig(instance="t", run_dir=tmp_path / "run", state_dir=tmp_path / "state")
        server = ServiceServer("loop", config, register, readiness=readiness)
        await server.start()
        loop = Periodic(Every("probe", 0.02, work, max_backoff=0.1, unhealthy_after=3), readiness).start()
        try:
            async with channel(server.socket_path) as ch:
                await _wait_for(ch, HealthResponse.SERVING)
                broken["now"] = True
                await _wait_for(ch, HealthResponse.NOT_SERVING)
                assert loop.failures >= 3
                broken["now"] = False
                await _wait_for(ch, HealthResponse.SERVING)
                assert loop.failures == 0
        finally:
            await loop.stop()
            await server.stop(grace=0.5)

    asyncio.run(scenario())
    assert len(runs) >= 4  # three failures, then the run that recovered


def test_loop_survives_unexpected_exceptions_and_backs_off() -> None:
    calls: list[float] = []

    async def work() -> None:
        calls.append(time.monotonic())
        if len(calls) <= 4:
            raise KeyError("a bug, not a network error")

    async def scenario() -> Periodic:
        loop = Periodic(Every("gc", 0.01, work, max_backoff=0.4, unhealthy_after=2)).start()
        deadline = time.monotonic() + 5
        while len(calls) < 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await loop.stop()
        return loop

    loop = asyncio.run(scenario())
    assert len(calls) >= 8, "the loop stopped after an unexpected exception"
    assert loop.failures == 0
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    # A sleep never ends early, so the backoff is a lower bound even on a loaded machine:
    # the wait grew while it kept failing (0.02, 0.04, 0.08, then 0.16 s) ...
    assert [round(g, 2) >= 0.01 * 2 ** (n + 1) for n, g in enumerate(gaps[:4])] == [True] * 4, gaps
    # ... and went back to the interval once it recovered (one short gap is enough under load).
    assert min(gaps[4:]) < 0.08, gaps


def test_delay_doubles_up_to_the_cap() -> None:
    every = Every("x", 1.0, lambda: asyncio.sleep(0), max_backoff=5.0)
    assert [every.delay(n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_readiness_needs_every_task_to_recover() -> None:
    heard: list[bool] = []

    async def sink(ok: bool) -> None:
        heard.append(ok)

    async def scenario() -> None:
        r = Readiness()
        await r.bind(sink)
        await r.set("a", False)
        await r.set("b", False)
        await r.set("a", True)
        assert not r.serving and r.failing == {"b"}
        await r.set("b", True)

    asyncio.run(scenario())
    assert heard == [True, False, True]
