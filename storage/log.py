"""QueueLog: the ordered segments of one queue directory, and the one API over them.

Strategy: every mutation is framed (record.py), written with one ``pwrite`` at the end of the active
segment (over zeros written ahead of it, segment.py) and then applied to the derived in-memory index
(index.py); a failed write changes nothing. Opening rebuilds the index from disk (recovery.py, whose
rules are replay.py's); reads go through an `EntryReader` (reads.py). Durability is group commit:
``sync_begin`` (owner thread) dups the active fd (not for a round run in place: sync.py),
``SyncTicket.run`` (any thread, sync.py) fsyncs it,
``sync_end`` (owner thread) advances ``durable_seq`` (durability.py). Rolls fsync the old segment first, so only the
active segment ever holds non-durable bytes; that makes the fsync-failure rollback simple: cut the
active segment back to its durable size and rebuild memory from disk. Answers from memory alone
(counts, bounds, dispatch order, statistics) are inspection.py's. Compaction (compaction.py)
decides which sealed segments to drop and which records to carry; it does so through the few
operations at the end of `QueueLog` (its `Compactable` protocol), which write the moved copies and
drop the file. ``QueueLog`` is not thread-safe: one owner thread calls everything except
``SyncTicket.run``.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from .compaction import compact
from .durability import Durability
from .errors import LogClosed, PayloadTooLarge, QueueFull, StorageIOError
from .fileio import FileIO
from .lock import DirLock
from .index import DEAD, loc_segment, pack_loc
from .inspection import Inspection
from .reads import Entry, EntryReader
from .rids import RequestIds, rid_hash
from .record import (REQUEST_ID, CheckpointRecord, EntryRecord, encode_checkpoint, encode_delete,
                     encode_entry, encode_state, encode_truncate)
from .recovery import RecoveryReport, recover
from .segment import Segment, io_error
from .sync import SyncTicket

__all__ = ["QueueLog", "LogConfig", "Entry", "SyncTicket"]

@dataclass(frozen=True)
class LogConfig:
    segment_bytes: int = 64 * 1024 * 1024
    max_payload_bytes: int = 524288
    max_entries: int | None = None
    compact_live_ratio: float = 0.5
    repair: bool = False
    preallocate_bytes: int = 1024 * 1024   # zeros written ahead of appends in the active segment; 0 = off
    retain_seconds: float = 0.0            # compaction leaves a sealed segment written this recently

    @property
    def prealloc_chunk(self) -> int:
        return max(0, min(self.preallocate_bytes, self.segment_bytes))


READ_AHEAD_BYTES = 64 * 1024   # `read_ahead` holds at most this many bytes of records


class QueueLog(Durability, Inspection):
    """A crash-safe log of queue entries in one directory. Not thread-safe (see module docstring).

    ``appended_seq`` counts the records written, ``durable_seq`` the ones known to be fsynced;
    group commit (``sync_begin`` / ``sync_end`` / ``sync``) and the rollback after a failed fsync
    are durability.py's `Durability`; the memory-only views (``count``, ``first_index``,
    ``iter_dispatch``, ``statistics``, ...) are inspection.py's `Inspection`."""

    def __init__(self) -> None:  # use QueueLog.open()
        raise TypeError("use QueueLog.open(path, config)")

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path, config: LogConfig = LogConfig(), *, now: Callable[[], float] = time.time,
             fileio: FileIO | None = None) -> "QueueLog":
        """Open (creating if missing) and recover the queue directory ``path``.

        Raises:
            CorruptLog: corruption before the tail, or a missing segment (unless ``config.repair``).
            DirectoryLocked: another process (or another open ``QueueLog``) has the directory.
            StorageIOError: the directory could not be read or written.
        """
        self = object.__new__(cls)
        self.path = os.fspath(path)
        self.config = config
        self.io = fileio or FileIO()
        self._now = now
        self.appended_seq = 0
        self.durable_seq = 0
        self._closed = False
        self._failed: str | None = None
        self._counters = {"compactions": 0, "reclaimed_bytes": 0, "rollbacks": 0, "rolls": 0}
        try:
            self.io.makedirs(self.path)
        except OSError as exc:
            raise io_error(exc, f"creating {self.path}") from None
        self._lock = DirLock.acquire(self.path)   # one writer per queue directory (lock.py)
        try:
            self._load()
        except OSError as exc:
            self._lock.release()
            raise io_error(exc, f"opening {self.path}") from None
        except BaseException:
            self._lock.release()
            raise
        self.recovery = self._rec_report
        return self

    def _load(self, keep_next: int = 0) -> bool:
        """(Re)build everything from disk. ``keep_next``: a rollback's next index to preserve.
        Returns True if a (not yet fsynced) rollback checkpoint was appended."""
        rec = recover(self.path, self.io, self.config.repair, sync=not keep_next)
        self._rec_report: RecoveryReport = rec.report
        self._segs: list[Segment] = rec.segments
        self._by_sid = {s.sid: s for s in self._segs}
        self._next_sid = (self._segs[-1].sid + 1) if self._segs else 0
        self._index = rec.index
        self._rids: RequestIds | None = None    # built on first use (see rids.py)
        self._reader = EntryReader(self._index, self._by_sid)
        self._newest: Entry | None = None   # the last entry appended, while it lives (`read_many`)
        self._ahead: dict[int, Entry] = {}   # the entries `read_ahead` read last, until `read_many` takes them
        self.next_index = max(rec.next_index, keep_next)
        self._watermark = rec.watermark
        self._state = rec.state
        self._fresh = False
        for seg in self._segs:
            seg.prealloc = self.config.prealloc_chunk
        if not self._segs:
            self._segs.append(self._new_segment(max(self.next_index, 1), 0, "create"))
            self._by_sid[self._segs[0].sid] = self._segs[0]
        elif rec.needs_checkpoint:
            self._roll()          # a fresh header lists the segments and seals the repaired files
        elif keep_next > rec.next_index:
            # record the next index so a rolled-back index is never handed out again; the next
            # successful sync makes it durable
            self._segs[-1].append(encode_checkpoint(self._checkpoint("rollback")))
            return True
        return False

    def _checkpoint(self, why: str, base: int = 0, prev: int = 0, segs=None) -> CheckpointRecord:
        if segs is None:
            segs = [s.base for s in self._segs]
        return CheckpointRecord(base or self._active.base, prev, self.next_index, self._watermark,
                                dict(self._state), tuple(segs), why)

    def _new_segment(self, base: int, prev: int, why: str) -> Segment:
        segs = [s.base for s in self._segs] + [base]
        seals = tuple((s.base, s.size, s.crc) for s in self._segs)
        header = encode_checkpoint(CheckpointRecord(base, prev, self.next_index, self._watermark,
                                                    dict(self._state), tuple(segs), why, seals))
        seg = Segment.create(self.io, self.path, base, self._next_sid, header)
        seg.prealloc = self.config.prealloc_chunk
        self._next_sid += 1
        self._fresh = True
        return seg

    def _check(self) -> None:
        if self._closed:
            raise LogClosed(f"log {self.path} is closed")
        if self._failed:
            raise StorageIOError(f"log {self.path} failed ({self._failed}); reopen it")

    # -- writing -----------------------------------------------------------------------------------
    def _write(self, data: bytes) -> tuple[Segment, int]:
        """Append one framed record (rolling first if the active segment is full)."""
        seg = self._active
        if seg.size - seg.header_size + len(data) > self.config.segment_bytes and not self._fresh:
            self._roll()
            seg = self._active
        off = seg.append(data)
        self._fresh = False
        self.appended_seq += 1
        return seg, off

    def _roll(self) -> None:
        old = self._active
        try:
            old.trim()            # a sealed segment ends with its last record (its seal's size)
        except OSError as exc:
            raise io_error(exc, f"sealing {old.path}") from None
        self._fsync_or_rollback(old)
        seg = self._new_segment(max(self.next_index, old.base + 1), old.base, "roll")
        self._segs.append(seg)
        self._by_sid[seg.sid] = seg
        self._counters["rolls"] += 1

    def append(self, data: bytes, tags: Mapping[str, str], priority: int = 0) -> Entry:
        """Append one entry with the next index.

        Returns the stored ``Entry`` once written (not yet durable: see ``appended_seq``).
        Raises:
            PayloadTooLarge, QueueFull: refused, nothing written.
            DiskFull, StorageIOError: the write failed, nothing written.
        """
        if self._closed or self._failed:
            self._check()
        config = self.config
        if len(data) > config.max_payload_bytes:
            raise PayloadTooLarge(len(data), config.max_payload_bytes)
        ix = self._index
        if config.max_entries is not None and ix.live >= config.max_entries:
            raise QueueFull(ix.live, config.max_entries)
        for k, v in tags.items():
            if type(k) is not str or type(v) is not str:
                if not isinstance(k, str) or not isinstance(v, str):
                    raise TypeError("tags must map str to str")
        index = self.next_index
        ts = int(self._now() * 1000)
        rec = encode_entry(index, priority, ts, tags, data)
        size = len(rec)
        seg, off = self._write(rec)
        self.next_index = index + 1
        rid = tags.get(REQUEST_ID)
        h = 0 if rid is None else rid_hash(rid)
        ix.append(index, pack_loc(seg.sid, off), size, priority, h)
        seg.note_entry(index, size)
        if self._rids is not None:
            self._rids.note(ix, h, index, self.__contains__)
        entry = self._newest = Entry(index, dict(tags), bytes(data), priority, ts)
        return entry

    def warm(self) -> None:
        """Build the derived lookup structures now (the requestId table) instead of at the first
        lookup; a caller that opens the log off its main thread calls this there too."""
        self._request_ids()

    def _request_ids(self) -> RequestIds:
        if self._rids is None:
            self._rids = RequestIds(self._index)
        return self._rids

    def _kill(self, pos: int) -> None:
        old = self._index.kill(pos)
        seg = self._by_sid[loc_segment(old)]
        seg.live_bytes -= self._index.size[pos]
        seg.live_count -= 1

    def delete(self, indexes: Iterable[int]) -> list[int]:
        """Delete live entries; unknown or already deleted indexes are ignored.

        Returns the indexes actually deleted (sorted). Writes one DELETE record if any.
        """
        self._check()
        pos_of = self._index.pos_of
        live = {i: p for i in indexes if (p := pos_of(i)) is not None}
        if not live:
            return []
        found = sorted(live)
        seg, _ = self._write(encode_delete(found))
        seg.deletes += 1
        for i in found:
            self._kill(live[i])
        self._index.maybe_purge()
        return found

    def truncate(self, below: int) -> int:
        """Delete every live index < ``below``; returns how many. ``next_index`` never moves."""
        self._check()
        below = min(below, self.next_index)
        ix = self._index
        first = ix.first_pos()
        end = bisect_left(ix.idx, below)
        victims = [p for p in range(first, end) if not ix.loc[p] & DEAD] if first is not None else []
        if not victims:
            return 0
        self._write(encode_truncate(below))
        self._watermark = max(self._watermark, below)
        for p in victims:
            self._kill(p)
        ix.maybe_purge()
        return len(victims)

    def set_state(self, **kv: str) -> None:
        """Persist queue state key/values (e.g. ``state="End"``); an empty value removes the key."""
        self._check()
        if not all(isinstance(v, str) for v in kv.values()):
            raise TypeError("state values must be str")
        self._write(encode_state(kv))
        self._state.update(kv)
        for key in [k for k, v in kv.items() if v == ""]:
            del self._state[key]

    @property
    def state(self) -> dict:
        return dict(self._state)

    def state_value(self, key: str) -> str | None:
        """One key of `state`, without copying it (every put asks whether its queue has ended)."""
        return self._state.get(key)

    # -- reading (reads.py) -------------------------------------------------------------------------
    def read(self, index: int) -> Entry | None:
        """The live entry ``index``, or None."""
        self._check()
        return self._reader.read(index)

    def read_many(self, indexes: Sequence[int]) -> list[Entry | None]:
        """`read` of each of ``indexes``, in that order; records that lie back to back in one
        segment (a watch's window, usually) are fetched with one ``pread`` per run. The entry
        appended last, asked for alone while it lives (an auto-commit watch's take of a put's
        entry, in the put's own step or right after it), is the one `append` returned: no
        ``pread``, no decoding (one entry kept, the index says whether it lives); so are the
        entries the last `read_ahead` read, while they live."""
        self._check()
        newest = self._newest
        if (newest is not None and len(indexes) == 1 and indexes[0] == newest.index
                and self._index.pos_of(newest.index) is not None):
            return [newest]
        ahead = self._ahead
        if not ahead:
            return self._reader.read_many(indexes)
        pos_of = self._index.pos_of
        got = [e if (e := ahead.get(i)) is not None and pos_of(i) is not None else None for i in indexes]
        missing = [i for i, e in zip(indexes, got) if e is None]
        if missing:   # not read ahead, or deleted since (then read as gone)
            read = iter(self._reader.read_many(missing))
            got = [next(read) if e is None else e for e in got]
        return got

    def read_ahead(self, indexes: Sequence[int]) -> list[Entry]:
        """Read the live entries of ``indexes`` now, so that a `read_many` of them later takes them
        from memory (a manual-commit watch's next window, read while its consumer works:
        `qserve.backends.local.queues.Queue.read_ahead`). Holds what the last call read: the first
        of them that fit in `READ_AHEAD_BYTES` of records; returns those entries, in order. A deleted
        entry is never served from there (`read_many` asks the index first), and a rollback
        (`_load`) forgets them."""
        self._check()
        ix, budget, want = self._index, READ_AHEAD_BYTES, []
        for i in indexes:
            pos = ix.pos_of(i)
            if pos is not None:
                budget -= ix.size[pos]
                if budget < 0:
                    break
                want.append(i)
        self._ahead = {}
        entries = [e for e in self._reader.read_many(want) if e is not None]
        self._ahead = {e.index: e for e in entries}
        return entries

    def scan(self, start: int = 0, tags: Mapping[str, str] | None = None, limit: int | None = None,
             priority: int | None = None) -> Iterator[Entry]:
        """Live entries with index >= start in index order, filtered by tags (all must match) and
        priority, at most ``limit``. Reads each entry from disk."""
        self._check()
        yield from self._reader.scan(start, tags, limit, priority)

    def find_request_id(self, request_id: str) -> Entry | None:
        """The live entry whose ``requestId`` tag is ``request_id`` (the newest if several)."""
        self._check()
        candidates = self._request_ids().candidates(rid_hash(request_id))   # newest first
        return self._reader.first_with_request_id(candidates, request_id)

    # -- space -------------------------------------------------------------------------------------
    def maybe_compact(self, budget_bytes: int | None = None) -> int:
        """Drop dead sealed segments and compact sparse ones; returns bytes reclaimed."""
        self._check()
        self._request_ids()       # idle time: build the requestId table if reopen deferred it
        n = compact(self, budget_bytes)
        self._index.maybe_purge()
        return n

    # The operations compaction.py uses (its `Compactable`), and nothing else of the log's insides.
    @property
    def watermark(self) -> int:
        """The truncate watermark: every index below it is gone."""
        return self._watermark

    def sealed_segments(self) -> list[Segment]:
        """The sealed segments, oldest first (a new list: compaction drops segments as it walks)."""
        return self._segs[:-1]

    def holds_live(self, seg: Segment, offset: int, index: int) -> bool:
        """Whether the record at ``offset`` of ``seg`` is the copy live entry ``index`` is read from."""
        pos = self._index.pos_of(index)
        return pos is not None and self._index.loc[pos] == pack_loc(seg.sid, offset)

    def move_forward(self, seg: Segment, r: EntryRecord) -> int:
        """Rewrite live entry ``r``, read from sealed ``seg``, into the active segment as a moved copy
        (same index) that reads now come from; returns the bytes written."""
        rec = encode_entry(r.index, r.priority, r.timestamp_ms, r.tags, r.data, moved=True)
        dst, off = self._write(rec)
        self._index.move(self._index.pos_of(r.index), pack_loc(dst.sid, off), len(rec))
        dst.note_entry(r.index, len(rec))
        seg.live_bytes -= len(rec)
        seg.live_count -= 1
        return len(rec)

    def carry_deletes(self, indexes: list[int]) -> None:
        """Write a DELETE of ``indexes`` (sorted) again, into the active segment."""
        dst, _ = self._write(encode_delete(indexes))
        dst.deletes += 1

    def drop_segment(self, seg: Segment, moved_bytes: int) -> int:
        """Forget sealed ``seg`` once its live entries were moved (``moved_bytes`` of copies): a
        CHECKPOINT without it, fsync, unlink, fsync of the directory. Returns the bytes reclaimed."""
        segs = [s.base for s in self._segs if s is not seg]
        # the checkpoint may itself roll: compute its list after that
        dst, _ = self._write(encode_checkpoint(self._checkpoint("compact", segs=segs)))
        if dst is not self._active or dst.base not in segs:
            segs = [s.base for s in self._segs if s is not seg]
            self._write(encode_checkpoint(self._checkpoint("compact", segs=segs)))
        self._fsync_or_rollback(self._active)
        self._segs.remove(seg)
        del self._by_sid[seg.sid]
        size = seg.size
        seg.close()
        try:
            self.io.remove(seg.path)
            self.io.fsync_dir(self.path)
        except OSError as exc:
            raise io_error(exc, f"removing {seg.path}") from None
        self._counters["compactions"] += 1
        self._counters["reclaimed_bytes"] += size - moved_bytes
        return size - moved_bytes

    def close(self) -> None:
        """Sync and close. Later calls raise ``LogClosed``; closing twice is allowed."""
        if self._closed:
            return
        try:
            if not self._failed:
                try:
                    self._active.trim()   # a cleanly closed log has no preallocated tail
                except OSError:
                    pass                  # harmless: recovery reads the zeros as unused space
                self.sync()
        finally:
            self._closed = True
            for s in self._segs:
                s.close()
            self._lock.release()

    def __enter__(self) -> "QueueLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
