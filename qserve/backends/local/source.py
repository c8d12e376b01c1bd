"""`LogSource`: what a queue's `core.groups.Dispatcher` reads of its storage log (live entries in
dispatch order, their tags, the tag index's skip links)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from qserve import storage
from qserve.storage.index import next_live

__all__ = ["LogSource"]


class LogSource:
    """What `groups.Dispatcher` needs of a queue, read from the storage log."""

    #: the skip-link walk of the tag index's runs (`core.tags`): the storage index's own
    next_live = staticmethod(next_live)

    def __init__(self, qlog: storage.QueueLog) -> None:
        self._log = qlog

    def iter_dispatch(self, start: int = 0) -> Iterator[tuple[int, int]]:
        return self._log.iter_dispatch(start)

    def tags_of(self, index: int) -> Mapping[str, str] | None:
        entry = self._log.read(index)
        return None if entry is None else entry.tags

    def tags_many(self, indexes: list[int]) -> list[Mapping[str, str] | None]:
        """`tags_of` for many entries at once (one read per run of back-to-back records)."""
        return [None if e is None else e.tags for e in self._log.read_many(indexes)]

    def __contains__(self, index: int) -> bool:
        return index in self._log

    def dispatch_rank(self, index: int) -> int | None:
        return self._log.dispatch_rank(index)

    @property
    def next_index(self) -> int:
        return self._log.next_index
