"""QueueLog.read_many's newest entry: the one `append` returned, served without a read while it lives."""

from __future__ import annotations

from qserve.storage import QueueLog

from ...helpers.storage import CountingIO, FaultyIO, clock, failed_round


def test_the_newest_entry_asked_alone_is_served_from_memory_while_it_lives(tmp_path):
    io = CountingIO()
    log = QueueLog.open(tmp_path / "q", now=clock(), fileio=io)
    first = log.append(b"one", {"requestId": "r1"})
    newest = log.append(b"", {"requestId": "r2", "k": "\u00e9\u4e2d"}, priority=-3)
    before = io.preads
    assert log.read_many([newest.index])[0] is newest and io.preads == before
    # not alone, or not the newest: read from the file, as before
    assert log.read_many([first.index, newest.index]) == [first, newest] and io.preads > before
    before = io.preads
    assert log.read_many([first.index]) == [first] and io.preads > before
    # what is served from memory is what the file holds
    log.sync()
    log.close()
    reopened = QueueLog.open(tmp_path / "q")
    assert reopened.read_many([newest.index]) == [newest] and reopened.read(first.index) == first
    reopened.close()


def test_the_newest_entry_is_not_served_once_deleted_truncated_or_rolled_back(tmp_path):
    io = FaultyIO()
    log = QueueLog.open(tmp_path / "q", fileio=io)
    e = log.append(b"a", {})
    log.delete([e.index])
    assert log.read_many([e.index]) == [None]
    e = log.append(b"b", {})
    log.truncate(e.index + 1)
    assert log.read_many([e.index]) == [None]
    log.sync()
    e = log.append(b"c", {})
    failed_round(log, io)
    assert log.read_many([e.index]) == [None] and e.index not in log
    log.close()
