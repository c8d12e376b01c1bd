"""A delivery counts once its frame is written (issue #17): the watch edge hands an entry out, its
socket dies before the frame leaves, and the entry comes back to its group with no delivery
counted, so ``max_deliveries`` does not dead-letter an entry no consumer ever saw. On both backends
(the `backend` fixture): the count is taken at hand-out and given back at release (locally
`core.groups.Dispatcher.detach`, on Redis the RELEASE script).

The failing transport is the only part that is not real: the watch session of the server's own
`WatchService` writes through a ``send`` that raises, as a reset socket's write does."""

from __future__ import annotations

import json

import trio

from qserve.core import events as ev

from ..helpers.inproc import next_frame, running_server

LIMIT = 60


async def broken_send(frames) -> None:
    raise trio.BrokenResourceError("connection reset by peer")


async def watch_that_dies_before_its_frames_leave(srv, service: str, user: str) -> None:
    """A streamed watch of ``service`` whose first write fails (the server's watch edge, real backend)."""
    app = srv.server.app
    ref = ev.QueueRef(service)
    op = ev.Watch(queue=ref, identity=ev.Identity(group="g", user=user), window=2, websocket=False)
    response = await app.watch.http_stream(await app.queues.get(ref), op)
    try:
        await response.stream(broken_send)
    except trio.BrokenResourceError:
        return
    raise AssertionError("the broken write did not end the watch")


async def test_a_frame_that_never_left_counts_no_delivery(tmp_path, backend, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, max_deliveries=1, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("unsent")
            index = int((await c.call("POST", "", b"job"))[1])
            for user in ("a", "b"):   # twice handed out, never written: max_deliveries=1 is not reached
                await watch_that_dies_before_its_frames_leave(srv, "unsent", user)
            assert (await c.attrs())["stream.length"] == "1"
            assert (await c.attrs(dlq=True)).get("stream.length", "0") == "0"
            # a consumer that does get the frame: that delivery counts, and its loss dead-letters
            ws = await srv.watch(nursery, "unsent", "_window_=1", user="w", group="g")
            assert (await next_frame(ws)).index == index
            await ws.aclose()
            with trio.fail_after(10):
                while (await c.attrs(dlq=True)).get("stream.length") != "1":
                    await trio.sleep(0.1)
            body = json.loads((await c.call("GET", "_index_=1&_raw_=false&_auto_delete_=false", dlq=True))[1])
            assert body[0]["tags"]["dlq.deliveries"] == "1"
            assert body[0]["tags"]["lastCode"] == "detached"
            nursery.cancel_scope.cancel()


async def test_frames_written_before_the_socket_died_still_count(tmp_path, backend, autojump_clock):
    """Only the frames that never left are given back: an entry whose frame went out in an earlier
    batch of the same session counts, even when a later write of that session fails."""
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, max_deliveries=1, **backend) as srv:
            c = await srv.client("partly")
            first = int((await c.call("POST", "", b"one"))[1])
            app = srv.server.app
            ref = ev.QueueRef("partly")
            op = ev.Watch(queue=ref, identity=ev.Identity(group="g", user="p"), window=2, websocket=False)
            response = await app.watch.http_stream(await app.queues.get(ref), op)
            writes = 0

            async def second_write_fails(frames) -> None:
                nonlocal writes
                writes += 1
                if writes == 1:   # the first entry's frame leaves; then a second entry arrives
                    await c.call("POST", "", b"two")
                    return
                raise trio.BrokenResourceError("connection reset by peer")

            try:
                await response.stream(second_write_fails)
            except trio.BrokenResourceError:
                pass
            assert writes == 2
            # the first delivery counted (dead-lettered at max_deliveries=1), the second did not
            with trio.fail_after(10):
                while (await c.attrs(dlq=True)).get("stream.length") != "1":
                    await trio.sleep(0.1)
            assert (await c.attrs())["stream.length"] == "1"
            body = json.loads((await c.call("GET", "_index_=1&_raw_=false&_auto_delete_=false", dlq=True))[1])
            assert body[0]["tags"]["dlq.index"] == str(first)
