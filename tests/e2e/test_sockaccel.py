"""Socket-layer acceleration as real processes: endpoints' TCP in the node's cgroup, real traffic.

Each workload is a process in an endpoint's namespace and in the node's cgroup (where
sock_ops is attached), as an endpoint's processes are. The echo checks every byte: each
message is pseudo-random, and the client compares the SHA-256 of what it sent, what the
server received and what came back, so a lost, reordered or duplicated byte fails.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from weir.common.v1 import common_pb2
from weir.lb.v1 import lb_pb2 as lb_pb
from weir.lb.v1 import lb_pb2_grpc as lb_grpc
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc
from weir.policy.v1 import policy_pb2 as pol_pb
from weir.policy.v1 import policy_pb2_grpc as pol_grpc
from weir.sockaccel.v1 import sockaccel_pb2 as pb
from weir.sockaccel.v1 import sockaccel_pb2_grpc as pb_grpc

from pybpf import AttachType, Map, Program, detach_cgroup
from services.common.datapath import Counter, Hook
from tests.harness import netns
from tests.harness.node import Node

pytestmark = pytest.mark.root

PORT = 8080
SIZES = [1, 2, 17, 1000, 1024, 4096, 65536, 1 << 20, 3, 250_000, 1, 77_777]
WORKER = r"""
import hashlib, json, os, random, socket, sys, threading, time

def payload(conn, k, size):
    return random.Random(f"{conn}-{k}-{size}").randbytes(size)

def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET

def server(addr, port, out):
    ls = socket.socket(family(addr), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(512)
    lock = threading.Lock()

    def serve(c, peer_port):
        h, n = hashlib.sha256(), 0
        c.settimeout(60)
        with c:
            while data := c.recv(1 << 20):
                h.update(data)
                n += len(data)
                c.sendall(data)
            c.shutdown(socket.SHUT_WR)
        with lock, open(out, "a") as f:
            f.write(json.dumps({"port": peer_port, "sha": h.hexdigest(), "bytes": n}) + "\n")

    print("ready", flush=True)
    deadline = time.monotonic() + 300
    ls.settimeout(1)
    while time.monotonic() < deadline:
        try:
            c, peer = ls.accept()
        except TimeoutError:
            continue
        threading.Thread(target=serve, args=(c, peer[1]), daemon=True).start()

def client(addr, port, conns, sizes, barrier, pause):
    half = len(sizes) // 2
    gate = threading.Barrier(conns, timeout=60)
    results = [None] * conns

    def one(i):
        s = socket.create_connection((addr, port), timeout=60)
        me, peer = s.getsockname()[1], list(s.getpeername()[:2])
        sent, got = hashlib.sha256(), hashlib.sha256()
        counts = {"sent": 0, "recv": 0}

        def receive():
            while data := s.recv(1 << 20):
                got.update(data)
                counts["recv"] += len(data)

        rx = threading.Thread(target=receive)
        rx.start()
        for k, size in enumerate(sizes):
            if barrier and k == half:
                if gate.wait() == 0:
                    open(barrier + ".half", "w").close()
                    end = time.monotonic() + 60
                    while not os.path.exists(barrier) and time.monotonic() < end:
                        time.sleep(0.01)
                gate.wait()
            data = payload(i, k, size)
            s.sendall(data)
            sent.update(data)
            counts["sent"] += size
            if pause:
                time.sleep(pause)
        s.shutdown(socket.SHUT_WR)
        rx.join(120)
        results[i] = {"port": me, "peer": peer, "sent": counts["sent"],
                      "recv": counts["recv"], "sent_sha": sent.hexdigest(), "recv_sha": got.hexdigest()}
        s.close()

    def guarded(i):
        try:
            one(i)
        except Exception as exc:
            results[i] = {"error": repr(exc)}

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    print(json.dumps(results), flush=True)

if sys.argv[1] == "server":
    server(sys.argv[2], int(sys.argv[3]), sys.argv[4])
else:
    client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]), sys.argv[6],
           float(sys.argv[7]))
