"""A negative commit concerns the refusing consumer's group only (PROTOCOL.md 5.7: "no longer pending
for this consumer"): another group holding the same entry keeps it, and a delay hides it from the
refusing group only. A caller without an identity (no ``X-EAS-QueueService-Gid``) gives it back in
every group, as before. Both backends, in process on trio's clock."""

from __future__ import annotations

import trio

from ..helpers.inproc import next_frame, no_frame, running_server

LIMIT = 60


def identity(group: str, user: str = "u") -> list[tuple[str, str]]:
    return [("X-EAS-QueueService-Gid", group), ("X-EAS-QueueService-Uid", user)]


def pending_of(attrs: dict[str, str], consumer: str) -> str:
    """The ``Pending: N`` of one consumer in the attributes' consumers list."""
    [row] = [v for k, v in attrs.items() if k.startswith("consumers.list.") and f"Id: {consumer}," in v]
    return row.split("Pending: ", 1)[1].split(",", 1)[0].strip()


async def test_a_negative_commit_leaves_the_other_groups_alone(tmp_path, backend, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("ng")
            index = int((await c.call("POST", "", b"job"))[1])
            x = await srv.watch(nursery, "ng", "_window_=1", user="u", group="gx")
            y = await srv.watch(nursery, "ng", "_window_=1", user="u", group="gy")
            assert (await next_frame(x)).index == index and (await next_frame(y)).index == index
            status, _ = await c.call("PUT", f"_indexes_={index}&_negative_=true&_delay_=4s", b"_code_=503",
                                     headers=identity("gx"))
            assert status == 200
            attrs = await c.attrs()
            assert pending_of(attrs, "gx.u") == "0" and pending_of(attrs, "gy.u") == "1"
            back = await next_frame(x, 10)             # gx gets it back after its delay
            assert back.index == index and back.tags["lastCode"] == "503"
            assert await no_frame(y, 1)                # gy still holds it: nothing came again
            assert pending_of(await c.attrs(), "gy.u") == "1"
            nursery.cancel_scope.cancel()


async def test_an_anonymous_negative_commit_gives_it_back_in_every_group(tmp_path, backend, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("ng")
            index = int((await c.call("POST", "", b"job"))[1])
            x = await srv.watch(nursery, "ng", "_window_=1", user="u", group="gx")
            y = await srv.watch(nursery, "ng", "_window_=1", user="u", group="gy")
            assert (await next_frame(x)).index == index and (await next_frame(y)).index == index
            assert (await c.call("PUT", f"_indexes_={index}&_negative_=true", b"_code_=500"))[0] == 200
            assert (await next_frame(x)).index == index and (await next_frame(y)).index == index
            nursery.cancel_scope.cancel()
