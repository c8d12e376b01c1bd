"""Reading queue directories for `qserve log`: discovery, the record stream, replay and checks.

Strategy: nothing here knows the byte format. Segment files are read once each and handed to
``storage.iter_records(..., lenient=True)``, which yields typed records and ``ReadOutcome`` damage;
``read_segment`` turns that into ``Item``s carrying the byte span of each record or damaged stretch.
What is live is ``storage.replay.Replay``'s to say (the rules recovery applies; ``qserve log stats``
feeds it these records). ``verify_queue`` states every rule FORMAT.md gives for a readable log as a ``Problem``. All of
it reads only and takes no lock (repairs go through ``storage.QueueLog``), so it also reads queues a
running server has open: files that are not segments (the ``LOCK`` file) are ignored, and a segment
that the server removes between the listing and the read (compaction) is marked ``gone`` and
skipped, not reported as damage.
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

from qserve.storage import ReadOutcome, iter_records, parse_segment_name, segment_name
from qserve.storage.record import (CheckpointRecord, DeleteRecord, EntryRecord, Record, StateRecord,
                            TruncateRecord)

__all__ = ["UsageError", "Segment", "Queue", "Item", "Problem", "Progress", "VerifyResult",
           "find_queues", "read_segment", "verify_queue", "type_name", "TYPES", "PROGRESS_THRESHOLD",
           "GONE_NOTE"]

PROGRESS_THRESHOLD = 64 * 1024 * 1024   # a queue bigger than this gets progress lines (auto mode)
GONE_NOTE = "removed while it was being read (compacted by the process that has the queue open)"


class UsageError(Exception):
    """The command cannot run as asked (missing PATH, no queues in it...): exit status 2."""


@dataclass
class Segment:
    base: int
    path: str            # as the user named it (PATH joined with what was found below it)
    is_last: bool        # the active segment of its queue (may end torn)
    size: int = 0        # filled in by read_segment
    crc: int = 0         # crc32 of the whole file, filled in by read_segment
    zero_tail: int = 0   # active segment: bytes of preallocated zeros after the last record
    gone: bool = False   # listed, then removed before it was read (a running server compacted it)


@dataclass
class Queue:
    path: str
    segments: list[Segment]
    single_file: bool = False   # PATH was one .seg file: queue-wide checks are skipped

    @property
    def total_bytes(self) -> int:
        total = 0
        for seg in self.segments:
            try:
                total += os.path.getsize(seg.path)
            except OSError:
                pass
        return total


@dataclass(frozen=True)
class Item:
    """One record (``obj`` a storage record) or damaged stretch (``obj`` a corrupt/torn ReadOutcome)
    at ``offset`` of ``seg``, ``size`` bytes long (a record's framed size; the bytes a damage skips)."""

    seg: Segment
    offset: int
    size: int
    obj: Record | ReadOutcome


@dataclass(frozen=True)
class Problem:
    """Damage that verify reports: ``file`` at ``offset`` and why."""

    file: str
    offset: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}@{self.offset}: {self.reason}"


def _bases(directory: str) -> list[int]:
    return sorted(b for b in map(parse_segment_name, os.listdir(directory)) if b is not None)


def _queue(directory: str, bases: list[int]) -> Queue:
    return Queue(directory, [Segment(b, os.path.join(directory, segment_name(b)), k == len(bases) - 1)
                             for k, b in enumerate(bases)])


