"""Where a new connection through a VIP spends what the direct path does not.

Sets up the Weir side of bench.lb_connect_rate (a node, a client, 3 backends,
N services with the fillers written into the maps), then alternates runs of
the client loop to the last VIP and to the same backends without a VIP. Each
run records, per connection: the BPF programs' run time (kernel.bpf_stats_enabled,
run_time_ns and run_cnt of this node's programs), the CPU of each service
process (schedstat, all threads) and of the client, and the connection rate.

    sudo .venv/bin/python -m bench.lb_vip_profile [--services N] [--seconds S] [--rounds R]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.lb_connect_rate import CLIENT, CONNECT_TIMEOUT, Processes, client_sysctls, teardown, weir_setup
from bench.lb_cost import BACKEND_PORT, PORT, vip
from bench.netbench import exit_on_sigterm
from tests.harness.node import Node, cpu_seconds


def node_maps(root: Path) -> set[int]:
    """Ids of the maps pinned under the node's bpffs root."""
    ids = set()
    for pin in root.rglob("*"):
        if pin.is_file():
            done = subprocess.run(["bpftool", "-j", "map", "show", "pinned", str(pin)], capture_output=True, text=True)
            if done.returncode == 0:
                ids.add(json.loads(done.stdout)["id"])
    return ids


def prog_stats(maps: set[int]) -> dict[str, tuple[int, int]]:
    """name -> (run_time_ns, run_cnt), summed over the programs that use these maps."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    stats: dict[str, tuple[int, int]] = {}
    for prog in json.loads(out):
        if not set(prog.get("map_ids", [])) & maps:
            continue
        name = prog.get("name", str(prog["id"]))
        ns, cnt = stats.get(name, (0, 0))
        stats[name] = (ns + prog.get("run_time_ns", 0), cnt + prog.get("run_cnt", 0))
    return stats


def client_run(ns: str, hosts: str, port: int, seconds: float) -> tuple[dict[str, object], float]:
    """The client loop; returns its JSON and its own CPU seconds (user + system)."""
    before = os.times()
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, hosts, str(port), str(seconds), str(CONNECT_TIMEOUT)],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    )  # fmt: skip
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return json.loads(done.stdout), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--orchestrator-arg", action="append", default=[], help="one more orchestrator argument")
    parser.add_argument("--perf", type=Path, help="perf record -a in one more run per target, perf.data files here")
    parser.add_argument("--spy", type=Path, help="py-spy the orchestrator in one more run per target, stacks here")
    args = parser.parse_args()
    exit_on_sigterm()
    pid = os.getpid()
    workdir = Path(tempfile.mkdtemp(prefix=f"wp{pid}-"))
    node = Node(f"wp{pid}", workdir)
    plain_start = node.start

    def start_with(service: str, *extra: str, timeout: float = 120.0) -> object:
        more = tuple(args.orchestrator_arg) if service == "orchestrator" else ()
        return plain_start(service, *extra, *more, timeout=timeout)

    node.start = start_with  # type: ignore[method-assign,assignment]
    processes = Processes()
    old = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
    try:
        last = args.services - 1
        side = weir_setup(node, processes, args.services, [last], 3, "maps")
        client_sysctls(side.client_ns)
        services = {name: s.process.pid for name, s in node.services.items()}
        # the services run under nsenter: their python is the child
        procs = {}
        for name, p in services.items():
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            procs[name] = int(kids[0]) if kids else p
        maps = node_maps(node.bpffs_root)
        Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1")
        targets = {"VIP": (vip(last), PORT), "direct": (",".join(side.backends), BACKEND_PORT)}
        for hosts, port in targets.values():
            client_run(side.client_ns, hosts, port, 0.5)
        rows: dict[str, list[dict[str, float]]] = {k: [] for k in targets}
        for round_ in range(args.rounds):
            order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
            for label in order:
                hosts, port = targets[label]
                cpu0 = {n: cpu_seconds(p) for n, p in procs.items()}
                bpf0 = prog_stats(maps)
                start = time.perf_counter()
                data, client_cpu = client_run(side.client_ns, hosts, port, args.seconds)
                wall = time.perf_counter() - start
                bpf1 = prog_stats(maps)
                cpu1 = {n: cpu_seconds(p) for n, p in procs.items()}
                conns = int(data["connections"])  # type: ignore[call-overload]
                row: dict[str, float] = {"conn/s": conns / float(data["seconds"])}  # type: ignore[arg-type]
                row["client us/conn"] = client_cpu / conns * 1e6
                for n in procs:
                    row[f"{n} us/conn"] = (cpu1[n] - cpu0[n]) / conns * 1e6
                for name, (ns1, c1) in bpf1.items():
                    ns0, c0 = bpf0.get(name, (0, 0))
                    if c1 > c0:
                        row[f"bpf {name} ns/conn"] = (ns1 - ns0) / conns
                        row[f"bpf {name} runs/conn"] = (c1 - c0) / conns
                row["wall"] = wall
                rows[label].append(row)
                print(f"round {round_ + 1} {label}: {row['conn/s']:.0f} conn/s", flush=True)
        if args.perf:
            args.perf.mkdir(parents=True, exist_ok=True)
            for label, (hosts, port) in targets.items():
                argv = [
                    "perf",
                    "record",
                    "-a",
                    "-g",
                    "-o",
                    str(args.perf / f"{label}.data"),
                    "sleep",
                    str(args.seconds),
                ]
                perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                data, _ = client_run(side.client_ns, hosts, port, args.seconds)
                perf.wait(timeout=60)
                print(f"perf {label}: {data['connections']} connections", flush=True)
        if args.spy:
            args.spy.mkdir(parents=True, exist_ok=True)
            for label, (hosts, port) in targets.items():
                out = str(args.spy / f"{label}.txt")
                orchestrator = str(procs["orchestrator"])
                argv = ["py-spy", "record", "-r", "200", "-f", "raw", "-o", out, "-p", orchestrator, "-d", "3"]
                spy = subprocess.Popen(argv)
                client_run(side.client_ns, hosts, port, args.seconds)
                spy.wait(timeout=60)
        keys = sorted({k for rs in rows.values() for r in rs for k in r})
        print(f"\n{'median per connection':<44}{'VIP':>12}{'direct':>12}{'VIP-direct':>12}")
        for k in keys:
            v = statistics.median(r.get(k, 0.0) for r in rows["VIP"])
            d = statistics.median(r.get(k, 0.0) for r in rows["direct"])
            print(f"{k:<44}{v:>12.2f}{d:>12.2f}{v - d:>12.2f}")
    finally:
        with contextlib.suppress(OSError):
            Path("/proc/sys/kernel/bpf_stats_enabled").write_text(old)
        processes.stop()
        teardown(node)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
