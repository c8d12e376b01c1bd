"""What a storage failure means to a client: the local backend raises `qserve.core.errors` types only.

Why here: the seam (`backends.base`) promises the server `qserve.core.errors` types, so the core
and the server know nothing of `qserve.storage`; the one backend that uses storage says what each
of its errors is, at its own boundary. `Queue`'s operations are wrapped with `raising_core_errors`
(opening a queue maps its errors itself: `manager.QueueManager`, `fence`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from qserve import storage

from qserve.core.errors import InsufficientStorage, PayloadTooLarge, QServeError, QueueFull, Unavailable

__all__ = ["core_error", "raising_core_errors"]

P = ParamSpec("P")
T = TypeVar("T")


def core_error(exc: storage.StorageError) -> QServeError:
    """The client's error for a storage failure: 413, 429 (retry in a second), 507, else 503."""
    if isinstance(exc, storage.PayloadTooLarge):
        return PayloadTooLarge(str(exc) or "payload too large")
    if isinstance(exc, storage.QueueFull):
        return QueueFull(str(exc) or "queue is full", headers=[("Retry-After", "1")])
    if isinstance(exc, storage.DiskFull):
        return InsufficientStorage("no space left on the server's disk")
    return Unavailable("storage unavailable, try again later")   # I/O errors, closed or corrupt logs


def raising_core_errors(operation: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """``operation`` (an async seam call) with storage's errors raised as their `core_error`."""
    @functools.wraps(operation)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await operation(*args, **kwargs)
        except storage.StorageError as exc:
            raise core_error(exc) from exc
    return run
