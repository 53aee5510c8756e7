"""Three nodes on one machine, joined by an underlay bridge: remote nodes, direct and VXLAN routing.

The nodes (orchestrator and policy each) start once for the module; every test sets the
routing mode it needs with UpsertNode (`MultiNode.connect`). Each node has the same
endpoints, made in the same order: client (app=client), other (app=other), server
(app=server). Standalone nodes allocate identities on their own, so making the same label
sets in the same order is what gives them the same numbers here (cluster mode gives that
through etcd); the policy test checks it before it relies on it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.policy.v1 import policy_pb2 as pol_pb
from weir.policy.v1 import policy_pb2_grpc as pol_grpc

from pybpf import Map
from services.common.datapath import (
    NODE_ROUTE_PROTOCOL,
    VXLAN_PORT,
    IpcacheKey,
    IpcacheValue,
    ReservedIdentity,
    TunnelValue,
)
from services.common.lpm import ipcache_network
from services.common.overlay import overlay_ifname
from tests.harness import netns, traffic
from tests.harness.multinode import UNDERLAY_MTU, Member, MultiNode, cidr_v4, underlay_v4, underlay_v6
from tests.harness.node import REPO, pid_prefix

pytestmark = pytest.mark.root

ROLES = ("client", "other", "server")


@dataclass
class Cluster:
    nodes: MultiNode
    endpoints: dict[tuple[int, str], orch_pb.Endpoint]

    def member(self, i: int) -> Member:
        return self.nodes.members[i - 1]

    def ep(self, i: int, role: str) -> orch_pb.Endpoint:
        return self.endpoints[(i, role)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nodes = MultiNode(f"{pid_prefix()}mn", tmp_path_factory.mktemp("multinode"))
    try:
        nodes.setup(3)
        endpoints = {}
        for member in nodes.members:
            for role in ROLES:
                endpoints[(member.index, role)] = member.create_endpoint(role, {"app": role})
        yield Cluster(nodes, endpoints)
    finally:
        nodes.teardown()


def node_routes(member: Member) -> list[str]:
    """The destinations of the node's routes to remote nodes (our route protocol)."""
    out = "".join(
        netns.run(member.node.ns, "ip", family, "route", "show", "proto", str(NODE_ROUTE_PROTOCOL)).stdout
        for family in ("-4", "-6")
    )
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def tcp_ok(src: orch_pb.Endpoint, dst: orch_pb.Endpoint, address: str, port: int = 8080) -> bool:
    with traffic.server(dst.netns, address, port):
        return traffic.tcp_connects(src.netns, address, port, timeout=1.5)


def udp_ok(src: orch_pb.Endpoint, dst: orch_pb.Endpoint, port: int = 5353) -> bool:
    with traffic.server(dst.netns, dst.ipv4, port, "udp", reply=b"r:"):
        return traffic.udp_exchange(src.netns, dst.ipv4, port, b"q", timeout=1.5) == b"r:q"


def capture_while(c: Cluster, bpf_filter: str, run: Callable[[], None]) -> str:
    """tcpdump on the underlay bridge while `run()` sends traffic; its text output."""
    dump = c.nodes.capture(15, bpf_filter)
    assert dump.stderr is not None
    seen = [dump.stderr.readline() for _ in range(2)]  # "listening on br0 ..." once it captures
    assert any("listening" in line for line in seen), seen
    try:
        run()
        time.sleep(0.3)
    finally:
        dump.terminate()
    out, _ = dump.communicate(timeout=10)
    return out


@pytest.mark.parametrize("mode", ["direct", "vxlan"])
def test_tcp_udp_icmp_across_nodes_and_what_the_underlay_carries(cluster: Cluster, mode: str) -> None:
    c = cluster
    c.nodes.connect(mode)
    a, b, s3 = c.ep(1, "client"), c.ep(2, "server"), c.ep(3, "server")
    assert sorted(node_routes(c.member(1))) == sorted([cidr_v4(2), cidr_v4(3), "fd00:e:2::/64", "fd00:e:3::/64"])

    def exchange() -> None:
        assert traffic.ping(a.netns, b.ipv4, count=3) == 3
        assert traffic.ping(a.netns, b.ipv6, count=2) == 2
        assert tcp_ok(a, b, b.ipv4) and tcp_ok(a, b, b.ipv6)
        assert udp_ok(a, b)
        assert traffic.ping(s3.netns, a.ipv4, count=2) == 2  # node 3 -> node 1 as well

    out = capture_while(c, "ip or ip6", exchange)
    outer = [line for line in out.splitlines() if line[:1].isdigit()]  # tcpdump prints an inner packet below
    vxlan_lines = [line for line in outer if f".{VXLAN_PORT}:" in line]
    plain_lines = [line for line in outer if f"{a.ipv4} > {b.ipv4}: ICMP" in line]
    if mode == "vxlan":
        assert vxlan_lines and not plain_lines, out[-2000:]
        # the VNI is the sender's identity: client's one way, server's back
        assert f"instance {a.identity}" in "\n".join(vxlan_lines) and f"instance {b.identity}" in "\n".join(vxlan_lines)
    else:
        assert plain_lines and not vxlan_lines, out[-2000:]  # the endpoints' own addresses on the wire


