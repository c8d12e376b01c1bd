"""Consumer groups of one queue: which watcher gets which entry, window-limited (sans-I/O).

Strategy: a `Dispatcher` is a plain synchronous object over a *source* (the queue's live
entries, duck-typed as `DispatchSource`; the storage log in the server, a small in-memory class
in tests). It keeps only dispatch state: per group, which consumer holds which entry
(`core.group_state.Group.owner`); per consumer, its window slots; per nacked entry, the last code and
reason. It never reads payloads, never awaits and never touches a socket. The trio edge drives
it: after a put, commit or nack it wakes the consumers in `wants()`, each of which calls
`poll()` and sends what it gets; deletions it made on storage are reported with `removed()`.

How the edge uses it, per consumer mode:
- manual commit: ``poll()`` -> send frames; later an HTTP commit deletes on storage and calls
  ``commit()`` (which also counts as ``removed()``), or ``negative()`` hands entries back.
- auto-commit: ``poll()`` -> delete on storage -> ``removed()`` -> send frames -> ``sent()``.
  A slot is freed once an entry is both removed and sent, in either order (see
  `core.group_state`), so the window bounds frames in flight on the socket.

The per-entry state machine (AVAILABLE -> PENDING -> GONE, with NEGATIVE/DETACH back to
AVAILABLE), its transition table and its Rule 1 / Rule 2 live in `core.group_state`.

Costs: `poll()` walks `source.iter_dispatch()` from the consumer's start and skips entries
PENDING in its group, so it is O(pending in the group + entries returned), not O(queue length).
With a tag filter it walks that filter's own index of matching entries instead (`core.tags`:
each entry's tags are read once per distinct filter, when the first poll after its put comes),
so the same holds; entries that do not match are never passed over again. `search()` is
O(position of the entry in dispatch order). Everything kept is bounded: per consumer by its
window, per group by the sum of its members' windows, per-entry annotations by the live nacked
entries (dropped on removal, and swept against the source when they double in number).

Delivery policies (`core.policy`: dead letters, delays, the delivery timeout) are the
`core.group_policies.DeliveryPolicies` half of the dispatcher; their state stays empty when they are
off.

Not task-safe in the threading sense; it is meant to be used from the one trio thread, and no
method blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Protocol

from qserve.core.events import ConsumerSpec
from qserve.core.group_policies import DeliveryPolicies
from qserve.core.group_report import render_attributes, search_position
from qserve.core.group_state import Consumer, EntryEvent, EntryState, Group, Nack, step
from qserve.core.policy import Policy
from qserve.core.tags import FilterIndex, FilterIndexes, matches

__all__ = ["Dispatcher", "DispatchSource"]


class DispatchSource(Protocol):
    """What the dispatcher needs of a queue."""

    next_index: int  # index the next put will get

    def iter_dispatch(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """(index, priority) of live entries with index >= start: highest priority first,
        index order within a priority."""

    def tags_of(self, index: int) -> Mapping[str, str] | None:
        """The entry's tags, None if it is not live. May read disk."""

    def __contains__(self, index: int) -> bool:
        """Whether the entry is live."""

    def next_live(self, links, pos: int) -> int:
        """The first position >= ``pos`` that the skip links ``links`` do not jump over (the walk
        `core.tags` uses to step over deleted rows of a filter's runs)."""


