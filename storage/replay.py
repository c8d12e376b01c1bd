"""Replay: the state a queue's records build, applied in log order (FORMAT.md, recovery rule 5).

Strategy: the rules live here once, with no file access, so that recovery (which reads segments, cuts
torn tails and repairs) and the read-only `qserve log` tools (which read with the lenient decoder)
cannot disagree on what is live. A `Replay` is fed records in log order (segments by base, then
offset), each named by its segment id (``sid``) and offset, and builds:

* the entry index (index.py): ENTRY adds its index at its location and raises ``next_index``; a second
  copy of an index (a ``moved`` entry that compaction wrote forward) replaces the first, but never
  brings back a deleted one; entries below the watermark are dead on arrival;
* DELETE kills the listed live indexes; TRUNCATE kills every index below ``min(below, next_index)`` and
  raises the watermark; STATE merges its values; CHECKPOINT raises ``next_index``, truncates to its
  watermark, replaces the state and names the segments that must exist (``expected``);
* a `segment.Tally` per segment: live entries and their bytes (what compaction weighs), DELETE
  records held and the range of indexes written there.

Rows of increasing index (the usual case) go straight into the index's sorted columns, a run at a time
through `entry_run` (record.py's `decode_entry_run`, no msgpack) or one by one through `apply`;
moved and out-of-order entries wait in a side table that `finish` merges in, so the columns are
sorted once. Not thread-safe.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left

from .index import DEAD, EntryIndex, loc_segment, pack_loc
from .record import (REQUEST_ID, CheckpointRecord, DeleteRecord, EntryRecord, Record, StateRecord,
                     TruncateRecord, decode_entry_run)
from .rids import rid_hash
from .segment import Tally

__all__ = ["Replay"]


class Replay:
    """Applies records in log order. Read ``index``, ``next_index``, ``watermark``, ``state``,
    ``expected`` and ``tallies`` after `finish`."""

    def __init__(self) -> None:
        self.index = EntryIndex()
        self.next_index = 1
        self.watermark = 0
        self.state: dict[str, str] = {}
        self.expected: tuple | None = None    # ``segs`` of the last checkpoint
        self.tallies: dict[int, Tally] = {}   # sid -> its tally
        # index -> [loc, size, prio, rid hash, live]: moved or out-of-order entries (no row yet)
        self._moved: dict[int, list] = {}

    def tally(self, sid: int) -> Tally:
        t = self.tallies.get(sid)
        if t is None:
            t = self.tallies[sid] = Tally()
        return t

    @property
    def last_row(self) -> int:
        """The highest index with a row in the columns (0 if none): an entry above it gets one."""
        idx = self.index.idx
        return idx[-1] if idx else 0

    # -- feeding -----------------------------------------------------------------------------------
    def entry_run(self, sid: int, buf, off: int, verify: bool, shift: int = 0) -> int:
        """Apply the run of plain ENTRY records at ``off`` of segment ``sid``'s bytes ``buf`` (see
        `record.decode_entry_run`; ``verify``: check each record's crc32). ``shift``: how far the
        records will sit before their offset in ``buf`` (repair rewrites the file without the bad
        stretches before them). Returns where the run ends: the caller applies that record with
        `apply` (or stops at the end of ``buf``)."""
        ix = self.index
        idx = ix.idx
        mark = len(idx)
        end = decode_entry_run(buf, off, self.last_row, self.watermark, verify, pack_loc(sid, 0) - shift,
                               ix)
        added = len(idx) - mark
        if added:
            t = self.tally(sid)
            t.live_count += added
            t.live_bytes += sum(ix.size[mark:])
            ix.live += added
            first, last = idx[mark], idx[-1]
            if not t.min_index or first < t.min_index:
                t.min_index = first
            if last > t.max_index:
                t.max_index = last
            if last >= self.next_index:
                self.next_index = last + 1
            prio = ix.prio[mark:]
            if prio.count(0) != added:           # file the rows of priority levels
                levels = ix.levels
                for k in [k for k, p in enumerate(prio) if p]:
                    lv = levels.get(prio[k])
                    if lv is None:
                        lv = levels[prio[k]] = array("Q")
                    lv.append(idx[mark + k])
        return end

    def apply(self, sid: int, offset: int, size: int, r: Record) -> None:
        """Apply one record: ``size`` framed bytes at ``offset`` of segment ``sid``."""
        if isinstance(r, EntryRecord):
            self._entry(sid, pack_loc(sid, offset), size, r)
        elif isinstance(r, DeleteRecord):
            self.tally(sid).deletes += 1
            for i in r.indexes:
                self._kill(i)
        elif isinstance(r, TruncateRecord):
            self._truncate(min(r.below, self.next_index))
        elif isinstance(r, StateRecord):
            self.state.update(r.values)
            for key in [k for k, v in r.values.items() if v == ""]:
                del self.state[key]   # an empty value removes the key
        elif isinstance(r, CheckpointRecord):
            self.next_index = max(self.next_index, r.next_index)
            self._truncate(r.truncate_below)
            self.state = dict(r.state)
            self.expected = r.segments

    def finish(self) -> None:
        """Merge the moved and out-of-order entries into the columns (once, after the last record)
        and drop the dead rows if they are most of them."""
        if self._moved:
            self._merge_moved()
        ix = self.index
        if ix.live < len(ix.idx) // 2 and len(ix.idx) > 4096:
            ix.purge()

    # -- the rules ---------------------------------------------------------------------------------
    def _entry(self, sid: int, loc: int, size: int, r: EntryRecord) -> None:
        i = r.index
        if i < self.watermark:
            return
        h = rid_hash(r.tags[REQUEST_ID]) if REQUEST_ID in r.tags else 0
        if i >= self.next_index:
            self.next_index = i + 1
        ix = self.index
        idx = ix.idx
        pos = bisect_left(idx, i)
        if pos < len(idx) and idx[pos] == i:          # a moved copy replaces the earlier one...
            old = ix.loc[pos]
            if old & DEAD:                            # ...but never resurrects a deleted entry
                return
            self.tally(sid).note_entry(i, size)
            self._unaccount(old, ix.size[pos])
            ix.loc[pos] = loc
            ix.size[pos] = size
            ix.prio[pos] = r.priority
            ix.rh[pos] = h
            return
        m = self._moved.get(i)
        if m is not None and not m[4]:                # the same rule for a copy in the side table
            return
        self.tally(sid).note_entry(i, size)
        if pos == len(idx) and not r.moved:
            ix.append(i, loc, size, r.priority, h)
            return
        if m is not None:
            self._unaccount(m[0], m[1])
        self._moved[i] = [loc, size, r.priority, h, True]

    def _unaccount(self, loc: int, size: int) -> None:
        """The record at ``loc`` no longer holds a live entry."""
        t = self.tallies[loc_segment(loc)]
        t.live_bytes -= size
        t.live_count -= 1

    def _kill(self, i: int) -> None:
        ix = self.index
        pos = ix.pos_of(i)
        if pos is not None:
            self._unaccount(ix.kill(pos), ix.size[pos])
            return
        m = self._moved.get(i)
        if m is not None and m[4]:
            m[4] = False
            self._unaccount(m[0], m[1])

    def _truncate(self, below: int) -> None:
        if below <= self.watermark:
            return
        self.watermark = below
        ix = self.index
        p = ix.first_pos()
        end = bisect_left(ix.idx, below)
        while p is not None and p < end:
            if not ix.loc[p] & DEAD:
                self._kill(ix.idx[p])
            p += 1
        for i, m in self._moved.items():
            if i < below and m[4]:
                self._kill(i)

    def _merge_moved(self) -> None:
        """Insert the live entries of the side table into the sorted columns."""
        ix = self.index
        old = (ix.idx, ix.loc, ix.size, ix.prio, ix.rh)
        idx, loc, size, prio, rh = ix.idx, ix.loc, ix.size, ix.prio, ix.rh = \
            array("Q"), array("Q"), array("I"), array("q"), array("q")
        live = ix.live
        items = sorted(self._moved.items())
        j = 0
        oidx = old[0]
        for pos in range(len(oidx) + 1):
            cur = oidx[pos] if pos < len(oidx) else None
            while j < len(items) and (cur is None or items[j][0] < cur):
                i, (m_loc, m_size, m_prio, m_h, alive) = items[j]
                j += 1
                if alive:
                    idx.append(i); loc.append(m_loc); size.append(m_size)
                    prio.append(m_prio); rh.append(m_h)
                    live += 1
            if cur is None:
                break
            idx.append(cur); loc.append(old[1][pos]); size.append(old[2][pos])
            prio.append(old[3][pos]); rh.append(old[4][pos])
        ix.live = live
        ix.rebuild_levels()
        ix.version += 1
        self._moved = {}
