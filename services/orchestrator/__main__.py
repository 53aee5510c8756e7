"""Run the orchestrator: `python -m services.orchestrator [--instance NAME ...]`."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc.aio
import structlog
from weir.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

from pybpf import BpfObject
from services.common import sysctls
from services.common.bpffs import ensure_bpffs
from services.common.config import NodeConfig
from services.common.datapath import EventKind
from services.common.health import Readiness
from services.common.instance_lock import acquire_or_exit
from services.common.logs import setup_logging
from services.common.objects import load_service_object
from services.common.periodic import Every, Periodic
from services.common.server import check_tls_files, serve
from services.common.service import DOCUMENT_ERRORS, serve_held
from services.common.state import Mode, datapath_exists, decide, open_state, settle
from services.common.store import StoreError
from services.common.worker import Worker
from services.orchestrator import cluster as cluster_mode
from services.orchestrator import clusternodes, netdev
from services.orchestrator.chain import Chain
from services.orchestrator.conntrack import Conntrack
from services.orchestrator.devices import Devices
from services.orchestrator.endpoints import Endpoints
from services.orchestrator.eventlimits import (
    DEFAULT_BURST,
    DEFAULT_PREFILTER_RATE,
    DEFAULT_PREFILTER_SAMPLE,
    DEFAULT_RATE,
    EventLimits,
    Limit,
    parse_limit,
)
from services.orchestrator.events import EventHub
from services.orchestrator.flows import DEFAULT_CAPACITY, MAX_CAPACITY, Flows
from services.orchestrator.identities import Identities
from services.orchestrator.ipcache import Ipcache, host_addresses
from services.orchestrator.l7flows import L7Follower
from services.orchestrator.mapfill import MapFill
from services.orchestrator.metrics import MetricsServer, NodeCollector, parse_listen
from services.orchestrator.nodes import NodeRecord, NodeTable, add_flags, local_from_args, underlay_networks
from services.orchestrator.routing import VXLAN, Routing
from services.orchestrator.rpcscrape import ServiceRpcs
from services.orchestrator.rulenames import RuleNames
from services.orchestrator.servicer import SERVICE_NAME, OrchestratorServicer

SERVICE = "orchestrator"
DEFAULT_BPF_DIR = Path(__file__).resolve().parents[2] / "bpf" / "build"
log = structlog.get_logger("weir.orchestrator")
NO_ADOPT = "the chain's registrations and the endpoints' labels are not in the datapath"


def _buffer_size(text: str) -> int:
    """argparse's check of --flow-buffer: a bad size is a usage error, not a traceback."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_CAPACITY:
        raise argparse.ArgumentTypeError(f"{text!r} is not a flow count in 1-{MAX_CAPACITY}")
    return int(text)


def _event_limit(text: str) -> tuple[EventKind, Limit]:
    try:
        return parse_limit(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bpf-dir", type=Path, default=DEFAULT_BPF_DIR, help="directory of the built BPF objects (default bpf/build)"
    )
    parser.add_argument(
        "--ct-gc-seconds",
        type=float,
        default=10.0,
        help="how often expired conntrack entries are collected (default 10)",
    )
    parser.add_argument(
        "--host-seconds",
        type=float,
        default=2.0,
        help="how often the node's own addresses are re-read for the ipcache (default 2)",
    )
    parser.add_argument(
        "--flow-buffer",
        type=_buffer_size,
        default=DEFAULT_CAPACITY,
        help=f"flows kept in memory for GetFlows; the oldest go when it is full (default {DEFAULT_CAPACITY})",
    )
    parser.add_argument(
        "--metrics-listen",
        type=_listen,
        default=None,
        metavar="HOST:PORT",
        help="serve the node's Prometheus metrics over HTTP at /metrics here (off by default; plain HTTP, "
        "so prefer a loopback address)",
    )
    parser.add_argument(
        "--flow-event-limit",
        type=_event_limit,
        action="append",
        default=[],
        metavar="KIND=RATE[/BURST][:SAMPLE]|KIND=off",
        help=f"the datapath's event rate limit for one kind ({', '.join(k.name.lower() for k in EventKind)}): "
        f"events per second per CPU (0: none), burst, one in SAMPLE; repeatable (default {DEFAULT_RATE}/"
        f"{DEFAULT_BURST}, prefilter {DEFAULT_PREFILTER_RATE}/{DEFAULT_BURST}:{DEFAULT_PREFILTER_SAMPLE})",
    )
    cluster_mode.add_flags(parser)
    add_flags(parser)


