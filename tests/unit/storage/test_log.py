"""QueueLog API: appends, reads, deletes, truncation, limits, state, group commit."""

from __future__ import annotations

import os
import random
import threading
from array import array

import pytest

from qserve.storage import (Entry, LogClosed, LogConfig, PayloadTooLarge, QueueFull, QueueLog,
                     StorageError, segment_name)

from qserve.storage.index import DEAD, EntryIndex, pack_loc
from qserve.storage.rids import RidBuilder, RidTable, rid_hash

from ...helpers.storage import clock, segments, snapshot, tiny


def test_append_read_scan(tmp_path):
    log = QueueLog.open(tmp_path / "q", now=clock())
    assert (log.length, log.first_index, log.last_index, log.next_index) == (0, 0, 0, 1)
    e1 = log.append(b"one", {"requestId": "a", "k": "v"})
    e2 = log.append(b"two", {"requestId": "b"}, priority=3)
    e3 = log.append(b"three", {"k": "v"})
    assert e1 == Entry(1, {"requestId": "a", "k": "v"}, b"one", 0, 1000001)
    assert (e2.index, e3.index) == (2, 3)
    assert log.read(2) == e2 and log.read(4) is None and log.read(0) is None
    assert [e.index for e in log.scan(tags={"k": "v"})] == [1, 3]
    assert [e.index for e in log.scan(start=2)] == [2, 3]
    assert [e.index for e in log.scan(limit=2)] == [1, 2]
    assert [e.index for e in log.scan(priority=3)] == [2]
    assert log.find_request_id("b") == e2 and log.find_request_id("zz") is None
    assert list(log.iter_dispatch()) == [(2, 3), (1, 0), (3, 0)]
    assert list(log.iter_dispatch(3)) == [(3, 0)]
    assert log.priority_of(2) == 3 and log.priority_of(9) is None
    assert 2 in log and 9 not in log
    assert (log.length, log.first_index, log.last_index) == (3, 1, 3)
    log.close()
    with pytest.raises(LogClosed):
        log.append(b"x", {})
    log.close()  # twice is fine
    assert (tmp_path / "q" / segment_name(1)).exists()


def test_delete_truncate_and_reopen(tmp_path):
    log = QueueLog.open(tmp_path, tiny())
    for i in range(30):
        log.append(bytes([i]) * 50, {"requestId": f"r{i}"}, priority=i % 2)
    assert log.delete([3, 3, 4, 99, 0, -5]) == [3, 4]
    assert log.delete([3]) == []
    assert log.truncate(10) == 7
    assert log.truncate(10) == 0
    assert log.first_index == 10 and log.length == 21
    log.set_state(state="End")
    assert log.state == {"state": "End"}
    before = snapshot(log)
    assert len(segments(tmp_path)) > 1
    log.close()
    log = QueueLog.open(tmp_path, tiny())
    assert snapshot(log) == before
    assert log.find_request_id("r3") is None and log.find_request_id("r20").index == 21


def test_index_never_reused_after_truncate_all(tmp_path):
    log = QueueLog.open(tmp_path)
    for _ in range(5):
        log.append(b"x", {})
    assert log.truncate(10**9) == 5
    assert (log.length, log.first_index, log.last_index, log.next_index) == (0, 0, 0, 6)
    log.close()
    log = QueueLog.open(tmp_path)
    assert log.next_index == 6 and log.length == 0
    assert log.append(b"y", {}).index == 6
    log.truncate(10**9)
    log.maybe_compact()
    log.close()
    log = QueueLog.open(tmp_path)
    assert log.append(b"z", {}).index == 7


def test_index_never_reused_after_compaction_drops_everything(tmp_path):
    log = QueueLog.open(tmp_path, tiny())
    for _ in range(100):
        log.append(b"x" * 100, {})
    log.truncate(101)
    log.maybe_compact()
    assert len(segments(tmp_path)) == 1
    log.close()
    log = QueueLog.open(tmp_path, tiny())
    assert log.append(b"y", {}).index == 101


def test_limits(tmp_path):
    log = QueueLog.open(tmp_path, LogConfig(max_payload_bytes=100, max_entries=2))
    with pytest.raises(PayloadTooLarge):
        log.append(b"x" * 101, {})
    assert log.appended_seq == 0 and log.next_index == 1
    size = log.bytes_on_disk
    log.append(b"x" * 100, {})
    log.append(b"", {})
    with pytest.raises(QueueFull) as ei:
        log.append(b"x", {})
    assert isinstance(ei.value, StorageError) and not isinstance(ei.value, PayloadTooLarge)
    assert log.appended_seq == 2 and log.next_index == 3 and log.bytes_on_disk > size
    size = log.bytes_on_disk
    with pytest.raises(QueueFull):
        log.append(b"x", {})
    assert log.bytes_on_disk == size
    log.delete([1])
    with pytest.raises(TypeError):
        log.append(b"x", {"a": 1})
    log.append(b"x", {})


