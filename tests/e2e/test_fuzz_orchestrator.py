"""Generated bad and edge requests against a real orchestrator: refused cleanly, nothing changed.

Every message is well formed (protobuf), its values are not: scoped and link-local
addresses, names with NUL, '/' or a trailing newline, enum values that do not exist,
oversized lists. Every RPC of the service is generated (a test checks the list against
the service's descriptor), streams included (read briefly, then cancelled). The status must
never be INTERNAL or UNKNOWN, and the endpoints, devices, slots, XDP attachments, remote
nodes and event limits must read the same after each refusal. A request that happens to be
valid is undone (and the baseline read again), so the run never drifts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from weir.common.v1 import common_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

from tests.harness.node import NODE_NET_V4, NODE_NET_V6, Node

pytestmark = pytest.mark.root

BASELINE = "baseline-ep"
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)

EDGE_TEXT = [
    "", " ", "x\n", "a\x00b", "../etc", "a/b", "lo:1", ".", "..", "x" * 16, "x" * 300, "é", "\u202e",
    "fe80::5%eth0", "fe80::5", "fe80::1", "169.254.1.1", "169.254.9.9", "0.0.0.0", "::", "127.0.0.1", "::1",
    "255.255.255.255", "224.0.0.1", "ff02::1", "240.0.0.1", NODE_NET_V4, NODE_NET_V6, "192.0.2.0", "192.0.2.255",
    "10.1.2.300", "10.0.0.0/33", "10.0.0.1/8", "::ffff:10.0.0.1", "2001:db8::1%1", "198.18.0.10",
    "/sys/fs/bpf/nothing", "/sys/fs/bpf/a\x00b", "relative/pin", "Bad_Name", "ok-name\n", BASELINE,
]  # fmt: skip
# Values that pass the first checks, so the edge values next to them reach the deeper ones.
PLAUSIBLE = ["198.18.7.7", "2001:db8:e::77", "fuzz-ep", "wnet0", "/sys/fs/bpf", "policy", "10.9.0.0/16"]
text = st.one_of(st.sampled_from(EDGE_TEXT), st.sampled_from(PLAUSIBLE), st.text(max_size=24))


def field(good: list[str], bad: list[str]) -> st.SearchStrategy[str]:
    """A field's value: mostly good, else one of its edge values (or any text)."""
    return st.one_of(st.sampled_from(good), st.sampled_from(good), st.sampled_from(bad), text)


name_field = field(["fuzz-ep", "fuzz-b"], ["x\n", "ok-name\n", "a\x00b", "x" * 300, "Bad_Name", "a/b"])
v4_field = field(["198.18.7.7", ""], ["169.254.9.9", "169.254.1.1", "255.255.255.255", "240.0.0.1", "224.0.0.1",
                                       NODE_NET_V4, "192.0.2.0", "192.0.2.255", "0.0.0.0"])  # fmt: skip
v6_field = field(["2001:db8:e::77", ""], ["fe80::5%eth0", "2001:db8::1%1", "fe80::5", "fe80::1", "ff02::1",
                                           NODE_NET_V6, "::"])  # fmt: skip
ifname_field = field(["", "wnet0"], ["a\x00b", "lo:1", "x" * 300, "x\n", "a/b"])
enum_value = st.one_of(st.integers(min_value=1, max_value=8), st.sampled_from([-(2**31), -1, 0, 9, 99, 2**31 - 1]))
big_id = st.one_of(st.just(0), st.integers(min_value=2**31 - 1000, max_value=2**32 - 1))
node_name_field = field(["fuzz-node", "fuzz-b.example"], ["x\n", "ok-name\n", "a\x00b", "x" * 300, "Bad_Name", "a/b",
                                                         "lo:1", "-x", "x" * 64])  # fmt: skip
node_id = st.one_of(st.sampled_from([1, 2, 7, 65535]), st.sampled_from([0, 65536, 2**32 - 1]))
underlay = field(["192.0.2.50", "2001:db8:ff::50"], ["fe80::5%eth0", "169.254.1.1", "224.0.0.1", "0.0.0.0", "::",
                                                     "ff02::1", "10.1.2.300"])  # fmt: skip
