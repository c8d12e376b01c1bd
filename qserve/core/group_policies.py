"""The delivery policies of a queue's consumer groups: `DeliveryPolicies`, the policy half of
`core.groups.Dispatcher`, and the `DeadLetter` it hands to the edge.

Delivery policies (`core.policy`, all off by default, so this state stays empty): with
``max_deliveries`` or ``retry_backoff`` each entry's deliveries are counted per group (kept while
the entry is live, also when its group has no member left, so a worker that crashes on an entry
and comes back still counts); an entry that comes back to its group (negative commit, consumer
gone, lease run out) after ``max_deliveries`` deliveries is handed to the edge as a `DeadLetter`
(`dead_letters()`) and delivered to nobody until the edge has moved it; a negative commit's delay
(``_delay_``, else the backoff for its count) hides the entry from that group until due (walked
over by polls, so O(delayed) per poll); with ``delivery_timeout`` each delivery has a deadline,
kept in delivery order (one timeout per queue, a monotonic clock), and `expire()` hands back
those that passed as if negatively committed with ``lastCode=timeout``. Everything here is bounded
by the live entries (counts, delays) or the pending ones (deadlines).

`DeliveryPolicies` is a mixin of `Dispatcher` (groups.py), kept apart because it is one concern
with its own state (`_init_policies`); the annotations below are what it uses of its host. Its
state is also read and updated by the dispatcher's core (a delivery is counted and given its
deadline in ``_deliver``, a removal forgets an entry's counts and delays).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from qserve.core.group_state import Consumer, EntryEvent, Group, Nack
from qserve.core.policy import TIMEOUT_CODE, Policy

__all__ = ["DeadLetter", "DeliveryPolicies"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry that came back to ``group`` after ``deliveries`` deliveries (``max_deliveries``):
    the edge moves it to the dead-letter queue and reports it `removed()`."""

    index: int
    group: str
    deliveries: int
    code: str
    reason: str


