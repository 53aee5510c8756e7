"""Endpoint policy's verdicts, packet by packet, through the from- and to-container chains.

One endpoint (id 7, identity 256) sits at the device test_run uses, so
`entry_from_container` runs its egress policy and `entry_to_container` its
ingress policy, with policy_egress / policy_ingress in the POLICY slot. Its
policy map and the ipcache are written with the service's PolicyMaps:

    egress   peer (300): TCP/80           any identity: TCP/443, UDP/53, ICMP echo, ICMPv6 echo
             other (301): everything, but a deny rule on TCP/80
    ingress  peer (300): everything, but a deny rule on TCP/22
             any identity: TCP/8080

Every row starts with empty conntrack; rows about replies send the request first.

test_run builds no skb for an IP frame shorter than its fixed IP header (EINVAL),
so those truncations are rows that expect the refusal; the prefilter's XDP
table runs them through a program.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6MLReport2,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet

from services.common.datapath import Direction, Hook, Reason
from services.policy import compute
from services.policy.compute import ANY, MapEntry
from services.policy.defs import PREFIX_FULL, EndpointPolicyConfig
from services.policy.maps import config_flags
from tests.bpf.packets import Row, cut, eth, params, run_row
from tests.harness.bpfrun import TC_ACT_OK, TC_ACT_SHOT, Datapath

ENDPOINT_ID, ENDPOINT_IDENTITY = 7, 256
PEER_IDENTITY, OTHER_IDENTITY = 300, 301
EP4, PEER4, OTHER4, WORLD4 = "10.0.0.10", "10.0.0.20", "10.0.0.30", "192.0.2.50"
EP6, PEER6, OTHER6, WORLD6 = "fd00::10", "fd00::20", "fd00::30", "2001:db8::50"
IPCACHE = {
    EP4 + "/32": ENDPOINT_IDENTITY, EP6 + "/128": ENDPOINT_IDENTITY,
    PEER4 + "/32": PEER_IDENTITY, PEER6 + "/128": PEER_IDENTITY,
    OTHER4 + "/32": OTHER_IDENTITY, OTHER6 + "/128": OTHER_IDENTITY,
}  # fmt: skip


def entry(direction: Direction, identity: int, proto: int = ANY, port: int = 0, deny: bool = False) -> MapEntry:
    return MapEntry(direction, identity, proto, port, 16 if proto != ANY else 0, deny, ("table",))


EG, IN = Direction.EGRESS, Direction.INGRESS
POLICY = [
    entry(EG, PEER_IDENTITY, compute.TCP, 80),
    entry(EG, 0, compute.TCP, 443),
    entry(EG, 0, compute.UDP, 53),
    entry(EG, 0, compute.ICMP, 8),
    entry(EG, 0, compute.ICMPV6, 128),
    entry(EG, OTHER_IDENTITY),
    entry(EG, OTHER_IDENTITY, compute.TCP, 80, deny=True),
    entry(IN, PEER_IDENTITY),
    entry(IN, PEER_IDENTITY, compute.TCP, 22, deny=True),
    entry(IN, 0, compute.TCP, 8080),
]
SETUPS = {
    "": config_flags(ingress=True, egress=True, audit=False),
    "audit": config_flags(ingress=True, egress=True, audit=True),
    "egress only": config_flags(ingress=False, egress=True, audit=False),
    "unenforced": 0,
    "no endpoint": 0,
}

OUT, INTO = Hook.FROM_CONTAINER, Hook.TO_CONTAINER
OK, SHOT = TC_ACT_OK, TC_ACT_SHOT
DENIED, DENY_RULE, AUDIT = Reason.POLICY_DENIED, Reason.POLICY_DENY_RULE, Reason.POLICY_AUDIT


def out4(dst: str, l4: Packet) -> Packet:
    return eth() / IP(src=EP4, dst=dst) / l4


def in4(src: str, l4: Packet) -> Packet:
    return eth() / IP(src=src, dst=EP4) / l4


def out6(dst: str, l4: Packet) -> Packet:
    return eth() / IPv6(src=EP6, dst=dst) / l4


def in6(src: str, l4: Packet) -> Packet:
    return eth() / IPv6(src=src, dst=EP6) / l4


def syn(dport: int, sport: int = 40000) -> Packet:
    return TCP(sport=sport, dport=dport, flags="S")


def synack(sport: int, dport: int = 40000) -> Packet:
    return TCP(sport=sport, dport=dport, flags="SA")


ROWS = [
    # ---- IPv4 egress ----
    Row("v4 TCP SYN to the peer's allowed port passes", OUT, out4(PEER4, syn(80)), OK),
    Row("v4 TCP SYN to another port of the peer drops", OUT, out4(PEER4, syn(81)), SHOT, DENIED),
    Row("v4 TCP to any identity's allowed port passes", OUT, out4(WORLD4, syn(443)), OK),
    Row("v4 TCP to the world on a port allowed only to the peer drops", OUT, out4(WORLD4, syn(80)), SHOT, DENIED),
    Row(
        "v4 TCP to a denied port of an allowed identity drops on the deny rule",
        OUT,
        out4(OTHER4, syn(80)),
        SHOT,
        DENY_RULE,
    ),
    Row("v4 TCP to another port of that identity passes", OUT, out4(OTHER4, syn(81)), OK),
    Row("v4 UDP to an allowed port passes", OUT, out4(WORLD4, UDP(sport=5000, dport=53)), OK),
    Row("v4 UDP to another port drops", OUT, out4(PEER4, UDP(sport=5000, dport=54)), SHOT, DENIED),
    Row("v4 ICMP echo request passes", OUT, out4(WORLD4, ICMP(type=8, id=0x77)), OK),
    Row("v4 ICMP timestamp request drops", OUT, out4(WORLD4, ICMP(type=13)), SHOT, DENIED),
    Row("v4 unsolicited ICMP echo reply drops", OUT, out4(PEER4, ICMP(type=0, id=0x77)), SHOT, DENIED),
    Row(
        "v4 GRE to an identity allowed every protocol passes",
        OUT,
        eth() / IP(src=EP4, dst=OTHER4, proto=47) / bytes(24),
        OK,
    ),
    Row(
        "v4 GRE to an identity allowed only TCP/80 drops",
        OUT,
        eth() / IP(src=EP4, dst=PEER4, proto=47) / bytes(24),
        SHOT,
        DENIED,
    ),
    Row(
        "v4 with 40 bytes of options: the port behind them is judged (allowed)",
        OUT,
        eth() / IP(src=EP4, dst=PEER4, options=b"\x01" * 40) / syn(80),
        OK,
    ),
    Row(
        "v4 with 40 bytes of options: the port behind them is judged (denied)",
        OUT,
        eth() / IP(src=EP4, dst=PEER4, options=b"\x01" * 40) / syn(81),
        SHOT,
        DENIED,
    ),
    # ---- IPv4 ingress ----
    Row("v4 TCP from the peer to any port passes", INTO, in4(PEER4, syn(9000)), OK),
    Row("v4 TCP from the peer to its denied port drops on the deny rule", INTO, in4(PEER4, syn(22)), SHOT, DENY_RULE),
    Row("v4 UDP from the peer passes", INTO, in4(PEER4, UDP(dport=9000)), OK),
    Row("v4 TCP from the world drops", INTO, in4(WORLD4, syn(80)), SHOT, DENIED),
    Row("v4 TCP from the world to the port allowed to any identity passes", INTO, in4(WORLD4, syn(8080)), OK),
    Row("v4 ICMP echo request from the world drops", INTO, in4(WORLD4, ICMP(type=8)), SHOT, DENIED),
    # ---- IPv4 replies on conntrack ----
    Row(
        "v4 TCP reply from the world passes after the endpoint's SYN",
        INTO,
        in4(WORLD4, synack(443)),
        OK,
        prior=((OUT, out4(WORLD4, syn(443))),),
    ),
    Row("v4 TCP reply from the world without a SYN drops", INTO, in4(WORLD4, synack(443)), SHOT, DENIED),
    Row(
        "v4 UDP reply passes after the request",
        INTO,
        in4(WORLD4, UDP(sport=53, dport=5000)),
        OK,
        prior=((OUT, out4(WORLD4, UDP(sport=5000, dport=53))),),
    ),
    Row(
        "v4 ICMP echo reply passes after the request",
        INTO,
        in4(WORLD4, ICMP(type=0, id=0x77)),
        OK,
        prior=((OUT, out4(WORLD4, ICMP(type=8, id=0x77))),),
    ),
    Row(
        "v4 ICMP echo reply with another id drops",
        INTO,
        in4(WORLD4, ICMP(type=0, id=0x78)),
        SHOT,
        DENIED,
        prior=((OUT, out4(WORLD4, ICMP(type=8, id=0x77))),),
    ),
    Row(
        "v4 TCP reply from the world drops when the endpoint's SYN was denied",
        INTO,
        in4(WORLD4, synack(80)),
        SHOT,
        DENIED,
        prior=((OUT, out4(WORLD4, syn(80))),),
    ),
    # ---- IPv6 egress ----
    Row("v6 TCP SYN to the peer's allowed port passes", OUT, out6(PEER6, syn(80)), OK),
    Row("v6 TCP SYN to another port of the peer drops", OUT, out6(PEER6, syn(81)), SHOT, DENIED),
    Row("v6 TCP to any identity's allowed port passes", OUT, out6(WORLD6, syn(443)), OK),
    Row(
        "v6 TCP to a denied port of an allowed identity drops on the deny rule",
        OUT,
        out6(OTHER6, syn(80)),
        SHOT,
        DENY_RULE,
    ),
    Row("v6 UDP to an allowed port passes", OUT, out6(WORLD6, UDP(dport=53)), OK),
    Row("v6 UDP to another port drops", OUT, out6(WORLD6, UDP(dport=54)), SHOT, DENIED),
    Row("v6 ICMPv6 echo request passes", OUT, out6(WORLD6, ICMPv6EchoRequest(id=0x66)), OK),
    Row("v6 unsolicited ICMPv6 echo reply drops", OUT, out6(PEER6, ICMPv6EchoReply(id=0x66)), SHOT, DENIED),
    Row(
        "v6 neighbour solicitation passes without a rule",
        OUT,
        eth() / IPv6(src=EP6, dst="ff02::1:ff00:20") / ICMPv6ND_NS(tgt=PEER6),
        OK,
    ),
    # ---- IPv6 ingress ----
    Row("v6 TCP from the peer to any port passes", INTO, in6(PEER6, syn(9000)), OK),
    Row("v6 TCP from the peer to its denied port drops on the deny rule", INTO, in6(PEER6, syn(22)), SHOT, DENY_RULE),
    Row("v6 TCP from the world drops", INTO, in6(WORLD6, syn(80)), SHOT, DENIED),
    Row("v6 TCP from the world to the port allowed to any identity passes", INTO, in6(WORLD6, syn(8080)), OK),
    Row("v6 ICMPv6 echo request from the world drops", INTO, in6(WORLD6, ICMPv6EchoRequest()), SHOT, DENIED),
    Row(
        "v6 neighbour solicitation from the world passes",
        INTO,
        eth() / IPv6(src="fe80::1", dst="ff02::1:ff00:10") / ICMPv6ND_NS(tgt=EP6),
        OK,
    ),
    Row(
        "v6 neighbour advertisement from the world passes",
        INTO,
        eth() / IPv6(src="fe80::1", dst=EP6) / ICMPv6ND_NA(tgt="fe80::1"),
        OK,
    ),
    Row("v6 router advertisement passes", INTO, eth() / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6ND_RA(), OK),
    Row(
        "v6 MLD report to a link-local group passes",
        OUT,
        eth() / IPv6(src="fe80::10", dst="ff02::16") / ICMPv6MLReport2(),
        OK,
    ),
    Row(
        "v6 TCP reply from the world passes after the endpoint's SYN",
        INTO,
        in6(WORLD6, synack(443)),
        OK,
        prior=((OUT, out6(WORLD6, syn(443))),),
    ),
    Row(
        "v6 ICMPv6 echo reply passes after the request",
        INTO,
        in6(WORLD6, ICMPv6EchoReply(id=0x66)),
        OK,
        prior=((OUT, out6(WORLD6, ICMPv6EchoRequest(id=0x66))),),
    ),
    # ---- IPv6 extension headers and fragments (the parser rework) ----
    Row(
        "v6 SYN to the denied port behind Destination Options drops on the deny rule",
        INTO,
        in6(PEER6, IPv6ExtHdrDestOpt() / syn(22)),
        SHOT,
        DENY_RULE,
    ),
    Row(
        "v6 SYN to the allowed port behind Hop-by-Hop options passes",
        OUT,
        out6(PEER6, IPv6ExtHdrHopByHop() / syn(80)),
        OK,
    ),
    Row(
        "v6 first fragment of an allowed UDP datagram passes",
        OUT,
        out6(WORLD6, IPv6ExtHdrFragment(id=78, m=1, offset=0) / UDP(sport=5000, dport=53) / bytes(32)),
        OK,
    ),
    Row(
        "v4 later fragment of an allowed UDP datagram passes",
        OUT,
        eth() / IP(src=EP4, dst=WORLD4, id=77, frag=5, proto=17) / bytes(24),
        OK,
        prior=((OUT, eth() / IP(src=EP4, dst=WORLD4, id=77, flags="MF") / UDP(sport=5000, dport=53) / bytes(32)),),
    ),
    Row(
        "v4 later fragment of a denied UDP datagram drops",
        OUT,
        eth() / IP(src=EP4, dst=WORLD4, id=79, frag=5, proto=17) / bytes(24),
        SHOT,
        DENIED,
        prior=((OUT, eth() / IP(src=EP4, dst=WORLD4, id=79, flags="MF") / UDP(sport=5000, dport=54) / bytes(32)),),
    ),
    # ---- audit, partial and no enforcement ----
    Row("audit: v4 TCP to a port no rule allows passes, audited", OUT, out4(PEER4, syn(81)), OK, AUDIT, setup="audit"),
    Row("audit: v4 TCP on a deny rule passes, audited", OUT, out4(OTHER4, syn(80)), OK, AUDIT, setup="audit"),
    Row("audit: v4 TCP to an allowed port passes, not audited", OUT, out4(PEER4, syn(80)), OK, setup="audit"),
    Row("audit: v6 TCP from the world passes, audited", INTO, in6(WORLD6, syn(80)), OK, AUDIT, setup="audit"),
    Row("egress only: v4 TCP from the world passes", INTO, in4(WORLD4, syn(80)), OK, setup="egress only"),
    Row(
        "egress only: v4 TCP to a port no rule allows drops",
        OUT,
        out4(PEER4, syn(81)),
        SHOT,
        DENIED,
        setup="egress only",
    ),
    Row("unenforced: v4 TCP to a port no rule allows passes", OUT, out4(PEER4, syn(81)), OK, setup="unenforced"),
    Row("unenforced: v6 TCP from the world passes", INTO, in6(WORLD6, syn(80)), OK, setup="unenforced"),
    Row(
        "no endpoint at the device: v4 TCP drops",
        OUT,
        out4(PEER4, syn(81)),
        SHOT,
        Reason.UNKNOWN_ENDPOINT,
        setup="no endpoint",
    ),
    # ---- not IP ----
    Row(
        "ARP passes an enforced endpoint (egress)",
        OUT,
        Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=EP4, pdst=PEER4),
        OK,
    ),
    Row(
        "ARP passes an enforced endpoint (ingress)",
        INTO,
        Ether(src="02:00:00:00:00:02", dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=WORLD4, pdst=EP4),
        OK,
    ),
    Row("LLDP passes", INTO, Ether(dst="01:80:c2:00:00:0e", type=0x88CC) / bytes(32), OK),
    # ---- malformed and truncated ----
    Row("Ethernet header cut short is refused by test_run", OUT, cut(out4(PEER4, syn(81)), 10), None, None),
    Row("v4 header cut short is refused by test_run", OUT, cut(out4(PEER4, syn(81)), 14 + 16), None, None),
    Row("v6 header cut short is refused by test_run", INTO, cut(in6(WORLD6, syn(80)), 14 + 30), None, None),
    Row(
        "v4 ihl below 5 drops as invalid",
        OUT,
        eth() / IP(src=EP4, dst=PEER4, ihl=4) / syn(81),
        SHOT,
        Reason.INVALID_PACKET,
    ),
    Row(
        "v4 ihl past the end drops as invalid",
        OUT,
        eth() / IP(src=EP4, dst=PEER4, ihl=15) / syn(81),
        SHOT,
        Reason.INVALID_PACKET,
    ),
    Row("v4 TCP cut short drops as invalid", OUT, cut(out4(PEER4, syn(81)), 14 + 20 + 10), SHOT, Reason.CT_INVALID),
    Row(
        "v4 TCP data offset past the end drops as invalid",
        OUT,
        out4(PEER4, TCP(dport=81, flags="S", dataofs=15)),
        SHOT,
        Reason.CT_INVALID,
    ),
    Row(
        "v4 TCP data offset below 5 drops as invalid",
        INTO,
        in4(WORLD4, TCP(dport=80, flags="S", dataofs=4)),
        SHOT,
        Reason.CT_INVALID,
    ),
    Row(
        "v4 UDP cut short drops as invalid", OUT, cut(out4(PEER4, UDP(dport=54)), 14 + 20 + 4), SHOT, Reason.CT_INVALID
    ),
    Row(
        "v4 ICMP cut short drops as invalid", INTO, cut(in4(WORLD4, ICMP(type=8)), 14 + 20 + 4), SHOT, Reason.CT_INVALID
    ),
    Row("v6 TCP cut short drops as invalid", INTO, cut(in6(WORLD6, syn(80)), 14 + 40 + 12), SHOT, Reason.CT_INVALID),
    Row(
        "v6 ICMPv6 cut short drops as invalid",
        INTO,
        cut(in6(WORLD6, ICMPv6EchoRequest()), 14 + 40 + 3),
        SHOT,
        Reason.CT_INVALID,
    ),
]


@pytest.fixture(scope="module")
def policy_dp(make_datapath: Callable[[], Datapath]) -> Datapath:
    dp = make_datapath()
    maps = dp.load_policy()
    dp.set_ipcache(IPCACHE)
    maps.install(ENDPOINT_ID, POLICY, SETUPS[""])
    return dp


@pytest.fixture
def dp(policy_dp: Datapath) -> Iterator[Datapath]:
    policy_dp.reset()
    yield policy_dp


def apply_setup(dp: Datapath, setup: str) -> None:
    """The endpoint at the device and its enforcement flags, as the row wants them."""
    assert dp.policy is not None
    if setup == "no endpoint":
        dp.clear_endpoint()
    else:
        dp.set_endpoint(ENDPOINT_ID, ENDPOINT_IDENTITY)
    config = dp.policy.maps["policy_config"].typed(ctypes.c_uint32, EndpointPolicyConfig)
    config.update(ENDPOINT_ID, EndpointPolicyConfig(SETUPS[setup]))


@pytest.mark.parametrize("row", params(ROWS))
def test_policy(dp: Datapath, row: Row) -> None:
    apply_setup(dp, row.setup)
    run_row(dp, row)


def test_verdicts_count_on_the_entry_that_decided(dp: Datapath) -> None:
    """An allowed and a denied new flow each count on the one policy entry that judged them."""
    assert dp.policy is not None
    apply_setup(dp, "")
    before = dp.policy.read(ENDPOINT_ID)
    run_row(dp, ROWS[0])  # allowed: egress, peer, TCP/80
    run_row(dp, next(r for r in ROWS if r.desc.startswith("v4 TCP to a denied port of an allowed identity")))
    after = dp.policy.read(ENDPOINT_ID)
    moved = {
        key: after[key][1].packets - before[key][1].packets
        for key in after
        if after[key][1].packets != before[key][1].packets
    }
    assert moved == {
        (int(EG), PEER_IDENTITY, compute.TCP, 80, PREFIX_FULL): 1,
        (int(EG), OTHER_IDENTITY, compute.TCP, 80, PREFIX_FULL): 1,
    }
