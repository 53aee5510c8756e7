"""The L7 redirect's verdicts, packet by packet, through the from- and to-container chains.

One endpoint (id 7, identity 256) at the device test_run uses; its policy sends TCP/80 in
both directions to proxy port 15001 and allows TCP/8081 from the peer (300) only. The
packet's mark is set through the __sk_buff context, as Envoy's SO_MARK sets it on the
proxy's upstream. test_run cannot assign sockets (no TC ingress there), so these rows pin
the decisions around it: what goes to the proxy, what drops when no proxy can take it, how
the proxy's own upstream marks are judged. The e2e tests show the assignment itself.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet

from services.common.datapath import MARK_IDENTITY_SHIFT, Direction, Hook, Reason, XfrmMark
from services.orchestrator.chain import ENTRY_PROGRAMS
from services.policy import compute
from services.policy.compute import MapEntry
from services.policy.maps import HAIRPIN_PROGRAM, config_flags
from services.policy.policy import egress_proxy_mark
from tests.bpf.packets import eth
from tests.harness.bpfrun import LOOPBACK_IFINDEX, TC_ACT_OK, TC_ACT_SHOT, Datapath

ENDPOINT_ID, ENDPOINT_IDENTITY, PEER_IDENTITY = 7, 256, 300
BIG_IDENTITY = 0x12345  # above 16 bits: needs the mark's low byte too
EP4, PEER4, WORLD4, BIG4 = "10.0.0.10", "10.0.0.20", "192.0.2.50", "203.0.113.9"
EP6, PEER6 = "fd00::10", "fd00::20"
PROXY_PORT = 15001
TC_ACT_REDIRECT = 7
IPCACHE = {EP4 + "/32": ENDPOINT_IDENTITY, PEER4 + "/32": PEER_IDENTITY, EP6 + "/128": ENDPOINT_IDENTITY,
           PEER6 + "/128": PEER_IDENTITY, BIG4 + "/32": BIG_IDENTITY}  # fmt: skip
EG, IN = Direction.EGRESS, Direction.INGRESS
POLICY = [
    MapEntry(EG, 0, compute.TCP, 80, 16, False, ("t",), True, PROXY_PORT),
    MapEntry(IN, 0, compute.TCP, 80, 16, False, ("t",), True, PROXY_PORT),
    MapEntry(IN, PEER_IDENTITY, compute.TCP, 8081, 16, False, ("t",)),
    MapEntry(IN, BIG_IDENTITY, compute.TCP, 8082, 16, False, ("t",)),
]


class SkBuff(ctypes.Structure):
    """struct __sk_buff (192 bytes on 5.x-6.x kernels): its head up to cb[] named, the rest zero.

    test_run takes mark (and cb) from the context and writes the whole struct back.
    """

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
        ("rest", ctypes.c_uint8 * (192 - 17 * 4)),
    ]


@pytest.fixture(scope="module")
def l7_dp(make_datapath: Callable[[], Datapath]) -> Datapath:
    dp = make_datapath()
    maps = dp.load_policy()
    dp.set_ipcache(IPCACHE)
    maps.install(ENDPOINT_ID, POLICY, config_flags(ingress=True, egress=True, audit=False))
    dp.set_endpoint(ENDPOINT_ID, ENDPOINT_IDENTITY)
    return dp


@pytest.fixture
def dp(l7_dp: Datapath) -> Iterator[Datapath]:
    l7_dp.reset()
    hairpin(l7_dp, 0)
    yield l7_dp


def hairpin(dp: Datapath, ifindex: int) -> None:
    assert dp.policy is not None
    dp.policy.maps["l7_hairpin"].typed(ctypes.c_uint32, ctypes.c_uint32).update(0, ifindex)


def run(dp: Datapath, hook: Hook, packet: Packet, mark: int = 0) -> tuple[int, int, dict[Reason, int]]:
    """(verdict, mark after, drops by reason) of one packet through a hook's entry program."""
    before = dp.counted()
    result = dp._entry().programs[ENTRY_PROGRAMS[hook]].test_run(bytes(packet), ctx=SkBuff(mark=mark))
    after = dp.counted()
    counted: dict[Reason, int] = {
        r: n - before.get(r, 0) for r, n in after.items() if n != before.get(r, 0) and r != Reason.FORWARDED
    }
    return result.retval, int(result.ctx_out.mark), counted


