"""Idempotent puts of one local queue (`core.policy`: ``dedup_window``).

Strategy: `RecentPuts` maps each requestId put within the window to its index, in put order, so
that expiring the oldest is a walk from the front; it is consulted and updated in the same
synchronous step as the append (the trio thread), so two concurrent puts of one requestId store
it once. Bounded by the puts of one window, and at most `MAX_REMEMBERED` (the oldest forgotten
first, logged once). Across a restart the window is rebuilt from the records on disk
(`recent_from_disk`: the ENTRY records of the segment files written within the window, whether
their entry has been consumed since or not); compaction keeps a sealed segment at least as long
as the window (`storage.LogConfig.retain_seconds`), so those records are there.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from qserve import storage
from qserve.storage.record import REQUEST_ID, EntryRecord

__all__ = ["RecentPuts", "recent_from_disk", "MAX_REMEMBERED"]

log = logging.getLogger("qserve")

MAX_REMEMBERED = 1_000_000   # requestIds one queue remembers (about 150 bytes each)


class RecentPuts:
    """requestId -> (index, put time in unix ms), oldest first. Not thread-safe."""

    def __init__(self, window: float, limit: int = MAX_REMEMBERED) -> None:
        self.window_ms = int(window * 1000)
        self.limit = limit
        self._seen: dict[str, tuple[int, int]] = {}
        self._warned = False

    def __len__(self) -> int:
        return len(self._seen)

    def find(self, request_id: str, now_ms: int) -> int | None:
        """The index ``request_id`` was stored at within the window, or None."""
        self.expire(now_ms)
        found = self._seen.get(request_id)
        return None if found is None else found[0]

    def note(self, request_id: str, index: int, at_ms: int) -> None:
        """``request_id`` was stored at ``index`` at ``at_ms`` (put order: ``at_ms`` never decreases much)."""
        self._seen.pop(request_id, None)
        self._seen[request_id] = (index, at_ms)
        if len(self._seen) > self.limit:
            del self._seen[next(iter(self._seen))]
            if not self._warned:
                self._warned = True
                log.warning("dedup window: more than %d requestIds put within it; the oldest are forgotten "
                            "early (a shorter --dedup-window bounds this)", self.limit)

    def expire(self, now_ms: int) -> None:
        oldest = now_ms - self.window_ms
        seen = self._seen
        while seen:
            first = next(iter(seen))
            if seen[first][1] >= oldest:
                break
            del seen[first]


def recent_from_disk(directory: Path, window: float, now: float) -> Iterator[tuple[str, int, int]]:
    """(requestId, index, put unix ms) of every ENTRY record in ``directory``'s segment files put
    within ``window`` seconds before ``now``, in file and record order (moved copies included:
    they keep their index and time). Blocking: run it in a worker thread."""
    since_ms = int((now - window) * 1000)
    segments = []
    for name in os.listdir(directory):
        if storage.parse_segment_name(name) is None:
            continue
        path = directory / name
        try:
            if os.stat(path).st_mtime < time.time() - window - 1:
                continue   # last written before the window (the file system's clock): nothing in it is recent
        except FileNotFoundError:
            continue
        segments.append(path)
    for path in sorted(segments):
        for _, record in storage.iter_records(path, lenient=True):
            if isinstance(record, EntryRecord) and record.timestamp_ms >= since_ms:
                rid = record.tags.get(REQUEST_ID)
                if isinstance(rid, str):
                    yield rid, record.index, record.timestamp_ms
