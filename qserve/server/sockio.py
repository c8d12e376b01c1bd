"""A connection's socket calls without trio's wrappers; a lone client's response takes no scheduler pass.

Why: `trio.SocketStream.send_all` wraps each write in a conflict detector, a memoryview, an error
translator and trio's ``_try_sync`` (an async context manager), and ends a write that did not have
to wait with a scheduler pass (`trio.lowlevel.cancel_shielded_checkpoint`: a task that never waits
must still let others run). `send_all` here makes the same syscall and the same checkpoints without
the wrappers (under wrk -c16 a put's CPU went from ~137 to ~127 us, alternating runs). A send and a
receive of 200 bytes through trio's socket calls took 14.6 us in a loop on the 2-vCPU VM, against
2.4 us for the bare syscalls.

The pass itself: a connection's task already yields at least once per request (reading the next
request's bytes yields or waits, see below, and a durable put waits for its fsync round), so when
the connection is the server's only one the pass after the response is pure cost, one of the four a
put took. With more connections the pass is worth its cost: while the others run, this client's
next request arrives, and the read that follows finds it instead of waiting for it (a wait re-arms
the socket in epoll, one more syscall; under wrk -c16 that cost more than the pass saved). Hence
the rule: ``then_pass=False`` is for the last write of a response on the server's only connection,
which reads from the socket next (nothing of the next request is buffered yet); every other write
(with other connections open, a streamed body's chunks, a 100 Continue) takes the pass.

What stays the same: a cancelled task raises before writing (trio's `checkpoint_if_cancelled`); a
write the socket cannot take whole has its rest written by trio's own `send_all`, which waits for
the socket (cancellable, so the connection's write deadline bounds it); errors are trio's stream
errors (`trio.BrokenResourceError` for a peer gone, `trio.ClosedResourceError` for a closed socket).
`receive_some` is trio's receive without its wrappers (the same checkpoints: a cancelled task
raises first; bytes that were there at once are followed by a scheduler pass, which keeps a client
that pipelines requests from holding the event loop; bytes waited for are not, the wait was one).

Only for a `trio.SocketStream`; any other stream (memory streams in tests, TLS) goes through its own
`send_all` and `receive_some`.
"""

from __future__ import annotations

import errno
import os

import trio

__all__ = ["send_all", "receive_some"]

_CLOSED = frozenset({errno.EBADF, errno.ENOTSOCK})   # as trio: the socket was closed under us


async def send_all(stream: trio.abc.SendStream, data: bytes, *, then_pass: bool = True) -> None:
    """Write all of ``data`` to ``stream``; ``then_pass=False`` only for a write whose next use of
    the stream is a read and no other connection is open (module docstring)."""
    if type(stream) is not trio.SocketStream:
        await stream.send_all(data)
        return
    sock = stream.socket
    fd = sock.fileno()
    if fd < 0 or sock.did_shutdown_SHUT_WR:
        raise trio.ClosedResourceError("the socket was already closed")
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise _stream_error(exc) from exc
    if sent < len(data):
        await stream.send_all(memoryview(data)[sent:])   # waits for the socket: a pass of its own
    elif then_pass:
        await trio.lowlevel.cancel_shielded_checkpoint()   # as trio's send_all: let the others run


async def receive_some(stream: trio.abc.ReceiveStream, max_bytes: int) -> bytes:
    """At most ``max_bytes`` from ``stream`` (b"": end of stream), waiting for the first of them."""
    if type(stream) is not trio.SocketStream:
        return await stream.receive_some(max_bytes)
    fd = stream.socket.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the socket was already closed")
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        data = os.read(fd, max_bytes)
    except BlockingIOError:
        pass
    except OSError as exc:
        raise _stream_error(exc) from exc
    else:
        await trio.lowlevel.cancel_shielded_checkpoint()   # there at once: let the others run first
        return data
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise _stream_error(exc) from exc


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """trio's stream error for a socket call's ``exc``."""
    if exc.errno in _CLOSED:
        return trio.ClosedResourceError("the socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")
