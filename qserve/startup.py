"""Start-up checks of `qserve serve`, done before the server listens, each failing with one line.

Strategy: everything a user can get wrong about where the server runs (the data directory, the
address and port, another server on the same data) is checked here, in order, before the event
loop starts serving; a failure is a `StartupError` whose message is the one line the CLI prints.
"""

from __future__ import annotations

__all__ = ["StartupError"]


class StartupError(Exception):
    """The server cannot start; the message is one line for the user (no traceback)."""
