"""Recovery: rebuild the in-memory state of a queue directory by scanning every segment.

Strategy (Kafka's LogLoader, etcd's repair): read each segment whole and walk its frames in log order,
handing them to a `replay.Replay` (the rules of what is live), runs of plain ENTRY records through
record.py's fast decoder, everything else decoded one frame at a time. What is recovery's own is the
files: three outcomes per segment are told apart (record.py): a clean end (in the active segment
possibly followed by preallocated zeros, left in place); a torn tail, which only the active segment may
have and which is cut after a ``.broken`` copy; corruption, which is refused (``CorruptLog``) unless
``repair``, when the bad stretch is skipped, reported and the file rewritten without it. The last
CHECKPOINT lists the segments that must exist: a missing one is corruption, an unlisted one is a
leftover of compaction and is removed. The index is derived here and never persisted.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass, field

from .errors import CorruptLog
from .fileio import FileIO
from .index import EntryIndex
from .record import CheckpointRecord, classify_bad_frame, decode_frame, encode_checkpoint
from .replay import Replay
from .segment import Segment, parse_segment_name, segment_name

__all__ = ["RecoveryReport", "Recovered", "recover"]


@dataclass
class RecoveryReport:
    """What recovery found and did. ``skipped`` holds ``(file, offset, reason)`` per skipped stretch
    (repair mode) and per missing segment."""

    truncated_bytes: int = 0
    preallocated_bytes: int = 0     # zeros after the active segment's last record (not damage)
    broken_files: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    removed: list = field(default_factory=list)
    entries: int = 0
    seconds: float = 0.0

    @property
    def repaired(self) -> bool:
        return bool(self.skipped or self.missing)


class Recovered:
    """Everything the log needs after recovery."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.index = EntryIndex()
        self.next_index = 1
        self.watermark = 0
        self.state: dict[str, str] = {}
        self.expected: tuple | None = None   # ``segs`` of the last checkpoint
        self.report = RecoveryReport()
        self.needs_checkpoint = False


def _broken_copy(io: FileIO, path: str, data: bytes) -> str:
    dst = path + ".broken"
    n = 1
    while io.exists(dst):
        dst = f"{path}.broken.{n}"
        n += 1
    io.write_file_atomic(dst, data)
    return dst


class _Scan:
    """Walks the segments' frames in log order for `recover`: plain ENTRY runs and every other record
    go to the `Replay`; bad frames are told apart (torn tail, corruption) and cut or skipped."""

    def __init__(self, rec: Recovered, repair: bool) -> None:
        self.rec = rec
        self.repair = repair
        self.replay = Replay()
        self.logical_end = 0   # of the segment last scanned: where its records end

    def scan_segment(self, seg: Segment, buf: bytes, is_last: bool, trusted: bool):
        """Apply every record of ``seg``. ``trusted``: the whole file matched its seal, so per-record
        crc32 is skipped. Returns None, or ``(content, torn_only)`` when the file must be cut (torn
        tail only) or rewritten (repair)."""
        report, replay = self.rec.report, self.replay
        sid = seg.sid
        n = self.logical_end = len(buf)   # ``logical_end``: less when a zero tail follows the records
        off = shift = span_start = 0
        keep: list[tuple[int, int]] = []   # good spans (cut / repair)
        first = True
        prefix = b""
        repaired = False
        while off < n:
            if not first:
                off = replay.entry_run(sid, buf, off, not trusted, shift)
                if off >= n:
                    break
            res = decode_frame(buf, off)
            if isinstance(res, str):
                outcome = classify_bad_frame(buf, off, res, seg.path)
                if outcome.kind == "torn" and is_last:
                    if outcome.zero_filled:       # preallocated space: the file stays as it is
                        report.preallocated_bytes += n - off
                        self.logical_end = off
                    else:
                        report.truncated_bytes += n - off
                    n = off
                    break
                why = res if outcome.kind == "corrupt" else f"torn tail in a sealed segment: {outcome.reason}"
                if not self.repair:
                    raise CorruptLog(seg.path, off, why)
                report.skipped.append((seg.path, off, why))
                repaired = True
                keep.append((span_start, off))
                shift += outcome.resume - off
                off = span_start = outcome.resume
                continue
            r, end = res
            if first and not (isinstance(r, CheckpointRecord) and r.base == seg.base):
                if not self.repair:
                    raise CorruptLog(seg.path, off, "segment does not start with its checkpoint")
                report.skipped.append((seg.path, off, "segment does not start with its checkpoint"))
                # give the rewritten file a header carrying the state reached so far
                prefix = encode_checkpoint(CheckpointRecord(
                    seg.base, 0, max(replay.next_index, replay.last_row + 1), replay.watermark,
                    dict(replay.state), tuple(replay.expected or ()) + (seg.base,), "repair"))
                shift -= len(prefix)
                repaired = True
            if first:
                seg.header_size = end - off
            first = False
            replay.apply(sid, off - shift, end - off, r)
            off = end
        keep.append((span_start, n))
        if repaired or n < self.logical_end:
            mv = memoryview(buf)
            cleaned = prefix + b"".join(bytes(mv[a:b]) for a, b in keep if b > a)
            return cleaned, not repaired
        return None

    def finish(self) -> None:
        """The replay's results into ``rec`` and its segments."""
        replay, rec = self.replay, self.rec
        replay.finish()
        rec.index, rec.next_index, rec.watermark = replay.index, replay.next_index, replay.watermark
        rec.state, rec.expected = replay.state, replay.expected
        for seg in rec.segments:
            t = replay.tallies.get(seg.sid)
            if t is not None:
                seg.live_count, seg.live_bytes, seg.deletes = t.live_count, t.live_bytes, t.deletes
                seg.min_index, seg.max_index = t.min_index, t.max_index


