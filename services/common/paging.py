"""Paging of list calls: one rule for page sizes and tokens in every service.

A page token is the key of the last item of the previous page, so a page stays correct
when items are added or removed between calls (no offsets that shift), and a client
can resume after a restart of the service. Clients treat it as opaque.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import TypeVar

from services.common.errors import InvalidArgument

T = TypeVar("T")


def page_size(requested: int, default: int, maximum: int) -> int:
    """The size to use: ``default`` for 0; a negative or too large size is refused."""
    if requested < 0:
        raise InvalidArgument(f"page_size {requested} is negative")
    if requested > maximum:
        raise InvalidArgument(f"page_size {requested} is above the maximum of {maximum}")
    return requested or default


def page(
    keys: Sequence[str],
    requested_size: int,
    token: str,
    get: Callable[[str], T],
    default_size: int,
    max_size: int,
) -> tuple[list[T], str]:
    """The items of the page after ``token`` among sorted ``keys``, and the next token ("" at the end)."""
    size = page_size(requested_size, default_size, max_size)
    start = bisect.bisect_right(keys, token) if token else 0
    chosen = keys[start : start + size]
    next_token = chosen[-1] if start + size < len(keys) else ""
    return [get(k) for k in chosen], next_token
