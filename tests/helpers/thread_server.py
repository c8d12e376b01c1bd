"""A qserve `Server` running in a thread of the test process (its own trio run) on a loopback port:
the official SDK, which blocks, talks to it from the test's thread exactly as it talks to a
`ServerProcess` (same ``endpoint``, ``url`` and ``token``), but the server's code runs in-process.
"""

from __future__ import annotations

import threading
from pathlib import Path

import trio

from qserve.config import Config
from qserve.server.server import Server

START_TIMEOUT = 30.0


class ThreadServer:
    """`start()` runs the server in a thread and waits (bounded) until it listens; `stop()` shuts it
    down gracefully and joins the thread."""

    def __init__(self, data_dir: Path, *, token: str = "test-token", **settings) -> None:
        self.token = token
        self.config = Config(host="127.0.0.1", port=0, data_dir=data_dir, token=token, **settings)
        self.port: int | None = None
        self._server: Server | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qserve-in-process", daemon=True)
        self._failure: BaseException | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ThreadServer":
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT) or self.port is None:
            raise RuntimeError(f"in-process server did not start: {self._failure!r}")
        return self

    def stop(self) -> None:
        if self._trio_token is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._server.shutdown, trio_token=self._trio_token)
        self._thread.join(START_TIMEOUT)
        assert not self._thread.is_alive(), "in-process server did not stop"

    def _run(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:   # reported by start() (or lost at stop: the test has ended)
            self._failure = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        self._server = Server(self.config)
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(self._server.run)
            self._ready.set()
