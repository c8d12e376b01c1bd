"""The queue backends the contract tests (and later the API suites) run against, by name.

`BACKENDS` lists them; `open_backend(name, tmp_path, **settings)` yields a started
`qserve.backends.base.Backend` whose ``on_change`` calls are recorded in ``changes``: "local" is the
segment log in ``tmp_path/"data"``, "redis" is Redis at ``redis_url`` (the `redis_url` fixture: a
real `redis-server`, emptied for the test). The `backend_name` and `backend_url` fixtures
(tests/conftest.py) parametrize a test by backend and ask for a Redis only for "redis", so a
machine without `redis-server` skips just those cases.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from qserve.backends.base import Backend
from qserve.backends.local.manager import QueueManager
from qserve.backends.redis.manager import RedisBackend
from qserve.config import Config

BACKENDS = ["local", "redis"]


@contextlib.asynccontextmanager
async def open_backend(name: str, tmp_path: Path, changes: list | None = None, *,
                       redis_url: str | None = None, **settings) -> AsyncIterator[Backend]:
    """A running backend of kind ``name`` for one test; closed (synced) at the end.

    Args:
        name: one of `BACKENDS`.
        tmp_path: the test's directory (the local backend's data directory is ``tmp_path/"data"``).
        changes: if given, every ``on_change`` call is appended as ``(queue ref, index or None)``.
        redis_url: the Redis to use for "redis" (the `redis_url` or `backend_url` fixture).
        settings: further `Config` fields.
    """
    def on_change(queue, entry) -> None:
        if changes is not None:
            changes.append((queue.ref, None if entry is None else entry.index))

    if name not in BACKENDS:
        raise ValueError(f"no such backend: {name}")
    if name == "redis" and not redis_url:
        raise ValueError("the redis backend needs redis_url (the redis_url or backend_url fixture)")
    config = Config(backend=redis_url if name == "redis" else "", data_dir=tmp_path / "data", **settings)
    backend = None
    try:
        async with trio.open_nursery() as tasks:   # local: flushers, housekeeping; redis: the node's tasks
            if name == "local":
                backend = QueueManager(config, tasks, on_change=on_change)
            else:
                backend = RedisBackend(config, tasks, on_change=on_change)
                await backend.start()
            yield backend
            tasks.cancel_scope.cancel()
    finally:
        if backend is not None:
            backend.close_all()
