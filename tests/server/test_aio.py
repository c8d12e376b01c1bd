"""`qserve.server.aio.AioSync`: fsyncs through Linux kernel AIO. Real files, real kernel; nothing sleeps."""

from __future__ import annotations

import errno
import json
import os

import pytest
import trio
import trio.testing

from qserve import storage
from qserve.server.aio import AioSync
from qserve.core.events import QueueRef
from qserve.backends.local.queues import queue_dir

from ..helpers.aio import open_or_skip
from ..helpers.inproc import running_server

LIMIT = 10


async def test_fsyncs_complete_and_report_per_fd_errors(tmp_path):
    with trio.fail_after(LIMIT):
        aio = open_or_skip(depth=4)
        fds = []
        for i in range(10):
            fd = os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT)
            os.write(fd, b"x" * 100)
            fds.append(fd)
        r, w = os.pipe()
        closed = os.open(tmp_path / "closed", os.O_RDWR | os.O_CREAT)
        os.close(closed)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(aio.serve)
                assert await aio.fsync([]) is None
                assert await aio.fsync(fds) is None          # more fds than the depth: they queue
                results = []

                async def one(fd):
                    results.append(await aio.fsync([fd]))
                async with trio.open_nursery() as many:
                    for fd in fds:
                        many.start_soon(one, fd)
                assert results == [None] * len(fds)
                bad = await aio.fsync([fds[0], closed])
                assert isinstance(bad, OSError) and bad.errno == errno.EBADF
                pipe = await aio.fsync([r])                  # no fsync on a pipe
                assert isinstance(pipe, OSError) and pipe.errno == errno.EINVAL
                nursery.cancel_scope.cancel()
            assert not aio.serving
            with pytest.raises(RuntimeError):
                await aio.fsync(fds[:1])
        finally:
            for fd in (*fds, r, w):
                os.close(fd)


async def test_a_cancelled_caller_waits_for_its_fsync_and_shutdown_drains(tmp_path):
    with trio.fail_after(LIMIT):
        aio = open_or_skip()
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
        try:
            async with trio.open_nursery() as outer:
                async with trio.open_nursery() as nursery:
                    await nursery.start(aio.serve)
                    with trio.CancelScope() as scope:
                        scope.cancel()                # already cancelled: the fsync still completes
                        await aio.fsync([fd])
                        pytest.fail("the cancellation was swallowed")
                    assert scope.cancelled_caught and not aio._jobs
                    answers = []

                    async def caller():
                        answers.append(await aio.fsync([fd] * 8))
                    outer.start_soon(caller)
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.cancel_scope.cancel()     # the reaper drains what may be in flight
            assert answers == [None] and not aio._jobs
        finally:
            os.close(fd)


async def test_the_backend_is_a_config_choice_and_a_failed_probe_means_threads(tmp_path, monkeypatch):
    """`Config.fsync_backend`: "threads" opens no AIO context; "auto" uses AIO where it works, else
    threads; "aio" refuses to start where it does not (one ConfigError line)."""
    from qserve.backends.local.manager import QueueManager
    from qserve.config import Config, ConfigError

    with pytest.raises(ConfigError, match="fsync_backend"):
        Config(fsync_backend="io_uring")
    open_or_skip().close()
    async with trio.open_nursery() as nursery:
        assert QueueManager(Config(data_dir=tmp_path, fsync_backend="threads"), nursery).fsync_mechanism == "threads"
        assert QueueManager(Config(data_dir=tmp_path), nursery).fsync_mechanism == "kernel AIO"
        assert QueueManager(Config(data_dir=tmp_path, fsync_backend="aio"), nursery).fsync_mechanism == "kernel AIO"
        monkeypatch.setattr(AioSync, "_probe", staticmethod(lambda *a: False))   # a kernel before 4.18
        assert AioSync.open() is None
        assert QueueManager(Config(data_dir=tmp_path), nursery).fsync_mechanism == "threads"
        with pytest.raises(ConfigError, match="fsync_backend: aio, but kernel AIO cannot be used here"):
            QueueManager(Config(data_dir=tmp_path, fsync_backend="aio"), nursery)


async def test_the_server_syncs_through_aio_unless_the_file_layer_is_injected(tmp_path, monkeypatch):
    open_or_skip().close()   # (skips where AIO is unavailable)
    calls = []
    real = AioSync.fsync

    async def counting(self, fds, on_done=None, **how):
        calls.append(len(fds))
        return await real(self, fds, on_done, **how)
    monkeypatch.setattr(AioSync, "fsync", counting)
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path / "a", fsync="always") as srv:
            c = await srv.client("svc")
            assert (await c.call("POST", "", b"x"))[0] == 200
        assert calls, "a durable put did not go through kernel AIO"
        calls.clear()
        async with running_server(tmp_path / "c", fsync="always", fileio=type("IO", (storage.FileIO,), {})()) as srv:
            c = await srv.client("svc")
            assert (await c.call("POST", "", b"x"))[0] == 200
        assert not calls, "fds of an injected file layer went through kernel AIO"


