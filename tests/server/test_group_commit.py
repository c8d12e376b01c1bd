"""Group commit as a running server does it (`backends.local.commit.GroupCommit`): a lone client's
durable put fsyncs in its own task (`_round_here`), anything more goes through the queue's flusher;
either way nothing is answered 200 before its fsync, and a failed fsync in a waiter's own round rolls
back like the flusher's. The fsyncs go through an injected `storage.FileIO` that counts them and can
fail them or hold the flusher's (an fsync made off the trio thread) at a gate.

Real time (fsyncs in worker threads); every test is bounded by `trio.fail_after`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio
import trio.testing

from qserve.backends.local.commit import Signal
from qserve.core.events import QueueRef

from ..helpers.disk_faults import LIMIT, one_line, put
from ..helpers.inproc import running_server
from ..helpers.queue_files import SwitchIO, contents, reopen


@asynccontextmanager
async def first_put(tmp_path, service: str):
    """A server (fsync always, over a `SwitchIO`) whose one client put b"first" (index 1) into
    ``service``; yields (io, harness, client, queue)."""
    io = SwitchIO()
    async with running_server(tmp_path, fileio=io, fsync="always") as srv:
        c = await srv.client(service)
        assert await put(c, b"first") == (200, b"1")
        yield io, srv, c, await srv.server.queues.get(QueueRef(service))


async def test_a_lone_clients_puts_fsync_in_their_own_task_and_are_on_disk_when_answered(tmp_path):
    with trio.fail_after(LIMIT):
        async with first_put(tmp_path, "solo") as (io, srv, c, queue):
            here, fsyncs = queue.rounds_here, io.fsyncs
            for i in range(2, 6):
                assert await put(c, b"p%d" % i) == (200, b"%d" % i)
                assert queue.log.durable_seq == queue.log.appended_seq   # synced before the answer
            assert queue.rounds_here - here == 4 and io.fsyncs - fsyncs == 4
            # a second connection: the flusher's rounds (a put may have company)
            other = await srv.client("solo")
            await trio.testing.wait_all_tasks_blocked()             # accepted by the server
            assert srv.server.http.open_connections == 2
            assert await put(c, b"p6") == (200, b"6")
            assert await put(other, b"p7") == (200, b"7")
            assert queue.log.durable_seq == queue.log.appended_seq
            assert queue.rounds_here - here == 4 and io.fsyncs - fsyncs == 6
    qlog = reopen(tmp_path, "solo")
    try:
        assert [i for i, _ in contents(qlog)] == list(range(1, 8))
    finally:
        qlog.close()


async def test_a_failed_fsync_in_a_waiters_own_round_is_a_503_and_stores_nothing(tmp_path):
    with trio.fail_after(LIMIT):
        async with first_put(tmp_path, "eio") as (io, srv, c, queue):
            here = queue.rounds_here
            io.fail_fsync = True
            status, body = await put(c, b"lost")
            assert status == 503 and "fsync" in one_line(body)
            assert queue.rounds_here == here + 1                     # it was the waiter's round
            io.fail_fsync = False
            status, body = await put(c, b"after")
            assert status == 200 and int(body) > 2                   # the rolled-back index is not reused
            after = int(body)
    qlog = reopen(tmp_path, "eio")
    try:
        assert contents(qlog) == [(1, b"first"), (after, b"after")]
    finally:
        qlog.close()


async def test_no_waiter_runs_a_round_while_the_flushers_is_in_progress(tmp_path):
    """The flusher's fsync is held at the gate; a put made meanwhile by what is then a lone client
    waits for the flusher (a round of its own would begin a second sync while the first is open):
    neither is answered before the gate opens, then both are, and both are on disk."""
    with trio.fail_after(LIMIT):
        async with first_put(tmp_path, "held") as (io, srv, _, queue):
            manager = srv.server.queues
            here = queue.rounds_here
            results = {}

            async def put_into(name, data):
                results[name] = await queue.put(data, {}, 0)

            async with trio.open_nursery() as nursery:
                manager.clients = lambda: 2   # as if others were connected: the flusher's round
                io.hold()
                nursery.start_soon(put_into, "A", b"A")
                await trio.to_thread.run_sync(io.gated.wait, 5)
                assert io.gated.is_set(), "the flusher never started its fsync"
                manager.clients = lambda: 1   # a lone client again, the round still open
                nursery.start_soon(put_into, "B", b"B")
                await trio.testing.wait_all_tasks_blocked()
                assert results == {} and queue.rounds_here == here
                io.release()
            assert sorted(results.values()) == [2, 3]   # B's append missed A's round: one more after it
            assert queue.log.durable_seq == queue.log.appended_seq
    qlog = reopen(tmp_path, "held")
    try:
        assert sorted(d for _, d in contents(qlog)) == [b"A", b"B", b"first"]
    finally:
        qlog.close()


async def test_a_signal_wakes_every_waiter_at_the_next_fire_and_remembers_no_fire():
    """`commit.Signal`, what durability waiters sleep on: a fire wakes everyone waiting then; a fire
    with nobody waiting is not kept for a later waiter (level-less), and costs no event."""
    with trio.fail_after(LIMIT):
        signal = Signal()
        signal.fire()                        # nobody waits: nothing kept
        woken = []
        async with trio.open_nursery() as nursery:
            for n in range(3):
                async def waiter(n=n) -> None:
                    await signal.wait()
                    woken.append(n)
                nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert woken == []               # the earlier fire did not count
            signal.fire()
        assert sorted(woken) == [0, 1, 2]
        late = []
        async with trio.open_nursery() as nursery:
            async def late_waiter() -> None:
                await signal.wait()
                late.append(True)
            nursery.start_soon(late_waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert late == []                # the fire above is not seen by a later wait
            signal.fire()
        assert late == [True]
