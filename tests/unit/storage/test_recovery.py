"""Damage scenarios: write -> damage -> detect -> repair -> reread -> append -> reread."""

from __future__ import annotations

import os
import shutil

import pytest

from qserve.storage import CorruptLog, LogConfig, QueueLog, iter_records
from qserve.storage.record import ReadOutcome

from ...helpers.storage import corrupt, cut, segments, snapshot, tiny, zero_tail


def fill(d, n=40, config=None):
    log = QueueLog.open(d, config or tiny())
    for i in range(1, n + 1):
        log.append(bytes([i]) * 60, {"requestId": f"r{i}"}, priority=i % 2)
    log.close()


def record_offsets(path):
    return [off for off, r in iter_records(path) if not isinstance(r, ReadOutcome)]


def entries(log):
    return [(e.index, e.data) for e in log.scan()]


def expect(indexes):
    return [(i, bytes([i]) * 60) for i in indexes]


def check_append_reread(d, config, want_first_new):
    log = QueueLog.open(d, config)
    before = entries(log)
    e = log.append(b"new", {"requestId": "new"})
    assert e.index >= want_first_new
    log.close()
    log = QueueLog.open(d, config)
    assert log.recovery.truncated_bytes == 0 and not log.recovery.skipped
    assert entries(log) == before + [(e.index, b"new")]
    assert log.find_request_id("new").index == e.index
    log.close()


def test_cut_at_every_byte_of_last_record(tmp_path):
    src = tmp_path / "src"
    fill(src, 12, LogConfig())
    (seg,) = segments(src)
    offs = record_offsets(seg)
    last, end = offs[-1], seg.stat().st_size
    for n in range(last + 1, end):
        d = tmp_path / f"cut{n}"
        shutil.copytree(src, d)
        cut(d / seg.name, n)
        remnant = (d / seg.name).read_bytes()[last:]
        log = QueueLog.open(d)
        r = log.recovery
        if remnant.count(0) == len(remnant):
            # only the zero high bytes of the record's length landed: indistinguishable from
            # preallocated space, and just as empty of data
            assert r.preallocated_bytes == n - last and not r.truncated_bytes and not r.broken_files
        else:
            assert r.truncated_bytes == n - last and len(r.broken_files) == 1
            assert os.path.getsize(r.broken_files[0]) == n
            assert os.path.getsize(d / seg.name) == last
        assert entries(log) == expect(range(1, 12))
        log.close()
        assert os.path.getsize(d / seg.name) == last   # a clean close leaves no zero tail either
        check_append_reread(d, LogConfig(), 12)


def test_flipped_byte_in_middle_is_corruption(tmp_path):
    fill(tmp_path)
    segs = segments(tmp_path)
    victim = segs[1]                       # a sealed segment
    offs = record_offsets(victim)
    corrupt(victim, offs[2] + 20)          # inside the body of its third record
    with pytest.raises(CorruptLog) as ei:
        QueueLog.open(tmp_path, tiny())
    assert ei.value.path == str(victim) and ei.value.offset == offs[2]
    # repair: skip it, report it, keep everything else
    log = QueueLog.open(tmp_path, tiny(repair=True))
    r = log.recovery
    assert r.skipped and r.skipped[0][:2] == (str(victim), offs[2])
    assert any(p.endswith(".broken") for p in r.broken_files)
    got = [i for i, _ in entries(log)]
    assert len(got) == 39 and got == sorted(got)
    lost = (set(range(1, 41)) - set(got)).pop()
    assert entries(log) == expect(i for i in range(1, 41) if i != lost)
    log.close()
    check_append_reread(tmp_path, tiny(), 41)


def test_flipped_byte_in_active_segment_before_tail(tmp_path):
    fill(tmp_path)
    active = segments(tmp_path)[-1]
    offs = record_offsets(active)
    assert len(offs) >= 3
    corrupt(active, offs[1] + 5)
    with pytest.raises(CorruptLog) as ei:
        QueueLog.open(tmp_path, tiny())
    assert ei.value.path == str(active) and ei.value.offset == offs[1]
    log = QueueLog.open(tmp_path, tiny(repair=True))
    assert log.recovery.skipped and log.length == 39
    log.close()
    check_append_reread(tmp_path, tiny(), 41)


def test_zero_filled_tail(tmp_path):
    fill(tmp_path)
    active = segments(tmp_path)[-1]
    zero_tail(active, 4096)
    size = active.stat().st_size
    log = QueueLog.open(tmp_path, tiny())
    # zeros after the last record of the active segment are what preallocation leaves after a
    # crash (and what a file system that extended the file but lost the data shows): read as
    # unused space, reported, kept in place (no .broken copy), overwritten by the next append
    r = log.recovery
    assert r.preallocated_bytes == 4096 and not r.truncated_bytes and not r.skipped and not r.broken_files
    assert active.stat().st_size == size
    assert entries(log) == expect(range(1, 41))
    log.close()
    assert active.stat().st_size == size - 4096    # a clean close trims it
    check_append_reread(tmp_path, tiny(), 41)


