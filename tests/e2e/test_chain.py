"""The chain as the orchestrator owns it: registrations, XDP entry, swaps, missed tail calls, pins."""

from __future__ import annotations

import ctypes
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from weir.common.v1 import common_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as pb
from weir.prefilter.v1 import prefilter_pb2 as pf_pb
from weir.prefilter.v1 import prefilter_pb2_grpc as pf_grpc

from pybpf import BpfObject, Map, ProgArray, Program, XdpMode, attach_xdp, query_xdp
from services.common.bpffs import remove_pins
from services.common.datapath import NUM_SLOTS, EndpointInfo, Hook, Slot
from services.orchestrator.chain import CHAIN_MAPS
from tests.harness import netns, traffic
from tests.harness.node import BPF_BUILD, NET_IFNAME, OUTSIDE_V4, Node
from tests.harness.objects import counted, counter_object

pytestmark = pytest.mark.root

DENIED_V4 = "203.0.113.7"
CALLS_FROM_CONTAINER = "globals/calls_from_container"


def reason_packets(node: Node, reason: str) -> int:
    metrics = node.orchestrator().GetMetrics(pb.GetMetricsRequest(), timeout=5)
    return sum(r.counter.packets for r in metrics.reasons if r.reason == reason)


def slots(node: Node) -> dict[tuple[str, str], pb.SlotState]:
    listed = node.orchestrator().ListSlots(pb.ListSlotsRequest(), timeout=10).slots
    return {(common_pb2.Hook.Name(s.hook), common_pb2.Slot.Name(s.slot)): s for s in listed}


def call_map_snapshot(node: Node) -> dict[str, list[int | None]]:
    """Every index of every call map (program ids), straight from the pins."""
    out = {}
    for name in CHAIN_MAPS:
        with Map.from_pin(node.bpffs_root / "globals" / name) as m:
            if name.startswith("calls_"):
                calls = ProgArray(m)
                out[name] = [calls.get_id(i) for i in range(len(calls))]
            else:
                words = m.typed(ctypes.c_uint32, ctypes.c_uint32)
                out[name] = [int(words[hook.value]) for hook in Hook]
    return out


def set_slot(node: Node, hook: common_pb2.Hook.ValueType, slot: common_pb2.Slot.ValueType, pin: Path) -> pb.SlotState:
    return node.orchestrator().SetSlot(pb.SetSlotRequest(hook=hook, slot=slot, pin_path=str(pin)), timeout=5)


EXPECTED = {
    ("HOOK_XDP", "SLOT_PREFILTER"): ("prefilter", "prefilter_xdp"),
    ("HOOK_FROM_CONTAINER", "SLOT_LB"): ("lb", "lb_from_contain"),
    ("HOOK_FROM_CONTAINER", "SLOT_POLICY"): ("policy", "policy_egress"),
    ("HOOK_TO_CONTAINER", "SLOT_POLICY"): ("policy", "policy_ingress"),
    ("HOOK_TO_CONTAINER", "SLOT_LB_REPLY"): ("lb", "lb_to_container"),
    ("HOOK_FROM_NETWORK", "SLOT_LB"): ("lb", "lb_from_network"),
    ("HOOK_TO_NETWORK", "SLOT_LB_REPLY"): ("lb", "lb_to_network"),
}


