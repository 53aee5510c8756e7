"""The one parser, fragment tracking and conntrack, through the real objects (test_run).

Each table row is a packet built with scapy, the verdict the object must give
and the reason it must count. The endpoint's ingress policy allows peer A
everything but TCP/22 and peer B only UDP/5353 and TCP/80 (see
packets_parser.py), so a row that reaches the wrong port, or no port at all,
gives the wrong verdict or the wrong reason.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, defragment, fragment
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
    fragment6,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw

from services.common.datapath import Direction, Family, IpProto, Reason
from tests.bpf.packets_parser import (
    ALLOWED_TCP,
    ALLOWED_UDP,
    BACKEND,
    BACKEND_PORT,
    DENIED_SOURCE,
    DENIED_TCP,
    EP4,
    EP6,
    PEER_A4,
    PEER_A6,
    PEER_B4,
    PEER_B6,
    TC_ACT_OK,
    TC_ACT_SHOT,
    VIP,
    VIP_PORT,
    XDP_DROP,
    XDP_PASS,
    Datapath,
    datapath_name,
)

pytestmark = pytest.mark.root

INGRESS = Direction.INGRESS
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
BIG = 4000  # bytes of UDP payload: fragmented at an MTU of 1500


@pytest.fixture(scope="module")
def loaded(built: object) -> Iterator[Datapath]:
    with Datapath(datapath_name()) as datapath:
        yield datapath


@pytest.fixture
def dp(loaded: Datapath) -> Datapath:
    """The module's datapath with no connection, datagram or event left by an earlier test."""
    loaded.reset()
    return loaded


def syn6(src: str, dport: int, *ext: Packet) -> bytes:
    pkt = IPv6(src=src, dst=EP6)
    for header in ext:
        pkt = pkt / header
    return bytes(ETH / pkt / TCP(sport=40000, dport=dport, flags="S"))


def syn4(src: str, dport: int, options: bytes = b"") -> bytes:
    return bytes(ETH / IP(src=src, dst=EP4, options=options) / TCP(sport=40000, dport=dport, flags="S"))


def dstopts(n: int) -> list[Packet]:
    return [IPv6ExtHdrDestOpt() for _ in range(n)]


