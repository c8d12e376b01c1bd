"""The blocking facade of the qserve client, for scripts and the ``qserve stream`` CLI.

Strategy: one daemon thread runs ``trio.run`` with a long-lived nursery; every blocking call is
``trio.from_thread.run(...)`` with that loop's token, so the async `QueueClient` does all the work
and the calling thread just waits for the answer (its exceptions re-raised in the caller). A
blocking watch is a task in that nursery that enters ``client.watch(...)`` and forwards entries
through an unbuffered channel, which ``__next__`` reads; the task lives exactly as long as the
``with`` block. `close` stops the loop and joins the thread. (``trio.lowlevel.start_guest_run``
is not needed: nothing here has a host event loop to share.)

Task safety: any number of threads may call one `BlockingQueueClient` at once.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Mapping

import trio

from qserve.client.queue_client import Entry, QueueClient

__all__ = ["BlockingQueueClient", "BlockingWatcher"]


class _LoopThread:
    """A trio loop in a daemon thread that runs async functions for other threads."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.nursery: trio.Nursery | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), name="qserve-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        self.closed = False

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, afn, *args):
        if self.closed:
            raise RuntimeError("the client is closed")
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def run_sync(self, fn, *args):
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join()


class BlockingWatcher:
    """``with client.watch(...) as w: for entry in w: ...`` — a `Watcher` driven from a plain thread."""

    def __init__(self, loop: _LoopThread, client: QueueClient, kwargs: dict) -> None:
        self._loop = loop
        self._client = client
        self._kwargs = kwargs
        self._error: BaseException | None = None
        self._scope: trio.CancelScope | None = None
        self._done: trio.Event | None = None
        self._send = self._receive = None

    async def _task(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._send, self._receive = trio.open_memory_channel(0)
        try:
            with self._scope:
                async with self._client.watch(**self._kwargs) as watcher:
                    task_status.started()
                    try:
                        async for entry in watcher:
                            await self._send.send(entry)
                    except Exception as exc:  # handed to the reading thread, not to the loop's nursery
                        self._error = exc
        finally:
            self._send.close()
            self._done.set()

    def __enter__(self) -> "BlockingWatcher":
        self._loop.run(self._loop.nursery.start, self._task)
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop watching (idempotent); uncommitted entries go back to the group."""
        if self._scope is not None and not self._loop.closed:
            self._loop.run_sync(self._scope.cancel)
            self._loop.run(self._done.wait)

    def __iter__(self) -> "BlockingWatcher":
        return self

    def __next__(self) -> Entry:
        if self._receive is None:
            raise RuntimeError("use the watcher inside a `with` block")
        try:
            return self._loop.run(self._receive.receive)
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._error is not None:
                raise self._error from None
            raise StopIteration from None


class BlockingQueueClient:
    """The blocking twin of `QueueClient`: same arguments, same methods without ``await``.

    ``watch(...)`` returns a `BlockingWatcher` (a context manager and an iterator). Call `close`
    (or use ``with``) to stop the background loop thread.
    """

    def __init__(self, url: str, *, _loop: _LoopThread | None = None, **kwargs) -> None:
        self._client = QueueClient(url, **kwargs)
        self._owns_loop = _loop is None
        self._loop = _loop or _LoopThread()

    @property
    def client(self) -> QueueClient:
        """The underlying async client (its settings: url, user, group, timeout, ...)."""
        return self._client

    def sink(self) -> "BlockingQueueClient":
        """The sink queue's client, sharing this client's loop thread (closed with this one)."""
        other = BlockingQueueClient.__new__(BlockingQueueClient)
        other._client, other._owns_loop, other._loop = self._client.sink(), False, self._loop
        return other

    def _run(self, method: str, *args, **kwargs):
        return self._loop.run(functools.partial(getattr(self._client, method), *args, **kwargs))

    def put(self, data: bytes, tags: Mapping[str, str] | None = None, **kwargs) -> tuple[int, str]:
        return self._run("put", data, tags, **kwargs)

    def get(self, **kwargs) -> list[Entry]:
        return self._run("get", **kwargs)

    def attributes(self) -> dict[str, str]:
        return self._run("attributes")

    def delete(self, indexes: int | Iterable[int]) -> None:
        return self._run("delete", indexes)

    def truncate(self, index: int) -> None:
        return self._run("truncate", index)

    def commit(self, indexes: int | Iterable[int]) -> None:
        return self._run("commit", indexes)

    def negative(self, indexes: int | Iterable[int], code: str = "", reason: str = "") -> None:
        return self._run("negative", indexes, code, reason)

    def search(self, index: int) -> dict:
        return self._run("search", index)

    def count(self, **kwargs) -> int:
        return self._run("count", **kwargs)

    def end(self, **kwargs) -> None:
        return self._run("end", **kwargs)

    def replay(self, indexes: int | Iterable[int]) -> list[dict]:
        return self._run("replay", indexes)

    def watch(self, **kwargs) -> BlockingWatcher:
        return BlockingWatcher(self._loop, self._client, kwargs)

    def close(self) -> None:
        """Close the connections and, if this client started it, stop the loop thread."""
        if self._loop.closed:
            return
        self._run("aclose")
        if self._owns_loop:
            self._loop.close()

    def __enter__(self) -> "BlockingQueueClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