"""


def worker_argv(node: Node, ns: str, *args: str, script: str = WORKER) -> list[str]:
    """A worker in an endpoint's namespace and in the node's cgroup, as the endpoint's processes are."""
    cgroup = node.cgroup_root / "workloads"
    cgroup.mkdir(exist_ok=True)
    return [
        "sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$@"',
        *netns.nsenter_argv(ns), sys.executable, "-c", script, *args,
    ]  # fmt: skip


@dataclass
class Setup:
    node: Node
    client: orch_pb.Endpoint
    server: orch_pb.Endpoint
    tmp: Path

    @property
    def accel(self) -> pb_grpc.SockAccelStub:
        return pb_grpc.SockAccelStub(self.node.channel("sockaccel"))

    @property
    def policy(self) -> pol_grpc.PolicyStub:
        return pol_grpc.PolicyStub(self.node.channel("policy"))

    def status(self) -> pb.Status:
        return self.accel.GetStatus(pb.GetStatusRequest(), timeout=10)

    def mode(self, on: bool) -> None:
        self.accel.SetMode(pb.SetModeRequest(mode=pb.MODE_ON if on else pb.MODE_OFF), timeout=10)

    def entry_bytes(self) -> int:
        """Bytes the chain's from-container entry saw (both endpoints' sends)."""
        with Map.from_pin(self.node.bpffs_root / "globals" / "entry_stats") as m:
            total = m.typed(ctypes.c_uint32, Counter).lookup_sum(int(Hook.FROM_CONTAINER))
        return int(total.bytes) if total else 0


def make_setup(
    make_node: Callable[..., Node], tmp_path: Path, *extra: str, sockaccel_args: tuple[str, ...] = ()
) -> Setup:
    node = make_node("orchestrator", "policy", *extra)
    node.start("sockaccel", *sockaccel_args)
    client = node.create_endpoint("client", {"app": "client"})
    server = node.create_endpoint("server", {"app": "server"})
    s = Setup(node, client, server, tmp_path)
    wait_for(lambda: s.status().policy_bound, "sockaccel bound to the policy maps")
    wait_for(lambda: addresses_known(s), "sockaccel knows the endpoints")
    return s


def addresses_known(s: Setup) -> bool:
    try:
        s.accel.SetEndpointMode(pb.SetEndpointModeRequest(endpoint="server", mode=pb.MODE_INHERIT), timeout=5)
        return True
    except grpc.RpcError:
        return False


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}")


@contextmanager
def echo_server(s: Setup, address: str = "", port: int = PORT) -> Iterator[Path]:
    """The echo server in the server endpoint; yields the file it records each connection in."""
    out = s.tmp / f"server-{port}-{time.monotonic_ns()}.jsonl"
    argv = worker_argv(s.node, s.server.netns, "server", address or s.server.ipv4, str(port), str(out))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        yield out
    finally:
        proc.kill()
        proc.wait(timeout=10)


@dataclass
class EchoResult:
    clients: list[dict[str, object]]
    servers: list[dict[str, object]]

    @property
    def total(self) -> int:
        return sum(int(c["sent"]) for c in self.clients)  # type: ignore[call-overload]


def run_echo(
    s: Setup,
    out: Path,
    address: str = "",
    port: int = PORT,
    conns: int = 6,
    sizes: list[int] = SIZES,
    mid_stream: Callable[[], None] | None = None,
    pause: float = 0.0,
) -> EchoResult:
    """Run the echo client; ``mid_stream`` runs when every connection has sent half its messages."""
    barrier = s.tmp / f"barrier-{time.monotonic_ns()}" if mid_stream else None
    argv = worker_argv(
        s.node, s.client.netns, "client", address or s.server.ipv4, str(port), str(conns), json.dumps(sizes),
        str(barrier or ""), str(pause),
    )  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if mid_stream is not None and barrier is not None:
        half = Path(str(barrier) + ".half")
        try:
            wait_for(half.exists, "every connection sent half its messages", timeout=60)
        except AssertionError:
            proc.kill()
            raise AssertionError(proc.communicate()[1]) from None
        mid_stream()
        barrier.touch()
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    clients = json.loads(stdout)
    wait_for(
        lambda: out.exists() and len(out.read_text().splitlines()) >= conns, "the server recorded every connection"
    )
    servers = [json.loads(line) for line in out.read_text().splitlines()]
    return EchoResult(clients, servers)