# (description, packet, verdict, reason) through the endpoint's ingress policy.
INGRESS_ROWS = [
    ("v6 SYN to 22", syn6(PEER_A6, DENIED_TCP), TC_ACT_SHOT, Reason.POLICY_DENY_RULE),
    ("v6 SYN to 22 behind destination options", syn6(PEER_A6, DENIED_TCP, IPv6ExtHdrDestOpt()),
     TC_ACT_SHOT, Reason.POLICY_DENY_RULE),
    ("v6 SYN to 22 behind hop-by-hop, routing, destination options",
     syn6(PEER_A6, DENIED_TCP, IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(), IPv6ExtHdrDestOpt()),
     TC_ACT_SHOT, Reason.POLICY_DENY_RULE),
    ("v6 SYN to 22 behind AH ((hdrlen + 2) * 4 bytes)",
     syn6(PEER_A6, DENIED_TCP, AH(nh=IpProto.TCP, payloadlen=4, spi=1, icv=b"\0" * 12)),
     TC_ACT_SHOT, Reason.POLICY_DENY_RULE),
    ("v6 SYN to 22 in an atomic fragment", syn6(PEER_A6, DENIED_TCP, IPv6ExtHdrFragment(id=9, offset=0, m=0)),
     TC_ACT_SHOT, Reason.POLICY_DENY_RULE),
    ("v6 SYN to 22 behind 8 headers (the most walked)", syn6(PEER_A6, DENIED_TCP, *dstopts(8)),
     TC_ACT_SHOT, Reason.POLICY_DENY_RULE),
    ("v6 SYN to 80 behind destination options", syn6(PEER_A6, ALLOWED_TCP, IPv6ExtHdrDestOpt()),
     TC_ACT_OK, Reason.FORWARDED),
    ("v6 SYN to 80 behind a long destination options header",
     syn6(PEER_B6, ALLOWED_TCP, IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * 126)])),
     TC_ACT_OK, Reason.FORWARDED),
    ("v6 behind 9 headers: too many", syn6(PEER_A6, ALLOWED_TCP, *dstopts(9)), TC_ACT_SHOT, Reason.EXT_HDR_LIMIT),
    ("v6 destination options cut short", syn6(PEER_A6, ALLOWED_TCP, IPv6ExtHdrDestOpt())[: 14 + 40 + 4],
     TC_ACT_SHOT, Reason.INVALID_PACKET),
    ("v4 options cut short", syn4(PEER_A4, ALLOWED_TCP, options=b"\x01" * 8)[: 14 + 24],
     TC_ACT_SHOT, Reason.INVALID_PACKET),
    ("v4 SYN to 22", syn4(PEER_A4, DENIED_TCP), TC_ACT_SHOT, Reason.POLICY_DENY_RULE),
    ("v4 SYN to 22 with IP options", syn4(PEER_A4, DENIED_TCP, options=b"\x01" * 8),
     TC_ACT_SHOT, Reason.POLICY_DENY_RULE),
    ("v4 SYN to 22 in a VLAN", bytes(ETH / Dot1Q(vlan=5) / IP(src=PEER_A4, dst=EP4) / TCP(dport=DENIED_TCP)),
     TC_ACT_SHOT, Reason.POLICY_DENY_RULE),
    ("v6 SYN to 22 in two VLANs (802.1ad + 802.1Q)",
     bytes(ETH / Dot1AD(vlan=10) / Dot1Q(vlan=5) / IPv6(src=PEER_A6, dst=EP6) / TCP(dport=DENIED_TCP)),
     TC_ACT_SHOT, Reason.POLICY_DENY_RULE),
    ("v4 SYN to 80 in a VLAN", bytes(ETH / Dot1Q(vlan=5) / IP(src=PEER_B4, dst=EP4) / TCP(dport=ALLOWED_TCP)),
     TC_ACT_OK, Reason.FORWARDED),
    ("v4 TCP header cut short", syn4(PEER_B4, ALLOWED_TCP)[: 14 + 20 + 10], TC_ACT_SHOT, Reason.CT_INVALID),
    ("v4 IHL below 5", bytes(ETH / IP(src=PEER_B4, dst=EP4, ihl=4) / TCP(dport=ALLOWED_TCP)),
     TC_ACT_SHOT, Reason.INVALID_PACKET),
    ("v6 UDP header cut short", bytes(ETH / IPv6(src=PEER_B6, dst=EP6) / UDP(dport=ALLOWED_UDP))[: 14 + 40 + 4],
     TC_ACT_SHOT, Reason.CT_INVALID),
    ("v4 UDP to 5353 from B", bytes(ETH / IP(src=PEER_B4, dst=EP4) / UDP(dport=ALLOWED_UDP)),
     TC_ACT_OK, Reason.FORWARDED),
    ("v4 UDP to 5354 from B", bytes(ETH / IP(src=PEER_B4, dst=EP4) / UDP(dport=ALLOWED_UDP + 1)),
     TC_ACT_SHOT, Reason.POLICY_DENIED),
    ("ARP is not IP: passes", bytes(ETH / ARP(psrc=PEER_B4, pdst=EP4)), TC_ACT_OK, Reason.FORWARDED),
]  # fmt: skip


@pytest.mark.parametrize(("packet", "verdict", "reason"), [r[1:] for r in INGRESS_ROWS],
                         ids=[r[0] for r in INGRESS_ROWS])  # fmt: skip
def test_ingress_verdicts(dp: Datapath, packet: bytes, verdict: int, reason: Reason) -> None:
    run = dp.ingress(packet)
    assert (run.retval, run.reason) == (verdict, reason), run.reasons


def test_unknown_endpoint_is_dropped_with_its_reason(dp: Datapath) -> None:
    run = dp.ingress(syn4(PEER_B4, ALLOWED_TCP), endpoint=0)
    assert (run.retval, run.reason) == (TC_ACT_SHOT, Reason.UNKNOWN_ENDPOINT)


