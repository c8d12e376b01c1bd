"""The trio side of one queue: its log, its consumer groups, group commit and wake-ups.

Strategy: `storage.QueueLog` and `groups.Dispatcher` are synchronous and owned by the event-loop
thread; this module adds the three things that need trio. (1) Group commit: one flusher task per
queue fsyncs through kernel AIO (`server.aio.AioSync`) or a worker thread of the manager's `SyncPool`
(`log.sync_begin()` / the ticket's fsyncs / `log.sync_end()`; through AIO the reaper ends the
round) while other tasks keep appending, so every write made during one fsync shares the next one;
a request that must be durable awaits `wait_durable(seq)`. (2) Wake-ups: `notify` tells the watch service of
every change that can make an entry deliverable, and a put wakes the long-polling gets it may
answer (`GetWaiters`). (3) The registry of queues (`QueueManager`), opening a queue directory on
first use in a worker thread, fencing one on disk that cannot be opened (`backends.local.fence`: its requests get
a 503 naming the cause, the other queues serve on, a later request retries) and closing them all
(sync + close) at shutdown.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
import logging
import shlex
import urllib.parse
from pathlib import Path
from typing import Iterator, Mapping

import trio

from qserve import storage

from qserve.server.aio import AioSync
from qserve.backends.local.fence import Fence, Fences, fence_reason
from qserve.backends.local.get_waiters import GetWaiters
from qserve.server.syncpool import SyncPool
from qserve.config import Config, ConfigError
from qserve.core.errors import InsufficientStorage, NotFound, QServeError, QueueFenced, Unavailable
from qserve.core.events import QueueRef
from qserve.core.tags import FilterIndexes
from qserve.core.groups import Dispatcher

__all__ = ["Signal", "Queue", "QueueManager", "queue_dir"]

#: called after every change of a queue: (the queue, its one new entry or None for anything else)
OnChange = Callable[["Queue", "storage.Entry | None"], None]

log = logging.getLogger("qserve")

_EPOCHS_KEPT = 64   # rollback epochs whose durable point `Queue` remembers (see `Queue._observe`)


class Signal:
    """A level-less broadcast: `wait()` returns at the next `fire()`. Task-safe within one trio run."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class LogSource:
    """What `groups.Dispatcher` needs of a queue, read from the storage log."""

    def __init__(self, qlog: storage.QueueLog) -> None:
        self._log = qlog

    def iter_dispatch(self, start: int = 0) -> Iterator[tuple[int, int]]:
        return self._log.iter_dispatch(start)

    def tags_of(self, index: int) -> Mapping[str, str] | None:
        entry = self._log.read(index)
        return None if entry is None else entry.tags

    def tags_many(self, indexes: list[int]) -> list[Mapping[str, str] | None]:
        """`tags_of` for many entries at once (one read per run of back-to-back records)."""
        return [None if e is None else e.tags for e in self._log.read_many(indexes)]

    def __contains__(self, index: int) -> bool:
        return index in self._log

    def dispatch_rank(self, index: int) -> int | None:
        return self._log.dispatch_rank(index)

    @property
    def next_index(self) -> int:
        return self._log.next_index


