"""Exclusive ownership of a directory: an flock on a lock file, held for as long as the owner lives.

Strategy: a directory (a server's data directory, one queue's directory) is written by one process
at a time. The owner opens `<dir>/LOCK` and takes `flock(LOCK_EX | LOCK_NB)`; the kernel drops the
lock when the descriptor closes, also when the process is killed with SIGKILL, so a lock is never
stale (its file stays, holding the last owner's pid, which is only informative). A second owner is
refused at once with `DirectoryLocked`, which names the pid written by the holder. Readers (dump,
verify, stats) take no lock: they never write.

flock locks belong to the open file description, so a process that opens the same directory twice
is refused too: one `QueueLog` per queue directory, also within one process.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .errors import StorageError, StorageIOError

__all__ = ["LOCK_NAME", "DirLock", "DirectoryLocked", "lock_holder"]

LOCK_NAME = "LOCK"


class DirectoryLocked(StorageError):
    """Another process (or another open of this process) holds the directory's lock."""

    def __init__(self, path: str, pid: int | None) -> None:
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"{path} is in use by {holder}")
        self.path = str(path)
        self.pid = pid


def lock_holder(directory: str | os.PathLike, name: str = LOCK_NAME) -> int | None:
    """The pid written into `directory`'s lock file by its last owner (None if unknown). Whether it
    still holds the lock is for `DirLock.acquire` to say."""
    try:
        text = (Path(directory) / name).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


class DirLock:
    """The lock on one directory, held until `release()` (or the process ends). Not thread-safe."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: str | os.PathLike, name: str = LOCK_NAME) -> "DirLock":
        """Take `directory`'s lock, creating the lock file `name` (the directory must exist).

        Raises:
            DirectoryLocked: another owner holds it.
            StorageIOError: the lock file cannot be opened or written (permissions, not a directory).
        """
        directory = Path(directory)
        path = directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageIOError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DirectoryLocked(str(directory), lock_holder(directory, name)) from None
            raise StorageIOError(f"cannot lock {path}: {exc.strerror}") from exc
        try:   # informative only: who holds it, for the next owner's refusal message
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StorageIOError(f"cannot write {path}: {exc.strerror}") from exc
        return cls(directory, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the lock up (closing the descriptor drops the flock). Idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
