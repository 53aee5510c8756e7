"""Cluster mode's node records into the node table, and the local node out to etcd.

The cluster's watcher (its own thread) hears of every other node's record; each goes to
`NodeTable.upsert`/`delete` on the orchestrator's worker thread, as an UpsertNode call
would, so the same checks apply (a record that overlaps another node's CIDR is logged and
left out, never half-applied). A record without a node id is a node that runs without
routing flags: it is seen in GetClusterStatus but given no routes.
"""

from __future__ import annotations

import contextlib

import structlog

from services.common.errors import WeirError
from services.common.worker import Worker
from services.orchestrator import cluster as cluster_mode
from services.orchestrator.nodes import NodeRecord, NodeTable, parse_record

log = structlog.get_logger("weir.clusternodes")


def published(local: NodeRecord) -> cluster_mode.NodeRecord:
    """What this node publishes about itself: never a key, only its index."""
    return cluster_mode.NodeRecord(
        name=local.name,
        node_id=local.node_id,
        addresses=local.addresses,
        cidrs=local.cidrs,
        routing=local.routing,
        key_index=local.key_index,
    )


def link(cluster: cluster_mode.Cluster, table: NodeTable, worker: Worker) -> None:
    """Follow the cluster's nodes into `table` (call before `cluster.start`)."""

    def upsert(seen: cluster_mode.NodeRecord) -> None:
        if not seen.node_id:
            return
        try:
            record = parse_record(seen.name, seen.node_id, seen.addresses, seen.cidrs, seen.routing or "direct",
                                  seen.key_index)  # fmt: skip
            worker.run(table.upsert, record)
        except WeirError as exc:
            log.warning("cluster node left out", node=seen.name, reason=str(exc))

    def delete(name: str) -> None:
        with contextlib.suppress(WeirError):  # never had routes here (refused, or no node id)
            worker.run(table.delete, name)

    cluster.on_node(upsert, delete)
