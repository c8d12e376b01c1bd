"""What a `QueueLog` answers from memory: counts, bounds, dispatch order, statistics.

Strategy: every answer here comes from the derived in-memory index (index.py), the segment list and
the log's counters; none touches a file, so callers on a hot path (dispatch, status reports) can ask as
often as they like. Reads that go to disk are reads.py's; the mutations that keep the index current are
log.py's.

`Inspection` is a mixin of `QueueLog` (log.py), kept apart because it is one concern (read-only views
of the log's memory) and log.py holds the write path; the annotations below are what it uses of its
host.
"""

from __future__ import annotations

from typing import Callable, Iterator

from .index import EntryIndex
from .segment import Segment

__all__ = ["Inspection"]


class Inspection:
    """Memory-only views of `QueueLog` (which provides the attributes annotated here)."""

    appended_seq: int
    durable_seq: int
    next_index: int
    _index: EntryIndex
    _segs: list[Segment]
    _counters: dict[str, int]
    _check: Callable[[], None]

    def iter_dispatch(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """(index, priority) of live entries >= start, highest priority first, FIFO in a level.
        From memory only."""
        self._check()
        return self._index.iter_dispatch(start)

    def count(self, priority: int | None = None) -> int:
        """Live entries (only those with ``priority`` if given), from memory."""
        self._check()
        return self._index.live if priority is None else self._index.count_priority(priority)

    def dispatch_rank(self, index: int) -> int | None:
        """Live entries ahead of live ``index`` in dispatch order, from memory, when that is cheap
        (no priority entries present); None otherwise. See `EntryIndex.dispatch_rank`."""
        self._check()
        return self._index.dispatch_rank(index)

    def priority_of(self, index: int) -> int | None:
        pos = self._index.pos_of(index)
        return None if pos is None else self._index.prio[pos]

    def __contains__(self, index: int) -> bool:
        return self._index.pos_of(index) is not None

    def __len__(self) -> int:
        return self._index.live

    @property
    def length(self) -> int:
        return self._index.live

    @property
    def first_index(self) -> int:
        p = self._index.first_pos()
        return 0 if p is None else self._index.idx[p]

    @property
    def last_index(self) -> int:
        p = self._index.last_pos()
        return 0 if p is None else self._index.idx[p]

    @property
    def bytes_on_disk(self) -> int:
        """Bytes of the segments' records (the active segment's file also holds up to
        ``preallocate_bytes`` of zeros written ahead of appends)."""
        return sum(s.size for s in self._segs)

    @property
    def rollbacks(self) -> int:
        """How many times unsynced records were rolled back after a failed fsync (cheap to read)."""
        return self._counters["rollbacks"]

    def statistics(self) -> dict:
        ix = self._index
        return {
            "segments": len(self._segs), "live_entries": ix.live, "dead_entries": len(ix.idx) - ix.live,
            "bytes": self.bytes_on_disk, "live_bytes": sum(s.live_bytes for s in self._segs),
            "appended_seq": self.appended_seq, "durable_seq": self.durable_seq,
            "next_index": self.next_index, "first_index": self.first_index,
            "last_index": self.last_index, **self._counters,
        }
