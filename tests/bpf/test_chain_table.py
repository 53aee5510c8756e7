"""LB and policy in one chain: policy judges the backend, replies are reverse-NATed after it.

The contract orders the slots LB (1) before POLICY (2) before LB_REPLY (3), so a
packet to a frontend reaches policy already addressed to its backend, and a
reply is matched by policy's conntrack on the backend's tuple before it gets
the frontend back. Both objects are loaded into one datapath with their
services' map classes:

    10.96.0.10:80/TCP -> 10.0.1.1:8080 (identity 300)
    10.96.0.14:80/TCP -> 10.0.1.9:9090 (identity 301)

The endpoint (10.0.0.10) may send to identity 300 on TCP/8080 only, and
accepts nothing new from anyone (ingress enforced, no entries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Packet

from services.common.datapath import Direction, Hook, Reason
from services.lb.model import Backend, Service
from services.policy import compute
from services.policy.compute import MapEntry
from services.policy.maps import config_flags
from tests.bpf.packets import Row, dnat, eth, params, run_row, snat
from tests.harness.bpfrun import TC_ACT_OK, TC_ACT_SHOT, Datapath, lb_changes

CLIENT, ENDPOINT_ID, ENDPOINT_IDENTITY = "10.0.0.10", 7, 256
VIP, VIP_OTHER = "10.96.0.10", "10.96.0.14"
WEB, OTHER = ("10.0.1.1", 8080), ("10.0.1.9", 9090)
SERVICES = [
    Service("web", False, VIP, 80, "TCP", (Backend(*WEB),)),
    Service("other", False, VIP_OTHER, 80, "TCP", (Backend(*OTHER),)),
]
IPCACHE = {CLIENT + "/32": ENDPOINT_IDENTITY, WEB[0] + "/32": 300, OTHER[0] + "/32": 301}
POLICY = [MapEntry(Direction.EGRESS, 300, compute.TCP, WEB[1], 16, False, ("table",))]
SPORT = 40000

OUT, INTO = Hook.FROM_CONTAINER, Hook.TO_CONTAINER


def to(dst: str, flags: str = "S") -> Packet:
    return eth() / IP(src=CLIENT, dst=dst) / TCP(sport=SPORT, dport=80, flags=flags)


def reply(backend: tuple[str, int]) -> Packet:
    return eth() / IP(src=backend[0], dst=CLIENT) / TCP(sport=backend[1], dport=SPORT, flags="SA")


ROWS = [
    Row(
        "SYN to a frontend whose backend policy allows goes to the backend",
        OUT,
        to(VIP),
        TC_ACT_OK,
        output=dnat(to(VIP), WEB),
    ),
    Row(
        "SYN to a frontend whose backend policy denies drops, already translated",
        OUT,
        to(VIP_OTHER),
        TC_ACT_SHOT,
        Reason.POLICY_DENIED,
        output=dnat(to(VIP_OTHER), OTHER),
    ),
    Row(
        "SYN straight to the allowed backend passes untouched",
        OUT,
        eth() / IP(src=CLIENT, dst=WEB[0]) / TCP(sport=SPORT, dport=WEB[1], flags="S"),
        TC_ACT_OK,
    ),
    Row(
        "the backend's reply passes on conntrack and gets the frontend as its source",
        INTO,
        reply(WEB),
        TC_ACT_OK,
        output=snat(reply(WEB), (VIP, 80)),
        prior=((OUT, to(VIP)),),
    ),
    Row(
        "the backend's reply without a connection drops untouched", INTO, reply(WEB), TC_ACT_SHOT, Reason.POLICY_DENIED
    ),
    Row(
        "a reply from the denied backend drops: its SYN made no connection",
        INTO,
        reply(OTHER),
        TC_ACT_SHOT,
        Reason.POLICY_DENIED,
        prior=((OUT, to(VIP_OTHER)),),
    ),
]


@pytest.fixture(scope="module")
def chain_dp(make_datapath: Callable[[], Datapath], scratch_cgroup: Path) -> Datapath:
    dp = make_datapath()
    dp.load_lb(scratch_cgroup).write(lb_changes(SERVICES))
    policy = dp.load_policy()
    dp.set_ipcache(IPCACHE)
    policy.install(ENDPOINT_ID, POLICY, config_flags(ingress=True, egress=True, audit=False))
    dp.set_endpoint(ENDPOINT_ID, ENDPOINT_IDENTITY)
    return dp


@pytest.fixture
def dp(chain_dp: Datapath) -> Iterator[Datapath]:
    chain_dp.reset()
    yield chain_dp


@pytest.mark.parametrize("row", params(ROWS))
def test_chain(dp: Datapath, row: Row) -> None:
    run_row(dp, row)
