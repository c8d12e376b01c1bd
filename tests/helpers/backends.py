"""The queue backends the contract tests (and later the API suites) run against, by name.

`BACKENDS` lists them; `open_backend(name, tmp_path, **settings)` yields a started
`qserve.backends.base.Backend` whose ``on_change`` calls are recorded in ``changes``. A new backend
(issue 15: "redis") adds its name here and its branch in `open_backend`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from qserve.backends.base import Backend
from qserve.backends.local.manager import QueueManager
from qserve.config import Config

BACKENDS = ["local"]


@contextlib.asynccontextmanager
async def open_backend(name: str, tmp_path: Path, changes: list | None = None,
                       **settings) -> AsyncIterator[Backend]:
    """A running backend of kind ``name`` for one test; closed (synced) at the end."""
    def on_change(queue, entry) -> None:
        if changes is not None:
            changes.append((queue.ref, None if entry is None else entry.index))

    if name != "local":
        raise ValueError(f"no such backend: {name}")
    config = Config(data_dir=tmp_path / "data", **settings)
    backend = None
    try:
        async with trio.open_nursery() as tasks:   # the queues' flushers and housekeeping
            backend = QueueManager(config, tasks, on_change=on_change)
            yield backend
            tasks.cancel_scope.cancel()
    finally:
        if backend is not None:
            backend.close_all()
