"""Run the policy service: `python -m services.policy [--policy-entries N ...]`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc.aio
import structlog
from weir.policy.v1 import policy_pb2_grpc as pb_grpc

from services.common.chain_client import ChainClient
from services.common.config import NodeConfig
from services.common.errors import WeirError
from services.common.logs import setup_logging
from services.common.service import run_datapath_service
from services.common.worker import Worker
from services.policy.defs import DEFAULT_POLICY_ENTRIES
from services.policy.maps import PolicyMaps
from services.policy.policy import Policy
from services.policy.servicer import SERVICE_NAME, PolicyServicer
from services.policy.sources import OrchestratorEndpoints, host_addresses, watch_endpoints

SERVICE = "policy"
DEFAULT_BPF_DIR = Path(__file__).resolve().parents[2] / "bpf" / "build"
log = structlog.get_logger("weir.policy")


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bpf-dir", type=Path, default=DEFAULT_BPF_DIR,
                        help="directory of the built BPF objects (default bpf/build)")
    parser.add_argument("--policy-entries", type=int, default=DEFAULT_POLICY_ENTRIES,
                        help=f"policy map entries per endpoint (default {DEFAULT_POLICY_ENTRIES})")
    parser.add_argument("--refresh-seconds", type=float, default=1.0,
                        help="how often endpoints are re-read from the orchestrator (default 1)")
    parser.add_argument("--gc-seconds", type=float, default=10.0,
                        help="how often expired conntrack entries are collected (default 10)")


async def _background(worker: Worker, policy: Policy, refresh: float, gc: float) -> None:
    """Follow endpoint changes and collect expired connections, forever."""
    since_gc = 0.0
    while True:
        await asyncio.sleep(refresh)
        since_gc += refresh
        try:
            changed = await worker.call(policy.refresh)
            if changed:
                log.info("endpoints recomputed", endpoints=changed)
            if since_gc >= gc:
                since_gc = 0.0
                collected = await worker.call(policy.collect)
                if collected:
                    log.info("conntrack collected", expired=collected)
        except WeirError as exc:
            log.warning("refresh skipped", error=str(exc))


async def main(config: NodeConfig, args: argparse.Namespace) -> None:
    chain = ChainClient(config.socket_path("orchestrator"), SERVICE)
    maps = PolicyMaps(args.bpf_dir, config.globals_pin_dir, config.service_pin_dir(SERVICE), args.policy_entries,
                      register=chain.register)
    endpoints = OrchestratorEndpoints(config.socket_path("orchestrator"))

    def add_servicer(server: grpc.aio.Server, worker: Worker, policy: Policy) -> str:
        pb_grpc.add_PolicyServicer_to_server(PolicyServicer(worker, policy), server)
        return SERVICE_NAME

    async def background(worker: Worker, policy: Policy) -> None:
        async def on_change() -> None:
            try:
                await worker.call(policy.refresh)
            except WeirError as exc:
                log.warning("refresh skipped", error=str(exc))

        watch = asyncio.create_task(watch_endpoints(config.socket_path("orchestrator"), on_change))
        try:
            await _background(worker, policy, args.refresh_seconds, args.gc_seconds)
        finally:
            watch.cancel()

    try:
        await run_datapath_service(
            SERVICE, config, lambda store: Policy(maps, store, endpoints, host_addresses), add_servicer, background
        )
    finally:
        endpoints.close()


if __name__ == "__main__":
    node, arguments = NodeConfig.from_args(None, SERVICE, _flags)
    setup_logging(SERVICE, node.log_level)
    asyncio.run(main(node, arguments))