class Dispatcher(DeliveryPolicies):
    """The consumer groups of one queue.

    Args:
        source: the queue's live entries (`DispatchSource`).
        now: the clock of the Idle figures and of the consumers' last activity, in seconds;
            injected, so that the core reads no clock itself (the server passes
            ``trio.current_time``, a test its own clock).
        filters: the queue's `core.tags.FilterIndexes`, when others use them too.
        policy: the queue's delivery policies (`core.policy`; default: none).
    """

    def __init__(self, source: DispatchSource, *, now: Callable[[], float],
                 filters: FilterIndexes | None = None, policy: Policy = Policy()) -> None:
        self._source = source
        self._now = now
        self._consumers: dict[str, Consumer] = {}   # attach order
        self._groups: dict[str, Group] = {}
        self._nacks: dict[int, Nack] = {}
        self._nacks_swept_at = 0                    # len(_nacks) after the last sweep
        self._delivered = 0
        self._filters = filters or FilterIndexes()  # matching entries per tag filter in use
        self._filter_of: dict[str, FilterIndex] = {}
        self._init_policies(policy)

    # -- membership -------------------------------------------------------------------------
    def attach(self, spec: ConsumerSpec) -> list[int]:
        """Attach a consumer; an attached one with the same id is replaced.

        Returns:
            The indexes the replaced consumer held, already given back to its group (empty if
            nothing was replaced). The edge closes the old socket.
        """
        released = self.detach(spec.id)
        group = self._groups.get(spec.group)
        if group is None:
            group = self._groups[spec.group] = Group(spec.group)
        start = self._source.next_index if spec.start == -1 else spec.start
        consumer = Consumer(spec, group, start, last_active=self._now())
        group.members[spec.id] = consumer
        self._consumers[spec.id] = consumer
        if spec.tags:
            self._filter_of[spec.id] = self._filters.acquire(spec.tags)
        return released

    def detach(self, consumer_id: str, unwritten: Collection[int] = ()) -> list[int]:
        """Detach a consumer (disconnect). Unknown ids are ignored.

        ``unwritten``: indexes handed to it whose frames never left (its socket died first). A
        delivery counts once its frame is written; it is counted when handed out (so that a
        negative commit answering the frame always finds it counted) and taken back here for
        these, so a frame that never left counts nothing towards ``max_deliveries`` or the backoff.

        Returns:
            The indexes it held, sorted; they are AVAILABLE to its group again at once.
        """
        consumer = self._consumers.pop(consumer_id, None)
        if consumer is None:
            return []
        if unwritten and self._counting:
            self._uncount(consumer, unwritten)
        fi = self._filter_of.pop(consumer_id, None)
        if fi is not None:
            self._filters.release(fi)
        group = consumer.group
        released = sorted(consumer.pending)
        for index in released:
            self._release(group, index, EntryEvent.DETACH)
            self._returned(group, index, None)
        del group.members[consumer_id]
        for index in [i for i, c in group.avoid.items() if c is consumer]:
            del group.avoid[index]
        if not group.members:  # nothing pending is left; the counters go with it
            del self._groups[group.name]
        return released

    def consumers(self) -> list[str]:
        """Attached consumer ids, in attach order."""
        return list(self._consumers)

    def pending_of(self, consumer_id: str) -> set[int]:
        """Indexes PENDING in the group and held by this consumer (a copy; empty if unknown).
        For an auto-commit consumer these are the ones handed out and not yet removed."""
        consumer = self._consumers.get(consumer_id)
        return set(consumer.pending) if consumer else set()

    def in_flight_of(self, consumer_id: str) -> set[int]:
        """Auto-commit: indexes handed out whose write the edge has not confirmed (a copy)."""
        consumer = self._consumers.get(consumer_id)
        return set(consumer.unsent) if consumer else set()

    def wants(self) -> list[str]:
        """Ids of consumers with free window slots, in attach order (the edge wakes these)."""
        return [cid for cid, c in self._consumers.items() if c.free > 0]

    def full(self, consumer_id: str) -> bool:
        """Whether an attached consumer's window is full."""
        consumer = self._consumers.get(consumer_id)
        return consumer is not None and consumer.free <= 0

    def alone(self, consumer_id: str) -> bool:
        """Whether this consumer is the only one attached (in any group)."""
        return len(self._consumers) == 1 and consumer_id in self._consumers

    def sends_on_append(self) -> bool:
        """Whether a manual-commit consumer has a free window slot: an entry appended now is a frame
        its edge writes at once (an auto-commit frame waits for the entry's delete to be durable)."""
        return any(c.free > 0 and not c.spec.auto_commit for c in self._consumers.values())

    # -- dispatch ---------------------------------------------------------------------------
    def poll(self, consumer_id: str, max_items: int | None = None) -> list[int]:
        """Hand entries to one consumer, up to its free window (and `max_items`).

        Entries come in dispatch order (priority, then index) from the consumer's start, skip
        those PENDING in its group and those its tag filter rejects. An entry this consumer
        nacked is left for another member that has a free slot and could take it; if there is
        none, this consumer gets it back.

        Returns:
            The indexes, now PENDING (and, for auto-commit, in flight) for this consumer; the
            edge sends them in this order. Empty for a consumer that is not attached.

        Raises:
            ValueError: `max_items` < 0.
        """
        if max_items is not None and max_items < 0:
            raise ValueError("max_items must be >= 0")
        consumer = self._consumers.get(consumer_id)
        if consumer is None:
            return []
        limit = consumer.free if max_items is None else min(consumer.free, max_items)
        if limit <= 0:
            return []
        chosen = self._choose(consumer_id, consumer, limit)
        for index in chosen:
            self._deliver(consumer, index)
        return chosen

    def upcoming(self, consumer_id: str) -> list[int]:
        """A consumer with a full window: the indexes `poll` would hand it if its whole window
        were free (as things stand: a commit or another consumer may change them); [] for a
        consumer with a free slot, which `poll` found nothing for, or one not attached."""
        consumer = self._consumers.get(consumer_id)
        if consumer is None or consumer.free > 0:
            return []
        return self._choose(consumer_id, consumer, consumer.spec.window)

    def _choose(self, consumer_id: str, consumer: Consumer, limit: int) -> list[int]:
        """The next at most ``limit`` indexes for ``consumer`` (of ``consumer_id``), by `poll`'s
        order and rules; hands out nothing."""
        group = consumer.group
        chosen: list[int] = []
        fi = self._filter_of.get(consumer_id)
        if fi is None:
            candidates = self._source.iter_dispatch(consumer.start)
        else:   # only entries matching the filter (each entry's tags are read once per filter)
            fi.refresh(self._source)
            candidates = fi.iter_dispatch(consumer.start, self._source)
        dead, delayed = self._dead, self._delayed
        now = self._now() if delayed else 0.0
        for index, _priority in candidates:
            if index in group.owner or index in dead:
                continue
            if delayed and index in delayed and not self._due(delayed, index, group.name, now):
                continue
            if group.avoid.get(index) is consumer and self._another_can_take(consumer, index):
                continue
            chosen.append(index)
            if len(chosen) >= limit:
                break
        return chosen

    def sent(self, consumer_id: str, indexes: Iterable[int]) -> None:
        """Auto-commit: the edge wrote these frames; their slots free once they are removed too.
        A no-op for manual-commit consumers, unknown ids and indexes not in flight."""
        consumer = self._consumers.get(consumer_id)
        if consumer is None:
            return
        for index in indexes:
            consumer.drop_unsent(index)

    # -- acknowledgement --------------------------------------------------------------------
    def commit(self, indexes: Iterable[int]) -> list[int]:
        """Entries were committed (the edge deleted them from the queue): as `removed()`, and the
        holders' Idle clocks restart. Idempotent.

        Returns:
            The indexes that were PENDING in some group, sorted.
        """
        wanted = _as_collection(indexes)
        now = self._now()
        hit: set[int] = set()
        for group in self._groups.values():
            for index in _common(wanted, group.owner):
                group.owner[index].last_active = now
                hit.add(index)
        self.removed(wanted)
        return sorted(hit)

    def negative(self, indexes: Iterable[int], code: str = "", reason: str = "", *,
                 group: str | None = None, delay: float | None = None) -> list[int]:
        """Negative commit: the entries go back to their group, to another member first.

        For each index PENDING somewhere (only in `group` when given: the nacking identity's
        group), the entry becomes AVAILABLE, its nack counter increments and `code`/`reason` are
        kept for `annotations()`. Indexes nobody holds are ignored, so a retried nack does not
        count twice. ``delay`` (seconds; None: the policy's backoff for the entry's deliveries)
        hides it from the group until due; after ``max_deliveries`` it is dead-lettered instead.

        Returns:
            The indexes that were PENDING (in any group concerned), sorted.
        """
        wanted = _as_collection(indexes)
        if group is None:
            groups = list(self._groups.values())
        else:
            groups = [self._groups[group]] if group in self._groups else []
        now = self._now()
        hit: set[int] = set()
        for grp in groups:
            for index in _common(wanted, grp.owner):
                holder = grp.owner[index]
                holder.last_active = now
                self._release(grp, index, EntryEvent.NEGATIVE)
                grp.avoid.pop(index, None)
                grp.avoid[index] = holder
                while len(grp.avoid) > grp.avoid_cap():
                    del grp.avoid[next(iter(grp.avoid))]
                if index not in hit:
                    self._annotate(index, code, reason)
                hit.add(index)
                self._returned(grp, index, delay)
        if len(self._nacks) > max(64, 2 * self._nacks_swept_at):
            self._sweep_nacks()
        return sorted(hit)

    def removed(self, indexes: Iterable[int]) -> None:
        """Entries are gone from the queue (commit, delete, truncate, auto-commit): GONE in every
        group, their slots freed (auto-commit: once also `sent()`), their annotations dropped.

        Cost is O(min(len(indexes), state kept)) when `indexes` supports fast membership, so a
        truncation can pass ``range(1, below)``.
        """
        wanted = _as_collection(indexes)
        for group in self._groups.values():
            for index in _common(wanted, group.owner):
                self._release(group, index, EntryEvent.REMOVE)
            for index in _common(wanted, group.avoid):
                del group.avoid[index]
        for index in _common(wanted, self._nacks):
            del self._nacks[index]
        for kept in (self._counts, self._delayed, self._dead):
            if kept:
                for index in _common(wanted, kept):
                    del kept[index]

    def _annotate(self, index: int, code: str, reason: str) -> None:
        nack = self._nacks.setdefault(index, Nack())
        nack.count += 1
        nack.code, nack.reason = code, reason

    # -- queries ----------------------------------------------------------------------------
    def annotations(self, index: int) -> dict[str, str]:
        """``{"lastCode": ..., "lastReason": ...}`` if the entry was ever nacked, else ``{}``.
        The edge adds these to the entry's tags when it sends or returns the entry."""
        nack = self._nacks.get(index)
        if nack is None:
            return {}
        return {"lastCode": nack.code, "lastReason": nack.reason}

    def nack_count(self, index: int) -> int:
        """How many negative commits the entry has had (its redelivery counter)."""
        nack = self._nacks.get(index)
        return nack.count if nack else 0

    def search(self, index: int) -> dict[str, bool | int] | None:
        """The queue position of one entry, for the ``_search_`` endpoint
        (`core.group_report.search_position`); None if the index is not live."""
        return search_position(self._source, self._groups.values(), index)

    def attributes(self) -> dict[str, str]:
        """The ``consumers.*`` and ``groups.*`` attribute keys (`core.group_report`)."""
        return render_attributes(self._consumers, self._groups, self._now())

    def statistics(self) -> dict[str, int]:
        """Counters for monitoring: consumers, groups, pending and in-flight entries, annotated
        (nacked, live) entries, nack hints kept, and deliveries since start."""
        return {
            "consumers": len(self._consumers),
            "groups": len(self._groups),
            "pending": sum(len(g.owner) for g in self._groups.values()),
            "in_flight": sum(len(c.unsent) for c in self._consumers.values()),
            "annotated": len(self._nacks),
            "avoid_hints": sum(len(g.avoid) for g in self._groups.values()),
            "delivered": self._delivered,
        }

    # -- internals: the only places that change `Group.owner` (Rule 1) ----------------------
    def _deliver(self, consumer: Consumer, index: int) -> None:
        group = consumer.group
        state = EntryState.PENDING if index in group.owner else EntryState.AVAILABLE
        step(state, EntryEvent.DELIVER)
        group.owner[index] = consumer
        group.avoid.pop(index, None)
        consumer.take(index)
        consumer.last_index = max(consumer.last_index, index)
        consumer.delivered += 1
        consumer.last_active = self._now()
        group.last_index = max(group.last_index, index)
        group.delivered += 1
        self._delivered += 1
        if self._counting:
            counts = self._counts.setdefault(index, {})
            counts[group.name] = counts.get(group.name, 0) + 1
        if self.policy.delivery_timeout:
            self._deadlines[(group.name, index)] = (consumer, consumer.last_active + self.policy.delivery_timeout)

    def _uncount(self, consumer: Consumer, unwritten: Collection[int]) -> None:
        """Take back the deliveries of the entries ``consumer`` still holds whose frames never left."""
        name = consumer.group.name
        for index in unwritten:
            if index not in consumer.pending:
                continue   # answered or given back meanwhile: its frame did leave, or it no longer matters
            counts = self._counts.get(index)
            if counts and counts.get(name, 0) > 0:
                counts[name] -= 1
                if not counts[name]:
                    del counts[name]
                    if not counts:
                        del self._counts[index]

    def _release(self, group: Group, index: int, event: EntryEvent) -> None:
        step(EntryState.PENDING, event)  # callers only release PENDING entries
        holder = group.owner.pop(index)
        holder.drop_pending(index)
        if self._deadlines:
            self._deadlines.pop((group.name, index), None)

    def _matches(self, consumer: Consumer, index: int) -> bool:
        return matches(self._source.tags_of(index), consumer.spec.tags)

    def _another_can_take(self, consumer: Consumer, index: int) -> bool:
        for other in consumer.group.members.values():
            if (other is not consumer and other.free > 0 and index >= other.start
                    and (not other.spec.tags or self._matches(other, index))):
                return True
        return False

    def _sweep_nacks(self) -> None:
        """Drop annotations of entries no longer live (deletions the edge did not report)."""
        for index in [i for i in self._nacks if i not in self._source]:
            del self._nacks[index]
        self._nacks_swept_at = len(self._nacks)


def _as_collection(indexes: Iterable[int]) -> Collection[int]:
    if isinstance(indexes, (range, set, frozenset)):
        return indexes
    return set(indexes)


def _common(wanted: Collection[int], kept: Mapping[int, object]) -> list[int]:
    """Indexes in both, iterating over the smaller side (a list: callers mutate `kept`)."""
    if len(wanted) <= len(kept):
        return [i for i in wanted if i in kept]
    return [i for i in kept if i in wanted]
