"""The benchmarks' HTTP/1.1 client (part of `lib`, which re-exports it; not a public API).

Strategy: requests are hand-built bytes (`request_bytes`, `auth_headers`) sent on one keep-alive
trio socket per `HTTPConn`, one request at a time. The response parser is either h11
(``parser="h11"``) or a small strict parser for the responses the benchmarks expect
(``parser="fast"``, the default: status line, headers, Content-Length body; anything else -
chunked, no length on a non-204 - is a `ProtocolError`). The fast parser costs a few microseconds
per response, so the client process is not what is measured. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

from collections.abc import Sequence

import h11
import trio

LOCALHOST = "127.0.0.1"
TOKEN = "bench-token"


class ProtocolError(Exception):
    pass


def request_bytes(method: str, target: str, port: int, *, body: bytes = b"",
                  headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """One HTTP/1.1 request, keep-alive, with Content-Length when there is a body or a PUT/POST."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {LOCALHOST}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def auth_headers(token: str | None = TOKEN, uid: str = "bench", gid: str = "bench") -> list[tuple[str, str]]:
    """What the official Python SDK sends on every request."""
    h = [("X-EAS-QueueService-Redis-Uid", uid), ("X-EAS-QueueService-Redis-Gid", gid)]
    if token is not None:
        h.insert(0, ("Authorization", token))
    return h


class HTTPConn:
    """One keep-alive HTTP/1.1 connection; one request at a time (no pipelining, like the SDKs)."""

    def __init__(self, stream: trio.SocketStream, parser: str = "fast") -> None:
        self.stream = stream
        self.parser = parser
        self._buf = bytearray()
        self._h11 = h11.Connection(h11.CLIENT) if parser == "h11" else None

    @classmethod
    async def open(cls, port: int, parser: str = "fast") -> "HTTPConn":
        stream = await trio.open_tcp_stream(LOCALHOST, port)
        return cls(stream, parser)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def request(self, raw: bytes) -> tuple[int, bytes, bytes]:
        """Send prebuilt request bytes; return (status, raw head, body)."""
        await self.stream.send_all(raw)
        if self._h11 is not None:
            return await self._read_h11(raw)
        return await self._read_fast()

    async def _read_fast(self) -> tuple[int, bytes, bytes]:
        buf = self._buf
        receive = self.stream.receive_some
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            data = await receive(65536)
            if not data:
                raise ProtocolError("connection closed before the response head")
            buf += data
        head = bytes(buf[:end])
        if not head.startswith(b"HTTP/1.1 "):
            raise ProtocolError(f"bad status line {head[:40]!r}")
        status = int(head[9:12])
        length = 0
        lower = head.lower()
        i = lower.find(b"\r\ncontent-length:")
        if i >= 0:
            j = lower.find(b"\r\n", i + 2)
            length = int(lower[i + 17: j if j >= 0 else len(lower)])
        elif status not in (204, 304) and status >= 200:
            raise ProtocolError(f"response {status} without Content-Length")
        if b"\r\ntransfer-encoding:" in lower:
            raise ProtocolError("chunked response not expected")
        start = end + 4
        while len(buf) < start + length:
            data = await receive(65536)
            if not data:
                raise ProtocolError("connection closed mid-body")
            buf += data
        body = bytes(buf[start:start + length])
        del buf[:start + length]
        if b"\r\nconnection: close" in lower:
            raise ProtocolError("server closed the keep-alive connection")
        return status, head, body

    async def _read_h11(self, raw: bytes) -> tuple[int, bytes, bytes]:
        conn = self._h11
        if conn.our_state is h11.DONE:
            conn.start_next_cycle()
        # h11 must see our request to track the cycle; feed it the events equivalent to `raw`
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        method, target, _ = lines[0].split(b" ", 2)
        headers = [tuple(x.strip() for x in line.split(b":", 1)) for line in lines[1:]]
        conn.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            conn.send(h11.Data(data=body))
        conn.send(h11.EndOfMessage())
        status = None
        rhead = b""
        chunks = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                rhead = b"\r\n".join(k + b": " + v for k, v in event.headers)
            elif isinstance(event, h11.Data):
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ProtocolError("connection closed")
        if conn.their_state is not h11.DONE or conn.our_state is not h11.DONE:
            raise ProtocolError("connection not reusable")
        return status, rhead, b"".join(chunks)
