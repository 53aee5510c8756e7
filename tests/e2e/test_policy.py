"""Endpoint policy as real processes: three endpoints, an outside network, real traffic."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from weir.common.v1 import common_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.policy.v1 import policy_pb2 as pb
from weir.policy.v1 import policy_pb2_grpc as pb_grpc

from pybpf import Map
from services.common.datapath import CtKey, CtValue
from services.policy.defs import EndpointPolicyConfig, PolicyEntry, PolicyKey
from tests.harness import netns, traffic
from tests.harness.node import NODE_NET_V4, OUTSIDE_V4, Node

pytestmark = pytest.mark.root


@dataclass
class Cluster:
    node: Node
    frontend: orch_pb.Endpoint
    backend: orch_pb.Endpoint
    db: orch_pb.Endpoint

    @property
    def policy(self) -> pb_grpc.PolicyStub:
        return pb_grpc.PolicyStub(self.node.channel("policy"))

    def reasons(self) -> dict[tuple[str, int], int]:
        reply = self.node.orchestrator().GetMetrics(orch_pb.GetMetricsRequest(), timeout=5)
        return {(r.reason, r.direction): r.counter.packets for r in reply.reasons}


@pytest.fixture
def cluster(make_node: Callable[..., Node]) -> Cluster:
    node = make_node("orchestrator", "policy")
    c = Cluster(
        node,
        node.create_endpoint("frontend", {"app": "frontend"}),
        node.create_endpoint("backend", {"app": "backend"}),
        node.create_endpoint("db", {"app": "db", "tier": "data"}),
    )
    known(c.policy, c.frontend, c.backend, c.db)
    return c


def known(stub: pb_grpc.PolicyStub, *endpoints: orch_pb.Endpoint, timeout: float = 5.0) -> None:
    """Wait until the policy service has followed these endpoints from the orchestrator's stream."""
    deadline = time.monotonic() + timeout
    for ep in endpoints:
        while True:
            try:
                stub.GetEndpointPolicy(pb.GetEndpointPolicyRequest(endpoint=ep.name), timeout=5)
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def sel(**labels: str) -> pb.EndpointSelector:
    return pb.EndpointSelector(match_labels=labels)


def tcp(port: int, end: int = 0) -> pb.PortRule:
    return pb.PortRule(port=port, end_port=end, protocol="TCP")


def udp(port: int) -> pb.PortRule:
    return pb.PortRule(port=port, protocol="UDP")


def icmp() -> pb.PortRule:
    return pb.PortRule(protocol="ICMP")


def tcp_ok(ns: str, dst: str, port: int, source: str = "") -> bool:
    with traffic.server(_server_ns[dst], dst, port):
        return traffic.tcp_connects(ns, dst, port, timeout=0.8, source=source)


def udp_ok(ns: str, dst: str, port: int) -> bool:
    with traffic.server(_server_ns[dst], dst, port, "udp", reply=b"r:"):
        return traffic.udp_exchange(ns, dst, port, b"q", timeout=0.8) == b"r:q"


_server_ns: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _servers(request: pytest.FixtureRequest) -> None:
    if "cluster" in request.fixturenames:
        c: Cluster = request.getfixturevalue("cluster")
        for ep in (c.frontend, c.backend, c.db):
            _server_ns[ep.ipv4] = ep.netns
            _server_ns[ep.ipv6] = ep.netns


def three_tier() -> list[pb.Rule]:
    return [
        pb.Rule(name="backend-in", endpoint_selector=sel(app="backend"), ingress=[
            pb.PeerRule(endpoints=[sel(app="frontend")], ports=[tcp(8080), udp(5353), icmp()]),
        ]),
        pb.Rule(name="db-in", endpoint_selector=sel(app="db"), ingress=[
            pb.PeerRule(endpoints=[sel(app="backend")], ports=[tcp(5432), tcp(7000, 7010)]),
        ]),
    ]  # fmt: skip


