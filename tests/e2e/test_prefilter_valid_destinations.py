"""The prefilter's valid-destination mode: traffic from outside for nothing this node serves drops at XDP."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

import grpc
import pytest
from weir.lb.v1 import lb_pb2, lb_pb2_grpc
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.prefilter.v1 import prefilter_pb2 as pb
from weir.prefilter.v1 import prefilter_pb2_grpc as pb_grpc

from tests.harness import traffic
from tests.harness.node import NET_IFNAME, NODE_NET_V4, REPO, Node

pytestmark = pytest.mark.root

UNKNOWN = "198.18.0.99"  # routed to the node by the outside; no endpoint has it
EXTRA_CIDR, EXTRA = "198.18.7.0/24", "198.18.7.5"
VIP = "198.18.9.10"


def invalid_drops(node: Node) -> int:
    reply = node.orchestrator().GetMetrics(orch_pb.GetMetricsRequest(), timeout=5)
    return sum(r.counter.packets for r in reply.reasons if r.reason == "INVALID_DESTINATION")


def pings(node: Node, address: str, count: int = 2) -> int:
    return traffic.ping(node.outside, address, count=count, wait=0.5)


def test_valid_destination_mode_drops_only_what_no_one_here_serves(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator", "prefilter", "lb")
    ep = node.create_endpoint("web")
    prefilter = pb_grpc.PrefilterStub(node.channel("prefilter"))
    prefilter.Attach(pb.AttachRequest(interface=NET_IFNAME), timeout=10)
    assert not prefilter.GetValidDestinations(pb.GetValidDestinationsRequest(), timeout=5).enabled  # off by default
    pings(node, UNKNOWN)
    assert invalid_drops(node) == 0

    with pytest.raises(grpc.RpcError) as err:
        prefilter.SetValidDestinations(pb.SetValidDestinationsRequest(enabled=True, cidrs=["198.18.7.1/24"]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "host bits" in (err.value.details() or "")
    assert not prefilter.GetValidDestinations(pb.GetValidDestinationsRequest(), timeout=5).enabled

    state = prefilter.SetValidDestinations(pb.SetValidDestinationsRequest(enabled=True, cidrs=[EXTRA_CIDR]), timeout=10)
    assert state.enabled and list(state.cidrs) == [EXTRA_CIDR]
    assert pings(node, ep.ipv4) == 2 and pings(node, ep.ipv6) == 2  # a local endpoint
    assert pings(node, NODE_NET_V4) == 2  # a node address
    assert invalid_drops(node) == 0
    pings(node, EXTRA)  # the operator's CIDR: not dropped here (nothing answers behind it)
    assert invalid_drops(node) == 0
    pings(node, UNKNOWN, count=3)
    assert invalid_drops(node) == 3

    lb = lb_pb2_grpc.LoadBalancerStub(node.channel("lb"))
    service = lb_pb2.Service(
        name="web", address=VIP, port=80, protocol="TCP", backends=[lb_pb2.Backend(address=ep.ipv4, port=8080)]
    )
    lb.UpsertService(lb_pb2.UpsertServiceRequest(service=service), timeout=10)
    deadline = time.monotonic() + 10
    while f"{VIP}/32" not in prefilter.GetValidDestinations(pb.GetValidDestinationsRequest(), timeout=5).frontends:
        assert time.monotonic() < deadline, "the prefilter did not learn the lb service's frontend"
        time.sleep(0.2)
    pings(node, VIP)  # a service frontend (lb answers no ICMP; the point is that XDP lets it in)
    assert invalid_drops(node) == 3

    weir = [str(REPO / "weir"), "--instance", node.name, "--run-dir", str(node.run_dir), "prefilter"]
    shown = subprocess.run([*weir, "valid-destinations", "--disable", "-o", "json"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"enabled": False, "cidrs": [EXTRA_CIDR], "frontends": [f"{VIP}/32"]}
    pings(node, UNKNOWN)
    assert invalid_drops(node) == 3
