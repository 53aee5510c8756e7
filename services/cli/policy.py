"""`weir policy import|get|list|delete|trace|endpoint`: the policy service's rules and verdicts."""

from __future__ import annotations

import ipaddress
from typing import Any

import click
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.policy.v1 import policy_pb2 as pb

from services.cli.client import Node, current, page, paged
from services.cli.output import Column, emit, output_option, pick, table, to_dict, wants_json

RULE_COLUMNS = [
    Column("NAME", pick("name")),
    Column("NAMESPACE", pick("namespace")),
    Column("SELECTOR", pick("endpoint_selector", "match_labels")),
    Column("INGRESS", lambda r: len(r.get("ingress", []))),
    Column("EGRESS", lambda r: len(r.get("egress", []))),
    Column("DENY", lambda r: len(r.get("ingress_deny", [])) + len(r.get("egress_deny", []))),
    Column("DESCRIPTION", pick("description")),
]
MAX_DOCUMENT = 16 << 20  # read no more than this; the service refuses documents over its own limit


@click.group()
def policy() -> None:
    """L3/L4 rules in the shape of CiliumNetworkPolicy."""


@policy.command("import")
@click.option("-f", "--file", "path", type=click.File("r"), required=True, help="YAML or JSON document ('-': stdin)")
@output_option
def import_(path: Any) -> None:
    """Import a CiliumNetworkPolicy-style document (all rules or none)."""
    document = path.read(MAX_DOCUMENT + 1)
    if len(document) > MAX_DOCUMENT:
        raise click.BadParameter(f"over {MAX_DOCUMENT} characters", param_hint="--file")
    reply = current().call("policy", "ImportRules", pb.ImportRulesRequest(document=document))
    row = to_dict(reply)
    emit(row, table(None, [Column("REVISION", pick("revision")), Column("ENDPOINTS", pick("endpoints"))], [row]))


@policy.command("list")
@output_option
def list_() -> None:
    """Every rule."""
    node = current()
    rules = paged(lambda t: node.call("policy", "ListRules", pb.ListRulesRequest(page=page(t))), "rules")
    rows = [to_dict(r) for r in rules]
    emit(rows, table(None, RULE_COLUMNS, rows), empty="no rules")


@policy.command()
@click.argument("name")
@output_option
def get(name: str) -> None:
    """One rule by name (JSON shows all of it)."""
    row = to_dict(current().call("policy", "GetRule", pb.GetRuleRequest(name=name)))
    emit(row, table(None, RULE_COLUMNS, [row]))


@policy.command()
@click.argument("names", nargs=-1, required=True)
@output_option
def delete(names: tuple[str, ...]) -> None:
    """Delete rules by name (all or none)."""
    row = to_dict(current().call("policy", "DeleteRules", pb.DeleteRulesRequest(names=list(names))))
    emit(row, table(None, [Column("REVISION", pick("revision")), Column("ENDPOINTS", pick("endpoints"))], [row]))


def _address(node: Node, text: str) -> str:
    """An address as given, or the address of the endpoint so named (IPv4 first)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        ep = node.call("orchestrator", "GetEndpoint", orch_pb.GetEndpointRequest(name=text))
        return str(ep.ipv4 or ep.ipv6)
    return text


@policy.command()
@click.option("--src", "source", required=True, help="source endpoint name or address")
@click.option("--dst", "destination", required=True, help="destination endpoint name or address")
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="destination port")
@click.option("--protocol", default="TCP", show_default=True, help="TCP, UDP, SCTP, ICMP, ICMPv6")
@click.option("--connection", default="", help="new (default), established, reply or related")
@output_option
def trace(source: str, destination: str, port: int, protocol: str, connection: str) -> None:
    """The verdict for a flow and the rules that decided it."""
    node = current()
    request = pb.TraceRequest(
        source=_address(node, source),
        destination=_address(node, destination),
        port=port,
        protocol=protocol,
        connection=connection,
    )
    row = to_dict(node.call("policy", "Trace", request))
    if not wants_json():
        click.echo(f"verdict: {row['verdict']} (allowed: {'yes' if row['allowed'] else 'no'}, path: {row['path']})")
        for step in row.get("steps", []):
            click.echo(f"  {step}")
        if row.get("deciding_rules"):
            click.echo(f"rules: {', '.join(row['deciding_rules'])}")
        return
    emit(row)


@policy.command("endpoint")
@click.argument("name")
@output_option
def endpoint_policy(name: str) -> None:
    """An endpoint's computed policy map (as `cilium bpf policy get`)."""
    row = to_dict(current().call("policy", "GetEndpointPolicy", pb.GetEndpointPolicyRequest(endpoint=name)))
    entries = row.get("entries", [])
    emit(
        row,
        table(
            f"{row['endpoint']} (id {row['endpoint_id']}, identity {row['identity']}, ingress enforced: "
            f"{row['ingress_enforced']}, egress enforced: {row['egress_enforced']}, audit: {row['audit']})",
            [
                Column("DIRECTION", pick("direction")),
                Column("IDENTITY", pick("identity"), "right"),
                Column("PROTO", pick("protocol"), "right"),
                Column("PORT", pick("port"), "right"),
                Column("DENY", pick("deny")),
                Column("PACKETS", pick("hits", "packets"), "right"),
                Column("RULES", pick("rules")),
            ],
            entries,
        ),
        empty=f"{name}: no policy entries",
    )
