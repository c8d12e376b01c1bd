"""QueueLog.read_ahead: a window's entries read before they are asked for, then served by `read_many`
from memory while they live; bounded by READ_AHEAD_BYTES; forgotten by a rollback."""

from __future__ import annotations

from qserve import storage
from qserve.storage import QueueLog

from ...helpers.storage import CountingIO, FaultyIO, failed_round


def filled(tmp_path, io, n: int, size: int = 10) -> tuple[QueueLog, list]:
    log = QueueLog.open(tmp_path / "q", fileio=io)
    return log, [log.append(b"%d" % i * size, {"requestId": f"r{i}"}) for i in range(n)]


def test_entries_read_ahead_are_served_from_memory_as_the_file_holds_them(tmp_path):
    io = CountingIO()
    log, entries = filled(tmp_path, io, 6)
    window = [e.index for e in entries[1:4]]
    ahead = log.read_ahead(window)
    assert ahead == entries[1:4]
    before = io.preads
    got = log.read_many(window)
    assert io.preads == before and got == entries[1:4]
    assert all(a is g for a, g in zip(ahead, got))   # the very objects read ahead
    # a batch that is partly read ahead reads only the rest, in the asked order
    got = log.read_many([entries[0].index, *window, entries[4].index])
    assert got == [entries[0], *entries[1:4], entries[4]] and io.preads == before + 2
    # the next read ahead replaces the last one
    log.read_ahead([entries[5].index])
    before = io.preads
    assert log.read_many(window) == entries[1:4] and io.preads > before
    log.close()


def test_a_deleted_or_truncated_entry_read_ahead_is_not_served(tmp_path):
    log, entries = filled(tmp_path, CountingIO(), 5)
    assert log.read_ahead([e.index for e in entries]) == entries
    log.delete([entries[1].index])
    log.truncate(entries[1].index + 1)   # removes entries[0] too
    assert log.read_many([e.index for e in entries]) == [None, None, *entries[2:]]
    # read ahead of gone entries reads nothing for them
    assert log.read_ahead([entries[0].index, entries[3].index, 999]) == [entries[3]]
    log.close()


def test_read_ahead_holds_at_most_its_byte_bound(tmp_path, monkeypatch):
    io = CountingIO()
    log, entries = filled(tmp_path, io, 8, size=100)   # records of ~100 bytes and more, all one size
    record = log._index.size[log._index.pos_of(entries[0].index)]
    monkeypatch.setattr(storage.log, "READ_AHEAD_BYTES", 4 * record - 1)
    ahead = log.read_ahead([e.index for e in entries])
    assert ahead == entries[:3]        # three records fit under the bound, the fourth would cross it
    before = io.preads
    assert log.read_many([e.index for e in entries[:3]]) == entries[:3] and io.preads == before
    assert log.read_many([entries[3].index]) == [entries[3]] and io.preads == before + 1
    monkeypatch.setattr(storage.log, "READ_AHEAD_BYTES", record - 1)
    assert log.read_ahead([entries[5].index]) == [] and log._ahead == {}   # one record too big: none
    log.close()


def test_a_rollback_forgets_the_entries_read_ahead(tmp_path):
    io = FaultyIO()
    log = QueueLog.open(tmp_path / "q", fileio=io)
    kept = log.append(b"kept", {})
    log.sync()
    ghost = log.append(b"ghost", {})
    assert log.read_ahead([kept.index, ghost.index]) == [kept, ghost]
    failed_round(log, io)
    assert log._ahead == {}
    assert log.read_many([kept.index, ghost.index]) == [kept, None]
    log.close()
