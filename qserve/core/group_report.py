"""How a queue's consumer groups appear in its attributes (``_attrs_=true``): the ``consumers.*``
and ``groups.*`` keys, rendered from the dispatch state `core.groups.Dispatcher` keeps.

Kept apart from the dispatcher because it is presentation only: the key names and the
``Id: ..., Index: ...`` value layout are the queue service's (PROTOCOL.md), the state is
`core.group_state`'s. Pure functions; the clock reading comes in as ``now``.
"""

from __future__ import annotations

from collections.abc import Mapping

from qserve.core.group_state import Consumer, Group
from qserve.wire.durations import format_go_duration

__all__ = ["render_attributes"]


def render_attributes(consumers: Mapping[str, Consumer], groups: Mapping[str, Group],
                      now: float) -> dict[str, str]:
    """The ``consumers.*`` and ``groups.*`` attribute keys (values are strings).

    Consumers and groups are listed sorted by id. Index is the highest index delivered so
    far (0 if none); a consumer's Pending counts its taken window slots (Window - Slots);
    Idle is the time from its last delivery, commit or nack to ``now`` (the dispatcher's clock),
    as a Go duration rounded to the millisecond.
    """
    attrs = {
        "consumers.stats.total": str(len(consumers)),
        "consumers.status.total": str(len(consumers)),
    }
    for i, cid in enumerate(sorted(consumers)):
        c = consumers[cid]
        idle = format_go_duration(round(max(0.0, now - c.last_active) * 1000) * 1_000_000)
        attrs[f"consumers.list.[{i}]"] = (
            f"Id: {cid}, Index: {c.last_index}, Pending: {len(c.held)}, Status: Running, "
            f"Idle: {idle}, Window: {c.spec.window}, Slots: {c.free}, "
            f"AutoCommit: {'true' if c.spec.auto_commit else 'false'}")
    for i, name in enumerate(sorted(groups)):
        g = groups[name]
        attrs[f"groups.list.[{i}]"] = (
            f"Id: {name}, Index: {g.last_index}, Pending: {len(g.owner)}, "
            f"Delivered: {g.delivered}, Consumers: {len(g.members)}")
    return attrs
