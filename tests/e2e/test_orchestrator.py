"""The orchestrator as a real process: endpoints, real traffic, the chain, restarts."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from weir.common.v1 import common_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as pb

from pybpf import ProgType, TcDirection, XdpMode, attach_tc, attach_xdp, query_tc, query_xdp
from services.common.datapath import Hook
from tests.harness import netns, traffic
from tests.harness.node import NODE_NET_V4, NODE_NET_V6, OUTSIDE_V4, Node
from tests.harness.objects import counted, counter_object

pytestmark = pytest.mark.root


def set_slot(node: Node, hook: common_pb2.Hook.ValueType, slot: common_pb2.Slot.ValueType, pin: Path) -> pb.SlotState:
    return node.orchestrator().SetSlot(pb.SetSlotRequest(hook=hook, slot=slot, pin_path=str(pin)), timeout=5)


def entry_packets(node: Node, hook: common_pb2.Hook.ValueType) -> int:
    metrics = node.orchestrator().GetMetrics(pb.GetMetricsRequest(), timeout=5)
    return next(e.counter.packets for e in metrics.entry if e.hook == hook)


def test_two_endpoints_talk_through_the_chain(node: Node) -> None:
    a = node.create_endpoint("a", {"app": "client"})
    b = node.create_endpoint("b", {"app": "server"})
    assert a.netns and b.netns and a.host_ifname != b.host_ifname
    before = entry_packets(node, common_pb2.HOOK_FROM_CONTAINER)

    with counter_object(node, "c1") as obj:
        state = set_slot(
            node,
            common_pb2.HOOK_FROM_CONTAINER,
            common_pb2.SLOT_POLICY,
            node.bpffs_root / "test/c1/count_from_container",
        )
        assert state.program_id > 0 and state.program_name.startswith("count_from_")
        assert traffic.ping(a.netns, b.ipv4, count=5) == 5
        assert traffic.ping(a.netns, b.ipv6, count=3) == 3
        with traffic.server(b.netns, b.ipv4, 8080, reply=b"b:"):
            assert traffic.tcp_exchange(a.netns, b.ipv4, 8080, b"hello" * 1000) == b"b:" + b"hello" * 1000
        with traffic.server(b.netns, b.ipv6, 8081, reply=b"b6:"):
            assert traffic.tcp_exchange(a.netns, b.ipv6, 8081, b"six") == b"b6:six"
        # 8 echo requests, TCP handshakes and data all left a through from-container.
        assert counted(obj, Hook.FROM_CONTAINER) >= 8 + 6
    assert entry_packets(node, common_pb2.HOOK_FROM_CONTAINER) - before >= 8 + 6
    assert entry_packets(node, common_pb2.HOOK_TO_CONTAINER) >= 8 + 6

    reasons = node.orchestrator().GetMetrics(pb.GetMetricsRequest(), timeout=5).reasons
    forwarded = [r for r in reasons if r.reason == "FORWARDED" and r.direction == common_pb2.DIRECTION_EGRESS]
    assert forwarded and forwarded[0].counter.packets >= 8 + 6


def test_endpoint_reaches_host_and_outside(node: Node) -> None:
    a = node.create_endpoint("a")
    assert traffic.ping(a.netns, "192.0.2.1", count=2) == 2  # the node itself
    assert traffic.ping(a.netns, "192.0.2.2", count=2) == 2  # the outside namespace
    assert traffic.ping(node.outside, a.ipv4, count=2) == 2
    assert traffic.ping(node.outside, a.ipv6, count=2) == 2


def test_replacing_a_slot_under_traffic_loses_nothing(node: Node) -> None:
    a = node.create_endpoint("a", ipv6=False)
    b = node.create_endpoint("b", ipv6=False)
    hook, slot = common_pb2.HOOK_FROM_CONTAINER, common_pb2.SLOT_LB
    with counter_object(node, "one") as one, counter_object(node, "two") as two:
        set_slot(node, hook, slot, node.bpffs_root / "test/one/count_from_container")
        stream = traffic.CountedStream(a.netns, b.netns, b.ipv4, 9000, rate=2000).start()
        time.sleep(0.3)
        for i in range(20):
            which = "two" if i % 2 == 0 else "one"
            set_slot(node, hook, slot, node.bpffs_root / f"test/{which}/count_from_container")
            time.sleep(0.02)
        time.sleep(0.3)
        result = stream.finish()
        assert result.sent > 500
        assert result.missing == [], f"{len(result.missing)} of {result.sent} datagrams lost"
        # Every datagram went through exactly one of the two objects.
        assert counted(one, Hook.FROM_CONTAINER) + counted(two, Hook.FROM_CONTAINER) >= result.sent
        assert counted(one, Hook.FROM_CONTAINER) > 0 and counted(two, Hook.FROM_CONTAINER) > 0


def test_datapath_survives_sigkill_and_restart_readopts(node: Node) -> None:
    a = node.create_endpoint("a")
    b = node.create_endpoint("b")
    with counter_object(node, "c") as obj:
        set_slot(
            node,
            common_pb2.HOOK_FROM_CONTAINER,
            common_pb2.SLOT_POLICY,
            node.bpffs_root / "test/c/count_from_container",
        )
        stream = traffic.CountedStream(a.netns, b.netns, b.ipv4, 9001, rate=1000).start()
        time.sleep(0.2)
        node.kill("orchestrator")
        time.sleep(0.5)
        with traffic.server(b.netns, b.ipv4, 8080):
            assert traffic.tcp_connects(a.netns, b.ipv4, 8080)
        assert traffic.ping(a.netns, b.ipv4, count=2) == 2
        node.start("orchestrator")
        time.sleep(0.2)
        result = stream.finish()
        assert result.sent > 500  # the stream ran across the kill and the restart
        assert result.missing == [], f"{len(result.missing)} of {result.sent} lost across the restart"
        # The slot kept its program through the restart (the call map is pinned).
        slots = node.orchestrator().ListSlots(pb.ListSlotsRequest(hook=common_pb2.HOOK_FROM_CONTAINER))
        assert any(s.slot == common_pb2.SLOT_POLICY and s.program_id for s in slots.slots)
        seen = counted(obj, Hook.FROM_CONTAINER)
        assert seen >= result.sent

    listed = node.orchestrator().ListEndpoints(pb.ListEndpointsRequest(), timeout=5).endpoints
    assert [(e.name, e.ipv4, e.ipv6) for e in listed] == [(a.name, a.ipv4, a.ipv6), (b.name, b.ipv4, b.ipv6)]
    assert traffic.ping(a.netns, b.ipv4, count=2) == 2
    for name in ("a", "b"):
        node.orchestrator().DeleteEndpoint(pb.DeleteEndpointRequest(name=name), timeout=10)
    assert not netns.names(f"{node.name}.")


def test_delete_leaves_nothing_behind(node: Node) -> None:
    a = node.create_endpoint("a")
    keep = node.create_endpoint("keep")
    assert _tc_programs(node, a.host_ifname)
    node.orchestrator().DeleteEndpoint(pb.DeleteEndpointRequest(name="a"), timeout=10)
    assert a.netns not in netns.names(node.name)
    links = netns.run(node.ns, "ip", "-o", "link", "show").stdout
    assert a.host_ifname not in links
    assert keep.host_ifname in links
    routes = netns.run(node.ns, "ip", "route", "show").stdout
    assert a.ipv4 not in routes
    endpoints_map = _bpftool_json("map", "dump", "pinned", str(node.bpffs_root / "globals/endpoints"))
    assert [e["key"] for e in endpoints_map] == [keep.host_ifindex]
    with pytest.raises(grpc.RpcError) as err:
        node.orchestrator().GetEndpoint(pb.GetEndpointRequest(name="a"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Deleting the last endpoint leaves only the node's own pins (entry programs, shared maps).
    node.orchestrator().DeleteEndpoint(pb.DeleteEndpointRequest(name="keep"), timeout=10)
    assert not netns.names(f"{node.name}.")
    pins = sorted(p.name for p in (node.bpffs_root / "orchestrator").iterdir())
    assert pins == sorted(f"entry_{h}" for h in ("from_container", "to_container", "from_network", "to_network", "xdp"))


def test_adopted_interface_is_left_in_place(node: Node) -> None:
    ns = f"{node.name}-adopt"
    netns.create(ns)
    try:
        netns.run(node.ns, "ip", "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns", ns)
        netns.run(node.ns, "ip", "link", "set", "ext0", "up")
        netns.run(ns, "ip", "addr", "add", "198.18.1.5/32", "dev", "eth0")
        netns.run(ns, "ip", "link", "set", "eth0", "up")
        # The adopting runtime's own plumbing: a gateway that is the host side's MAC.
        host_mac = netns.run(node.ns, "cat", "/sys/class/net/ext0/address").stdout.strip()
        netns.run(ns, "ip", "neigh", "add", "169.254.1.1", "lladdr", host_mac, "dev", "eth0", "nud", "permanent")
        netns.run(ns, "ip", "route", "add", "169.254.1.1/32", "dev", "eth0", "scope", "link")
        netns.run(ns, "ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        request = pb.CreateEndpointRequest(name="ext", ipv4="198.18.1.5", adopt_interface="ext0")
        ep = node.orchestrator().CreateEndpoint(request, timeout=10)
        assert ep.adopted and ep.host_ifname == "ext0" and not ep.netns
        assert _tc_programs(node, "ext0")
        before = entry_packets(node, common_pb2.HOOK_FROM_CONTAINER)
        assert traffic.ping(node.outside, "198.18.1.5", count=3) == 3
        assert entry_packets(node, common_pb2.HOOK_FROM_CONTAINER) - before >= 3
        node.orchestrator().DeleteEndpoint(pb.DeleteEndpointRequest(name="ext"), timeout=10)
        assert "ext0" in netns.run(node.ns, "ip", "-o", "link", "show").stdout
        assert not _tc_programs(node, "ext0")
    finally:
        netns.remove(ns)


def test_restart_removes_what_it_no_longer_knows(node: Node) -> None:
    node.create_endpoint("a")
    node.kill("orchestrator")
    # A leftover the store does not know: tagged like Weir's own, plus a namespace.
    stray_ns = f"{node.name}.stray"
    netns.create(stray_ns)
    netns.run(node.ns, "ip", "link", "add", "lxcstray", "type", "veth", "peer", "name", "eth0", "netns", stray_ns)
    netns.run(node.ns, "ip", "link", "set", "lxcstray", "alias", f"weir/{node.name}/stray")
    netns.run(node.ns, "ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1")  # not ours: stays
    node.start("orchestrator")
    links = netns.run(node.ns, "ip", "-o", "link", "show").stdout
    assert "lxcstray" not in links
    assert "other0" in links
    assert stray_ns not in netns.names(node.name)
    names = [e.name for e in node.orchestrator().ListEndpoints(pb.ListEndpointsRequest()).endpoints]
    assert names == ["a"]


def test_two_nodes_side_by_side(make_node: Callable[..., Node]) -> None:
    one = make_node("orchestrator")
    two = make_node("orchestrator")
    a1, b1 = one.create_endpoint("a"), one.create_endpoint("b")
    a2, b2 = two.create_endpoint("a"), two.create_endpoint("b")
    assert a1.netns != a2.netns
    assert traffic.ping(a1.netns, b1.ipv4, count=2) == 2
    assert traffic.ping(a2.netns, b2.ipv4, count=2) == 2
    two.orchestrator().DeleteEndpoint(pb.DeleteEndpointRequest(name="a"), timeout=10)
    assert traffic.ping(a1.netns, b1.ipv4, count=2) == 2
    assert [e.name for e in one.orchestrator().ListEndpoints(pb.ListEndpointsRequest()).endpoints] == ["a", "b"]


def test_list_pages(node: Node) -> None:
    for name in ("e1", "e2", "e3"):
        node.create_endpoint(name, ipv6=False)
    stub = node.orchestrator()
    first = stub.ListEndpoints(pb.ListEndpointsRequest(page=common_pb2.PageRequest(page_size=2)))
    assert [e.name for e in first.endpoints] == ["e1", "e2"] and first.next_page_token
    rest = stub.ListEndpoints(
        pb.ListEndpointsRequest(page=common_pb2.PageRequest(page_size=2, page_token=first.next_page_token))
    )
    assert [e.name for e in rest.endpoints] == ["e3"] and not rest.next_page_token


def _state(node: Node) -> tuple[list[str], str, list[str]]:
    endpoints = [e.name for e in node.orchestrator().ListEndpoints(pb.ListEndpointsRequest()).endpoints]
    links = netns.run(node.ns, "ip", "-o", "link", "show").stdout
    slots = [f"{s.hook}/{s.slot}/{s.program_id}" for s in node.orchestrator().ListSlots(pb.ListSlotsRequest()).slots]
    return endpoints, str(links.count("lxc")), slots


def test_bad_input_is_refused_and_changes_nothing(node: Node) -> None:
    node.create_endpoint("taken", ipv6=False)
    xdp_pin = node.bpffs_root / "orchestrator" / "entry_xdp"
    before = _state(node)
    stub = node.orchestrator()
    cases: list[tuple[str, Callable[[], object], grpc.StatusCode, str]] = [
        (
            "bad IPv4",
            lambda: stub.CreateEndpoint(pb.CreateEndpointRequest(name="x", ipv4="10.1.2.300")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "10.1.2.300",
        ),
        (
            "IPv6 in ipv4",
            lambda: stub.CreateEndpoint(pb.CreateEndpointRequest(name="x", ipv4="2001:db8::1")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not an IPv4",
        ),
        (
            "bad name",
            lambda: stub.CreateEndpoint(pb.CreateEndpointRequest(name="Bad_Name", ipv4="198.18.9.1")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Bad_Name",
        ),
        (
            "duplicate name",
            lambda: stub.CreateEndpoint(pb.CreateEndpointRequest(name="taken", ipv4="198.18.9.2")),
            grpc.StatusCode.ALREADY_EXISTS,
            "taken",
        ),
        (
            "duplicate address",
            lambda: stub.CreateEndpoint(pb.CreateEndpointRequest(name="y", ipv4="198.18.0.10")),
            grpc.StatusCode.ALREADY_EXISTS,
            "198.18.0.10",
        ),
        (
            "unknown endpoint",
            lambda: stub.GetEndpoint(pb.GetEndpointRequest(name="ghost")),
            grpc.StatusCode.NOT_FOUND,
            "ghost",
        ),
        (
            "delete unknown",
            lambda: stub.DeleteEndpoint(pb.DeleteEndpointRequest(name="ghost")),
            grpc.StatusCode.NOT_FOUND,
            "ghost",
        ),
        (
            "adopt missing interface",
            lambda: stub.CreateEndpoint(pb.CreateEndpointRequest(name="z", ipv4="198.18.9.3", adopt_interface="nope0")),
            grpc.StatusCode.NOT_FOUND,
            "nope0",
        ),
        (
            "slot out of range",
            lambda: stub.SetSlot(
                pb.SetSlotRequest(
                    hook=common_pb2.HOOK_FROM_CONTAINER, slot=common_pb2.Slot.ValueType(42), pin_path=str(xdp_pin)
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "out of range",
        ),
        (
            "hook unspecified",
            lambda: stub.SetSlot(pb.SetSlotRequest(slot=common_pb2.SLOT_LB, pin_path=str(xdp_pin))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "hook",
        ),
        (
            "wrong program type",
            lambda: stub.SetSlot(
                pb.SetSlotRequest(hook=common_pb2.HOOK_FROM_CONTAINER, slot=common_pb2.SLOT_LB, pin_path=str(xdp_pin))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "XDP",
        ),
        (
            "missing pin",
            lambda: stub.SetSlot(
                pb.SetSlotRequest(
                    hook=common_pb2.HOOK_FROM_CONTAINER, slot=common_pb2.SLOT_LB, pin_path="/sys/fs/bpf/nothing-here"
                )
            ),
            grpc.StatusCode.NOT_FOUND,
            "nothing-here",
        ),
        (
            "unknown program id",
            lambda: stub.SetSlot(
                pb.SetSlotRequest(hook=common_pb2.HOOK_FROM_CONTAINER, slot=common_pb2.SLOT_LB, program_id=0x7FFFFFF0)
            ),
            grpc.StatusCode.NOT_FOUND,
            str(0x7FFFFFF0),
        ),
        (
            "page too big",
            lambda: stub.ListEndpoints(pb.ListEndpointsRequest(page=common_pb2.PageRequest(page_size=100000))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_size",
        ),
    ]
    for what, call, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code, f"{what}: {err.value.code()} {err.value.details()}"
        assert text in (err.value.details() or ""), f"{what}: {err.value.details()}"
    assert _state(node) == before


def _tc_programs(node: Node, ifname: str) -> list[str]:
    out = []
    for direction in ("ingress", "egress"):
        shown = netns.run(node.ns, "tc", "filter", "show", "dev", ifname, direction, check=False).stdout
        out += [line for line in shown.splitlines() if "bpf" in line]
    return out


def _bpftool_json(*args: str) -> list[dict[str, int]]:
    import json

    result = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True)
    return [{"key": int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little")} for e in json.loads(result.stdout)]


def test_grpcurl_walkthrough(node: Node) -> None:
    """The README's walk-through, with the real grpcurl binary."""
    sock = str(node.socket("orchestrator"))

    def grpcurl(*args: str) -> str:
        result = subprocess.run(
            ["grpcurl", "-plaintext", "-unix", *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PATH": _venv_path()},
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    services = grpcurl(sock, "list")
    assert "weir.orchestrator.v1.Orchestrator" in services
    assert "grpc.health.v1.Health" in services
    assert "rpc CreateEndpoint" in grpcurl(sock, "describe", "weir.orchestrator.v1.Orchestrator")
    assert '"SERVING"' in grpcurl(sock, "grpc.health.v1.Health/Check")
    body = '{"name": "web", "ipv4": "198.18.3.3", "labels": {"app": "web"}}'
    created = grpcurl("-d", body, sock, "weir.orchestrator.v1.Orchestrator/CreateEndpoint")
    assert '"host_ifname": "lxc' in created
    listed = grpcurl("-d", "{}", sock, "weir.orchestrator.v1.Orchestrator/ListEndpoints")
    assert traffic.ping(node.outside, "198.18.3.3", count=2) == 2
    assert '"name": "web"' in listed and '"198.18.3.3"' in listed


def _venv_path() -> str:
    import sys

    return f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"


def _refused(call: Callable[[], object], code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    return err.value.details() or ""


def test_devices_and_adoption_refuse_interfaces_that_are_not_free(node: Node) -> None:
    """AttachDevice and adopt_interface take only an interface nobody else uses."""
    stub = node.orchestrator()
    a = node.create_endpoint("a")
    netns.run(node.ns, "ip", "link", "add", "dev0", "type", "veth", "peer", "name", "dev0p")
    netns.run(node.ns, "ip", "link", "add", "busy0", "type", "veth", "peer", "name", "busy0p")
    netns.run(node.ns, "ip", "link", "add", "xdpbusy0", "type", "veth", "peer", "name", "xdpbusy0p")
    with counter_object(node, "foreign") as obj, netns.entered(node.ns):
        foreign = attach_tc("busy0", next(p for p in obj.programs.values() if p.type == ProgType.SCHED_CLS),
                            TcDirection.INGRESS)  # fmt: skip
        xdp = next(p for p in obj.programs.values() if p.type == ProgType.XDP)
        attach_xdp("xdpbusy0", xdp, XdpMode.GENERIC)
        foreign_xdp = xdp.id
    veth_programs = _tc_programs(node, a.host_ifname)
    assert veth_programs

    assert "endpoint" in _refused(lambda: stub.AttachDevice(pb.AttachDeviceRequest(interface=a.host_ifname)))
    assert _tc_programs(node, a.host_ifname) == veth_programs
    _refused(lambda: stub.DetachDevice(pb.DetachDeviceRequest(interface=a.host_ifname)), grpc.StatusCode.NOT_FOUND)
    assert _tc_programs(node, a.host_ifname) == veth_programs
    assert "not this node's" in _refused(lambda: stub.AttachDevice(pb.AttachDeviceRequest(interface="busy0")))
    with netns.entered(node.ns):
        assert query_tc("busy0", TcDirection.INGRESS) == foreign.program_id

    assert "XDP" in _refused(lambda: stub.AttachDevice(pb.AttachDeviceRequest(interface="xdpbusy0")))
    with netns.entered(node.ns):
        assert query_xdp("xdpbusy0").generic == foreign_xdp
    stub.AttachDevice(pb.AttachDeviceRequest(interface="dev0"), timeout=5)
    assert "already attached" in _refused(lambda: stub.AttachDevice(pb.AttachDeviceRequest(interface="dev0")))

    endpoints = stub.ListEndpoints(pb.ListEndpointsRequest(), timeout=5)
    for ifname in (a.host_ifname, "dev0", "busy0", "xdpbusy0"):
        _refused(
            lambda i=ifname: stub.CreateEndpoint(
                pb.CreateEndpointRequest(  # type: ignore[misc]
                    name="adopter", ipv4="198.18.9.9", adopt_interface=i
                ),
                timeout=10,
            )
        )
    assert stub.ListEndpoints(pb.ListEndpointsRequest(), timeout=5) == endpoints
    assert _tc_programs(node, a.host_ifname) == veth_programs
    assert [d.interface for d in stub.ListDevices(pb.ListDevicesRequest(), timeout=5).devices] == ["dev0"]
    assert traffic.ping(a.netns, node.create_endpoint("b").ipv4, count=2) == 2


def test_restart_leaves_namespaces_it_did_not_make(make_node: Callable[..., Node], tmp_path: Path) -> None:
    """Only namespaces at the end of this instance's tagged veths are removed: not a user's
    look-alike, not another instance's (whose name starts with this one's)."""
    one = make_node("orchestrator")
    one.create_endpoint("a")
    look_alike, empty = f"{one.name}.mine", f"{one.name}.empty"
    netns.create(look_alike)
    netns.create(empty)
    two = Node(f"{one.name}x", tmp_path / "two")  # its endpoints' namespaces: "<one>x.*"
    try:
        netns.run(look_alike, "ip", "link", "add", "mine0", "type", "veth", "peer", "name", "mine1")
        two.setup()
        two.start("orchestrator")
        two.create_endpoint("c")
        theirs = {n for n in netns.names(one.name) if n.startswith(two.name)}
        assert f"{two.name}.c" in theirs
        one.kill("orchestrator")
        one.start("orchestrator")
        left = set(netns.names(one.name))
        assert {look_alike, empty} <= left
        assert theirs <= left
        assert f"{one.name}.a" in left
        assert "mine0" in netns.run(look_alike, "ip", "-o", "link", "show").stdout
        c = two.orchestrator().GetEndpoint(pb.GetEndpointRequest(name="c"), timeout=5)
        assert traffic.ping(two.outside, c.ipv4, count=2) == 2
    finally:
        two.teardown()
        netns.remove(look_alike)
        netns.remove(empty)


def test_edge_values_are_refused_with_invalid_argument_and_change_nothing(node: Node) -> None:
    """Scoped, link-local and node addresses, names with a trailing newline or NUL, unknown enums."""
    node.create_endpoint("taken", ipv6=False)
    stub = node.orchestrator()
    before = _state(node)
    namespaces = netns.names(node.name)

    def create(name: str = "fresh", ipv4: str = "198.18.9.1", ipv6: str = "", **kw: Any) -> Callable[[], object]:
        return lambda: stub.CreateEndpoint(pb.CreateEndpointRequest(name=name, ipv4=ipv4, ipv6=ipv6, **kw),
                                           timeout=10)  # fmt: skip

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    precondition = grpc.StatusCode.FAILED_PRECONDITION
    cases: list[tuple[str, Callable[[], object], grpc.StatusCode]] = [
        ("trailing newline", create(name="x\n"), invalid),
        ("NUL in name", create(name="a\x00b"), invalid),
        ("scoped IPv6", create(ipv4="", ipv6="fe80::5%eth0"), invalid),
        ("scoped routable IPv6", create(ipv4="", ipv6="2001:db8:e::5%1"), invalid),
        ("link-local IPv4", create(ipv4="169.254.7.7"), invalid),
        ("link-local IPv6", create(ipv4="", ipv6="fe80::5"), invalid),
        ("the gateway", create(ipv4="169.254.1.1"), invalid),
        ("broadcast", create(ipv4="255.255.255.255"), invalid),
        ("reserved", create(ipv4="240.0.0.1"), invalid),
        ("the node's own address", create(ipv4=NODE_NET_V4), precondition),
        ("the node's own IPv6 address", create(ipv4="", ipv6=NODE_NET_V6), precondition),
        ("a neighbour", create(ipv4=OUTSIDE_V4), precondition),
        ("subnet broadcast", create(ipv4="192.0.2.255"), precondition),
        ("subnet network", create(ipv4="192.0.2.0"), precondition),
        ("subnet-router anycast", create(ipv4="", ipv6="2001:db8:ff::"), precondition),
        ("label key with newline", create(labels={"app\n": "x"}), invalid),
        ("label value with newline", create(labels={"app": "x\n"}), invalid),
        ("too many labels", create(labels={f"k{i}": "v" for i in range(65)}), invalid),
        ("adopt NUL", create(adopt_interface="a\x00b"), invalid),
        ("adopt slash", create(adopt_interface="a/b"), invalid),
        ("adopt newline", create(adopt_interface="wnet0\n"), invalid),
        ("get with newline", lambda: stub.GetEndpoint(pb.GetEndpointRequest(name="taken\n"), timeout=5), invalid),
        ("delete with newline", lambda: stub.DeleteEndpoint(pb.DeleteEndpointRequest(name="taken\n"), timeout=5),
         invalid),
        ("device NUL", lambda: stub.AttachDevice(pb.AttachDeviceRequest(interface="wnet0\x00"), timeout=5), invalid),
        ("device too long", lambda: stub.AttachDevice(pb.AttachDeviceRequest(interface="w" * 16), timeout=5),
         invalid),
        ("xdp NUL", lambda: stub.AttachXdp(pb.AttachXdpRequest(interface="a\x00"), timeout=5), invalid),
        ("slot 99", lambda: stub.GetSlot(pb.GetSlotRequest(hook=common_pb2.HOOK_FROM_CONTAINER,
                                                          slot=common_pb2.Slot.ValueType(99)), timeout=5), invalid),
        ("hook 99", lambda: stub.ListSlots(pb.ListSlotsRequest(hook=common_pb2.Hook.ValueType(99)), timeout=5),
         invalid),
        ("NUL in pin path", lambda: stub.SetSlot(pb.SetSlotRequest(
            hook=common_pb2.HOOK_FROM_CONTAINER, slot=common_pb2.SLOT_LB, pin_path="/sys/fs/bpf/a\x00b"), timeout=5),
         invalid),
        ("too many programs", lambda: stub.RegisterPrograms(pb.RegisterProgramsRequest(service="svc", programs=[
            pb.ProgramRegistration(hook=common_pb2.HOOK_FROM_CONTAINER, slot=common_pb2.SLOT_LB, pin_path="/x")
            for _ in range(41)]), timeout=5), invalid),
        ("service with newline", lambda: stub.RegisterPrograms(pb.RegisterProgramsRequest(service="svc\n", programs=[
            pb.ProgramRegistration(hook=common_pb2.HOOK_FROM_CONTAINER, slot=common_pb2.SLOT_LB, pin_path="/x")]),
            timeout=5), invalid),
        ("scoped CIDR", lambda: stub.AllocateCIDRIdentities(pb.AllocateCIDRIdentitiesRequest(
            owner="t", cidrs=["fe80::5%eth0/128"]), timeout=5), invalid),
        ("owner with newline", lambda: stub.AllocateCIDRIdentities(pb.AllocateCIDRIdentitiesRequest(
            owner="t\n", cidrs=["10.0.0.0/8"]), timeout=5), invalid),
    ]  # fmt: skip
    wrong = []
    for what, call, code in cases:
        try:
            call()
            wrong.append(f"{what}: accepted")
        except grpc.RpcError as err:
            if err.code() != code:
                wrong.append(f"{what}: {err.code().name} {err.details()}")
    assert not wrong, wrong
    assert _state(node) == before
    assert netns.names(node.name) == namespaces
