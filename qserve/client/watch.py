"""The watch (subscription) side of the qserve client: a WebSocket that reconnects like the official SDKs.

Strategy: a `Watcher` owns a nursery for the lifetime of its ``async with`` block. One background
task keeps a WebSocket open (trio-websocket), decodes each binary frame with `qserve.wire.protobuf` and
hands the entries to the consumer through an unbuffered memory channel, so the consumer's pace is
the only buffer besides the server's window. After any disconnect it waits ``reconnect_delay`` and
dials again with the same URL and identity, forever, so entries the server redelivers (those not
committed before the disconnect) arrive again. Only the very first handshake is allowed to fail
loudly, and only with a 4xx (bad token, bad parameter): that is a configuration error, not an outage.
A ping every ``ping_interval`` seconds that gets no pong within the client timeout drops the
connection, so a half-open TCP connection does not stall the subscription. An optional ``on_link``
callback hears of each loss of the server (once per outage, not once per failed dial) and of each
regained connection, so a command line can tell its user instead of going silent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import trio
import trio_websocket

from qserve.wire import protobuf
from qserve.client.http import QueueError, _describe as describe_os_error, reason_from

__all__ = ["Watcher"]

log = logging.getLogger("qserve.client")


class Watcher:
    """An open subscription; use as ``async with client.watch(...) as w: async for entry in w``.

    Iterate from one task only. Leaving the ``async with`` block closes the socket; entries that
    were delivered and not committed then go back to the consumer group.

    Attributes:
        connects: how many times a WebSocket handshake succeeded (1 + reconnects).

    ``on_link(up, reason)``, when given, is called from the watcher's task (it must not block):
    ``(False, reason)`` when the server is lost (an open connection drops, or the first dial fails
    with an outage; later failed dials of the same outage are not reported again), ``(True, "")``
    when a handshake succeeds after that.
    """

    def __init__(self, open_websocket: Callable[[str], AbstractAsyncContextManager[trio_websocket.WebSocketConnection]],
                 resource: str, *, timeout: float, reconnect_delay: float, ping_interval: float,
                 on_link: Callable[[bool, str], None] | None = None) -> None:
        self._open_websocket = open_websocket   # the client's handshake: resource -> open connection
        self._timeout = timeout                 # the client's timeout: a ping's pong must come within it
        self._resource = resource
        self._reconnect_delay = reconnect_delay
        self._ping_interval = ping_interval
        self._on_link = on_link
        self._nursery_cm = None
        self._nursery: trio.Nursery | None = None
        self._send, self._receive = trio.open_memory_channel(0)
        self.connects = 0

    @property
    def resource(self) -> str:
        """The request target of the WebSocket handshake (path and query)."""
        return self._resource

    async def __aenter__(self) -> "Watcher":
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        try:
            await self._nursery.start(self._run)
        except BaseException:
            self._nursery.cancel_scope.cancel()
            await self._nursery_cm.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info) -> bool:
        assert self._nursery is not None and self._nursery_cm is not None
        self._nursery.cancel_scope.cancel()
        await self._nursery_cm.__aexit__(None, None, None)
        self._receive.close()
        return False

    def __aiter__(self) -> "Watcher":
        return self

    async def __anext__(self) -> protobuf.Frame:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def _run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        first = True
        lost = False
        while True:
            try:
                async with self._open_websocket(self._resource) as ws:
                    self.connects += 1
                    if first:
                        first = False
                        task_status.started()
                    if lost and self._on_link is not None:
                        self._on_link(True, "")
                    lost = False
                    await self._serve(ws)
            except trio_websocket.ConnectionRejected as exc:
                reason = reason_from(exc.status_code, b"", exc.body or b"")
                if first and 400 <= exc.status_code < 500:
                    raise QueueError(exc.status_code, reason) from None
                log.warning("watch %s refused: %s %s; retrying", self._resource, exc.status_code, reason)
                why = f"handshake refused: {exc.status_code} {reason}"
            except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError,
                    trio.BrokenResourceError, protobuf.DecodeError, _Stalled) as exc:
                log.info("watch %s disconnected (%s); reconnecting", self._resource, _explain(exc))
                why = _lost_reason(exc)
            if not lost and self._on_link is not None:
                self._on_link(False, why)
            lost = True
            if first:
                first = False
                task_status.started()    # an outage is retried in the background, like the SDKs
            await trio.sleep(self._reconnect_delay)

    async def _serve(self, ws: trio_websocket.WebSocketConnection) -> None:
        """Pass frames on until the connection breaks; ping when it has been quiet for a while."""
        quiet = self._ping_interval if self._ping_interval > 0 else math.inf
        while True:
            message: bytes | str | None = None
            with trio.move_on_after(quiet):
                message = await ws.get_message()
            if message is None:
                with trio.move_on_after(self._timeout) as scope:
                    await ws.ping()
                if scope.cancelled_caught:
                    raise _Stalled(f"no pong within {self._timeout:g}s")
                continue
            if isinstance(message, str):
                raise protobuf.DecodeError("text frame on a watch")
            await self._send.send(protobuf.decode_frame(message))


class _Stalled(Exception):
    pass


def _lost_reason(exc: BaseException) -> str:
    """A short lower-case reason for `on_link`: "connection refused", "connection closed: 1001 going away (...)"."""
    if isinstance(exc, trio_websocket.ConnectionClosed) and exc.reason is not None:
        close = exc.reason
        text = f"connection closed: {close.code} {str(close.name or '').lower().replace('_', ' ')}".rstrip()
        return text + (f" ({close.reason})" if close.reason else "")
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, trio_websocket.HandshakeError) and cause is not None:
        return describe_os_error(cause)
    if isinstance(exc, (OSError, trio.BrokenResourceError)):
        return describe_os_error(exc)
    return _explain(exc)


def _explain(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, trio_websocket.HandshakeError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

