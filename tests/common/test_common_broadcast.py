"""Broadcast (watch streams) and paging helpers, without a kernel."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.common.broadcast import Broadcast
from services.common.errors import Aborted, InvalidArgument
from services.common.paging import page


def test_every_subscriber_gets_items_published_from_a_thread() -> None:
    async def scenario() -> None:
        hub: Broadcast[int] = Broadcast(depth=100)
        with hub.subscribe() as a, hub.subscribe() as b:

            def publish_all() -> None:
                for i in range(50):
                    hub.publish(i)

            worker = threading.Thread(target=publish_all)
            worker.start()
            worker.join()
            got_a = [await asyncio.wait_for(a.get(), 2) for _ in range(50)]
            got_b = [await asyncio.wait_for(b.get(), 2) for _ in range(50)]
            assert got_a == got_b == list(range(50))
            assert hub.subscribers == 2
        assert hub.subscribers == 0
        hub.publish(99)  # nobody listens: nothing queued, nothing raised

    asyncio.run(scenario())


def test_a_slow_state_watcher_is_aborted_and_others_are_not_held_up() -> None:
    async def scenario() -> None:
        hub: Broadcast[int] = Broadcast(depth=4)
        with hub.subscribe() as slow, hub.subscribe() as fast:
            got = []
            for i in range(10):
                hub.publish(i)
                got.append(await fast.get())
            assert got == list(range(10))
            with pytest.raises(Aborted, match="list again"):
                async for _ in slow:
                    pass

    asyncio.run(scenario())


def test_a_flow_watcher_drops_the_oldest_and_counts_them() -> None:
    async def scenario() -> None:
        hub: Broadcast[int] = Broadcast(depth=3, drop_oldest=True)
        with hub.subscribe() as sub:
            for i in range(10):
                hub.publish(i)
            assert [await sub.get() for _ in range(3)] == [7, 8, 9]
            assert sub.dropped == 7

    asyncio.run(scenario())


def test_pages_resume_after_the_last_key_even_when_items_change() -> None:
    items = {k: k.upper() for k in ["a", "b", "c", "d", "e"]}
    first, token = page(sorted(items), 2, "", items.__getitem__, default_size=10, max_size=100)
    assert (first, token) == (["A", "B"], "b")
    del items["a"]
    items["bb"] = "BB"  # added after the page boundary: the next page shows it
    second, token = page(sorted(items), 2, token, items.__getitem__, default_size=10, max_size=100)
    assert (second, token) == (["BB", "C"], "c")
    last, token = page(sorted(items), 2, token, items.__getitem__, default_size=10, max_size=100)
    assert (last, token) == (["D", "E"], "")
    assert page(sorted(items), 0, "", items.__getitem__, default_size=10, max_size=100)[1] == ""


@pytest.mark.parametrize(("size", "reason"), [(-1, "negative"), (101, "above the maximum of 100")])
def test_bad_page_sizes_are_refused(size: int, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        page(["a"], size, "", str, default_size=10, max_size=100)
