"""What a storage failure means to a client: the local backend raises `qserve.core.errors` types only.

Why here: the seam (`backends.base`) promises the server `qserve.core.errors` types, so the core
and the server know nothing of `qserve.storage`; the one backend that uses storage says what each
of its errors is, at its own boundary. `Queue`'s operations are wrapped with `raising_core_errors`
(opening a queue maps its errors itself: `manager.QueueManager`, `fence`). A failure of the disk
(503, 507) is logged there once, in storage's own words, which the client's reason leaves out; the
error is marked logged, so the edge (an HTTP answer or a watch's close) does not log it again.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from qserve import storage

from qserve.core.errors import (InsufficientStorage, PayloadTooLarge, QServeError, QueueFull, ServerError,
                                Unavailable)

__all__ = ["core_error", "raising_core_errors", "as_core_error"]

log = logging.getLogger("qserve")

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
    """``operation`` (an async method of a `queues.Queue`) with storage's errors raised as their
    `core_error`; a disk failure is logged with the queue's name and storage's reason."""
    @functools.wraps(operation)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await operation(*args, **kwargs)
        except storage.StorageError as exc:
            raise as_core_error(args[0], operation.__name__, exc) from exc
    return run


def as_core_error(queue, operation: str, exc: storage.StorageError) -> QServeError:
    """`core_error` of ``exc``, a failure of ``operation`` on ``queue`` (a `queues.Queue`); a disk
    failure is logged with the queue's name and storage's reason, and marked logged."""
    err = core_error(exc)
    if isinstance(err, ServerError):
        log.error("queue %s: %s failed: %s", queue.ref.name, operation, exc)
        err.logged = True
    return err
