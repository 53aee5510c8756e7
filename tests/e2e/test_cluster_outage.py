"""etcd stopped for 30 s under traffic: nothing lost between existing endpoints, and an
endpoint made meanwhile is published (reachable, known by its labels) once etcd returns.

Three nodes in cluster mode on one etcd (tests/harness/kvnet.py), joined by an underlay
(tests/harness/multinode.py). Node 2 is reached through the VXLAN overlay (the VNI
carries the sender's identity), nodes 1 and 3 directly (the receiver looks the sender up
in its ipcache, which cluster mode fills from etcd). The servers on nodes 2 and 3 admit
only `app=client`, so every counted packet also passes a label policy that depends on what
etcd told the receiving node. While etcd is down (a real stop of its process, longer than
any node's lease) numbered UDP datagrams and a TCP connection echoing numbered messages
cross the nodes; each datagram must arrive and each message come back, before, during
and after the outage (the streams run on until well past one lease after etcd returns,
when a node that lost its lease would have been dropped by the others). Meanwhile the
outage shows in `weir status`, and a label set the cluster has not numbered is refused with
UNAVAILABLE (no global identity without etcd).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import pytest
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.policy.v1 import policy_pb2 as pol_pb
from weir.policy.v1 import policy_pb2_grpc as pol_grpc

from tests.harness import traffic
from tests.harness.echo import EchoStream
from tests.harness.etcd import ETCD, MISSING
from tests.harness.kvnet import KvNetwork
from tests.harness.multinode import Member, MultiNode, ipcache, node_names, status
from tests.harness.node import REPO, Node, pid_prefix

pytestmark = [pytest.mark.root, pytest.mark.skipif(ETCD is None, reason=MISSING)]

LEASE = 4  # seconds: each node's lease; the outage lasts far longer
OUTAGE = 30.0  # seconds etcd is down
AFTER = 2 * LEASE  # seconds the streams run on after etcd is back (a lapsed lease would show by then)
UDP_RATE = 100  # datagrams a second per stream
UDP_PORT, TCP_PORT = 5300, 8080


def weir(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI against a node (its unix sockets reach the node from anywhere)."""
    argv = [sys.executable, "-m", "services.cli", "--instance", node.name, "--run-dir", str(node.run_dir), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)


def disconnected(node: Node) -> bool:
    return not status(node).connected


def holds(node: Node, entries: dict[str, int]) -> bool:
    return entries.items() <= ipcache(node).items()


def settled(node: Node) -> bool:
    now = status(node)
    return now.connected and now.pending_changes == 0


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - start


def admit_clients(member: Member) -> None:
    """On this node, `app=server` takes UDP UDP_PORT.. and TCP TCP_PORT.. from `app=client` only."""
    rule = pol_pb.Rule(
        name="server-in",
        endpoint_selector=pol_pb.EndpointSelector(match_labels={"app": "server"}),
        ingress=[
            pol_pb.PeerRule(
                endpoints=[pol_pb.EndpointSelector(match_labels={"app": "client"})],
                ports=[
                    pol_pb.PortRule(port=UDP_PORT, end_port=UDP_PORT + 9, protocol="UDP"),
                    pol_pb.PortRule(port=TCP_PORT, end_port=TCP_PORT + 9, protocol="TCP"),
                ],
            )
        ],
    )
    with member.node.channel("policy") as channel:
        pol_grpc.PolicyStub(channel).ImportRules(pol_pb.ImportRulesRequest(rules=[rule]), timeout=20)


def tcp_ok(src: orch_pb.Endpoint, dst: orch_pb.Endpoint, port: int) -> bool:
    with traffic.server(dst.netns, dst.ipv4, port):
        return traffic.tcp_connects(src.netns, dst.ipv4, port, timeout=1.5)


@dataclass
class Cluster:
    kv: KvNetwork
    nodes: MultiNode

    def member(self, i: int) -> Member:
        return self.nodes.members[i - 1]

    def node(self, i: int) -> Node:
        return self.member(i).node


@pytest.fixture
def cluster(tmp_path: Path, built: Path) -> Iterator[Cluster]:
    prefix = f"{pid_prefix()}o"
    kv = KvNetwork(f"{prefix}kv")
    nodes = MultiNode(prefix, tmp_path)
    try:
        kv.setup()
        flags = ("--kvstore-lease-seconds", str(LEASE))
        nodes.setup(3, kvnet=kv, cluster_flags=flags, routing=("direct", "vxlan", "direct"))
        yield Cluster(kv, nodes)
    finally:
        nodes.teardown()
        kv.teardown()