async def test_first_waiters_resume_ahead_of_the_rest_of_their_round(tmp_path):
    """`wait_durable(first=True)` (an auto-commit watch's frames) resumes before the plain waiters
    of the same round (the put answers), every round; trio would otherwise run them in random order."""
    from qserve.config import Config
    from qserve.core.events import QueueRef
    from qserve.backends.local.manager import QueueManager
    order = []
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            manager = QueueManager(Config(data_dir=tmp_path, fsync="always"), nursery)
            queue = await manager.get(QueueRef("svc"))

            async def waiter(name, first):
                await queue.wait_durable(mark, first=first)
                order.append(name)

            for _ in range(20):
                queue.log.append(b"x", {})
                mark = queue.write_mark()
                async with trio.open_nursery() as round_:
                    for k in range(3):
                        round_.start_soon(waiter, f"plain{k}", False)
                    round_.start_soon(waiter, "first", True)
                    for k in range(3, 6):
                        round_.start_soon(waiter, f"plain{k}", False)
                assert order[0] == "first" and len(order) == 7, order
                order.clear()
            nursery.cancel_scope.cancel()
    manager.close_all()


async def test_on_done_runs_in_the_reaper_before_the_caller_resumes(tmp_path):
    """``on_done(error)`` runs once, in the reaper's task, as soon as the kernel has answered every
    fsync (before the caller is woken); with nothing submittable, or with no other task runnable
    (the fsync is then done inline), in the caller; an exception it raises comes out of `fsync`."""
    with trio.fail_after(LIMIT):
        aio = open_or_skip()
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
        closed = os.open(tmp_path / "closed", os.O_RDWR | os.O_CREAT)
        os.close(closed)
        seen = []

        def on_done(error):
            seen.append((error, trio.lowlevel.current_task()))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(aio.serve)
                me = trio.lowlevel.current_task()
                # the loop idle otherwise: done inline, in the caller
                assert await aio.fsync([fd], on_done) is None
                assert seen == [(None, me)] and aio.inline_rounds == 1
                seen.clear()

                async def busy():                             # another task always runnable
                    while True:
                        await trio.lowlevel.checkpoint()
                # scheduled now, so it is in the run queue when fsync looks (once it has run, trio's
                # random order within a batch may leave it out of the queue at that moment)
                nursery.start_soon(busy)
                assert await aio.fsync([fd, fd], on_done) is None
                assert len(seen) == 1 and seen[0][0] is None and seen[0][1] is not me   # the reaper
                assert aio.inline_rounds == 1
                seen.clear()
                error = await aio.fsync([closed], on_done)    # refused at submit: nothing to reap
                assert [(e.errno, t) for e, t in seen] == [(errno.EBADF, me)] and error is seen[0][0]
                seen.clear()
                assert await aio.fsync([], on_done) is None and seen == [(None, me)]

                def broken(error):
                    raise ValueError("bug in the callback")
                with pytest.raises(ValueError):
                    await aio.fsync([fd], broken)
                assert aio.serving                            # the reaper survived it
                nursery.cancel_scope.cancel()
        finally:
            os.close(fd)


async def test_an_overlap_fsync_is_never_inline_and_the_caller_runs_others_meanwhile(tmp_path):
    """``fsync(..., overlap=True)``: submitted to the kernel even with the loop otherwise idle (no
    inline round), ``on_done`` runs in the reaper, and a task woken before the call runs before the
    caller resumes (the work the fsync overlaps)."""
    with trio.fail_after(LIMIT):
        aio = open_or_skip()
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
        os.write(fd, b"x" * 100)
        order = []
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(aio.serve)
                me = trio.lowlevel.current_task()
                go = trio.Event()

                async def frames():
                    await go.wait()
                    order.append("frames")
                nursery.start_soon(frames)
                await trio.testing.wait_all_tasks_blocked()
                go.set()
                def on_done(error):
                    order.append(("done", error, trio.lowlevel.current_task() is me))
                assert await aio.fsync([fd], on_done, overlap=True) is None
                order.append("resumed")
                # the woken task ran before the caller resumed, and ``on_done`` in the reaper before
                # that too; the two of them may share a scheduling batch (a fast fsync), in any order
                assert sorted(order[:2], key=str) == [("done", None, False), "frames"] and order[2] == "resumed"
                assert aio.inline_rounds == 0
                assert await aio.fsync([fd]) is None and aio.inline_rounds == 1   # idle, not overlap: inline
                nursery.cancel_scope.cancel()
        finally:
            os.close(fd)


