"""How long programming 10k services takes: Weir's LB over gRPC against iptables-restore of kube-proxy rules.

Weir: a node (tests.harness.node.Node) runs the orchestrator and the LB as
processes; the services (3 backends each, made-up addresses: no traffic
flows) go through UpsertServices in batches (each batch one all-or-nothing
change), then a few more one UpsertService call each, to time a single
change with everything in place. iptables: the same services as kube-proxy
writes them (bench.lb_connect_rate.kube_proxy_rules) loaded by one
`iptables-restore` into the nat table of a fresh namespace, then kube-proxy's
partial sync for one more service (`iptables-restore --noflush` rewriting
KUBE-SERVICES in full plus the new chains).

Everything made here is removed at the end: the node (namespaces, bpffs root,
cgroup, work dir) and the namespace wl<pid>-ipt.

    sudo .venv/bin/python -m bench.lb_program [--services N] [--backends B] [--batch K] [--singles M]

`summary_rows()` runs the default sizes and returns the bulk row for bench.all.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from weir.lb.v1 import lb_pb2 as pb
from weir.lb.v1 import lb_pb2_grpc as pb_grpc

from bench.lb_connect_rate import iptables_restore, kube_proxy_rules, teardown
from bench.lb_cost import Spec, filler
from bench.netbench import exit_on_sigterm
from bench.policy_import import children_cpu, cpu_seconds
from pybpf import Map
from services.common import netns
from services.lb.defs import LbService, LbServiceKey
from tests.harness.node import Node

SERVICES = 10_000
BACKENDS = 3
BATCH = 1_000
SINGLES = 100
CHANGES = 5


@dataclass(frozen=True)
class Programmed:
    """What the gRPC phase did: bulk wall time, then per-call latencies (s) of single upserts."""

    bulk_seconds: float
    single_latencies: list[float]
    bulk_cpu: float = 0.0  # CPU seconds of the LB and orchestrator processes over the bulk phase


def service_message(spec: Spec) -> pb.Service:
    return pb.Service(
        name=f"svc-{spec.index}", address=spec.address, port=80, protocol="TCP",
        backends=[pb.Backend(address=a, port=p) for a, p in spec.backends])  # fmt: skip


def service_cpu(node: Node) -> float:
    """CPU seconds the node's service processes have used so far."""
    return sum(cpu_seconds(s.process.pid) for s in node.services.values())


def program_weir(node: Node, specs: Sequence[Spec], batch: int, singles: Sequence[Spec]) -> Programmed:
    """All specs through UpsertServices in batches, then `singles` one UpsertService call each."""
    with node.channel("lb") as channel:
        stub = pb_grpc.LoadBalancerStub(channel)
        cpu = service_cpu(node)
        start = time.perf_counter()
        for first in range(0, len(specs), batch):
            chunk = [service_message(s) for s in specs[first : first + batch]]
            stub.UpsertServices(pb.UpsertServicesRequest(services=chunk), timeout=600)
        bulk = time.perf_counter() - start
        cpu = service_cpu(node) - cpu
        latencies = []
        for spec in singles:
            message = pb.UpsertServiceRequest(service=service_message(spec))
            before = time.perf_counter()
            stub.UpsertService(message, timeout=120)
            latencies.append(time.perf_counter() - before)
    return Programmed(bulk, latencies, cpu)


def frontends(node: Node) -> int:
    """Frontends in the LB's map: the check that the calls reached the datapath."""
    with Map.from_pin(node.bpffs_root / "lb" / "lb_services", key_type=LbServiceKey, value_type=LbService) as m:
        return sum(1 for _ in m)


def rules(specs: Sequence[Spec]) -> str:
    return kube_proxy_rules([(f"svc-{s.index}", s.address, s.backends) for s in specs])


def partial_sync(specs: Sequence[Spec], new: Spec) -> str:
    """kube-proxy's --noflush input for one new service: KUBE-SERVICES in full, the new chains."""
    full = rules([*specs, new]).splitlines()
    own = {line.split()[-1] for line in full if line.startswith(f"-A KUBE-SERVICES -d {new.address}/32 ")}
    svc = own.pop()
    seps = {line.split()[-1] for line in full if line.startswith(f"-A {svc} ")}
    wanted = {"KUBE-SERVICES", svc, *seps}
    chains = [line for line in full if line.startswith(":") and line[1:].split()[0] in wanted]
    body = [line for line in full if line.startswith("-A ") and line.split()[1] in wanted]
    return "\n".join(["*nat", *chains, *body, "COMMIT", ""])


