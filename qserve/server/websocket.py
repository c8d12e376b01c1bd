"""The WebSocket half of the edge: hand an HTTP connection that asked for an upgrade to trio-websocket.

Strategy (STYLE rule 6, choice (b)): h11 parses every request first. When the edge
(`server.connection`) decides a request is a WebSocket upgrade (and `handshake_problem` finds none),
the connection stops using h11 and the bytes h11 already consumed for this request (its head plus
anything the client sent after it) are put back in front of the socket by a `ReplayStream`.
`trio_websocket.wrap_server_stream` then reads the handshake from that stream as if it were fresh, so
trio-websocket owns the connection from the first byte: its single reader task, automatic pongs, the
bounded message queue and `max_message_size`. It writes through the `ReplayStream`, whose lock it
shares with `WebSocketUpgrade.send_messages`, the watch's own writer of data frames. We chose this over (a), wsproto's post-handshake `Connection(...,
trailing_data=...)`, because trio-websocket only accepts a `WSConnection` that performs the handshake
itself; (a) would mean reaching into its private state. One consequence: wsproto's server handshake
drops bytes that arrive together with the handshake (before our 101), which only a client violating RFC
6455 section 4.1 sends; the replay loses nothing else, and the first client frame after the 101 reaches
the handler.

The application decides the handshake: the WebSocket handler receives a `WebSocketUpgrade` and calls
`accept()` (which returns the `trio_websocket.WebSocketConnection`) or `reject(status, body)`;
raising a `QServeError` before accepting rejects with that error's status and reason
(`errors.error_response`), raising after accepting closes with `errors.ws_close_for`.
"""

from __future__ import annotations

import logging
import operator
import struct
from collections.abc import Awaitable, Callable, Iterable

import trio
import trio_websocket

from qserve.core import errors
from qserve.server import sockio
from qserve.server.types import Request

__all__ = ["ReplayStream", "WebSocketUpgrade", "WebSocketHandler", "binary_frame", "handshake_problem", "run_upgrade"]

log = logging.getLogger("qserve.http")

_CLOSE_SECONDS = 2.0  # bound on the closing handshake and on rejecting during cleanup


class ReplayStream(trio.abc.Stream):
    """A stream that first returns ``prefix``, then whatever the wrapped stream receives.

    Sends, ``wait_send_all_might_not_block`` and ``aclose`` go to the wrapped stream; sends are
    serialized by a lock (trio-websocket's reader task and `WebSocketUpgrade.send_messages` both
    write), and after the handshake the stream notes whether a close frame went out (see `aclose`).
    A send cancelled after its first byte went out (at shutdown, a write blocked on a client that
    does not read) leaves the client inside an unfinished frame: every later send then raises
    `trio.BrokenResourceError`, so no close frame is written into the middle of that frame (the
    connection is closed without one). One receiver at a time.

    Args:
        stream: the transport, for example a `trio.SocketStream`.
        prefix: bytes already read from ``stream`` that the next reader must see first.
    """

    def __init__(self, stream: trio.abc.Stream, prefix: bytes = b"") -> None:
        self.transport_stream = stream
        self._prefix = bytearray(prefix)
        self._closed = False
        self._cut = False                         # a send was cancelled part-way (see the class doc)
        self._send_lock = trio.StrictFIFOLock()   # `WebSocketUpgrade.send_messages` writes outside
                                                  # trio-websocket's own lock
        self.extensions = False                   # the handshake reply negotiated an extension
        # set once the handshake is accepted: () -> the connection's CloseReason or None (see aclose)
        self.close_reason: Callable[[], trio_websocket.CloseReason | None] | None = None
        self.close_frame_sent = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if not self._prefix:
            return await self.transport_stream.receive_some(max_bytes)
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        await trio.lowlevel.checkpoint()
        n = len(self._prefix) if max_bytes is None else max_bytes
        data = bytes(self._prefix[:n])
        del self._prefix[:n]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.close_reason is None:   # the handshake's reply
            self.extensions |= b"sec-websocket-extensions:" in bytes(data).lower()
        elif data and data[0] & 0x0F == 0x8:
            self.close_frame_sent = True   # after the handshake every send is one whole frame
        lock = self._send_lock
        try:
            lock.acquire_nowait()   # the usual case: the lock's own acquire() would yield a scheduling
        except trio.WouldBlock:     # batch even when free; send_all provides the checkpoint
            await lock.acquire()
        try:
            if self._cut:
                raise trio.BrokenResourceError("an earlier send was cut short inside a frame")
            await trio.lowlevel.checkpoint_if_cancelled()   # cancelled before any byte: no harm done
            try:
                await sockio.send_all(self.transport_stream, data)   # trio's, without its wrappers
            except trio.Cancelled:
                self._cut = True
                raise
        finally:
            lock.release()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        try:
            frame = self._farewell() if self.close_reason is not None and not self.close_frame_sent else b""
            if frame and not self._closed and not self._cut:
                # shielded (bounded): the reader task that calls this is cancelled as soon as the
                # handler has seen the connection close
                with trio.CancelScope(shield=True) as farewell:
                    farewell.deadline = trio.current_time() + _CLOSE_SECONDS
                    async with self._send_lock:
                        await self.transport_stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._closed = True
            self._prefix.clear()
            await self.transport_stream.aclose()

    def _farewell(self) -> bytes:
        """The close frame trio-websocket owes the client. On a frame wsproto cannot parse it gets a
        CloseConnection event while still OPEN, so it drops the TCP connection without the 1002 (or
        1007) close frame RFC 6455 7.1.7 says the server should send first; it goes out here."""
        reason = self.close_reason()
        if reason is None or reason.code not in (1002, 1007):
            return b""
        text = (reason.reason or "").encode("utf-8")[:120].decode("utf-8", "ignore").encode("utf-8")
        return bytes([0x88, 2 + len(text)]) + reason.code.to_bytes(2, "big") + text  # FIN|close, unmasked


