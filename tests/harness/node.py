"""A Weir node for tests: a namespace, the suite's real processes, an outside.

`Node` makes a network namespace that stands for the node, runs service
processes inside it (nsenter, so they still see bpffs), gives every path of the
instance its own place (bpffs root, sockets, state, cgroup), and joins an
"outside" namespace to it through a network-facing veth (`wnet0` in the node,
`eth0` outside). `teardown()` removes all of it, whatever state the test left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc

from services.common.bpffs import remove_pins
from services.l7.envoy import end_left_running
from tests.harness import netns

REPO = Path(__file__).resolve().parents[2]
BPF_BUILD = REPO / "bpf" / "build"
NET_IFNAME = "wnet0"
NODE_NET_V4, OUTSIDE_V4 = "192.0.2.1", "192.0.2.2"
NODE_NET_V6, OUTSIDE_V6 = "2001:db8:ff::1", "2001:db8:ff::2"
ENDPOINT_V4_RANGE = "198.18.0.0/15"
ENDPOINT_V6_RANGE = "2001:db8:e::/48"
# More source addresses of the outside namespace (routed back to it by the node),
# so tests can send "from" several hosts and networks.
OUTSIDE_EXTRA = {
    "203.0.113.0/24": ["203.0.113.7", "203.0.113.8"],
    "198.51.0.0/16": ["198.51.100.9"],
    "2001:db8:bad::/48": ["2001:db8:bad::7", "2001:db8:bad::8"],
    "2001:db8:dead::/48": ["2001:db8:dead::9"],
}
# A bound, not a budget: start() returns as soon as health says SERVING. At load ~11 on
# CI's 2 cores the lb took ~14 s of wall time to import (0.7 s of CPU) and ~14 s to load
# lb.o (0.7 s in the verifier), so 30 s failed tests that had nothing wrong.
START_TIMEOUT = 120.0


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Node:
    """One instance of the suite, in its own namespace, with an outside network."""

    name: str
    workdir: Path
    services: dict[str, Service] = field(default_factory=dict)
    endpoint_count: int = 0

    @property
    def ns(self) -> str:
        return self.name

    @property
    def outside(self) -> str:
        return f"{self.name}-out"

    @property
    def bpffs_root(self) -> Path:
        return Path("/sys/fs/bpf") / self.name

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def cgroup_root(self) -> Path:
        return Path("/sys/fs/cgroup/unified") / self.name

    def socket(self, service: str) -> Path:
        return self.run_dir / f"{service}.sock"

    # ---- life cycle ----

    def setup(self) -> Node:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cgroup_root.mkdir(exist_ok=True)
        netns.create(self.ns)
        netns.create(self.outside)
        netns.run(
            self.ns, "ip", "link", "add", NET_IFNAME, "type", "veth", "peer", "name", "eth0", "netns", self.outside
        )
        for ns, dev, v4, v6 in (
            (self.ns, NET_IFNAME, NODE_NET_V4, NODE_NET_V6),
            (self.outside, "eth0", OUTSIDE_V4, OUTSIDE_V6),
        ):
            netns.run(ns, "ip", "addr", "add", f"{v4}/24", "dev", dev)
            netns.run(ns, "ip", "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            netns.run(ns, "ip", "link", "set", dev, "up")
        netns.run(self.outside, "ip", "route", "add", ENDPOINT_V4_RANGE, "via", NODE_NET_V4)
        netns.run(self.outside, "ip", "-6", "route", "add", ENDPOINT_V6_RANGE, "via", NODE_NET_V6)
        for network, addresses in OUTSIDE_EXTRA.items():
            is_v6 = ":" in network
            for address in addresses:
                netns.run(
                    self.outside,
                    "ip",
                    "addr",
                    "add",
                    f"{address}/{128 if is_v6 else 32}",
                    "dev",
                    "eth0",
                    *(["nodad"] if is_v6 else []),
                )
            netns.run(
                self.ns,
                "ip",
                "-6" if is_v6 else "-4",
                "route",
                "add",
                network,
                "via",
                OUTSIDE_V6 if is_v6 else OUTSIDE_V4,
            )
        # Resolve the neighbours once (the first IPv6 exchange waits up to a second
        # for neighbour discovery), so tests measure the datapath, not ND.
        for source in (OUTSIDE_V4, OUTSIDE_V6, *(a for addrs in OUTSIDE_EXTRA.values() for a in addrs)):
            target = NODE_NET_V6 if ":" in source else NODE_NET_V4
            netns.run(self.outside, "ping", "-c", "1", "-W", "2", "-I", source, target, check=False)
        return self

    def argv(self, service: str, extra: tuple[str, ...] = ()) -> list[str]:
        return [
            *netns.nsenter_argv(self.ns),
            sys.executable, "-m", f"services.{service}",
            "--instance", self.name,
            "--bpffs-root", str(self.bpffs_root),
            "--run-dir", str(self.run_dir),
            "--state-dir", str(self.state_dir),
            "--cgroup-root", str(self.cgroup_root),
            "--log-level", "info",
            *extra,
        ]  # fmt: skip

    def start(self, service: str, *extra: str, timeout: float = START_TIMEOUT) -> Service:
        """Start a service process in the node and wait until its health says SERVING."""
        log = self.workdir / f"{service}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(self.argv(service, extra), stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        svc = Service(service, process, log)
        self.services[service] = svc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{service} exited with {process.returncode}:\n{self.log_tail(service)}")
            if self.socket(service).exists() and self.serving(service):
                return svc
            time.sleep(0.1)
        raise TimeoutError(f"{service} did not become healthy in {timeout}s:\n{self.log_tail(service)}")

    def start_together(self, *services: str) -> None:
        """Start services that do not wait for one another at once, so their imports overlap; each until SERVING."""
        with ThreadPoolExecutor(len(services)) as pool:
            for started in [pool.submit(self.start, service) for service in services]:
                started.result()

    def serving(self, service: str) -> bool:
        """Whether the service's health check answers SERVING."""
        try:
            with self.channel(service) as channel:
                check = channel.unary_unary(
                    "/grpc.health.v1.Health/Check",
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                reply = check(health_pb2.HealthCheckRequest(), timeout=1)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    def kill(self, service: str, sig: int = signal.SIGKILL) -> int:
        """Signal a service and wait for it to exit; returns its exit code."""
        svc = self.services.pop(service)
        svc.process.send_signal(sig)
        return svc.process.wait(timeout=60)  # an upper bound: a loaded machine slows an orderly stop

    def log_tail(self, service: str, lines: int = 40) -> str:
        path = self.workdir / f"{service}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def teardown(self) -> None:
        """Remove everything this node made; safe after any failure, safe twice.

        The services' logs go to stdout first: pytest shows them when a test fails.
        """
        for log in sorted(self.workdir.glob("*.log")):
            print(f"---- {self.name}: {log.name} ----\n{self.log_tail(log.stem, 60)}")
        for name in list(self.services):
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                self.kill(name, signal.SIGKILL)
        end_left_running(self.run_dir / "l7")  # a killed l7 service leaves its Envoy running
        for ns in netns.names(f"{self.name}."):
            netns.remove(ns)
        netns.remove(self.outside)
        netns.remove(self.ns)
        if self.bpffs_root.exists():
            remove_pins(self.bpffs_root)
        if self.cgroup_root.exists():
            for child in sorted(self.cgroup_root.rglob("*"), reverse=True):
                if child.is_dir():
                    child.rmdir()
            self.cgroup_root.rmdir()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- gRPC ----

    def channel(self, service: str) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket(service)}")

    def orchestrator(self) -> orch_grpc.OrchestratorStub:
        return orch_grpc.OrchestratorStub(self.channel("orchestrator"))

    def create_endpoint(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        ipv6: bool = True,
        namespace: str = "",
        named_ports: dict[str, tuple[int, str]] | None = None,
    ) -> orch_pb.Endpoint:
        """Create an endpoint over gRPC with the next free test addresses (named_ports: name -> (port, protocol))."""
        self.endpoint_count += 1
        n = self.endpoint_count + 9
        request = orch_pb.CreateEndpointRequest(
            name=name,
            ipv4=f"198.18.0.{n}",
            ipv6=f"2001:db8:e::{n:x}" if ipv6 else "",
            labels=labels or {},
            namespace=namespace,
            named_ports=[
                orch_pb.NamedPort(name=k, port=port, protocol=proto) for k, (port, proto) in (named_ports or {}).items()
            ],
        )
        with self.channel("orchestrator") as channel:
            return orch_grpc.OrchestratorStub(channel).CreateEndpoint(request, timeout=15)


def leftover_check(prefix: str) -> list[str]:
    """What of a test run is still on the machine (namespaces, pins)."""
    left = [f"netns {n}" for n in netns.names(prefix)]
    left += [f"pin {p}" for p in Path("/sys/fs/bpf").glob(f"{prefix}*")]
    return left


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of a process, from schedstat (nanoseconds, unlike stat's ticks).

    Growth tests compare this, not wall time: a loaded machine's scheduling is not growth.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def pid_prefix() -> str:
    """A short prefix unique to this test process, for every name a test makes."""
    return f"wt{os.getpid() % 100000}"