def test_overlay_over_an_ipv6_underlay(cluster: Cluster) -> None:
    c = cluster
    n1, n2 = c.member(1), c.member(2)
    for here, there in ((n1, n2), (n2, n1)):
        record = there.record("vxlan")
        del record.addresses[:]
        record.addresses.append(underlay_v6(there.index))
        here.orchestrator().UpsertNode(orch_pb.UpsertNodeRequest(node=record), timeout=15)
    a, b = c.ep(1, "client"), c.ep(2, "server")

    def exchange() -> None:
        assert traffic.ping(a.netns, b.ipv4, count=2) == 2
        assert tcp_ok(a, b, b.ipv6)

    out = capture_while(c, "ip6 and udp", exchange)
    assert f"{underlay_v6(1)}." in out and f".{VXLAN_PORT}:" in out, out[-2000:]
    # An outer IPv6 header takes 70 bytes, not 50: the routes to node 2 say so, so a packet that
    # would not fit is refused where it is sent (PMTU) instead of vanishing on the underlay.
    routes = netns.run(n1.node.ns, "ip", "route", "show", cidr_v4(2)).stdout
    assert f"mtu {UNDERLAY_MTU - 70}" in routes, routes

    def ping_unfragmented(size: int) -> subprocess.CompletedProcess[str]:
        return netns.run(a.netns, "ping", "-c", "2", "-W", "1", "-M", "do", "-s", str(size), b.ipv4, check=False)

    fits = ping_unfragmented(UNDERLAY_MTU - 70 - 28)  # 1480-byte IPv4 packets
    assert fits.returncode == 0, fits.stdout
    too_big = ping_unfragmented(UNDERLAY_MTU - 50 - 28)  # 1500 bytes: the endpoint's own MTU
    assert too_big.returncode != 0 and f"mtu = {UNDERLAY_MTU - 70}" in too_big.stdout, too_big.stdout
    with traffic.server(b.netns, b.ipv4, 8081):  # a full-size TCP stream gets through whole
        payload = bytes(range(256)) * 800
        assert traffic.tcp_exchange(a.netns, b.ipv4, 8081, payload, timeout=10) == payload
    for here, there in ((n1, n2), (n2, n1)):  # back to both addresses (IPv4 underlay): no route MTU
        here.orchestrator().UpsertNode(orch_pb.UpsertNodeRequest(node=there.record("vxlan")), timeout=15)
    assert "mtu" not in netns.run(n1.node.ns, "ip", "route", "show", cidr_v4(2)).stdout


def test_policy_by_labels_across_nodes(cluster: Cluster) -> None:
    c = cluster
    ids = {i: {r: c.ep(i, r).identity for r in ROLES} for i in (1, 2, 3)}
    assert ids[1] == ids[2] == ids[3], f"standalone nodes gave the label sets different numbers: {ids}"
    server = c.ep(2, "server")
    policy = pol_grpc.PolicyStub(c.member(2).node.channel("policy"))
    rule = pol_pb.Rule(
        name="server-in",
        endpoint_selector=pol_pb.EndpointSelector(match_labels={"app": "server"}),
        ingress=[
            pol_pb.PeerRule(
                endpoints=[pol_pb.EndpointSelector(match_labels={"app": "client"})],
                ports=[pol_pb.PortRule(port=8080, protocol="TCP")],
            )
        ],
    )
    policy.ImportRules(pol_pb.ImportRulesRequest(rules=[rule]), timeout=15)
    try:
        c.nodes.connect("vxlan")
        # the VNI carries node 1's identity of each sender; node 2's policy judges it
        assert tcp_ok(c.ep(1, "client"), server, server.ipv4)
        assert not tcp_ok(c.ep(1, "other"), server, server.ipv4)
        assert tcp_ok(c.ep(3, "client"), server, server.ipv6)
        # direct routing, standalone: node 2 has no identity for node 1's addresses (world),
        # so a label rule cannot admit a remote client; it needs the overlay or cluster mode
        c.nodes.connect("direct")
        assert not tcp_ok(c.ep(1, "client"), server, server.ipv4)
    finally:
        policy.DeleteRules(pol_pb.DeleteRulesRequest(names=["server-in"]), timeout=15)


