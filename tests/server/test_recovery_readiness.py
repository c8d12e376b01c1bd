"""The server listens once the queues it must serve are open; the other queues in the data directory
are recovered after that, and until they all are `/readyz` answers 503 saying so, a listing of the
queues waits, and a request to a queue not recovered yet opens that queue at once."""

from __future__ import annotations

import threading

import trio

from qserve.backends.local.queues import queue_dir
from qserve.core.events import QueueRef
from qserve.storage.fileio import FileIO

from ..helpers.inproc import TOKEN, running_server
from ..helpers.queue_files import ENTRIES, build_queue

LIMIT = 30


class HeldOpen(FileIO):
    """Listing the directory of the queue ``held`` (the first thing its recovery does, in a worker
    thread) blocks until released."""

    def __init__(self, held: str) -> None:
        self.held = held
        self.released = threading.Event()

    def listdir(self, path: str) -> list[str]:
        if path.startswith(self.held):
            self.released.wait(LIMIT)
        return super().listdir(path)


async def test_readyz_is_503_until_the_queues_on_disk_are_recovered(tmp_path):
    data = tmp_path / "data"
    build_queue(queue_dir(data, QueueRef("slow")), ENTRIES)
    build_queue(queue_dir(data, QueueRef("quick")), ENTRIES)
    fileio = HeldOpen(str(queue_dir(data, QueueRef("slow"))))
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fileio=fileio) as srv:
            c = await srv.client("quick")
            head, body = await c.request("GET", "/readyz")
            assert head.status_code == 503 and body.startswith(b"not ready: starting: recovering the queues on disk (")
            assert body.count(b"\n") == 1
            assert (await c.call("GET", "_attrs_=true"))[0] == 200       # a queue not held opens on its request
            listing = {}

            async def list_queues():
                listing["answer"] = await (await srv.client("quick")).request("GET", "/api/queues", b"",
                                                                             [("Authorization", TOKEN)])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(list_queues)
                await trio.testing.wait_all_tasks_blocked()
                assert "answer" not in listing                            # it waits for the recovery
                fileio.released.set()
                await srv.server.recovered.wait()
            head, body = listing["answer"]
            assert head.status_code == 200 and b'"slow"' in body and b'"quick"' in body
            head, body = await c.request("GET", "/readyz")
            assert (head.status_code, body) == (200, b"ready\n")
