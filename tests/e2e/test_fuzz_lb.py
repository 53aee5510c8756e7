"""Generated bad and edge requests against a real load balancer: never INTERNAL, and a refusal changes nothing.

Every RPC gets well-formed messages whose fields hold odd values (scoped, link-local or
malformed addresses, ports past 65535, unknown enum numbers, weights and table sizes at and
past their limits, odd names). After each call the status must be a deliberate one; after
each refusal the services and the frontends in the datapath must read exactly as before.
Health checks are never accepted on (interval 0, or below the minimum and refused): probe
results would change the services between calls.
"""

from __future__ import annotations

import ctypes
import ipaddress
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from weir.common.v1 import common_pb2
from weir.lb.v1 import lb_pb2 as pb
from weir.lb.v1 import lb_pb2_grpc as pb_grpc

from pybpf import Map
from services.lb.defs import LbService, LbServiceKey
from tests.harness.node import Node

pytestmark = pytest.mark.root

BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=30)  # protobuf strings are UTF-8
INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)

names = st.one_of(
    st.sampled_from(["web", "dns", "a", "x" * 63, "x" * 64, "web\n", "Web", "-web", "web-", "", "a_b", "w" * 10_000]),
    TEXT,
)
addresses = st.one_of(
    st.sampled_from([
        "198.19.0.1", "198.19.0.2", "198.19.0.3", "10.0.0.1", "10.0.0.2", "0.0.0.0", "255.255.255.255",
        "224.0.0.1", "127.0.0.1", "169.254.1.1", "fe80::5%eth0", "10.0.0.1%eth0", "2001:db8::1", "198.19.0.300",
        "198.19.0.1\n", " 198.19.0.1", "", "1" * 10_000,
    ]),
    TEXT,
)  # fmt: skip
ports = st.one_of(st.sampled_from([0, 1, 80, 8080, 65535, 65536]), UINT32)
enums = st.one_of(st.sampled_from([0, 1, 2, 3]), INT32)
weights = st.one_of(st.none(), st.sampled_from([0, 1, 2, 65535, 65536, -1]), INT32)
backends = st.lists(
    st.builds(lambda a, p, w, s: pb.Backend(address=a, port=p, weight=w, state=s), addresses, ports, weights, enums),
    max_size=4,
)
services = st.builds(
    lambda n, k, a, p, proto, b, alg, size, seed, aff, hc: pb.Service(
        name=n, kind=k, address=a, port=p, protocol=proto, backends=b, algorithm=alg, maglev_table_size=size,
        maglev_seed=seed, affinity_timeout_seconds=aff, health_check=hc),
    names, enums, addresses, ports,
    st.one_of(st.sampled_from(["TCP", "UDP", "udp", "", "SCTP", "ICMP", "TCP\n"]), TEXT),
    backends, enums,
    st.one_of(st.sampled_from([0, 1, 2, 3, 1000, 1021, 4093, 131071, 131072, 262139]), UINT32),
    st.integers(0, 2**64 - 1), UINT32,
    # Intervals below the 50 ms minimum only: an accepted check would probe and change services between calls.
    st.builds(lambda i, t, u, h: pb.HealthCheck(interval_ms=i, timeout_ms=t, unhealthy_threshold=u,
                                                healthy_threshold=h),
              st.sampled_from([0, 0, 1, 49]), UINT32, UINT32, UINT32),
)  # fmt: skip
# Mostly valid services (a few names, VIPs and backends that clash and repeat), so calls
# also get past validation: ids are taken and given back, frontends clash, capacity runs out.
tame_backends = st.lists(
    st.builds(
        lambda a, w, s: pb.Backend(address=a, port=8080, weight=w, state=s),
        st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]),
        st.one_of(st.none(), st.sampled_from([0, 1, 3, 65535, -1])),
        st.sampled_from([0, 1, 2, 3, 4]),
    ),
    max_size=4,
)
tame_services = st.builds(
    lambda n, k, a, p, proto, b, alg, size: pb.Service(
        name=n, kind=k, address=a, port=p, protocol=proto, backends=b, algorithm=alg, maglev_table_size=size
    ),
    st.sampled_from(["web", "dns", "api", "db", "x" * 63]),
    st.sampled_from([0, 1, 1, 1, 2, 3]),
    st.sampled_from(["198.19.0.1", "198.19.0.2", "198.19.0.3", "169.254.0.1"]),
    st.sampled_from([80, 443, 0]),
    st.sampled_from(["TCP", "UDP", ""]),
    tame_backends,
    st.sampled_from([0, 1, 2, 5]),
    st.sampled_from([0, 0, 1021, 7, 1000, 3]),
)
any_services = st.one_of(services, tame_services)
pages = st.builds(lambda size, token: common_pb2.PageRequest(page_size=size, page_token=token),
                  st.one_of(st.sampled_from([0, 1, 10_000, 10_001]), UINT32),
                  st.one_of(st.sampled_from(["", "web", "zzz"]), TEXT))  # fmt: skip

