"""Where a new connection through a VIP spends what the direct path does not.

Sets up the Weir side of bench.lb_connect_rate (a node, a client, 3 backends,
N services with the fillers written into the maps), then alternates runs of
the client loop to the last VIP and to the same backends without a VIP. Each
run records, per connection: the BPF programs' run time (kernel.bpf_stats_enabled,
run_time_ns and run_cnt of this node's programs), the CPU of each service
process (schedstat, all threads) and of the client, and the connection rate.
Unlike bench.lb_connect_rate's interleaved slices, each target has windows of its
own, so what a connection leaves for later (events read by the orchestrator,
conntrack entries its GC walks) is charged to the target that caused it.
kernel.bpf_stats_enabled is machine-wide: it is set for the run and put back.
--perf DIR records `perf record -a -g` in one more run per target, --spy DIR a
py-spy profile of the orchestrator; --orchestrator-arg passes a flag (e.g.
--flow-event-limit=translate=off) to try a change without rebuilding.

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
from dataclasses import dataclass
from pathlib import Path

from bench.lb_connect_rate import CLIENT, CONNECT_TIMEOUT, STALL, Processes, client_sysctls, teardown, weir_setup
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
        ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, hosts, str(port), str(seconds),
         str(CONNECT_TIMEOUT), str(STALL)],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    )  # fmt: skip
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return json.loads(done.stdout), cpu


@dataclass
class Options:
    services: int = 10_000
    seconds: float = 3.0
    rounds: int = 4
    orchestrator_args: tuple[str, ...] = ()
    perf: Path | None = None
    spy: Path | None = None


Rows = dict[str, list[dict[str, float]]]  # target -> one dict of per-connection figures per round


def profile(opts: Options) -> Rows:
    """Set up the node, alternate the two targets for `rounds` rounds, remove everything."""
    pid = os.getpid()
    workdir = Path(tempfile.mkdtemp(prefix=f"wp{pid}-"))
    node = Node(f"wp{pid}", workdir)
    plain_start = node.start

    def start_with(service: str, *extra: str, timeout: float = 120.0) -> object:
        more = opts.orchestrator_args if service == "orchestrator" else ()
        return plain_start(service, *extra, *more, timeout=timeout)

    node.start = start_with  # type: ignore[method-assign,assignment]
    processes = Processes()
    stats_switch = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = stats_switch.read_text().strip()
    try:
        last = opts.services - 1
        side = weir_setup(node, processes, opts.services, [last], 3, "maps")
        client_sysctls(side.client_ns)
        procs = {}
        for name, s in node.services.items():  # the services run under nsenter: their python is its child
            kids = Path(f"/proc/{s.process.pid}/task/{s.process.pid}/children").read_text().split()
            procs[name] = int(kids[0]) if kids else s.process.pid
        maps = node_maps(node.bpffs_root)
        stats_switch.write_text("1")
        targets = {"VIP": (vip(last), PORT), "direct": (",".join(side.backends), BACKEND_PORT)}
        for hosts, port in targets.values():
            client_run(side.client_ns, hosts, port, 0.5)
        rows: Rows = {k: [] for k in targets}
        for round_ in range(opts.rounds):
            order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
            for label in order:
                hosts, port = targets[label]
                cpu0 = {n: cpu_seconds(p) for n, p in procs.items()}
                bpf0 = prog_stats(maps)
                data, client_cpu = client_run(side.client_ns, hosts, port, opts.seconds)
                bpf1 = prog_stats(maps)
                cpu1 = {n: cpu_seconds(p) for n, p in procs.items()}
                conns = int(data["connections"])  # type: ignore[call-overload]
                row: dict[str, float] = {"conn/s": conns / float(data["seconds"])}  # type: ignore[arg-type]
                row["client us/conn"] = client_cpu / conns * 1e6
                for n in procs:
                    row[f"{n} us/conn"] = (cpu1[n] - cpu0[n]) / conns * 1e6
                row["services us/conn"] = sum(row[f"{n} us/conn"] for n in procs)
                row["bpf ns/conn"] = 0.0
                for name, (ns1, c1) in bpf1.items():
                    ns0, c0 = bpf0.get(name, (0, 0))
                    if c1 > c0:
                        row[f"bpf {name} ns/conn"] = (ns1 - ns0) / conns
                        row[f"bpf {name} runs/conn"] = (c1 - c0) / conns
                        row["bpf ns/conn"] += (ns1 - ns0) / conns
                rows[label].append(row)
                print(f"round {round_ + 1} {label}: {row['conn/s']:.0f} conn/s", flush=True)
        if opts.perf:
            opts.perf.mkdir(parents=True, exist_ok=True)
            for label, (hosts, port) in targets.items():
                argv = ["perf", "record", "-a", "-g", "-o", str(opts.perf / f"{label}.data"), "sleep", "3"]
                perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                data, _ = client_run(side.client_ns, hosts, port, 3.0)
                perf.wait(timeout=60)
                print(f"perf {label}: {data['connections']} connections", flush=True)
        if opts.spy:
            opts.spy.mkdir(parents=True, exist_ok=True)
            for label, (hosts, port) in targets.items():
                out = str(opts.spy / f"{label}.txt")
                argv = ["py-spy", "record", "-r", "200", "-f", "raw", "-o", out, "-p", str(procs["orchestrator"])]
                spy = subprocess.Popen([*argv, "-d", "3"])
                client_run(side.client_ns, hosts, port, 3.0)
                spy.wait(timeout=60)
        return rows
    finally:
        with contextlib.suppress(OSError):
            stats_switch.write_text(old)
        processes.stop()
        teardown(node)
        shutil.rmtree(workdir, ignore_errors=True)


def median(rows: Rows, target: str, key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in rows[target])


def report(rows: Rows) -> None:
    keys = sorted({k for rs in rows.values() for r in rs for k in r})
    print(f"\n{'median per connection':<44}{'VIP':>12}{'direct':>12}{'VIP-direct':>12}")
    for k in keys:
        v, d = median(rows, "VIP", k), median(rows, "direct", k)
        print(f"{k:<44}{v:>12.2f}{d:>12.2f}{v - d:>12.2f}")


def summary_rows(
    services: int = 10_000, seconds: float = 3.0, rounds: int = 4
) -> list[tuple[str, float, float, float]]:
    """VIP and direct in separate windows, so work a connection leaves behind (events, conntrack
    GC) counts against the target that caused it, which the interleaved slices of
    bench.lb_connect_rate spread over every target. Medians over rounds."""
    rows = profile(Options(services, seconds, rounds))
    report(rows)
    vip_rate, direct_rate = median(rows, "VIP", "conn/s"), median(rows, "direct", "conn/s")
    vip_cpu, direct_cpu = median(rows, "VIP", "services us/conn"), median(rows, "direct", "services us/conn")
    vip_bpf, direct_bpf = median(rows, "VIP", "bpf ns/conn") / 1e3, median(rows, "direct", "bpf ns/conn") / 1e3
    return [
        ("TCP conn/s, VIP vs no VIP, separate windows", vip_rate, direct_rate, vip_rate / direct_rate),
        ("services' CPU us per connection, VIP vs no VIP", vip_cpu, direct_cpu, vip_cpu / direct_cpu),
        ("BPF us per connection, VIP vs no VIP", vip_bpf, direct_bpf, vip_bpf / direct_bpf),
    ]


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
    opts = Options(args.services, args.seconds, args.rounds, tuple(args.orchestrator_arg), args.perf, args.spy)
    report(profile(opts))


if __name__ == "__main__":
    main()
