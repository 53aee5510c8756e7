"""IPsec on the host kernel, which has no ESP: the service says so and nothing goes out in plaintext.

A node runs the orchestrator and the ipsec service; its outside namespace stands for a
peer node (underlay 192.0.2.2, endpoint range 203.0.113.0/24). Keys are refused with
FAILED_PRECONDITION naming the kernel option; the peer is accepted, and its range is
blocked (marked for encryption, dropped by the default-drop xfrm policy), while traffic
to the rest of the world passes as before. Bad input gets its status and changes nothing.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from weir.ipsec.v1 import ipsec_pb2 as pb
from weir.ipsec.v1 import ipsec_pb2_grpc as pb_grpc

from tests.harness import netns
from tests.harness.capture import Capture
from tests.harness.node import Node

pytestmark = pytest.mark.root

PEER_RANGE, PEER_HOST, WORLD_HOST = "203.0.113.0/24", "203.0.113.7", "198.51.100.9"
GCM_KEY = bytes(range(20))


@pytest.fixture
def ipsec_node(make_node: Callable[..., Node]) -> Iterator[tuple[Node, pb_grpc.IpsecStub, str]]:
    node = make_node("orchestrator", "ipsec")
    endpoint = node.create_endpoint("a", ipv6=False)
    with node.channel("ipsec") as channel:
        stub = pb_grpc.IpsecStub(channel)
        stub.SetLocalNode(pb.SetLocalNodeRequest(name="n1", node_id=1, underlay="192.0.2.1"), timeout=15)
        yield node, stub, endpoint.netns


def _send(ns: str, address: str, payload: bytes, count: int = 5) -> None:
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for _ in range(count):
            sock.sendto(payload, (address, 9999))
            time.sleep(0.02)


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def test_no_esp_is_failed_precondition_and_nothing_leaves_in_plaintext(
    ipsec_node: tuple[Node, pb_grpc.IpsecStub, str],
) -> None:
    node, stub, ep_ns = ipsec_node
    code, details = _code(lambda: stub.SetKey(pb.SetKeyRequest(spi=1, key=GCM_KEY), timeout=15))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "CONFIG_CRYPTO_GCM" in details and "CONFIG_INET_ESP" in details, details
    assert GCM_KEY.hex() not in details
    code, details = _code(
        lambda: stub.SetKey(pb.SetKeyRequest(spi=1, cipher=pb.CIPHER_CBC_HMAC, key=bytes(16)), timeout=15)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "CONFIG_INET_ESP" in details, details

    peer = stub.UpsertPeer(pb.Peer(name="n2", node_id=2, underlay="192.0.2.2", cidrs=[PEER_RANGE], spi=1), timeout=15)
    assert peer.egress_spi == 0  # no key: the range is blocked, not sent in the clear
    status = stub.GetStatus(pb.GetStatusRequest(), timeout=15)
    assert not status.encrypting and status.reason and status.default_drop
    assert not status.keys

    before = stub.GetCounters(pb.GetCountersRequest(), timeout=15)
    with Capture(node.outside, "eth0") as cap:
        _send(ep_ns, PEER_HOST, b"SECRET-PLAINTEXT-TO-PEER")
        _send(ep_ns, WORLD_HOST, b"PLAIN-TO-THE-WORLD")
        time.sleep(0.5)
    assert cap.contains(b"PLAIN-TO-THE-WORLD"), "the capture sees traffic outside the cluster"
    assert not cap.contains(b"SECRET-PLAINTEXT-TO-PEER"), "traffic to the peer left in plaintext"
    after = stub.GetCounters(pb.GetCountersRequest(), timeout=15)
    blocked = after.xfrm_errors["XfrmOutPolBlock"] - before.xfrm_errors["XfrmOutPolBlock"]
    assert blocked >= 5, "the default-drop policy took the peer's packets"
    assert after.datapath["BLOCKED"].packets - before.datapath["BLOCKED"].packets >= 5


def test_bad_input_gets_its_status_and_changes_nothing(
    ipsec_node: tuple[Node, pb_grpc.IpsecStub, str], tmp_path: Path
) -> None:
    _, stub, _ = ipsec_node
    stub.UpsertPeer(pb.Peer(name="n2", node_id=2, underlay="192.0.2.2", cidrs=[PEER_RANGE], spi=1), timeout=15)
    peers = stub.ListPeers(pb.ListPeersRequest(), timeout=15)
    status = stub.GetStatus(pb.GetStatusRequest(), timeout=15)

    world_readable = tmp_path / "key"
    world_readable.write_text(f"1 rfc4106(gcm(aes)) {GCM_KEY.hex()}\n")
    os.chmod(world_readable, 0o644)
    cases = [
        (lambda: stub.SetKey(pb.SetKeyRequest(spi=1, key=bytes(19)), timeout=15), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: stub.SetKey(pb.SetKeyRequest(spi=0, key=GCM_KEY), timeout=15), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: stub.SetKey(pb.SetKeyRequest(spi=16, key=GCM_KEY), timeout=15), grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda: stub.SetKey(pb.SetKeyRequest(key_file=str(world_readable)), timeout=15),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (lambda: stub.DeletePeer(pb.DeletePeerRequest(name="nobody"), timeout=15), grpc.StatusCode.NOT_FOUND),
        (
            lambda: stub.UpsertPeer(pb.Peer(name="n3", node_id=3, underlay="192.0.2.3", cidrs=[], spi=1), timeout=15),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda: stub.UpsertPeer(
                pb.Peer(name="n3", node_id=3, underlay="192.0.2.3", cidrs=["203.0.113.128/25"], spi=1), timeout=15
            ),
            grpc.StatusCode.ALREADY_EXISTS,
        ),
        (
            lambda: stub.UpsertPeer(pb.Peer(name="n3", node_id=3, underlay="192.0.2.3", cidrs=["10.9.0.0/16"], spi=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for call, expected in cases:
        code, details = _code(call)
        assert code == expected, (expected, code, details)
        assert GCM_KEY.hex() not in details
    assert stub.ListPeers(pb.ListPeersRequest(), timeout=15) == peers
    assert stub.GetStatus(pb.GetStatusRequest(), timeout=15) == status
    world_readable.chmod(0o600)  # the same file, private: now only the kernel refuses it
    code, details = _code(lambda: stub.SetKey(pb.SetKeyRequest(key_file=str(world_readable)), timeout=15))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
