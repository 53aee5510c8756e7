"""IPv4 hosts and prefixes of every length, found longest first through the spans and blocks.

IPv4 prefixes live in a hash by (length, masked address), hosts in a hash of their
own, and the program reads the source's /16 span and /24 block first: it looks up
only covered addresses and the lengths they name (services/prefilter/gates.py).
These tests put nested prefixes of many lengths and hosts on the list, at the edges
of /24s, and check every probe's verdict against Python's longest match, after a
bulk install and after incremental adds and removes (which maintain spans and
blocks a few slots at a time).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from scapy.layers.inet import IP, UDP

from services.prefilter.denylist import Capacity, Entry
from services.prefilter.maps import PrefilterMaps
from tests.bpf.packets import eth
from tests.harness.bpfrun import XDP_DROP, XDP_PASS, Datapath

NODE4 = "192.0.2.1"
LISTED = [  # (CIDR, audit): nested, longer audits inside shorter denies, and /24 edges
    ("0.0.0.0/1", True), ("10.0.0.0/8", False), ("10.1.0.0/16", True), ("10.1.2.0/23", False),
    ("10.1.2.0/24", True), ("10.1.2.128/25", False), ("10.1.2.254/31", True), ("10.1.3.255/32", True),
    ("172.16.0.0/12", False), ("172.16.5.4/30", True), ("100.64.0.0/10", False), ("203.0.113.0/27", False),
    ("10.1.2.1/32", False), ("172.16.5.5/32", False), ("198.51.100.9/32", False), ("203.0.113.40/32", True),
]  # fmt: skip
PROBES = [
    "10.1.2.1", "10.1.2.127", "10.1.2.128", "10.1.2.253", "10.1.2.254", "10.1.2.255", "10.1.3.0",
    "10.1.3.255", "10.1.4.0", "10.2.0.1", "10.255.255.255", "11.0.0.1", "127.0.0.1", "128.0.0.1",
    "172.16.5.3", "172.16.5.4", "172.16.5.7", "172.16.5.8", "172.31.255.255", "172.32.0.0",
    "100.64.0.1", "100.127.255.255", "100.128.0.0", "203.0.113.31", "203.0.113.32", "198.51.100.1",
    "198.51.100.8", "198.51.100.9", "198.51.100.10", "203.0.113.40", "203.0.113.41", "10.1.2.0", "10.1.2.2",
]  # fmt: skip


def expected(listed: list[tuple[str, bool]], source: str) -> int:
    """Python's longest match: the verdict the program must give."""
    address = ipaddress.ip_address(source)
    matches = [(ipaddress.ip_network(c), audit) for c, audit in listed if address in ipaddress.ip_network(c)]
    if not matches:
        return XDP_PASS
    _, audit = max(matches, key=lambda m: m[0].prefixlen)
    return XDP_PASS if audit else XDP_DROP


def verdicts(maps: PrefilterMaps) -> dict[str, int]:
    return {p: maps.program.test_run(bytes(eth() / IP(src=p, dst=NODE4) / UDP()), repeat=1).retval for p in PROBES}


def entries(listed: list[tuple[str, bool]]) -> list[Entry]:
    return [Entry(ipaddress.ip_network(c), audit, i + 1) for i, (c, audit) in enumerate(listed)]


@pytest.fixture(scope="module")
def maps(make_datapath: Callable[[], Datapath]) -> PrefilterMaps:
    return make_datapath().load_prefilter(Capacity(hosts=64, prefixes=64))


def test_installed_prefixes_match_longest_first(maps: PrefilterMaps) -> None:
    maps.install(entries(LISTED))
    assert verdicts(maps) == {p: expected(LISTED, p) for p in PROBES}


def test_incremental_changes_keep_the_gates_exact(maps: PrefilterMaps) -> None:
    maps.install(entries(LISTED[:2]))
    current = list(LISTED[:2])
    listed = entries(LISTED)
    for entry, (cidr, audit) in zip(listed[2:], LISTED[2:], strict=True):  # one at a time
        maps.upsert([entry])
        current.append((cidr, audit))
        assert verdicts(maps) == {p: expected(current, p) for p in PROBES}, f"after adding {cidr}"
    for index in (4, 5, 3, 6, 0, 12, 14):  # remove some: both prefixes of one /24, the /1, hosts
        maps.remove([listed[index]])
        current.remove(LISTED[index])
        assert verdicts(maps) == {p: expected(current, p) for p in PROBES}, f"after removing {LISTED[index][0]}"
    maps.upsert([Entry(ipaddress.ip_network("10.1.2.128/25"), True, 6)])  # a mode switch keeps the gate
    current = [(c, True if c == "10.1.2.128/25" else a) for c, a in current]
    assert verdicts(maps) == {p: expected(current, p) for p in PROBES}


def test_only_short_or_only_long_prefixes_or_none(maps: PrefilterMaps) -> None:
    for listed in (LISTED[:2], [c for c in LISTED if int(c[0].split("/")[1]) >= 24], []):
        maps.install(entries(listed))
        assert verdicts(maps) == {p: expected(listed, p) for p in PROBES}, listed
    maps.install(entries(LISTED[:3]))
    maps.remove(entries(LISTED[:3]))  # back to nothing one by one: the gates go too
    assert set(verdicts(maps).values()) == {XDP_PASS}


def test_incremental_changes_in_spans_that_got_pages(maps: PrefilterMaps) -> None:
    maps.install(entries(LISTED))  # a bulk list: its spans with /24-and-longer entries get pages
    current = list(LISTED)
    listed = entries(LISTED)
    for index in (12, 5, 7, 15):  # hosts and long prefixes out of paged spans, one at a time
        maps.remove([listed[index]])
        current.remove(LISTED[index])
        assert verdicts(maps) == {p: expected(current, p) for p in PROBES}, f"after removing {LISTED[index][0]}"
    for index in (15, 5, 12):
        maps.upsert([listed[index]])
        current.append(LISTED[index])
        assert verdicts(maps) == {p: expected(current, p) for p in PROBES}, f"after adding {LISTED[index][0]}"
