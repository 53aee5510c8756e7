"""`./weir teardown` removes everything one node made and nothing of the instance running beside it."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from weir.lb.v1 import lb_pb2 as lb_pb
from weir.lb.v1 import lb_pb2_grpc as lb_grpc
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.prefilter.v1 import prefilter_pb2 as pf_pb
from weir.prefilter.v1 import prefilter_pb2_grpc as pf_grpc

from services.common.bpffs import remove_pins
from services.common.cgroup import attached_programs
from services.common.datapath import NODE_ROUTE_PROTOCOL
from services.orchestrator.routing import route_metric
from services.orchestrator.teardown import pinned_program_ids
from services.policy.redirect import hairpin_names
from tests.harness import netns
from tests.harness.node import NET_IFNAME, OUTSIDE_V4, REPO, Node

pytestmark = pytest.mark.root

BESIDE_IFNAME = "wnetb"


@dataclass
class Beside(Node):
    """A second instance running in another node's namespace (its own paths, the same network)."""

    host: str = ""

    @property
    def ns(self) -> str:
        return self.host

    def teardown(self) -> None:
        for name in list(self.services):
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                self.kill(name, signal.SIGKILL)
        for ns in netns.names(f"{self.name}."):
            netns.remove(ns)
        if self.bpffs_root.exists():
            remove_pins(self.bpffs_root)
        if self.cgroup_root.exists():
            self.cgroup_root.rmdir()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def beside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Node], Beside]]:
    made: list[Beside] = []

    def make(node: Node) -> Beside:
        other = Beside(f"{node.name}b", tmp_path_factory.mktemp(f"{node.name}b"), host=node.ns)
        made.append(other)
        other.workdir.mkdir(parents=True, exist_ok=True)
        return other

    yield make
    for other in made:
        other.teardown()


def _teardown(node: Node, *extra: str) -> subprocess.CompletedProcess[str]:
    flags = node.argv("x")[node.argv("x").index("--instance") :]
    argv = [*netns.nsenter_argv(node.ns), sys.executable, "-m", "services.orchestrator.teardown", *flags, *extra]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)


def _lb(node: Node) -> lb_grpc.LoadBalancerStub:
    return lb_grpc.LoadBalancerStub(node.channel("lb"))


def _populate(node: Node, device: str, vip: str) -> None:
    """Endpoints, an attached device with the prefilter's XDP on it, a VIP (socket LB)."""
    node.create_endpoint("a", ipv6=False)
    backend = node.create_endpoint("b", ipv6=False)
    node.orchestrator().AttachDevice(orch_pb.AttachDeviceRequest(interface=device), timeout=10)
    pf_grpc.PrefilterStub(node.channel("prefilter")).Attach(
        pf_pb.AttachRequest(interface=device, mode=pf_pb.XDP_MODE_GENERIC), timeout=10
    )
    service = lb_pb.Service(
        name="web",
        address=vip,
        port=80,
        protocol="TCP",
        backends=[lb_pb.Backend(address=backend.ipv4, port=8080, weight=1)],
    )
    _lb(node).UpsertService(lb_pb.UpsertServiceRequest(service=service), timeout=10)


def _links(node: Node) -> str:
    return netns.run(node.ns, "ip", "-d", "link", "show").stdout


def _aliases(node: Node, instance: str) -> list[str]:
    return [line for line in _links(node).splitlines() if f"alias weir/{instance}/" in line]


def _tc(node: Node, device: str) -> str:
    return "".join(netns.run(node.ns, "tc", "filter", "show", "dev", device, d).stdout for d in ("ingress", "egress"))


def _xdp(node: Node, device: str) -> bool:
    return "xdp" in netns.run(node.ns, "ip", "link", "show", device).stdout


def _snapshot(node: Node, device: str) -> dict[str, object]:
    """Everything of one instance a teardown of another must leave as it is."""
    return {
        "netns": netns.names(f"{node.name}."),
        "aliases": len(_aliases(node, node.name)),
        "pins": sorted(str(p) for p in node.bpffs_root.rglob("*")),
        "cgroup": sorted(attached_programs(node.cgroup_root)),
        "tc": _tc(node, device),
        "xdp": _xdp(node, device),
        "sockets": sorted(p.name for p in node.run_dir.glob("*.sock")),
    }


