"""The `weir` command group: node flags, output format, the command groups, exit codes.

Exit codes: 0 done; 1 a service answered with an error (``weir: <service>: CODE: message``
on stderr); 2 a usage error; 3 a service is unreachable (no socket, nobody answering).
Never a traceback: anything else unexpected is reported as one line with exit 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from services.cli import down, endpoint, node, observe, policy, prefilter, service, status
from services.cli.client import CALL_TIMEOUT, EXIT_RPC, CliFailure, Node
from services.cli.output import FORMATS
from services.common.config import ENV

COMMANDS = (
    status.status,
    endpoint.endpoint,
    node.node,
    policy.policy,
    service.service,
    prefilter.prefilter,
    observe.observe,
    observe.metrics,
    observe.event_limits,
    down.down,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--instance", envvar=ENV["instance"], default="weir", show_default=True, help="node name (env WEIR_INSTANCE)"
)
@click.option(
    "--run-dir",
    envvar=ENV["run_dir"],
    type=click.Path(path_type=Path),
    default=None,
    help="directory of the service sockets (default /run/<instance>; env WEIR_RUN_DIR)",
)
@click.option(
    "--timeout", type=click.FloatRange(min=0.1), default=CALL_TIMEOUT, show_default=True, help="seconds per call"
)
@click.option("-o", "--output", type=click.Choice(FORMATS), default="table", help="table (default) or json")
@click.pass_context
def cli(ctx: click.Context, instance: str, run_dir: Path | None, timeout: float, output: str) -> None:
    """Inspect and drive a running Weir node over its services' gRPC sockets."""
    obj = ctx.ensure_object(dict)
    obj.setdefault("output", output)
    node = Node(instance, run_dir, timeout)
    obj["node"] = node
    ctx.call_on_close(node.close)


for command in COMMANDS:
    cli.add_command(command)


def run() -> None:
    """The console entry point: click's own handling, plus one line for anything unexpected."""
    try:
        cli.main(prog_name="weir", standalone_mode=True)
    except CliFailure as exc:  # raised outside click's handling (e.g. while closing)
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug in the CLI: say it in one line, never a traceback
        click.echo(f"weir: unexpected {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_RPC)
