"""AioSync: group-commit fsyncs handed to the kernel (Linux AIO, ``IOCB_CMD_FSYNC``), answered on an eventfd.

Why: a round through a Python thread (`server.syncpool.SyncPool`) wakes that thread, which must then take
the GIL from the busy event loop to call ``os.fsync`` and again to report back. With Linux AIO the
event loop submits the fsync with one ``io_submit`` (the kernel runs ``vfs_fsync`` in a worker,
since 4.18) and a reaper task learns of the completion from an eventfd it waits on with
`trio.lowlevel.wait_readable`: less wall time and less user CPU per round than the thread pool.
The fsync's kernel work moves from the process to a kernel worker, so the whole machine's CPU per
durable put stays about the same (README, "Development", has the figures).

Inline: when no other task is runnable and no AIO fsync is in flight (an idle moment between
spaced requests, say), ``fsync`` waits for it right there (polled, below): the loop has nothing to
do meanwhile, and the round saves the eventfd, the reaper and one scheduler pass each way. Not
with ``inline=False``: work the fsync holds up may arrive meanwhile (`GroupCommit._sync_round`).

Overlap: the kernel queues an AIO fsync's work on the submitting CPU, where a worker waits while the
loop runs, so the flush only started once the loop went idle. ``fsync(..., overlap=True)`` yields
the CPU once right after ``io_submit`` (``os.sched_yield``): the worker issues the flush, blocks
on the disk, and the loop's own work runs during it (`backends.local.commit`, `_round_now`).

Polled: an inline round, and a lone client's (`backends.local.commit`, `_round_here`), block the
loop for their fsync anyway; `fsync_polled` submits it to the kernel and polls the context's
completion ring (the page the kernel maps at the context's address, libaio reads it the same way)
with ``os.sched_yield`` between looks (the kernel's worker for the fsync runs on this CPU), instead
of sleeping in ``fsync``: on a VM that halts an idle vCPU, waking it for the disk's answer costs
~50 us (docs/performance.md has the figures). Polling stops after ``_POLL_SECONDS``. Only while no
other AIO fsync is in flight (the ring's answers are then this round's), only where the ring is
mapped where it should be (`_ring_at`), and only with ``poll`` (``Config.fsync_poll``,
``--no-fsync-poll``: sleep in ``fsync`` instead).

Handed over: an inline round unanswered after ``_POLL_SECONDS`` stops blocking the loop (`_hand_over`):
its fsyncs count as in flight and it waits for them as a task, the other connections served meanwhile
(some fsyncs take 8-36 ms). A lone client's round (`_round_here`) stalls nobody: it sleeps in the kernel.

Completion: ``fsync(fds, on_done)`` runs ``on_done(error)`` in the reaper as soon as the kernel has
answered, before the caller is rescheduled: the queue's flusher ends its round there
(`backends.local.commit.GroupCommit._end_round`), one scheduler turn earlier for every waiter.

Availability: Linux on x86_64 or aarch64 (the two syscall tables below) where ``io_setup`` is
allowed and an fsync submitted at start-up completes (kernel 4.18 or later); `AioSync.open`
returns None otherwise, and the flushers use the thread pool (``Config.fsync_backend = "auto"``;
"threads" never opens a context, "aio" refuses to start without one). Only fds of the real file
layer are synced this way (`storage.SyncTicket.plain_files`): fault-injecting tests get the pool.

Bounds: at most ``depth`` fsyncs in flight (a `trio.Semaphore`); completions are drained from the
kernel's ring in batches of ``depth``. Cancellation: like the pool, a submitted fsync is waited for
even when the caller is cancelled; the reaper, cancelled at shutdown, keeps reaping (shielded) until
nothing is in flight, then destroys the context.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
import tempfile
import time
from itertools import count

import trio
from trio._core import _run as _trio_run   # the run queue's length: `nothing_runnable`

from .reaping import reap_then_drain

__all__ = ["AioSync", "nothing_runnable"]

_NR = {"x86_64": (206, 207, 209, 208), "aarch64": (0, 1, 2, 4)}   # io_setup, io_destroy, io_submit, io_getevents
_IOCB_CMD_FSYNC = 2
_IOCB_FLAG_RESFD = 1
_RING_MAGIC = 0xA10A10A1   # fs/aio.c: AIO_RING_MAGIC, in the header of the ring io_setup maps
_POLL_SECONDS = 0.002      # `fsync_polled` polls the ring this long at most, then sleeps in the kernel
_HANDED_OVER_LOOK = 0.0002  # an inline round past that limit looks at the ring this often (`_hand_over`)


def nothing_runnable() -> bool:
    """True when no other task of this trio run is scheduled to run (the run queue is empty). Reads
    the runner's queue directly: `trio.lowlevel.current_statistics` counts every registered fd too,
    which costs O(connections) per call. False when that private attribute is not there."""
    runner = getattr(_trio_run.GLOBAL_RUN_CONTEXT, "runner", None)
    runq = getattr(runner, "runq", None)
    return runq is not None and not runq


class _Iocb(ctypes.Structure):   # include/uapi/linux/aio_abi.h, little endian
    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32), ("aio_rw_flags", ctypes.c_int32),
                ("aio_lio_opcode", ctypes.c_uint16), ("aio_reqprio", ctypes.c_int16),
                ("aio_fildes", ctypes.c_uint32), ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
                ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64),
                ("aio_flags", ctypes.c_uint32), ("aio_resfd", ctypes.c_uint32)]


class _IoEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Ring(ctypes.Structure):   # fs/aio.c: struct aio_ring, the header of the completion ring
    _fields_ = [("id", ctypes.c_uint), ("nr", ctypes.c_uint), ("head", ctypes.c_uint), ("tail", ctypes.c_uint),
                ("magic", ctypes.c_uint), ("compat_features", ctypes.c_uint),
                ("incompat_features", ctypes.c_uint), ("header_length", ctypes.c_uint)]


def _ring_at(address: int) -> _Ring | None:
    """The completion ring of the AIO context ``address`` (the context id io_setup returns is the
    address where the kernel mapped it), or None unless a readable mapping of this process holds
    it and its header is the one Linux writes: then it is never read."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                span, perms = line.split(None, 2)[:2]
                start, _, end = span.partition("-")
                if int(start, 16) <= address and address + ctypes.sizeof(_Ring) <= int(end, 16):
                    break
            else:
                return None
    except (OSError, ValueError):
        return None
    if not perms.startswith("r"):
        return None
    ring = _Ring.from_address(address)
    if ring.magic != _RING_MAGIC or ring.incompat_features != 0 or not ring.nr:
        return None
    return ring


