"""One HTTP/1.1 connection of the edge: the task that is its only reader and, through `_send`, its only writer.

Strategy: `_Connection.run` serves request cycles until the connection cannot carry another, all inside
ONE cancel scope (``_scope``) for the connection's life. Instead of entering a scope for each wait and
each write (a cancel scope costs about as much as parsing a small request), a cycle moves that scope's
deadline as it goes, and records its phase so that `run` knows, when the deadline fires, what it meant:

    phase       deadline of ``_scope``                         if it fires (or shutdown() cancels)
    IDLE        now + keepalive_timeout                        close quietly; shutdown() cancels it too
    ARRIVING    (unchanged: nothing is awaited)                -
    READING     first byte + request_timeout, set only when    408, then close
                the request needs another receive
    HANDLING    none                                           - (the handler bounds its own waits)
    WRITING     now + request_timeout while a write runs       close (the framing is broken)
    STREAMING   none between chunks, a write's while writing   close; shutdown() ends the stream cleanly
    UPGRADED    none                                           -; shutdown() closes the WebSocket (1001)
    DRAINING    (own scope, after ``_scope``)                   close; shutdown() cuts it short

A cancelled scope stays cancelled, so whatever follows a fired deadline (the 408, the drain) runs in
`run` after ``_scope`` has exited; errors found while reading (400, 413, 431) take the same way
(``_failure``). A deadline (or shutdown) can fire in the same scheduler round in which the awaited
bytes arrive or the write completes; the task then resumes with the cancellation pending, so
``cancel_called`` is checked where a wait ends, and a cancellation meant for a wait is never
delivered into the application's handler: after the idle wait and after a response (the bytes that
arrived are served, in a fresh scope: ``_renew``), and before the handler (408: the deadline did pass).
"""

from __future__ import annotations

import logging
from collections import Counter
import math
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import h11
import trio

from qserve.core import errors
from qserve.wire.names import REQUEST_ID_HEADER
from qserve.server.types import Handler, HTTPConfig, Request, Response
from qserve.server.websocket import WebSocketHandler, handshake_problem, run_upgrade


log = logging.getLogger("qserve.http")

_RECEIVE_SIZE = 64 * 1024
_DRAIN_SECONDS = 2.0          # after an error response: how long we read and discard ...
_DRAIN_BYTES = 4 * 1024 * 1024  # ... and how much, before closing
_NO_BODY = frozenset({204, 304})
_EDGE_HEADERS = frozenset({"content-length", "transfer-encoding"})  # framing is the edge's job
_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}

# phases of a connection (see the module comment)
_IDLE, _ARRIVING, _READING, _HANDLING, _WRITING, _STREAMING, _UPGRADED, _DRAINING = (
    "idle", "arriving", "reading", "handling", "writing", "streaming", "upgraded", "draining")


class _Abandon(Exception):
    """The connection cannot continue (peer gone, write stalled, broken framing): close it."""


class _TooLarge(Exception):
    pass


class Edge:
    """What the connections of one `HTTPServer` share: the application's handlers, the limits, the
    shutdown flag and the counters `HTTPServer.statistics` reports. The server creates it and hands
    it to each connection it accepts (so a connection knows nothing of the server itself)."""

    __slots__ = ("handler", "ws_handler", "config", "body_limit_for", "shutting_down", "requests",
                 "websockets", "errors")

    def __init__(self, handler: Handler, ws_handler: WebSocketHandler | None, config: HTTPConfig,
                 body_limit_for: Callable[[Request], int] | None) -> None:
        self.handler = handler
        self.ws_handler = ws_handler
        self.config = config
        self.body_limit_for = body_limit_for
        self.shutting_down = False
        self.requests = 0
        self.websockets = 0
        self.errors: Counter[int] = Counter()

    def count(self, status: int) -> None:
        """One request answered with ``status``."""
        self.requests += 1
        if status >= 400:
            self.errors[status] += 1


