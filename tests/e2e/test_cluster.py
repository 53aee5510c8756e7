"""Cluster mode end to end: real orchestrators in three node namespaces on one real etcd.

What users see through the API and the datapath's own maps: label identities that agree
on every node (allocated at once on all three), an endpoint made on one node in the other
nodes' pinned ipcache within a stated time and gone from it when deleted, a killed node
dropped after its lease's grace period, an identity no endpoint uses released after its
grace period, and an unreachable etcd at start refused with one clear line before anything
is made. The etcd outage (under traffic) is test_cluster_outage.py.
"""

from __future__ import annotations

import ipaddress
import itertools
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc

from services.common.bpffs import remove_pins
from services.common.datapath import ReservedIdentity
from services.common.errors import FailedPrecondition
from services.common.objects import load_service_object
from services.common.store import Store
from services.orchestrator.identities import Identities
from services.orchestrator.ipcache import Ipcache
from tests.harness.etcd import ETCD, MISSING, free_port
from tests.harness.kvnet import KvNetwork
from tests.harness.multinode import ipcache, node_names, status
from tests.harness.node import BPF_BUILD, Node, pid_prefix

pytestmark = [pytest.mark.root, pytest.mark.skipif(ETCD is None, reason=MISSING)]

LEASE = 4  # seconds: the grace period before a silent node is dropped
CONVERGE = 5.0  # seconds: an endpoint made on one node is in every other node's ipcache by then
_counter = itertools.count()


def holds(node: Node, entries: dict[str, int]) -> bool:
    return entries.items() <= ipcache(node).items()


def lacks(node: Node, prefixes: set[str]) -> bool:
    return not prefixes & ipcache(node).keys()


