"""Endpoint policy on conntrack: established flows, default allow, related ICMP errors, SCTP.

The same chain as test_policy_table.py (endpoint 7, identity 256, at the device
test_run uses, so `entry_from_container` runs its egress policy and
`entry_to_container` its ingress policy), but the rows here change the policy
between packets, so most are functions rather than table rows:

    egress   peer (300): TCP/80, UDP/53, SCTP/9999     any identity: ICMP echo, ICMPv6 echo
    ingress  peer (300): TCP/8080, UDP/5353            other (301): ICMP destination unreachable

Nothing allows TCP from the peer's port 80 in, nor anything from the endpoint's
port 8080 out: a reply that passes was not judged by policy. An allow verdict is
cached in the connection's conntrack entry under (policy revision, ipcache
generation); the rows that change the policy or the ipcache check it is never
served stale.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
)
from scapy.layers.sctp import SCTP
from scapy.packet import Packet

from pybpf import Map
from services.common.datapath import CtKey, CtValue, Direction, Hook, IpProto, Reason
from services.policy import compute
from services.policy.compute import ANY, MapEntry
from services.policy.maps import config_flags
from tests.bpf.packets import Row, cut, eth, params, run_row
from tests.harness.bpfrun import TC_ACT_OK, TC_ACT_SHOT, Datapath

ENDPOINT_ID, ENDPOINT_IDENTITY = 7, 256
PEER_IDENTITY, OTHER_IDENTITY = 300, 301
EP4, PEER4, OTHER4, WORLD4, ROUTER4 = "10.0.0.10", "10.0.0.20", "10.0.0.30", "192.0.2.50", "192.0.2.1"
EP6, PEER6, OTHER6, WORLD6, ROUTER6 = "fd00::10", "fd00::20", "fd00::30", "2001:db8::50", "2001:db8::1"
IPCACHE = {
    EP4 + "/32": ENDPOINT_IDENTITY, EP6 + "/128": ENDPOINT_IDENTITY,
    PEER4 + "/32": PEER_IDENTITY, PEER6 + "/128": PEER_IDENTITY,
    OTHER4 + "/32": OTHER_IDENTITY, OTHER6 + "/128": OTHER_IDENTITY,
}  # fmt: skip
SCTP_PROTO = int(IpProto.SCTP)
EG, IN = Direction.EGRESS, Direction.INGRESS
OUT, INTO = Hook.FROM_CONTAINER, Hook.TO_CONTAINER
OK, SHOT = TC_ACT_OK, TC_ACT_SHOT
DENIED, DENY_RULE, AUDIT = Reason.POLICY_DENIED, Reason.POLICY_DENY_RULE, Reason.POLICY_AUDIT


def entry(direction: Direction, identity: int, proto: int = ANY, port: int = 0, deny: bool = False) -> MapEntry:
    return MapEntry(direction, identity, proto, port, 16 if proto != ANY else 0, deny, ("table",))


ALLOW_OUT_TCP80 = entry(EG, PEER_IDENTITY, compute.TCP, 80)
ALLOW_OUT_UDP53 = entry(EG, PEER_IDENTITY, compute.UDP, 53)
ALLOW_IN_TCP8080 = entry(IN, PEER_IDENTITY, compute.TCP, 8080)
POLICY = [
    ALLOW_OUT_TCP80,
    ALLOW_OUT_UDP53,
    entry(EG, PEER_IDENTITY, SCTP_PROTO, 9999),
    entry(EG, 0, compute.ICMP, 8),
    entry(EG, 0, compute.ICMPV6, 128),
    ALLOW_IN_TCP8080,
    entry(IN, PEER_IDENTITY, compute.UDP, 5353),
    entry(IN, OTHER_IDENTITY, compute.ICMP, 3),
    entry(IN, OTHER_IDENTITY, compute.ICMPV6, 1),
]
ENFORCED = config_flags(ingress=True, egress=True, audit=False)
FAMILIES = {
    "v4": (IP, EP4, PEER4, WORLD4),
    "v6": (IPv6, EP6, PEER6, WORLD6),
}


def without(removed: MapEntry, *added: MapEntry) -> list[MapEntry]:
    return [e for e in POLICY if e != removed] + list(added)


def out(ip: type[Packet], src: str, dst: str, l4: Packet) -> Packet:
    return eth() / ip(src=src, dst=dst) / l4


def quote4(packet: Packet) -> bytes:
    """What an IPv4 router quotes: the IP header and the first 8 bytes of L4."""
    data = bytes(packet[IP])
    return data[: (data[0] & 0x0F) * 4 + 8]


def quote6(packet: Packet) -> bytes:
    """What an IPv6 node quotes: as much of the packet as fits (here all of it)."""
    return bytes(packet[IPv6])


@pytest.fixture(scope="module")
def conntrack_dp(make_datapath: Callable[[], Datapath]) -> Datapath:
    dp = make_datapath()
    maps = dp.load_policy()
    dp.set_ipcache(IPCACHE)
    maps.install(ENDPOINT_ID, POLICY, ENFORCED)
    return dp


@pytest.fixture
def dp(conntrack_dp: Datapath) -> Iterator[Datapath]:
    """The module's datapath with the table's policy and enforcement, empty conntrack and metrics."""
    conntrack_dp.reset()
    conntrack_dp.set_endpoint(ENDPOINT_ID, ENDPOINT_IDENTITY)
    conntrack_dp.set_ipcache(IPCACHE)
    install(conntrack_dp, POLICY, ENFORCED)
    yield conntrack_dp


def install(dp: Datapath, policy: list[MapEntry], flags: int) -> None:
    assert dp.policy is not None
    dp.policy.install(ENDPOINT_ID, policy, flags)


def conntrack(dp: Datapath) -> list[tuple[int, int, int, int]]:
    """The conntrack keys as (proto, source port, destination port, scope), sorted."""
    with Map.from_pin(dp.globals_dir / "conntrack", key_type=CtKey, value_type=CtValue) as ct:
        return sorted(
            (int(k.proto), socket.ntohs(int(k.sport)), socket.ntohs(int(k.dport)), int(k.dir)) for k, _ in ct.items()
        )


def expect(dp: Datapath, hook: Hook, packet: Packet | bytes, verdict: int, reason: Reason = Reason.FORWARDED) -> None:
    desc = packet.summary() if isinstance(packet, Packet) else packet.hex()
    run_row(dp, Row(f"{hook.name} {desc}", hook, packet, verdict, reason))


# ---- established flows: policy on every packet of the original direction ----


@pytest.mark.parametrize("family", FAMILIES)
def test_established_tcp_is_cut_when_its_allow_is_removed(dp: Datapath, family: str) -> None:
    ip, ep, peer, _ = FAMILIES[family]
    expect(dp, OUT, out(ip, ep, peer, TCP(sport=40000, dport=80, flags="S")), OK)
    expect(dp, INTO, out(ip, peer, ep, TCP(sport=80, dport=40000, flags="SA")), OK)
    expect(dp, OUT, out(ip, ep, peer, TCP(sport=40000, dport=80, flags="A")), OK)
    install(dp, without(ALLOW_OUT_TCP80), ENFORCED)
    expect(dp, OUT, out(ip, ep, peer, TCP(sport=40000, dport=80, flags="PA") / b"next"), SHOT, DENIED)
    expect(dp, INTO, out(ip, peer, ep, TCP(sport=80, dport=40000, flags="PA") / b"reply"), OK)
    install(dp, POLICY, ENFORCED)
    expect(dp, OUT, out(ip, ep, peer, TCP(sport=40000, dport=80, flags="PA") / b"again"), OK)


@pytest.mark.parametrize("family", FAMILIES)
def test_established_tcp_is_cut_when_a_deny_is_added(dp: Datapath, family: str) -> None:
    ip, ep, peer, _ = FAMILIES[family]
    expect(dp, OUT, out(ip, ep, peer, TCP(sport=40001, dport=80, flags="S")), OK)
    expect(dp, INTO, out(ip, peer, ep, TCP(sport=80, dport=40001, flags="SA")), OK)
    install(dp, without(ALLOW_OUT_TCP80, entry(EG, PEER_IDENTITY, compute.TCP, 80, deny=True)), ENFORCED)
    expect(dp, OUT, out(ip, ep, peer, TCP(sport=40001, dport=80, flags="A")), SHOT, DENY_RULE)
    expect(dp, INTO, out(ip, peer, ep, TCP(sport=80, dport=40001, flags="PA") / b"reply"), OK)


def test_established_ingress_is_cut_and_its_replies_are_not_judged(dp: Datapath) -> None:
    expect(dp, INTO, out(IP, PEER4, EP4, TCP(sport=41000, dport=8080, flags="S")), OK)
    expect(dp, OUT, out(IP, EP4, PEER4, TCP(sport=8080, dport=41000, flags="SA")), OK)
    expect(dp, INTO, out(IP, PEER4, EP4, TCP(sport=41000, dport=8080, flags="A")), OK)
    install(dp, without(ALLOW_IN_TCP8080), ENFORCED)
    expect(dp, INTO, out(IP, PEER4, EP4, TCP(sport=41000, dport=8080, flags="PA") / b"x"), SHOT, DENIED)
    expect(dp, OUT, out(IP, EP4, PEER4, TCP(sport=8080, dport=41000, flags="PA") / b"y"), OK)


@pytest.mark.parametrize("family", FAMILIES)
def test_established_udp_is_cut_when_its_allow_is_removed(dp: Datapath, family: str) -> None:
    ip, ep, peer, _ = FAMILIES[family]
    expect(dp, OUT, out(ip, ep, peer, UDP(sport=5000, dport=53)), OK)
    expect(dp, INTO, out(ip, peer, ep, UDP(sport=53, dport=5000)), OK)
    expect(dp, OUT, out(ip, ep, peer, UDP(sport=5000, dport=53)), OK)
    install(dp, without(ALLOW_OUT_UDP53), ENFORCED)
    expect(dp, OUT, out(ip, ep, peer, UDP(sport=5000, dport=53)), SHOT, DENIED)
    expect(dp, INTO, out(ip, peer, ep, UDP(sport=53, dport=5000)), OK)


def test_established_denied_in_audit_mode_passes_audited(dp: Datapath) -> None:
    expect(dp, OUT, out(IP, EP4, PEER4, TCP(sport=40002, dport=80, flags="S")), OK)
    install(dp, without(ALLOW_OUT_TCP80), config_flags(ingress=True, egress=True, audit=True))
    expect(dp, OUT, out(IP, EP4, PEER4, TCP(sport=40002, dport=80, flags="A")), OK, AUDIT)


def test_established_in_an_unenforced_direction_passes(dp: Datapath) -> None:
    expect(dp, OUT, out(IP, EP4, PEER4, TCP(sport=40003, dport=80, flags="S")), OK)
    install(dp, without(ALLOW_OUT_TCP80), config_flags(ingress=True, egress=False, audit=False))
    expect(dp, OUT, out(IP, EP4, PEER4, TCP(sport=40003, dport=80, flags="A")), OK)


def allow_hits(dp: Datapath) -> int:
    """Lookups the egress allow entry for the peer's TCP/80 has answered."""
    assert dp.policy is not None
    read = dp.policy.read(ENDPOINT_ID)
    return next(hits.packets for k, (_, hits) in read.items() if k[:4] == (int(EG), PEER_IDENTITY, compute.TCP, 80))


