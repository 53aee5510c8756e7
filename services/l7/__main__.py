"""Run the L7 service: `python -m services.l7 [--envoy managed|external ...]`.

One process serves the L7 API on ``<run-dir>/l7.sock`` and Envoy's control plane (ADS and
the access log service) on ``<run-dir>/l7/xds.sock``, and runs Envoy (managed) or
watches the one compose runs (external). The health answer is NOT_SERVING while Envoy's
admin endpoint does not say it is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import Sequence

import grpc.aio
import structlog
from weir.l7.v1 import l7_pb2_grpc as pb_grpc

from services.common.config import NodeConfig
from services.common.errors import FailedPrecondition
from services.common.health import Readiness
from services.common.instance_lock import acquire_or_exit
from services.common.logs import setup_logging
from services.common.server import check_tls_files, serve, stop_bounded
from services.common.service import serve_held
from services.common.state import open_state
from services.common.worker import Worker
from services.l7.accesslog import AccessLog
from services.l7.envoy import Sidecar
from services.l7.proxy import L7Proxy
from services.l7.resources import build
from services.l7.servicer import SERVICE_NAME, L7Servicer
from services.l7.xds import Ads, serve_control

SERVICE = "l7"
log = structlog.get_logger("weir.l7")
READY_CHECK_SECONDS = 0.25


def _flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("envoy")
    group.add_argument(
        "--envoy",
        choices=("managed", "external"),
        default=os.environ.get("WEIR_L7_ENVOY", "managed"),
        help="managed: start and restart Envoy here; external: it runs beside us (compose) "
        "from <run-dir>/l7/envoy.json (env WEIR_L7_ENVOY)",
    )
    group.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads (default 1)")
    group.add_argument("--envoy-log-level", default="warning", help="Envoy's own log level (default warning)")
    group.add_argument(
        "--drain-seconds", type=float, default=1.0, help="how long open connections may finish on stop (default 1)"
    )


async def _watch_ready(sidecar: Sidecar, readiness: Readiness) -> None:
    while True:
        await readiness.set("envoy", await sidecar.check())
        await asyncio.sleep(READY_CHECK_SECONDS)


async def main(config: NodeConfig, args: argparse.Namespace) -> None:
    acquire_or_exit(config, SERVICE)
    check_tls_files(config)
    # Envoy's control socket lives with its bootstrap, not beside the services' API sockets:
    # `weir status` takes every <run-dir>/*.sock for a service.
    (config.run_dir / SERVICE).mkdir(mode=0o700, parents=True, exist_ok=True)
    sidecar = Sidecar(
        node_id=f"{config.instance}-{SERVICE}",
        directory=config.run_dir / SERVICE,
        control_socket=config.run_dir / SERVICE / "xds.sock",
        managed=args.envoy == "managed",
        concurrency=args.envoy_concurrency,
        log_level=args.envoy_log_level,
        drain_seconds=args.drain_seconds,
    )
    if sidecar.managed:
        try:
            sidecar.binary()
        except FailedPrecondition as exc:
            log.error("cannot start", error=str(exc))
            raise SystemExit(1) from None
    worker = Worker(SERVICE)
    opened = await worker.call(open_state, config, SERVICE, False)
    if opened.store is None:
        assert opened.held is not None
        await serve_held(SERVICE, config, worker, opened.held, names=[SERVICE_NAME])
        return
    store = opened.store
    ads = Ads(build(0, []))
    access = AccessLog()
    proxy = await worker.call(L7Proxy, store, ads)
    await worker.call(proxy.start)
    config.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    control_socket = sidecar.control_socket
    control = await serve_control(control_socket, ads, access)
    await sidecar.start()
    readiness = Readiness()
    await readiness.set("envoy", False)
    watcher = asyncio.create_task(_watch_ready(sidecar, readiness))

    def register(server: grpc.aio.Server) -> Sequence[str]:
        pb_grpc.add_L7Servicer_to_server(L7Servicer(worker, proxy, ads, access, sidecar), server)
        return [SERVICE_NAME]

    async def on_stop() -> None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await sidecar.stop()
        await stop_bounded(control, 1.0)
        control_socket.unlink(missing_ok=True)
        await worker.call(store.close)
        worker.shutdown()

    await serve(SERVICE, config, register, on_stop, readiness)


if __name__ == "__main__":
    node, arguments = NodeConfig.from_args(None, SERVICE, _flags)
    setup_logging(SERVICE, node.log_level)
    asyncio.run(main(node, arguments))
