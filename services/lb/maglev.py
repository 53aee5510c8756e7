"""Backend selection tables: Maglev (consistent hashing) and a weighted list.

Maglev (Eisenbud et al., NSDI 2016) fills a table of prime size M: every
backend walks its own permutation of the slots (offset and skip from two
hashes of its name and the service's seed) and takes the next free slot in
turn. Removing one of N backends then moves about 1/N of the slots plus a
little more. Weights give a backend that many turns per round.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from math import gcd

from services.common.errors import InvalidArgument


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _hash(text: str, seed: int, salt: bytes) -> int:
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=seed.to_bytes(8, "little"), salt=salt).digest()
    return int.from_bytes(digest, "little")


def maglev_table(backends: Sequence[tuple[str, int]], size: int, seed: int = 0) -> list[int]:
    """Slot -> index into `backends` ((name, weight) pairs, weight > 0)."""
    if not is_prime(size):
        raise InvalidArgument(f"Maglev table size {size} is not a prime")
    live = [(i, name, weight) for i, (name, weight) in enumerate(backends) if weight > 0]
    if not live:
        return []
    if size < len(live):
        raise InvalidArgument(f"Maglev table size {size} is smaller than the {len(live)} backends")
    offsets = [_hash(name, seed, b"offset") % size for _, name, _ in live]
    skips = [_hash(name, seed, b"skip") % (size - 1) + 1 for _, name, _ in live]
    turns = [w // _gcd_of(w for _, _, w in live) for _, _, w in live]
    nexts = [0] * len(live)
    table = [-1] * size
    filled = 0
    while True:
        for k, (index, _, _) in enumerate(live):
            for _ in range(turns[k]):
                while True:
                    slot = (offsets[k] + nexts[k] * skips[k]) % size
                    nexts[k] += 1
                    if table[slot] < 0:
                        break
                table[slot] = index
                filled += 1
                if filled == size:
                    return table


def _gcd_of(values: Iterable[int]) -> int:
    out = 0
    for v in values:
        out = gcd(out, v)
    return out or 1


def weighted_table_size(weights: Iterable[int]) -> int:
    """Length of the weighted table for these weights, computed without building it."""
    live = [w for w in weights if w > 0]
    g = _gcd_of(live)
    return sum(w // g for w in live)


def weighted_table(backends: Sequence[tuple[str, int]], limit: int | None = None) -> list[int]:
    """Each backend `weight` times (weights divided by their gcd), for hash % len.

    Over ``limit`` slots is refused before the table is allocated.
    """
    live = [(i, w) for i, (_, w) in enumerate(backends) if w > 0]
    if not live:
        return []
    g = _gcd_of(w for _, w in live)
    size = sum(w // g for _, w in live)
    if limit is not None and size > limit:
        raise InvalidArgument(f"the weights need a hash table of {size} slots, above the limit of {limit}")
    return [i for i, w in live for _ in range(w // g)]
