"""The per-entry state machine of a consumer group, and the records `groups.Dispatcher` keeps.

Strategy: like h11's `_state.py`, the states, the events and the only legal transitions are
written down once, as a table, and every change of an entry's state in `groups.py` goes through
`step()`. The records below are plain mutable objects owned by one `Dispatcher`; they hold only
what is needed to dispatch (indexes, never payloads), and each is bounded as stated on it.

Per group, an entry of the queue is in one of three states:

    AVAILABLE ──DELIVER──▶ PENDING(consumer)
        ▲                     │
        └──NEGATIVE / DETACH──┘
    AVAILABLE or PENDING ──REMOVE──▶ GONE     (commit, delete, truncate, auto-commit)

Rule 1: an entry's per-group state is derived, never stored twice. PENDING(c) means
        `group.owner[index] is c` (and then `index in c.pending`); AVAILABLE means the source has
        the entry live and `group.owner` does not name it; GONE means the source no longer has
        it. Only `Dispatcher._deliver` and `Dispatcher._release` change `owner`, and both
        consult `step()`, so an impossible transition (delivering an entry that is already
        PENDING in the group) fails loudly instead of double-dispatching.
Rule 2: REMOVE is global, everything else is per group. Deleting an entry from the queue
        (a commit deletes too) moves it to GONE in every group at once; DELIVER, NEGATIVE and
        DETACH act in the one group of the consumer concerned. Events that do not apply in the
        current state (committing an AVAILABLE entry, nacking an entry nobody holds) are ignored
        by the callers rather than sent through the table: clients retry, so these operations
        are idempotent.

Window slots (per consumer, not per entry): a slot is taken by DELIVER. In manual-commit mode it
is freed when the entry leaves PENDING. In auto-commit mode it is freed when the entry has both
left PENDING (normally by REMOVE: the edge deletes before it sends) and been confirmed written by
the edge (`Dispatcher.sent`), in either order; so the window bounds entries in flight on the
socket and a slot is never freed twice.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from qserve.core.events import ConsumerSpec

__all__ = ["EntryState", "EntryEvent", "TRANSITIONS", "step", "Consumer", "Group", "Nack"]


class EntryState(enum.Enum):
    AVAILABLE = "available"
    PENDING = "pending"
    GONE = "gone"

    # members are their own only instances: hashed by identity, in C (Enum's own hash runs Python
    # code, and `step` hashes a state and an event for every entry delivered and every one removed)
    __hash__ = object.__hash__


class EntryEvent(enum.Enum):
    DELIVER = "deliver"     # poll handed the entry to a consumer
    NEGATIVE = "negative"   # the consumer nacked it
    DETACH = "detach"       # the consumer disconnected or was replaced
    REMOVE = "remove"       # deleted from the queue: commit, delete, truncate, auto-commit

    __hash__ = object.__hash__   # as `EntryState`'s


#: The only legal transitions; anything else is a bug in the dispatcher.
TRANSITIONS: dict[tuple[EntryState, EntryEvent], EntryState] = {
    (EntryState.AVAILABLE, EntryEvent.DELIVER): EntryState.PENDING,
    (EntryState.AVAILABLE, EntryEvent.REMOVE): EntryState.GONE,
    (EntryState.PENDING, EntryEvent.NEGATIVE): EntryState.AVAILABLE,
    (EntryState.PENDING, EntryEvent.DETACH): EntryState.AVAILABLE,
    (EntryState.PENDING, EntryEvent.REMOVE): EntryState.GONE,
}


def step(state: EntryState, event: EntryEvent) -> EntryState:
    """The state after `event`; raises `RuntimeError` for a transition the table does not allow."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise RuntimeError(f"illegal consumer-group transition {state.name} --{event.name}-->") from None


@dataclass(eq=False)
class Consumer:
    """One attached consumer. `pending`, `unsent` and `held` are each bounded by the window."""

    spec: ConsumerSpec
    group: Group
    start: int                      # resolved start index (-1 became next_index at attach time)
    last_active: float              # clock time of the last delivery, commit or nack
    pending: set[int] = field(default_factory=set)   # PENDING in the group, owned by this consumer
    unsent: set[int] = field(default_factory=set)    # auto-commit: handed out, write not confirmed
    held: set[int] = field(default_factory=set)      # window slots taken: pending | unsent
    last_index: int = 0             # highest index delivered to this consumer
    delivered: int = 0

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def free(self) -> int:
        return self.spec.window - len(self.held)

    def take(self, index: int) -> None:
        self.pending.add(index)
        if self.spec.auto_commit:
            self.unsent.add(index)
        self.held.add(index)

    def drop_pending(self, index: int) -> None:
        self.pending.discard(index)
        if index not in self.unsent:
            self.held.discard(index)

    def drop_unsent(self, index: int) -> None:
        self.unsent.discard(index)
        if index not in self.pending:
            self.held.discard(index)


@dataclass(eq=False)
class Group:
    """The consumers sharing one group id, and which of them holds which entry.

    `owner` is bounded by the sum of the members' windows. `avoid` remembers, for entries a
    member nacked, who nacked them (so that another member gets them first); it is a hint,
    capped at the sum of the members' windows, oldest dropped first.
    """

    name: str
    members: dict[str, Consumer] = field(default_factory=dict)   # attach order
    owner: dict[int, Consumer] = field(default_factory=dict)
    avoid: dict[int, Consumer] = field(default_factory=dict)     # insertion order = age
    last_index: int = 0             # highest index delivered in this group
    delivered: int = 0

    def avoid_cap(self) -> int:
        return max(1, sum(m.spec.window for m in self.members.values()))


@dataclass(eq=False)
class Nack:
    """What the last negative commit of one entry said, and how many there were."""

    count: int = 0
    code: str = ""
    reason: str = ""
