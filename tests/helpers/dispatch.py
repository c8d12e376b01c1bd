"""What the consumer-group core tests share: a settable clock, a `Dispatcher` over a `FakeSource`
holding n entries, a `ConsumerSpec` with defaults, and an HTTP-style commit (delete on the source,
then tell the dispatcher)."""

from __future__ import annotations

from qserve.core.events import ConsumerSpec
from qserve.core.groups import Dispatcher

from .sources import FakeSource

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(n: int = 0, **tags: str) -> tuple[FakeSource, Dispatcher, Clock]:
    source, clock = FakeSource(), Clock()
    for _ in range(n):
        source.put(**tags)
    return source, Dispatcher(source, now=clock), clock


def spec(group: str = "g", user: str = "u", **kw) -> ConsumerSpec:
    return ConsumerSpec(group, user, **kw)


def commit(source: FakeSource, d: Dispatcher, indexes) -> list[int]:
    """What the edge does for an HTTP commit: delete on storage, then tell the dispatcher."""
    source.delete(indexes)
    return d.commit(indexes)
