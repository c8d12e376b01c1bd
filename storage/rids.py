"""requestId lookups over the entry index: which live entries carry a given ``requestId``.

Strategy: ``RidTable`` maps a 64-bit hash of the requestId (the index's ``rh`` column) to its
newest index by open addressing in two arrays; older copies of a repeated requestId are chained in
a dict. Candidates are verified against the record by the caller, so collisions are harmless. A
table is built from the ``rh`` column on first use (the slowest part of a reopen; the server does
it in the thread that opens the queue), then kept up to date by `RequestIds.note` on every
append. Deleted entries keep their slots until the table is replaced: a small table at once, a
large one by a `RidBuilder` a few rows per append while the old one keeps answering, so no
replacement stops the caller's thread for long (a large table built in one pass would). About 32
bytes per entry, twice that while a replacement is being filled. Not thread-safe.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from typing import Callable, Iterator

from .index import DEAD, EntryIndex

__all__ = ["RidTable", "RidBuilder", "RequestIds", "rid_hash"]


def rid_hash(rid) -> int:
    """64-bit hash of a requestId (str or its utf-8 bytes), never 0. Process-local: never persisted."""
    if isinstance(rid, str):
        rid = rid.encode("utf-8", "surrogatepass")
    h = hash(rid)
    return h if h else 1


class RidTable:
    """requestId hash -> indexes: one open-addressing slot per distinct hash, holding the newest index;
    older indexes with the same hash are chained in ``older`` (index -> the previous one), which only
    repeated requestIds use. Dead or colliding values are filtered by callers.

    One slot per distinct hash keeps inserting and finding O(1) however often a requestId repeats
    (one slot per index made every insert walk all copies of its requestId). Dead heads are unlinked
    when a newer copy arrives; dead links in the middle of a chain go at the next rebuild."""

    __slots__ = ("keys", "vals", "mask", "used", "older")

    def __init__(self, capacity: int = 1024) -> None:
        cap = 1024
        while cap < capacity:
            cap <<= 1
        self.keys = array("q", bytes(8 * cap))
        self.vals = array("Q", bytes(8 * cap))
        self.mask = cap - 1
        self.used = 0                     # slots taken (distinct hashes)
        self.older: dict[int, int] = {}   # index -> previous index with the same hash

    def __len__(self) -> int:
        return self.used

    def insert(self, h: int, index: int, alive: Callable[[int], bool] | None = None) -> None:
        """Make ``index`` the newest value of ``h``. ``alive(i)``: False lets a dead previous head
        (and the dead ones before it) be unlinked instead of chained."""
        keys, mask = self.keys, self.mask
        i = h & mask
        while True:
            k = keys[i]
            if not k:
                if (self.used + 1) * 3 > (mask + 1) * 2:
                    raise OverflowError("table full")  # callers grow before this
                keys[i] = h
                self.vals[i] = index
                self.used += 1
                return
            if k == h:
                older = self.older
                head = self.vals[i]
                if alive is not None:
                    while head and not alive(head):
                        head = older.pop(head, 0)
                if head:
                    older[index] = head
                self.vals[i] = index
                return
            i = (i + 1) & mask

    def needs_rebuild(self, live: int) -> bool:
        """Time to rebuild from the live rows: the slots fill up, or dead links outnumber the live
        rows (amortised O(1) per insert either way)."""
        return (self.used + 1) * 5 > (self.mask + 1) * 3 or len(self.older) > 2 * live + 4096

    def candidates(self, h: int) -> Iterator[int]:
        """The indexes stored under ``h``, newest first."""
        keys, mask = self.keys, self.mask
        i = h & mask
        while True:
            k = keys[i]
            if not k:
                return
            if k == h:
                index = self.vals[i]
                older = self.older
                while index:
                    yield index
                    index = older.get(index, 0)
                return
            i = (i + 1) & mask

    def items(self) -> Iterator[tuple[int, int]]:
        """Every (hash, index) pair, each chain newest first."""
        keys, older = self.keys, self.older
        for i in range(len(keys)):
            h = keys[i]
            if h:
                index = self.vals[i]
                while index:
                    yield h, index
                    index = older.get(index, 0)

    @classmethod
    def of(cls, ix: EntryIndex) -> "RidTable":
        """A table of the live rows of ``ix``."""
        if ix.live == len(ix.idx):
            pairs = zip(ix.rh, ix.idx)
        else:
            rh, idx, loc = ix.rh, ix.idx, ix.loc
            pairs = ((rh[p], idx[p]) for p in range(len(idx)) if not loc[p] & DEAD)
        return cls.build(pairs, ix.live)

    @classmethod
    def build(cls, pairs, count: int) -> "RidTable":
        """A table sized for ``count`` live pairs (load <= 0.5) holding ``pairs`` of (hash, index)
        given in increasing index order."""
        t = cls(count * 2 + 16)
        keys, vals, mask, older = t.keys, t.vals, t.mask, t.older
        n = 0
        for h, index in pairs:
            if not h:
                continue
            i = h & mask
            while True:
                k = keys[i]
                if not k:
                    keys[i] = h
                    vals[i] = index
                    n += 1
                    break
                if k == h:
                    older[index] = vals[i]
                    vals[i] = index
                    break
                i = (i + 1) & mask
        t.used = n
        return t


class RidBuilder:
    """A fresh `RidTable` of the live rows, filled a few rows per call of `step` so that replacing a
    large table never stalls the caller (built at once, it would hold the event loop for a long time).
    The old table stays complete, and keeps taking every insert, until the builder has copied all
    rows, the ones appended meanwhile included; the caller then swaps it in. Rows are followed by
    index, so purges (rows move) and deaths (skipped or verified later) do not disturb it."""

    ROWS_PER_STEP = 32     # > 1 row per append: the builder catches up with the appends
    MIN_ROWS = 65536       # smaller tables are rebuilt at once (cheap, and keeps their old table's
                           # headroom argument simple: see `QueueLog.append`)

    __slots__ = ("table", "next")

    def __init__(self, ix: EntryIndex) -> None:
        rows = len(ix.idx)
        # room for every live row plus the rows appended before it catches up (<= rows / 31)
        self.table = RidTable((ix.live + rows // (self.ROWS_PER_STEP - 1) + 1024) * 2)
        self.next = 0      # the lowest index not copied yet

    def step(self, ix: EntryIndex, rows: int | None = None) -> bool:
        """Copy the next ``rows`` (default `ROWS_PER_STEP`) rows; True once every row is copied."""
        idx, loc, rh, table = ix.idx, ix.loc, ix.rh, self.table
        if rows is None:
            rows = self.ROWS_PER_STEP
        pos = bisect_left(idx, self.next)
        end = min(pos + rows, len(idx))
        for p in range(pos, end):
            h = rh[p]
            if h and not loc[p] & DEAD:
                table.insert(h, idx[p])
        if end >= len(idx):
            return True
        self.next = idx[end]
        return False

    def finish(self, ix: EntryIndex) -> RidTable:
        self.step(ix, len(ix.idx))
        return self.table


class RequestIds:
    """A log's requestId table, kept current by `note` for every append, and replaced once it fills
    up with dead rows: a small one at once, a large one through a `RidBuilder` that copies a few
    rows per append while this one keeps answering."""

    __slots__ = ("table", "build")

    def __init__(self, ix: EntryIndex) -> None:
        self.table = RidTable.of(ix)
        self.build: RidBuilder | None = None   # the replacement, while being filled

    def candidates(self, h: int) -> Iterator[int]:
        return self.table.candidates(h)

    def note(self, ix: EntryIndex, h: int, index: int, alive: Callable[[int], bool]) -> None:
        """Row ``index`` (requestId hash ``h``, 0 = none) was just appended to ``ix``."""
        build = self.build
        if h:
            try:
                self.table.insert(h, index, alive)
            except OverflowError:   # the old table's last third ran out before the builder finished
                self.table, self.build = (RidTable.of(ix) if build is None
                                          else build.finish(ix)), None   # this row included
                return
        if build is not None:
            if build.step(ix):
                self.table, self.build = build.table, None
        elif h and self.table.needs_rebuild(ix.live):
            if len(ix.idx) < RidBuilder.MIN_ROWS:
                self.table = RidTable.of(ix)   # also drops dead entries
            else:
                self.build = RidBuilder(ix)