class _Connection:
    """One HTTP connection; run by a single task, which is its only reader and only writer.

    `shutdown` may be called from any task of the same trio run (it is what `HTTPServer.shutdown`
    calls); everything else belongs to the connection's task.
    """

    def __init__(self, edge: Edge, stream: trio.abc.Stream) -> None:
        self._edge = edge
        self._config = edge.config
        self._stream = stream
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self._config.max_header_bytes)
        self._send_lock = trio.StrictFIFOLock()
        self._scope = trio.CancelScope()   # the one deadline scope (module comment)
        self._phase = _IDLE
        self._phase_scope: trio.CancelScope | None = None  # what shutdown() cancels while streaming etc.
        self._request_deadline = math.inf
        self._failure: errors.QServeError | None = None    # to answer after _scope has exited
        self._renew = False  # _scope was cancelled when it no longer mattered: go on in a fresh one
        self._head_request = False
        self._raw = bytearray()   # bytes fed to h11 since this request began, kept until its head parsed
        self._recording = True
        self._eof = False
        self._write_interrupted = False
        self._client = _peer(stream)

    async def run(self) -> None:
        try:
            while True:
                with self._scope:
                    while await self._serve_one():
                        pass
                if not self._renew:
                    break
                self._renew = False
                self._scope = trio.CancelScope()
            failure = self._failure
            if self._scope.cancelled_caught and self._phase is _READING:
                failure = errors.RequestTimeout("request not received in time")
            elif self._phase is _IDLE:
                log.debug("closing idle connection (%s)",
                          "shutdown" if self._edge.shutting_down else "keep-alive timeout")
            if failure is not None:
                await self._fail(failure)
        except (_Abandon, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away or cannot be written to: nothing to answer
        finally:
            await trio.aclose_forcefully(self._stream)

    async def refuse(self, exc: errors.QServeError) -> None:
        """Read the request head (bounded), answer ``exc`` and close: for connections over the limit."""
        try:
            with trio.move_on_after(self._config.request_timeout):
                await self._read_event()
            await self._fail(exc)
        except (h11.RemoteProtocolError, _Abandon, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(self._stream)

    def shutdown(self) -> None:
        """Close an idle connection; end a streaming response, a WebSocket or a drain. A request being
        read, handled or answered is left to finish (its response then closes the connection)."""
        if self._phase is _IDLE:
            self._scope.cancel()
        elif self._phase_scope is not None:
            self._phase_scope.cancel()

    # -- one request cycle ------------------------------------------------------------------------

    async def _serve_one(self) -> bool:
        """Serve one request; True when the connection may carry another."""
        h = self._h11
        try:
            event = h.next_event()
            if event is h11.NEED_DATA and not h.trailing_data[0]:
                if not await self._wait_for_request():
                    return False
                event = h.next_event()
            self._phase = _ARRIVING
            self._request_deadline = trio.current_time() + self._config.request_timeout
            if event is h11.NEED_DATA:
                event = await self._read_event()
        except h11.RemoteProtocolError as exc:
            return self._protocol_error(exc)
        if type(event) is not h11.Request:
            return False  # ConnectionClosed: the client closed between requests
        self._recording = False
        max_head = self._config.max_header_bytes
        if len(self._raw) > max_head and len(self._raw) - len(h.trailing_data[0]) > max_head:  # head size
            return self._fail_later(errors.HeadersTooLarge("request headers too large"))
        request = Request.from_h11(event, self._client)
        self._head_request = event.method == b"HEAD"
        log.debug("%s %s", request.method, request.target)
        if self._edge.ws_handler is not None and request.is_websocket_upgrade:
            return await self._upgrade(request, event)
        self._raw = bytearray()

        limit = self._body_limit(request)
        declared = request.header("content-length")
        if declared is not None and int(declared) > limit:
            return self._fail_later(errors.PayloadTooLarge(f"request body larger than {limit} bytes"))
        if h.they_are_waiting_for_100_continue:
            self._start_request_deadline()
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        try:
            body = await self._read_body(limit)
        except _TooLarge:
            return self._fail_later(errors.PayloadTooLarge(f"request body larger than {limit} bytes"))
        except h11.RemoteProtocolError as exc:
            return self._protocol_error(exc)
        if self._scope.cancel_called:  # the request deadline fired as its last bytes arrived
            return self._fail_later(errors.RequestTimeout("request not received in time"))

        self._phase = _HANDLING
        self._scope.deadline = math.inf
        response = await self._call_handler(request._with_body(body) if body else request)
        await self._respond(response)
        return self._next_cycle()

    async def _wait_for_request(self) -> bool:
        """Wait (idle) for the first byte of the next request; False to close quietly."""
        self._phase = _IDLE
        if self._edge.shutting_down:
            return False
        self._scope.deadline = trio.current_time() + self._config.keepalive_timeout
        await self._receive()
        if self._scope.cancel_called:  # keep-alive timeout or shutdown raced with the first bytes:
            self._renew = True         # serve them (shutdown then closes after the response)
            return False
        return True

    async def _read_body(self, limit: int) -> bytes:
        h = self._h11
        chunks: list[bytes] = []
        size = 0
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                event = await self._read_event()
            if type(event) is h11.Data:
                size += len(event.data)
                if size > limit:
                    raise _TooLarge
                chunks.append(event.data)
            elif type(event) is h11.EndOfMessage:
                return b"".join(chunks)  # bytes, even from one chunk (h11 hands out bytearrays)
            else:  # ConnectionClosed cannot come mid-body; h11 raises instead
                raise _Abandon

    def _body_limit(self, request: Request) -> int:
        if self._edge.body_limit_for is None:
            return self._config.max_body_bytes
        return self._edge.body_limit_for(request)

    async def _call_handler(self, request: Request) -> Response:
        try:
            response = await self._edge.handler(request)
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
        if self._edge.shutting_down or h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            return False
        h.start_next_cycle()
        self._raw = bytearray(h.trailing_data[0])
        self._recording = True
        if self._scope.cancel_called:  # the write deadline fired as the write completed
            self._renew = True
            return False
        return True

    def _fail_later(self, exc: errors.QServeError) -> bool:
        """Answer ``exc`` (in `run`, after the deadline scope) and close."""
        self._failure = exc
        return False

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> bool:
        if self._eof:
            log.debug("client closed mid-request: request abandoned")
            return False
        if exc.error_status_hint == 431:
            return self._fail_later(errors.HeadersTooLarge("request headers too large"))
        return self._fail_later(errors.BadRequest("malformed HTTP request"))

    # -- writing ---------------------------------------------------------------------------------

    async def _respond(self, response: Response) -> None:
        status = response.status
        headers = [(k, v) for k, v in response.headers if k.lower() not in _EDGE_HEADERS]
        if self._edge.shutting_down:
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
        self._edge.count(status)
        self._phase = _WRITING
        if self._head_request:  # h11 frames a response to HEAD as empty, whatever its headers say
            await self._send(head, h11.EndOfMessage(), final=True)
        elif streaming:
            await self._send(head)
            await self._stream_body(response.stream)
        elif body:  # head, body and end in one write
            await self._send(head, h11.Data(data=body), h11.EndOfMessage(), final=True)
        else:
            await self._send(head, h11.EndOfMessage(), final=True)

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

        with _PhaseScope(self, _STREAMING, trio.CancelScope()):
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
        self._phase = _WRITING
        await self._send(h11.EndOfMessage(), final=True)

    async def _send(self, *events: h11.Event, final: bool = False) -> None:
        """The only writer of this socket: h11 turns ``events`` into bytes that go out in ONE write,
        under the lock and bounded by ``request_timeout`` (a stalled write cancels ``_scope``, which
        closes the connection). ``final``: the cycle's last write; the deadline is left for the next
        phase to set instead of being restored."""
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # the usual case; send_all provides the checkpoint
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self._write_interrupted:
                raise _Abandon
            h = self._h11
            if len(events) == 1:
                data = h.send(events[0])
            else:
                parts: list[bytes] = []
                for event in events:
                    parts += h.send_with_data_passthrough(event)
                data = b"".join(parts)
            if not data:
                return
            scope = self._scope
            previous = scope.deadline
            scope.deadline = trio.current_time() + self._config.request_timeout
            self._write_interrupted = True  # until send_all completes: a cancelled write breaks the framing
            await self._stream.send_all(data)
            self._write_interrupted = False
            if not final:
                scope.deadline = previous
        finally:
            lock.release()

    async def _fail(self, exc: errors.QServeError) -> None:
        """Answer an error found by the edge (when a response can still be sent), drain; the caller
        closes. Runs outside ``_scope``, so it bounds its own write."""
        log.debug("closing connection with %d: %s", exc.http_status, exc.reason)
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status, headers, body = errors.error_response(exc)
            self._edge.count(status)
            events = [_h11_response(status, [*headers, ("Content-Length", str(len(body))), ("Connection", "close")])]
            if body and not self._head_request:
                events.append(h11.Data(data=body))
            events.append(h11.EndOfMessage())
            with trio.move_on_after(self._config.request_timeout):
                await self._send(*events, final=True)
            if self._write_interrupted:
                raise _Abandon
        await self._drain()

    async def _drain(self) -> None:
        """Half-close, then read and discard (bounded; cut short by shutdown) so that closing does not
        reset the response away before the client read it."""
        with _PhaseScope(self, _DRAINING, trio.move_on_after(_DRAIN_SECONDS)):
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

    # -- reading ---------------------------------------------------------------------------------

    def _start_request_deadline(self) -> None:
        """The request has to wait for the network: from now on it is bounded by ``request_timeout``
        (counted from its first byte). A request that arrived whole never pays for this."""
        if self._phase is not _READING:
            self._phase = _READING
            self._scope.deadline = self._request_deadline

    async def _read_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self._h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self._start_request_deadline()
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
        problem = handshake_problem(request, event.http_version)
        if problem is not None:
            return self._fail_later(problem)
        edge = self._edge
        edge.count(101)
        edge.websockets += 1
        self._phase = _UPGRADED
        self._scope.deadline = math.inf
        scope = trio.CancelScope()  # entered by run_upgrade around the handler
        self._phase_scope = scope
        if edge.shutting_down:
            scope.cancel()
        try:
            upgrade = await run_upgrade(
                self._stream, bytes(self._raw),
                lambda upgrade: edge.ws_handler(request, upgrade),
                max_message_size=self._config.ws_max_message_size,
                message_queue_size=self._config.ws_message_queue_size,
                handshake_timeout=self._config.request_timeout,
                scope=scope)
            log.debug("websocket on %s ended (%s)", request.path, upgrade.state if upgrade else "no handshake")
        finally:
            self._phase_scope = None
            edge.websockets -= 1
        return False


class _PhaseScope:
    """Enter ``scope`` as the connection's phase scope: cancelled at once when the server is already
    shutting down, and by `_Connection.shutdown` until it exits."""

    __slots__ = ("_conn", "_phase", "_scope")

    def __init__(self, conn: _Connection, phase: str, scope: trio.CancelScope) -> None:
        self._conn, self._phase, self._scope = conn, phase, scope

    def __enter__(self) -> trio.CancelScope:
        conn = self._conn
        conn._phase, conn._phase_scope = self._phase, self._scope
        if conn._edge.shutting_down:
            self._scope.cancel()
        return self._scope.__enter__()

    def __exit__(self, *exc_info) -> bool:
        self._conn._phase_scope = None
        return self._scope.__exit__(*exc_info)


def _h11_response(status: int, headers: list[tuple[str, str]]) -> h11.Response:
    """The h11 event for a response head. Heads repeat (every commit is ``200 OK`` with the same
    three headers), and h11 validates a head's every header when it is built, so the last
    `_HEAD_CACHE_SIZE` distinct heads are kept (h11 events are immutable)."""
    key = (status, tuple(headers))
    head = _head_cache.get(key)
    if head is None:
        head = h11.Response(status_code=status, reason=_REASONS.get(status, b""),
                            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers])
        if not any(k == _UNIQUE for k, _ in headers):   # a put's head never repeats: keep it out
            if len(_head_cache) >= _HEAD_CACHE_SIZE:
                del _head_cache[next(iter(_head_cache))]   # the oldest
            _head_cache[key] = head
    return head


_HEAD_CACHE_SIZE = 64
_UNIQUE = REQUEST_ID_HEADER   # differs on every put answer
_head_cache: dict[tuple, h11.Response] = {}


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
