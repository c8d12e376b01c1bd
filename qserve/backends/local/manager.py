"""The local backend's registry of queues (`backends.base.Backend`): queue directories under the data directory.

Strategy: a queue is opened on first use (recovery in a worker thread, so the event loop stays
free), or at start for the declared ones and every one already on disk. A directory that cannot be
opened is fenced (`backends.local.fence`: its requests get a 503 naming the cause, the other
queues serve on, a later request retries); creating one is refused instead. The manager starts the
group-commit machinery (kernel AIO or a `SyncPool`, `Config.fsync_backend`) with the first queue,
runs each queue's flusher and housekeeping in the server's queue nursery, and syncs and closes
them all at shutdown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shlex
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from qserve import storage

from qserve.backends.base import OnChange, QueueStatus, Replayed
from qserve.backends.local.dedup import recent_from_disk
from qserve.backends.local.errors import core_error
from qserve.backends.local.fence import Fences, fence_reason
from qserve.backends.local.queues import REPLAY_KEY, Queue, queue_dir
from qserve.config import Config, ConfigError
from qserve.core.errors import (Conflict, InsufficientStorage, NotFound, QServeError, QueueFenced, QueueFull,
                                Unavailable)
from qserve.core.events import QueueRef
from qserve.core.group_policies import DeadLetter
from qserve.core.policy import Letter, dead_letter_tags, replay_letter
from qserve.server.aio import AioSync
from qserve.server.syncpool import SyncPool

__all__ = ["QueueManager"]

log = logging.getLogger("qserve")


class QueueManager:
    """Opens queues on first use (or the declared set at start), fences the ones on disk that
    cannot be opened (`backends.local.fence`), and owns their tasks. Used from the trio thread only."""

    def __init__(self, config: Config, nursery: trio.Nursery, *, fileio=None,
                 on_change: OnChange | None = None, wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._wall_clock = wall_clock                    # each entry's timestamp (`storage.QueueLog`)
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
        if self._aio is not None:
            self._aio.poll = config.fsync_poll
        if config.fsync_backend == "aio" and self._aio is None:
            raise ConfigError("fsync_backend: aio, but kernel AIO cannot be used here (it needs Linux 4.18+ "
                              "on x86_64 or aarch64, and io_setup allowed)")
        self._pool = SyncPool() if self._aio is None else None
        self._sync_started = False
        # () -> the client connections open: the server sets it once it serves; with one, a durable
        # write fsyncs in its own task (`commit.GroupCommit._may_round_here`), and with two (a
        # consumer's watch and its commits) a commit starts its own round (`_may_round_now`)
        self.clients: Callable[[], int] | None = None
        self._log_config = storage.LogConfig(
            segment_bytes=config.segment_bytes,
            max_payload_bytes=config.max_payload_bytes,
            max_entries=config.max_length,
        )

    def _clients(self) -> int | None:
        hint = self.clients
        return None if hint is None else hint()

    @property
    def fsync_mechanism(self) -> str:
        """How group-commit fsyncs run: "kernel AIO" or "threads" (for the start-up log line)."""
        return "kernel AIO" if self._aio is not None else "threads"

    async def listing(self) -> list[QueueStatus]:
        """Every open or fenced queue, sorted by service, input before sink."""
        found: list[QueueStatus] = [QueueStatus(ref, fenced=fence.reason) for ref, fence in self.fences.by_ref.items()
                                    if ref not in self._queues]
        for ref, queue in self._queues.items():
            qlog, groups = queue.log, queue.dispatcher.statistics()
            found.append(QueueStatus(ref, length=qlog.length, first_index=qlog.first_index,
                                     last_index=qlog.last_index, consumers=groups["consumers"],
                                     groups=groups["groups"]))
        return sorted(found, key=lambda status: status.ref.order)

    def wake_long_polls(self) -> None:
        """The server is draining: every long-polling get answers now."""
        for queue in self._queues.values():
            queue.gets.wake_all()

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
                refs += [QueueRef.of_kind(service, kind) for kind in ("input", "sink", "dlq")
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
            window = 0.0 if ref.dlq else self.config.policy_for(ref.service).dedup_window
            log_config = dataclasses.replace(self._log_config, retain_seconds=window) if window else self._log_config
            recent: list[tuple[str, int, int]] = []
            try:
                if created:  # nothing to recover: opening is a few small file operations
                    qlog = storage.QueueLog.open(path, log_config, fileio=self._fileio, now=self._wall_clock)
                else:        # recovery scans the segments: keep the event loop free meanwhile
                    qlog, recent = await trio.to_thread.run_sync(self._open_and_warm, path, log_config, window)
            except storage.StorageError as exc:
                raise self._refused(ref, path, exc, created, required) from exc
            if not self._sync_started:
                self._sync_started = True
                await self._nursery.start(self._aio.serve if self._aio is not None else self._pool.serve)
            queue = Queue(ref, qlog, self.config, self._pool, self._aio, on_change=self._on_change,
                          dead_letters=self._dead_letter, recent=recent, wall_clock=self._wall_clock,
                          clients=self._clients)
            self._queues[ref] = queue
            self.fences.take_down(ref)
            self._report_open(queue, created)
            await self._nursery.start(queue.flusher)
            self._nursery.start_soon(queue.housekeeping)
            self._nursery.start_soon(queue.policy_upkeep)
            if not ref.dlq and queue_dir(self.config.data_dir, QueueRef(ref.service, dlq=True)).is_dir():
                await self._settle_dead_letters(queue)
            return queue
        finally:
            del self._opening[ref]
            done.set()

    # -- dead letters (`core.policy`: max_deliveries) ------------------------------------------
    async def _dead_letter(self, source: Queue, letters: list[DeadLetter]) -> None:
        """Move entries of ``source`` to its service's dead-letter queue: append each one there
        (its tags plus where it came from and why), wait until that is durable, then delete it
        from ``source``. A crash in between leaves it in both; `_settle_dead_letters` deletes
        the source's copy when the queue opens again, so the move is atomic as recovery sees it.
        If the dead-letter queue cannot take them, they stay in ``source``, deliverable again."""
        ref = QueueRef(source.ref.service, dlq=True)
        moved: list[int] = []
        failure = None
        try:
            dlq = await self._acquire(ref, create=True)   # a service's queue has its dead-letter queue
            for letter in letters:
                try:
                    entry = source.log.read(letter.index)
                    if entry is None:
                        continue
                    tags = {**entry.tags, **dead_letter_tags(source.ref, letter, entry.tags)}
                    dlq_entry = dlq.log.append(entry.data, tags, entry.priority)
                except storage.StorageError as exc:   # the disk is full, say: the rest stay here
                    failure = core_error(exc).reason
                    break
                dlq.notify(dlq_entry)
                moved.append(letter.index)
            await dlq.wait_durable()
        except QServeError as exc:   # not opened, or the fsync failed (and rolled the appends back)
            failure, moved = exc.reason, []
        if failure is not None:
            source.faults.failed("dead letters", f"queue {source.ref.name}: cannot move entries to {ref.name}, "
                                                 f"they stay deliverable: {failure}")
            source.dispatcher.revive([letter.index for letter in letters if letter.index not in moved])
            source.notify()
        else:
            source.faults.ok("dead letters", f"queue {source.ref.name}: dead letters work again")
        if not moved:
            return
        try:
            source.dispatcher.removed(source.log.delete(moved))
        except storage.StorageError as exc:
            # they are in the dead-letter queue, durable; the copies here are deleted when the queue
            # opens next (`_settle_dead_letters`) and are not delivered meanwhile
            source.dispatcher.removed(moved)
            log.error("queue %s: %d entries moved to %s stay here until it reopens: %s", source.ref.name,
                      len(moved), ref.name, core_error(exc).reason)
            return
        source.dead_lettered += len(moved)
        log.info("queue %s: %d entr%s moved to %s after %d deliveries", source.ref.name, len(moved),
                 "y" if len(moved) == 1 else "ies", ref.name, max(letter.deliveries for letter in letters))
        try:
            await source.wait_durable()
        except QServeError as exc:   # the deletes rolled back: deliverable here too until it reopens
            log.error("queue %s: the move of %d entries to %s is durable there, not yet here: %s",
                      source.ref.name, len(moved), ref.name, exc.reason)

    async def _settle_dead_letters(self, source: Queue) -> None:
        """At open: delete from ``source`` every entry its dead-letter queue holds a copy of (a move
        a crash cut between its two writes)."""
        dlq = await self._acquire(QueueRef(source.ref.service, dlq=True), create=True)
        name = source.ref.name
        await self._settle_replays(source, dlq)
        copies = [int(e.tags["dlq.index"]) for e in dlq.log.scan()
                  if e.tags.get("dlq.queue") == name and str(e.tags.get("dlq.index", "")).isdigit()]
        doubled = [index for index in copies if index in source.source]
        if doubled:
            source.dispatcher.removed(source.log.delete(doubled))
            await source.wait_durable()
            log.warning("queue %s: %d entries moved to %s before a crash were still here; deleted",
                        name, len(doubled), dlq.ref.name)

    # -- replaying dead letters (`Backend.replay`) ---------------------------------------------
    async def replay(self, dlq: Queue, indexes: Sequence[int], now_ms: int) -> list[Replayed]:
        """Move dead letters of ``dlq`` back into their queues: two logs, so made safe against a
        crash with a marker in the origin's log state, ``replay:D`` = N (dead letter D is entry N
        here now). Three steps:

        1. per origin queue, in one synchronous step: for each dead letter D, the marker and then
           the entry N (its data, priority and tags, `replay_letter`; the dedup window re-keyed to
           N) are appended to the origin's log, and made durable;
        2. D is deleted from the dead-letter queue, made durable;
        3. the markers are removed (durable with the origin's next write).

        A replay of D that finds its marker (step 1 done, step 2 not: an error, or a concurrent
        replay) stores nothing: it answers N and does step 2. What a crash leaves, and what the
        origin's next open does about it (`_settle_replays`):

        - in step 1: nothing, or a marker without its entry (a torn tail cuts the later record
          first): N is not below the origin's next index as it opens, so the marker is dropped
          then, before any put can take N (`Queue.__init__`); D is still in the dead-letter queue
          and replays anew;
        - between steps 1 and 2: entry N, its marker and D: D is deleted, the marker dropped;
        - between steps 2 and 3: the marker alone: dropped.

        So a replayed entry is never in neither queue, and never stored twice by a replay. One
        double fault remains: a failed append whose undo of the marker fails too (the disk full
        twice over) leaves a marker naming the index the next put takes; a replay of D then
        answers that index and deletes D. Raises as `Backend.replay`."""
        letters = _letters(dlq, indexes, now_ms)
        origins = {letter.origin: await self._acquire(letter.origin, create=True) for letter, _ in letters}
        letters = _letters(dlq, indexes, now_ms)   # as they are now, with no await from here to the appends
        _check_room(origins, letters)
        done: list[Replayed] = []
        try:
            for letter, entry in letters:   # one synchronous step: no await before the last append
                done.append(self._replay_one(origins[letter.origin], letter, entry))
        except storage.StorageError as exc:
            raise core_error(exc) from exc
        finally:   # what was appended is made durable and its dead letter deleted, an error or not
            if done:
                await self._replay_finish(dlq, origins, done)
        return done

    def _replay_one(self, origin: Queue, letter: Letter, entry) -> Replayed:
        """Step 1 of `replay` for one dead letter (synchronous); its marker's answer if it has one."""
        index = origin.replayed().get(letter.index)
        if index is None:
            index = origin.append(entry.data, letter.tags, entry.priority, replay_of=letter.index).index
        return Replayed(letter.index, origin.ref, index, letter.request_id, entry.priority)

    async def _replay_finish(self, dlq: Queue, origins: dict[QueueRef, Queue], done: list[Replayed]) -> None:
        """Steps 2 and 3 of `replay`: once the origins' appends are durable, delete the dead
        letters, then drop their markers."""
        for origin in origins.values():
            await origin.wait_durable()
        dlq.dispatcher.removed(dlq.log.delete([r.dlq_index for r in done]))
        dlq.notify()
        await dlq.wait_durable()
        for origin in origins.values():
            keys = {f"{REPLAY_KEY}{r.dlq_index}": "" for r in done if r.queue == origin.ref}
            if keys:
                origin.log.set_state(**keys)

    async def _settle_replays(self, origin: Queue, dlq: Queue) -> None:
        """At open: finish the replays a crash cut between their steps 1 and 3 (see `replay`;
        the markers of a step 1 cut short were dropped as the queue opened: `Queue.__init__`)."""
        markers = origin.replayed()
        if not markers:
            return
        stored = [d for d in markers if d in dlq.source]
        if stored:
            dlq.dispatcher.removed(dlq.log.delete(stored))
            dlq.notify()
            await dlq.wait_durable()
            log.warning("queue %s: %d dead letters replayed here before a crash were still in %s; deleted there",
                        origin.ref.name, len(stored), dlq.ref.name)
        origin.log.set_state(**{f"{REPLAY_KEY}{d}": "" for d in markers})
        await origin.wait_durable()

    def _open_and_warm(self, path: Path, log_config: storage.LogConfig,
                       window: float) -> tuple[storage.QueueLog, list[tuple[str, int, int]]]:
        """Open and recover a queue directory, build its requestId table and, with a dedup
        ``window``, read the requestIds put within it from the segment files (worker thread)."""
        qlog = storage.QueueLog.open(path, log_config, fileio=self._fileio, now=self._wall_clock)
        qlog.warm()
        if not window:
            return qlog, []
        try:
            return qlog, list(recent_from_disk(path, window, self._wall_clock()))
        except OSError as exc:
            qlog.close()
            raise storage.StorageIOError(f"reading the dedup window's requestIds in {path}: {exc}") from None

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
        """Sync and close every open queue (at shutdown, after the queue tasks stopped)."""
        for queue in list(self._queues.values()):
            try:
                queue.close()
            except storage.StorageError as exc:
                log.error("queue %s: close failed: %s", queue.ref.name, exc)

    def statistics(self) -> dict:
        """Each open queue's log figures, by queue name."""
        return {q.ref.name: {**q.log.statistics(), **q.commit_figures(), "delayed": q.dispatcher.delayed(),
                             "dead_lettered": q.dead_lettered, "timed_out": q.dispatcher.timed_out}
                for q in self._queues.values()}


def _letters(dlq: Queue, indexes: Sequence[int], now_ms: int) -> list[tuple[Letter, storage.Entry]]:
    """The dead letters of a replay and their entries, each once, in the order given.

    Raises: NotFound naming every index ``dlq`` does not hold; BadRequest (`replay_letter`)."""
    letters, missing = [], []
    for index in dict.fromkeys(indexes):
        entry = dlq.log.read(index)
        if entry is None:
            missing.append(index)
        else:
            letters.append((replay_letter(dlq.ref, index, entry.tags, now_ms), entry))
    if missing:
        raise NotFound(f"not in the dead-letter queue {dlq.ref.name}: {' '.join(map(str, missing))}")
    return letters


def _check_room(origins: dict[QueueRef, Queue], letters: list[tuple[Letter, storage.Entry]]) -> None:
    """Refuse a replay its queues cannot take whole, before anything moved: an ended queue
    (`Conflict`), or one without room for its new entries (`QueueFull`, unless `trim_oldest`)."""
    for ref, origin in origins.items():
        if origin.ended:
            raise Conflict(f"queue {ref.name} has ended; no more puts (nothing replayed)")
        replayed = origin.replayed()
        new = sum(1 for letter, _ in letters if letter.origin == ref and letter.index not in replayed)
        config = origin.config
        if not config.trim_oldest and new and origin.log.length + new > config.max_length:
            raise QueueFull(f"queue {ref.name} has no room for {new} more entries ({config.max_length} at most; "
                            "nothing replayed)", headers=[("Retry-After", "1")])
