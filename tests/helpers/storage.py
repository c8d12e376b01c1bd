"""Helpers for storage tests: file damage functions, a plain in-memory model, a fault-injecting FileIO."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from qserve.storage import FileIO, LogConfig, QueueLog, StorageError, parse_segment_name


def segments(d) -> list[Path]:
    return sorted(p for p in Path(d).iterdir() if parse_segment_name(p.name) is not None)


def corrupt(path, offset: int, xor: int = 0xFF) -> None:
    """Flip bits of one byte."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ xor]))


def cut(path, size: int) -> None:
    """Truncate the file to ``size`` bytes (a torn write)."""
    os.truncate(path, size)


def zero_tail(path, nbytes: int) -> None:
    """Append ``nbytes`` zero bytes (a file system that extended the file but lost the data)."""
    with open(path, "ab") as f:
        f.write(bytes(nbytes))


def clock(start=1000.0):
    """A fake ``now`` for `QueueLog.open`: each call is 1 ms after the last."""
    t = [start]

    def now():
        t[0] += 0.001
        return t[0]
    return now


def tiny(**kw) -> LogConfig:
    kw.setdefault("segment_bytes", 2048)
    return LogConfig(**kw)


def crash(log: QueueLog) -> None:
    """What the death of the process holding `log` leaves: its descriptors closed with nothing
    synced or trimmed, so the kernel drops its directory lock (storage/lock.py)."""
    for seg in log._segs:
        seg.close()
    log._lock.release()


def failed_round(log: QueueLog, io: "FaultyIO") -> None:
    """One group-commit round whose fsync fails (EIO): the log rolls back what it had not synced."""
    t = log.sync_begin()
    io.fsync_errno = EIO
    with pytest.raises(OSError):
        t.run()
    io.fsync_errno = None
    with pytest.raises(StorageError):
        log.sync_end(t)


def snapshot(log: QueueLog) -> dict:
    """Everything observable about a log."""
    return {
        "entries": [(e.index, e.tags, e.data, e.priority, e.timestamp_ms) for e in log.scan()],
        "dispatch": list(log.iter_dispatch()),
        "length": log.length, "first": log.first_index, "last": log.last_index,
        "next": log.next_index, "state": log.state,
    }


class Model:
    """The obvious in-memory queue the log must behave like."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple] = {}
        self.next_index = 1
        self.state: dict[str, str] = {}

    def append(self, data, tags, priority):
        i = self.next_index
        self.next_index += 1
        self.entries[i] = (dict(tags), data, priority)
        return i

    def delete(self, indexes):
        gone = sorted({i for i in indexes if i in self.entries})
        for i in gone:
            del self.entries[i]
        return gone

    def truncate(self, below):
        gone = [i for i in self.entries if i < below]
        for i in gone:
            del self.entries[i]
        return len(gone)

    def dispatch(self, start=0):
        live = sorted(i for i in self.entries if i >= start)
        return sorted(((i, self.entries[i][2]) for i in live), key=lambda t: (-t[1], t[0]))


class CountingIO(FileIO):
    """FileIO that counts its preads (a read served from memory makes none)."""

    def __init__(self) -> None:
        self.preads = 0

    def pread(self, fd, size, offset):
        self.preads += 1
        return super().pread(fd, size, offset)


class FaultyIO(FileIO):
    """FileIO with switchable faults."""

    def __init__(self) -> None:
        self.write_errno: int | None = None   # fail every write with this errno
        self.short_write = False              # write half, then report a short write
        self.fsync_errno: int | None = None   # fail every fsync with this errno
        self.fsyncs = 0

    def write(self, fd, data):
        if self.write_errno is not None:
            raise OSError(self.write_errno, os.strerror(self.write_errno))
        if self.short_write:
            return os.write(fd, bytes(data[: len(data) // 2]))
        return super().write(fd, data)

    def pwrite(self, fd, data, offset):
        if self.write_errno is not None:
            raise OSError(self.write_errno, os.strerror(self.write_errno))
        if self.short_write:
            return os.pwrite(fd, bytes(data[: len(data) // 2]), offset)
        return super().pwrite(fd, data, offset)

    def fsync(self, fd):
        self.fsyncs += 1
        if self.fsync_errno is not None:
            raise OSError(self.fsync_errno, os.strerror(self.fsync_errno))
        super().fsync(fd)


ENOSPC = errno.ENOSPC
EIO = errno.EIO
