"""How long a big policy takes to import through the gRPC API, next to `iptables-restore`.

Starts the orchestrator and the policy service as real processes in a node
namespace (wp<pid>-imp, own bpffs root, sockets and state, the service's
default flags), makes 10 endpoints over the orchestrator's gRPC (labels
app=ep0..ep9), then times, from the client's side, one ImportRules call with
R rules (R = 1k and 10k): rule i selects app=ep<i mod 10> and allows it
egress to one /32 CIDR of its own (10.x.y.z) on TCP/443. The request is built
before the clock starts; validation, identities, persisting, computing every
endpoint's policy and writing the maps are all inside, since the call returns
once the affected endpoints' maps are rewritten (the reply names them, and
each endpoint's map is checked to hold R/10 entries). Between sizes the
rules are deleted again (one DeleteRules call, timed too), so each import
starts from an empty policy.

Beside it, `iptables-restore` of the same R rules as FORWARD rules
(`-s <endpoint> -d <cidr> -p tcp --dport 443 -j ACCEPT`) inside a namespace
of its own. Prints seconds and the ratios, the CPU seconds of both sides, and
how the wall time splits: the CPU of each service's busiest thread (its
worker), the time those threads stood in the run queue waiting for a CPU
(/proc/<pid>/task/*/schedstat: other work on the machine), and the rest. Then, with the last policy in
place, what that policy costs the service after the import: its CPU while
nobody calls it (it follows the orchestrator's streams and recomputes only on
a change) and how long it takes to exit on SIGTERM.
Nothing goes on the wire. Namespaces, processes,
/sys/fs/bpf/weir-pbench-<pid>-* and temp dirs are removed afterwards.

    sudo .venv/bin/python -m bench.policy_import [--sizes 1000,10000] [--endpoints N] [--idle-seconds S]
                                                 [--stop-grace S]

`summary_rows()` runs the 10k import alone and returns its row for bench.all.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import time
from dataclasses import dataclass
from pathlib import Path

from weir.policy.v1 import policy_pb2 as pb

from bench.policy_throughput import CALL_TIMEOUT, PREFIX, WeirNode, exit_on_sigterm, run, stop, weir_node
from pybpf import Map
from services.common import netns
from services.policy.defs import ConfigFlag, EndpointPolicyConfig, PolicyEntry, PolicyKey

SIZES = (1_000, 10_000)
ENDPOINTS = 10
PORT = 443
CIDR_BASE = int(ipaddress.IPv4Address("10.0.0.0"))
IDLE_SECONDS = 5.0
STOP_GRACE = 15.0


def endpoint_address(index: int) -> str:
    return f"198.18.0.{10 + index}"


def cidr(index: int) -> str:
    return f"{ipaddress.IPv4Address(CIDR_BASE + index)}/32"


def rules(count: int, endpoints: int, tag: str) -> list[pb.Rule]:
    """`count` rules, each selecting one endpoint's label and allowing it one CIDR on TCP/443."""
    return [
        pb.Rule(
            name=f"{tag}-{i:06d}",
            endpoint_selector=pb.EndpointSelector(match_labels={"app": f"ep{i % endpoints}"}),
            egress=[pb.PeerRule(cidrs=[pb.CidrRule(cidr=cidr(i))], ports=[pb.PortRule(port=PORT, protocol="TCP")])],
        )
        for i in range(count)
    ]


