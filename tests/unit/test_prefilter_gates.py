"""The span array and block hash the datapath places IPv4 sources by (see services/prefilter/gates.py)."""

from __future__ import annotations

import ctypes
import ipaddress
import random
from array import array
from typing import Any

from services.prefilter.defs import V4_BLOCK_HOSTS, V4_PAGES, V4_SPAN_LONG, V4Block, V4Span
from services.prefilter.gates import V4Gates
from services.prefilter.keys import V4_HOST, V4_LPM


def key(cidr: str) -> bytes:
    network = ipaddress.ip_network(cidr)
    return (V4_HOST if network.prefixlen == 32 else V4_LPM).key(network)


def add(gates: V4Gates, cidr: str) -> None:
    (gates.add_host if cidr.endswith("/32") else gates.add_prefix)(key(cidr))


def discard(gates: V4Gates, cidr: str) -> None:
    (gates.discard_host if cidr.endswith("/32") else gates.discard_prefix)(key(cidr))


def unpack(keys: bytes, values: bytes, kind: type[V4Span] | type[V4Block]) -> dict[int, Any]:
    size = ctypes.sizeof(kind)
    return {k: kind.from_buffer_copy(values[i * size : (i + 1) * size]) for i, k in enumerate(array("I", keys))}


def contents(gates: V4Gates) -> tuple[dict[int, int], dict[int, V4Block]]:
    """Span bits and blocks by /24, wherever they live (hash or page)."""
    (span_keys, span_values), hashed, paged = gates.packed()
    spans = unpack(span_keys, span_values, V4Span)
    blocks = unpack(*hashed, V4Block)
    pages = {v.page - 1: s for s, v in spans.items() if v.page}
    for index, block in unpack(*paged, V4Block).items():
        span = pages[index - index % 256]
        blocks[span << 8 | index % 256] = block
    return {s: v.bits for s, v in spans.items()}, blocks


def covered(block: V4Block) -> set[int]:
    return {a for a in range(256) if block.covered[a >> 3] & (1 << (a & 7))}


def slot16(address: str) -> int:
    return int(ipaddress.ip_address(address)) >> 16


def slot24(address: str) -> int:
    return int(ipaddress.ip_address(address)) >> 8


def test_a_host_and_prefixes_of_one_24_share_its_block_with_the_exact_addresses_covered() -> None:
    gates = V4Gates()
    assert contents(gates) == ({}, {})  # nothing listed: every span reads 0, the program stops there
    add(gates, "10.1.2.7/32")
    add(gates, "10.1.2.128/25")
    add(gates, "10.1.2.64/30")
    spans, blocks = contents(gates)
    assert spans == {slot16("10.1.0.0"): V4_SPAN_LONG}
    block = blocks[slot24("10.1.2.0")]
    assert block.lengths == V4_BLOCK_HOSTS | 1 << (25 - 24) | 1 << (30 - 24)
    assert covered(block) == {7, 64, 65, 66, 67, *range(128, 256)}
    discard(gates, "10.1.2.128/25")
    discard(gates, "10.1.2.128/25")  # a repeat changes nothing
    assert covered(contents(gates)[1][slot24("10.1.2.0")]) == {7, 64, 65, 66, 67}
    discard(gates, "10.1.2.7/32")
    discard(gates, "10.1.2.64/30")
    assert contents(gates) == ({}, {})


def test_short_prefixes_mark_the_spans_they_cover_or_lie_in() -> None:
    gates = V4Gates(prefixes=[key("10.0.0.0/8"), key("172.16.0.0/20"), key("172.16.16.0/20")])
    spans, blocks = contents(gates)
    assert blocks == {}
    assert len([s for s in spans if spans[s] == 1 << 8]) == 256  # the /8 covers 256 spans, exactly
    assert spans[slot16("172.16.0.0")] == 1 << 20  # two /20s inside one span
    gates.discard_prefix(key("172.16.0.0/20"))
    gates.discard_prefix(key("10.0.0.0/8"))
    changed_spans, _, _ = gates.take_changes()
    assert V4Span.from_buffer_copy(changed_spans[slot16("172.16.0.0")]).bits == 1 << 20  # the other /20 is still there
    assert changed_spans[slot16("10.200.0.0")] == bytes(8)  # written back as zeros (an array slot is never deleted)
    gates.discard_prefix(key("172.16.16.0/20"))
    assert contents(gates) == ({}, {})