def assert_every_byte(result: EchoResult, sizes: list[int] = SIZES) -> None:
    """Each connection: all sent, all echoed, the same bytes in the same order on both sides."""
    by_port = {int(r["port"]): r for r in result.servers}  # type: ignore[call-overload]
    assert len(result.clients) == len(by_port)
    for c in result.clients:
        assert c is not None, "a client connection did not finish"
        assert "error" not in c, c
        assert c["sent"] == c["recv"] == sum(sizes), c
        assert c["sent_sha"] == c["recv_sha"], c
        server = by_port[int(c["port"])]  # type: ignore[call-overload]
        assert server["bytes"] == c["sent"] and server["sha"] == c["sent_sha"], (server, c)


def allow_client_to_server(s: Setup, ports: list[int] | None = None) -> None:
    """Policy on both ends: the client may reach the server (on ``ports``); nothing else."""
    port_rules = [pol_pb.PortRule(port=p, protocol="TCP") for p in (ports or [])]
    rules = [
        pol_pb.Rule(
            name="server-in",
            endpoint_selector=pol_pb.EndpointSelector(match_labels={"app": "server"}),
            ingress=[pol_pb.PeerRule(endpoints=[pol_pb.EndpointSelector(match_labels={"app": "client"})],
                                     ports=port_rules)],
        ),
        pol_pb.Rule(
            name="client-out",
            endpoint_selector=pol_pb.EndpointSelector(match_labels={"app": "client"}),
            egress=[pol_pb.PeerRule(endpoints=[pol_pb.EndpointSelector(match_labels={"app": "server"})],
                                    ports=port_rules)],
        ),
    ]  # fmt: skip
    s.policy.ImportRules(pol_pb.ImportRulesRequest(rules=rules), timeout=15)


# ---- the echo, on and off ----


def test_echo_is_accelerated_and_skips_the_chain(make_node: Callable[..., Node], tmp_path: Path) -> None:
    s = make_setup(make_node, tmp_path)
    allow_client_to_server(s)
    s.mode(True)
    before, chain_before = s.status().counters, s.entry_bytes()
    with echo_server(s) as out:
        result = run_echo(s, out)
    assert_every_byte(result)
    after, chain = s.status().counters, s.entry_bytes() - chain_before
    redirected = after.bytes_redirected - before.bytes_redirected
    assert after.accelerated_total - before.accelerated_total == 2 * len(result.clients)  # both ends
    assert after.messages_redirected > before.messages_redirected
    # Both directions' payload (2x what the clients sent) went socket to socket...
    assert redirected == 2 * result.total, (redirected, result.total, after)
    # ...and the chain saw only handshakes, FINs and ACKs: far less than the payload.
    assert chain < result.total // 50, (chain, result.total)
    assert sum(after.fallbacks.values()) == sum(before.fallbacks.values())
    wait_for(lambda: s.status().counters.accelerated_current == 0, "closed sockets left the table")


def test_echo_takes_the_chain_when_off(make_node: Callable[..., Node], tmp_path: Path) -> None:
    s = make_setup(make_node, tmp_path)
    allow_client_to_server(s)
    s.mode(False)
    before, chain_before = s.status().counters, s.entry_bytes()
    with echo_server(s) as out:
        result = run_echo(s, out)
    assert_every_byte(result)
    after, chain = s.status().counters, s.entry_bytes() - chain_before
    assert after.messages_redirected == before.messages_redirected
    assert after.accelerated_total == before.accelerated_total
    assert after.refused["disabled"] - before.refused["disabled"] == 2 * len(result.clients)
    assert chain >= 2 * result.total  # every payload byte (with headers) through the chain


