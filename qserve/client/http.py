"""HTTP/1.1 plumbing of the qserve client: the error types, queue URLs, and a small keep-alive pool.

Strategy: h11 does the protocol and trio the I/O, one request at a time per connection (no
pipelining). A pool hands out at most ``max_connections`` connections (a `trio.Semaphore`); a
connection goes back to the idle list only when h11 says both sides finished the exchange cleanly.
Before an idle connection is reused, its socket is checked: readable while idle means the server
closed it (or sent junk), so it is dropped instead of failing the next request. Every transport
failure becomes a `ConnectError` that records whether any byte of the response had arrived, which
is what the retry policy in `qserve.client` needs to decide whether a put may be sent again.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
from dataclasses import dataclass

import h11
import trio

__all__ = ["QueueError", "ConnectError", "QueueTimeout", "QueueURL", "Response", "ConnectionPool"]

_MAX_IDLE_SECONDS = 50.0          # the server closes idle keep-alive connections after 60 s
_RECEIVE_SIZE = 64 * 1024
_MAX_REASON = 300


class QueueError(Exception):
    """The server answered with a non-2xx status.

    Attributes:
        status: the HTTP status (0 for a transport failure, see `ConnectError`).
        reason: a one-line reason: the first line of the response body, else the status phrase.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}" if self.status else self.reason


class ConnectError(QueueError):
    """The server could not be reached, or the connection failed mid-request (status 0).

    Attributes:
        response_started: some bytes of the response had arrived before the failure.
    """

    def __init__(self, reason: str, *, response_started: bool = False) -> None:
        super().__init__(0, reason)
        self.response_started = response_started


class QueueTimeout(ConnectError):
    """No complete answer within the request timeout."""


def reason_from(status: int, phrase: bytes, body: bytes) -> str:
    """One line for a `QueueError`: the body's first line, else the HTTP reason phrase."""
    line = body.decode("utf-8", "replace").strip().splitlines()[0] if body.strip() else ""
    return (line or phrase.decode("latin-1") or f"HTTP {status}")[:_MAX_REASON]


@dataclass(frozen=True)
class QueueURL:
    """A parsed queue URL: ``http(s)://host[:port]/path`` with no query or fragment."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> "QueueURL":
        """Raises: ValueError with a one-line reason for anything but an http(s) URL with a host."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"bad URL {url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"bad URL {url!r}: expected http://host:port/api/predict/SERVICE")
        if parts.query or parts.fragment:
            raise ValueError(f"bad URL {url!r}: no query or fragment allowed")
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, port, parts.path or "/")

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def host_header(self) -> str:
        return self.origin.split("://", 1)[1]

    def __str__(self) -> str:
        return self.origin + self.path

    def sink(self) -> "QueueURL":
        """The sink queue of this service: the path plus ``/sink``.

        Raises: ValueError if this already is a sink URL.
        """
        path = self.path.rstrip("/")
        if path.endswith("/sink") or path == "sink":
            raise ValueError(f"{self} is already a sink queue")
        return QueueURL(self.scheme, self.host, self.port, path + "/sink")


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]       # lower-case names; a repeated header keeps its last value
    body: bytes
    phrase: bytes = b""


