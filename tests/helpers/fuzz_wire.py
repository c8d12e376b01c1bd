"""Raw HTTP for the fuzz tests: the servers' settings and limits, a fresh data directory per example,
one exchange of raw bytes on a new memory-stream connection, h11 parsing of what came back into
`Answer`s, what every answer must look like (no 5xx, a one-line reason), a health check, rendering a
request from its parts, a hand-built WebSocket client frame (so it can be wrong), and the hypothesis
settings the fuzz tests start from. Time is real: every exchange is bounded by `trio.fail_after`."""

from __future__ import annotations

import os
import struct
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import coredis
import h11
import trio
from hypothesis import HealthCheck, settings

from .inproc import TOKEN

LIMIT = 10.0            # seconds for one exchange; more means the server hangs
MAX_PAYLOAD = 2048      # the servers' max_payload_bytes (small, so 413s are cheap to provoke)
MAX_HEADER = 16 * 1024  # qserve's default max_header_bytes
WS_MAX = 64 * 1024      # the edge's ws_max_message_size
SETTINGS = dict(fsync="never", max_payload_bytes=MAX_PAYLOAD, request_timeout=5.0, keepalive_timeout=5.0)


async def fresh_backend(backend: dict) -> dict:
    """The `backend` fixture's settings for one example: a Redis database is emptied first (hypothesis
    runs every example with the same fixtures, as with `fresh_dir`)."""
    if backend.get("backend"):
        async with coredis.Redis.from_url(backend["backend"]) as client:
            await client.flushall()
    return backend


def fresh_dir(tmp_path) -> Path:
    """A new data directory under `tmp_path` (hypothesis runs every example with the same tmp_path)."""
    return Path(tempfile.mkdtemp(prefix="ex", dir=tmp_path))


async def exchange(listener, data: bytes) -> bytes:
    """Send ``data`` on a new connection, half-close, and read until the server closes."""
    stream = await listener.connect()
    out = bytearray()
    try:
        with trio.fail_after(LIMIT):
            try:
                await stream.send_all(data)
                await stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        await trio.aclose_forcefully(stream)
    return bytes(out)


@dataclass
class Answer:
    status: int
    headers: dict
    body: bytes
    complete: bool = True   # False: a streamed (chunked) body cut short by the close


def parse_answers(raw: bytes, methods: list[bytes]) -> list[Answer]:
    """Split the bytes the server sent into responses, one per request method (HEAD has no body).

    Raises AssertionError for anything that is not well-formed HTTP/1.1 from a server: a response
    cut short (except a streamed body), bytes after the last response, garbage."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(raw)
    conn.receive_data(b"")
    out: list[Answer] = []
    for method in methods:
        if not conn.trailing_data[0]:
            break   # the server sent nothing more: it closed
        conn.send(h11.Request(method=method if method in (b"HEAD", b"GET", b"POST", b"PUT", b"DELETE")
                              else b"GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        try:
            event = conn.next_event()
            while isinstance(event, h11.InformationalResponse):
                event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise AssertionError(f"malformed response: {exc!r} in {raw[:300]!r}") from None
        if isinstance(event, h11.ConnectionClosed) or (event is h11.NEED_DATA and not conn.trailing_data[0]):
            break
        assert isinstance(event, h11.Response), (event, raw[:300])
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
        body = bytearray()
        complete = True
        while True:
            try:
                e = conn.next_event()
            except h11.RemoteProtocolError:
                complete = False    # EOF inside a chunked body
                break
            if isinstance(e, h11.Data):
                body += e.data
            elif isinstance(e, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"response cut short ({e!r}): {raw[:300]!r}")
        if not complete:
            assert headers.get("transfer-encoding") == "chunked", raw[:300]
        out.append(Answer(event.status_code, headers, bytes(body), complete))
        if not complete or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            break
        conn.start_next_cycle()
    rest = conn.trailing_data[0]
    assert not rest, f"bytes after the last response: {rest[:200]!r}"
    return out


def check_answer(a: Answer, method: bytes = b"GET") -> None:
    """What every answer must look like: no 5xx; an error carries a one-line plain-text reason."""
    assert a.status < 500, (a.status, a.body)
    assert a.status not in (101,)
    if a.status >= 400 and a.complete and method != b"HEAD":
        text = a.body.decode("utf-8")
        assert text.endswith("\n") and text.count("\n") == 1 and text.strip(), a.body
        assert a.headers.get("content-type", "").startswith("text/plain"), a.headers
    if a.status == 405:
        assert "allow" in a.headers
    if a.status not in (204, 304) and a.complete:
        assert "content-length" in a.headers or a.headers.get("transfer-encoding") == "chunked"


async def healthy(listener) -> None:
    raw = await exchange(listener, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    [a] = parse_answers(raw, [b"GET"])
    assert (a.status, a.body) == (200, b"OK")


def render(method: bytes, path: str, params, headers, body: bytes, auth: str = "ok",
           raw_target: str | None = None) -> bytes:
    target = raw_target if raw_target is not None else path + (
        "?" + urllib.parse.urlencode(params) if params else "")
    lines = [method + b" " + target.encode("latin-1", "replace") + b" HTTP/1.1", b"Host: fuzz"]
    if auth == "ok":
        lines.append(b"Authorization: " + TOKEN.encode())
    elif auth == "bearer":
        lines.append(b"Authorization: Bearer " + TOKEN.encode())
    elif auth == "wrong":
        lines.append(b"Authorization: nope")
    lines += [k + b": " + v for k, v in headers]
    if body or method in (b"POST", b"PUT"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True,
             length: int | None = None) -> bytes:
    """One client frame, built by hand so it can be wrong."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])