def test_three_tiers_allowed_flows_pass_others_fail_with_reasons(cluster: Cluster) -> None:
    c = cluster
    reply = c.policy.ImportRules(pb.ImportRulesRequest(rules=three_tier()), timeout=10)
    assert set(reply.endpoints) == {"backend", "db"}
    before = c.reasons()
    fe, be, db = c.frontend, c.backend, c.db
    # allowed: frontend -> backend on TCP 8080, UDP 5353, ICMP; v4 and v6 (ICMP is IPv4's: ICMPv6 needs its own rule)
    assert tcp_ok(fe.netns, be.ipv4, 8080) and tcp_ok(fe.netns, be.ipv6, 8080)
    assert udp_ok(fe.netns, be.ipv4, 5353)
    assert traffic.ping(fe.netns, be.ipv4, count=3) == 3 and traffic.ping(fe.netns, be.ipv6, count=2, wait=0.5) == 0
    with traffic.server(be.netns, be.ipv4, 8080, reply=b"b:"):
        assert traffic.tcp_exchange(fe.netns, be.ipv4, 8080, b"x" * 100_000) == b"b:" + b"x" * 100_000
    # not allowed: other ports, other peers, the db from the frontend
    assert not tcp_ok(fe.netns, be.ipv4, 8081)
    assert not udp_ok(fe.netns, be.ipv4, 5354)
    assert not tcp_ok(fe.netns, db.ipv4, 5432)
    assert traffic.ping(fe.netns, db.ipv4, count=2, wait=0.5) == 0
    # backend -> db: single port and a port range
    assert tcp_ok(be.netns, db.ipv4, 5432) and tcp_ok(be.netns, db.ipv4, 7000) and tcp_ok(be.netns, db.ipv4, 7010)
    assert not tcp_ok(be.netns, db.ipv4, 7011) and not tcp_ok(be.netns, db.ipv4, 6999)
    # the frontend is selected by no rule: everything from it and to it is allowed
    assert traffic.ping(db.netns, fe.ipv4, count=2) == 2 and tcp_ok(be.netns, fe.ipv4, 9000)
    after = c.reasons()
    ingress = common_pb2.DIRECTION_INGRESS
    assert after.get(("POLICY_DENIED", ingress), 0) - before.get(("POLICY_DENIED", ingress), 0) >= 6
    assert after.get(("POLICY_DENY_RULE", ingress), 0) == before.get(("POLICY_DENY_RULE", ingress), 0)


def test_cidr_with_except_from_outside_and_entity_host(cluster: Cluster) -> None:
    c = cluster
    rule = pb.Rule(name="web-from-net", endpoint_selector=sel(app="frontend"), ingress=[
        pb.PeerRule(cidrs=[pb.CidrRule(cidr="203.0.113.0/24", **{"except": ["203.0.113.8/32"]})], ports=[tcp(80)]),
        pb.PeerRule(entities=["host"], ports=[icmp()]),
    ])  # fmt: skip
    c.policy.ImportRules(pb.ImportRulesRequest(rules=[rule]), timeout=10)
    fe, node = c.frontend, c.node
    assert tcp_ok(node.outside, fe.ipv4, 80, source="203.0.113.7")
    assert not tcp_ok(node.outside, fe.ipv4, 80, source="203.0.113.8")  # the except
    assert not tcp_ok(node.outside, fe.ipv4, 80, source="198.51.100.9")  # world
    assert not tcp_ok(node.outside, fe.ipv4, 80, source=OUTSIDE_V4)
    assert traffic.ping(node.ns, fe.ipv4, count=2, source=NODE_NET_V4) == 2  # host entity
    assert traffic.ping(node.outside, fe.ipv4, count=2, wait=0.5) == 0  # world may not ping
    identities = c.policy.ListIdentities(pb.ListIdentitiesRequest()).identities
    assert any("cidr:203.0.113.8/32" in i.labels for i in identities)
    trace = c.policy.Trace(pb.TraceRequest(source="203.0.113.8", destination=fe.ipv4, port=80, protocol="TCP"))
    assert not trace.allowed and "denied" in trace.steps[-1]
    trace = c.policy.Trace(pb.TraceRequest(source="203.0.113.7", destination=fe.ipv4, port=80, protocol="TCP"))
    assert trace.allowed and list(trace.deciding_rules) == ["web-from-net"]