def test_sync_counters_and_ticket_across_roll(tmp_path):
    log = QueueLog.open(tmp_path, tiny())
    assert (log.appended_seq, log.durable_seq) == (0, 0)
    log.append(b"x", {})
    t = log.sync_begin()
    # more appends while the ticket is out, enough to roll several segments
    for _ in range(60):
        log.append(b"y" * 100, {})
    th = threading.Thread(target=t.run)
    th.start()
    th.join()
    log.sync_end(t)
    assert log.durable_seq >= 1
    log.sync()
    assert log.durable_seq == log.appended_seq == 61
    # an empty round is fine
    t = log.sync_begin()
    t.run()
    log.sync_end(t)
    st = log.statistics()
    assert st["segments"] >= 3 and st["durable_seq"] == 61 and st["live_entries"] == 61


def test_a_round_run_in_place_syncs_the_segments_own_fd_and_leaves_it_open(tmp_path):
    """``sync_begin(here=True)``: no dup to make and close; the segment's fd stays the log's. A
    dup'd ticket closes its own fd and nothing else."""
    log = QueueLog.open(tmp_path, tiny())
    log.append(b"x", {})
    here = log.sync_begin(here=True)
    seg_fd = here.fds[0]
    assert here.seg.fd == seg_fd
    here.run()
    log.sync_end(here)
    assert log.durable_seq == 1
    os.fstat(seg_fd)                       # still open: the log goes on writing through it
    log.append(b"y", {})
    dupped = log.sync_begin()
    dup_fd = dupped.fds[0]
    assert dup_fd != seg_fd
    dupped.run()
    log.sync_end(dupped)
    with pytest.raises(OSError):
        os.fstat(dup_fd)                   # the ticket's own fd, closed
    os.fstat(seg_fd)
    assert log.read(2).data == b"y" and log.durable_seq == 2
    log.close()


def test_read_after_roll_and_moved(tmp_path):
    log = QueueLog.open(tmp_path, tiny(compact_live_ratio=0.9))
    for i in range(40):
        log.append(bytes([i]) * 100, {"requestId": f"r{i}"}, priority=i % 3)
    log.delete(range(1, 40, 2))
    want = snapshot(log)
    assert log.maybe_compact() > 0
    assert snapshot(log) == want
    assert log.find_request_id("r11").data == bytes([11]) * 100
    assert log.find_request_id("r10") is None
    log.close()
    log = QueueLog.open(tmp_path, tiny(compact_live_ratio=0.9))
    assert snapshot(log) == want


def test_dispatch_while_deleting(tmp_path):
    """The dispatcher deletes what it dispatched while iterating; purges happen underneath."""
    log = QueueLog.open(tmp_path, tiny())
    for i in range(10000):
        log.append(b"", {}, priority=(3 if i % 10 == 0 else 0))
    seen = []
    for index, prio in log.iter_dispatch():
        seen.append((index, prio))
        log.delete([index])           # triggers column purges part way through
    want = [(i, 3) for i in range(1, 10001, 10)] + [(i, 0) for i in range(1, 10001) if i % 10 != 1]
    assert seen == want
    assert log.length == 0 and log.first_index == 0 and log.next_index == 10001
    assert log.statistics()["dead_entries"] < 10000


def test_scan_while_appending(tmp_path):
    log = QueueLog.open(tmp_path, tiny())
    for _ in range(5):
        log.append(b"x", {})
    got = []
    for e in log.scan():
        got.append(e.index)
        if e.index < 8:
            log.append(b"y", {})
    assert got == list(range(1, 13))


def test_read_many_matches_read_across_segments_deletes_and_gaps(tmp_path, monkeypatch):
    log = QueueLog.open(tmp_path / "q", tiny(segment_bytes=600), now=clock())
    for i in range(40):
        log.append(b"x" * (i % 7 * 10), {"n": str(i)})
    log.delete([5, 6, 20])
    assert len(segments(tmp_path / "q")) > 3     # runs are cut at segment ends
    asked = [0, *range(1, 45), 3, 2, 1, 7, 7]
    got = log.read_many(asked)
    assert got == [log.read(i) for i in asked]
    assert [e.index for e in got if e is not None][:6] == [1, 2, 3, 4, 7, 8]
    assert log.read_many([]) == []
    from qserve.storage import reads
    monkeypatch.setattr(reads, "_READ_RUN_BYTES", 50)   # runs cut short: same answers
    assert log.read_many(asked) == got
    log.close()


