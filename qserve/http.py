"""The HTTP/1.1 + WebSocket edge: h11 for the protocol, trio for the sockets; knows nothing of queues.

Strategy: one task per connection (`_Connection`) is the only reader of its socket and, through
`_Connection._send` (one lock), the only writer (STYLE rule 5). It loops over request cycles:
wait for the next request (idle, bounded by ``keepalive_timeout``), read its head and body (bounded by
``request_timeout`` and by the size limits), call the application's `Handler`, write the `Response`
(with Content-Length, or chunked when it streams), and then let h11 decide whether the connection
is reused (``start_next_cycle``) or closed. Every error is rendered by `errors.error_response`.
Errors detected before or while reading a request (400, 408, 413, 431, 503) close the connection
after a short bounded drain, so the client reads the response instead of a reset.

WebSocket shares the port (STYLE rule 6): `Request.is_websocket_upgrade` is the one place that decides,
and `websocket.run_upgrade` replays the consumed bytes into trio-websocket (choice (b); see
`qserve/websocket.py` for why). The WebSocket handler gets the `Request` and a
`websocket.WebSocketUpgrade` to ``accept()`` or ``reject(status, body)``.

Concurrency (STYLE rule 7): `HTTPServer.serve` runs the accept loops in one nursery and the
connection tasks (which run the handlers) in a separate handler nursery. `shutdown()` cancels the
accept loops, closes idle keep-alive connections, ends streaming responses and WebSockets (close code
1001), lets in-flight requests finish within ``shutdown_grace``, then cancels what is left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote

import h11
import trio

from . import errors
from .websocket import WebSocketUpgrade, run_upgrade

__all__ = ["Request", "Response", "HTTPConfig", "HTTPServer", "Handler", "WebSocketHandler",
           "WebSocketUpgrade"]

log = logging.getLogger("qserve.http")

_RECEIVE_SIZE = 64 * 1024
_DRAIN_SECONDS = 2.0          # after an error response: how long we read and discard ...
_DRAIN_BYTES = 4 * 1024 * 1024  # ... and how much, before closing
_OVERFLOW_RESPONDERS = 64     # connections beyond max_connections answered with 503 at one time
_NO_BODY = frozenset({204, 304})
_EDGE_HEADERS = frozenset({"content-length", "transfer-encoding"})  # framing is the edge's job
_ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed HTTP request. Header names are lower-cased; values are latin-1 decoded."""

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
        return (self.method == "GET" and "upgrade" in self.header_tokens("connection")
                and "websocket" in self.header_tokens("upgrade"))

    @classmethod
    def from_h11(cls, event: h11.Request, client: tuple[str, int] | None) -> Request:
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        if "://" in path:  # absolute-form ("http://host/p"): keep the path only
            path = "/" + path.partition("://")[2].partition("/")[2]
        return cls(
            method=event.method.decode("latin-1"),
            target=target,
            path=unquote(path, errors="replace"),
            query=tuple(parse_qsl(query, keep_blank_values=True)),
            headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers),
            client=client,
        )


@dataclass(slots=True)
class Response:
    """What a `Handler` returns. With ``stream`` set the body is sent chunked: the edge awaits
    ``stream(send)``, where ``await send(chunk)`` writes one chunk (with backpressure)."""

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

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"HTTPConfig.{f.name} must be > 0")


