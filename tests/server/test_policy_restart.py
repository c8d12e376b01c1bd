"""A delayed retry across a restart (#17): the due time of a negative commit's ``_delay_`` (or of the
``retry_backoff``) is kept in the queue's log, so a restarted server hides the entry from that group
until the same wall-clock time, and no longer; in process, on trio's clock and a wall clock the
test moves. (A kill -9 of a real process: tests/process/test_policies_crash.py.) On Redis the due
time is in Redis itself: the last test restarts a node on the same Redis."""

from __future__ import annotations

import pytest
import trio

from ..helpers.inproc import next_frame, no_frame, running_server

LIMIT = 120


class WallClock:
    """The server's wall clock, moved by the test (delays are kept as wall-clock due times)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def recovering_clock():
    """trio's autojump clock, jumping only after 0.25 s of real idleness: a queue reopened from disk
    recovers in a worker thread, and waiting for it must not let the clock jump to the test's limit.
    Once the queue is open a test sets `autojump_threshold` to 0 (no real waiting)."""
    return trio.testing.MockClock(autojump_threshold=0.25)


async def state_keys(srv, service: str) -> dict[str, str]:
    """The kept delays of the service's input queue (its log's state)."""
    [queue] = [q for ref, q in srv.server.queues._queues.items() if ref.service == service and not ref.dlq
               and ref.kind == "input"]
    return {k: v for k, v in queue.log.state.items() if k.startswith("delay:")}


async def test_a_delayed_entry_stays_hidden_after_a_restart_until_its_due_time(tmp_path, recovering_clock):
    wall = WallClock()
    recovering_clock.autojump_threshold = 0   # nothing on disk yet
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, wall_clock=wall) as srv, trio.open_nursery() as nursery:
            c = await srv.client("later")
            index = int((await c.call("POST", "", b"job"))[1])
            ws = await srv.watch(nursery, "later", "_window_=1", user="w")
            assert (await next_frame(ws)).index == index
            assert (await c.call("PUT", f"_indexes_={index}&_negative_=true&_code_=503&_delay_=60s"))[0] == 200
            assert await state_keys(srv, "later") == {f"delay:{index}:g": str(int(wall.now * 1000) + 60_000)}
            nursery.cancel_scope.cancel()
        wall.now += 20   # down for 20 s: 40 s of the delay are left
        recovering_clock.autojump_threshold = 0.25
        async with running_server(tmp_path, wall_clock=wall) as srv, trio.open_nursery() as nursery:
            c = await srv.client("later")
            assert (await c.attrs())["policy.delayed"] == "1"   # the queue recovered (opened on this request)
            recovering_clock.autojump_threshold = 0
            start = trio.current_time()
            ws = await srv.watch(nursery, "later", "_window_=1", user="w")
            assert await no_frame(ws, 39)
            frame = await next_frame(ws, 5)
            assert frame.index == index and 40 <= trio.current_time() - start < 41
            # due: the kept key is removed (an empty STATE value), so the next restart keeps nothing
            with trio.fail_after(5):
                while await state_keys(srv, "later"):
                    await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        recovering_clock.autojump_threshold = 0.25
        async with running_server(tmp_path, wall_clock=wall) as srv:
            assert (await (await srv.client("later")).attrs())["policy.delayed"] == "0"
            assert await state_keys(srv, "later") == {}


async def test_a_delay_that_fell_due_while_the_server_was_down_is_gone(tmp_path, recovering_clock):
    wall = WallClock()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, wall_clock=wall, retry_backoff=(30.0, 2.0, 60.0)) as srv, \
                trio.open_nursery() as nursery:
            c = await srv.client("backoff")
            index = int((await c.call("POST", "", b"job"))[1])
            ws = await srv.watch(nursery, "backoff", "_window_=1", user="w")
            assert (await next_frame(ws)).index == index
            # no _delay_: the backoff for the first delivery (30 s) is kept as well
            assert (await c.call("PUT", f"_indexes_={index}&_negative_=true"))[0] == 200
            assert list((await state_keys(srv, "backoff")).values()) == [str(int(wall.now * 1000) + 30_000)]
            nursery.cancel_scope.cancel()
        wall.now += 31
        async with running_server(tmp_path, wall_clock=wall, retry_backoff=(30.0, 2.0, 60.0)) as srv, \
                trio.open_nursery() as nursery:
            c = await srv.client("backoff")
            assert (await c.attrs())["policy.delayed"] == "0"
            assert await state_keys(srv, "backoff") == {}   # removed at the reopen
            ws = await srv.watch(nursery, "backoff", "_window_=1", user="w")
            assert (await next_frame(ws, 1)).index == index
            nursery.cancel_scope.cancel()


async def test_a_delayed_entry_stays_hidden_after_a_redis_node_restart_until_its_due_time(tmp_path, redis_url,
                                                                                           autojump_clock):
    """Redis: the due time is in Redis (the queue's ``dz``), in the nodes' policy clock (the wall clock at
    a node's start, advanced by trio's), so a node started later hides the entry until the same time."""
    wall = WallClock()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, wall_clock=wall, backend=redis_url) as srv, \
                trio.open_nursery() as nursery:
            c = await srv.client("later")
            index = int((await c.call("POST", "", b"job"))[1])
            ws = await srv.watch(nursery, "later", "_window_=1", user="w")
            assert (await next_frame(ws)).index == index
            assert (await c.call("PUT", f"_indexes_={index}&_negative_=true&_code_=503&_delay_=6s"))[0] == 200
            link = srv.server.queues.link
            due = {k.decode(): v for k, v in await link.client.zrange("{qs:later}:dz", 0, -1, withscores=True)}
            assert list(due) == [f"{index}:g"] and abs(due[f"{index}:g"] - (wall.now * 1000 + 6_000)) < 2_000
            nursery.cancel_scope.cancel()
        wall.now += 2   # down for 2 s: 4 s of the delay are left (short: on Redis each second of timers costs real time)
        async with running_server(tmp_path, wall_clock=wall, backend=redis_url) as srv, \
                trio.open_nursery() as nursery:
            c = await srv.client("later")
            assert (await c.attrs())["policy.delayed"] == "1"
            start = trio.current_time()
            ws = await srv.watch(nursery, "later", "_window_=1", user="w")
            assert await no_frame(ws, 3.5)
            frame = await next_frame(ws, 5)
            assert frame.index == index and frame.tags["lastCode"] == "503"
            assert 3.5 <= trio.current_time() - start <= 5
            assert (await c.attrs())["policy.delayed"] == "0"
            nursery.cancel_scope.cancel()
