"""Run the socket-layer fast path: `python -m services.sockaccel`."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
from pathlib import Path

import grpc.aio
from pyroute2 import IPRoute
from weir.sockaccel.v1 import sockaccel_pb2_grpc as pb_grpc

from services.common.config import NodeConfig
from services.common.logs import setup_logging
from services.common.periodic import Every
from services.common.service import run_datapath_service
from services.common.worker import Worker
from services.sockaccel.defs import DEFAULT_MAX_QUEUED
from services.sockaccel.endpoints import follow_endpoints
from services.sockaccel.maps import SockaccelMaps, kernel_support
from services.sockaccel.servicer import SERVICE_NAME, SockAccelServicer
from services.sockaccel.sockaccel import EndpointView, SockAccel

SERVICE = "sockaccel"
DEFAULT_BPF_DIR = Path(__file__).resolve().parents[2] / "bpf" / "build"
MIN_QUEUED, MAX_QUEUED = 64 << 10, 1 << 30
REBIND_SECONDS = 1.0  # how soon the policy service's maps are picked up once pinned


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bpf-dir", type=Path, default=DEFAULT_BPF_DIR, help="directory of the built BPF objects (default bpf/build)"
    )
    parser.add_argument(
        "--max-queued",
        type=_queue_limit,
        default=DEFAULT_MAX_QUEUED,
        help="unread redirected bytes at which a socket moves to TCP, whose window then holds the sender "
        f"(default {DEFAULT_MAX_QUEUED}, 64 KiB to 1 GiB)",
    )


def _queue_limit(text: str) -> int:
    value = int(text)
    if not MIN_QUEUED <= value <= MAX_QUEUED:
        raise argparse.ArgumentTypeError(f"--max-queued {value} is not between {MIN_QUEUED} and {MAX_QUEUED}")
    return value


def host_addresses() -> list[str]:
    """This (the node's) namespace's own addresses: a host process or the L7 proxy is an end there."""
    with IPRoute() as ipr:
        found = [str(a.get("address")) for a in ipr.get_addr()]
    return sorted(
        a for a in found if not (ipaddress.ip_address(a).is_loopback or ipaddress.ip_address(a).is_link_local)
    )


def _tasks(worker: Worker, accel: SockAccel) -> list[Every]:
    async def rebind() -> None:
        await worker.call(accel.rebind)

    return [Every("policy-bind", REBIND_SECONDS, rebind)]


async def main(config: NodeConfig, args: argparse.Namespace) -> None:
    maps = SockaccelMaps(
        args.bpf_dir,
        config.globals_pin_dir,
        config.service_pin_dir(SERVICE),
        config.service_pin_dir("policy"),
        config.cgroup_root,
        args.max_queued,
    )

    def add_servicer(server: grpc.aio.Server, worker: Worker, accel: SockAccel) -> str:
        pb_grpc.add_SockAccelServicer_to_server(SockAccelServicer(worker, accel), server)
        return SERVICE_NAME

    async def background(worker: Worker, accel: SockAccel) -> None:
        async def on_change(snapshot: bool, upserted: list[EndpointView], deleted: list[str]) -> None:
            await worker.call(accel.set_endpoints, snapshot, upserted, deleted)

        await follow_endpoints(config.socket_path("orchestrator"), on_change)

    await run_datapath_service(
        SERVICE,
        config,
        lambda store: SockAccel(maps, store, host_addresses, kernel_support),
        add_servicer,
        background=background,
        tasks=_tasks,
    )


if __name__ == "__main__":
    node, arguments = NodeConfig.from_args(None, SERVICE, _flags)
    setup_logging(SERVICE, node.log_level)
    asyncio.run(main(node, arguments))