class DeliveryPolicies:
    """Dead letters, delays and delivery deadlines for `groups.Dispatcher` (which provides the
    attributes annotated here)."""

    _now: Callable[[], float]
    _groups: dict[str, Group]
    _nacks: dict[int, Nack]
    _release: Callable[[Group, int, EntryEvent], None]
    _annotate: Callable[[int, str, str], None]

    def _init_policies(self, policy: Policy) -> None:
        self.policy = policy
        self._counting = policy.max_deliveries > 0 or policy.retry_backoff is not None
        self._counts: dict[int, dict[str, int]] = {}       # entry -> group -> deliveries (live entries)
        self._delayed: dict[int, dict[str, float]] = {}    # entry -> group -> due (clock), live entries
        self._deadlines: dict[tuple[str, int], tuple[Consumer, float]] = {}   # delivery order = deadline order
        self._dead: dict[int, DeadLetter] = {}             # handed to the edge, not yet removed
        self._dead_new: list[DeadLetter] = []              # not yet taken by `dead_letters()`
        self.timed_out = 0                                 # counters (metrics)
        self.delayed_total = 0
        # each new delay as (index, group, due), for a queue that persists them (None: not kept);
        # its owner drains it after every call that may return entries (at most one per held entry)
        self.new_delays: list[tuple[int, str, float]] | None = None

    def may_commit(self, indexes: Iterable[int], group: str, consumer_id: str) -> list[int]:
        """Of ``indexes`` committed by ``consumer_id`` (a member of ``group``), those it may
        delete: each entry that another member of its group holds now is left out (its lease ran
        out and the entry went on: a late commit must not delete the new holder's entry)."""
        grp = self._groups.get(group)
        owner = grp.owner if grp is not None else {}
        return [i for i in indexes if i not in owner or owner[i].id == consumer_id]

    def expire(self) -> list[int]:
        """``delivery_timeout``: hand back every delivery whose deadline passed, as a negative
        commit with ``lastCode=timeout`` (the holder's slot is free at once).

        Returns:
            The indexes handed back, in deadline order.
        """
        if not self._deadlines:
            return []
        now = self._now()
        out: list[int] = []
        while self._deadlines:
            key, (consumer, deadline) = next(iter(self._deadlines.items()))
            if deadline > now:
                break
            group, index = consumer.group, key[1]
            if group.owner.get(index) is not consumer:   # stale: released elsewhere
                del self._deadlines[key]
                continue
            self._release(group, index, EntryEvent.NEGATIVE)
            group.avoid.pop(index, None)
            group.avoid[index] = consumer
            self._annotate(index, TIMEOUT_CODE,
                           f"held by {consumer.id} for {self.policy.delivery_timeout:g} s without a commit")
            self._returned(group, index, None)
            self.timed_out += 1
            out.append(index)
        return out

    def dead_letters(self) -> list[DeadLetter]:
        """Entries to move to the dead-letter queue since the last call (each once); they stay
        undeliverable until the edge reports them `removed()`."""
        out, self._dead_new = self._dead_new, []
        return out

    def revive(self, indexes: Iterable[int]) -> None:
        """Dead letters the edge could not move: deliverable again (counted on, so the next
        return tries the move again)."""
        for index in indexes:
            self._dead.pop(index, None)

    def next_wakeup(self, after: float = -math.inf) -> float | None:
        """The clock time of the next deadline, or of the next delay falling due later than
        ``after`` (None: nothing waits). The edge passes the time it last woke the watchers: a
        delay due by then needs no wake-up any more, although it stays until a poll of its group
        walks over it (a group whose members' windows are full does not poll), and counting it
        would make the next wake-up one in the past, again and again."""
        times = [d for groups in self._delayed.values() for d in groups.values() if d > after]
        if self._deadlines:
            times.append(next(iter(self._deadlines.values()))[1])
        return min(times) if times else None

    def delay_of(self, index: int, group: str) -> float | None:
        """When the delay that hides ``index`` from ``group`` is due (clock time; None: none)."""
        return self._delayed.get(index, {}).get(group)

    def delayed(self) -> int:
        """Entries hidden from at least one group by a delay."""
        return len(self._delayed)

    def deliveries_of(self, index: int, group: str) -> int:
        """How many times the entry was delivered to ``group`` (counted with ``max_deliveries`` or
        ``retry_backoff`` only; 0 otherwise)."""
        return self._counts.get(index, {}).get(group, 0)

    def _returned(self, group: Group, index: int, delay: float | None) -> None:
        """The entry is AVAILABLE to ``group`` again: dead-letter it or delay it, as the policy says."""
        if not self._counting and not delay:
            return
        count = self._counts.get(index, {}).get(group.name, 0)
        policy = self.policy
        if policy.max_deliveries and count >= policy.max_deliveries:
            if index not in self._dead:
                nack = self._nacks.get(index)
                letter = DeadLetter(index, group.name, count, nack.code if nack else "detached",
                                    nack.reason if nack else "its consumer went away")
                self._dead[index] = letter
                self._dead_new.append(letter)
            return
        wait = policy.backoff(count) if delay is None else delay
        if wait > 0:
            due = self._now() + wait
            self._delayed.setdefault(index, {})[group.name] = due
            self.delayed_total += 1
            if self.new_delays is not None:
                self.new_delays.append((index, group.name, due))

    def restore_delay(self, index: int, group: str, due: float) -> None:
        """A delay kept across a restart: ``index`` stays hidden from ``group`` until ``due`` (clock
        time). The entry must be live; the group need not exist yet."""
        self._delayed.setdefault(index, {})[group] = due

    def _due(self, delayed: dict[int, dict[str, float]], index: int, group: str, now: float) -> bool:
        """Whether the entry is visible to ``group`` (dropping its delay once due)."""
        groups = delayed[index]
        due = groups.get(group)
        if due is None:
            return True
        if due > now:
            return False
        del groups[group]
        if not groups:
            del delayed[index]
        return True