def test_teardown_removes_everything_the_node_made_and_nothing_of_its_neighbour(
    make_node: Callable[..., Node], beside: Callable[[Node], Beside]
) -> None:
    node = make_node()
    node.cgroup_root.rmdir()  # the instance makes its own cgroup (the harness made one)
    for service in ("orchestrator", "prefilter", "lb"):
        node.start(service)
    _populate(node, NET_IFNAME, "198.19.0.1")
    user_ns = f"{node.name}.user"  # a user's namespace that only looks like ours
    netns.create(user_ns)

    other = beside(node)
    netns.run(node.ns, "ip", "link", "add", BESIDE_IFNAME, "type", "veth", "peer", "name", "wnetb1")
    netns.run(node.ns, "ip", "link", "set", BESIDE_IFNAME, "up")
    for service in ("orchestrator", "prefilter", "lb"):
        other.start(service)
    _populate(other, BESIDE_IFNAME, "198.19.0.2")
    before = _snapshot(other, BESIDE_IFNAME)
    assert before["aliases"] == 2 and before["tc"] and before["xdp"] and before["cgroup"]

    ours = _snapshot(node, NET_IFNAME)
    assert ours["aliases"] == 2 and ours["tc"] and ours["xdp"] and ours["cgroup"]
    for service in ("prefilter", "orchestrator"):
        node.kill(service, signal.SIGTERM)
    ours["sockets"] = ["lb.sock"]
    running = node.services["lb"].process.pid
    refused = _teardown(node)
    assert refused.returncode == 1 and f"pid {running}" in refused.stderr, refused.stderr
    assert _snapshot(node, NET_IFNAME) == ours  # refusing touched nothing
    node.kill("lb", signal.SIGTERM)
    result = _teardown(node)
    assert result.returncode == 0, result.stderr

    assert netns.names(f"{node.name}.") == [user_ns]
    assert _aliases(node, node.name) == []
    assert _tc(node, NET_IFNAME) == ""
    assert not _xdp(node, NET_IFNAME)
    assert not node.bpffs_root.exists()
    assert not node.cgroup_root.exists()
    assert not node.run_dir.exists()
    assert node.state_dir.exists()  # kept without --purge-state

    assert _snapshot(other, BESIDE_IFNAME) == before
    assert all(other.serving(s) for s in ("orchestrator", "prefilter", "lb"))
    assert _teardown(node).returncode == 0  # safe to repeat
    netns.remove(user_ns)


def test_teardown_restores_forwarding_and_purges_state_on_request(make_node: Callable[..., Node]) -> None:
    node = make_node()
    forwarding = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")

    def values() -> list[str]:
        return [netns.run(node.ns, "sysctl", "-n", key).stdout.strip() for key in forwarding]

    assert values() == ["0", "0"]
    node.start("orchestrator")
    assert values() == ["1", "1"]
    node.kill("orchestrator", signal.SIGKILL)
    node.start("orchestrator")  # a restart finds forwarding on: the originals stay recorded
    node.kill("orchestrator", signal.SIGTERM)
    result = _teardown(node, "--purge-state")
    assert result.returncode == 0, result.stderr
    assert values() == ["0", "0"]
    assert not node.state_dir.exists()
    assert not node.bpffs_root.exists()


def test_a_shared_cgroup_keeps_the_other_instances_hooks(
    make_node: Callable[..., Node], beside: Callable[[Node], Beside]
) -> None:
    node = make_node()
    node.cgroup_root.rmdir()
    node.start("orchestrator")
    node.start("lb")
    other = beside(node)
    shared = ("--cgroup-root", str(node.cgroup_root))
    other.start("orchestrator", *shared)
    other.start("lb", *shared)
    theirs = set(attached_programs(node.cgroup_root)) - pinned_program_ids(node.bpffs_root)
    assert theirs
    node.kill("lb", signal.SIGTERM)
    node.kill("orchestrator", signal.SIGTERM)
    assert _teardown(node).returncode == 0
    assert node.cgroup_root.is_dir()  # not empty: the neighbour's hooks are still attached
    assert set(attached_programs(node.cgroup_root)) == theirs
    other.kill("lb", signal.SIGTERM)
    other.kill("orchestrator", signal.SIGTERM)
    assert _teardown(other, *shared).returncode == 0


def _envoy_pid(node: Node) -> int:
    """The Envoy the node's l7 service runs, once its pid file names a live process."""
    pid_file = node.run_dir / "l7" / "envoy.pid"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            if Path(f"/proc/{pid}").exists():
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no Envoy pid in {pid_file}:\n{node.log_tail('l7')}")


