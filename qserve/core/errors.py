"""The error hierarchy of the server and the one place that maps it to the wire.

Strategy: every failure that reaches a client is a `QServeError`. Its branch says whose fault it
was (`ClientError`: the request; `ServerError`: this server or its disk), and its class carries the
hint for each transport (`http_status`, `ws_close_code`). Handlers raise; only `error_response()`
and `ws_close_for()` turn an exception into bytes on the wire. Storage errors never mention HTTP:
`translate()` maps them here, at the layer boundary.

A reason is always one line of plain text written for the client; internal exception text is never
sent (an unexpected exception becomes a generic 500 and is logged).
"""

from __future__ import annotations

from qserve import storage

__all__ = [
    "QServeError", "ClientError", "ServerError",
    "BadRequest", "Unauthorized", "NotFound", "MethodNotAllowed", "RequestTimeout", "Conflict",
    "PayloadTooLarge", "QueueFull", "HeadersTooLarge", "Unavailable", "QueueFenced", "InsufficientStorage",
    "InternalError", "translate", "error_response", "ws_close_for",
]


class QServeError(Exception):
    """Base of every error the server reports to a client.

    Args:
        reason: one line of plain text for the client.
        headers: extra response headers (for example ``Retry-After``).
    """

    http_status = 500
    ws_close_code = 1011
    logged = False   # True: the server logged this failure where it arose; do not log it per request

    def __init__(self, reason: str = "", *, headers: list[tuple[str, str]] | None = None):
        reason = " ".join((reason or self.default_reason()).split())  # one line, always
        super().__init__(reason)
        self.reason = reason
        self.headers = list(headers or [])

    @classmethod
    def default_reason(cls) -> str:
        return cls.__name__


class ClientError(QServeError):
    """The request was at fault; retrying it unchanged will fail again."""

    http_status = 400
    ws_close_code = 1008


class ServerError(QServeError):
    """This server (or its disk) failed; the request may succeed later."""

    http_status = 500
    ws_close_code = 1011


class BadRequest(ClientError):
    http_status = 400
    ws_close_code = 1008


class Unauthorized(ClientError):
    http_status = 401
    ws_close_code = 1008


class NotFound(ClientError):
    http_status = 404


class MethodNotAllowed(ClientError):
    http_status = 405


class RequestTimeout(ClientError):
    http_status = 408


class Conflict(ClientError):
    http_status = 409


class PayloadTooLarge(ClientError):
    http_status = 413
    ws_close_code = 1009


class QueueFull(ClientError):
    http_status = 429
    ws_close_code = 1013


class HeadersTooLarge(ClientError):
    http_status = 431


class InternalError(ServerError):
    http_status = 500


class Unavailable(ServerError):
    http_status = 503
    ws_close_code = 1013


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


class InsufficientStorage(ServerError):
    http_status = 507


def translate(exc: BaseException) -> QServeError:
    """Map any exception to a `QServeError` (storage errors by type, anything unknown to a 500)."""
    if isinstance(exc, QServeError):
        return exc
    if isinstance(exc, storage.PayloadTooLarge):
        return PayloadTooLarge(str(exc) or "payload too large")
    if isinstance(exc, storage.QueueFull):
        return QueueFull(str(exc) or "queue is full", headers=[("Retry-After", "1")])
    if isinstance(exc, storage.DiskFull):
        return InsufficientStorage("no space left on the server's disk")
    if isinstance(exc, storage.StorageError):  # I/O errors, closed or corrupt logs
        return Unavailable("storage unavailable, try again later")
    return InternalError("internal server error")


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
