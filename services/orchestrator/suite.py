"""Run the whole suite on this host: `./weir up [--instance NAME ...]`.

Starts every service of the node as its own process (orchestrator first, since
it creates the shared maps), passes the common flags on, and supervises them: a
service that exits is started again after a back-off that doubles from
``BACKOFF_FIRST`` up to ``BACKOFF_MAX`` seconds, and starts over once the
service has run ``HEALTHY_RESET`` seconds and answers SERVING. The other
services keep serving meanwhile, and the datapath keeps forwarding (pins and
attachments outlive the processes). The suite stops only on SIGINT or SIGTERM;
it then stops every child with SIGTERM, the orchestrator last, and exits 0.

The suite holds the instance's ``suite`` lock, so a second suite with the same
instance name stops before it starts anything. ``--tcp-listen`` gives each
service its own TLS listener, either by name
(``orchestrator=127.0.0.1:7000,lb=127.0.0.1:7003``; services not named listen
on their unix socket only) or as one port range (``127.0.0.1:7000-7004``),
whose ports go to the services in the order of ``SERVICES``: orchestrator,
prefilter, policy, lb, sockaccel, l7, ipsec. ``--metrics-listen`` and ``--flow-event-limit``
go to the orchestrator alone.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import ENV, NodeConfig
from services.common.instance_lock import acquire_or_exit
from services.orchestrator.eventlimits import parse_limit
from services.orchestrator.metrics import parse_listen


@dataclass(frozen=True)
class Member:
    """One service of the suite: started as ``python -m services.<name>`` with the node's flags."""

    name: str
    start_grace: float = 0.5  # seconds before the next member starts (the orchestrator makes the shared maps)


# The suite's services in start order (stopped in reverse); a new service is one more row.
SUITE: tuple[Member, ...] = (
    Member("orchestrator"),
    Member("prefilter"),
    Member("policy"),
    Member("lb"),
    Member("sockaccel"),
    Member("l7"),  # Envoy and its control plane; policy hands it the listeners of L7 ports
    Member("ipsec"),  # ESP between nodes; without ESP in the kernel it serves and encrypts nothing
)
SERVICES = [member.name for member in SUITE]
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
HEALTHY_RESET = 60.0  # seconds a service must run, and then answer SERVING, before its back-off starts over
HEALTH_CHECK_EVERY = 5.0
HEALTH_TIMEOUT = 1.0
STOP_TIMEOUT = 15.0
POLL = 0.2
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


def _split_orchestrator(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take the orchestrator's own flags (metrics, flow events) out of the argv every service gets.

    Checked here, so a bad value stops the suite before it starts rather than the orchestrator
    in a restart loop.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--metrics-listen")
    parser.add_argument("--flow-event-limit", action="append", default=[])
    known, rest = parser.parse_known_args(argv)
    own = []
    try:
        if known.metrics_listen is not None:
            parse_listen(known.metrics_listen)
            own += ["--metrics-listen", known.metrics_listen]
        for limit in known.flow_event_limit:
            parse_limit(limit)
            own += ["--flow-event-limit", limit]
    except ValueError as exc:
        print(f"weir-{ROLE}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return own, rest


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


def backoff(failures: int) -> float:
    """Seconds before restarting a service that has exited ``failures`` times in a row (1, 2, 4 ... 30)."""
    return float(min(BACKOFF_FIRST * 2.0 ** max(failures - 1, 0), BACKOFF_MAX))


def serving(socket: Path) -> bool:
    """Whether the service on ``socket`` answers its health check with SERVING."""
    try:
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT
            )
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _say(message: str) -> None:
    print(f"weir-{ROLE}: {message}", file=sys.stderr, flush=True)


class Child:
    """One supervised service: its process, when it started, how often it has failed in a row."""

    def __init__(self, member: Member, argv: list[str], env: dict[str, str], socket: Path) -> None:
        self.member = member
        self.argv = argv
        self.env = env
        self.socket = socket
        self.next_health_check = 0.0
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.failures = 0
        self.restart_at: float | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env)
        self.started = time.monotonic()
        self.restart_at = None

    def tend(self, now: float) -> None:
        """Restart a service that exited once its back-off has passed; note one that exited."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                _say(f"restarting {self.member.name} (restart {self.failures})")
                self.start()
            return
        assert self.process is not None
        code = self.process.poll()
        if code is None:
            if self.failures and now - self.started >= HEALTHY_RESET and now >= self.next_health_check:
                self.next_health_check = now + HEALTH_CHECK_EVERY
                if serving(self.socket):
                    self.failures = 0
            return
        self.failures += 1
        delay = backoff(self.failures)
        _say(f"{self.member.name} exited with {code}; restarting in {delay:g}s")
        self.restart_at = now + delay

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def wait(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _say(f"{self.member.name} did not stop within {STOP_TIMEOUT:g}s; killing it")
            self.process.kill()
            self.process.wait()


def main(argv: list[str]) -> int:
    orchestrator_only, argv = _split_orchestrator(argv)
    config, plan, rest = _parse(argv)
    acquire_or_exit(config, ROLE)
    env = {k: v for k, v in os.environ.items() if k != ENV["tcp_listen"]}
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    children = []
    for member in SUITE:
        if stopping:
            break
        tcp = ["--tcp-listen", plan[member.name]] if member.name in plan else []
        own = orchestrator_only if member.name == "orchestrator" else []
        argv = [sys.executable, "-m", f"services.{member.name}", *rest, *tcp, *own]
        child = Child(member, argv, env, config.socket_path(member.name))
        child.start()
        children.append(child)
        time.sleep(member.start_grace)
    while not stopping:
        now = time.monotonic()
        for child in children:
            child.tend(now)
        time.sleep(POLL)
    for child in reversed(children):  # the orchestrator last: the others talk to it while stopping
        child.terminate()
        child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