def test_established_flow_is_looked_up_again_after_every_change(dp: Datapath) -> None:
    """The verdict cached in the conntrack entry serves until the policy revision or ipcache generation moves."""
    base = allow_hits(dp)
    for flags in ("S", "A", "PA"):
        expect(dp, OUT, out(IP, EP4, PEER4, TCP(sport=40004, dport=80, flags=flags)), OK)
    assert allow_hits(dp) - base == 1, "the first packet's allow is cached for the next two"
    install(dp, POLICY, ENFORCED)  # same contents, new revision
    expect(dp, OUT, out(IP, EP4, PEER4, TCP(sport=40004, dport=80, flags="A")), OK)
    dp.set_ipcache({**IPCACHE, WORLD4 + "/32": 999})  # an unrelated change still moves the generation
    expect(dp, OUT, out(IP, EP4, PEER4, TCP(sport=40004, dport=80, flags="A")), OK)
    assert allow_hits(dp) - base == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_established_flow_is_cut_when_its_peer_changes_identity(dp: Datapath, family: str) -> None:
    ip, ep, peer, _ = FAMILIES[family]
    expect(dp, OUT, out(ip, ep, peer, TCP(sport=40005, dport=80, flags="S")), OK)
    expect(dp, OUT, out(ip, ep, peer, TCP(sport=40005, dport=80, flags="A")), OK)
    host = peer + ("/32" if family == "v4" else "/128")
    dp.set_ipcache({**IPCACHE, host: OTHER_IDENTITY})
    expect(dp, OUT, out(ip, ep, peer, TCP(sport=40005, dport=80, flags="PA") / b"x"), SHOT, DENIED)
    expect(dp, INTO, out(ip, peer, ep, TCP(sport=80, dport=40005, flags="PA") / b"y"), OK)
    dp.set_ipcache(IPCACHE)
    expect(dp, OUT, out(ip, ep, peer, TCP(sport=40005, dport=80, flags="PA") / b"z"), OK)


