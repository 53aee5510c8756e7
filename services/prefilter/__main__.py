"""Run the prefilter: `python -m services.prefilter [--host-entries N --prefix-entries N ...]`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc.aio
from weir.prefilter.v1 import prefilter_pb2_grpc as pb_grpc

from services.common.chain_client import ChainClient
from services.common.config import NodeConfig
from services.common.logs import setup_logging
from services.common.periodic import Every
from services.common.service import run_datapath_service
from services.common.worker import Worker
from services.prefilter.defs import DEFAULT_HOST_ENTRIES, DEFAULT_PREFIX_ENTRIES
from services.prefilter.denylist import Capacity
from services.prefilter.frontends import read_frontends
from services.prefilter.maps import PrefilterMaps
from services.prefilter.prefilter import Prefilter
from services.prefilter.servicer import SERVICE_NAME, PrefilterServicer

SERVICE = "prefilter"
DEFAULT_BPF_DIR = Path(__file__).resolve().parents[2] / "bpf" / "build"


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bpf-dir", type=Path, default=DEFAULT_BPF_DIR, help="directory of the built BPF objects (default bpf/build)"
    )
    parser.add_argument(
        "--host-entries",
        type=int,
        default=DEFAULT_HOST_ENTRIES,
        help=f"exact hosts (/32, /128) per family (default {DEFAULT_HOST_ENTRIES})",
    )
    parser.add_argument(
        "--prefix-entries",
        type=int,
        default=DEFAULT_PREFIX_ENTRIES,
        help=f"shorter prefixes per family (default {DEFAULT_PREFIX_ENTRIES})",
    )
    parser.add_argument(
        "--frontend-seconds",
        type=float,
        default=2.0,
        help="how often the lb service's frontends are re-read while the valid-destination mode is on (default 2)",
    )


async def main(config: NodeConfig, args: argparse.Namespace) -> None:
    capacity = Capacity(hosts=args.host_entries, prefixes=args.prefix_entries)
    chain = ChainClient(config.socket_path("orchestrator"), SERVICE)
    maps = PrefilterMaps(
        args.bpf_dir, config.globals_pin_dir, config.service_pin_dir(SERVICE), capacity, register=chain.register
    )

    def add_servicer(server: grpc.aio.Server, worker: Worker, prefilter: Prefilter) -> str:
        pb_grpc.add_PrefilterServicer_to_server(PrefilterServicer(worker, prefilter), server)
        return SERVICE_NAME

    def tasks(worker: Worker, prefilter: Prefilter) -> list[Every]:
        async def follow_frontends() -> None:
            if not await worker.call(lambda: prefilter.valid_destinations.enabled):
                return
            frontends = await read_frontends(config.socket_path("lb"))
            if frontends is not None:
                await worker.call(prefilter.valid_destinations.set_frontends, frontends)

        return [Every("lb-frontends", args.frontend_seconds, follow_frontends)]

    await run_datapath_service(SERVICE, config, lambda store: Prefilter(maps, store, chain), add_servicer, tasks=tasks)


if __name__ == "__main__":
    node, arguments = NodeConfig.from_args(None, SERVICE, _flags)
    setup_logging(SERVICE, node.log_level)
    asyncio.run(main(node, arguments))
