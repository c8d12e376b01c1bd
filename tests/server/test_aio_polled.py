"""`AioSync.fsync_polled`: a round the loop waits for with nothing else to do (a lone client's, an
inline one) submitted to kernel AIO and polled for on the completion ring; `Config.fsync_poll`
turns that off (its flag and variable: `tests/unit/test_config.py`). Real files, the real kernel; nothing sleeps."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import time

import pytest
import trio
import trio.testing

from qserve.core.events import QueueRef
from qserve.server import aio as aio_module

from ..helpers.aio import open_or_skip
from ..helpers.disk_faults import LIMIT, put
from ..helpers.inproc import running_server
from ..helpers.queue_files import contents, reopen


@pytest.fixture
def aio():
    aio = open_or_skip()
    assert aio._ring is not None, "Linux maps the completion ring at the context's address"
    yield aio
    aio.close()


def files(tmp_path, n: int) -> list[int]:
    fds = []
    for i in range(n):
        fd = os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT)
        os.write(fd, b"x" * 100)
        fds.append(fd)
    return fds


def test_the_kernels_answers_are_read_from_the_ring_and_the_reaper_is_not_woken(tmp_path, aio):
    fds = files(tmp_path, 3)
    try:
        assert aio.fsync_polled(fds) is None
        assert aio.polled_rounds == 1
        assert aio._ring.head == aio._ring.tail              # every answer was taken
        with pytest.raises(BlockingIOError):
            os.eventfd_read(aio._efd)                        # nothing for the reaper
        assert aio.fsync_polled([]) is None and aio.polled_rounds == 1
    finally:
        for fd in fds:
            os.close(fd)


def test_past_the_poll_limit_the_wait_sleeps_in_the_kernel(tmp_path, aio, monkeypatch):
    monkeypatch.setattr(aio_module, "_POLL_SECONDS", 0.0)
    fds = files(tmp_path, 2)
    try:
        for _ in range(3):
            assert aio.fsync_polled(fds) is None
        assert aio.polled_rounds == 3 and aio._ring.head == aio._ring.tail
    finally:
        for fd in fds:
            os.close(fd)


def test_what_the_kernel_refuses_is_fsynced_the_usual_way_and_its_error_returned(tmp_path, aio):
    good, = files(tmp_path, 1)
    r, w = os.pipe()
    closed = os.open(tmp_path / "closed", os.O_RDWR | os.O_CREAT)
    os.close(closed)                                         # (its number is not reused below)
    try:
        error = aio.fsync_polled([good, closed])             # the first is taken, the second refused
        assert isinstance(error, OSError) and error.errno == errno.EBADF
        assert aio.polled_rounds == 1 and aio._ring.head == aio._ring.tail
        error = aio.fsync_polled([closed, good])             # nothing taken: no round polled
        assert isinstance(error, OSError) and error.errno == errno.EBADF
        assert aio.polled_rounds == 1
        error = aio.fsync_polled([r])                        # no fsync on a pipe
        assert isinstance(error, OSError) and error.errno == errno.EINVAL
    finally:
        for fd in (good, r, w):
            os.close(fd)


def test_an_answer_left_in_the_ring_is_not_taken_for_this_rounds(tmp_path, aio):
    """An answer nobody reaped (a round abandoned by a failed io_getevents, say) is skipped: the
    round counts only the answers to its own fsyncs, and the ring ends up empty. The leftovers here
    are failed reads (into an unmapped buffer: EFAULT), so taking one for this round's would show."""
    fds = files(tmp_path, 2)
    try:
        for _ in range(2):            # two answers nobody waits for
            cb = aio_module._Iocb(aio_data=999, aio_lio_opcode=0, aio_fildes=fds[0],   # IOCB_CMD_PREAD
                                  aio_buf=8, aio_nbytes=100, aio_offset=0)
            assert aio._syscall(ctypes.c_long(aio._submit), aio._ctx, ctypes.c_long(1),
                                (ctypes.POINTER(aio_module._Iocb) * 1)(ctypes.pointer(cb))) == 1
        ring, give_up = aio._ring, time.monotonic() + LIMIT
        while (ring.tail - ring.head) % ring.nr < 2:        # both answered, before the round starts
            assert time.monotonic() < give_up, "the kernel never answered"
            os.sched_yield()
        assert aio.fsync_polled(fds) is None and aio.polled_rounds == 1
        assert aio._ring.head == aio._ring.tail              # the two leftovers went too
    finally:
        for fd in fds:
            os.close(fd)