def find_queues(path: str, allow_file: bool = True) -> list[Queue]:
    """The queues at or below ``path``: every directory holding segment files, sorted by path.

    Raises:
        UsageError: ``path`` does not exist, is a file that is not a segment (or files are not
            allowed), or holds no queue.
        OSError: a directory could not be listed.
    """
    if not os.path.exists(path):
        raise UsageError(f"no such file or directory: {path}")
    if not os.path.isdir(path):
        base = parse_segment_name(path)
        if base is None:
            raise UsageError(f"not a segment file (<20 digits>.seg) or directory: {path}")
        if not allow_file:
            raise UsageError(f"needs a queue or data directory, not a segment file: {path}")
        bases = _bases(os.path.dirname(path) or ".")
        return [Queue(path, [Segment(base, path, not bases or base == bases[-1])], single_file=True)]
    queues = []

    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, dirnames, filenames in os.walk(path, onerror=fail):
        dirnames.sort()
        bases = sorted(b for b in map(parse_segment_name, filenames) if b is not None)
        if bases:
            queues.append(_queue(os.path.normpath(dirpath), bases))
    if not queues:
        raise UsageError(f"no queue directories (holding *.seg files) in {path}")
    return queues


class Progress:
    """Progress lines on stderr for one queue, at most every ``interval`` seconds.

    ``mode``: ``auto`` (only when ``total`` exceeds ``threshold``), ``always`` or ``never``. On a terminal
    the line is rewritten in place; otherwise each update is its own line. Never writes to stdout.
    """

    def __init__(self, label: str, total: int, mode: str = "auto", *, stream: TextIO | None = None,
                 threshold: int = PROGRESS_THRESHOLD, interval: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.interval, self.clock = label, total, interval, clock
        self.stream = stream if stream is not None else sys.stderr
        self.active = mode == "always" or (mode == "auto" and total > threshold)
        self.tty = self.active and getattr(self.stream, "isatty", lambda: False)()
        self._next = clock() + interval
        self.lines = 0

    def update(self, done: int) -> None:
        if self.active:
            now = self.clock()
            if now >= self._next:
                self._next = now + self.interval
                self._emit(done)

    def finish(self) -> None:
        if self.active:
            self._emit(self.total)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()

    def _emit(self, done: int) -> None:
        pct = 100 * done // self.total if self.total else 100
        text = f"qserve log: {self.label}: {done / 2**20:.1f} / {self.total / 2**20:.1f} MiB ({pct}%)"
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()
        self.lines += 1


def read_segment(seg: Segment, progress: Progress | None = None, done: int = 0) -> Iterator[Item]:
    """The records and damaged stretches of one segment, in file order (lenient decoder).

    Sets ``seg.size`` and ``seg.crc``. ``done`` is the queue's byte count before this segment, for
    ``progress``. A segment removed since it was listed (by the process that has the queue open)
    yields nothing and is marked ``gone``. Raises ``OSError`` if the file cannot be read.
    """
    try:
        with open(seg.path, "rb") as f:
            buf = f.read()
    except FileNotFoundError:
        if os.path.lexists(seg.path):    # a dangling symlink: unreadable, not removed
            raise
        seg.gone = True
        return
    seg.size, seg.crc = len(buf), zlib.crc32(buf)
    pending: tuple[int, Record] | None = None
    step = 1 << 20
    next_report = step
    for off, obj in iter_records(buf, lenient=True, path=seg.path):
        if pending is not None:
            yield Item(seg, pending[0], off - pending[0], pending[1])
            pending = None
        if isinstance(obj, ReadOutcome):
            if obj.kind == "torn" and obj.zero_filled and seg.is_last:
                seg.zero_tail = obj.resume - off     # preallocated space (FORMAT.md), not damage
            elif obj.kind != "clean":
                yield Item(seg, off, obj.resume - off, obj)
        else:
            pending = (off, obj)
        if progress is not None and off >= next_report:
            next_report = off + step
            progress.update(done + off)


@dataclass
class VerifyResult:
    queue: Queue
    records: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)   # worth knowing, not damage


def _damage_reason(seg: Segment, o: ReadOutcome) -> str:
    n = o.resume - o.offset
    if o.kind == "corrupt":
        return (f"{o.reason}: {n} bytes unreadable, next valid frame at {o.resume} "
                f"(open refuses the queue; repair drops them)")
    if seg.is_last:
        return f"torn tail: {o.reason}: {n} bytes (open truncates them, keeping a .broken copy)"
    return f"torn tail in a sealed segment: {o.reason}: {n} bytes (open refuses the queue; repair drops them)"


