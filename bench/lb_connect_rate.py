"""TCP connections per second through a VIP with 10k services: Weir's LB against kube-proxy-style iptables.

Two set-ups exist side by side for the whole run, and the measurements
alternate between them round by round, so both see the same machine load:

- Weir: a node (tests.harness.node.Node) running the orchestrator and the LB
  as processes, a client endpoint, 3 backend endpoints and one more server
  endpoint that is behind no service. 10k services are
  programmed; the two that are measured (the middle one, index N/2, and the
  last one) go through the LB's gRPC API with the backend endpoints behind
  them. The other N - 2 have made-up backends and go through the API too,
  by UpsertServices in batches of 1000 (`--fillers maps` writes them straight
  into the LB's pinned maps instead, in the layout the LB writes:
  bench.lb_cost.write_services).
- iptables: a router namespace (ip_forward on) joined by veths to a client
  namespace, 3 backend namespaces and one more server namespace, with the same N services as kube-proxy
  writes them (iptables-restore into the router's nat table: PREROUTING ->
  KUBE-SERVICES, one `-d VIP -p tcp --dport 80 -j KUBE-SVC-x` rule per
  service in service order, each KUBE-SVC chain picking a KUBE-SEP chain with
  `-m statistic --mode random --probability 1/k`, each KUBE-SEP doing DNAT;
  plus KUBE-MARK-MASQ and KUBE-POSTROUTING). The last service's rule is the
  last in KUBE-SERVICES: the worst case, every rule is evaluated before it.

The client (its own process in the client namespace) loops connect, send one
byte, read the one-line answer, close, for --seconds; each backend is a
one-process accept loop that answers and closes after the client. The client
closes first, so TIME_WAIT stays on the client, which both client namespaces
let reuse (net.ipv4.tcp_tw_reuse=1, ports 1024-65535): with the backends
closing first, a backend's TIME_WAIT socket refuses a SYN that reuses its
tuple with an older timestamp, which the client's per-destination timestamp
offset makes likely as soon as one backend is reached through two VIPs
(stalls of one SYN timeout each). Only the first packet of a connection
meets the iptables rules (nat is consulted for new conntrack entries only);
Weir's LB sees every packet.
"no VIP" connects straight to one more server that is behind no service
(not to a backend: see the end of this note): under kube-proxy that still
walks all of KUBE-SERVICES without a match.

A direct connection to an address that is also a backend is not measured
because Weir's reverse NAT gets it wrong: the reply-side entry (scope
REV_NAT, keyed by client, backend and ports, 10 s after a close, hours
otherwise) of an earlier VIP connection from the same client port rewrites
the direct connection's SYN-ACK to come from the VIP, where the client's
TIME_WAIT socket of the old connection takes it, and the direct connection
waits for SYN retransmissions; the kernel hands out exactly the ports
recently used for other destinations, so most such connections stall.

Everything made here is removed at the end: the node (its namespaces, bpffs
root, cgroup and work dir), the namespaces wl<pid>-*, the processes.

    sudo .venv/bin/python -m bench.lb_connect_rate [--services N] [--seconds S] [--rounds R] [--fillers maps|grpc]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from weir.lb.v1 import lb_pb2 as pb
from weir.lb.v1 import lb_pb2_grpc as pb_grpc

from bench.lb_cost import BACKEND_PORT, PORT, Spec, filler, vip, write_services
from bench.netbench import exit_on_sigterm, run
from services.common import netns
from tests.harness.node import Node

SERVICES = 10_000
BACKENDS = 3
CONNECT_TIMEOUT = 2.0

SERVER = """
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", int(sys.argv[1])))
listener.listen(4096)
answer = sys.argv[2].encode()
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    try:
        conn.recv(64)
        conn.sendall(answer + b"\\n")
        conn.recv(64)  # the client closes first
    except OSError:
        pass
    conn.close()
