"""qserve's own endpoints: `GET /api/queues` lists the queues, `POST /api/queues/{service}` creates one.

Strategy: `routing` has already turned the request into `events.ListQueues` or `events.CreateQueue`
(path, token and name checked there, in the order every request is checked); this module does the
work on the `queues.QueueManager` and renders the answer, and `app.App.handle` renders its errors
like any other. The listing's JSON shape is what `qserve stream ls` reads: one object per queue,
sorted by service, input before sink; an open queue has its figures, a fenced one
(`backends.local.fence`) its reason instead:

    {"queues": [{"service": "demo", "queue": "input", "path": "/api/predict/demo", "status": "open",
                 "length": 3, "first_index": 1, "last_index": 3, "consumers": 1, "groups": 1},
                {"service": "demo", "queue": "sink", "path": "/api/predict/demo/sink",
                 "status": "fenced", "reason": "queue demo/sink is fenced: ..."}]}

Its size is bounded by the queues the server holds (`--max-queues` open, plus the fenced ones on disk).
"""

from __future__ import annotations

import json
import urllib.parse

from qserve.core import events as ev
from qserve.backends.local.fence import Fence
from qserve.config import Config
from qserve.core.events import QueueRef
from qserve.server.http import Response
from qserve.backends.local.queues import QueueManager
from qserve.core.routing import token_opens
from qserve.wire.names import MOUNT

__all__ = ["handle", "queue_listing", "queue_path"]


def queue_path(ref: QueueRef) -> str:
    """The API path of a queue: `/api/predict/{service, percent-encoded}[/sink]`."""
    return MOUNT + urllib.parse.quote(ref.service, safe="") + ("/sink" if ref.sink else "")


def queue_listing(queues: QueueManager, config: Config, token: str) -> dict:
    """The open and fenced queues whose service `token` opens, as the `GET /api/queues` document."""
    listed = []
    for ref, held in queues.listing():
        if not token_opens(config, token, ref.service):
            continue
        doc: dict = {"service": ref.service, "queue": "sink" if ref.sink else "input", "path": queue_path(ref)}
        if isinstance(held, Fence):
            doc.update(status="fenced", reason=held.reason)
        else:
            qlog, groups = held.log, held.dispatcher.statistics()
            doc.update(status="open", length=qlog.length, first_index=qlog.first_index,
                       last_index=qlog.last_index, consumers=groups["consumers"], groups=groups["groups"])
        listed.append(doc)
    return {"queues": listed}


async def handle(queues: QueueManager, config: Config, op: ev.ListQueues | ev.CreateQueue) -> Response:
    """Answer one admin request (errors are raised, for `App.handle` to render)."""
    if isinstance(op, ev.ListQueues):
        body = json.dumps(queue_listing(queues, config, op.token)).encode()
        return Response(200, body, [("Content-Type", "application/json")])
    await queues.create(op.service)   # idempotent: existing queues are just opened
    return Response(200, b"OK", [("Content-Type", "text/plain; charset=utf-8")])
