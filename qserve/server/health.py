"""Readiness (`GET /readyz`): can this server take traffic now, and if not, why (one line).

Strategy: the server listens once the queues it must serve (`--queues`, `--root-service`) are
open; the others in the store are opened (recovered) after that, and until they all are the
server is not ready (a request to one of them opens it at once). Then the question is whether
storage accepts writes now. It is asked
through the backend seam, so it holds for every backend: `Backend.listing` answers (with Redis:
Redis answered; unreachable, loading or refusing it raises `Unavailable`, whose one-line reason
is the answer) and lists no fenced queue (a queue on disk that cannot be opened: its requests get
503). The local backend's data directory is checked as well: it exists, is writable (a read-only
mount) and has room for the largest entry (not created yet: the directory above it is checked). A draining server is not ready either, so that a load
balancer stops sending before the connections close. Cheap enough for a probe every second: one
listing (in memory locally, a few round trips with Redis) and two system calls.

Start-up progress: recovering a large data directory can take a while, and each queue's line comes
only once it has opened; `reporting_progress` logs every `PROGRESS_EVERY` seconds meanwhile that
the start-up is still at it, and how far.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

from qserve.backends.base import Backend
from qserve.config import Config
from qserve.core.errors import QServeError

__all__ = ["not_ready", "data_dir_problem", "reporting_progress", "PROGRESS_EVERY"]

log = logging.getLogger("qserve")

PROGRESS_EVERY = 10.0   # seconds between two "still starting" lines


async def not_ready(config: Config, queues: Backend, *, stopping: bool, recovering: bool = False) -> str | None:
    """Why the server is not ready (one line), or None when it is."""
    if stopping:
        return "shutting down"
    if recovering:
        opened = len(queues.statistics())
        return f"starting: recovering the queues on disk ({opened} open so far)"
    if not config.backend:
        problem = data_dir_problem(Path(config.data_dir), config.max_payload_bytes)
        if problem is not None:
            return problem
    try:
        listed = await queues.listing()
    except QServeError as exc:
        return exc.reason
    fenced = sum(status.fenced is not None for status in listed)
    if fenced:
        return (f"{fenced} queue{'' if fenced == 1 else 's'} cannot be opened (fenced; GET /api/queues "
                "and the log say why)")
    return None


def data_dir_problem(path: Path, room: int) -> str | None:
    """Why the local backend's data directory ``path`` cannot take a write of ``room`` bytes now
    (a directory not created yet is judged by the nearest one above it that exists)."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"data directory {path}: {existing} is not a directory"
    try:
        fs = os.statvfs(existing)
    except OSError as exc:
        return f"data directory {path}: {exc.strerror or exc}"
    if not os.access(existing, os.W_OK):
        return f"data directory {path} is not writable"
    if fs.f_bavail * fs.f_frsize < room:
        return f"data directory {path}: disk full ({fs.f_bavail * fs.f_frsize} bytes free)"
    return None


@contextlib.contextmanager
def reporting_progress(nursery: trio.Nursery, opened: Callable[[], int],
                       every: float = PROGRESS_EVERY) -> Iterator[None]:
    """While the block runs (the start-up opening its queues), log every ``every`` seconds how
    long it has taken and how many queues ``opened()`` says are open so far."""
    scope = trio.CancelScope()

    async def report() -> None:
        with scope:
            began = trio.current_time()
            while True:
                await trio.sleep(every)
                n = opened()
                log.info("starting: %d queue%s opened in %.0f s so far; recovering the others", n,
                         "" if n == 1 else "s", trio.current_time() - began)

    nursery.start_soon(report)
    try:
        yield
    finally:
        scope.cancel()
