"""Fences: a queue that is on disk but cannot be opened is fenced off; the server and its other queues go on.

Strategy: opening a queue directory can fail for reasons that belong to that queue alone: damage
that recovery refuses to skip (`storage.CorruptLog`), another process holding the directory
(`storage.DirectoryLocked`: a second server, or `qserve log repair` running right now), or an I/O
error (permissions). `manager.QueueManager` then records a `Fence` instead of failing: every request
to the queue gets a 503 whose one-line reason says what is wrong and what to do (the damaged file,
its offset and the repair command), the queue's attributes say it is fenced, and the server logs
one ERROR line per fence, not one per request. A fence is not final: a request retries the open
once the fence is older than `RETRY_AFTER` seconds or the queue directory's files changed
(`dir_stamp`), so a repaired queue opens without a restart; the manager runs one attempt at a time.

Only queues already on disk are fenced (a queue that fails to be *created* is refused as before),
so the number of fences is bounded by the queue directories under the data directory.
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from qserve import storage
from qserve.storage.lock import LOCK_NAME

from qserve.config import Config
from qserve.core.errors import QueueFenced
from qserve.core.events import QueueRef
from qserve.wire.names import HEADER_ATTRIBUTES

__all__ = ["Fence", "Fences", "RETRY_AFTER", "dir_stamp", "fence_reason", "fenced_attributes"]

log = logging.getLogger("qserve")

RETRY_AFTER = 1.0   # seconds (trio clock) after a failed open before a request tries again anyway

Stamp = tuple[tuple[str, int, int], ...]


def dir_stamp(path: Path) -> Stamp | None:
    """What the files of a queue directory look like: (name, size, mtime in ns) of each, sorted;
    None if the directory cannot be listed. `LOCK` is left out: every open attempt rewrites it."""
    try:
        with os.scandir(path) as entries:
            found = []
            for entry in entries:
                if entry.name == LOCK_NAME:
                    continue
                st = entry.stat(follow_symlinks=False)
                found.append((entry.name, st.st_size, st.st_mtime_ns))
    except OSError:
        return None
    return tuple(sorted(found))


def fence_reason(ref: QueueRef, path: Path, exc: storage.StorageError, *, fenced: bool = True) -> str:
    """The one-line reason of the fence `exc` puts on queue `ref` stored in directory `path`
    (``fenced=False``: the same reason for a queue that must open or the server does not start)."""
    where = os.path.abspath(path)
    head = f"queue {ref.name} is fenced: " if fenced else f"queue {ref.name} cannot be opened: "
    if isinstance(exc, storage.CorruptLog):
        return (f"{head}damage in {os.path.abspath(exc.path)} at offset {exc.offset}: {exc.reason}; "
                f"repair it with: qserve log repair {shlex.quote(where)}")
    if isinstance(exc, storage.DirectoryLocked):
        return (f"{head}{exc} (another qserve serve, or a qserve log repair running now)"
                + ("; the next request opens it once it is free" if fenced else ""))
    # storage names the file and the OS error
    return f"{head}{' '.join(str(exc).split())}" + ("; the next request tries again" if fenced else "")


@dataclass
class Fence:
    """A queue that failed to open. Owned by the queue manager (trio thread only)."""

    ref: QueueRef
    path: Path                # the queue directory
    reason: str               # one line, for clients and the log
    since: float              # trio clock time of the last failed attempt
    stamp: Stamp | None       # `dir_stamp(path)` after that attempt

    def due(self, now: float) -> bool:
        """May a request try to open the queue again? Yes once `RETRY_AFTER` seconds passed since
        the last attempt, or sooner when the directory's files changed (a repair finished)."""
        return now - self.since >= RETRY_AFTER or dir_stamp(self.path) != self.stamp

    def error(self, config: Config) -> QueueFenced:
        """The 503 a request to the fenced queue gets (carrying the queue's attributes)."""
        return QueueFenced(self.reason, attributes=fenced_attributes(self.ref, self.reason, config))


class Fences:
    """The fenced queues of one server, by queue. Not thread-safe: the trio thread only."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.by_ref: dict[QueueRef, Fence] = {}

    def check(self, ref: QueueRef, now: float) -> None:
        """Raise the queue's `QueueFenced` unless it has none or a retry is due (`Fence.due`)."""
        fence = self.by_ref.get(ref)
        if fence is not None and not fence.due(now):
            raise fence.error(self._config)

    def put_up(self, ref: QueueRef, path: Path, exc: storage.StorageError, now: float) -> QueueFenced:
        """Fence the queue `exc` stopped from opening; returns the error for the request. Logs one
        ERROR line per fence: a retry that fails the same way only renews it."""
        reason = fence_reason(ref, path, exc)
        old = self.by_ref.get(ref)
        if old is None or old.reason != reason:
            log.error("%s", reason)
        fence = self.by_ref[ref] = Fence(ref, path, reason, now, dir_stamp(path))
        return fence.error(self._config)

    def take_down(self, ref: QueueRef) -> None:
        """The queue opened (or its directory is gone): no fence any more."""
        if self.by_ref.pop(ref, None) is not None:
            log.info("queue %s is no longer fenced", ref.name)


def fenced_attributes(ref: QueueRef, reason: str, config: Config) -> dict[str, str]:
    """The attributes of a fenced queue: `queue.state` and `queue.fenced` say so, the static keys a
    client needs before its first call are there (Go's requires `meta.header.user`), the figures are
    not (nothing of the log is known)."""
    return {
        "queue.state": "fenced",
        "queue.fenced": reason,
        "meta.name": ref.name,
        "meta.backend": "qserve-segment-log",
        "meta.maxPayloadBytes": str(config.max_payload_bytes),
        "stream.maxPayloadBytes": str(config.max_payload_bytes),
        **HEADER_ATTRIBUTES,
    }
