"""Cluster mode through a real etcd: how fast an endpoint reaches the other nodes, and how
fast label identities are allocated when several nodes allocate at once.

(a) Convergence. Three nodes (tests.harness.node.Node, each an orchestrator process in
cluster mode) on one etcd in a namespace of its own (tests.harness.kvnet). For each of
--endpoints endpoints made on node A through CreateEndpoint, the time from the call
until node B's and node C's pinned ipcache map the endpoint's address to its identity
(polled every millisecond). Printed as p50/p99 from the call, and from CreateEndpoint's
reply (which takes the veth set-up out: what the cluster itself adds).

(b) Identity allocation. Etcd on a loopback port; `Cluster.allocate` (the code the
orchestrator calls for a new label set) in separate processes, each with its own etcd
client, as separate nodes would. First one node alone allocates --labels new label sets;
then three nodes allocate at once, each --labels label sets of which half are shared by
all three (they must agree on the numbers) and half its own. Printed: allocations per
second per node and for the cluster, lost races, and the ratio three-at-once ÷ alone.

Everything made here is removed at the end (namespaces, pins, processes, etcd's data).

    sudo .venv/bin/python -m bench.cluster_convergence [--endpoints N] [--labels N]
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import multiprocessing
import statistics
import time
from pathlib import Path
from tempfile import mkdtemp

from pybpf import Map
from services.common.datapath import IpcacheKey, IpcacheValue
from services.common.logs import setup_logging
from services.common.validate import Network
from services.orchestrator.cluster import Cluster, NodeRecord, RemoteEntry
from services.orchestrator.ipcache import ipcache_key
from services.orchestrator.kvstore import KvStore, KvStoreConfig
from tests.harness.etcd import EtcdServer
from tests.harness.kvnet import KvNetwork
from tests.harness.node import Node, pid_prefix

LEASE = 15
POLL_SECONDS = 0.001


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---- (a) convergence ----


def convergence(count: int) -> None:
    prefix = pid_prefix()
    kvnet = KvNetwork(f"{prefix}kv")
    nodes: list[Node] = []
    try:
        kvnet.setup()
        for index in range(3):
            node = Node(f"{prefix}c{index}", Path(mkdtemp(prefix=f"{prefix}c{index}-")))
            nodes.append(node)
            node.setup()
            node.endpoint_count = 100 * index
            url = kvnet.join(node)
            node.start("orchestrator", "--kvstore", url, "--kvstore-lease-seconds", str(LEASE))
        a, others = nodes[0], nodes[1:]
        maps = [
            Map.from_pin(n.bpffs_root / "globals/ipcache", key_type=IpcacheKey, value_type=IpcacheValue) for n in others
        ]
        from_call: list[float] = []
        from_reply: list[float] = []
        create_times: list[float] = []
        for i in range(count):
            start = time.monotonic()
            endpoint = a.create_endpoint(f"ep{i}", {"app": f"bench{i % 10}"}, ipv6=False)
            replied = time.monotonic()
            create_times.append(replied - start)
            key = ipcache_key(ipaddress.ip_network(f"{endpoint.ipv4}/32"))
            for ipcache in maps:
                deadline = replied + 30
                while True:
                    value = ipcache.lookup(key)
                    if value is not None and int(value.identity) == endpoint.identity:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{endpoint.name} did not reach another node within 30 s")
                    time.sleep(POLL_SECONDS)
                seen = time.monotonic()
                from_call.append(seen - start)
                from_reply.append(seen - replied)
        for ipcache in maps:
            ipcache.close()
        ms = 1000
        print(f"(a) convergence, 3 nodes, {count} endpoints made on A, seen in B's and C's pinned ipcache:")
        print(
            f"    from the CreateEndpoint call: p50 {percentile(from_call, 0.5) * ms:.1f} ms, "
            f"p99 {percentile(from_call, 0.99) * ms:.1f} ms"
        )
        print(
            f"    from its reply (the cluster's part): p50 {percentile(from_reply, 0.5) * ms:.1f} ms, "
            f"p99 {percentile(from_reply, 0.99) * ms:.1f} ms"
        )
        print(
            f"    CreateEndpoint itself: p50 {percentile(create_times, 0.5) * ms:.1f} ms; "
            f"cluster part / CreateEndpoint (p50): {percentile(from_reply, 0.5) / percentile(create_times, 0.5):.3f}"
        )
    finally:
        for node in nodes:
            node.teardown()
        kvnet.teardown()


# ---- (b) identity allocation ----


class _NoSink:
    def learn_identity(self, pairs: list[tuple[str, int]]) -> None:
        pass

    def remote_up(self, entries: list[RemoteEntry]) -> None:
        pass

    def remote_down(self, networks: list[Network]) -> None:
        pass

    def forget_identity(self, pairs: list[tuple[str, int]]) -> None:
        pass


def _allocate(url: str, name: str, keys: list[str], start_at: float) -> tuple[float, dict[str, int], int]:
    """One node's allocations (in its own process): seconds taken, numbers, lost races."""
    setup_logging("bench", "warning")
    kv = KvStore(KvStoreConfig((url,)))
    cluster = Cluster(kv, NodeRecord(name), _NoSink(), LEASE)
    kv.version()  # connected before the clock starts
    cluster.start({}, [])  # registered and watching, as in the orchestrator
    time.sleep(max(0.0, start_at - time.time()))
    start = time.monotonic()
    numbers = {key: cluster.allocate(key) for key in keys}
    took = time.monotonic() - start
    cluster.stop()
    return took, numbers, cluster.allocation_retries


