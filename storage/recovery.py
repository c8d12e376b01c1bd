"""Recovery: rebuild the in-memory state of a queue directory by scanning every segment.

Strategy (Kafka's LogLoader, etcd's repair): read each segment whole, walk its frames with a fast path
for ENTRY records (fixed-width prefix, one ``struct.unpack_from`` + crc, no msgpack decode), and apply
records in log order. Three outcomes per segment are told apart (record.py): a clean end (in the active
segment possibly followed by preallocated zeros, left in place); a torn tail,
which only the active segment may have and which is cut after a ``.broken`` copy; corruption, which is
refused (``CorruptLog``) unless ``repair``, when the bad stretch is skipped, reported and the file rewritten
without it. The last CHECKPOINT lists the segments that must exist: a missing one is corruption, an
unlisted one is a leftover of compaction and is removed. The index is derived here and never persisted.
"""

from __future__ import annotations

import os
import time
import zlib
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field

from .errors import CorruptLog
from .fileio import FileIO
from .index import DEAD, EntryIndex, loc_segment, pack_loc
from .record import (FRAMED_ENTRY_HEAD, FRAMED_ENTRY_HEAD_SIZE, HEADER_SIZE, REQUEST_ID,
                     CheckpointRecord, DeleteRecord, EntryRecord, StateRecord, TruncateRecord,
                     classify_bad_frame, decode_frame, encode_checkpoint)
