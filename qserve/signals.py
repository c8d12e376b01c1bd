"""Counting the stop signals a process receives, for the server's and the worker's watchers.

Both stop in two steps: the first SIGINT/SIGTERM asks for a graceful stop, a later one cuts it
short. What each step does differs (`server.server` drains then aborts, `worker.cli` drains then
drains at once), so only the counting is shared. It lives outside `server` and `worker` because
the worker package may not import the server (see tests/test_layers.py).
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterable, AsyncIterator

__all__ = ["numbered"]


async def numbered(signals: AsyncIterable[int]) -> AsyncIterator[tuple[int, signal.Signals]]:
    """Each signal from `signals` (a trio signal receiver) with its ordinal: 1 for the first."""
    received = 0
    async for signum in signals:
        received += 1
        yield received, signal.Signals(signum)
