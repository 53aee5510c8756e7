"""Several Weir nodes on one machine, joined by an underlay.

Each node is a `Node` (its own namespace, paths and service processes); instead of an
outside network it gets one veth (`ul0`) into an underlay namespace, where a bridge
joins them all, as a switch joins machines. Node i (1-based) has the underlay
addresses 172.31.0.i and fd00:31::i, owns the endpoint CIDRs 10.i.0.0/24 and
fd00:e:i::/64, and runs its orchestrator with those as its `--node-*` flags.
The underlay's MTU is 1550, so the overlay's VXLAN devices get 1500, as the endpoints.

`MultiNode.connect(mode)` tells every node about every other (UpsertNode) with one
routing mode; calling it again with the other mode switches all of them. Given a
`KvNetwork` (etcd in its own namespace), `setup` makes a cluster instead: each node is
joined to etcd and started with `--kvstore` and its `--routing`, and the nodes learn
each other from etcd alone.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc

from pybpf import Map
from services.common.datapath import IpcacheKey, IpcacheValue
from services.orchestrator.ipcache import ipcache_network
from tests.harness import netns
from tests.harness.kvnet import KvNetwork
from tests.harness.node import Node

UNDERLAY_MTU = 1550
BRIDGE = "br0"
MODES = {"direct": orch_pb.ROUTING_MODE_DIRECT, "vxlan": orch_pb.ROUTING_MODE_VXLAN}


def underlay_v4(i: int) -> str:
    return f"172.31.0.{i}"


def underlay_v6(i: int) -> str:
    return f"fd00:31::{i:x}"


def cidr_v4(i: int) -> str:
    return f"10.{i}.0.0/24"


def cidr_v6(i: int) -> str:
    return f"fd00:e:{i:x}::/64"


@dataclass
class Member:
    """One node of the set: its `Node`, its number and the endpoints made on it."""

    node: Node
    index: int
    routing: str = "direct"
    _next: Iterator[int] = field(default_factory=lambda: itertools.count(10))

    @property
    def name(self) -> str:
        return self.node.name

    def orchestrator(self) -> orch_grpc.OrchestratorStub:
        return self.node.orchestrator()

    def record(self, mode: str) -> orch_pb.Node:
        return orch_pb.Node(
            name=self.name,
            node_id=self.index,
            addresses=[underlay_v4(self.index), underlay_v6(self.index)],
            cidrs=[cidr_v4(self.index), cidr_v6(self.index)],
            routing=MODES[mode],
        )

    def flags(self) -> tuple[str, ...]:
        """The orchestrator's --node-* flags of this node (and its --routing)."""
        return (
            "--node-id", str(self.index),
            "--node-address", underlay_v4(self.index),
            "--node-address", underlay_v6(self.index),
            "--node-cidr", cidr_v4(self.index),
            "--node-cidr", cidr_v6(self.index),
            "--routing", self.routing,
        )  # fmt: skip

    def create_endpoint(self, name: str, labels: dict[str, str]) -> orch_pb.Endpoint:
        """An endpoint with the next addresses of this node's CIDRs."""
        n = next(self._next)
        request = orch_pb.CreateEndpointRequest(
            name=name, ipv4=f"10.{self.index}.0.{n}", ipv6=f"fd00:e:{self.index:x}::{n:x}", labels=labels
        )
        return self.orchestrator().CreateEndpoint(request, timeout=20)


@dataclass
class MultiNode:
    """Nodes joined by an underlay bridge in its own namespace."""

    prefix: str
    workdir: Path
    members: list[Member] = field(default_factory=list)

    @property
    def underlay(self) -> str:
        return f"{self.prefix}-ul"

    def setup(
        self,
        count: int,
        services: tuple[str, ...] = ("orchestrator", "policy"),
        kvnet: KvNetwork | None = None,
        cluster_flags: tuple[str, ...] = (),
        routing: tuple[str, ...] = (),
    ) -> MultiNode:
        """`count` nodes; with `kvnet`, in cluster mode on its etcd (`cluster_flags` added to
        each orchestrator's). `routing[i - 1]` is node i's --routing (direct if not given)."""
        netns.create(self.underlay)
        netns.run(self.underlay, "ip", "link", "add", BRIDGE, "type", "bridge")
        netns.run(self.underlay, "ip", "link", "set", BRIDGE, "up")
        for i in range(1, count + 1):
            node = Node(f"{self.prefix}m{i}", self.workdir / f"m{i}")
            self.members.append(Member(node, i, routing[i - 1] if i <= len(routing) else "direct"))
            node.workdir.mkdir(parents=True, exist_ok=True)
            node.cgroup_root.mkdir(exist_ok=True)
            netns.create(node.ns)
            port = f"p{i}"
            netns.run(node.ns, "ip", "link", "add", "ul0", "mtu", str(UNDERLAY_MTU), "type", "veth",
                      "peer", "name", port, "mtu", str(UNDERLAY_MTU), "netns", self.underlay)  # fmt: skip
            netns.run(self.underlay, "ip", "link", "set", port, "master", BRIDGE, "up")
            netns.run(node.ns, "ip", "addr", "add", f"{underlay_v4(i)}/24", "dev", "ul0")
            netns.run(node.ns, "ip", "-6", "addr", "add", f"{underlay_v6(i)}/64", "dev", "ul0", "nodad")
            netns.run(node.ns, "ip", "link", "set", "ul0", "up")
            netns.run(node.ns, "ip", "link", "set", "lo", "up")
        kv_flags = {m.index: ("--kvstore", kvnet.join(m.node), *cluster_flags) if kvnet else () for m in self.members}

        def start(member: Member) -> None:
            member.node.start("orchestrator", *member.flags(), *kv_flags[member.index], timeout=90)
            for service in services[1:]:
                member.node.start(service, timeout=90)

        with ThreadPoolExecutor(len(self.members)) as pool:  # the nodes start side by side, as machines do
            list(pool.map(start, self.members))
        return self

    def connect(self, mode: str) -> None:
        """Every node learns every other one, routed in `mode`."""
        for member in self.members:
            stub = member.orchestrator()
            for other in self.members:
                if other is not member:
                    stub.UpsertNode(orch_pb.UpsertNodeRequest(node=other.record(mode)), timeout=20)

    def teardown(self) -> None:
        for member in self.members:
            member.node.teardown()
        netns.remove(self.underlay)

    def capture(self, seconds: float, bpf_filter: str) -> subprocess.Popen[str]:
        """Start tcpdump on the underlay bridge; `.communicate()` gives its text output."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.underlay, "timeout", str(seconds), "tcpdump", "-l", "-n", "-i", BRIDGE,
             bpf_filter],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip


@contextlib.contextmanager
def multinode(prefix: str, workdir: Path, count: int = 3) -> Iterator[MultiNode]:
    nodes = MultiNode(prefix, workdir)
    try:
        yield nodes.setup(count)
    finally:
        nodes.teardown()


def ipcache(node: Node) -> dict[str, int]:
    """The node's pinned ipcache, as its datapath reads it."""
    with Map.from_pin(node.bpffs_root / "globals/ipcache", key_type=IpcacheKey, value_type=IpcacheValue) as m:
        return {str(ipcache_network(k)): int(v.identity) for k, v in m.items()}


def status(node: Node) -> orch_pb.ClusterStatus:
    with node.channel("orchestrator") as channel:
        return orch_grpc.OrchestratorStub(channel).GetClusterStatus(orch_pb.GetClusterStatusRequest(), timeout=10)


def node_names(node: Node, names: set[str]) -> bool:
    return {n.name for n in status(node).nodes} == names
