"""The error hierarchy of the server and the one place that maps it to the wire.

Strategy: every failure that reaches a client is a `QServeError`. Its branch says whose fault it
was (`ClientError`: the request; `ServerError`: this server or its disk), and its class carries the
hint for each transport (`http_status`, `ws_close_code`). Handlers raise; only `error_response()`
and `ws_close_for()` turn an exception into bytes on the wire. Storage errors never mention HTTP:
the backends raise these types (the local one maps its storage errors itself:
`qserve.backends.local.errors`), and `translate()` makes anything else a generic 500.

A reason is always one line of plain text written for the client; internal exception text is never
sent (an unexpected exception becomes a generic 500 and is logged).
"""

from __future__ import annotations

__all__ = [
    "QServeError", "ClientError", "ServerError",
    "BadRequest", "Unauthorized", "NotFound", "MethodNotAllowed", "RequestTimeout", "Conflict",
    "PayloadTooLarge", "QueueFull", "HeadersTooLarge", "Unavailable", "QueueFenced", "InsufficientStorage", "Unsupported",
    "InternalError", "translate", "error_response", "ws_close_for",
]


class QServeError(Exception):
    """Base of every error the server reports to a client.

    A subclass states its transport hints in its header (``class NotFound(ClientError,
    status=404)``): ``status`` is the HTTP status, ``close`` the WebSocket close code; what it
    does not state it inherits.

    Args:
        reason: one line of plain text for the client.
        headers: extra response headers (for example ``Retry-After``).
    """

    http_status = 500
    ws_close_code = 1011
    logged = False   # True: the server logged this failure where it arose; do not log it per request

    def __init_subclass__(cls, *, status: int | None = None, close: int | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.http_status = status
        if close is not None:
            cls.ws_close_code = close

    def __init__(self, reason: str = "", *, headers: list[tuple[str, str]] | None = None):
        reason = " ".join((reason or self.default_reason()).split())  # one line, always
        super().__init__(reason)
        self.reason = reason
        self.headers = list(headers or [])

    @classmethod
    def default_reason(cls) -> str:
        return cls.__name__


class ClientError(QServeError, status=400, close=1008):
    """The request was at fault; retrying it unchanged will fail again."""


class ServerError(QServeError, status=500, close=1011):
    """This server (or its disk) failed; the request may succeed later."""


# the request's fault (WebSocket close 1008 unless stated)
class BadRequest(ClientError, status=400): pass
class Unauthorized(ClientError, status=401): pass
class NotFound(ClientError, status=404): pass
class MethodNotAllowed(ClientError, status=405): pass
class RequestTimeout(ClientError, status=408): pass
class Conflict(ClientError, status=409): pass
class PayloadTooLarge(ClientError, status=413, close=1009): pass
class QueueFull(ClientError, status=429, close=1013): pass
class HeadersTooLarge(ClientError, status=431): pass


# the server's or its disk's fault (WebSocket close 1011 unless stated)
class InternalError(ServerError, status=500): pass
class Unavailable(ServerError, status=503, close=1013): pass
class InsufficientStorage(ServerError, status=507): pass
class Unsupported(ServerError, status=501): pass   # a feature this backend does not have


class QueueFenced(Unavailable):
    """The queue is on disk but could not be opened (damage, another process holds it, an I/O
    error); the server and its other queues go on. The reason says what to do about it, and the
    failure was logged once when the fence went up, so requests that meet it are not logged again.

    Args:
        attributes: what the queue's attributes call answers instead of a 503.
    """

    logged = True

    def __init__(self, reason: str, *, attributes: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.attributes = dict(attributes or {})


def translate(exc: BaseException) -> QServeError:
    """The `QServeError` to report for any exception: itself, or a 500 for anything unexpected."""
    return exc if isinstance(exc, QServeError) else InternalError("internal server error")


def error_response(exc: BaseException) -> tuple[int, list[tuple[str, str]], bytes]:
    """Turn an exception into ``(status, headers, body)``: a one-line plain-text reason."""
    err = translate(exc)
    body = (err.reason + "\n").encode("utf-8", "replace")
    headers = [("Content-Type", "text/plain; charset=utf-8"), *err.headers]
    return err.http_status, headers, body


def ws_close_for(exc: BaseException) -> tuple[int, str]:
    """The WebSocket close code and reason for an exception."""
    err = translate(exc)
    return err.ws_close_code, err.reason[:120]