def test_deny_overrides_allow_and_audit_mode_passes(cluster: Cluster) -> None:
    c = cluster
    fe, be = c.frontend, c.backend
    rules = [
        *three_tier(),
        pb.Rule(
            name="no-8080-from-anyone",
            endpoint_selector=sel(app="backend"),
            ingress_deny=[pb.PeerRule(entities=["all"], ports=[tcp(8080)])],
        ),
    ]
    c.policy.ImportRules(pb.ImportRulesRequest(rules=rules), timeout=10)
    before = c.reasons()
    assert not tcp_ok(fe.netns, be.ipv4, 8080)
    assert udp_ok(fe.netns, be.ipv4, 5353)  # the deny is for TCP 8080 only
    after = c.reasons()
    ingress = common_pb2.DIRECTION_INGRESS
    assert after.get(("POLICY_DENY_RULE", ingress), 0) > before.get(("POLICY_DENY_RULE", ingress), 0)
    trace = c.policy.Trace(pb.TraceRequest(source=fe.ipv4, destination=be.ipv4, port=8080, protocol="TCP"))
    assert not trace.allowed and list(trace.deciding_rules) == ["no-8080-from-anyone"]

    audited = c.policy.SetAuditMode(pb.SetAuditModeRequest(endpoint="backend", audit=True), timeout=10)
    assert audited.audit and audited.ingress_enforced
    before = c.reasons()
    assert tcp_ok(fe.netns, be.ipv4, 8080) and tcp_ok(fe.netns, be.ipv4, 9999)
    after = c.reasons()
    assert after.get(("POLICY_AUDIT", ingress), 0) >= before.get(("POLICY_AUDIT", ingress), 0) + 2
    c.policy.SetAuditMode(pb.SetAuditModeRequest(endpoint="backend", audit=False), timeout=10)
    assert not tcp_ok(fe.netns, be.ipv4, 9999)


def test_policy_change_under_traffic(cluster: Cluster) -> None:
    """Documented behaviour: new and established connections see the new policy at their
    next packet (an established one that is no longer allowed is cut); an unchanged allowed
    flow loses nothing."""
    c = cluster
    fe, be = c.frontend, c.backend
    c.policy.ImportRules(pb.ImportRulesRequest(rules=three_tier()), timeout=10)
    assert not tcp_ok(fe.netns, be.ipv4, 9090)
    with traffic.server(be.netns, be.ipv4, 8080, reply=b"b:"):
        with netns.entered(fe.netns):
            established = socket.create_connection((be.ipv4, 8080), timeout=2)
        established.sendall(b"one")
        assert established.recv(64) == b"b:one"
        stream = traffic.CountedStream(fe.netns, be.netns, be.ipv4, 5353, rate=500).start()
        widened = pb.Rule(name="backend-in", endpoint_selector=sel(app="backend"), ingress=[
            pb.PeerRule(endpoints=[sel(app="frontend")], ports=[tcp(9090), udp(5353), icmp()]),
        ])  # 8080 no longer allowed, 9090 now is; UDP 5353 unchanged  # fmt: skip
        c.policy.ImportRules(pb.ImportRulesRequest(rules=[widened]), timeout=10)
        assert tcp_ok(fe.netns, be.ipv4, 9090)  # newly allowed: at once
        assert not traffic.tcp_connects(fe.netns, be.ipv4, 8080, timeout=0.8)  # newly denied new connection
        established.settimeout(1)
        established.sendall(b"two")  # no longer allowed: the established connection is cut too
        with pytest.raises(TimeoutError):
            established.recv(64)
        established.close()
        result = stream.finish()
        assert result.sent > 100 and result.missing == []  # an unchanged allowed flow lost nothing


def _pinned_policy(node: Node, endpoint_id: int) -> tuple[int, set[tuple[int, int, int, int, int, bool]]]:
    pins = node.bpffs_root / "policy"
    with Map.from_pin(pins / "policy_config", key_type=ctypes.c_uint32, value_type=EndpointPolicyConfig) as cfg:
        value = cfg.lookup(endpoint_id)
        flags = int(value.flags) if value is not None else 0
    with Map.from_pin(pins / "policy_maps", key_type=ctypes.c_uint32, value_type=ctypes.c_uint32) as outer:
        map_id = outer.lookup(endpoint_id)
    if not map_id:
        return flags, set()
    with Map.from_id(map_id, key_type=PolicyKey, value_type=PolicyEntry) as inner:
        return flags, {
            (int(k.dir), int.from_bytes(bytes(k.identity), "big"), int(k.proto),
             int.from_bytes(bytes(k.port), "big"), int(k.prefixlen), bool(v.flags & 1))
            for k, v in inner.items()
        }  # fmt: skip


