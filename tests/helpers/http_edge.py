"""What the HTTP/WebSocket edge tests share: the time bound, a small `HTTPConfig`, an echoing test
application, servers on loopback TCP or on a `MemoryListener`, and ways to read what they answered
(a header, raw bytes split into responses, waiting without sleeping until the server settled), and
an application streaming its response."""

from __future__ import annotations

from contextlib import asynccontextmanager

import h11
import trio
import trio.testing

from qserve.core import errors
from qserve.server.http import HTTPServer
from qserve.server.types import HTTPConfig, Request, Response

from .peers import MemoryListener

LIMIT = 10  # seconds (trio's clock) for any test

SMALL = HTTPConfig(max_header_bytes=4096, max_body_bytes=1000, keepalive_timeout=5.0,
                   request_timeout=3.0, shutdown_grace=2.0)



def hdr(response: h11.Response, name: bytes) -> bytes | None:
    return dict(response.headers).get(name)


async def settled(predicate, rounds: int = 50) -> None:
    """Wait, without sleeping, until the server has processed what the kernel delivered (loopback
    delivers synchronously, and trio polls I/O before waking idle waiters), then check."""
    for _ in range(rounds):
        await trio.testing.wait_all_tasks_blocked()
        if predicate():
            return
    raise AssertionError("condition never became true")


def parse_responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Split raw bytes into responses (each to a GET), with an h11 client that 'sent' them."""
    conn, out = h11.Connection(h11.CLIENT), []
    conn.receive_data(data)
    while True:
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        event = conn.next_event()
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return out
        body = b""
        while not isinstance(e := conn.next_event(), h11.EndOfMessage):
            body += e.data
        out.append((event.status_code, dict(event.headers), body))
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return out
        conn.start_next_cycle()


class App:
    """A test application: echoes the request and records what it saw."""

    def __init__(self) -> None:
        self.seen: list[Request] = []

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        if request.path == "/empty":
            return Response(204, b"ignored body")
        if request.path == "/boom":
            raise RuntimeError("secret internals")
        if request.path == "/teapot":
            raise errors.Conflict("queue ended")
        if request.path == "/slow":
            await trio.sleep(1.0)
        text = f"{request.method} {request.path} {list(request.query)} {request.body.decode()}"
        if request.path.startswith("/framed"):   # a framing header of its own: h11 sends the answer
            return Response(200, text.encode(), [("Content-Type", "text/plain"), ("Content-Length", "999")])
        return Response(200, text.encode(), [("Content-Type", "text/plain")])   # the edge writes it


@asynccontextmanager
async def tcp_server(app, ws_handler=None, config=SMALL, **kwargs):
    server = HTTPServer(app, ws_handler, config, **kwargs)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
        yield server, port
        server.shutdown()


@asynccontextmanager
async def memory_server(app, ws_handler=None, config=SMALL, listener=None):
    server, listener = HTTPServer(app, ws_handler, config), listener or MemoryListener()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [listener])
        yield server, listener
        server.shutdown()


def streaming_app(chunks: list[bytes], finished: list[str]):
    """An application streaming `chunks` (each 4-byte length prefixed; "/forever" then never ends),
    noting each request path in `finished` when its stream ends, however it ends."""
    async def handler(request: Request) -> Response:
        async def stream(send):
            try:
                for chunk in chunks:
                    await send(len(chunk).to_bytes(4, "big") + chunk)
                if request.path == "/forever":
                    await trio.sleep_forever()
            finally:
                finished.append(request.path)
        return Response(200, headers=[("Content-Type", "application/octet-stream")], stream=stream)
    return handler
