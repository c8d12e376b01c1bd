"""What the disk-fault server tests share: the time bound, a one-line-reason check, `qserve log
verify` over the data directory, a health probe, and put / non-deleting get through a `Client`."""

from __future__ import annotations

import json

from qserve.tools.logtool.scan import find_queues, verify_queue

from .peers import Client

LIMIT = 20  # seconds (real time) for any test


def one_line(body: bytes) -> str:
    text = body.decode()
    assert text.endswith("\n") and text.count("\n") == 1 and text.strip(), body
    return text.strip()


def assert_clean(tmp_path) -> None:
    """`qserve log verify` finds nothing wrong anywhere in the data directory."""
    for q in find_queues(str(tmp_path / "data")):
        res = verify_queue(q)
        assert not res.problems, [(p.path, p.offset, p.reason) for p in res.problems]


async def healthy(srv) -> bool:
    head, body = await Client(await srv.listener.connect()).request("GET", "/healthz")
    return (head.status_code, body) == (200, b"OK")


async def put(c, data: bytes, query: str = "") -> tuple[int, bytes]:
    return await c.call("POST", query, data)


async def get_index(c, index: int):
    """Non-deleting JSON get of exactly `index` (None if absent)."""
    status, body = await c.call("GET", f"_index_={index}&_raw_=false&_auto_delete_=false")
    if status == 204:
        return None
    assert status == 200, (status, body)
    doc = json.loads(body)
    return doc[0] if doc and doc[0]["index"] == index else None
