"""Two faces for every answer: a rich table for people, one JSON document for tools.

Commands build plain data (protobuf messages turned into dicts with the proto's own field
names) and a table of the columns people need; ``-o json`` prints the data, untouched by
the table's choices, so a script sees every field the service sent.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

FORMATS = ("table", "json")
PIPE_WIDTH = 200
F = TypeVar("F", bound=Callable[..., Any])


def to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data: proto field names, defaults included, enums by name."""
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def output_option(fn: F) -> F:
    """``-o table|json`` on a command; without it the group's ``-o`` (default table) holds."""

    def remember(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            ctx.ensure_object(dict)["output"] = value
        return value

    return click.option(
        "-o",
        "--output",
        type=click.Choice(FORMATS),
        default=None,
        expose_value=False,
        callback=remember,
        is_eager=True,
        help="table for people (default), json for tools",
    )(fn)


def wants_json() -> bool:
    ctx = click.get_current_context()
    return bool(ctx.find_root().ensure_object(dict).get("output") == "json")


@dataclass
class Column:
    title: str
    value: Callable[[dict[str, Any]], Any]
    justify: str = "left"


def console(stderr: bool = False) -> Console:
    """A console; piped output gets room for wide tables instead of 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else PIPE_WIDTH)


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value) or "-"
    return str(value)


def table(title: str | None, columns: Sequence[Column], rows: Iterable[dict[str, Any]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c.title, justify=c.justify)  # type: ignore[arg-type]
    for row in rows:
        t.add_row(*(cell(c.value(row)) for c in columns))
    return t


def emit(document: Any, *tables: Table, empty: str | None = None) -> None:
    """Print ``document`` as JSON under ``-o json``, else the tables (or ``empty`` when none has rows)."""
    if wants_json():
        click.echo(json.dumps(document, indent=2, sort_keys=True))
        return
    out = console()
    shown = [t for t in tables if t.row_count]
    if not shown and empty:
        out.print(empty)
    for t in shown:
        out.print(t)


def emit_line(document: dict[str, Any]) -> None:
    """One JSON object on one line (streams: one per event), flushed at once."""
    click.echo(json.dumps(document, sort_keys=True))


def pick(*path: str) -> Callable[[dict[str, Any]], Any]:
    """A column reading a nested field: ``pick("counter", "packets")``."""

    def get(row: dict[str, Any]) -> Any:
        value: Any = row
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    return get