def _computed(policy: pb.EndpointPolicy) -> set[tuple[int, int, int, int, int, bool]]:
    out = set()
    for e in policy.entries:
        prefixlen = 40 if e.protocol == 0 else 48 + e.port_prefix
        out.add((e.direction - 1, e.identity, e.protocol, e.port, prefixlen, e.deny))
    return out


def _damage_policy(node: Node, entry_of: int, enforcement_of: int) -> None:
    """Remove one policy entry of one endpoint and turn enforcement off for another."""
    pins = node.bpffs_root / "policy"
    with Map.from_pin(pins / "policy_maps", key_type=ctypes.c_uint32, value_type=ctypes.c_uint32) as outer:
        map_id = outer[entry_of]
    with Map.from_id(map_id, key_type=PolicyKey, value_type=PolicyEntry) as inner:
        inner.delete(next(iter(inner.keys())))
    with Map.from_pin(pins / "policy_config", key_type=ctypes.c_uint32, value_type=EndpointPolicyConfig) as cfg:
        cfg[enforcement_of] = EndpointPolicyConfig(0)


def test_sigkill_keeps_enforcing_and_restart_rebuilds_maps_from_persisted_rules(cluster: Cluster) -> None:
    c = cluster
    fe, be, db = c.frontend, c.backend, c.db
    c.policy.ImportRules(pb.ImportRulesRequest(rules=three_tier()), timeout=10)
    before = {ep.name: _pinned_policy(c.node, ep.id) for ep in (fe, be, db)}
    c.node.kill("policy")
    assert tcp_ok(fe.netns, be.ipv4, 8080) and not tcp_ok(fe.netns, be.ipv4, 8081)
    assert not tcp_ok(fe.netns, db.ipv4, 5432)
    # Damage the maps while the service is down, so that only a rebuild from the
    # persisted rules (not pins left as they were) passes the checks below.
    _damage_policy(c.node, entry_of=be.id, enforcement_of=db.id)
    assert _pinned_policy(c.node, be.id) != before["backend"] and _pinned_policy(c.node, db.id) != before["db"]
    c.node.start("policy")
    rules = c.policy.ListRules(pb.ListRulesRequest()).rules
    assert sorted(r.name for r in rules) == ["backend-in", "db-in"]
    for ep in (fe, be, db):
        computed = c.policy.GetEndpointPolicy(pb.GetEndpointPolicyRequest(endpoint=ep.name))
        flags, entries = _pinned_policy(c.node, ep.id)
        assert entries == _computed(computed), ep.name
        assert bool(flags & 1) == computed.ingress_enforced and bool(flags & 2) == computed.egress_enforced
        assert (flags, entries) == before[ep.name]
    assert tcp_ok(fe.netns, be.ipv4, 8080) and not tcp_ok(fe.netns, be.ipv4, 8081)