def _seals(io: FileIO, directory: str, bases: list) -> dict:
    """Seals listed by the active segment's header: ``{base: (size, crc)}``."""
    if not bases:
        return {}
    path = os.path.join(directory, segment_name(bases[-1]))
    try:
        head = io.read_head(path, 1 << 20)
    except OSError:
        return {}
    res = decode_frame(head, 0)
    if isinstance(res, str) or not isinstance(res[0], CheckpointRecord):
        return {}
    return {b: (size, crc) for b, size, crc in res[0].seals}


def recover(directory: str, io: FileIO, repair: bool = False, sync: bool = True) -> Recovered:
    """Scan ``directory`` (created if missing) and rebuild the state. Raises ``CorruptLog``.

    ``sync``: fsync the active segment (it may hold bytes an earlier process never fsynced); off when
    reloading after an fsync failure, where everything left on disk was fsynced before."""
    t0 = time.perf_counter()
    io.makedirs(directory)
    rec = Recovered()
    report = rec.report
    names = io.listdir(directory)
    for name in names:
        if name.endswith(".seg.tmp"):
            io.remove(os.path.join(directory, name))
    bases = sorted(b for b in (parse_segment_name(nm) for nm in names) if b is not None)
    scan = _Scan(rec, repair)
    seals = _seals(io, directory, bases)
    for k, base in enumerate(bases):
        path = os.path.join(directory, segment_name(base))
        is_last = k == len(bases) - 1
        buf = io.read_file(path)
        fd = io.open_rw(path)
        seg = Segment(io, directory, base, k, fd, len(buf))
        rec.segments.append(seg)
        crc = zlib.crc32(buf)
        trusted = not is_last and seals.get(base) == (len(buf), crc)
        res = scan.scan_segment(seg, buf, is_last, trusted)
        if res is None and scan.logical_end < len(buf):     # records, then preallocated zeros
            seg.size = seg.durable_size = scan.logical_end
            crc = zlib.crc32(memoryview(buf)[:seg.size])
        if res is not None:
            cleaned, torn_only = res
            report.broken_files.append(_broken_copy(io, path, buf))
            if not cleaned:                              # nothing valid left, not even the header
                seg.close()
                io.remove(path)
                io.fsync_dir(directory)
                rec.segments.remove(seg)
                continue
            if torn_only:
                io.truncate(fd, len(cleaned))            # torn tail: cut
                io.fsync(fd)
            else:
                io.close(fd)
                io.write_file_atomic(path, cleaned)      # repair: rewrite without the bad stretches
                fd = seg.fd = io.open_rw(path)
                rec.needs_checkpoint = True
            seg.size = seg.durable_size = seg.allocated = len(cleaned)
            crc = zlib.crc32(cleaned)
        seg.crc = crc
        del buf, res
    scan.finish()
    _check_set(rec, directory, io, repair)
    # the active segment may hold bytes the previous process wrote but never fsynced
    if rec.segments and sync:
        io.fsync(rec.segments[-1].fd)
    report.entries = rec.index.live
    report.seconds = time.perf_counter() - t0
    return rec


def _check_set(rec: Recovered, directory: str, io: FileIO, repair: bool) -> None:
    """Compare the segments present with the last checkpoint's list."""
    report = rec.report
    if rec.expected is None:
        return
    present = {s.base for s in rec.segments}
    for base in sorted(set(rec.expected) - present):
        path = os.path.join(directory, segment_name(base))
        if not repair:
            raise CorruptLog(path, 0, "segment missing (listed by the last checkpoint)")
        report.missing.append(path)
        report.skipped.append((path, 0, "segment missing"))
        rec.needs_checkpoint = True
    expected = set(rec.expected)
    for seg in list(rec.segments[:-1]):
        if seg.base not in expected and seg.live_count == 0:
            seg.close()
            io.remove(seg.path)
            report.removed.append(seg.path)
            rec.segments.remove(seg)
    if report.removed:
        io.fsync_dir(directory)
