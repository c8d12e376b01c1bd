"""Per tag filter, the live entries that match it (for `groups.Dispatcher` and tag-filtered gets).

Why: a watcher with a tag filter used to read the tags of every entry ahead of its matches on every
poll. Tags never change once an entry is stored, so each entry only needs classifying once per
filter: a poll cost time in proportion to the non-matching entries ahead of it (README "Development"
has the figures), and a sleeping watcher polls every second; now it costs what an unfiltered one does. The same went for
a get with a tag filter (other than requestId), which every put wakes while it long-polls.

Strategy: a `FilterIndex` classifies entries up to the source's ``next_index`` when asked
(`refresh`: each entry's tags read once, in batches through the source's ``tags_many`` when it has
one), and keeps the matching indexes per priority level in ascending arrays (`_Run`). Entries
deleted on storage are noticed when a scan meets them (the dispatcher is not told of every
deletion) and stepped over from then on through skip links, walked by the source's ``next_live``
(the local backend's is the storage index's own union-find walk: one definition, and the core
imports nothing of storage); a run is rewritten once its dead outnumber its live. `FilterIndexes` (one per queue) keeps one per distinct
filter, shared by the consumers and gets using it, and the `IDLE_KEPT` most recently used ones
nobody uses (the official clients reconnect every few seconds, and a client long-polls get after
get, which must not mean reading the whole queue again).

Bounds: per filter, 12 bytes per matching live entry (plus dead ones until the run is rewritten);
filters: those of attached consumers and running gets, plus `IDLE_KEPT`.
"""

from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence

__all__ = ["FilterIndex", "FilterIndexes", "matches"]

IDLE_KEPT = 16      # unused filter indexes kept for consumers that come back
_BATCH = 512        # entries classified per ``tags_many`` call


def matches(tags: Mapping[str, str] | None, wanted: Sequence[tuple[str, str]]) -> bool:
    return tags is not None and all(tags.get(k) == v for k, v in wanted)


class _Run:
    """Ascending indexes of one priority level, with skip links over the ones found dead."""

    __slots__ = ("idx", "links", "dead")

    def __init__(self) -> None:
        self.idx = array("Q")
        self.links = array("I")
        self.dead = 0

    def append(self, index: int) -> None:
        self.links.append(len(self.idx))
        self.idx.append(index)

    def iter_from(self, start: int, source) -> Iterator[int]:
        """Indexes >= ``start`` that ``source`` still holds; the others are linked over."""
        idx, links, next_live = self.idx, self.links, source.next_live
        i = bisect_left(idx, start)
        while True:
            i = next_live(links, i)
            if i >= len(idx):
                return
            index = idx[i]
            if index in source:
                yield index
            else:                      # deleted on storage: never looked at again
                links[i] = i + 1
                self.dead += 1
            i += 1

    def compacted(self, alive: Callable[[int], bool]) -> _Run:
        """This run, rewritten without dead entries once they outnumber the live ones."""
        if self.dead < 1024 or self.dead * 2 < len(self.idx):
            return self
        run = _Run()
        for i in range(len(self.idx)):
            if self.links[i] == i and alive(self.idx[i]):
                run.append(self.idx[i])
        return run


class FilterIndex:
    """The live entries matching ``tags`` (a sorted tuple of pairs), per priority level.

    Every method's ``source`` is the queue's `groups.DispatchSource`, whose
    ``next_live(links, pos)`` also walks the runs' skip links (see the module docstring).
    """

    def __init__(self, tags: tuple[tuple[str, str], ...]) -> None:
        self.tags = tags
        self.scanned_to = 0                 # entries with a lower index are classified
        self.levels: dict[int, _Run] = {}
        self.users = 0

    def refresh(self, source) -> None:
        """Classify the entries put since the last refresh; rewrite runs that became sparse."""
        stop = source.next_index
        todo = [(i, p) for i, p in source.iter_dispatch(self.scanned_to) if i < stop] \
            if self.scanned_to < stop else []
        many = getattr(source, "tags_many", None)
        for k in range(0, len(todo), _BATCH):
            chunk = todo[k:k + _BATCH]
            if many is not None:
                found = many([i for i, _ in chunk])
            else:
                found = [source.tags_of(i) for i, _ in chunk]
            for (index, prio), tags in zip(chunk, found):
                if matches(tags, self.tags):
                    run = self.levels.get(prio)
                    if run is None:
                        run = self.levels[prio] = _Run()
                    run.append(index)
        self.scanned_to = stop
        alive = source.__contains__
        for prio, run in list(self.levels.items()):
            run = self.levels[prio] = run.compacted(alive)
            if not run.idx:
                del self.levels[prio]

    def iter_dispatch(self, start: int, source) -> Iterator[tuple[int, int]]:
        """(index, priority) of matching live entries >= ``start``: highest priority first, index
        order within a level (the order of ``source.iter_dispatch``). Call `refresh` first."""
        for prio in sorted(self.levels, reverse=True):
            for index in self.levels[prio].iter_from(start, source):
                yield index, prio

    def iter_index_order(self, start: int, source, priority: int | None = None) -> Iterator[int]:
        """Matching live indexes >= ``start`` in index order (only ``priority``'s level if given).
        Call `refresh` first."""
        if priority is not None:
            run = self.levels.get(priority)
            return iter(()) if run is None else run.iter_from(start, source)
        return heapq.merge(*(run.iter_from(start, source) for run in self.levels.values()))


class FilterIndexes:
    """The `FilterIndex` of each filter in use, plus the most recently released ones."""

    def __init__(self) -> None:
        self._active: dict[tuple, FilterIndex] = {}
        self._idle: OrderedDict[tuple, FilterIndex] = OrderedDict()

    def acquire(self, tags: tuple[tuple[str, str], ...]) -> FilterIndex:
        fi = self._active.get(tags) or self._idle.pop(tags, None) or FilterIndex(tags)
        self._active[tags] = fi
        fi.users += 1
        return fi

    def release(self, fi: FilterIndex) -> None:
        fi.users -= 1
        if fi.users <= 0 and self._active.get(fi.tags) is fi:
            del self._active[fi.tags]
            self._idle[fi.tags] = fi
            while len(self._idle) > IDLE_KEPT:
                self._idle.popitem(last=False)

    def __len__(self) -> int:
        return len(self._active) + len(self._idle)
