"""Whether the worker can subscribe yet, and what a failure means: the start-up probe of the
engine (a TCP connect, then the queue's attributes) and the rules for a transient failure.

A worker started before its server, or on a queue the server has fenced, waits (the engine retries
with backoff, one WARNING line per attempt); a refusal waiting does not cure (401, 404) ends it.
"""

from __future__ import annotations

import os
import socket

import trio

from qserve.client import ConnectError, QueueClient, QueueError

__all__ = ["obstacle", "unreachable", "connect_failure", "is_transient", "leaves"]


async def obstacle(client: QueueClient) -> str | None:
    """What keeps the worker from subscribing right now (one line), or None: try the watch.

    Raises:
        QueueError: a refusal that waiting does not cure (401 bad token, 404 unknown queue).
    """
    url = client.url
    reason = await unreachable(client)
    if reason is not None:
        return f"cannot reach {url.origin}: {reason}"
    try:
        attributes = await client.attributes()
    except QueueError as exc:
        if not is_transient(exc):
            raise
        return str(exc) if isinstance(exc, ConnectError) else f"cannot subscribe to {url}: {exc}"
    if attributes.get("queue.state") == "fenced":
        return f"cannot subscribe to {url}: {attributes.get('queue.fenced') or 'the queue is fenced'}"
    return None

async def unreachable(client: QueueClient) -> str | None:
    """Why a TCP connection to the server cannot be opened right now; None when it can."""
    url = client.url
    try:
        with trio.fail_after(client.timeout):
            stream = await trio.open_tcp_stream(url.host, url.port)
    except trio.TooSlowError:
        return f"no answer within {client.timeout:g}s"
    except OSError as exc:
        return connect_failure(exc)
    await stream.aclose()
    return None


def connect_failure(exc: OSError) -> str:
    """Why a TCP connect failed, in a few lower-case words (``connection refused``).

    trio's `open_tcp_stream` raises an OSError whose cause groups the error of each address it
    tried; the first of those names the reason."""
    found: list[BaseException] = [exc]
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        found = [e for e in leaves(cause) if isinstance(e, OSError)] or found
    elif isinstance(cause, OSError):
        found = [cause]
    first = found[0]
    if isinstance(first, socket.gaierror):
        text = f"cannot resolve the host name ({first.strerror})"
    elif isinstance(first, OSError) and first.errno:
        text = os.strerror(first.errno)
    else:
        text = str(first) or type(first).__name__
    return text[:1].lower() + text[1:]


def leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions of a group and of its nested groups, flattened."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def is_transient(exc: QueueError) -> bool:
    """Worth another try: no answer (status 0), 408, 429, or a server-side 5xx other than 501."""
    return exc.status in (0, 408, 429) or (exc.status >= 500 and exc.status != 501)
