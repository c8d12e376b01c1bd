"""The queue API: executes one `events` operation against the open queues and renders the answer.

Strategy: the edge (`http.HTTPServer`) hands every request to `App.handle`; `routing.route` turns
it into an operation; one method per operation type asks the queue's backend (`backends.base`:
only that interface, whatever stores the queue) and returns a `Response`. What the server adds
itself lives here: a put's requestId and timestamp tags, the long-poll loop of a get and its
deadline, rendering. The backend's calls are atomic and durable when they return (an auto-deleting
get reads and deletes in one call, so two concurrent ones never return the same entry). Every error
is raised and rendered by `errors.error_response` in `handle` (the one place).
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable

import trio

from qserve.backends.base import Backend, QueueBackend, StoredEntry
from qserve.server import admin
from qserve.core import events as ev
from qserve.wire import names, protobuf
from qserve.config import Config
from qserve.core.errors import BadRequest, InternalError, QServeError, QueueFenced, error_response, translate
from qserve.server.http import Request, Response
from qserve.core.routing import route
from qserve.server.watch import WatchService
from qserve.server.websocket import WebSocketUpgrade

__all__ = ["App"]

log = logging.getLogger("qserve")

TEXT = [("Content-Type", "text/plain; charset=utf-8")]
JSON = [("Content-Type", "application/json")]
PROTO = [("Content-Type", names.PROTOBUF)]
OK = Response(200, b"OK", list(TEXT))


def long_poll_deadline(timeout: float) -> float:
    """Answer a little before the client's own timeout (the Python SDK's `_timeout_` equals its
    HTTP timeout: an answer at the deadline could arrive after the client gave up)."""
    return max(0.0, timeout - min(0.5, timeout * 0.1))


class App:
    """The request handler. Task-safe within one trio run.

    ``wall_clock`` (unix seconds, default `time.time`) stamps a put's ``ts@source`` / ``ts@sink``
    tag in milliseconds; injected so that a test can fix it.
    """

    def __init__(self, config: Config, queues: Backend, watch: WatchService, *,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._wall_clock = wall_clock
        self.queues = queues
        self.watch = watch
        self._anon = itertools.count(1)
        self._boot = uuid.uuid4().hex[:8]
        self.stopping = False  # set by shutdown(): long-polling gets answer at once

    def shutdown(self) -> None:
        """The server is draining: every long-polling get answers now (204 when nothing came, as on
        its timeout), and a get that arrives from now on does not wait."""
        self.stopping = True
        self.queues.wake_long_polls()

    def anonymous_user(self) -> str:
        """A fresh user id for a request that names none: a watch is one request on its own
        connection, so two anonymous watchers never share a consumer id."""
        return f"anon-{self._boot}-{next(self._anon)}"

    def operation_for(self, request: Request) -> ev.Operation | ev.Health:
        headers = {}
        for name, value in request.headers:
            headers.setdefault(name, value)
        return route(request.method, request.path, request.query, headers, request.body, self.config,
                     anonymous_user=self.anonymous_user(),
                     upgrade=request.is_websocket_upgrade)

    async def websocket(self, request: Request, upgrade: WebSocketUpgrade) -> None:
        """The edge's WebSocket handler: a watch; errors before `accept()` refuse the handshake."""
        op = self.operation_for(request)
        if not isinstance(op, ev.Watch):
            raise BadRequest("a WebSocket upgrade must be a watch (_watch_=true)")
        await self.watch.websocket(await self.queues.get(op.queue), op, upgrade)

    async def handle(self, request: Request) -> Response:
        try:
            op = self.operation_for(request)
            if isinstance(op, ev.Health):
                return Response(200, b"OK", list(TEXT))
            if isinstance(op, ev.Watch):
                queue = await self.queues.get(op.queue)   # errors here are still a status line
                return await self.watch.http_stream(queue, op)
            if isinstance(op, (ev.ListQueues, ev.CreateQueue)):
                return await admin.handle(self.queues, self.config, op)
            try:
                queue = await self.queues.get(op.queue)
            except QueueFenced as fenced:   # its attributes say so; everything else is a 503
                if not isinstance(op, ev.Attributes):
                    raise
                return _render_attributes(fenced.attributes, op)
            return await self._HANDLERS[type(op)](self, queue, op)
        except Exception as exc:  # noqa: BLE001 - rendered in the one place below
            err = translate(exc)
            if err.http_status >= 500 and not err.logged:
                log.error("%s %s failed: %s", request.method, request.path, err.reason,
                          exc_info=isinstance(err, InternalError) and not isinstance(exc, QServeError))
            status, headers, body = error_response(err)
            return Response(status, body, headers)

    # -- operations ---------------------------------------------------------------------------
    async def put(self, queue: QueueBackend, op: ev.Put) -> Response:
        tags = dict(op.tags)
        request_id = tags.get("requestId") or str(uuid.uuid4())
        tags["requestId"] = request_id
        tags["ts@sink" if queue.ref.sink else "ts@source"] = str(int(self._wall_clock() * 1000))
        index = await queue.put(op.data, tags, op.priority)
        return Response(200, str(index).encode(), [*TEXT, (names.REQUEST_ID_HEADER, request_id)])

    async def get(self, queue: QueueBackend, op: ev.Get) -> Response:
        start = await queue.next_index() if op.start == -1 else op.start
        deadline = trio.current_time() + long_poll_deadline(op.timeout)
        tags = dict(op.tags)
        limit = 1 if op.raw else op.length
        while True:
            entries = await queue.read(start, tags, limit, delete=op.auto_delete)
            if entries or trio.current_time() >= deadline or self.stopping:
                break
            with queue.put_waiter(start, tags) as put_came, trio.move_on_at(deadline):
                await put_came.wait()
        if not entries:
            return Response(204)
        return self._render_entries(queue, op, entries)

    def _render_entries(self, queue: QueueBackend, op: ev.Get, entries: list[StoredEntry]) -> Response:
        if op.raw:
            entry = entries[0]
            ctype = entry.tags.get("Header:Content-Type", "text/plain; charset=utf-8")
            return Response(200, entry.data, [("Content-Type", ctype)])
        tags_of = queue.tags_of
        if op.protobuf:
            body = protobuf.encode_frame_list(
                protobuf.encode_frame(e.index, tags_of(e), e.data) for e in entries)
            return Response(200, body, list(PROTO))
        doc = [{"index": e.index, "tags": tags_of(e), "data": base64.b64encode(e.data).decode()}
               for e in entries]
        return Response(200, json.dumps(doc).encode(), list(JSON))

    async def acknowledge(self, queue: QueueBackend,
                          op: ev.Delete | ev.Commit | ev.Negative | ev.Truncate | ev.End) -> Response:
        """The operations whose answer is a plain ``OK`` once the backend has done them."""
        match op:
            case ev.Delete(): await queue.delete(op.indexes)
            case ev.Commit(): await queue.commit(op.indexes)
            case ev.Negative(): await queue.negative(op.indexes, op.code, op.reason)
            case ev.Truncate(): await queue.truncate(op.below)
            case ev.End(): await queue.end(op.force)
        return OK

    async def attributes(self, queue: QueueBackend, op: ev.Attributes) -> Response:
        return _render_attributes(await queue.attributes(), op)

    async def search(self, queue: QueueBackend, op: ev.Search) -> Response:
        found = await queue.search(op.index) if op.index else None
        return Response(200, json.dumps(found or {}).encode(), list(JSON))

    async def count(self, queue: QueueBackend, op: ev.Count) -> Response:
        n = await queue.count(op.priority, dict(op.tags))
        return Response(200, str(n).encode(), list(TEXT))

    _HANDLERS = {
        ev.Put: put, ev.Get: get, ev.Delete: acknowledge, ev.Commit: acknowledge, ev.Negative: acknowledge,
        ev.Truncate: acknowledge, ev.End: acknowledge, ev.Attributes: attributes, ev.Search: search,
        ev.Count: count,
    }


def _render_attributes(attrs: dict[str, str], op: ev.Attributes) -> Response:
    if op.protobuf:
        return Response(200, protobuf.encode_attributes(attrs), list(PROTO))
    return Response(200, json.dumps(attrs, sort_keys=True).encode(), list(JSON))

