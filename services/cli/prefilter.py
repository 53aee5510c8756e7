"""`weir prefilter list|add|replace|delete|counters|attach|detach|valid-destinations`: the XDP deny list.

``add -f FILE`` reads one CIDR a line (``#`` comments and blank lines skipped) and sends
them in chunks with a progress bar on stderr: each chunk is one all-or-nothing change, so
a refused chunk stops the import with the earlier chunks in place (the message says how
far it got; a repeated import skips what is already there). ``replace -f FILE`` swaps the
whole list in one call, sending hosts in the packed form (4 or 16 bytes each, nothing to
parse per entry on the service), which is how a million-entry list loads in seconds.
"""

from __future__ import annotations

import socket
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from weir.prefilter.v1 import prefilter_pb2 as pb

from services.cli.client import CliFailure, current, page, paged
from services.cli.output import Column, console, emit, output_option, pick, table, to_dict

CHUNK = 2000


def _mode(audit: bool) -> pb.Mode.ValueType:
    return pb.MODE_AUDIT if audit else pb.MODE_DENY


def read_cidrs(handle: Any) -> list[str]:
    """CIDRs of a file, one a line; comments and blank lines skipped."""
    cidrs = []
    for line in handle:
        text = line.split("#", 1)[0].strip()
        if text:
            cidrs.append(text)
    return cidrs


def _emit_change(entries: int, changed: int, revision: int) -> None:
    """What a bulk change did: entries sent, entries changed, the list's new revision."""
    row = {"revision": str(revision), "changed": changed, "entries": entries}
    columns = [
        Column("ENTRIES", pick("entries"), "right"),
        Column("CHANGED", pick("changed"), "right"),
        Column("REVISION", pick("revision"), "right"),
    ]
    emit(row, table(None, columns, [row]))


@click.group()
def prefilter() -> None:
    """Source CIDRs dropped (or audited) at XDP before the stack sees them."""


@prefilter.command("list")
@output_option
def list_() -> None:
    """Every entry, with the list's revision."""
    node = current()
    pages: list[Any] = []

    def fetch(token: str) -> Any:
        reply = node.call("prefilter", "ListEntries", pb.ListEntriesRequest(page=page(token)))
        pages.append(reply)
        return reply

    rows = [to_dict(e) for e in paged(fetch, "entries")]
    revision = pages[-1].revision if pages else 0
    emit(
        {"revision": str(revision), "entries": rows},
        table(f"revision {revision}", [Column("CIDR", pick("cidr")), Column("MODE", pick("mode"))], rows),
        empty=f"no entries (revision {revision})",
    )