def ipcache(member: Member) -> dict[str, int]:
    """The node's pinned ipcache, as its datapath reads it."""
    path = member.node.bpffs_root / "globals/ipcache"
    with Map.from_pin(path, key_type=IpcacheKey, value_type=IpcacheValue) as m:
        return {str(ipcache_network(k)): int(v.identity) for k, v in m.items()}


def remote_nodes(member: Member) -> dict[str, tuple[int, int]]:
    """The node's pinned remote_nodes (remote CIDR -> node id, key index), which ipsec's strict mode reads."""
    path = member.node.bpffs_root / "globals/remote_nodes"
    with Map.from_pin(path, key_type=IpcacheKey, value_type=TunnelValue) as m:
        return {str(ipcache_network(k)): (int(v.node_id), int(v.key_index)) for k, v in m.items()}


def test_remote_node_addresses_are_remote_node_to_the_ipcache_and_to_policy(cluster: Cluster) -> None:
    """As Cilium's node manager does, a remote node's underlay addresses map to the reserved
    remote-node identity: `fromEntities: [remote-node]` admits the node itself, `world` does not."""
    c = cluster
    c.nodes.connect("direct")
    n1, n2 = c.member(1), c.member(2)
    node1 = {f"{underlay_v4(1)}/32", f"{underlay_v6(1)}/128"}
    remote_node = int(ReservedIdentity.REMOTE_NODE)
    assert {p: i for p, i in ipcache(n2).items() if p in node1} == dict.fromkeys(node1, remote_node)
    server = c.ep(2, "server")
    policy = pol_grpc.PolicyStub(n2.node.channel("policy"))

    def admits(entity: str) -> bool:
        rule = pol_pb.Rule(
            name="nodes-in",
            endpoint_selector=pol_pb.EndpointSelector(match_labels={"app": "server"}),
            ingress=[pol_pb.PeerRule(entities=[entity], ports=[pol_pb.PortRule(port=8080, protocol="TCP")])],
        )
        policy.ImportRules(pol_pb.ImportRulesRequest(rules=[rule]), timeout=15)
        with traffic.server(server.netns, server.ipv4, 8080):  # from node 1 itself: 172.31.0.1
            return traffic.tcp_connects(n1.node.ns, server.ipv4, 8080, timeout=1.5)

    try:
        assert not admits("world"), "node 1's address was taken for world"
        assert admits("remote-node")
        stub = n2.orchestrator()
        assert remote_nodes(n2)[cidr_v4(1)] == (n1.index, 0), "every remote CIDR, direct ones too"
        stub.DeleteNode(orch_pb.DeleteNodeRequest(name=n1.name), timeout=15)
        assert not node1 & ipcache(n2).keys(), "a deleted node's addresses stayed in the ipcache"
        assert cidr_v4(1) not in remote_nodes(n2)
        record = n1.record("direct")
        record.key_index = 3
        stub.UpsertNode(orch_pb.UpsertNodeRequest(node=record), timeout=15)
        assert node1 <= ipcache(n2).keys()
        assert remote_nodes(n2)[cidr_v4(1)] == (n1.index, 3), "the key index the node publishes"
    finally:
        policy.DeleteRules(pol_pb.DeleteRulesRequest(names=["nodes-in"]), timeout=15)


def test_new_endpoint_reachable_after_upsert_and_gone_after_delete_node(cluster: Cluster) -> None:
    c = cluster
    c.nodes.connect("vxlan")
    n1, n3 = c.member(1), c.member(3)
    stub3 = n3.orchestrator()
    stub3.DeleteNode(orch_pb.DeleteNodeRequest(name=n1.name), timeout=15)
    assert cidr_v4(1) not in node_routes(n3)
    late = n1.create_endpoint("late", {"app": "late"})
    try:
        src = c.ep(3, "client")
        assert traffic.ping(src.netns, late.ipv4, count=1, wait=0.5) == 0  # node 3 knows no route there
        start = time.monotonic()
        stub3.UpsertNode(orch_pb.UpsertNodeRequest(node=n1.record("vxlan")), timeout=15)
        assert traffic.ping(src.netns, late.ipv4, count=1, wait=2) == 1
        assert time.monotonic() - start < 3.0, "reachable within 3 s of UpsertNode"
        assert tcp_ok(src, late, late.ipv4)
    finally:
        n1.orchestrator().DeleteEndpoint(orch_pb.DeleteEndpointRequest(name="late"), timeout=15)
        stub3.UpsertNode(orch_pb.UpsertNodeRequest(node=n1.record("vxlan")), timeout=15)


