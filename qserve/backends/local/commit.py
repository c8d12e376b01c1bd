"""Group commit for a local queue: one flusher task per queue fsyncs while other tasks keep appending.

Strategy: every write made during one fsync shares the next one. The flusher fsyncs through kernel
AIO (`server.aio.AioSync`, whose reaper ends the round the moment the kernel answers) or a worker
thread of the manager's `SyncPool` (`log.sync_begin()` / the ticket's fsyncs / `log.sync_end()`);
a request that must be durable awaits `wait_durable(mark)`. A failed fsync rolls the round's
writes back (storage does), and its waiters get `Unavailable`. `GroupCommit` is the base of
`queues.Queue`, which is told of every rollback (an undone delete makes entries deliverable again).

A lone client (one connection open, nothing else runnable, no round in progress) is not worth the
hand-off: its put runs the round itself, fsyncing on the trio thread (`_round_here`), which spares
the flusher's wake-up, its checkpoint and the put's own wake-up; on this project's 2-vCPU VM a
sequential client's durable put went from p50 644-724 us to 581-640 us (alternating runs of
peerbench's http_client_seq.py). That round's fsync goes to kernel AIO and is polled for
(`AioSync.fsync_polled`), which spares the vCPU's halt and wake-up: 1,404-1,563 -> 1,621-1,777
puts/s. With more than one connection the flusher runs every round, since the scheduler's current
batch (invisible to `nothing_runnable`) may hold the next puts, which an fsync on the trio thread
would stall. One exception: with two connections (one consumer's watch and its commits), a commit
that woke its watcher submits its own round to kernel AIO at once (`_round_now`), so that the
watcher's next frames are written while the kernel syncs the deletes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from qserve import storage

from qserve.backends.base import WriteMark
from qserve.config import Config
from qserve.core.errors import Unavailable
from qserve.core.events import QueueRef
from qserve.server.aio import AioSync, nothing_runnable
from qserve.server.meters import Histogram
from qserve.server.syncpool import SyncPool

__all__ = ["Signal", "GroupCommit"]

log = logging.getLogger("qserve")

_EPOCHS_KEPT = 64   # rollback epochs whose durable point `GroupCommit` remembers (see `_observe`)
# seconds: the buckets of the rounds' durations (`/metrics`: qserve_fsync_round_seconds), from the
# fsync of an idle disk (~0.1-0.3 ms on the README's VMs) to the stalls a busy one has (10-500 ms)
ROUND_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Signal:
    """A level-less broadcast: `wait()` returns at the next `fire()`. Task-safe within one trio run.
    The event is made by the first waiter, so a fire with nobody waiting (most rounds of a lone
    client) costs no `trio.Event`."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: trio.Event | None = None

    def fire(self) -> None:
        event = self._event
        if event is not None:
            self._event = None
            event.set()

    async def wait(self) -> None:
        event = self._event
        if event is None:
            event = self._event = trio.Event()
        await event.wait()


