"""One local queue: the segment log, its consumer groups, and the backend seam's operations on them.

Strategy: `storage.QueueLog` and `groups.Dispatcher` are synchronous and owned by the event-loop
thread; `Queue` implements `backends.base.QueueBackend` on them. Every operation does its work on
the log and the dispatcher with no ``await`` before its last write (that is what makes each one
atomic here: no other task runs in between), then awaits durability through its group commit
(`commit.GroupCommit`, its base). Wake-ups: `notify` tells the server's ``on_change`` (the watch
service) of every change that can make an entry deliverable, and a put wakes the long-polling gets
it may answer (`GetWaiters`). The registry of queues is `manager.QueueManager`. Errors: every
async operation raises `qserve.core.errors` types only (`errors.raising_core_errors`).
"""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
import math
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Iterator

import trio
import trio.testing

from qserve import storage
from qserve.backends.base import OnChange, Taken
from qserve.backends.local.commit import GroupCommit, Signal
from qserve.backends.local.dedup import RecentPuts
from qserve.backends.local.source import LogSource
from qserve.backends.local.delays import KeptDelays
from qserve.backends.local.errors import as_core_error, core_error, raising_core_errors
from qserve.backends.faults import Faults
from qserve.backends.get_waiters import GetWaiters
from qserve.config import Config
from qserve.core.errors import Conflict
from qserve.core.events import ConsumerSpec, QueueRef
from qserve.core.group_policies import DeadLetter
from qserve.core.groups import Dispatcher
from qserve.core.policy import Policy
from qserve.core.routing import MAX_PRIORITY
from qserve.core.tags import FilterIndex, FilterIndexes
from qserve.server.aio import AioSync
from qserve.server.syncpool import SyncPool
from qserve.wire.names import HEADER_ATTRIBUTES

__all__ = ["Queue", "queue_dir", "REPLAY_KEY"]

log = logging.getLogger("qserve")