@pytest.mark.parametrize("damage", ["zero-filled tail", "torn end"])
def test_damaged_end_of_a_sealed_segment_is_corruption(tmp_path, damage):
    """Only the active segment may end in a torn record or in zeros (preallocated space): in a
    sealed one either is damage, refused until repaired."""
    fill(tmp_path)
    sealed = segments(tmp_path)[0]
    if damage == "zero-filled tail":
        zero_tail(sealed, 100)
    else:
        cut(sealed, sealed.stat().st_size - 3)
    with pytest.raises(CorruptLog) as ei:
        QueueLog.open(tmp_path, tiny())
    assert ei.value.path == str(sealed)
    log = QueueLog.open(tmp_path, tiny(repair=True))
    if damage == "zero-filled tail":
        assert "zero-filled" in ei.value.reason
        assert log.length == 40 and log.recovery.skipped
    else:
        assert log.length == 39
    log.close()
    check_append_reread(tmp_path, tiny(), 41)


def test_missing_segment(tmp_path):
    fill(tmp_path)
    segs = segments(tmp_path)
    assert len(segs) >= 3
    gone = segs[1]
    lost = {i for i, r in ((r.index, r) for _, r in iter_records(gone) if hasattr(r, "index"))}
    os.remove(gone)
    with pytest.raises(CorruptLog) as ei:
        QueueLog.open(tmp_path, tiny())
    assert ei.value.path == str(gone) and "missing" in ei.value.reason
    log = QueueLog.open(tmp_path, tiny(repair=True))
    assert log.recovery.missing == [str(gone)]
    assert entries(log) == expect(i for i in range(1, 41) if i not in lost)
    log.close()
    check_append_reread(tmp_path, tiny(), 41)


def test_damaged_header(tmp_path):
    fill(tmp_path)
    seg = segments(tmp_path)[1]
    corrupt(seg, 10)
    with pytest.raises(CorruptLog) as ei:
        QueueLog.open(tmp_path, tiny())
    assert ei.value.offset == 0
    log = QueueLog.open(tmp_path, tiny(repair=True))
    assert log.length == 40            # only the checkpoint was lost
    log.close()
    check_append_reread(tmp_path, tiny(), 41)


def test_leftover_tmp_and_unlisted_segment(tmp_path):
    fill(tmp_path)
    (tmp_path / "00000000000000099999.seg.tmp").write_bytes(b"junk")
    log = QueueLog.open(tmp_path, tiny())
    want = snapshot(log)
    log.close()
    assert not (tmp_path / "00000000000000099999.seg.tmp").exists()
    # a segment compaction already dropped (crash before the unlink) is removed unread
    log = QueueLog.open(tmp_path, tiny())
    assert snapshot(log) == want        # the leftover temp file changed nothing
    log.truncate(15)
    first = segments(tmp_path)[0]
    keep = first.read_bytes()
    log.maybe_compact()
    log.close()
    assert not first.exists()
    first.write_bytes(keep)
    log = QueueLog.open(tmp_path, tiny())
    assert str(first) in log.recovery.removed and not first.exists()
    assert [e.index for e in log.scan()] == list(range(15, 41))
    log.close()


def test_copy_of_a_running_log_reopens_with_its_preallocated_tail(tmp_path):
    """What a crash leaves: the active segment ends with the zeros written ahead of appends. They
    are no damage: reopen keeps every record and the file, and the next append lands right after
    the last record (over the zeros)."""
    log = QueueLog.open(tmp_path / "live", tiny(segment_bytes=1 << 20, preallocate_bytes=8192))
    for i in range(1, 11):
        log.append(bytes([i]) * 60, {"requestId": f"r{i}"}, priority=i % 2)
    log.sync()
    shutil.copytree(tmp_path / "live", tmp_path / "copy")
    log.close()
    d = tmp_path / "copy"
    (active,) = segments(d)
    size = active.stat().st_size
    end = record_offsets(active)[-1]
    log = QueueLog.open(d, tiny(segment_bytes=1 << 20, preallocate_bytes=8192))
    r = log.recovery
    assert r.preallocated_bytes == size - log.bytes_on_disk > 0
    assert not r.truncated_bytes and not r.broken_files and active.stat().st_size == size
    assert entries(log) == expect(range(1, 11))
    e = log.append(b"new", {})
    assert e.index == 11 and record_offsets(active)[-1] > end and active.stat().st_size == size
    log.close()
    check_append_reread(d, tiny(), 12)