def time_iptables(prefix: str, specs: Sequence[Spec], changes: int) -> tuple[float, float, list[float]]:
    """iptables-restore of all services into a fresh namespace (seconds, CPU seconds), then `changes` partial syncs."""
    ns = f"{prefix}-ipt"
    try:
        netns.create(ns)
        text = rules(specs)
        cpu = children_cpu()
        full = iptables_restore(ns, text)
        cpu = children_cpu() - cpu
        added = list(specs)
        syncs = []
        for j in range(changes):
            new = filler(len(specs) + j, len(specs[0].backends))
            syncs.append(iptables_restore(ns, partial_sync(added, new), "--noflush"))
            added.append(new)
        return full, cpu, syncs
    finally:
        netns.remove(ns)


def percentiles(values: Sequence[float]) -> tuple[float, float, float]:
    """p50, p99 and max, in ms."""
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return statistics.median(ordered) * 1e3, p99 * 1e3, ordered[-1] * 1e3


@dataclass(frozen=True)
class Result:
    count: int
    backends: int
    batch: int
    weir: Programmed
    iptables: float
    iptables_cpu: float
    syncs: list[float]


def measure(count: int, backends: int, batch: int, singles: int, changes: int) -> Result:
    """Weir first (its node removed again), then iptables-restore of the same services."""
    pid = os.getpid()
    prefix = f"wl{pid}"
    specs = [filler(i, backends) for i in range(count + singles)]
    workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    node = Node(prefix, workdir)
    try:
        node.setup()
        node.start("orchestrator")
        node.start("lb", "--max-services", str(count + singles))
        done = program_weir(node, specs[:count], batch, specs[count:])
        if frontends(node) != count + singles:
            raise RuntimeError(f"{frontends(node)} frontends in the LB's map after {count + singles} services")
    finally:
        teardown(node)
        shutil.rmtree(workdir, ignore_errors=True)
    ipt, ipt_cpu, syncs = time_iptables(prefix, specs[:count], changes)
    return Result(count, backends, batch, done, ipt, ipt_cpu, syncs)


def report(r: Result) -> None:
    done, count = r.weir, r.count
    print(f"programming {count} services with {r.backends} backends each")
    print(
        f"Weir, UpsertServices over gRPC, {r.batch} per call: {done.bulk_seconds:.2f} s "
        f"({count / done.bulk_seconds:.0f} services/s)"
    )
    print(f"iptables-restore of the kube-proxy rules (one transaction): {r.iptables:.2f} s")
    print(f"ratio Weir / iptables: {done.bulk_seconds / r.iptables:.2f} (goal <= 1)")
    print(
        f"CPU seconds (less sensitive to a busy machine): Weir's LB and orchestrator {done.bulk_cpu:.2f}, "
        f"iptables-restore {r.iptables_cpu:.2f}, ratio {_ratio(done.bulk_cpu, r.iptables_cpu):.2f}"
    )
    p50, p99, top = percentiles(done.single_latencies)
    print(
        f"\none more service with {count} in place: Weir UpsertService p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
        f"max {top:.1f} ms ({len(done.single_latencies)} calls); kube-proxy partial sync (iptables-restore "
        f"--noflush) median of {len(r.syncs)} {statistics.median(r.syncs) * 1e3:.1f} ms"
    )


def _count(n: int) -> str:
    """10000 -> "10k" for the summary's measure names."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _ratio(a: float, b: float) -> float:
    """a / b; NaN when b is 0 (CPU seconds come in clock ticks: a short run may show none)."""
    return a / b if b else float("nan")


def summary_rows(services: int = SERVICES, backends: int = BACKENDS) -> list[tuple[str, float, float, float]]:
    """(measure, Weir s, iptables-restore s, ratio) of programming `services` services, for bench.all."""
    r = measure(services, backends, BATCH, singles=20, changes=3)
    report(r)
    return [
        (
            f"program {_count(services)} services x {backends} backends (s)",
            r.weir.bulk_seconds,
            r.iptables,
            r.weir.bulk_seconds / r.iptables,
        ),
        (
            f"program {_count(services)} services, CPU s (services; iptables-restore)",
            r.weir.bulk_cpu,
            r.iptables_cpu,
            _ratio(r.weir.bulk_cpu, r.iptables_cpu),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=SERVICES, help="services to program")
    parser.add_argument("--backends", type=int, default=BACKENDS, help="backends per service")
    parser.add_argument("--batch", type=int, default=BATCH, help="services per UpsertServices call")
    parser.add_argument("--singles", type=int, default=SINGLES, help="single UpsertService calls timed afterwards")
    parser.add_argument("--changes", type=int, default=CHANGES, help="one-service changes timed on iptables")
    args = parser.parse_args()
    if not 2 <= args.services <= 50_000:
        parser.error("--services must be 2..50000")
    if not 1 <= args.backends <= 64:
        parser.error("--backends must be 1..64")
    if args.changes < 1:
        parser.error("--changes must be at least 1")
    exit_on_sigterm()
    report(measure(args.services, args.backends, args.batch, args.singles, args.changes))


if __name__ == "__main__":
    main()
