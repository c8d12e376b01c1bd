"""Disk faults injected through a FileIO subclass: ENOSPC, short writes, fsync failures."""

from __future__ import annotations

import threading

import pytest

from qserve.storage import DiskFull, LogConfig, QueueLog, StorageIOError

from ...helpers.storage import EIO, ENOSPC, FaultyIO, crash, segments, snapshot, tiny


def test_enospc_on_write_changes_nothing(tmp_path):
    io = FaultyIO()
    log = QueueLog.open(tmp_path, tiny(), fileio=io)
    for i in range(5):
        log.append(b"a" * 50, {"requestId": f"r{i}"})
    before, size, seq = snapshot(log), log.bytes_on_disk, log.appended_seq
    io.write_errno = ENOSPC
    with pytest.raises(DiskFull):
        log.append(b"b" * 50, {"requestId": "x"})
    with pytest.raises(DiskFull):
        log.delete([1])
    with pytest.raises(DiskFull):
        log.set_state(state="End")
    assert snapshot(log) == before and log.bytes_on_disk == size and log.appended_seq == seq
    assert sum(p.stat().st_size for p in segments(tmp_path)) == size
    assert log.read(3).data == b"a" * 50 and log.find_request_id("r4").index == 5
    io.write_errno = None
    e = log.append(b"c", {"requestId": "x"})
    assert e.index == 6
    log.close()
    log = QueueLog.open(tmp_path, tiny())
    assert [x.index for x in log.scan()] == [1, 2, 3, 4, 5, 6] and log.recovery.truncated_bytes == 0


def test_enospc_on_roll(tmp_path):
    io = FaultyIO()
    log = QueueLog.open(tmp_path, tiny(), fileio=io)
    while len(segments(tmp_path)) == 1:
        log.append(b"a" * 100, {})
    n = len(segments(tmp_path))
    # fill the new active segment up to just before the next roll, then fail the roll
    io.write_errno = ENOSPC
    with pytest.raises(DiskFull):
        for _ in range(100):
            log.append(b"a" * 100, {})
    io.write_errno = None
    log.append(b"z", {})
    assert len(segments(tmp_path)) >= n
    want = snapshot(log)
    log.close()
    assert snapshot(QueueLog.open(tmp_path, tiny())) == want


def test_short_write(tmp_path):
    io = FaultyIO()
    log = QueueLog.open(tmp_path, fileio=io)
    log.append(b"a" * 50, {})
    size = log.bytes_on_disk
    io.short_write = True
    with pytest.raises(StorageIOError) as ei:
        log.append(b"b" * 50, {})
    assert not isinstance(ei.value, DiskFull)
    assert segments(tmp_path)[0].stat().st_size == size and log.next_index == 2
    io.short_write = False
    assert log.append(b"c", {}).index == 2
    log.close()
    log = QueueLog.open(tmp_path)
    assert [(e.index, e.data) for e in log.scan()] == [(1, b"a" * 50), (2, b"c")]


def test_fsync_failure_rolls_back(tmp_path):
    io = FaultyIO()
    log = QueueLog.open(tmp_path, fileio=io)
    for i in range(3):
        log.append(b"durable", {"requestId": f"d{i}"})
    log.sync()
    durable = snapshot(log)
    seq = log.durable_seq
    # not durable: appends, a delete and a state change
    log.append(b"lost", {"requestId": "lost"})
    log.delete([1])
    t = log.sync_begin()
    log.set_state(state="End")          # written while the fsync runs: rolled back too
    io.fsync_errno = EIO
    th = threading.Thread(target=lambda: pytest.raises(OSError, t.run))
    th.start()
    th.join()
    io.fsync_errno = None
    with pytest.raises(StorageIOError) as ei:
        log.sync_end(t)
    assert ei.value.rolled_back == (seq + 1, seq + 3)
    assert log.durable_seq == seq + 3 and log.appended_seq == seq + 4   # + the rollback checkpoint
    assert snapshot(log)["entries"] == durable["entries"] and log.state == {}
    assert log.find_request_id("lost") is None and 1 in log
    # the rolled-back index is not handed out again, now or after a restart
    e = log.append(b"after", {})
    assert e.index == 5
    log.sync()
    log.close()
    log = QueueLog.open(tmp_path)
    assert [x.data for x in log.scan()] == [b"durable"] * 3 + [b"after"]
    assert log.append(b"x", {}).index == 6


def test_fsync_failure_in_sync_and_roll(tmp_path):
    io = FaultyIO()
    log = QueueLog.open(tmp_path, tiny(), fileio=io)
    log.append(b"a", {})
    log.sync()
    log.append(b"b", {})
    io.fsync_errno = EIO
    with pytest.raises(StorageIOError):
        log.sync()
    assert [e.data for e in log.scan()] == [b"a"]
    # a roll fsyncs the old segment: failing it rolls back too
    with pytest.raises(StorageIOError):
        for _ in range(100):
            log.append(b"c" * 100, {})
    io.fsync_errno = None
    assert [e.data for e in log.scan()] == [b"a"]
    for _ in range(40):
        log.append(b"d" * 100, {})
    log.sync()
    want = snapshot(log)
    log.close()
    assert snapshot(QueueLog.open(tmp_path, tiny())) == want


class CrashBeforeUnlink(FaultyIO):
    def remove(self, path):
        if path.endswith(".seg"):
            raise OSError(EIO, "simulated crash before unlink")
        super().remove(path)