def test_incremental_changes_report_what_to_write() -> None:
    gates = V4Gates(hosts=[key("192.0.2.1/32")])
    assert gates.take_changes() == ({}, {}, {})
    add(gates, "192.0.2.2/32")
    spans, blocks, pages = gates.take_changes()
    assert spans == {} and pages == {}  # the /16 had a block already; no pages outside a bulk fill
    assert list(blocks) == [slot24("192.0.2.0")]
    discard(gates, "192.0.2.1/32")
    discard(gates, "192.0.2.2/32")
    spans, blocks, pages = gates.take_changes()
    assert spans == {slot16("192.0.0.0"): bytes(8)} and blocks == {slot24("192.0.2.0"): None}


def test_the_densest_spans_of_a_bulk_list_get_pages_and_keep_them() -> None:
    dense = [key(f"10.{i // 256}.{i % 256}.1/32") for i in range(3 * 256)]  # 256 blocks in each of 10.0-10.2
    sparse = [key(f"100.{i}.0.1/32") for i in range(V4_PAGES // 256)]  # one block in each of 256 spans
    gates = V4Gates(hosts=dense + sparse, pages=True)
    (span_keys, span_values), hashed, _ = gates.packed()
    spans = unpack(span_keys, span_values, V4Span)
    assert all(spans[slot16(f"10.{i}.0.0")].page for i in range(3))
    assert sum(1 for v in spans.values() if v.page) == V4_PAGES // 256  # the rest of the pages went to sparse ones
    assert len(array("I", hashed[0])) == 3  # three sparse spans got no pages: their blocks are hashed
    add(gates, "10.1.7.9/32")
    discard(gates, "10.2.3.1/32")
    _, blocks, pages = gates.take_changes()
    assert blocks == {} and len(pages) == 2  # a paged span's blocks stay in its pages
    base = spans[slot16("10.2.0.0")].page - 1
    assert pages[base + 3] == bytes(ctypes.sizeof(V4Block))  # emptied: zeros, not a deleted slot


def walk(gates: V4Gates, listed: set[str], address: int) -> str | None:
    """What the program finds for `address`, read from the maps' contents as it reads them."""
    spans, blocks = contents(gates)
    span = spans.get(address >> 16, 0)
    block = blocks.get(address >> 8) if span & V4_SPAN_LONG else None
    if block is not None and (address & 0xFF) in covered(block):
        for length in range(32, 23, -1):
            if block.lengths & (1 << (length - 24)):
                cidr = f"{ipaddress.ip_network((address, length), strict=False)}"
                if cidr in listed:
                    return cidr
    for length in range(23, -1, -1):
        if span & (1 << length):
            cidr = f"{ipaddress.ip_network((address, length), strict=False)}"
            if cidr in listed:
                return cidr
    return None


def longest(listed: set[str], address: int) -> str | None:
    networks = map(ipaddress.ip_network, listed)
    matches = [n for n in networks if int(n.network_address) == address >> (32 - n.prefixlen) << (32 - n.prefixlen)]
    return str(max(matches, key=lambda n: n.prefixlen)) if matches else None


def test_random_lists_place_every_address_as_the_longest_match_does() -> None:
    rng = random.Random(7)
    base = int(ipaddress.ip_address("10.1.0.0"))
    listed: set[str] = set()
    for _ in range(60):
        length = rng.choice([8, 12, 16, 17, 20, 23, 24, 25, 26, 28, 30, 31, 32, 32, 32])
        address = base + rng.randrange(1 << 18)
        listed.add(str(ipaddress.ip_network((address, length), strict=False)))
    hosts = [key(c) for c in listed if c.endswith("/32")]
    gates = V4Gates(hosts=hosts, prefixes=[key(c) for c in listed if not c.endswith("/32")], pages=True)
    probes = [base + rng.randrange(1 << 18) for _ in range(300)] + [
        int(ipaddress.ip_network(c).network_address) for c in listed
    ]
    assert {p: walk(gates, listed, p) for p in probes} == {p: longest(listed, p) for p in probes}
    for cidr in sorted(listed)[::2]:  # half removed one at a time
        discard(gates, cidr)
        listed.discard(cidr)
    for cidr in ("10.1.0.0/16", "10.1.2.0/24", "10.1.2.128/25", "10.1.2.129/32", "10.0.0.0/8"):  # added one by one
        add(gates, cidr)
        listed.add(cidr)
    assert {p: walk(gates, listed, p) for p in probes} == {p: longest(listed, p) for p in probes}
