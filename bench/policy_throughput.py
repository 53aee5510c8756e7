"""Endpoint policy on real traffic: Weir's datapath next to the same policy in iptables.

Two TCP endpoints talk through a router namespace, in two separate set-ups
that run side by side in one process:

- Weir: the orchestrator and the policy service run as real processes in a
  node namespace (wp<pid>-node); the two endpoints are made over the
  orchestrator's gRPC, so their host-side veths carry the entry programs
  with the policy program in its slot. N egress rules select the client:
  N-1 allow it TCP ports the traffic never uses (10000, 10002, ...; spaced so
  each is its own map entry), one allows TCP/5201 to the server. Rules are
  imported through the policy service's gRPC; Weir keeps no order, its map
  is keyed, so "last" means nothing there.
- iptables: plain namespaces (wp<pid>-ipt-rt routing between wp<pid>-ipt-cl
  and wp<pid>-ipt-sv) with the same policy as N FORWARD rules, `-s C -d S -p tcp
  --dport P -j ACCEPT`, the matching one last, then `-j DROP`. Replies need
  a rule of their own, in one of two ways:
  "stateful": `-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT` first,
  as firewalls are written (only a connection's first packet walks the
  list; Weir's conntrack works the same way);
  "stateless": no conntrack; the reply rule (`--sport 5201`) comes after the
  matching one, so every packet in both directions walks the whole list.

For N = 10, 1k and 10k, and a baseline with no rules at all (Weir's programs
attached but nothing enforced; plain routing with an empty filter table),
each set-up gets a few seconds of one-stream iperf3 and a few seconds of a
Python client that opens and resets connections one after another (the
new-connection rate). Before measuring, a SYN to a port no rule allows must
go unanswered in every set-up, so the policy is known to be enforced.

The policy service recomputes only when the orchestrator streams a change
(it no longer polls), so it stays idle while the set-ups are measured (see
bench/policy_import.py, which measures its idle CPU). Everything made here
(namespaces, processes, /sys/fs/bpf/weir-pbench-<pid>, temp dirs) is removed
afterwards.

    sudo .venv/bin/python -m bench.policy_throughput [--sizes 10,1000,10000] [--seconds S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc
from weir.policy.v1 import policy_pb2 as pb
from weir.policy.v1 import policy_pb2_grpc as pb_grpc

from services.common import netns
from services.common.bpffs import ensure_bpffs, remove_pins

REPO = Path(__file__).resolve().parents[1]
PREFIX = f"wp{os.getpid()}"
SIZES = (10, 1_000, 10_000)
PORT = 5201
BLOCKED_PORT = 5202
FILLER_PORT = 10_000
START_TIMEOUT = 60.0
CALL_TIMEOUT = 600.0
MAX_MESSAGE = 64 * 1024 * 1024
IPERF_STARTUP = 10.0
BASELINE = 0


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so the `finally` blocks clean up as on Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def bpffs_root(tag: str) -> Path:
    return Path(f"/sys/fs/bpf/weir-pbench-{os.getpid()}-{tag}")


def nsenter(ns: str) -> list[str]:
    """Run in the namespace's network only: unlike `ip netns exec`, /sys (and bpffs) stay visible."""
    return ["nsenter", f"--net=/run/netns/{ns}", "--"]