# ---- default allow ----


def test_egress_default_allow(dp: Datapath) -> None:
    policy = [*POLICY, entry(EG, OTHER_IDENTITY, compute.TCP, 22, deny=True)]
    install(dp, policy, config_flags(ingress=True, egress=True, audit=False, egress_default_allow=True))
    expect(dp, OUT, out(IP, EP4, WORLD4, TCP(sport=40010, dport=1234, flags="S")), OK)
    assert conntrack(dp) == [(compute.TCP, 40010, 1234, EG)], "a packet passed by default allow creates its entry"
    expect(dp, OUT, out(IP, EP4, OTHER4, TCP(sport=40011, dport=22, flags="S")), SHOT, DENY_RULE)
    expect(dp, OUT, out(IP, EP4, PEER4, TCP(sport=40012, dport=80, flags="S")), OK)
    expect(dp, INTO, out(IP, WORLD4, EP4, TCP(sport=40013, dport=1234, flags="S")), SHOT, DENIED)


def test_ingress_default_allow(dp: Datapath) -> None:
    policy = [*POLICY, entry(IN, OTHER_IDENTITY, compute.TCP, 22, deny=True)]
    install(dp, policy, config_flags(ingress=True, egress=True, audit=False, ingress_default_allow=True))
    expect(dp, INTO, out(IPv6, WORLD6, EP6, TCP(sport=40020, dport=1234, flags="S")), OK)
    expect(dp, INTO, out(IPv6, OTHER6, EP6, TCP(sport=40021, dport=22, flags="S")), SHOT, DENY_RULE)
    expect(dp, OUT, out(IPv6, EP6, WORLD6, TCP(sport=40022, dport=1234, flags="S")), SHOT, DENIED)


