"""Peers for in-process servers: a `MemoryListener` whose connections are memory streams (so trio's
autojump clock owns time), an h11 `Client` over any trio stream, and `read_to_eof`."""

from __future__ import annotations

import h11
import trio
import trio.testing


class MemoryListener(trio.abc.Listener):
    """A listener whose connections are `memory_stream_pair`s (deterministic under autojump_clock);
    ``pair=trio.testing.lockstep_stream_pair`` gives connections whose writes block until read."""

    def __init__(self, pair=trio.testing.memory_stream_pair) -> None:
        self._send, self._receive = trio.open_memory_channel(0)
        self._pair = pair

    async def connect(self) -> trio.abc.Stream:
        client, server = self._pair()
        await self._send.send(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        await self._receive.aclose()


class Client:
    """An h11 client over a stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, *events) -> None:
        for event in events:
            data = self.conn.send(event)
            if data:
                await self.stream.send_all(data)

    async def next_event(self):
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def response(self) -> tuple[h11.Response, bytes]:
        head = await self.next_event()
        assert isinstance(head, h11.Response), head
        body = b""
        while not isinstance(event := await self.next_event(), h11.EndOfMessage):
            body += event.data
        return head, body

    async def request(self, method: str, target: str, body: bytes = b"", headers=()):
        hdrs = [("Host", "test"), *headers]
        if body:
            hdrs.append(("Content-Length", str(len(body))))
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        await self.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())
        return await self.response()


async def read_to_eof(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data