def test_drop_event_names_the_port_behind_extension_headers(dp: Datapath) -> None:
    """The event emitter walks the same headers: the flow says TCP/22, not 'destination options'."""
    list(dp.drain_events())
    dp.ingress(syn6(PEER_A6, DENIED_TCP, IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()))
    events = list(dp.drain_events())
    assert len(events) == 1
    ev = events[0]
    assert (ev.reason, ev.family, ev.proto) == (Reason.POLICY_DENY_RULE, Family.INET6, IpProto.TCP)
    assert int.from_bytes(int(ev.dport).to_bytes(2, "little"), "big") == DENIED_TCP
    assert bytes(ev.daddr) == ipaddress.ip_address(EP6).packed


# ---- fragments ----


def frags4(src: str, dport: int, ident: int, dst: str = EP4) -> list[bytes]:
    datagram = IP(src=src, dst=dst, id=ident) / UDP(sport=40000, dport=dport) / Raw(b"x" * BIG)
    return [bytes(ETH / f) for f in fragment(datagram, fragsize=1480)]  # type: ignore[no-untyped-call]


def frags6(src: str, dport: int, ident: int, dst: str = EP6) -> list[bytes]:
    datagram = IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=ident) / UDP(sport=40000, dport=dport) / Raw(b"x" * BIG)
    return [bytes(ETH / f) for f in fragment6(datagram, 1500)]  # type: ignore[no-untyped-call]


FRAGS = {"v4": frags4, "v6": frags6}
PEER_B = {"v4": PEER_B4, "v6": PEER_B6}


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_fragments_of_an_allowed_datagram_all_pass(dp: Datapath, family: str) -> None:
    frags = FRAGS[family](PEER_B[family], ALLOWED_UDP, 0x1234)
    assert len(frags) >= 3
    runs = [dp.ingress(f) for f in frags]
    assert [(r.retval, r.reason) for r in runs] == [(TC_ACT_OK, Reason.FORWARDED)] * len(frags)


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_fragments_of_a_denied_datagram_are_all_denied(dp: Datapath, family: str) -> None:
    frags = FRAGS[family](PEER_B[family], ALLOWED_UDP + 1, 0x2345)
    runs = [dp.ingress(f) for f in frags]
    assert [(r.retval, r.reason) for r in runs] == [(TC_ACT_SHOT, Reason.POLICY_DENIED)] * len(frags)


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_later_fragment_without_its_first_is_dropped(dp: Datapath, family: str) -> None:
    frags = FRAGS[family](PEER_B[family], ALLOWED_UDP, 0x3456)
    run = dp.ingress(frags[1])
    assert (run.retval, run.reason) == (TC_ACT_SHOT, Reason.FRAG_NOT_FOUND)


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_fragmented_flows_between_two_endpoints_keep_their_own_verdicts(dp: Datapath, family: str) -> None:
    """An allowed fragmented flow, and one the endpoint sent itself, open nothing else:
    fragments to a denied port are still denied (the conntrack entries hold real ports)."""
    peer = PEER_B[family]
    for f in FRAGS[family](peer, ALLOWED_UDP, 0x4567):
        assert dp.ingress(f).retval == TC_ACT_OK
    own = EP4 if family == "v4" else EP6
    for f in FRAGS[family](own, 9999, 0x5678, dst=peer):  # from the endpoint: egress is not enforced
        assert dp.egress(f).retval == TC_ACT_OK
    runs = [dp.ingress(f) for f in FRAGS[family](peer, ALLOWED_UDP + 1, 0x6789)]
    assert [(r.retval, r.reason) for r in runs] == [(TC_ACT_SHOT, Reason.POLICY_DENIED)] * len(runs)


def test_fragmented_ping_passes_for_an_allowed_peer(dp: Datapath) -> None:
    datagram = IP(src=PEER_A4, dst=EP4, id=77) / ICMP(type=8, id=3) / Raw(b"p" * BIG)
    runs = [dp.ingress(bytes(ETH / f)) for f in fragment(datagram, fragsize=1480)]  # type: ignore[no-untyped-call]
    assert [r.retval for r in runs] == [TC_ACT_OK] * len(runs)


# ---- the load balancer ----


