"""KeptDelays: a local queue's delayed retries, kept in its log's state so that a restart keeps them.

Strategy: a delay's due time is kept as the log state key ``delay:INDEX:GROUP`` = due (unix ms), so
a restart hides the entry until then too; the key is removed (an empty value) once the delay is due
or its entry gone. The dispatcher (`core.groups.Dispatcher`) keeps delays on trio's clock and lists
the new ones in ``new_delays``; clock times and wall times convert at the moment of writing.
Bounds: one key per delayed (entry, group), as the dispatcher holds them.
"""

from __future__ import annotations

from collections.abc import Callable, Container

import trio

from qserve import storage
from qserve.core.groups import Dispatcher

__all__ = ["KeptDelays", "DELAY_KEY"]

DELAY_KEY = "delay:"   # the log state's key prefix of a kept delay


class KeptDelays:
    """The delays of ``dispatcher`` in the state of ``qlog`` (trio thread only)."""

    def __init__(self, qlog: storage.QueueLog, dispatcher: Dispatcher, wall_clock: Callable[[], float]) -> None:
        self._log = qlog
        self._dispatcher = dispatcher
        self._wall_clock = wall_clock
        self._keys: dict[str, tuple[int, str]] = {}   # kept delays: state key -> (index, group)
        dispatcher.new_delays = []

    def restore(self, stored: Container[int]) -> None:
        """At open: hand the kept delays still to come to the dispatcher (for entries in ``stored``);
        remove the others' keys."""
        clock, now_ms = trio.current_time(), self._wall_clock() * 1000
        stale: dict[str, str] = {}
        for key, value in self._log.state.items():
            if not key.startswith(DELAY_KEY):
                continue
            try:
                _, index_text, group = key.split(":", 2)
                index, due_ms = int(index_text), int(value)
            except ValueError:
                index, due_ms, group = 0, 0, ""
            if due_ms <= now_ms or index not in stored:
                stale[key] = ""
                continue
            self._dispatcher.restore_delay(index, group, clock + (due_ms - now_ms) / 1000)
            self._keys[key] = (index, group)
        if stale:
            self._log.set_state(**stale)

    def keep(self) -> bool:
        """Write the delays the dispatcher made since the last call to the log (True if any)."""
        new = self._dispatcher.new_delays
        if not new:
            return False
        clock, now_ms = trio.current_time(), self._wall_clock() * 1000
        values: dict[str, str] = {}
        for index, group, due in new:
            values[f"{DELAY_KEY}{index}:{group}"] = str(int(now_ms + (due - clock) * 1000))
        self._log.set_state(**values)   # a StorageError leaves them new: the next call writes them
        self._dispatcher.new_delays = []
        for index, group, _ in new:
            self._keys[f"{DELAY_KEY}{index}:{group}"] = (index, group)
        return True

    def forget(self) -> None:
        """Remove the kept delays that are due, or whose entry left the queue."""
        if not self._keys:
            return
        clock = trio.current_time()
        gone = [key for key, (index, group) in self._keys.items()
                if (due := self._dispatcher.delay_of(index, group)) is None or due <= clock]
        for key in gone:
            del self._keys[key]
        if gone:
            self._log.set_state(**dict.fromkeys(gone, ""))