def test_services_register_and_never_write_call_maps(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator")
    node.kill("orchestrator")
    before = call_map_snapshot(node)
    # The services start while the orchestrator is down: they load and pin their
    # programs, then wait to register. The call maps must not move meanwhile.
    starters = [
        threading.Thread(target=node.start, args=(s,), kwargs={"timeout": 60}, daemon=True)
        for s in ("prefilter", "policy", "lb")
    ]
    for t in starters:
        t.start()
    time.sleep(4)
    assert all(t.is_alive() for t in starters), "a service became ready without the orchestrator"
    assert call_map_snapshot(node) == before, "a service wrote a call map"
    node.start("orchestrator")
    for t in starters:
        t.join(timeout=60)
    assert all(s in node.services for s in ("prefilter", "policy", "lb"))

    placed = slots(node)
    for key, (service, name) in EXPECTED.items():
        state = placed[key]
        assert state.program_id and state.service == service and state.program_name == name, (key, state)
    registered = {k for k, s in placed.items() if s.program_id}
    assert registered == set(EXPECTED), registered ^ set(EXPECTED)
    single = node.orchestrator().GetSlot(
        pb.GetSlotRequest(hook=common_pb2.HOOK_FROM_CONTAINER, slot=common_pb2.SLOT_POLICY), timeout=5
    )
    assert single == placed[("HOOK_FROM_CONTAINER", "SLOT_POLICY")]
    # Each program sits in the live generation, at generation * NUM_SLOTS + slot.
    with Map.from_pin(node.bpffs_root / CALLS_FROM_CONTAINER) as m:
        assert ProgArray(m).get_id(single.generation * NUM_SLOTS + Slot.POLICY) == single.program_id

    # A restarted service registers its new program; the orchestrator swaps it in.
    node.kill("policy")
    node.start("policy")
    again = slots(node)[("HOOK_FROM_CONTAINER", "SLOT_POLICY")]
    assert again.program_id != single.program_id and again.service == "policy"
    assert again.generation != single.generation


def test_xdp_entry_is_attached_and_the_prefilter_drops_in_its_slot(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator", "prefilter")
    ep = node.create_endpoint("web", ipv6=False)
    prefilter = pf_grpc.PrefilterStub(node.channel("prefilter"))
    attached = prefilter.Attach(pf_pb.AttachRequest(interface=NET_IFNAME), timeout=10)
    with Program.from_pin(node.bpffs_root / "orchestrator" / "entry_xdp") as entry:
        assert attached.program_id == entry.id  # the orchestrator's entry, not the prefilter's program
    listed = node.orchestrator().ListXdp(pb.ListXdpRequest(), timeout=5).attachments
    assert [(a.interface, a.program_id) for a in listed] == [(NET_IFNAME, attached.program_id)]
    state = slots(node)[("HOOK_XDP", "SLOT_PREFILTER")]
    assert state.service == "prefilter" and state.program_name == "prefilter_xdp"

    prefilter.AddEntries(pf_pb.AddEntriesRequest(entries=[pf_pb.Entry(cidr=f"{DENIED_V4}/32")]), timeout=5)
    dropped = reason_packets(node, "PREFILTER_DENIED")
    assert traffic.ping(node.outside, ep.ipv4, count=3, source=DENIED_V4, wait=0.5) == 0
    assert traffic.ping(node.outside, ep.ipv4, count=3, source=OUTSIDE_V4) == 3
    assert reason_packets(node, "PREFILTER_DENIED") - dropped >= 3

    prefilter.Detach(pf_pb.DetachRequest(interface=NET_IFNAME), timeout=10)
    assert not node.orchestrator().ListXdp(pb.ListXdpRequest(), timeout=5).attachments
    assert traffic.ping(node.outside, ep.ipv4, count=2, source=DENIED_V4) == 2  # nothing filters now


def test_someone_elses_xdp_program_is_never_replaced(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator", "prefilter")
    prefilter = pf_grpc.PrefilterStub(node.channel("prefilter"))
    with counter_object(node, "foreign") as obj, netns.entered(node.ns):
        attachment = attach_xdp(socket.if_nametoindex(NET_IFNAME), obj.programs["count_xdp"], XdpMode.GENERIC)
        try:
            with pytest.raises(grpc.RpcError) as err:
                prefilter.Attach(pf_pb.AttachRequest(interface=NET_IFNAME), timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert str(attachment.program_id) in (err.value.details() or "")
            assert query_xdp(socket.if_nametoindex(NET_IFNAME)).get(XdpMode.GENERIC) == attachment.program_id
        finally:
            attachment.close()
    assert not prefilter.ListAttachments(pf_pb.ListAttachmentsRequest(), timeout=5).attachments


def test_chain_swap_under_traffic_loses_nothing_and_misses_no_tail_call(node: Node) -> None:
    a = node.create_endpoint("a", ipv6=False)
    b = node.create_endpoint("b", ipv6=False)
    with counter_object(node, "one") as one, counter_object(node, "two") as two, counter_object(node, "three") as three:
        set_slot(
            node, common_pb2.HOOK_FROM_CONTAINER, common_pb2.SLOT_LB, node.bpffs_root / "test/one/count_from_container"
        )
        set_slot(
            node,
            common_pb2.HOOK_FROM_CONTAINER,
            common_pb2.SLOT_CUSTOM1,
            node.bpffs_root / "test/two/count_from_container",
        )
        set_slot(
            node,
            common_pb2.HOOK_TO_CONTAINER,
            common_pb2.SLOT_POLICY,
            node.bpffs_root / "test/three/count_to_container",
        )
        missed = reason_packets(node, "MISSED_TAIL_CALL")
        stream = traffic.CountedStream(a.netns, b.netns, b.ipv4, 9100, rate=2000).start()
        time.sleep(0.3)
        generations = []
        for _ in range(40):
            swapped = node.orchestrator().SwapChain(pb.SwapChainRequest(), timeout=10)
            generations.append(list(swapped.generations))
            time.sleep(0.01)
        time.sleep(0.3)
        result = stream.finish()
        missed_after = reason_packets(node, "MISSED_TAIL_CALL")
        print(
            f"chain swap under traffic: sent {result.sent}, lost {len(result.missing)}, "
            f"missed tail calls {missed_after - missed}, swaps {len(generations)} x {len(Hook)} hooks"
        )
        assert result.sent > 500
        assert result.missing == [], f"{len(result.missing)} of {result.sent} datagrams lost"
        assert missed_after - missed == 0
        assert {g[0] for g in generations} == {0, 1}  # the swaps really alternated generations
        # Every datagram went through both objects of from-container and the one of to-container.
        for obj, hook in ((one, Hook.FROM_CONTAINER), (two, Hook.FROM_CONTAINER), (three, Hook.TO_CONTAINER)):
            assert counted(obj, hook) >= result.sent


def test_a_program_removed_under_the_chain_counts_missed_tail_calls(node: Node) -> None:
    a = node.create_endpoint("a", ipv6=False)
    b = node.create_endpoint("b", ipv6=False)
    with counter_object(node, "c") as obj:
        state = set_slot(
            node,
            common_pb2.HOOK_FROM_CONTAINER,
            common_pb2.SLOT_CUSTOM0,
            node.bpffs_root / "test/c/count_from_container",
        )
        assert traffic.ping(a.netns, b.ipv4, count=2) == 2
        missed = reason_packets(node, "MISSED_TAIL_CALL")
        # Someone empties the slot behind the orchestrator's back.
        with Map.from_pin(node.bpffs_root / CALLS_FROM_CONTAINER) as m:
            assert ProgArray(m).clear(state.generation * NUM_SLOTS + Slot.CUSTOM0)
        seen = counted(obj, Hook.FROM_CONTAINER)
        assert traffic.ping(a.netns, b.ipv4, count=3, wait=0.5) == 0  # fails closed: never skips a slot
        assert reason_packets(node, "MISSED_TAIL_CALL") - missed >= 3
        assert counted(obj, Hook.FROM_CONTAINER) == seen
        # A swap re-places every registered program.
        node.orchestrator().SwapChain(pb.SwapChainRequest(hook=common_pb2.HOOK_FROM_CONTAINER), timeout=10)
        assert traffic.ping(a.netns, b.ipv4, count=2) == 2
        assert counted(obj, Hook.FROM_CONTAINER) >= seen + 2


def test_a_removed_call_map_pin_comes_back_on_use_and_after_restart(node: Node) -> None:
    a = node.create_endpoint("a", ipv6=False)
    b = node.create_endpoint("b", ipv6=False)
    pin = node.bpffs_root / CALLS_FROM_CONTAINER
    with Map.from_pin(pin) as m:
        map_id = m.id
    with counter_object(node, "c") as obj:
        set_slot(
            node,
            common_pb2.HOOK_FROM_CONTAINER,
            common_pb2.SLOT_CUSTOM0,
            node.bpffs_root / "test/c/count_from_container",
        )
        pin.unlink()
        listed = slots(node)  # on use
        assert pin.exists()
        with Map.from_pin(pin) as m:
            assert m.id == map_id  # the same map every program uses, not a fresh one
        assert listed[("HOOK_FROM_CONTAINER", "SLOT_CUSTOM0")].program_id

        node.kill("orchestrator")
        pin.unlink()
        (node.bpffs_root / "globals" / "chain_state").unlink()
        node.start("orchestrator")  # at start
        assert pin.exists() and (node.bpffs_root / "globals" / "chain_state").exists()
        with Map.from_pin(pin) as m:
            assert m.id == map_id
        state = slots(node)[("HOOK_FROM_CONTAINER", "SLOT_CUSTOM0")]
        assert state.program_id and state.service == "operator"  # rebuilt from the store
        seen = counted(obj, Hook.FROM_CONTAINER)
        assert traffic.ping(a.netns, b.ipv4, count=3) == 3
        assert counted(obj, Hook.FROM_CONTAINER) >= seen + 3
        assert reason_packets(node, "MISSED_TAIL_CALL") == 0


def test_bad_registrations_are_refused_and_change_nothing(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator", "policy")
    stub = node.orchestrator()
    before = slots(node)
    policy_pin = str(node.bpffs_root / "policy" / "policy_egress")
    xdp_pin = str(node.bpffs_root / "orchestrator" / "entry_xdp")

    def register(service: str, hook: common_pb2.Hook.ValueType, slot: common_pb2.Slot.ValueType, pin: str) -> object:
        return stub.RegisterPrograms(
            pb.RegisterProgramsRequest(
                service=service, programs=[pb.ProgramRegistration(hook=hook, slot=slot, pin_path=pin)]
            ),
            timeout=5,
        )

    cases: list[tuple[str, Callable[[], object], grpc.StatusCode, str]] = [
        (
            "slot held by another service",
            lambda: register("lb", common_pb2.HOOK_FROM_CONTAINER, common_pb2.SLOT_POLICY, policy_pin),
            grpc.StatusCode.FAILED_PRECONDITION,
            "policy",
        ),
        (
            "wrong program type",
            lambda: register("lb", common_pb2.HOOK_FROM_CONTAINER, common_pb2.SLOT_LB, xdp_pin),
            grpc.StatusCode.INVALID_ARGUMENT,
            "XDP",
        ),
        (
            "tc program in the XDP hook",
            lambda: register("lb", common_pb2.HOOK_XDP, common_pb2.SLOT_LB, policy_pin),
            grpc.StatusCode.INVALID_ARGUMENT,
            "SCHED_CLS",
        ),
        (
            "no service",
            lambda: register("", common_pb2.HOOK_FROM_CONTAINER, common_pb2.SLOT_LB, policy_pin),
            grpc.StatusCode.INVALID_ARGUMENT,
            "service",
        ),
        (
            "missing pin",
            lambda: register("lb", common_pb2.HOOK_FROM_CONTAINER, common_pb2.SLOT_LB, "/sys/fs/bpf/nothing-here"),
            grpc.StatusCode.NOT_FOUND,
            "nothing-here",
        ),
        (
            "slot unspecified",
            lambda: register("lb", common_pb2.HOOK_FROM_CONTAINER, common_pb2.SLOT_UNSPECIFIED, policy_pin),
            grpc.StatusCode.INVALID_ARGUMENT,
            "slot",
        ),
        (
            "unknown interface",
            lambda: stub.AttachXdp(pb.AttachXdpRequest(interface="nope0"), timeout=5),
            grpc.StatusCode.NOT_FOUND,
            "nope0",
        ),
    ]
    for what, call, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code, f"{what}: {err.value.code()} {err.value.details()}"
        assert text in (err.value.details() or ""), f"{what}: {err.value.details()}"
    after = slots(node)
    assert {k: (s.program_id, s.service) for k, s in after.items()} == {
        k: (s.program_id, s.service) for k, s in before.items()
    }


def test_a_to_container_drop_names_the_destination_identity(node: Node) -> None:
    a = node.create_endpoint("a", ipv6=False)
    b = node.create_endpoint("b", ipv6=False)
    identity = 4242
    with Map.from_pin(
        node.bpffs_root / "globals/endpoints", key_type=ctypes.c_uint32, value_type=EndpointInfo
    ) as endpoints:
        info = endpoints[b.host_ifindex]
        endpoints[b.host_ifindex] = EndpointInfo(info.id, identity, info.flags, 0)
    with counter_object(node, "c"):
        state = set_slot(
            node, common_pb2.HOOK_TO_CONTAINER, common_pb2.SLOT_CUSTOM0, node.bpffs_root / "test/c/count_to_container"
        )
        with Map.from_pin(node.bpffs_root / "globals/calls_to_container") as m:
            ProgArray(m).clear(state.generation * NUM_SLOTS + Slot.CUSTOM0)
        events = node.orchestrator().WatchEvents(pb.WatchEventsRequest(types=["DROP"]), timeout=20)
        time.sleep(0.3)
        assert traffic.ping(a.netns, b.ipv4, count=1, wait=0.5) == 0
        drop = next(e for e in events if e.dst == b.ipv4)
        events.cancel()
    assert (drop.reason, drop.hook, drop.dst_identity) == ("MISSED_TAIL_CALL", common_pb2.HOOK_TO_CONTAINER, identity)


def test_a_program_loaded_against_another_call_map_is_refused(node: Node) -> None:
    """A program that would hand packets to a call map the orchestrator does not fill."""
    elsewhere = node.bpffs_root / "elsewhere"
    elsewhere.mkdir()
    try:
        obj = BpfObject.open(BPF_BUILD / "counter.o", pin_root=elsewhere)  # its own call maps
        obj.load()
        with obj:
            obj.programs["count_from_container"].pin(elsewhere / "prog")
            with pytest.raises(grpc.RpcError) as err:
                set_slot(node, common_pb2.HOOK_FROM_CONTAINER, common_pb2.SLOT_CUSTOM0, elsewhere / "prog")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "calls_from_cont" in (err.value.details() or "")
        assert not slots(node)[("HOOK_FROM_CONTAINER", "SLOT_CUSTOM0")].program_id
    finally:
        remove_pins(elsewhere)