def iptables_rules(count: int, endpoints: int) -> str:
    """The same rules as an iptables-restore file for the FORWARD chain."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [
        f"-A FORWARD -s {endpoint_address(i % endpoints)}/32 -d {cidr(i)} -p tcp -m tcp --dport {PORT} -j ACCEPT"
        for i in range(count)
    ]
    return "\n".join([*lines, "COMMIT", ""])


def datapath_policy(node: WeirNode, endpoint_id: int) -> tuple[int, int]:
    """(entries in the endpoint's pinned policy map, its enforcement flags), read from bpffs.

    Read from the kernel rather than asked of the service: its one worker thread
    may be busy recomputing for a long time, and the maps are what counts.
    """
    pins = node.root / "policy"
    with Map.from_pin(pins / "policy_maps", key_type=ctypes.c_uint32, value_type=ctypes.c_uint32) as outer:
        map_id = outer.lookup(endpoint_id)
        if not map_id:
            return 0, 0
        with Map.from_id(map_id, key_type=PolicyKey, value_type=PolicyEntry) as inner:
            count = sum(1 for _ in inner)
    with Map.from_pin(pins / "policy_config", key_type=ctypes.c_uint32, value_type=EndpointPolicyConfig) as config:
        flags = config.lookup(endpoint_id)
    return count, int(flags.flags) if flags is not None else 0


def service_cpu(node: WeirNode) -> float:
    """CPU seconds the node's services (policy and orchestrator) have used so far."""
    return sum(cpu_seconds(p.pid) for p in node.processes.values())


def thread_times(pid: int) -> dict[int, tuple[float, float]]:
    """Per thread of a process: (seconds on a CPU, seconds runnable but waiting for one) so far,
    from /proc/<pid>/task/<tid>/schedstat."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            on_cpu, waiting = (int(v) / 1e9 for v in (task / "schedstat").read_text().split()[:2])
        except (OSError, ValueError):
            continue  # the thread exited meanwhile
        out[int(task.name)] = (on_cpu, waiting)
    return out


def busiest_threads(node: WeirNode, before: dict[str, dict[int, tuple[float, float]]]) -> tuple[float, float]:
    """(CPU, run-queue wait) since `before` of each service's busiest thread (its worker), summed:
    the import's path through both services, and how long it stood waiting for a CPU."""
    cpu = waiting = 0.0
    for name, process in node.processes.items():
        start = before[name]
        deltas = [
            (on_cpu - start.get(tid, (0.0, 0.0))[0], waited - start.get(tid, (0.0, 0.0))[1])
            for tid, (on_cpu, waited) in thread_times(process.pid).items()
        ]
        busiest = max(deltas, default=(0.0, 0.0))
        cpu, waiting = cpu + busiest[0], waiting + busiest[1]
    return cpu, waiting


def weir_import(
    node: WeirNode, count: int, endpoints: dict[str, int]
) -> tuple[float, float, tuple[float, float], list[str]]:
    """Import `count` rules and check every endpoint's map; returns seconds, service CPU seconds,
    (CPU, run-queue wait) of the services' busiest threads meanwhile, and the rule names."""
    batch = rules(count, len(endpoints), f"r{count}")
    cpu, threads = service_cpu(node), {name: thread_times(p.pid) for name, p in node.processes.items()}
    reply, took = node.import_rules(batch)
    cpu, path = service_cpu(node) - cpu, busiest_threads(node, threads)
    if set(reply.endpoints) != set(endpoints):
        raise RuntimeError(f"import of {count} rules rewrote {sorted(reply.endpoints)}, expected {sorted(endpoints)}")
    for name, endpoint_id in sorted(endpoints.items()):
        entries, flags = datapath_policy(node, endpoint_id)
        want = len(range(int(name.removeprefix("ep")), count, len(endpoints)))
        if entries != want or not flags & ConfigFlag.EGRESS_ENFORCED:
            raise RuntimeError(f"{name}: {entries} policy map entries (flags {flags}) after the import, want {want}")
    return took, cpu, path, [r.name for r in batch]


def children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


def iptables_restore(ns: str, count: int, endpoints: int) -> tuple[float, float]:
    """Seconds and CPU seconds of one `iptables-restore` of the rules inside `ns` (checked by counting them after)."""
    text = iptables_rules(count, endpoints)
    cpu = children_cpu()
    start = time.perf_counter()
    run("iptables-restore", ns=ns, stdin=text, timeout=CALL_TIMEOUT)
    took = time.perf_counter() - start
    cpu = children_cpu() - cpu
    listed = run("iptables", "-S", "FORWARD", ns=ns).stdout.count("-A FORWARD")
    if listed != count:
        raise RuntimeError(f"iptables-restore left {listed} FORWARD rules, expected {count}")
    return took, cpu


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(node: WeirNode, seconds: float) -> float:
    """The policy service's CPU use while nobody calls it, in cores."""
    pid = node.processes["policy"].pid
    before, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - start)


@dataclass(frozen=True)
class Imported:
    """One run: per size (rules, Weir import s, iptables-restore s, the CPU seconds of each side, and
    the CPU and run-queue seconds of the services' busiest threads), deletes, idle CPU, exit time."""

    endpoints: int
    sizes: list[tuple[int, float, float, float, float, tuple[float, float]]]
    deleted: list[tuple[int, float]]
    idle_cores: float
    idle_seconds: float
    stopped: float | None