class GroupCommit:
    """The durability side of one open queue. Not thread-safe: used from the trio thread only."""

    def __init__(self, ref: QueueRef, qlog: storage.QueueLog, config: Config, pool: SyncPool | None,
                 aio: AioSync | None, *, on_rollback: Callable[[], None],
                 clients: Callable[[], int | None] | None = None,
                 sends_on_append: Callable[[], bool] = lambda: False) -> None:
        self.ref = ref
        self._clients = clients          # () -> the client connections open (None: not known)
        self._sends_on_append = sends_on_append   # () -> an append now is a frame written at once (`_sync_round`)
        self._in_round = False           # the flusher's round is open (`_sync_round`, after sync_begin)
        self.rounds_here = 0             # rounds run by the waiting task itself (`_round_here`)
        self.rounds_now = 0              # rounds a waiter submitted itself (`_round_now`)
        # every round that ended: the seconds from its start to its end, and the writes it made
        # durable (`/metrics`: qserve_fsync_round_seconds, qserve_fsync_writes_total)
        self.round_seconds = Histogram(ROUND_BUCKETS)
        self.round_writes = 0
        self._round_began = (0.0, 0)     # the round in progress: (perf_counter, durable_seq) at its start
        self._on_rollback = on_rollback  # entries whose delete was undone are deliverable again
        self.log = qlog
        self.config = config
        self._pool = pool
        self._aio = aio
        self._durable = Signal()         # fired after each fsync round
        self._durable_first = Signal()   # fired just before it (`wait_durable(first=True)`)
        self._first_waiting = 0
        self._round_ended = Signal()     # fired when a round ends (`_round_now`, `_sync_round`)
        self._flush_wanted = trio.Event()
        # epoch = the log's rollback count; epoch -> highest durable_seq seen during that epoch
        self._durable_in: dict[int, int] = {}
        self._epoch = qlog.rollbacks
        self.closed = False

    def _observe(self) -> int:
        """Note the log's durable point in the current epoch; returns the epoch.

        An epoch ends with every rollback, and rollbacks also happen outside the flusher: a failed
        fsync while rolling a segment (inside any append, delete, ...) or compacting rolls back
        what the flusher was about to make durable. The log's rollback count is the one record of
        all of them. Observations are kept for the last `_EPOCHS_KEPT` epochs; a waiter from an
        older one is failed (the safe answer: a client retry duplicates, nothing is lost).
        """
        epoch = self.log.rollbacks
        durable = self.log.durable_seq
        if epoch != self._epoch:   # entries whose delete was rolled back are deliverable again
            self._epoch = epoch
            self._on_rollback()
        if self._durable_in.get(epoch, -1) < durable:
            self._durable_in[epoch] = durable
            while len(self._durable_in) > _EPOCHS_KEPT:
                del self._durable_in[next(iter(self._durable_in))]
        return epoch

    def write_mark(self) -> WriteMark:
        """A token for "everything written so far", to pass to `wait_durable` later."""
        return self._observe(), self.log.appended_seq

    async def wait_durable(self, mark: WriteMark | None = None, *, first: bool = False,
                           overlap: bool = False) -> None:
        """Return once everything written up to `mark` (default: now) is durable under the fsync
        policy; raise `Unavailable` if an fsync failed first and the write was rolled back.
        ``first``: resume ahead of the other waiters of the same round (an auto-commit watch's
        frames go out before the round's put answers, which are not what anybody waits on).
        ``overlap``: the caller just woke work that needs no durability of its own (a commit's freed
        window slots: the next frames): the round starts here and now, if it can (`_round_now`).

        Failures are tracked by epoch (the log's rollback count), not by sequence number alone:
        a rollback marks its sequence numbers durable without writing them.
        """
        if self.config.fsync != "always":
            return
        epoch, seq = self.write_mark() if mark is None else mark
        while True:
            if self._observe() != epoch:
                # a rollback came after this write: it survived only if it was durable before
                if seq > self._durable_in.get(epoch, 0):
                    raise Unavailable("the write could not be made durable (fsync failed); not stored")
                return
            if self.log.durable_seq >= seq:
                return
            if self.closed:
                raise Unavailable("queue closed before the write was durable")
            if not first and self._may_round_here():
                self._round_here()
                continue
            if overlap and self._may_round_now() and await self._round_now():
                continue
            self._flush_wanted.set()
            if first:
                self._first_waiting += 1
                try:
                    await self._durable_first.wait()
                finally:
                    self._first_waiting -= 1
            else:
                await self._durable.wait()

    def _begin(self, *, here: bool) -> storage.SyncTicket:
        """Start a round: the log's ``sync_begin``, noted for the round's figures (`_end_round`)."""
        self._observe()
        self._round_began = (time.perf_counter(), self.log.durable_seq)
        return self.log.sync_begin(here=here)

    def commit_figures(self) -> dict:
        """The group-commit figures: the rounds' durations (a `Histogram`: how many, their seconds)
        and the writes they made durable."""
        return {"fsync_round_seconds": self.round_seconds, "fsync_writes": self.round_writes}

    def _open_clients(self) -> int | None:
        """The client connections open, from the server (None: not known, as without a server)."""
        return None if self._clients is None else self._clients()

    def _may_round_here(self) -> bool:
        """A lone client: one connection open, no other task runnable, no round in progress. Then
        the waiter can fsync right here, blocking the loop for the fsync: there is nobody to stall,
        and the round skips the flusher's wake-up, its checkpoint and the waiter's own wake-up,
        three scheduler passes (`nothing_runnable` alone is not enough: it cannot see the tasks
        left in the scheduler's current batch, which under many connections are the next puts)."""
        clients = self._open_clients()
        return not self._in_round and clients is not None and clients <= 1 and nothing_runnable()

    def _round_here(self) -> None:
        """One group-commit round, synchronously, in the waiting task (`_may_round_here`); the same
        rollback and wake-ups as the flusher's."""
        ticket = self._begin(here=True)
        failure: OSError | None = None
        aio = self._aio
        if aio is not None and aio.serving and ticket.plain_files:
            failure = aio.fsync_polled(ticket.fds)   # the same fsync, polled for: no sleep, no wake-up
            ticket.complete(failure)
        else:
            try:
                ticket.run()
            except OSError as exc:
                failure = exc
        self.rounds_here += 1
        self._end_round(ticket, failure, wake=False)
        self._durable_first.fire()
        self._durable.fire()

    def _kernel_takes_fd(self) -> bool:
        """The round's fsync goes to kernel AIO with a submission slot free, so ``io_submit`` takes
        the kernel's own reference to the segment's file before this thread does anything else:
        the ticket can hold the segment's own fd, and the round saves a ``dup`` and a ``close``
        (storage/sync.py). Not for an injected file layer (the thread pool's rounds)."""
        aio = self._aio
        return aio is not None and aio.serving and aio.free_slots() > 0 and self.log.plain_files

    def _may_round_now(self) -> bool:
        """Kernel AIO serving, no round in progress, some other task runnable (the work to overlap),
        and at most two connections open (a consumer's watch and its commits): with more, other
        writes may be about to join a round, which the flusher's checkpoint lets them do, and a
        round started at once leaves them to one more (four consumers under `tools.bench.watch`:
        ~22,100 -> ~19,700 entries/s when every commit started its own)."""
        aio, clients = self._aio, self._open_clients()
        return (aio is not None and aio.serving and not self._in_round and clients is not None
                and clients <= 2 and not nothing_runnable())

    async def _round_now(self) -> bool:
        """One round started by the waiting task before anything else runs: its fsync is submitted
        to the kernel (`AioSync.fsync` with ``overlap``) and the tasks the caller woke run during
        it. A manual commit's answer waits for its deletes to be durable, the frames its freed
        slots let through do not: with one consumer (`../shared/peerbench/watch_rate.py`) those
        frames were written before the fsync, which then blocked the loop, and now are written
        during it. The flusher waits for this round before it starts one (`_sync_round`). False
        (nothing done) when the log's files are not plain files."""
        ticket = self._begin(here=self._kernel_takes_fd())
        if not ticket.plain_files:   # an injected file layer: the flusher's way
            ticket.close()
            return False
        self._in_round = True
        self.rounds_now += 1
        try:
            await self._aio.fsync(ticket.fds, on_done=lambda error: self._end_round(ticket, error, wake=True),
                                  overlap=True)
        finally:
            self._in_round = False
            self._round_ended.fire()
        self._durable.fire()
        return True

    async def round_over(self) -> None:
        """Return once no round of the flusher's or a waiter's is in flight (at once if none is)."""
        while self._in_round:
            await self._round_ended.wait()

    async def _round_done(self) -> None:
        """Wake the waiters of a finished round, the ``first`` ones one scheduling batch ahead:
        they are rescheduled now, this task after them, and the others only when it runs again
        (trio runs a batch in random order, so one checkpoint is what orders them)."""
        if self._first_waiting:
            self._durable_first.fire()
            await trio.lowlevel.checkpoint()
        self._durable.fire()

    async def flusher(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run group-commit rounds until cancelled; the final sync is done by `close()`."""
        task_status.started()
        while True:
            if self.config.fsync == "always":
                await self._flush_wanted.wait()
                self._flush_wanted = trio.Event()
            elif self.config.fsync == "interval":
                await trio.sleep(self.config.fsync_interval)
            else:
                await trio.sleep_forever()
            if self.log.appended_seq > self.log.durable_seq and await self._sync_round():
                self._durable.fire()   # the reaper already woke the first waiters (or everyone)
            else:
                await self._round_done()

    async def _sync_round(self) -> bool:
        """One group-commit round. Through kernel AIO the reaper ends it (`_end_round`) the moment
        the kernel answers, and wakes the ``first`` waiters then (all waiters when there are none):
        a scheduling batch sooner than this task could, and every durable answer and auto-commit
        frame waits for that. Returns True then; False when this task ended the round.

        The fsync is waited for inline (`AioSync`, "Inline") unless a manual-commit watcher of this
        queue has a free slot: then a put arriving during it is a frame to write at once, which an
        inline round would hold up (put -> receive p50 at 2,400 puts/s lower in 7 of 8 A/B pairs,
        median 0.61 -> 0.51 ms). An auto-commit frame waits for a round anyway."""
        # let requests that are already runnable append first, so this round covers them too
        await trio.lowlevel.checkpoint()
        while self._in_round:   # a waiter's own round (`_round_now`): one round at a time
            await self._round_ended.wait()
        ticket = self._begin(here=self._kernel_takes_fd())
        self._in_round = True   # until the round ends, no waiter runs one of its own (`_may_round_here`)
        try:
            aio = self._aio
            if aio is not None and aio.serving and ticket.plain_files:
                await aio.fsync(ticket.fds, on_done=lambda error: self._end_round(ticket, error, wake=True),
                                inline=not self._sends_on_append())
                return True
            failure: OSError | None = None
            try:
                if self._pool is not None:
                    await self._pool.run(ticket.run)
                else:
                    await trio.to_thread.run_sync(ticket.run)
            except OSError as exc:
                failure = exc
            self._end_round(ticket, failure)
            return False
        finally:
            self._in_round = False
            self._round_ended.fire()

    def _end_round(self, ticket: storage.SyncTicket, failure: BaseException | None, *, wake: bool = False) -> None:
        if wake:   # an AIO round: ``failure`` is the fsyncs' outcome, not yet on the ticket
            ticket.complete(failure)
        try:
            self.log.sync_end(ticket)   # after a failed fsync this rolls back and raises
        except storage.StorageError as exc:
            failure = exc
        began, durable_before = self._round_began
        self.round_seconds.observe(time.perf_counter() - began)
        if failure is None:   # a rolled-back round made nothing durable (its writes are undone)
            self.round_writes += max(0, self.log.durable_seq - durable_before)
        self._observe()
        if failure is not None:
            log.error("queue %s: fsync failed, unsynced writes rolled back: %s", self.ref.name, failure)
        if wake:
            self._durable_first.fire()
            if not self._first_waiting:
                self._durable.fire()

    def close_log(self) -> None:
        """Sync and close the log, and wake every durability waiter (blocking; at shutdown, once)."""
        self.closed = True
        self.log.close()
        self._durable_first.fire()
        self._durable.fire()
