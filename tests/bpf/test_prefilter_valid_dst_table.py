"""The prefilter's valid-destination mode through the real XDP chain: what passes, what drops."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet

from services.common.datapath import FIRST_CIDR_IDENTITY, Hook, Reason, ReservedIdentity
from services.prefilter.defs import PrefilterConfigFlag, ValidDestination
from services.prefilter.denylist import Capacity
from services.prefilter.maps import PrefilterMaps
from tests.harness.bpfrun import XDP_DROP, XDP_PASS, Datapath

NODE, ENDPOINT, ENDPOINT6 = "192.0.2.1", "198.18.0.10", "2001:db8:e::a"
CIDR_PEER, FRONTEND, UNKNOWN = "10.7.0.1", "198.18.9.10", "198.18.0.99"


@pytest.fixture(scope="module")
def prefilter(make_datapath: Callable[[], Datapath]) -> Iterator[tuple[Datapath, PrefilterMaps]]:
    dp = make_datapath()
    maps = dp.load_prefilter(Capacity(hosts=64, prefixes=64))
    dp.set_ipcache({
        f"{NODE}/32": int(ReservedIdentity.HOST),
        f"{ENDPOINT}/32": 256,
        f"{ENDPOINT6}/128": 256,
        "10.7.0.0/16": FIRST_CIDR_IDENTITY,  # a CIDR a rule named: not a destination here
    })  # fmt: skip
    maps.put_valid_destination(ipaddress.ip_network(f"{FRONTEND}/32"), int(ValidDestination.FRONTEND))
    yield dp, maps


def eth() -> Ether:
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def udp4(dst: str) -> Packet:
    return eth() / IP(src="203.0.113.7", dst=dst) / UDP(dport=53)


ROWS = [
    ("a local endpoint", udp4(ENDPOINT), XDP_PASS, {}),
    ("a local endpoint, IPv6", eth() / IPv6(src="2001:db8:bad::7", dst=ENDPOINT6) / UDP(dport=53), XDP_PASS, {}),
    ("a node address", udp4(NODE), XDP_PASS, {}),
    ("a service frontend", udp4(FRONTEND), XDP_PASS, {}),
    ("multicast", udp4("224.0.0.5"), XDP_PASS, {}),
    ("broadcast", udp4("255.255.255.255"), XDP_PASS, {}),
    ("IPv6 multicast (neighbour discovery)", eth() / IPv6(dst="ff02::1") / UDP(dport=53), XDP_PASS, {}),
    ("ARP", eth() / ARP(pdst=UNKNOWN), XDP_PASS, {}),
    ("an address nothing here owns", udp4(UNKNOWN), XDP_DROP, {Reason.INVALID_DESTINATION: 1}),
    ("an address of a rule's CIDR", udp4(CIDR_PEER), XDP_DROP, {Reason.INVALID_DESTINATION: 1}),
    ("IPv6 nothing owns", eth() / IPv6(dst="2001:db8:e::99") / UDP(dport=53), XDP_DROP,
     {Reason.INVALID_DESTINATION: 1}),
]  # fmt: skip


@pytest.mark.parametrize(("what", "frame", "verdict", "counted"), ROWS, ids=[r[0] for r in ROWS])
def test_valid_destination_rows(
    prefilter: tuple[Datapath, PrefilterMaps], what: str, frame: Packet, verdict: int, counted: dict[Reason, int]
) -> None:
    dp, maps = prefilter
    maps.set_flags(int(PrefilterConfigFlag.VALID_DESTINATIONS))
    try:
        out = dp.run(Hook.XDP, bytes(frame))
    finally:
        maps.set_flags(0)
    drops = {r: n for r, n in out.counted.items() if r is not Reason.FORWARDED}
    assert (out.verdict, drops) == (verdict, counted), what


def test_the_mode_is_off_by_default(prefilter: tuple[Datapath, PrefilterMaps]) -> None:
    dp, maps = prefilter
    assert maps.flags() == 0
    out = dp.run(Hook.XDP, bytes(udp4(UNKNOWN)))
    assert out.verdict == XDP_PASS and Reason.INVALID_DESTINATION not in out.counted