def test_turning_off_mid_stream_keeps_every_byte(make_node: Callable[..., Node], tmp_path: Path) -> None:
    s = make_setup(make_node, tmp_path)
    allow_client_to_server(s)
    s.mode(True)
    before = s.status().counters
    seen: dict[str, pb.Counters] = {}

    def off() -> None:
        seen["at_off"] = s.status().counters
        s.mode(False)

    with echo_server(s) as out:
        result = run_echo(s, out, mid_stream=off)
    assert_every_byte(result)
    after = s.status().counters
    assert seen["at_off"].messages_redirected > before.messages_redirected  # it was accelerated before
    assert after.fallbacks["disabled"] - before.fallbacks["disabled"] >= len(result.clients)  # then fell back
    assert after.messages_passed > before.messages_passed
    with echo_server(s, port=PORT + 1) as out:  # and new connections are not accelerated
        later = run_echo(s, out, port=PORT + 1, conns=2, sizes=[10, 1000])
    assert_every_byte(later, [10, 1000])
    assert s.status().counters.accelerated_total == after.accelerated_total


def test_sigkill_and_detach_mid_stream_keep_every_byte(make_node: Callable[..., Node], tmp_path: Path) -> None:
    s = make_setup(make_node, tmp_path)
    allow_client_to_server(s)
    s.mode(True)
    pin_dir = s.node.bpffs_root / "sockaccel"

    def kill_and_detach() -> None:
        assert s.node.kill("sockaccel") == -signal.SIGKILL
        with Program.from_pin(pin_dir / "sockaccel_sockops") as program:
            assert detach_cgroup(s.node.cgroup_root, program, AttachType.CGROUP_SOCK_OPS)

    with echo_server(s) as out:
        result = run_echo(s, out, mid_stream=kill_and_detach)
    assert_every_byte(result)
    s.node.start("sockaccel")  # comes back with its pinned maps: the counters kept counting
    counters = s.status().counters
    assert counters.bytes_redirected == 2 * result.total
    assert s.status().attached and s.status().mode == pb.MODE_ON


def test_ipv6_echo_is_accelerated(make_node: Callable[..., Node], tmp_path: Path) -> None:
    s = make_setup(make_node, tmp_path)
    allow_client_to_server(s)
    s.mode(True)
    with echo_server(s, address=s.server.ipv6) as out:
        result = run_echo(s, out, address=s.server.ipv6, conns=3)
    assert_every_byte(result)
    assert s.status().counters.bytes_redirected == 2 * result.total


# ---- policy ----


def test_pair_allowed_on_one_port_is_accelerated_only_there(make_node: Callable[..., Node], tmp_path: Path) -> None:
    s = make_setup(make_node, tmp_path)
    allow_client_to_server(s, ports=[PORT])
    s.mode(True)
    with echo_server(s) as out, echo_server(s, port=PORT + 1):
        result = run_echo(s, out, conns=2, sizes=[100, 5000])
        assert_every_byte(result, [100, 5000])
        accelerated = s.status().counters
        assert accelerated.accelerated_total == 4
        assert_syn_dropped(s, PORT + 1)
    listed = s.accel.ListConnections(pb.ListConnectionsRequest(), timeout=10).connections
    assert all(c.server_port == PORT for c in listed)
    assert s.status().counters.accelerated_total == 4


