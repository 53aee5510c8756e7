"""Run the whole suite on this host: `./weir up [--instance NAME ...]`.

Starts every service of the node as its own process (orchestrator first, since
it creates the shared maps), passes the common flags on, and stops them all
with SIGTERM when it gets SIGINT or SIGTERM itself. If a service dies, the
suite stops the rest and exits non-zero: a supervisor (systemd, compose)
decides about restarts, and the datapath keeps forwarding meanwhile.

The suite holds the instance's ``suite`` lock, so a second suite with the same
instance name stops before it starts anything. ``--tcp-listen`` gives each
service its own TLS listener, either by name
(``orchestrator=127.0.0.1:7000,lb=127.0.0.1:7003``; services not named listen
on their unix socket only) or as one port range (``127.0.0.1:7000-7004``),
whose ports go to the services in the order of ``SERVICES``: orchestrator,
prefilter, policy, lb, sockaccel.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from services.common.config import ENV, NodeConfig
from services.common.instance_lock import acquire_or_exit

SERVICES = ["orchestrator", "prefilter", "policy", "lb", "sockaccel"]
START_GRACE = 0.5
ROLE = "suite"
TCP_FORMS = (
    f"give one address per service (orchestrator=HOST:PORT,lb=HOST:PORT) or one range HOST:FIRST-LAST "
    f"of at least {len(SERVICES)} ports, assigned in the order {', '.join(SERVICES)}"
)


def _port(text: str, value: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"--tcp-listen: bad port {text!r} in {value!r}")
    return int(text)


def plan_tcp(value: str | None) -> dict[str, str]:
    """Which service listens where: parse the suite's ``--tcp-listen`` (see the module doc)."""
    if not value:
        return {}
    if "=" in value:
        plan: dict[str, str] = {}
        for item in value.split(","):
            service, sep, address = item.strip().partition("=")
            if not sep or service not in SERVICES:
                raise ValueError(f"--tcp-listen: {item!r} does not name a service ({', '.join(SERVICES)})")
            if service in plan:
                raise ValueError(f"--tcp-listen: {service} is given twice")
            plan[service] = address
        return plan
    host, sep, ports = value.rpartition(":")
    first, dash, last = ports.partition("-")
    if not sep or not host or not dash:
        raise ValueError(f"--tcp-listen {value!r}: {TCP_FORMS}")
    low, high = _port(first, value), _port(last, value)
    if low == 0 or high - low + 1 < len(SERVICES):
        raise ValueError(f"--tcp-listen {value!r} has {max(high - low + 1, 0)} ports: {TCP_FORMS}")
    return {service: f"{host}:{low + i}" for i, service in enumerate(SERVICES)}


def _split_tcp(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--tcp-listen`` (flag or env) out of the argv passed on to every service."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tcp-listen", default=os.environ.get(ENV["tcp_listen"]))
    known, rest = parser.parse_known_args(argv)
    return known.tcp_listen, rest


def _parse(argv: list[str]) -> tuple[NodeConfig, dict[str, str], list[str]]:
    """Validate the flags once, before starting anything; exits 2 with a usage line on bad input."""
    tcp, rest = _split_tcp(argv)
    try:
        plan = plan_tcp(tcp)
    except ValueError as exc:
        print(f"weir-{ROLE}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for address in plan.values():  # every address, with the TLS flags, as a service would see it
        NodeConfig.from_args([*rest, "--tcp-listen", address], ROLE)
    config, _ = NodeConfig.from_args(rest, ROLE)
    return config, plan, rest


def main(argv: list[str]) -> int:
    config, plan, rest = _parse(argv)
    acquire_or_exit(config, ROLE)
    env = {k: v for k, v in os.environ.items() if k != ENV["tcp_listen"]}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for service in SERVICES:
        tcp = ["--tcp-listen", plan[service]] if service in plan else []
        processes[service] = subprocess.Popen([sys.executable, "-m", f"services.{service}", *rest, *tcp], env=env)
        time.sleep(START_GRACE)
    code = 0
    while not stopping:
        for service, process in processes.items():
            if process.poll() is not None:
                print(f"weir: {service} exited with {process.returncode}", file=sys.stderr)
                stopping, code = True, 1
        time.sleep(0.2)
    for process in processes.values():
        if process.poll() is None:
            process.terminate()
    for process in processes.values():
        process.wait(timeout=15)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
