"""`weir service list|get|upsert|delete`: the load balancer's services (VIPs and node ports)."""

from __future__ import annotations

import json
from typing import Any

import click
from google.protobuf.json_format import ParseDict, ParseError
from weir.lb.v1 import lb_pb2 as pb

from services.cli.client import current, page, paged
from services.cli.output import Column, emit, output_option, pick, table, to_dict

COLUMNS = [
    Column("NAME", pick("name")),
    Column("ID", pick("id"), "right"),
    Column("KIND", lambda r: str(r.get("kind", "")).removeprefix("KIND_")),
    Column("FRONTENDS", pick("frontends")),
    Column("PROTO", pick("protocol")),
    Column("ALGORITHM", lambda r: str(r.get("algorithm", "")).removeprefix("ALGORITHM_")),
    Column("BACKENDS", lambda r: [_backend(b) for b in r.get("backends", [])]),
]


def _backend(b: dict[str, Any]) -> str:
    state = str(b.get("state", "")).removeprefix("BACKEND_STATE_")
    flags = "" if state in ("ACTIVE", "UNSPECIFIED") else f" {state.lower()}"
    flags += "" if b.get("healthy", True) else " unhealthy"
    return f"{b['address']}:{b['port']}{flags}"


def parse_backend(text: str) -> pb.Backend:
    """``ADDR:PORT`` or ``ADDR:PORT@WEIGHT``; the service checks the address itself."""
    spec, _, weight = text.partition("@")
    address, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or (weight and not weight.lstrip("-").isdigit()):
        raise click.BadParameter(f"{text!r} is not ADDR:PORT[@WEIGHT]", param_hint="--backend")
    backend = pb.Backend(address=address, port=int(port))
    if weight:
        backend.weight = int(weight)
    return backend


@click.group()
def service() -> None:
    """Load-balanced services: a frontend and its backends."""


@service.command("list")
@output_option
def list_() -> None:
    """Every service."""
    node = current()
    items = paged(lambda t: node.call("lb", "ListServices", pb.ListServicesRequest(page=page(t))), "services")
    rows = [to_dict(s) for s in items]
    emit(rows, table(None, COLUMNS, rows), empty="no services")


@service.command()
@click.argument("name")
@output_option
def get(name: str) -> None:
    """One service by name."""
    row = to_dict(current().call("lb", "GetService", pb.GetServiceRequest(name=name)))
    emit(row, table(None, COLUMNS, [row]))


@service.command()
@click.argument("name", required=False)
@click.option("-f", "--file", "path", type=click.File("r"), help="a Service message as JSON (lb.proto field names)")
@click.option("--address", default="", help="cluster IP (not for node ports)")
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="frontend port")
@click.option("--protocol", default="TCP", show_default=True, help="TCP or UDP")
@click.option("--kind", type=click.Choice(["cluster-ip", "node-port"]), default="cluster-ip", show_default=True)
@click.option("--algorithm", type=click.Choice(["hash", "maglev"]), default="hash", show_default=True)
@click.option("-b", "--backend", "backends", multiple=True, metavar="ADDR:PORT[@WEIGHT]", help="repeat for more")
@click.option("--affinity-timeout", type=click.IntRange(0), default=0, help="session affinity seconds (0: off)")
@output_option
def upsert(
    name: str | None,
    path: Any,
    address: str,
    port: int,
    protocol: str,
    kind: str,
    algorithm: str,
    backends: tuple[str, ...],
    affinity_timeout: int,
) -> None:
    """Create or replace a service with all its backends in one change."""
    if path is not None:
        try:
            message = ParseDict(json.load(path), pb.Service())
        except (ValueError, ParseError) as exc:
            raise click.BadParameter(str(exc), param_hint="--file") from None
        if name:
            message.name = name
    elif not name:
        raise click.UsageError("give NAME (with --address/--port/--backend) or --file")
    else:
        message = pb.Service(
            name=name,
            address=address,
            port=port,
            protocol=protocol,
            kind=pb.KIND_NODE_PORT if kind == "node-port" else pb.KIND_CLUSTER_IP,
            algorithm=pb.ALGORITHM_MAGLEV if algorithm == "maglev" else pb.ALGORITHM_HASH,
            backends=[parse_backend(b) for b in backends],
            affinity_timeout_seconds=affinity_timeout,
        )
    row = to_dict(current().call("lb", "UpsertService", pb.UpsertServiceRequest(service=message)))
    emit(row, table(None, COLUMNS, [row]))


@service.command()
@click.argument("names", nargs=-1, required=True)
@output_option
def delete(names: tuple[str, ...]) -> None:
    """Delete services by name."""
    node = current()
    for name in names:
        node.call("lb", "DeleteService", pb.DeleteServiceRequest(name=name))
    emit({"deleted": list(names)}, table(None, [Column("DELETED", pick("name"))], [{"name": n} for n in names]))
