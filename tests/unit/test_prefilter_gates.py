"""The gate bitmaps the datapath walks IPv4 prefixes by (see services/prefilter/gates.py)."""

from __future__ import annotations

import ipaddress
from array import array

from services.prefilter.defs import V4_GATE_ANY_LONG, V4_GATE_SHORT
from services.prefilter.gates import V4Gates
from services.prefilter.keys import V4_LPM


def key(cidr: str) -> bytes:
    return V4_LPM.key(ipaddress.ip_network(cidr))


def contents(gates: V4Gates) -> dict[int, int]:
    keys, values = gates.packed()
    return dict(zip(array("I", keys), array("I", values), strict=True))


def test_gates_follow_adds_and_removes_with_the_any_long_bit() -> None:
    gates = V4Gates()
    assert contents(gates) == {}  # no prefix: no SHORT key, the program stops at one lookup
    assert gates.add(key("10.0.0.0/8")) == V4_GATE_SHORT
    assert contents(gates) == {V4_GATE_SHORT: 1 << 8}
    slot = (10 << 16) | (1 << 8) | 2  # 10.1.2.0/24 >> 8
    assert gates.add(key("10.1.2.128/25")) == slot
    assert gates.add(key("10.1.2.128/25")) is None  # counted once
    gates.add(key("10.1.2.0/26"))
    assert contents(gates) == {V4_GATE_SHORT: 1 << 8 | V4_GATE_ANY_LONG, slot: 1 << 1 | 1 << 2}
    assert gates.discard(key("10.1.2.0/26")) == slot
    assert contents(gates)[slot] == 1 << 1
    gates.discard(key("10.0.0.0/8"))
    assert contents(gates) == {V4_GATE_SHORT: V4_GATE_ANY_LONG, slot: 1 << 1}  # SHORT stays for ANY_LONG
    gates.discard(key("10.1.2.128/25"))
    assert gates.discard(key("10.1.2.128/25")) is None
    assert contents(gates) == {} and gates.bits(V4_GATE_SHORT) == 0


def test_two_prefixes_of_one_length_in_one_slot_clear_the_bit_only_when_both_are_gone() -> None:
    gates = V4Gates([key("10.1.2.0/25"), key("10.1.2.128/25"), key("10.0.0.0/9"), key("10.128.0.0/9")])
    slot = (10 << 16) | (1 << 8) | 2
    gates.discard(key("10.1.2.0/25"))
    gates.discard(key("10.0.0.0/9"))
    assert contents(gates) == {V4_GATE_SHORT: 1 << 9 | V4_GATE_ANY_LONG, slot: 1 << 1}
