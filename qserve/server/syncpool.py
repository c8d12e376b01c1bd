"""SyncPool: a few persistent threads that run the flushers' fsyncs, answering through one doorbell fd.

Why not `trio.to_thread.run_sync`: one round trip through it costs a thread-cache hand-off, then
`TrioToken.run_sync_soon`'s wake-up, and every group-commit round pays it once. Here a call is a
`queue.SimpleQueue.put` to an idle thread, and the answer is a write to an eventfd (a socketpair
where there is none) that one reaper task waits on with `trio.lowlevel.wait_readable`: well under
half the CPU per round trip (README, "Development", has the figures).
The server uses it where kernel AIO (`server.aio.AioSync`) is unavailable, and for an injected file layer.

Bounds: ``threads`` calls run at once; more wait in the job queue, which holds at most one call per
flusher (one per open queue, itself bounded by ``max_queues``). Results wait in a deque until the
reaper hands them over; the same bound applies.

Cancellation: like ``to_thread.run_sync``, a call cannot be abandoned: `run` waits for its result
even when cancelled (an fsync is short), then lets the cancellation through at the next checkpoint.
When the reaper is cancelled (shutdown) it keeps reaping, shielded, until no call is outstanding,
then stops the threads; calls made after that run in a `trio.to_thread` thread.
"""

from __future__ import annotations

import collections
import os
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

import trio

from .reaping import reap_then_drain

__all__ = ["SyncPool"]


class _Job:
    __slots__ = ("fn", "done", "result")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = trio.Event()
        self.result: tuple[bool, Any] | None = None   # (raised, value or exception)


class _Doorbell:
    """Rung from any thread, awaited by one trio task."""

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._socks: tuple[socket.socket, socket.socket] | None = None
        else:  # pragma: no cover - platforms without eventfd
            a, b = socket.socketpair()
            a.setblocking(False)
            b.setblocking(False)
            self._socks = (a, b)
            self._fd = a.fileno()

    def ring(self) -> None:
        try:
            if self._socks is None:
                os.eventfd_write(self._fd, 1)
            else:  # pragma: no cover
                self._socks[1].send(b"\0")
        except BlockingIOError:  # pragma: no cover - already rung more than the buffer holds
            pass

    async def wait(self) -> None:
        await trio.lowlevel.wait_readable(self._fd)
        try:
            if self._socks is None:
                os.eventfd_read(self._fd)
            else:  # pragma: no cover
                self._socks[0].recv(4096)
        except BlockingIOError:  # pragma: no cover
            pass

    def close(self) -> None:
        if self._socks is None:
            os.close(self._fd)
        else:  # pragma: no cover
            for s in self._socks:
                s.close()


class SyncPool:
    """Start with ``await nursery.start(pool.serve)``; then ``await pool.run(fn)`` from any task."""

    def __init__(self, threads: int = 4) -> None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self._size = threads
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._finished: collections.deque[_Job] = collections.deque()
        self._bell: _Doorbell | None = None
        self._outstanding = 0
        self._serving = False
        self._running = 0                 # threads still running, under _lock
        self._lock = threading.Lock()

    async def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` in a pool thread; its result or exception. Not abandoned when cancelled."""
        if not self._serving:
            return await trio.to_thread.run_sync(fn)
        job = _Job(fn)
        self._outstanding += 1
        self._jobs.put(job)
        with trio.CancelScope(shield=True):
            await job.done.wait()
        await trio.lowlevel.checkpoint_if_cancelled()
        assert job.result is not None
        raised, value = job.result
        if raised:
            raise value
        return value

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The reaper: hands finished calls back to their tasks. Runs until cancelled."""
        self._bell = bell = _Doorbell()
        threads = [threading.Thread(target=self._work, name=f"qserve-sync-{i}", daemon=True)
                   for i in range(self._size)]
        self._running = len(threads)
        for t in threads:
            t.start()
        self._serving = True
        task_status.started()

        async def reap() -> None:
            await bell.wait()
            self._hand_over()

        try:
            await reap_then_drain(reap, lambda: bool(self._outstanding), self._stop_serving)
        finally:
            # the last thread to stop closes the bell: no thread can ring it after that
            for _ in threads:
                self._jobs.put(None)

    def _stop_serving(self) -> None:
        self._serving = False

    def _hand_over(self) -> None:
        finished = self._finished
        while finished:
            job = finished.popleft()
            self._outstanding -= 1
            job.done.set()

    def _work(self) -> None:
        jobs, finished, bell = self._jobs, self._finished, self._bell
        assert bell is not None
        while True:
            job = jobs.get()
            if job is None:
                with self._lock:
                    self._running -= 1
                    if self._running == 0:
                        bell.close()
                return
            try:
                job.result = (False, job.fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, like to_thread
                job.result = (True, exc)
            finished.append(job)
            bell.ring()
