"""The ipsec service follows the orchestrator's node table (WatchNodes), on the host kernel (no ESP).

A node runs the orchestrator and the ipsec service (which follows the node table by
default). Remote nodes are told to the orchestrator with UpsertNode; the ipsec service
makes a peer of each one that publishes a key index, with that index, and forgets it
when the node goes. The host kernel has no ESP, so no key can be installed: every peer's
range is blocked, which the capture and the counters show, and the xfrm policies the
service installed are read back from the node's namespace. The follower reconnects
after the orchestrator restarts, and a restarted ipsec service drops the peers of nodes
deleted while it was down. Strict mode: a node added while the ipsec service is down
(so no peer can be made for it) gets no plaintext packet from the endpoints when it
publishes a key index; they drop as ENCRYPTION_PENDING.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from weir.ipsec.v1 import ipsec_pb2 as pb
from weir.ipsec.v1 import ipsec_pb2_grpc as pb_grpc
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb

from pybpf import Map
from services.common import reasons
from services.common.datapath import VXLAN_PORT, Direction, Reason
from services.ipsec import xfrm
from tests.harness import netns
from tests.harness.capture import Capture
from tests.harness.node import Node

pytestmark = pytest.mark.root

N2 = orch_pb.Node(name="n2", node_id=2, addresses=["192.0.2.2"], cidrs=["203.0.113.0/24"], key_index=1)
N3 = orch_pb.Node(
    name="n3", node_id=3, addresses=["192.0.2.3"], cidrs=["198.51.100.0/24"], routing=orch_pb.ROUTING_MODE_VXLAN
)
N2_HOST = "203.0.113.7"


@pytest.fixture
def ipsec_node(make_node: Callable[..., Node]) -> Iterator[tuple[Node, str]]:
    node = make_node("orchestrator", "ipsec")
    endpoint = node.create_endpoint("a", ipv6=False)
    with node.channel("ipsec") as channel:
        pb_grpc.IpsecStub(channel).SetLocalNode(
            pb.SetLocalNodeRequest(name="n1", node_id=1, underlay="192.0.2.1"), timeout=15
        )
    yield node, endpoint.netns


def _ipsec(node: Node) -> pb_grpc.IpsecStub:
    return pb_grpc.IpsecStub(node.channel("ipsec"))


def _peers(node: Node) -> dict[str, pb.Peer]:
    return {p.name: p for p in _ipsec(node).ListPeers(pb.ListPeersRequest(), timeout=15).peers}


def _until(node: Node, check: Callable[[dict[str, pb.Peer]], bool], timeout: float = 20.0) -> dict[str, pb.Peer]:
    deadline = time.monotonic() + timeout
    peers = _peers(node)
    while not check(peers):
        assert time.monotonic() < deadline, f"the peers did not follow the node table: {peers}"
        time.sleep(0.2)
        peers = _peers(node)
    return peers


def _upsert(node: Node, record: orch_pb.Node, **changes: object) -> None:
    msg = orch_pb.Node()
    msg.CopyFrom(record)
    for name, value in changes.items():
        setattr(msg, name, value)
    node.orchestrator().UpsertNode(orch_pb.UpsertNodeRequest(node=msg), timeout=15)


def _send(ns: str, address: str, payload: bytes, count: int = 5) -> None:
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for _ in range(count):
            sock.sendto(payload, (address, 9999))
            time.sleep(0.02)


def _leaks(node: Node, ep_ns: str, payload: bytes) -> tuple[bool, int]:
    """Whether `payload` sent to n2's range left in the clear, and how many packets the program blocked."""
    before = _ipsec(node).GetCounters(pb.GetCountersRequest(), timeout=15).datapath["BLOCKED"].packets
    with Capture(node.outside, "eth0") as cap:
        _send(ep_ns, N2_HOST, payload)
        time.sleep(0.3)
    after = _ipsec(node).GetCounters(pb.GetCountersRequest(), timeout=15).datapath["BLOCKED"].packets
    return cap.contains(payload), after - before


def _policies(node: Node) -> list[xfrm.Policy]:
    with netns.entered(node.ns):
        x = xfrm.Xfrm()
    with x:
        return list(x.policies())