remote_cidr = field(["10.9.0.0/16", "2001:db8:99::/48"], ["10.0.0.0/33", "10.0.0.1/8", "198.18.0.0/15", "0.0.0.0/0",
                                                           "::/0", "fe80::/64", "224.0.0.0/4"])  # fmt: skip
limit_text = field(["drop=100/10", "verdict=off", "prefilter=50/20:4", "translate=0"],
                   ["drop=fast", "flows=3", "drop=-1", "drop=1/0", "drop=5:0", "drop=1000001", "=", "drop",
                    "accel=5/5:2000000", "DROP = 5"])  # fmt: skip
flow_text = st.one_of(text, st.sampled_from(["TCP", "udp", "dropped", "POLICY_DENIED", "app=x", "10.0.0.0/8"]))


def requests(draw: st.DrawFn) -> tuple[str, Any]:
    """One (method name, request) with edge values."""
    method = draw(st.sampled_from([*sorted(BUILDERS), *["CreateEndpoint", "AttachDevice", "UpsertNode"] * 4]))
    return method, BUILDERS[method](draw)


def remote_node(d: Any) -> pb.Node:
    """A valid remote node with some of its fields (none, one, or more) drawn from their edge values."""
    fields: dict[str, Any] = {
        "name": "fuzz-node", "node_id": 2, "addresses": ["192.0.2.50"], "cidrs": ["10.9.0.0/16"], "routing": 1,
        "key_index": 0,
    }  # fmt: skip
    drawn = {
        "name": node_name_field,
        "node_id": node_id,
        "addresses": st.lists(underlay, max_size=3),
        "cidrs": st.lists(remote_cidr, max_size=3),
        "routing": st.sampled_from([0, 1, 2, 3, -1, 99]),
        "key_index": st.sampled_from([0, 15, 16, 2**32 - 1]),
    }
    for name in d(st.sets(st.sampled_from(sorted(drawn)), max_size=len(drawn))):
        fields[name] = d(drawn[name])
    return pb.Node(**fields)