"""

CLIENT = """
import collections, json, socket, sys, time
hosts, port, seconds, timeout = sys.argv[1].split(","), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
STALL = float(sys.argv[5])
done = errors = stalls = 0
answers = collections.Counter()
start = time.monotonic()
end = start + seconds
while time.monotonic() < end:
    sock = socket.socket()
    sock.settimeout(timeout)
    began = time.monotonic()
    try:
        sock.connect((hosts[(done + errors) % len(hosts)], port))
        sock.sendall(b"x")
        answer = b""
        while not answer.endswith(b"\\n"):
            chunk = sock.recv(64)
            if not chunk:
                raise ConnectionResetError("closed before the answer")
            answer += chunk
        answers[answer.decode().strip()] += 1
        done += 1
    except OSError:
        errors += 1
    finally:
        sock.close()
    stalls += time.monotonic() - began >= STALL
print(json.dumps({"connections": done, "errors": errors, "seconds": time.monotonic() - start,
                  "answers": dict(answers), "stalls": stalls}))
"""


# Targets in turn, a slice of time each, over and over: every target sees the same machine
# load (this machine is shared), so their ratio holds even when the absolute rates swing.
INTERLEAVED = """
import json, socket, sys, time
groups = json.loads(sys.argv[1])
seconds, timeout, piece, STALL = float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
stats = [{"connections": 0, "errors": 0, "seconds": 0.0, "answers": {}, "stalls": 0} for _ in groups]
end = time.monotonic() + seconds
while time.monotonic() < end:
    for (hosts, port), s in zip(groups, stats):
        start = time.monotonic()
        stop, n = start + piece, 0
        while time.monotonic() < stop:
            sock = socket.socket()
            sock.settimeout(timeout)
            began = time.monotonic()
            try:
                sock.connect((hosts[n % len(hosts)], port))
                sock.sendall(b"x")
                answer = b""
                while not answer.endswith(b"\\n"):
                    chunk = sock.recv(64)
                    if not chunk:
                        raise ConnectionResetError("closed before the answer")
                    answer += chunk
                s["connections"] += 1
                key = answer.decode().strip()
                s["answers"][key] = s["answers"].get(key, 0) + 1
            except OSError:
                s["errors"] += 1
            finally:
                sock.close()
            s["stalls"] += time.monotonic() - began >= STALL
            n += 1
        s["seconds"] += time.monotonic() - start
print(json.dumps(stats))
"""
SLICE = 0.1
STALL = 0.2  # a connection slower than this waited for a retransmission (the first SYN timeout is 1 s)


# ---- kube-proxy's rules ----


def _chain(kind: str, text: str) -> str:
    """kube-proxy's chain names: KUBE-SVC-/KUBE-SEP- + 16 chars of base32(sha256(...))."""
    return f"KUBE-{kind}-" + base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def kube_proxy_rules(services: Sequence[tuple[str, str, Sequence[tuple[str, int]]]]) -> str:
    """An iptables-restore input for the nat table, as kube-proxy (iptables mode) writes it.

    `services` are (name, VIP, backends); each serves TCP port 80. The
    KUBE-SERVICES rules keep the order given.
    """
    chains = [
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
    ]
    rules = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
    ]
    service_rules = []
    for name, address, backends in services:
        port_name = f"default/{name}:http"
        svc = _chain("SVC", f"{port_name}tcp")
        chains.append(f":{svc} - [0:0]")
        service_rules.append(
            f'-A KUBE-SERVICES -d {address}/32 -p tcp -m comment --comment "{port_name} cluster IP" '
            f"-m tcp --dport {PORT} -j {svc}"
        )
        for k, (backend, port) in enumerate(backends):
            sep = _chain("SEP", f"{port_name}tcp{backend}:{port}")
            chains.append(f":{sep} - [0:0]")
            left = len(backends) - k
            pick = f"-m statistic --mode random --probability {1 / left:.10f} " if left > 1 else ""
            rules.append(f'-A {svc} -m comment --comment "{port_name} -> {backend}:{port}" {pick}-j {sep}')
            rules.append(f'-A {sep} -s {backend}/32 -m comment --comment "{port_name}" -j KUBE-MARK-MASQ')
            rules.append(
                f'-A {sep} -p tcp -m comment --comment "{port_name}" -m tcp -j DNAT --to-destination {backend}:{port}'
            )
    return "\n".join(["*nat", *chains, *rules, *service_rules, "COMMIT", ""])


