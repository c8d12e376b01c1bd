"""One HTTP/1.1 connection of the edge: the task that is its only reader and, through `_send`, its only writer.

Strategy: `_Connection.run` serves request cycles until the connection cannot carry another, all inside
ONE cancel scope (``_scope``) for the connection's life. Instead of entering a scope for each wait and
each write (a cancel scope costs about as much as parsing a small request), a cycle moves that scope's
deadline as it goes, and records its phase so that `run` knows, when the deadline fires, what it
meant (`phases`: the table of what a fired deadline means in each phase, and the transitions). The
deadline is not trio's own (moving that re-registers the scope each time) but ``expiry``, a number
the edge's `expiry.Expiries` task watches: it cancels ``_scope`` when the time comes.
Writing (responses, streamed bodies, error answers, the drain) is the `writing.Writing` half.

A cancelled scope stays cancelled, so whatever follows a fired deadline (the 408, the drain) runs in
`run` after ``_scope`` has exited; errors found while reading (400, 413, 431) take the same way
(``_failure``). A deadline (or shutdown) can fire in the same scheduler round in which the awaited
bytes arrive or the write completes; the task then resumes with the cancellation pending, so
``cancel_called`` is checked where a wait ends (kept as ``_cut``, set by the scope's only two
cancels: it has no deadline of trio's, and the property reads the clock), and a cancellation meant
for a wait is never delivered into the application's handler: after the idle wait and after a
response (the bytes that arrived are served, in a fresh scope: ``_renew``), and before the handler
(408: the deadline did pass).
"""

from __future__ import annotations

import logging
import math

import h11
import trio

from qserve.core import errors
from qserve.server.edge import Edge, error_response, peer_of
from qserve.server.phases import Phase, advance
from qserve.server.sockio import receive_some
from qserve.server.types import Request, Response
from qserve.server.websocket import handshake_problem, run_upgrade
from qserve.server.writing import RECEIVE_SIZE, Abandon, Writing

log = logging.getLogger("qserve.http")


class _TooLarge(Exception):
    pass


def _keeps_alive(version: bytes, headers: tuple[tuple[str, str], ...]) -> bool:
    """Whether a request lets the connection carry another: HTTP/1.1 without ``Connection: close``
    (h11's rule, which frames the answers h11 sends itself)."""
    if version != b"1.1":
        return False
    for name, value in headers:
        if name == "connection" and "close" in (token.strip().lower() for token in value.split(",")):
            return False
    return True


