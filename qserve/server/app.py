"""The queue API: executes one `events` operation against the open queues and renders the answer.

Strategy: the edge (`http.HTTPServer`) hands every request to `App.handle`; `routing.route` turns
it into an operation; one method per operation type asks the queue's backend (`backends.base`:
only that interface, whatever stores the queue) and returns a `Response`. What the server adds
itself lives here: a put's requestId and timestamp tags, the long-poll loop of a get and its
deadline, rendering. A replay of dead letters spans two queues, so it is the backend's
(`Backend.replay`), stamped here as a put is. The backend's calls are atomic and durable when they return (an auto-deleting
get reads and deletes in one call, so two concurrent ones never return the same entry). Every error
is raised and rendered by `errors.error_response` in `handle` (the one place).

Observability: `handle` counts every answer by operation and status and, with ``--access-log``,
logs one line per request (`server.logs`); the operations count what they did in `server.meters`
(one increment each) and a put and a get their latency. The server's own endpoints are answered
here too: `/healthz`, `/readyz` (`server.health`), `/metrics` (`server.metrics`) and the dashboard
(`server.dashboard`).
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
from qserve.core.routing import PutRoutes
from qserve.server import health
from qserve.server.logs import log_access
from qserve.server.dashboard import Dashboard
from qserve.server.meters import Meters
from qserve.server.metrics import Metrics
from qserve.server.watch import WatchService
from qserve.server.websocket import WebSocketUpgrade

__all__ = ["App"]

log = logging.getLogger("qserve")

TEXT = [("Content-Type", "text/plain; charset=utf-8")]
JSON = [("Content-Type", "application/json")]
PROTO = [("Content-Type", names.PROTOBUF)]
OK = Response(200, b"OK", list(TEXT))
DUPLICATE = ("X-Qserve-Duplicate", "1")   # a put answered with the index of the entry its requestId stored

#: the ``operation`` label of `Meters.request` (a request that routing refused: "none")
OPERATIONS = {ev.Put: "put", ev.Get: "get", ev.Delete: "delete", ev.Truncate: "truncate", ev.Commit: "commit",
              ev.Negative: "negative", ev.End: "end", ev.Attributes: "attributes", ev.Search: "search",
              ev.Count: "count", ev.Replay: "replay", ev.Watch: "watch", ev.Health: "health", ev.Ready: "ready",
              ev.Metrics: "metrics", ev.ListQueues: "list", ev.CreateQueue: "create",
              ev.DashboardFile: "dashboard", ev.DashboardData: "dashboard"}


class RequestIds:
    """The requestIds the server gives puts that bring none, in UUID4 form (docs/protocol.md 5.1)
    at a fraction of `uuid.uuid4`'s cost (16 bytes from the OS and a `UUID` object per put, ~2% of
    a put's CPU): the first 74 random bits are drawn from a `uuid4` per instance (each process and
    each start draws its own) and the last group, 48 bits, counts up from a random start; once it
    runs out, a fresh draw. So the ids of one instance never repeat and two instances' ids do not
    meet. Not task-safe across threads (a trio run is one thread)."""

    __slots__ = ("_prefix", "_next")

    _LIMIT = 1 << 48   # the last group's 12 hex digits

    def __init__(self) -> None:
        self._draw()

    def _draw(self) -> None:
        fresh = str(uuid.uuid4())
        self._prefix = fresh[:24]          # "xxxxxxxx-xxxx-4xxx-yxxx-": version and variant kept
        self._next = int(fresh[24:], 16)

    def __call__(self) -> str:
        n = self._next
        if n >= self._LIMIT:
            self._draw()
            n = self._next
        self._next = n + 1
        return f"{self._prefix}{n:012x}"


def long_poll_deadline(timeout: float) -> float:
    """Answer a little before the client's own timeout (the Python SDK's `_timeout_` equals its
    HTTP timeout: an answer at the deadline could arrive after the client gave up)."""
    return max(0.0, timeout - min(0.5, timeout * 0.1))


class App:
    """The request handler. Task-safe within one trio run.

    ``wall_clock`` (unix seconds, default `time.time`) stamps a put's ``ts@source`` / ``ts@sink``
    tag in milliseconds; injected so that a test can fix it. ``meters`` is where the requests are
    counted (the watch service counts its deliveries there too); ``edge_statistics`` is the HTTP
    edge's `statistics()`, for `/metrics`; ``recovered`` is set once the start-up has opened every
    queue in the store (until then `/readyz` is 503 and a listing of the queues waits for it).
    """

    def __init__(self, config: Config, queues: Backend, watch: WatchService, meters: Meters, *,
                 edge_statistics: Callable[[], dict] = dict,
                 recovered: trio.Event | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._recovered = recovered     # set once the start-up has opened every queue in the store
        self._wall_clock = wall_clock
        self.queues = queues
        self.watch = watch
        self.meters = meters
        self.metrics = Metrics(meters, queues, edge=edge_statistics, watch=watch.statistics,
                               readiness=self.not_ready)
        self.dashboard = Dashboard(self.metrics, config, wall_clock=wall_clock)
        self._anon = itertools.count(1)
        self._boot = uuid.uuid4().hex[:8]
        self._request_id = RequestIds()
        self._routes = PutRoutes(config)   # `routing.route`, puts' routes memoized
        self.stopping = False  # set by shutdown(): long-polling gets answer at once

    def shutdown(self) -> None:
        """The server is draining: every long-polling get answers now (204 when nothing came, as on
        its timeout), and a get that arrives from now on does not wait."""
        self.stopping = True
        self.queues.wake_long_polls()

    async def not_ready(self) -> str | None:
        """Why this server should get no traffic now (one line), or None (`server.health`)."""
        return await health.not_ready(self.config, self.queues, stopping=self.stopping,
                                      recovering=self._recovered is not None and not self._recovered.is_set())

    def anonymous_user(self) -> str:
        """A fresh user id for a request that names none: a watch is one request on its own
        connection, so two anonymous watchers never share a consumer id."""
        return f"anon-{self._boot}-{next(self._anon)}"

    def operation_for(self, request: Request) -> ev.Operation | ev.Health | ev.Ready | ev.Metrics:
        return self._routes.route(request.method, request.target, request.path, request.query,
                                  request.headers, request.body, anonymous_user=self.anonymous_user,
                                  upgrade=request.is_websocket_upgrade)

    async def websocket(self, request: Request, upgrade: WebSocketUpgrade) -> None:
        """The edge's WebSocket handler: a watch; errors before `accept()` refuse the handshake.
        Counted (and access-logged) when it ends: 101 if it was accepted, else the refusal's status."""
        start = trio.current_time()
        failure: BaseException | None = None
        try:
            op = self.operation_for(request)
            if not isinstance(op, ev.Watch):
                raise BadRequest("a WebSocket upgrade must be a watch (_watch_=true)")
            await self.watch.websocket(await self.queues.get(op.queue), op, upgrade)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            if upgrade.state == "accepted":
                status = 101
            else:   # the edge refuses the handshake with this status (503: cut by the shutdown)
                status = translate(failure).http_status if isinstance(failure, Exception) else 503
            self.meters.request("watch", status)
            if self.config.access_log:
                log_access(request, status, trio.current_time() - start, None)

    async def handle(self, request: Request) -> Response:
        """Answer one request (counted by operation and status; logged with ``--access-log``)."""
        logged = self.config.access_log
        start = trio.current_time() if logged else 0.0
        op = None
        try:
            op = self.operation_for(request)
            response = await self._dispatch(op)
        except Exception as exc:  # noqa: BLE001 - rendered in the one place below
            err = translate(exc)
            if err.http_status >= 500 and not err.logged:
                log.error("%s %s failed: %s", request.method, request.path, err.reason,
                          exc_info=isinstance(err, InternalError) and not isinstance(exc, QServeError),
                          extra={"status": err.http_status, "queue": _queue_name(op)})
            status, headers, body = error_response(err)
            response = Response(status, body, headers)
        self.meters.request(OPERATIONS.get(type(op), "none"), response.status)
        if logged:
            log_access(request, response.status, trio.current_time() - start,
                       None if response.stream is not None else len(response.body))
        return response

    async def _dispatch(self, op) -> Response:
        handler = self._HANDLERS.get(type(op))
        if handler is not None:   # an operation on a queue: most requests, so looked up first
            try:
                queue = await self.queues.get(op.queue)
            except QueueFenced as fenced:   # its attributes say so; everything else is a 503
                if not isinstance(op, ev.Attributes):
                    raise
                return _render_attributes(fenced.attributes, op)
            return await handler(self, queue, op)
        match op:
            case ev.Health():
                return Response(200, b"OK", list(TEXT))
            case ev.Ready():
                problem = await self.not_ready()
                if problem is None:
                    return Response(200, b"ready\n", list(TEXT))
                return Response(503, f"not ready: {problem}\n".encode(), list(TEXT))
            case ev.Metrics(json=True):
                return Response(200, json.dumps(await self.metrics.snapshot()).encode(), list(JSON))
            case ev.Metrics():
                body, content_type = await self.metrics.exposition(op.accept)
                return Response(200, body, [("Content-Type", content_type)])
            case ev.DashboardFile():
                return self.dashboard.file(op.name)
            case ev.DashboardData():
                document = await self.dashboard.document(op.token)
                return Response(200, json.dumps(document).encode(), [*JSON, ("Cache-Control", "no-cache")])
            case ev.Watch():
                queue = await self.queues.get(op.queue)   # errors here are still a status line
                return await self.watch.http_stream(queue, op)
            case ev.ListQueues() | ev.CreateQueue():
                if isinstance(op, ev.ListQueues) and self._recovered is not None:
                    await self._recovered.wait()   # a listing names every queue in the store
                return await admin.handle(self.queues, self.config, op)
        raise TypeError(f"no handler for {op!r}")

    # -- operations ---------------------------------------------------------------------------
    async def put(self, queue: QueueBackend, op: ev.Put) -> Response:
        start = trio.current_time()
        tags = dict(op.tags)
        chosen = tags.get("requestId")   # the client's: with a dedup window, a retry stores nothing
        request_id = tags["requestId"] = chosen or self._request_id()
        tags["ts@sink" if queue.ref.sink else "ts@source"] = str(int(self._wall_clock() * 1000))
        if chosen:
            index, duplicate = await queue.put_unique(op.data, tags, op.priority)
        else:
            index, duplicate = await queue.put(op.data, tags, op.priority), False
        self.meters.put_seconds.observe(trio.current_time() - start)
        headers = [*TEXT, (names.REQUEST_ID_HEADER, request_id)]
        if duplicate:
            self.meters.of(queue.ref).deduplicated += 1
            headers.append(DUPLICATE)
        else:
            self.meters.of(queue.ref).puts += 1
        return Response(200, str(index).encode(), headers)

    async def get(self, queue: QueueBackend, op: ev.Get) -> Response:
        began = trio.current_time()
        start = await queue.next_index() if op.start == -1 else op.start
        deadline = began + long_poll_deadline(op.timeout)
        tags = dict(op.tags)
        limit = 1 if op.raw else op.length
        while True:
            # the waiter is in place before the read: a put that lands while the read is on its
            # way (a Redis round trip) wakes it, instead of falling between the read and the wait
            with queue.put_waiter(start, tags) as put_came:
                entries = await queue.read(start, tags, limit, delete=op.auto_delete)
                if entries or trio.current_time() >= deadline or self.stopping:
                    break
                with trio.move_on_at(deadline):
                    await put_came.wait()
        self.meters.get_seconds.observe(trio.current_time() - began)
        if not entries:
            return Response(204)
        counted = self.meters.of(queue.ref)
        counted.gets += len(entries)
        if op.auto_delete:
            counted.settled(entry.index for entry in entries)
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
        counted = self.meters.of(queue.ref)
        match op:
            case ev.Delete():
                await queue.delete(op.indexes)
                counted.deletes += len(op.indexes)
                counted.settled(op.indexes)
            case ev.Commit():
                identity = op.identity
                await queue.commit(op.indexes, None if identity.anonymous else (identity.group, identity.consumer_id))
                counted.commits += len(op.indexes)
                counted.settled(op.indexes)
            case ev.Negative():
                identity = op.identity   # only the refusing consumer's group gives them back
                await queue.negative(op.indexes, op.code, op.reason, op.delay,
                                     None if identity.anonymous else identity.group)
                counted.negatives += len(op.indexes)
            case ev.Truncate():
                await queue.truncate(op.below)
                counted.truncates += 1
                counted.truncated(op.below)
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

    async def replay(self, queue: QueueBackend, op: ev.Replay) -> Response:
        """qserve's own: dead letters back into their queues (`Backend.replay`), listed in JSON."""
        done = await self.queues.replay(queue, op.indexes, int(self._wall_clock() * 1000))
        counted = self.meters.of(queue.ref)
        counted.replayed += len(done)
        counted.settled(r.dlq_index for r in done)
        doc = {"replayed": [{"index": r.dlq_index, "queue": r.queue.name, "replayed_index": r.index,
                             "request_id": r.request_id, "priority": r.priority} for r in done]}
        return Response(200, json.dumps(doc).encode(), list(JSON))

    _HANDLERS = {
        ev.Put: put, ev.Get: get, ev.Delete: acknowledge, ev.Commit: acknowledge, ev.Negative: acknowledge,
        ev.Truncate: acknowledge, ev.End: acknowledge, ev.Attributes: attributes, ev.Search: search,
        ev.Count: count, ev.Replay: replay,
    }


def _queue_name(op) -> str | None:
    """The name of the queue ``op`` concerns (None: it concerns none, or routing refused it)."""
    return op.queue.name if isinstance(op, ev.Operation) else None


def _render_attributes(attrs: dict[str, str], op: ev.Attributes) -> Response:
    if op.protobuf:
        return Response(200, protobuf.encode_attributes(attrs), list(PROTO))
    return Response(200, json.dumps(attrs, sort_keys=True).encode(), list(JSON))