def test_nodes_with_a_key_index_become_peers_and_go_with_their_node(ipsec_node: tuple[Node, str]) -> None:
    node, ep_ns = ipsec_node
    _upsert(node, N2)
    _upsert(node, N3)  # key index 0: a node that does not encrypt is no peer
    peers = _until(node, lambda p: "n2" in p)
    assert set(peers) == {"n2"}
    n2 = peers["n2"]
    assert (n2.node_id, n2.underlay, list(n2.cidrs), n2.spi) == (2, "192.0.2.2", ["203.0.113.0/24"], 1)
    assert n2.source == "nodes" and not n2.vxlan and n2.egress_spi == 0  # no key on this kernel: blocked
    leaked, blocked = _leaks(node, ep_ns, b"SECRET-TO-A-FOLLOWED-PEER")
    assert not leaked and blocked >= 5

    # the node table owns its peers: the API cannot change them
    narrower = pb.Peer(name="n2", node_id=2, underlay="192.0.2.2", cidrs=["203.0.113.0/25"], spi=1)
    for call in (
        lambda: _ipsec(node).UpsertPeer(narrower, timeout=15),
        lambda: _ipsec(node).DeletePeer(pb.DeletePeerRequest(name="n2"), timeout=15),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "UpsertNode" in (err.value.details() or "")
    assert _peers(node)["n2"] == n2

    # n3 publishes a key index: an overlay peer, with its VXLAN blocked until keys exist
    _upsert(node, N3, key_index=2)
    n3 = _until(node, lambda p: "n3" in p)["n3"]
    assert n3.vxlan and n3.spi == 2 and n3.source == "nodes"
    vxlan = [p for p in _policies(node) if p.dport == VXLAN_PORT and str(p.dst) in ("192.0.2.3/32", "192.0.2.1/32")]
    out = [p for p in vxlan if p.direction == xfrm.DIR_OUT]
    inbound = [p for p in vxlan if p.direction == xfrm.DIR_IN]
    assert len(out) == 1 and out[0].action == xfrm.ACTION_BLOCK and str(out[0].src) == "192.0.2.1/32", vxlan
    assert len(inbound) == 1 and inbound[0].tmpl is not None and str(inbound[0].src) == "192.0.2.3/32", vxlan

    # a deleted node is no peer any more; its range stays blocked (never plaintext)
    node.orchestrator().DeleteNode(orch_pb.DeleteNodeRequest(name="n2"), timeout=15)
    _until(node, lambda p: "n2" not in p)
    leaked, blocked = _leaks(node, ep_ns, b"SECRET-AFTER-THE-NODE-WENT")
    assert not leaked and blocked >= 5
    # and a node that stops publishing a key index stops being a peer
    _upsert(node, N3, key_index=0)
    _until(node, lambda p: not p)
    assert not [p for p in _policies(node) if p.dport == VXLAN_PORT]


def test_the_follower_survives_restarts_of_the_orchestrator_and_of_itself(ipsec_node: tuple[Node, str]) -> None:
    node, _ = ipsec_node
    _upsert(node, N2)
    _until(node, lambda p: "n2" in p)
    node.kill("orchestrator", signal.SIGTERM)
    time.sleep(1.0)  # the stream is down: the follower retries with backoff
    node.start("orchestrator")
    _upsert(node, N3, key_index=3)
    peers = _until(node, lambda p: "n3" in p)
    assert peers["n3"].spi == 3 and peers["n3"].vxlan

    # removed while the ipsec service is down: its first snapshot after the restart removes the peer
    node.kill("ipsec", signal.SIGKILL)
    node.orchestrator().DeleteNode(orch_pb.DeleteNodeRequest(name="n3"), timeout=15)
    node.start("ipsec")
    peers = _until(node, lambda p: "n3" not in p)
    assert set(peers) == {"n2"} and peers["n2"].source == "nodes"


def _pending_drops(node: Node) -> int:
    with Map.from_pin(node.bpffs_root / "globals" / reasons.MAP_NAME) as pinned:
        totals = reasons.read_reason_counters(reasons.typed(pinned))
    found = totals.get((Reason.ENCRYPTION_PENDING, Direction.EGRESS))
    return int(found.packets) if found is not None else 0


def test_a_node_added_while_the_service_is_down_gets_no_plaintext(ipsec_node: tuple[Node, str]) -> None:
    """The window between UpsertNode and the peer: strict mode drops, from the first packet, service or not."""
    node, ep_ns = ipsec_node
    node.kill("ipsec", signal.SIGKILL)  # its program and maps stay in the chain; no peer can be made now
    plain = orch_pb.Node(name="n2", node_id=2, addresses=["192.0.2.2"], cidrs=["203.0.113.0/24"])
    _upsert(node, plain)  # a node without a key index is not encrypted: its packets pass (the route works)
    with Capture(node.outside, "eth0") as cap:
        _send(ep_ns, N2_HOST, b"CLEAR-TO-A-NODE-WITHOUT-A-KEY")
        time.sleep(0.3)
    assert cap.contains(b"CLEAR-TO-A-NODE-WITHOUT-A-KEY"), "the route to n2 carries plain traffic"

    before = _pending_drops(node)
    _upsert(node, N2)  # now it publishes key index 1: it encrypts, and this node has no peer for it
    with Capture(node.outside, "eth0") as cap:
        _send(ep_ns, N2_HOST, b"SECRET-WHILE-NO-PEER")
        time.sleep(0.3)
    assert not cap.contains(b"SECRET-WHILE-NO-PEER")
    assert _pending_drops(node) - before >= 5, "dropped with the reason ENCRYPTION_PENDING"

    node.start("ipsec")
    n2 = _until(node, lambda p: "n2" in p)["n2"]
    assert n2.spi == 1 and n2.egress_spi == 0  # no key on this kernel: the peer's range is blocked
    pending = _ipsec(node).GetCounters(pb.GetCountersRequest(), timeout=15).datapath["PENDING"].packets
    assert pending >= 5, "the ipsec program's own count of them survives the restart"
    leaked, blocked = _leaks(node, ep_ns, b"SECRET-ONCE-A-PEER")
    assert not leaked and blocked >= 5
