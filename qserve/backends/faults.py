"""`Faults`: what a backend's retried background steps (a lease round, a dead-letter move, the record
of a delay; the server's opening of the stored queues at start) say when they fail. Such a step
fails again every round while its cause lasts, so each fault is logged once: when it starts, again
only when its reason changes, and, if the caller asks, once when the step works again. Both
backends keep one per queue or node; its size is bounded by the callers' keys (a few steps per
queue).
"""

from __future__ import annotations

import logging

__all__ = ["Faults"]


class Faults:
    """The faults being reported, by step. Trio thread only."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._said: dict[str, str] = {}   # step -> the line logged for its current fault

    def failed(self, step: str, line: str, *, level: int = logging.ERROR, exc: BaseException | None = None) -> None:
        """``step`` failed: log ``line`` unless it is what was logged for it last (``exc``'s
        traceback goes to debug level)."""
        if self._said.get(step) != line:
            self._said[step] = line
            self._log.log(level, "%s", line)
            if exc is not None:
                self._log.debug("%s: traceback", step, exc_info=exc)

    def ok(self, step: str, line: str | None = None) -> None:
        """``step`` worked: it is no longer failing; log ``line`` if it was."""
        if self._said.pop(step, None) is not None and line is not None:
            self._log.info("%s", line)