def getevents_failing(aio):
    """``aio``'s syscall, but ``io_getevents`` fails with EINVAL (a ring that cannot be waited on)."""
    real = aio._syscall

    def syscall(nr, *args):
        if nr.value == aio._getevents:
            ctypes.set_errno(errno.EINVAL)
            return -1
        return real(nr, *args)
    return syscall


def test_a_round_that_cannot_wait_for_its_answers_fails_and_the_next_skips_them(tmp_path, aio):
    fd, = files(tmp_path, 1)
    real = aio._syscall
    try:
        aio._syscall = getevents_failing(aio)
        error = aio.fsync_polled([fd])                       # submitted, never waited for
        assert isinstance(error, OSError) and error.errno == errno.EINVAL and "io_getevents" in str(error)
        aio._syscall = real
        assert aio.fsync_polled([fd]) is None and aio.polled_rounds == 2
    finally:
        aio._syscall = real
        os.close(fd)


def test_with_another_fsync_in_flight_the_ring_is_left_to_the_reaper(tmp_path, aio):
    fd, = files(tmp_path, 1)
    try:
        aio._jobs[-1] = object()        # as while a flusher's fsync is in flight
        assert aio.fsync_polled([fd]) is None and aio.polled_rounds == 0
    finally:
        aio._jobs.pop(-1)
        os.close(fd)


def test_with_polling_off_the_fsync_sleeps_in_the_kernel(tmp_path, aio):
    fd, = files(tmp_path, 1)
    try:
        aio.poll = False
        assert aio.fsync_polled([fd]) is None and aio.polled_rounds == 0
        aio.poll = True
        assert aio.fsync_polled([fd]) is None and aio.polled_rounds == 1
    finally:
        os.close(fd)


async def test_an_inline_round_is_polled_for_too(tmp_path, aio):
    fd, = files(tmp_path, 1)
    try:
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                await nursery.start(aio.serve)
                assert await aio.fsync([fd]) is None           # the loop idle otherwise: inline
                assert (aio.inline_rounds, aio.polled_rounds) == (1, 1)
                nursery.cancel_scope.cancel()
    finally:
        os.close(fd)


def test_a_ring_is_read_only_where_linux_mapped_one():
    assert aio_module._ring_at(0) is None                    # not mapped
    plain = ctypes.create_string_buffer(4096)                # mapped and readable, but no ring header
    assert aio_module._ring_at(ctypes.addressof(plain)) is None


@pytest.mark.parametrize("poll", [True, False])
async def test_a_lone_clients_put_is_polled_for_and_on_disk_when_answered(tmp_path, poll):
    open_or_skip().close()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fsync="always", fsync_poll=poll) as srv:
            c = await srv.client("solo")
            queue = await srv.server.queues.get(QueueRef("solo"))
            polled = srv.server.queues._aio.polled_rounds
            for i in range(1, 5):
                assert await put(c, b"p%d" % i) == (200, b"%d" % i)
                assert queue.log.durable_seq == queue.log.appended_seq   # synced before the answer
            assert srv.server.queues._aio.polled_rounds - polled == (4 if poll else 0)
    qlog = reopen(tmp_path, "solo")
    try:
        assert contents(qlog) == [(i, b"p%d" % i) for i in range(1, 5)]
    finally:
        qlog.close()


