"""What the connections of one `HTTPServer` share (`Edge`), the response-head cache (`heads`) among it.

Kept apart from `connection` so that the per-connection protocol loop stays one module of one
concern; the server creates one `Edge` and hands it to every connection it accepts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import trio

from qserve.core import errors
from qserve.server.expiry import Expiries
from qserve.server.heads import HeadCache
from qserve.server.types import Handler, HTTPConfig, Request, Response
from qserve.server.websocket import WebSocketHandler

__all__ = ["Edge", "error_response", "peer_of"]


class Edge:
    """What the connections of one `HTTPServer` share: the application's handlers, the limits, the
    shutdown flag, the deadlines' watcher and the counters `HTTPServer.statistics` reports. The
    server creates it and hands it to each connection it accepts (so a connection knows nothing of
    the server itself)."""

    __slots__ = ("handler", "ws_handler", "config", "body_limit_for", "shutting_down", "requests",
                 "websockets", "errors", "heads", "expiries", "connections", "refusing")

    def __init__(self, handler: Handler, ws_handler: WebSocketHandler | None, config: HTTPConfig,
                 body_limit_for: Callable[[Request], int] | None, expiries: Expiries) -> None:
        self.handler = handler
        self.ws_handler = ws_handler
        self.config = config
        self.body_limit_for = body_limit_for
        self.shutting_down = False
        self.requests = 0
        self.websockets = 0
        self.errors: Counter[int] = Counter()
        self.heads = HeadCache()
        self.expiries = expiries   # the connections' deadlines (the server runs its task)
        self.connections = 0       # connections being served (the server counts them) ...
        self.refusing = 0          # ... and those over the limit, being answered 503

    @property
    def open_connections(self) -> int:
        return self.connections + self.refusing

    @property
    def alone(self) -> bool:
        """At most one connection is open: a lone client (it may skip what only others gain from)."""
        return self.connections + self.refusing <= 1

    def count(self, status: int) -> None:
        """One request answered with ``status``."""
        self.requests += 1
        if status >= 400:
            self.errors[status] += 1


def error_response(exc: BaseException) -> Response:
    """The `Response` for an exception (`errors.error_response` decides status, headers and body)."""
    status, headers, body = errors.error_response(exc)
    return Response(status, body, headers)


def peer_of(stream: trio.abc.Stream) -> tuple[str, int] | None:
    """The client's (address, port) of a socket stream; None for other streams."""
    sock = getattr(stream, "socket", None)
    try:
        address = sock.getpeername() if sock is not None else None
    except OSError:
        return None
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None
