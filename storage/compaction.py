"""Compaction: reclaim space held by sealed segments.

Strategy (see FORMAT.md "Compaction and space"): oldest first, a sealed segment with no live entries,
or whose live-bytes share is below ``compact_live_ratio``, is dropped after its live entries are
rewritten into the active segment (``moved=True``, same index) and every DELETE it holds that may still
kill a record in an older existing segment is carried forward. Then a CHECKPOINT without the segment is
written, the active segment fsynced, the file unlinked and the directory fsynced. A crash at any step
leaves a state recovery reads correctly (moved copies supersede originals; an unlisted file is removed).
Runs on the owner thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import CorruptLog
from .index import pack_loc
from .record import (DeleteRecord, EntryRecord, ReadOutcome, encode_checkpoint, encode_delete,
                     encode_entry, iter_records)
from .segment import Segment, io_error

if TYPE_CHECKING:
    from .log import QueueLog

__all__ = ["compact", "candidates"]


def candidates(log: "QueueLog") -> list[Segment]:
    ratio = log.config.compact_live_ratio
    return [s for s in log._segs[:-1] if s.live_count == 0 or s.live_bytes < ratio * s.size]


def compact(log: "QueueLog", budget_bytes: int | None = None) -> int:
    reclaimed = work = 0
    for seg in candidates(log):
        if budget_bytes is not None and work >= budget_bytes:
            break
        work += seg.size
        reclaimed += _drop(log, seg)
    return reclaimed


def _needs_carry(log: "QueueLog", seg: Segment, index: int) -> bool:
    """May a record of ``index`` still sit in an existing segment older than ``seg``?"""
    if index < log._watermark:
        return False
    for s in log._segs:
        if s.base >= seg.base:
            return False
        if s.min_index and s.min_index <= index <= s.max_index:
            return True
    return False


def _drop(log: "QueueLog", seg: Segment) -> int:
    ix = log._index
    moved_bytes = 0
    carried: list[int] = []
    if seg.live_count or seg.deletes:
        try:
            buf = log.io.read_file(seg.path)
        except OSError as exc:
            raise io_error(exc, f"reading {seg.path}") from None
        for off, r in iter_records(buf, path=seg.path):
            if isinstance(r, ReadOutcome):
                if r.kind != "clean":
                    raise CorruptLog(seg.path, r.offset, r.reason)
                break
            if isinstance(r, EntryRecord):
                pos = ix.pos_of(r.index)
                if pos is None or ix.loc[pos] != pack_loc(seg.sid, off):
                    continue
                rec = encode_entry(r.index, r.priority, r.timestamp_ms, r.tags, r.data, moved=True)
                dst, doff = log._write(rec)
                ix.move(pos, pack_loc(dst.sid, doff), len(rec))
                dst.note_entry(r.index, len(rec))
                seg.live_bytes -= len(rec)
                seg.live_count -= 1
                moved_bytes += len(rec)
            elif isinstance(r, DeleteRecord):
                carried.extend(i for i in r.indexes if _needs_carry(log, seg, i))
        del buf
    if carried:
        dst, _ = log._write(encode_delete(sorted(set(carried))))
        dst.deletes += 1
    segs = [s.base for s in log._segs if s is not seg]
    # the checkpoint may itself roll: compute its list after that
    rec = encode_checkpoint(log._checkpoint("compact", segs=segs))
    dst, _ = log._write(rec)
    if dst is not log._active or dst.base not in segs:
        segs = [s.base for s in log._segs if s is not seg]
        log._write(encode_checkpoint(log._checkpoint("compact", segs=segs)))
    log._fsync_or_rollback(log._active)
    log._segs.remove(seg)
    del log._by_sid[seg.sid]
    size = seg.size
    seg.close()
    try:
        log.io.remove(seg.path)
        log.io.fsync_dir(log.path)
    except OSError as exc:
        raise io_error(exc, f"removing {seg.path}") from None
    log._counters["compactions"] += 1
    log._counters["reclaimed_bytes"] += size - moved_bytes
    return size - moved_bytes