def weir(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI against a node (its unix sockets reach the node from anywhere)."""
    argv = [sys.executable, "-m", "services.cli", "--instance", node.name, "--run-dir", str(node.run_dir), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
def kvnet() -> Iterator[KvNetwork]:
    """etcd in a namespace of its own, started."""
    network = KvNetwork(f"{pid_prefix()}kv{next(_counter)}")
    try:
        yield network.setup()
    finally:
        network.teardown()


def cluster(make_node: Callable[..., Node], kvnet: KvNetwork, count: int, *flags: str) -> list[Node]:
    """`count` nodes, each an orchestrator in cluster mode on kvnet's etcd (with `flags` added)."""
    nodes = []
    for index in range(count):
        node = make_node()
        node.endpoint_count = 100 * index  # addresses apart: 198.18.0.10+, .110+, .210+
        url = kvnet.join(node)
        node.start("orchestrator", "--kvstore", url, "--kvstore-lease-seconds", str(LEASE), *flags)
        nodes.append(node)
    return nodes


def test_three_nodes_share_identities_and_endpoints_and_drop_a_killed_node(
    make_node: Callable[..., Node], kvnet: KvNetwork
) -> None:
    a, b, c = nodes = cluster(make_node, kvnet, 3)
    for node in nodes:
        wait_for(f"{node.name} sees all three nodes", partial(node_names, node, {x.name for x in nodes}), 15)

    # The same labels, allocated on all three nodes at once, get one number.
    def create(node: Node) -> orch_pb.Endpoint:
        return node.create_endpoint(f"client{node.endpoint_count}", {"app": "client", "tier": "front"})

    with ThreadPoolExecutor(3) as pool:
        made = list(pool.map(create, nodes))
    assert len({e.identity for e in made}) == 1, [(e.name, e.identity) for e in made]
    # Different labels at once get different numbers, the same everywhere.
    with ThreadPoolExecutor(3) as pool:
        others = list(pool.map(lambda n: n.create_endpoint(f"db{n.endpoint_count}", {"app": f"db{n.name}"}), nodes))
    assert len({e.identity for e in others}) == 3
    assert made[0].identity not in {e.identity for e in others}

    # Each endpoint reaches every other node's ipcache (the pinned map) with its identity.
    everything = {f"{e.ipv4}/32": e.identity for e in (*made, *others)}
    took = max(
        wait_for(
            f"{node.name}'s ipcache has every endpoint",
            partial(holds, node, everything),
            CONVERGE,
        )
        for node in nodes
    )
    print(f"all endpoints everywhere after {took:.2f}s")
    for node in nodes:  # and the identity of each number is known by labels on every node
        with node.channel("orchestrator") as channel:
            listed = orch_grpc.OrchestratorStub(channel).ListIdentities(orch_pb.ListIdentitiesRequest(), timeout=10)
        labels = {i.id: set(i.labels) for i in listed.identities}
        assert labels[made[0].identity] >= {"app=client", "tier=front"}

    # Deleted on A: gone from B's and C's ipcache.
    gone = f"{made[0].ipv4}/32"
    a.orchestrator().DeleteEndpoint(orch_pb.DeleteEndpointRequest(name=made[0].name), timeout=15)
    for node in (b, c):
        wait_for(f"{node.name}'s ipcache without A's deleted endpoint", partial(lacks, node, {gone}), CONVERGE)

    # C killed: after its lease (the grace period), A and B drop C and its endpoints.
    c.kill("orchestrator")
    killed = time.monotonic()
    c_prefixes = {f"{e.ipv4}/32" for e in (made[2], others[2])}
    assert c_prefixes <= ipcache(a).keys()  # not dropped at once
    for node in (a, b):
        wait_for(f"{node.name} drops C", partial(node_names, node, {a.name, b.name}), LEASE + 8)
        wait_for(f"{node.name}'s ipcache without C's endpoints", partial(lacks, node, c_prefixes), 15)
    after = time.monotonic() - killed
    assert after >= LEASE / 3, f"C was dropped {after:.1f}s after it was killed: sooner than its lease allows"
    assert f"{made[1].ipv4}/32" in ipcache(a)  # B's endpoints stay


def test_unreachable_kvstore_at_start_exits_with_one_line_and_makes_nothing(make_node: Callable[..., Node]) -> None:
    node = make_node()
    port = free_port()
    argv = node.argv("orchestrator", ("--kvstore", f"http://127.0.0.1:{port}", "--kvstore-connect-timeout", "1"))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert result.returncode == 1
    line = f"weir-orchestrator: cannot reach the kvstore at http://127.0.0.1:{port} within 1s"
    assert line in result.stderr, result.stderr
    assert not node.state_dir.exists() or not any(node.state_dir.iterdir())  # no store made
    # Standalone (no --kvstore), the same node starts and says cluster mode is off.
    node.start("orchestrator")
    assert status(node).enabled is False


@pytest.fixture
def identities(tmp_path: Path, built: Path) -> Iterator[tuple[Identities, Ipcache, Store]]:
    """The orchestrator's Identities on real pinned maps and a real store, in-process."""
    root = Path("/sys/fs/bpf") / f"{pid_prefix()}ci{next(_counter)}"
    node_maps = load_service_object(BPF_BUILD / "node.o", root / "globals", root / "orchestrator", [])
    store = Store(tmp_path / "orchestrator.db")
    try:
        cache = Ipcache(node_maps.maps["ipcache"], node_maps.maps["ipcache_generation"])
        yield Identities(store, cache), cache, store
    finally:
        node_maps.close()
        store.close()
        remove_pins(root)


def test_remote_entries_rank_below_local_ones_and_cluster_numbers_are_kept(
    identities: tuple[Identities, Ipcache, Store],
) -> None:
    ids, cache, store = identities
    address = ipaddress.ip_network("198.18.7.7/32")
    (cidr,) = ids.allocate_cidrs("lb", [address])
    ids.remote_up(300, [address])  # another node's endpoint beats a published CIDR
    assert cache.read()[address] == 300
    local = ids.for_labels({"app": "here"})
    ids.endpoint_up(local, [address])  # this node's own endpoint beats another node's
    assert cache.read()[address] == local
    ids.endpoint_down([address])
    assert cache.read()[address] == 300
    ids.remote_down([address])
    assert cache.read()[address] == cidr.id
    # A remote node's underlay address is remote-node, above another node's endpoint, below a host address.
    node = ipaddress.ip_network("198.18.9.9/32")
    ids.remote_up(300, [node])
    assert ids.set_remote_nodes([node]) and cache.read()[node] == ReservedIdentity.REMOTE_NODE
    assert not ids.set_remote_nodes([node])  # unchanged
    ids.set_hosts([node])
    assert cache.read()[node] == ReservedIdentity.HOST
    ids.set_hosts([])
    ids.set_remote_nodes([])
    assert cache.read()[node] == 300
    ids.remote_down([node])
    assert node not in cache.read()
    # Learned numbers are kept (in the store too); one that clashes with this node's is refused.
    assert ids.learn("app=there", 301)
    assert store.get("identity", "app=there") == {"id": 301}
    assert not ids.learn("app=elsewhere", local)
    assert not ids.learn("app=here", 302)
    # In cluster mode a new label set takes the cluster's number; a number this node uses is refused.
    ids.use_cluster(lambda key: 310)
    assert ids.for_labels({"app": "new"}) == 310
    ids.use_cluster(lambda key: local)
    with pytest.raises(FailedPrecondition, match="on this node"):
        ids.for_labels({"app": "clash"})
    assert "app=clash" not in ids.label_identities()


def nodes_seen(node: Node) -> dict[str, tuple[int, tuple[str, ...], int]]:
    """The node table: name -> (node id, CIDRs, routing) of every remote node."""
    with node.channel("orchestrator") as channel:
        listed = orch_grpc.OrchestratorStub(channel).ListNodes(orch_pb.ListNodesRequest(), timeout=10)
    return {n.name: (n.node_id, tuple(n.cidrs), n.routing) for n in listed.nodes}


def test_nodes_published_in_etcd_fill_every_node_table_and_leave_it_with_their_lease(
    make_node: Callable[..., Node], kvnet: KvNetwork
) -> None:
    """A node's flags (id, underlay address, CIDR, routing) reach the others' node tables, and
    so their tunnel entries, through etcd alone; a killed node's record goes after its lease."""
    nodes = []
    for index in range(2):
        node = make_node()
        node.endpoint_count = 100 * index
        url = kvnet.join(node)
        node.start("orchestrator", "--kvstore", url, "--kvstore-lease-seconds", str(LEASE),
                   "--node-id", str(10 + index), "--node-address", f"192.0.2.{10 + index}",
                   "--node-cidr", f"10.{200 + index}.0.0/24", "--routing", "vxlan")  # fmt: skip
        nodes.append(node)
    a, b = nodes
    vxlan = orch_pb.ROUTING_MODE_VXLAN
    wait_for("b's table has a", lambda: nodes_seen(b).get(a.name) == (10, ("10.200.0.0/24",), vxlan), 15)
    wait_for("a's table has b", lambda: nodes_seen(a).get(b.name) == (11, ("10.201.0.0/24",), vxlan), 15)
    assert a.name not in nodes_seen(a)  # the local node is GetLocalNode, not a remote one
    # Each node's underlay address is remote-node in the other's ipcache (as Cilium's node IPs).
    remote_node = int(ReservedIdentity.REMOTE_NODE)
    wait_for("a's address is remote-node on b", lambda: ipcache(b).get("192.0.2.10/32") == remote_node, 15)
    wait_for("b's address is remote-node on a", lambda: ipcache(a).get("192.0.2.11/32") == remote_node, 15)
    a.kill("orchestrator")
    wait_for("a leaves b's table after its lease", lambda: a.name not in nodes_seen(b), LEASE + 10)
    wait_for("a's address leaves b's ipcache", lambda: "192.0.2.10/32" not in ipcache(b), 15)


def label_sets(node: Node) -> set[str]:
    with node.channel("orchestrator") as channel:
        listed = orch_grpc.OrchestratorStub(channel).ListIdentities(orch_pb.ListIdentitiesRequest(), timeout=10)
    return {",".join(i.labels) for i in listed.identities}


def lacks_labels(node: Node, text: str) -> bool:
    return text not in label_sets(node)


def test_an_identity_no_endpoint_uses_is_released_everywhere_after_the_grace_period(
    make_node: Callable[..., Node], kvnet: KvNetwork
) -> None:
    grace = 2
    a, b = cluster(make_node, kvnet, 2, "--kvstore-identity-gc-seconds", str(grace))
    brief = "app=brief,io.kubernetes.pod.namespace=default"
    kept = a.create_endpoint("kept", {"app": "kept"})
    made = a.create_endpoint("brief", {"app": "brief"})
    wait_for("b knows the label set", lambda: brief in label_sets(b), CONVERGE)
    a.orchestrator().DeleteEndpoint(orch_pb.DeleteEndpointRequest(name="brief"), timeout=15)
    deleted = time.monotonic()
    for node in (a, b):
        wait_for(f"{node.name} forgets the released identity", partial(lacks_labels, node, brief), 3 * grace + 8)
    took = time.monotonic() - deleted
    print(f"released everywhere {took:.1f}s after its last endpoint went (grace {grace}s)")
    assert took >= grace * 0.9, "released before the grace period"
    assert "app=kept,io.kubernetes.pod.namespace=default" in label_sets(b)  # in use: kept
    assert ipcache(b)[f"{kept.ipv4}/32"] == kept.identity
    again = b.create_endpoint("brief", {"app": "brief"})  # the labels get a number again
    wait_for("a learns the new number", lambda: brief in label_sets(a), CONVERGE)
    assert again.identity != kept.identity and made.identity >= 256
