"""Run the load balancer: `python -m services.lb [--max-services N ...]`."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
from pathlib import Path

import grpc.aio
import structlog
from pyroute2 import IPRoute
from weir.lb.v1 import lb_pb2_grpc as pb_grpc

from services.common.chain_client import ChainClient
from services.common.config import NodeConfig
from services.common.logs import setup_logging
from services.common.periodic import Every
from services.common.service import run_datapath_service
from services.common.worker import Worker
from services.lb.defs import MAX_SERVICES
from services.lb.lb import LoadBalancer
from services.lb.maps import LbMaps
from services.lb.probes import Prober
from services.lb.servicer import SERVICE_NAME, LoadBalancerServicer

SERVICE = "lb"
DEFAULT_BPF_DIR = Path(__file__).resolve().parents[2] / "bpf" / "build"
log = structlog.get_logger("weir.lb")
HEALTH_ROUND_SECONDS = 0.1  # how often finished probes are applied and due ones started


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bpf-dir", type=Path, default=DEFAULT_BPF_DIR, help="directory of the built BPF objects (default bpf/build)"
    )
    parser.add_argument(
        "--max-services",
        type=int,
        default=MAX_SERVICES,
        help=f"frontends the maps hold (a node port counts once per node address; at most {MAX_SERVICES})",
    )


def node_addresses() -> list[str]:
    """IPv4 addresses of this (the node's) namespace that can serve node ports."""
    with IPRoute() as ipr:
        found = [str(a.get("address")) for a in ipr.get_addr(family=2)]
    return sorted(a for a in found if not ipaddress.ip_address(a).is_loopback)


def _tasks(worker: Worker, lb: LoadBalancer) -> list[Every]:
    """Health checks: probes run on the loop; each round hands finished ones to the worker."""
    prober = Prober()

    async def health_round() -> None:
        due = await worker.call(lb.health_round, prober.finished(), prober.busy)
        prober.launch(due)

    return [Every("health-checks", HEALTH_ROUND_SECONDS, health_round)]


async def main(config: NodeConfig, args: argparse.Namespace) -> None:
    chain = ChainClient(config.socket_path("orchestrator"), SERVICE)
    maps = LbMaps(
        args.bpf_dir,
        config.globals_pin_dir,
        config.service_pin_dir(SERVICE),
        config.cgroup_root,
        register=chain.register,
    )
    max_frontends = min(args.max_services, MAX_SERVICES)

    def add_servicer(server: grpc.aio.Server, worker: Worker, lb: LoadBalancer) -> str:
        pb_grpc.add_LoadBalancerServicer_to_server(LoadBalancerServicer(worker, lb), server)
        return SERVICE_NAME

    await run_datapath_service(
        SERVICE,
        config,
        lambda store: LoadBalancer(maps, store, node_addresses, max_frontends),
        add_servicer,
        tasks=_tasks,
    )


if __name__ == "__main__":
    node, arguments = NodeConfig.from_args(None, SERVICE, _flags)
    setup_logging(SERVICE, node.log_level)
    asyncio.run(main(node, arguments))
