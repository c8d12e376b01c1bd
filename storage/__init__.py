"""qserve storage: a crash-safe segment log of queue entries (plain synchronous Python).

Strategy (the full format is in FORMAT.md, written before the code):

* One queue = one directory of segment files ``<20-digit base>.seg``. Every record is framed
  ``u32 length | u32 crc32 | msgpack body`` (big endian); types: ENTRY, DELETE, TRUNCATE, STATE and a
  CHECKPOINT that starts every segment and carries next index, truncate watermark, state and the list of
  segments that must exist.
* Appends go to the active (last) segment with one ``os.write``; group commit (``sync_begin`` /
  ``SyncTicket.run`` in any thread / ``sync_end``) makes them durable. A failed fsync rolls back every
  record written since the last durable point.
* The in-memory index (array columns + an open-addressing requestId table) is derived: rebuilt by
  scanning on open, never persisted.
* Recovery tells apart a clean end, a torn tail (cut after a ``.broken`` copy) and corruption (refused
  with ``CorruptLog`` unless ``LogConfig(repair=True)``).
* Sealed segments with few live entries are compacted forward; empty ones are dropped.

Imports nothing but the standard library and msgpack.
"""

from .errors import (CorruptLog, DiskFull, LogClosed, PayloadTooLarge, QueueFull, StorageError,
                     StorageIOError)
from .fileio import FileIO
from .lock import DirectoryLocked, DirLock, lock_holder
from .log import LogConfig, QueueLog, SyncTicket
from .reads import Entry
from .record import ReadOutcome, iter_records
from .recovery import RecoveryReport
from .segment import parse_segment_name, segment_name

__all__ = [
    "QueueLog", "LogConfig", "Entry", "RecoveryReport", "SyncTicket", "FileIO",
    "StorageError", "PayloadTooLarge", "QueueFull", "CorruptLog", "LogClosed", "DiskFull",
    "StorageIOError", "segment_name", "parse_segment_name", "iter_records", "ReadOutcome",
    "DirLock", "DirectoryLocked", "lock_holder",
]
