"""The life of a completion reaper (kernel AIO's and the fsync threads' alike).

Why one helper: a reaper hands finished fsyncs back to the tasks waiting on them. When it is
cancelled (the server stops), fsyncs already handed to the kernel or to a thread are still running;
their completions must be collected before the reaper's resources (a kernel AIO context, the
threads' doorbell) are released, or a waiter would never be answered and a descriptor could be
closed under a running fsync. So: reap until cancelled, refuse new work, then keep reaping,
shielded, while anything is outstanding.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

__all__ = ["reap_then_drain"]


async def reap_then_drain(reap: Callable[[], Awaitable[None]], outstanding: Callable[[], bool],
                          stop_taking: Callable[[], None]) -> None:
    """Await ``reap()`` (one wait for completions and their hand-over) until cancelled; then call
    ``stop_taking()`` (no new work is accepted from here) and keep reaping, shielded from the
    cancellation, while ``outstanding()`` is true."""
    try:
        while True:
            await reap()
    finally:
        stop_taking()
        with trio.CancelScope(shield=True):
            while outstanding():
                await reap()