# ---- related ICMP errors ----


def udp4_out() -> Packet:
    return out(IP, EP4, PEER4, UDP(sport=5000, dport=53) / b"query")


def syn4_out() -> Packet:
    return out(IP, EP4, PEER4, TCP(sport=40030, dport=80, flags="S"))


def echo4_out() -> Packet:
    return out(IP, EP4, WORLD4, ICMP(type=8, id=0x55))


def udp6_out() -> Packet:
    return out(IPv6, EP6, PEER6, UDP(sport=5000, dport=53) / b"query")


def syn6_out() -> Packet:
    return out(IPv6, EP6, PEER6, TCP(sport=40030, dport=80, flags="S"))


def echo6_out() -> Packet:
    return out(IPv6, EP6, WORLD6, ICMPv6EchoRequest(id=0x55))


def udp4_in() -> Packet:
    return out(IP, PEER4, EP4, UDP(sport=6000, dport=5353) / b"query")


def udp6_in() -> Packet:
    return out(IPv6, PEER6, EP6, UDP(sport=6000, dport=5353) / b"query")


def err4_in(src: str, icmp: Packet, quoted: Packet) -> Packet:
    return eth() / IP(src=src, dst=EP4) / icmp / quote4(quoted)


def err6_in(src: str, icmp: Packet, quoted: Packet) -> Packet:
    return eth() / IPv6(src=src, dst=EP6) / icmp / quote6(quoted)


