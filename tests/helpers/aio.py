"""Kernel AIO for the tests of `qserve.server.aio`: a context, or a visible skip where there is none."""

from __future__ import annotations

import pytest

from qserve.server.aio import AioSync


def open_or_skip(depth: int = 64) -> AioSync:
    aio = AioSync.open(depth)
    if aio is None:
        pytest.skip("kernel AIO is not available here (the thread pool is used instead)")
    return aio