Handler = Callable[[Request], Awaitable[Response]]
WebSocketHandler = Callable[[Request, WebSocketUpgrade], Awaitable[None]]


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
        self._handler = handler
        self._ws_handler = ws_handler
        self._config = config or HTTPConfig()
        self._body_limit_for = body_limit_for
        self._serving = False
        self._shutting_down = False
        self._accept_scope = trio.CancelScope()
        self._shutdown_scopes: set[trio.CancelScope] = set()  # idle waits, streams, websockets
        self._drained: trio.Event | None = None
        self._connections = 0
        self._overflow = 0
        self._at_limit = False
        self._requests = 0
        self._websockets = 0
        self._errors: Counter[int] = Counter()

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
        self._shutting_down = True
        self._accept_scope.cancel()
        for scope in list(self._shutdown_scopes):
            scope.cancel()
        self._check_drained()

    def statistics(self) -> dict:
        return {
            "connections_open": self._connections,
            "connections_refused_open": self._overflow,
            "requests_served": self._requests,
            "errors_by_status": dict(self._errors),
            "websockets_open": self._websockets,
            "shutting_down": self._shutting_down,
        }

    # -- accepting -----------------------------------------------------------------------------

    async def _serve(self, listeners, task_status, started_value) -> None:
        if self._serving:
            raise RuntimeError("HTTPServer.serve() runs once")
        self._serving = True
        self._drained = trio.Event()
        async with trio.open_nursery() as handlers:
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
            with trio.move_on_after(self._config.shutdown_grace):
                await self._drained.wait()
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
            if self._connections < self._config.max_connections:
                self._at_limit = False
                self._connections += 1
                handlers.start_soon(self._run_connection, stream)
                continue
            if not self._at_limit:
                self._at_limit = True
                log.warning("connection limit (%d) reached: refusing new connections with 503",
                            self._config.max_connections)
            if self._overflow >= _OVERFLOW_RESPONDERS:
                await trio.aclose_forcefully(stream)
                continue
            self._overflow += 1
            handlers.start_soon(self._refuse_connection, stream)

    async def _run_connection(self, stream: trio.abc.Stream) -> None:
        try:
            await _Connection(self, stream).run()
        except Exception:  # a bug in the edge: lose this connection, not the server
            log.exception("connection task failed")
        finally:
            self._connections -= 1
            self._check_drained()

    async def _refuse_connection(self, stream: trio.abc.Stream) -> None:
        try:
            await _Connection(self, stream).refuse(
                errors.Unavailable("too many connections, try again later", headers=[("Retry-After", "1")]))
        finally:
            self._overflow -= 1
            self._check_drained()

    def _check_drained(self) -> None:
        if self._shutting_down and self._drained is not None and self._connections + self._overflow == 0:
            self._drained.set()

    @contextlib.contextmanager
    def _until_shutdown(self) -> Iterator[trio.CancelScope]:
        """A cancel scope (for the caller to enter) that `shutdown()` cancels while this block runs."""
        scope = trio.CancelScope()
        if self._shutting_down:
            scope.cancel()
        self._shutdown_scopes.add(scope)
        try:
            yield scope
        finally:
            self._shutdown_scopes.discard(scope)

    def _count(self, status: int) -> None:
        self._requests += 1
        if status >= 400:
            self._errors[status] += 1


class _Abandon(Exception):
    """The connection cannot continue (peer gone, write stalled, broken framing): close it."""


class _TooLarge(Exception):
    pass