def test_etcd_outage_under_traffic_loses_nothing_and_publishes_what_was_made_meanwhile(cluster: Cluster) -> None:
    c = cluster
    names = {m.name for m in c.nodes.members}
    for i in (1, 2, 3):
        wait_for(f"node {i} sees the three nodes", partial(node_names, c.node(i), names), 20)
    client1 = c.member(1).create_endpoint("client", {"app": "client"})
    other1 = c.member(1).create_endpoint("other", {"app": "other"})
    client3 = c.member(3).create_endpoint("client", {"app": "client"})
    server2 = c.member(2).create_endpoint("server", {"app": "server"})
    server3 = c.member(3).create_endpoint("server", {"app": "server"})
    for i in (2, 3):
        admit_clients(c.member(i))
    known = {f"{e.ipv4}/32": e.identity for e in (client1, other1, client3)}
    for i in (2, 3):
        wait_for(f"node {i} knows the clients", partial(holds, c.node(i), known), 10)
    # The label policy holds across nodes, in both routing modes, before anything is counted
    # (node 2 has no client of its own: it selects node 1's by the labels etcd gave it).
    wait_for("node 3 admits node 1's client", partial(tcp_ok, client1, server3, TCP_PORT), 10)
    wait_for("node 2 admits node 1's client", partial(tcp_ok, client1, server2, TCP_PORT), 10)
    assert not tcp_ok(other1, server3, TCP_PORT)

    pairs = {"1->2 (overlay)": (client1, server2), "1->3 (direct)": (client1, server3), "3->2": (client3, server2)}
    udp = {
        name: traffic.CountedStream(src.netns, dst.netns, dst.ipv4, UDP_PORT + n, rate=UDP_RATE)
        for n, (name, (src, dst)) in enumerate(pairs.items())
    }
    tcp = {
        name: EchoStream(src.netns, dst.netns, dst.ipv4, TCP_PORT + 1 + n)
        for n, (name, (src, dst)) in enumerate(list(pairs.items())[:2])
    }
    for counted in udp.values():
        counted.start()
    for connection in tcp.values():
        connection.start()
    try:
        time.sleep(2)
        before = {i: ipcache(c.node(i)) for i in (1, 2, 3)}
        c.kv.etcd.stop()
        stopped = time.monotonic()
        for i in (1, 2, 3):
            wait_for(f"node {i} reports the outage", partial(disconnected, c.node(i)), 10)

        # Made during the outage, with labels the cluster has numbered: it exists on node 1 at
        # once, but no other node knows it yet, so node 3 (direct routing) judges it as world.
        late = c.member(1).create_endpoint("late", {"app": "client"})
        assert late.identity == client1.identity
        assert status(c.node(1)).pending_changes >= 1
        assert f"{late.ipv4}/32" not in ipcache(c.node(3))
        assert not tcp_ok(late, server3, TCP_PORT)
        # `weir status` says so too (its exit code is about the services this test did not start).
        shown = json.loads(weir(c.node(1), "status", "-o", "json").stdout)["cluster"]
        assert shown["connected"] is False and "kvstore" in shown["last_error"]
        assert "NOT connected" in " ".join(weir(c.node(1), "status").stdout.split())
        with pytest.raises(grpc.RpcError) as refused:  # a new label set needs the cluster to number it
            c.member(1).create_endpoint("brand-new", {"app": "brand-new"})
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "kvstore" in str(refused.value.details())
        listed = c.node(1).orchestrator().ListEndpoints(orch_pb.ListEndpointsRequest(), timeout=10)
        assert "brand-new" not in {e.name for e in listed.endpoints}

        while time.monotonic() - stopped < OUTAGE:  # nothing known is dropped on any node meanwhile
            for i in (1, 2, 3):
                assert before[i].items() <= ipcache(c.node(i)).items(), f"node {i} dropped state while etcd was away"
            time.sleep(1)
        for i in (1, 2, 3):
            assert node_names(c.node(i), names), f"node {i} dropped a node while etcd was away"
        sent_during = {name: s.sent for name, s in udp.items()}

        c.kv.etcd.start()
        returned = time.monotonic()
        took = wait_for("node 3 knows the endpoint made meanwhile", lambda: f"{late.ipv4}/32" in ipcache(c.node(3)), 20)
        print(f"the endpoint made during the outage reached node 3 {took:.2f}s after etcd returned")
        for i in (2, 3):
            assert ipcache(c.node(i))[f"{late.ipv4}/32"] == late.identity
        assert tcp_ok(late, server3, TCP_PORT), "node 3 does not admit the new client by its labels"
        assert tcp_ok(late, server2, TCP_PORT)
        for i in (1, 2, 3):
            wait_for(f"node {i} connected with nothing pending", partial(settled, c.node(i)), 15)
        assert status(c.node(1)).last_error  # the outage stays reported
        time.sleep(max(0.0, AFTER - (time.monotonic() - returned)))  # past a lease that could have lapsed
        for i in (1, 2, 3):
            assert node_names(c.node(i), names), f"node {i} dropped a node after etcd returned"
    finally:
        udp_results = {name: s.finish() for name, s in udp.items()}
        tcp_results = {name: s.finish() for name, s in tcp.items()}
    for name, result in udp_results.items():
        print(f"UDP {name}: {result.sent} sent ({sent_during[name]} by the time etcd returned), "
              f"{result.received} received, {len(result.missing)} lost")  # fmt: skip
    for name, echo in tcp_results.items():
        print(f"TCP {name}: {echo.echoed}/{echo.sent} echoed, {echo.retransmits} segments retransmitted, "
              f"slowest round trip {echo.slowest * 1000:.1f} ms")  # fmt: skip
    for name, result in udp_results.items():
        assert sent_during[name] >= OUTAGE * UDP_RATE * 0.8, f"UDP {name} did not run through the outage"
        assert result.missing == [] and result.duplicates == 0, (
            f"UDP {name}: {len(result.missing)} of {result.sent} datagrams lost (first {result.missing[:10]})"
        )
    for name, echo in tcp_results.items():
        assert not echo.error and echo.echoed == echo.sent, f"TCP {name}: {echo}"
        assert echo.sent >= (OUTAGE + AFTER) * tcp[name].rate * 0.5, f"TCP {name} did not run through"
