"""Which IPv4 prefix lengths are present where: the contents of the datapath's gate map.

The datapath finds an IPv4 prefix by trying lengths longest first, in one hash keyed
like an LPM trie (length, masked address). It tries only the lengths the gate says
are present: per /24 (`V4_GATE_LEN`), the lengths 24..31 of prefixes inside it; at
the key `V4_GATE_SHORT`, the lengths 0..23 present anywhere, plus `V4_GATE_ANY_LONG`
when any /24 has a bitmap (the program reads that key first). This class keeps, per
gate slot, how many listed prefixes hold each length, so adding or removing one
prefix changes at most one slot, computed without a scan.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

from services.prefilter.defs import V4_GATE_ANY_LONG, V4_GATE_LEN, V4_GATE_SHORT


def slot_bit(raw: bytes) -> tuple[int, int]:
    """The gate slot and length bit of a raw IPv4 prefix key (length LE u32, address)."""
    length = int.from_bytes(raw[:4], "little")
    if length >= V4_GATE_LEN:
        return int.from_bytes(raw[4:8], "big") >> (32 - V4_GATE_LEN), 1 << (length - V4_GATE_LEN)
    return V4_GATE_SHORT, 1 << length


class V4Gates:
    """Listed IPv4 prefixes counted per (gate slot, length bit)."""

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        self._keys: set[bytes] = set()
        self._counts: dict[int, dict[int, int]] = {}
        for raw in keys:
            self.add(raw)

    def add(self, raw: bytes) -> int | None:
        """Count a prefix; the slot whose bits may have changed (None if it was counted already)."""
        if raw in self._keys:
            return None
        self._keys.add(raw)
        slot, bit = slot_bit(raw)
        bits = self._counts.setdefault(slot, {})
        bits[bit] = bits.get(bit, 0) + 1
        return slot

    def discard(self, raw: bytes) -> int | None:
        """Uncount a prefix; the slot whose bits may have changed (None if it was not counted)."""
        if raw not in self._keys:
            return None
        self._keys.discard(raw)
        slot, bit = slot_bit(raw)
        bits = self._counts[slot]
        bits[bit] -= 1
        if not bits[bit]:
            del bits[bit]
        if not bits:
            del self._counts[slot]
        return slot

    def bits(self, slot: int) -> int:
        """The slot's bitmap (0: the slot is absent from the map)."""
        out = 0
        for bit in self._counts.get(slot, {}):
            out |= bit
        if slot == V4_GATE_SHORT and len(self._counts) > (V4_GATE_SHORT in self._counts):
            out |= V4_GATE_ANY_LONG
        return out

    def slots(self) -> list[int]:
        """Every slot with a bitmap."""
        out = list(self._counts)
        if out and V4_GATE_SHORT not in self._counts:
            out.append(V4_GATE_SHORT)  # for its ANY_LONG bit
        return out

    def packed(self) -> tuple[bytes, bytes]:
        """Every slot and its bitmap as packed u32 keys and values (host order), for one batch."""
        slots = array("I", self.slots())
        return slots.tobytes(), array("I", (self.bits(s) for s in slots)).tobytes()