class _Connection:
    """One HTTP connection; run by a single task, which is its only reader and only writer."""

    def __init__(self, server: HTTPServer, stream: trio.abc.Stream) -> None:
        self._server = server
        self._config = server._config
        self._stream = stream
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self._config.max_header_bytes)
        self._send_lock = trio.StrictFIFOLock()
        self._raw = bytearray()   # bytes fed to h11 since this request began, kept until its head parsed
        self._recording = True
        self._eof = False
        self._write_interrupted = False
        self._client = _peer(stream)

    async def run(self) -> None:
        try:
            while await self._serve_one():
                pass
        except (_Abandon, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away or cannot be written to: nothing to answer
        finally:
            await trio.aclose_forcefully(self._stream)

    async def refuse(self, exc: errors.QServeError) -> None:
        """Read the request head (bounded), answer ``exc`` and close: for connections over the limit."""
        try:
            with trio.move_on_after(self._config.request_timeout):
                await self._next_event()
            await self._fail(exc)
        except (h11.RemoteProtocolError, _Abandon, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(self._stream)

    # -- one request cycle ------------------------------------------------------------------------

    async def _serve_one(self) -> bool:
        """Serve one request; True when the connection may carry another."""
        if not await self._wait_for_request():
            return False
        deadline = trio.current_time() + self._config.request_timeout
        try:
            with trio.fail_at(deadline):
                event = await self._next_event()
        except trio.TooSlowError:
            return await self._fail(errors.RequestTimeout("request head not received in time"))
        except h11.RemoteProtocolError as exc:
            return await self._protocol_error(exc)
        if not isinstance(event, h11.Request):
            return False  # ConnectionClosed: the client closed between requests
        head_size = len(self._raw) - len(self._h11.trailing_data[0])
        self._recording = False
        if head_size > self._config.max_header_bytes:
            return await self._fail(errors.HeadersTooLarge("request headers too large"))
        request = Request.from_h11(event, self._client)
        log.debug("%s %s", request.method, request.target)
        if request.is_websocket_upgrade and self._server._ws_handler is not None:
            return await self._upgrade(request, event)
        self._raw = bytearray()

        limit = self._body_limit(request)
        declared = request.header("content-length")
        if declared is not None and int(declared) > limit:
            return await self._fail(errors.PayloadTooLarge(f"request body larger than {limit} bytes"))
        if self._h11.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        try:
            with trio.fail_at(deadline):
                body = await self._read_body(limit)
        except trio.TooSlowError:
            return await self._fail(errors.RequestTimeout("request body not received in time"))
        except _TooLarge:
            return await self._fail(errors.PayloadTooLarge(f"request body larger than {limit} bytes"))
        except h11.RemoteProtocolError as exc:
            return await self._protocol_error(exc)

        response = await self._call_handler(dataclasses.replace(request, body=body))
        await self._respond(response)
        return self._next_cycle()

    async def _wait_for_request(self) -> bool:
        """Wait (idle) for the first byte of the next request; False to close quietly."""
        if self._h11.trailing_data[0] or self._eof or self._h11.their_state is not h11.IDLE:
            return True  # pipelined bytes (or EOF) already buffered
        with self._server._until_shutdown() as scope:
            with scope, trio.move_on_after(self._config.keepalive_timeout):
                await self._receive()
                return True
        log.debug("closing idle connection (%s)", "shutdown" if scope.cancelled_caught else "keep-alive timeout")
        return False

    async def _read_body(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise _TooLarge
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:  # ConnectionClosed cannot come mid-body; h11 raises instead
                raise _Abandon

    def _body_limit(self, request: Request) -> int:
        if self._server._body_limit_for is None:
            return self._config.max_body_bytes
        return self._server._body_limit_for(request)

    async def _call_handler(self, request: Request) -> Response:
        try:
            response = await self._server._handler(request)
            if not isinstance(response, Response) or not 200 <= response.status <= 599:
                raise TypeError(f"handler returned {response!r}, not a final Response")
            return response
        except errors.QServeError as exc:
            return _error_response(exc)
        except Exception as exc:  # noqa: BLE001 - becomes a generic 500; logged once
            log.error("handler failed on %s %s: %r", request.method, request.path, exc)
            log.debug("handler traceback", exc_info=True)
            return _error_response(exc)

    def _next_cycle(self) -> bool:
        h = self._h11
        if self._server._shutting_down or h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            return False
        h.start_next_cycle()
        self._raw = bytearray(h.trailing_data[0])
        self._recording = True
        return True

    # -- writing ---------------------------------------------------------------------------------

    async def _respond(self, response: Response) -> None:
        status = response.status
        headers = [(k, v) for k, v in response.headers if k.lower() not in _EDGE_HEADERS]
        if self._server._shutting_down:
            headers.append(("Connection", "close"))
        streaming = response.stream is not None and status not in _NO_BODY
        body = b"" if status in _NO_BODY or streaming else response.body
        if streaming:
            headers.append(("Transfer-Encoding", "chunked"))
        elif status not in _NO_BODY:
            headers.append(("Content-Length", str(len(body))))
        try:
            head = _h11_response(status, headers)
        except (h11.LocalProtocolError, UnicodeEncodeError) as exc:
            log.error("handler returned an invalid response head: %r", exc)
            return await self._respond(_error_response(errors.InternalError()))
        self._server._count(status)
        await self._send(head)
        if streaming:
            return await self._stream_body(response.stream)
        if body:
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def _stream_body(self, stream: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]) -> None:
        peer_gone = failed = False

        async def send(chunk: bytes) -> None:
            if chunk:
                await self._send(h11.Data(data=chunk))

        async def watch_for_disconnect(cancel_scope: trio.CancelScope) -> None:
            # Reading meanwhile notices a client that leaves (a watch may be silent for long).
            nonlocal peer_gone
            while len(self._h11.trailing_data[0]) <= self._config.max_header_bytes:
                try:
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    peer_gone = True
                    cancel_scope.cancel()
                    return
                self._h11.receive_data(data)  # pipelined: kept for the next cycle

        with self._server._until_shutdown() as scope, scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_for_disconnect, nursery.cancel_scope)
                try:
                    await stream(send)
                except (_Abandon, trio.BrokenResourceError, trio.ClosedResourceError):
                    peer_gone = True
                except Exception as exc:  # noqa: BLE001 - too late for a 500: log, cut the body short
                    failed = True
                    log.error("streaming response failed: %r", exc)
                    log.debug("streaming response traceback", exc_info=True)
                nursery.cancel_scope.cancel()
        if peer_gone or failed or self._write_interrupted:
            raise _Abandon  # an unterminated chunked body tells the client it is incomplete
        await self._send(h11.EndOfMessage())

    async def _send(self, event: h11.Event) -> None:
        """The only writer of this socket; a write stalled longer than ``request_timeout`` closes it."""
        async with self._send_lock:
            if self._write_interrupted:
                raise _Abandon
            data = self._h11.send(event)
            if not data:
                return
            self._write_interrupted = True  # until send_all completes: a cancelled write breaks the framing
            with trio.move_on_after(self._config.request_timeout):
                await self._stream.send_all(data)
                self._write_interrupted = False
            if self._write_interrupted:
                raise _Abandon

    async def _fail(self, exc: errors.QServeError) -> bool:
        """Answer an error found by the edge (when a response can still be sent), drain, close."""
        log.debug("closing connection with %d: %s", exc.http_status, exc.reason)
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status, headers, body = errors.error_response(exc)
            self._server._count(status)
            await self._send(_h11_response(status, [*headers, ("Content-Length", str(len(body))),
                                                    ("Connection", "close")]))
            await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())
        await self._drain()
        return False

    async def _drain(self) -> None:
        """Half-close, then read and discard (bounded; cut short by shutdown) so that closing does not
        reset the response away before the client read it."""
        with self._server._until_shutdown() as scope, scope, trio.move_on_after(_DRAIN_SECONDS):
            try:
                if isinstance(self._stream, trio.abc.HalfCloseableStream):
                    await self._stream.send_eof()
                drained = 0
                while drained < _DRAIN_BYTES and not self._eof:
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        break
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _protocol_error(self, exc: h11.RemoteProtocolError) -> bool:
        if self._eof:
            log.debug("client closed mid-request: request abandoned")
            return False
        if exc.error_status_hint == 431:
            return await self._fail(errors.HeadersTooLarge("request headers too large"))
        return await self._fail(errors.BadRequest("malformed HTTP request"))

    # -- reading ---------------------------------------------------------------------------------

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self._h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            await self._receive()

    async def _receive(self) -> None:
        try:
            data = await self._stream.receive_some(_RECEIVE_SIZE)
        except trio.BrokenResourceError:
            data = b""  # reset by peer: same as EOF
        if self._recording:
            self._raw += data
        self._eof = not data
        self._h11.receive_data(data)

    # -- WebSocket -------------------------------------------------------------------------------

    async def _upgrade(self, request: Request, event: h11.Request) -> bool:
        problem = _websocket_problem(request, event)
        if problem is not None:
            return await self._fail(problem)
        server = self._server
        server._count(101)
        server._websockets += 1
        try:
            with server._until_shutdown() as scope:
                upgrade = await run_upgrade(
                    self._stream, bytes(self._raw),
                    lambda upgrade: server._ws_handler(request, upgrade),
                    max_message_size=self._config.ws_max_message_size,
                    message_queue_size=self._config.ws_message_queue_size,
                    handshake_timeout=self._config.request_timeout,
                    scope=scope)
            log.debug("websocket on %s ended (%s)", request.path, upgrade.state if upgrade else "no handshake")
        finally:
            server._websockets -= 1
        return False


