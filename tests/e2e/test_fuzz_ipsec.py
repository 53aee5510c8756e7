"""Generated bad and edge requests against a real ipsec service: never INTERNAL, refusals change nothing, no key shown.

The host kernel has no ESP, so the service runs in its FAILED_PRECONDITION mode but still
keeps a local node, peers, their xfrm policies and map entries. Every RPC gets
well-formed messages whose fields hold odd values (names, node ids and SPIs out of range,
scoped or malformed addresses and CIDRs, keys of every length, key files that are
missing, world-readable, relative or directories, unknown ciphers). After each call the
status must be a deliberate one; after each refusal the peers, the status, the pinned
maps, the xfrm states and policies of the node's namespace and the key directory must
read exactly as before; and no key sent ever appears in a reply, an error or the log.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from weir.ipsec.v1 import ipsec_pb2 as pb
from weir.ipsec.v1 import ipsec_pb2_grpc as pb_grpc

from pybpf import Map
from services.ipsec import xfrm
from tests.harness import netns
from tests.harness.node import Node

pytestmark = pytest.mark.root

BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)  # protobuf strings are UTF-8
MAPS = ("ipsec_cidrs", "ipsec_underlay", "ipsec_config")
SECRET = bytes(range(7, 27))  # the key in the private key file

names = st.one_of(st.sampled_from(["n1", "n2", "n3", "", "N2", "a" * 64, "x/y", "n2\n", "..", "-n"]), TEXT)
node_ids = st.one_of(st.sampled_from([0, 1, 2, 3, 65535, 65536]), st.integers(0, 2**32 - 1))
spis = st.one_of(st.sampled_from([0, 1, 2, 15, 16, 255]), st.integers(0, 2**32 - 1))
addresses = st.one_of(
    st.sampled_from([
        "192.0.2.1", "192.0.2.2", "192.0.2.3", "2001:db8::2", "0.0.0.0", "255.255.255.255", "127.0.0.1",
        "224.0.0.1", "fe80::1%eth0", "fe80::1", "::", "192.0.2.3/32", " 192.0.2.3", "192.0.2.300", "", "1" * 5000,
    ]),
    TEXT,
)  # fmt: skip
cidrs = st.one_of(
    st.sampled_from([
        "203.0.113.0/24", "203.0.113.128/25", "198.51.100.0/24", "10.0.0.0/8", "0.0.0.0/0", "::/0",
        "2001:db8:1::/64", "10.1.2.3/16", "10.0.0.0/33", "fe80::%1/64", "", "/", "10.0.0.0/8\n", "a" * 70,
    ]),
    TEXT,
)  # fmt: skip
cipher_numbers = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(-(2**31), 2**31 - 1))
key_lengths = st.sampled_from([16, 19, 20, 24, 28, 32, 36, 37, 0])
key_bytes = st.one_of(key_lengths.flatmap(lambda n: st.binary(min_size=n, max_size=n)), st.binary(max_size=100))


def _calls(files: list[str]) -> st.SearchStrategy[tuple[str, Any]]:
    paths = st.one_of(st.sampled_from(files), TEXT)
    return st.one_of(
        st.builds(lambda n, i, u: ("SetLocalNode", pb.SetLocalNodeRequest(name=n, node_id=i, underlay=u)),
                  names, node_ids, addresses),
        st.builds(lambda s, c, k: ("SetKey", pb.SetKeyRequest(spi=s, cipher=c, key=k)), spis, cipher_numbers,
                  key_bytes),
        st.builds(lambda p: ("SetKey", pb.SetKeyRequest(key_file=p)), paths),
        st.just(("SetKey", pb.SetKeyRequest(spi=1))),
        st.builds(lambda n, i, u, c, s, v: ("UpsertPeer", pb.Peer(name=n, node_id=i, underlay=u, cidrs=c, spi=s,
                                                                  vxlan=v)),
                  names, node_ids, addresses, st.lists(cidrs, max_size=4), spis, st.booleans()),
        st.builds(lambda n: ("DeletePeer", pb.DeletePeerRequest(name=n)), names),
        st.builds(lambda c: ("ForgetCidrs", pb.ForgetCidrsRequest(cidrs=c)), st.lists(cidrs, max_size=4)),
        st.just(("ForgetCidrs", pb.ForgetCidrsRequest(cidrs=["198.51.100.0/24"] * 1025))),
        st.just(("ListPeers", pb.ListPeersRequest())),
        st.just(("GetStatus", pb.GetStatusRequest())),
        st.just(("GetCounters", pb.GetCountersRequest())),
    )  # fmt: skip


def _key_file(path: Path, mode: int, spi: int = 1) -> str:
    path.write_text(f"{spi} rfc4106(gcm(aes)) {SECRET.hex()}\n")
    path.chmod(mode)
    return str(path)


def snapshot(s: pb_grpc.IpsecStub, node: Node) -> tuple[Any, ...]:
    """What a client, a packet or the kernel can observe of the service's state."""
    peers = s.ListPeers(pb.ListPeersRequest(), timeout=10)
    status = s.GetStatus(pb.GetStatusRequest(), timeout=10)
    pinned = {}
    for name in MAPS:
        m = Map.from_pin(node.bpffs_root / "ipsec" / name)
        try:
            pinned[name] = sorted((bytes(k), bytes(v)) for k, v in m.items())
        finally:
            m.close()
    with netns.entered(node.ns):
        x = xfrm.Xfrm()
    with x:
        kernel = (sorted(map(repr, x.states())), sorted(map(repr, x.policies())))
    key_dir = node.state_dir / "ipsec-keys"
    keys = sorted((p.name, p.stat().st_mode) for p in key_dir.iterdir()) if key_dir.exists() else []
    return peers, status, pinned, kernel, keys