async def test_a_failed_aio_fsync_rolls_the_round_back(tmp_path, monkeypatch):
    """The reaper ends an AIO round (`Queue._end_round`); when the kernel fails the fsync the
    round's writes are rolled back there and their requests get 503, nothing stored; the next
    round works again."""
    open_or_skip().close()
    real = AioSync.fsync
    fail = [True]

    async def failing(self, fds, on_done=None, **how):
        if fail[0] and fds:
            fds = [10**6]                                     # no such fd: EBADF for this round
        return await real(self, fds, on_done, **how)
    monkeypatch.setattr(AioSync, "fsync", failing)
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fsync="always") as srv:
            c = await srv.client("svc")
            status, body = await c.call("POST", "", b"lost")
            assert status == 503, body
            fail[0] = False
            status, body = await c.call("POST", "", b"kept")
            assert status == 200
            kept = int(body)
            status, body = await c.call("GET", "_index_=0&_length_=10&_raw_=false&_auto_delete_=false")
            assert status == 200 and [e["index"] for e in json.loads(body)] == [kept]
    qlog = storage.QueueLog.open(queue_dir(tmp_path / "data", QueueRef("svc")))
    assert [(e.index, e.data) for e in qlog.scan()] == [(kept, b"kept")]   # also on disk
    qlog.close()


async def test_a_durable_waiter_resumes_one_scheduler_turn_after_the_kernel_answers(tmp_path, monkeypatch):
    """With kernel AIO the reaper ends the round itself, so a plain `wait_durable` resumes in the
    scheduler turn right after the one that reaped the fsync; through the flusher it took two
    (reaper -> flusher -> waiter), and under load every turn is a whole batch of other requests."""
    from qserve.config import Config
    from qserve.backends.local.manager import QueueManager
    from qserve.backends.local.queues import Queue
    open_or_skip().close()
    turns = [0]

    class Turns(trio.abc.Instrument):
        def before_io_wait(self, timeout):
            turns[0] += 1
    ended = []
    real_end = Queue._end_round

    def end_round(self, *args, **kw):
        ended.append(turns[0])
        return real_end(self, *args, **kw)
    monkeypatch.setattr(Queue, "_end_round", end_round)
    trio.lowlevel.add_instrument(Turns())
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            manager = QueueManager(Config(data_dir=tmp_path, fsync="always"), nursery)
            queue = await manager.get(QueueRef("svc"))
            for _ in range(10):
                ended.clear()
                queue.log.append(b"x", {})
                await queue.wait_durable()
                assert len(ended) == 1 and turns[0] - ended[0] == 1, (ended, turns)
            nursery.cancel_scope.cancel()
    manager.close_all()


async def test_an_aio_round_syncs_the_segments_own_fd_and_a_dup_only_when_it_could_wait(tmp_path, monkeypatch):
    """`io_submit` takes the kernel's own reference to the file, so an AIO round whose submission
    cannot wait for a slot syncs the segment's own fd (no dup, no close); with every slot taken it
    could wait, and a rotation meanwhile could close that fd, so the round syncs a dup."""
    from qserve.config import Config
    from qserve.backends.local.manager import QueueManager
    open_or_skip().close()
    dups = []
    real_dup = storage.FileIO.dup

    def counting_dup(self, fd):
        dups.append(fd)
        return real_dup(self, fd)
    monkeypatch.setattr(storage.FileIO, "dup", counting_dup)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            manager = QueueManager(Config(data_dir=tmp_path, fsync="always"), nursery)
            queue = await manager.get(QueueRef("svc"))
            for _ in range(5):
                queue.log.append(b"x", {})
                await queue.wait_durable()
            assert dups == [] and queue.log.durable_seq == queue.log.appended_seq
            assert queue._kernel_takes_fd()
            held = queue._aio.free_slots()
            for _ in range(held):
                queue._aio._slots.acquire_nowait()
            assert not queue._kernel_takes_fd()
            queue.log.append(b"y", {})
            await queue.wait_durable()                    # (an inline round: it needs no slot)
            assert len(dups) == 1 and queue.log.durable_seq == queue.log.appended_seq
            for _ in range(held):
                queue._aio._slots.release()
            nursery.cancel_scope.cancel()
    manager.close_all()
