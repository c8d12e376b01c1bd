"""Durability of a `QueueLog`: group commit, inline fsync, and the rollback after a failed fsync.

Strategy: ``appended_seq`` counts the records written and ``durable_seq`` the ones known to be on
disk. A group-commit round is ``sync_begin`` (owner thread: dup the active segment's fd into a
`SyncTicket`), ``SyncTicket.run`` (any thread: fsync), ``sync_end`` (owner thread: advance
``durable_seq``). Only the active segment ever holds non-durable bytes (a roll fsyncs the old one
first, `_fsync_or_rollback`), so a failed fsync is undone by cutting the active segment back to its
durable size and rebuilding memory from disk (`_rollback`).

`Durability` is a mixin of `QueueLog` (log.py), kept apart because it is one concern with its own
invariants; the annotations below are what it uses of its host.
"""

from __future__ import annotations

from typing import Callable

from .fileio import FileIO
from .segment import Segment, io_error
from .sync import SyncTicket

__all__ = ["Durability"]


class Durability:
    """Group commit and rollback for `QueueLog` (which provides the attributes annotated here)."""

    appended_seq: int           # records written so far
    durable_seq: int            # records known to be fsynced
    next_index: int
    io: FileIO
    _segs: list[Segment]
    _counters: dict[str, int]
    _failed: str | None
    _check: Callable[[], None]
    _load: Callable[..., bool]

    @property
    def _active(self) -> Segment:
        return self._segs[-1]

    @property
    def plain_files(self) -> bool:
        """The segments are plain files of the default `FileIO` (no injected file layer): whoever
        syncs a round some other way than `SyncTicket.run` (kernel AIO, say) does what
        ``io.fsync`` would have done."""
        return type(self.io) is FileIO

    def _fsync_or_rollback(self, seg: Segment) -> None:
        """fsync the active segment inline; on failure roll back and raise."""
        target, size = self.appended_seq, seg.size
        try:
            self.io.fsync(seg.fd)
        except OSError as exc:
            self._rollback(exc)
        seg.durable_size = size
        self.durable_seq = max(self.durable_seq, target)

    def sync_begin(self, *, here: bool = False) -> SyncTicket:
        """Start a group-commit round (owner thread). Covers every record written so far.
        ``here``: the owner thread runs the round itself before it touches the log again, so the
        ticket syncs the segment's own fd instead of a dup (sync.py)."""
        self._check()
        seg = self._active
        target = self.appended_seq
        if target <= self.durable_seq:
            fds = []
        else:
            fds = [seg.fd] if here else [self.io.dup(seg.fd)]
        return SyncTicket(self.io, fds, target, seg, seg.size, owned=not here, plain_files=self.plain_files)

    def sync_end(self, ticket: SyncTicket) -> None:
        """Finish a round (owner thread): ``durable_seq = ticket.target``.

        Raises:
            StorageIOError: the fsync failed. Every record written since ``durable_seq`` was rolled
                back (``exc.rolled_back = (first_seq, last_seq)``; fail those requests); afterwards
                ``durable_seq == last_seq`` and one CHECKPOINT (the next index) is pending.
        """
        self._check()
        if ticket.error is not None:
            self._rollback(ticket.error)
        if not ticket.done:
            ticket.close()
            raise RuntimeError("sync_end() before ticket.run() finished")
        if ticket.target > self.durable_seq:
            self.durable_seq = ticket.target
            if ticket.seg is self._active:
                ticket.seg.durable_size = max(ticket.seg.durable_size, ticket.size)

    def sync(self) -> None:
        """fsync everything written so far (sync_begin + run + sync_end inline)."""
        t = self.sync_begin(here=True)
        try:
            t.run()
        except OSError:
            pass                  # recorded in the ticket: sync_end rolls back and raises
        self.sync_end(t)

    def _rollback(self, exc: OSError) -> None:
        """The fsync failed with ``exc``: drop every record written since ``durable_seq`` (cut the
        active segment to its durable size, rebuild memory from disk) and raise `StorageIOError`
        with ``rolled_back = (first_seq, last_seq)``. If even that fails the log is marked failed."""
        first, last = self.durable_seq + 1, self.appended_seq
        self._counters["rollbacks"] += 1
        seg = self._active
        try:
            seg.truncate_to(seg.durable_size)
            keep_next = self.next_index
            for s in self._segs:
                s.close()
            wrote = self._load(keep_next=keep_next)   # memory := what is on disk
        except Exception as exc2:                     # cannot get back to a known state
            self._failed = f"rollback failed: {exc2}"
            wrote = False
        self.durable_seq = self.appended_seq
        if wrote:
            self.appended_seq += 1
        err = io_error(exc, f"fsync failed, rolled back records {first}..{last}")
        err.rolled_back = (first, last)
        raise err
