"""The phases of one HTTP connection (`connection._Connection`) and the transitions between them.

A connection runs inside ONE cancel scope for its life and moves that scope's deadline as it goes;
its phase says what a fired deadline (or `HTTPServer.shutdown`) means:

    phase       deadline of ``_scope``                         if it fires (or shutdown() cancels)
    IDLE        now + keepalive_timeout                        close quietly; shutdown() cancels it too
    ARRIVING    (unchanged: nothing is awaited)                -
    READING     first byte + request_timeout, set only when    408, then close
                the request needs another receive
    HANDLING    none                                           - (the handler bounds its own waits)
    WRITING     now + request_timeout while a write runs       close (the framing is broken)
    STREAMING   none between chunks, a write's while writing   close; shutdown() ends the stream cleanly
    UPGRADED    none                                           -; shutdown() closes the WebSocket (1001)
    DRAINING    (own scope, after ``_scope``)                   close; shutdown() cuts it short

Rule 1: a connection starts IDLE and moves only along `NEXT` (checked in `advance`, the one place a
phase changes). Rule 2: UPGRADED and DRAINING are final: after them the connection closes.
"""

from __future__ import annotations

import enum
from typing import Protocol

import trio

__all__ = ["Phase", "NEXT", "advance", "PhaseScope"]


class Phase(enum.Enum):
    IDLE = "idle"               # waiting for the first byte of a request
    ARRIVING = "arriving"       # a request's bytes are being parsed, nothing awaited yet
    READING = "reading"         # the request needs more bytes from the network
    HANDLING = "handling"       # the application handles it
    WRITING = "writing"         # the response goes out
    STREAMING = "streaming"     # a streamed response body, between and during its chunks
    UPGRADED = "upgraded"       # a WebSocket owns the connection
    DRAINING = "draining"       # after an error response: read and discard, then close

    # A member is its own only instance: hashed by identity, in C (Enum's own hash runs Python code,
    # twice per `advance`, four times a request).
    __hash__ = object.__hash__


_ = Phase
NEXT: dict[Phase, frozenset[Phase]] = {
    # a renewed scope goes on waiting; a refused connection reads its head; an error found in
    # buffered bytes is answered
    _.IDLE: frozenset({_.IDLE, _.ARRIVING, _.READING, _.DRAINING}),
    _.ARRIVING: frozenset({_.READING, _.HANDLING, _.UPGRADED, _.DRAINING}),
    _.READING: frozenset({_.HANDLING, _.UPGRADED, _.DRAINING}),
    _.HANDLING: frozenset({_.WRITING}),
    # the next request: wait for it, or it is already buffered (pipelined); or its bytes are bad
    _.WRITING: frozenset({_.IDLE, _.ARRIVING, _.STREAMING, _.DRAINING}),
    _.STREAMING: frozenset({_.WRITING}),
    _.UPGRADED: frozenset(),
    _.DRAINING: frozenset(),
}
del _


def advance(current: Phase, new: Phase) -> Phase:
    """``new`` when `NEXT` allows it from ``current``.

    Raises:
        RuntimeError: a transition the table does not allow (a bug in the connection loop).
    """
    if new not in NEXT[current]:
        raise RuntimeError(f"connection phase {current.name} -> {new.name} is not allowed")
    return new


class _Owner(Protocol):
    def enter_phase_scope(self, phase: Phase | None, scope: trio.CancelScope | None) -> None: ...


class PhaseScope:
    """Enter ``scope`` as the connection's phase scope for ``phase``: cancelled at once when the
    server is already shutting down, and by the connection's ``shutdown`` until it exits."""

    __slots__ = ("_owner", "_phase", "_scope")

    def __init__(self, owner: _Owner, phase: Phase, scope: trio.CancelScope) -> None:
        self._owner, self._phase, self._scope = owner, phase, scope

    def __enter__(self) -> trio.CancelScope:
        self._owner.enter_phase_scope(self._phase, self._scope)
        return self._scope.__enter__()

    def __exit__(self, *exc_info) -> bool:
        self._owner.enter_phase_scope(None, None)
        return self._scope.__exit__(*exc_info)