def test_bad_input_is_refused_and_policy_unchanged(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator")
    node.start("policy", "--policy-entries", "64")
    fe = node.create_endpoint("frontend", {"app": "frontend"})
    be = node.create_endpoint("backend", {"app": "backend"})
    s = pb_grpc.PolicyStub(node.channel("policy"))
    known(s, fe, be)
    s.ImportRules(pb.ImportRulesRequest(rules=three_tier()), timeout=10)
    before = (s.ListRules(pb.ListRulesRequest()), _pinned_policy(node, be.id))

    def rule(**kw: object) -> pb.ImportRulesRequest:
        return pb.ImportRulesRequest(rules=[pb.Rule(name="bad", endpoint_selector=sel(app="backend"), **kw)])  # type: ignore[arg-type]

    many_ports = [tcp(p) for p in range(2000, 2400, 2)]
    cases: list[tuple[str, pb.ImportRulesRequest, grpc.StatusCode, str]] = [
        (
            "malformed selector",
            pb.ImportRulesRequest(
                rules=[
                    pb.Rule(
                        name="bad",
                        endpoint_selector=pb.EndpointSelector(
                            match_expressions=[pb.LabelRequirement(key="app", operator="In")]
                        ),
                    )
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs at least one value",
        ),
        (
            "port above 65535",
            rule(ingress=[pb.PeerRule(ports=[tcp(65536)])]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "port 65536 is above 65535",
        ),
        (
            "endPort below port",
            rule(ingress=[pb.PeerRule(ports=[tcp(8080, 8000)])]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "end_port 8000 is below port 8080",
        ),
        (
            "unknown protocol",
            rule(ingress=[pb.PeerRule(ports=[pb.PortRule(port=1, protocol="QUIC")])]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "protocol 'QUIC'",
        ),
        (
            "bad CIDR",
            rule(ingress=[pb.PeerRule(cidrs=[pb.CidrRule(cidr="10.0.0.1/8")])]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "host bits set",
        ),
        ("overflow", rule(ingress=[pb.PeerRule(ports=many_ports)]), grpc.StatusCode.RESOURCE_EXHAUSTED, "holds 64"),
        (
            "bad document",
            pb.ImportRulesRequest(document="{not yaml: ["),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not valid YAML",
        ),
    ]
    for what, request, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            s.ImportRules(request, timeout=10)
        assert err.value.code() == code, f"{what}: {err.value.code()} {err.value.details()}"
        assert text in (err.value.details() or ""), f"{what}: {err.value.details()}"
        assert (s.ListRules(pb.ListRulesRequest()), _pinned_policy(node, be.id)) == before, what
    with pytest.raises(grpc.RpcError) as err:
        s.GetEndpointPolicy(pb.GetEndpointPolicyRequest(endpoint="ghost"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with traffic.server(be.netns, be.ipv4, 8080):
        assert traffic.tcp_connects(fe.netns, be.ipv4, 8080)


def test_grpcurl_imports_json_and_reads_the_policy_map(cluster: Cluster) -> None:
    c = cluster
    sock = str(c.node.socket("policy"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}

    def grpcurl(body: str, method: str) -> str:
        argv = ["grpcurl", "-plaintext", "-unix", "-d", body, sock, f"weir.policy.v1.Policy/{method}"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    body = (
        '{"rules": [{"name": "db-in", "endpoint_selector": {"match_labels": {"app": "db"}}, '
        '"ingress": [{"endpoints": [{"match_labels": {"app": "backend"}}], '
        '"ports": [{"port": 5432, "protocol": "TCP"}]}]}]}'
    )
    imported = grpcurl(body, "ImportRules")
    assert '"db"' in imported
    time.sleep(0.1)
    assert tcp_ok(c.backend.netns, c.db.ipv4, 5432)
    shown = grpcurl('{"endpoint": "db"}', "GetEndpointPolicy")
    assert '"ingress_enforced": true' in shown and '"port": 5432' in shown and '"rules": [' in shown
    assert '"packets": "1"' in shown


def test_drops_stream_as_events_and_conntrack_is_listed_and_collected(make_node: Callable[..., Node]) -> None:
    node = make_node()
    node.start("orchestrator", "--ct-gc-seconds", "0.5")
    node.start("policy")
    fe = node.create_endpoint("frontend", {"app": "frontend"})
    be = node.create_endpoint("backend", {"app": "backend"})
    s = pb_grpc.PolicyStub(node.channel("policy"))
    known(s, fe, be)
    s.ImportRules(pb.ImportRulesRequest(rules=three_tier()), timeout=10)
    _server_ns.update({be.ipv4: be.netns, fe.ipv4: fe.netns})
    events = node.orchestrator().WatchEvents(orch_pb.WatchEventsRequest(types=["DROP"]), timeout=20)
    time.sleep(0.3)
    assert not tcp_ok(fe.netns, be.ipv4, 9999)
    drop = next(e for e in events if e.protocol == "TCP")
    events.cancel()
    assert (drop.reason, drop.protocol, drop.src, drop.dst, drop.dst_port) == (
        "POLICY_DENIED",
        "TCP",
        fe.ipv4,
        be.ipv4,
        9999,
    )
    assert drop.hook == common_pb2.HOOK_TO_CONTAINER

    assert tcp_ok(fe.netns, be.ipv4, 8080)
    listed = s.ListConntrack(pb.ListConntrackRequest()).entries
    allowed = [e for e in listed if e.destination_port == 8080 and e.protocol == "TCP"]
    assert {e.direction for e in allowed} == {common_pb2.DIRECTION_EGRESS, common_pb2.DIRECTION_INGRESS}
    assert all("REPLY_SEEN" in e.flags and e.packets >= 3 for e in allowed)

    # An entry whose time is up is collected by the orchestrator, which owns conntrack.
    with Map.from_pin(node.bpffs_root / "globals/conntrack", key_type=CtKey, value_type=CtValue) as ct:
        stale = CtKey(proto=17, family=2, dir=0)
        stale.saddr[:4] = [203, 0, 113, 50]
        stale.daddr[:4] = [198, 18, 0, 99]
        ct.update(stale, CtValue(expires=1, packets=1))
        deadline = time.monotonic() + 5
        while stale in ct and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stale not in ct


def test_a_new_endpoint_gets_its_policy_at_once(make_node: Callable[..., Node]) -> None:
    """The policy service follows the orchestrator's endpoint changes as they happen (no polling)."""
    node = make_node("orchestrator")
    node.start("policy")
    s = pb_grpc.PolicyStub(node.channel("policy"))
    s.ImportRules(pb.ImportRulesRequest(rules=three_tier()), timeout=10)
    be = node.create_endpoint("backend", {"app": "backend"})
    started = time.monotonic()
    while not _pinned_policy(node, be.id)[0] & 1 and time.monotonic() - started < 3:
        time.sleep(0.02)
    assert _pinned_policy(node, be.id)[0] & 1, "backend's ingress policy was not installed"
    assert time.monotonic() - started < 1.0
    fe = node.create_endpoint("frontend", {"app": "frontend"})
    _server_ns.update({be.ipv4: be.netns})
    deadline = time.monotonic() + 2
    while not tcp_ok(fe.netns, be.ipv4, 8080) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tcp_ok(fe.netns, be.ipv4, 8080) and not tcp_ok(fe.netns, be.ipv4, 8081)


def test_policy_started_before_the_orchestrator_waits_for_it(make_node: Callable[..., Node]) -> None:
    node = make_node()
    waiting = threading.Thread(target=node.start, args=("policy",))
    waiting.start()
    deadline = time.monotonic() + 20
    while "waiting for the orchestrator" not in node.log_tail("policy") and time.monotonic() < deadline:
        time.sleep(0.1)
    # It got as far as asking for the endpoint list (not merely slow to start), and does not serve.
    assert "waiting for the orchestrator" in node.log_tail("policy")
    time.sleep(0.5)
    assert not node.serving("policy")
    node.start("orchestrator")
    waiting.join(timeout=40)
    assert node.serving("policy")
    be = node.create_endpoint("backend", {"app": "backend"})
    s = pb_grpc.PolicyStub(node.channel("policy"))
    known(s, be)
    s.ImportRules(pb.ImportRulesRequest(rules=three_tier()), timeout=10)
    assert s.GetEndpointPolicy(pb.GetEndpointPolicyRequest(endpoint=be.name)).ingress_enforced


def _hits(stub: pb_grpc.PolicyStub, endpoint: str, rule: str) -> int:
    """Packets counted on the entries that credit `rule`, as GetEndpointPolicy reads them from the map."""
    policy = stub.GetEndpointPolicy(pb.GetEndpointPolicyRequest(endpoint=endpoint), timeout=10)
    return sum(e.hits.packets for e in policy.entries if rule in e.rules)


def test_trace_and_hits_credit_the_covering_rule_and_hits_survive_changes_and_restarts(cluster: Cluster) -> None:
    c = cluster
    fe, be = c.frontend, c.backend
    rules = [pb.Rule(name=f"p{port}", endpoint_selector=sel(app="backend"),
                     ingress=[pb.PeerRule(endpoints=[sel(app="frontend")], ports=[tcp(port)])])
             for port in (8080, 8081)]  # fmt: skip
    c.policy.ImportRules(pb.ImportRulesRequest(rules=rules), timeout=10)
    trace = c.policy.Trace(pb.TraceRequest(source=fe.ipv4, destination=be.ipv4, port=8080, protocol="TCP"))
    assert trace.allowed and list(trace.deciding_rules) == ["p8080"], trace
    for _ in range(3):
        assert tcp_ok(fe.netns, be.ipv4, 8080)
    counted = _hits(c.policy, "backend", "p8080")
    assert counted >= 3 and _hits(c.policy, "backend", "p8081") == 0
    # An unrelated rule that rebuilds the backend's map, then a restart of the service.
    c.policy.ImportRules(pb.ImportRulesRequest(rules=[pb.Rule(name="other", endpoint_selector=sel(app="backend"),
        ingress=[pb.PeerRule(endpoints=[sel(app="db")], ports=[udp(9999)])])]), timeout=10)  # fmt: skip
    assert _hits(c.policy, "backend", "p8080") == counted, "an unrelated import zeroed the hit counters"
    c.node.kill("policy")
    c.node.start("policy")
    known(c.policy, be)
    assert _hits(c.policy, "backend", "p8080") == counted, "a restart zeroed the hit counters"
    assert tcp_ok(fe.netns, be.ipv4, 8080)
    assert _hits(c.policy, "backend", "p8080") > counted


def test_conntrack_lists_lb_and_policy_entries_with_their_scope(make_node: Callable[..., Node]) -> None:
    from weir.lb.v1 import lb_pb2, lb_pb2_grpc

    node = make_node("orchestrator", "policy")
    node.start("lb")
    client = node.create_endpoint("client", {"app": "client"}, ipv6=False)
    backend = node.create_endpoint("backend", {"app": "backend"}, ipv6=False)
    s = pb_grpc.PolicyStub(node.channel("policy"))
    known(s, client, backend)
    s.ImportRules(pb.ImportRulesRequest(rules=[pb.Rule(name="be-in", endpoint_selector=sel(app="backend"),
        ingress=[pb.PeerRule(endpoints=[sel(app="client")], ports=[tcp(8080)])])]), timeout=10)  # fmt: skip
    vip = "198.19.0.1"
    lb_pb2_grpc.LoadBalancerStub(node.channel("lb")).UpsertService(lb_pb2.UpsertServiceRequest(service=lb_pb2.Service(
        name="web", address=vip, port=80, protocol="TCP",
        backends=[lb_pb2.Backend(address=backend.ipv4, port=8080, weight=1)])), timeout=10)  # fmt: skip
    with traffic.server(backend.netns, backend.ipv4, 8080, reply=b"b:"):
        assert traffic.tcp_exchange(client.netns, vip, 80, b"x") == b"b:x"
    listed = s.ListConntrack(pb.ListConntrackRequest(), timeout=10).entries
    scopes = {e.scope for e in listed}
    assert {"SERVICE", "INGRESS"} <= scopes, listed
    service = [e for e in listed if e.scope == "SERVICE"]
    assert all(e.direction == common_pb2.DIRECTION_UNSPECIFIED and e.destination == vip for e in service), service
    assert any(e.scope == "INGRESS" and e.destination == backend.ipv4 and e.destination_port == 8080 for e in listed)


def test_a_huge_rule_name_is_refused_and_no_log_line_echoes_it(cluster: Cluster) -> None:
    c = cluster
    huge = "a" * 100_000
    requests = [
        pb.ImportRulesRequest(rules=[pb.Rule(name=huge, endpoint_selector=sel(app="db"))]),
        pb.ImportRulesRequest(document=f"metadata: {{name: {huge}}}\nspec: {{}}\n"),
        pb.ImportRulesRequest(rules=[pb.Rule(name="x", endpoint_selector=sel(app=huge))]),
    ]
    for request in requests:
        with pytest.raises(grpc.RpcError) as err:
            c.policy.ImportRules(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(err.value.details() or "") < 1000
    for call in (lambda: c.policy.DeleteRules(pb.DeleteRulesRequest(names=[huge]), timeout=10),
                 lambda: c.policy.GetRule(pb.GetRuleRequest(name=huge), timeout=10)):  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and len(err.value.details() or "") < 1000
    names = [f"r{i:05d}" for i in range(3000)]
    c.policy.ImportRules(pb.ImportRulesRequest(rules=[pb.Rule(name=n, endpoint_selector=sel(app="db")) for n in names]),
                         timeout=30)  # fmt: skip
    c.policy.DeleteRules(pb.DeleteRulesRequest(names=names), timeout=30)
    lines = (c.node.workdir / "policy.log").read_text().splitlines()
    assert lines and max(len(line) for line in lines) <= 2048, max(lines, key=len)[:300]
