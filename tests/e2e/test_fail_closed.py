"""Fail closed, lose nothing: a lost, corrupt or foreign state database never wipes the datapath.

Real service processes and real traffic. For each service the state database is removed
(or damaged) while its pins exist and the service restarted: the datapath must stay as it
was, the service NOT_SERVING and refusing calls with FAILED_PRECONDITION naming the file,
until it is restarted with --adopt-datapath (rebuilding what it can from the maps) or
--reset. A removed map pin is found again through the programs that use the map.
"""

from __future__ import annotations

import ctypes
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from weir.lb.v1 import lb_pb2 as lb_pb
from weir.lb.v1 import lb_pb2_grpc as lb_grpc
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.policy.v1 import policy_pb2 as pol_pb
from weir.policy.v1 import policy_pb2_grpc as pol_grpc
from weir.prefilter.v1 import prefilter_pb2 as pf_pb
from weir.prefilter.v1 import prefilter_pb2_grpc as pf_grpc

from pybpf import Map
from services.policy.defs import EndpointPolicyConfig
from services.prefilter.maps import dump_pinned
from tests.harness import netns, traffic
from tests.harness.node import NET_IFNAME, OUTSIDE_V4, REPO, Node, Service

pytestmark = pytest.mark.root

DENIED = "203.0.113.7"
VIP = "198.19.0.1"


# ---- helpers ----


def health(node: Node, service: str) -> int | None:
    """The service's overall health status, or None while it does not answer."""
    try:
        with node.channel(service) as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            return int(check(health_pb2.HealthCheckRequest(), timeout=1).status)
    except grpc.RpcError:
        return None