def test_fuzzed_requests_never_break_the_ipsec_service_and_refusals_change_nothing(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = make_node("orchestrator", "ipsec")
    s = pb_grpc.IpsecStub(node.channel("ipsec"))
    s.SetLocalNode(pb.SetLocalNodeRequest(name="n1", node_id=1, underlay="192.0.2.1"), timeout=15)
    s.UpsertPeer(pb.Peer(name="n2", node_id=2, underlay="192.0.2.2", cidrs=["203.0.113.0/24"], spi=1), timeout=15)
    (tmp_path / "dir").mkdir()
    files = [
        _key_file(tmp_path / "private", 0o600),
        _key_file(tmp_path / "readable", 0o644),
        _key_file(tmp_path / "group", 0o640, spi=2),
        str(tmp_path / "missing"),
        str(tmp_path / "dir"),
        "relative/key",
        "/" + "k" * 5000,
    ]
    sent_keys: set[str] = {SECRET.hex()}
    seen: dict[str, set[str]] = {}

    @settings(max_examples=800, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(_calls(files))
    def check(call: tuple[str, Any]) -> None:
        rpc, request = call
        secret = request.key.hex() if rpc == "SetKey" and len(request.key) >= 8 else ""
        if secret:
            sent_keys.add(secret)
        before = snapshot(s, node)
        try:
            reply = getattr(s, rpc)(request, timeout=30)
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
            assert code not in BROKEN, f"{rpc}({str(request)[:500]}) -> {code} {details[:300]}"
            assert not any(k in details for k in sent_keys), f"{rpc} named a key in its error: {details[:300]}"
            assert snapshot(s, node) == before, f"refused {rpc}({str(request)[:500]}) changed the state"
            seen.setdefault(rpc, set()).add(code.name)
        else:
            shown = str(reply)
            assert not any(k in shown for k in sent_keys), f"{rpc} named a key in its reply"
            seen.setdefault(rpc, set()).add("OK")

    check()
    # every RPC was reached, and the changing ones were refused with a status of their own
    assert set(seen) == set(pb.DESCRIPTOR.services_by_name["Ipsec"].methods_by_name), seen
    assert {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "PERMISSION_DENIED"} <= seen["SetKey"], seen
    assert "INVALID_ARGUMENT" in seen["UpsertPeer"] and "INVALID_ARGUMENT" in seen["SetLocalNode"], seen
    assert "NOT_FOUND" in seen["DeletePeer"], seen
    log = (node.workdir / "ipsec.log").read_text(errors="replace")
    assert not any(k in log for k in sent_keys), "a key reached the service's log"
    key_dir = node.state_dir / "ipsec-keys"
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in key_dir.iterdir())
