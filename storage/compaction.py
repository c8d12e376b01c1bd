"""Compaction: reclaim space held by sealed segments.

Strategy (see FORMAT.md "Compaction and space"): oldest first, a sealed segment with no live entries,
or whose live-bytes share is below ``compact_live_ratio``, is dropped after its live entries are
rewritten into the active segment (``moved=True``, same index) and every DELETE it holds that may still
kill a record in an older existing segment is carried forward. Then a CHECKPOINT without the segment is
written, the active segment fsynced, the file unlinked and the directory fsynced. A crash at any step
leaves a state recovery reads correctly (moved copies supersede originals; an unlisted file is removed).
This module holds that policy; the log does the writing, the index and the segment list, through the
few operations of `Compactable` (so compaction imports nothing of log.py). Runs on the owner thread.
"""

from __future__ import annotations

import os
import time
from typing import Protocol

from .errors import CorruptLog
from .fileio import FileIO
from .record import DeleteRecord, EntryRecord, ReadOutcome, iter_records
from .segment import Segment, io_error

__all__ = ["Compactable", "compact", "candidates"]


class _Config(Protocol):
    compact_live_ratio: float
    retain_seconds: float


class Compactable(Protocol):
    """What compaction needs of a log (`QueueLog` provides it): the policy is here, the mechanics
    of writing, the index and the segment list are the log's."""

    config: _Config       # a `LogConfig`
    io: FileIO

    @property
    def watermark(self) -> int: ...

    def sealed_segments(self) -> list[Segment]: ...

    def holds_live(self, seg: Segment, offset: int, index: int) -> bool: ...

    def move_forward(self, seg: Segment, r: EntryRecord) -> int: ...

    def carry_deletes(self, indexes: list[int]) -> None: ...

    def drop_segment(self, seg: Segment, moved_bytes: int) -> int: ...


def candidates(log: Compactable) -> list[Segment]:
    """Sealed segments worth dropping, oldest first; none last written within ``retain_seconds``
    (their records, deleted entries' included, are still read: the requestIds of a dedup window)."""
    ratio = log.config.compact_live_ratio
    found = [s for s in log.sealed_segments() if s.live_count == 0 or s.live_bytes < ratio * s.size]
    retain = log.config.retain_seconds
    if retain and found:
        newest = time.time() - retain
        found = [s for s in found if _mtime(s.path) < newest]
    return found


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def compact(log: Compactable, budget_bytes: int | None = None) -> int:
    reclaimed = work = 0
    for seg in candidates(log):
        if budget_bytes is not None and work >= budget_bytes:
            break
        work += seg.size
        reclaimed += _drop(log, seg)
    return reclaimed


def _needs_carry(log: Compactable, seg: Segment, index: int) -> bool:
    """May a record of ``index`` still sit in an existing segment older than ``seg``?"""
    if index < log.watermark:
        return False
    for s in log.sealed_segments():
        if s.base >= seg.base:
            return False
        if s.min_index and s.min_index <= index <= s.max_index:
            return True
    return False


def _drop(log: Compactable, seg: Segment) -> int:
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
                if log.holds_live(seg, off, r.index):
                    moved_bytes += log.move_forward(seg, r)
            elif isinstance(r, DeleteRecord):
                carried.extend(i for i in r.indexes if _needs_carry(log, seg, i))
        del buf
    if carried:
        log.carry_deletes(sorted(set(carried)))
    return log.drop_segment(seg, moved_bytes)
