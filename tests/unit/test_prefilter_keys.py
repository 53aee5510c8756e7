"""The fast CIDR parser and the bulk list form, against the `ipaddress` path they replace."""

from __future__ import annotations

import ipaddress

import pytest

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.validate import CidrError, parse_cidr
from services.prefilter.denylist import Capacity, DenyList, Packed, parse_entries, parse_wanted, wanted_of
from services.prefilter.keys import V4_HOST, V4_LPM, V6_HOST, kind_of, raw_key

VALID = [
    "10.0.0.1", "10.0.0.1/32", "0.0.0.0/0", "10.0.0.0/8", "10.0.0.0/08", "255.255.255.255",
    "2001:db8::1", "2001:db8::/32", "::/0", "::ffff:10.0.0.1", "fe80::5", "fe80::/10",
    "2001:DB8::1/128", "1.2.3.0/255.255.255.0", "10.0.0.1 ", "10.0.0.0/\u0668",  # ipaddress takes these two
]  # fmt: skip
INVALID = [
    "", " ", "10.0.0.256", "10.0.0.01", "10.0.0.1/33", "10.0.0.1/24", "10.0.0.0/-1",
    "10.0.0.0/+8", "2001:db8::1/129", "2001:db8::1/64", "fe80::5%eth0", "1::2::3",
    "10.0.0.0/8/8", "x" * 80, "10.0.0.1\0", "1.2.3",
]  # fmt: skip


@pytest.mark.parametrize("text", VALID)
def test_fast_parser_gives_the_key_ipaddress_gives(text: str) -> None:
    network = parse_cidr(text)
    assert raw_key(text) == (kind_of(network), kind_of(network).key(network))


@pytest.mark.parametrize("text", INVALID)
def test_fast_parser_refuses_what_parse_cidr_refuses_with_its_reason(text: str) -> None:
    with pytest.raises(CidrError) as slow:
        parse_cidr(text)
    with pytest.raises(CidrError) as fast:
        raw_key(text)
    assert str(fast.value) == str(slow.value)


def _v4(*addresses: str) -> bytes:
    return b"".join(ipaddress.IPv4Address(a).packed for a in addresses)


def test_packed_blocks_and_text_make_one_list() -> None:
    wanted = parse_wanted(
        [("10.0.0.1", False), ("10.9.0.0/16", True)],
        [Packed(4, _v4("10.0.0.1", "10.0.0.2"), False), Packed(6, ipaddress.IPv6Address("2001:db8::7").packed, True)],
    )
    assert wanted[V4_HOST] == {_v4("10.0.0.1"): 0, _v4("10.0.0.2"): 0}  # the same host twice counts once
    assert wanted[V6_HOST] == {ipaddress.IPv6Address("2001:db8::7").packed: 1}
    assert wanted[V4_LPM] == {(16).to_bytes(4, "little") + _v4("10.9.0.0"): 1}
    assert wanted == wanted_of({**parse_entries([("10.0.0.1", False), ("10.0.0.2", False), ("10.9.0.0/16", True),
                                                ("2001:db8::7", True)])})  # fmt: skip


@pytest.mark.parametrize(
    ("text", "blocks", "message"),
    [
        ([], [Packed(4, b"\x0a\x00\x00", False, "packed[0].ipv4")], "packed\\[0\\].ipv4: 3 bytes is not a whole"),
        ([], [Packed(6, bytes(20), False, "packed[1].ipv6")], "packed\\[1\\].ipv6: 20 bytes"),
        ([("10.0.0.1", True)], [Packed(4, _v4("10.0.0.1"), False)], "10.0.0.1/32 is given twice with different"),
        ([("10.0.0.1", True), ("10.0.0.1/32", False)], [], "entry 1: 10.0.0.1/32 is given twice"),
        ([("10.0.0.1/24", False)], [], "entry 0: .*host bits"),
    ],
)
def test_bad_bulk_lists_are_refused_saying_where(
    text: list[tuple[str, bool]], blocks: list[Packed], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_wanted(text, blocks)


def test_bulk_replace_keeps_ids_takes_leaving_ones_then_new_ones() -> None:
    deny = DenyList(Capacity(hosts=1000, prefixes=10))
    first = deny.plan_replace(parse_wanted([], [Packed(4, _v4(*(f"10.0.0.{i}" for i in range(100))), False)]))
    assert sorted(first.fresh_ids) == list(range(100)) and first.changed == 100
    deny.commit_replace(first)
    ids = {str(e.network): e.id for e in deny.entries.values()}
    # Keep 10.0.0.0-49, drop 50-99, add 50 new hosts (which take the leaving ids) and 10 more.
    kept = [f"10.0.0.{i}" for i in range(50) if i != 7]
    new = [f"10.0.1.{i}" for i in range(60)]
    plan = deny.plan_replace(parse_wanted([("10.0.0.7", True)], [Packed(4, _v4(*kept, *new), False)]))
    got = {str(e.network): e.id for e in plan.entries()}
    assert all(got[f"{a}/32"] == ids[f"{a}/32"] for a in [*kept, "10.0.0.7"])
    assert {got[f"{a}/32"] for a in new} == set(range(50, 110))
    assert plan.reused_ids == set(range(50, 100)) and plan.changed == 50 + 60 + 1  # left, added, switched mode
    deny.commit_replace(plan)
    assert len(deny.entries) == 110 and deny.entries[ipaddress.ip_network("10.0.0.7/32")].audit


def test_bulk_replace_over_capacity_is_refused_and_takes_no_ids() -> None:
    deny = DenyList(Capacity(hosts=3, prefixes=1))
    with pytest.raises(ResourceExhausted, match="4 IPv4 host \\(/32\\) entries do not fit: the map holds 3"):
        deny.plan_replace(parse_wanted([], [Packed(4, _v4("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"), False)]))
    plan = deny.plan_replace(parse_wanted([("10.0.0.1", False)]))
    assert plan.fresh_ids == [0]


@pytest.mark.parametrize("text", [*VALID, "::ffff:1.2.3.4/128", "2001:db8:0:1::/64", "0.0.0.0/0", "::/0"])
def test_listing_text_is_what_str_of_the_network_gives(text: str) -> None:
    kind, raw = raw_key(text)
    assert kind.text(raw) == str(parse_cidr(text))
