"""The wall clock is injected: a put's ``ts@source`` / ``ts@sink`` tag and the stored entry's
timestamp come from the server's ``wall_clock``, so a test can fix them."""

import json

import trio

from qserve.core.events import QueueRef

from ..helpers.inproc import running_server

FIXED = 1_700_000_000.25   # unix seconds


async def test_put_timestamps_come_from_the_injected_wall_clock(tmp_path):
    with trio.fail_after(30):
        async with running_server(tmp_path, wall_clock=lambda: FIXED) as srv:
            c = await srv.client("clock")
            assert (await c.call("POST", "", b"in"))[0] == 200
            assert (await c.call("POST", "", b"out", sink=True))[0] == 200
            queue = await srv.server.queues.get(QueueRef("clock"))
            assert queue.log.read(1).timestamp_ms == 1_700_000_000_250
            status, body = await c.call("GET", "_raw_=false")
            assert status == 200
            assert json.loads(body)[0]["tags"]["ts@source"] == "1700000000250"
            status, body = await c.call("GET", "_raw_=false", sink=True)
            assert status == 200
            assert json.loads(body)[0]["tags"]["ts@sink"] == "1700000000250"