def test_index_pos_of_with_and_without_holes():
    from qserve.storage.index import EntryIndex
    ix = EntryIndex()
    assert ix.pos_of(1) is None
    dense = list(range(5, 15))
    holes = [3, 4, 8, 20, 21, 40]
    for rows in (dense, holes):
        ix = EntryIndex()
        for i in rows:
            ix.append(i, 0, 10, 0, 0)
        ix.kill(rows.index(rows[2]))
        for i in range(0, 45):
            want = rows.index(i) if i in rows and i != rows[2] else None
            assert ix.pos_of(i) == want, (rows, i)


def test_repeated_request_id_takes_one_slot(tmp_path):
    """A requestId put thousands of times stays O(1) to insert and find: the table keeps one slot per
    distinct requestId (the newest index) and chains the older copies; dead copies are unlinked."""
    log = QueueLog.open(tmp_path / "q")
    log.append(b"other", {"requestId": "other"})
    log.find_request_id("other")                        # build the table now: inserts go through it
    n = 5000
    for i in range(n):
        log.append(bytes([i % 256]), {"requestId": "same"})
    table = log._rids.table
    assert table.used == 2                               # "other" and "same": no slot per copy
    assert log.find_request_id("same").index == n + 1
    # deleting the newest copies falls back to the next older live one
    log.delete([n + 1, n])
    assert log.find_request_id("same").index == n - 1
    # a new copy unlinks the dead heads instead of chaining them
    e = log.append(b"new", {"requestId": "same"})
    assert log.find_request_id("same") == e
    assert n + 1 not in table.older and n not in table.older and table.older[e.index] == n - 1
    assert len(table.older) == n - 2
    # everything deleted but the oldest copy: found after a walk, and a rebuild keeps only live links
    log.delete(range(3, e.index + 1))
    assert log.find_request_id("same").index == 2 and log.find_request_id("other").index == 1
    rebuilt = RidTable.of(log._index)
    assert sorted(rebuilt.items()) == sorted([(rid_hash("other"), 1), (rid_hash("same"), 2)])
    assert not rebuilt.older
    log.close()
    log = QueueLog.open(tmp_path / "q")                 # rebuilt from disk: same answers
    assert log.find_request_id("same").index == 2 and log.find_request_id("other").index == 1
    assert len(log._request_ids().table.older) == 0
    log.close()


class _CountingArray(array):
    """An array that counts element reads (to measure how many rows a scan steps over)."""

    reads = 0

    def __getitem__(self, i):
        _CountingArray.reads += 1
        return super().__getitem__(i)


@pytest.mark.parametrize("priority", [0, 2])
def test_dispatch_steps_over_dead_rows_once(tmp_path, priority):
    """Draining a queue in dispatch order while its head stays pending (a consumer holds it) must
    not rescan the dead rows behind the head on every poll: skip links make each dead row cost O(1)
    amortised, so the whole drain reads O(n log n) elements, not O(n^2)."""
    log = QueueLog.open(tmp_path / "q")
    n = 3000
    for i in range(n):
        log.append(b"x", {}, priority=priority)
    ix = log._index
    ix.loc = _CountingArray("Q", ix.loc)
    for p, lv in list(ix.levels.items()):
        ix.levels[p] = _CountingArray("Q", lv)
    _CountingArray.reads = 0
    head = 1                                   # pending: every poll skips it, as the dispatcher does
    drained = []
    while True:
        nxt = next((i for i, _ in log.iter_dispatch() if i != head), None)
        if nxt is None:
            break
        log.delete([nxt])
        drained.append(nxt)
    assert drained == list(range(2, n + 1))
    assert list(log.iter_dispatch()) == [(head, priority)]
    # O(log n) reads per poll and delete (bisects) instead of one per dead row
    assert _CountingArray.reads < 60 * n, _CountingArray.reads
    log.close()


def test_skip_links_follow_purges_and_out_of_order_deletes(tmp_path):
    """Iteration stays exact while rows die out of order, levels are rebuilt and the index is
    purged between steps (the skip links are rebuilt for the new rows)."""
    log = QueueLog.open(tmp_path / "q")
    for i in range(1, 9001):
        log.append(b"x", {}, priority=i % 3)
    want = [(i, p) for p in (2, 1) for i in range(1, 9001) if i % 3 == p] + \
           [(i, 0) for i in range(1, 9001) if i % 3 == 0]
    it = log.iter_dispatch()
    got = [next(it) for _ in range(10)]
    # kill every other remaining entry, out of order, enough to make the next step purge
    doomed = [i for k, (i, _) in enumerate(want[10:]) if k % 3]
    version = log._index.version
    log.delete(sorted(doomed[1::2], reverse=True))
    log.delete(doomed[0::2])
    log._index.maybe_purge()
    assert log._index.version > version           # the rows were purged under the iterator
    got += list(it)
    alive = set(i for i, _ in want) - set(doomed)
    assert got == [x for x in want[:10]] + [x for x in want[10:] if x[0] in alive]
    assert list(log.iter_dispatch()) == [x for x in want if x[0] in alive]
    log.close()


