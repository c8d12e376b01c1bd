"""SyncTicket: one group-commit round of a `QueueLog` (see log.py's docstring for the protocol).

``QueueLog.sync_begin`` (owner thread) makes a ticket holding dup'd fds of what must be synced
(or, with ``here=True``, the segment's own fd, for a round the owner thread runs, or hands to
something that takes its own reference to the file such as kernel AIO's ``io_submit``, before it
does anything else: nothing can close that fd meanwhile, and the round saves a dup and a close); someone
syncs them - `SyncTicket.run` in any thread, or anything else followed by `complete` -
and ``QueueLog.sync_end`` (owner thread) advances the durable point or rolls back.
"""

from __future__ import annotations

from .fileio import FileIO
from .segment import Segment

__all__ = ["SyncTicket"]


class SyncTicket:
    """One group-commit round. ``run()`` is safe to call from another thread: it only fsyncs (and
    closes) fds dup'd by ``sync_begin``. It re-raises the ``OSError`` of a failed fsync; the owner must
    still call ``sync_end``, which rolls back and raises ``StorageIOError``."""

    __slots__ = ("target", "fds", "io", "seg", "size", "done", "error", "owned", "plain_files")

    def __init__(self, io: FileIO, fds: list, target: int, seg: Segment, size: int, *, owned: bool = True,
                 plain_files: bool = False) -> None:
        self.io, self.fds, self.target, self.seg, self.size = io, fds, target, seg, size
        self.owned = owned   # the fds are the ticket's (dup'd): it closes them; else the segment's
        # the log's files are plain (`Durability.plain_files`): whoever syncs them some other way
        # than `run` (kernel AIO, say) does what ``io.fsync`` would have done
        self.plain_files = plain_files
        self.done = False
        self.error: OSError | None = None

    def run(self) -> None:
        error: OSError | None = None
        try:
            for fd in self.fds:
                try:
                    self.io.fsync(fd)
                except OSError as exc:
                    error = error or exc
        finally:
            self.complete(error)
        if self.error is not None:
            raise self.error

    def complete(self, error: OSError | None = None) -> None:
        """Finish the round after syncing ``fds`` some other way than `run` (the first error, or
        None): closes the dup'd fds; the owner then calls ``sync_end`` as after `run`."""
        fds, self.fds = self.fds, []
        if error is not None and self.error is None:
            self.error = error
        if not self.owned:
            fds = []
        for fd in fds:
            try:
                self.io.close(fd)
            except OSError:
                pass
        self.done = True

    def close(self) -> None:
        """Release the dup'd fds without syncing (ticket abandoned)."""
        fds, self.fds = self.fds, []
        if self.owned:
            for fd in fds:
                self.io.close(fd)