def verify_queue(queue: Queue, progress: Progress | None = None) -> VerifyResult:
    """Check one queue against FORMAT.md: framing and CRCs, every segment starting with its own
    CHECKPOINT, increasing indexes of non-moved entries, torn tails, segments the last CHECKPOINT
    lists but that are missing. Raises ``OSError`` if a file cannot be read."""
    res = VerifyResult(queue)
    last_main = 0
    last_cp: tuple | None = None        # (checkpoint, file, offset)
    seals: dict = {}
    damaged: set[str] = set()
    done = 0
    for seg in queue.segments:
        first = True
        for it in read_segment(seg, progress, done):
            r = it.obj
            if isinstance(r, ReadOutcome):
                res.problems.append(Problem(seg.path, it.offset, _damage_reason(seg, r)))
                damaged.add(seg.path)
                continue
            res.records += 1
            if first:
                first = False
                if not isinstance(r, CheckpointRecord):
                    res.problems.append(Problem(seg.path, it.offset, "segment does not start with its "
                                                f"checkpoint (starts with {type_name(r)})"))
                elif r.base != seg.base:
                    res.problems.append(Problem(seg.path, it.offset, "segment does not start with its "
                                                f"checkpoint (header is for base {r.base})"))
                elif seg.is_last:
                    seals = {b: (size, crc) for b, size, crc in r.seals}
            if isinstance(r, EntryRecord) and not r.moved:
                if r.index <= last_main:
                    res.problems.append(Problem(seg.path, it.offset, f"entry index {r.index} does not "
                                                f"follow {last_main} (non-moved entries must increase)"))
                else:
                    last_main = r.index
            elif isinstance(r, CheckpointRecord):
                last_cp = (r, seg.path, it.offset)
        if seg.gone:
            res.notes.append(Problem(seg.path, 0, GONE_NOTE))
        elif first:
            res.problems.append(Problem(seg.path, 0, "segment holds no readable record, not even its "
                                        "checkpoint"))
        if seg.zero_tail:
            res.notes.append(Problem(seg.path, seg.size - seg.zero_tail,
                                     f"{seg.zero_tail} bytes of preallocated zeros after the last record "
                                     "(unused space: the next append overwrites them)"))
        done += seg.size
    if not queue.single_file:
        _check_segment_set(res, last_cp, seals, damaged)
    return res


def _check_segment_set(res: VerifyResult, last_cp, seals: dict, damaged: set) -> None:
    queue = res.queue
    present = {s.base: s for s in queue.segments}
    if last_cp is not None:
        cp, file, off = last_cp
        for base in sorted(set(cp.segments) - set(present)):
            res.problems.append(Problem(os.path.join(queue.path, segment_name(base)), 0,
                                        f"segment missing (listed by the checkpoint at {file}@{off})"))
        for seg in queue.segments[:-1]:
            if seg.base not in cp.segments:
                res.notes.append(Problem(seg.path, 0, "not listed by the last checkpoint: a leftover of "
                                         "compaction, open deletes it if it holds no live entry"))
    for seg in queue.segments[:-1]:
        seal = seals.get(seg.base)
        if seal is not None and not seg.gone and seal != (seg.size, seg.crc) and seg.path not in damaged:
            res.notes.append(Problem(seg.path, 0, f"does not match its seal (size {seal[0]}, crc "
                                     f"{seal[1]:#010x}): changed after it was sealed; open checks "
                                     "every record instead"))


def type_name(obj) -> str:
    """``entry``, ``delete``, ``truncate``, ``state``, ``checkpoint`` or ``damage``."""
    return _TYPE_NAMES.get(type(obj), "damage")


_TYPE_NAMES = {EntryRecord: "entry", DeleteRecord: "delete", TruncateRecord: "truncate",
               StateRecord: "state", CheckpointRecord: "checkpoint"}
TYPES = ("entry", "delete", "truncate", "state", "checkpoint", "damage")