class _Connection(Writing):
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
        self._cut = False   # ``_scope`` was cancelled (`_cut_scope`): its ``cancel_called``, without the clock read
        self.expiry = math.inf             # when ``_scope`` is cancelled: its deadline (`Expiries`)
        self._expiries = edge.expiries
        self._phase = Phase.IDLE
        self._phase_scope: trio.CancelScope | None = None  # what shutdown() cancels while streaming etc.
        self._request_deadline = math.inf
        self._failure: errors.QServeError | None = None    # to answer after _scope has exited
        self._renew = False  # _scope was cancelled when it no longer mattered: go on in a fresh one
        self._head_request = False
        self._keep_alive = False     # the request allows another after it (h11's rule, `_keeps_alive`)
        self._answered_raw = False   # the answer went out without h11 (`Writing._respond`)
        self._raw = bytearray()   # bytes fed to h11 since this request began, kept until its head parsed
        self._recording = True
        self._eof = False
        self._write_interrupted = False
        self._client = peer_of(stream)

    def _enter(self, phase: Phase) -> None:
        """Move to ``phase``: the one place a phase changes, checked against `phases.NEXT`."""
        self._phase = advance(self._phase, phase)

    def expired(self) -> None:
        """The deadline has come (`Expiries` calls this): as trio's own deadline would, cancel ``_scope``."""
        self._cut_scope()

    def _cut_scope(self) -> None:
        """Cancel ``_scope``: the only way it is cancelled, so that ``_cut`` is its ``cancel_called``."""
        self._cut = True
        self._scope.cancel()

    def enter_phase_scope(self, phase: Phase | None, scope: trio.CancelScope | None) -> None:
        """`PhaseScope`'s hook: ``phase`` with ``scope`` as what `shutdown` cancels (None: leaving it)."""
        if phase is not None:
            self._enter(phase)
        self._phase_scope = scope
        if scope is not None and self._edge.shutting_down:
            scope.cancel()

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
                self._cut = False
                self.expiry = math.inf
            failure = self._failure
            if self._scope.cancelled_caught and self._phase is Phase.READING:
                failure = errors.RequestTimeout("request not received in time")
            elif self._phase is Phase.IDLE:
                log.debug("closing idle connection (%s)",
                          "shutdown" if self._edge.shutting_down else "keep-alive timeout")
            if failure is not None:
                await self._fail(failure)
        except (Abandon, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away or cannot be written to: nothing to answer
        finally:
            await trio.aclose_forcefully(self._stream)

    async def refuse(self, exc: errors.QServeError) -> None:
        """Read the request head (bounded), answer ``exc`` and close: for connections over the limit."""
        try:
            with trio.move_on_after(self._config.request_timeout):
                await self._read_event()
            await self._fail(exc)
        except (h11.RemoteProtocolError, Abandon, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(self._stream)

    def shutdown(self) -> None:
        """Close an idle connection; end a streaming response, a WebSocket or a drain. A request being
        read, handled or answered is left to finish (its response then closes the connection)."""
        if self._phase is Phase.IDLE:
            self._cut_scope()
        elif self._phase_scope is not None:
            self._phase_scope.cancel()

    # -- one request cycle ------------------------------------------------------------------------

    async def _serve_one(self) -> bool:
        """Serve one request; True when the connection may carry another."""
        h = self._h11
        try:
            trailing, closed = h.trailing_data
            if not trailing and not closed:   # nothing of the next request yet: h11 would say NEED_DATA
                if not await self._wait_for_request():
                    return False
            event = h.next_event()
            self._enter(Phase.ARRIVING)
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
        self._keep_alive = _keeps_alive(event.http_version, request.headers)
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
        if self._cut:  # the request deadline fired as its last bytes arrived
            return self._fail_later(errors.RequestTimeout("request not received in time"))

        self._enter(Phase.HANDLING)
        self.expiry = math.inf   # no earlier than any: `Expiries` needs no word of it
        request.body = body
        response = await self._call_handler(request)
        await self._respond(response)
        return self._next_cycle()

    async def _wait_for_request(self) -> bool:
        """Wait (idle) for the first byte of the next request; False to close quietly."""
        self._enter(Phase.IDLE)
        if self._edge.shutting_down:
            return False
        self._expiries.set(self, trio.current_time() + self._config.keepalive_timeout)
        await self._receive()
        if self._cut:  # keep-alive timeout or shutdown raced with the first bytes:
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
                raise Abandon

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
            return error_response(exc)
        except Exception as exc:  # noqa: BLE001 - becomes a generic 500; logged once
            log.error("handler failed on %s %s: %r", request.method, request.path, exc)
            log.debug("handler traceback", exc_info=True)
            return error_response(exc)

    def _next_cycle(self) -> bool:
        h = self._h11
        if self._answered_raw:   # h11 did not see the answer: a fresh h11 parses the next request
            self._answered_raw = False
            trailing, closed = h.trailing_data
            self._h11 = h = h11.Connection(h11.SERVER, max_incomplete_event_size=self._config.max_header_bytes)
            if trailing:
                h.receive_data(trailing)
            if closed:
                h.receive_data(b"")
            if self._edge.shutting_down:
                return False
        elif self._edge.shutting_down or h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            return False
        else:
            h.start_next_cycle()
        self._raw = bytearray(h.trailing_data[0])
        self._recording = True
        if self._cut:  # the write deadline fired as the write completed
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

    # -- reading ---------------------------------------------------------------------------------

    def _start_request_deadline(self) -> None:
        """The request has to wait for the network: from now on it is bounded by ``request_timeout``
        (counted from its first byte). A request that arrived whole never pays for this."""
        if self._phase is not Phase.READING:
            self._enter(Phase.READING)
            self._expiries.set(self, self._request_deadline)

    async def _read_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self._h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self._start_request_deadline()
            await self._receive()

    async def _receive(self) -> None:
        try:
            data = await receive_some(self._stream, RECEIVE_SIZE)
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
        self._enter(Phase.UPGRADED)
        self.expiry = math.inf
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
