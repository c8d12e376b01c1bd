"""An auto-commit watch that is handing a batch out gets a put's new entry taken for it in the
put's own step (`server.watch.Session.pretake`), so that one fsync round covers the put and its
delete. The server's own `WatchService` and local backend, real files; the transport is a
``send`` that can be held, so that the session is caught in the middle of a hand-out."""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio
import trio.testing

from qserve.core import events as ev
from qserve.core.errors import Unavailable
from qserve.wire import framing, protobuf

from ..helpers.disk_faults import LIMIT
from ..helpers.inproc import running_server


class HeldSend:
    """A streamed watch's ``send``: records every frame, and holds each write while ``held``;
    ``on_write``, if set, is called at the start of each write."""

    def __init__(self) -> None:
        self.on_write = None
        self.reader = framing.LengthDelimitedReader()
        self.indexes: list[int] = []
        self.writes = 0
        self.held = True
        self.released = trio.Event()

    async def __call__(self, chunk: bytes) -> None:
        if self.on_write is not None:
            self.on_write()
        self.writes += 1
        self.reader.receive_data(chunk)
        while (frame := self.reader.next_frame()) is not None:
            self.indexes.append(protobuf.decode_frame(frame).index)
        if self.held:
            await self.released.wait()

    def release(self) -> None:
        self.held = False
        self.released.set()


def auto_watch_op(service: str) -> ev.Watch:
    return ev.Watch(queue=ev.QueueRef(service), identity=ev.Identity(group="g", user="u"), window=4,
                    websocket=False, auto_commit=True)


@asynccontextmanager
async def held_hand_out(tmp_path, service: str):
    """A server whose queue ``service`` holds one put (b"first"), and an auto-commit streamed watch of
    it (window 4) whose first write is held: a hand-out in progress. Yields (the harness, a client,
    the queue, the ``send``, the first entry's index)."""
    async with running_server(tmp_path, fsync="always") as srv, trio.open_nursery() as nursery:
        c = await srv.client(service)
        first = int((await c.call("POST", "", b"first"))[1])
        send = HeldSend()
        queue = await srv.server.app.queues.get(ev.QueueRef(service))
        response = await srv.server.app.watch.http_stream(queue, auto_watch_op(service))
        nursery.start_soon(response.stream, send)
        await trio.testing.wait_all_tasks_blocked()
        assert send.indexes == [first]
        yield srv, c, queue, send, first
        nursery.cancel_scope.cancel()


async def test_a_put_is_taken_in_its_own_step_while_a_batch_is_handed_out(tmp_path):
    with trio.fail_after(LIMIT):
        async with held_hand_out(tmp_path, "pre") as (srv, c, queue, send, first):
            entry = queue.append(b"second", {}, 0)         # a put's synchronous step
            assert entry.index not in queue.log            # taken (deleted) before the step returned
            before = queue.log.appended_seq
            await queue.wait_durable()                     # the put's round covers the delete as well
            assert queue.log.durable_seq >= before
            send.release()
            await trio.testing.wait_all_tasks_blocked()
            assert send.indexes == [first, entry.index]    # each once, in order
            status, body = await c.call("POST", "", b"third")   # no hand-out in progress now
            assert status == 200
            third = int(body)
            await trio.testing.wait_all_tasks_blocked()
            assert send.indexes == [first, entry.index, third]
            assert (await c.attrs())["stream.length"] == "0"


async def test_a_batch_taken_for_a_stopping_session_is_still_written(tmp_path):
    """Shutdown while a hand-out is held with a batch taken for the session meanwhile: the session
    takes nothing more, but writes both batches before it ends (both are deleted already)."""
    with trio.fail_after(LIMIT):
        async with held_hand_out(tmp_path, "stop") as (srv, c, queue, send, first):
            second = queue.append(b"second", {}, 0).index  # taken for the held session
            srv.server.app.watch.shutdown(5.0)
            queue.append(b"third", {}, 0)                  # stopping: not taken for it
            send.release()
            await trio.testing.wait_all_tasks_blocked()
            assert send.indexes == [first, second]
            assert (await c.attrs())["stream.length"] == "1"   # the third stays in the queue


async def test_a_failure_to_take_in_the_puts_step_ends_the_watch_not_the_put(tmp_path, monkeypatch):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fsync="always") as srv, trio.open_nursery() as nursery:
            c = await srv.client("fail")
            first = int((await c.call("POST", "", b"first"))[1])
            send = HeldSend()
            failures = []

            async def watch():
                try:
                    await (await srv.server.app.watch.http_stream(queue, op)).stream(send)
                except Unavailable as exc:
                    failures.append(exc)
            queue = await srv.server.app.queues.get(ev.QueueRef("fail"))
            op = auto_watch_op("fail")
            nursery.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()

            def broken(consumer_id):
                raise Unavailable("storage unavailable, try again later")
            monkeypatch.setattr(queue, "take_now", broken)
            status, body = await c.call("POST", "", b"second")
            assert status == 200                           # the put is not the take's business
            send.release()
            await trio.testing.wait_all_tasks_blocked()
            assert send.indexes == [first] and len(failures) == 1
            assert (await c.attrs())["stream.length"] == "1"   # the second was never taken
            nursery.cancel_scope.cancel()


async def test_a_batchs_frames_are_written_before_the_next_take(tmp_path):
    """Once a batch's delete is durable its frames are the next thing the session does: an entry
    that waits for a free slot is taken only after them (taking it first put a poll of the
    dispatcher between every round and its frames, and covered nothing a put's own take does not)."""
    with trio.fail_after(LIMIT):
        async with held_hand_out(tmp_path, "order") as (srv, c, queue, send, first):
            taken_for_us = [queue.append(f"e{i}".encode(), {}, 0).index for i in range(3)]
            waiting = queue.append(b"waits for a slot", {}, 0).index   # window 4 is full now
            assert all(i not in queue.log for i in taken_for_us) and waiting in queue.log
            still_stored_at_write = []
            send.on_write = lambda: still_stored_at_write.append(waiting in queue.log)
            send.release()
            await trio.testing.wait_all_tasks_blocked()
            assert send.indexes == [first, *taken_for_us, waiting]
            # at the write of the last batch taken for it, the waiting entry was not taken yet
            assert still_stored_at_write[len(taken_for_us) - 1] is True
            assert (await c.attrs())["stream.length"] == "0"
