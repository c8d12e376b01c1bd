"""`qserve.core.tags`: per-filter indexes of matching entries, against an in-memory source."""

from __future__ import annotations

from qserve.core.tags import IDLE_KEPT, FilterIndex, FilterIndexes

from ..helpers.sources import FakeSource

RED = (("color", "red"),)


def test_index_order_priority_level_and_incremental_refresh():
    source = FakeSource()
    for i in range(12):
        source.put(i % 3, color="red" if i % 2 else "blue")
    fi = FilterIndex(RED)
    fi.refresh(source)
    assert source.tag_reads == 12
    reds = [i + 1 for i in range(12) if i % 2]
    assert list(fi.iter_index_order(0, source)) == reds
    assert list(fi.iter_index_order(5, source)) == [i for i in reds if i >= 5]
    assert list(fi.iter_index_order(0, source, priority=1)) == [i + 1 for i in range(12) if i % 2 and i % 3 == 1]
    assert [i for i, _ in fi.iter_dispatch(0, source)] == [i for i, _ in source.iter_dispatch(0) if i in reds]
    source.tag_reads = 0
    fi.refresh(source)                           # nothing new: nothing read
    new = source.put(2, color="red")
    fi.refresh(source)
    assert source.tag_reads == 1 and list(fi.iter_index_order(0, source))[-1] == new


def test_deleted_entries_are_skipped_and_runs_rewritten():
    source = FakeSource()
    n = 5000
    for _ in range(n):
        source.put(0, color="red")
    fi = FilterIndex(RED)
    fi.refresh(source)
    source.delete(range(1, 4001))
    assert list(fi.iter_index_order(0, source)) == list(range(4001, n + 1))
    run = fi.levels[0]
    assert run.dead == 4000 and len(run.idx) == n
    fi.refresh(source)                           # dead outnumber live: the run is rewritten
    assert list(fi.levels[0].idx) == list(range(4001, n + 1)) and fi.levels[0].dead == 0
    source.delete(range(4001, n + 1))
    assert list(fi.iter_index_order(0, source)) == []


def test_shared_while_used_and_a_bounded_number_kept_idle():
    filters = FilterIndexes()
    a = filters.acquire(RED)
    assert filters.acquire(RED) is a and a.users == 2
    filters.release(a)
    filters.release(a)
    assert filters.acquire(RED) is a             # idle, kept: not rebuilt
    filters.release(a)
    others = [filters.acquire((("k", str(i)),)) for i in range(IDLE_KEPT + 5)]
    for fi in others:
        filters.release(fi)
    assert len(filters) == IDLE_KEPT
    assert filters.acquire(RED) is not a         # the oldest idle ones were dropped
