"""Where IPv4 entries are: the span array and block hash the datapath reads before any walk.

The datapath looks an IPv4 source up without walking what is not there:
- span[/16] (an array of `V4_SPANS` u32): bit L for L <= 16 when a listed prefix of length L
  covers the whole /16; bit L for 17..23 when one of that length lies inside it; `V4_SPAN_LONG`
  when one of its /24s holds entries of length 24..32 (hosts included), i.e. has a block.
- block[/24] (`V4Block`): the lengths 24..32 present in the /24 and, exactly, which of its 256
  addresses they cover. The densest spans of a bulk list (up to V4_PAGES / 256 of them) get 256
  pages of an array for their blocks, named in the span (`V4Span.page`); other blocks live in a
  hash. Spans keep their pages (or none) until the next bulk list.
A miss far from every entry reads one array slot; a miss inside a /24 with entries reads its
block as well (one more array slot in a paged span) and stops at the address's bit. Only a
covered address (a match, unless a change is under way) and the lengths 17..23 a span names
walk the hashes, longest length first.

This class keeps what the two maps are computed from, so one entry added or removed changes a
few slots, found without a scan: per /24 the hosts (a 256-bit int) and the prefixes 24..31 (a
255-bit int, one bit per possible prefix), the shorter prefixes per length, and per /16 the
number of blocks and of prefixes 17..23 inside it. A prefix of length L <= 16 touches the
2 ** (16 - L) spans it covers (all 65536 for a /0).
"""

from __future__ import annotations

import ctypes
import sys
from array import array
from collections.abc import Iterable

from services.prefilter.defs import (
    V4_BLOCK_HOSTS,
    V4_BLOCK_LEN,
    V4_BLOCKS_PER_SPAN,
    V4_PAGES,
    V4_SPAN_LEN,
    V4_SPAN_LONG,
    V4Block,
)

_BLOCK_BITS = 32 - V4_BLOCK_LEN  # address bits inside a block (8)
_BLOCK_ADDRESSES = 1 << _BLOCK_BITS
_SPAN_SHIFT = 32 - V4_SPAN_LEN
_BLOCKS_PER_SPAN_SHIFT = V4_BLOCK_LEN - V4_SPAN_LEN
_NO_BLOCK = bytes(ctypes.sizeof(V4Block))


def _prefix_position(length: int, low: int) -> int:
    """The bit of a prefix of length 24..31 in its block's prefix bitmap (low: its last address byte)."""
    return (1 << (length - V4_BLOCK_LEN)) - 1 + (low >> (32 - length))


def _position_range(position: int) -> tuple[int, int]:
    """(length, covered-address mask) of a prefix bitmap position."""
    level = (position + 1).bit_length() - 1  # length - 24
    index = position + 1 - (1 << level)
    size = _BLOCK_ADDRESSES >> level
    return V4_BLOCK_LEN + level, ((1 << size) - 1) << (index * size)