def _answer_error(res: int) -> OSError:
    """The error of a failed fsync's answer (``res``: minus its errno)."""
    return OSError(-res, f"fsync: {os.strerror(-res)}")


def _fsync_each(fds: list[int]) -> OSError | None:
    """``os.fsync`` of every fd; the first error (None: all durable)."""
    error: OSError | None = None
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as exc:
            error = error or exc
    return error


class _Job:
    __slots__ = ("left", "error", "task", "on_done", "callback_error", "keys")

    def __init__(self, n: int, on_done=None, keys=()) -> None:
        self.left = n
        self.error: OSError | None = None
        self.task = None          # the caller, once it waits (`AioSync.fsync`)
        self.on_done = on_done
        self.callback_error: BaseException | None = None
        self.keys: set[int] = set(keys)   # a polled round's keys, whose answers it takes itself

    def finish(self) -> None:
        """All fsyncs answered: run ``on_done(error)`` here and now, then release the caller."""
        if self.on_done is not None:
            try:
                self.on_done(self.error)
            except BaseException as exc:   # noqa: BLE001 - re-raised in the caller's task
                self.callback_error = exc
        if self.task is not None:
            trio.lowlevel.reschedule(self.task)


def _not_abandoned(_raise_cancel) -> trio.lowlevel.Abort:
    """A submitted fsync is waited for even when its caller is cancelled (as under a shield)."""
    return trio.lowlevel.Abort.FAILED