def assert_syn_dropped(s: Setup, port: int) -> None:
    """A client connecting to the server on `port` is never established: the chain drops its SYN.

    Waits for the drop itself (a POLICY_DENIED event; TCP retransmits the SYN if the watch
    missed the first) instead of for a connect timeout, then checks nothing got through.
    """
    events = s.node.orchestrator().WatchEvents(orch_pb.WatchEventsRequest(types=["DROP"]), timeout=60)
    argv = worker_argv(s.node, s.client.netns, "client", s.server.ipv4, str(port), "1", "[1]", "", "0")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        try:
            drop = next(e for e in events if e.protocol == "TCP" and e.dst_port == port)
        except grpc.RpcError as exc:
            raise AssertionError(f"no drop of the SYN to port {port} was reported: {exc.details()}") from None
        finally:
            events.cancel()
        assert (drop.reason, drop.src, drop.dst) == ("POLICY_DENIED", s.client.ipv4, s.server.ipv4), drop
        syn_sent = netns.run(s.client.netns, "ss", "-Htn", "state", "syn-sent", "dst", f"{s.server.ipv4}:{port}")
        established = netns.run(s.client.netns, "ss", "-Htn", "state", "established", "dst", f"{s.server.ipv4}:{port}")
        assert syn_sent.stdout.strip() and not established.stdout.strip(), (syn_sent.stdout, established.stdout)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_pair_policy_denies_is_never_accelerated(make_node: Callable[..., Node], tmp_path: Path) -> None:
    """Audit mode lets the chain pass a denied flow (and report it): sockaccel must still refuse it."""
    s = make_setup(make_node, tmp_path)
    allow_client_to_server(s, ports=[PORT + 5])  # not PORT
    s.policy.SetAuditMode(pol_pb.SetAuditModeRequest(endpoint="server", audit=True), timeout=10)
    s.policy.SetAuditMode(pol_pb.SetAuditModeRequest(endpoint="client", audit=True), timeout=10)
    s.mode(True)
    before = s.status().counters
    with echo_server(s) as out:
        result = run_echo(s, out, conns=3, sizes=[10, 70_000])
    assert_every_byte(result, [10, 70_000])  # it works, through the chain
    after = s.status().counters
    assert after.accelerated_total == before.accelerated_total
    assert after.messages_redirected == before.messages_redirected
    assert after.refused["policy"] - before.refused["policy"] == 6


