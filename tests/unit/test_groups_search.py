"""Consumer-group core (`qserve.core.groups`): what it reports and what it costs. A search's figures
(also with the storage log as source, where WaitCount comes from the log's rank and must match the
walk), the queue attributes and statistics, Go-style durations, `wants`, and that polling and tag
filters cost does not grow with queue length.
"""

from __future__ import annotations

import pytest

from qserve.core.events import ConsumerSpec
from qserve.core.groups import Dispatcher
from qserve.wire.durations import format_go_duration

from ..helpers.dispatch import Clock, commit, make, spec


# -- search ------------------------------------------------------------------------------------

def test_search_figures():
    source, d, _ = make()
    for priority in (0, 0, 1, 0, 0):
        source.put(priority)                   # dispatch order: 3, 1, 2, 4, 5
    d.attach(spec("g1", "a", window=1))
    d.attach(spec("g2", "a", window=1))
    assert d.search(5) == {"IsPending": False, "WaitCount": 4}
    assert d.search(3) == {"IsPending": False, "WaitCount": 0}
    assert d.poll("g1.a") == [3]
    assert d.poll("g2.a") == [3]
    d.negative([3], group="g2")
    d.attach(spec("g2", "b", window=1))
    assert d.poll("g2.b") == [3]   # a nacked it; b is the other member with a free slot
    assert d.poll("g2.a") == [1]
    assert d.search(3) == {"IsPending": True, "WaitCount": 0}
    assert d.search(1) == {"IsPending": True, "WaitCount": 0}   # pending in g2
    assert d.search(2) == {"IsPending": False, "WaitCount": 0}
    assert d.search(5) == {"IsPending": False, "WaitCount": 2}  # 2 and 4 wait ahead
    assert d.search(6) is None and d.search(0) is None and d.search(-1) is None
    source.delete([2])
    d.removed([2])
    assert d.search(2) is None
    assert d.search(5) == {"IsPending": False, "WaitCount": 1}


# -- attributes and statistics -----------------------------------------------------------------

def test_attributes_format():
    source, d, clock = make(4)
    assert d.attributes() == {"consumers.stats.total": "0", "consumers.status.total": "0"}
    d.attach(spec("svc", "pod-b", window=5, auto_commit=True))
    d.attach(spec("svc", "pod-a", window=2))
    d.attach(spec("other", "x"))
    assert d.poll("svc.pod-a") == [1, 2]
    assert d.poll("svc.pod-b", max_items=1) == [3]
    clock.t += 19.9974
    assert d.attributes() == {
        "consumers.stats.total": "3",
        "consumers.status.total": "3",
        "consumers.list.[0]": "Id: other.x, Index: 0, Pending: 0, Status: Running, Idle: 19.997s, "
                              "Window: 10, Slots: 10, AutoCommit: false",
        "consumers.list.[1]": "Id: svc.pod-a, Index: 2, Pending: 2, Status: Running, Idle: 19.997s, "
                              "Window: 2, Slots: 0, AutoCommit: false",
        "consumers.list.[2]": "Id: svc.pod-b, Index: 3, Pending: 1, Status: Running, Idle: 19.997s, "
                              "Window: 5, Slots: 4, AutoCommit: true",
        "groups.list.[0]": "Id: other, Index: 0, Pending: 0, Delivered: 0, Consumers: 1",
        "groups.list.[1]": "Id: svc, Index: 3, Pending: 3, Delivered: 3, Consumers: 2",
    }
    d.negative([1])
    assert d.poll("svc.pod-b") == [1, 4]
    assert d.attributes()["groups.list.[1]"] == (
        "Id: svc, Index: 4, Pending: 4, Delivered: 5, Consumers: 2")
    assert d.statistics() == {"consumers": 3, "groups": 2, "pending": 4, "in_flight": 3,
                              "annotated": 1, "avoid_hints": 0, "delivered": 5}
    d.detach("other.x")
    assert "groups.list.[1]" not in d.attributes()   # an empty group is dropped


@pytest.mark.parametrize("ns, text", [
    (0, "0s"), (42, "42ns"), (1_500, "1.5µs"), (750_000_000, "750ms"), (1_000_000_000, "1s"),
    (19_997_000_000, "19.997s"), (90_000_000_000, "1m30s"), (3_600_000_000_000, "1h0m0s"),
    (3_723_500_000_000, "1h2m3.5s"), (60_500_000_000, "1m0.5s"), (-2_000_000, "-2ms"),
])
def test_format_go_duration(ns, text):
    assert format_go_duration(ns) == text