def start_held(node: Node, service: str, *extra: str, timeout: float = 30.0) -> Service:
    """Start a service that must come up answering, but NOT_SERVING (held)."""
    log = node.workdir / f"{service}.log"
    log.write_bytes(b"")  # this start's lines only
    with open(log, "ab") as out:
        process = subprocess.Popen(node.argv(service, extra), stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    svc = Service(service, process, log)
    node.services[service] = svc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{service} exited with {process.returncode}:\n{node.log_tail(service)}")
        status = health(node, service) if node.socket(service).exists() else None
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            return svc
        assert status != health_pb2.HealthCheckResponse.SERVING, f"{service} serves:\n{node.log_tail(service)}"
        time.sleep(0.1)
    raise TimeoutError(f"{service} did not answer NOT_SERVING in {timeout}s:\n{node.log_tail(service)}")


def restart(node: Node, service: str, *extra: str) -> None:
    node.kill(service)
    (node.workdir / f"{service}.log").write_bytes(b"")
    node.start(service, *extra)


def remove_db(node: Node, service: str) -> Path:
    path = node.state_dir / f"{service}.db"
    assert path.exists()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


def assert_refused(call: Callable[[], object], path: Path) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
    assert str(path) in (err.value.details() or "")


def assert_one_error_line(node: Node, service: str, path: Path) -> None:
    """The log names the file in one error line and shows no traceback."""
    text = (node.workdir / f"{service}.log").read_text(errors="replace")
    assert "Traceback" not in text, text
    naming = [line for line in text.splitlines() if str(path) in line and '"level": "error"' in line]
    assert len(naming) == 1, text


# ---- prefilter ----


def test_prefilter_without_its_db_keeps_dropping_then_adopts_the_live_list(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator", "prefilter")
    ep = node.create_endpoint("web")
    stub = pf_grpc.PrefilterStub(node.channel("prefilter"))
    stub.Attach(pf_pb.AttachRequest(interface=NET_IFNAME), timeout=10)
    stub.AddEntries(pf_pb.AddEntriesRequest(entries=[
        pf_pb.Entry(cidr=f"{DENIED}/32", mode=pf_pb.MODE_DENY),
        pf_pb.Entry(cidr="198.51.0.0/16", mode=pf_pb.MODE_AUDIT),
    ]), timeout=10)  # fmt: skip
    pins = node.bpffs_root / "prefilter"
    live = dump_pinned(pins)
    assert traffic.ping(node.outside, ep.ipv4, count=2, source=DENIED, wait=0.5) == 0
    assert traffic.ping(node.outside, ep.ipv4, count=2, source=OUTSIDE_V4, wait=0.5) == 2

    node.kill("prefilter")
    path = remove_db(node, "prefilter")
    start_held(node, "prefilter")
    assert dump_pinned(pins) == live
    assert traffic.ping(node.outside, ep.ipv4, count=2, source=DENIED, wait=0.5) == 0
    stub = pf_grpc.PrefilterStub(node.channel("prefilter"))
    assert_refused(lambda: stub.AddEntries(pf_pb.AddEntriesRequest(
        entries=[pf_pb.Entry(cidr="192.0.2.99/32")]), timeout=5), path)  # fmt: skip
    assert_refused(lambda: stub.ReplaceEntries(pf_pb.ReplaceEntriesRequest(), timeout=5), path)
    assert_one_error_line(node, "prefilter", path)
    assert "--adopt-datapath" in node.log_tail("prefilter")

    restart(node, "prefilter", "--adopt-datapath")
    listed = stub.ListEntries(pf_pb.ListEntriesRequest(), timeout=5).entries
    assert {(e.cidr, e.mode) for e in listed} == {(f"{DENIED}/32", pf_pb.MODE_DENY),
                                                  ("198.51.0.0/16", pf_pb.MODE_AUDIT)}  # fmt: skip
    assert dump_pinned(pins) == live  # same ids: the counters carry on
    assert traffic.ping(node.outside, ep.ipv4, count=2, source=DENIED, wait=0.5) == 0
    stub.AddEntries(pf_pb.AddEntriesRequest(entries=[pf_pb.Entry(cidr="192.0.2.99/32")]), timeout=5)


def test_removed_prefilter_pins_are_found_again(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator", "prefilter")
    ep = node.create_endpoint("web")
    stub = pf_grpc.PrefilterStub(node.channel("prefilter"))
    stub.Attach(pf_pb.AttachRequest(interface=NET_IFNAME), timeout=10)
    stub.AddEntries(pf_pb.AddEntriesRequest(entries=[pf_pb.Entry(cidr=f"{DENIED}/32")]), timeout=10)
    pins = node.bpffs_root / "prefilter"
    ids = {}
    for name in ("pf_v4_host", "pf_active", "pf_entry_stats"):
        with Map.from_pin(pins / name) as m:
            ids[name] = m.id
    node.kill("prefilter")
    for name in ids:
        (pins / name).unlink()
    node.start("prefilter")
    for name, map_id in ids.items():
        with Map.from_pin(pins / name) as m:
            assert m.id == map_id, name
    assert traffic.ping(node.outside, ep.ipv4, count=2, source=DENIED, wait=0.5) == 0
    stub.DeleteEntries(pf_pb.DeleteEntriesRequest(cidrs=[f"{DENIED}/32"]), timeout=10)
    assert traffic.ping(node.outside, ep.ipv4, count=2, source=DENIED, wait=0.5) == 2


@pytest.mark.parametrize("damage", ["garbage", "other-version", "bad-document"])
def test_a_damaged_db_holds_the_service_with_one_line_naming_it(make_node: Callable[..., Node], damage: str) -> None:
    node = make_node("orchestrator", "prefilter")
    stub = pf_grpc.PrefilterStub(node.channel("prefilter"))
    stub.AddEntries(pf_pb.AddEntriesRequest(entries=[pf_pb.Entry(cidr=f"{DENIED}/32")]), timeout=10)
    live = dump_pinned(node.bpffs_root / "prefilter")
    node.kill("prefilter", 15)
    path = node.state_dir / "prefilter.db"
    if damage == "garbage":
        remove_db(node, "prefilter")
        path.write_bytes(b"\x13\x37 this is not a database " * 200)
    else:
        db = sqlite3.connect(path)
        if damage == "other-version":
            db.execute("PRAGMA user_version=99")
        else:
            db.execute("UPDATE docs SET doc = '[1, 2' WHERE kind = 'entry'")
            db.commit()
        db.close()
    start_held(node, "prefilter")
    assert dump_pinned(node.bpffs_root / "prefilter") == live
    assert_refused(lambda: stub.AddEntries(pf_pb.AddEntriesRequest(
        entries=[pf_pb.Entry(cidr="192.0.2.99/32")]), timeout=5), path)  # fmt: skip
    assert_one_error_line(node, "prefilter", path)
    restart(node, "prefilter", "--reset")
    assert list(stub.ListEntries(pf_pb.ListEntriesRequest(), timeout=5).entries) == []
    assert dump_pinned(node.bpffs_root / "prefilter") == {}
    assert list((node.state_dir).glob("prefilter.db.bad-*")) or damage == "bad-document"


# ---- policy ----


def _policy_setup(make_node: Callable[..., Node]) -> tuple[Node, orch_pb.Endpoint, orch_pb.Endpoint]:
    node = make_node("orchestrator", "policy")
    client = node.create_endpoint("client", {"app": "client"})
    server = node.create_endpoint("server", {"app": "server"})
    stub = pol_grpc.PolicyStub(node.channel("policy"))
    stub.ImportRules(pol_pb.ImportRulesRequest(rules=[pol_pb.Rule(
        name="server-in", endpoint_selector=pol_pb.EndpointSelector(match_labels={"app": "server"}),
        ingress=[pol_pb.PeerRule(endpoints=[pol_pb.EndpointSelector(match_labels={"app": "client"})],
                                 ports=[pol_pb.PortRule(port=8080, protocol="TCP")])],
    )]), timeout=10)  # fmt: skip
    return node, client, server


def tcp_ok(src: orch_pb.Endpoint, dst: orch_pb.Endpoint, port: int) -> bool:
    with traffic.server(dst.netns, dst.ipv4, port):
        return traffic.tcp_connects(src.netns, dst.ipv4, port, timeout=0.8)


def test_policy_without_its_db_keeps_denying_until_reset(make_node: Callable[..., Node]) -> None:
    node, client, server = _policy_setup(make_node)
    assert tcp_ok(client, server, 8080) and not tcp_ok(client, server, 8081)

    node.kill("policy")
    path = remove_db(node, "policy")
    start_held(node, "policy")
    assert tcp_ok(client, server, 8080) and not tcp_ok(client, server, 8081)
    stub = pol_grpc.PolicyStub(node.channel("policy"))
    assert_refused(lambda: stub.ImportRules(pol_pb.ImportRulesRequest(), timeout=5), path)
    assert_refused(lambda: stub.DeleteRules(pol_pb.DeleteRulesRequest(names=["server-in"]), timeout=5), path)
    assert_one_error_line(node, "policy", path)

    # Rules are not in the maps: adopting is refused and the policy stays in force.
    node.kill("policy")
    start_held(node, "policy", "--adopt-datapath")
    assert "cannot adopt" in node.log_tail("policy")
    assert not tcp_ok(client, server, 8081)
    assert not path.exists()  # no empty store left for the next plain start to take as the state

    restart(node, "policy", "--reset")
    assert list(stub.ListRules(pol_pb.ListRulesRequest(), timeout=5).rules) == []
    assert tcp_ok(client, server, 8081)  # --reset is the operator's choice: no rules, no enforcement


def test_a_removed_policy_map_pin_is_found_again(make_node: Callable[..., Node]) -> None:
    node, client, server = _policy_setup(make_node)
    pin = node.bpffs_root / "policy" / "policy_maps"
    with Map.from_pin(pin) as m:
        map_id = m.id
    with Map.from_pin(node.bpffs_root / "policy" / "policy_config",
                      key_type=ctypes.c_uint32, value_type=EndpointPolicyConfig) as cfg:  # fmt: skip
        assert int(cfg[server.id].flags) & 1

    node.kill("policy")
    pin.unlink()
    node.start("policy")
    with Map.from_pin(pin) as m:
        assert m.id == map_id
    assert tcp_ok(client, server, 8080) and not tcp_ok(client, server, 8081)

    pin.unlink()  # while it runs: put back within a few seconds
    deadline = time.monotonic() + 10
    while not pin.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    with Map.from_pin(pin) as m:
        assert m.id == map_id
    stub = pol_grpc.PolicyStub(node.channel("policy"))
    stub.DeleteRules(pol_pb.DeleteRulesRequest(names=["server-in"]), timeout=10)
    assert tcp_ok(client, server, 8081)  # the service still writes the map the programs read


# ---- load balancer ----


def test_lb_without_its_db_keeps_its_vip_then_adopts_it(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator")
    node.start("lb")
    client = node.create_endpoint("client", {"app": "client"}, ipv6=False)
    backends = [node.create_endpoint(f"b{i}", {"app": "backend"}, ipv6=False) for i in range(2)]
    stub = lb_grpc.LoadBalancerStub(node.channel("lb"))
    stub.UpsertService(lb_pb.UpsertServiceRequest(service=lb_pb.Service(
        name="web", address=VIP, port=80, protocol="TCP",
        backends=[lb_pb.Backend(address=b.ipv4, port=8080, weight=1) for b in backends],
    )), timeout=10)  # fmt: skip

    def answered() -> set[str]:
        seen = set()
        with traffic.server(backends[0].netns, backends[0].ipv4, 8080, reply=b"b0:"), \
             traffic.server(backends[1].netns, backends[1].ipv4, 8080, reply=b"b1:"):  # fmt: skip
            for port in range(40000, 40016):
                seen.add(_vip_answer(client.netns, port))
        return seen

    assert answered() == {"b0", "b1"}
    node.kill("lb")
    path = remove_db(node, "lb")
    start_held(node, "lb")
    assert answered() == {"b0", "b1"}
    assert_refused(lambda: stub.DeleteService(lb_pb.DeleteServiceRequest(name="web"), timeout=5), path)
    assert_one_error_line(node, "lb", path)

    restart(node, "lb", "--adopt-datapath")
    services = stub.ListServices(lb_pb.ListServicesRequest(), timeout=5).services
    assert len(services) == 1
    adopted = services[0]
    assert (adopted.address, adopted.port, adopted.protocol) == (VIP, 80, "TCP")
    assert sorted(b.address for b in adopted.backends) == sorted(b.ipv4 for b in backends)
    assert answered() == {"b0", "b1"}
    stub.DeleteService(lb_pb.DeleteServiceRequest(name=adopted.name), timeout=5)
    with pytest.raises(OSError):
        _vip_answer(client.netns, 40100, timeout=0.5)


def _vip_answer(ns: str, source_port: int, timeout: float = 2.0) -> str:
    """Which backend answers a TCP exchange with the VIP from this source port."""
    with netns.entered(ns):
        sock = socket.socket()
    with sock:
        sock.settimeout(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", source_port))
        sock.connect((VIP, 80))
        sock.sendall(b"x")
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(100).split(b":")[0].decode()


# ---- orchestrator ----


def test_orchestrator_without_its_db_keeps_endpoints(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator")
    ep = node.create_endpoint("web")
    assert netns.names(f"{node.name}.") == [ep.netns]

    node.kill("orchestrator")
    path = remove_db(node, "orchestrator")
    start_held(node, "orchestrator")
    assert netns.names(f"{node.name}.") == [ep.netns]
    assert traffic.ping(node.ns, ep.ipv4, count=2, wait=0.5) == 2
    orch = node.orchestrator()
    assert_refused(lambda: orch.CreateEndpoint(orch_pb.CreateEndpointRequest(name="x", ipv4="198.18.0.99"),
                                               timeout=5), path)  # fmt: skip
    assert_refused(lambda: orch.DeleteEndpoint(orch_pb.DeleteEndpointRequest(name="web"), timeout=5), path)
    assert_one_error_line(node, "orchestrator", path)
    # A service started meanwhile cannot register its programs: one line, exit 1, no traceback.
    started = subprocess.run(node.argv("prefilter"), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert started.returncode == 1, started.stdout + started.stderr
    assert "Traceback" not in started.stdout + started.stderr
    assert str(path) in started.stdout + started.stderr

    restart(node, "orchestrator", "--reset")
    assert netns.names(f"{node.name}.") == []  # the operator chose to start empty
