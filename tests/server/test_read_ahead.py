"""A manual-commit watch with a full window reads its next window ahead once the loop has nothing else
to do (`backends.local.queues.Queue.read_ahead`, `server.watch.Session.pump`): the commit that frees
the window finds those entries in memory and their frames encoded. What must hold: the frames that
go out are the entries as stored, with the tags they have when they go out (a negative commit's
notes made since included), an entry deleted since is not sent, and a commit's answer still waits
for its deletes to be durable.

In-process servers over memory streams, real files; `CountingIO` counts the reads of the segments.
"""

from __future__ import annotations

import trio
import trio.testing

from qserve.core.events import QueueRef

from ..helpers.disk_faults import LIMIT, put
from ..helpers.inproc import next_frame, running_server
from ..helpers.storage import CountingIO


def holder(user: str) -> list[tuple[str, str]]:
    return [("X-EAS-QueueService-Gid", "g"), ("X-EAS-QueueService-Uid", user)]


async def watched(srv, nursery, service: str, jobs: int, window: int, user: str):
    """``jobs`` entries put to ``service`` (data ``job0``...), then a watch of ``window``: the
    client, the queue and the watch."""
    c = await srv.client(service)
    for n in range(jobs):
        assert await put(c, b"job%d" % n) == (200, b"%d" % (n + 1))
    queue = await srv.server.queues.get(QueueRef(service))
    return c, queue, await srv.watch(nursery, service, f"_window_={window}", user=user)


async def until(condition) -> None:
    """Wait (bounded by the caller's `fail_after`) until ``condition()`` holds, letting every other
    task run between looks; the kernel's fsyncs finish in their own time."""
    while not condition():
        await trio.testing.wait_all_tasks_blocked()
        await trio.lowlevel.checkpoint()


async def test_the_next_window_is_read_ahead_and_its_frames_are_the_stored_entries(tmp_path):
    io = CountingIO()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=io, fsync="always") as srv, trio.open_nursery() as nursery:
            c, queue, ws = await watched(srv, nursery, "ra", 7, 3, "u")
            assert [(await next_frame(ws)).index for _ in range(3)] == [1, 2, 3]
            await until(lambda: sorted(queue.log._ahead) == [4, 5, 6])   # read once the loop idled
            reads = io.preads
            assert await c.call("PUT", "_indexes_=1,2,3", headers=holder("u")) == (200, b"OK")
            assert queue.log.durable_seq == queue.log.appended_seq     # the answer waited for the deletes
            frames = [await next_frame(ws) for _ in range(3)]
            assert [(f.index, f.data) for f in frames] == [(4, b"job3"), (5, b"job4"), (6, b"job5")]
            # 4-6 came from memory; then the next window (7 alone) was read ahead: one read in all
            await until(lambda: sorted(queue.log._ahead) == [7])
            assert io.preads == reads + 1
            await ws.aclose()


async def test_an_entry_deleted_after_it_was_read_ahead_is_not_sent(tmp_path):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fsync="always") as srv, trio.open_nursery() as nursery:
            c, queue, ws = await watched(srv, nursery, "rd", 4, 2, "u")
            assert [(await next_frame(ws)).index for _ in range(2)] == [1, 2]
            await until(lambda: sorted(queue.log._ahead) == [3, 4])
            assert (await c.call("DELETE", "_indexes_=3"))[0] == 200
            assert (await c.call("PUT", "_indexes_=1,2", headers=holder("u")))[0] == 200
            frame = await next_frame(ws)
            assert (frame.index, frame.data) == (4, b"job3")   # 3 would have come first
            assert (await put(c, b"job4"))[0] == 200           # the slot 3 did not take
            assert (await next_frame(ws)).index == 5
            await ws.aclose()


async def test_a_frame_encoded_ahead_is_not_sent_once_a_negative_commit_annotated_its_entry(tmp_path):
    """Consumer a (window 1) reads entry 2 ahead and encodes its frame; b (window 3, so it reads
    nothing ahead) then takes 2 and 3, refuses 2 (its notes: lastCode, lastReason), takes it back
    and leaves. When a's commit frees its window, a gets entry 2 as stored, the very entry read
    ahead, and with those notes: the frame encoded before them is not used."""
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fsync="always") as srv, trio.open_nursery() as nursery:
            c, queue, a = await watched(srv, nursery, "rn", 3, 1, "a")
            assert (await next_frame(a)).index == 1
            await until(lambda: sorted(queue.log._ahead) == [2])
            session = srv.server.watch._sessions[(QueueRef("rn"), "g.a")]
            assert list(session._frames) == [2]                      # encoded ahead, without notes
            ahead = queue.log._ahead[2]
            b = await srv.watch(nursery, "rn", "_window_=3", user="b")
            assert [(await next_frame(b)).index for _ in range(2)] == [2, 3]
            refused = await c.call("PUT", "_indexes_=2&_negative_=true&_code_=503&_reason_=busy", headers=holder("b"))
            assert refused[0] == 200
            again = await next_frame(b)                              # a has no room: b's again
            assert again.index == 2 and again.tags["lastCode"] == "503"
            await b.aclose()
            await until(lambda: not queue.dispatcher.pending_of("g.b"))
            assert (await c.call("PUT", "_indexes_=1", headers=holder("a")))[0] == 200
            frame = await next_frame(a)
            assert (frame.index, frame.data) == (2, b"job1") and queue.log._ahead[2] is ahead
            assert frame.tags["lastCode"] == "503" and frame.tags["lastReason"] == "busy"
            await a.aclose()


async def test_a_window_freed_while_the_loop_never_idles_is_refilled_at_once(tmp_path):
    """The wait for an idle loop is cut by the wake-up that a freed window slot gives: with another
    task always runnable (the loop never idles, so nothing is read ahead), the commit's freed slot
    still brings the next frame."""
    async def busy():
        while True:
            await trio.lowlevel.checkpoint()

    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fsync="never") as srv, trio.open_nursery() as nursery:
            c, queue, ws = await watched(srv, nursery, "rw", 3, 1, "u")
            async with trio.open_nursery() as spinning:
                spinning.start_soon(busy)
                assert (await next_frame(ws)).index == 1
                for n in (1, 2):
                    assert (await c.call("PUT", f"_indexes_={n}", headers=holder("u")))[0] == 200
                    assert (await next_frame(ws, timeout=2)).index == n + 1
                assert queue.log._ahead == {}   # never idle: nothing was read ahead
                spinning.cancel_scope.cancel()
            await ws.aclose()


async def test_nothing_is_read_ahead_for_a_queue_with_two_consumers(tmp_path):
    """Only a queue's only consumer reads ahead: with several, each would read the same entries and
    the loop is seldom idle for long."""
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fsync="always") as srv, trio.open_nursery() as nursery:
            c, queue, a = await watched(srv, nursery, "r2", 6, 1, "a")
            assert (await next_frame(a)).index == 1
            await until(lambda: sorted(queue.log._ahead) == [2])   # alone: read ahead
            b = await srv.watch(nursery, "r2", "_window_=1", user="b")
            assert (await next_frame(b)).index == 2
            assert (await c.call("PUT", "_indexes_=1", headers=holder("a")))[0] == 200
            assert (await next_frame(a)).index == 3
            await until(lambda: not queue._in_round)   # where a read ahead would start: no round,
            await trio.testing.wait_all_tasks_blocked()   # the loop idle (twice: it would run in
            await trio.testing.wait_all_tasks_blocked()   # the same batch as this task)
            assert sorted(queue.log._ahead) == [2]   # nothing read ahead since b came
            await a.aclose()
            await b.aclose()
