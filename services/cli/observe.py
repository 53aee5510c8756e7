"""`weir observe` (the orchestrator's flow events) and `weir metrics` (its counters).

The orchestrator streams drop and verdict events as they happen (`WatchEvents`) and keeps
no history, so ``observe`` shows what happens while it listens: with ``--follow`` until
Ctrl-C, otherwise for ``--duration`` seconds; ``--last N`` stops after N matching events.
Each event gets a verdict as Hubble names them: DROPPED (a drop event), AUDIT (a policy
verdict let through in audit mode), FORWARDED (any other verdict).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field

import click
from weir.common.v1 import common_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as pb

from services.cli.client import current
from services.cli.output import Column, emit, emit_line, output_option, pick, table, to_dict, wants_json

VERDICTS = ("DROPPED", "AUDIT", "FORWARDED")
PROTOCOLS = ("TCP", "UDP", "ICMP", "ICMPv6", "SCTP")


def verdict(event: pb.Event) -> str:
    if event.type == "DROP":
        return "DROPPED"
    return "AUDIT" if event.reason == "POLICY_AUDIT" else "FORWARDED"


@dataclass
class Filter:
    """What an event must match: every given criterion (each one any of its values)."""

    verdicts: set[str] = field(default_factory=set)
    reasons: set[str] = field(default_factory=set)
    protocols: set[str] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)
    endpoint_ids: set[int] = field(default_factory=set)
    endpoint_addresses: set[str] = field(default_factory=set)

    def match(self, event: pb.Event) -> bool:
        if self.verdicts and verdict(event) not in self.verdicts:
            return False
        if self.reasons and event.reason not in self.reasons:
            return False
        if self.protocols and event.protocol.upper() not in self.protocols:
            return False
        if self.ports and not {event.src_port, event.dst_port} & self.ports:
            return False
        if self.endpoint_ids or self.endpoint_addresses:
            on_endpoint = event.endpoint_id in self.endpoint_ids
            to_or_from = {event.src, event.dst} & self.endpoint_addresses
            if not on_endpoint and not to_or_from:
                return False
        return True


def _address(host: str, port: int) -> str:
    if not host:
        return "?"
    shown = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    return f"{shown}:{port}" if port else shown


def line(event: pb.Event, seen: datetime.datetime) -> str:
    """One event for people, in the order Hubble prints a flow."""
    hook = common_pb2.Hook.Name(event.hook) if event.hook in common_pb2.Hook.values() else str(event.hook)
    return (
        f"{seen.strftime('%b %d %H:%M:%S.%f')[:-3]}: {_address(event.src, event.src_port)} -> "
        f"{_address(event.dst, event.dst_port)} {event.protocol or '-'} {verdict(event)} "
        f"({event.reason}) {hook.removeprefix('HOOK_').lower()} endpoint={event.endpoint_id} "
        f"identity={event.src_identity}->{event.dst_identity} len={event.length}"
    )


@click.command()
@click.option("--verdict", "verdicts", multiple=True, type=click.Choice(VERDICTS, case_sensitive=False))
@click.option("--reason", "reasons", multiple=True, help="drop reason, e.g. POLICY_DENIED (repeat for more)")
@click.option("--endpoint", "endpoints", multiple=True, help="endpoint name: events on it, from it or to it")
@click.option("--protocol", "protocols", multiple=True, type=click.Choice(PROTOCOLS, case_sensitive=False))
@click.option("--port", "ports", multiple=True, type=click.IntRange(0, 65535), help="source or destination port")
@click.option("-f", "--follow", is_flag=True, help="keep listening until Ctrl-C")
@click.option("--last", type=click.IntRange(min=1), default=None, help="stop after N matching events")
@click.option(
    "--duration",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="seconds to listen without --follow",
)
@output_option
def observe(
    verdicts: tuple[str, ...],
    reasons: tuple[str, ...],
    endpoints: tuple[str, ...],
    protocols: tuple[str, ...],
    ports: tuple[int, ...],
    follow: bool,
    last: int | None,
    duration: float,
) -> None:
    """Flow events (drops with their reason, policy verdicts) as the datapath reports them."""
    node = current()
    flt = Filter(
        verdicts={v.upper() for v in verdicts},
        reasons={r.upper() for r in reasons},
        protocols={p.upper() for p in protocols},
        ports=set(ports),
    )
    for name in endpoints:
        ep = node.call("orchestrator", "GetEndpoint", pb.GetEndpointRequest(name=name))
        flt.endpoint_ids.add(ep.id)
        flt.endpoint_addresses.update(a for a in (ep.ipv4, ep.ipv6) if a)
    stub = node.stub("orchestrator")
    types = ["DROP"] if flt.verdicts == {"DROPPED"} else []
    stream = stub.WatchEvents(pb.WatchEventsRequest(types=types), timeout=None if follow else duration)
    shown = 0
    as_json = wants_json()
    try:
        with node.streaming("orchestrator"):
            for event in stream:
                if not flt.match(event):
                    continue
                seen = datetime.datetime.now(datetime.UTC)
                if as_json:
                    emit_line({**to_dict(event), "verdict": verdict(event), "time": seen.isoformat()})
                else:
                    click.echo(line(event, seen.astimezone()))
                shown += 1
                if last is not None and shown >= last:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        stream.cancel()
    if not shown and not follow and not as_json:
        click.echo(f"no matching events in {duration:g}s (the orchestrator keeps no history; --follow waits)", err=True)


@click.command()
@output_option
def metrics() -> None:
    """Packets per hook entry and per (reason, direction): the datapath's counters."""
    reply = to_dict(current().call("orchestrator", "GetMetrics", pb.GetMetricsRequest()))
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
        empty="no counters yet",
    )