class Queue:
    """One open queue. Not thread-safe: used from the trio thread only."""

    def __init__(self, ref: QueueRef, qlog: storage.QueueLog, config: Config, pool: SyncPool | None = None,
                 aio: AioSync | None = None, *, on_change: OnChange | None = None) -> None:
        self.ref = ref
        self._on_change = on_change      # the watch service's wake-up: (queue, new entry or None) -> None
        self._pool = pool
        self._aio = aio
        self.log = qlog
        self.config = config
        self.source = LogSource(qlog)
        self.filters = FilterIndexes()   # tag filters of watchers and gets: each entry classified once
        self.dispatcher = Dispatcher(self.source, now=trio.current_time, filters=self.filters)
        self.gets = GetWaiters()         # long-polling gets, woken by the puts that may answer them
        self._durable = Signal()         # fired after each fsync round
        self._durable_first = Signal()   # fired just before it (`wait_durable(first=True)`)
        self._first_waiting = 0
        self._flush_wanted = trio.Event()
        # epoch = the log's rollback count; epoch -> highest durable_seq seen during that epoch
        self._durable_in: dict[int, int] = {}
        self._epoch = qlog.rollbacks
        self.closed = False

    def notify(self, entry: storage.Entry | None = None) -> None:
        """Something changed: wake the watchers that may now get an entry, and for a put (`entry` is
        its one new entry; None means anything else may have changed) the gets it may answer."""
        if entry is not None:
            self.gets.put(entry)
        if self._on_change is not None:
            self._on_change(self, entry)

    @property
    def ended(self) -> bool:
        return self.log.state.get("state") == "End"

    # -- durability ---------------------------------------------------------------------------
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
            self.notify()
        if self._durable_in.get(epoch, -1) < durable:
            self._durable_in[epoch] = durable
            while len(self._durable_in) > _EPOCHS_KEPT:
                del self._durable_in[next(iter(self._durable_in))]
        return epoch

    def write_mark(self) -> tuple[int, int]:
        """A token for "everything written so far", to pass to `wait_durable` later."""
        return self._observe(), self.log.appended_seq

    async def wait_durable(self, mark: tuple[int, int] | None = None, *, first: bool = False) -> None:
        """Return once everything written up to `mark` (default: now) is durable under the fsync
        policy; raise `Unavailable` if an fsync failed first and the write was rolled back.
        ``first``: resume ahead of the other waiters of the same round (an auto-commit watch's
        frames go out before the round's put answers, which are not what anybody waits on).

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
            self._flush_wanted.set()
            if first:
                self._first_waiting += 1
                try:
                    await self._durable_first.wait()
                finally:
                    self._first_waiting -= 1
            else:
                await self._durable.wait()

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
        frame waits for that. Returns True then; False when this task ended the round."""
        # let requests that are already runnable append first, so this round covers them too
        await trio.lowlevel.checkpoint()
        self._observe()
        ticket = self.log.sync_begin()
        aio = self._aio
        if aio is not None and aio.serving and ticket.plain_files:
            await aio.fsync(ticket.fds, on_done=lambda error: self._end_round(ticket, error, wake=True))
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

    def _end_round(self, ticket: storage.SyncTicket, failure: BaseException | None, *, wake: bool = False) -> None:
        if wake:   # an AIO round: ``failure`` is the fsyncs' outcome, not yet on the ticket
            ticket.complete(failure)
        try:
            self.log.sync_end(ticket)   # after a failed fsync this rolls back and raises
        except storage.StorageError as exc:
            failure = exc
        self._observe()
        if failure is not None:
            log.error("queue %s: fsync failed, unsynced writes rolled back: %s", self.ref.name, failure)
        if wake:
            self._durable_first.fire()
            if not self._first_waiting:
                self._durable.fire()

    async def housekeeping(self) -> None:
        """Compact the log a little at a time while the server runs."""
        while True:
            await trio.sleep(1.0)
            try:
                reclaimed = self.log.maybe_compact(budget_bytes=4 * 1024 * 1024)
            except storage.StorageError as exc:
                log.error("queue %s: compaction failed: %s", self.ref.name, exc)
                continue
            if reclaimed:
                log.debug("queue %s: compaction reclaimed %d bytes", self.ref.name, reclaimed)

    def close(self) -> None:
        """Sync and close the log (blocking; called at shutdown after the tasks stopped)."""
        if not self.closed:
            self.closed = True
            self.log.close()
            self._durable_first.fire()
            self._durable.fire()
            self.gets.wake_all()
            self.notify()


def queue_dir(data_dir: Path, ref: QueueRef) -> Path:
    """`<data>/<service, percent-encoded>/input` or `.../sink`."""
    return Path(data_dir) / urllib.parse.quote(ref.service, safe="") / ("sink" if ref.sink else "input")