class V4Gates:
    """Listed IPv4 hosts and prefixes, as the span array and block hash must show them."""

    def __init__(self, hosts: Iterable[bytes] = (), prefixes: Iterable[bytes] = (), pages: bool = False) -> None:
        """A bulk list; with `pages`, its densest spans get pages (a generation's fill)."""
        self._hosts: dict[int, int] = {}  # block -> bitmap of its listed hosts
        self._longs: dict[int, int] = {}  # block -> bitmap of its prefixes 24..31 (_prefix_position)
        self._short: list[set[int]] = [set() for _ in range(V4_BLOCK_LEN)]  # length -> network numbers
        self._inside: dict[int, dict[int, int]] = {}  # span -> {length 17..23: prefixes inside it}
        self._blocks_in: dict[int, int] = {}  # span -> blocks it holds
        self._dirty_spans: set[int] = set()
        self._dirty_blocks: set[int] = set()
        self._bulk_hosts(hosts)
        for raw in prefixes:
            self.add_prefix(raw)
        self._dirty_spans.clear()
        self._dirty_blocks.clear()
        self._page_base: dict[int, int] = {}  # span -> its first page
        if pages:
            densest = sorted(self._blocks_in, key=lambda span: (-self._blocks_in[span], span))
            for n, span in enumerate(densest[: V4_PAGES // V4_BLOCKS_PER_SPAN]):
                self._page_base[span] = n * V4_BLOCKS_PER_SPAN

    def _bulk_hosts(self, hosts: Iterable[bytes]) -> None:
        addresses = array("I", b"".join(hosts))
        if sys.byteorder == "little":
            addresses.byteswap()  # network order -> numbers
        bitmaps, get = self._hosts, self._hosts.get
        for h in addresses:
            block = h >> _BLOCK_BITS
            bitmaps[block] = get(block, 0) | 1 << (h & 0xFF)
        blocks_in, count = self._blocks_in, self._blocks_in.get
        for block in bitmaps:
            span = block >> _BLOCKS_PER_SPAN_SHIFT
            blocks_in[span] = count(span, 0) + 1

    # ---- changes ----

    def _set_block(self, block: int, hosts: int, longs: int) -> None:
        was = bool(self._hosts.get(block) or self._longs.get(block))
        for table, bits in ((self._hosts, hosts), (self._longs, longs)):
            if bits:
                table[block] = bits
            else:
                table.pop(block, None)
        now = bool(hosts or longs)
        self._dirty_blocks.add(block)
        if was != now:
            span = block >> _BLOCKS_PER_SPAN_SHIFT
            count = self._blocks_in.get(span, 0) + (1 if now else -1)
            if count:
                self._blocks_in[span] = count
            else:
                self._blocks_in.pop(span, None)
            self._dirty_spans.add(span)

    def add_host(self, raw: bytes) -> None:
        h = int.from_bytes(raw, "big")
        block, bit = h >> _BLOCK_BITS, 1 << (h & 0xFF)
        self._set_block(block, self._hosts.get(block, 0) | bit, self._longs.get(block, 0))

    def discard_host(self, raw: bytes) -> None:
        h = int.from_bytes(raw, "big")
        block, bit = h >> _BLOCK_BITS, 1 << (h & 0xFF)
        self._set_block(block, self._hosts.get(block, 0) & ~bit, self._longs.get(block, 0))

    def add_prefix(self, raw: bytes) -> None:
        self._prefix(raw, add=True)

    def discard_prefix(self, raw: bytes) -> None:
        self._prefix(raw, add=False)

    def _prefix(self, raw: bytes, add: bool) -> None:
        """Count or uncount a raw IPv4 prefix key (length LE u32, address); a repeat changes nothing."""
        length, address = int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:8], "big")
        if length >= V4_BLOCK_LEN:
            block = address >> _BLOCK_BITS
            bit = 1 << _prefix_position(length, address & 0xFF)
            longs = self._longs.get(block, 0)
            self._set_block(block, self._hosts.get(block, 0), longs | bit if add else longs & ~bit)
            return
        networks, number = self._short[length], address >> (32 - length) if length else 0
        if (number in networks) == add:
            return
        if add:
            networks.add(number)
        else:
            networks.discard(number)
        if length <= V4_SPAN_LEN:
            first = number << (V4_SPAN_LEN - length)
            self._dirty_spans.update(range(first, first + (1 << (V4_SPAN_LEN - length))))
            return
        span = address >> _SPAN_SHIFT
        inside = self._inside.setdefault(span, {})
        inside[length] = inside.get(length, 0) + (1 if add else -1)
        if not inside[length]:
            del inside[length]
        if not inside:
            del self._inside[span]
        self._dirty_spans.add(span)

    # ---- map contents ----

    def span(self, span: int) -> int:
        """The span's length bits (0: nothing listed in or over this /16)."""
        bits = V4_SPAN_LONG if span in self._blocks_in else 0
        for length in range(V4_SPAN_LEN + 1):
            networks = self._short[length]
            if networks and (span >> (V4_SPAN_LEN - length)) in networks:
                bits |= 1 << length
        for length in self._inside.get(span, ()):
            bits |= 1 << length
        return bits

    def span_value(self, span: int) -> bytes:
        """The span's V4Span, packed: its bits and 1 + its first page (0: its blocks are in the hash)."""
        base = self._page_base.get(span)
        page = 0 if base is None else base + 1
        return self.span(span).to_bytes(4, sys.byteorder) + page.to_bytes(4, sys.byteorder)

    def page(self, block: int) -> int | None:
        """The page index of a block whose span has pages (None: the block lives in the hash)."""
        base = self._page_base.get(block >> _BLOCKS_PER_SPAN_SHIFT)
        return None if base is None else base + (block & (V4_BLOCKS_PER_SPAN - 1))

    def block(self, block: int) -> bytes | None:
        """The block's V4Block value, packed (None: no entry of length 24..32 in this /24)."""
        hosts, longs = self._hosts.get(block, 0), self._longs.get(block, 0)
        if not hosts and not longs:
            return None
        lengths, covered = V4_BLOCK_HOSTS if hosts else 0, hosts
        while longs:
            low = longs & -longs
            length, mask = _position_range(low.bit_length() - 1)
            lengths |= 1 << (length - V4_BLOCK_LEN)
            covered |= mask
            longs ^= low
        return lengths.to_bytes(4, sys.byteorder) + covered.to_bytes(_BLOCK_ADDRESSES // 8, "little")

    def spans(self) -> list[int]:
        """Every span with nonzero bits."""
        found = set(self._blocks_in) | set(self._inside)
        for length in range(V4_SPAN_LEN + 1):
            width = 1 << (V4_SPAN_LEN - length)
            for number in self._short[length]:
                found.update(range(number * width, (number + 1) * width))
        return sorted(found)

    def packed(self) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes], tuple[bytes, bytes]]:
        """(spans, hash blocks, pages), each as packed (keys, values) for one batch."""
        spans = array("I", self.spans())  # a paged span has blocks, so it is among them
        span_values = b"".join(self.span_value(s) for s in spans)
        hashed, hashed_values = array("I"), []
        paged, paged_values = array("I"), []
        hosts_only = V4_BLOCK_HOSTS.to_bytes(4, sys.byteorder)
        longs, page_base = self._longs, self._page_base
        # Up to 1M blocks: walked in the dict's own order, the common value (hosts only) built inline.
        found = [
            (b, self.block(b) if b in longs else hosts_only + h.to_bytes(32, "little")) for b, h in self._hosts.items()
        ]
        found += [(b, self.block(b)) for b in longs if b not in self._hosts]
        for block, value in found:
            base = page_base.get(block >> _BLOCKS_PER_SPAN_SHIFT) if page_base else None
            if base is None:
                hashed.append(block)
                hashed_values.append(value or b"")
            else:
                paged.append(base + (block & (V4_BLOCKS_PER_SPAN - 1)))
                paged_values.append(value or b"")
        return (
            (spans.tobytes(), span_values),
            (hashed.tobytes(), b"".join(hashed_values)),
            (paged.tobytes(), b"".join(paged_values)),
        )

    def take_changes(self) -> tuple[dict[int, bytes], dict[int, bytes | None], dict[int, bytes]]:
        """What changed since the last call: spans (new V4Span), hash blocks (None: delete), pages (zeros: empty)."""
        spans = {s: self.span_value(s) for s in self._dirty_spans}
        hashed: dict[int, bytes | None] = {}
        pages: dict[int, bytes] = {}
        for b in self._dirty_blocks:
            page = self.page(b)
            if page is None:
                hashed[b] = self.block(b)
            else:
                pages[page] = self.block(b) or _NO_BLOCK
        self._dirty_spans.clear()
        self._dirty_blocks.clear()
        return spans, hashed, pages