def few(values: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """A repeated field: empty half the time (so the other fields decide), else up to two values."""
    return st.one_of(st.just([]), st.lists(values, max_size=2))


def since(d: Any) -> Timestamp | None:
    seconds = d(st.sampled_from([None, 0, -1, -(2**40), 2**33, 1_700_000_000]))
    return None if seconds is None else Timestamp(seconds=seconds)


BUILDERS: dict[str, Callable[[Any], Any]] = {
    "CreateEndpoint": lambda d: pb.CreateEndpointRequest(
        name=d(name_field), ipv4=d(v4_field), ipv6=d(v6_field), adopt_interface=d(ifname_field),
        labels=d(st.dictionaries(text, text, max_size=2)), policy_wait_ms=d(st.sampled_from([0, 1, 60_001]))),
    "GetEndpoint": lambda d: pb.GetEndpointRequest(name=d(text)),
    "DeleteEndpoint": lambda d: pb.DeleteEndpointRequest(name=d(text)),
    "ListEndpoints": lambda d: pb.ListEndpointsRequest(page=common_pb2.PageRequest(
        page_size=d(st.sampled_from([0, 1, 1000, 1001, 2**32 - 1])), page_token=d(text))),
    "EndpointPolicyReady": lambda d: pb.EndpointPolicyReadyRequest(
        endpoints=[pb.EndpointPolicyReadyRequest.Ready(name=d(text), id=d(big_id))], revision=d(big_id)),
    "AllocateCIDRIdentities": lambda d: pb.AllocateCIDRIdentitiesRequest(
        owner=d(text), cidrs=d(st.lists(text, max_size=3)), reserve_only=d(st.booleans())),
    "ReleaseCIDRIdentities": lambda d: pb.ReleaseCIDRIdentitiesRequest(
        owner=d(text), cidrs=d(st.lists(text, max_size=3))),
    "RegisterPrograms": lambda d: pb.RegisterProgramsRequest(service=d(text), programs=[
        pb.ProgramRegistration(hook=d(enum_value), slot=d(enum_value), pin_path=d(text))
        for _ in range(d(st.sampled_from([0, 1, 41])))]),
    "SetSlot": lambda d: pb.SetSlotRequest(hook=d(enum_value), slot=d(enum_value), pin_path=d(text),
                                           program_id=d(big_id)),
    "ClearSlot": lambda d: pb.ClearSlotRequest(hook=d(enum_value), slot=d(enum_value)),
    "GetSlot": lambda d: pb.GetSlotRequest(hook=d(enum_value), slot=d(enum_value)),
    "ListSlots": lambda d: pb.ListSlotsRequest(hook=d(enum_value)),
    "SwapChain": lambda d: pb.SwapChainRequest(hook=d(enum_value)),
    "AttachXdp": lambda d: pb.AttachXdpRequest(interface=d(ifname_field), mode=d(enum_value)),
    "DetachXdp": lambda d: pb.DetachXdpRequest(interface=d(text)),
    "AttachDevice": lambda d: pb.AttachDeviceRequest(interface=d(ifname_field)),
    "DetachDevice": lambda d: pb.DetachDeviceRequest(interface=d(text)),
    "ListDevices": lambda d: pb.ListDevicesRequest(),
    "ListXdp": lambda d: pb.ListXdpRequest(),
    "WatchEndpoints": lambda d: pb.WatchEndpointsRequest(snapshot=d(st.booleans())),
    "ListIdentities": lambda d: pb.ListIdentitiesRequest(),
    "WatchIdentities": lambda d: pb.WatchIdentitiesRequest(),
    "CollectConntrack": lambda d: pb.CollectConntrackRequest(),
    "UpsertNode": lambda d: pb.UpsertNodeRequest(node=remote_node(d)),
    "DeleteNode": lambda d: pb.DeleteNodeRequest(name=d(node_name_field)),
    "GetNode": lambda d: pb.GetNodeRequest(name=d(node_name_field)),
    "ListNodes": lambda d: pb.ListNodesRequest(page=common_pb2.PageRequest(
        page_size=d(st.sampled_from([0, 1, 1000, 1001, 2**32 - 1])), page_token=d(text))),
    "WatchNodes": lambda d: pb.WatchNodesRequest(),
    "GetLocalNode": lambda d: pb.GetLocalNodeRequest(),
    "GetClusterStatus": lambda d: pb.GetClusterStatusRequest(),
    "GetMetrics": lambda d: pb.GetMetricsRequest(),
    "WatchEvents": lambda d: pb.WatchEventsRequest(types=d(st.lists(
        st.one_of(text, st.sampled_from(["DROP", "VERDICT", "TRANSLATE", "drop"])), max_size=3))),
    "GetFlows": lambda d: pb.GetFlowsRequest(
        endpoints=d(few(text)), labels=d(few(flow_text)), cidrs=d(few(flow_text)),
        ports=d(few(st.sampled_from([0, 1, 65535, 65536]))), protocols=d(few(flow_text)),
        verdicts=d(few(flow_text)), reasons=d(few(flow_text)), rules=d(few(text)), follow=d(st.booleans()),
        since=since(d), last=d(st.sampled_from([0, 1, 65536, 65537, 2**32 - 1]))),
    "GetFlowStats": lambda d: pb.GetFlowStatsRequest(),
    "SetEventLimits": lambda d: pb.SetEventLimitsRequest(
        limits=d(st.one_of(st.just(["drop=100/10"]), st.lists(limit_text, max_size=3)))),
}  # fmt: skip
# Server streams: read for STREAM_SECONDS at most (a watch or a follow stays open), then cancelled.
STREAMS = {"WatchEndpoints", "WatchIdentities", "WatchNodes", "WatchEvents", "GetFlows"}
STREAM_SECONDS = 0.5


# Values no name, address or interface field may take: a request carrying one must be refused.
NEVER_VALID = {
    "x\n", "ok-name\n", "a\x00b", "a/b", "lo:1", "x" * 300, "fe80::5%eth0", "2001:db8::1%1", "fe80::5", "fe80::1",
    "169.254.1.1", "169.254.9.9", "255.255.255.255", "240.0.0.1", "224.0.0.1", "ff02::1", NODE_NET_V4, NODE_NET_V6,
    "192.0.2.0", "192.0.2.255",
}  # fmt: skip


# Of those, the ones no label key or value may take either ("a/b" is a valid key, "169.254.1.1" a valid value).
LABEL_NEVER_VALID = {v for v in NEVER_VALID if len(v) > 63 or any(c in v for c in "\n\x00:%")}


BAD_NODE_NAMES = {"x\n", "ok-name\n", "a\x00b", "x" * 300, "Bad_Name", "a/b", "lo:1", "-x", "x" * 64}
BAD_LIMITS = {"drop=fast", "flows=3", "drop=-1", "drop=1/0", "drop=5:0", "drop=1000001", "=", "drop",
              "accel=5/5:2000000"}  # fmt: skip


def must_refuse(method: str, request: Any) -> bool:
    """Whether the request carries a value that makes it invalid whatever the rest says."""
    if method == "UpsertNode":
        node = request.node
        return node.name in BAD_NODE_NAMES or node.node_id in (0, 65536, 2**32 - 1) or node.key_index > 15
    if method == "SetEventLimits":
        return not request.limits or any(limit in BAD_LIMITS for limit in request.limits)
    if method == "CreateEndpoint":
        labels = [*request.labels.keys(), *request.labels.values()]
        if any(f in LABEL_NEVER_VALID for f in labels):
            return True
        fields = [request.name, request.ipv4, request.ipv6, request.adopt_interface]
    elif method in ("AttachDevice", "AttachXdp"):
        fields = [request.interface]
    elif method == "RegisterPrograms":
        fields = [request.service]
    else:
        return False
    return any(f in NEVER_VALID for f in fields)


def limits(stub: pb_grpc.OrchestratorStub) -> list[tuple[str, int, int, int, bool]]:
    stats = stub.GetFlowStats(pb.GetFlowStatsRequest(), timeout=10)
    return [(k.kind, k.rate, k.burst, k.sample, k.off) for k in stats.event_kinds]


def state(stub: pb_grpc.OrchestratorStub) -> tuple[Any, ...]:
    return (
        stub.ListEndpoints(pb.ListEndpointsRequest(), timeout=10),
        stub.ListDevices(pb.ListDevicesRequest(), timeout=10),
        stub.ListSlots(pb.ListSlotsRequest(), timeout=10),
        stub.ListXdp(pb.ListXdpRequest(), timeout=10),
        stub.ListNodes(pb.ListNodesRequest(), timeout=10),
        stub.GetLocalNode(pb.GetLocalNodeRequest(), timeout=10),
        limits(stub),
    )


def invoke(stub: pb_grpc.OrchestratorStub, method: str, request: Any) -> None:
    """Call; a stream is read until it ends or STREAM_SECONDS pass (its refusal comes first)."""
    if method not in STREAMS:
        getattr(stub, method)(request, timeout=20)
        return
    call = getattr(stub, method)(request, timeout=STREAM_SECONDS)
    try:
        for _ in call:
            pass
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    finally:
        call.cancel()


def undo(stub: pb_grpc.OrchestratorStub, method: str, request: Any, baseline: tuple[Any, ...]) -> None:
    """Take back a request that was valid after all."""
    if method == "UpsertNode":
        before = {n.name: n for n in baseline[4].nodes}
        if request.node.name in before:
            stub.UpsertNode(pb.UpsertNodeRequest(node=before[request.node.name]), timeout=10)
        else:
            stub.DeleteNode(pb.DeleteNodeRequest(name=request.node.name), timeout=10)
    elif method == "SetEventLimits":
        texts = [f"{k}=off" if off else f"{k}={rate}/{burst}:{sample}" for k, rate, burst, sample, off in baseline[6]]
        stub.SetEventLimits(pb.SetEventLimitsRequest(limits=texts), timeout=10)
    elif method == "CreateEndpoint":
        stub.DeleteEndpoint(pb.DeleteEndpointRequest(name=request.name), timeout=10)
    elif method == "AttachDevice":
        stub.DetachDevice(pb.DetachDeviceRequest(interface=request.interface), timeout=10)
    elif method == "AttachXdp":
        stub.DetachXdp(pb.DetachXdpRequest(interface=request.interface), timeout=10)
    elif method == "AllocateCIDRIdentities":
        release = pb.ReleaseCIDRIdentitiesRequest(owner=request.owner, cidrs=request.cidrs)
        stub.ReleaseCIDRIdentities(release, timeout=10)


def test_bad_requests_are_refused_cleanly_and_change_nothing(node: Node) -> None:
    stub = node.orchestrator()
    node.create_endpoint(BASELINE, {"app": "x"})
    baseline = [state(stub)]
    calls = {"refused": 0, "ok": 0}
    seen: set[str] = set()  # methods a request of which was taken
    called: set[str] = set()

    def run(strategy: st.SearchStrategy[tuple[str, Any]], examples: int) -> None:
        settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )(given(strategy)(check))()

    def check(case: tuple[str, Any]) -> None:
        method, request = case
        if method == "DeleteEndpoint" and request.name == BASELINE:
            return
        called.add(method)
        try:
            invoke(stub, method, request)
        except grpc.RpcError as err:
            assert err.code() not in BAD_CODES, f"{method}({request!r}) -> {err.code()}: {err.details()}"
            assert len(err.details() or "") < 1000, f"{method}: the message echoes the request"
            assert state(stub) == baseline[0], f"{method}({request!r}) was refused but changed the state"
            calls["refused"] += 1
            return
        calls["ok"] += 1
        seen.add(method)
        undo(stub, method, request, baseline[0])
        baseline[0] = state(stub)
        assert not must_refuse(method, request), f"{method}({request!r}) was taken"

    run(st.composite(requests)(), 600)
    for missed in sorted(set(BUILDERS) - called):  # a method the 600 draws never picked gets draws of its own
        run(st.composite(lambda draw, m=missed: (m, BUILDERS[m](draw)))(), 20)
    assert calls["refused"] > 200, calls
    assert called == set(BUILDERS), set(BUILDERS) - called
    assert {"UpsertNode", "SetEventLimits", "GetFlows", "WatchNodes"} <= seen, seen  # valid ones were made too
    names = [e.name for e in stub.ListEndpoints(pb.ListEndpointsRequest(), timeout=10).endpoints]
    assert names == [BASELINE]