def iptables_restore(ns: str, text: str, *extra: str) -> float:
    """Load rules with iptables-restore inside `ns`; returns the seconds it took."""
    start = time.perf_counter()
    result = subprocess.run(
        ["ip", "netns", "exec", ns, "iptables-restore", *extra],
        input=text,
        text=True,
        capture_output=True,
        timeout=600,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"iptables-restore in {ns} failed: {result.stderr.strip()[:500]}")
    return elapsed


def service_list(count: int, real: dict[int, list[tuple[str, int]]], backends: int) -> list[Spec]:
    """Services 0..count-1; those in `real` get those backends, the others made-up ones."""
    return [Spec(i, vip(i), real[i]) if i in real else filler(i, backends) for i in range(count)]


# ---- processes ----


@dataclass
class Processes:
    """Long-running servers this benchmark started, stopped by their own pids."""

    running: list[subprocess.Popen[str]] = field(default_factory=list)

    def server(self, ns: str, port: int, answer: str) -> None:
        process = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, str(port), answer],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.running.append(process)
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"server in {ns} did not start: {process.stderr.read() if process.stderr else ''}")

    def stop(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        self.running.clear()


@dataclass(frozen=True)
class Rate:
    connections: int
    errors: int
    seconds: float
    answers: dict[str, int]
    stalls: int = 0  # connections that took STALL seconds or more (a lost SYN or SYN-ACK waits 1 s)

    @property
    def per_second(self) -> float:
        return self.connections / self.seconds


def connect_rate(ns: str, host: str, port: int, seconds: float) -> Rate:
    """Run the client loop in `ns` against host:port for `seconds`."""
    out = run(
        sys.executable,
        "-c",
        CLIENT,
        host,
        str(port),
        str(seconds),
        str(CONNECT_TIMEOUT),
        str(STALL),
        ns=ns,
        timeout=seconds + 60,
    ).stdout
    data = json.loads(out)
    rate = Rate(
        int(data["connections"]), int(data["errors"]), float(data["seconds"]), dict(data["answers"]), data["stalls"]
    )
    if rate.connections == 0:
        raise RuntimeError(f"no connection from {ns} to {host}:{port} succeeded ({rate.errors} failed)")
    return rate


def interleaved_rates(ns: str, groups: list[tuple[list[str], int]], seconds: float) -> list[Rate]:
    """Connection rates of several targets measured in turn, SLICE seconds each, for `seconds` in all."""
    spec = json.dumps([[hosts, port] for hosts, port in groups])
    out = run(
        sys.executable, "-c", INTERLEAVED, spec, str(seconds), str(CONNECT_TIMEOUT), str(SLICE), str(STALL),
        ns=ns, timeout=seconds + 60,
    ).stdout  # fmt: skip
    rates = [
        Rate(int(d["connections"]), int(d["errors"]), float(d["seconds"]), dict(d["answers"]), d["stalls"])
        for d in json.loads(out)
    ]
    for (hosts, port), rate in zip(groups, rates, strict=True):
        if rate.connections == 0:
            raise RuntimeError(f"no connection from {ns} to {hosts}:{port} succeeded ({rate.errors} failed)")
    return rates


# ---- the two set-ups ----


@dataclass(frozen=True)
class Target:
    """One thing to connect to: which set-up, which label, from where, to where."""

    setup: str
    label: str
    ns: str
    host: str
    port: int


@dataclass(frozen=True)
class Side:
    """One set-up once it is ready: where the client runs, the backends, the server outside every service."""

    client_ns: str
    backends: list[str]
    direct: str
    seconds: float  # to program the services


def weir_setup(node: Node, processes: Processes, count: int, measured: list[int], backends: int, fillers: str) -> Side:
    """The Weir node: a client, backends behind the measured services, one more server, N services."""
    node.setup()
    node.start("orchestrator")
    node.start("lb", "--max-services", str(max(20_000, count)))
    client = node.create_endpoint("client", {"app": "client"}, ipv6=False)
    made = [node.create_endpoint(f"b{k}", {"app": "backend"}, ipv6=False) for k in range(backends)]
    direct = node.create_endpoint("direct", {"app": "direct"}, ipv6=False)
    for endpoint in [*made, direct]:
        processes.server(endpoint.netns, BACKEND_PORT, endpoint.name)
    real = {i: [(e.ipv4, BACKEND_PORT) for e in made] for i in measured}
    specs = service_list(count, real, backends)
    start = time.perf_counter()
    with node.channel("lb") as channel:
        stub = pb_grpc.LoadBalancerStub(channel)
        if fillers == "maps":
            write_services(node.bpffs_root / "lb", [s for s in specs if s.index not in real])
            specs = [s for s in specs if s.index in real]
        messages = [pb.Service(
            name=f"svc-{spec.index}", address=spec.address, port=PORT, protocol="TCP",
            backends=[pb.Backend(address=a, port=p) for a, p in spec.backends]) for spec in specs]  # fmt: skip
        for first in range(0, len(messages), 1000):
            stub.UpsertServices(pb.UpsertServicesRequest(services=messages[first : first + 1000]), timeout=300)
    return Side(client.netns, [e.ipv4 for e in made], direct.ipv4, time.perf_counter() - start)


@contextlib.contextmanager
def plain_namespaces(prefix: str, backends: int) -> Iterator[tuple[str, str, list[str]]]:
    """Router, client, backend and direct-server namespaces joined by veths through the router.

    Yields (router, client, server namespaces); server k is 10.2.k.2, the last
    one (not behind any service) 10.3.0.2.
    """
    router, client = f"{prefix}-rt", f"{prefix}-cl"
    servers = [f"{prefix}-b{k}" for k in range(backends)] + [f"{prefix}-d"]
    made: list[str] = []
    try:
        for ns in (router, client, *servers):
            netns.create(ns)
            made.append(ns)
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=router)
        links = [(client, "c0", "10.1.0")] + [(ns, f"b{k}", f"10.2.{k}") for k, ns in enumerate(servers[:-1])]
        links.append((servers[-1], "d0", "10.3.0"))
        for ns, dev, net in links:
            run("ip", "-n", router, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "-n", router, "addr", "add", f"{net}.1/24", "dev", dev)
            run("ip", "-n", ns, "addr", "add", f"{net}.2/24", "dev", "eth0")
            run("ip", "-n", router, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "route", "add", "default", "via", f"{net}.1")
        yield router, client, servers
    finally:
        for ns in made:
            netns.remove(ns)


