"""How the Redis backend classifies what its client raises (`backends.redis.link.redis_error`): each
failure of Redis becomes the client's status and a one-line reason; anything else is a bug (None),
which a request answers with 500 and a background round logs."""

from __future__ import annotations

import anyio
import coredis.exceptions as rx
import pytest

from qserve.backends.redis.link import redis_error
from qserve.core.errors import InsufficientStorage, Unavailable

WHERE = "127.0.0.1:6379/0"


@pytest.mark.parametrize(("exc", "kind", "says"), [
    (rx.ResponseError("OOM command not allowed when used memory > 'maxmemory'."), InsufficientStorage,
     "out of memory"),
    (rx.BusyLoadingError("Redis is loading the dataset in memory"), Unavailable, "loading its data"),
    (rx.NoScriptError("No matching script. Please use EVAL."), Unavailable, "lost its scripts"),
    (rx.ReadOnlyError("You can't write against a read only replica."), Unavailable, "read-only replica"),
    (rx.ResponseError("MASTERDOWN Link with MASTER is down"), Unavailable, "MASTERDOWN"),
    (rx.ConnectionError("Connection lost"), Unavailable, "unreachable"),
    (ConnectionRefusedError(111, "Connection refused"), Unavailable, "unreachable"),
    (TimeoutError(), Unavailable, "unreachable"),
    (anyio.BrokenResourceError(), Unavailable, "unreachable"),
])
def test_a_failure_of_redis_is_a_status_and_one_line(exc, kind, says):
    err = redis_error(exc, WHERE)
    assert isinstance(err, kind) and says in err.reason and WHERE in err.reason
    assert "\n" not in err.reason


@pytest.mark.parametrize("exc", [rx.WrongTypeError("Operation against a key holding the wrong kind of value"),
                                 rx.ResponseError("ERR Error running script"), ValueError("bad reply")])
def test_anything_else_is_not_a_failure_of_redis(exc):
    assert redis_error(exc, WHERE) is None