class Queue(GroupCommit):
    """One open local queue (`backends.base.QueueBackend`). Not thread-safe: the trio thread only."""

    def __init__(self, ref: QueueRef, qlog: storage.QueueLog, config: Config, pool: SyncPool | None = None,
                 aio: AioSync | None = None, *, on_change: OnChange | None = None,
                 dead_letters: Callable[["Queue", list[DeadLetter]], Awaitable[None]] | None = None,
                 recent: Iterable[tuple[str, int, int]] = (), wall_clock: Callable[[], float] = time.time,
                 clients: Callable[[], int | None] | None = None) -> None:
        super().__init__(ref, qlog, config, pool, aio, on_rollback=self.notify, clients=clients,
                         sends_on_append=lambda: self.dispatcher.sends_on_append())
        self._on_change = on_change      # the watch service's wake-up: (queue, new entry or None) -> woke one
        self.source = LogSource(qlog)
        self.filters = FilterIndexes()   # tag filters of watchers and gets: each entry classified once
        self._dead_letters = dead_letters   # the manager's move to the dead-letter queue
        self._wall_clock = wall_clock
        self.deduplicated = 0                # puts answered with an earlier entry's index (metrics)
        self.dead_lettered = 0               # entries moved (metrics)
        # a dead-letter queue dead-letters nothing (its entries would have nowhere to go)
        self.policy = Policy(delivery_timeout=config.policy_for(ref.service).delivery_timeout) if ref.dlq \
            else config.policy_for(ref.service)
        self.recent = RecentPuts(self.policy.dedup_window) if self.policy.dedup_window else None
        for rid, index, at_ms in recent:   # the window's puts as the segment files hold them (a reopen)
            self.recent.note(rid, index, at_ms)
        self.dispatcher = Dispatcher(self.source, now=trio.current_time, filters=self.filters, policy=self.policy)
        self.delays = KeptDelays(qlog, self.dispatcher, wall_clock)
        self.delays.restore(self.source)
        self._drop_cut_replays()
        self._policy_changed = Signal()  # a delivery or a delay may have moved the next wake-up earlier
        self.gets = GetWaiters()         # long-polling gets, woken by the puts that may answer them
        self.faults = Faults(log)        # what the upkeep's steps ("delays", "dead letters") said failing

    def notify(self, entry: storage.Entry | None = None) -> bool:
        """Something changed: wake the watchers that may now get an entry, and for a put (`entry` is
        its one new entry; None means anything else may have changed) the gets it may answer.
        True when a watcher was woken."""
        if entry is not None:
            self.gets.put(entry)
        return self._on_change is not None and bool(self._on_change(self, entry))

    @property
    def ended(self) -> bool:
        return self.log.state_value("state") == "End"

    def _forget(self, removed) -> None:
        """Entries left the queue: drop them from the groups and wake watchers whose slots freed."""
        if removed:
            self.dispatcher.removed(removed)
            self.notify()

    # -- entries ------------------------------------------------------------------------------
    @raising_core_errors
    async def put(self, data: bytes, tags: Mapping[str, str], priority: int) -> int:
        entry = self.append(data, tags, priority)
        await self.wait_durable(self.write_mark())
        return entry.index

    def append(self, data: bytes, tags: Mapping[str, str], priority: int, *, replay_of: int | None = None
               ) -> storage.Entry:
        """A put's synchronous step (no ``await``): the entry appended with the next index (the
        oldest truncated first with `Config.trim_oldest`), its requestId noted for the dedup
        window, watchers and gets woken. Not durable yet: `wait_durable` of the `write_mark` after.
        ``replay_of``: the entry is dead letter ``replay_of`` of the service's dead-letter queue,
        replayed: the state key ``replay:<replay_of>`` = its index is written right before it
        (`manager.QueueManager.replay`).

        Raises: `Conflict` when the queue has ended; storage's errors (the caller maps them)."""
        if self.ended:
            raise Conflict(f"queue {self.ref.name} has ended; no more puts")
        config, qlog = self.config, self.log
        if config.trim_oldest and len(data) <= config.max_payload_bytes:
            while qlog.length >= config.max_length:   # room for one more: truncate the oldest
                below = qlog.first_index + 1
                qlog.truncate(below)
                self._forget(range(1, below))
        if replay_of is None:
            entry = qlog.append(data, tags, priority)
        else:
            key = f"{REPLAY_KEY}{replay_of}"
            qlog.set_state(**{key: str(qlog.next_index)})
            try:
                entry = qlog.append(data, tags, priority)
            except storage.StorageError:
                qlog.set_state(**{key: ""})   # refused or not written: its index is the next put's
                raise
        if self.recent is not None and "requestId" in tags:
            self.recent.note(tags["requestId"], entry.index, entry.timestamp_ms)
        self.notify(entry)
        return entry

    def replayed(self) -> dict[int, int]:
        """The replays recorded in this queue's state: dead letter index -> the index it got here."""
        found = {}
        for key, value in self.log.state.items():
            if key.startswith(REPLAY_KEY) and key[len(REPLAY_KEY):].isdigit() and value.isdigit():
                found[int(key[len(REPLAY_KEY):])] = int(value)
        return found

    @raising_core_errors
    async def put_unique(self, data: bytes, tags: Mapping[str, str], priority: int) -> tuple[int, bool]:
        recent = self.recent
        if recent is None:
            return await self.put(data, tags, priority), False
        rid = tags["requestId"]
        found = recent.find(rid, int(self._wall_clock() * 1000))
        if found is not None:
            self.deduplicated += 1
            await self.wait_durable()   # the original may be in this very fsync round
            return found, True
        index = await self.put(data, tags, priority)
        return index, False

    @raising_core_errors
    async def next_index(self) -> int:
        return self.log.next_index

    @raising_core_errors
    async def read(self, start: int, tags: Mapping[str, str], limit: int, *,
                   delete: bool = False) -> list[storage.Entry]:
        entries = self._matching(start, tags, limit)
        if delete and entries:
            self._forget(self.log.delete([e.index for e in entries]))
            await self.wait_durable()
        return entries

    def _matching(self, start: int, tags: Mapping[str, str], limit: int) -> list[storage.Entry]:
        tags = dict(tags)
        request_id = tags.pop("requestId", None)
        if request_id is not None:
            entry = self.log.find_request_id(request_id)
            if entry is None or entry.index < start or any(entry.tags.get(k) != v for k, v in tags.items()):
                return []
            return [entry]
        if not tags:
            return list(self.log.scan(start, None, limit))
        out: list[storage.Entry] = []
        with self._filter(tags) as fi:
            for index in fi.iter_index_order(start, self.source):
                entry = self.log.read(index)
                if entry is not None:
                    out.append(entry)
                    if len(out) >= limit:
                        break
        return out

    @contextlib.contextmanager
    def _filter(self, tags: dict[str, str]) -> Iterator[FilterIndex]:
        """The queue's index of entries matching ``tags``, brought up to date, for one request."""
        fi = self.filters.acquire(tuple(sorted(tags.items())))
        try:
            fi.refresh(self.source)
            yield fi
        finally:
            self.filters.release(fi)

    def put_waiter(self, start: int, tags: Mapping[str, str]) -> contextlib.AbstractContextManager[trio.Event]:
        return self.gets.waiting(start, tags)

    def tags_of(self, entry: storage.Entry) -> Mapping[str, str]:
        notes = self.dispatcher.annotations(entry.index)
        return {**entry.tags, **notes} if notes else entry.tags

    @raising_core_errors
    async def delete(self, indexes: Sequence[int]) -> None:
        self._forget(self.log.delete(indexes))
        await self.wait_durable()

    @raising_core_errors
    async def truncate(self, below: int) -> None:
        if self.log.truncate(below):
            self._forget(range(1, below))   # cost bounded by the dispatcher's state, not the range
        await self.wait_durable()

    @raising_core_errors
    async def end(self, force: bool) -> None:
        self.log.set_state(state="End")
        if force:
            pending = set()
            for cid in self.dispatcher.consumers():
                pending |= self.dispatcher.pending_of(cid)
            undelivered = [i for i, _ in self.log.iter_dispatch(0) if i not in pending]
            self._forget(self.log.delete(undelivered))
        self.notify()
        await self.wait_durable()

    @raising_core_errors
    async def count(self, priority: int | None, tags: Mapping[str, str]) -> int:
        if priority is None and not tags:
            return self.log.length
        if not tags:
            return self.log.count(priority)
        with self._filter(dict(tags)) as fi:
            return sum(1 for _ in fi.iter_index_order(0, self.source, priority))

    @raising_core_errors
    async def attributes(self) -> dict[str, str]:
        qlog, config = self.log, self.config
        attrs = {
            "queue.state": "open",   # "fenced" for a queue that failed to open (fence.fenced_attributes)
            "meta.name": self.ref.name,
            "meta.state": "End" if self.ended else "Normal",
            "meta.backend": "qserve-segment-log",
            "meta.maxPayloadBytes": str(config.max_payload_bytes),
            "stream.maxPayloadBytes": str(config.max_payload_bytes),
            **HEADER_ATTRIBUTES,
            "meta.maxPriority": str(MAX_PRIORITY),
            "stream.length": str(qlog.length),
            "stream.approxMaxLength": str(config.max_length),
            "stream.firstEntry": str(qlog.first_index),
            "stream.lastEntry": str(qlog.last_index),
        }
        attrs.update(self.policy.attributes())
        attrs["policy.delayed"] = str(self.dispatcher.delayed())
        attrs.update(self.dispatcher.attributes())
        return attrs

    @raising_core_errors
    async def search(self, index: int) -> dict[str, bool | int] | None:
        return self.dispatcher.search(index)

    # -- consumer groups ----------------------------------------------------------------------
    @raising_core_errors
    async def attach(self, spec: ConsumerSpec) -> None:
        self.dispatcher.attach(spec)   # a replaced consumer's entries go back (and may be delayed)
        self.delays.keep()
        self.notify()

    @raising_core_errors
    async def release(self, consumer_id: str, unwritten: Collection[int] = ()) -> None:
        self.dispatcher.detach(consumer_id, unwritten)
        self.delays.keep()
        await self._dead_letter()
        self.notify()

    def wants(self) -> list[str]:
        return self.dispatcher.wants()

    @raising_core_errors
    async def deliver(self, consumer_id: str) -> list[storage.Entry]:
        while True:
            indexes = self.dispatcher.poll(consumer_id)
            if not indexes:
                return []
            if self.policy.delivery_timeout:
                self._policy_changed.fire()
            entries = self._read(indexes)
            if entries:
                return entries
            # all of them were gone: their slots are free again, poll once more

    def read_ahead(self, consumer_id: str) -> Awaitable[list[storage.Entry]] | None:
        """The queue's only consumer, a manual-commit watch, has a full window: the entries its
        next window will hold, read once no round is in flight and every other task waits, for
        the commit that frees it (`storage.QueueLog.read_ahead`); None, at once, otherwise. With
        several consumers the loop is seldom idle for long and each would read the same entries
        (four consumers lost ~20% with it, 5 of 6 pairs). A failed read gives []: the delivery's
        own read reports it."""
        d = self.dispatcher
        return self._read_ahead(consumer_id) if d.alone(consumer_id) and d.full(consumer_id) else None

    async def _read_ahead(self, consumer_id: str) -> list[storage.Entry]:
        await self.round_over()
        await trio.testing.wait_all_tasks_blocked()   # trio's one public "the loop is idle" wait
        try:
            return self.log.read_ahead(self.dispatcher.upcoming(consumer_id))
        except storage.StorageError:
            return []

    async def take(self, consumer_id: str) -> Taken | None:
        return self.take_now(consumer_id)   # raises core errors itself

    def take_now(self, consumer_id: str) -> Taken | None:
        """`take` without an ``await``: in a put's own step, so that one round covers the put and
        the delete (`server.watch.Session.pretake`). Raises `qserve.core.errors` types."""
        try:
            indexes = self.dispatcher.poll(consumer_id)
            entries = self._read(indexes) if indexes else []
            if entries:
                self.dispatcher.removed(self.log.delete([e.index for e in entries]))
        except storage.StorageError as exc:
            raise as_core_error(self, "take", exc) from exc
        return (self.write_mark(), entries, indexes) if indexes else None

    def _read(self, indexes: list[int]) -> list[storage.Entry]:
        """The entries of `indexes` still stored; the dispatcher forgets the others."""
        entries, gone = [], []
        for index, entry in zip(indexes, self.log.read_many(indexes)):
            if entry is None:
                gone.append(index)
            else:
                entries.append(entry)
        if gone:
            self.dispatcher.removed(gone)
        return entries

    def sent(self, consumer_id: str, indexes: Iterable[int]) -> None:
        self.dispatcher.sent(consumer_id, indexes)
        self.notify()

    @raising_core_errors
    async def commit(self, indexes: Sequence[int], holder: tuple[str, str] | None = None) -> None:
        if holder is not None and self.policy.delivery_timeout:
            indexes = self.dispatcher.may_commit(indexes, *holder)
        self.log.delete(indexes)
        self.dispatcher.commit(indexes)
        woke = self.notify()  # window slots freed
        await self.wait_durable(overlap=woke)   # a woken watcher's frames go out during the fsync

    @raising_core_errors
    async def negative(self, indexes: Sequence[int], code: str, reason: str, delay: float | None = None,
                       group: str | None = None) -> None:
        self.dispatcher.negative(indexes, code, reason, group=group, delay=delay)
        self._policy_changed.fire()
        delayed = self.delays.keep()
        await self._dead_letter()
        self.notify()
        if delayed:   # the answer says the delay holds, a restart included
            await self.wait_durable()

    # -- delivery policies ----------------------------------------------------------------------
    async def policy_upkeep(self) -> None:
        """Run by the manager for a queue with a policy: at each consumer lease's deadline
        (``delivery_timeout``) hand its entry back, and at each delay's due time wake the
        watchers; woken early by a delivery or a negative commit. A delay that was due when the
        watchers were last woken is not waited for again (its group may not poll for a while)."""
        woken = -math.inf
        retry = math.inf   # after a round the disk refused: when to try again
        while True:
            wake = self.dispatcher.next_wakeup(after=woken)
            with trio.move_on_at(min(wake if wake is not None else math.inf, retry)):
                await self._policy_changed.wait()
            if self.dispatcher.expire():
                await self._dead_letter()
            try:
                self.delays.keep()
                self.delays.forget()
            except storage.StorageError as exc:   # kept for the next round; the server goes on
                self.faults.failed("delays", f"queue {self.ref.name}: cannot record its delays: "
                                             f"{core_error(exc).reason}")
                retry = trio.current_time() + UPKEEP_RETRY
            else:
                self.faults.ok("delays", f"queue {self.ref.name}: delays work again")
                retry = math.inf
            woken = trio.current_time()
            self.notify()

    def _drop_cut_replays(self) -> None:
        """At open, before any put: drop the replay markers whose entry is not in the log (a crash
        cut the replay between its marker and its entry: `manager.QueueManager.replay`)."""
        cut = {f"{REPLAY_KEY}{d}": "" for d, index in self.replayed().items() if index >= self.log.next_index}
        if cut:
            self.log.set_state(**cut)

    async def _dead_letter(self) -> None:
        """Move the entries the dispatcher dead-lettered (``max_deliveries``) to the dead-letter queue."""
        letters = self.dispatcher.dead_letters()
        if letters and self._dead_letters is not None:
            await self._dead_letters(self, letters)

    # -- upkeep -------------------------------------------------------------------------------
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
            self.close_log()
            self.gets.wake_all()
            self.notify()


UPKEEP_RETRY = 1.0   # seconds before the upkeep retries a step the disk refused
REPLAY_KEY = "replay:"   # ... of a replayed dead letter: replay:<dlq index> = <index here> (`manager`)


def queue_dir(data_dir: Path, ref: QueueRef) -> Path:
    """`<data>/<service, percent-encoded>/input` or `.../sink`."""
    return Path(data_dir) / urllib.parse.quote(ref.service, safe="") / ref.kind
