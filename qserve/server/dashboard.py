"""The dashboard: `GET /dashboard` (a static page) and `GET /api/dashboard` (the figures it shows, as JSON).

Strategy: the page is plain HTML, JavaScript and CSS shipped in the package (`qserve/dashboard/`,
no build step, nothing fetched from another site) with uPlot 1.6.32 (MIT, vendored from its npm
package with its licence, `qserve/dashboard/uplot/`) for the charts. The files are read once, when
the server starts, and answered from memory; they hold no data, so they need no token. The page
asks `/api/dashboard` every second, with the token the user typed (kept in the tab's
sessionStorage): the figures of every queue the token opens, with the same rule as
`GET /api/queues` (`routing`), and the server's own.

The figures are `server.metrics`' JSON snapshot (`Metrics.snapshot`: each queue's length, indexes,
groups and consumers read through the backend seam, and the counters `server.meters` keeps), so
nothing is counted twice; this module adds what only the dashboard shows: the uptime, the queue's
API path, and the process's CPU time, resident memory and open files (prometheus-client's process
collector, where the platform has /proc). Rates are not computed here: the page divides the
difference of two successive counters by the difference of their ``time``. A snapshot is reused for
the requests that come within `REUSE_FOR` seconds of it, so that many open tabs cost at most a few
readings of the queues a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources

import trio
from prometheus_client import ProcessCollector

from qserve import __version__
from qserve.config import Config
from qserve.core.errors import NotFound
from qserve.core.events import QueueRef
from qserve.core.routing import token_opens
from qserve.server.admin import queue_path
from qserve.server.http import Response
from qserve.server.metrics import Metrics

__all__ = ["Dashboard", "REUSE_FOR", "FILES"]

REUSE_FOR = 0.5   # seconds (trio clock) a snapshot answers the requests that follow it

#: the page's files (paths under ``qserve/dashboard/``) and their Content-Type
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "uplot/uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uplot/uPlot.min.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
    "uplot/LICENSE": "text/plain; charset=utf-8",
}

# the page loads only its own files and talks only to this server; no other site may frame it
_HEADERS = [("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff"),
            ("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'")]
_PROCESS = {"process_cpu_seconds_total": "cpu_seconds", "process_resident_memory_bytes": "rss_bytes",
            "process_open_fds": "open_fds"}


class Dashboard:
    """The dashboard of one server. Trio thread only.

    Args:
        metrics: the server's figures (`Metrics.snapshot`).
        config: for the token rule and the backend's kind.
        clock: seconds, for the uptime (monotonic); wall_clock: unix seconds, the ``time`` of a
            document (the page's rates divide by its differences).
    """

    def __init__(self, metrics: Metrics, config: Config, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._metrics = metrics
        self._config = config
        self._clock = clock
        self._wall_clock = wall_clock
        self._started = clock()
        self._process = ProcessCollector(registry=None)
        folder = resources.files("qserve") / "dashboard"
        self._files = {name: (folder.joinpath(name).read_bytes(), content_type) for name, content_type in FILES.items()}
        self._last: tuple[float, float, dict] | None = None   # (trio time, wall time, snapshot)

    def file(self, name: str) -> Response:
        """One of the page's files (`FILES`); NotFound for any other name."""
        found = self._files.get(name)
        if found is None:
            raise NotFound(f"no dashboard file {name}")
        body, content_type = found
        return Response(200, body, [("Content-Type", content_type), *_HEADERS])

    async def document(self, token: str) -> dict:
        """The figures of the queues ``token`` opens and of the server, as one JSON-ready document."""
        now = trio.current_time()
        if self._last is None or now - self._last[0] >= REUSE_FOR:
            self._last = (now, self._wall_clock(), await self._metrics.snapshot())
        _, when, snapshot = self._last
        queues = [{**queue, "path": queue_path(QueueRef.of_kind(queue["service"], queue["queue"]))}
                  for queue in snapshot["queues"] if token_opens(self._config, token, queue["service"])]
        server = snapshot["server"]
        put = snapshot["latency"]["put"]
        return {
            "time": when,
            "server": {
                "version": __version__, "backend": "redis" if self._config.backend else "local",
                "uptime": self._clock() - self._started, "ready": snapshot["ready"],
                "not_ready": snapshot["not_ready"], "storage_problem": snapshot["storage_problem"],
                "connections": server["connections"], "websockets": server["websockets"],
                "watch_sessions": server["watch_sessions"],
                "requests": sum(row["count"] for row in server["requests"]),
                "put_count": put["count"], "put_seconds": put["sum"],
                **self._process_figures(),
            },
            "queues": queues,
        }

    def _process_figures(self) -> dict:
        """CPU seconds, resident bytes and open files of this process (None where /proc is missing)."""
        found = dict.fromkeys(_PROCESS.values())
        for family in self._process.collect():
            for sample in family.samples:
                if sample.name in _PROCESS:
                    found[_PROCESS[sample.name]] = sample.value
        return found