from .segment import Segment, parse_segment_name, segment_name
from .rids import rid_hash

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
    """Mutable scan state shared by the per-segment loop."""

    def __init__(self, rec: Recovered, repair: bool) -> None:
        self.rec = rec
        self.repair = repair
        self.moved: dict[int, list] = {}  # index -> [loc, size, prio, rid_hash, live] (no row yet)
        self.by_sid: dict[int, Segment] = {}
        self.last_main = 0
        self.logical_end = 0   # of the segment last scanned: where its records end

    # -- record application (slow path; the ENTRY fast path is inlined in scan_segment) -----------
    def kill_index(self, i: int) -> None:
        ix = self.rec.index
        pos = ix.pos_of(i)
        if pos is not None:
            old = ix.kill(pos)
            seg = self.by_sid[loc_segment(old)]
            seg.live_bytes -= ix.size[pos]
            seg.live_count -= 1
            return
        m = self.moved.get(i)
        if m is not None and m[4]:
            m[4] = False
            seg = self.by_sid[loc_segment(m[0])]
            seg.live_bytes -= m[1]
            seg.live_count -= 1

    def truncate_below(self, below: int) -> None:
        rec = self.rec
        if below <= rec.watermark:
            return
        rec.watermark = below
        ix = rec.index
        p = ix.first_pos()
        end = bisect_left(ix.idx, below)
        while p is not None and p < end:
            if not ix.loc[p] & DEAD:
                self.kill_index(ix.idx[p])
            p += 1
        for i, m in self.moved.items():
            if i < below and m[4]:
                self.kill_index(i)

    def apply_entry(self, seg: Segment, loc: int, size: int, r: EntryRecord) -> None:
        rec = self.rec
        if r.index < rec.watermark:
            return
        h = rid_hash(r.tags[REQUEST_ID]) if REQUEST_ID in r.tags else 0
        if r.index >= rec.next_index:
            rec.next_index = r.index + 1
        ix = rec.index
        idx = ix.idx
        pos = bisect_left(idx, r.index)
        if pos < len(idx) and idx[pos] == r.index:       # a moved copy replaces the earlier one
            old = ix.loc[pos]
            if old & DEAD:                                # never resurrect a deleted entry
                return
            seg.note_entry(r.index, size)
            prev = self.by_sid[loc_segment(old)]
            prev.live_bytes -= ix.size[pos]
            prev.live_count -= 1
            ix.live -= 1
            ix.loc[pos] = loc
            ix.size[pos] = size
            ix.prio[pos] = r.priority
            ix.rh[pos] = h
            ix.live += 1
            return
        seg.note_entry(r.index, size)
        if pos == len(idx) and not r.moved:
            ix.append(r.index, loc, size, r.priority, h)
            return
        m = self.moved.get(r.index)
        if m is not None and m[4]:
            prev = self.by_sid[loc_segment(m[0])]
            prev.live_bytes -= m[1]
            prev.live_count -= 1
        self.moved[r.index] = [loc, size, r.priority, h, True]

    def apply(self, seg: Segment, loc: int, size: int, r) -> None:
        rec = self.rec
        if isinstance(r, EntryRecord):
            self.apply_entry(seg, loc, size, r)
        elif isinstance(r, DeleteRecord):
            seg.deletes += 1
            for i in r.indexes:
                self.kill_index(i)
        elif isinstance(r, TruncateRecord):
            self.truncate_below(min(r.below, rec.next_index))
        elif isinstance(r, StateRecord):
            rec.state.update(r.values)
        elif isinstance(r, CheckpointRecord):
            rec.next_index = max(rec.next_index, r.next_index)
            self.truncate_below(r.truncate_below)
            rec.state = dict(r.state)
            rec.expected = r.segments

    # -- one segment -------------------------------------------------------------------------------

    def _settle_fast_rows(self, seg, ix, rec, mark: int, fmin: int, last_main: int) -> int:
        """Account the rows the fast path appended since ``mark`` (live counts and bytes) and carry
        ``last_main`` into the next index; returns the segment's lowest new index so far."""
        idx = ix.idx
        if len(idx) > mark:
            fmin = fmin or idx[mark]
            added = len(idx) - mark
            seg.live_bytes += sum(ix.size[mark:])
            seg.live_count += added
            ix.live += added
        self.last_main = last_main
        if last_main >= rec.next_index:
            rec.next_index = last_main + 1
        return fmin
    def scan_segment(self, seg: Segment, buf: bytes, is_last: bool, trusted: bool):
        """Apply every record of ``seg``. ``trusted``: the whole file matched its seal, so per-record
        crc32 is skipped. Returns None, or ``(content, torn_only)`` when the file must be cut (torn
        tail only) or rewritten (repair)."""
        rec, report = self.rec, self.rec.report
        ix = rec.index
        n = self.logical_end = len(buf)   # ``logical_end``: less when a zero tail follows the records
        mv = memoryview(buf)
        unpack_head = FRAMED_ENTRY_HEAD.unpack_from
        crc32 = zlib.crc32
        levels = ix.levels
        a_idx, a_loc, a_size, a_prio, a_rh = ix.idx.append, ix.loc.append, ix.size.append, \
            ix.prio.append, ix.rh.append
        sidbits = pack_loc(seg.sid, 0)
        last_main = self.last_main
        watermark = rec.watermark
        fast_end = n - FRAMED_ENTRY_HEAD_SIZE
        off = shift = span_start = 0
        keep: list[tuple[int, int]] = []   # good spans (cut / repair)
        first = True
        prefix = b""
        repaired = False
        idx = ix.idx
        mark = len(idx)                    # rows added by the fast path since ``mark`` not yet counted
        fmin = 0
        while off < n:
            if not first:
                # fast path: not-moved ENTRYs whose requestId is nil or a str8 (uuid): fixed offsets
                while off <= fast_end:
                    length, crc, head, _, index, _, prio, _, _, moved, rm, rl = unpack_head(buf, off)
                    end = off + HEADER_SIZE + length
                    if head != 0x9800 or moved != 0xC2 or end > n or length <= 32 \
                            or index <= last_main or index < watermark:
                        break
                    if not trusted and crc32(mv[off + HEADER_SIZE:end]) != crc:
                        break
                    if rm == 0xD9:
                        a_rh(hash(buf[off + 40:off + 40 + rl]) or 1)
                    elif rm == 0xC0:
                        a_rh(0)
                    else:
                        break
                    a_idx(index)
                    a_loc(sidbits | (off - shift))
                    a_size(end - off)
                    a_prio(prio)
                    if prio:
                        lv = levels.get(prio)
                        if lv is None:
                            lv = levels[prio] = array("Q")
                        lv.append(index)
                    last_main = index
                    off = end
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
                    seg.base, 0, max(rec.next_index, last_main + 1), rec.watermark, dict(rec.state),
                    tuple(rec.expected or ()) + (seg.base,), "repair"))
                shift -= len(prefix)
                repaired = True
            if first:
                seg.header_size = end - off
            first = False
            # count the fast path's rows before the slow path touches shared state
            fmin = self._settle_fast_rows(seg, ix, rec, mark, fmin, last_main)
            self.apply(seg, sidbits | (off - shift), end - off, r)
            last_main = self.last_main = max(self.last_main, idx[-1] if idx else 0)
            watermark = rec.watermark
            mark = len(idx)
            off = end
        keep.append((span_start, n))
        fmin = self._settle_fast_rows(seg, ix, rec, mark, fmin, last_main)
        if fmin:
            if not seg.min_index or fmin < seg.min_index:
                seg.min_index = fmin
            seg.max_index = max(seg.max_index, last_main)
        if repaired or n < self.logical_end:
            cleaned = prefix + b"".join(bytes(mv[a:b]) for a, b in keep if b > a)
            return cleaned, not repaired
        return None


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
        scan.by_sid[k] = seg
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
    _merge_moved(rec, scan)
    _check_set(rec, directory, io, repair)
    # the active segment may hold bytes the previous process wrote but never fsynced
    if rec.segments and sync:
        io.fsync(rec.segments[-1].fd)
    ix = rec.index
    if ix.live < len(ix.idx) // 2 and len(ix.idx) > 4096:
        ix.purge()
    report.entries = ix.live
    report.seconds = time.perf_counter() - t0
    return rec


def _merge_moved(rec: Recovered, scan: _Scan) -> None:
    """Insert moved entries whose original copy is gone into the sorted columns."""
    if not scan.moved:
        return
    ix = rec.index
    old = (ix.idx, ix.loc, ix.size, ix.prio, ix.rh)
    ix.idx, ix.loc, ix.size, ix.prio = array("Q"), array("Q"), array("I"), array("q")
    rh = ix.rh = array("q")
    live = ix.live
    items = sorted(scan.moved.items())
    j = 0
    oidx = old[0]
    for pos in range(len(oidx) + 1):
        cur = oidx[pos] if pos < len(oidx) else None
        while j < len(items) and (cur is None or items[j][0] < cur):
            i, (loc, size, prio, h, alive) = items[j]
            j += 1
            if alive:
                ix.idx.append(i); ix.loc.append(loc); ix.size.append(size)
                ix.prio.append(prio); rh.append(h)
                live += 1
        if cur is None:
            break
        ix.idx.append(cur); ix.loc.append(old[1][pos]); ix.size.append(old[2][pos])
        ix.prio.append(old[3][pos]); rh.append(old[4][pos])
    ix.live = live
    ix.rebuild_levels()
    ix.version += 1


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
