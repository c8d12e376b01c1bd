"""Queue directories on disk for the server tests: built with `storage.QueueLog`, damaged by flipping a
byte, reopened after the server stopped; and `SwitchIO`, a FileIO whose faults a test switches on
while a server runs."""

from __future__ import annotations

import errno
import os
import threading

from qserve import storage
from qserve.backends.local.queues import queue_dir
from qserve.core.events import QueueRef
from qserve.storage import LogConfig, QueueLog, iter_records
from qserve.storage.record import EntryRecord

LIMIT = 20   # seconds (real time) a gated fsync waits for its release at most
ENTRIES = 40   # entries in a queue built by the fence and admin tests


def build_queue(path, entries: int, segment_bytes: int = 1024) -> None:
    """A queue directory holding `entries` entries over several sealed segments."""
    qlog = QueueLog.open(path, LogConfig(segment_bytes=segment_bytes))
    try:
        for i in range(1, entries + 1):
            qlog.append(f"entry {i} ".encode() + b"x" * 60, {"requestId": f"r{i}"})
    finally:
        qlog.close()


def damage_sealed_segment(path) -> tuple[str, int, int]:
    """Flip a byte inside an entry record in the middle of the first (sealed) segment: not a torn
    tail, so recovery refuses it. Returns the segment's path, the record's offset and its index."""
    seg = sorted(p for p in path.iterdir() if p.suffix == ".seg")[0]
    entries = [(off, r) for off, r in iter_records(seg) if isinstance(r, EntryRecord)]
    off, rec = entries[len(entries) // 2]
    data = bytearray(seg.read_bytes())
    data[off + 12] ^= 0xFF   # past the 8-byte frame header: the CRC no longer matches
    seg.write_bytes(bytes(data))
    return str(seg), off, rec.index


class SwitchIO(storage.FileIO):
    """A FileIO with fault switches, flipped by the test while the server runs.

    - `full`: every write fails with ENOSPC (nothing written);
    - `fail_fsync`: every fsync fails with EIO;
    - `short`: the next write writes half its bytes and reports the short count (one-shot);
    - `gate`: when set, an fsync made off the trio thread (the group-commit flusher) waits for it
      to be released (`release()`); `gated` is set once one is waiting.
    """

    def __init__(self) -> None:
        self.full = False
        self.fail_fsync = False
        self.short = False
        self.writes = 0
        self.fsyncs = 0
        self.gate: threading.Event | None = None
        self.gated = threading.Event()

    def write(self, fd, data):
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.writes += 1
        if self.short:
            self.short = False
            return os.write(fd, bytes(data[: len(data) // 2]))
        return super().write(fd, data)

    def pwrite(self, fd, data, offset):
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.writes += 1
        if self.short:
            self.short = False
            return os.pwrite(fd, bytes(data[: len(data) // 2]), offset)
        return super().pwrite(fd, data, offset)

    def fsync(self, fd):
        gate = self.gate
        if gate is not None and threading.current_thread() is not threading.main_thread():
            self.gated.set()
            gate.wait(LIMIT)
        self.fsyncs += 1
        if self.fail_fsync:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().fsync(fd)

    def hold(self) -> None:
        self.gated.clear()
        self.gate = threading.Event()

    def release(self) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.set()


def reopen(tmp_path, service: str, sink: bool = False) -> storage.QueueLog:
    """The queue's directory opened afresh with the plain FileIO (after the server stopped)."""
    return storage.QueueLog.open(queue_dir(tmp_path / "data", QueueRef(service, sink=sink)))


def contents(qlog: storage.QueueLog) -> list[tuple[int, bytes]]:
    return [(e.index, e.data) for e in qlog.scan()]


def damaged_queue(data_dir, service: str) -> None:
    qdir = queue_dir(data_dir, QueueRef(service))
    qlog = storage.QueueLog.open(qdir, storage.LogConfig())
    for i in range(3):
        qlog.append(b"x" * 100, {"n": str(i)}, 0)
    qlog.close()
    segment = sorted(qdir.glob("*.seg"))[0]
    data = bytearray(segment.read_bytes())
    data[60] ^= 0xFF    # inside the first entry record: a CRC mismatch recovery refuses to skip
    segment.write_bytes(bytes(data))