def run(
    *argv: str, ns: str | None = None, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a command (inside `ns` if given); a failure raises with its stderr."""
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    result = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def stop(process: subprocess.Popen[bytes], grace: float = 5.0) -> float | None:
    """SIGTERM, then SIGKILL if it has not exited within `grace` seconds.

    Returns the seconds it took to exit on SIGTERM (0 if it was gone already), None if it had to be killed.
    """
    if process.poll() is not None:
        return 0.0
    start = time.monotonic()
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        return None
    return time.monotonic() - start


@contextlib.contextmanager
def temp_dir(tag: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"weir-pbench-{os.getpid()}-{tag}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---- a Weir node: the services as processes in a namespace ----


@dataclass
class WeirNode:
    """One instance of the suite in namespace `ns`, with its own bpffs root, sockets and state."""

    ns: str
    root: Path
    work: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def socket_path(self, service: str) -> Path:
        return self.work / "run" / f"{service}.sock"

    def channel(self, service: str) -> grpc.Channel:
        return grpc.insecure_channel(
            f"unix://{self.socket_path(service)}",
            options=[("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)],
        )

    def start(self, service: str, *extra: str) -> None:
        """Start `python -m services.<service>` in the node and wait until it answers SERVING."""
        argv = [
            *nsenter(self.ns), sys.executable, "-m", f"services.{service}",
            "--instance", self.ns,
            "--bpffs-root", str(self.root),
            "--run-dir", str(self.work / "run"),
            "--state-dir", str(self.work / "state"),
            "--log-level", "warning",
            *extra,
        ]  # fmt: skip
        with open(self.work / f"{service}.log", "ab") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        self.processes[service] = process
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{service} exited with {process.returncode}:\n{self.log_tail(service)}")
            if self.socket_path(service).exists() and self._serving(service):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{service} did not become healthy in {START_TIMEOUT}s:\n{self.log_tail(service)}")

    def _serving(self, service: str) -> bool:
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

    def log_tail(self, service: str, lines: int = 30) -> str:
        path = self.work / f"{service}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def create_endpoint(self, name: str, ipv4: str, labels: dict[str, str]) -> orch_pb.Endpoint:
        """An endpoint (namespace <instance>.<name> and a veth) made by the orchestrator."""
        with self.channel("orchestrator") as channel:
            request = orch_pb.CreateEndpointRequest(name=name, ipv4=ipv4, labels=labels)
            return orch_grpc.OrchestratorStub(channel).CreateEndpoint(request, timeout=30)

    def import_rules(self, rules: Sequence[pb.Rule]) -> tuple[pb.ImportRulesResponse, float]:
        """ImportRules with `rules`; returns the reply and the seconds the call took (request built before)."""
        request = pb.ImportRulesRequest(rules=list(rules))
        with self.channel("policy") as channel:
            stub = pb_grpc.PolicyStub(channel)
            start = time.perf_counter()
            reply = stub.ImportRules(request, timeout=CALL_TIMEOUT)
            return reply, time.perf_counter() - start

    def delete_rules(self, names: Sequence[str]) -> None:
        with self.channel("policy") as channel:
            pb_grpc.PolicyStub(channel).DeleteRules(pb.DeleteRulesRequest(names=list(names)), timeout=CALL_TIMEOUT)

    def endpoint_policy(self, name: str) -> pb.EndpointPolicy:
        request = pb.GetEndpointPolicyRequest(endpoint=name)
        with self.channel("policy") as channel:
            return pb_grpc.PolicyStub(channel).GetEndpointPolicy(request, timeout=60)


@contextlib.contextmanager
def weir_node(tag: str, services: Sequence[tuple[str, Sequence[str]]]) -> Iterator[WeirNode]:
    """A node namespace wp<pid>-<tag> running `services` ((name, extra flags) in order); all removed after."""
    ns = f"{PREFIX}-{tag}"
    root = bpffs_root(tag)
    with temp_dir(tag) as work:
        node = WeirNode(ns, root, work)
        try:
            ensure_bpffs(root)
            netns.create(ns)
            for name, extra in services:
                node.start(name, *extra)
            yield node
        finally:
            for process in reversed(node.processes.values()):
                stop(process)
            for name in netns.names(f"{ns}."):
                netns.remove(name)
            netns.remove(ns)
            remove_pins(root)


# ---- plain namespaces routed by a router namespace, for iptables ----


@dataclass(frozen=True)
class Routed:
    router: str
    client: str
    server: str
    client_addr: str
    server_addr: str


@contextlib.contextmanager
def routed_namespaces(tag: str) -> Iterator[Routed]:
    """wp<pid>-<tag>-rt forwarding between wp<pid>-<tag>-cl (10.200.1.2) and wp<pid>-<tag>-sv (10.200.2.2)."""
    router, client, server = f"{PREFIX}-{tag}-rt", f"{PREFIX}-{tag}-cl", f"{PREFIX}-{tag}-sv"
    try:
        for ns in (router, client, server):
            netns.create(ns)
        for leaf, dev, subnet in ((client, "rc", "10.200.1"), (server, "rs", "10.200.2")):
            run("ip", "-n", router, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", leaf)
            run("ip", "-n", router, "addr", "add", f"{subnet}.1/24", "dev", dev)
            run("ip", "-n", leaf, "addr", "add", f"{subnet}.2/24", "dev", "eth0")
            run("ip", "-n", router, "link", "set", dev, "up")
            run("ip", "-n", leaf, "link", "set", "eth0", "up")
            run("ip", "-n", leaf, "route", "add", "default", "via", f"{subnet}.1")
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=router)
        yield Routed(router, client, server, "10.200.1.2", "10.200.2.2")
    finally:
        for ns in (client, server, router):
            netns.remove(ns)


def iptables_rules(client: str, server: str, count: int, stateful: bool) -> str:
    """An iptables-restore file: `count` FORWARD allow rules, the one for PORT last, then DROP.

    count 0 is the baseline: an empty filter table, so no rule and no conntrack.
    """
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    if count:
        if stateful:
            lines.append("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
        lines += [
            f"-A FORWARD -s {client}/32 -d {server}/32 -p tcp -m tcp --dport {filler_port(i)} -j ACCEPT"
            for i in range(count - 1)
        ]
        lines.append(f"-A FORWARD -s {client}/32 -d {server}/32 -p tcp -m tcp --dport {PORT} -j ACCEPT")
        if not stateful:
            lines.append(f"-A FORWARD -s {server}/32 -d {client}/32 -p tcp -m tcp --sport {PORT} -j ACCEPT")
        lines.append("-A FORWARD -j DROP")
    return "\n".join([*lines, "COMMIT", ""])


# ---- policy for Weir ----


def filler_port(index: int) -> int:
    """Ports two apart, so the policy computation cannot merge them into one prefix."""
    return FILLER_PORT + 2 * index


def weir_rules(first: int, last: int) -> list[pb.Rule]:
    """Rules `first`..`last`-1 of the set: rule 0 allows the traffic, the others ports nobody uses."""
    client = pb.EndpointSelector(match_labels={"app": "client"})
    server = [pb.EndpointSelector(match_labels={"app": "server"})]
    rules = []
    for i in range(first, last):
        port = PORT if i == 0 else filler_port(i - 1)
        rules.append(pb.Rule(
            name="allow-iperf" if i == 0 else f"filler-{i:05d}",
            endpoint_selector=client,
            egress=[pb.PeerRule(endpoints=server, ports=[pb.PortRule(port=port, protocol="TCP")])],
        ))  # fmt: skip
    return rules


# ---- traffic ----


def serve_connections(address: str, port: int) -> None:
    """Accept and close connections until killed: the far end of the connection-rate test."""
    with socket.create_server((address, port), backlog=4096) as server:
        while True:
            conn, _ = server.accept()
            conn.close()


def open_connections(address: str, port: int, seconds: float) -> None:
    """Open a connection and reset it (no TIME_WAIT to run out of ports), again and again for
    `seconds`; prints {"connections", "failures", "seconds"} as JSON."""
    linger = struct.pack("ii", 1, 0)
    done = failed = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.settimeout(1.0)
        try:
            sock.connect((address, port))
            done += 1
        except OSError:
            failed += 1
        finally:
            sock.close()
    print(json.dumps({"connections": done, "failures": failed, "seconds": time.monotonic() - start}))


def python_in(ns: str, function: str, *args: str | int | float) -> list[str]:
    """argv running `function(*args)`, a function of this module, in a process inside namespace `ns`."""
    code = f"from bench.policy_throughput import {function}; {function}(*{args!r})"
    return [*nsenter(ns), sys.executable, "-c", code]


def wait_listening(ns: str, port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + IPERF_STARTUP
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server in {ns} exited with {process.returncode}")
        if run("ss", "-N", ns, "-Hltn", f"sport = :{port}").stdout.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} in {ns}")


@contextlib.contextmanager
def server(ns: str, argv: list[str], port: int) -> Iterator[None]:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        wait_listening(ns, port, process)
        yield
    finally:
        stop(process, grace=2.0)


def blocked(ns: str, address: str, port: int) -> bool:
    """True if a SYN from `ns` to address:port gets no answer (neither accept nor reset) in 0.5 s."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(0.5)
        try:
            sock.connect((address, port))
        except TimeoutError:
            return True
        except OSError:
            return False
        return False


def iperf(client_ns: str, server_ns: str, address: str, seconds: float) -> float:
    """One-stream TCP throughput from client to server, Gbit/s."""
    argv = [*nsenter(server_ns), "iperf3", "-s", "-1", "-B", address, "-p", str(PORT)]
    with server(server_ns, argv, PORT):
        out = run(
            *nsenter(client_ns),
            "iperf3",
            "-c",
            address,
            "-p",
            str(PORT),
            "-t",
            str(seconds),
            "-J",
            "--connect-timeout",
            "3000",
            timeout=seconds + 30,
        ).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def connection_rate(client_ns: str, server_ns: str, address: str, seconds: float) -> float:
    """New connections per second, one after another, from client to server."""
    with server(server_ns, python_in(server_ns, "serve_connections", address, PORT), PORT):
        out = run(*python_in(client_ns, "open_connections", address, PORT, seconds), timeout=seconds + 60).stdout
    result = json.loads(out)
    if result["connections"] == 0:
        raise RuntimeError(f"no connection from {client_ns} to {address}:{PORT} succeeded")
    return float(result["connections"]) / float(result["seconds"])


# ---- the benchmark ----


@dataclass(frozen=True)
class Result:
    setup: str
    rules: int
    gbps: float
    conns: float


@dataclass(frozen=True)
class Ends:
    """Where one set-up's traffic starts and ends."""

    client_ns: str
    server_ns: str
    server_addr: str


def measure(name: str, count: int, ends: Ends, seconds: float) -> Result:
    """Throughput and connection rate of one set-up, after checking that its policy is enforced."""
    if count and not blocked(ends.client_ns, ends.server_addr, BLOCKED_PORT):
        raise RuntimeError(f"{name} with {count} rules: a SYN to port {BLOCKED_PORT} was answered; not enforced")
    gbps = iperf(ends.client_ns, ends.server_ns, ends.server_addr, seconds)
    conns = connection_rate(ends.client_ns, ends.server_ns, ends.server_addr, seconds)
    return Result(name, count, gbps, conns)


def benchmark(sizes: list[int], seconds: float) -> tuple[list[Result], dict[int, float]]:
    """Every set-up at every size; returns the results and Weir's import seconds per size."""
    results: list[Result] = []
    imports: dict[int, float] = {}
    policy_flags = ["--policy-entries", str(max(16384, max(sizes) + 16))]
    with (
        weir_node("node", [("orchestrator", []), ("policy", policy_flags)]) as node,
        routed_namespaces("ipt") as plain,
    ):
        client = node.create_endpoint("client", "198.18.0.10", {"app": "client"})
        srv = node.create_endpoint("server", "198.18.0.11", {"app": "server"})
        weir = Ends(client.netns, srv.netns, srv.ipv4)
        ipt = Ends(plain.client, plain.server, plain.server_addr)
        results.append(measure("weir", BASELINE, weir, seconds))
        run("iptables-restore", ns=plain.router, stdin=iptables_rules(plain.client_addr, plain.server_addr, 0, True))
        results.append(measure("iptables", BASELINE, ipt, seconds))
        loaded = 0
        for count in sizes:
            reply, took = node.import_rules(weir_rules(loaded, count))
            loaded = count
            imports[count] = took
            policy = node.endpoint_policy("client")
            if "client" not in reply.endpoints or len(policy.entries) != count or not policy.egress_enforced:
                raise RuntimeError(
                    f"weir: {len(policy.entries)} map entries for {count} rules; rewritten: {list(reply.endpoints)}"
                )
            results.append(measure("weir", count, weir, seconds))
            for stateful in (True, False):
                rules = iptables_rules(plain.client_addr, plain.server_addr, count, stateful)
                run("iptables-restore", ns=plain.router, stdin=rules)
                results.append(measure("iptables stateful" if stateful else "iptables stateless", count, ipt, seconds))
    return results, imports


def report(results: list[Result], imports: dict[int, float], seconds: float) -> None:
    print(
        f"TCP through a router namespace: iperf3 one stream for {seconds:g} s; new connections: one client "
        f"opening and resetting connections back to back for {seconds:g} s"
    )
    print(f"{'rules':>8}  {'set-up':<19}{'Gbit/s':>8}{'conn/s':>9}   {'Weir/this: Gbit/s':>17}{'conn/s':>8}")
    weir = {r.rules: r for r in results if r.setup == "weir"}
    for r in results:
        w = weir[r.rules]
        ratios = "" if r.setup == "weir" else f"{w.gbps / r.gbps:>17.2f}{w.conns / r.conns:>8.2f}"
        label = "no rules" if r.rules == BASELINE else str(r.rules)
        setup = r.setup if r.rules != BASELINE else ("weir (not enforced)" if r.setup == "weir" else "plain routing")
        print(f"{label:>8}  {setup:<19}{r.gbps:>8.2f}{r.conns:>9.0f}   {ratios}")
    print(
        "weir rules imported (ImportRules, client side): "
        + ", ".join(f"{n} rules {s:.2f} s" for n, s in imports.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="rule counts, comma-separated (default %(default)s)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of each measurement (default 3)")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    most = (65535 - FILLER_PORT) // 2 + 1
    if sizes[0] < 1 or sizes[-1] > most:
        parser.error(f"sizes must be between 1 (the rule that allows the traffic) and {most} (filler ports)")
    exit_on_sigterm()
    results, imports = benchmark(sizes, args.seconds)
    report(results, imports, args.seconds)


if __name__ == "__main__":
    main()
