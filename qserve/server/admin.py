"""qserve's own endpoints: `GET /api/queues` lists the queues, `POST /api/queues/{service}` creates one.

Strategy: `routing` has already turned the request into `events.ListQueues` or `events.CreateQueue`
(path, token and name checked there, in the order every request is checked); this module does the
work on the `backends.base.Backend` and renders the answer, and `app.App.handle` renders its errors
like any other. The listing's JSON shape is what `qserve stream ls` reads: one object per queue,
sorted by service, input before sink; an open queue has its figures, a fenced one (one that
cannot be opened: `backends.local.fence`) its reason instead:

    {"queues": [{"service": "demo", "queue": "input", "path": "/api/predict/demo", "status": "open",
                 "length": 3, "first_index": 1, "last_index": 3, "consumers": 1, "groups": 1},
                {"service": "demo", "queue": "sink", "path": "/api/predict/demo/sink",
                 "status": "fenced", "reason": "queue demo/sink is fenced: ..."}]}

Its size is bounded by the queues the server holds (`--max-queues` open, plus the fenced ones on disk).
"""

from __future__ import annotations

import json
import urllib.parse

from qserve.backends.base import Backend
from qserve.core import events as ev
from qserve.config import Config
from qserve.core.events import QueueRef
from qserve.server.http import Response
from qserve.core.routing import token_opens
from qserve.wire.names import MOUNT

__all__ = ["handle", "queue_listing", "queue_path"]


def queue_path(ref: QueueRef) -> str:
    """The API path of a queue: `/api/predict/{service, percent-encoded}[/sink|/dlq]`."""
    return MOUNT + urllib.parse.quote(ref.service, safe="") + ("" if ref.kind == "input" else "/" + ref.kind)


async def queue_listing(queues: Backend, config: Config, token: str) -> dict:
    """The open and fenced queues whose service `token` opens, as the `GET /api/queues` document."""
    listed = []
    for status in await queues.listing():
        ref = status.ref
        if not token_opens(config, token, ref.service):
            continue
        doc: dict = {"service": ref.service, "queue": ref.kind, "path": queue_path(ref)}
        if status.fenced is not None:
            doc.update(status="fenced", reason=status.fenced)
        else:
            doc.update(status="open", length=status.length, first_index=status.first_index,
                       last_index=status.last_index, consumers=status.consumers, groups=status.groups)
        listed.append(doc)
    return {"queues": listed}


async def handle(queues: Backend, config: Config, op: ev.ListQueues | ev.CreateQueue) -> Response:
    """Answer one admin request (errors are raised, for `App.handle` to render)."""
    if isinstance(op, ev.ListQueues):
        body = json.dumps(await queue_listing(queues, config, op.token)).encode()
        return Response(200, body, [("Content-Type", "application/json")])
    await queues.create(op.service)   # idempotent: existing queues are just opened
    return Response(200, b"OK", [("Content-Type", "text/plain; charset=utf-8")])
