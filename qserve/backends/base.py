"""The backend seam: what the server needs of "a queue", whatever stores it.

Strategy: the server (`server.app`, `server.watch`, `server.admin`) speaks only these Protocols;
a backend implements them. `local` (`backends.local`: the segment log on this machine plus an
in-memory dispatcher) is the first. Everything that must be atomic across several stored things
(an append and its requestId, a read and its delete, a commit and the group's bookkeeping) is ONE
call here, so that a backend on a remote engine can make it one script. Calls that a remote engine
answers over the network are ``async``; the ones the watch's delivery path makes per poll stay few
(one `deliver` per batch, not one call per entry) and the ones made per change (`wants`, `sent`,
`tags_of`) are synchronous and answer from this node's memory.

Durability: every write's ``await`` returns once the write is durable under the server's fsync
policy (`Config.fsync`), or raises `Unavailable` when it could not be made durable and was undone.
Errors: `qserve.core.errors` types only (the local backend maps `qserve.storage`'s errors to them
itself: `backends.local.errors`); anything else is a bug, reported to the client as a 500.

Wake-ups: a backend calls the ``on_change(queue, entry)`` it was built with after every change that
can make an entry deliverable (``entry``: the one new entry of a put; None: anything else), and
wakes the long-polling gets a put may answer (`QueueBackend.put_waiter`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import trio

from qserve.core.events import ConsumerSpec, QueueRef

__all__ = ["Backend", "QueueBackend", "StoredEntry", "QueueStatus", "WriteMark", "OnChange", "Taken", "Replayed"]

#: a position in a queue's writes, for `QueueBackend.wait_durable` (opaque to the server)
WriteMark = tuple[int, int]


class StoredEntry(Protocol):
    """One entry as stored: its index (from 1, never reused), tags, payload and priority."""

    @property
    def index(self) -> int: ...
    @property
    def tags(self) -> Mapping[str, str]: ...
    @property
    def data(self) -> bytes: ...
    @property
    def priority(self) -> int: ...


#: `QueueBackend.take`'s batch: (the mark its delete is durable at, the entries still stored, every
#: index the consumer was handed, the gone ones included: `QueueBackend.sent` frees their slots)
Taken = tuple[WriteMark, list[StoredEntry], list[int]]


@dataclass(frozen=True)
class QueueStatus:
    """One queue of `Backend.listing`: its figures when open, the one-line reason when fenced."""

    ref: QueueRef
    fenced: str | None = None   # the reason, for a queue that cannot be opened
    length: int = 0
    first_index: int = 0
    last_index: int = 0
    consumers: int = 0
    groups: int = 0


@dataclass(frozen=True)
class Replayed:
    """One dead letter `Backend.replay` moved back: its index in the dead-letter queue, the queue
    it is in now (``S`` or ``S/sink``), its new index there, its requestId and its priority."""

    dlq_index: int
    queue: QueueRef
    index: int
    request_id: str
    priority: int


class QueueBackend(Protocol):
    """One open queue. Used from the trio thread of the server only."""

    @property
    def ref(self) -> QueueRef: ...

    # -- entries ------------------------------------------------------------------------------
    async def put(self, data: bytes, tags: Mapping[str, str], priority: int) -> int:
        """Append one entry (``tags`` complete: requestId and timestamps included) with the next
        index, atomically with its requestId mapping; with `Config.trim_oldest` the oldest entries
        are truncated to make room in the same step. Returns the index once durable; watchers and
        long-polling gets it may answer are woken first.

        Raises: `Conflict` when the queue has ended; `PayloadTooLarge` for a payload over the
        limit, `QueueFull` for a full queue, `InsufficientStorage` for a full disk; `Unavailable`
        when it was not made durable."""
        ...

    async def put_unique(self, data: bytes, tags: Mapping[str, str], priority: int) -> tuple[int, bool]:
        """`put` of an entry whose requestId the client chose: with the queue's ``dedup_window``,
        a requestId stored within the window is not stored again and its original index is
        answered (once durable) with True; otherwise as `put`, with False."""
        ...

    async def next_index(self) -> int:
        """The index the next put will get (a get's `_index_=-1`: entries from now on)."""
        ...

    async def read(self, start: int, tags: Mapping[str, str], limit: int, *,
                   delete: bool = False) -> list[StoredEntry]:
        """Up to ``limit`` live entries with index >= ``start`` whose tags include ``tags``, in
        index order; a ``requestId`` tag is answered by its one entry (O(1)). ``delete``: the
        entries returned are deleted in the same atomic step (durable when this returns), so two
        concurrent reads never return the same entry."""
        ...

    def put_waiter(self, start: int, tags: Mapping[str, str]) -> AbstractContextManager[trio.Event]:
        """While entered, an event set by a put that may answer a `read(start, tags)` (and by
        `Backend.wake_long_polls`). Entered right after a `read` that found nothing (no ``await``
        in between), it misses no put that read did not see."""
        ...

    def tags_of(self, entry: StoredEntry) -> Mapping[str, str]:
        """The tags a client sees for ``entry``: its own plus its group annotations (lastCode,
        lastReason, ... of a negative commit). From memory."""
        ...

    async def delete(self, indexes: Sequence[int]) -> None:
        """Delete these entries (unknown or deleted ones are ignored); durable on return."""
        ...

    async def truncate(self, below: int) -> None:
        """Delete every entry below index ``below``; durable on return. Indexes are never reused."""
        ...

    async def end(self, force: bool) -> None:
        """Mark the queue ended (puts get `Conflict` from then on); ``force`` also deletes every
        entry no consumer holds. One atomic step, durable on return."""
        ...

    async def count(self, priority: int | None, tags: Mapping[str, str]) -> int:
        """Live entries, only those of ``priority`` and carrying ``tags`` when given."""
        ...

    async def attributes(self) -> dict[str, str]:
        """Every attribute key of PROTOCOL.md section 7, values as strings."""
        ...

    async def search(self, index: int) -> dict[str, bool | int] | None:
        """Where entry ``index`` stands among the consumer groups (PROTOCOL.md), None if unknown."""
        ...

    # -- consumer groups ----------------------------------------------------------------------
    async def attach(self, spec: ConsumerSpec) -> None:
        """Subscribe a consumer (its group, window, start, tag filter, auto-commit); an attached
        consumer with the same id is replaced (its entries go back to the group first)."""
        ...

    async def release(self, consumer_id: str, unwritten: Collection[int] = ()) -> None:
        """The consumer is gone (disconnect, replacement, shutdown): its uncommitted entries go
        back to its group at once. ``unwritten``: those handed to it whose frames never left;
        their deliveries are not counted (`core.groups.Dispatcher.detach`). Must complete even
        when the caller is being cancelled."""
        ...

    def wants(self) -> list[str]:
        """Ids of the attached consumers with free window slots (whom a change may concern)."""
        ...

    async def deliver(self, consumer_id: str) -> list[StoredEntry]:
        """Manual commit: hand the consumer the next entries its window allows (they stay stored
        and pending until `commit`, `negative` or `release`); [] when there is nothing for it."""
        ...

    async def take(self, consumer_id: str) -> Taken | None:
        """Auto-commit: hand the consumer its next batch and delete it in the same atomic step;
        the frames may go out once `wait_durable` of the batch's mark returns. None when there is
        nothing for it."""
        ...

    def sent(self, consumer_id: str, indexes: Iterable[int]) -> None:
        """Auto-commit: the frames of a `take` are written; their window slots are free again."""
        ...

    async def commit(self, indexes: Sequence[int], holder: tuple[str, str] | None = None) -> None:
        """Entries were processed: delete them for every group; durable on return. ``holder``
        (group, consumer id) names who commits, when known: with ``delivery_timeout`` an entry
        another member of that group holds now is left alone (a late commit is harmless)."""
        ...

    async def negative(self, indexes: Sequence[int], code: str, reason: str, delay: float | None = None,
                       group: str | None = None) -> None:
        """Entries were refused by their consumer: deliver them to another member of the group,
        annotated with ``code`` and ``reason`` (`tags_of`); ``delay`` seconds later (None: the
        queue's ``retry_backoff``, if any), or to its dead-letter queue after ``max_deliveries``.
        ``group``: the refusing identity's group, the only one concerned (None: an anonymous
        caller; every group holding them gives them back)."""
        ...

    # -- durability ---------------------------------------------------------------------------
    async def wait_durable(self, mark: WriteMark, *, first: bool = False) -> None:
        """Return once everything written up to ``mark`` is durable; raise `Unavailable` if it
        was undone. ``first``: resume ahead of the other waiters of the same round."""
        ...


#: a backend's wake-up call: (the queue, its one new entry or None for any other change); returns
#: whether it woke a watcher (None: not known)
OnChange = Callable[[QueueBackend, "StoredEntry | None"], "bool | None"]


class Backend(Protocol):
    """The queues of one server: opened on first use, listed, closed. Trio thread only."""

    async def get(self, ref: QueueRef) -> QueueBackend:
        """The queue ``ref``, opened (and created when the server's settings allow) on first use.

        Raises: `NotFound` (not served, or missing with --no-auto-create), `QueueFenced` (it
        exists but cannot be opened), `InsufficientStorage` (over --max-queues, disk full),
        `Unavailable` (creating it failed)."""
        ...

    async def create(self, service: str) -> None:
        """Create a service's input and sink queues on purpose (existing ones are just opened)."""
        ...

    async def open_required(self, ref: QueueRef) -> QueueBackend:
        """Open (creating if missing) a queue the server must serve; raises `Unavailable` with a
        one-line reason, fencing nothing, when it cannot."""
        ...

    async def open_declared(self) -> None:
        """Open every queue the settings declare or the store already holds, so each one's
        recovery (or refusal) is logged at start; one that cannot open does not stop the server."""
        ...

    async def listing(self) -> list[QueueStatus]:
        """Every open or fenced queue, sorted by service, input before sink."""
        ...

    async def replay(self, dlq: QueueBackend, indexes: Sequence[int], now_ms: int) -> list[Replayed]:
        """Move these entries of a dead-letter queue back into their queues (``dlq.queue``: the
        service's input or sink, opened as `get` opens it): each one with its data, priority,
        requestId and own tags (`core.policy.replay_letter`, stamped ``now_ms``), under a new index,
        the queue's dedup window re-keyed to it; then deleted from ``dlq``. Durable on return. A
        dead letter is stored again at most once, even when a replay cut by a crash or an error is
        repeated (then the first one's `Replayed` is answered); in the order given.

        Raises: `NotFound` naming every index ``dlq`` does not hold, `BadRequest` for an entry that
        is not a dead letter of this service, both before anything moved; `Conflict` (its queue
        ended), `QueueFull`, as a put; `Unsupported` for what the backend cannot replay."""
        ...

    def wake_long_polls(self) -> None:
        """The server is draining: set every long-polling get's event (`QueueBackend.put_waiter`)."""
        ...

    def statistics(self) -> dict:
        """Per-queue figures for diagnostics."""
        ...

    def close_all(self) -> None:
        """Make everything durable and close (at shutdown, after the queue tasks stopped)."""
        ...
