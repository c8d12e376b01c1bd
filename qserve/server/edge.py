"""What the connections of one `HTTPServer` share (`Edge`), and the response-head cache it owns.

Kept apart from `connection` so that the per-connection protocol loop stays one module of one
concern; the server creates one `Edge` and hands it to every connection it accepts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus

import h11
import trio
from h11._headers import Headers   # h11's validated header list: an event built with one is not re-checked

from qserve.core import errors
from qserve.server.expiry import Expiries
from qserve.server.types import Handler, HTTPConfig, Request, Response
from qserve.server.websocket import WebSocketHandler
from qserve.wire.names import REQUEST_ID_HEADER

__all__ = ["Edge", "HeadCache", "error_response", "peer_of"]

_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_UNIQUE = REQUEST_ID_HEADER   # differs on every put answer
_UNIQUE_RAW, _UNIQUE_LOWER = _UNIQUE.encode("ascii"), _UNIQUE.lower().encode("ascii")
#: a header value h11 accepts as it is (h11's rule is wider): joins already-validated headers unchecked
_SAFE_VALUE = re.compile(rb"[\x21-\x7e]+").fullmatch


class HeadCache:
    """The h11 events of the last ``size`` distinct response heads. Heads repeat (every commit is
    ``200 OK`` with the same three headers), and h11 validates a head's every header when it is
    built; h11 events are immutable, so one can be sent many times.

    A put's head never repeats (its requestId header differs each time), so for a head with that
    header the cache keeps the other headers, validated once, and per head only the requestId's
    value is checked: a value of visible ASCII (a UUID, most client ids) joins the validated
    headers as they are; anything else takes h11's own full check. (Building the head through
    h11 validated all of its headers each time: ~4% of a put's CPU.)"""

    __slots__ = ("_heads", "_size")

    def __init__(self, size: int = 64) -> None:
        self._heads: dict[tuple, h11.Response | list[tuple[bytes, bytes, bytes]]] = {}   # heads; put templates
        self._size = size

    def response(self, status: int, headers: list[tuple[str, str]]) -> h11.Response:
        """The h11 event for a response head (raises what h11 raises for an invalid one)."""
        key = (status, tuple(headers))
        head = self._heads.get(key)
        if head is not None:
            return head
        for at, (name, value) in enumerate(headers):
            if name == _UNIQUE:
                return self._unique(status, headers, at, value.encode("latin-1"))
        head = _build(status, headers)
        self._keep(key, head)
        return head

    def _unique(self, status: int, headers: list[tuple[str, str]], at: int, value: bytes) -> h11.Response:
        if not _SAFE_VALUE(value):
            return _build(status, headers)   # h11 checks it (and raises if it is not a header value)
        key = (status, at, *headers[:at], *headers[at + 1:])
        template = self._heads.get(key)
        if template is None:
            head = _build(status, headers)   # validates every header, this requestId's too
            template = [(raw, raw.lower(), v) for raw, v in head.headers.raw_items()]
            self._keep(key, template)
            return head
        items = template.copy()
        items[at] = (_UNIQUE_RAW, _UNIQUE_LOWER, value)
        return h11.Response(status_code=status, reason=_REASONS.get(status, b""), headers=Headers(items))

    def _keep(self, key: tuple, value: h11.Response | list[tuple[bytes, bytes, bytes]]) -> None:
        if len(self._heads) >= self._size:
            del self._heads[next(iter(self._heads))]   # the oldest
        self._heads[key] = value


def _build(status: int, headers: list[tuple[str, str]]) -> h11.Response:
    return h11.Response(status_code=status, reason=_REASONS.get(status, b""),
                        headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers])


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
