"""A manual commit that frees a watcher's window slots starts its own fsync round through kernel AIO
(`backends.local.commit.GroupCommit._round_now`) while at most two connections are open (one
consumer's watch and its commits), and the frames those slots let through are written while the
kernel syncs. What must hold: the commit is answered only once its deletes are on disk, the next
frames arrive, with more connections the flusher runs the round, the flusher's rounds and these
never overlap, and nothing is lost or delivered twice when consumers commit while puts keep coming.
And the flusher's round leaves the loop free during its fsync (never inline) while a manual-commit
watcher of its queue has a free slot: a put arriving meanwhile is a frame to write at once.

Real files and real time (the fsyncs are the kernel's); every test is bounded by `trio.fail_after`.
Without kernel AIO the commit waits for the flusher like any write, and these tests skip.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
import trio_websocket

from qserve.core.events import QueueRef

from ..helpers.disk_faults import LIMIT, put
from ..helpers.inproc import next_frame, running_server
from ..helpers.queue_files import contents, reopen

IDENTITY = [("X-EAS-QueueService-Gid", "g")]


def needs_aio(srv) -> None:
    if srv.server.queues._aio is None:
        pytest.skip("kernel AIO is not available here: commits wait for the flusher's round instead")


async def test_a_commit_that_frees_slots_runs_its_own_round_and_answers_once_durable(tmp_path):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fsync="always") as srv, trio.open_nursery() as nursery:
            needs_aio(srv)
            c = await srv.client("ov")
            for n in range(6):
                assert await put(c, b"job%d" % n) == (200, b"%d" % (n + 1))
            queue = await srv.server.queues.get(QueueRef("ov"))
            ws = await srv.watch(nursery, "ov", "_window_=2", user="u")
            assert [(await next_frame(ws)).index for _ in range(2)] == [1, 2]
            before = queue.rounds_now
            status, body = await c.call("PUT", "_indexes_=1,2", headers=[*IDENTITY, ("X-EAS-QueueService-Uid", "u")])
            assert (status, body) == (200, b"OK")
            assert queue.rounds_now == before + 1                    # the commit's own round
            assert queue.log.durable_seq == queue.log.appended_seq   # its deletes were synced first
            assert [(await next_frame(ws)).index for _ in range(2)] == [3, 4]   # the freed slots
            # a third connection: the flusher runs the round (others may be about to join it)
            await srv.client("ov")
            await trio.testing.wait_all_tasks_blocked()
            assert srv.server.http.open_connections == 3
            status, _ = await c.call("PUT", "_indexes_=3,4", headers=[*IDENTITY, ("X-EAS-QueueService-Uid", "u")])
            assert status == 200 and queue.rounds_now == before + 1
            assert queue.log.durable_seq == queue.log.appended_seq
            assert [(await next_frame(ws)).index for _ in range(2)] == [5, 6]
            await ws.aclose()
    qlog = reopen(tmp_path, "ov")
    try:
        assert contents(qlog) == [(5, b"job4"), (6, b"job5")]
    finally:
        qlog.close()


async def test_consumers_committing_while_puts_go_on_lose_nothing_and_get_nothing_twice(tmp_path):
    """Three consumers (window 2) commit every frame they get while two clients put 60 entries, the
    server told that two connections are all it has (so every commit that wakes a watcher starts its
    own round): the commits' rounds and the flusher's interleave (one at a time); every entry is
    delivered once, every commit is answered 200, and after the server stops the queue is empty."""
    total = 60
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fsync="always") as srv:
            needs_aio(srv)
            srv.server.queues.clients = lambda: 2
            c = await srv.client("mix")
            assert await put(c, b"first") == (200, b"1")
            queue = await srv.server.queues.get(QueueRef("mix"))
            received: list[int] = []
            committed: list[int] = []
            sockets = []
            done = trio.Event()

            async def consumer(nursery, user: str) -> None:
                ws = await srv.watch(nursery, "mix", "_window_=2", user=user)
                sockets.append(ws)
                committer = await srv.client("mix")
                headers = [*IDENTITY, ("X-EAS-QueueService-Uid", user)]
                while True:
                    try:
                        index = (await next_frame(ws, timeout=LIMIT)).index
                    except trio_websocket.ConnectionClosed:   # closed by the test once all is committed
                        return
                    received.append(index)
                    assert (await committer.call("PUT", f"_indexes_={index}", headers=headers))[0] == 200
                    committed.append(index)
                    if len(committed) == total:   # every commit answered (so durable)
                        done.set()

            async def producer(client, tag: bytes, count: int) -> None:
                for n in range(count):
                    assert (await put(client, b"%s%d" % (tag, n)))[0] == 200

            async with trio.open_nursery() as nursery:
                for user in ("a", "b", "c"):
                    nursery.start_soon(consumer, nursery, user)
                other = await srv.client("mix")
                async with trio.open_nursery() as puts:
                    puts.start_soon(producer, c, b"p", 30)
                    puts.start_soon(producer, other, b"q", total - 31)
                await done.wait()
                for ws in sockets:   # closed, not just dropped: the server has no close handshake to wait out
                    await ws.aclose()
                nursery.cancel_scope.cancel()
            assert sorted(received) == list(range(1, total + 1))     # each once
            assert queue.rounds_now > 0
            assert queue.log.durable_seq == queue.log.appended_seq
    qlog = reopen(tmp_path, "mix")
    try:
        assert contents(qlog) == []
    finally:
        qlog.close()


async def _inline_rounds_of_puts(srv, c, n: int) -> int:
    """The fsyncs the server waited for inline while ``n`` puts were answered (each durable)."""
    aio = srv.server.queues._aio
    before = aio.inline_rounds
    for i in range(n):
        status, _ = await put(c, b"p%d" % i)
        assert status == 200
    return aio.inline_rounds - before


async def test_no_inline_round_while_a_manual_watcher_has_room(tmp_path):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fsync="always") as srv, trio.open_nursery() as nursery:
            needs_aio(srv)
            c = await srv.client("in")
            await srv.client("in")   # a second connection: no lone client's round (`_round_here`)
            assert await _inline_rounds_of_puts(srv, c, 3) >= 1          # nobody watching: inline
            ws = await srv.watch(nursery, "in", "_window_=10", user="u")
            assert [(await next_frame(ws)).index for _ in range(3)] == [1, 2, 3]
            assert await _inline_rounds_of_puts(srv, c, 3) == 0          # a manual watcher with room
            assert [(await next_frame(ws)).index for _ in range(3)] == [4, 5, 6]
            queue = await srv.server.queues.get(QueueRef("in"))
            assert queue.log.durable_seq == queue.log.appended_seq
            await _inline_rounds_of_puts(srv, c, 4)
            assert [(await next_frame(ws)).index for _ in range(4)] == [7, 8, 9, 10]
            assert not queue.dispatcher.sends_on_append()
            assert await _inline_rounds_of_puts(srv, c, 3) >= 1          # its window is full: inline again
            await ws.aclose()