async def main(config: NodeConfig, args: argparse.Namespace) -> None:
    bpf_dir: Path = args.bpf_dir
    local_node = local_from_args(args.node_name or config.instance, args)
    acquire_or_exit(config, SERVICE)
    check_tls_files(config)
    kv = await asyncio.to_thread(cluster_mode.connect_or_exit, args, SERVICE)  # before anything changes
    ensure_bpffs(config.bpffs_root)
    worker = Worker(SERVICE)
    tagged = await worker.call(netdev.tagged_links, netdev.alias(config.instance, ""))
    # Its own pins (entry programs) or its tagged links; not the globals, which a service
    # started before the orchestrator creates when it loads.
    datapath = datapath_exists([config.service_pin_dir(SERVICE)], extra=bool(tagged))
    opened = await worker.call(open_state, config, SERVICE, datapath, False, NO_ADOPT)
    if opened.store is None:
        assert opened.held is not None
        await serve_held(SERVICE, config, worker, opened.held, names=[SERVICE_NAME])
        return
    sysctls.enable_forwarding(config)  # records the old values for teardown
    while True:
        store = opened.store
        chain = Chain(bpf_dir, config.globals_pin_dir, config.service_pin_dir(SERVICE), store)
        node_maps: BpfObject | None = None
        overlay: BpfObject | None = None
        try:
            await worker.call(chain.start)  # first: it re-pins chain maps whose pins were removed
            node_maps = await worker.call(
                load_service_object, bpf_dir / "node.o", config.globals_pin_dir, config.service_pin_dir(SERVICE), []
            )
            identities = await worker.call(
                Identities, store, Ipcache(node_maps.maps["ipcache"], node_maps.maps["ipcache_generation"])
            )
            conntrack = Conntrack(node_maps.maps["conntrack"])
            endpoints = Endpoints(config.instance, chain, store, identities)
            await worker.call(endpoints.reconcile)
            await worker.call(identities.set_hosts, await worker.call(host_addresses))
            await worker.call(identities.set_remote_nodes, await worker.call(underlay_networks, store))
            await worker.call(identities.sync_ipcache)
            devices = Devices(chain, store)
            await worker.call(devices.reconcile)
            overlay = await worker.call(
                load_service_object, bpf_dir / "overlay.o", config.globals_pin_dir, config.service_pin_dir(SERVICE), []
            )
            routing = Routing(
                config.instance,
                overlay.maps["tunnel_map"],
                dict(overlay.programs),
                local_node.routing == VXLAN,
                local_node.addresses,
                remote_nodes=overlay.maps["remote_nodes"],
            )
            nodes = NodeTable(store, local_node, routing, endpoints.all_networks)
            endpoints.address_checks.append(nodes.check_endpoint_address)
            await worker.call(nodes.reconcile)
            event_limits = EventLimits(chain.event_limits, chain.event_stats, store)
            await worker.call(event_limits.configure, dict(args.flow_event_limit))
            await worker.call(settle, store)
            break
        except DOCUMENT_ERRORS as exc:
            if opened.mode is not Mode.NORMAL:
                raise  # a fresh store that does not read back: a bug, not the operator's file
            problem = exc.problem if isinstance(exc, StoreError) else f"cannot be read back ({exc!r})"
            await worker.call(store.close)
            await worker.call(chain.close)
            if node_maps is not None:
                await worker.call(node_maps.close)
            if overlay is not None:
                await worker.call(overlay.close)
            opened = await worker.call(decide, config, SERVICE, problem, True, False, NO_ADOPT)
            if opened.store is None:
                assert opened.held is not None
                await serve_held(SERVICE, config, worker, opened.held, names=[SERVICE_NAME])
                return

    def node_addresses_changed(_kind: str, _record: NodeRecord) -> None:
        identities.set_remote_nodes(nodes.underlay_networks())

    nodes.on_change(node_addresses_changed)  # on the worker thread, as every NodeTable change
    rule_names = RuleNames(config.globals_pin_dir)
    flows = Flows(args.flow_buffer, rule_names)
    flows.start(asyncio.get_running_loop())
    endpoints.on_change(flows.endpoint_changed)
    identities.on_change(flows.identities_changed)
    await worker.call(lambda: flows.seed(endpoints.all(), identities.snapshot()))
    events = EventHub(chain.events, flows.add)
    events.start(asyncio.get_running_loop())
    l7_flows = L7Follower(config.socket_path("l7"), flows.add, flows.endpoint_id)
    l7_flows.start()
    cluster = None
    if kv is not None:
        sink = cluster_mode.IdentitiesSink(worker, identities)
        cluster = cluster_mode.Cluster(
            kv, clusternodes.published(local_node), sink, args.kvstore_lease_seconds, args.kvstore_identity_gc_seconds
        )
        clusternodes.link(cluster, nodes, worker)
        identities.use_cluster(cluster.allocate)
        endpoints.on_change(cluster.endpoint_changed)
        held = await worker.call(lambda: (identities.label_identities(), endpoints.all()))
        await asyncio.to_thread(cluster.start, *held)

    fill = MapFill(
        {
            "ipcache": node_maps.maps["ipcache"],
            "conntrack": node_maps.maps["conntrack"],
            "endpoints": chain.endpoints,
        }
    )
    metrics: MetricsServer | None = None
    if args.metrics_listen is not None:
        rpcs = ServiceRpcs(config.run_dir, config.instance, SERVICE)
        collector = NodeCollector(chain, event_limits, flows, fill, config.socket_path, rpcs, events.wait_caught_up)
        metrics = MetricsServer(collector)
        port = metrics.start(*args.metrics_listen)
        log.info("metrics served", address=args.metrics_listen[0], port=port)

    readiness = Readiness()

    async def collect_conntrack() -> None:
        expired = await worker.call(conntrack.collect)
        if expired:
            log.info("conntrack collected", expired=expired)

    async def follow_host_addresses() -> None:
        await worker.call(lambda: identities.set_hosts(host_addresses()))

    loops = [
        Periodic(Every("conntrack-gc", args.ct_gc_seconds, collect_conntrack), readiness).start(),
        Periodic(Every("host-addresses", args.host_seconds, follow_host_addresses), readiness).start(),
    ]

    def register(server: grpc.aio.Server) -> Sequence[str]:
        servicer = OrchestratorServicer(
            worker,
            chain,
            endpoints,
            devices,
            events,
            identities,
            conntrack,
            flows,
            nodes,
            event_limits,
            fill,
            cluster=cluster,
        )
        pb_grpc.add_OrchestratorServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    async def on_stop() -> None:
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
        for loop in loops:
            await loop.stop()
        events.stop()
        if metrics is not None:
            metrics.stop()
        rule_names.close()
        await l7_flows.stop()
        await worker.call(store.close)
        await worker.call(chain.close)
        await worker.call(node_maps.close)
        await worker.call(overlay.close)
        worker.shutdown()

    log.info("orchestrator ready", instance=config.instance, bpffs=str(config.bpffs_root))
    await serve(SERVICE, config, register, on_stop, readiness)


if __name__ == "__main__":
    node, args = NodeConfig.from_args(None, SERVICE, _flags)
    setup_logging(SERVICE, node.log_level)
    asyncio.run(main(node, args))
