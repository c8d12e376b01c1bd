"""Storage error hierarchy.

Strategy: one base class, ``StorageError``. Refusals that leave the log untouched
(``PayloadTooLarge``, ``QueueFull``, ``LogClosed``) are the caller's fault; ``DiskFull`` and
``StorageIOError`` are the environment's; ``CorruptLog`` is the data's. Nothing here knows about HTTP:
the server maps these to responses in one place.
"""

from __future__ import annotations

__all__ = [
    "StorageError", "PayloadTooLarge", "QueueFull", "LogClosed",
    "CorruptLog", "StorageIOError", "DiskFull",
]


class StorageError(Exception):
    """Base class of every error raised by ``storage``."""


class PayloadTooLarge(StorageError):
    """``len(data)`` exceeds ``LogConfig.max_payload_bytes``; nothing was written."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class QueueFull(StorageError):
    """The queue holds ``LogConfig.max_entries`` live entries; nothing was written."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"queue holds {length} entries, the limit is {limit}")
        self.length = length
        self.limit = limit


class LogClosed(StorageError):
    """The log was closed."""


class CorruptLog(StorageError):
    """A segment holds damage that recovery refuses to skip (open with ``LogConfig(repair=True)``)."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path} at offset {offset}: {reason}")
        self.path = str(path)
        self.offset = offset
        self.reason = reason


class StorageIOError(StorageError):
    """An I/O call failed. ``rolled_back`` is ``(first_seq, last_seq)`` when records were rolled back
    after an fsync failure, else ``None``."""

    rolled_back: tuple[int, int] | None = None


class DiskFull(StorageIOError):
    """A write failed with ENOSPC or EDQUOT; nothing was written."""
