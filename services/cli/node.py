"""`weir node list|get|local|upsert|delete`: the remote nodes the orchestrator routes to."""

from __future__ import annotations

from typing import Any

import click
from weir.orchestrator.v1 import orchestrator_pb2 as pb

from services.cli.client import current, page, paged
from services.cli.output import Column, emit, output_option, pick, table, to_dict

COLUMNS = [
    Column("NAME", pick("name")),
    Column("ID", pick("node_id"), "right"),
    Column("ADDRESSES", pick("addresses")),
    Column("CIDRS", pick("cidrs")),
    Column("ROUTING", pick("routing")),
    Column("KEY", pick("key_index"), "right"),
]
ROUTING = {"direct": pb.ROUTING_MODE_DIRECT, "vxlan": pb.ROUTING_MODE_VXLAN}


def _show(nodes: list[dict[str, Any]], document: Any) -> None:
    emit(document, table(None, COLUMNS, nodes), empty="no remote nodes")


@click.group()
def node() -> None:
    """Remote nodes: their underlay addresses, endpoint CIDRs and routing (direct or VXLAN)."""


@node.command("list")
@output_option
def list_() -> None:
    """Every remote node this node knows."""
    n = current()
    rows = [
        to_dict(x)
        for x in paged(
            lambda token: n.call("orchestrator", "ListNodes", pb.ListNodesRequest(page=page(token))), "nodes"
        )
    ]
    _show(rows, rows)


@node.command()
@click.argument("name")
@output_option
def get(name: str) -> None:
    """One remote node by name."""
    row = to_dict(current().call("orchestrator", "GetNode", pb.GetNodeRequest(name=name)))
    _show([row], row)


@node.command()
@output_option
def local() -> None:
    """This node's own record (from the orchestrator's --node-* flags)."""
    row = to_dict(current().call("orchestrator", "GetLocalNode", pb.GetLocalNodeRequest()))
    _show([row], row)


@node.command()
@click.argument("name")
@click.option("--id", "node_id", type=int, required=True, help="the node's id, 1-65535")
@click.option("--address", "addresses", multiple=True, required=True, help="an underlay address (one per family)")
@click.option("--cidr", "cidrs", multiple=True, help="an endpoint CIDR the node owns (repeat for more)")
@click.option("--routing", type=click.Choice(sorted(ROUTING)), default="direct", show_default=True)
@click.option("--key-index", type=int, default=0, show_default=True, help="its encryption key index, 0-15")
@output_option
def upsert(
    name: str, node_id: int, addresses: tuple[str, ...], cidrs: tuple[str, ...], routing: str, key_index: int
) -> None:
    """Add or replace a remote node and route its CIDRs."""
    record = pb.Node(
        name=name,
        node_id=node_id,
        addresses=list(addresses),
        cidrs=list(cidrs),
        routing=ROUTING[routing],
        key_index=key_index,
    )
    row = to_dict(current().call("orchestrator", "UpsertNode", pb.UpsertNodeRequest(node=record)))
    _show([row], row)


@node.command()
@click.argument("names", nargs=-1, required=True)
@output_option
def delete(names: tuple[str, ...]) -> None:
    """Forget remote nodes and remove their routes."""
    n = current()
    for name in names:
        n.call("orchestrator", "DeleteNode", pb.DeleteNodeRequest(name=name))
    emit({"deleted": list(names)}, table(None, [Column("DELETED", pick("name"))], [{"name": x} for x in names]))
