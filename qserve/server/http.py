"""The HTTP/1.1 + WebSocket edge: h11 for the protocol, trio for the sockets; knows nothing of queues.

Strategy: one task per connection (`server.connection._Connection`) is the only reader of its socket
and, through `_Connection._send` (one lock), the only writer (STYLE rule 5). It loops over request cycles:
wait for the next request (idle, bounded by ``keepalive_timeout``), read its head and body (bounded by
``request_timeout`` and by the size limits), call the application's `Handler`, write the `Response`
(with Content-Length, or chunked when it streams), and then let h11 decide whether the connection
is reused (``start_next_cycle``) or closed. Every error is rendered by `errors.error_response`.
Errors detected before or while reading a request (400, 408, 413, 431, 503) close the connection
after a short bounded drain, so the client reads the response instead of a reset.

WebSocket shares the port (STYLE rule 6): `Request.is_websocket_upgrade` is the one place that decides,
and `websocket.run_upgrade` replays the consumed bytes into trio-websocket (choice (b); see
`qserve/server/websocket.py` for why). The WebSocket handler gets the `Request` and a
`websocket.WebSocketUpgrade` to ``accept()`` or ``reject(status, body)``.

Concurrency (STYLE rule 7): `HTTPServer.serve` runs the accept loops in one nursery and the
connection tasks (which run the handlers) in a separate handler nursery, with the one task that
enforces the connections' deadlines (`expiry.Expiries`). `shutdown()` cancels the
accept loops, closes idle keep-alive connections, ends streaming responses and WebSockets (close code
1001), lets in-flight requests finish within ``shutdown_grace``, then cancels what is left (one
WARNING line says how many were cut); `abort()` cancels what is left at once.

Layout: this module is the server (accepting, limits, shutdown, statistics) and the public face of the
edge; `server.types` holds the values (`Request`, `Response`, `HTTPConfig`, re-exported here) and
`server.connection` the per-connection protocol loop, which is the hot path: one cancel scope per
connection whose deadline moves, and one write per response (see its module comment).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import trio

from qserve.core import errors
from qserve.server.connection import Edge, _Connection
from qserve.server.expiry import Expiries
from qserve.server.idlepoll import IdlePoll
from qserve.server.types import Handler, HTTPConfig, Request, Response
from qserve.server.websocket import WebSocketHandler, WebSocketUpgrade

__all__ = ["Request", "Response", "HTTPConfig", "HTTPServer", "Handler", "WebSocketHandler",
           "WebSocketUpgrade"]

log = logging.getLogger("qserve.http")

_OVERFLOW_RESPONDERS = 64     # connections beyond max_connections answered with 503 at one time
_ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class HTTPServer:
    """Serves `Handler` (and `WebSocketHandler` for upgrades) on listeners. `shutdown()` and
    `statistics()` may be called from any task of the same trio run; `serve()` runs once.

    Args:
        handler: called with each complete request (body read); returns a `Response`. Raising a
            `QServeError` yields its response; any other exception a logged 500.
        ws_handler: called for WebSocket upgrades; None serves upgrades through ``handler``.
        config: limits and timeouts.
        body_limit_for: the body limit for a request (given without its body); default
            ``config.max_body_bytes``.
    """

    def __init__(self, handler: Handler, ws_handler: WebSocketHandler | None = None,
                 config: HTTPConfig | None = None, *,
                 body_limit_for: Callable[[Request], int] | None = None) -> None:
        self._live: set[_Connection] = set()  # shutdown() tells each one (idle ones close)
        config = config or HTTPConfig()
        horizon = min(config.request_timeout, config.keepalive_timeout)   # what the connections count from now
        self._edge = Edge(handler, ws_handler, config, body_limit_for, Expiries(self._live, horizon))
        self._config = self._edge.config
        self._serving = False
        self._accept_scope = trio.CancelScope()
        self._drained: trio.Event | None = None
        self._cut = trio.CancelScope()        # around the drain wait: abort() ends it
        self._at_limit = False
        self._idle_poll: IdlePoll | None = None   # while serving, with config.idle_poll > 0

    # -- public --------------------------------------------------------------------------------

    async def serve(self, listeners: list[trio.abc.Listener], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on ``listeners`` until `shutdown()`, then drain; ``task_status.started()`` once accepting."""
        await self._serve(listeners, task_status, None)

    async def serve_tcp(self, host: str | None, port: int, *,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``host:port`` (0 = ephemeral) and serve; ``task_status.started(bound_port)``.
        When ``host`` resolves to several addresses the port of the first listener is reported."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        await self._serve(listeners, task_status, listeners[0].socket.getsockname()[1])

    def shutdown(self) -> None:
        """Stop accepting; close idle connections; end streams and WebSockets; let requests finish."""
        self._edge.shutting_down = True
        self._accept_scope.cancel()
        for connection in list(self._live):
            connection.shutdown()
        self._check_drained()

    def abort(self) -> None:
        """`shutdown()`, and cut every connection now instead of letting requests finish."""
        self.shutdown()
        self._cut.cancel()

    @property
    def open_connections(self) -> int:
        """Connections open right now, the ones being refused with 503 included."""
        return self._edge.open_connections

    def statistics(self) -> dict:
        return {
            "connections_open": self._edge.connections,
            "connections_refused_open": self._edge.refusing,
            "requests_served": self._edge.requests,
            "errors_by_status": dict(self._edge.errors),
            "websockets_open": self._edge.websockets,
            "shutting_down": self._edge.shutting_down,
            "idle_poll": self._idle_poll.statistics() if self._idle_poll is not None else None,
        }

    # -- accepting -----------------------------------------------------------------------------

    async def _serve(self, listeners, task_status, started_value) -> None:
        if self._serving:
            raise RuntimeError("HTTPServer.serve() runs once")
        self._serving = True
        self._drained = trio.Event()
        if self._config.idle_poll > 0:
            idle_poll = IdlePoll(self._config.idle_poll)
            self._idle_poll = idle_poll if idle_poll.install() else None
        try:
            await self._serve_installed(listeners, task_status, started_value)
        finally:
            if self._idle_poll is not None:
                self._idle_poll.uninstall()

    async def _serve_installed(self, listeners, task_status, started_value) -> None:
        async with trio.open_nursery() as handlers:
            handlers.start_soon(self._edge.expiries.run)   # until the end (cancelled below)
            try:
                with self._accept_scope:
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(self._accept_loop, listener, handlers)
                        task_status.started(started_value)
            finally:
                with trio.CancelScope(shield=True):
                    for listener in listeners:
                        await trio.aclose_forcefully(listener)
            self.shutdown()  # accepting has stopped: the rest is draining
            grace = self._config.shutdown_grace
            with self._cut, trio.move_on_after(grace):
                await self._drained.wait()
            if self.open_connections and not self._cut.cancel_called:
                log.warning("shutdown timeout (%g s) reached: cutting %d connection%s still open", grace,
                            self.open_connections, "" if self.open_connections == 1 else "s")
            handlers.cancel_scope.cancel()

    async def _accept_loop(self, listener: trio.abc.Listener, handlers: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                log.error("accept failed (%s); retrying in 100 ms", exc.strerror)
                await trio.sleep(0.1)
                continue
            if self._edge.connections < self._config.max_connections:
                self._at_limit = False
                self._edge.connections += 1
                handlers.start_soon(self._run_connection, stream)
                continue
            if not self._at_limit:
                self._at_limit = True
                log.warning("connection limit (%d) reached: refusing new connections with 503",
                            self._config.max_connections)
            if self._edge.refusing >= _OVERFLOW_RESPONDERS:
                await trio.aclose_forcefully(stream)
                continue
            self._edge.refusing += 1
            handlers.start_soon(self._refuse_connection, stream)

    async def _run_connection(self, stream: trio.abc.Stream) -> None:
        connection = _Connection(self._edge, stream)
        self._live.add(connection)
        try:
            await connection.run()
        except Exception:  # a bug in the edge: lose this connection, not the server
            log.exception("connection task failed")
        finally:
            self._live.discard(connection)
            self._edge.connections -= 1
            self._check_drained()

    async def _refuse_connection(self, stream: trio.abc.Stream) -> None:
        connection = _Connection(self._edge, stream)
        self._live.add(connection)
        try:
            await connection.refuse(
                errors.Unavailable("too many connections, try again later", headers=[("Retry-After", "1")]))
        finally:
            self._live.discard(connection)
            self._edge.refusing -= 1
            self._check_drained()

    def _check_drained(self) -> None:
        if self._edge.shutting_down and self._drained is not None and self._edge.open_connections == 0:
            self._drained.set()