def syn(src: str, dst: str, dport: int) -> Packet:
    return eth() / IP(src=src, dst=dst) / TCP(sport=40000, dport=dport, flags="S")


UNAVAILABLE = {Reason.PROXY_UNAVAILABLE: 1}


def test_egress_l7_port_without_a_proxy_listener_drops_never_passes(dp: Datapath) -> None:
    assert run(dp, Hook.FROM_CONTAINER, syn(EP4, WORLD4, 80)) == (TC_ACT_SHOT, 0, UNAVAILABLE)


def test_egress_port_without_l7_is_not_touched(dp: Datapath) -> None:
    verdict, mark, drops = run(dp, Hook.FROM_CONTAINER, syn(EP4, WORLD4, 81))
    assert (verdict, mark) == (TC_ACT_SHOT, 0) and Reason.POLICY_DENIED in drops  # no rule, no proxy either


def test_ingress_l7_port_without_the_hairpin_device_drops(dp: Datapath) -> None:
    assert run(dp, Hook.TO_CONTAINER, syn(PEER4, EP4, 80)) == (TC_ACT_SHOT, 0, UNAVAILABLE)


def test_ingress_l7_port_hairpins_with_the_proxy_port_in_the_mark(dp: Datapath) -> None:
    hairpin(dp, LOOPBACK_IFINDEX)
    verdict, mark, drops = run(dp, Hook.TO_CONTAINER, syn(PEER4, EP4, 80))
    assert (verdict, drops) == (TC_ACT_REDIRECT, {})
    assert mark == PROXY_PORT << MARK_IDENTITY_SHIFT | XfrmMark.L7_PROXY


def test_ingress_proxy_upstream_passes_without_going_back_to_the_proxy(dp: Datapath) -> None:
    hairpin(dp, LOOPBACK_IFINDEX)
    verdict, mark, drops = run(dp, Hook.TO_CONTAINER, syn(WORLD4, EP4, 80), mark=XfrmMark.L7_FROM_INGRESS_PROXY)
    assert (verdict, mark, drops) == (TC_ACT_OK, XfrmMark.L7_FROM_INGRESS_PROXY, {})


def test_egress_proxy_upstream_is_judged_as_the_identity_in_its_mark(dp: Datapath) -> None:
    as_peer = egress_proxy_mark(PEER_IDENTITY)
    assert run(dp, Hook.TO_CONTAINER, syn(WORLD4, EP4, 8081), mark=as_peer)[0] == TC_ACT_OK
    dp.reset()
    verdict, _, drops = run(dp, Hook.TO_CONTAINER, syn(WORLD4, EP4, 8081))
    assert verdict == TC_ACT_SHOT and Reason.POLICY_DENIED in drops
    dp.reset()
    other = egress_proxy_mark(ENDPOINT_IDENTITY)
    assert run(dp, Hook.TO_CONTAINER, syn(PEER4, EP4, 8081), mark=other)[0] == TC_ACT_SHOT
    dp.reset()
    # Identities above 16 bits survive the mark (low 16 bits above the field, the next 8 below it).
    assert run(dp, Hook.TO_CONTAINER, syn(WORLD4, EP4, 8082), mark=egress_proxy_mark(BIG_IDENTITY))[0] == TC_ACT_OK


def test_ipv6_flow_of_an_l7_port_drops(dp: Datapath) -> None:
    hairpin(dp, LOOPBACK_IFINDEX)
    packet = eth() / IPv6(src=PEER6, dst=EP6) / TCP(sport=40000, dport=80, flags="S")
    assert run(dp, Hook.TO_CONTAINER, packet) == (TC_ACT_SHOT, 0, UNAVAILABLE)


def test_hairpin_device_drops_what_is_not_for_the_proxy(dp: Datapath) -> None:
    assert dp.policy is not None
    program = dp.policy.programs[HAIRPIN_PROGRAM]
    plain = program.test_run(bytes(syn(PEER4, EP4, 80)), ctx=SkBuff())
    assert plain.retval == TC_ACT_SHOT
    marked = program.test_run(
        bytes(syn(PEER4, EP4, 80)), ctx=SkBuff(mark=PROXY_PORT << MARK_IDENTITY_SHIFT | XfrmMark.L7_PROXY)
    )
    assert marked.retval == TC_ACT_SHOT  # no listener on the proxy port here
    assert dp.counted().get(Reason.PROXY_UNAVAILABLE) == 2
