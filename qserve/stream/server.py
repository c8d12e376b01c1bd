"""Server-wide commands of `qserve stream`: ``ls`` (every queue) and ``create NAME``.

Strategy: these talk to the server, not to one queue, so they use the origin of the configured URL
(``http://host:port/api/predict/demo`` -> ``http://host:port``) and qserve's own endpoints
``GET /api/queues`` and ``POST /api/queues/NAME``, with the configured token. One request each,
over the client's HTTP pool in a short ``trio.run`` (no background loop thread is needed for a
single call). Servers without these endpoints (EAS, an older qserve) answer 404 or 405: the error
line says so instead of leaving the user with a bare status.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse

from qserve.stream.out import CLIError, Out
from qserve.stream.settings import settings

__all__ = ["cmd_ls", "cmd_create", "queue_table"]

_COLUMNS = ("SERVICE", "QUEUE", "LENGTH", "CONSUMERS", "STATUS")
_MAX_ANSWER = 16 * 1024 * 1024   # a listing bigger than this is not a queue listing


def _call(args: argparse.Namespace, method: str, path: str) -> bytes:
    """One request to the server's origin; the body of a 200.

    Raises: QueueError (non-200, with a hint for 404/405), ConnectError, CLIError.
    """
    import trio

    from qserve.client.http import ConnectionPool, QueueError, QueueURL, reason_from
    s = settings(args)
    url = QueueURL.parse(s["url"])
    headers = [("Host", url.host_header), ("User-Agent", "qserve-cli"), ("Accept", "application/json")]
    if s.get("token") is not None:
        headers.append(("Authorization", s["token"]))
    if method == "POST":
        headers.append(("Content-Length", "0"))

    async def run():
        pool = ConnectionPool(url, 1)
        try:
            return await pool.request(method, path, headers, timeout=args.request_timeout)
        finally:
            await pool.aclose()

    response = trio.run(run)
    if response.status != 200:
        reason = reason_from(response.status, response.phrase, response.body)
        if response.status == 405 or (response.status == 404 and method == "GET"):  # a 404 of create has reasons
            reason += f" (does {url.origin} serve /api/queues? EAS and older qserve servers do not)"
        raise QueueError(response.status, reason)
    if len(response.body) > _MAX_ANSWER:
        raise CLIError(f"answer of {method} {path} is over {_MAX_ANSWER} bytes")
    return response.body


def queue_table(queues: list[dict]) -> list[str]:
    """The ``ls`` table: a header and one aligned row per queue, sorted by service then queue."""
    rows = [_COLUMNS]
    for q in sorted(queues, key=lambda q: (str(q.get("service", "")), str(q.get("queue", "")))):
        status = str(q.get("status", "?"))
        if status != "open" and q.get("reason"):
            status += f": {q['reason']}"
        figures = [str(q[key]) if key in q else "-" for key in ("length", "consumers")]
        rows.append((str(q.get("service", "?")), str(q.get("queue", "?")), *figures, status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]) for row in rows]


def cmd_ls(args: argparse.Namespace, out: Out) -> int:
    """Every queue of the server with its length and consumers."""
    body = _call(args, "GET", "/api/queues")
    try:
        queues = json.loads(body)["queues"]
        if not isinstance(queues, list) or not all(isinstance(q, dict) for q in queues):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise CLIError("malformed answer of GET /api/queues: expected {\"queues\": [...]}") from None
    if not queues:
        out.line("[INFO] no queues")
    elif not out.json:
        for line in queue_table(queues):
            out.line(line)
    for q in queues:
        out.obj(**q)
    return 0


def cmd_create(args: argparse.Namespace, out: Out) -> int:
    """Create service NAME's input and sink queues (idempotent)."""
    if not args.name or "/" in args.name:         # not a path segment: the URL could not carry it
        raise CLIError(f"service name {args.name!r}: must not be empty nor contain '/'")
    _call(args, "POST", "/api/queues/" + urllib.parse.quote(args.name, safe=""))
    out.line(f"[OK] created {args.name}")
    out.obj(created=args.name)
    return 0
