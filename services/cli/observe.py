"""`weir observe` (the orchestrator's flows) and `weir metrics` (its counters).

The orchestrator keeps the newest flows (verdicts and drops with their reason and rule, LB
translations with their backend, socket acceleration, L7 requests, each with its endpoints)
in a bounded buffer and serves them with `GetFlows`. ``observe`` prints the buffered flows
that match (``--last N``: the newest N; ``--since``: those since a time) and exits;
``--follow`` then keeps printing new ones until Ctrl-C, ``--duration`` for that many
seconds. ``--count N`` stops after N flows. Flows the stream could not deliver (evicted from
the buffer, or dropped while it fell behind) are said on stderr, never skipped silently, and
so are the datapath's events its rate limits held back or its ring buffer had no room for.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from typing import Any

import click
import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from rich.table import Table
from weir.common.v1 import common_pb2, telemetry_pb2, telemetry_pb2_grpc
from weir.orchestrator.v1 import orchestrator_pb2 as pb

from services.cli.client import CONNECT_TIMEOUT, CliFailure, current
from services.cli.output import Column, emit, emit_line, output_option, pick, table, to_dict, wants_json

VERDICTS = ("DROPPED", "AUDIT", "FORWARDED", "TRANSLATED", "ACCELERATED", "REDIRECTED")
PROTOCOLS = ("TCP", "UDP", "ICMP", "ICMPv6", "SCTP")
RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_LAST = 65536


def parse_since(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Timestamp | None:
    """An RFC 3339 time (UTC unless it says) or a time ago: 30s, 5m, 2h, 1d."""
    if value is None:
        return None
    now = datetime.datetime.now(datetime.UTC)
    if match := RELATIVE.match(value):
        when = now - datetime.timedelta(seconds=float(match[1]) * UNIT_SECONDS[match[2]])
    else:
        try:
            when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is neither a time (2026-01-02T15:04:05Z) nor an age (30s, 5m, 2h)"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def check_ip(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    for text in value:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise click.BadParameter(f"{text!r} is not an address or a CIDR") from None
    return value


def _address(host: str, port: int) -> str:
    if not host:
        return "?"
    shown = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    return f"{shown}:{port}" if port else shown


def line(flow: pb.Flow) -> str:
    """One flow for people, in the order Hubble prints one."""
    seen = flow.time.ToDatetime(tzinfo=datetime.UTC).astimezone()
    hook = common_pb2.Hook.Name(flow.hook) if flow.hook in common_pb2.Hook.values() else str(flow.hook)
    names = "".join(
        f" {side}={peer.endpoint}" for side, peer in (("from", flow.source), ("to", flow.destination)) if peer.endpoint
    )
    if flow.type == "L7":
        l7 = flow.l7
        rule = f" rule={l7.rule}" if l7.rule else ""
        return (
            f"{seen.strftime('%b %d %H:%M:%S.%f')[:-3]}: {_address(flow.src, flow.src_port)} -> "
            f"{_address(flow.dst, flow.dst_port)} http-request {flow.verdict} "
            f"{l7.method} {l7.host}{l7.path} {l7.status}{rule}{names}"
        )
    extra = f" rule={flow.rule}" if flow.rule else ""
    if flow.translated_address:
        extra += f" backend={_address(flow.translated_address, flow.translated_port)}"
    return (
        f"{seen.strftime('%b %d %H:%M:%S.%f')[:-3]}: {_address(flow.src, flow.src_port)} -> "
        f"{_address(flow.dst, flow.dst_port)} {flow.protocol or '-'} {flow.verdict} "
        f"({flow.reason}){extra} {hook.removeprefix('HOOK_').lower()} endpoint={flow.endpoint_id} "
        f"identity={flow.src_identity}->{flow.dst_identity} len={flow.length}{names}"
    )


def say_lost(lost: pb.FlowLoss) -> None:
    if lost.evicted:
        click.echo(f"{lost.evicted} older flows were evicted from the orchestrator's buffer", err=True)
    if lost.dropped:
        click.echo(f"{lost.dropped} flows dropped: this stream fell behind", err=True)
    if lost.rate_limited:
        click.echo(f"{lost.rate_limited} datapath events held back by its rate limits (node-wide)", err=True)
    if lost.datapath_lost:
        click.echo(f"{lost.datapath_lost} datapath events lost: its ring buffer was full", err=True)


@click.command()
@click.option("--verdict", "verdicts", multiple=True, type=click.Choice(VERDICTS, case_sensitive=False))
@click.option("--reason", "reasons", multiple=True, help="drop reason, e.g. POLICY_DENIED (repeat for more)")
@click.option("--rule", "rules", multiple=True, help="policy rule name (namespace/name): the rule behind the flow")
@click.option("--endpoint", "endpoints", multiple=True, help="endpoint name: flows from it or to it")
@click.option("--label", "labels", multiple=True, help="k=v label of the source or destination")
@click.option("--ip", "ips", multiple=True, callback=check_ip, help="source or destination address or CIDR")
@click.option("--protocol", "protocols", multiple=True, type=click.Choice(PROTOCOLS, case_sensitive=False))
@click.option("--port", "ports", multiple=True, type=click.IntRange(1, 65535), help="source or destination port")
@click.option("-f", "--follow", is_flag=True, help="after the buffered flows, keep printing new ones until Ctrl-C")
@click.option("--last", type=click.IntRange(1, MAX_LAST), default=None, help="the newest N matching buffered flows")
@click.option("--since", callback=parse_since, help="flows since a time (RFC 3339) or an age (30s, 5m, 2h)")
@click.option("--count", type=click.IntRange(min=1), default=None, help="stop after N flows")
@click.option("--duration", type=click.FloatRange(min=0.1), default=None, help="follow new flows for this many seconds")
@output_option
def observe(
    verdicts: tuple[str, ...],
    reasons: tuple[str, ...],
    rules: tuple[str, ...],
    endpoints: tuple[str, ...],
    labels: tuple[str, ...],
    ips: tuple[str, ...],
    protocols: tuple[str, ...],
    ports: tuple[int, ...],
    follow: bool,
    last: int | None,
    since: Timestamp | None,
    count: int | None,
    duration: float | None,
) -> None:
    """Flows (verdicts and drops with their reason and rule, translations, socket acceleration, L7)."""
    node = current()
    streaming = follow or duration is not None
    request = pb.GetFlowsRequest(
        endpoints=endpoints,
        labels=labels,
        cidrs=ips,
        ports=ports,
        protocols=protocols,
        verdicts=verdicts,
        reasons=reasons,
        rules=rules,
        follow=streaming,
        last=last or 0,
        since=since,
    )
    stream = node.stub("orchestrator").GetFlows(request, timeout=None if follow else (duration or node.timeout))
    shown = 0
    as_json = wants_json()
    try:
        with node.streaming("orchestrator"):
            for message in stream:
                if message.HasField("lost"):
                    say_lost(message.lost)
                    continue
                if as_json:
                    emit_line(to_dict(message.flow))
                else:
                    click.echo(line(message.flow))
                shown += 1
                if count is not None and shown >= count:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        stream.cancel()
    if not shown and not streaming and not as_json:
        click.echo("no matching flows in the orchestrator's buffer (--follow waits for new ones)", err=True)


def _kinds_table(kinds: list[dict[str, Any]]) -> Table:
    return table(
        "datapath events (rate limits per CPU)",
        [
            Column("KIND", pick("kind")),
            Column("EMITTED", pick("emitted"), "right"),
            Column("RATE LIMITED", pick("rate_limited"), "right"),
            Column("SAMPLED OUT", pick("sampled_out"), "right"),
            Column("LOST", pick("lost"), "right"),
            Column("RATE/S", lambda k: "off" if k.get("off") else (k.get("rate") or "none"), "right"),
            Column("BURST", pick("burst"), "right"),
            Column("SAMPLE", pick("sample"), "right"),
        ],
        kinds,
    )


@click.command("event-limits")
@click.argument("limits", nargs=-1, metavar="[KIND=RATE[/BURST][:SAMPLE]|KIND=off]...")
@output_option
def event_limits(limits: tuple[str, ...]) -> None:
    """Show the datapath's event rate limits and counts; with arguments, change those kinds' limits now.

    RATE is events per second per CPU (0: no limit); SAMPLE N keeps one candidate event in N.
    A change is kept in the orchestrator's store and outlives its restarts, unless that kind's
    --flow-event-limit flag has changed since (the newer word wins).
    """
    node = current()
    if limits:
        reply = node.call("orchestrator", "SetEventLimits", pb.SetEventLimitsRequest(limits=limits))
    else:
        reply = node.call("orchestrator", "GetFlowStats", pb.GetFlowStatsRequest())
    kinds = [to_dict(k) for k in reply.event_kinds]
    emit({"event_kinds": kinds}, _kinds_table(kinds))


@click.command()
@output_option
def metrics() -> None:
    """Packets per hook entry and per (reason, direction), the flow buffer's and the datapath's event
    losses, and the calls each service answered by method and code."""
    node = current()
    reply = to_dict(node.call("orchestrator", "GetMetrics", pb.GetMetricsRequest()))
    reply["flows"] = to_dict(node.call("orchestrator", "GetFlowStats", pb.GetFlowStatsRequest()))
    reply["rpcs"] = _rpc_counts()
    flow_counts = {k: v for k, v in reply["flows"].items() if k != "event_kinds"}
    emit(
        reply,
        table(
            "hook entries",
            [
                Column("HOOK", pick("hook")),
                Column("PACKETS", pick("counter", "packets"), "right"),
                Column("BYTES", pick("counter", "bytes"), "right"),
            ],
            reply.get("entry", []),
        ),
        table(
            "verdicts",
            [
                Column("REASON", pick("reason")),
                Column("DIRECTION", pick("direction")),
                Column("PACKETS", pick("counter", "packets"), "right"),
                Column("BYTES", pick("counter", "bytes"), "right"),
            ],
            reply.get("reasons", []),
        ),
        table(
            "flows",
            [Column(name.upper().replace("_", " "), pick(name), "right") for name in flow_counts],
            [flow_counts],
        ),
        _kinds_table(reply["flows"].get("event_kinds", [])),
        table(
            "rpcs",
            [
                Column("SERVICE", pick("service")),
                Column("METHOD", lambda r: str(r["method"]).rpartition("/")[2]),
                Column("CODE", pick("code")),
                Column("CALLS", pick("count"), "right"),
            ],
            reply["rpcs"],
        ),
        empty="no counters yet",
    )


def _rpc_counts() -> list[dict[str, Any]]:
    """Every service's answered calls (weir.common.v1.Telemetry); a service that does not answer is left out."""
    node = current()
    rows: list[dict[str, Any]] = []
    for service in node.services_found():
        try:
            stub = telemetry_pb2_grpc.TelemetryStub(node.channel(service))
            reply = stub.GetRpcCounts(telemetry_pb2.GetRpcCountsRequest(), timeout=CONNECT_TIMEOUT)
        except (CliFailure, grpc.RpcError):
            continue
        rows += [{"service": service, "method": c.method, "code": c.code, "count": c.count} for c in reply.counts]
    return rows
