"""The in-memory entry index: derived from the log, rebuilt by scanning on open, never persisted.

Strategy: parallel ``array`` columns, one row per stored entry, sorted by index (indexes are assigned in
increasing order, so appends keep the order; bisect finds a row):

* ``idx``  u64  the entry index
* ``loc``  u64  ``segment id << 40 | offset`` of the record; bit 63 set = dead (tombstone)
* ``size`` u32  framed record size (live-bytes accounting, one-read lookups)
* ``prio`` i64  priority
* ``rh``   i64  64-bit hash of the requestId (0 = none)

Dead rows are purged by a periodic rebuild once they outnumber the live ones (at C speed, see
`EntryIndex.purge`); until then scans step over them through skip links (a union-find over row
positions, 4 bytes per row, see `next_live`), so a dead row costs O(1) amortised however often
dispatch restarts behind it. Entries with a priority
other than 0 are also listed per level in ``levels`` (sorted index arrays, may hold dead rows, with
skip links of their own) so dispatch order is computed from memory. The requestId lookups built from
the ``rh`` column are in `storage.rids`. About 42 bytes per row. Not thread-safe.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left
from itertools import compress
from typing import Iterator

__all__ = ["EntryIndex", "DEAD", "SEG_SHIFT", "OFF_MASK", "SEG_MASK", "pack_loc", "loc_segment",
           "loc_offset", "next_live"]

DEAD = 1 << 63
_HIGH_BYTE = 7 if sys.byteorder == "little" else 0          # of a u64 in ``loc``'s memory
_DEAD_BYTE = bytes(1 if b & 0x80 else 0 for b in range(256))  # high byte -> 1 when DEAD is set
_LIVE_BYTE = bytes(0 if b & 0x80 else 1 for b in range(256))  # high byte -> 1 when it is not
# A record's location, one u64 (the ``loc`` column): segment id in bits 40..62, byte offset in bits
# 0..39, bit 63 the DEAD flag. These helpers are the only code that knows the packing.
SEG_SHIFT = 40
OFF_MASK = (1 << SEG_SHIFT) - 1      # the offset bits
SEG_MASK = (1 << 23) - 1             # the segment id, once shifted down (drops DEAD)


def pack_loc(seg_id: int, offset: int) -> int:
    """The location of the record at ``offset`` of segment ``seg_id`` (live: DEAD not set)."""
    return (seg_id << SEG_SHIFT) | offset


def loc_segment(loc: int) -> int:
    """The segment id of a location, dead or live."""
    return (loc >> SEG_SHIFT) & SEG_MASK


def loc_offset(loc: int) -> int:
    """The byte offset of a location in its segment, dead or live."""
    return loc & OFF_MASK


def next_live(links: array, pos: int) -> int:
    """The first live position at or after ``pos`` (``len(links)`` if none). ``links`` is a
    union-find over dead positions: a live one points at itself, a dead one further on; the path
    walked is compressed, so each dead position is stepped over O(1) times amortised, however often
    scans restart behind it (draining a priority level, or a queue whose head stays pending, would
    otherwise walk every dead row on every poll until the next purge)."""
    n = len(links)
    root = pos
    while root < n and links[root] != root:
        root = links[root]
    while pos < root:
        nxt = links[pos]
        links[pos] = root
        pos = nxt
    return root


class EntryIndex:
    """Columns of all stored entries (live and not yet purged dead ones), sorted by index."""

    __slots__ = ("idx", "loc", "size", "prio", "rh", "levels", "live", "version", "_first", "_links",
                 "_links_version", "_level_links")

    def __init__(self) -> None:
        self.idx = array("Q")
        self.loc = array("Q")
        self.size = array("I")
        self.prio = array("q")
        self.rh = array("q")
        self.levels: dict[int, array] = {}
        self.live = 0
        self.version = 0
        self._first = 0
        # Skip links over dead rows (see `next_live`): row -> itself when live, further on when dead.
        # Built on first use for the current ``version``; kept up to date by append and kill.
        self._links = array("I")
        self._links_version = -1
        self._level_links: dict[int, array] = {}   # the same over each ``levels`` array

    # -- building --------------------------------------------------------------------------------
    def append(self, index: int, loc: int, size: int, prio: int, h: int) -> None:
        """Add a live row; ``index`` must exceed every index already present."""
        self.rh.append(h)
        self.idx.append(index)
        self.loc.append(loc)
        self.size.append(size)
        self.prio.append(prio)
        links = self._links
        if len(links) == len(self.idx) - 1:
            links.append(len(links))
        if prio:
            lv = self.levels.get(prio)
            if lv is None:
                lv = self.levels[prio] = array("Q")
            lv.append(index)
            ll = self._level_links.get(prio)
            if ll is not None:
                if len(ll) == len(lv) - 1:
                    ll.append(len(ll))
                else:
                    del self._level_links[prio]
        self.live += 1

    def rebuild_levels(self) -> None:
        levels: dict[int, array] = {}
        idx, loc, prio = self.idx, self.loc, self.prio
        for pos in [pos for pos, p in enumerate(prio) if p]:
            if not loc[pos] & DEAD:
                lv = levels.get(prio[pos])
                if lv is None:
                    lv = levels[prio[pos]] = array("Q")
                lv.append(idx[pos])
        self.levels = levels
        self._level_links = {}

    # -- lookups ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.live

    def pos_of(self, index: int) -> int | None:
        """Row of ``index`` if it is live. Rows are sorted by index and, without holes (the usual
        case: indexes are dense), row ``index - idx[0]`` is the one; otherwise a binary search."""
        idx = self.idx
        n = len(idx)
        if not n:
            return None
        pos = index - idx[0]
        if not (0 <= pos < n and idx[pos] == index):
            pos = bisect_left(idx, index)
            if pos >= n or idx[pos] != index:
                return None
        return None if self.loc[pos] & DEAD else pos

    def count_priority(self, p: int) -> int:
        """Live entries with priority ``p``, from memory: O(entries of that level), or of every
        other level for 0."""
        if p == 0:
            return self.live - sum(self.count_priority(q) for q in list(self.levels) if q)
        lv = self.levels.get(p)
        if lv is None:
            return 0
        links, n, i = self._links_of_level(p, lv), 0, 0
        while (i := next_live(links, i)) < len(lv):
            n += 1
            i += 1
        return n

    def dispatch_rank(self, index: int) -> int | None:
        """How many live entries come before live ``index`` in dispatch order, when that is cheap:
        with no priority level present, the live rows before its row, counted at C speed from the
        DEAD bits (one byte per row: the high byte of ``loc``). None otherwise (or if not live)."""
        pos = self.pos_of(index)
        if pos is None or self.levels:
            return None
        high = self.loc[:pos].tobytes()[_HIGH_BYTE::8]
        return pos - high.translate(_DEAD_BYTE).count(1)

    def first_pos(self) -> int | None:
        loc, n = self.loc, len(self.loc)
        p = self._first
        while p < n and loc[p] & DEAD:
            p += 1
        self._first = p
        return p if p < n else None

    def last_pos(self) -> int | None:
        loc = self.loc
        p = len(loc) - 1
        while p >= 0 and loc[p] & DEAD:
            p -= 1
        return p if p >= 0 else None

    def _row_links(self) -> array:
        links = self._links
        if self._links_version != self.version or len(links) != len(self.idx):
            links = self._links = array("I", range(len(self.loc)))
            for pos in [pos for pos, v in enumerate(self.loc) if v >> 63]:   # the dead rows
                links[pos] = pos + 1
            self._links_version = self.version
        return links

    def _links_of_level(self, p: int, lv: array) -> array:
        ll = self._level_links.get(p)
        if ll is None or len(ll) != len(lv):
            ll = self._level_links[p] = array("I", range(len(lv)))
            for i in range(len(lv)):
                if self.pos_of(lv[i]) is None:
                    ll[i] = i + 1
        return ll

    def iter_live(self, start: int = 0) -> Iterator[int]:
        """Live rows with index >= start, in index order. Tolerates mutation between steps."""
        version = self.version
        pos = bisect_left(self.idx, start)
        while True:
            if version != self.version:  # rows were purged: find our place again
                version = self.version
                pos = bisect_left(self.idx, start)
            pos = next_live(self._row_links(), pos)
            if pos >= len(self.idx):
                return
            start = self.idx[pos] + 1
            yield pos
            pos += 1

    def iter_dispatch(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """(index, priority) of live rows >= start: highest priority first, index order in a level."""
        levels = sorted(set(self.levels) | {0}, reverse=True)
        for p in levels:
            if p == 0:
                for pos in self.iter_live(start):
                    if not self.prio[pos]:
                        yield self.idx[pos], 0
                continue
            lv = self.levels.get(p)
            if lv is None:
                continue
            version = self.version
            nxt = start
            i = bisect_left(lv, nxt)
            while True:
                if version != self.version or self.levels.get(p) is not lv:  # rebuilt: find our place again
                    version = self.version
                    lv = self.levels.get(p)
                    if lv is None:
                        break
                    i = bisect_left(lv, nxt)
                i = next_live(self._links_of_level(p, lv), i)
                if i >= len(lv):
                    break
                index = lv[i]
                i += 1
                nxt = index + 1
                if self.pos_of(index) is not None:   # the links say live; cheap to be sure
                    yield index, p

    # -- mutation --------------------------------------------------------------------------------
    def kill(self, pos: int) -> int:
        """Mark a live row dead; returns its old loc."""
        old = self.loc[pos]
        self.loc[pos] = old | DEAD
        self.live -= 1
        if pos < len(self._links):
            self._links[pos] = pos + 1
        p = self.prio[pos]
        if p:
            ll = self._level_links.get(p)
            if ll is not None:
                lv = self.levels[p]
                index = self.idx[pos]
                i = bisect_left(lv, index)
                if i < len(ll) and lv[i] == index:
                    ll[i] = i + 1
        return old

    def move(self, pos: int, loc: int, size: int) -> None:
        self.loc[pos] = loc
        self.size[pos] = size

    def maybe_purge(self) -> bool:
        """Drop dead rows once they outnumber live ones (amortised O(1))."""
        dead = len(self.idx) - self.live
        if dead < 4096 or dead < self.live:
            return False
        self.purge()
        return True

    def purge(self) -> None:
        """Drop the dead rows, at C speed: a live mask from the DEAD bits (the high byte of each
        ``loc``), then every column copied a run of live rows at a time when runs are few (a queue
        consumed in order: its dead rows are mostly one prefix), else filtered by the mask with
        `itertools.compress` (a Python loop over the rows is several times slower either way; README,
        "Storage", has the figures)."""
        cols = (self.idx, self.loc, self.size, self.prio, self.rh)
        mask = self.loc.tobytes()[_HIGH_BYTE::8].translate(_LIVE_BYTE)
        n = len(mask)
        runs = mask.count(b"\x00\x01") + (mask[:1] == b"\x01")
        if runs <= max(64, n >> 6):
            new = [array(col.typecode) for col in cols]
            start = mask.find(1)
            while start >= 0:
                end = mask.find(0, start)
                if end < 0:
                    end = n
                for out, col in zip(new, cols):
                    out.extend(col[start:end])
                start = mask.find(1, end)
        else:
            new = [array(col.typecode, compress(col, mask)) for col in cols]
        self.idx, self.loc, self.size, self.prio, self.rh = new
        self._first = 0
        if self.levels:   # none: there is no priority row to file
            self.rebuild_levels()
        else:
            self._level_links = {}
        self._links = array("I", range(len(self.idx)))   # every row is live now
        self._links_version = self.version + 1
        self.version += 1