def measure(sizes: list[int], endpoints: int, idle_seconds: float, stop_grace: float) -> Imported:
    """Both sides, size by size (iptables-restore right before Weir's import of the same size)."""
    ipt_ns = f"{PREFIX}-ipt"
    results: list[tuple[int, float, float, float, float, tuple[float, float]]] = []
    deleted: list[tuple[int, float]] = []
    try:
        netns.create(ipt_ns)
        with weir_node("imp", [("orchestrator", []), ("policy", [])]) as node:
            ids = {
                f"ep{i}": node.create_endpoint(f"ep{i}", endpoint_address(i), {"app": f"ep{i}"}).id
                for i in range(endpoints)
            }
            loaded: list[str] = []
            for count in sizes:
                if loaded:
                    start = time.perf_counter()
                    node.delete_rules(loaded)
                    deleted.append((len(loaded), time.perf_counter() - start))
                ipt, ipt_cpu = iptables_restore(ipt_ns, count, endpoints)
                took, cpu, path, loaded = weir_import(node, count, ids)
                results.append((count, took, ipt, cpu, ipt_cpu, path))
            idle = idle_cpu(node, idle_seconds)
            stopped = stop(node.processes["policy"], grace=stop_grace)
    finally:
        netns.remove(ipt_ns)
    return Imported(endpoints, results, deleted, idle, idle_seconds, stopped)


def report(result: Imported) -> None:
    print(
        f"{result.endpoints} endpoints; rule i selects app=ep<i mod {result.endpoints}> and allows egress to its own "
        f"/32 on TCP/{PORT}; seconds from the client's side"
    )
    print(f"{'rules':>7}{'weir import s':>15}{'iptables-restore s':>20}{'weir/iptables':>15}{'weir ms/rule':>14}")
    for count, imported, ipt, _, _, _ in result.sizes:
        print(f"{count:>7}{imported:>15.2f}{ipt:>20.3f}{imported / ipt:>15.1f}{imported * 1000 / count:>14.2f}")
    print("CPU seconds (the policy and orchestrator processes; iptables-restore): less sensitive to a busy machine")
    for count, _, _, cpu, ipt_cpu, _ in result.sizes:
        print(f"{count:>7}{cpu:>15.2f}{ipt_cpu:>20.3f}{_ratio(cpu, ipt_cpu):>15.1f}")
    print("where Weir's import seconds went: the CPU of each service's busiest thread (its worker), their wait")
    print("for a CPU (run queue: other work on the machine), the rest (the client, gRPC, the event loops, fsync)")
    print(f"{'rules':>7}{'import s':>15}{'workers CPU s':>15}{'run queue s':>13}{'rest s':>9}")
    for count, imported, _, _, _, (path_cpu, waiting) in result.sizes:
        rest = imported - path_cpu - waiting
        print(f"{count:>7}{imported:>15.2f}{path_cpu:>15.2f}{waiting:>13.2f}{rest:>9.2f}")
    for count, took in result.deleted:
        print(f"DeleteRules of {count} rules: {took:.2f} s ({took * 1000 / count:.3f} ms/rule)")
    last = result.sizes[-1][0]
    print(
        f"policy service CPU while idle with {last} rules: {result.idle_cores:.2f} cores over {result.idle_seconds:g} s"
    )
    print(
        "policy service exit on SIGTERM after that: "
        + (f"{result.stopped:.2f} s" if result.stopped is not None else "not within the grace time (killed)")
    )


def _count(n: int) -> str:
    """10000 -> "10k" for the summary's measure names."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _ratio(a: float, b: float) -> float:
    """a / b; NaN when b is 0 (CPU seconds come in clock ticks: a short run may show none)."""
    return a / b if b else float("nan")


def summary_rows(rules: int = SIZES[-1], endpoints: int = ENDPOINTS) -> list[tuple[str, float, float, float]]:
    """(measure, Weir s, iptables-restore s, ratio) of one import of `rules` rules, for bench.all."""
    result = measure([rules], endpoints, idle_seconds=0.5, stop_grace=STOP_GRACE)
    report(result)
    _, weir, ipt, cpu, ipt_cpu, _ = result.sizes[-1]
    return [
        (f"import {_count(rules)} rules over {endpoints} endpoints (s)", weir, ipt, weir / ipt),
        (
            f"import {_count(rules)} rules, CPU s (services; iptables-restore)",
            cpu,
            ipt_cpu,
            _ratio(cpu, ipt_cpu),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="rule counts, comma-separated (default %(default)s)"
    )
    parser.add_argument("--endpoints", type=int, default=ENDPOINTS, help="endpoints (default %(default)s)")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=IDLE_SECONDS,
        help="seconds to watch the idle service's CPU after the last import (default %(default)s)",
    )
    parser.add_argument(
        "--stop-grace",
        type=float,
        default=STOP_GRACE,
        help="seconds the service gets to exit on SIGTERM before SIGKILL (default %(default)s)",
    )
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if not 1 <= args.endpoints <= 200:
        parser.error("--endpoints must be between 1 and 200")
    exit_on_sigterm()
    report(measure(sizes, args.endpoints, args.idle_seconds, args.stop_grace))


if __name__ == "__main__":
    main()
