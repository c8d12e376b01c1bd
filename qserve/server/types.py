"""The values the HTTP edge hands to and takes from the application: `Request`, `Response`, `HTTPConfig`.

Strategy: plain data, no I/O. `Request` is built once per request from h11's event (`Request.from_h11`),
on the hot path, so it does the least work that keeps its fields exact: header names lower-cased by h11
and decoded as latin-1, the path percent-decoded, the query split. Imported from `qserve.server.http`, which
re-exports every name here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

import h11

__all__ = ["Request", "Response", "HTTPConfig", "Handler"]


@dataclass(slots=True)
class Request:
    """One parsed HTTP request. Header names are lower-cased; values are latin-1 decoded. Not frozen:
    the edge sets ``body`` once it has read it (a frozen dataclass costs 0.85 us to build against
    0.19 us, and the request was built twice); nothing changes it afterwards."""

    method: str
    target: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    client: tuple[str, int] | None = None

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``default``."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def header_tokens(self, name: str) -> list[str]:
        """The lower-cased comma-separated tokens of every ``name`` header."""
        name = name.lower()
        return [t.strip().lower() for k, v in self.headers if k == name for t in v.split(",") if t.strip()]

    @property
    def is_websocket_upgrade(self) -> bool:
        """The upgrade seam: GET + ``Connection: upgrade`` + ``Upgrade: websocket``."""
        # Upgrade first: almost no request has it, so most GETs are answered by one scan.
        return (self.method == "GET" and "websocket" in self.header_tokens("upgrade")
                and "upgrade" in self.header_tokens("connection"))

    @classmethod
    def from_h11(cls, event: h11.Request, client: tuple[str, int] | None) -> Request:
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        if "://" in path:  # absolute-form ("http://host/p"): keep the path only
            path = "/" + path.partition("://")[2].partition("/")[2]
        return cls(
            event.method.decode("latin-1"),
            target,
            unquote(path, errors="replace"),
            tuple(parse_qsl(query, keep_blank_values=True)) if query else (),
            # raw_items(): a list, where iterating the Headers sequence goes through __getitem__
            tuple([(k.lower().decode("latin-1"), v.decode("latin-1")) for k, v in event.headers.raw_items()]),
            b"",
            client,
        )


@dataclass(slots=True)
class Response:
    """What a `Handler` returns. With ``stream`` set the body is sent chunked: the edge awaits
    ``stream(send)``, where ``await send(chunk)`` writes one chunk (with backpressure). For a
    ``HEAD`` request the edge sends the head only: no body, and ``stream`` is not called."""

    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]] | None = None


@dataclass(frozen=True)
class HTTPConfig:
    """Limits of the edge. Times are seconds of trio's clock."""

    max_header_bytes: int = 16 * 1024      # request line + headers; larger -> 431
    max_body_bytes: int = 524288           # default body limit (see ``body_limit_for``); larger -> 413
    max_connections: int = 2048            # more -> 503 and close
    keepalive_timeout: float = 60.0        # idle between requests -> close quietly
    request_timeout: float = 30.0          # head + body of a started request; also one write -> 408/close
    shutdown_grace: float = 10.0           # in-flight requests get this long at shutdown
    ws_max_message_size: int = 64 * 1024   # client WebSocket messages above -> close 1009
    ws_message_queue_size: int = 16        # client WebSocket messages buffered before the reader waits
    idle_poll: float = 0.0                 # the loop polls this long at most before it sleeps (0: never; `IdlePoll`)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name == "idle_poll":
                if not self.idle_poll >= 0:
                    raise ValueError("HTTPConfig.idle_poll must be >= 0")
            elif not getattr(self, f.name) > 0:
                raise ValueError(f"HTTPConfig.{f.name} must be > 0")


Handler = Callable[[Request], Awaitable[Response]]