def test_watch_nodes_and_no_tunnel_drop(cluster: Cluster) -> None:
    c = cluster
    c.nodes.connect("vxlan")
    n1, n2 = c.member(1), c.member(2)
    stub = n1.orchestrator()
    local = stub.GetLocalNode(orch_pb.GetLocalNodeRequest(), timeout=5)
    assert (local.name, local.node_id, local.cidrs[0]) == (n1.name, 1, cidr_v4(1))
    watch = stub.WatchNodes(orch_pb.WatchNodesRequest(), timeout=20)
    first = [next(watch), next(watch), next(watch)]
    assert [m.kind for m in first] == ["EXISTS", "EXISTS", "SYNCED"]
    assert {m.node.name for m in first[:2]} == {n2.name, c.member(3).name}
    changed = n2.record("vxlan")
    changed.key_index = 7
    stub.UpsertNode(orch_pb.UpsertNodeRequest(node=changed), timeout=15)
    update = next(watch)
    assert (update.kind, update.node.name, update.node.key_index) == ("UPSERTED", n2.name, 7)
    stub.DeleteNode(orch_pb.DeleteNodeRequest(name=n2.name), timeout=15)
    gone = next(watch)
    assert (gone.kind, gone.node.name) == ("DELETED", n2.name)
    assert cidr_v4(2) not in node_routes(n1)
    stub.UpsertNode(orch_pb.UpsertNodeRequest(node=n2.record("vxlan")), timeout=15)
    assert next(watch).kind == "UPSERTED"
    watch.cancel()
    # A destination routed into the overlay that no node owns drops with its own reason.
    device = overlay_ifname(n1.name)
    netns.run(n1.node.ns, "ip", "route", "add", "10.99.0.0/24", "dev", device)
    try:
        assert traffic.ping(c.ep(1, "client").netns, "10.99.0.1", count=2, wait=0.5) == 0
        reply = stub.GetMetrics(orch_pb.GetMetricsRequest(), timeout=5)
        dropped = {r.reason: r.counter.packets for r in reply.reasons}
        assert dropped.get("NO_TUNNEL_ENDPOINT", 0) >= 2, dropped
    finally:
        netns.run(n1.node.ns, "ip", "route", "del", "10.99.0.0/24", "dev", device)


def test_cli_shows_and_changes_nodes(cluster: Cluster) -> None:
    c = cluster
    c.nodes.connect("direct")
    n1 = c.member(1).node

    def weir(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(REPO / "weir"), "--instance", n1.name, "--run-dir", str(n1.run_dir), *args]
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)

    listed = json.loads(weir("node", "list", "-o", "json").stdout)
    assert {n["name"]: n["routing"] for n in listed} == {
        c.member(2).name: "ROUTING_MODE_DIRECT",
        c.member(3).name: "ROUTING_MODE_DIRECT",
    }
    assert json.loads(weir("node", "local", "-o", "json").stdout)["node_id"] == 1
    made = weir("node", "upsert", "n9", "--id", "9", "--address", "172.31.0.9", "--cidr", "10.9.0.0/24")
    assert made.returncode == 0, made.stderr
    assert "10.9.0.0/24" in node_routes(c.member(1))
    refused = weir("node", "upsert", "n10", "--id", "9", "--address", "172.31.0.10")
    assert refused.returncode == 1 and "ALREADY_EXISTS" in refused.stderr, refused.stderr
    assert weir("node", "delete", "n9").returncode == 0
    assert "10.9.0.0/24" not in node_routes(c.member(1))