RELATED_ROWS = [
    Row(
        "v4 port unreachable quoting the endpoint's allowed UDP passes as related",
        INTO, err4_in(PEER4, ICMP(type=3, code=3), udp4_out()), OK, prior=((OUT, udp4_out()),),
    ),
    Row(
        "v4 fragmentation needed quoting the endpoint's allowed TCP passes as related",
        INTO, err4_in(ROUTER4, ICMP(type=3, code=4, nexthopmtu=1400), syn4_out()), OK, prior=((OUT, syn4_out()),),
    ),
    Row(
        "v4 time exceeded quoting the endpoint's echo request passes as related",
        INTO, err4_in(ROUTER4, ICMP(type=11, code=0), echo4_out()), OK, prior=((OUT, echo4_out()),),
    ),
    Row(
        "v4 time exceeded quoting a packet with IP options passes as related",
        INTO,
        eth() / IP(src=ROUTER4, dst=EP4) / ICMP(type=11)
        / quote4(IP(src=EP4, dst=PEER4, options=b"\x01" * 8) / UDP(sport=5000, dport=53)),
        OK, prior=((OUT, udp4_out()),),
    ),
    Row(
        "v4 port unreachable from the endpoint quoting the peer's allowed UDP passes as related",
        OUT, eth() / IP(src=EP4, dst=PEER4) / ICMP(type=3, code=3) / quote4(udp4_in()), OK, prior=((INTO, udp4_in()),),
    ),
    Row(
        "v4 port unreachable from the endpoint quoting the peer's TCP reply passes as related",
        OUT,
        eth() / IP(src=EP4, dst=PEER4) / ICMP(type=3, code=3)
        / quote4(out(IP, PEER4, EP4, TCP(sport=80, dport=40030, flags="SA"))),
        OK, prior=((OUT, syn4_out()),),
    ),
    Row(
        "v4 port unreachable quoting no known connection drops",
        INTO, err4_in(PEER4, ICMP(type=3, code=3), udp4_out()), SHOT, DENIED,
    ),
    Row(
        "v4 port unreachable quoting another port of the connection's peer drops",
        INTO, err4_in(PEER4, ICMP(type=3, code=3), out(IP, EP4, PEER4, UDP(sport=5000, dport=54))), SHOT, DENIED,
        prior=((OUT, udp4_out()),),
    ),
    Row(
        "v4 port unreachable with a quote cut short is judged by policy and drops",
        INTO, cut(err4_in(PEER4, ICMP(type=3, code=3), udp4_out()), 14 + 20 + 8 + 20 + 4), SHOT, DENIED,
        prior=((OUT, udp4_out()),),
    ),
    Row(
        "v4 destination unreachable from an identity allowed it passes by policy",
        INTO, err4_in(OTHER4, ICMP(type=3, code=1), udp4_out()), OK,
    ),
    Row(
        "v4 port unreachable from the endpoint quoting nothing known drops",
        OUT, eth() / IP(src=EP4, dst=OTHER4) / ICMP(type=3, code=3) / quote4(udp4_in()), SHOT, DENIED,
    ),
    Row(
        "v6 port unreachable quoting the endpoint's allowed UDP passes as related",
        INTO, err6_in(PEER6, ICMPv6DestUnreach(code=4), udp6_out()), OK, prior=((OUT, udp6_out()),),
    ),
    Row(
        "v6 packet too big quoting the endpoint's allowed TCP passes as related",
        INTO, err6_in(ROUTER6, ICMPv6PacketTooBig(mtu=1280), syn6_out()), OK, prior=((OUT, syn6_out()),),
    ),
    Row(
        "v6 time exceeded quoting the endpoint's echo request passes as related",
        INTO, err6_in(ROUTER6, ICMPv6TimeExceeded(), echo6_out()), OK, prior=((OUT, echo6_out()),),
    ),
    Row(
        "v6 port unreachable quoting a packet with Destination Options passes as related",
        INTO,
        eth() / IPv6(src=PEER6, dst=EP6) / ICMPv6DestUnreach(code=4)
        / bytes(IPv6(src=EP6, dst=PEER6) / IPv6ExtHdrDestOpt() / UDP(sport=5000, dport=53) / b"query"),
        OK, prior=((OUT, udp6_out()),),
    ),
    Row(
        "v6 port unreachable from the endpoint quoting the peer's allowed UDP passes as related",
        OUT, eth() / IPv6(src=EP6, dst=PEER6) / ICMPv6DestUnreach(code=4) / quote6(udp6_in()), OK,
        prior=((INTO, udp6_in()),),
    ),
    Row(
        "v6 packet too big quoting no known connection drops",
        INTO, err6_in(ROUTER6, ICMPv6PacketTooBig(mtu=1280), syn6_out()), SHOT, DENIED,
    ),
    Row(
        "v6 port unreachable quoting no known connection drops",
        INTO, err6_in(PEER6, ICMPv6DestUnreach(code=4), udp6_out()), SHOT, DENIED,
    ),
]  # fmt: skip


