"""Run the ipsec service: `python -m services.ipsec [--key-file PATH] [--rotation-grace S] [--no-follow-nodes]`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc.aio
import structlog
from weir.ipsec.v1 import ipsec_pb2_grpc as pb_grpc

from services.common.chain_client import ChainClient
from services.common.config import NodeConfig
from services.common.errors import WeirError
from services.common.logs import setup_logging
from services.common.overlay import overlay_ifname
from services.common.periodic import Every
from services.common.service import run_datapath_service
from services.common.store import Store
from services.common.worker import Worker
from services.ipsec.ipsec import DEFAULT_GRACE_SECONDS, Ipsec
from services.ipsec.maps import IpsecMaps
from services.ipsec.nodes import NodeFollower
from services.ipsec.servicer import SERVICE_NAME, IpsecServicer

SERVICE = "ipsec"
DEFAULT_BPF_DIR = Path(__file__).resolve().parents[2] / "bpf" / "build"
RETIRE_EVERY_SECONDS = 5.0
RESYNC_NODES_SECONDS = 5.0
log = structlog.get_logger("weir.ipsec")


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bpf-dir", type=Path, default=DEFAULT_BPF_DIR, help="directory of the built BPF objects (default bpf/build)"
    )
    parser.add_argument(
        "--key-file", type=Path, default=None, help="a key to install at start ('SPI CIPHER HEXKEY', mode 0600)"
    )
    parser.add_argument(
        "--rotation-grace",
        type=float,
        default=DEFAULT_GRACE_SECONDS,
        help=f"seconds an old key stays after a newer one came (default {DEFAULT_GRACE_SECONDS:g})",
    )
    parser.add_argument(
        "--follow-nodes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="make peers of the orchestrator's remote nodes that publish a key index (WatchNodes); "
        "UpsertPeer then cannot change those (default on)",
    )


async def main(config: NodeConfig, args: argparse.Namespace) -> None:
    chain = ChainClient(config.socket_path("orchestrator"), SERVICE)
    maps = IpsecMaps(args.bpf_dir, config.globals_pin_dir, config.service_pin_dir(SERVICE), register=chain.register)
    key_dir = config.state_dir / "ipsec-keys"

    followers: list[NodeFollower] = []

    def build(store: Store) -> Ipsec:
        return Ipsec(
            maps,
            store,
            key_dir,
            args.rotation_grace,
            follow_nodes=args.follow_nodes,
            overlay_device=overlay_ifname(config.instance),
        )

    def add_servicer(server: grpc.aio.Server, worker: Worker, ipsec: Ipsec) -> str:
        pb_grpc.add_IpsecServicer_to_server(IpsecServicer(worker, ipsec), server)
        return SERVICE_NAME

    def tasks(worker: Worker, ipsec: Ipsec) -> list[Every]:
        async def retire() -> None:
            await worker.call(ipsec.retire)

        async def key_file() -> None:  # once: a key given on the command line, refused keys logged (not fatal)
            if args.key_file is not None:
                try:
                    await worker.call(ipsec.set_key_file, args.key_file)
                except WeirError as exc:
                    log.error("the --key-file key was not installed; nothing is encrypted with it", error=str(exc))
                args.key_file = None

        async def resync_nodes() -> None:
            for follower in followers:
                await follower.resync()

        return [
            Every("retire", RETIRE_EVERY_SECONDS, retire),
            Every("key-file", 1.0, key_file),
            Every("nodes", RESYNC_NODES_SECONDS, resync_nodes),
        ]

    async def background(worker: Worker, ipsec: Ipsec) -> None:
        """Follow the orchestrator's node table into peers, forever (reconnecting after its restarts)."""
        if args.follow_nodes:
            followers.append(NodeFollower(config.socket_path("orchestrator"), worker, ipsec))
            await followers[0].run()

    await run_datapath_service(SERVICE, config, build, add_servicer, background=background, tasks=tasks)


if __name__ == "__main__":
    node, arguments = NodeConfig.from_args(None, SERVICE, _flags)
    setup_logging(SERVICE, node.log_level)
    asyncio.run(main(node, arguments))