def test_bad_nodes_are_refused_and_change_nothing(cluster: Cluster) -> None:
    c = cluster
    c.nodes.connect("direct")
    n1, n2 = c.member(1), c.member(2)
    stub = n1.orchestrator()
    before = (stub.ListNodes(orch_pb.ListNodesRequest(), timeout=5), sorted(node_routes(n1)))

    def refused(node: orch_pb.Node, code: grpc.StatusCode, words: str) -> None:
        with pytest.raises(grpc.RpcError) as err:
            stub.UpsertNode(orch_pb.UpsertNodeRequest(node=node), timeout=10)
        assert err.value.code() == code, err.value.details()
        assert words in (err.value.details() or ""), err.value.details()

    def node(**fields: object) -> orch_pb.Node:
        base = {"name": "n9", "node_id": 9, "addresses": ["172.31.0.9"], "cidrs": ["10.9.0.0/24"]}
        base.update(fields)
        return orch_pb.Node(**base)  # type: ignore[arg-type]

    invalid, exists = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS
    refused(node(cidrs=["10.2.0.128/25"]), invalid, f"overlaps {cidr_v4(2)} of node {n2.name!r}")
    refused(node(cidrs=["10.1.0.0/16"]), invalid, "overlaps the local node's")
    refused(node(node_id=2), exists, f"belongs to node {n2.name!r}")
    refused(node(node_id=1), exists, "local node")
    refused(node(addresses=["not-an-address"]), invalid, "is not an IP address")
    refused(node(addresses=["172.31.0.2"]), exists, f"belongs to node {n2.name!r}")
    refused(node(name=n1.name), invalid, "is this node")
    refused(node(node_id=0), invalid, "out of range")
    refused(node(key_index=16), invalid, "key_index 16")
    refused(node(cidrs=["fd00:e:9::/64"]), invalid, "no IPv6 underlay address")
    refused(node(routing=7), invalid, "routing 7")
    refused(node(addresses=["192.168.77.9"]), grpc.StatusCode.FAILED_PRECONDITION, "no route to that underlay")
    # UDP 8472 held by a VXLAN device that is not this node's: the overlay cannot be made
    netns.run(n1.node.ns, "ip", "link", "add", "foreignvx", "type", "vxlan", "external", "dstport", str(VXLAN_PORT))
    try:
        refused(node(routing=orch_pb.ROUTING_MODE_VXLAN), grpc.StatusCode.FAILED_PRECONDITION, "UDP 8472")
    finally:
        netns.run(n1.node.ns, "ip", "link", "del", "foreignvx")
    with pytest.raises(grpc.RpcError) as err:
        stub.DeleteNode(orch_pb.DeleteNodeRequest(name="n9"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # a local endpoint outside the node's own CIDR: no remote node may claim its address ...
    stray = stub.CreateEndpoint(orch_pb.CreateEndpointRequest(name="stray", ipv4="10.50.0.5"), timeout=15)
    try:
        refused(node(cidrs=["10.50.0.0/24"]), invalid, f"covers local endpoint address {stray.ipv4}")
    finally:
        stub.DeleteEndpoint(orch_pb.DeleteEndpointRequest(name="stray"), timeout=15)
    # ... and no local endpoint may take an address a remote node owns
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateEndpoint(orch_pb.CreateEndpointRequest(name="squat", ipv4="10.2.0.77"), timeout=15)
    assert err.value.code() == invalid and f"which node {n2.name!r} owns" in (err.value.details() or "")
    after = (stub.ListNodes(orch_pb.ListNodesRequest(), timeout=5), sorted(node_routes(n1)))
    assert after == before


def test_a_restarted_orchestrator_keeps_routes_and_overlay(cluster: Cluster) -> None:
    c = cluster
    c.nodes.connect("vxlan")
    n1 = c.member(1)
    before = sorted(node_routes(n1))
    device = netns.run(n1.node.ns, "ip", "-d", "link", "show", overlay_ifname(n1.name)).stdout.split(":")[0]
    n1.node.kill("orchestrator")  # SIGKILL: the datapath keeps forwarding meanwhile
    a, b = c.ep(1, "client"), c.ep(2, "server")
    assert traffic.ping(a.netns, b.ipv4, count=2) == 2
    n1.node.start("orchestrator", *n1.flags(), timeout=60)
    assert sorted(node_routes(n1)) == before
    again = netns.run(n1.node.ns, "ip", "-d", "link", "show", overlay_ifname(n1.name)).stdout.split(":")[0]
    assert again == device, "the VXLAN device was made again instead of kept"
    assert traffic.ping(a.netns, b.ipv4, count=2) == 2 and tcp_ok(a, b, b.ipv4)


def test_teardown_removes_the_overlay_device_and_node_routes(cluster: Cluster) -> None:
    """Last in the module: node 3 is stopped and torn down (`./weir teardown`)."""
    c = cluster
    c.nodes.connect("vxlan")
    n3 = c.member(3).node
    device = overlay_ifname(n3.name)
    assert netns.run(n3.ns, "ip", "link", "show", device, check=False).returncode == 0
    assert node_routes(c.member(3))
    for service in ("policy", "orchestrator"):
        n3.kill(service, signal.SIGTERM)
    flags = n3.argv("x")[n3.argv("x").index("--instance") :]
    argv = [*netns.nsenter_argv(n3.ns), sys.executable, "-m", "services.orchestrator.teardown", *flags]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"removed link {device} (the VXLAN overlay)" in result.stdout, result.stdout
    assert netns.run(n3.ns, "ip", "link", "show", device, check=False).returncode != 0
    assert node_routes(c.member(3)) == []
