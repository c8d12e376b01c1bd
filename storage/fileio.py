"""All file-system calls of ``storage`` go through one ``FileIO`` object.

Strategy: a thin, stateless wrapper over ``os`` so tests can subclass it and inject faults (ENOSPC,
short writes, fsync errors) at exactly one seam. The log never calls ``os`` file functions directly.
``FileIO`` is thread-safe (it holds no state); ``fsync`` is the only method called off the owner thread.
"""

from __future__ import annotations

import errno
import os

__all__ = ["FileIO", "is_disk_full"]


def is_disk_full(exc: OSError) -> bool:
    """True if ``exc`` means the disk (or quota) is full."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class FileIO:
    """File operations used by the log. Subclass and override to inject faults."""

    def open_rw(self, path: str) -> int:
        """Open an existing file for reading and writing (not O_APPEND: segments are written with
        ``pwrite`` at their logical end, over preallocated zeros); returns an fd."""
        return os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))

    def create(self, path: str) -> int:
        """Create (or truncate) a file for writing; returns an fd."""
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)

    def write(self, fd: int, data: bytes) -> int:
        """One write(2); returns the number of bytes written (may be short)."""
        return os.write(fd, data)

    def pwrite(self, fd: int, data, offset: int) -> int:
        """One pwrite(2) at ``offset``; returns the number of bytes written (may be short)."""
        return os.pwrite(fd, data, offset)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def read_head(self, path: str, size: int) -> bytes:
        """The first ``size`` bytes of a file (fewer if it is shorter)."""
        with open(path, "rb") as f:
            return f.read(size)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def close(self, fd: int) -> None:
        os.close(fd)

    def dup(self, fd: int) -> int:
        return os.dup(fd)

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def remove(self, path: str) -> None:
        os.remove(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def fsync_dir(self, path: str) -> None:
        """fsync a directory so renames/creates/unlinks in it are durable."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_file_atomic(self, path: str, data: bytes) -> None:
        """Create ``path`` with ``data``: temp file -> write -> fsync -> rename -> fsync of the directory."""
        tmp = path + ".tmp"
        fd = self.create(tmp)
        try:
            view = memoryview(data)
            while view:
                n = self.write(fd, view)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                view = view[n:]
            self.fsync(fd)
        except BaseException:
            self.close(fd)
            try:
                self.remove(tmp)
            except OSError:
                pass
            raise
        self.close(fd)
        self.rename(tmp, path)
        self.fsync_dir(os.path.dirname(path) or ".")
