"""Reading entries back: from the index row of a live entry to its record on disk.

Strategy: the index gives each live entry's location and framed size, so an entry is one ``pread``
decoded straight to its fields (record.py's `decode_entry`, no record object); a batch whose records lie
back to back in one segment (a watch's window, usually) is one ``pread`` per run. Each record's index is
checked against its row's, so a location gone wrong reads as an error, never as another entry. The log
keeps the index and the segments; it makes a new `EntryReader` whenever it rebuilds them (open,
rollback). Not thread-safe: the log's owner thread reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

from .errors import StorageIOError
from .index import EntryIndex, loc_offset, loc_segment, pack_loc
from .record import HEADER_SIZE, REQUEST_ID, decode_entry
from .segment import Segment, io_error

__all__ = ["Entry", "EntryReader"]

_READ_RUN_BYTES = 1024 * 1024   # read_many: a run of back-to-back records stops growing past this


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored queue entry."""

    index: int
    tags: dict
    data: bytes
    priority: int
    timestamp_ms: int


class EntryReader:
    """Reads the live entries of ``index`` from the segments ``by_sid`` (segment id -> segment).

    Raises ``StorageIOError`` (``DiskFull`` never: reads only) when a read fails or a record does not
    decode to the entry its row names."""

    __slots__ = ("_index", "_by_sid")

    def __init__(self, index: EntryIndex, by_sid: Mapping[int, Segment]) -> None:
        self._index = index
        self._by_sid = by_sid

    def at(self, pos: int) -> Entry:
        """The entry of index row ``pos``."""
        ix = self._index
        loc = ix.loc[pos]
        seg = self._by_sid[loc_segment(loc)]
        try:
            body = seg.read_body(loc_offset(loc), ix.size[pos])
        except OSError as exc:
            raise io_error(exc, f"reading {seg.path}") from None
        return self._decode(seg, loc_offset(loc), pos, body)

    def _decode(self, seg: Segment, offset: int, pos: int, body: bytes) -> Entry:
        try:
            index, priority, ts, _, tags, data = decode_entry(body)
        except ValueError as exc:
            raise StorageIOError(f"{seg.path} at {offset}: unreadable record: {exc}") from None
        if index != self._index.idx[pos]:
            raise StorageIOError(f"{seg.path} at {offset}: index mismatch")
        return Entry(index, tags, data, priority, ts)

    def read(self, index: int) -> Entry | None:
        pos = self._index.pos_of(index)
        return None if pos is None else self.at(pos)

    def read_many(self, indexes: Sequence[int]) -> list[Entry | None]:
        """`read` of each of ``indexes``, in that order; records that lie back to back in one
        segment are fetched with one ``pread`` of up to `_READ_RUN_BYTES` (and one more record)."""
        ix = self._index
        positions = [ix.pos_of(i) for i in indexes]
        out: list[Entry | None] = [None] * len(positions)
        k = 0
        while k < len(positions):
            pos = positions[k]
            if pos is None:
                k += 1
                continue
            loc = ix.loc[pos]
            sid, start = loc_segment(loc), loc_offset(loc)
            end = start + ix.size[pos]
            j = k + 1   # extend the run while the next record starts where this one ends
            while j < len(positions) and positions[j] is not None and end - start < _READ_RUN_BYTES \
                    and ix.loc[positions[j]] == pack_loc(sid, end):
                end += ix.size[positions[j]]
                j += 1
            if j == k + 1:
                out[k] = self.at(pos)
            else:
                seg = self._by_sid[sid]
                try:
                    buf = seg.io.pread(seg.fd, end - start, start)
                except OSError as exc:
                    raise io_error(exc, f"reading {seg.path}") from None
                at = 0
                for q in range(k, j):
                    p = positions[q]
                    size = ix.size[p]
                    out[q] = self._decode(seg, start + at, p, buf[at + HEADER_SIZE:at + size])
                    at += size
            k = j
        return out

    def scan(self, start: int, tags: Mapping[str, str] | None, limit: int | None,
             priority: int | None) -> Iterator[Entry]:
        """Live entries with index >= start in index order, filtered by tags (all must match) and
        priority, at most ``limit``."""
        n = 0
        ix = self._index
        for pos in ix.iter_live(start):
            if limit is not None and n >= limit:
                return
            if priority is not None and ix.prio[pos] != priority:
                continue
            e = self.at(pos)
            if tags and any(e.tags.get(k) != v for k, v in tags.items()):
                continue
            n += 1
            yield e

    def first_with_request_id(self, candidates: Iterable[int], request_id: str) -> Entry | None:
        """The first live entry of ``candidates`` (indexes) whose ``requestId`` is ``request_id``."""
        for index in candidates:
            pos = self._index.pos_of(index)
            if pos is None:
                continue
            e = self.at(pos)
            if e.tags.get(REQUEST_ID) == request_id:
                return e
        return None
