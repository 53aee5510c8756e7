"""Generated bad and edge requests against a real sockaccel: never INTERNAL, and a refusal changes nothing.

Every RPC gets well-formed messages whose fields hold odd values (unknown enum numbers,
names the orchestrator could never have given, odd page sizes and tokens). After each call
the status must be a deliberate one; after each refusal the status (mode, overrides,
revision) and the pinned config and address maps must read exactly as before.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from weir.common.v1 import common_pb2
from weir.sockaccel.v1 import sockaccel_pb2 as pb
from weir.sockaccel.v1 import sockaccel_pb2_grpc as pb_grpc

from pybpf import Map
from services.sockaccel.defs import AddrInfo, AddrKey
from tests.harness.node import Node

pytestmark = pytest.mark.root

BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
modes = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(-(2**31), 2**31 - 1))
names = st.one_of(
    st.sampled_from(["web", "db", "nobody", "", "Web", "web\n", "web\x00", "a" * 64, "a" * 100_000, "-web", "w.b"]),
    TEXT,
)
pages = st.builds(lambda size, token: common_pb2.PageRequest(page_size=size, page_token=token),
                  st.one_of(st.sampled_from([0, 1, 10_000, 10_001]), st.integers(0, 2**32 - 1)),
                  st.one_of(st.sampled_from(["", "zzz", "198.18.0.10|00001"]), TEXT))  # fmt: skip
calls = st.one_of(
    st.builds(lambda m: ("SetMode", pb.SetModeRequest(mode=m)), modes),
    st.builds(lambda n, m: ("SetEndpointMode", pb.SetEndpointModeRequest(endpoint=n, mode=m)), names, modes),
    st.just(("GetStatus", pb.GetStatusRequest())),
    st.builds(lambda p: ("ListConnections", pb.ListConnectionsRequest(page=p)), pages),
)  # fmt: skip


def snapshot(s: pb_grpc.SockAccelStub, node: Node) -> tuple[Any, ...]:
    status = s.GetStatus(pb.GetStatusRequest(), timeout=10)
    pins = node.bpffs_root / "sockaccel"
    with Map.from_pin(pins / "sockaccel_config") as config, Map.from_pin(pins / "sockaccel_addrs") as addrs:
        words = sorted(config.typed(ctypes.c_uint32, ctypes.c_uint32).items())
        table = sorted((bytes(k.addr), v.endpoint, v.flags) for k, v in addrs.typed(AddrKey, AddrInfo).items())
    return status.mode, status.revision, [(e.endpoint, e.mode) for e in status.endpoints], words, table


def test_fuzzed_requests_never_break_sockaccel_and_refusals_change_nothing(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator", "policy", "sockaccel")
    node.create_endpoint("web", {"app": "web"}, ipv6=False)
    s = pb_grpc.SockAccelStub(node.channel("sockaccel"))
    seen: dict[str, set[str]] = {}

    @settings(max_examples=400, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(calls)
    def check(call: tuple[str, Any]) -> None:
        rpc, request = call
        before = snapshot(s, node)
        try:
            getattr(s, rpc)(request, timeout=30)
        except grpc.RpcError as err:
            code = err.code()
            assert code not in BROKEN, f"{rpc}({str(request)[:300]}) -> {code} {(err.details() or '')[:300]}"
            assert snapshot(s, node) == before, f"refused {rpc}({str(request)[:300]}) changed the state"
            seen.setdefault(rpc, set()).add(code.name)
        else:
            seen.setdefault(rpc, set()).add("OK")
            if rpc == "SetMode":
                assert request.mode in (1, 2), f"SetMode accepted mode {request.mode}"
            if rpc == "SetEndpointMode":
                assert request.mode in (1, 2, 3) and request.endpoint == "web", f"accepted {str(request)[:300]}"

    check()
    assert set(seen) == set(pb.DESCRIPTOR.services_by_name["SockAccel"].methods_by_name), seen
    assert {"INVALID_ARGUMENT", "OK"} <= seen["SetMode"] and {"INVALID_ARGUMENT", "NOT_FOUND"} <= seen[
        "SetEndpointMode"
    ], seen
