"""Long-polling gets, filed by what can answer them.

Strategy: only a put makes an entry appear (deletes, truncates and commits take entries away), so a
put wakes the gets waiting for its requestId and the others whose start and tag filter its entry
passes, nothing else (see `GetWaiters`). Shared by the backends (`local.queues.Queue`,
`redis.queue.RedisQueue`): it only needs an entry's index and tags.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator, Mapping

import trio

from qserve.backends.base import StoredEntry
from qserve.core.tags import matches

__all__ = ["GetWaiters"]


class GetWaiters:
    """Long-polling gets, filed by what can answer them. Only a put makes an entry appear (deletes,
    truncates and commits take entries away), so a put wakes the gets waiting for its requestId and
    the others whose start and tag filter its entry passes, nothing else: with many clients each
    waiting on the sink for their own result, a put wakes one of them, not all (waking all of them
    made the sink's put rate fall with the number of waiting clients; README "Development" has the
    figures). Bounded by the server's connection limit."""

    def __init__(self) -> None:
        self._by_rid: dict[str, dict[int, trio.Event]] = {}
        self._others: dict[int, tuple[int, tuple[tuple[str, str], ...], trio.Event]] = {}
        self._keys = itertools.count()

    @contextlib.contextmanager
    def waiting(self, start: int, tags: Mapping[str, str]) -> Iterator[trio.Event]:
        """An event set when a put may answer a get of entries >= ``start`` matching ``tags``."""
        event, key = trio.Event(), next(self._keys)
        rid = tags.get("requestId")
        if rid is not None:
            self._by_rid.setdefault(rid, {})[key] = event
        else:
            self._others[key] = (start, tuple(tags.items()), event)
        try:
            yield event
        finally:
            if rid is None:
                del self._others[key]
            else:
                waiting = self._by_rid[rid]
                del waiting[key]
                if not waiting:
                    del self._by_rid[rid]

    def put(self, entry: StoredEntry) -> None:
        rid = entry.tags.get("requestId")
        if rid is not None and rid in self._by_rid:
            for event in self._by_rid[rid].values():
                event.set()
        for start, wanted, event in self._others.values():
            if entry.index >= start and matches(entry.tags, wanted):
                event.set()

    def wake_all(self) -> None:
        for waiting in self._by_rid.values():
            for event in waiting.values():
                event.set()
        for _, _, event in self._others.values():
            event.set()

    def __len__(self) -> int:
        return len(self._others) + sum(len(w) for w in self._by_rid.values())
