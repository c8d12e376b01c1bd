"""How `qserve serve` logs: today's text lines or one JSON object a line, and the access log.

Strategy: the server's modules log through the standard `logging` module as before; this module
only decides how the records are written (`configure_logging`, called once by the CLI) and owns
the one access-log call. A log call that knows the queue, the consumer, a status or a duration
passes them as ``extra``; the JSON format writes them as fields of their own (`FIELDS`), so a log
pipeline can filter on them without parsing the message. A traceback (`--log-level DEBUG`, or an
unexpected error) stays inside its one JSON line.

Access log (``--access-log``, off by default): one INFO line per request on the ``qserve.access``
logger: method, path (as sent, percent-encoded, without the query, whose tags may be private), status, duration and body
bytes (``-`` for a streamed body or a WebSocket); never a header, so never the token. It is
written by the application (`server.app`): a request the HTTP edge refuses before the application
sees it (malformed, a head or body over the limits, too slow to arrive) has no line; the edge
counts those (`HTTPServer.statistics`).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

import trio

from qserve.config import Config
from qserve.server.types import Request

__all__ = ["configure_logging", "JsonFormatter", "OneLine", "log_access", "ACCESS_LOGGER", "FIELDS", "TEXT_FORMAT"]

ACCESS_LOGGER = "qserve.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: ``extra`` fields a JSON line carries when the log call gives them
FIELDS = ("queue", "consumer", "status", "duration", "method", "path", "bytes")

_access = logging.getLogger(ACCESS_LOGGER)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601, milliseconds), level, logger, event (the
    message), the `FIELDS` the call gave as ``extra``, and ``error`` (the traceback) if any."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class OneLine(logging.Filter):
    """For a library's logger (the Redis client's): a record about a cancellation (the server is
    stopping and cut a connection short) is dropped; any other record carrying an exception keeps
    one line, the exception's type and message appended, without the traceback. The server logs
    what matters of an outage itself; a traceback is for ``--log-level DEBUG``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[1] is None:
            return True
        exc = record.exc_info[1]
        if _only_cancellation(exc):
            return False
        record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
        record.args = None
        record.exc_info = record.exc_text = None
        return True


def _only_cancellation(exc: BaseException, depth: int = 0) -> bool:
    """Whether ``exc`` is a cancellation: trio's, a group of them, or an error raised because of one."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancellation(e, depth + 1) for e in exc.exceptions)
    cause = exc.__cause__ or exc.__context__
    return cause is not None and depth < 16 and _only_cancellation(cause, depth + 1)


def configure_logging(config: Config) -> None:
    """Send the server's log to stderr in ``config.log_format`` at ``config.log_level``; with
    ``config.access_log`` the access lines are written whatever the level."""
    level = getattr(logging, config.log_level.upper(), logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if config.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    if config.access_log:
        _access.setLevel(logging.INFO)


def log_access(request: Request, status: int, duration: float, size: int | None) -> None:
    """The access line of one answered request (``size``: body bytes, None when streamed)."""
    path = request.target.partition("?")[0]   # as sent: percent-encoded, so no control character
    _access.info("%s %s %d %.6fs %s", request.method, path, status, duration, "-" if size is None else f"{size}B",
                 extra={"method": request.method, "path": path, "status": status,
                        "duration": round(duration, 6), "bytes": size})
