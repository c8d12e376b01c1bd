"""How a queue's consumer groups appear in its attributes (``_attrs_=true``): the ``consumers.*``
and ``groups.*`` keys, rendered from the dispatch state `core.groups.Dispatcher` keeps; and where
one entry stands among them (``_search_``: `search_position`).

Kept apart from the dispatcher because it is presentation only: the key names and the
``Id: ..., Index: ...`` value layout are the queue service's (PROTOCOL.md), the state is
`core.group_state`'s. Pure functions; the clock reading comes in as ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from qserve.core.group_state import Consumer, Group
from qserve.wire.durations import format_go_duration

__all__ = ["render_attributes", "render_rows", "search_position", "ConsumerRow", "GroupRow"]


@dataclass(frozen=True)
class ConsumerRow:
    """One consumer's figures, whichever backend keeps them."""

    id: str
    last_index: int     # the highest index delivered to it so far (0 if none)
    pending: int        # its taken window slots
    idle: float         # seconds since its last delivery, commit or nack
    window: int
    auto_commit: bool


@dataclass(frozen=True)
class GroupRow:
    """One group's figures, whichever backend keeps them."""

    name: str
    last_index: int     # the highest index the group delivered so far
    pending: int        # entries its members hold
    delivered: int
    consumers: int


def render_attributes(consumers: Mapping[str, Consumer], groups: Mapping[str, Group],
                      now: float) -> dict[str, str]:
    """The ``consumers.*`` and ``groups.*`` keys of `core.groups.Dispatcher`'s state; Idle is
    measured to ``now`` (the dispatcher's clock)."""
    return render_rows(
        [ConsumerRow(cid, c.last_index, len(c.held), max(0.0, now - c.last_active), c.spec.window,
                     c.spec.auto_commit) for cid, c in consumers.items()],
        [GroupRow(name, g.last_index, len(g.owner), g.delivered, len(g.members)) for name, g in groups.items()])


def render_rows(consumers: Sequence[ConsumerRow], groups: Sequence[GroupRow]) -> dict[str, str]:
    """The ``consumers.*`` and ``groups.*`` attribute keys (values are strings).

    Consumers and groups are listed sorted by id. Index is the highest index delivered so
    far (0 if none); a consumer's Pending counts its taken window slots (Window - Slots);
    Idle is rounded to the millisecond and written as a Go duration.
    """
    attrs = {
        "consumers.stats.total": str(len(consumers)),
        "consumers.status.total": str(len(consumers)),
    }
    for i, c in enumerate(sorted(consumers, key=lambda row: row.id)):
        idle = format_go_duration(round(c.idle * 1000) * 1_000_000)
        attrs[f"consumers.list.[{i}]"] = (
            f"Id: {c.id}, Index: {c.last_index}, Pending: {c.pending}, Status: Running, "
            f"Idle: {idle}, Window: {c.window}, Slots: {c.window - c.pending}, "
            f"AutoCommit: {'true' if c.auto_commit else 'false'}")
    for i, g in enumerate(sorted(groups, key=lambda row: row.name)):
        attrs[f"groups.list.[{i}]"] = (
            f"Id: {g.name}, Index: {g.last_index}, Pending: {g.pending}, "
            f"Delivered: {g.delivered}, Consumers: {g.consumers}")
    return attrs


def search_position(source, groups: Iterable[Group], index: int) -> dict[str, bool | int] | None:
    """The queue position of one entry, for the ``_search_`` endpoint.

    An entry is *waiting* when it is live and PENDING in no group. For a live entry that is
    PENDING in some group the answer is ``{"IsPending": True, "WaitCount": 0}``; for a
    waiting entry ``{"IsPending": False, "WaitCount": n}``, n being the number of waiting
    entries ahead of it in dispatch order (higher priority first, then lower index),
    whatever their tags. O(position in dispatch order), or O(pending) when the source can
    count the live entries ahead itself (``dispatch_rank``, optional: the storage log does it
    from memory when no priority entries are present).

    Returns:
        The answer, or None if the index is not live.
    """
    if index < 1 or index not in source:
        return None
    owners = [g.owner for g in groups]
    if any(index in owner for owner in owners):
        return {"IsPending": True, "WaitCount": 0}
    rank = getattr(source, "dispatch_rank", None)
    ahead = rank(index) if rank is not None else None
    if ahead is not None:   # index order: subtract the live pending entries before it
        pending = {i for owner in owners for i in owner if i < index}
        return {"IsPending": False, "WaitCount": ahead - sum(1 for i in pending if i in source)}
    ahead = 0
    for other, _priority in source.iter_dispatch(0):
        if other == index:
            break
        if not any(other in owner for owner in owners):
            ahead += 1
    return {"IsPending": False, "WaitCount": ahead}
