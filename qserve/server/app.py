"""The queue API: executes one `events` operation against the open queues and renders the answer.

Strategy: the edge (`http.HTTPServer`) hands every request to `App.handle`; `routing.route` turns
it into an operation; one method per operation type does the work on the storage log and the
group dispatcher, awaits durability where the answer promises it, and returns a `Response`. Reads
and the deletes that follow them happen with no `await` in between, so two concurrent
auto-deleting gets never return the same entry. Every error is raised and rendered by
`errors.error_response` in `handle` (the one place).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Iterator

import trio

from qserve import storage

from qserve.server import admin as _admin
from qserve.core import events as ev
from qserve.wire import names, protobuf
from qserve.core.tags import FilterIndex
from qserve.config import Config
from qserve.core.errors import BadRequest, Conflict, QServeError, QueueFenced, error_response, translate
from qserve.server.http import Request, Response
from qserve.backends.local.queues import Queue, QueueManager
from qserve.core.routing import MAX_PRIORITY, route
from qserve.server.watch import WatchService
from qserve.server.websocket import WebSocketUpgrade

__all__ = ["App", "attributes_of"]

log = logging.getLogger("qserve")

TEXT = [("Content-Type", "text/plain; charset=utf-8")]
JSON = [("Content-Type", "application/json")]
PROTO = [("Content-Type", names.PROTOBUF)]
OK = Response(200, b"OK", list(TEXT))


def _now_ms() -> int:
    return int(time.time() * 1000)


def long_poll_deadline(timeout: float) -> float:
    """Answer a little before the client's own timeout (the Python SDK's `_timeout_` equals its
    HTTP timeout: an answer at the deadline could arrive after the client gave up)."""
    return max(0.0, timeout - min(0.5, timeout * 0.1))


class App:
    """The request handler. Task-safe within one trio run."""

    def __init__(self, config: Config, queues: QueueManager, watch: WatchService) -> None:
        self.config = config
        self.queues = queues
        self.watch = watch
        self._anon = itertools.count(1)
        self._boot = uuid.uuid4().hex[:8]
        self.stopping = False  # set by shutdown(): long-polling gets answer at once

    def shutdown(self) -> None:
        """The server is draining: every long-polling get answers now (204 when nothing came, as on
        its timeout), and a get that arrives from now on does not wait."""
        self.stopping = True
        for queue in self.queues:
            queue.gets.wake_all()

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
                return await _admin.handle(self.queues, self.config, op)
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
                          exc_info=not isinstance(exc, (QServeError, storage.StorageError)))
            status, headers, body = error_response(err)
            return Response(status, body, headers)

    # -- operations ---------------------------------------------------------------------------
    async def put(self, queue: Queue, op: ev.Put) -> Response:
        if queue.ended:
            raise Conflict(f"queue {queue.ref.name} has ended; no more puts")
        tags = dict(op.tags)
        request_id = tags.get("requestId") or str(uuid.uuid4())
        tags["requestId"] = request_id
        tags["ts@sink" if queue.ref.sink else "ts@source"] = str(_now_ms())
        if self.config.trim_oldest and len(op.data) <= self.config.max_payload_bytes:
            self._trim_for_one_more(queue)
        entry = queue.log.append(op.data, tags, op.priority)
        mark = queue.write_mark()
        queue.notify(entry)
        await queue.wait_durable(mark)
        return Response(200, str(entry.index).encode(),
                        [*TEXT, (names.REQUEST_ID_HEADER, request_id)])

    def _trim_for_one_more(self, queue: Queue) -> None:
        """`--trim-oldest`: make room for one entry by truncating the oldest (durable with the put)."""
        qlog = queue.log
        while qlog.length >= self.config.max_length:
            below = qlog.first_index + 1
            qlog.truncate(below)
            _forget(queue, range(1, below))

    def _matching(self, queue: Queue, op: ev.Get, start: int) -> list[storage.Entry]:
        tags = dict(op.tags)
        request_id = tags.pop("requestId", None)
        if request_id is not None:
            entry = queue.log.find_request_id(request_id)
            if entry is None or entry.index < start or any(entry.tags.get(k) != v for k, v in tags.items()):
                return []
            return [entry]
        limit = 1 if op.raw else op.length
        if not tags:
            return list(queue.log.scan(start, None, limit))
        out: list[storage.Entry] = []
        with _filter(queue, tags) as fi:
            for index in fi.iter_index_order(start, queue.source):
                entry = queue.log.read(index)
                if entry is not None:
                    out.append(entry)
                    if len(out) >= limit:
                        break
        return out

    async def get(self, queue: Queue, op: ev.Get) -> Response:
        start = queue.log.next_index if op.start == -1 else op.start
        deadline = trio.current_time() + long_poll_deadline(op.timeout)
        while True:
            entries = self._matching(queue, op, start)
            if entries or trio.current_time() >= deadline or self.stopping:
                break
            with queue.gets.waiting(start, dict(op.tags)) as put_came, trio.move_on_at(deadline):
                await put_came.wait()
        if not entries:
            return Response(204)
        if op.auto_delete:
            _forget(queue, queue.log.delete([e.index for e in entries]))
            await queue.wait_durable()
        return self._render_entries(queue, op, entries)

    def _render_entries(self, queue: Queue, op: ev.Get, entries: list[storage.Entry]) -> Response:
        def tags_of(entry):
            notes = queue.dispatcher.annotations(entry.index)
            return {**entry.tags, **notes} if notes else entry.tags

        if op.raw:
            entry = entries[0]
            ctype = entry.tags.get("Header:Content-Type", "text/plain; charset=utf-8")
            return Response(200, entry.data, [("Content-Type", ctype)])
        if op.protobuf:
            body = protobuf.encode_frame_list(
                protobuf.encode_frame(e.index, tags_of(e), e.data) for e in entries)
            return Response(200, body, list(PROTO))
        doc = [{"index": e.index, "tags": tags_of(e), "data": base64.b64encode(e.data).decode()}
               for e in entries]
        return Response(200, json.dumps(doc).encode(), list(JSON))

    async def delete(self, queue: Queue, op: ev.Delete) -> Response:
        _forget(queue, queue.log.delete(op.indexes))
        await queue.wait_durable()
        return OK

    async def commit(self, queue: Queue, op: ev.Commit) -> Response:
        queue.log.delete(op.indexes)
        queue.dispatcher.commit(op.indexes)
        queue.notify()  # window slots freed
        await queue.wait_durable()
        return OK

    async def negative(self, queue: Queue, op: ev.Negative) -> Response:
        queue.dispatcher.negative(op.indexes, op.code, op.reason)
        queue.notify()
        return OK

    async def truncate(self, queue: Queue, op: ev.Truncate) -> Response:
        if queue.log.truncate(op.below):
            _forget(queue, range(1, op.below))   # cost bounded by the dispatcher's state, not the range
        await queue.wait_durable()
        return OK

    async def end(self, queue: Queue, op: ev.End) -> Response:
        queue.log.set_state(state="End")
        if op.force:
            pending = set()
            for cid in queue.dispatcher.consumers():
                pending |= queue.dispatcher.pending_of(cid)
            undelivered = [i for i, _ in queue.log.iter_dispatch(0) if i not in pending]
            _forget(queue, queue.log.delete(undelivered))
        queue.notify()
        await queue.wait_durable()
        return OK

    async def attributes(self, queue: Queue, op: ev.Attributes) -> Response:
        return _render_attributes(attributes_of(queue, self.config), op)

    async def search(self, queue: Queue, op: ev.Search) -> Response:
        found = queue.dispatcher.search(op.index) if op.index else None
        return Response(200, json.dumps(found or {}).encode(), list(JSON))

    async def count(self, queue: Queue, op: ev.Count) -> Response:
        if op.priority is None and not op.tags:
            n = queue.log.length
        elif not op.tags:
            n = queue.log.count(op.priority)
        else:
            with _filter(queue, dict(op.tags)) as fi:
                n = sum(1 for _ in fi.iter_index_order(0, queue.source, op.priority))
        return Response(200, str(n).encode(), list(TEXT))

    _HANDLERS = {
        ev.Put: put, ev.Get: get, ev.Delete: delete, ev.Commit: commit, ev.Negative: negative,
        ev.Truncate: truncate, ev.End: end, ev.Attributes: attributes, ev.Search: search,
        ev.Count: count,
    }


def _render_attributes(attrs: dict[str, str], op: ev.Attributes) -> Response:
    if op.protobuf:
        return Response(200, protobuf.encode_attributes(attrs), list(PROTO))
    return Response(200, json.dumps(attrs, sort_keys=True).encode(), list(JSON))


def _forget(queue: Queue, removed) -> None:
    """Entries left the queue: drop them from the groups and wake watchers whose slots freed."""
    if removed:
        queue.dispatcher.removed(removed)
        queue.notify()


@contextlib.contextmanager
def _filter(queue: Queue, tags: dict[str, str]) -> Iterator[FilterIndex]:
    """The queue's index of entries matching ``tags``, brought up to date, for one request."""
    fi = queue.filters.acquire(tuple(sorted(tags.items())))
    try:
        fi.refresh(queue.source)
        yield fi
    finally:
        queue.filters.release(fi)


def attributes_of(queue: Queue, config: Config) -> dict[str, str]:
    """Every attribute key of PROTOCOL.md section 7, values as strings."""
    qlog = queue.log
    attrs = {
        "queue.state": "open",   # "fenced" for a queue that failed to open (_fence.fenced_attributes)
        "meta.name": queue.ref.name,
        "meta.state": "End" if queue.ended else "Normal",
        "meta.backend": "qserve-segment-log",
        "meta.maxPayloadBytes": str(config.max_payload_bytes),
        "stream.maxPayloadBytes": str(config.max_payload_bytes),
        **names.HEADER_ATTRIBUTES,
        "meta.maxPriority": str(MAX_PRIORITY),
        "stream.length": str(qlog.length),
        "stream.approxMaxLength": str(config.max_length),
        "stream.firstEntry": str(qlog.first_index),
        "stream.lastEntry": str(qlog.last_index),
    }
    attrs.update(queue.dispatcher.attributes())
    return attrs
