"""The prefilter's verdicts, packet by packet, through entry_xdp with prefilter_xdp in its slot.

The deny list (installed with the service's PrefilterMaps) holds IPv4 and IPv6
hosts and prefixes, denied and audited. The prefilter judges sources only:
what it cannot read a source address from goes on to the stack, which drops
malformed IP itself, so those rows pass.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet

from services.common.datapath import Hook, Reason
from services.prefilter.denylist import Capacity, Entry
from tests.bpf.packets import Row, cut, eth, params, run_row
from tests.harness.bpfrun import XDP_DROP, XDP_PASS, Datapath

HOST4, PREFIX4, AUDIT4 = "203.0.113.7", "198.51.0.0/16", "203.0.113.9"
HOST6, PREFIX6, AUDIT6 = "2001:db8:bad::7", "2001:db8:dead::/48", "2001:db8:a0d1::/48"
IN_PREFIX4, IN_PREFIX6, IN_AUDIT6 = "198.51.100.9", "2001:db8:dead::9", "2001:db8:a0d1::1"
CLEAN4, CLEAN6 = "192.0.2.2", "2001:db8:ff::2"
NODE4, NODE6 = "192.0.2.1", "2001:db8:ff::1"
DENY_LIST = [
    (HOST4 + "/32", False), (PREFIX4, False), (AUDIT4 + "/32", True),
    (HOST6 + "/128", False), (PREFIX6, False), (AUDIT6, True),
]  # fmt: skip

X = Hook.XDP
DENIED = Reason.PREFILTER_DENIED


def v4(src: str, dst: str = NODE4) -> Packet:
    return eth() / IP(src=src, dst=dst)


def v6(src: str, dst: str = NODE6) -> Packet:
    return eth() / IPv6(src=src, dst=dst)


ROWS = [
    # IPv4: hosts, prefixes, audit, misses
    Row("v4 UDP from a listed host drops", X, v4(HOST4) / UDP(sport=5000, dport=53), XDP_DROP, DENIED),
    Row("v4 TCP from inside a listed prefix drops", X, v4(IN_PREFIX4) / TCP(dport=80, flags="S"), XDP_DROP, DENIED),
    Row("v4 ICMP from inside a listed prefix drops", X, v4(IN_PREFIX4) / ICMP(), XDP_DROP, DENIED),
    Row("v4 from the first address of a listed prefix drops", X, v4("198.51.0.0") / UDP(), XDP_DROP, DENIED),
    Row("v4 from the last address of a listed prefix drops", X, v4("198.51.255.255") / UDP(), XDP_DROP, DENIED),
    Row("v4 from just below a listed prefix passes", X, v4("198.50.255.255") / UDP(), XDP_PASS),
    Row("v4 from the neighbour of a listed host passes", X, v4("203.0.113.8") / TCP(), XDP_PASS),
    Row("v4 from an audited host passes", X, v4(AUDIT4) / TCP(flags="S"), XDP_PASS),
    Row("v4 from an unlisted source passes", X, v4(CLEAN4) / ICMP(), XDP_PASS),
    Row("v4 to a listed host from an unlisted source passes", X, v4(CLEAN4, HOST4) / UDP(), XDP_PASS),
    Row(
        "v4 from a listed host with options drops",
        X,
        eth() / IP(src=HOST4, dst=NODE4, options=b"\x01" * 40) / TCP(),
        XDP_DROP,
        DENIED,
    ),
    Row(
        "v4 later fragment from a listed host drops",
        X,
        eth() / IP(src=HOST4, dst=NODE4, frag=100, proto=17) / bytes(32),
        XDP_DROP,
        DENIED,
    ),
    # IPv6
    Row("v6 UDP from a listed host drops", X, v6(HOST6) / UDP(dport=53), XDP_DROP, DENIED),
    Row("v6 TCP from inside a listed prefix drops", X, v6(IN_PREFIX6) / TCP(flags="S"), XDP_DROP, DENIED),
    Row("v6 ICMPv6 from a listed host drops", X, v6(HOST6) / ICMPv6EchoRequest(), XDP_DROP, DENIED),
    Row(
        "v6 neighbour solicitation from a listed host drops",
        X,
        v6(HOST6, "ff02::1:ff00:1") / ICMPv6ND_NS(tgt=NODE6),
        XDP_DROP,
        DENIED,
    ),
    Row("v6 from just outside a listed prefix passes", X, v6("2001:db8:deae::1") / UDP(), XDP_PASS),
    Row("v6 from an audited prefix passes", X, v6(IN_AUDIT6) / TCP(), XDP_PASS),
    Row("v6 from an unlisted source passes", X, v6(CLEAN6) / ICMPv6EchoRequest(), XDP_PASS),
    Row("v6 to a listed host from an unlisted source passes", X, v6(CLEAN6, HOST6) / UDP(), XDP_PASS),
    Row(
        "v6 from a listed host behind hop-by-hop and destination options drops",
        X,
        v6(HOST6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP(dport=22),
        XDP_DROP,
        DENIED,
    ),
    Row(
        "v6 fragment from a listed host drops",
        X,
        v6(HOST6) / IPv6ExtHdrFragment(offset=10, m=0, id=7) / bytes(24),
        XDP_DROP,
        DENIED,
    ),
    Row(
        "v4 VLAN-tagged from a listed host drops",
        X,
        eth() / Dot1Q(vlan=10) / IP(src=HOST4, dst=NODE4) / UDP(),
        XDP_DROP,
        DENIED,
    ),
    # not IP
    Row(
        "ARP from a listed host's address passes",
        X,
        Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=HOST4, pdst=NODE4),
        XDP_PASS,
    ),
    Row("LLDP passes", X, Ether(dst="01:80:c2:00:00:0e", type=0x88CC) / bytes(32), XDP_PASS),
    # malformed and truncated
    Row("Ethernet header cut short is refused by test_run", X, cut(v4(HOST4) / UDP(), 10), None, None),
    Row("Ethernet header alone with the IPv4 EtherType passes", X, cut(v4(HOST4) / UDP(), 14), XDP_PASS),
    Row("v4 header cut before the addresses passes", X, cut(v4(HOST4) / UDP(), 14 + 10), XDP_PASS),
    Row(
        "v4 header cut after the source address, from a listed host, passes to the stack",
        X,
        cut(v4(HOST4) / UDP(), 14 + 16),
        XDP_PASS,
    ),
    Row(
        "v4 ihl below 5 from a listed host passes to the stack",
        X,
        eth() / IP(src=HOST4, dst=NODE4, ihl=4) / UDP(),
        XDP_PASS,
    ),
    Row(
        "v4 ihl past the end from a listed host passes to the stack",
        X,
        eth() / IP(src=HOST4, dst=NODE4, ihl=15) / UDP(),
        XDP_PASS,
    ),
    Row("v4 TCP cut short from a listed host drops", X, cut(v4(HOST4) / TCP(), 14 + 20 + 6), XDP_DROP, DENIED),
    Row(
        "v6 header cut after the source address, from a listed host, passes to the stack",
        X,
        cut(v6(HOST6) / UDP(), 14 + 30),
        XDP_PASS,
    ),
    Row("v6 UDP cut short from a listed host drops", X, cut(v6(HOST6) / UDP(), 14 + 40 + 4), XDP_DROP, DENIED),
]


@pytest.fixture(scope="module")
def prefilter_dp(make_datapath: Callable[[], Datapath]) -> Datapath:
    dp = make_datapath()
    maps = dp.load_prefilter(Capacity(hosts=64, prefixes=64))
    maps.install([Entry(ipaddress.ip_network(cidr), audit, i + 1) for i, (cidr, audit) in enumerate(DENY_LIST)])
    return dp


@pytest.fixture
def dp(prefilter_dp: Datapath) -> Iterator[Datapath]:
    prefilter_dp.reset()
    yield prefilter_dp


@pytest.mark.parametrize("row", params(ROWS))
def test_prefilter(dp: Datapath, row: Row) -> None:
    run_row(dp, row)


def test_audited_and_denied_entries_count_their_hits(dp: Datapath) -> None:
    """A drop and an audited pass both count on their entry; a miss counts on none."""
    maps = dp.prefilter
    assert maps is not None
    before = {i: maps.hits(i).packets for i in range(1, len(DENY_LIST) + 1)}
    run_row(dp, ROWS[0])
    run_row(dp, next(r for r in ROWS if r.desc == "v6 from an audited prefix passes"))
    run_row(dp, next(r for r in ROWS if r.desc == "v4 from an unlisted source passes"))
    after = {i: maps.hits(i).packets for i in before}
    assert {i: after[i] - before[i] for i in before if after[i] != before[i]} == {1: 1, 6: 1}