class _Connection:
    """One keep-alive HTTP/1.1 connection. Not task-safe: the pool lends it to one request at a time."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = trio.current_time()

    def _socket(self):
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        return getattr(stream, "socket", None)

    def usable(self) -> bool:
        """An idle connection that the server has not closed and that has not idled too long."""
        sock = self._socket()
        if sock is None or trio.current_time() - self.idle_since > _MAX_IDLE_SECONDS:
            return False
        return not sock.is_readable()

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes,
                      progress: list[bool]) -> tuple[Response, bool]:
        """Send one request and read its response; ``progress[0]`` turns True at the first response byte.

        Returns ``(response, reusable)``.
        """
        out = self.h11.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            out += self.h11.send(h11.Data(data=body))
        out += self.h11.send(h11.EndOfMessage())
        send_error: BaseException | None = None
        try:
            await self.stream.send_all(out)
        except (trio.BrokenResourceError, OSError) as exc:
            send_error = exc      # the server may have answered early (413) and closed: try to read it
        response: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, OSError):
                    if send_error is not None:
                        raise send_error from None
                    raise
                if data:
                    progress[0] = True
                elif send_error is not None and response is None:
                    raise send_error
                self.h11.receive_data(data)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("connection closed before the response")
        assert response is not None
        headers_out = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
        reusable = send_error is None and self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE
        if reusable:
            self.h11.start_next_cycle()
            self.idle_since = trio.current_time()
        return Response(response.status_code, headers_out, b"".join(chunks), response.reason), reusable

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await trio.aclose_forcefully(self.stream)
            except (trio.BrokenResourceError, OSError):
                pass


class ConnectionPool:
    """At most ``max_connections`` keep-alive connections to one origin. Task-safe.

    Args:
        url: the origin to connect to (only scheme, host and port are used).
        max_connections: bound on simultaneous connections (and so on concurrent requests).
        ssl_context: for https; default `ssl.create_default_context()`.
    """

    def __init__(self, url: QueueURL, max_connections: int = 4, ssl_context: ssl.SSLContext | None = None) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.url = url
        self._slots = trio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._ssl_context = ssl_context
        self._closed = False

    async def _connect(self, timeout: float) -> _Connection:
        url = self.url
        try:
            with trio.fail_after(timeout):
                if url.scheme == "https":
                    ctx = self._ssl_context or ssl.create_default_context()
                    stream = await trio.open_ssl_over_tcp_stream(url.host, url.port, ssl_context=ctx,
                                                                 https_compatible=True)
                    await stream.do_handshake()
                else:
                    stream = await trio.open_tcp_stream(url.host, url.port)
        except trio.TooSlowError:
            raise QueueTimeout(f"cannot reach {url.origin}: connect timed out after {timeout:g}s") from None
        except OSError as exc:
            raise ConnectError(f"cannot reach {url.origin}: {_describe(exc)}") from None
        return _Connection(stream)

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"",
                      *, timeout: float) -> Response:
        """Run one request on a pooled connection within ``timeout`` seconds (connecting included).

        Raises:
            ConnectError: unreachable, or the connection failed (``response_started`` tells how far it got).
            QueueTimeout: no complete response within ``timeout``.
        """
        if self._closed:
            raise ConnectError("client is closed")
        progress = [False]
        async with self._slots:
            conn = None
            while self._idle:
                candidate = self._idle.pop()
                if candidate.usable():
                    conn = candidate
                    break
                await candidate.aclose()
            reusable = False
            try:
                with trio.fail_after(timeout):
                    if conn is None:
                        conn = await self._connect(timeout)
                    response, reusable = await conn.request(method, target, headers, body, progress)
            except trio.TooSlowError:
                raise QueueTimeout(f"{method} {self.url.origin}: no answer within {timeout:g}s",
                                   response_started=progress[0]) from None
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
                raise ConnectError(f"connection to {self.url.origin} failed: {_describe(exc)}",
                                   response_started=progress[0]) from None
            finally:
                if conn is not None:
                    if reusable and not self._closed:
                        self._idle.append(conn)
                    else:
                        await conn.aclose()
        return response

    async def aclose(self) -> None:
        """Close every idle connection; requests in flight close theirs when they end."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()


def _describe(exc: BaseException) -> str:
    """A short lower-case cause: "connection refused", not trio's "all attempts to connect ... failed"."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    if isinstance(exc.__cause__, BaseExceptionGroup):
        for inner in exc.__cause__.exceptions:
            if isinstance(inner, OSError) and inner.errno:
                return os.strerror(inner.errno).lower()
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        return _describe(exc.__cause__)
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]
