"""The benchmarks' lean WebSocket client (not a public API): a watch consumer's receiving side.

Why not trio-websocket here: its reader task, wsproto's event objects and the message channel cost
the client process enough CPU per frame to make the one client core (the server has the other) the
limit of `tools.bench.watch` before the server was (README, "Development", has the figure). This client does what a watch
consumer needs and nothing more, strictly: the RFC 6455 handshake (it checks the 101 and
``Sec-WebSocket-Accept``), unmasked server frames (binary, continuation, ping, pong, close), masked
replies (pong, close echo). A text frame, a masked server frame, reserved bits or an unknown opcode
is a `ProtocolError`. Everything talks to 127.0.0.1 only.

    ws = await LeanWebSocket.connect(port, "/api/predict/svc?_watch_=true", headers)
    while (message := await ws.get_message()) is not None: ...   # None: the server closed
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from collections import deque

import trio

LOCALHOST = "127.0.0.1"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_MESSAGE = 16 * 1024 * 1024


class ProtocolError(Exception):
    pass


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked, final client frame (control payloads are <= 125 bytes)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes((0x80 | opcode, 0x80 | n)) if n < 126 else struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


class LeanWebSocket:
    def __init__(self, stream: trio.SocketStream, rest: bytes) -> None:
        self.stream = stream
        self._buf = bytearray(rest)
        self._messages: deque[bytes] = deque()
        self._partial: bytearray | None = None
        self._replies: list[bytes] = []     # pongs and the close echo, sent before the next read
        self.close_code: int | None = None

    @classmethod
    async def connect(cls, port: int, target: str, headers: list[tuple[bytes, bytes]]) -> "LeanWebSocket":
        stream = await trio.open_tcp_stream(LOCALHOST, port)
        key = base64.b64encode(os.urandom(16))
        lines = [b"GET " + target.encode() + b" HTTP/1.1", b"Host: %s:%d" % (LOCALHOST.encode(), port),
                 b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Version: 13",
                 b"Sec-WebSocket-Key: " + key, *(k + b": " + v for k, v in headers)]
        await stream.send_all(b"\r\n".join(lines) + b"\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                raise ProtocolError("connection closed during the handshake")
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101 "):
            status = head.split(b"\r\n", 1)[0]
            raise ProtocolError(f"handshake refused: {status!r}")
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        if b"\r\nsec-websocket-accept: " + accept.lower() not in head.lower():
            raise ProtocolError("bad Sec-WebSocket-Accept")
        return cls(stream, rest)

    async def get_message(self) -> bytes | None:
        """The next binary message; None once the server has closed (its close echoed)."""
        while not self._messages:
            if self._replies:
                await self._flush_replies()
            if self.close_code is not None:
                return None
            if not self._parse():
                data = await self.stream.receive_some(65536)
                if not data:
                    self.close_code = 1006
                    return None
                self._buf += data
        return self._messages.popleft()

    def _parse(self) -> bool:
        """Take every complete frame from the buffer; False when more bytes are needed first."""
        buf = self._buf
        progressed = False
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            if b1 & 0x80 or b0 & 0x70:
                raise ProtocolError("masked server frame or reserved bits set")
            n, start = b1 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, start = struct.unpack_from("!H", buf, 2)[0], 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, start = struct.unpack_from("!Q", buf, 2)[0], 10
            if n > _MAX_MESSAGE:
                raise ProtocolError(f"frame of {n} bytes")
            if len(buf) < start + n:
                break
            payload = bytes(buf[start:start + n])
            del buf[:start + n]
            progressed = True
            self._frame(b0 & 0x80, b0 & 0x0F, payload)
        return progressed

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode == 0x2 and fin and self._partial is None:
            self._messages.append(payload)
        elif opcode == 0x2:
            if self._partial is not None:
                raise ProtocolError("new message inside a fragmented one")
            self._partial = bytearray(payload)
        elif opcode == 0x0:
            if self._partial is None:
                raise ProtocolError("continuation without a message")
            self._partial += payload
            if fin:
                self._messages.append(bytes(self._partial))
                self._partial = None
        elif opcode == 0x9:
            self._replies.append(_client_frame(0xA, payload))
        elif opcode == 0xA:
            pass
        elif opcode == 0x8:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self._replies.append(_client_frame(0x8, payload[:2]))
        else:
            raise ProtocolError(f"unexpected opcode {opcode:#x}")

    async def _flush_replies(self) -> None:
        data, self._replies = b"".join(self._replies), []
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close_code = self.close_code or 1006

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