async def _inline_round_handed_over(aio, fd, *, during=lambda: None):
    """One inline round (the loop otherwise idle) run in a task of its own, with the poll's limit
    at 0 so that the answer is rarely in the ring at the first look; retried until one round was
    handed over. Returns what ``during()`` gave once every task was blocked while that round still
    waited for the kernel: the loop ran this task during the round."""
    for _ in range(50):
        before, done = aio.handed_over, []

        async def round_():
            os.pwrite(fd, b"y" * 100, 0)          # something for the fsync to write
            done.append(await aio.fsync([fd]))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(round_)
            await trio.testing.wait_all_tasks_blocked()   # the round waits (handed over) or is done
            seen = during() if not done else None
        assert done == [None] and aio.inline_rounds >= 1
        if aio.handed_over > before:
            return seen
    pytest.fail("no inline round outlasted a poll of 0 s in 50 tries")


@pytest.fixture
def slow_fd(tmp_path, aio, monkeypatch):
    """A file to sync, with the poll's limit at 0: an inline round hands over unless its answer is
    in the ring at the first look."""
    monkeypatch.setattr(aio_module, "_POLL_SECONDS", 0.0)
    fd, = files(tmp_path, 1)
    yield fd
    os.close(fd)


@contextlib.asynccontextmanager
async def serving(aio):
    """The reaper running until the block ends, within the tests' time limit."""
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(aio.serve)
            yield
            nursery.cancel_scope.cancel()


async def test_an_inline_round_that_outlasts_the_poll_stops_blocking_the_loop(aio, slow_fd):
    async with serving(aio):
        in_flight = await _inline_round_handed_over(aio, slow_fd, during=lambda: (len(aio._jobs), aio.free_slots()))
        assert in_flight == (1, aio._depth - 1)   # its fsync counted as in flight meanwhile
        assert (aio._jobs, aio.free_slots()) == ({}, aio._depth)   # and nothing once answered


async def test_a_handed_over_round_is_waited_for_when_the_server_stops(aio, slow_fd):
    """The reaper, cancelled while a handed-over round waits, drains: the round is answered, and
    the reaper, whose eventfd those answers do not signal, still sees that nothing is in flight
    and closes the context."""
    reaper = trio.CancelScope()

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        with reaper:
            await aio.serve(task_status=task_status)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            await _inline_round_handed_over(aio, slow_fd, during=reaper.cancel)
            await trio.testing.wait_all_tasks_blocked()
            closed = aio._efd == -1
            if not closed:   # a reaper stuck draining (shielded): let it go, so the test fails, not hangs
                os.eventfd_write(aio._efd, 1)
        assert closed and not aio.serving and aio._jobs == {}


async def test_without_a_free_slot_an_inline_round_past_the_poll_sleeps_in_the_kernel(aio, slow_fd):
    async with serving(aio):
        for _ in range(aio._depth):
            aio._slots.acquire_nowait()
        for _ in range(5):
            os.pwrite(slow_fd, b"z" * 100, 0)
            assert await aio.fsync([slow_fd]) is None
        assert aio.handed_over == 0 and aio.inline_rounds == 5
        for _ in range(aio._depth):
            aio._slots.release()


async def test_a_handed_over_round_that_cannot_read_the_ring_fails_and_frees_its_slots(aio, slow_fd):
    """A ring that cannot be read while a round is handed over: the round's fsync counts as failed
    (never as durable), nothing stays in flight, and the next round, the ring readable again, skips
    the leftover answer."""
    real = aio._syscall
    async with serving(aio):
        for _ in range(50):
            before = aio.handed_over
            os.pwrite(slow_fd, b"w" * 100, 0)
            aio._syscall = getevents_failing(aio)
            try:
                error = await aio.fsync([slow_fd])
            finally:
                aio._syscall = real
            assert isinstance(error, OSError) and error.errno == errno.EINVAL and "io_getevents" in str(error)
            assert (aio._jobs, aio.free_slots()) == ({}, aio._depth)
            handed = aio.handed_over > before
            # the ring readable again, the next round goes through and takes the unread answer
            # with its own (a round that found it at its first look could not hand over)
            assert await aio.fsync([slow_fd]) is None
            if handed:
                break
        else:
            pytest.fail("no inline round outlasted a poll of 0 s in 50 tries")