def allocation(count: int) -> None:
    etcd = EtcdServer().start()
    spawn = multiprocessing.get_context("spawn")
    try:
        with spawn.Pool(3) as pool:
            alone_keys = [f"app=alone{i}" for i in range(count)]
            took, _, retries = pool.apply(_allocate, (etcd.url, "solo", alone_keys, time.time()))
            alone_rate = count / took
            shared = [f"app=shared{i}" for i in range(count // 2)]
            jobs = []
            start_at = time.time() + 2.0  # every process connected and waiting
            for node in ("a", "b", "c"):
                own = [f"app=own-{node}{i}" for i in range(count - len(shared))]
                keys = list(itertools.chain(*zip(shared, own, strict=False)))
                jobs.append(pool.apply_async(_allocate, (etcd.url, node, keys, start_at)))
            results = [job.get(timeout=600) for job in jobs]
        rates = [count / r[0] for r in results]
        agree = all(results[0][1][k] == r[1][k] for r in results for k in shared)
        numbers = [n for r in results for n in r[1].values()]
        distinct = len(set(numbers)) == len(shared) + 3 * (count - len(shared))
        print(f"(b) identity allocation through etcd, {count} new label sets per node:")
        print(f"    one node alone: {alone_rate:.0f}/s ({retries} lost races)")
        print(
            f"    three at once:  {statistics.mean(rates):.0f}/s per node, {sum(rates):.0f}/s for the cluster "
            f"({sum(r[2] for r in results)} lost races); shared labels agree: {agree}; numbers distinct: {distinct}"
        )
        print(f"    ratio per node three-at-once ÷ alone: {statistics.mean(rates) / alone_rate:.2f}")
        print(f"    ratio cluster three-at-once ÷ alone: {sum(rates) / alone_rate:.2f}")
    finally:
        etcd.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--endpoints", type=int, default=100)
    parser.add_argument("--labels", type=int, default=300)
    parser.add_argument("--skip-convergence", action="store_true", help="only (b): needs no root")
    args = parser.parse_args()
    allocation(args.labels)
    if not args.skip_convergence:
        convergence(args.endpoints)


if __name__ == "__main__":
    main()
