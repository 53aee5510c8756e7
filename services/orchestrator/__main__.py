"""Run the orchestrator: `python -m services.orchestrator [--instance NAME ...]`."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc.aio
import structlog
from weir.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

from services.common import sysctls
from services.common.bpffs import ensure_bpffs
from services.common.config import NodeConfig
from services.common.instance_lock import acquire_or_exit
from services.common.logs import setup_logging
from services.common.server import serve
from services.common.store import Store
from services.common.worker import Worker
from services.orchestrator.chain import Chain
from services.orchestrator.devices import Devices
from services.orchestrator.endpoints import Endpoints
from services.orchestrator.events import EventHub
from services.orchestrator.servicer import SERVICE_NAME, OrchestratorServicer

SERVICE = "orchestrator"
DEFAULT_BPF_DIR = Path(__file__).resolve().parents[2] / "bpf" / "build"
log = structlog.get_logger("weir.orchestrator")


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bpf-dir", type=Path, default=DEFAULT_BPF_DIR,
                        help="directory of the built BPF objects (default bpf/build)")


async def main(config: NodeConfig, bpf_dir: Path) -> None:
    acquire_or_exit(config, SERVICE)
    ensure_bpffs(config.bpffs_root)
    sysctls.enable_forwarding(config)  # records the old values for teardown
    chain = Chain(bpf_dir, config.globals_pin_dir, config.service_pin_dir(SERVICE))
    chain.load()
    worker = Worker(SERVICE)
    store = await worker.call(Store.open, config, SERVICE)
    endpoints = Endpoints(config.instance, chain, store)
    await worker.call(endpoints.reconcile)
    devices = Devices(chain, store)
    await worker.call(devices.reconcile)
    events = EventHub(chain.events)
    events.start(asyncio.get_running_loop())

    def register(server: grpc.aio.Server) -> Sequence[str]:
        servicer = OrchestratorServicer(worker, chain, endpoints, devices, events)
        pb_grpc.add_OrchestratorServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    async def on_stop() -> None:
        events.stop()
        await worker.call(store.close)
        worker.shutdown()
        chain.close()

    log.info("orchestrator ready", instance=config.instance, bpffs=str(config.bpffs_root))
    await serve(SERVICE, config, register, on_stop)


if __name__ == "__main__":
    node, args = NodeConfig.from_args(None, SERVICE, _flags)
    setup_logging(SERVICE, node.log_level)
    asyncio.run(main(node, args.bpf_dir))
