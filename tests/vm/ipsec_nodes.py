"""Two Weir nodes joined by an underlay, with the ipsec service, for the VM tier and the benchmark.

Each node is a `Node` of the test harness (its own namespace, outside and suite
processes: orchestrator and ipsec) with one endpoint; an
underlay veth `wund0` joins the two node namespaces (10.99.0.1 <-> 10.99.0.2), routes
send each node's endpoint ranges (IPv4 and IPv6) to the other over it (direct routing;
the IPv6 range via the other's fd99:: address, though ESP carries it between the IPv4
underlay addresses), and the
orchestrator runs the from-network chain on it so ESP from the peer is marked for
decryption. The orchestrators know their own node (id, underlay, CIDR) from their
flags, so each can be told of the other with UpsertNode (`node_record`).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from weir.ipsec.v1 import ipsec_pb2 as pb
from weir.ipsec.v1 import ipsec_pb2_grpc as pb_grpc
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc

from tests.harness import netns
from tests.harness.node import Node

UNDERLAY_IF = "wund0"
START_TIMEOUT = float(os.environ.get("WEIR_VM_START_TIMEOUT", "400"))  # TCG: Python starts 30-45 s per service


@dataclass
class IpsecNode:
    node: Node
    node_id: int
    underlay: str
    cidr: str
    endpoint_ip: str
    cidr6: str = ""
    endpoint_ip6: str = ""
    underlay6: str = ""  # the IPv6 routes' gateway: a packet that escaped ESP would go there in plaintext
    endpoint_ns: str = ""

    def ipsec(self) -> pb_grpc.IpsecStub:
        return pb_grpc.IpsecStub(self.node.channel("ipsec"))

    def info(self, spi: int) -> pb.Peer:
        cidrs = [self.cidr, self.cidr6] if self.cidr6 else [self.cidr]
        return pb.Peer(name=self.node.name, node_id=self.node_id, underlay=self.underlay, cidrs=cidrs, spi=spi)

    def node_record(self, key_index: int) -> orch_pb.Node:
        """This node as the other's orchestrator should know it (UpsertNode): VXLAN, its key index."""
        return orch_pb.Node(
            name=self.node.name,
            node_id=self.node_id,
            addresses=[self.underlay],
            cidrs=[self.cidr],
            routing=orch_pb.ROUTING_MODE_VXLAN,
            key_index=key_index,
        )


def parallel(*calls: Callable[[], object]) -> None:
    """Run the calls at once (service starts in the VM are slow); re-raise the first failure."""
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def write_key(path: Path, spi: int, secret: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{spi} rfc4106(gcm(aes)) {secret.hex()}\n")
    return path


def progress(what: str) -> None:
    """A line on stdout (the guest's log), for following a slow VM run."""
    print(f"[{time.monotonic():.1f}] {what}", flush=True)


def make_pair(workdir: Path, prefix: str, grace: float) -> tuple[IpsecNode, IpsecNode]:
    """Set up both nodes, start their services, create an endpoint on each; not yet peered."""
    progress("setting up the nodes")
    a = IpsecNode(Node(f"{prefix}a", workdir / "a"), 1, "10.99.0.1", "198.18.1.0/24", "198.18.1.10",
                  "2001:db8:a1::/64", "2001:db8:a1::10", "fd99::1")  # fmt: skip
    b = IpsecNode(Node(f"{prefix}b", workdir / "b"), 2, "10.99.0.2", "198.18.2.0/24", "198.18.2.10",
                  "2001:db8:a2::/64", "2001:db8:a2::10", "fd99::2")  # fmt: skip
    for n in (a, b):
        n.node.setup()
    veth = ("type", "veth", "peer", "name", UNDERLAY_IF, "netns", b.node.ns)
    netns.run(a.node.ns, "ip", "link", "add", UNDERLAY_IF, *veth)
    for n, other in ((a, b), (b, a)):
        netns.run(n.node.ns, "ip", "addr", "add", f"{n.underlay}/24", "dev", UNDERLAY_IF)
        netns.run(n.node.ns, "ip", "-6", "addr", "add", f"{n.underlay6}/64", "dev", UNDERLAY_IF, "nodad")
        netns.run(n.node.ns, "ip", "link", "set", UNDERLAY_IF, "up")
        netns.run(n.node.ns, "ip", "route", "add", other.cidr, "via", other.underlay, "dev", UNDERLAY_IF)
        netns.run(n.node.ns, "ip", "-6", "route", "add", other.cidr6, "via", other.underlay6, "dev", UNDERLAY_IF)
    progress("starting the orchestrators")
    starts = [
        functools.partial(
            n.node.start,
            "orchestrator",
            *("--node-id", str(n.node_id), "--node-address", n.underlay, "--node-cidr", n.cidr, "--node-cidr", n.cidr6),
            timeout=START_TIMEOUT,
        )
        for n in (a, b)
    ]
    parallel(*starts)
    progress("starting the ipsec services")
    extra = ("--rotation-grace", str(grace))
    parallel(*(functools.partial(n.node.start, "ipsec", *extra, timeout=START_TIMEOUT) for n in (a, b)))
    progress("creating the endpoints")
    for n in (a, b):
        with n.node.channel("orchestrator") as channel:
            orch = orch_grpc.OrchestratorStub(channel)
            request = orch_pb.CreateEndpointRequest(name="ep", ipv4=n.endpoint_ip, ipv6=n.endpoint_ip6)
            ep = orch.CreateEndpoint(request, timeout=120)
            orch.AttachDevice(orch_pb.AttachDeviceRequest(interface=UNDERLAY_IF), timeout=120)
        n.endpoint_ns = ep.netns
        with n.node.channel("ipsec") as channel:
            stub = pb_grpc.IpsecStub(channel)
            stub.SetLocalNode(
                pb.SetLocalNodeRequest(name=n.node.name, node_id=n.node_id, underlay=n.underlay), timeout=120
            )
    return a, b


def set_key(n: IpsecNode, key_file: Path) -> pb.KeyInfo:
    with n.node.channel("ipsec") as channel:
        return pb_grpc.IpsecStub(channel).SetKey(pb.SetKeyRequest(key_file=str(key_file)), timeout=120)


def peer(n: IpsecNode, other: IpsecNode, spi: int) -> pb.Peer:
    with n.node.channel("ipsec") as channel:
        return pb_grpc.IpsecStub(channel).UpsertPeer(other.info(spi), timeout=120)


def counters(n: IpsecNode) -> pb.Counters:
    with n.node.channel("ipsec") as channel:
        return pb_grpc.IpsecStub(channel).GetCounters(pb.GetCountersRequest(), timeout=120)
