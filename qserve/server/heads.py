"""Response heads: built and checked by h11, kept as the bytes h11 writes for them.

Strategy: most answers are one of a few heads (every commit is ``200 OK`` with the same headers), and
a put's head differs from the last one only in its requestId. Sending a response through h11 builds
an event that validates every header, then runs h11's state machine and writers: ~16 us of a put's
~170 us of CPU. So the edge writes the common answer itself (`writing.Writing._respond`: keep-alive,
not HEAD, not streamed, a body that may have a length) as ``head + Content-Length + body``, with the
head from `HeadCache.wire`: on a miss, h11 builds the head and writes it through a scratch
connection, and the cache keeps those bytes. The bytes are h11's own, so the wire is the same as
when h11 sends the response; h11 keeps parsing every request (`connection._Connection._next_cycle`
gives the next request a fresh h11 connection, since this one did not see the answer).

A head that carries the requestId header is kept as the bytes before and after its value; per put,
only the value is checked: visible ASCII (a UUID, most client ids) goes in as it is, anything else
takes h11's full check. Heads with a header the edge owns (framing, ``Connection``) are not
written here (`wire` says None): h11 frames them.
"""

from __future__ import annotations

import re
from http import HTTPStatus

import h11

from qserve.wire.names import REQUEST_ID_HEADER

__all__ = ["HeadCache", "build_head", "NO_BODY"]

_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_UNIQUE = REQUEST_ID_HEADER   # differs on every put answer
#: a header value h11 accepts as it is (h11's rule is wider): joins already-validated bytes unchecked
_SAFE_VALUE = re.compile(rb"[\x21-\x7e]+").fullmatch
#: headers whose heads h11 frames: the body's framing and the connection's fate are the edge's
_EDGE_OWNED = frozenset({"content-length", "transfer-encoding", "connection"})
NO_BODY = frozenset({204, 304})   # statuses whose answer has no body (and no Content-Length)
_PLACEHOLDER = "qserve-placeholder-of-the-request-id"
_LENGTH_END = b"Content-Length: 0\r\n\r\n"
_MISSING = object()


def build_head(status: int, headers: list[tuple[str, str]]) -> h11.Response:
    """h11's event for a response head (raises `h11.LocalProtocolError` for an invalid header,
    `UnicodeEncodeError` for one that is not latin-1)."""
    return h11.Response(status_code=status, reason=_REASONS.get(status, b""),
                        headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers])


def _written(status: int, headers: list[tuple[str, str]]) -> bytes | None:
    """The bytes h11 writes for this head, up to (not including) the Content-Length line the edge
    adds; None when the edge does not write this head itself."""
    if status in NO_BODY or any(name.lower() in _EDGE_OWNED for name, _ in headers):
        return None
    event = build_head(status, [*headers, ("Content-Length", "0")])
    scratch = h11.Connection(h11.SERVER)
    scratch.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    scratch.next_event(), scratch.next_event()   # the request and its end: h11 may answer now
    data = scratch.send(event)
    if not data.endswith(_LENGTH_END):   # h11 added or moved a header: let h11 send this head
        return None
    return data[:-len(_LENGTH_END)]


class HeadCache:
    """The wire bytes of the last ``size`` distinct response heads (module docstring)."""

    __slots__ = ("_heads", "_size")

    def __init__(self, size: int = 64) -> None:
        # heads by (status, headers); put templates (before, after the requestId value) by
        # (status, position, the other headers); None: h11 sends heads like this one
        self._heads: dict[tuple, bytes | tuple[bytes, bytes] | None] = {}
        self._size = size

    def wire(self, status: int, headers: list[tuple[str, str]]) -> bytes | None:
        """The head's bytes as h11 writes them, without the final ``Content-Length`` line and blank
        line; None: h11 should send this answer. Raises what h11 raises for an invalid head."""
        key = (status, *headers)
        head = self._heads.get(key, _MISSING)
        if head is not _MISSING:
            return head
        for at, (name, value) in enumerate(headers):
            if name == _UNIQUE:
                return self._unique(status, headers, at, value.encode("latin-1"))
        head = _written(status, headers)
        self._keep(key, head)
        return head

    def _unique(self, status: int, headers: list[tuple[str, str]], at: int, value: bytes) -> bytes | None:
        if not _SAFE_VALUE(value):
            return _written(status, headers)   # h11 checks it (and raises if it is not a header value)
        key = (status, at, *headers[:at], *headers[at + 1:])
        template = self._heads.get(key, _MISSING)
        if template is _MISSING:
            written = _written(status, [*headers[:at], (_UNIQUE, _PLACEHOLDER), *headers[at + 1:]])
            template = None if written is None else written.partition(_PLACEHOLDER.encode("ascii"))[::2]
            self._keep(key, template)
        if template is None:
            return None
        before, after = template
        return b"%s%s%s" % (before, value, after)

    def _keep(self, key: tuple, value: bytes | tuple[bytes, bytes] | None) -> None:
        if len(self._heads) >= self._size:
            del self._heads[next(iter(self._heads))]   # the oldest
        self._heads[key] = value