class QueueManager:
    """Opens queues on first use (or the declared set at start), fences the ones on disk that
    cannot be opened (`backends.local.fence`), and owns their tasks. Used from the trio thread only."""

    def __init__(self, config: Config, nursery: trio.Nursery, *, fileio=None,
                 on_change: OnChange | None = None) -> None:
        self.config = config
        self._on_change = on_change                      # handed to every queue it opens
        self._fileio = fileio
        self._nursery = nursery
        self._queues: dict[QueueRef, Queue] = {}
        self._opening: dict[QueueRef, trio.Event] = {}   # one open attempt per queue at a time
        self.fences = Fences(config)                     # queues on disk that failed to open
        # How flushers fsync (started with the first queue): `config.fsync_backend`. The rounds of
        # an injected file layer (tests' fault injection) go through its own fsync in a thread
        # whatever the backend (`storage.SyncTicket.plain_files`).
        self._aio = AioSync.open() if config.fsync_backend != "threads" else None
        if config.fsync_backend == "aio" and self._aio is None:
            raise ConfigError("fsync_backend: aio, but kernel AIO cannot be used here (it needs Linux 4.18+ "
                              "on x86_64 or aarch64, and io_setup allowed)")
        self._pool = SyncPool() if self._aio is None else None
        self._sync_started = False
        self._log_config = storage.LogConfig(
            segment_bytes=config.segment_bytes,
            max_payload_bytes=config.max_payload_bytes,
            max_entries=config.max_length,
        )

    @property
    def fsync_mechanism(self) -> str:
        """How group-commit fsyncs run: "kernel AIO" or "threads" (for the start-up log line)."""
        return "kernel AIO" if self._aio is not None else "threads"

    def __iter__(self) -> Iterator[Queue]:
        return iter(list(self._queues.values()))

    def listing(self) -> list[tuple[QueueRef, Queue | Fence]]:
        """Every open or fenced queue, sorted by service, input before sink."""
        found: dict[QueueRef, Queue | Fence] = {**self.fences.by_ref, **self._queues}
        return sorted(found.items(), key=lambda item: (item[0].service, item[0].sink))

    def declared(self, service: str) -> bool:
        """Is `service` named by --queues or --root-service?"""
        return service in self.config.queues or service == self.config.root_service

    async def open_declared(self) -> None:
        """Open the declared queues (creating them) and every served queue already on disk, so
        each one's recovery report, or its fence, is logged at start. A queue that cannot be
        opened is fenced: it does not stop the server."""
        refs = [QueueRef(service, sink=sink) for service in self.config.queues for sink in (False, True)]
        if self.config.root_service:
            refs += [QueueRef(self.config.root_service), QueueRef(self.config.root_service, sink=True)]
        data = Path(self.config.data_dir)
        if data.is_dir():
            for svc_dir in sorted(data.iterdir()):
                service = urllib.parse.unquote(svc_dir.name)
                if self.config.queues and not self.declared(service):
                    continue   # on disk, but --queues does not serve it
                refs += [QueueRef(service, sink=kind == "sink") for kind in ("input", "sink")
                         if (svc_dir / kind).is_dir()]
        for ref in refs:
            with contextlib.suppress(QueueFenced):   # logged when the fence went up
                await self._acquire(ref, create=True)

    async def get(self, ref: QueueRef) -> Queue:
        """The open queue for `ref`, opening (and recovering) it on first use.

        Raises:
            NotFound: --queues does not name its service, or it does not exist and the server runs
                with --no-auto-create.
            QueueFenced: it is on disk but cannot be opened (see `backends.local.fence`).
            InsufficientStorage: creating it would pass --max-queues, or the disk is full.
            Unavailable: creating it failed.
        """
        return await self._acquire(ref, create=self.config.auto_create or self.declared(ref.service))

    async def open_required(self, ref: QueueRef) -> Queue:
        """Open (creating if missing) a queue the user named with --queues or --root-service, at
        start. A failure fences nothing and logs nothing: it raises `Unavailable` with the one-line
        reason (and for damage the repair command), for the server to refuse to start with."""
        return await self._acquire(ref, create=True, required=True)

    async def create(self, service: str) -> None:
        """Create a service's input and sink queues on purpose (the admin call); queues that exist
        are just opened. Raises like `get`, but never refuses for --no-auto-create."""
        for ref in (QueueRef(service), QueueRef(service, sink=True)):
            await self._acquire(ref, create=True)

    async def _acquire(self, ref: QueueRef, *, create: bool, required: bool = False) -> Queue:
        while True:
            queue = self._queues.get(ref)
            if queue is not None:
                return queue
            if self.config.queues and not self.declared(ref.service):
                raise NotFound(f"no queue named {ref.name}")
            pending = self._opening.get(ref)
            if pending is None:
                break
            await pending.wait()   # another request's attempt: take its outcome (a queue or a fence)
        self.fences.check(ref, trio.current_time())   # raises QueueFenced until a retry is due
        path = queue_dir(self.config.data_dir, ref)
        created = not path.exists()
        if created:
            self.fences.take_down(ref)   # its directory is gone: nothing left to fence
            if not create:
                raise NotFound(f"no queue named {ref.name} (the server runs with --no-auto-create; "
                               f"create it with: qserve stream create {shlex.quote(ref.service)})")
            if len(self._queues) + len(self._opening) >= self.config.max_queues:
                # a bound on directories, open files and memory; queues already on disk always open
                raise InsufficientStorage(
                    f"cannot create queue {ref.name}: the server holds its limit of {self.config.max_queues} queues")
        self._opening[ref] = done = trio.Event()
        try:
            try:
                if created:  # nothing to recover: opening is a few small file operations
                    qlog = storage.QueueLog.open(path, self._log_config, fileio=self._fileio)
                else:        # recovery scans the segments: keep the event loop free meanwhile
                    qlog = await trio.to_thread.run_sync(self._open_and_warm, path)
            except storage.StorageError as exc:
                raise self._refused(ref, path, exc, created, required) from exc
            if not self._sync_started:
                self._sync_started = True
                await self._nursery.start(self._aio.serve if self._aio is not None else self._pool.serve)
            queue = Queue(ref, qlog, self.config, self._pool, self._aio, on_change=self._on_change)
            self._queues[ref] = queue
            self.fences.take_down(ref)
            self._report_open(queue, created)
            await self._nursery.start(queue.flusher)
            self._nursery.start_soon(queue.housekeeping)
            return queue
        finally:
            del self._opening[ref]
            done.set()

    def _open_and_warm(self, path: Path) -> storage.QueueLog:
        """Open and recover a queue directory, and build its requestId table (worker thread)."""
        qlog = storage.QueueLog.open(path, self._log_config, fileio=self._fileio)
        qlog.warm()
        return qlog

    def _refused(self, ref: QueueRef, path: Path, exc: storage.StorageError, created: bool,
                 required: bool) -> QServeError:
        """The error for a queue that failed to open: one on disk is fenced, one being created is
        refused (a fence per bad name would be unbounded), one required at start is neither."""
        if required:
            return Unavailable(fence_reason(ref, path, exc, fenced=False))
        if not created:
            return self.fences.put_up(ref, path, exc, trio.current_time())
        log.error("queue %s: cannot create: %s", ref.name, exc)
        if isinstance(exc, storage.DiskFull):
            return InsufficientStorage(f"queue {ref.name} cannot be created: no space left on the server's disk")
        return Unavailable(f"queue {ref.name} cannot be created")

    def _report_open(self, queue: Queue, created: bool) -> None:
        """Log the open: `queue X created` once, when its directory is made; later opens report
        what recovery found."""
        rec = queue.log.recovery
        if created:
            log.info("queue %s created", queue.ref.name)
            return
        log.info("queue %s opened: %d entries, recovered in %.3fs", queue.ref.name, queue.log.length,
                 getattr(rec, "seconds", 0.0))
        if getattr(rec, "truncated_bytes", 0) or getattr(rec, "skipped", None):
            log.warning("queue %s: recovery dropped a torn tail of %d bytes, skipped %d records",
                        queue.ref.name, rec.truncated_bytes, len(rec.skipped or ()))

    def close_all(self) -> None:
        for queue in list(self._queues.values()):
            try:
                queue.close()
            except storage.StorageError as exc:
                log.error("queue %s: close failed: %s", queue.ref.name, exc)

    def statistics(self) -> dict:
        return {q.ref.name: q.log.statistics() for q in self._queues.values()}