def test_wants_lists_consumers_with_free_slots():
    _, d, _ = make(3)
    d.attach(spec(user="a", window=2))
    d.attach(spec(user="b", window=5))
    d.poll("g.a")
    assert d.wants() == ["g.b"]
    d.negative([1])
    assert d.wants() == ["g.a", "g.b"]


# -- cost --------------------------------------------------------------------------------------

def test_poll_cost_does_not_grow_with_queue_length():
    source, d, _ = make(100_000)
    d.attach(spec(window=10))
    assert d.poll("g.u") == list(range(1, 11))
    commit(source, d, [1])
    source.yielded = 0
    assert d.poll("g.u") == [11]
    assert source.yielded <= 12   # 9 pending skipped + the one taken (+1 slack)


def test_tag_filter_reads_each_entry_once():
    """A filtered consumer's polls read each entry's tags once per filter, not once per poll:
    entries that do not match are never passed over again (a per-filter index of matches)."""
    source, d, _ = make(50, kind="a")
    source.put(kind="b")
    d.attach(spec(tags=(("kind", "b"),)))
    source.tag_reads = 0
    assert d.poll("g.u") == [51]
    assert source.tag_reads == 51
    for _ in range(20):                          # polls, puts of both kinds, commits
        source.tag_reads = 0
        source.put(kind="a")
        b = source.put(priority=1, kind="b")
        assert d.poll("g.u") == [b]
        assert source.tag_reads == 2             # only the two new entries
        commit(source, d, [b])
    source.tag_reads = source.yielded = 0
    assert d.poll("g.u") == [] and source.tag_reads == 0
    # deleted matches are noticed when met and skipped from then on
    bs = [source.put(kind="b") for _ in range(5)]
    source.delete(bs[:4])
    assert d.poll("g.u") == [bs[4]]
    # a consumer that comes back (the clients reconnect every few seconds) finds its filter's index
    d.detach("g.u")
    source.tag_reads = 0
    d.attach(spec(user="again", tags=(("kind", "b"),)))
    assert d.poll("g.again") == [51, bs[4]] and source.tag_reads == 0
    source.tag_reads = 0
    d.attach(spec(user="plain"))
    d.poll("g.plain")
    assert source.tag_reads == 0   # no filter: no tag reads


class _NoRank:
    """A source without ``dispatch_rank``: the dispatcher walks the entries ahead instead."""

    def __init__(self, source) -> None:
        self._source = source

    def __getattr__(self, name):
        if name == "dispatch_rank":
            raise AttributeError(name)
        return getattr(self._source, name)

    def __contains__(self, index) -> bool:
        return index in self._source


@pytest.mark.parametrize("seed", range(12))
def test_search_from_the_logs_rank_matches_the_walk(tmp_path, seed):
    """With the storage log as source, WaitCount comes from the index's live-row count (no priority
    entries) and must equal what walking the dispatch order gives, whatever is deleted or pending."""
    import random

    from qserve.backends.local.source import LogSource
    from qserve.storage import QueueLog
    rng = random.Random(seed)
    log = QueueLog.open(tmp_path / "q")
    with_priorities = seed % 4 == 3            # then the log declines and the walk answers
    for _ in range(300):
        log.append(b"x", {}, priority=rng.choice([0, 0, 0, 2]) if with_priorities else 0)
    log.delete(rng.sample(range(1, 301), 120))
    source = LogSource(log)
    d = Dispatcher(source, now=Clock())
    for g, u, w in (("g1", "a", 5), ("g1", "b", 3), ("g2", "c", 7)):
        d.attach(ConsumerSpec(g, u, window=w))
        d.poll(f"{g}.{u}")
    log.delete(rng.sample(sorted(d.pending_of("g1.a")), 2))   # deleted while pending, unreported
    for index in range(0, 302):
        fast = d.search(index)
        d._source = _NoRank(source)
        slow = d.search(index)
        d._source = source
        assert fast == slow, (index, fast, slow)
    assert (log.dispatch_rank(log.first_index) is None) == with_priorities
    log.close()
