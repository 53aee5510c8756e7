"""Maglev and weighted tables, without a kernel."""

from __future__ import annotations

import collections

import pytest

from services.common.errors import InvalidArgument
from services.lb.maglev import is_prime, maglev_table, weighted_table


def test_primes() -> None:
    assert [n for n in range(20) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19]
    assert is_prime(16381) and not is_prime(16383)


def test_every_backend_gets_its_share() -> None:
    table = maglev_table([(f"b{i}", 1) for i in range(10)], 1021, seed=1)
    counts = collections.Counter(table)
    assert len(table) == 1021 and set(counts) == set(range(10))
    assert max(counts.values()) - min(counts.values()) <= 2


def test_weights_shape_the_shares() -> None:
    counts = collections.Counter(maglev_table([("a", 1), ("b", 2), ("c", 3)], 1021))
    assert [round(counts[i] / 1021 * 6) for i in range(3)] == [1, 2, 3]


def test_removing_one_of_ten_moves_little_of_the_rest() -> None:
    names = [f"b{i}" for i in range(10)]
    before = [names[i] for i in maglev_table([(n, 1) for n in names], 1021, seed=7)]
    rest = names[:3] + names[4:]
    after = [rest[i] for i in maglev_table([(n, 1) for n in rest], 1021, seed=7)]
    kept = [(x, y) for x, y in zip(before, after, strict=True) if x != "b3"]
    moved = sum(1 for x, y in kept if x != y)
    assert moved / len(kept) < 0.06  # Maglev's paper: a few percent beyond the removed backend's slots


def test_seed_changes_the_table_and_zero_weight_takes_nothing() -> None:
    backends = [("a", 1), ("b", 1), ("c", 0)]
    assert maglev_table(backends, 101, seed=1) != maglev_table(backends, 101, seed=2)
    assert 2 not in maglev_table(backends, 101)
    assert maglev_table([("a", 0)], 101) == []


def test_bad_sizes() -> None:
    with pytest.raises(InvalidArgument, match="not a prime"):
        maglev_table([("a", 1)], 100)
    with pytest.raises(InvalidArgument, match="smaller than"):
        maglev_table([(str(i), 1) for i in range(5)], 3)


def test_weighted_list() -> None:
    assert weighted_table([("a", 2), ("b", 4), ("c", 0)]) == [0, 1, 1]