def client_sysctls(ns: str) -> None:
    """Let the client reuse its TIME_WAIT ports (set in the client's own namespace only)."""
    run("sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65535", ns=ns)


def teardown(node: Node) -> None:
    """Remove the node; its teardown prints the services' logs, which are not this benchmark's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        node.teardown()


@dataclass(frozen=True)
class Measured:
    """One run: the targets, their rates per round, and how long each side took to program."""

    count: int
    backends: int
    fillers: str
    weir_seconds: float
    iptables_seconds: float
    targets: list[Target]
    results: dict[Target, list[Rate]]
    interleaved: dict[str, dict[str, Rate]]  # set-up -> label -> rate, the labels measured in turn

    def medians(self) -> dict[tuple[str, str], float]:
        return {(t.setup, t.label): statistics.median(r.per_second for r in self.results[t]) for t in self.targets}

    def paired(self, setup: str, label: str, reference: str) -> float:
        """Median over rounds of (label's rate / reference's rate) in the same round: the two ran
        one right after the other, so a load spike on this shared machine hits both."""
        by_label = {t.label: self.results[t] for t in self.targets if t.setup == setup}
        return statistics.median(
            a.per_second / b.per_second for a, b in zip(by_label[label], by_label[reference], strict=True)
        )


DIRECT = "backends, no VIP"
OTHER = "no VIP (other server)"


def measure(count: int, backends: int, seconds: float, rounds: int, fillers: str) -> Measured:
    pid = os.getpid()
    middle, last = count // 2, count - 1
    workdir = Path(tempfile.mkdtemp(prefix=f"wl{pid}-"))
    node = Node(f"wl{pid}", workdir)
    processes = Processes()
    try:
        with plain_namespaces(f"wl{pid}", backends) as (router, client, servers):
            for ns in servers:
                processes.server(ns, BACKEND_PORT, ns.rsplit("-", 1)[1])
            addresses = [f"10.2.{k}.2" for k in range(backends)]
            real = {i: [(a, BACKEND_PORT) for a in addresses] for i in (middle, last)}
            rules = kube_proxy_rules(
                [(f"svc-{s.index}", s.address, s.backends) for s in service_list(count, real, backends)]
            )
            plain = Side(client, addresses, "10.3.0.2", iptables_restore(router, rules))
            weir = weir_setup(node, processes, count, [middle, last], backends, fillers)
            for side in (plain, weir):
                client_sysctls(side.client_ns)
            targets = []
            for label, index in ((f"VIP #{middle + 1} (middle)", middle), (f"VIP #{last + 1} (last)", last)):
                targets += [
                    Target("Weir", label, weir.client_ns, vip(index), PORT),
                    Target("iptables", label, plain.client_ns, vip(index), PORT),
                ]
            targets += [
                Target("Weir", DIRECT, weir.client_ns, ",".join(weir.backends), BACKEND_PORT),
                Target("iptables", DIRECT, plain.client_ns, ",".join(plain.backends), BACKEND_PORT),
                Target("Weir", OTHER, weir.client_ns, weir.direct, BACKEND_PORT),
                Target("iptables", OTHER, plain.client_ns, plain.direct, BACKEND_PORT),
            ]
            try:
                results = run_rounds(targets, seconds, rounds)
                interleaved = {
                    setup: dict(zip(
                        [t.label for t in group],
                        interleaved_rates(group[0].ns, [(t.host.split(","), t.port) for t in group], seconds * rounds),
                        strict=True,
                    ))
                    for setup in ("Weir", "iptables")
                    if (group := [t for t in targets if t.setup == setup and t.label != OTHER])
                }  # fmt: skip
            finally:
                processes.stop()  # before their namespaces go
            return Measured(count, backends, fillers, weir.seconds, plain.seconds, targets, results, interleaved)
    finally:
        processes.stop()
        teardown(node)
        shutil.rmtree(workdir, ignore_errors=True)


def run_rounds(targets: list[Target], seconds: float, rounds: int) -> dict[Target, list[Rate]]:
    """Warm every path up (and check it balances), then measure all targets once per round."""
    for t in targets:
        warm = connect_rate(t.ns, t.host, t.port, 0.5)
        if len(warm.answers) < 2 and (t.port == PORT or "," in t.host):
            raise RuntimeError(f"{t.setup} {t.label}: only {sorted(warm.answers)} answered; no balancing")
    results: dict[Target, list[Rate]] = {t: [] for t in targets}
    for _ in range(rounds):
        for t in targets:
            results[t].append(connect_rate(t.ns, t.host, t.port, seconds))
    return results


def report(m: Measured, seconds: float, rounds: int) -> None:
    print(
        f"{m.count} services with {m.backends} backends each; programmed: Weir {m.weir_seconds:.1f} s "
        f"({'2 through gRPC, the rest into the maps' if m.fillers == 'maps' else 'all through gRPC'}), "
        f"iptables-restore {m.iptables_seconds:.1f} s"
    )
    print(
        f"connections per second, {rounds} rounds of {seconds:g} s each (median, min..max); "
        "connect + 1 byte each way + close"
    )
    print(f"{'set-up':<10}{'target':<26}{'conn/s':>9}{'range':>18}{'errors':>8}{'stalls':>8}")
    medians = m.medians()
    for t in m.targets:
        rates = [r.per_second for r in m.results[t]]
        errors = sum(r.errors for r in m.results[t])
        stalls = sum(r.stalls for r in m.results[t])
        print(
            f"{t.setup:<10}{t.label:<26}{medians[t.setup, t.label]:>9.0f}"
            f"{f'{min(rates):.0f}..{max(rates):.0f}':>18}{errors:>8}{stalls:>8}"
        )
    print("\nratio Weir / iptables (conn/s)")
    for label in dict.fromkeys(t.label for t in m.targets):
        print(f"  {label:<26}{medians['Weir', label] / medians['iptables', label]:>6.2f}")
    print(f"\nratio VIP / the same backends without a VIP, same set-up, paired by round (goal for Weir >= {GOAL})")
    for label in [t.label for t in m.targets if t.setup == "Weir" and t.port == PORT]:
        weir, ipt = m.paired("Weir", label, DIRECT), m.paired("iptables", label, DIRECT)
        print(f"  {label:<26}Weir {weir:>5.2f}   iptables {ipt:>5.2f}")
    print(f"\ninterleaved ({SLICE:g} s of each target in turn for {seconds * rounds:g} s; conn/s, ratio to {DIRECT})")
    for setup, by_label in m.interleaved.items():
        direct = by_label[DIRECT].per_second
        shown = "   ".join(
            f"{label}: {r.per_second:.0f} ({r.per_second / direct:.2f}, {r.stalls} stalls)"
            for label, r in by_label.items()
        )
        print(f"  {setup:<10}{shown}")


GOAL = 0.9


def _count(n: int) -> str:
    """10000 -> "10k" for the summary's measure names."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def summary_rows(
    services: int = SERVICES, seconds: float = 2.0, rounds: int = 5, fillers: str = "maps"
) -> list[tuple[str, float, float, float]]:
    """(measure, Weir VIP conn/s, Weir conn/s to the same backends without a VIP, ratio), for bench.all.

    The two rates come from the interleaved run (the last VIP: the worst case for iptables).
    """
    m = measure(services, BACKENDS, seconds, rounds, fillers)
    report(m, seconds, rounds)
    label = next(t.label for t in m.targets if t.setup == "Weir" and t.port == PORT and "last" in t.label)
    vip_rate, direct = m.interleaved["Weir"][label].per_second, m.interleaved["Weir"][DIRECT].per_second
    return [(f"TCP conn/s through a VIP ({_count(services)} services) vs no VIP", vip_rate, direct, vip_rate / direct)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=SERVICES, help="services programmed on both sides")
    parser.add_argument("--backends", type=int, default=BACKENDS, help="backends per service (and servers)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all targets (the median is shown)")
    parser.add_argument(
        "--fillers", choices=("maps", "grpc"), default="grpc", help="how Weir gets the services that are not measured"
    )
    args = parser.parse_args()
    if not 4 <= args.services <= 50_000:
        parser.error("--services must be 4..50000")
    if not 2 <= args.backends <= 50:
        parser.error("--backends must be 2..50")
    exit_on_sigterm()
    report(measure(args.services, args.backends, args.seconds, args.rounds, args.fillers), args.seconds, args.rounds)


if __name__ == "__main__":
    main()
