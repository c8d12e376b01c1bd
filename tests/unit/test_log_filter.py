"""`server.logs.OneLine`, the filter on the Redis client's logger: a record about a cancellation
(the server stopping cuts a connection short) is dropped, any other exception stays one line."""

from __future__ import annotations

import io
import logging

import pytest
import trio

from qserve.server.logs import TEXT_FORMAT, OneLine


@pytest.fixture
def logger():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    log = logging.getLogger("test.oneline")
    log.propagate = False
    log.addHandler(handler)
    log.addFilter(OneLine())
    yield log, out
    log.removeHandler(handler)
    log.filters.clear()


async def cancelled_group() -> BaseException:
    """A real trio.Cancelled inside an exception group, as a library's task group raises it."""
    caught: list[BaseException] = []

    async def waits():
        await trio.sleep_forever()

    with trio.CancelScope() as scope:
        try:
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                nursery.start_soon(waits)
                nursery.start_soon(waits)
                await trio.lowlevel.checkpoint()
                scope.cancel()
                await trio.sleep_forever()
        except BaseException as exc:   # noqa: BLE001 (the group itself is the subject)
            caught.append(exc)
            raise
    return caught[0]


async def test_a_cancellation_is_dropped_and_other_errors_stay_one_line(logger):
    log, out = logger
    with trio.fail_after(5):
        group = await cancelled_group()
    assert isinstance(group, BaseExceptionGroup)
    try:
        raise group
    except BaseException:   # noqa: BLE001
        log.error("Connection attempt failed unexpectedly!", exc_info=True)
    try:
        try:
            raise group
        except BaseException as exc:   # noqa: BLE001
            raise RuntimeError("closing") from exc   # a cancellation as the cause of another error
    except RuntimeError:
        log.error("while closing", exc_info=True)
    assert out.getvalue() == ""
    try:
        raise ConnectionResetError("peer went away")
    except ConnectionResetError:
        log.error("Connection attempt %s failed", "7", exc_info=True)
    log.warning("plain %d", 3)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "Traceback" not in out.getvalue()
    assert lines[0].endswith("ERROR test.oneline: Connection attempt 7 failed: ConnectionResetError: peer went away")
    assert lines[1].endswith("WARNING test.oneline: plain 3")