def test_count_by_priority_from_memory(tmp_path):
    log = QueueLog.open(tmp_path / "q")
    for i in range(1, 301):
        log.append(b"x", {}, priority=i % 4)
    log.delete(range(1, 301, 3))
    log.truncate(40)

    def by_scan(p):
        return sum(1 for e in log.scan() if e.priority == p)
    assert [log.count(p) for p in range(5)] == [by_scan(p) for p in range(5)]
    assert log.count() == log.length == sum(by_scan(p) for p in range(4))
    log.close()


@pytest.mark.parametrize("pattern", ["prefix", "prefix+scattered", "random", "none", "all"])
def test_purge_keeps_exactly_the_live_rows(pattern):
    """`EntryIndex.purge` copies runs of live rows when they are few (a queue consumed in order) and
    filters by a mask otherwise; either way every column keeps exactly the live rows, in order, and
    lookups, priority levels and dispatch order match a rebuilt model."""
    rng = random.Random(pattern)
    ix = EntryIndex()
    n = 20_000
    for i in range(1, n + 1):
        ix.append(i, pack_loc(i // 5000, i * 10), 100 + i % 7, rng.choice([0, 0, 0, 3, -1]), i * 31)
    dead = {"prefix": lambda i: i <= n // 2,
            "prefix+scattered": lambda i: i <= n // 2 or rng.random() < 0.01,
            "random": lambda i: rng.random() < 0.5,
            "none": lambda i: False,
            "all": lambda i: True}[pattern]
    doomed = [i for i in range(1, n + 1) if dead(i)]
    for i in doomed:
        ix.kill(ix.pos_of(i))
    before = {i: (ix.loc[ix.pos_of(i)], ix.size[ix.pos_of(i)], ix.prio[ix.pos_of(i)], ix.rh[ix.pos_of(i)])
              for i in range(1, n + 1) if ix.pos_of(i) is not None}
    dispatch = list(ix.iter_dispatch())
    ix.purge()
    assert list(ix.idx) == sorted(before) and len(ix) == len(before)
    assert all(not v & DEAD for v in ix.loc)
    assert {i: (ix.loc[p], ix.size[p], ix.prio[p], ix.rh[p]) for p, i in enumerate(ix.idx)} == before
    assert list(ix.iter_dispatch()) == dispatch
    assert {p: list(lv) for p, lv in ix.levels.items() if len(lv)} == \
        {p: sorted(i for i, v in before.items() if v[2] == p) for p in {v[2] for v in before.values()} if p}


@pytest.mark.parametrize("rows_per_step", [32, 2])
def test_request_id_table_is_replaced_a_few_rows_per_append(tmp_path, monkeypatch, rows_per_step):
    """A full requestId table is replaced by a `RidBuilder` that copies a few rows per append while
    the old table keeps answering; every lookup during and after matches a model, across deletes,
    purges and repeated requestIds. With 2 rows per step the old table runs out of room first and
    the builder is finished at once."""
    monkeypatch.setattr(RidBuilder, "MIN_ROWS", 0)
    monkeypatch.setattr(RidBuilder, "ROWS_PER_STEP", rows_per_step)
    finished = []
    real_finish = RidBuilder.finish
    monkeypatch.setattr(RidBuilder, "finish", lambda self, ix: finished.append(1) or real_finish(self, ix))
    rng = random.Random(rows_per_step)
    log = QueueLog.open(tmp_path / "q")
    log.find_request_id("none")                   # build the (empty) table: appends go through it
    model: dict[str, list[int]] = {}              # requestId -> live indexes, oldest first
    table, swaps, lookups_while_building = log._rids.table, 0, 0
    for step in range(6000):
        rid = f"r{rng.randrange(step + 1)}" if rng.random() < 0.1 else f"u{step}"
        e = log.append(b"x", {"requestId": rid})
        model.setdefault(rid, []).append(e.index)
        if rng.random() < 0.6:                    # consume most, oldest first, some out of order
            live = [i for ixs in model.values() for i in ixs]
            victim = min(live) if rng.random() < 0.8 else rng.choice(live)
            log.delete([victim])
            for ixs in model.values():
                if victim in ixs:
                    ixs.remove(victim)
        if log._rids.table is not table:
            table, swaps = log._rids.table, swaps + 1
        if step % 7 == 0:
            lookups_while_building += log._rids.build is not None
            for probe in (rid, f"u{rng.randrange(step + 1)}", f"r{rng.randrange(step + 1)}"):
                got = log.find_request_id(probe)
                want = model.get(probe)
                assert (got.index if got else None) == (want[-1] if want else None), (step, probe)
    assert swaps >= 2 and lookups_while_building > 0
    assert bool(finished) == (rows_per_step == 2)
    log.close()