def test_policy_change_moves_an_accelerated_connection_to_the_chain(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    """What the README says: at its next message an accelerated socket re-checks policy; once the
    pair is no longer allowed it falls back to the normal path for good, where the chain decides."""
    s = make_setup(make_node, tmp_path)
    allow_client_to_server(s, ports=[PORT])
    s.mode(True)
    marks: dict[str, object] = {}

    def deny() -> None:
        marks["before"] = s.status().counters
        marks["chain"] = s.entry_bytes()
        allow_client_to_server(s, ports=[PORT + 5])  # PORT no longer allowed
        s.policy.SetAuditMode(pol_pb.SetAuditModeRequest(endpoint="server", audit=True), timeout=10)
        s.policy.SetAuditMode(pol_pb.SetAuditModeRequest(endpoint="client", audit=True), timeout=10)

    sizes = [100, 1000, 100_000, 100_000]
    with echo_server(s) as out:
        result = run_echo(s, out, conns=2, sizes=sizes, mid_stream=deny)
    assert_every_byte(result, sizes)
    before = marks["before"]
    assert isinstance(before, pb.Counters)
    after = s.status().counters
    assert after.fallbacks["policy"] - before.fallbacks["policy"] == 4  # both ends of both connections
    assert after.messages_redirected == before.messages_redirected  # nothing redirected after the change
    chain_mark = marks["chain"]
    assert isinstance(chain_mark, int)
    assert s.entry_bytes() - chain_mark >= 2 * 2 * 200_000  # the second half went through the chain


# ---- socket LB ----


def test_connection_through_a_service_vip_is_accelerated(make_node: Callable[..., Node], tmp_path: Path) -> None:
    s = make_setup(make_node, tmp_path, "lb")
    allow_client_to_server(s)
    s.mode(True)
    vip = "198.19.0.9"
    lb = lb_grpc.LoadBalancerStub(s.node.channel("lb"))
    lb.UpsertService(
        lb_pb.UpsertServiceRequest(
            service=lb_pb.Service(name="web", address=vip, port=80, protocol="TCP",
                                  backends=[lb_pb.Backend(address=s.server.ipv4, port=PORT)])
        ),
        timeout=10,
    )  # fmt: skip
    with echo_server(s) as out:
        result = run_echo(s, out, address=vip, port=80, conns=2, sizes=[5, 300_000])
    assert_every_byte(result, [5, 300_000])
    assert s.status().counters.bytes_redirected == 2 * result.total
    listed = s.accel.ListConnections(pb.ListConnectionsRequest(), timeout=10).connections
    assert listed == [] or all(c.server_port == PORT for c in listed)


# ---- events, per-endpoint mode ----


def test_start_and_end_events_reach_the_node_stream(make_node: Callable[..., Node], tmp_path: Path) -> None:
    s = make_setup(make_node, tmp_path)
    allow_client_to_server(s)
    s.mode(True)
    events: list[orch_pb.Event] = []
    channel = s.node.channel("orchestrator")
    stream = orch_grpc.OrchestratorStub(channel).WatchEvents(
        orch_pb.WatchEventsRequest(types=["ACCEL_START", "ACCEL_END"]), timeout=30
    )

    def collect() -> None:
        try:
            for ev in stream:
                events.append(ev)
        except grpc.RpcError:
            return

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    time.sleep(0.5)
    with echo_server(s) as out:
        result = run_echo(s, out, conns=2, sizes=[10, 20])
    assert_every_byte(result, [10, 20])
    wait_for(lambda: sum(e.type == "ACCEL_END" for e in events) >= 4, "end events")
    stream.cancel()
    channel.close()
    starts = [e for e in events if e.type == "ACCEL_START"]
    assert len(starts) == 4
    assert {(e.src, e.dst, e.dst_port) for e in starts} == {(s.client.ipv4, s.server.ipv4, PORT)}
    assert {e.src_port for e in starts} == {int(c["port"]) for c in result.clients}  # type: ignore[call-overload]


def test_endpoint_mode_off_keeps_its_pairs_on_the_normal_path(make_node: Callable[..., Node], tmp_path: Path) -> None:
    s = make_setup(make_node, tmp_path)
    allow_client_to_server(s)
    s.mode(True)
    changed = s.accel.SetEndpointMode(pb.SetEndpointModeRequest(endpoint="server", mode=pb.MODE_OFF), timeout=10)
    assert changed.changed
    with echo_server(s) as out:
        result = run_echo(s, out, conns=2, sizes=[10, 2000])
    assert_every_byte(result, [10, 2000])
    status = s.status()
    assert status.counters.accelerated_total == 0
    assert [(e.endpoint, e.mode) for e in status.endpoints] == [("server", pb.MODE_OFF)]
    s.accel.SetEndpointMode(pb.SetEndpointModeRequest(endpoint="server", mode=pb.MODE_INHERIT), timeout=10)
    with echo_server(s, port=PORT + 1) as out:
        result = run_echo(s, out, port=PORT + 1, conns=2, sizes=[10, 2000])
    assert s.status().counters.accelerated_total == 4


# ---- bad input ----


def test_bad_input_gets_its_status_and_changes_nothing(make_node: Callable[..., Node], tmp_path: Path) -> None:
    s = make_setup(make_node, tmp_path)
    s.mode(True)
    before = s.status()
    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND

    def endpoint(name: str, mode: int) -> Callable[[], object]:
        request = pb.SetEndpointModeRequest(endpoint=name, mode=mode)  # type: ignore[arg-type]
        return lambda: s.accel.SetEndpointMode(request, timeout=5)

    def node_mode(mode: int) -> Callable[[], object]:
        return lambda: s.accel.SetMode(pb.SetModeRequest(mode=mode), timeout=5)  # type: ignore[arg-type]

    page = common_pb2.PageRequest(page_size=10**6)
    cases: list[tuple[Callable[[], object], grpc.StatusCode]] = [
        (node_mode(pb.MODE_UNSPECIFIED), invalid),
        (node_mode(pb.MODE_INHERIT), invalid),
        (node_mode(42), invalid),
        (endpoint("nobody", pb.MODE_OFF), missing),
        (endpoint("Bad Name\n", pb.MODE_OFF), invalid),
        (endpoint("server", pb.MODE_UNSPECIFIED), invalid),
        (lambda: s.accel.ListConnections(pb.ListConnectionsRequest(page=page), timeout=5), invalid),
    ]
    for call, code in cases:
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == code, refused.value.details()
        assert refused.value.details()
    after = s.status()
    assert (after.mode, after.revision, list(after.endpoints)) == (before.mode, before.revision, [])


# ---- flow control ----

LIMIT = 4 << 20
SLOW_RECEIVER = r"""
import hashlib, json, random, socket, sys, threading, time
addr, side = sys.argv[1], sys.argv[2]
if side == "server":
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); ls.bind((addr, 9000)); ls.listen(5)
    print("ready", flush=True)
    c, _ = ls.accept()
    time.sleep(3)  # reads nothing for 3 s
    h, n = hashlib.sha256(), 0
    while data := c.recv(1 << 20):
        h.update(data); n += len(data)
    print(json.dumps({"recv": n, "sha": h.hexdigest()}), flush=True)
else:
    s = socket.create_connection((addr, 9000)); sent, h = [0], hashlib.sha256()
    def go():
        rnd = random.Random(7)
        for _ in range(1024):
            buf = rnd.randbytes(65536)
            s.sendall(buf); h.update(buf); sent[0] += len(buf)
        s.close()
    t = threading.Thread(target=go); t.start(); time.sleep(2)
    queued = sent[0]; t.join(60)
    print(json.dumps({"sent_while_unread": queued, "sent": sent[0], "sha": h.hexdigest()}), flush=True)
"""


def test_a_receiver_that_does_not_read_holds_the_sender_back(make_node: Callable[..., Node], tmp_path: Path) -> None:
    """A redirect has no window: without a limit a sender could queue any amount at a peer that
    does not read (Cilium's sockmap had this, issue 6431). At --max-queued unread bytes the socket
    pauses on TCP, whose window then holds the sender, and redirects again once TCP holds none of
    its bytes unread; every byte arrives once and in order."""
    s = make_setup(make_node, tmp_path, sockaccel_args=("--max-queued", str(LIMIT)))
    allow_client_to_server(s)
    s.mode(True)

    def slow(ns: str, side: str) -> list[str]:
        return worker_argv(s.node, ns, s.server.ipv4, side, script=SLOW_RECEIVER)

    server = subprocess.Popen(slow(s.server.netns, "server"), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = subprocess.run(slow(s.client.netns, "client"), capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
        received = json.loads(server.communicate(timeout=60)[0])
    finally:
        server.kill()
        server.wait(timeout=10)
    sent = json.loads(client.stdout)
    assert sent["sent"] == received["recv"] == 64 << 20 and sent["sha"] == received["sha"]
    assert sent["sent_while_unread"] < 3 * LIMIT  # not the 64 MiB it could push with no limit
    counters = s.status().counters
    assert counters.fallbacks["receiver_full"] >= 1  # paused at the limit...
    assert counters.resumed >= 1  # ...and redirecting again once the receiver caught up
    assert counters.bytes_redirected >= LIMIT


# ---- other ends: a host process; policy bound late ----


def test_a_host_process_and_an_endpoint_are_accelerated(make_node: Callable[..., Node], tmp_path: Path) -> None:
    s = make_setup(make_node, tmp_path)
    s.policy.ImportRules(
        pol_pb.ImportRulesRequest(rules=[pol_pb.Rule(
            name="server-from-host",
            endpoint_selector=pol_pb.EndpointSelector(match_labels={"app": "server"}),
            ingress=[pol_pb.PeerRule(entities=["host"])],
        )]),
        timeout=15,
    )  # fmt: skip
    s.mode(True)
    host = Setup(s.node, orch_pb.Endpoint(name="host", netns=s.node.ns), s.server, s.tmp)
    with echo_server(s) as out:
        result = run_echo(host, out, address=s.server.ipv4, conns=2, sizes=[10, 100_000])
    assert_every_byte(result, [10, 100_000])
    counters = s.status().counters
    assert counters.accelerated_total == 4 and counters.bytes_redirected == 2 * result.total
    listed = s.accel.ListConnections(pb.ListConnectionsRequest(), timeout=10).connections
    assert all(c.client_endpoint == 0 for c in listed)  # the host has no endpoint id


def test_without_the_policy_service_nothing_is_accelerated_until_it_comes(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = make_node("orchestrator")
    node.start("sockaccel")
    client = node.create_endpoint("client", {"app": "client"})
    server = node.create_endpoint("server", {"app": "server"})
    s = Setup(node, client, server, tmp_path)
    s.mode(True)
    assert not s.status().policy_bound
    with echo_server(s) as out:
        result = run_echo(s, out, conns=1, sizes=[10, 1000])
    assert_every_byte(result, [10, 1000])
    counters = s.status().counters
    assert counters.accelerated_total == 0 and counters.refused["no_policy"] == 2  # fails closed
    node.start("policy")
    wait_for(lambda: s.status().policy_bound, "sockaccel bound the policy maps")
    allow_client_to_server(s)
    with echo_server(s, port=PORT + 1) as out:
        result = run_echo(s, out, port=PORT + 1, conns=1, sizes=[10, 1000])
    assert_every_byte(result, [10, 1000])
    assert s.status().counters.accelerated_total == 2


def test_replaced_policy_maps_send_accelerated_connections_to_the_chain(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    """The policy service started anew without its pins makes new maps; the sockets already in the
    fast path keep programs that read the old ones, so sockaccel sends them all to the normal path."""
    s = make_setup(make_node, tmp_path)
    allow_client_to_server(s)
    s.mode(True)
    marks: dict[str, pb.Counters] = {}

    def replace_policy() -> None:
        marks["before"] = s.status().counters
        bound = s.status()
        s.node.kill("policy")
        for pin in (s.node.bpffs_root / "policy").iterdir():
            pin.unlink()
        (s.node.state_dir / "policy.db").unlink()
        s.node.start("policy")
        allow_client_to_server(s)
        wait_for(lambda: s.status().policy_bound and s.status().revision == bound.revision, "bound again")
        wait_for(lambda: s.status().counters.accelerated_current == 0, "the sockets were retired")

    sizes = [100, 50_000, 100, 50_000]
    with echo_server(s) as out:
        result = run_echo(s, out, conns=2, sizes=sizes, mid_stream=replace_policy)
    assert_every_byte(result, sizes)
    after = s.status().counters
    assert after.messages_redirected == marks["before"].messages_redirected  # none after the swap
    with echo_server(s, port=PORT + 1) as out:  # new connections are accelerated under the new maps
        later = run_echo(s, out, port=PORT + 1, conns=1, sizes=[10, 1000])
    assert_every_byte(later, [10, 1000])
    assert s.status().counters.accelerated_total == after.accelerated_total + 2


def test_grpcurl_turns_it_on_and_reads_the_counters(make_node: Callable[..., Node], tmp_path: Path) -> None:
    """The README section's calls, with the real grpcurl binary."""
    s = make_setup(make_node, tmp_path)
    allow_client_to_server(s)
    sock = str(s.node.socket("sockaccel"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}

    def grpcurl(*args: str) -> dict[str, Any]:
        result = subprocess.run(
            ["grpcurl", "-plaintext", "-unix", *args], capture_output=True, text=True, timeout=30, env=env
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout) if result.stdout.startswith("{") else {"text": result.stdout}

    assert "weir.sockaccel.v1.SockAccel" in grpcurl(sock, "list")["text"]
    assert grpcurl("-d", '{"mode": "MODE_ON"}', sock, "weir.sockaccel.v1.SockAccel/SetMode")["changed"]
    with echo_server(s) as out:
        run_echo(s, out, conns=1, sizes=[10, 1000])
    status = grpcurl("-d", "{}", sock, "weir.sockaccel.v1.SockAccel/GetStatus")
    assert status["mode"] == "MODE_ON" and status["policy_bound"] and status["attached"]
    assert int(status["counters"]["messages_redirected"]) >= 2
    off = grpcurl(
        "-d", '{"endpoint": "server", "mode": "MODE_OFF"}', sock, "weir.sockaccel.v1.SockAccel/SetEndpointMode"
    )
    assert off["changed"]
    grpcurl("-d", "{}", sock, "weir.sockaccel.v1.SockAccel/ListConnections")
