"""`FakeSource`: the entry source the consumer-group core reads (`qserve.core.groups`), as a small
in-memory queue with the storage log's interface: a real data structure, not a mock."""

from __future__ import annotations

from qserve.storage.index import next_live


class FakeSource:
    """An in-memory queue: entries by priority level, index order within a level."""

    next_live = staticmethod(next_live)   # the skip-link walk of the tag index (`core.tags`), as the log's

    def __init__(self) -> None:
        self.levels: dict[int, dict[int, dict[str, str]]] = {}
        self.next_index = 1
        self.yielded = 0     # entries handed out by iter_dispatch (cost probe)
        self.tag_reads = 0   # tags_of calls (cost probe)

    def put(self, priority: int = 0, **tags: str) -> int:
        index = self.next_index
        self.next_index += 1
        self.levels.setdefault(priority, {})[index] = tags
        return index

    def delete(self, indexes) -> list[int]:
        gone = []
        for index in list(indexes):
            for level in self.levels.values():
                if level.pop(index, None) is not None:
                    gone.append(index)
        return gone

    def iter_dispatch(self, start: int = 0):
        for priority in sorted(self.levels, reverse=True):
            for index in list(self.levels[priority]):
                if index >= start:
                    self.yielded += 1
                    yield index, priority

    def tags_of(self, index: int):
        self.tag_reads += 1
        for level in self.levels.values():
            if index in level:
                return dict(level[index])
        return None

    def __contains__(self, index: int) -> bool:
        return any(index in level for level in self.levels.values())

    def live(self) -> list[int]:
        return [i for i, _ in self.iter_dispatch(0)]
