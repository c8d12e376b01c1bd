"""`qserve.server.expiry.Expiries`: the connections' deadlines as numbers, acted on by one task at the
instant trio's own deadline would fire. Virtual time (`autojump_clock`); every test under `fail_after`
(`_watching`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator

import trio
import trio.testing

from qserve.server.expiry import GRAIN, Expiries

LIMIT = 1000   # virtual seconds for each test


class Item:
    """A watched thing: records when it was told its time had come."""

    def __init__(self) -> None:
        self.expiry = math.inf
        self.fired: list[float] = []

    def expired(self) -> None:
        self.fired.append(trio.current_time())


@contextlib.asynccontextmanager
async def _watching(items: list[Item], horizon: float = math.inf) -> AsyncIterator[tuple[Expiries, float]]:
    """`Expiries` over ``items`` with its task running and idle; yields it and the time it started."""
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            expiries = Expiries(set(items), horizon)
            nursery.start_soon(expiries.run)
            await trio.testing.wait_all_tasks_blocked()
            yield expiries, trio.current_time()
            nursery.cancel_scope.cancel()


async def test_an_expiry_fires_at_its_instant_once_and_resets(autojump_clock):
    a, b = Item(), Item()
    async with _watching([a, b]) as (expiries, start):
        expiries.set(a, start + 3.0)
        expiries.set(b, start + 7.0)
        await trio.sleep(10)
        assert a.fired == [start + 3.0] and b.fired == [start + 7.0]
        assert a.expiry == b.expiry == math.inf   # one cancellation per setting
        await trio.sleep(100)
        assert len(a.fired) == len(b.fired) == 1


async def test_an_expiry_set_earlier_than_the_task_will_look_wakes_it(autojump_clock):
    """The task sleeps until the earliest expiry it saw (60 s away); a 1 s expiry set afterwards
    is still acted on at 1 s, not at 60 s."""
    idle, busy = Item(), Item()
    async with _watching([idle, busy]) as (expiries, start):
        expiries.set(idle, start + 60.0)
        await trio.testing.wait_all_tasks_blocked()
        assert expiries.next == start + 60.0
        await trio.sleep(5)
        expiries.set(busy, trio.current_time() + 1.0)
        await trio.sleep(2)
        assert busy.fired == [start + 6.0] and idle.fired == []
        await trio.sleep(60)
        assert idle.fired == [start + 60.0]


async def test_a_moved_expiry_does_not_fire_at_its_old_time(autojump_clock):
    """As a keep-alive wait that a request ended: the connection moved its expiry on, and only the
    new one counts; setting infinity means never."""
    item = Item()
    async with _watching([item]) as (expiries, start):
        expiries.set(item, start + 2.0)
        await trio.sleep(1)
        expiries.set(item, start + 30.0)
        await trio.sleep(5)
        assert item.fired == []
        item.expiry = math.inf   # a handler runs: no deadline
        await trio.sleep(60)
        assert item.fired == []


async def test_the_task_looks_no_more_often_than_its_grain(autojump_clock):
    """A hundred expiries 1 ms apart are acted on in looks at least GRAIN apart (each late by less
    than GRAIN), not in a hundred looks."""
    items = [Item() for _ in range(100)]
    async with _watching(items) as (expiries, start):
        for i, item in enumerate(items):
            expiries.set(item, start + 1.0 + i * 0.001)
        looks = expiries.looks
        await trio.sleep(2)
        assert all(len(item.fired) == 1 for item in items)
        for i, item in enumerate(items):
            due = start + 1.0 + i * 0.001
            assert due <= item.fired[0] < due + GRAIN + 1e-9
        assert expiries.looks - looks <= 0.1 / GRAIN + 2


async def test_expiries_beyond_the_horizon_wake_nobody_and_still_fire_on_time(autojump_clock):
    """With a horizon (the shortest timeout the connections count from now), an expiry at least
    that far away does not wake the task: it looks once per horizon and still acts at the instant."""
    items = [Item() for _ in range(3)]
    async with _watching(items, horizon=30.0) as (expiries, start):
        looks = expiries.looks
        for i, item in enumerate(items):
            expiries.set(item, start + 30.0 + 20 * i)   # 30, 50 and 70 s away
        await trio.testing.wait_all_tasks_blocked()
        assert expiries.looks == looks                  # nobody woken
        await trio.sleep(100)
        assert [item.fired for item in items] == [[start + 30.0], [start + 50.0], [start + 70.0]]
        assert expiries.looks - looks <= 6              # about one look per horizon, and one per expiry
