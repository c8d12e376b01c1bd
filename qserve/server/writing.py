"""The writing half of an HTTP connection (`connection._Connection` is a `Writing`): responses,
streamed bodies, error answers and the drain before closing, all through `_send`, the socket's
only writer. Split from `connection` by concern; the attributes it uses are the connection's
(listed on the class), and the phase rules are `phases`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import h11
import trio

from qserve.core import errors
from qserve.server.edge import Edge, error_response
from qserve.server.expiry import Expiries
from qserve.server.heads import NO_BODY, build_head
from qserve.server.sockio import send_all
from qserve.server.phases import Phase, PhaseScope
from qserve.server.types import HTTPConfig, Response

__all__ = ["Writing", "Abandon", "RECEIVE_SIZE"]

RECEIVE_SIZE = 64 * 1024
_DRAIN_SECONDS = 2.0          # after an error response: how long we read and discard ...
_DRAIN_BYTES = 4 * 1024 * 1024  # ... and how much, before closing
_EDGE_HEADERS = frozenset({"content-length", "transfer-encoding"})  # framing is the edge's job
_END = h11.EndOfMessage()   # h11 events are immutable: one ends every response (building one: ~1 us)

log = logging.getLogger("qserve.http")


class Abandon(Exception):
    """The connection cannot continue (peer gone, write stalled, broken framing): close it."""


class Writing:
    """The writing methods of a connection; the connection's task is their only caller."""

    _edge: Edge
    _config: HTTPConfig
    _stream: trio.abc.Stream
    _h11: h11.Connection
    _scope: trio.CancelScope          # the connection's one deadline scope
    _expiries: Expiries               # ... whose deadline is ``expiry``, set through this
    expiry: float
    _send_lock: trio.StrictFIFOLock
    _head_request: bool
    _keep_alive: bool                 # the request lets the connection carry another (h11's rule)
    _answered_raw: bool               # this cycle's answer was written without h11
    _write_interrupted: bool          # a write was cut: the framing is broken
    _eof: bool
    # and ``_enter(phase)``, the connection's one place a phase changes

    async def _respond(self, response: Response) -> None:
        status = response.status
        edge = self._edge
        if self._keep_alive and response.stream is None and not self._head_request and not edge.shutting_down:
            try:   # the usual answer: written here, its head's bytes from the cache (`heads`)
                head = edge.heads.wire(status, response.headers)
            except (h11.LocalProtocolError, UnicodeEncodeError) as exc:
                log.error("handler returned an invalid response head: %r", exc)
                return await self._respond(error_response(errors.InternalError()))
            if head is not None:
                body = response.body
                edge.count(status)
                self._enter(Phase.WRITING)
                self._answered_raw = True   # h11 did not send it: `_next_cycle` starts a fresh h11
                await self._write(b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body), final=True)
                return
        headers = [(k, v) for k, v in response.headers if k.lower() not in _EDGE_HEADERS]
        if edge.shutting_down:
            headers.append(("Connection", "close"))
        streaming = response.stream is not None and status not in NO_BODY
        body = b"" if status in NO_BODY or streaming else response.body
        if streaming:
            headers.append(("Transfer-Encoding", "chunked"))
        elif status not in NO_BODY:
            headers.append(("Content-Length", str(len(body))))
        try:
            head = build_head(status, headers)
        except (h11.LocalProtocolError, UnicodeEncodeError) as exc:
            log.error("handler returned an invalid response head: %r", exc)
            return await self._respond(error_response(errors.InternalError()))
        edge.count(status)
        self._enter(Phase.WRITING)
        if self._head_request:  # h11 frames a response to HEAD as empty, whatever its headers say
            await self._send(head, _END, final=True)
        elif streaming:
            await self._send(head)
            await self._stream_body(response.stream)
        elif body:  # head, body and end in one write
            await self._send(head, h11.Data(data=body), _END, final=True)
        else:
            await self._send(head, _END, final=True)

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
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    peer_gone = True
                    cancel_scope.cancel()
                    return
                self._h11.receive_data(data)  # pipelined: kept for the next cycle

        with PhaseScope(self, Phase.STREAMING, trio.CancelScope()):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_for_disconnect, nursery.cancel_scope)
                try:
                    await stream(send)
                except (Abandon, trio.BrokenResourceError, trio.ClosedResourceError):
                    peer_gone = True
                except Exception as exc:  # noqa: BLE001 - too late for a 500: log, cut the body short
                    failed = True
                    log.error("streaming response failed: %r", exc)
                    log.debug("streaming response traceback", exc_info=True)
                nursery.cancel_scope.cancel()
        if peer_gone or failed or self._write_interrupted:
            raise Abandon  # an unterminated chunked body tells the client it is incomplete
        self._enter(Phase.WRITING)
        await self._send(_END, final=True)

    async def _send(self, *events: h11.Event, final: bool = False) -> None:
        """Write ``events`` through h11, in ONE write (`_write`)."""
        h = self._h11
        if len(events) == 1:
            data = h.send(events[0])
        else:
            parts: list[bytes] = []
            for event in events:
                parts += h.send_with_data_passthrough(event)
            data = b"".join(parts)
        if data:
            await self._write(data, final)

    async def _write(self, data: bytes, final: bool) -> None:
        """The only writer of this socket: ``data`` goes out in one write, under the lock and bounded
        by ``request_timeout`` (a stalled write cancels ``_scope``, which closes the connection).
        ``final``: the cycle's last write; the deadline is left for the next phase to set instead of
        being restored."""
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # the usual case: no other write in progress
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self._write_interrupted:
                raise Abandon
            previous = self.expiry
            self._expiries.set(self, trio.current_time() + self._config.request_timeout)
            self._write_interrupted = True  # until send_all completes: a cancelled write breaks the framing
            # a lone connection, which reads the socket next, takes no scheduler pass (`sockio`)
            await send_all(self._stream, data,
                           then_pass=not (final and self._edge.alone and not self._h11.trailing_data[0]))
            self._write_interrupted = False
            if not final:
                self._expiries.set(self, previous)
        finally:
            lock.release()

    async def _fail(self, exc: errors.QServeError) -> None:
        """Answer an error found by the edge (when a response can still be sent), drain; the caller
        closes. Runs outside ``_scope``, so it bounds its own write."""
        log.debug("closing connection with %d: %s", exc.http_status, exc.reason)
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status, headers, body = errors.error_response(exc)
            self._edge.count(status)
            events = [build_head(status, [*headers, ("Content-Length", str(len(body))), ("Connection", "close")])]
            if body and not self._head_request:
                events.append(h11.Data(data=body))
            events.append(_END)
            with trio.move_on_after(self._config.request_timeout):
                await self._send(*events, final=True)
            if self._write_interrupted:
                raise Abandon
        await self._drain()

    async def _drain(self) -> None:
        """Half-close, then read and discard (bounded; cut short by shutdown) so that closing does not
        reset the response away before the client read it."""
        with PhaseScope(self, Phase.DRAINING, trio.move_on_after(_DRAIN_SECONDS)):
            try:
                if isinstance(self._stream, trio.abc.HalfCloseableStream):
                    await self._stream.send_eof()
                drained = 0
                while drained < _DRAIN_BYTES and not self._eof:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        break
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
