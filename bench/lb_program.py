"""How long programming 10k services takes: Weir's LB over gRPC against iptables-restore of kube-proxy rules.

Weir: a node (tests.harness.node.Node) runs the orchestrator and the LB
(`--max-services` at least N) as processes; services are sent one
UpsertService call after the other (10 backends each, made-up addresses: no
traffic flows), timing every call. iptables: the same services as kube-proxy
writes them (bench.lb_connect_rate.kube_proxy_rules) loaded by one
`iptables-restore` into the nat table of a fresh namespace.

The gRPC phase stops after --budget seconds if it has not reached N by then
(the default keeps the whole run under 4 minutes; each call gets slower as
services accumulate, so all of 10k takes several times longer: use
`--budget 0` for the full run). iptables is then timed at the count Weir
reached too, so the ratio printed is always one of two measurements of the
same work; the figure for all N is extrapolated from a straight line fitted
to the per-call latencies, and printed as an estimate.

"One more service" compares the cost of a single change with the services in
place: Weir's last calls against kube-proxy's partial sync, an
`iptables-restore --noflush` that rewrites KUBE-SERVICES in full and adds
the new service's chains (what kube-proxy sends for one new service).

Everything made here is removed at the end: the node (namespaces, bpffs root,
cgroup, work dir) and the namespaces wl<pid>-ipt*.

    sudo .venv/bin/python -m bench.lb_program [--services N] [--backends B] [--budget S] [--changes K]
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
from pybpf import Map
from services.common import netns
from services.lb.defs import LbService, LbServiceKey
from tests.harness.node import Node

SERVICES = 10_000
BACKENDS = 10
BUDGET = 140.0
CHANGES = 5
BUCKET = 1_000


@dataclass(frozen=True)
class Programmed:
    """What the gRPC phase did: per-call latencies (s) in call order, wall time."""

    latencies: list[float]
    seconds: float
    cut_short: bool


def request(spec: Spec) -> pb.UpsertServiceRequest:
    return pb.UpsertServiceRequest(service=pb.Service(
        name=f"svc-{spec.index}", address=spec.address, port=80, protocol="TCP",
        backends=[pb.Backend(address=a, port=p) for a, p in spec.backends]))  # fmt: skip


def program_weir(node: Node, specs: Sequence[Spec], budget: float) -> Programmed:
    """UpsertService for each spec in turn, until done or the budget is spent."""
    latencies = []
    start = time.perf_counter()
    with node.channel("lb") as channel:
        stub = pb_grpc.LoadBalancerStub(channel)
        for spec in specs:
            if budget and time.perf_counter() - start > budget:
                break
            message = request(spec)
            before = time.perf_counter()
            stub.UpsertService(message, timeout=120)
            latencies.append(time.perf_counter() - before)
    return Programmed(latencies, time.perf_counter() - start, len(latencies) < len(specs))


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


def time_iptables(prefix: str, specs: Sequence[Spec], count: int, changes: int) -> tuple[float, list[float]]:
    """iptables-restore of the first `count` services into a fresh namespace, then `changes` partial syncs."""
    ns = f"{prefix}-ipt{count}"
    try:
        netns.create(ns)
        full = iptables_restore(ns, rules(specs[:count]))
        added = list(specs[:count])
        syncs = []
        for j in range(changes):
            new = filler(len(specs) + j, len(specs[0].backends))
            syncs.append(iptables_restore(ns, partial_sync(added, new), "--noflush"))
            added.append(new)
        return full, syncs
    finally:
        netns.remove(ns)


def percentiles(values: Sequence[float]) -> tuple[float, float, float]:
    """p50, p99 and max, in ms."""
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return statistics.median(ordered) * 1e3, p99 * 1e3, ordered[-1] * 1e3


def measure(count: int, backends: int, budget: float, changes: int) -> None:
    pid = os.getpid()
    prefix = f"wl{pid}"
    specs = [filler(i, backends) for i in range(count)]
    workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    node = Node(prefix, workdir)
    try:
        node.setup()
        node.start("orchestrator")
        node.start("lb", "--max-services", str(max(10_000, count)))
        done = program_weir(node, specs, budget)
        reached = len(done.latencies)
        if reached < 2:
            raise RuntimeError(f"only {reached} call(s) within --budget {budget:g} s; give it more time")
        if frontends(node) != reached:
            raise RuntimeError(f"{frontends(node)} frontends in the LB's map after {reached} calls")
    finally:
        teardown(node)
        shutil.rmtree(workdir, ignore_errors=True)
    ipt_reached, syncs_reached = time_iptables(prefix, specs, reached, changes)
    ipt_all, syncs_all = (ipt_reached, syncs_reached) if reached == count else time_iptables(prefix, specs, count,
                                                                                              changes)
    report(count, backends, budget, done, ipt_reached, syncs_reached, ipt_all, syncs_all)


def report(count: int, backends: int, budget: float, done: Programmed, ipt_reached: float,
           syncs_reached: list[float], ipt_all: float, syncs_all: list[float]) -> None:
    reached = len(done.latencies)
    print(f"programming {count} services with {backends} backends each")
    print(f"Weir, UpsertService over gRPC, sequential: {reached} services in {done.seconds:.1f} s "
          f"({reached / done.seconds:.0f}/s)" + (f"; stopped by --budget {budget:g} s" if done.cut_short else ""))
    print(f"{'calls':>13}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for first in range(0, reached, BUCKET):
        p50, p99, top = percentiles(done.latencies[first : first + BUCKET])
        print(f"{first + 1:>6}-{min(first + BUCKET, reached):<6}{p50:>9.1f}{p99:>9.1f}{top:>9.1f}")
    p50, p99, top = percentiles(done.latencies)
    print(f"{'all':>13}{p50:>9.1f}{p99:>9.1f}{top:>9.1f}")
    print(f"\niptables-restore of the kube-proxy rules (one transaction): {reached} services in {ipt_reached:.2f} s")
    print(f"ratio Weir / iptables at {reached} services: {done.seconds / ipt_reached:.1f}")
    if reached < count:
        fit = statistics.linear_regression(range(reached), done.latencies)
        estimate = count * fit.intercept + fit.slope * count * (count - 1) / 2
        print(f"iptables-restore of all {count} services: {ipt_all:.2f} s")
        print(f"Weir for all {count}, ESTIMATED from a linear fit of the per-call latency "
              f"({fit.intercept * 1e3:.1f} ms + {fit.slope * 1e6:.2f} us per service already there): "
              f"{estimate:.0f} s; estimated ratio {estimate / ipt_all:.0f}")
    last = done.latencies[-min(100, reached):]
    print(f"\none more service, with {reached} in place: Weir UpsertService p50 of the last {len(last)} calls "
          f"{statistics.median(last) * 1e3:.1f} ms; kube-proxy partial sync (iptables-restore --noflush) "
          f"median of {len(syncs_reached)} {statistics.median(syncs_reached) * 1e3:.1f} ms")
    if reached < count:
        print(f"one more service, with {count} in place: kube-proxy partial sync median of {len(syncs_all)} "
              f"{statistics.median(syncs_all) * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=SERVICES, help="services to program")
    parser.add_argument("--backends", type=int, default=BACKENDS, help="backends per service")
    parser.add_argument("--budget", type=float, default=BUDGET,
                        help="seconds the gRPC phase may take (0: no limit, program all)")
    parser.add_argument("--changes", type=int, default=CHANGES, help="one-service changes timed on iptables")
    args = parser.parse_args()
    if not 2 <= args.services <= 50_000:
        parser.error("--services must be 2..50000")
    if not 1 <= args.backends <= 64:
        parser.error("--backends must be 1..64")
    if args.changes < 1:
        parser.error("--changes must be at least 1")
    exit_on_sigterm()
    measure(args.services, args.backends, args.budget, args.changes)


if __name__ == "__main__":
    main()
