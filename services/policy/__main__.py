"""Run the policy service: `python -m services.policy [--policy-entries N ...]`."""

from __future__ import annotations

import argparse
import asyncio
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc.aio
import structlog
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.policy.v1 import policy_pb2_grpc as pb_grpc

from services.common.chain_client import ChainClient
from services.common.collector import collector_paused
from services.common.config import NodeConfig
from services.common.errors import WeirError
from services.common.logs import setup_logging
from services.common.service import run_datapath_service
from services.common.worker import Worker
from services.policy import redirect
from services.policy.defs import DEFAULT_POLICY_ENTRIES
from services.policy.l7push import ListenerPush
from services.policy.limits import brief, summary
from services.policy.maps import PolicyMaps
from services.policy.policy import DEFAULT_PROXY_PORTS, NO_ADOPT, Policy
from services.policy.servicer import SERVICE_NAME, PolicyServicer
from services.policy.sources import Orchestrator, follow_endpoints, follow_identities, identity_views

SERVICE = "policy"
DEFAULT_BPF_DIR = Path(__file__).resolve().parents[2] / "bpf" / "build"
log = structlog.get_logger("weir.policy")


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bpf-dir", type=Path, default=DEFAULT_BPF_DIR, help="directory of the built BPF objects (default bpf/build)"
    )
    parser.add_argument(
        "--policy-entries",
        type=int,
        default=DEFAULT_POLICY_ENTRIES,
        help=f"policy map entries per endpoint (default {DEFAULT_POLICY_ENTRIES})",
    )
    parser.add_argument(
        "--proxy-ports",
        type=_port_range,
        default=DEFAULT_PROXY_PORTS,
        help=f"the L7 proxy's listener ports, FIRST-LAST (default "
        f"{DEFAULT_PROXY_PORTS.start}-{DEFAULT_PROXY_PORTS.stop - 1})",
    )


def _port_range(text: str) -> range:
    first, sep, last = text.partition("-")
    if not sep or not first.isdigit() or not last.isdigit() or not 0 < int(first) <= int(last) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port range FIRST-LAST within 1-65535")
    return range(int(first), int(last) + 1)


def _follower(worker: Worker, apply: Callable[..., list[str]], what: str) -> Callable[..., Awaitable[None]]:
    """A stream callback: apply the message on the worker; a failure is logged, the next message retries."""

    async def on_change(*message: object) -> None:
        try:
            changed = await worker.call(apply, *message)
        except (WeirError, OSError) as exc:
            log.warning(f"{what}: recompute failed", error=brief(str(exc)))
            return
        if changed:
            log.info(f"{what}: endpoints recomputed", endpoints=summary(changed), count=len(changed))

    return on_change


async def main(config: NodeConfig, args: argparse.Namespace) -> None:
    orchestrator_socket = config.socket_path("orchestrator")
    chain = ChainClient(orchestrator_socket, SERVICE)
    maps = PolicyMaps(
        args.bpf_dir,
        config.globals_pin_dir,
        config.service_pin_dir(SERVICE),
        args.policy_entries,
        register=chain.register,
    )
    node = Orchestrator(orchestrator_socket)
    push = ListenerPush(config.socket_path("l7"))
    push.start()

    def add_servicer(server: grpc.aio.Server, worker: Worker, policy: Policy) -> str:
        pb_grpc.add_PolicyServicer_to_server(PolicyServicer(worker, policy), server)
        return SERVICE_NAME

    async def background(worker: Worker, policy: Policy) -> None:
        """Follow the node's endpoints and identities, forever (reconnecting after a restart)."""

        @collector_paused()
        def on_identities(update: orch_pb.IdentityUpdate) -> list[str]:
            """Converted on the worker, after whatever it is doing (an import's own allocations come back here)."""
            return policy.on_identities(update.snapshot, identity_views(update), list(update.deleted))

        await asyncio.gather(
            follow_endpoints(orchestrator_socket, _follower(worker, policy.on_endpoints, "endpoints")),
            follow_identities(orchestrator_socket, _follower(worker, on_identities, "identities")),
        )

    try:
        await run_datapath_service(
            SERVICE,
            config,
            lambda store: Policy(
                maps,
                store,
                node,
                push,
                args.proxy_ports,
                functools.partial(redirect.setup, config),
                redirect.proxy_address(config.instance),
            ),
            add_servicer,
            background,
            can_adopt=False,
            adopt_note=NO_ADOPT,
        )
    finally:
        push.stop()
        node.close()


if __name__ == "__main__":
    node_config, arguments = NodeConfig.from_args(None, SERVICE, _flags)
    setup_logging(SERVICE, node_config.log_level)
    asyncio.run(main(node_config, arguments))