calls = st.one_of(
    st.builds(lambda s: ("UpsertService", pb.UpsertServiceRequest(service=s)), any_services),
    st.just(("UpsertService", pb.UpsertServiceRequest())),
    st.builds(lambda s: ("UpsertServices", pb.UpsertServicesRequest(services=s)),
              st.one_of(st.lists(any_services, max_size=3), st.lists(tame_services, min_size=1, max_size=2))),
    st.builds(lambda n: ("DeleteService", pb.DeleteServiceRequest(name=n)), names),
    st.builds(lambda n: ("GetService", pb.GetServiceRequest(name=n)), names),
    st.builds(lambda p: ("ListServices", pb.ListServicesRequest(page=p)), pages),
    st.builds(lambda n, a, p, w, s: ("SetBackend", pb.SetBackendRequest(service=n, address=a, port=p, weight=w,
                                                                         state=s)),
              st.one_of(names, st.sampled_from(["web", "dns"])), st.one_of(addresses, st.just("10.0.0.1")),
              st.one_of(ports, st.just(8080)), weights, enums),
    st.builds(lambda n, a, w, s: ("SetBackend", pb.SetBackendRequest(service=n, address=a, port=8080, weight=w,
                                                                      state=s)),
              st.sampled_from(["web", "dns", "api"]), st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
              st.one_of(st.none(), st.sampled_from([0, 2, 65535, -1, 70000])), st.sampled_from([0, 1, 2, 3, 4])),
    st.builds(lambda n: ("GetCounters", pb.GetCountersRequest(service=n)), names),
)  # fmt: skip


def accepted_as_given(service: pb.Service, reply: pb.Service) -> bool:
    """An accepted service holds what was asked: no enum number silently mapped, no address it cannot serve."""
    backends_ok = all(
        got.state == (asked.state or pb.BACKEND_STATE_ACTIVE) and not ipaddress.ip_address(got.address).is_link_local
        for asked, got in zip(service.backends, reply.backends, strict=True)
    )
    vip_ok = reply.kind == pb.KIND_NODE_PORT or not ipaddress.ip_address(reply.address).is_link_local
    return (reply.kind == (service.kind or pb.KIND_CLUSTER_IP) and reply.algorithm == (service.algorithm or
            pb.ALGORITHM_HASH) and backends_ok and vip_ok)  # fmt: skip


def snapshot(s: pb_grpc.LoadBalancerStub, node: Node) -> tuple[Any, ...]:
    """The services as a client reads them, and the frontends as packets see them."""
    listed = s.ListServices(pb.ListServicesRequest(page=common_pb2.PageRequest(page_size=10_000)), timeout=10)
    with Map.from_pin(node.bpffs_root / "lb" / "lb_services", key_type=LbServiceKey, value_type=LbService) as m:
        frontends = sorted((bytes(k).hex(), bytes(v).hex()) for k, v in m.items())
    with Map.from_pin(node.bpffs_root / "lb" / "lb_backends").typed(ctypes.c_uint32, None) as m:
        backend_ids = sorted(int(k) for k in m)
    return [x.SerializeToString(deterministic=True) for x in listed.services], frontends, backend_ids


def test_fuzzed_requests_never_break_the_lb_and_refusals_change_nothing(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator")
    node.start("lb", "--max-services", "16")
    s = pb_grpc.LoadBalancerStub(node.channel("lb"))
    s.UpsertService(
        pb.UpsertServiceRequest(
            service=pb.Service(
                name="web",
                address="198.19.0.1",
                port=80,
                protocol="TCP",
                backends=[pb.Backend(address="10.0.0.1", port=8080), pb.Backend(address="10.0.0.2", port=8080)],
            )
        ),
        timeout=10,
    )
    seen: dict[str, set[str]] = {}

    @settings(max_examples=800, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(calls)
    def check(call: tuple[str, Any]) -> None:
        rpc, request = call
        before = snapshot(s, node)
        try:
            reply = getattr(s, rpc)(request, timeout=30)
        except grpc.RpcError as err:
            code = err.code()
            assert code not in BROKEN, f"{rpc}({str(request)[:500]}) -> {code} {(err.details() or '')[:300]}"
            assert snapshot(s, node) == before, f"refused {rpc}({str(request)[:500]}) changed the state"
            seen.setdefault(rpc, set()).add(code.name)
        else:
            seen.setdefault(rpc, set()).add("OK")
            asked = [request.service] if rpc == "UpsertService" else request.services if rpc == "UpsertServices" else []
            got = [reply] if rpc == "UpsertService" else reply.services if rpc == "UpsertServices" else []
            for service, stored in zip(asked, got, strict=True):
                assert accepted_as_given(service, stored), f"{rpc} accepted {service} as {stored}"

    check()
    assert set(seen) == set(pb.DESCRIPTOR.services_by_name["LoadBalancer"].methods_by_name), seen
    assert all({"INVALID_ARGUMENT", "OK"} <= seen[rpc] for rpc in ("UpsertService", "UpsertServices")), seen
    assert "INVALID_ARGUMENT" in seen["SetBackend"], seen