def test_every_rpc_of_the_service_is_generated() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Orchestrator"].methods}
    assert set(BUILDERS) == methods, (methods - set(BUILDERS), set(BUILDERS) - methods)
    streams = {m.name for m in pb.DESCRIPTOR.services_by_name["Orchestrator"].methods if m.server_streaming}
    assert streams == STREAMS


def test_log_lines_are_bounded(node: Node) -> None:
    """A 100k-character name is refused with a short message, and no log line carries it."""
    stub = node.orchestrator()
    huge = "n" * 100_000
    for call in (
        lambda: stub.CreateEndpoint(pb.CreateEndpointRequest(name=huge, ipv4="198.18.5.5"), timeout=10),
        lambda: stub.GetEndpoint(pb.GetEndpointRequest(name=huge), timeout=10),
        lambda: stub.AttachDevice(pb.AttachDeviceRequest(interface=huge), timeout=10),
        lambda: stub.AllocateCIDRIdentities(pb.AllocateCIDRIdentitiesRequest(owner=huge, cidrs=[huge]), timeout=10),
        lambda: stub.SetSlot(
            pb.SetSlotRequest(hook=common_pb2.HOOK_FROM_CONTAINER, slot=common_pb2.SLOT_LB, pin_path="/" + huge),
            timeout=10,
        ),
        lambda: stub.RegisterPrograms(pb.RegisterProgramsRequest(service=huge), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert len(err.value.details() or "") < 500
    log = (node.workdir / "orchestrator.log").read_text()
    longest = max(len(line) for line in log.splitlines())
    assert longest < 2000, f"a log line of {longest} characters"