@prefilter.command()
@click.argument("cidrs", nargs=-1)
@click.option("-f", "--file", "path", type=click.File("r"), help="one CIDR a line ('-': stdin)")
@click.option("--audit", is_flag=True, help="count and pass instead of drop")
@click.option("--chunk", type=click.IntRange(1, 100000), default=CHUNK, show_default=True, help="entries per call")
@output_option
def add(cidrs: tuple[str, ...], path: Any, audit: bool, chunk: int) -> None:
    """Deny (or audit) source CIDRs; entries already there are left as they are."""
    wanted = [*cidrs, *(read_cidrs(path) if path is not None else [])]
    if not wanted:
        raise click.UsageError("give CIDRs or --file")
    node = current()
    changed, revision = 0, 0
    with Progress(
        TextColumn("prefilter add"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=False,
        disable=len(wanted) <= chunk,
    ) as progress:
        task = progress.add_task("add", total=len(wanted))
        for start in range(0, len(wanted), chunk):
            part = wanted[start : start + chunk]
            request = pb.AddEntriesRequest(entries=[pb.Entry(cidr=c, mode=_mode(audit)) for c in part])
            try:
                reply = node.call("prefilter", "AddEntries", request)
            except CliFailure as exc:
                if not start:
                    raise
                where = f"entries {start + 1}-{start + len(part)}; the first {start} are in place"
                raise CliFailure(f"{exc.message} ({where})") from None
            changed += reply.changed
            revision = reply.revision
            progress.advance(task, len(part))
    _emit_change(len(wanted), changed, revision)


def split_hosts(cidrs: list[str], mode: pb.Mode.ValueType) -> tuple[list[pb.Entry], pb.PackedHosts]:
    """Hosts (an address, /32 or /128) packed in network order; everything else stays an entry.

    Only what ``inet_pton`` takes is packed, so anything odd reaches the service as
    text and is refused there with the service's own message.
    """
    entries: list[pb.Entry] = []
    v4, v6 = bytearray(), bytearray()
    for cidr in cidrs:
        address, _, length = cidr.partition("/")
        family, out = (socket.AF_INET6, v6) if ":" in address else (socket.AF_INET, v4)
        if length in ("", "128" if family == socket.AF_INET6 else "32"):
            try:
                out += socket.inet_pton(family, address)
                continue
            except OSError:
                pass
        entries.append(pb.Entry(cidr=cidr, mode=mode))
    return entries, pb.PackedHosts(ipv4=bytes(v4), ipv6=bytes(v6), mode=mode)


@prefilter.command()
@click.option("-f", "--file", "path", type=click.File("r"), required=True, help="one CIDR a line ('-': stdin)")
@click.option("--audit", is_flag=True, help="count and pass instead of drop")
@output_option
def replace(path: Any, audit: bool) -> None:
    """Make the list exactly the file's CIDRs, in one all-or-nothing call (the bulk load)."""
    wanted = read_cidrs(path)
    entries, packed = split_hosts(wanted, _mode(audit))
    request = pb.ReplaceEntriesRequest(entries=entries, packed=[packed] if packed.ipv4 or packed.ipv6 else [])
    reply = current().call("prefilter", "ReplaceEntries", request)
    _emit_change(len(wanted), reply.changed, reply.revision)


@prefilter.command()
@click.argument("cidrs", nargs=-1, required=True)
@output_option
def delete(cidrs: tuple[str, ...]) -> None:
    """Remove entries (all or none; one that is not there is NOT_FOUND)."""
    reply = current().call("prefilter", "DeleteEntries", pb.DeleteEntriesRequest(cidrs=list(cidrs)))
    row = to_dict(reply)
    emit(row, table(None, [Column("CHANGED", pick("changed"), "right"), Column("REVISION", pick("revision"))], [row]))


@prefilter.command()
@click.argument("cidrs", nargs=-1)
@output_option
def counters(cidrs: tuple[str, ...]) -> None:
    """Hits per entry (all when none named) and per-interface totals."""
    reply = to_dict(current().call("prefilter", "GetCounters", pb.GetCountersRequest(cidrs=list(cidrs))))
    emit(
        reply,
        table(
            "entries",
            [
                Column("CIDR", pick("cidr")),
                Column("MODE", pick("mode")),
                Column("PACKETS", pick("hits", "packets"), "right"),
                Column("BYTES", pick("hits", "bytes"), "right"),
            ],
            reply.get("entries", []),
        ),
        table(
            "interfaces",
            [
                Column("INTERFACE", pick("interface")),
                Column("DROPPED", pick("dropped", "packets"), "right"),
                Column("AUDITED", pick("audited", "packets"), "right"),
                Column("PASSED", pick("passed", "packets"), "right"),
            ],
            reply.get("interfaces", []),
        ),
        empty="no counters",
    )


@prefilter.command()
@click.argument("interface")
@output_option
def attach(interface: str) -> None:
    """Run the XDP chain (and so the deny list) on a network-facing device."""
    row = to_dict(current().call("prefilter", "Attach", pb.AttachRequest(interface=interface)))
    emit(
        row,
        table(
            None,
            [
                Column("INTERFACE", pick("interface")),
                Column("MODE", pick("mode")),
                Column("PROGRAM", pick("program_id")),
            ],
            [row],
        ),
    )


@prefilter.command()
@click.argument("interface")
@output_option
def detach(interface: str) -> None:
    """Stop the deny list on a device."""
    current().call("prefilter", "Detach", pb.DetachRequest(interface=interface))
    emit({"detached": interface}, table(None, [Column("DETACHED", pick("i"))], [{"i": interface}]))


@prefilter.command("valid-destinations")
@click.option("--enable/--disable", default=None, help="turn the mode on or off (without either: show it)")
@click.option("--cidr", "cidrs", multiple=True, help="a further valid destination (repeat; replaces the list)")
@output_option
def valid_destinations(enable: bool | None, cidrs: tuple[str, ...]) -> None:
    """The other mode: drop what is for no local endpoint, node address, service frontend or --cidr."""
    n = current()
    state = n.call("prefilter", "GetValidDestinations", pb.GetValidDestinationsRequest())
    if enable is not None or cidrs:
        enabled = state.enabled if enable is None else enable
        request = pb.SetValidDestinationsRequest(enabled=enabled, cidrs=list(cidrs) or list(state.cidrs))
        state = n.call("prefilter", "SetValidDestinations", request)
    row = to_dict(state)
    columns = [
        Column("ENABLED", pick("enabled")),
        Column("CIDRS", pick("cidrs")),
        Column("FRONTENDS", pick("frontends")),
    ]
    emit(row, table(None, columns, [row]))