class WebSocketUpgrade:
    """A WebSocket handshake waiting for the application to accept or reject it.

    ``state`` is ``"pending"``, then ``"accepted"`` or ``"rejected"``, or ``"broken"`` when
    `accept` was cut off before the handshake completed (nothing to close but the stream). Call one
    of `accept` or `reject` once, from the handler's task (not task-safe).
    """

    def __init__(self, ws_request: trio_websocket.WebSocketRequest, stream: ReplayStream | None = None) -> None:
        self._ws_request = ws_request
        self._stream = stream
        self.state = "pending"
        self.connection: trio_websocket.WebSocketConnection | None = None

    async def accept(self, *, headers: Iterable[tuple[str, str]] = ()) -> trio_websocket.WebSocketConnection:
        """Send ``101 Switching Protocols`` and return the open connection.

        Raises:
            RuntimeError: the handshake was already decided.
            trio_websocket.ConnectionClosed: the client went away.
        """
        self._decide("accepted")
        try:
            self.connection = ws = await self._ws_request.accept(extra_headers=_encode(headers))
        except BaseException:
            # cut off mid-handshake (the session cancelled, the client gone): whether the 101 went
            # out is unknown, so there is no WebSocket to close; the stream is closed forcefully
            self.state = "broken"
            raise
        if self._stream is not None:
            self._stream.close_reason = lambda: ws.closed
        return self.connection

    async def send_messages(self, messages: Iterable[bytes]) -> None:
        """Send each of ``messages`` as one binary message, all of them in ONE socket write (a watch
        sends a window's worth of frames at once; a write per frame costs more than the frame).

        The frames are encoded here, not by wsproto: trio-websocket accepts with no extension, so a
        server's data frame is the plain RFC 6455 one (`binary_frame`), and wsproto keeps no state
        for complete outgoing messages. What wsproto would check is checked here: nothing is sent
        once the connection is closing (trio-websocket records the close reason before it sends a
        close reply, and every send goes through the stream's FIFO lock, so frames that pass the
        check go out before that reply). Should an extension ever be negotiated, each message goes
        through ``send_message`` instead.

        Raises:
            trio_websocket.ConnectionClosed: the connection is closed or closing.
            trio.BrokenResourceError, trio.ClosedResourceError: the write failed (the peer went away).
        """
        ws, stream = self.connection, self._stream
        if ws is None:
            raise RuntimeError("WebSocket handshake not accepted")
        if stream is None or stream.extensions:
            for message in messages:
                await ws.send_message(message)
            return
        data = b"".join(map(binary_frame, messages))
        if ws.closed is not None or stream.close_frame_sent:
            raise trio_websocket.ConnectionClosed(ws.closed)
        await stream.send_all(data)

    async def reject(self, status: int, body: bytes = b"", *, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Refuse the handshake with an HTTP response (for example 401); the connection then closes.

        Raises:
            RuntimeError: the handshake was already decided.
            ValueError: ``status`` is not a final status that refuses an upgrade (300-599).
        """
        if not 300 <= status <= 599:
            raise ValueError(f"cannot reject a WebSocket handshake with status {status}")
        self._decide("rejected")
        await self._ws_request.reject(status, extra_headers=_encode(headers), body=body or None)

    async def _reject_with(self, exc: BaseException) -> None:
        status, headers, body = errors.error_response(exc)
        await self.reject(status, body, headers=headers)

    def _decide(self, state: str) -> None:
        if self.state != "pending":
            raise RuntimeError(f"WebSocket handshake already {self.state}")
        self.state = state


#: the application's handler for a WebSocket upgrade: accept or reject it, then serve it
WebSocketHandler = Callable[[Request, WebSocketUpgrade], Awaitable[None]]


def handshake_problem(request: Request, http_version: bytes) -> errors.QServeError | None:
    """Why an upgrade request cannot be handed to wsproto (which would otherwise fail it silently),
    or None. ``http_version`` is the request's, as h11 parsed it (``b"1.1"``)."""
    if http_version != b"1.1":
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


def binary_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented binary frame (RFC 6455 5.2), as a server sends it."""
    n = len(payload)
    if n < 126:
        return bytes((0x82, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x82, 126, n) + payload
    return struct.pack("!BBQ", 0x82, 127, n) + payload


def _encode(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def run_upgrade(
    stream: trio.abc.Stream,
    consumed: bytes,
    handler: Callable[[WebSocketUpgrade], Awaitable[None]],
    *,
    max_message_size: int,
    message_queue_size: int,
    handshake_timeout: float,
    scope: trio.CancelScope,
) -> WebSocketUpgrade | None:
    """Run one upgraded connection to its end and close ``stream``.

    Args:
        stream: the connection, with nothing written to it since the upgrade request.
        consumed: the bytes already read for the upgrade request (its head and anything after it).
        handler: the application's callback; it accepts or rejects and then uses the connection.
        max_message_size, message_queue_size: trio-websocket's bounds for client messages.
        handshake_timeout: bound on trio-websocket re-reading the handshake.
        scope: the handler runs inside it; cancelling it (at shutdown) closes the socket with 1001.

    Returns:
        The `WebSocketUpgrade` (its ``state`` says how the handshake ended), or None when the
        handshake could not even be re-read.
    """
    replay = ReplayStream(stream, consumed)
    upgrade: WebSocketUpgrade | None = None
    try:
        async with trio.open_nursery() as reader_nursery:  # trio-websocket's reader task lives here
            with trio.move_on_after(handshake_timeout):
                upgrade = WebSocketUpgrade(await trio_websocket.wrap_server_stream(
                    reader_nursery, replay, message_queue_size=message_queue_size,
                    max_message_size=max_message_size), replay)
            if upgrade is not None:
                await _run_handler(upgrade, handler, scope)
            reader_nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(replay)
    return upgrade


async def _run_handler(upgrade: WebSocketUpgrade, handler, scope: trio.CancelScope) -> None:
    failure: BaseException | None = None
    try:
        with scope:
            await handler(upgrade)
    except trio_websocket.ConnectionClosed:
        pass  # the client went away (EOF, reset or close frame): a normal end
    except Exception as exc:  # noqa: BLE001 - rendered to the client by errors.py, logged if unexpected
        failure = exc
        if not isinstance(exc, errors.QServeError):
            log.error("websocket handler failed: %r", exc)
            log.debug("websocket handler traceback", exc_info=True)
    with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_SECONDS):
        try:
            if upgrade.state == "pending":
                if failure is None and not scope.cancelled_caught:
                    log.error("websocket handler returned without accepting or rejecting")
                    failure = errors.InternalError()
                await upgrade._reject_with(failure or errors.Unavailable("server shutting down"))
            elif upgrade.state == "accepted":
                assert upgrade.connection is not None
                if failure is not None:
                    code, reason = errors.ws_close_for(failure)
                elif scope.cancelled_caught:
                    code, reason = 1001, "server shutting down"
                else:
                    code, reason = 1000, ""
                await upgrade.connection.aclose(code, reason or None)
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