def _websocket_problem(request: Request, event: h11.Request) -> errors.QServeError | None:
    """Why an upgrade request cannot be handed to wsproto (which would otherwise fail it silently)."""
    if event.http_version != b"1.1":
        return errors.BadRequest("WebSocket upgrade needs HTTP/1.1")
    if (request.header("upgrade") or "").strip().lower() != "websocket":
        return errors.BadRequest("bad Upgrade header")
    if request.header("sec-websocket-version") != "13":
        return errors.BadRequest("unsupported WebSocket version", headers=[("Sec-WebSocket-Version", "13")])
    if not request.header("sec-websocket-key") or request.header("host") is None:
        return errors.BadRequest("missing Sec-WebSocket-Key or Host header")
    if request.header("transfer-encoding") or (request.header("content-length") or "0") != "0":
        return errors.BadRequest("a WebSocket upgrade request has no body")
    return None


def _h11_response(status: int, headers: list[tuple[str, str]]) -> h11.Response:
    try:
        reason = HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        reason = b""
    return h11.Response(status_code=status, reason=reason,
                        headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers])


def _error_response(exc: BaseException) -> Response:
    status, headers, body = errors.error_response(exc)
    return Response(status, body, headers)


def _peer(stream: trio.abc.Stream) -> tuple[str, int] | None:
    sock = getattr(stream, "socket", None)
    try:
        address = sock.getpeername() if sock is not None else None
    except OSError:
        return None
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None
