"""`RawWatcher`: a WebSocket watch client on wsproto that sends hand-made frames (the fuzz and keep-alive
tests) and records every frame, pong and close the server sent."""

from __future__ import annotations

import trio
import wsproto
import wsproto.events
import wsproto.utilities

from qserve.wire import protobuf

from .inproc import TOKEN

LIMIT = 10.0   # seconds for one exchange; more means the server hangs


class RawWatcher:
    """A WebSocket watch client that sends hand-made frames and records what the server sent."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.frames: list[protobuf.Frame] = []
        self._partial = bytearray()
        self._replies = bytearray()
        self.close_code: int | None = None
        self.pongs = 0
        self.eof = False
        self.broken = False

    @classmethod
    async def connect(cls, listener, service: str, query: str, user: str) -> "RawWatcher":
        self = cls(await listener.connect())
        await self.stream.send_all(self.ws.send(wsproto.events.Request(
            host="fuzz", target=f"/api/predict/{service}?_watch_=true&{query}",
            extra_headers=[(b"Authorization", TOKEN.encode()), (b"X-EAS-QueueService-Gid", b"g"),
                           (b"X-EAS-QueueService-Uid", user.encode())])))
        while True:
            for event in await self._events():
                if isinstance(event, wsproto.events.AcceptConnection):
                    return self
                raise AssertionError(f"handshake refused: {event!r}")

    async def _events(self):
        data = await self.stream.receive_some(65536)
        if not data:
            self.eof = True
        self.ws.receive_data(data or None)
        events = list(self._handle(self.ws.events()))
        if self._replies:
            replies, self._replies = bytes(self._replies), bytearray()
            await self.send_raw(replies)
        return events

    def _handle(self, events):
        for event in events:
            if isinstance(event, wsproto.events.BytesMessage):
                self._partial += event.data
                if event.message_finished:
                    self.frames.append(protobuf.decode_frame(bytes(self._partial)))
                    self._partial.clear()
            elif isinstance(event, wsproto.events.Pong):
                self.pongs += 1
            elif isinstance(event, wsproto.events.CloseConnection):
                if self.close_code is None:    # (EOF after it reads as a second close, 1006)
                    self.close_code = event.code
                try:   # answer it, as a well-behaved client does
                    self._replies += self.ws.send(event.response())
                except wsproto.utilities.LocalProtocolError:
                    pass
            else:
                yield event

    async def read_for(self, seconds: float) -> None:
        """Read what the server sends for a while (or until it closes)."""
        with trio.move_on_after(seconds):
            while not self.eof:
                try:
                    await self._events()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.eof = True
                except wsproto.utilities.LocalProtocolError:
                    pass

    async def wait_frames(self, n: int) -> None:
        with trio.fail_after(LIMIT):
            while len(self.frames) < n and not self.eof:
                await self._events()

    async def send_raw(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True

    async def read_until_closed(self) -> None:
        with trio.fail_after(LIMIT):
            while not self.eof:
                try:
                    await self._events()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.eof = True
                except wsproto.utilities.RemoteProtocolError:
                    self.eof = True   # the server stopped mid-frame: no more frames anyway