def test_lb_translates_every_fragment_of_a_datagram_to_a_frontend(dp: Datapath) -> None:
    """The first fragment gets address and port, the later ones the address; reassembled,
    the datagram goes to the backend with a valid UDP checksum."""
    payload = bytes(range(256)) * 16
    datagram = IP(src=EP4, dst=VIP, id=99) / UDP(sport=40000, dport=VIP_PORT) / Raw(payload)
    out = []
    for f in fragment(datagram, fragsize=1480):  # type: ignore[no-untyped-call]
        run = dp.lb_forward(bytes(ETH / f))
        assert run.retval == TC_ACT_OK
        out.append(Ether(run.data)[IP])
    assert len(out) >= 3
    for pkt in out:
        assert pkt.dst == BACKEND
        fresh = IP(bytes(pkt))
        del fresh.chksum
        assert IP(bytes(fresh)).chksum == pkt.chksum  # the L3 checksum was fixed
    whole = defragment(out)  # type: ignore[no-untyped-call]
    assert len(whole) == 1
    udp = whole[0][UDP]
    assert udp.dport == BACKEND_PORT and bytes(udp.payload) == payload
    again = IP(bytes(whole[0]))
    del again[UDP].chksum
    assert IP(bytes(again))[UDP].chksum == udp.chksum  # the L4 checksum still covers the datagram


def test_lb_gives_every_fragment_of_a_reply_the_frontend_as_source(dp: Datapath) -> None:
    request = IP(src=EP4, dst=VIP) / UDP(sport=40002, dport=VIP_PORT) / Raw(b"q")
    assert Ether(dp.lb_forward(bytes(ETH / request)).data)[IP].dst == BACKEND
    reply = IP(src=BACKEND, dst=EP4, id=123) / UDP(sport=BACKEND_PORT, dport=40002) / Raw(b"r" * BIG)
    out = []
    for f in fragment(reply, fragsize=1480):  # type: ignore[no-untyped-call]
        run = dp.lb_reply(bytes(ETH / f))
        assert run.retval == TC_ACT_OK
        out.append(Ether(run.data)[IP])
    assert len(out) >= 3 and {p.src for p in out} == {VIP}
    whole = defragment(out)  # type: ignore[no-untyped-call]
    assert len(whole) == 1 and whole[0][UDP].sport == VIP_PORT


@pytest.mark.parametrize(("desc", "frame"), [
    ("in a VLAN", ETH / Dot1Q(vlan=5)),
    ("with IP options", ETH),
])  # fmt: skip
def test_lb_translates_tagged_and_optioned_packets(dp: Datapath, desc: str, frame: Packet) -> None:
    ip = IP(src=EP4, dst=VIP, options=b"\x01" * 4) if "options" in desc else IP(src=EP4, dst=VIP)
    run = dp.lb_forward(bytes(frame / ip / UDP(sport=40001, dport=VIP_PORT) / Raw(b"q" * 32)))
    assert run.retval == TC_ACT_OK
    out = Ether(run.data)[IP]
    assert (out.dst, out[UDP].dport) == (BACKEND, BACKEND_PORT)
    fresh = IP(bytes(out))
    del fresh.chksum
    del fresh[UDP].chksum
    again = IP(bytes(fresh))
    assert (again.chksum, again[UDP].chksum) == (out.chksum, out[UDP].chksum)


# ---- the prefilter ----


@pytest.mark.parametrize(("desc", "frame"), [
    ("untagged", ETH),
    ("in a VLAN", ETH / Dot1Q(vlan=5)),
    ("in two VLANs", ETH / Dot1AD(vlan=10) / Dot1Q(vlan=5)),
])  # fmt: skip
def test_prefilter_drops_a_denied_source_however_tagged(dp: Datapath, desc: str, frame: Packet) -> None:
    denied = dp.xdp(bytes(frame / IP(src=DENIED_SOURCE, dst=EP4) / UDP(dport=53)))
    other = dp.xdp(bytes(frame / IP(src=PEER_B4, dst=EP4) / UDP(dport=53)))
    assert (denied.retval, other.retval) == (XDP_DROP, XDP_PASS)


def test_reasons_are_counted_per_direction(dp: Datapath) -> None:
    run = dp.ingress(syn6(PEER_A6, DENIED_TCP, IPv6ExtHdrDestOpt()))
    assert run.reasons == {(Reason.POLICY_DENY_RULE, INGRESS): 1}
