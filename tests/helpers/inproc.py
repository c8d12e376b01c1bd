"""An in-process qserve over memory streams, for tests that need trio's clock (autojump_clock).

`running_server(tmp_path, **config)` yields a `Harness` whose `client()` opens an h11 client
connection to the real App/HTTP edge through a `MemoryListener`; nothing touches a socket, so a
long-poll's timeout or a watcher's keep-alive can be driven deterministically.

These servers run with `fsync="never"` unless told otherwise: an fsync runs in a worker thread, and
trio's autojump clock treats a task waiting for a thread as idle and jumps to the next deadline.
Durability is proven against real server processes (tests/process/test_process.py, tests/process/test_crash.py), not here.
"""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager

import trio
import trio_websocket

from qserve.wire import protobuf
from qserve.config import Config
from qserve.server.server import Server

from .peers import Client, MemoryListener

TOKEN = "tok"


class QClient(Client):
    """An h11 client that speaks to one service's queues."""

    def __init__(self, stream, service: str, headers=()) -> None:
        super().__init__(stream)
        self.service = service
        self.extra = list(headers)

    async def call(self, method: str, query: str = "", body: bytes = b"", headers=(), sink=False, dlq=False):
        kind = "/sink" if sink else "/dlq" if dlq else ""
        target = f"/api/predict/{self.service}{kind}" + (f"?{query}" if query else "")
        head, data = await self.request(method, target, body, [("Authorization", TOKEN), *self.extra, *headers])
        return head.status_code, data

    async def attrs(self, sink=False, dlq=False) -> dict:
        status, body = await self.call("GET", "_attrs_=true", sink=sink, dlq=dlq)
        assert status == 200
        return json.loads(body)


class Harness:
    def __init__(self, server: Server, listener: MemoryListener) -> None:
        self.server = server
        self.listener = listener

    async def client(self, service: str, headers=()) -> QClient:
        return QClient(await self.listener.connect(), service, headers)

    async def watch(self, nursery, service: str, query: str = "", *, user: str | None = None,
                    group: str = "g", sink: bool = False) -> trio_websocket.WebSocketConnection:
        """Open a WebSocket watch (`_watch_=true&...`) as consumer `group.user`."""
        stream = await self.listener.connect()
        headers = [("Authorization", TOKEN), ("X-EAS-QueueService-Gid", group)]
        if user is not None:
            headers.append(("X-EAS-QueueService-Uid", user))
        resource = f"/api/predict/{service}{'/sink' if sink else ''}?_watch_=true" + (f"&{query}" if query else "")
        return await trio_websocket.wrap_client_stream(nursery, stream, "test", resource, extra_headers=headers)


async def next_frame(ws, timeout: float = 5.0) -> protobuf.Frame:
    """The next pushed entry (trio clock seconds)."""
    with trio.fail_after(timeout):
        return protobuf.decode_frame(await ws.get_message())


async def no_frame(ws, wait: float = 2.0) -> bool:
    """True when nothing arrives for `wait` (trio clock) seconds."""
    with trio.move_on_after(wait):
        await ws.get_message()
        return False
    return True


@asynccontextmanager
async def running_server(tmp_path, *, fileio=None, wall_clock=time.time, **settings):
    settings.setdefault("data_dir", tmp_path / "data")
    settings.setdefault("token", TOKEN)
    settings.setdefault("fsync", "never")
    listener = MemoryListener()
    server = Server(Config(**settings), listeners=[listener], fileio=fileio, wall_clock=wall_clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        try:
            yield Harness(server, listener)
        finally:
            server.shutdown()