class AioSync:
    """Create with `open`; start with ``await nursery.start(aio.serve)``; then ``await aio.fsync(fds)``."""

    def __init__(self, syscall, nr: tuple[int, int, int, int], ctx: int, depth: int) -> None:
        self._syscall = syscall
        self._setup, self._destroy, self._submit, self._getevents = nr
        self._ctx = ctypes.c_ulong(ctx)
        self._depth = depth
        self._slots = trio.Semaphore(depth)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._events = (_IoEvent * depth)()
        self._zero = _Timespec(0, 0)
        # one iocb for every `fsync` submission: io_submit copies it into the kernel, so it is
        # free again once the call returns (building one and its pointer array per call: 1.8 us)
        self._cb = _Iocb(aio_lio_opcode=_IOCB_CMD_FSYNC, aio_flags=_IOCB_FLAG_RESFD, aio_resfd=self._efd)
        self._cb_ptrs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(self._cb))
        # the syscalls' arguments, made once (a fresh ctypes object per argument: ~0.1 us each)
        self._one = ctypes.c_long(1)
        self._c_zero = ctypes.c_long(0)
        self._c_submit = ctypes.c_long(self._submit)
        self._c_getevents = ctypes.c_long(self._getevents)
        self._c_depth = ctypes.c_long(depth)
        self._zero_ref = ctypes.byref(self._zero)
        self._quiet_cb = _Iocb(aio_lio_opcode=_IOCB_CMD_FSYNC)   # the same for `fsync_polled` (no eventfd)
        self._quiet_ptrs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(self._quiet_cb))
        self._ids = count(1)
        self._jobs: dict[int, _Job] = {}   # aio_data -> the job of that fsync
        self._ring = _ring_at(ctx)         # None: `fsync_polled` fsyncs the usual way
        self.poll = True                   # False: `fsync_polled` sleeps in fsync (``Config.fsync_poll``)
        self.serving = False
        self.inline_rounds = 0             # fsyncs done inline (`_fsync_inline`), for statistics
        self.polled_rounds = 0             # rounds whose answers were polled for (`fsync_polled`)
        self.handed_over = 0               # inline rounds that stopped blocking the loop (`_hand_over`)

    @classmethod
    def open(cls, depth: int = 64) -> AioSync | None:
        """An AIO context, or None where kernel AIO cannot be used here."""
        nr = _NR.get(platform.machine())
        if nr is None or not sys.platform.startswith("linux") or sys.byteorder != "little":
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            syscall = libc.syscall
        except (OSError, AttributeError):
            return None
        syscall.restype = ctypes.c_long
        ctx = ctypes.c_ulong(0)
        if syscall(ctypes.c_long(nr[0]), ctypes.c_uint(depth), ctypes.byref(ctx)) != 0:
            return None   # ENOSYS, EPERM (seccomp), EAGAIN (aio-max-nr reached)...
        if not cls._probe(syscall, nr, ctx):   # kernels before 4.18 refuse IOCB_CMD_FSYNC
            syscall(ctypes.c_long(nr[1]), ctx)
            return None
        return cls(syscall, nr, ctx.value, depth)

    @staticmethod
    def _probe(syscall, nr, ctx) -> bool:
        """One blocking AIO fsync of a temporary file (at start-up): does it work here?"""
        with tempfile.TemporaryFile() as f:
            f.write(b"probe")
            f.flush()
            cb = _Iocb(aio_data=1, aio_lio_opcode=_IOCB_CMD_FSYNC, aio_fildes=f.fileno())
            if syscall(ctypes.c_long(nr[2]), ctx, ctypes.c_long(1),
                       (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(cb))) != 1:
                return False
            event = _IoEvent()
            got = syscall(ctypes.c_long(nr[3]), ctx, ctypes.c_long(1), ctypes.c_long(1),
                          ctypes.byref(event), ctypes.byref(_Timespec(10, 0)))
            return got == 1 and event.res == 0

    def free_slots(self) -> int:
        """How many fsyncs `fsync` can submit before it would wait for a slot (none submitted by
        then: a caller that checked this submits the fds it passes before anything else runs)."""
        return self._slots.value

    async def fsync(self, fds: list[int], on_done=None, *, overlap=False, inline=True) -> OSError | None:
        """fsync every fd; returns the first error (None: all durable). Not abandoned when cancelled.

        ``overlap``: the loop has work of its own to do during this fsync (see the module doc): the
        fsync is never done inline, and the CPU is yielded once after the submission. ``inline``: see the module doc.

        ``on_done(error)``, if given, runs once in the reaper's task the moment the last fsync is
        answered (or here, if none could be submitted), before this call returns: its caller is
        only woken a scheduling batch later. An exception it raises is raised here."""
        if not fds:
            if on_done is not None:
                on_done(None)
            return None
        if not self.serving:
            raise RuntimeError("AioSync is not serving")
        if inline and not overlap and not self._jobs and nothing_runnable():
            return await self._fsync_inline(fds, on_done)
        job = _Job(len(fds), on_done)
        cb, ptrs, submit = self._cb, self._cb_ptrs, self._c_submit
        for fd in fds:
            try:   # acquire() yields to the scheduler even with a slot free: a batch per round
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                with trio.CancelScope(shield=True):   # what is submitted already is waited for
                    await self._slots.acquire()
            key = next(self._ids)
            cb.aio_data, cb.aio_fildes = key, fd
            self._jobs[key] = job
            if self._syscall(submit, self._ctx, self._one, ptrs) != 1:
                code = ctypes.get_errno() or errno.EIO
                del self._jobs[key]
                self._slots.release()
                job.error = job.error or OSError(code, f"io_submit(fsync): {os.strerror(code)}")
                job.left -= 1
        if overlap and job.left:
            os.sched_yield()   # the kernel's worker for this fsync is queued on our CPU: let it start
        if job.left:   # the reaper's `_Job.finish` reschedules us; not cancellable, like a shield
            job.task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(_not_abandoned)
        else:
            job.finish()
        if job.callback_error is not None:
            raise job.callback_error
        await trio.lowlevel.checkpoint_if_cancelled()
        return job.error

    async def _fsync_inline(self, fds: list[int], on_done) -> OSError | None:
        """`fsync` done here and now, polled for, blocking the loop: only when no other task is
        runnable and no AIO fsync is in flight, and for at most ``_POLL_SECONDS`` (then `_hand_over`),
        so it stalls nobody for long; it saves the eventfd wake-up and the reaper's scheduling pass."""
        job = self._submit_polled(fds)
        if job is not None:
            self._take_answers(job, time.perf_counter() + _POLL_SECONDS)
            await self._hand_over(job)
        error = _fsync_each(fds) if job is None else job.error
        self.inline_rounds += 1
        if on_done is not None:
            on_done(error)
        # one scheduling batch before the caller goes on, as when the reaper runs ``on_done``: the
        # tasks ``on_done`` woke run before whatever the caller wakes next (a flusher's ``first``
        # waiters before the rest of the round)
        await trio.lowlevel.cancel_shielded_checkpoint()
        await trio.lowlevel.checkpoint_if_cancelled()
        return error

    def fsync_polled(self, fds: list[int]) -> OSError | None:
        """fsync every fd here and now, blocking the loop as ``os.fsync`` would, but submitted to the
        kernel and polled for (module docstring, "Polled"); the first error (None: all durable).
        Falls back to ``os.fsync`` without a usable ring, while another fsync is in flight, or for
        the fds the kernel did not take."""
        job = self._submit_polled(fds)
        if job is None:
            return _fsync_each(fds)
        self._take_answers(job, time.perf_counter() + _POLL_SECONDS)
        self._take_answers(job, None)   # past the poll's limit, if any is left: sleep in the kernel
        return job.error

    def _submit_polled(self, fds: list[int]) -> _Job | None:
        """Submit an fsync of every fd with no eventfd (its answer is polled for), each under a key
        of its own; the job counts the ones the kernel took, and carries the error of those it did
        not, fsynced here the usual way. None (nothing submitted) when polling cannot be used."""
        if self._ring is None or not self.poll or self._jobs or not fds:
            return None
        keys = [next(self._ids) for _ in fds]   # (an answer left over from an abandoned round is no key of these)
        if len(fds) == 1:       # a round's usual one segment: the preallocated iocb
            ptrs, n_fds = self._quiet_ptrs, self._one
            self._quiet_cb.aio_data, self._quiet_cb.aio_fildes = keys[0], fds[0]
        else:
            cbs = [_Iocb(aio_data=key, aio_lio_opcode=_IOCB_CMD_FSYNC, aio_fildes=fd) for key, fd in zip(keys, fds)]
            ptrs, n_fds = (ctypes.POINTER(_Iocb) * len(cbs))(*map(ctypes.pointer, cbs)), ctypes.c_long(len(cbs))
        taken = max(0, self._syscall(self._c_submit, self._ctx, n_fds, ptrs))
        job = _Job(taken, keys=keys[:taken])
        job.error = _fsync_each(fds[taken:])   # what the kernel did not take
        if taken:
            self.polled_rounds += 1
        return job

    def _take_answers(self, job: _Job, give_up: float | None) -> None:
        """Take ``job``'s answers from the ring, blocking the loop: polled for until ``give_up``
        (`time.perf_counter`), or with None slept for in ``io_getevents`` until all are in. A ring
        that cannot be waited on ends the job with that error (its fsyncs count as failed)."""
        ring = self._ring
        while job.left:
            wait = ring.head == ring.tail   # nothing answered yet
            if wait and give_up is not None:
                if time.perf_counter() >= give_up:
                    return
                os.sched_yield()            # the fsync's kernel worker runs on this CPU
                continue
            n = self._syscall(self._c_getevents, self._ctx, self._one if wait else self._c_zero,
                              self._c_depth, self._events, None if wait else self._zero_ref)
            if n < 0 and ctypes.get_errno() != errno.EINTR:   # cannot be waited for: not durable
                code = ctypes.get_errno() or errno.EIO
                job.error = job.error or OSError(code, f"io_getevents: {os.strerror(code)}")
                job.left = 0
                return
            for i in range(max(n, 0)):
                ev = self._events[i]
                if ev.data in job.keys:
                    job.keys.discard(ev.data)
                    job.left -= 1
                    if ev.res < 0 and job.error is None:
                        job.error = _answer_error(ev.res)

    async def _hand_over(self, job: _Job) -> None:
        """The rest of an inline round's answers, waited for without blocking the loop (module doc,
        "Handed over"). Its keys enter ``_jobs`` with their slots: no other round polls or runs
        inline, and the reaper hands back their answers if it takes them; no eventfd tells of
        them, so this task looks every ``_HANDED_OVER_LOOK`` s. Not cancellable. A slot short
        (never with nothing in flight): it sleeps in the kernel."""
        if not job.left or self._slots.value < job.left:
            return self._take_answers(job, None)
        self.handed_over += 1
        for key in job.keys:
            self._slots.acquire_nowait()
            self._jobs[key] = job
        job.keys.clear()   # from here, answers come through `_hand_back`
        with trio.CancelScope(shield=True):
            while job.left:
                await trio.sleep(_HANDED_OVER_LOOK)
                code = self._reap_ready()
                if code:   # the ring cannot be read: what is out is not durable
                    for key in [k for k, j in self._jobs.items() if j is job]:
                        del self._jobs[key]   # (its answer, if any, is skipped)
                        self._slots.release()
                    job.error, job.left = job.error or OSError(code, f"io_getevents: {os.strerror(code)}"), 0
        if self._efd >= 0:   # a draining reaper waits on the eventfd, which these answers never signal
            os.eventfd_write(self._efd, 1)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The reaper: hands completions back. Runs until cancelled, then drains and closes."""
        self.serving = True
        task_status.started()
        try:
            await reap_then_drain(self._wait_and_reap, lambda: bool(self._jobs), self._stop_serving)
        finally:
            self.close()

    def _stop_serving(self) -> None:
        self.serving = False

    def close(self) -> None:
        """Release the kernel context and the eventfd (nothing may be in flight: `serve` drains)."""
        if self._efd >= 0:
            self._ring = None   # unmapped with the context: never read again
            self._syscall(ctypes.c_long(self._destroy), self._ctx)
            os.close(self._efd)
            self._efd = -1

    async def _wait_and_reap(self) -> None:
        await trio.lowlevel.wait_readable(self._efd)
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            return
        self._reap_ready()   # (an error here: EINTR, say; the eventfd tells again)

    def _reap_ready(self) -> int:
        """Every answer in the ring handed to its job, without waiting; the errno of a failed
        ``io_getevents`` (EINTR aside), else 0."""
        while True:
            n = self._syscall(self._c_getevents, self._ctx, self._c_zero, self._c_depth, self._events,
                              self._zero_ref)
            if n < 0:
                code = ctypes.get_errno()
                return 0 if code == errno.EINTR else code or errno.EIO
            for i in range(n):
                self._hand_back(self._events[i])
            if n < self._depth:
                return 0

    def _hand_back(self, ev: _IoEvent) -> None:
        job = self._jobs.pop(ev.data, None)
        if job is None:
            return   # a handed-over round's answer it already took, or one nobody waits for
        self._slots.release()
        if ev.res < 0 and job.error is None:
            job.error = _answer_error(ev.res)
        job.left -= 1
        if job.left == 0:
            job.finish()