def _running(pid: int) -> bool:
    try:
        return b"envoy" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _link_alias(node: Node, ifname: str) -> str | None:
    """The ifalias of an interface in the node's namespace; None when there is no such interface."""
    shown = netns.run(node.ns, "ip", "-d", "link", "show", "dev", ifname, check=False)
    if shown.returncode != 0:
        return None
    return next((line.split("alias ", 1)[1].strip() for line in shown.stdout.splitlines() if "alias " in line), "")


def test_no_envoy_or_hairpin_outlives_its_node(
    make_node: Callable[..., Node], beside: Callable[[Node], Beside]
) -> None:
    """A stopped l7 service ends its Envoy; a killed one leaves it (adopted next run), and teardown ends it.

    The L7 hairpin device is per instance: a second instance in the namespace gets its own,
    and tearing one instance down leaves the other's.
    """
    node = make_node()
    node.start("orchestrator")
    node.start("policy")
    node.start("l7")
    other = beside(node)
    other.start("orchestrator")
    other.start("policy")
    ours, theirs = hairpin_names(node.name)[0], hairpin_names(other.name)[0]
    assert ours != theirs
    assert _link_alias(node, ours) == f"weir-l7/{node.name}"
    assert _link_alias(node, theirs) == f"weir-l7/{other.name}"
    first = _envoy_pid(node)
    node.kill("l7", signal.SIGTERM)
    assert not _running(first), "SIGTERM to the l7 service left its Envoy running"

    node.start("l7")
    second = _envoy_pid(node)
    node.kill("l7", signal.SIGKILL)
    assert _running(second)  # kept on purpose: it goes on enforcing until the service is back
    node.kill("policy", signal.SIGTERM)
    node.kill("orchestrator", signal.SIGTERM)
    result = _teardown(node)
    assert result.returncode == 0, result.stderr
    assert f"envoy pid {second}" in result.stdout + result.stderr
    assert not _running(second), "teardown left the Envoy of a killed l7 service running"
    assert _link_alias(node, ours) is None
    assert _link_alias(node, theirs) == f"weir-l7/{other.name}"
    assert all(other.serving(s) for s in ("orchestrator", "policy"))


def _node_routes(node: Node) -> set[tuple[str, int]]:
    """(destination, metric) of every node route (route protocol 87) in the node's namespace."""
    out = set()
    for family in ("-4", "-6"):
        shown = netns.run(node.ns, "ip", family, "route", "show", "proto", str(NODE_ROUTE_PROTOCOL)).stdout
        for line in shown.splitlines():
            words = line.split()
            out.add((words[0], int(words[words.index("metric") + 1]) if "metric" in words else 0))
    return out


def test_two_instances_in_one_namespace_keep_their_own_node_routes(
    make_node: Callable[..., Node], beside: Callable[[Node], Beside]
) -> None:
    """Each instance's routes carry its own metric: a restart (reconcile) or a teardown of one
    leaves the other's routes, even to the same CIDR; only unscoped routes of an older version go."""
    node = make_node("orchestrator")
    other = beside(node)
    other.start("orchestrator")
    gateway = OUTSIDE_V4  # both route via the outside namespace's address
    for instance, cidr in ((node, "10.71.0.0/24"), (other, "10.72.0.0/24")):
        record = orch_pb.Node(name="far", node_id=2, addresses=[gateway], cidrs=[cidr, "10.73.0.0/24"])
        instance.orchestrator().UpsertNode(orch_pb.UpsertNodeRequest(node=record), timeout=15)
    mine, theirs = route_metric(node.name), route_metric(other.name)
    assert mine != theirs
    both = {("10.71.0.0/24", mine), ("10.73.0.0/24", mine), ("10.72.0.0/24", theirs), ("10.73.0.0/24", theirs)}
    assert _node_routes(node) == both
    # A route of protocol 87 with no instance metric was made before routes were scoped: a
    # restarted instance replaces it (with its own, if it still wants the destination).
    netns.run(node.ns, "ip", "route", "add", "10.74.0.0/24", "via", gateway, "proto", str(NODE_ROUTE_PROTOCOL))
    node.kill("orchestrator")
    node.start("orchestrator")
    assert _node_routes(node) == both, "a restart took another instance's routes or kept an unscoped one"
    node.kill("orchestrator", signal.SIGTERM)
    result = _teardown(node)
    assert result.returncode == 0, result.stderr
    assert _node_routes(node) == {("10.72.0.0/24", theirs), ("10.73.0.0/24", theirs)}
    assert "10.72.0.0/24" not in result.stdout and "10.71.0.0/24" in result.stdout
    other_stub = other.orchestrator()
    assert {n.name for n in other_stub.ListNodes(orch_pb.ListNodesRequest(), timeout=10).nodes} == {"far"}