def test_compaction_interrupted_before_unlink(tmp_path):
    io = CrashBeforeUnlink()
    log = QueueLog.open(tmp_path, tiny(), fileio=io)
    for i in range(60):
        log.append(bytes([i]) * 100, {"requestId": f"r{i}"})
    log.delete(range(1, 50))
    want = snapshot(log)
    n = len(segments(tmp_path))
    with pytest.raises(StorageIOError):
        log.maybe_compact()
    # the moved copies and checkpoint are durable, the old file is still there
    assert len(segments(tmp_path)) == n
    crash(log)
    log = QueueLog.open(tmp_path, tiny())
    assert snapshot(log) == want
    assert log.recovery.removed, "the unlisted segment should have been removed on open"
    log.maybe_compact()
    log.close()
    assert snapshot(QueueLog.open(tmp_path, tiny())) == want


def test_preallocation_is_trimmed_and_refused_cleanly(tmp_path):
    """The active segment's file runs ahead of its records (zeros written in chunks); a roll trims
    the sealed segment to its seal and a close trims the active one; a full disk refuses the chunk
    before any record byte is written."""
    io = FaultyIO()
    cfg = tiny(preallocate_bytes=1000)
    log = QueueLog.open(tmp_path, cfg, fileio=io)
    log.append(b"a" * 50, {})
    (active,) = segments(tmp_path)
    grown = active.stat().st_size
    assert grown == log._active.header_size + 1000 > log.bytes_on_disk
    assert active.read_bytes()[log.bytes_on_disk:] == bytes(grown - log.bytes_on_disk)
    while len(segments(tmp_path)) < 3:
        log.append(b"b" * 50, {})
    sealed = segments(tmp_path)[:-1]
    assert [p.stat().st_size for p in sealed] == [s.size for s in log._segs[:-1]]
    # fill the active segment's preallocated chunk, then the disk is full for the next one
    seg = log._active
    while seg.size + 200 <= seg.allocated:
        log.append(b"c" * 50, {})
    before, on_disk, file_size = snapshot(log), log.bytes_on_disk, segments(tmp_path)[-1].stat().st_size
    io.write_errno = ENOSPC
    with pytest.raises(DiskFull):
        for _ in range(4):
            log.append(b"d" * 50, {})
    assert snapshot(log) == before and log.bytes_on_disk == on_disk
    assert segments(tmp_path)[-1].stat().st_size <= file_size
    io.write_errno = None
    e = log.append(b"e", {})
    log.close()
    assert [p.stat().st_size for p in segments(tmp_path)] == [s.size for s in log._segs]
    log = QueueLog.open(tmp_path, cfg)
    assert log.read(e.index).data == b"e" and not log.recovery.preallocated_bytes
    log.close()


def test_preallocation_grows_with_the_segment(tmp_path):
    """A small queue gets 64 KiB of zeros, a growing one chunks as large as its file, up to
    ``preallocate_bytes``."""
    log = QueueLog.open(tmp_path, LogConfig(preallocate_bytes=256 * 1024))
    log.append(b"a", {})
    sizes = [log._active.allocated]
    while len(sizes) < 6:
        log.append(b"b" * 4000, {})
        if log._active.allocated != sizes[-1]:
            sizes.append(log._active.allocated)
    header = log._active.header_size
    assert sizes[0] == header + 64 * 1024
    steps = [b - a for a, b in zip(sizes, sizes[1:])]
    assert steps == [sizes[0], 2 * sizes[0], 256 * 1024, 256 * 1024, 256 * 1024]
    log.close()


class ZeroWrites(FaultyIO):
    """Records the (offset, length) of every write of zeros only (the preallocation's)."""

    def __init__(self) -> None:
        super().__init__()
        self.zeros: list[tuple[int, int]] = []

    def pwrite(self, fd, data, offset):
        if not any(bytes(data)):
            self.zeros.append((offset, len(data)))
        return super().pwrite(fd, data, offset)


def test_preallocation_writes_zeros_a_page_at_a_time(tmp_path):
    """The zeros go in pieces of at most 4 KiB that never cross a 4 KiB boundary (one large write
    puts large folios in the page cache, which make every later small append dearer:
    storage/segment.py), one after the other from the end of the file to the new allocation."""
    io = ZeroWrites()
    log = QueueLog.open(tmp_path, LogConfig(preallocate_bytes=256 * 1024), fileio=io)
    log.append(b"a", {})
    while log._active.allocated < 600 * 1024:
        log.append(b"b" * 4000, {})
    zeros = io.zeros
    assert len(zeros) > 140   # 600 KiB of zeros at most 4 KiB a piece
    assert all(0 < n <= 4096 and offset // 4096 == (offset + n - 1) // 4096 for offset, n in zeros)
    assert all(offset == prev + n for (prev, n), (offset, _) in zip(zeros, zeros[1:]))
    assert zeros[-1][0] + zeros[-1][1] == log._active.allocated
    assert zeros[0][0] == log._active.header_size   # the first chunk: right after the new segment's header
    log.close()


def test_no_preallocation(tmp_path):
    log = QueueLog.open(tmp_path, tiny(preallocate_bytes=0))
    for i in range(30):
        log.append(b"a" * 50, {})
        assert sum(p.stat().st_size for p in segments(tmp_path)) == log.bytes_on_disk
    log.close()