@pytest.mark.parametrize("row", params(RELATED_ROWS))
def test_related_icmp_error(dp: Datapath, row: Row) -> None:
    run_row(dp, row)


@pytest.mark.parametrize(
    "prior,error",
    [
        ((OUT, udp4_out()), (INTO, err4_in(PEER4, ICMP(type=3, code=3), udp4_out()))),
        ((OUT, udp6_out()), (INTO, err6_in(PEER6, ICMPv6DestUnreach(code=4), udp6_out()))),
        (None, (INTO, err4_in(OTHER4, ICMP(type=3, code=1), udp4_out()))),
        (None, (INTO, err6_in(OTHER6, ICMPv6DestUnreach(code=1), udp6_out()))),
    ],
    ids=["v4 related", "v6 related", "v4 allowed by policy", "v6 allowed by policy"],
)
def test_icmp_errors_create_no_conntrack_entry(
    dp: Datapath, prior: tuple[Hook, Packet] | None, error: tuple[Hook, Packet]
) -> None:
    if prior is not None:
        expect(dp, *prior, OK)
    before = conntrack(dp)
    expect(dp, *error, OK)
    assert conntrack(dp) == before


def test_icmp_errors_between_two_hosts_share_no_entry(dp: Datapath) -> None:
    """An error the policy lets in does not make a later, unrelated error out a "reply"."""
    expect(dp, INTO, err4_in(OTHER4, ICMP(type=3, code=1), udp4_out()), OK)
    expect(dp, OUT, eth() / IP(src=EP4, dst=OTHER4) / ICMP(type=3, code=1) / quote4(udp4_in()), SHOT, DENIED)


# ---- SCTP ----


@pytest.mark.parametrize("family", FAMILIES)
def test_sctp_is_judged_on_its_destination_port_and_tracked(dp: Datapath, family: str) -> None:
    ip, ep, peer, _ = FAMILIES[family]
    expect(dp, OUT, out(ip, ep, peer, SCTP(sport=7000, dport=9998)), SHOT, DENIED)
    expect(dp, OUT, out(ip, ep, peer, SCTP(sport=7000, dport=9999)), OK)
    assert conntrack(dp) == [(SCTP_PROTO, 7000, 9999, EG)]
    expect(dp, INTO, out(ip, peer, ep, SCTP(sport=9999, dport=7000)), OK)
    expect(dp, INTO, out(ip, peer, ep, SCTP(sport=9999, dport=7001)), SHOT, DENIED)


def test_sctp_cut_short_drops_as_invalid(dp: Datapath) -> None:
    expect(dp, OUT, cut(out(IP, EP4, PEER4, SCTP(sport=7000, dport=9999)), 14 + 20 + 3), SHOT, Reason.CT_INVALID)


def test_sctp_established_is_cut_when_its_allow_is_removed(dp: Datapath) -> None:
    expect(dp, OUT, out(IP, EP4, PEER4, SCTP(sport=7001, dport=9999)), OK)
    install(dp, [e for e in POLICY if e.proto != SCTP_PROTO], ENFORCED)
    expect(dp, OUT, out(IP, EP4, PEER4, SCTP(sport=7001, dport=9999)), SHOT, DENIED)
