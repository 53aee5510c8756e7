"""`weir endpoint list|get|create|delete`: the orchestrator's endpoints."""

from __future__ import annotations

from typing import Any

import click
from weir.orchestrator.v1 import orchestrator_pb2 as pb

from services.cli.client import Node, current, page, paged
from services.cli.output import Column, emit, output_option, pick, table, to_dict

COLUMNS = [
    Column("NAME", pick("name")),
    Column("ID", pick("id"), "right"),
    Column("IDENTITY", pick("identity"), "right"),
    Column("IPV4", pick("ipv4")),
    Column("IPV6", pick("ipv6")),
    Column("LABELS", pick("labels")),
    Column("INTERFACE", pick("host_ifname")),
    Column("PENDING", pick("policy_pending")),
]


def labels_option(values: tuple[str, ...]) -> dict[str, str]:
    """``k=v`` pairs from repeated ``--label``; a pair without ``=`` is a usage error."""
    labels: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--label")
        labels[key] = value
    return labels


def named_ports_option(values: tuple[str, ...]) -> list[pb.NamedPort]:
    """``name=port[/protocol]`` from repeated ``--named-port``; the orchestrator checks the values."""
    ports = []
    for item in values:
        name, sep, rest = item.partition("=")
        number, _, protocol = rest.partition("/")
        if not sep or not name or not number.isdigit():
            raise click.BadParameter(f"{item!r} is not NAME=PORT[/PROTOCOL]", param_hint="--named-port")
        ports.append(pb.NamedPort(name=name, port=int(number), protocol=protocol.upper()))
    return ports


def _show(endpoints: list[dict[str, Any]], document: Any) -> None:
    emit(document, table(None, COLUMNS, endpoints), empty="no endpoints")


@click.group()
def endpoint() -> None:
    """Endpoints: a network namespace and veth (or an adopted interface) with labels and an identity."""


@endpoint.command("list")
@output_option
def list_() -> None:
    """Every endpoint of the node."""
    rows = [to_dict(e) for e in _all(current())]
    _show(rows, rows)


def _all(node: Node) -> list[Any]:
    return paged(
        lambda token: node.call("orchestrator", "ListEndpoints", pb.ListEndpointsRequest(page=page(token))),
        "endpoints",
    )


@endpoint.command()
@click.argument("name")
@output_option
def get(name: str) -> None:
    """One endpoint by name."""
    row = to_dict(current().call("orchestrator", "GetEndpoint", pb.GetEndpointRequest(name=name)))
    _show([row], row)


@endpoint.command()
@click.argument("name")
@click.option("--ipv4", default="", help="the endpoint's IPv4 address")
@click.option("--ipv6", default="", help="the endpoint's IPv6 address")
@click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE", help="a label (repeat for more)")
@click.option("--namespace", default="", help='its namespace, as a pod\'s (default: "default")')
@click.option("--named-port", "named_ports", multiple=True, metavar="NAME=PORT[/PROTO]", help="a named port (repeat)")
@click.option("--adopt-interface", default="", help="adopt this existing host-side interface instead")
@click.option("--policy-wait-ms", type=click.IntRange(0, 60000), default=0, help="wait this long for its policy")
@output_option
def create(
    name: str,
    ipv4: str,
    ipv6: str,
    labels: tuple[str, ...],
    namespace: str,
    named_ports: tuple[str, ...],
    adopt_interface: str,
    policy_wait_ms: int,
) -> None:
    """Create an endpoint (its namespace, veth, addresses, routes; traffic waits for its policy)."""
    request = pb.CreateEndpointRequest(
        name=name,
        ipv4=ipv4,
        ipv6=ipv6,
        labels=labels_option(labels),
        namespace=namespace,
        named_ports=named_ports_option(named_ports),
        adopt_interface=adopt_interface,
        policy_wait_ms=policy_wait_ms,
    )
    row = to_dict(current().call("orchestrator", "CreateEndpoint", request))
    _show([row], row)


@endpoint.command()
@click.argument("names", nargs=-1, required=True)
@output_option
def delete(names: tuple[str, ...]) -> None:
    """Delete endpoints by name (everything CreateEndpoint made)."""
    node = current()
    for name in names:
        node.call("orchestrator", "DeleteEndpoint", pb.DeleteEndpointRequest(name=name))
    emit({"deleted": list(names)}, table(None, [Column("DELETED", pick("name"))], [{"name": n} for n in names]))
