"""Cross-node traffic: the VXLAN overlay next to direct routing, in one run.

Two Weir nodes (orchestrator and policy as real processes, each in its own namespace)
joined by an underlay bridge (tests/harness/multinode.py, MTU 1550 so the overlay's
devices get 1500 as the endpoints have); a client endpoint on node 1, a server endpoint
on node 2. The rounds alternate the routing mode of both nodes (UpsertNode): direct,
vxlan, direct, vxlan, ..., each with a few seconds of one-stream iperf3 and of a Python
client that opens and resets connections one after another. It prints each round, the
median per mode, and overlay / direct. Everything it makes is removed afterwards.

    sudo .venv/bin/python -m bench.nodes_throughput [--seconds S] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from bench.netbench import exit_on_sigterm
from bench.policy_throughput import connection_rate, iperf
from tests.harness import traffic
from tests.harness.multinode import MultiNode

MODES = ("direct", "vxlan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of each measurement (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (default 3)")
    args = parser.parse_args()
    exit_on_sigterm()
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix=f"weir-bench-{os.getpid()}-") as tmp:
        nodes = MultiNode(f"wb{os.getpid() % 100000}", Path(tmp))
        try:
            nodes.setup(2)
            one, two = nodes.members
            client = one.create_endpoint("client", {"app": "client"})
            server = two.create_endpoint("server", {"app": "server"})
            for _ in range(args.rounds):
                for mode in MODES:
                    nodes.connect(mode)
                    if traffic.ping(client.netns, server.ipv4, count=2) != 2:
                        raise RuntimeError(f"{mode}: the server is not reachable from the client")
                    gbps = iperf(client.netns, server.netns, server.ipv4, args.seconds)
                    conns = connection_rate(client.netns, server.netns, server.ipv4, args.seconds)
                    results[mode].append((gbps, conns))
                    print(f"{mode:7} {gbps:7.2f} Gbit/s {conns:9.0f} conn/s", flush=True)
        finally:
            nodes.teardown()
    med = {m: (statistics.median(g for g, _ in r), statistics.median(c for _, c in r)) for m, r in results.items()}
    print()
    print(f"{'mode':7} {'Gbit/s':>8} {'conn/s':>9}   (median of {args.rounds} rounds of {args.seconds:g} s)")
    for mode in MODES:
        print(f"{mode:7} {med[mode][0]:8.2f} {med[mode][1]:9.0f}")
    print(f"overlay / direct: throughput {med['vxlan'][0] / med['direct'][0]:.2f}, "
          f"connection rate {med['vxlan'][1] / med['direct'][1]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
