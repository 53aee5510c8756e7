"""End to end: a tiny servicer (no generated protos) served by serve()/ServiceServer.

Checks what every Weir service inherits: a 0600 unix socket, health, reflection, the
telemetry RPC counts (also while held), error mapping, request ids in the logs, opt-in mutual TLS, and a clean SIGTERM.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import structlog
from grpc_health.v1.health_pb2 import HealthCheckRequest as HealthRequest
from grpc_health.v1.health_pb2 import HealthCheckResponse as HealthResponse
from grpc_reflection.v1alpha import reflection_pb2
from weir.common.v1 import telemetry_pb2, telemetry_pb2_grpc

from services.common import rpcmetrics
from services.common.config import NodeConfig
from services.common.errors import Aborted, FailedPrecondition, NotFound
from services.common.logs import setup_logging
from services.common.server import ServiceServer, channel
from services.common.state import Held, refuse_calls

REPO = Path(__file__).resolve().parents[2]
SERVICE = "weir.test.v1.Probe"
Context = grpc.aio.ServicerContext[bytes, bytes]


async def _echo(request: bytes, _context: Context) -> bytes:
    return request


async def _missing(_request: bytes, _context: Context) -> bytes:
    raise NotFound("endpoint x not found")


async def _crash(_request: bytes, _context: Context) -> bytes:
    raise RuntimeError("secret detail zqxv")


async def _whoami(_request: bytes, _context: Context) -> bytes:
    return str(structlog.contextvars.get_contextvars()["request_id"]).encode()


async def _count(_request: bytes, _context: Context) -> AsyncIterator[bytes]:
    yield b"1"
    yield b"2"
    raise Aborted("revision moved")


def register(server: grpc.aio.Server) -> list[str]:
    unary: dict[str, Callable[[bytes, Context], Awaitable[bytes]]] = {
        "Echo": _echo,
        "Missing": _missing,
        "Crash": _crash,
        "WhoAmI": _whoami,
    }
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in unary.items()
    }
    handlers["Count"] = grpc.unary_stream_rpc_method_handler(_count)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    return [SERVICE]


@asynccontextmanager
async def running(config: NodeConfig) -> AsyncIterator[tuple[ServiceServer, grpc.aio.Channel]]:
    server = ServiceServer("probe", config, register)
    await server.start()
    try:
        async with channel(server.socket_path) as ch:
            yield server, ch
    finally:
        await server.stop(grace=1)


def node(tmp_path: Path, **kw: Any) -> NodeConfig:
    return NodeConfig(instance="t", run_dir=tmp_path / "run", state_dir=tmp_path / "state", **kw)


def _raw(data: bytes) -> bytes:
    return data


async def _call(ch: grpc.aio.Channel, method: str, request: bytes = b"", **kw: Any) -> bytes:
    return await ch.unary_unary(f"/{SERVICE}/{method}", _raw, _raw)(request, **kw)


HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def health_check(ch: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[Any, HealthResponse]:
    """Typed Health.Check (the grpc stubs leave the generated stub's methods untyped)."""
    return ch.unary_unary(HEALTH_CHECK, HealthRequest.SerializeToString, HealthResponse.FromString)


def test_socket_is_private_and_removed_on_stop(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(node(tmp_path)) as (server, ch):
            mode = os.stat(server.socket_path).st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o600
            assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
            assert server.socket_path == tmp_path / "run" / "probe.sock"
            assert await _call(ch, "Echo", b"ping") == b"ping"
        assert not server.socket_path.exists()

    asyncio.run(scenario())


def test_health_serves_every_name(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(node(tmp_path)) as (_, ch):
            check = health_check(ch)
            for name in ("", SERVICE):
                reply = await check(HealthRequest(service=name))
                assert reply.status == HealthResponse.SERVING, name
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await check(HealthRequest(service="weir.nope.v1.Nope"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())


def test_reflection_lists_the_services(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(node(tmp_path)) as (_, ch):
            info = ch.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                reflection_pb2.ServerReflectionRequest.SerializeToString,
                reflection_pb2.ServerReflectionResponse.FromString,
            )
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            names: set[str] = set()
            async for reply in info(iter([request])):
                names |= {s.name for s in reply.list_services_response.service}
            assert names == {
                SERVICE,
                "weir.common.v1.Telemetry",
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            }

    asyncio.run(scenario())


def _counts(reply: telemetry_pb2.RpcCounts) -> dict[tuple[str, str], int]:
    return {(c.method, c.code): c.count for c in reply.counts}


def test_telemetry_hands_out_the_calls_by_method_and_code_with_the_service_and_instance(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(node(tmp_path)) as (_, ch):
            stub = telemetry_pb2_grpc.TelemetryStub(ch)
            before = await stub.GetRpcCounts(telemetry_pb2.GetRpcCountsRequest())
            assert (before.service, before.instance) == ("probe", "t")
            assert before.start_time_seconds == rpcmetrics.START_TIME > 0
            for _ in range(3):
                await _call(ch, "Echo", b"x")
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError):
                    await _call(ch, "Missing")
            after = _counts(await stub.GetRpcCounts(telemetry_pb2.GetRpcCountsRequest()))
            old = _counts(before)
            echo, missing = (f"/{SERVICE}/Echo", "OK"), (f"/{SERVICE}/Missing", "NOT_FOUND")
            assert after[echo] - old.get(echo, 0) == 3
            assert after[missing] - old.get(missing, 0) == 2
            asked = ("/weir.common.v1.Telemetry/GetRpcCounts", "OK")
            assert after[asked] - old.get(asked, 0) == 1  # the first ask counted itself once it answered
            assert all(after.get(k, 0) >= v for k, v in old.items())  # nothing goes backwards

    asyncio.run(scenario())


def test_telemetry_answers_while_the_service_is_held(tmp_path: Path) -> None:
    held = Held(tmp_path / "probe.db", "is not a readable SQLite database", "restart it with --reset")

    def register_held(server: grpc.aio.Server) -> list[str]:
        refuse_calls(server, held)
        return register(server)

    async def scenario() -> None:
        server = ServiceServer("probe", node(tmp_path), register_held)
        await server.start()
        try:
            async with channel(server.socket_path) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _call(ch, "Echo", b"x")
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                reply = await telemetry_pb2_grpc.TelemetryStub(ch).GetRpcCounts(telemetry_pb2.GetRpcCountsRequest())
                assert reply.service == "probe"
        finally:
            await server.stop(grace=1)

    asyncio.run(scenario())


def test_weir_error_arrives_with_its_code_and_message(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(node(tmp_path)) as (_, ch):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _call(ch, "Missing")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == "endpoint x not found"

    asyncio.run(scenario())


def test_unexpected_error_is_internal_without_its_text(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(node(tmp_path)) as (_, ch):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _call(ch, "Crash")
            assert err.value.code() == grpc.StatusCode.INTERNAL
            details = err.value.details() or ""
            assert "secret" not in details
            assert "zqxv" not in details
            assert details.startswith("internal error")

    asyncio.run(scenario())


def test_stream_delivers_items_then_the_mapped_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(node(tmp_path)) as (_, ch):
            got: list[bytes] = []
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for item in ch.unary_stream(f"/{SERVICE}/Count", _raw, _raw)(b""):
                    got.append(item)
            assert got == [b"1", b"2"]
            assert err.value.code() == grpc.StatusCode.ABORTED
            assert err.value.details() == "revision moved"

    asyncio.run(scenario())


def test_calls_are_logged_with_request_ids(tmp_path: Path) -> None:
    out = io.StringIO()
    setup_logging("probe", "info", stream=out)

    async def scenario() -> tuple[str, str]:
        async with running(node(tmp_path)) as (_, ch):
            given = await _call(ch, "WhoAmI", metadata=(("x-request-id", "req-abc.1"),))
            fresh = await _call(ch, "WhoAmI")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _call(ch, "Crash")
            assert (err.value.details() or "").count("request id") == 1
            return given.decode(), fresh.decode()

    try:
        given, fresh = asyncio.run(scenario())
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert given == "req-abc.1"
    assert fresh and fresh != given
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    rpcs = [line for line in lines if line["event"] == "rpc"]
    assert [(r["rpc"], r["code"]) for r in rpcs] == [
        (f"/{SERVICE}/WhoAmI", "OK"),
        (f"/{SERVICE}/WhoAmI", "OK"),
        (f"/{SERVICE}/Crash", "INTERNAL"),
    ]
    assert rpcs[0]["request_id"] == "req-abc.1"
    assert all(isinstance(r["duration_ms"], float) for r in rpcs)
    assert "secret detail zqxv" in rpcs[2]["exception"]  # the detail is in the log only
    assert any(line["event"] == "serving" for line in lines)


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "run" / "probe.sock"))
    stale.close()  # the file stays, nobody listens: what a killed process leaves

    async def scenario() -> None:
        async with running(node(tmp_path)) as (_, ch):
            assert await _call(ch, "Echo", b"x") == b"x"

    asyncio.run(scenario())


def test_live_socket_is_not_stolen(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(node(tmp_path)) as (first, ch):
            second = ServiceServer("probe", node(tmp_path), register)
            with pytest.raises(FailedPrecondition, match="already serving"):
                await second.start()
            assert first.socket_path.exists()
            assert await _call(ch, "Echo", b"still") == b"still"

    asyncio.run(scenario())


def test_a_regular_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "probe.sock").write_text("not a socket")

    async def scenario() -> None:
        with pytest.raises(FailedPrecondition, match="not a socket"):
            await ServiceServer("probe", node(tmp_path), register).start()

    asyncio.run(scenario())
    assert (tmp_path / "run" / "probe.sock").read_text() == "not a socket"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_pki(d: Path) -> None:
    """A throwaway CA plus a server (127.0.0.1/localhost) and a client certificate."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=weir-test-ca", "-days", "1", cwd=d
    )
    for name, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("client", "DNS:client")):
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tcp_listener_requires_a_client_certificate(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    _make_pki(pki)
    config = node(
        tmp_path,
        tcp_listen="127.0.0.1:0",
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
    )
    ca = (pki / "ca.pem").read_bytes()

    async def check(ch: grpc.aio.Channel) -> int:
        reply = await health_check(ch)(HealthRequest(service=SERVICE), timeout=5)
        return int(reply.status)

    async def scenario() -> None:
        async with running(config) as (server, _):
            assert server.tcp_port
            target = f"127.0.0.1:{server.tcp_port}"
            with_cert = grpc.ssl_channel_credentials(
                ca, (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes()
            )
            async with grpc.aio.secure_channel(target, with_cert) as ch:
                assert await check(ch) == HealthResponse.SERVING
            without_cert = grpc.ssl_channel_credentials(ca)
            async with grpc.aio.secure_channel(target, without_cert) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await check(ch)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            async with grpc.aio.insecure_channel(target) as ch:
                with pytest.raises(grpc.aio.AioRpcError):
                    await check(ch)

    asyncio.run(scenario())


def test_unreadable_tls_file_fails_start_and_leaves_no_socket(tmp_path: Path) -> None:
    config = node(tmp_path, tcp_listen="127.0.0.1:0", tls_cert=tmp_path / "no.pem", tls_key=tmp_path / "no.key")

    async def scenario() -> None:
        server = ServiceServer("probe", config, register)
        with pytest.raises(FailedPrecondition, match=r"cannot read TLS file .*no\.pem"):
            await server.start()
        await server.stop(grace=0)
        assert not server.socket_path.exists()

    asyncio.run(scenario())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_busy_tcp_port_is_a_clear_error(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    _make_pki(pki)
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = node(tmp_path, tcp_listen=f"127.0.0.1:{port}", tls_cert=pki / "server.pem", tls_key=pki / "server.key")

    async def scenario() -> None:
        server = ServiceServer("probe", config, register)
        try:
            with pytest.raises(FailedPrecondition, match=r"cannot listen on 127\.0\.0\.1"):
                await server.start()
        finally:
            await server.stop(grace=0)

    try:
        asyncio.run(scenario())
    finally:
        holder.close()


_SUBPROCESS = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import grpc
    from services.common.config import NodeConfig
    from services.common.server import run

    run_dir, marker = Path(sys.argv[1]), Path(sys.argv[2])

    async def slow(request, context):
        await asyncio.sleep(1.0)
        return b"finished"

    def register(server):
        handler = grpc.unary_unary_rpc_method_handler(slow)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("weir.test.v1.Probe", {"Slow": handler})]
        )
        return ["weir.test.v1.Probe"]

    async def on_stop():
        marker.write_text("clean")

    run("probe", NodeConfig(instance="t", run_dir=run_dir), register, on_stop)
    """
)


def test_sigterm_drains_calls_and_stops_cleanly(tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "on_stop.ran"
    sock = run_dir / "probe.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SUBPROCESS, str(run_dir), str(marker)],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.05)
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            check = ch.unary_unary(HEALTH_CHECK, HealthRequest.SerializeToString, HealthResponse.FromString)
            reply = check(HealthRequest(service=SERVICE), timeout=5)
            assert reply.status == HealthResponse.SERVING
            in_flight = ch.unary_unary(f"/{SERVICE}/Slow", _raw, _raw).future(b"", timeout=10)
            time.sleep(0.3)  # the call is inside the handler now
            proc.send_signal(signal.SIGTERM)
            assert in_flight.result() == b"finished"  # drained, not cut off
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert not sock.exists()
    assert marker.read_text() == "clean"
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "serving" in events
    assert "stopped" in events


def _pki(tmp_path: Path) -> Path:
    pki = tmp_path / "pki"
    pki.mkdir()
    _make_pki(pki)
    return pki


def _start_logged(config: NodeConfig) -> tuple[list[dict[str, Any]], Exception | None]:
    """Start and stop a server with logs captured; returns the log lines and the start error."""
    out = io.StringIO()
    setup_logging("probe", "info", stream=out)
    error: list[Exception] = []

    async def scenario() -> None:
        server = ServiceServer("probe", config, register)
        try:
            await server.start()
        except FailedPrecondition as exc:
            error.append(exc)
        finally:
            await server.stop(grace=0)

    try:
        asyncio.run(scenario())
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    return [json.loads(line) for line in out.getvalue().splitlines()], (error[0] if error else None)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620])
def test_a_key_others_can_read_or_change_is_refused(tmp_path: Path, mode: int) -> None:
    pki = _pki(tmp_path)
    key = pki / "server.key"
    key.chmod(mode)
    config = node(
        tmp_path, tcp_listen="127.0.0.1:0", tls_cert=pki / "server.pem", tls_key=key, tls_client_ca=pki / "ca.pem"
    )
    _, error = _start_logged(config)
    assert isinstance(error, FailedPrecondition)
    assert str(key) in str(error) and f"{mode:04o}" in str(error)
    assert not (tmp_path / "run" / "probe.sock").exists()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_group_readable_key_and_a_listener_without_client_ca_are_warned_about(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    key = pki / "server.key"
    key.chmod(0o640)
    config = node(tmp_path, tcp_listen="127.0.0.1:0", tls_cert=pki / "server.pem", tls_key=key)
    lines, error = _start_logged(config)
    assert error is None
    warnings = [line for line in lines if line["level"] == "warning"]
    assert [w["event"] for w in warnings] == [
        "TLS private key is readable by its group",
        "TCP listener accepts any client",
    ]
    assert warnings[0]["path"] == str(key) and warnings[0]["mode"] == "0640"
    assert any(line["event"] == "serving" for line in lines)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_private_key_with_a_client_ca_starts_without_warnings(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    config = node(
        tmp_path,
        tcp_listen="127.0.0.1:0",
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
    )
    lines, error = _start_logged(config)
    assert error is None
    assert [line for line in lines if line["level"] == "warning"] == []
